//! Tern broker: durable 1:1 messaging over QUIC.
//!
//! Read it top to bottom like the path of a message:
//!
//! - [`transport`]: the quinn endpoint and accept loop;
//! - [`session`]: one authenticated connection (login, sends, acks, pushes),
//!   within the [`ratelimit`]s;
//! - [`store`]: RocksDB queues, accounts and idempotency, behind one
//!   group-commit writer;
//! - [`router`]: hands newly stored entries to online devices' sessions;
//! - [`mesh`]: membership, peer links and delivery across brokers;
//! - [`admin`]: `/metrics`, `/healthz`, `/mesh` and the token-guarded
//!   fault drill `POST /mesh/sever`.
//!
//! [`Broker::spawn`] starts everything from a [`BrokerConfig`]; the binary in
//! `main.rs` only parses flags, loads the config and waits for a signal.

mod admin;
mod clock;
pub mod config;
mod keys;
pub mod mesh;
mod presence;
mod push;
mod ratelimit;
pub mod router;
mod session;
pub mod store;
pub mod tls;
mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{BrokerConfig, ConfigError, Durability};
use router::Router;
pub use store::{Store, StoreConfig, StoreError};

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// TLS material could not be loaded or made.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// The push VAPID key could not be loaded or made.
    #[error(transparent)]
    Push(#[from] push::PushKeyError),
    /// A socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// What every task of a broker shares.
#[derive(Clone, Debug)]
pub(crate) struct Context {
    pub(crate) config: Arc<BrokerConfig>,
    pub(crate) store: Store,
    pub(crate) router: Router,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// One per client connection, taken before its handshake
    /// (`limits.max_connections`).
    pub(crate) connection_permits: Arc<tokio::sync::Semaphore>,
    /// Connections holding a permit (for `/healthz`).
    pub(crate) connections: Arc<AtomicUsize>,
    /// Handshakes in progress (`limits.handshakes_before_retry`).
    pub(crate) handshakes: Arc<AtomicUsize>,
    pub(crate) rate: Arc<ratelimit::RateLimits>,
    /// Account records looked up at other members, shared by the sessions.
    pub(crate) lookups: Arc<session::AccountLookups>,
    /// Set when the broker is a mesh member (`--cluster`).
    pub(crate) mesh: Option<mesh::Mesh>,
    /// Who is online, who watches whom (ephemeral).
    pub(crate) presence: presence::Presence,
    /// Push wake-ups (when `push.enabled`).
    pub(crate) push: Option<push::PushHandle>,
}

/// A running broker.
#[derive(Debug)]
pub struct Broker {
    ctx: Context,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    /// Stopped last on shutdown, so `/healthz` says `draining` throughout.
    admin: Option<admin::AdminServer>,
    cert_path: PathBuf,
    /// Stops the mesh's tasks, after the sessions (so held messages can
    /// still be shipped while clients move to other brokers).
    mesh_cancel: CancellationToken,
}

impl Broker {
    /// Validates `config`, opens the store, binds the QUIC (and admin) ports and
    /// starts serving.
    pub async fn spawn(config: BrokerConfig) -> Result<Self, StartError> {
        config.validate()?;
        admin::recorder();
        let config = Arc::new(config);
        let tls = tls::TlsIdentity::load_or_generate(
            config.tls.cert.as_deref(),
            config.tls.key.as_deref(),
            &config.data_dir.join("tls"),
            &config.tls.names,
        )?;
        let router = Router::default();
        let store = Store::open(
            StoreConfig {
                path: config.db_path(),
                durability: config.store.durability,
                retention: config.retention(),
                max_queue_len: config.store.max_queue_len,
                max_entry_len: store::max_entry_len(config.limits.max_frame_len),
                max_batch: config.store.max_batch,
                max_devices: config.store.max_devices,
                account_cache_entries: config.store.account_cache_entries,
                memory_mb: config.store.memory_mb,
                keys: config.keys.limits(),
            },
            Arc::new(router.clone()),
        )?;
        let cluster = match &config.cluster.dir {
            Some(dir) => Some(mesh::ClusterIdentity::load(dir, &config.node)?),
            None => None,
        };
        let mut server = quinn::ServerConfig::with_crypto(tls.server_crypto(cluster.as_ref())?);
        server.transport_config(Arc::new(transport::transport_config(config.limits.idle_timeout_secs)));
        let socket = transport::bind_udp(config.listen, config.limits.udp_buffer_bytes)
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let runtime = quinn::default_runtime().ok_or_else(|| StartError::Bind {
            addr: config.listen,
            source: std::io::Error::other("no async runtime"),
        })?;
        let endpoint_config = transport::endpoint_config(&config.data_dir.join("tls"))?;
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime)
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let local_addr = endpoint.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let cancel = CancellationToken::new();
        let mesh_cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let presence = presence::Presence::default();
        let mesh = match &cluster {
            Some(identity) => {
                let advertise = config.cluster.advertise.unwrap_or(local_addr);
                if advertise.ip().is_unspecified() {
                    return Err(StartError::Config(ConfigError {
                        field: "cluster.advertise",
                        reason: format!("listening on {advertise}: set the address peers reach this broker at"),
                    }));
                }
                Some(mesh::Mesh::start(mesh::MeshSetup {
                    identity,
                    endpoint: endpoint.clone(),
                    advertise,
                    seeds: config.cluster.join.clone(),
                    cancel: mesh_cancel.clone(),
                    tasks: tasks.clone(),
                    store: store.clone(),
                    router: router.clone(),
                    presence: presence.clone(),
                    cache_entries: config.cluster.location_cache_entries,
                    cache_ttl: Duration::from_secs(config.cluster.location_cache_ttl_secs),
                    directory_entries: config.cluster.directory_entries,
                })?)
            }
            None => None,
        };
        let push = if config.push.enabled {
            let path = config.push.vapid_key.clone().unwrap_or_else(|| config.data_dir.join("push/vapid.key"));
            let (actor, handle) = push::PushActor::new(push::PushSetup {
                store: store.clone(),
                router: router.clone(),
                mesh: mesh.clone(),
                config: config.push.clone(),
                key: push::vapid_key(&path)?,
                cancel: cancel.clone(),
            });
            tasks.spawn(actor.run());
            let hook = handle.clone();
            router.set_offline_hook(move |queue| hook.queued(queue));
            Some(handle)
        } else {
            None
        };
        let ctx = Context {
            config: config.clone(),
            store,
            router,
            cancel,
            tasks,
            connection_permits: Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections)),
            connections: Arc::new(AtomicUsize::new(0)),
            handshakes: Arc::new(AtomicUsize::new(0)),
            rate: Arc::new(ratelimit::RateLimits::new(&config.rate)),
            lookups: Arc::new(session::AccountLookups::new(
                Duration::from_secs(config.limits.account_miss_cache_secs),
                config.rate.max_keys,
            )),
            mesh,
            presence,
            push,
        };
        let admin = match config.admin {
            Some(addr) => Some(
                admin::AdminServer::serve(addr, ctx.clone())
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            None => None,
        };
        ctx.tasks.spawn(transport::accept_loop(endpoint.clone(), ctx.clone()));
        ctx.tasks.spawn(sweeper(ctx.clone()));
        ctx.tasks.spawn(disk_monitor(ctx.clone()));
        tracing::info!(%local_addr, node = %config.node, data_dir = %config.data_dir.display(), "broker started");
        if config.store.durability != Durability::Synced {
            tracing::warn!(
                durability = %config.store.durability,
                "sends are acknowledged before the WAL is synced: a power loss or OS crash can lose \
                 acknowledged messages. This setting is for benchmarks; use `synced` in production"
            );
        }
        Ok(Self { ctx, endpoint, local_addr, admin, cert_path: tls.cert_path, mesh_cancel })
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound admin HTTP address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(admin::AdminServer::addr)
    }

    /// The certificate clients should trust.
    pub fn cert_path(&self) -> &std::path::Path {
        &self.cert_path
    }

    /// Keeps shipping held messages for up to `cluster.drain_secs`, while
    /// the clients of this broker reconnect elsewhere.
    async fn drain(&self, mesh: &mesh::Mesh) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.ctx.config.cluster.drain_secs);
        while tokio::time::Instant::now() < deadline && !mesh.members().is_empty() {
            match self.ctx.store.waiting().await {
                Ok(w) if w.is_empty() => return,
                Ok(w) => tracing::debug!(queues = w.len(), "draining: queues still held here"),
                Err(_) => return,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fault drill: closes the peer link to `node` and refuses it, both
    /// ways, for `duration`. Messages in flight on it must survive (they are
    /// shipped again when the link is back). No effect on a standalone broker.
    pub fn sever_link(&self, node: &str, duration: Duration) {
        if let Some(mesh) = &self.ctx.mesh {
            mesh.sever(node, duration);
        }
    }

    /// This broker's view of the mesh; `None` for a standalone broker.
    pub fn mesh_status(&self) -> Option<mesh::MeshStatus> {
        self.ctx.mesh.as_ref().map(mesh::Mesh::status)
    }

    /// Devices with a session on this broker.
    pub fn devices_online(&self) -> usize {
        self.ctx.router.online()
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.ctx.store
    }

    /// How many times this broker's sessions asked the other mesh members
    /// for an account record missing here (for tests and tools; a miss is
    /// asked once per `limits.account_miss_cache_secs`).
    pub fn remote_account_lookups(&self) -> u64 {
        self.ctx.lookups.remote()
    }

    /// Stops accepting, tells connected clients to reconnect elsewhere, waits
    /// for sessions to end, closes the endpoint and flushes the store. The
    /// admin port serves until the end (`/healthz`: `503 draining`).
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.endpoint.set_server_config(None);
        // Sessions end first, each client told where else to connect.
        self.ctx.cancel.cancel();
        if let Some(mesh) = &self.ctx.mesh {
            self.drain(mesh).await;
            mesh.leave().await;
        }
        self.mesh_cancel.cancel();
        self.ctx.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.ctx.tasks.wait()).await.is_err() {
            tracing::warn!("sessions still running after 5 s; closing anyway");
        }
        self.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        let store = self.ctx.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
        if let Some(admin) = self.admin {
            admin.stop().await;
        }
        tracing::info!("shut down");
    }
}

