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

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sea_orm::sea_query::{Alias, Expr, Func, OnConflict, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseConnectionType, DatabaseTransaction,
    EntityTrait, FromQueryResult, QueryFilter, QuerySelect, TransactionTrait,
};
use serde::Serialize;
use serde_json::{Value, json};

use super::StoreError;
use super::entity::{product_changes, products};
use crate::diff::{self, FieldChange};
use crate::product::{Content, Identity, Product, parse_decimal};
use crate::retry::{RetryPolicy, retry};
use crate::wire::ChangeEvent;

mod pg;

/// The statement that reads a page's stored heads on PostgreSQL (`$1` the system, `$2` the
/// identity keys): public so a test can check its plan.
pub use pg::HEADS_SQL;

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
}

impl FoldOutcome {
    /// Adds another page's counts.
    pub fn add(&mut self, other: FoldOutcome) {
        self.fetched += other.fetched;
        self.created += other.created;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.stale += other.stale;
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
    // Nothing of a page that holds a record breaking the contract is applied.
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
    let (prepared, duplicates) = prepare(page);
    let mut outcome = retry(policy, "fold page", || fold_once(db, ctx, &prepared)).await?;
    outcome.fetched += duplicates;
    outcome.stale += duplicates;
    Ok(outcome)
}

/// A record with what the fold needs of it computed once.
#[derive(Debug)]
struct Prepared<'a> {
    product: &'a Product,
    identity: Identity,
    key: String,
    /// The content hash, computed once (while the first read is on the server).
    hash: OnceLock<String>,
}

impl Prepared<'_> {
    fn hash(&self) -> &str {
        self.hash.get_or_init(|| self.product.content.hash())
    }
}

/// One record per identity (the highest version; the later one on a tie), sorted by identity
/// key so concurrent writers touch rows in the same order. Returns how many were dropped.
fn prepare(page: &[Product]) -> (Vec<Prepared<'_>>, u64) {
    let mut by_key: BTreeMap<String, Prepared<'_>> = BTreeMap::new();
    let mut duplicates = 0;
    for product in page {
        let identity = product.identity();
        let key = identity.key();
        let candidate = Prepared {
            product,
            hash: OnceLock::new(),
            identity,
            key: key.clone(),
        };
        match by_key.get(&key) {
            Some(existing) => {
                duplicates += 1;
                if product.version >= existing.product.version {
                    by_key.insert(key, candidate);
                }
            }
            None => {
                by_key.insert(key, candidate);
            }
        }
    }
    (by_key.into_values().collect(), duplicates)
}

#[derive(Debug, FromQueryResult)]
struct StoredHead {
    id: i64,
    identity: String,
    source_version: i64,
    revision: i64,
    content_hash: String,
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

/// A planned write of one product.
struct Write<'a> {
    record: &'a Prepared<'a>,
    revision: i64,
    /// `None` for a plain version advance (no event).
    event: Option<PlannedEvent>,
}

enum PlannedEvent {
    /// Everything the event holds comes from the record: derived when the payload is rendered
    /// (on PostgreSQL while the server writes the product rows), not before.
    Created,
    /// The diff against the stored row, read before writing.
    Updated {
        product_id: i64,
        changes: Vec<FieldChange>,
        before: Value,
        after: Value,
    },
}

impl PlannedEvent {
    fn op(&self) -> &'static str {
        match self {
            PlannedEvent::Created => "created",
            PlannedEvent::Updated { .. } => "updated",
        }
    }

    /// The product's id when known before writing (updates); inserts learn it from the write.
    fn product_id(&self) -> Option<i64> {
        match self {
            PlannedEvent::Created => None,
            PlannedEvent::Updated { product_id, .. } => Some(*product_id),
        }
    }
}

