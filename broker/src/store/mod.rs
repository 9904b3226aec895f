//! Durable storage: per-device FIFO queues, accounts and the idempotency
//! index, in one RocksDB database.
//!
//! Reads (queue ranges, accounts) go straight to RocksDB from the caller.
//! Every write goes through one [`writer`] thread that batches whatever
//! requests are waiting into a single `WriteBatch` and one WAL sync (group
//! commit), then answers all of them and tells the [`QueueListener`] about
//! each new queue entry so online devices get it pushed at once.
//!
//! A queue is the key range of its [`QueueKey`]; the writer keeps each queue's
//! head (highest deleted seq) and tail (highest assigned seq) in memory and
//! reads only between them, so tombstones of acknowledged entries at a queue's
//! front are never scanned.

mod accounts;
mod envelopes;
mod item;
mod keys;
pub mod prekeys;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, DB};
use tokio::sync::{mpsc, oneshot};

pub use accounts::{Account, Device, PresenceSettings, Profile, PushSubscription, MAX_ALLOWED};
pub use envelopes::SendBody;
pub(crate) use item::{enqueued_at, split_item, KIND_RECEIPT};
pub use item::{CorruptItem, StoredItem};
pub use keys::QueueKey;
use keys::{
    BOOT_KEY, CF_ACCOUNTS, CF_DEDUP, CF_KEYS, CF_MESH, CF_META, CF_QUEUES, CLOSED_KEY, INCARNATION_KEY, STORE_ID_KEY,
};
pub use prekeys::{Claimed, KeyLimits, KeyRecord};
pub(crate) use writer::{KeyDone, KeyOp};
use writer::{WriteCmd, WriterActor};

use crate::clock::Hlc;

/// Store settings (the `[store]` part of the broker configuration).
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// RocksDB directory.
    pub path: PathBuf,
    /// When an acknowledged write is durable.
    pub durability: crate::config::Durability,
    /// How long an undelivered entry and a message id (for idempotent
    /// resends) are kept.
    pub retention: Duration,
    /// Most entries one device queue may hold; a send beyond it fails with
    /// `QUEUE_FULL`, a shipped batch beyond it is refused (and shipped
    /// again later), a receipt beyond it is dropped.
    pub max_queue_len: u64,
    /// Largest stored entry this broker can push to a device: what fits in
    /// `limits.max_frame_len` (see [`max_entry_len`]). A shipped message
    /// above it is answered with an undeliverable receipt instead.
    pub max_entry_len: usize,
    /// Most requests folded into one write batch.
    pub max_batch: usize,
    /// Most devices one user may have.
    pub max_devices: u32,
    /// Accounts kept in the in-memory cache.
    pub account_cache_entries: u64,
    /// What RocksDB may hold in memory, in MiB: see [`memory_budget`].
    pub memory_mb: u64,
    /// The key service's one-time key stock per device.
    pub keys: KeyLimits,
}

/// RocksDB's memory, split from `memory_mb`: two thirds for the memtables
/// of every column family together (a write buffer manager flushes the
/// largest when they reach it; without one each family's grows to 64 MiB,
/// twice, before it is flushed, and a broker under chat load held 192 MiB
/// resident for 100 users), a third for the block cache that all families
/// share. Returns (memtables, block cache) in bytes.
pub fn memory_budget(memory_mb: u64) -> (usize, usize) {
    let total = (memory_mb.max(3) as usize) << 20;
    let memtables = total / 3 * 2;
    (memtables, total - memtables)
}

/// Why a store operation failed. Nothing of a failed operation is stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No account with this handle.
    #[error("no user {0:?}")]
    UnknownUser(String),
    /// No such device.
    #[error("no device {0}")]
    UnknownDevice(String),
    /// The handle is registered already.
    #[error("handle {0:?} is taken")]
    HandleTaken(String),
    /// The user has the maximum number of devices.
    #[error("user {0:?} has the maximum of {1} devices")]
    TooManyDevices(String, u32),
    /// A recipient device's queue is at its cap.
    #[error("queue of {0} is full ({1} entries)")]
    QueueFull(String, u64),
    /// The disk is full or below the configured free-space floor.
    #[error("storage is full: {0}")]
    Full(String),
    /// RocksDB failed.
    #[error("storage error: {0}")]
    Db(String),
    /// Stored data does not decode.
    #[error("{0}")]
    Corrupt(String),
    /// The store is shut down.
    #[error("store is closed")]
    Closed,
    /// The mesh member that must take part (an account's primary) could not
    /// be reached. Nothing was stored.
    #[error("{0}")]
    Unavailable(String),
    /// The request was refused as invalid (a key publish over the stock's
    /// maximum, say). Nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// The device may not do this (unlink another device, not being the
    /// primary). Nothing was stored.
    #[error("{0}")]
    Denied(String),
    /// A per-device send was made for device lists that are not current:
    /// how each differs. Nothing was stored.
    #[error("the device lists changed: {}", describe_mismatches(.0))]
    DevicesChanged(Vec<tern_protocol::pb::DeviceMismatch>),
}

