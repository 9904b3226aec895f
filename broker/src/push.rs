//! Push wake-ups: a device that registered a Web Push subscription and is
//! not connected learns, without any message content, that something waits
//! for it.
//!
//! The router tells the [`PushActor`] of every entry queued for a device
//! with no session here (the writer thread, so through a channel that never
//! blocks: a wake-up dropped for a full channel comes with the next entry).
//! The actor coalesces per device: one wake-up per burst, that is at most
//! one per `push.coalesce_secs` unless the device connected since, and at
//! most `push.max_per_hour`. In a mesh a device connected at another broker
//! gets none. A wake-up is an RFC 8030 request to the subscription's
//! endpoint whose payload (`{"tern":"wake"}`, nothing of any message) is
//! encrypted to the device's keys (RFC 8291, aes128gcm) and signed with the
//! broker's VAPID key (RFC 8292), with `Topic: tern-wake` so a push service
//! keeps only the newest undelivered one, and `Urgency: high`. Failures are
//! retried with backoff (honouring `Retry-After`); an endpoint the push
//! service reports gone (404, 410) is dropped from the account.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use web_push_native::jwt_simple::algorithms::{ECDSAP256PublicKeyLike, ES256KeyPair};

use crate::config::{PushConfig, Rate};
use crate::mesh::Mesh;
use crate::ratelimit::Limiter;
use crate::router::Router;
use crate::store::{PushSubscription, QueueKey, Store};

/// The payload of every wake-up: no content, no sender, no count.
pub(crate) const WAKE_PAYLOAD: &[u8] = br#"{"tern":"wake"}"#;
/// Attempts per wake-up before it is given up.
const ATTEMPTS: u32 = 5;
/// Wake-ups waiting for the actor before more are dropped.
const CHANNEL: usize = 4096;

/// Why the push setup failed at start.
#[derive(Debug, thiserror::Error)]
#[error("push VAPID key {path}: {reason}")]
pub struct PushKeyError {
    path: PathBuf,
    reason: String,
}

