//! Device lists against real brokers: per-device sends (one envelope per
//! device, checked against the versioned device lists and refused whole
//! with `DEVICES_CHANGED` when they are not current), `to_device` sends,
//! unlinking (who may, what it does to the device's connection, login,
//! queue and the list's version, also across a mesh) and the device cap.

mod common;

use bytes::Bytes;
use common::cluster::{node, TestCluster};
use common::{error_code, key, message_of, mid, user, Raw, TIMEOUT};
use ed25519_dalek::{Signer, SigningKey};
use tern_broker::store::QueueKey;
use tern_broker::Broker;
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use tern_protocol::{auth, ErrorCode};

/// Links a new device to `handle`, approved by `approver_device` (whose
/// login key is `approver`); returns the connection, logged in as the new
/// device, its key and the broker's answer.
async fn try_link(broker: &Broker, handle: &str, approver: &SigningKey, approver_device: u32) -> (Raw, SigningKey, S) {
    let new_key = key();
    let pk = new_key.verifying_key().to_bytes();
    let expires = tern_broker::store::now_ms() + 60_000;
    let approval = approver.sign(&auth::approval(handle, &pk, expires));
    let mut raw = Raw::connect(broker).await;
    let c = raw.hello().await;
    let nonce: [u8; 32] = c.nonce.as_ref().try_into().unwrap();
    let t = auth::transcript(auth::Purpose::LinkDevice, &raw.exporter(), &nonce, handle, 0, &pk);
    let req = pb::LinkDevice {
        handle: handle.into(),
        public_key: Bytes::copy_from_slice(&pk),
        nonce: c.nonce,
        signature: Bytes::copy_from_slice(&new_key.sign(&t).to_bytes()),
        approval: Some(pb::DeviceApproval {
            approver_device_id: approver_device,
            expires_at_ms: expires,
            signature: Bytes::copy_from_slice(&approval.to_bytes()),
        }),
    };
    let id = raw.request(C::LinkDevice(req)).await;
    let answer = raw.answer(id).await;
    (raw, new_key, answer)
}

/// [`try_link`] that must succeed; returns the new device's number too.
async fn link(broker: &Broker, handle: &str, approver: &SigningKey, approver_device: u32) -> (Raw, SigningKey, u32) {
    match try_link(broker, handle, approver, approver_device).await {
        (raw, key, S::LoginOk(ok)) => (raw, key, ok.device_id),
        (_, _, other) => panic!("link a device to {handle}: {other:?}"),
    }
}

async fn list(raw: &mut Raw, handle: &str) -> pb::DeviceList {
    let id = raw.request(C::ListDevices(pb::ListDevices { handle: handle.into() })).await;
    match raw.answer(id).await {
        S::DeviceList(l) => l,
        other => panic!("list the devices of {handle}: {other:?}"),
    }
}

async fn unlink(raw: &mut Raw, device: u32) -> S {
    let id = raw.request(C::UnlinkDevice(pb::UnlinkDevice { device_id: device })).await;
    raw.answer(id).await
}

/// The device list an unlink was answered with.
fn list_of(answer: S) -> pb::DeviceList {
    match answer {
        S::DeviceList(l) => l,
        other => panic!("expected the device list after an unlink, got {other:?}"),
    }
}

fn ids(list: &pb::DeviceList) -> Vec<u32> {
    list.devices.iter().map(|d| d.device_id).collect()
}

/// Publishes identity keys for `device` of `handle` with Curve25519 key
/// `curve` (what device lists show and envelopes are made for).
async fn publish_identity(raw: &mut Raw, handle: &str, device: u32, login: &SigningKey, curve: [u8; 32]) {
    let ed = key().verifying_key().to_bytes();
    let signed = auth::identity_keys(handle, device, &curve, &ed);
    let identity = pb::IdentityKeys {
        curve25519: Bytes::copy_from_slice(&curve),
        ed25519: Bytes::copy_from_slice(&ed),
        signature: Bytes::copy_from_slice(&login.sign(&signed).to_bytes()),
    };
    let id = raw.request(C::PublishKeys(pb::PublishKeys { identity: Some(identity), ..Default::default() })).await;
    match raw.answer(id).await {
        S::KeysPublished(_) => {}
        other => panic!("publish identity keys of {handle}/{device}: {other:?}"),
    }
}

