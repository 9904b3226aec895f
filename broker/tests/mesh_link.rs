//! Peer links under load and failure: two brokers shipping big backlogs at
//! each other at once keep reading while they write (so neither waits
//! forever for the other's flow control), and the broker that accepted a
//! link notices within seconds that the peer that dialed it is gone.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{certify, node, TestCluster};
use common::{config, user, wait_for, Raw};
use tern_broker::Broker;
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};

/// Body of each message of the backlogs: near the default `max_body_len`.
const BODY: usize = 100 << 10;

/// The message id of message `n` from `sender`.
fn mid(sender: u8, n: u64) -> [u8; 16] {
    let mut id = common::mid(n);
    id[15] = sender;
    id
}

/// Sends messages `range` of `sender` to `to`, all written before the first
/// ack is read (so the sends are not one round trip each; acks come in the
/// order the sends are done, not sent).
async fn send_pipelined(raw: &mut Raw, sender: u8, to: &str, range: std::ops::Range<u64>) {
    let mut waiting = std::collections::HashMap::new();
    for n in range {
        let body = Bytes::from(vec![n as u8; BODY]);
        let id = mid(sender, n);
        let send = pb::Send { message_id: Bytes::copy_from_slice(&id), to: to.into(), body, ..Default::default() };
        waiting.insert(raw.request(C::Send(send)).await, n);
    }
    while !waiting.is_empty() {
        let Some(frame) = raw.next().await else { panic!("{} sends to {to} not acked", waiting.len()) };
        let Some(n) = waiting.remove(&frame.request_id) else { continue };
        match frame.kind {
            Some(S::SendAck(ack)) => assert!(!ack.duplicate, "message {n} to {to} taken for a duplicate"),
            other => panic!("send {n} to {to}: {other:?}"),
        }
    }
}

/// What a device got of messages `range` from `sender`.
#[derive(Debug, Default)]
struct Tally {
    got: usize,
    duplicated: usize,
    reordered: usize,
    /// Messages of other senders or out of `range`.
    unexpected: usize,
}

/// Receives (and acks) until every message of `range` from `sender` arrived
/// once, or `deadline`, or nothing came for 10 s; counts what arrived,
/// duplicated and reordered.
async fn receive(raw: &mut Raw, sender: u8, range: std::ops::Range<u64>, deadline: tokio::time::Instant) -> Tally {
    let mut tally = Tally::default();
    let mut seen = HashSet::new();
    let mut last = None;
    while seen.len() < range.clone().count() {
        let Ok(Some(d)) = tokio::time::timeout_at(deadline, raw.deliver()).await else { break };
        let Some(pb::deliver::Item::Message(m)) = &d.item else { continue };
        let id: [u8; 16] = m.message_id.as_ref().try_into().unwrap();
        let n = u64::from_be_bytes(id[..8].try_into().unwrap());
        if id != mid(sender, n) || !range.contains(&n) || m.body.len() != BODY {
            tally.unexpected += 1;
        } else if !seen.insert(n) {
            tally.duplicated += 1;
        } else {
            tally.got += 1;
            if last.is_some_and(|l| n < l) {
                tally.reordered += 1;
            }
            last = Some(n);
        }
        raw.ack(d.seq).await;
    }
    tally
}

/// Each broker holds a backlog bigger than a peer link's windows (a writer
/// gets at most 16 MiB ahead of the reader at the other end) for a device
/// connected at the other, and both are released at once when their cut
/// link heals. A link whose reading waits behind a blocked write
/// deadlocks here (neither broker reads, so neither write ever completes)
/// while QUIC keep-alives hold it up: nothing more is delivered and gossip
/// stops. Every message must arrive, once and in order, and the mesh stay
/// formed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_shipping_big_backlogs_at_each_other_deliver_everything() {
    const N: u64 = 400; // 40 MiB each way
    let cluster = TestCluster::spawn(2).await;
    let (mut bob, _) = user(cluster.broker(0), "bob").await;
    let (mut carol, _) = user(cluster.broker(1), "carol").await;
    let (mut alice, _) = user(cluster.broker(1), "alice").await;
    let (mut dave, _) = user(cluster.broker(0), "dave").await;
    // One message each way first, so both outboxes know where their device is.
    let soon = || tokio::time::Instant::now() + Duration::from_secs(10);
    tokio::join!(send_pipelined(&mut alice, 1, "bob", 0..1), send_pipelined(&mut dave, 2, "carol", 0..1));
    let (to_bob, to_carol) = tokio::join!(receive(&mut bob, 1, 0..1, soon()), receive(&mut carol, 2, 0..1, soon()));
    assert_eq!((to_bob.got, to_carol.got), (1, 1), "{to_bob:?} {to_carol:?}");

    // Cut the link while both backlogs build up (acked to their senders and
    // held at their brokers), then heal it.
    cluster.broker(0).sever_link(&node(1), Duration::from_secs(60));
    let cut = wait_for(Duration::from_secs(5), || {
        cluster.statuses().iter().flatten().all(|s| s.members.iter().all(|m| m.link.is_none()))
    })
    .await;
    assert!(cut, "the link is cut: {:#?}", cluster.statuses());
    tokio::join!(send_pipelined(&mut alice, 1, "bob", 1..N), send_pipelined(&mut dave, 2, "carol", 1..N));
    cluster.broker(0).sever_link(&node(1), Duration::ZERO);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (to_bob, to_carol) = tokio::join!(receive(&mut bob, 1, 1..N, deadline), receive(&mut carol, 2, 1..N, deadline));
    for (device, tally) in [("bob", &to_bob), ("carol", &to_carol)] {
        let lost = (N - 1) as usize - tally.got;
        assert_eq!(
            (lost, tally.duplicated, tally.reordered, tally.unexpected),
            (0, 0, 0, 0),
            "{device}: (lost, duplicated, reordered, unexpected) after the link healed; {:#?}",
            cluster.statuses()
        );
    }
    assert!(cluster.wait_formed(Duration::from_secs(10)).await, "mesh still formed: {:#?}", cluster.statuses());
    cluster.shutdown().await;
}

