//! Keys in and out: this account's signed identity keys, the one-time and
//! fallback keys to publish for a broker `KeyStock`, and the check of a
//! peer's claimed keys into [`VerifiedKeys`].
//!
//! Publishing is idempotent until answered: vodozemac keeps generated keys
//! "unpublished" until [`E2e::mark_published`], and [`E2e::keys_to_publish`]
//! offers those again instead of making new ones, so a publish whose answer
//! was lost can be sent again (the broker ignores key ids it has seen).
//! Keep at most one publish in flight: `mark_published` marks every key
//! generated so far. Save after `keys_to_publish` and before sending: the
//! private halves of the keys must be on disk before the broker can hand
//! them out (a crash in between would otherwise make new keys under the
//! same ids, which the broker ignores, while it hands out the lost ones).

use bytes::Bytes;
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::{Deserialize, Serialize};
use tern_protocol::{auth, pb};
use vodozemac::olm::Account;
use vodozemac::{Curve25519PublicKey, KeyId};

use super::{E2e, E2eError};
use crate::Identity;

/// Identity keys of a peer device, verified against its login key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// Curve25519 identity key (the Olm sender key).
    pub curve25519: [u8; 32],
    /// Ed25519 key of the peer's account (signs its one-time keys).
    pub ed25519: [u8; 32],
}

/// A peer device's claimed keys whose signatures verified: enough to start
/// an outbound session with [`E2e::encrypt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKeys {
    /// The peer's handle.
    pub handle: String,
    /// The peer's device.
    pub device_id: u32,
    /// The login key that signed the identity keys. The caller checks it
    /// against the device list it trusts.
    pub device_key: [u8; 32],
    /// The peer's identity keys.
    pub identity: PeerIdentity,
    /// The claimed one-time key (or fallback key).
    pub one_time_key: [u8; 32],
    /// True when it is the fallback key (no one-time key was left).
    pub fallback: bool,
}

impl E2e {
    /// This account's identity keys, signed by the device's login key.
    pub fn identity_keys(&self, id: &Identity) -> pb::IdentityKeys {
        // Signed once per account and device (Ed25519 is deterministic):
        // every pre-key message carries it.
        if let Some((handle, device, key, signed)) = self.signed_identity.get() {
            if *handle == id.handle && *device == id.device_id && *key == id.public_key() {
                return signed.clone();
            }
        }
        let signed = self.sign_identity_keys(id);
        let _ = self.signed_identity.set((id.handle.clone(), id.device_id, id.public_key(), signed.clone()));
        signed
    }

    fn sign_identity_keys(&self, id: &Identity) -> pb::IdentityKeys {
        let curve25519 = self.account.curve25519_key().to_bytes();
        let ed25519 = *self.account.ed25519_key().as_bytes();
        let signed = auth::identity_keys(&id.handle, id.device_id, &curve25519, &ed25519);
        pb::IdentityKeys {
            curve25519: Bytes::copy_from_slice(&curve25519),
            ed25519: Bytes::copy_from_slice(&ed25519),
            signature: Bytes::copy_from_slice(&id.signing_key.sign(&signed).to_bytes()),
        }
    }

    /// The keys to publish so the broker's stock reaches its maximum (at
    /// most vodozemac's), a fallback key when the broker has none or one
    /// was rotated, and the identity keys; `None` when nothing is needed.
    /// Keys offered before and not yet marked published are offered again.
    /// [`E2e::save`] before sending the publish.
    pub fn keys_to_publish(&mut self, id: &Identity, stock: &pb::KeyStock) -> Option<pb::PublishKeys> {
        // Until a publish of this account was answered, what the broker
        // holds is another account's (it is dropped when ours arrives).
        let (on_record, fallback_on_record) =
            if self.identity_published { (stock.one_time_keys as usize, stock.fallback_key) } else { (0, false) };
        let max = match stock.max_one_time_keys as usize {
            0 => self.account.max_number_of_one_time_keys(),
            m => m.min(self.account.max_number_of_one_time_keys()),
        };
        let room = max.saturating_sub(on_record);
        let unpublished = self.account.one_time_keys().len();
        if unpublished < room {
            self.account.generate_one_time_keys(room - unpublished);
        }
        if !fallback_on_record && self.account.fallback_key().is_empty() {
            self.account.generate_fallback_key();
            self.fallback_at_ms = crate::identity::now_ms();
        }
        let mut one_time: Vec<(u64, Curve25519PublicKey)> =
            self.account.one_time_keys().into_iter().filter_map(|(k, v)| Some((key_id(k)?, v))).collect();
        one_time.sort_by_key(|(k, _)| *k);
        one_time.truncate(room);
        let one_time_keys: Vec<_> =
            one_time.into_iter().map(|(k, v)| sign_key(&self.account, id, false, k, &v)).collect();
        let fallback_key = self.account.fallback_key().into_iter().next().and_then(|(k, v)| {
            let k = key_id(k)?;
            Some(sign_key(&self.account, id, true, k, &v))
        });
        if self.identity_published && stock.identity && one_time_keys.is_empty() && fallback_key.is_none() {
            return None;
        }
        Some(pb::PublishKeys { identity: Some(self.identity_keys(id)), one_time_keys, fallback_key })
    }

