//! The single writer: group commit for every store mutation.
//!
//! The actor blocks for one request, drains whatever else is already waiting
//! (up to `max_batch`), applies them all to one `WriteBatch` against an overlay
//! of the queue bounds it owns, and writes the batch to the WAL. Then it
//! publishes the new bounds and tells the listener of the new entries (which
//! pushes them to sessions and the ship actor), and hands the batch's answers
//! to the sync thread. That thread takes every batch written so far, syncs
//! the WAL once for all of them, and only then answers their callers. So no
//! caller hears "stored" before the sync; deliveries do not wait for it; and
//! the writer builds and writes the next batch while the disk syncs the last
//! (a two-stage group commit: one sync covers every batch written before it
//! started).
//!
//! At chat rates most batches find nothing else waiting to be written and
//! nothing on the sync thread: then the writer syncs the batch itself and
//! answers it. The hop through the sync thread and back costs two thread
//! wake-ups per batch, and pays only while there is a next batch to write
//! during the sync (docs/bench/tuning.md). Batches that need no sync are
//! answered by the writer at once.
//!
//! Not every batch needs a sync ([`SyncNeed`]). Sends and accounts are synced
//! at once. Entries stored for another broker wait up to [`SYNC_SOON`] for a
//! sync some other batch needs (only that broker's deletion of its copy waits
//! on the answer). Acks and the deletion of shipped entries are never synced
//! on their own: a machine crash that loses them only repeats work.
//!
//! Handing entries on before the sync is safe against a crash of the broker
//! process: a written WAL record is in the page cache and is recovered. Only a
//! crash of the machine can take back an entry a device or another broker has
//! already seen; its sender was not answered and sends it again, and devices
//! drop what they have seen by message id. Another broker that stored it
//! keeps it under this store's origin id, which changes after such a crash
//! (see `Store::open`), so reused seqs are not mistaken for resends.
//!
//! A request that fails part-way is taken back, its writes and its overlay
//! changes, before the next one is applied ([`batch`]), so a batch holds only
//! whole requests. A failed write answers every request of the batch with the
//! error and leaves the in-memory state as it was: nothing partial becomes
//! visible. A
//! failed sync answers its batches with the error, and every later request
//! that needs a sync fails with it: the WAL is no longer known to be durable.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::clock::Hlc;
use crate::config::Durability;

use bytes::Bytes;
use rocksdb::{IteratorMode, ReadOptions, DB};
use tern_protocol::{pb, ErrorCode};
use tokio::sync::{mpsc, oneshot};

use super::keys::{
    account_log_key, decode_handed, encode_handed, handed_key, shipped_key, ACCOUNT_LOG_PREFIX, CF_ACCOUNTS, CF_DEDUP,
    CF_KEYS, CF_MESH, CF_META, CF_QUEUES,
};
use super::{
    cf, envelopes, now_ms, Account, Device, Enqueued, Expired, QueueBounds, QueueKey, QueueListener, SendBody,
    ShipHeader, ShipOutcome, StoreConfig, StoreError, StoredItem,
};
use tern_protocol::shipping::{admit, Admit};

mod batch;
mod fence;
mod prekeys;

pub(crate) use prekeys::{KeyDone, KeyOp};

use batch::Batch;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Stored entries as `(seq, value)`.
type Entries = Vec<(u64, Box<[u8]>)>;

/// A request to the writer.
pub(super) enum WriteCmd {
    Register {
        handle: String,
        public_key: [u8; 32],
        reply: Reply<Account>,
    },
    AddDevice {
        handle: String,
        public_key: [u8; 32],
        reply: Reply<u32>,
    },
    /// Unlinks `device` of `handle` at the request of device `by` (itself,
    /// or the primary): its queue and keys are dropped with it.
    Unlink {
        handle: String,
        device: u32,
        by: u32,
        reply: Reply<Account>,
    },
    /// Sets a device's push subscription.
    SetPush {
        handle: String,
        device: u32,
        subscription: super::PushSubscription,
        reply: Reply<Account>,
    },
    /// Changes who may see `handle`'s presence.
    SetPresence {
        handle: String,
        update: pb::SetPresence,
        reply: Reply<Account>,
    },
    /// Changes `handle`'s profile (fields unset in `update` kept).
    SetProfile {
        handle: String,
        update: pb::SetProfile,
        reply: Reply<Account>,
    },
    Enqueue {
        sender: QueueKey,
        message_id: [u8; 16],
        to: String,
        body: SendBody,
        /// A delivered receipt is queued for the sender when a device
        /// acknowledges it (`Send.no_receipt` unset).
        receipt: bool,
        reply: Reply<Enqueued>,
    },
    Ack {
        queue: QueueKey,
        up_to: u64,
        reply: Reply<QueueBounds>,
    },
    Bounds {
        queue: QueueKey,
        reply: Reply<QueueBounds>,
    },
    Expire {
        cutoff_ms: u64,
        reply: Reply<Expired>,
    },
    ApplyShip {
        origin: [u8; 16],
        queue: QueueKey,
        header: ShipHeader,
        entries: Vec<(u64, Bytes)>,
        reply: Reply<ShipOutcome>,
    },
    Settle {
        origin: [u8; 16],
        queue: QueueKey,
        up_to: u64,
        reply: Reply<u64>,
    },
    Shipped {
        queue: QueueKey,
        up_to: u64,
        node: String,
        reply: Reply<QueueBounds>,
    },
    ForgetHanded {
        queue: QueueKey,
        node: String,
        reply: Reply<u64>,
    },
    PutAccount {
        account: Account,
        reply: Reply<Account>,
    },
    Waiting {
        reply: Reply<Vec<(QueueKey, QueueBounds)>>,
    },
    /// Holds back sends into `queue` until the matching `Unfence`; answers
    /// the queue's tail (see [`fence`]).
    Fence {
        queue: QueueKey,
        reply: Reply<u64>,
    },
    Unfence {
        queue: QueueKey,
        reply: Reply<u64>,
    },
    /// Puts each sender's entries of `queue` in stamp order (appended anew
    /// if any moves); answers the queue's bounds after.
    Reorder {
        queue: QueueKey,
        reply: Reply<QueueBounds>,
    },
    /// The key service: publish, claim, copy or drop device keys.
    Keys {
        op: KeyOp,
        reply: Reply<KeyDone>,
    },
    Stop,
}

/// An answer held back until the batch is durable.
enum Pending {
    Account(Reply<Account>, Box<Result<Account, StoreError>>),
    Device(Reply<u32>, Result<u32, StoreError>),
    Enqueued(Reply<Enqueued>, Result<Enqueued, StoreError>),
    Bounds(Reply<QueueBounds>, Result<QueueBounds, StoreError>),
    Expired(Reply<Expired>, Result<Expired, StoreError>),
    Seq(Reply<u64>, Result<u64, StoreError>),
    Ship(Reply<ShipOutcome>, Result<ShipOutcome, StoreError>),
    Waiting(Reply<Vec<(QueueKey, QueueBounds)>>, Result<Vec<(QueueKey, QueueBounds)>, StoreError>),
    Keys(Reply<KeyDone>, Box<Result<KeyDone, StoreError>>),
}

impl Pending {
    fn send(self, failure: Option<&StoreError>) {
        macro_rules! answer {
            ($reply:expr, $result:expr) => {{
                let result = match (failure, $result) {
                    (Some(e), Ok(_)) => Err(e.clone()),
                    (_, r) => r,
                };
                let _ = $reply.send(result);
            }};
        }
        match self {
            Self::Account(r, v) => answer!(r, *v),
            Self::Device(r, v) => answer!(r, v),
            Self::Enqueued(r, v) => answer!(r, v),
            Self::Bounds(r, v) => answer!(r, v),
            Self::Expired(r, v) => answer!(r, v),
            Self::Seq(r, v) => answer!(r, v),
            Self::Ship(r, v) => answer!(r, v),
            Self::Waiting(r, v) => answer!(r, v),
            Self::Keys(r, v) => answer!(r, *v),
        }
    }
}

/// What a request's answer claims, and so when its batch must be synced
/// (under `Durability::Synced`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
enum SyncNeed {
    /// Nothing durable. Reads; deletes whose loss in a machine crash only
    /// repeats work: shipped entries are shipped again (the receiver skips
    /// them), acknowledged entries are delivered again (devices drop them by
    /// id) and their receipts, deleted in the same batch, queued again.
    #[default]
    None,
    /// Durable, but nobody is waiting on it: entries stored for another
    /// broker, whose `ShipAck` only lets that broker delete its copy. Synced
    /// with the next batch that needs it now, or after [`SYNC_SOON`].
    Soon,
    /// Durable before the answer, as soon as possible: a send's ack, an
    /// account.
    Now,
}

/// The longest a [`SyncNeed::Soon`] batch waits for a sync.
const SYNC_SOON: std::time::Duration = std::time::Duration::from_millis(10);

