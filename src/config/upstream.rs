//! `[upstream]` and `[upstream.systems.<name>]`: each management system's address, client,
//! limits, protection and schedule.

use std::fmt;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use serde_with::{DurationMilliSeconds, serde_as};

use super::ScheduleSettings;
use super::database::redact_url;

/// The management system that owns the product data.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Name of the management system; part of change-event keys. Commands naming another
    /// system are rejected.
    pub system: String,
    /// Base URL of the management system's HTTP API.
    pub base_url: String,
    /// OAuth2 client id.
    pub client_id: String,
    /// OAuth2 client secret. Never logged.
    pub client_secret: SecretString,
    /// Products per page asked of the management system.
    pub page_size: u32,
    /// Timeout of one HTTP request.
    #[serde(rename = "timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub timeout: Duration,
    /// How long transient failures of one call are retried before the call fails.
    #[serde(rename = "retry_max_elapsed_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub retry_max_elapsed: Duration,
    /// Largest products page read; a larger answer fails its command (read no further).
    pub max_page_bytes: usize,
    /// Most pages one command follows; paging beyond fails the command.
    pub max_pages: usize,
    /// Longest time one command's paging may take before it fails.
    #[serde(rename = "command_timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub command_timeout: Duration,
    /// Largest record (its `keywords` and `attributes`; every other field is bounded by the
    /// contract); a larger one fails its command.
    pub max_record_bytes: usize,
    /// Accept a plain `http://` base URL (credentials and tokens would travel in clear text):
    /// `true` for development, `false` in production.
    pub allow_http: bool,
    /// A PEM file of CA certificates trusted for this system's https, besides the system's
    /// trust store (a bank's internal CA). Unset: the system's trust store only.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// A snapshot delists at most this share of the stored products in its scope unless the
    /// command says `force` (an upstream briefly answering an empty catalogue must never wipe
    /// the copy).
    pub max_delist_ratio: f64,
    /// Requests per second one instance sends to this system (a token bucket; unset or 0:
    /// no limit). Every instance has its own bucket.
    #[serde(default)]
    pub rate_limit_per_s: Option<u32>,
    /// Consecutive transient failures that open the system's circuit.
    pub circuit_failures: u32,
    /// How long an open circuit refuses requests before one half-open probe is let through.
    #[serde(rename = "circuit_open_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub circuit_open: Duration,
    /// When this system's incremental syncs, snapshots and drift checks are published
    /// (`[…schedule]`; a further system without its own table takes `[upstream.schedule]`).
    #[serde(default)]
    pub schedule: ScheduleSettings,
}

/// An http(s) URL, plain http only when allowed.
pub(super) fn check_url(value: &str, allow_http: bool, allow_key: &str) -> Result<(), String> {
    match url::Url::parse(value) {
        Ok(u) if u.scheme() == "https" => Ok(()),
        Ok(u) if u.scheme() == "http" && allow_http => Ok(()),
        Ok(u) if u.scheme() == "http" => Err(format!(
            "{} is plain http: the client secret and tokens would travel in clear text; use \
             https, or set {allow_key} = true (development only)",
            redact_url(value)
        )),
        _ => Err(format!("{} is not an http(s) URL", redact_url(value))),
    }
}

