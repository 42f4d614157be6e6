//! The consumer loop: product-request commands from `topics.requests`, consumed by the
//! instances of one consumer group, each command processed (see `process`) by a worker task of
//! its partition.
//!
//! # Delivery guarantee: at least once
//! `enable.auto.offset.store=false`: a command's offset is stored only after everything it
//! caused is committed — its pages folded (with their outbox rows) and its request row
//! finished, or, for a bad command, its DLQ record and `rejected` result acknowledged by the
//! broker. Stored offsets are committed by librdkafka's auto-commit, synchronously on every
//! partition revoke, and at shutdown. So a crash at any point re-delivers every command whose
//! effects were not all committed, and the fold's idempotence makes the re-run harmless. This
//! holds as long as the worker of a revoked partition finishes or abandons its command before
//! the revoke completes — which the rebalance callback waits for, up to
//! `pipeline.drain_timeout_ms` (kept below the group's session timeout).
//!
//! # Three parts, after vector's Kafka source
//! - **The driver** polls the consumer's main queue on a blocking thread of its own
//!   (`spawn_blocking`): it serves the group protocol, rebalances and statistics, and is never
//!   held up by a command (no `max.poll.interval.ms` expulsion, rust-rdkafka #433).
//! - **One task per assigned partition** reads that partition's own queue
//!   (`split_partition_queue`, split inside the assign callback, before any fetch can start, so
//!   no command of the partition can reach the main queue) and runs its commands in order.
//!   librdkafka's prefetch bounds what waits in a queue; a busy partition stops being read,
//!   nothing is paused by hand. At most `pipeline.max_in_flight` commands run at once.
//! - **The coordinator** (the async task of [`Pipeline::run`]) owns the partition tasks. The
//!   rebalance callbacks, on the driver's thread, hand it each assignment and revocation and
//!   wait for its answer: revoked partitions' tasks are stopped, drained and *joined* (so their
//!   queues are gone before a partition can be split again) before the callback commits and
//!   returns. Nothing waits on a runtime worker thread, so any tokio runtime will do.
//!
//! # The retry topic
//! The instances consume `topics.retry` beside the request topic, in the same group. A command
//! there carries `retry.not_before`: its partition's task waits until then with the partition
//! paused (nothing fetched for it, no permit held, no other partition held up, the driver
//! still polling — so no expulsion from the group), then resumes it and runs the command.
//! The wait is bounded by the longest configured delay, whatever the header says.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::{ClientContext, Message, Offset};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::KafkaSettings;
use crate::kafka::client_config;
use crate::metrics::metrics;
use crate::retry::{Backoff, RetryPolicy};

pub mod notifications;
pub mod process;

pub use notifications::{Budget, NotificationRoute};
pub use process::{Processor, RetryRoute};

/// After this long past the drain deadline, an abandoned command's task is aborted.
const ABANDON_GRACE: Duration = Duration::from_secs(5);

type PartitionKey = (String, i32);
type Queue = StreamPartitionQueue<Context>;

/// Errors that stop the consumer loop.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot create the Kafka consumer: {0}")]
    Consumer(KafkaError),
    #[error("cannot subscribe to {topic}: {source}")]
    Subscribe { topic: String, source: KafkaError },
}