impl WriteCmd {
    fn sync_need(&self) -> SyncNeed {
        match self {
            Self::Register { .. }
            | Self::AddDevice { .. }
            | Self::Unlink { .. }
            | Self::SetProfile { .. }
            | Self::SetPresence { .. }
            | Self::SetPush { .. }
            | Self::Enqueue { .. }
            | Self::PutAccount { .. }
            | Self::Keys { .. }
            | Self::Reorder { .. } => SyncNeed::Now,
            Self::ApplyShip { .. } => SyncNeed::Soon,
            Self::Ack { .. }
            | Self::Bounds { .. }
            | Self::Expire { .. }
            | Self::Shipped { .. }
            | Self::Settle { .. }
            | Self::ForgetHanded { .. }
            | Self::Waiting { .. }
            | Self::Fence { .. }
            | Self::Unfence { .. }
            | Self::Stop => SyncNeed::None,
        }
    }
}

/// A written batch's answers, waiting for the WAL sync that covers it.
struct Written {
    replies: Vec<Pending>,
    sync: SyncNeed,
    /// It wrote to the WAL.
    wrote: bool,
    /// Its write failed.
    failure: Option<StoreError>,
}

impl Written {
    fn answer(self, sync_failure: Option<&StoreError>) {
        let failure = self.failure.as_ref().or(if self.sync > SyncNeed::None { sync_failure } else { None });
        for reply in self.replies {
            reply.send(failure);
        }
    }
}

/// The second stage of group commit: syncs the WAL for every batch written
/// before the sync started, then answers them in the order written. A batch
/// that needs no sync (or whose write failed) is answered at once.
///
/// The writer hands it only batches that wait for a sync while it goes on
/// writing: with nothing else to write, and nothing here, the writer syncs
/// a batch itself (see [`WriterActor::commit`]).
struct Syncer {
    db: Arc<DB>,
    rx: std::sync::mpsc::Receiver<Written>,
    /// Set when a sync failed: nothing later is acknowledged as durable.
    /// Shared with the store, which reports it (`Store::failure`).
    failed: Arc<OnceLock<StoreError>>,
    /// Batches handed here and not answered yet.
    in_flight: Arc<AtomicUsize>,
}

/// The sync thread, as the writer sees it.
struct SyncStage {
    tx: std::sync::mpsc::Sender<Written>,
    thread: std::thread::JoinHandle<()>,
    /// Batches handed to it and not answered yet.
    in_flight: Arc<AtomicUsize>,
    failed: Arc<OnceLock<StoreError>>,
}

/// Syncs the WAL, unless a sync failed before; records the failure.
fn sync_wal(db: &DB, failed: &OnceLock<StoreError>) {
    if failed.get().is_some() {
        return;
    }
    let started = Instant::now();
    let result = db.flush_wal(true);
    metrics::histogram!("tern_store_sync_seconds").record(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        let e = StoreError::from(e);
        tracing::error!(error = %e, "WAL sync failed; the broker acknowledges nothing more until it restarts");
        metrics::counter!("tern_store_write_errors_total").increment(1);
        let _ = failed.set(e);
    }
}

impl Syncer {
    fn run(mut self) {
        use std::sync::mpsc::RecvTimeoutError;
        let mut pending: Vec<Written> = Vec::new();
        // When the pending batches must be synced.
        let mut due: Option<Instant> = None;
        loop {
            let first = match due {
                None => match self.rx.recv() {
                    Ok(w) => Some(w),
                    Err(_) => return,
                },
                Some(at) => match self.rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(w) => Some(w),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.flush(&mut pending);
                        return;
                    }
                },
            };
            for written in first.into_iter().chain(self.rx.try_iter()) {
                match written.sync {
                    _ if written.failure.is_some() => self.answer(written),
                    SyncNeed::None => self.answer(written),
                    SyncNeed::Soon => {
                        due.get_or_insert_with(|| Instant::now() + SYNC_SOON);
                        pending.push(written);
                    }
                    SyncNeed::Now => {
                        due = Some(Instant::now());
                        pending.push(written);
                    }
                }
            }
            if due.is_some_and(|at| at <= Instant::now()) {
                self.flush(&mut pending);
                due = None;
            }
        }
    }

    /// Syncs the WAL (every pending batch was written before this starts)
    /// and answers the pending batches.
    fn flush(&mut self, pending: &mut Vec<Written>) {
        if pending.iter().any(|w| w.wrote) {
            sync_wal(&self.db, &self.failed);
        }
        for written in pending.drain(..) {
            self.answer(written);
        }
    }

    fn answer(&self, written: Written) {
        written.answer(self.failed.get());
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the writer shares with the store's handles.
pub(super) struct Shared {
    pub(super) accounts: moka::sync::Cache<String, Arc<Account>>,
    /// Set while free disk space is below the configured minimum.
    pub(super) disk_low: Arc<AtomicBool>,
    /// Set by the sync thread when a WAL sync failed.
    pub(super) sync_failed: Arc<OnceLock<StoreError>>,
    pub(super) clock: Arc<Hlc>,
}

pub(super) struct WriterActor {
    db: Arc<DB>,
    /// Where written batches wait for their sync (`None` under
    /// `Durability::Written`: answered at once).
    syncer: Option<SyncStage>,
    rx: mpsc::Receiver<WriteCmd>,
    accounts: moka::sync::Cache<String, Arc<Account>>,
    listener: Arc<dyn QueueListener>,
    disk_low: Arc<AtomicBool>,
    config: StoreConfig,
    /// Stamps each entry stored here with its sender's order (see `item`).
    clock: Arc<Hlc>,
    bounds: HashMap<QueueKey, QueueBounds>,
    /// The queues of `bounds` holding entries: what `Waiting` and `Expire`
    /// look at, rather than every queue ever made.
    nonempty: HashSet<QueueKey>,
    total_depth: u64,
    /// Queues whose sends are held back, and the sends held.
    fences: fence::Fences,
    /// Number of the last account change logged (see [`ACCOUNT_LOG_MAX`]).
    account_log: std::cell::Cell<u64>,
    /// Tests: fail the entry write this many entry writes from now.
    #[cfg(test)]
    fail_push_in: std::cell::Cell<Option<usize>>,
}

/// Account changes the change log keeps: each new one past this drops the
/// oldest. A peer away for longer than this many changes gets only the
/// newest when its link comes back.
const ACCOUNT_LOG_MAX: u64 = 100_000;

/// The number of the last account change logged in `db` (0: none).
fn last_account_change(db: &DB) -> Result<u64, StoreError> {
    let end = account_log_key(u64::MAX);
    let mut iter = db.iterator_cf(cf(db, CF_MESH)?, IteratorMode::From(&end, rocksdb::Direction::Reverse));
    match iter.next().transpose()? {
        Some((key, _)) if key.starts_with(ACCOUNT_LOG_PREFIX) && key.len() == ACCOUNT_LOG_PREFIX.len() + 8 => {
            Ok(decode_u64(&key[ACCOUNT_LOG_PREFIX.len()..]))
        }
        _ => Ok(0),
    }
}

/// Most entries one `Expire` request deletes.
const EXPIRE_MAX: u64 = 10_000;

/// Runs of at least this many entries are deleted with one range delete.
const RANGE_DELETE_MIN: u64 = 64;

/// The accepted-at time in a dedup value.
pub(super) fn dedup_accepted_at(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

fn dedup_value(accepted_at_ms: u64, recipients: u32) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&accepted_at_ms.to_be_bytes());
    v[8..].copy_from_slice(&recipients.to_be_bytes());
    v
}

impl WriterActor {
    pub(super) fn new(
        db: Arc<DB>,
        rx: mpsc::Receiver<WriteCmd>,
        listener: Arc<dyn QueueListener>,
        config: StoreConfig,
        shared: Shared,
    ) -> Result<Self, StoreError> {
        let Shared { accounts, disk_low, sync_failed, clock } = shared;
        let syncer = if config.durability == Durability::Synced {
            let (tx, rx) = std::sync::mpsc::channel();
            let in_flight = Arc::new(AtomicUsize::new(0));
            let syncer = Syncer { db: db.clone(), rx, failed: sync_failed.clone(), in_flight: in_flight.clone() };
            let thread = std::thread::Builder::new()
                .name("tern-store-sync".into())
                .spawn(move || syncer.run())
                .map_err(|e| StoreError::Db(format!("cannot start the WAL sync thread: {e}")))?;
            Some(SyncStage { tx, thread, in_flight, failed: sync_failed })
        } else {
            None
        };
        let fences = fence::Fences::load(&db)?;
        let mut actor = Self {
            db,
            syncer,
            rx,
            accounts,
            listener,
            disk_low,
            config,
            clock,
            bounds: HashMap::new(),
            nonempty: HashSet::new(),
            total_depth: 0,
            fences,
            account_log: std::cell::Cell::new(0),
            #[cfg(test)]
            fail_push_in: std::cell::Cell::new(None),
        };
        actor.load_bounds()?;
        actor.account_log.set(last_account_change(&actor.db)?);
        Ok(actor)
    }

