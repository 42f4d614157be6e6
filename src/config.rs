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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat, Value, ValueKind};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_with::{DurationMilliSeconds, serde_as};

/// The environment variable prefix; `PRODUCT_SYNC__A__B` sets key `a.b`.
pub const ENV_PREFIX: &str = "PRODUCT_SYNC";
/// Selects the environment file (`local`, `production`, …).
pub const ENV_SELECTOR: &str = "PRODUCT_SYNC_ENV";
/// Overrides the configuration directory (default `./config`).
pub const ENV_CONFIG_DIR: &str = "PRODUCT_SYNC_CONFIG_DIR";

/// The built-in copy of `config/default.toml`, used when the directory has none so the binary
/// runs from anywhere.
const BUILT_IN_DEFAULT: &str = include_str!("../config/default.toml");

/// librdkafka's `session.timeout.ms` when the configuration does not set it.
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(45);

/// A configuration that cannot be used. Always permanent: fixing it needs a person.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read or parsed.
    #[error("cannot read configuration file {file}: {reason}")]
    File { file: String, reason: String },
    /// A key that the program does not know (usually a typo).
    #[error(
        "unknown configuration key `{key}` (set in {origin}); see README \"Configuration\" for the keys"
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
    pub log: LogSettings,
    /// The further management systems (`[upstream.systems.<name>]`): each a whole
    /// `UpstreamSettings`, every key it does not set taken from `[upstream]`.
    #[serde(skip)]
    pub systems: Vec<UpstreamSettings>,
}

/// The consumer loop and the outbox relay.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Commands processed at once by this instance, across its partitions (one per partition).
    pub max_in_flight: usize,
    /// On revoke and shutdown, how long a command in flight may run on before it is abandoned
    /// (and redelivered). Keep it below the consumer's session timeout.
    #[serde(rename = "drain_timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub drain_timeout: Duration,
    /// Whole-process shutdown deadline after SIGTERM.
    #[serde(rename = "shutdown_timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub shutdown_timeout: Duration,
    /// Run the outbox relay in this process.
    pub relay_enabled: bool,
    /// How often the relay looks for unpublished rows when idle.
    #[serde(rename = "relay_interval_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub relay_interval: Duration,
    /// Rows read and produced per relay batch (two batches are in flight at a time).
    pub relay_batch_size: u64,
    /// Shards of the outbox queue: each has one publisher at a time, and the shards are
    /// spread over the live instances. The same on every instance of a deployment.
    pub relay_shards: u32,
    /// Events (change and result) larger than this are published in the reduced form. Keep
    /// it below the topics' `max.message.bytes` and the producer's `message.max.bytes`.
    pub max_event_bytes: usize,
    /// Delays before the attempts of a command on the retry topic; after the last, the DLQ.
    #[serde(rename = "retry_delays_ms", deserialize_with = "millis_list")]
    pub retry_delays: Vec<Duration>,
    /// How long start-up waits for the broker before giving up.
    #[serde(rename = "broker_wait_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub broker_wait: Duration,
}

/// Where the broker is and how to talk to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Broker list, e.g. `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// Consumer group shared by all instances; partitions are spread across its members.
    pub group_id: String,
    /// Raw librdkafka options passed through unchanged (TLS, SASL, timeouts…). From the
    /// environment, `_` in the last segment stands for `.`:
    /// `PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SECURITY_PROTOCOL=ssl` sets `security.protocol`.
    #[serde(default)]
    pub librdkafka: LibrdkafkaOptions,
    /// Refuse to start unless `librdkafka."security.protocol"` is `ssl` or `sasl_ssl`
    /// (production: `true`).
    #[serde(default)]
    pub require_tls: bool,
}

/// Raw librdkafka options. Debug output redacts credential values.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct LibrdkafkaOptions(pub BTreeMap<String, String>);

impl LibrdkafkaOptions {
    /// Option name and value pairs, values unredacted: for building clients only.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    /// The value of one option.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Name and value with credential values replaced, for logs and `product-sync config`.
    pub fn redacted(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| {
            (
                k.as_str(),
                if is_secret_option(k) {
                    "[redacted]"
                } else {
                    v.as_str()
                },
            )
        })
    }
}

impl fmt::Debug for LibrdkafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.redacted()).finish()
    }
}

