//! One peer link: a QUIC connection to another broker of the mesh.
//!
//! Either end may dial (ALPN `tern-peer/1`, mutual TLS under the cluster CA).
//! The dialer opens the link stream and both ends send a `PeerHello` first;
//! the name in it must be the common name of the certificate the peer proved
//! it holds. Then three tasks share the link, so none waits for another:
//!
//! - the reader hands frames to the [`Mesh`] in link order (for shipped
//!   entries it waits for the store to take them: the link's backpressure);
//! - the writer blocks for one outgoing frame the mesh queued, drains every
//!   other one already queued, and writes them with one call, so frames
//!   share packets; `ShipAck`s wait up to `ACK_DELAY` to ride along;
//! - gossip datagrams are read on their own, so failure detection never
//!   waits for the stream.
//!
//! So a write that waits for the peer's flow control never stops the
//! reading that frees the peer's own writes: two brokers shipping more than
//! a window at each other would otherwise both wait forever, while QUIC
//! keep-alives hold the stuck link up. When any of the three ends, the
//! others are stopped and the link is torn down once.
//!
//! A connection a peer dialed is accepted with the endpoint's client-facing
//! transport settings (the ALPN is known only after the handshake); it gets
//! the windows of a peer link once it is known to be one (see
//! [`peer_windows`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tern_protocol::peer::{
    peer_frame::Kind as P, reply, request, Gossip, PeerFrame, PeerHello, Reply, Request, ShipAck, ShipNack,
};
use tern_protocol::{codec, DecodeError};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::cluster_tls::{peer_node_name, PEER_SERVER_NAME};
use super::membership::{MembershipMsg, NodeId};
use super::Mesh;

/// Largest peer frame: a batch of shipped entries up to this size.
pub(crate) const MAX_PEER_FRAME: usize = 8 << 20;
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames queued for one link before senders wait.
const OUTBOX_FRAMES: usize = 4096;
/// Most frames written with one call.
const BATCH_FRAMES: usize = 1024;
/// Connection receive and send windows of a peer link, as
/// [`super::peer_transport`] gives the dialer: room for shipped batches at
/// WAN round trips.
const RECEIVE_WINDOW: u32 = 32 << 20;
/// See [`RECEIVE_WINDOW`].
const SEND_WINDOW: u64 = 32 << 20;
/// How long a `ShipAck` may wait for others to share its packet. Only the
/// sender's deletion of its copy waits on it, never a delivery.
const ACK_DELAY: Duration = Duration::from_millis(5);

/// Why a link could not be set up, or ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the peer presented no cluster certificate")]
    NoCertificate,
    #[error("the peer's certificate names {cert:?} but it says it is {hello:?}")]
    NameMismatch { cert: String, hello: String },
    #[error("dialed ourselves")]
    SelfLink,
    #[error("peer protocol: {0}")]
    Protocol(String),
    #[error("no hello within {HELLO_TIMEOUT:?}")]
    Timeout,
}

/// Why a request to a peer got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("broker {0} did not answer in time")]
    Timeout(String),
    #[error("the link to broker {0} went down")]
    LinkDown(String),
    #[error("broker {node} refused: {message}")]
    Failure { node: String, code: tern_protocol::ErrorCode, message: String },
}

type PendingReplies = Arc<Mutex<HashMap<u64, oneshot::Sender<reply::Kind>>>>;

/// What the rest of the broker holds of a live link.
#[derive(Clone, Debug)]
pub(crate) struct LinkHandle {
    pub(crate) id: u64,
    pub(crate) peer: NodeId,
    /// The node that dialed this connection (duplicate links keep the one
    /// dialed by the lower node name).
    pub(crate) dialer: String,
    pub(crate) since: Instant,
    conn: quinn::Connection,
    out: mpsc::Sender<PeerFrame>,
    stats: Arc<LinkStats>,
    pending: PendingReplies,
    acks: Arc<Acks>,
}

/// `ShipAck`s waiting to be written: the highest seq per queue.
#[derive(Debug, Default)]
struct Acks {
    up_to: Mutex<HashMap<(String, u32), u64>>,
    /// Told when the first ack goes into an empty map.
    first: tokio::sync::Notify,
}

