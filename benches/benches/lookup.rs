//! Location lookup on one broker, as it exists today: there is no directory
//! yet, so "where is this recipient" is two local steps.
//!
//! 1. Handle to devices: the store's writer resolves `Send.to` with its
//!    account lookup (the batch being built, then the moka account cache,
//!    then RocksDB's `accounts` column family) and makes one queue per
//!    device. The session itself does no lookup when a `Send` arrives: it
//!    hands `to` to `Store::enqueue`. The writer's lookup is private, so this
//!    measures `Store::account`, which goes through the same moka cache and
//!    RocksDB read, plus the same `QueueKey` per device (`lookup/account`).
//! 2. Device to live session: after the batch is durable the writer calls
//!    `Router::queued` for each entry, which looks the device up in the
//!    router's session table and, if it is online here, hands the entry to its
//!    session's channel (`lookup/router`, with 10,000 devices online).
//!
//! `lookup/send_path` chains both for a recipient with 1 and with 4 online
//! devices: what the local delivery of one stored send costs beyond the write.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::future::join_all;
use tern_benches::{register, runtime, BenchStore, DEFAULT_ACCOUNT_CACHE};
use tern_broker::router::Router;
use tern_broker::store::{QueueKey, QueueListener};
use tern_broker::{Durability, Store};
use tokio::sync::mpsc;

/// Users registered besides `bob` (1 device) and `carol` (4 devices).
const OTHER_USERS: usize = 10_000;
/// Devices with a session in the router besides bob's and carol's.
const OTHER_SESSIONS: usize = 10_000;

/// Recipients and their device counts.
const RECIPIENTS: [(&str, usize); 2] = [("bob", 1), ("carol", 4)];

fn device_label(devices: usize) -> String {
    if devices == 1 {
        "1_device".into()
    } else {
        format!("{devices}_devices")
    }
}

/// The recipient's queues, as the writer builds them from the account.
fn devices_of(store: &Store, handle: &str) -> Vec<QueueKey> {
    let account = store.account(handle).expect("store read").expect("registered");
    account.devices.iter().map(|d| QueueKey::new(handle, d.id)).collect()
}

fn populate(bench: &BenchStore) -> anyhow::Result<()> {
    let store = bench.store();
    runtime().block_on(async {
        for (handle, devices) in RECIPIENTS {
            register(store, handle, devices as u32).await?;
        }
        let others: Vec<String> = (0..OTHER_USERS).map(|i| format!("u{i:05}")).collect();
        for chunk in others.chunks(1000) {
            join_all(chunk.iter().map(|h| register(store, h, 1)))
                .await
                .into_iter()
                .collect::<anyhow::Result<Vec<()>>>()?;
        }
        Ok(())
    })
}

fn account(c: &mut Criterion) {
    let mut bench = BenchStore::open(Durability::Synced, DEFAULT_ACCOUNT_CACHE).expect("store");
    populate(&bench).expect("accounts registered");
    let mut group = c.benchmark_group("lookup/account");
    group.throughput(Throughput::Elements(1));
    for (handle, devices) in RECIPIENTS {
        assert_eq!(devices_of(bench.store(), handle).len(), devices);
        group.bench_function(format!("cached/{}", device_label(devices)), |b| {
            b.iter(|| devices_of(bench.store(), black_box(handle)))
        });
    }

    // A cache of 0 entries holds nothing (moka disables its map), so every
    // lookup reads RocksDB; after the reopen the accounts sit in SST files.
    bench.reopen(0).expect("store reopened");
    for (handle, devices) in RECIPIENTS {
        assert_eq!(devices_of(bench.store(), handle).len(), devices);
        group.bench_function(format!("uncached_rocksdb/{}", device_label(devices)), |b| {
            b.iter(|| devices_of(bench.store(), black_box(handle)))
        });
    }
    // An unknown recipient is never cached: each send to it reads RocksDB.
    assert!(bench.store().account("nobody").expect("store read").is_none());
    group.bench_function("unknown_handle", |b| b.iter(|| bench.store().account(black_box("nobody")).expect("read")));
    group.finish();
}

/// A router with `OTHER_SESSIONS` devices online, plus the given queues.
/// Returns the receivers of the given queues; the others stay attached while
/// the returned guard lives.
fn router_with_sessions(online: &[QueueKey]) -> (Router, Vec<mpsc::Receiver<(u64, Bytes)>>, impl Sized) {
    let router = Router::default();
    let others: Vec<_> =
        (0..OTHER_SESSIONS).map(|i| router.attach(QueueKey::new(&format!("u{i:05}"), 1), 64)).collect();
    let (guards, receivers): (Vec<_>, Vec<_>) = online.iter().map(|q| router.attach(q.clone(), 64)).unzip();
    (router, receivers, (others, guards))
}

fn router(c: &mut Criterion) {
    let bob = QueueKey::new("bob", 1);
    let (router, mut receivers, _sessions) = router_with_sessions(std::slice::from_ref(&bob));
    let value = Bytes::from(vec![0xa5; 300]);
    let offline = QueueKey::new("nobody", 1);
    let mut group = c.benchmark_group("lookup/router");
    group.throughput(Throughput::Elements(1));
    group.bench_function("online_handover", |b| {
        b.iter(|| {
            router.queued(black_box(&bob), 1, &value);
            receivers[0].try_recv().expect("handed over")
        })
    });
    group.bench_function("offline", |b| b.iter(|| router.queued(black_box(&offline), 1, &value)));
    group.finish();
}

fn send_path(c: &mut Criterion) {
    let bench = BenchStore::open(Durability::Synced, DEFAULT_ACCOUNT_CACHE).expect("store");
    populate(&bench).expect("accounts registered");
    let store = bench.store();
    let value = Bytes::from(vec![0xa5; 300]);
    let mut group = c.benchmark_group("lookup/send_path");
    group.throughput(Throughput::Elements(1));
    for (handle, devices) in RECIPIENTS {
        let queues = devices_of(store, handle);
        assert_eq!(queues.len(), devices);
        let (router, mut receivers, _sessions) = router_with_sessions(&queues);
        group.bench_function(format!("{}_online", device_label(devices)), |b| {
            b.iter(|| {
                for q in devices_of(store, black_box(handle)) {
                    router.queued(&q, 1, &value);
                }
                for rx in &mut receivers {
                    black_box(rx.try_recv().expect("handed over"));
                }
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    targets = account, router, send_path
}
criterion_main!(benches);
