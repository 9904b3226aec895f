//! The broker mesh: brokers that know each other, hold one QUIC link per
//! pair, and deliver messages to devices connected anywhere in it.
//!
//! - [`cluster_tls`]: the cluster CA, node certificates and mutual TLS;
//! - [`membership`]: who is alive, by SWIM gossip (foca) over the links;
//! - [`link`]: one persistent connection per broker pair, batched frames;
//! - [`directory`]: device -> broker, sharded by rendezvous hashing, cached;
//! - [`location`]: this broker's side of the directory: logins, `Moved`
//!   notices, lookups, and the handoff a device's new broker waits for;
//! - [`ship`]: the outbox that moves queue entries to the device's broker;
//! - [`flush`]: a device that moved: what it sent through its previous
//!   broker goes before what it sends here;
//! - [`settle`]: shipments that wait for another broker's handoff, so one
//!   sender's messages keep their order across brokers;
//! - [`accounts`]: account records, written at a primary and replicated;
//! - [`status`]: what `/mesh` shows.
//!
//! Data flow: a broker started with `--cluster` accepts ALPN `tern-peer/1`
//! on its client port and dials its `--join` seeds; each link announces the
//! peer to foca, and foca's view of the live members (published on a watch
//! channel) drives which links are kept up. Frames arriving on a link are
//! dispatched by [`Mesh::on_frame`].

mod accounts;
pub mod cluster_tls;
mod directory;
mod flush;
mod keys;
mod link;
mod location;
mod membership;
#[cfg(test)]
mod moves_sim;
mod outbox;
mod presence;
mod routes;
mod settle;
mod ship;
mod status;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tern_protocol::peer::{self as pp, peer_frame::Kind as P, reply, request, PeerFrame, PeerHello};
use tern_protocol::ErrorCode;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use cluster_tls::{create_ca, create_node_cert, ClusterIdentity};
use directory::{Directory, Location};
pub(crate) use flush::SendsReady;
use link::{LinkHandle, PeerError};
use location::Handoff;
use membership::{Members, MembershipActor, MembershipMsg, NodeId};
use ship::ShipActor;
pub(crate) use ship::ShipMsg;
pub use status::{LinkStatus, MemberStatus, MeshStatus};

use crate::router::Router;
use crate::store::{QueueKey, ShipHeader, ShipOutcome, Store};

/// Cheap, cloneable handle to this broker's part of the mesh.
#[derive(Clone, Debug)]
pub(crate) struct Mesh {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    me: NodeId,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    links: Mutex<HashMap<String, LinkHandle>>,
    dialing: Mutex<HashSet<SocketAddr>>,
    members: watch::Receiver<Members>,
    membership: mpsc::Sender<MembershipMsg>,
    seeds: Vec<String>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    store: Store,
    router: Router,
    presence: crate::presence::Presence,
    directory: Directory,
    /// Devices connected here, with the epoch of their login.
    hosted: Mutex<HashMap<QueueKey, u64>>,
    /// Devices that logged in here and whose previous broker has not yet
    /// handed over what it held: shipments from others wait (see
    /// [`Handoff`]).
    handoffs: Mutex<HashMap<QueueKey, Handoff>>,
    /// Woken whenever a handoff wait ends.
    handoff_ended: tokio::sync::Notify,
    /// `HandoffRequest`s of queues held for their handback, by request id.
    handbacks: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<()>>>,
    /// Shipments waiting for another broker's handoff (see [`settle`]).
    settling: Mutex<settle::Waits>,
    /// Devices that logged in here whose previous broker has not yet moved
    /// on what they sent through it (see [`flush`]): their sends wait.
    sender_flushes: Mutex<HashMap<QueueKey, tokio::sync::watch::Receiver<bool>>>,
    /// Per peer: the last account change it acknowledged (see
    /// [`accounts`]); unknown after a restart here, when it gets the whole
    /// change log again.
    account_sync: Mutex<HashMap<String, u64>>,
    ship: mpsc::Sender<ShipMsg>,
    /// Peers whose links are refused until the given time (fault drills).
    severed: Mutex<HashMap<String, tokio::time::Instant>>,
    /// What the ship actor holds per destination, for `/mesh`.
    outbox: ship::OutboxGauge,
}

