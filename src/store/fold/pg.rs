//! The fold's PostgreSQL write path: one transaction of three statements whatever the page's
//! size, each column bound as one binary array and expanded by `unnest` — no per-row
//! parameters and no JSON envelope for the server to parse (profiling showed
//! `json_to_recordset` parsing cost more than the inserts themselves). The outbox payloads are
//! rendered while the server writes the product rows.
//!
//! The statements are the conditional writes described in the parent module: inserts skip
//! rows another writer created first, updates apply only under [`UPSERT_GUARD`], and a row
//! not written is a [`StoreError::Conflict`].

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use sea_orm::sqlx::{self, PgConnection, PgPool, Row};
use sea_orm::{DbErr, RuntimeErr};

use super::columns::{Array, Column, Kind, pg_type};
use super::plan::{PlannedEvent, StoredHead, Write};
use super::{CHUNK, FoldContext, UPSERT_GUARD, event_id, render_event, updated_columns};
use crate::store::StoreError;

/// `INSERT INTO products (…) SELECT … FROM unnest(…) … ON CONFLICT (system, identity)`, built
/// from the column table: `$1` the system, `$2` the fold's time, then one array per column.
static PRODUCT_INSERT: LazyLock<String> = LazyLock::new(|| {
    let (mut select, mut args, mut alias) = (Vec::new(), Vec::new(), Vec::new());
    for column in Column::ALL {
        let name = column.name();
        match column.kind() {
            Kind::System => select.push("$1".to_owned()),
            Kind::Now => select.push("$2".to_owned()),
            Kind::Listed => select.push("NULL::timestamptz".to_owned()),
            kind => {
                let cast = if kind == Kind::Json { "::json" } else { "" };
                select.push(format!("r.{name}{cast}"));
                args.push(format!("${}::{}[]", args.len() + 3, pg_type(kind)));
                alias.push(name);
            }
        }
    }
    let names: Vec<&str> = Column::ALL.iter().map(|c| c.name()).collect();
    format!(
        "INSERT INTO products ({}) SELECT {} FROM unnest({}) AS r({}) ON CONFLICT (system, identity) ",
        names.join(", "),
        select.join(", "),
        args.join(", "),
        alias.join(", ")
    )
});

static INSERT_SQL: LazyLock<String> =
    LazyLock::new(|| format!("{} DO NOTHING RETURNING id, identity", *PRODUCT_INSERT));

static UPSERT_SQL: LazyLock<String> = LazyLock::new(|| {
    let set = updated_columns()
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{} DO UPDATE SET {set} WHERE {UPSERT_GUARD} RETURNING id, identity",
        *PRODUCT_INSERT
    )
});

/// The change rows (history, never rewritten) and, in the same statement, their entries in the
/// relay's queue (`outbox_pending`, sharded by product row id), queued in change-id order.
const OUTBOX_SQL: &str = "WITH c AS (INSERT INTO product_changes (product_id, system, identity, \
     product_code, revision, event_id, op, request_id, traceparent, payload, created_at) \
     SELECT r.product_id, $1, r.identity, r.product_code, r.revision, r.event_id, r.op, $2, $3, \
     r.payload::json, $4 \
     FROM unnest($5::int8[], $6::text[], $7::text[], $8::int8[], $9::text[], $10::text[], \
     $11::text[]) AS r(product_id, identity, product_code, revision, event_id, op, payload) \
     RETURNING id, product_id) \
     INSERT INTO outbox_pending (shard_key, change_id, product_id, created_at) \
     SELECT c.product_id, c.id, c.product_id, $4 FROM c ORDER BY c.id";

/// One index lookup per key, whatever the planner believes about the table: a `LIMIT` keeps
/// the lateral subquery from being flattened into a join the planner may turn into a scan of
/// the whole system's rows (it did, with statistics not yet gathered after a bulk load or
/// with the default `random_page_cost`: 3× slower at 20,000 rows and growing with the table).
/// `(system, identity)` is unique, so the `LIMIT` changes no result.
pub const HEADS_SQL: &str = "SELECT p.id, p.identity, p.source_version, p.revision, p.content_hash, \
     p.delisted_at IS NOT NULL AS delisted \
     FROM unnest($2::text[]) AS k(identity) \
     CROSS JOIN LATERAL (SELECT id, identity, source_version, revision, content_hash, delisted_at \
     FROM products WHERE system = $1 AND identity = k.identity LIMIT 1) AS p";

