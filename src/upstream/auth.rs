//! OAuth2 client-credentials authorization (RFC 6749 §4.4) with the management system: one
//! cached token, refreshed shortly before it expires or once after a 401, shared by every
//! caller — concurrent callers wait for the one refresh in flight instead of each asking.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{UpstreamError, join, retry_after};
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
    #[serde(default)]
    expires_in: Option<u64>,
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
        })
    }

    /// The client id (not secret), for messages.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// How many token requests this source has sent.
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A valid token: the cached one, or a fresh one. Holding the lock during the fetch makes
    /// concurrent callers share a single refresh.
    pub async fn token(&self) -> Result<Token, UpstreamError> {
        let mut cache = self.cache.lock().await;
        if let Some(cached) = cache.as_ref()
            && Instant::now() < cached.refresh_at
        {
            return Ok(cached.token.clone());
        }
        let fresh = retry(&self.policy, "token request", || self.request()).await?;
        let token = fresh.token.clone();
        *cache = Some(fresh);
        Ok(token)
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
            .map_err(|source| UpstreamError::Transport {
                what: WHAT.into(),
                source: source.without_url(),
            })?;
        let status = response.status();
        let wait = retry_after(response.headers());
        let body = response
            .bytes()
            .await
            .map_err(|source| UpstreamError::Transport {
                what: WHAT.into(),
                source: source.without_url(),
            })?;
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
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(300));
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
