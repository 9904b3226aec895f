//! One sender's order across its own moves: when a device logs in at a new
//! broker, what it sent through its previous one goes first.
//!
//! A send is stored at the sender's broker and shipped from there, so a
//! device that moves from broker P to broker X leaves its last sends in P's
//! queues. If X took its next sends at once, they could reach a recipient
//! first: P's copies wait for a link, a lookup, or P itself after a crash,
//! and X's do not. So X asks P (`SenderFlush`) and takes the device's sends
//! only once P answers: every entry the device sent through P is then
//! stored at its recipient's broker, or, where P cannot ship it now (the
//! recipient's broker is unknown or unreachable), at X itself (a `Ship` with
//! `hold`), ahead of the sends X takes next. Either way the new sends are
//! queued behind the old ones wherever they meet.
//!
//! P's answer carries its clock, which X takes into its own before it takes
//! the device's sends: the stamps X gives them are above every stamp P gave
//! (see [`item`](crate::store::StoredItem)), so wherever the old and new
//! sends meet out of arrival order, the fence after a move sorts them back.
//!
//! X learns P from the device's directory owner. When the owner knows
//! nothing of the device (it restarted and forgot, or cannot be asked), X
//! asks every live member instead: a broker the device never used answers
//! at once.
//!
//! The wait is bounded: X gives up after [`SENDER_WAIT`] (or [`DOWN_WAIT`](super::settle::DOWN_WAIT)
//! while P is not a live member) and P answers by [`FLUSH_WAIT`] with what
//! it managed; X asks again while P is live and has not finished. A broker that stays dead that long is the one case in which
//! a device's later sends may overtake its earlier ones (docs/mesh.md).

use std::time::Duration;

use tern_protocol::peer::{self as pp, reply, request};
use tokio::sync::{oneshot, watch};

use super::{lock, Mesh, ShipMsg};
use crate::store::QueueKey;

/// Longest a broker takes to answer a `SenderFlush` (with `complete:
/// false` when it could not move everything on by then; it is asked again).
const FLUSH_WAIT: Duration = Duration::from_secs(8);
/// Longest a device's sends wait at its new broker for a previous one that
/// is a live member: the settle bound for a live broker not answering, well
/// past a recipient's wait for a handback (`HANDOFF_WAIT`, 10 s), which the
/// previous broker's shipments to that recipient may have to wait behind
/// (chaos seed 5249553177941115760: both waits began at one login, the
/// sender's ended 60 ms before the fence it waited behind, and the device's
/// new sends overtook 34 older ones).
const SENDER_WAIT: Duration = super::settle::UNANSWERED_WAIT;
/// Pause between attempts to reach the previous broker.
const RETRY: Duration = Duration::from_millis(250);

/// Resolves when the device's sends may be taken here.
#[derive(Debug, Clone)]
pub(crate) struct SendsReady(watch::Receiver<bool>);

impl SendsReady {
    /// Waits until the previous broker answered or the wait was given up.
    pub(crate) async fn wait(&mut self) {
        let _ = self.0.wait_for(|ready| *ready).await;
    }
}

impl Mesh {
    /// Device `sender` logged in here, coming from one of the brokers
    /// `previous` (one, when the directory knew where it was): asks each to
    /// move on what the device sent through it (see the module doc).
    pub(crate) fn flush_sender(&self, sender: &QueueKey, previous: Vec<String>) -> SendsReady {
        let (tx, rx) = watch::channel(false);
        lock(&self.inner.sender_flushes).insert(sender.clone(), rx.clone());
        let (mesh, sender, mine) = (self.clone(), sender.clone(), rx.clone());
        self.inner.tasks.spawn(async move {
            let (mesh, sender) = (&mesh, &sender);
            let asks = previous.iter().map(|node| async move {
                let result = mesh.ask_flush(sender, node).await;
                metrics::counter!("tern_mesh_sender_flushes_total", "result" => result).increment(1);
                if result != "complete" {
                    tracing::info!(%sender, previous = %node, result, "the device's sends are taken before its previous broker moved on all it sent");
                }
            });
            tokio::select! {
                () = mesh.inner.cancel.cancelled() => return,
                _ = futures::future::join_all(asks) => {}
            }
            let _ = tx.send(true);
            let mut flushes = lock(&mesh.inner.sender_flushes);
            if flushes.get(sender).is_some_and(|r| r.same_channel(&mine)) {
                flushes.remove(sender);
            }
        });
        SendsReady(rx)
    }