/// Transport settings for peer links: quick keep-alives so a dead peer is
/// noticed in seconds, and large windows for shipped batches.
fn peer_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Duration::from_secs(5).try_into().ok());
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_concurrent_bidi_streams(4u32.into());
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    t
}

/// What a broker needs to join a mesh.
#[derive(Debug)]
pub(crate) struct MeshSetup<'a> {
    pub(crate) identity: &'a ClusterIdentity,
    pub(crate) endpoint: quinn::Endpoint,
    /// The address peers reach this broker at.
    pub(crate) advertise: SocketAddr,
    /// Members to join (`HOST:PORT`).
    pub(crate) seeds: Vec<String>,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) store: Store,
    pub(crate) router: Router,
    pub(crate) presence: crate::presence::Presence,
    pub(crate) cache_entries: u64,
    pub(crate) cache_ttl: Duration,
    pub(crate) directory_entries: u64,
}

/// How long a peer has to answer a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
impl Mesh {
    /// Starts membership and the link keeper, and dials the seeds.
    pub(crate) fn start(setup: MeshSetup<'_>) -> Result<Self, crate::tls::TlsError> {
        let client_config = setup.identity.client_config(Arc::new(peer_transport()))?;
        let me = NodeId {
            name: setup.identity.node.clone(),
            addr: setup.advertise,
            // Grows across restarts (kept in the store), so peers take a
            // restarted broker for a new incarnation rather than the one they
            // declared down.
            incarnation: setup.store.incarnation(),
        };
        let (tx, rx) = mpsc::channel(4096);
        let (ship_tx, ship_rx) = mpsc::channel(65_536);
        let (members_tx, members_rx) = watch::channel(Members::new());
        setup.store.clock().set_offset_ms(clock_offset_drill());
        let mesh = Self {
            inner: Arc::new(Inner {
                me: me.clone(),
                endpoint: setup.endpoint,
                client_config,
                links: Mutex::new(HashMap::new()),
                dialing: Mutex::new(HashSet::new()),
                members: members_rx,
                membership: tx.clone(),
                seeds: setup.seeds,
                cancel: setup.cancel.clone(),
                tasks: setup.tasks.clone(),
                store: setup.store.clone(),
                router: setup.router.clone(),
                presence: setup.presence.clone(),
                directory: Directory::new(
                    setup.cache_entries,
                    setup.cache_ttl,
                    setup.directory_entries,
                    setup.store.clock().clone(),
                ),
                hosted: Mutex::new(HashMap::new()),
                handoffs: Mutex::new(HashMap::new()),
                handoff_ended: tokio::sync::Notify::new(),
                handbacks: Mutex::new(HashMap::new()),
                settling: Mutex::new(HashMap::new()),
                sender_flushes: Mutex::new(HashMap::new()),
                account_sync: Mutex::new(HashMap::new()),
                ship: ship_tx.clone(),
                severed: Mutex::new(HashMap::new()),
                outbox: ship::OutboxGauge::default(),
            }),
        };
        setup.router.set_remote(ship::Outbox(ship_tx.clone()));
        let actor = MembershipActor::new(me, rx, &tx, members_tx, mesh.clone(), setup.cancel.clone());
        setup.tasks.spawn(actor.run());
        let gauge = mesh.inner.outbox.clone();
        let shipper = ShipActor::new(mesh.clone(), setup.store, setup.router, ship_rx, &ship_tx, gauge, setup.cancel);
        setup.tasks.spawn(shipper.run());
        setup.tasks.spawn(mesh.clone().keep_links());
        setup.tasks.spawn(mesh.clone().reregister_on_change());
        Ok(mesh)
    }

    pub(crate) fn node(&self) -> &str {
        &self.inner.me.name
    }

    fn endpoint(&self) -> &quinn::Endpoint {
        &self.inner.endpoint
    }

    fn client_config(&self) -> quinn::ClientConfig {
        self.inner.client_config.clone()
    }

    fn cancel_token(&self) -> CancellationToken {
        self.inner.cancel.clone()
    }

    fn hello(&self) -> PeerHello {
        let me = &self.inner.me;
        PeerHello { node: me.name.clone(), addr: me.addr.to_string(), incarnation: me.incarnation }
    }

