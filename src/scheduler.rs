//! The scheduler (DESIGN.md part 3, "Schedules and the watermark"): one instance of the group
//! at a time — the holder of the `scheduler` lease in the store — publishes each system's due
//! slots as ordinary commands on `topics.requests`; every instance keeps the watermark and
//! drift gauges fresh from the store.
//!
//! Guarantees, and the conditions they hold under:
//! - **A slot is published once.** A slot is recorded as handled only after the broker acked
//!   its command; a holder that dies in between leaves it to the next holder, which publishes
//!   the *same* request id again (`sched:<system>:<kind>:<slot>`), never a new one. The
//!   record is conditional (`slot < new slot`), so no holder, even one frozen and woken after
//!   its lease ran out, moves it backwards.
//! - **One holder.** A holder renews its lease every tick and publishes only while the lease
//!   it last renewed has time left ([`LEASE_MARGIN`] before its expiry), so a frozen holder
//!   stops before another can take over. Instances' clocks must agree to well within the
//!   margin (NTP): the lease's expiry is written with the holder's clock.
//! - **No pile-up, no flood.** Only the latest due slot of a kind is published (one catch-up
//!   after downtime); an incremental slot whose previous scheduled incremental has not
//!   finished is skipped and counted.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::producer::FutureRecord;

use crate::kafka::Publisher;
use rdkafka::util::Timeout;
use sea_orm::DatabaseConnection;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::command::{CommandWire, Mode, Selector, Since};
use crate::config::{ScheduleKind, ScheduleSettings, Settings};
use crate::metrics::{metrics, set_drift};
use crate::store::schedules::{self, SCHEDULER_LEASE, SlotRow};
use crate::store::{StoreError, requests};

/// How often the scheduler looks at the clock (and renews its lease).
pub const TICK: Duration = Duration::from_secs(1);
/// How long a lease lasts without renewal: another instance takes over within this (plus a
/// tick) after its holder dies.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// A holder stops publishing this long before its lease would run out.
pub const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// `requested_by` of every scheduled command.
pub const REQUESTED_BY: &str = "scheduler";

/// Failures of one scheduler round: all transient (the next tick tries again).
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing a scheduled command failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

impl SchedulerError {
    /// Both heal by themselves: the store comes back, the broker comes back.
    pub fn is_transient(&self) -> bool {
        true
    }
}

/// One system's schedule, as the scheduler needs it.
#[derive(Debug, Clone)]
pub struct SystemSchedule {
    pub system: String,
    pub schedule: ScheduleSettings,
    /// After this long a previous incremental still unfinished is taken as lost (its command
    /// removed from the topic, say) and the schedule goes on: every attempt's command timeout
    /// and every retry delay.
    pub give_up_after: Duration,
}

/// What every scheduled command's request id (and key on the request topic) starts with.
pub const REQUEST_ID_PREFIX: &str = "sched:";

/// The request id of a slot: `sched:<system>:<kind>:<slot as RFC 3339 UTC>`.
pub fn request_id(system: &str, kind: ScheduleKind, slot: DateTime<Utc>) -> String {
    let at = slot.to_rfc3339_opts(SecondsFormat::Secs, true);
    format!("{REQUEST_ID_PREFIX}{system}:{kind}:{at}")
}

/// The command a slot publishes (`watermark`: the system's, less its overlap, for an
/// incremental).
pub fn command_for(
    system: &SystemSchedule,
    kind: ScheduleKind,
    slot: DateTime<Utc>,
    watermark: Option<DateTime<Utc>>,
) -> CommandWire {
    let all = Selector {
        all: true,
        ..Selector::default()
    };
    let (selector, mode, dry_run) = match kind {
        ScheduleKind::Incremental => {
            let mut since = Selector {
                updated_since: Some(Since::Watermark),
                ..Selector::default()
            };
            since.resolve_watermark(watermark, system.schedule.watermark_overlap);
            (since, Mode::Incremental, false)
        }
        ScheduleKind::Snapshot => (all, Mode::Snapshot, false),
        ScheduleKind::Drift => (all, Mode::Snapshot, true),
    };
    CommandWire {
        request_id: request_id(&system.system, kind, slot),
        system: Some(system.system.clone()),
        selector,
        mode,
        dry_run,
        force: false,
        requested_by: Some(REQUESTED_BY.to_owned()),
    }
}

