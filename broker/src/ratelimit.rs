//! Rate limits: one token bucket per key (a source address, a handle, a
//! device), kept in a bounded moka cache.
//!
//! A session asks its limiter before it does the work a request costs:
//! [`Limiter::take`] either allows the request or says how long until one
//! would be allowed, which the client is told as `RATE_LIMITED` with a
//! retry-after. Each bucket is a single instant, as in the generic cell
//! rate algorithm (GCRA): the time at which it is full again. A request
//! moves that instant one refill interval later and is allowed while it
//! stays within `burst` intervals of now. So a bucket costs one `Instant`,
//! and a key left alone until its bucket is full again may be forgotten
//! without changing anything: the cache drops keys idle that long, and the
//! least recently used ones when it holds `rate.max_keys`.
//!
//! Time is an input (`now`), so the arithmetic is tested without clocks.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{IpNet, Rate, RateSection};
use crate::store::QueueKey;

/// A request refused by a limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateLimited {
    /// Which limit (`register_per_ip`, `sends_per_device`, ...).
    pub(crate) what: &'static str,
    /// How long until the same request may be allowed.
    pub(crate) retry_after: Duration,
}

impl std::fmt::Display for RateLimited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rate limited ({}); retry after {} ms", self.what, retry_after_ms(self.retry_after))
    }
}

/// `retry_after` in whole milliseconds, rounded up (never 0).
pub(crate) fn retry_after_ms(retry_after: Duration) -> u32 {
    let ms = retry_after.as_nanos().div_ceil(1_000_000).max(1);
    u32::try_from(ms).unwrap_or(u32::MAX)
}

/// One bucket's arithmetic. `full_at` is the instant at which the bucket
/// is full again (at or before now: full).
fn take(full_at: &mut Instant, rate: Rate, now: Instant) -> Result<(), Duration> {
    let interval = Duration::from_millis(rate.refill_ms);
    let next = (*full_at).max(now) + interval;
    let limit = now + interval * rate.burst;
    if next <= limit {
        *full_at = next;
        Ok(())
    } else {
        Err(next - limit)
    }
}

/// Token buckets of one kind, one per key.
#[derive(Debug)]
pub(crate) struct Limiter<K: Hash + Eq + Send + Sync + 'static> {
    what: &'static str,
    rate: Rate,
    buckets: moka::sync::Cache<K, Arc<Mutex<Instant>>>,
}

impl<K: Hash + Eq + Send + Sync + 'static> Limiter<K> {
    pub(crate) fn new(what: &'static str, rate: Rate, max_keys: u64) -> Self {
        // Idle this long, a bucket is full again: forgetting it is exact.
        let refill_all = Duration::from_millis(rate.refill_ms.saturating_mul(u64::from(rate.burst)));
        let buckets = moka::sync::Cache::builder().max_capacity(max_keys).time_to_idle(refill_all).build();
        Self { what, rate, buckets }
    }

    /// Takes one request's worth from `key`'s bucket, or says how long
    /// until there is one. Counts refusals in `tern_rate_limited_total`.
    pub(crate) fn take(&self, key: K, now: Instant) -> Result<(), RateLimited> {
        let bucket = self.buckets.get_with(key, || Arc::new(Mutex::new(now)));
        let mut full_at = bucket.lock().unwrap_or_else(PoisonError::into_inner);
        take(&mut full_at, self.rate, now).map_err(|retry_after| {
            metrics::counter!("tern_rate_limited_total", "what" => self.what).increment(1);
            RateLimited { what: self.what, retry_after }
        })
    }

    /// True when `key`'s bucket holds less than half its burst.
    pub(crate) fn is_low(&self, key: &K, now: Instant) -> bool {
        let Some(bucket) = self.buckets.get(key) else { return false };
        let full_at = *bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let half = Duration::from_millis(self.rate.refill_ms.saturating_mul(u64::from(self.rate.burst)) / 2);
        full_at.saturating_duration_since(now) > half
    }

    /// True when `key`'s bucket has nothing left (without taking anything).
    pub(crate) fn is_empty(&self, key: &K, now: Instant) -> bool {
        let Some(bucket) = self.buckets.get(key) else { return false };
        let mut full_at = *bucket.lock().unwrap_or_else(PoisonError::into_inner);
        take(&mut full_at, self.rate, now).is_err()
    }
}

/// The key a source address is limited by: IPv4 addresses one by one,
/// IPv6 addresses by their /64 (what one subscriber is usually given, so
/// taking a new address from it buys nothing).
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) >> 64 << 64).into()),
        v4 => v4,
    }
}

/// Every limiter of a broker, shared by its sessions.
#[derive(Debug)]
pub(crate) struct RateLimits {
    enabled: bool,
    exempt: Vec<IpNet>,
    pub(crate) handshakes: Limiter<IpAddr>,
    pub(crate) register: Limiter<IpAddr>,
    pub(crate) login: Limiter<IpAddr>,
    pub(crate) login_failures: Limiter<String>,
    pub(crate) sends: Limiter<QueueKey>,
    pub(crate) lookups: Limiter<QueueKey>,
    pub(crate) key_claims: Limiter<(QueueKey, String)>,
}

