//! Delivery contract, in process: online and offline delivery, restart,
//! idempotency, expiry, queue caps, receipts, multi-device copies.

mod common;

use std::time::Duration;

use common::*;
use tern_protocol::pb::{self, server_frame::Kind as S};
use tern_protocol::ErrorCode;

#[tokio::test]
async fn online_send_is_pushed_in_order_and_acked_with_receipts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (mut bob, _) = user(&broker, "bob").await;

    for n in 1..=50u64 {
        match alice.send_msg("bob", mid(n), format!("m{n}").as_bytes()).await {
            S::SendAck(ack) => {
                assert!(!ack.duplicate);
                assert_eq!(ack.recipients, 1);
            }
            other => panic!("send {n}: {other:?}"),
        }
    }
    let mut last = 0;
    for n in 1..=50u64 {
        let d = bob.deliver().await.expect("delivery");
        assert!(d.seq > last, "seq increases");
        last = d.seq;
        let m = message_of(&d);
        assert_eq!(m.body.as_ref(), format!("m{n}").as_bytes(), "FIFO order");
        assert_eq!((m.from.as_str(), m.from_device, m.to.as_str()), ("alice", 1, "bob"));
    }
    bob.ack(last).await;
    // Alice gets one delivered receipt per message, in order.
    for n in 1..=50u64 {
        let d = alice.deliver().await.expect("receipt");
        match d.item {
            Some(pb::deliver::Item::Receipt(r)) => {
                assert_eq!(r.message_id.as_ref(), mid(n));
                assert_eq!((r.handle.as_str(), r.device), ("bob", 1));
            }
            other => panic!("expected a receipt, got {other:?}"),
        }
    }
    broker.shutdown().await;
}

/// Issue 12: a sender may ask for no delivered receipt (`Send.no_receipt`,
/// for read receipts and control messages): its message is delivered and
/// acknowledged like any other, and the sender hears nothing of it. The
/// message after it, asking for one, gets its receipt, so the first one's
/// is not merely late.
#[tokio::test]
async fn a_send_asking_for_no_receipt_gets_none_and_the_next_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (mut bob, _) = user(&broker, "bob").await;
    assert!(matches!(alice.send_msg_with("bob", mid(1), b"read 7", true).await, S::SendAck(_)));
    assert!(matches!(alice.send_msg("bob", mid(2), b"hello").await, S::SendAck(_)));
    let quiet = bob.deliver().await.expect("the first message");
    assert_eq!(message_of(&quiet).message_id.as_ref(), mid(1));
    assert!(message_of(&quiet).no_receipt, "the recipient sees the sender asked for none");
    let loud = bob.deliver().await.expect("the second message");
    assert!(!message_of(&loud).no_receipt);
    bob.ack(loud.seq).await;
    match alice.deliver().await.expect("a receipt").item {
        Some(pb::deliver::Item::Receipt(r)) => assert_eq!(r.message_id.as_ref(), mid(2), "only the second's"),
        other => panic!("expected a receipt, got {other:?}"),
    }
    let more = alice.maybe_next(Duration::from_millis(300)).await;
    assert!(more.is_none(), "nothing else for alice: {more:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn offline_messages_are_delivered_on_login_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (mut alice, akey) = user(&broker, "alice").await;
    let (bob, bkey) = user(&broker, "bob").await;
    drop(bob);
    for n in 1..=20u64 {
        assert!(matches!(alice.send_msg("bob", mid(n), b"x").await, S::SendAck(_)));
    }
    drop(alice);
    broker.shutdown().await;

    let broker = start(dir.path()).await;
    let mut bob = Raw::connect(&broker).await;
    match bob.login("bob", 1, &bkey).await {
        S::LoginOk(ok) => assert_eq!(ok.pending, 20),
        other => panic!("{other:?}"),
    }
    let mut seqs = Vec::new();
    for n in 1..=20u64 {
        let d = bob.deliver().await.expect("pending delivery after restart");
        assert_eq!(message_of(&d).message_id.as_ref(), mid(n));
        seqs.push(d.seq);
    }
    // Ack half, reconnect: exactly the other half comes again.
    bob.ack(seqs[9]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(bob);
    let mut bob = Raw::connect(&broker).await;
    assert!(matches!(bob.login("bob", 1, &bkey).await, S::LoginOk(ok) if ok.pending == 10 && ok.acked_seq == seqs[9]));
    for n in 11..=20u64 {
        let d = bob.deliver().await.unwrap();
        assert_eq!(message_of(&d).message_id.as_ref(), mid(n), "unacked redelivered in order");
    }
    assert!(bob.maybe_next(Duration::from_millis(300)).await.is_none(), "nothing acked comes back");
    let _ = akey;
    broker.shutdown().await;
}

#[tokio::test]
async fn resend_with_same_id_is_acked_again_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (bob, bkey) = user(&broker, "bob").await;
    drop(bob);
    let first = alice.send_msg("bob", mid(1), b"once").await;
    let S::SendAck(first) = first else { panic!("{first:?}") };
    for _ in 0..3 {
        match alice.send_msg("bob", mid(1), b"once").await {
            S::SendAck(again) => {
                assert!(again.duplicate);
                assert_eq!(again.accepted_at_ms, first.accepted_at_ms);
            }
            other => panic!("{other:?}"),
        }
    }
    // Also across a restart of the broker.
    drop(alice);
    broker.shutdown().await;
    let broker = start(dir.path()).await;
    let mut bob = Raw::connect(&broker).await;
    assert!(matches!(bob.login("bob", 1, &bkey).await, S::LoginOk(ok) if ok.pending == 1));
    bob.deliver().await.unwrap();
    assert!(bob.maybe_next(Duration::from_millis(300)).await.is_none(), "stored once");
    broker.shutdown().await;
}