/// Topic names and how missing topics are created.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    /// Product-request commands (input).
    pub requests: String,
    /// Field-level diff events (output).
    pub changes: String,
    /// One result event per command (output).
    pub results: String,
    /// Commands that could not be processed, with the reason in headers.
    pub dlq: String,
    /// Compacted: the current state of every product (a tombstone once delisted); empty
    /// disables it.
    pub state: String,
    /// Where commands failed by a transient cause wait for their next attempt (same
    /// partitions as `requests`); empty sends them straight to the DLQ.
    pub retry: String,
    /// Create missing topics at start-up.
    pub create: bool,
    /// Partition count for topics created at start-up; bounds the consumer group's parallelism.
    pub partitions: i32,
    /// Replication factor for topics created at start-up (3 in production).
    pub replication_factor: i32,
}

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
}

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

fn build(sources: &Sources) -> Result<Config, ConfigError> {
    let dir = sources
        .dir
        .clone()
        .or_else(|| sources.var(ENV_CONFIG_DIR).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("config"));
    let mut builder = Config::builder();

    let default_file = dir.join("default.toml");
    builder = if default_file.is_file() {
        builder.add_source(file_source(&default_file, true)?)
    } else {
        builder.add_source(File::from_str(BUILT_IN_DEFAULT, FileFormat::Toml))
    };

    let (env_name, explicit) = match sources
        .env_name
        .clone()
        .or_else(|| sources.var(ENV_SELECTOR))
    {
        Some(name) => (name, true),
        None => ("local".to_owned(), false),
    };
    if env_name.is_empty()
        || !env_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ConfigError::Invalid {
            key: ENV_SELECTOR.to_owned(),
            origin: "the environment".to_owned(),
            reason: format!("{env_name:?} is not an environment name (letters, digits, - and _)"),
        });
    }
    let env_file = dir.join(format!("{env_name}.toml"));
    builder = builder.add_source(file_source(&env_file, explicit)?);

    if let Some(file) = &sources.file {
        builder = builder.add_source(file_source(file, true)?);
    }

    let env = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        // Values stay the strings they were written as: a client secret `00123` must not
        // become `123`, nor `1e3` a float. Numeric and boolean keys still parse from them.
        .try_parsing(false)
        .source(sources.vars.clone().map(|vars| vars.into_iter().collect()));
    builder = builder.add_source(env);

    builder.build().map_err(|e| ConfigError::File {
        file: dir.display().to_string(),
        reason: e.to_string(),
    })
}

fn file_source(
    path: &Path,
    required: bool,
) -> Result<File<config::FileSourceFile, FileFormat>, ConfigError> {
    if required && !path.is_file() {
        return Err(ConfigError::File {
            file: path.display().to_string(),
            reason: "no such file".to_owned(),
        });
    }
    Ok(File::from(path).format(FileFormat::Toml).required(required))
}

fn deserialize(config: &Config, sources: &Sources) -> Result<Settings, ConfigError> {
    let tree = tree_of(config);
    let (base, systems) = split_systems(&tree)?;
    let root = Value::new(None, ValueKind::Table(base.clone()));
    let mut settings: Settings = serde_path_to_error::deserialize(root).map_err(|err| {
        let path = err.path().to_string();
        describe(&tree, &path, err.into_inner())
    })?;
    settings.systems = systems_of(&tree, &base, systems)?;
    // librdkafka option names use dots, which environment variable names cannot hold: from the
    // environment, `_` stands for `.` (`…__LIBRDKAFKA__SASL_PASSWORD` sets `sasl.password`).
    let prefix = format!("{ENV_PREFIX}__KAFKA__LIBRDKAFKA__");
    let env_keys: Vec<String> = match &sources.vars {
        Some(vars) => vars.keys().cloned().collect(),
        None => std::env::vars().map(|(k, _)| k).collect(),
    };
    for name in env_keys {
        if let Some(rest) = name.strip_prefix(&prefix) {
            let key = rest.to_lowercase();
            if let Some(value) = settings.kafka.librdkafka.0.remove(&key) {
                settings
                    .kafka
                    .librdkafka
                    .0
                    .insert(key.replace('_', "."), value);
            }
        }
    }
    Ok(settings)
}

type Table = config::Map<String, Value>;

