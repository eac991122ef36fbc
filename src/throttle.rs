//! A token bucket that caps replication bandwidth (`--max-rate`), so that
//! shipping a large change never saturates the link the guests also use.
//! One second of the rate is the largest burst.

use std::time::{Duration, Instant};

/// The bucket.
#[derive(Debug)]
pub struct Throttle {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Throttle {
    /// A bucket of `bytes_per_sec`, starting full.
    pub fn new(bytes_per_sec: u64) -> Throttle {
        let rate = bytes_per_sec.max(1) as f64;
        Throttle {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    /// Takes `bytes` from the bucket; returns how long to wait before
    /// sending them so that the rate holds.
    pub fn take(&mut self, bytes: u64) -> Duration {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_with_the_debt() {
        let mut t = Throttle::new(1000);
        assert_eq!(t.take(1000), Duration::ZERO, "a full bucket's burst");
        let wait = t.take(500);
        assert!(
            wait > Duration::from_millis(450) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        let wait = t.take(1000);
        assert!(wait > Duration::from_millis(1400), "{wait:?}");
    }
}
