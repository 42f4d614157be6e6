//! Schedules and the watermark, against the real broker, the real PostgreSQL and the
//! simulator: a change made upstream reaches the store and the change topic with no command
//! sent by the test; the second incremental asks from the watermark less the overlap; the
//! watermark never moves back nor on a failed command; two instances publish each slot once
//! and the survivor of a `kill -9` takes over within the lease; a slow upstream makes slots
//! skipped, not piled up; downtime costs one catch-up; a drift check finds a row changed
//! behind product-sync's back; a bad schedule setting stops start-up naming the key.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use product_sync::config::ScheduleSettings;
use product_sync::sim::Faults;
use product_sync::store::schedules;
use rdkafka::Message;
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::helpers::wait_for;
use crate::pipeline::{World, json_of, sample, signal, world};

fn every(ms: u64, overlap_ms: u64) -> ScheduleSettings {
    ScheduleSettings {
        incremental_every: Some(Duration::from_millis(ms)),
        watermark_overlap: Duration::from_millis(overlap_ms),
        ..ScheduleSettings::default()
    }
}

/// The scheduled commands on the request topic, by request id, in order of publication.
async fn scheduled(w: &World) -> Vec<(String, Value)> {
    w.read_all(&w.settings.topics.requests)
        .await
        .iter()
        .filter_map(|m| {
            let key = String::from_utf8_lossy(m.key()?).into_owned();
            key.starts_with("sched:").then(|| (key, json_of(m)))
        })
        .collect()
}

/// The slot of a scheduled request id (`sched:<system>:<kind>:<slot>`).
fn slot_of(id: &str) -> DateTime<Utc> {
    let at = id.splitn(4, ':').nth(3).expect("a slot");
    DateTime::parse_from_rfc3339(at)
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

/// The status of each stored request whose id starts with `prefix`.
async fn statuses(w: &World, prefix: &str) -> BTreeMap<String, String> {
    let rows =
        w.db.query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            format!("SELECT request_id, status FROM requests WHERE request_id LIKE '{prefix}%'"),
        ))
        .await
        .expect("read requests");
    rows.iter()
        .map(|r| {
            (
                r.try_get::<String>("", "request_id").unwrap(),
                r.try_get::<String>("", "status").unwrap(),
            )
        })
        .collect()
}

