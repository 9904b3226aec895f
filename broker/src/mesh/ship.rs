//! The outbox: moving queue entries to the broker where their device is.
//!
//! Every send is stored at the sender's broker first (durable before the
//! ack), in the recipient device's queue there. When that device is not
//! connected here, the queue *is* the outbox: the ship actor finds where
//! the device is (directory), sends the entries in seq order on the peer
//! link (`Ship`), and deletes them here only when the other broker answers
//! with a `ShipAck` after its own durable write. So a SIGKILL of either end
//! loses nothing: unacknowledged entries are still here and are sent again;
//! the receiver stores each `(origin store, queue, seq)` once.
//!
//! Entries are shipped as soon as they are written here, while their WAL
//! sync runs (the sender's ack still waits for it). Only a crash of the
//! machine can lose an entry already shipped; the store then takes a new
//! origin id (`Store::open`), so the receiver does not skip the reused seqs.
//!
//! The same mechanism hands a queue held for an offline device to the
//! broker where the device reconnects (the new broker writes, then this one
//! deletes).
//!
//! Inputs: the router's notice that an entry was queued for a device not
//! connected here, ship acks, `Moved` notices, link changes, and a periodic
//! sweep that re-sends what was not acknowledged and picks up queues left
//! over from before a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_protocol::peer::{peer_frame::Kind as P, PeerFrame, Ship, ShipEntry};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::directory::{newest, Location, UNKNOWN_TTL};
use super::outbox::{Stream, Transmit, BATCH_BYTES, BATCH_ITEMS};
use super::Mesh;
use crate::router::Router;
use crate::store::{QueueBounds, QueueKey, Store};

/// How often queues with no known destination are looked up again, and the
/// store is swept for queues this actor does not know of.
const SWEEP_EVERY: Duration = Duration::from_secs(3);

/// Input to the ship actor.
#[derive(Debug)]
pub(crate) enum ShipMsg {
    /// An entry was queued here (written, its sync perhaps still under way)
    /// for a device not connected here.
    Queued {
        queue: QueueKey,
        seq: u64,
        value: Bytes,
    },
    /// `node` stored this queue's entries up to `up_to`.
    Acked {
        node: String,
        queue: QueueKey,
        up_to: u64,
    },
    /// The device logged in at another broker; `handoff`: it was here
    /// before, and the new broker waits for this one's `HandoffDone`.
    Moved {
        queue: QueueKey,
        location: Location,
        handoff: bool,
    },
    /// `node` did not store this queue's entries (the device is elsewhere, or
    /// it waits for another broker's handoff): look it up again, resend.
    Deferred {
        node: String,
        queue: QueueKey,
    },
    /// `node` stored nothing of a shipment: it needs `expected` next (0:
    /// unknown, the store failed); resend no sooner than `retry_after`.
    Nacked {
        node: String,
        queue: QueueKey,
        expected: u64,
        retry_after: Duration,
    },
    /// `node` asks for everything held here for the queue (it waits for it
    /// before storing newer entries another broker shipped it), and a
    /// `HandoffDone` with `id` when nothing from before the ask is left.
    HandoffAsked {
        node: String,
        queue: QueueKey,
        id: u64,
    },
    /// The queue's bounds when `node`'s ask `id` came.
    AskBounds {
        node: String,
        queue: QueueKey,
        id: u64,
        bounds: QueueBounds,
    },
    /// A hold on the queue (after a nack) is over: ship again.
    Wake(QueueKey),
    /// `node` handed over to this broker everything it held of the queue
    /// (`HandoffDone`): it no longer holds entries shipped from here, so
    /// receivers need not wait for it.
    Returned {
        node: String,
        queue: QueueKey,
    },
    /// A location lookup finished; `bounds` are the queue's current ones and
    /// `handed` the broker that last stored its entries (from the store);
    /// `failed`: the directory owner could not be asked.
    Resolved {
        queue: QueueKey,
        location: Option<Location>,
        bounds: QueueBounds,
        handed: Option<(String, u64)>,
        failed: bool,
    },
    /// A store read of the queue's entries from `from` on finished.
    Read {
        queue: QueueKey,
        from: u64,
        read: Result<Vec<(u64, Bytes)>, crate::store::StoreError>,
    },
    LinkUp(String),
    LinkDown(String),
    /// The queue's device logged in here: stop shipping the queue now, so a
    /// late acknowledgement of what was in flight deletes nothing (the
    /// queue may be reordered after its handoff; see `hold_for_handback`).
    Attached {
        queue: QueueKey,
        done: oneshot::Sender<()>,
    },
    /// A device that sent entries of this queue (up to `up_to`) logged in
    /// at `holder`: get them stored at the queue's destination, or at
    /// `holder` if that is unknown or unreachable, then say `done` (see
    /// [`flush`](super::flush)).
    Flush {
        queue: QueueKey,
        up_to: u64,
        holder: String,
        done: oneshot::Sender<()>,
    },
}

