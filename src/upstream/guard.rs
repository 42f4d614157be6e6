//! What protects one management system from product-sync and product-sync from it
//! (DESIGN.md "Several management systems"): a request rate limit (a token bucket per
//! instance, `rate_limit_per_s`) and a circuit breaker that opens after `circuit_failures`
//! consecutive transient failures, refuses requests for `circuit_open_ms`, then lets one
//! half-open probe through — closed again when it succeeds, open again when it fails.
//!
//! Only the system's own failures count (5xx, timeouts, refused or reset connections); an
//! answer of any other kind — a page, a 400, a 403, a malformed body — shows the system is
//! there and closes the circuit. A throttling 429 counts neither way.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::UpstreamError;
use crate::metrics::metrics;

/// Where a system's circuit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out since `since`; a probe that never reports back (its command was
    /// abandoned) is replaced after `open_for`.
    HalfOpen {
        since: Instant,
    },
}

/// The rate limit and circuit of one management system.
pub struct Guard {
    system: String,
    limiter: Option<DefaultDirectRateLimiter>,
    failures_to_open: u32,
    open_for: Duration,
    state: Mutex<State>,
    /// The last failure that counted, for the error of a refused call (already cut short: it
    /// is our own error text, quoting at most what `UpstreamError` quotes).
    last_failure: Mutex<String>,
    /// Calls that reached the system (refused ones not counted).
    requests: AtomicU64,
    /// When a call last got an answer (RFC 3339).
    last_success: Mutex<Option<String>>,
}

/// What the console shows of a system's recent calls.
#[derive(Debug, Clone)]
pub struct Health {
    pub requests: u64,
    pub last_success_at: Option<String>,
    pub last_failure: Option<String>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("system", &self.system)
            .field("circuit", &self.circuit())
            .finish()
    }
}

impl Guard {
    /// `rate_per_s`: `None` or 0 is no limit; the bucket holds one second's worth.
    pub fn new(
        system: &str,
        rate_per_s: Option<u32>,
        failures_to_open: u32,
        open_for: Duration,
    ) -> Self {
        let limiter = rate_per_s
            .and_then(NonZeroU32::new)
            .map(|rate| RateLimiter::direct(Quota::per_second(rate)));
        metrics().circuit_open.with_label_values(&[system]).set(0);
        // Exported from the start at 0, so a rate over it means something from the first
        // scrape (and the dashboard's panel has its series before the first retry).
        metrics().retried_commands.with_label_values(&[system]);
        Guard {
            system: system.to_owned(),
            limiter,
            failures_to_open: failures_to_open.max(1),
            open_for,
            state: Mutex::new(State::Closed { failures: 0 }),
            last_failure: Mutex::new(String::new()),
            requests: AtomicU64::new(0),
            last_success: Mutex::new(None),
        }
    }

    pub fn system(&self) -> &str {
        &self.system
    }

    /// Waits until the rate limit lets one more request go.
    pub async fn pace(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
    }

