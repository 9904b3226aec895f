//! Three brokers on a virtual clock: one sender's messages to a device that
//! moves between two brokers, through every fault a mesh sees.
//!
//! alice's broker `S` ships her messages to bob's broker of the moment, `A`
//! or `B`. bob moves between them; the one he left hands what it holds of
//! his queue to the other (its own shipping stream, with itself as origin),
//! and the one he came to holds his delivery behind a fence until it has.
//! Every sending side is the real [`Stream`], every receiving side applies
//! the real [`admit`]; what lies between them (waiting for a handoff,
//! `HandoffRequest` and `HandoffDone`, the fence and its reordering by
//! stamp, deferring a shipment for a device that is elsewhere) follows
//! `mesh::settle`, `mesh::location` and the ship actor's `Routes`, with
//! their deadlines: a fence gives up after `HANDOFF_WAIT`, a wait for a
//! handoff after `UNANSWERED_WAIT`. Links drop, duplicate, reorder, are
//! cut (drained or not, noticed or not) and replaced; any broker is
//! SIGKILLed and restarts from what it persisted.
//!
//! After every step: nothing acknowledged is lost (each of alice's
//! messages is in some broker's store or was delivered), and bob has
//! received her messages in the order sent, once each after his client's
//! dedup (but see the open defect at the end of the file). The order is
//! checked only where no wait was given up (the one
//! case where the design lets order give way to delivery: docs/mesh.md);
//! most runs give up none, and the test says how many did not. Once the
//! faults end, everything is delivered.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use tern_protocol::shipping::{admit, Admit};

use super::location::HANDOFF_WAIT;
use super::outbox::{Stream, Transmit};
use super::settle::UNANSWERED_WAIT;

type Node = usize;

/// alice's broker; bob's are 1 (`A`) and 2 (`B`).
const S: Node = 0;
const NODES: usize = 3;
/// A wait for a handoff asks again after this long (`mesh::settle`).
const ASK_AGAIN: Duration = Duration::from_secs(1);
/// Frames a link's send queue takes before refusing more shipments.
const LINK_QUEUE: usize = 8;
/// How often the ship actor sweeps (`ship::SWEEP`).
const SWEEP: Duration = Duration::from_secs(3);
/// A deferred queue is looked up again after this long (`routes::DEFER_RETRY`).
const DEFER_RETRY: Duration = Duration::from_millis(100);

fn value(n: u64) -> Bytes {
    Bytes::copy_from_slice(&n.to_be_bytes())
}

fn number(v: &Bytes) -> u64 {
    u64::from_be_bytes(v[..8].try_into().expect("an 8-byte value"))
}

fn other(x: Node) -> Node {
    3 - x
}

/// A store's queue: entries `head + 1 ..= tail`, durable.
#[derive(Default)]
struct Queue {
    entries: BTreeMap<u64, Bytes>,
    tail: u64,
}

impl Queue {
    fn push(&mut self, value: Bytes) -> u64 {
        self.tail += 1;
        self.entries.insert(self.tail, value);
        self.tail
    }

    fn read(&self, from: u64) -> Vec<(u64, Bytes)> {
        self.entries.range(from..).take(64).map(|(s, v)| (*s, v.clone())).collect()
    }

    fn delete_to(&mut self, up_to: u64) {
        self.entries = self.entries.split_off(&(up_to + 1));
    }

    fn head(&self) -> u64 {
        self.entries.keys().next().map_or(self.tail, |s| s - 1)
    }

    /// The fence's reorder: one sender's entries put in the order of their
    /// stamps (here, alice's numbers), appended anew after the tail
    /// (`store::writer::fence`): a seq's value never changes, since another
    /// broker may have stored it and skips it when shipped it again.
    fn reorder(&mut self) {
        let values: Vec<Bytes> = self.entries.values().cloned().collect();
        let mut sorted = values.clone();
        sorted.sort_by_key(number);
        if sorted == values {
            return;
        }
        self.entries.clear();
        for v in sorted {
            self.push(v);
        }
    }
}