/// What the envelope for `device` of `handle` carries in a send tagged `tag`.
fn body_for(tag: &str, handle: &str, device: u32) -> Bytes {
    Bytes::from(format!("{tag} for {handle}/{device}"))
}

/// One envelope per device of `list` but `skip`, each made for the identity
/// key the list shows.
fn envelopes(tag: &str, list: &pb::DeviceList, skip: Option<u32>) -> Vec<pb::Envelope> {
    list.devices
        .iter()
        .filter(|d| Some(d.device_id) != skip)
        .map(|d| pb::Envelope {
            handle: list.handle.clone(),
            device: d.device_id,
            identity_key: d.identity_key.clone(),
            body: body_for(tag, &list.handle, d.device_id),
        })
        .collect()
}

async fn send_per_device(
    raw: &mut Raw,
    to: &str,
    message_id: [u8; 16],
    envelopes: Vec<pb::Envelope>,
    to_version: u64,
    own_version: u64,
) -> S {
    let send = pb::Send {
        message_id: Bytes::copy_from_slice(&message_id),
        to: to.into(),
        envelopes,
        to_devices_version: to_version,
        own_devices_version: own_version,
        ..Default::default()
    };
    let id = raw.request(C::Send(send)).await;
    raw.answer(id).await
}

async fn send_to_device(raw: &mut Raw, to: &str, device: u32, message_id: [u8; 16], body: &str) -> S {
    let send = pb::Send {
        message_id: Bytes::copy_from_slice(&message_id),
        to: to.into(),
        body: Bytes::copy_from_slice(body.as_bytes()),
        to_device: device,
        ..Default::default()
    };
    let id = raw.request(C::Send(send)).await;
    raw.answer(id).await
}

fn recipients(answer: &S) -> u32 {
    match answer {
        S::SendAck(a) => {
            assert!(!a.duplicate, "a first acceptance");
            a.recipients
        }
        other => panic!("expected a SendAck, got {other:?}"),
    }
}

/// The per-user mismatches of a send refused with `DEVICES_CHANGED`.
fn mismatches(answer: &S) -> &[pb::DeviceMismatch] {
    match answer {
        S::Error(e) if e.code() == ErrorCode::DevicesChanged => &e.devices,
        other => panic!("expected DEVICES_CHANGED, got {other:?}"),
    }
}

/// A mismatch as (handle, missing, extra, stale, version), for comparing whole.
fn summary(m: &pb::DeviceMismatch) -> (&str, &[u32], &[u32], &[u32], u64) {
    (&m.handle, &m.missing, &m.extra, &m.stale, m.version)
}

/// Entries the broker holds in the queue of `device` of `handle`.
fn stored(broker: &Broker, handle: &str, device: u32) -> usize {
    broker.store().read(&QueueKey::new(handle, device), 0, 100, 1 << 20).expect("store read").len()
}

/// The next message pushed to `raw`.
async fn next_message(raw: &mut Raw) -> pb::Message {
    let d = raw.deliver().await.expect("a delivery");
    message_of(&d).clone()
}

/// Reads `raw` up to its connection-level error (deliveries before it are
/// skipped), checks that the connection then ends, and returns the code.
async fn closed_with(raw: &mut Raw) -> ErrorCode {
    let code = loop {
        let frame = raw.next().await.expect("a connection-level error before the stream ends");
        match frame.kind {
            Some(S::Deliver(_)) => {}
            Some(S::Error(e)) if frame.request_id == 0 => break e.code(),
            other => panic!("expected a connection-level error, got {other:?}"),
        }
    };
    assert!(raw.next().await.is_none(), "nothing after the connection-level error");
    tokio::time::timeout(TIMEOUT, raw.conn.closed()).await.expect("the broker closes the connection");
    code
}