fn describe_mismatches(m: &[tern_protocol::pb::DeviceMismatch]) -> String {
    let one = |m: &tern_protocol::pb::DeviceMismatch| {
        format!("{:?}: missing {:?}, extra {:?}, stale {:?}", m.handle, m.missing, m.extra, m.stale)
    };
    m.iter().map(one).collect::<Vec<_>>().join("; ")
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        let text = e.to_string();
        if text.contains("No space left") || text.contains("ENOSPC") {
            Self::Full(text)
        } else {
            Self::Db(text)
        }
    }
}

impl From<CorruptItem> for StoreError {
    fn from(e: CorruptItem) -> Self {
        Self::Corrupt(e.to_string())
    }
}

/// Told by the writer of each entry it queued, once the batch is written and
/// before its WAL sync. Must not block: it runs on the writer thread.
pub trait QueueListener: Send + Sync + 'static {
    /// Entry `seq` of `queue` is stored; `value` is its stored bytes. It
    /// survives a crash of the process, not yet one of the machine.
    fn queued(&self, queue: &QueueKey, seq: u64, value: &Bytes);
}

/// The largest stored entry whose `Deliver` frame fits in `max_frame_len`:
/// the frame adds at most 23 bytes (field keys, the seq and two lengths as
/// varints) to the stored bytes, which hold the item and its enqueue time.
pub fn max_entry_len(max_frame_len: usize) -> usize {
    max_frame_len.saturating_sub(32)
}

/// Result of a successful enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The id was accepted before; nothing new was stored.
    pub duplicate: bool,
    /// When the message was first accepted, ms since the epoch.
    pub accepted_at_ms: u64,
    /// Device queues the message went into.
    pub recipients: u32,
}

/// A device queue's bounds: entries `head+1 ..= tail` are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueBounds {
    /// Highest deleted (acknowledged or expired) seq.
    pub head: u64,
    /// Highest assigned seq.
    pub tail: u64,
}

impl QueueBounds {
    /// Entries waiting.
    pub fn depth(&self) -> u64 {
        self.tail - self.head
    }
}

/// What the sender of a shipment says it no longer holds (see
/// [`tern_protocol::shipping`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShipHeader {
    /// Every entry up to it is gone from the sender.
    pub base: u64,
    /// Entries up to it were last acknowledged by another broker (0: none,
    /// or this one).
    pub handed_up_to: u64,
}

/// What became of a shipment ([`Store::submit_ship`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShipOutcome {
    /// Stored, or held already: acknowledge up to this origin seq.
    Acked(u64),
    /// Nothing stored: an earlier entry is missing; the sender resends
    /// from `expected`.
    Gap {
        /// The origin seq needed next.
        expected: u64,
    },
    /// Nothing stored: the entries up to `up_to` are at the broker that
    /// acknowledged them, which must hand them over first.
    Wait {
        /// Origin seq that broker acknowledged up to.
        up_to: u64,
        /// The origin seq needed next from the sender.
        expected: u64,
    },
}

/// What a sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// Entries deleted.
    pub entries: u64,
    /// Queues they came from.
    pub queues: u64,
    /// The request stopped at its limit: more may be expired now.
    pub more: bool,
}

/// Cheap, cloneable handle to the store.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    tx: mpsc::Sender<WriteCmd>,
    accounts: moka::sync::Cache<String, Arc<Account>>,
    disk_low: Arc<AtomicBool>,
    /// Set by the sync thread when a WAL sync failed.
    sync_failed: Arc<OnceLock<StoreError>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    config: StoreConfig,
    id: [u8; 16],
    incarnation: u64,
    /// Stamps entries stored here (shared with the mesh's login epochs).
    clock: Arc<Hlc>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.config.path).finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The outcome of a request queued for the writer by [`Store::submit_enqueue`]
/// (or any other request), once its batch is durable.
#[derive(Debug)]
pub struct WriteOutcome<T>(oneshot::Receiver<Result<T, StoreError>>);

