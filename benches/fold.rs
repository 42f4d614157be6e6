//! Fold benchmark on PostgreSQL: the batched fold against a naive per-product fold (find, then
//! insert or update through sea-orm's ActiveModel) in three situations — initial load,
//! re-sync with nothing changed, re-sync with 10% changed. Prints one parseable line per case:
//!
//! `fold-bench: case=<initial|unchanged|changed10> products=<n> runs=<r> batched_per_s=<x> naive_per_s=<y> ratio=<x/y> range=<min-max batched>`
//!
//! The `initial` line goes on with its limit, the raw `COPY` path measured in the same run:
//! the rows each run's initial fold stored (products, change rows, queue rows) loaded again by
//! `COPY` into empty copies of their tables — `copy_per_s=<median> copy_ratio=<median of each
//! run's batched/copy> copy_ratios=<each run's>`.
//!
//! The batched fold folds a catalogue's pages as the service folds a command's: `FOLDS_IN_FLIGHT`
//! pages at once (one after another it was 19,400/s `initial`, 0.41 of `COPY`; 28,900/s,
//! 0.63, at once — 2026-12-07). The naive baseline folds one page at a time.
//!
//! After an untimed warm-up, each case runs `--runs` times (default 3) on fresh systems; the
//! figures are medians. Each run's outcome counts are asserted (created, updated, unchanged),
//! so a fold that did nothing cannot pass for a fast one.
//!
//! Run: `deploy/local/postgres.sh up && cargo bench --bench fold` (options after `--`:
//! `--products N` (default 20000), `--naive-products N` (default 3000; 0 skips the baseline and prints
//! the batched figures only, for profiling), `--page-size N`
//! (default 500), `--keep-db` (leave the database for inspection)). `PRODUCT_SYNC_BENCH_DATABASE_URL` names the server (default: the local
//! test PostgreSQL); each run makes its own database.

use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use product_sync::config::DatabaseSettings;
use product_sync::diff;
use product_sync::pipeline::process::FOLDS_IN_FLIGHT;
use product_sync::product::{Content, Product, parse_decimal};
use product_sync::retry::RetryPolicy;
use product_sync::store::entity::{product_changes, products};
use product_sync::store::fold::{FoldContext, fold_page};
use product_sync::store::{connect, migrate};
use sea_orm::ActiveValue::{NotSet, Set};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, Database, DatabaseConnection, EntityTrait,
    QueryFilter, TransactionTrait,
};
use secrecy::SecretString;
use serde_json::{Value, json};

#[path = "support/copy.rs"]
mod copy;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const CATEGORIES: [&str; 3] = ["fixed_income", "equity", "mixed"];

fn catalogue(n: usize, version: i64, changed_every: Option<usize>) -> Vec<Product> {
    (0..n)
        .map(|i| {
            let changed = changed_every.is_some_and(|k| i % k == 0);
            let v = if changed { version + 1 } else { version };
            let nav = if changed {
                format!("2.{:06}", i % 1_000_000)
            } else {
                format!("1.{:06}", i % 1_000_000)
            };
            let r = json!({
                "product_code": format!("BENCH-{i:08}"),
                "product_name": format!("基准理财产品{i}号"),
                "category": CATEGORIES[i % 3],
                "risk_level": format!("R{}", i % 5 + 1),
                "currency": "CNY",
                "issuer": "示例银行股份有限公司",
                "status": "on_sale",
                "nav": nav,
                "expected_yield": format!("0.0{:04}", i % 9_999),
                "min_investment": "10000.00",
                "term_days": 30 + (i % 365),
                "sale_start": "2026-01-01",
                "sale_end": "2026-12-31",
                "keywords": ["稳健", format!("k{}", i % 17)],
                "attributes": {"channel": "app", "tier": i % 4},
                "version": v,
                "updated_at": "2026-11-01T08:00:00Z"
            });
            Product::from_json(&r).expect("generated records follow the contract")
        })
        .collect()
}

