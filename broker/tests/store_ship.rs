//! The store's side of the outbox: entries shipped from another broker are
//! stored once however often they are sent (also across a restart), never
//! past a gap, only after the broker that holds older ones handed them
//! over, and entries handed on are deleted without delivery receipts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tern_broker::router::Router;
use tern_broker::store::{QueueKey, QueueListener, ShipHeader, ShipOutcome, StoredItem};
use tern_broker::{Durability, Store, StoreConfig, StoreError};
use tern_protocol::pb;

fn open(dir: &std::path::Path) -> Store {
    open_with(dir, Arc::new(Router::default()))
}

fn open_with(dir: &std::path::Path, listener: Arc<dyn QueueListener>) -> Store {
    open_capped(dir, listener, 1000)
}

fn open_capped(dir: &std::path::Path, listener: Arc<dyn QueueListener>, max_queue_len: u64) -> Store {
    let config = StoreConfig {
        path: dir.to_owned(),
        durability: Durability::Synced,
        retention: Duration::from_secs(3600),
        max_queue_len,
        max_entry_len: tern_broker::store::max_entry_len(tern_protocol::DEFAULT_MAX_FRAME_LEN),
        max_batch: 64,
        max_devices: 4,
        account_cache_entries: 100,
        memory_mb: 8,
        keys: Default::default(),
    };
    Store::open(config, listener).unwrap()
}

fn message(n: u8) -> Bytes {
    StoredItem {
        enqueued_at_ms: store_now(),
        stamp: u64::from(n),
        item: pb::deliver::Item::Message(pb::Message {
            message_id: Bytes::from(vec![n; 16]),
            from: "alice".into(),
            from_device: 1,
            to: "bob".into(),
            sent_at_ms: 1,
            body: Bytes::from(vec![n]),
            no_receipt: false,
        }),
    }
    .encode()
}

fn store_now() -> u64 {
    tern_broker::store::now_ms()
}

/// Ships `seqs` from `origin` with nothing gone from the sender; returns the
/// seq acknowledged.
async fn ship(store: &Store, origin: [u8; 16], queue: &QueueKey, seqs: &[u8]) -> Result<u64, StoreError> {
    let seqs: Vec<u64> = seqs.iter().map(|s| u64::from(*s)).collect();
    match ship_after(store, origin, queue, ShipHeader::default(), &seqs).await? {
        ShipOutcome::Acked(up_to) => Ok(up_to),
        other => panic!("shipment of {seqs:?} not stored: {other:?}"),
    }
}

async fn ship_after(
    store: &Store,
    origin: [u8; 16],
    queue: &QueueKey,
    header: ShipHeader,
    seqs: &[u64],
) -> Result<ShipOutcome, StoreError> {
    let entries = seqs.iter().map(|s| (*s, message(*s as u8))).collect();
    store.submit_ship(origin, queue.clone(), header, entries).await?.await
}

/// The message ids (first byte) stored in `queue`, in queue order.
fn stored(store: &Store, queue: &QueueKey) -> Vec<u8> {
    store
        .read(queue, 0, 1000, 1 << 20)
        .unwrap()
        .into_iter()
        .map(|(_, v)| match StoredItem::decode(&v).unwrap().item {
            pb::deliver::Item::Message(m) => m.message_id[0],
            other => panic!("not a message: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn shipped_entries_are_stored_once_across_resends_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let bob = QueueKey::new("bob", 1);
    let (a, b) = ([1u8; 16], [2u8; 16]);
    {
        let store = open(dir.path());
        assert_eq!(ship(&store, a, &bob, &[1, 2]).await.unwrap(), 2);
        // The ack was lost: the sender sends 1 and 2 again, with 3.
        assert_eq!(ship(&store, a, &bob, &[1, 2, 3]).await.unwrap(), 3);
        assert_eq!(stored(&store, &bob), vec![1, 2, 3]);
        store.close();
    }
    let store = open(dir.path());
    assert_eq!(ship(&store, a, &bob, &[2, 3, 4]).await.unwrap(), 4, "what was stored is remembered after a restart");
    // Another broker's seq 9 is another entry (its 1..=8 were delivered there).
    let gone = ShipHeader { base: 8, handed_up_to: 0 };
    assert_eq!(ship_after(&store, b, &bob, gone, &[9]).await.unwrap(), ShipOutcome::Acked(9));
    assert_eq!(stored(&store, &bob), vec![1, 2, 3, 4, 9]);
    assert_eq!(store.waiting().await.unwrap().len(), 1);
    store.close();
}

#[tokio::test]
async fn a_bad_shipped_entry_stores_nothing_of_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bob = QueueKey::new("bob", 1);
    let entries = vec![(1, message(1)), (2, Bytes::from_static(b"garbage"))];
    let err = store.submit_ship([1; 16], bob.clone(), ShipHeader::default(), entries).await.unwrap().await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert!(stored(&store, &bob).is_empty());
    // A later good batch is stored from seq 1: the failed one left no mark.
    assert_eq!(ship(&store, [1; 16], &bob, &[1]).await.unwrap(), 1);
    assert_eq!(stored(&store, &bob), vec![1]);
    store.close();
}

#[tokio::test]
async fn handed_on_entries_are_deleted_without_receipts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bob = QueueKey::new("bob", 1);
    let alice = QueueKey::new("alice", 1);
    ship(&store, [1; 16], &bob, &[1, 2, 3]).await.unwrap();
    assert_eq!(store.handed(&bob).unwrap(), None);
    let bounds = store.shipped(bob.clone(), 2, "node-2".into()).await.unwrap();
    assert_eq!((bounds.head, bounds.tail), (2, 3));
    assert_eq!(store.handed(&bob).unwrap(), Some(("node-2".to_owned(), 2)), "who holds them is recorded");
    assert_eq!(stored(&store, &bob), vec![3]);
    assert!(store.read(&alice, 0, 10, 1 << 20).unwrap().is_empty(), "no receipt for a hand-off");
    // A device's own ack does queue a receipt for the sender.
    store.ack(bob.clone(), 3).await.unwrap();
    assert_eq!(store.read(&alice, 0, 10, 1 << 20).unwrap().len(), 1);
    store.close();
}

/// Issue 11, 2.1: a batch that fails (here: the queue is full) must not be
/// skipped by a later one that fits, or the later one's cumulative ack makes
/// the sender delete the failed one.
#[tokio::test]
async fn a_shipment_past_one_that_failed_is_refused_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_capped(dir.path(), Arc::new(Router::default()), 100);
    let bob = QueueKey::new("bob", 1);
    let (a, b) = ([1u8; 16], [2u8; 16]);
    let ninety: Vec<u64> = (1..=90).collect();
    assert_eq!(ship_after(&store, a, &bob, ShipHeader::default(), &ninety).await.unwrap(), ShipOutcome::Acked(90));
    // From b: 1..=20 do not fit, 21..=25 would.
    let first: Vec<u64> = (1..=20).collect();
    let err = ship_after(&store, b, &bob, ShipHeader::default(), &first).await.unwrap_err();
    assert!(matches!(err, StoreError::QueueFull(..)), "{err:?}");
    let later = ship_after(&store, b, &bob, ShipHeader::default(), &[21, 22, 23, 24, 25]).await.unwrap();
    assert_eq!(later, ShipOutcome::Gap { expected: 1 }, "nothing past the failed batch is stored");
    assert_eq!(stored(&store, &bob).len(), 90);
    store.close();
}