/// A broker on a runtime of its own, in a thread, that the test can freeze
/// like SIGSTOP: nothing of it runs (no packet is sent or read) until it is
/// resumed.
struct Freezable {
    freeze: Option<tokio::sync::oneshot::Sender<()>>,
    resume: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Freezable {
    async fn spawn(config: tern_broker::BrokerConfig) -> Self {
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (freeze, frozen) = tokio::sync::oneshot::channel::<()>();
        let (resume, resumed) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let broker = Broker::spawn(config).await.expect("broker starts");
                let _ = started_tx.send(());
                let _ = frozen.await;
                // Blocks the runtime's only thread: every task of the broker stops.
                let _ = resumed.recv();
                broker.shutdown().await;
            });
        });
        started.await.expect("broker starts");
        Self { freeze: Some(freeze), resume, thread: Some(thread) }
    }

    fn freeze(&mut self) {
        if let Some(freeze) = self.freeze.take() {
            let _ = freeze.send(());
        }
    }
}

impl Drop for Freezable {
    fn drop(&mut self) {
        self.freeze();
        let _ = self.resume.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The broker that accepted a link notices the dialer stopped (frozen like
/// SIGSTOP: no close, no packet) within seconds, as the dialer would: it
/// closes the link, stops shipping into a connection nobody reads, and a
/// new link is made once the peer is back. The accepting end's own settings
/// are the client-facing ones (30 s idle timeout, keep-alive every 15 s);
/// what holds here is the idle timeout both ends negotiate, the dialer's
/// 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_link_notices_a_stopped_dialer_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    // node-1 dials (the lower name, and it joins node-2): node-2 accepts.
    let names = [node(0), node(1)];
    let certs = certify(dir.path(), &names);
    let configs: Vec<_> = (0..2)
        .map(|i| {
            let mut c = config(&dir.path().join(&names[i]));
            c.node = names[i].clone();
            c.cluster.dir = Some(certs[i].clone());
            c.cluster.drain_secs = 0;
            c
        })
        .collect();
    let acceptor = Broker::spawn(configs[1].clone()).await.expect("broker starts");
    let mut dialer_config = configs[0].clone();
    dialer_config.cluster.join = vec![acceptor.local_addr().to_string()];
    let mut dialer = Freezable::spawn(dialer_config).await;
    let linked = wait_for(Duration::from_secs(20), || {
        acceptor.mesh_status().is_some_and(|s| {
            s.members.iter().any(|m| m.node == names[0] && m.link.as_ref().is_some_and(|l| l.dialed_by == names[0]))
        })
    })
    .await;
    assert!(linked, "node-1 dialed the link node-2 holds: {:#?}", acceptor.mesh_status());

    dialer.freeze();
    let frozen = Instant::now();
    let down = wait_for(Duration::from_secs(15), || {
        acceptor.mesh_status().is_some_and(|s| s.members.iter().all(|m| m.node != names[0] || m.link.is_none()))
    })
    .await;
    let noticed = frozen.elapsed();
    assert!(down, "node-2 still holds a link to the stopped node-1 after 15 s");
    // The dialer's idle timeout (5 s, negotiated as the smaller of both
    // ends') applies at the accepting end too; the client-facing one is 30 s.
    assert!(noticed < Duration::from_secs(8), "node-2 noticed the stopped dialer after {noticed:?}");
    drop(dialer);
    acceptor.shutdown().await;
}
