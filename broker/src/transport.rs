//! The QUIC endpoint and its accept loop: each incoming connection is
//! checked against the connection limit, completes its handshake, opens its
//! session stream and becomes a [`Session`](crate::session::Session) task.
//!
//! Before the broker keeps any state for a connection attempt
//! ([`admit`]): while more than `limits.handshakes_before_retry`
//! handshakes are in progress, an address that has not proved it receives
//! what is sent to it gets a stateless Retry (RFC 9000, 8.1.2), so spoofed
//! Initials cost one small packet each; then the attempt takes one of the
//! `limits.max_connections` permits, or is refused. The permit is held by
//! the connection task until it ends, handshake included, so the cap
//! counts everything the broker keeps state for. A connection that turns
//! out to be a peer broker's (ALPN `tern-peer/1`, known only after the
//! handshake) gives its permit back and is allowed the streams of a peer
//! link; a client connection gets one bidirectional stream, the session's.
//!
//! The endpoint's stateless reset key is made once and kept in the data
//! directory ([`endpoint_config`]), so a broker restarted after a crash
//! answers its predecessor's connections with a stateless reset (RFC 9000,
//! 10.3) and their clients reconnect at once instead of after their idle
//! timeout.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use crate::session::Session;
use crate::tls::TlsError;
use crate::Context;

/// Bytes of the stateless reset key (an HMAC-SHA256 key).
const RESET_KEY_LEN: usize = 64;

/// The endpoint configuration, with the stateless reset key from
/// `<tls_dir>/reset.key`, made (mode 0600) on first start. The key is a
/// secret: whoever has it can end this broker's connections.
pub(crate) fn endpoint_config(tls_dir: &Path) -> Result<quinn::EndpointConfig, TlsError> {
    let key = reset_key(&tls_dir.join("reset.key"))?;
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut config = quinn::EndpointConfig::new(Arc::new(hmac));
    config.cid_generator(|| Box::new(RandomCids));
    Ok(config)
}