    fn membership(&self, msg: MembershipMsg) {
        if self.inner.membership.try_send(msg).is_err() {
            metrics::counter!("tern_mesh_gossip_dropped_total").increment(1);
        }
    }

    /// The live members other than this broker.
    pub(crate) fn members(&self) -> Members {
        self.inner.members.borrow().clone()
    }

    /// Serves a connection that negotiated the peer ALPN.
    pub(crate) async fn accept(&self, conn: quinn::Connection) {
        let remote = conn.remote_address();
        if let Err(e) = link::accept(self.clone(), conn).await {
            metrics::counter!("tern_mesh_links_refused_total").increment(1);
            tracing::warn!(%remote, error = %e, "peer link refused");
        }
    }

    /// Dials `addr` unless a dial to it is under way already.
    fn connect(&self, addr: SocketAddr) {
        if self.inner.cancel.is_cancelled() || !lock(&self.inner.dialing).insert(addr) {
            return;
        }
        let mesh = self.clone();
        self.inner.tasks.spawn(async move {
            if let Err(e) = link::dial(mesh.clone(), addr).await {
                tracing::debug!(%addr, error = %e, "cannot link to peer");
            }
            lock(&mesh.inner.dialing).remove(&addr);
        });
    }

    /// Adds a link that finished its hello, or refuses it as a duplicate.
    /// Of two links with one peer, the one of the peer's newer incarnation
    /// wins; for the same incarnation, the one dialed by the lower node name,
    /// so both ends keep the same connection.
    fn register_link(&self, new: LinkHandle) -> bool {
        let peer = new.peer.clone();
        if self.is_severed(&peer.name) {
            return false;
        }
        let mut links = lock(&self.inner.links);
        if let Some(old) = links.get(&peer.name) {
            let preferred = self.node().min(peer.name.as_str());
            let newer = new.peer.incarnation > old.peer.incarnation;
            let same = new.peer.incarnation == old.peer.incarnation;
            if !(newer || same && new.dialer == preferred && old.dialer != preferred) {
                return false;
            }
            old.close("replaced by another link");
        }
        links.insert(peer.name.clone(), new);
        metrics::gauge!("tern_mesh_links").set(links.len() as f64);
        drop(links);
        tracing::info!(peer = ?peer, "peer link up");
        let _ = self.inner.ship.try_send(ShipMsg::LinkUp(peer.name.clone()));
        self.reregister_with(&peer.name);
        self.sync_accounts_with(&peer.name);
        self.membership(MembershipMsg::Announce(peer));
        true
    }

    fn is_severed(&self, node: &str) -> bool {
        let mut severed = lock(&self.inner.severed);
        match severed.get(node) {
            Some(until) if *until > tokio::time::Instant::now() => true,
            Some(_) => {
                severed.remove(node);
                false
            }
            None => false,
        }
    }

    /// Closes the link to `node` and refuses it (both ways) for `duration`:
    /// a fault drill, showing that forwards in flight survive a cut link.
    pub(crate) fn sever(&self, node: &str, duration: Duration) {
        lock(&self.inner.severed).insert(node.to_owned(), tokio::time::Instant::now() + duration);
        if let Some(link) = self.link(node) {
            link.close("severed");
        }
    }

    fn unregister_link(&self, link: &LinkHandle) {
        let mut links = lock(&self.inner.links);
        if links.get(&link.peer.name).is_some_and(|l| l.id == link.id) {
            links.remove(&link.peer.name);
            let _ = self.inner.ship.try_send(ShipMsg::LinkDown(link.peer.name.clone()));
        }
        metrics::gauge!("tern_mesh_links").set(links.len() as f64);
    }

    pub(crate) fn link(&self, node: &str) -> Option<LinkHandle> {
        lock(&self.inner.links).get(node).cloned()
    }

    /// Sends a gossip packet to `to`, dialing it if there is no link yet (the
    /// packet is then dropped; SWIM retries).
    fn send_gossip(&self, to: &NodeId, packet: Bytes) {
        match self.link(&to.name) {
            Some(link) => link.send_packet(packet),
            None if self.is_severed(&to.name) => {}
            None => self.connect(to.addr),
        }
    }

