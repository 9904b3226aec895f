//! What bad input gets: login failures, acting as another device, and
//! malformed, oversized or unknown frames, which close only their own
//! connection.

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::*;
use ed25519_dalek::Signer;
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use tern_protocol::ErrorCode;

#[tokio::test]
async fn login_with_a_bad_signature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (_alice, _) = user(&broker, "alice").await;
    let mut raw = Raw::connect(&broker).await;
    let r = raw.login("alice", 1, &key()).await;
    assert_eq!(error_code(&r), Some(ErrorCode::BadSignature), "{r:?}");
    // Still unauthenticated: a send is refused and nothing stored.
    let r = raw.send_msg("alice", mid(1), b"x").await;
    assert_eq!(error_code(&r), Some(ErrorCode::Unauthenticated));
    broker.shutdown().await;
}

#[tokio::test]
async fn login_as_an_unknown_device_or_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (_alice, akey) = user(&broker, "alice").await;
    let mut raw = Raw::connect(&broker).await;
    assert_eq!(error_code(&raw.login("alice", 2, &akey).await), Some(ErrorCode::UnknownDevice));
    let mut raw = Raw::connect(&broker).await;
    assert_eq!(error_code(&raw.login("mallory", 1, &akey).await), Some(ErrorCode::UnknownDevice));
    broker.shutdown().await;
}

#[tokio::test]
async fn a_login_replayed_on_another_connection_or_nonce_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (_alice, akey) = user(&broker, "alice").await;

    // A valid login captured from one connection...
    let mut victim = Raw::connect(&broker).await;
    let captured = victim.login_request("alice", 1, &akey).await;

    // ...replayed on another connection, with that connection's own fresh
    // challenge: the nonce does not match.
    let mut attacker = Raw::connect(&broker).await;
    attacker.hello().await;
    let id = attacker.request(C::Login(captured.clone())).await;
    assert_eq!(error_code(&attacker.answer(id).await), Some(ErrorCode::InvalidChallenge));

    // ...replayed with the nonce swapped for the attacker's: the signature
    // covers the nonce and the TLS exporter, so it fails.
    let challenge = attacker.hello().await;
    let mut forged = captured.clone();
    forged.nonce = challenge.nonce;
    let id = attacker.request(C::Login(forged)).await;
    assert_eq!(error_code(&attacker.answer(id).await), Some(ErrorCode::BadSignature));

    // The victim's own login works once; the same nonce cannot be used twice.
    let id = victim.request(C::Login(captured.clone())).await;
    assert!(matches!(victim.answer(id).await, S::LoginOk(_)));
    let mut again = Raw::connect(&broker).await;
    let id = again.request(C::Login(captured)).await;
    assert_eq!(error_code(&again.answer(id).await), Some(ErrorCode::InvalidChallenge));
    broker.shutdown().await;
}

#[tokio::test]
async fn too_many_failed_logins_close_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (_alice, _) = user(&broker, "alice").await;
    let mut raw = Raw::connect(&broker).await;
    for _ in 0..2 {
        assert_eq!(error_code(&raw.login("alice", 1, &key()).await), Some(ErrorCode::BadSignature));
    }
    let req = raw.login_request("alice", 1, &key()).await;
    raw.request(C::Login(req)).await;
    let mut codes = Vec::new();
    while let Some(f) = raw.next().await {
        if let Some(S::Error(e)) = f.kind {
            codes.push(e.code());
        }
    }
    assert_eq!(codes, vec![ErrorCode::BadSignature, ErrorCode::Unauthenticated]);
    broker.shutdown().await;
}

#[tokio::test]
async fn registration_needs_a_valid_handle_a_free_handle_and_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.registration.token = Some("let-me-in".into());
    let broker = tern_broker::Broker::spawn(cfg).await.unwrap();
    let mut raw = Raw::connect(&broker).await;
    assert_eq!(error_code(&raw.register("alice", &key()).await), Some(ErrorCode::RegistrationDenied));
    let mut raw = Raw::connect(&broker).await;
    assert_eq!(error_code(&raw.register("Al!ce", &key()).await), Some(ErrorCode::InvalidHandle));
    broker.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (_alice, _) = user(&broker, "alice").await;
    let mut raw = Raw::connect(&broker).await;
    assert_eq!(error_code(&raw.register("alice", &key()).await), Some(ErrorCode::HandleTaken));
    broker.shutdown().await;
}

#[tokio::test]
async fn a_device_cannot_act_as_another() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (mut bob, bkey) = user(&broker, "bob").await;
    let (mut carol, _) = user(&broker, "carol").await;

    // Alice sends to bob; the message names alice as sender, whatever the
    // payload says: identity comes from the login only.
    assert!(matches!(alice.send_msg("bob", mid(1), b"from alice").await, S::SendAck(_)));
    let d = bob.deliver().await.unwrap();
    assert_eq!(message_of(&d).from, "alice");
    let bob_seq = d.seq;

    // Carol acks a high seq: it only touches her own (empty) queue, and
    // nothing is pushed to her.
    carol.ack(u64::MAX).await;
    assert!(carol.maybe_next(Duration::from_millis(300)).await.is_none(), "carol reads nothing of bob's");

    // Bob's message is still there for bob after reconnecting (carol's ack
    // did not delete it, and bob never acked).
    drop(bob);
    let mut bob = Raw::connect(&broker).await;
    assert!(matches!(bob.login("bob", 1, &bkey).await, S::LoginOk(ok) if ok.pending == 1));
    assert_eq!(bob.deliver().await.unwrap().seq, bob_seq);
    broker.shutdown().await;
}

