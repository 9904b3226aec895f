//! The location directory: which broker each device is connected to.
//!
//! A device's entry lives at its shard owner, the live member (this broker
//! included) with the highest rendezvous score for the device's key, so
//! every broker computes the same owner from the same member list without
//! asking anyone. Entries are soft state: the broker a device logs in at
//! sends the owner a `Location` with an epoch, and re-sends every hosted
//! device's location whenever membership changes, so an owner that restarts
//! or a shard that moves is filled again within one gossip round.
//!
//! Epochs order the logins of one device across brokers without trusting
//! their clocks to agree: each broker's epoch clock is a hybrid logical clock
//! (microseconds of its wall clock, but always above every epoch it has seen
//! from any broker: in `Location`, `Moved` and lookup answers), and a login
//! first asks the directory where the device was, so its epoch is above that
//! login's even when this broker's clock is behind.
//!
//! The owner's table is bounded too (`cluster.directory_entries`): past it,
//! moka drops the least used entries. A dropped entry costs no message: a
//! lookup that misses makes the sender's broker hold the message, and the
//! device's next login, or the periodic re-registration of every connected
//! device by its broker (every [`REFRESH_EVERY`](super::location)), brings
//! it back.
//!
//! Lookups are cached per broker in moka (bounded, with a TTL). When the
//! owner accepts a newer location it tells every member (`Moved`), which
//! updates their caches: a stale cache entry lives at most until then, and a
//! message sent on one is never lost (the broker it reaches stores it and
//! ships it on).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Hlc;
use crate::store::QueueKey;

/// Where a device was last seen logging in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Location {
    pub(crate) node: String,
    pub(crate) epoch: u64,
}

