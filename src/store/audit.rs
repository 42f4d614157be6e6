//! `audit_log`: the console's audit trail — every action an operator took, who (the name of
//! the operator token used), what, on what, when and with which outcome. Written by the
//! console, read by `GET /api/v1/audit` and the page. Never holds a token or a secret.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};
use serde::Serialize;

use super::StoreError;

/// One recorded action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Its row (0 before it is recorded).
    pub id: i64,
    pub at: DateTime<Utc>,
    /// The operator token's name (`http.operator_tokens`; `admin` for `http.admin_token`).
    pub operator: String,
    /// `submit`, `dlq-replay`, `pause`, `resume`.
    pub action: String,
    /// What it acted on: a request id, a system, a DLQ filter.
    pub target: String,
    /// `ok` or `failed`.
    pub outcome: String,
    /// What it did or why it failed (cut short).
    pub detail: String,
}

/// Cuts a value to the column's length in characters.
fn cut(value: &str, max: usize) -> String {
    value.chars().take(max).collect()
}

/// Records an action.
pub async fn record(db: &DatabaseConnection, entry: &Entry) -> Result<(), StoreError> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DatabaseBackend::Postgres => {
            "INSERT INTO audit_log (at, operator, action, target, outcome, detail) \
             VALUES ($1, $2, $3, $4, $5, $6)"
        }
        _ => {
            "INSERT INTO audit_log (at, operator, action, target, outcome, detail) \
             VALUES (?, ?, ?, ?, ?, ?)"
        }
    };
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        sql,
        [
            entry.at.into(),
            cut(&entry.operator, 64).into(),
            cut(&entry.action, 64).into(),
            cut(&entry.target, 200).into(),
            cut(&entry.outcome, 16).into(),
            cut(&entry.detail, 500).into(),
        ],
    ))
    .await?;
    Ok(())
}

/// The latest `limit` actions, newest first.
pub async fn latest(db: &DatabaseConnection, limit: u64) -> Result<Vec<Entry>, StoreError> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DatabaseBackend::Postgres => {
            "SELECT id, at, operator, action, target, outcome, detail FROM audit_log \
             ORDER BY id DESC LIMIT $1"
        }
        _ => {
            "SELECT id, at, operator, action, target, outcome, detail FROM audit_log \
             ORDER BY id DESC LIMIT ?"
        }
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(backend, sql, [limit.into()]))
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Entry {
                id: r.try_get("", "id")?,
                at: r.try_get("", "at")?,
                operator: r.try_get("", "operator")?,
                action: r.try_get("", "action")?,
                target: r.try_get("", "target")?,
                outcome: r.try_get("", "outcome")?,
                detail: r.try_get("", "detail")?,
            })
        })
        .collect()
}
