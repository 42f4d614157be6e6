//! The fold against real PostgreSQL and SQLite: created / updated / unchanged / stale by code
//! and by name, exact decimals, contract violations applying nothing, idempotence and order
//! independence (property tests), and concurrent folds of overlapping pages.

use std::collections::BTreeMap;
use std::time::Duration;

use product_sync::config::DatabaseSettings;
use product_sync::product::{Identity, Product};
use product_sync::retry::RetryPolicy;
use product_sync::store::entity::product_changes;
use product_sync::store::fold::{FoldContext, FoldOutcome, HEADS_SQL, fold_page, load_all};
use product_sync::store::{self, StoreError};
use proptest::prelude::*;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, Statement,
};
use serde_json::{Value, json};

use crate::helpers::{connect, fresh_pg_database, fresh_sqlite_database, unique};

const CATEGORIES: [&str; 3] = ["fixed_income", "equity", "mixed"];

/// A product record as the management system would send it; `seed` varies the content.
pub fn record(code: Option<&str>, name: &str, version: i64, seed: u64) -> Value {
    let mut r = json!({
        "product_name": name,
        "category": CATEGORIES[(seed % 3) as usize],
        "risk_level": format!("R{}", seed % 5 + 1),
        "currency": "CNY",
        "issuer": "示例银行",
        "status": "on_sale",
        "nav": format!("1.{:04}", seed % 10_000),
        "expected_yield": format!("0.0{}", seed % 97),
        "min_investment": "10000",
        "term_days": 30 + (seed % 300) as i64,
        "sale_start": "2026-01-01",
        "sale_end": "2026-12-31",
        "keywords": ["稳健", format!("k{}", seed % 7)],
        "attributes": {"channel": if seed.is_multiple_of(2) { "app" } else { "branch" }, "tier": seed % 4},
        "version": version,
        "updated_at": "2026-11-01T08:00:00Z"
    });
    if let Some(code) = code {
        r["product_code"] = json!(code);
    }
    r
}

pub fn product(code: Option<&str>, name: &str, version: i64, seed: u64) -> Product {
    Product::from_json(&record(code, name, version, seed))
        .expect("test records follow the contract")
}

fn policy() -> RetryPolicy {
    RetryPolicy::with_budget(Duration::from_secs(60))
}

async fn fold(db: &DatabaseConnection, system: &str, page: &[Product]) -> FoldOutcome {
    let ctx = FoldContext {
        system,
        request_id: Some("req-test"),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    };
    fold_page(db, &ctx, page, &policy()).await.expect("fold")
}

async fn changes(db: &DatabaseConnection, system: &str) -> Vec<product_changes::Model> {
    product_changes::Entity::find()
        .filter(product_changes::Column::System.eq(system))
        .order_by_asc(product_changes::Column::Id)
        .all(db)
        .await
        .expect("read outbox")
}

fn counts(created: u64, updated: u64, unchanged: u64, stale: u64) -> FoldOutcome {
    FoldOutcome {
        fetched: created + updated + unchanged + stale,
        created,
        updated,
        unchanged,
        stale,
        ..FoldOutcome::default()
    }
}

async fn pg() -> DatabaseConnection {
    let db = connect(&fresh_pg_database().await).await;
    store::migrate(&db).await.expect("migrate");
    db
}

async fn sqlite() -> (tempfile::TempDir, DatabaseConnection) {
    let (dir, settings) = fresh_sqlite_database();
    let db = connect(&settings).await;
    store::migrate(&db).await.expect("migrate");
    (dir, db)
}

