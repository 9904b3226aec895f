//! `chaos`: the chat workload over a mesh of brokers that keep failing.
//!
//! 1. [`Cluster::create`] starts `--brokers` brokers on loopback and waits
//!    until the mesh is formed.
//! 2. The users connect (user `i` to broker `i mod N`, each client listing
//!    the other brokers after its own, so it fails over) and the open-loop
//!    chat load of [`chat::offer`] runs for `--duration` seconds.
//! 3. Meanwhile [`drive`] plays the seeded schedule of [`plan::steps`]:
//!    SIGKILL and restart, link cuts through the admin port, SIGSTOP and
//!    SIGCONT, each logged as it happens (and to DIR/events.log).
//! 4. When the schedule is done and every broker runs again, the load
//!    stops and the quiet drain waits until every acknowledged message has
//!    arrived (or `--drain-timeout`), then `--settle` seconds more so late
//!    duplicates and reorders show.
//! 5. The ledger's books decide: the run passes only if nothing
//!    acknowledged is missing, nothing arrived twice (after the client's
//!    own dedup) or behind a later message of its sender, and no broker
//!    exited by itself. The first anomalies are printed with the faults
//!    around the time the message was sent.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::chat::{self, Schedule};
use super::positive;
use crate::cli::{ChaosArgs, Common};
use crate::ledger::{Anomaly, Counts, Ledger};
use crate::progress::Progress;
use crate::report::{BrokerAfterDrain, ChaosEvent, ChaosResult, Report};
use crate::run::{partner, Run};
use crate::LoadError;

mod cluster;
mod plan;

use cluster::{Cluster, ClusterSpec};
use plan::{Step, Timed};

/// Most anomalies printed in detail (the JSON has up to the ledger's limit).
const PRINTED_ANOMALIES: usize = 20;
/// Faults from this many ms before a message was sent are printed beside it.
const CONTEXT_MS: u64 = 5_000;

/// Faults injected so far, for the progress line.
#[derive(Debug, Default)]
struct Tally {
    kills: AtomicU64,
    pauses: AtomicU64,
    severs: AtomicU64,
    failed: AtomicU64,
    exits: AtomicU64,
}

impl Tally {
    fn line(&self) -> String {
        format!(
            "{} kills, {} severs, {} pauses",
            self.kills.load(Relaxed),
            self.severs.load(Relaxed),
            self.pauses.load(Relaxed)
        )
    }
}

fn counts_line(c: Counts) -> String {
    format!(
        "sent {}, acked {}, delivered {}, failed {}, acked not yet delivered {}",
        c.sent,
        c.acked,
        c.delivered,
        c.failed,
        c.acked.saturating_sub(c.acked_delivered)
    )
}

pub(crate) async fn run(a: ChaosArgs) -> Result<Report, LoadError> {
    let rate = positive("rate", a.rate)?;
    let duration = positive("duration", a.duration)?;
    let settle = if a.settle.is_finite() && a.settle >= 0.0 {
        Duration::from_secs_f64(a.settle)
    } else {
        return Err(LoadError::Args(format!("--settle must be zero or more seconds, not {}", a.settle)));
    };
    if a.faults.is_empty() {
        return Err(LoadError::Args("--faults needs at least one of kill, sever, pause".into()));
    }
    let seed = a.seed.unwrap_or_else(rand::random);
    let brokers = a.brokers as usize;
    let steps = plan::steps(seed, duration, brokers, &a.faults);
    let token = a.admin_token.clone().unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
    if !a.quiet {
        eprintln!(
            "chaos: seed {seed} (repeat with --seed {seed}), {brokers} brokers in {}, {} faults planned over {duration} s",
            a.dir.display(),
            steps.iter().filter(|t| !matches!(t.step, Step::Restart { .. } | Step::Resume { .. })).count()
        );
    }
    let spec = ClusterSpec { bin: &a.broker_bin, dir: &a.dir, brokers, token: &token, log_filter: &a.broker_log };
    let mut cluster = tokio::select! {
        c = Cluster::create(spec) => c?,
        signal = interrupted() => return Err(LoadError::Interrupted(signal)),
    };
    // On SIGINT or SIGTERM the run stops, and the brokers with it.
    let outcome = tokio::select! {
        outcome = load(&a, &mut cluster, seed, rate, duration, settle, steps) => outcome,
        signal = interrupted() => Err(LoadError::Interrupted(signal)),
    };
    cluster.shutdown().await;
    outcome
}

