//! Reconnect backoff: exponential with full jitter, so the clients of a
//! failed broker spread their returns over the whole interval instead of all
//! coming back in the same second.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays start near `min` and grow to at most `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), attempt: 0 }
    }

    /// The upper bound of the next delay: `min * 2^attempt`, capped at `max`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The next delay: uniform in `[min/2, ceiling]`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let floor = self.min / 2;
        if ceiling <= floor {
            return ceiling;
        }
        rand::thread_rng().gen_range(floor..=ceiling)
    }

    /// Back to the shortest delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_stays_within_bounds() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        let mut b = Backoff::new(min, max);
        let mut ceilings = Vec::new();
        for _ in 0..20 {
            let ceiling = b.ceiling();
            let d = b.next_delay();
            assert!(d >= min / 2 && d <= ceiling, "{d:?} outside [{:?}, {ceiling:?}]", min / 2);
            ceilings.push(ceiling);
        }
        assert_eq!(ceilings[0], min);
        assert_eq!(ceilings[3], min * 8);
        assert_eq!(*ceilings.last().unwrap(), max);
        b.reset();
        assert_eq!(b.ceiling(), min);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut delays = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
            for _ in 0..5 {
                b.next_delay();
            }
            delays.insert(b.next_delay().as_millis());
        }
        assert!(delays.len() > 10, "50 clients at the same attempt pick different delays");
    }
}