/// What the router tells of entries for devices not connected here: they
/// go to the ship actor.
pub(crate) struct Outbox(pub(crate) mpsc::Sender<ShipMsg>);

impl crate::store::QueueListener for Outbox {
    fn queued(&self, queue: &QueueKey, seq: u64, value: &Bytes) {
        // A full channel is caught up by the ship actor's sweep.
        let _ = self.0.try_send(ShipMsg::Queued { queue: queue.clone(), seq, value: value.clone() });
    }
}

/// Per destination node ("" for queues held for lack of one): queues and
/// entries in flight, as the ship actor last counted them.
#[derive(Debug, Default, Clone)]
pub(crate) struct OutboxGauge(Arc<Mutex<HashMap<String, OutboxCount>>>);

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OutboxCount {
    pub(crate) queues: u64,
    pub(crate) in_flight: u64,
}

impl OutboxGauge {
    pub(crate) fn get(&self, node: &str) -> OutboxCount {
        self.0.lock().map(|m| m.get(node).copied().unwrap_or_default()).unwrap_or_default()
    }

    fn set(&self, counts: HashMap<String, OutboxCount>) {
        if let Ok(mut m) = self.0.lock() {
            *m = counts;
        }
    }
}

/// A queue with nothing in flight is forgotten after this long without
/// traffic (looked up again on its next entry).
const IDLE_FORGET: Duration = Duration::from_secs(60);

/// Delay before a deferred queue is looked up and sent again.
const DEFER_RETRY: Duration = Duration::from_millis(100);

/// How often a held queue's device is looked up again.
const HELD_RETRY: Duration = Duration::from_secs(30);

/// A broker's ask for what is held here (see [`ShipMsg::HandoffAsked`]).
#[derive(Debug)]
struct Ask {
    node: String,
    id: u64,
    /// The queue's tail when it asked: answered once everything up to it is
    /// gone from here.
    tail: u64,
    at: Instant,
}

/// Asks not answered within this long are dropped (the asker asks again).
const ASK_FORGET: Duration = Duration::from_secs(60);

/// A queue shipped (or held) here: where its entries go, and the
/// [`Stream`] of what was sent and acknowledged there.
#[derive(Debug)]
struct Outbound {
    /// Where the entries go; `None` while unknown (held here).
    dest: Option<String>,
    /// Shipping to `dest` (sans-IO: see [`super::outbox`]).
    stream: Stream,
    /// When the device was last looked up (held queues are looked up again
    /// after [`HELD_RETRY`]).
    looked_up: Instant,
    resolving: bool,
    /// Tell `dest` once everything here is shipped and acknowledged.
    handoff: bool,
    /// A `Moved` notice that came while a lookup was in flight: the newer
    /// of the two (by epoch) decides where the entries go.
    moved: Option<Location>,
    /// The last lookup failed: look it up again at the next sweep, not
    /// after `HELD_RETRY`.
    retry_soon: bool,
    /// Held here (the device was here, or nowhere known): when it turns up
    /// elsewhere, that broker may be waiting for this one's handoff.
    held: bool,
    /// The broker that last acknowledged entries of this queue, and up to
    /// which seq: a receiver lacking them waits for that broker's handoff.
    handed: Option<(String, u64)>,
    /// Brokers waiting for everything held here to be handed over.
    asks: Vec<Ask>,
    /// Ship to this broker as a holder (`Ship.hold`) when the destination
    /// is unknown or unreachable, until `flushes` are answered.
    hold_for: Option<String>,
    /// Sender flushes waiting for entries up to a seq to be acknowledged.
    flushes: Vec<(u64, oneshot::Sender<()>)>,
}