/// Resolves on SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Steps 2 to 5 of the module doc, on a formed cluster.
async fn load(
    a: &ChaosArgs,
    cluster: &mut Cluster,
    seed: u64,
    rate: f64,
    duration: f64,
    settle: Duration,
    steps: Vec<Timed>,
) -> Result<Report, LoadError> {
    let common = Common {
        target: cluster.targets(),
        ca: vec![cluster.ca_file()],
        users: a.users,
        body_bytes: a.body_bytes,
        json: None,
        broker_pid: Vec::new(),
        quiet: a.quiet,
        ack_timeout: a.ack_timeout,
        drain_timeout: a.drain_timeout,
        connect_concurrency: 16,
        endpoints: 2,
        threads: a.threads,
        failover: true,
        move_on_reconnect: a.moves,
        // Receipts asked for, as a chat client does.
        no_receipts: false,
        idle_timeout: a.idle_timeout,
        connect_timeout: a.connect_timeout,
    };
    let mut run = Run::open(&common, a.users).await?;
    run.forget_brokers();
    run.keep_timeline();
    let all: Vec<u32> = (0..a.users).collect();
    let conns = run.connect_all(&all, "connecting").await?;
    let senders: Vec<_> = conns.iter().map(|c| run.spawn_sender(c.clone())).collect();
    let in_flight = Arc::new(Semaphore::new(100_000));
    let ledger = run.ledger.clone();

    run.start_measuring();
    let start_ns = ledger.now_ns() + 1_000_000;
    let total = (duration * rate).round() as u64;
    let bar = Progress::bar(run.quiet, total, "chaos");
    let tally = Arc::new(Tally::default());
    let events = Arc::new(Mutex::new(Vec::new()));
    let ticker = tokio::spawn(tick(bar.clone(), run.quiet, ledger.clone(), tally.clone(), start_ns, duration));
    let status = {
        let tally = tally.clone();
        move |c: Counts| format!("{} | {}", tally.line(), counts_line(c))
    };
    let driver =
        Driver { ledger: ledger.clone(), start_ns, tally: tally.clone(), events: events.clone(), bar: bar.clone() };
    let ((), ()) = tokio::join!(
        chat::offer(&run, &senders, &in_flight, Schedule { start_ns, rate, total }, &bar, &status),
        driver.play(cluster, steps, run.quiet),
    );
    ticker.abort();
    let chaos_end_ns = ledger.now_ns();
    drop(senders);
    bar.log(
        run.quiet,
        &format!("chaos over after {:.1} s; draining: {}", ns_s(chaos_end_ns - start_ns), counts_line(ledger.counts())),
    );
    run.drain(&bar).await;
    tokio::time::sleep(settle).await;
    bar.finish();
    let drained_ns = ledger.now_ns();

    let mut report = run.report("chaos", start_ns, drained_ns);
    report.offered_rate = Some(rate);
    let after = after_drain(cluster).await;
    run.finish(conns).await;
    let events = std::mem::take(&mut *events.lock().expect("events lock"));
    let start_ms = start_ns / 1_000_000;
    let mut anomalies: Vec<Anomaly> =
        ledger.lost(crate::ledger::MAX_ANOMALIES).into_iter().chain(ledger.anomalies()).collect();
    for x in &mut anomalies {
        x.receiver = x.receiver.or(Some(partner(x.sender, a.users)));
        let rel = |ms: u32| ms.saturating_sub(start_ms as u32);
        x.sent_ms = x.sent_ms.map(rel);
        x.acked_ms = x.acked_ms.map(rel);
        x.at_ms = rel(x.at_ms);
    }
    let acc = &report.accounting;
    let exits = tally.exits.load(Relaxed);
    let result = ChaosResult {
        seed,
        brokers: cluster.len(),
        faults: a.faults.clone(),
        moves: a.moves,
        chaos_s: ns_s(chaos_end_ns - start_ns),
        drain_s: ns_s(drained_ns - chaos_end_ns),
        kills: tally.kills.load(Relaxed),
        pauses: tally.pauses.load(Relaxed),
        severs: tally.severs.load(Relaxed),
        failed_faults: tally.failed.load(Relaxed),
        unexpected_exits: exits,
        client_restarts: ledger.client_restarts(),
        missing_at_end: acc.lost,
        passed: acc.lost == 0 && acc.duplicated == 0 && acc.reordered == 0 && exits == 0 && acc.acked > 0,
        dir: a.dir.display().to_string(),
        events,
        anomalies,
        brokers_after_drain: after,
    };
    if !a.quiet && !result.anomalies.is_empty() {
        eprint!("{}", explain(&result, a.users, cluster.len()));
    }
    report.chaos = Some(result);
    Ok(report)
}

