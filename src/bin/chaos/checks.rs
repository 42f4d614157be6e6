//! The chaos run's checks, once the system has drained: the store against the truth, the
//! change topic (doubles, gaps, rebuilding the store from it), bad and hostile commands,
//! stalled partitions, and secrets in the logs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use product_sync::command::Selector;
use product_sync::kafka::{client_config, header_text as header};
use product_sync::product::{Identity, Product};
use product_sync::store::fold::load_all;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use serde_json::Value;

use crate::world::World;
use crate::{SECRET, json_of, read_all, selectors, with_status};

/// What the run sent.
pub struct Sent<'a> {
    /// Request ids of the well-formed commands.
    pub good: &'a [String],
    /// Keys of the malformed commands.
    pub bad: &'a [String],
    /// Request ids of the commands aimed at a hostile management system.
    pub hostile: &'a [String],
}

/// The figures of the result line.
pub struct Verdict {
    pub products: usize,
    pub events: usize,
    pub lost: usize,
    pub doubled: usize,
    pub gaps: usize,
    pub stalled: usize,
    pub leaked_secrets: usize,
}

impl Verdict {
    pub async fn of(world: &World, sent: &Sent<'_>, results: &[Value]) -> anyhow::Result<Self> {
        let settings = &world.settings;
        let db = Database::connect(world.db_url.to_string()).await?;
        let stored: BTreeMap<Identity, (Product, i64)> = load_all(&db, "wms")
            .await?
            .into_iter()
            .map(|(i, p, r)| (i, (p, r)))
            .collect();
        let completed = with_status(results, &["completed"]);
        let mut lost = missing_from_store(world, &stored)?
            + sent
                .good
                .iter()
                .filter(|id| !completed.contains(id.as_str()))
                .count()
            + unpublished(&db).await?;
        let events = read_all(settings, &settings.topics.changes)?;
        let topic = ChangeTopic::read(&events);
        let (gaps, not_rebuilt) = topic.check(&stored);
        lost += not_rebuilt + bad_not_dead_lettered(world, sent, results)?;
        let ended = with_status(results, &["failed", "completed"]);
        let unended_hostile = sent
            .hostile
            .iter()
            .filter(|id| !ended.contains(id.as_str()))
            .count();
        Ok(Verdict {
            products: stored.len(),
            events: events.len(),
            lost,
            doubled: topic.doubled,
            gaps,
            stalled: stalled_partitions(world)? + unended_hostile,
            leaked_secrets: leaked_secrets(world)?,
        })
    }

    pub fn passed(&self) -> bool {
        self.lost + self.doubled + self.gaps + self.stalled + self.leaked_secrets == 0
    }
}

/// Products of the final truth (every selector against the final catalogue) that the store
/// does not hold as they are.
fn missing_from_store(
    world: &World,
    stored: &BTreeMap<Identity, (Product, i64)>,
) -> anyhow::Result<usize> {
    let catalogue = world.sim.catalogue();
    let mut truth: BTreeMap<Identity, Product> = BTreeMap::new();
    for s in selectors() {
        let selector: Selector = serde_json::from_value(s)?;
        truth.extend(
            catalogue
                .select(&selector)
                .map(|p| (p.identity(), p.clone())),
        );
    }
    Ok(truth
        .iter()
        .filter(|(i, p)| stored.get(*i).map(|(s, _)| s) != Some(*p))
        .count())
}

/// Rows still in the relay's queue.
async fn unpublished(db: &DatabaseConnection) -> anyhow::Result<usize> {
    let n = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT COUNT(*) AS n FROM outbox_pending",
        ))
        .await?
        .and_then(|r| r.try_get::<i64>("", "n").ok())
        .unwrap_or(-1);
    Ok(usize::try_from(n).unwrap_or(1))
}

/// The change topic, by product key and revision (`changed_at` left out of comparisons).
struct ChangeTopic {
    by_product: BTreeMap<String, BTreeMap<i64, (String, Value)>>,
    /// Repeats of a revision that differ from its first publication.
    doubled: usize,
}

