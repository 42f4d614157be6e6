//! The running service (`product-sync run`): builds every part from the settings, runs them
//! until the stop token fires, then shuts them down in the order written in
//! [`Application::run_until_stopped`].

use std::net::SocketAddr;
use std::sync::Arc;

use sea_orm::{DatabaseBackend, DatabaseConnection};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::console::Console;
use crate::kafka::{self, KafkaError, Publisher, TopicSpec};
use crate::ops::{OpsServer, OpsState};
use crate::outbox::shards::Leases;
use crate::outbox::transactional::Transactions;
use crate::outbox::{Relay, RelaySettings};
use crate::pipeline::{
    Budget, Membership, NotificationRoute, Pipeline, PipelineError, Processor, RetryRoute,
};
use crate::retry::RetryPolicy;
use crate::scheduler::Scheduler;
use crate::store::{self, StoreError};
use crate::upstream::{self, Governance, Systems, UpstreamError};

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
            AppError::Ops { .. } => false,
        }
    }
}

/// Every part of a running instance, made by [`Application::build`] and run by
/// [`Application::run_until_stopped`].
pub struct Application {
    db: DatabaseConnection,
    producer: Publisher,
    instance_id: String,
    pipeline: Pipeline,
    relay: Option<Relay>,
    scheduler: Scheduler,
    governance: Option<Arc<Governance>>,
    systems: Arc<Systems>,
    ops: OpsServer,
    ops_addr: SocketAddr,
    console: Console,
    shutdown_timeout: std::time::Duration,
}

