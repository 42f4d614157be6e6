//! Retries: the one place where transient failures are retried — exponential backoff with
//! jitter from the `backoff` crate. Each boundary's error type says whether it is transient;
//! permanent errors stop at once. Two shapes:
//! - [`retry`]: one call, retried within a budget (then the last error surfaces);
//! - [`Backoff`]: the waits of a loop that retries until the failure heals or the loop is
//!   cancelled (a command's store writes, the relay's rounds, a partition queue's errors). The
//!   consumer's main queue is never waited on: its errors are reports, and a pause there
//!   would hold up the group's rebalances.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff as _;
use tokio_util::sync::CancellationToken;

/// What every boundary error answers: may the same call succeed later?
pub trait Transient {
    /// `true` when retrying the same operation may succeed (timeouts, resets, 5xx, 429…).
    fn is_transient(&self) -> bool;
    /// A wait the other side asked for (`Retry-After`), used instead of the backoff interval.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
    /// A transient failure that retrying within this call cannot heal (a circuit open): the
    /// call gives up at once, and the caller's caller tries again later.
    fn stops_retries(&self) -> bool {
        false
    }
}

/// How long and how fast to retry.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First wait.
    pub initial: Duration,
    /// Longest single wait.
    pub max_interval: Duration,
    /// Give up (surface the last transient error) after this much time in total.
    pub max_elapsed: Duration,
}

impl RetryPolicy {
    /// A policy with the given total budget and sensible intervals (100 ms doubling to 5 s).
    pub fn with_budget(max_elapsed: Duration) -> Self {
        Self {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_secs(5),
            max_elapsed,
        }
    }

    /// A policy without a budget for loops that retry until healed or cancelled: 200 ms
    /// doubling to `max_interval`.
    pub const fn until_cancelled(max_interval: Duration) -> Self {
        Self {
            initial: Duration::from_millis(200),
            max_interval,
            max_elapsed: Duration::MAX,
        }
    }

    fn backoff(&self) -> ExponentialBackoff {
        ExponentialBackoff {
            initial_interval: self.initial,
            current_interval: self.initial,
            max_interval: self.max_interval,
            max_elapsed_time: (self.max_elapsed != Duration::MAX).then_some(self.max_elapsed),
            randomization_factor: 0.5,
            multiplier: 2.0,
            ..ExponentialBackoff::default()
        }
    }
}

