//! OAuth2 client-credentials authorization (RFC 6749 §4.4) with the management system: one
//! cached token, refreshed shortly before it expires or once after a 401, shared by every
//! caller — concurrent callers wait for the one refresh in flight instead of each asking.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{MAX_SMALL_BODY_BYTES, UpstreamError, join, read_limited, retry_after};
use crate::retry::{RetryPolicy, retry};

/// An access token as handed to callers. Its value never prints.
#[derive(Clone)]
pub struct Token {
    value: SecretString,
    /// Which fetch produced it, so a 401 invalidates only the token that failed.
    generation: u64,
}

impl Token {
    /// The bearer value, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        self.value.expose_secret()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token([redacted], generation {})", self.generation)
    }
}

struct Cached {
    token: Token,
    refresh_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    /// Any JSON number, or absent: clamped by [`token_lifetime`].
    #[serde(default)]
    expires_in: Option<serde_json::Number>,
}

/// Shortest and longest token lifetime believed, and the one assumed when none is given.
const MIN_LIFETIME: Duration = Duration::from_secs(1);
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// The lifetime to plan with: a missing `expires_in` is 5 minutes; zero, negative or tiny
/// ones are 1 s (a token request a second at most, never a hot loop); absurd ones (beyond a day, or beyond
/// what a clock can add) are a day.
fn token_lifetime(expires_in: Option<&serde_json::Number>) -> Duration {
    let Some(n) = expires_in else {
        return DEFAULT_LIFETIME;
    };
    let seconds = n.as_f64().unwrap_or(0.0);
    if !seconds.is_finite() || seconds <= MIN_LIFETIME.as_secs_f64() {
        return MIN_LIFETIME;
    }
    if seconds >= MAX_LIFETIME.as_secs_f64() {
        return MAX_LIFETIME;
    }
    Duration::from_secs_f64(seconds)
}

/// Hands out the current access token, fetching a new one when needed.
pub struct TokenSource {
    http: reqwest::Client,
    token_url: url::Url,
    client_id: String,
    client_secret: SecretString,
    policy: RetryPolicy,
    cache: Mutex<Option<Cached>>,
    generation: AtomicU64,
    requests: AtomicU64,
    /// The system's rate limit and circuit; none in tools and some tests.
    guard: Option<Arc<super::Guard>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("requests", &self.requests_sent())
            .finish()
    }
}