/// The schedules of every configured system that has one.
pub fn schedules_of(settings: &Settings) -> Vec<SystemSchedule> {
    let delays: Duration = settings.pipeline.retry_delays.iter().sum();
    let attempts = settings.pipeline.retry_delays.len() as u32 + 1;
    settings
        .all_systems()
        .filter(|u| !u.schedule.is_empty())
        .map(|u| SystemSchedule {
            system: u.system.clone(),
            schedule: u.schedule.clone(),
            give_up_after: u.command_timeout * attempts + delays,
        })
        .collect()
}

/// The scheduler of one instance.
pub struct Scheduler {
    db: DatabaseConnection,
    producer: Publisher,
    topic: String,
    holder: String,
    systems: Vec<SystemSchedule>,
    /// Until when the lease this instance last renewed lets it publish.
    publish_until: Option<Instant>,
}

impl Scheduler {
    pub fn new(
        settings: &Settings,
        db: DatabaseConnection,
        producer: Publisher,
        holder: String,
    ) -> Self {
        let systems = schedules_of(settings);
        for system in &systems {
            for kind in system.schedule.kinds() {
                metrics()
                    .schedules
                    .with_label_values(&[system.system.as_str(), kind.as_str()])
                    .set(1);
            }
            if let Some(every) = system.schedule.incremental_every {
                metrics()
                    .schedule_interval
                    .with_label_values(&[system.system.as_str()])
                    .set(i64::try_from(every.as_secs().max(1)).unwrap_or(i64::MAX));
            }
        }
        Scheduler {
            db,
            producer,
            topic: settings.topics.requests.clone(),
            holder,
            systems,
            publish_until: None,
        }
    }

