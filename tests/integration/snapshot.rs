//! Snapshots against the real broker, the real PostgreSQL and the simulator: delisting what
//! the management system withdrew (whole catalogue and one category), the guard and `force`,
//! a failed scan delisting nothing, a product moved to another category confirmed and not
//! delisted, a delisted product coming back relisted — each event in order on the change
//! topic.

use std::collections::BTreeMap;
use std::time::Duration;

use product_sync::audit::Audit;
use product_sync::product::Product;
use product_sync::sim::{Fault, Faults};
use rdkafka::message::OwnedMessage;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};

use crate::pipeline::{World, header_of, json_of, world};

/// Sends a snapshot command.
async fn snapshot(w: &World, id: &str, selector: Value, force: bool) {
    let mut body = json!({"request_id": id, "selector": selector, "mode": "snapshot"});
    if force {
        body["force"] = json!(true);
    }
    w.send(id, body.to_string().as_bytes(), &[]).await;
}

/// The result of `id`, waited for.
async fn result(w: &World, id: &str) -> Value {
    w.wait_results(&[id], Duration::from_secs(90))
        .await
        .into_iter()
        .find(|r| r["request_id"] == id)
        .expect("the result")
}

/// Syncs the whole catalogue once, incrementally.
async fn sync_all(w: &World, id: &str) {
    w.command(id, json!({"all": true})).await;
    let r = result(w, id).await;
    assert_eq!(r["status"], "completed", "{r}");
}

/// The identity keys of the first `n` products of `category` (any category when `None`).
fn keys_of(w: &World, category: Option<&str>, n: usize) -> Vec<String> {
    w.sim
        .sim
        .catalogue()
        .products()
        .iter()
        .filter(|p| category.is_none_or(|c| p.content.category.as_deref() == Some(c)))
        .take(n)
        .map(|p| p.identity().key())
        .collect()
}

/// Stored rows (listed or not) by identity key: (revision, delisted).
async fn rows(w: &World) -> BTreeMap<String, (i64, bool)> {
    use product_sync::store::entity::products;
    products::Entity::find()
        .filter(products::Column::System.eq("wms"))
        .all(&w.db)
        .await
        .expect("read products")
        .into_iter()
        .map(|p| (p.identity, (p.revision, p.delisted_at.is_some())))
        .collect()
}