impl Acks {
    /// Records an ack (the highest per queue wins). True when it is the
    /// first one waiting.
    fn add(&self, handle: &str, device: u32, up_to: u64) -> bool {
        let mut acks = self.up_to.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = acks.is_empty();
        let seq = acks.entry((handle.to_owned(), device)).or_default();
        *seq = (*seq).max(up_to);
        first
    }

    /// The waiting acks as frames; empties the map.
    fn take(&self) -> Vec<PeerFrame> {
        let acks = std::mem::take(&mut *self.up_to.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        acks.into_iter()
            .map(|((handle, device), up_to)| PeerFrame { kind: Some(P::ShipAck(ShipAck { handle, device, up_to })) })
            .collect()
    }
}

/// Counters of one link, for `/mesh` and metrics.
#[derive(Debug, Default)]
pub(crate) struct LinkStats {
    pub(crate) frames_out: AtomicU64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) writes: AtomicU64,
}

impl LinkHandle {
    /// Queues a frame; false when the link is gone or its queue is full.
    pub(crate) fn send(&self, frame: PeerFrame) -> bool {
        self.out.try_send(frame).is_ok()
    }

    /// Acknowledges shipped entries of `handle`/`device` up to `up_to`. Acks
    /// wait up to `ACK_DELAY` to share a packet with other frames; several
    /// for one queue become one.
    pub(crate) fn ack(&self, handle: &str, device: u32, up_to: u64) {
        if self.acks.add(handle, device, up_to) {
            self.acks.first.notify_one();
        }
    }

    /// Tells the peer nothing of its shipment of `queue` was stored: it
    /// should resend from `expected` (0: from what was acknowledged), no
    /// sooner than `retry_after`.
    pub(crate) fn nack(
        &self,
        queue: &crate::store::QueueKey,
        expected: u64,
        code: tern_protocol::ErrorCode,
        retry_after: Duration,
    ) {
        let nack = ShipNack {
            handle: queue.handle().to_owned(),
            device: queue.device(),
            expected,
            code: code as i32,
            retry_after_ms: u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX),
        };
        self.send(PeerFrame { kind: Some(P::ShipNack(nack)) });
    }

    /// Queues a frame, waiting for room; false when the link is gone.
    pub(crate) async fn send_wait(&self, frame: PeerFrame) -> bool {
        self.out.send(frame).await.is_ok()
    }

    /// Sends a gossip packet: as a datagram when it fits, else (or when the
    /// datagram cannot be sent) as a frame on the link stream.
    pub(crate) fn send_packet(&self, packet: Bytes) {
        let fits = self.conn.max_datagram_size().is_some_and(|max| packet.len() <= max);
        if fits && self.conn.send_datagram(packet.clone()).is_ok() {
            return;
        }
        self.send(PeerFrame { kind: Some(P::Gossip(Gossip { packet })) });
    }

    /// Round-trip time QUIC measures on the link.
    pub(crate) fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    pub(crate) fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// Frames waiting to be written.
    pub(crate) fn queued(&self) -> usize {
        OUTBOX_FRAMES - self.out.capacity()
    }

    /// Sends a request and waits up to `timeout` for its reply.
    pub(crate) async fn request(&self, kind: request::Kind, timeout: Duration) -> Result<reply::Kind, PeerError> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id, tx);
        let node = &self.peer.name;
        if !self.send_wait(PeerFrame { kind: Some(P::Request(Request { id, kind: Some(kind) })) }).await {
            return Err(PeerError::LinkDown(node.clone()));
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
        match answer {
            Err(_) => Err(PeerError::Timeout(node.clone())),
            Ok(Err(_)) => Err(PeerError::LinkDown(node.clone())),
            Ok(Ok(reply::Kind::Failure(f))) => Err(PeerError::Failure {
                node: node.clone(),
                code: tern_protocol::ErrorCode::try_from(f.code).unwrap_or(tern_protocol::ErrorCode::Internal),
                message: f.message,
            }),
            Ok(Ok(kind)) => Ok(kind),
        }
    }

    /// Answers request `id` of the peer.
    pub(crate) fn reply(&self, id: u64, kind: reply::Kind) {
        self.send(PeerFrame { kind: Some(P::Reply(Reply { id, kind: Some(kind) })) });
    }

    /// Completes a request this end made.
    pub(crate) fn on_reply(&self, reply: Reply) {
        let waiter = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&reply.id);
        if let (Some(waiter), Some(kind)) = (waiter, reply.kind) {
            let _ = waiter.send(kind);
        }
    }

    pub(crate) fn close(&self, reason: &'static str) {
        self.conn.close(1u32.into(), reason.as_bytes());
    }
}