async fn login_code(broker: &Broker, handle: &str, device: u32, key: &SigningKey) -> Option<ErrorCode> {
    error_code(&Raw::connect(broker).await.login(handle, device, key).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_device_send_gives_each_device_exactly_its_own_body() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut alice1, akey) = user(&broker, "alice").await;
    let (mut bob1, bkey) = user(&broker, "bob").await;
    let (mut alice2, _, _) = link(&broker, "alice", &akey, 1).await;
    let (mut bob2, bkey2, _) = link(&broker, "bob", &bkey, 1).await;
    // bob's devices have identity keys on record, alice/2 none (empty key).
    publish_identity(&mut bob1, "bob", 1, &bkey, [1; 32]).await;
    publish_identity(&mut bob2, "bob", 2, &bkey2, [2; 32]).await;

    let (to, own) = (list(&mut alice1, "bob").await, list(&mut alice1, "alice").await);
    let mut all = envelopes("hi", &to, None);
    all.extend(envelopes("hi", &own, Some(1)));
    let sent = send_per_device(&mut alice1, "bob", mid(1), all, to.version, own.version).await;
    assert_eq!(recipients(&sent), 3, "bob/1, bob/2 and alice/2");

    let mut devices = [(&mut bob1, "bob", 1), (&mut bob2, "bob", 2), (&mut alice2, "alice", 2)];
    for (raw, handle, device) in &mut devices {
        let m = next_message(raw).await;
        assert_eq!(
            (m.from.as_str(), m.from_device, m.to.as_str(), m.body),
            ("alice", 1, "bob", body_for("hi", handle, *device)),
            "{handle}/{device} gets its own envelope's body"
        );
    }
    // One each: the next thing every device gets is the send after it.
    assert_eq!(recipients(&alice1.send_msg("bob", mid(2), b"after").await), 3);
    for (raw, handle, device) in &mut devices {
        assert_eq!(next_message(raw).await.body.as_ref(), b"after", "{handle}/{device} got one body only");
    }
    assert_eq!(stored(&broker, "alice", 1), 0, "nothing for the sending device");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_made_before_a_device_was_linked_is_refused_whole_until_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut alice1, akey) = user(&broker, "alice").await;
    let (mut alice2, _, _) = link(&broker, "alice", &akey, 1).await;
    let (mut bob1, bkey) = user(&broker, "bob").await;
    let (old, own) = (list(&mut alice1, "bob").await, list(&mut alice1, "alice").await);
    let (mut bob2, _, new) = link(&broker, "bob", &bkey, 1).await;

    let mut made_before = envelopes("old", &old, None);
    made_before.extend(envelopes("old", &own, Some(1)));
    let refused = send_per_device(&mut alice1, "bob", mid(1), made_before, old.version, own.version).await;
    let fresh = list(&mut alice1, "bob").await;
    assert_ne!(fresh.version, old.version, "linking a device changes the version");
    let m = mismatches(&refused);
    assert_eq!(m.len(), 1, "alice's own list is as the send was made for: {m:?}");
    assert_eq!(summary(&m[0]), ("bob", &[new][..], &[][..], &[][..], fresh.version));
    for (handle, device) in [("bob", 1), ("bob", new), ("alice", 2)] {
        assert_eq!(stored(&broker, handle, device), 0, "nothing stored for {handle}/{device}");
    }

    // Made again for the fresh list, under the same message id: accepted.
    let mut made_again = envelopes("new", &fresh, None);
    made_again.extend(envelopes("new", &own, Some(1)));
    let sent = send_per_device(&mut alice1, "bob", mid(1), made_again, fresh.version, own.version).await;
    assert_eq!(recipients(&sent), 3);
    for (raw, handle, device) in [(&mut bob1, "bob", 1), (&mut bob2, "bob", new), (&mut alice2, "alice", 2)] {
        let m = next_message(raw).await;
        assert_eq!(
            (m.message_id.as_ref(), m.body),
            (&mid(1)[..], body_for("new", handle, device)),
            "{handle}/{device} gets the accepted send first (the refused one never)"
        );
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_for_an_unlinked_device_is_extra() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (mut bob1, bkey) = user(&broker, "bob").await;
    let (_bob2, _, _) = link(&broker, "bob", &bkey, 1).await;
    let (old, own) = (list(&mut alice, "bob").await, list(&mut alice, "alice").await);
    let after = list_of(unlink(&mut bob1, 2).await);

    let made_before = envelopes("old", &old, None);
    let refused = send_per_device(&mut alice, "bob", mid(1), made_before, old.version, own.version).await;
    let m = mismatches(&refused);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(summary(&m[0]), ("bob", &[][..], &[2][..], &[][..], after.version));
    assert_eq!(stored(&broker, "bob", 1), 0, "nothing stored for bob/1");

    let sent = send_per_device(&mut alice, "bob", mid(1), envelopes("new", &after, None), after.version, own.version);
    assert_eq!(recipients(&sent.await), 1);
    assert_eq!(next_message(&mut bob1).await.body, body_for("new", "bob", 1));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_made_for_other_identity_keys_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (mut bob, bkey) = user(&broker, "bob").await;
    let own = list(&mut alice, "alice").await;
    let unkeyed = list(&mut alice, "bob").await;
    publish_identity(&mut bob, "bob", 1, &bkey, [1; 32]).await;
    let keyed = list(&mut alice, "bob").await;
    assert_eq!(keyed.devices[0].identity_key.as_ref(), &[1; 32], "the list shows the key");
    assert_ne!(keyed.version, unkeyed.version, "publishing identity keys changes the version");

    // The current version, but an envelope made for another key.
    let mut wrong = envelopes("wrong", &keyed, None);
    wrong[0].identity_key = Bytes::from(vec![9; 32]);
    let refused = send_per_device(&mut alice, "bob", mid(1), wrong, keyed.version, own.version).await;
    assert_eq!(summary(&mismatches(&refused)[0]), ("bob", &[][..], &[][..], &[1][..], keyed.version));
    // Made before any key was published (for none).
    let refused =
        send_per_device(&mut alice, "bob", mid(1), envelopes("none", &unkeyed, None), unkeyed.version, own.version);
    assert_eq!(summary(&mismatches(&refused.await)[0]), ("bob", &[][..], &[][..], &[1][..], keyed.version));
    // Made for keys the device has replaced since.
    publish_identity(&mut bob, "bob", 1, &bkey, [3; 32]).await;
    let replaced = list(&mut alice, "bob").await;
    let refused =
        send_per_device(&mut alice, "bob", mid(1), envelopes("old", &keyed, None), keyed.version, own.version);
    assert_eq!(summary(&mismatches(&refused.await)[0]), ("bob", &[][..], &[][..], &[1][..], replaced.version));
    assert_eq!(stored(&broker, "bob", 1), 0, "nothing stored");

    let sent =
        send_per_device(&mut alice, "bob", mid(1), envelopes("new", &replaced, None), replaced.version, own.version);
    assert_eq!(recipients(&sent.await), 1);
    assert_eq!(next_message(&mut bob).await.body, body_for("new", "bob", 1));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_version_alone_refuses_a_send() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut alice1, akey) = user(&broker, "alice").await;
    let _alice2 = link(&broker, "alice", &akey, 1).await;
    let _bob = user(&broker, "bob").await;
    let (to, own) = (list(&mut alice1, "bob").await, list(&mut alice1, "alice").await);
    let mut all = envelopes("x", &to, None);
    all.extend(envelopes("x", &own, Some(1)));

    let refused = send_per_device(&mut alice1, "bob", mid(1), all.clone(), to.version ^ 1, own.version).await;
    let m = mismatches(&refused);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(summary(&m[0]), ("bob", &[][..], &[][..], &[][..], to.version));
    let refused = send_per_device(&mut alice1, "bob", mid(1), all.clone(), to.version, own.version ^ 1).await;
    let m = mismatches(&refused);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(summary(&m[0]), ("alice", &[][..], &[][..], &[][..], own.version));
    for (handle, device) in [("bob", 1), ("alice", 2)] {
        assert_eq!(stored(&broker, handle, device), 0, "nothing stored for {handle}/{device}");
    }
    assert_eq!(recipients(&send_per_device(&mut alice1, "bob", mid(1), all, to.version, own.version).await), 2);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlinked_device_is_cut_off_at_once_and_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (mut bob1, bkey) = user(&broker, "bob").await;
    let (mut bob2, bkey2, _) = link(&broker, "bob", &bkey, 1).await;
    let before = list(&mut bob1, "bob").await;
    assert_eq!(recipients(&alice.send_msg("bob", mid(1), b"queued").await), 2);
    assert_eq!(stored(&broker, "bob", 2), 1, "queued for bob/2, not acknowledged");
    assert_eq!(next_message(&mut bob1).await.body.as_ref(), b"queued");

    let after = list_of(unlink(&mut bob1, 2).await);
    assert_eq!(ids(&after), [1]);
    assert_ne!(after.version, before.version, "unlinking changes the version");
    assert_eq!(closed_with(&mut bob2).await, ErrorCode::UnknownDevice, "bob/2's open connection");
    assert_eq!(stored(&broker, "bob", 2), 0, "bob/2's queue is dropped");
    assert_eq!(login_code(&broker, "bob", 2, &bkey2).await, Some(ErrorCode::UnknownDevice));

    assert_eq!(recipients(&alice.send_msg("bob", mid(2), b"after").await), 1, "bob/1 only");
    assert_eq!(stored(&broker, "bob", 2), 0, "nothing queued for bob/2 any more");
    let m = next_message(&mut bob1).await;
    assert_eq!((m.message_id.as_ref(), m.body.as_ref()), (&mid(2)[..], &b"after"[..]));
    let seen = list(&mut alice, "bob").await;
    assert_eq!((ids(&seen), seen.version), (vec![1], after.version), "others see the same list");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_primary_unlinks_other_devices_and_any_device_itself() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut bob1, bkey) = user(&broker, "bob").await;
    let (mut bob2, bkey2, _) = link(&broker, "bob", &bkey, 1).await;
    let (mut bob3, _, _) = link(&broker, "bob", &bkey, 1).await;
    let (mut bob4, _, _) = link(&broker, "bob", &bkey, 1).await;

    assert_eq!(error_code(&unlink(&mut bob2, 1).await), Some(ErrorCode::PermissionDenied), "a companion, not 1");
    assert_eq!(error_code(&unlink(&mut bob2, 3).await), Some(ErrorCode::PermissionDenied), "nor another companion");
    assert_eq!(error_code(&unlink(&mut bob2, 9).await), Some(ErrorCode::UnknownDevice), "no device 9");
    assert_eq!(ids(&list(&mut bob1, "bob").await), [1, 2, 3, 4], "nothing unlinked");

    assert_eq!(ids(&list_of(unlink(&mut bob2, 2).await)), [1, 3, 4], "bob/2 unlinks itself");
    assert_eq!(closed_with(&mut bob2).await, ErrorCode::UnknownDevice);
    assert_eq!(login_code(&broker, "bob", 2, &bkey2).await, Some(ErrorCode::UnknownDevice));
    assert_eq!(error_code(&unlink(&mut bob1, 2).await), Some(ErrorCode::UnknownDevice), "2 is gone");

    // The primary is the lowest-numbered current device: after 1 goes, 3.
    assert_eq!(ids(&list_of(unlink(&mut bob1, 1).await)), [3, 4], "the primary unlinks itself");
    assert_eq!(closed_with(&mut bob1).await, ErrorCode::UnknownDevice);
    assert_eq!(error_code(&unlink(&mut bob4, 3).await), Some(ErrorCode::PermissionDenied));
    assert_eq!(ids(&list_of(unlink(&mut bob3, 4).await)), [3], "3 is the primary now");
    assert_eq!(closed_with(&mut bob4).await, ErrorCode::UnknownDevice);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_has_at_most_five_devices_and_unlinking_frees_a_slot() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut bob1, bkey) = user(&broker, "bob").await;
    let mut companions = Vec::new();
    for n in 2..=5 {
        let (raw, _, device) = link(&broker, "bob", &bkey, 1).await;
        assert_eq!(device, n);
        companions.push(raw);
    }
    let (_, _, sixth) = try_link(&broker, "bob", &bkey, 1).await;
    assert_eq!(error_code(&sixth), Some(ErrorCode::TooManyDevices));
    assert_eq!(ids(&list(&mut bob1, "bob").await), [1, 2, 3, 4, 5], "the refused device was not added");

    list_of(unlink(&mut bob1, 3).await);
    let (_raw, _, device) = link(&broker, "bob", &bkey, 1).await;
    assert_eq!(device, 6, "a device number is never given again");
    assert_eq!(ids(&list(&mut bob1, "bob").await), [1, 2, 4, 5, 6]);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_to_device_send_reaches_that_device_only() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut alice1, akey) = user(&broker, "alice").await;
    let (mut alice2, _, _) = link(&broker, "alice", &akey, 1).await;
    let (mut bob1, bkey) = user(&broker, "bob").await;
    let (mut bob2, _, _) = link(&broker, "bob", &bkey, 1).await;

    assert_eq!(recipients(&send_to_device(&mut alice1, "bob", 2, mid(1), "for bob/2").await), 1);
    let m = next_message(&mut bob2).await;
    assert_eq!(
        (m.from.as_str(), m.from_device, m.to.as_str(), m.body.as_ref()),
        ("alice", 1, "bob", &b"for bob/2"[..])
    );
    assert_eq!(stored(&broker, "bob", 1), 0, "no copy for bob/1");
    assert_eq!(stored(&broker, "alice", 2), 0, "no copy for the sender's other device");

    let unknown = send_to_device(&mut alice1, "bob", 9, mid(2), "nobody").await;
    assert_eq!(error_code(&unknown), Some(ErrorCode::UnknownDevice));
    let unlinked = list_of(unlink(&mut bob2, 2).await);
    assert_eq!(ids(&unlinked), [1]);
    let gone = send_to_device(&mut alice1, "bob", 2, mid(3), "gone").await;
    assert_eq!(error_code(&gone), Some(ErrorCode::UnknownDevice), "an unlinked device");
    for (handle, device) in [("bob", 1), ("bob", 2), ("alice", 2)] {
        assert_eq!(stored(&broker, handle, device), 0, "nothing stored for {handle}/{device}");
    }
    // bob/1 and alice/2 got nothing before this plain send.
    assert_eq!(recipients(&alice1.send_msg("bob", mid(4), b"everyone").await), 2);
    for raw in [&mut bob1, &mut alice2] {
        assert_eq!(next_message(raw).await.message_id.as_ref(), &mid(4));
    }
    broker.shutdown().await;
}