    /// Records that the broker answered the last publish (`KeysPublished`):
    /// every key generated so far counts as published. Save afterwards.
    pub fn mark_published(&mut self) {
        self.account.mark_keys_as_published();
        self.identity_published = true;
    }

    /// Makes a new fallback key, offered by the next [`E2e::keys_to_publish`].
    /// The previous one keeps working for sessions still being started.
    pub fn rotate_fallback_key(&mut self) {
        self.account.generate_fallback_key();
        self.fallback_at_ms = crate::identity::now_ms();
    }

    /// Rotates the fallback key if it was made more than `max_age_ms`
    /// before `now_ms` (or when is not known); true if it did. A fallback
    /// key may be handed out to many senders, so it is replaced regularly,
    /// as Signal replaces its signed prekey.
    pub fn rotate_fallback_if_older(&mut self, now_ms: u64, max_age_ms: u64) -> bool {
        if self.fallback_at_ms != 0 && now_ms.saturating_sub(self.fallback_at_ms) <= max_age_ms {
            return false;
        }
        self.rotate_fallback_key();
        self.fallback_at_ms = now_ms;
        true
    }

    /// Checks the signatures of a peer device's claimed keys: the identity
    /// keys by `claimed.device_key`, the one-time (or fallback) key by the
    /// identity's Ed25519 key.
    pub fn verify_claimed(claimed: &pb::ClaimedKeys, handle: &str) -> Result<VerifiedKeys, E2eError> {
        let device = claimed.device_id;
        let missing = |what| E2eError::MissingKeys { handle: handle.to_owned(), device, what };
        let bad_sig = |what| E2eError::BadSignature { handle: handle.to_owned(), device, what };
        let device_key = key32(&claimed.device_key, handle, device, "device key")?;
        let identity_keys = claimed.identity.as_ref().ok_or_else(|| missing("identity keys"))?;
        let identity = verify_identity(identity_keys, handle, device, &device_key).map_err(|e| match e {
            IdentityCheck::Bad(what) => E2eError::BadKey { handle: handle.to_owned(), device, what },
            IdentityCheck::Signature => bad_sig("identity keys"),
        })?;
        let otk = claimed.one_time_key.as_ref().ok_or_else(|| missing("one-time key"))?;
        let public_key = key32(&otk.public_key, handle, device, "one-time key")?;
        let signed = auth::one_time_key(handle, device, claimed.fallback, otk.key_id, &public_key);
        let account_key = VerifyingKey::from_bytes(&identity.ed25519).map_err(|_| E2eError::BadKey {
            handle: handle.to_owned(),
            device,
            what: "ed25519 key",
        })?;
        if !verifies(&account_key, &signed, &otk.signature) {
            return Err(bad_sig("one-time key"));
        }
        Ok(VerifiedKeys {
            handle: handle.to_owned(),
            device_id: device,
            device_key,
            identity,
            one_time_key: public_key,
            fallback: claimed.fallback,
        })
    }
}

/// Why identity keys did not verify.
pub(super) enum IdentityCheck {
    /// A key has the wrong length or is invalid.
    Bad(&'static str),
    /// The signature does not verify under the login key.
    Signature,
}

/// Checks `keys` of `handle`'s `device` against its login key.
pub(super) fn verify_identity(
    keys: &pb::IdentityKeys,
    handle: &str,
    device: u32,
    device_key: &[u8; 32],
) -> Result<PeerIdentity, IdentityCheck> {
    let curve25519: [u8; 32] = keys.curve25519.as_ref().try_into().map_err(|_| IdentityCheck::Bad("curve25519 key"))?;
    let ed25519: [u8; 32] = keys.ed25519.as_ref().try_into().map_err(|_| IdentityCheck::Bad("ed25519 key"))?;
    let login = VerifyingKey::from_bytes(device_key).map_err(|_| IdentityCheck::Bad("device key"))?;
    let signed = auth::identity_keys(handle, device, &curve25519, &ed25519);
    if !verifies(&login, &signed, &keys.signature) {
        return Err(IdentityCheck::Signature);
    }
    Ok(PeerIdentity { curve25519, ed25519 })
}

fn verifies(key: &VerifyingKey, message: &[u8], signature: &[u8]) -> bool {
    Signature::from_slice(signature).is_ok_and(|sig| key.verify_strict(message, &sig).is_ok())
}

fn key32(bytes: &[u8], handle: &str, device: u32, what: &'static str) -> Result<[u8; 32], E2eError> {
    bytes.try_into().map_err(|_| E2eError::BadKey { handle: handle.to_owned(), device, what })
}

/// vodozemac's key id as the u64 it counts (base64 of 8 bytes big-endian).
fn key_id(id: KeyId) -> Option<u64> {
    let bytes: [u8; 8] = vodozemac::base64_decode(id.to_base64()).ok()?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

fn sign_key(
    account: &Account,
    id: &Identity,
    fallback: bool,
    key_id: u64,
    key: &Curve25519PublicKey,
) -> pb::OneTimeKey {
    let public_key = key.to_bytes();
    let signed = auth::one_time_key(&id.handle, id.device_id, fallback, key_id, &public_key);
    pb::OneTimeKey {
        key_id,
        public_key: Bytes::copy_from_slice(&public_key),
        signature: Bytes::copy_from_slice(&account.sign(&signed).to_bytes()),
    }
}
