//! The fold (seed claim 5): one page of products from the management system folded into the
//! store in one transaction — unknown products inserted, changed ones updated, identical ones
//! left alone, older ones skipped as stale — and one outbox row per insert or update written
//! in the same transaction.
//!
//! # Cost
//! A page costs a handful of statements whatever its size: one read of the stored
//! (id, version, revision, hash) of all its products; one read of the full stored content of
//! only those whose hash differs (for the diff); one multi-row insert of new products; one
//! multi-row conditional upsert of changed ones; one multi-row insert of outbox rows.
//!
//! # Concurrency: optimistic, conditional writes (no read locks)
//! Several instances may fold overlapping pages at once. Nothing is locked while reading;
//! every write states what it read and only applies if that still holds:
//! - a new product is inserted with `ON CONFLICT (system, identity) DO NOTHING`; if another
//!   transaction inserted it first, fewer rows come back than were sent;
//! - a changed product is written with `ON CONFLICT … DO UPDATE … WHERE products.revision =
//!   <revision read>` (expressed as `excluded.revision - 1`); if another transaction changed it
//!   since, the row is not written and not returned.
//!
//! Either way the transaction is rolled back with [`StoreError::Conflict`] — transient — and
//! the page is folded again from a fresh read, which sees the other writer's result. So there
//! is one row per product, no lost update, revisions grow by exactly one per change, and the
//! unique index on `product_changes (product_id, revision)` backs "one change row per
//! revision". Rows are written in identity order so concurrent writers lock them in the same
//! order (PostgreSQL); deadlocks and SQLite's busy errors are transient too.
//!
//! `unchanged` writes no row and no event. Its one exception: when the record's `version` is
//! newer than the stored one, the stored `source_version` alone is advanced (guarded the same
//! way), so an older record with other content that arrives later is still seen as stale.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Func};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseConnectionType, EntityTrait,
    FromQueryResult, QueryFilter, QuerySelect,
};
use serde::Serialize;
use serde_json::Value;

use super::StoreError;
use super::entity::products;
use crate::product::{Content, Identity, Product, ProductJson, parse_decimal};
use crate::retry::{RetryPolicy, retry};
use crate::wire::{ChangeEvent, Changes, Drift, DriftKind};

mod columns;
mod delist;
mod pg;
mod plan;
mod sqlite;

use plan::{PlannedEvent, Prepared, StoredHead, Write, prepare};

/// The statement that reads a page's stored heads on PostgreSQL (`$1` the system, `$2` the
/// identity keys): public so a test can check its plan.
pub use pg::HEADS_SQL;

pub use delist::{Candidate, Scope, candidates, delist};

/// Rows per multi-row statement: well under both databases' bind-parameter limits.
const CHUNK: usize = 1000;

/// Who asked for this fold: carried into the outbox rows.
#[derive(Debug, Clone, Copy)]
pub struct FoldContext<'a> {
    /// The management system the products come from.
    pub system: &'a str,
    /// The command that caused the fold.
    pub request_id: Option<&'a str>,
    /// W3C trace context of the command, carried onto every event.
    pub traceparent: Option<&'a str>,
}

/// What a page did to the store.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FoldOutcome {
    pub fetched: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub stale: u64,
    /// Delisted products that came back.
    pub relisted: u64,
    /// Products a snapshot delisted (set by the snapshot, never by a page's fold).
    pub delisted: u64,
}

impl FoldOutcome {
    /// Adds another page's counts.
    pub fn add(&mut self, other: FoldOutcome) {
        self.fetched += other.fetched;
        self.created += other.created;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.stale += other.stale;
        self.relisted += other.relisted;
        self.delisted += other.delisted;
    }
}