impl Outbound {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            dest: None,
            stream: Stream::new(now),
            looked_up: now,
            resolving: false,
            handoff: false,
            moved: None,
            held: false,
            retry_soon: false,
            handed: None,
            asks: Vec::new(),
            hold_for: None,
            flushes: Vec::new(),
        }
    }

    /// A new entry of the queue starts a lookup of its device (or ships).
    /// Not while the queue is held and was looked up less than the
    /// directory's "unknown" lifetime ago: the answer would be the cached
    /// "unknown" again (one lookup, store read and task per entry for a
    /// device receiving while offline). A `Moved` notice, a membership
    /// change or the sweep looks it up sooner.
    fn looks_up_on_entry(&self, now: Instant) -> bool {
        self.dest.is_some() || self.retry_soon || now - self.looked_up >= UNKNOWN_TTL
    }

    /// What the receiver must be told the sender no longer holds: `base`,
    /// and the broker that last acknowledged entries if it is not `dest`.
    fn header(&self, dest: &str) -> (u64, String, u64) {
        match &self.handed {
            Some((node, up_to)) if node != dest => (self.stream.acked(), node.clone(), *up_to),
            _ => (self.stream.acked(), String::new(), 0),
        }
    }

    /// Answers the sender flushes that everything acknowledged so far
    /// covers. True when that ends shipping to a holder (the destination is
    /// to be looked up again).
    fn flushed(&mut self) -> bool {
        let acked = self.stream.acked();
        let (done, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.flushes).into_iter().partition(|f| f.0 <= acked);
        self.flushes = waiting;
        for (_, tx) in done {
            let _ = tx.send(());
        }
        if !self.flushes.is_empty() {
            return false;
        }
        let Some(holder) = self.hold_for.take() else { return false };
        if self.dest.as_deref() == Some(holder.as_str()) {
            self.dest = None;
            return true;
        }
        false
    }

    /// Removes and returns the asks of `node` that everything acknowledged
    /// so far answers.
    fn answered(&mut self, node: &str) -> Vec<u64> {
        let acked = self.stream.acked();
        let mut ids = Vec::new();
        self.asks.retain(|a| {
            let done = a.node == node && a.tail <= acked;
            if done {
                ids.push(a.id);
            }
            !done
        });
        ids
    }
}

pub(crate) struct ShipActor {
    mesh: Mesh,
    store: Store,
    router: Router,
    rx: mpsc::Receiver<ShipMsg>,
    tx: mpsc::WeakSender<ShipMsg>,
    queues: HashMap<QueueKey, Outbound>,
    gauge: OutboxGauge,
    cancel: CancellationToken,
}

impl ShipActor {
    pub(crate) fn new(
        mesh: Mesh,
        store: Store,
        router: Router,
        rx: mpsc::Receiver<ShipMsg>,
        tx: &mpsc::Sender<ShipMsg>,
        gauge: OutboxGauge,
        cancel: CancellationToken,
    ) -> Self {
        Self { mesh, store, router, rx, tx: tx.downgrade(), queues: HashMap::new(), gauge, cancel }
    }