async fn batched(
    db: &DatabaseConnection,
    system: &str,
    products: &[Product],
    page_size: usize,
) -> (Duration, Counts) {
    let ctx = FoldContext {
        system,
        request_id: Some("bench"),
        traceparent: None,
    };
    let policy = RetryPolicy::with_budget(Duration::from_secs(60));
    let mut counts = Counts::default();
    let started = Instant::now();
    // As the service folds a command's pages: several at once, outcomes in page order.
    let folds = futures::stream::iter(products.chunks(page_size))
        .map(|page| fold_page(db, &ctx, page, &policy))
        .buffered(FOLDS_IN_FLIGHT);
    let mut folds = std::pin::pin!(folds);
    while let Some(o) = folds.next().await {
        let o = o.expect("batched fold");
        counts.created += o.created as usize;
        counts.updated += o.updated as usize;
        counts.unchanged += (o.unchanged + o.stale) as usize;
    }
    (started.elapsed(), counts)
}

/// What a fold did, so a fold that did nothing cannot pass for a fast one.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    created: usize,
    updated: usize,
    /// Unchanged or stale: nothing written.
    unchanged: usize,
}

/// What each case must do to `n` products.
fn expected(case: &str, n: usize) -> Counts {
    let changed = n.div_ceil(10);
    match case {
        "initial" => Counts {
            created: n,
            ..Counts::default()
        },
        "unchanged" => Counts {
            unchanged: n,
            ..Counts::default()
        },
        _ => Counts {
            updated: changed,
            unchanged: n - changed,
            ..Counts::default()
        },
    }
}

fn model_to_content(m: &products::Model) -> Content {
    Content {
        product_code: m.product_code.clone(),
        product_name: m.product_name.clone(),
        category: m.category.clone(),
        risk_level: m.risk_level.as_deref().and_then(|s| s.parse().ok()),
        currency: m.currency.clone(),
        issuer: m.issuer.clone(),
        status: m.status.as_deref().and_then(|s| s.parse().ok()),
        nav: m.nav.and_then(|d| parse_decimal(&d.to_string()).ok()),
        expected_yield: m
            .expected_yield
            .and_then(|d| parse_decimal(&d.to_string()).ok()),
        min_investment: m
            .min_investment
            .and_then(|d| parse_decimal(&d.to_string()).ok()),
        term_days: m.term_days,
        sale_start: m.sale_start,
        sale_end: m.sale_end,
        keywords: serde_json::from_value(m.keywords.clone()).unwrap_or_default(),
        attributes: m
            .attributes
            .as_object()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .collect(),
    }
}

fn active_model(
    system: &str,
    key: &str,
    p: &Product,
    hash: String,
    revision: i64,
    now: chrono::DateTime<Utc>,
) -> products::ActiveModel {
    let c = &p.content;
    products::ActiveModel {
        id: NotSet,
        system: Set(system.to_owned()),
        identity: Set(key.to_owned()),
        product_code: Set(c.product_code.clone()),
        product_name: Set(c.product_name.clone()),
        category: Set(c.category.clone()),
        risk_level: Set(c.risk_level.map(|r| r.as_str().to_owned())),
        currency: Set(c.currency.clone()),
        issuer: Set(c.issuer.clone()),
        status: Set(c.status.map(|s| s.as_str().to_owned())),
        nav: Set(c.nav),
        expected_yield: Set(c.expected_yield),
        min_investment: Set(c.min_investment),
        term_days: Set(c.term_days),
        sale_start: Set(c.sale_start),
        sale_end: Set(c.sale_end),
        keywords: Set(json!(c.keywords)),
        attributes: Set(Value::Object(c.attributes.clone().into_iter().collect())),
        source_version: Set(p.version),
        source_updated_at: Set(p.updated_at),
        content_hash: Set(hash),
        revision: Set(revision),
        created_at: Set(now),
        updated_at: Set(now),
        delisted_at: Set(None),
    }
}

