//! The location directory heals: a device's registration that could not
//! reach its directory owner (the link was down) is made good when the link
//! comes back, so other brokers do not hold its messages until it logs in
//! again.

mod common;

use std::time::Duration;

use common::cluster::{node, TestCluster};
use common::{directory_owner as owner, message_of, mid, user, Raw};
use tern_protocol::pb::server_frame::Kind as S;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_made_while_the_link_to_its_directory_owner_was_down_is_registered_when_it_heals() {
    let cluster = TestCluster::spawn(3).await;
    let names: Vec<String> = (0..3).map(node).collect();
    // A handle whose directory owner is not node-3, where it will log in.
    let handle = (0..).map(|i| format!("bob{i}")).find(|h| owner(h, &names) != names[2]).unwrap();
    let owner = owner(&handle, &names);
    let (mut alice, _) = user(cluster.broker(0), "alice").await;
    // Registered (and so located) at node-1, then offline.
    let (bob, bob_key) = user(cluster.broker(0), &handle).await;
    drop(bob);

    // bob logs in at node-3 while its link to his directory owner is cut.
    cluster.broker(2).sever_link(&owner, Duration::from_secs(2));
    let mut bob = Raw::connect(cluster.broker(2)).await;
    assert!(matches!(bob.login(&handle, 1, &bob_key).await, S::LoginOk(_)));
    assert!(cluster.wait_formed(Duration::from_secs(20)).await, "the link came back");

    match alice.send_msg(&handle, mid(1), b"after the cut").await {
        S::SendAck(_) => {}
        other => panic!("send: {other:?}"),
    }
    let got = tokio::time::timeout(Duration::from_secs(10), bob.deliver()).await;
    let delivered = got.ok().flatten().expect("bob, online at node-3, gets the message without logging in again");
    assert_eq!(message_of(&delivered).message_id.as_ref(), &mid(1));
    cluster.shutdown().await;
}

/// Issue 11, 2.8: a queue held for an offline device is forgotten by the
/// ship actor once its entries have expired (it used to be kept, and looked
/// up again, forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_queue_is_forgotten_once_its_entries_expire() {
    let mut cluster = TestCluster::spawn(2).await;
    cluster.stop(0).await;
    // Long enough for a ship sweep (every 3 s) to count the queue held first.
    cluster.configs[0].store.retention_secs = 8;
    cluster.configs[0].store.sweep_interval_secs = 1;
    cluster.restart(0).await;
    assert!(cluster.wait_formed(Duration::from_secs(20)).await);
    let (mut alice, _) = user(cluster.broker(0), "alice").await;
    let (bob, _) = user(cluster.broker(0), "bob").await;
    drop(bob);
    match alice.send_msg("bob", mid(1), b"never read").await {
        S::SendAck(_) => {}
        other => panic!("send: {other:?}"),
    }
    let held = |c: &TestCluster| c.broker(0).mesh_status().map_or(0, |s| s.held_queues);
    assert!(common::wait_for(Duration::from_secs(10), || held(&cluster) == 1).await, "bob's queue is held");
    let gone = common::wait_for(Duration::from_secs(30), || held(&cluster) == 0).await;
    assert!(gone, "the expired queue is still held: {:?}", cluster.broker(0).mesh_status());
    cluster.shutdown().await;
}