/// Entries the sender no longer holds and that no other broker stored
/// (delivered at the sender, expired) are not waited for; entries another
/// broker stored are, until it has handed them over.
#[tokio::test]
async fn a_shipment_waits_for_what_another_broker_holds_until_it_is_settled() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bob = QueueKey::new("bob", 1);
    let a = [1u8; 16];
    let delivered = ShipHeader { base: 40, handed_up_to: 0 };
    assert_eq!(ship_after(&store, a, &bob, delivered, &[41, 42]).await.unwrap(), ShipOutcome::Acked(42));

    let carol = QueueKey::new("carol", 1);
    let at_node_3 = ShipHeader { base: 18, handed_up_to: 18 };
    let outcome = ship_after(&store, a, &carol, at_node_3, &[19, 20]).await.unwrap();
    assert_eq!(outcome, ShipOutcome::Wait { up_to: 18, expected: 1 });
    assert!(stored(&store, &carol).is_empty());
    // node-3 handed over what it held: seqs up to 18 are accounted for.
    assert_eq!(store.settle(a, carol.clone(), 18).await.unwrap(), 18);
    assert_eq!(ship_after(&store, a, &carol, at_node_3, &[19, 20]).await.unwrap(), ShipOutcome::Acked(20));
    assert_eq!(stored(&store, &carol), vec![19, 20]);
    store.close();
}

/// Tells the test of each new entry, then holds the store's writer until
/// the test lets it go.
struct Gate {
    called: std::sync::mpsc::Sender<u64>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl QueueListener for Gate {
    fn queued(&self, _queue: &QueueKey, seq: u64, _value: &Bytes) {
        let _ = self.called.send(seq);
        if let Ok(release) = self.release.lock() {
            let _ = release.recv_timeout(Duration::from_secs(10));
        }
    }
}

/// Deliveries do not wait for the WAL sync; the sender's answer does.
#[tokio::test]
async fn a_new_entry_is_handed_on_before_its_sender_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (called_tx, called) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let gate = Gate { called: called_tx, release: std::sync::Mutex::new(release_rx) };
    let store = open_with(dir.path(), Arc::new(gate));
    store.register("alice", [1; 32]).await.unwrap();
    store.register("bob", [2; 32]).await.unwrap();

    let sent = store
        .submit_enqueue(QueueKey::new("alice", 1), [7; 16], "bob".into(), Bytes::from_static(b"hi"), true)
        .await
        .unwrap();
    let seq = tokio::task::spawn_blocking(move || called.recv_timeout(Duration::from_secs(10))).await.unwrap();
    assert_eq!(seq, Ok(1), "bob's queue got entry 1 and the listener heard of it");
    tokio::pin!(sent);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut sent).await.is_err(),
        "the sender was answered before the entry was handed on"
    );
    release.send(()).unwrap();
    let outcome = sent.await.unwrap();
    assert!(!outcome.duplicate);
    assert_eq!(outcome.recipients, 1);
    store.close();
}
