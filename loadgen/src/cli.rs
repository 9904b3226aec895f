//! Command line: one subcommand per scenario, sharing the target and output
//! flags. `--target`, `--ca` and `--broker-pid` repeat (or take comma-separated
//! lists); [`Common::targets`] checks the targets share a scheme.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::target::{Target, Targets};
use crate::LoadError;

/// Load generator for Tern, and for NATS JetStream and MQTT brokers under the
/// same workloads. Every acknowledged message is accounted for: the summary
/// (and `--json`) reports lost, duplicated and reordered messages, and the
/// exit status is 1 if any acknowledged message was lost. Several
/// `--target`s (the brokers of a Tern mesh or a NATS cluster) share the
/// users between them.
///
/// Exit status: 0 ok; 1 acknowledged messages lost; 2 bad arguments;
/// 3 broker unreachable; 4 set-up refused or I/O error.
#[derive(Debug, Parser)]
#[command(name = "tern-loadgen", version, about, long_about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) scenario: Scenario,
}

impl Cli {
    /// The flags shared with the other scenarios; `chaos` has its own
    /// (it starts the brokers itself, so it takes no `--target`).
    pub(crate) fn common(&self) -> Option<&Common> {
        match &self.scenario {
            Scenario::Chat(a) => Some(&a.common),
            Scenario::Max(a) => Some(&a.common),
            Scenario::Offline(a) => Some(&a.common),
            Scenario::Connections(a) => Some(&a.common),
            Scenario::Storm(a) => Some(&a.common),
            Scenario::Keys(a) => Some(&a.common),
            Scenario::Chaos(_) => None,
        }
    }

    /// `--quiet` and `--json` of any scenario.
    pub(crate) fn output(&self) -> (bool, Option<PathBuf>) {
        match (&self.scenario, self.common()) {
            (Scenario::Chaos(a), _) => (a.quiet, a.json.clone()),
            (_, Some(c)) => (c.quiet, c.json.clone()),
            (_, None) => (false, None),
        }
    }

    /// Runtime worker threads (`--threads`, default: the number of CPUs).
    pub(crate) fn threads(&self) -> usize {
        let threads = match &self.scenario {
            Scenario::Chaos(a) => a.threads,
            _ => self.common().and_then(|c| c.threads),
        };
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)).max(1)
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Scenario {
    /// Open loop: USERS users in one-to-one conversations send at a fixed
    /// aggregate RATE. Send times are scheduled in advance and latency is
    /// measured from the scheduled time, so a slow broker cannot hide its
    /// latency by slowing the sender (no coordinated omission).
    ///
    /// tern:// also takes --devices (each user has several devices; all
    /// receive every message, the sender's others get copies) and --e2e
    /// (every message encrypted end to end, Olm, for each of those devices).
    Chat(ChatArgs),
    /// Closed loop: doubles the number of sends in flight each stage until
    /// p99 send->deliver passes --p99-bound-ms, throughput stops growing or a
    /// delivery backlog builds; reports the highest rate sustained within bounds.
    Max(MaxArgs),
    /// Fills the queues of offline users, then connects them all and measures
    /// how fast the broker drains the backlog.
    Offline(OfflineArgs),
    /// Ramps to USERS idle connections and reports the broker's resident
    /// memory per connection (from /proc; the broker must run on this machine).
    Connections(ConnectionsArgs),
    /// USERS connected clients drop and reconnect, spread over --window
    /// seconds; reports the time until every one is served again.
    Storm(StormArgs),
    /// tern:// only: the key service. USERS users publish end-to-end keys
    /// (real signed Olm keys, replenished when the broker says the stock
    /// runs low), then --claimers connections claim them as fast as the
    /// broker answers for --duration seconds. Reports claims/s, claim
    /// latency, and any one-time key handed out twice (must be 0: exit 1
    /// otherwise) and fallback keys handed out. With several --targets (a
    /// mesh) users and claimers are spread over the brokers, so most
    /// claims go through the broker that owns the claimed account.
    Keys(KeysArgs),
    /// Starts a mesh of --brokers tern-broker processes on loopback and runs
    /// the chat workload over it (users spread over the brokers, each
    /// failing over to the others) while brokers are SIGKILLed and
    /// restarted, links between them cut, and brokers paused (SIGSTOP)
    /// longer than the failure detector's timeout. After a quiet drain it
    /// fails (exit 1) if any acknowledged message was lost, or any message
    /// delivered twice or out of order. The fault schedule is drawn from
    /// --seed (printed), so a failing run can be repeated.
    Chaos(ChaosArgs),
}

