//! Everything a peer or the disk can get wrong gives a typed error, and the
//! state stays usable afterwards.

use std::os::unix::fs::PermissionsExt;

use bytes::Bytes;
use prost::Message as _;
use tern_protocol::pb;

use super::{text_payload, Dev, KeyServer};
use crate::e2e::{DecryptError, E2e, E2eError};
use crate::{generate_key, Identity};

fn two() -> (tempfile::TempDir, KeyServer, Dev, Dev) {
    let root = tempfile::tempdir().expect("tempdir");
    let mut ks = KeyServer::new(100);
    let mut alice = Dev::new(&root, "alice", 1);
    let mut bob = Dev::new(&root, "bob", 1);
    alice.publish(&mut ks);
    bob.publish(&mut ks);
    (root, ks, alice, bob)
}

fn envelope(body: &[u8]) -> pb::OlmEnvelope {
    pb::OlmEnvelope::decode(body).expect("envelope")
}

#[test]
fn a_tampered_ciphertext_fails_typed_and_the_genuine_one_still_decrypts() {
    let (_root, mut ks, mut alice, mut bob) = two();
    for round in 0..2 {
        // Round 0: a pre-key message; round 1: a normal one.
        let body = alice.send_text(&mut ks, &bob, "genuine");
        let mut env = envelope(&body);
        let mut c = env.ciphertext.to_vec();
        let at = c.len() - 20;
        c[at] ^= 0x01;
        env.ciphertext = c.into();
        let err = bob.recv(&alice, &env.encode_to_vec()).expect_err("tampered");
        assert!(matches!(err, DecryptError::Olm(_) | DecryptError::UnknownSession { .. }), "{round}: {err:?}");
        assert_eq!(bob.recv_text(&alice, &body), "genuine");
        let reply = bob.send_text(&mut ks, &alice, "reply");
        assert_eq!(alice.recv_text(&bob, &reply), "reply");
    }
}

#[test]
fn a_replayed_message_fails_typed() {
    let (_root, mut ks, mut alice, mut bob) = two();
    let first = alice.send_text(&mut ks, &bob, "once");
    assert_eq!(bob.recv_text(&alice, &first), "once");
    let err = bob.recv(&alice, &first).expect_err("pre-key replay");
    assert!(matches!(err, DecryptError::Olm(_)), "{err:?}");
    let reply = bob.send_text(&mut ks, &alice, "r");
    assert_eq!(alice.recv_text(&bob, &reply), "r");
    let normal = alice.send_text(&mut ks, &bob, "twice?");
    assert_eq!(bob.recv_text(&alice, &normal), "twice?");
    let err = bob.recv(&alice, &normal).expect_err("normal replay");
    assert!(matches!(err, DecryptError::Olm(vodozemac::olm::DecryptionError::MissingMessageKey(_))), "{err:?}");
}

#[test]
fn a_malformed_envelope_fails_typed() {
    let (_root, mut ks, mut alice, mut bob) = two();
    let good = alice.send_text(&mut ks, &bob, "x");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0xff, 0xff, 0xff], "not protobuf"),
        (pb::OlmEnvelope { version: 2, ..envelope(&good) }.encode_to_vec(), "version"),
        (pb::OlmEnvelope { message_type: 7, ..envelope(&good) }.encode_to_vec(), "type"),
        (pb::OlmEnvelope { ciphertext: Bytes::from_static(b"\x03junk"), ..envelope(&good) }.encode_to_vec(), "olm"),
        (pb::OlmEnvelope { message_type: 1, ciphertext: Bytes::new(), ..envelope(&good) }.encode_to_vec(), "empty"),
    ];
    for (body, what) in cases {
        let err = bob.recv(&alice, &body).expect_err(what);
        assert!(matches!(err, DecryptError::Malformed(_) | DecryptError::UnsupportedVersion(2)), "{what}: {err:?}");
    }
    let unknown = pb::OlmEnvelope { message_type: 1, ..envelope(&good) }.encode_to_vec();
    assert!(bob.recv(&alice, &unknown).is_err(), "a pre-key body as a normal message");
    assert_eq!(bob.recv_text(&alice, &good), "x");
}

