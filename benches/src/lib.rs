//! Shared set-up for the criterion benchmarks in `benches/`.
//!
//! - [`BenchStore`]: a real [`Store`] on a fresh temporary directory (under
//!   `$TMPDIR`, `/tmp` by default), with the durability under test and the
//!   broker's [`Router`] as its listener, as `Broker::spawn` wires it;
//! - [`MessageIds`]: message ids that never repeat, so no enqueue is taken for
//!   an idempotent resend;
//! - [`runtime`]: the tokio runtime the async store calls run on.
//!
//! The benchmarks themselves are `benches/codec.rs` (frame encode and
//! decode), `benches/store.rs` (enqueue and ack per durability tier) and
//! `benches/lookup.rs` (recipient handle to devices, device to live session).
//! `docs/bench/micro.md` has the results and how to run them.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;
use tern_broker::router::Router;
use tern_broker::{Durability, Store, StoreConfig};

/// Default number of accounts the store caches, as in `BrokerConfig`.
pub const DEFAULT_ACCOUNT_CACHE: u64 = 100_000;

/// A store on its own temporary directory, closed and deleted on drop.
#[derive(Debug)]
pub struct BenchStore {
    /// `None` only while [`BenchStore::reopen`] swaps it.
    store: Option<Store>,
    config: StoreConfig,
    dir: TempDir,
}

/// The store settings `Broker::spawn` would use with default configuration,
/// except the queue cap: a benchmark may put millions of entries in one queue.
pub fn store_config(path: &Path, durability: Durability, account_cache_entries: u64) -> StoreConfig {
    StoreConfig {
        path: path.to_owned(),
        durability,
        retention: Duration::from_secs(30 * 24 * 3600),
        max_queue_len: u64::MAX,
        max_entry_len: tern_broker::store::max_entry_len(tern_broker::config::LimitsConfig::default().max_frame_len),
        max_batch: 1024,
        max_devices: 16,
        account_cache_entries,
        memory_mb: tern_broker::config::StoreSection::default().memory_mb,
        keys: Default::default(),
    }
}

impl BenchStore {
    /// Opens a new, empty store.
    pub fn open(durability: Durability, account_cache_entries: u64) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tern-bench-").tempdir().context("creating a temporary directory")?;
        let config = store_config(&dir.path().join("db"), durability, account_cache_entries);
        let store = Store::open(config.clone(), Arc::new(Router::default())).context("opening the store")?;
        Ok(Self { store: Some(store), config, dir })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        self.store.as_ref().expect("a BenchStore always holds a store outside reopen")
    }

    /// The temporary directory holding the database.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Closes the store and opens the same database again with a cache of
    /// `account_cache_entries`. RocksDB flushes the recovered WAL into SST
    /// files on open, so reads then come from SST blocks, not the memtable.
    pub fn reopen(&mut self, account_cache_entries: u64) -> anyhow::Result<()> {
        if let Some(store) = self.store.take() {
            store.close();
            // Dropping the last handle closes RocksDB and releases its lock.
            drop(store);
        }
        self.config.account_cache_entries = account_cache_entries;
        let store = Store::open(self.config.clone(), Arc::new(Router::default())).context("reopening the store")?;
        self.store = Some(store);
        Ok(())
    }
}

impl Drop for BenchStore {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            store.close();
        }
    }
}

/// Message ids that never repeat within a process.
#[derive(Debug, Default)]
pub struct MessageIds(AtomicU64);

impl MessageIds {
    /// The next id.
    pub fn next(&self) -> [u8; 16] {
        u128::from(self.0.fetch_add(1, Ordering::Relaxed)).to_be_bytes()
    }
}

/// A current-thread tokio runtime: the store's writer runs on its own thread,
/// so the caller side needs only one.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
}

/// Registers `handle` with `devices` devices (keys are placeholders: the
/// store does not verify them).
pub async fn register(store: &Store, handle: &str, devices: u32) -> anyhow::Result<()> {
    store.register(handle, [1; 32]).await.with_context(|| format!("registering {handle}"))?;
    for n in 1..devices {
        store.add_device(handle, [n as u8 + 1; 32]).await.with_context(|| format!("adding a device to {handle}"))?;
    }
    Ok(())
}
