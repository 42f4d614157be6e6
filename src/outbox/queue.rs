//! The relay's queue in the store (`outbox_pending`): reading the next rows of the held shards
//! with what their events need, deleting rows the broker acknowledged, parking rows it
//! refused for good, and the operator's view and release of parked rows.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use std::sync::Arc;

use futures::TryStreamExt;
use sea_orm::sqlx;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection, DatabaseConnectionType,
    DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QueryResult, RuntimeErr,
    Statement, StreamTrait, TransactionTrait,
};

use crate::store::entity::{outbox_pending, requests as request_rows};
use crate::store::{StoreError, requests};
use crate::wire;

/// Which shards a read covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shards {
    /// Every shard (SQLite: one process holds them all).
    All,
    /// These of `of` shards.
    Some { held: BTreeSet<u32>, of: u32 },
}

/// One queued event, ready to produce.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The `outbox_pending` row.
    pub pending_id: i64,
    /// Its shard key (the shard is this modulo `pipeline.relay_shards`).
    pub shard_key: i64,
    /// The product, for change events (a parked row holds its product's later rows).
    pub product_id: Option<i64>,
    pub kind: Kind,
    pub key: String,
    pub payload: String,
    pub ce_id: String,
    pub ce_type: String,
    pub source: String,
    pub subject: String,
    pub time: String,
    pub traceparent: Option<String>,
}

/// What an outgoing event is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Change,
    /// The result of this request (marked published on the request row after the ack).
    Result(String),
    /// Nothing left to publish (the request started over since): the row is only deleted.
    Gone,
}

impl Kind {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Change => "change",
            Kind::Result(_) | Kind::Gone => "result",
        }
    }
}

/// The next `limit` rows after `after` in queue order, in the given shards, skipping parked
/// rows and every row of a product that has a parked row. Change rows come with their
/// stored event (as text, never re-parsed); result rows with their request's current row.
///
/// Every value in the statement is an integer this process computed, so it is written
/// inline: one statement text for both backends.
pub async fn read<C: ConnectionTrait + StreamTrait>(
    db: &C,
    shards: &Shards,
    after: i64,
    limit: u64,
) -> Result<Vec<Outgoing>, StoreError> {
    let backend = ConnectionTrait::get_database_backend(db);
    let sql = read_sql(backend, shards, after, limit);
    // Streamed, each row made an `Outgoing` as it arrives: a round of 20,000 rows held its
    // driver rows and their copies at once (about twice its events' size) when read whole.
    let mut rows = Box::pin(db.stream_raw(Statement::from_string(backend, sql)).await?);
    let mut out = Vec::new();
    let mut results = Vec::new();
    while let Some(row) = rows.try_next().await? {
        let pending_id: i64 = row.try_get("", "pending_id")?;
        let shard_key: i64 = row.try_get("", "shard_key")?;
        let product_id: Option<i64> = row.try_get("", "product_id")?;
        let change_id: Option<i64> = row.try_get("", "change_id")?;
        let request: Option<String> = row.try_get("", "pending_request")?;
        // A change row gone from the history (removed by hand) has nothing left to publish.
        let has_change = row.try_get::<Option<String>>("", "system")?.is_some();
        match (change_id, request) {
            (Some(_), _) if has_change => out.push(change(&row, pending_id, product_id)?),
            (Some(_), _) => out.push(gone(pending_id, String::new())),
            (None, Some(request_id)) => {
                results.push((out.len(), request_id.clone()));
                out.push(gone(pending_id, request_id));
            }
            (None, None) => out.push(gone(pending_id, String::new())),
        }
        if let Some(last) = out.last_mut() {
            last.shard_key = shard_key;
        }
    }
    drop(rows);
    if !results.is_empty() {
        let ids: Vec<String> = results.iter().map(|(_, id)| id.clone()).collect();
        let found: std::collections::HashMap<String, request_rows::Model> =
            request_rows::Entity::find()
                .filter(request_rows::Column::RequestId.is_in(ids))
                .all(db)
                .await?
                .into_iter()
                .map(|r| (r.request_id.clone(), r))
                .collect();
        for (index, request_id) in results {
            if let Some(row) = found.get(&request_id)
                && (row.status == requests::Status::Completed.as_str()
                    || row.status == requests::Status::Failed.as_str())
            {
                let shard_key = out[index].shard_key;
                out[index] = result(out[index].pending_id, row);
                out[index].shard_key = shard_key;
            }
        }
    }
    // Queue order, sorted here rather than by the statement (whose sort of the events'
    // text spilled to disk at 20,000 rows).
    out.sort_unstable_by_key(|o| o.pending_id);
    Ok(out)
}

