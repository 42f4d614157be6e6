//! The client side of the other organisations' HTTP contract (DESIGN.md "External contract"):
//! registration with the governance platform (`governance`), OAuth2 client-credentials
//! authorization (`auth`), and the paginated product fetch (`products`).
//!
//! One error type for the module; transient failures (5xx, 429, timeouts, resets) are retried
//! by [`crate::retry`] under `upstream.retry_max_elapsed_ms`, permanent ones stop at once.
//! Secrets (the client secret, access tokens) live in `secrecy` types: no error or log line
//! carries them.

use std::time::Duration;

use crate::product::RecordError;
use crate::retry::Transient;

pub mod auth;
pub mod governance;
pub mod guard;
pub mod products;
pub mod systems;

pub use auth::TokenSource;
pub use governance::{Governance, Registration};
pub use guard::{CircuitState, Guard};
pub use products::{Page, ProductClient};
pub use systems::{System, Systems};

/// Errors at the upstream boundary. `what` names the call ("token request", "products page 3").
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Wrong client id or secret (HTTP 401 `invalid_client` from the token endpoint).
    #[error(
        "the management system refused client id {client_id:?}: invalid client credentials (check upstream.client_id and upstream.client_secret)"
    )]
    InvalidClient { client_id: String },
    /// The governance platform does not know this service's identity.
    #[error(
        "the governance platform refused app id {app_id:?} (HTTP 403): register the app id there or fix governance.app_id"
    )]
    UnknownIdentity { app_id: String },
    /// Still 401 after one token refresh.
    #[error("{what}: unauthorized even with a fresh token (HTTP 401)")]
    Unauthorized { what: String },
    /// HTTP 403: not authorized for this data.
    #[error("{what}: not authorized for this data (HTTP 403)")]
    Forbidden { what: String },
    /// HTTP 400: the request itself is wrong.
    #[error("{what}: rejected as a bad request (HTTP 400): {detail}")]
    BadRequest { what: String, detail: String },
    /// HTTP 429: the server asks to wait.
    #[error("{what}: throttled (HTTP 429), asked to wait {retry_after:?}")]
    Throttled { what: String, retry_after: Duration },
    /// HTTP 5xx.
    #[error("{what}: server error (HTTP {status})")]
    Server { what: String, status: u16 },
    /// Timeouts, refused or reset connections, a body cut off mid-way.
    #[error("{what}: {source}")]
    Transport {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    /// A 2xx body that is not the contract's JSON.
    #[error("{what}: response body does not parse: {reason}")]
    MalformedBody { what: String, reason: String },
    /// A record of a page breaks the contract.
    #[error("{what}: record {index} ({identity}) breaks the contract: {error}")]
    InvalidRecord {
        what: String,
        index: usize,
        identity: String,
        error: RecordError,
    },
    /// A response body larger than its limit (read no further than the limit).
    #[error("{what}: the response exceeds {limit} bytes (upstream limit); it was not read further")]
    TooLarge { what: String, limit: usize },
    /// Paging that does not end: a cursor seen before, more pages or more time than allowed,
    /// or more items on a page than asked for.
    #[error("{what}: {reason}")]
    Runaway { what: String, reason: String },
    /// The system's circuit is open: no request was sent.
    #[error(
        "management system {system:?} is failing: its circuit is open after repeated failures, the last: {last} (no request sent; the next probe in {retry_in_ms} ms)"
    )]
    CircuitOpen {
        system: String,
        retry_in_ms: u64,
        last: String,
    },
    /// Any other status.
    #[error("{what}: unexpected HTTP status {status}")]
    UnexpectedStatus { what: String, status: u16 },
    /// A base URL from configuration that cannot be joined with a path.
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// The TLS handshake failed: the server's certificate is not signed by a trusted CA, names
    /// another host, or has expired. A setting to fix, not a moment to wait out: permanent.
    #[error(
        "{what}: the TLS handshake failed ({reason}); check {setting} (the CA that signed the server's certificate) and that the certificate names the host of the URL"
    )]
    Tls {
        what: String,
        setting: &'static str,
        reason: String,
    },
    /// The configured CA file cannot be used.
    #[error("{setting}: cannot use {path} as CA certificates: {reason}")]
    CaFile {
        setting: &'static str,
        path: String,
        reason: String,
    },
}

/// The error of a request that was not answered: a failed TLS handshake (permanent, naming
/// `ca_setting`), else a transport failure (transient).
pub(crate) fn unanswered(
    what: &str,
    source: reqwest::Error,
    ca_setting: &'static str,
) -> UpstreamError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<native_tls::Error>() {
            return UpstreamError::Tls {
                what: what.to_owned(),
                setting: ca_setting,
                reason: crate::text::cut(&tls.to_string(), crate::text::REASON_CHARS),
            };
        }
        cause = e.source();
    }
    UpstreamError::Transport {
        what: what.to_owned(),
        source: source.without_url(),
    }
}