    /// Ticks until `stop` fires, then gives the lease up (so another instance takes over at
    /// once, not after the lease's expiry).
    pub async fn run(mut self, stop: CancellationToken) {
        if self.systems.is_empty() {
            tracing::debug!("no schedule configured: the scheduler only keeps gauges fresh");
        }
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            if let Err(e) = self.refresh_gauges(Utc::now()).await {
                tracing::debug!(error = %e, "could not read the watermarks and drift checks");
            }
            if let Err(e) = self.tick(Utc::now()).await {
                tracing::warn!(error = %e, "scheduler round failed; trying again next tick");
            }
        }
        if self.publish_until.is_some() {
            let released = schedules::release_lease(&self.db, SCHEDULER_LEASE, &self.holder).await;
            if let Err(e) = released {
                tracing::warn!(error = %e, "could not give the scheduler lease up");
            }
        }
        metrics().scheduler_leader.set(0);
    }

    /// One round: renew or take the lease; while held, publish (or skip) every due slot.
    pub async fn tick(&mut self, now: DateTime<Utc>) -> Result<(), SchedulerError> {
        if self.systems.is_empty() {
            return Ok(());
        }
        let asked = Instant::now();
        let held =
            match schedules::take_lease(&self.db, SCHEDULER_LEASE, &self.holder, now, LEASE_TTL)
                .await
            {
                Ok(held) => held,
                Err(e) => {
                    self.lose_lease();
                    return Err(e.into());
                }
            };
        if !held {
            self.lose_lease();
            return Ok(());
        }
        if self.publish_until.is_none() {
            tracing::info!(holder = %self.holder, "this instance schedules now");
        }
        self.publish_until = Some(asked + LEASE_TTL - LEASE_MARGIN);
        metrics().scheduler_leader.set(1);
        let rows = schedules::slots(&self.db).await?;
        for system in self.systems.clone() {
            for kind in system.schedule.kinds() {
                let row = rows
                    .iter()
                    .find(|r| r.system == system.system && r.kind == kind.as_str());
                self.handle(&system, kind, row, now).await?;
            }
        }
        Ok(())
    }

    fn lose_lease(&mut self) {
        if self.publish_until.take().is_some() {
            tracing::info!("this instance no longer schedules (the lease moved on)");
        }
        metrics().scheduler_leader.set(0);
    }

    /// Publishes (or skips) the latest due slot of one system and kind, if it is new.
    async fn handle(
        &mut self,
        system: &SystemSchedule,
        kind: ScheduleKind,
        row: Option<&SlotRow>,
        now: DateTime<Utc>,
    ) -> Result<(), SchedulerError> {
        let Some(due) = system.schedule.slot_at_or_before(kind, now) else {
            return Ok(());
        };
        let name = system.system.as_str();
        let Some(row) = row else {
            // First sight of this schedule: an incremental is due at once (the copy starts
            // being kept fresh now); a cron kind waits for its next slot (no backfill).
            let start = match kind {
                ScheduleKind::Incremental => DateTime::<Utc>::UNIX_EPOCH,
                _ => due,
            };
            schedules::start_slots(&self.db, name, kind.as_str(), start).await?;
            if kind == ScheduleKind::Incremental {
                return self.publish(system, kind, due).await;
            }
            return Ok(());
        };
        if due <= row.slot {
            return Ok(());
        }
        if kind == ScheduleKind::Incremental && self.still_running(system, row, now).await? {
            if schedules::slot_skipped(&self.db, name, kind.as_str(), due).await? {
                metrics()
                    .schedule_runs
                    .with_label_values(&[name, kind.as_str(), "skipped"])
                    .inc();
                tracing::info!(
                    system = name,
                    slot = %due,
                    previous = row.request_id.as_deref().unwrap_or(""),
                    "incremental slot skipped: the previous one has not finished"
                );
            }
            return Ok(());
        }
        self.publish(system, kind, due).await
    }

    /// Whether the previous scheduled incremental of `row` has not finished yet (and is not
    /// so old that it must be lost).
    async fn still_running(
        &self,
        system: &SystemSchedule,
        row: &SlotRow,
        now: DateTime<Utc>,
    ) -> Result<bool, SchedulerError> {
        let (Some(previous), Some(published_at)) = (&row.request_id, row.published_at) else {
            return Ok(false);
        };
        let give_up = chrono::Duration::from_std(system.give_up_after).unwrap_or_default();
        if now - published_at > give_up {
            tracing::warn!(
                system = %system.system,
                previous,
                "the previous scheduled incremental never finished; scheduling on"
            );
            return Ok(false);
        }
        let finished = requests::find(&self.db, previous).await?.is_some_and(|r| {
            r.status == requests::Status::Completed.as_str()
                || r.status == requests::Status::Failed.as_str()
        });
        Ok(!finished)
    }

    /// Publishes the command of one slot and records it, while the lease lets this instance.
    async fn publish(
        &mut self,
        system: &SystemSchedule,
        kind: ScheduleKind,
        slot: DateTime<Utc>,
    ) -> Result<(), SchedulerError> {
        let name = system.system.as_str();
        let watermark = match kind {
            ScheduleKind::Incremental => schedules::watermark(&self.db, name).await?,
            _ => None,
        };
        let wire = command_for(system, kind, slot, watermark);
        if self
            .publish_until
            .is_none_or(|until| Instant::now() >= until)
        {
            tracing::info!(system = name, "lease too close to its end: not publishing");
            return Ok(());
        }
        let payload = serde_json::to_vec(&wire).unwrap_or_default();
        let record = FutureRecord::to(&self.topic)
            .key(&wire.request_id)
            .payload(&payload);
        self.producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map_err(|(e, _)| SchedulerError::Kafka(e))?;
        let now = Utc::now();
        schedules::slot_published(&self.db, name, kind.as_str(), slot, &wire.request_id, now)
            .await?;
        metrics()
            .schedule_runs
            .with_label_values(&[name, kind.as_str(), "published"])
            .inc();
        tracing::info!(system = name, request_id = %wire.request_id, "scheduled command published");
        Ok(())
    }

    /// Every instance: the watermark ages and the last drift checks' findings, from the store
    /// (so the gauges agree whichever instance ran the commands).
    async fn refresh_gauges(&self, now: DateTime<Utc>) -> Result<(), SchedulerError> {
        for state in schedules::system_states(&self.db).await? {
            if let Some(confirmed) = state.watermark_confirmed_at {
                let age = (now - confirmed).num_seconds().max(0);
                metrics()
                    .watermark_age
                    .with_label_values(&[state.system.as_str()])
                    .set(age);
            }
            if let Some(d) = &state.drift {
                set_drift(&state.system, d.counts());
            }
        }
        Ok(())
    }
}

