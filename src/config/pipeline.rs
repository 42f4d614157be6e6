//! `[pipeline]`: the consumer loop, the outbox relay and the retry topic's delays.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_with::{DurationMilliSeconds, serde_as};

use super::KafkaSettings;

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
    /// Exactly once downstream: each relay shard publishes through a transactional producer,
    /// its progress in the same transaction (`topics.relay_progress`). `false`: the
    /// idempotent producer (at least once).
    pub exactly_once: bool,
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

impl PipelineSettings {
    /// Sizes, counts and durations within their ranges; the drain ends before the session.
    pub(super) fn check(&self, kafka: &KafkaSettings) -> Result<(), (&'static str, String)> {
        if self.retry_delays.len() > 20
            || self
                .retry_delays
                .iter()
                .any(|d| d.is_zero() || *d > Duration::from_secs(7 * 86_400))
        {
            return Err((
                "pipeline.retry_delays_ms",
                "must hold at most 20 delays, each above 0 and at most 7 days".to_owned(),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(("pipeline.max_in_flight", "must be at least 1".to_owned()));
        }
        if self.relay_batch_size == 0 {
            return Err(("pipeline.relay_batch_size", "must be at least 1".to_owned()));
        }
        if !(1..=1024).contains(&self.relay_shards) {
            return Err((
                "pipeline.relay_shards",
                "must be between 1 and 1024".to_owned(),
            ));
        }
        if !(4_096..=100_000_000).contains(&self.max_event_bytes) {
            return Err((
                "pipeline.max_event_bytes",
                "must be between 4096 and 100000000".to_owned(),
            ));
        }
        self.check_drain(kafka)
    }

    /// A revoke waits up to the drain timeout before the group moves on: past the session
    /// timeout the broker would have expelled this instance while it drained.
    fn check_drain(&self, kafka: &KafkaSettings) -> Result<(), (&'static str, String)> {
        let session = kafka.session_timeout()?;
        if self.drain_timeout >= session {
            return Err((
                "pipeline.drain_timeout_ms",
                format!(
                    "is {} ms, not below the consumer's session timeout ({} ms, \
                     kafka.librdkafka.session.timeout.ms): a drain that long gets the instance \
                     expelled from the group",
                    self.drain_timeout.as_millis(),
                    session.as_millis()
                ),
            ));
        }
        Ok(())
    }

    /// `pipeline.*`.
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_millis();
        writeln!(f, "pipeline.max_in_flight = {}", self.max_in_flight)?;
        writeln!(f, "pipeline.drain_timeout_ms = {}", ms(self.drain_timeout))?;
        writeln!(
            f,
            "pipeline.shutdown_timeout_ms = {}",
            ms(self.shutdown_timeout)
        )?;
        writeln!(f, "pipeline.relay_enabled = {}", self.relay_enabled)?;
        writeln!(
            f,
            "pipeline.relay_interval_ms = {}",
            ms(self.relay_interval)
        )?;
        writeln!(f, "pipeline.relay_batch_size = {}", self.relay_batch_size)?;
        writeln!(f, "pipeline.relay_shards = {}", self.relay_shards)?;
        writeln!(f, "pipeline.exactly_once = {}", self.exactly_once)?;
        writeln!(f, "pipeline.max_event_bytes = {}", self.max_event_bytes)?;
        writeln!(f, "pipeline.broker_wait_ms = {}", ms(self.broker_wait))?;
        let delays: Vec<String> = self
            .retry_delays
            .iter()
            .map(|d| d.as_millis().to_string())
            .collect();
        writeln!(f, "pipeline.retry_delays_ms = [{}]", delays.join(", "))
    }
}
