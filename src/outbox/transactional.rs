//! Exactly once downstream (`pipeline.exactly_once`, DESIGN.md part 3): each relay shard
//! publishes through a transactional producer (`transactional.id` =
//! `<kafka.group_id>-relay-<shard>`). One Kafka transaction per shard and batch carries the
//! batch's change events, state records and results, and the shard's **progress record** on
//! the compacted `topics.relay_progress` (key: the shard's transactional id; partition: the
//! shard's own, written by no other producer — one topic per deployment): the queue rows the
//! transaction published — the approach of Kafka Connect's exactly-once sources (KIP-618).
//!
//! The store follows: a round's rows leave the queue after its transactions committed —
//! while the next round is published, when it was read ahead (the removal runs beside the
//! publishing, in a task of its own). So at any moment the only rows both published and still
//! queued are those of each shard's last committed transaction and of the ones before whose
//! removal is not confirmed yet — and a shard's progress record names them all.
//!
//! Taking a shard: `init_transactions` first (fencing the previous holder: a paused or cut-off
//! old holder can no longer commit, and its open transaction is aborted), then the shard's
//! last progress record is read (read_committed, to the partition's end) and the rows it names
//! leave the queue unpublished; everything else queued is published — no repeat, no skip, and
//! a row whose store transaction committed late is simply read later from the queue's head.
//!
//! Errors as librdkafka documents them: a retriable commit is retried; an abortable one
//! aborts the transaction (its rows go in the next one; rows the broker refused for good go
//! each alone, and are parked if refused alone); a fatal one (fenced) drops the producer, and
//! the shard is initialised again on the next round if this instance still holds it. So does
//! a refusal: the refused records leave a gap in the producer's sequence numbers, which
//! librdkafka would repair only by failing the shard's next transaction as well.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::ClientContext;
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};

use std::collections::HashSet;

use super::queue::{self, Done, Kind, Outgoing, Shards};
use super::{Published, Relay, RelayError, RelaySettings, event_headers, is_refusal, state_value};
use crate::config::KafkaSettings;
use crate::kafka::{Reader, producer_config, reader};
use crate::store::StoreError;

/// A transactional round reads this many relay batches (`pipeline.relay_batch_size`) at
/// once: a transaction costs about the same whatever it carries (registering partitions,
/// markers, the commit's round trips), so fewer, larger ones publish faster — with the
/// default 5,000, about 1,250 rows per shard and transaction. (`cargo bench --bench pipeline
/// -- --relay-batch N`, 100,000 rows: 5,000 rows a round reached 0.22 of the plain
/// producer, 20,000 (this) 0.43, 40,000 0.48 — at twice the memory.)
const TXN_BATCHES: u64 = 4;
/// A shard's transaction takes at most this many runs of consecutive queue ids: its progress
/// record names them and the previous transaction's (at most as many again), about 40 bytes
/// a run at worst — so the record stays near 330 KB, far below the broker's message limit,
/// whatever `pipeline.relay_batch_size` and however sparse a shard's ids (one instance of 16
/// holds every 16th id: each row a run of its own).
const MAX_RUNS: usize = 4096;
/// How long one poll of a shard producer's events waits (see [`ShardProducer`]).
const POLL_WINDOW: Duration = Duration::from_secs(1);
/// How long one blocking transaction call (init, commit, abort) may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);
/// Shards of a round producing at once; the others wait their turn (their commits run
/// meanwhile). All at once, the 16 produce loops shared the runtime's threads with the read
/// of the next round, which got a 17th of them and became the round's longest part.
const PRODUCING: usize = 1;
/// A round from the queue's head that found fewer rows than a relay batch holds the next one
/// back until this long after its own start, so that rows trickling in (a command's pages
/// folding one after another) go in fewer, fuller transactions: each costs the broker a
/// transaction-log write, a partition registration and a marker for every partition it
/// touched (about 13 here), whatever its size.
pub const TXN_LINGER: Duration = Duration::from_millis(500);
/// Rows a shard's produce loop handles between two yields to the runtime.
const YIELD_EVERY: usize = 256;
/// How long reading a shard's progress record may take.
const PROGRESS_READ: Duration = Duration::from_secs(30);
/// The last records of a progress partition read first (each transaction adds one record and
/// one marker); widened until the shard's record is found or the partition's start reached.
const PROGRESS_WINDOW: i64 = 64;

/// What the transactional relay needs beyond the relay's own settings.
#[derive(Debug, Clone)]
pub struct Transactions {
    pub kafka: KafkaSettings,
    /// `<kafka.group_id>-relay`: a shard's transactional id adds `-<shard>`.
    pub id_prefix: String,
    /// `topics.relay_progress`.
    pub progress_topic: String,
    /// `pipeline.relay_shards`.
    pub shards: u32,
    /// `pipeline.max_event_bytes` (the producers' message limit follows it).
    pub max_event_bytes: usize,
}

