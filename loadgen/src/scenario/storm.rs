//! `storm`: USERS clients connect; then all drop their connections at once
//! and reconnect at times spread uniformly over `--window` seconds. A client
//! is served again when its broker answers a ping on the new connection.
//! Reports the time from the drop until the last client is served, and each
//! client's wait from its scheduled reconnect.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use rand::Rng;

use super::positive;
use crate::adapter::Connection;
use crate::cli::StormArgs;
use crate::progress::Progress;
use crate::report::{LatencySummary, Report, StormResult};
use crate::run::Run;
use crate::LoadError;

pub(crate) async fn run(a: StormArgs) -> Result<Report, LoadError> {
    let window = positive("window", a.window)?;
    let users = a.common.users;
    let mut run = Run::open(&a.common, users).await?;
    let all: Vec<u32> = (0..users).collect();
    let conns = run.connect_all(&all, "connecting").await?;
    let ledger = run.ledger.clone();

    run.start_measuring();
    let storm_ns = ledger.now_ns();
    let mut closing = futures::stream::iter(conns.iter().map(|c| c.close())).buffer_unordered(1024);
    while closing.next().await.is_some() {}
    drop(closing);
    drop(conns);
    // The reconnects are scheduled from the end of the drop, not its
    // start: a client that closes gracefully (Tern's waits until the broker
    // has read its last acks) must not have its closing counted as waiting
    // to be served again.
    let window_ns = ledger.now_ns();

    let bar = Progress::bar(run.quiet, u64::from(users), "reconnecting");
    let mut tasks: FuturesUnordered<_> = all
        .iter()
        .map(|&u| {
            let (adapter, ledger) = (run.adapter.clone(), ledger.clone());
            let at_ns = window_ns + rand::thread_rng().gen_range(0..=(window * 1e9) as u64);
            async move {
                tokio::time::sleep_until(ledger.instant(at_ns).into()).await;
                let conn = adapter.connect(u, ledger.clone()).await.map_err(|e| e.to_string())?;
                conn.ping().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((Arc::<dyn Connection>::from(conn), ledger.now_ns() - at_ns, ledger.now_ns()))
            }
        })
        .collect();
    let mut waits = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("static bounds are valid");
    let (mut served, mut failed, mut last_ns) = (Vec::new(), 0u32, storm_ns);
    let mut first_error = None;
    while let Some(res) = tasks.next().await {
        match res {
            Ok((conn, wait_ns, done_ns)) => {
                waits.saturating_record((wait_ns / 1_000_000).max(1));
                last_ns = last_ns.max(done_ns);
                served.push(conn);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
        bar.inc(1);
    }
    bar.finish();
    if let Some(e) = first_error {
        eprintln!("warning: {failed} client(s) were not served again; first: {e}");
    }
    let mut report = run.report("storm", storm_ns, last_ns);
    report.storm = Some(StormResult {
        clients: users,
        window_s: window,
        drop_s: (window_ns - storm_ns) as f64 / 1e9,
        served: served.len() as u32,
        failed,
        all_served_s: (last_ns - storm_ns) as f64 / 1e9,
        reconnect_ms: LatencySummary::of(&waits),
    });
    run.finish(served).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(report)
}
