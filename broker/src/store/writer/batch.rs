//! One group-commit batch under construction, all or nothing per request.
//!
//! A batch holds the writes of many requests and an overlay of what they
//! change (queue bounds, accounts, message ids, shipped-from seqs) that later
//! requests of the same batch read through. A request that fails part-way
//! (a read error after its first write, an injected fault in tests) must
//! leave no trace: its writes are staged as [`Op`]s and its overlay changes
//! logged, and [`Batch::finish`] takes both back to the [`Mark`] made before
//! the request. RocksDB's own `WriteBatch` has no save points in the Rust
//! binding, so the `WriteBatch` is built from the staged ops only when the
//! batch is written.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use rocksdb::{WriteBatch, DB};

use super::super::prekeys::KeyRecord;
use super::super::{cf, Account, QueueBounds, QueueKey, StoreError};
use super::{Pending, SyncNeed};

/// A staged write: column family, key, and what to do there.
struct Op {
    cf: &'static str,
    key: Vec<u8>,
    write: Write,
}

enum Write {
    Put(Bytes),
    Delete,
    /// Deletes every key from `key` up to (not including) this one.
    DeleteRange(Vec<u8>),
}

/// How to take one overlay change back.
enum Undo {
    Bounds(QueueKey, Option<QueueBounds>),
    Account(String, Option<Arc<Account>>),
    Dedup(Vec<u8>, Option<(u64, u32)>),
    Shipped(Vec<u8>, Option<u64>),
    Keys(QueueKey, Option<Option<Arc<KeyRecord>>>),
}

/// Where a batch stood before a request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mark {
    ops: usize,
    undo: usize,
    queued: usize,
}

/// One batch under construction.
#[derive(Default)]
pub(super) struct Batch {
    ops: Vec<Op>,
    undo: Vec<Undo>,
    pub(super) bounds: HashMap<QueueKey, QueueBounds>,
    pub(super) accounts: HashMap<String, Arc<Account>>,
    pub(super) dedup: HashMap<Vec<u8>, (u64, u32)>,
    /// Highest origin seq accounted for per shipped-from queue, in this batch.
    pub(super) shipped: HashMap<Vec<u8>, u64>,
    /// Device key records written in this batch (`None`: removed).
    pub(super) keys: HashMap<QueueKey, Option<Arc<KeyRecord>>>,
    pub(super) replies: Vec<Pending>,
    pub(super) queued: Vec<(QueueKey, u64, Bytes)>,
    pub(super) requests: usize,
    /// How soon the batch must be synced: the most any of its requests needs.
    pub(super) sync: SyncNeed,
}

impl Batch {
    pub(super) fn put(&mut self, cf: &'static str, key: impl Into<Vec<u8>>, value: impl AsRef<[u8]>) {
        self.ops.push(Op { cf, key: key.into(), write: Write::Put(Bytes::copy_from_slice(value.as_ref())) });
    }

    /// Stages a put of a value already in a `Bytes` (no copy).
    pub(super) fn put_bytes(&mut self, cf: &'static str, key: impl Into<Vec<u8>>, value: Bytes) {
        self.ops.push(Op { cf, key: key.into(), write: Write::Put(value) });
    }

    pub(super) fn delete(&mut self, cf: &'static str, key: impl Into<Vec<u8>>) {
        self.ops.push(Op { cf, key: key.into(), write: Write::Delete });
    }

    /// Stages the deletion of every key in `from..to` (one range tombstone).
    pub(super) fn delete_range(&mut self, cf: &'static str, from: Vec<u8>, to: Vec<u8>) {
        self.ops.push(Op { cf, key: from, write: Write::DeleteRange(to) });
    }

    pub(super) fn set_bounds(&mut self, queue: QueueKey, bounds: QueueBounds) {
        let old = self.bounds.insert(queue.clone(), bounds);
        self.undo.push(Undo::Bounds(queue, old));
    }

    pub(super) fn set_account(&mut self, handle: String, account: Arc<Account>) {
        let old = self.accounts.insert(handle.clone(), account);
        self.undo.push(Undo::Account(handle, old));
    }

    pub(super) fn set_dedup(&mut self, key: Vec<u8>, value: (u64, u32)) {
        let old = self.dedup.insert(key.clone(), value);
        self.undo.push(Undo::Dedup(key, old));
    }

    pub(super) fn set_shipped(&mut self, key: Vec<u8>, seq: u64) {
        let old = self.shipped.insert(key.clone(), seq);
        self.undo.push(Undo::Shipped(key, old));
    }

    pub(super) fn set_keys(&mut self, queue: QueueKey, record: Option<Arc<KeyRecord>>) {
        let old = self.keys.insert(queue.clone(), record);
        self.undo.push(Undo::Keys(queue, old));
    }

    /// Where the batch stands now: what a request that fails goes back to.
    pub(super) fn mark(&self) -> Mark {
        Mark { ops: self.ops.len(), undo: self.undo.len(), queued: self.queued.len() }
    }

    /// Ends a request begun at `mark`: if it failed, everything it staged
    /// is taken back.
    pub(super) fn finish<T>(&mut self, mark: Mark, result: &Result<T, StoreError>) {
        if result.is_ok() {
            self.undo.truncate(mark.undo);
            return;
        }
        self.ops.truncate(mark.ops);
        self.queued.truncate(mark.queued);
        while self.undo.len() > mark.undo {
            match self.undo.pop() {
                Some(Undo::Bounds(k, old)) => restore(&mut self.bounds, k, old),
                Some(Undo::Account(k, old)) => restore(&mut self.accounts, k, old),
                Some(Undo::Dedup(k, old)) => restore(&mut self.dedup, k, old),
                Some(Undo::Shipped(k, old)) => restore(&mut self.shipped, k, old),
                Some(Undo::Keys(k, old)) => restore(&mut self.keys, k, old),
                None => break,
            }
        }
    }

    /// True when no request staged a write.
    pub(super) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The RocksDB batch of every staged write, in order.
    pub(super) fn write_batch(&self, db: &DB) -> Result<WriteBatch, StoreError> {
        let mut write = WriteBatch::default();
        for op in &self.ops {
            let cf = cf(db, op.cf)?;
            match &op.write {
                Write::Put(value) => write.put_cf(cf, &op.key, value),
                Write::Delete => write.delete_cf(cf, &op.key),
                Write::DeleteRange(to) => write.delete_range_cf(cf, &op.key, to),
            }
        }
        Ok(write)
    }
}

fn restore<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, key: K, old: Option<V>) {
    match old {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}
