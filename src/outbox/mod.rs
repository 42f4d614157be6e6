//! The outbox relay: publishes the queued change and result events (`outbox_pending`) to
//! Kafka with an idempotent producer, and removes a row from the queue only after the broker
//! acknowledged its event.
//!
//! Delivery guarantee: at least once. A row leaves the queue only after its event was acked,
//! so a crash between ack and delete re-publishes it — with the same CloudEvents id, so
//! consumers can drop the repeat. History rows (`product_changes`) are never rewritten.
//!
//! Order: a product's rows are queued in revision order (a later revision's transaction can
//! only write after the earlier one committed), share a shard (hence one publisher) and a key
//! (hence a partition), and are produced in queue order by one idempotent producer.
//!
//! Scale: the queue is split into `pipeline.relay_shards` shards spread over the live
//! instances ([`shards`]). Each instance reads its shards' rows in large batches, producing
//! one batch while the next is read (two in flight), and deletes each batch after its acks.
//! A row whose transaction commits after later rows were read is not skipped: the read
//! position restarts from the queue's head every time the shards are refreshed (each
//! second) and whenever the queue looks empty, with nothing in flight.
//!
//! Never stalled by one row: an event larger than `pipeline.max_event_bytes` is published in
//! the reduced form ([`crate::wire::reduce`]); a row the broker still refuses for good is
//! parked with its error — only its own product's later rows wait behind it
//! (`product-sync outbox parked`, `product_sync_outbox_parked`).
//!
//! The state topic (`topics.state`, compacted): right after a change event, the product's
//! state record goes to the state topic under the same key (a tombstone for a delisting); a
//! change row leaves the queue only once both were acked, so the state topic is as complete
//! and as ordered per product as the change topic.

pub mod queue;
pub mod shards;
pub mod transactional;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::kafka::Publisher;
use rdkafka::util::Timeout;
use sea_orm::DatabaseConnection;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::metrics;
use crate::retry::{Backoff, RetryPolicy};
use crate::store::StoreError;
use crate::wire::{self, CloudEvent};
use queue::{Kind, Outgoing};
use shards::{LeaseError, Leases};

/// How often the shards are refreshed (and the read position restarts at the queue's head).
const REFRESH: Duration = Duration::from_secs(1);

/// Batches produced and not yet landed: one acked while the next is read and produced.
const IN_FLIGHT: usize = 2;

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing to {topic} failed: {source}")]
    Publish { topic: String, source: KafkaError },
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Transaction(#[from] transactional::TxnError),
}

impl RelayError {
    /// Every relay error heals by retrying: rows not acked stay queued.
    pub fn is_transient(&self) -> bool {
        match self {
            RelayError::Store(e) => e.is_transient(),
            RelayError::Publish { .. } => true,
            RelayError::Lease(e) => e.is_transient(),
            RelayError::Transaction(e) => e.is_transient(),
        }
    }
}

/// The relay's settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub changes_topic: String,
    pub results_topic: String,
    /// The compacted state topic; `None` publishes no state records.
    pub state_topic: Option<String>,
    /// Rows read and produced per batch.
    pub batch: u64,
    /// How long an idle relay waits before looking again (unless woken).
    pub interval: Duration,
    /// Events above this are published in the reduced form.
    pub max_event_bytes: usize,
    /// Exactly once (`pipeline.exactly_once`): one transactional producer per shard; `None`:
    /// the idempotent `producer` (at least once).
    pub exactly_once: Option<transactional::Transactions>,
}

/// Producing a row's records, the same for both relays (and for each shard's task).
impl RelaySettings {
    /// Replaces an event above `pipeline.max_event_bytes` by its reduced form.
    fn fit(&self, row: &mut Outgoing) {
        if let Some(reduced) = wire::reduce(&row.payload, self.max_event_bytes) {
            tracing::warn!(
                ce_id = %row.ce_id,
                bytes = row.payload.len(),
                reduced_bytes = reduced.len(),
                limit = self.max_event_bytes,
                "event above pipeline.max_event_bytes: publishing its reduced form"
            );
            metrics()
                .reduced
                .with_label_values(&[row.kind.label()])
                .inc();
            row.payload = reduced;
        }
    }

