//! Broker configuration: a serde struct with defaults, loaded from a TOML
//! file, overridden by `TERN_*` environment variables and flags (see
//! `main.rs`), and checked by [`BrokerConfig::validate`] before anything
//! starts. A bad value is reported with the field's dotted name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod rate;

pub use rate::{IpNet, Rate, RateSection};

/// Everything a broker needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// UDP address for QUIC (clients).
    pub listen: SocketAddr,
    /// Directory for the database and generated TLS material.
    pub data_dir: PathBuf,
    /// HTTP address for `/metrics` and `/healthz`; off when unset.
    pub admin: Option<SocketAddr>,
    /// Bearer token that admin endpoints which change state (`POST
    /// /mesh/sever`) require; unset, they answer 403. `/metrics`,
    /// `/healthz` and `GET /mesh` need none.
    pub admin_token: Option<String>,
    /// This broker's name, shown to clients and in logs.
    pub node: String,
    /// Threads running connections (the tokio runtime's workers); unset:
    /// one fewer than the CPUs, at least one (see [`BrokerConfig::worker_threads`]).
    pub worker_threads: Option<usize>,
    /// TLS settings.
    pub tls: TlsConfig,
    /// Storage settings.
    pub store: StoreSection,
    /// Per-connection limits.
    pub limits: LimitsConfig,
    /// How often a source address, handle or device may repeat a request.
    pub rate: RateSection,
    /// Who may claim a handle.
    pub registration: RegistrationConfig,
    /// The key service's stock of one-time keys per device.
    pub keys: KeysConfig,
    /// Web Push wake-ups for devices that are not connected.
    pub push: PushConfig,
    /// Mesh membership; a standalone broker when `cluster.dir` is unset.
    pub cluster: ClusterConfig,
}

/// `[cluster]`: joining a mesh of brokers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Node directory made by `tern-broker cluster-cert` (`cert.pem`,
    /// `key.pem`, `ca.pem`). Unset: a standalone broker that accepts no peers.
    pub dir: Option<PathBuf>,
    /// Members to join at start, as `HOST:PORT` (their listen addresses).
    pub join: Vec<String>,
    /// Address peers (and redirected clients) reach this broker at. Default:
    /// the listen address, which must then be a specific IP, not 0.0.0.0.
    pub advertise: Option<SocketAddr>,
    /// Device locations cached per broker.
    pub location_cache_entries: u64,
    /// Seconds a cached location is trusted before it is looked up again.
    pub location_cache_ttl_secs: u64,
    /// Device locations this broker holds as a directory owner (its shard);
    /// beyond it the least used are dropped (see docs/mesh.md).
    pub directory_entries: u64,
    /// On shutdown, seconds to keep shipping held messages to the brokers
    /// the clients reconnect to before leaving the mesh.
    pub drain_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            dir: None,
            join: Vec::new(),
            advertise: None,
            location_cache_entries: 100_000,
            location_cache_ttl_secs: 60,
            directory_entries: 1_000_000,
            drain_secs: 5,
        }
    }
}

/// `[tls]`: the certificate clients see.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. Unset: a self-signed certificate is made on first
    /// start and kept in `<data_dir>/tls/cert.pem`.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// Extra DNS names or IP addresses for the generated certificate.
    pub names: Vec<String>,
}

/// How durable a send is when the broker acknowledges it.
///
/// The delivery contract (docs/design.md) is `synced`. `written` exists only
/// so benchmarks can compare like with like against brokers that ack before
/// syncing (durability tier T1); the broker warns at start when it is set.
/// For an in-memory tier (T0), put the data directory on a tmpfs instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Written to the WAL and synced (fdatasync) before the ack; many sends
    /// share one sync (group commit). Survives a crash of the machine.
    Synced,
    /// Written to the WAL, not synced: survives a crash of the broker process
    /// but not of the machine. Outside the delivery contract; for benchmarks.
    Written,
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Synced => "synced",
            Self::Written => "written",
        })
    }
}

