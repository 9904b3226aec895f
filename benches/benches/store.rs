//! Store: `Store::enqueue` and `Store::ack` through the group-commit writer,
//! for each durability setting (`synced`: WAL synced before the answer, the
//! default; `written`: WAL written, not synced). For the in-memory tier run
//! it with `TMPDIR` on a tmpfs (e.g. `TMPDIR=/dev/shm`), where a sync is free.
//!
//! - `enqueue_one`: one send at a time, `alice/1` to `bob` (one device), body
//!   256 B: the latency of one durable enqueue when nothing else is waiting,
//!   so every send pays its own write (and sync);
//! - `enqueue_batch256`: 256 sends issued at once, from 256 sender devices to
//!   256 recipients; the writer folds whatever is waiting into one batch and
//!   one sync (group commit). Time is until all 256 are answered;
//! - `enqueue_ack_one`: one send to `erin`, then erin's cumulative ack of it
//!   (which deletes the entry and queues a delivery receipt for alice): two
//!   writes, each waited for;
//! - `enqueue256_ack`: 256 concurrent sends to `frank`, then one cumulative
//!   ack of all 256 (256 deletes and 256 receipts in one write).
//!
//! Each setting gets a fresh store on a temporary directory (`$TMPDIR`).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use futures::future::join_all;
use tern_benches::{register, runtime, BenchStore, MessageIds, DEFAULT_ACCOUNT_CACHE};
use tern_broker::store::QueueKey;
use tern_broker::{Durability, Store};
use tokio::runtime::Runtime;

const BODY_LEN: usize = 256;
const BATCH: usize = 256;
const TIERS: [Durability; 2] = [Durability::Synced, Durability::Written];

/// Everything one tier's benchmarks share.
struct Fixture {
    bench: BenchStore,
    ids: MessageIds,
    body: Bytes,
    alice: QueueKey,
    senders: Vec<QueueKey>,
    recipients: Vec<String>,
}

impl Fixture {
    fn new(rt: &Runtime, durability: Durability) -> anyhow::Result<Self> {
        let bench = BenchStore::open(durability, DEFAULT_ACCOUNT_CACHE)?;
        let senders: Vec<String> = (0..BATCH).map(|i| format!("s{i:03}")).collect();
        let recipients: Vec<String> = (0..BATCH).map(|i| format!("r{i:03}")).collect();
        rt.block_on(async {
            let store = bench.store();
            let fixed = ["alice", "bob", "erin", "frank"].map(String::from);
            let all = fixed.iter().chain(&senders).chain(&recipients);
            join_all(all.map(|h| register(store, h, 1))).await.into_iter().collect::<anyhow::Result<Vec<()>>>()
        })?;
        Ok(Self {
            bench,
            ids: MessageIds::default(),
            body: Bytes::from(vec![0xa5; BODY_LEN]),
            alice: QueueKey::new("alice", 1),
            senders: senders.iter().map(|h| QueueKey::new(h, 1)).collect(),
            recipients,
        })
    }

    fn store(&self) -> &Store {
        self.bench.store()
    }

    async fn send(&self, from: &QueueKey, to: &str) {
        let done = self
            .store()
            .enqueue(from.clone(), self.ids.next(), to.to_owned(), self.body.clone())
            .await
            .expect("stored");
        assert!(!done.duplicate && done.recipients == 1, "{done:?}");
    }

    /// `BATCH` sends in flight at once, sender `i` to `to(i)`.
    async fn send_batch<'a>(&'a self, to: impl Fn(usize) -> &'a str) {
        join_all(self.senders.iter().enumerate().map(|(i, from)| self.send(from, to(i)))).await;
    }

    /// The highest seq assigned in `queue` so far.
    fn tail(&self, rt: &Runtime, queue: &QueueKey) -> u64 {
        rt.block_on(self.store().bounds(queue.clone())).expect("bounds").tail
    }
}

fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, durability: Durability) {
    // A synced write costs about a disk flush; keep its sample count at
    // criterion's minimum so the run stays short.
    match durability {
        Durability::Synced => group.sample_size(10).measurement_time(Duration::from_secs(4)),
        Durability::Written => group.sample_size(20).measurement_time(Duration::from_secs(3)),
    };
}

fn tier(c: &mut Criterion, rt: &Runtime, durability: Durability) {
    let fx = Fixture::new(rt, durability).expect("store fixture");
    let name = durability.to_string();

    let mut group = c.benchmark_group("store/enqueue_one");
    configure(&mut group, durability);
    group.throughput(Throughput::Elements(1));
    group.bench_function(&name, |b| b.to_async(rt).iter(|| fx.send(&fx.alice, "bob")));
    group.finish();

    let mut group = c.benchmark_group("store/enqueue_batch256");
    configure(&mut group, durability);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(&name, |b| b.to_async(rt).iter(|| fx.send_batch(|i| &fx.recipients[i])));
    group.finish();

    let mut group = c.benchmark_group("store/enqueue_ack_one");
    configure(&mut group, durability);
    group.throughput(Throughput::Elements(1));
    let erin = QueueKey::new("erin", 1);
    let acked = AtomicU64::new(fx.tail(rt, &erin));
    group.bench_function(&name, |b| {
        b.to_async(rt).iter(|| async {
            fx.send(&fx.alice, "erin").await;
            let up_to = acked.fetch_add(1, Ordering::Relaxed) + 1;
            let bounds = fx.store().ack(erin.clone(), up_to).await.expect("acked");
            assert_eq!((bounds.head, bounds.tail), (up_to, up_to));
            black_box(bounds)
        })
    });
    group.finish();

    let mut group = c.benchmark_group("store/enqueue256_ack");
    configure(&mut group, durability);
    group.throughput(Throughput::Elements(BATCH as u64));
    let frank = QueueKey::new("frank", 1);
    let acked = AtomicU64::new(fx.tail(rt, &frank));
    group.bench_function(&name, |b| {
        b.to_async(rt).iter(|| async {
            fx.send_batch(|_| "frank").await;
            let up_to = acked.fetch_add(BATCH as u64, Ordering::Relaxed) + BATCH as u64;
            let bounds = fx.store().ack(frank.clone(), up_to).await.expect("acked");
            assert_eq!((bounds.head, bounds.tail), (up_to, up_to));
            black_box(bounds)
        })
    });
    group.finish();
}

fn store(c: &mut Criterion) {
    let rt = runtime();
    for durability in TIERS {
        tier(c, &rt, durability);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = store
}
criterion_main!(benches);
