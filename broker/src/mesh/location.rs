//! Where devices are: this broker's part of the location directory (its
//! shard, the `Location` and `Moved` notices), the handoff a device's new
//! broker waits for, and lookups through the moka cache. See
//! [`directory`](super::directory) for the table and the rendezvous hash.

use std::time::Duration;

use tern_protocol::peer::{self as pp, peer_frame::Kind as P, reply, request, PeerFrame};

use super::directory::{self, Location, Recorded};
use super::link::PeerError;
use super::{lock, Mesh, ShipMsg, REQUEST_TIMEOUT};
use crate::store::QueueKey;

/// Longest a device's new broker holds other shipments back while waiting
/// for its previous broker's handoff.
pub(super) const HANDOFF_WAIT: Duration = Duration::from_secs(10);

/// How long a login waits to learn the device's previous location (its
/// epoch) before it registers without it.
const LOGIN_LOOKUP: Duration = Duration::from_millis(500);

/// Pause before a lookup whose link went down is tried again.
const LOOKUP_RETRY: Duration = Duration::from_millis(250);

/// How often a broker sends every connected device's location again, so an
/// entry its owner dropped (its table is bounded) comes back.
pub(super) const REFRESH_EVERY: Duration = Duration::from_secs(600);

/// A device that logged in here, waiting for its previous broker's handoff.
/// Until it is done (or `HANDOFF_WAIT` passes, or that broker is gone),
/// entries shipped by other brokers are deferred, so the older entries the
/// previous broker holds arrive first: one sender's messages stay in order
/// across a move.
#[derive(Debug)]
pub(super) struct Handoff {
    pub(super) epoch: u64,
    /// The previous broker; `None` until the directory owner says.
    pub(super) from: Option<String>,
    pub(super) until: tokio::time::Instant,
}

impl Mesh {
    /// Whether shipments of `queue` from `sender` wait: the device is known
    /// to be at another broker (entries are forwarded one hop, never on
    /// from here on a guess), or it logged in here and its previous broker
    /// has not handed over yet.
    pub(super) fn defers(&self, queue: &QueueKey, sender: &str) -> bool {
        if lock(&self.inner.hosted).contains_key(queue) {
            let mut handoffs = lock(&self.inner.handoffs);
            let Some(h) = handoffs.get(queue) else { return false };
            let gone = h.from.as_ref().is_some_and(|f| !self.members().contains_key(f));
            if gone || tokio::time::Instant::now() >= h.until {
                handoffs.remove(queue);
                self.inner.handoff_ended.notify_waiters();
                return false;
            }
            return h.from.as_deref() != Some(sender);
        }
        matches!(self.inner.directory.peek(queue), Some(Some(l)) if l.node != self.node())
    }

    /// The node owning `key` among the live members and this broker.
    pub(super) fn owner_of(&self, key: &[u8]) -> String {
        let members = self.members();
        let names = members.keys().map(String::as_str).chain(std::iter::once(self.node()));
        directory::rendezvous(key, names).unwrap_or(self.node()).to_owned()
    }

    /// A device logged in here: record it with its directory owner. Returns
    /// the epoch of this login: above that of its last login anywhere (asked
    /// of the directory first, for up to [`LOGIN_LOOKUP`]), so a broker whose
    /// clock is behind does not register the newest login as a stale one.
    /// The second value is the brokers it may have been at before: the one
    /// the directory names, if another; or, when the directory knows
    /// nothing of the device (its owner restarted and forgot it, or could
    /// not be asked), every live member, so that what the device sent or
    /// was sent through its previous broker still goes first.
    pub(crate) async fn device_online(&self, queue: &QueueKey) -> (u64, Vec<String>) {
        self.forget_location(queue);
        let previous = match tokio::time::timeout(LOGIN_LOOKUP, self.locate(queue)).await {
            Ok(Some(Some(last))) => {
                self.inner.directory.observe(last.epoch);
                Some(last.node).filter(|n| n != self.node()).into_iter().collect()
            }
            _ => {
                let everyone: Vec<String> = self.members().into_keys().collect();
                tracing::debug!(%queue, ?everyone, "no broker known for the device's last login; asking every member");
                everyone
            }
        };
        let epoch = self.inner.directory.next_epoch();
        lock(&self.inner.hosted).insert(queue.clone(), epoch);
        let until = tokio::time::Instant::now() + HANDOFF_WAIT;
        lock(&self.inner.handoffs).insert(queue.clone(), Handoff { epoch, from: None, until });
        self.send_location(queue, epoch);
        (epoch, previous)
    }

