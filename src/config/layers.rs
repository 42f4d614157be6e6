//! Reading the layers (files, then `PRODUCT_SYNC__…` variables) into one key tree, further
//! systems overlaid on `[upstream]`, and errors that name the full key and where it was set.

use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat, Value, ValueKind};

use super::{
    BUILT_IN_DEFAULT, ConfigError, ENV_CONFIG_DIR, ENV_PREFIX, ENV_SELECTOR, Settings, Sources,
    UpstreamSettings,
};

pub(super) fn build(sources: &Sources) -> Result<Config, ConfigError> {
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

pub(super) fn deserialize(config: &Config, sources: &Sources) -> Result<Settings, ConfigError> {
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
pub(super) fn tree_of(config: &Config) -> config::Map<String, Value> {
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
pub(super) fn origin_of(tree: &config::Map<String, Value>, key: &str) -> String {
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