/// A shard's progress record: the queue rows its last committed transaction published, as
/// sorted ranges of `outbox_pending` ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub shard: u32,
    pub ids: Vec<(i64, i64)>,
    /// When it was committed (RFC 3339), for people.
    pub at: String,
}

impl Progress {
    pub fn of(shard: u32, ids: impl IntoIterator<Item = i64>) -> Self {
        Progress {
            shard,
            ids: queue::runs(ids),
            at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }

    /// Every id the ranges hold.
    pub fn ids(&self) -> Vec<i64> {
        self.ids.iter().flat_map(|&(a, b)| a..=b).collect()
    }
}

/// How many of the leading ids (ascending) fit in `max` runs of consecutive ids.
fn within_runs(ids: impl Iterator<Item = i64>, max: usize) -> usize {
    let (mut runs, mut last, mut count) = (0, None, 0);
    for id in ids {
        if last.is_none_or(|l: i64| l.checked_add(1) != Some(id)) {
            runs += 1;
            if runs > max {
                break;
            }
        }
        last = Some(id);
        count += 1;
    }
    count
}

/// Why a shard's transaction did not commit.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// The producer is unusable (fenced by a newer holder, or another fatal error): dropped.
    #[error(
        "shard {shard}: the transactional producer failed for good ({source}); it is made again if the shard is still held"
    )]
    Fatal { shard: u32, source: KafkaError },
    /// The transaction was aborted; its rows stay queued for the next one.
    #[error("shard {shard}: transaction aborted: {source}")]
    Aborted { shard: u32, source: KafkaError },
    /// The broker refused records of the transaction for good (it was aborted). A refusal
    /// names a whole record batch, so the rows are suspects: each goes again in a
    /// transaction of its own, where a refusal is the row's own.
    #[error(
        "shard {shard}: the broker refused {} of the transaction's rows ({source}); each goes again alone to find the one at fault",
        rows.len()
    )]
    Refused {
        shard: u32,
        rows: Vec<i64>,
        source: KafkaError,
    },
    /// The broker refused the transaction's only row for good: it is parked, the
    /// transaction aborted.
    #[error("shard {shard}: the broker refused a row for good ({source}); it is parked")]
    Parked { shard: u32, source: KafkaError },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TxnError {
    /// Each heals by publishing the rows again in a later transaction.
    pub fn is_transient(&self) -> bool {
        match self {
            TxnError::Fatal { .. }
            | TxnError::Aborted { .. }
            | TxnError::Refused { .. }
            | TxnError::Parked { .. } => true,
            TxnError::Store(e) => e.is_transient(),
        }
    }
}

/// The context of a shard's producer. A transaction's commit answers for all its records,
/// so the producer asks for delivery reports of failures only
/// (`delivery.report.only.error`): no future and no report per record (they cost the relay
/// a fifth of its CPU). The refusals among the failures are kept, by queue row, for the
/// transaction's end.
#[derive(Default)]
pub struct ShardContext {
    refused: std::sync::Mutex<BTreeMap<i64, KafkaError>>,
}

impl ShardContext {
    fn refusals(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, KafkaError>> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientContext for ShardContext {}

impl ProducerContext for ShardContext {
    /// The record's queue row (`0`: the progress record).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, row: usize) {
        if let (Err((e, _)), Ok(row)) = (result, i64::try_from(row))
            && row > 0
            && is_refusal(e)
        {
            self.refusals().insert(row, e.clone());
        }
    }
}

/// A shard's transactional producer: librdkafka's producer, its events (the failures'
/// delivery reports, errors) served by a thread of its own in one-second windows.
/// rust-rdkafka's `ThreadedProducer` polls in 100 ms windows, each ending in a busy wait of
/// up to a millisecond (a remaining timeout below one millisecond rounds to zero): sixteen
/// shards' threads spent 5% of the relay's CPU reading the clock, and an idle instance
/// woke 160 times a second for nothing. The thread holds the producer until its window ends
/// after the last handle is dropped (at most [`POLL_WINDOW`]).
pub struct ShardProducer {
    inner: Arc<BaseProducer<ShardContext>>,
    stop: Arc<AtomicBool>,
}

impl ShardProducer {
    fn start(config: &ClientConfig) -> Result<Self, TakeError> {
        let inner: Arc<BaseProducer<ShardContext>> =
            Arc::new(config.create_with_context(ShardContext::default())?);
        let stop = Arc::new(AtomicBool::new(false));
        let (producer, stopped) = (Arc::clone(&inner), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("relay-shard-poll".to_owned())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    producer.poll(POLL_WINDOW);
                }
            })
            .map_err(TakeError::Thread)?;
        Ok(ShardProducer { inner, stop })
    }
}