    /// Holds `queue` still while its device's previous broker hands over
    /// (the login of `epoch` here): sends into it wait (a store fence),
    /// then each sender's entries are put in the order of their stamps,
    /// so entries queued here for the device while it was elsewhere do not
    /// overtake older ones its previous broker held, nor entries older than
    /// what came back (held here for it) fall behind. Resolves to the queue's
    /// head after that (`None`: the store failed; deliver as it is). The
    /// device's session pushes nothing until then.
    ///
    /// The previous broker's `HandoffDone` for the move may come before
    /// entries this broker shipped it just before (stored there after it
    /// looked): so once the move's handoff is over, this broker also asks it
    /// (`HandoffRequest` on the link that carried those shipments, so they
    /// are counted) and waits for that answer too. `previous` is where the
    /// device may have been (for when the owner's answer was missed; see
    /// [`Mesh::device_online`]).
    pub(crate) fn hold_for_handback(
        &self,
        queue: &QueueKey,
        epoch: u64,
        previous: Vec<String>,
    ) -> tokio::sync::oneshot::Receiver<Option<u64>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (mesh, queue) = (self.clone(), queue.clone());
        self.inner.tasks.spawn(async move {
            let store = mesh.inner.store.clone();
            let (stopped, shipping) = tokio::sync::oneshot::channel();
            if mesh.inner.ship.send(ShipMsg::Attached { queue: queue.clone(), done: stopped }).await.is_ok() {
                let _ = shipping.await;
            }
            let fenced = store.fence(queue.clone()).await;
            let until = tokio::time::Instant::now() + HANDOFF_WAIT;
            // Besides the previous broker the owner named, the one the
            // directory had, and the one this broker's own record says
            // last acknowledged entries of the queue (the owner may have
            // restarted and forgotten the device).
            let holder = store.handed(&queue).ok().flatten().map(|(node, _)| node);
            let wait = async {
                let from = mesh.handoff_over(&queue, epoch).await;
                let mut ask: Vec<String> =
                    from.into_iter().chain(previous).chain(holder).filter(|n| n != mesh.node()).collect();
                ask.sort_unstable();
                ask.dedup();
                tracing::debug!(%queue, epoch, ?ask, "asking for what other brokers hold of the queue");
                futures::future::join_all(ask.iter().map(|node| mesh.ask_handback(&queue, node, until))).await;
            };
            tokio::select! {
                // Shutting down: the store goes with the broker.
                () = mesh.inner.cancel.cancelled() => return,
                () = wait => {}
            }
            let Ok(before) = fenced else {
                let _ = tx.send(None);
                return;
            };
            let bounds = store.bounds(queue.clone()).await;
            tracing::debug!(%queue, epoch, before, bounds = ?bounds.as_ref().ok(), "handoff over; lifting the fence");
            // Only while this login is still the device's here: its session
            // has pushed nothing yet (it waits for this), and the queue is
            // not shipped elsewhere. Once it has ended (the device moved on,
            // or logged in here again), entries moved under seqs already
            // pushed or shipped would be lost or repeated; a later login's
            // fence counts from this one's start and puts them in order.
            let current = lock(&mesh.inner.hosted).get(&queue) == Some(&epoch);
            let head = match bounds {
                // Something came back: put it in its senders' order with
                // what was here.
                Ok(b) if current && b.tail > before && b.depth() > 1 => {
                    store.reorder(queue.clone()).await.map(|after| after.head)
                }
                Ok(b) => Ok(b.head),
                Err(e) => Err(e),
            };
            if let Err(e) = store.unfence(queue.clone()).await {
                tracing::warn!(%queue, error = %e, "cannot lift the fence of a queue");
            }
            let _ = tx.send(
                head.map_err(|e| tracing::warn!(%queue, error = %e, "cannot order a queue behind its handoff")).ok(),
            );
        });
        rx
    }

    /// Resolves once the handoff awaited for the login of `epoch` is over:
    /// done, not needed, given up after [`HANDOFF_WAIT`], or its broker gone.
    /// Returns the previous broker, if one was named.
    async fn handoff_over(&self, queue: &QueueKey, epoch: u64) -> Option<String> {
        let mut from = None;
        loop {
            let ended = self.inner.handoff_ended.notified();
            {
                let mut handoffs = lock(&self.inner.handoffs);
                let Some(h) = handoffs.get(queue).filter(|h| h.epoch == epoch) else { return from };
                from = h.from.clone();
                let gone = h.from.as_ref().is_some_and(|f| !self.members().contains_key(f));
                if gone || tokio::time::Instant::now() >= h.until {
                    handoffs.remove(queue);
                    return from;
                }
            }
            tokio::select! {
                () = ended => {}
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Asks `node` for what it holds of `queue` until it answers (it has
    /// shipped here, and had acknowledged, everything it held when asked),
    /// `until` passes, or it has not been a live member for 3 s.
    async fn ask_handback(&self, queue: &QueueKey, node: &str, until: tokio::time::Instant) {
        let mut down_since = None;
        while tokio::time::Instant::now() < until {
            let request_id = super::settle::next_request_id();
            let (tx, rx) = tokio::sync::oneshot::channel();
            lock(&self.inner.handbacks).insert(request_id, tx);
            if let Some(link) = self.link(node) {
                let req = pp::HandoffRequest { handle: queue.handle().to_owned(), device: queue.device(), request_id };
                link.send(PeerFrame { kind: Some(P::HandoffRequest(req)) });
            }
            let answered = matches!(tokio::time::timeout(Duration::from_secs(1), rx).await, Ok(Ok(())));
            lock(&self.inner.handbacks).remove(&request_id);
            if answered {
                return;
            }
            if self.gone_too_long(node, &mut down_since) {
                return;
            }
        }
        tracing::info!(%queue, %node, "no handback from the device's previous broker in time; delivering without it");
    }

    /// A device's session here ended (unless a newer one replaced it).
    pub(crate) fn device_offline(&self, queue: &QueueKey, epoch: u64) {
        let mut hosted = lock(&self.inner.hosted);
        if hosted.get(queue) == Some(&epoch) {
            hosted.remove(queue);
            let mut handoffs = lock(&self.inner.handoffs);
            if handoffs.get(queue).is_some_and(|h| h.epoch == epoch) {
                handoffs.remove(queue);
            }
        }
    }

    fn send_location(&self, queue: &QueueKey, epoch: u64) {
        let owner = self.owner_of(queue.as_bytes());
        let location = Location { node: self.node().to_owned(), epoch };
        if owner == self.node() {
            self.record_location(queue.clone(), location);
            return;
        }
        let frame =
            pp::Location { handle: queue.handle().to_owned(), device: queue.device(), node: location.node, epoch };
        let sent = self.link(&owner).is_some_and(|link| link.send(PeerFrame { kind: Some(P::Location(frame)) }));
        if !sent {
            metrics::counter!("tern_location_registrations_deferred_total").increment(1);
            tracing::debug!(%queue, %owner, "location not sent to the directory owner; sent again when the link to it is up");
        }
    }

    /// As directory owner: records a location. Every member hears of a
    /// device that came from elsewhere (or was unknown), so holders ship to
    /// it and caches follow; the broker it logged in at always hears, with
    /// where it was before, so it knows whose handoff to wait for.
    pub(super) fn record_location(&self, queue: QueueKey, location: Location) {
        let reporter = location.node.clone();
        let (current, from, everyone) = match self.inner.directory.record(&queue, location.clone()) {
            // A newer login elsewhere: tell the reporter where the device
            // is. A re-sent location (membership changed) or a newer login
            // at the reporter itself tells it nothing new, and a `Moved`
            // with no previous broker would end its handoff wait.
            Recorded::Stale => match self.inner.directory.owned(&queue) {
                Some(newer) if newer.node != reporter => (newer, None, false),
                _ => return,
            },
            Recorded::Fresh { moved_from, known } => {
                metrics::gauge!("tern_location_directory_entries").set(self.inner.directory.owned_len() as f64);
                let everyone = !known || moved_from.is_some();
                (location, moved_from, everyone)
            }
        };
        let moved = pp::Moved {
            handle: queue.handle().to_owned(),
            device: queue.device(),
            node: current.node.clone(),
            epoch: current.epoch,
            from_node: from.clone().unwrap_or_default(),
        };
        for (node, link) in lock(&self.inner.links).iter() {
            if everyone || *node == reporter {
                link.send(PeerFrame { kind: Some(P::Moved(moved.clone())) });
            }
        }
        if everyone || reporter == self.node() {
            self.on_moved(queue, current, from);
        }
    }

    /// A device logged in at `location` (coming from `from`): update the
    /// cache; here, learn whose handoff to wait for; elsewhere, close an
    /// older session and ship what is held for it.
    pub(super) fn on_moved(&self, queue: QueueKey, location: Location, from: Option<String>) {
        self.inner.directory.invalidate(&queue, location.clone());
        if location.node == self.node() {
            let mut handoffs = lock(&self.inner.handoffs);
            if let Some(h) = handoffs.get_mut(&queue) {
                if h.epoch == location.epoch {
                    match from.filter(|f| *f != location.node) {
                        Some(previous) => h.from = Some(previous),
                        // Nowhere before: nothing to wait for. Unless an
                        // earlier answer named a previous broker: a later
                        // one with none comes from an owner that took the
                        // shard over and never knew it.
                        None if h.from.is_none() => {
                            handoffs.remove(&queue);
                            self.inner.handoff_ended.notify_waiters();
                        }
                        None => {}
                    }
                }
            }
            return;
        }
        let older_here = lock(&self.inner.hosted).get(&queue).is_some_and(|e| *e < location.epoch);
        if older_here {
            self.inner.router.replace_remotely(&queue);
        }
        let handoff = from.as_deref() == Some(self.node());
        let _ = self.inner.ship.try_send(ShipMsg::Moved { queue, location, handoff });
    }

    /// Tells `node` this broker has handed over everything it held for
    /// `queue` (since its `HandoffRequest` `request_id`; 0: unasked).
    pub(crate) fn handoff_done(&self, node: &str, queue: &QueueKey, request_id: u64) {
        if let Some(link) = self.link(node) {
            let done = pp::HandoffDone { handle: queue.handle().to_owned(), device: queue.device(), request_id };
            link.send(PeerFrame { kind: Some(P::HandoffDone(done)) });
        }
    }

    /// What this broker can tell a lookup of `queue`: its entry as owner,
    /// or the device's login here if that is newer. A broker asked by a
    /// member whose view of the membership differs (one that just started
    /// may not know every member yet, so it computes another owner) still
    /// answers right for its own devices.
    pub(super) fn known_location(&self, queue: &QueueKey) -> Option<Location> {
        let owned = self.inner.directory.owned(queue);
        let here =
            lock(&self.inner.hosted).get(queue).map(|epoch| Location { node: self.node().to_owned(), epoch: *epoch });
        directory::newest(owned, here)
    }

    /// Where `queue`'s device is: this broker if connected here, else the
    /// cache, else its directory owner (the answer is cached). `None` when
    /// the owner could not be asked; `Some(None)` when no location is known.
    pub(crate) async fn locate(&self, queue: &QueueKey) -> Option<Option<Location>> {
        if let Some(epoch) = lock(&self.inner.hosted).get(queue) {
            return Some(Some(Location { node: self.node().to_owned(), epoch: *epoch }));
        }
        if let Some(hit) = self.inner.directory.cached(queue) {
            return Some(hit);
        }
        let owner = self.owner_of(queue.as_bytes());
        let found = if owner == self.node() {
            self.inner.directory.owned(queue)
        } else {
            metrics::counter!("tern_location_lookups_total").increment(1);
            self.ask_owner(&owner, queue).await?
        };
        self.inner.directory.cache(queue.clone(), found.clone());
        Some(found)
    }

    /// Asks `owner` where `queue`'s device is: `Some(None)` when it knows
    /// no location, `None` when it could not be asked. A link that went
    /// down (replaced by a duplicate, or just re-dialed) is tried once more.
    async fn ask_owner(&self, owner: &str, queue: &QueueKey) -> Option<Option<Location>> {
        for attempt in 0..2 {
            if attempt > 0 {
                tokio::time::sleep(LOOKUP_RETRY).await;
            }
            let Some(link) = self.link(owner) else { continue };
            let lookup = pp::Lookup { handle: queue.handle().to_owned(), device: queue.device() };
            match link.request(request::Kind::Lookup(lookup), REQUEST_TIMEOUT).await {
                Ok(reply::Kind::Lookup(r)) if !r.node.is_empty() => {
                    return Some(Some(Location { node: r.node, epoch: r.epoch }))
                }
                Ok(_) => return Some(None),
                Err(PeerError::LinkDown(_)) => continue,
                Err(e) => {
                    tracing::debug!(%queue, error = %e, "location lookup failed");
                    return None;
                }
            }
        }
        tracing::debug!(%queue, %owner, "location lookup failed: no link to the directory owner");
        None
    }

    /// Drops the cached location of `queue`.
    pub(crate) fn forget_location(&self, queue: &QueueKey) {
        self.inner.directory.forget(queue);
    }

    /// A link to `node` came up: sends it the location of every device
    /// connected here whose directory owner it is. A registration lost with
    /// the link before (or never sent for lack of one) is made good, so other
    /// brokers do not hold an online device's messages until it logs in again.
    pub(super) fn reregister_with(&self, node: &str) {
        let hosted: Vec<(QueueKey, u64)> = lock(&self.inner.hosted).iter().map(|(q, e)| (q.clone(), *e)).collect();
        for (queue, epoch) in hosted {
            if self.owner_of(queue.as_bytes()) == node {
                self.send_location(&queue, epoch);
            }
        }
    }

    /// Sends every hosted device's location to its owner whenever the member
    /// list changes (owners change with it; a restarted owner lost its
    /// table), and every [`REFRESH_EVERY`] (an owner may have dropped it).
    pub(super) async fn reregister_on_change(self) {
        let mut members = self.inner.members.clone();
        let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH_EVERY, REFRESH_EVERY);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.inner.cancel.cancelled() => return,
                changed = members.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Let links to new members come up first.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                _ = refresh.tick() => {}
            }
            let hosted: Vec<(QueueKey, u64)> = lock(&self.inner.hosted).iter().map(|(q, e)| (q.clone(), *e)).collect();
            for (queue, epoch) in hosted {
                self.send_location(&queue, epoch);
            }
        }
    }
}