/// Folds one page, retrying transient failures (conflicts with concurrent writers, lost
/// connections) under `policy`. Idempotent: folding the same page again changes nothing.
pub async fn fold_page(
    db: &DatabaseConnection,
    ctx: &FoldContext<'_>,
    page: &[Product],
    policy: &RetryPolicy,
) -> Result<FoldOutcome, StoreError> {
    validate_page(page)?;
    let (prepared, duplicates) = prepare(page);
    let mut outcome = retry(policy, "fold page", || fold_once(db, ctx, &prepared)).await?;
    outcome.fetched += duplicates;
    outcome.stale += duplicates;
    Ok(outcome)
}

/// Nothing of a page that holds a record breaking the contract is applied (or compared).
fn validate_page(page: &[Product]) -> Result<(), StoreError> {
    for (index, product) in page.iter().enumerate() {
        product
            .content
            .validate()
            .map_err(|error| StoreError::InvalidRecord {
                index,
                identity: crate::text::quote(&product.identity().to_string()),
                error,
            })?;
    }
    Ok(())
}

/// A dry run's fold: what [`fold_page`] would do with `page` — its counts and the keys of the
/// products it would create, update or relist — reading the store and writing nothing.
pub async fn compare_page(
    db: &DatabaseConnection,
    system: &str,
    page: &[Product],
    policy: &RetryPolicy,
) -> Result<(FoldOutcome, Drift), StoreError> {
    validate_page(page)?;
    let (prepared, duplicates) = prepare(page);
    let (mut outcome, drift) = retry(policy, "compare page", || async {
        let mut heads = read_heads(db, system, &prepared).await?;
        // A comparison is a reconciliation: it trusts no stored content hash (a row changed
        // behind product-sync's back keeps its old one), so every matched row is read and
        // diffed in full.
        for head in heads.values_mut() {
            head.content_hash.clear();
        }
        let stored = read_full(db, &plan::to_read(&prepared, &heads)).await?;
        let plan = plan::plan(&prepared, &heads, stored).ok_or(StoreError::Conflict)?;
        let mut drift = Drift::default();
        let key = |w: &Write<'_>| format!("{system}/{}", w.record.identity.event_key());
        for w in &plan.inserts {
            drift.note(DriftKind::Created, key(w));
        }
        for w in &plan.updates {
            match &w.event {
                Some(PlannedEvent::Updated { relisted: true, .. }) => {
                    drift.note(DriftKind::Relisted, key(w))
                }
                Some(_) => drift.note(DriftKind::Updated, key(w)),
                None => {}
            }
        }
        Ok::<_, StoreError>((plan.outcome, drift))
    })
    .await?;
    outcome.fetched += duplicates;
    outcome.stale += duplicates;
    Ok((outcome, drift))
}

/// A stored row with decimals read as text: exact on both backends.
#[derive(Debug, FromQueryResult)]
struct StoredRow {
    id: i64,
    product_code: Option<String>,
    product_name: String,
    category: Option<String>,
    risk_level: Option<String>,
    currency: Option<String>,
    issuer: Option<String>,
    status: Option<String>,
    nav: Option<String>,
    expected_yield: Option<String>,
    min_investment: Option<String>,
    term_days: Option<i32>,
    sale_start: Option<NaiveDate>,
    sale_end: Option<NaiveDate>,
    keywords: Value,
    attributes: Value,
    source_version: i64,
    source_updated_at: Option<DateTime<Utc>>,
}

