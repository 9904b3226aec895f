//! The client library against a real broker: sends that resolve on the
//! durable ack, delivery across a broker restart (reconnect with backoff,
//! resend by id, redelivery deduplicated), and receipts.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use tern_broker::Broker;
use tern_client::{Client, ClientConfig, Incoming};

fn client_config(broker: &Broker) -> ClientConfig {
    let mut c = ClientConfig::new(vec![broker.local_addr().to_string()], broker.cert_path());
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c
}

/// Starts a broker on `addr` again, retrying while the old socket lingers.
async fn restart(dir: &std::path::Path, addr: std::net::SocketAddr) -> Broker {
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

async fn next_message(client: &Client) -> (u64, String) {
    loop {
        let item = tokio::time::timeout(TIMEOUT, client.recv()).await.expect("a delivery in time").expect("open");
        if let Incoming::Message { seq, body, .. } = item {
            return (seq, String::from_utf8(body.to_vec()).unwrap());
        }
        client.ack(item.seq()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_survives_a_broker_restart_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let addr = broker.local_addr();
    let (alice, _) = Client::register(client_config(&broker), "alice", None).await.unwrap();
    let (bob, _) = Client::register(client_config(&broker), "bob", None).await.unwrap();

    for n in 0..10 {
        let r = alice.send("bob", format!("m{n}")).await.unwrap();
        assert!(!r.duplicate);
        assert_eq!(r.recipients, 1);
    }
    // Bob reads all ten but acks only the first five.
    let mut seqs = Vec::new();
    for n in 0..10 {
        let (seq, text) = next_message(&bob).await;
        assert_eq!(text, format!("m{n}"));
        seqs.push(seq);
    }
    bob.ack(seqs[4]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    broker.shutdown().await;
    // Sends made while the broker is down wait, then resolve after the reconnect.
    // Polled in order on one task, so they are sent in this order.
    let sender = alice.clone();
    let pending =
        tokio::spawn(
            async move { futures::future::join_all((10..15).map(|n| sender.send("bob", format!("m{n}")))).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let broker = restart(dir.path(), addr).await;
    for result in pending.await.unwrap() {
        result.expect("send resolves once the broker is back");
    }

    // m5..m9 were seen but not acked: the broker redelivers them and the
    // client drops them. Bob's app sees m10..m14, each once, in order.
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    while got.len() < 5 {
        let (seq, text) = next_message(&bob).await;
        assert!(seen.insert(text.clone()), "{text} delivered twice");
        got.push(text);
        bob.ack(seq).await;
    }
    assert_eq!(got, (10..15).map(|n| format!("m{n}")).collect::<Vec<_>>());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), bob.recv()).await.is_err(),
        "nothing else arrives: m5..m9 were dropped as already seen"
    );

    // Alice's receipts: one per message bob acknowledged (15), each once.
    let mut receipts = HashSet::new();
    while receipts.len() < 15 {
        let item = tokio::time::timeout(TIMEOUT, alice.recv()).await.expect("receipt").unwrap();
        if let Incoming::Receipt { message_id, handle, .. } = &item {
            assert_eq!(handle, "bob");
            assert!(receipts.insert(*message_id), "receipt twice");
        }
        alice.ack(item.seq()).await;
    }
    alice.close().await;
    bob.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn deliveries_as_a_stream() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (alice, _) = Client::register(client_config(&broker), "alice", None).await.unwrap();
    let (bob, _) = Client::register(client_config(&broker), "bob", None).await.unwrap();
    for n in 0..3 {
        alice.send("bob", format!("s{n}")).await.unwrap();
    }
    let texts: Vec<String> = bob
        .incoming()
        .filter_map(|item| async move {
            match item {
                Incoming::Message { body, .. } => Some(String::from_utf8(body.to_vec()).unwrap()),
                Incoming::Receipt { .. } => None,
            }
        })
        .take(3)
        .collect()
        .await;
    assert_eq!(texts, ["s0", "s1", "s2"]);
    broker.shutdown().await;
}

#[tokio::test]
async fn send_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path()).await;
    let (alice, identity) = Client::register(client_config(&broker), "alice", None).await.unwrap();
    let err = alice.send("nobody", "x").await.unwrap_err();
    assert_eq!(err.code(), Some(tern_protocol::ErrorCode::UnknownRecipient));
    let err = alice.send("NOT VALID", "x").await.unwrap_err();
    assert!(matches!(err, tern_client::SendError::Invalid(_)));
    // Same id twice: stored once, the second ack says duplicate.
    let id = tern_protocol::MessageId([7; 16]);
    assert!(!alice.send_with_id(id, "alice", "x").await.is_ok_and(|r| r.duplicate));
    assert!(alice.send_with_id(id, "alice", "x").await.unwrap().duplicate);
    // Logging in with a key the broker does not know fails with its code.
    let mut wrong = identity.clone();
    wrong.signing_key = tern_client::generate_key();
    let err = Client::connect(client_config(&broker), wrong).await.unwrap_err();
    assert_eq!(err.code(), Some(tern_protocol::ErrorCode::BadSignature));
    broker.shutdown().await;
}
