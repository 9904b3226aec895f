//! The books of a run: every message sent, acknowledged and delivered, so that
//! at the end each acknowledged message is accounted for as delivered once,
//! delivered more than once (duplicated), delivered behind a later message of
//! the same sender (reordered), or not delivered at all (lost). Latencies go
//! into HdrHistograms, for the whole run and for the current interval (the
//! `max` scenario's stages). For runs that hunt for defects (`chaos`), the
//! ledger also keeps when each message was sent and acknowledged, and the
//! first few anomalies in detail, so a loss can be matched to the fault
//! that caused it.
//!
//! With several devices per user ([`Ledger::with_devices`]) a message is
//! one delivery to each device of the recipient and one to each other
//! device of the sender (which sends from its first device): `copies`
//! deliveries, each with its own slot. A message counts as delivered to
//! the end when every slot is filled; lost, duplicated, reordered and
//! delivered count deliveries (slots), so with one device they are
//! messages, as before.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::payload::Stamp;

/// A growable bit set indexed by sequence number.
#[derive(Debug, Default)]
struct Bits(Vec<u64>);

impl Bits {
    /// Sets bit `i`; returns whether it was already set.
    fn set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        was
    }

    fn get(&self, i: u64) -> bool {
        self.0.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

#[derive(Debug, Default)]
struct SenderBook {
    next_seq: u64,
    acked: Bits,
    /// Bit `seq * copies + slot`: delivered to that slot's device.
    delivered: Bits,
    /// With a timeline: per seq, (sent, acked) in ms since the epoch (acked
    /// 0 until the ack).
    times: Vec<(u32, u32)>,
}

/// Anomalies kept in detail (the counts are always complete).
pub(crate) const MAX_ANOMALIES: usize = 100;

/// One message that was lost, duplicated or reordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Anomaly {
    /// `lost`, `duplicated` or `reordered`.
    pub(crate) kind: &'static str,
    /// Sending user.
    pub(crate) sender: u32,
    /// Its number in the sender's stream.
    pub(crate) seq: u64,
    /// Receiving user (`None` for a loss: the ledger does not know whom it
    /// was for; the scenario does).
    pub(crate) receiver: Option<u32>,
    /// Reordered: the later message of the same sender delivered before it.
    pub(crate) after_seq: Option<u64>,
    /// Whether the send was acknowledged (by the time of the anomaly).
    pub(crate) acked: bool,
    /// When it was sent, ms since the run's epoch (with a timeline).
    pub(crate) sent_ms: Option<u32>,
    /// When it was acknowledged, ms since the epoch (with a timeline).
    pub(crate) acked_ms: Option<u32>,
    /// When the anomaly showed (the delivery), ms since the epoch; for a
    /// loss, when it was counted.
    pub(crate) at_ms: u32,
}

/// One receiving device's books.
#[derive(Debug, Default)]
struct ReceiverBook {
    /// Highest sequence number delivered from each sender.
    last: HashMap<u32, u64>,
}

/// send->ack and send->deliver histograms, in microseconds.
#[derive(Debug)]
pub(crate) struct Latencies {
    pub(crate) ack: Histogram<u64>,
    pub(crate) deliver: Histogram<u64>,
}

impl Latencies {
    fn new() -> Self {
        // 1 µs .. 5 min at 3 significant digits; larger values are clamped.
        let h = || Histogram::new_with_bounds(1, 300_000_000, 3).expect("static bounds are valid");
        Self { ack: h(), deliver: h() }
    }

    fn reset(&mut self) {
        self.ack.reset();
        self.deliver.reset();
    }
}

/// Histogram shards: recording takes one shard's lock, chosen by user.
const SHARDS: usize = 16;

