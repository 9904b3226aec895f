//! `tern-broker`: parses flags, builds the configuration (defaults, then the
//! TOML file, then `TERN_*` environment variables and flags), starts the
//! broker and waits for SIGINT or SIGTERM to shut it down gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tern_broker::{Broker, BrokerConfig};

/// Tern message broker: durable per-device queues over QUIC.
///
/// Starts on embedded defaults with no flags at all: QUIC on 127.0.0.1:4433,
/// data in ./tern-data, a self-signed certificate made on first start in
/// <data-dir>/tls/cert.pem (give that file to clients as --ca).
///
/// Precedence: flags and TERN_* environment variables override the --config
/// file, which overrides the defaults. An invalid value exits with status 2
/// naming the field.
#[derive(Debug, Parser)]
#[command(name = "tern-broker", version)]
struct Args {
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
    /// This broker's node name.
    #[arg(long, env = "TERN_NODE")]
    node: Option<String>,
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
    /// Require this token to register a new handle.
    #[arg(long, env = "TERN_REGISTRATION_TOKEN")]
    registration_token: Option<String>,
    /// Log format.
    #[arg(long, env = "TERN_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `tern_broker=debug`.
    #[arg(long, env = "TERN_LOG", default_value = "info")]
    log: String,
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
        set!(listen => listen, data_dir => data_dir, node => node, durability => store.durability,
             retention_secs => store.retention_secs, sweep_interval_secs => store.sweep_interval_secs,
             max_queue_len => store.max_queue_len);
        if self.admin.is_some() {
            c.admin = self.admin;
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
        c.validate()?;
        Ok(c)
    }
}

fn init_logging(format: &str, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args.log_format, &args.log);
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tern-broker: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
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