/// The tree without `upstream.systems`, and the tables of that key by system name.
fn split_systems(tree: &Table) -> Result<(Table, Vec<(String, Table)>), ConfigError> {
    let mut base = tree.clone();
    let Some(Value {
        kind: ValueKind::Table(upstream),
        ..
    }) = base.get_mut("upstream")
    else {
        return Ok((base, Vec::new()));
    };
    let Some(systems) = upstream.remove("systems") else {
        return Ok((base, Vec::new()));
    };
    let invalid = |key: String, reason: &str| ConfigError::Invalid {
        origin: origin_of(tree, &key),
        key,
        reason: reason.to_owned(),
    };
    let ValueKind::Table(systems) = systems.kind else {
        return Err(invalid(
            "upstream.systems".to_owned(),
            "must be a table of systems ([upstream.systems.<name>])",
        ));
    };
    let mut named = Vec::new();
    for (name, value) in systems {
        let key = format!("upstream.systems.{name}");
        let ValueKind::Table(table) = value.kind else {
            return Err(invalid(key, "must be a table of upstream keys"));
        };
        if table.contains_key("system") {
            return Err(invalid(
                format!("{key}.system"),
                "is the table's name: remove the key",
            ));
        }
        named.push((name, table));
    }
    Ok((base, named))
}

/// Each further system's settings: `[upstream]` overlaid with its own table.
fn systems_of(
    tree: &Table,
    base: &Table,
    systems: Vec<(String, Table)>,
) -> Result<Vec<UpstreamSettings>, ConfigError> {
    let defaults = match base.get("upstream") {
        Some(Value {
            kind: ValueKind::Table(t),
            ..
        }) => t.clone(),
        _ => Table::new(),
    };
    let mut out = Vec::with_capacity(systems.len());
    for (name, table) in systems {
        let mut merged = defaults.clone();
        merged.extend(table);
        merged.insert("system".to_owned(), Value::new(None, name.clone()));
        let value = Value::new(None, ValueKind::Table(merged));
        let settings: UpstreamSettings =
            serde_path_to_error::deserialize(value).map_err(|err| {
                let path = match err.path().to_string() {
                    p if p == "." => format!("upstream.systems.{name}"),
                    p => format!("upstream.systems.{name}.{p}"),
                };
                describe(tree, &path, err.into_inner())
            })?;
        out.push(settings);
    }
    Ok(out)
}

/// The merged key tree, each leaf with its origin.
fn tree_of(config: &Config) -> config::Map<String, Value> {
    match &config.cache.kind {
        ValueKind::Table(t) => t.clone(),
        _ => config::Map::new(),
    }
}

