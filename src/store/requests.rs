//! `requests` rows: one per product-request command — running, then completed or failed with
//! its counts. Finishing a request queues its result for the relay (`outbox_pending`), in the
//! same transaction; the relay publishes the result event and marks the row.

use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection, EntityTrait, QueryFilter,
    Statement, TransactionTrait,
};
use serde_json::Value;

use super::StoreError;
use super::entity::requests;
use super::fold::FoldOutcome;
use crate::command::Command;
use crate::wire::{Counts, Drift, ResultEvent};

/// The longest error text stored for a request (and so published in its result).
pub const MAX_ERROR_CHARS: usize = 2000;

/// States of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    /// Waiting on the retry topic for its next attempt.
    Retrying,
    Completed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Retrying => "retrying",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }
}

/// The stored row of a request, if any.
pub async fn find(
    db: &impl ConnectionTrait,
    request_id: &str,
) -> Result<Option<requests::Model>, StoreError> {
    Ok(requests::Entity::find_by_id(request_id.to_owned())
        .one(db)
        .await?)
}

/// Marks a command as running (a redelivered one starts over).
pub async fn begin(
    db: &impl ConnectionTrait,
    command: &Command,
    traceparent: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    use requests::Column as C;
    let row = requests::ActiveModel {
        request_id: Set(command.request_id().to_owned()),
        system: Set(command.system().to_owned()),
        status: Set(Status::Running.as_str().to_owned()),
        command: Set(serde_json::to_value(command.to_wire()).unwrap_or(Value::Null)),
        fetched: Set(0),
        created: Set(0),
        updated: Set(0),
        unchanged: Set(0),
        stale: Set(0),
        delisted: Set(0),
        relisted: Set(0),
        pages: Set(0),
        error: Set(None),
        error_kind: Set(None),
        drift: Set(None),
        traceparent: Set(traceparent.map(str::to_owned)),
        started_at: Set(now),
        finished_at: Set(None),
        result_published_at: Set(None),
    };
    requests::Entity::insert(row)
        .on_conflict(
            OnConflict::column(C::RequestId)
                .update_columns([
                    C::System,
                    C::Status,
                    C::Command,
                    C::Fetched,
                    C::Created,
                    C::Updated,
                    C::Unchanged,
                    C::Stale,
                    C::Delisted,
                    C::Relisted,
                    C::Pages,
                    C::Error,
                    C::ErrorKind,
                    C::Drift,
                    C::Traceparent,
                    C::StartedAt,
                    C::FinishedAt,
                    C::ResultPublishedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// How a command ended.
pub struct Finished<'a> {
    pub status: Status,
    pub outcome: &'a FoldOutcome,
    pub pages: i32,
    /// Its error's kind and reason.
    pub error: Option<(&'a str, &'a str)>,
    /// A dry run's drift.
    pub drift: Option<&'a Drift>,
}

/// Records how a command ended; its result event becomes due for publication.
pub async fn finish(
    db: &DatabaseConnection,
    request_id: &str,
    end: Finished<'_>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let Finished {
        status,
        outcome,
        pages,
        error,
        drift,
    } = end;
    let (error_kind, error) = error.unzip();
    let drift = drift.map(|d| serde_json::to_value(d).unwrap_or(Value::Null));
    use requests::Column as C;
    let update = progress(status, outcome, pages, error_kind.zip(error))
        .col_expr(C::Drift, Expr::value(drift))
        .col_expr(C::FinishedAt, Expr::value(Some(now)))
        .col_expr(
            C::ResultPublishedAt,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .filter(C::RequestId.eq(request_id));
    let txn = db.begin().await?;
    update.exec(&txn).await?;
    queue_result(&txn, request_id, now).await?;
    txn.commit().await?;
    Ok(())
}

/// The update of a request's status, counts, pages and error (kind, reason).
fn progress(
    status: Status,
    outcome: &FoldOutcome,
    pages: i32,
    error: Option<(&str, &str)>,
) -> sea_orm::UpdateMany<requests::Entity> {
    use requests::Column as C;
    let (kind, reason) = error.unzip();
    requests::Entity::update_many()
        .col_expr(C::Status, Expr::value(status.as_str()))
        .col_expr(C::Fetched, Expr::value(outcome.fetched as i64))
        .col_expr(C::Created, Expr::value(outcome.created as i64))
        .col_expr(C::Updated, Expr::value(outcome.updated as i64))
        .col_expr(C::Unchanged, Expr::value(outcome.unchanged as i64))
        .col_expr(C::Stale, Expr::value(outcome.stale as i64))
        .col_expr(C::Delisted, Expr::value(outcome.delisted as i64))
        .col_expr(C::Relisted, Expr::value(outcome.relisted as i64))
        .col_expr(C::Pages, Expr::value(pages))
        // The error may quote what came from outside: stored (and published) cut short.
        .col_expr(
            C::Error,
            Expr::value(reason.map(|e| e.chars().take(MAX_ERROR_CHARS).collect::<String>())),
        )
        .col_expr(C::ErrorKind, Expr::value(kind.map(str::to_owned)))
}

/// Records that a command waits on the retry topic: its status, counts so far and error. No
/// result is queued: the `retrying` result goes straight to the result topic (a row queued
/// here could be running again by the time the relay reads it).
pub async fn retrying(
    db: &DatabaseConnection,
    request_id: &str,
    outcome: &FoldOutcome,
    pages: i32,
    error: (&str, &str),
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    use requests::Column as C;
    progress(Status::Retrying, outcome, pages, Some(error))
        .col_expr(C::FinishedAt, Expr::value(Some(now)))
        .filter(C::RequestId.eq(request_id))
        .exec(db)
        .await?;
    Ok(())
}

/// Makes a finished request's result due again (a command seen again after completion).
pub async fn reemit(db: &DatabaseConnection, request_id: &str) -> Result<(), StoreError> {
    use requests::Column as C;
    let txn = db.begin().await?;
    requests::Entity::update_many()
        .col_expr(
            C::ResultPublishedAt,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .filter(C::RequestId.eq(request_id))
        .exec(&txn)
        .await?;
    queue_result(&txn, request_id, Utc::now()).await?;
    txn.commit().await?;
    Ok(())
}

/// Puts a request's result in the relay's queue, in the shard of its request id.
async fn queue_result(
    txn: &impl ConnectionTrait,
    request_id: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    txn.execute_raw(Statement::from_sql_and_values(
        txn.get_database_backend(),
        match txn.get_database_backend() {
            DatabaseBackend::Postgres => {
                "INSERT INTO outbox_pending (shard_key, request_id, created_at) VALUES ($1, $2, $3)"
            }
            _ => "INSERT INTO outbox_pending (shard_key, request_id, created_at) VALUES (?, ?, ?)",
        },
        [
            request_shard_key(request_id).into(),
            request_id.into(),
            now.into(),
        ],
    ))
    .await?;
    Ok(())
}

/// The shard key of a request's result: FNV-1a of its id, stable across builds and
/// platforms (unlike std's hasher), kept non-negative for the database.
pub fn request_shard_key(request_id: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in request_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 1) as i64
}

/// Marks results published.
pub async fn mark_published(
    db: &impl ConnectionTrait,
    ids: &[String],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    use requests::Column as C;
    requests::Entity::update_many()
        .col_expr(C::ResultPublishedAt, Expr::value(Some(now)))
        .filter(C::RequestId.is_in(ids.iter().cloned()))
        .exec(db)
        .await?;
    Ok(())
}

/// The result event of a finished request (DESIGN.md "Topics and messages").
pub fn result_event(row: &requests::Model) -> ResultEvent {
    let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    ResultEvent {
        request_id: row.request_id.clone(),
        status: row.status.clone(),
        counts: Counts {
            fetched: row.fetched,
            created: row.created,
            updated: row.updated,
            unchanged: row.unchanged,
            stale: row.stale,
            delisted: row.delisted,
            relisted: row.relisted,
        },
        pages: row.pages,
        started_at: at(row.started_at),
        finished_at: row.finished_at.map(at),
        error: row.error.clone(),
        error_kind: row.error_kind.clone(),
        dry_run: row.command["dry_run"].as_bool() == Some(true),
        drift: row
            .drift
            .as_ref()
            .and_then(|d| serde_json::from_value(d.clone()).ok()),
        attempt: None,
        next_attempt_at: None,
        reduced: false,
    }
}