/// The books; shared by every task of a run.
#[derive(Debug)]
pub(crate) struct Ledger {
    epoch: Instant,
    senders: Vec<Mutex<SenderBook>>,
    /// Per device: user `u`'s device `d` is `u * devices + d`.
    receivers: Vec<Mutex<ReceiverBook>>,
    /// Devices per user.
    devices: u32,
    /// Deliveries each message makes: `devices` to the recipient, and
    /// `devices - 1` copies to the sender's other devices.
    copies: u64,
    total: Vec<Mutex<Latencies>>,
    interval: Vec<Mutex<Latencies>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Sends before this (ns since epoch) are accounted but not timed (warm-up).
    timed_from_ns: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    delivered: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    foreign: AtomicU64,
    /// End-to-end deliveries that could not be decrypted (the client asks
    /// for them again; they come later as ordinary deliveries).
    undecryptable: AtomicU64,
    /// Acknowledged messages delivered to every device.
    acked_delivered: AtomicU64,
    /// Clients that stopped for good and were replaced by a new login.
    client_restarts: AtomicU64,
    last_delivery_ns: AtomicU64,
    /// Keep (sent, acked) times per message.
    timeline: bool,
    anomalies: Mutex<Vec<Anomaly>>,
}

/// Counters at one moment, for progress and stage decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) sent: u64,
    pub(crate) acked: u64,
    pub(crate) failed: u64,
    pub(crate) delivered: u64,
    /// Acknowledged messages delivered to every device: when it reaches
    /// `acked`, nothing acknowledged is missing.
    pub(crate) acked_delivered: u64,
}

/// The final accounting of acknowledged messages.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Accounting {
    /// Sends started.
    pub(crate) sent: u64,
    /// Sends the broker acknowledged as durable.
    pub(crate) acked: u64,
    /// Sends that failed (see `errors`).
    pub(crate) failed: u64,
    /// Distinct deliveries (first deliveries of a message to a device;
    /// with one device per user, messages).
    pub(crate) delivered: u64,
    /// Deliveries each message makes (`devices` + `devices - 1` copies).
    pub(crate) deliveries_per_message: u64,
    /// Acknowledged messages' deliveries that never happened.
    pub(crate) lost: u64,
    /// Deliveries of a message already delivered.
    pub(crate) duplicated: u64,
    /// Deliveries behind a later message of the same sender to the same user.
    pub(crate) reordered: u64,
    /// Delivered although the send was not acknowledged (failed or timed
    /// out on this side but stored by the broker): not an error.
    pub(crate) delivered_unacked: u64,
    /// Deliveries that were not load-generator messages.
    pub(crate) foreign: u64,
    /// End-to-end deliveries that did not decrypt (asked for again).
    pub(crate) undecryptable: u64,
    /// Failed sends by kind.
    pub(crate) errors: BTreeMap<String, u64>,
}

impl Ledger {
    /// One device per user.
    #[cfg(test)]
    pub(crate) fn new(users: usize) -> Self {
        Self::build(users, 1, false)
    }

    /// A ledger that also keeps when each message was sent and acknowledged
    /// (8 bytes a message), for [`Ledger::lost`].
    pub(crate) fn with_timeline(users: usize) -> Self {
        Self::build(users, 1, true)
    }

    /// A ledger for `devices` devices per user (at least 1): each message
    /// is expected at every device of its recipient and every other device
    /// of its sender.
    pub(crate) fn with_devices(users: usize, devices: u32) -> Self {
        Self::build(users, devices.max(1), false)
    }

    fn build(users: usize, devices: u32, timeline: bool) -> Self {
        let v = |n: usize, f: fn() -> Latencies| (0..n).map(|_| Mutex::new(f())).collect();
        Self {
            epoch: Instant::now(),
            senders: (0..users).map(|_| Mutex::default()).collect(),
            receivers: (0..users * devices as usize).map(|_| Mutex::default()).collect(),
            devices,
            copies: 2 * u64::from(devices) - 1,
            total: v(SHARDS, Latencies::new),
            interval: v(SHARDS, Latencies::new),
            errors: Mutex::default(),
            timed_from_ns: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            undecryptable: AtomicU64::new(0),
            acked_delivered: AtomicU64::new(0),
            client_restarts: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            timeline,
            anomalies: Mutex::default(),
        }
    }

    fn now_ms(&self) -> u32 {
        (self.now_ns() / 1_000_000).min(u64::from(u32::MAX)) as u32
    }

