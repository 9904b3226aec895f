//! What the application has already seen, so a redelivered entry reaches it
//! once; and which acknowledgements are safe to send on its behalf.
//!
//! Sans-IO: the actor feeds it deliveries (`handle_delivery`), the
//! application's acks (`handle_app_ack`) and reconnects (`handle_login`);
//! each call returns what to do (hand the item over, drop it, send an ack).
//!
//! The broker redelivers everything unacknowledged after a reconnect. An item
//! handed to the application is remembered by its identity (for a message:
//! sender, sender device, message id; for a receipt: message id and
//! acknowledging device) in a bounded window. A duplicate is dropped. Acks
//! are cumulative, so a dropped duplicate is acknowledged by the client only
//! when no item with a smaller or equal seq is still waiting for the
//! application (handed over and not acked, or held back); otherwise it is
//! remembered and acknowledged together with the application's ack that
//! unblocks it.
//!
//! When the application's buffer is full the client must not block (sends
//! and their acks share the connection), so it discards new items from that
//! seq on without acknowledging them ("holding"): nothing at or above the
//! first discarded seq is acked until a fresh login makes the broker push
//! them again.

use std::collections::{BTreeSet, HashSet, VecDeque};

/// Identity of a delivered item.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ItemKey {
    Message { from: String, from_device: u32, id: [u8; 16] },
    Receipt { id: [u8; 16], handle: String, device: u32 },
}

/// What to do with an incoming entry.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// New: hand it to the application (it has been recorded as handed over).
    Deliver,
    /// Seen before: drop it and send a cumulative ack up to this seq.
    DropAndAck(u64),
    /// Seen before: drop it; a later ack covers it.
    Drop,
    /// New, but the application's buffer is full: discard it unacknowledged;
    /// the broker pushes it again after the next login.
    Discard,
}

#[derive(Debug)]
pub(crate) struct Dedup {
    seen: HashSet<ItemKey>,
    order: VecDeque<ItemKey>,
    capacity: usize,
    /// Seqs handed to the application and not yet acknowledged by it.
    outstanding: BTreeSet<u64>,
    /// Seqs of dropped duplicates not yet covered by an ack sent.
    dropped: BTreeSet<u64>,
    /// The first seq discarded because the application's buffer was full.
    hold_from: Option<u64>,
    /// Highest cumulative ack sent (or known to the broker).
    acked: u64,
}

impl Dedup {
    /// Remembers up to `capacity` ids; `acked` is the broker's `LoginOk.acked_seq`.
    pub(crate) fn new(capacity: usize, acked: u64) -> Self {
        Self {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            outstanding: BTreeSet::new(),
            dropped: BTreeSet::new(),
            hold_from: None,
            acked,
        }
    }

    /// Seqs below this may be acknowledged without skipping anything the
    /// application has not processed.
    fn ack_limit(&self) -> u64 {
        let first_outstanding = self.outstanding.first().copied().unwrap_or(u64::MAX);
        first_outstanding.min(self.hold_from.unwrap_or(u64::MAX))
    }