    /// Before a call that may probe: refused while the circuit is open (and while another
    /// probe is out); once the open time is over, this call is the half-open probe.
    pub fn admit(&self) -> Result<(), UpstreamError> {
        let now = Instant::now();
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now < until => Err(self.open_error(until - now)),
            State::HalfOpen { since } if now < since + self.open_for => {
                Err(self.open_error(since + self.open_for - now))
            }
            State::Open { .. } | State::HalfOpen { .. } => {
                tracing::info!(system = %self.system, "circuit half-open: one probe request goes through");
                *state = State::HalfOpen { since: now };
                Ok(())
            }
        }
    }

    /// Before a call inside one already admitted (a token request within a page fetch):
    /// refused only while the circuit is open.
    pub fn check(&self) -> Result<(), UpstreamError> {
        match *self.lock() {
            State::Open { until } if Instant::now() < until => {
                Err(self.open_error(until - Instant::now()))
            }
            _ => Ok(()),
        }
    }

    /// Records how a call ended.
    pub fn record<T>(&self, outcome: &Result<T, UpstreamError>) {
        let failed = match outcome {
            Ok(_) => false,
            Err(UpstreamError::Server { .. } | UpstreamError::Transport { .. }) => true,
            Err(UpstreamError::CircuitOpen { .. } | UpstreamError::Throttled { .. }) => return,
            Err(_) => false,
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !failed {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            *self
                .last_success
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(now);
        }
        if let (true, Err(e)) = (failed, outcome) {
            let text: String = e.to_string().chars().take(300).collect();
            *self
                .last_failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = text;
        }
        let mut state = self.lock();
        let next = match (&*state, failed) {
            (_, false) => State::Closed { failures: 0 },
            (State::Closed { failures }, true) if failures + 1 < self.failures_to_open => {
                State::Closed {
                    failures: failures + 1,
                }
            }
            (State::Open { until }, true) => State::Open { until: *until },
            (_, true) => State::Open {
                until: Instant::now() + self.open_for,
            },
        };
        let (was_open, is_open) = (
            !matches!(*state, State::Closed { .. }),
            !matches!(next, State::Closed { .. }),
        );
        *state = next;
        drop(state);
        if was_open != is_open {
            metrics()
                .circuit_open
                .with_label_values(&[&self.system])
                .set(i64::from(is_open));
            match is_open {
                true => {
                    metrics()
                        .circuit_opened
                        .with_label_values(&[&self.system])
                        .inc();
                    tracing::warn!(system = %self.system, open_ms = self.open_for.as_millis() as u64, "circuit opened: the management system keeps failing; its requests are refused until a probe succeeds");
                }
                false => {
                    tracing::info!(system = %self.system, "circuit closed: the management system answers again")
                }
            }
        }
    }

    /// Calls so far, the last answer's time and the last counted failure.
    pub fn health(&self) -> Health {
        let last_failure = self
            .last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Health {
            requests: self.requests.load(Ordering::Relaxed),
            last_success_at: self
                .last_success
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            last_failure: Some(last_failure).filter(|f| !f.is_empty()),
        }
    }

    /// Where the circuit stands now.
    pub fn circuit(&self) -> CircuitState {
        match *self.lock() {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { until } if Instant::now() < until => CircuitState::Open,
            State::Open { .. } | State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    fn open_error(&self, remaining: Duration) -> UpstreamError {
        UpstreamError::CircuitOpen {
            system: self.system.clone(),
            retry_in_ms: remaining.as_millis() as u64,
            last: self
                .last_failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value: a panic elsewhere cannot leave it half-written.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error() -> Result<(), UpstreamError> {
        Err(UpstreamError::Server {
            what: "products page 1".into(),
            status: 503,
        })
    }

    #[test]
    fn opens_after_consecutive_failures_probes_once_and_closes_on_success() {
        let g = Guard::new("t-open", None, 3, Duration::from_millis(50));
        g.record(&server_error());
        g.record(&Ok(()));
        g.record(&server_error());
        g.record(&server_error());
        assert_eq!(
            g.circuit(),
            CircuitState::Closed,
            "a success resets the count"
        );
        g.record(&server_error());
        assert_eq!(g.circuit(), CircuitState::Open);
        let refused = g.admit().expect_err("open: refused");
        assert!(
            refused.is_transient() && refused.stops_retries(),
            "{refused}"
        );
        assert!(g.check().is_err());
        std::thread::sleep(Duration::from_millis(60));
        g.admit().expect("the open time is over: one probe");
        assert!(g.admit().is_err(), "a second probe waits");
        assert!(g.check().is_ok(), "the probe's own token request may go");
        g.record(&server_error());
        assert_eq!(
            g.circuit(),
            CircuitState::Open,
            "a failed probe opens it again"
        );
        std::thread::sleep(Duration::from_millis(60));
        g.admit().expect("probe");
        g.record(&Ok(()));
        assert_eq!(g.circuit(), CircuitState::Closed);
        assert!(g.admit().is_ok() && g.admit().is_ok());
    }

    #[test]
    fn throttling_and_refusals_do_not_count_and_answers_close() {
        let g = Guard::new("t-count", None, 2, Duration::from_secs(60));
        let throttled: Result<(), _> = Err(UpstreamError::Throttled {
            what: "p".into(),
            retry_after: Duration::from_secs(1),
        });
        g.record(&server_error());
        g.record(&throttled);
        g.record(&server_error());
        assert_eq!(g.circuit(), CircuitState::Open);
        let forbidden: Result<(), _> = Err(UpstreamError::Forbidden { what: "p".into() });
        g.record(&forbidden);
        assert_eq!(g.circuit(), CircuitState::Closed, "an answer closes it");
    }

    #[tokio::test]
    async fn the_rate_limit_spaces_requests() {
        let g = Guard::new("t-rate", Some(20), 5, Duration::from_secs(1));
        let started = Instant::now();
        for _ in 0..40 {
            g.pace().await;
        }
        // A burst of 20, then 20 more at 20/s: about one second.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
    }
}