impl PipelineError {
    /// Both need configuration or broker fixes; the process exits.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// What the consumer loop reports about its group membership (read by the readiness check).
#[derive(Debug, Default)]
pub struct Membership {
    /// A rebalance has completed at least once.
    pub joined: AtomicBool,
    /// Partitions currently assigned.
    pub partitions: AtomicUsize,
}

/// A rebalance, as the callback hands it to the coordinator.
enum Rebalanced {
    Assigned(Vec<PartitionKey>),
    Revoked(Vec<PartitionKey>),
}

/// The callback waits on this until the coordinator has acted on the rebalance.
type Done = std::sync::mpsc::SyncSender<()>;

/// Consumer context: hands rebalances to the coordinator (and waits for it), commits stored
/// offsets before partitions go, reports membership and consumer lag.
struct Context {
    rebalances: mpsc::UnboundedSender<(Rebalanced, Done)>,
    membership: Arc<Membership>,
}

impl Context {
    /// Blocks the driver's thread (never a runtime worker) until the coordinator is done.
    /// Once the coordinator is gone (shutdown) there is nothing to wait for.
    fn hand_over(&self, rebalanced: Rebalanced) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if self.rebalances.send((rebalanced, done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

impl ClientContext for Context {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag = &metrics().consumer_lag;
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal "unassigned" partition.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    lag.with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            self.membership.partitions.store(0, Ordering::SeqCst);
            let keys = partition_keys(list);
            tracing::info!(
                partitions = keys.len(),
                "partitions revoked; draining their commands"
            );
            self.hand_over(Rebalanced::Revoked(keys));
            commit_stored(consumer);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.membership.joined.store(true, Ordering::SeqCst);
        if let Rebalance::Assign(list) = rebalance {
            self.membership
                .partitions
                .store(list.count(), Ordering::SeqCst);
            let keys = partition_keys(list);
            let parts: Vec<String> = keys.iter().map(|(t, p)| format!("{t}[{p}]")).collect();
            tracing::info!(assigned = %parts.join(","), "partitions assigned");
            self.hand_over(Rebalanced::Assigned(keys));
        }
    }
}

fn partition_keys(list: &TopicPartitionList) -> Vec<PartitionKey> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// Commits the stored offsets (never the consumed position) synchronously.
fn commit_stored<C: Consumer<X>, X: ConsumerContext>(consumer: &C) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::debug!("stored offsets committed"),
        // Nothing stored since the last commit.
        Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            tracing::warn!(error = %e, "committing stored offsets failed; they will be committed later or the commands redelivered")
        }
    }
}

/// The consumer's configuration: offsets stored by the pipeline once a command is done and
/// committed by librdkafka (every second, on revoke, at close). The commit cadence may be
/// tuned through `kafka.librdkafka`; what makes an offset safe to commit may not.
fn consumer_config(kafka: &KafkaSettings) -> rdkafka::ClientConfig {
    let mut config = client_config(kafka);
    if config.get("auto.commit.interval.ms").is_none() {
        config.set("auto.commit.interval.ms", "1000");
    }
    config
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000");
    config
}

/// The consumer loop of one instance.
pub struct Pipeline {
    pub kafka: KafkaSettings,
    pub requests_topic: String,
    /// The retry topic, consumed beside the request topic; `None` when disabled.
    pub retry_topic: Option<String>,
    /// Change notifications, consumed beside the commands; `None` when disabled.
    pub notifications: Option<Arc<NotificationRoute>>,
    pub max_in_flight: usize,
    pub drain_timeout: Duration,
    pub processor: Arc<Processor>,
    /// Shared with the ops endpoint's readiness check.
    pub membership: Arc<Membership>,
}

impl Pipeline {
    /// Consumes until `stop`, then stops taking commands, lets those in flight finish within
    /// the drain timeout (or abandons them for redelivery), commits stored offsets and leaves
    /// the group.
    pub async fn run(self, stop: CancellationToken) -> Result<(), PipelineError> {
        let (rebalances_tx, mut rebalances) = mpsc::unbounded_channel();
        let consumer: StreamConsumer<Context> = consumer_config(&self.kafka)
            .create_with_context(Context {
                rebalances: rebalances_tx,
                membership: self.membership.clone(),
            })
            .map_err(PipelineError::Consumer)?;
        let consumer = Arc::new(consumer);
        self.subscribe(&consumer)?;

        let driver_stop = CancellationToken::new();
        // Should this future be dropped rather than run to its end (its runtime shutting
        // down), the driver's thread must still stop: a runtime waits for its blocking threads.
        let _driver_stops_on_drop = driver_stop.clone().drop_guard();
        let mut driver = drive(consumer.clone(), driver_stop.clone());
        let mut partitions = Partitions {
            running: HashMap::new(),
            consumer: consumer.clone(),
            processor: self.processor.clone(),
            notifications: self.notifications.clone(),
            permits: Arc::new(Semaphore::new(self.max_in_flight)),
            drain_timeout: self.drain_timeout,
            max_retry_wait: self.processor.retry.as_ref().map_or(Duration::ZERO, |r| {
                r.delays.iter().copied().max().unwrap_or(Duration::ZERO)
            }),
        };
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                next = rebalances.recv() => match next {
                    Some((rebalanced, done)) => {
                        partitions.apply(rebalanced, true).await;
                        let _ = done.send(());
                    }
                    None => break,
                },
            }
        }

        tracing::info!("stopping: no new commands; draining those in flight");
        partitions.stop_all().await;
        // The driver may sit in a rebalance callback: keep answering until it has stopped.
        driver_stop.cancel();
        loop {
            tokio::select! {
                joined = &mut driver => {
                    if joined.is_err() {
                        tracing::error!("the consumer's driver panicked");
                    }
                    break;
                }
                Some((rebalanced, done)) = rebalances.recv() => {
                    partitions.apply(rebalanced, false).await;
                    let _ = done.send(());
                }
            }
        }
        // Without a coordinator, the callbacks of the final revoke no longer wait for one.
        drop(rebalances);
        drop(partitions);
        let left = tokio::task::spawn_blocking(move || {
            commit_stored(consumer.as_ref());
            consumer.unsubscribe();
            // Closing the consumer (leaving the group) blocks: done here, off the runtime.
            drop(consumer);
        })
        .await;
        if left.is_err() {
            tracing::error!("leaving the consumer group panicked");
        }
        Ok(())
    }
}