/// Random 8-byte connection ids, recognised by any process of this broker.
/// quinn's default generator signs its ids with a key made per process and
/// resets only packets whose id carries its own signature: a restarted
/// broker would ignore its predecessor's connections instead of resetting
/// them. Unsigned ids cost a reset answer to stray packets, which quinn
/// limits in rate and keeps smaller than the packet that caused it.
#[derive(Debug)]
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Reads the reset key at `path`, or makes it: written to a temporary file,
/// synced and renamed into place, so a crash never leaves half a key.
fn reset_key(path: &Path) -> Result<[u8; RESET_KEY_LEN], TlsError> {
    let io = |source| TlsError::Io { path: path.to_owned(), source };
    match std::fs::read(path) {
        Ok(bytes) => {
            let len = bytes.len();
            return bytes.try_into().map_err(|_| {
                io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{len} bytes, expected {RESET_KEY_LEN}; delete the file to make a new key"),
                ))
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut key = [0u8; RESET_KEY_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| TlsError::Crypto("no system randomness for the stateless reset key".into()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("key.tmp");
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&key)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(io)?;
    tracing::info!(path = %path.display(), "generated the QUIC stateless reset key");
    Ok(key)
}

/// Bidirectional streams a client may open: the session stream.
const CLIENT_BIDI_STREAMS: u32 = 1;
/// Bidirectional streams an accepted peer link may open, as many as the
/// dialer's `peer_transport` allows the other way.
const PEER_BIDI_STREAMS: u32 = 4;
/// Bytes of QUIC datagrams kept per connection until read. Clients send
/// typing notices (tens of bytes, read by the session as they come); peer
/// links read their gossip datagrams (at most about 1,200 bytes each) as
/// they come, so this holds dozens. (quinn's default, 1.25 MB, would let
/// every connection pin that much.)
const DATAGRAM_RECEIVE_BUFFER: usize = 64 << 10;

/// Transport parameters tuned for many mostly idle chat connections.
pub(crate) fn transport_config(idle_timeout_secs: u64) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Raised for peer links once they are known to be ones (`serve_connection`).
    t.max_concurrent_bidi_streams(CLIENT_BIDI_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER));
    t.max_idle_timeout(Duration::from_secs(idle_timeout_secs).try_into().ok());
    t.keep_alive_interval(Some(Duration::from_secs(idle_timeout_secs.max(2) / 2)));
    // As large as a peer link's: peer links are accepted with this config,
    // and a live connection's stream window cannot be raised. The
    // connection window below still bounds what one client can make the
    // broker buffer (`mesh::link` raises it for peers).
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((2u32 << 20).into());
    t.send_window(2 << 20);
    t
}

/// Binds the broker's UDP socket with `buffer` bytes of kernel receive and
/// send buffer. Every client shares this one socket, and a buffer that
/// overflows drops datagrams, which QUIC sees as loss: a lost handshake
/// packet waits for its probe timeout (1 s, then 2, 4...), so a reconnect
/// storm that overflowed 8 MiB left clients waiting up to 15 s. The kernel
/// caps the size at `net.core.rmem_max` / `wmem_max` unless the process may
/// go past them (CAP_NET_ADMIN, as root), which is then asked for; a warning
/// says when the size stayed capped.
pub(crate) fn bind_udp(addr: std::net::SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped addresses too on `[::]`, like the OS default.
        let _ = socket.set_only_v6(false);
    }
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        tracing::warn!(error = %e, "cannot set the UDP receive buffer size");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        tracing::warn!(error = %e, "cannot set the UDP send buffer size");
    }
    // Linux reports twice what it grants (its bookkeeping included).
    let granted = |s: &Socket| s.recv_buffer_size().unwrap_or(0) / 2;
    if granted(&socket) < buffer {
        force_buffers(&socket, buffer);
    }
    let got = granted(&socket);
    if got < buffer / 2 {
        tracing::warn!(
            wanted = buffer,
            got,
            "UDP receive buffer capped by the kernel; raise net.core.rmem_max (sysctl) to avoid loss under bursts"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Asks for `size` bytes of receive and send buffer past the kernel's
/// `rmem_max` / `wmem_max` (`SO_RCVBUFFORCE`, `SO_SNDBUFFORCE`). Only a
/// process with CAP_NET_ADMIN may; for others it changes nothing.
#[cfg(target_os = "linux")]
fn force_buffers(socket: &socket2::Socket, size: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    for (option, result) in [
        ("SO_RCVBUFFORCE", setsockopt(socket, sockopt::RcvBufForce, &size)),
        ("SO_SNDBUFFORCE", setsockopt(socket, sockopt::SndBufForce, &size)),
    ] {
        if let Err(e) = result {
            tracing::debug!(error = %e, option, "cannot raise the UDP buffer past the kernel's maximum");
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn force_buffers(_socket: &socket2::Socket, _size: usize) {}

/// Accepts connections until cancelled.
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, ctx: Context) {
    loop {
        let incoming = tokio::select! {
            () = ctx.cancel.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let Some((incoming, slot)) = admit(incoming, &ctx) else { continue };
        // Boxed, like the session and the rare peer-link path below: a
        // task's future is as large as its largest state for as long as it
        // lives, and an idle connection should not pay for the handshake's
        // (see docs/bench/tuning.md, "Memory per idle connection").
        let incoming = Box::new(incoming);
        let ctx = ctx.clone();
        ctx.tasks.clone().spawn(async move {
            metrics::gauge!("tern_connections").increment(1.0);
            let _counted = Gauge("tern_connections");
            if let Err(e) = serve_connection(incoming, slot, ctx).await {
                tracing::debug!(error = %e, "connection ended before its session started");
            }
        });
    }
}

/// Decides, before any state is kept for it, whether a connection attempt
/// goes on: a Retry while the broker is busy with handshakes and the
/// address is unproven, a refusal when no connection permit is left.
fn admit(incoming: quinn::Incoming, ctx: &Context) -> Option<(quinn::Incoming, Slot)> {
    // Per source address (`rate.handshakes_per_ip`): an unproven address
    // whose bucket runs low proves itself with a Retry first (forged
    // sources never come back, so they cannot empty the bucket of the
    // address they name); what is left is taken, or the attempt refused.
    if let Some(source) = ctx.rate.source(incoming.remote_address().ip()) {
        let now = std::time::Instant::now();
        if !incoming.remote_address_validated() && ctx.rate.handshakes.is_low(&source, now) {
            match incoming.retry() {
                Ok(()) => metrics::counter!("tern_handshake_retries_total").increment(1),
                Err(e) => e.into_incoming().refuse(),
            }
            return None;
        }
        if ctx.rate.handshakes.take(source, now).is_err() {
            metrics::counter!("tern_connections_refused_total").increment(1);
            incoming.refuse();
            return None;
        }
    }
    let busy = ctx.handshakes.load(Ordering::Relaxed) >= ctx.config.limits.handshakes_before_retry;
    let incoming = if busy && !incoming.remote_address_validated() {
        match incoming.retry() {
            Ok(()) => {
                metrics::counter!("tern_handshake_retries_total").increment(1);
                return None;
            }
            // Not allowed for this packet: go on without.
            Err(e) => e.into_incoming(),
        }
    } else {
        incoming
    };
    match ctx.connection_permits.clone().try_acquire_owned() {
        Ok(permit) => Some((incoming, Slot::new(permit, &ctx.connections))),
        Err(_) => {
            metrics::counter!("tern_connections_refused_total").increment(1);
            incoming.refuse();
            None
        }
    }
}

/// A connection's place under `limits.max_connections`, counted in
/// `Context::connections`; given back when dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    count: Arc<AtomicUsize>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self { _permit: permit, count: count.clone() }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements a gauge when dropped.
struct Gauge(&'static str);

impl Drop for Gauge {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

/// Counts a handshake in progress while alive.
struct Handshaking(Arc<AtomicUsize>);

impl Handshaking {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(incoming: Box<quinn::Incoming>, slot: Slot, ctx: Context) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(ctx.config.limits.handshake_timeout_secs);
    let handshaking = Handshaking::new(&ctx.handshakes);
    let conn = tokio::time::timeout(timeout, *incoming).await??;
    drop(handshaking);
    if crate::mesh::cluster_tls::negotiated_alpn(&conn).as_deref() == Some(tern_protocol::ALPN_PEER) {
        // Peers are few and the mesh needs them: they take no client slot.
        drop(slot);
        // Offered only when the broker has a cluster identity.
        if let Some(mesh) = &ctx.mesh {
            conn.set_max_concurrent_bi_streams(PEER_BIDI_STREAMS.into());
            Box::pin(mesh.accept(conn)).await;
        }
        return Ok(());
    }
    let _slot = slot;
    let (send, recv) = tokio::select! {
        () = ctx.cancel.cancelled() => return Ok(()),
        r = tokio::time::timeout(timeout, conn.accept_bi()) => r??,
    };
    Box::new(Session::new(ctx, conn, send, recv)).run().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reconnect storm overflowed the 8 MiB the kernel's `rmem_max`
    /// allowed: a process that may go past it must get what it asks for.
    #[test]
    fn the_udp_buffer_goes_past_the_kernel_maximum_when_the_process_may() {
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
        let want = max + (1 << 20);
        let socket = bind_udp("127.0.0.1:0".parse().unwrap(), want).unwrap();
        let got = socket2::SockRef::from(&socket).recv_buffer_size().unwrap() / 2;
        if nix::unistd::geteuid().is_root() {
            assert!(got >= want, "asked for {want} bytes, got {got} (rmem_max {max})");
        } else {
            assert!(got <= max, "without CAP_NET_ADMIN the kernel caps it");
        }
    }

    #[test]
    fn the_reset_key_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls/reset.key");
        let first = reset_key(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(reset_key(&path).unwrap(), first, "read back, not made again");
        std::fs::write(&path, b"short").unwrap();
        let err = reset_key(&path).unwrap_err().to_string();
        assert!(err.contains("reset.key") && err.contains("expected 64"), "{err}");
    }
}
