//! `tern-broker`: parses flags, builds the configuration (defaults, then the
//! TOML file, then `TERN_*` environment variables and flags), starts the
//! broker and waits for SIGINT or SIGTERM to shut it down gracefully. Its
//! subcommands make cluster certificates and show a running mesh.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tern_broker::{Broker, BrokerConfig};

/// Tern message broker: durable per-device queues over QUIC, alone or as a
/// member of a mesh of brokers (--cluster, --join; see docs/mesh.md).
///
/// Starts on embedded defaults with no flags at all: QUIC on 127.0.0.1:4433,
/// data in ./tern-data, a self-signed certificate made on first start in
/// <data-dir>/tls/cert.pem (give that file to clients as --ca).
///
/// Precedence: flags and TERN_* environment variables override the --config
/// file, which overrides the defaults. An invalid value exits with status 2
/// naming the field.
#[derive(Debug, Parser)]
#[command(name = "tern-broker", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (see docs/operations.md for every field).
    #[arg(long, env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// UDP address for client connections.
    #[arg(long, env = "TERN_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory for the database and generated TLS material.
    #[arg(long, env = "TERN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP address for Prometheus /metrics and /healthz (off unless set).
    #[arg(long, env = "TERN_ADMIN")]
    admin: Option<SocketAddr>,
    /// Token that admin endpoints which change state (POST /mesh/sever) require,
    /// sent as `Authorization: Bearer TOKEN`; without it they answer 403.
    /// At least 16 characters.
    #[arg(long, env = "TERN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// This broker's node name.
    #[arg(long, env = "TERN_NODE")]
    node: Option<String>,
    /// Threads running connections (default: one fewer than the CPUs, at
    /// least one; the store's writer and sync threads use the one left).
    #[arg(long, env = "TERN_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// PEM certificate chain to present instead of the generated one.
    #[arg(long, env = "TERN_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, env = "TERN_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Extra DNS name or IP for the generated certificate (repeatable).
    #[arg(long = "tls-name", env = "TERN_TLS_NAMES", value_delimiter = ',')]
    tls_names: Vec<String>,
    /// When a send is acknowledged: `synced` (WAL synced first; the default
    /// and the delivery contract) or `written` (WAL written, not synced:
    /// survives a broker crash, not a power loss; for benchmarks only).
    #[arg(long, env = "TERN_DURABILITY", value_enum)]
    durability: Option<tern_broker::Durability>,
    /// How long undelivered messages are kept, in seconds (default 30 days).
    #[arg(long, env = "TERN_RETENTION_SECS")]
    retention_secs: Option<u64>,
    /// How often expired messages are swept, in seconds.
    #[arg(long, env = "TERN_SWEEP_INTERVAL_SECS")]
    sweep_interval_secs: Option<u64>,
    /// Most entries per device queue; sends beyond fail with QUEUE_FULL.
    #[arg(long, env = "TERN_MAX_QUEUE_LEN")]
    max_queue_len: Option<u64>,
    /// Most requests folded into one write batch (one WAL sync).
    #[arg(long, env = "TERN_MAX_BATCH")]
    max_batch: Option<usize>,
    /// Below this much free disk space, in MiB, sends fail with STORAGE_FULL.
    #[arg(long, env = "TERN_MIN_FREE_DISK_MB")]
    min_free_disk_mb: Option<u64>,
    /// Most devices per user; linking more fails with TOO_MANY_DEVICES.
    #[arg(long, env = "TERN_MAX_DEVICES")]
    max_devices: Option<u32>,
    /// Accounts cached in memory.
    #[arg(long, env = "TERN_ACCOUNT_CACHE_ENTRIES")]
    account_cache_entries: Option<u64>,
    /// MiB RocksDB may hold in memory: two thirds for memtables (flushed
    /// when they reach it), a third for the block cache.
    #[arg(long, env = "TERN_STORE_MEMORY_MB")]
    store_memory_mb: Option<u64>,
    /// Most unclaimed one-time keys a device may keep on record.
    #[arg(long, env = "TERN_MAX_ONE_TIME_KEYS")]
    max_one_time_keys: Option<u32>,
    /// A device whose one-time keys fall below this is told to publish more.
    #[arg(long, env = "TERN_KEY_LOW_WATER")]
    key_low_water: Option<u32>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    rate: RateArgs,
    /// Require this token to register a new handle.
    #[arg(long, env = "TERN_REGISTRATION_TOKEN")]
    registration_token: Option<String>,
    /// Join a mesh: the node directory made by `tern-broker cluster-cert`
    /// (this broker's certificate, key and the cluster CA).
    #[arg(long = "cluster", env = "TERN_CLUSTER", value_name = "NODEDIR")]
    cluster_dir: Option<PathBuf>,
    /// A mesh member to join at start, as HOST:PORT (its --listen address).
    /// Repeat for more; one reachable member is enough.
    #[arg(long, env = "TERN_JOIN", value_delimiter = ',', value_name = "HOST:PORT")]
    join: Vec<String>,
    /// The address peers reach this broker at (default: --listen; needed
    /// when listening on 0.0.0.0).
    #[arg(long, env = "TERN_ADVERTISE")]
    advertise: Option<SocketAddr>,
    /// Device locations cached per broker (mesh).
    #[arg(long, env = "TERN_LOCATION_CACHE_ENTRIES")]
    location_cache_entries: Option<u64>,
    /// Seconds a cached device location is trusted (mesh).
    #[arg(long, env = "TERN_LOCATION_CACHE_TTL_SECS")]
    location_cache_ttl_secs: Option<u64>,
    /// Device locations held as directory owner; the least used beyond it
    /// are dropped (mesh).
    #[arg(long, env = "TERN_DIRECTORY_ENTRIES")]
    directory_entries: Option<u64>,
    /// On shutdown, seconds to keep shipping held messages to the brokers the
    /// clients moved to before leaving the mesh.
    #[arg(long, env = "TERN_DRAIN_SECS")]
    drain_secs: Option<u64>,
    /// Log format.
    #[arg(long, env = "TERN_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `tern_broker=debug`.
    /// A filter that does not parse exits with status 2.
    #[arg(long, env = "TERN_LOG", default_value = "info", value_parser = parse_log_filter)]
    log: String,
}