    /// Item `seq` arrived; `room` says whether the application's buffer can
    /// take it now.
    pub(crate) fn handle_delivery(&mut self, seq: u64, key: ItemKey, room: bool) -> Verdict {
        if self.seen.contains(&key) {
            if seq < self.ack_limit() && seq > self.acked {
                self.acked = seq;
                self.dropped.retain(|&d| d > seq);
                return Verdict::DropAndAck(seq);
            }
            if seq > self.acked {
                self.dropped.insert(seq);
            }
            return Verdict::Drop;
        }
        if !room || self.hold_from.is_some() {
            self.hold_from = Some(self.hold_from.map_or(seq, |h| h.min(seq)));
            return Verdict::Discard;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(key.clone());
        self.order.push_back(key);
        self.outstanding.insert(seq);
        Verdict::Deliver
    }

    /// The application acknowledged everything up to `seq`; returns the
    /// cumulative ack to send, if it moves the broker's ack forward. It may
    /// go beyond `seq` to cover duplicates dropped after it.
    pub(crate) fn handle_app_ack(&mut self, seq: u64) -> Option<u64> {
        self.outstanding = self.outstanding.split_off(&seq.saturating_add(1));
        let limit = self.ack_limit();
        let covered = self.dropped.range(..limit).next_back().copied().unwrap_or(0);
        let up_to = seq.max(covered);
        self.dropped = self.dropped.split_off(&up_to.saturating_add(1));
        if up_to > self.acked {
            self.acked = up_to;
            Some(up_to)
        } else {
            None
        }
    }

    /// Logged in again (`acked_seq` from `LoginOk`): everything unacked is
    /// pushed again, so held-back and dropped items are forgotten (they come
    /// back). Returns the ack to repeat when the broker is behind.
    pub(crate) fn handle_login(&mut self, acked_seq: u64) -> Option<u64> {
        self.hold_from = None;
        self.dropped.clear();
        if self.acked > acked_seq {
            Some(self.acked)
        } else {
            self.acked = acked_seq;
            None
        }
    }

    /// True while items are being discarded for lack of room; a fresh login
    /// gets them back once the application has made room.
    pub(crate) fn holding(&self) -> bool {
        self.hold_from.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u8) -> ItemKey {
        ItemKey::Message { from: "alice".into(), from_device: 1, id: [n; 16] }
    }

    #[test]
    fn duplicates_after_the_apps_ack_are_acked_at_once() {
        let mut d = Dedup::new(100, 0);
        assert_eq!(d.handle_delivery(1, msg(1), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(2, msg(2), true), Verdict::Deliver);
        assert_eq!(d.handle_app_ack(2), Some(2));
        // The ack was lost with the connection; the broker says it has 0.
        assert_eq!(d.handle_login(0), Some(2), "repeat the app's ack");
        assert_eq!(d.handle_delivery(1, msg(1), true), Verdict::Drop, "already covered by the repeated ack");
        assert_eq!(d.handle_delivery(2, msg(2), true), Verdict::Drop);
    }

    #[test]
    fn redelivery_of_an_item_the_app_still_holds_is_not_acked() {
        let mut d = Dedup::new(100, 0);
        assert_eq!(d.handle_delivery(1, msg(1), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(2, msg(2), true), Verdict::Deliver);
        assert_eq!(d.handle_login(0), None);
        // Seq 1 and 2 are still with the application: acking them now would
        // delete them from the broker before they are processed.
        assert_eq!(d.handle_delivery(1, msg(1), true), Verdict::Drop);
        assert_eq!(d.handle_delivery(2, msg(2), true), Verdict::Drop);
        assert_eq!(d.handle_app_ack(1), Some(1));
        assert_eq!(d.handle_app_ack(2), Some(2));
    }

    #[test]
    fn a_duplicate_behind_an_unacked_item_waits_for_the_apps_ack() {
        let mut d = Dedup::new(100, 0);
        assert_eq!(d.handle_delivery(1, msg(1), true), Verdict::Deliver);
        assert_eq!(d.handle_app_ack(1), Some(1));
        // A new item, then a duplicate (same id, new seq) above it.
        assert_eq!(d.handle_delivery(2, msg(2), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(3, msg(1), true), Verdict::Drop);
        assert_eq!(d.handle_delivery(4, msg(1), true), Verdict::Drop);
        // The app acks 2: the ack sent covers the dropped 3 and 4 too.
        assert_eq!(d.handle_app_ack(2), Some(4));
        // Nothing outstanding: a further duplicate is acked right away.
        assert_eq!(d.handle_delivery(5, msg(2), true), Verdict::DropAndAck(5));
        // An app ack that moves nothing sends nothing.
        assert_eq!(d.handle_app_ack(2), None);
    }

    #[test]
    fn a_dropped_duplicate_between_unacked_items_is_covered_only_up_to_the_next() {
        let mut d = Dedup::new(100, 0);
        assert_eq!(d.handle_delivery(1, msg(1), true), Verdict::Deliver);
        assert_eq!(d.handle_app_ack(1), Some(1));
        assert_eq!(d.handle_delivery(2, msg(2), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(3, msg(1), true), Verdict::Drop);
        assert_eq!(d.handle_delivery(4, msg(4), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(5, msg(1), true), Verdict::Drop);
        assert_eq!(d.handle_app_ack(2), Some(3), "3 is covered, 4 is still with the app");
        assert_eq!(d.handle_app_ack(4), Some(5));
    }

    #[test]
    fn a_full_buffer_holds_everything_from_the_first_discarded_seq() {
        let mut d = Dedup::new(100, 0);
        assert_eq!(d.handle_delivery(1, msg(1), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(2, msg(2), false), Verdict::Discard);
        assert!(d.holding());
        // Room again, but order must hold: 3 is discarded too.
        assert_eq!(d.handle_delivery(3, msg(3), true), Verdict::Discard);
        // A duplicate above the hold is not acked (it would cover 2 and 3).
        assert_eq!(d.handle_delivery(4, msg(1), true), Verdict::Drop);
        assert_eq!(d.handle_app_ack(1), Some(1), "only up to what the app had");
        // After a fresh login the discarded items come again and are new.
        assert_eq!(d.handle_login(1), None);
        assert!(!d.holding());
        assert_eq!(d.handle_delivery(2, msg(2), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(3, msg(3), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(4, msg(1), true), Verdict::Drop);
        assert_eq!(d.handle_app_ack(3), Some(4));
    }

    #[test]
    fn receipts_and_messages_are_distinct_and_window_is_bounded() {
        let mut d = Dedup::new(2, 0);
        let r = ItemKey::Receipt { id: [1; 16], handle: "bob".into(), device: 1 };
        assert_eq!(d.handle_delivery(1, msg(1), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(2, r.clone(), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(3, msg(2), true), Verdict::Deliver);
        assert_eq!(d.handle_app_ack(3), Some(3));
        assert_eq!(d.handle_delivery(4, msg(1), true), Verdict::Deliver, "evicted from the window of 2");
        assert_eq!(d.handle_delivery(5, msg(2), true), Verdict::Drop, "still in the window; 4 is with the app");
        assert_eq!(d.handle_delivery(6, r, true), Verdict::Deliver, "evicted by msg 1");
    }
}