impl std::ops::Deref for ShardProducer {
    type Target = BaseProducer<ShardContext>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl Drop for ShardProducer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A taken shard: its transactional producer and its progress partition.
#[derive(Clone)]
pub struct Ready {
    pub producer: Arc<ShardProducer>,
    pub partition: i32,
    /// `topics.relay_progress` and the shard's key on it (its transactional id).
    pub progress_topic: String,
    pub progress_key: String,
}

/// Rows published by committed transactions whose removal from the queue is not confirmed
/// yet, also by shard: a shard's next progress record names them too, so a new holder drops
/// them however far the removal got.
#[derive(Debug, Default)]
pub struct Unconfirmed {
    done: Done,
    by_shard: BTreeMap<u32, Vec<i64>>,
}

impl Unconfirmed {
    fn merge(&mut self, other: Unconfirmed) {
        self.done.extend(other.done);
        for (shard, ids) in other.by_shard {
            self.by_shard.entry(shard).or_default().extend(ids);
        }
    }

    fn add(&mut self, shard: u32, done: Done) {
        self.by_shard
            .entry(shard)
            .or_default()
            .extend(done.pending_ids.iter().copied());
        self.done.extend(done);
    }

    /// The ids of a shard's rows.
    fn of(&self, shard: u32) -> &[i64] {
        self.by_shard.get(&shard).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// The transactional producers of the shards this instance holds, ready to publish.
pub struct Txns {
    pub settings: Transactions,
    ready: BTreeMap<u32, Ready>,
    /// Committed rows not yet confirmed gone from the queue.
    undeleted: Unconfirmed,
    /// The next round's rows, read while the last round was published (kept only when that
    /// round published every row and the ready shards stayed the same).
    next: Option<Vec<Outgoing>>,
    /// By shard, rows in a record batch the broker refused: while one is queued, each goes
    /// in a transaction of its own (the rows before it together).
    suspects: BTreeMap<u32, BTreeSet<i64>>,
    /// When the last round read from the queue's head started, if it was a small one (see
    /// [`TXN_LINGER`]).
    small_round: Option<Instant>,
}

impl Txns {
    pub fn new(settings: Transactions) -> Self {
        Txns {
            settings,
            ready: BTreeMap::new(),
            undeleted: Unconfirmed::default(),
            next: None,
            suspects: BTreeMap::new(),
            small_round: None,
        }
    }

    /// How long the next round from the queue's head waits (see [`TXN_LINGER`]).
    fn linger(&self) -> Option<Duration> {
        let started = self.small_round?;
        TXN_LINGER
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
    }

    /// The shards ready to publish, as a queue filter.
    pub fn filter(&self) -> Shards {
        Shards::Some {
            held: self.ready.keys().copied().collect(),
            of: self.settings.shards,
        }
    }

    /// The shard of a queued row.
    pub fn shard_of(&self, row: &Outgoing) -> u32 {
        (row.shard_key % i64::from(self.settings.shards.max(1))) as u32
    }

    /// A ready shard's producer and progress partition.
    pub fn ready(&self, shard: u32) -> Option<&Ready> {
        self.ready.get(&shard)
    }

    /// Removes the committed rows from the queue (retried by the caller until it succeeds:
    /// no read from the queue's head may happen before).
    pub async fn finish(&mut self, db: &DatabaseConnection) -> Result<(), StoreError> {
        if self.undeleted.done.is_empty() {
            self.undeleted.by_shard.clear();
            return Ok(());
        }
        let taken = std::mem::take(&mut self.undeleted);
        if let Err(e) = queue::done(db, taken.done.clone(), Utc::now()).await {
            self.undeleted.merge(taken);
            return Err(e);
        }
        Ok(())
    }

    /// Forgets the suspects of a shard none of whose `rows` they are (parked since, or
    /// gone from the queue).
    fn forget_suspects(&mut self, shard: u32, rows: &[Outgoing]) {
        if let Some(set) = self.suspects.get(&shard)
            && !rows.iter().any(|r| set.contains(&r.pending_id))
        {
            self.suspects.remove(&shard);
        }
    }

    /// Notes a round's suspects and forgets those it published or parked.
    fn suspect(&mut self, shard: u32, rows: &[i64], settled: &[i64]) {
        let set = self.suspects.entry(shard).or_default();
        set.extend(rows.iter().copied());
        for id in settled {
            set.remove(id);
        }
        if set.is_empty() {
            self.suspects.remove(&shard);
        }
    }

    /// Forgets a shard's producer after a fatal error.
    pub fn drop_shard(&mut self, shard: u32) {
        self.ready.remove(&shard);
        self.next = None;
    }

    /// Makes the producers of newly held shards (fencing their previous holders and
    /// recovering from their progress records) and drops those of shards no longer held. A
    /// shard that cannot be taken now is tried again on the next call.
    pub async fn sync(&mut self, db: &DatabaseConnection, held: &BTreeSet<u32>) {
        let before: Vec<u32> = self.ready.keys().copied().collect();
        self.ready.retain(|shard, _| held.contains(shard));
        self.suspects.retain(|shard, _| held.contains(shard));
        let missing: Vec<u32> = held
            .iter()
            .copied()
            .filter(|s| !self.ready.contains_key(s))
            .collect();
        let taken = futures::future::join_all(
            missing
                .iter()
                .map(|&shard| take_shard(self.settings.clone(), db.clone(), shard)),
        )
        .await;
        for (shard, result) in missing.into_iter().zip(taken) {
            match result {
                Ok(ready) => {
                    self.ready.insert(shard, ready);
                }
                Err(e) => {
                    tracing::warn!(shard, error = %e, "could not take a relay shard yet; trying again")
                }
            }
        }
        // Rows read for other shards may since have been published by their new holder.
        if !self.ready.keys().copied().eq(before) {
            self.next = None;
        }
    }
}

/// Errors while taking a shard.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error("initialising the shard's transactional producer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("reading the shard's progress record: {0}")]
    Progress(String),
    #[error("starting the shard producer's polling thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Initialises a shard's transactional producer (fencing the previous holder), then removes
/// from the queue what the shard's last committed transaction published.
async fn take_shard(
    settings: Transactions,
    db: DatabaseConnection,
    shard: u32,
) -> Result<Ready, TakeError> {
    let id = format!("{}-{shard}", settings.id_prefix);
    let mut config = producer_config(&settings.kafka, settings.max_event_bytes);
    config
        .set("transactional.id", &id)
        .set("delivery.report.only.error", "true")
        .set("transaction.timeout.ms", "60000")
        // Back to back transactions: the coordinator answers the next one's
        // AddPartitionsToTxn with CONCURRENT_TRANSACTIONS until the last one's markers are
        // written, and librdkafka retries after `retry.backoff.ms` (100 ms by default, a
        // floor under every transaction; KAFKA-5477 lowered the Java client's for the same
        // reason). Retries back off exponentially from here up to the usual second.
        .set("retry.backoff.ms", "10")
        .set("retry.backoff.max.ms", "1000")
        // The commit sends what is left at once (`wait_delivered`), so lingering costs a
        // transaction no latency: its records go in a few full batches instead of one small
        // batch per partition every 10 ms (the broker's CPU for 100,000 rows 1.75 -> 1.40
        // core-seconds, this process's 3.17 -> 2.92).
        .set("linger.ms", "100");
    let producer = Arc::new(ShardProducer::start(&config)?);
    let init = producer.clone();
    tokio::task::spawn_blocking(move || init.init_transactions(TXN_TIMEOUT))
        .await
        .map_err(|e| TakeError::Progress(e.to_string()))??;
    let s = settings.clone();
    let (partition, progress) = tokio::task::spawn_blocking(move || read_progress(&s, shard))
        .await
        .map_err(|e| TakeError::Progress(e.to_string()))?
        .map_err(TakeError::Progress)?;
    if let Some(progress) = progress {
        let removed = queue::done_by_ids(&db, &progress.ids(), Utc::now()).await?;
        if removed > 0 {
            tracing::info!(
                shard,
                removed,
                "rows the shard's last transaction published left the queue (not published again)"
            );
        }
    }
    tracing::info!(shard, transactional_id = %id, "relay shard taken");
    Ok(Ready {
        producer,
        partition,
        progress_topic: settings.progress_topic.clone(),
        progress_key: id,
    })
}

/// The partition of the progress topic that holds a shard's records: the shard's own. It
/// must be written by no other producer: a read_committed reader stops at the last stable
/// offset, so another producer's open transaction would hide this shard's last record (one
/// partition per shard, one topic per deployment).
fn progress_partition(
    consumer: &Reader,
    topic: &str,
    shard: u32,
    shards: u32,
) -> Result<i32, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if partitions == 0 {
        return Err(format!(
            "the topic {topic} has no partitions (is it created?)"
        ));
    }
    if partitions < shards as usize {
        return Err(format!(
            "topics.relay_progress ({topic}) has {partitions} partitions; it needs one per relay \
             shard (pipeline.relay_shards = {shards})"
        ));
    }
    Ok(shard as i32)
}

/// Reads a shard's last committed progress record (read_committed, to the partition's end);
/// returns the shard's progress partition too.
pub fn read_progress(
    settings: &Transactions,
    shard: u32,
) -> Result<(i32, Option<Progress>), String> {
    let topic = &settings.progress_topic;
    let group = format!("{}-progress-reader", settings.id_prefix);
    let consumer = reader(&settings.kafka, &group).map_err(|e| e.to_string())?;
    let partition = progress_partition(&consumer, topic, shard, settings.shards)?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let key = format!("{}-{shard}", settings.id_prefix);
    let mut window = PROGRESS_WINDOW;
    loop {
        let from = (high - window).max(low);
        if let Some(found) = last_record(&consumer, topic, partition, from, &key)? {
            return Ok((partition, Some(found)));
        }
        if from == low {
            return Ok((partition, None));
        }
        window *= 8;
    }
}

/// The last record with `key` from `from` to the partition's end.
fn last_record(
    consumer: &Reader,
    topic: &str,
    partition: i32,
    from: i64,
    key: &str,
) -> Result<Option<Progress>, String> {
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, Offset::Offset(from))
        .map_err(|e| e.to_string())?;
    consumer.assign(&list).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + PROGRESS_READ;
    let mut last = None;
    loop {
        if Instant::now() > deadline {
            return Err(format!("{topic}[{partition}] not read to its end in time"));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(last),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(m)) => {
                if m.key() == Some(key.as_bytes())
                    && let Some(p) = m.payload()
                {
                    last = serde_json::from_slice::<Progress>(p).ok();
                }
            }
        }
    }
}