/// The rows after `after` as [`read`] returns them, but only while the queue up to `after`
/// still holds exactly `behind` readable rows: the rows of the read that ended at `after`, not
/// yet deleted. More means a row committed late behind the read position (its product's later
/// rows must not pass it), fewer that one was parked since: either way `None`, and the caller
/// reads from the head. Count and read see one snapshot.
pub async fn read_after_checked(
    db: &DatabaseConnection,
    shards: &Shards,
    after: i64,
    behind: usize,
    limit: u64,
) -> Result<Option<Vec<Outgoing>>, StoreError> {
    let backend = db.get_database_backend();
    let isolation =
        (backend == DatabaseBackend::Postgres).then_some(sea_orm::IsolationLevel::RepeatableRead);
    let txn = db.begin_with_config(isolation, None).await?;
    // Counted up to one past `behind` only, in key order: the planner then walks the primary
    // key from the queue's head and stops there. A plain count of `id <= after` was planned
    // as a scan of the whole table once the statistics (taken with a million rows queued)
    // put most rows below `after`: 100–220 ms a round, the longest part of a round's store
    // work with a million rows queued.
    let count = format!(
        "SELECT COUNT(*) AS n FROM (SELECT 1 FROM outbox_pending o WHERE o.id <= {after} \
         AND o.parked_at IS NULL {filter} AND NOT EXISTS \
         (SELECT 1 FROM outbox_pending q WHERE q.parked_at IS NOT NULL \
         AND q.product_id = o.product_id) ORDER BY o.id LIMIT {cap}) AS s",
        filter = shard_filter(shards),
        cap = behind.saturating_add(1)
    );
    let n: i64 = match txn
        .query_one_raw(Statement::from_string(backend, count))
        .await?
    {
        Some(row) => row.try_get("", "n")?,
        None => 0,
    };
    let rows = if usize::try_from(n).ok() == Some(behind) {
        Some(read(&txn, shards, after, limit).await?)
    } else {
        None
    };
    txn.commit().await?;
    Ok(rows)
}

/// The `AND …` restricting a statement on `outbox_pending o` to the shards (empty for all).
fn shard_filter(shards: &Shards) -> String {
    match shards {
        Shards::All => String::new(),
        // Every shard held: no filter, so the planner sees a plain key range.
        Shards::Some { held, of } if held.len() == *of as usize => String::new(),
        Shards::Some { held, of } => {
            let list = held
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            format!("AND (o.shard_key % {of}) IN ({list})")
        }
    }
}

/// The statement [`read`] runs (public so a test can check its plan).
pub fn read_sql(backend: DatabaseBackend, shards: &Shards, after: i64, limit: u64) -> String {
    let filter = shard_filter(shards);
    // The queue's rows first (a range of its primary key, or a sort of the small queue rows
    // when the planner believes the shard filter selective), then each one's change row by
    // its primary key: on PostgreSQL a lateral `LIMIT 1` probe, which no statistics can turn
    // into a scan of the history (a plain join was once planned as one, taking minutes).
    let join = match backend {
        DatabaseBackend::Postgres => {
            "LEFT JOIN LATERAL (SELECT system, identity, product_code, event_id, op, \
             traceparent, CAST(payload AS TEXT) AS payload, created_at FROM product_changes \
             WHERE id = p.change_id LIMIT 1) c ON true"
        }
        _ => {
            "LEFT JOIN (SELECT id, system, identity, product_code, event_id, op, traceparent, \
             CAST(payload AS TEXT) AS payload, created_at FROM product_changes) c \
             ON c.id = p.change_id"
        }
    };
    format!(
        "WITH p AS MATERIALIZED (SELECT id, shard_key, product_id, change_id, request_id \
         FROM outbox_pending o WHERE o.id > {after} AND o.parked_at IS NULL {filter} \
         ORDER BY o.id LIMIT {limit}) \
         SELECT p.id AS pending_id, p.shard_key, p.product_id, p.change_id, p.request_id AS pending_request, \
         c.system, c.identity, c.product_code, c.event_id, c.op, c.traceparent, c.payload, \
         c.created_at FROM p {join} \
         WHERE NOT EXISTS (SELECT 1 FROM outbox_pending q \
         WHERE q.parked_at IS NOT NULL AND q.product_id = p.product_id)"
    )
}

