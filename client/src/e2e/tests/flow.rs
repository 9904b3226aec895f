//! Conversations: publish, claim, encrypt, decrypt between devices, across
//! restarts, out of order, and the recovery of a broken session.

use tern_protocol::pb;

use super::{text_payload, Dev, KeyServer};
use crate::e2e::{recovery_request, DecryptError, E2e};

fn setup(names: &[(&str, u32)]) -> (tempfile::TempDir, KeyServer, Vec<Dev>) {
    let root = tempfile::tempdir().expect("tempdir");
    let mut ks = KeyServer::new(100);
    let mut devs: Vec<Dev> = names.iter().map(|(h, d)| Dev::new(&root, h, *d)).collect();
    for d in &mut devs {
        d.publish(&mut ks);
    }
    (root, ks, devs)
}

#[test]
fn three_devices_talk_both_ways_interleaved_with_nothing_lost() {
    let (_root, mut ks, mut devs) = setup(&[("alice", 1), ("bob", 1), ("carol", 2)]);
    let (mut sent, mut received) = (0, 0);
    // A fixed interleaving: each round every device writes to the next one
    // and to the one before, a varying number of messages, and each batch
    // is read in order after all of the round was written.
    for round in 0..12 {
        let mut in_flight = Vec::new();
        for from in 0..3 {
            for to in [(from + 1) % 3, (from + 2) % 3] {
                for k in 0..(1 + (round + from + to) % 3) {
                    let text = format!("{from}->{to} r{round} k{k}");
                    let (a, b) = pair(&mut devs, from, to);
                    in_flight.push((from, to, a.send_text(&mut ks, b, &text), text));
                    sent += 1;
                }
            }
        }
        for (from, to, body, text) in in_flight {
            let (a, b) = pair(&mut devs, from, to);
            assert_eq!(b.recv_text(a, &body), text);
            received += 1;
        }
    }
    assert_eq!((sent, received), (received, sent));
    assert!(sent > 100);
    for d in &devs {
        for other in &devs {
            if d.addr() != other.addr() {
                let n = d.e2e.peers[&other.addr()].sessions.len();
                assert!((1..=2).contains(&n), "{:?} has {n} sessions with {:?}", d.addr(), other.addr());
            }
        }
    }
}

/// Mutable `from`, shared `to`, out of one vector.
fn pair(devs: &mut [Dev], from: usize, to: usize) -> (&mut Dev, &mut Dev) {
    assert_ne!(from, to);
    if from < to {
        let (l, r) = devs.split_at_mut(to);
        (&mut l[from], &mut r[0])
    } else {
        let (l, r) = devs.split_at_mut(from);
        (&mut r[0], &mut l[to])
    }
}

#[test]
fn pre_key_messages_before_an_answer_stay_on_one_session_even_out_of_order() {
    let (_root, mut ks, mut devs) = setup(&[("alice", 1), ("bob", 1)]);
    let (alice, bob) = pair(&mut devs, 0, 1);
    let bodies: Vec<_> = (0..4).map(|i| alice.send_text(&mut ks, bob, &format!("m{i}"))).collect();
    for i in [2, 0, 3, 1] {
        assert_eq!(bob.recv_text(alice, &bodies[i]), format!("m{i}"));
    }
    assert_eq!(bob.e2e.peers[&alice.addr()].sessions.len(), 1, "one inbound session for all four");
    let reply = bob.send_text(&mut ks, alice, "ok");
    let env = <pb::OlmEnvelope as prost::Message>::decode(reply.as_ref()).expect("envelope");
    assert_eq!(env.message_type, 1, "bob answers with a normal message");
    assert!(env.sender_identity.is_none());
    assert_eq!(alice.recv_text(bob, &reply), "ok");
    let next = alice.send_text(&mut ks, bob, "normal now");
    let env = <pb::OlmEnvelope as prost::Message>::decode(next.as_ref()).expect("envelope");
    assert_eq!(env.message_type, 1);
    assert_eq!(bob.recv_text(alice, &next), "normal now");
}

#[test]
fn sessions_started_by_both_sides_at_once_both_work() {
    let (_root, mut ks, mut devs) = setup(&[("alice", 1), ("bob", 1)]);
    let (alice, bob) = pair(&mut devs, 0, 1);
    let a1 = alice.send_text(&mut ks, bob, "a1");
    let b1 = bob.send_text(&mut ks, alice, "b1");
    assert_eq!(bob.recv_text(alice, &a1), "a1");
    assert_eq!(alice.recv_text(bob, &b1), "b1");
    for i in 0..10 {
        let a = alice.send_text(&mut ks, bob, &format!("a{i}"));
        let b = bob.send_text(&mut ks, alice, &format!("b{i}"));
        assert_eq!(alice.recv_text(bob, &b), format!("b{i}"));
        assert_eq!(bob.recv_text(alice, &a), format!("a{i}"));
    }
}