impl Pipeline {
    /// Subscribes to the request topic and, when on, the retry topic.
    fn subscribe(&self, consumer: &StreamConsumer<Context>) -> Result<(), PipelineError> {
        let mut topics = vec![self.requests_topic.as_str()];
        topics.extend(self.retry_topic.as_deref());
        topics.extend(self.notifications.as_ref().map(|n| n.topic.as_str()));
        consumer
            .subscribe(&topics)
            .map_err(|source| PipelineError::Subscribe {
                topic: topics.join(","),
                source,
            })?;
        tracing::info!(topics = %topics.join(","), group = %self.kafka.group_id, "consuming product-request commands");
        Ok(())
    }
}

/// Polls the main queue on a blocking thread until `stop`. Every partition's commands arrive
/// on that partition's queue; a message here means one was buffered before its queue was
/// split (it must not happen): the partition is rewound to it, so nothing is skipped.
fn drive(consumer: Arc<StreamConsumer<Context>>, stop: CancellationToken) -> JoinHandle<()> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        runtime.block_on(async {
            loop {
                let received = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    m = consumer.recv() => m,
                };
                match received {
                    Ok(message) => rewind_to(&consumer, &message),
                    // Errors here are librdkafka's reports (a broker down, a failed connect):
                    // it recovers by itself. Never wait on them: every moment this loop does
                    // not poll, the group's rebalances wait for this member (a chaos run once
                    // stalled the whole group for five minutes behind a growing backoff here).
                    Err(e) => tracing::warn!(error = %e, "consumer error; continuing"),
                }
            }
        })
    })
}

fn rewind_to(consumer: &StreamConsumer<Context>, message: &BorrowedMessage<'_>) {
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    tracing::error!(
        topic,
        partition,
        offset,
        "a command arrived outside its partition's queue; rewinding the partition to it"
    );
    if let Err(e) = consumer.seek(
        topic,
        partition,
        Offset::Offset(offset),
        Duration::from_secs(5),
    ) {
        tracing::warn!(error = %e, topic, partition, "could not rewind the partition; its commands will be redelivered after the next rebalance");
    }
}

/// The partition tasks of this instance, owned by the coordinator.
struct Partitions {
    running: HashMap<PartitionKey, Running>,
    consumer: Arc<StreamConsumer<Context>>,
    processor: Arc<Processor>,
    notifications: Option<Arc<NotificationRoute>>,
    permits: Arc<Semaphore>,
    drain_timeout: Duration,
    /// The longest a retry-topic command waits, whatever its header says.
    max_retry_wait: Duration,
}

/// One partition's task.
struct Running {
    /// Stop taking new commands from the queue.
    stop_taking: CancellationToken,
    /// Give up the command in flight (it will be redelivered).
    abandon: CancellationToken,
    task: JoinHandle<()>,
}

