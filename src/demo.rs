//! `product-sync demo`: the whole service on embedded parts — librdkafka's in-process mock
//! cluster as the broker, a SQLite file as the store, the simulator in-process as the
//! management system — running the same [`Application`] as `run`, with a story a person can
//! follow: two requests, a table of what they did, diff events in full, an upstream change, a
//! second request that shows only what changed; then upstream withdraws products, a snapshot
//! delists them (after the guard refused an empty answer), and one comes back relisted.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use sea_orm::DatabaseConnection;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::app::Application;
use crate::config::{self, Settings, Sources};
use crate::scheduler::Scheduler;
use crate::sim::{Catalogue, Sim, SimConfig};
use crate::store::fold::load_all;

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keep the SQLite file afterwards (it is deleted otherwise).
    pub keep: bool,
    /// Products in the simulated catalogue.
    pub products: usize,
    /// Leave the console up at this address once the story is told, until Ctrl-C.
    pub serve: Option<std::net::SocketAddr>,
}

const TOPICS: [&str; 4] = [
    "product-requests",
    "product-changes",
    "product-request-results",
    "product-requests.dlq",
];

/// `topics.relay_progress` by default (the demo keeps the defaults).
const PROGRESS_TOPIC: &str = "product-sync.relay-progress";

/// Runs the demo to the end.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let stage = Stage::set_up(&options).await?;
    let app = Application::build(stage.settings.clone())
        .await
        .context("starting the pipeline")?;
    let db = app.db().clone();
    let ops = app.ops_addr();
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone()));
    say("  pipeline:          started (registered with the governance platform)\n");

    let watcher = Watcher::start(&stage.bootstrap)?;
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", &stage.bootstrap);
    let publisher = crate::kafka::Publisher::create(config).context("demo producer")?;
    let producer: FutureProducer = publisher.current();
    let pension = act_one(&producer, &watcher, &db).await?;
    let (expected, updated) = act_two(&stage.sim, &producer, &watcher, &db, &pension).await?;
    let delisted = act_three(&stage.sim, &producer, &watcher, &db).await?;

    // Act 4: a schedule switched on (the scheduler `run` starts with an [upstream.schedule]).
    let mut scheduled = stage.settings.clone();
    scheduled.upstream.schedule.incremental_every = Some(SCHEDULE_EVERY);
    scheduled.upstream.schedule.watermark_overlap = Duration::from_secs(1);
    let scheduler = Scheduler::new(&scheduled, db.clone(), publisher, "demo".into());
    let stop_scheduler = CancellationToken::new();
    let scheduling = tokio::spawn(scheduler.run(stop_scheduler.clone()));
    let picked_up = act_four(&stage.sim, &watcher, &db).await?;
    stop_scheduler.cancel();
    scheduling.await.context("scheduler task")?;

    let stored = load_all(&db, "wms").await.context("reading the store")?;
    if let Some(token) = &stage.admin_token {
        say(&format!(
            "\nThe console is up: http://{}/  (admin token for its actions: {token})\nPress Ctrl-C to stop.",
            ops
        ));
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
    }
    stop.cancel();
    running
        .await
        .context("pipeline task")?
        .context("pipeline")?;
    // Every client goes before the mock cluster does.
    watcher.task.abort();
    drop(watcher);
    drop(producer);
    say(&format!("\nThe store now holds {} products.", stored.len()));
    if updated != expected {
        bail!("expected {expected} updated events, saw {updated}");
    }
    if delisted != 3 {
        bail!("expected 3 delisted events, saw {delisted}");
    }
    if picked_up != SCHEDULE_CHANGES {
        bail!("expected the schedule to pick up {SCHEDULE_CHANGES} changes, saw {picked_up}");
    }
    stage.finish(options.keep);
    Ok(())
}

/// The embedded parts: a temporary SQLite store, the simulator, the mock broker, and the
/// settings that point `run`'s configuration at them.
struct Stage {
    dir: tempfile::TempDir,
    sim: Sim,
    stop_sim: CancellationToken,
    cluster: MockCluster<'static, DefaultProducerContext>,
    bootstrap: String,
    settings: Settings,
    /// With `--serve`: the console's admin token, made up for this demo.
    admin_token: Option<String>,
}