/// The change topic, audited clean; returns its events as JSON with their `ce_type`.
async fn audited_changes(w: &World) -> Vec<(Value, String)> {
    w.wait_outbox_empty(Duration::from_secs(60)).await;
    let events: Vec<OwnedMessage> = w.read_all(&w.settings.topics.changes).await;
    let audit = Audit::of(&events);
    assert!(audit.is_clean(), "change topic: {:#?}", audit.problems);
    let stored = w.stored().await;
    let gaps = audit.gaps(
        stored
            .iter()
            .map(|(i, (_, r))| (format!("wms/{}", i.event_key()), *r)),
    );
    assert_eq!(
        gaps, 0,
        "every listed product's last event is its stored revision"
    );
    events
        .iter()
        .map(|m| (json_of(m), header_of(m, "ce_type").unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_of_all_delists_what_was_withdrawn_and_a_returning_product_is_relisted() {
    let w = world(200, 1).await;
    let app = w.start().await;
    sync_all(&w, "full").await;
    let withdrawn = keys_of(&w, None, 10);
    let gone: Vec<Product> = w.sim.sim.withdraw(&withdrawn);
    assert_eq!(gone.len(), 10);

    snapshot(&w, "snap-1", json!({"all": true}), false).await;
    let r = result(&w, "snap-1").await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["counts"]["delisted"], 10, "{r}");
    assert_eq!(r["counts"]["created"], 0, "{r}");
    let all = json!({"all": true});
    let truth = w.truth(&serde_json::from_value(all).unwrap());
    assert_eq!(truth.len(), 190);
    assert_eq!(crate::pipeline::products_of(&w.stored().await), truth);
    let rows = rows(&w).await;
    for key in &withdrawn {
        assert_eq!(rows[key], (2, true), "{key}: kept, revision + 1, delisted");
    }
    let events = audited_changes(&w).await;
    let delisted: Vec<&(Value, String)> = events
        .iter()
        .filter(|(e, _)| e["op"] == "delisted")
        .collect();
    assert_eq!(delisted.len(), 10);
    for (e, ce_type) in &delisted {
        assert_eq!(ce_type, "com.product-sync.product.delisted");
        assert!(e["after"].is_null() && e["changes"] == json!([]), "{e}");
        assert_eq!(e["request_id"], "snap-1");
    }

    // One comes back, changed: the next fetch that returns it relists it.
    let mut back = gone[0].clone();
    back.version += 1;
    back.content.nav = Some("3.14159265".parse().unwrap());
    let code = back.content.product_code.clone().expect("a coded product");
    w.sim.sim.upsert(vec![back.clone()]);
    w.command("back", json!({"product_codes": [code]})).await;
    let r = result(&w, "back").await;
    assert_eq!(r["counts"]["relisted"], 1, "{r}");
    let relisted: Vec<Value> = audited_changes(&w)
        .await
        .into_iter()
        .filter(|(e, _)| e["op"] == "relisted")
        .map(|(e, _)| e)
        .collect();
    assert_eq!(relisted.len(), 1);
    assert_eq!(relisted[0]["revision"], 3);
    assert_eq!(
        relisted[0]["before"],
        gone[0].to_json(),
        "the state at delisting"
    );
    assert_eq!(relisted[0]["after"], back.to_json());
    assert!(
        relisted[0]["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["field"] == "nav"),
        "{}",
        relisted[0]
    );
    // The others stay delisted: a second snapshot has nothing to do.
    snapshot(&w, "snap-2", json!({"all": true}), false).await;
    let r = result(&w, "snap-2").await;
    assert_eq!(r["counts"]["delisted"], 0, "{r}");
    assert_eq!(r["counts"]["relisted"], 0, "{r}");
    audited_changes(&w).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_guard_refuses_a_snapshot_that_would_delist_too_much_and_force_lets_it_through() {
    let w = world(100, 1).await;
    let app = w.start().await;
    sync_all(&w, "full").await;
    // An upstream answering a third of its catalogue: above the 10 % guard.
    w.sim.sim.withdraw(&keys_of(&w, None, 30));

    snapshot(&w, "guarded", json!({"all": true}), false).await;
    let r = result(&w, "guarded").await;
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["error_kind"], "delist_guard", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains("30 of the 100"),
        "names both numbers: {error}"
    );
    assert_eq!(r["counts"]["delisted"], 0);
    assert!(rows(&w).await.values().all(|(_, delisted)| !delisted));
    let dlq = w.read_all(&w.settings.topics.dlq).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        header_of(&dlq[0], product_sync::wire::dlq::ERROR_KIND).as_deref(),
        Some("delist_guard")
    );

    snapshot(&w, "forced", json!({"all": true}), true).await;
    let r = result(&w, "forced").await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["counts"]["delisted"], 30, "{r}");
    assert_eq!(w.stored().await.len(), 70);
    audited_changes(&w).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_category_snapshot_confirms_a_moved_product_and_delists_only_in_its_scope() {
    let w = world(300, 1).await;
    let app = w.start().await;
    sync_all(&w, "full").await;
    let cash = keys_of(&w, Some("cash"), 3);
    let equity = keys_of(&w, Some("equity"), 1);
    // cash[0] moves to equity; cash[1] and equity[0] are withdrawn.
    let catalogue = w.sim.sim.catalogue();
    let mut moved = catalogue
        .products()
        .iter()
        .find(|p| p.identity().key() == cash[0])
        .unwrap()
        .clone();
    moved.version += 1;
    moved.content.category = Some("equity".to_owned());
    w.sim.sim.upsert(vec![moved.clone()]);
    w.sim.sim.withdraw(&[cash[1].clone(), equity[0].clone()]);

    snapshot(&w, "cash", json!({"category": "cash"}), false).await;
    let r = result(&w, "cash").await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["counts"]["delisted"], 1, "{r}");
    assert_eq!(r["counts"]["updated"], 1, "the moved product, folded: {r}");
    let rows = rows(&w).await;
    assert_eq!(rows[&cash[0]], (2, false), "moved: updated, listed");
    assert_eq!(rows[&cash[1]], (2, true), "withdrawn in scope: delisted");
    assert_eq!(rows[&equity[0]], (1, false), "out of scope: untouched");
    let stored = w.stored().await;
    let in_store = stored
        .values()
        .find(|(p, _)| p.identity().key() == cash[0])
        .unwrap();
    assert_eq!(in_store.0.content.category.as_deref(), Some("equity"));
    audited_changes(&w).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_whose_scan_fails_part_way_delists_nothing() {
    let w = world(200, 1).await;
    let mut settings = w.settings.clone();
    settings.upstream.page_size = 20;
    let app = w.start_with(settings).await;
    sync_all(&w, "full").await;
    w.sim.sim.withdraw(&keys_of(&w, None, 5));
    // The fourth page breaks the contract: the scan fails part-way.
    w.sim.sim.set_faults(Faults {
        script: [Fault::Pass, Fault::Pass, Fault::Pass, Fault::BadRecord].into(),
        ..Faults::default()
    });
    snapshot(&w, "broken", json!({"all": true}), false).await;
    let r = result(&w, "broken").await;
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["error_kind"], "upstream", "{r}");
    assert_eq!(r["counts"]["delisted"], 0);
    assert!(rows(&w).await.values().all(|(_, delisted)| !delisted));
    // Healed, the same snapshot delists the five.
    w.sim.sim.set_faults(Faults::default());
    snapshot(&w, "healed", json!({"all": true}), false).await;
    let r = result(&w, "healed").await;
    assert_eq!(r["counts"]["delisted"], 5, "{r}");
    audited_changes(&w).await;
    app.stop().await;
}

/// An upstream with offset cursors skips a product when one before the cursor is withdrawn
/// during the scan. A skipped product with a code is confirmed by its lookup; a code-less one
/// by a second scan — so only the product really withdrawn is delisted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_code_less_product_a_shifting_scan_skipped_is_not_delisted() {
    let w = world(200, 1).await;
    let mut settings = w.settings.clone();
    settings.upstream.page_size = 13;
    let app = w.start_with(settings).await;
    sync_all(&w, "full").await;
    let products = w.sim.sim.catalogue().products().to_vec();
    // The simulator leaves every fortieth product without a code: 39, 79, …
    let (skipped, withdrawn) = (products[39].identity().key(), products[79].identity().key());
    assert!(products[39].content.product_code.is_none() && skipped.starts_with("name:"));
    assert!(products[79].content.product_code.is_none());
    assert_eq!(
        w.sim.sim.withdraw(std::slice::from_ref(&withdrawn)).len(),
        1
    );
    // Pages of 13 start at 0, 13, 26, 39: the fourth starts one further and skips 39.
    w.sim.sim.set_faults(Faults {
        script: [Fault::Pass, Fault::Pass, Fault::Pass, Fault::SkipOne].into(),
        ..Faults::default()
    });
    snapshot(&w, "shifted", json!({"all": true}), false).await;
    let r = result(&w, "shifted").await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(
        w.sim
            .sim
            .stats()
            .faults_injected
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the scan did skip a product"
    );
    assert_eq!(
        r["counts"]["delisted"], 1,
        "only the withdrawn product: {r}"
    );
    let rows = rows(&w).await;
    assert_eq!(rows[&withdrawn], (2, true), "{withdrawn}: delisted");
    assert_eq!(
        rows[&skipped],
        (1, false),
        "{skipped}: still listed, untouched"
    );
    audited_changes(&w).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_reports_the_exact_drift_and_writes_nothing() {
    use std::collections::BTreeSet;
    let w = world(150, 1).await;
    let app = w.start().await;
    sync_all(&w, "full").await;
    // One product delisted for real, then offered again: a dry run sees it relisted.
    let back_key = keys_of(&w, None, 1).remove(0);
    let back = w.sim.sim.withdraw(std::slice::from_ref(&back_key));
    snapshot(&w, "real", json!({"all": true}), false).await;
    assert_eq!(result(&w, "real").await["counts"]["delisted"], 1);
    w.sim.sim.upsert(back);
    // Upstream drifts: five change, four go, three are new.
    let changed: BTreeSet<String> = w
        .sim
        .sim
        .mutate(5, 7)
        .iter()
        .map(|p| p.identity().key())
        .filter(|k| *k != back_key)
        .collect();
    let gone: Vec<String> = w
        .sim
        .sim
        .catalogue()
        .products()
        .iter()
        .map(|p| p.identity().key())
        .filter(|k| *k != back_key && !changed.contains(k))
        .take(4)
        .collect();
    w.sim.sim.withdraw(&gone);
    let template = w.sim.sim.catalogue().products()[0].clone();
    let new: Vec<Product> = (1..=3)
        .map(|i| {
            let mut p = template.clone();
            p.content.product_code = Some(format!("WM900000{i}"));
            p
        })
        .collect();
    w.sim.sim.upsert(new.clone());
    w.wait_outbox_empty(Duration::from_secs(60)).await;
    let rows_before = rows(&w).await;
    let events_before = w.read_all(&w.settings.topics.changes).await.len();

    let key = |k: &str| format!("wms/{}", k.strip_prefix("code:").unwrap_or(k));
    let set = |v: &Value| -> BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    let body = json!({"request_id": "dry", "selector": {"all": true}, "mode": "snapshot",
        "dry_run": true});
    w.send("dry", body.to_string().as_bytes(), &[]).await;
    let r = result(&w, "dry").await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["dry_run"], true, "{r}");
    let drift = &r["drift"];
    assert_eq!(
        set(&drift["updated"]),
        changed.iter().map(|k| key(k)).collect(),
        "{r}"
    );
    assert_eq!(
        set(&drift["delisted"]),
        gone.iter().map(|k| key(k)).collect(),
        "{r}"
    );
    assert_eq!(set(&drift["relisted"]), [key(&back_key)].into(), "{r}");
    let created: BTreeSet<String> = (1..=3).map(|i| format!("wms/WM900000{i}")).collect();
    assert_eq!(set(&drift["created"]), created, "{r}");
    let c = &r["counts"];
    assert_eq!(
        (&c["created"], &c["updated"], &c["delisted"], &c["relisted"]),
        (&json!(3), &json!(changed.len()), &json!(4), &json!(1)),
        "{r}"
    );
    // An incremental dry run sees the same, but delists nothing.
    let body = json!({"request_id": "dry-inc", "selector": {"all": true}, "dry_run": true});
    w.send("dry-inc", body.to_string().as_bytes(), &[]).await;
    let r = result(&w, "dry-inc").await;
    assert_eq!(r["counts"]["delisted"], 0, "{r}");
    assert_eq!(r["counts"]["created"], 3, "{r}");
    assert!(r["drift"]["delisted"].as_array().unwrap().is_empty());

    // Nothing written, nothing emitted.
    w.wait_outbox_empty(Duration::from_secs(60)).await;
    assert_eq!(rows(&w).await, rows_before);
    assert_eq!(
        w.read_all(&w.settings.topics.changes).await.len(),
        events_before
    );
    app.stop().await;
}

