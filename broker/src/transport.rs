//! The QUIC endpoint and its accept loop: each incoming connection is
//! checked against the connection limit, completes its handshake, opens its
//! session stream and becomes a [`Session`](crate::session::Session) task.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::session::Session;
use crate::Context;

/// Transport parameters tuned for many mostly idle chat connections.
pub(crate) fn transport_config(idle_timeout_secs: u64) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(4u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Duration::from_secs(idle_timeout_secs).try_into().ok());
    t.keep_alive_interval(Some(Duration::from_secs(idle_timeout_secs.max(2) / 2)));
    t.stream_receive_window((1u32 << 20).into());
    t.receive_window((2u32 << 20).into());
    t.send_window(2 << 20);
    t
}

/// Binds the broker's UDP socket with `buffer` bytes of kernel receive and
/// send buffer. Every client shares this one socket, and the default buffer
/// (about 200 KiB) overflows under bursts, which QUIC sees as loss: latency
/// spikes while it recovers. The kernel caps the size at
/// `net.core.rmem_max` / `wmem_max`; a warning says when it did.
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
    let got = socket.recv_buffer_size().unwrap_or(0) / 2;
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
        if ctx.connections.load(Ordering::Relaxed) >= ctx.config.limits.max_connections {
            metrics::counter!("tern_connections_refused_total").increment(1);
            incoming.refuse();
            continue;
        }
        let ctx = ctx.clone();
        ctx.tasks.clone().spawn(async move {
            ctx.connections.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!("tern_connections").increment(1.0);
            let _guard = ConnGuard(ctx.connections.clone());
            if let Err(e) = serve_connection(incoming, ctx).await {
                tracing::debug!(error = %e, "connection ended before its session started");
            }
        });
    }
}

struct ConnGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("tern_connections").decrement(1.0);
    }
}

async fn serve_connection(incoming: quinn::Incoming, ctx: Context) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(ctx.config.limits.handshake_timeout_secs);
    let conn = tokio::time::timeout(timeout, incoming).await??;
    if crate::mesh::cluster_tls::negotiated_alpn(&conn).as_deref() == Some(tern_protocol::ALPN_PEER) {
        // Offered only when the broker has a cluster identity.
        if let Some(mesh) = &ctx.mesh {
            mesh.accept(conn).await;
        }
        return Ok(());
    }
    let (send, recv) = tokio::select! {
        () = ctx.cancel.cancelled() => return Ok(()),
        r = tokio::time::timeout(timeout, conn.accept_bi()) => r??,
    };
    Session::new(ctx, conn, send, recv).run().await;
    Ok(())
}
