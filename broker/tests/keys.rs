//! The key service against real brokers: publishes checked signature by
//! signature, one-time keys handed out once under concurrent claims (also
//! through two brokers of a mesh), the fallback only when none is left,
//! the device told when its stock runs low, and claims rate-limited per
//! requester and target.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::cluster::TestCluster;
use common::{error_code, user, wait_for, Raw};
use ed25519_dalek::{Signer, SigningKey};
use tern_broker::store::QueueKey;
use tern_broker::Broker;
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use tern_protocol::{auth, ErrorCode};

/// A device's end-to-end account as the broker sees it: an identity
/// Ed25519 key that signs one-time keys. (The Curve25519 halves are
/// opaque to the broker: any 32 bytes.)
struct Keys {
    handle: String,
    device: u32,
    login: SigningKey,
    identity: SigningKey,
}

impl Keys {
    fn new(handle: &str, device: u32, login: &SigningKey) -> Self {
        Self { handle: handle.into(), device, login: login.clone(), identity: common::key() }
    }

    fn identity_keys(&self) -> pb::IdentityKeys {
        let (curve, ed) = ([7u8; 32], self.identity.verifying_key().to_bytes());
        let signed = auth::identity_keys(&self.handle, self.device, &curve, &ed);
        pb::IdentityKeys {
            curve25519: Bytes::copy_from_slice(&curve),
            ed25519: Bytes::copy_from_slice(&ed),
            signature: Bytes::copy_from_slice(&self.login.sign(&signed).to_bytes()),
        }
    }

    fn key(&self, id: u64, fallback: bool) -> pb::OneTimeKey {
        let mut public = [0u8; 32];
        public[..8].copy_from_slice(&id.to_be_bytes());
        public[8] = u8::from(fallback);
        let signed = auth::one_time_key(&self.handle, self.device, fallback, id, &public);
        pb::OneTimeKey {
            key_id: id,
            public_key: Bytes::copy_from_slice(&public),
            signature: Bytes::copy_from_slice(&self.identity.sign(&signed).to_bytes()),
        }
    }

    fn publish(&self, ids: impl IntoIterator<Item = u64>, fallback: Option<u64>) -> pb::PublishKeys {
        pb::PublishKeys {
            identity: Some(self.identity_keys()),
            one_time_keys: ids.into_iter().map(|id| self.key(id, false)).collect(),
            fallback_key: fallback.map(|id| self.key(id, true)),
        }
    }
}

async fn publish(raw: &mut Raw, p: pb::PublishKeys) -> S {
    let id = raw.request(C::PublishKeys(p)).await;
    raw.answer(id).await
}

async fn claim(raw: &mut Raw, handle: &str, devices: &[u32]) -> S {
    let id = raw.request(C::ClaimKeys(pb::ClaimKeys { handle: handle.into(), devices: devices.to_vec() })).await;
    raw.answer(id).await
}

fn stock_of(answer: &S) -> pb::KeyStock {
    match answer {
        S::KeysPublished(p) => p.stock.expect("a stock"),
        other => panic!("expected KeysPublished, got {other:?}"),
    }
}

/// The key a claim handed out for the one device asked for: (id, fallback).
fn claimed_key(answer: &S) -> Option<(u64, bool)> {
    match answer {
        S::KeysClaimed(c) => {
            let d = c.devices.first()?;
            d.one_time_key.as_ref().map(|k| (k.key_id, d.fallback))
        }
        other => panic!("expected KeysClaimed, got {other:?}"),
    }
}

/// `n` claimer connections, each a user of its own on `brokers[i % len]`.
async fn claimers(brokers: &[&Broker], n: usize) -> Vec<Raw> {
    let mut out = Vec::new();
    for i in 0..n {
        let (raw, _) = user(brokers[i % brokers.len()], &format!("claimer{i}")).await;
        out.push(raw);
    }
    out
}

/// Every claimer claims alice's device 1 `rounds` times, all at once;
/// returns every key handed out, as (id, fallback).
async fn claim_concurrently(claimers: Vec<Raw>, rounds: usize) -> Vec<(u64, bool)> {
    let tasks = claimers.into_iter().map(|mut raw| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..rounds {
                got.extend(claimed_key(&claim(&mut raw, "alice", &[1]).await));
            }
            got
        })
    });
    futures::future::join_all(tasks).await.into_iter().flat_map(|r| r.expect("claimer task")).collect()
}