/// Commits the open transaction: retried while librdkafka says retriable; an abortable
/// failure is aborted; a fatal one is reported as such.
pub async fn commit(producer: &Arc<ShardProducer>, shard: u32) -> Result<(), TxnError> {
    for _ in 0..3 {
        let p = producer.clone();
        let committed = tokio::task::spawn_blocking(move || {
            wait_delivered(&p)?;
            p.commit_transaction(TXN_TIMEOUT)
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled));
        match committed {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e)) if e.is_retriable() => {
                tracing::warn!(shard, error = %e, "committing a relay transaction: retrying");
            }
            Err(e) => return Err(abort(producer, shard, e).await),
        }
    }
    Err(abort(producer, shard, KafkaError::Canceled).await)
}

/// Blocks until every record produced into the open transaction has been acknowledged or
/// failed (at most [`TXN_TIMEOUT`]), on librdkafka's own condition: with the event API
/// `rd_kafka_flush` waits for the producer's message count to reach zero, and it makes the
/// broker threads send at once instead of after `linger.ms`. rust-rdkafka's `flush`, which
/// `commit_transaction` calls first, asks without waiting and then polls in 100 ms windows
/// that end only when the window does (each ending in a sub-millisecond busy wait), so every
/// commit took at least 100 ms; afterwards its flush finds nothing left and returns at once.
/// Records still undelivered at the timeout give the same error as rust-rdkafka's `flush`
/// (the transaction is then aborted, after one timeout as before, not two).
fn wait_delivered(producer: &ShardProducer) -> Result<(), KafkaError> {
    let timeout_ms = i32::try_from(TXN_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the handle is the live producer's own (`producer` is borrowed for the whole
    // call, so it cannot be destroyed meanwhile), and rd_kafka_flush is thread-safe.
    let code =
        unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), timeout_ms) };
    match RDKafkaErrorCode::from(code) {
        RDKafkaErrorCode::NoError => Ok(()),
        undelivered => Err(KafkaError::Flush(undelivered)),
    }
}

