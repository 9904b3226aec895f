//! `offline`: the even users send `--messages` each to their partner (the
//! odd users), who are registered but offline; once every send is
//! acknowledged, all odd users connect at once and the broker drains their
//! queues. Reports the fill rate and the drain rate. The send->deliver
//! latency here is mostly time spent offline.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::cli::OfflineArgs;
use crate::progress::Progress;
use crate::report::{OfflineResult, Report};
use crate::run::{partner, Job, Run};
use crate::LoadError;

pub(crate) async fn run(a: OfflineArgs) -> Result<Report, LoadError> {
    let users = a.common.users;
    if a.messages == 0 || a.in_flight == 0 {
        return Err(LoadError::Args("--messages and --in-flight must be at least 1".into()));
    }
    let mut run = Run::open(&a.common, users).await?;
    let senders_idx: Vec<u32> = (0..users).filter(|u| u % 2 == 0 && partner(*u, users) != *u).collect();
    let receivers: Vec<u32> = senders_idx.iter().map(|u| partner(*u, users)).collect();
    run.prepare_all(&receivers).await?;
    let conns = run.connect_all(&senders_idx, "connecting").await?;
    let senders: Vec<_> = conns.iter().map(|c| run.spawn_sender(c.clone())).collect();
    let ledger = run.ledger.clone();
    let window = Arc::new(Semaphore::new(a.in_flight));

    run.start_measuring();
    let total = a.messages * senders.len() as u64;
    let bar = Progress::bar(run.quiet, total, "filling");
    let fill_start = ledger.now_ns();
    for k in 0..total {
        let permit = window.clone().acquire_owned().await.expect("never closed");
        let i = (k % senders.len() as u64) as usize;
        let from = senders_idx[i];
        let stamp = ledger.stamp(from, ledger.now_ns());
        if senders[i].send(Job { to: partner(from, users), stamp, permit }).await.is_err() {
            ledger.failed("Closed");
        }
        if k % 1024 == 0 {
            bar.set_position(ledger.counts().acked);
        }
    }
    drop(senders);
    run.settle_sends().await;
    let fill_s = (ledger.now_ns() - fill_start) as f64 / 1e9;
    bar.finish();
    let queued = ledger.counts().acked;

    let drain_start = ledger.now_ns();
    let receiving = run.connect_all(&receivers, "reconnecting").await?;
    let bar = Progress::bar(run.quiet, queued, "draining");
    let watch = {
        let (ledger, bar) = (ledger.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(ledger.counts().delivered);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    run.drain(&bar).await;
    watch.abort();
    bar.finish();
    let drain_s = (ledger.last_delivery_ns().saturating_sub(drain_start)) as f64 / 1e9;
    let mut report = run.report("offline", fill_start, ledger.last_delivery_ns().max(drain_start));
    report.offline = Some(OfflineResult {
        messages: queued,
        fill_s,
        fill_per_s: queued as f64 / fill_s.max(1e-9),
        drain_s,
        drain_per_s: report.accounting.delivered as f64 / drain_s.max(1e-9),
    });
    run.finish(conns.into_iter().chain(receiving).collect()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(report)
}
