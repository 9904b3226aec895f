//! Machinery the scenarios share: opening the adapter, connecting users with
//! bounded concurrency, per-user sender tasks that keep sends in order and
//! in flight, waiting for the drain, and the CPU bookkeeping (summed over the
//! broker processes when a run has several targets).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rand::RngCore;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::adapter::{self, Adapter, Connection, Options};
use crate::cli::Common;
use crate::ledger::Ledger;
use crate::payload::Stamp;
use crate::procfs;
use crate::progress::Progress;
use crate::report::{BrokerUsage, Report};
use crate::target::{Scheme, Targets};
use crate::LoadError;

/// One send for a sender task.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) to: u32,
    pub(crate) stamp: Stamp,
    /// Held until the ack (or failure): bounds the sends in flight.
    pub(crate) permit: OwnedSemaphorePermit,
}

/// A run's shared state.
pub(crate) struct Run {
    pub(crate) adapter: Arc<dyn Adapter>,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) users: u32,
    pub(crate) body_bytes: usize,
    pub(crate) quiet: bool,
    pub(crate) connect_concurrency: usize,
    pub(crate) drain_timeout: Duration,
    /// The broker processes (one per target, or `--broker-pid`); empty when
    /// they were not all found.
    broker_pids: Vec<u32>,
    cpu_start: Option<(f64, f64)>,
    target: String,
    /// Devices per user and end to end (`chat --devices`, `--e2e`).
    devices: u32,
    e2e: bool,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").field("target", &self.target).field("users", &self.users).finish_non_exhaustive()
    }
}

fn secs(name: &str, v: f64) -> Result<Duration, LoadError> {
    if v.is_finite() && v > 0.0 && v < 1e7 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(LoadError::Args(format!("--{name} must be a positive number of seconds, not {v}")))
    }
}

impl Run {
    /// Opens the adapter (checking the brokers answer) and finds the broker processes.
    pub(crate) async fn open(c: &Common, users: u32) -> Result<Self, LoadError> {
        Self::open_with(c, users, 1, false).await
    }

    /// [`Run::open`] with `devices` devices per user and, with `e2e`,
    /// every message encrypted end to end (tern:// only).
    pub(crate) async fn open_with(c: &Common, users: u32, devices: u32, e2e: bool) -> Result<Self, LoadError> {
        let targets = c.targets()?;
        if (devices > 1 || e2e) && targets.scheme() != Scheme::Tern {
            return Err(LoadError::Args(format!("--devices and --e2e are for tern:// targets only, not {targets}")));
        }
        let mut run_id = [0u8; 3];
        rand::thread_rng().fill_bytes(&mut run_id);
        let opts = Options {
            ca: c.ca.clone(),
            run_id: hex::encode(run_id),
            request_timeout: secs("ack-timeout", c.ack_timeout)?,
            connect_timeout: secs("connect-timeout", c.connect_timeout)?,
            endpoints: c.endpoints as usize,
            idle_timeout: secs("idle-timeout", c.idle_timeout)?,
            failover: c.failover,
            move_on_reconnect: c.move_on_reconnect,
            receipts: !c.no_receipts,
            devices,
            e2e,
        };
        let adapter = adapter::open(&targets, &opts, users).await?;
        let broker_pids = if c.broker_pid.is_empty() { find_brokers(&targets, c.quiet) } else { dedup(&c.broker_pid) };
        Ok(Self {
            adapter,
            ledger: Arc::new(Ledger::with_devices(users as usize, devices)),
            users,
            body_bytes: c.body_bytes as usize,
            quiet: c.quiet,
            connect_concurrency: c.connect_concurrency as usize,
            drain_timeout: secs("drain-timeout", c.drain_timeout)?,
            broker_pids,
            cpu_start: None,
            target: targets.to_string(),
            devices,
            e2e,
        })
    }

    /// Stops reading broker CPU and memory (their processes are replaced
    /// during the run, so the figures would mean nothing).
    pub(crate) fn forget_brokers(&mut self) {
        self.broker_pids.clear();
    }

    /// Keeps when each message was sent and acknowledged, so losses can be
    /// told in detail ([`Ledger::with_timeline`]). Call before any send.
    pub(crate) fn keep_timeline(&mut self) {
        self.ledger = Arc::new(Ledger::with_timeline(self.users as usize));
    }

