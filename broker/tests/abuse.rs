//! What a hostile client or a flood gets: rate limits answered
//! `RATE_LIMITED` with a retry-after, no mesh-wide lookup per request for
//! handles nobody has, the connection cap taken before the handshake, one
//! stream per client connection, and small frames until the login.

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::cluster::{certify, node};
use common::*;
use tern_broker::config::Rate;
use tern_broker::{Broker, BrokerConfig};
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use tern_protocol::ErrorCode;

/// A broker whose rate limits apply to loopback clients (exempt by
/// default), with `set` applied to its config.
async fn limited_broker(dir: &std::path::Path, set: impl FnOnce(&mut BrokerConfig)) -> Broker {
    let mut c = config(dir);
    c.rate.exempt.clear();
    set(&mut c);
    Broker::spawn(c).await.expect("broker starts")
}

/// The `RATE_LIMITED` error in `answer`, with its retry-after.
fn rate_limited(answer: &S) -> Duration {
    match answer {
        S::Error(e) if e.code() == ErrorCode::RateLimited => {
            assert!(e.retry_after_ms > 0, "a retry-after: {e:?}");
            Duration::from_millis(e.retry_after_ms.into())
        }
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
}

#[tokio::test]
async fn registrations_beyond_the_rate_per_address_are_refused_with_a_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let broker = limited_broker(dir.path(), |c| c.rate.register_per_ip = Rate::new(2, 60_000)).await;
    let (_a, _) = user(&broker, "alice").await;
    let (_b, _) = user(&broker, "bob").await;
    let mut raw = Raw::connect(&broker).await;
    let retry = rate_limited(&raw.register("carol", &key()).await);
    assert!(retry > Duration::from_secs(55) && retry <= Duration::from_secs(60), "{retry:?}");
    // Nothing was stored: carol is still free, and the connection still
    // unauthenticated.
    assert!(broker.store().account("carol").unwrap().is_none());
    assert_eq!(error_code(&raw.send_msg("alice", mid(1), b"x").await), Some(ErrorCode::Unauthenticated));
    broker.shutdown().await;
}

#[tokio::test]
async fn logins_beyond_the_rate_per_address_are_refused_with_a_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let broker = limited_broker(dir.path(), |c| c.rate.login_per_ip = Rate::new(2, 30_000)).await;
    let (_alice, akey) = user(&broker, "alice").await;
    for _ in 0..2 {
        let mut raw = Raw::connect(&broker).await;
        assert!(matches!(raw.login("alice", 1, &akey).await, S::LoginOk(_)));
    }
    let mut raw = Raw::connect(&broker).await;
    let retry = rate_limited(&raw.login("alice", 1, &akey).await);
    assert!(retry > Duration::from_secs(25) && retry <= Duration::from_secs(30), "{retry:?}");
    broker.shutdown().await;
}

/// Failed logins per handle run out, and are then answered `RATE_LIMITED`;
/// the owner's valid signature still logs in, so nobody can lock them out.
#[tokio::test]
async fn failed_logins_per_handle_run_out_but_never_lock_the_owner_out() {
    let dir = tempfile::tempdir().unwrap();
    let broker = limited_broker(dir.path(), |c| c.rate.login_failures_per_handle = Rate::new(2, 60_000)).await;
    let (_alice, akey) = user(&broker, "alice").await;
    let mut attacker = Raw::connect(&broker).await;
    for _ in 0..2 {
        assert_eq!(error_code(&attacker.login("alice", 1, &key()).await), Some(ErrorCode::BadSignature));
    }
    let mut attacker = Raw::connect(&broker).await;
    rate_limited(&attacker.login("alice", 1, &key()).await);
    rate_limited(&attacker.login("alice", 7, &akey).await);
    let mut owner = Raw::connect(&broker).await;
    assert!(matches!(owner.login("alice", 1, &akey).await, S::LoginOk(_)));
    broker.shutdown().await;
}

#[tokio::test]
async fn sends_beyond_the_rate_per_device_are_refused_with_a_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let broker = limited_broker(dir.path(), |c| c.rate.sends_per_device = Rate::new(3, 10_000)).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (mut bob, _) = user(&broker, "bob").await;
    for n in 0..3 {
        assert!(matches!(alice.send_msg("bob", mid(n), b"hi").await, S::SendAck(_)));
    }
    let retry = rate_limited(&alice.send_msg("bob", mid(3), b"one too many").await);
    assert!(retry > Duration::from_secs(9) && retry <= Duration::from_secs(10), "{retry:?}");
    // The refused send was not stored; another device has its own bucket.
    for _ in 0..3 {
        assert_eq!(message_of(&bob.deliver().await.unwrap()).body.as_ref(), b"hi");
    }
    assert!(bob.maybe_next(Duration::from_millis(300)).await.is_none(), "the refused send is not delivered");
    assert!(matches!(bob.send_msg("alice", mid(100), b"hello").await, S::SendAck(_)));
    broker.shutdown().await;
}