#[tokio::test]
async fn expired_messages_are_dropped_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.store.retention_secs = 1;
    cfg.store.sweep_interval_secs = 1;
    let broker = tern_broker::Broker::spawn(cfg).await.unwrap();
    let (mut alice, _) = user(&broker, "alice").await;
    let (bob, bkey) = user(&broker, "bob").await;
    drop(bob);
    assert!(matches!(alice.send_msg("bob", mid(1), b"old").await, S::SendAck(_)));
    let store = broker.store().clone();
    let q = tern_broker::store::QueueKey::new("bob", 1);
    let mut expired = false;
    for _ in 0..100 {
        if store.bounds(q.clone()).await.unwrap().depth() == 0 {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expired, "the sweeper removed the message after the 1 s retention");
    let mut bob = Raw::connect(&broker).await;
    assert!(matches!(bob.login("bob", 1, &bkey).await, S::LoginOk(ok) if ok.pending == 0));
    assert!(bob.maybe_next(Duration::from_millis(300)).await.is_none());
    broker.shutdown().await;
}

#[tokio::test]
async fn full_queue_fails_the_send_with_queue_full_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.store.max_queue_len = 3;
    let broker = tern_broker::Broker::spawn(cfg).await.unwrap();
    let (mut alice, _) = user(&broker, "alice").await;
    let (bob, bkey) = user(&broker, "bob").await;
    drop(bob);
    for n in 1..=3 {
        assert!(matches!(alice.send_msg("bob", mid(n), b"x").await, S::SendAck(_)));
    }
    let refused = alice.send_msg("bob", mid(4), b"x").await;
    assert_eq!(error_code(&refused), Some(ErrorCode::QueueFull), "{refused:?}");
    let mut bob = Raw::connect(&broker).await;
    assert!(matches!(bob.login("bob", 1, &bkey).await, S::LoginOk(ok) if ok.pending == 3));
    let mut last = 0;
    for _ in 0..3 {
        last = bob.deliver().await.unwrap().seq;
    }
    bob.ack(last).await;
    // Room again: the refused id was not recorded, so it is accepted now.
    let mut accepted = false;
    for _ in 0..50 {
        if let S::SendAck(a) = alice.send_msg("bob", mid(4), b"x").await {
            assert!(!a.duplicate);
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted);
    broker.shutdown().await;
}

#[tokio::test]
async fn unknown_recipient_and_bad_arguments_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let r = alice.send_msg("nobody", mid(1), b"x").await;
    assert_eq!(error_code(&r), Some(ErrorCode::UnknownRecipient));
    let r = alice.send_msg("Bad Handle", mid(2), b"x").await;
    assert_eq!(error_code(&r), Some(ErrorCode::InvalidHandle));
    let id = alice
        .request(pb::client_frame::Kind::Send(pb::Send {
            message_id: vec![1, 2].into(),
            to: "alice".into(),
            body: "x".into(),
            no_receipt: false,
            ..Default::default()
        }))
        .await;
    assert_eq!(error_code(&alice.answer(id).await), Some(ErrorCode::InvalidArgument));
    let big = vec![0u8; tern_protocol::DEFAULT_MAX_BODY_LEN + 1];
    let r = alice.send_msg("alice", mid(3), &big).await;
    assert_eq!(error_code(&r), Some(ErrorCode::PayloadTooLarge));
    // The connection still works after request-level errors.
    let id = alice.request(pb::client_frame::Kind::Ping(pb::Ping { nonce: 9 })).await;
    assert!(matches!(alice.answer(id).await, S::Pong(p) if p.nonce == 9));
    broker.shutdown().await;
}