#[test]
fn a_restart_mid_conversation_keeps_decrypting() {
    let (_root, mut ks, mut devs) = setup(&[("alice", 1), ("bob", 1)]);
    let (alice, bob) = pair(&mut devs, 0, 1);
    for i in 0..5 {
        let a = alice.send_text(&mut ks, bob, &format!("a{i}"));
        assert_eq!(bob.recv_text(alice, &a), format!("a{i}"));
        let b = bob.send_text(&mut ks, alice, &format!("b{i}"));
        assert_eq!(alice.recv_text(bob, &b), format!("b{i}"));
    }
    // Messages in flight across both restarts.
    let pending: Vec<_> = (0..3).map(|i| alice.send_text(&mut ks, bob, &format!("p{i}"))).collect();
    alice.restart();
    bob.restart();
    for (i, body) in pending.iter().enumerate() {
        assert_eq!(bob.recv_text(alice, body), format!("p{i}"));
    }
    for i in 0..5 {
        let b = bob.send_text(&mut ks, alice, &format!("b{i}"));
        bob.restart();
        assert_eq!(alice.recv_text(bob, &b), format!("b{i}"));
        alice.restart();
        let a = alice.send_text(&mut ks, bob, &format!("a{i}"));
        assert_eq!(bob.recv_text(alice, &a), format!("a{i}"));
    }
}

#[test]
fn a_lost_session_is_recovered_by_request_and_resend() {
    let (_root, mut ks, mut devs) = setup(&[("alice", 1), ("bob", 1)]);
    let (alice, bob) = pair(&mut devs, 0, 1);
    let a = alice.send_text(&mut ks, bob, "hello");
    assert_eq!(bob.recv_text(alice, &a), "hello");
    let b = bob.send_text(&mut ks, alice, "hi");
    assert_eq!(alice.recv_text(bob, &b), "hi");

    bob.e2e.forget_sessions("alice", 1); // bob's session is lost
    let (lost, lost_id) = alice.send(&mut ks, bob, &text_payload("you will miss this"));
    let err = bob.recv(alice, &lost).expect_err("no session");
    assert!(matches!(err, DecryptError::UnknownSession { .. }), "{err:?}");
    recover(&mut ks, alice, bob, lost_id, "you will miss this");
}

#[test]
fn a_corrupted_session_is_recovered_by_request_and_resend() {
    let (_root, mut ks, mut devs) = setup(&[("alice", 1), ("bob", 1), ("zed", 9)]);
    let (alice, bob) = pair(&mut devs, 0, 1);
    let a = alice.send_text(&mut ks, bob, "hello");
    assert_eq!(bob.recv_text(alice, &a), "hello");
    let b = bob.send_text(&mut ks, alice, "hi");
    assert_eq!(alice.recv_text(bob, &b), "hi");
    // Bob's session with alice is replaced by an unrelated one.
    let keys = ks.claim_verified("zed", 9);
    let unrelated = vodozemac::olm::Account::new()
        .create_outbound_session(
            vodozemac::olm::SessionConfig::version_1(),
            vodozemac::Curve25519PublicKey::from_bytes(keys.identity.curve25519),
            vodozemac::Curve25519PublicKey::from_bytes(keys.one_time_key),
        )
        .expect("session");
    bob.e2e.peers.get_mut(&alice.addr()).expect("peer").sessions[0] = unrelated;
    let (lost, lost_id) = alice.send(&mut ks, bob, &text_payload("lost"));
    let err = bob.recv(alice, &lost).expect_err("no session decrypts it");
    assert!(matches!(err, DecryptError::UnknownSession { .. }), "{err:?}");
    recover(&mut ks, alice, bob, lost_id, "lost");
}

