//! Fences: a device's queue held still while entries older than the ones
//! stored here come back from another broker.
//!
//! A device that moves to this broker may find here entries newer than
//! what its previous broker holds: sends queued here for it while it was
//! there, shipped but not yet acknowledged, or not shipped at all. While its
//! previous broker hands over, the mesh fences the queue: sends into it are
//! held back (in arrival order, answered once applied), so nothing newer is
//! queued between the older entries coming back. Then it puts each
//! sender's entries back in the order of their stamps (what was here before
//! the fence may be newer or older than what came back: sends queued here
//! while the device was elsewhere, or older ones this broker held for it),
//! and lifts the fence. A held send is applied before any later request that touches
//! one of its queues, so each sender's order is kept.
//!
//! Shipments from other brokers are not held here: the mesh defers them
//! during the handoff (`ShipDefer`), except the previous broker's own.
//!
//! A fence's start is also kept in the store (`fence` + queue key in
//! `mesh`) while it is up. A broker killed with a queue fenced loses the
//! fence, and with it the reorder of what came back during it; the next
//! fence of that queue after the restart counts from the record's start,
//! so its reorder takes in those entries too.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use rocksdb::{IteratorMode, DB};

use super::{decode_u64, Batch, WriteCmd, WriterActor};
use crate::store::item::order_of;
use crate::store::keys::{fence_key, CF_MESH, FENCE_PREFIX};
use crate::store::{cf, QueueBounds, QueueKey, StoreError};

/// Most entries of a queue [`WriterActor::reorder`] puts in order.
const REORDER_MAX: u64 = 20_000;

/// Fenced queues and the sends they hold back.
#[derive(Default)]
pub(super) struct Fences {
    /// Queue -> number of fences on it (a device may log in again before
    /// the first login's handoff is over), and the queue's tail when the
    /// first of them went up.
    fenced: HashMap<QueueKey, (u32, u64)>,
    /// Held sends in arrival order, with the queues each goes into.
    held: VecDeque<(Vec<QueueKey>, WriteCmd)>,
    /// Starts of fences that were up when the store was last closed (the
    /// broker was killed during a handoff): the next fence of each such
    /// queue counts from there.
    dead: HashMap<QueueKey, u64>,
}

impl Fences {
    /// No fence up, and the records of those that died with the last run.
    pub(super) fn load(db: &DB) -> Result<Self, StoreError> {
        let mut dead = HashMap::new();
        for entry in db.iterator_cf(cf(db, CF_MESH)?, IteratorMode::From(FENCE_PREFIX, rocksdb::Direction::Forward)) {
            let (key, value) = entry?;
            let Some(queue) = key.strip_prefix(FENCE_PREFIX) else { break };
            if let Some(queue) = QueueKey::from_bytes(queue) {
                dead.insert(queue, decode_u64(&value));
            }
        }
        if !dead.is_empty() {
            tracing::info!(
                queues = dead.len(),
                "queues were fenced when the broker stopped; their next fence puts what came back in order"
            );
        }
        Ok(Self { dead, ..Self::default() })
    }

    fn blocks(&self, targets: &[QueueKey]) -> bool {
        targets.iter().any(|q| self.fenced.contains_key(q) || self.held.iter().any(|(t, _)| t.contains(q)))
    }
}

impl WriterActor {
    /// Holds back a send into a fenced queue (or behind a held send into one
    /// of its queues): `None` then, else the request to apply.
    pub(super) fn hold_if_fenced(&mut self, batch: &Batch, cmd: WriteCmd) -> Option<WriteCmd> {
        if self.fences.fenced.is_empty() && self.fences.held.is_empty() {
            return Some(cmd);
        }
        let WriteCmd::Enqueue { sender, to, .. } = &cmd else { return Some(cmd) };
        // A send that cannot be routed fails as it would unfenced.
        let Ok(targets) = self.targets(batch, sender, to) else { return Some(cmd) };
        if !self.fences.blocks(&targets) {
            return Some(cmd);
        }
        metrics::counter!("tern_store_sends_held_total").increment(1);
        self.fences.held.push_back((targets, cmd));
        None
    }

