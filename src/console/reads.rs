//! The console's reads from the store, each bounded by a limit and served by an index: recent
//! commands (or those matching a request id or a product code), one command with the change
//! events it caused, one product with its revision history.

use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde_json::{Value, json};

use super::MAX_ROWS;
use crate::store::StoreError;
use crate::store::entity::{product_changes, products, requests};

/// Recent commands, newest first; with `search`, the command with that id or the commands
/// that changed a product with that code in one of `systems`.
pub async fn requests(
    db: &DatabaseConnection,
    search: Option<&str>,
    limit: u64,
    systems: &[String],
) -> Result<Option<Value>, StoreError> {
    use requests::Column as C;
    let rows = match search {
        None => {
            requests::Entity::find()
                .order_by_desc(C::StartedAt)
                .limit(limit)
                .all(db)
                .await?
        }
        Some(q) => {
            let mut ids: Vec<String> = vec![q.to_owned()];
            ids.extend(requests_touching(db, q, limit, systems).await?);
            requests::Entity::find()
                .filter(C::RequestId.is_in(ids))
                .order_by_desc(C::StartedAt)
                .limit(limit)
                .all(db)
                .await?
        }
    };
    let items: Vec<Value> = rows.iter().map(summary).collect();
    Ok(Some(json!({"items": items})))
}

/// Ids of the commands whose change events touched the product(s) with this code (looked up
/// by system and identity: the products' unique index).
async fn requests_touching(
    db: &DatabaseConnection,
    code: &str,
    limit: u64,
    systems: &[String],
) -> Result<Vec<String>, StoreError> {
    let ids: Vec<i64> = products::Entity::find()
        .select_only()
        .column(products::Column::Id)
        .filter(products::Column::System.is_in(systems.iter().cloned()))
        .filter(products::Column::Identity.eq(format!("code:{code}")))
        .limit(MAX_ROWS)
        .into_tuple()
        .all(db)
        .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let requests: Vec<Option<String>> = product_changes::Entity::find()
        .select_only()
        .column(product_changes::Column::RequestId)
        .filter(product_changes::Column::ProductId.is_in(ids))
        .order_by_desc(product_changes::Column::Id)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?;
    Ok(requests.into_iter().flatten().collect())
}

/// One command, with the change events it caused (the first [`MAX_ROWS`]).
pub async fn request(db: &DatabaseConnection, id: &str) -> Result<Option<Value>, StoreError> {
    let Some(row) = requests::Entity::find_by_id(id.to_owned()).one(db).await? else {
        return Ok(None);
    };
    let changes = product_changes::Entity::find()
        .filter(product_changes::Column::RequestId.eq(id))
        .order_by_asc(product_changes::Column::Id)
        .limit(MAX_ROWS)
        .all(db)
        .await?;
    let mut body = summary(&row);
    body["command"] = row.command.clone();
    body["drift"] = row.drift.clone().unwrap_or(Value::Null);
    body["changes"] = json!(changes.iter().map(change).collect::<Vec<_>>());
    body["changes_truncated"] = json!(changes.len() as u64 == MAX_ROWS);
    Ok(Some(body))
}

/// One product (`key`: its code, or `name:<name>` for a code-less one) of `system`: its
/// current state and its revision history, newest first (the last [`MAX_ROWS`]).
pub async fn product(
    db: &DatabaseConnection,
    system: &str,
    key: &str,
) -> Result<Option<Value>, StoreError> {
    let identity = match key.starts_with("name:") {
        true => key.to_owned(),
        false => format!("code:{key}"),
    };
    let Some(row) = products::Entity::find()
        .filter(products::Column::System.eq(system))
        .filter(products::Column::Identity.eq(identity))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    let history = product_changes::Entity::find()
        .filter(product_changes::Column::ProductId.eq(row.id))
        .order_by_desc(product_changes::Column::Revision)
        .limit(MAX_ROWS)
        .all(db)
        .await?;
    let state = history
        .iter()
        .find(|c| !c.payload["after"].is_null())
        .map(|c| c.payload["after"].clone())
        .unwrap_or(Value::Null);
    Ok(Some(json!({
        "system": row.system,
        "product_code": row.product_code,
        "product_name": row.product_name,
        "revision": row.revision,
        "delisted_at": row.delisted_at.map(|t| t.to_rfc3339()),
        "updated_at": row.updated_at.to_rfc3339(),
        "state": state,
        "history": history.iter().map(change).collect::<Vec<_>>(),
    })))
}

/// A command as the list shows it.
fn summary(r: &requests::Model) -> Value {
    let duration_ms = r
        .finished_at
        .map(|f| (f - r.started_at).num_milliseconds().max(0));
    json!({
        "request_id": r.request_id,
        "system": r.system,
        "mode": r.command["mode"].as_str().unwrap_or("incremental"),
        "dry_run": r.command["dry_run"].as_bool().unwrap_or(false),
        "status": r.status,
        "counts": {
            "fetched": r.fetched, "created": r.created, "updated": r.updated,
            "unchanged": r.unchanged, "stale": r.stale, "delisted": r.delisted,
            "relisted": r.relisted,
        },
        "pages": r.pages,
        "started_at": r.started_at.to_rfc3339(),
        "finished_at": r.finished_at.map(|t| t.to_rfc3339()),
        "duration_ms": duration_ms,
        "error": r.error,
        "error_kind": r.error_kind,
    })
}

/// A change event as the console shows it.
fn change(c: &product_changes::Model) -> Value {
    json!({
        "system": c.system,
        "product_code": c.product_code,
        "identity": c.identity,
        "revision": c.revision,
        "op": c.op,
        "request_id": c.request_id,
        "changes": c.payload["changes"],
        "created_at": c.created_at.to_rfc3339(),
    })
}