#[test]
fn a_forged_or_missing_sender_identity_is_refused() {
    let (root, mut ks, mut alice, mut bob) = two();
    // Mallory makes her own account and signs identity keys as "alice 1"
    // with a login key that is not alice's.
    let mut mallory = Dev::new(&root, "mallory", 1);
    mallory.id = Identity { handle: "alice".into(), device_id: 1, signing_key: generate_key() };
    let forged = mallory.send_text(&mut ks, &bob, "i am alice");
    let err = bob.recv(&alice, &forged).expect_err("not alice's login key");
    assert!(matches!(err, DecryptError::BadIdentity { .. }), "{err:?}");
    // Alice's genuine identity keys pasted onto mallory's pre-key message.
    let genuine = alice.e2e.identity_keys(&alice.id);
    let pasted = pb::OlmEnvelope { sender_identity: Some(genuine), ..envelope(&forged) };
    let err = bob.recv(&alice, &pasted.encode_to_vec()).expect_err("key of another account");
    assert!(matches!(err, DecryptError::BadIdentity { .. }), "{err:?}");
    let stripped = pb::OlmEnvelope { sender_identity: None, ..envelope(&forged) };
    let err = bob.recv(&alice, &stripped.encode_to_vec()).expect_err("no identity");
    assert!(matches!(err, DecryptError::MissingIdentity { .. }), "{err:?}");
    assert!(!bob.e2e.has_session("alice", 1), "nothing was started");
    let real = alice.send_text(&mut ks, &bob, "really alice");
    assert_eq!(bob.recv_text(&alice, &real), "really alice");
}

#[test]
fn bad_claimed_keys_fail_typed() {
    let (_root, mut ks, _alice, _bob) = two();
    let good = ks.claim("bob", 1);
    assert!(E2e::verify_claimed(&good, "bob").is_ok());
    let mut bad_identity = good.clone();
    if let Some(i) = bad_identity.identity.as_mut() {
        let mut s = i.signature.to_vec();
        s[0] ^= 1;
        i.signature = s.into();
    }
    let mut bad_otk = good.clone();
    if let Some(k) = bad_otk.one_time_key.as_mut() {
        k.key_id += 1;
    }
    let as_fallback = pb::ClaimedKeys { fallback: true, ..good.clone() };
    let no_identity = pb::ClaimedKeys { identity: None, ..good.clone() };
    let no_otk = pb::ClaimedKeys { one_time_key: None, ..good.clone() };
    let short_key = pb::ClaimedKeys { device_key: Bytes::from_static(&[1; 31]), ..good.clone() };
    let sig = |e: &E2eError| matches!(e, E2eError::BadSignature { .. });
    assert!(E2e::verify_claimed(&bad_identity, "bob").is_err_and(|e| sig(&e)));
    assert!(E2e::verify_claimed(&bad_otk, "bob").is_err_and(|e| sig(&e)));
    assert!(E2e::verify_claimed(&as_fallback, "bob").is_err_and(|e| sig(&e)));
    assert!(E2e::verify_claimed(&good, "bobby").is_err_and(|e| sig(&e)), "another handle");
    assert!(E2e::verify_claimed(&no_identity, "bob").is_err_and(|e| matches!(e, E2eError::MissingKeys { .. })));
    assert!(E2e::verify_claimed(&no_otk, "bob").is_err_and(|e| matches!(e, E2eError::MissingKeys { .. })));
    assert!(E2e::verify_claimed(&short_key, "bob").is_err_and(|e| matches!(e, E2eError::BadKey { .. })));
}

#[test]
fn encrypt_without_session_or_with_keys_of_another_device_fails_typed() {
    let (_root, mut ks, mut alice, _bob) = two();
    let id = alice.message_id();
    let err = alice.e2e.encrypt(&alice.id, "bob", 1, None, &text_payload("x"), id).expect_err("no session");
    assert!(matches!(err, E2eError::NoSession { .. }), "{err:?}");
    let keys = ks.claim_verified("bob", 1);
    let err = alice.e2e.encrypt(&alice.id, "bob", 2, Some(&keys), &text_payload("x"), id).expect_err("wrong device");
    assert!(matches!(err, E2eError::WrongPeer { .. }), "{err:?}");
    assert!(!alice.e2e.has_session("bob", 2) && !alice.e2e.has_session("bob", 1));
}