impl<T> std::future::Future for WriteOutcome<T> {
    type Output = Result<T, StoreError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

impl Store {
    /// Opens (or creates) the database and starts the writer thread.
    pub fn open(config: StoreConfig, listener: Arc<dyn QueueListener>) -> Result<Self, StoreError> {
        let db = Arc::new(open_db(&config)?);
        let id = store_id(&db)?;
        let incarnation = next_incarnation(&db)?;
        let accounts = moka::sync::Cache::new(config.account_cache_entries);
        let disk_low = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(config.max_batch * 4);
        let sync_failed = Arc::new(OnceLock::new());
        let clock = Arc::new(Hlc::default());
        let shared = writer::Shared {
            accounts: accounts.clone(),
            disk_low: disk_low.clone(),
            sync_failed: sync_failed.clone(),
            clock: clock.clone(),
        };
        let actor = WriterActor::new(db.clone(), rx, listener, config.clone(), shared)?;
        let thread = std::thread::Builder::new()
            .name("tern-store-writer".into())
            .spawn(move || actor.run())
            .map_err(|e| StoreError::Db(format!("cannot start writer thread: {e}")))?;
        let writer = Mutex::new(Some(thread));
        let inner = Inner { db, tx, accounts, disk_low, sync_failed, writer, config, id, incarnation, clock };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The clock that stamps entries stored here: the mesh takes login
    /// epochs from it and observes other brokers' values with it.
    pub(crate) fn clock(&self) -> &Arc<Hlc> {
        &self.inner.clock
    }

    /// This database's random origin id, made when it was created and made
    /// anew after an unclean stop across a reboot (see `store_id`): with a
    /// queue seq it names an entry shipped to another broker uniquely.
    pub fn id(&self) -> [u8; 16] {
        self.inner.id
    }

    /// This start's gossip incarnation: above every earlier start's.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// Stores entries shipped by the broker whose store is `origin`, from
    /// its copy of `queue`, by the rule of [`tern_protocol::shipping::admit`]:
    /// an entry whose origin seq was stored before is skipped, so a resend is
    /// stored once, and nothing is stored past a seq that is neither here nor
    /// known to be gone. Resolves, once durable, to what became of it.
    pub async fn submit_ship(
        &self,
        origin: [u8; 16],
        queue: QueueKey,
        header: ShipHeader,
        entries: Vec<(u64, Bytes)>,
    ) -> Result<WriteOutcome<ShipOutcome>, StoreError> {
        self.submit(|reply| WriteCmd::ApplyShip { origin, queue, header, entries, reply }).await
    }

    /// Records that every entry of `origin`'s copy of `queue` up to `up_to`
    /// is accounted for here (the broker that held them handed them over):
    /// shipments of later ones are stored from then on. Returns the highest
    /// origin seq accounted for.
    pub async fn settle(&self, origin: [u8; 16], queue: QueueKey, up_to: u64) -> Result<u64, StoreError> {
        self.call(|reply| WriteCmd::Settle { origin, queue, up_to, reply }).await
    }

    /// Deletes the entries of `queue` up to `up_to` once broker `node` has
    /// stored them (no delivery receipts: nothing was delivered), and
    /// records that `node` holds them ([`Store::handed`]).
    pub async fn shipped(&self, queue: QueueKey, up_to: u64, node: String) -> Result<QueueBounds, StoreError> {
        self.call(|reply| WriteCmd::Shipped { queue, up_to, node, reply }).await
    }

    /// Forgets that `node` holds entries of `queue` shipped from here: it has
    /// handed back everything it held of the queue.
    pub async fn forget_handed(&self, queue: QueueKey, node: String) -> Result<(), StoreError> {
        self.call(|reply| WriteCmd::ForgetHanded { queue, node, reply }).await.map(drop)
    }

    /// The broker that last stored entries of `queue` shipped from here, and
    /// the seq up to which it did.
    pub fn handed(&self, queue: &QueueKey) -> Result<Option<(String, u64)>, StoreError> {
        let db = &self.inner.db;
        let value = db.get_pinned_cf(cf(db, CF_MESH)?, keys::handed_key(queue))?;
        Ok(value.and_then(|v| keys::decode_handed(&v)))
    }

    /// Merges an account record from another broker into the one held here
    /// ([`Account::merge`]: the same result at every broker, in any order).
    /// Returns the record now held.
    pub async fn put_account(&self, account: Account) -> Result<Account, StoreError> {
        self.call(|reply| WriteCmd::PutAccount { account, reply }).await
    }

    /// Account changes logged after change `after`, oldest first, at most
    /// `max`: each change's number and handle (a handle may come twice).
    pub fn account_changes(&self, after: u64, max: usize) -> Result<Vec<(u64, String)>, StoreError> {
        let db = &self.inner.db;
        let prefix = keys::ACCOUNT_LOG_PREFIX;
        let start = keys::account_log_key(after.saturating_add(1));
        let iter = db.iterator_cf(cf(db, CF_MESH)?, IteratorMode::From(&start, Direction::Forward));
        let mut out = Vec::new();
        for entry in iter {
            let (key, value) = entry?;
            let Some(n) = key.strip_prefix(prefix).and_then(|n| <[u8; 8]>::try_from(n).ok()) else { break };
            out.push((u64::from_be_bytes(n), String::from_utf8_lossy(&value).into_owned()));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Runs a key service request (publish, claim, copy, remove) in the
    /// writer; durable when it returns.
    pub(crate) async fn keys(&self, op: KeyOp) -> Result<KeyDone, StoreError> {
        self.call(|reply| WriteCmd::Keys { op, reply }).await
    }

    /// Keeps `handle`'s last-seen time (to the minute). Written directly,
    /// not through the writer: an independent key, no sync (a machine
    /// crash that loses it only shows an older time); a failure is logged.
    pub fn set_last_seen(&self, handle: &str, at_ms: u64) {
        let db = &self.inner.db;
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(false);
        let written = cf(db, CF_MESH).and_then(|mesh| {
            db.put_cf_opt(mesh, keys::last_seen_key(handle), at_ms.to_be_bytes(), &opts).map_err(StoreError::from)
        });
        if let Err(e) = written {
            tracing::warn!(%handle, error = %e, "last-seen time not stored");
        }
    }

    /// `handle`'s last-seen time as stored here, if any.
    pub fn last_seen(&self, handle: &str) -> Option<u64> {
        let db = &self.inner.db;
        let value = db.get_pinned_cf(cf(db, CF_MESH).ok()?, keys::last_seen_key(handle)).ok()??;
        Some(u64::from_be_bytes(value.as_ref().try_into().ok()?))
    }

    /// The key record of `queue`'s device as last written.
    pub fn key_record(&self, queue: &QueueKey) -> Result<Option<KeyRecord>, StoreError> {
        let db = &self.inner.db;
        match db.get_pinned_cf(cf(db, CF_KEYS)?, queue.as_bytes())? {
            Some(bytes) => KeyRecord::decode_stored(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("key record of {queue}: {e}"))),
            None => Ok(None),
        }
    }

    /// Every queue holding entries, with its bounds.
    pub async fn waiting(&self) -> Result<Vec<(QueueKey, QueueBounds)>, StoreError> {
        self.call(|reply| WriteCmd::Waiting { reply }).await
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Queues a request for the writer (waiting for room in its channel);
    /// returns the future of its outcome.
    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteCmd,
    ) -> Result<WriteOutcome<T>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.inner.tx.send(make(reply)).await.map_err(|_| StoreError::Closed)?;
        Ok(WriteOutcome(rx))
    }

    /// Queues a request and waits for its outcome.
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteCmd,
    ) -> Result<T, StoreError> {
        self.submit(make).await?.await
    }

