//! The running service (`product-sync run`): builds every part from the settings, runs them
//! until the stop token fires, then shuts them down in the order written in
//! [`Application::run_until_stopped`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use sea_orm::{DatabaseBackend, DatabaseConnection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::kafka::{self, KafkaError, TopicSpec};
use crate::ops::{self, Membership, OpsState};
use crate::outbox::shards::Leases;
use crate::outbox::{Relay, RelaySettings};
use crate::pipeline::{Pipeline, PipelineError, Processor};
use crate::retry::RetryPolicy;
use crate::store::{self, StoreError};
use crate::upstream::{self, Governance, ProductClient, TokenSource, UpstreamError};

/// Start-up and run failures of the service.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(
        "product-sync needs a multi-threaded tokio runtime (partition revokes block the polling thread)"
    )]
    Runtime,
    #[error("cannot serve the ops endpoint on {addr} (http.listen): {source}")]
    Ops {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl AppError {
    pub fn is_transient(&self) -> bool {
        match self {
            AppError::Store(e) => e.is_transient(),
            AppError::Kafka(e) => e.is_transient(),
            AppError::Upstream(e) => e.is_transient(),
            AppError::Pipeline(e) => e.is_transient(),
            AppError::Ops { .. } | AppError::Runtime => false,
        }
    }
}

/// Every part of a running instance.
pub struct Application {
    settings: Settings,
    db: DatabaseConnection,
    client: Arc<ProductClient>,
    producer: FutureProducer,
    http: reqwest::Client,
    instance_id: String,
    membership: Arc<Membership>,
    ops_addr: SocketAddr,
    ops_stop: CancellationToken,
}

impl Application {
    /// Connects to the store (migrating it if configured), waits for the broker, creates
    /// missing topics, and builds the upstream client and the producer.
    ///
    /// Needs a multi-threaded tokio runtime: a partition revoke blocks the polling thread
    /// while the revoked partitions' workers finish on other threads.
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread
        {
            return Err(AppError::Runtime);
        }
        let db = store::connect(&settings.database).await?;
        if settings.database.migrate_on_start {
            store::migrate(&db).await?;
        }
        kafka::wait_for_broker(
            &settings.kafka,
            Duration::from_millis(settings.pipeline.broker_wait_ms),
        )
        .await?;
        if settings.topics.create {
            let t = &settings.topics;
            let specs: Vec<TopicSpec> = [&t.requests, &t.changes, &t.results, &t.dlq]
                .into_iter()
                .map(|name| TopicSpec {
                    name: name.clone(),
                    partitions: t.partitions,
                    replication_factor: t.replication_factor,
                })
                .collect();
            kafka::ensure_topics(&settings.kafka, &specs).await?;
        }
        warn_if_topics_refuse_large_events(&settings).await;
        let u = &settings.upstream;
        let http = upstream::http_client(Duration::from_millis(u.timeout_ms))?;
        let policy = RetryPolicy::with_budget(Duration::from_millis(u.retry_max_elapsed_ms));
        let tokens = Arc::new(TokenSource::new(
            http.clone(),
            &u.base_url,
            u.client_id.clone(),
            u.client_secret.clone(),
            policy,
        )?);
        let client = Arc::new(
            ProductClient::new(http.clone(), &u.base_url, tokens, u.page_size, policy)?
                .with_limits(upstream::products::Limits {
                    max_page_bytes: u.max_page_bytes,
                    max_pages: u.max_pages,
                    command_timeout: Duration::from_millis(u.command_timeout_ms),
                    max_record_bytes: u.max_record_bytes,
                }),
        );
        let producer: FutureProducer =
            kafka::producer_config(&settings.kafka, settings.pipeline.max_event_bytes)
                .create()
                .map_err(KafkaError::Client)?;
        let membership = Arc::new(Membership::default());
        let ops_stop = CancellationToken::new();
        let ops_addr = ops::serve(
            settings.http.listen,
            OpsState::new(
                db.clone(),
                producer.clone(),
                http.clone(),
                u.base_url.clone(),
                membership.clone(),
            ),
            ops_stop.clone(),
        )
        .await
        .map_err(|e| AppError::Ops {
            addr: settings.http.listen,
            source: e,
        })?;
        Ok(Self {
            settings,
            db,
            client,
            producer,
            http,
            instance_id: instance_id(),
            membership,
            ops_addr,
            ops_stop,
        })
    }

    /// Where the ops endpoint listens (useful when `http.listen` asked for port 0).
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// The store connection (tests and tools read through it).
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Runs until `stop` fires, then shuts down in this order:
    /// 1. the consumer stops taking commands; those in flight finish within
    ///    `pipeline.drain_timeout_ms` or are abandoned for redelivery; stored offsets are committed;
    /// 2. the relay publishes what is left in the outbox;
    /// 3. the producer is flushed;
    /// 4. the instance deregisters from the governance platform;
    /// 5. the ops endpoint stops and the store's pool is closed.
    ///
    /// Steps 2–5 share `pipeline.shutdown_timeout_ms`.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> Result<(), AppError> {
        let s = &self.settings;
        let governance_stop = CancellationToken::new();
        let governance = if s.governance.enabled {
            let policy =
                RetryPolicy::with_budget(Duration::from_millis(s.upstream.retry_max_elapsed_ms));
            let g = Arc::new(Governance::new(
                self.http.clone(),
                &s.governance.base_url,
                &s.governance.app_id,
                self.instance_id.clone(),
                policy,
            ));
            Some(g.start(governance_stop.clone()).await?)
        } else {
            None
        };

        let wake = Arc::new(Notify::new());
        let relay_stop = CancellationToken::new();
        let relay = s.pipeline.relay_enabled.then(|| {
            let leases = match self.db.get_database_backend() {
                DatabaseBackend::Postgres => Leases::postgres(
                    s.database.url.clone(),
                    self.instance_id.clone(),
                    s.pipeline.relay_shards,
                ),
                _ => Leases::embedded(s.pipeline.relay_shards),
            };
            let relay = Relay::new(
                self.db.clone(),
                self.producer.clone(),
                RelaySettings {
                    changes_topic: s.topics.changes.clone(),
                    results_topic: s.topics.results.clone(),
                    batch: s.pipeline.relay_batch_size,
                    interval: Duration::from_millis(s.pipeline.relay_interval_ms),
                    max_event_bytes: s.pipeline.max_event_bytes,
                },
                leases,
                wake.clone(),
            );
            let stop = relay_stop.clone();
            tokio::spawn(relay.run(stop))
        });

        let processor = Arc::new(Processor {
            db: self.db.clone(),
            client: self.client.clone(),
            producer: self.producer.clone(),
            system: s.upstream.system.clone(),
            dlq_topic: s.topics.dlq.clone(),
            results_topic: s.topics.results.clone(),
            fold_policy: RetryPolicy::with_budget(Duration::from_millis(
                s.database.connect_timeout_ms,
            )),
            relay_wake: wake,
        });
        let pipeline = Pipeline {
            kafka: s.kafka.clone(),
            requests_topic: s.topics.requests.clone(),
            max_in_flight: s.pipeline.max_in_flight,
            drain_timeout: Duration::from_millis(s.pipeline.drain_timeout_ms),
            processor,
            membership: self.membership.clone(),
        };
        tracing::info!(instance_id = %self.instance_id, "product-sync running");
        let result = pipeline.run(stop.clone()).await;
        // If the consumer loop failed on its own, the rest must stop too.
        stop.cancel();

        let deadline = Instant::now() + Duration::from_millis(s.pipeline.shutdown_timeout_ms);
        let left = || deadline.saturating_duration_since(Instant::now());
        relay_stop.cancel();
        if let Some(task) = relay
            && tokio::time::timeout(left(), task).await.is_err()
        {
            tracing::warn!("the relay did not finish its last round before the shutdown deadline");
        }
        crate::outbox::flush(self.producer.clone(), left()).await;
        governance_stop.cancel();
        if let Some(task) = governance
            && tokio::time::timeout(left(), task).await.is_err()
        {
            tracing::warn!("deregistration did not finish before the shutdown deadline");
        }
        self.ops_stop.cancel();
        if let Err(e) = self.db.close().await {
            tracing::warn!(error = %e, "closing the store's pool failed");
        }
        tracing::info!("product-sync stopped");
        result.map_err(AppError::from)
    }
}

/// Says at start-up when a topic's `max.message.bytes` is below `pipeline.max_event_bytes`:
/// events between the two would be refused by the broker and parked instead of reduced.
async fn warn_if_topics_refuse_large_events(settings: &Settings) {
    let t = &settings.topics;
    let limit = settings.pipeline.max_event_bytes;
    match kafka::max_message_bytes(&settings.kafka, &[&t.changes, &t.results]).await {
        Ok(found) => {
            for (topic, bytes) in found.into_iter().filter(|(_, b)| *b < limit) {
                tracing::warn!(
                    topic,
                    max_message_bytes = bytes,
                    max_event_bytes = limit,
                    "the topic takes less than pipeline.max_event_bytes: events between the two \
                     will be parked, not reduced; lower pipeline.max_event_bytes or raise the \
                     topic's max.message.bytes"
                );
            }
        }
        Err(e) => tracing::debug!(error = %e, "could not read the topics' max.message.bytes"),
    }
}

/// `host-pid-random`: unique per process, readable in the governance platform.
fn instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..8])
}