/// Aborts the open transaction after `cause`; fatal when the producer cannot go on.
pub async fn abort(producer: &Arc<ShardProducer>, shard: u32, cause: KafkaError) -> TxnError {
    if is_fatal(&cause) {
        return TxnError::Fatal {
            shard,
            source: cause,
        };
    }
    let p = producer.clone();
    let aborted = tokio::task::spawn_blocking(move || p.abort_transaction(TXN_TIMEOUT))
        .await
        .unwrap_or(Err(KafkaError::Canceled));
    match aborted {
        Ok(()) => TxnError::Aborted {
            shard,
            source: cause,
        },
        Err(e) => TxnError::Fatal { shard, source: e },
    }
}

/// A fatal transactional error, or a fencing seen on a record.
pub fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(e) => e.is_fatal(),
        other => matches!(
            other.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            )
        ),
    }
}

/// Produces a shard's progress record inside its open transaction.
pub fn produce_progress(ready: &Ready, progress: &Progress) -> Result<(), KafkaError> {
    let value = serde_json::to_string(progress).unwrap_or_default();
    let record = BaseRecord::with_opaque_to(&ready.progress_topic, 0)
        .key(&ready.progress_key)
        .payload(&value)
        .partition(ready.partition);
    ready.producer.send(record).map_err(|(e, _)| e)
}