/// The later of two locations (by epoch; `a` on a tie), or whichever is known.
pub(super) fn newest(a: Option<Location>, b: Option<Location>) -> Option<Location> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.epoch > a.epoch { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The owner's table and every broker's cache.
#[derive(Debug)]
pub(crate) struct Directory {
    /// Entries this broker holds as shard owner (and, for its own devices,
    /// as their host).
    table: moka::sync::Cache<QueueKey, Location>,
    /// Makes [`Directory::record`]'s look and write one step.
    recording: Mutex<()>,
    /// Cached lookups; `None`: the directory knows no location.
    cache: moka::sync::Cache<QueueKey, Option<Location>>,
    /// The broker's clock (the store stamps entries with it too).
    clock: Arc<Hlc>,
}

impl Directory {
    pub(crate) fn new(cache_entries: u64, ttl: Duration, table_entries: u64, clock: Arc<Hlc>) -> Self {
        Self::with_ttls(cache_entries, CacheTtl { known: ttl, unknown: UNKNOWN_TTL }, table_entries, clock)
    }

    fn with_ttls(cache_entries: u64, ttl: CacheTtl, table_entries: u64, clock: Arc<Hlc>) -> Self {
        Self {
            table: moka::sync::Cache::builder().max_capacity(table_entries).build(),
            recording: Mutex::new(()),
            cache: moka::sync::Cache::builder().max_capacity(cache_entries).expire_after(ttl).build(),
            clock,
        }
    }

    /// Takes note of an epoch given by any broker: later epochs from here
    /// are above it.
    pub(crate) fn observe(&self, epoch: u64) {
        self.clock.observe(epoch);
    }

    /// A fresh epoch: microseconds since the Unix epoch, above every epoch
    /// (and entry stamp) this broker gave or observed before.
    pub(crate) fn next_epoch(&self) -> u64 {
        self.clock.next()
    }

    /// Records a location as owner. Returns the location it replaced when
    /// the device moved to another broker; `None` when it is stale (an equal
    /// or newer epoch is known), new, or on the same broker.
    pub(crate) fn record(&self, queue: &QueueKey, location: Location) -> Recorded {
        self.observe(location.epoch);
        let _recording = self.recording.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.table.get(queue) {
            Some(known) if known.epoch >= location.epoch => Recorded::Stale,
            known => {
                let moved_from = known.as_ref().filter(|k| k.node != location.node).map(|k| k.node.clone());
                let known = known.is_some();
                self.table.insert(queue.clone(), location);
                Recorded::Fresh { moved_from, known }
            }
        }
    }

    /// The owner's entry.
    pub(crate) fn owned(&self, queue: &QueueKey) -> Option<Location> {
        self.table.get(queue)
    }

    /// Entries held as owner (moka's count, which trails the last writes).
    pub(crate) fn owned_len(&self) -> usize {
        self.table.entry_count() as usize
    }

    pub(crate) fn cached(&self, queue: &QueueKey) -> Option<Option<Location>> {
        let hit = self.cache.get(queue);
        metrics::counter!("tern_location_cache_total", "result" => if hit.is_some() { "hit" } else { "miss" })
            .increment(1);
        hit
    }

    /// The cached entry, not counted as a lookup.
    pub(crate) fn peek(&self, queue: &QueueKey) -> Option<Option<Location>> {
        self.cache.get(queue)
    }

    pub(crate) fn forget(&self, queue: &QueueKey) {
        self.cache.invalidate(queue);
    }

    pub(crate) fn cache(&self, queue: QueueKey, location: Option<Location>) {
        if let Some(l) = &location {
            self.observe(l.epoch);
        }
        self.cache.insert(queue, location);
    }

    /// Applies a `Moved` notice: the cache now points at the new broker,
    /// unless it already knows a newer location.
    pub(crate) fn invalidate(&self, queue: &QueueKey, location: Location) {
        self.observe(location.epoch);
        if let Some(Some(known)) = self.cache.get(queue) {
            if known.epoch >= location.epoch {
                return;
            }
        }
        metrics::counter!("tern_location_invalidations_total").increment(1);
        self.cache.insert(queue.clone(), Some(location));
    }
}

/// How long a cached answer that knows no location lives. An owner that
/// restarted, or a shard that just moved, answers "unknown" until the
/// device's broker registers it again (within a gossip round); a broker that
/// kept that answer for the full TTL held the device's messages that long
/// while it was online.
pub(super) const UNKNOWN_TTL: Duration = Duration::from_secs(2);

/// The cache's lifetimes: `known` for a location, `unknown` for "none known".
struct CacheTtl {
    known: Duration,
    unknown: Duration,
}

impl CacheTtl {
    fn of(&self, location: &Option<Location>) -> Duration {
        if location.is_some() {
            self.known
        } else {
            self.unknown
        }
    }
}

impl moka::Expiry<QueueKey, Option<Location>> for CacheTtl {
    fn expire_after_create(
        &self,
        _: &QueueKey,
        location: &Option<Location>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(self.of(location))
    }

    fn expire_after_update(
        &self,
        _: &QueueKey,
        location: &Option<Location>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.of(location))
    }
}

/// What [`Directory::record`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Recorded {
    Stale,
    /// Recorded; `known`: the device had an entry before.
    Fresh {
        moved_from: Option<String>,
        known: bool,
    },
}

/// The rendezvous (highest random weight) winner for `key` among `nodes`:
/// every broker with the same member list picks the same one, and when a
/// member leaves only the keys it owned move.
pub(crate) fn rendezvous<'a>(key: &[u8], nodes: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    nodes.into_iter().max_by_key(|node| (score(node, key), *node))
}

