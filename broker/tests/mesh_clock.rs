//! Logins are ordered across brokers without trusting their clocks: a
//! device that moves to a broker whose clock is an hour behind is not taken
//! for a stale login there (kicked, its messages held elsewhere).

mod common;

use std::time::Duration;

use common::procs::{connect, nodes, wait_formed};
use common::{handle_owned, key, message_of, mid, Proc};
use tern_protocol::pb::server_frame::Kind as S;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moving_to_a_broker_whose_clock_is_behind_stays_logged_in_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = nodes(dir.path());
    nodes[1].env.push(("TERN_TEST_CLOCK_OFFSET_MS".into(), "-3600000".into()));
    let _procs: Vec<Proc> = nodes.iter().map(|n| n.spawn()).collect();
    wait_formed(&nodes).await;
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    // The directory owner is not node-2, so node-2 learns of bob's logins
    // at node-1 only by asking.
    let handle = handle_owned("bob", &names, |owner| owner != names[1]);
    let (akey, bkey) = (key(), key());
    let mut alice = connect(&nodes[2]).await;
    assert!(matches!(alice.register("alice", &akey).await, S::LoginOk(_)));
    let mut bob = connect(&nodes[0]).await;
    assert!(matches!(bob.register(&handle, &bkey).await, S::LoginOk(_)));
    drop(bob);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A second login at node-1: no move, so nobody but node-1 hears its epoch.
    let mut bob = connect(&nodes[0]).await;
    assert!(matches!(bob.login(&handle, 1, &bkey).await, S::LoginOk(_)));
    drop(bob);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut bob = connect(&nodes[1]).await;
    assert!(matches!(bob.login(&handle, 1, &bkey).await, S::LoginOk(_)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    match alice.send_msg(&handle, mid(1), b"to node-2").await {
        S::SendAck(_) => {}
        other => panic!("send: {other:?}"),
    }
    let frame = bob.maybe_next(Duration::from_secs(10)).await.expect("bob, at node-2, is still connected and served");
    match frame.kind {
        Some(S::Deliver(d)) => assert_eq!(message_of(&d).message_id.as_ref(), &mid(1)),
        other => panic!("bob was not delivered the message at node-2: {other:?}"),
    }
}
