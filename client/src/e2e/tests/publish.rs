//! Publishing keys: the stock is filled up to the cap, unanswered keys are
//! offered again unchanged, the fallback key serves when one-time keys run
//! out and keeps serving across a rotation.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use tern_protocol::{auth, pb};

use super::{text_payload, Dev, KeyServer};
use crate::e2e::E2e;

fn ids(p: &pb::PublishKeys) -> Vec<u64> {
    p.one_time_keys.iter().map(|k| k.key_id).collect()
}

#[test]
fn keys_are_signed_capped_and_offered_again_until_marked() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut ks = KeyServer::new(100);
    let mut alice = Dev::new(&root, "alice", 1);
    let stock = ks.stock(&alice.addr());
    let first = alice.e2e.keys_to_publish(&alice.id, &stock).expect("something to publish");
    assert_eq!(first.one_time_keys.len(), 50, "vodozemac's cap, below the broker's 100");
    assert!(!ids(&first).contains(&0), "key id 0 is never published");
    let again = alice.e2e.keys_to_publish(&alice.id, &stock).expect("still unpublished");
    assert_eq!(again, first, "an unanswered publish is offered again unchanged");

    let identity = first.identity.clone().expect("identity");
    let login = VerifyingKey::from_bytes(&alice.id.public_key()).expect("key");
    let curve: [u8; 32] = identity.curve25519.as_ref().try_into().expect("32");
    let ed: [u8; 32] = identity.ed25519.as_ref().try_into().expect("32");
    let sig = Signature::from_slice(&identity.signature).expect("sig");
    assert!(login.verify(&auth::identity_keys("alice", 1, &curve, &ed), &sig).is_ok());
    let account = VerifyingKey::from_bytes(&ed).expect("key");
    let fallback = first.fallback_key.clone().expect("a fallback key");
    for (k, is_fallback) in first.one_time_keys.iter().map(|k| (k, false)).chain([(&fallback, true)]) {
        let pk: [u8; 32] = k.public_key.as_ref().try_into().expect("32");
        let sig = Signature::from_slice(&k.signature).expect("sig");
        assert!(account.verify(&auth::one_time_key("alice", 1, is_fallback, k.key_id, &pk), &sig).is_ok());
    }

    ks.publish(&alice.id, first.clone());
    alice.e2e.mark_published();
    alice.e2e.save().expect("save");
    assert_eq!(alice.e2e.keys_to_publish(&alice.id, &ks.stock(&alice.addr())), None, "stock full");
    for _ in 0..7 {
        ks.claim("alice", 1);
    }
    let more = alice.e2e.keys_to_publish(&alice.id, &ks.stock(&alice.addr())).expect("refill");
    alice.e2e.save().expect("saved before sending");
    assert_eq!(more.one_time_keys.len(), 7);
    assert!(ids(&more).iter().all(|id| id > ids(&first).iter().max().expect("ids")), "ids only grow");
    assert!(more.fallback_key.is_none(), "the broker has the fallback");
    // The answer is lost and the device restarts: the same keys again.
    alice.restart();
    let resent = alice.e2e.keys_to_publish(&alice.id, &ks.stock(&alice.addr())).expect("resend");
    assert_eq!(ids(&resent), ids(&more));
    ks.publish(&alice.id, resent.clone());
    ks.publish(&alice.id, resent); // twice: ignored by id
    alice.e2e.mark_published();
    assert_eq!(ks.stock(&alice.addr()).one_time_keys, 50);

    alice.e2e.rotate_fallback_key();
    let rotated = alice.e2e.keys_to_publish(&alice.id, &ks.stock(&alice.addr())).expect("new fallback");
    assert!(rotated.one_time_keys.is_empty());
    assert_ne!(rotated.fallback_key.as_ref().map(|k| &k.public_key), Some(&fallback.public_key));
    ks.publish(&alice.id, rotated.clone());
    alice.e2e.mark_published();

    // By age: not within the week, then once after it; the age survives a restart.
    const WEEK: u64 = 7 * 24 * 3600 * 1000;
    let now = crate::identity::now_ms();
    alice.e2e.save().expect("save");
    alice.restart();
    assert!(!alice.e2e.rotate_fallback_if_older(now + WEEK / 2, WEEK), "young enough");
    assert_eq!(alice.e2e.keys_to_publish(&alice.id, &ks.stock(&alice.addr())), None, "nothing to publish");
    assert!(alice.e2e.rotate_fallback_if_older(now + 2 * WEEK, WEEK), "older than a week");
    let aged = alice.e2e.keys_to_publish(&alice.id, &ks.stock(&alice.addr())).expect("the new fallback");
    assert_ne!(aged.fallback_key.as_ref().map(|k| &k.public_key), rotated.fallback_key.as_ref().map(|k| &k.public_key));
    assert!(!alice.e2e.rotate_fallback_if_older(now + 2 * WEEK + 1, WEEK), "and not again at once");
}

#[test]
fn a_new_account_publishes_in_full_over_an_old_accounts_stock() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut ks = KeyServer::new(50);
    let mut alice = Dev::new(&root, "alice", 1);
    alice.publish(&mut ks);
    std::fs::remove_dir_all(&alice.dir).expect("rm");
    alice.e2e = E2e::open(&alice.dir).expect("new account");
    let stock = ks.stock(&alice.addr());
    assert_eq!((stock.one_time_keys, stock.identity, stock.fallback_key), (50, true, true));
    let p = alice.e2e.keys_to_publish(&alice.id, &stock).expect("publish");
    assert_eq!((p.one_time_keys.len(), p.fallback_key.is_some()), (50, true));
    ks.publish(&alice.id, p);
    alice.e2e.mark_published();
    assert_eq!(ks.stock(&alice.addr()).one_time_keys, 50, "the old account's keys were replaced");
}

#[test]
fn the_fallback_key_serves_when_one_time_keys_run_out_and_after_rotation() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut ks = KeyServer::new(2);
    let mut bob = Dev::new(&root, "bob", 1);
    bob.publish(&mut ks);
    let mut senders: Vec<Dev> = (1..=5).map(|d| Dev::new(&root, "alice", d)).collect();
    let mut claims = Vec::new();
    for s in &mut senders {
        s.publish(&mut ks);
        claims.push(ks.claim("bob", 1));
    }
    assert_eq!(claims.iter().filter(|c| c.fallback).count(), 3, "two one-time keys, then the fallback");
    let mut bodies = Vec::new();
    for (i, (s, c)) in senders.iter_mut().zip(&claims).enumerate() {
        if i == 4 {
            // Bob rotates before the last sender's message arrives.
            bob.e2e.rotate_fallback_key();
            bob.publish(&mut ks);
        }
        let keys = E2e::verify_claimed(c, "bob").expect("verify");
        assert_eq!(keys.fallback, c.fallback);
        let id = s.message_id();
        bodies.push(s.e2e.encrypt(&s.id, "bob", 1, Some(&keys), &text_payload(&format!("s{i}")), id).expect("enc"));
    }
    for (i, (s, body)) in senders.iter().zip(&bodies).enumerate() {
        assert_eq!(bob.recv_text(s, body), format!("s{i}"), "sender {i}");
    }
    assert!(!ks.claim("bob", 1).fallback && !ks.claim("bob", 1).fallback, "the publish refilled the stock");
    let after = ks.claim("bob", 1);
    assert!(after.fallback, "the rotated fallback is handed out");
    assert_ne!(after.one_time_key, claims[4].one_time_key);
}