/// Loads the VAPID key at `path`, or makes and saves one (mode 0600).
pub(crate) fn vapid_key(path: &Path) -> Result<ES256KeyPair, PushKeyError> {
    let fail = |reason: String| PushKeyError { path: path.to_owned(), reason };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let raw = hex::decode(text.trim()).map_err(|e| fail(format!("not hex: {e}")))?;
            ES256KeyPair::from_bytes(&raw).map_err(|e| fail(format!("not a P-256 private key: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key = ES256KeyPair::generate();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| fail(e.to_string()))?;
            f.write_all(hex::encode(key.to_bytes()).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| fail(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

/// The public half of a VAPID key, 65 bytes uncompressed (what a
/// subscription's `applicationServerKey` must be).
pub(crate) fn public_key(key: &ES256KeyPair) -> Vec<u8> {
    key.public_key().public_key().to_bytes_uncompressed()
}

enum PushMsg {
    /// An entry was queued for a device with no session here.
    Queued(QueueKey),
    /// The device connected here: its next entry starts a new burst.
    Online(QueueKey),
}

/// Cheap handle to the push actor.
#[derive(Debug, Clone)]
pub(crate) struct PushHandle {
    tx: mpsc::Sender<PushMsg>,
    vapid_public: Arc<Vec<u8>>,
}

impl std::fmt::Debug for PushMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Queued(q) => write!(f, "Queued({q})"),
            Self::Online(q) => write!(f, "Online({q})"),
        }
    }
}

impl PushHandle {
    /// An entry was queued for `queue`'s device, which has no session here.
    /// Never blocks (it runs on the store's writer thread).
    pub(crate) fn queued(&self, queue: &QueueKey) {
        if self.tx.try_send(PushMsg::Queued(queue.clone())).is_err() {
            metrics::counter!("tern_push_dropped_total", "why" => "busy").increment(1);
        }
    }

    /// `queue`'s device logged in here.
    pub(crate) fn online(&self, queue: &QueueKey) {
        let _ = self.tx.try_send(PushMsg::Online(queue.clone()));
    }

    /// The broker's VAPID public key.
    pub(crate) fn vapid_public_key(&self) -> &[u8] {
        &self.vapid_public
    }
}

/// Sends the wake-ups.
pub(crate) struct PushActor {
    rx: mpsc::Receiver<PushMsg>,
    store: Store,
    router: Router,
    mesh: Option<Mesh>,
    config: PushConfig,
    sender: Arc<Sender>,
    /// When each device was last woken (cleared when it connects).
    woken: HashMap<QueueKey, Instant>,
    limiter: Limiter<QueueKey>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for PushActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushActor").field("woken", &self.woken.len()).finish_non_exhaustive()
    }
}

/// What the actor needs to start.
pub(crate) struct PushSetup {
    pub(crate) store: Store,
    pub(crate) router: Router,
    pub(crate) mesh: Option<Mesh>,
    pub(crate) config: PushConfig,
    pub(crate) key: ES256KeyPair,
    pub(crate) cancel: CancellationToken,
}

impl PushActor {
    pub(crate) fn new(setup: PushSetup) -> (Self, PushHandle) {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let vapid_public = Arc::new(public_key(&setup.key));
        let per_hour = setup.config.max_per_hour.max(1);
        let rate = Rate::new(per_hour, 3_600_000 / u64::from(per_hour));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(setup.config.timeout_secs)))
            .http_status_as_error(false)
            .build()
            .into();
        let sender = Arc::new(Sender { agent, key: setup.key, contact: setup.config.contact.clone() });
        let actor = Self {
            rx,
            store: setup.store,
            router: setup.router,
            mesh: setup.mesh,
            limiter: Limiter::new("push_per_device", rate, 1_000_000),
            config: setup.config,
            sender,
            woken: HashMap::new(),
            cancel: setup.cancel,
        };
        (actor, PushHandle { tx, vapid_public })
    }

    pub(crate) async fn run(mut self) {
        loop {
            let msg = tokio::select! {
                () = self.cancel.cancelled() => return,
                msg = self.rx.recv() => match msg { Some(m) => m, None => return },
            };
            match msg {
                PushMsg::Online(q) => {
                    self.woken.remove(&q);
                }
                PushMsg::Queued(q) => self.queued(q),
            }
        }
    }

    fn queued(&mut self, queue: QueueKey) {
        if self.router.is_attached(&queue) {
            return;
        }
        let coalesce = Duration::from_secs(self.config.coalesce_secs);
        if self.woken.get(&queue).is_some_and(|at| at.elapsed() < coalesce) {
            return;
        }
        let Some(sub) = self.subscription(&queue) else { return };
        if self.limiter.take(queue.clone(), Instant::now()).is_err() {
            metrics::counter!("tern_push_dropped_total", "why" => "rate").increment(1);
            return;
        }
        if self.woken.len() > 100_000 {
            self.woken.retain(|_, at| at.elapsed() < coalesce);
        }
        self.woken.insert(queue.clone(), Instant::now());
        let (mesh, store, sender) = (self.mesh.clone(), self.store.clone(), self.sender.clone());
        tokio::spawn(wake(queue, sub, mesh, store, sender));
    }

    fn subscription(&self, queue: &QueueKey) -> Option<PushSubscription> {
        let account = self.store.account(queue.handle()).ok().flatten()?;
        let sub = account.device(queue.device())?.push.clone()?;
        (!sub.endpoint.is_empty()).then_some(sub)
    }
}

/// Sends one wake-up to `queue`'s device (unless it is connected at
/// another broker), retrying with backoff; drops a gone endpoint.
async fn wake(queue: QueueKey, sub: PushSubscription, mesh: Option<Mesh>, store: Store, sender: Arc<Sender>) {
    if let Some(mesh) = &mesh {
        if let Some(Some(location)) = mesh.locate(&queue).await {
            if location.node != mesh.node() {
                return;
            }
        }
    }
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=ATTEMPTS {
        let (s, sub2) = (sender.clone(), sub.clone());
        let outcome = tokio::task::spawn_blocking(move || s.send(&sub2)).await.unwrap_or(Outcome::Retry(None));
        match outcome {
            Outcome::Sent => {
                metrics::counter!("tern_push_sent_total").increment(1);
                return;
            }
            Outcome::Gone => {
                metrics::counter!("tern_push_gone_total").increment(1);
                tracing::info!(%queue, "push endpoint gone; dropping it");
                drop_endpoint(&queue, &sub, mesh.as_ref(), &store).await;
                return;
            }
            Outcome::Refused(reason) => {
                metrics::counter!("tern_push_failed_total", "why" => "refused").increment(1);
                tracing::warn!(%queue, %reason, "push service refused a wake-up");
                return;
            }
            Outcome::Retry(after) if attempt < ATTEMPTS => {
                tokio::time::sleep(after.unwrap_or(delay).min(Duration::from_secs(300))).await;
                delay *= 2;
            }
            Outcome::Retry(_) => {}
        }
    }
    metrics::counter!("tern_push_failed_total", "why" => "unreachable").increment(1);
    tracing::warn!(%queue, "push service unreachable; wake-up given up");
}

