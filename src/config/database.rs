//! `[database]`: the store's URL (a secret), its pool and how start-up reaches it.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_with::{DurationMilliSeconds, serde_as};

/// The store.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host/db` or `sqlite://path?mode=rwc`. Secret: may hold a password.
    pub url: SecretString,
    /// Upper bound of the connection pool.
    pub max_connections: u32,
    /// Apply pending migrations at start-up.
    pub migrate_on_start: bool,
    /// How long start-up keeps retrying an unreachable database before giving up.
    #[serde(rename = "connect_timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub connect_timeout: Duration,
    /// Refuse a `postgres://` URL without `sslmode=verify-full` (or `verify-ca`): production
    /// `true`, so the store's password and data never cross the network in clear text and the
    /// server's certificate is checked.
    #[serde(default)]
    pub require_tls: bool,
}

/// A URL with its password replaced, safe for logs and errors.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            // `?password=…` (and sslpassword, secrets and tokens) in the query, too.
            if u.query().is_some() {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let secret = ["password", "secret", "token"]
                            .iter()
                            .any(|s| k.to_ascii_lowercase().contains(s));
                        let v = if secret { "***".into() } else { v.into_owned() };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

impl DatabaseSettings {
    /// The URL without its password, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }
}

impl DatabaseSettings {
    /// A postgres or sqlite URL, verified TLS when required, a pool of at least one.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        let url = self.url.expose_secret();
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            return Err((
                "database.url",
                format!(
                    "{} is neither a postgres:// nor a sqlite: URL",
                    redact_url(url)
                ),
            ));
        }
        if self.require_tls && url.starts_with("postgres") {
            let verified = url::Url::parse(url).is_ok_and(|u| {
                u.query_pairs()
                    .any(|(k, v)| k == "sslmode" && (v == "verify-full" || v == "verify-ca"))
            });
            if !verified {
                return Err((
                    "database.url",
                    format!(
                        "{} does not ask for a verified TLS connection (add ?sslmode=verify-full), \
                         and database.require_tls is true",
                        redact_url(url)
                    ),
                ));
            }
        }
        if self.max_connections == 0 {
            return Err(("database.max_connections", "must be above 0".to_owned()));
        }
        Ok(())
    }

    /// `database.*`, the password redacted.
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "database.url = {:?}", self.redacted_url())?;
        writeln!(f, "database.max_connections = {}", self.max_connections)?;
        writeln!(f, "database.migrate_on_start = {}", self.migrate_on_start)?;
        let connect = self.connect_timeout.as_millis();
        writeln!(f, "database.connect_timeout_ms = {connect}")?;
        writeln!(f, "database.require_tls = {}", self.require_tls)
    }
}
