//! Order across holders: a shipment that waits for another broker's handoff.
//!
//! A queue's entries can reach a device's broker along more than one path.
//! alice's broker ships her first messages to bob's broker of the time (which
//! holds them while bob is offline), then bob logs in somewhere else, and her
//! broker ships the newer ones there. The newer ones say which broker
//! acknowledged the older ones (`Ship.handed_to`, up to `handed_up_to`); the
//! receiver's store answers `Wait` while it lacks those
//! ([`tern_protocol::shipping::admit`]). This module then asks that broker
//! for what it holds (`HandoffRequest`), and once it answers (`HandoffDone`
//! with the request's id: it has shipped here everything it held when asked)
//! settles the origin's seqs up to `handed_up_to` in the store, so the
//! sender's next try is stored, after the older entries.
//!
//! A broker that is not a live member cannot answer: after [`DOWN_WAIT`] of
//! that (or [`UNANSWERED_WAIT`] of a live one not answering), the wait is
//! given up (the seqs are settled anyway and a metric counts it), so a broker
//! that died or left delays delivery by seconds, not until it comes back.
//! A broker that restarts before the others declare it down is waited for,
//! and one that drained on SIGTERM handed over what it held first. Entries a
//! dead broker hands over when it returns still arrive, possibly after newer
//! ones: that is the one case where order gives way to delivery.
//!
//! Waits cannot form a cycle for long: a broker that hands a queue back
//! (`HandoffDone`) is forgotten as the holder of what was shipped to it
//! (`ShipMsg::Returned`), so a device moving back and forth between two
//! brokers does not leave each waiting for the other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tern_protocol::peer::{self as pp, peer_frame::Kind as P, PeerFrame};
use tokio::time::Instant;

use super::{lock, Mesh};
use crate::store::QueueKey;

/// How long a wait lasts once the broker waited for is no longer a member.
pub(super) const DOWN_WAIT: Duration = Duration::from_secs(3);
/// How long a wait lasts at most.
pub(super) const UNANSWERED_WAIT: Duration = Duration::from_secs(30);
/// A request not answered within this long is sent again.
const ASK_AGAIN: Duration = Duration::from_secs(1);
/// Waits untouched for this long are dropped (their senders stopped trying).
const FORGET: Duration = Duration::from_secs(600);
/// Waits kept before old ones are dropped.
const MAX_WAITS: usize = 4096;

/// Waiting for `via` to hand over what it holds of one queue.
#[derive(Debug)]
pub(super) struct Settling {
    /// Per origin: the seq to settle, and the request that covers it (none
    /// yet: it came after the last request went out).
    deps: HashMap<[u8; 16], (u64, Option<u64>)>,
    since: Instant,
    touched: Instant,
    asked: Option<Instant>,
}

/// Waits, keyed by queue and the broker waited for.
pub(super) type Waits = HashMap<(QueueKey, String), Settling>;

impl Mesh {
    /// The store answered `Wait` for a shipment of `queue` from `origin`:
    /// its seqs up to `up_to` are at `via`. Asks `via` to hand over, unless
    /// asked recently; settles at once if `via` has been gone too long.
    /// Returns how long the sender should wait before sending again.
    pub(super) async fn await_handoff(&self, queue: &QueueKey, via: &str, origin: [u8; 16], up_to: u64) -> Duration {
        let now = Instant::now();
        let alive = self.members().contains_key(via);
        let (give_up, ask, waited) = {
            let mut waits = lock(&self.inner.settling);
            if waits.len() >= MAX_WAITS {
                waits.retain(|_, s| now - s.touched < FORGET);
            }
            let s = waits.entry((queue.clone(), via.to_owned())).or_insert_with(|| Settling {
                deps: HashMap::new(),
                since: now,
                touched: now,
                asked: None,
            });
            s.touched = now;
            let dep = s.deps.entry(origin).or_insert((0, None));
            if up_to > dep.0 {
                *dep = (up_to, None);
            }
            let waited = now - s.since;
            if !alive && waited > DOWN_WAIT || waited > UNANSWERED_WAIT {
                let s = waits.remove(&(queue.clone(), via.to_owned()));
                (s.map(|s| s.deps), None, waited)
            } else if s.deps.values().any(|(_, id)| id.is_none()) || s.asked.is_none_or(|t| now - t > ASK_AGAIN) {
                let id = next_request_id();
                s.asked = Some(now);
                // An answer to this request covers every dep recorded so far.
                s.deps.values_mut().filter(|d| d.1.is_none()).for_each(|d| d.1 = Some(id));
                (None, Some(id), waited)
            } else {
                (None, None, waited)
            }
        };
        if let Some(deps) = give_up {
            metrics::counter!("tern_mesh_handoff_waits_abandoned_total").increment(1);
            tracing::warn!(%queue, %via, alive, "no handoff from this broker in time: shipments that must follow what it holds are stored without it");
            self.settle(queue, deps.into_iter().map(|(o, (up_to, _))| (o, up_to))).await;
            return Duration::ZERO;
        }
        if let Some(request_id) = ask {
            metrics::counter!("tern_mesh_handoff_requests_total").increment(1);
            if let Some(link) = self.link(via) {
                let req = pp::HandoffRequest { handle: queue.handle().to_owned(), device: queue.device(), request_id };
                link.send(PeerFrame { kind: Some(P::HandoffRequest(req)) });
            }
        }
        // Wait longer the longer it lasts, between 250 ms and 3 s.
        (waited / 2).clamp(Duration::from_millis(250), Duration::from_secs(3))
    }

    /// `via` answered request `request_id` for `queue`: it holds nothing
    /// from before it any more. Settles every seq that request covers.
    pub(super) async fn on_handoff_answer(&self, queue: &QueueKey, via: &str, request_id: u64) {
        let settled: Vec<([u8; 16], u64)> = {
            let mut waits = lock(&self.inner.settling);
            let key = (queue.clone(), via.to_owned());
            let Some(s) = waits.get_mut(&key) else { return };
            let mut settled = Vec::new();
            s.deps.retain(|origin, (up_to, id)| {
                let covered = id.is_some_and(|id| id <= request_id);
                if covered {
                    settled.push((*origin, *up_to));
                }
                !covered
            });
            if s.deps.is_empty() {
                waits.remove(&key);
            }
            settled
        };
        self.settle(queue, settled).await;
    }

    async fn settle(&self, queue: &QueueKey, deps: impl IntoIterator<Item = ([u8; 16], u64)>) {
        for (origin, up_to) in deps {
            if let Err(e) = self.inner.store.settle(origin, queue.clone(), up_to).await {
                tracing::warn!(%queue, up_to, error = %e, "handed-over entries not settled; the wait goes on");
            }
        }
    }
}

impl Mesh {
    /// True once `node` has not been a live member for [`DOWN_WAIT`];
    /// `since` keeps when it was first seen missing (reset while it is one).
    pub(super) fn gone_too_long(&self, node: &str, since: &mut Option<Instant>) -> bool {
        if self.members().contains_key(node) {
            *since = None;
            return false;
        }
        since.get_or_insert_with(Instant::now).elapsed() >= DOWN_WAIT
    }
}

pub(super) fn next_request_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
