//! The dead-letter topic's tools: `dlq list` shows what is there and why, `dlq replay` puts
//! records back on the request topic (original key, bytes and headers, minus the `dlq.*`
//! ones). Replay remembers its place in a consumer group of its own
//! (`<kafka.group_id>-dlq-replay`), so a record is replayed once.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;

use crate::config::{KafkaSettings, Settings};
use crate::kafka::{
    KafkaError, Reader, client_config, header_text as header, plain_producer_config, reader,
};
use crate::retry::{RetryPolicy, retry_blocking};
use crate::wire::{self, FailureClass, dlq};

/// One DLQ record, for people.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DlqEntry {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub reason: Option<String>,
    pub error_class: Option<String>,
    pub error_kind: Option<String>,
    pub original: Option<String>,
    /// The original command, lossily decoded, at most 500 characters.
    pub payload: String,
}

/// Reads `topic` from its start (or, with `from_group`, the consumer group's committed
/// position) up to its end at call time: every record committed by then. The consumer must be
/// made by [`crate::kafka::reader`] or from [`crate::kafka::reader_config`] (end-of-partition
/// events on). Blocking: call it from a blocking context.
///
/// The end is each partition's high watermark, asked by a read_uncommitted client made from
/// `settings`: a read_committed client is told the last stable offset, which stays behind a
/// transaction for a moment after its commit returned (the coordinator writes the commit
/// markers after answering) — a read to it would miss what was just committed.
///
/// The topic's partitions and ends are asked again while the brokers answer with a transient
/// error (a partition's leader moving answers `NotLeaderForPartition` for a moment), for up
/// to a minute.
pub fn read_until_end<C: ConsumerContext>(
    settings: &KafkaSettings,
    consumer: &BaseConsumer<C>,
    topic: &str,
    from_group: bool,
) -> Result<Vec<OwnedMessage>, KafkaError> {
    let watermarks: BaseConsumer = client_config(settings)
        .set("isolation.level", "read_uncommitted")
        .create()?;
    let policy = RetryPolicy::with_budget(Duration::from_secs(60));
    let (assignment, ends) = retry_blocking(&policy, "read a topic's ends", || {
        ends_of(consumer, &watermarks, topic, from_group)
    })?;
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&assignment)?;
    read_assigned(consumer, topic, ends)
}

/// What a read of `topic` to its end now assigns, and the end of each partition that has
/// records to read (its high watermark, asked by `watermarks`).
fn ends_of<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    watermarks: &BaseConsumer,
    topic: &str,
    from_group: bool,
) -> Result<(TopicPartitionList, Vec<(i32, i64)>), KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in &partitions {
        let (low, high) = watermarks.fetch_watermarks(topic, *p, Duration::from_secs(10))?;
        let start = if from_group {
            let mut one = TopicPartitionList::new();
            one.add_partition(topic, *p);
            match consumer
                .committed_offsets(one, Duration::from_secs(10))?
                .find_partition(topic, *p)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o.max(low),
                _ => low,
            }
        } else {
            low
        };
        if start < high {
            assignment.add_partition_offset(topic, *p, Offset::Offset(start))?;
            ends.push((*p, high));
        }
    }
    Ok((assignment, ends))
}

/// Polls the assigned partitions until each has been read to its end.
fn read_assigned<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    ends: Vec<(i32, i64)>,
) -> Result<Vec<OwnedMessage>, KafkaError> {
    let mut out = Vec::new();
    let mut remaining: std::collections::HashMap<i32, i64> = ends.into_iter().collect();
    let mut at_end = std::collections::HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !remaining.is_empty() {
        if std::time::Instant::now() > deadline {
            // A partial read must not pass for the whole topic.
            return Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
            )
            .into());
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let (p, o) = (m.partition(), m.offset());
                out.push(m.detach());
                if remaining.get(&p).is_some_and(|end| o + 1 >= *end) {
                    remaining.remove(&p);
                }
            }
            // With read_committed the end may stop short of the call's high watermark for a
            // moment: a transaction committed just before the call whose markers are not yet
            // written keeps the last stable offset behind it. A partition is done once the
            // position reached that high watermark (markers and aborted records are skipped,
            // not delivered, so the position is looked at again while polling).
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
                reached_end(consumer, topic, &mut remaining, &at_end)?;
            }
            None => reached_end(consumer, topic, &mut remaining, &at_end)?,
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Drops from `remaining` the partitions seen at their end whose position reached the end
/// they had at call time.
fn reached_end<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    remaining: &mut std::collections::HashMap<i32, i64>,
    at_end: &std::collections::HashSet<i32>,
) -> Result<(), KafkaError> {
    if at_end.is_empty() {
        return Ok(());
    }
    let positions = consumer.position()?;
    remaining.retain(|p, end| {
        let position = positions
            .find_partition(topic, *p)
            .and_then(|e| e.offset().to_raw());
        !(at_end.contains(p) && position.is_some_and(|at| at >= *end))
    });
    Ok(())
}

