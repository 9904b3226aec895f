//! `max`: closed loop. A dispatcher keeps `in_flight` sends outstanding
//! (spread round-robin over the users, each to its partner) and doubles it
//! every stage. A stage is within bounds when its p99 send->deliver latency
//! is under `--p99-bound-ms` and the delivery backlog did not grow; the ramp
//! stops at the first stage out of bounds or when two stages in a row add
//! less than 3% throughput. The result is the best stage within bounds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::positive;
use crate::cli::MaxArgs;
use crate::progress::Progress;
use crate::report::{LatencySummary, MaxResult, Report, Stage};
use crate::run::{partner, Job, Run};
use crate::LoadError;

pub(crate) async fn run(a: MaxArgs) -> Result<Report, LoadError> {
    let duration = positive("duration", a.duration)?;
    let bound_us = positive("p99-bound-ms", a.p99_bound_ms)? * 1000.0;
    if a.start_in_flight == 0 || a.max_in_flight < a.start_in_flight {
        return Err(LoadError::Args("need 1 <= --start-in-flight <= --max-in-flight".into()));
    }
    let plan: Vec<usize> =
        std::iter::successors(Some(a.start_in_flight), |n| Some(n * 2)).take_while(|n| *n <= a.max_in_flight).collect();
    let stage_secs = duration / plan.len() as f64;
    if stage_secs < 0.5 {
        return Err(LoadError::Args(format!(
            "--duration {duration} s leaves {stage_secs:.2} s for each of {} stages; give at least 0.5 s each",
            plan.len()
        )));
    }

    let users = a.common.users;
    let mut run = Run::open(&a.common, users).await?;
    let all: Vec<u32> = (0..users).collect();
    let conns = run.connect_all(&all, "connecting").await?;
    let senders: Vec<_> = conns.iter().map(|c| run.spawn_sender(c.clone())).collect();
    let ledger = run.ledger.clone();
    let window = Arc::new(Semaphore::new(0));

    run.start_measuring();
    let start_ns = ledger.now_ns();
    let dispatcher = {
        let (ledger, window) = (ledger.clone(), window.clone());
        tokio::spawn(async move {
            for k in 0u64.. {
                let Ok(permit) = window.clone().acquire_owned().await else { break };
                let from = (k % u64::from(users)) as u32;
                let stamp = ledger.stamp(from, ledger.now_ns());
                if senders[from as usize].send(Job { to: partner(from, users), stamp, permit }).await.is_err() {
                    ledger.failed("Closed");
                }
            }
        })
    };

    let bar = Progress::bar(run.quiet, plan.len() as u64, "ramping");
    let mut result = MaxResult::default();
    let mut granted = 0;
    let mut flat_stages = 0;
    let mut best = 0.0f64;
    for &in_flight in &plan {
        window.add_permits(in_flight - granted);
        granted = in_flight;
        let before = ledger.counts();
        let backlog_before = before.acked.saturating_sub(before.delivered);
        ledger.take_interval();
        tokio::time::sleep(Duration::from_secs_f64(stage_secs)).await;
        let after = ledger.counts();
        let lat = ledger.take_interval();
        let (ack, deliver) = (LatencySummary::of(&lat.ack), LatencySummary::of(&lat.deliver));
        let backlog = after.acked.saturating_sub(after.delivered);
        let delivered_per_s = (after.delivered - before.delivered) as f64 / stage_secs;
        // Growing: more undelivered than the window itself can explain, and
        // more than at the start of the stage.
        let backlog_grew = backlog > backlog_before + in_flight as u64 + (delivered_per_s * 0.05) as u64;
        let too_slow = (deliver.p99 as f64) > bound_us;
        let stage = Stage {
            in_flight,
            seconds: stage_secs,
            acked_per_s: (after.acked - before.acked) as f64 / stage_secs,
            delivered_per_s,
            ack_p99_us: ack.p99,
            deliver_p50_us: deliver.p50,
            deliver_p99_us: deliver.p99,
            backlog,
            within_bounds: !too_slow && !backlog_grew && after.failed == before.failed,
        };
        bar.println(&format!(
            "in flight {in_flight:>5}: {:>9.0} delivered/s, p99 deliver {:>7} µs, backlog {backlog}",
            stage.delivered_per_s, stage.deliver_p99_us
        ));
        bar.inc(1);
        result.stages.push(stage);
        if stage.within_bounds {
            result.max_sustained_per_s = result.max_sustained_per_s.max(delivered_per_s);
        }
        if too_slow {
            result.stopped_because = format!("p99 send->deliver {} µs passed the {bound_us:.0} µs bound", deliver.p99);
            break;
        }
        if backlog_grew {
            result.stopped_because = format!("delivery backlog grew from {backlog_before} to {backlog}");
            break;
        }
        if after.failed > before.failed {
            result.stopped_because = format!("{} sends failed", after.failed - before.failed);
            break;
        }
        if delivered_per_s < best * 1.03 {
            flat_stages += 1;
            if flat_stages == 2 {
                result.stopped_because = "throughput stopped growing for two stages".into();
                break;
            }
        } else {
            flat_stages = 0;
        }
        best = best.max(delivered_per_s);
    }
    if result.stopped_because.is_empty() {
        result.stopped_because = format!("reached --max-in-flight {}", a.max_in_flight);
    }
    window.close();
    let _ = dispatcher.await;
    let sent_until_ns = ledger.now_ns();
    run.drain(&bar).await;
    bar.finish();
    let end_ns = ledger.last_delivery_ns().max(sent_until_ns);
    let mut report = run.report("max", start_ns, end_ns);
    report.max = Some(result);
    run.finish(conns).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(report)
}