impl ChangeTopic {
    fn read(events: &[OwnedMessage]) -> Self {
        let mut by_product: BTreeMap<String, BTreeMap<i64, (String, Value)>> = BTreeMap::new();
        let mut doubled = 0;
        for m in events {
            let mut e = json_of(m);
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let revision = e["revision"].as_i64().unwrap_or(-1);
            let ce_id = header(m, product_sync::wire::headers::CE_ID).unwrap_or_default();
            if let Some(o) = e.as_object_mut() {
                o.remove("changed_at");
            }
            match by_product.entry(key).or_default().entry(revision) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert((ce_id, e));
                }
                std::collections::btree_map::Entry::Occupied(o) => {
                    if o.get().0 != ce_id || o.get().1 != e {
                        doubled += 1;
                    }
                }
            }
        }
        ChangeTopic {
            by_product,
            doubled,
        }
    }

    /// Products whose revisions are not exactly 1..=stored, and products the topic does not
    /// rebuild (the last revision's `after` is the stored row).
    fn check(&self, stored: &BTreeMap<Identity, (Product, i64)>) -> (usize, usize) {
        let (mut gaps, mut not_rebuilt) = (0, 0);
        for (identity, (product, revision)) in stored {
            let key = format!("wms/{}", identity.event_key());
            let published = self.by_product.get(&key);
            let revisions: Vec<i64> = published
                .map(|r| r.keys().copied().collect())
                .unwrap_or_default();
            if revisions != (1..=*revision).collect::<Vec<_>>() {
                gaps += 1;
            }
            let rebuilt = published
                .and_then(|r| r.values().next_back())
                .and_then(|(_, e)| Product::from_json(&e["after"]).ok());
            if rebuilt.as_ref() != Some(product) {
                not_rebuilt += 1;
            }
        }
        (gaps, not_rebuilt)
    }
}

/// Bad commands missing from the DLQ (with a reason), plus missing `rejected` results.
fn bad_not_dead_lettered(
    world: &World,
    sent: &Sent<'_>,
    results: &[Value],
) -> anyhow::Result<usize> {
    let settings = &world.settings;
    let dlq = read_all(settings, &settings.topics.dlq)?;
    let dlq_keys: BTreeSet<String> = dlq
        .iter()
        .filter(|m| header(m, product_sync::wire::dlq::REASON).is_some_and(|r| !r.is_empty()))
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
        .collect();
    let rejected = results.iter().filter(|r| r["status"] == "rejected").count();
    Ok(sent.bad.iter().filter(|k| !dlq_keys.contains(*k)).count()
        + sent.bad.len().saturating_sub(rejected))
}

/// Partitions whose committed offset is behind their end.
fn stalled_partitions(world: &World) -> anyhow::Result<usize> {
    let settings = &world.settings;
    let topic = &settings.topics.requests;
    let consumer: BaseConsumer = client_config(&settings.kafka)
        .set("group.id", &settings.kafka.group_id)
        .create()?;
    let mut stalled = 0;
    for p in 0..12 {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        let mut list = TopicPartitionList::new();
        list.add_partition(topic, p);
        let committed = match consumer
            .committed_offsets(list, Duration::from_secs(10))?
            .find_partition(topic, p)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        if committed < high {
            stalled += 1;
        }
    }
    Ok(stalled)
}

/// The client secret and every token ever issued, counted in the logs of every process.
fn leaked_secrets(world: &World) -> anyhow::Result<usize> {
    let mut needles: Vec<String> = world.sim.issued_tokens();
    needles.push(SECRET.to_owned());
    let mut leaked = 0;
    for entry in std::fs::read_dir(&world.dir)? {
        let text = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        leaked += needles.iter().filter(|n| text.contains(n.as_str())).count();
    }
    Ok(leaked)
}