/// Clears `queue`'s device's subscription, if it is still `sub`.
async fn drop_endpoint(queue: &QueueKey, sub: &PushSubscription, mesh: Option<&Mesh>, store: &Store) {
    let cleared =
        PushSubscription { at_ms: sub.at_ms + 1, endpoint: String::new(), p256dh: String::new(), auth: String::new() };
    let result = match mesh {
        Some(mesh) => mesh.set_push(queue.handle(), queue.device(), cleared).await,
        None => store.set_push(queue.handle(), queue.device(), cleared).await,
    };
    if let Err(e) = result {
        tracing::warn!(%queue, error = %e, "cannot drop a gone push endpoint");
    }
}

/// What a push service made of a request.
#[derive(Debug)]
enum Outcome {
    Sent,
    Gone,
    Refused(String),
    Retry(Option<Duration>),
}

/// Makes and sends the requests (blocking: on tokio's blocking pool).
struct Sender {
    agent: ureq::Agent,
    key: ES256KeyPair,
    contact: String,
}

impl Sender {
    fn send(&self, sub: &PushSubscription) -> Outcome {
        let mut request = match request(sub, &self.key, &self.contact) {
            Ok(r) => r,
            Err(reason) => return Outcome::Refused(reason),
        };
        let headers = request.headers_mut();
        headers.insert("topic", http::HeaderValue::from_static("tern-wake"));
        headers.insert("urgency", http::HeaderValue::from_static("high"));
        let response = match self.agent.run(request) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "push request failed");
                return Outcome::Retry(None);
            }
        };
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .map(Duration::from_secs);
        match response.status().as_u16() {
            200..=299 => Outcome::Sent,
            404 | 410 => Outcome::Gone,
            429 | 500..=599 => Outcome::Retry(retry_after),
            code => Outcome::Refused(format!("HTTP {code}")),
        }
    }
}

/// The RFC 8030 request of one wake-up for `sub`.
fn request(sub: &PushSubscription, key: &ES256KeyPair, contact: &str) -> Result<http::Request<Vec<u8>>, String> {
    let (public, auth) = subscription_keys(&sub.p256dh, &sub.auth)?;
    let uri: http::Uri = sub.endpoint.parse().map_err(|e| format!("endpoint: {e}"))?;
    web_push_native::WebPushBuilder::new(uri, public, auth)
        .with_valid_duration(Duration::from_secs(24 * 3600))
        .with_vapid(key, contact)
        .build(WAKE_PAYLOAD.to_vec())
        .map_err(|e| e.to_string())
}

/// A subscription's keys from their stored hex forms, checked.
pub(crate) fn subscription_keys(
    p256dh_hex: &str,
    auth_hex: &str,
) -> Result<(web_push_native::p256::PublicKey, web_push_native::Auth), String> {
    let p256dh = hex::decode(p256dh_hex).map_err(|_| "p256dh is not hex".to_owned())?;
    let auth = hex::decode(auth_hex).map_err(|_| "auth is not hex".to_owned())?;
    check_keys(&p256dh, &auth)
}

/// Checks a subscription's P-256 key (65 bytes uncompressed, on the curve)
/// and authentication secret (16 bytes).
pub(crate) fn check_keys(
    p256dh: &[u8],
    auth: &[u8],
) -> Result<(web_push_native::p256::PublicKey, web_push_native::Auth), String> {
    if p256dh.len() != 65 || p256dh[0] != 4 {
        return Err("p256dh must be an uncompressed P-256 point (65 bytes)".into());
    }
    let public = web_push_native::p256::PublicKey::from_sec1_bytes(p256dh)
        .map_err(|_| "p256dh is not a point on P-256".to_owned())?;
    if auth.len() != 16 {
        return Err(format!("auth must be 16 bytes, not {}", auth.len()));
    }
    Ok((public, web_push_native::Auth::clone_from_slice(auth)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vapid_key_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("push/vapid.key");
        let made = vapid_key(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let again = vapid_key(&path).unwrap();
        assert_eq!(public_key(&made), public_key(&again));
        assert_eq!(public_key(&made).len(), 65);
        std::fs::write(&path, "zz").unwrap();
        assert!(vapid_key(&path).unwrap_err().to_string().contains("not hex"));
    }

    #[test]
    fn subscription_keys_are_checked() {
        let secret = web_push_native::p256::SecretKey::random(&mut rand::rngs::OsRng);
        use web_push_native::p256::elliptic_curve::sec1::ToEncodedPoint;
        let point = secret.public_key().to_encoded_point(false).as_bytes().to_vec();
        assert!(check_keys(&point, &[7; 16]).is_ok());
        assert!(check_keys(&point[..64], &[7; 16]).is_err());
        assert!(check_keys(&point, &[7; 15]).is_err());
        let mut off = point.clone();
        off[10] ^= 1;
        assert!(check_keys(&off, &[7; 16]).is_err(), "not on the curve");
    }
}
