//! The chaos run's checks, once the system has drained: the store against the truth, the
//! change topic (doubles, gaps, rebuilding the store from it), bad and hostile commands,
//! stalled partitions, and secrets in the logs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use product_sync::audit::Audit;
use product_sync::command::Selector;
use product_sync::config::Settings;
use product_sync::kafka::{client_config, header_text as header};
use product_sync::product::{Identity, Product};
use product_sync::scheduler;
use product_sync::store::fold::load_all;
use product_sync::wire::dlq as dlqh;
use rdkafka::Message;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::{Headers, OwnedMessage};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use serde_json::Value;

use crate::stalls::position;
use crate::world::World;
use crate::{FUND_SECRET, PARTITIONS, SECRET, json_of, read_all, selectors, with_status};

/// A system's stored products with their revisions.
type Stored = BTreeMap<Identity, (Product, i64)>;

/// What the run sent.
pub struct Sent<'a> {
    /// Request ids of the well-formed commands.
    pub good: &'a [String],
    /// Keys of the malformed commands.
    pub bad: &'a [String],
    /// Request ids of the commands aimed at a hostile management system.
    pub hostile: &'a [String],
    /// Identity keys of the products withdrawn upstream (never offered again).
    pub withdrawn: &'a [String],
    /// Each (system, code) a notification named, and the keys of the bad notifications.
    pub notified: &'a [(String, String)],
    pub bad_notifications: &'a [String],
}

/// The figures of the result line (the run's own counts are added by `main`).
pub struct Verdict {
    pub products: usize,
    /// Of which the second system's.
    pub fund_products: usize,
    pub events: usize,
    /// Products not as the truth has them (either way), good commands without a completed
    /// result, rows left unpublished, products the change topic does not rebuild, bad commands
    /// without their DLQ record or their own `rejected` result.
    pub lost: usize,
    /// `lost` by its parts (name, count), the non-zero ones, for the run's diagnosis.
    pub lost_parts: Vec<(&'static str, usize)>,
    pub doubled: usize,
    pub out_of_order: usize,
    /// Identical re-publications seen by a read_committed reader: a failure with
    /// `pipeline.exactly_once` (the default), allowed and only reported without it.
    pub repeats: usize,
    /// Whether the instances ran the transactional relay.
    pub exactly_once: bool,
    pub gaps: usize,
    pub stalled: usize,
    pub leaked_secrets: usize,
    /// Products withdrawn upstream during the run, and `delisted` events.
    pub withdrawn: usize,
    pub delisted: usize,
    /// `delisted` events of products the management system still offered.
    pub wrongly_delisted: usize,
    /// Commands made from notifications (distinct request ids).
    pub notification_commands: usize,
    /// The first problems of the change topic, described.
    pub problems: Vec<String>,
}

impl Verdict {
    pub async fn of(
        world: &World,
        sent: &Sent<'_>,
        results: &[OwnedMessage],
    ) -> anyhow::Result<Self> {
        let settings = &world.settings;
        let db = Database::connect(world.db_url.to_string()).await?;
        let (stored, fund) = (stored_of(&db, "wms").await?, stored_of(&db, "fund").await?);
        let values: Vec<Value> = results.iter().map(json_of).collect();
        let completed = with_status(&values, &["completed"]);
        let fund_truth = truth_of(&world.fund);
        let unended_good = sent
            .good
            .iter()
            .filter(|id| !completed.contains(id.as_str()))
            .count();
        let events = read_all(settings, &settings.topics.changes)?;
        let audit = Audit::of(&events);
        let keys = [("wms", &stored), ("fund", &fund)]
            .into_iter()
            .flat_map(|(system, rows)| {
                rows.iter().map(move |(identity, (_, revision))| {
                    (format!("{system}/{}", identity.event_key()), *revision)
                })
            });
        let gaps = audit.gaps(keys);
        let dlq = read_all(settings, &settings.topics.dlq)?;
        let asked = notification_commands(settings)?;
        let parts = [
            ("store_not_truth", not_the_truth(world, &stored)?),
            ("fund_not_truth", differ(&fund_truth, &fund)),
            ("good_commands_not_completed", unended_good),
            ("rows_unpublished", unpublished(&db).await?),
            (
                "changes_not_rebuilding",
                not_rebuilt(&audit, "wms", &stored) + not_rebuilt(&audit, "fund", &fund),
            ),
            (
                "state_not_rebuilding",
                state_not_rebuilt(settings, &[("wms", &stored), ("fund", &fund)])?,
            ),
            ("bad_not_rejected", bad_not_rejected(sent, &dlq, results)),
            ("notified_not_asked", not_asked(sent, &asked)),
            (
                "bad_notifications_not_refused",
                bad_notifications_not_refused(settings, sent, &dlq),
            ),
        ];
        let lost = parts.iter().map(|(_, n)| n).sum();
        let lost_parts = parts.into_iter().filter(|(_, n)| *n > 0).collect();
        let (withdrawn, delisted, wrongly_delisted) = delistings(sent, &events);
        let ended = with_status(&values, &["failed", "completed"]);
        let unended_hostile = sent
            .hostile
            .iter()
            .filter(|id| !ended.contains(id.as_str()))
            .count();
        Ok(Verdict {
            products: stored.len() + fund.len(),
            fund_products: fund.len(),
            events: events.len(),
            lost,
            lost_parts,
            doubled: audit.doubled,
            out_of_order: audit.out_of_order,
            repeats: audit.repeats,
            exactly_once: settings.pipeline.exactly_once,
            gaps,
            stalled: stalled_partitions(world, &settings.topics.requests)?
                + stalled_partitions(world, &settings.topics.notifications)?
                + unended_hostile,
            leaked_secrets: leaked_secrets(world, &[results, &dlq])?,
            withdrawn,
            delisted,
            wrongly_delisted,
            notification_commands: asked.len(),
            problems: audit.problems,
        })
    }