fn change(
    row: &QueryResult,
    pending_id: i64,
    product_id: Option<i64>,
) -> Result<Outgoing, StoreError> {
    let system: String = row.try_get("", "system")?;
    let identity: String = row.try_get("", "identity")?;
    let code: Option<String> = row.try_get("", "product_code")?;
    let op: String = row.try_get("", "op")?;
    let created_at: DateTime<Utc> = row.try_get("", "created_at")?;
    let subject = code.unwrap_or(identity);
    Ok(Outgoing {
        pending_id,
        shard_key: 0,
        product_id,
        kind: Kind::Change,
        key: wire::change_key(&system, &subject),
        payload: row.try_get("", "payload")?,
        ce_id: row.try_get("", "event_id")?,
        ce_type: wire::change_ce_type(&op),
        source: wire::ce_source(&system),
        subject,
        time: created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        traceparent: row.try_get("", "traceparent")?,
    })
}

fn result(pending_id: i64, row: &request_rows::Model) -> Outgoing {
    let finished_at = row.finished_at.unwrap_or(row.started_at);
    Outgoing {
        pending_id,
        shard_key: 0,
        product_id: None,
        kind: Kind::Result(row.request_id.clone()),
        key: row.request_id.clone(),
        payload: requests::result_event(row).to_json(),
        ce_id: wire::result_ce_id(&row.request_id, finished_at.timestamp_micros()),
        ce_type: wire::result_ce_type(&row.status),
        source: wire::ce_source(&row.system),
        subject: row.request_id.clone(),
        time: finished_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        traceparent: row.traceparent.clone(),
    }
}

fn gone(pending_id: i64, request_id: String) -> Outgoing {
    Outgoing {
        pending_id,
        shard_key: 0,
        product_id: None,
        kind: Kind::Gone,
        key: request_id,
        payload: String::new(),
        ce_id: String::new(),
        ce_type: String::new(),
        source: String::new(),
        subject: String::new(),
        time: String::new(),
        traceparent: None,
    }
}

/// What to record after acks: the queue rows to delete, the requests whose result went out.
#[derive(Debug, Default, Clone)]
pub struct Done {
    pub pending_ids: Vec<i64>,
    pub results: Vec<String>,
}

impl Done {
    /// The outcome of these rows.
    pub fn of<'a>(rows: impl IntoIterator<Item = &'a Outgoing>) -> Self {
        let mut done = Done::default();
        for r in rows {
            done.pending_ids.push(r.pending_id);
            if let Kind::Result(id) = &r.kind {
                done.results.push(id.clone());
            }
        }
        done
    }

    /// Adds another outcome's rows.
    pub fn extend(&mut self, other: Done) {
        self.pending_ids.extend(other.pending_ids);
        self.results.extend(other.results);
    }

    pub fn is_empty(&self) -> bool {
        self.pending_ids.is_empty() && self.results.is_empty()
    }
}

/// Removes acknowledged rows from the queue and marks their requests' results published.
pub async fn done(
    db: &DatabaseConnection,
    done: Done,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let ids = done.pending_ids;
    if ids.is_empty() {
        return Ok(());
    }
    if let DatabaseConnectionType::SqlxPostgresPoolConnection(_) = &db.inner {
        // The ids as runs of consecutive ids, two array parameters: a round's rows are mostly
        // one run, deleted by one index range scan (an array of every id cost a probe each,
        // and its binding alone took tens of milliseconds at 20,000 ids).
        let (starts, ends): (Vec<i64>, Vec<i64>) = runs(ids.iter().copied()).into_iter().unzip();
        sqlx::query(
            "DELETE FROM outbox_pending o USING unnest($1::int8[], $2::int8[]) AS r(lo, hi) \
             WHERE o.id BETWEEN r.lo AND r.hi",
        )
        .bind(&starts)
        .bind(&ends)
        .execute(db.get_postgres_connection_pool())
        .await
        .map_err(|e| StoreError::Db(DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e)))))?;
    } else {
        for chunk in ids.chunks(5000) {
            outbox_pending::Entity::delete_many()
                .filter(outbox_pending::Column::Id.is_in(chunk.iter().copied()))
                .exec(db)
                .await?;
        }
    }
    requests::mark_published(db, &done.results, now).await
}

