//! Olm sessions with peer devices: encrypting a payload into an
//! `OlmEnvelope`, decrypting one, starting sessions either way.
//!
//! Each peer device has up to [`MAX_SESSIONS_PER_PEER`] sessions, most
//! recently used first; encrypt uses the first, decrypt tries them all and
//! moves the one that worked to the front (as Matrix clients do), so two
//! devices that started sessions with each other at once both keep working.
//!
//! A pre-key message is first matched to an existing session by session id:
//! every message of an outbound session is a pre-key message until the
//! peer's first answer arrives, and starting a second inbound session from
//! one of them would fail (its one-time key is used up) or, for a fallback
//! key, fork the conversation. Only a pre-key message of no known session
//! starts an inbound session, after its `sender_identity` is checked
//! against the sender device's login key and the message's own key.

use bytes::Bytes;
use prost::Message as _;
use tern_protocol::pb;
use vodozemac::olm::{DecryptionError, OlmMessage, PreKeyMessage, Session, SessionConfig, SessionCreationError};
use vodozemac::Curve25519PublicKey;

use super::keys::{verify_identity, IdentityCheck, PeerIdentity, VerifiedKeys};
use super::{DecryptError, E2e, E2eError, Peer, PeerId, MAX_SESSIONS_PER_PEER};
use crate::identity::now_ms;
use crate::Identity;

/// `OlmEnvelope.version` of this layout.
const ENVELOPE_VERSION: u32 = 1;

impl E2e {
    /// Whether there is a session with `peer_device` of `peer_handle` to
    /// encrypt on (else claim its keys and pass them to [`E2e::encrypt`]).
    pub fn has_session(&self, peer_handle: &str, peer_device: u32) -> bool {
        self.peers.get(&peer_id(peer_handle, peer_device)).is_some_and(|p| !p.sessions.is_empty())
    }

    /// Drops every session with a peer device (its identity keys are kept),
    /// so the next [`E2e::encrypt`] to it needs freshly claimed keys.
    pub fn forget_sessions(&mut self, peer_handle: &str, peer_device: u32) {
        if let Some(peer) = self.peers.get_mut(&peer_id(peer_handle, peer_device)) {
            peer.sessions.clear();
        }
    }

    /// Encrypts `payload` for `peer_device` of `peer_handle` and returns the
    /// encoded `OlmEnvelope`. Uses the newest session with it, else starts
    /// one from `claimed` (`NoSession` when there is neither). Records the
    /// payload under `message_id` for recovery. Save before sending.
    pub fn encrypt(
        &mut self,
        me: &Identity,
        peer_handle: &str,
        peer_device: u32,
        claimed: Option<&VerifiedKeys>,
        payload: &pb::E2ePayload,
        message_id: [u8; 16],
    ) -> Result<Bytes, E2eError> {
        let id = peer_id(peer_handle, peer_device);
        if !self.has_session(peer_handle, peer_device) {
            let keys = claimed.ok_or_else(|| E2eError::NoSession { handle: id.0.clone(), device: id.1 })?;
            self.start_outbound(&id, keys)?;
        }
        let plain = payload.encode_to_vec();
        let peer = self.peers.get_mut(&id).ok_or_else(|| E2eError::NoSession { handle: id.0.clone(), device: id.1 })?;
        let session = peer.sessions.first_mut().ok_or(E2eError::NoSession { handle: id.0.clone(), device: id.1 })?;
        let message = session.encrypt(&plain)?;
        let (message_type, ciphertext) = message.to_parts();
        let sender_identity = matches!(message, OlmMessage::PreKey(_)).then(|| self.identity_keys(me));
        self.sent.record(now_ms(), peer_handle, peer_device, &message_id, &plain);
        let envelope = pb::OlmEnvelope {
            version: ENVELOPE_VERSION,
            message_type: message_type as u32,
            ciphertext: ciphertext.into(),
            sender_identity,
        };
        Ok(envelope.encode_to_vec().into())
    }

    /// Starts an outbound session from verified keys, newest first.
    fn start_outbound(&mut self, id: &PeerId, keys: &VerifiedKeys) -> Result<(), E2eError> {
        if (keys.handle.as_str(), keys.device_id) != (id.0.as_str(), id.1) {
            return Err(E2eError::WrongPeer {
                handle: id.0.clone(),
                device: id.1,
                got_handle: keys.handle.clone(),
                got_device: keys.device_id,
            });
        }
        let session = self.account.create_outbound_session(
            SessionConfig::version_1(),
            Curve25519PublicKey::from_bytes(keys.identity.curve25519),
            Curve25519PublicKey::from_bytes(keys.one_time_key),
        )?;
        let peer = self.learn_identity(id, keys.identity);
        push_session(peer, session);
        Ok(())
    }

    /// Records verified identity keys of a peer device. Keys different from
    /// those known mean its account was made anew: the old sessions go.
    fn learn_identity(&mut self, id: &PeerId, identity: PeerIdentity) -> &mut Peer {
        let peer = self.peers.entry(id.clone()).or_default();
        if peer.identity != Some(identity) {
            peer.sessions.clear();
            peer.identity = Some(identity);
        }
        peer
    }

