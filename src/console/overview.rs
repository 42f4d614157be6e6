//! The console's overview, gathered in the background: the outbox backlog and its age, parked
//! rows, the relay's shards and holders, the depth of the DLQ and of the retry topic, and the
//! consumer lag per partition, the schedules with their watermarks and the scheduler's holder,
//! and the coalescing of change notifications. Each part that cannot be read says so (`null`)
//! rather than holding up the others.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};
use serde::Serialize;

use crate::config::Settings;
use crate::kafka::client_config;

/// Longest time one part of the overview may take.
const PART_TIMEOUT: Duration = Duration::from_secs(4);

/// What the overview shows (besides the systems, which are read live).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overview {
    /// When it was gathered (`None`: not yet).
    pub gathered_at: Option<String>,
    /// Events queued for the relay, parked rows, and the oldest queued event's age.
    pub outbox: Option<Outbox>,
    /// Which instance holds which relay shard (PostgreSQL), or "this process" (SQLite).
    pub relay: Option<Vec<Holder>>,
    /// Records on the DLQ (all of them; replays remember their place).
    pub dlq_depth: Option<i64>,
    /// Commands waiting on the retry topic (its end minus the group's committed offsets).
    pub retry_depth: Option<i64>,
    /// Consumer lag of the request topic's partitions, as librdkafka last reported it.
    pub lag: Vec<Lag>,
    /// Each system's schedules and next slots, watermark, last drift check, and the
    /// scheduler's holder.
    pub schedules: Option<crate::scheduler::ScheduleOverview>,
    /// Change notifications coalesced into commands (`None`: disabled or unreadable).
    pub notifications: Option<Notifications>,
}