fn score(node: &str, key: &[u8]) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(node.as_bytes());
    ctx.update(&[0xff]);
    ctx.update(key);
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn rendezvous_moves_only_the_keys_of_a_member_that_leaves() {
        let all = ["a", "b", "c", "d"];
        let keys: Vec<Vec<u8>> = (0..2000u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let before: Vec<&str> = keys.iter().map(|k| rendezvous(k, all).unwrap()).collect();
        let mut per_node = HashMap::new();
        for owner in &before {
            *per_node.entry(*owner).or_insert(0) += 1;
        }
        for node in all {
            let n = per_node[node];
            assert!((350..650).contains(&n), "{node} owns {n} of 2000: not spread evenly");
        }
        let after: Vec<&str> = keys.iter().map(|k| rendezvous(k, ["a", "b", "d"]).unwrap()).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != "c" {
                assert_eq!(b, a, "a key not owned by the leaver moved");
            }
        }
    }

    /// Issue 11, 2.8: the owner's table kept every device it ever heard of.
    #[test]
    fn the_owners_table_stays_within_its_bound() {
        let d = Directory::new(10, Duration::from_secs(60), 100, Arc::default());
        for i in 0..2_000u32 {
            let q = QueueKey::new(&format!("u{i}"), 1);
            let _ = d.record(&q, Location { node: "a".into(), epoch: u64::from(i) + 1 });
        }
        d.table.run_pending_tasks();
        assert!(d.table.entry_count() <= 100, "{} entries held", d.table.entry_count());
    }

    #[test]
    fn newer_epochs_win_and_moves_are_reported() {
        let d = Directory::new(10, Duration::from_secs(60), 100, Arc::default());
        let q = QueueKey::new("bob", 1);
        let at = |node: &str, epoch| Location { node: node.into(), epoch };
        assert_eq!(d.record(&q, at("a", 5)), Recorded::Fresh { moved_from: None, known: false });
        assert_eq!(d.record(&q, at("b", 4)), Recorded::Stale);
        assert_eq!(d.record(&q, at("b", 6)), Recorded::Fresh { moved_from: Some("a".into()), known: true });
        assert_eq!(d.record(&q, at("b", 7)), Recorded::Fresh { moved_from: None, known: true });
        assert_eq!(d.owned(&q), Some(at("b", 7)));
        d.cache(q.clone(), Some(at("b", 7)));
        d.invalidate(&q, at("a", 6));
        assert_eq!(d.cached(&q), Some(Some(at("b", 7))), "an older move does not overwrite");
        d.invalidate(&q, at("c", 9));
        assert_eq!(d.cached(&q), Some(Some(at("c", 9))));
        assert!(d.next_epoch() < d.next_epoch());
    }

    /// Issue 11 (CI chaos run of stop 17): a broker that restarted asked
    /// an owner that did not know the device yet, cached "unknown" for the
    /// location cache's 60 s, and held the messages of an online device
    /// for 16 s, until its sender moved and they were overtaken.
    #[test]
    fn an_unknown_location_is_cached_briefly_and_a_known_one_for_the_ttl() {
        let ttl = CacheTtl { known: Duration::from_secs(60), unknown: Duration::from_millis(100) };
        let d = Directory::with_ttls(10, ttl, 100, Arc::default());
        let (bob, carol) = (QueueKey::new("bob", 1), QueueKey::new("carol", 1));
        d.cache(bob.clone(), None);
        d.cache(carol.clone(), Some(Location { node: "a".into(), epoch: 1 }));
        assert_eq!(d.peek(&bob), Some(None));
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(d.peek(&bob), None, "the unknown answer is asked again");
        assert!(d.peek(&carol).is_some_and(|l| l.is_some()));
        // A known location replaced by an unknown one gets the short life.
        d.cache(carol.clone(), None);
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(d.peek(&carol), None);
    }

    fn skewed(offset_ms: i64) -> Directory {
        let clock = Arc::new(Hlc::default());
        clock.set_offset_ms(offset_ms);
        Directory::new(10, Duration::from_secs(60), 100, clock)
    }

    #[test]
    fn a_clock_behind_still_gives_epochs_above_those_it_has_seen() {
        let hour_us = 3_600_000_000;
        let behind = skewed(-3_600_000);
        let ahead = skewed(3_600_000);
        let theirs = ahead.next_epoch();
        let before = behind.next_epoch();
        assert!(before + hour_us / 2 < theirs, "the drill skews the clock");
        let q = QueueKey::new("bob", 1);
        behind.invalidate(&q, Location { node: "ahead".into(), epoch: theirs });
        assert!(behind.next_epoch() > theirs, "an epoch seen is passed");
    }
}
