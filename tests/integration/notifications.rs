//! Change notifications against the real broker, PostgreSQL and the simulator: a burst is
//! coalesced into a handful of upstream requests, a notified change reaches the store (also one
//! made while its product is being fetched), a crash between a command and its notifications'
//! offsets loses no code, a bad notification goes to the DLQ without holding up the next, and
//! `max_pending_codes` bounds what waits.

use std::sync::atomic::Ordering;
use std::time::Duration;

use product_sync::kafka::{TopicSpec, ensure_topics};
use product_sync::product::{Identity, Product};
use product_sync::sim::Faults;
use rdkafka::producer::FutureRecord;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::helpers::wait_for;
use crate::pipeline::{World, header_of, json_of, sample, wait_exit, world};

/// A world whose instances also consume a notification topic of `partitions` partitions.
async fn notified(products: usize, partitions: i32) -> World {
    let mut w = world(products, partitions).await;
    let topic = w
        .settings
        .topics
        .requests
        .replace(".requests", ".notifications");
    let spec = TopicSpec {
        name: topic.clone(),
        partitions,
        replication_factor: 1,
        compacted: false,
    };
    ensure_topics(&w.settings.kafka, &[spec])
        .await
        .expect("create the notification topic");
    w.settings.topics.notifications = topic.clone();
    w.vars
        .insert("PRODUCT_SYNC__TOPICS__NOTIFICATIONS".to_owned(), topic);
    w
}

/// Sends notifications (key, value) and waits for every acknowledgement.
async fn notify(w: &World, notes: &[(String, Value)]) {
    let topic = &w.settings.topics.notifications;
    let bodies: Vec<(String, String)> = notes
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    for chunk in bodies.chunks(2000) {
        let sends = chunk.iter().map(|(key, body)| {
            w.producer.send(
                FutureRecord::to(topic).key(key).payload(body),
                Duration::from_secs(30),
            )
        });
        for sent in futures::future::join_all(sends).await {
            sent.map_err(|(e, _)| e).expect("notification produced");
        }
    }
}

/// One notification per code, keyed by it.
fn one_each(codes: &[String]) -> Vec<(String, Value)> {
    codes
        .iter()
        .map(|c| (c.clone(), json!({ "product_code": c })))
        .collect()
}

/// The simulator's products that have a code, in catalogue order.
fn coded(w: &World) -> Vec<Product> {
    w.sim
        .sim
        .catalogue()
        .products()
        .iter()
        .filter(|p| p.content.product_code.is_some())
        .cloned()
        .collect()
}

fn code_of(p: &Product) -> String {
    p.content.product_code.clone().expect("a coded product")
}

/// Changes one product upstream (a new NAV, version and time); returns the new version.
fn bump(w: &World, code: &str) -> i64 {
    let mut p = coded(w)
        .into_iter()
        .find(|p| code_of(p) == code)
        .expect("the product upstream");
    p.version += 1;
    p.content.nav = Some(p.content.nav.unwrap_or(Decimal::ONE) + Decimal::new(1, 3));
    p.updated_at = Some(chrono::Utc::now());
    let version = p.version;
    w.sim.sim.upsert(vec![p]);
    version
}

async fn stored_version(w: &World, code: &str) -> Option<i64> {
    w.stored()
        .await
        .get(&Identity::Code(code.to_owned()))
        .map(|(p, _)| p.version)
}

/// The request ids of the commands made from notifications, as published (repeats kept).
async fn notification_commands(w: &World) -> Vec<String> {
    w.read_all(&w.settings.topics.requests)
        .await
        .iter()
        .filter_map(|m| json_of(m)["request_id"].as_str().map(str::to_owned))
        .filter(|id| id.starts_with("notif:"))
        .collect()
}

