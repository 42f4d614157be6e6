//! Configuration: the public keys of DESIGN.md's configuration contract, layered from files
//! under `config/` and `PRODUCT_SYNC__…` environment variables, validated at start-up.
//!
//! Layers, later wins:
//! 1. `config/default.toml` (the copy built into the binary when the directory has none);
//! 2. `config/<env>.toml`, `<env>` from `PRODUCT_SYNC_ENV` (default `local`; optional for the
//!    default, required when named explicitly);
//! 3. the file given with `--config` (required);
//! 4. environment variables `PRODUCT_SYNC__<SECTION>__<KEY>` (`__` between levels).
//!
//! Every struct denies unknown fields, so a typo is refused with the key's full name and the
//! layer it came from instead of being silently ignored. Secrets (`upstream.client_secret`,
//! the password inside `database.url`) are held in `secrecy` types and print as `[redacted]`.

mod database;
mod kafka;
mod layers;
mod notifications;
mod pipeline;
mod schedule;
mod service;
mod topics;
mod upstream;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use config::Config;
use serde::Deserialize;

pub use database::{DatabaseSettings, redact_url};
pub use kafka::{KafkaSettings, LibrdkafkaOptions, is_secret_option};
pub use layers::env_name_of;
use layers::{build, deserialize, origin_of, tree_of};
pub use notifications::NotificationSettings;
pub use pipeline::PipelineSettings;
pub use schedule::{CronSpec, ScheduleKind, ScheduleSettings};
pub use service::{GovernanceSettings, HttpSettings, LogFormat, LogSettings};
pub use topics::TopicSettings;
pub use upstream::UpstreamSettings;

/// The environment variable prefix; `PRODUCT_SYNC__A__B` sets key `a.b`.
pub const ENV_PREFIX: &str = "PRODUCT_SYNC";
/// Selects the environment file (`local`, `production`, …).
pub const ENV_SELECTOR: &str = "PRODUCT_SYNC_ENV";
/// Overrides the configuration directory (default `./config`).
pub const ENV_CONFIG_DIR: &str = "PRODUCT_SYNC_CONFIG_DIR";

/// The built-in copy of `config/default.toml`, used when the directory has none so the binary
/// runs from anywhere.
const BUILT_IN_DEFAULT: &str = include_str!("../../config/default.toml");

/// A configuration that cannot be used. Always permanent: fixing it needs a person.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read or parsed.
    #[error("cannot read configuration file {file}: {reason}")]
    File { file: String, reason: String },
    /// A key that the program does not know (usually a typo).
    #[error(
        "unknown configuration key `{key}` (set in {origin}); see docs/src/configuration.md for the keys"
    )]
    UnknownKey { key: String, origin: String },
    /// A key is present with a value of the wrong type or out of range.
    #[error("invalid value for configuration key `{key}` (set in {origin}): {reason}")]
    Invalid {
        key: String,
        origin: String,
        reason: String,
    },
    /// A required key is missing from every layer.
    #[error("missing configuration key `{key}`: set it in a config file or as {env}")]
    Missing { key: String, env: String },
}

impl ConfigError {
    /// Configuration errors never heal by retrying.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// All settings of one product-sync process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub topics: TopicSettings,
    pub database: DatabaseSettings,
    pub upstream: UpstreamSettings,
    pub governance: GovernanceSettings,
    pub http: HttpSettings,
    pub pipeline: PipelineSettings,
    pub notifications: NotificationSettings,
    pub log: LogSettings,
    /// The further management systems (`[upstream.systems.<name>]`): each a whole
    /// `UpstreamSettings`, every key it does not set taken from `[upstream]`.
    #[serde(skip)]
    pub systems: Vec<UpstreamSettings>,
}

/// Where to read configuration from. `Default` is what the binary does: `./config` (or
/// `PRODUCT_SYNC_CONFIG_DIR`), `PRODUCT_SYNC_ENV`, and the process environment.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Directory with `default.toml` and the environment files.
    pub dir: Option<PathBuf>,
    /// Environment name; `None` reads `PRODUCT_SYNC_ENV`, else `local`.
    pub env_name: Option<String>,
    /// An extra file (`--config`), read last among the files.
    pub file: Option<PathBuf>,
    /// Environment variables to use instead of the process environment (tests).
    pub vars: Option<HashMap<String, String>>,
}

impl Sources {
    fn var(&self, name: &str) -> Option<String> {
        match &self.vars {
            Some(vars) => vars.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }
}

/// Loads, layers and validates the configuration.
pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
    let config = build(sources)?;
    let settings = deserialize(&config, sources)?;
    settings.validate(&config)?;
    Ok(settings)
}

impl Settings {
    /// Every management system: `[upstream]` first, then `[upstream.systems.*]`.
    pub fn all_systems(&self) -> impl Iterator<Item = &UpstreamSettings> {
        std::iter::once(&self.upstream).chain(&self.systems)
    }
}

impl Settings {
    /// Checks what types alone cannot: URL schemes, ranges, non-empty names, schedules. The
    /// error names the failing key and the layer it came from.
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let tree = tree_of(config);
        let invalid = |(key, reason): (&str, String)| ConfigError::Invalid {
            key: key.to_owned(),
            origin: origin_of(&tree, key),
            reason,
        };
        self.kafka.check().map_err(invalid)?;
        self.topics.check().map_err(invalid)?;
        self.database.check().map_err(invalid)?;
        self.governance.check().map_err(invalid)?;
        self.http.check().map_err(invalid)?;
        self.pipeline.check(&self.kafka).map_err(invalid)?;
        self.notifications.check().map_err(invalid)?;
        self.log.check().map_err(invalid)?;
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.all_systems().enumerate() {
            let prefix = match i {
                0 => "upstream".to_owned(),
                _ => format!("upstream.systems.{}", u.system),
            };
            if let Err((leaf, reason)) = u.check(&prefix) {
                let key = format!("{prefix}.{leaf}");
                return Err(ConfigError::Invalid {
                    origin: origin_of(&tree, &key),
                    key,
                    reason,
                });
            }
            if !names.insert(u.system.as_str()) {
                let key = format!("{prefix}.system");
                return Err(ConfigError::Invalid {
                    origin: origin_of(&tree, &key),
                    key,
                    reason: format!("{:?} names a system twice", u.system),
                });
            }
        }
        Ok(())
    }
}

impl fmt::Display for Settings {
    /// A human-readable summary with every secret redacted (`product-sync config`), one line
    /// per key, section by section.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kafka.fmt_keys(f)?;
        self.topics.fmt_keys(f)?;
        self.database.fmt_keys(f)?;
        for (i, u) in self.all_systems().enumerate() {
            match i {
                0 => u.fmt_keys(f, "upstream")?,
                _ => u.fmt_keys(f, &format!("upstream.systems.{}", u.system))?,
            }
        }
        self.governance.fmt_keys(f)?;
        self.http.fmt_keys(f)?;
        self.pipeline.fmt_keys(f)?;
        self.notifications.fmt_keys(f)?;
        self.log.fmt_keys(f)
    }
}

#[cfg(test)]
mod tests;
