//! `chat`: open loop at a fixed aggregate rate. Send `k` is scheduled at
//! `start + k / rate` and stamped with that time, so when the broker (or the
//! in-flight bound) holds the sender back, the delay shows in the latency
//! instead of silently lowering the offered load.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};

use super::positive;
use crate::cli::ChatArgs;
use crate::ledger::Counts;
use crate::progress::Progress;
use crate::report::Report;
use crate::run::{partner, Job, Run};
use crate::LoadError;

/// Wake this long before a send is due. Tokio's timer fires on the first
/// millisecond tick at or after the deadline, so waking a millisecond early
/// means a send is never late because of the timer; sends that go out early
/// are stamped with the time they actually leave, so latency is never
/// flattered either.
const TIMER_SLACK_NS: u64 = 1_000_000;

/// When the sends of an open-loop run are due: send `k` at `start_ns + k / rate`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    /// Ledger time of send 0.
    pub(crate) start_ns: u64,
    /// Sends per second.
    pub(crate) rate: f64,
    /// Sends in all.
    pub(crate) total: u64,
}

/// Offers the load: sends `k` at its due time, round-robin over the users,
/// each to its partner; `bar` shows how many went out and `status` of the counts.
pub(crate) async fn offer(
    run: &Run,
    senders: &[mpsc::Sender<Job>],
    in_flight: &Arc<Semaphore>,
    schedule: Schedule,
    bar: &Progress,
    status: &(dyn Fn(Counts) -> String + Sync),
) {
    let (ledger, users) = (&run.ledger, run.users);
    for k in 0..schedule.total {
        let due_ns = schedule.start_ns + (k as f64 * 1e9 / schedule.rate) as u64;
        if due_ns > ledger.now_ns() + TIMER_SLACK_NS {
            tokio::time::sleep_until(ledger.instant(due_ns - TIMER_SLACK_NS).into()).await;
        }
        let permit = in_flight.clone().acquire_owned().await.expect("never closed");
        let from = (k % u64::from(users)) as u32;
        let stamp = ledger.stamp(from, due_ns.min(ledger.now_ns()));
        if senders[from as usize].send(Job { to: partner(from, users), stamp, permit }).await.is_err() {
            ledger.failed("Closed");
        }
        if k % 1024 == 0 {
            bar.set_position(k);
            bar.set_message(status(ledger.counts()));
        }
    }
    bar.set_position(schedule.total);
}

pub(crate) async fn run(a: ChatArgs) -> Result<Report, LoadError> {
    let rate = positive("rate", a.rate)?;
    let duration = positive("duration", a.duration)?;
    if !(a.warmup.is_finite() && a.warmup >= 0.0) {
        return Err(LoadError::Args(format!("--warmup must be zero or more seconds, not {}", a.warmup)));
    }
    if a.max_in_flight == 0 {
        return Err(LoadError::Args("--max-in-flight must be at least 1".into()));
    }
    let users = a.common.users;
    let mut run = Run::open_with(&a.common, users, a.devices, a.e2e).await?;
    let all: Vec<u32> = (0..users).collect();
    let conns = run.connect_all(&all, "connecting").await?;
    let senders: Vec<_> = conns.iter().map(|c| run.spawn_sender(c.clone())).collect();
    let in_flight = Arc::new(Semaphore::new(a.max_in_flight));
    let ledger = run.ledger.clone();

    run.start_measuring();
    let start_ns = ledger.now_ns() + 1_000_000;
    ledger.time_from(start_ns + (a.warmup * 1e9) as u64);
    let total = ((a.warmup + duration) * rate).round() as u64;
    let bar = Progress::bar(run.quiet, total, "sending");
    let status = |c: Counts| format!("{} acked, {} delivered, {} failed", c.acked, c.delivered, c.failed);
    offer(&run, &senders, &in_flight, Schedule { start_ns, rate, total }, &bar, &status).await;
    let sent_until_ns = ledger.now_ns();
    drop(senders);
    run.drain(&bar).await;
    bar.finish();
    let end_ns = ledger.last_delivery_ns().max(sent_until_ns);
    let mut report = run.report("chat", start_ns, end_ns);
    report.offered_rate = Some(rate);
    run.finish(conns).await;
    // Let close frames go out before the runtime stops.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(report)
}