impl Application {
    /// Connects to the store (migrating it if configured), waits for the broker, creates
    /// missing topics, and makes every part: the upstream client, the producer, the consumer
    /// loop, the relay, the governance registration and the ops endpoint (bound, not serving).
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        let db = store::connect(&settings.database).await?;
        if settings.database.migrate_on_start {
            store::migrate(&db).await?;
        }
        kafka::wait_for_broker(&settings.kafka, settings.pipeline.broker_wait).await?;
        if settings.topics.create {
            kafka::ensure_topics(&settings.kafka, &topic_specs(&settings)).await?;
        }
        warn_if_topics_refuse_large_events(&settings).await;
        let u = &settings.upstream;
        let http = upstream::http_client(
            u.timeout,
            u.ca_file.as_deref().map(|p| (p, "upstream.ca_file")),
        )?;
        let systems = Arc::new(Systems::build(&settings)?);
        let producer = Publisher::create(kafka::producer_config(
            &settings.kafka,
            settings.pipeline.max_event_bytes,
        ))?;
        let instance_id = instance_id();
        let membership = Arc::new(Membership::default());
        let wake = Arc::new(Notify::new());
        let relay = settings
            .pipeline
            .relay_enabled
            .then(|| relay(&settings, &db, &producer, &instance_id, wake.clone()));
        let pipeline = pipeline(&settings, &db, &systems, &producer, &membership, wake);
        let scheduler =
            Scheduler::new(&settings, db.clone(), producer.clone(), instance_id.clone());
        let g = &settings.governance;
        let governance = g.enabled.then(|| {
            let ca = g.ca_file.as_deref().map(|p| (p, "governance.ca_file"));
            Ok::<_, AppError>(Arc::new(
                Governance::new(
                    upstream::http_client(u.timeout, ca)?,
                    &g.base_url,
                    &g.app_id,
                    instance_id.clone(),
                    RetryPolicy::with_budget(u.retry_max_elapsed),
                )
                .with_systems(systems.names()),
            ))
        });
        let governance = governance.transpose()?;
        let state = OpsState::new(
            db.clone(),
            producer.clone(),
            http,
            u.base_url.clone(),
            membership,
        );
        let addr = settings.http.listen;
        let ops_error = |source| AppError::Ops { addr, source };
        let console = Console::new(db.clone(), Arc::new(settings.clone()), systems.clone());
        let ops = OpsServer::bind(addr, state)
            .await
            .map_err(ops_error)?
            .with_routes(console.router());
        let ops_addr = ops.addr().map_err(ops_error)?;
        Ok(Self {
            db,
            producer,
            instance_id,
            pipeline,
            relay,
            scheduler,
            governance,
            systems,
            ops,
            ops_addr,
            console,
            shutdown_timeout: settings.pipeline.shutdown_timeout,
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

    /// Registers with the governance platform, runs every part until `stop` fires, then shuts
    /// down in this order:
    /// 1. the consumer stops taking commands; those in flight finish within
    ///    `pipeline.drain_timeout_ms` or are abandoned for redelivery; stored offsets are committed;
    ///    meanwhile the scheduler stops and gives its lease up;
    /// 2. the relay publishes what is left in its shards;
    /// 3. the producer is flushed;
    /// 4. the instance deregisters from the governance platform;
    /// 5. the ops endpoint stops; every task is joined and the store's pool closed.
    ///
    /// Steps 2–5 share `pipeline.shutdown_timeout_ms`.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> Result<(), AppError> {
        let tasks = TaskTracker::new();
        // Each part has its own token, stopped in order; all are children of `parts`, cancelled
        // last so that nothing outlives the shutdown even on an early return.
        let parts = CancellationToken::new();
        let (relay_stop, governance_stop) = (parts.child_token(), parts.child_token());
        // The scheduler stops with the first signal, while the consumer drains: a command it
        // published after the consumer stopped would wait for another instance.
        let scheduler_stop = stop.child_token();
        tasks.spawn(self.ops.run(parts.child_token()));
        tasks.spawn(
            self.console
                .keep_gathering(CONSOLE_EVERY, parts.child_token()),
        );
        let governance = match self.governance {
            Some(g) => match g.register().await {
                Ok(first) => Some(tasks.spawn(g.keep(first, governance_stop.clone()))),
                Err(e) => {
                    stop_all(&tasks, &parts, Instant::now() + self.shutdown_timeout).await;
                    return Err(e.into());
                }
            },
            None => None,
        };
        if let Err(e) = authorize(&self.systems, &self.db).await {
            stop_all(&tasks, &parts, Instant::now() + self.shutdown_timeout).await;
            return Err(e.into());
        }
        let relay = self.relay.map(|r| tasks.spawn(r.run(relay_stop.clone())));
        let scheduler = tasks.spawn(self.scheduler.run(scheduler_stop.clone()));
        tasks.close();

        tracing::info!(instance_id = %self.instance_id, "product-sync running");
        let result = self.pipeline.run(stop.clone()).await;
        // If the consumer loop failed on its own, the rest must stop too.
        stop.cancel();

        let deadline = Instant::now() + self.shutdown_timeout;
        join_by(Some(scheduler), deadline, "the scheduler's lease release").await;
        relay_stop.cancel();
        join_by(relay, deadline, "the relay's last round").await;
        let left = deadline.saturating_duration_since(Instant::now());
        crate::outbox::flush(self.producer.current(), left).await;
        governance_stop.cancel();
        join_by(governance, deadline, "deregistration").await;
        stop_all(&tasks, &parts, deadline).await;
        if let Err(e) = self.db.close().await {
            tracing::warn!(error = %e, "closing the store's pool failed");
        }
        tracing::info!("product-sync stopped");
        result.map_err(AppError::from)
    }
}

/// Waits for one part's task until `deadline`.
async fn join_by(task: Option<JoinHandle<()>>, deadline: Instant, what: &str) {
    if let Some(task) = task
        && tokio::time::timeout_at(deadline, task).await.is_err()
    {
        tracing::warn!("{what} did not finish before the shutdown deadline");
    }
}

/// Authorizes with every management system once at start-up: a setting that can never work
/// (client credentials, the CA) stops the start with an error naming it; a system that is
/// only down now is logged, and its commands retry as usual. A system an operator paused is
/// sent nothing, this request included.
async fn authorize(systems: &Systems, db: &DatabaseConnection) -> Result<(), UpstreamError> {
    let paused = store::pauses::paused(db).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the paused systems; authorizing with every system");
        Vec::new()
    });
    for system in systems.iter() {
        if paused.contains(&system.name) {
            tracing::info!(system = %system.name, "paused by an operator: not authorized at start-up");
            continue;
        }
        match system.client.tokens().authorize_once().await {
            Ok(()) => {
                tracing::info!(system = %system.name, "authorized with the management system")
            }
            Err(e) if e.is_transient() => tracing::warn!(
                system = %system.name,
                error = %e,
                "cannot authorize with the management system now; its commands will retry"
            ),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Stops every part still running and joins every task until `deadline`.
async fn stop_all(tasks: &TaskTracker, parts: &CancellationToken, deadline: Instant) {
    parts.cancel();
    tasks.close();
    if tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = tasks.len(),
            "tasks still running at the shutdown deadline"
        );
    }
}

