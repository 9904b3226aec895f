//! Account records missing here, looked up at the other mesh members at
//! most once per key and TTL.
//!
//! A `Login`, `Send` or `ListDevices` naming a handle (or a device) this
//! broker holds no record of asks every live member (`AccountGet`). Before
//! authentication that is a fan-out anyone could trigger, so the answer is
//! shared: concurrent requests for one key wait for the same lookup, and a
//! miss is remembered for `limits.account_miss_cache_secs`, so a flood of
//! unknown handles costs one lookup per handle and TTL. A found record is
//! kept in the store by the mesh, and callers read the store first, so
//! only misses are served from here; a failed lookup is forgotten at once.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;

use crate::store::{Account, StoreError};

type Found = Result<Option<Arc<Account>>, StoreError>;

/// What was looked up: a handle, or a device of a handle whose record here
/// lacks it.
type Key = (String, Option<u32>);

/// Shared lookups and remembered misses, for every session of a broker.
#[derive(Debug)]
pub(crate) struct AccountLookups {
    recent: moka::sync::Cache<Key, Arc<OnceCell<Found>>>,
    /// Lookups sent to the mesh, for tests and `/metrics`.
    remote: AtomicU64,
}

impl AccountLookups {
    pub(crate) fn new(miss_ttl: Duration, max_keys: u64) -> Self {
        // A TTL of 0 still coalesces concurrent lookups.
        let ttl = miss_ttl.max(Duration::from_millis(1));
        Self { recent: moka::sync::Cache::builder().max_capacity(max_keys).time_to_live(ttl).build(), remote: 0.into() }
    }

    /// Lookups this broker's sessions sent to other members so far.
    pub(crate) fn remote(&self) -> u64 {
        self.remote.load(Ordering::Relaxed)
    }

    /// The result of `lookup` for `handle` (and `device`): the one already
    /// made within the TTL if it found nothing, else a new one.
    pub(crate) async fn get<F, Fut>(&self, handle: &str, device: Option<u32>, lookup: F) -> Found
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Found>,
    {
        let key = (handle.to_owned(), device);
        let cell = self.recent.get_with(key.clone(), || Arc::new(OnceCell::new()));
        let mut asked = false;
        let found = cell
            .get_or_init(|| {
                asked = true;
                self.remote.fetch_add(1, Ordering::Relaxed);
                lookup()
            })
            .await
            .clone();
        let label = match &found {
            Ok(None) => "missing",
            Ok(Some(_)) => "found",
            Err(_) => "failed",
        };
        if asked {
            metrics::counter!("tern_account_lookups_total", "result" => label).increment(1);
        } else {
            metrics::counter!("tern_account_lookups_total", "result" => "cached_miss").increment(1);
        }
        // Only a miss is worth remembering: a found record is in the store
        // now, and a failure should be retried.
        if !matches!(found, Ok(None)) {
            self.recent.invalidate(&key);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_miss_is_looked_up_once_per_ttl_and_a_failure_not_remembered() {
        let lookups = AccountLookups::new(Duration::from_secs(60), 100);
        for _ in 0..5 {
            assert!(lookups.get("ghost", None, || async { Ok(None) }).await.unwrap().is_none());
        }
        assert_eq!(lookups.remote(), 1);
        lookups.get("ghost", Some(2), || async { Ok(None) }).await.unwrap();
        assert_eq!(lookups.remote(), 2, "a device of a handle is its own key");
        for _ in 0..2 {
            let failed = lookups.get("flaky", None, || async { Err(StoreError::Unavailable("down".into())) }).await;
            assert!(failed.is_err());
        }
        assert_eq!(lookups.remote(), 4, "failures are asked again");
    }

    #[tokio::test]
    async fn concurrent_lookups_of_one_key_share_one() {
        let lookups = AccountLookups::new(Duration::from_secs(60), 100);
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(None)
        };
        let all = futures::future::join_all((0..20).map(|_| lookups.get("ghost", None, slow))).await;
        assert!(all.iter().all(|r| matches!(r, Ok(None))));
        assert_eq!(lookups.remote(), 1);
    }
}
