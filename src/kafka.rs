//! Kafka plumbing shared by every role: client configuration from settings (with the raw
//! librdkafka passthrough), waiting for the broker, and creating missing topics.

use std::time::Duration;

mod publisher;
pub use publisher::Publisher;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};

use crate::config::KafkaSettings;
use crate::retry::{RetryPolicy, Transient, retry};

/// Errors at the Kafka boundary.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The broker did not answer a metadata request.
    #[error("Kafka broker at {servers} is unreachable: {source}")]
    Unreachable {
        servers: String,
        source: RdKafkaError,
    },
    /// A client could not be created (bad librdkafka option: permanent).
    #[error("cannot create a Kafka client: {0}")]
    Client(RdKafkaError),
    /// Creating a topic failed.
    #[error("cannot create topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    /// The brokers refused this client's TLS or SASL: a setting to fix, not a moment to wait
    /// out (permanent).
    #[error("Kafka broker at {servers} refused the connection: {reason}; check {settings}")]
    Security {
        servers: String,
        reason: String,
        settings: &'static str,
    },
    /// Any other broker error.
    #[error("Kafka error: {0}")]
    Other(#[from] RdKafkaError),
}

impl Transient for KafkaError {
    fn is_transient(&self) -> bool {
        match self {
            KafkaError::Unreachable { .. } => true,
            KafkaError::Client(_) | KafkaError::Security { .. } => false,
            KafkaError::CreateTopic { code, .. } => code_is_transient(*code),
            KafkaError::Other(e) => e.rdkafka_error_code().is_some_and(code_is_transient),
        }
    }
}

impl KafkaError {
    /// See [`Transient::is_transient`].
    pub fn is_transient(&self) -> bool {
        Transient::is_transient(self)
    }
}

fn code_is_transient(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        BrokerTransportFailure
            | AllBrokersDown
            | OperationTimedOut
            | RequestTimedOut
            | NetworkException
            | LeaderNotAvailable
            | NotLeaderForPartition
            | NotController
            | CoordinatorNotAvailable
            | NotCoordinator
            | CoordinatorLoadInProgress
            | NotEnoughReplicas
            | NotEnoughReplicasAfterAppend
            | QueueFull
            | MessageTimedOut
            | UnknownTopicOrPartition
    )
}

/// librdkafka's consumer-only properties (`C` in its CONFIGURATION.md): a producer or admin
/// client given one logs a `CONFWARN` warning at every creation, so the passthrough leaves
/// them out of those clients' configurations.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "group.protocol.type",
    "group.protocol",
    "group.remote.assignor",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "auto.commit.enable",
    "enable.auto.offset.store",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
    "auto.offset.reset",
    "offset.store.method",
    "consume.callback.max.messages",
];

/// librdkafka's producer-only properties (`P`), left out of consumers' configurations for
/// the same reason.
const PRODUCER_ONLY: &[&str] = &[
    "transactional.id",
    "transaction.timeout.ms",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "linger.ms",
    "message.send.max.retries",
    "retries",
    "queue.buffering.backpressure.threshold",
    "compression.codec",
    "compression.type",
    "compression.level",
    "batch.num.messages",
    "batch.size",
    "delivery.report.only.error",
    "sticky.partitioning.linger.ms",
    "request.required.acks",
    "acks",
    "request.timeout.ms",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "queuing.strategy",
    "produce.offset.report",
    "partitioner",
];

/// Which kind of client a configuration is for: the passthrough gives each only the options
/// that apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Consumer,
    /// A producer, or an admin client (librdkafka makes those as producers).
    Producer,
}

/// The passthrough options that apply to a client of `role`.
fn passthrough(settings: &KafkaSettings, role: Role) -> impl Iterator<Item = (&String, &String)> {
    let other_role = match role {
        Role::Consumer => PRODUCER_ONLY,
        Role::Producer => CONSUMER_ONLY,
    };
    settings
        .librdkafka
        .iter()
        .filter(move |(key, _)| !other_role.contains(&key.as_str()))
}

fn with_passthrough(settings: &KafkaSettings, role: Role) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.bootstrap_servers);
    for (key, value) in passthrough(settings, role) {
        config.set(key, value);
    }
    config
}

/// A consumer's base configuration: bootstrap servers, then every passthrough option but the
/// producer-only ones.
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    with_passthrough(settings, Role::Consumer)
}

/// A producer's or admin client's base configuration: bootstrap servers, then every
/// passthrough option but the consumer-only ones (`session.timeout.ms` and the like).
pub fn plain_producer_config(settings: &KafkaSettings) -> ClientConfig {
    with_passthrough(settings, Role::Producer)
}