/// Flags every scenario takes.
#[derive(Debug, Args)]
pub(crate) struct Common {
    /// Broker to load: tern://HOST:PORT, nats://HOST:PORT (JetStream) or
    /// mqtt://HOST:PORT (QoS 1, persistent sessions). Repeat the flag, or
    /// separate URLs with commas, to spread the users over the brokers of
    /// one Tern mesh or NATS cluster: user i connects to the (i mod N)-th,
    /// so chat partners sit on different brokers. All URLs must have the
    /// same scheme; mqtt:// takes one.
    #[arg(long, value_name = "URL", value_delimiter = ',', required = true)]
    pub(crate) target: Vec<Target>,
    /// PEM certificate(s) to trust (tern:// only): the broker's
    /// DATA_DIR/tls/cert.pem, or the CA that signed its certificate. Given
    /// once, the file serves every --target (with several brokers: a file
    /// holding all their certificates); or give it once per --target, in
    /// the same order.
    #[arg(long, value_name = "FILE", value_delimiter = ',')]
    pub(crate) ca: Vec<PathBuf>,
    /// Number of users (each one connection).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(2..=1_000_000))]
    pub(crate) users: u32,
    /// Message body size in bytes (at least 23: the load generator's header).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(23..=1_048_576))]
    pub(crate) body_bytes: u32,
    /// Write the report as JSON to FILE (`-` for standard output).
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
    /// Broker process to read CPU time and memory of, from /proc; repeat it
    /// for several brokers (their CPU and memory are summed). Found
    /// automatically, one per --target, when the brokers listen on this machine.
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub(crate) broker_pid: Vec<u32>,
    /// No progress bar and no summary table (the JSON is still written).
    #[arg(long, short)]
    pub(crate) quiet: bool,
    /// Seconds to wait for each durable ack before counting a Timeout.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub(crate) ack_timeout: f64,
    /// Seconds to wait, after sending stops, for acks and deliveries to
    /// arrive before counting the missing ones as lost.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub(crate) drain_timeout: f64,
    /// Users connecting at once while setting up.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) connect_concurrency: u32,
    /// UDP sockets the tern:// connections share (per --ca file).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) endpoints: u32,
    /// Async runtime worker threads (default: number of CPUs).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// tern:// only: each user's client also lists the other --targets
    /// (after its own, in rotation) and moves to the next when its broker
    /// fails. Without it a user only ever uses its own target, so a slow
    /// broker is not hidden by failing over.
    #[arg(long)]
    pub(crate) failover: bool,
    /// tern:// with --failover: after a connection loss a user goes on to
    /// the next target instead of its own broker first, so devices move
    /// across the mesh at every reconnect.
    #[arg(long, requires = "failover")]
    pub(crate) move_on_reconnect: bool,
    /// tern:// only: send every message with no delivered receipt asked
    /// (`Send.no_receipt`), so each costs the broker a store write and the
    /// sender a delivery and an ack less. NATS and MQTT send no receipts.
    #[arg(long)]
    pub(crate) no_receipts: bool,
    /// Seconds a connection may be silent before it counts as broken (QUIC
    /// idle timeout; keep-alives go at a third of it).
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub(crate) idle_timeout: f64,
    /// Seconds to wait for one connection's handshake.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub(crate) connect_timeout: f64,
}

impl Common {
    /// The `--target`s as one list, checked to share a scheme.
    pub(crate) fn targets(&self) -> Result<Targets, LoadError> {
        Targets::new(self.target.clone()).map_err(LoadError::Args)
    }
}

/// Flags of `chat`.
#[derive(Debug, Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Aggregate messages per second over all users.
    #[arg(long, value_name = "MSGS_PER_S")]
    pub(crate) rate: f64,
    /// Seconds of sending, after the warm-up.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub(crate) duration: f64,
    /// Seconds of sending at the same rate before measuring (accounted,
    /// not timed).
    #[arg(long, default_value_t = 1.0, value_name = "SECS")]
    pub(crate) warmup: f64,
    /// Most sends waiting for their ack; beyond it the schedule slips (and
    /// the slip shows in the latency).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) max_in_flight: usize,
    /// tern:// only: devices per user. Device 1 is registered and sends;
    /// the others are linked with an approval signed by device 1. Every
    /// device of the recipient receives each message and the sender's
    /// other devices get copies: 2N-1 deliveries per message, each counted
    /// (lost, duplicated, reordered per device; latency per delivery).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub(crate) devices: u32,
    /// tern:// only: encrypt every message end to end (tern_client::secure,
    /// Olm sessions per device pair, state in memory): one ciphertext per
    /// recipient device and per other device of the sender. A user's sends
    /// then go one at a time (each waits for the previous ack: sessions are
    /// started and ratchets stepped in send order); bodies are at least
    /// 46 B (the header in hex).
    #[arg(long)]
    pub(crate) e2e: bool,
}