/// Turns a deserialization failure into an error naming the full key and its origin.
fn describe(
    tree: &config::Map<String, Value>,
    path: &str,
    err: config::ConfigError,
) -> ConfigError {
    let message = err.to_string();
    let parent = if path == "." {
        String::new()
    } else {
        path.to_owned()
    };
    // The path may already end with the offending field (serde_path_to_error records map keys).
    let join = |leaf: &str| {
        if parent.is_empty() {
            leaf.to_owned()
        } else if parent == leaf || parent.ends_with(&format!(".{leaf}")) {
            parent.clone()
        } else {
            format!("{parent}.{leaf}")
        }
    };
    if let Some(field) = between(&message, "unknown field `", "`") {
        let key = join(field);
        return ConfigError::UnknownKey {
            origin: origin_of(tree, &key),
            key,
        };
    }
    if let Some(field) = between(&message, "missing field `", "`") {
        let key = join(field);
        return ConfigError::Missing {
            env: env_name_of(&key),
            key,
        };
    }
    if let config::ConfigError::Type {
        key: Some(key),
        origin,
        ..
    } = &err
    {
        let full = if key.contains('.') || parent.is_empty() {
            key.clone()
        } else {
            join(key)
        };
        return ConfigError::Invalid {
            origin: origin.clone().unwrap_or_else(|| origin_of(tree, &full)),
            key: full,
            reason: message,
        };
    }
    ConfigError::Invalid {
        origin: origin_of(tree, &parent),
        key: parent,
        reason: message,
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

/// Where a key's value came from: a file path or "the environment".
fn origin_of(tree: &config::Map<String, Value>, key: &str) -> String {
    let mut node: Option<&Value> = None;
    let mut table = Some(tree);
    for part in key.split('.') {
        node = table.and_then(|t| t.get(part));
        table = match node {
            Some(Value {
                kind: ValueKind::Table(t),
                ..
            }) => Some(t),
            _ => None,
        };
    }
    match node {
        // A table's own origin is unset; name the origin of its first leaf instead.
        Some(Value {
            kind: ValueKind::Table(t),
            ..
        }) => t
            .values()
            .find_map(|v| v.origin().map(str::to_owned))
            .unwrap_or_else(|| "an unknown layer".to_owned()),
        Some(v) => v
            .origin()
            .map(str::to_owned)
            .unwrap_or_else(|| "config/default.toml (built in)".to_owned()),
        None => "an unknown layer".to_owned(),
    }
}

/// The environment variable that sets `key`.
pub fn env_name_of(key: &str) -> String {
    format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase())
}

impl Settings {
    /// Checks what types alone cannot: URL schemes, ranges, non-empty names.
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let tree = tree_of(config);
        let invalid = |(key, reason): (&str, String)| ConfigError::Invalid {
            key: key.to_owned(),
            origin: origin_of(&tree, key),
            reason,
        };
        self.check_names().map_err(invalid)?;
        self.check_transport().map_err(invalid)?;
        self.check_bounds().map_err(invalid)?;
        self.check_drain().map_err(invalid)?;
        self.check_topics().map_err(invalid)?;
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
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid(("log.level", e.to_string())));
        }
        Ok(())
    }

    /// Required names are set, and usable in event keys.
    fn check_names(&self) -> Result<(), (&'static str, String)> {
        let non_empty = [
            ("kafka.bootstrap_servers", &self.kafka.bootstrap_servers),
            ("kafka.group_id", &self.kafka.group_id),
            ("topics.requests", &self.topics.requests),
            ("topics.changes", &self.topics.changes),
            ("topics.results", &self.topics.results),
            ("topics.dlq", &self.topics.dlq),
            ("governance.app_id", &self.governance.app_id),
        ];
        for (key, value) in non_empty {
            if value.trim().is_empty() {
                return Err((key, "must not be empty".to_owned()));
            }
        }
        Ok(())
    }

    /// The store, the broker and the HTTP peers are reached the way the settings demand (TLS, no plain http in production).
    fn check_transport(&self) -> Result<(), (&'static str, String)> {
        let url = self.database.url.expose_secret();
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
        if self.database.require_tls && url.starts_with("postgres") {
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
        if self.kafka.require_tls {
            let protocol = self
                .kafka
                .librdkafka
                .get("security.protocol")
                .unwrap_or("plaintext")
                .to_ascii_lowercase();
            if protocol != "ssl" && protocol != "sasl_ssl" {
                return Err((
                    "kafka.librdkafka.security.protocol",
                    format!("is {protocol:?}, but kafka.require_tls is true: use ssl or sasl_ssl"),
                ));
            }
        }
        check_url(
            &self.governance.base_url,
            self.governance.allow_http,
            "governance.allow_http",
        )
        .map_err(|reason| ("governance.base_url", reason))
    }

    /// Sizes, counts and durations within their ranges.
    fn check_bounds(&self) -> Result<(), (&'static str, String)> {
        if self.pipeline.retry_delays.len() > 20
            || self
                .pipeline
                .retry_delays
                .iter()
                .any(|d| d.is_zero() || *d > Duration::from_secs(7 * 86_400))
        {
            return Err((
                "pipeline.retry_delays_ms",
                "must hold at most 20 delays, each above 0 and at most 7 days".to_owned(),
            ));
        }
        if self.database.max_connections == 0 {
            return Err(("database.max_connections", "must be above 0".to_owned()));
        }
        if self.pipeline.max_in_flight == 0 {
            return Err(("pipeline.max_in_flight", "must be at least 1".to_owned()));
        }
        if self.pipeline.relay_batch_size == 0 {
            return Err(("pipeline.relay_batch_size", "must be at least 1".to_owned()));
        }
        if !(1..=1024).contains(&self.pipeline.relay_shards) {
            return Err((
                "pipeline.relay_shards",
                "must be between 1 and 1024".to_owned(),
            ));
        }
        if !(4_096..=100_000_000).contains(&self.pipeline.max_event_bytes) {
            return Err((
                "pipeline.max_event_bytes",
                "must be between 4096 and 100000000".to_owned(),
            ));
        }
        Ok(())
    }

    /// A revoke waits up to the drain timeout before the group moves on: past the session timeout the broker would have expelled this instance while it drained.
    fn check_drain(&self) -> Result<(), (&'static str, String)> {
        // A revoke waits up to the drain timeout before the group moves on; past the session
        // timeout the broker would have expelled this instance while it drained.
        let session = match self.kafka.librdkafka.get("session.timeout.ms") {
            None => DEFAULT_SESSION_TIMEOUT,
            Some(ms) => ms.parse::<u64>().map(Duration::from_millis).map_err(|_| {
                (
                    "kafka.librdkafka.session.timeout.ms",
                    "must be a number of milliseconds".to_owned(),
                )
            })?,
        };
        if self.pipeline.drain_timeout >= session {
            return Err((
                "pipeline.drain_timeout_ms",
                format!(
                    "is {} ms, not below the consumer's session timeout ({} ms, \
                     kafka.librdkafka.session.timeout.ms): a drain that long gets the instance \
                     expelled from the group",
                    self.pipeline.drain_timeout.as_millis(),
                    session.as_millis()
                ),
            ));
        }
        Ok(())
    }

    /// Topic creation settings.
    fn check_topics(&self) -> Result<(), (&'static str, String)> {
        if self.topics.partitions < 1 {
            return Err(("topics.partitions", "must be at least 1".to_owned()));
        }
        if self.topics.replication_factor < 1 {
            return Err(("topics.replication_factor", "must be at least 1".to_owned()));
        }
        Ok(())
    }
}

