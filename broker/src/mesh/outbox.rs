//! The sending side of shipping one queue to one broker, sans-IO.
//!
//! A [`Stream`] is what the ship actor knows of shipping one device queue's
//! entries to the broker where the device is: how far it has sent, how far
//! that broker has acknowledged (stored durably there, so deleted here),
//! how far the queue is known to reach, and what to send next. It does no
//! I/O and reads no clock: the actor feeds it events as `handle_*(now, …)`
//! and asks it what to do with [`Stream::poll_transmit`]; the actor then
//! sends the `Ship` frame, or reads the store and hands back what it found.
//!
//! The receiving side is [`tern_protocol::shipping::admit`]. Together they
//! keep the rule the delivery contract rests on: the receiver stores
//! nothing past a gap and acknowledges only what is contiguous, and the
//! sender rewinds to what was acknowledged whenever what it sent may not
//! have arrived (a new link, a link down, a nack, a defer, a stall). The
//! tests below drive both on a virtual clock over a simulated link that
//! drops, duplicates, reorders, cuts and replaces, with restarts of either
//! end from what it persisted.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Entries in flight (shipped, not yet acknowledged) per queue.
pub(super) const WINDOW: u64 = 4096;
/// Entries and bytes per `Ship` frame.
pub(super) const BATCH_ITEMS: usize = tern_protocol::MAX_SHIP_ENTRIES / 2;
pub(super) const BATCH_BYTES: usize = 1 << 20;
/// Entries shipped and not acknowledged for this long are sent again.
pub(super) const RESEND_AFTER: Duration = Duration::from_secs(5);
/// Announced entries kept per queue for shipping without a store read.
const FRESH_MAX: usize = 1024;

/// What to do next for a [`Stream`] (from [`Stream::poll_transmit`]).
#[derive(Debug, PartialEq)]
pub(super) enum Transmit {
    /// Send these entries (seq order, no gap, the first after what was
    /// sent before); the stream counts them as sent. If they cannot be
    /// sent, call [`Stream::handle_unsent`].
    Ship(Vec<(u64, Bytes)>),
    /// Read the store from this seq on and hand the result to
    /// [`Stream::handle_loaded`] (or [`Stream::handle_read_failed`]).
    Read(u64),
    /// Not now: the window is full, a read is under way, or the receiver
    /// asked to wait. An event will change that (an ack, the read's
    /// result, the wake-up).
    Wait,
    /// Nothing is known to be stored past what was sent.
    Nothing,
}

/// One queue's shipping to its destination (see the module docs).
pub(super) struct Stream {
    /// The link `sent` counts shipments on: entries sent on an earlier link
    /// (gone, or replaced by a restarted peer's) are sent again.
    link: u64,
    /// Highest seq sent.
    sent: u64,
    /// Highest seq the destination acknowledged (deleted here).
    acked: u64,
    /// Highest seq known to be stored here (announced, or seen in the
    /// queue's bounds): past it there is nothing to read.
    tail: u64,
    /// When shipping last moved (an ack, a nack, a new location).
    progress: Instant,
    /// Entries announced and not yet sent, in seq order with no gap, so
    /// they ship without a store read. A gap (a notice dropped, a full
    /// buffer) is filled from the store.
    fresh: VecDeque<(u64, Bytes)>,
    /// No shipping before this (a receiver's nack asked to wait).
    hold_until: Option<Instant>,
    /// A store read is under way.
    reading: bool,
    /// What the last store read found, from which seq: shipped next.
    read: Option<(u64, Vec<(u64, Bytes)>)>,
}

/// The positions and counts, not the entries' bytes (debug logs print it).
impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("link", &self.link)
            .field("sent", &self.sent)
            .field("acked", &self.acked)
            .field("tail", &self.tail)
            .field("fresh", &self.fresh.front().map(|(seq, _)| (*seq, self.fresh.len())))
            .field("hold_until", &self.hold_until)
            .field("reading", &self.reading)
            .field("read", &self.read.as_ref().map(|(from, entries)| (*from, entries.len())))
            .finish()
    }
}

