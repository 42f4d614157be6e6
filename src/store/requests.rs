//! `requests` rows: one per product-request command — running, then completed or failed with
//! its counts. A finished row whose result is unpublished is picked up by the relay, which
//! publishes the result event and marks it.

use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde_json::Value;

use super::StoreError;
use super::entity::requests;
use super::fold::FoldOutcome;
use crate::command::Command;

/// Final states of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    Completed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
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
        pages: Set(0),
        error: Set(None),
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
                    C::Pages,
                    C::Error,
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

/// Records how a command ended; its result event becomes due for publication.
pub async fn finish(
    db: &impl ConnectionTrait,
    request_id: &str,
    status: Status,
    outcome: &FoldOutcome,
    pages: i32,
    error: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    use requests::Column as C;
    requests::Entity::update_many()
        .col_expr(C::Status, Expr::value(status.as_str()))
        .col_expr(C::Fetched, Expr::value(outcome.fetched as i64))
        .col_expr(C::Created, Expr::value(outcome.created as i64))
        .col_expr(C::Updated, Expr::value(outcome.updated as i64))
        .col_expr(C::Unchanged, Expr::value(outcome.unchanged as i64))
        .col_expr(C::Stale, Expr::value(outcome.stale as i64))
        .col_expr(C::Pages, Expr::value(pages))
        .col_expr(C::Error, Expr::value(error.map(str::to_owned)))
        .col_expr(C::FinishedAt, Expr::value(Some(now)))
        .col_expr(
            C::ResultPublishedAt,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .filter(C::RequestId.eq(request_id))
        .exec(db)
        .await?;
    Ok(())
}

/// Makes a finished request's result due again (a command seen again after completion).
pub async fn reemit(db: &impl ConnectionTrait, request_id: &str) -> Result<(), StoreError> {
    use requests::Column as C;
    requests::Entity::update_many()
        .col_expr(
            C::ResultPublishedAt,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .filter(C::RequestId.eq(request_id))
        .exec(db)
        .await?;
    Ok(())
}

/// Finished requests whose result is not yet published, oldest first.
pub async fn unpublished(
    db: &impl ConnectionTrait,
    limit: u64,
) -> Result<Vec<requests::Model>, StoreError> {
    use requests::Column as C;
    Ok(requests::Entity::find()
        .filter(C::ResultPublishedAt.is_null())
        .filter(C::Status.is_in([Status::Completed.as_str(), Status::Failed.as_str()]))
        .order_by_asc(C::FinishedAt)
        .limit(limit)
        .all(db)
        .await?)
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

/// Product counts of a command.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, schemars::JsonSchema)]
pub struct Counts {
    pub fetched: i64,
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub stale: i64,
}

/// The result event on `topics.results`, one per command. `product-sync schema` prints its
/// JSON Schema.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct ResultEvent {
    pub request_id: String,
    /// `completed`, `failed` or `rejected`.
    pub status: String,
    pub counts: Counts,
    /// Pages fetched from the management system.
    pub pages: i32,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339.
    pub finished_at: Option<String>,
    /// Why it failed or was rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The result event of a finished request (DESIGN.md "Topics and messages").
pub fn result_event(row: &requests::Model) -> Value {
    let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::to_value(ResultEvent {
        request_id: row.request_id.clone(),
        status: row.status.clone(),
        counts: Counts {
            fetched: row.fetched,
            created: row.created,
            updated: row.updated,
            unchanged: row.unchanged,
            stale: row.stale,
        },
        pages: row.pages,
        started_at: at(row.started_at),
        finished_at: row.finished_at.map(at),
        error: row.error.clone(),
    })
    .unwrap_or(Value::Null)
}

/// A `rejected` result for a command that never became a request row.
pub fn rejected_event(request_id: &str, error: &str, now: DateTime<Utc>) -> Value {
    let at = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::to_value(ResultEvent {
        request_id: request_id.to_owned(),
        status: "rejected".to_owned(),
        counts: Counts::default(),
        pages: 0,
        started_at: at.clone(),
        finished_at: Some(at),
        error: Some(error.to_owned()),
    })
    .unwrap_or(Value::Null)
}