/// The `cleanup.policy` the broker reports for `topic`.
async fn cleanup_policy(w: &World, topic: &str) -> Option<String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        product_sync::kafka::client_config(&w.settings.kafka)
            .create()
            .expect("admin client");
    let described = admin
        .describe_configs(
            [ResourceSpecifier::Topic(topic)].iter(),
            &AdminOptions::new(),
        )
        .await
        .expect("describe configs");
    described
        .into_iter()
        .next()?
        .ok()?
        .get("cleanup.policy")?
        .value
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_state_topic_alone_rebuilds_the_catalogue_equal_to_the_store() {
    use rdkafka::Message;
    let w = world(200, 3).await;
    let app = w.start().await;
    assert_eq!(
        cleanup_policy(&w, &w.settings.topics.state)
            .await
            .as_deref(),
        Some("compact")
    );
    // A mixed history: created, updated, delisted, relisted.
    sync_all(&w, "full").await;
    w.sim.sim.mutate(30, 5);
    sync_all(&w, "again").await;
    let removed = w.sim.sim.withdraw(&keys_of(&w, None, 8));
    snapshot(&w, "snap", json!({"all": true}), false).await;
    assert_eq!(result(&w, "snap").await["counts"]["delisted"], 8);
    w.sim.sim.upsert(removed[..2].to_vec());
    sync_all(&w, "back").await;
    w.wait_outbox_empty(Duration::from_secs(60)).await;

    // Rebuilt from the state topic alone: per partition in offset order, the last record of a
    // key wins and a tombstone removes it.
    let mut records = w.read_all(&w.settings.topics.state).await;
    records.sort_by_key(|m| (m.partition(), m.offset()));
    let tombstones = records.iter().filter(|m| m.payload().is_none()).count();
    assert_eq!(tombstones, 8, "one tombstone per delisting");
    let mut rebuilt: BTreeMap<String, Value> = BTreeMap::new();
    for m in &records {
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        match m.payload() {
            None => {
                rebuilt.remove(&key);
            }
            Some(_) => {
                let v = json_of(m);
                rebuilt.insert(
                    key,
                    json!({"revision": v["revision"], "product": v["product"]}),
                );
            }
        }
    }
    let expected: BTreeMap<String, Value> = w
        .stored()
        .await
        .iter()
        .map(|(i, (p, r))| {
            (
                format!("wms/{}", i.event_key()),
                json!({"revision": r, "product": p.to_json()}),
            )
        })
        .collect();
    assert_eq!(expected.len(), 194);
    assert_eq!(rebuilt, expected);
    audited_changes(&w).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_and_incremental_commands_racing_on_two_instances_keep_every_invariant() {
    use std::collections::BTreeSet;
    let w = world(400, 4).await;
    let (a, b) = (w.start().await, w.start().await);
    sync_all(&w, "full").await;
    let mut withdrawn: BTreeSet<String> = BTreeSet::new();
    let mut ids = Vec::new();
    for round in 0..6 {
        w.sim.sim.mutate(20, round);
        let keys = keys_of(&w, None, 3 + round as usize * 7)
            .into_iter()
            .rev()
            .take(2)
            .collect::<Vec<_>>();
        withdrawn.extend(w.sim.sim.withdraw(&keys).iter().map(|p| p.identity().key()));
        // On every partition at once: a snapshot of all, a category snapshot, incrementals.
        for (p, body) in [
            json!({"selector": {"all": true}, "mode": "snapshot"}),
            json!({"selector": {"category": "cash"}, "mode": "snapshot"}),
            json!({"selector": {"all": true}}),
            json!({"selector": {"category": "equity"}}),
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("race-{round}-{p}");
            let mut body = body;
            body["request_id"] = json!(id);
            w.send_to(p as i32, &id, &body).await;
            ids.push(id);
        }
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let results = w.wait_results(&refs, Duration::from_secs(180)).await;
    for id in &ids {
        let r = results
            .iter()
            .find(|r| r["request_id"] == json!(id))
            .unwrap();
        assert_eq!(r["status"], "completed", "{r}");
    }
    // Settled: one last snapshot, then the store is the truth.
    snapshot(&w, "last", json!({"all": true}), false).await;
    assert_eq!(result(&w, "last").await["status"], "completed");
    let all = serde_json::from_value(json!({"all": true})).unwrap();
    assert_eq!(
        crate::pipeline::products_of(&w.stored().await),
        w.truth(&all)
    );
    // Only withdrawn products were ever delisted. (One may be delisted, relisted by a command
    // that fetched it before it was withdrawn, and delisted again: the audit checks that
    // chain.)
    let events = audited_changes(&w).await;
    let delisted: Vec<String> = events
        .iter()
        .filter(|(e, _)| e["op"] == "delisted")
        .map(|(e, _)| format!("code:{}", e["product_code"].as_str().unwrap()))
        .collect();
    let delisted: BTreeSet<String> = delisted.into_iter().collect();
    assert_eq!(delisted, withdrawn, "exactly the withdrawn products");
    // One row per product.
    assert_eq!(rows(&w).await.len(), 400);
    a.stop().await;
    b.stop().await;
}