impl Partitions {
    /// Acts on a rebalance; `consuming` is false once the instance is stopping (no new tasks).
    async fn apply(&mut self, rebalanced: Rebalanced, consuming: bool) {
        match rebalanced {
            Rebalanced::Assigned(keys) if consuming => keys.into_iter().for_each(|k| self.start(k)),
            Rebalanced::Assigned(_) => {}
            Rebalanced::Revoked(keys) => self.stop(&keys).await,
        }
    }

    fn start(&mut self, key: PartitionKey) {
        if self.running.contains_key(&key) {
            return;
        }
        let Some(queue) = self.consumer.split_partition_queue(&key.0, key.1) else {
            tracing::error!(topic = %key.0, partition = key.1, "cannot read an assigned partition's queue");
            return;
        };
        // librdkafka keeps a partition's pause through a revoke and a re-assignment to the
        // same member: a retry-topic partition paused when the rebalance came would stay
        // paused for ever (the chaos run found it). Every assigned partition starts resumed.
        let mut partition = TopicPartitionList::new();
        partition.add_partition(&key.0, key.1);
        if let Err(e) = self.consumer.resume(&partition) {
            tracing::warn!(error = %e, topic = %key.0, partition = key.1, "could not resume an assigned partition");
        }
        let stop_taking = CancellationToken::new();
        let abandon = CancellationToken::new();
        let task = match self.notifications.as_ref().filter(|n| n.topic == key.0) {
            Some(route) => tokio::spawn(
                notifications::task::NotificationTask {
                    key: key.clone(),
                    queue,
                    consumer: self.consumer.clone(),
                    processor: self.processor.clone(),
                    route: route.clone(),
                    stop_taking: stop_taking.clone(),
                    abandon: abandon.clone(),
                }
                .run(),
            ),
            None => self.spawn_commands(key.clone(), queue, &stop_taking, &abandon),
        };
        self.running.insert(
            key,
            Running {
                stop_taking,
                abandon,
                task,
            },
        );
    }

    /// The task of a request-topic or retry-topic partition.
    fn spawn_commands(
        &self,
        key: PartitionKey,
        queue: Queue,
        stop_taking: &CancellationToken,
        abandon: &CancellationToken,
    ) -> JoinHandle<()> {
        tokio::spawn(
            PartitionTask {
                key,
                queue,
                consumer: self.consumer.clone(),
                processor: self.processor.clone(),
                permits: self.permits.clone(),
                stop_taking: stop_taking.clone(),
                abandon: abandon.clone(),
                max_retry_wait: self.max_retry_wait,
            }
            .run(),
        )
    }

    async fn stop_all(&mut self) {
        let keys: Vec<PartitionKey> = self.running.keys().cloned().collect();
        self.stop(&keys).await;
    }

    /// No new commands on `keys`; the command in flight may finish within the drain timeout,
    /// then it is abandoned. Returns when every task has ended (and dropped its queue).
    async fn stop(&mut self, keys: &[PartitionKey]) {
        let taken: Vec<(PartitionKey, Running)> = keys
            .iter()
            .filter_map(|k| self.running.remove_entry(k))
            .collect();
        for (_, r) in &taken {
            r.stop_taking.cancel();
        }
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        for ((topic, partition), mut r) in taken {
            if tokio::time::timeout_at(deadline, &mut r.task).await.is_ok() {
                continue;
            }
            tracing::warn!(
                topic,
                partition,
                "command still running at the drain deadline; abandoning it for redelivery"
            );
            r.abandon.cancel();
            if tokio::time::timeout(ABANDON_GRACE, &mut r.task)
                .await
                .is_err()
            {
                r.task.abort();
                let _ = r.task.await;
            }
        }
    }
}

/// Runs one partition's commands in offset order, storing each offset once the command's
/// effects are committed.
struct PartitionTask {
    key: PartitionKey,
    queue: Queue,
    consumer: Arc<StreamConsumer<Context>>,
    processor: Arc<Processor>,
    permits: Arc<Semaphore>,
    stop_taking: CancellationToken,
    abandon: CancellationToken,
    max_retry_wait: Duration,
}

