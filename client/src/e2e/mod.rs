//! End-to-end encryption core: this device's Olm account (vodozemac), its
//! pairwise sessions with peer devices, and the files they live in. No
//! networking: the caller moves keys and envelopes to and from the broker.
//!
//! Data flow:
//!
//! - **Keys out.** [`E2e::keys_to_publish`] turns the broker's `KeyStock`
//!   into a signed `PublishKeys`; [`E2e::mark_published`] follows the
//!   broker's `KeysPublished` (`keys`).
//! - **Keys in.** A `ClaimedKeys` answer is checked by
//!   [`E2e::verify_claimed`] into [`VerifiedKeys`] (`keys`).
//! - **Send.** [`E2e::encrypt`] encrypts an `E2ePayload` for one peer
//!   device into an encoded `OlmEnvelope`, on the newest session with it or
//!   a new one from verified keys, and records the plaintext for recovery
//!   (`sessions`, `recovery`).
//! - **Receive.** [`E2e::decrypt`] opens an envelope from a peer device,
//!   starting an inbound session on a verified pre-key message (`sessions`).
//! - **Recovery.** A receiver that cannot decrypt sends
//!   [`recovery_request`]; the sender finds the plaintext with
//!   [`E2e::sent_plaintext`] and sends it again with `replaces` set
//!   (`recovery`).
//! - **Disk.** [`E2e::save`] writes everything (account, sessions, peers'
//!   identities, sent plaintexts) sealed under `e2e.key` (`store`, `state`).
//!   Save after every encrypt (before sending) and every decrypt (before
//!   acknowledging), so a crash never reuses a ratchet step or loses one.

mod error;
mod keys;
mod recovery;
mod sessions;
mod state;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use tern_protocol::pb;
use vodozemac::olm::{Account, Session};

pub use error::{DecryptError, E2eError};
pub use keys::{PeerIdentity, VerifiedKeys};
pub use recovery::recovery_request;

use recovery::SentLog;
use store::StateFiles;

/// Messages remembered as decrypted (by sender device and id), newest last.
const MAX_RECEIVED: usize = 1024;
/// Largest payload kept with a received message's record, to hand out again
/// when it is delivered again (bytes, protobuf).
const MAX_KEPT_PAYLOAD: usize = 4096;

/// Most sessions kept per peer device, newest first.
const MAX_SESSIONS_PER_PEER: usize = 5;

/// A peer device: its handle and device number.
type PeerId = (String, u32);

/// What this device knows of one peer device.
#[derive(Default)]
struct Peer {
    /// Identity keys last verified for it (against its login key).
    identity: Option<PeerIdentity>,
    /// Olm sessions with it, most recently used first.
    sessions: Vec<Session>,
}

/// This device's end-to-end state: account, sessions, peers' identity keys
/// and the record of sent plaintexts, persisted in one directory.
pub struct E2e {
    files: StateFiles,
    account: Account,
    /// The broker answered a publish of this account's identity keys.
    identity_published: bool,
    /// When the current fallback key was made, ms since the Unix epoch (0:
    /// not known, from a state written before this was kept).
    fallback_at_ms: u64,
    peers: BTreeMap<PeerId, Peer>,
    sent: SentLog,
    /// Messages decrypted, as (sender, device, message id hex): one that
    /// comes again (its ack was lost in a crash) cannot be decrypted again
    /// (its message key is used up) and is recognised here.
    received: VecDeque<(String, u32, String, String)>,
    /// The identity keys signed for (handle, device, login key), once.
    signed_identity: std::sync::OnceLock<(String, u32, [u8; 32], pb::IdentityKeys)>,
}

impl std::fmt::Debug for E2e {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2e")
            .field("files", &self.files)
            .field("curve25519", &self.account.curve25519_key().to_base64())
            .field("peers", &self.peers.len())
            .field("sessions", &self.peers.values().map(|p| p.sessions.len()).sum::<usize>())
            .finish_non_exhaustive()
    }
}

impl E2e {
    /// Opens the state in `dir` (`e2e.key`, `e2e.state`), creating the
    /// directory (mode 0700), a key and a new account when there are none.
    pub fn open(dir: &Path) -> Result<Self, E2eError> {
        let files = StateFiles::open(dir)?;
        match files.read()? {
            Some(plain) => {
                let saved = state::Saved::parse(&plain)
                    .map_err(|reason| E2eError::Corrupt { path: files.state_path(), reason })?;
                Ok(saved.into_e2e(files))
            }
            None => {
                let e2e = Self::new_account(files);
                e2e.save()?;
                Ok(e2e)
            }
        }
    }

    fn new_account(files: StateFiles) -> Self {
        let mut account = Account::new();
        // vodozemac numbers one-time keys from 0; brokers treat id 0 as
        // "nothing seen yet" and ignore it, so key 0 is made and never used.
        account.generate_one_time_keys(1);
        account.mark_keys_as_published();
        Self {
            files,
            account,
            identity_published: false,
            fallback_at_ms: 0,
            peers: BTreeMap::new(),
            sent: SentLog::default(),
            received: VecDeque::new(),
            signed_identity: std::sync::OnceLock::new(),
        }
    }

    /// Writes the whole state to `e2e.state`, atomically.
    pub fn save(&self) -> Result<(), E2eError> {
        let plain = state::Saved::from_e2e(self).to_vec().map_err(E2eError::Serialize)?;
        self.files.write(plain)
    }

    /// This account's Curve25519 identity key (for display, fingerprints).
    pub fn curve25519_key(&self) -> [u8; 32] {
        self.account.curve25519_key().to_bytes()
    }

    /// This account's Ed25519 key (signs its one-time keys).
    pub fn ed25519_key(&self) -> [u8; 32] {
        *self.account.ed25519_key().as_bytes()
    }

    /// Records that message `id` from `handle`/`device` was decrypted to
    /// `payload` (kept with it when at most 4 KiB): save before
    /// acknowledging it.
    pub fn record_received(&mut self, handle: &str, device: u32, id: &[u8; 16], payload: &pb::E2ePayload) {
        if self.received.len() >= MAX_RECEIVED {
            self.received.pop_front();
        }
        let bytes = prost::Message::encode_to_vec(payload);
        let kept = if bytes.len() <= MAX_KEPT_PAYLOAD { hex::encode(bytes) } else { String::new() };
        self.received.push_back((handle.to_owned(), device, hex::encode(id), kept));
    }

    /// When message `id` from `handle`/`device` was decrypted before (among
    /// the last 1,024), a redelivery its message key cannot open again:
    /// `Some` with its payload if kept, `Some(None)` if not.
    pub fn received_before(&self, handle: &str, device: u32, id: &[u8; 16]) -> Option<Option<pb::E2ePayload>> {
        let id = hex::encode(id);
        let (.., kept) = self.received.iter().rev().find(|(h, d, i, _)| h == handle && *d == device && *i == id)?;
        let bytes = hex::decode(kept).ok().filter(|b| !b.is_empty());
        Some(bytes.and_then(|b| <pb::E2ePayload as prost::Message>::decode(b.as_slice()).ok()))
    }

    /// The identity keys last verified for a peer device, if any.
    pub fn peer_identity(&self, handle: &str, device: u32) -> Option<PeerIdentity> {
        self.peers.get(&(handle.to_owned(), device)).and_then(|p| p.identity)
    }
}