/// Bob asks alice to resend `lost_id`; alice starts anew and resends it
/// with `replaces`; then they talk normally again.
fn recover(ks: &mut KeyServer, alice: &mut Dev, bob: &mut Dev, lost_id: [u8; 16], text: &str) {
    bob.e2e.forget_sessions("alice", 1);
    let (req, _) = bob.send(ks, alice, &recovery_request(lost_id));
    let asked = alice.recv(bob, &req).expect("recovery request decrypts");
    let Some(pb::e2e_payload::Kind::Recovery(r)) = asked.kind else { panic!("not a recovery: {asked:?}") };
    let failed: [u8; 16] = r.message_id.as_ref().try_into().expect("16 bytes");
    let mut resend = alice.e2e.sent_plaintext("bob", 1, &failed).expect("alice remembers it");
    resend.replaces = failed.to_vec().into();
    alice.e2e.forget_sessions("bob", 1);
    let (again, _) = alice.send(ks, bob, &resend);
    let got = bob.recv(alice, &again).expect("resend decrypts");
    assert_eq!(got.kind, Some(pb::e2e_payload::Kind::Text(text.into())));
    assert_eq!(got.replaces.as_ref(), lost_id);
    for i in 0..3 {
        let b = bob.send_text(ks, alice, &format!("b{i}"));
        assert_eq!(alice.recv_text(bob, &b), format!("b{i}"));
        let a = alice.send_text(ks, bob, &format!("a{i}"));
        assert_eq!(bob.recv_text(alice, &a), format!("a{i}"));
    }
}

#[test]
fn sent_plaintexts_are_kept_once_per_message_bounded_and_only_sealed() {
    let (_root, mut ks, mut devs) = setup(&[("alice", 1), ("bob", 1), ("bob", 2)]);
    let secret = "the-eagle-lands-at-midnight-7f3a";
    let (alice, rest) = devs.split_at_mut(1);
    let alice = &mut alice[0];
    let id = alice.message_id();
    for bob in rest.iter() {
        let claimed = ks.claim_verified("bob", bob.id.device_id);
        alice.e2e.encrypt(&alice.id, "bob", bob.id.device_id, Some(&claimed), &text_payload(secret), id).expect("enc");
    }
    alice.e2e.save().expect("save");
    assert_eq!(alice.e2e.sent.len("bob"), 1, "one record for both devices");
    let state = std::fs::read(alice.dir.join("e2e.state")).expect("state");
    let hex_secret = hex::encode(prost::Message::encode_to_vec(&text_payload(secret)));
    assert!(!contains(&state, secret.as_bytes()) && !contains(&state, hex_secret.as_bytes()));
    alice.restart();
    for device in [1, 2] {
        let p = alice.e2e.sent_plaintext("bob", device, &id).expect("kept");
        assert_eq!(p.kind, Some(pb::e2e_payload::Kind::Text(secret.into())));
    }
    assert!(alice.e2e.sent_plaintext("bob", 3, &id).is_none(), "not sent to device 3");
    assert!(alice.e2e.sent_plaintext("carol", 1, &id).is_none());
    for _ in 0..300 {
        let _ = alice.send_text(&mut ks, &rest[0], "x");
    }
    assert_eq!(alice.e2e.sent.len("bob"), crate::e2e::recovery::MAX_PER_PEER);
    assert!(alice.e2e.sent_plaintext("bob", 1, &id).is_none(), "the oldest went first");
}

#[test]
fn sent_plaintexts_older_than_seven_days_are_dropped() {
    let mut log = crate::e2e::recovery::SentLog::default();
    let day = 24 * 3600 * 1000;
    log.record(day, "bob", 1, &[1; 16], b"old");
    log.record(5 * day, "bob", 1, &[2; 16], b"newer");
    assert_eq!(log.find("bob", 1, &[1; 16]).as_deref(), Some(&b"old"[..]));
    log.prune(8 * day + 1);
    assert!(log.find("bob", 1, &[1; 16]).is_none());
    assert_eq!(log.find("bob", 1, &[2; 16]).as_deref(), Some(&b"newer"[..]));
    log.prune(13 * day);
    assert_eq!(log.len("bob"), 0);
}

#[test]
fn a_peer_with_a_new_account_is_accepted_and_its_old_sessions_dropped() {
    let (root, mut ks, mut devs) = setup(&[("alice", 1), ("bob", 1)]);
    let (alice, bob) = pair(&mut devs, 0, 1);
    let a = alice.send_text(&mut ks, bob, "old account");
    assert_eq!(bob.recv_text(alice, &a), "old account");
    let old = bob.e2e.peer_identity("alice", 1).expect("known");
    // Alice loses her end-to-end state; same login key, new account.
    std::fs::remove_dir_all(&alice.dir).expect("rm");
    alice.e2e = E2e::open(&alice.dir).expect("new account");
    alice.publish(&mut ks);
    let a = alice.send_text(&mut ks, bob, "new account");
    assert_eq!(bob.recv_text(alice, &a), "new account");
    let new = bob.e2e.peer_identity("alice", 1).expect("known");
    assert_ne!(old, new);
    assert_eq!(bob.e2e.peers[&alice.addr()].sessions.len(), 1);
    let b = bob.send_text(&mut ks, alice, "welcome back");
    assert_eq!(alice.recv_text(bob, &b), "welcome back");
    drop(root);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