/// `[store]`: durability, retention and queue caps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// When a send is acknowledged: after the WAL is synced (`synced`, the
    /// default, group commit) or after it is written to the OS (`written`, a
    /// benchmark tier outside the delivery contract).
    pub durability: Durability,
    /// How long undelivered messages and message ids are kept, in seconds.
    pub retention_secs: u64,
    /// How often expired messages are swept, in seconds.
    pub sweep_interval_secs: u64,
    /// Most entries one device queue may hold before sends fail with `QUEUE_FULL`.
    pub max_queue_len: u64,
    /// Most requests folded into one write batch (one WAL sync).
    pub max_batch: usize,
    /// Below this much free disk space, sends fail with `STORAGE_FULL`, in MiB.
    pub min_free_disk_mb: u64,
    /// Most devices per user.
    pub max_devices: u32,
    /// Accounts cached in memory.
    pub account_cache_entries: u64,
    /// What RocksDB may hold in memory, in MiB: two thirds for memtables,
    /// a third for the block cache.
    pub memory_mb: u64,
}

/// `[limits]`: what one connection may do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame accepted, in bytes (length prefix excluded).
    pub max_frame_len: usize,
    /// Kernel receive and send buffer of the UDP socket, in bytes (capped by
    /// `net.core.rmem_max` / `wmem_max` unless the broker may go past them).
    pub udp_buffer_bytes: usize,
    /// Largest message body accepted, in bytes.
    pub max_body_len: usize,
    /// Most simultaneous client connections.
    pub max_connections: usize,
    /// Most deliveries pushed to a device and not yet acknowledged.
    pub max_inflight: usize,
    /// Most sends of one connection awaiting their durable ack.
    pub max_pending_sends: usize,
    /// Seconds a new connection has to log in.
    pub handshake_timeout_secs: u64,
    /// Seconds without any packet before a connection is dropped.
    pub idle_timeout_secs: u64,
    /// Failed login attempts before the connection is closed.
    pub max_login_attempts: u32,
    /// Largest frame accepted before the connection has logged in, in bytes:
    /// enough for `Hello`, `Register`, `Login` and `LinkDevice`, so an
    /// unauthenticated connection never makes the broker buffer more.
    pub max_frame_len_before_login: usize,
    /// Client handshakes in progress above which a new address must first
    /// show it receives what is sent to it (a QUIC Retry, one more round
    /// trip) before the broker keeps any state for it; 0: always.
    pub handshakes_before_retry: usize,
    /// Seconds a handle (or device) that no mesh member knows is remembered
    /// as unknown, so repeated logins, sends or lookups for it ask the
    /// other members once per this time, not every time.
    pub account_miss_cache_secs: u64,
}

/// `[keys]`: the one-time keys each device keeps on record for others to
/// start end-to-end sessions with.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// Most unclaimed one-time keys one device may have on record; a
    /// publish beyond it is refused (`INVALID_ARGUMENT`).
    pub max_one_time_keys: u32,
    /// When claims take a device's stock below this, it is told to publish
    /// more (a `KeyStock` frame), once per crossing.
    pub low_water: u32,
}

impl Default for KeysConfig {
    fn default() -> Self {
        let d = crate::store::KeyLimits::default();
        Self { max_one_time_keys: d.max_one_time_keys, low_water: d.low_water }
    }
}

impl KeysConfig {
    /// The store's view of these settings.
    pub fn limits(&self) -> crate::store::KeyLimits {
        crate::store::KeyLimits { max_one_time_keys: self.max_one_time_keys, low_water: self.low_water }
    }
}

/// `[push]`: content-free Web Push wake-ups (RFC 8030/8291/8292) to
/// devices that registered a subscription and are not connected.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Send wake-ups at all.
    pub enabled: bool,
    /// The VAPID contact (RFC 8292 `sub`): `mailto:` or `https:` URL where a
    /// push service can reach the operator.
    pub contact: String,
    /// The VAPID private key file (P-256, 32 bytes hex; made on first start
    /// when missing). Every broker of a mesh must use the same key: a
    /// subscription is bound to one. Default `<data_dir>/push/vapid.key`.
    pub vapid_key: Option<PathBuf>,
    /// At most one wake-up per device per this many seconds, unless it
    /// connected since (one per burst).
    pub coalesce_secs: u64,
    /// At most this many wake-ups per device per hour.
    pub max_per_hour: u32,
    /// Allow endpoints that are http, or on loopback or private addresses
    /// (a distributor on the local network, tests). Off: https to public
    /// addresses only, so users cannot make the broker call internal services.
    pub allow_private_endpoints: bool,
    /// Seconds a push service has to answer one request.
    pub timeout_secs: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            contact: "mailto:postmaster@localhost".into(),
            vapid_key: None,
            coalesce_secs: 30,
            max_per_hour: 20,
            allow_private_endpoints: false,
            timeout_secs: 10,
        }
    }
}