/// Seqs and alice's numbers, not bytes.
impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let numbers: Vec<(u64, u64)> = self.entries.iter().map(|(s, v)| (*s, number(v))).collect();
        write!(f, "tail {} {:?}", self.tail, numbers)
    }
}

#[derive(Debug, Clone)]
enum Frame {
    Ship {
        base: u64,
        handed: Option<(Node, u64)>,
        entries: Vec<(u64, Bytes)>,
    },
    Ack(u64),
    Nack {
        expected: u64,
        retry: Duration,
    },
    Defer,
    /// The directory's notice: bob logged in at `to`, coming from `from`.
    Moved {
        to: Node,
        from: Node,
    },
    HandoffRequest(u64),
    HandoffDone(u64),
}

/// Shipping the broker's queue to where bob is.
#[derive(Debug)]
struct Out {
    dest: Node,
    stream: Stream,
    /// Owe `dest` a `HandoffDone(0)` once everything is acknowledged.
    handoff: bool,
}

/// Waiting for `via`'s handoff (`mesh::settle::Settling`).
#[derive(Debug)]
struct Settling {
    /// Per origin: the seq to settle, and the request covering it.
    deps: HashMap<Node, (u64, Option<u64>)>,
    since: Instant,
    asked: Option<Instant>,
}

/// bob logged in here: until `from` has handed over, his session delivers
/// nothing (`Mesh::hold_for_handback`). It outlives the session: when it
/// ends, what came back meanwhile is still put in order.
#[derive(Debug)]
struct Fence {
    /// Held by bob's current session (it delivers once this is lifted).
    session: bool,
    from: Node,
    /// Waiting for `from`'s `HandoffDone(0)` (shipments from others are
    /// deferred), or asking it (`HandoffRequest` with this id, sent then).
    asking: Option<(u64, Instant)>,
    until: Instant,
    /// The queue's tail when the fence went up.
    before: u64,
}

#[derive(Debug, Default)]
struct Broker {
    // Durable.
    queue: Queue,
    done: [u64; NODES],
    /// The broker that last acknowledged entries of the queue.
    handed: Option<(Node, u64)>,
    /// The queue's tail when its first fence still up went up, kept in
    /// the store until the last is lifted (`store::writer::fence`): after
    /// a restart, the next fence counts from there.
    fence_start: Option<u64>,
    // Lost in a restart.
    out: Option<Out>,
    reading: Option<u64>,
    wake: Option<Instant>,
    /// Deferred: look bob up again then, ship nothing before.
    relook: Option<Instant>,
    settling: HashMap<Node, Settling>,
    /// Brokers waiting for what is held here: (asker, id, tail then).
    asks: Vec<(Node, u64, u64)>,
    fences: Vec<Fence>,
    next_id: u64,
}

impl Broker {
    /// The first fence of the queue goes up: it counts from the tail, or
    /// from the start of the fence that died with the last run.
    fn put_up_fence(&mut self) -> u64 {
        let before = self.fence_start.map_or(self.queue.tail, |dead| dead.min(self.queue.tail));
        self.fence_start = Some(before);
        before
    }

    fn request_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// What a simulated step does.
#[derive(Debug, Clone)]
enum Step {
    /// alice sends this many messages (stored at `S`).
    Send(u8),
    Pump(Node),
    /// The next frame on a directed link arrives (a copy stays in flight).
    Deliver {
        wire: u8,
        dup: bool,
    },
    Drop(u8),
    Swap(u8),
    /// The link between a pair is replaced (see the two-broker sim).
    Cut {
        pair: u8,
        down: bool,
        drain: bool,
    },
    /// bob logs in at the broker he is not at.
    Move,
    /// bob's client takes this many entries.
    Consume(u8),
    /// SIGKILL and restart from the store.
    Restart(Node),
    Sweep,
    /// Virtual time passes (quarter seconds).
    Tick(u8),
}

/// A directed link from its index.
fn wire(i: u8) -> (Node, Node) {
    [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)][usize::from(i % 6)]
}

