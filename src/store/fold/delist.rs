//! Delisting (DESIGN.md "Snapshot and delisting"): the stored products a snapshot found gone
//! keep their row, get `delisted_at` and revision + 1, and emit a `delisted` change event
//! (`before` the last state, `after` null) through the outbox, in one transaction per chunk.
//!
//! Each row is written only if it is still at the revision the snapshot read and still
//! listed: a product another command changed meanwhile (so the management system answered
//! it) is left listed, never delisted on stale evidence.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect, Set, TransactionTrait,
};

use super::{FoldContext, read_full};
use crate::product::{Identity, Product};
use crate::store::StoreError;
use crate::store::entity::{outbox_pending, product_changes, products};
use crate::wire::ChangeEvent;

/// Rows per delisting transaction.
const DELIST_CHUNK: usize = 500;

/// What a snapshot covers of one system's stored products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    All,
    Category(&'a str),
}

/// A stored, listed product in a snapshot's scope that the snapshot did not see.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct Candidate {
    pub id: i64,
    pub identity: String,
    pub product_code: Option<String>,
    pub revision: i64,
}

/// The stored, listed products of `system` in `scope`: how many there are, and those whose
/// identity key is not in `seen` (the snapshot's candidates, in identity order).
pub async fn candidates(
    db: &impl ConnectionTrait,
    system: &str,
    scope: Scope<'_>,
    seen: &HashSet<String>,
) -> Result<(u64, Vec<Candidate>), StoreError> {
    use products::Column as C;
    let mut query = products::Entity::find()
        .select_only()
        .columns([C::Id, C::Identity, C::ProductCode, C::Revision])
        .filter(C::System.eq(system))
        .filter(C::DelistedAt.is_null());
    if let Scope::Category(category) = scope {
        query = query.filter(C::Category.eq(category));
    }
    let rows = query.into_model::<Candidate>().all(db).await?;
    let in_scope = rows.len() as u64;
    let mut unseen: Vec<Candidate> = rows
        .into_iter()
        .filter(|c| !seen.contains(&c.identity))
        .collect();
    unseen.sort_by(|a, b| a.identity.cmp(&b.identity));
    Ok((in_scope, unseen))
}

/// Delists `gone`; returns how many were delisted (those changed since they were read are
/// left alone).
pub async fn delist(
    db: &DatabaseConnection,
    ctx: &FoldContext<'_>,
    gone: &[Candidate],
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let mut delisted = 0;
    for chunk in gone.chunks(DELIST_CHUNK) {
        delisted += delist_chunk(db, ctx, chunk, now).await?;
    }
    Ok(delisted)
}

async fn delist_chunk(
    db: &DatabaseConnection,
    ctx: &FoldContext<'_>,
    chunk: &[Candidate],
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let ids: Vec<i64> = chunk.iter().map(|c| c.id).collect();
    let last_states = read_full(db, &ids).await?;
    let changed_at = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let txn = db.begin().await?;
    // One guarded write per row, in identity order (the lock order the fold uses too); the
    // history and queue rows of those written go in one statement each.
    let mut changes = Vec::new();
    for candidate in chunk {
        let Some(before) = last_states.get(&candidate.id) else {
            continue;
        };
        let revision = candidate.revision + 1;
        let written = products::Entity::update_many()
            .col_expr(products::Column::DelistedAt, Expr::value(Some(now)))
            .col_expr(products::Column::Revision, Expr::value(revision))
            .col_expr(products::Column::UpdatedAt, Expr::value(now))
            .filter(products::Column::Id.eq(candidate.id))
            .filter(products::Column::Revision.eq(candidate.revision))
            .filter(products::Column::DelistedAt.is_null())
            .exec(&txn)
            .await?;
        if written.rows_affected == 1 {
            changes.push(delisted_change(
                ctx,
                candidate,
                before,
                revision,
                now,
                &changed_at,
            )?);
        }
    }
    let delisted = changes.len() as u64;
    if delisted > 0 {
        let event_ids: Vec<String> = changes
            .iter()
            .filter_map(|c| c.event_id.try_as_ref().cloned())
            .collect();
        product_changes::Entity::insert_many(changes)
            .exec_without_returning(&txn)
            .await?;
        // Queued in change-id order, as the fold queues its rows.
        let written: Vec<(i64, i64)> = product_changes::Entity::find()
            .select_only()
            .columns([
                product_changes::Column::Id,
                product_changes::Column::ProductId,
            ])
            .filter(product_changes::Column::EventId.is_in(event_ids))
            .order_by_asc(product_changes::Column::Id)
            .into_tuple()
            .all(&txn)
            .await?;
        outbox_pending::Entity::insert_many(written.into_iter().map(|(change_id, product_id)| {
            outbox_pending::ActiveModel {
                shard_key: Set(product_id),
                change_id: Set(Some(change_id)),
                product_id: Set(Some(product_id)),
                request_id: Set(None),
                created_at: Set(now),
                parked_at: Set(None),
                park_error: Set(None),
                ..Default::default()
            }
        }))
        .exec_without_returning(&txn)
        .await?;
    }
    txn.commit().await?;
    Ok(delisted)
}

/// The history row of a delisting: its `delisted` event, `before` the last state.
fn delisted_change(
    ctx: &FoldContext<'_>,
    candidate: &Candidate,
    before: &Product,
    revision: i64,
    now: DateTime<Utc>,
    changed_at: &str,
) -> Result<product_changes::ActiveModel, StoreError> {
    let payload = serde_json::to_value(ChangeEvent {
        op: "delisted",
        system: ctx.system,
        product_code: candidate.product_code.as_deref(),
        revision,
        request_id: ctx.request_id,
        changes: crate::wire::Changes::List(&[]),
        before: Some(crate::product::ProductJson(before)),
        after: None,
        source_version: before.version,
        changed_at,
        reduced: false,
    })
    .map_err(|e| StoreError::Db(sea_orm::DbErr::Json(e.to_string())))?;
    let identity: Identity = before.identity();
    Ok(product_changes::ActiveModel {
        product_id: Set(candidate.id),
        system: Set(ctx.system.to_owned()),
        identity: Set(candidate.identity.clone()),
        product_code: Set(candidate.product_code.clone()),
        revision: Set(revision),
        event_id: Set(format!(
            "{}:{}:{revision}",
            ctx.system,
            identity.event_key()
        )),
        op: Set("delisted".to_owned()),
        request_id: Set(ctx.request_id.map(str::to_owned)),
        traceparent: Set(ctx.traceparent.map(str::to_owned)),
        payload: Set(payload),
        created_at: Set(now),
        published_at: Set(None),
        ..Default::default()
    })
}