    /// Claims `handle` with its first device. Durable when it returns.
    pub async fn register(&self, handle: &str, public_key: [u8; 32]) -> Result<Account, StoreError> {
        let handle = handle.to_owned();
        self.call(|reply| WriteCmd::Register { handle, public_key, reply }).await
    }

    /// Adds a device to `handle`; returns its number.
    pub async fn add_device(&self, handle: &str, public_key: [u8; 32]) -> Result<u32, StoreError> {
        let handle = handle.to_owned();
        self.call(|reply| WriteCmd::AddDevice { handle, public_key, reply }).await
    }

    /// Unlinks `device` of `handle`, asked by its device `by` (itself or the
    /// primary); drops its queue and keys. Returns the account after.
    pub async fn unlink(&self, handle: &str, device: u32, by: u32) -> Result<Account, StoreError> {
        let handle = handle.to_owned();
        self.call(|reply| WriteCmd::Unlink { handle, device, by, reply }).await
    }

    /// Applies a checked profile change to `handle`'s account; returns the
    /// account after.
    pub async fn set_profile(
        &self,
        handle: &str,
        update: tern_protocol::pb::SetProfile,
    ) -> Result<Account, StoreError> {
        let handle = handle.to_owned();
        self.call(|reply| WriteCmd::SetProfile { handle, update, reply }).await
    }