async fn lifecycle_by_code_and_by_name(db: &DatabaseConnection) {
    let system = "wms";
    let a1 = product(Some("WM-A"), "稳健A", 1, 1);
    let n1 = product(None, "无代码理财", 1, 2);

    assert_eq!(
        fold(db, system, &[a1.clone(), n1.clone()]).await,
        counts(2, 0, 0, 0)
    );
    let rows = changes(db, system).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.op == "created" && r.revision == 1));
    let a_event = rows
        .iter()
        .find(|r| r.product_code.as_deref() == Some("WM-A"))
        .unwrap();
    assert_eq!(a_event.event_id, "wms:WM-A:1");
    assert_eq!(a_event.payload["after"], a1.to_json());
    assert_eq!(a_event.payload["before"], Value::Null);
    assert_eq!(a_event.payload["request_id"], json!("req-test"));
    assert_eq!(
        a_event.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    let n_event = rows.iter().find(|r| r.product_code.is_none()).unwrap();
    assert_eq!(n_event.event_id, "wms:name:无代码理财:1");

    // The same page again: nothing written, nothing emitted.
    assert_eq!(
        fold(db, system, &[a1.clone(), n1.clone()]).await,
        counts(0, 0, 2, 0)
    );
    assert_eq!(changes(db, system).await.len(), 2);

    // Changed content at newer versions: one update each, listing exactly the changed fields.
    let mut a2 = a1.clone();
    a2.version = 2;
    a2.content.nav = Some("1.2345".parse().unwrap());
    let mut n2 = n1.clone();
    n2.version = 2;
    n2.content
        .attributes
        .insert("channel".into(), json!("partner"));
    assert_eq!(
        fold(db, system, &[a2.clone(), n2.clone()]).await,
        counts(0, 2, 0, 0)
    );
    let rows = changes(db, system).await;
    assert_eq!(rows.len(), 4);
    let a_update = rows
        .iter()
        .find(|r| r.event_id == "wms:WM-A:2")
        .expect("a's second revision");
    assert_eq!(a_update.op, "updated");
    assert_eq!(
        a_update.payload["changes"],
        json!([{"field": "nav", "old": "1.0001", "new": "1.2345"}])
    );
    assert_eq!(a_update.payload["before"], a1.to_json());
    let n_update = rows
        .iter()
        .find(|r| r.event_id == "wms:name:无代码理财:2")
        .unwrap();
    assert_eq!(
        n_update.payload["changes"],
        json!([{"field": "attributes.channel", "old": "app", "new": "partner"}])
    );

    // An older version with other content: stale, skipped.
    let mut a_old = a1.clone();
    a_old.content.issuer = Some("旧发行人".into());
    assert_eq!(fold(db, system, &[a_old]).await, counts(0, 0, 0, 1));

    // Same content at a newer version: unchanged, no event; the stored version advances, so
    // the older record is now stale even with content the store never held.
    let mut a3 = a2.clone();
    a3.version = 3;
    assert_eq!(fold(db, system, &[a3.clone()]).await, counts(0, 0, 1, 0));
    let mut a_between = a2.clone();
    a_between.version = 2;
    a_between.content.issuer = Some("中间".into());
    assert_eq!(fold(db, system, &[a_between]).await, counts(0, 0, 0, 1));
    assert_eq!(changes(db, system).await.len(), 4);

    let stored = load_all(db, system).await.unwrap();
    let by_identity: BTreeMap<Identity, (Product, i64)> =
        stored.into_iter().map(|(i, p, r)| (i, (p, r))).collect();
    assert_eq!(by_identity[&Identity::Code("WM-A".into())], (a3, 2));
    assert_eq!(by_identity[&Identity::Name("无代码理财".into())], (n2, 2));
}

#[tokio::test]
async fn postgres_created_updated_unchanged_stale_by_code_and_by_name() {
    lifecycle_by_code_and_by_name(&pg().await).await;
}

#[tokio::test]
async fn sqlite_created_updated_unchanged_stale_by_code_and_by_name() {
    let (_dir, db) = sqlite().await;
    lifecycle_by_code_and_by_name(&db).await;
}