/// `[limits]` flags: what one connection may do.
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Largest frame accepted, in bytes (at least --max-body-len + 1024).
    #[arg(long, env = "TERN_MAX_FRAME_LEN")]
    max_frame_len: Option<usize>,
    /// Largest message body accepted, in bytes.
    #[arg(long, env = "TERN_MAX_BODY_LEN")]
    max_body_len: Option<usize>,
    /// Kernel receive and send buffer of the UDP socket, in bytes.
    #[arg(long, env = "TERN_UDP_BUFFER_BYTES")]
    udp_buffer_bytes: Option<usize>,
    /// Most simultaneous client connections.
    #[arg(long, env = "TERN_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Most deliveries pushed to a device and not yet acknowledged.
    #[arg(long, env = "TERN_MAX_INFLIGHT")]
    max_inflight: Option<usize>,
    /// Most sends of one connection awaiting their durable ack.
    #[arg(long, env = "TERN_MAX_PENDING_SENDS")]
    max_pending_sends: Option<usize>,
    /// Seconds a new connection has to log in.
    #[arg(long, env = "TERN_HANDSHAKE_TIMEOUT_SECS")]
    handshake_timeout_secs: Option<u64>,
    /// Seconds without any packet before a connection is dropped (QUIC idle timeout).
    #[arg(long, env = "TERN_IDLE_TIMEOUT_SECS")]
    idle_timeout_secs: Option<u64>,
    /// Failed login attempts before the connection is closed.
    #[arg(long, env = "TERN_MAX_LOGIN_ATTEMPTS")]
    max_login_attempts: Option<u32>,
    /// Largest frame accepted before a login, in bytes.
    #[arg(long, env = "TERN_MAX_FRAME_LEN_BEFORE_LOGIN")]
    max_frame_len_before_login: Option<usize>,
    /// Client handshakes in progress above which new addresses are first
    /// validated with a QUIC Retry (0: always).
    #[arg(long, env = "TERN_HANDSHAKES_BEFORE_RETRY")]
    handshakes_before_retry: Option<usize>,
    /// Seconds a handle no mesh member knows is remembered as unknown.
    #[arg(long, env = "TERN_ACCOUNT_MISS_CACHE_SECS")]
    account_miss_cache_secs: Option<u64>,
}

