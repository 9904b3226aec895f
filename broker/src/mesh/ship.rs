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
//! over from before a restart. What to do with them is decided by
//! [`Routes`](super::routes), which does no I/O; the actor here carries
//! out what it asks (lookups, store reads and deletes, timers, frames) and
//! feeds back what came of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_protocol::peer::PeerFrame;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::directory::Location;
use super::outbox::{BATCH_BYTES, BATCH_ITEMS};
use super::routes::{Action, Env, Found, Routes};
use super::Mesh;
use crate::router::Router;
use crate::store::{QueueBounds, QueueKey, Store};

pub(crate) use super::routes::OutboxCount;

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

pub(crate) struct ShipActor {
    mesh: Mesh,
    store: Store,
    router: Router,
    rx: mpsc::Receiver<ShipMsg>,
    tx: mpsc::WeakSender<ShipMsg>,
    routes: Routes,
    gauge: OutboxGauge,
    cancel: CancellationToken,
}

/// What [`Routes`] asks of the mesh, answered from this broker's.
struct MeshEnv<'a> {
    mesh: &'a Mesh,
    router: &'a Router,
    origin: [u8; 16],
}

impl Env for MeshEnv<'_> {
    fn node(&self) -> &str {
        self.mesh.node()
    }

    fn attached(&self, queue: &QueueKey) -> bool {
        self.router.is_attached(queue)
    }

    fn link(&self, node: &str) -> Option<u64> {
        self.mesh.link(node).map(|l| l.id)
    }

    fn send(&mut self, node: &str, link: u64, frame: PeerFrame) -> bool {
        self.mesh.link(node).is_some_and(|l| l.id == link && l.send(frame))
    }

    fn owner_of(&self, queue: &QueueKey) -> String {
        self.mesh.owner_of(queue.as_bytes())
    }

    fn origin(&self) -> [u8; 16] {
        self.origin
    }
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
        Self { mesh, store, router, rx, tx: tx.downgrade(), routes: Routes::default(), gauge, cancel }
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
                    self.gauge.set(self.routes.counts());
                }
                Ok(()) = members.changed() => self.routes.handle_members_changed(),
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => return,
                },
            }
            metrics::gauge!("tern_mesh_outbox_queues").set(self.routes.len() as f64);
        }
    }

    fn handle(&mut self, msg: ShipMsg) {
        let now = Instant::now();
        let mut env = MeshEnv { mesh: &self.mesh, router: &self.router, origin: self.store.id() };
        let (routes, env) = (&mut self.routes, &mut env);
        match msg {
            ShipMsg::Queued { queue, seq, value } => routes.handle_queued(now, env, queue, seq, value),
            ShipMsg::Acked { node, queue, up_to } => routes.handle_acked(now, env, &node, queue, up_to),
            ShipMsg::Moved { queue, location, handoff } => routes.handle_moved(now, env, queue, location, handoff),
            ShipMsg::Deferred { node, queue } => routes.handle_deferred(&node, queue),
            ShipMsg::Nacked { node, queue, expected, retry_after } => {
                routes.handle_nacked(now, env, &node, queue, expected, retry_after);
            }
            ShipMsg::Wake(queue) => routes.handle_wake(now, env, queue),
            ShipMsg::Returned { node, queue } => routes.handle_returned(node, queue),
            ShipMsg::HandoffAsked { node, queue, id } => routes.handle_handoff_asked(node, queue, id),
            ShipMsg::AskBounds { node, queue, id, bounds } => {
                routes.handle_ask_bounds(now, env, node, queue, id, bounds)
            }
            ShipMsg::Resolved { queue, location, bounds, handed, failed } => {
                routes.handle_resolved(now, env, queue, Found { location, bounds, handed, failed });
            }
            ShipMsg::Read { queue, from, read } => match read {
                Ok(entries) => routes.handle_loaded(now, env, queue, from, entries),
                Err(e) => {
                    tracing::warn!(%queue, error = %e, "cannot read entries to ship");
                    routes.handle_read_failed(&queue);
                }
            },
            ShipMsg::LinkUp(node) => routes.handle_link_up(now, env, &node),
            ShipMsg::LinkDown(node) => routes.handle_link_down(now, env, &node),
            ShipMsg::Attached { queue, done } => {
                routes.handle_attached(&queue);
                let _ = done.send(());
            }
            ShipMsg::Flush { queue, up_to, holder, done } => routes.handle_flush(now, env, queue, up_to, holder, done),
        }
        self.act();
    }

    /// Carries out what [`Routes`] asked for.
    fn act(&mut self) {
        while let Some(action) = self.routes.poll_action() {
            match action {
                Action::Locate { queue, forget, delay } => {
                    if forget {
                        self.mesh.forget_location(&queue);
                    }
                    let mesh = self.mesh.clone();
                    let q = queue.clone();
                    self.resolved_later(queue, async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        mesh.locate(&q).await
                    });
                }
                Action::Located { queue, location } => self.resolved_later(queue, async move { Some(Some(location)) }),
                Action::Read { queue, from } => self.read_later(queue, from),
                Action::Shipped { queue, up_to, node } => {
                    let store = self.store.clone();
                    tokio::spawn(async move {
                        if let Err(e) = store.shipped(queue.clone(), up_to, node).await {
                            tracing::warn!(%queue, up_to, error = %e, "shipped entries not deleted; they may be shipped again");
                        }
                    });
                }
                Action::HandoffDone { node, queue, id } => self.mesh.handoff_done(&node, &queue, id),
                Action::ForgetHanded { queue, node } => {
                    let store = self.store.clone();
                    tokio::spawn(async move {
                        if let Err(e) = store.forget_handed(queue.clone(), node).await {
                            tracing::debug!(%queue, error = %e, "cannot drop the record of a broker that handed back");
                        }
                    });
                }
                Action::AskBounds { node, queue, id } => {
                    let (store, tx) = (self.store.clone(), self.tx.clone());
                    tokio::spawn(async move {
                        let Ok(bounds) = store.bounds(queue.clone()).await else { return };
                        if let Some(tx) = tx.upgrade() {
                            let _ = tx.send(ShipMsg::AskBounds { node, queue, id, bounds }).await;
                        }
                    });
                }
                Action::WakeAt { queue, at } => {
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep_until(at.into()).await;
                        if let Some(tx) = tx.upgrade() {
                            let _ = tx.send(ShipMsg::Wake(queue)).await;
                        }
                    });
                }
                Action::Flushed(done) => {
                    let _ = done.send(());
                }
            }
        }
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

    /// Re-sends what stalled, retries lookups, and finds queues to ship
    /// that no notice announced (left over from before a restart, or held
    /// while the device was offline).
    async fn sweep(&mut self) {
        let mut env = MeshEnv { mesh: &self.mesh, router: &self.router, origin: self.store.id() };
        let rewound = self.routes.handle_sweep(Instant::now(), &mut env);
        metrics::counter!("tern_mesh_reships_total").increment(rewound);
        self.act();
        let waiting = match self.store.waiting().await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list waiting queues");
                return;
            }
        };
        let mut env = MeshEnv { mesh: &self.mesh, router: &self.router, origin: self.store.id() };
        self.routes.handle_waiting(Instant::now(), &mut env, waiting);
        self.act();
    }
}