/// `[registration]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationConfig {
    /// When set, `Register` must carry this token.
    pub token: Option<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            data_dir: PathBuf::from("tern-data"),
            admin: None,
            admin_token: None,
            node: "tern-1".into(),
            worker_threads: None,
            tls: TlsConfig::default(),
            store: StoreSection::default(),
            limits: LimitsConfig::default(),
            rate: RateSection::default(),
            registration: RegistrationConfig::default(),
            keys: KeysConfig::default(),
            push: PushConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            durability: Durability::Synced,
            retention_secs: 30 * 24 * 3600,
            sweep_interval_secs: 60,
            max_queue_len: 100_000,
            max_batch: 1024,
            min_free_disk_mb: 256,
            max_devices: 5,
            account_cache_entries: 100_000,
            memory_mb: 24,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_len: tern_protocol::DEFAULT_MAX_FRAME_LEN,
            udp_buffer_bytes: 32 << 20,
            max_body_len: tern_protocol::DEFAULT_MAX_BODY_LEN,
            max_connections: 200_000,
            max_inflight: 512,
            max_pending_sends: 256,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 30,
            max_login_attempts: 3,
            max_frame_len_before_login: 4096,
            handshakes_before_retry: 256,
            account_miss_cache_secs: 5,
        }
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// Dotted name of the field, as in the TOML file (`store.max_batch`).
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub reason: String,
}

fn check(ok: bool, field: &'static str, reason: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError { field, reason: reason() })
    }
}

