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
//! # Keeping the consumer polled
//! The loop never waits on a command: each partition has its own worker and queue, so a
//! command whose fetch takes minutes never stops `recv()` (no `max.poll.interval.ms`
//! expulsion, rust-rdkafka #433). A partition whose queue backs up is paused, and resumed
//! when its worker has drained it. Commands of one partition run in order; at most
//! `pipeline.max_in_flight` run at once across partitions.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::{ClientContext, Message, Offset};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::KafkaSettings;
use crate::kafka::client_config;
use crate::metrics::metrics;
use crate::ops::Membership;

pub mod process;

pub use process::Processor;

/// A partition is paused when this many commands wait in its queue.
const PAUSE_AT: usize = 8;

type PartitionKey = (String, i32);

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

/// One partition's worker, as the loop and the rebalance callback see it.
struct Worker {
    tx: mpsc::UnboundedSender<OwnedMessage>,
    queued: Arc<AtomicUsize>,
    paused: Arc<Mutex<bool>>,
    /// Stop taking new commands from the queue.
    stop_taking: CancellationToken,
    /// Give up the command in flight (it will be redelivered).
    abandon: CancellationToken,
    finished: Arc<(Mutex<bool>, Condvar)>,
}

/// The workers of the partitions this instance holds.
struct Registry {
    workers: Mutex<HashMap<PartitionKey, Worker>>,
    drain_timeout: Duration,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PartitionKey, Worker>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the workers of `keys` (all when `None`): no new commands; the one in flight may
    /// finish within the drain timeout, then it is abandoned. Blocks until they are done.
    fn drain(&self, keys: Option<&[PartitionKey]>) {
        let taken: Vec<(PartitionKey, Worker)> = {
            let mut workers = self.lock();
            match keys {
                None => workers.drain().collect(),
                Some(keys) => keys
                    .iter()
                    .filter_map(|k| workers.remove_entry(k))
                    .collect(),
            }
        };
        if taken.is_empty() {
            return;
        }
        for (_, w) in &taken {
            w.stop_taking.cancel();
        }
        let deadline = Instant::now() + self.drain_timeout;
        for ((topic, partition), w) in &taken {
            if !wait_finished(&w.finished, deadline) {
                tracing::warn!(
                    topic,
                    partition,
                    "command still running at the drain deadline; abandoning it for redelivery"
                );
                w.abandon.cancel();
                wait_finished(&w.finished, Instant::now() + Duration::from_secs(5));
            }
        }
    }
}

fn wait_finished(finished: &(Mutex<bool>, Condvar), deadline: Instant) -> bool {
    let (lock, cvar) = finished;
    let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
    while !*done {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        done = match cvar.wait_timeout(done, deadline - now) {
            Ok((guard, _)) => guard,
            Err(e) => e.into_inner().0,
        };
    }
    true
}

/// Consumer context: drains revoked partitions' workers and commits before a rebalance;
/// reports membership and consumer lag.
struct Context {
    registry: Arc<Registry>,
    membership: Arc<Membership>,
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
            let keys: Vec<PartitionKey> = list
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            tracing::info!(
                partitions = keys.len(),
                "partitions revoked; draining their commands"
            );
            self.registry.drain(Some(&keys));
            commit_stored(consumer);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.membership.joined.store(true, Ordering::SeqCst);
        if let Rebalance::Assign(list) = rebalance {
            self.membership
                .partitions
                .store(list.count(), Ordering::SeqCst);
            let parts: Vec<String> = list
                .elements()
                .iter()
                .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                .collect();
            tracing::info!(assigned = %parts.join(","), "partitions assigned");
        }
    }
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

/// The consumer loop of one instance.
pub struct Pipeline {
    pub kafka: KafkaSettings,
    pub requests_topic: String,
    pub max_in_flight: usize,
    pub drain_timeout: Duration,
    pub processor: Arc<Processor>,
    /// Shared with the ops endpoint's readiness check.
    pub membership: Arc<Membership>,
}