/// Dials `addr` and runs the link until it ends.
pub(crate) async fn dial(mesh: Mesh, addr: SocketAddr) -> Result<(), LinkError> {
    let conn = mesh.endpoint().connect_with(mesh.client_config(), addr, PEER_SERVER_NAME)?.await?;
    let cert_name = peer_node_name(&conn).ok_or(LinkError::NoCertificate)?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut inbuf = BytesMut::new();
    let hello = mesh.hello();
    write_frames(&mut send, &[PeerFrame { kind: Some(P::Hello(hello)) }]).await?;
    let peer = read_hello(&mut recv, &mut inbuf, &cert_name).await?;
    if peer.name == mesh.node() {
        conn.close(2u32.into(), b"self");
        return Err(LinkError::SelfLink);
    }
    run(mesh.clone(), conn, send, recv, inbuf, peer, mesh.node().to_owned()).await;
    Ok(())
}

/// Serves a connection a peer dialed, until the link ends.
pub(crate) async fn accept(mesh: Mesh, conn: quinn::Connection) -> Result<(), LinkError> {
    let Some(cert_name) = peer_node_name(&conn) else {
        conn.close(3u32.into(), b"a cluster certificate is required");
        return Err(LinkError::NoCertificate);
    };
    peer_windows(&conn);
    let (mut send, mut recv) =
        tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await.map_err(|_| LinkError::Timeout)??;
    let mut inbuf = BytesMut::new();
    let peer = read_hello(&mut recv, &mut inbuf, &cert_name).await?;
    if peer.name == mesh.node() {
        conn.close(2u32.into(), b"self");
        return Err(LinkError::SelfLink);
    }
    write_frames(&mut send, &[PeerFrame { kind: Some(P::Hello(mesh.hello())) }]).await?;
    let dialer = peer.name.clone();
    run(mesh, conn, send, recv, inbuf, peer, dialer).await;
    Ok(())
}

/// Gives a connection accepted on the client port the windows of a peer
/// link. The endpoint has one server transport config, the client-facing
/// one, and what tells a peer from a client (the ALPN) is known only after
/// the handshake; of [`super::peer_transport`], quinn lets a live connection
/// change the connection's receive and send windows, set here. The rest
/// holds without it: the client-facing per-stream receive window is as large
/// as a peer link's (the connection window bounds what one client may make
/// the broker buffer); the idle timeout is negotiated as the smaller of both
/// ends' (the dialer's 5 s); and the dialer's keep-alive every second resets
/// this end's keep-alive timer (quinn restarts it on every packet received),
/// so the client-facing one never fires on a live link, and a dead dialer is
/// noticed by the idle timeout.
fn peer_windows(conn: &quinn::Connection) {
    conn.set_receive_window(RECEIVE_WINDOW.into());
    conn.set_send_window(SEND_WINDOW);
}

