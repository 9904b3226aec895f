//! Session recovery: the record of recently sent plaintexts, so a message a
//! peer device could not decrypt can be sent again on a new session.
//!
//! Flow: the receiver's [`E2e::decrypt`] fails; it drops its sessions with
//! the sender ([`E2e::forget_sessions`]), claims a key of the sender device
//! and sends it [`recovery_request`] for the failed message id on the new
//! session. The sender finds the plaintext with [`E2e::sent_plaintext`],
//! and sends it again (new transport id, `replaces` set to the old one): on
//! the newest session (the one the request arrived on), or, after
//! `forget_sessions`, on a new one from freshly claimed keys.
//!
//! One record per message id and peer handle lists the devices it went to,
//! so a message to several devices of a user is kept once; at most
//! [`MAX_PER_PEER`] per handle and none older than [`MAX_AGE_MS`]. The
//! record is part of the sealed state file, never written in the clear.

use std::collections::{BTreeMap, VecDeque};

use prost::Message as _;
use serde::{Deserialize, Serialize};
use tern_protocol::pb;

use super::E2e;

/// Most sent messages remembered per peer handle.
pub(super) const MAX_PER_PEER: usize = 256;
/// Oldest sent message remembered: 7 days.
pub(super) const MAX_AGE_MS: u64 = 7 * 24 * 3600 * 1000;

/// The payload asking a peer device to send `failed_message_id` again.
pub fn recovery_request(failed_message_id: [u8; 16]) -> pb::E2ePayload {
    pb::E2ePayload {
        kind: Some(pb::e2e_payload::Kind::Recovery(pb::SessionRecovery {
            message_id: bytes::Bytes::copy_from_slice(&failed_message_id),
        })),
        replaces: bytes::Bytes::new(),
    }
}

/// One sent message.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SentRecord {
    /// Its transport id, hex.
    message_id: String,
    /// When it was first encrypted, ms since the Unix epoch.
    at_ms: u64,
    /// The devices of the handle it was encrypted for.
    devices: Vec<u32>,
    /// The `E2ePayload`, protobuf, hex.
    payload: String,
}

/// Sent plaintexts by peer handle, oldest first.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub(super) struct SentLog {
    by_handle: BTreeMap<String, VecDeque<SentRecord>>,
}

impl SentLog {
    /// Records that `payload` went to `device` of `handle` as `message_id`.
    pub(super) fn record(&mut self, now_ms: u64, handle: &str, device: u32, message_id: &[u8; 16], payload: &[u8]) {
        let id = hex::encode(message_id);
        let log = self.by_handle.entry(handle.to_owned()).or_default();
        if let Some(rec) = log.iter_mut().rev().find(|r| r.message_id == id) {
            if !rec.devices.contains(&device) {
                rec.devices.push(device);
            }
        } else {
            let rec =
                SentRecord { message_id: id, at_ms: now_ms, devices: vec![device], payload: hex::encode(payload) };
            log.push_back(rec);
            while log.len() > MAX_PER_PEER {
                log.pop_front();
            }
        }
        self.prune(now_ms);
    }

    /// The encoded payload sent to `device` of `handle` as `message_id`.
    pub(super) fn find(&self, handle: &str, device: u32, message_id: &[u8; 16]) -> Option<Vec<u8>> {
        let id = hex::encode(message_id);
        let rec = self.by_handle.get(handle)?.iter().rev().find(|r| r.message_id == id)?;
        if !rec.devices.contains(&device) {
            return None;
        }
        hex::decode(&rec.payload).ok()
    }

    /// Drops records older than [`MAX_AGE_MS`].
    pub(super) fn prune(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(MAX_AGE_MS);
        for log in self.by_handle.values_mut() {
            while log.front().is_some_and(|r| r.at_ms < oldest) {
                log.pop_front();
            }
        }
        self.by_handle.retain(|_, log| !log.is_empty());
    }

    /// Number of records kept for `handle`.
    #[cfg(test)]
    pub(super) fn len(&self, handle: &str) -> usize {
        self.by_handle.get(handle).map_or(0, VecDeque::len)
    }
}

impl E2e {
    /// The payload last sent to `peer_device` of `peer_handle` as
    /// `message_id`, if still remembered: to send it again after a
    /// [`recovery_request`] (with `replaces` set by the caller).
    pub fn sent_plaintext(&self, peer_handle: &str, peer_device: u32, message_id: &[u8; 16]) -> Option<pb::E2ePayload> {
        let bytes = self.sent.find(peer_handle, peer_device, message_id)?;
        pb::E2ePayload::decode(bytes.as_slice()).ok()
    }
}