/// The wall-clock time of day in UTC, `HH:MM:SS.mmmZ`, as the brokers'
/// logs print it, to find an event in them.
fn utc_now() -> String {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let day_ms = since.as_millis() % 86_400_000;
    let (h, m, s, ms) = (day_ms / 3_600_000, day_ms / 60_000 % 60, day_ms / 1000 % 60, day_ms % 1000);
    format!("{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

fn ns_s(ns: u64) -> f64 {
    (ns as f64 / 1e8).round() / 10.0
}

/// Plays the fault schedule and records what happened.
struct Driver {
    ledger: Arc<Ledger>,
    start_ns: u64,
    tally: Arc<Tally>,
    events: Arc<Mutex<Vec<ChaosEvent>>>,
    bar: Progress,
}

impl Driver {
    async fn play(self, cluster: &mut Cluster, steps: Vec<Timed>, quiet: bool) {
        let mut paused_at: Vec<Option<Instant>> = vec![None; cluster.len()];
        for t in steps {
            let due = self.ledger.instant(self.start_ns + t.at_ms * 1_000_000);
            tokio::time::sleep_until(due.into()).await;
            self.restart_exited(cluster, quiet);
            let (kind, node, detail, result) = match t.step {
                Step::Kill { node } => {
                    cluster.kill(node).await;
                    self.tally.kills.fetch_add(1, Relaxed);
                    ("kill", node, "SIGKILL".to_owned(), Ok(()))
                }
                Step::Restart { node } => {
                    let why = format!("restart after a kill, at {:.1} s", self.now_s());
                    let r = cluster.start(node, &why).map_err(|e| e.to_string());
                    ("restart", node, format!("start {}", cluster.starts(node)), r)
                }
                Step::Sever { from, to, secs } => {
                    let r = cluster.sever(from, to, secs).await.map(drop);
                    if r.is_ok() {
                        self.tally.severs.fetch_add(1, Relaxed);
                    }
                    ("sever", from, format!("link to {} cut for {secs} s", cluster.name(to)), r)
                }
                Step::Pause { node } => {
                    let r = cluster.signal(node, true).map_err(|e| e.to_string());
                    if r.is_ok() {
                        self.tally.pauses.fetch_add(1, Relaxed);
                        paused_at[node] = Some(Instant::now());
                    }
                    ("pause", node, "SIGSTOP".to_owned(), r)
                }
                Step::Resume { node } => {
                    let r = cluster.signal(node, false).map_err(|e| e.to_string());
                    let held = paused_at[node].take().map_or(0.0, |p| p.elapsed().as_secs_f64());
                    ("resume", node, format!("SIGCONT after {held:.1} s"), r)
                }
            };
            if result.is_err() {
                self.tally.failed.fetch_add(1, Relaxed);
            }
            self.record(cluster, kind, cluster.name(node).to_owned(), detail, result.err(), quiet);
        }
        // Every broker runs at the end, even if one failed to restart.
        self.restart_exited(cluster, quiet);
    }

    fn now_s(&self) -> f64 {
        ns_s(self.ledger.now_ns().saturating_sub(self.start_ns))
    }

    /// A broker that exited by itself (it should only ever be killed) is
    /// recorded as a crash and started again.
    fn restart_exited(&self, cluster: &mut Cluster, quiet: bool) {
        for i in 0..cluster.len() {
            if let Some(status) = cluster.exited(i) {
                self.tally.exits.fetch_add(1, Relaxed);
                let why = format!("restart after it exited by itself ({status})");
                let r = cluster.start(i, &why).map_err(|e| e.to_string());
                let detail = format!("{status}; started again (start {})", cluster.starts(i));
                self.record(cluster, "exited", cluster.name(i).to_owned(), detail, r.err(), quiet);
            }
        }
    }

    fn record(
        &self,
        cluster: &Cluster,
        kind: &'static str,
        node: String,
        detail: String,
        error: Option<String>,
        quiet: bool,
    ) {
        let at_s = self.now_s();
        let utc = utc_now();
        let failed = error.as_ref().map_or(String::new(), |e| format!(" FAILED: {e}"));
        let line = format!("[{at_s:7.1} s] {kind:<7} {node} {detail}{failed}");
        cluster.log_event(&format!("{utc} {line}"));
        self.bar.log(quiet, &line);
        self.events.lock().expect("events lock").push(ChaosEvent { at_s, utc, kind, node, detail, error });
    }
}

/// While the chaos runs: a status line every 15 s when no bar is drawn
/// (CI logs, output to a file), so a long run shows it is alive.
async fn tick(bar: Progress, quiet: bool, ledger: Arc<Ledger>, tally: Arc<Tally>, start_ns: u64, duration: f64) {
    if !bar.is_hidden() || quiet {
        return;
    }
    loop {
        tokio::time::sleep(Duration::from_secs(15)).await;
        let at = ns_s(ledger.now_ns().saturating_sub(start_ns));
        eprintln!("chaos {at:.0}/{duration:.0} s: {} | {}", tally.line(), counts_line(ledger.counts()));
    }
}

/// What each broker still holds after the drain, and its mesh counters.
async fn after_drain(cluster: &Cluster) -> Vec<BrokerAfterDrain> {
    let mut out = Vec::new();
    for i in 0..cluster.len() {
        let Ok(s) = cluster.mesh_status(i).await else { continue };
        let members = s["members"].as_array().cloned().unwrap_or_default();
        let sum = |key: &str| members.iter().filter_map(|m| m[key].as_u64()).sum();
        out.push(BrokerAfterDrain {
            node: cluster.name(i).to_owned(),
            starts: cluster.starts(i),
            counters: cluster.mesh_counters(i).await.unwrap_or_default(),
            held_queues: s["held_queues"].as_u64().unwrap_or(0),
            outbox_queues: sum("outbox_queues"),
            outbox_in_flight: sum("outbox_in_flight"),
        });
    }
    out
}

/// Anomalies of one kind, sender and receiver at consecutive seqs, told as one.
struct AnomalyRun {
    first: Anomaly,
    last: Anomaly,
}

/// The first anomalies (runs of consecutive seqs told as one), each with
/// the faults from a little before its first message was sent until the
/// last one was seen, for a bug report.
fn explain(r: &ChaosResult, users: u32, brokers: usize) -> String {
    let mut runs: Vec<AnomalyRun> = Vec::new();
    for x in &r.anomalies {
        match runs.last_mut() {
            Some(run)
                if run.last.kind == x.kind
                    && run.last.sender == x.sender
                    && run.last.receiver == x.receiver
                    && run.last.seq + 1 == x.seq =>
            {
                run.last = *x;
            }
            _ => runs.push(AnomalyRun { first: *x, last: *x }),
        }
    }
    let mut out = format!(
        "{} anomalies recorded in detail; times in s since the load started; user i starts on node-(i mod {brokers} + 1):\n",
        r.anomalies.len()
    );
    let s = |ms: Option<u32>| ms.map_or("?".to_owned(), |ms| format!("{:.3}", f64::from(ms) / 1000.0));
    for run in runs.iter().take(PRINTED_ANOMALIES) {
        let (x, y) = (&run.first, &run.last);
        let to = x.receiver.unwrap_or_else(|| partner(x.sender, users));
        let seqs = if x.seq == y.seq { format!("#{}", x.seq) } else { format!("#{}..#{}", x.seq, y.seq) };
        let after = x.after_seq.map_or(String::new(), |a| format!(" after #{a}"));
        let acked = if x.acked { s(x.acked_ms) } else { "never".to_owned() };
        out += &format!(
            "  {} {seqs} of user {} (node-{}) to user {to} (node-{}){after}: sent {}..{}, first acked {acked}, seen {}..{}\n",
            x.kind,
            x.sender,
            x.sender as usize % brokers + 1,
            to as usize % brokers + 1,
            s(x.sent_ms),
            s(y.sent_ms),
            s(Some(x.at_ms)),
            s(Some(y.at_ms)),
        );
        let from = u64::from(x.sent_ms.unwrap_or(x.at_ms)).saturating_sub(CONTEXT_MS);
        let until = u64::from(y.at_ms.max(y.sent_ms.unwrap_or(0)));
        let near: Vec<String> = r
            .events
            .iter()
            .filter(|e| (from..=until).contains(&((e.at_s * 1000.0) as u64)))
            .map(|e| format!("{:.1} {} {}", e.at_s, e.kind, e.node))
            .collect();
        if !near.is_empty() {
            out += &format!("      faults from {} s before: {}\n", CONTEXT_MS / 1000, near.join(", "));
        }
    }
    if runs.len() > PRINTED_ANOMALIES {
        out += &format!("  ... {} more (see the JSON report)\n", runs.len() - PRINTED_ANOMALIES);
    }
    out
}