async fn read_hello(recv: &mut quinn::RecvStream, inbuf: &mut BytesMut, cert_name: &str) -> Result<NodeId, LinkError> {
    let read = async {
        loop {
            match codec::decode_peer_frame(inbuf, MAX_PEER_FRAME) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => return Err(LinkError::Protocol(e.to_string())),
            }
            inbuf.reserve(4096);
            match recv.read_buf(inbuf).await {
                Ok(0) => return Err(LinkError::Protocol("link stream closed before the hello".into())),
                Ok(_) => {}
                Err(e) => return Err(LinkError::Protocol(e.to_string())),
            }
        }
    };
    let frame = tokio::time::timeout(HELLO_TIMEOUT, read).await.map_err(|_| LinkError::Timeout)??;
    let Some(P::Hello(PeerHello { node, addr, incarnation })) = frame.kind else {
        return Err(LinkError::Protocol("the first frame is not a hello".into()));
    };
    if node != cert_name {
        return Err(LinkError::NameMismatch { cert: cert_name.to_owned(), hello: node });
    }
    let addr = addr.parse().map_err(|e| LinkError::Protocol(format!("hello address {addr:?}: {e}")))?;
    Ok(NodeId { name: node, addr, incarnation })
}

async fn write_frames(send: &mut quinn::SendStream, frames: &[PeerFrame]) -> Result<(), LinkError> {
    let mut buf = BytesMut::new();
    for frame in frames {
        codec::encode(frame, MAX_PEER_FRAME, &mut buf).map_err(|e| LinkError::Protocol(e.to_string()))?;
    }
    send.write_chunk(buf.freeze()).await.map_err(|e| LinkError::Protocol(e.to_string()))
}

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// The link's life: registered with the mesh (or closed as a duplicate),
/// then its reader (this task), writer and datagram tasks, until any of them
/// ends (the peer went away, a write failed, a bad frame) or the broker shuts
/// down; the others are then stopped and the link is torn down, once.
async fn run(
    mesh: Mesh,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    inbuf: BytesMut,
    peer: NodeId,
    dialer: String,
) {
    let (tx, rx) = mpsc::channel(OUTBOX_FRAMES);
    let handle = LinkHandle {
        id: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
        peer: peer.clone(),
        dialer,
        since: Instant::now(),
        conn: conn.clone(),
        out: tx,
        stats: Arc::new(LinkStats::default()),
        pending: PendingReplies::default(),
        acks: Arc::default(),
    };
    if !mesh.register_link(handle.clone()) {
        conn.close(4u32.into(), b"duplicate link");
        return;
    }
    // Stops the link's tasks: cancelled when any of them ends, or this one
    // is dropped, and on shutdown.
    let stop = mesh.cancel_token().child_token();
    let _stop_link = stop.clone().drop_guard();
    let writer = Writer { send, rx, acks: handle.acks.clone(), stats: handle.stats.clone(), acks_due: None };
    let writer = tokio::spawn(writer.run(stop.clone()));
    let datagrams = tokio::spawn(read_datagrams(mesh.clone(), conn.clone(), stop.clone()));
    let read = tokio::select! {
        end = read_until_end(&mesh, &handle, recv, inbuf) => Some(end),
        () = stop.cancelled() => None,
    };
    stop.cancel();
    let ended = |r: Result<Option<String>, tokio::task::JoinError>| r.unwrap_or_else(|e| Some(e.to_string()));
    let (wrote, datagram) = (ended(writer.await), ended(datagrams.await));
    let end = read.or(wrote).or(datagram).unwrap_or_else(|| "shutdown".to_owned());
    tracing::info!(peer = ?peer, reason = %end, "peer link down");
    mesh.unregister_link(&handle);
    // Waiters see the link go down instead of waiting for their timeout.
    handle.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    conn.close(0u32.into(), b"bye");
}

/// The reader: hands the peer's frames to the mesh, in link order, first
/// those that came in the same read as its hello. Returns why it ended.
async fn read_until_end(mesh: &Mesh, handle: &LinkHandle, mut recv: quinn::RecvStream, mut inbuf: BytesMut) -> String {
    loop {
        if let Err(e) = read_frames(mesh, handle, &mut inbuf).await {
            tracing::warn!(peer = %handle.peer.name, error = %e, "bad frame from peer; closing the link");
            handle.conn.close(5u32.into(), b"bad frame");
            return format!("bad frame: {e}");
        }
        match recv.read_buf(reserve(&mut inbuf)).await {
            Ok(0) => return "stream closed".to_owned(),
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
}

/// Hands every complete frame in `inbuf` to the mesh.
async fn read_frames(mesh: &Mesh, handle: &LinkHandle, inbuf: &mut BytesMut) -> Result<(), DecodeError> {
    while let Some(frame) = codec::decode_peer_frame(inbuf, MAX_PEER_FRAME)? {
        handle.stats.frames_in.fetch_add(1, Ordering::Relaxed);
        mesh.on_frame(handle, frame).await;
    }
    Ok(())
}

/// Hands gossip datagrams to membership until the link stops. Returns why
/// it ended, if not stopped.
async fn read_datagrams(mesh: Mesh, conn: quinn::Connection, stop: CancellationToken) -> Option<String> {
    let _stop_link = stop.clone().drop_guard();
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            datagram = conn.read_datagram() => match datagram {
                Ok(packet) => mesh.membership(MembershipMsg::Packet(packet)),
                Err(e) => return Some(e.to_string()),
            },
        }
    }
}

