//! What the application has already seen, so a redelivered entry reaches it
//! once; and which duplicates may be acknowledged at once.
//!
//! The broker redelivers everything unacknowledged after a reconnect. An
//! entry handed to the application is remembered by its identity (for a
//! message: sender, sender device, message id; for a receipt: message id and
//! acknowledging device) in a bounded window. A duplicate is dropped; it is
//! acknowledged right away when no entry handed to the application with a
//! smaller seq still waits for the application's ack (acks are cumulative,
//! so acking it earlier would acknowledge those too); otherwise the
//! application's next ack covers it.

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
    /// New: hand it to the application.
    Deliver,
    /// Seen before: drop it and acknowledge this seq now.
    DropAndAck(u64),
    /// Seen before: drop it; a later application ack covers it.
    Drop,
}

#[derive(Debug)]
pub(crate) struct Dedup {
    seen: HashSet<ItemKey>,
    order: VecDeque<ItemKey>,
    capacity: usize,
    /// Seqs handed to the application and not yet acknowledged by it.
    outstanding: BTreeSet<u64>,
}

impl Dedup {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { seen: HashSet::new(), order: VecDeque::new(), capacity: capacity.max(1), outstanding: BTreeSet::new() }
    }

    pub(crate) fn check(&mut self, seq: u64, key: ItemKey) -> Verdict {
        if self.seen.contains(&key) {
            return match self.outstanding.first() {
                Some(&lowest) if lowest < seq => Verdict::Drop,
                _ => Verdict::DropAndAck(seq),
            };
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(key.clone());
        self.order.push_back(key);
        self.outstanding.insert(seq);
        Verdict::Deliver
    }

    /// The application acknowledged everything up to `seq`.
    pub(crate) fn acked(&mut self, seq: u64) {
        self.outstanding = self.outstanding.split_off(&(seq.saturating_add(1)));
    }

    /// After a reconnect nothing handed over earlier is pending any more from
    /// the broker's point of view; entries above the ack will come again.
    pub(crate) fn reconnected(&mut self) {
        self.outstanding.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u8) -> ItemKey {
        ItemKey::Message { from: "alice".into(), from_device: 1, id: [n; 16] }
    }

    #[test]
    fn delivers_once_and_acks_duplicates_when_safe() {
        let mut d = Dedup::new(100);
        assert_eq!(d.check(1, msg(1)), Verdict::Deliver);
        assert_eq!(d.check(2, msg(2)), Verdict::Deliver);
        d.acked(2);
        // Redelivered after the app acked (the ack was lost): drop and ack.
        d.reconnected();
        assert_eq!(d.check(1, msg(1)), Verdict::DropAndAck(1));
        assert_eq!(d.check(2, msg(2)), Verdict::DropAndAck(2));
        // A new one, not yet acked by the app; then a duplicate above it must
        // wait for the app's ack.
        assert_eq!(d.check(3, msg(3)), Verdict::Deliver);
        assert_eq!(d.check(4, msg(1)), Verdict::Drop);
        d.acked(3);
        assert_eq!(d.check(5, msg(2)), Verdict::DropAndAck(5));
    }

    #[test]
    fn receipts_and_messages_are_distinct_and_window_is_bounded() {
        let mut d = Dedup::new(2);
        let r = ItemKey::Receipt { id: [1; 16], handle: "bob".into(), device: 1 };
        assert_eq!(d.check(1, msg(1)), Verdict::Deliver);
        assert_eq!(d.check(2, r.clone()), Verdict::Deliver);
        assert_eq!(d.check(3, msg(2)), Verdict::Deliver);
        d.acked(3);
        assert_eq!(d.check(4, r), Verdict::DropAndAck(4), "still in the window");
        assert_eq!(d.check(5, msg(1)), Verdict::Deliver, "evicted from the window of 2");
    }
}