    /// Handles a frame from a peer. Runs on the link's task: anything that
    /// waits on another broker is spawned, and shipped entries are queued for
    /// the store here, in link order.
    async fn on_frame(&self, from: &LinkHandle, frame: PeerFrame) {
        match frame.kind {
            Some(P::Gossip(g)) => self.membership(MembershipMsg::Packet(g.packet)),
            Some(P::Ship(ship)) => self.on_ship(from, ship).await,
            Some(P::ShipAck(ack)) => {
                let Ok(queue) = queue_key(&ack.handle, ack.device) else { return };
                let node = from.peer.name.clone();
                let _ = self.inner.ship.send(ShipMsg::Acked { node, queue, up_to: ack.up_to }).await;
            }
            Some(P::Location(loc)) => {
                let Ok(queue) = queue_key(&loc.handle, loc.device) else { return };
                self.record_location(queue, Location { node: loc.node, epoch: loc.epoch });
            }
            Some(P::Moved(moved)) => {
                let Ok(queue) = queue_key(&moved.handle, moved.device) else { return };
                let from = Some(moved.from_node).filter(|n| !n.is_empty());
                self.on_moved(queue, Location { node: moved.node, epoch: moved.epoch }, from);
            }
            Some(P::HandoffDone(done)) => {
                let Ok(queue) = queue_key(&done.handle, done.device) else { return };
                let node = from.peer.name.clone();
                let returned = ShipMsg::Returned { node, queue: queue.clone() };
                let _ = self.inner.ship.send(returned).await;
                if done.request_id != 0 {
                    if let Some(waiter) = lock(&self.inner.handbacks).remove(&done.request_id) {
                        let _ = waiter.send(());
                    }
                    self.on_handoff_answer(&queue, &from.peer.name, done.request_id).await;
                    return;
                }
                let mut handoffs = lock(&self.inner.handoffs);
                if handoffs.get(&queue).is_some_and(|h| h.from.as_deref() == Some(from.peer.name.as_str())) {
                    handoffs.remove(&queue);
                    self.inner.handoff_ended.notify_waiters();
                    metrics::counter!("tern_mesh_handoffs_total").increment(1);
                }
            }
            Some(P::ShipNack(n)) => {
                let Ok(queue) = queue_key(&n.handle, n.device) else { return };
                let node = from.peer.name.clone();
                let retry_after = Duration::from_millis(u64::from(n.retry_after_ms).min(60_000));
                let _ = self.inner.ship.send(ShipMsg::Nacked { node, queue, expected: n.expected, retry_after }).await;
            }
            Some(P::HandoffRequest(r)) => {
                let Ok(queue) = queue_key(&r.handle, r.device) else { return };
                let node = from.peer.name.clone();
                let _ = self.inner.ship.send(ShipMsg::HandoffAsked { node, queue, id: r.request_id }).await;
            }
            Some(P::ShipDefer(d)) => {
                let Ok(queue) = queue_key(&d.handle, d.device) else { return };
                let node = from.peer.name.clone();
                let _ = self.inner.ship.send(ShipMsg::Deferred { node, queue }).await;
            }
            Some(P::Request(req)) => {
                let (mesh, link) = (self.clone(), from.clone());
                self.inner.tasks.spawn(async move {
                    let answer = match req.kind {
                        Some(kind) => tokio::select! {
                            () = mesh.inner.cancel.cancelled() => return,
                            answer = mesh.serve(kind, &link.peer.name) => answer,
                        },
                        None => reply::Kind::Failure(failure(ErrorCode::UnknownFrame, "empty request")),
                    };
                    link.reply(req.id, answer);
                });
            }
            Some(P::Notice(n)) => self.on_notice(n),
            Some(P::PresenceChange(c)) => self.on_presence_change(c),
            Some(P::DatagramRelay(d)) => {
                let Ok(queue) = queue_key(&d.handle, d.device) else { return };
                self.inner.router.notify(&queue, crate::router::Notice::Datagram(d.datagram));
            }
            Some(P::Reply(r)) => from.on_reply(r),
            Some(P::Hello(_)) => tracing::debug!(peer = %from.peer.name, "second hello ignored"),
            None => metrics::counter!("tern_mesh_frames_ignored_total").increment(1),
        }
    }

