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
    let (send, recv) = tokio::select! {
        () = ctx.cancel.cancelled() => return Ok(()),
        r = tokio::time::timeout(timeout, conn.accept_bi()) => r??,
    };
    Session::new(ctx, conn, send, recv).run().await;
    Ok(())
}
