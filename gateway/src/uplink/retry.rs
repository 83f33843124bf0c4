//! One retry policy for both lanes: the backoff between attempts, the count of failed
//! attempts in a row (and so which are logged loudly), and `relay.max_attempts`. No I/O:
//! the lanes ask it what to do and do it.

use std::time::{Duration, Instant};

use super::answer::FailureKind;
use super::backoff::Backoff;
use crate::config::RelayConfig;

/// The longest a relay's `Retry-After` is honoured for (in case it is absurd).
const RETRY_AFTER_AT_MOST: Duration = Duration::from_secs(300);

/// Failed attempts in a row are logged loudly the first time and then every this many.
const LOUD_EVERY: u64 = 20;

/// The retry state of one lane (the batch lane) or one file.
#[derive(Debug)]
pub(crate) struct RetryPolicy {
    backoff: Backoff,
    max_attempts: Option<u32>,
    /// Failed attempts since the last success.
    failures: u64,
    /// Since when attempts fail (from the first failure that waited).
    failing_since: Option<Instant>,
    /// What the relay keeps failing (a batch by its first sequence, a file by its
    /// record's), and how often in a row it did.
    failing_item: Option<u64>,
    relay_failures: u32,
}

/// What to do after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Try again after [`RetryPolicy::wait`].
    Retry,
    /// The relay failed the same item `relay.max_attempts` times: stop retrying it as it
    /// is (the count starts over).
    GiveUp { attempts: u32 },
}

/// The wait before the next attempt.
#[derive(Debug)]
pub(crate) struct Wait {
    pub(crate) delay: Duration,
    /// Whether this failure is logged loudly (the first of a run, then every 20th).
    pub(crate) loud: bool,
}

/// A run of failures that a success ended.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) after: Duration,
    pub(crate) failed_attempts: u64,
}

impl RetryPolicy {
    /// `relay.backoff_initial`, `relay.backoff_max` and `relay.max_attempts`.
    pub(crate) fn new(config: &RelayConfig) -> RetryPolicy {
        RetryPolicy::with(
            Backoff::new(config.backoff_initial.get(), config.backoff_max.get()),
            config.max_attempts,
        )
    }

    fn with(backoff: Backoff, max_attempts: Option<u32>) -> RetryPolicy {
        RetryPolicy {
            backoff,
            max_attempts,
            failures: 0,
            failing_since: None,
            failing_item: None,
            relay_failures: 0,
        }
    }

    /// The next backoff delay, for a failure that is not an attempt at the relay
    /// (reading the outbox).
    pub(crate) fn backoff(&mut self) -> Duration {
        self.backoff.next_delay()
    }

    /// Counts a failed attempt at `item`. Failures the relay answered count against
    /// `relay.max_attempts`, per item: another item starts the count over.
    pub(crate) fn failed(&mut self, item: u64, kind: FailureKind) -> Verdict {
        self.failures += 1;
        let Some(max) = self.max_attempts else {
            return Verdict::Retry;
        };
        if kind != FailureKind::Relay {
            return Verdict::Retry;
        }
        if self.failing_item != Some(item) {
            self.failing_item = Some(item);
            self.relay_failures = 0;
        }
        self.relay_failures += 1;
        if self.relay_failures < max {
            return Verdict::Retry;
        }
        self.relay_failures = 0;
        Verdict::GiveUp { attempts: max }
    }

    /// How long to wait before the next attempt: the relay's `Retry-After` if it sent
    /// one (bounded), the backoff's next delay if not.
    pub(crate) fn wait(&mut self, retry_after: Option<Duration>) -> Wait {
        let delay = match retry_after {
            Some(a) => a.min(RETRY_AFTER_AT_MOST),
            None => self.backoff.next_delay(),
        };
        let loud = self.failing_since.is_none() || self.failures.is_multiple_of(LOUD_EVERY);
        self.failing_since.get_or_insert_with(Instant::now);
        Wait { delay, loud }
    }

    /// An attempt succeeded: everything starts over. Returns the run of failures it
    /// ended, if there was one.
    pub(crate) fn succeeded(&mut self) -> Option<Recovered> {
        let recovered = self.failing_since.take().map(|since| Recovered {
            after: since.elapsed(),
            failed_attempts: self.failures,
        });
        self.failures = 0;
        self.relay_failures = 0;
        self.failing_item = None;
        self.backoff.reset();
        recovered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: Option<u32>) -> RetryPolicy {
        let ms = Duration::from_millis;
        RetryPolicy::with(Backoff::with_seed(ms(100), ms(1000), 1), max_attempts)
    }

    #[test]
    fn the_first_failure_and_every_twentieth_are_loud() {
        let mut p = policy(None);
        let mut loud = vec![];
        for n in 1..=41u64 {
            assert_eq!(p.failed(1, FailureKind::Network), Verdict::Retry);
            if p.wait(None).loud {
                loud.push(n);
            }
        }
        assert_eq!(loud, [1, 20, 40]);
        let recovered = p.succeeded().expect("a run of failures ended");
        assert_eq!(recovered.failed_attempts, 41);
        assert!(p.succeeded().is_none());
        p.failed(1, FailureKind::Network);
        assert!(p.wait(None).loud, "a new run starts loud");
    }

    #[test]
    fn retry_after_wins_but_is_bounded() {
        let mut p = policy(None);
        let secs = Duration::from_secs;
        assert_eq!(p.wait(Some(secs(7))).delay, secs(7));
        assert_eq!(p.wait(Some(secs(86_400))).delay, RETRY_AFTER_AT_MOST);
        assert!(p.wait(None).delay <= Duration::from_millis(100));
    }

    #[test]
    fn max_attempts_counts_the_relays_failures_of_one_item_in_a_row() {
        let mut p = policy(Some(3));
        assert_eq!(p.failed(1, FailureKind::Relay), Verdict::Retry);
        assert_eq!(p.failed(1, FailureKind::Network), Verdict::Retry);
        assert_eq!(p.failed(1, FailureKind::Operator), Verdict::Retry);
        assert_eq!(p.failed(1, FailureKind::Relay), Verdict::Retry);
        // Another item starts over.
        assert_eq!(p.failed(2, FailureKind::Relay), Verdict::Retry);
        assert_eq!(p.failed(2, FailureKind::Relay), Verdict::Retry);
        assert_eq!(
            p.failed(2, FailureKind::Relay),
            Verdict::GiveUp { attempts: 3 }
        );
        // And so does giving up.
        assert_eq!(p.failed(2, FailureKind::Relay), Verdict::Retry);
        assert_eq!(policy(None).failed(1, FailureKind::Relay), Verdict::Retry);
    }
}
