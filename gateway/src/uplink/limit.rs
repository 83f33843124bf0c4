//! The upload bandwidth limit (`relay.max_upload_rate`): a token bucket over request
//! bodies as sent (compressed). A request is never split: one that is larger than what
//! the bucket holds goes out at once and the requests after it wait until the debt is
//! paid, so over any stretch longer than a few requests the rate stays at the limit.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct RateLimit {
    /// Bytes per second.
    rate: f64,
    /// The most that can be saved up while idle: one second's worth.
    capacity: f64,
    /// Bytes that may go out now; negative while in debt.
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub(crate) fn new(bytes_per_second: u64, now: Instant) -> Self {
        let rate = bytes_per_second.max(1) as f64;
        Self {
            rate,
            capacity: rate,
            tokens: rate,
            last: now,
        }
    }

    /// The limit, bytes per second.
    pub(crate) fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Books `bytes` to be sent, and says how long to wait first.
    pub(crate) fn reserve(&mut self, bytes: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
        let wait = if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        };
        self.tokens -= bytes as f64;
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `sizes` in turn, each after the wait the limiter asks for; returns the
    /// achieved rate over the whole run.
    fn simulate(rate: u64, sizes: impl Iterator<Item = u64>) -> f64 {
        let t0 = Instant::now();
        let mut now = t0;
        let mut limit = RateLimit::new(rate, t0);
        let mut sent = 0u64;
        for n in sizes {
            now += limit.reserve(n, now);
            sent += n;
        }
        // The last request leaves at `now`; its bytes count against the time after it.
        sent as f64
            / (now - t0 + Duration::from_secs_f64(0.0))
                .as_secs_f64()
                .max(1e-9)
    }

    #[test]
    fn small_requests_average_the_limit() {
        // 60 s worth at 10 KiB/s in 1 KiB requests: the first second's saving is the
        // only excess.
        let rate = simulate(10_240, std::iter::repeat_n(1_024, 600));
        assert!((rate / 10_240.0 - 1.0).abs() < 0.05, "{rate}");
    }

    #[test]
    fn requests_larger_than_a_second_s_worth_still_average_the_limit() {
        let rate = simulate(10_000, std::iter::repeat_n(45_000, 40));
        assert!((rate / 10_000.0 - 1.0).abs() < 0.05, "{rate}");
    }

    #[test]
    fn idle_time_saves_at_most_one_second() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(1_000, t0);
        assert_eq!(l.reserve(1_000, t0), Duration::ZERO);
        // An hour idle: still only one second's worth may go at once.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(l.reserve(3_000, later), Duration::ZERO);
        assert_eq!(l.reserve(1, later), Duration::from_secs(2));
    }
}