    /// Sets (or, with an empty endpoint, clears) the push subscription of
    /// `device` of `handle`; returns the account after.
    pub async fn set_push(
        &self,
        handle: &str,
        device: u32,
        subscription: PushSubscription,
    ) -> Result<Account, StoreError> {
        let handle = handle.to_owned();
        self.call(|reply| WriteCmd::SetPush { handle, device, subscription, reply }).await
    }

    /// Applies a presence settings change to `handle`'s account; returns
    /// the account after.
    pub async fn set_presence(
        &self,
        handle: &str,
        update: tern_protocol::pb::SetPresence,
    ) -> Result<Account, StoreError> {
        let handle = handle.to_owned();
        self.call(|reply| WriteCmd::SetPresence { handle, update, reply }).await
    }

    /// Queues a message from `sender` for every device of `to` and the
    /// sender's other devices, idempotently by `(sender, message_id)`, with
    /// a delivered receipt for the sender when a device acknowledges it.
    /// Resolves once the batch holding it is durable.
    pub async fn enqueue(
        &self,
        sender: QueueKey,
        message_id: [u8; 16],
        to: String,
        body: impl Into<SendBody>,
    ) -> Result<Enqueued, StoreError> {
        self.submit_enqueue(sender, message_id, to, body, true).await?.await
    }

    /// The first half of [`Store::enqueue`]: resolves once the send is queued
    /// for the writer, and returns a future of its durable outcome.
    ///
    /// Sends submitted one after another by one task are stored (and get
    /// their seqs) in that order, so a session submits each `Send` before it
    /// reads the next frame and waits for the outcomes concurrently. Awaiting
    /// several [`Store::enqueue`] futures at once gives no such promise: when
    /// the writer's channel is full, whichever future is polled first after
    /// room frees up goes first.
    pub async fn submit_enqueue(
        &self,
        sender: QueueKey,
        message_id: [u8; 16],
        to: String,
        body: impl Into<SendBody>,
        receipt: bool,
    ) -> Result<WriteOutcome<Enqueued>, StoreError> {
        let body = body.into();
        self.submit(|reply| WriteCmd::Enqueue { sender, message_id, to, body, receipt, reply }).await
    }

    /// Deletes the entries of `queue` up to `up_to` (cumulative) and queues
    /// delivery receipts for their senders. Returns the new bounds.
    pub async fn ack(&self, queue: QueueKey, up_to: u64) -> Result<QueueBounds, StoreError> {
        self.call(|reply| WriteCmd::Ack { queue, up_to, reply }).await
    }

    /// Like [`Store::ack`], without waiting for the write: the request is
    /// queued behind everything sent to the writer before it, so a later
    /// login's [`Store::bounds`] sees it. A failed write is logged by the writer.
    pub async fn ack_detached(&self, queue: QueueKey, up_to: u64) -> Result<(), StoreError> {
        self.submit(|reply| WriteCmd::Ack { queue, up_to, reply }).await.map(drop)
    }

    /// The bounds of `queue`.
    pub async fn bounds(&self, queue: QueueKey) -> Result<QueueBounds, StoreError> {
        self.call(|reply| WriteCmd::Bounds { queue, reply }).await
    }

    /// Deletes entries queued before `cutoff_ms`.
    pub async fn expire(&self, cutoff_ms: u64) -> Result<Expired, StoreError> {
        self.call(|reply| WriteCmd::Expire { cutoff_ms, reply }).await
    }

    /// Sets or clears the low-disk flag: while set, sends fail with
    /// [`StoreError::Full`].
    pub fn set_disk_low(&self, low: bool) {
        self.inner.disk_low.store(low, Ordering::Relaxed);
    }

    /// True while the low-disk flag is set.
    pub fn disk_low(&self) -> bool {
        self.inner.disk_low.load(Ordering::Relaxed)
    }

    /// The error of the WAL sync that failed, if one did: from then on every
    /// request that needs a sync fails with it, until the broker restarts.
    pub fn failure(&self) -> Option<&StoreError> {
        self.inner.sync_failed.get()
    }

    /// Test hook: acts as if a WAL sync had failed with `reason` (a real
    /// fsync failure cannot be caused on demand). Every later request that
    /// needs a sync fails, exactly as after a real failure.
    #[doc(hidden)]
    pub fn fail_sync_for_test(&self, reason: &str) {
        let _ = self.inner.sync_failed.set(StoreError::Db(reason.to_owned()));
    }

