//! Crash safety with the real binary: SIGKILL the broker while a client
//! streams sends, restart it on the same data directory, and check that
//! every acknowledged message is delivered, once, in order.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};

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

/// Connects once the broker is up (its certificate exists and it answers).
async fn connect(dir: &Path, port: u16) -> Raw {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cert = dir.join("tls/cert.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if cert.exists() {
            if let Ok(raw) = Raw::try_connect_to(addr, &cert).await {
                return raw;
            }
        }
        assert!(Instant::now() < deadline, "broker did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = spawn_broker(dir.path(), port);

    let akey = key();
    let bkey = key();
    let mut alice = connect(dir.path(), port).await;
    assert!(matches!(alice.register("alice", &akey).await, S::LoginOk(_)));
    let mut bob = connect(dir.path(), port).await;
    assert!(matches!(bob.register("bob", &bkey).await, S::LoginOk(_)));
    drop(bob);

    // Stream sends, up to 64 in flight, recording which ones were acked,
    // and kill the broker with SIGKILL in the middle of the stream.
    let mut acked: Vec<u64> = Vec::new();
    let mut in_flight = std::collections::HashMap::new();
    let mut next = 1u64;
    let kill_after = 300;
    let started = Instant::now();
    'stream: while started.elapsed() < Duration::from_secs(60) {
        while in_flight.len() < 64 && next <= 10_000 {
            let id = alice
                .request(C::Send(pb::Send {
                    message_id: Bytes::copy_from_slice(&mid(next)),
                    to: "bob".into(),
                    body: Bytes::from(format!("msg {next}")),
                    no_receipt: false,
                    ..Default::default()
                }))
                .await;
            in_flight.insert(id, next);
            next += 1;
        }
        match alice.next().await {
            Some(pb::ServerFrame { request_id, kind: Some(S::SendAck(_)) }) => {
                if let Some(n) = in_flight.remove(&request_id) {
                    acked.push(n);
                }
                if acked.len() == kill_after {
                    broker.sigkill();
                }
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => break 'stream,
        }
    }
    assert!(acked.len() >= kill_after, "the broker was killed mid-stream after {} acks", acked.len());
    let unacked: Vec<u64> = in_flight.values().copied().collect();

    // Restart on the same data directory.
    let broker = spawn_broker(dir.path(), port);
    // The sender resends what it never saw acked, with the same ids.
    let mut alice = connect(dir.path(), port).await;
    assert!(matches!(alice.login("alice", 1, &akey).await, S::LoginOk(_)));
    let mut resent_sorted = unacked.clone();
    resent_sorted.sort_unstable();
    for n in &resent_sorted {
        match alice.send_msg("bob", mid(*n), format!("msg {n}").as_bytes()).await {
            S::SendAck(_) => acked.push(*n),
            other => panic!("resend {n}: {other:?}"),
        }
    }

    // Bob receives everything, each id once, in send order.
    let mut bob = connect(dir.path(), port).await;
    assert!(matches!(bob.login("bob", 1, &bkey).await, S::LoginOk(_)));
    let mut got: Vec<u64> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut duplicates = 0;
    while got.len() + duplicates < acked.len() {
        let Some(d) = bob.deliver().await else { break };
        let m = message_of(&d);
        let n = u64::from_be_bytes(m.message_id[..8].try_into().unwrap());
        if seen.insert(n) {
            got.push(n);
        } else {
            duplicates += 1;
        }
        bob.ack(d.seq).await;
    }
    let expected: std::collections::HashSet<u64> = acked.iter().copied().collect();
    let lost: Vec<u64> = expected.iter().filter(|n| !seen.contains(n)).copied().collect();
    assert!(lost.is_empty(), "acknowledged messages lost: {lost:?}");
    assert_eq!(duplicates, 0, "stored twice");
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(got, sorted, "delivered in send order");
    drop(broker);
}
