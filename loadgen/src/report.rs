//! The run's report: a summary table for people, JSON for machines.

use std::io::Write;
use std::path::Path;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::ledger::{Accounting, Anomaly};
use crate::LoadError;

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct LatencySummary {
    pub(crate) count: u64,
    pub(crate) mean: f64,
    pub(crate) p50: u64,
    pub(crate) p90: u64,
    pub(crate) p99: u64,
    pub(crate) p999: u64,
    pub(crate) max: u64,
}

impl LatencySummary {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// CPU and memory of the broker process(es) during the run: with several
/// targets, the sums over their processes.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct BrokerUsage {
    /// The first broker process.
    pub(crate) pid: u32,
    /// Every broker process measured (one per target).
    pub(crate) pids: Vec<u32>,
    /// How many processes the figures below add up.
    pub(crate) brokers: usize,
    /// CPU seconds (user + system) the brokers used during the measured part.
    pub(crate) cpu_s: f64,
    /// Broker CPU per delivered message (per device delivery with
    /// several devices), in microseconds.
    pub(crate) cpu_us_per_msg: f64,
    /// Broker CPU per acknowledged send, in microseconds (with one device
    /// per user about the same as per delivery).
    pub(crate) cpu_us_per_send: f64,
    /// Resident memory at the end.
    pub(crate) rss_bytes: u64,
}

/// One stage of the `max` scenario.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Stage {
    pub(crate) in_flight: usize,
    pub(crate) seconds: f64,
    pub(crate) acked_per_s: f64,
    pub(crate) delivered_per_s: f64,
    pub(crate) ack_p99_us: u64,
    pub(crate) deliver_p50_us: u64,
    pub(crate) deliver_p99_us: u64,
    /// Acknowledged but not yet delivered at the end of the stage.
    pub(crate) backlog: u64,
    pub(crate) within_bounds: bool,
}

/// Result of `max`.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct MaxResult {
    /// Highest delivered/s of a stage within bounds.
    pub(crate) max_sustained_per_s: f64,
    /// Why the ramp stopped.
    pub(crate) stopped_because: String,
    pub(crate) stages: Vec<Stage>,
}

/// Result of `offline`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct OfflineResult {
    pub(crate) messages: u64,
    pub(crate) fill_s: f64,
    pub(crate) fill_per_s: f64,
    /// From the first reconnect to the last delivery.
    pub(crate) drain_s: f64,
    pub(crate) drain_per_s: f64,
}

/// Result of `connections`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct ConnectionsResult {
    pub(crate) requested: u32,
    pub(crate) established: u32,
    pub(crate) failed: u32,
    pub(crate) ramp_s: f64,
    pub(crate) rss_before_bytes: u64,
    pub(crate) rss_after_bytes: u64,
    /// (after - before) / established.
    pub(crate) bytes_per_connection: f64,
    /// Connections that still answered a ping after the hold.
    pub(crate) alive_after_hold: u32,
}

/// Result of `storm`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct StormResult {
    pub(crate) clients: u32,
    pub(crate) window_s: f64,
    /// Seconds the clients took to drop their connections; the reconnect
    /// window starts when the last has.
    pub(crate) drop_s: f64,
    pub(crate) served: u32,
    pub(crate) failed: u32,
    /// From the first drop until the last client was served again.
    pub(crate) all_served_s: f64,
    /// Per client: from its scheduled reconnect to its first answered ping.
    pub(crate) reconnect_ms: LatencySummary,
}

/// One fault a `chaos` run injected, as it happened.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChaosEvent {
    /// Seconds since the load started.
    pub(crate) at_s: f64,
    /// Time of day (UTC) as the brokers' logs print it.
    pub(crate) utc: String,
    /// `kill`, `restart`, `sever`, `pause`, `resume`, or `exited` (a broker
    /// that stopped by itself).
    pub(crate) kind: &'static str,
    /// The broker it was done to (for `sever`: the one asked).
    pub(crate) node: String,
    /// What else there is to say: the link cut and for how long, the start
    /// number, how long a pause lasted.
    pub(crate) detail: String,
    /// Why it did not work, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

/// One broker after the drain: what its outbox still holds (`GET /mesh`)
/// and its mesh counters since its last start (`/metrics`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BrokerAfterDrain {
    pub(crate) node: String,
    /// Times it was started (1 + restarts).
    pub(crate) starts: u32,
    /// Queues held for devices with no known location.
    pub(crate) held_queues: u64,
    /// Queues still being shipped to other brokers.
    pub(crate) outbox_queues: u64,
    /// Entries shipped and not yet acknowledged.
    pub(crate) outbox_in_flight: u64,
    /// `tern_mesh_*_total` since its last start.
    pub(crate) counters: std::collections::BTreeMap<String, u64>,
}