    /// The account of `handle`, if registered.
    pub fn account(&self, handle: &str) -> Result<Option<Arc<Account>>, StoreError> {
        if let Some(a) = self.inner.accounts.get(handle) {
            return Ok(Some(a));
        }
        let cf = cf(&self.inner.db, CF_ACCOUNTS)?;
        let Some(bytes) = self.inner.db.get_pinned_cf(cf, handle.as_bytes())? else {
            return Ok(None);
        };
        let account = Arc::new(Account::from_json(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        self.inner.accounts.insert(handle.to_owned(), account.clone());
        Ok(Some(account))
    }

    /// [`Store::read`] on a blocking thread, so a read that misses the
    /// caches (an iterator over SST files on disk) does not hold up the
    /// other tasks of a tokio worker.
    pub async fn read_off_thread(
        &self,
        queue: QueueKey,
        from: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read(&queue, from, max_items, max_bytes))
            .await
            .unwrap_or_else(|e| Err(StoreError::Db(format!("queue read task failed: {e}"))))
    }

    /// Up to `max_items` entries (and about `max_bytes`) of `queue` with
    /// seq >= `from`, in order, as `(seq, stored bytes)`.
    pub fn read(
        &self,
        queue: &QueueKey,
        from: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, StoreError> {
        let db = &self.inner.db;
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(queue.entry(u64::MAX));
        let start = queue.entry(from);
        let iter = db.iterator_cf_opt(cf(db, CF_QUEUES)?, opts, IteratorMode::From(&start, Direction::Forward));
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in iter {
            let (key, value) = entry?;
            let Some(seq) = queue.seq_of(&key) else { break };
            bytes += value.len();
            out.push((seq, Bytes::from(value.into_vec())));
            if out.len() >= max_items || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Holds back sends into `queue` (they are applied, in order, once the
    /// fence is lifted) and returns its tail: used while older entries come
    /// back from another broker. Every fence must be lifted with
    /// [`Store::unfence`].
    pub async fn fence(&self, queue: QueueKey) -> Result<u64, StoreError> {
        self.call(|reply| WriteCmd::Fence { queue, reply }).await
    }

    /// Lifts a fence of [`Store::fence`].
    pub async fn unfence(&self, queue: QueueKey) -> Result<(), StoreError> {
        self.call(|reply| WriteCmd::Unfence { queue, reply }).await.map(drop)
    }

    /// Puts each sender's entries of `queue` in the order of their stamps
    /// after a fence during which older or newer entries came back. If any
    /// entry moves, all are appended anew after the tail and the old seqs
    /// deleted (no seq's value ever changes). Returns the bounds after.
    pub async fn reorder(&self, queue: QueueKey) -> Result<QueueBounds, StoreError> {
        self.call(|reply| WriteCmd::Reorder { queue, reply }).await
    }

    /// The queues holding messages sent by device `device` of `handle`, each
    /// with the highest seq of one. Taken after the writer has applied every
    /// request queued before this call (a send of that device accepted here
    /// is seen); the entries are read on a blocking thread. A broker asks
    /// when a device that sent through it has logged in at another broker
    /// (`SenderFlush`), so it costs a read of what waits here per move.
    pub async fn sent_by(&self, handle: &str, device: u32) -> Result<Vec<(QueueKey, u64)>, StoreError> {
        let waiting = self.waiting().await?;
        let (store, handle) = (self.clone(), handle.to_owned());
        let scan = tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            for (queue, bounds) in waiting {
                let mut from = bounds.head + 1;
                let mut last = None;
                while from <= bounds.tail {
                    let batch = store.read(&queue, from, 1024, 4 << 20)?;
                    let Some(&(end, _)) = batch.last() else { break };
                    last = batch.iter().rev().find(|(_, v)| item::sent_by(v, &handle, device)).map(|e| e.0).or(last);
                    from = end + 1;
                }
                found.extend(last.map(|seq| (queue, seq)));
            }
            Ok(found)
        });
        scan.await.map_err(|e| StoreError::Db(format!("scan for a sender's entries: {e}")))?
    }

    /// Stops the writer after it has finished the requests already sent, and
    /// flushes the memtables. Idempotent.
    pub fn close(&self) {
        let thread = self.inner.writer.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            // The writer stops at this marker, after the requests queued before it.
            let mut stop = WriteCmd::Stop;
            while let Err(mpsc::error::TrySendError::Full(back)) = self.inner.tx.try_send(stop) {
                stop = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = thread.join();
            // Everything written is synced: the next open may keep the origin id.
            let synced = self.inner.db.flush_wal(true).is_ok();
            if let (true, Ok(mesh)) = (synced, cf(&self.inner.db, CF_MESH)) {
                let mut opts = rocksdb::WriteOptions::default();
                opts.set_sync(true);
                let _ = self.inner.db.put_cf_opt(mesh, CLOSED_KEY, [], &opts);
            }
        }
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, StoreError> {
    db.cf_handle(name).ok_or_else(|| StoreError::Db(format!("column family {name} missing")))
}

/// This database's origin id for shipped entries: made on first open, and
/// made anew when the previous run may have lost written but unsynced WAL
/// records (it ended without [`Store::close`] and the machine has restarted
/// since). Entries are handed on before their WAL sync (see `writer`), so
/// after such a loss this store would reuse seqs another broker has already
/// stored from it, and that broker would skip them as resends; under a new
/// origin id they are new. A process crash alone loses no written record,
/// so it keeps the id (and spares other brokers redeliveries).
/// This start's gossip incarnation: one above the last start's, and at least
/// the wall clock in milliseconds (so a broker whose data dir was lost still
/// comes back above its old incarnation, as a rule). Peers compare it only
/// with this broker's earlier incarnations, and a clock that went back across
/// a restart no longer makes it go down.
fn next_incarnation(db: &DB) -> Result<u64, StoreError> {
    let mesh = cf(db, CF_MESH)?;
    let last =
        db.get_pinned_cf(mesh, INCARNATION_KEY)?.and_then(|v| Some(u64::from_be_bytes(v.as_ref().try_into().ok()?)));
    let next = last.map_or(0, |l| l.saturating_add(1)).max(now_ms());
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.put_cf_opt(mesh, INCARNATION_KEY, next.to_be_bytes(), &opts)?;
    Ok(next)
}

fn store_id(db: &DB) -> Result<[u8; 16], StoreError> {
    let mesh = cf(db, CF_MESH)?;
    let boot = boot_id();
    let kept = match db.get_pinned_cf(mesh, STORE_ID_KEY)? {
        None => None,
        Some(v) => {
            let id: [u8; 16] =
                v.as_ref().try_into().map_err(|_| StoreError::Corrupt("store id is not 16 bytes".into()))?;
            let closed = db.get_pinned_cf(mesh, CLOSED_KEY)?.is_some();
            let same_boot = boot.is_some() && db.get_pinned_cf(mesh, BOOT_KEY)?.as_deref() == boot.as_deref();
            if closed || same_boot {
                Some(id)
            } else {
                tracing::warn!(
                    "the store was not closed cleanly and the machine has restarted since: \
                     writes not yet synced may be lost, so entries are shipped under a new origin id \
                     (devices may see redeliveries, which they drop by message id)"
                );
                None
            }
        }
    };
    let id = kept.unwrap_or_else(rand::random);
    let mut batch = rocksdb::WriteBatch::default();
    batch.put_cf(mesh, STORE_ID_KEY, id);
    batch.put_cf(mesh, BOOT_KEY, boot.unwrap_or_default());
    batch.delete_cf(mesh, CLOSED_KEY);
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(batch, &opts)?;
    Ok(id)
}

/// This boot of the machine (Linux `boot_id`), if known.
fn boot_id() -> Option<Vec<u8>> {
    let id = std::fs::read("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim_ascii().to_vec();
    (!id.is_empty()).then_some(id)
}

fn open_db(config: &StoreConfig) -> Result<DB, StoreError> {
    std::fs::create_dir_all(&config.path)
        .map_err(|e| StoreError::Db(format!("cannot create {}: {e}", config.path.display())))?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.increase_parallelism(2);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(4);
    let (memtables, cache) = memory_budget(config.memory_mb);
    opts.set_write_buffer_manager(&rocksdb::WriteBufferManager::new_write_buffer_manager(memtables, false));
    let cache = rocksdb::Cache::new_lru_cache(cache);
    // Every family's table reader shares the one cache.
    let table = |bloom: bool| {
        let mut t = rocksdb::BlockBasedOptions::default();
        t.set_block_cache(&cache);
        if bloom {
            // Point lookups (every send checks its id; logins read
            // accounts): a bloom filter lets a miss skip SST files instead
            // of reading their blocks.
            t.set_bloom_filter(10.0, false);
        }
        t
    };

    let mut queues = Options::default();
    // Queue values are message bodies, opaque to the broker and meant to
    // be end-to-end ciphertext, which does not compress: compressing each
    // flushed block would cost CPU for nothing. (Blocks written compressed by older
    // versions stay readable: LZ4 is still compiled in.)
    queues.set_compression_type(rocksdb::DBCompressionType::None);
    queues.set_block_based_table_factory(&table(false));
    let mut accounts = Options::default();
    accounts.set_block_based_table_factory(&table(true));
    let mut dedup = Options::default();
    dedup.set_block_based_table_factory(&table(true));
    let retention_ms = config.retention.as_millis() as u64;
    dedup.set_compaction_filter("tern-dedup-retention", move |_level, _key, value| {
        match writer::dedup_accepted_at(value) {
            Some(at) if at.saturating_add(retention_ms) < now_ms() => rocksdb::CompactionDecision::Remove,
            _ => rocksdb::CompactionDecision::Keep,
        }
    });
    let plain = || {
        let mut o = Options::default();
        o.set_block_based_table_factory(&table(false));
        o
    };
    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_ACCOUNTS, accounts),
        ColumnFamilyDescriptor::new(CF_QUEUES, queues),
        ColumnFamilyDescriptor::new(CF_META, plain()),
        ColumnFamilyDescriptor::new(CF_DEDUP, dedup),
        ColumnFamilyDescriptor::new(CF_MESH, plain()),
        ColumnFamilyDescriptor::new(CF_KEYS, plain()),
    ];
    Ok(DB::open_cf_descriptors(&opts, &config.path, cfs)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(dir: &std::path::Path) -> DB {
        open_db(&config(dir)).unwrap()
    }

    fn config(dir: &std::path::Path) -> StoreConfig {
        StoreConfig {
            path: dir.to_owned(),
            durability: crate::config::Durability::Synced,
            retention: Duration::from_secs(3600),
            max_queue_len: 10,
            max_entry_len: max_entry_len(tern_protocol::DEFAULT_MAX_FRAME_LEN),
            max_batch: 8,
            max_devices: 2,
            account_cache_entries: 10,
            keys: Default::default(),
            memory_mb: 16,
        }
    }

    fn put(db: &DB, key: &[u8], value: &[u8]) {
        db.put_cf(cf(db, CF_MESH).unwrap(), key, value).unwrap();
    }

    /// Issue 11, 2.6: the incarnation came from the wall clock, so a clock
    /// set back across a restart made the restarted broker look older.
    #[test]
    fn the_incarnation_grows_at_every_start_even_when_the_clock_went_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = raw(dir.path());
        let first = next_incarnation(&db).unwrap();
        assert!(first >= now_ms() - 1000, "starts at the wall clock");
        // The last start ran with a clock a day ahead of today's.
        let ahead = now_ms() + 86_400_000;
        put(&db, INCARNATION_KEY, &ahead.to_be_bytes());
        assert_eq!(next_incarnation(&db).unwrap(), ahead + 1);
        assert_eq!(next_incarnation(&db).unwrap(), ahead + 2);
    }

    /// Only a stop without `close` on a machine that has restarted since may
    /// have lost unsynced writes, and only then is the origin id made anew.
    #[test]
    fn the_origin_id_changes_only_after_an_unclean_stop_across_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let db = raw(dir.path());
        let id = store_id(&db).unwrap();
        assert_eq!(store_id(&db).unwrap(), id, "not closed, same boot (a process crash): kept");
        put(&db, BOOT_KEY, b"an earlier boot");
        put(&db, CLOSED_KEY, b"");
        assert_eq!(store_id(&db).unwrap(), id, "closed cleanly before a reboot: kept");
        put(&db, BOOT_KEY, b"an earlier boot");
        let new = store_id(&db).unwrap();
        assert_ne!(new, id, "not closed before a reboot: a new id");
        assert_eq!(store_id(&db).unwrap(), new, "the new id is kept from then on");
    }

    /// `Store::close` leaves the marker that keeps the id across a reboot.
    #[test]
    fn a_closed_store_keeps_its_origin_id_across_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(config(dir.path()), Arc::new(crate::router::Router::default())).unwrap();
        let id = store.id();
        store.close();
        drop(store);
        let db = raw(dir.path());
        put(&db, BOOT_KEY, b"an earlier boot");
        drop(db);
        let store = Store::open(config(dir.path()), Arc::new(crate::router::Router::default())).unwrap();
        assert_eq!(store.id(), id);
        store.close();
    }
}