/// Flags of `keys`.
#[derive(Debug, Args)]
pub(crate) struct KeysArgs {
    /// --users is the number of users whose keys are claimed (one device
    /// each); --body-bytes and --no-receipts do not apply.
    #[command(flatten)]
    pub(crate) common: Common,
    /// Connections claiming keys (registered users of their own), spread
    /// over the --targets like the users.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) claimers: u32,
    /// Claims each claimer keeps in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) in_flight: u32,
    /// Seconds of claiming.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub(crate) duration: f64,
}

/// Flags of `max`.
#[derive(Debug, Args)]
pub(crate) struct MaxArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Total seconds, split evenly over the stages.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub(crate) duration: f64,
    /// Sends in flight in the first stage; doubled each stage.
    #[arg(long, default_value_t = 8)]
    pub(crate) start_in_flight: usize,
    /// Sends in flight in the last stage.
    #[arg(long, default_value_t = 4096)]
    pub(crate) max_in_flight: usize,
    /// A stage whose p99 send->deliver latency exceeds this is over the limit.
    #[arg(long, default_value_t = 100.0, value_name = "MS")]
    pub(crate) p99_bound_ms: f64,
}

/// Flags of `offline`.
#[derive(Debug, Args)]
pub(crate) struct OfflineArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Messages queued for each offline user (half the users send, half receive).
    #[arg(long, default_value_t = 1000)]
    pub(crate) messages: u64,
    /// Sends in flight while filling.
    #[arg(long, default_value_t = 1024)]
    pub(crate) in_flight: usize,
}

/// Flags of `connections`.
#[derive(Debug, Args)]
pub(crate) struct ConnectionsArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Seconds to hold the connections idle before measuring memory.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub(crate) hold: f64,
}

/// Flags of `storm`.
#[derive(Debug, Args)]
pub(crate) struct StormArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Reconnects are spread uniformly over this many seconds.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub(crate) window: f64,
}

/// A kind of fault `chaos` injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Fault {
    /// SIGKILL a random broker every 2-5 s; restart it on its data
    /// directory and port 0.5-2 s later.
    Kill,
    /// Cut a random peer link (`POST /mesh/sever/{node}?secs=N` on one
    /// end's admin port) for 1-4 s, every 2-4 s.
    Sever,
    /// SIGSTOP a random broker for 8-11 s (longer than the failure
    /// detector takes to declare it down), then SIGCONT.
    Pause,
}