/// The mesh member holding `handle`'s account record (its primary), among
/// `nodes`: the rendezvous winner for the account key, as the broker
/// computes it (docs/mesh.md).
fn account_primary(handle: &str, nodes: &[String]) -> String {
    let mut key = b"account\0".to_vec();
    key.extend_from_slice(handle.as_bytes());
    common::rendezvous_owner(&key, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlink_at_one_broker_cuts_the_device_off_at_the_other() {
    let cluster = TestCluster::spawn(2).await;
    let (b0, b1) = (cluster.broker(0), cluster.broker(1));
    let nodes = [node(0), node(1)];
    let (mut alice, _) = user(b1, "alice").await;
    // The account's primary is the unlinking broker, then the device's.
    for primary in [0, 1] {
        let id = |n: u64| mid(10 * primary as u64 + n);
        let handle = (0..).map(|i| format!("bob{i}")).find(|h| account_primary(h, &nodes) == node(primary)).unwrap();
        let (mut dev1, key1) = user(b0, &handle).await;
        let (mut dev2, key2, _) = link(b1, &handle, &key1, 1).await;
        let before = list(&mut alice, &handle).await;
        assert_eq!(ids(&before), [1, 2]);
        assert_eq!(recipients(&alice.send_msg(&handle, id(1), b"queued").await), 2);
        assert_eq!(stored(b1, &handle, 2), 1, "queued for {handle}/2 at its broker");

        let after = list_of(unlink(&mut dev1, 2).await);
        assert_eq!(ids(&after), [1]);
        assert_eq!(closed_with(&mut dev2).await, ErrorCode::UnknownDevice, "{handle}/2 at the other broker");
        assert_eq!(stored(b1, &handle, 2), 0, "its queue is dropped there");
        for broker in [b0, b1] {
            assert_eq!(login_code(broker, &handle, 2, &key2).await, Some(ErrorCode::UnknownDevice));
        }
        let seen = list(&mut alice, &handle).await;
        assert_eq!((ids(&seen), seen.version), (vec![1], after.version), "the other broker's list");
        let own = list(&mut alice, "alice").await;
        let made_before = envelopes("old", &before, None);
        let refused = send_per_device(&mut alice, &handle, id(2), made_before, before.version, own.version).await;
        assert_eq!(summary(&mismatches(&refused)[0]), (handle.as_str(), &[][..], &[2][..], &[][..], after.version));
        assert_eq!(recipients(&alice.send_msg(&handle, id(3), b"after").await), 1, "{handle}/1 only");
    }
    cluster.shutdown().await;
}