/// The ids, sorted, as runs `(first, last)` of consecutive ids.
pub fn runs(ids: impl IntoIterator<Item = i64>) -> Vec<(i64, i64)> {
    let sorted: BTreeSet<i64> = ids.into_iter().collect();
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for id in sorted {
        match ranges.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(id) => *end = id,
            _ => ranges.push((id, id)),
        }
    }
    ranges
}

/// Removes rows a committed transaction published (found again in a shard's progress record
/// after a takeover) and marks the results among them published.
pub async fn done_by_ids(
    db: &DatabaseConnection,
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let mut done = Done::default();
    for chunk in ids.chunks(5000) {
        let rows = outbox_pending::Entity::find()
            .filter(outbox_pending::Column::Id.is_in(chunk.iter().copied()))
            .all(db)
            .await?;
        for row in rows {
            done.pending_ids.push(row.id);
            if let (None, Some(request_id)) = (row.change_id, row.request_id) {
                done.results.push(request_id);
            }
        }
    }
    let found = done.pending_ids.len();
    self::done(db, done, now).await?;
    Ok(found)
}

/// Parks a row the broker refused for good, with the refusal (cut short).
pub async fn park(
    db: &DatabaseConnection,
    pending_id: i64,
    error: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let error: String = error.chars().take(500).collect();
    outbox_pending::Entity::update_many()
        .col_expr(outbox_pending::Column::ParkedAt, Expr::value(Some(now)))
        .col_expr(outbox_pending::Column::ParkError, Expr::value(Some(error)))
        .filter(outbox_pending::Column::Id.eq(pending_id))
        .exec(db)
        .await?;
    Ok(())
}

/// A parked row, for the operator.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Parked {
    pub pending_id: i64,
    pub change_id: Option<i64>,
    pub product_id: Option<i64>,
    pub request_id: Option<String>,
    pub parked_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// Every parked row, oldest first.
pub async fn parked(db: &DatabaseConnection) -> Result<Vec<Parked>, StoreError> {
    Ok(outbox_pending::Entity::find()
        .filter(outbox_pending::Column::ParkedAt.is_not_null())
        .order_by_asc(outbox_pending::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(|r| Parked {
            pending_id: r.id,
            change_id: r.change_id,
            product_id: r.product_id,
            request_id: r.request_id,
            parked_at: r.parked_at,
            error: r.park_error,
        })
        .collect())
}

/// Puts parked rows back in the queue (all of them, or the given ones); returns how many.
/// For after the cause was fixed (a topic's `max.message.bytes` raised, say).
pub async fn unpark(db: &DatabaseConnection, ids: &[i64]) -> Result<u64, StoreError> {
    let mut update = outbox_pending::Entity::update_many()
        .col_expr(
            outbox_pending::Column::ParkedAt,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(
            outbox_pending::Column::ParkError,
            Expr::value(Option::<String>::None),
        )
        .filter(outbox_pending::Column::ParkedAt.is_not_null());
    if !ids.is_empty() {
        update = update.filter(outbox_pending::Column::Id.is_in(ids.iter().copied()));
    }
    Ok(update.exec(db).await?.rows_affected)
}

/// Rows queued (parked ones included), rows parked, and the oldest queued row's time.
pub async fn backlog(
    db: &DatabaseConnection,
) -> Result<(u64, u64, Option<DateTime<Utc>>), StoreError> {
    use outbox_pending::Column as C;
    let queued = outbox_pending::Entity::find().count(db).await?;
    let parked = outbox_pending::Entity::find()
        .filter(C::ParkedAt.is_not_null())
        .count(db)
        .await?;
    let oldest = outbox_pending::Entity::find()
        .order_by_asc(C::Id)
        .one(db)
        .await?
        .map(|r| r.created_at);
    Ok((queued, parked, oldest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_sorted_ranges_of_consecutive_ids() {
        assert_eq!(runs([7, 3, 4, 5, 9, 8, 4]), vec![(3, 5), (7, 9)]);
        assert_eq!(
            runs([i64::MAX, i64::MAX - 1, 1]),
            vec![(1, 1), (i64::MAX - 1, i64::MAX)]
        );
        assert!(runs([]).is_empty());
    }
}