/// Result of `chaos`.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ChaosResult {
    /// Seed of the fault schedule (`--seed` repeats it).
    pub(crate) seed: u64,
    pub(crate) brokers: usize,
    pub(crate) faults: Vec<crate::cli::Fault>,
    /// Users moved to the next broker at every reconnect (`--moves`).
    pub(crate) moves: bool,
    /// Seconds of chaos (and of sending).
    pub(crate) chaos_s: f64,
    /// Seconds from the end of the chaos until every acknowledged message
    /// had arrived (or the drain timed out), plus the settle time.
    pub(crate) drain_s: f64,
    pub(crate) kills: u64,
    pub(crate) pauses: u64,
    pub(crate) severs: u64,
    /// Faults that could not be injected (a sever the admin port refused).
    pub(crate) failed_faults: u64,
    /// Brokers that exited without being killed (a crash).
    pub(crate) unexpected_exits: u64,
    /// Clients that stopped for good and were replaced by a new login.
    pub(crate) client_restarts: u64,
    /// Acknowledged messages still missing at the end.
    pub(crate) missing_at_end: u64,
    /// Whether nothing acknowledged was lost, nothing duplicated, nothing
    /// reordered, and no broker crashed.
    pub(crate) passed: bool,
    /// Where the brokers' data and logs are.
    pub(crate) dir: String,
    pub(crate) events: Vec<ChaosEvent>,
    /// The first anomalies in detail, times in ms since the load started.
    pub(crate) anomalies: Vec<Anomaly>,
    pub(crate) brokers_after_drain: Vec<BrokerAfterDrain>,
}

/// Result of `keys`.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct KeysResult {
    /// Users whose keys were claimed (one device each).
    pub(crate) key_owners: u32,
    pub(crate) claimers: u32,
    pub(crate) in_flight_per_claimer: u32,
    /// One-time keys the owners published before the claims began.
    pub(crate) published_before: u64,
    /// Claims answered (each for every device of one user).
    pub(crate) claims: u64,
    pub(crate) claims_per_s: f64,
    /// Claim round trips, in microseconds.
    pub(crate) claim_latency_us: LatencySummary,
    /// One-time keys handed out.
    pub(crate) one_time_keys: u64,
    /// One-time keys handed out more than once (must be 0).
    pub(crate) one_time_keys_twice: u64,
    /// Fallback keys handed out (a device whose one-time keys had run out).
    pub(crate) fallback_keys: u64,
    /// Devices a claim found without keys.
    pub(crate) without_keys: u64,
    /// Claims refused or failed, by kind (`RateLimited`, `Timeout`, ...).
    pub(crate) errors: std::collections::BTreeMap<String, u64>,
    /// Broker CPU per answered claim, in microseconds.
    pub(crate) broker_cpu_us_per_claim: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    pub(crate) target: String,
    pub(crate) users: u32,
    /// Devices per user (`chat --devices`).
    pub(crate) devices: u32,
    /// Messages encrypted end to end (`chat --e2e`).
    pub(crate) e2e: bool,
    pub(crate) body_bytes: u32,
    /// Chat: the aggregate rate asked for.
    pub(crate) offered_rate: Option<f64>,
    /// Seconds of the measured part (sending, then draining).
    pub(crate) duration_s: f64,
    #[serde(flatten)]
    pub(crate) accounting: Accounting,
    /// First deliveries per second over the measured part.
    pub(crate) throughput_per_s: f64,
    /// Durable acks per second over the measured part.
    pub(crate) acked_per_s: f64,
    pub(crate) ack_latency_us: LatencySummary,
    pub(crate) deliver_latency_us: LatencySummary,
    pub(crate) broker: Option<BrokerUsage>,
    pub(crate) loadgen_cpu_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max: Option<MaxResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) offline: Option<OfflineResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) connections: Option<ConnectionsResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) storm: Option<StormResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) chaos: Option<ChaosResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) keys: Option<KeysResult>,
}

impl Report {
    /// Why the run failed (exit status 1), if it did: acknowledged messages
    /// lost; for `chaos` also any duplicate, reorder or broker crash.
    pub(crate) fn failure(&self) -> Option<String> {
        let a = &self.accounting;
        if let Some(c) = self.chaos.as_ref().filter(|c| !c.passed) {
            return Some(format!(
                "chaos run failed: {} lost, {} duplicated, {} reordered, {} broker crash(es), {} acknowledged \
                 (seed {}; data and logs in {})",
                a.lost, a.duplicated, a.reordered, c.unexpected_exits, a.acked, c.seed, c.dir
            ));
        }
        if let Some(k) = self.keys.as_ref().filter(|k| k.one_time_keys_twice > 0) {
            return Some(format!("{} one-time key(s) were handed out twice", k.one_time_keys_twice));
        }
        (a.lost > 0).then(|| format!("{} acknowledged message(s) were never delivered (see `lost` above)", a.lost))
    }

