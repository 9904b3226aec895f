//! What the application has already seen, so a redelivered entry reaches it
//! once; and which acknowledgements are safe to send on its behalf.
//!
//! Sans-IO: the actor feeds it deliveries (`handle_delivery`), the
//! application's acks (`handle_app_ack`) and new logins (`handle_login`);
//! each call returns what to do (hand the item over, drop it, send an ack).
//!
//! Two kinds of state, with different lifetimes:
//!
//! - **Identity survives reconnects.** An item handed to the application is
//!   remembered by its identity (for a message: sender, sender device,
//!   message id; for a receipt: message id and acknowledging device) in a
//!   bounded window. A redelivery of it, on any connection and under any
//!   seq, is dropped.
//! - **Seqs are per connection.** A seq means something only at the broker
//!   that pushed it, on the connection that pushed it: each broker of a mesh
//!   numbers its own copy of a device's queue. So everything kept by seq
//!   (the cumulative ack, dropped duplicates, the hold below) starts again at
//!   each login from that broker's `LoginOk.acked_seq`, and the client
//!   acknowledges only seqs delivered on the current connection. Nothing is
//!   repeated from an earlier connection.
//!
//! Items handed to the application and not yet acknowledged by it are kept
//! in hand-over order with the connection they came on. The application's
//! `ack(seq)` names one of them (its seq may be an earlier connection's): it
//! retires that item and everything handed before it. Acks are cumulative,
//! so the client acknowledges up to a seq of the current connection only
//! when nothing at or below it still waits for the application: an item
//! handed over on this connection and not acked, a duplicate of an item the
//! application still holds (from whichever connection), or an item held back.
//!
//! When the application's buffer is full the client must not block (sends
//! and their acks share the connection), so it discards new items from that
//! seq on without acknowledging them ("holding"): nothing at or above the
//! first discarded seq is acked until a fresh login makes the broker push
//! them again.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

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

/// An item the application has and has not acknowledged yet.
#[derive(Debug)]
struct Handed {
    /// The connection it came on (see `Dedup::conn`).
    conn: u64,
    /// Its seq on that connection.
    seq: u64,
    key: ItemKey,
}

#[derive(Debug)]
pub(crate) struct Dedup {
    seen: HashSet<ItemKey>,
    order: VecDeque<ItemKey>,
    capacity: usize,
    /// Counts logins: the connection the seqs below belong to.
    conn: u64,
    /// Handed to the application and not yet acknowledged by it, in order.
    handed: VecDeque<Handed>,
    /// The identities in `handed`.
    held: HashSet<ItemKey>,
    /// Seqs of `handed` items that came on the current connection.
    outstanding: BTreeSet<u64>,
    /// This connection's dropped duplicates not yet covered by an ack sent.
    dropped: BTreeMap<u64, ItemKey>,
    /// The first seq discarded because the application's buffer was full.
    hold_from: Option<u64>,
    /// Highest cumulative ack on this connection: sent, or the broker's
    /// `LoginOk.acked_seq`.
    acked: u64,
    /// Highest seq delivered on this connection.
    received: u64,
}

impl Dedup {
    /// Remembers up to `capacity` ids; `acked` is the first connection's
    /// `LoginOk.acked_seq`.
    pub(crate) fn new(capacity: usize, acked: u64) -> Self {
        Self {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            conn: 0,
            handed: VecDeque::new(),
            held: HashSet::new(),
            outstanding: BTreeSet::new(),
            dropped: BTreeMap::new(),
            hold_from: None,
            acked,
            received: acked,
        }
    }

    /// This connection's seqs below this may be acknowledged without
    /// skipping anything the application has not processed.
    fn ack_limit(&self) -> u64 {
        let outstanding = self.outstanding.first().copied().unwrap_or(u64::MAX);
        let blocked = self.dropped.iter().find(|(_, key)| self.held.contains(*key)).map_or(u64::MAX, |(&seq, _)| seq);
        outstanding.min(blocked).min(self.hold_from.unwrap_or(u64::MAX))
    }

    /// The cumulative ack to send now, if it moves this connection's ack
    /// forward; never above a seq delivered on this connection.
    fn next_ack(&mut self) -> Option<u64> {
        let up_to = self.ack_limit().saturating_sub(1).min(self.received);
        if up_to <= self.acked {
            return None;
        }
        self.acked = up_to;
        self.dropped = self.dropped.split_off(&up_to.saturating_add(1));
        Some(up_to)
    }