    pub(crate) async fn run(mut self) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut members = self.mesh.inner.members.clone();
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                _ = sweep.tick() => {
                    self.sweep().await;
                    self.count();
                }
                Ok(()) = members.changed() => members_changed(&mut self.queues),
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => return,
                },
            }
            metrics::gauge!("tern_mesh_outbox_queues").set(self.queues.len() as f64);
        }
    }

    fn handle(&mut self, msg: ShipMsg) {
        match msg {
            ShipMsg::Queued { queue, seq, value } => {
                if let Some(out) = self.queues.get_mut(&queue) {
                    let keep = out.dest.is_some() || out.resolving;
                    out.stream.handle_announce(seq, value, keep);
                    if !out.looks_up_on_entry(Instant::now()) {
                        return;
                    }
                }
                self.track(queue);
            }
            ShipMsg::Acked { node, queue, up_to } => {
                let Some(out) = self.queues.get_mut(&queue) else { return };
                if out.dest.as_deref() != Some(node.as_str()) || !out.stream.handle_ack(Instant::now(), up_to) {
                    return;
                }
                out.handed = Some((node.clone(), up_to));
                for id in out.answered(&node) {
                    self.mesh.handoff_done(&node, &queue, id);
                }
                let relook = out.flushed();
                let store = self.store.clone();
                let q = queue.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.shipped(q.clone(), up_to, node).await {
                        tracing::warn!(queue = %q, up_to, error = %e, "shipped entries not deleted; they may be shipped again");
                    }
                });
                if relook {
                    // Handed to a holder: where the device is decides again.
                    self.relocate(queue);
                    return;
                }
                self.pump(&queue);
            }
            ShipMsg::Moved { queue, location, handoff } => {
                if self.router.is_attached(&queue) {
                    return;
                }
                let out = self.queues.entry(queue.clone()).or_insert_with(Outbound::new);
                out.handoff |= handoff;
                if out.resolving {
                    // The lookup in flight may answer from before the move.
                    out.moved = newest(out.moved.take(), Some(location));
                    return;
                }
                out.resolving = true;
                self.resolved_later(queue, async move { Some(Some(location)) });
            }
            ShipMsg::Deferred { node, queue } => {
                let Some(out) = self.queues.get_mut(&queue) else { return };
                if out.dest.as_deref() != Some(node.as_str()) {
                    return;
                }
                // Everything after the last ack goes again (the receiver
                // stores nothing past what it deferred).
                tracing::debug!(%queue, %node, acked = out.stream.acked(), "shipment deferred; looking the device up again");
                out.stream.handle_defer();
                if out.resolving {
                    return;
                }
                // Look the device up again, shortly: the deferring broker
                // either is no longer its broker or waits for a handoff.
                out.resolving = true;
                self.mesh.forget_location(&queue);
                let mesh = self.mesh.clone();
                let q = queue.clone();
                self.resolved_later(queue, async move {
                    tokio::time::sleep(DEFER_RETRY).await;
                    mesh.locate(&q).await
                });
            }
            ShipMsg::Nacked { node, queue, expected, retry_after } => {
                let Some(out) = self.queues.get_mut(&queue) else { return };
                if out.dest.as_deref() != Some(node.as_str()) {
                    return;
                }
                // The receiver stored nothing past `expected - 1`.
                tracing::debug!(%queue, %node, expected, ?retry_after, acked = out.stream.acked(), "shipment refused");
                let Some(until) = out.stream.handle_nack(Instant::now(), expected, retry_after) else {
                    self.pump(&queue);
                    return;
                };
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(until.into()).await;
                    if let Some(tx) = tx.upgrade() {
                        let _ = tx.send(ShipMsg::Wake(queue)).await;
                    }
                });
            }
            ShipMsg::Wake(queue) => {
                let Some(out) = self.queues.get_mut(&queue) else { return };
                if out.stream.handle_wake(Instant::now()) {
                    self.pump(&queue);
                }
            }
            ShipMsg::Returned { node, queue } => {
                tracing::debug!(%queue, %node, "handed back: no longer a holder of this queue");
                if let Some(out) = self.queues.get_mut(&queue) {
                    if out.handed.as_ref().is_some_and(|(n, _)| *n == node) {
                        out.handed = None;
                    }
                }
                let store = self.store.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.forget_handed(queue.clone(), node).await {
                        tracing::debug!(%queue, error = %e, "cannot drop the record of a broker that handed back");
                    }
                });
            }
            ShipMsg::HandoffAsked { node, queue, id } => {
                let (store, tx) = (self.store.clone(), self.tx.clone());
                tokio::spawn(async move {
                    let Ok(bounds) = store.bounds(queue.clone()).await else { return };
                    if let Some(tx) = tx.upgrade() {
                        let _ = tx.send(ShipMsg::AskBounds { node, queue, id, bounds }).await;
                    }
                });
            }
            ShipMsg::AskBounds { node, queue, id, bounds } => {
                if bounds.head >= bounds.tail {
                    // Nothing held here.
                    self.mesh.handoff_done(&node, &queue, id);
                    return;
                }
                let out = self.queues.entry(queue.clone()).or_insert_with(Outbound::new);
                out.asks.push(Ask { node: node.clone(), id, tail: bounds.tail, at: Instant::now() });
                out.stream.handle_tail(bounds.tail);
                if out.dest.as_deref() == Some(node.as_str()) {
                    self.pump(&queue);
                } else if !out.resolving {
                    // The asker says the device is there: look it up again.
                    out.resolving = true;
                    self.mesh.forget_location(&queue);
                    let mesh = self.mesh.clone();
                    let q = queue.clone();
                    self.resolved_later(queue, async move { mesh.locate(&q).await });
                }
            }
            ShipMsg::Resolved { queue, location, bounds, handed, failed } => {
                let me = self.mesh.node().to_owned();
                let Some(out) = self.queues.get_mut(&queue) else { return };
                out.resolving = false;
                out.retry_soon = failed;
                if let Some((node, up_to)) = handed {
                    if out.handed.as_ref().is_none_or(|(_, known)| *known < up_to) {
                        out.handed = Some((node, up_to));
                    }
                }
                let now = Instant::now();
                out.stream.handle_start(now, bounds.head, bounds.tail);
                out.looked_up = now;
                let location = newest(location, out.moved.take());
                out.dest = location.map(|l| l.node).filter(|n| *n != me);
                tracing::debug!(%queue, dest = ?out.dest, handed = ?out.handed, stream = ?out.stream, failed, "queue located");
                if let Some(holder) = &out.hold_for {
                    // A sender flush: entries that cannot go to the device's
                    // broker now go to the sender's new one.
                    if out.dest.as_ref().is_none_or(|d| self.mesh.link(d).is_none()) {
                        out.dest = Some(holder.clone());
                    }
                }
                if out.dest.is_none() {
                    out.held = true;
                } else if out.held {
                    // Say when done even if the `Moved` notice that names
                    // this broker as the previous one was missed.
                    out.handoff = true;
                    out.held = false;
                }
                if out.dest.is_some() {
                    self.pump(&queue);
                }
            }
            ShipMsg::Read { queue, from, read } => {
                let Some(out) = self.queues.get_mut(&queue) else { return };
                match read {
                    Ok(entries) => out.stream.handle_loaded(from, entries),
                    Err(e) => {
                        // The sweep tries again.
                        out.stream.handle_read_failed();
                        tracing::warn!(%queue, error = %e, "cannot read entries to ship");
                        return;
                    }
                }
                self.pump(&queue);
            }
            ShipMsg::LinkUp(node) => {
                let waiting: Vec<QueueKey> = self
                    .queues
                    .iter()
                    .filter(|(_, o)| o.dest.as_deref() == Some(&node))
                    .map(|(q, _)| q.clone())
                    .collect();
                for q in waiting {
                    self.pump(&q);
                }
                // A `Moved` notice from the directory owner at `node` may
                // have been lost while the link was down: look its held
                // queues up again.
                let held: Vec<QueueKey> = self
                    .queues
                    .iter()
                    .filter(|(q, o)| o.dest.is_none() && !o.resolving && self.mesh.owner_of(q.as_bytes()) == node)
                    .map(|(q, _)| q.clone())
                    .collect();
                for q in held {
                    self.mesh.forget_location(&q);
                    self.track(q);
                }
            }
            ShipMsg::Attached { queue, done } => {
                self.queues.remove(&queue);
                let _ = done.send(());
            }
            ShipMsg::Flush { queue, up_to, holder, done } => {
                tracing::debug!(%queue, up_to, %holder, dest = ?self.queues.get(&queue).and_then(|o| o.dest.clone()), "sender flush");
                if self.router.is_attached(&queue) {
                    let _ = done.send(());
                    return;
                }
                let out = self.queues.entry(queue.clone()).or_insert_with(Outbound::new);
                out.stream.handle_tail(up_to);
                out.flushes.push((up_to, done));
                out.hold_for = Some(holder);
                let shipping = out.dest.as_ref().is_some_and(|d| self.mesh.link(d).is_some());
                if shipping {
                    self.pump(&queue);
                } else if !out.resolving {
                    out.resolving = true;
                    let mesh = self.mesh.clone();
                    let q = queue.clone();
                    self.resolved_later(queue, async move { mesh.locate(&q).await });
                }
            }
            ShipMsg::LinkDown(node) => {
                let mut to_holder = Vec::new();
                for (q, out) in self.queues.iter_mut().filter(|(_, o)| o.dest.as_deref() == Some(&node)) {
                    out.stream.handle_link_down();
                    // A sender flush waits on these: they go to its holder.
                    if let Some(holder) = out.hold_for.clone().filter(|h| *h != node) {
                        out.dest = Some(holder);
                        to_holder.push(q.clone());
                    }
                }
                for q in to_holder {
                    self.pump(&q);
                }
            }
        }
    }

    /// Publishes what is held per destination.
    fn count(&self) {
        let mut counts: HashMap<String, OutboxCount> = HashMap::new();
        for out in self.queues.values().filter(|o| o.dest.is_none() || !o.stream.settled()) {
            let c = counts.entry(out.dest.clone().unwrap_or_default()).or_default();
            c.queues += 1;
            c.in_flight += out.stream.in_flight();
        }
        self.gauge.set(counts);
    }

    /// Looks up again where `queue`'s device is (not from the cache).
    fn relocate(&mut self, queue: QueueKey) {
        self.mesh.forget_location(&queue);
        self.track(queue);
    }

    /// Starts shipping `queue` if the device is not here: looks up where it is.
    fn track(&mut self, queue: QueueKey) {
        if self.router.is_attached(&queue) {
            self.queues.remove(&queue);
            return;
        }
        let out = self.queues.entry(queue.clone()).or_insert_with(Outbound::new);
        if out.dest.is_some() {
            self.pump(&queue);
            return;
        }
        if out.resolving {
            return;
        }
        out.resolving = true;
        let mesh = self.mesh.clone();
        let q = queue.clone();
        self.resolved_later(queue, async move { mesh.locate(&q).await });
    }

    /// Reads entries of `queue` from `from` on, on a blocking thread, and
    /// posts what it found (`Read`).
    fn read_later(&self, queue: QueueKey, from: u64) {
        let (store, tx) = (self.store.clone(), self.tx.clone());
        tokio::spawn(async move {
            let read = store.read_off_thread(queue.clone(), from, BATCH_ITEMS, BATCH_BYTES).await;
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(ShipMsg::Read { queue, from, read }).await;
            }
        });
    }

    /// Posts `Resolved` for `queue` once `location` is known, with the
    /// queue's bounds (so shipping starts past deleted entries).
    fn resolved_later(
        &self,
        queue: QueueKey,
        location: impl std::future::Future<Output = Option<Option<Location>>> + Send + 'static,
    ) {
        let (store, tx) = (self.store.clone(), self.tx.clone());
        tokio::spawn(async move {
            let location = location.await;
            let failed = location.is_none();
            // Unknown bounds (a store error): read from the start, up to anything.
            let bounds = store.bounds(queue.clone()).await.unwrap_or(QueueBounds { head: 0, tail: u64::MAX });
            let handed = store.handed(&queue).unwrap_or_else(|e| {
                tracing::warn!(%queue, error = %e, "cannot read which broker last stored this queue's entries");
                None
            });
            if let Some(tx) = tx.upgrade() {
                let _ =
                    tx.send(ShipMsg::Resolved { queue, location: location.flatten(), bounds, handed, failed }).await;
            }
        });
    }

    /// Sends what the window allows of `queue` to its destination.
    fn pump(&mut self, queue: &QueueKey) {
        if self.router.is_attached(queue) {
            // The device came here: its session delivers from the queue.
            self.queues.remove(queue);
            return;
        }
        let Some(out) = self.queues.get_mut(queue) else { return };
        let Some(dest) = out.dest.clone() else { return };
        let Some(link) = self.mesh.link(&dest) else { return };
        out.stream.handle_link(link.id);
        let origin = self.store.id();
        loop {
            let entries = match out.stream.poll_transmit(Instant::now()) {
                Transmit::Ship(entries) => entries,
                Transmit::Read(from) => {
                    self.read_later(queue.clone(), from);
                    return;
                }
                Transmit::Wait => return,
                Transmit::Nothing => {
                    if out.stream.settled() {
                        // Everything shipped and acknowledged.
                        if out.handoff {
                            self.mesh.handoff_done(&dest, queue, 0);
                            out.handoff = false;
                        }
                        for id in out.answered(&dest) {
                            self.mesh.handoff_done(&dest, queue, id);
                        }
                    }
                    // Kept while the conversation goes on, so the next
                    // entry ships at once (no lookup, no bounds read); the
                    // sweep drops it after `IDLE_FORGET` without traffic.
                    return;
                }
            };
            let Some(first) = entries.first().map(|(seq, _)| *seq) else { return };
            let (base, handed_to, handed_up_to) = out.header(&dest);
            let ship = Ship {
                handle: queue.handle().to_owned(),
                device: queue.device(),
                origin: bytes::Bytes::copy_from_slice(&origin),
                entries: entries.into_iter().map(|(seq, value)| ShipEntry { seq, value }).collect(),
                base,
                handed_to,
                handed_up_to,
                hold: out.hold_for.as_deref() == Some(dest.as_str()),
            };
            let count = ship.entries.len() as u64;
            if !link.send(PeerFrame { kind: Some(P::Ship(ship)) }) {
                // The link's queue is full or it went down: the sweep retries.
                out.stream.handle_unsent(first);
                return;
            }
            metrics::counter!("tern_mesh_shipped_entries_total").increment(count);
        }
    }

    /// Re-sends what stalled, retries lookups, and finds queues to ship
    /// that no notice announced (left over from before a restart, or held
    /// while the device was offline).
    async fn sweep(&mut self) {
        let now = Instant::now();
        for out in self.queues.values_mut() {
            out.asks.retain(|a| now - a.at < ASK_FORGET);
        }
        self.queues.retain(|_, o| {
            o.resolving
                || o.dest.is_none()
                || !o.stream.settled()
                || !o.asks.is_empty()
                || now - o.stream.progress().max(o.looked_up) < IDLE_FORGET
        });
        let mut retry = Vec::new();
        for (q, out) in &mut self.queues {
            if out.stream.handle_timeout(now) {
                metrics::counter!("tern_mesh_reships_total").increment(1);
            }
            if out.dest.is_some() && out.stream.settled() {
                retry.push(q.clone());
            }
        }
        retry.extend(due_held(&self.queues, now));
        for q in retry {
            if let Some(out) = self.queues.get_mut(&q) {
                if out.dest.is_none() && !out.resolving {
                    out.looked_up = now;
                    self.mesh.forget_location(&q);
                }
            }
            self.track(q);
        }
        let waiting = match self.store.waiting().await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list waiting queues");
                return;
            }
        };
        self.answer_emptied(&waiting);
        // Held queues whose entries are all gone (expired, or delivered
        // since) are forgotten: they would be looked up forever.
        let holding: std::collections::HashSet<&QueueKey> = waiting.iter().map(|(q, _)| q).collect();
        self.queues.retain(|q, o| o.dest.is_some() || o.resolving || !o.asks.is_empty() || holding.contains(q));
        for (q, bounds) in waiting {
            if let Some(out) = self.queues.get_mut(&q) {
                // Entries whose notice was dropped (a full channel) are
                // known from here on.
                if out.stream.handle_tail(bounds.tail) {
                    self.pump(&q);
                }
            } else if !self.router.is_attached(&q) {
                self.track(q);
            }
        }
    }
}