    fn topic(&self, kind: &Kind) -> &str {
        match kind {
            Kind::Change => &self.changes_topic,
            Kind::Result(_) | Kind::Gone => &self.results_topic,
        }
    }

    /// Produces a row's event and, for a change with the state topic on, its state record.
    fn produce(&self, producer: &FutureProducer, row: &Outgoing) -> Result<Delivery, KafkaError> {
        let event = self.produce_event(producer, row)?;
        let state = match (&row.kind, &self.state_topic) {
            (Kind::Change, Some(topic)) => Some(self.produce_state(producer, row, topic)),
            _ => None,
        };
        Ok(Delivery { event, state })
    }

    fn produce_state(
        &self,
        producer: &FutureProducer,
        row: &Outgoing,
        topic: &str,
    ) -> Result<DeliveryFuture, KafkaError> {
        let value = state_value(row)?;
        let mut record = FutureRecord::<String, String>::to(topic).key(&row.key);
        if let Some(value) = &value {
            record = record.payload(value);
        }
        producer.send_result(record).map_err(|(e, _)| e)
    }

    fn produce_event(
        &self,
        producer: &FutureProducer,
        row: &Outgoing,
    ) -> Result<DeliveryFuture, KafkaError> {
        let record = FutureRecord::to(self.topic(&row.kind))
            .key(&row.key)
            .payload(&row.payload)
            .headers(event_headers(row));
        producer.send_result(record).map_err(|(e, _)| e)
    }

    fn publish_error(&self, row: &Outgoing, source: KafkaError) -> RelayError {
        RelayError::Publish {
            topic: self.topic(&row.kind).to_owned(),
            source,
        }
    }

    async fn park(
        &self,
        db: &DatabaseConnection,
        row: &Outgoing,
        e: &KafkaError,
    ) -> Result<(), RelayError> {
        let error = format!("{} refused {}: {e}", self.topic(&row.kind), row.ce_id);
        tracing::error!(
            ce_id = %row.ce_id,
            pending_id = row.pending_id,
            bytes = row.payload.len(),
            error = %e,
            "the broker refused an event for good: parked (its product's later events wait; \
             see `product-sync outbox parked`)"
        );
        queue::park(db, row.pending_id, &error, Utc::now()).await?;
        metrics().outbox_parked.inc();
        Ok(())
    }
}

/// A row's CloudEvents headers.
fn event_headers(row: &Outgoing) -> OwnedHeaders {
    CloudEvent {
        id: &row.ce_id,
        ce_type: &row.ce_type,
        source: &row.source,
        subject: &row.subject,
        time: &row.time,
        traceparent: row.traceparent.as_deref(),
    }
    .headers()
}

/// The state record's value for a change row (`None`: a tombstone). A change event is
/// product-sync's own JSON: one that does not parse is a bug, parked like a record the
/// broker refuses.
fn state_value(row: &Outgoing) -> Result<Option<String>, KafkaError> {
    wire::state_of(&row.payload).map_err(|e| {
        tracing::error!(ce_id = %row.ce_id, error = %e, "a change event lacks the fields of a state record");
        KafkaError::MessageProduction(RDKafkaErrorCode::InvalidRecord)
    })
}

/// What a landing did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub changes: usize,
    pub results: usize,
    pub parked: usize,
}

impl Published {
    fn add(&mut self, other: Published) {
        self.changes += other.changes;
        self.results += other.results;
        self.parked += other.parked;
    }

    fn is_empty(&self) -> bool {
        self.changes == 0 && self.results == 0 && self.parked == 0
    }
}

/// A read of the queue running in the background.
type Read = JoinHandle<Result<Vec<Outgoing>, StoreError>>;

/// A produced batch awaiting its acks.
struct Flight {
    sent: Vec<(Outgoing, Delivery)>,
}

/// The broker's answers for one row: its event and, for a change with the state topic on,
/// its state record (or why that could not be produced).
struct Delivery {
    event: DeliveryFuture,
    state: Option<Result<DeliveryFuture, KafkaError>>,
}