/// Runs `op` until it succeeds, fails permanently, or the policy's budget is spent; in the
/// last case the last transient error is returned. `what` names the operation in log lines.
pub async fn retry<T, E, F, Fut>(policy: &RetryPolicy, what: &str, mut op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Transient + Display,
{
    // A server-given wait (`Retry-After`) bypasses the backoff's own clock, so the budget is
    // checked here too: no wait may end past it.
    let started = std::time::Instant::now();
    backoff::future::retry_notify(
        policy.backoff(),
        || {
            let attempt = op();
            async move { attempt.await.map_err(|e| classify(e, policy, started)) }
        },
        |err: E, wait: Duration| note_retry(what, &err, wait),
    )
    .await
}

/// How the backoff treats a failure: permanent, retried after the server's wait (while it ends
/// within the budget started at `started`), or retried on the backoff's own clock.
fn classify<E: Transient>(
    e: E,
    policy: &RetryPolicy,
    started: std::time::Instant,
) -> backoff::Error<E> {
    if !e.is_transient() || e.stops_retries() {
        backoff::Error::permanent(e)
    } else if let Some(wait) = e.retry_after() {
        if started.elapsed() + wait > policy.max_elapsed {
            backoff::Error::permanent(e)
        } else {
            backoff::Error::retry_after(e, wait)
        }
    } else {
        backoff::Error::transient(e)
    }
}

/// Counts and logs one retry of `what`.
fn note_retry(what: &str, err: &dyn Display, wait: Duration) {
    let operation = what.trim_end_matches(|c: char| c.is_ascii_digit() || c == ' ');
    crate::metrics::metrics()
        .retries
        .with_label_values(&[operation])
        .inc();
    tracing::warn!(operation = what, error = %err, retry_in_ms = wait.as_millis() as u64, "transient failure; retrying");
}

/// [`retry`] for blocking code (a consumer's metadata calls on a blocking thread): the same
/// backoff, budget, failure classification and log line, the waits spent sleeping the
/// calling thread.
pub fn retry_blocking<T, E, F>(policy: &RetryPolicy, what: &str, mut op: F) -> Result<T, E>
where
    F: FnMut() -> Result<T, E>,
    E: Transient + Display,
{
    let started = std::time::Instant::now();
    backoff::retry_notify(
        policy.backoff(),
        || op().map_err(|e| classify(e, policy, started)),
        |err: E, wait: Duration| note_retry(what, &err, wait),
    )
    .map_err(|e| match e {
        backoff::Error::Permanent(e) | backoff::Error::Transient { err: e, .. } => e,
    })
}

/// The waits of a loop that retries until the failure heals or the loop is cancelled.
pub struct Backoff {
    policy: RetryPolicy,
    inner: ExponentialBackoff,
}

/// The loop was cancelled while it waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl Backoff {
    pub fn new(policy: RetryPolicy) -> Self {
        Backoff {
            policy,
            inner: policy.backoff(),
        }
    }

    /// After a success: the next failure waits the shortest time again.
    pub fn reset(&mut self) {
        self.inner = self.policy.backoff();
    }

    /// Sleeps the next wait; `Err(Cancelled)` as soon as `cancel` fires.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> Result<(), Cancelled> {
        let wait = self
            .inner
            .next_backoff()
            .unwrap_or(self.policy.max_interval);
        tokio::select! {
            _ = cancel.cancelled() => Err(Cancelled),
            _ = tokio::time::sleep(wait) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct E(bool);
    impl Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "e({})", self.0)
        }
    }
    impl Transient for E {
        fn is_transient(&self) -> bool {
            self.0
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(1),
            max_interval: Duration::from_millis(5),
            max_elapsed: Duration::from_millis(300),
        }
    }

    #[test]
    fn blocking_retries_transient_errors_and_stops_at_a_permanent_one() {
        let mut calls = 0;
        let out: Result<u32, E> = retry_blocking(&fast(), "t", || {
            calls += 1;
            if calls < 3 { Err(E(true)) } else { Ok(calls) }
        });
        assert_eq!(out.unwrap(), 3);
        let mut calls = 0;
        let out: Result<(), E> = retry_blocking(&fast(), "t", || {
            calls += 1;
            Err(E(false))
        });
        assert!(!out.unwrap_err().0);
        assert_eq!(calls, 1);
        let out: Result<(), E> = retry_blocking(&fast(), "t", || Err(E(true)));
        assert!(
            out.unwrap_err().0,
            "the last transient error once the budget is spent"
        );
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let out: Result<u32, E> = retry(&fast(), "t", || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if n < 3 { Err(E(true)) } else { Ok(n) }
        })
        .await;
        assert_eq!(out.unwrap(), 3);
    }

    #[tokio::test]
    async fn permanent_errors_stop_at_once() {
        let calls = AtomicU32::new(0);
        let out: Result<(), E> = retry(&fast(), "t", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(E(false))
        })
        .await;
        assert!(out.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_backoff_grows_resets_and_stops_on_cancel() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(1),
            max_interval: Duration::from_millis(4),
            max_elapsed: Duration::MAX,
        };
        let mut b = Backoff::new(policy);
        for _ in 0..20 {
            assert_eq!(b.wait(&CancellationToken::new()).await, Ok(()));
        }
        b.reset();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let long = RetryPolicy::until_cancelled(Duration::from_secs(3600));
        assert_eq!(Backoff::new(long).wait(&cancel).await, Err(Cancelled));
    }

    #[tokio::test]
    async fn budget_exhausted_surfaces_the_transient_error() {
        let calls = AtomicU32::new(0);
        let out: Result<(), E> = retry(&fast(), "t", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(E(true))
        })
        .await;
        assert!(out.unwrap_err().0);
        assert!(calls.load(Ordering::SeqCst) > 1);
    }
}
