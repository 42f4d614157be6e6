//! What the scheduler and the watermark keep in the store: the cluster-wide `leases` (one
//! holder at a time, taken over once its expiry passes), `schedule_slots` (the last slot of
//! each system and kind handled, and the last published) and `system_state` (the watermark,
//! which only moves forward, and the last drift check's findings).
//!
//! Every write that could race is one conditional statement, so two instances (or a holder
//! that was frozen and wakes up) can never move a slot or a watermark backwards.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseBackend, QueryResult, Statement, Value};

use super::StoreError;

/// The scheduler's lease in `leases`.
pub const SCHEDULER_LEASE: &str = "scheduler";

/// `$n` placeholders as the backend wants them (`?` on SQLite, in the same order).
pub(super) fn statement(backend: DatabaseBackend, sql: &str, values: Vec<Value>) -> Statement {
    let sql = match backend {
        DatabaseBackend::Postgres => sql.to_owned(),
        _ => {
            let mut out = String::with_capacity(sql.len());
            let mut chars = sql.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
                    while chars.peek().is_some_and(char::is_ascii_digit) {
                        chars.next();
                    }
                    out.push('?');
                } else {
                    out.push(c);
                }
            }
            out
        }
    };
    Statement::from_sql_and_values(backend, sql, values)
}

pub(super) async fn execute(
    db: &impl ConnectionTrait,
    sql: &str,
    values: Vec<Value>,
) -> Result<u64, StoreError> {
    let s = statement(db.get_database_backend(), sql, values);
    Ok(db.execute_raw(s).await?.rows_affected())
}

pub(super) async fn query(
    db: &impl ConnectionTrait,
    sql: &str,
    values: Vec<Value>,
) -> Result<Vec<QueryResult>, StoreError> {
    let s = statement(db.get_database_backend(), sql, values);
    Ok(db.query_all_raw(s).await?)
}

/// Takes `name` for `holder` until `now + ttl`, or renews it: succeeds when `holder` holds it
/// already or its last holder's expiry has passed. Returns whether `holder` holds it now.
pub async fn take_lease(
    db: &impl ConnectionTrait,
    name: &str,
    holder: &str,
    now: DateTime<Utc>,
    ttl: std::time::Duration,
) -> Result<bool, StoreError> {
    let expires = now + chrono::Duration::from_std(ttl).unwrap_or_default();
    let taken = execute(
        db,
        "INSERT INTO leases (name, holder, acquired_at, expires_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
         acquired_at = CASE WHEN leases.holder = excluded.holder THEN leases.acquired_at \
                            ELSE excluded.acquired_at END, \
         expires_at = excluded.expires_at \
         WHERE leases.holder = excluded.holder OR leases.expires_at < $5",
        vec![
            name.into(),
            holder.into(),
            now.into(),
            expires.into(),
            now.into(),
        ],
    )
    .await?;
    Ok(taken == 1)
}

/// Gives `name` up at once (a stopping holder), if `holder` holds it.
pub async fn release_lease(
    db: &impl ConnectionTrait,
    name: &str,
    holder: &str,
) -> Result<(), StoreError> {
    let past = DateTime::<Utc>::UNIX_EPOCH;
    execute(
        db,
        "UPDATE leases SET expires_at = $1 WHERE name = $2 AND holder = $3",
        vec![past.into(), name.into(), holder.into()],
    )
    .await?;
    Ok(())
}

/// Who holds `name` and until when (an expired row is still returned: the caller compares).
pub async fn lease(
    db: &impl ConnectionTrait,
    name: &str,
) -> Result<Option<(String, DateTime<Utc>)>, StoreError> {
    let rows = query(
        db,
        "SELECT holder, expires_at FROM leases WHERE name = $1",
        vec![name.into()],
    )
    .await?;
    Ok(rows.first().and_then(|r| {
        let holder = r.try_get::<String>("", "holder").ok()?;
        let until = r.try_get::<DateTime<Utc>>("", "expires_at").ok()?;
        Some((holder, until))
    }))
}

