//! The receiving side of shipping between brokers, sans-IO: what a broker may
//! store of a `Ship` frame, so that nothing is stored past a gap and one
//! sender's messages keep their order across brokers.
//!
//! A broker ships the entries of its copy of a device queue (the *origin*'s
//! seqs 1, 2, 3, ...) to the broker where the device is. The receiver keeps,
//! per origin and queue, `done`: every origin seq up to it is accounted for
//! there (stored, or *settled*: known to have gone elsewhere first and been
//! handed over since). Its `ShipAck` is cumulative, so it must never say
//! `done` past a seq it lacks: the sender deletes what it acknowledges.
//!
//! A shipment says, besides its entries, what the sender no longer holds:
//! - `base`: every seq up to it is gone from the sender (acknowledged by a
//!   receiver, delivered to the device there, or expired);
//! - `handed_up_to`: the seqs up to it were last acknowledged by another
//!   broker (named in the frame). Those entries are there, or were handed on
//!   from there; a receiver that lacks them waits for that broker to hand
//!   over what it holds before storing anything newer of this origin.
//!
//! [`admit`] is the whole rule; the broker's store applies it atomically with
//! the write (`done` is kept beside the entries).

/// What to do with a shipment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Store the entries with seqs `from ..= to` (the shipment's tail from
    /// `from` on); `done` becomes `to`.
    Store {
        /// First seq to store: `done + 1`, or `base + 1` past a settled gap.
        from: u64,
        /// Last seq of the shipment.
        to: u64,
    },
    /// Every entry is accounted for already: store nothing, acknowledge `done`.
    Duplicate {
        /// What to acknowledge.
        done: u64,
    },
    /// Seqs from `expected` on are missing: store nothing; the sender resends
    /// from `expected`.
    Gap {
        /// The seq the receiver needs next.
        expected: u64,
    },
    /// Seqs up to `up_to` went to another broker and have not been handed
    /// over here: store nothing until that broker has (then `done` is
    /// settled up to `up_to`), and have the sender resend from `expected`.
    Wait {
        /// Seq the other broker acknowledged up to.
        up_to: u64,
        /// The seq the receiver needs next from this sender.
        expected: u64,
    },
    /// The seqs are not ascending and contiguous: a broken sender.
    Malformed,
}

/// Decides what of a shipment with entry seqs `seqs` to store, given `done`
/// for its origin and queue here, the sender's `base`, and `handed_up_to`
/// (0 when no other broker acknowledged any, or the receiver itself did).
pub fn admit(done: u64, base: u64, handed_up_to: u64, seqs: &[u64]) -> Admit {
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        return Admit::Duplicate { done };
    };
    if seqs.windows(2).any(|w| w[0].checked_add(1) != Some(w[1])) {
        return Admit::Malformed;
    }
    if last <= done {
        return Admit::Duplicate { done };
    }
    if handed_up_to > done {
        return Admit::Wait { up_to: handed_up_to, expected: done + 1 };
    }
    // Seqs up to `base` are gone from the sender and were not handed to
    // another broker: delivered, expired, or acknowledged here.
    let floor = done.max(base);
    if last <= floor {
        return Admit::Duplicate { done: floor };
    }
    if first > floor + 1 {
        return Admit::Gap { expected: floor + 1 };
    }
    Admit::Store { from: floor + 1, to: last }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(a: u64, b: u64) -> Vec<u64> {
        (a..=b).collect()
    }

    #[test]
    fn contiguous_entries_are_stored_and_resent_ones_skipped() {
        assert_eq!(admit(0, 0, 0, &range(1, 5)), Admit::Store { from: 1, to: 5 });
        assert_eq!(admit(3, 0, 0, &range(1, 5)), Admit::Store { from: 4, to: 5 });
        assert_eq!(admit(5, 0, 0, &range(1, 5)), Admit::Duplicate { done: 5 });
    }

    #[test]
    fn entries_past_a_gap_are_refused_not_skipped_to() {
        // The receiver restarted having stored up to 10; the sender, thinking
        // 11..=20 arrived, goes on from 21.
        assert_eq!(admit(10, 10, 0, &range(21, 30)), Admit::Gap { expected: 11 });
        // A batch that failed (queue full) and a later one that would fit.
        assert_eq!(admit(0, 0, 0, &range(513, 600)), Admit::Gap { expected: 1 });
    }

    #[test]
    fn seqs_the_sender_no_longer_holds_are_not_waited_for() {
        // 1..=40 were delivered to the device at the sender, or expired.
        assert_eq!(admit(0, 40, 0, &range(41, 45)), Admit::Store { from: 41, to: 45 });
        assert_eq!(admit(0, 40, 0, &range(42, 45)), Admit::Gap { expected: 41 });
        assert_eq!(admit(0, 50, 0, &range(41, 45)), Admit::Duplicate { done: 50 });
    }

    #[test]
    fn seqs_handed_to_another_broker_are_waited_for() {
        // 1..=18 were acknowledged by another broker, which holds them.
        assert_eq!(admit(0, 18, 18, &range(19, 20)), Admit::Wait { up_to: 18, expected: 1 });
        // Once that broker handed them over, `done` is settled to 18.
        assert_eq!(admit(18, 18, 18, &range(19, 20)), Admit::Store { from: 19, to: 20 });
        // Handed over earlier and stored here: nothing to wait for.
        assert_eq!(admit(25, 25, 18, &range(26, 27)), Admit::Store { from: 26, to: 27 });
    }

    #[test]
    fn seqs_out_of_order_are_malformed() {
        assert_eq!(admit(0, 0, 0, &[1, 3]), Admit::Malformed);
        assert_eq!(admit(0, 0, 0, &[2, 1]), Admit::Malformed);
        assert_eq!(admit(0, 0, 0, &[u64::MAX, 0]), Admit::Malformed);
    }
}