/// Each one-time key went to one claimer only, all of them were handed
/// out, and the fallback only after the last.
fn assert_each_once(got: &[(u64, bool)], one_time: u64, claims: usize) {
    assert_eq!(got.len(), claims, "every claim got a key");
    let once: Vec<u64> = got.iter().filter(|(_, fallback)| !fallback).map(|(id, _)| *id).collect();
    let distinct: HashSet<u64> = once.iter().copied().collect();
    assert_eq!(distinct.len(), once.len(), "a one-time key was handed out twice: {once:?}");
    assert_eq!(distinct, (1..=one_time).collect(), "every one-time key was handed out");
    assert!(got.iter().filter(|(_, f)| *f).all(|(id, _)| *id == 1000), "only the fallback key as fallback");
    assert_eq!(got.iter().filter(|(_, f)| *f).count(), claims - one_time as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_get_each_one_time_key_once_then_the_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut alice, login) = user(&broker, "alice").await;
    let keys = Keys::new("alice", 1, &login);
    let stock = stock_of(&publish(&mut alice, keys.publish(1..=40, Some(1000))).await);
    assert_eq!((stock.one_time_keys, stock.identity, stock.fallback_key), (40, true, true));

    let got = claim_concurrently(claimers(&[&broker], 8).await, 6).await;
    assert_each_once(&got, 40, 48);
    let record = broker.store().key_record(&QueueKey::new("alice", 1)).unwrap().unwrap();
    assert!(record.one_time_keys.is_empty(), "the stock is empty");
    assert!(record.fallback_key.is_some(), "the fallback stays until replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_through_two_brokers_of_a_mesh_never_get_the_same_key() {
    let cluster = TestCluster::spawn(2).await;
    let (a, b) = (cluster.broker(0), cluster.broker(1));
    let (mut alice, login) = user(a, "alice").await;
    let keys = Keys::new("alice", 1, &login);
    assert_eq!(stock_of(&publish(&mut alice, keys.publish(1..=30, Some(1000))).await).one_time_keys, 30);

    let got = claim_concurrently(claimers(&[a, b], 6).await, 6).await;
    assert_each_once(&got, 30, 36);
    // The primary copied every change to the other member.
    let queue = QueueKey::new("alice", 1);
    let copied = wait_for(Duration::from_secs(5), || {
        let held = |broker: &Broker| broker.store().key_record(&queue).unwrap().map(|r| r.one_time_keys.len());
        held(a) == Some(0) && held(b) == Some(0)
    })
    .await;
    assert!(copied, "both brokers hold the emptied stock");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_with_any_bad_signature_is_refused_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut alice, login) = user(&broker, "alice").await;
    let keys = Keys::new("alice", 1, &login);
    let queue = QueueKey::new("alice", 1);

    let mut no_identity = keys.publish(1..=3, None);
    no_identity.identity = None;
    assert_eq!(error_code(&publish(&mut alice, no_identity).await), Some(ErrorCode::InvalidArgument));
    let mut forged = keys.publish(1..=3, None);
    forged.one_time_keys[2].public_key = Bytes::from(vec![9; 32]);
    assert_eq!(error_code(&publish(&mut alice, forged).await), Some(ErrorCode::BadSignature));
    let other_device = Keys::new("alice", 2, &login).publish(1..=3, None);
    assert_eq!(error_code(&publish(&mut alice, other_device).await), Some(ErrorCode::BadSignature));
    let mut not_mine = keys.publish(1..=3, None);
    not_mine.identity = Some(Keys::new("alice", 1, &common::key()).identity_keys());
    assert_eq!(error_code(&publish(&mut alice, not_mine).await), Some(ErrorCode::BadSignature));
    assert!(broker.store().key_record(&queue).unwrap().is_none(), "nothing stored");

    // Within the cap (100 by default) it is stored; beyond it, refused whole.
    assert_eq!(stock_of(&publish(&mut alice, keys.publish(1..=90, None)).await).one_time_keys, 90);
    assert_eq!(error_code(&publish(&mut alice, keys.publish(91..=111, None)).await), Some(ErrorCode::InvalidArgument));
    // A resent publish adds nothing: ids at or below the highest seen are skipped.
    assert_eq!(stock_of(&publish(&mut alice, keys.publish(1..=90, None)).await).one_time_keys, 90);
    let (mut bob, _) = user(&broker, "bob").await;
    match claim(&mut bob, "alice", &[]).await {
        S::KeysClaimed(c) => {
            assert_eq!(c.devices.len(), 1);
            let d = &c.devices[0];
            assert_eq!((d.device_id, d.one_time_key.as_ref().map(|k| k.key_id)), (1, Some(1)));
            assert_eq!(d.identity.as_ref(), Some(&keys.identity_keys()), "with the identity keys to check");
            assert_eq!(d.device_key.as_ref(), login.verifying_key().as_bytes(), "and the login key that signed them");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_name_devices_without_keys_and_refuse_unknown_ones() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (_alice, _) = user(&broker, "alice").await;
    let (mut bob, bob_login) = user(&broker, "bob").await;
    match claim(&mut bob, "alice", &[]).await {
        S::KeysClaimed(c) => assert_eq!((c.devices.len(), c.without_keys), (0, vec![1])),
        other => panic!("{other:?}"),
    }
    assert_eq!(error_code(&claim(&mut bob, "alice", &[2]).await), Some(ErrorCode::UnknownDevice));
    assert_eq!(error_code(&claim(&mut bob, "nobody", &[]).await), Some(ErrorCode::UnknownRecipient));
    assert_eq!(error_code(&claim(&mut bob, "Bad Handle", &[]).await), Some(ErrorCode::InvalidHandle));
    // A claim of one's own user leaves the asking device out.
    let keys = Keys::new("bob", 1, &bob_login);
    stock_of(&publish(&mut bob, keys.publish(1..=2, None)).await);
    match claim(&mut bob, "bob", &[]).await {
        S::KeysClaimed(c) => assert!(c.devices.is_empty() && c.without_keys.is_empty(), "{c:?}"),
        other => panic!("{other:?}"),
    }
}

/// Alice at `brokers[at]` publishes 3 keys over a low-water mark of 2 and
/// is told, once, when bob's claims take the stock below it.
async fn low_stock_is_pushed(brokers: &[&Broker], at: usize) {
    let (mut alice, login) = user(brokers[at], &format!("alice{at}")).await;
    let handle = format!("alice{at}");
    let keys = Keys::new(&handle, 1, &login);
    let stock = stock_of(&publish(&mut alice, keys.publish(1..=3, None)).await);
    assert_eq!((stock.one_time_keys, stock.low_water), (3, 2));
    let (mut bob, _) = user(brokers[(at + 1) % brokers.len()], &format!("bob{at}")).await;
    assert!(claimed_key(&claim(&mut bob, &handle, &[1]).await).is_some());
    assert!(alice.maybe_next(Duration::from_millis(300)).await.is_none(), "3 -> 2: not below 2 yet");
    assert!(claimed_key(&claim(&mut bob, &handle, &[1]).await).is_some());
    match alice.maybe_next(Duration::from_secs(5)).await.map(|f| (f.request_id, f.kind)) {
        Some((0, Some(S::KeyStock(s)))) => assert_eq!(s.one_time_keys, 1),
        other => panic!("expected a pushed KeyStock, got {other:?}"),
    }
    assert!(claimed_key(&claim(&mut bob, &handle, &[1]).await).is_some());
    assert!(alice.maybe_next(Duration::from_millis(300)).await.is_none(), "told once per crossing");
    // The next login says so too.
    let mut again = Raw::connect(brokers[at]).await;
    match again.login(&handle, 1, &login).await {
        S::LoginOk(ok) => assert_eq!(ok.key_stock.map(|s| s.one_time_keys), Some(0)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_told_when_claims_take_its_stock_below_the_low_water_mark() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.keys.low_water = 2;
    let broker = Broker::spawn(config).await.unwrap();
    low_stock_is_pushed(&[&broker], 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_low_stock_notice_reaches_a_device_at_another_broker_of_the_mesh() {
    let cluster = TestCluster::spawn_with(2, |_, c| c.keys.low_water = 2).await;
    let brokers = [cluster.broker(0), cluster.broker(1)];
    // One of the two handles has its primary at the other broker.
    low_stock_is_pushed(&brokers, 0).await;
    low_stock_is_pushed(&brokers, 1).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_rate_limited_per_requester_and_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.rate.exempt.clear();
    config.rate.key_claims_per_device_and_target = tern_broker::config::Rate::new(2, 60_000);
    let broker = Broker::spawn(config).await.unwrap();
    let (mut alice, login) = user(&broker, "alice").await;
    stock_of(&publish(&mut alice, Keys::new("alice", 1, &login).publish(1..=10, None)).await);
    let (_carol, _) = user(&broker, "carol").await;
    let (mut bob, _) = user(&broker, "bob").await;
    for _ in 0..2 {
        assert!(claimed_key(&claim(&mut bob, "alice", &[]).await).is_some());
    }
    let id = bob.request(C::ClaimKeys(pb::ClaimKeys { handle: "alice".into(), devices: vec![] })).await;
    match bob.answer(id).await {
        S::Error(e) => {
            assert_eq!(e.code(), ErrorCode::RateLimited);
            assert!(e.retry_after_ms > 50_000 && e.retry_after_ms <= 60_000, "one refill: {}", e.retry_after_ms);
        }
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
    assert!(matches!(claim(&mut bob, "carol", &[]).await, S::KeysClaimed(_)), "another target has its own bucket");
    let (mut dave, _) = user(&broker, "dave").await;
    assert!(claimed_key(&claim(&mut dave, "alice", &[]).await).is_some(), "another requester too");
    let record = broker.store().key_record(&QueueKey::new("alice", 1)).unwrap().unwrap();
    assert_eq!(record.one_time_keys.len(), 7, "the refused claim took nothing");
}