    /// Reads every queue's head from `meta` and its tail from the last entry.
    fn load_bounds(&mut self) -> Result<(), StoreError> {
        let meta = cf(&self.db, CF_META)?;
        let mut loaded = Vec::new();
        for entry in self.db.iterator_cf(meta, IteratorMode::Start) {
            let (key, value) = entry?;
            if let Some(queue) = QueueKey::from_bytes(&key) {
                loaded.push((queue, decode_u64(&value)));
            }
        }
        for (queue, head) in loaded {
            let tail = self.last_seq(&queue)?.unwrap_or(head).max(head);
            self.total_depth += tail - head;
            if tail > head {
                self.nonempty.insert(queue.clone());
            }
            self.bounds.insert(queue, QueueBounds { head, tail });
        }
        metrics::gauge!("tern_queue_depth").set(self.total_depth as f64);
        tracing::info!(queues = self.bounds.len(), entries = self.total_depth, "store loaded");
        Ok(())
    }

    fn last_seq(&self, queue: &QueueKey) -> Result<Option<u64>, StoreError> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(queue.entry(0));
        let mut iter = self.db.raw_iterator_cf_opt(cf(&self.db, CF_QUEUES)?, opts);
        iter.seek_for_prev(queue.entry(u64::MAX));
        iter.status()?;
        Ok(iter.key().and_then(|k| queue.seq_of(k)))
    }

    pub(super) fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut batch = Batch::default();
            let mut stop = self.apply(first, &mut batch);
            while !stop && batch.requests < self.config.max_batch {
                match self.rx.try_recv() {
                    Ok(cmd) => stop = self.apply(cmd, &mut batch),
                    Err(_) => break,
                }
            }
            self.commit(batch);
            if stop {
                break;
            }
        }
        // The sync thread answers what it holds, then ends.
        if let Some(SyncStage { tx, thread, .. }) = self.syncer.take() {
            drop(tx);
            let _ = thread.join();
        }
        tracing::debug!("store writer stopped");
    }

    /// Writes the batch (WAL, no sync), publishes its bounds, accounts and
    /// entries, and answers it: at once if it needs no sync, else after a
    /// sync made here or by the sync thread.
    fn commit(&mut self, batch: Batch) {
        let started = Instant::now();
        let wrote = !batch.is_empty();
        let failure = if wrote {
            match batch.write_batch(&self.db) {
                Ok(write) => self.db.write(write).err().map(StoreError::from),
                Err(e) => Some(e),
            }
        } else {
            None
        };
        let Batch { bounds, accounts, replies, queued, requests, sync, .. } = batch;
        metrics::histogram!("tern_store_batch_requests").record(requests as f64);
        metrics::histogram!("tern_store_write_seconds").record(started.elapsed().as_secs_f64());
        if let Some(e) = &failure {
            tracing::error!(error = %e, requests, "store write failed");
            metrics::counter!("tern_store_write_errors_total").increment(1);
        } else {
            for (queue, b) in bounds {
                if b.depth() > 0 {
                    self.nonempty.insert(queue.clone());
                } else {
                    self.nonempty.remove(&queue);
                }
                let old = self.bounds.insert(queue, b).unwrap_or_default();
                self.total_depth = (self.total_depth + b.depth()).saturating_sub(old.depth());
            }
            metrics::gauge!("tern_queue_depth").set(self.total_depth as f64);
            for (handle, account) in accounts {
                self.accounts.insert(handle, account);
            }
            for (queue, seq, value) in &queued {
                self.listener.queued(queue, *seq, value);
            }
        }
        let written = Written { replies, sync, wrote, failure };
        let Some(stage) = &self.syncer else { return written.answer(None) };
        if written.sync == SyncNeed::None || written.failure.is_some() {
            // Nothing to wait for: answered here, a thread hop sooner.
            written.answer(None);
        } else if written.sync == SyncNeed::Now && stage.in_flight.load(Ordering::Acquire) == 0 && self.rx.is_empty() {
            // Nothing else to write meanwhile, and nothing written before
            // waits for a sync: synced here. At chat rates that is most
            // batches, and each saves waking the sync thread and its wake
            // of the session; under load the sync thread syncs while this
            // one writes the next batch.
            metrics::counter!("tern_store_syncs_inline_total").increment(1);
            if written.wrote {
                sync_wal(&self.db, &stage.failed);
            }
            written.answer(stage.failed.get());
        } else {
            stage.in_flight.fetch_add(1, Ordering::AcqRel);
            if let Err(std::sync::mpsc::SendError(lost)) = stage.tx.send(written) {
                stage.in_flight.fetch_sub(1, Ordering::AcqRel);
                lost.answer(Some(&StoreError::Closed));
            }
        }
    }

    /// Applies one request to the batch. Returns true on `Stop`.
    fn apply(&mut self, cmd: WriteCmd, batch: &mut Batch) -> bool {
        let Some(cmd) = self.hold_if_fenced(batch, cmd) else { return false };
        batch.requests += 1;
        batch.sync = batch.sync.max(cmd.sync_need());
        // A request that fails part-way takes back what it staged.
        let mark = batch.mark();
        match cmd {
            WriteCmd::Register { handle, public_key, reply } => {
                let result = self.register(batch, &handle, public_key);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Account(reply, Box::new(result)));
            }
            WriteCmd::AddDevice { handle, public_key, reply } => {
                let result = self.add_device(batch, &handle, public_key);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Device(reply, result));
            }
            WriteCmd::SetPush { handle, device, subscription, reply } => {
                let result = self.set_push(batch, &handle, device, subscription);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Account(reply, Box::new(result)));
            }
            WriteCmd::SetPresence { handle, update, reply } => {
                let result = self.set_presence(batch, &handle, update);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Account(reply, Box::new(result)));
            }
            WriteCmd::SetProfile { handle, update, reply } => {
                let result = self.set_profile(batch, &handle, update);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Account(reply, Box::new(result)));
            }
            WriteCmd::Unlink { handle, device, by, reply } => {
                let result = self.unlink(batch, &handle, device, by);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Account(reply, Box::new(result)));
            }
            WriteCmd::Enqueue { sender, message_id, to, body, receipt, reply } => {
                let result = self.enqueue(batch, &sender, message_id, &to, body, receipt);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Enqueued(reply, result));
            }
            WriteCmd::Ack { queue, up_to, reply } => {
                let result = self.ack(batch, &queue, up_to);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Bounds(reply, result));
            }
            WriteCmd::Bounds { queue, reply } => {
                let result = self.bounds_of(batch, &queue);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Bounds(reply, result));
            }
            WriteCmd::Expire { cutoff_ms, reply } => {
                let result = self.expire(batch, cutoff_ms);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Expired(reply, result));
            }
            WriteCmd::ApplyShip { origin, queue, header, entries, reply } => {
                let result = self.apply_ship(batch, &origin, &queue, header, entries);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Ship(reply, result));
            }
            WriteCmd::Settle { origin, queue, up_to, reply } => {
                let result = self.settle(batch, &origin, &queue, up_to);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Seq(reply, result));
            }
            WriteCmd::ForgetHanded { queue, node, reply } => {
                let result = self.forget_handed(batch, &queue, &node);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Seq(reply, result));
            }
            WriteCmd::Shipped { queue, up_to, node, reply } => {
                let result = self.shipped(batch, &queue, up_to, &node);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Bounds(reply, result));
            }
            WriteCmd::PutAccount { account, reply } => {
                let result = self.merge_account(batch, account);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Account(reply, Box::new(result)));
            }
            WriteCmd::Fence { queue, reply } => {
                let result = self.fence(batch, queue);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Seq(reply, result));
            }
            WriteCmd::Unfence { queue, reply } => {
                self.unfence(batch, &queue);
                batch.replies.push(Pending::Seq(reply, Ok(0)));
            }
            WriteCmd::Reorder { queue, reply } => {
                let result = self.reorder(batch, &queue);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Bounds(reply, result));
            }
            WriteCmd::Waiting { reply } => {
                // This batch's bounds stand over the committed ones.
                let committed = self
                    .nonempty
                    .iter()
                    .filter(|q| !batch.bounds.contains_key(*q))
                    .filter_map(|q| self.bounds.get_key_value(q));
                let list = committed
                    .chain(&batch.bounds)
                    .filter(|(_, b)| b.depth() > 0)
                    .map(|(q, b)| (q.clone(), *b))
                    .collect();
                batch.replies.push(Pending::Waiting(reply, Ok(list)));
            }
            WriteCmd::Keys { op, reply } => {
                let result = self.apply_keys(batch, op);
                batch.finish(mark, &result);
                batch.replies.push(Pending::Keys(reply, Box::new(result)));
            }
            WriteCmd::Stop => return true,
        }
        false
    }

    /// A fault injected by tests: fails the `n`th entry write from now.
    #[cfg(test)]
    fn fault_point(&self) -> Result<(), StoreError> {
        match self.fail_push_in.get() {
            Some(0) => {
                self.fail_push_in.set(None);
                Err(StoreError::Db("injected fault".into()))
            }
            Some(n) => {
                self.fail_push_in.set(Some(n - 1));
                Ok(())
            }
            None => Ok(()),
        }
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn fault_point(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The account as this batch sees it.
    fn account(&self, batch: &Batch, handle: &str) -> Result<Option<Arc<Account>>, StoreError> {
        if let Some(a) = batch.accounts.get(handle) {
            return Ok(Some(a.clone()));
        }
        if let Some(a) = self.accounts.get(handle) {
            return Ok(Some(a));
        }
        match self.db.get_pinned_cf(cf(&self.db, CF_ACCOUNTS)?, handle.as_bytes())? {
            Some(bytes) => {
                let account = Arc::new(Account::from_json(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?);
                self.accounts.insert(handle.to_owned(), account.clone());
                Ok(Some(account))
            }
            None => Ok(None),
        }
    }

    /// Writes `account`'s record and logs the change (for peers to hear of
    /// it when their link comes up).
    fn put_account(&self, batch: &mut Batch, account: Account) -> Result<(), StoreError> {
        batch.put(CF_ACCOUNTS, account.handle.as_bytes(), account.to_json());
        let n = self.account_log.get() + 1;
        self.account_log.set(n);
        batch.put(CF_MESH, account_log_key(n), account.handle.as_bytes());
        if n > ACCOUNT_LOG_MAX {
            batch.delete(CF_MESH, account_log_key(n - ACCOUNT_LOG_MAX));
        }
        batch.set_account(account.handle.clone(), Arc::new(account));
        Ok(())
    }

    /// A new device's queue: its `meta` record makes it known at restart.
    fn create_queue(&self, batch: &mut Batch, queue: QueueKey) -> Result<(), StoreError> {
        let head = self.bounds_of(batch, &queue)?.head;
        batch.put(CF_META, queue.as_bytes(), head.to_be_bytes());
        if !batch.bounds.contains_key(&queue) {
            batch.set_bounds(queue, QueueBounds { head, tail: head });
        }
        Ok(())
    }

    fn register(&mut self, batch: &mut Batch, handle: &str, public_key: [u8; 32]) -> Result<Account, StoreError> {
        if self.account(batch, handle)?.is_some() {
            return Err(StoreError::HandleTaken(handle.to_owned()));
        }
        let account = Account::new(handle, public_key, now_ms());
        self.put_account(batch, account.clone())?;
        self.create_queue(batch, QueueKey::new(handle, 1))?;
        Ok(account)
    }

    fn add_device(&mut self, batch: &mut Batch, handle: &str, public_key: [u8; 32]) -> Result<u32, StoreError> {
        let current = self.account(batch, handle)?.ok_or_else(|| StoreError::UnknownUser(handle.to_owned()))?;
        let mut account = Account::clone(&current);
        if account.devices.len() as u32 >= self.config.max_devices {
            return Err(StoreError::TooManyDevices(handle.to_owned(), self.config.max_devices));
        }
        let id = account.next_device_id;
        account.next_device_id += 1;
        account.devices.push(Device::new(id, public_key, now_ms()));
        self.put_account(batch, account)?;
        self.create_queue(batch, QueueKey::new(handle, id))?;
        Ok(id)
    }

    fn unlink(&mut self, batch: &mut Batch, handle: &str, device: u32, by: u32) -> Result<Account, StoreError> {
        let current = self.account(batch, handle)?.ok_or_else(|| StoreError::UnknownUser(handle.to_owned()))?;
        if current.device(device).is_none() {
            return Err(StoreError::UnknownDevice(format!("{handle:?} has no device {device}")));
        }
        if by != device && Some(by) != current.primary() {
            let primary = current.primary().unwrap_or(0);
            return Err(StoreError::Denied(format!(
                "only the primary device ({primary}) may unlink another device; a device may unlink itself"
            )));
        }
        let mut account = Account::clone(&current);
        account.unlink(device);
        self.drop_device(batch, &QueueKey::new(handle, device))?;
        self.put_account(batch, account.clone())?;
        Ok(account)
    }

    fn set_profile(&mut self, batch: &mut Batch, handle: &str, update: pb::SetProfile) -> Result<Account, StoreError> {
        let current = self.account(batch, handle)?.ok_or_else(|| StoreError::UnknownUser(handle.to_owned()))?;
        let mut account = Account::clone(&current);
        let mut profile = account.profile.take().unwrap_or_default();
        profile.name = update.name.unwrap_or(profile.name);
        profile.status = update.status.unwrap_or(profile.status);
        profile.picture = update.picture.unwrap_or(profile.picture);
        profile.updated_at_ms = now_ms().max(profile.updated_at_ms + 1);
        account.profile = Some(profile);
        self.put_account(batch, account.clone())?;
        Ok(account)
    }

    fn set_push(
        &mut self,
        batch: &mut Batch,
        handle: &str,
        device: u32,
        mut subscription: super::PushSubscription,
    ) -> Result<Account, StoreError> {
        let current = self.account(batch, handle)?.ok_or_else(|| StoreError::UnknownUser(handle.to_owned()))?;
        let mut account = Account::clone(&current);
        let d = account
            .devices
            .iter_mut()
            .find(|d| d.id == device)
            .ok_or_else(|| StoreError::UnknownDevice(format!("{handle:?} has no device {device}")))?;
        let before = d.push.as_ref().map_or(0, |p| p.at_ms);
        subscription.at_ms = subscription.at_ms.max(before + 1);
        d.push = Some(subscription);
        self.put_account(batch, account.clone())?;
        Ok(account)
    }

    fn set_presence(
        &mut self,
        batch: &mut Batch,
        handle: &str,
        update: pb::SetPresence,
    ) -> Result<Account, StoreError> {
        let current = self.account(batch, handle)?.ok_or_else(|| StoreError::UnknownUser(handle.to_owned()))?;
        if update.visibility.is_none() && update.allow.is_empty() && update.disallow.is_empty() {
            // Nothing to change: a read of the settings.
            return Ok(Account::clone(&current));
        }
        let mut account = Account::clone(&current);
        let mut settings = account.presence.take().unwrap_or_default();
        if let Some(v) = update.visibility {
            settings.nobody = v == pb::PresenceVisibility::Nobody as i32;
        }
        settings.allowed.extend(update.allow.into_iter().filter(|h| h != handle));
        settings.allowed.sort_unstable();
        settings.allowed.dedup();
        settings.allowed.retain(|h| !update.disallow.contains(h));
        if settings.allowed.len() > super::MAX_ALLOWED {
            let n = settings.allowed.len();
            return Err(StoreError::Invalid(format!("{n} allowed users, more than {}", super::MAX_ALLOWED)));
        }
        settings.updated_at_ms = now_ms().max(settings.updated_at_ms + 1);
        account.presence = Some(settings);
        self.put_account(batch, account.clone())?;
        Ok(account)
    }

    /// Drops what an unlinked device had: its queue's entries and its keys.
    fn drop_device(&mut self, batch: &mut Batch, queue: &QueueKey) -> Result<(), StoreError> {
        let tail = self.bounds_of(batch, queue)?.tail;
        self.delete_up_to(batch, queue, tail, false)?;
        batch.delete(CF_KEYS, queue.as_bytes().to_vec());
        batch.set_keys(queue.clone(), None);
        Ok(())
    }

    fn bounds_of(&self, batch: &Batch, queue: &QueueKey) -> Result<QueueBounds, StoreError> {
        if let Some(b) = batch.bounds.get(queue).or_else(|| self.bounds.get(queue)) {
            return Ok(*b);
        }
        // A queue with entries but no meta record (written by an older
        // version, or a receipt to a device without one) is found by its keys.
        let tail = self.last_seq(queue)?.unwrap_or(0);
        let head = if tail == 0 { 0 } else { self.first_seq(queue)?.map_or(tail, |s| s - 1) };
        Ok(QueueBounds { head, tail })
    }

    fn first_seq(&self, queue: &QueueKey) -> Result<Option<u64>, StoreError> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(queue.entry(u64::MAX));
        let mut iter = self.db.raw_iterator_cf_opt(cf(&self.db, CF_QUEUES)?, opts);
        iter.seek(queue.entry(0));
        iter.status()?;
        Ok(iter.key().and_then(|k| queue.seq_of(k)))
    }

    /// Appends `value` to `queue` in this batch; returns its seq.
    fn push(&self, batch: &mut Batch, queue: &QueueKey, value: Bytes) -> Result<u64, StoreError> {
        if !batch.bounds.contains_key(queue) && !self.bounds.contains_key(queue) {
            // Its meta record makes the queue known at restart (to be
            // delivered or shipped on).
            self.create_queue(batch, queue.clone())?;
        }
        let mut b = self.bounds_of(batch, queue)?;
        b.tail += 1;
        self.fault_point()?;
        batch.put_bytes(CF_QUEUES, queue.entry(b.tail), value.clone());
        batch.set_bounds(queue.clone(), b);
        batch.queued.push((queue.clone(), b.tail, value));
        Ok(b.tail)
    }

    fn enqueue(
        &mut self,
        batch: &mut Batch,
        sender: &QueueKey,
        message_id: [u8; 16],
        to: &str,
        body: SendBody,
        receipt: bool,
    ) -> Result<Enqueued, StoreError> {
        let dedup_key = sender.dedup(&message_id);
        let now = now_ms();
        if let Some(&(accepted_at_ms, recipients)) = batch.dedup.get(&dedup_key) {
            return Ok(Enqueued { duplicate: true, accepted_at_ms, recipients });
        }
        if let Some(v) = self.db.get_pinned_cf(cf(&self.db, CF_DEDUP)?, &dedup_key)? {
            let accepted_at_ms = dedup_accepted_at(&v).unwrap_or(0);
            if accepted_at_ms.saturating_add(self.config.retention.as_millis() as u64) >= now {
                let recipients = v.get(8..12).and_then(|r| r.try_into().ok()).map_or(0, u32::from_be_bytes);
                return Ok(Enqueued { duplicate: true, accepted_at_ms, recipients });
            }
        }
        if self.disk_low.load(Ordering::Relaxed) {
            return Err(StoreError::Full("free disk space is below the configured minimum".into()));
        }
        let mut targets = self.targets(batch, sender, to)?;
        let mut per_device = match &body {
            SendBody::Same(_) => None,
            SendBody::ToDevice { device, .. } => {
                let queue = QueueKey::new(to, *device);
                if !targets.contains(&queue) || to == sender.handle() && *device == sender.device() {
                    return Err(StoreError::UnknownDevice(format!("{to:?} has no device {device} to send to")));
                }
                targets = vec![queue];
                None
            }
            SendBody::PerDevice { envelopes, to_version, own_version } => {
                let recipient = self.account(batch, to)?.ok_or_else(|| StoreError::UnknownUser(to.to_owned()))?;
                let own = self.account(batch, sender.handle())?;
                let bodies =
                    envelopes::bodies(sender, &recipient, own.as_deref(), envelopes, *to_version, *own_version)?;
                Some(bodies)
            }
        };
        // Check every queue before writing any: all or nothing.
        for q in &targets {
            if self.bounds_of(batch, q)?.depth() >= self.config.max_queue_len {
                return Err(StoreError::QueueFull(q.to_string(), self.config.max_queue_len));
            }
        }
        let stamp = self.clock.next();
        let message = |body: Bytes| {
            StoredItem {
                enqueued_at_ms: now,
                stamp,
                item: pb::deliver::Item::Message(pb::Message {
                    message_id: Bytes::copy_from_slice(&message_id),
                    from: sender.handle().to_owned(),
                    from_device: sender.device(),
                    to: to.to_owned(),
                    sent_at_ms: now,
                    body,
                    no_receipt: !receipt,
                }),
            }
            .encode()
        };
        let same = match body {
            SendBody::Same(body) | SendBody::ToDevice { body, .. } => Some(message(body)),
            SendBody::PerDevice { .. } => None,
        };
        for q in &targets {
            let item = match (&same, &mut per_device) {
                (Some(item), _) => item.clone(),
                (None, Some(bodies)) => message(bodies.remove(q).unwrap_or_default()),
                (None, None) => Bytes::new(),
            };
            self.push(batch, q, item)?;
        }
        let recipients = targets.len() as u32;
        batch.put(CF_DEDUP, dedup_key.clone(), dedup_value(now, recipients));
        batch.set_dedup(dedup_key, (now, recipients));
        Ok(Enqueued { duplicate: false, accepted_at_ms: now, recipients })
    }

    /// The queues a send from `sender` to `to` goes into: each device of
    /// `to`, and the sender's other devices.
    fn targets(&self, batch: &Batch, sender: &QueueKey, to: &str) -> Result<Vec<QueueKey>, StoreError> {
        let recipient = self.account(batch, to)?.ok_or_else(|| StoreError::UnknownUser(to.to_owned()))?;
        let mut targets: Vec<QueueKey> = recipient.devices.iter().map(|d| QueueKey::new(to, d.id)).collect();
        if sender.handle() != to {
            if let Some(own) = self.account(batch, sender.handle())? {
                targets.extend(own.devices.iter().map(|d| QueueKey::new(sender.handle(), d.id)));
            }
        }
        let mut seen = HashSet::new();
        targets.retain(|q| q != sender && seen.insert(q.clone()));
        Ok(targets)
    }

    fn ack(&mut self, batch: &mut Batch, queue: &QueueKey, up_to: u64) -> Result<QueueBounds, StoreError> {
        self.delete_up_to(batch, queue, up_to, true)
    }

    /// Deletes entries of `queue` up to `up_to`; with `receipts`, queues a
    /// delivery receipt for the sender of each message deleted.
    fn delete_up_to(
        &mut self,
        batch: &mut Batch,
        queue: &QueueKey,
        up_to: u64,
        receipts_wanted: bool,
    ) -> Result<QueueBounds, StoreError> {
        let mut b = self.bounds_of(batch, queue)?;
        let up_to = up_to.min(b.tail);
        if up_to <= b.head {
            return Ok(b);
        }
        let mut receipts = Vec::new();
        if receipts_wanted {
            for (seq, value) in self.range(queue, b.head + 1, up_to)? {
                batch.delete(CF_QUEUES, queue.entry(seq));
                if let Ok(StoredItem { item: pb::deliver::Item::Message(m), .. }) = StoredItem::decode(&value) {
                    if m.from != queue.handle() && !m.no_receipt {
                        receipts.push((QueueKey::new(&m.from, m.from_device), m.message_id));
                    }
                }
            }
        } else {
            // Seqs from head to tail are contiguous: the entries need not be
            // read to be deleted.
            self.delete_entries(batch, queue, b.head + 1, up_to);
        }
        b.head = up_to;
        batch.put(CF_META, queue.as_bytes(), up_to.to_be_bytes());
        batch.set_bounds(queue.clone(), b);
        for (to, message_id) in receipts {
            self.receipt(batch, &to, message_id, queue, ErrorCode::Unspecified)?;
        }
        Ok(b)
    }

    /// Queues for `to` (a sending device) the receipt of its message
    /// `message_id` at `delivered_to`: delivered, or undeliverable and why.
    /// A receipt is not worth refusing the ack or the shipment it comes
    /// from: when `to`'s queue is full it is dropped, and counted.
    fn receipt(
        &self,
        batch: &mut Batch,
        to: &QueueKey,
        message_id: Bytes,
        delivered_to: &QueueKey,
        error: ErrorCode,
    ) -> Result<(), StoreError> {
        if self.bounds_of(batch, to)?.depth() >= self.config.max_queue_len {
            metrics::counter!("tern_store_receipts_dropped_total").increment(1);
            return Ok(());
        }
        let now = now_ms();
        let receipt = StoredItem {
            enqueued_at_ms: now,
            stamp: self.clock.next(),
            item: pb::deliver::Item::Receipt(pb::Receipt {
                message_id,
                handle: delivered_to.handle().to_owned(),
                device: delivered_to.device(),
                delivered_at_ms: now,
                error: error as i32,
            }),
        };
        self.push(batch, to, receipt.encode())?;
        Ok(())
    }

    /// A shipped entry for `queue` too large for this broker to push: its
    /// sender gets an undeliverable receipt in its place (a message from a
    /// member whose `limits.max_frame_len` is larger than this broker's).
    fn undeliverable(&self, batch: &mut Batch, queue: &QueueKey, value: &[u8]) -> Result<(), StoreError> {
        metrics::counter!("tern_store_undeliverable_total", "reason" => "too_large").increment(1);
        tracing::warn!(
            %queue,
            bytes = value.len(),
            max = self.config.max_entry_len,
            "a shipped entry is too large to deliver here (limits.max_frame_len differs between members); \
             its sender gets an undeliverable receipt"
        );
        match StoredItem::decode(value)?.item {
            pb::deliver::Item::Message(m) => {
                let from = QueueKey::new(&m.from, m.from_device);
                self.receipt(batch, &from, m.message_id, queue, ErrorCode::PayloadTooLarge)
            }
            // Receipts are small; one this large came from a broken peer.
            pb::deliver::Item::Receipt(_) => Ok(()),
        }
    }

    /// Highest origin seq of `origin`'s copy of `queue` accounted for here,
    /// as this batch sees it.
    fn shipped_done(&self, batch: &Batch, key: &[u8]) -> Result<u64, StoreError> {
        match batch.shipped.get(key) {
            Some(seq) => Ok(*seq),
            None => Ok(self.db.get_pinned_cf(cf(&self.db, CF_MESH)?, key)?.map_or(0, |v| decode_u64(&v))),
        }
    }

    /// Stores what [`admit`] lets in of a shipment, all or nothing.
    fn apply_ship(
        &mut self,
        batch: &mut Batch,
        origin: &[u8; 16],
        queue: &QueueKey,
        header: ShipHeader,
        entries: Vec<(u64, Bytes)>,
    ) -> Result<ShipOutcome, StoreError> {
        let key = shipped_key(origin, queue);
        let done = self.shipped_done(batch, &key)?;
        let seqs: Vec<u64> = entries.iter().map(|(seq, _)| *seq).collect();
        let (from, to) = match admit(done, header.base, header.handed_up_to, &seqs) {
            Admit::Store { from, to } => (from, to),
            Admit::Duplicate { done } => return Ok(ShipOutcome::Acked(done)),
            Admit::Gap { expected } => {
                metrics::counter!("tern_mesh_ship_gaps_total").increment(1);
                return Ok(ShipOutcome::Gap { expected });
            }
            Admit::Wait { up_to, expected } => return Ok(ShipOutcome::Wait { up_to, expected }),
            Admit::Malformed => {
                return Err(StoreError::Corrupt(format!("shipped entries of {queue} are not in seq order")));
            }
        };
        let fresh: Vec<(u64, Bytes)> = entries.into_iter().filter(|(seq, _)| *seq >= from).collect();
        if self.disk_low.load(Ordering::Relaxed) {
            return Err(StoreError::Full("free disk space is below the configured minimum".into()));
        }
        if self.bounds_of(batch, queue)?.depth() + fresh.len() as u64 > self.config.max_queue_len {
            return Err(StoreError::QueueFull(queue.to_string(), self.config.max_queue_len));
        }
        // Check every entry before writing any: all or nothing.
        if let Some((seq, _)) = fresh.iter().find(|(_, value)| StoredItem::decode(value).is_err()) {
            return Err(StoreError::Corrupt(format!("shipped entry {seq} of {queue} does not decode")));
        }
        for (_, value) in fresh {
            if value.len() > self.config.max_entry_len {
                self.undeliverable(batch, queue, &value)?;
            } else {
                self.push(batch, queue, value)?;
            }
        }
        batch.put(CF_MESH, key.clone(), to.to_be_bytes());
        batch.set_shipped(key, to);
        Ok(ShipOutcome::Acked(to))
    }

    /// Marks `origin`'s entries of `queue` up to `up_to` as accounted for.
    fn settle(
        &mut self,
        batch: &mut Batch,
        origin: &[u8; 16],
        queue: &QueueKey,
        up_to: u64,
    ) -> Result<u64, StoreError> {
        let key = shipped_key(origin, queue);
        let done = self.shipped_done(batch, &key)?;
        if up_to <= done {
            return Ok(done);
        }
        batch.put(CF_MESH, key.clone(), up_to.to_be_bytes());
        batch.set_shipped(key, up_to);
        Ok(up_to)
    }

    /// Drops the record that `node` holds entries of `queue` shipped from
    /// here (it has handed back all it held); returns the seq it named, or 0.
    fn forget_handed(&mut self, batch: &mut Batch, queue: &QueueKey, node: &str) -> Result<u64, StoreError> {
        let mesh = cf(&self.db, CF_MESH)?;
        let key = handed_key(queue);
        let Some(value) = self.db.get_pinned_cf(mesh, &key)? else { return Ok(0) };
        match decode_handed(&value) {
            Some((holder, up_to)) if holder == node => {
                batch.delete(CF_MESH, key);
                Ok(up_to)
            }
            _ => Ok(0),
        }
    }

    /// Deletes entries `node` stored, and records that it holds them.
    fn shipped(
        &mut self,
        batch: &mut Batch,
        queue: &QueueKey,
        up_to: u64,
        node: &str,
    ) -> Result<QueueBounds, StoreError> {
        let before = self.bounds_of(batch, queue)?;
        let after = self.delete_up_to(batch, queue, up_to, false)?;
        if after.head > before.head {
            batch.put(CF_MESH, handed_key(queue), encode_handed(node, after.head));
        }
        Ok(after)
    }

    /// Merges a record from another broker into the one held here (see
    /// [`Account::merge`]); returns the record now held.
    fn merge_account(&mut self, batch: &mut Batch, account: Account) -> Result<Account, StoreError> {
        let current = self.account(batch, &account.handle)?;
        let merged = match &current {
            Some(current) => current.merge(&account),
            None => account,
        };
        if let Some(current) = &current {
            if **current == merged {
                return Ok(merged);
            }
            if merged.lost.len() > current.lost.len() {
                metrics::counter!("tern_accounts_conflicts_total").increment(1);
                tracing::warn!(
                    handle = %merged.handle,
                    lost = merged.lost.len() - current.lost.len(),
                    "two copies of an account conflicted (claimed or given a device on both sides of a partition); \
                     the losing devices are told HANDLE_LOST at their next login"
                );
            }
        }
        let had = |id: u32| current.as_ref().is_some_and(|a| a.device(id).is_some());
        for d in merged.devices.iter().filter(|d| !had(d.id)) {
            self.create_queue(batch, QueueKey::new(&merged.handle, d.id))?;
        }
        let unlinked: Vec<u32> = current
            .as_ref()
            .map(|c| c.devices.iter().map(|d| d.id).filter(|id| merged.device(*id).is_none()).collect())
            .unwrap_or_default();
        for id in unlinked.into_iter().filter(|id| merged.removed.contains(id)) {
            self.drop_device(batch, &QueueKey::new(&merged.handle, id))?;
        }
        self.put_account(batch, merged.clone())?;
        Ok(merged)
    }

    /// Entries `from ..= to` of `queue` as stored now (not counting this batch).
    fn range(&self, queue: &QueueKey, from: u64, to: u64) -> Result<Entries, StoreError> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(queue.entry(to.saturating_add(1)));
        let start = queue.entry(from);
        let iter = self.db.iterator_cf_opt(
            cf(&self.db, CF_QUEUES)?,
            opts,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        let mut out = Vec::new();
        for entry in iter {
            let (key, value) = entry?;
            if let Some(seq) = queue.seq_of(&key) {
                out.push((seq, value));
            }
        }
        Ok(out)
    }

    /// Deletes entries enqueued before `cutoff_ms`, at most [`EXPIRE_MAX`]
    /// of them (so one sweep never makes a batch that stalls the others);
    /// `Expired::more` says the sweep should go on.
    fn expire(&mut self, batch: &mut Batch, cutoff_ms: u64) -> Result<Expired, StoreError> {
        let mut expired = Expired::default();
        let queues = cf(&self.db, CF_QUEUES)?;
        let candidates: Vec<QueueKey> = self.nonempty.iter().cloned().collect();
        for queue in candidates {
            if expired.entries >= EXPIRE_MAX {
                expired.more = true;
                break;
            }
            let mut b = self.bounds_of(batch, &queue)?;
            let mut opts = ReadOptions::default();
            opts.set_iterate_upper_bound(queue.entry(b.tail.saturating_add(1)));
            let start = queue.entry(b.head + 1);
            let iter = self.db.iterator_cf_opt(queues, opts, IteratorMode::From(&start, rocksdb::Direction::Forward));
            let first = b.head;
            for entry in iter {
                let (key, value) = entry?;
                let Some(seq) = queue.seq_of(&key) else { break };
                if super::item::enqueued_at(&value).is_some_and(|at| at >= cutoff_ms) {
                    break;
                }
                if expired.entries >= EXPIRE_MAX {
                    expired.more = true;
                    break;
                }
                b.head = seq;
                expired.entries += 1;
            }
            if b.head > first {
                self.delete_entries(batch, &queue, first + 1, b.head);
                batch.put(CF_META, queue.as_bytes(), b.head.to_be_bytes());
                batch.set_bounds(queue, b);
                expired.queues += 1;
            }
        }
        Ok(expired)
    }

    /// Stages the deletion of `queue`'s entries `from ..= to` (seqs from
    /// head to tail are contiguous): one range tombstone for a long run,
    /// point deletes for a short one (many small range tombstones would
    /// slow reads down).
    fn delete_entries(&self, batch: &mut Batch, queue: &QueueKey, from: u64, to: u64) {
        if to < from {
            return;
        }
        if to - from + 1 >= RANGE_DELETE_MIN {
            batch.delete_range(CF_QUEUES, queue.entry(from), queue.entry(to + 1));
        } else {
            for seq in from..=to {
                batch.delete(CF_QUEUES, queue.entry(seq));
            }
        }
    }
}

fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(dir: &std::path::Path) -> WriterActor {
        let config = StoreConfig {
            path: dir.to_owned(),
            durability: Durability::Written,
            retention: std::time::Duration::from_secs(3600),
            max_queue_len: 100,
            max_entry_len: 4096,
            max_batch: 64,
            max_devices: 4,
            account_cache_entries: 10,
            memory_mb: 8,
            keys: Default::default(),
        };
        let db = Arc::new(super::super::open_db(&config).unwrap());
        let (_tx, rx) = mpsc::channel(1);
        let router: Arc<dyn QueueListener> = Arc::new(crate::router::Router::default());
        let failed = Arc::new(std::sync::OnceLock::new());
        let shared = Shared {
            accounts: moka::sync::Cache::new(10),
            disk_low: Arc::default(),
            sync_failed: failed,
            clock: Arc::default(),
        };
        WriterActor::new(db, rx, router, config, shared).unwrap()
    }

    /// Applies `cmd` alone in a batch, writes it, and returns its answer.
    fn run<T>(actor: &mut WriterActor, make: impl FnOnce(Reply<T>) -> WriteCmd) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        let mut batch = Batch::default();
        actor.apply(make(reply), &mut batch);
        actor.commit(batch);
        rx.blocking_recv().unwrap()
    }

    fn send(actor: &mut WriterActor, from: &str, to: &str, id: u8) {
        let sender = QueueKey::new(from, 1);
        let body = Bytes::from_static(b"hi");
        let sent = run(actor, |reply| WriteCmd::Enqueue {
            sender,
            message_id: [id; 16],
            to: to.into(),
            body: body.into(),
            receipt: true,
            reply,
        });
        assert!(sent.is_ok(), "{sent:?}");
    }

    /// Issue 11, 2.5: a request that failed part-way had its first writes
    /// committed with the rest of the batch. Here an ack whose second
    /// receipt cannot be written used to delete the acknowledged entries and
    /// queue the first receipt anyway, while answering with an error.
    #[test]
    fn a_request_that_fails_part_way_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut actor = actor(dir.path());
        register(&mut actor, &["alice", "carol", "bob"]);
        send(&mut actor, "alice", "bob", 1);
        send(&mut actor, "carol", "bob", 2);
        let bob = QueueKey::new("bob", 1);

        // The ack deletes 1 and 2, then writes a receipt for alice (the
        // first entry write) and one for carol (the second: it fails).
        actor.fail_push_in.set(Some(1));
        let acked = run(&mut actor, |reply| WriteCmd::Ack { queue: bob.clone(), up_to: 2, reply });
        assert!(acked.is_err(), "the ack failed: {acked:?}");
        assert_eq!(actor.bounds[&bob], QueueBounds { head: 0, tail: 2 }, "nothing deleted");
        assert_eq!(actor.range(&bob, 1, 2).unwrap().len(), 2, "both entries still stored");
        let alice = QueueKey::new("alice", 1);
        assert_eq!(actor.bounds.get(&alice).map(|b| b.depth()), Some(0), "no receipt for alice");
        assert!(actor.range(&alice, 1, 10).unwrap().is_empty());

        // Tried again without the fault, the ack goes through whole.
        let acked = run(&mut actor, |reply| WriteCmd::Ack { queue: bob.clone(), up_to: 2, reply });
        assert_eq!(acked.unwrap(), QueueBounds { head: 2, tail: 2 });
        assert_eq!(actor.range(&alice, 1, 10).unwrap().len(), 1, "alice's receipt");
        assert_eq!(actor.range(&QueueKey::new("carol", 1), 1, 10).unwrap().len(), 1, "carol's receipt");
    }

    /// The message numbers (first id byte) of `queue`'s entries in seq order.
    fn ids(actor: &WriterActor, queue: &QueueKey) -> Vec<u8> {
        let b = actor.bounds[queue];
        actor
            .range(queue, b.head + 1, b.tail)
            .unwrap()
            .iter()
            .map(|(_, v)| match StoredItem::decode(v).unwrap().item {
                pb::deliver::Item::Message(m) => m.message_id[0],
                pb::deliver::Item::Receipt(_) => 0,
            })
            .collect()
    }

    /// A second fence on a queue still fenced counts from the first one's
    /// start: an entry that came back during the first is put in order
    /// when the second is lifted, though the login that set the first has
    /// ended and does not reorder (the three-broker simulation,
    /// `mesh::moves_sim`: alice's 2 was delivered before her 1).
    #[test]
    fn a_fence_on_a_fenced_queue_counts_from_the_first_fences_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut actor = actor(dir.path());
        register(&mut actor, &["alice", "bob"]);
        let bob = QueueKey::new("bob", 1);
        send(&mut actor, "alice", "bob", 2);
        assert_eq!(run(&mut actor, |reply| WriteCmd::Fence { queue: bob.clone(), reply }).unwrap(), 1);
        // Comes back during the first fence.
        hand_back(&mut actor, &bob, 1);
        assert_eq!(
            run(&mut actor, |reply| WriteCmd::Fence { queue: bob.clone(), reply }).unwrap(),
            1,
            "the tail when the first fence went up, not now"
        );
        assert!(run(&mut actor, |reply| WriteCmd::Unfence { queue: bob.clone(), reply }).is_ok());
        assert!(run(&mut actor, |reply| WriteCmd::Unfence { queue: bob.clone(), reply }).is_ok());
        // Unfenced, a new fence counts from now.
        assert_eq!(run(&mut actor, |reply| WriteCmd::Fence { queue: bob.clone(), reply }).unwrap(), 2);
    }

    /// Issue 11: a fence lived only in memory, so a broker killed while a
    /// queue was fenced lost the reorder of what had come back during it;
    /// the next login's fence counted from the restart and bob got newer
    /// messages of alice's before older ones (`mesh::moves_sim`, the
    /// replay `a_fence_that_dies_with_its_broker_...`). The next fence
    /// after a restart counts from the dead fence's start; once a fence is
    /// lifted, its record goes.
    #[test]
    fn the_first_fence_after_a_restart_counts_from_the_start_of_the_fence_that_died() {
        let dir = tempfile::tempdir().unwrap();
        let bob = QueueKey::new("bob", 1);
        let fence = |actor: &mut WriterActor| run(actor, |reply| WriteCmd::Fence { queue: bob.clone(), reply });
        let mut actor = actor(dir.path());
        register(&mut actor, &["alice", "bob"]);
        send(&mut actor, "alice", "bob", 2);
        assert_eq!(fence(&mut actor).unwrap(), 1);
        // Comes back during the fence; then the broker is killed.
        hand_back(&mut actor, &bob, 1);
        drop(actor);

        let mut actor = self::actor(dir.path());
        assert_eq!(actor.bounds[&bob].tail, 2);
        assert_eq!(fence(&mut actor).unwrap(), 1, "the start of the fence that died, not the tail now");
        assert!(run(&mut actor, |reply| WriteCmd::Unfence { queue: bob.clone(), reply }).is_ok());
        drop(actor);

        // Lifted before the restart: the next fence counts from its tail.
        let mut actor = self::actor(dir.path());
        assert_eq!(fence(&mut actor).unwrap(), 2);
    }

    /// Issue 11, order across a move: a device comes back to a broker that
    /// holds entries queued for it while it was elsewhere (2, 3), newer than
    /// what its previous broker hands back (1). Sends while the queue is
    /// fenced wait, in order; by their stamps, the entries from before the
    /// fence go behind what came back; the held sends follow.
    #[test]
    fn a_fenced_queue_holds_sends_in_order_and_puts_what_came_back_in_its_senders_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut actor = actor(dir.path());
        register(&mut actor, &["alice", "carol", "bob"]);
        let bob = QueueKey::new("bob", 1);
        send(&mut actor, "alice", "bob", 2);
        send(&mut actor, "alice", "bob", 3);
        let before = run(&mut actor, |reply| WriteCmd::Fence { queue: bob.clone(), reply }).unwrap();
        assert_eq!(before, 2);

        // Sends into the fenced queue wait, unanswered; one to carol does not.
        let mut held = Vec::new();
        for id in [4, 5] {
            let (reply, rx) = oneshot::channel();
            let sender = QueueKey::new("alice", 1);
            let body = Bytes::from_static(b"hi");
            let mut batch = Batch::default();
            let receipt = true;
            actor.apply(
                WriteCmd::Enqueue { sender, message_id: [id; 16], to: "bob".into(), body: body.into(), receipt, reply },
                &mut batch,
            );
            actor.commit(batch);
            held.push(rx);
        }
        send(&mut actor, "alice", "carol", 9);
        assert!(held.iter_mut().all(|rx| rx.try_recv().is_err()), "held sends are not answered");
        assert_eq!(ids(&actor, &bob), vec![2, 3]);

        // The previous broker hands back the oldest entry (as a shipment).
        hand_back(&mut actor, &bob, 1);
        assert_eq!(ids(&actor, &bob), vec![2, 3, 1]);

        let after = run(&mut actor, |reply| WriteCmd::Reorder { queue: bob.clone(), reply }).unwrap();
        assert_eq!(after, QueueBounds { head: 3, tail: 6 }, "appended anew after the old tail");
        assert_eq!(ids(&actor, &bob), vec![1, 2, 3], "what was here goes behind what came back, older");
        assert!(run(&mut actor, |reply| WriteCmd::Unfence { queue: bob.clone(), reply }).is_ok());
        for mut rx in held {
            assert!(matches!(rx.try_recv(), Ok(Ok(_))), "a held send is answered once the fence is lifted");
        }
        assert_eq!(ids(&actor, &bob), vec![1, 2, 3, 4, 5]);
        let b = actor.bounds[&bob];
        let seqs: Vec<u64> = actor.range(&bob, b.head + 1, b.tail).unwrap().iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![4, 5, 6, 7, 8], "no seq's value changed: the old seqs are gone");
    }

    /// Issue 11, M1 (the CI chaos run of stop 16): the entries queued here
    /// before the fence are the *older* ones (shipped here while the device
    /// was away), and a newer one of the same sender arrives during the
    /// fence. Moving what was here behind what came back delivered the newer
    /// one first; sorting by stamp keeps the sender's order, and another
    /// sender's entry keeps its place.
    #[test]
    fn entries_older_than_what_arrives_during_a_fence_stay_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut actor = actor(dir.path());
        register(&mut actor, &["alice", "carol", "bob"]);
        let bob = QueueKey::new("bob", 1);
        let ship = |actor: &mut WriterActor, origin: u8, seq: u64, value: Vec<u8>| {
            let header = ShipHeader { base: seq - 1, handed_up_to: 0 };
            let entries = vec![(seq, Bytes::from(value))];
            let shipped = run(actor, |reply| WriteCmd::ApplyShip {
                origin: [origin; 16],
                queue: bob.clone(),
                header,
                entries,
                reply,
            });
            assert!(matches!(shipped, Ok(ShipOutcome::Acked(_))), "{shipped:?}");
        };
        ship(&mut actor, 7, 1, entry(1, "alice", 100));
        ship(&mut actor, 8, 1, entry(50, "carol", 90));
        ship(&mut actor, 7, 2, entry(2, "alice", 101));
        assert_eq!(run(&mut actor, |reply| WriteCmd::Fence { queue: bob.clone(), reply }).unwrap(), 3);
        ship(&mut actor, 9, 1, entry(3, "alice", 102));
        ship(&mut actor, 9, 2, entry(51, "carol", 80));
        let after = run(&mut actor, |reply| WriteCmd::Reorder { queue: bob.clone(), reply }).unwrap();
        assert_eq!(ids(&actor, &bob), vec![1, 51, 2, 3, 50], "each sender in stamp order, in its own places");
        assert_eq!(after, QueueBounds { head: 5, tail: 10 });
        assert!(run(&mut actor, |reply| WriteCmd::Unfence { queue: bob.clone(), reply }).is_ok());
        let again = run(&mut actor, |reply| WriteCmd::Reorder { queue: bob.clone(), reply }).unwrap();
        assert_eq!(again, after, "a queue in order is left alone");
    }

    /// The device's previous broker (origin 7) hands back its first entry,
    /// message `id`.
    fn hand_back(actor: &mut WriterActor, queue: &QueueKey, id: u8) {
        let header = ShipHeader { base: 0, handed_up_to: 0 };
        let entries = vec![(1, Bytes::from(ids_entry(id)))];
        let shipped =
            run(actor, |reply| WriteCmd::ApplyShip { origin: [7; 16], queue: queue.clone(), header, entries, reply });
        assert!(matches!(shipped, Ok(ShipOutcome::Acked(1))), "{shipped:?}");
    }

    fn register(actor: &mut WriterActor, handles: &[&str]) {
        for (i, handle) in handles.iter().enumerate() {
            let key = [i as u8; 32];
            let registered =
                run(actor, |reply| WriteCmd::Register { handle: (*handle).into(), public_key: key, reply });
            assert!(registered.is_ok());
        }
    }

    /// The receipts in `queue`, as (message number, error code).
    fn receipts(actor: &WriterActor, queue: &QueueKey) -> Vec<(u8, i32)> {
        let b = actor.bounds.get(queue).copied().unwrap_or_default();
        let entries = actor.range(queue, b.head + 1, b.tail).unwrap();
        entries
            .iter()
            .filter_map(|(_, v)| match StoredItem::decode(v).unwrap().item {
                pb::deliver::Item::Receipt(r) => Some((r.message_id[0], r.error)),
                pb::deliver::Item::Message(_) => None,
            })
            .collect()
    }

    /// Issue 11, 2.10: receipts went into the sender's queue whatever its
    /// length, past `max_queue_len`. Now one for a full queue is dropped
    /// (the ack itself goes through).
    #[test]
    fn a_receipt_for_a_full_queue_is_dropped_and_the_ack_still_goes_through() {
        let dir = tempfile::tempdir().unwrap();
        let mut actor = actor(dir.path());
        register(&mut actor, &["alice", "bob", "carol"]);
        send(&mut actor, "alice", "bob", 1);
        for id in 0..100 {
            send(&mut actor, "carol", "alice", 100u8.wrapping_add(id));
        }
        let alice = QueueKey::new("alice", 1);
        assert_eq!(actor.bounds[&alice].depth(), 100, "alice's queue is full");
        let bob = QueueKey::new("bob", 1);
        let acked = run(&mut actor, |reply| WriteCmd::Ack { queue: bob.clone(), up_to: 1, reply });
        assert_eq!(acked.unwrap(), QueueBounds { head: 1, tail: 1 });
        assert_eq!(actor.bounds[&alice].depth(), 100, "no receipt beyond max_queue_len");
        assert!(receipts(&actor, &alice).is_empty());
    }

    /// Issue 11, 2.10: a shipped message larger than this broker can push
    /// (a member with a larger `max_frame_len` accepted it) was stored, and
    /// the device then failed on the frame at every reconnect. Now the
    /// shipment is taken whole and the sender gets an undeliverable receipt
    /// in the big entry's place.
    #[test]
    fn a_shipped_message_too_large_to_deliver_becomes_an_undeliverable_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let mut actor = actor(dir.path());
        register(&mut actor, &["alice", "bob"]);
        let bob = QueueKey::new("bob", 1);
        let big = StoredItem {
            enqueued_at_ms: now_ms(),
            stamp: 0,
            item: pb::deliver::Item::Message(pb::Message {
                message_id: Bytes::copy_from_slice(&[2; 16]),
                from: "alice".into(),
                from_device: 1,
                to: "bob".into(),
                sent_at_ms: 0,
                body: Bytes::from(vec![7u8; 5000]),
                no_receipt: false,
            }),
        };
        let entries = vec![(1, Bytes::from(ids_entry(1))), (2, big.encode()), (3, Bytes::from(ids_entry(3)))];
        let header = ShipHeader { base: 0, handed_up_to: 0 };
        let shipped = run(&mut actor, |reply| WriteCmd::ApplyShip {
            origin: [7; 16],
            queue: bob.clone(),
            header,
            entries,
            reply,
        });
        assert!(matches!(shipped, Ok(ShipOutcome::Acked(3))), "the whole shipment is taken: {shipped:?}");
        assert_eq!(ids(&actor, &bob), vec![1, 3], "the entry too large to push is not stored");
        let alice = QueueKey::new("alice", 1);
        assert_eq!(receipts(&actor, &alice), vec![(2, ErrorCode::PayloadTooLarge as i32)]);
    }

    /// Issue 11, 2.9: one expiry sweep put every expired entry in a
    /// single batch (and a point delete each), however many there were,
    /// stalling every write behind it. Now a request expires a bounded
    /// number, long runs go as one range delete, and the sweep goes on.
    #[test]
    fn expiry_deletes_a_bounded_number_per_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut actor = actor(dir.path());
        let q = QueueKey::new("bob", 1);
        let mut batch = Batch::default();
        let total = EXPIRE_MAX + 50;
        for i in 0..total {
            actor.push(&mut batch, &q, Bytes::from(ids_entry(i as u8))).unwrap();
        }
        actor.commit(batch);
        assert_eq!(actor.bounds[&q].depth(), total);
        let first = run(&mut actor, |reply| WriteCmd::Expire { cutoff_ms: u64::MAX, reply }).unwrap();
        assert_eq!((first.entries, first.more), (EXPIRE_MAX, true));
        assert_eq!(actor.bounds[&q], QueueBounds { head: EXPIRE_MAX, tail: total });
        assert_eq!(actor.range(&q, 1, total).unwrap().len(), 50, "the expired entries are gone from disk");
        let second = run(&mut actor, |reply| WriteCmd::Expire { cutoff_ms: u64::MAX, reply }).unwrap();
        assert_eq!((second.entries, second.more), (50, false));
        assert!(actor.range(&q, 1, total).unwrap().is_empty());
        let waiting = run(&mut actor, |reply| WriteCmd::Waiting { reply }).unwrap();
        assert!(waiting.is_empty(), "an emptied queue is not waiting: {waiting:?}");
    }

    /// A stored message entry of alice numbered `id` (first byte of its
    /// message id), stamped `id`.
    fn ids_entry(id: u8) -> Vec<u8> {
        entry(id, "alice", u64::from(id))
    }

    /// A stored message entry numbered `id` from device 1 of `from`.
    fn entry(id: u8, from: &str, stamp: u64) -> Vec<u8> {
        let item = StoredItem {
            enqueued_at_ms: now_ms(),
            stamp,
            item: pb::deliver::Item::Message(pb::Message {
                message_id: Bytes::copy_from_slice(&[id; 16]),
                from: from.into(),
                from_device: 1,
                to: "bob".into(),
                sent_at_ms: 0,
                body: Bytes::from_static(b"hi"),
                no_receipt: false,
            }),
        };
        item.encode().to_vec()
    }
}
