//! The store's side of the outbox: entries shipped from another broker are
//! stored once however often they are sent (also across a restart), and
//! entries handed on are deleted without delivery receipts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tern_broker::router::Router;
use tern_broker::store::{QueueKey, QueueListener, StoredItem};
use tern_broker::{Durability, Store, StoreConfig, StoreError};
use tern_protocol::pb;

fn open(dir: &std::path::Path) -> Store {
    open_with(dir, Arc::new(Router::default()))
}

fn open_with(dir: &std::path::Path, listener: Arc<dyn QueueListener>) -> Store {
    let config = StoreConfig {
        path: dir.to_owned(),
        durability: Durability::Synced,
        retention: Duration::from_secs(3600),
        max_queue_len: 1000,
        max_batch: 64,
        max_devices: 4,
        account_cache_entries: 100,
    };
    Store::open(config, listener).unwrap()
}

fn message(n: u8) -> Bytes {
    StoredItem {
        enqueued_at_ms: store_now(),
        item: pb::deliver::Item::Message(pb::Message {
            message_id: Bytes::from(vec![n; 16]),
            from: "alice".into(),
            from_device: 1,
            to: "bob".into(),
            sent_at_ms: 1,
            body: Bytes::from(vec![n]),
        }),
    }
    .encode()
}

fn store_now() -> u64 {
    tern_broker::store::now_ms()
}

async fn ship(store: &Store, origin: [u8; 16], queue: &QueueKey, seqs: &[u8]) -> Result<u64, StoreError> {
    let entries = seqs.iter().map(|s| (u64::from(*s), message(*s))).collect();
    store.submit_ship(origin, queue.clone(), entries).await?.await
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
    // Another broker's seq 1 is another entry.
    assert_eq!(ship(&store, b, &bob, &[9]).await.unwrap(), 9);
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
    let err = store.submit_ship([1; 16], bob.clone(), entries).await.unwrap().await.unwrap_err();
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
    let bounds = store.shipped(bob.clone(), 2).await.unwrap();
    assert_eq!((bounds.head, bounds.tail), (2, 3));
    assert_eq!(stored(&store, &bob), vec![3]);
    assert!(store.read(&alice, 0, 10, 1 << 20).unwrap().is_empty(), "no receipt for a hand-off");
    // A device's own ack does queue a receipt for the sender.
    store.ack(bob.clone(), 3).await.unwrap();
    assert_eq!(store.read(&alice, 0, 10, 1 << 20).unwrap().len(), 1);
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
        .submit_enqueue(QueueKey::new("alice", 1), [7; 16], "bob".into(), Bytes::from_static(b"hi"))
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