/// The commands made from notifications with their codes, as published (repeats kept).
async fn notification_batches(w: &World) -> Vec<(String, Vec<String>)> {
    w.read_all(&w.settings.topics.requests)
        .await
        .iter()
        .map(json_of)
        .filter_map(|c| {
            let id = c["request_id"].as_str()?.to_owned();
            let codes = c["selector"]["product_codes"]
                .as_array()?
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            id.starts_with("notif:").then_some((id, codes))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_ten_thousand_notifications_costs_a_handful_of_upstream_requests() {
    let mut w = notified(2100, 6).await;
    w.settings.upstream.page_size = 500;
    let codes: Vec<String> = coded(&w).iter().take(2000).map(code_of).collect();
    // Each product named five times, in a scattered order (7919 is prime to 10,000: every
    // index once), each keyed by its code as a management system would.
    let notes: Vec<(String, Value)> = (0..10_000)
        .map(|j| {
            let code = &codes[(j * 7919 % 10_000) % 2000];
            (code.clone(), json!({ "product_code": code }))
        })
        .collect();
    notify(&w, &notes).await;
    let asked_before = w.sim.sim.stats().product_requests.load(Ordering::SeqCst);
    let instance = w.start_with(w.settings.clone()).await;

    let stored = wait_for(
        "all 2,000 notified products in the store",
        Duration::from_secs(120),
        || async {
            let stored = w.stored().await;
            (stored.len() >= codes.len()).then_some(stored)
        },
    )
    .await;
    for p in coded(&w).iter().take(2000) {
        let (kept, _) = &stored[&Identity::Code(code_of(p))];
        assert_eq!(kept, p, "the stored copy of {}", code_of(p));
    }
    assert_eq!(stored.len(), 2000, "only the notified products are fetched");
    // The bound: about 333 distinct codes per partition (below the page size of 500) all read
    // within one window of 1 s, so one command per partition, or two where the reading
    // crosses the end of a window: at most 2 × 6 = 12 commands, each a single page.
    let asked = w.sim.sim.stats().product_requests.load(Ordering::SeqCst) - asked_before;
    let commands = notification_commands(&w).await;
    println!(
        "10,000 notifications of 2,000 products: {} commands, {asked} product requests",
        commands.len()
    );
    assert!(asked <= 12, "{asked} product requests for one burst");
    assert!(commands.len() as u64 <= asked.max(1), "{commands:?}");
    let counts = product_sync::store::notifications::counts(&w.db)
        .await
        .unwrap();
    let wms = counts
        .iter()
        .find(|c| c.system == "wms")
        .expect("wms counts");
    assert_eq!(wms.notifications, 10_000, "{wms:?}");
    assert_eq!(wms.codes, 2000, "{wms:?}");
    instance.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notified_change_is_stored_even_when_it_comes_during_that_products_fetch() {
    let mut w = notified(60, 3).await;
    w.settings.notifications.window = Duration::from_millis(100);
    let instance = w.start_with(w.settings.clone()).await;
    let code = code_of(&coded(&w)[7]);
    let note = || vec![(code.clone(), json!({ "product_code": code }))];

    let v2 = bump(&w, &code);
    notify(&w, &note()).await;
    wait_for(
        "the notified change in the store",
        Duration::from_secs(20),
        || async { (stored_version(&w, &code).await == Some(v2)).then_some(()) },
    )
    .await;

    // The next fetch of the product reads its page, then holds the answer for 3 s: a change
    // made and notified meanwhile is not in that answer and needs a fetch of its own.
    w.sim.sim.set_faults(Faults {
        answer_delay_ms: 3000,
        ..Faults::default()
    });
    let v3 = bump(&w, &code);
    let read = w.sim.sim.stats().pages_read.load(Ordering::SeqCst);
    notify(&w, &note()).await;
    wait_for(
        "the page with the first change read",
        Duration::from_secs(20),
        || async { (w.sim.sim.stats().pages_read.load(Ordering::SeqCst) > read).then_some(()) },
    )
    .await;
    let v4 = bump(&w, &code);
    notify(&w, &note()).await;
    assert!(v4 > v3);
    wait_for(
        "the change made during the fetch in the store",
        Duration::from_secs(30),
        || async { (stored_version(&w, &code).await == Some(v4)).then_some(()) },
    )
    .await;
    let commands = notification_commands(&w).await;
    assert_eq!(
        commands.len(),
        3,
        "one command per notification: {commands:?}"
    );
    instance.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_between_a_command_and_its_offsets_loses_no_code() {
    let w = notified(120, 3).await;
    let codes: Vec<String> = coded(&w).iter().take(40).map(code_of).collect();
    let notes = one_each(&codes);
    notify(&w, &notes).await;
    // Debug builds die the hard way right after the first command is acknowledged, before
    // its notifications' offsets are stored.
    let mut crashing = w.spawn_process(
        "notify-crash",
        &[("PRODUCT_SYNC_DEBUG_ABORT_AFTER_NOTIFICATION_COMMAND", "1")],
    );
    let status = wait_exit(&mut crashing, Duration::from_secs(60)).await;
    assert!(!status.success(), "the instance died: {status:?}");
    // Each partition's task may have had its first command acknowledged before the abort.
    let first = notification_batches(&w).await;
    assert!(
        !first.is_empty(),
        "a command was published before the crash"
    );

    let _after = w.spawn_process("notify-after", &[]);
    wait_for(
        "every notified code in the store",
        Duration::from_secs(90),
        || async {
            let stored = w.stored().await;
            codes
                .iter()
                .all(|c| stored.contains_key(&Identity::Code(c.clone())))
                .then_some(())
        },
    )
    .await;
    // Every code of a command acknowledged before the crash is asked again (its offset was
    // never stored); the batch re-formed may be larger (it reads the backlog at once), and
    // then it is another command: a request id names one batch's content, never two.
    let all = notification_batches(&w).await;
    for (id, codes) in &first {
        for code in codes {
            let asked = all.iter().filter(|(_, c)| c.contains(code)).count();
            assert!(
                asked >= 2,
                "{code} of {id} is asked again after the crash: {all:?}"
            );
        }
    }
    for (id, codes) in &all {
        for (other, other_codes) in &all {
            if id == other {
                assert_eq!(codes, other_codes, "one id, one content: {id}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_notification_goes_to_the_dlq_and_the_one_behind_it_is_taken() {
    let w = notified(20, 1).await;
    let code = code_of(&coded(&w)[3]);
    let topic = w.settings.topics.notifications.clone();
    for body in [
        "not json at all".to_owned(),
        json!({"system": "nope", "product_code": code}).to_string(),
        json!({"product_code": code}).to_string(),
    ] {
        w.producer
            .send(
                FutureRecord::to(&topic).key("k").payload(&body),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("notification produced");
    }
    let instance = w.start().await;
    wait_for(
        "the good notification's product stored",
        Duration::from_secs(30),
        || async { stored_version(&w, &code).await.map(|_| ()) },
    )
    .await;
    let dlq = wait_for(
        "both bad notifications in the DLQ",
        Duration::from_secs(20),
        || async {
            let records = w.read_all(&w.settings.topics.dlq).await;
            (records.len() >= 2).then_some(records)
        },
    )
    .await;
    let kinds: Vec<Option<String>> = dlq
        .iter()
        .map(|m| header_of(m, product_sync::wire::dlq::ERROR_KIND))
        .collect();
    assert_eq!(
        kinds,
        [
            Some("malformed_notification".to_owned()),
            Some("unknown_system".to_owned())
        ]
    );
    for m in &dlq {
        assert_eq!(
            header_of(m, product_sync::wire::dlq::ORIGINAL_TOPIC).as_deref(),
            Some(topic.as_str())
        );
        assert!(header_of(m, product_sync::wire::dlq::REASON).is_some_and(|r| !r.is_empty()));
    }
    instance.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_pending_codes_holds_under_a_burst_larger_than_it() {
    let w = notified(1100, 3).await;
    let codes: Vec<String> = coded(&w).iter().take(1000).map(code_of).collect();
    let notes = one_each(&codes);
    notify(&w, &notes).await;
    // A child process, so that its metrics are its own.
    let port = crate::relay::free_port();
    let listen = format!("127.0.0.1:{port}");
    let _instance = w.spawn_process(
        "notify-bounded",
        &[
            ("PRODUCT_SYNC__NOTIFICATIONS__MAX_PENDING_CODES", "50"),
            ("PRODUCT_SYNC__NOTIFICATIONS__WINDOW_MS", "300"),
            ("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "500"),
            ("PRODUCT_SYNC__HTTP__LISTEN", &listen),
        ],
    );
    wait_for(
        "all 1,000 notified products in the store",
        Duration::from_secs(120),
        || async { (w.stored().await.len() >= codes.len()).then_some(()) },
    )
    .await;
    let page = wait_for(
        "the instance's metrics",
        Duration::from_secs(10),
        || async {
            let page = reqwest::get(format!("http://{listen}/metrics"))
                .await
                .ok()?;
            page.text().await.ok()
        },
    )
    .await;
    let peak = sample(&page, "product_sync_notification_pending_codes_peak");
    let pauses: f64 = page
        .lines()
        .filter(|l| l.starts_with("product_sync_notification_pauses_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    println!("1,000 codes through a bound of 50: peak {peak}, {pauses} pauses");
    assert!((1.0..=50.0).contains(&peak), "peak {peak} codes waiting");
    assert!(
        pauses >= 1.0,
        "the bound was reached (else this test proves nothing)"
    );
    let commands = notification_commands(&w).await;
    assert!(commands.len() >= 1000 / 50, "{} commands", commands.len());
}