#[tokio::test]
async fn account_lookups_beyond_the_rate_per_device_are_refused_with_a_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let broker = limited_broker(dir.path(), |c| c.rate.lookups_per_device = Rate::new(2, 5_000)).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let list = |handle: &str| C::ListDevices(pb::ListDevices { handle: handle.into() });
    for handle in ["alice", "nobody"] {
        let id = alice.request(list(handle)).await;
        assert!(!matches!(alice.answer(id).await, S::Error(e) if e.code() == ErrorCode::RateLimited));
    }
    let id = alice.request(list("alice")).await;
    rate_limited(&alice.answer(id).await);
    broker.shutdown().await;
}

/// Two brokers in one mesh, with `set` applied to both configs.
async fn mesh_of_two(dir: &std::path::Path, set: impl Fn(&mut BrokerConfig)) -> Vec<Broker> {
    let names: Vec<String> = (0..2).map(node).collect();
    let certs = certify(dir, &names);
    let mut brokers: Vec<Broker> = Vec::new();
    for (i, cert_dir) in certs.into_iter().enumerate() {
        let mut c = config(&dir.join(&names[i]));
        c.node = names[i].clone();
        c.cluster.dir = Some(cert_dir);
        c.cluster.drain_secs = 0;
        if let Some(first) = brokers.first() {
            c.cluster.join = vec![first.local_addr().to_string()];
        }
        set(&mut c);
        brokers.push(Broker::spawn(c).await.expect("broker starts"));
    }
    let formed = wait_for(Duration::from_secs(20), || {
        brokers.iter().all(|b| b.mesh_status().is_some_and(|s| s.members.iter().any(|m| m.alive && m.link.is_some())))
    })
    .await;
    assert!(formed, "mesh formed");
    brokers
}

/// `tries` failed logins for `handle` at `broker`, over connections of
/// three attempts each, all at once.
async fn login_flood(broker: &Broker, handle: &str, tries: usize) {
    let connections = (0..tries.div_ceil(3)).map(|c| async move {
        let mut raw = Raw::connect(broker).await;
        for _ in 0..3.min(tries - 3 * c) {
            let r = raw.login(handle, 1, &key()).await;
            assert_eq!(error_code(&r), Some(ErrorCode::UnknownDevice), "{r:?}");
        }
    });
    futures::future::join_all(connections).await;
}

/// A flood of logins for handles nobody has costs one lookup at the other
/// members per handle and `limits.account_miss_cache_secs`, not one each.
#[tokio::test]
async fn a_login_flood_for_unknown_handles_asks_the_mesh_once_per_handle_and_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let brokers = mesh_of_two(dir.path(), |c| c.limits.account_miss_cache_secs = 2).await;
    let at = &brokers[0];
    login_flood(at, "ghost", 30).await;
    assert_eq!(at.remote_account_lookups(), 1, "thirty logins for one unknown handle");
    login_flood(at, "phantom", 6).await;
    assert_eq!(at.remote_account_lookups(), 2, "another unknown handle is looked up once too");
    // Sends and device lists for an unknown handle share the same miss.
    let (mut alice, _) = user(at, "alice").await;
    assert_eq!(error_code(&alice.send_msg("ghost", mid(1), b"x").await), Some(ErrorCode::UnknownRecipient));
    let id = alice.request(C::ListDevices(pb::ListDevices { handle: "ghost".into() })).await;
    assert_eq!(error_code(&alice.answer(id).await), Some(ErrorCode::UnknownRecipient));
    assert_eq!(at.remote_account_lookups(), 2);
    // Once the miss is forgotten, the handle is asked about again, once.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    login_flood(at, "ghost", 6).await;
    assert_eq!(at.remote_account_lookups(), 3);
    // A handle registered at the other broker is still found from here.
    let (_bob, bkey) = user(&brokers[1], "bob").await;
    let mut raw = Raw::connect(at).await;
    assert!(matches!(raw.login("bob", 1, &bkey).await, S::LoginOk(_)));
    for b in brokers {
        b.shutdown().await;
    }
}