/// What `product-sync schedule`, `/api/v1/overview` and the console show of the schedules.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScheduleOverview {
    /// The instance holding the scheduler lease, while its lease is live.
    pub holder: Option<String>,
    /// When that lease runs out unless renewed.
    pub holder_until: Option<DateTime<Utc>>,
    pub systems: Vec<SystemOverview>,
}

/// One system's schedules, watermark and last drift check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SystemOverview {
    pub system: String,
    pub timezone: String,
    pub watermark_overlap_ms: u64,
    pub watermark: Option<DateTime<Utc>>,
    pub watermark_confirmed_at: Option<DateTime<Utc>>,
    pub schedules: Vec<KindOverview>,
    /// The last drift check's findings.
    pub drift: Option<schedules::DriftFound>,
}

/// One kind of scheduled work of a system.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KindOverview {
    pub kind: &'static str,
    /// `every 300000 ms`, or the cron expression.
    pub schedule: String,
    pub next_slot: Option<DateTime<Utc>>,
    /// The last slot handled (published or skipped) and the last request id published.
    pub last_slot: Option<DateTime<Utc>>,
    pub last_request_id: Option<String>,
    pub last_published_at: Option<DateTime<Utc>>,
    pub skipped: i64,
}

/// Reads the schedules' state for people.
pub async fn overview(
    settings: &Settings,
    db: &DatabaseConnection,
    now: DateTime<Utc>,
) -> Result<ScheduleOverview, StoreError> {
    let lease = schedules::lease(db, SCHEDULER_LEASE).await?;
    let (holder, holder_until) = match lease {
        Some((h, until)) if until > now => (Some(h), Some(until)),
        _ => (None, None),
    };
    let rows = schedules::slots(db).await?;
    let states = schedules::system_states(db).await?;
    let systems = settings
        .all_systems()
        .map(|u| {
            let name = u.system.as_str();
            let state = states.iter().find(|s| s.system == name);
            let schedules = u
                .schedule
                .kinds()
                .map(|kind| {
                    let row = rows
                        .iter()
                        .find(|r| r.system == name && r.kind == kind.as_str());
                    let schedule = match kind {
                        ScheduleKind::Incremental => format!(
                            "every {} ms",
                            u.schedule.incremental_every.unwrap_or_default().as_millis()
                        ),
                        ScheduleKind::Snapshot => cron_text(&u.schedule.snapshot_cron),
                        ScheduleKind::Drift => cron_text(&u.schedule.drift_check_cron),
                    };
                    KindOverview {
                        kind: kind.as_str(),
                        schedule,
                        next_slot: u.schedule.slot_after(kind, now),
                        last_slot: row.map(|r| r.slot).filter(|s| s.timestamp() > 0),
                        last_request_id: row.and_then(|r| r.request_id.clone()),
                        last_published_at: row.and_then(|r| r.published_at),
                        skipped: row.map_or(0, |r| r.skipped),
                    }
                })
                .collect();
            SystemOverview {
                system: name.to_owned(),
                timezone: u.schedule.timezone.name().to_owned(),
                watermark_overlap_ms: u.schedule.watermark_overlap.as_millis() as u64,
                watermark: state.and_then(|s| s.watermark),
                watermark_confirmed_at: state.and_then(|s| s.watermark_confirmed_at),
                schedules,
                drift: state.and_then(|s| s.drift.clone()),
            }
        })
        .collect();
    Ok(ScheduleOverview {
        holder,
        holder_until,
        systems,
    })
}