impl ShipActor {
    /// Answers the asks of queues whose entries from before the ask are all
    /// gone from here by other means (delivered, expired): `waiting` lists
    /// every queue still holding entries.
    fn answer_emptied(&mut self, waiting: &[(QueueKey, QueueBounds)]) {
        let heads: HashMap<&QueueKey, u64> = waiting.iter().map(|(q, b)| (q, b.head)).collect();
        for (queue, out) in &mut self.queues {
            let head = heads.get(queue).copied().unwrap_or(u64::MAX);
            let mesh = &self.mesh;
            out.asks.retain(|a| {
                let done = a.tail <= head;
                if done {
                    mesh.handoff_done(&a.node, queue, a.id);
                }
                !done
            });
        }
    }
}

/// The membership changed, so directory shards moved: held queues are
/// looked up again at the next sweeps (their devices' new owners may know
/// where they are; an answer of "unknown" from the old owner is stale).
fn members_changed(queues: &mut HashMap<QueueKey, Outbound>) {
    for out in queues.values_mut().filter(|o| o.dest.is_none()) {
        out.retry_soon = true;
    }
}

/// Held queues looked up again per sweep, at most: a broker holding queues
/// for many offline devices spreads their lookups over several sweeps
/// instead of asking the directory for all of them at once.
const HELD_LOOKUPS_PER_SWEEP: usize = 256;