/// One system and kind's progress (`schedule_slots`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRow {
    pub system: String,
    pub kind: String,
    /// The last slot handled (published or skipped).
    pub slot: DateTime<Utc>,
    /// The last request id published, and when.
    pub request_id: Option<String>,
    pub published_at: Option<DateTime<Utc>>,
    /// Slots skipped so far because the previous run had not finished.
    pub skipped: i64,
}

/// Every system and kind's progress.
pub async fn slots(db: &impl ConnectionTrait) -> Result<Vec<SlotRow>, StoreError> {
    let rows = query(
        db,
        "SELECT system, kind, slot, request_id, published_at, skipped FROM schedule_slots \
         ORDER BY system, kind",
        vec![],
    )
    .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some(SlotRow {
                system: r.try_get("", "system").ok()?,
                kind: r.try_get("", "kind").ok()?,
                slot: r.try_get("", "slot").ok()?,
                request_id: r.try_get("", "request_id").ok()?,
                published_at: r.try_get("", "published_at").ok()?,
                skipped: r.try_get("", "skipped").ok()?,
            })
        })
        .collect())
}

/// Starts tracking a system and kind at `slot` (as if handled): does nothing when tracked.
pub async fn start_slots(
    db: &impl ConnectionTrait,
    system: &str,
    kind: &str,
    slot: DateTime<Utc>,
) -> Result<(), StoreError> {
    execute(
        db,
        "INSERT INTO schedule_slots (system, kind, slot, skipped) VALUES ($1, $2, $3, 0) \
         ON CONFLICT (system, kind) DO NOTHING",
        vec![system.into(), kind.into(), slot.into()],
    )
    .await?;
    Ok(())
}

/// Records `slot` as published under `request_id`, unless a later slot was handled already.
pub async fn slot_published(
    db: &impl ConnectionTrait,
    system: &str,
    kind: &str,
    slot: DateTime<Utc>,
    request_id: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let moved = execute(
        db,
        "UPDATE schedule_slots SET slot = $1, request_id = $2, published_at = $3 \
         WHERE system = $4 AND kind = $5 AND slot < $6",
        vec![
            slot.into(),
            request_id.into(),
            now.into(),
            system.into(),
            kind.into(),
            slot.into(),
        ],
    )
    .await?;
    Ok(moved == 1)
}

/// Records `slot` as skipped, unless a later slot was handled already.
pub async fn slot_skipped(
    db: &impl ConnectionTrait,
    system: &str,
    kind: &str,
    slot: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let moved = execute(
        db,
        "UPDATE schedule_slots SET slot = $1, skipped = skipped + 1 \
         WHERE system = $2 AND kind = $3 AND slot < $4",
        vec![slot.into(), system.into(), kind.into(), slot.into()],
    )
    .await?;
    Ok(moved == 1)
}

/// One system's watermark and last drift check (`system_state`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemState {
    pub system: String,
    /// The greatest `updated_at` a completed incremental fetched.
    pub watermark: Option<DateTime<Utc>>,
    /// The command that moved it last.
    pub watermark_request_id: Option<String>,
    /// When a completed incremental last confirmed it (moved or not).
    pub watermark_confirmed_at: Option<DateTime<Utc>>,
    pub drift: Option<DriftFound>,
}

/// What the last drift check would have changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DriftFound {
    pub request_id: String,
    pub checked_at: DateTime<Utc>,
    pub created: i64,
    pub updated: i64,
    pub delisted: i64,
    pub relisted: i64,
}

impl DriftFound {
    /// The counts in the order of the drift gauges' kinds (created, updated, delisted,
    /// relisted).
    pub fn counts(&self) -> [i64; 4] {
        [self.created, self.updated, self.delisted, self.relisted]
    }
}

/// Every system's state.
pub async fn system_states(db: &impl ConnectionTrait) -> Result<Vec<SystemState>, StoreError> {
    let rows = query(
        db,
        "SELECT system, watermark, watermark_request_id, watermark_confirmed_at, \
         drift_request_id, drift_checked_at, drift_created, drift_updated, drift_delisted, \
         drift_relisted FROM system_state ORDER BY system",
        vec![],
    )
    .await?;
    Ok(rows.iter().filter_map(state_of).collect())
}