/// Lists the DLQ's records.
pub async fn list(settings: &Settings) -> Result<Vec<DlqEntry>, KafkaError> {
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || {
        let group = format!("{}-dlq-list", settings.kafka.group_id);
        let consumer = reader(&settings.kafka, &group).map_err(KafkaError::Client)?;
        let records = read_until_end(&settings.kafka, &consumer, &settings.topics.dlq, false)?;
        Ok(records
            .iter()
            .map(|m| DlqEntry {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                reason: header(m, dlq::REASON),
                error_class: header(m, dlq::ERROR_CLASS),
                error_kind: header(m, dlq::ERROR_KIND),
                original: match (
                    header(m, dlq::ORIGINAL_TOPIC),
                    header(m, dlq::ORIGINAL_PARTITION),
                    header(m, dlq::ORIGINAL_OFFSET),
                ) {
                    (Some(t), Some(p), Some(o)) => Some(format!("{t}[{p}]@{o}")),
                    _ => None,
                },
                payload: m
                    .payload()
                    .map(|p| String::from_utf8_lossy(p).chars().take(500).collect())
                    .unwrap_or_default(),
            })
            .collect())
    })
    .await
    .unwrap_or_else(|_| Err(KafkaError::Other(rdkafka::error::KafkaError::Canceled)))
}

/// Puts every not-yet-replayed DLQ record back on the request topic; returns how many.
/// `only_class` limits it to `transient` or `permanent` failures. Each class keeps its own
/// place (consumer group `<group>-dlq-replay-<class>`): a record is replayed once, and
/// `--only transient` leaves the permanent ones for a later replay.
pub async fn replay(
    settings: &Settings,
    only_class: Option<FailureClass>,
) -> Result<usize, KafkaError> {
    let classes: Vec<Option<FailureClass>> = match only_class {
        Some(class) => vec![Some(class)],
        // Records without a (known) class are replayed by a plain `replay` only.
        None => vec![
            Some(FailureClass::Transient),
            Some(FailureClass::Permanent),
            None,
        ],
    };
    let producer: FutureProducer = plain_producer_config(&settings.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .map_err(KafkaError::Client)?;
    let mut replayed = 0;
    for class in classes {
        replayed += replay_class(settings, &producer, class).await?;
    }
    Ok(replayed)
}

/// Replays the records of one class from that class's place on, then moves its place to the
/// end (only after every replayed record was acknowledged).
async fn replay_class(
    settings: &Settings,
    producer: &FutureProducer,
    class: Option<FailureClass>,
) -> Result<usize, KafkaError> {
    let name = class.map_or("unclassified", FailureClass::as_str);
    let s = settings.clone();
    let group = format!("{}-dlq-replay-{name}", s.kafka.group_id);
    let (consumer, records) =
        tokio::task::spawn_blocking(move || -> Result<(Reader, Vec<OwnedMessage>), KafkaError> {
            let consumer = reader(&s.kafka, &group).map_err(KafkaError::Client)?;
            let records = read_until_end(&s.kafka, &consumer, &s.topics.dlq, true)?;
            Ok((consumer, records))
        })
        .await
        .unwrap_or_else(|_| Err(KafkaError::Other(rdkafka::error::KafkaError::Canceled)))?;
    let mut replayed = 0;
    let mut next: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    for m in &records {
        let of = header(m, dlq::ERROR_CLASS).and_then(|c| FailureClass::parse(&c));
        if of == class {
            let headers = wire::for_replay(m.headers());
            // A refused notification goes back where it came from, a command to the requests.
            let notifications = &settings.topics.notifications;
            let target = match header(m, dlq::ORIGINAL_TOPIC) {
                Some(t) if !notifications.is_empty() && t == *notifications => notifications,
                _ => &settings.topics.requests,
            };
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(target).headers(headers);
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            if let Some(p) = m.payload() {
                record = record.payload(p);
            }
            producer
                .send(record, Timeout::After(Duration::from_secs(30)))
                .await
                .map_err(|(e, _)| KafkaError::Other(e))?;
            replayed += 1;
        }
        let e = next.entry(m.partition()).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    if !next.is_empty() {
        let mut done = TopicPartitionList::new();
        for (p, o) in next {
            done.add_partition_offset(&settings.topics.dlq, p, Offset::Offset(o))?;
        }
        consumer.commit(&done, CommitMode::Sync)?;
    }
    Ok(replayed)
}