async fn exact_decimals(db: &DatabaseConnection) {
    let mut r = record(Some("DEC-1"), "精确", 1, 0);
    r["nav"] = json!("12345678901234.123456789");
    r["expected_yield"] = json!("0.1");
    r["min_investment"] = json!("-0.0001");
    let p = Product::from_json(&r).unwrap();
    fold(db, "wms", std::slice::from_ref(&p)).await;
    let stored = load_all(db, "wms").await.unwrap();
    let (_, back, _) = &stored[0];
    assert_eq!(
        back.content.nav.unwrap().to_string(),
        "12345678901234.123456789"
    );
    assert_eq!(back.content.expected_yield.unwrap().to_string(), "0.1");
    assert_eq!(back.content.min_investment.unwrap().to_string(), "-0.0001");
    assert_eq!(back, &p);
    // The event carries them as exact strings too.
    let rows = changes(db, "wms").await;
    assert_eq!(
        rows[0].payload["after"]["nav"],
        json!("12345678901234.123456789")
    );
}

#[tokio::test]
async fn postgres_exact_decimals_round_trip() {
    exact_decimals(&pg().await).await;
}

#[tokio::test]
async fn sqlite_exact_decimals_round_trip() {
    let (_dir, db) = sqlite().await;
    exact_decimals(&db).await;
}

async fn invalid_record_applies_nothing(db: &DatabaseConnection) {
    let good = product(Some("OK-1"), "好", 1, 1);
    let mut bad = product(Some("BAD-1"), "坏", 1, 2);
    bad.content.currency = Some("yuan".into());
    let ctx = FoldContext {
        system: "wms",
        request_id: None,
        traceparent: None,
    };
    let err = fold_page(db, &ctx, &[good, bad], &policy())
        .await
        .unwrap_err();
    match &err {
        StoreError::InvalidRecord {
            index,
            identity,
            error,
        } => {
            assert_eq!(*index, 1);
            assert!(identity.contains("BAD-1"), "{err}");
            assert_eq!(error.field, "currency");
        }
        other => panic!("expected InvalidRecord, got {other}"),
    }
    assert!(!err.is_transient());
    assert!(
        load_all(db, "wms").await.unwrap().is_empty(),
        "nothing of the page was applied"
    );
    assert!(changes(db, "wms").await.is_empty());

    // Values only PostgreSQL used to refuse (with a raw database error): refused by both
    // backends alike, before any database work, naming the field.
    let long_category = {
        let mut p = product(Some("BAD-2"), "长", 1, 3);
        p.content.category = Some("c".repeat(65));
        ("category", p)
    };
    let nul_in_name = {
        let mut p = product(Some("BAD-3"), "名", 1, 4);
        p.content.product_name = "a\0b".into();
        ("product_name", p)
    };
    let nul_in_issuer = {
        let mut p = product(Some("BAD-4"), "发", 1, 5);
        p.content.issuer = Some("bank\0".into());
        ("issuer", p)
    };
    for (field, bad) in [long_category, nul_in_name, nul_in_issuer] {
        let good = product(Some("OK-2"), "好", 1, 1);
        match fold_page(db, &ctx, &[good, bad], &policy()).await {
            Err(StoreError::InvalidRecord { error, .. }) => assert_eq!(error.field, field),
            other => panic!("{field}: expected InvalidRecord, got {other:?}"),
        }
    }
    assert!(load_all(db, "wms").await.unwrap().is_empty());
}

#[tokio::test]
async fn postgres_invalid_record_applies_nothing() {
    invalid_record_applies_nothing(&pg().await).await;
}

#[tokio::test]
async fn sqlite_invalid_record_applies_nothing() {
    let (_dir, db) = sqlite().await;
    invalid_record_applies_nothing(&db).await;
}

/// The store's visible state of one system: products with revisions, and outbox event ids.
async fn snapshot(
    db: &DatabaseConnection,
    system: &str,
) -> (Vec<(Identity, Product, i64)>, Vec<String>) {
    let products = load_all(db, system).await.unwrap();
    let events = changes(db, system)
        .await
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    (products, events)
}

