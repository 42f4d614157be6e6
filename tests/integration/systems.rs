//! Several management systems in one deployment, against the real broker and PostgreSQL and
//! two simulators: each system's own credentials and catalogue, commands for both on one
//! partition; one system down while the other's commands complete, the down system's
//! commands healing through the retry topic with no replay; the rate limit measured at the
//! simulator; the governance registration naming every system.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use product_sync::config::{Settings, UpstreamSettings};
use product_sync::product::{Identity, Product};
use product_sync::sim::{Faults, SimConfig};
use product_sync::store::fold::load_all;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::helpers::wait_for;
use crate::pipeline::{World, json_of, sample, world};
use crate::upstream::{TestSim, start_sim};

/// A second management system, `fund`, with its own secret and catalogue (another seed).
async fn fund_sim(products: usize) -> TestSim {
    let sim = start_sim(
        products,
        SimConfig {
            client_secret: "fund-only-secret".to_owned(),
            seed: 7,
            ..SimConfig::default()
        },
    )
    .await;
    // Another catalogue than wms's: every record renamed and re-priced.
    let changed = sim.sim.mutate(products, 99);
    assert_eq!(changed.len(), products);
    sim
}

/// The world's settings with `fund` added and the retry topic on, with short delays.
fn two_systems(w: &World, fund: &TestSim) -> Settings {
    let mut settings = w.settings.clone();
    settings.systems.push(UpstreamSettings {
        system: "fund".to_owned(),
        base_url: fund.base_url.clone(),
        client_secret: SecretString::from("fund-only-secret"),
        ..settings.upstream.clone()
    });
    settings.topics.retry = settings.topics.requests.replace(".requests", ".retry");
    settings.pipeline.retry_delays = [1, 2, 4, 8, 16, 30].map(Duration::from_secs).to_vec();
    settings
}

async fn stored_of(w: &World, system: &str) -> BTreeMap<Identity, Product> {
    load_all(&w.db, system)
        .await
        .expect("read the store")
        .into_iter()
        .map(|(i, p, _)| (i, p))
        .collect()
}

fn catalogue_of(sim: &TestSim) -> BTreeMap<Identity, Product> {
    sim.sim
        .catalogue()
        .products()
        .iter()
        .map(|p| (p.identity(), p.clone()))
        .collect()
}

