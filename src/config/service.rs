//! `[governance]`, `[http]` and `[log]`: registration, the ops endpoint, and logging.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::upstream::{check_ca_file, check_url};

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
    /// A PEM file of CA certificates trusted for the platform's https, besides the system's
    /// trust store. Unset: the system's trust store only.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// The ops endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of `/metrics`, `/healthz`, `/readyz` and the console.
    pub listen: SocketAddr,
    /// A bearer token for the console's actions, recorded as the operator `admin`.
    #[serde(default)]
    pub admin_token: Option<SecretString>,
    /// Named operator tokens (name → token, the tokens from the environment:
    /// `PRODUCT_SYNC__HTTP__OPERATOR_TOKENS__ALICE`): each action is recorded in the audit
    /// trail under the name of the token that made it. With none (and no `admin_token`),
    /// actions are disabled.
    #[serde(default)]
    pub operator_tokens: BTreeMap<String, SecretString>,
    /// Reads of the console's API need an operator token too (production: `true`).
    #[serde(default)]
    pub require_token_for_reads: bool,
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
            .map_err(|reason| ("governance.base_url", reason))?;
        check_ca_file(self.ca_file.as_deref()).map_err(|reason| ("governance.ca_file", reason))
    }

    /// `governance.*`.
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "governance.enabled = {}", self.enabled)?;
        writeln!(f, "governance.allow_http = {}", self.allow_http)?;
        writeln!(f, "governance.base_url = {:?}", self.base_url)?;
        writeln!(f, "governance.app_id = {:?}", self.app_id)?;
        match &self.ca_file {
            Some(ca) => writeln!(f, "governance.ca_file = {:?}", ca.display().to_string()),
            None => Ok(()),
        }
    }
}

/// Longest operator name (it is what the audit trail records).
const MAX_OPERATOR_NAME: usize = 64;

impl HttpSettings {
    /// Every operator token with its name (`admin` for `admin_token`), empty ones left out.
    pub fn operators(&self) -> Vec<(String, SecretString)> {
        let admin = self
            .admin_token
            .iter()
            .map(|t| ("admin".to_owned(), t.clone()));
        admin
            .chain(
                self.operator_tokens
                    .iter()
                    .map(|(name, t)| (name.clone(), t.clone())),
            )
            .filter(|(_, t)| !t.expose_secret().is_empty())
            .collect()
    }

    /// Operator names are short and plain; no two operators share a token or a name.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        for name in self.operator_tokens.keys() {
            let plain = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
            if name.is_empty() || name.len() > MAX_OPERATOR_NAME || !plain {
                return Err((
                    "http.operator_tokens",
                    format!(
                        "operator name {:?} must be 1 to {MAX_OPERATOR_NAME} letters, digits or -_.@",
                        name.chars().take(MAX_OPERATOR_NAME).collect::<String>()
                    ),
                ));
            }
        }
        if self.admin_token.is_some() && self.operator_tokens.contains_key("admin") {
            return Err((
                "http.operator_tokens",
                "the name `admin` is http.admin_token's: use another name".to_owned(),
            ));
        }
        let operators = self.operators();
        for (i, (name, token)) in operators.iter().enumerate() {
            let shared = operators[i + 1..]
                .iter()
                .find(|(_, other)| other.expose_secret() == token.expose_secret());
            if let Some((other, _)) = shared {
                return Err((
                    "http.operator_tokens",
                    format!(
                        "{name} and {other} have the same token: actions could not be told apart"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `http.*`, the tokens redacted.
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "http.listen = \"{}\"", self.listen)?;
        let token = match &self.admin_token {
            Some(t) if !t.expose_secret().is_empty() => "\"[redacted]\"",
            _ => "(unset)",
        };
        writeln!(f, "http.admin_token = {token}")?;
        let names: Vec<&str> = self.operator_tokens.keys().map(String::as_str).collect();
        writeln!(f, "http.operator_tokens = {names:?} (tokens redacted)")?;
        writeln!(
            f,
            "http.require_token_for_reads = {}",
            self.require_token_for_reads
        )
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