#[test]
fn a_one_time_key_handed_out_twice_fails_on_the_second_session() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut ks = KeyServer::new(100);
    let (mut alice, mut bob, mut carol) =
        (Dev::new(&root, "alice", 1), Dev::new(&root, "bob", 1), Dev::new(&root, "carol", 1));
    for d in [&mut alice, &mut bob, &mut carol] {
        d.publish(&mut ks);
    }
    let claimed = ks.claim("bob", 1);
    let keys = E2e::verify_claimed(&claimed, "bob").expect("verify");
    let (mid_a, mid_c) = (alice.message_id(), carol.message_id());
    let a = alice.e2e.encrypt(&alice.id, "bob", 1, Some(&keys), &text_payload("from alice"), mid_a).expect("enc");
    let c = carol.e2e.encrypt(&carol.id, "bob", 1, Some(&keys), &text_payload("from carol"), mid_c).expect("enc");
    assert_eq!(bob.recv_text(&alice, &a), "from alice");
    let err = bob.recv(&carol, &c).expect_err("key already used");
    assert!(matches!(err, DecryptError::UnknownOneTimeKey { .. }), "{err:?}");
    // The same sender starting a second session on the used key fails too.
    alice.e2e.forget_sessions("bob", 1);
    let again = alice.e2e.encrypt(&alice.id, "bob", 1, Some(&keys), &text_payload("again"), mid_a).expect("enc");
    let err = bob.recv(&alice, &again).expect_err("key already used");
    assert!(matches!(err, DecryptError::UnknownOneTimeKey { .. }), "{err:?}");
}

#[test]
fn state_and_key_files_are_private() {
    let (root, _ks, alice, _bob) = two();
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&alice.dir.join("e2e.state")), 0o600);
    assert_eq!(mode(&alice.dir.join("e2e.key")), 0o600);
    assert_eq!(mode(&alice.dir), 0o700);
    assert!(!alice.dir.join(".e2e.state.tmp").exists());
    drop(root);
}

#[test]
fn a_damaged_state_or_key_file_fails_typed() {
    let (_root, mut ks, mut alice, bob) = two();
    let _ = alice.send_text(&mut ks, &bob, "something to keep");
    let state_path = alice.dir.join("e2e.state");
    let good = std::fs::read(&state_path).expect("state");
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let mut bad_magic = good.clone();
    bad_magic[0] ^= 1;
    for (bytes, what) in [
        (good[..good.len() - 1].to_vec(), "truncated by one"),
        (good[..10].to_vec(), "truncated to 10"),
        (Vec::new(), "empty"),
        (flipped, "bit flipped"),
        (bad_magic, "magic"),
    ] {
        std::fs::write(&state_path, &bytes).expect("write");
        let err = E2e::open(&alice.dir).expect_err(what);
        assert!(matches!(err, E2eError::Corrupt { .. }), "{what}: {err:?}");
    }
    std::fs::write(&state_path, &good).expect("write");
    let key_path = alice.dir.join("e2e.key");
    let key = std::fs::read(&key_path).expect("key");
    std::fs::write(&key_path, b"not hex").expect("write");
    assert!(matches!(E2e::open(&alice.dir), Err(E2eError::BadKeyFile(_))));
    let mut other_key = key.clone();
    other_key[0] = if other_key[0] == b'0' { b'1' } else { b'0' };
    std::fs::write(&key_path, &other_key).expect("write");
    assert!(matches!(E2e::open(&alice.dir), Err(E2eError::Corrupt { .. })), "another key");
    std::fs::remove_file(&key_path).expect("rm");
    assert!(matches!(E2e::open(&alice.dir), Err(E2eError::MissingKey(_))));
    std::fs::write(&key_path, &key).expect("write");
    alice.restart();
    assert!(alice.e2e.has_session("bob", 1), "the good state opens again");
}