/// The overview as text for people (`product-sync schedule`).
pub fn render_overview(view: &ScheduleOverview) -> String {
    use std::fmt::Write;
    let t = |t: Option<DateTime<Utc>>| {
        t.map_or_else(
            || "-".to_owned(),
            |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
        )
    };
    let mut out = String::new();
    let holder = match (&view.holder, view.holder_until) {
        (Some(h), until) => format!("{h} (lease until {})", t(until)),
        _ => "none (no instance holds the scheduler lease)".to_owned(),
    };
    let _ = writeln!(out, "scheduler holder: {holder}");
    for s in &view.systems {
        let _ = writeln!(out, "system {}  (timezone {})", s.system, s.timezone);
        let _ = writeln!(
            out,
            "  watermark: {}  confirmed: {}  overlap: {} ms",
            t(s.watermark),
            t(s.watermark_confirmed_at),
            s.watermark_overlap_ms
        );
        if s.schedules.is_empty() {
            let _ = writeln!(out, "  no schedule");
        }
        for k in &s.schedules {
            let _ = writeln!(
                out,
                "  {:<11} {:<22} next {}  last {}  {}  skipped {}",
                k.kind,
                k.schedule,
                t(k.next_slot),
                t(k.last_slot),
                k.last_request_id.as_deref().unwrap_or("-"),
                k.skipped
            );
        }
        if let Some(d) = &s.drift {
            let _ = writeln!(
                out,
                "  last drift check {} at {}: created {} updated {} delisted {} relisted {}",
                d.request_id,
                t(Some(d.checked_at)),
                d.created,
                d.updated,
                d.delisted,
                d.relisted
            );
        }
    }
    out
}

fn cron_text(cron: &Option<crate::config::CronSpec>) -> String {
    cron.as_ref()
        .map_or_else(String::new, |c| format!("cron {}", c.source()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system() -> SystemSchedule {
        SystemSchedule {
            system: "wms".into(),
            schedule: ScheduleSettings {
                watermark_overlap: Duration::from_secs(120),
                ..ScheduleSettings::default()
            },
            give_up_after: Duration::from_secs(3600),
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_slot_names_its_system_kind_and_time() {
        let slot = at("2026-12-01T08:05:00Z");
        assert_eq!(
            request_id("wms", ScheduleKind::Incremental, slot),
            "sched:wms:incremental:2026-12-01T08:05:00Z"
        );
        // A request id the command validation accepts.
        let wire = command_for(&system(), ScheduleKind::Drift, slot, None);
        let cmd = crate::command::Command::validate(wire, "wms").unwrap();
        assert!(cmd.is_drift_check());
        assert_eq!(cmd.requested_by(), Some(REQUESTED_BY));
    }

    #[test]
    fn an_incremental_asks_from_the_watermark_less_the_overlap_or_for_everything() {
        let slot = at("2026-12-01T08:05:00Z");
        let first = command_for(&system(), ScheduleKind::Incremental, slot, None);
        assert!(first.selector.all);
        let w = at("2026-12-01T08:00:00Z");
        let next = command_for(&system(), ScheduleKind::Incremental, slot, Some(w));
        assert_eq!(
            next.selector.updated_since,
            Some(Since::At(at("2026-12-01T07:58:00Z")))
        );
        let cmd = crate::command::Command::validate(next, "wms").unwrap();
        assert!(cmd.moves_watermark());
        let snap = command_for(&system(), ScheduleKind::Snapshot, slot, Some(w));
        assert_eq!(snap.mode, Mode::Snapshot);
        assert!(snap.selector.all && !snap.dry_run);
    }
}