/// The held queues (no known location) to look up again at this sweep. They
/// wait for a `Moved` notice; this is the safety net in case one was missed.
/// Those whose last lookup failed come first, then the longest unchecked,
/// up to [`HELD_LOOKUPS_PER_SWEEP`].
fn due_held(queues: &HashMap<QueueKey, Outbound>, now: Instant) -> Vec<QueueKey> {
    let mut due: Vec<(bool, Instant, &QueueKey)> = queues
        .iter()
        .filter(|(_, o)| o.dest.is_none() && !o.resolving && (o.retry_soon || now - o.looked_up > HELD_RETRY))
        .map(|(q, o)| (!o.retry_soon, o.looked_up, q))
        .collect();
    if due.len() > HELD_LOOKUPS_PER_SWEEP {
        due.select_nth_unstable(HELD_LOOKUPS_PER_SWEEP);
        due.truncate(HELD_LOOKUPS_PER_SWEEP);
    }
    due.into_iter().map(|(_, _, q)| q.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_for_a_held_queue_looks_its_device_up_only_once_the_unknown_answer_is_stale() {
        let now = Instant::now();
        let mut held = Outbound::new();
        held.looked_up = now;
        assert!(!held.looks_up_on_entry(now + UNKNOWN_TTL / 2), "the cached 'unknown' would answer");
        assert!(held.looks_up_on_entry(now + UNKNOWN_TTL), "the cached answer is gone: ask again");
        held.retry_soon = true;
        assert!(held.looks_up_on_entry(now), "the last lookup failed, or the members changed");
        let mut shipping = Outbound::new();
        shipping.looked_up = now;
        shipping.dest = Some("node-2".into());
        assert!(shipping.looks_up_on_entry(now), "a queue with a destination ships the entry");
    }

    #[test]
    fn held_queues_are_looked_up_again_failed_first_then_oldest_and_a_bounded_number_per_sweep() {
        let start = Instant::now();
        let now = start + HELD_RETRY + Duration::from_secs(HELD_LOOKUPS_PER_SWEEP as u64 + 10);
        let mut queues = HashMap::new();
        // Held since `start + i` seconds: all past `HELD_RETRY`, more of them
        // than one sweep looks up.
        for i in 0..HELD_LOOKUPS_PER_SWEEP as u64 + 5 {
            let mut out = Outbound::new();
            out.looked_up = start + Duration::from_secs(i);
            queues.insert(QueueKey::new(&format!("u{i}"), 1), out);
        }
        // Checked just now: not due. A failed lookup just now: due first.
        let mut fresh = Outbound::new();
        fresh.looked_up = now;
        queues.insert(QueueKey::new("fresh", 1), fresh);
        let mut failed = Outbound::new();
        failed.looked_up = now;
        failed.retry_soon = true;
        queues.insert(QueueKey::new("failed", 1), failed);
        // A lookup in flight, or a known destination: never.
        let mut resolving = Outbound::new();
        resolving.looked_up = start;
        resolving.resolving = true;
        queues.insert(QueueKey::new("resolving", 1), resolving);
        let mut shipping = Outbound::new();
        shipping.looked_up = start;
        shipping.dest = Some("node-2".into());
        queues.insert(QueueKey::new("shipping", 1), shipping);

        let due = due_held(&queues, now);
        assert_eq!(due.len(), HELD_LOOKUPS_PER_SWEEP);
        assert!(!due.contains(&QueueKey::new("fresh", 1)));
        assert!(due.contains(&QueueKey::new("failed", 1)));
        for name in ["fresh", "resolving", "shipping"] {
            assert!(!due.contains(&QueueKey::new(name, 1)), "{name} is not due");
        }
        // The oldest held ones are taken, the newest wait for a later sweep.
        assert!(due.contains(&QueueKey::new("u0", 1)));
        let last = HELD_LOOKUPS_PER_SWEEP as u64 + 4;
        assert!(!due.contains(&QueueKey::new(&format!("u{last}"), 1)));

        // Issue 11 (CI chaos of stop 17): a membership change makes every
        // held queue due, the one checked a moment ago too (its answer may
        // have come from an owner that no longer owns it).
        queues.retain(|q, _| !q.handle().starts_with('u'));
        members_changed(&mut queues);
        let due = due_held(&queues, now);
        assert!(due.contains(&QueueKey::new("fresh", 1)), "a held queue looked up just now is due again");
        assert!(!due.contains(&QueueKey::new("shipping", 1)));
    }
}