impl BrokerConfig {
    /// Reads a TOML file; fields it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { field: "config", reason: format!("cannot read {}: {e}", path.display()) })?;
        toml::from_str(&text).map_err(|e| ConfigError { field: "config", reason: format!("{}: {e}", path.display()) })
    }

    /// The number of tokio workers to run connections on: as configured,
    /// else one fewer than the CPUs this process may use, at least one.
    ///
    /// The CPU left over is the store's: its writer and sync threads work
    /// beside the workers. On two CPUs one worker costs 0.85x the CPU per
    /// message of two at 1,000 msg/s, with the same highest rate sustained,
    /// because a second worker is woken to look for work at nearly every
    /// packet and finds none (docs/bench/tuning.md).
    pub fn worker_threads(&self) -> usize {
        self.worker_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)))
    }

    /// Checks every value; the first bad one is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        let l = &self.limits;
        check(!self.data_dir.as_os_str().is_empty(), "data_dir", || "must not be empty".into())?;
        check(tern_protocol::validate_handle(&self.node).is_ok(), "node", || {
            format!("{:?} must be 1 to 64 of a-z 0-9 . _ -", self.node)
        })?;
        check(self.tls.cert.is_some() == self.tls.key.is_some(), "tls.cert", || {
            "tls.cert and tls.key must be given together".into()
        })?;
        if let Some(n) = self.worker_threads {
            check((1..=1024).contains(&n), "worker_threads", || format!("{n} is outside 1..=1024"))?;
        }
        // Upper bounds keep every value a duration or a channel size can
        // hold: nothing a config sets may panic later.
        within(s.retention_secs, 1, 100 * YEAR_SECS, "store.retention_secs")?;
        within(s.sweep_interval_secs, 1, 7 * DAY_SECS, "store.sweep_interval_secs")?;
        check(s.max_queue_len >= 1, "store.max_queue_len", || "must be at least 1".into())?;
        check((1..=65_536).contains(&s.max_batch), "store.max_batch", || {
            format!("{} is outside 1..=65536", s.max_batch)
        })?;
        check((1..=1024).contains(&s.max_devices), "store.max_devices", || {
            format!("{} is outside 1..=1024", s.max_devices)
        })?;
        within(u64::from(self.keys.max_one_time_keys), 1, 10_000, "keys.max_one_time_keys")?;
        let p = &self.push;
        check(p.contact.starts_with("mailto:") || p.contact.starts_with("https://"), "push.contact", || {
            format!("{:?} must be a mailto: or https:// URL", p.contact)
        })?;
        within(p.coalesce_secs, 0, DAY_SECS, "push.coalesce_secs")?;
        within(u64::from(p.max_per_hour), 1, 3600, "push.max_per_hour")?;
        within(p.timeout_secs, 1, 300, "push.timeout_secs")?;
        check(self.keys.low_water <= self.keys.max_one_time_keys, "keys.low_water", || {
            format!("{} is above keys.max_one_time_keys ({})", self.keys.low_water, self.keys.max_one_time_keys)
        })?;
        check(s.account_cache_entries >= 1, "store.account_cache_entries", || "must be at least 1".into())?;
        check(s.memory_mb >= 3, "store.memory_mb", || "must be at least 3".into())?;
        check((1..=64 << 20).contains(&l.max_body_len), "limits.max_body_len", || {
            format!("{} is outside 1..=67108864", l.max_body_len)
        })?;
        check(
            l.max_frame_len >= l.max_body_len + tern_protocol::FRAME_OVERHEAD && l.max_frame_len <= 80 << 20,
            "limits.max_frame_len",
            || {
                format!(
                    "{} must be at least limits.max_body_len + {} ({}) and at most 83886080",
                    l.max_frame_len,
                    tern_protocol::FRAME_OVERHEAD,
                    l.max_body_len + tern_protocol::FRAME_OVERHEAD
                )
            },
        )?;
        check((64 << 10..=1 << 30).contains(&l.udp_buffer_bytes), "limits.udp_buffer_bytes", || {
            format!("{} is outside 65536..=1073741824", l.udp_buffer_bytes)
        })?;
        within(l.max_connections as u64, 1, 100_000_000, "limits.max_connections")?;
        within(l.max_inflight as u64, 1, 1 << 20, "limits.max_inflight")?;
        within(l.max_pending_sends as u64, 1, 1 << 20, "limits.max_pending_sends")?;
        within(l.handshake_timeout_secs, 1, 3600, "limits.handshake_timeout_secs")?;
        within(l.idle_timeout_secs, 1, DAY_SECS, "limits.idle_timeout_secs")?;
        within(u64::from(l.max_login_attempts), 1, 1000, "limits.max_login_attempts")?;
        within(l.max_frame_len_before_login as u64, 1024, l.max_frame_len as u64, "limits.max_frame_len_before_login")?;
        within(l.handshakes_before_retry as u64, 0, 100_000_000, "limits.handshakes_before_retry")?;
        within(l.account_miss_cache_secs, 0, 3600, "limits.account_miss_cache_secs")?;
        self.rate.validate()?;
        let c = &self.cluster;
        check(c.dir.is_some() || c.join.is_empty(), "cluster.join", || {
            "joining a mesh needs cluster.dir (--cluster NODEDIR) with this broker's cluster certificate".into()
        })?;
        if c.dir.is_some() {
            match c.advertise {
                Some(advertise) => {
                    check(!advertise.ip().is_unspecified() && advertise.port() != 0, "cluster.advertise", || {
                        format!("{advertise} is not an address peers can reach")
                    })?
                }
                // Port 0 is fine here: the port bound is advertised.
                None => check(!self.listen.ip().is_unspecified(), "cluster.advertise", || {
                    format!(
                        "unset, and the listen address {} is not one peers can reach: set --advertise \
                         (TERN_ADVERTISE, cluster.advertise) to this broker's address as peers see it",
                        self.listen
                    )
                })?,
            }
        }
        for seed in &c.join {
            check(
                seed.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                "cluster.join",
                || format!("{seed:?} is not HOST:PORT"),
            )?;
        }
        within(c.location_cache_entries, 1, 100_000_000, "cluster.location_cache_entries")?;
        within(c.location_cache_ttl_secs, 1, DAY_SECS, "cluster.location_cache_ttl_secs")?;
        within(c.directory_entries, 1, 100_000_000, "cluster.directory_entries")?;
        within(c.drain_secs, 0, 3600, "cluster.drain_secs")?;
        if let Some(token) = &self.registration.token {
            check(!token.is_empty(), "registration.token", || "must not be empty when set".into())?;
        }
        if let Some(token) = &self.admin_token {
            check(
                token.len() >= MIN_ADMIN_TOKEN_LEN && token.bytes().all(|b| b.is_ascii_graphic()),
                "admin_token",
                || {
                    format!(
                        "must be at least {MIN_ADMIN_TOKEN_LEN} printable ASCII characters without spaces (it is \
                         sent as `Authorization: Bearer TOKEN`), e.g. the output of `openssl rand -hex 32`"
                    )
                },
            )?;
        }
        Ok(())
    }

    /// Where the database lives.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("db")
    }

    /// Retention as a duration.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.store.retention_secs)
    }
}