impl Transient for UpstreamError {
    fn is_transient(&self) -> bool {
        matches!(
            self,
            UpstreamError::Throttled { .. }
                | UpstreamError::Server { .. }
                | UpstreamError::Transport { .. }
                | UpstreamError::CircuitOpen { .. }
        )
    }

    fn stops_retries(&self) -> bool {
        matches!(self, UpstreamError::CircuitOpen { .. })
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl UpstreamError {
    /// See [`Transient::is_transient`].
    pub fn is_transient(&self) -> bool {
        Transient::is_transient(self)
    }

    /// See [`Transient::stops_retries`].
    pub fn stops_retries(&self) -> bool {
        Transient::stops_retries(self)
    }

    /// The outcome label of a request that ended with this error.
    pub fn outcome(&self) -> &'static str {
        match self {
            UpstreamError::Server { .. } => "server_error",
            UpstreamError::Transport { .. } => "transport",
            UpstreamError::Throttled { .. } => "throttled",
            UpstreamError::CircuitOpen { .. } => "circuit_open",
            _ => "refused",
        }
    }

    /// Maps a non-success status to its error (401 is handled by the callers).
    pub(crate) fn from_status(
        what: &str,
        status: reqwest::StatusCode,
        retry_after: Option<Duration>,
        body: &str,
    ) -> Self {
        let what = what.to_owned();
        match status.as_u16() {
            400 => UpstreamError::BadRequest {
                what,
                detail: body.chars().take(200).collect(),
            },
            401 => UpstreamError::Unauthorized { what },
            403 => UpstreamError::Forbidden { what },
            429 => UpstreamError::Throttled {
                what,
                retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
            },
            s if (500..600).contains(&s) => UpstreamError::Server { what, status: s },
            s => UpstreamError::UnexpectedStatus { what, status: s },
        }
    }
}

/// The `Retry-After` header in seconds (an HTTP date is treated as one second), clamped to
/// [`MIN_RETRY_AFTER`]…[`MAX_RETRY_AFTER`]: a `0` asked for ever must not become a hot loop,
/// nor a day a stuck partition (the retry budget bounds the total wait as well).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let asked = Duration::from_secs(value.trim().parse::<u64>().unwrap_or(1).min(86_400));
    Some(asked.clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER))
}

/// The shortest wait a `Retry-After` can ask for.
pub const MIN_RETRY_AFTER: Duration = Duration::from_millis(250);
/// The longest wait a `Retry-After` can ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Largest token or governance answer read (they are a few hundred bytes).
pub const MAX_SMALL_BODY_BYTES: usize = 64 * 1024;

/// Reads a response body, refusing it as soon as it grows past `limit` bytes (or announces
/// more): a hostile or broken server cannot make this process buffer more than `limit`.
pub(crate) async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, UpstreamError> {
    let too_large = || UpstreamError::TooLarge {
        what: what.to_owned(),
        limit,
    };
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(response.content_length().map_or(16 * 1024, |n| n as usize));
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| UpstreamError::Transport {
            what: what.to_owned(),
            source: source.without_url(),
        })?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Joins a configured base URL and a contract path.
pub(crate) fn join(base: &str, path: &str) -> Result<url::Url, UpstreamError> {
    let mut base = url::Url::parse(base).map_err(|e| UpstreamError::Url {
        url: base.to_owned(),
        reason: e.to_string(),
    })?;
    if !base.path().ends_with('/') {
        let p = format!("{}/", base.path());
        base.set_path(&p);
    }
    base.join(path.trim_start_matches('/'))
        .map_err(|e| UpstreamError::Url {
            url: base.to_string(),
            reason: e.to_string(),
        })
}

/// The HTTP client every upstream call uses: per-request timeout, no redirects to elsewhere,
/// the certificates of `ca` (a PEM file, and the key that names it) trusted besides the
/// system's.
pub fn http_client(
    timeout: Duration,
    ca: Option<(&std::path::Path, &'static str)>,
) -> Result<reqwest::Client, UpstreamError> {
    let mut builder = reqwest::Client::builder();
    if let Some((path, setting)) = ca {
        let ca_error = |reason: String| UpstreamError::CaFile {
            setting,
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
        for cert in
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_error(e.to_string()))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("product-sync/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| UpstreamError::Url {
            url: String::new(),
            reason: format!("cannot build the HTTP client: {e}"),
        })
}