/// A consumer that reads a topic once, from a given offset to its end, without joining or
/// committing for a group: `read_committed` (records of an aborted or still open relay
/// transaction are never shown) and end-of-partition events on, so a reader knows it has seen
/// everything committed — with transactions the last offset of a partition is often a commit
/// marker that is never delivered, so "the last record's offset + 1 = the high watermark" does
/// not hold.
pub fn reader_config(settings: &KafkaSettings, group: &str) -> ClientConfig {
    let mut config = client_config(settings);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    config
}

/// The context of the one-shot readers of [`reader_config`]. Reaching a partition's end is
/// how such a reader knows it has read everything, not a failure; librdkafka also reports it
/// through the client's error callback, which rust-rdkafka's default context logs at ERROR
/// (16 such lines each time an instance took the relay's shards). Here it is a debug line;
/// every other error is logged at ERROR as before, its reason cut short.
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: RdKafkaError, reason: &str) {
        let reason = crate::text::cut(reason, crate::text::REASON_CHARS);
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::debug!(%reason, "Kafka reader reached the end of a partition");
        } else {
            tracing::error!(error = %error, %reason, "Kafka reader error");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// A one-shot reader: [`reader_config`] with [`ReaderContext`].
pub type Reader = BaseConsumer<ReaderContext>;

/// Makes a one-shot reader (see [`reader_config`]).
pub fn reader(settings: &KafkaSettings, group: &str) -> Result<Reader, RdKafkaError> {
    reader_config(settings, group).create_with_context(ReaderContext)
}

/// The producer of every event product-sync sends (relay, DLQ, rejections): idempotent with
/// `acks=all` (no duplicate or reordering from its own retries, nothing acked that a broker
/// failure can lose), tuned for throughput — the relay hands it thousands of events at once,
/// so waiting 10 ms for fuller batches costs little latency and saves many requests; lz4
/// compresses the repetitive JSON about 3× at little CPU; 1 MB batches (librdkafka's
/// `batch.size` default) stay below the broker's default message limit; `message.max.bytes`
/// leaves room above `pipeline.max_event_bytes` for key and headers. Any of these can be
/// overridden through `kafka.librdkafka`, which is applied last.
pub fn producer_config(settings: &KafkaSettings, max_event_bytes: usize) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "10")
        .set("compression.type", "lz4")
        .set("batch.size", "1000000")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set(
            "message.max.bytes",
            (max_event_bytes.max(1_000_000) + 64 * 1024).to_string(),
        );
    for (key, value) in passthrough(settings, Role::Producer) {
        config.set(key, value);
    }
    config
}

/// The context of the start-up probe: keeps the last TLS or SASL failure librdkafka reports
/// (those arrive through the error callback, served by a producer's poll, while the metadata
/// request only fails with a transport error).
#[derive(Default)]
struct ProbeContext {
    refused: std::sync::Mutex<Option<(RDKafkaErrorCode, String)>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: RdKafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if let Some(code @ (RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication)) = code {
            let reason = crate::text::cut(reason, crate::text::REASON_CHARS);
            if let Ok(mut refused) = self.refused.lock() {
                *refused = Some((code, reason));
            }
        } else {
            tracing::warn!(error = %error, reason, "Kafka client error");
        }
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

impl ProbeContext {
    /// The TLS or SASL refusal seen, as the error that names the settings to check.
    fn refusal(&self, servers: &str) -> Option<KafkaError> {
        let (code, reason) = self.refused.lock().ok()?.take()?;
        let settings = match code {
            RDKafkaErrorCode::Authentication => {
                "kafka.librdkafka.\"sasl.username\", \"sasl.password\" and \"sasl.mechanisms\""
            }
            _ => {
                "kafka.librdkafka.\"ssl.ca.location\" (the CA that signed the brokers' certificates) and that the certificates name the hosts of kafka.bootstrap_servers"
            }
        };
        Some(KafkaError::Security {
            servers: servers.to_owned(),
            reason,
            settings,
        })
    }
}

/// Waits until the broker answers a metadata request, retrying with backoff up to `budget`;
/// a TLS or SASL refusal ends the wait at once with an error naming the settings to check.
pub async fn wait_for_broker(settings: &KafkaSettings, budget: Duration) -> Result<(), KafkaError> {
    let probe: BaseProducer<ProbeContext> = plain_producer_config(settings)
        .create_with_context(ProbeContext::default())
        .map_err(KafkaError::Client)?;
    let probe = std::sync::Arc::new(probe);
    let servers = settings.bootstrap_servers.clone();
    retry(
        &RetryPolicy::with_budget(budget),
        "reach Kafka broker",
        || {
            let probe = probe.clone();
            let servers = servers.clone();
            async move {
                let asked = probe.clone();
                let answer = tokio::task::spawn_blocking(move || {
                    let answer = asked.client().fetch_metadata(None, Duration::from_secs(3));
                    // Serves the error events (TLS, SASL) to the context.
                    asked.poll(Duration::from_millis(100));
                    answer
                })
                .await;
                match answer {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(source)) => Err(probe
                        .context()
                        .refusal(&servers)
                        .unwrap_or(KafkaError::Unreachable { servers, source })),
                    Err(_) => Err(KafkaError::Unreachable {
                        servers,
                        source: RdKafkaError::Canceled,
                    }),
                }
            }
        },
    )
    .await
}