impl RateLimits {
    pub(crate) fn new(c: &RateSection) -> Self {
        Self {
            enabled: c.enabled,
            exempt: c.exempt.clone(),
            handshakes: Limiter::new("handshakes_per_ip", c.handshakes_per_ip, c.max_keys),
            register: Limiter::new("register_per_ip", c.register_per_ip, c.max_keys),
            login: Limiter::new("login_per_ip", c.login_per_ip, c.max_keys),
            login_failures: Limiter::new("login_failures_per_handle", c.login_failures_per_handle, c.max_keys),
            sends: Limiter::new("sends_per_device", c.sends_per_device, c.max_keys),
            lookups: Limiter::new("lookups_per_device", c.lookups_per_device, c.max_keys),
            key_claims: Limiter::new(
                "key_claims_per_device_and_target",
                c.key_claims_per_device_and_target,
                c.max_keys,
            ),
        }
    }

    /// True when requests from `ip` are rate limited at all.
    pub(crate) fn applies_to(&self, ip: IpAddr) -> bool {
        self.enabled && !self.exempt.iter().any(|net| net.contains(ip))
    }

    /// The key requests from `ip` are limited by ([`source_key`]), or `None`
    /// when they are not limited (exemption is decided on the address
    /// itself, not on its /64).
    pub(crate) fn source(&self, ip: IpAddr) -> Option<IpAddr> {
        self.applies_to(ip).then(|| source_key(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_bucket_allows_its_burst_then_one_per_interval() {
        let rate = Rate::new(3, 100);
        let t0 = Instant::now();
        let mut full_at = t0;
        for _ in 0..3 {
            take(&mut full_at, rate, t0).unwrap();
        }
        assert_eq!(take(&mut full_at, rate, t0), Err(100 * MS), "empty: the next token is 100 ms away");
        assert_eq!(take(&mut full_at, rate, t0 + 40 * MS), Err(60 * MS));
        take(&mut full_at, rate, t0 + 100 * MS).unwrap();
        assert_eq!(take(&mut full_at, rate, t0 + 100 * MS), Err(100 * MS));
        // Idle for longer than a full refill: a whole burst again, no more.
        let later = t0 + 10_000 * MS;
        for _ in 0..3 {
            take(&mut full_at, rate, later).unwrap();
        }
        assert!(take(&mut full_at, rate, later).is_err());
    }

    #[test]
    fn a_refused_request_takes_nothing() {
        let rate = Rate::new(1, 1000);
        let t0 = Instant::now();
        let mut full_at = t0;
        take(&mut full_at, rate, t0).unwrap();
        for i in 0..10 {
            assert!(take(&mut full_at, rate, t0 + i * 10 * MS).is_err());
        }
        take(&mut full_at, rate, t0 + 1000 * MS).expect("hammering while empty does not push the refill back");
    }

    #[test]
    fn the_sustained_rate_is_one_per_interval() {
        let rate = Rate::new(5, 10);
        let t0 = Instant::now();
        let mut full_at = t0;
        let allowed = (0..10_000u32).filter(|i| take(&mut full_at, rate, t0 + *i * MS).is_ok()).count();
        // The burst of 5 in the first 5 ms, then one every 10 ms from 10 ms on.
        assert_eq!(allowed, 5 + 999);
    }

    #[test]
    fn keys_are_limited_separately_and_refusals_say_what() {
        let limiter = Limiter::new("sends_per_device", Rate::new(2, 60_000), 100);
        let now = Instant::now();
        limiter.take("a", now).unwrap();
        limiter.take("a", now).unwrap();
        assert!(!limiter.is_empty(&"b", now));
        assert!(limiter.is_empty(&"a", now));
        let refused = limiter.take("a", now).unwrap_err();
        assert_eq!(refused, RateLimited { what: "sends_per_device", retry_after: 60_000 * MS });
        assert_eq!(refused.to_string(), "rate limited (sends_per_device); retry after 60000 ms");
        limiter.take("b", now).expect("another key has its own bucket");
    }

    #[test]
    fn retry_after_rounds_up_to_a_millisecond() {
        assert_eq!(retry_after_ms(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_ms(Duration::from_micros(1500)), 2);
        assert_eq!(retry_after_ms(Duration::from_secs(30)), 30_000);
    }

    #[test]
    fn ipv6_sources_share_their_slash_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn loopback_is_exempt_by_default_and_nothing_is_when_disabled() {
        let limits = RateLimits::new(&RateSection::default());
        assert!(!limits.applies_to("127.0.0.1".parse().unwrap()));
        assert!(!limits.applies_to("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!limits.applies_to("::1".parse().unwrap()));
        assert!(limits.applies_to("192.0.2.7".parse().unwrap()));
        let off = RateLimits::new(&RateSection { enabled: false, ..RateSection::default() });
        assert!(!off.applies_to("192.0.2.7".parse().unwrap()));
    }

    /// The handshake limit first checked the exemption on the /64 key, so
    /// `::1` (exempt as ::1/128, keyed as `::`) was limited.
    #[test]
    fn exemption_is_decided_on_the_address_and_the_key_is_its_slash_64() {
        let limits = RateLimits::new(&RateSection::default());
        assert_eq!(limits.source("::1".parse().unwrap()), None);
        assert_eq!(limits.source("127.0.0.2".parse().unwrap()), None);
        let v6: IpAddr = "2001:db8::1:2".parse().unwrap();
        assert_eq!(limits.source(v6), Some(source_key(v6)));
    }
}