    fn note(&self, anomaly: Anomaly) {
        let mut list = self.anomalies.lock().expect("ledger lock");
        if list.len() < MAX_ANOMALIES {
            list.push(anomaly);
        }
    }

    /// The anomalies kept in detail (the first [`MAX_ANOMALIES`]).
    pub(crate) fn anomalies(&self) -> Vec<Anomaly> {
        self.anomalies.lock().expect("ledger lock").clone()
    }

    /// A client stopped for good and was replaced by a new login.
    pub(crate) fn client_restarted(&self) {
        self.client_restarts.fetch_add(1, Relaxed);
    }

    /// How many clients were replaced (see [`Ledger::client_restarted`]).
    pub(crate) fn client_restarts(&self) -> u64 {
        self.client_restarts.load(Relaxed)
    }

    /// The first `max` acknowledged messages never delivered, in detail.
    pub(crate) fn lost(&self, max: usize) -> Vec<Anomaly> {
        let at_ms = self.now_ms();
        let mut out = Vec::new();
        for (sender, book) in self.senders.iter().enumerate() {
            let book = book.lock().expect("ledger lock");
            for seq in 0..book.next_seq {
                if out.len() >= max {
                    return out;
                }
                if book.acked.get(seq) && !self.complete(&book, seq) {
                    let times = book.times.get(seq as usize).copied();
                    out.push(Anomaly {
                        kind: "lost",
                        sender: sender as u32,
                        seq,
                        receiver: None,
                        after_seq: None,
                        acked: true,
                        sent_ms: times.map(|t| t.0),
                        acked_ms: times.map(|t| t.1),
                        at_ms,
                    });
                }
            }
        }
        out
    }

    /// Nanoseconds since the run's epoch.
    pub(crate) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The instant `ns` after the epoch.
    pub(crate) fn instant(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }

    /// Sends intended before `ns` are not timed (warm-up).
    pub(crate) fn time_from(&self, ns: u64) {
        self.timed_from_ns.store(ns, Relaxed);
    }

    /// Stamps the next message of `sender`, intended for `sent_ns`.
    pub(crate) fn stamp(&self, sender: u32, sent_ns: u64) -> Stamp {
        let mut book = self.senders[sender as usize].lock().expect("ledger lock");
        let seq = book.next_seq;
        book.next_seq += 1;
        if self.timeline {
            book.times.push(((sent_ns / 1_000_000).min(u64::from(u32::MAX)) as u32, 0));
        }
        self.sent.fetch_add(1, Relaxed);
        Stamp { sender, seq, sent_ns }
    }

    /// Records the durable ack of `stamp`.
    pub(crate) fn acked(&self, stamp: Stamp) {
        let now = self.now_ns();
        {
            let mut book = self.senders[stamp.sender as usize].lock().expect("ledger lock");
            book.acked.set(stamp.seq);
            if self.complete(&book, stamp.seq) {
                self.acked_delivered.fetch_add(1, Relaxed);
            }
            if let Some(t) = book.times.get_mut(stamp.seq as usize) {
                t.1 = (now / 1_000_000).min(u64::from(u32::MAX)) as u32;
            }
        }
        self.acked.fetch_add(1, Relaxed);
        if stamp.sent_ns >= self.timed_from_ns.load(Relaxed) {
            let us = now.saturating_sub(stamp.sent_ns) / 1000;
            let shard = stamp.sender as usize % SHARDS;
            self.total[shard].lock().expect("ledger lock").ack.saturating_record(us.max(1));
            self.interval[shard].lock().expect("ledger lock").ack.saturating_record(us.max(1));
        }
    }

    /// Records a failed send, by kind.
    pub(crate) fn failed(&self, kind: &str) {
        self.failed.fetch_add(1, Relaxed);
        *self.errors.lock().expect("ledger lock").entry(kind.to_owned()).or_default() += 1;
    }

    /// Whether message `seq` reached every device it is for.
    fn complete(&self, book: &SenderBook, seq: u64) -> bool {
        (0..self.copies).all(|slot| book.delivered.get(seq * self.copies + slot))
    }