impl Stage {
    async fn set_up(options: &DemoOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("product-sync-demo-")
            .tempdir()
            .context("creating a temporary directory")?;
        let db_path: PathBuf = dir.path().join("demo.sqlite");
        say("product-sync demo: the real pipeline on embedded parts");
        say("  broker:            librdkafka's in-process mock cluster");
        say(&format!(
            "  store:             SQLite at {}",
            db_path.display()
        ));
        // The management system (and governance platform), in-process.
        let sim = Sim::new(
            SimConfig::default(),
            Catalogue::generate(options.products, 2026),
        );
        let stop_sim = CancellationToken::new();
        let sim_addr = sim
            .clone()
            .spawn("127.0.0.1:0".parse()?, stop_sim.clone())
            .await?;
        say(&format!(
            "  management system: simulator at http://{sim_addr} ({} products)",
            options.products
        ));
        let cluster = MockCluster::new(1).context("starting the mock Kafka cluster")?;
        for topic in TOPICS {
            cluster
                .create_topic(topic, 3, 1)
                .context("creating a mock topic")?;
        }
        // The transactional relay's progress records: one partition per relay shard.
        cluster
            .create_topic(PROGRESS_TOPIC, 16, 1)
            .context("creating a mock topic")?;
        let bootstrap = cluster.bootstrap_servers();
        let mut vars = overrides(&bootstrap, &db_path, &format!("http://{sim_addr}"));
        let admin_token = options
            .serve
            .map(|_| format!("demo-{}", uuid::Uuid::new_v4().simple()));
        if let (Some(addr), Some(token)) = (options.serve, &admin_token) {
            vars.insert("PRODUCT_SYNC__HTTP__LISTEN".into(), addr.to_string());
            vars.insert("PRODUCT_SYNC__HTTP__ADMIN_TOKEN".into(), token.clone());
        }
        // A directory without files: the built-in defaults, then these overrides.
        let settings = config::load(&Sources {
            dir: Some(dir.path().join("no-config-files")),
            env_name: None,
            file: None,
            vars: Some(vars),
        })
        .context("demo configuration")?;
        Ok(Stage {
            dir,
            sim,
            stop_sim,
            cluster,
            bootstrap,
            settings,
            admin_token,
        })
    }

    /// Stops the simulator and the broker; keeps the store if asked.
    fn finish(self, keep: bool) {
        self.stop_sim.cancel();
        drop(self.cluster);
        if keep {
            let kept = self.dir.keep().join("demo.sqlite");
            say(&format!(
                "The SQLite store is kept at {} — try: sqlite3 {} 'select product_code, nav, revision from products limit 5'",
                kept.display(),
                kept.display()
            ));
        } else {
            say("The SQLite store was temporary (run with --keep to keep it).");
        }
    }
}