/// `[rate]` flags. A RATE is BURST,EVERY: `20,30s` allows 20 at once, then
/// one more every 30 s (units ms, s, m, h).
#[derive(Debug, clap::Args)]
struct RateArgs {
    /// Rate limits on (true) or off (false).
    #[arg(long = "rate-limits", env = "TERN_RATE_LIMITS", value_name = "BOOL")]
    enabled: Option<bool>,
    /// Source networks never rate limited, as CIDR (comma-separated;
    /// replaces the default, loopback). An empty value exempts none.
    #[arg(long = "rate-exempt", env = "TERN_RATE_EXEMPT", value_name = "CIDR", value_delimiter = ',', num_args = 0..)]
    exempt: Option<Vec<String>>,
    /// Most keys (addresses, handles, devices) each rate limiter tracks.
    #[arg(long = "rate-max-keys", env = "TERN_RATE_MAX_KEYS")]
    max_keys: Option<u64>,
    /// Connection attempts (QUIC handshakes) per source address.
    #[arg(long = "rate-handshakes-per-ip", env = "TERN_RATE_HANDSHAKES_PER_IP", value_name = "RATE")]
    handshakes_per_ip: Option<tern_broker::config::Rate>,
    /// `Register` requests per source address.
    #[arg(long = "rate-register-per-ip", env = "TERN_RATE_REGISTER_PER_IP", value_name = "RATE")]
    register_per_ip: Option<tern_broker::config::Rate>,
    /// `Login` and `LinkDevice` requests per source address.
    #[arg(long = "rate-login-per-ip", env = "TERN_RATE_LOGIN_PER_IP", value_name = "RATE")]
    login_per_ip: Option<tern_broker::config::Rate>,
    /// Failed logins per handle.
    #[arg(long = "rate-login-failures-per-handle", env = "TERN_RATE_LOGIN_FAILURES_PER_HANDLE", value_name = "RATE")]
    login_failures_per_handle: Option<tern_broker::config::Rate>,
    /// `Send` requests per logged-in device.
    #[arg(long = "rate-sends-per-device", env = "TERN_RATE_SENDS_PER_DEVICE", value_name = "RATE")]
    sends_per_device: Option<tern_broker::config::Rate>,
    /// Account lookups (`ListDevices`) per logged-in device.
    #[arg(long = "rate-lookups-per-device", env = "TERN_RATE_LOOKUPS_PER_DEVICE", value_name = "RATE")]
    lookups_per_device: Option<tern_broker::config::Rate>,
    /// Key claims (`ClaimKeys`) per logged-in device and target user.
    #[arg(long = "rate-key-claims", env = "TERN_RATE_KEY_CLAIMS", value_name = "RATE")]
    key_claims_per_device_and_target: Option<tern_broker::config::Rate>,
}

/// Checks `--log` / `TERN_LOG` when the command line is parsed, so a typo
/// exits 2 naming the flag instead of quietly logging at another level.
fn parse_log_filter(filter: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| filter.to_owned())
        .map_err(|e| format!("not a log filter ({e}); examples: `info`, `warn,tern_broker=debug`"))
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Make a cluster CA: DIR/ca.pem (give it to every broker) and DIR/ca.key
    /// (keep it off the brokers; it makes new members).
    ClusterCa {
        /// Directory to write to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Make one broker's cluster certificate, signed by the CA in --ca, into
    /// NODEDIR (cert.pem, key.pem and a copy of ca.pem); start the broker
    /// with --node NAME --cluster NODEDIR.
    ClusterCert {
        /// The CA directory made by `cluster-ca`.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The broker's node name (its --node).
        #[arg(long, value_name = "NAME")]
        node: String,
        /// Directory to write to.
        #[arg(long, value_name = "NODEDIR")]
        out: PathBuf,
    },
    /// Inspect a running mesh.
    Mesh {
        #[command(subcommand)]
        command: MeshCommand,
    },
}

