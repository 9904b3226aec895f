//! The fault schedule of a `chaos` run, drawn in advance from a seed so a
//! failing run can be repeated: the same `--seed`, duration, broker count
//! and fault kinds give the same steps at the same offsets.
//!
//! The run is cut into rounds of [`ROUND_S`] seconds (the last one may be
//! shorter). Each round gives its time to the enabled fault kinds in the
//! proportions of [`share`]: first kills, then link cuts, then pauses. A
//! phase only holds faults that end inside it, so when one phase hands
//! over to the next every broker is running and every link may come back.

use std::ops::Range;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cli::Fault;

/// Seconds of one round of phases.
pub(crate) const ROUND_S: f64 = 60.0;
/// Seconds between two kills (from one kill to the next).
const KILL_EVERY_S: Range<f64> = 2.0..5.0;
/// Seconds a killed broker stays down before it is started again.
const DOWN_FOR_S: Range<f64> = 0.5..2.0;
/// Seconds between two link cuts.
const SEVER_EVERY_S: Range<f64> = 2.0..4.0;
/// Whole seconds a link stays cut (`/mesh/sever` takes whole seconds).
const SEVER_FOR_S: Range<u64> = 1..5;
/// Seconds a broker stays stopped: longer than foca takes to declare it
/// down (1 s probe period, then 4.8 s of suspicion for a 16-member
/// configuration), so the mesh does declare it down and it rejoins.
const PAUSE_FOR_S: Range<f64> = 8.0..11.0;
/// Seconds between one pause's end and the next pause.
const PAUSE_GAP_S: Range<f64> = 2.0..4.0;

/// One thing the chaos driver does to the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "lowercase")]
pub(crate) enum Step {
    /// SIGKILL broker `node`.
    Kill { node: usize },
    /// Start broker `node` again on its data directory and port.
    Restart { node: usize },
    /// Cut the link `from` -> `to` (asked of `from`'s admin port) for `secs`.
    Sever { from: usize, to: usize, secs: u64 },
    /// SIGSTOP broker `node`.
    Pause { node: usize },
    /// SIGCONT broker `node`.
    Resume { node: usize },
}

/// A step and when it is due, in ms from the start of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timed {
    pub(crate) at_ms: u64,
    pub(crate) step: Step,
}

/// The part of a round's time a fault kind gets (before normalising over
/// the enabled kinds).
fn share(f: Fault) -> f64 {
    match f {
        Fault::Kill => 0.5,
        Fault::Sever => 0.2,
        Fault::Pause => 0.3,
    }
}

/// Every step of a run of `duration_s` seconds over `brokers` brokers, in
/// the order they are due.
pub(crate) fn steps(seed: u64, duration_s: f64, brokers: usize, faults: &[Fault]) -> Vec<Timed> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let kinds: Vec<Fault> =
        [Fault::Kill, Fault::Sever, Fault::Pause].into_iter().filter(|f| faults.contains(f)).collect();
    let total_share: f64 = kinds.iter().map(|&f| share(f)).sum();
    let mut round_start = 0.0;
    while round_start < duration_s && total_share > 0.0 {
        let round_len = ROUND_S.min(duration_s - round_start);
        let mut from = round_start;
        for &kind in &kinds {
            let to = from + round_len * share(kind) / total_share;
            match kind {
                Fault::Kill => kills(&mut rng, from..to, brokers, &mut out),
                Fault::Sever => severs(&mut rng, from..to, brokers, &mut out),
                Fault::Pause => pauses(&mut rng, from..to, brokers, &mut out),
            }
            from = to;
        }
        round_start += round_len;
    }
    out.sort_by_key(|t| t.at_ms);
    out
}

fn at(secs: f64, step: Step) -> Timed {
    Timed { at_ms: (secs * 1000.0).round() as u64, step }
}

fn kills(rng: &mut StdRng, phase: Range<f64>, brokers: usize, out: &mut Vec<Timed>) {
    let mut t = phase.start + rng.gen_range(KILL_EVERY_S);
    loop {
        let down = rng.gen_range(DOWN_FOR_S);
        if t + down >= phase.end {
            return;
        }
        let node = rng.gen_range(0..brokers);
        out.push(at(t, Step::Kill { node }));
        out.push(at(t + down, Step::Restart { node }));
        t += rng.gen_range(KILL_EVERY_S).max(down + 0.1);
    }
}