    pub fn passed(&self) -> bool {
        self.lost
            + self.doubled
            + self.out_of_order
            + self.gaps
            + self.stalled
            + self.leaked_secrets
            + self.wrongly_delisted
            + if self.exactly_once { self.repeats } else { 0 }
            == 0
    }
}

/// Waits, up to `within`, for what the instances still owe once every good command has
/// completed: the queued rows published (a command's result may land before the change
/// events of its other shards) and every notified code asked for by a command. Whatever is
/// still owed then counts as lost in the verdict.
pub async fn settle(world: &World, sent: &Sent<'_>, within: Duration) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let deadline = started + within;
    let db = Database::connect(world.db_url.to_string()).await?;
    loop {
        let queued = unpublished(&db).await?;
        let past = std::time::Instant::now() > deadline;
        // The request topic is read whole: only once the queue is empty, or at the end.
        if queued == 0 || past {
            let missing = unasked(sent, &notification_commands(&world.settings)?);
            let unasked = missing.len();
            if queued + unasked == 0 {
                if started.elapsed() >= Duration::from_secs(2) {
                    eprintln!(
                        "chaos: the instances settled {} s after the drain",
                        started.elapsed().as_secs()
                    );
                }
                return Ok(());
            }
            if past {
                eprintln!(
                    "chaos: still owed after the drain: {queued} queued row(s), {unasked} notified code(s) not asked for{}",
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!(" (first: {:?})", &missing[..missing.len().min(10)])
                    }
                );
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A simulated system's whole catalogue, by identity.
fn truth_of(sim: &product_sync::sim::Sim) -> BTreeMap<Identity, Product> {
    sim.catalogue()
        .products()
        .iter()
        .map(|p| (p.identity(), p.clone()))
        .collect()
}

/// Products withdrawn upstream, `delisted` events, and those of products still offered.
fn delistings(sent: &Sent<'_>, events: &[OwnedMessage]) -> (usize, usize, usize) {
    let withdrawn: BTreeSet<String> = sent
        .withdrawn
        .iter()
        .map(|k| format!("wms/{}", k.strip_prefix("code:").unwrap_or(k)))
        .collect();
    let delisted: Vec<String> = events
        .iter()
        .filter(|m| json_of(m)["op"] == "delisted")
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
        .collect();
    let wrongly = delisted.iter().filter(|k| !withdrawn.contains(*k)).count();
    (withdrawn.len(), delisted.len(), wrongly)
}

/// Products of the final truth (every selector against the final catalogue) that the store
/// does not hold as they are, and stored products the truth does not have.
fn not_the_truth(
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
    Ok(differ(&truth, stored))
}

/// One system's stored products.
async fn stored_of(db: &DatabaseConnection, system: &str) -> anyhow::Result<Stored> {
    Ok(load_all(db, system)
        .await?
        .into_iter()
        .map(|(i, p, r)| (i, (p, r)))
        .collect())
}

/// Products of `truth` the store does not hold as they are, and stored products it lacks.
fn differ(
    truth: &BTreeMap<Identity, Product>,
    stored: &BTreeMap<Identity, (Product, i64)>,
) -> usize {
    let missing = truth
        .iter()
        .filter(|(i, p)| stored.get(*i).map(|(s, _)| s) != Some(*p))
        .count();
    let extra = stored.keys().filter(|i| !truth.contains_key(*i)).count();
    missing + extra
}

/// The rows still in the relay's queue (a connection of its own).
pub async fn queued(world: &World) -> anyhow::Result<usize> {
    unpublished(&Database::connect(world.db_url.to_string()).await?).await
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

/// Stored products the change topic does not rebuild: the last revision's `after` is the row.
fn not_rebuilt(audit: &Audit, system: &str, stored: &BTreeMap<Identity, (Product, i64)>) -> usize {
    stored
        .iter()
        .filter(|(identity, (product, _))| {
            let key = format!("{system}/{}", identity.event_key());
            let rebuilt = audit
                .last
                .get(&key)
                .and_then(|(_, after)| Product::from_json(after).ok());
            rebuilt.as_ref() != Some(product)
        })
        .count()
}

/// Stored products the state topic alone does not rebuild (last record per key in offset
/// order, a tombstone removing it), and keys it holds that the store does not list.
fn state_not_rebuilt(settings: &Settings, systems: &[(&str, &Stored)]) -> anyhow::Result<usize> {
    let mut records = read_all(settings, &settings.topics.state)?;
    records.sort_by_key(|m| (m.partition(), m.offset()));
    let mut state: BTreeMap<String, Value> = BTreeMap::new();
    for m in &records {
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        match m.payload() {
            None => state.remove(&key),
            Some(_) => state.insert(key, json_of(m)),
        };
    }
    let mut wrong = 0;
    for (system, stored) in systems {
        wrong += stored
            .iter()
            .filter(|(identity, (product, revision))| {
                let v = state.remove(&format!("{system}/{}", identity.event_key()));
                v.is_none_or(|v| {
                    v["revision"] != *revision
                        || Product::from_json(&v["product"]).ok().as_ref() != Some(product)
                })
            })
            .count();
    }
    Ok(wrong + state.len())
}

/// Bad commands without a DLQ record (with a reason), or without a `rejected` result of their
/// own: matched per command through the DLQ record's original position, which the result's
/// CloudEvents id names.
fn bad_not_rejected(sent: &Sent<'_>, dlq: &[OwnedMessage], results: &[OwnedMessage]) -> usize {
    let rejected_at: BTreeSet<String> = results
        .iter()
        .filter_map(|m| header(m, product_sync::wire::headers::CE_ID))
        .filter_map(|id| id.split_once(":rejected:").map(|(_, at)| at.to_owned()))
        .collect();
    let mut positions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in dlq {
        if header(m, dlqh::REASON).is_none_or(|r| r.is_empty()) {
            continue;
        }
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let at = format!(
            "{}:{}:{}",
            header(m, dlqh::ORIGINAL_TOPIC).unwrap_or_default(),
            header(m, dlqh::ORIGINAL_PARTITION).unwrap_or_default(),
            header(m, dlqh::ORIGINAL_OFFSET).unwrap_or_default()
        );
        positions.entry(key).or_default().push(at);
    }
    sent.bad
        .iter()
        .filter(|key| {
            !positions
                .get(*key)
                .is_some_and(|at| at.iter().any(|a| rejected_at.contains(a)))
        })
        .count()
}

/// The commands made from notifications: request id → (system, codes asked).
fn notification_commands(
    settings: &Settings,
) -> anyhow::Result<BTreeMap<String, (String, Vec<String>)>> {
    Ok(read_all(settings, &settings.topics.requests)?
        .iter()
        .map(json_of)
        .filter_map(|c| {
            let id = c["request_id"].as_str()?.to_owned();
            let system = c["system"].as_str()?.to_owned();
            let codes = c["selector"]["product_codes"]
                .as_array()?
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            id.starts_with("notif:").then_some((id, (system, codes)))
        })
        .collect())
}

/// Notified codes that no command made from notifications asked for (a lost notification).
fn not_asked(sent: &Sent<'_>, asked: &BTreeMap<String, (String, Vec<String>)>) -> usize {
    unasked(sent, asked).len()
}

/// The notified `(system, code)`s no command made from notifications asked for.
fn unasked<'a>(
    sent: &'a Sent<'_>,
    asked: &BTreeMap<String, (String, Vec<String>)>,
) -> Vec<(&'a str, &'a str)> {
    let asked: BTreeSet<(&str, &str)> = asked
        .values()
        .flat_map(|(system, codes)| codes.iter().map(move |c| (system.as_str(), c.as_str())))
        .collect();
    let notified: BTreeSet<(&str, &str)> = sent
        .notified
        .iter()
        .map(|(s, c)| (s.as_str(), c.as_str()))
        .collect();
    notified
        .into_iter()
        .filter(|pair| !asked.contains(pair))
        .collect()
}

/// Bad notifications without a DLQ record that names the notification topic and a reason.
fn bad_notifications_not_refused(
    settings: &Settings,
    sent: &Sent<'_>,
    dlq: &[OwnedMessage],
) -> usize {
    let refused: BTreeSet<String> = dlq
        .iter()
        .filter(|m| {
            header(m, dlqh::ORIGINAL_TOPIC).as_deref()
                == Some(settings.topics.notifications.as_str())
                && header(m, dlqh::REASON).is_some_and(|r| !r.is_empty())
        })
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
        .collect();
    sent.bad_notifications
        .iter()
        .filter(|k| !refused.contains(*k))
        .count()
}

/// Partitions of `topic` whose committed offset is behind their end, unless only scheduled
/// commands wait there: the instances' schedules keep publishing while the run stops them one
/// by one, and a command published to a partition its stopping holder had just given up waits,
/// durably, for the next instance (as queue rows left after the settle do).
fn stalled_partitions(world: &World, topic: &str) -> anyhow::Result<usize> {
    let settings = &world.settings;
    let consumer: BaseConsumer = client_config(&settings.kafka)
        .set("group.id", &settings.kafka.group_id)
        .create()?;
    let mut behind = Vec::new();
    for p in 0..PARTITIONS {
        let (committed, high) = position(&consumer, topic, p, Duration::from_secs(10))?;
        if committed < high {
            behind.push((p, committed));
        }
    }
    if behind.is_empty() {
        return Ok(0);
    }
    let records = read_all(settings, topic)?;
    Ok(behind
        .into_iter()
        .filter(|&(p, committed)| waits_beyond_schedules(&records, p, committed))
        .count())
}

/// Whether a record of `partition` at or after `committed` is anything but a scheduled command.
fn waits_beyond_schedules(records: &[OwnedMessage], partition: i32, committed: i64) -> bool {
    records
        .iter()
        .filter(|m| m.partition() == partition && m.offset() >= committed)
        .any(|m| {
            !m.key()
                .is_some_and(|k| k.starts_with(scheduler::REQUEST_ID_PREFIX.as_bytes()))
        })
}

/// The client secret and every token ever issued, searched as raw bytes in the log of every
/// process and in every record of the given topics (payloads, keys and headers).
fn leaked_secrets(world: &World, topics: &[&[OwnedMessage]]) -> anyhow::Result<usize> {
    let mut needles: Vec<String> = world.sim.issued_tokens();
    needles.extend(world.fund.issued_tokens());
    needles.push(SECRET.to_owned());
    needles.push(FUND_SECRET.to_owned());
    let count = |haystack: &[u8]| {
        needles
            .iter()
            .filter(|n| haystack.windows(n.len()).any(|w| w == n.as_bytes()))
            .count()
    };
    let mut leaked = 0;
    for entry in std::fs::read_dir(&world.dir)? {
        leaked += count(&std::fs::read(entry?.path())?);
    }
    for m in topics.iter().flat_map(|t| t.iter()) {
        leaked += count(m.payload().unwrap_or_default()) + count(m.key().unwrap_or_default());
        if let Some(headers) = m.headers() {
            leaked += headers
                .iter()
                .map(|h| count(h.value.unwrap_or_default()))
                .sum::<usize>();
        }
    }
    Ok(leaked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    fn command(partition: i32, offset: i64, key: &str) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(key.as_bytes().to_vec()),
            "requests".to_owned(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn only_scheduled_commands_waiting_is_not_a_stall() {
        let records = [
            command(0, 40, "chaos-7"),
            command(0, 41, "sched:wms:incremental:2026-12-07T15:39:25Z"),
            command(1, 10, "sched:fund:drift:2026-12-07T15:39:30Z"),
            command(1, 11, "chaos-9"),
        ];
        // Partition 0 from 41: a scheduled command only.
        assert!(!waits_beyond_schedules(&records, 0, 41));
        // From 40 a run's own command waits too.
        assert!(waits_beyond_schedules(&records, 0, 40));
        // Partition 1: a run's command after a scheduled one.
        assert!(waits_beyond_schedules(&records, 1, 10));
        assert!(!waits_beyond_schedules(&records, 1, 12));
    }
}