fn state_of(r: &QueryResult) -> Option<SystemState> {
    let count = |c: &str| r.try_get::<Option<i64>>("", c).ok().flatten().unwrap_or(0);
    let drift = match (
        r.try_get::<Option<String>>("", "drift_request_id").ok()?,
        r.try_get::<Option<DateTime<Utc>>>("", "drift_checked_at")
            .ok()?,
    ) {
        (Some(request_id), Some(checked_at)) => Some(DriftFound {
            request_id,
            checked_at,
            created: count("drift_created"),
            updated: count("drift_updated"),
            delisted: count("drift_delisted"),
            relisted: count("drift_relisted"),
        }),
        _ => None,
    };
    Some(SystemState {
        system: r.try_get("", "system").ok()?,
        watermark: r.try_get("", "watermark").ok()?,
        watermark_request_id: r.try_get("", "watermark_request_id").ok()?,
        watermark_confirmed_at: r.try_get("", "watermark_confirmed_at").ok()?,
        drift,
    })
}

/// One system's watermark (`None`: no incremental has completed yet).
pub async fn watermark(
    db: &impl ConnectionTrait,
    system: &str,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    let rows = query(
        db,
        "SELECT watermark FROM system_state WHERE system = $1",
        vec![system.into()],
    )
    .await?;
    Ok(rows
        .first()
        .and_then(|r| r.try_get::<Option<DateTime<Utc>>>("", "watermark").ok())
        .flatten())
}

/// After a completed incremental that fetched products up to `fetched` (their greatest
/// `updated_at`): the watermark becomes `fetched` if that is later (never earlier), and is
/// confirmed `now` either way. Returns whether it moved.
pub async fn advance_watermark(
    db: &impl ConnectionTrait,
    system: &str,
    fetched: Option<DateTime<Utc>>,
    request_id: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    execute(
        db,
        "INSERT INTO system_state (system, watermark_confirmed_at) VALUES ($1, $2) \
         ON CONFLICT (system) DO UPDATE SET watermark_confirmed_at = excluded.watermark_confirmed_at",
        vec![system.into(), now.into()],
    )
    .await?;
    let Some(fetched) = fetched else {
        return Ok(false);
    };
    let moved = execute(
        db,
        "UPDATE system_state SET watermark = $1, watermark_request_id = $2 \
         WHERE system = $3 AND (watermark IS NULL OR watermark < $4)",
        vec![
            fetched.into(),
            request_id.into(),
            system.into(),
            fetched.into(),
        ],
    )
    .await?;
    Ok(moved == 1)
}

/// Records what a drift check found.
pub async fn record_drift(
    db: &impl ConnectionTrait,
    system: &str,
    found: &DriftFound,
) -> Result<(), StoreError> {
    execute(
        db,
        "INSERT INTO system_state (system, drift_request_id, drift_checked_at, drift_created, \
         drift_updated, drift_delisted, drift_relisted) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (system) DO UPDATE SET drift_request_id = excluded.drift_request_id, \
         drift_checked_at = excluded.drift_checked_at, drift_created = excluded.drift_created, \
         drift_updated = excluded.drift_updated, drift_delisted = excluded.drift_delisted, \
         drift_relisted = excluded.drift_relisted",
        vec![
            system.into(),
            found.request_id.clone().into(),
            found.checked_at.into(),
            found.created.into(),
            found.updated.into(),
            found.delisted.into(),
            found.relisted.into(),
        ],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_question_marks_on_sqlite_in_order() {
        let s = statement(
            DatabaseBackend::Sqlite,
            "UPDATE t SET a = $1 WHERE b = $2 AND c < $10",
            vec![],
        );
        assert_eq!(s.sql, "UPDATE t SET a = ? WHERE b = ? AND c < ?");
        let p = statement(DatabaseBackend::Postgres, "SELECT $1", vec![]);
        assert_eq!(p.sql, "SELECT $1");
    }
}