/// The writer: the frames the mesh queues for the peer, and `ShipAck`s.
struct Writer {
    send: quinn::SendStream,
    rx: mpsc::Receiver<PeerFrame>,
    acks: Arc<Acks>,
    stats: Arc<LinkStats>,
    /// When the waiting acks go out, unless other frames take them first.
    acks_due: Option<tokio::time::Instant>,
}

impl Writer {
    /// Writes batches until the link stops. Returns why it ended, if not
    /// stopped.
    async fn run(mut self, stop: CancellationToken) -> Option<String> {
        let _stop_link = stop.clone().drop_guard();
        let mut out = BytesMut::new();
        loop {
            let frames = tokio::select! {
                () = stop.cancelled() => return None,
                frames = self.next_batch() => frames,
            };
            let Some(frames) = frames else { return Some("link dropped".to_owned()) };
            tokio::select! {
                () = stop.cancelled() => return None,
                written = write_batch(&mut self.send, &mut out, &frames, &self.stats) => {
                    if let Err(e) = written {
                        return Some(e);
                    }
                }
            }
        }
    }

    /// Waits for something to write: one queued frame and every other one
    /// already queued (up to `BATCH_FRAMES`), with the waiting acks; or the
    /// acks alone once they waited `ACK_DELAY`. None when the outbox closed.
    async fn next_batch(&mut self) -> Option<Vec<PeerFrame>> {
        loop {
            tokio::select! {
                biased;
                () = self.acks.first.notified(), if self.acks_due.is_none() => {
                    self.acks_due = Some(tokio::time::Instant::now() + ACK_DELAY);
                }
                () = tokio::time::sleep_until(self.acks_due.unwrap_or_else(tokio::time::Instant::now)), if self.acks_due.is_some() => {
                    self.acks_due = None;
                    let frames = self.acks.take();
                    if !frames.is_empty() {
                        return Some(frames);
                    }
                }
                frame = self.rx.recv() => {
                    let mut frames = vec![frame?];
                    while frames.len() < BATCH_FRAMES {
                        match self.rx.try_recv() {
                            Ok(f) => frames.push(f),
                            Err(_) => break,
                        }
                    }
                    // Waiting acks ride along.
                    if self.acks_due.take().is_some() {
                        frames.extend(self.acks.take());
                    }
                    return Some(frames);
                }
            }
        }
    }
}

/// Encodes `frames` and writes them with one call, so they share packets.
async fn write_batch(
    send: &mut quinn::SendStream,
    out: &mut BytesMut,
    frames: &[PeerFrame],
    stats: &LinkStats,
) -> Result<(), String> {
    if frames.is_empty() {
        return Ok(());
    }
    for f in frames {
        if let Err(e) = codec::encode(f, MAX_PEER_FRAME, out) {
            tracing::error!(error = %e, "peer frame not sent");
        }
    }
    stats.frames_out.fetch_add(frames.len() as u64, Ordering::Relaxed);
    stats.writes.fetch_add(1, Ordering::Relaxed);
    send.write_chunk(out.split().freeze()).await.map_err(|e| e.to_string())
}