    /// Writes the JSON to `path` (`-`: standard output).
    pub(crate) fn write_json(&self, path: &Path) -> Result<(), LoadError> {
        let json = serde_json::to_string_pretty(self).map_err(|e| LoadError::Io(e.to_string()))?;
        if path.as_os_str() == "-" {
            println!("{json}");
            return Ok(());
        }
        let io = |e: std::io::Error| LoadError::Io(format!("writing {}: {e}", path.display()));
        let mut f = std::fs::File::create(path).map_err(io)?;
        writeln!(f, "{json}").map_err(io)
    }

    /// The summary for a terminal.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let a = &self.accounting;
        let rate = self.offered_rate.map_or(String::new(), |r| format!(", offered {r:.0} msg/s"));
        let devices = match (self.devices, self.e2e) {
            (0 | 1, false) => String::new(),
            (d, e2e) => format!(
                ", {d} device(s) each ({} deliveries per message){}",
                a.deliveries_per_message,
                if e2e { ", end-to-end encrypted" } else { "" }
            ),
        };
        out += &format!(
            "{} against {}: {} users{devices}, {} B bodies{rate}, {:.1} s\n",
            self.scenario, self.target, self.users, self.body_bytes, self.duration_s
        );
        if let Some(k) = &self.keys {
            out += &keys_table(k);
            return out;
        }
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header([
            "sent",
            "acked",
            "delivered",
            "lost",
            "duplicated",
            "reordered",
            "failed",
            "acked/s",
            "delivered/s",
        ]);
        t.add_row(
            [a.sent, a.acked, a.delivered, a.lost, a.duplicated, a.reordered, a.failed]
                .iter()
                .map(|n| Cell::new(n).set_alignment(CellAlignment::Right))
                .chain([
                    Cell::new(format!("{:.0}", self.acked_per_s)).set_alignment(CellAlignment::Right),
                    Cell::new(format!("{:.0}", self.throughput_per_s)).set_alignment(CellAlignment::Right),
                ]),
        );
        out += &format!("{t}\n");
        if self.ack_latency_us.count + self.deliver_latency_us.count > 0 {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header(["latency (µs)", "count", "p50", "p90", "p99", "p99.9", "max"]);
            for (name, l) in [("send -> ack", &self.ack_latency_us), ("send -> deliver", &self.deliver_latency_us)] {
                t.add_row(
                    std::iter::once(Cell::new(name)).chain(
                        [l.count, l.p50, l.p90, l.p99, l.p999, l.max]
                            .iter()
                            .map(|n| Cell::new(n).set_alignment(CellAlignment::Right)),
                    ),
                );
            }
            out += &format!("{t}\n");
        }
        if !a.errors.is_empty() {
            let errs: Vec<String> = a.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            out += &format!("errors: {}\n", errs.join(", "));
        }
        if a.undecryptable > 0 {
            out += &format!("undecryptable deliveries (asked for again): {}\n", a.undecryptable);
        }
        if let Some(m) = &self.max {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header([
                "in flight",
                "acked/s",
                "delivered/s",
                "ack p99 µs",
                "deliver p50 µs",
                "deliver p99 µs",
                "backlog",
                "ok",
            ]);
            for s in &m.stages {
                t.add_row([
                    s.in_flight.to_string(),
                    format!("{:.0}", s.acked_per_s),
                    format!("{:.0}", s.delivered_per_s),
                    s.ack_p99_us.to_string(),
                    s.deliver_p50_us.to_string(),
                    s.deliver_p99_us.to_string(),
                    s.backlog.to_string(),
                    if s.within_bounds { "yes" } else { "no" }.to_owned(),
                ]);
            }
            out += &format!("{t}\nmax sustained: {:.0} msg/s ({})\n", m.max_sustained_per_s, m.stopped_because);
        }
        if let Some(o) = &self.offline {
            out += &format!(
                "offline: {} messages queued in {:.2} s ({:.0}/s); drained in {:.2} s ({:.0}/s)\n",
                o.messages, o.fill_s, o.fill_per_s, o.drain_s, o.drain_per_s
            );
        }
        if let Some(c) = &self.connections {
            out += &format!(
                "connections: {}/{} established in {:.1} s ({} failed), {} alive after the hold; broker RSS {} -> {} MiB: {:.1} KiB per connection\n",
                c.established,
                c.requested,
                c.ramp_s,
                c.failed,
                c.alive_after_hold,
                c.rss_before_bytes >> 20,
                c.rss_after_bytes >> 20,
                c.bytes_per_connection / 1024.0
            );
        }
        if let Some(s) = &self.storm {
            out += &format!(
                "storm: {}/{} clients served again ({} failed); all served {:.2} s after the drop began (drop {:.2} s, then reconnects over {:.1} s); reconnect p50 {} ms, p99 {} ms, max {} ms\n",
                s.served, s.clients, s.failed, s.all_served_s, s.drop_s, s.window_s, s.reconnect_ms.p50, s.reconnect_ms.p99, s.reconnect_ms.max
            );
        }
        if let Some(c) = &self.chaos {
            out += &chaos_table(self, c);
        }
        if let Some(b) = &self.broker {
            let pids: Vec<String> = b.pids.iter().map(u32::to_string).collect();
            let who = if b.brokers > 1 {
                format!("{} brokers (pids {})", b.brokers, pids.join(", "))
            } else {
                format!("broker pid {}", b.pid)
            };
            out += &format!(
                "{who}: {:.2} CPU s, {:.1} µs CPU per delivered message{}, RSS {} MiB; loadgen {:.2} CPU s\n",
                b.cpu_s,
                b.cpu_us_per_msg,
                if a.deliveries_per_message > 1 {
                    format!(" ({:.1} µs per send)", b.cpu_us_per_send)
                } else {
                    String::new()
                },
                b.rss_bytes >> 20,
                self.loadgen_cpu_s
            );
        }
        out
    }
}