    /// Whether the broker processes are known (so CPU and memory can be read).
    pub(crate) fn has_brokers(&self) -> bool {
        !self.broker_pids.is_empty()
    }

    /// Resident memory of all the broker processes together.
    pub(crate) fn broker_rss(&self) -> u64 {
        self.broker_pids.iter().filter_map(|&pid| procfs::rss_bytes(pid)).sum()
    }

    /// CPU seconds of all the broker processes together.
    fn broker_cpu_seconds(&self) -> f64 {
        self.broker_pids.iter().filter_map(|&pid| procfs::cpu_seconds(pid)).sum()
    }

    /// Connects `users` (in parallel, bounded), with a progress bar. The
    /// first failure stops the run.
    pub(crate) async fn connect_all(&self, users: &[u32], label: &str) -> Result<Vec<Arc<dyn Connection>>, LoadError> {
        let bar = Progress::bar(self.quiet, users.len() as u64, label);
        let mut out: Vec<(u32, Arc<dyn Connection>)> = Vec::with_capacity(users.len());
        let mut pending = futures::stream::iter(users.iter().map(|&u| {
            let adapter = self.adapter.clone();
            let ledger = self.ledger.clone();
            async move { adapter.connect(u, ledger).await.map(|c| (u, Arc::from(c))) }
        }))
        .buffer_unordered(self.connect_concurrency);
        while let Some(res) = pending.next().await {
            out.push(res?);
            bar.inc(1);
        }
        bar.finish();
        out.sort_by_key(|(u, _)| *u);
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }

    /// Prepares `users` (so they can receive while offline), with a progress bar.
    pub(crate) async fn prepare_all(&self, users: &[u32]) -> Result<(), LoadError> {
        let bar = Progress::bar(self.quiet, users.len() as u64, "preparing");
        let mut pending = futures::stream::iter(users.iter().map(|&u| {
            let adapter = self.adapter.clone();
            async move { adapter.prepare(u).await }
        }))
        .buffer_unordered(self.connect_concurrency);
        while let Some(res) = pending.next().await {
            res?;
            bar.inc(1);
        }
        bar.finish();
        Ok(())
    }

    /// Starts the CPU clock of the measured part.
    pub(crate) fn start_measuring(&mut self) {
        self.cpu_start = Some((self.broker_cpu_seconds(), procfs::own_cpu_seconds().unwrap_or(0.0)));
    }

    /// Spawns a sender task for `conn`; jobs are submitted in the order
    /// they arrive and acks awaited concurrently.
    pub(crate) fn spawn_sender(&self, conn: Arc<dyn Connection>) -> mpsc::Sender<Job> {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(sender_task(conn, self.ledger.clone(), self.body_bytes, rx));
        tx
    }