/// Produces a row's records into the open transaction, with no delivery future: for a change
/// with the state topic on, its state record first (a state record repeated later is
/// harmless on the compacted topic), then its event. A refusal leaves the row's event
/// unproduced.
fn produce_row(
    settings: &RelaySettings,
    producer: &ShardProducer,
    row: &Outgoing,
) -> Result<(), KafkaError> {
    let opaque = usize::try_from(row.pending_id).unwrap_or(0);
    if let (Kind::Change, Some(topic)) = (&row.kind, &settings.state_topic) {
        let value = state_value(row)?;
        let mut record =
            BaseRecord::<String, String, usize>::with_opaque_to(topic, opaque).key(&row.key);
        if let Some(value) = &value {
            record = record.payload(value);
        }
        producer.send(record).map_err(|(e, _)| e)?;
    }
    let record = BaseRecord::with_opaque_to(settings.topic(&row.kind), opaque)
        .key(&row.key)
        .payload(&row.payload)
        .headers(event_headers(row));
    producer.send(record).map_err(|(e, _)| e)
}

/// What one shard's transaction did.
#[derive(Default)]
struct ShardOutcome {
    shard: u32,
    done: Done,
    published: Published,
    /// The rows it parked.
    parked_ids: Vec<i64>,
}

impl Relay {
    /// Exactly once: newly held shards are taken, then the next rows of the ready shards are
    /// published, one transaction per shard (the shards' transactions run side by side),
    /// while — in a task of its own — the last round's rows leave the queue and the round
    /// after is read. Without a round read ahead, the last round's rows leave the queue first
    /// and the round is read from the queue's head. `false` when nothing is queued for them.
    pub(super) async fn step_transactional(&mut self) -> Result<bool, RelayError> {
        let limit = self.settings.batch * TXN_BATCHES;
        let Some(txns) = self.txns.as_mut() else {
            return Ok(false);
        };
        txns.sync(&self.db, self.leases.held()).await;
        let filter = txns.filter();
        let (rows, deleting) = match txns.next.take() {
            Some(rows) => (rows, std::mem::take(&mut txns.undeleted)),
            None => {
                txns.finish(&self.db).await?;
                if matches!(&filter, Shards::Some { held, .. } if held.is_empty()) {
                    return Ok(false);
                }
                if let Some(wait) = txns.linger() {
                    tokio::time::sleep(wait).await;
                }
                // One relay batch from the head, so publishing starts sooner; the rounds
                // read ahead meanwhile take the whole `limit`.
                let started = Instant::now();
                let rows = queue::read(&self.db, &filter, 0, self.settings.batch).await?;
                let small = !rows.is_empty() && rows.len() < self.settings.batch as usize;
                txns.small_round = small.then_some(started);
                (rows, Unconfirmed::default())
            }
        };
        let Some(last) = rows.last().map(|r| r.pending_id) else {
            return Ok(false);
        };
        let count = rows.len();
        let mut by_shard: BTreeMap<u32, Vec<Outgoing>> = BTreeMap::new();
        for row in rows {
            by_shard.entry(txns.shard_of(&row)).or_default().push(row);
        }
        for (shard, rows) in &by_shard {
            txns.forget_suspects(*shard, rows);
        }
        let (db, gone) = (self.db.clone(), deleting.done.clone());
        let store = tokio::spawn(async move {
            if !gone.is_empty() {
                queue::done(&db, gone, Utc::now()).await?;
            }
            queue::read_after_checked(&db, &filter, last, count, limit).await
        });
        // Each shard's transaction in a task of its own: the produce loops (serialising every
        // event and state record) run on the runtime's threads side by side.
        let Some(txns) = self.txns.as_ref() else {
            return Ok(false);
        };
        let turn = Arc::new(tokio::sync::Semaphore::new(PRODUCING));
        let shards: Vec<_> = by_shard
            .into_iter()
            .map(|(shard, rows)| {
                let job = txns.ready(shard).cloned().map(|ready| ShardJob {
                    settings: self.settings.clone(),
                    db: self.db.clone(),
                    ready,
                    shard,
                    unconfirmed: deleting.of(shard).to_vec(),
                    suspects: txns.suspects.get(&shard).cloned().unwrap_or_default(),
                    turn: turn.clone(),
                });
                (shard, job.map(|job| tokio::spawn(job.publish(rows))))
            })
            .collect();
        let mut outcomes = Vec::with_capacity(shards.len());
        for (shard, task) in shards {
            outcomes.push(match task {
                // Not ready (dropped after a fatal error): its rows wait.
                None => Ok(ShardOutcome {
                    shard,
                    ..ShardOutcome::default()
                }),
                Some(task) => task.await.unwrap_or_else(|e| {
                    Err(TxnError::Store(StoreError::Db(sea_orm::DbErr::Custom(
                        format!("shard {shard}: its publishing task ended: {e}"),
                    ))))
                }),
            });
        }
        let store = match store.await {
            Ok(answer) => answer,
            Err(e) => Err(StoreError::Db(sea_orm::DbErr::Custom(format!(
                "removing and reading queue rows: {e}"
            )))),
        };
        let next = match store {
            Ok(next) => next,
            Err(e) => {
                tracing::debug!(error = %e, "removing the last round or reading the next failed; from the head");
                if let Some(txns) = self.txns.as_mut() {
                    txns.undeleted.merge(deleting);
                }
                None
            }
        };
        self.settle(outcomes, next, count).await
    }