    /// The slot of a delivery to `device` of user `receiver` of a message
    /// from `sender` (sent from its device 0): the recipient's devices
    /// first, then the sender's others; `None` for a device that should
    /// not have it (the sending device itself, one beyond `devices`).
    /// With one device every delivery is slot 0, as before devices existed.
    fn slot(&self, sender: u32, receiver: u32, device: u32) -> Option<u64> {
        if self.devices == 1 {
            return (device == 0).then_some(0);
        }
        match (receiver == sender, device) {
            (_, d) if d >= self.devices => None,
            (false, d) => Some(u64::from(d)),
            (true, 0) => None,
            (true, d) => Some(u64::from(self.devices + d - 1)),
        }
    }

    /// Records a delivery of `body` to user `receiver` (its only device).
    pub(crate) fn delivered(&self, receiver: u32, body: &[u8]) {
        self.delivered_to(receiver, 0, body);
    }

    /// An end-to-end delivery that did not decrypt (it is asked for again).
    pub(crate) fn undecryptable(&self) {
        self.undecryptable.fetch_add(1, Relaxed);
    }

    /// Records a delivery of `body` to device `device` (0-based, in the
    /// order the load generator linked them) of user `receiver`.
    pub(crate) fn delivered_to(&self, receiver: u32, device: u32, body: &[u8]) {
        let now = self.now_ns();
        let Some(stamp) = Stamp::decode(body) else {
            self.foreign.fetch_add(1, Relaxed);
            return;
        };
        let (Some(sender), Some(slot)) =
            (self.senders.get(stamp.sender as usize), self.slot(stamp.sender, receiver, device))
        else {
            self.foreign.fetch_add(1, Relaxed);
            return;
        };
        let (acked, times) = {
            let mut book = sender.lock().expect("ledger lock");
            let acked = book.acked.get(stamp.seq);
            let times = book.times.get(stamp.seq as usize).copied();
            if book.delivered.set(stamp.seq * self.copies + slot) {
                drop(book);
                self.duplicated.fetch_add(1, Relaxed);
                self.note(self.anomaly("duplicated", stamp, receiver, None, acked, times));
                return;
            }
            if acked && self.complete(&book, stamp.seq) {
                self.acked_delivered.fetch_add(1, Relaxed);
            }
            (acked, times)
        };
        self.delivered.fetch_add(1, Relaxed);
        self.last_delivery_ns.fetch_max(now, Relaxed);
        let at = receiver as usize * self.devices as usize + device as usize;
        if let Some(book) = self.receivers.get(at) {
            let mut book = book.lock().expect("ledger lock");
            let last = book.last.entry(stamp.sender).or_insert(stamp.seq);
            if stamp.seq < *last {
                let after = *last;
                drop(book);
                self.reordered.fetch_add(1, Relaxed);
                self.note(self.anomaly("reordered", stamp, receiver, Some(after), acked, times));
            } else {
                *last = stamp.seq;
            }
        }
        if stamp.sent_ns >= self.timed_from_ns.load(Relaxed) {
            let us = now.saturating_sub(stamp.sent_ns) / 1000;
            let shard = stamp.sender as usize % SHARDS;
            self.total[shard].lock().expect("ledger lock").deliver.saturating_record(us.max(1));
            self.interval[shard].lock().expect("ledger lock").deliver.saturating_record(us.max(1));
        }
    }

    fn anomaly(
        &self,
        kind: &'static str,
        stamp: Stamp,
        receiver: u32,
        after_seq: Option<u64>,
        acked: bool,
        times: Option<(u32, u32)>,
    ) -> Anomaly {
        Anomaly {
            kind,
            sender: stamp.sender,
            seq: stamp.seq,
            receiver: Some(receiver),
            after_seq,
            acked,
            sent_ms: times.map(|t| t.0),
            acked_ms: times.map(|t| t.1).filter(|&t| t > 0),
            at_ms: self.now_ms(),
        }
    }