fn severs(rng: &mut StdRng, phase: Range<f64>, brokers: usize, out: &mut Vec<Timed>) {
    let mut t = phase.start + rng.gen_range(0.5..1.5);
    loop {
        let secs = rng.gen_range(SEVER_FOR_S);
        if t + secs as f64 >= phase.end {
            return;
        }
        let from = rng.gen_range(0..brokers);
        let to = (from + rng.gen_range(1..brokers)) % brokers;
        out.push(at(t, Step::Sever { from, to, secs }));
        t += rng.gen_range(SEVER_EVERY_S);
    }
}

fn pauses(rng: &mut StdRng, phase: Range<f64>, brokers: usize, out: &mut Vec<Timed>) {
    let mut t = phase.start + rng.gen_range(1.0..2.0);
    loop {
        let len = rng.gen_range(PAUSE_FOR_S);
        if t + len >= phase.end {
            return;
        }
        let node = rng.gen_range(0..brokers);
        out.push(at(t, Step::Pause { node }));
        out.push(at(t + len, Step::Resume { node }));
        t += len + rng.gen_range(PAUSE_GAP_S);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Fault; 3] = [Fault::Kill, Fault::Sever, Fault::Pause];

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        assert_eq!(steps(7, 600.0, 3, &ALL), steps(7, 600.0, 3, &ALL));
        assert_ne!(steps(7, 600.0, 3, &ALL), steps(8, 600.0, 3, &ALL));
    }

    #[test]
    fn a_minute_holds_every_kind_and_ends_with_every_broker_back() {
        for seed in 0..200 {
            let plan = steps(seed, 60.0, 3, &ALL);
            let count = |f: fn(&Step) -> bool| plan.iter().filter(|t| f(&t.step)).count();
            assert!(count(|s| matches!(s, Step::Kill { .. })) >= 5, "seed {seed}: {plan:?}");
            assert!(count(|s| matches!(s, Step::Sever { .. })) >= 2, "seed {seed}");
            assert!(count(|s| matches!(s, Step::Pause { .. })) >= 1, "seed {seed}");
            // One fault at a time per kind of down: a broker is killed only
            // while every other is up, and every kill and pause is undone.
            let (mut down, mut paused) = (vec![false; 3], vec![false; 3]);
            for t in &plan {
                assert!(t.at_ms < 60_000, "seed {seed}: {t:?} after the end");
                match t.step {
                    Step::Kill { node } => {
                        assert!(!down.iter().any(|&d| d) && !paused.iter().any(|&p| p), "seed {seed}: {t:?}");
                        down[node] = true;
                    }
                    Step::Restart { node } => down[node] = false,
                    Step::Pause { node } => {
                        assert!(!down.iter().any(|&d| d) && !paused.iter().any(|&p| p), "seed {seed}: {t:?}");
                        paused[node] = true;
                    }
                    Step::Resume { node } => paused[node] = false,
                    Step::Sever { from, to, secs } => {
                        assert!(from != to && from < 3 && to < 3 && (1..=4).contains(&secs), "seed {seed}: {t:?}");
                        assert!(t.at_ms + secs * 1000 < 60_000);
                    }
                }
            }
            assert!(!down.iter().any(|&d| d) && !paused.iter().any(|&p| p), "seed {seed}");
        }
    }

    #[test]
    fn kill_intervals_and_pause_lengths_are_as_documented() {
        let plan = steps(3, 600.0, 3, &[Fault::Kill, Fault::Pause]);
        let kills: Vec<u64> = plan.iter().filter(|t| matches!(t.step, Step::Kill { .. })).map(|t| t.at_ms).collect();
        assert!(kills.len() > 60, "{}", kills.len());
        let mut pause_start = None;
        for t in &plan {
            match t.step {
                Step::Pause { .. } => pause_start = Some(t.at_ms),
                Step::Resume { .. } => {
                    let len = t.at_ms - pause_start.take().unwrap();
                    assert!((8000..=11000).contains(&len), "{len}");
                }
                _ => {}
            }
        }
        assert!(!plan.iter().any(|t| matches!(t.step, Step::Sever { .. })), "severs are off");
    }

    #[test]
    fn only_the_chosen_faults_fill_the_round() {
        let plan = steps(1, 60.0, 3, &[Fault::Kill]);
        assert!(plan.iter().all(|t| matches!(t.step, Step::Kill { .. } | Step::Restart { .. })));
        assert!(plan.last().unwrap().at_ms > 50_000, "kills fill the whole minute");
    }
}
