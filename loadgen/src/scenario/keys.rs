//! `keys`: the key service under claims (tern:// only).
//!
//! Set-up: USERS key owners log in and open end-to-end state
//! ([`Secure::open`], in memory), which publishes real signed keys made by
//! `E2e::keys_to_publish` (identity keys signed by the login key, one-time
//! and fallback keys by the Olm account; the broker checks every
//! signature) and keeps publishing more whenever the broker says a stock
//! fell below its low-water mark. Then `--claimers` connections of their
//! own, each with `--in-flight` claims outstanding, claim the keys of
//! owners picked at random until `--duration` is over.
//!
//! Every one-time key handed out is remembered by (owner, device, key id):
//! one seen twice is a defect and fails the run. Fallback keys (handed
//! out when an owner's stock is empty until it publishes more) are
//! counted. With several targets, owners and claimers are spread over the
//! brokers alike, so a claim usually goes to a broker other than the one
//! that owns the claimed account and crosses the mesh.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use rand::Rng;
use tern_client::secure::{Persistence, Secure};
use tern_client::{Client, SendError};

use super::positive;
use crate::adapter::TernAdapter;
use crate::cli::KeysArgs;
use crate::progress::Progress;
use crate::report::{KeysResult, LatencySummary, Report};
use crate::run::Run;
use crate::LoadError;

/// What the claimers have seen, shared by all of them.
struct Tally {
    latency: Histogram<u64>,
    claims: u64,
    one_time_keys: u64,
    twice: u64,
    fallback: u64,
    without_keys: u64,
    errors: BTreeMap<String, u64>,
    /// (owner, device, key id) of every one-time key handed out.
    seen: HashSet<(u32, u32, u64)>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 300_000_000, 3).expect("static bounds are valid"),
            claims: 0,
            one_time_keys: 0,
            twice: 0,
            fallback: 0,
            without_keys: 0,
            errors: BTreeMap::new(),
            seen: HashSet::new(),
        }
    }

    fn answered(&mut self, owner: u32, took: Duration, answer: &tern_protocol::pb::KeysClaimed) {
        self.claims += 1;
        self.latency.saturating_record((took.as_micros() as u64).max(1));
        self.without_keys += answer.without_keys.len() as u64;
        for d in &answer.devices {
            match (&d.one_time_key, d.fallback) {
                (Some(_), true) => self.fallback += 1,
                (Some(k), false) => {
                    self.one_time_keys += 1;
                    if !self.seen.insert((owner, d.device_id, k.key_id)) {
                        self.twice += 1;
                        tracing::error!(
                            owner,
                            device = d.device_id,
                            key_id = k.key_id,
                            "one-time key handed out twice"
                        );
                    }
                }
                (None, _) => self.without_keys += 1,
            }
        }
    }

    fn failed(&mut self, e: &SendError) {
        let kind = match e {
            SendError::Refused { code, .. } => format!("{code:?}"),
            SendError::Timeout(_) => "Timeout".into(),
            SendError::Closed(_) => "Closed".into(),
            _ => "Invalid".into(),
        };
        *self.errors.entry(kind).or_default() += 1;
    }
}

pub(crate) async fn run(a: KeysArgs) -> Result<Report, LoadError> {
    let duration = Duration::from_secs_f64(positive("duration", a.duration)?);
    let owners = a.common.users;
    let mut run = Run::open(&a.common, owners + a.claimers).await?;
    let adapter = run.adapter.clone();
    let tern = adapter.tern().ok_or_else(|| LoadError::Args("keys is for tern:// targets only".into()))?;

    let owner_ids: Vec<u32> = (0..owners).collect();
    let published = open_owners(&run, tern, &owner_ids).await?;
    let published_before: u64 =
        published.iter().map(|s| u64::from(s.client().key_stock().borrow().one_time_keys)).sum();
    let claimer_ids: Vec<u32> = (owners..owners + a.claimers).collect();
    let claimers = login_all(&run, tern, &claimer_ids).await?;

    let tally = Arc::new(Mutex::new(Tally::new()));
    let handles: Arc<Vec<String>> = Arc::new(owner_ids.iter().map(|&u| tern.handle(u)).collect());
    run.start_measuring();
    let start_ns = run.ledger.now_ns();
    let deadline = Instant::now() + duration;
    let bar = Progress::bar(run.quiet, duration.as_secs(), "claiming");
    let mut tasks = Vec::new();
    for client in &claimers {
        for _ in 0..a.in_flight {
            let (client, tally, handles) = (client.clone(), tally.clone(), handles.clone());
            tasks.push(tokio::spawn(claim_until(client, handles, tally, deadline)));
        }
    }
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250).min(deadline - Instant::now())).await;
        bar.set_position(duration.as_secs().saturating_sub((deadline - Instant::now()).as_secs()));
        let t = tally.lock().expect("tally lock");
        bar.set_message(format!("{} claims, {} fallback, {} twice", t.claims, t.fallback, t.twice));
    }
    for task in tasks {
        let _ = task.await;
    }
    bar.finish();
    let end_ns = run.ledger.now_ns();
    let mut report = run.report("keys", start_ns, end_ns);
    let secs = report.duration_s;
    let cpu_s = report.broker.as_ref().map_or(0.0, |b| b.cpu_s);
    let keys = {
        let t = tally.lock().expect("tally lock");
        KeysResult {
            key_owners: owners,
            claimers: a.claimers,
            in_flight_per_claimer: a.in_flight,
            published_before,
            claims: t.claims,
            claims_per_s: t.claims as f64 / secs,
            claim_latency_us: LatencySummary::of(&t.latency),
            one_time_keys: t.one_time_keys,
            one_time_keys_twice: t.twice,
            fallback_keys: t.fallback,
            without_keys: t.without_keys,
            errors: t.errors.clone(),
            broker_cpu_us_per_claim: if t.claims > 0 { cpu_s * 1e6 / t.claims as f64 } else { 0.0 },
        }
    };
    report.keys = Some(keys);
    let closing = published.iter().map(Secure::close).collect::<Vec<_>>();
    futures::future::join_all(closing).await;
    futures::future::join_all(claimers.iter().map(Client::close)).await;
    adapter.cleanup().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(report)
}