struct Sim {
    now: Instant,
    brokers: [Broker; NODES],
    /// Where bob is logged in.
    bob: Node,
    /// Link ids per unordered pair, bumped when a link is replaced.
    links: [[u64; NODES]; NODES],
    wires: [[VecDeque<(u64, Frame)>; NODES]; NODES],
    sent: u64,
    /// What bob's client received, after dedup, in order.
    got: Vec<u64>,
    seen: HashSet<u64>,
    /// A fence or a wait for a handoff was given up at its deadline.
    gave_up: bool,
    last_sweep: Instant,
}

impl Sim {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            now,
            brokers: Default::default(),
            bob: 1,
            links: [[1; NODES]; NODES],
            wires: Default::default(),
            sent: 0,
            got: Vec::new(),
            seen: HashSet::new(),
            gave_up: false,
            last_sweep: now,
        }
    }

    fn link(&self, a: Node, b: Node) -> u64 {
        self.links[a.min(b)][a.max(b)]
    }

    fn send(&mut self, from: Node, to: Node, frame: Frame) {
        let link = self.link(from, to);
        self.wires[from][to].push_back((link, frame));
    }

    fn step(&mut self, step: &Step) {
        match *step {
            Step::Send(n) => {
                for _ in 0..n {
                    self.sent += 1;
                    let b = &mut self.brokers[S];
                    let seq = b.queue.push(value(self.sent));
                    assert_eq!(seq, self.sent);
                    match &mut b.out {
                        Some(out) => out.stream.handle_announce(seq, value(seq), true),
                        None => self.relocate(S, false),
                    }
                }
            }
            Step::Pump(x) => self.pump(x % NODES),
            Step::Deliver { wire: w, dup } => {
                let (from, to) = wire(w);
                let Some((link, frame)) = self.wires[from][to].pop_front() else { return };
                if dup && matches!(frame, Frame::Ship { .. }) {
                    self.wires[from][to].push_front((link, frame.clone()));
                }
                self.receive(to, from, link, frame);
            }
            Step::Drop(w) => {
                let (from, to) = wire(w);
                self.wires[from][to].pop_front();
            }
            Step::Swap(w) => {
                let (from, to) = wire(w);
                if self.wires[from][to].len() >= 2 {
                    self.wires[from][to].swap(0, 1);
                }
            }
            Step::Cut { pair, down, drain } => {
                let (a, b) = wire(pair * 2);
                self.links[a.min(b)][a.max(b)] += 1;
                if !drain {
                    self.wires[a][b].clear();
                    self.wires[b][a].clear();
                }
                if down {
                    for (x, y) in [(a, b), (b, a)] {
                        if let Some(out) = self.brokers[x].out.as_mut().filter(|o| o.dest == y) {
                            out.stream.handle_link_down();
                        }
                    }
                }
            }
            Step::Move => self.move_bob(),
            Step::Consume(k) => self.consume(usize::from(k)),
            Step::Restart(x) => self.restart(x % NODES),
            Step::Sweep => self.sweep(),
            Step::Tick(quarters) => self.advance(Duration::from_millis(250 * u64::from(quarters))),
        }
        self.check();
    }

    /// bob logs in at the other broker: his session at the one he left
    /// ends, the new one fences his queue and the directory tells `S` and
    /// the broker he left.
    fn move_bob(&mut self) {
        let (from, to) = (self.bob, other(self.bob));
        self.bob = to;
        let now = self.now;
        // The session that ended no longer waits for the move's handoff;
        // its fence asks for what is held elsewhere until its deadline.
        let b = &mut self.brokers[from];
        let mut asks = Vec::new();
        for i in 0..b.fences.len() {
            b.fences[i].session = false;
            if b.fences[i].asking.is_none() {
                let id = b.request_id();
                b.fences[i].asking = Some((id, now));
                asks.push((b.fences[i].from, id));
            }
        }
        for (node, id) in asks {
            self.send(from, node, Frame::HandoffRequest(id));
        }
        let b = &mut self.brokers[to];
        // Attached: its session delivers from the queue, nothing ships.
        b.out = None;
        b.reading = None;
        for f in &mut b.fences {
            f.session = false;
        }
        // A fence on a queue still fenced counts from the first one still
        // up (`store::writer::fence`): what came back during that one is
        // put in order when this one lifts, even if that one is still up.
        let before = match b.fences.iter().map(|f| f.before).min() {
            Some(before) => before,
            None => b.put_up_fence(),
        };
        b.fences.push(Fence { session: true, from, asking: None, until: now + HANDOFF_WAIT, before });
        self.send(to, S, Frame::Moved { to, from });
        self.send(to, from, Frame::Moved { to, from });
    }

    fn consume(&mut self, k: usize) {
        let b = &mut self.brokers[self.bob];
        if b.fences.iter().any(|f| f.session) {
            return;
        }
        for _ in 0..k {
            let Some((_, v)) = b.queue.entries.pop_first() else { return };
            let n = number(&v);
            if self.seen.insert(n) {
                self.got.push(n);
            }
        }
    }

    fn restart(&mut self, x: Node) {
        let now = self.now;
        let b = &mut self.brokers[x];
        b.out = None;
        b.reading = None;
        b.wake = None;
        b.relook = None;
        b.settling.clear();
        b.asks.clear();
        b.next_id = 0;
        b.fences.clear();
        for y in 0..NODES {
            if y != x {
                self.links[x.min(y)][x.max(y)] += 1;
                self.wires[x][y].clear();
                self.wires[y][x].clear();
            }
        }
        if x != self.bob {
            return;
        }
        // bob logs in again: the directory names this broker, so only the
        // broker the store says last took entries is asked.
        let b = &mut self.brokers[x];
        let before = b.put_up_fence();
        if let Some((holder, _)) = b.handed.filter(|(h, _)| *h != x) {
            let id = b.request_id();
            let fence =
                Fence { session: true, from: holder, asking: Some((id, now)), until: now + HANDOFF_WAIT, before };
            b.fences.push(fence);
            self.send(x, holder, Frame::HandoffRequest(id));
        } else {
            // Nothing to wait for: the fence is lifted at once.
            b.fence_start = None;
            if b.queue.tail > before {
                b.queue.reorder();
            }
        }
    }

    /// Looks bob up (the directory answers right) and ships there from
    /// what the store holds (`Routes::handle_resolved`).
    fn relocate(&mut self, x: Node, handoff: bool) {
        let (now, dest) = (self.now, self.bob);
        let b = &mut self.brokers[x];
        if dest == x {
            b.out = None;
            return;
        }
        let (head, tail) = (b.queue.head(), b.queue.tail);
        let out = b.out.get_or_insert_with(|| Out { dest, stream: Stream::new(now), handoff: false });
        out.dest = dest;
        out.handoff |= handoff;
        out.stream.handle_start(now, head, tail);
        self.pump(x);
    }

    fn pump(&mut self, x: Node) {
        let now = self.now;
        let Some(dest) = self.brokers[x].out.as_ref().map(|o| o.dest) else { return };
        let link = self.link(x, dest);
        let mut frames = Vec::new();
        let b = &mut self.brokers[x];
        let Some(out) = b.out.as_mut() else { return };
        if let Some(from) = b.reading.take() {
            out.stream.handle_loaded(from, b.queue.read(from));
        }
        if b.relook.is_some() {
            return;
        }
        out.stream.handle_link(link);
        let queued = self.wires[x][dest].len();
        loop {
            match out.stream.poll_transmit(now) {
                Transmit::Ship(entries) => {
                    if queued + frames.len() >= LINK_QUEUE {
                        out.stream.handle_unsent(entries[0].0);
                        break;
                    }
                    let handed = b.handed.filter(|(n, _)| *n != dest);
                    frames.push(Frame::Ship { base: out.stream.acked(), handed, entries });
                }
                Transmit::Read(from) => {
                    b.reading = Some(from);
                    break;
                }
                Transmit::Wait => break,
                Transmit::Nothing => {
                    if out.stream.settled() {
                        if std::mem::take(&mut out.handoff) {
                            frames.push(Frame::HandoffDone(0));
                        }
                        let acked = out.stream.acked();
                        b.asks.retain(|&(asker, id, tail)| {
                            let answered = asker == dest && tail <= acked;
                            if answered {
                                frames.push(Frame::HandoffDone(id));
                            }
                            !answered
                        });
                    }
                    break;
                }
            }
        }
        for f in frames {
            self.send(x, dest, f);
        }
    }

    /// Broker `x` takes a frame from `y` that came on `link`.
    fn receive(&mut self, x: Node, y: Node, link: u64, frame: Frame) {
        let now = self.now;
        match frame {
            Frame::Ship { base, handed, entries } => {
                let reply = self.store_ship(x, y, base, handed, entries);
                self.wires[x][y].push_back((link, reply));
            }
            Frame::Ack(up_to) => {
                let b = &mut self.brokers[x];
                let Some(out) = b.out.as_mut().filter(|o| o.dest == y) else { return };
                if !out.stream.handle_ack(now, up_to) {
                    return;
                }
                b.queue.delete_to(up_to);
                b.handed = Some((y, up_to));
                self.pump(x);
            }
            Frame::Nack { expected, retry } => {
                let b = &mut self.brokers[x];
                let Some(out) = b.out.as_mut().filter(|o| o.dest == y) else { return };
                match out.stream.handle_nack(now, expected, retry) {
                    Some(at) => b.wake = Some(b.wake.map_or(at, |w| w.min(at))),
                    None => self.pump(x),
                }
            }
            Frame::Defer => {
                let b = &mut self.brokers[x];
                let Some(out) = b.out.as_mut().filter(|o| o.dest == y) else { return };
                out.stream.handle_defer();
                b.relook.get_or_insert(now + DEFER_RETRY);
            }
            Frame::Moved { to, from } => {
                if to != x && to == self.bob {
                    self.relocate(x, from == x);
                }
            }
            Frame::HandoffRequest(id) => {
                let b = &mut self.brokers[x];
                if b.queue.entries.is_empty() {
                    self.send(x, y, Frame::HandoffDone(id));
                    return;
                }
                b.asks.push((y, id, b.queue.tail));
                if b.out.as_ref().is_some_and(|o| o.dest == y) {
                    self.pump(x);
                } else if self.bob != x {
                    self.relocate(x, false);
                }
            }
            Frame::HandoffDone(id) => {
                let b = &mut self.brokers[x];
                // Handed back: `y` no longer holds what it took from here.
                if b.handed.is_some_and(|(n, _)| n == y) {
                    b.handed = None;
                }
                if id == 0 {
                    // The move's handoff is done: ask once more, for what
                    // was shipped there just before (`hold_for_handback`).
                    let mut asks = Vec::new();
                    for i in 0..b.fences.len() {
                        if b.fences[i].from == y && b.fences[i].asking.is_none() {
                            let id = b.request_id();
                            b.fences[i].asking = Some((id, now));
                            asks.push(id);
                        }
                    }
                    for id in asks {
                        self.send(x, y, Frame::HandoffRequest(id));
                    }
                    return;
                }
                if let Some(i) = b.fences.iter().position(|f| f.from == y && f.asking.is_some_and(|(a, _)| a == id)) {
                    self.lift_fence(x, i);
                }
                let b = &mut self.brokers[x];
                if let Some(s) = b.settling.get_mut(&y) {
                    let mut settled = Vec::new();
                    s.deps.retain(|origin, (up_to, dep)| {
                        let covered = dep.is_some_and(|d| d <= id);
                        if covered {
                            settled.push((*origin, *up_to));
                        }
                        !covered
                    });
                    if s.deps.is_empty() {
                        b.settling.remove(&y);
                    }
                    for (origin, up_to) in settled {
                        b.done[origin] = b.done[origin].max(up_to);
                    }
                }
            }
        }
    }

    /// `mesh::Mesh::on_ship` and the store's write: defer, or [`admit`].
    fn store_ship(
        &mut self,
        x: Node,
        y: Node,
        base: u64,
        handed: Option<(Node, u64)>,
        entries: Vec<(u64, Bytes)>,
    ) -> Frame {
        let now = self.now;
        let b = &mut self.brokers[x];
        let waiting_move = b.fences.iter().any(|f| f.session && f.asking.is_none() && f.from != y);
        if self.bob != x || waiting_move {
            return Frame::Defer;
        }
        let seqs: Vec<u64> = entries.iter().map(|(s, _)| *s).collect();
        let handed_up_to = handed.map_or(0, |(_, up_to)| up_to);
        match admit(b.done[y], base, handed_up_to, &seqs) {
            Admit::Store { from, to } => {
                for (_, v) in entries.into_iter().filter(|(s, _)| (from..=to).contains(s)) {
                    b.queue.push(v);
                }
                b.done[y] = to;
                Frame::Ack(to)
            }
            Admit::Duplicate { done } => Frame::Ack(done),
            Admit::Gap { expected } => Frame::Nack { expected, retry: Duration::ZERO },
            Admit::Wait { up_to, expected } => {
                let via = handed.expect("a wait names the broker waited for").0;
                let s = b.settling.entry(via).or_insert(Settling { deps: HashMap::new(), since: now, asked: None });
                let dep = s.deps.entry(y).or_insert((0, None));
                if up_to > dep.0 {
                    *dep = (up_to, None);
                }
                let waited = now - s.since;
                if waited > UNANSWERED_WAIT {
                    self.gave_up = true;
                    let s = b.settling.remove(&via).expect("just looked at");
                    for (origin, (up_to, _)) in s.deps {
                        b.done[origin] = b.done[origin].max(up_to);
                    }
                    return Frame::Nack { expected, retry: Duration::ZERO };
                }
                if s.deps.values().any(|d| d.1.is_none()) || s.asked.is_none_or(|t| now - t > ASK_AGAIN) {
                    let id = b.request_id();
                    let s = b.settling.get_mut(&via).expect("just made");
                    s.asked = Some(now);
                    s.deps.values_mut().filter(|d| d.1.is_none()).for_each(|d| d.1 = Some(id));
                    self.send(x, via, Frame::HandoffRequest(id));
                }
                let retry = (waited / 2).clamp(Duration::from_millis(250), Duration::from_secs(3));
                Frame::Nack { expected, retry }
            }
            Admit::Malformed => panic!("a stream shipped {seqs:?}"),
        }
    }

    /// The handoff is over: what came back goes in alice's order, and
    /// bob's session delivers.
    fn lift_fence(&mut self, x: Node, i: usize) {
        let b = &mut self.brokers[x];
        let fence = b.fences.remove(i);
        if b.fences.is_empty() {
            b.fence_start = None;
        }
        // Only for the session still here, before it delivers: once it has
        // ended, the queue may be shipping elsewhere, and moving entries
        // under seqs already shipped or pushed would lose some and repeat
        // others (`Mesh::hold_for_handback`).
        if fence.session && b.queue.tail > fence.before {
            b.queue.reorder();
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        let now = self.now;
        for x in 0..NODES {
            if self.brokers[x].relook.is_some_and(|t| t <= now) {
                self.brokers[x].relook = None;
                self.relocate(x, false);
            }
            let b = &mut self.brokers[x];
            if let Some(out) = b.out.as_mut() {
                if b.wake.is_some_and(|t| t <= now) && out.stream.handle_wake(now) {
                    b.wake = None;
                }
                out.stream.handle_timeout(now);
            }
            // A fence asks again each second, and gives up at its deadline.
            while let Some(i) = self.brokers[x].fences.iter().position(|f| now >= f.until) {
                self.gave_up = true;
                self.lift_fence(x, i);
            }
            let b = &mut self.brokers[x];
            let mut asks = Vec::new();
            for i in 0..b.fences.len() {
                if b.fences[i].asking.is_some_and(|(_, at)| now - at >= ASK_AGAIN) {
                    let id = b.request_id();
                    b.fences[i].asking = Some((id, now));
                    asks.push((b.fences[i].from, id));
                }
            }
            for (node, id) in asks {
                self.send(x, node, Frame::HandoffRequest(id));
            }
        }
        if now - self.last_sweep >= SWEEP {
            self.sweep();
        }
    }

    /// The ship actor's sweep: asks answered by what is gone, queues with
    /// entries and no shipping looked up, stalled or settled ones pumped.
    fn sweep(&mut self) {
        self.last_sweep = self.now;
        for x in 0..NODES {
            let b = &mut self.brokers[x];
            let head = b.queue.head();
            let mut answered = Vec::new();
            b.asks.retain(|&(asker, id, tail)| {
                let gone = tail <= head;
                if gone {
                    answered.push((asker, id));
                }
                !gone
            });
            for (asker, id) in answered {
                self.send(x, asker, Frame::HandoffDone(id));
            }
            if x == self.bob {
                continue;
            }
            let b = &mut self.brokers[x];
            let tail = b.queue.tail;
            match b.out.as_mut() {
                Some(out) => {
                    out.stream.handle_tail(tail);
                    self.pump(x);
                }
                None if !b.queue.entries.is_empty() => self.relocate(x, false),
                None => {}
            }
        }
    }

    /// The delivery contract, after every step.
    fn check(&self) {
        if !self.gave_up {
            for (i, n) in self.got.iter().enumerate() {
                assert_eq!(*n, i as u64 + 1, "bob got alice's messages out of order: {:?}", self.got);
            }
        }
        let held: HashSet<u64> = self
            .brokers
            .iter()
            .flat_map(|b| b.queue.entries.values().map(number))
            .chain(self.got.iter().copied())
            .collect();
        if let Some(n) = (1..=self.sent).find(|n| !held.contains(n)) {
            panic!("message {n} was acknowledged and is nowhere: {self:?}");
        }
    }

    fn idle(&self) -> bool {
        self.wires.iter().flatten().all(VecDeque::is_empty) && self.brokers.iter().all(|b| b.reading.is_none())
    }

    /// No more faults: runs everything until bob has every message,
    /// letting time pass only when nothing is in flight.
    fn heal(&mut self) {
        for _ in 0..50_000 {
            for x in 0..NODES {
                self.pump(x);
            }
            self.consume(usize::MAX);
            let delivered = self.got.len() as u64 == self.sent;
            if self.idle() && delivered && self.brokers.iter().all(|b| b.queue.entries.is_empty()) {
                return;
            }
            // One frame from every link with some in flight, so that no
            // link starves the others; time passes once all are idle.
            for w in 0..6u8 {
                let (from, to) = wire(w);
                if !self.wires[from][to].is_empty() {
                    self.step(&Step::Deliver { wire: w, dup: false });
                }
            }
            if self.idle() {
                self.advance(Duration::from_millis(250));
            }
        }
        panic!(
            "not delivered after the faults ended: bob at {}, got {} of {}, {:?}",
            self.bob,
            self.got.len(),
            self.sent,
            self.brokers
        );
    }
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("bob", &self.bob).field("brokers", &self.brokers).finish()
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1..6u8).prop_map(Step::Send),
        6 => (0..3usize).prop_map(Step::Pump),
        10 => (0..6u8, any::<bool>()).prop_map(|(wire, dup)| Step::Deliver { wire, dup: dup && wire % 3 == 0 }),
        1 => (0..6u8).prop_map(Step::Drop),
        1 => (0..6u8).prop_map(Step::Swap),
        1 => (0..3u8, any::<bool>(), any::<bool>()).prop_map(|(pair, down, drain)| Step::Cut { pair, down, drain }),
        2 => Just(Step::Move),
        3 => (1..4u8).prop_map(Step::Consume),
        1 => (0..3usize).prop_map(Step::Restart),
        1 => Just(Step::Sweep),
        2 => (1..5u8).prop_map(Step::Tick),
    ]
}