/// The consumer loop and the processing of commands (with the retry route when on).
fn pipeline(
    settings: &Settings,
    db: &DatabaseConnection,
    systems: &Arc<Systems>,
    producer: &Publisher,
    membership: &Arc<Membership>,
    wake: Arc<Notify>,
) -> Pipeline {
    let retry = Some(&settings.topics.retry)
        .filter(|t| !t.is_empty() && !settings.pipeline.retry_delays.is_empty())
        .map(|topic| RetryRoute {
            topic: topic.clone(),
            delays: settings.pipeline.retry_delays.clone(),
        });
    let notifications = Some(&settings.topics.notifications)
        .filter(|t| !t.is_empty())
        .map(|topic| {
            Arc::new(NotificationRoute {
                topic: topic.clone(),
                requests_topic: settings.topics.requests.clone(),
                window: settings.notifications.window,
                page_sizes: settings
                    .all_systems()
                    .map(|u| (u.system.clone(), u.page_size as usize))
                    .collect(),
                budget: Arc::new(Budget::new(settings.notifications.max_pending_codes)),
            })
        });
    Pipeline {
        kafka: settings.kafka.clone(),
        requests_topic: settings.topics.requests.clone(),
        retry_topic: retry.as_ref().map(|r| r.topic.clone()),
        notifications,
        max_in_flight: settings.pipeline.max_in_flight,
        drain_timeout: settings.pipeline.drain_timeout,
        processor: Arc::new(Processor {
            db: db.clone(),
            systems: systems.clone(),
            producer: producer.clone(),
            dlq_topic: settings.topics.dlq.clone(),
            results_topic: settings.topics.results.clone(),
            retry,
            fold_policy: RetryPolicy::with_budget(settings.database.connect_timeout),
            relay_wake: wake,
        }),
        membership: membership.clone(),
    }
}

/// How often the console's overview is gathered.
const CONSOLE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

fn topic_specs(settings: &Settings) -> Vec<TopicSpec> {
    let t = &settings.topics;
    let state = Some(&t.state).filter(|s| !s.is_empty());
    let retry = Some(&t.retry).filter(|s| !s.is_empty());
    let notifications = Some(&t.notifications).filter(|s| !s.is_empty());
    [&t.requests, &t.changes, &t.results, &t.dlq]
        .into_iter()
        .chain(state)
        .chain(retry)
        .chain(notifications)
        .map(|name| TopicSpec {
            name: name.clone(),
            partitions: t.partitions,
            replication_factor: t.replication_factor,
            compacted: *name == t.state,
        })
        .chain(settings.pipeline.exactly_once.then(|| TopicSpec {
            name: t.relay_progress.clone(),
            // One partition per shard: a shard's progress is the end of its own partition.
            partitions: settings.pipeline.relay_shards as i32,
            replication_factor: t.replication_factor,
            compacted: true,
        }))
        .collect()
}

/// The outbox relay: leases on PostgreSQL, all shards in this process on SQLite.
fn relay(
    settings: &Settings,
    db: &DatabaseConnection,
    producer: &Publisher,
    instance_id: &str,
    wake: Arc<Notify>,
) -> Relay {
    let p = &settings.pipeline;
    crate::metrics::metrics()
        .relay_shards
        .set(i64::from(p.relay_shards));
    let leases = match db.get_database_backend() {
        DatabaseBackend::Postgres => Leases::postgres(
            settings.database.url.clone(),
            instance_id.to_owned(),
            p.relay_shards,
        ),
        _ => Leases::embedded(p.relay_shards),
    };
    Relay::new(
        db.clone(),
        producer.clone(),
        RelaySettings {
            changes_topic: settings.topics.changes.clone(),
            results_topic: settings.topics.results.clone(),
            state_topic: Some(settings.topics.state.clone()).filter(|s| !s.is_empty()),
            batch: p.relay_batch_size,
            interval: p.relay_interval,
            max_event_bytes: p.max_event_bytes,
            exactly_once: p.exactly_once.then(|| Transactions {
                kafka: settings.kafka.clone(),
                id_prefix: format!("{}-relay", settings.kafka.group_id),
                progress_topic: settings.topics.relay_progress.clone(),
                shards: p.relay_shards,
                max_event_bytes: p.max_event_bytes,
            }),
        },
        leases,
        wake,
    )
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
