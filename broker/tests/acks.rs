//! Acks across brokers (issue 11, 2.2): a seq means something only at the
//! broker, and on the connection, that delivered it. A client that fails
//! over to another broker acknowledges there what that broker delivered,
//! with that broker's seqs, and nothing it acknowledged at the old one.
//!
//! Two standalone brokers stand for two members of a mesh: each numbers its
//! own copy of a device's queue, which is all this needs.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tern_broker::Broker;
use tern_client::{Client, ClientConfig, Incoming};
use tern_protocol::pb::server_frame::Kind as S;

/// How many entries `broker` stores for `handle`'s device 1 (up to 1000).
fn stored(broker: &Broker, handle: &str) -> usize {
    let queue = tern_broker::store::QueueKey::new(handle, 1);
    broker.store().read(&queue, 0, 1000, 1 << 24).expect("store read").len()
}

/// One PEM file trusting both brokers' generated certificates.
fn trust_both(dir: &Path, a: &Broker, b: &Broker) -> std::path::PathBuf {
    let mut pem = std::fs::read(a.cert_path()).unwrap();
    pem.extend(std::fs::read(b.cert_path()).unwrap());
    let path = dir.join("both.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

async fn next_message(client: &Client) -> Incoming {
    tokio::time::timeout(TIMEOUT, client.recv()).await.expect("a delivery in time").expect("client open")
}

fn body_of(item: &Incoming) -> String {
    match item {
        Incoming::Message { body, .. } => String::from_utf8_lossy(body).into_owned(),
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_from_the_old_broker_deletes_nothing_at_the_new_one_and_its_queue_drains() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a")).await;
    let b = start(&dir.path().join("b")).await;
    let mut config =
        ClientConfig::new(vec![a.local_addr().to_string(), b.local_addr().to_string()], trust_both(dir.path(), &a, &b));
    config.backoff_min = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(200);
    config.connect_timeout = Duration::from_millis(500);

    // bob's device 1 has the same key at both brokers; he is connected at a.
    let (bob, identity) = Client::register(config, "bob", None).await.unwrap();
    let mut at_b = Raw::connect(&b).await;
    assert!(matches!(at_b.register("bob", &identity.signing_key).await, S::LoginOk(_)));
    drop(at_b);
    let (mut alice_a, _) = user(&a, "alice").await;
    let (mut alice_b, _) = user(&b, "alice").await;

    // At a: 20 messages, all processed and acknowledged (a's seqs 1..=20).
    for n in 1..=20 {
        assert!(matches!(alice_a.send_msg("bob", mid(n), format!("a{n}").as_bytes()).await, S::SendAck(_)));
    }
    for n in 1..=20 {
        let item = next_message(&bob).await;
        assert_eq!(body_of(&item), format!("a{n}"));
        bob.ack(item.seq()).await;
    }
    assert!(wait_for(TIMEOUT, || stored(&a, "bob") == 0).await, "a deleted what bob acknowledged");

    // At b, bob's queue has seqs of its own: a copy of a message bob already
    // processed at a (same sender device and id), then five new ones.
    assert!(matches!(alice_b.send_msg("bob", mid(20), b"a20").await, S::SendAck(_)));
    for n in 1..=5 {
        assert!(matches!(alice_b.send_msg("bob", mid(100 + n), format!("b{n}").as_bytes()).await, S::SendAck(_)));
    }
    assert_eq!(stored(&b, "bob"), 6);

    // a goes away; bob moves to b. The application gets the five new
    // messages once (the copy is dropped by identity), and holds them.
    a.shutdown().await;
    let mut held = Vec::new();
    for n in 1..=5 {
        let item = next_message(&bob).await;
        assert_eq!(body_of(&item), format!("b{n}"), "the copy of a20 is not shown again");
        held.push(item.seq());
    }
    // Nothing the application holds is deleted at b: bob's ack of 20 at a
    // means nothing there (b's seqs are 1..=6). Only the dropped copy goes.
    let deleted_early = wait_for(Duration::from_secs(1), || stored(&b, "bob") < 5).await;
    assert!(!deleted_early, "b deleted entries bob had not processed: {} left", stored(&b, "bob"));
    assert!(wait_for(TIMEOUT, || stored(&b, "bob") == 5).await, "the copy of a20 was acknowledged at b");

    // The application processes them: bob acknowledges at b, with b's seqs,
    // and b's queue drains (senders would otherwise end with QUEUE_FULL).
    for seq in held {
        bob.ack(seq).await;
    }
    assert!(wait_for(TIMEOUT, || stored(&b, "bob") == 0).await, "b's queue drains: {} left", stored(&b, "bob"));

    bob.close().await;
    b.shutdown().await;
}