/// The `keys` summary: the claim rate and latency, and what was handed out.
fn keys_table(k: &KeysResult) -> String {
    let mut out = format!(
        "keys: {} users' keys ({} one-time keys published first), {} claimers x {} in flight\n",
        k.key_owners, k.published_before, k.claimers, k.in_flight_per_claimer
    );
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "claims",
        "claims/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "one-time keys",
        "handed out twice",
        "fallback keys",
        "without keys",
    ]);
    let l = &k.claim_latency_us;
    let cells = [format!("{}", k.claims), format!("{:.0}", k.claims_per_s)]
        .into_iter()
        .chain(
            [l.p50, l.p99, l.max, k.one_time_keys, k.one_time_keys_twice, k.fallback_keys, k.without_keys]
                .map(|n| n.to_string()),
        )
        .map(|v| Cell::new(v).set_alignment(CellAlignment::Right));
    t.add_row(cells);
    out += &format!("{t}\n");
    if !k.errors.is_empty() {
        let errs: Vec<String> = k.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        out += &format!("claim errors: {}\n", errs.join(", "));
    }
    if k.broker_cpu_us_per_claim > 0.0 {
        out += &format!("broker CPU per claim: {:.1} µs\n", k.broker_cpu_us_per_claim);
    }
    out
}

/// The `chaos` summary: faults, the accounting and delivery latency in one
/// row, then the verdict.
fn chaos_table(r: &Report, c: &ChaosResult) -> String {
    let a = &r.accounting;
    let faults: Vec<String> = c.faults.iter().map(|f| format!("{f:?}").to_lowercase()).collect();
    let mut out = format!(
        "chaos: {} brokers, {:.0} s of {}{} (seed {}), then {:.1} s of drain\n",
        c.brokers,
        c.chaos_s,
        faults.join(", "),
        if c.moves { ", users moving broker at every reconnect" } else { "" },
        c.seed,
        c.drain_s
    );
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "kills",
        "pauses",
        "severs",
        "sent",
        "acked",
        "delivered",
        "lost",
        "duplicated",
        "reordered",
        "p50 ms",
        "p99 ms",
    ]);
    let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
    let cells = [c.kills, c.pauses, c.severs, a.sent, a.acked, a.delivered, a.lost, a.duplicated, a.reordered]
        .into_iter()
        .map(|n| n.to_string())
        .chain([ms(r.deliver_latency_us.p50), ms(r.deliver_latency_us.p99)])
        .map(|v| Cell::new(v).set_alignment(CellAlignment::Right));
    t.add_row(cells);
    out += &format!("{t}\n(latency: send -> first delivery)\n");
    out += &format!(
        "failed sends {} (not counted as lost), delivered though unacknowledged {}, client restarts {}, \
         broker crashes {}, faults not injected {}\n",
        a.failed, a.delivered_unacked, c.client_restarts, c.unexpected_exits, c.failed_faults
    );
    for o in c.brokers_after_drain.iter().filter(|o| o.held_queues + o.outbox_queues + o.outbox_in_flight > 0) {
        out += &format!(
            "after the drain {} still holds {} queue(s) for unknown locations, ships {} queue(s), {} entries unacknowledged\n",
            o.node, o.held_queues, o.outbox_queues, o.outbox_in_flight
        );
    }
    out += &if c.passed {
        "PASS: every acknowledged message delivered, none twice, none out of order\n".to_owned()
    } else {
        format!("FAIL (seed {}; brokers' data and logs in {})\n", c.seed, c.dir)
    };
    out
}