async fn fold_once(
    db: &DatabaseConnection,
    ctx: &FoldContext<'_>,
    page: &[Prepared<'_>],
) -> Result<FoldOutcome, StoreError> {
    if page.is_empty() {
        return Ok(FoldOutcome::default());
    }
    // Reads need no transaction: every write re-checks what was read (module header).
    // The hashes are computed while the server looks the products up.
    let (heads, ()) = tokio::join!(read_heads(db, ctx.system, page), async {
        for record in page {
            record.hash();
        }
    });
    let heads = heads?;
    let stored = read_full(db, &plan::to_read(page, &heads)).await?;
    // A stored row the heads promised is gone: fold again from a fresh read.
    let plan = plan::plan(page, &heads, stored).ok_or(StoreError::Conflict)?;
    if plan.is_empty() {
        return Ok(plan.outcome);
    }
    let now = Utc::now();
    if let DatabaseConnectionType::SqlxPostgresPoolConnection(_) = &db.inner {
        let pool = db.get_postgres_connection_pool();
        pg::write(pool, ctx, &plan.inserts, &plan.updates, now).await?;
    } else {
        sqlite::write(db, ctx, &plan, now).await?;
    }
    Ok(plan.outcome)
}

async fn read_heads(
    db: &DatabaseConnection,
    system: &str,
    page: &[Prepared<'_>],
) -> Result<HashMap<String, StoredHead>, StoreError> {
    let mut heads = HashMap::with_capacity(page.len());
    for chunk in page.chunks(CHUNK) {
        let keys: Vec<&str> = chunk.iter().map(|p| p.key.as_str()).collect();
        let rows = if let DatabaseConnectionType::SqlxPostgresPoolConnection(_) = &db.inner {
            pg::read_heads(db.get_postgres_connection_pool(), system, keys).await?
        } else {
            products::Entity::find()
                .select_only()
                .columns([
                    products::Column::Id,
                    products::Column::Identity,
                    products::Column::SourceVersion,
                    products::Column::Revision,
                    products::Column::ContentHash,
                ])
                .expr_as(
                    Expr::col(products::Column::DelistedAt).is_not_null(),
                    "delisted",
                )
                .filter(products::Column::System.eq(system))
                .filter(products::Column::Identity.is_in(keys))
                .into_model::<StoredHead>()
                .all(db)
                .await?
        };
        heads.extend(rows.into_iter().map(|h| (h.identity.clone(), h)));
    }
    Ok(heads)
}

/// Reads full stored products by id (decimals as text, see the entity module).
async fn read_full(
    db: &DatabaseConnection,
    ids: &[i64],
) -> Result<HashMap<i64, Product>, StoreError> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(CHUNK) {
        let rows = select_rows()
            .filter(products::Column::Id.is_in(chunk.to_vec()))
            .into_model::<StoredRow>()
            .all(db)
            .await?;
        for row in rows {
            let id = row.id;
            out.insert(id, row_to_product(row)?);
        }
    }
    Ok(out)
}

fn select_rows() -> sea_orm::Select<products::Entity> {
    use products::Column as C;
    let text = |c: C| Func::cast_as(Expr::col(c), Alias::new("TEXT"));
    products::Entity::find()
        .select_only()
        .columns([
            C::Id,
            C::ProductCode,
            C::ProductName,
            C::Category,
            C::RiskLevel,
            C::Currency,
            C::Issuer,
            C::Status,
            C::TermDays,
            C::SaleStart,
            C::SaleEnd,
            C::Keywords,
            C::Attributes,
            C::SourceVersion,
            C::SourceUpdatedAt,
        ])
        .expr_as(text(C::Nav), "nav")
        .expr_as(text(C::ExpectedYield), "expected_yield")
        .expr_as(text(C::MinInvestment), "min_investment")
}

fn row_to_product(row: StoredRow) -> Result<Product, StoreError> {
    let id = row.id;
    let corrupt = |field: &str, reason: String| StoreError::Corrupt {
        id,
        reason: format!("{field}: {reason}"),
    };
    let decimal = |field: &str, v: Option<String>| {
        v.map(|s| parse_decimal(&s).map_err(|e| corrupt(field, e)))
            .transpose()
    };
    let keywords: Vec<String> =
        serde_json::from_value(row.keywords).map_err(|e| corrupt("keywords", e.to_string()))?;
    let attributes = match row.attributes {
        Value::Object(m) => m.into_iter().collect(),
        other => return Err(corrupt("attributes", format!("not an object: {other}"))),
    };
    Ok(Product {
        content: Content {
            product_code: row.product_code,
            product_name: row.product_name,
            category: row.category,
            risk_level: row
                .risk_level
                .map(|s| s.parse().map_err(|e| corrupt("risk_level", e)))
                .transpose()?,
            currency: row.currency,
            issuer: row.issuer,
            status: row
                .status
                .map(|s| s.parse().map_err(|e| corrupt("status", e)))
                .transpose()?,
            nav: decimal("nav", row.nav)?,
            expected_yield: decimal("expected_yield", row.expected_yield)?,
            min_investment: decimal("min_investment", row.min_investment)?,
            term_days: row.term_days,
            sale_start: row.sale_start,
            sale_end: row.sale_end,
            keywords,
            attributes,
        },
        version: row.source_version,
        updated_at: row.source_updated_at,
    })
}

/// Reads every stored, listed product of a system (its current catalogue copy), in identity
/// order (tests, checks, the demo).
pub async fn load_all(
    db: &impl ConnectionTrait,
    system: &str,
) -> Result<Vec<(Identity, Product, i64)>, StoreError> {
    let rows = select_rows()
        .column(products::Column::Identity)
        .column(products::Column::Revision)
        .filter(products::Column::System.eq(system))
        .filter(products::Column::DelistedAt.is_null())
        .into_model::<StoredRowWithRevision>()
        .all(db)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let product = row_to_product(r.row)?;
        out.push((product.identity(), product, r.revision));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[derive(Debug)]
struct StoredRowWithRevision {
    row: StoredRow,
    revision: i64,
}

impl FromQueryResult for StoredRowWithRevision {
    fn from_query_result(res: &sea_orm::QueryResult, pre: &str) -> Result<Self, sea_orm::DbErr> {
        Ok(Self {
            row: StoredRow::from_query_result(res, pre)?,
            revision: res.try_get(pre, "revision")?,
        })
    }
}

/// The columns an update writes: all but the key and the creation time.
pub(super) fn updated_columns() -> impl Iterator<Item = &'static str> {
    columns::Column::ALL
        .into_iter()
        .filter(|c| c.updated())
        .map(|c| c.name())
}

/// The condition of a conditional upsert. A change: the row is still at the revision read and
/// holds other content. A relisting: the row is still at the revision read, delisted. A version advance: the row still holds the same content, at the
/// same revision and an older version.
pub(super) const UPSERT_GUARD: &str = r#"("products"."revision" = "excluded"."revision" - 1 AND "products"."content_hash" <> "excluded"."content_hash")
    OR ("products"."revision" = "excluded"."revision" - 1 AND "products"."delisted_at" IS NOT NULL)
    OR ("products"."revision" = "excluded"."revision" AND "products"."content_hash" = "excluded"."content_hash"
        AND "products"."source_version" < "excluded"."source_version")"#;

pub(super) fn to_json_text<T: Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Db(sea_orm::DbErr::Json(e.to_string())))
}

/// The CloudEvents id of a write: `system:code:revision` (or `system:name:…:revision`).
fn event_id(ctx: &FoldContext<'_>, write: &Write<'_>) -> String {
    format!(
        "{}:{}:{}",
        ctx.system,
        write.record.identity.event_key(),
        write.revision
    )
}

/// The change event of a write, as JSON text.
fn render_event(
    ctx: &FoldContext<'_>,
    write: &Write<'_>,
    event: &PlannedEvent,
    changed_at: &str,
) -> Result<String, StoreError> {
    let product = write.record.product;
    let (changes, before) = match event {
        PlannedEvent::Created => (Changes::Created(&product.content), None),
        PlannedEvent::Updated {
            changes, before, ..
        } => (Changes::List(changes), Some(ProductJson(before))),
    };
    to_json_text(&ChangeEvent {
        op: event.op(),
        system: ctx.system,
        product_code: product.content.product_code.as_deref(),
        revision: write.revision,
        request_id: ctx.request_id,
        changes,
        before,
        after: Some(ProductJson(product)),
        source_version: product.version,
        changed_at,
        reduced: false,
    })
}
