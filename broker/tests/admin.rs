//! The admin port as an operator's tooling sees it: `/healthz` tells a
//! load balancer the truth (503 once the store has failed, 503 for the
//! whole of a drain), and endpoints that change state answer only to the
//! configured admin token.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::certify;
use common::{config, error_code, mid, user, wait_for};
use tern_broker::{Broker, BrokerConfig};
use tern_protocol::pb::server_frame::Kind as S;
use tern_protocol::ErrorCode;

const TOKEN: &str = "test-admin-token-0123456789";

/// One HTTP/1.1 request; `None` when nothing answers on `addr`.
fn http(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

async fn http_async(addr: SocketAddr, method: &'static str, path: &str, auth: Option<&str>) -> (u16, String) {
    let (path, auth) = (path.to_owned(), auth.map(str::to_owned));
    tokio::task::spawn_blocking(move || http(addr, method, &path, auth.as_deref()))
        .await
        .unwrap()
        .expect("the admin port answers")
}

/// Two mesh brokers; node-1 has an admin port and `tweak` applied.
async fn two_brokers(dir: &std::path::Path, tweak: impl FnOnce(&mut BrokerConfig)) -> (Broker, Broker) {
    let names = ["node-1".to_owned(), "node-2".to_owned()];
    let certs = certify(dir, &names);
    let mut c1 = config(&dir.join("node-1"));
    c1.node = names[0].clone();
    c1.cluster.dir = Some(certs[0].clone());
    c1.admin = Some("127.0.0.1:0".parse().unwrap());
    tweak(&mut c1);
    let b1 = Broker::spawn(c1).await.expect("node-1 starts");
    let mut c2 = config(&dir.join("node-2"));
    c2.node = names[1].clone();
    c2.cluster.dir = Some(certs[1].clone());
    c2.cluster.drain_secs = 0;
    c2.cluster.join = vec![b1.local_addr().to_string()];
    let b2 = Broker::spawn(c2).await.expect("node-2 starts");
    assert!(wait_for(Duration::from_secs(20), || linked(&b1, "node-2") && linked(&b2, "node-1")).await, "mesh formed");
    (b1, b2)
}

/// `broker` sees `peer` alive with a link up.
fn linked(broker: &Broker, peer: &str) -> bool {
    broker.mesh_status().is_some_and(|s| s.members.iter().any(|m| m.node == peer && m.alive && m.link.is_some()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_failed_once_a_wal_sync_has_failed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.admin = Some("127.0.0.1:0".parse().unwrap());
    let broker = Broker::spawn(cfg).await.unwrap();
    let admin = broker.admin_addr().unwrap();
    let (mut alice, _) = user(&broker, "alice").await;
    let (_bob, _) = user(&broker, "bob").await;
    assert!(matches!(alice.send_msg("bob", mid(1), b"x").await, S::SendAck(_)));
    assert_eq!(http_async(admin, "GET", "/healthz", None).await.0, 200);

    // A real fsync failure cannot be caused on demand: the store's test
    // hook records one as the sync thread does, with the same effect.
    broker.store().fail_sync_for_test("injected fsync failure");
    let r = alice.send_msg("bob", mid(2), b"y").await;
    assert_eq!(error_code(&r), Some(ErrorCode::StorageError), "sends are refused: {r:?}");
    let (status, body) = http_async(admin, "GET", "/healthz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"status\":\"failed\""), "{body}");
    assert!(body.contains("injected fsync failure"), "the reason is given: {body}");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_draining_for_the_whole_drain() {
    let dir = tempfile::tempdir().unwrap();
    let (b1, b2) = two_brokers(dir.path(), |c| c.cluster.drain_secs = 3).await;
    let admin = b1.admin_addr().unwrap();
    // Bob is offline with messages held at node-1: its drain waits for
    // them to move (they do not: bob stays away) for cluster.drain_secs.
    let (mut alice, _) = user(&b1, "alice").await;
    let (bob, _) = user(&b1, "bob").await;
    drop(bob);
    for n in 0..5 {
        assert!(matches!(alice.send_msg("bob", mid(n), b"held").await, S::SendAck(_)));
    }
    assert!(!b1.store().waiting().await.unwrap().is_empty(), "node-1 holds bob's messages");
    assert_eq!(http_async(admin, "GET", "/healthz", None).await.0, 200);

    let started = Instant::now();
    let shutdown = tokio::spawn(b1.shutdown());
    let poller = std::thread::spawn(move || {
        // (time since shutdown began, status, body) until nothing answers.
        let mut seen = Vec::new();
        while let Some((status, body)) = http(admin, "GET", "/healthz", None) {
            seen.push((started.elapsed(), status, body));
            std::thread::sleep(Duration::from_millis(50));
        }
        seen
    });
    shutdown.await.unwrap();
    let seen = tokio::task::spawn_blocking(move || poller.join().unwrap()).await.unwrap();
    let draining: Vec<Duration> = seen
        .iter()
        .filter(|(_, status, body)| *status == 503 && body.contains("\"status\":\"draining\""))
        .map(|(at, ..)| *at)
        .collect();
    let summary: Vec<(Duration, u16)> = seen.iter().map(|(at, s, _)| (*at, *s)).collect();
    assert!(
        draining.last().zip(draining.first()).is_some_and(|(last, first)| *last - *first >= Duration::from_secs(2)),
        "/healthz answered 503 draining through the 3 s drain: {summary:?}"
    );
    let from = seen.iter().position(|(_, status, _)| *status == 503).unwrap_or(0);
    assert!(seen[from..].iter().all(|(_, status, _)| *status == 503), "never 200 once draining: {summary:?}");
    b2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changing_endpoints_are_off_without_an_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let (b1, b2) = two_brokers(dir.path(), |_| {}).await;
    let admin = b1.admin_addr().unwrap();
    let (status, body) = http_async(admin, "POST", "/mesh/sever/node-2?secs=30", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--admin-token") && body.contains("TERN_ADMIN_TOKEN"), "says how to enable: {body}");
    let (status, _) = http_async(admin, "POST", "/mesh/sever/node-2?secs=30", Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(status, 403, "no token configured: none is right");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(linked(&b1, "node-2"), "the link was not cut");
    b1.shutdown().await;
    b2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sever_needs_the_admin_token_and_reads_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let (b1, b2) = two_brokers(dir.path(), |c| c.admin_token = Some(TOKEN.into())).await;
    let admin = b1.admin_addr().unwrap();
    let sever = "/mesh/sever/node-2?secs=30";

    let (status, body) = http_async(admin, "POST", sever, None).await;
    assert_eq!(status, 401, "no token: {body}");
    assert!(body.to_ascii_lowercase().contains("www-authenticate: bearer"), "{body}");
    for wrong in
        [format!("Bearer {TOKEN}x"), "Bearer test-admin-token".into(), format!("Basic {TOKEN}"), "Bearer ".into()]
    {
        let (status, body) = http_async(admin, "POST", sever, Some(&wrong)).await;
        assert_eq!(status, 401, "{wrong:?}: {body}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(linked(&b1, "node-2"), "refused requests cut nothing");

    for open in ["/healthz", "/metrics", "/mesh"] {
        let (status, body) = http_async(admin, "GET", open, None).await;
        assert_eq!(status, 200, "{open} needs no token: {body}");
    }

    let (status, body) = http_async(admin, "POST", sever, Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(status, 200, "{body}");
    assert!(wait_for(Duration::from_secs(5), || !linked(&b1, "node-2")).await, "the right token cuts the link");
    b1.shutdown().await;
    b2.shutdown().await;
}
