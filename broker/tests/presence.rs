//! Presence and typing through real brokers: reciprocal (both must allow),
//! "nobody" hides both ways, a stranger sees nothing, changes come as QUIC
//! datagrams with a last-seen time to the minute, typing reaches only the
//! online devices of a conversation, across a mesh too, and nothing
//! ephemeral is stored.

mod common;

use std::time::Duration;

use common::cluster::TestCluster;
use common::TIMEOUT;
use tern_broker::store::QueueKey;
use tern_broker::Broker;
use tern_client::{Client, ClientConfig, Identity};
use tern_protocol::pb::{self, datagram::Kind as D};

fn client_config(broker: &Broker) -> ClientConfig {
    ClientConfig::new(vec![broker.local_addr().to_string()], broker.cert_path())
}

async fn register(broker: &Broker, handle: &str) -> (Client, Identity) {
    Client::register(client_config(broker), handle, None).await.expect("register")
}

async fn allow(client: &Client, peers: &[&str]) {
    let update = pb::SetPresence { allow: peers.iter().map(|p| (*p).to_owned()).collect(), ..Default::default() };
    client.set_presence(update).await.expect("presence set");
}

async fn watch(client: &Client, handle: &str) -> pb::PresenceState {
    let list = client.watch_presence(&[handle.to_owned()]).await.expect("watch");
    list.states.into_iter().next().expect("one state")
}

/// The next datagram within `wait`, if any.
async fn datagram(client: &Client, wait: Duration) -> Option<D> {
    tokio::time::timeout(wait, client.next_ephemeral()).await.ok().flatten().and_then(|d| d.kind)
}

async fn next_presence(client: &Client) -> pb::PresenceState {
    loop {
        match datagram(client, TIMEOUT).await {
            Some(D::Presence(p)) => return p,
            Some(_) => {}
            None => panic!("no presence datagram in time"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_needs_both_to_allow_and_a_stranger_sees_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (alice, _) = register(&broker, "alice").await;
    let (bob, _) = register(&broker, "bob").await;
    let (carol, _) = register(&broker, "carol").await;
    allow(&alice, &["bob"]).await;
    let seen = watch(&bob, "alice").await;
    assert_eq!((seen.visible, seen.online), (false, false), "bob has not allowed alice: nothing");
    allow(&bob, &["alice"]).await;
    let seen = watch(&bob, "alice").await;
    assert_eq!((seen.visible, seen.online, seen.last_seen_ms), (true, true, 0), "both allow: online");
    let stranger = watch(&carol, "alice").await;
    assert_eq!(stranger, pb::PresenceState { handle: "alice".into(), ..Default::default() });
    assert!(!watch(&carol, "nobody-here").await.visible, "the same for a handle that does not exist");
    for c in [alice, bob, carol] {
        c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_comes_as_a_datagram_with_last_seen_to_the_minute_and_nobody_hides_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (alice, alice_id) = register(&broker, "alice").await;
    let (bob, _) = register(&broker, "bob").await;
    allow(&alice, &["bob"]).await;
    allow(&bob, &["alice"]).await;
    assert!(watch(&bob, "alice").await.online);
    let before = tern_broker::store::now_ms();
    alice.close().await;
    let gone = next_presence(&bob).await;
    assert_eq!((gone.handle.as_str(), gone.visible, gone.online), ("alice", true, false));
    assert_eq!(gone.last_seen_ms % 60_000, 0, "to the minute");
    assert!(gone.last_seen_ms <= before + 60_000 && gone.last_seen_ms + 60_000 > before, "{}", gone.last_seen_ms);
    let alice = Client::connect(client_config(&broker), alice_id).await.unwrap();
    assert!(next_presence(&bob).await.online, "back online");
    // Nobody: alice hides, and sees nobody's either.
    let nobody = pb::SetPresence { visibility: Some(pb::PresenceVisibility::Nobody as i32), ..Default::default() };
    alice.set_presence(nobody).await.unwrap();
    assert!(!watch(&bob, "alice").await.visible);
    assert!(!watch(&alice, "bob").await.visible, "both ways");
    alice.close().await;
    assert!(datagram(&bob, Duration::from_millis(500)).await.is_none(), "no change told while hidden");
    bob.close().await;
}

/// Every queue of `handles`' device 1 holds nothing (typing is never stored).
fn nothing_stored(broker: &Broker, handles: &[&str]) {
    for h in handles {
        let entries = broker.store().read(&QueueKey::new(h, 1), 0, 100, 1 << 20).unwrap();
        assert!(entries.is_empty(), "{h} has stored entries: {entries:?}");
    }
}

async fn typing_reaches_only_a_conversation(alice: &Client, bob: &Client, carol: &Client) {
    allow(alice, &["bob"]).await;
    allow(bob, &["alice"]).await;
    alice.typing("bob", true).await;
    match datagram(bob, TIMEOUT).await {
        Some(D::Typing(t)) => {
            assert_eq!((t.from.as_str(), t.from_device, t.to.as_str(), t.typing), ("alice", 1, "bob", true))
        }
        other => panic!("expected typing from alice, got {other:?}"),
    }
    carol.typing("bob", true).await;
    let _ = carol.ping().await;
    assert!(datagram(bob, Duration::from_millis(500)).await.is_none(), "a stranger's typing is dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_online_devices_of_a_conversation_only_and_is_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (alice, _) = register(&broker, "alice").await;
    let (bob, _) = register(&broker, "bob").await;
    let (carol, _) = register(&broker, "carol").await;
    typing_reaches_only_a_conversation(&alice, &bob, &carol).await;
    nothing_stored(&broker, &["alice", "bob", "carol"]);
    for c in [alice, bob, carol] {
        c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_and_presence_cross_the_mesh() {
    let cluster = TestCluster::spawn(2).await;
    let (a, b) = (cluster.broker(0), cluster.broker(1));
    let (alice, _) = register(a, "alice").await;
    let (bob, _) = register(b, "bob").await;
    let (carol, _) = register(a, "carol").await;
    typing_reaches_only_a_conversation(&alice, &bob, &carol).await;
    // bob (at broker 1) watches alice (at broker 0), who leaves.
    assert!(watch(&bob, "alice").await.online);
    alice.close().await;
    let gone = next_presence(&bob).await;
    assert_eq!((gone.handle.as_str(), gone.online), ("alice", false));
    assert!(gone.last_seen_ms > 0);
    nothing_stored(a, &["alice", "bob", "carol"]);
    nothing_stored(b, &["alice", "bob", "carol"]);
    bob.close().await;
    carol.close().await;
    cluster.shutdown().await;
}