impl TokenSource {
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        client_id: String,
        client_secret: SecretString,
        policy: RetryPolicy,
    ) -> Result<Self, UpstreamError> {
        Ok(Self {
            http,
            token_url: join(base_url, "oauth2/token")?,
            client_id,
            client_secret,
            policy,
            cache: Mutex::new(None),
            generation: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            guard: None,
        })
    }

    /// The same source behind a system's rate limit and circuit.
    pub fn with_guard(mut self, guard: Arc<super::Guard>) -> Self {
        self.guard = Some(guard);
        self
    }

    /// The client id (not secret), for messages.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// How many token requests this source has sent.
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A valid token: the cached one, or a fresh one. Each attempt holds the lock for one
    /// request, so concurrent callers share a single refresh; the waits between attempts
    /// (backoff, `Retry-After`) hold nothing, and a caller that comes in meanwhile takes the
    /// token another caller got.
    pub async fn token(&self) -> Result<Token, UpstreamError> {
        retry(&self.policy, "token request", || async {
            let mut cache = self.cache.lock().await;
            if let Some(cached) = cache.as_ref()
                && Instant::now() < cached.refresh_at
            {
                return Ok(cached.token.clone());
            }
            let fresh = match &self.guard {
                Some(guard) => {
                    guard.check()?;
                    guard.pace().await;
                    let fresh = self.request().await;
                    guard.record(&fresh);
                    fresh?
                }
                None => self.request().await?,
            };
            let token = fresh.token.clone();
            *cache = Some(fresh);
            Ok(token)
        })
        .await
    }

    /// One token request at start-up, without retries: a refusal no wait cures (wrong client
    /// credentials, a failed TLS handshake) is returned for the caller to stop on; a
    /// transient failure is returned too, for the caller to log and go on. A token got is
    /// cached for the first command.
    pub async fn authorize_once(&self) -> Result<(), UpstreamError> {
        let mut cache = self.cache.lock().await;
        if cache.is_some() {
            return Ok(());
        }
        *cache = Some(self.request().await?);
        Ok(())
    }

    /// How long the cached token is used before it is refreshed; `None` without one (or
    /// while a refresh holds the cache).
    pub fn valid_for(&self) -> Option<Duration> {
        let cache = self.cache.try_lock().ok()?;
        let cached = cache.as_ref()?;
        cached.refresh_at.checked_duration_since(Instant::now())
    }

    /// Forgets `token` after the server refused it (401), unless a newer one replaced it.
    pub async fn invalidate(&self, token: &Token) {
        let mut cache = self.cache.lock().await;
        if cache
            .as_ref()
            .is_some_and(|c| c.token.generation == token.generation)
        {
            *cache = None;
        }
    }

    async fn request(&self) -> Result<Cached, UpstreamError> {
        const WHAT: &str = "token request";
        self.requests.fetch_add(1, Ordering::Relaxed);
        let sent_at = Instant::now();
        let response = self
            .http
            .post(self.token_url.clone())
            .basic_auth(&self.client_id, Some(self.client_secret.expose_secret()))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .map_err(|source| super::unanswered(WHAT, source, "upstream.ca_file"))?;
        let status = response.status();
        let wait = retry_after(response.headers());
        let body = read_limited(response, MAX_SMALL_BODY_BYTES, WHAT).await?;
        if status == reqwest::StatusCode::UNAUTHORIZED
            || (status == reqwest::StatusCode::BAD_REQUEST && is_invalid_client(&body))
        {
            return Err(UpstreamError::InvalidClient {
                client_id: self.client_id.clone(),
            });
        }
        if !status.is_success() {
            // Never echo a token endpoint's body: it is not ours to print.
            return Err(UpstreamError::from_status(WHAT, status, wait, ""));
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::MalformedBody {
                what: WHAT.into(),
                reason: format!("not a token response ({})", e.classify_name()),
            })?;
        if parsed.access_token.is_empty()
            || parsed
                .token_type
                .as_deref()
                .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
        {
            return Err(UpstreamError::MalformedBody {
                what: WHAT.into(),
                reason: "empty access_token or a token_type other than Bearer".into(),
            });
        }
        let lifetime = token_lifetime(parsed.expires_in.as_ref());
        // Refresh a fifth of the lifetime (at most 30 s) before the server's deadline.
        let margin = (lifetime / 5).min(Duration::from_secs(30));
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(client_id = %self.client_id, expires_in_s = lifetime.as_secs(), "obtained an access token");
        Ok(Cached {
            token: Token {
                value: SecretString::from(parsed.access_token),
                generation,
            },
            refresh_at: sent_at + lifetime - margin,
        })
    }
}

fn is_invalid_client(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| e.as_str())
                .map(|e| e == "invalid_client")
        })
        .unwrap_or(false)
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "wrong shape",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

#[cfg(test)]
mod lifetime_tests {
    use super::*;

    fn n(v: serde_json::Value) -> serde_json::Number {
        match v {
            serde_json::Value::Number(n) => n,
            _ => unreachable!(),
        }
    }

    #[test]
    fn hostile_lifetimes_are_clamped() {
        assert_eq!(token_lifetime(None), DEFAULT_LIFETIME);
        for tiny in [
            serde_json::json!(0),
            serde_json::json!(-5),
            serde_json::json!(0.5),
        ] {
            assert_eq!(token_lifetime(Some(&n(tiny))), MIN_LIFETIME);
        }
        for absurd in [
            serde_json::json!(u64::MAX),
            serde_json::json!(1e300),
            serde_json::json!(i64::MAX),
        ] {
            assert_eq!(token_lifetime(Some(&n(absurd))), MAX_LIFETIME);
        }
        assert_eq!(
            token_lifetime(Some(&n(serde_json::json!(3600)))),
            Duration::from_secs(3600)
        );
        // What used to panic: an Instant plus the lifetime.
        let _ = Instant::now() + token_lifetime(Some(&n(serde_json::json!(u64::MAX))));
    }
}