/// The baseline: per product, find it, then insert or update it and its change row through
/// ActiveModel — one transaction per page, like the batched fold.
async fn naive(
    db: &DatabaseConnection,
    system: &str,
    items: &[Product],
    page_size: usize,
) -> (Duration, Counts) {
    let mut counts = Counts::default();
    let started = Instant::now();
    for page in items.chunks(page_size) {
        let txn = db.begin().await.expect("begin");
        for p in page {
            let key = p.identity().key();
            let found = products::Entity::find()
                .filter(products::Column::System.eq(system))
                .filter(products::Column::Identity.eq(key.clone()))
                .one(&txn)
                .await
                .expect("find");
            let hash = p.content.hash();
            let now = Utc::now();
            let c = &p.content;
            let (op, revision, changes, before, id) = match found {
                Some(m) if p.version < m.source_version || m.content_hash == hash => {
                    counts.unchanged += 1;
                    continue;
                }
                Some(m) => {
                    let before = Product {
                        content: model_to_content(&m),
                        version: m.source_version,
                        updated_at: m.source_updated_at,
                    };
                    let changes = diff::diff(&before.content, c);
                    let revision = m.revision + 1;
                    let mut am = active_model(system, &key, p, hash, revision, now);
                    am.id = Set(m.id);
                    am.created_at = NotSet;
                    am.update(&txn).await.expect("update");
                    counts.updated += 1;
                    ("updated", revision, changes, before.to_json(), m.id)
                }
                None => {
                    let m = active_model(system, &key, p, hash, 1, now)
                        .insert(&txn)
                        .await
                        .expect("insert");
                    counts.created += 1;
                    ("created", 1, diff::created(c), Value::Null, m.id)
                }
            };
            product_changes::ActiveModel {
                id: NotSet,
                product_id: Set(id),
                system: Set(system.to_owned()),
                identity: Set(key),
                product_code: Set(c.product_code.clone()),
                revision: Set(revision),
                event_id: Set(format!("{system}:{}:{revision}", p.identity().event_key())),
                op: Set(op.to_owned()),
                request_id: Set(Some("bench".into())),
                traceparent: Set(None),
                payload: Set(
                    json!({"op": op, "changes": changes, "before": before, "after": p.to_json()}),
                ),
                created_at: Set(now),
                published_at: Set(None),
            }
            .insert(&txn)
            .await
            .expect("insert change");
        }
        txn.commit().await.expect("commit");
    }
    (started.elapsed(), counts)
}