    pub(crate) fn counts(&self) -> Counts {
        Counts {
            sent: self.sent.load(Relaxed),
            acked: self.acked.load(Relaxed),
            failed: self.failed.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            acked_delivered: self.acked_delivered.load(Relaxed),
        }
    }

    /// When the last first-delivery happened, ns since the epoch.
    pub(crate) fn last_delivery_ns(&self) -> u64 {
        self.last_delivery_ns.load(Relaxed)
    }

    fn merged(shards: &[Mutex<Latencies>], reset: bool) -> Latencies {
        let mut out = Latencies::new();
        for s in shards {
            let mut s = s.lock().expect("ledger lock");
            out.ack.add(&s.ack).expect("same bounds");
            out.deliver.add(&s.deliver).expect("same bounds");
            if reset {
                s.reset();
            }
        }
        out
    }

    /// Latencies of the whole run.
    pub(crate) fn latencies(&self) -> Latencies {
        Self::merged(&self.total, false)
    }

    /// Latencies since the last call (the interval histograms are reset).
    pub(crate) fn take_interval(&self) -> Latencies {
        Self::merged(&self.interval, true)
    }

    /// The final accounting: walks every sender's books.
    pub(crate) fn accounting(&self) -> Accounting {
        let mut lost = 0;
        let mut delivered_unacked = 0;
        for book in &self.senders {
            let book = book.lock().expect("ledger lock");
            for seq in 0..book.next_seq {
                let acked = book.acked.get(seq);
                for slot in 0..self.copies {
                    match (acked, book.delivered.get(seq * self.copies + slot)) {
                        (true, false) => lost += 1,
                        (false, true) => delivered_unacked += 1,
                        _ => {}
                    }
                }
            }
        }
        let c = self.counts();
        Accounting {
            sent: c.sent,
            acked: c.acked,
            failed: c.failed,
            delivered: c.delivered,
            deliveries_per_message: self.copies,
            lost,
            duplicated: self.duplicated.load(Relaxed),
            reordered: self.reordered.load(Relaxed),
            delivered_unacked,
            foreign: self.foreign.load(Relaxed),
            undecryptable: self.undecryptable.load(Relaxed),
            errors: self.errors.lock().expect("ledger lock").clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(l: &Ledger, to: u32, s: Stamp) {
        l.delivered(to, &s.encode(32));
    }

    #[test]
    fn counts_lost_duplicated_and_reordered() {
        let l = Ledger::new(2);
        let a: Vec<Stamp> = (0..4).map(|_| l.stamp(0, l.now_ns())).collect();
        for s in &a {
            l.acked(*s);
        }
        deliver(&l, 1, a[0]);
        deliver(&l, 1, a[2]);
        deliver(&l, 1, a[1]); // behind a[2]
        deliver(&l, 1, a[2]); // again
        let acc = l.accounting();
        assert_eq!((acc.acked, acc.delivered, acc.lost, acc.duplicated, acc.reordered), (4, 3, 1, 1, 1));
    }

    #[test]
    fn acked_delivered_counts_each_acknowledged_message_once_whichever_comes_first() {
        let l = Ledger::new(2);
        let a: Vec<Stamp> = (0..3).map(|_| l.stamp(0, 0)).collect();
        deliver(&l, 1, a[0]); // delivered before its ack (the push does not wait for the sync)
        l.acked(a[0]);
        l.acked(a[1]);
        deliver(&l, 1, a[1]);
        deliver(&l, 1, a[1]); // a duplicate does not count again
        deliver(&l, 1, a[2]); // never acked
        let c = l.counts();
        assert_eq!((c.acked, c.delivered, c.acked_delivered), (2, 3, 2));
    }

    #[test]
    fn anomalies_and_losses_are_kept_in_detail_with_a_timeline() {
        let l = Ledger::with_timeline(2);
        let a: Vec<Stamp> = (0..4).map(|k| l.stamp(0, k * 1_000_000_000)).collect();
        for s in &a {
            l.acked(*s);
        }
        deliver(&l, 1, a[1]);
        deliver(&l, 1, a[0]); // behind a[1]
        deliver(&l, 1, a[0]); // again
        let kinds: Vec<(&str, u64, Option<u64>)> = l.anomalies().iter().map(|x| (x.kind, x.seq, x.after_seq)).collect();
        assert_eq!(kinds, vec![("reordered", 0, Some(1)), ("duplicated", 0, None)]);
        let lost = l.lost(10);
        assert_eq!(lost.iter().map(|x| x.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!((lost[0].kind, lost[0].sent_ms, lost[0].acked), ("lost", Some(2000), true));
        assert!(lost[0].acked_ms.is_some());
        assert_eq!(l.lost(1).len(), 1, "at most as many as asked");
        assert!(Ledger::new(1).lost(10).is_empty());
    }

    #[test]
    fn unacked_delivery_is_not_lost() {
        let l = Ledger::new(2);
        let s = l.stamp(1, 0);
        l.failed("Timeout");
        deliver(&l, 0, s);
        let acc = l.accounting();
        assert_eq!((acc.lost, acc.delivered_unacked, acc.failed), (0, 1, 1));
        assert_eq!(acc.errors.get("Timeout"), Some(&1));
    }

    #[test]
    fn with_devices_every_device_and_own_copy_counts_once() {
        // 2 users, 3 devices: a message from user 0 is due at user 1's
        // devices 0, 1, 2 and at user 0's devices 1 and 2.
        let l = Ledger::with_devices(2, 3);
        let a: Vec<Stamp> = (0..3).map(|_| l.stamp(0, 0)).collect();
        for s in &a {
            l.acked(*s);
        }
        let all = |l: &Ledger, s: Stamp| {
            for d in 0..3 {
                l.delivered_to(1, d, &s.encode(32));
            }
            for d in 1..3 {
                l.delivered_to(0, d, &s.encode(32));
            }
        };
        all(&l, a[0]);
        all(&l, a[1]);
        assert_eq!(l.counts().acked_delivered, 2);
        let acc = l.accounting();
        assert_eq!((acc.delivered, acc.lost, acc.duplicated, acc.reordered), (10, 5, 0, 0));
        assert_eq!(acc.deliveries_per_message, 5);
        // Message 2 reaches all but user 0's device 2: one delivery lost.
        for d in 0..3 {
            l.delivered_to(1, d, &a[2].encode(32));
        }
        l.delivered_to(0, 1, &a[2].encode(32));
        assert_eq!(l.counts().acked_delivered, 2, "not complete without the last copy");
        assert_eq!(l.accounting().lost, 1);
        assert_eq!(l.lost(10).iter().map(|x| x.seq).collect::<Vec<_>>(), vec![2]);
        // Again to one device: a duplicate; per device order is checked on its own.
        l.delivered_to(1, 2, &a[1].encode(32));
        l.delivered_to(1, 1, &a[0].encode(32));
        let acc = l.accounting();
        assert_eq!((acc.duplicated, acc.reordered), (2, 0));
        // A copy to the sending device itself is none of ours.
        l.delivered_to(0, 0, &a[0].encode(32));
        assert_eq!(l.accounting().foreign, 1);
    }

    #[test]
    fn reorders_are_per_receiving_device() {
        let l = Ledger::with_devices(2, 2);
        let a: Vec<Stamp> = (0..2).map(|_| l.stamp(0, 0)).collect();
        l.delivered_to(1, 0, &a[1].encode(32));
        l.delivered_to(1, 1, &a[0].encode(32));
        l.delivered_to(1, 1, &a[1].encode(32));
        assert_eq!(l.accounting().reordered, 0);
        l.delivered_to(1, 0, &a[0].encode(32));
        assert_eq!(l.accounting().reordered, 1);
    }

    #[test]
    fn warm_up_is_accounted_but_not_timed() {
        let l = Ledger::new(1);
        l.time_from(u64::MAX);
        let s = l.stamp(0, 5);
        l.acked(s);
        deliver(&l, 0, s);
        assert_eq!(l.latencies().deliver.len(), 0);
        assert_eq!(l.accounting().delivered, 1);
    }
}
