//! The task of one notification partition: reads its notifications in order, coalesces them
//! (see the parent module), publishes each batch as a command on the request topic, and stores
//! the partition's offset only once every code before it is in an acknowledged command. A bad
//! notification is dead-lettered and passed over. Past `notifications.max_pending_codes` the
//! partition pauses, publishes what it holds and waits for room.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureRecord;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Batch, Budget, Coalescer, Notification};
use crate::metrics::metrics;
use crate::pipeline::{Context, PartitionKey, Processor, Queue};
use crate::retry::{Backoff, RetryPolicy};
use crate::wire::{FailureClass, FailureKind};

/// How long one send of a command may wait for the broker's acknowledgement.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// The coalescing counts are written best-effort (the console's ratio), within this.
const COUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where notifications come from and where their commands go.
#[derive(Debug)]
pub struct NotificationRoute {
    /// `topics.notifications`.
    pub topic: String,
    /// `topics.requests`.
    pub requests_topic: String,
    /// `notifications.window_ms`.
    pub window: Duration,
    /// Each system's `upstream.page_size`.
    pub page_sizes: HashMap<String, usize>,
    /// `notifications.max_pending_codes`, shared by this instance's notification partitions.
    pub budget: Arc<Budget>,
}

/// The partition was taken away (its offset is where the last acknowledged command left it).
struct Ended;

/// One notification partition's task.
pub(in crate::pipeline) struct NotificationTask {
    pub key: PartitionKey,
    pub queue: Queue,
    pub consumer: Arc<StreamConsumer<Context>>,
    pub processor: Arc<Processor>,
    pub route: Arc<NotificationRoute>,
    pub stop_taking: CancellationToken,
    pub abandon: CancellationToken,
}