/// A list of milliseconds as durations: an array in a file, or comma-separated text from the
/// environment (`PRODUCT_SYNC__PIPELINE__RETRY_DELAYS_MS=10000,60000`).
fn millis_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Millis {
        List(Vec<u64>),
        Text(String),
    }
    let millis = match Millis::deserialize(d)? {
        Millis::List(list) => list,
        Millis::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<u64>().map_err(|_| {
                    // Cut short: a config value quoted back need not be long.
                    let cut: String = s.chars().take(40).collect();
                    serde::de::Error::custom(format!("{cut:?} is not a number of milliseconds"))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(millis.into_iter().map(Duration::from_millis).collect())
}

/// An http(s) URL, plain http only when allowed.
fn check_url(value: &str, allow_http: bool, allow_key: &str) -> Result<(), String> {
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

impl Settings {
    /// Every management system: `[upstream]` first, then `[upstream.systems.*]`.
    pub fn all_systems(&self) -> impl Iterator<Item = &UpstreamSettings> {
        std::iter::once(&self.upstream).chain(&self.systems)
    }
}

impl UpstreamSettings {
    /// Checks one system's keys (under `prefix`); the failing key is named relative to its
    /// table. A further system's name must be usable in environment variable names, too.
    fn check(&self, prefix: &str) -> Result<(), (&'static str, String)> {
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
        self.check_bounds()
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

impl fmt::Display for Settings {
    /// A human-readable summary with every secret redacted (`product-sync config`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_broker(f)?;
        self.fmt_peers(f)?;
        self.fmt_pipeline(f)
    }
}

impl Settings {
    /// `kafka.*` and `topics.*`.
    fn fmt_broker(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kafka.bootstrap_servers = {:?}",
            self.kafka.bootstrap_servers
        )?;
        writeln!(f, "kafka.group_id = {:?}", self.kafka.group_id)?;
        for (k, v) in self.kafka.librdkafka.redacted() {
            writeln!(f, "kafka.librdkafka.{k:?} = {v:?}")?;
        }
        writeln!(f, "topics.requests = {:?}", self.topics.requests)?;
        writeln!(f, "topics.changes = {:?}", self.topics.changes)?;
        writeln!(f, "topics.results = {:?}", self.topics.results)?;
        writeln!(f, "topics.dlq = {:?}", self.topics.dlq)?;
        writeln!(f, "topics.state = {:?}", self.topics.state)?;
        writeln!(f, "topics.retry = {:?}", self.topics.retry)?;
        writeln!(f, "topics.create = {}", self.topics.create)?;
        writeln!(f, "topics.partitions = {}", self.topics.partitions)?;
        writeln!(
            f,
            "topics.replication_factor = {}",
            self.topics.replication_factor
        )?;
        Ok(())
    }

    /// `database.*`, `upstream.*`, `governance.*`.
    fn fmt_peers(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "database.url = {:?}", self.database.redacted_url())?;
        writeln!(
            f,
            "database.max_connections = {}",
            self.database.max_connections
        )?;
        writeln!(
            f,
            "database.migrate_on_start = {}",
            self.database.migrate_on_start
        )?;
        writeln!(
            f,
            "database.connect_timeout_ms = {}",
            self.database.connect_timeout.as_millis()
        )?;
        for (i, u) in self.all_systems().enumerate() {
            match i {
                0 => u.fmt_keys(f, "upstream")?,
                _ => u.fmt_keys(f, &format!("upstream.systems.{}", u.system))?,
            }
        }
        writeln!(f, "kafka.require_tls = {}", self.kafka.require_tls)?;
        writeln!(f, "database.require_tls = {}", self.database.require_tls)?;
        writeln!(f, "governance.enabled = {}", self.governance.enabled)?;
        writeln!(f, "governance.allow_http = {}", self.governance.allow_http)?;
        writeln!(f, "governance.base_url = {:?}", self.governance.base_url)?;
        writeln!(f, "governance.app_id = {:?}", self.governance.app_id)?;
        writeln!(f, "http.listen = \"{}\"", self.http.listen)?;
        let token = match &self.http.admin_token {
            Some(t) if !t.expose_secret().is_empty() => "\"[redacted]\"",
            _ => "(unset: console actions disabled)",
        };
        writeln!(f, "http.admin_token = {token}")?;
        Ok(())
    }

    /// `pipeline.*`, `http.*`, `log.*`.
    fn fmt_pipeline(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.pipeline;
        writeln!(f, "pipeline.max_in_flight = {}", p.max_in_flight)?;
        writeln!(
            f,
            "pipeline.drain_timeout_ms = {}",
            p.drain_timeout.as_millis()
        )?;
        writeln!(
            f,
            "pipeline.shutdown_timeout_ms = {}",
            p.shutdown_timeout.as_millis()
        )?;
        writeln!(f, "pipeline.relay_enabled = {}", p.relay_enabled)?;
        writeln!(
            f,
            "pipeline.relay_interval_ms = {}",
            p.relay_interval.as_millis()
        )?;
        writeln!(f, "pipeline.relay_batch_size = {}", p.relay_batch_size)?;
        writeln!(f, "pipeline.relay_shards = {}", p.relay_shards)?;
        writeln!(f, "pipeline.max_event_bytes = {}", p.max_event_bytes)?;
        writeln!(f, "pipeline.broker_wait_ms = {}", p.broker_wait.as_millis())?;
        let delays: Vec<String> = p
            .retry_delays
            .iter()
            .map(|d| d.as_millis().to_string())
            .collect();
        writeln!(f, "pipeline.retry_delays_ms = [{}]", delays.join(", "))?;
        writeln!(f, "log.level = {:?}", self.log.level)?;
        write!(f, "log.format = {:?}", self.log.format)
    }
}

impl UpstreamSettings {
    /// One system's keys under `prefix`, the secret redacted.
    fn fmt_keys(&self, f: &mut fmt::Formatter<'_>, prefix: &str) -> fmt::Result {
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
        writeln!(f, "{prefix}.allow_http = {}", self.allow_http)
    }
}

/// librdkafka options whose values are credentials.
pub fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.ends_with(".key.pem")
        || k.contains("sasl.oauthbearer.config")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(vars: &[(&str, &str)]) -> Sources {
        Sources {
            dir: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")),
            env_name: None,
            file: None,
            vars: Some(
                vars.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn defaults_load_and_env_overrides_win() {
        let s = load(&sources(&[
            ("PRODUCT_SYNC__KAFKA__BOOTSTRAP_SERVERS", "10.0.0.1:9092"),
            ("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "250"),
            ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "s3cr3t-from-env"),
            ("PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SECURITY_PROTOCOL", "ssl"),
        ]))
        .unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "10.0.0.1:9092");
        assert_eq!(s.upstream.page_size, 250);
        assert_eq!(s.upstream.client_secret.expose_secret(), "s3cr3t-from-env");
        assert_eq!(s.kafka.librdkafka.get("security.protocol"), Some("ssl"));
        // The local environment file is layered over the defaults.
        assert_eq!(s.log.format, LogFormat::Pretty);
    }

    #[test]
    fn a_further_system_takes_its_own_keys_and_its_secret_from_the_environment() {
        let dir = std::env::temp_dir().join(format!("ps-systems-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("systems.toml");
        std::fs::write(
            &file,
            "[upstream.systems.fund]\nbase_url = \"https://fund.example\"\nrate_limit_per_s = 20\n",
        )
        .unwrap();
        let mut src = sources(&[
            ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "wms-secret-1"),
            (
                "PRODUCT_SYNC__UPSTREAM__SYSTEMS__FUND__CLIENT_SECRET",
                "fund-secret-2",
            ),
            ("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "250"),
        ]);
        src.file = Some(file.clone());
        let s = load(&src).unwrap();
        let names: Vec<&str> = s.all_systems().map(|u| u.system.as_str()).collect();
        assert_eq!(names, ["wms", "fund"]);
        let fund = &s.systems[0];
        assert_eq!(fund.base_url, "https://fund.example");
        assert_eq!(fund.client_secret.expose_secret(), "fund-secret-2");
        assert_eq!(fund.rate_limit_per_s, Some(20));
        assert_eq!(fund.page_size, 250, "inherited from [upstream]");
        assert_eq!(s.upstream.client_secret.expose_secret(), "wms-secret-1");
        let shown = s.to_string();
        assert!(shown.contains("upstream.systems.fund.base_url = \"https://fund.example\""));
        assert!(shown.contains("upstream.systems.fund.client_secret = \"[redacted]\""));
        assert!(!shown.contains("fund-secret-2") && !shown.contains("wms-secret-1"));

        std::fs::write(&file, "[upstream.systems.fund]\nbase_urll = \"x\"\n").unwrap();
        let err = load(&src).unwrap_err().to_string();
        assert!(err.contains("upstream.systems.fund.base_urll"), "{err}");
        assert!(err.contains("systems.toml"), "names the file: {err}");
        std::fs::write(&file, "[upstream.systems.fund]\ncircuit_failures = 0\n").unwrap();
        let err = load(&src).unwrap_err().to_string();
        assert!(
            err.contains("upstream.systems.fund.circuit_failures"),
            "{err}"
        );
        std::fs::write(&file, "[upstream.systems.wms]\n").unwrap();
        let err = load(&src).unwrap_err().to_string();
        assert!(err.contains("names a system twice"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn retry_delays_come_from_a_file_as_a_list_and_from_the_environment_as_text() {
        let s = load(&sources(&[])).unwrap();
        assert_eq!(s.pipeline.retry_delays.len(), 4, "the default list");
        assert_eq!(s.pipeline.retry_delays[0], Duration::from_secs(10));
        let s = load(&sources(&[(
            "PRODUCT_SYNC__PIPELINE__RETRY_DELAYS_MS",
            "5000, 15000",
        )]))
        .unwrap();
        assert_eq!(
            s.pipeline.retry_delays,
            [Duration::from_secs(5), Duration::from_secs(15)]
        );
        let err = load(&sources(&[(
            "PRODUCT_SYNC__PIPELINE__RETRY_DELAYS_MS",
            "5s",
        )]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("pipeline.retry_delays_ms"), "{err}");
    }

    #[test]
    fn durations_are_typed_and_the_drain_must_end_before_the_session_does() {
        let s = load(&sources(&[(
            "PRODUCT_SYNC__PIPELINE__DRAIN_TIMEOUT_MS",
            "1500",
        )]))
        .unwrap();
        assert_eq!(s.pipeline.drain_timeout, Duration::from_millis(1500));
        let err = load(&sources(&[(
            "PRODUCT_SYNC__PIPELINE__DRAIN_TIMEOUT_MS",
            "45000",
        )]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("pipeline.drain_timeout_ms"), "{err}");
        assert!(err.contains("session timeout (45000 ms"), "{err}");
        let err = load(&sources(&[
            ("PRODUCT_SYNC__PIPELINE__DRAIN_TIMEOUT_MS", "7000"),
            (
                "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SESSION_TIMEOUT_MS",
                "6000",
            ),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("(6000 ms"), "{err}");
    }

    #[test]
    fn environment_strings_stay_as_written() {
        let s = load(&sources(&[
            ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "00123"),
            ("PRODUCT_SYNC__UPSTREAM__CLIENT_ID", "1e3"),
            ("PRODUCT_SYNC__UPSTREAM__SYSTEM", "TRUE"),
            ("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "0250"),
            ("PRODUCT_SYNC__GOVERNANCE__ENABLED", "true"),
        ]))
        .unwrap();
        assert_eq!(s.upstream.client_secret.expose_secret(), "00123");
        assert_eq!(s.upstream.client_id, "1e3");
        assert_eq!(s.upstream.system, "TRUE");
        // Numbers and booleans still parse from their strings.
        assert_eq!(s.upstream.page_size, 250);
        assert!(s.governance.enabled);
    }

    #[test]
    fn a_password_in_a_url_query_is_redacted() {
        let r = redact_url(
            "postgres://u:pw@db:5432/x?sslmode=verify-full&password=hunter2&sslpassword=k",
        );
        assert!(
            !r.contains("hunter2") && !r.contains("pw@") && !r.contains("=k"),
            "{r}"
        );
        assert!(r.contains("sslmode=verify-full"), "{r}");
    }

    #[test]
    fn production_file_selected_by_env() {
        let s = load(&sources(&[
            ("PRODUCT_SYNC_ENV", "production"),
            ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "x"),
            ("PRODUCT_SYNC__UPSTREAM__BASE_URL", "https://wms.example"),
            ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", "https://gov.example"),
        ]))
        .unwrap();
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn production_requires_tls_to_the_store_and_the_broker() {
        let base = [
            ("PRODUCT_SYNC_ENV", "production"),
            ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "x"),
            ("PRODUCT_SYNC__UPSTREAM__BASE_URL", "https://wms.example"),
            ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", "https://gov.example"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut vars = base.to_vec();
            vars.extend_from_slice(extra);
            load(&sources(&vars))
        };
        let err = with(&[("PRODUCT_SYNC__DATABASE__URL", "postgres://u:pw@db/x")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("database.url") && err.contains("sslmode"),
            "{err}"
        );
        assert!(!err.contains("pw@"), "{err}");
        with(&[(
            "PRODUCT_SYNC__DATABASE__URL",
            "postgres://u:pw@db/x?sslmode=verify-full",
        )])
        .unwrap();
        let err = with(&[(
            "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SECURITY_PROTOCOL",
            "plaintext",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("kafka.require_tls"), "{err}");
    }

    #[test]
    fn production_refuses_plain_http_unless_allowed() {
        let err = load(&sources(&[
            ("PRODUCT_SYNC_ENV", "production"),
            ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "x"),
            (
                "PRODUCT_SYNC__UPSTREAM__BASE_URL",
                "http://u:pw@wms.example",
            ),
            ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", "https://gov.example"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("upstream.base_url") && err.contains("upstream.allow_http"),
            "{err}"
        );
        assert!(!err.contains("pw"), "{err}");
        let allowed = load(&sources(&[
            ("PRODUCT_SYNC_ENV", "production"),
            ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "x"),
            ("PRODUCT_SYNC__UPSTREAM__BASE_URL", "http://wms.example"),
            ("PRODUCT_SYNC__UPSTREAM__ALLOW_HTTP", "true"),
            ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", "http://gov.example"),
        ]));
        let err = allowed.unwrap_err().to_string();
        assert!(err.contains("governance.allow_http"), "{err}");
    }

    #[test]
    fn unknown_env_key_is_named_with_origin() {
        let err = load(&sources(&[("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRETT", "x")])).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{msg}");
        assert!(msg.contains("`upstream.client_secrett`"), "{msg}");
        assert!(msg.contains("the environment"), "{msg}");
        assert!(!msg.contains("\"x\""), "{msg}");
    }

    #[test]
    fn unknown_file_key_is_named_with_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("extra.toml");
        std::fs::write(&file, "[database]\nurll = \"sqlite::memory:\"\n").unwrap();
        let mut src = sources(&[]);
        src.file = Some(file.clone());
        let msg = load(&src).unwrap_err().to_string();
        assert!(msg.contains("`database.urll`"), "{msg}");
        assert!(msg.contains("extra.toml"), "{msg}");
    }

    #[test]
    fn wrong_type_is_named_with_origin() {
        let msg = load(&sources(&[("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "many")]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("upstream.page_size"), "{msg}");
        assert!(msg.contains("the environment"), "{msg}");
    }

    #[test]
    fn out_of_range_value_is_refused() {
        let msg = load(&sources(&[("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "0")]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("upstream.page_size") && msg.contains("between 1 and 1000"),
            "{msg}"
        );
        let msg = load(&sources(&[(
            "PRODUCT_SYNC__DATABASE__URL",
            "mysql://u:hunter2@h/db",
        )]))
        .unwrap_err()
        .to_string();
        assert!(msg.contains("database.url"), "{msg}");
        assert!(
            !msg.contains("hunter2"),
            "password leaked into the error: {msg}"
        );
    }

    #[test]
    fn missing_explicit_env_file_is_an_error() {
        let msg = load(&sources(&[("PRODUCT_SYNC_ENV", "staging")]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("staging.toml"), "{msg}");
    }

    #[test]
    fn display_redacts_secrets() {
        let s = load(&sources(&[
            ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "topsecret-value"),
            (
                "PRODUCT_SYNC__DATABASE__URL",
                "postgres://app:dbpass-value@db:5432/ps",
            ),
            (
                "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SASL_PASSWORD",
                "kafkapass-value",
            ),
        ]))
        .unwrap();
        let shown = format!("{s}\n{s:?}");
        assert!(shown.contains("sasl.password"), "{shown}");
        for secret in ["topsecret-value", "dbpass-value", "kafkapass-value"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }

    #[test]
    fn env_var_names_follow_the_contract() {
        assert_eq!(
            env_name_of("upstream.client_secret"),
            "PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET"
        );
    }
}
