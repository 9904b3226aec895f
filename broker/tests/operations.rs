//! Operator-facing behaviour: config validation exit status, the admin
//! endpoints, refusing sends on a full disk, and draining on shutdown.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::*;
use tern_protocol::pb::server_frame::Kind as S;
use tern_protocol::ErrorCode;

fn broker_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern-broker"))
}

#[test]
fn invalid_configuration_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = broker_cmd()
        .args(["--listen", "127.0.0.1:0", "--max-queue-len", "0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("store.max_queue_len"), "{stderr}");

    let file = dir.path().join("tern.toml");
    std::fs::write(&file, "[limits]\nmax_body_len = 1000\nmax_frame_len = 1000\n").unwrap();
    let out = broker_cmd().arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_frame_len"));

    std::fs::write(&file, "[store]\nmax_queue_lenn = 5\n").unwrap();
    let out = broker_cmd().arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "unknown keys are errors");

    let out = broker_cmd().args(["--listen", "not-an-address"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "bad flag values exit 2 as well");
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_serves_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.admin = Some("127.0.0.1:0".parse().unwrap());
    let broker = tern_broker::Broker::spawn(cfg).await.unwrap();
    let admin = broker.admin_addr().unwrap();
    let (mut alice, _) = user(&broker, "alice").await;
    let (mut bob, _) = user(&broker, "bob").await;
    assert!(matches!(alice.send_msg("bob", mid(1), b"x").await, S::SendAck(_)));
    let seq = bob.deliver().await.unwrap().seq;
    bob.ack(seq).await;

    let (status, body) = tokio::task::spawn_blocking(move || http_get(admin, "/healthz")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    let mut metrics = String::new();
    let found = wait_for(Duration::from_secs(5), || {
        metrics = http_get(admin, "/metrics").1;
        metrics.contains("tern_acks_total")
    })
    .await;
    assert!(found, "{metrics}");
    for name in [
        "tern_connections",
        "tern_sends_total",
        "tern_deliveries_total",
        "tern_send_ack_seconds",
        "tern_store_batch_requests",
        "tern_queue_depth",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn sends_fail_with_storage_full_below_the_free_space_floor() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.store.min_free_disk_mb = u64::MAX >> 21; // far more than any disk
    let broker = tern_broker::Broker::spawn(cfg).await.unwrap();
    let (mut alice, _) = user(&broker, "alice").await;
    let (_bob, _) = user(&broker, "bob").await;
    let store = broker.store().clone();
    assert!(wait_for(Duration::from_secs(10), || store.disk_low()).await, "disk monitor raised the flag");
    let r = alice.send_msg("bob", mid(1), b"x").await;
    assert_eq!(error_code(&r), Some(ErrorCode::StorageFull), "{r:?}");
    let bounds = store.bounds(tern_broker::store::QueueKey::new("bob", 1)).await.unwrap();
    assert_eq!(bounds.depth(), 0, "nothing stored");
    broker.shutdown().await;
}

#[tokio::test]
async fn shutdown_tells_clients_and_keeps_what_was_acked() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (bob, bkey) = user(&broker, "bob").await;
    drop(bob);
    assert!(matches!(alice.send_msg("bob", mid(1), b"x").await, S::SendAck(_)));
    let shutdown = tokio::spawn(broker.shutdown());
    let frame = alice.next().await.expect("a shutdown notice");
    assert_eq!(frame.request_id, 0);
    assert_eq!(error_code(&frame.kind.unwrap()), Some(ErrorCode::ShuttingDown));
    shutdown.await.unwrap();

    let broker = start(dir.path()).await;
    let mut bob = Raw::connect(&broker).await;
    assert!(matches!(bob.login("bob", 1, &bkey).await, S::LoginOk(ok) if ok.pending == 1));
    broker.shutdown().await;
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = broker_cmd()
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Ready once it has printed its listening line.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0, "broker exited early");
    }
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status after SIGTERM: {status:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no exit within 15 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