/// With every new address validated by a QUIC Retry first, clients and
/// peer links still connect (the client libraries answer the Retry).
#[tokio::test]
async fn clients_and_peers_connect_through_a_stateless_retry() {
    let dir = tempfile::tempdir().unwrap();
    let brokers = mesh_of_two(dir.path(), |c| {
        c.limits.handshakes_before_retry = 0;
        c.admin = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let (mut alice, _) = user(&brokers[0], "alice").await;
    let (mut bob, _) = user(&brokers[1], "bob").await;
    assert!(matches!(alice.send_msg("bob", mid(1), b"across").await, S::SendAck(_)));
    assert_eq!(message_of(&bob.deliver().await.unwrap()).body.as_ref(), b"across");
    // The metrics are the process's: both brokers', at least one Retry
    // for each client and the peer link.
    let admin = brokers[0].admin_addr().unwrap();
    let metrics = tokio::task::spawn_blocking(move || {
        ureq::get(format!("http://{admin}/metrics")).call().unwrap().body_mut().read_to_string().unwrap()
    })
    .await
    .unwrap();
    let retries: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tern_handshake_retries_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(retries >= 3.0, "{retries} retries sent");
    for b in brokers {
        b.shutdown().await;
    }
}

/// A burst of connection attempts against a cap of 3: at most 3 complete
/// their handshake, the others are refused before theirs (the cap is a
/// permit taken before the handshake, not a count checked, then raised by
/// the connection's task), and a slot given back is usable again.
#[tokio::test]
async fn connections_beyond_the_cap_are_refused_before_their_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let broker = limited_broker(dir.path(), |c| c.limits.max_connections = 3).await;
    let ca = broker.cert_path().to_owned();
    let addr = broker.local_addr();
    let endpoint = client_endpoint(&ca);
    let attempts = (0..24).map(|_| endpoint.connect(addr, "127.0.0.1").unwrap());
    let results = futures::future::join_all(attempts).await;
    let (open, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(open.len(), 3, "as many connections as the cap");
    assert!(
        refused.iter().all(|r| matches!(
            r,
            Err(quinn::ConnectionError::ConnectionClosed(c)) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        )),
        "refused before the handshake: {refused:?}"
    );
    // Closed connections give their permits back.
    drop(open);
    let mut ok = None;
    for _ in 0..50 {
        match Raw::try_connect_to(addr, &ca).await {
            Ok(raw) => {
                ok = Some(raw);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut raw = ok.expect("a slot once the others are closed");
    assert!(matches!(raw.register("alice", &key()).await, S::LoginOk(_)));
    broker.shutdown().await;
}

/// Issue 11, section 3: a handshake flood from one address took the
/// broker's CPU from its established clients (their send p99 went from 9
/// to 151 ms in benches/flood). Now each source address has a bucket of
/// handshakes, taken before any handshake work: past it, attempts are
/// refused (after a Retry proves the address); other addresses are not.
#[tokio::test]
async fn handshakes_beyond_the_rate_per_address_are_refused_and_other_addresses_connect() {
    let dir = tempfile::tempdir().unwrap();
    let broker = limited_broker(dir.path(), |c| c.rate.handshakes_per_ip = Rate::new(4, 60_000)).await;
    let ca = broker.cert_path().to_owned();
    let addr = broker.local_addr();
    let endpoint = client_endpoint(&ca);
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        match endpoint.connect(addr, "127.0.0.1").unwrap().await {
            Ok(conn) => open.push(conn),
            Err(quinn::ConnectionError::ConnectionClosed(c))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                refused += 1
            }
            Err(e) => panic!("an attempt failed otherwise: {e}"),
        }
    }
    assert_eq!((open.len(), refused), (4, 6), "the burst connects, the rest is refused");
    // Another source address has a bucket of its own.
    let other = client_endpoint(&ca);
    other.rebind(std::net::UdpSocket::bind("127.0.0.2:0").unwrap()).unwrap();
    assert!(other.connect(addr, "127.0.0.1").unwrap().await.is_ok(), "127.0.0.2 connects");
    broker.shutdown().await;
}

/// A client connection has one bidirectional stream, the session's: a
/// second one gets no credit, while the session goes on.
#[tokio::test]
async fn a_client_gets_one_stream() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let second = tokio::time::timeout(Duration::from_millis(500), alice.conn.open_bi()).await;
    assert!(second.is_err(), "a second stream was opened");
    assert!(matches!(alice.send_msg("alice", mid(1), b"still fine").await, S::SendAck(_)));
    broker.shutdown().await;
}

/// Before its login a connection may send only small frames: a length
/// prefix above `limits.max_frame_len_before_login` is refused at once,
/// before anything is buffered for it. After the login, the configured
/// maximum holds.
#[tokio::test]
async fn a_large_frame_before_login_is_refused_and_allowed_after() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let mut raw = Raw::connect(&broker).await;
    let mut prefix = BytesMut::new();
    prefix.put_u32(64 << 10);
    raw.write_raw(&prefix).await;
    let frame = raw.next().await.expect("an error frame before the close");
    assert_eq!(error_code(&frame.kind.unwrap()), Some(ErrorCode::FrameTooLarge));
    let closed = tokio::time::timeout(TIMEOUT, raw.conn.closed()).await.expect("connection closed");
    assert!(matches!(closed, quinn::ConnectionError::ApplicationClosed(_)), "{closed:?}");

    let (mut alice, _) = user(&broker, "alice").await;
    let body = vec![7u8; 64 << 10];
    assert!(matches!(alice.send_msg("alice", mid(1), &body).await, S::SendAck(_)));
    broker.shutdown().await;
}