/// Largest CA file read (a bundle of a few hundred certificates is well below).
const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// A CA file that can be read and holds at least one PEM certificate (its contents are
/// parsed again when the HTTP client is built).
pub(super) fn check_ca_file(path: Option<&std::path::Path>) -> Result<(), String> {
    let Some(path) = path else { return Ok(()) };
    let shown = path.display();
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?
        .len();
    if size > MAX_CA_FILE_BYTES {
        return Err(format!("{shown} is {size} bytes, more than a CA bundle"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    match text.contains("-----BEGIN CERTIFICATE-----") {
        true => Ok(()),
        false => Err(format!("{shown} holds no PEM certificate")),
    }
}

impl UpstreamSettings {
    /// Checks one system's keys (under `prefix`); the failing key is named relative to its
    /// table. A further system's name must be usable in environment variable names, too.
    pub(super) fn check(&self, prefix: &str) -> Result<(), (&'static str, String)> {
        let further = prefix != "upstream";
        if self.system.trim().is_empty() || self.system.contains('/') {
            return Err((
                "system",
                "must not be empty nor contain '/' (it is part of event keys)".to_owned(),
            ));
        }
        if further
            && !(self.system.len() <= 64
                && self
                    .system
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        {
            return Err((
                "system",
                "a further system's name is lowercase letters, digits and _ (at most 64)"
                    .to_owned(),
            ));
        }
        if self.client_id.trim().is_empty() {
            return Err(("client_id", "must not be empty".to_owned()));
        }
        let allow_key = format!("{prefix}.allow_http");
        check_url(&self.base_url, self.allow_http, &allow_key).map_err(|r| ("base_url", r))?;
        check_ca_file(self.ca_file.as_deref()).map_err(|r| ("ca_file", r))?;
        self.check_bounds()?;
        self.schedule.check()
    }

    fn check_bounds(&self) -> Result<(), (&'static str, String)> {
        let bound = |ok: bool, key: &'static str, why: &str| match ok {
            true => Ok(()),
            false => Err((key, why.to_owned())),
        };
        bound(
            (1..=1000).contains(&self.page_size),
            "page_size",
            "must be between 1 and 1000",
        )?;
        bound(
            (64 * 1024..=1024 * 1024 * 1024).contains(&self.max_page_bytes),
            "max_page_bytes",
            "must be between 65536 and 1073741824",
        )?;
        bound(
            (1024..=64 * 1024 * 1024).contains(&self.max_record_bytes),
            "max_record_bytes",
            "must be between 1024 and 67108864",
        )?;
        bound(self.max_pages > 0, "max_pages", "must be at least 1")?;
        bound(
            (0.0..=1.0).contains(&self.max_delist_ratio),
            "max_delist_ratio",
            "must be between 0 and 1",
        )?;
        bound(
            !self.command_timeout.is_zero(),
            "command_timeout_ms",
            "must be above 0",
        )?;
        bound(!self.timeout.is_zero(), "timeout_ms", "must be above 0")?;
        bound(
            self.rate_limit_per_s.unwrap_or(0) <= 100_000,
            "rate_limit_per_s",
            "must be at most 100000 (0 or unset: no limit)",
        )?;
        bound(
            (1..=1000).contains(&self.circuit_failures),
            "circuit_failures",
            "must be between 1 and 1000",
        )?;
        bound(
            !self.circuit_open.is_zero() && self.circuit_open <= Duration::from_secs(3600),
            "circuit_open_ms",
            "must be above 0 and at most 3600000",
        )
    }
}

impl UpstreamSettings {
    /// One system's keys under `prefix`, the secret redacted.
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>, prefix: &str) -> fmt::Result {
        if prefix == "upstream" {
            writeln!(f, "{prefix}.system = {:?}", self.system)?;
        }
        writeln!(f, "{prefix}.base_url = {:?}", self.base_url)?;
        writeln!(f, "{prefix}.client_id = {:?}", self.client_id)?;
        writeln!(f, "{prefix}.client_secret = \"[redacted]\"")?;
        let ms = |d: Duration| d.as_millis();
        writeln!(f, "{prefix}.page_size = {}", self.page_size)?;
        writeln!(f, "{prefix}.timeout_ms = {}", ms(self.timeout))?;
        let retry = ms(self.retry_max_elapsed);
        writeln!(f, "{prefix}.retry_max_elapsed_ms = {retry}")?;
        writeln!(f, "{prefix}.max_page_bytes = {}", self.max_page_bytes)?;
        writeln!(f, "{prefix}.max_pages = {}", self.max_pages)?;
        writeln!(f, "{prefix}.max_delist_ratio = {}", self.max_delist_ratio)?;
        writeln!(f, "{prefix}.max_record_bytes = {}", self.max_record_bytes)?;
        let timeout = ms(self.command_timeout);
        writeln!(f, "{prefix}.command_timeout_ms = {timeout}")?;
        let rate = self.rate_limit_per_s.unwrap_or(0);
        writeln!(f, "{prefix}.rate_limit_per_s = {rate}")?;
        writeln!(f, "{prefix}.circuit_failures = {}", self.circuit_failures)?;
        writeln!(f, "{prefix}.circuit_open_ms = {}", ms(self.circuit_open))?;
        writeln!(f, "{prefix}.allow_http = {}", self.allow_http)?;
        if let Some(ca) = &self.ca_file {
            writeln!(f, "{prefix}.ca_file = {:?}", ca.display().to_string())?;
        }
        self.schedule.fmt_keys(f, prefix)
    }
}