    /// Decrypts an `OlmEnvelope` from `from_device` of `from_handle`, whose
    /// login key (from the device list) is `sender_device_key`. Save before
    /// acknowledging the message. A failure changes nothing.
    pub fn decrypt(
        &mut self,
        from_handle: &str,
        from_device: u32,
        sender_device_key: &[u8; 32],
        body: &[u8],
    ) -> Result<pb::E2ePayload, DecryptError> {
        let envelope = pb::OlmEnvelope::decode(body).map_err(|e| DecryptError::Malformed(e.to_string()))?;
        if envelope.version != ENVELOPE_VERSION {
            return Err(DecryptError::UnsupportedVersion(envelope.version));
        }
        let message_type =
            usize::try_from(envelope.message_type).map_err(|_| DecryptError::Malformed("message type".into()))?;
        let message = OlmMessage::from_parts(message_type, &envelope.ciphertext)
            .map_err(|e| DecryptError::Malformed(e.to_string()))?;
        let id = peer_id(from_handle, from_device);
        let plain = match &message {
            OlmMessage::Normal(_) => self.decrypt_existing(&id, &message)?,
            OlmMessage::PreKey(pre) => match self.decrypt_matching(&id, pre, &message)? {
                Some(plain) => plain,
                None => self.decrypt_inbound(&id, sender_device_key, envelope.sender_identity.as_ref(), pre)?,
            },
        };
        pb::E2ePayload::decode(plain.as_slice()).map_err(|e| DecryptError::BadPayload(e.to_string()))
    }

    /// Tries every session with the peer on a normal message.
    fn decrypt_existing(&mut self, id: &PeerId, message: &OlmMessage) -> Result<Vec<u8>, DecryptError> {
        let unknown = || DecryptError::UnknownSession { handle: id.0.clone(), device: id.1 };
        let peer = self.peers.get_mut(id).ok_or_else(unknown)?;
        let mut telling: Option<DecryptionError> = None;
        for i in 0..peer.sessions.len() {
            match peer.sessions[i].decrypt(message) {
                Ok(plain) => {
                    peer.sessions[..=i].rotate_right(1);
                    return Ok(plain);
                }
                // A MAC failure is what every other session gives; any
                // other error says more (e.g. a key used up: a replay).
                Err(DecryptionError::InvalidMAC(_)) => {}
                Err(e) => telling = Some(e),
            }
        }
        Err(telling.map_or_else(unknown, DecryptError::Olm))
    }

    /// Decrypts a pre-key message on the existing session it belongs to;
    /// `None` when it belongs to none.
    fn decrypt_matching(
        &mut self,
        id: &PeerId,
        pre: &PreKeyMessage,
        message: &OlmMessage,
    ) -> Result<Option<Vec<u8>>, DecryptError> {
        let Some(peer) = self.peers.get_mut(id) else { return Ok(None) };
        let session_id = pre.session_id();
        let Some(i) = peer.sessions.iter().position(|s| s.session_id() == session_id) else { return Ok(None) };
        let plain = peer.sessions[i].decrypt(message)?;
        peer.sessions[..=i].rotate_right(1);
        Ok(Some(plain))
    }

    /// Checks the sender's identity and starts an inbound session.
    fn decrypt_inbound(
        &mut self,
        id: &PeerId,
        sender_device_key: &[u8; 32],
        sender_identity: Option<&pb::IdentityKeys>,
        pre: &PreKeyMessage,
    ) -> Result<Vec<u8>, DecryptError> {
        let (handle, device) = (id.0.clone(), id.1);
        let keys = sender_identity.ok_or_else(|| DecryptError::MissingIdentity { handle: handle.clone(), device })?;
        let bad = |reason| DecryptError::BadIdentity { handle: handle.clone(), device, reason };
        let identity = verify_identity(keys, &id.0, id.1, sender_device_key).map_err(|e| match e {
            IdentityCheck::Bad(what) => bad(what),
            IdentityCheck::Signature => bad("not signed by the sender device's login key"),
        })?;
        let curve25519 = Curve25519PublicKey::from_bytes(identity.curve25519);
        if curve25519 != pre.identity_key() {
            return Err(bad("identity key differs from the pre-key message's"));
        }
        let created =
            self.account.create_inbound_session(SessionConfig::version_1(), curve25519, pre).map_err(|e| match e {
                SessionCreationError::MissingOneTimeKey(_) => DecryptError::UnknownOneTimeKey { handle, device },
                SessionCreationError::Decryption(e) => DecryptError::Olm(e),
                e => DecryptError::Session(e),
            })?;
        let peer = self.learn_identity(id, identity);
        push_session(peer, created.session);
        Ok(created.plaintext)
    }
}

fn peer_id(handle: &str, device: u32) -> PeerId {
    (handle.to_owned(), device)
}

/// Puts a new session first, dropping the least recently used beyond the cap.
fn push_session(peer: &mut Peer, session: Session) {
    peer.sessions.insert(0, session);
    peer.sessions.truncate(MAX_SESSIONS_PER_PEER);
}