impl Stream {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            link: 0,
            sent: 0,
            acked: 0,
            tail: 0,
            progress: now,
            fresh: VecDeque::new(),
            hold_until: None,
            reading: false,
            read: None,
        }
    }

    /// Highest seq sent.
    #[cfg(test)]
    pub(super) fn sent(&self) -> u64 {
        self.sent
    }

    /// Highest seq acknowledged by the destination.
    pub(super) fn acked(&self) -> u64 {
        self.acked
    }

    /// Entries sent and not yet acknowledged.
    pub(super) fn in_flight(&self) -> u64 {
        self.sent - self.acked
    }

    /// When shipping last moved.
    pub(super) fn progress(&self) -> Instant {
        self.progress
    }

    /// Everything sent is acknowledged.
    pub(super) fn settled(&self) -> bool {
        self.sent == self.acked
    }

    /// The queue's bounds, read from the store when shipping (re)starts to
    /// a destination: everything up to `head` is gone, entries reach
    /// `tail`. Sending starts again after what was acknowledged.
    pub(super) fn handle_start(&mut self, now: Instant, head: u64, tail: u64) {
        self.acked = self.acked.max(head);
        self.tail = self.tail.max(tail);
        self.sent = self.acked;
        self.progress = now;
    }

    /// Entries up to `tail` are stored (seen in the queue's bounds). True
    /// when that is more than was known.
    pub(super) fn handle_tail(&mut self, tail: u64) -> bool {
        let grew = tail > self.tail;
        self.tail = self.tail.max(tail);
        grew
    }

    /// An entry was stored in the queue. `keep`: there is (or soon will be)
    /// somewhere to ship it, so it is kept to ship without a store read
    /// (a held queue may wait long, and is read from the store when it goes).
    pub(super) fn handle_announce(&mut self, seq: u64, value: Bytes, keep: bool) {
        self.tail = self.tail.max(seq);
        let follows = self.fresh.back().is_none_or(|(last, _)| *last + 1 == seq);
        if !keep || !follows || self.fresh.len() >= FRESH_MAX {
            self.fresh.clear();
        }
        if keep && seq > self.sent {
            self.fresh.push_back((seq, value));
        }
    }

    /// Shipping goes on the link with this id. A link other than the one
    /// the last shipments went on means they may have died with the old
    /// one (or with the peer process it reached): they are sent again.
    pub(super) fn handle_link(&mut self, link: u64) {
        if self.link != link {
            self.link = link;
            self.sent = self.acked;
        }
    }

    /// The link under the stream went down: what it carried may be lost.
    pub(super) fn handle_link_down(&mut self) {
        self.sent = self.acked;
    }

    /// The destination acknowledged every entry up to `up_to` (a
    /// cumulative `ShipAck`). True when that is new: the caller deletes
    /// them here.
    pub(super) fn handle_ack(&mut self, now: Instant, up_to: u64) -> bool {
        if up_to <= self.acked {
            return false;
        }
        self.acked = up_to;
        self.sent = self.sent.max(up_to);
        self.progress = now;
        true
    }

    /// The destination stored nothing from `expected` on (a gap, a wait for
    /// another broker's handoff, or a failed write): send again from there,
    /// after `retry_after`. Returns when to call [`Stream::handle_wake`],
    /// if the stream must wait.
    pub(super) fn handle_nack(&mut self, now: Instant, expected: u64, retry_after: Duration) -> Option<Instant> {
        self.sent = self.acked.max(expected.saturating_sub(1));
        self.progress = now;
        if retry_after.is_zero() {
            return None;
        }
        let until = self.hold_until.map_or(now + retry_after, |t| t.max(now + retry_after));
        self.hold_until = Some(until);
        Some(until)
    }

    /// The destination stored nothing of the last shipments and wants the
    /// device looked up again: everything after the last ack goes again.
    pub(super) fn handle_defer(&mut self) {
        self.sent = self.acked;
    }

    /// A nack's wait may be over. True when the stream may send again.
    pub(super) fn handle_wake(&mut self, now: Instant) -> bool {
        if self.hold_until.is_some_and(|t| t <= now) {
            self.hold_until = None;
            return true;
        }
        false
    }

    /// Periodic: shipments not acknowledged within [`RESEND_AFTER`] of the
    /// last progress are sent again. True when that happened.
    pub(super) fn handle_timeout(&mut self, now: Instant) -> bool {
        if self.sent > self.acked && now - self.progress > RESEND_AFTER {
            self.sent = self.acked;
            self.progress = now;
            return true;
        }
        false
    }

    /// What a store read from `from` on (asked by [`Transmit::Read`]) found.
    /// Dropped if shipping has moved since (a nack or a new link rewound
    /// it): the next poll reads again.
    pub(super) fn handle_loaded(&mut self, from: u64, entries: Vec<(u64, Bytes)>) {
        self.reading = false;
        if from != self.sent + 1 {
            return;
        }
        if entries.is_empty() {
            // Gone since it was counted (delivered, expired).
            self.tail = self.sent;
            return;
        }
        self.read = Some((from, entries));
    }

    /// The store read failed; the next poll reads again.
    pub(super) fn handle_read_failed(&mut self) {
        self.reading = false;
    }

    /// The entries of the last [`Transmit::Ship`], from `first` on, were
    /// not sent (the link's queue was full, or it went down).
    pub(super) fn handle_unsent(&mut self, first: u64) {
        self.sent = self.sent.min(first.saturating_sub(1)).max(self.acked);
    }

    /// What to do next (see [`Transmit`]).
    pub(super) fn poll_transmit(&mut self, now: Instant) -> Transmit {
        if self.hold_until.is_some_and(|t| t > now) || self.sent - self.acked >= WINDOW {
            return Transmit::Wait;
        }
        if let Some((from, entries)) = self.read.take() {
            if from == self.sent + 1 && !entries.is_empty() {
                return self.ship(entries);
            }
        }
        while self.fresh.front().is_some_and(|(seq, _)| *seq <= self.sent) {
            self.fresh.pop_front();
        }
        if self.fresh.front().is_some_and(|(seq, _)| *seq == self.sent + 1) {
            let mut bytes = 0;
            let mut entries = Vec::new();
            while let Some((_, value)) = self.fresh.front() {
                if entries.len() >= BATCH_ITEMS || !entries.is_empty() && bytes + value.len() > BATCH_BYTES {
                    break;
                }
                bytes += value.len();
                entries.extend(self.fresh.pop_front());
            }
            return self.ship(entries);
        }
        if self.sent >= self.tail {
            return Transmit::Nothing;
        }
        if self.reading {
            return Transmit::Wait;
        }
        self.reading = true;
        Transmit::Read(self.sent + 1)
    }

    fn ship(&mut self, entries: Vec<(u64, Bytes)>) -> Transmit {
        if let Some((last, _)) = entries.last() {
            self.sent = *last;
        }
        Transmit::Ship(entries)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};

    use proptest::prelude::*;
    use tern_protocol::shipping::{admit, Admit};

    use super::*;

    fn value(seq: u64) -> Bytes {
        Bytes::from(seq.to_be_bytes().to_vec())
    }

    /// The sender's copy of the queue, as its store keeps it (it survives
    /// a restart): entries `head + 1 ..= tail`.
    #[derive(Debug, Default)]
    struct Queue {
        entries: BTreeMap<u64, Bytes>,
        tail: u64,
    }

    impl Queue {
        fn with(n: u64) -> Self {
            let mut q = Self::default();
            for _ in 0..n {
                q.push();
            }
            q
        }

        fn push(&mut self) -> (u64, Bytes) {
            self.tail += 1;
            self.entries.insert(self.tail, value(self.tail));
            (self.tail, value(self.tail))
        }

        fn read(&self, from: u64) -> Vec<(u64, Bytes)> {
            self.entries.range(from..).take(BATCH_ITEMS).map(|(s, v)| (*s, v.clone())).collect()
        }

        fn delete_to(&mut self, up_to: u64) {
            self.entries = self.entries.split_off(&(up_to + 1));
        }

        fn head(&self) -> u64 {
            self.entries.keys().next().map_or(self.tail, |s| s - 1)
        }
    }

    fn seqs(entries: &[(u64, Bytes)]) -> Vec<u64> {
        entries.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn announced_entries_ship_without_a_read_and_gaps_are_read_from_the_store() {
        let now = Instant::now();
        let q = Queue::with(5);
        let mut s = Stream::new(now);
        // Announced from seq 3 on, but 1 and 2 were never sent: read them all.
        s.handle_announce(3, Bytes::from_static(b"x"), true);
        s.handle_announce(4, Bytes::from_static(b"x"), true);
        assert_eq!(s.poll_transmit(now), Transmit::Read(1), "one read, from the first seq not sent");
        assert_eq!(s.poll_transmit(now), Transmit::Wait, "while it runs, nothing else");
        s.handle_loaded(1, q.read(1));
        let Transmit::Ship(first) = s.poll_transmit(now) else { panic!("ships what was read") };
        assert_eq!(seqs(&first), [1, 2, 3, 4, 5]);
        assert_eq!(first[2].1, value(3), "read from the store, not the buffer");
        assert_eq!(s.sent(), 5);
        // Seq 6 is only in the buffer: it ships from there.
        s.handle_announce(6, Bytes::from_static(b"six"), true);
        assert_eq!(s.poll_transmit(now), Transmit::Ship(vec![(6, Bytes::from_static(b"six"))]));
        // A dropped notice (7) leaves a gap: the store is read from 7.
        s.handle_announce(8, Bytes::from_static(b"eight"), true);
        assert_eq!(s.poll_transmit(now), Transmit::Read(7));
        s.handle_loaded(7, q.read(7));
        assert_eq!(s.poll_transmit(now), Transmit::Nothing, "7 and 8 are not in this store");
        // A read from before a rewind (a nack, a new link) is dropped.
        assert_eq!(s.handle_nack(now, 3, Duration::ZERO), None);
        s.handle_loaded(2, vec![(2, value(2))]);
        assert_eq!(s.poll_transmit(now), Transmit::Read(3));
        // A held queue keeps nothing announced: it is read when it goes.
        let mut held = Stream::new(now);
        held.handle_announce(1, Bytes::from_static(b"x"), false);
        assert_eq!(held.poll_transmit(now), Transmit::Read(1));
    }

    #[test]
    fn the_store_is_read_only_up_to_the_highest_seq_known_to_be_there() {
        let now = Instant::now();
        let q = Queue::with(3);
        let mut s = Stream::new(now);
        // Their notices were lost (a full channel): nothing is known past
        // `sent`, so nothing is read.
        assert_eq!(s.poll_transmit(now), Transmit::Nothing);
        // The queue's bounds (a lookup's, or the sweep's) make them known.
        assert!(s.handle_tail(3));
        assert_eq!(s.poll_transmit(now), Transmit::Read(1));
        s.handle_loaded(1, q.read(1));
        assert!(matches!(s.poll_transmit(now), Transmit::Ship(e) if seqs(&e) == [1, 2, 3]));
        assert_eq!(s.poll_transmit(now), Transmit::Nothing);
    }

    /// Issue 11 section 1: a restarted peer's link replaced the dead one
    /// without a link-down, and shipping went on past what died with the
    /// old process.
    #[test]
    fn a_streams_debug_form_shows_positions_not_entry_bytes() {
        let now = Instant::now();
        let mut s = Stream::new(now);
        for seq in 1..=3 {
            s.handle_announce(seq, Bytes::from(vec![0xab; 4096]), true);
        }
        let shown = format!("{s:?}");
        assert!(shown.contains("tail: 3") && shown.contains("fresh: Some((1, 3))"), "{shown}");
        assert!(shown.len() < 300 && !shown.contains("xab"), "entry bytes printed: {shown}");
    }

    #[test]
    fn a_new_link_under_the_stream_sends_again_what_was_not_acknowledged() {
        let now = Instant::now();
        let mut s = Stream::new(now);
        s.handle_link(1);
        for seq in 1..=4 {
            s.handle_announce(seq, value(seq), true);
        }
        assert!(matches!(s.poll_transmit(now), Transmit::Ship(e) if e.len() == 4));
        assert!(s.handle_ack(now, 2));
        assert!(!s.handle_ack(now, 1), "an older ack is not news");
        s.handle_link(1);
        assert_eq!(s.sent(), 4, "the same link: nothing to send again");
        s.handle_link(2);
        assert_eq!((s.sent(), s.acked()), (2, 2), "a new link: from the last ack on");
        assert_eq!(s.poll_transmit(now), Transmit::Read(3), "the buffer shipped them already: read");
        // A nack with a wait holds shipping until the wake-up.
        s.handle_loaded(3, vec![(3, value(3)), (4, value(4))]);
        let until = s.handle_nack(now, 3, Duration::from_secs(1)).unwrap();
        assert_eq!(s.poll_transmit(now), Transmit::Wait);
        assert!(!s.handle_wake(now));
        assert!(s.handle_wake(until));
        // The read still starts where sending does: it ships. Unsent
        // shipments count as not sent, and are read again.
        assert!(matches!(s.poll_transmit(until), Transmit::Ship(e) if seqs(&e) == [3, 4]));
        s.handle_unsent(3);
        assert_eq!(s.sent(), 2);
        assert_eq!(s.poll_transmit(until), Transmit::Read(3));
        // And a stall is sent again after `RESEND_AFTER`.
        s.handle_loaded(3, vec![(3, value(3)), (4, value(4))]);
        assert!(matches!(s.poll_transmit(until), Transmit::Ship(_)));
        assert!(!s.handle_timeout(until + RESEND_AFTER / 2));
        assert!(s.handle_timeout(until + RESEND_AFTER * 2));
        assert_eq!(s.sent(), 2);
    }

    /// What a simulated step does (see [`Sim::step`]).
    #[derive(Debug, Clone)]
    enum Step {
        /// The sender's store takes this many entries, announced.
        Send(u8),
        /// The sender ships what it may.
        Pump,
        /// The next frame to the receiver arrives (and, if true, a copy of
        /// it stays in flight: a duplicate).
        Deliver(bool),
        /// The next reply to the sender arrives.
        Reply,
        /// The next frame to the receiver is lost.
        Drop,
        /// The two frames to the receiver at the front swap places.
        Swap,
        /// The link is replaced. `down`: the sender is told (a link-down)
        /// rather than finding a new link under it; `drain`: frames of the
        /// old link still arrive, interleaved with the new one's.
        Cut { down: bool, drain: bool },
        /// The receiver's next write fails (it nacks with a wait).
        Fail,
        /// The receiver is SIGKILLed and restarts from what it stored.
        RestartReceiver,
        /// The sender is SIGKILLed and restarts from its store.
        RestartSender,
        /// Virtual time passes (in quarter seconds).
        Tick(u8),
    }

    #[derive(Debug)]
    enum Frame {
        Ship { base: u64, entries: Vec<(u64, Bytes)> },
        Ack(u64),
        Nack { expected: u64, retry_after: Duration },
    }

    /// One sender's stream, its store, a link, and a receiver applying
    /// [`admit`] to what it gets, on a virtual clock.
    struct Sim {
        now: Instant,
        queue: Queue,
        stream: Stream,
        link: u64,
        /// Frames in flight, with the link that carries them.
        to_receiver: VecDeque<(u64, Frame)>,
        to_sender: VecDeque<(u64, Frame)>,
        /// The stream's pending store read.
        reading: Option<u64>,
        wake: Option<Instant>,
        /// What the receiver stored, in order, and its `done` (both durable).
        stored: Vec<(u64, Bytes)>,
        done: u64,
        fail_next: bool,
    }

    /// Frames the link's send queue takes before refusing more.
    const LINK_QUEUE: usize = 6;

    impl Sim {
        fn new() -> Self {
            let now = Instant::now();
            Self {
                now,
                queue: Queue::default(),
                stream: Stream::new(now),
                link: 1,
                to_receiver: VecDeque::new(),
                to_sender: VecDeque::new(),
                reading: None,
                wake: None,
                stored: Vec::new(),
                done: 0,
                fail_next: false,
            }
        }

        fn step(&mut self, step: &Step) {
            match *step {
                Step::Send(n) => {
                    for _ in 0..n {
                        let (seq, value) = self.queue.push();
                        self.stream.handle_announce(seq, value, true);
                    }
                }
                Step::Pump => self.pump(),
                Step::Deliver(dup) => {
                    let Some((link, frame)) = self.to_receiver.pop_front() else { return };
                    if dup {
                        if let Frame::Ship { base, entries } = &frame {
                            let copy = Frame::Ship { base: *base, entries: entries.clone() };
                            self.to_receiver.push_front((link, copy));
                        }
                    }
                    let reply = self.receive(frame);
                    self.to_sender.push_back((link, reply));
                }
                Step::Reply => {
                    if let Some((_, frame)) = self.to_sender.pop_front() {
                        self.reply(frame);
                    }
                }
                Step::Drop => {
                    self.to_receiver.pop_front();
                }
                Step::Swap => {
                    if self.to_receiver.len() >= 2 {
                        self.to_receiver.swap(0, 1);
                    }
                }
                Step::Cut { down, drain } => {
                    if !drain {
                        self.to_receiver.clear();
                        self.to_sender.clear();
                    }
                    self.link += 1;
                    if down {
                        self.stream.handle_link_down();
                    }
                }
                Step::Fail => self.fail_next = true,
                Step::RestartReceiver => {
                    self.to_receiver.clear();
                    self.to_sender.clear();
                    self.link += 1;
                    self.fail_next = false;
                }
                Step::RestartSender => {
                    self.to_receiver.clear();
                    self.to_sender.clear();
                    self.link += 1;
                    self.reading = None;
                    self.wake = None;
                    self.stream = Stream::new(self.now);
                    self.stream.handle_start(self.now, self.queue.head(), self.queue.tail);
                }
                Step::Tick(quarters) => self.advance(Duration::from_millis(250 * u64::from(quarters))),
            }
            self.check();
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            if self.wake.is_some_and(|t| t <= self.now) && self.stream.handle_wake(self.now) {
                self.wake = None;
            }
            self.stream.handle_timeout(self.now);
        }

        fn pump(&mut self) {
            if let Some(from) = self.reading.take() {
                self.stream.handle_loaded(from, self.queue.read(from));
            }
            self.stream.handle_link(self.link);
            loop {
                match self.stream.poll_transmit(self.now) {
                    Transmit::Ship(entries) => {
                        if self.to_receiver.len() >= LINK_QUEUE {
                            self.stream.handle_unsent(entries[0].0);
                            return;
                        }
                        let base = self.stream.acked();
                        self.to_receiver.push_back((self.link, Frame::Ship { base, entries }));
                    }
                    Transmit::Read(from) => {
                        self.reading = Some(from);
                        return;
                    }
                    Transmit::Wait | Transmit::Nothing => return,
                }
            }
        }

        /// The receiving broker's store: [`admit`], then the write.
        fn receive(&mut self, frame: Frame) -> Frame {
            let Frame::Ship { base, entries } = frame else { unreachable!("only shipments go this way") };
            let seqs: Vec<u64> = entries.iter().map(|(s, _)| *s).collect();
            match admit(self.done, base, 0, &seqs) {
                Admit::Store { from, to } => {
                    if std::mem::take(&mut self.fail_next) {
                        return Frame::Nack { expected: self.done + 1, retry_after: Duration::from_secs(1) };
                    }
                    self.stored.extend(entries.into_iter().filter(|(s, _)| (from..=to).contains(s)));
                    self.done = to;
                    Frame::Ack(to)
                }
                Admit::Duplicate { done } => Frame::Ack(done),
                Admit::Gap { expected } => Frame::Nack { expected, retry_after: Duration::ZERO },
                other => panic!("{other:?} from a lone sender shipping {seqs:?} over {base}"),
            }
        }

        fn reply(&mut self, frame: Frame) {
            match frame {
                Frame::Ack(up_to) => {
                    if self.stream.handle_ack(self.now, up_to) {
                        self.queue.delete_to(up_to);
                    }
                }
                Frame::Nack { expected, retry_after } => {
                    if let Some(until) = self.stream.handle_nack(self.now, expected, retry_after) {
                        self.wake = Some(until);
                    }
                }
                Frame::Ship { .. } => unreachable!("only replies go this way"),
            }
        }

        /// What the delivery contract says after every step: the receiver
        /// holds one sender's entries once each, in order, with no gap, and
        /// nothing deleted at the sender is missing there.
        fn check(&self) {
            for (i, (seq, v)) in self.stored.iter().enumerate() {
                assert_eq!(*seq, i as u64 + 1, "stored out of order, twice or past a gap: {:?}", seqs(&self.stored));
                assert_eq!(*v, value(*seq), "entry {seq} stored with another's value");
            }
            assert_eq!(self.stored.len() as u64, self.done);
            assert!(
                self.queue.head() <= self.done,
                "deleted at the sender up to {}, stored up to {}",
                self.queue.head(),
                self.done
            );
        }

        /// No more faults: runs the exchange until everything is delivered,
        /// letting time pass only when nothing is in flight. Returns how
        /// much virtual time it took.
        fn heal(&mut self) -> Duration {
            let start = self.now;
            for _ in 0..10_000 {
                self.pump();
                let idle = self.to_receiver.is_empty() && self.to_sender.is_empty() && self.reading.is_none();
                if idle && self.done == self.queue.tail && self.stream.settled() {
                    return self.now - start;
                }
                if !self.to_receiver.is_empty() {
                    self.step(&Step::Deliver(false));
                } else if !self.to_sender.is_empty() {
                    self.step(&Step::Reply);
                } else if idle {
                    self.advance(Duration::from_millis(250));
                }
            }
            panic!(
                "not delivered after the faults ended: stored up to {}, queue {:?}, {:?}",
                self.done, self.queue, self.stream
            );
        }
    }

    /// Faults a QUIC link gives: a link cut loses what it carried, a
    /// replaced one may still drain; no loss or reordering within one.
    fn link_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1..20u8).prop_map(Step::Send),
            6 => Just(Step::Pump),
            6 => any::<bool>().prop_map(Step::Deliver),
            5 => Just(Step::Reply),
            1 => (any::<bool>(), any::<bool>()).prop_map(|(down, drain)| Step::Cut { down, drain }),
            1 => Just(Step::Fail),
            1 => Just(Step::RestartReceiver),
            1 => Just(Step::RestartSender),
            1 => (1..8u8).prop_map(Step::Tick),
        ]
    }

    /// Those, and frames lost or reordered on a live link.
    fn lossy_step() -> impl Strategy<Value = Step> {
        prop_oneof![8 => link_step(), 1 => Just(Step::Drop), 1 => Just(Step::Swap)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Every acknowledged entry arrives once and in order, whatever
        /// the link and the restarts do; once the faults end, everything
        /// arrives.
        #[test]
        fn every_entry_arrives_once_and_in_order_through_any_faults(steps in proptest::collection::vec(lossy_step(), 1..300)) {
            let mut sim = Sim::new();
            for step in &steps {
                sim.step(step);
            }
            sim.heal();
        }

        /// With the faults a real link gives (cuts, replacements, restarts,
        /// duplicates, failed writes), shipping recovers at once: it never
        /// waits for the stall timeout (`RESEND_AFTER`), only for a
        /// receiver's asked-for wait.
        #[test]
        fn after_link_faults_shipping_recovers_without_waiting_for_the_stall_timeout(steps in proptest::collection::vec(link_step(), 1..300)) {
            let mut sim = Sim::new();
            for step in &steps {
                sim.step(step);
            }
            let took = sim.heal();
            prop_assert!(took < RESEND_AFTER, "took {:?} of virtual time", took);
        }
    }
}
