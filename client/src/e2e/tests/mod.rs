//! Tests of the end-to-end core with real vodozemac accounts in temporary
//! directories and a broker simulated in memory ([`KeyServer`]): it keeps
//! what devices publish and hands each one-time key out once, then the
//! fallback, as the broker's key service does.

mod errors;
mod flow;
mod publish;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;

use bytes::Bytes;
use tern_protocol::pb;

use super::{DecryptError, E2e, VerifiedKeys};
use crate::{generate_key, Identity};

/// One device: its login identity and its end-to-end state on disk.
pub(super) struct Dev {
    pub(super) id: Identity,
    pub(super) e2e: E2e,
    pub(super) dir: PathBuf,
}

impl Dev {
    /// A new device `handle`/`device` with its state under `root`.
    pub(super) fn new(root: &tempfile::TempDir, handle: &str, device: u32) -> Self {
        let dir = root.path().join(format!("{handle}-{device}"));
        let e2e = E2e::open(&dir).expect("open");
        let id = Identity { handle: handle.into(), device_id: device, signing_key: generate_key() };
        Self { id, e2e, dir }
    }

    /// Drops the in-memory state and loads what is on disk (a restart).
    pub(super) fn restart(&mut self) {
        self.e2e = E2e::open(&self.dir).expect("reopen");
    }

    /// A fresh message id.
    pub(super) fn message_id(&mut self) -> [u8; 16] {
        rand::random()
    }

    /// Where this device is addressed.
    pub(super) fn addr(&self) -> (String, u32) {
        (self.id.handle.clone(), self.id.device_id)
    }

    /// Encrypts `payload` for `to`, claiming its keys when there is no
    /// session, and saves; returns the envelope and its message id.
    pub(super) fn send(&mut self, ks: &mut KeyServer, to: &Self, payload: &pb::E2ePayload) -> (Bytes, [u8; 16]) {
        let (handle, device) = to.addr();
        let claimed = (!self.e2e.has_session(&handle, device)).then(|| ks.claim_verified(&handle, device));
        let id = self.message_id();
        let body = self.e2e.encrypt(&self.id, &handle, device, claimed.as_ref(), payload, id).expect("encrypt");
        self.e2e.save().expect("save");
        (body, id)
    }

    /// Sends a text message to `to`.
    pub(super) fn send_text(&mut self, ks: &mut KeyServer, to: &Self, text: &str) -> Bytes {
        self.send(ks, to, &text_payload(text)).0
    }

    /// Decrypts a body from `from` and saves.
    pub(super) fn recv(&mut self, from: &Self, body: &[u8]) -> Result<pb::E2ePayload, DecryptError> {
        let out = self.e2e.decrypt(&from.id.handle, from.id.device_id, &from.id.public_key(), body);
        self.e2e.save().expect("save");
        out
    }

    /// Decrypts a text message from `from`.
    pub(super) fn recv_text(&mut self, from: &Self, body: &[u8]) -> String {
        match self.recv(from, body).expect("decrypt").kind {
            Some(pb::e2e_payload::Kind::Text(t)) => t,
            other => panic!("not a text: {other:?}"),
        }
    }

    /// Publishes keys for the stock `ks` holds and marks them published.
    pub(super) fn publish(&mut self, ks: &mut KeyServer) {
        let stock = ks.stock(&self.addr());
        if let Some(publish) = self.e2e.keys_to_publish(&self.id, &stock) {
            ks.publish(&self.id, publish);
            self.e2e.mark_published();
            self.e2e.save().expect("save");
        }
    }
}

/// A text payload.
pub(super) fn text_payload(text: &str) -> pb::E2ePayload {
    pb::E2ePayload { kind: Some(pb::e2e_payload::Kind::Text(text.into())), replaces: Bytes::new() }
}

/// What the simulated broker keeps for one device.
#[derive(Default)]
pub(super) struct KeyRecord {
    pub(super) device_key: [u8; 32],
    pub(super) identity: Option<pb::IdentityKeys>,
    pub(super) one_time_keys: VecDeque<pb::OneTimeKey>,
    pub(super) fallback: Option<pb::OneTimeKey>,
    pub(super) highest_key_id: u64,
}

/// The broker's key service, in memory.
pub(super) struct KeyServer {
    pub(super) max_one_time_keys: u32,
    pub(super) devices: BTreeMap<(String, u32), KeyRecord>,
}

impl KeyServer {
    pub(super) fn new(max_one_time_keys: u32) -> Self {
        Self { max_one_time_keys, devices: BTreeMap::new() }
    }

    pub(super) fn stock(&self, addr: &(String, u32)) -> pb::KeyStock {
        let rec = self.devices.get(addr);
        pb::KeyStock {
            one_time_keys: rec.map_or(0, |r| r.one_time_keys.len() as u32),
            max_one_time_keys: self.max_one_time_keys,
            low_water: self.max_one_time_keys / 5,
            identity: rec.is_some_and(|r| r.identity.is_some()),
            fallback_key: rec.is_some_and(|r| r.fallback.is_some()),
        }
    }

    /// Applies a publish as the broker does (new identity drops old keys,
    /// ids at or below the highest seen are ignored, the cap is enforced).
    pub(super) fn publish(&mut self, id: &Identity, publish: pb::PublishKeys) {
        let rec = self.devices.entry((id.handle.clone(), id.device_id)).or_default();
        rec.device_key = id.public_key();
        if publish.identity.is_some() && publish.identity != rec.identity {
            *rec = KeyRecord { device_key: id.public_key(), identity: publish.identity, ..KeyRecord::default() };
        }
        let fresh: Vec<_> = publish.one_time_keys.into_iter().filter(|k| k.key_id > rec.highest_key_id).collect();
        assert!(rec.one_time_keys.len() + fresh.len() <= self.max_one_time_keys as usize, "over the cap");
        if let Some(last) = fresh.iter().map(|k| k.key_id).max() {
            rec.highest_key_id = last;
        }
        rec.one_time_keys.extend(fresh);
        if publish.fallback_key.is_some() {
            rec.fallback = publish.fallback_key;
        }
    }

    /// A claim: the oldest one-time key (taken), else the fallback.
    pub(super) fn claim(&mut self, handle: &str, device: u32) -> pb::ClaimedKeys {
        let rec = self.devices.get_mut(&(handle.to_owned(), device)).expect("device has published");
        let taken = rec.one_time_keys.pop_front();
        let fallback = taken.is_none();
        pb::ClaimedKeys {
            device_id: device,
            device_key: Bytes::copy_from_slice(&rec.device_key),
            identity: rec.identity.clone(),
            one_time_key: taken.or_else(|| rec.fallback.clone()),
            fallback,
        }
    }

    /// A claim, verified.
    pub(super) fn claim_verified(&mut self, handle: &str, device: u32) -> VerifiedKeys {
        E2e::verify_claimed(&self.claim(handle, device), handle).expect("claimed keys verify")
    }
}