/// One claim after another, of owners picked at random, until `deadline`.
async fn claim_until(client: Client, handles: Arc<Vec<String>>, tally: Arc<Mutex<Tally>>, deadline: Instant) {
    while Instant::now() < deadline {
        let owner = rand::thread_rng().gen_range(0..handles.len());
        let started = Instant::now();
        let result = client.claim_keys(&handles[owner], &[]).await;
        let took = started.elapsed();
        let refused = {
            let mut t = tally.lock().expect("tally lock");
            match result {
                Ok(answer) => {
                    t.answered(owner as u32, took, &answer);
                    false
                }
                Err(e) => {
                    t.failed(&e);
                    true
                }
            }
        };
        if refused {
            // A refusal (RATE_LIMITED off loopback) must not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Logs the owners in and publishes their keys, with a progress bar.
async fn open_owners(run: &Run, tern: &TernAdapter, users: &[u32]) -> Result<Vec<Secure>, LoadError> {
    let bar = Progress::bar(run.quiet, users.len() as u64, "publishing keys");
    let mut pending = stream::iter(users.iter().map(|&u| async move {
        let client = tern.login(u).await?;
        Secure::open(client, &tern.e2e_dir(u, 0), Persistence::Memory).await.map_err(|e| LoadError::Setup {
            target: tern.target_of(u),
            what: format!("keys of user {u}"),
            reason: e.to_string(),
        })
    }))
    .buffer_unordered(run.connect_concurrency);
    let mut out = Vec::with_capacity(users.len());
    while let Some(secure) = pending.next().await {
        out.push(secure?);
        bar.inc(1);
    }
    bar.finish();
    Ok(out)
}

/// Logs the claimers in (registering them), with a progress bar.
async fn login_all(run: &Run, tern: &TernAdapter, users: &[u32]) -> Result<Vec<Client>, LoadError> {
    let bar = Progress::bar(run.quiet, users.len() as u64, "connecting claimers");
    let mut pending = stream::iter(users.iter().map(|&u| tern.login(u))).buffer_unordered(run.connect_concurrency);
    let mut out = Vec::with_capacity(users.len());
    while let Some(client) = pending.next().await {
        out.push(client?);
        bar.inc(1);
    }
    bar.finish();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::pb;

    fn claimed(device: u32, key_id: Option<u64>, fallback: bool) -> pb::ClaimedKeys {
        pb::ClaimedKeys {
            device_id: device,
            one_time_key: key_id.map(|key_id| pb::OneTimeKey { key_id, ..Default::default() }),
            fallback,
            ..Default::default()
        }
    }

    #[test]
    fn a_one_time_key_seen_twice_is_counted_and_fallbacks_are_not_one_time_keys() {
        let mut t = Tally::new();
        let answer = |devices| pb::KeysClaimed { handle: "h".into(), devices, without_keys: vec![] };
        t.answered(0, Duration::from_micros(50), &answer(vec![claimed(1, Some(5), false)]));
        t.answered(1, Duration::from_micros(50), &answer(vec![claimed(1, Some(5), false)]));
        assert_eq!((t.one_time_keys, t.twice), (2, 0), "same id, other owner: not a repeat");
        t.answered(0, Duration::from_micros(70), &answer(vec![claimed(1, Some(5), false), claimed(2, None, false)]));
        t.answered(0, Duration::from_micros(70), &answer(vec![claimed(1, Some(9), true)]));
        t.answered(0, Duration::from_micros(70), &answer(vec![claimed(1, Some(9), true)]));
        assert_eq!((t.claims, t.one_time_keys, t.twice, t.fallback, t.without_keys), (5, 3, 1, 2, 1));
        t.failed(&SendError::Timeout(Duration::from_secs(1)));
        assert_eq!(t.errors.get("Timeout"), Some(&1));
    }
}
