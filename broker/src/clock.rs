//! The broker's hybrid logical clock: microseconds of its wall clock, but
//! always above every value it gave or was shown by another broker.
//!
//! It orders two things across brokers without trusting their clocks to
//! agree: a device's logins (the location directory's epochs, see
//! [`directory`](crate::mesh)) and one sender's messages (the stamp each
//! stored entry gets at the sender's broker, see
//! [`item`](crate::store::StoredItem)). A broker that learns another's
//! value (a login's epoch, the clock a device's previous broker reports in
//! `SenderFlushed`) observes it, so what it gives next is above it.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A hybrid logical clock (shared: the store stamps entries with it, the
/// mesh takes login epochs from it).
#[derive(Debug, Default)]
pub(crate) struct Hlc {
    last: AtomicU64,
    /// Added to the wall clock: a fault drill for clock skew (tests only).
    offset_us: AtomicI64,
}

impl Hlc {
    /// Shifts the wall clock this clock reads by `offset_ms` (a clock-skew drill).
    pub(crate) fn set_offset_ms(&self, offset_ms: i64) {
        self.offset_us.store(offset_ms.saturating_mul(1000), Ordering::Relaxed);
    }

    /// Takes note of a value given by any broker: later values from here are
    /// above it.
    pub(crate) fn observe(&self, value: u64) {
        self.last.fetch_max(value, Ordering::Relaxed);
    }

    /// The highest value given or observed so far.
    pub(crate) fn current(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    /// A fresh value: microseconds since the Unix epoch, above every value
    /// this clock gave or observed before.
    pub(crate) fn next(&self) -> u64 {
        let wall =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let now = wall.saturating_add_signed(self.offset_us.load(Ordering::Relaxed));
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_rise_and_pass_what_was_observed() {
        let clock = Hlc::default();
        let (a, b) = (clock.next(), clock.next());
        assert!(a < b);
        clock.observe(b + 3_600_000_000);
        assert!(clock.next() > b + 3_600_000_000, "a value seen is passed");
        assert_eq!(clock.current(), b + 3_600_000_001);
    }
}
