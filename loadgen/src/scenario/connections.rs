//! `connections`: prepares USERS users (so account records are in place
//! before measuring), reads the broker's resident memory, opens one idle
//! connection per user, holds them, checks they still answer, and reads
//! the memory again. The difference per connection is what one idle client
//! costs the broker.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::StreamExt;

use super::positive;
use crate::adapter::Connection;
use crate::cli::ConnectionsArgs;
use crate::progress::Progress;
use crate::report::{ConnectionsResult, Report};
use crate::run::Run;
use crate::LoadError;

pub(crate) async fn run(a: ConnectionsArgs) -> Result<Report, LoadError> {
    let hold = positive("hold", a.hold)?;
    let users = a.common.users;
    let mut run = Run::open(&a.common, users).await?;
    if !run.has_brokers() {
        return Err(LoadError::Args(
            "connections needs the broker's process to read its memory: run it on this machine, or pass --broker-pid"
                .into(),
        ));
    }
    let all: Vec<u32> = (0..users).collect();
    run.prepare_all(&all).await?;
    // Let the broker settle after the preparation's connections closed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = run.broker_rss();
    run.start_measuring();

    let ledger = run.ledger.clone();
    let start = ledger.now_ns();
    let bar = Progress::bar(run.quiet, u64::from(users), "connecting");
    let mut conns: Vec<Arc<dyn Connection>> = Vec::with_capacity(users as usize);
    let mut failed = 0u32;
    let mut first_error = None;
    let mut opening = futures::stream::iter(all.iter().map(|&u| {
        let (adapter, ledger) = (run.adapter.clone(), ledger.clone());
        async move { adapter.connect(u, ledger).await }
    }))
    .buffer_unordered(run.connect_concurrency);
    while let Some(res) = opening.next().await {
        match res {
            Ok(c) => conns.push(Arc::from(c)),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
        bar.inc(1);
        if conns.len().is_multiple_of(1000) {
            bar.set_message(format!("broker RSS {} MiB", run.broker_rss() >> 20));
        }
    }
    drop(opening);
    let ramp_s = (ledger.now_ns() - start) as f64 / 1e9;
    bar.finish();
    if let Some(e) = first_error {
        eprintln!("warning: {failed} connection(s) failed; first: {e}");
    }

    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let rss_after = run.broker_rss();
    let bar = Progress::bar(run.quiet, conns.len() as u64, "checking");
    let mut pinging = futures::stream::iter(conns.iter().map(|c| c.ping())).buffer_unordered(run.connect_concurrency);
    let mut alive = 0u32;
    while let Some(res) = pinging.next().await {
        alive += u32::from(res.is_ok());
        bar.inc(1);
    }
    drop(pinging);
    bar.finish();

    let established = conns.len() as u32;
    let mut report = run.report("connections", start, ledger.now_ns());
    report.connections = Some(ConnectionsResult {
        requested: users,
        established,
        failed,
        ramp_s,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        bytes_per_connection: rss_after.saturating_sub(rss_before) as f64 / f64::from(established.max(1)),
        alive_after_hold: alive,
    });
    run.finish(conns).await;
    Ok(report)
}
