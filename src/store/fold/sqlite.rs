//! The fold's writer for SQLite (and any backend without PostgreSQL's array functions):
//! multi-row `INSERT … VALUES … ON CONFLICT` statements built with sea-query, in one
//! transaction with the page's outbox rows and their queue entries.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, Expr, OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, TransactionTrait};

use super::columns::{Column, Kind};
use super::plan::{Plan, PlannedEvent, Write};
use super::{CHUNK, FoldContext, UPSERT_GUARD, event_id, render_event, updated_columns};
use crate::store::StoreError;
use crate::store::entity::{product_changes, products};

/// Writes a page's inserts and updates and their outbox rows in one transaction.
pub(super) async fn write(
    db: &DatabaseConnection,
    ctx: &FoldContext<'_>,
    plan: &Plan<'_>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let txn = db.begin().await?;
    let inserted_ids = write_products(&txn, ctx.system, &plan.inserts, now, false).await?;
    write_products(&txn, ctx.system, &plan.updates, now, true).await?;
    let changed_at = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut outbox = Vec::with_capacity(plan.inserts.len() + plan.updates.len());
    for write in plan.inserts.iter().chain(&plan.updates) {
        let Some(event) = &write.event else { continue };
        let product_id = match event.product_id() {
            Some(id) => id,
            None => *inserted_ids
                .get(&write.record.key)
                .ok_or(StoreError::Conflict)?,
        };
        outbox.push(outbox_row(ctx, write, event, product_id, now, &changed_at)?);
    }
    write_outbox(&txn, &outbox).await?;
    txn.commit().await?;
    Ok(())
}

/// Writes products. `existing == false`: plain inserts that skip rows another writer created
/// first; `true`: upserts guarded by [`UPSERT_GUARD`]. Returns the id of every row written,
/// by identity key; a row not written means another writer got there first: a conflict.
async fn write_products(
    txn: &DatabaseTransaction,
    system: &str,
    writes: &[Write<'_>],
    now: DateTime<Utc>,
    existing: bool,
) -> Result<HashMap<String, i64>, StoreError> {
    let mut ids = HashMap::with_capacity(writes.len());
    for chunk in writes.chunks(CHUNK) {
        let returned = txn
            .query_all(&products_statement(system, chunk, now, existing)?)
            .await?;
        if returned.len() != chunk.len() {
            // Another writer got there first: roll back and fold again from a fresh read.
            return Err(StoreError::Conflict);
        }
        for row in returned {
            let id: i64 = row.try_get("", "id")?;
            let identity: String = row.try_get("", "identity")?;
            ids.insert(identity, id);
        }
    }
    Ok(ids)
}

/// A multi-row `INSERT … VALUES … ON CONFLICT`, its columns and values from the column table.
fn products_statement(
    system: &str,
    writes: &[Write<'_>],
    now: DateTime<Utc>,
    existing: bool,
) -> Result<sea_orm::sea_query::InsertStatement, StoreError> {
    let mut insert = Query::insert();
    insert
        .into_table(products::Entity)
        .columns(Column::ALL.iter().map(|c| Alias::new(c.name())));
    for w in writes {
        let mut values: Vec<Expr> = Vec::with_capacity(Column::ALL.len());
        for column in Column::ALL {
            // Only the statement-wide columns have no per-row value.
            values.push(match column.value(w)? {
                Some(value) => Expr::value(sea_orm::Value::from(value)),
                None if column.kind() == Kind::System => system.into(),
                None if column.kind() == Kind::Listed => Expr::value(Option::<DateTime<Utc>>::None),
                None => now.into(),
            });
        }
        insert
            .values(values)
            .map_err(|e| StoreError::Db(sea_orm::DbErr::Custom(e.to_string())))?;
    }
    let mut on_conflict = OnConflict::columns([Alias::new("system"), Alias::new("identity")]);
    if existing {
        on_conflict
            .update_columns(updated_columns().map(Alias::new))
            .action_and_where(Expr::cust(UPSERT_GUARD));
    } else {
        on_conflict.do_nothing();
    }
    insert
        .on_conflict(on_conflict)
        .returning(Query::returning().columns([Alias::new("id"), Alias::new("identity")]));
    Ok(insert)
}

/// One outbox row (SQLite path).
struct OutboxRow<'a> {
    product_id: i64,
    system: &'a str,
    identity: &'a str,
    product_code: Option<&'a str>,
    revision: i64,
    event_id: String,
    op: &'a str,
    request_id: Option<&'a str>,
    traceparent: Option<&'a str>,
    payload: String,
    created_at: DateTime<Utc>,
}

/// The columns of `OutboxRow`.
const OUTBOX_COLUMNS: [&str; 11] = [
    "product_id",
    "system",
    "identity",
    "product_code",
    "revision",
    "event_id",
    "op",
    "request_id",
    "traceparent",
    "payload",
    "created_at",
];

fn outbox_row<'a>(
    ctx: &FoldContext<'a>,
    write: &'a Write<'a>,
    event: &'a PlannedEvent,
    product_id: i64,
    now: DateTime<Utc>,
    changed_at: &str,
) -> Result<OutboxRow<'a>, StoreError> {
    let product = write.record.product;
    Ok(OutboxRow {
        product_id,
        system: ctx.system,
        identity: &write.record.key,
        product_code: product.content.product_code.as_deref(),
        revision: write.revision,
        event_id: event_id(ctx, write),
        op: event.op(),
        request_id: ctx.request_id,
        traceparent: ctx.traceparent,
        payload: render_event(ctx, write, event, changed_at)?,
        created_at: now,
    })
}

/// Inserts outbox rows in chunks, then queues them for the relay (`outbox_pending`, sharded by
/// product row id) in change-id order (SQLite; PostgreSQL: [`pg`]). SQLite has one writer at
/// a time, so the rows above the highest id seen first are exactly this transaction's.
async fn write_outbox(txn: &DatabaseTransaction, rows: &[OutboxRow<'_>]) -> Result<(), StoreError> {
    let before = txn
        .query_one_raw(sea_orm::Statement::from_string(
            txn.get_database_backend(),
            "SELECT MAX(id) AS m FROM product_changes",
        ))
        .await?
        .and_then(|row| row.try_get_by_index::<Option<i64>>(0).ok().flatten())
        .unwrap_or(0);
    for chunk in rows.chunks(CHUNK) {
        let mut insert = Query::insert();
        insert
            .into_table(product_changes::Entity)
            .columns(OUTBOX_COLUMNS.iter().map(|name| Alias::new(*name)));
        for r in chunk {
            let values: Vec<Expr> = vec![
                r.product_id.into(),
                r.system.into(),
                r.identity.into(),
                r.product_code.map(str::to_owned).into(),
                r.revision.into(),
                r.event_id.clone().into(),
                r.op.into(),
                r.request_id.map(str::to_owned).into(),
                r.traceparent.map(str::to_owned).into(),
                r.payload.clone().into(),
                r.created_at.into(),
            ];
            insert
                .values(values)
                .map_err(|e| StoreError::Db(sea_orm::DbErr::Custom(e.to_string())))?;
        }
        txn.execute(&insert).await?;
    }
    txn.execute_raw(sea_orm::Statement::from_sql_and_values(
        txn.get_database_backend(),
        "INSERT INTO outbox_pending (shard_key, change_id, product_id, created_at) \
         SELECT product_id, id, product_id, created_at FROM product_changes WHERE id > ? ORDER BY id",
        [before.into()],
    ))
    .await?;
    Ok(())
}