    /// Asks `previous` until it moved on everything (`"complete"`), it has
    /// not been a live member for [`DOWN_WAIT`](super::settle::DOWN_WAIT)
    /// (`"unreachable"`), or [`SENDER_WAIT`] is over (`"partial"` if it
    /// answered that it could not finish, `"timeout"` if it never answered).
    async fn ask_flush(&self, sender: &QueueKey, previous: &str) -> &'static str {
        let deadline = tokio::time::Instant::now() + SENDER_WAIT;
        let mut down_since = None;
        let mut partial = false;
        loop {
            let mut answer = Attempt::NoAnswer;
            if let Some(link) = self.link(previous) {
                let ask = pp::SenderFlush { handle: sender.handle().to_owned(), device: sender.device() };
                let request = link.request(request::Kind::SenderFlush(ask), FLUSH_WAIT + Duration::from_secs(1));
                answer = match tokio::time::timeout_at(deadline, request).await {
                    Ok(Ok(reply::Kind::SenderFlushed(f))) => {
                        // The device's sends here get stamps above those
                        // it got there.
                        self.inner.store.clock().observe(f.clock);
                        if f.complete {
                            Attempt::Complete
                        } else {
                            tracing::debug!(%sender, %previous, "sender flush not complete yet; asking again");
                            Attempt::Partial
                        }
                    }
                    Ok(Ok(other)) => {
                        tracing::debug!(%previous, ?other, "unexpected answer to a sender flush");
                        Attempt::Partial
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%previous, error = %e, "sender flush not answered; asking again");
                        Attempt::NoAnswer
                    }
                    Err(_) => Attempt::NoAnswer,
                };
            }
            partial |= answer == Attempt::Partial;
            let gone = self.gone_too_long(previous, &mut down_since);
            let past = tokio::time::Instant::now() >= deadline;
            if let Some(result) = after_attempt(answer, gone, past, partial) {
                return result;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// As the previous broker: moves on what `sender` sent through this one
    /// and answers when it is stored elsewhere, or at [`FLUSH_WAIT`].
    pub(super) async fn serve_sender_flush(&self, ask: pp::SenderFlush, asker: &str) -> reply::Kind {
        let Ok(sender) = super::queue_key(&ask.handle, ask.device) else {
            return reply::Kind::SenderFlushed(pp::SenderFlushed { queues: 0, complete: true, clock: 0 });
        };
        let deadline = tokio::time::Instant::now() + FLUSH_WAIT;
        // The device may have come here from a third broker a moment ago:
        // what that one hands over to this one is part of what to move on.
        let pending = lock(&self.inner.sender_flushes).get(&sender).cloned();
        if let Some(mut ready) = pending {
            let _ = tokio::time::timeout_at(deadline, ready.wait_for(|r| *r)).await;
        }
        // Its session here, if still open, takes no more sends.
        self.inner.router.replace_remotely(&sender);
        let queues = match self.inner.store.sent_by(sender.handle(), sender.device()).await {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(%sender, error = %e, "cannot find what a device that moved sent through here");
                return reply::Kind::SenderFlushed(pp::SenderFlushed { queues: 0, complete: false, clock: 0 });
            }
        };
        let count = queues.len() as u32;
        let mut waits = Vec::new();
        for (queue, up_to) in queues {
            // Its device is here (or was last here): the asker ships the
            // device's next sends here, behind these.
            if self.inner.router.is_attached(&queue) {
                tracing::debug!(%sender, %queue, "sender flush: the recipient is here");
                continue;
            }
            if let Ok(Some(Some(l))) = tokio::time::timeout(RETRY, self.locate(&queue)).await {
                if l.node == self.node() {
                    tracing::debug!(%sender, %queue, "sender flush: the recipient was last here");
                    continue;
                }
            }
            let (done, rx) = oneshot::channel();
            let msg = ShipMsg::Flush { queue, up_to, holder: asker.to_owned(), done };
            if self.inner.ship.send(msg).await.is_ok() {
                waits.push(rx);
            }
        }
        let all = futures::future::join_all(waits);
        let complete = match tokio::time::timeout_at(deadline, all).await {
            Ok(results) => results.iter().all(Result::is_ok),
            Err(_) => false,
        };
        // Every stamp given here for the device's sends is at or below it.
        let clock = self.inner.store.clock().current();
        tracing::debug!(%sender, %asker, queues = count, complete, "sender flush answered");
        reply::Kind::SenderFlushed(pp::SenderFlushed { queues: count, complete, clock })
    }
}

/// How one `SenderFlush` request ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attempt {
    /// Everything the device sent through the previous broker is moved on.
    Complete,
    /// It answered that it could not finish by its deadline.
    Partial,
    /// No answer (no link, the link went down, the request timed out).
    NoAnswer,
}

/// After one attempt: the flush's result, or `None` to ask again. A live
/// previous broker is asked until it completes or [`SENDER_WAIT`] is over
/// (`past`), even when it answered that it could not finish: what it waits
/// on (a recipient's fence) may end after its own deadline. One that has
/// not been a live member for `DOWN_WAIT` (`gone`) is given up at once.
fn after_attempt(answer: Attempt, gone: bool, past: bool, partial: bool) -> Option<&'static str> {
    match answer {
        Attempt::Complete => Some("complete"),
        _ if gone => Some("unreachable"),
        _ if past && partial => Some("partial"),
        _ if past => Some("timeout"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chaos seed 5249553177941115760: the previous broker could not finish
    /// within its 8 s because the recipient's broker held its shipments
    /// behind a fence (up to `HANDOFF_WAIT`, 10 s); the new broker took the
    /// device's sends on that partial answer (or at its own 10 s), and they
    /// overtook 34 older ones.
    #[test]
    fn a_live_previous_broker_that_could_not_finish_is_asked_again_until_the_wait_is_over() {
        assert_eq!(after_attempt(Attempt::Partial, false, false, true), None, "asked again");
        assert_eq!(after_attempt(Attempt::NoAnswer, false, false, true), None, "asked again");
        assert_eq!(after_attempt(Attempt::Complete, false, false, true), Some("complete"));
        assert_eq!(after_attempt(Attempt::Partial, false, true, true), Some("partial"));
        assert_eq!(after_attempt(Attempt::NoAnswer, false, true, false), Some("timeout"));
        assert_eq!(after_attempt(Attempt::NoAnswer, true, false, false), Some("unreachable"));
        // The new broker outwaits the fence its previous broker's shipments
        // may wait behind, and that broker's own deadline after it.
        assert!(SENDER_WAIT >= super::super::location::HANDOFF_WAIT + FLUSH_WAIT + FLUSH_WAIT);
    }
}
