//! `[kafka]`: where the broker is, how to reach it (raw librdkafka options, TLS required or not).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// librdkafka's `session.timeout.ms` when the configuration does not set it.
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(45);

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

/// librdkafka options whose values are credentials.
pub fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.ends_with(".key.pem")
        || k.contains("sasl.oauthbearer.config")
}

impl KafkaSettings {
    /// Names set; TLS asked for when it is required.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(("kafka.bootstrap_servers", "must not be empty".to_owned()));
        }
        if self.group_id.trim().is_empty() {
            return Err(("kafka.group_id", "must not be empty".to_owned()));
        }
        if self.require_tls {
            let protocol = self
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
        self.session_timeout().map(|_| ())
    }

    /// The consumer's session timeout: `session.timeout.ms`, else librdkafka's default.
    pub(super) fn session_timeout(&self) -> Result<Duration, (&'static str, String)> {
        match self.librdkafka.get("session.timeout.ms") {
            None => Ok(DEFAULT_SESSION_TIMEOUT),
            Some(ms) => ms.parse::<u64>().map(Duration::from_millis).map_err(|_| {
                (
                    "kafka.librdkafka.session.timeout.ms",
                    "must be a number of milliseconds".to_owned(),
                )
            }),
        }
    }

    /// `kafka.*`, credentials redacted.
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kafka.bootstrap_servers = {:?}", self.bootstrap_servers)?;
        writeln!(f, "kafka.group_id = {:?}", self.group_id)?;
        for (k, v) in self.librdkafka.redacted() {
            writeln!(f, "kafka.librdkafka.{k:?} = {v:?}")?;
        }
        writeln!(f, "kafka.require_tls = {}", self.require_tls)
    }
}
