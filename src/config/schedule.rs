//! `[upstream.schedule]` (and `[upstream.systems.<name>.schedule]`): when each system's
//! incremental syncs, snapshots and drift checks are due, and the slot arithmetic they share.
//!
//! Slots are points in time every instance computes alike, so a request id made of one names
//! the same slot on every instance: an incremental slot is a multiple of `incremental_every_ms`
//! since the Unix epoch (UTC); a cron slot is a time the expression matches in `timezone`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Deserializer};

/// The kinds of scheduled work, as they appear in request ids and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScheduleKind {
    /// `{"updated_since": watermark − overlap}` (or `{"all": true}` before the first one).
    Incremental,
    /// `{"all": true}` in snapshot mode: delists what the system no longer has.
    Snapshot,
    /// `{"all": true}` snapshot with `dry_run`: reports drift, writes nothing.
    Drift,
}

impl ScheduleKind {
    /// Every kind, in the order they are shown.
    pub const ALL: [ScheduleKind; 3] = [Self::Incremental, Self::Snapshot, Self::Drift];

    /// The name in request ids, metrics and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Incremental => "incremental",
            Self::Snapshot => "snapshot",
            Self::Drift => "drift",
        }
    }

    /// The kind a name stands for.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed 6-field cron expression (sec min hour day month weekday).
#[derive(Clone)]
pub struct CronSpec(cron::Schedule);

impl CronSpec {
    /// The expression as written.
    pub fn source(&self) -> &str {
        self.0.source()
    }
}

impl fmt::Debug for CronSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source())
    }
}

impl FromStr for CronSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let quoted = quote(text);
        let fields = text.split_whitespace().count();
        if fields != 6 {
            return Err(format!(
                "{quoted} has {fields} fields: a schedule is 6 fields, \
                 sec min hour day month weekday (e.g. \"0 0 2 * * *\")"
            ));
        }
        cron::Schedule::from_str(text)
            .map(CronSpec)
            .map_err(|e| format!("{quoted} is not a cron expression: {e}"))
    }
}

/// One system's schedule. Everything absent means nothing is scheduled for that system.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    /// An incremental sync of the whole system this often (`None`: none scheduled).
    #[serde(
        rename = "incremental_every_ms",
        default,
        deserialize_with = "optional_millis"
    )]
    pub incremental_every: Option<Duration>,
    /// When snapshots of the whole system are due (`None`: none scheduled).
    #[serde(default, deserialize_with = "optional_cron")]
    pub snapshot_cron: Option<CronSpec>,
    /// When drift checks (dry-run snapshots of the whole system) are due.
    #[serde(default, deserialize_with = "optional_cron")]
    pub drift_check_cron: Option<CronSpec>,
    /// The IANA time zone the cron fields are read in.
    #[serde(default = "utc", deserialize_with = "time_zone")]
    pub timezone: Tz,
    /// How far behind the watermark each incremental asks again: changes whose `updated_at`
    /// the management system stamped a little out of order are still picked up.
    #[serde(
        rename = "watermark_overlap_ms",
        default = "default_overlap",
        deserialize_with = "millis"
    )]
    pub watermark_overlap: Duration,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        Self {
            incremental_every: None,
            snapshot_cron: None,
            drift_check_cron: None,
            timezone: utc(),
            watermark_overlap: default_overlap(),
        }
    }
}

/// A value quoted back in an error, cut short.
fn quote(text: &str) -> String {
    let cut: String = text.chars().take(60).collect();
    format!("{cut:?}")
}

fn utc() -> Tz {
    Tz::UTC
}

/// Two minutes: clocks and commit order at the source are rarely further apart than that.
fn default_overlap() -> Duration {
    Duration::from_secs(120)
}

/// The shortest incremental interval: a second (a slot's request id has second precision).
const MIN_EVERY: Duration = Duration::from_secs(1);
/// The longest interval or overlap accepted: 31 days.
const MAX_SPAN: Duration = Duration::from_secs(31 * 86_400);

