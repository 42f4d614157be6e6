//! `[governance]`, `[http]` and `[log]`: registration, the ops endpoint, and logging.

use std::fmt;
use std::net::SocketAddr;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::upstream::check_url;

/// The service-governance platform that instances register with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GovernanceSettings {
    /// Register at start-up, heartbeat, deregister at stop.
    pub enabled: bool,
    /// Accept a plain `http://` base URL: `true` for development, `false` in production.
    pub allow_http: bool,
    /// Base URL of the governance platform.
    pub base_url: String,
    /// This service's identity at the platform.
    pub app_id: String,
}

/// The ops endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of `/metrics`, `/healthz`, `/readyz` and the console.
    pub listen: SocketAddr,
    /// The bearer token the console's actions need; unset or empty disables them.
    #[serde(default)]
    pub admin_token: Option<SecretString>,
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `tracing` filter, e.g. `info` or `product_sync=debug,rdkafka=warn`; `RUST_LOG` wins.
    pub level: String,
    /// `pretty` for people, `json` for log collectors.
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

impl GovernanceSettings {
    /// An identity, and a URL reached as the settings demand.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        if self.app_id.trim().is_empty() {
            return Err(("governance.app_id", "must not be empty".to_owned()));
        }
        check_url(&self.base_url, self.allow_http, "governance.allow_http")
            .map_err(|reason| ("governance.base_url", reason))
    }

    /// `governance.*`.
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "governance.enabled = {}", self.enabled)?;
        writeln!(f, "governance.allow_http = {}", self.allow_http)?;
        writeln!(f, "governance.base_url = {:?}", self.base_url)?;
        writeln!(f, "governance.app_id = {:?}", self.app_id)
    }
}

impl HttpSettings {
    /// `http.*`, the token redacted.
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "http.listen = \"{}\"", self.listen)?;
        let token = match &self.admin_token {
            Some(t) if !t.expose_secret().is_empty() => "\"[redacted]\"",
            _ => "(unset: console actions disabled)",
        };
        writeln!(f, "http.admin_token = {token}")
    }
}

impl LogSettings {
    /// The filter parses.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|e| ("log.level", e.to_string()))
    }

    /// `log.*` (the last lines of the summary: no newline after the last).
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "log.level = {:?}", self.level)?;
        write!(f, "log.format = {:?}", self.format)
    }
}
