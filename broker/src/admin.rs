//! The admin HTTP port: Prometheus `/metrics`, `/healthz`, `/mesh` (this
//! broker's view of the mesh, JSON) and `POST /mesh/sever/{node}?secs=N` (a
//! fault drill: cut the link to a peer for N seconds).
//!
//! Reads are open. A request that changes state must carry the configured
//! `admin_token` as `Authorization: Bearer TOKEN` (the [`AdminAuthorized`]
//! extractor, compared in constant time); with no token configured such
//! endpoints answer 403. The server has its own cancellation, stopped last
//! on shutdown, so `/healthz` answers `503 draining` for the whole drain.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::{CancellationToken, DropGuard};

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
                .inspect(spawn_upkeep)
        })
        .clone()
}

/// How often the recorder folds recorded histogram samples into its
/// buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the recorder's upkeep every [`UPKEEP_INTERVAL`], for the life of
/// the process. A recorder installed with `install_recorder` spawns none: it
/// holds every histogram sample until `/metrics` is read, so a broker nobody
/// scrapes grew by each sample (several per message: 17 MiB after 40 s at
/// 10,000 msg/s, by heaptrack; docs/bench/tuning.md).
fn spawn_upkeep(handle: &PrometheusHandle) {
    let handle = handle.clone();
    let spawned = std::thread::Builder::new().name("tern-metrics-upkeep".into()).spawn(move || loop {
        std::thread::sleep(UPKEEP_INTERVAL);
        handle.run_upkeep();
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms grow until /metrics is read");
    }
}

/// The running admin server. It outlives the broker's other tasks: the
/// broker stops it last ([`AdminServer::stop`]), or dropping it stops it.
#[derive(Debug)]
pub(crate) struct AdminServer {
    addr: SocketAddr,
    stop: DropGuard,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Binds the admin port and serves it until [`AdminServer::stop`].
    pub(crate) async fn serve(addr: SocketAddr, ctx: Context) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/mesh", get(mesh))
            .route("/mesh/sever/{node}", post(sever))
            .with_state(ctx);
        let cancel = CancellationToken::new();
        let stopped = cancel.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(stopped.cancelled_owned()).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin server failed");
            }
        });
        Ok(Self { addr: local, stop: cancel.drop_guard(), task })
    }

    /// The bound address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving; waits up to 2 s for open requests.
    pub(crate) async fn stop(self) {
        drop(self.stop);
        if tokio::time::timeout(Duration::from_secs(2), self.task).await.is_err() {
            tracing::warn!("admin requests still open after 2 s; closing anyway");
        }
    }
}

async fn metrics(State(ctx): State<Context>) -> (StatusCode, String) {
    metrics::gauge!("tern_devices_online").set(ctx.router.online() as f64);
    match recorder() {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder unavailable\n".into()),
    }
}

/// `200` with `ok` or `degraded` (low disk: sends refused, the broker
/// otherwise sound); `503` with `failed` (a WAL sync failed: every send is
/// refused until a restart) or `draining` (shutting down).
async fn healthz(State(ctx): State<Context>) -> (StatusCode, String) {
    let disk_low = ctx.store.disk_low();
    let (status, code, reason) = if let Some(e) = ctx.store.failure() {
        let reason = format!("WAL sync failed ({e}): every send is refused until the broker restarts");
        ("failed", StatusCode::SERVICE_UNAVAILABLE, Some(reason))
    } else if ctx.cancel.is_cancelled() {
        let reason = "shutting down: clients are sent elsewhere, held messages shipped to their new brokers";
        ("draining", StatusCode::SERVICE_UNAVAILABLE, Some(reason.to_owned()))
    } else if disk_low {
        let reason = "free disk space is below store.min_free_disk_mb: sends are refused with STORAGE_FULL";
        ("degraded", StatusCode::OK, Some(reason.to_owned()))
    } else {
        ("ok", StatusCode::OK, None)
    };
    let body = serde_json::json!({
        "status": status,
        "reason": reason,
        "node": ctx.config.node,
        "connections": ctx.connections.load(Ordering::Relaxed),
        "devices_online": ctx.router.online(),
        "disk_low": disk_low,
    });
    (code, format!("{body}\n"))
}

async fn mesh(State(ctx): State<Context>) -> (StatusCode, String) {
    match &ctx.mesh {
        Some(mesh) => {
            (StatusCode::OK, format!("{}\n", serde_json::to_string_pretty(&mesh.status()).unwrap_or_default()))
        }
        None => (StatusCode::NOT_FOUND, "this broker is not a mesh member (start it with --cluster NODEDIR)\n".into()),
    }
}

/// Proof that a request carried the configured admin token. A handler that
/// changes state takes it as its first argument, so nothing else of the
/// request is looked at before it is checked.
#[derive(Debug)]
struct AdminAuthorized;

impl FromRequestParts<Context> for AdminAuthorized {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ctx: &Context) -> Result<Self, Self::Rejection> {
        let Some(expected) = ctx.config.admin_token.as_deref() else {
            metrics::counter!("tern_admin_refused_total", "reason" => "no_token_configured").increment(1);
            let body = "admin endpoints that change state are off: start the broker with --admin-token TOKEN \
                        (TERN_ADMIN_TOKEN, or admin_token in the config file) and send \
                        `Authorization: Bearer TOKEN`\n";
            return Err((StatusCode::FORBIDDEN, body).into_response());
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let (reason, challenge, body) = match presented {
            Some(token) if token_matches(token, expected) => return Ok(Self),
            Some(_) => (
                "wrong_token",
                "Bearer realm=\"tern-admin\", error=\"invalid_token\"",
                "the admin token does not match this broker's --admin-token\n",
            ),
            None => (
                "no_token",
                "Bearer realm=\"tern-admin\"",
                "this endpoint needs `Authorization: Bearer TOKEN` (the broker's --admin-token)\n",
            ),
        };
        metrics::counter!("tern_admin_refused_total", "reason" => reason).increment(1);
        tracing::warn!(path = %parts.uri.path(), "admin request refused: missing or wrong admin token");
        Err((StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)], body).into_response())
    }
}

/// Compares in constant time: both sides are MACed under a fresh random key
/// and the tags compared by `ring` (which takes the same time wherever they
/// differ), so neither the content nor the length of the token leaks.
pub(crate) fn token_matches(presented: &str, expected: &str) -> bool {
    use ring::hmac;
    let Ok(key) = hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new()) else {
        return false;
    };
    let tag = hmac::sign(&key, expected.as_bytes());
    hmac::verify(&key, presented.as_bytes(), tag.as_ref()).is_ok()
}

#[derive(Debug, serde::Deserialize)]
struct SeverQuery {
    secs: Option<u64>,
}

/// Cuts the link to `node` for `secs` seconds (default 10, at most 3600).
async fn sever(
    _: AdminAuthorized,
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

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(token_matches("0123456789abcdef", "0123456789abcdef"));
        assert!(!token_matches("0123456789abcdeF", "0123456789abcdef"));
        assert!(!token_matches("0123456789abcde", "0123456789abcdef"));
        assert!(!token_matches("", "0123456789abcdef"));
    }
}