    /// Fences `queue`; returns its tail, or, if it is fenced already, its
    /// tail when the first fence still up went up: what came back during
    /// that one is put in order when this one is lifted (the login that
    /// set the first may be gone by then, and not reorder).
    ///
    /// The first fence of a queue whose fence died with the last run (see
    /// [`Fences::load`]) counts from that one's start instead. The start
    /// of the first fence up is recorded in the store until the last one
    /// is lifted.
    pub(super) fn fence(&mut self, batch: &mut Batch, queue: QueueKey) -> Result<u64, StoreError> {
        if let Some((count, since)) = self.fences.fenced.get_mut(&queue) {
            *count += 1;
            return Ok(*since);
        }
        let tail = self.bounds_of(batch, &queue)?.tail;
        let since = self.fences.dead.remove(&queue).map_or(tail, |dead| dead.min(tail));
        batch.put(CF_MESH, fence_key(&queue), since.to_be_bytes());
        self.fences.fenced.insert(queue, (1, since));
        Ok(since)
    }

    /// Lifts one fence of `queue`, and applies the sends held back that no
    /// other fence holds, in their order.
    pub(super) fn unfence(&mut self, batch: &mut Batch, queue: &QueueKey) {
        if let Some((n, _)) = self.fences.fenced.get_mut(queue) {
            *n -= 1;
            if *n == 0 {
                self.fences.fenced.remove(queue);
                batch.delete(CF_MESH, fence_key(queue));
            }
        }
        for (_, cmd) in std::mem::take(&mut self.fences.held) {
            // Held again (in order) if another fence still blocks it.
            self.apply(cmd, batch);
        }
    }

    /// Puts each sender's entries of `queue` in the order of their stamps
    /// (see [`item`](crate::store::StoredItem)), in the places that sender's
    /// entries already hold: what came back from the device's previous
    /// broker during the fence, and what was queued here before it, end up
    /// in their senders' order, whichever arrived first. Other senders'
    /// entries, and entries without a stamp, keep their place.
    ///
    /// If anything moves, every entry is appended anew after the tail in
    /// the new order, and the old seqs are deleted (the head moves to the
    /// old tail): the value under a seq never changes. Another broker may
    /// hold some of these seqs, shipped to it before the device came back
    /// (its acknowledgement lost, or not yet in), and skips them by seq
    /// when they are shipped to it again: a value moved under such a seq
    /// would be lost there, and another repeated. A queue of more than
    /// [`REORDER_MAX`] entries is left as it is (and counted).
    ///
    /// Only for a login that is still the device's here, before its session
    /// pushes (it waits for this): then the session has pushed none of them
    /// and the queue is not being shipped (the device is here).
    /// Returns the queue's bounds after.
    pub(super) fn reorder(&mut self, batch: &mut Batch, queue: &QueueKey) -> Result<QueueBounds, StoreError> {
        let b = self.bounds_of(batch, queue)?;
        if b.depth() < 2 {
            return Ok(b);
        }
        if b.depth() > REORDER_MAX {
            metrics::counter!("tern_store_reorders_skipped_total").increment(1);
            tracing::warn!(%queue, depth = b.depth(), max = REORDER_MAX, "a queue too deep to put in its senders' order after a handoff");
            return Ok(b);
        }
        let mut entries = self.range(queue, b.head + 1, b.tail)?;
        // Entries staged in this batch are not in the database yet.
        for (q, seq, value) in &batch.queued {
            if q == queue && *seq > b.head && !entries.iter().any(|(s, _)| s == seq) {
                entries.push((*seq, value.to_vec().into_boxed_slice()));
            }
        }
        entries.sort_unstable_by_key(|(seq, _)| *seq);
        // Each sender's stamped entries, by position.
        let mut senders: HashMap<(u8, String, u32), Vec<(usize, u64)>> = HashMap::new();
        for (i, (_, value)) in entries.iter().enumerate() {
            if let Some((kind, handle, device, stamp)) = order_of(value).filter(|o| o.3 != 0) {
                senders.entry((kind, handle, device)).or_default().push((i, stamp));
            }
        }
        // The entry each position takes.
        let mut order: Vec<usize> = (0..entries.len()).collect();
        for places in senders.values() {
            let mut by_stamp = places.clone();
            by_stamp.sort_by_key(|(_, stamp)| *stamp);
            for ((to, _), (from, _)) in places.iter().zip(by_stamp) {
                order[*to] = from;
            }
        }
        let moved = order.iter().enumerate().filter(|(to, from)| to != *from).count() as u64;
        if moved == 0 {
            return Ok(b);
        }
        self.delete_up_to(batch, queue, b.tail, false)?;
        // Nobody is told of the old seqs: they are gone.
        batch.queued.retain(|(q, seq, _)| !(q == queue && *seq <= b.tail));
        for from in order {
            self.push(batch, queue, Bytes::copy_from_slice(&entries[from].1))?;
        }
        metrics::counter!("tern_store_reordered_entries_total").increment(moved);
        tracing::debug!(%queue, moved, "put a queue back in its senders' order after a handoff");
        self.bounds_of(batch, queue)
    }
}