/// One sender and one receiver exchanging shipments over a link that drops,
/// duplicates and reorders, with receiver restarts that lose what was not yet
/// durable and link replacements the sender may or may not notice: whatever
/// happens, the receiver holds exactly seqs `1..=n` in order, once each, and
/// never acknowledges past what it holds.
#[cfg(test)]
mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        /// The sender ships its next batch of up to this many entries.
        Ship(u8),
        /// The link delivers its message at this index (modulo its length).
        Deliver(u8),
        /// The link drops its message at this index.
        Drop(u8),
        /// The link delivers the message at this index and keeps a copy.
        Duplicate(u8),
        /// The receiver's store syncs (what it stored becomes durable).
        Sync,
        /// The receiver restarts: it keeps only what was synced, and the link
        /// is replaced; `noticed`: the sender sees the link change.
        Restart { noticed: bool },
    }

    #[derive(Debug, Clone)]
    enum Msg {
        Ship { base: u64, seqs: Vec<u64> },
        Ack(u64),
        Nack(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u8..8).prop_map(Step::Ship),
            6 => any::<u8>().prop_map(Step::Deliver),
            1 => any::<u8>().prop_map(Step::Drop),
            1 => any::<u8>().prop_map(Step::Duplicate),
            2 => Just(Step::Sync),
            1 => any::<bool>().prop_map(|noticed| Step::Restart { noticed }),
        ]
    }

    proptest! {
        #[test]
        fn every_entry_arrives_once_and_in_order(n in 1u64..40, steps in proptest::collection::vec(step(), 0..300)) {
            // Sender: highest seq sent and acknowledged (deleted).
            let (mut sent, mut acked) = (0u64, 0u64);
            // Receiver: entries stored, and how many of them are durable.
            let (mut stored, mut durable): (Vec<u64>, usize) = (Vec::new(), 0);
            let mut link: Vec<(bool, Msg)> = Vec::new(); // (towards the receiver, message)
            let receive = |stored: &mut Vec<u64>, base: u64, seqs: &[u64]| -> Msg {
                let done = stored.last().copied().unwrap_or(0);
                match admit(done, base, 0, seqs) {
                    Admit::Store { from, to } => {
                        stored.extend(from..=to);
                        Msg::Ack(to)
                    }
                    Admit::Duplicate { done } => Msg::Ack(done),
                    Admit::Gap { expected } => Msg::Nack(expected),
                    other => panic!("unexpected {other:?}"),
                }
            };
            let all = steps.into_iter().chain((0..2000).map(|i| match i % 4 {
                0 => Step::Ship(8),
                1 => Step::Sync,
                _ => Step::Deliver(0),
            }));
            for s in all {
                match s {
                    Step::Ship(k) => {
                        if sent == acked && !link.is_empty() {
                            continue;
                        }
                        let seqs: Vec<u64> = (sent + 1..=n.min(sent + u64::from(k))).collect();
                        if let Some(last) = seqs.last() {
                            sent = *last;
                            link.push((true, Msg::Ship { base: acked, seqs }));
                        } else if sent < n || acked < n {
                            // Nothing new to send: resend from what was acknowledged.
                            sent = acked;
                        }
                    }
                    Step::Deliver(i) | Step::Duplicate(i) if !link.is_empty() => {
                        let at = usize::from(i) % link.len();
                        let (to_receiver, msg) =
                            if matches!(s, Step::Duplicate(_)) { link[at].clone() } else { link.remove(at) };
                        match (to_receiver, msg) {
                            (true, Msg::Ship { base, seqs }) => {
                                let answer = receive(&mut stored, base, &seqs);
                                link.push((false, answer));
                            }
                            (false, Msg::Ack(up_to)) => {
                                prop_assert!(up_to <= stored.len() as u64, "acknowledged past what is stored");
                                if up_to > acked {
                                    acked = up_to;
                                    sent = sent.max(acked);
                                }
                            }
                            (false, Msg::Nack(expected)) => sent = acked.max(expected - 1),
                            _ => {}
                        }
                    }
                    Step::Drop(i) if !link.is_empty() => {
                        let at = usize::from(i) % link.len();
                        link.remove(at);
                    }
                    Step::Sync => durable = stored.len(),
                    Step::Restart { noticed } => {
                        // Acks go out only for durable entries in the broker;
                        // here the receiver acks at once, so a restart may
                        // lose only what no ack has covered yet.
                        let floor = (acked as usize).min(stored.len());
                        stored.truncate(durable.max(floor));
                        link.clear();
                        if noticed {
                            sent = acked;
                        }
                    }
                    _ => {}
                }
                prop_assert_eq!(&stored, &(1..=stored.len() as u64).collect::<Vec<_>>(), "a gap or a reorder");
            }
            prop_assert_eq!(stored.len() as u64, n, "not everything arrived");
        }
    }
}