fn reserve(buf: &mut BytesMut) -> &mut BytesMut {
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_acks_become_one_frame_per_queue_with_the_highest_seq() {
        let acks = Acks::default();
        assert!(acks.add("bob", 1, 5), "the first ack starts the delay");
        assert!(!acks.add("bob", 1, 9));
        assert!(!acks.add("bob", 1, 7), "an older ack does not lower it");
        assert!(!acks.add("carol", 2, 3));
        let mut frames: Vec<(String, u32, u64)> = acks
            .take()
            .into_iter()
            .map(|f| match f.kind {
                Some(P::ShipAck(a)) => (a.handle, a.device, a.up_to),
                other => panic!("not a ShipAck: {other:?}"),
            })
            .collect();
        frames.sort();
        assert_eq!(frames, [("bob".to_owned(), 1, 9), ("carol".to_owned(), 2, 3)]);
        assert!(acks.take().is_empty());
        assert!(acks.add("bob", 1, 10), "after a flush the next ack starts a new delay");
    }

    /// A dialed and an accepted connection between two cluster nodes, set
    /// up as brokers do: the dialer with `peer_transport`, the acceptor on an
    /// endpoint with the client-facing transport config, then `peer_windows`.
    async fn peer_pair(dir: &std::path::Path) -> ([quinn::Endpoint; 2], quinn::Connection, quinn::Connection) {
        use crate::mesh::{create_ca, create_node_cert, ClusterIdentity};
        let ca = dir.join("ca");
        create_ca(&ca).unwrap();
        let ids: Vec<ClusterIdentity> = ["n1", "n2"]
            .iter()
            .map(|n| {
                create_node_cert(&ca, n, &dir.join(n)).unwrap();
                ClusterIdentity::load(&dir.join(n), n).unwrap()
            })
            .collect();
        let tls = crate::tls::TlsIdentity::load_or_generate(None, None, &dir.join("tls"), &[]).unwrap();
        let mut server = quinn::ServerConfig::with_crypto(tls.server_crypto(Some(&ids[0])).unwrap());
        server.transport_config(Arc::new(crate::transport::transport_config(30)));
        let acceptor = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let dialer = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let config = ids[1].client_config(Arc::new(super::super::peer_transport())).unwrap();
        let addr = acceptor.local_addr().unwrap();
        let dialing = dialer.connect_with(config, addr, PEER_SERVER_NAME).unwrap();
        let (dialed, accepted) = tokio::join!(dialing, async { acceptor.accept().await.unwrap().await });
        let accepted = accepted.unwrap();
        peer_windows(&accepted);
        ([acceptor, dialer], dialed.unwrap(), accepted)
    }

    /// Bytes `send` takes, in 1 MiB writes up to `limit`, before a write
    /// waits a second (the reader reads nothing).
    async fn written_ahead(send: &mut quinn::SendStream, limit: usize) -> usize {
        let chunk = Bytes::from(vec![0u8; 1 << 20]);
        let mut written = 0;
        while written < limit {
            match tokio::time::timeout(Duration::from_secs(1), send.write_chunk(chunk.clone())).await {
                Ok(Ok(())) => written += chunk.len(),
                _ => break,
            }
        }
        written
    }

    /// Ahead of a reader that is busy (the store applying a shipment), a
    /// writer gets as far as the reader's stream window, 16 MiB on a peer
    /// link, both ways: an accepted link too, though accepted with the
    /// client-facing settings (with them the dialer got 1 MiB ahead, the
    /// acceptor 2 MiB).
    #[tokio::test]
    async fn an_accepted_link_has_a_peer_links_windows_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let (_endpoints, dialed, accepted) = peer_pair(dir.path()).await;
        let (mut to_acceptor, _from_acceptor) = dialed.open_bi().await.unwrap();
        to_acceptor.write_all(b"hello").await.unwrap();
        let (mut to_dialer, _from_dialer) = accepted.accept_bi().await.unwrap();
        let limit = 15 << 20;
        let ahead = written_ahead(&mut to_acceptor, limit).await;
        assert_eq!(ahead >> 20, limit >> 20, "MiB the dialer could write ahead of the acceptor");
        let ahead = written_ahead(&mut to_dialer, limit).await;
        assert_eq!(ahead >> 20, limit >> 20, "MiB the acceptor could write ahead of the dialer");
    }
}
