//! The admin HTTP port: Prometheus `/metrics`, `/healthz`, `/mesh` (this
//! broker's view of the mesh, JSON) and `POST /mesh/sever/{node}?secs=N` (a
//! fault drill: cut the link to a peer for N seconds).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::Context;

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once; later brokers in the
/// same process (tests) share it.
pub(crate) fn recorder() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let seconds = &[0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0];
            let sizes = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
            PrometheusBuilder::new()
                .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_requests".into()), sizes)
                })
                .and_then(|b| b.install_recorder())
                .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()
        })
        .clone()
}

/// Binds the admin port and serves it until the broker is cancelled.
pub(crate) async fn serve(addr: SocketAddr, ctx: Context) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/mesh", get(mesh))
        .route("/mesh/sever/{node}", post(sever))
        .with_state(ctx.clone());
    let cancel = ctx.cancel.clone();
    ctx.tasks.spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move { cancel.cancelled().await }).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok(local)
}

async fn metrics(State(ctx): State<Context>) -> (StatusCode, String) {
    metrics::gauge!("tern_devices_online").set(ctx.router.online() as f64);
    match recorder() {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder unavailable\n".into()),
    }
}

async fn healthz(State(ctx): State<Context>) -> (StatusCode, String) {
    let body = serde_json::json!({
        "status": if ctx.store.disk_low() { "degraded" } else { "ok" },
        "node": ctx.config.node,
        "connections": ctx.connections.load(Ordering::Relaxed),
        "devices_online": ctx.router.online(),
        "disk_low": ctx.store.disk_low(),
    });
    let status = if ctx.cancel.is_cancelled() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, format!("{body}\n"))
}

async fn mesh(State(ctx): State<Context>) -> (StatusCode, String) {
    match &ctx.mesh {
        Some(mesh) => {
            (StatusCode::OK, format!("{}\n", serde_json::to_string_pretty(&mesh.status()).unwrap_or_default()))
        }
        None => (StatusCode::NOT_FOUND, "this broker is not a mesh member (start it with --cluster NODEDIR)\n".into()),
    }
}

#[derive(Debug, serde::Deserialize)]
struct SeverQuery {
    secs: Option<u64>,
}

/// Cuts the link to `node` for `secs` seconds (default 10, at most 3600).
async fn sever(
    State(ctx): State<Context>,
    Path(node): Path<String>,
    Query(q): Query<SeverQuery>,
) -> (StatusCode, String) {
    let Some(mesh) = &ctx.mesh else {
        return (StatusCode::NOT_FOUND, "this broker is not a mesh member\n".into());
    };
    let secs = q.secs.unwrap_or(10).min(3600);
    mesh.sever(&node, std::time::Duration::from_secs(secs));
    tracing::warn!(peer = %node, secs, "peer link severed by an operator");
    (StatusCode::OK, format!("link to {node} cut for {secs} s\n"))
}