/// Flags of `chaos`.
#[derive(Debug, Args)]
pub(crate) struct ChaosArgs {
    /// The tern-broker binary to run.
    #[arg(long, value_name = "PATH")]
    pub(crate) broker_bin: PathBuf,
    /// Directory for the brokers' certificates, data and logs (made if
    /// missing; must be empty). Kept after the run.
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: PathBuf,
    /// Brokers in the mesh.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=9))]
    pub(crate) brokers: u32,
    /// Seconds of chaos, with the load running. Split into 60 s rounds:
    /// kills for half of each, link cuts for a fifth, pauses for the rest.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub(crate) duration: f64,
    /// Aggregate messages per second over all users.
    #[arg(long, default_value_t = 500.0, value_name = "MSGS_PER_S")]
    pub(crate) rate: f64,
    /// Seed of the fault schedule (default: random, printed).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Faults to inject (comma-separated); a round skips the phases of
    /// the others.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "kill,sever,pause")]
    pub(crate) faults: Vec<Fault>,
    /// Token for the brokers' admin endpoints: passed to each broker as
    /// TERN_ADMIN_TOKEN and sent as `Authorization: Bearer` (default: a
    /// random one per run).
    #[arg(long, value_name = "TOKEN")]
    pub(crate) admin_token: Option<String>,
    /// Log filter for the brokers (their TERN_LOG); logs go to DIR/logs.
    #[arg(long, default_value = "info", value_name = "FILTER")]
    pub(crate) broker_log: String,
    /// Seconds to keep watching after every acknowledged message has
    /// arrived, so late duplicates and reorders show.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub(crate) settle: f64,
    /// Users move to the next broker at every reconnect instead of going
    /// back to the one they were at, so each fault also moves devices
    /// across the mesh (the order of a moving sender and of a moving
    /// recipient is checked too).
    #[arg(long)]
    pub(crate) moves: bool,
    /// Number of users (each one connection), spread over the brokers.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(2..=100_000))]
    pub(crate) users: u32,
    /// Message body size in bytes (at least 23).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(23..=1_048_576))]
    pub(crate) body_bytes: u32,
    /// Write the report as JSON to FILE (`-` for standard output).
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
    /// No progress and no summary table (the JSON is still written).
    #[arg(long, short)]
    pub(crate) quiet: bool,
    /// Seconds to wait for each durable ack before counting a Timeout.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub(crate) ack_timeout: f64,
    /// Seconds to wait, after the chaos, for acks and deliveries before
    /// counting the missing ones as lost.
    #[arg(long, default_value_t = 120.0, value_name = "SECS")]
    pub(crate) drain_timeout: f64,
    /// The clients' QUIC idle timeout: how soon a user notices a paused or
    /// vanished broker and moves to the next.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub(crate) idle_timeout: f64,
    /// Seconds to wait for one handshake (a dead or paused broker).
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    pub(crate) connect_timeout: f64,
    /// Async runtime worker threads (default: number of CPUs).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(args: &[&str]) -> Result<Common, clap::Error> {
        let argv = ["tern-loadgen", "chat", "--rate", "10"].iter().chain(args);
        Cli::try_parse_from(argv).map(|cli| match cli.scenario {
            Scenario::Chat(a) => a.common,
            _ => unreachable!("parsed chat"),
        })
    }

    #[test]
    fn one_target_parses_as_before() {
        let c = common(&["--target", "tern://127.0.0.1:4433", "--ca", "cert.pem", "--broker-pid", "7"]).unwrap();
        assert_eq!(c.targets().unwrap().to_string(), "tern://127.0.0.1:4433");
        assert_eq!((c.ca, c.broker_pid), (vec![PathBuf::from("cert.pem")], vec![7]));
    }

    #[test]
    fn targets_repeat_and_split_on_commas() {
        let c = common(&[
            "--target",
            "tern://127.0.0.1:1,tern://127.0.0.1:2",
            "--target",
            "tern://127.0.0.1:3",
            "--ca",
            "a.pem",
            "--ca",
            "b.pem,c.pem",
            "--broker-pid",
            "1,2",
            "--broker-pid",
            "3",
        ])
        .unwrap();
        let t = c.targets().unwrap();
        assert_eq!(t.all().iter().map(Target::port).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(c.ca.len(), 3);
        assert_eq!(c.broker_pid, vec![1, 2, 3]);
    }

    #[test]
    fn chaos_needs_no_target_and_has_its_own_defaults() {
        let cli = Cli::try_parse_from(["tern-loadgen", "chaos", "--broker-bin", "b", "--dir", "d"]).unwrap();
        assert!(cli.common().is_none());
        assert_eq!(cli.output(), (false, None));
        let Scenario::Chaos(a) = cli.scenario else { unreachable!("parsed chaos") };
        assert_eq!((a.brokers, a.duration, a.users, a.seed), (3, 600.0, 30, None));
        assert_eq!(a.faults, vec![Fault::Kill, Fault::Sever, Fault::Pause]);
        let cli = Cli::try_parse_from([
            "tern-loadgen",
            "chaos",
            "--broker-bin",
            "b",
            "--dir",
            "d",
            "--faults",
            "pause,kill",
            "--seed",
            "42",
            "--json",
            "-",
        ])
        .unwrap();
        assert_eq!(cli.output(), (false, Some(PathBuf::from("-"))));
        let Scenario::Chaos(a) = cli.scenario else { unreachable!("parsed chaos") };
        assert_eq!((a.faults, a.seed), (vec![Fault::Pause, Fault::Kill], Some(42)));
        assert!(Cli::try_parse_from(["tern-loadgen", "chaos", "--dir", "d"]).is_err(), "--broker-bin is required");
        assert!(Cli::try_parse_from(["tern-loadgen", "chaos", "--broker-bin", "b", "--dir", "d", "--faults", "fire"])
            .is_err());
    }

    #[test]
    fn chat_devices_and_e2e_default_to_one_device_in_the_clear() {
        let parse = |extra: &[&str]| {
            let argv = ["tern-loadgen", "chat", "--rate", "10", "--target", "tern://h:1"].iter().chain(extra);
            Cli::try_parse_from(argv).map(|cli| match cli.scenario {
                Scenario::Chat(a) => (a.devices, a.e2e),
                _ => unreachable!("parsed chat"),
            })
        };
        assert_eq!(parse(&[]).unwrap(), (1, false));
        assert_eq!(parse(&["--devices", "3", "--e2e"]).unwrap(), (3, true));
        assert!(parse(&["--devices", "0"]).is_err());
        let cli = Cli::try_parse_from(["tern-loadgen", "keys", "--target", "tern://h:1", "--claimers", "8"]).unwrap();
        let Scenario::Keys(a) = cli.scenario else { unreachable!("parsed keys") };
        assert_eq!((a.claimers, a.in_flight, a.duration, a.common.users), (8, 4, 10.0, 100));
    }

    #[test]
    fn targets_are_required_and_share_a_scheme() {
        assert!(common(&[]).is_err(), "--target is required");
        assert!(common(&["--target", "tern://h:1,h:2"]).is_err(), "each URL has a scheme");
        let mixed = common(&["--target", "tern://h:1", "--target", "nats://h:2"]).unwrap();
        let err = mixed.targets().unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("different schemes"), "{err}");
    }
}