fn page_strategy() -> impl Strategy<Value = Vec<(u8, i64, u64, bool)>> {
    // (product index, version, content seed, has code)
    proptest::collection::vec(
        (0u8..12, 1i64..6, 0u64..50, proptest::bool::weighted(0.8)),
        1..25,
    )
}

fn build_page(spec: &[(u8, i64, u64, bool)]) -> Vec<Product> {
    spec.iter()
        .map(|(i, v, seed, coded)| {
            let code = format!("P-{i}");
            product(
                coded.then_some(code.as_str()),
                &format!("名称{i}"),
                *v,
                *seed,
            )
        })
        .collect()
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Property tests share one database per backend; each case uses its own `system`.
fn property_db(backend: &str) -> (Option<tempfile::TempDir>, DatabaseSettings) {
    match backend {
        "postgres" => (None, run(fresh_pg_database())),
        _ => {
            let (dir, s) = fresh_sqlite_database();
            (Some(dir), s)
        }
    }
}

fn fold_twice_equals_once(backend: &str) {
    let (_dir, settings) = property_db(backend);
    run(async {
        let db = connect(&settings).await;
        store::migrate(&db).await.unwrap();
    });
    proptest!(ProptestConfig::with_cases(24), |(spec in page_strategy())| {
        let page = build_page(&spec);
        let system = unique("sys");
        let (once, twice, second) = run(async {
            let db = connect(&settings).await;
            fold(&db, &system, &page).await;
            let once = snapshot(&db, &system).await;
            let second = fold(&db, &system, &page).await;
            let twice = snapshot(&db, &system).await;
            (once, twice, second)
        });
        prop_assert_eq!(&once, &twice);
        prop_assert_eq!(second.created + second.updated, 0);
    });
}

#[test]
fn postgres_folding_a_page_twice_equals_folding_it_once() {
    fold_twice_equals_once("postgres");
}

#[test]
fn sqlite_folding_a_page_twice_equals_folding_it_once() {
    fold_twice_equals_once("sqlite");
}

fn any_order_same_state(backend: &str) {
    let (_dir, settings) = property_db(backend);
    run(async {
        let db = connect(&settings).await;
        store::migrate(&db).await.unwrap();
    });
    // Pages 1..=n where page v holds every product at version v (content differs by version);
    // whatever order they are folded in, the store ends at each product's highest version.
    let strategy = (2usize..5, 1u8..8).prop_flat_map(|(versions, products)| {
        let order: Vec<usize> = (1..=versions).collect();
        (Just(products), Just(order).prop_shuffle())
    });
    proptest!(ProptestConfig::with_cases(16), |((products, order) in strategy)| {
        let page_of = |v: usize| -> Vec<Product> {
            (0..products)
                .map(|i| product(Some(&format!("P-{i}")), &format!("名称{i}"), v as i64, (v as u64) * 31 + i as u64))
                .collect()
        };
        let highest = *order.iter().max().unwrap();
        let (shuffled, direct) = run(async {
            let db = connect(&settings).await;
            let a = unique("sys");
            for v in &order {
                fold(&db, &a, &page_of(*v)).await;
            }
            let b = unique("sys");
            fold(&db, &b, &page_of(highest)).await;
            let content = |rows: Vec<(Identity, Product, i64)>| rows.into_iter().map(|(i, p, _)| (i, p)).collect::<Vec<_>>();
            (content(load_all(&db, &a).await.unwrap()), content(load_all(&db, &b).await.unwrap()))
        });
        prop_assert_eq!(shuffled, direct);
    });
}

#[test]
fn postgres_pages_of_increasing_versions_in_any_order_end_in_the_same_state() {
    any_order_same_state("postgres");
}

#[test]
fn sqlite_pages_of_increasing_versions_in_any_order_end_in_the_same_state() {
    any_order_same_state("sqlite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_overlapping_folds_keep_every_invariant() {
    let settings = fresh_pg_database().await;
    let db = connect(&settings).await;
    store::migrate(&db).await.unwrap();
    let system = "wms";
    let products = 60u64;
    let tasks = 8u64;
    let pages_per_task = 12u64;

    // Each task folds pages of overlapping products at pseudo-random versions 1..=6; the
    // content of (product, version) is fixed, so the truth is each product's highest version.
    let mut handles = Vec::new();
    for t in 0..tasks {
        let settings = settings.clone();
        handles.push(tokio::spawn(async move {
            let db = connect(&settings).await;
            let mut folded: Vec<(u64, i64)> = Vec::new();
            let mut total = FoldOutcome::default();
            for p in 0..pages_per_task {
                let mut page = Vec::new();
                for k in 0..25u64 {
                    let i = (t * 7 + p * 13 + k * 5) % products;
                    let v = ((t + p + k) % 6 + 1) as i64;
                    page.push(product(
                        Some(&format!("C-{i}")),
                        &format!("并发{i}"),
                        v,
                        i * 100 + v as u64,
                    ));
                    folded.push((i, v));
                }
                total.add(fold(&db, system, &page).await);
            }
            (folded, total)
        }));
    }
    let mut highest: BTreeMap<u64, i64> = BTreeMap::new();
    for h in handles {
        let (folded, total) = h.await.unwrap();
        assert_eq!(
            total.fetched,
            total.created + total.updated + total.unchanged + total.stale
        );
        for (i, v) in folded {
            let e = highest.entry(i).or_insert(0);
            *e = (*e).max(v);
        }
    }

    let stored = load_all(&db, system).await.unwrap();
    assert_eq!(stored.len(), highest.len(), "one row per product");
    let events = changes(&db, system).await;
    for (identity, product_now, revision) in &stored {
        let Identity::Code(code) = identity else {
            panic!("coded products only")
        };
        let i: u64 = code.trim_start_matches("C-").parse().unwrap();
        // No lost update: the store holds the highest version anyone folded, with its content.
        let v = highest[&i];
        assert_eq!(
            product_now,
            &product(Some(code), &format!("并发{i}"), v, i * 100 + v as u64)
        );
        // One change row per revision, revisions 1..=n without gaps, increasing with version.
        let mine: Vec<&product_changes::Model> = events
            .iter()
            .filter(|e| e.product_code.as_deref() == Some(code))
            .collect();
        let mut revisions: Vec<i64> = mine.iter().map(|e| e.revision).collect();
        revisions.sort();
        assert_eq!(revisions, (1..=*revision).collect::<Vec<_>>(), "{code}");
        let mut by_revision = mine.clone();
        by_revision.sort_by_key(|e| e.revision);
        let versions: Vec<i64> = by_revision
            .iter()
            .map(|e| e.payload["source_version"].as_i64().unwrap())
            .collect();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "{code}: versions by revision {versions:?}"
        );
    }
}

/// The plan PostgreSQL chooses for the heads read of a page of `keys`.
async fn heads_plan(db: &DatabaseConnection, system: &str, keys: &[String]) -> String {
    let array = sea_orm::Value::Array(
        sea_orm::sea_query::ArrayType::String,
        Some(Box::new(
            keys.iter()
                .map(|k| sea_orm::Value::String(Some(k.clone())))
                .collect(),
        )),
    );
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            format!("EXPLAIN {HEADS_SQL}"),
            [system.into(), array],
        ))
        .await
        .expect("explain");
    rows.iter()
        .map(|r| r.try_get_by_index::<String>(0).expect("plan line"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Performance regression found by profiling: with statistics not yet gathered after a bulk
/// load, the heads read scanned every row of the system for each page. It must probe the
/// unique index once per key, before and after ANALYZE, whatever the table's size.
#[tokio::test]
async fn postgres_heads_read_probes_the_index_per_key_with_or_without_statistics() {
    let db = pg().await;
    let system = "plan";
    let page: Vec<Product> = (0..3000)
        .map(|i| product(Some(&format!("P{i:05}")), &format!("p{i}"), 1, i))
        .collect();
    for chunk in page.chunks(500) {
        fold(&db, system, chunk).await;
    }
    let keys: Vec<String> = page[1000..1500]
        .iter()
        .map(|p| p.identity().key())
        .collect();
    for moment in ["before ANALYZE", "after ANALYZE"] {
        let plan = heads_plan(&db, system, &keys).await;
        assert!(
            plan.contains("Index Scan using ux_products_system_identity")
                && !plan.contains("Seq Scan on products")
                && !plan.contains("Bitmap Heap Scan"),
            "{moment}: the heads read does not probe the index per key:\n{plan}"
        );
        db.execute_unprepared("ANALYZE products")
            .await
            .expect("analyze");
    }
}

/// Delisting and relisting at the store's level, on either backend: the code-less product
/// only by an `all` scope; a product changed since it was read is not delisted; an unchanged
/// record of a delisted product relists it.
async fn delist_and_relist(db: &DatabaseConnection) {
    use product_sync::store::fold::{Scope, candidates, delist};
    use std::collections::HashSet;
    let system = "wms";
    let a = product(Some("WM-A"), "A", 1, 1);
    let b = product(Some("WM-B"), "B", 1, 2);
    let n = product(None, "无代码", 1, 3);
    fold(db, system, &[a.clone(), b.clone(), n.clone()]).await;
    let seen: HashSet<String> = [a.identity().key()].into();
    let (in_scope, unseen) = candidates(db, system, Scope::All, &seen).await.unwrap();
    assert_eq!(in_scope, 3);
    assert_eq!(unseen.len(), 2, "{unseen:?}");
    // b changes after the snapshot read it: not delisted on stale evidence.
    let mut b2 = b.clone();
    b2.version = 2;
    b2.content.product_name = "B2".into();
    fold(db, system, &[b2]).await;
    let ctx = FoldContext {
        system,
        request_id: Some("snap"),
        traceparent: None,
    };
    let delisted = delist(db, &ctx, &unseen, chrono::Utc::now()).await.unwrap();
    assert_eq!(
        delisted, 1,
        "only the code-less product, unchanged since read"
    );
    let listed: Vec<Identity> = load_all(db, system)
        .await
        .unwrap()
        .into_iter()
        .map(|(i, _, _)| i)
        .collect();
    assert_eq!(listed, [a.identity(), b.identity()]);
    let rows = changes(db, system).await;
    let last = rows.last().unwrap();
    assert_eq!((last.op.as_str(), last.revision), ("delisted", 2));
    assert_eq!(last.payload["before"], n.to_json());
    assert_eq!(last.payload["after"], Value::Null);
    // Not a candidate any more.
    let (in_scope, unseen) = candidates(db, system, Scope::All, &seen).await.unwrap();
    assert_eq!((in_scope, unseen.len()), (2, 1));

    // The same record again relists it (revision 3, no field changed).
    let outcome = fold(db, system, std::slice::from_ref(&n)).await;
    assert_eq!(outcome.relisted, 1);
    let rows = changes(db, system).await;
    let last = rows.last().unwrap();
    assert_eq!((last.op.as_str(), last.revision), ("relisted", 3));
    assert_eq!(last.payload["before"], n.to_json());
    assert_eq!(last.payload["after"], n.to_json());
    assert_eq!(last.payload["changes"], json!([]));
    assert_eq!(load_all(db, system).await.unwrap().len(), 3);
    // And again: nothing.
    assert_eq!(fold(db, system, &[n]).await, counts(0, 0, 1, 0));
}

#[tokio::test]
async fn postgres_delisting_and_relisting() {
    delist_and_relist(&pg().await).await;
}

#[tokio::test]
async fn sqlite_delisting_and_relisting() {
    let (_dir, db) = sqlite().await;
    delist_and_relist(&db).await;
}