#[derive(Debug, clap::Subcommand)]
enum MeshCommand {
    /// Members, peer links and queued frames as one broker sees them (read
    /// from its admin port).
    Status {
        /// The broker's admin address (its --admin).
        #[arg(long, env = "TERN_ADMIN", default_value = "127.0.0.1:9433")]
        admin: String,
        /// Print the JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl Args {
    fn into_config(self) -> Result<BrokerConfig, tern_broker::ConfigError> {
        let mut c = match &self.config {
            Some(path) => BrokerConfig::from_file(path)?,
            None => BrokerConfig::default(),
        };
        macro_rules! set {
            ($($flag:ident => $($field:ident).+),* $(,)?) => {
                $(if let Some(v) = self.$flag { c.$($field).+ = v; })*
            };
        }
        if let Some(n) = self.worker_threads {
            c.worker_threads = Some(n);
        }
        set!(listen => listen, data_dir => data_dir, node => node, durability => store.durability,
             retention_secs => store.retention_secs, sweep_interval_secs => store.sweep_interval_secs,
             max_queue_len => store.max_queue_len, max_batch => store.max_batch,
             min_free_disk_mb => store.min_free_disk_mb, max_devices => store.max_devices,
             account_cache_entries => store.account_cache_entries, store_memory_mb => store.memory_mb,
             location_cache_entries => cluster.location_cache_entries,
             location_cache_ttl_secs => cluster.location_cache_ttl_secs, drain_secs => cluster.drain_secs,
             directory_entries => cluster.directory_entries, max_one_time_keys => keys.max_one_time_keys,
             key_low_water => keys.low_water);
        let l = self.limits;
        macro_rules! set_limits {
            ($($field:ident),* $(,)?) => {
                $(if let Some(v) = l.$field { c.limits.$field = v; })*
            };
        }
        set_limits!(
            max_frame_len,
            max_body_len,
            udp_buffer_bytes,
            max_connections,
            max_inflight,
            max_pending_sends,
            handshake_timeout_secs,
            idle_timeout_secs,
            max_login_attempts,
            max_frame_len_before_login,
            handshakes_before_retry,
            account_miss_cache_secs
        );
        let r = self.rate;
        macro_rules! set_rate {
            ($($field:ident),* $(,)?) => {
                $(if let Some(v) = r.$field { c.rate.$field = v; })*
            };
        }
        set_rate!(enabled, max_keys, register_per_ip, login_per_ip, login_failures_per_handle, sends_per_device);
        set_rate!(lookups_per_device, handshakes_per_ip, key_claims_per_device_and_target);
        if let Some(exempt) = r.exempt {
            c.rate.exempt = exempt
                .iter()
                .filter(|net| !net.trim().is_empty())
                .map(|net| net.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|reason| tern_broker::ConfigError { field: "rate.exempt", reason })?;
        }
        if self.admin.is_some() {
            c.admin = self.admin;
        }
        if self.admin_token.is_some() {
            c.admin_token = self.admin_token;
        }
        if self.cert.is_some() {
            c.tls.cert = self.cert;
            c.tls.key = self.key;
        }
        if !self.tls_names.is_empty() {
            c.tls.names = self.tls_names;
        }
        if self.registration_token.is_some() {
            c.registration.token = self.registration_token;
        }
        if self.cluster_dir.is_some() {
            c.cluster.dir = self.cluster_dir;
        }
        if !self.join.is_empty() {
            c.cluster.join = self.join;
        }
        if self.advertise.is_some() {
            c.cluster.advertise = self.advertise;
        }
        c.validate()?;
        Ok(c)
    }
}

fn init_logging(format: &str, filter: &str) {
    // Checked by `parse_log_filter` already.
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(command) = args.command.take() {
        return run_command(command);
    }
    init_logging(&args.log_format, &args.log);
    let config = match args.into_config().and_then(|c| c.validate().map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tern-broker: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let workers = config.worker_threads();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern-broker: cannot start {workers} worker threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

/// Runs the broker until SIGINT or SIGTERM.
async fn serve(config: BrokerConfig) -> ExitCode {
    let broker = match Broker::spawn(config).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("tern-broker: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "tern-broker listening on {} (QUIC, ALPN tern/1); clients trust {}",
        broker.local_addr(),
        broker.cert_path().display()
    );
    if let Some(admin) = broker.admin_addr() {
        eprintln!("admin: http://{admin}/metrics and /healthz");
    }
    wait_for_signal().await;
    broker.shutdown().await;
    ExitCode::SUCCESS
}

fn run_command(command: Command) -> ExitCode {
    let result = match command {
        Command::ClusterCa { out } => tern_broker::mesh::create_ca(&out).map(|cert| {
            println!("cluster CA written: {} (trust) and {} (secret)", cert.display(), out.join("ca.key").display());
        }),
        Command::ClusterCert { ca, node, out } => tern_broker::mesh::create_node_cert(&ca, &node, &out).map(|()| {
            println!(
                "certificate of node {node} written to {}; start it with --node {node} --cluster {}",
                out.display(),
                out.display()
            );
        }),
        Command::Mesh { command: MeshCommand::Status { admin, json } } => return mesh_status(&admin, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-broker: {e}");
            ExitCode::FAILURE
        }
    }
}

fn mesh_status(admin: &str, json: bool) -> ExitCode {
    let url = format!("http://{admin}/mesh");
    let body = match ureq::get(&url).call().and_then(|mut r| r.body_mut().read_to_string()) {
        Ok(body) => body,
        Err(e) => {
            eprintln!(
                "tern-broker: cannot read {url}: {e} (is the broker running with --admin {admin} and --cluster?)"
            );
            return ExitCode::FAILURE;
        }
    };
    if json {
        print!("{body}");
        return ExitCode::SUCCESS;
    }
    let status: tern_broker::mesh::MeshStatus = match serde_json::from_str(&body) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tern-broker: {url} answered something else than a mesh status: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "node {} at {} (incarnation {}); {} queue(s) held for devices with no known location",
        status.node, status.addr, status.incarnation, status.held_queues
    );
    println!(
        "{:<16} {:<22} {:<6} {:<6} {:>9} {:>8} {:>10} {:>10} {:>14} {:>9}",
        "MEMBER",
        "ADDRESS",
        "ALIVE",
        "LINK",
        "RTT(us)",
        "QUEUED",
        "FRAMES_OUT",
        "FRAMES_IN",
        "OUTBOX_QUEUES",
        "IN_FLIGHT"
    );
    for m in &status.members {
        let (link, rtt, queued, out, inn) = match &m.link {
            Some(l) => (
                "up",
                l.rtt_us.to_string(),
                l.queued_frames.to_string(),
                l.frames_out.to_string(),
                l.frames_in.to_string(),
            ),
            None => ("down", "-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<16} {:<22} {:<6} {:<6} {:>9} {:>8} {:>10} {:>10} {:>14} {:>9}",
            m.node,
            m.addr,
            if m.alive { "yes" } else { "no" },
            link,
            rtt,
            queued,
            out,
            inn,
            m.outbox_queues,
            m.outbox_in_flight
        );
    }
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<BrokerConfig, tern_broker::ConfigError> {
        let args = Args::try_parse_from(std::iter::once("tern-broker").chain(args.iter().copied())).unwrap();
        args.into_config()
    }

    #[test]
    fn limit_store_and_cluster_flags_set_their_fields() {
        let c = config(&[
            "--max-batch=7",
            "--min-free-disk-mb=9",
            "--max-devices=3",
            "--account-cache-entries=11",
            "--store-memory-mb=21",
            "--max-frame-len=300000",
            "--max-body-len=200000",
            "--udp-buffer-bytes=1048576",
            "--max-connections=12",
            "--max-inflight=13",
            "--max-pending-sends=14",
            "--handshake-timeout-secs=15",
            "--idle-timeout-secs=16",
            "--max-login-attempts=17",
            "--max-frame-len-before-login=2048",
            "--handshakes-before-retry=0",
            "--account-miss-cache-secs=21",
            "--rate-limits=false",
            "--rate-exempt=10.0.0.0/8,2001:db8::/32",
            "--rate-max-keys=22",
            "--rate-register-per-ip=5,1m",
            "--rate-login-per-ip=6,2s",
            "--rate-login-failures-per-handle=7,3h",
            "--rate-sends-per-device=8,9",
            "--rate-lookups-per-device=10,11ms",
            "--rate-key-claims=24,25s",
            "--max-one-time-keys=27",
            "--key-low-water=26",
            "--location-cache-entries=18",
            "--location-cache-ttl-secs=19",
            "--drain-secs=20",
            "--directory-entries=23",
            "--worker-threads=3",
        ])
        .unwrap();
        assert_eq!((c.worker_threads, c.worker_threads()), (Some(3), 3));
        let (s, l, cl) = (&c.store, &c.limits, &c.cluster);
        assert_eq!((s.max_batch, s.min_free_disk_mb, s.max_devices, s.account_cache_entries), (7, 9, 3, 11));
        assert_eq!(s.memory_mb, 21);
        assert_eq!((l.max_frame_len, l.max_body_len, l.udp_buffer_bytes), (300_000, 200_000, 1 << 20));
        assert_eq!((l.max_connections, l.max_inflight, l.max_pending_sends), (12, 13, 14));
        assert_eq!((l.handshake_timeout_secs, l.idle_timeout_secs, l.max_login_attempts), (15, 16, 17));
        assert_eq!((cl.location_cache_entries, cl.location_cache_ttl_secs, cl.drain_secs), (18, 19, 20));
        assert_eq!(cl.directory_entries, 23);
        assert_eq!((l.max_frame_len_before_login, l.handshakes_before_retry, l.account_miss_cache_secs), (2048, 0, 21));
        let (r, rate) = (&c.rate, tern_broker::config::Rate::new);
        assert_eq!((r.enabled, r.max_keys), (false, 22));
        let exempt: Vec<String> = r.exempt.iter().map(ToString::to_string).collect();
        assert_eq!(exempt, ["10.0.0.0/8", "2001:db8::/32"]);
        assert_eq!((r.register_per_ip, r.login_per_ip), (rate(5, 60_000), rate(6, 2_000)));
        assert_eq!(r.login_failures_per_handle, rate(7, 3 * 3_600_000));
        assert_eq!((r.sends_per_device, r.lookups_per_device), (rate(8, 9), rate(10, 11)));
        assert_eq!(r.key_claims_per_device_and_target, rate(24, 25_000));
        assert_eq!((c.keys.max_one_time_keys, c.keys.low_water), (27, 26));
    }

    #[test]
    fn rate_flags_are_checked() {
        assert!(Args::try_parse_from(["tern-broker", "--rate-sends-per-device=100"]).is_err(), "no interval");
        assert!(Args::try_parse_from(["tern-broker", "--rate-sends-per-device=100,1w"]).is_err(), "unknown unit");
        assert_eq!(config(&["--rate-exempt=10.0.0.0/33"]).unwrap_err().field, "rate.exempt");
        assert!(config(&["--rate-exempt="]).unwrap().rate.exempt.is_empty(), "an empty list exempts none");
        assert_eq!(config(&["--rate-sends-per-device=0,1s"]).unwrap_err().field, "rate.sends_per_device");
    }

    #[test]
    fn flags_override_the_file_and_are_validated() {
        let dir = std::env::temp_dir().join(format!("tern-broker-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("broker.toml");
        std::fs::write(&file, "[store]\nmax_batch = 5\n[limits]\nmax_inflight = 6\n").unwrap();
        let path = file.to_str().unwrap();
        let c = config(&["--config", path, "--max-inflight=8"]).unwrap();
        assert_eq!((c.store.max_batch, c.limits.max_inflight), (5, 8));
        assert_eq!(config(&["--config", path, "--drain-secs=4000"]).unwrap_err().field, "cluster.drain_secs");
        std::fs::write(&file, "admin_token = \"from-the-file-0123\"\n").unwrap();
        assert_eq!(config(&["--config", path]).unwrap().admin_token.as_deref(), Some("from-the-file-0123"));
        let c = config(&["--config", path, "--admin-token=from-the-flag-0123"]).unwrap();
        assert_eq!(c.admin_token.as_deref(), Some("from-the-flag-0123"));
        assert_eq!(config(&["--admin-token=short"]).unwrap_err().field, "admin_token");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_log_filter_is_a_usage_error() {
        let e = Args::try_parse_from(["tern-broker", "--log", "tern_broker=loud"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--log"), "{e}");
        assert!(Args::try_parse_from(["tern-broker", "--log", "warn,tern_broker=debug"]).is_ok());
    }
}