impl Delivery {
    /// Both acked, or the first failure (the event's first).
    async fn landed(self) -> Result<(), KafkaError> {
        let acked = |answer| match answer {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(KafkaError::Canceled),
        };
        let event = acked(self.event.await);
        let state = match self.state {
            None => Ok(()),
            Some(Err(e)) => Err(e),
            Some(Ok(delivery)) => acked(delivery.await),
        };
        event.and(state)
    }
}

/// Publishes the queue.
pub struct Relay {
    db: DatabaseConnection,
    /// The instance's producer, made again after a fatal error; `producer` is the one in use.
    publisher: Publisher,
    producer: FutureProducer,
    settings: Arc<RelaySettings>,
    leases: Leases,
    /// Woken by the pipeline after a command committed, for low latency.
    wake: Arc<Notify>,
    /// Read position: the last queued row read; 0 restarts at the head.
    cursor: i64,
    flights: VecDeque<Flight>,
    /// Deletes of acked rows running beside the next reads; all finished before any read
    /// restarts at the head (else acked rows could be read, and sent, again).
    recording: Vec<JoinHandle<Result<(), StoreError>>>,
    /// The next read, started while the previous batch is produced, and where it starts.
    prefetched: Option<(i64, Read)>,
    /// Everything landed so far.
    totals: Published,
    /// The shards' transactional producers, when exactly once.
    txns: Option<transactional::Txns>,
}

impl Relay {
    pub fn new(
        db: DatabaseConnection,
        publisher: Publisher,
        settings: RelaySettings,
        leases: Leases,
        wake: Arc<Notify>,
    ) -> Self {
        let txns = settings.exactly_once.clone().map(transactional::Txns::new);
        Self {
            txns,
            db,
            producer: publisher.current(),
            publisher,
            settings: Arc::new(settings),
            leases,
            wake,
            cursor: 0,
            flights: VecDeque::new(),
            recording: Vec::new(),
            prefetched: None,
            totals: Published::default(),
        }
    }

    /// Runs until `stop`: holds its share of the shards and publishes their rows. After
    /// `stop` it lands what is in flight, publishes what is left in its shards (bounded), and
    /// releases them.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new(RetryPolicy::until_cancelled(Duration::from_secs(5)));
        let mut next_refresh = Instant::now();
        while !stop.is_cancelled() {
            if Instant::now() >= next_refresh {
                next_refresh = Instant::now() + REFRESH;
                // Nothing in flight, so the shards may move and the read restarts at the head
                // (a row committed late behind the read position is picked up here, even
                // under a load that never lets the queue look empty).
                let refreshed = match self.land_all().await {
                    Ok(_) => {
                        self.cursor = 0;
                        if let Some((_, task)) = self.prefetched.take() {
                            task.abort();
                        }
                        self.leases.refresh().await.map_err(RelayError::from)
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = refreshed {
                    self.failed(&stop, &mut backoff, &e).await;
                    continue;
                }
            }
            if self.leases.held().is_empty() {
                self.idle(&stop, next_refresh).await;
                continue;
            }
            match self.step().await {
                Ok(true) => backoff.reset(),
                Ok(false) => {
                    backoff.reset();
                    let until = (Instant::now() + self.settings.interval).min(next_refresh);
                    self.idle(&stop, until).await;
                }
                Err(e) => self.failed(&stop, &mut backoff, &e).await,
            }
        }
        match self.drain().await {
            Ok(p) if !p.is_empty() => tracing::info!(
                changes = p.changes,
                results = p.results,
                "relay drained its shards at shutdown"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "relay could not drain at shutdown; another instance will publish")
            }
        }
        self.leases.leave().await;
    }

    /// Logs a failure, lands what can be landed, waits a backoff; the read restarts at the head.
    async fn failed(&mut self, stop: &CancellationToken, backoff: &mut Backoff, e: &RelayError) {
        tracing::warn!(error = %e, "relay failed; rows not acked stay queued, retrying");
        if let Err(e) = self.land_all().await {
            tracing::debug!(error = %e, "landing after a failure failed too");
        }
        self.cursor = 0;
        // Cancelled: the loop sees `stop` and drains.
        let _ = backoff.wait(stop).await;
    }