async fn fold_once(
    db: &DatabaseConnection,
    ctx: &FoldContext<'_>,
    page: &[Prepared<'_>],
) -> Result<FoldOutcome, StoreError> {
    let mut outcome = FoldOutcome {
        fetched: page.len() as u64,
        ..FoldOutcome::default()
    };
    if page.is_empty() {
        return Ok(outcome);
    }
    // Reads need no transaction: every write below re-checks what was read (module header).
    // The hashes are computed while the server looks the products up.
    let (heads, ()) = tokio::join!(read_heads(db, ctx.system, page), async {
        for record in page {
            record.hash();
        }
    });
    let heads = heads?;

    let mut inserts: Vec<Write<'_>> = Vec::new();
    let mut updates: Vec<(Write<'_>, i64)> = Vec::new();
    let mut changed: Vec<(&Prepared<'_>, &StoredHead)> = Vec::new();
    for record in page {
        match heads.get(&record.key) {
            None => inserts.push(Write {
                record,
                revision: 1,
                event: Some(PlannedEvent::Created),
            }),
            Some(head) if record.product.version < head.source_version => outcome.stale += 1,
            Some(head) if record.hash() == head.content_hash => {
                outcome.unchanged += 1;
                if record.product.version > head.source_version {
                    updates.push((
                        Write {
                            record,
                            revision: head.revision,
                            event: None,
                        },
                        head.id,
                    ));
                }
            }
            Some(head) => changed.push((record, head)),
        }
    }

    if !changed.is_empty() {
        let ids: Vec<i64> = changed.iter().map(|(_, h)| h.id).collect();
        let stored = read_full(db, &ids).await?;
        for (record, head) in changed {
            let before = stored.get(&head.id).ok_or(StoreError::Conflict)?;
            let changes = diff::diff(&before.content, &record.product.content);
            if changes.is_empty() {
                // Equal content under a different hash: a hash from an older canonical form.
                outcome.unchanged += 1;
                continue;
            }
            outcome.updated += 1;
            updates.push((
                Write {
                    record,
                    revision: head.revision + 1,
                    event: Some(PlannedEvent::Updated {
                        product_id: head.id,
                        changes,
                        before: before.to_json(),
                        after: record.product.to_json(),
                    }),
                },
                head.id,
            ));
        }
    }
    outcome.created = inserts.len() as u64;

    if inserts.is_empty() && updates.is_empty() {
        return Ok(outcome);
    }
    let now = Utc::now();
    let mut update_writes: Vec<Write<'_>> = updates.into_iter().map(|(w, _)| w).collect();
    // Version advances were planned before the changes: restore identity order (lock order).
    update_writes.sort_by(|a, b| a.record.key.cmp(&b.record.key));
    if let DatabaseConnectionType::SqlxPostgresPoolConnection(_) = &db.inner {
        pg::write(
            db.get_postgres_connection_pool(),
            ctx,
            &inserts,
            &update_writes,
            now,
        )
        .await?;
        return Ok(outcome);
    }
    let txn = db.begin().await?;
    let inserted_ids = write_products(&txn, ctx.system, &inserts, now, false).await?;
    write_products(&txn, ctx.system, &update_writes, now, true).await?;

    let changed_at = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut outbox = Vec::with_capacity(inserts.len() + update_writes.len());
    for write in inserts.iter().chain(update_writes.iter()) {
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
    Ok(outcome)
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

/// Reads every stored product of a system, in identity order (tests, checks, the demo).
pub async fn load_all(
    db: &impl ConnectionTrait,
    system: &str,
) -> Result<Vec<(Identity, Product, i64)>, StoreError> {
    let rows = select_rows()
        .column(products::Column::Identity)
        .column(products::Column::Revision)
        .filter(products::Column::System.eq(system))
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

/// One product row as written by the SQLite path, borrowed from the record.
struct ProductRow<'a> {
    system: &'a str,
    identity: &'a str,
    product_code: Option<&'a str>,
    product_name: &'a str,
    category: Option<&'a str>,
    risk_level: Option<&'static str>,
    currency: Option<&'a str>,
    issuer: Option<&'a str>,
    status: Option<&'static str>,
    nav: Option<Decimal>,
    expected_yield: Option<Decimal>,
    min_investment: Option<Decimal>,
    term_days: Option<i32>,
    sale_start: Option<NaiveDate>,
    sale_end: Option<NaiveDate>,
    keywords: &'a [String],
    attributes: &'a BTreeMap<String, Value>,
    source_version: i64,
    source_updated_at: Option<DateTime<Utc>>,
    content_hash: &'a str,
    revision: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// The columns of `ProductRow`.
const PRODUCT_COLUMNS: [&str; 23] = [
    "system",
    "identity",
    "product_code",
    "product_name",
    "category",
    "risk_level",
    "currency",
    "issuer",
    "status",
    "nav",
    "expected_yield",
    "min_investment",
    "term_days",
    "sale_start",
    "sale_end",
    "keywords",
    "attributes",
    "source_version",
    "source_updated_at",
    "content_hash",
    "revision",
    "created_at",
    "updated_at",
];

/// The columns an update writes: all but the key and the creation time.
fn updated_columns() -> impl Iterator<Item = &'static str> {
    PRODUCT_COLUMNS
        .into_iter()
        .filter(|name| !matches!(*name, "system" | "identity" | "created_at"))
}

/// The condition of a conditional upsert. A change: the row is still at the revision read and
/// holds other content. A version advance: the row still holds the same content, at the
/// same revision and an older version.
const UPSERT_GUARD: &str = r#"("products"."revision" = "excluded"."revision" - 1 AND "products"."content_hash" <> "excluded"."content_hash")
    OR ("products"."revision" = "excluded"."revision" AND "products"."content_hash" = "excluded"."content_hash"
        AND "products"."source_version" < "excluded"."source_version")"#;

fn product_row<'a>(system: &'a str, w: &'a Write<'a>, now: DateTime<Utc>) -> ProductRow<'a> {
    let p = w.record.product;
    let c = &p.content;
    ProductRow {
        system,
        identity: &w.record.key,
        product_code: c.product_code.as_deref(),
        product_name: &c.product_name,
        category: c.category.as_deref(),
        risk_level: c.risk_level.map(|r| r.as_str()),
        currency: c.currency.as_deref(),
        issuer: c.issuer.as_deref(),
        status: c.status.map(|s| s.as_str()),
        nav: c.nav,
        expected_yield: c.expected_yield,
        min_investment: c.min_investment,
        term_days: c.term_days,
        sale_start: c.sale_start,
        sale_end: c.sale_end,
        keywords: &c.keywords,
        attributes: &c.attributes,
        source_version: p.version,
        source_updated_at: p.updated_at,
        content_hash: w.record.hash(),
        revision: w.revision,
        created_at: now,
        updated_at: now,
    }
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
        let rows: Vec<ProductRow<'_>> = chunk.iter().map(|w| product_row(system, w, now)).collect();
        let returned = txn
            .query_all(&products_statement_values(rows, existing)?)
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

/// Other backends: a multi-row `INSERT … VALUES … ON CONFLICT`.
fn products_statement_values(
    rows: Vec<ProductRow<'_>>,
    existing: bool,
) -> Result<sea_orm::sea_query::InsertStatement, StoreError> {
    let mut insert = Query::insert();
    insert
        .into_table(products::Entity)
        .columns(PRODUCT_COLUMNS.iter().map(|name| Alias::new(*name)));
    for r in rows {
        let values: Vec<Expr> = vec![
            r.system.into(),
            r.identity.into(),
            r.product_code.map(str::to_owned).into(),
            r.product_name.into(),
            r.category.map(str::to_owned).into(),
            r.risk_level.map(str::to_owned).into(),
            r.currency.map(str::to_owned).into(),
            r.issuer.map(str::to_owned).into(),
            r.status.map(str::to_owned).into(),
            r.nav.into(),
            r.expected_yield.into(),
            r.min_investment.into(),
            r.term_days.into(),
            r.sale_start.into(),
            r.sale_end.into(),
            json!(r.keywords).into(),
            json!(r.attributes).into(),
            r.source_version.into(),
            r.source_updated_at.into(),
            r.content_hash.into(),
            r.revision.into(),
            r.created_at.into(),
            r.updated_at.into(),
        ];
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

fn to_json_text<T: Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Db(sea_orm::DbErr::Json(e.to_string())))
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
    let derived;
    let (changes, before, after) = match event {
        PlannedEvent::Created => {
            derived = (diff::created(&product.content), product.to_json());
            (&derived.0, &Value::Null, &derived.1)
        }
        PlannedEvent::Updated {
            changes,
            before,
            after,
            ..
        } => (changes, before, after),
    };
    to_json_text(&ChangeEvent {
        op: event.op(),
        system: ctx.system,
        product_code: product.content.product_code.as_deref(),
        revision: write.revision,
        request_id: ctx.request_id,
        changes,
        before,
        after,
        source_version: product.version,
        changed_at,
        reduced: false,
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
