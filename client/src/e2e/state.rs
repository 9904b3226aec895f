//! The serialised form of [`E2e`]: vodozemac's account and session pickles,
//! the peers' identity keys and the sent-plaintext record, as JSON. This is
//! what `store` seals; it never reaches the disk in the clear.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vodozemac::olm::{Account, AccountPickle, Session, SessionPickle};

use super::keys::PeerIdentity;
use super::recovery::SentLog;
use super::store::StateFiles;
use super::{E2e, Peer};

/// Version of this layout.
const STATE_VERSION: u32 = 1;

/// The whole state, as written.
#[derive(Serialize, Deserialize)]
pub(super) struct Saved {
    version: u32,
    account: AccountPickle,
    identity_published: bool,
    #[serde(default)]
    fallback_at_ms: u64,
    peers: Vec<SavedPeer>,
    sent: SentLog,
    #[serde(default)]
    received: std::collections::VecDeque<(String, u32, String, String)>,
}

/// One peer device.
#[derive(Serialize, Deserialize)]
struct SavedPeer {
    handle: String,
    device: u32,
    identity: Option<PeerIdentity>,
    /// Most recently used first.
    sessions: Vec<SessionPickle>,
}

impl Saved {
    /// Snapshot of `e2e`.
    pub(super) fn from_e2e(e2e: &E2e) -> Self {
        let peers = e2e
            .peers
            .iter()
            .map(|((handle, device), peer)| SavedPeer {
                handle: handle.clone(),
                device: *device,
                identity: peer.identity,
                sessions: peer.sessions.iter().map(Session::pickle).collect(),
            })
            .collect();
        Self {
            version: STATE_VERSION,
            account: e2e.account.pickle(),
            identity_published: e2e.identity_published,
            fallback_at_ms: e2e.fallback_at_ms,
            peers,
            sent: e2e.sent.clone(),
            received: e2e.received.clone(),
        }
    }

    /// Serialises for sealing.
    pub(super) fn to_vec(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(self).map_err(|e| e.to_string())
    }

    /// Parses an opened state; the error says what was wrong.
    pub(super) fn parse(plain: &[u8]) -> Result<Self, String> {
        let saved: Self = serde_json::from_slice(plain).map_err(|e| e.to_string())?;
        if saved.version != STATE_VERSION {
            return Err(format!("unknown state version {}", saved.version));
        }
        Ok(saved)
    }

    /// The state restored, living in `files`.
    pub(super) fn into_e2e(self, files: StateFiles) -> E2e {
        let peers: BTreeMap<_, _> = self
            .peers
            .into_iter()
            .map(|p| {
                let sessions = p.sessions.into_iter().map(Session::from_pickle).collect();
                ((p.handle, p.device), Peer { identity: p.identity, sessions })
            })
            .collect();
        E2e {
            files,
            account: Account::from_pickle(self.account),
            identity_published: self.identity_published,
            fallback_at_ms: self.fallback_at_ms,
            peers,
            sent: self.sent,
            received: self.received,
            signed_identity: std::sync::OnceLock::new(),
        }
    }
}