/// Reads the stored heads of the given identity keys (those not stored are absent).
pub(super) async fn read_heads(
    pool: &PgPool,
    system: &str,
    keys: Vec<&str>,
) -> Result<Vec<StoredHead>, StoreError> {
    let rows = sqlx::query(HEADS_SQL)
        .bind(system)
        .bind(keys)
        .fetch_all(pool)
        .await
        .map_err(db_err)?;
    rows.iter()
        .map(|row| {
            Ok(StoredHead {
                id: row.try_get("id")?,
                identity: row.try_get("identity")?,
                source_version: row.try_get("source_version")?,
                revision: row.try_get("revision")?,
                content_hash: row.try_get("content_hash")?,
                delisted: row.try_get("delisted")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db_err)
}

/// Writes a page's inserts and updates and their outbox rows in one transaction.
pub(super) async fn write(
    pool: &PgPool,
    ctx: &FoldContext<'_>,
    inserts: &[Write<'_>],
    updates: &[Write<'_>],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(db_err)?;
    let evented: Vec<(&Write<'_>, &PlannedEvent)> = inserts
        .iter()
        .chain(updates)
        .filter_map(|w| w.event.as_ref().map(|e| (w, e)))
        .collect();
    let changed_at = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    // The server writes the products while this task renders the payloads (they need no id).
    let (ids, payloads) = tokio::join!(
        async {
            let ids = write_products(&mut tx, ctx.system, inserts, now, false).await?;
            write_products(&mut tx, ctx.system, updates, now, true).await?;
            Ok::<_, StoreError>(ids)
        },
        async {
            evented
                .iter()
                .map(|(w, e)| render_event(ctx, w, e, &changed_at))
                .collect::<Result<Vec<String>, StoreError>>()
        }
    );
    let (ids, payloads) = (ids?, payloads?);

    let mut product_ids = Vec::with_capacity(evented.len());
    for (w, e) in &evented {
        let id = match e.product_id() {
            Some(id) => id,
            None => *ids.get(&w.record.key).ok_or(StoreError::Conflict)?,
        };
        product_ids.push(id);
    }
    for ((chunk, ids), payloads) in evented
        .chunks(CHUNK)
        .zip(product_ids.chunks(CHUNK))
        .zip(payloads.chunks(CHUNK))
    {
        sqlx::query(OUTBOX_SQL)
            .bind(ctx.system)
            .bind(ctx.request_id)
            .bind(ctx.traceparent)
            .bind(now)
            .bind(ids)
            .bind(
                chunk
                    .iter()
                    .map(|(w, _)| w.record.key.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                chunk
                    .iter()
                    .map(|(w, _)| w.record.product.content.product_code.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(chunk.iter().map(|(w, _)| w.revision).collect::<Vec<_>>())
            .bind(
                chunk
                    .iter()
                    .map(|(w, _)| event_id(ctx, w))
                    .collect::<Vec<_>>(),
            )
            .bind(chunk.iter().map(|(_, e)| e.op()).collect::<Vec<_>>())
            .bind(payloads)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)
}

/// Inserts (`existing == false`) or conditionally updates products; returns the id of every
/// row written by identity key. Fewer rows than sent: another writer got there first.
async fn write_products(
    conn: &mut PgConnection,
    system: &str,
    writes: &[Write<'_>],
    now: DateTime<Utc>,
    existing: bool,
) -> Result<HashMap<String, i64>, StoreError> {
    let mut ids = HashMap::with_capacity(writes.len());
    let sql: &str = if existing { &UPSERT_SQL } else { &INSERT_SQL };
    for chunk in writes.chunks(CHUNK) {
        let mut query = sqlx::query(sql).bind(system).bind(now);
        for column in Column::ALL {
            if let Some(array) = Array::of(column, chunk)? {
                query = array.bind(query);
            }
        }
        let rows = query.fetch_all(&mut *conn).await.map_err(db_err)?;
        if rows.len() != chunk.len() {
            // Roll back and fold again from a fresh read.
            return Err(StoreError::Conflict);
        }
        for row in rows {
            let id: i64 = row.try_get("id").map_err(db_err)?;
            let identity: String = row.try_get("identity").map_err(db_err)?;
            ids.insert(identity, id);
        }
    }
    Ok(ids)
}

/// A driver error as the store's error, so [`StoreError::is_transient`] classifies it the
/// same way as sea-orm's.
fn db_err(e: sqlx::Error) -> StoreError {
    StoreError::Db(DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e))))
}