impl NotificationTask {
    /// Runs until the partition is revoked: then what it holds is published (within the
    /// drain timeout, else abandoned for the next owner to re-read).
    pub async fn run(self) {
        let mut c = Coalescer::new(self.route.window, self.route.page_sizes.clone());
        let mut stored = None;
        let mut backoff = Backoff::new(RetryPolicy::until_cancelled(Duration::from_secs(5)));
        loop {
            let deadline = c.deadline();
            let far = Instant::now() + Duration::from_secs(3600);
            let received = tokio::select! {
                biased;
                _ = self.stop_taking.cancelled() => {
                    let all = c.take_all();
                    if self.publish_all(all).await.is_ok() {
                        self.store(&c, &mut stored);
                    }
                    break;
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    let due = c.take_due(Instant::now());
                    if self.publish_all(due).await.is_err() {
                        break;
                    }
                    self.store(&c, &mut stored);
                    continue;
                }
                m = self.queue.recv() => m.map(|m| m.detach()),
            };
            match received {
                Ok(message) => {
                    backoff.reset();
                    if self.take(&mut c, &message, &mut stored).await.is_err() {
                        break;
                    }
                    self.store(&c, &mut stored);
                }
                Err(e) => {
                    tracing::warn!(error = %e, topic = %self.key.0, partition = self.key.1, "notification queue error; continuing");
                    if backoff.wait(&self.stop_taking).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Codes of batches never published go back to the instance's bound; the partition's
        // next owner reads them again.
        self.route.budget.give_back(c.held());
    }

    /// Takes one notification: refused ones to the DLQ, others into their system's batch
    /// (publishing the batches it fills).
    async fn take(
        &self,
        c: &mut Coalescer,
        message: &OwnedMessage,
        stored: &mut Option<i64>,
    ) -> Result<(), Ended> {
        let systems = &self.processor.systems;
        let names = systems.names();
        let n = match Notification::parse(message.payload(), systems.default_name(), &names) {
            Ok(n) => n,
            Err(e) => {
                metrics()
                    .notifications
                    .with_label_values(&["unknown", "rejected"])
                    .inc();
                tracing::warn!(kind = e.kind(), reason = %e, offset = message.offset(), "refused a notification");
                self.dead_letter(message, &e.to_string(), e.kind()).await?;
                c.skip(message.offset());
                return Ok(());
            }
        };
        let fresh = c.new_codes(&n);
        self.admit(c, fresh, stored).await?;
        metrics()
            .notifications
            .with_label_values(&[n.system.as_str(), "accepted"])
            .inc();
        let full = c.add(message.offset(), &n, Instant::now());
        self.publish_all(full).await
    }

    /// Waits until `n` more codes fit in the instance's bound. While it waits the partition
    /// is paused and what it holds is published at once (freeing its share).
    async fn admit(
        &self,
        c: &mut Coalescer,
        n: usize,
        stored: &mut Option<i64>,
    ) -> Result<(), Ended> {
        let budget = &self.route.budget;
        if budget.try_take(n) {
            return Ok(());
        }
        metrics()
            .notification_pauses
            .with_label_values(&[self.key.0.as_str()])
            .inc();
        let mut partition = TopicPartitionList::new();
        partition.add_partition(&self.key.0, self.key.1);
        if let Err(e) = self.consumer.pause(&partition) {
            tracing::warn!(error = %e, topic = %self.key.0, partition = self.key.1, "could not pause a notification partition; its task waits all the same");
        }
        tracing::info!(
            topic = %self.key.0,
            partition = self.key.1,
            pending = budget.pending(),
            "notifications.max_pending_codes reached; partition paused until codes are published"
        );
        let held = c.take_all();
        self.publish_all(held).await?;
        self.store(c, stored);
        loop {
            let freed = budget.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if budget.try_take(n) {
                break;
            }
            tokio::select! {
                biased;
                _ = self.stop_taking.cancelled() => return Err(Ended),
                _ = freed => {}
            }
        }
        if let Err(e) = self.consumer.resume(&partition) {
            tracing::warn!(error = %e, topic = %self.key.0, partition = self.key.1, "could not resume a notification partition");
        }
        Ok(())
    }

    /// Publishes `batches` in order, giving their codes back as each is acknowledged; when the
    /// partition is abandoned meanwhile, the rest are given back unpublished.
    async fn publish_all(&self, batches: Vec<Batch>) -> Result<(), Ended> {
        let mut left: usize = batches.iter().map(|b| b.codes.len()).sum();
        for batch in batches {
            if self.publish(&batch).await.is_err() {
                self.route.budget.give_back(left);
                return Err(Ended);
            }
            left -= batch.codes.len();
            self.route.budget.give_back(batch.codes.len());
        }
        Ok(())
    }

    /// Publishes one batch's command, retrying until the broker acknowledges it or the
    /// partition is abandoned.
    async fn publish(&self, batch: &Batch) -> Result<(), Ended> {
        let wire = batch.command(&self.key.0, self.key.1);
        let payload = serde_json::to_vec(&wire).unwrap_or_default();
        let mut backoff = Backoff::new(RetryPolicy::until_cancelled(Duration::from_secs(5)));
        loop {
            let record = FutureRecord::to(&self.route.requests_topic)
                .key(&wire.request_id)
                .payload(&payload);
            let sent = tokio::select! {
                biased;
                _ = self.abandon.cancelled() => return Err(Ended),
                r = self.processor.producer.send(record, Timeout::After(SEND_TIMEOUT)) => r,
            };
            match sent {
                Ok(_) => break,
                Err((e, _)) => {
                    tracing::warn!(error = %e, request_id = %wire.request_id, "could not publish a command made from notifications; retrying");
                    backoff.wait(&self.abandon).await.map_err(|_| Ended)?;
                }
            }
        }
        metrics()
            .notification_commands
            .with_label_values(&[batch.system.as_str()])
            .inc();
        tracing::info!(
            request_id = %wire.request_id,
            codes = batch.codes.len(),
            notifications = batch.notifications,
            "notifications coalesced into a command"
        );
        let counted = tokio::time::timeout(
            COUNT_TIMEOUT,
            crate::store::notifications::count_command(
                &self.processor.db,
                &batch.system,
                batch.notifications as i64,
                batch.codes.len() as i64,
                Utc::now(),
            ),
        )
        .await;
        if !matches!(counted, Ok(Ok(()))) {
            tracing::warn!(request_id = %wire.request_id, "could not count a command made from notifications (the console's ratio only)");
        }
        // Debug builds only: die the hard way between the command's acknowledgement and its
        // notifications' offsets, so a test can prove a crash there loses no code.
        #[cfg(debug_assertions)]
        if std::env::var_os("PRODUCT_SYNC_DEBUG_ABORT_AFTER_NOTIFICATION_COMMAND").is_some() {
            std::process::abort();
        }
        Ok(())
    }

    /// Sends a refused notification to the DLQ with its reason, retrying until acknowledged or
    /// the partition is abandoned.
    async fn dead_letter(
        &self,
        message: &OwnedMessage,
        reason: &str,
        kind: &'static str,
    ) -> Result<(), Ended> {
        let mut backoff = Backoff::new(RetryPolicy::until_cancelled(Duration::from_secs(5)));
        loop {
            let sent = tokio::select! {
                biased;
                _ = self.abandon.cancelled() => return Err(Ended),
                r = self.processor.dead_letter(message, reason, FailureClass::Permanent, FailureKind::Command(kind)) => r,
            };
            match sent {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "could not dead-letter a notification; retrying");
                    backoff.wait(&self.abandon).await.map_err(|_| Ended)?;
                }
            }
        }
    }

    /// Stores the partition's offset when it moved (see [`Coalescer::offset_to_store`]).
    fn store(&self, c: &Coalescer, stored: &mut Option<i64>) {
        let Some(offset) = c.offset_to_store() else {
            return;
        };
        if *stored == Some(offset) {
            return;
        }
        let mut next = TopicPartitionList::new();
        let done = next
            .add_partition_offset(&self.key.0, self.key.1, Offset::Offset(offset))
            .and_then(|()| self.consumer.store_offsets(&next));
        match done {
            Ok(()) => *stored = Some(offset),
            // Revoked meanwhile: the next owner reads these notifications again.
            Err(e) => tracing::info!(error = %e, offset, "could not store a notification offset"),
        }
    }
}