const DAY_SECS: u64 = 86_400;
/// Shortest admin token accepted: guessing one must be out of reach.
const MIN_ADMIN_TOKEN_LEN: usize = 16;
const YEAR_SECS: u64 = 365 * DAY_SECS;

/// `value` must lie in `lo..=hi`.
fn within(value: u64, lo: u64, hi: u64, field: &'static str) -> Result<(), ConfigError> {
    check((lo..=hi).contains(&value), field, || format!("{value} is outside {lo}..={hi}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_default_to_one_fewer_than_the_cpus_and_at_least_one() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(BrokerConfig::default().worker_threads(), (cpus - 1).max(1));
        let set = BrokerConfig { worker_threads: Some(4), ..BrokerConfig::default() };
        assert_eq!(set.worker_threads(), 4);
        let zero = BrokerConfig { worker_threads: Some(0), ..BrokerConfig::default() };
        assert_eq!(zero.validate().unwrap_err().field, "worker_threads");
    }

    #[test]
    fn defaults_are_valid() {
        BrokerConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_field() {
        let mut c = BrokerConfig::default();
        c.store.max_batch = 0;
        assert_eq!(c.validate().unwrap_err().field, "store.max_batch");
        let mut c = BrokerConfig::default();
        c.limits.max_frame_len = c.limits.max_body_len;
        assert_eq!(c.validate().unwrap_err().field, "limits.max_frame_len");
        let mut c = BrokerConfig::default();
        c.tls.cert = Some("x.pem".into());
        assert_eq!(c.validate().unwrap_err().field, "tls.cert");
        // Values that would overflow a duration or a channel later.
        let mut c = BrokerConfig::default();
        c.limits.handshake_timeout_secs = u64::MAX;
        assert_eq!(c.validate().unwrap_err().field, "limits.handshake_timeout_secs");
        let mut c = BrokerConfig::default();
        c.limits.max_inflight = usize::MAX;
        assert_eq!(c.validate().unwrap_err().field, "limits.max_inflight");
        let mut c = BrokerConfig::default();
        c.store.sweep_interval_secs = u64::MAX;
        assert_eq!(c.validate().unwrap_err().field, "store.sweep_interval_secs");
        for weak in ["", "short", "has a space in it, long enough"] {
            let c = BrokerConfig { admin_token: Some(weak.into()), ..BrokerConfig::default() };
            assert_eq!(c.validate().unwrap_err().field, "admin_token", "{weak:?}");
        }
        let c = BrokerConfig { admin_token: Some("0123456789abcdef".into()), ..BrokerConfig::default() };
        c.validate().unwrap();
    }

    #[test]
    fn a_mesh_member_listening_on_any_address_needs_advertise() {
        for listen in ["0.0.0.0:4433", "[::]:4433"] {
            let mut c = BrokerConfig { listen: listen.parse().unwrap(), ..BrokerConfig::default() };
            c.validate().unwrap();
            c.cluster.dir = Some("node-1".into());
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, "cluster.advertise", "{listen}");
            assert!(e.reason.contains("--advertise"), "{e}");
            c.cluster.advertise = Some("10.0.0.5:4433".parse().unwrap());
            c.validate().unwrap();
        }
        let mut c = BrokerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..BrokerConfig::default() };
        c.cluster.dir = Some("node-1".into());
        c.validate().expect("the bound port is advertised");
    }

    #[test]
    fn toml_overrides_and_rejects_unknown_fields() {
        let c: BrokerConfig = toml::from_str("listen = \"127.0.0.1:9\"\n[store]\nmax_queue_len = 5\n").unwrap();
        assert_eq!(c.store.max_queue_len, 5);
        assert_eq!(c.listen.port(), 9);
        assert_eq!(c.store.durability, Durability::Synced, "unset fields keep defaults");
        assert!(toml::from_str::<BrokerConfig>("[store]\nmax_queue_lenn = 5\n").is_err());
    }
}
