//! Fences: a device's queue held still while entries older than the ones
//! stored here come back from another broker.
//!
//! A device that moves to this broker may find here entries newer than
//! what its previous broker holds: sends queued here for it while it was
//! there, shipped but not yet acknowledged, or not shipped at all. While its
//! previous broker hands over, the mesh fences the queue: sends into it are
//! held back (in arrival order, answered once applied), so nothing newer is
//! queued between the older entries coming back. Then it rebases the
//! entries that were here before the fence behind what came back, and lifts
//! the fence. A held send is applied before any later request that touches
//! one of its queues, so each sender's order is kept.
//!
//! Shipments from other brokers are not held here: the mesh defers them
//! during the handoff (`ShipDefer`), except the previous broker's own.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use super::{Batch, WriteCmd, WriterActor};
use crate::store::keys::{CF_META, CF_QUEUES};
use crate::store::{QueueBounds, QueueKey, StoreError};

/// Fenced queues and the sends they hold back.
#[derive(Default)]
pub(super) struct Fences {
    /// Queue -> number of fences on it (a device may log in again before
    /// the first login's handoff is over).
    fenced: HashMap<QueueKey, u32>,
    /// Held sends in arrival order, with the queues each goes into.
    held: VecDeque<(Vec<QueueKey>, WriteCmd)>,
}

impl Fences {
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

    /// Fences `queue`; returns its tail.
    pub(super) fn fence(&mut self, batch: &Batch, queue: QueueKey) -> Result<u64, StoreError> {
        let tail = self.bounds_of(batch, &queue)?.tail;
        *self.fences.fenced.entry(queue).or_default() += 1;
        Ok(tail)
    }

    /// Lifts one fence of `queue`, and applies the sends held back that no
    /// other fence holds, in their order.
    pub(super) fn unfence(&mut self, batch: &mut Batch, queue: &QueueKey) {
        if let Some(n) = self.fences.fenced.get_mut(queue) {
            *n -= 1;
            if *n == 0 {
                self.fences.fenced.remove(queue);
            }
        }
        for (_, cmd) in std::mem::take(&mut self.fences.held) {
            // Held again (in order) if another fence still blocks it.
            self.apply(cmd, batch);
        }
    }

    /// Moves the entries of `queue` from its head up to `up_to` to its tail,
    /// in their order, behind everything stored after them. The device's
    /// session has pushed none of them (it waits for this), and the queue
    /// is not being shipped (the device is here).
    pub(super) fn rebase(
        &mut self,
        batch: &mut Batch,
        queue: &QueueKey,
        up_to: u64,
    ) -> Result<QueueBounds, StoreError> {
        let b = self.bounds_of(batch, queue)?;
        let up_to = up_to.min(b.tail);
        if up_to <= b.head || up_to == b.tail {
            return Ok(b);
        }
        let mut moved = self.range(queue, b.head + 1, up_to)?;
        // Entries staged in this batch are not in the database yet.
        for (q, seq, value) in &batch.queued {
            if q == queue && *seq > b.head && *seq <= up_to && !moved.iter().any(|(s, _)| s == seq) {
                moved.push((*seq, value.to_vec().into_boxed_slice()));
            }
        }
        moved.sort_unstable_by_key(|(seq, _)| *seq);
        for (seq, value) in moved {
            batch.delete(CF_QUEUES, queue.entry(seq));
            self.push(batch, queue, Bytes::from(value.into_vec()))?;
        }
        let mut after = self.bounds_of(batch, queue)?;
        after.head = up_to;
        batch.put(CF_META, queue.as_bytes(), up_to.to_be_bytes());
        batch.set_bounds(queue.clone(), after);
        metrics::counter!("tern_store_rebased_entries_total").increment(up_to - b.head);
        Ok(after)
    }
}