    /// After sending stopped: waits until every send has its outcome (ack
    /// or failure) and every acknowledged message is delivered, or
    /// `--drain-timeout` passes.
    pub(crate) async fn drain(&self, bar: &Progress) {
        let deadline = Instant::now() + self.drain_timeout;
        while Instant::now() < deadline {
            let c = self.ledger.counts();
            bar.set_message(format!("draining: {} acked, {} delivered", c.acked, c.delivered));
            if c.acked + c.failed >= c.sent && c.acked_delivered >= c.acked {
                // Give stragglers (duplicates, late copies) a moment to show.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every send has its outcome, or `--drain-timeout` passes.
    pub(crate) async fn settle_sends(&self) {
        let deadline = Instant::now() + self.drain_timeout;
        while Instant::now() < deadline {
            let c = self.ledger.counts();
            if c.acked + c.failed >= c.sent {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A report with the accounting, latencies, rates over `[from_ns, to_ns]`
    /// and the CPU since [`Run::start_measuring`].
    pub(crate) fn report(&self, scenario: &str, from_ns: u64, to_ns: u64) -> Report {
        let acc = self.ledger.accounting();
        let lat = self.ledger.latencies();
        let secs = (to_ns.saturating_sub(from_ns) as f64 / 1e9).max(1e-9);
        let (b0, own0) = self.cpu_start.unwrap_or_default();
        let broker = self.has_brokers().then(|| {
            let cpu_s = self.broker_cpu_seconds() - b0;
            BrokerUsage {
                pid: self.broker_pids.first().copied().unwrap_or_default(),
                pids: self.broker_pids.clone(),
                brokers: self.broker_pids.len(),
                cpu_s,
                cpu_us_per_msg: if acc.delivered > 0 { cpu_s * 1e6 / acc.delivered as f64 } else { 0.0 },
                cpu_us_per_send: if acc.acked > 0 { cpu_s * 1e6 / acc.acked as f64 } else { 0.0 },
                rss_bytes: self.broker_rss(),
            }
        });
        Report {
            scenario: scenario.to_owned(),
            target: self.target.clone(),
            users: self.users,
            devices: self.devices,
            e2e: self.e2e,
            body_bytes: self.body_bytes as u32,
            offered_rate: None,
            duration_s: secs,
            throughput_per_s: acc.delivered as f64 / secs,
            acked_per_s: acc.acked as f64 / secs,
            accounting: acc,
            ack_latency_us: crate::report::LatencySummary::of(&lat.ack),
            deliver_latency_us: crate::report::LatencySummary::of(&lat.deliver),
            broker,
            loadgen_cpu_s: procfs::own_cpu_seconds().map_or(0.0, |c| c - own0),
            ..Report::default()
        }
    }

    /// Closes `conns` and removes what the run created on the broker.
    pub(crate) async fn finish(&self, conns: Vec<Arc<dyn Connection>>) {
        let mut closing = futures::stream::iter(conns.iter().map(|c| c.close())).buffer_unordered(1024);
        while closing.next().await.is_some() {}
        self.adapter.cleanup().await;
    }
}

async fn sender_task(conn: Arc<dyn Connection>, ledger: Arc<Ledger>, body_len: usize, mut rx: mpsc::Receiver<Job>) {
    let mut acks = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            job = rx.recv(), if open => match job {
                Some(job) => match conn.submit(job.to, job.stamp.encode(body_len)).await {
                    Ok(ack) => acks.push(async move { (ack.await, job) }),
                    Err(e) => ledger.failed(&e.kind),
                },
                None => open = false,
            },
            Some((result, job)) = acks.next(), if !acks.is_empty() => {
                match result {
                    Ok(()) => ledger.acked(job.stamp),
                    Err(e) => ledger.failed(&e.kind),
                }
                drop(job.permit);
            }
            else => break,
        }
    }
}

/// The process listening on each target's port, when all targets are on
/// this machine and every one is found; otherwise none (a partial sum would
/// read as the whole), with a note why.
fn find_brokers(targets: &Targets, quiet: bool) -> Vec<u32> {
    let mut missing = Vec::new();
    let mut pids = Vec::new();
    for t in targets.all() {
        let local = matches!(t.host(), "localhost" | "::1") || t.host().starts_with("127.");
        match local.then(|| procfs::find_listener(t.port(), t.scheme == Scheme::Tern)).flatten() {
            Some(pid) => pids.push(pid),
            None => missing.push(t.to_string()),
        }
    }
    if missing.is_empty() {
        return dedup(&pids);
    }
    if !quiet {
        eprintln!(
            "note: broker process of {} not found on this machine; CPU and memory will not be reported (use --broker-pid)",
            missing.join(", ")
        );
    }
    Vec::new()
}

/// `pids` without repeats, in first-seen order (two targets may be one process).
fn dedup(pids: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::with_capacity(pids.len());
    for &p in pids {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// User `u`'s conversation partner: users talk in pairs (0-1, 2-3, ...); with
/// an odd count the last user talks to user 0.
pub(crate) fn partner(u: u32, users: u32) -> u32 {
    let p = u ^ 1;
    if p >= users {
        0
    } else {
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_pids_are_counted_once() {
        assert_eq!(dedup(&[3, 1, 3, 2, 1]), vec![3, 1, 2]);
        assert!(dedup(&[]).is_empty());
    }

    #[test]
    fn remote_targets_have_no_local_process() {
        let t = Targets::new(vec!["tern://192.0.2.1:4433".parse().unwrap()]).unwrap();
        assert!(find_brokers(&t, true).is_empty());
    }

    #[test]
    fn partners_pair_up() {
        assert_eq!((0..4).map(|u| partner(u, 4)).collect::<Vec<_>>(), vec![1, 0, 3, 2]);
        assert_eq!(partner(4, 5), 0);
    }
}