/// A non-negative number of milliseconds (a negative one is refused, not wrapped).
fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let ms = i64::deserialize(d)?;
    u64::try_from(ms)
        .map(Duration::from_millis)
        .map_err(|_| serde::de::Error::custom(format!("{ms} ms is negative")))
}

/// Milliseconds, 0 meaning none.
fn optional_millis<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let every = millis(d)?;
    Ok((!every.is_zero()).then_some(every))
}

/// A cron expression; an empty one means none (so a system can switch off what it inherits).
fn optional_cron<'de, D: Deserializer<'de>>(d: D) -> Result<Option<CronSpec>, D::Error> {
    let text = String::deserialize(d)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

fn time_zone<'de, D: Deserializer<'de>>(d: D) -> Result<Tz, D::Error> {
    let name = String::deserialize(d)?;
    name.parse::<Tz>().map_err(|_| {
        serde::de::Error::custom(format!(
            "{} is not an IANA time zone name (e.g. \"UTC\", \"Asia/Shanghai\")",
            quote(&name)
        ))
    })
}

impl ScheduleSettings {
    /// Whether anything is scheduled at all.
    pub fn is_empty(&self) -> bool {
        self.incremental_every.is_none()
            && self.snapshot_cron.is_none()
            && self.drift_check_cron.is_none()
    }

    /// The kinds this schedule has.
    pub fn kinds(&self) -> impl Iterator<Item = ScheduleKind> + '_ {
        ScheduleKind::ALL.into_iter().filter(|k| match k {
            ScheduleKind::Incremental => self.incremental_every.is_some(),
            ScheduleKind::Snapshot => self.snapshot_cron.is_some(),
            ScheduleKind::Drift => self.drift_check_cron.is_some(),
        })
    }

    fn cron(&self, kind: ScheduleKind) -> Option<&CronSpec> {
        match kind {
            ScheduleKind::Incremental => None,
            ScheduleKind::Snapshot => self.snapshot_cron.as_ref(),
            ScheduleKind::Drift => self.drift_check_cron.as_ref(),
        }
    }

    /// The latest slot of `kind` at or before `now` (`None`: the kind is not scheduled, or
    /// the expression matched no time before).
    pub fn slot_at_or_before(
        &self,
        kind: ScheduleKind,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        // Slots have whole seconds; anything finer in `now` only delays by less than a second.
        let now = DateTime::from_timestamp(now.timestamp(), 0)?;
        if kind == ScheduleKind::Incremental {
            let every = i64::try_from(self.incremental_every?.as_millis()).ok()?;
            let at = now.timestamp_millis();
            return DateTime::from_timestamp_millis(at - at.rem_euclid(every));
        }
        let local = self.timezone.from_utc_datetime(&now.naive_utc());
        // The iterator's step back is strictly before its start: start a second later.
        let start = local + TimeDelta::seconds(1);
        let slot = self.cron(kind)?.0.after(&start).next_back()?;
        Some(slot.with_timezone(&Utc))
    }

    /// The first slot of `kind` strictly after `t`.
    pub fn slot_after(&self, kind: ScheduleKind, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if kind == ScheduleKind::Incremental {
            let every = i64::try_from(self.incremental_every?.as_millis()).ok()?;
            let at = t.timestamp_millis();
            return DateTime::from_timestamp_millis(at - at.rem_euclid(every) + every);
        }
        let local = self.timezone.from_utc_datetime(&t.naive_utc());
        let slot = self.cron(kind)?.0.after(&local).next()?;
        Some(slot.with_timezone(&Utc))
    }

    /// Ranges the types do not check; the failing key is named relative to the system table.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(every) = self.incremental_every
            && !(MIN_EVERY..=MAX_SPAN).contains(&every)
        {
            return Err((
                "schedule.incremental_every_ms",
                format!(
                    "is {} ms: between 1000 and {} ms, or 0 for none",
                    every.as_millis(),
                    MAX_SPAN.as_millis()
                ),
            ));
        }
        if self.watermark_overlap > MAX_SPAN {
            return Err((
                "schedule.watermark_overlap_ms",
                format!("must be at most {} ms", MAX_SPAN.as_millis()),
            ));
        }
        Ok(())
    }

    /// `<prefix>.schedule.*` lines for `product-sync config`.
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>, prefix: &str) -> fmt::Result {
        let every = self.incremental_every.map_or(0, |d| d.as_millis());
        writeln!(f, "{prefix}.schedule.incremental_every_ms = {every}")?;
        let cron = |c: &Option<CronSpec>| c.as_ref().map_or("", CronSpec::source).to_owned();
        writeln!(
            f,
            "{prefix}.schedule.snapshot_cron = {:?}",
            cron(&self.snapshot_cron)
        )?;
        let drift = cron(&self.drift_check_cron);
        writeln!(f, "{prefix}.schedule.drift_check_cron = {drift:?}")?;
        writeln!(f, "{prefix}.schedule.timezone = {:?}", self.timezone.name())?;
        let overlap = self.watermark_overlap.as_millis();
        writeln!(f, "{prefix}.schedule.watermark_overlap_ms = {overlap}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn with(every_ms: u64, snapshot: &str, tz: &str) -> ScheduleSettings {
        ScheduleSettings {
            incremental_every: (every_ms > 0).then(|| Duration::from_millis(every_ms)),
            snapshot_cron: (!snapshot.is_empty()).then(|| snapshot.parse().unwrap()),
            drift_check_cron: None,
            timezone: tz.parse().unwrap(),
            watermark_overlap: default_overlap(),
        }
    }

    #[test]
    fn incremental_slots_are_multiples_of_the_interval_since_the_epoch() {
        let s = with(300_000, "", "UTC");
        let k = ScheduleKind::Incremental;
        let now = at("2026-12-01T08:07:31.250Z");
        assert_eq!(
            s.slot_at_or_before(k, now),
            Some(at("2026-12-01T08:05:00Z"))
        );
        assert_eq!(s.slot_after(k, now), Some(at("2026-12-01T08:10:00Z")));
        // A slot's own instant is due at that instant.
        let exact = at("2026-12-01T08:10:00Z");
        assert_eq!(s.slot_at_or_before(k, exact), Some(exact));
        assert_eq!(s.slot_after(k, exact), Some(at("2026-12-01T08:15:00Z")));
    }

    #[test]
    fn cron_slots_are_read_in_the_time_zone() {
        // 02:00 in Shanghai is 18:00 UTC the day before.
        let s = with(0, "0 0 2 * * *", "Asia/Shanghai");
        let k = ScheduleKind::Snapshot;
        let now = at("2026-12-01T08:00:00Z");
        assert_eq!(
            s.slot_at_or_before(k, now),
            Some(at("2026-11-30T18:00:00Z"))
        );
        assert_eq!(s.slot_after(k, now), Some(at("2026-12-01T18:00:00Z")));
        let exact = at("2026-12-01T18:00:00Z");
        assert_eq!(s.slot_at_or_before(k, exact), Some(exact));
        assert_eq!(s.slot_at_or_before(ScheduleKind::Drift, now), None);
    }

    #[test]
    fn a_cron_expression_must_have_six_fields_and_parse() {
        let five = "0 2 * * *".parse::<CronSpec>().unwrap_err();
        assert!(five.contains("5 fields"), "{five}");
        let bad = "0 0 25 * * *".parse::<CronSpec>().unwrap_err();
        assert!(bad.contains("not a cron expression"), "{bad}");
        assert!("*/10 * * * * *".parse::<CronSpec>().is_ok());
    }

    #[test]
    fn kinds_are_named_as_in_request_ids() {
        for k in ScheduleKind::ALL {
            assert_eq!(ScheduleKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(ScheduleKind::parse("weekly"), None);
    }
}