    /// Stores shipped entries (queued for the writer before the next frame
    /// is read, so in link order) and acknowledges them once durable; or
    /// says why nothing was stored (a gap, a wait for another broker's
    /// handoff, a store failure), so the sender resends from the right seq.
    async fn on_ship(&self, from: &LinkHandle, ship: pp::Ship) {
        let Ok(queue) = queue_key(&ship.handle, ship.device) else { return };
        let Ok(origin) = <[u8; 16]>::try_from(ship.origin.as_ref()) else { return };
        // A holder's shipment (`hold`) is stored even though the device is
        // elsewhere: this broker asked for it, and ships it on.
        if !ship.hold && self.defers(&queue, &from.peer.name) {
            metrics::counter!("tern_mesh_ship_deferred_total").increment(1);
            tracing::debug!(%queue, from = %from.peer.name, "shipment deferred (the device is elsewhere, or waits for its handoff)");
            let defer = pp::ShipDefer { handle: queue.handle().to_owned(), device: queue.device() };
            from.send(PeerFrame { kind: Some(P::ShipDefer(defer)) });
            return;
        }
        // Entries another broker acknowledged matter only if it is not this one.
        let via = Some(ship.handed_to).filter(|n| !n.is_empty() && n != self.node());
        let header = ShipHeader { base: ship.base, handed_up_to: if via.is_some() { ship.handed_up_to } else { 0 } };
        let entries = ship.entries.into_iter().map(|e| (e.seq, e.value)).collect();
        let outcome = match self.inner.store.submit_ship(origin, queue.clone(), header, entries).await {
            Ok(o) => o,
            Err(e) => {
                from.nack(&queue, 0, store_code(&e), STORE_RETRY);
                return;
            }
        };
        let (mesh, link) = (self.clone(), from.clone());
        self.inner.tasks.spawn(async move {
            match outcome.await {
                Ok(ShipOutcome::Acked(up_to)) => link.ack(queue.handle(), queue.device(), up_to),
                Ok(ShipOutcome::Gap { expected }) => {
                    tracing::debug!(%queue, from = %link.peer.name, expected, "shipment refused: a gap");
                    link.nack(&queue, expected, ErrorCode::Unspecified, Duration::ZERO)
                }
                Ok(ShipOutcome::Wait { up_to, expected }) => {
                    let Some(via) = via else { return };
                    tracing::debug!(%queue, from = %link.peer.name, %via, up_to, "shipment waits for a handoff");
                    let retry = mesh.await_handoff(&queue, &via, origin, up_to).await;
                    link.nack(&queue, expected, ErrorCode::Unspecified, retry);
                }
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "shipped entries not stored; the sender will resend");
                    link.nack(&queue, 0, store_code(&e), STORE_RETRY);
                }
            }
        });
    }

    /// Answers a peer's request.
    async fn serve(&self, kind: request::Kind, asker: &str) -> reply::Kind {
        match kind {
            request::Kind::Lookup(l) => {
                let location = queue_key(&l.handle, l.device).ok().and_then(|q| self.known_location(&q));
                let (node, epoch) = location.map_or((String::new(), 0), |l| (l.node, l.epoch));
                reply::Kind::Lookup(pp::LookupReply { node, epoch })
            }
            request::Kind::AccountGet(g) => self.serve_account_get(&g.handle),
            request::Kind::AccountWrite(w) => self.serve_account_write(w).await,
            request::Kind::AccountPut(p) => self.serve_account_put(&p.account).await,
            request::Kind::AccountUnlink(u) => self.serve_account_unlink(u).await,
            request::Kind::AccountProfile(p) => {
                self.serve_account_change(&p.handle, accounts::AccountChange::profile(&p.update)).await
            }
            request::Kind::AccountPresence(p) => {
                self.serve_account_change(&p.handle, accounts::AccountChange::presence(&p.update)).await
            }
            request::Kind::AccountPush(p) => {
                self.serve_account_change(&p.handle, accounts::AccountChange::push(p.device, &p.subscription)).await
            }
            request::Kind::SenderFlush(f) => self.serve_sender_flush(f, asker).await,
            kind @ (request::Kind::KeysPublish(_) | request::Kind::KeysClaim(_) | request::Kind::KeysPut(_)) => {
                self.serve_keys(kind).await
            }
        }
    }

    /// Keeps a link to every live member, and dials the seeds while no
    /// member is known. Of a pair, the lower node name dials first; the
    /// other dials too when a member has had no link for a few seconds.
    async fn keep_links(self) {
        let mut every = tokio::time::interval(Duration::from_millis(500));
        let mut members = self.inner.members.clone();
        let mut missing_since: HashMap<String, tokio::time::Instant> = HashMap::new();
        // When each linked non-member was last announced to.
        let mut announced: HashMap<String, tokio::time::Instant> = HashMap::new();
        let mut seed_backoff = Duration::from_millis(250);
        let mut next_seed_dial = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = self.inner.cancel.cancelled() => return,
                _ = every.tick() => {}
                changed = members.changed() => if changed.is_err() { return },
            }
            let now = tokio::time::Instant::now();
            let live = self.members();
            missing_since.retain(|name, _| live.contains_key(name));
            for (name, id) in &live {
                if self.link(name).is_some() {
                    missing_since.remove(name);
                    continue;
                }
                let since = *missing_since.entry(name.clone()).or_insert(now);
                if self.node() < name.as_str() || now - since > Duration::from_secs(2) {
                    self.connect(id.addr);
                }
            }
            // A link up to a broker that is not a live member: the two
            // declared each other down (a partition, or a pause longer
            // than the failure detector's timeout) and the link came back.
            // foca only gossips with live members, so nothing would ever
            // tell either side the other is back: introduce ourselves
            // again, every few seconds, until it is a member. (foca then
            // has the side declared down renew its identity and rejoin.)
            let unmet: Vec<NodeId> = lock(&self.inner.links)
                .values()
                .filter(|l| !live.contains_key(&l.peer.name))
                .map(|l| l.peer.clone())
                .collect();
            announced.retain(|name, _| unmet.iter().any(|p| &p.name == name));
            for peer in unmet {
                let due = announced.get(&peer.name).is_none_or(|at| now - *at >= REANNOUNCE_EVERY);
                if due {
                    announced.insert(peer.name.clone(), now);
                    self.membership(MembershipMsg::Announce(peer));
                }
            }
            if live.is_empty() && now >= next_seed_dial && !self.inner.seeds.is_empty() {
                for seed in &self.inner.seeds {
                    match tokio::net::lookup_host(seed).await {
                        Ok(addrs) => addrs.filter(|a| *a != self.inner.me.addr).for_each(|a| self.connect(a)),
                        Err(e) => tracing::warn!(seed = %seed, error = %e, "cannot resolve --join address"),
                    }
                }
                next_seed_dial = now + seed_backoff;
                seed_backoff = (seed_backoff * 2).min(Duration::from_secs(5));
            } else if !live.is_empty() {
                seed_backoff = Duration::from_millis(250);
            }
        }
    }

    /// Tells the other members this broker is leaving (best effort, on
    /// shutdown), so they stop probing it at once.
    pub(crate) async fn leave(&self) {
        let (done, wait) = oneshot::channel();
        if self.inner.membership.send(MembershipMsg::Leave(done)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
            // Let the datagrams go out before the links close.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `TERN_TEST_CLOCK_OFFSET_MS`: shifts this broker's epoch clock, so tests
/// can show that skewed clocks do not order logins wrongly. Not for
/// production use.
fn clock_offset_drill() -> i64 {
    std::env::var("TERN_TEST_CLOCK_OFFSET_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A peer-supplied device name, checked.
fn queue_key(handle: &str, device: u32) -> Result<QueueKey, tern_protocol::HandleError> {
    tern_protocol::validate_handle(handle)?;
    Ok(QueueKey::new(handle, device))
}

/// How often a broker introduces itself again over a link to a broker that
/// is not a live member (see `keep_links`).
const REANNOUNCE_EVERY: Duration = Duration::from_secs(2);

/// How long a sender waits after the store here failed to take its entries.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// The error code a store failure is reported with to a peer.
fn store_code(e: &crate::store::StoreError) -> ErrorCode {
    use crate::store::StoreError as E;
    match e {
        E::QueueFull(..) => ErrorCode::QueueFull,
        E::Full(_) => ErrorCode::StorageFull,
        E::Closed => ErrorCode::ShuttingDown,
        _ => ErrorCode::StorageError,
    }
}

fn failure(code: ErrorCode, message: impl Into<String>) -> pp::Failure {
    pp::Failure { code: code as i32, message: message.into() }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