impl PartitionTask {
    async fn run(self) {
        let mut backoff = Backoff::new(RetryPolicy::until_cancelled(Duration::from_secs(5)));
        loop {
            let received = tokio::select! {
                biased;
                _ = self.stop_taking.cancelled() => break,
                m = self.queue.recv() => m.map(|m| m.detach()),
            };
            let message = match received {
                Ok(message) => {
                    backoff.reset();
                    message
                }
                Err(e) => {
                    tracing::warn!(error = %e, topic = %self.key.0, partition = self.key.1, "partition queue error; continuing");
                    if backoff.wait(&self.stop_taking).await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            if self.wait_for_its_time(&message).await.is_err() {
                break;
            }
            let permit = tokio::select! {
                biased;
                _ = self.stop_taking.cancelled() => break,
                p = self.permits.clone().acquire_owned() => p,
            };
            let Ok(_permit) = permit else { break };
            match self.handle(&message).await {
                Ok(()) => self.store_offset(&message),
                Err(process::Abandoned) => {
                    tracing::info!(
                        offset = message.offset(),
                        "command abandoned; it will be redelivered"
                    );
                    break;
                }
            }
        }
    }

    /// A retry-topic command waits for its `retry.not_before` (at most the longest configured
    /// delay) with its partition paused; `Err` when the partition is taken away meanwhile
    /// (the command is left for redelivery).
    async fn wait_for_its_time(&self, message: &OwnedMessage) -> Result<(), ()> {
        let Some(not_before) = process::header(message, crate::wire::retry::NOT_BEFORE)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
        else {
            return Ok(());
        };
        let wait = (not_before.with_timezone(&Utc) - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(self.max_retry_wait);
        if wait.is_zero() {
            return Ok(());
        }
        let mut partition = TopicPartitionList::new();
        partition.add_partition(&self.key.0, self.key.1);
        if let Err(e) = self.consumer.pause(&partition) {
            tracing::warn!(error = %e, topic = %self.key.0, partition = self.key.1, "could not pause the partition; its task waits all the same");
        }
        tracing::info!(
            topic = %self.key.0,
            partition = self.key.1,
            offset = message.offset(),
            wait_ms = wait.as_millis() as u64,
            "a retried command waits for its time; partition paused"
        );
        let waited = tokio::select! {
            biased;
            _ = self.stop_taking.cancelled() => Err(()),
            _ = tokio::time::sleep(wait) => Ok(()),
        };
        if waited.is_ok()
            && let Err(e) = self.consumer.resume(&partition)
        {
            tracing::warn!(error = %e, topic = %self.key.0, partition = self.key.1, "could not resume the partition");
        }
        waited
    }

    /// Abandoning drops the command mid-way: an open transaction rolls back, nothing is stored
    /// for its offset, and the partition's next owner runs it again. A panic inside processing
    /// (a bug: no input may cause one) must not leave the partition silently dead: it is
    /// logged and counted, the command is failed to the DLQ, and the task moves on.
    async fn handle(&self, message: &OwnedMessage) -> Result<(), process::Abandoned> {
        let span = tracing::info_span!(
            "command",
            topic = %self.key.0,
            partition = self.key.1,
            offset = message.offset(),
            request_id = tracing::field::Empty,
        );
        let processor = &self.processor;
        tokio::select! {
            biased;
            _ = self.abandon.cancelled() => Err(process::Abandoned),
            r = AssertUnwindSafe(processor.handle(message, &self.abandon))
                .catch_unwind()
                .instrument(span.clone()) => match r {
                Ok(r) => r,
                Err(panic) => {
                    let reason = panic_text(panic.as_ref());
                    processor
                        .handle_panic(message, &reason, &self.abandon)
                        .instrument(span)
                        .await
                }
            },
        }
    }

    /// The offset to store is the next one to read (rd_kafka_offsets_store takes it as given;
    /// the deprecated single-offset call adds one itself).
    fn store_offset(&self, message: &OwnedMessage) {
        let mut next = TopicPartitionList::new();
        let stored = next
            .add_partition_offset(
                &self.key.0,
                self.key.1,
                Offset::Offset(message.offset() + 1),
            )
            .and_then(|()| self.consumer.store_offsets(&next));
        if let Err(e) = stored {
            // Revoked meanwhile: the new owner re-runs it, harmlessly.
            tracing::info!(error = %e, offset = message.offset(), "could not store the offset; the command will be redelivered");
        }
    }
}

/// The message of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