impl Pipeline {
    /// Consumes until `stop`, then stops taking commands, lets those in flight finish within
    /// the drain timeout (or abandons them for redelivery), and commits stored offsets.
    pub async fn run(self, stop: CancellationToken) -> Result<(), PipelineError> {
        let registry = Arc::new(Registry {
            workers: Mutex::new(HashMap::new()),
            drain_timeout: self.drain_timeout,
        });
        let consumer: StreamConsumer<Context> = client_config(&self.kafka)
            .set("group.id", &self.kafka.group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "5000")
            .create_with_context(Context {
                registry: registry.clone(),
                membership: self.membership.clone(),
            })
            .map_err(PipelineError::Consumer)?;
        let consumer = Arc::new(consumer);
        consumer
            .subscribe(&[&self.requests_topic])
            .map_err(|source| PipelineError::Subscribe {
                topic: self.requests_topic.clone(),
                source,
            })?;
        tracing::info!(topic = %self.requests_topic, group = %self.kafka.group_id, "consuming product-request commands");
        let permits = Arc::new(Semaphore::new(self.max_in_flight));

        loop {
            let received = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                m = consumer.recv() => m,
            };
            match received {
                Ok(message) => {
                    let message = message.detach();
                    self.dispatch(&registry, &consumer, &permits, message);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error; continuing");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }

        tracing::info!("stopping: no new commands; draining those in flight");
        let (r, c) = (registry.clone(), consumer.clone());
        let drained = tokio::task::spawn_blocking(move || {
            r.drain(None);
            commit_stored(c.as_ref());
        })
        .await;
        if drained.is_err() {
            tracing::error!("draining the partition workers panicked");
        }
        consumer.unsubscribe();
        Ok(())
    }

    fn dispatch(
        &self,
        registry: &Arc<Registry>,
        consumer: &Arc<StreamConsumer<Context>>,
        permits: &Arc<Semaphore>,
        message: OwnedMessage,
    ) {
        let key = (message.topic().to_owned(), message.partition());
        let mut workers = registry.lock();
        let worker = workers
            .entry(key.clone())
            .or_insert_with(|| self.spawn_worker(key.clone(), consumer.clone(), permits.clone()));
        worker.queued.fetch_add(1, Ordering::SeqCst);
        if worker.tx.send(message).is_err() {
            // The worker is gone (revoked meanwhile): the message will be redelivered.
            worker.queued.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let mut paused = worker.paused.lock().unwrap_or_else(|e| e.into_inner());
        if !*paused && worker.queued.load(Ordering::SeqCst) >= PAUSE_AT {
            if let Err(e) = consumer.pause(&partition_list(&key)) {
                tracing::warn!(error = %e, topic = %key.0, partition = key.1, "could not pause a busy partition");
            } else {
                *paused = true;
            }
        }
    }

    fn spawn_worker(
        &self,
        key: PartitionKey,
        consumer: Arc<StreamConsumer<Context>>,
        permits: Arc<Semaphore>,
    ) -> Worker {
        let (tx, mut rx) = mpsc::unbounded_channel::<OwnedMessage>();
        let worker = Worker {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            paused: Arc::new(Mutex::new(false)),
            stop_taking: CancellationToken::new(),
            abandon: CancellationToken::new(),
            finished: Arc::new((Mutex::new(false), Condvar::new())),
        };
        let (queued, paused, stop_taking, abandon, finished) = (
            worker.queued.clone(),
            worker.paused.clone(),
            worker.stop_taking.clone(),
            worker.abandon.clone(),
            worker.finished.clone(),
        );
        let processor = self.processor.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    biased;
                    _ = stop_taking.cancelled() => None,
                    m = rx.recv() => m,
                };
                let Some(message) = message else { break };
                let left = queued.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
                {
                    let mut p = paused.lock().unwrap_or_else(|e| e.into_inner());
                    if *p && left == 0 {
                        match consumer.resume(&partition_list(&key)) {
                            Ok(()) => *p = false,
                            Err(e) => {
                                tracing::warn!(error = %e, "could not resume a drained partition")
                            }
                        }
                    }
                }
                let permit = tokio::select! {
                    biased;
                    _ = stop_taking.cancelled() => break,
                    p = permits.clone().acquire_owned() => p,
                };
                let Ok(_permit) = permit else { break };
                let span = tracing::info_span!(
                    "command",
                    topic = %key.0,
                    partition = key.1,
                    offset = message.offset(),
                    request_id = tracing::field::Empty,
                );
                // Abandoning drops the command mid-way: an open transaction rolls back, nothing
                // is stored for its offset, and the partition's next owner runs it again.
                // A panic inside processing (a bug: no input may cause one) must not leave the
                // partition silently dead: it is logged and counted, the command is failed to
                // the DLQ, and the worker moves on.
                let handled = tokio::select! {
                    biased;
                    _ = abandon.cancelled() => Err(process::Abandoned),
                    r = AssertUnwindSafe(processor.handle(&message, &abandon))
                        .catch_unwind()
                        .instrument(span.clone()) => match r {
                        Ok(r) => r,
                        Err(panic) => {
                            let reason = panic_text(panic.as_ref());
                            processor
                                .handle_panic(&message, &reason, &abandon)
                                .instrument(span)
                                .await
                        }
                    },
                };
                match handled {
                    Ok(()) => {
                        // The offset to store is the next one to read (rd_kafka_offsets_store
                        // takes it as given; the deprecated single-offset call adds one itself).
                        let mut next = TopicPartitionList::new();
                        let stored = next
                            .add_partition_offset(
                                &key.0,
                                key.1,
                                Offset::Offset(message.offset() + 1),
                            )
                            .and_then(|()| consumer.store_offsets(&next));
                        if let Err(e) = stored {
                            // Revoked meanwhile: the new owner re-runs it, harmlessly.
                            tracing::info!(error = %e, offset = message.offset(), "could not store the offset; the command will be redelivered");
                        }
                    }
                    Err(process::Abandoned) => {
                        tracing::info!(
                            offset = message.offset(),
                            "command abandoned; it will be redelivered"
                        );
                        break;
                    }
                }
            }
            let (lock, cvar) = &*finished;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cvar.notify_all();
        });
        worker
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

fn partition_list((topic, partition): &PartitionKey) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, *partition);
    list
}