/// The instance's Prometheus page.
async fn metrics_of(app: &crate::pipeline::InProcess) -> String {
    let url = format!("http://{}/metrics", app.ops);
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// Sends a command for `system` (the default when `None`).
async fn send(w: &World, id: &str, system: Option<&str>, selector: Value) {
    let mut body = json!({"request_id": id, "selector": selector});
    if let Some(system) = system {
        body["system"] = json!(system);
    }
    w.send(id, body.to_string().as_bytes(), &[]).await;
}

/// The results of `id` on the result topic, in order.
fn results_of<'a>(results: &'a [Value], id: &str) -> Vec<&'a Value> {
    results.iter().filter(|r| r["request_id"] == id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_systems_with_their_own_credentials_and_catalogues_share_one_partition() {
    let w = world(150, 1).await;
    let fund = fund_sim(120).await;
    let app = w.start_with(two_systems(&w, &fund)).await;
    // Interleaved on the one partition; the first names no system (the default, wms).
    send(&w, "w1", None, json!({"all": true})).await;
    send(&w, "f1", Some("fund"), json!({"all": true})).await;
    send(&w, "w2", Some("wms"), json!({"category": "cash"})).await;
    send(
        &w,
        "f2",
        Some("fund"),
        json!({"product_codes": ["WM0000001"]}),
    )
    .await;
    send(&w, "x1", Some("insurance"), json!({"all": true})).await;
    let ids = ["w1", "f1", "w2", "f2", "x1"];
    let results = w.wait_results(&ids, Duration::from_secs(90)).await;
    for id in ["w1", "f1", "w2", "f2"] {
        let r = results_of(&results, id);
        assert_eq!(r.len(), 1, "{id}: {r:?}");
        assert_eq!(r[0]["status"], "completed", "{id}: {}", r[0]);
    }
    let x1 = results_of(&results, "x1")[0];
    assert_eq!(x1["status"], "rejected", "{x1}");
    assert_eq!(x1["error_kind"], "unknown_system", "{x1}");
    assert!(
        x1["error"].as_str().unwrap().contains("\"fund\""),
        "names the systems served: {x1}"
    );
    // Each system's store is its own catalogue, fetched with its own credentials.
    assert_eq!(stored_of(&w, "wms").await, catalogue_of(&w.sim));
    assert_eq!(stored_of(&w, "fund").await, catalogue_of(&fund));
    assert_ne!(catalogue_of(&w.sim), catalogue_of(&fund));
    let tokens = |s: &TestSim| {
        s.sim
            .stats()
            .tokens_issued
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(tokens(&fund) >= 1 && tokens(&w.sim) >= 1);
    // Change events are keyed by system.
    w.wait_outbox_empty(Duration::from_secs(60)).await;
    let changes = w.read_all(&w.settings.topics.changes).await;
    let keyed = |prefix: &str| {
        changes
            .iter()
            .filter(|m| m.key().is_some_and(|k| k.starts_with(prefix.as_bytes())))
            .count()
    };
    assert_eq!(keyed("wms/"), 150);
    assert_eq!(keyed("fund/"), 120);
    // The governance registration names both systems.
    let registrations = w.sim.sim.registrations();
    assert!(
        registrations
            .iter()
            .any(|r| r["systems"] == json!(["fund", "wms"])),
        "{registrations:?}"
    );
    app.stop().await;
}

use rdkafka::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_system_down_holds_up_no_other_and_its_commands_heal_through_the_retry_topic() {
    let w = world(100, 1).await;
    let fund = fund_sim(80).await;
    let mut settings = two_systems(&w, &fund);
    let f = &mut settings.systems[0];
    f.circuit_failures = 3;
    f.circuit_open = Duration::from_millis(2000);
    f.retry_max_elapsed = Duration::from_secs(20);
    let app = w.start_with(settings).await;
    fund.sim.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    let started = Instant::now();
    for i in 1..=3 {
        send(&w, &format!("f{i}"), Some("fund"), json!({"all": true})).await;
        send(&w, &format!("w{i}"), None, json!({"all": true})).await;
    }
    // wms's commands complete while fund is still down: behind each fund command on the
    // partition, yet never held for fund's retry budget (20 s here) — the circuit opens.
    let results = w
        .wait_results(&["w1", "w2", "w3"], Duration::from_secs(60))
        .await;
    let waited = started.elapsed();
    for id in ["w1", "w2", "w3"] {
        let r = results_of(&results, id);
        assert_eq!(r[0]["status"], "completed", "{id}: {}", r[0]);
    }
    assert!(
        waited < Duration::from_secs(20),
        "wms waited {waited:?}: longer than fund's retry budget, so fund held it up"
    );
    let metrics = metrics_of(&app).await;
    assert!(
        sample(
            &metrics,
            "product_sync_upstream_circuit_opened_total{system=\"fund\"}"
        ) >= 1.0,
        "fund's circuit opened"
    );
    // Fund's commands are retrying (attempt and time given), none failed or dead-lettered.
    let results = w.results().await;
    for id in ["f1", "f2", "f3"] {
        let r = results_of(&results, id);
        assert!(!r.is_empty(), "{id} has a result");
        assert!(r.iter().all(|r| r["status"] == "retrying"), "{id}: {r:?}");
        assert_eq!(r[0]["attempt"], 1, "{}", r[0]);
        assert!(r[0]["next_attempt_at"].is_string(), "{}", r[0]);
        assert_eq!(r[0]["error_kind"], "upstream", "{}", r[0]);
    }
    assert!(w.read_all(&w.settings.topics.dlq).await.is_empty());
    // Fund comes back: its commands complete by themselves.
    fund.sim.set_faults(Faults::default());
    let done = wait_for(
        "fund's commands completed",
        Duration::from_secs(90),
        || async {
            let results = w.results().await;
            ["f1", "f2", "f3"]
                .iter()
                .all(|id| {
                    results_of(&results, id)
                        .iter()
                        .any(|r| r["status"] == "completed")
                })
                .then_some(results)
        },
    )
    .await;
    for id in ["f1", "f2", "f3"] {
        let r = results_of(&done, id);
        assert_eq!(r.last().unwrap()["status"], "completed", "{id}: {r:?}");
        assert!(r.iter().all(|r| r["status"] != "failed"), "{id}: {r:?}");
    }
    assert_eq!(stored_of(&w, "fund").await, catalogue_of(&fund));
    assert!(
        w.read_all(&w.settings.topics.dlq).await.is_empty(),
        "no DLQ"
    );
    // The retry topic holds each retried attempt with its headers.
    let retried = w
        .read_all(&w.settings.topics.requests.replace(".requests", ".retry"))
        .await;
    assert!(retried.len() >= 3, "{}", retried.len());
    for m in &retried {
        let attempt = crate::pipeline::header_of(m, "retry.attempt").unwrap();
        assert!(attempt.parse::<u32>().unwrap() >= 1);
        assert!(crate::pipeline::header_of(m, "retry.not_before").is_some());
        assert_eq!(json_of(m)["system"], "fund");
    }
    let metrics = metrics_of(&app).await;
    assert_eq!(
        sample(
            &metrics,
            "product_sync_upstream_circuit_open{system=\"fund\"}"
        ),
        0.0,
        "fund's circuit closed again"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rate_limit_holds_as_measured_at_the_simulator() {
    const RATE: u32 = 8;
    let w = world(20, 1).await;
    let fund = fund_sim(300).await;
    let mut settings = two_systems(&w, &fund);
    settings.systems[0].rate_limit_per_s = Some(RATE);
    settings.systems[0].page_size = 10;
    let app = w.start_with(settings).await;
    send(&w, "f-all", Some("fund"), json!({"all": true})).await;
    let results = w.wait_results(&["f-all"], Duration::from_secs(90)).await;
    assert_eq!(results_of(&results, "f-all")[0]["status"], "completed");
    let times = fund
        .sim
        .stats()
        .product_request_times
        .lock()
        .unwrap()
        .clone();
    assert_eq!(times.len(), 30, "30 pages of 10");
    // A token bucket of RATE per second holding one second's worth: any span of t seconds
    // holds at most RATE + RATE·t requests (one more for the arrival jitter of the network).
    for (i, a) in times.iter().enumerate() {
        for (j, b) in times.iter().enumerate().skip(i + 1) {
            let span = b.duration_since(*a).as_secs_f64();
            let allowed = f64::from(RATE) * (1.0 + span) + 1.0;
            assert!(
                (j - i + 1) as f64 <= allowed,
                "{} requests in {span:.2} s: more than a {RATE}/s bucket lets through",
                j - i + 1
            );
        }
    }
    let span = times[29].duration_since(times[0]).as_secs_f64();
    assert!(
        span >= 1.5,
        "30 requests at {RATE}/s after a burst of {RATE}: {span:.2} s"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_whose_retries_run_out_goes_to_the_dlq_with_its_attempts() {
    let w = world(20, 1).await;
    let fund = fund_sim(20).await;
    let mut settings = two_systems(&w, &fund);
    settings.pipeline.retry_delays = vec![Duration::from_millis(300); 2];
    settings.systems[0].retry_max_elapsed = Duration::from_millis(500);
    let app = w.start_with(settings).await;
    fund.sim.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    send(&w, "f-out", Some("fund"), json!({"all": true})).await;
    let results = wait_for("a failed result", Duration::from_secs(60), || async {
        let results = w.results().await;
        results_of(&results, "f-out")
            .iter()
            .any(|r| r["status"] == "failed")
            .then_some(results)
    })
    .await;
    let statuses: Vec<&Value> = results_of(&results, "f-out")
        .iter()
        .map(|r| &r["status"])
        .collect();
    assert_eq!(
        statuses,
        [&json!("retrying"), &json!("retrying"), &json!("failed")]
    );
    let attempts: Vec<&Value> = results_of(&results, "f-out")
        .iter()
        .map(|r| &r["attempt"])
        .collect();
    assert_eq!(attempts, [&json!(1), &json!(2), &Value::Null]);
    let dlq = w.read_all(&w.settings.topics.dlq).await;
    assert_eq!(dlq.len(), 1);
    let header = |name| crate::pipeline::header_of(&dlq[0], name);
    assert_eq!(header("retry.attempt").as_deref(), Some("2"));
    assert_eq!(header("dlq.error_class").as_deref(), Some("transient"));
    assert_eq!(json_of(&dlq[0])["request_id"], "f-out");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_system_s_commands_wait_without_using_attempts_and_run_once_resumed() {
    let w = world(20, 1).await;
    let fund = fund_sim(30).await;
    let mut settings = two_systems(&w, &fund);
    settings.pipeline.retry_delays = vec![Duration::from_millis(500); 2];
    // Paused in the store before the instance starts, as the console of any instance does:
    // the instance follows it from its start (it does not even authorize with `fund`).
    let now = chrono::Utc::now();
    product_sync::store::pauses::set_paused(&w.db, "fund", true, now)
        .await
        .unwrap();
    let app = w.start_with(settings).await;
    let overview = format!("http://{}/api/v1/overview", app.ops);
    wait_for(
        "the instance to follow the pause",
        Duration::from_secs(30),
        || async {
            let o: Value = reqwest::get(&overview).await.ok()?.json().await.ok()?;
            let systems = o["systems"].as_array()?.clone();
            systems
                .iter()
                .any(|s| s["name"] == "fund" && s["paused"] == true)
                .then_some(())
        },
    )
    .await;
    send(&w, "f-paused", Some("fund"), json!({"all": true})).await;
    send(&w, "w-meanwhile", None, json!({"all": true})).await;
    // More rounds than there are delays: a pause uses up no attempt, and says so once.
    let retry_topic = w.settings.topics.requests.replace(".requests", ".retry");
    wait_for("three waits", Duration::from_secs(30), || async {
        let waits = w.read_all(&retry_topic).await;
        (waits.len() >= 3).then_some(())
    })
    .await;
    for m in w.read_all(&retry_topic).await {
        let header = |name| crate::pipeline::header_of(&m, name);
        assert_eq!(header("retry.paused").as_deref(), Some("1"));
        assert_eq!(
            header("retry.attempt").as_deref(),
            Some("0"),
            "no attempt used"
        );
    }
    // The other system's command completes meanwhile (its result may land after the waits).
    let results = wait_for("w-meanwhile completed", Duration::from_secs(60), || async {
        let results = w.results().await;
        results_of(&results, "w-meanwhile")
            .iter()
            .any(|r| r["status"] == "completed")
            .then_some(results)
    })
    .await;
    let paused = results_of(&results, "f-paused");
    assert_eq!(paused.len(), 1, "one retrying result per pause: {paused:?}");
    assert_eq!(paused[0]["status"], "retrying", "{}", paused[0]);
    assert!(paused[0]["error"].as_str().unwrap().contains("paused"));
    let w_done = results_of(&results, "w-meanwhile");
    assert_eq!(w_done[0]["status"], "completed", "the other system runs on");
    let requests = |s: &TestSim| {
        s.sim
            .stats()
            .product_requests
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(requests(&fund), 0, "nothing was sent to a paused system");
    let tokens = fund
        .sim
        .stats()
        .token_requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(tokens, 0, "not even a token request at start-up");
    product_sync::store::pauses::set_paused(&w.db, "fund", false, now)
        .await
        .unwrap();
    wait_for(
        "the resumed command completed",
        Duration::from_secs(30),
        || async {
            let results = w.results().await;
            results_of(&results, "f-paused")
                .iter()
                .any(|r| r["status"] == "completed")
                .then_some(())
        },
    )
    .await;
    assert!(w.read_all(&w.settings.topics.dlq).await.is_empty());
    app.stop().await;
}

/// librdkafka keeps a partition's pause through a revoke and a re-assignment to the same
/// member: a retry-topic partition paused for a waiting command when a rebalance comes must
/// still be read afterwards (the chaos run found it stuck for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebalance_while_a_retried_command_waits_leaves_its_partition_readable() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let w = world(20, 1).await;
    let fund = fund_sim(20).await;
    let mut settings = two_systems(&w, &fund);
    settings.pipeline.retry_delays = vec![Duration::from_secs(15); 2];
    settings.systems[0].retry_max_elapsed = Duration::from_millis(500);
    let app = w.start_with(settings).await;
    fund.sim.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    send(&w, "f-wait", Some("fund"), json!({"all": true})).await;
    let retry_topic = w.settings.topics.requests.replace(".requests", ".retry");
    wait_for(
        "the command on the retry topic",
        Duration::from_secs(30),
        || async { (!w.read_all(&retry_topic).await.is_empty()).then_some(()) },
    )
    .await;
    // Another member joins the group (for another topic): every partition of the instance is
    // revoked and assigned back to it while the retry partition is paused.
    let kafka = w.settings.kafka.clone();
    let other_topic = w.settings.topics.changes.clone();
    let member = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = product_sync::kafka::client_config(&kafka)
            .set("group.id", &kafka.group_id)
            .set("session.timeout.ms", "6000")
            .create()
            .expect("a second member");
        c.subscribe(&[&other_topic]).expect("subscribe");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while c.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the second member never joined"
            );
            let _ = c.poll(Duration::from_millis(100));
        }
        c
    })
    .await
    .unwrap();
    fund.sim.set_faults(Faults::default());
    wait_for(
        "the retried command completed",
        Duration::from_secs(60),
        || async {
            let results = w.results().await;
            results_of(&results, "f-wait")
                .iter()
                .any(|r| r["status"] == "completed")
                .then_some(())
        },
    )
    .await;
    drop(member);
    app.stop().await;
}
