//! The outbox relay at scale, against the real broker and the real PostgreSQL: shards split
//! between two processes and moved when one is killed; a late-committing row never skipped;
//! an oversized event published reduced and in order; a refused row parked without holding
//! any other product.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use product_sync::kafka::Publisher;
use product_sync::outbox::queue::{self, Shards};
use product_sync::outbox::shards::{HOLDERS_SQL, Leases};
use product_sync::outbox::{Relay, RelaySettings};
use product_sync::product::Product;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::OwnedMessage;
use sea_orm::{ConnectionTrait, DatabaseBackend, EntityTrait, PaginatorTrait, Statement};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use product_sync::audit::Audit;

use crate::helpers::{unique, wait_for};
use crate::pipeline::{ChildGuard, World, json_of, signal, wait_exit, world};

/// The change topic in order ([`product_sync::audit`]); returns the last revision per key.
pub fn assert_in_order(events: &[OwnedMessage]) -> BTreeMap<String, i64> {
    let audit = Audit::of(events);
    assert!(
        audit.is_clean(),
        "change topic out of order: {:#?}",
        audit.problems
    );
    audit.last.into_iter().map(|(k, (r, _))| (k, r)).collect()
}

/// Who holds which shard, by instance (PostgreSQL's view of the advisory locks).
async fn holders(w: &World) -> BTreeMap<String, Vec<i32>> {
    let rows =
        w.db.query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            HOLDERS_SQL,
        ))
        .await
        .expect("read pg_locks");
    let mut out: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for r in rows {
        let holder: String = r.try_get("", "holder").unwrap();
        let shard: i32 = r.try_get("", "shard").unwrap();
        out.entry(holder).or_default().push(shard);
    }
    out
}

async fn queued(w: &World) -> u64 {
    product_sync::store::entity::outbox_pending::Entity::find()
        .count(&w.db)
        .await
        .expect("count the queue")
}

/// A free port on the loopback (bound, then released for a child process to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn published_changes(port: u16) -> f64 {
    let page = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text");
    crate::pipeline::sample(&page, "product_sync_relay_published_total{kind=\"change\"}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_split_the_shards_both_publish_and_a_killed_ones_shards_move() {
    let w = world(3000, 6).await;
    let (pa, pb) = (free_port(), free_port());
    let (la, lb) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let mut a = w.spawn_process("relay-a", &[("PRODUCT_SYNC__HTTP__LISTEN", la.as_str())]);
    let mut b = w.spawn_process("relay-b", &[("PRODUCT_SYNC__HTTP__LISTEN", lb.as_str())]);
    let split = wait_for("16 shards split 8/8", Duration::from_secs(60), || async {
        let h = holders(&w).await;
        (h.len() == 2 && h.values().all(|s| s.len() == 8)).then_some(h)
    })
    .await;
    let all: Vec<i32> = {
        let mut v: Vec<i32> = split.values().flatten().copied().collect();
        v.sort();
        v
    };
    assert_eq!(all, (0..16).collect::<Vec<_>>(), "each shard held once");

    for (i, category) in ["mixed", "cash", "equity", "fixed_income"]
        .iter()
        .enumerate()
    {
        w.command(&format!("first-{i}"), json!({"category": category}))
            .await;
    }
    w.wait_results(
        &["first-0", "first-1", "first-2", "first-3"],
        Duration::from_secs(120),
    )
    .await;
    w.sim.sim.mutate(600, 7);
    w.command("second", json!({"category": "mixed"})).await;
    w.wait_results(&["second"], Duration::from_secs(120)).await;
    w.wait_outbox_empty(Duration::from_secs(60)).await;
    let (by_a, by_b) = (published_changes(pa).await, published_changes(pb).await);
    assert!(
        by_a > 0.0 && by_b > 0.0,
        "both instances published change events (a: {by_a}, b: {by_b})"
    );

    // Kill one: the survivor takes every shard within seconds and publishes on.
    signal(&a, "KILL");
    wait_exit(&mut a, Duration::from_secs(10)).await;
    let survivor = wait_for(
        "one holder of all 16 shards",
        Duration::from_secs(30),
        || async {
            let h = holders(&w).await;
            (h.len() == 1 && h.values().all(|s| s.len() == 16)).then_some(h)
        },
    )
    .await;
    assert!(
        survivor.keys().all(|k| split.contains_key(k)),
        "the survivor is one of the two: {survivor:?}"
    );
    w.sim.sim.mutate(600, 8);
    w.command("third", json!({"category": "mixed"})).await;
    w.command("fourth", json!({"category": "cash"})).await;
    w.wait_results(&["third", "fourth"], Duration::from_secs(120))
        .await;
    w.wait_outbox_empty(Duration::from_secs(60)).await;

    let events = w.read_all(&w.settings.topics.changes).await;
    let last = assert_in_order(&events);
    let stored = w.stored().await;
    assert_eq!(last.len(), stored.len(), "every stored product has events");
    for (identity, (_, revision)) in &stored {
        let key = format!("wms/{}", identity.event_key());
        assert_eq!(
            last.get(&key),
            Some(revision),
            "{key}: last event is the stored revision"
        );
    }
    signal(&b, "TERM");
    assert!(wait_exit(&mut b, Duration::from_secs(60)).await.success());
    drop::<ChildGuard>(a);
}