    /// After a round: its committed rows are noted for removal, its figures counted, shards
    /// whose producer failed fatally dropped, and the round read meanwhile is kept for the
    /// next step only when this round published every one of its `count` rows (and the last
    /// round's rows are gone from the queue).
    async fn settle(
        &mut self,
        outcomes: Vec<Result<ShardOutcome, TxnError>>,
        next: Option<Vec<Outgoing>>,
        count: usize,
    ) -> Result<bool, RelayError> {
        let mut first_error = None;
        let mut total = Published::default();
        // Shards whose producer is dropped (made again on the next round).
        let mut renew = Vec::new();
        let mut committed = Unconfirmed::default();
        let mut landed = 0;
        let mut suspects = Vec::new();
        for outcome in outcomes {
            match outcome {
                Ok(o) => {
                    total.add(o.published);
                    landed += o.done.pending_ids.len();
                    if self
                        .txns
                        .as_ref()
                        .is_some_and(|t| t.suspects.contains_key(&o.shard))
                    {
                        let mut settled = o.parked_ids;
                        settled.extend(&o.done.pending_ids);
                        suspects.push((o.shard, Vec::new(), settled));
                    }
                    committed.add(o.shard, o.done);
                }
                Err(e) => {
                    match &e {
                        TxnError::Fatal { shard, .. } | TxnError::Parked { shard, .. } => {
                            renew.push(*shard)
                        }
                        TxnError::Refused { shard, rows, .. } => {
                            renew.push(*shard);
                            suspects.push((*shard, rows.clone(), Vec::new()))
                        }
                        _ => {}
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        let whole = first_error.is_none() && renew.is_empty() && landed == count;
        self.count(total);
        if let Some(txns) = self.txns.as_mut() {
            for (shard, rows, settled) in suspects {
                txns.suspect(shard, &rows, &settled);
            }
            renew.into_iter().for_each(|s| txns.drop_shard(s));
            txns.undeleted.merge(committed);
            // A small read-ahead is left for a round from the head, after the linger.
            let batch = self.settings.batch as usize;
            txns.next = next.filter(|rows| whole && rows.len() >= batch);
            if txns.next.is_none() {
                txns.finish(&self.db).await?;
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(true),
        }
    }
}

/// One shard's transaction, owned by its task.
struct ShardJob {
    settings: Arc<RelaySettings>,
    db: DatabaseConnection,
    ready: Ready,
    shard: u32,
    /// The shard's committed rows whose removal from the queue runs meanwhile.
    unconfirmed: Vec<i64>,
    /// The shard's rows in a record batch the broker refused: each goes alone.
    suspects: BTreeSet<i64>,
    /// Taken while producing (see [`PRODUCING`]).
    turn: Arc<tokio::sync::Semaphore>,
}

impl ShardJob {
    /// Publishes one shard's rows in one transaction with its progress record. A row the
    /// producer refuses at once is parked (its product's later rows in the batch wait); a
    /// transaction that fails is aborted and its rows stay queued for the next one (those the
    /// broker refused for good become suspects, see [`TxnError::Refused`]; alone, parked).
    ///
    /// The progress record names the rows this transaction published and `unconfirmed`,
    /// the shard's committed rows whose removal from the queue runs meanwhile.
    async fn publish(self, mut rows: Vec<Outgoing>) -> Result<ShardOutcome, TxnError> {
        let (ready, shard) = (&self.ready, self.shard);
        // The rest stays queued for a later transaction (a suffix in queue order, so every
        // product's rows keep their order).
        rows.truncate(within_runs(rows.iter().map(|r| r.pending_id), MAX_RUNS));
        // A suspect goes alone (a refusal is then its own); the rows before it together.
        if let Some(first) = rows
            .iter()
            .position(|r| self.suspects.contains(&r.pending_id))
        {
            rows.truncate(first.max(1));
        }
        let producer = &ready.producer;
        let turn = self.turn.acquire().await;
        producer.context().refusals().clear();
        if let Err(e) = producer.begin_transaction() {
            return Err(abort(producer, shard, e).await);
        }
        let mut sent = Vec::with_capacity(rows.len());
        let mut leave = Vec::new();
        let mut held_back: HashSet<i64> = HashSet::new();
        let mut parked_ids = Vec::new();
        for (i, mut row) in rows.into_iter().enumerate() {
            // The produce loop runs without awaiting: every few hundred rows it lets the
            // runtime poll the other tasks (the queue's removal and read-ahead, the other
            // shards' commits), which would otherwise wait for whole loops to end.
            if i % YIELD_EVERY == YIELD_EVERY - 1 {
                tokio::task::yield_now().await;
            }
            if row.kind == Kind::Gone {
                leave.push(row);
                continue;
            }
            if row.product_id.is_some_and(|p| held_back.contains(&p)) {
                continue;
            }
            self.settings.fit(&mut row);
            match produce_row(&self.settings, producer, &row) {
                Ok(()) => sent.push(row),
                Err(e) if is_refusal(&e) => {
                    held_back.extend(row.product_id);
                    self.settings
                        .park(&self.db, &row, &e)
                        .await
                        .map_err(relay_store)?;
                    parked_ids.push(row.pending_id);
                }
                Err(e) => return Err(abort(producer, shard, e).await),
            }
        }
        let ids = sent.iter().map(|r| r.pending_id);
        let progress = Progress::of(
            shard,
            ids.chain(leave.iter().map(|r| r.pending_id))
                .chain(self.unconfirmed.iter().copied()),
        );
        if let Err(e) = produce_progress(ready, &progress) {
            return Err(abort(producer, shard, e).await);
        }
        drop(turn);
        if let Err(e) = commit(producer, shard).await {
            return Err(self.refused(sent, e).await?);
        }
        let published = Published {
            changes: sent.iter().filter(|r| r.kind == Kind::Change).count(),
            results: sent
                .iter()
                .filter(|r| matches!(r.kind, Kind::Result(_)))
                .count(),
            parked: parked_ids.len(),
        };
        let done = Done::of(sent.iter().chain(leave.iter()));
        Ok(ShardOutcome {
            shard,
            done,
            published,
            parked_ids,
        })
    }

    /// After an aborted transaction (`aborted` says why): the rows the broker refused for good
    /// (the transaction is gone, so every delivery has its answer). A lone row's refusal is
    /// its own: it is parked (`TxnError::Parked`). Among many, a refusal names a whole record
    /// batch: the rows become suspects (`TxnError::Refused`), each published again alone.
    async fn refused(&self, sent: Vec<Outgoing>, aborted: TxnError) -> Result<TxnError, TxnError> {
        // The commit flushed first, so the failures' reports are in; the flush after the
        // abort (which purged the rest) makes sure.
        let p = self.ready.producer.clone();
        let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(5))).await;
        let refusals = std::mem::take(&mut *self.ready.producer.context().refusals());
        if let [row] = sent.as_slice()
            && let Some(e) = refusals.get(&row.pending_id).cloned()
        {
            self.settings
                .park(&self.db, row, &e)
                .await
                .map_err(relay_store)?;
            return Ok(TxnError::Parked {
                shard: self.shard,
                source: e,
            });
        }
        let refused: Vec<(i64, KafkaError)> = sent
            .iter()
            .filter_map(|row| {
                let e = refusals.get(&row.pending_id)?;
                Some((row.pending_id, e.clone()))
            })
            .collect();
        Ok(match refused.first() {
            Some((_, source)) => TxnError::Refused {
                shard: self.shard,
                source: source.clone(),
                rows: refused.into_iter().map(|(id, _)| id).collect(),
            },
            None => aborted,
        })
    }
}

/// A store failure while parking, as a transaction error.
fn relay_store(e: RelayError) -> TxnError {
    match e {
        RelayError::Store(e) => TxnError::Store(e),
        other => TxnError::Store(StoreError::Db(sea_orm::DbErr::Custom(other.to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_takes_the_rows_of_its_first_runs_only() {
        // Contiguous ids are one run, whatever their number.
        assert_eq!(within_runs(1..=50_000, 4), 50_000);
        // Every 16th id (one shard of 16): each a run of its own.
        assert_eq!(within_runs((0..50_000).map(|i| i * 16), 4096), 4096);
        // Runs of three: four runs are twelve ids.
        let ids = (0..100).flat_map(|r| (0..3).map(move |i| r * 10 + i));
        assert_eq!(within_runs(ids, 4), 12);
        assert_eq!(within_runs(std::iter::empty(), 4), 0);
        // The bound keeps the record small: 2 × MAX_RUNS runs of the largest ids.
        let worst = Progress::of(0, (0..2 * MAX_RUNS as i64).map(|i| i64::MAX - 2 * i));
        let bytes = serde_json::to_string(&worst).unwrap().len();
        assert!(bytes < 400_000, "{bytes} bytes");
    }

    #[test]
    fn progress_keeps_ids_as_ranges() {
        let p = Progress::of(3, [7, 5, 6, 10, 12, 11, 20]);
        assert_eq!(p.ids, vec![(5, 7), (10, 12), (20, 20)]);
        assert_eq!(p.ids(), vec![5, 6, 7, 10, 11, 12, 20]);
        let back: Progress = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