/// The same configuration loader as `run`, pointed at the embedded parts.
fn overrides(bootstrap: &str, db_path: &Path, sim_url: &str) -> HashMap<String, String> {
    [
        (
            "PRODUCT_SYNC__KAFKA__BOOTSTRAP_SERVERS",
            bootstrap.to_owned(),
        ),
        (
            "PRODUCT_SYNC__KAFKA__GROUP_ID",
            "product-sync-demo".to_owned(),
        ),
        ("PRODUCT_SYNC__TOPICS__CREATE", "false".to_owned()),
        (
            "PRODUCT_SYNC__DATABASE__URL",
            format!("sqlite://{}?mode=rwc", db_path.display()),
        ),
        ("PRODUCT_SYNC__UPSTREAM__BASE_URL", sim_url.to_owned()),
        (
            "PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET",
            "local-dev-secret".to_owned(),
        ),
        ("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "50".to_owned()),
        ("PRODUCT_SYNC__GOVERNANCE__ENABLED", "true".to_owned()),
        ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", sim_url.to_owned()),
        ("PRODUCT_SYNC__PIPELINE__RELAY_INTERVAL_MS", "50".to_owned()),
        ("PRODUCT_SYNC__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        (
            "PRODUCT_SYNC__LOG__LEVEL",
            "error,librdkafka=off,rdkafka=off".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Act 1: two requests, their results, and two of the `created` events. Returns the first
/// request's selector (asked again in act 2).
async fn act_one(
    producer: &FutureProducer,
    watcher: &Watcher,
    db: &DatabaseConnection,
) -> anyhow::Result<Value> {
    say("1) Two product requests arrive on `product-requests`:");
    let first = [
        (
            "demo-pension",
            json!({"keyword": "养老"}),
            "products sharing the keyword 养老 (pension)",
        ),
        (
            "demo-codes",
            json!({"product_codes": ["WM0000001", "WM0000002", "WM0000003", "WM0000005", "WM0000008"]}),
            "five products by code",
        ),
    ];
    for (id, selector, what) in &first {
        send(producer, id, selector).await?;
        say(&format!("   → {id:<20} {what}"));
    }
    watcher.wait_results(db, &[first[0].0, first[1].0]).await?;
    print_results(watcher, &[first[0].0, first[1].0]);
    let created = watcher.changes_of("created");
    say(&format!(
        "   {} `created` events on `product-changes`. Two of them in full:",
        created.len()
    ));
    for e in created.iter().take(2) {
        print_event(e);
    }
    Ok(first[0].1.clone())
}

/// Act 2: the management system changes some products; the pension keyword is asked again
/// and only the changed products make `updated` events. Returns (expected, seen) updates.
async fn act_two(
    sim: &Sim,
    producer: &FutureProducer,
    watcher: &Watcher,
    db: &DatabaseConnection,
    pension: &Value,
) -> anyhow::Result<(usize, usize)> {
    let changed = sim.mutate(40, 11);
    let expected = changed
        .iter()
        .filter(|p| {
            p.content.keywords.iter().any(|k| k == "养老")
                || p.content.product_name.contains("养老")
        })
        .count();
    say(&format!(
        "\n2) Upstream, {} products change (NAV and expected yield); {expected} of them carry the keyword 养老.",
        changed.len(),
    ));
    let second = "demo-pension-again";
    send(producer, second, pension).await?;
    say(&format!("   → {second:<20} the same keyword again"));
    watcher.wait_results(db, &[second]).await?;
    print_results(watcher, &[second]);
    let updated = watcher.changes_of("updated");
    say(&format!(
        "   {} `updated` events — exactly the changed products; the {} unchanged ones emitted nothing.",
        updated.len(),
        watcher
            .result(second)
            .map(|r| r["counts"]["unchanged"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    ));
    for e in updated.iter().take(2) {
        print_event(e);
    }
    Ok((expected, updated.len()))
}

/// Act 3: upstream withdraws three products; a snapshot of the whole catalogue delists them
/// (after the guard refused a snapshot of a briefly empty answer); one comes back, relisted.
async fn act_three(
    sim: &Sim,
    producer: &FutureProducer,
    watcher: &Watcher,
    db: &DatabaseConnection,
) -> anyhow::Result<usize> {
    let all = json!({"all": true});
    send(producer, "demo-all", &all).await?;
    watcher.wait_results(db, &["demo-all"]).await?;
    say(
        "\n3) The whole catalogue is synced (`{\"all\": true}`). Upstream now answers nothing for a moment…",
    );
    let catalogue = sim.catalogue();
    let everything: Vec<String> = catalogue
        .products()
        .iter()
        .map(|p| p.identity().key())
        .collect();
    let withdrawn_all = sim.withdraw(&everything);
    let snapshot = |id: &str| json!({"request_id": id, "selector": {"all": true}, "mode": "snapshot", "requested_by": "demo"});
    send_command(
        producer,
        "demo-snapshot-empty",
        &snapshot("demo-snapshot-empty"),
    )
    .await?;
    watcher.wait_results(db, &["demo-snapshot-empty"]).await?;
    if let Some(r) = watcher.result("demo-snapshot-empty") {
        say(&format!(
            "   → a snapshot of that empty answer: {} ({}): {}",
            r["status"].as_str().unwrap_or("?"),
            r["error_kind"].as_str().unwrap_or("-"),
            r["error"].as_str().unwrap_or("")
        ));
    }
    sim.upsert(withdrawn_all);
    let gone = sim.withdraw(&everything[..3]);
    say("   Upstream is back, without three products. A snapshot of the whole catalogue:");
    send_command(producer, "demo-snapshot", &snapshot("demo-snapshot")).await?;
    watcher.wait_results(db, &["demo-snapshot"]).await?;
    let delisted = watcher.changes_of("delisted");
    say(&format!(
        "   {} `delisted` events (the rows stay, with `delisted_at`):",
        delisted.len()
    ));
    for e in delisted.iter().take(1) {
        print_event(e);
    }
    sim.upsert(gone.into_iter().take(1).collect());
    say("   One of them comes back upstream; the next request that returns it relists it:");
    send(producer, "demo-all-again", &all).await?;
    watcher.wait_results(db, &["demo-all-again"]).await?;
    for e in watcher.changes_of("relisted").iter().take(1) {
        print_event(e);
    }
    Ok(delisted.len())
}

/// Act 4's schedule: an incremental sync this often.
const SCHEDULE_EVERY: Duration = Duration::from_secs(2);
/// Products act 4 changes upstream.
const SCHEDULE_CHANGES: usize = 5;

/// Act 4: with a schedule on, a change made upstream arrives by itself: the scheduler
/// publishes an incremental every two seconds from the stored watermark. Returns how many of
/// the changed products a scheduled command updated.
async fn act_four(sim: &Sim, watcher: &Watcher, db: &DatabaseConnection) -> anyhow::Result<usize> {
    say(&format!(
        "\n4) A schedule is switched on: an incremental sync every {} s \
         ([upstream.schedule] incremental_every_ms). Nobody sends a command any more.",
        SCHEDULE_EVERY.as_secs()
    ));
    let first = wait_until(Duration::from_secs(60), || async {
        let r = watcher.results_where(|id| id.starts_with("sched:wms:incremental:"));
        r.into_iter().find(|r| r["status"] == "completed")
    })
    .await
    .context("the first scheduled incremental")?;
    let watermark = crate::store::schedules::watermark(db, "wms").await?;
    say(&format!(
        "   → {} completed (no watermark yet, so {{\"all\": true}}); the watermark is now {}",
        first["request_id"].as_str().unwrap_or("?"),
        watermark.map_or_else(|| "-".to_owned(), |w| w.to_rfc3339())
    ));
    let changed = sim.mutate(SCHEDULE_CHANGES, 23);
    let codes: Vec<String> = changed
        .iter()
        .filter_map(|p| p.content.product_code.clone())
        .collect();
    say(&format!(
        "   Upstream, {} products change: {}. Waiting for the schedule…",
        changed.len(),
        codes.join(", ")
    ));
    let by_schedule = |e: &Value| {
        e["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("sched:wms:incremental:"))
            && codes.iter().any(|c| e["product_code"] == json!(c))
    };
    let updated = wait_until(Duration::from_secs(60), || async {
        let seen: Vec<Value> = watcher
            .changes_of("updated")
            .into_iter()
            .filter(by_schedule)
            .collect();
        (seen.len() >= codes.len()).then_some(seen)
    })
    .await
    .context("the scheduled incremental picking the changes up")?;
    say(&format!(
        "   {} `updated` events, each caused by a scheduled command asking updated_since = watermark − overlap:",
        updated.len()
    ));
    if let Some(e) = updated.first() {
        print_event(e);
    }
    say(
        "   `product-sync schedule` shows the schedules, their next slots, the watermark and the scheduler's holder.",
    );
    Ok(updated.len())
}

/// Polls `check` every 250 ms until it answers, or fails after `deadline`.
async fn wait_until<T, F, Fut>(deadline: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > until {
            bail!("nothing came within {} s", deadline.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn send(producer: &FutureProducer, id: &str, selector: &Value) -> anyhow::Result<()> {
    let body = json!({"request_id": id, "selector": selector, "requested_by": "demo"});
    send_command(producer, id, &body).await
}

async fn send_command(producer: &FutureProducer, id: &str, body: &Value) -> anyhow::Result<()> {
    let body = body.to_string();
    producer
        .send(
            FutureRecord::to(TOPICS[0]).key(id).payload(&body),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .context("publishing a command")?;
    Ok(())
}

/// Whether the watcher has seen as many change events as the history holds rows.
async fn all_changes_seen(db: &DatabaseConnection, seen: usize) -> bool {
    use crate::store::entity::product_changes;
    use sea_orm::{EntityTrait, PaginatorTrait};
    product_changes::Entity::find()
        .count(db)
        .await
        .is_ok_and(|n| n as usize <= seen)
}

/// Follows the change and result topics in the background.
struct Watcher {
    changes: Arc<Mutex<Vec<Value>>>,
    results: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    fn start(bootstrap: &str) -> anyhow::Result<Self> {
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "product-sync-demo-watcher")
            .set("auto.offset.reset", "earliest")
            .create()
            .context("demo watcher")?;
        consumer
            .subscribe(&[TOPICS[1], TOPICS[2]])
            .context("demo watcher subscribe")?;
        let changes = Arc::new(Mutex::new(Vec::new()));
        let results = Arc::new(Mutex::new(Vec::new()));
        let (c, r) = (changes.clone(), results.clone());
        let task = tokio::spawn(async move {
            while let Ok(m) = consumer.recv().await {
                let value: Value =
                    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null);
                let target = if m.topic() == TOPICS[1] { &c } else { &r };
                target.lock().unwrap_or_else(|e| e.into_inner()).push(value);
            }
        });
        Ok(Self {
            changes,
            results,
            task,
        })
    }

    fn result(&self, id: &str) -> Option<Value> {
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|r| r["request_id"] == json!(id))
            .cloned()
    }

    fn results_where(&self, id: impl Fn(&str) -> bool) -> Vec<Value> {
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|r| r["request_id"].as_str().is_some_and(&id))
            .cloned()
            .collect()
    }

    fn changes_of(&self, op: &str) -> Vec<Value> {
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|e| e["op"] == json!(op))
            .cloned()
            .collect()
    }

    /// Shows live counts until every id has a result (at most two minutes).
    async fn wait_results(
        &self,
        db: &sea_orm::DatabaseConnection,
        ids: &[&str],
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut last = String::new();
        loop {
            let done = ids.iter().filter(|id| self.result(id).is_some()).count();
            let stored = load_all(db, "wms").await.map(|v| v.len()).unwrap_or(0);
            let events = self.changes.lock().unwrap_or_else(|e| e.into_inner()).len();
            let line = format!(
                "   … products in store: {stored:>4} | change events published: {events:>4} | results: {done}/{}",
                ids.len()
            );
            if line != last {
                say(&line);
                last = line;
            }
            // Done when every result is in and every change row has been published and seen
            // here (results and changes travel in different shards).
            if done == ids.len() && all_changes_seen(db, events).await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the demo's requests did not finish within two minutes");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn print_results(watcher: &Watcher, ids: &[&str]) {
    say("");
    say(&format!(
        "   {:<24} {:<10} {:>7} {:>7} {:>7} {:>9} {:>5} {:>5}",
        "request", "status", "fetched", "created", "updated", "unchanged", "stale", "pages"
    ));
    for id in ids {
        if let Some(r) = watcher.result(id) {
            let c = &r["counts"];
            say(&format!(
                "   {:<24} {:<10} {:>7} {:>7} {:>7} {:>9} {:>5} {:>5}",
                id,
                r["status"].as_str().unwrap_or("?"),
                c["fetched"].as_i64().unwrap_or(0),
                c["created"].as_i64().unwrap_or(0),
                c["updated"].as_i64().unwrap_or(0),
                c["unchanged"].as_i64().unwrap_or(0),
                c["stale"].as_i64().unwrap_or(0),
                r["pages"].as_i64().unwrap_or(0)
            ));
        }
    }
    say("");
}

fn print_event(e: &Value) {
    let mut shown = e.clone();
    if let Some(obj) = shown.as_object_mut() {
        // A created product lists every field; show the first few.
        if let Some(Value::Array(changes)) = obj.get_mut("changes")
            && changes.len() > 4
        {
            let more = changes.len() - 4;
            changes.truncate(4);
            changes.push(json!(format!("… {more} more fields")));
        }
        // `before`/`after` are whole products; the changes say what moved.
        for k in ["before", "after"] {
            if let Some(v) = obj.get(k).filter(|v| !v.is_null()) {
                let name = v["product_name"].clone();
                obj.insert(
                    k.to_owned(),
                    json!({"product_name": name, "…": "(full product)"}),
                );
            }
        }
    }
    let text = serde_json::to_string_pretty(&shown).unwrap_or_default();
    for line in text.lines() {
        say(&format!("     {line}"));
    }
}