/// A relay on its own (no pipeline), holding every shard of the world's database.
fn relay(w: &World, producer: Publisher, max_event_bytes: usize) -> Relay {
    Relay::new(
        w.db.clone(),
        producer,
        RelaySettings {
            changes_topic: w.settings.topics.changes.clone(),
            results_topic: w.settings.topics.results.clone(),
            state_topic: Some(w.settings.topics.state.clone()),
            batch: 100,
            interval: Duration::from_millis(20),
            max_event_bytes,
            exactly_once: None,
        },
        Leases::postgres(w.settings.database.url.clone(), unique("relay"), 4),
        Arc::new(tokio::sync::Notify::new()),
    )
}

fn producer(w: &World) -> Publisher {
    Publisher::create(product_sync::kafka::producer_config(
        &w.settings.kafka,
        900_000,
    ))
    .expect("producer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_whose_transaction_commits_late_is_published_once_by_the_transactional_relay() {
    late_commit(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_whose_transaction_commits_late_is_published_not_skipped_by_the_idempotent_relay() {
    late_commit(false).await;
}

/// A row whose store transaction commits after later rows of its shard were published is
/// published, once (read_committed).
async fn late_commit(exactly_once: bool) {
    let w = world(200, 1).await;
    // A writer takes queue ids first and commits last.
    let url = w.settings.database.url.expose_secret().to_owned();
    let mut late = <sea_orm::sqlx::PgConnection as sea_orm::sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    use sea_orm::sqlx::Connection;
    let mut tx = late.begin().await.expect("begin");
    for statement in [
        "INSERT INTO products (system, identity, product_code, product_name, keywords, \
         attributes, source_version, content_hash, revision, created_at, updated_at) \
         VALUES ('wms', 'code:LATE1', 'LATE1', 'late', '[]', '{}', 1, 'h', 1, now(), now())",
        "INSERT INTO product_changes (product_id, system, identity, product_code, revision, \
         event_id, op, payload, created_at) SELECT id, 'wms', 'code:LATE1', 'LATE1', 1, \
         'wms:LATE1:1', 'created', '{\"op\":\"created\",\"system\":\"wms\",\"product_code\":\"LATE1\",\
         \"revision\":1,\"changes\":[],\"before\":null,\"after\":{},\"source_version\":1,\
         \"changed_at\":\"2026-11-30T00:00:00Z\"}', now() \
         FROM products WHERE identity = 'code:LATE1'",
        "INSERT INTO outbox_pending (shard_key, change_id, product_id, created_at) \
         SELECT product_id, id, product_id, now() FROM product_changes WHERE event_id = 'wms:LATE1:1'",
    ] {
        sea_orm::sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .expect("late writer");
    }
    // Others commit after it took its ids, and are published.
    let mut settings = w.settings.clone();
    settings.pipeline.exactly_once = exactly_once;
    let app = w.start_with(settings).await;
    w.command("early", json!({"category": "mixed"})).await;
    w.wait_results(&["early"], Duration::from_secs(60)).await;
    w.wait_outbox_empty(Duration::from_secs(30)).await;
    let before = w.read_all(&w.settings.topics.changes).await;
    assert!(!before.is_empty());
    assert!(
        before
            .iter()
            .all(|m| m.key() != Some(b"wms/LATE1".as_slice())),
        "not visible before its commit"
    );
    // Its lower id becomes visible only now: the running relay must still publish it.
    let pending: (i64,) = sea_orm::sqlx::query_as("SELECT id FROM outbox_pending")
        .fetch_one(&mut *tx)
        .await
        .expect("own row");
    tx.commit().await.expect("commit");
    assert!(
        pending.0 < before.len() as i64,
        "the late row's queue id ({}) is below the rows published before it",
        pending.0
    );
    let events = wait_for("the late event", Duration::from_secs(30), || async {
        let events = w.read_all(&w.settings.topics.changes).await;
        events
            .iter()
            .any(|m| m.key() == Some(b"wms/LATE1".as_slice()))
            .then_some(events)
    })
    .await;
    assert_eq!(events.len(), before.len() + 1);
    // The row leaves the queue after its transaction committed: right after, not before.
    w.wait_outbox_empty(Duration::from_secs(30)).await;
    assert_eq!(queued(&w).await, 0);
    app.stop().await;
}

/// A change row of product LATE1 at revision 1 or 2, queued (statements for a late writer).
fn late_change(revision: i64) -> [&'static str; 2] {
    macro_rules! at {
        ($r:literal) => {
            [
                concat!(
                    "INSERT INTO product_changes (product_id, system, identity, product_code, ",
                    "revision, event_id, op, payload, created_at) SELECT id, 'wms', ",
                    "'code:LATE1', 'LATE1', ",
                    $r,
                    ", 'wms:LATE1:",
                    $r,
                    "', 'updated', '{}', ",
                    "now() FROM products WHERE identity = 'code:LATE1'"
                ),
                concat!(
                    "INSERT INTO outbox_pending (shard_key, change_id, product_id, created_at) ",
                    "SELECT product_id, id, product_id, now() FROM product_changes ",
                    "WHERE event_id = 'wms:LATE1:",
                    $r,
                    "'"
                ),
            ]
        };
    }
    if revision == 1 { at!("1") } else { at!("2") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_read_ahead_gives_way_to_the_head_when_a_row_commits_late_behind_it() {
    use sea_orm::sqlx::Connection;
    let w = world(100, 1).await;
    let url = w.settings.database.url.expose_secret().to_owned();
    let mut late = <sea_orm::sqlx::PgConnection as Connection>::connect(&url)
        .await
        .expect("connect");
    // Revision 1 of LATE1 takes its queue id first and commits after the others.
    let mut tx = late.begin().await.expect("begin");
    let product = "INSERT INTO products (system, identity, product_code, product_name, \
         keywords, attributes, source_version, content_hash, revision, created_at, updated_at) \
         VALUES ('wms', 'code:LATE1', 'LATE1', 'late', '[]', '{}', 1, 'h', 2, now(), now())";
    for statement in std::iter::once(product).chain(late_change(1)) {
        sea_orm::sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .expect("late writer");
    }
    let products: Vec<Product> = w.sim.sim.catalogue().products().to_vec();
    let ctx = product_sync::store::fold::FoldContext {
        system: "wms",
        request_id: Some("early"),
        traceparent: None,
    };
    product_sync::store::fold::fold_page(
        &w.db,
        &ctx,
        &products,
        &product_sync::retry::RetryPolicy::with_budget(Duration::from_secs(30)),
    )
    .await
    .expect("fold");
    let round = queue::read(&w.db, &Shards::All, 0, 1000)
        .await
        .expect("read");
    assert_eq!(
        round.len(),
        products.len(),
        "the late row is not visible yet"
    );
    let last = round.last().map(|r| r.pending_id).expect("a round");

    // It commits, and its product's next revision is queued after the read position.
    tx.commit().await.expect("commit");
    for statement in late_change(2) {
        sea_orm::sqlx::query(statement)
            .execute(&mut late)
            .await
            .expect("revision 2");
    }
    let ahead = queue::read(&w.db, &Shards::All, last, 1000)
        .await
        .expect("read ahead");
    assert_eq!(
        ahead.iter().map(|r| r.ce_id.as_str()).collect::<Vec<_>>(),
        ["wms:LATE1:2"],
        "a plain read past the position sees revision 2 without revision 1"
    );
    let checked = queue::read_after_checked(&w.db, &Shards::All, last, round.len(), 1000)
        .await
        .expect("checked read");
    assert!(
        checked.is_none(),
        "the checked read sees a row behind the position and gives way"
    );
    let head = queue::read(&w.db, &Shards::All, 0, 1000)
        .await
        .expect("read");
    let late_ids: Vec<&str> = head
        .iter()
        .map(|r| r.ce_id.as_str())
        .filter(|id| id.starts_with("wms:LATE1"))
        .collect();
    assert_eq!(
        late_ids,
        ["wms:LATE1:1", "wms:LATE1:2"],
        "from the head, in order"
    );

    // With nothing late behind it, the checked read is the plain one.
    let checked = queue::read_after_checked(&w.db, &Shards::All, last, round.len() + 1, 1000)
        .await
        .expect("checked read")
        .expect("nothing late");
    assert_eq!(checked.len(), 1);
}

/// Text that compresses badly (the broker's size limit applies to compressed batches).
fn noise(bytes: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect()
}

/// A product of the catalogue with a large, incompressible attribute (and `version` + 1).
pub(crate) fn with_big_attribute(w: &World, code: &str, bytes: usize) -> Product {
    let mut p = w
        .sim
        .sim
        .catalogue()
        .products()
        .iter()
        .find(|p| p.content.product_code.as_deref() == Some(code))
        .cloned()
        .expect("product in the catalogue");
    p.content
        .attributes
        .insert("prospectus".into(), json!(noise(bytes)));
    p.version += 1;
    p
}

pub(crate) fn codes(events: &[OwnedMessage], code: &str) -> Vec<Value> {
    let key = format!("wms/{code}");
    let mut v: Vec<&OwnedMessage> = events
        .iter()
        .filter(|m| m.key() == Some(key.as_bytes()))
        .collect();
    v.sort_by_key(|m| m.offset());
    v.into_iter().map(json_of).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_event_is_published_reduced_in_order_and_later_events_follow() {
    let w = world(100, 1).await;
    let (big, small) = ("WM0000001", "WM0000002");
    w.sim.sim.upsert(vec![with_big_attribute(&w, big, 60_000)]);
    let mut settings = w.settings.clone();
    settings.pipeline.max_event_bytes = 20_000;
    let app = w.start_with(settings).await;
    let selector = json!({"product_codes": [big, small]});
    w.command("one", selector.clone()).await;
    w.wait_results(&["one"], Duration::from_secs(60)).await;
    let mut changed = with_big_attribute(&w, big, 70_000);
    changed.content.nav = Some("9.87654321".parse().unwrap());
    w.sim.sim.upsert(vec![changed]);
    w.command("two", selector).await;
    w.wait_results(&["two"], Duration::from_secs(60)).await;
    w.wait_outbox_empty(Duration::from_secs(30)).await;

    let events = w.read_all(&w.settings.topics.changes).await;
    assert_in_order(&events);
    let big_events = codes(&events, big);
    assert_eq!(big_events.len(), 2, "both revisions of the large product");
    for (i, e) in big_events.iter().enumerate() {
        assert_eq!(e["revision"], json!(i + 1));
        assert_eq!(e["reduced"], json!(true), "{e}");
        let omitted = &e["after"]["attributes"]["prospectus"]["omitted_bytes"];
        assert!(omitted.as_u64().unwrap() > 60_000, "{e}");
    }
    assert_eq!(big_events[1]["op"], "updated");
    assert!(
        big_events[1]["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["field"] == "nav" && c["new"] == "9.87654321"),
        "small changed values survive the reduction"
    );
    let small_events = codes(&events, small);
    assert_eq!(small_events.len(), 1);
    assert!(small_events[0].get("reduced").is_none());
    // The history keeps the full event.
    let stored: (String,) = sea_orm::sqlx::query_as(
        "SELECT payload::text FROM product_changes WHERE product_code = $1 AND revision = 2",
    )
    .bind(big)
    .fetch_one(w.db.get_postgres_connection_pool())
    .await
    .expect("history row");
    assert!(stored.0.len() > 70_000);
    app.stop().await;
}

/// Waits until the request's row says completed (the app's own relay is off).
async fn completed(w: &World, request_id: &str) {
    wait_for(request_id, Duration::from_secs(60), || async {
        let row = product_sync::store::requests::find(&w.db, request_id)
            .await
            .ok()??;
        (row.status == "completed").then_some(())
    })
    .await;
}

pub(crate) async fn set_topic_limit(w: &World, bytes: usize) {
    let admin: AdminClient<DefaultClientContext> =
        product_sync::kafka::client_config(&w.settings.kafka)
            .create()
            .expect("admin client");
    let limit = bytes.to_string();
    let alter = AlterConfig::new(ResourceSpecifier::Topic(&w.settings.topics.changes))
        .set("max.message.bytes", &limit);
    let results = admin
        .alter_configs(&[alter], &AdminOptions::new())
        .await
        .expect("alter configs");
    for r in results {
        r.expect("topic config changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_the_broker_refuses_is_parked_and_holds_only_its_own_product() {
    let w = world(100, 1).await;
    // The topic takes less than pipeline.max_event_bytes: a large event is refused for good.
    set_topic_limit(&w, 30_000).await;
    let (big, other) = ("WM0000003", "WM0000004");
    w.sim.sim.upsert(vec![with_big_attribute(&w, big, 60_000)]);
    let mut relay = relay(&w, producer(&w), 900_000);
    relay.refresh_shards().await.expect("take the shards");
    assert_eq!(relay.shards_held(), vec![0, 1, 2, 3]);

    let app = {
        let mut settings = w.settings.clone();
        settings.pipeline.relay_enabled = false;
        w.start_with(settings).await
    };
    let selector = json!({"product_codes": [big, other, "WM0000005"]});
    w.command("one", selector.clone()).await;
    completed(&w, "one").await;
    let published = relay.drain().await.expect("drain");
    assert_eq!(published.parked, 1, "{published:?}");
    assert_eq!(published.changes, 2, "{published:?}");
    assert_eq!(published.results, 1, "{published:?}");

    // Both change again: the other's new revision flows, the parked product's waits.
    let mut next = with_big_attribute(&w, big, 60_000);
    next.version += 1;
    next.content.nav = Some("1.5".parse().unwrap());
    let mut o = w
        .sim
        .sim
        .catalogue()
        .products()
        .iter()
        .find(|p| p.content.product_code.as_deref() == Some(other))
        .cloned()
        .unwrap();
    o.version += 1;
    o.content.nav = Some("2.5".parse().unwrap());
    w.sim.sim.upsert(vec![next, o]);
    w.command("two", selector).await;
    completed(&w, "two").await;
    let published = relay.drain().await.expect("drain");
    assert_eq!(
        published.changes, 1,
        "only the other product's revision 2: {published:?}"
    );
    assert_eq!(
        published.results, 1,
        "results are never held: {published:?}"
    );

    let parked = queue::parked(&w.db).await.expect("parked rows");
    assert_eq!(parked.len(), 1);
    let error = parked[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("too large") || error.contains("TooLarge"),
        "{error}"
    );
    assert_eq!(queued(&w).await, 2, "the parked row and the one behind it");
    let rows = queue::read(&w.db, &Shards::All, 0, 10).await.expect("read");
    assert!(rows.is_empty(), "nothing readable behind a parked row");
    let events = w.read_all(&w.settings.topics.changes).await;
    assert!(codes(&events, big).is_empty());
    assert_eq!(codes(&events, other).len(), 2);

    // The operator raises the limit and releases it: both revisions go, in order.
    set_topic_limit(&w, 1_000_000).await;
    assert_eq!(queue::unpark(&w.db, &[]).await.expect("unpark"), 1);
    let published = relay.drain().await.expect("drain");
    assert_eq!(published.changes, 2, "{published:?}");
    let events = w.read_all(&w.settings.topics.changes).await;
    assert_in_order(&events);
    let big_events = codes(&events, big);
    assert_eq!(
        big_events
            .iter()
            .map(|e| e["revision"].clone())
            .collect::<Vec<_>>(),
        vec![json!(1), json!(2)]
    );
    assert_eq!(queued(&w).await, 0);
    app.stop().await;
    let stop = CancellationToken::new();
    stop.cancel();
    relay.run(stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_read_probes_history_by_key_never_scans_it_with_or_without_statistics() {
    let w = world(100, 1).await;
    let pool = w.db.get_postgres_connection_pool();
    // A large history, all of it queued (a relay far behind), no statistics gathered yet.
    for statement in [
        "INSERT INTO products (system, identity, product_code, product_name, keywords, \
         attributes, source_version, content_hash, revision, created_at, updated_at) \
         SELECT 'wms', 'code:H' || g, 'H' || g, 'h', '[]', '{}', 1, 'h', 1, now(), now() \
         FROM generate_series(1, 30000) g",
        "INSERT INTO product_changes (product_id, system, identity, product_code, revision, \
         event_id, op, payload, created_at) SELECT id, system, identity, product_code, 1, \
         'wms:' || product_code || ':1', 'created', json_build_object('pad', repeat('x', 1500)), \
         now() FROM products",
        "INSERT INTO outbox_pending (shard_key, change_id, product_id, created_at) \
         SELECT product_id, id, product_id, now() FROM product_changes ORDER BY id",
    ] {
        sea_orm::sqlx::query(statement)
            .execute(pool)
            .await
            .expect("fill");
    }
    let held: std::collections::BTreeSet<u32> = (0..8).collect();
    for analyzed in [false, true] {
        if analyzed {
            sea_orm::sqlx::query("ANALYZE").execute(pool).await.unwrap();
        }
        for shards in [
            Shards::Some {
                held: held.clone(),
                of: 16,
            },
            Shards::Some {
                held: (0..16).collect(),
                of: 16,
            },
        ] {
            let sql = queue::read_sql(DatabaseBackend::Postgres, &shards, 0, 5000);
            let plan: String =
                w.db.query_all_raw(Statement::from_string(
                    DatabaseBackend::Postgres,
                    format!("EXPLAIN {sql}"),
                ))
                .await
                .expect("explain")
                .iter()
                .map(|r| r.try_get_by_index::<String>(0).unwrap() + "\n")
                .collect();
            assert!(
                !plan.contains("Seq Scan on product_changes"),
                "analyzed={analyzed}: the history is scanned:\n{plan}"
            );
            assert!(
                plan.contains("product_changes_pkey"),
                "analyzed={analyzed}: no key probe:\n{plan}"
            );
        }
    }
    let rows = queue::read(&w.db, &Shards::Some { held, of: 16 }, 0, 5000)
        .await
        .expect("read");
    assert_eq!(rows.len(), 5000, "a full batch of 8 shards of 16");
    assert!(
        rows.iter()
            .all(|r| r.product_id.is_some_and(|p| p % 16 < 8))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_change_whose_history_row_is_gone_is_dropped_not_retried_for_ever() {
    let w = world(10, 1).await;
    sea_orm::sqlx::query(
        "INSERT INTO outbox_pending (shard_key, change_id, product_id, created_at) \
         VALUES (7, 424242, 7, now())",
    )
    .execute(w.db.get_postgres_connection_pool())
    .await
    .expect("queue a change that does not exist");
    let mut relay = relay(&w, producer(&w), 900_000);
    relay.refresh_shards().await.expect("take the shards");
    let published = relay.drain().await.expect("drain does not fail");
    assert_eq!(published.changes, 0);
    assert_eq!(queued(&w).await, 0, "the orphan left the queue");
    assert!(w.read_all(&w.settings.topics.changes).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn change_rows_wait_out_a_broker_outage_and_are_published_after_it() {
    use product_sync::command::Selector;
    use product_sync::retry::RetryPolicy;
    use product_sync::store::fold::{FoldContext, fold_page};
    let w = world(30, 1).await;
    let page: Vec<Product> = w
        .sim
        .sim
        .catalogue()
        .select(&Selector::default())
        .cloned()
        .collect();
    assert_eq!(page.len(), 30);
    let ctx = FoldContext {
        system: "wms",
        request_id: Some("outage"),
        traceparent: None,
    };
    fold_page(
        &w.db,
        &ctx,
        &page,
        &RetryPolicy::with_budget(Duration::from_secs(30)),
    )
    .await
    .expect("fold");
    assert_eq!(queued(&w).await, 30);

    // The broker, as this relay sees it, is down: nothing answers at its bootstrap address.
    let proxy = crate::helpers::Proxy::start(&w.settings.kafka.bootstrap_servers, false).await;
    let mut kafka = w.settings.kafka.clone();
    kafka.bootstrap_servers = proxy.addr.to_string();
    let producer = Publisher::create(
        product_sync::kafka::producer_config(&kafka, 900_000)
            .set("message.timeout.ms", "1500")
            .clone(),
    )
    .expect("producer");
    let mut relay = relay(&w, producer, 900_000);
    relay.refresh_shards().await.expect("take the shards");
    for _ in 0..2 {
        let e = relay
            .drain()
            .await
            .expect_err("nothing is acked while the broker is unreachable");
        assert!(e.is_transient(), "an outage is transient: {e}");
    }
    assert!(
        proxy.refused() > 0,
        "the producer did try to reach the broker"
    );
    assert_eq!(queued(&w).await, 30, "no row leaves the queue unacked");
    assert!(w.read_all(&w.settings.topics.changes).await.is_empty());

    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut published = 0;
    while queued(&w).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue did not drain after the broker came back ({} left)",
            queued(&w).await
        );
        if let Ok(p) = relay.drain().await {
            published += p.changes;
        }
    }
    assert_eq!(published, 30);
    let events = w.read_all(&w.settings.topics.changes).await;
    assert_eq!(events.len(), 30, "each row published once");
    let last = assert_in_order(&events);
    assert!(last.values().all(|r| *r == 1));
}
