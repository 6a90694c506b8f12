//! Reconnect delays: exponential with full jitter.

use std::time::Duration;

/// Delays between reconnect attempts: after `n` failures since the last reset, uniform in
/// `[0, min(max, min·2^n)]`. Full jitter, so a fleet that lost its peer at once does not come
/// back at once.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            failures: 0,
        }
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        // 2^20 times any sensible minimum is past any sensible maximum.
        self.min
            .saturating_mul(2u32.saturating_pow(self.failures.min(20)))
            .min(self.max)
    }

    /// The delay before the next attempt; counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.ceiling().mul_f64(rand::random::<f64>());
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Starts again from `min`, after a connection that worked.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_full_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut backoff = Backoff::new(min, max);
        for failures in 0..40u32 {
            let ceiling = min
                .saturating_mul(2u32.saturating_pow(failures.min(20)))
                .min(max);
            assert_eq!(backoff.ceiling(), ceiling, "after {failures} failures");
            for _ in 0..50 {
                assert!(backoff.clone().next_delay() <= ceiling);
            }
            backoff.next_delay();
        }
        // Full jitter spreads delays over the whole range rather than bunching at the cap.
        let samples: Vec<Duration> = (0..1000).map(|_| backoff.clone().next_delay()).collect();
        assert!(samples.iter().any(|d| *d < Duration::from_secs(1)));
        assert!(samples.iter().any(|d| *d > Duration::from_secs(4)));
    }

    #[test]
    fn a_reset_starts_again_from_the_minimum() {
        let (min, max) = (Duration::from_millis(250), Duration::from_secs(30));
        let mut backoff = Backoff::new(min, max);
        assert_eq!(backoff.ceiling(), min);
        for _ in 0..10 {
            backoff.next_delay();
        }
        assert_eq!(backoff.ceiling(), max);
        backoff.reset();
        assert_eq!(backoff.ceiling(), min);
        assert!(backoff.next_delay() <= min);
        assert_eq!(backoff.ceiling(), min * 2);
    }

    #[test]
    fn a_maximum_below_the_minimum_caps_every_delay() {
        let mut backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(1));
        for _ in 0..100 {
            assert!(backoff.next_delay() <= Duration::from_secs(1));
        }
    }
}