/// Every message alice's broker acknowledged reaches bob once, in order,
/// through moves, link faults and restarts of any of the three brokers;
/// once the faults end, all of them arrive.
#[test]
fn a_senders_messages_reach_a_moving_device_once_and_in_order_through_any_faults() {
    let cases: u32 = std::env::var("TERN_SIM_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(4096);
    let ordered = Cell::new(0u32);
    // A fixed seed: the cases CI runs are the same each time (a random
    // seed found the open defect below; `TERN_SIM_RANDOM=1` explores).
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = if std::env::var_os("TERN_SIM_RANDOM").is_some() {
        TestRunner::new(config)
    } else {
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
    };
    let result = runner.run(&proptest::collection::vec(step(), 1..300), |steps| {
        let mut sim = Sim::new();
        for s in &steps {
            sim.step(s);
        }
        sim.heal();
        if !sim.gave_up {
            ordered.set(ordered.get() + 1);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!("order checked in {} of {cases} runs", ordered.get());
    // Order is checked only where nothing was given up: most runs.
    assert!(ordered.get() > cases / 2, "order checked in only {} of {cases} runs", ordered.get());
}

/// Issue 11, found by a random seed of the test above: bob's broker A is
/// SIGKILLed while his login's fence is up and an older entry of alice's
/// (1) has come back from B behind newer ones (2..5) during it. The fence
/// was in memory only, so it died with the process before its reorder, and
/// the next login's fence counted from the restart: bob got newer messages
/// of alice's before older ones. The store now keeps a fence's start until
/// it is lifted, and the next fence after a restart counts from it.
#[test]
fn a_fence_that_dies_with_its_broker_still_has_what_came_back_put_in_order() {
    use Step::*;
    let d = |wire| Deliver { wire, dup: false };
    let steps = [
        Send(1),
        Send(1),
        Pump(0),
        d(0),
        Move,
        Drop(5),
        Send(1),
        Sweep,
        Pump(1),
        d(4),
        d(5),
        Send(1),
        d(3),
        Consume(1),
        Pump(0),
        Move,
        Restart(1),
        Send(1),
        d(2),
        d(4),
        d(3),
        Tick(4),
        Send(1),
        Pump(0),
        d(4),
        d(0),
        d(5),
        d(5),
        Pump(0),
        Restart(1),
        Consume(1),
        Pump(0),
        Consume(1),
        Pump(0),
        Pump(0),
        Pump(0),
        Consume(1),
    ];
    replay(&steps);
}

/// Found by a random seed of the test above once a fence's start outlived
/// a restart (which makes reorders more frequent): B (2) shipped alice's 1
/// and 2 to A (1), whose acknowledgement was lost; bob came to B, and A
/// handed both back (B: seqs 1..4 = 1, 2, 1, 2). B restarted and, at bob's
/// login, put its queue in order *in place*: seqs 1..4 = 1, 1, 2, 2. When
/// bob moved to A again, B shipped from seq 1 and A, having stored B's
/// seqs 1 and 2 before, skipped them as resent: it stored 2, 2, and alice's
/// 1 was lost. A reorder now appends the queue anew after its tail (no
/// seq's value changes). By the same steps without a restart it could
/// happen at any handoff whose acknowledgement was lost.
#[test]
fn a_reorder_never_changes_what_a_seq_holds_another_broker_may_have_stored() {
    use Step::*;
    let d = |wire| Deliver { wire, dup: false };
    let steps = [
        Move,
        Move,
        Move,
        Consume(1),
        Restart(2),
        Send(1),
        Send(1),
        Pump(0),
        d(2),
        Sweep,
        Move,
        Sweep,
        d(3),
        Send(1),
        Sweep,
        Move,
        Move,
        d(5),
        Move,
        Move,
        Restart(1),
        Restart(0),
        Tick(1),
        Send(1),
        Send(1),
        Send(1),
        Move,
        Send(1),
        Move,
        Drop(4),
        d(5),
        d(5),
        Move,
        d(4),
        d(5),
        Pump(1),
        d(4),
        d(5),
        Restart(2),
        Move,
        Send(1),
        Send(1),
        Send(1),
        Send(1),
    ];
    replay(&steps);
}

/// Runs `steps`, then heals every fault and lets everything arrive; the
/// checks after each step panic on a loss, a duplicate or a reorder.
fn replay(steps: &[Step]) {
    let mut sim = Sim::new();
    for s in steps {
        sim.step(s);
    }
    sim.heal();
}