#[tokio::test]
async fn acking_beyond_what_was_pushed_deletes_nothing_unseen() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_inflight = 2;
    let broker = tern_broker::Broker::spawn(cfg).await.unwrap();
    let (mut alice, _) = user(&broker, "alice").await;
    let (bob, bkey) = user(&broker, "bob").await;
    drop(bob);
    for n in 1..=5 {
        assert!(matches!(alice.send_msg("bob", mid(n), b"x").await, S::SendAck(_)));
    }
    let mut bob = Raw::connect(&broker).await;
    bob.login("bob", 1, &bkey).await;
    let first = bob.deliver().await.unwrap().seq;
    bob.deliver().await.unwrap();
    assert!(bob.maybe_next(Duration::from_millis(200)).await.is_none(), "window of 2");
    bob.ack(u64::MAX).await;
    // Only the two pushed were deleted; the other three follow, in order.
    for n in 3..=5 {
        let d = bob.deliver().await.unwrap();
        assert_eq!(message_of(&d).message_id.as_ref(), mid(n));
        assert!(d.seq > first);
        bob.ack(d.seq).await;
    }
    broker.shutdown().await;
}

/// Each kind of bad frame gets a typed error and closes its connection,
/// while another client's session carries on.
#[tokio::test]
async fn bad_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (mut bob, _) = user(&broker, "bob").await;

    let mut garbage = BytesMut::new();
    garbage.put_u32(5);
    garbage.put_slice(&[0xff, 0xff, 0xff, 0xff, 0xff]);
    let mut oversized = BytesMut::new();
    oversized.put_u32(u32::MAX);
    let unknown = tern_protocol::codec::encode_to_vec(&pb::ClientFrame { request_id: 1, kind: None }, 1024).unwrap();
    let cases: Vec<(&[u8], ErrorCode)> = vec![
        (&garbage, ErrorCode::MalformedFrame),
        (&oversized, ErrorCode::FrameTooLarge),
        (&unknown, ErrorCode::UnknownFrame),
    ];
    for (n, (bytes, code)) in cases.into_iter().enumerate() {
        let mut bad = Raw::connect(&broker).await;
        bad.write_raw(bytes).await;
        let frame = bad.next().await.expect("an error frame before the close");
        assert_eq!(error_code(&frame.kind.unwrap()), Some(code));
        assert_eq!(frame.request_id, 0, "a connection-level error");
        let closed = tokio::time::timeout(TIMEOUT, bad.conn.closed()).await.expect("connection closed");
        assert!(
            matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == (code as u32).into()),
            "{closed:?}"
        );

        // Everyone else is unaffected.
        assert!(matches!(alice.send_msg("bob", mid(n as u64), b"still here").await, S::SendAck(_)));
        assert_eq!(message_of(&bob.deliver().await.unwrap()).body.as_ref(), b"still here");
    }

    // A frame valid only after login, before login: a request error, not a close.
    let mut early = Raw::connect(&broker).await;
    let r = early.send_msg("bob", mid(99), b"x").await;
    assert_eq!(error_code(&r), Some(ErrorCode::Unauthenticated));
    // Hello after login is a protocol violation: a connection-level error.
    alice.request(C::Hello(pb::Hello { version: 1, client_name: String::new() })).await;
    let frame = alice.next().await.expect("an error frame");
    assert_eq!(frame.request_id, 0);
    assert_eq!(error_code(&frame.kind.unwrap()), Some(ErrorCode::ProtocolViolation));
    assert!(alice.next().await.is_none(), "then the connection closes");
    broker.shutdown().await;
}

#[tokio::test]
async fn a_device_approval_must_be_signed_by_an_existing_device() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (_alice, _akey) = user(&broker, "alice").await;
    let new_key = key();
    let pk = new_key.verifying_key().to_bytes();
    let expires = tern_broker::store::now_ms() + 60_000;
    let forged = key().sign(&tern_protocol::auth::approval("alice", &pk, expires));
    let mut raw = Raw::connect(&broker).await;
    let c = raw.hello().await;
    let nonce: [u8; 32] = c.nonce.as_ref().try_into().unwrap();
    let t = tern_protocol::auth::transcript(
        tern_protocol::auth::Purpose::LinkDevice,
        &raw.exporter(),
        &nonce,
        "alice",
        0,
        &pk,
    );
    let req = pb::LinkDevice {
        handle: "alice".into(),
        public_key: pk.to_vec().into(),
        nonce: c.nonce,
        signature: new_key.sign(&t).to_bytes().to_vec().into(),
        approval: Some(pb::DeviceApproval {
            approver_device_id: 1,
            expires_at_ms: expires,
            signature: forged.to_bytes().to_vec().into(),
        }),
    };
    let id = raw.request(C::LinkDevice(req)).await;
    assert_eq!(error_code(&raw.answer(id).await), Some(ErrorCode::BadApproval));
    let account = broker.store().account("alice").unwrap().unwrap();
    assert_eq!(account.devices.len(), 1, "nothing stored");
    broker.shutdown().await;
}