/// The raw `COPY` path, the limit of the `initial` case: the rows the batched initial fold of
/// `system` stored (its products, their change rows and their queue rows) loaded again by
/// `COPY` into empty copies of their tables. Returns the products and the time of the `COPY`s.
async fn copy_path(db: &DatabaseConnection, system: &str) -> (u64, Duration) {
    let changes = format!("FROM product_changes WHERE system = '{system}'");
    let tables = vec![
        (
            "products",
            format!("SELECT * FROM products WHERE system = '{system}'"),
            "",
        ),
        ("product_changes", format!("SELECT * {changes}"), ""),
        (
            "outbox_pending",
            format!("SELECT product_id, id, product_id, created_at {changes}"),
            "(shard_key, change_id, product_id, created_at)",
        ),
    ];
    copy::copy_again(db, tables)
        .await
        .unwrap_or_else(|e| panic!("the COPY path: {e}"))
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// `min–max` of the samples.
fn spread(xs: Vec<f64>) -> String {
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(0.0, f64::max);
    format!("{min:.0}-{max:.0}")
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("fold bench: run it with `cargo bench --bench fold`");
        return;
    }
    let n = arg("--products", 20_000);
    let n_naive = arg("--naive-products", 3_000).min(n);
    let page_size = arg("--page-size", 500);
    let runs = arg("--runs", 3).max(1);

    let server = std::env::var("PRODUCT_SYNC_BENCH_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://product_sync:product_sync@127.0.0.1:5432/product_sync".into()
    });
    let admin = Database::connect(server.clone()).await.unwrap_or_else(|e| {
        panic!("PostgreSQL unreachable ({e}): start it with `deploy/local/postgres.sh up`")
    });
    let name = format!("ps_bench_{}", std::process::id());
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .expect("drop");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let mut url = url::Url::parse(&server).expect("URL");
    url.set_path(&format!("/{name}"));
    let db = connect(&DatabaseSettings {
        url: SecretString::from(url.to_string()),
        max_connections: 4,
        migrate_on_start: true,
        connect_timeout: Duration::from_secs(10),
        require_tls: false,
    })
    .await
    .expect("connect");
    migrate(&db).await.expect("migrate");

    let v1 = catalogue(n, 1, None);
    let v2 = catalogue(n, 1, Some(10));
    eprintln!(
        "fold bench: {n} products (naive: {n_naive}), pages of {page_size}, PostgreSQL at {name}"
    );

    // A warm-up (pool, plans, caches) that is not timed, then `--runs` samples, each on
    // systems of its own so that `initial` is a real initial load every time; the median is
    // reported. Every sample's counts are checked: a fold that did nothing fails the bench.
    batched(&db, "bench-warmup", &v1[..page_size.min(n)], page_size).await;
    let mut samples: Vec<[(f64, f64); 3]> = Vec::new();
    let (mut copies, mut copy_ratios) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let mut sample = [(0.0, 0.0); 3];
        for (i, (case, batch)) in [("initial", &v1), ("unchanged", &v1), ("changed10", &v2)]
            .into_iter()
            .enumerate()
        {
            let system = format!("bench-batched-{run}");
            let (b, counts) = batched(&db, &system, batch, page_size).await;
            assert_eq!(counts, expected(case, n), "batched fold, case {case}");
            sample[i].0 = rate(n, b);
            if case == "initial" {
                let (rows, took) = copy_path(&db, &system).await;
                assert_eq!(rows, n as u64, "the COPY path loads every product");
                copies.push(rate(n, took));
                copy_ratios.push(sample[i].0 / rate(n, took));
            }
            if n_naive > 0 {
                let (nv, counts) = naive(
                    &db,
                    &format!("bench-naive-{run}"),
                    &batch[..n_naive],
                    page_size,
                )
                .await;
                assert_eq!(counts, expected(case, n_naive), "naive fold, case {case}");
                sample[i].1 = rate(n_naive, nv);
            }
        }
        samples.push(sample);
    }
    let mut lines = Vec::new();
    for (i, case) in ["initial", "unchanged", "changed10"]
        .into_iter()
        .enumerate()
    {
        let x = median(samples.iter().map(|s| s[i].0).collect());
        let mut spread = spread(samples.iter().map(|s| s[i].0).collect());
        if case == "initial" {
            // Against the raw COPY path of the same run: each run's ratio, their median.
            let each: Vec<String> = copy_ratios.iter().map(|r| format!("{r:.2}")).collect();
            spread = format!(
                "{spread} copy_per_s={:.0} copy_ratio={:.2} copy_ratios={}",
                median(copies.clone()),
                median(copy_ratios.clone()),
                each.join("/")
            );
        }
        if n_naive == 0 {
            lines.push(format!(
                "fold-bench: case={case} products={n} runs={runs} batched_per_s={x:.0} range={spread}"
            ));
            continue;
        }
        let y = median(samples.iter().map(|s| s[i].1).collect());
        lines.push(format!(
            "fold-bench: case={case} products={n} runs={runs} batched_per_s={x:.0} naive_per_s={y:.0} ratio={:.1} range={spread}",
            x / y
        ));
    }
    db.close().await.ok();
    if std::env::args().any(|a| a == "--keep-db") {
        eprintln!("fold bench: database {name} kept");
    } else {
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name}"))
            .await
            .ok();
    }
    for line in lines {
        println!("{line}");
    }
}
