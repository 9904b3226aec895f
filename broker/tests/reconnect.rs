//! How fast the client library gets back to a broker that went away (issue
//! 11, section 1): its backoff is not pushed back by an application that
//! keeps sending, what it keeps meanwhile is bounded, and a broker restarted
//! after SIGKILL answers the old connection with a stateless reset (its
//! reset key is kept in the data directory), so the client does not wait
//! for the QUIC idle timeout.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tern_broker::Broker;
use tern_client::{Client, ClientConfig, Incoming, MessageId, SendError};

fn client_config(brokers: Vec<String>, ca: &Path) -> ClientConfig {
    let mut c = ClientConfig::new(brokers, ca);
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c.connect_timeout = Duration::from_millis(300);
    c
}

/// Starts a broker on `addr` again, retrying while the old socket lingers.
async fn restart(dir: &Path, addr: SocketAddr) -> Broker {
    let mut cfg = config(dir);
    cfg.listen = addr;
    for _ in 0..100 {
        match Broker::spawn(cfg.clone()).await {
            Ok(b) => return b,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("could not restart the broker on {addr}");
}

/// Waits until `client` answers a ping (it is connected and logged in).
async fn connected_within(client: &Client, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if client.ping().await.is_ok() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until `client` has noticed that its broker is gone.
async fn disconnected(client: &Client) {
    let started = Instant::now();
    while client.ping().await.is_ok() {
        assert!(started.elapsed() < TIMEOUT, "the client never noticed its broker leave");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn random_id() -> MessageId {
    MessageId(rand::random())
}

async fn texts(client: &Client, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let item = tokio::time::timeout(TIMEOUT, client.recv()).await.expect("a delivery in time").expect("open");
        if let Incoming::Message { body, .. } = &item {
            out.push(String::from_utf8_lossy(body).into_owned());
        }
        client.ack(item.seq()).await;
    }
    out
}

/// The reconnect delay used to start again with every command the
/// application made, drawing a new, growing delay each time: an application
/// sending every 10 ms kept its client disconnected for as long as it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_sending_reconnects_within_its_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let addr = broker.local_addr();
    let config = client_config(vec![addr.to_string()], broker.cert_path());
    let (alice, _) = Client::register(config.clone(), "alice", None).await.unwrap();
    let (bob, _) = Client::register(config.clone(), "bob", None).await.unwrap();

    broker.shutdown().await;
    disconnected(&alice).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sending = tokio::spawn({
        let (alice, stop) = (alice.clone(), stop.clone());
        async move {
            let mut acks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let body = format!("m{}", acks.len());
                acks.push(alice.enqueue(random_id(), "bob", body).await.expect("queued"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            acks
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let broker = restart(dir.path(), addr).await;

    // Bound: the longest delay, one connect timeout, the login, and slack.
    let bound = config.backoff_max + config.connect_timeout + Duration::from_secs(2);
    let took = connected_within(&alice, bound).await;
    stop.store(true, Ordering::Relaxed);
    let acks = sending.await.unwrap();
    assert!(took.is_some(), "still disconnected {bound:?} after the broker came back, while sending every 10 ms");

    // Everything sent meanwhile went out after the reconnect, in order.
    let n = acks.len();
    for ack in acks {
        ack.await.expect("a send made while disconnected is acknowledged after the reconnect");
    }
    let expected: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(texts(&bob, n).await, expected);
    alice.close().await;
    bob.close().await;
    broker.shutdown().await;
}

/// Issue 11, 2.8: what a disconnected client keeps for the reconnect is
/// bounded, and a send beyond the bound fails at once with a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_kept_while_disconnected_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let addr = broker.local_addr();
    let mut config = client_config(vec![addr.to_string()], broker.cert_path());
    config.max_offline_sends = 3;
    let (alice, _) = Client::register(config.clone(), "alice", None).await.unwrap();
    let (bob, _) = Client::register(config, "bob", None).await.unwrap();

    broker.shutdown().await;
    disconnected(&alice).await;
    let mut kept = Vec::new();
    for n in 0..3 {
        kept.push(alice.enqueue(random_id(), "bob", format!("m{n}")).await.unwrap());
    }
    let refused = alice.enqueue(random_id(), "bob", "m3").await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(1), refused).await.expect("refused at once, not queued");
    assert!(matches!(refused, Err(SendError::Backlogged { max: 3 })), "{refused:?}");

    let broker = restart(dir.path(), addr).await;
    for ack in kept {
        ack.await.expect("the kept sends go out after the reconnect");
    }
    assert_eq!(texts(&bob, 3).await, ["m0", "m1", "m2"]);
    alice.close().await;
    bob.close().await;
    broker.shutdown().await;
}

fn spawn_broker(dir: &Path, port: u16) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_tern-broker"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir)
        .env("TERN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tern-broker");
    Proc(child)
}

/// Waits until the broker process answers a QUIC handshake.
async fn wait_up(dir: &Path, port: u16) {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cert = dir.join("tls/cert.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if cert.exists() && Raw::try_connect_to(addr, &cert).await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "broker did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A SIGKILLed broker cannot close its connections. Restarted with a new
/// stateless reset key, it could not reset them either, and its clients
/// noticed only after the idle timeout (30 s); with the key kept in the
/// data directory the first packet of the old connection is answered with
/// a reset and the client reconnects at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnects_soon_after_a_sigkilled_broker_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = spawn_broker(dir.path(), port);
    wait_up(dir.path(), port).await;
    let mut config = client_config(vec![format!("127.0.0.1:{port}")], &dir.path().join("tls/cert.pem"));
    // The broker's idle timeout: what the client would wait without a reset.
    config.idle_timeout = Duration::from_secs(30);
    let (alice, _) = Client::register(config.clone(), "alice", None).await.unwrap();
    let (bob, _) = Client::register(config, "bob", None).await.unwrap();
    alice.send("bob", "before").await.unwrap();
    assert_eq!(texts(&bob, 1).await, ["before"]);

    broker.sigkill();
    let _broker = spawn_broker(dir.path(), port);
    wait_up(dir.path(), port).await;
    let restarted = Instant::now();
    // Written on the old connection first; the reset makes the client log
    // in again and resend it.
    let sent = tokio::time::timeout(Duration::from_secs(10), alice.send("bob", "after")).await;
    let took = restarted.elapsed();
    assert!(matches!(sent, Ok(Ok(_))), "no ack {took:?} after the restart: {sent:?}");
    // bob, idle, learns of the restart at his next packet too.
    let _ = bob.ping().await;
    assert_eq!(texts(&bob, 1).await, ["after"]);
    alice.close().await;
    bob.close().await;
}