/// A topic to create when missing.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// `cleanup.policy=compact`: the broker keeps the last record of each key.
    pub compacted: bool,
}

/// Creates the topics that do not exist yet; existing ones are left as they are.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[TopicSpec],
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = plain_producer_config(settings)
        .create()
        .map_err(KafkaError::Client)?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let topic = NewTopic::new(
                &t.name,
                t.partitions,
                TopicReplication::Fixed(t.replication_factor),
            );
            if t.compacted {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(new_topics.iter(), &options).await?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// The topics' `max.message.bytes` (the broker's limit on one record batch), where the
/// broker tells it; topics it does not describe are left out.
pub async fn max_message_bytes(
    settings: &KafkaSettings,
    topics: &[&str],
) -> Result<Vec<(String, usize)>, KafkaError> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> = plain_producer_config(settings)
        .create()
        .map_err(KafkaError::Client)?;
    let specs: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = admin.describe_configs(specs.iter(), &options).await?;
    Ok(described
        .into_iter()
        .zip(topics)
        .filter_map(|(r, topic)| {
            let value = r.ok()?.get("max.message.bytes")?.value.clone()?;
            Some(((*topic).to_owned(), value.parse().ok()?))
        })
        .collect())
}

/// The first value of a record's header, as text (lossy); `None` when absent.
pub fn header_text(message: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::Message;
    use rdkafka::message::Headers;
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LibrdkafkaOptions;
    use std::sync::{Arc, Mutex};

    /// What a subscriber wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines the reader context logs for this error, at every level.
    fn logged(code: RDKafkaErrorCode, reason: &str) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            ReaderContext.error(RdKafkaError::Global(code), reason)
        });
        String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned()
    }

    #[test]
    fn a_reader_logs_the_end_of_a_partition_as_debug_and_other_errors_as_errors() {
        let eof = logged(
            RDKafkaErrorCode::PartitionEOF,
            "Fetch from broker 1 reached end of partition at offset 0 (HighwaterMark 0)",
        );
        assert!(eof.contains("DEBUG"), "{eof}");
        assert!(!eof.contains("ERROR"), "{eof}");
        let down = logged(RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down");
        assert!(down.contains("ERROR"), "{down}");
        assert!(down.contains("1/1 brokers are down"), "{down}");
    }

    fn settings() -> KafkaSettings {
        KafkaSettings {
            bootstrap_servers: "127.0.0.1:9092".to_owned(),
            group_id: "g".to_owned(),
            librdkafka: LibrdkafkaOptions(
                [
                    ("session.timeout.ms", "30000"),
                    ("linger.ms", "50"),
                    ("security.protocol", "ssl"),
                ]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            ),
            require_tls: false,
        }
    }

    #[test]
    fn each_client_gets_the_passthrough_options_of_its_role_only() {
        let s = settings();
        let consumer = client_config(&s);
        assert_eq!(consumer.get("session.timeout.ms"), Some("30000"));
        assert_eq!(consumer.get("linger.ms"), None);
        assert_eq!(consumer.get("security.protocol"), Some("ssl"));
        let plain = plain_producer_config(&s);
        assert_eq!(plain.get("session.timeout.ms"), None);
        assert_eq!(plain.get("linger.ms"), Some("50"));
        assert_eq!(plain.get("security.protocol"), Some("ssl"));
        let relay = producer_config(&s, 1_000_000);
        assert_eq!(relay.get("session.timeout.ms"), None);
        assert_eq!(
            relay.get("linger.ms"),
            Some("50"),
            "the passthrough comes last"
        );
        assert_eq!(relay.get("security.protocol"), Some("ssl"));
    }
}
