//! The writer's side of the key service: publishing, claiming and copying
//! device key records, each a read-modify-write within one batch.
//!
//! A record is read through the batch's overlay (so two claims of one
//! device in one batch see each other) and else from RocksDB, which holds
//! every batch written before; the writer being the only writer, nothing
//! else can change a record between the read and the write.

use std::sync::Arc;

use super::super::prekeys::{Claimed, KeyRecord};
use super::super::{cf, now_ms, Account, QueueKey, StoreError};
use super::{Batch, WriterActor, CF_KEYS};

use tern_protocol::pb;

/// A request to the key service.
#[derive(Debug)]
pub(crate) enum KeyOp {
    /// Store a publish (signatures already checked) for `queue`'s device.
    Publish { queue: QueueKey, publish: pb::PublishKeys },
    /// Hand out one key of each target device.
    Claim { targets: Vec<QueueKey> },
    /// Keep `record` for `queue`'s device unless the one held is as new
    /// (a copy from the handle's primary).
    Put { queue: QueueKey, record: KeyRecord },
}

/// What a [`KeyOp`] did.
#[derive(Debug, Clone)]
pub(crate) enum KeyDone {
    /// The device's record after the publish, and its account when the
    /// publish gave the device new identity keys (the device list changed).
    Published(Box<KeyRecord>, Option<Box<Account>>),
    /// Per target: what was handed out and the record after (`None`: the
    /// device has published nothing).
    Claimed(Vec<(QueueKey, Option<(Claimed, KeyRecord)>)>),
    /// The copy was kept, or the one held was as new.
    Put,
}

impl WriterActor {
    pub(super) fn apply_keys(&mut self, batch: &mut Batch, op: KeyOp) -> Result<KeyDone, StoreError> {
        let limits = self.config.keys;
        match op {
            KeyOp::Publish { queue, publish } => {
                let mut record = self.key_record(batch, &queue)?.map(|r| KeyRecord::clone(&r)).unwrap_or_default();
                let before = record.identity.clone();
                record.publish(publish, limits).map_err(|e| StoreError::Invalid(e.to_string()))?;
                let account = match &record.identity {
                    Some(identity) if before.as_ref() != Some(identity) => {
                        self.set_identity(batch, &queue, identity)?
                    }
                    _ => None,
                };
                self.put_key_record(batch, queue, record.clone());
                Ok(KeyDone::Published(Box::new(record), account.map(Box::new)))
            }
            KeyOp::Claim { targets } => {
                let mut out = Vec::with_capacity(targets.len());
                for queue in targets {
                    let Some(current) = self.key_record(batch, &queue)? else {
                        out.push((queue, None));
                        continue;
                    };
                    let mut record = KeyRecord::clone(&current);
                    let claimed = record.claim(limits);
                    if record.version != current.version {
                        self.put_key_record(batch, queue.clone(), record.clone());
                    }
                    out.push((queue, Some((claimed, record))));
                }
                Ok(KeyDone::Claimed(out))
            }
            KeyOp::Put { queue, record } => {
                let newer = self.key_record(batch, &queue)?.is_none_or(|held| record.version > held.version);
                if newer {
                    self.put_key_record(batch, queue, record);
                }
                Ok(KeyDone::Put)
            }
        }
    }

    /// Puts the device's new Curve25519 identity key in its account record
    /// (so the device list, and its version, show it).
    fn set_identity(
        &mut self,
        batch: &mut Batch,
        queue: &QueueKey,
        identity: &pb::IdentityKeys,
    ) -> Result<Option<Account>, StoreError> {
        let Ok(key) = <[u8; 32]>::try_from(identity.curve25519.as_ref()) else { return Ok(None) };
        let Some(current) = self.account(batch, queue.handle())? else { return Ok(None) };
        let mut account = Account::clone(&current);
        let Some(device) = account.devices.iter_mut().find(|d| d.id == queue.device()) else { return Ok(None) };
        device.identity_key = Some(key);
        device.identity_at_ms = now_ms().max(device.identity_at_ms + 1);
        self.put_account(batch, account.clone())?;
        Ok(Some(account))
    }

    /// The device's record as this batch sees it.
    fn key_record(&self, batch: &Batch, queue: &QueueKey) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        if let Some(staged) = batch.keys.get(queue) {
            return Ok(staged.clone());
        }
        match self.db.get_pinned_cf(cf(&self.db, CF_KEYS)?, queue.as_bytes())? {
            Some(bytes) => KeyRecord::decode_stored(&bytes)
                .map(|r| Some(Arc::new(r)))
                .map_err(|e| StoreError::Corrupt(format!("key record of {queue}: {e}"))),
            None => Ok(None),
        }
    }

    fn put_key_record(&self, batch: &mut Batch, queue: QueueKey, record: KeyRecord) {
        batch.put(CF_KEYS, queue.as_bytes().to_vec(), record.encode_stored());
        batch.set_keys(queue, Some(Arc::new(record)));
    }
}