    async fn idle(&self, stop: &CancellationToken, until: Instant) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }

    /// Reads and produces the next batch, landing the oldest flight when too many are out.
    /// `false` when the held shards have nothing queued (everything landed).
    async fn step(&mut self) -> Result<bool, RelayError> {
        if self.txns.is_some() {
            return self.step_transactional().await;
        }
        let rows = self.next_rows().await?;
        if rows.is_empty() {
            let landed = self.land_all().await?;
            let was_at_head = self.cursor == 0;
            self.cursor = 0;
            // Past the head, look once more from it: a late commit may sit behind the cursor.
            return Ok(!was_at_head || !landed.is_empty());
        }
        // The read after this batch runs while this batch is produced.
        let last = rows.last().map(|r| r.pending_id).unwrap_or(self.cursor);
        self.prefetch(last);
        self.send(rows).await?;
        while self.flights.len() > IN_FLIGHT {
            self.land_oldest().await?;
        }
        Ok(true)
    }

    /// The rows after the read position: the prefetched read when it started there, else a
    /// fresh one (a prefetch from elsewhere — the position moved back — is dropped).
    async fn next_rows(&mut self) -> Result<Vec<Outgoing>, RelayError> {
        if let Some((from, task)) = self.prefetched.take() {
            if from == self.cursor {
                return match task.await {
                    Ok(rows) => Ok(rows?),
                    Err(e) => Err(StoreError::Db(sea_orm::DbErr::Custom(format!(
                        "reading the queue: {e}"
                    )))
                    .into()),
                };
            }
            task.abort();
        }
        Ok(queue::read(
            &self.db,
            &self.leases.filter(),
            self.cursor,
            self.settings.batch,
        )
        .await?)
    }

    fn prefetch(&mut self, from: i64) {
        let (db, filter, batch) = (self.db.clone(), self.leases.filter(), self.settings.batch);
        let task = tokio::spawn(async move { queue::read(&db, &filter, from, batch).await });
        if let Some((_, old)) = self.prefetched.replace((from, task)) {
            old.abort();
        }
    }

    /// Publishes until the held shards' queue is empty (bounded, for shutdown and tests).
    pub async fn drain(&mut self) -> Result<Published, RelayError> {
        let before = self.totals;
        self.land_all().await?;
        self.cursor = 0;
        if !self.leases.held().is_empty() {
            for _ in 0..100_000 {
                if !self.step().await? {
                    break;
                }
            }
            self.land_all().await?;
        }
        Ok(Published {
            changes: self.totals.changes - before.changes,
            results: self.totals.results - before.results,
            parked: self.totals.parked - before.parked,
        })
    }

    /// Takes the shards (tests and tools that drive a relay by hand).
    pub async fn refresh_shards(&mut self) -> Result<(), RelayError> {
        Ok(self.leases.refresh().await?)
    }

    /// The shards held now.
    pub fn shards_held(&self) -> Vec<u32> {
        self.leases.held().iter().copied().collect()
    }

    /// Produces a batch. A row the producer refuses at once for good (too large even reduced)
    /// is parked, and the rest of its product's rows in this batch are held back behind it.
    /// A full local queue stops the batch: the read position goes back to the last row sent.
    async fn send(&mut self, rows: Vec<Outgoing>) -> Result<(), RelayError> {
        self.producer = self.publisher.current();
        let mut sent = Vec::with_capacity(rows.len());
        let mut held_back: HashSet<i64> = HashSet::new();
        let mut gone = Vec::new();
        for mut row in rows {
            if row.kind == Kind::Gone {
                self.cursor = row.pending_id;
                gone.push(row);
                continue;
            }
            if row.product_id.is_some_and(|p| held_back.contains(&p)) {
                self.cursor = row.pending_id;
                continue;
            }
            self.settings.fit(&mut row);
            match self.settings.produce(&self.producer, &row) {
                Ok(delivery) => {
                    self.cursor = row.pending_id;
                    sent.push((row, delivery));
                }
                Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => break,
                Err(e) if is_refusal(&e) => {
                    self.cursor = row.pending_id;
                    if let Some(p) = row.product_id {
                        held_back.insert(p);
                    }
                    self.settings.park(&self.db, &row, &e).await?;
                    self.totals.parked += 1;
                }
                Err(e) => {
                    self.publisher.renew_if_fatal(&self.producer, &e);
                    self.flights.push_back(Flight { sent });
                    return Err(self.settings.publish_error(&row, e));
                }
            }
        }
        queue::done(&self.db, queue::Done::of(&gone), Utc::now()).await?;
        self.flights.push_back(Flight { sent });
        Ok(())
    }

    /// Counts what landed (both relays).
    fn count(&mut self, published: Published) {
        self.totals.add(published);
        let m = metrics();
        m.published
            .with_label_values(&["change"])
            .inc_by(published.changes as u64);
        m.published
            .with_label_values(&["result"])
            .inc_by(published.results as u64);
    }

    /// Lands every flight and waits for every delete.
    async fn land_all(&mut self) -> Result<Published, RelayError> {
        let mut total = Published::default();
        let mut first_error = None;
        while !self.flights.is_empty() {
            match self.land_oldest().await {
                Ok(p) => total.add(p),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        for task in self.recording.drain(..) {
            let recorded = match task.await {
                Ok(r) => r.map_err(RelayError::from),
                Err(e) => Err(RelayError::Store(StoreError::Db(sea_orm::DbErr::Custom(
                    format!("recording acks: {e}"),
                )))),
            };
            if let Err(e) = recorded {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Awaits every delivery of the oldest flight and records the outcome: acked rows leave
    /// the queue (all of them, even when others failed: nothing is re-published needlessly);
    /// a row refused for good is sent once more on its own (a refusal may have hit the
    /// whole broker batch it travelled in) and parked if refused again.
    async fn land_oldest(&mut self) -> Result<Published, RelayError> {
        let Some(flight) = self.flights.pop_front() else {
            return Ok(Published::default());
        };
        let mut acked = Vec::with_capacity(flight.sent.len());
        let mut refused = Vec::new();
        let mut error = None;
        for (row, delivery) in flight.sent {
            match delivery.landed().await {
                Ok(()) => acked.push(row),
                Err(e) if is_refusal(&e) => refused.push((row, e)),
                Err(e) => {
                    self.publisher.renew_if_fatal(&self.producer, &e);
                    if error.is_none() {
                        error = Some(self.settings.publish_error(&row, e));
                    }
                }
            }
        }
        let mut parked = 0;
        for (row, first) in refused {
            tracing::warn!(ce_id = %row.ce_id, error = %first, "the broker refused an event; sending it alone");
            let alone = match self.settings.produce(&self.producer, &row) {
                Ok(delivery) => delivery.landed().await,
                Err(e) => Err(e),
            };
            match alone {
                Ok(()) => acked.push(row),
                Err(e) if is_refusal(&e) => {
                    self.settings.park(&self.db, &row, &e).await?;
                    parked += 1;
                }
                Err(e) => {
                    if error.is_none() {
                        error = Some(self.settings.publish_error(&row, e));
                    }
                }
            }
        }
        let published = Published {
            changes: acked.iter().filter(|r| r.kind == Kind::Change).count(),
            results: acked
                .iter()
                .filter(|r| matches!(r.kind, Kind::Result(_)))
                .count(),
            parked,
        };
        // Recorded beside the next read; `land_all` waits for it.
        let (db, done) = (self.db.clone(), queue::Done::of(&acked));
        self.recording.push(tokio::spawn(async move {
            queue::done(&db, done, Utc::now()).await
        }));
        self.count(published);
        match error {
            Some(e) => Err(e),
            None => Ok(published),
        }
    }
}

/// Refusals of one record that no retry heals: the record itself is at fault.
fn is_refusal(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::PolicyViolation
                | RDKafkaErrorCode::InvalidTimestamp
        )
    )
}

/// Flushes the producer within `wait` (blocking work, off the async workers).
pub async fn flush(producer: FutureProducer, wait: Duration) {
    use rdkafka::producer::Producer;
    let _ = tokio::task::spawn_blocking(move || producer.flush(Timeout::After(wait))).await;
}