/// What the coalescing of change notifications has done.
#[derive(Debug, Clone, Serialize)]
pub struct Notifications {
    pub topic: String,
    /// Per system, across every instance.
    pub systems: Vec<NotificationRow>,
    /// Codes waiting in this instance now, and the most that ever did.
    pub pending_codes: i64,
    pub peak_pending_codes: i64,
    pub max_pending_codes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct NotificationRow {
    #[serde(flatten)]
    pub counts: crate::store::notifications::NotificationCounts,
    /// Notifications per command (one decimal): how much the coalescing saved.
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outbox {
    pub backlog: u64,
    pub parked: u64,
    pub oldest_age_s: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Holder {
    pub shard: i32,
    pub holder: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Lag {
    pub topic: String,
    pub partition: String,
    pub lag: i64,
}

/// The broker client the topic depths are read with: made once, kept for every round (a
/// client per round would open and close broker connections every 2 s).
pub type DepthReader = std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<BaseConsumer>>>>;

/// Gathers every part, each bounded in time.
pub async fn gather(
    db: &DatabaseConnection,
    settings: &Settings,
    reader: &DepthReader,
) -> Overview {
    let outbox = tokio::time::timeout(PART_TIMEOUT, crate::outbox::queue::backlog(db))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|(backlog, parked, oldest)| Outbox {
            backlog,
            parked,
            oldest_age_s: oldest
                .map_or(0, |t: DateTime<Utc>| (Utc::now() - t).num_seconds().max(0)),
        });
    let relay = tokio::time::timeout(PART_TIMEOUT, holders(db, settings))
        .await
        .ok()
        .flatten();
    let (dlq_depth, retry_depth) = depths(settings, reader).await;
    let schedules = tokio::time::timeout(
        PART_TIMEOUT,
        crate::scheduler::overview(settings, db, Utc::now()),
    )
    .await
    .ok()
    .and_then(Result::ok);
    let notifications = notifications(db, settings).await;
    Overview {
        gathered_at: Some(Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        outbox,
        relay,
        dlq_depth,
        retry_depth,
        lag: lag(),
        schedules,
        notifications,
    }
}

/// The coalescing counts from the store, this instance's pending codes from its metrics.
async fn notifications(db: &DatabaseConnection, settings: &Settings) -> Option<Notifications> {
    let topic = &settings.topics.notifications;
    if topic.is_empty() {
        return None;
    }
    let counts = tokio::time::timeout(PART_TIMEOUT, crate::store::notifications::counts(db))
        .await
        .ok()?
        .ok()?;
    let m = crate::metrics::metrics();
    Some(Notifications {
        topic: topic.clone(),
        systems: counts
            .into_iter()
            .map(|counts| NotificationRow {
                ratio: (counts.commands > 0).then(|| {
                    (counts.notifications as f64 / counts.commands as f64 * 10.0).round() / 10.0
                }),
                counts,
            })
            .collect(),
        pending_codes: m.notification_pending.get(),
        peak_pending_codes: m.notification_pending_peak.get(),
        max_pending_codes: settings.notifications.max_pending_codes,
    })
}

/// The relay's shard holders.
async fn holders(db: &DatabaseConnection, settings: &Settings) -> Option<Vec<Holder>> {
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return Some(
            (0..settings.pipeline.relay_shards as i32)
                .map(|shard| Holder {
                    shard,
                    holder: "this process (SQLite)".to_owned(),
                })
                .collect(),
        );
    }
    let rows = db
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            crate::outbox::shards::HOLDERS_SQL,
        ))
        .await
        .ok()?;
    Some(
        rows.iter()
            .filter_map(|r| {
                let holder: String = r.try_get("", "holder").ok()?;
                Some(Holder {
                    shard: r.try_get("", "shard").ok()?,
                    holder: holder
                        .strip_prefix(crate::outbox::shards::APPLICATION_NAME_PREFIX)
                        .unwrap_or(&holder)
                        .to_owned(),
                })
            })
            .collect(),
    )
}

/// The DLQ's record count and the retry topic's waiting commands, read from the broker on a
/// blocking thread (librdkafka's calls block).
async fn depths(settings: &Settings, reader: &DepthReader) -> (Option<i64>, Option<i64>) {
    let kafka = settings.kafka.clone();
    let dlq = settings.topics.dlq.clone();
    let retry = Some(settings.topics.retry.clone()).filter(|t| !t.is_empty());
    let reader = reader.clone();
    let read = tokio::task::spawn_blocking(move || {
        let consumer = {
            let mut kept = reader.lock().unwrap_or_else(|e| e.into_inner());
            if kept.is_none() {
                // Never subscribes: it only reads watermarks and the group's committed offsets.
                let made: BaseConsumer = client_config(&kafka)
                    .set("group.id", &kafka.group_id)
                    .set("enable.auto.commit", "false")
                    .create()
                    .ok()?;
                *kept = Some(std::sync::Arc::new(made));
            }
            kept.clone()?
        };
        let dlq_depth = depth(&consumer, &dlq, false);
        let retry_depth = retry.and_then(|t| depth(&consumer, &t, true));
        Some((dlq_depth, retry_depth))
    });
    match tokio::time::timeout(PART_TIMEOUT * 2, read).await {
        Ok(Ok(Some(depths))) => depths,
        _ => (None, None),
    }
}

/// A topic's records (end minus start), or with `pending` what the group has not committed.
fn depth(consumer: &BaseConsumer, topic: &str, pending: bool) -> Option<i64> {
    let timeout = Duration::from_secs(2);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()?
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut total = 0;
    let mut list = TopicPartitionList::new();
    for p in &partitions {
        list.add_partition(topic, *p);
    }
    let committed = match pending {
        true => Some(consumer.committed_offsets(list, timeout).ok()?),
        false => None,
    };
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).ok()?;
        let from = match committed.as_ref().and_then(|c| c.find_partition(topic, p)) {
            Some(e) => match e.offset() {
                Offset::Offset(o) => o.max(low),
                _ => low,
            },
            None => low,
        };
        total += (high - from).max(0);
    }
    Some(total)
}

/// The consumer-lag gauges of this process.
fn lag() -> Vec<Lag> {
    crate::metrics::metrics()
        .registry
        .gather()
        .iter()
        .filter(|f| f.name() == "product_sync_consumer_lag")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| {
            let label = |name: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default()
            };
            Lag {
                topic: label("topic"),
                partition: label("partition"),
                lag: m.get_gauge().get_value() as i64,
            }
        })
        .collect()
}