    /// Item `seq` arrived on the current connection; `room` says whether the
    /// application's buffer can take it now.
    pub(crate) fn handle_delivery(&mut self, seq: u64, key: ItemKey, room: bool) -> Verdict {
        self.received = self.received.max(seq);
        if self.seen.contains(&key) || self.held.contains(&key) {
            if seq > self.acked {
                self.dropped.insert(seq, key);
            }
            return match self.next_ack() {
                Some(up_to) => Verdict::DropAndAck(up_to),
                None => Verdict::Drop,
            };
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
        self.order.push_back(key.clone());
        self.held.insert(key.clone());
        self.outstanding.insert(seq);
        self.handed.push_back(Handed { conn: self.conn, seq, key });
        Verdict::Deliver
    }

    /// The application acknowledged the item it received with `seq`, and
    /// everything it received before it; returns the cumulative ack to send
    /// on the current connection, if it moves forward. It may go beyond the
    /// item to cover duplicates dropped after it.
    ///
    /// `seq` names the first item still held with that seq, whichever
    /// connection it came on (the application acknowledges in the order it
    /// received). A seq no held item has (the items were acknowledged
    /// already, or it is beyond them) acknowledges the oldest connection's
    /// items up to it.
    pub(crate) fn handle_app_ack(&mut self, seq: u64) -> Option<u64> {
        let through = match self.handed.iter().position(|h| h.seq == seq) {
            Some(i) => i + 1,
            None => {
                let oldest = self.handed.front().map(|h| h.conn);
                self.handed.iter().take_while(|h| Some(h.conn) == oldest && h.seq <= seq).count()
            }
        };
        for h in self.handed.drain(..through) {
            self.held.remove(&h.key);
            if h.conn == self.conn {
                self.outstanding.remove(&h.seq);
            }
        }
        self.next_ack()
    }

    /// Logged in on a new connection, whose broker has acknowledged up to
    /// `acked_seq` (`LoginOk`): its seqs start afresh. Everything unacked is
    /// pushed again, so held-back and dropped items are forgotten (they come
    /// back); items the application still holds stay, matched by identity
    /// when they come back.
    pub(crate) fn handle_login(&mut self, acked_seq: u64) {
        self.conn += 1;
        self.acked = acked_seq;
        self.received = acked_seq;
        self.outstanding.clear();
        self.dropped.clear();
        self.hold_from = None;
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
        // The ack was lost with the connection; the broker says it has 0 and
        // pushes both again: they are dropped and acknowledged as they come.
        d.handle_login(0);
        assert_eq!(d.handle_delivery(1, msg(1), true), Verdict::DropAndAck(1));
        assert_eq!(d.handle_delivery(2, msg(2), true), Verdict::DropAndAck(2));
    }

    /// Issue 11, 2.2: the seqs of one broker say nothing about another's.
    /// After a failover the client acknowledges what the new broker delivers
    /// (it used to repeat its old ack, which deleted the new broker's pushed
    /// but unprocessed entries, and then to stay silent until the new seqs
    /// passed the old value, so the queue never drained).
    #[test]
    fn acks_after_a_failover_are_in_the_new_brokers_seq_space() {
        let mut d = Dedup::new(100, 0);
        for seq in 1..=50 {
            assert_eq!(d.handle_delivery(seq, msg(seq as u8), true), Verdict::Deliver);
        }
        assert_eq!(d.handle_app_ack(50), Some(50));
        // At the new broker the device's queue has seqs 1..=3 of its own.
        d.handle_login(0);
        for seq in 1..=3 {
            assert_eq!(d.handle_delivery(seq, msg(100 + seq as u8), true), Verdict::Deliver);
        }
        assert_eq!(d.handle_app_ack(1), Some(1), "acked although below the old broker's 50");
        assert_eq!(d.handle_app_ack(3), Some(3));
        // A redelivery there of something seen at the old broker is dropped
        // by identity and acknowledged at its new seq.
        assert_eq!(d.handle_delivery(4, msg(7), true), Verdict::DropAndAck(4));
    }

    #[test]
    fn an_item_from_an_earlier_connection_is_acked_at_its_new_seq_once_the_app_acks_it() {
        let mut d = Dedup::new(100, 0);
        assert_eq!(d.handle_delivery(40, msg(1), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(41, msg(2), true), Verdict::Deliver);
        // Failover while the application still holds both; the new broker
        // pushes them again as 1 and 2, then a new item 3.
        d.handle_login(0);
        assert_eq!(d.handle_delivery(1, msg(1), true), Verdict::Drop, "the app has not processed it");
        assert_eq!(d.handle_delivery(2, msg(2), true), Verdict::Drop);
        assert_eq!(d.handle_delivery(3, msg(3), true), Verdict::Deliver);
        // The app acks with the old connection's seqs; the client translates.
        assert_eq!(d.handle_app_ack(40), Some(1));
        assert_eq!(d.handle_app_ack(41), Some(2), "3 is still with the app");
        assert_eq!(d.handle_app_ack(3), Some(3));
    }

    #[test]
    fn redelivery_of_an_item_the_app_still_holds_is_not_acked() {
        let mut d = Dedup::new(100, 0);
        assert_eq!(d.handle_delivery(1, msg(1), true), Verdict::Deliver);
        assert_eq!(d.handle_delivery(2, msg(2), true), Verdict::Deliver);
        d.handle_login(0);
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
    fn acks_never_go_beyond_what_this_connection_delivered() {
        let mut d = Dedup::new(100, 10);
        assert_eq!(d.handle_app_ack(1_000), None, "nothing delivered yet");
        assert_eq!(d.handle_delivery(11, msg(1), true), Verdict::Deliver);
        assert_eq!(d.handle_app_ack(u64::MAX), Some(11));
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
        d.handle_login(1);
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