async fn watermark(w: &World) -> Option<DateTime<Utc>> {
    schedules::watermark(&w.db, "wms")
        .await
        .expect("read the watermark")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_upstream_reaches_the_store_with_no_command_sent_and_the_next_incremental_asks_from_the_watermark()
 {
    let w = world(120, 1).await;
    let mut settings = w.settings.clone();
    settings.upstream.schedule = every(1500, 30_000);
    let app = w.start_with(settings).await;

    // The first scheduled incremental has no watermark: the whole catalogue.
    let first = wait_for(
        "the first scheduled incremental",
        Duration::from_secs(60),
        || async {
            let done = statuses(&w, "sched:wms:incremental:").await;
            done.into_iter()
                .find(|(_, s)| s == "completed")
                .map(|(id, _)| id)
        },
    )
    .await;
    assert_eq!(
        w.stored().await.len(),
        120,
        "{first} folded the whole catalogue"
    );
    let mark = wait_for("a watermark", Duration::from_secs(30), || watermark(&w)).await;
    let newest = w
        .sim
        .sim
        .catalogue()
        .products()
        .iter()
        .filter_map(|p| p.updated_at)
        .max();
    assert_eq!(
        Some(mark),
        newest,
        "the watermark is the newest updated_at fetched"
    );

    // The next ones ask from the watermark less the overlap.
    let asked_from = mark - chrono::Duration::seconds(30);
    wait_for(
        "an incremental asking updated_since = watermark - overlap",
        Duration::from_secs(30),
        || async {
            w.sim.sim.first_pages().iter().find_map(|a| {
                let since = DateTime::parse_from_rfc3339(a.updated_since.as_deref()?).ok()?;
                (since == asked_from).then_some(())
            })
        },
    )
    .await;

    // A change upstream (a new version, a later updated_at) arrives with no command sent.
    let changed = w.sim.sim.mutate(3, 11);
    for p in &changed {
        let key = p.identity();
        wait_for(
            &format!("{key:?} at version {}", p.version),
            Duration::from_secs(30),
            || async {
                let stored = w.stored().await;
                let (s, _) = stored.get(&key)?;
                (s.version == p.version && s.content == p.content).then_some(())
            },
        )
        .await;
    }
    w.wait_outbox_empty(Duration::from_secs(30)).await;
    let events = w.read_all(&w.settings.topics.changes).await;
    for p in &changed {
        let code = p.content.product_code.clone().unwrap_or_default();
        let event = events
            .iter()
            .map(json_of)
            .find(|e| e["product_code"] == json!(code) && e["op"] == "updated")
            .unwrap_or_else(|| panic!("no change event for {code}"));
        let by = event["request_id"].as_str().unwrap_or_default();
        assert!(by.starts_with("sched:wms:incremental:"), "{by}");
    }
    let moved = watermark(&w).await.expect("a watermark");
    assert!(moved > mark, "the watermark moved on: {moved} > {mark}");

    // What an operator sees: `product-sync schedule` and the console's overview.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_product-sync"))
        .args(["schedule", "--json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .envs(&w.vars)
        .env(
            "PRODUCT_SYNC__UPSTREAM__SCHEDULE__INCREMENTAL_EVERY_MS",
            "1500",
        )
        .output()
        .expect("product-sync schedule runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Value = serde_json::from_str(&stdout).expect("JSON");
    assert!(shown["holder"].is_string(), "{shown}");
    let wms = &shown["systems"][0];
    assert_eq!(wms["system"], "wms");
    let shown_mark: DateTime<Utc> = serde_json::from_value(wms["watermark"].clone()).unwrap();
    assert!(shown_mark >= moved, "{wms}");
    assert_eq!(wms["schedules"][0]["kind"], "incremental");
    assert_eq!(wms["schedules"][0]["schedule"], "every 1500 ms");
    assert!(wms["schedules"][0]["next_slot"].is_string(), "{wms}");
    let overview = format!("http://{}/api/v1/overview", app.ops);
    let console = wait_for(
        "the console's schedules",
        Duration::from_secs(10),
        || async {
            let o: Value = reqwest::get(&overview).await.ok()?.json().await.ok()?;
            o["schedules"]["holder"].is_string().then_some(o)
        },
    )
    .await;
    let last = &console["schedules"]["systems"][0]["schedules"][0]["last_request_id"];
    assert!(
        last.as_str()
            .is_some_and(|id| id.starts_with("sched:wms:incremental:")),
        "{last}"
    );
    // No command came from anywhere but the scheduler.
    let commands = w.read_all(&w.settings.topics.requests).await;
    assert!(commands.iter().all(|m| {
        let by = json_of(m)["requested_by"].clone();
        by == json!("scheduler")
    }));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_watermark_never_moves_back_and_not_on_a_failed_command() {
    let w = world(60, 1).await;
    let app = w.start().await;
    w.command("all-1", json!({"all": true})).await;
    w.wait_results(&["all-1"], Duration::from_secs(60)).await;
    let mark = watermark(&w)
        .await
        .expect("a completed all moves the watermark");

    // Not on a failed command: a newer product upstream, the system then refusing.
    w.sim.sim.mutate(2, 5);
    w.sim.sim.set_faults(Faults {
        script: vec![product_sync::sim::Fault::Forbidden].into(),
        ..Faults::default()
    });
    w.command("all-2", json!({"all": true})).await;
    let results = w.wait_results(&["all-2"], Duration::from_secs(60)).await;
    let failed = results.iter().find(|r| r["request_id"] == "all-2").unwrap();
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(
        watermark(&w).await,
        Some(mark),
        "a failed command moves nothing"
    );

    // Never past now: a record stamped in the future (a clock ahead upstream) stops at now.
    w.sim.sim.set_faults(Faults::default());
    let mut ahead = w.sim.sim.catalogue().products()[0].clone();
    ahead.version += 1;
    ahead.updated_at = Some(
        DateTime::parse_from_rfc3339("2090-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc),
    );
    w.sim.sim.upsert(vec![ahead]);
    w.command("all-ahead", json!({"all": true})).await;
    w.wait_results(&["all-ahead"], Duration::from_secs(60))
        .await;
    let clamped = watermark(&w).await.expect("a watermark");
    assert!(clamped > mark && clamped <= Utc::now(), "{clamped}");

    // Never back: a later watermark than anything upstream stays where it is.
    let future = DateTime::parse_from_rfc3339("2099-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    assert!(
        schedules::advance_watermark(&w.db, "wms", Some(future), "by-hand", Utc::now())
            .await
            .unwrap()
    );
    // `"updated_since": "watermark"` resolves to it, less the default overlap.
    w.command("since-mark", json!({"updated_since": "watermark"}))
        .await;
    w.command("all-3", json!({"all": true})).await;
    let results = w
        .wait_results(&["since-mark", "all-3"], Duration::from_secs(60))
        .await;
    for id in ["since-mark", "all-3", "all-ahead"] {
        let r = results.iter().find(|r| r["request_id"] == id).unwrap();
        assert_eq!(r["status"], "completed", "{r}");
    }
    let asked: Vec<String> = w
        .sim
        .sim
        .first_pages()
        .into_iter()
        .filter_map(|a| a.updated_since)
        .collect();
    assert_eq!(asked, ["2098-12-31T23:58:00Z"], "watermark less 120 s");
    assert_eq!(watermark(&w).await, Some(future), "never moved back");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_publish_each_slot_once_and_a_kill_hands_the_schedule_over_within_the_lease()
{
    let w = world(40, 2).await;
    let vars = [(
        "PRODUCT_SYNC__UPSTREAM__SCHEDULE__INCREMENTAL_EVERY_MS",
        "1000",
    )];
    let a = w.spawn_process("sched-a", &vars);
    let b = w.spawn_process("sched-b", &vars);
    let holder = |w: &World| {
        let db = w.db.clone();
        async move {
            let (h, until) = schedules::lease(&db, schedules::SCHEDULER_LEASE)
                .await
                .ok()??;
            (until > Utc::now()).then_some(h)
        }
    };
    let first = wait_for("a scheduler holder", Duration::from_secs(60), || holder(&w)).await;
    // A few slots under one holder.
    wait_for(
        "three scheduled commands",
        Duration::from_secs(60),
        || async { (scheduled(&w).await.len() >= 3).then_some(()) },
    )
    .await;
    let (victim, survivor) = match first.contains(&format!("-{}-", a.id())) {
        true => (a, b),
        false => {
            assert!(first.contains(&format!("-{}-", b.id())), "{first}");
            (b, a)
        }
    };
    signal(&victim, "KILL");
    let killed_at = Utc::now();
    let next = wait_for("another holder", Duration::from_secs(30), || async {
        holder(&w).await.filter(|h| *h != first)
    })
    .await;
    assert!(next.contains(&format!("-{}-", survivor.id())), "{next}");
    let taken_over = Utc::now() - killed_at;
    assert!(
        taken_over <= chrono::Duration::seconds(12),
        "taken over after {taken_over} (lease 5 s + a tick, with room for a busy machine)"
    );
    wait_for(
        "a slot published after the takeover",
        Duration::from_secs(30),
        || async {
            scheduled(&w)
                .await
                .iter()
                .any(|(id, _)| slot_of(id) > killed_at)
                .then_some(())
        },
    )
    .await;
    // Each slot's request id once (one more is allowed for the slot in flight at the kill).
    let ids: Vec<String> = scheduled(&w).await.into_iter().map(|(id, _)| id).collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.len() <= 1 && repeated.iter().all(|(_, n)| **n == 2),
        "slots published more than once: {repeated:?}"
    );
    drop(survivor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_upstream_makes_slots_skipped_not_piled_up() {
    let w = world(30, 1).await;
    // Every page takes 1.2 s; a command of 30 products in pages of 5 takes ~7 s; a slot is due
    // every second.
    w.sim.sim.set_faults(Faults {
        latency_ms: 1200,
        ..Faults::default()
    });
    let mut settings = w.settings.clone();
    settings.upstream.page_size = 5;
    settings.upstream.schedule = every(1000, 1000);
    let app = w.start_with(settings).await;
    let skipped = || async {
        let rows = schedules::slots(&w.db).await.ok()?;
        let row = rows.iter().find(|r| r.kind == "incremental")?;
        (row.skipped >= 3).then_some(row.skipped)
    };
    wait_for("three skipped slots", Duration::from_secs(60), skipped).await;
    // Never two scheduled incrementals at once.
    let running = statuses(&w, "sched:wms:incremental:")
        .await
        .values()
        .filter(|s| *s == "running")
        .count();
    assert!(
        running <= 1,
        "{running} scheduled incrementals running at once"
    );
    let published = scheduled(&w).await.len();
    assert!(
        published <= 2,
        "{published} published while one was running"
    );
    let page = reqwest::get(format!("http://{}/metrics", app.ops))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = sample(
        &page,
        "product_sync_schedule_runs_total{kind=\"incremental\",outcome=\"skipped\",system=\"wms\"}",
    );
    assert!(counted >= 3.0, "skips counted: {counted}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_downtime_one_catch_up_command_not_one_per_missed_slot() {
    let w = world(20, 1).await;
    let mut settings = w.settings.clone();
    settings.upstream.schedule = every(1000, 1000);
    let app = w.start_with(settings.clone()).await;
    wait_for("a scheduled command", Duration::from_secs(60), || async {
        (!scheduled(&w).await.is_empty()).then_some(())
    })
    .await;
    app.stop().await;
    let stopped_at = Utc::now();
    let before = scheduled(&w).await.len();
    // Five slots go by with no instance up.
    wait_for("five missed slots", Duration::from_secs(10), || async {
        (Utc::now() - stopped_at > chrono::Duration::seconds(5)).then_some(())
    })
    .await;
    let restarted_at = Utc::now();
    let app = w.start_with(settings).await;
    wait_for("the catch-up", Duration::from_secs(60), || async {
        (scheduled(&w).await.len() > before).then_some(())
    })
    .await;
    let ids: Vec<DateTime<Utc>> = scheduled(&w)
        .await
        .iter()
        .map(|(id, _)| slot_of(id))
        .collect();
    let missed: Vec<_> = ids
        .iter()
        .filter(|s| **s > stopped_at && **s < restarted_at - chrono::Duration::seconds(1))
        .collect();
    assert!(
        missed.is_empty(),
        "slots of the downtime published: {missed:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drift_check_finds_a_row_changed_behind_product_sync_s_back() {
    let w = world(50, 1).await;
    let app = w.start().await;
    w.command("fill", json!({"all": true})).await;
    w.wait_results(&["fill"], Duration::from_secs(60)).await;
    app.stop().await;
    // Behind product-sync's back: a stored name edited by hand.
    let changed =
        w.db.execute_unprepared(
            "UPDATE products SET product_name = 'edited by hand' \
             WHERE id = (SELECT min(id) FROM products WHERE product_code IS NOT NULL)",
        )
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1);
    let mut settings = w.settings.clone();
    settings.upstream.schedule = ScheduleSettings {
        drift_check_cron: Some("*/2 * * * * *".parse().unwrap()),
        ..ScheduleSettings::default()
    };
    let app = w.start_with(settings).await;
    let result = wait_for(
        "a drift check's result",
        Duration::from_secs(60),
        || async {
            w.results().await.into_iter().find(|r| {
                r["request_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("sched:wms:drift:"))
            })
        },
    )
    .await;
    assert_eq!(result["status"], "completed", "{result}");
    assert_eq!(result["counts"]["updated"], 1, "{result}");
    assert_eq!(result["drift"]["updated"].as_array().map(Vec::len), Some(1));
    let url = format!("http://{}/metrics", app.ops);
    let gauge = "product_sync_drift_products{kind=\"updated\",system=\"wms\"}";
    wait_for("the drift gauge", Duration::from_secs(10), || async {
        let page = reqwest::get(&url).await.ok()?.text().await.ok()?;
        (sample(&page, gauge) == 1.0).then_some(())
    })
    .await;
    // A dry run: nothing written, the hand edit still there.
    let name: String = w
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT product_name FROM products WHERE id = (SELECT min(id) FROM products WHERE product_code IS NOT NULL)",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get("", "product_name")
        .unwrap();
    assert_eq!(name, "edited by hand");
    app.stop().await;
}

#[test]
fn a_bad_schedule_setting_stops_start_up_naming_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_product-sync"))
        .arg("run")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .env(
            "PRODUCT_SYNC__UPSTREAM__SCHEDULE__SNAPSHOT_CRON",
            "0 0 2 * *",
        )
        .output()
        .expect("product-sync run starts");
    assert_eq!(out.status.code(), Some(2), "a configuration error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`upstream.schedule.snapshot_cron`")
            && stderr.contains("the environment")
            && stderr.contains("5 fields"),
        "{stderr}"
    );
}