#[tokio::test]
async fn every_device_gets_the_message_and_the_senders_other_devices_a_copy() {
    use ed25519_dalek::Signer;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (mut alice1, akey1) = user(&broker, "alice").await;
    let (mut bob1, bkey1) = user(&broker, "bob").await;

    // Link a second device to each user, approved by device 1.
    let link = |handle: &'static str, approver: ed25519_dalek::SigningKey| {
        let broker = &broker;
        async move {
            let new_key = key();
            let pk = new_key.verifying_key().to_bytes();
            let expires = tern_broker::store::now_ms() + 60_000;
            let approval_sig = approver.sign(&tern_protocol::auth::approval(handle, &pk, expires));
            let mut raw = Raw::connect(broker).await;
            let c = raw.hello().await;
            let nonce: [u8; 32] = c.nonce.as_ref().try_into().unwrap();
            let t = tern_protocol::auth::transcript(
                tern_protocol::auth::Purpose::LinkDevice,
                &raw.exporter(),
                &nonce,
                handle,
                0,
                &pk,
            );
            let req = pb::LinkDevice {
                handle: handle.into(),
                public_key: pk.to_vec().into(),
                nonce: c.nonce,
                signature: new_key.sign(&t).to_bytes().to_vec().into(),
                approval: Some(pb::DeviceApproval {
                    approver_device_id: 1,
                    expires_at_ms: expires,
                    signature: approval_sig.to_bytes().to_vec().into(),
                }),
            };
            let id = raw.request(pb::client_frame::Kind::LinkDevice(req)).await;
            match raw.answer(id).await {
                S::LoginOk(ok) => assert_eq!(ok.device_id, 2),
                other => panic!("link: {other:?}"),
            }
            raw
        }
    };
    let mut alice2 = link("alice", akey1.clone()).await;
    let mut bob2 = link("bob", bkey1.clone()).await;

    match alice1.send_msg("bob", mid(1), b"hi").await {
        S::SendAck(a) => assert_eq!(a.recipients, 3, "bob/1, bob/2 and alice/2"),
        other => panic!("{other:?}"),
    }
    for raw in [&mut bob1, &mut bob2, &mut alice2] {
        let d = raw.deliver().await.expect("a copy for every device");
        let m = message_of(&d);
        assert_eq!((m.from.as_str(), m.from_device, m.to.as_str(), m.body.as_ref()), ("alice", 1, "bob", &b"hi"[..]));
    }
    assert!(alice1.maybe_next(Duration::from_millis(200)).await.is_none(), "no copy to the sending device");
    broker.shutdown().await;
}

/// Pipelined sends keep their order when the store writer's queue is full:
/// each device's sends are queued for the writer in the order they arrived,
/// however many wait for room at once. Regression: sends used to wait for
/// room concurrently, and whichever was polled first after room freed up
/// went first, so an overloaded broker stored some out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_keep_their_order_when_the_writer_is_saturated() {
    const SENDERS: usize = 12;
    const EACH: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // The writer's queue holds 4 x 64 requests and the senders pipeline
    // 12 x 1000: most sends wait for room, and each commit frees room for
    // up to 64 of them at once.
    cfg.store.max_batch = 64;
    cfg.limits.max_pending_sends = 1000;
    let broker = tern_broker::Broker::spawn(cfg).await.unwrap();
    let (bob, bkey) = user(&broker, "bob").await;
    drop(bob);
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        senders.push(user(&broker, &format!("sender{s}")).await.0);
    }
    let pipelines = senders.into_iter().enumerate().map(|(s, mut raw)| async move {
        let mut bytes = Vec::new();
        for n in 1..=EACH {
            let send = pb::Send {
                message_id: bytes::Bytes::copy_from_slice(&mid(s as u64 * 1_000_000 + n)),
                to: "bob".into(),
                body: bytes::Bytes::from(format!("{s}:{n}")),
                no_receipt: false,
                ..Default::default()
            };
            let frame = pb::ClientFrame { request_id: 1000 + n, kind: Some(pb::client_frame::Kind::Send(send)) };
            bytes.extend(tern_protocol::codec::encode_to_vec(&frame, 1 << 20).unwrap());
        }
        raw.write_raw(&bytes).await;
        let mut acked = 0;
        while acked < EACH {
            match raw.next().await.expect("an answer").kind {
                Some(S::SendAck(_)) => acked += 1,
                other => panic!("sender{s}: {other:?}"),
            }
        }
        raw
    });
    let _senders = futures::future::join_all(pipelines).await;

    let mut bob = Raw::connect(&broker).await;
    assert!(matches!(bob.login("bob", 1, &bkey).await, S::LoginOk(_)));
    let mut last = [0u64; SENDERS];
    let mut got = 0;
    while got < SENDERS as u64 * EACH {
        let d = bob.deliver().await.expect("delivery");
        let body = String::from_utf8(message_of(&d).body.to_vec()).unwrap();
        let (s, n) = body.split_once(':').unwrap();
        let (s, n): (usize, u64) = (s.parse().unwrap(), n.parse().unwrap());
        assert_eq!(n, last[s] + 1, "sender{s}'s message {n} arrived after {}", last[s]);
        last[s] = n;
        got += 1;
        if got % 256 == 0 {
            bob.ack(d.seq).await;
        }
    }
    broker.shutdown().await;
}