/// Deletes entries older than the retention, every `sweep_interval_secs`.
async fn sweeper(ctx: Context) {
    let mut every = tokio::time::interval(Duration::from_secs(ctx.config.store.sweep_interval_secs));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = ctx.cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        let cutoff = store::now_ms().saturating_sub(ctx.config.retention().as_millis() as u64);
        // Each request expires a bounded number; other writes go between.
        let (mut entries, mut queues) = (0, 0);
        loop {
            match ctx.store.expire(cutoff).await {
                Ok(e) => {
                    metrics::counter!("tern_expired_total").increment(e.entries);
                    entries += e.entries;
                    queues += e.queues;
                    if !e.more || ctx.cancel.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "expiry sweep failed");
                    break;
                }
            }
        }
        if entries > 0 {
            tracing::info!(entries, queues, "expired undelivered messages");
        }
    }
}

/// Raises the store's low-disk flag while free space is under the floor.
async fn disk_monitor(ctx: Context) {
    let floor = ctx.config.store.min_free_disk_mb.saturating_mul(1 << 20);
    let path = ctx.config.db_path();
    let mut every = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            () = ctx.cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Ok(stat) = rustix::fs::statvfs(&path) {
            let free = stat.f_bavail.saturating_mul(stat.f_frsize);
            metrics::gauge!("tern_disk_free_bytes").set(free as f64);
            let low = free < floor;
            if low != ctx.store.disk_low() {
                tracing::warn!(free, floor, low, "free disk space crossed the configured floor");
            }
            ctx.store.set_disk_low(low);
        }
    }
}
