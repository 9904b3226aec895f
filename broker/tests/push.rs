//! Push wake-ups through a real broker to an HTTP endpoint this test runs
//! on loopback: an offline device gets one content-free wake-up per burst,
//! which decrypts with its push keys (RFC 8291) and carries a VAPID
//! signature by the broker's key; a 410 from the endpoint removes it; a
//! connected device gets none.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use bytes::Bytes;
use common::{user, wait_for, Raw, TIMEOUT};
use tern_broker::Broker;
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use web_push_native::p256::elliptic_curve::sec1::ToEncodedPoint;

/// What the endpoint received: (path, headers, body).
type Received = Arc<Mutex<Vec<(String, HeaderMap, Bytes)>>>;

/// An HTTP push service on loopback: `/ok/...` answers 201, `/gone/...` 410.
async fn push_service() -> (String, Received) {
    let received: Received = Arc::default();
    let app = axum::Router::new()
        .route(
            "/{kind}/{id}",
            axum::routing::post(
                |State(r): State<Received>,
                 Path((kind, id)): Path<(String, String)>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    r.lock().unwrap().push((format!("/{kind}/{id}"), headers, body));
                    if kind == "gone" {
                        StatusCode::GONE
                    } else {
                        StatusCode::CREATED
                    }
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), received)
}

async fn broker(dir: &std::path::Path) -> Broker {
    let mut c = common::config(dir);
    c.push.allow_private_endpoints = true;
    c.push.coalesce_secs = 2;
    Broker::spawn(c).await.unwrap()
}

/// A device's push keys, as a browser or distributor makes them.
struct PushKeys {
    secret: web_push_native::p256::SecretKey,
    auth: [u8; 16],
}

impl PushKeys {
    fn new() -> Self {
        Self { secret: web_push_native::p256::SecretKey::random(&mut rand::rngs::OsRng), auth: rand::random() }
    }

    fn register(&self, endpoint: &str) -> pb::RegisterPush {
        let p256dh = self.secret.public_key().to_encoded_point(false).as_bytes().to_vec();
        pb::RegisterPush { endpoint: endpoint.into(), p256dh: p256dh.into(), auth: Bytes::copy_from_slice(&self.auth) }
    }

    fn open(&self, body: &[u8]) -> Vec<u8> {
        let auth = web_push_native::Auth::clone_from_slice(&self.auth);
        web_push_native::decrypt(body.to_vec(), &self.secret, &auth).expect("decrypts with the device's keys")
    }
}

async fn register(raw: &mut Raw, req: pb::RegisterPush) -> pb::PushRegistered {
    let id = raw.request(C::RegisterPush(req)).await;
    match raw.answer(id).await {
        S::PushRegistered(r) => r,
        other => panic!("expected PushRegistered, got {other:?}"),
    }
}

/// Bob registers push at `endpoint` and goes offline; returns his keys and
/// the broker's VAPID public key.
async fn offline_bob(broker: &Broker, endpoint: &str) -> (PushKeys, Vec<u8>) {
    let (mut bob, _) = user(broker, "bob").await;
    let keys = PushKeys::new();
    let registered = register(&mut bob, keys.register(endpoint)).await;
    assert!(registered.registered);
    assert_eq!(registered.vapid_public_key.len(), 65);
    let online = broker.devices_online();
    bob.conn.close(0u32.into(), b"bye");
    drop(bob);
    assert!(wait_for(TIMEOUT, || broker.devices_online() < online).await, "bob went offline");
    (keys, registered.vapid_public_key.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_one_decryptable_content_free_wake_up_per_burst() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path()).await;
    let (url, received) = push_service().await;
    let (keys, vapid) = offline_bob(&broker, &format!("{url}/ok/bob")).await;
    let (mut alice, _) = user(&broker, "alice").await;
    for i in 0..5u64 {
        assert!(matches!(alice.send_msg("bob", common::mid(i), b"secret text").await, S::SendAck(_)));
    }
    assert!(wait_for(TIMEOUT, || !received.lock().unwrap().is_empty()).await, "a wake-up came");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "one wake-up for the burst of five");
    let (path, headers, body) = &got[0];
    assert_eq!(path, "/ok/bob");
    let plain = keys.open(body);
    assert_eq!(plain, br#"{"tern":"wake"}"#, "no content");
    assert!(!body.windows(11).any(|w| w == b"secret text"));
    assert_eq!(headers["content-encoding"], "aes128gcm");
    assert_eq!(headers["topic"], "tern-wake", "one collapse key");
    let auth = headers["authorization"].to_str().unwrap();
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&vapid);
    assert!(auth.starts_with("vapid t=") && auth.contains(&format!("k={k}")), "{auth}");
    // The next burst, after the coalescing window: one more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(matches!(alice.send_msg("bob", common::mid(9), b"later").await, S::SendAck(_)));
    assert!(wait_for(TIMEOUT, || received.lock().unwrap().len() == 2).await, "a second burst, a second wake-up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_is_gone_is_removed_and_a_connected_device_gets_no_push() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(dir.path()).await;
    let (url, received) = push_service().await;
    let (_keys, _) = offline_bob(&broker, &format!("{url}/gone/bob")).await;
    let (mut alice, _) = user(&broker, "alice").await;
    assert!(matches!(alice.send_msg("bob", common::mid(1), b"hi").await, S::SendAck(_)));
    assert!(wait_for(TIMEOUT, || received.lock().unwrap().len() == 1).await, "the wake-up was tried");
    let cleared = wait_for(TIMEOUT, || {
        let account = broker.store().account("bob").unwrap().unwrap();
        account.device(1).and_then(|d| d.push.clone()).is_some_and(|p| p.endpoint.is_empty())
    })
    .await;
    assert!(cleared, "the 410 removed the endpoint");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(matches!(alice.send_msg("bob", common::mid(2), b"again").await, S::SendAck(_)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(received.lock().unwrap().len(), 1, "nothing more to a removed endpoint");

    // Carol is connected: no push for her.
    let (mut carol, _) = user(&broker, "carol").await;
    let keys = PushKeys::new();
    register(&mut carol, keys.register(&format!("{url}/ok/carol"))).await;
    assert!(matches!(alice.send_msg("carol", common::mid(3), b"hello").await, S::SendAck(_)));
    assert!(carol.deliver().await.is_some(), "delivered over the connection");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(received.lock().unwrap().iter().all(|(p, ..)| p != "/ok/carol"), "no wake-up for a connected device");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_endpoint_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::spawn(common::config(dir.path())).await.unwrap();
    let (mut bob, _) = user(&broker, "bob").await;
    let id = bob.request(C::RegisterPush(PushKeys::new().register("https://127.0.0.1:1/x"))).await;
    assert_eq!(common::error_code(&bob.answer(id).await), Some(tern_protocol::ErrorCode::InvalidArgument));
    let mut bad = PushKeys::new().register("https://192.0.2.1/x");
    bad.auth = Bytes::from_static(&[1; 3]);
    let id = bob.request(C::RegisterPush(bad)).await;
    assert_eq!(common::error_code(&bob.answer(id).await), Some(tern_protocol::ErrorCode::InvalidArgument));
    let account = broker.store().account("bob").unwrap().unwrap();
    assert!(account.device(1).unwrap().push.is_none(), "nothing stored");
}
