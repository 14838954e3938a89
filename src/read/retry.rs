//! Retries with a time budget: the one retry policy of the mount.
//!
//! A provider call that fails transiently (timeouts, resets, stalls, 5xx,
//! throttling) is tried again after an exponential backoff with full
//! jitter, up to `max_retries` times. The whole series — every attempt and
//! every pause — must deliver within `timeout` (`timeout=`), or it fails
//! with [`ProviderError::Unreachable`] and the read with EIO. Time spent
//! waiting for tokens is not provider time: it runs before each attempt,
//! outside the clock, so a read queued behind a low `rate=` never fails
//! for being throttled. The SDKs are set to one attempt each, so this
//! budget is the only one.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::provider::ProviderError;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries of a transient provider fault before the call fails.
    pub max_retries: u32,
    /// First backoff; doubles per retry, capped at `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Provider time for one call, retries and pauses included.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 6,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            timeout: crate::options::DEFAULT_TIMEOUT,
        }
    }
}

/// Provider time spent so far by one operation (an open spans several
/// calls: pin, then data ranges).
#[derive(Debug, Default)]
pub struct Budget {
    spent: Duration,
}

impl RetryPolicy {
    /// Runs `call` until it succeeds, fails permanently, or the retries or
    /// the time budget are spent; `wait` runs before each attempt, off the
    /// clock (the throttle).
    pub async fn run<T, W, WF, C, CF>(
        &self,
        budget: &mut Budget,
        retries: &AtomicU64,
        what: (&str, &str),
        mut wait: W,
        mut call: C,
    ) -> Result<T, ProviderError>
    where
        W: FnMut() -> WF,
        WF: Future<Output = ()>,
        C: FnMut() -> CF,
        CF: Future<Output = Result<T, ProviderError>>,
    {
        let (path, operation) = what;
        // A timeout says what the last attempt met, if it met anything.
        let timed_out = |last: &Option<ProviderError>| {
            let last = match last {
                Some(err) => format!("; the last attempt: {err}"),
                None => String::new(),
            };
            ProviderError::Unreachable(format!(
                "{operation}: the provider did not deliver within timeout={}s (retries included){last}",
                self.timeout.as_secs_f64()
            ))
        };
        let mut attempt = 0;
        let mut last = None;
        loop {
            wait().await;
            let remaining = self.timeout.saturating_sub(budget.spent);
            if remaining.is_zero() {
                return Err(timed_out(&last));
            }
            let started = Instant::now();
            let result = tokio::time::timeout(remaining, call()).await;
            budget.spent += started.elapsed();
            match result {
                Err(_) => return Err(timed_out(&last)),
                Ok(Err(err)) if err.is_transient() && attempt < self.max_retries => {
                    let left = self.timeout.saturating_sub(budget.spent);
                    let pause = backoff(attempt, self.base_backoff, self.max_backoff);
                    if pause >= left {
                        tracing::warn!(%path, "{operation} failed and no time is left for a retry: {err}");
                        return Err(timed_out(&Some(err)));
                    }
                    tracing::info!(
                        %path, attempt = attempt + 1,
                        "{operation} failed, retrying in {pause:?}: {err}"
                    );
                    retries.fetch_add(1, Ordering::Relaxed);
                    let paused = Instant::now();
                    tokio::time::sleep(pause).await;
                    // Measured: timers round up to the millisecond.
                    budget.spent += paused.elapsed();
                    attempt += 1;
                    last = Some(err);
                }
                Ok(result) => return result,
            }
        }
    }
}

/// Full jitter: a random pause in [0, min(max, base·2^attempt)], so that
/// many readers retrying together spread out.
fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = base.saturating_mul(1 << attempt.min(16)).min(max);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // A cheap mix of the clock is random enough to de-synchronise retries.
    let mixed = u64::from(nanos).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11;
    let fraction = (mixed % 1_000_001) as f64 / 1_000_000.0;
    ceiling.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn policy(timeout: Duration) -> RetryPolicy {
        RetryPolicy {
            max_retries: 100,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            timeout,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_that_never_answers_fails_at_the_timeout() {
        let retries = AtomicU64::new(0);
        let started = Instant::now();
        let result: Result<(), _> = policy(Duration::from_secs(5))
            .run(
                &mut Budget::default(),
                &retries,
                ("/vm/disk", "read"),
                || async {},
                std::future::pending,
            )
            .await;
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("timeout=5s") && !err.contains("last attempt"),
            "{err}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_faults_retry_within_the_budget_only() {
        let retries = AtomicU64::new(0);
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result: Result<(), _> = policy(Duration::from_secs(3))
            .run(
                &mut Budget::default(),
                &retries,
                ("/vm/disk", "read"),
                || async {},
                || async {
                    calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Err(ProviderError::Unreachable("reset".into()))
                },
            )
            .await;
        let err = result.unwrap_err().to_string();
        // What went wrong, not only that time ran out.
        assert!(
            err.contains("timeout=3s")
                && err.contains("the last attempt:")
                && err.contains("reset"),
            "{err}"
        );
        // Timers round up to the millisecond.
        assert!(
            started.elapsed() <= Duration::from_millis(3010),
            "{:?}",
            started.elapsed()
        );
        assert!(calls.load(Ordering::Relaxed) >= 2, "it retried");
        assert_eq!(
            u64::from(calls.load(Ordering::Relaxed)) - 1,
            retries.load(Ordering::Relaxed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_tokens_is_not_provider_time() {
        let retries = AtomicU64::new(0);
        let calls = AtomicU32::new(0);
        let result = policy(Duration::from_secs(2))
            .run(
                &mut Budget::default(),
                &retries,
                ("/vm/disk", "read"),
                // A low rate= makes each attempt wait far longer than the timeout.
                || tokio::time::sleep(Duration::from_secs(30)),
                || async {
                    let n = calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if n < 2 {
                        Err(ProviderError::Unreachable("reset".into()))
                    } else {
                        Ok(n)
                    }
                },
            )
            .await;
        assert_eq!(result.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let retries = AtomicU64::new(0);
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = policy(Duration::from_secs(60))
            .run(
                &mut Budget::default(),
                &retries,
                ("/vm/disk", "read"),
                || async {},
                || async {
                    calls.fetch_add(1, Ordering::Relaxed);
                    Err(ProviderError::Denied("no".into()))
                },
            )
            .await;
        assert!(matches!(result, Err(ProviderError::Denied(_))));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }
}
