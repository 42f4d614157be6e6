//! End to end against the real broker, the real PostgreSQL and the simulator: commands in,
//! store and change/result/DLQ topics out — in-process instances and real child processes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use product_sync::app::Application;
use product_sync::command::Selector;
use product_sync::config::{self, Settings, Sources};
use product_sync::kafka::{TopicSpec, client_config, ensure_topics};
use product_sync::product::{Identity, Product};
use product_sync::sim::{Faults, SimConfig};
use product_sync::store::fold::load_all;
use product_sync::wire::{dlq as dlqh, headers as h};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sea_orm::DatabaseConnection;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{connect, fresh_pg_database, require_kafka, unique, wait_for};
use crate::upstream::{TestSim, start_sim};

/// One test's world: its own topics, group, database and simulator.
pub struct World {
    pub sim: TestSim,
    pub vars: HashMap<String, String>,
    pub settings: Settings,
    pub db: DatabaseConnection,
    pub producer: FutureProducer,
}

pub async fn world(products: usize, partitions: i32) -> World {
    let kafka = require_kafka().await;
    let db_settings = fresh_pg_database().await;
    let sim = start_sim(products, SimConfig::default()).await;
    let prefix = unique("e2e");
    let topics = ["requests", "changes", "results", "dlq", "state", "retry"]
        .map(|t| format!("{prefix}.{t}"));
    let specs: Vec<TopicSpec> = topics
        .iter()
        .map(|name| TopicSpec {
            name: name.clone(),
            partitions: if name.ends_with(".requests") || name.ends_with(".retry") {
                partitions
            } else {
                3
            },
            replication_factor: 1,
            compacted: name.ends_with(".state"),
        })
        .collect();
    ensure_topics(&kafka, &specs).await.expect("create topics");
    let vars: HashMap<String, String> = [
        ("PRODUCT_SYNC_ENV", "local".to_owned()),
        (
            "PRODUCT_SYNC__KAFKA__BOOTSTRAP_SERVERS",
            kafka.bootstrap_servers.clone(),
        ),
        ("PRODUCT_SYNC__KAFKA__GROUP_ID", format!("{prefix}-group")),
        (
            "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SESSION_TIMEOUT_MS",
            "6000".to_owned(),
        ),
        (
            "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__HEARTBEAT_INTERVAL_MS",
            "500".to_owned(),
        ),
        ("PRODUCT_SYNC__TOPICS__REQUESTS", topics[0].clone()),
        ("PRODUCT_SYNC__TOPICS__CHANGES", topics[1].clone()),
        ("PRODUCT_SYNC__TOPICS__RESULTS", topics[2].clone()),
        ("PRODUCT_SYNC__TOPICS__DLQ", topics[3].clone()),
        ("PRODUCT_SYNC__TOPICS__STATE", topics[4].clone()),
        // Its own progress topic: a shard's progress partition is written by no one else.
        (
            "PRODUCT_SYNC__TOPICS__RELAY_PROGRESS",
            format!("{prefix}.relay-progress"),
        ),
        // Off unless a test turns it on (`World::with_retry_topic`): most tests are about
        // what a transient failure does without it (the DLQ).
        ("PRODUCT_SYNC__TOPICS__RETRY", String::new()),
        // Off unless a test turns it on (tests/integration/notifications.rs).
        ("PRODUCT_SYNC__TOPICS__NOTIFICATIONS", String::new()),
        ("PRODUCT_SYNC__TOPICS__PARTITIONS", partitions.to_string()),
        (
            "PRODUCT_SYNC__DATABASE__URL",
            db_settings.url.expose_secret().to_owned(),
        ),
        ("PRODUCT_SYNC__UPSTREAM__BASE_URL", sim.base_url.clone()),
        (
            "PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET",
            "local-dev-secret".to_owned(),
        ),
        ("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "200".to_owned()),
        (
            "PRODUCT_SYNC__UPSTREAM__RETRY_MAX_ELAPSED_MS",
            "3000".to_owned(),
        ),
        ("PRODUCT_SYNC__GOVERNANCE__ENABLED", "true".to_owned()),
        ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", sim.base_url.clone()),
        ("PRODUCT_SYNC__PIPELINE__RELAY_INTERVAL_MS", "50".to_owned()),
        (
            "PRODUCT_SYNC__PIPELINE__DRAIN_TIMEOUT_MS",
            "3000".to_owned(),
        ),
        ("PRODUCT_SYNC__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        (
            "PRODUCT_SYNC__LOG__LEVEL",
            "info,product_sync=debug".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let settings = config::load(&Sources {
        dir: Some(manifest_dir().join("config")),
        env_name: None,
        file: None,
        vars: Some(vars.clone()),
    })
    .expect("test configuration loads through the real loader");
    let producer: FutureProducer = client_config(&kafka).create().expect("producer");
    let db = connect(&db_settings).await;
    // Migrated up front: the test reads the store while child processes are still starting
    // (their own migration is then a no-op; concurrent migration has its own test).
    product_sync::store::migrate(&db)
        .await
        .expect("migrate the test database");
    World {
        sim,
        vars,
        settings,
        db,
        producer,
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An instance running inside the test process.
pub struct InProcess {
    pub ops: std::net::SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), product_sync::app::AppError>>,
    /// A test that fails first still stops the instance (else its consumer's blocking driver
    /// keeps the test's runtime from shutting down: a hang instead of a failure).
    _stop_on_drop: tokio_util::sync::DropGuard,
}

impl InProcess {
    pub async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("instance task")
            .expect("clean shutdown");
    }
}

impl World {
    pub async fn start(&self) -> InProcess {
        self.start_with(self.settings.clone()).await
    }

    pub async fn start_with(&self, settings: Settings) -> InProcess {
        let app = Application::build(settings).await.expect("instance starts");
        let ops = app.ops_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(stop.clone()));
        InProcess {
            ops,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            task,
        }
    }

    /// The log of a child process started with [`World::spawn_process`].
    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    fn log_path(&self, name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{}-{name}.log", self.settings.kafka.group_id))
    }

    /// A `product-sync run` child process with this world's configuration; killed when the
    /// guard drops (so a failing test leaves no process behind).
    pub fn spawn_process(&self, name: &str, extra: &[(&str, &str)]) -> ChildGuard {
        let log = std::fs::File::create(self.log_path(name)).expect("log file");
        std::process::Command::new(env!("CARGO_BIN_EXE_product-sync"))
            .arg("run")
            .current_dir(manifest_dir())
            .env_remove("RUST_LOG")
            .envs(&self.vars)
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(ChildGuard)
            .expect("spawn product-sync run")
    }

    pub async fn send(&self, key: &str, body: &[u8], headers: &[(&str, &str)]) {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        self.producer
            .send(
                FutureRecord::to(&self.settings.topics.requests)
                    .key(key)
                    .payload(body)
                    .headers(h),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("command produced");
    }

    /// Sends `body` to one partition of the request topic.
    pub async fn send_to(&self, partition: i32, key: &str, body: &Value) {
        self.producer
            .send(
                FutureRecord::to(&self.settings.topics.requests)
                    .partition(partition)
                    .key(key)
                    .payload(&body.to_string()),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("command produced");
    }

    pub async fn command(&self, request_id: &str, selector: Value) {
        let body = json!({"request_id": request_id, "selector": selector}).to_string();
        self.send(request_id, body.as_bytes(), &[]).await;
    }

    /// Every committed record of a topic from the start (read_committed, as downstream
    /// consumers are told to read).
    pub async fn read_all(&self, topic: &str) -> Vec<OwnedMessage> {
        self.read_all_isolated(topic, "read_committed").await
    }

    /// Every record of a topic from the start, read with the given `isolation.level`.
    pub async fn read_all_isolated(&self, topic: &str, isolation: &str) -> Vec<OwnedMessage> {
        let kafka = self.settings.kafka.clone();
        let (topic, isolation) = (topic.to_owned(), isolation.to_owned());
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer =
                product_sync::kafka::reader_config(&kafka, &unique("reader"))
                    .set("isolation.level", &isolation)
                    .create()
                    .unwrap();
            product_sync::dlq::read_until_end(&kafka, &consumer, &topic, false)
                .unwrap_or_else(|e| panic!("reading {topic} failed: {e}"))
        })
        .await
        .unwrap()
    }

    /// The consumer group's committed offset of a request-topic partition.
    pub async fn committed(&self, partition: i32) -> Option<i64> {
        let kafka = self.settings.kafka.clone();
        let topic = self.settings.topics.requests.clone();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = client_config(&kafka)
                .set("group.id", &kafka.group_id)
                .create()
                .unwrap();
            let mut list = TopicPartitionList::new();
            list.add_partition(&topic, partition);
            // A fresh broker's group coordinator may not be ready yet: ask again.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let committed = loop {
                match consumer.committed_offsets(list.clone(), Duration::from_secs(10)) {
                    Ok(c) => break c,
                    Err(e) if std::time::Instant::now() < deadline => {
                        eprintln!("reading committed offsets: {e}; asking again");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => panic!("reading committed offsets: {e}"),
                }
            };
            match committed
                .find_partition(&topic, partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            }
        })
        .await
        .unwrap()
    }

    pub async fn results(&self) -> Vec<Value> {
        self.read_all(&self.settings.topics.results.clone())
            .await
            .iter()
            .map(json_of)
            .collect()
    }

    /// Waits until the result topic holds a result for each of `ids` (any status).
    pub async fn wait_results(&self, ids: &[&str], deadline: Duration) -> Vec<Value> {
        wait_for(&format!("results of {ids:?}"), deadline, || async {
            let results = self.results().await;
            ids.iter()
                .all(|id| results.iter().any(|r| r["request_id"] == json!(id)))
                .then_some(results)
        })
        .await
    }

    /// Waits until every change row is published.
    pub async fn wait_outbox_empty(&self, deadline: Duration) {
        use product_sync::store::entity::outbox_pending;
        use sea_orm::{EntityTrait, PaginatorTrait};
        wait_for("an empty outbox", deadline, || async {
            let n = outbox_pending::Entity::find().count(&self.db).await.ok()?;
            (n == 0).then_some(())
        })
        .await
    }

    pub async fn stored(&self) -> BTreeMap<Identity, (Product, i64)> {
        load_all(&self.db, "wms")
            .await
            .unwrap_or_else(|e| panic!("reading the store: {e}"))
            .into_iter()
            .map(|(i, p, r)| (i, (p, r)))
            .collect()
    }

    pub fn truth(&self, selector: &Selector) -> BTreeMap<Identity, Product> {
        self.sim
            .sim
            .catalogue()
            .select(selector)
            .map(|p| (p.identity(), p.clone()))
            .collect()
    }
}

pub fn json_of(m: &OwnedMessage) -> Value {
    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null)
}

pub fn header_of(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn selector(v: Value) -> Selector {
    serde_json::from_value(v).unwrap()
}

/// The stored products without their revisions, to compare with the simulator's truth.
pub fn products_of(stored: &BTreeMap<Identity, (Product, i64)>) -> BTreeMap<Identity, Product> {
    stored
        .iter()
        .map(|(i, (p, _))| (i.clone(), p.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyword_command_syncs_the_matching_products_and_emits_their_events() {
    let w = world(600, 3).await;
    let instance = w.start().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = json!({"request_id": "req-keyword", "selector": {"keyword": "养老"}, "requested_by": "tests"}).to_string();
    w.send(
        "req-keyword",
        body.as_bytes(),
        &[(h::TRACEPARENT, traceparent)],
    )
    .await;

    let results = w
        .wait_results(&["req-keyword"], Duration::from_secs(60))
        .await;
    w.wait_outbox_empty(Duration::from_secs(30)).await;
    let truth = w.truth(&selector(json!({"keyword": "养老"})));
    assert!(truth.len() > 20);

    // The store equals the simulator's matching products, every field.
    let stored = w.stored().await;
    let stored_products = products_of(&stored);
    assert_eq!(stored_products, truth);

    // One `created` event per product, CloudEvents headers, the command's traceparent.
    let events = w.read_all(&w.settings.topics.changes).await;
    assert_eq!(events.len(), truth.len());
    for m in &events {
        let e = json_of(m);
        assert_eq!(e["op"], "created");
        assert_eq!(e["revision"], 1);
        assert_eq!(e["request_id"], "req-keyword");
        let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
        let code = e["product_code"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("name:{}", e["after"]["product_name"].as_str().unwrap()));
        assert_eq!(key, format!("wms/{code}"));
        assert_eq!(header_of(m, h::CE_ID).unwrap(), format!("wms:{code}:1"));
        assert_eq!(header_of(m, h::CE_SPECVERSION).as_deref(), Some("1.0"));
        assert_eq!(
            header_of(m, h::CE_TYPE).as_deref(),
            Some("com.product-sync.product.created")
        );
        assert_eq!(header_of(m, h::CE_SUBJECT).unwrap(), code);
        assert!(header_of(m, h::CE_SOURCE).is_some() && header_of(m, h::CE_TIME).is_some());
        assert_eq!(header_of(m, h::TRACEPARENT).as_deref(), Some(traceparent));
        let identity = Product::from_json(&e["after"]).unwrap().identity();
        assert_eq!(Product::from_json(&e["after"]).unwrap(), truth[&identity]);
    }

    // One completed result with the right counts.
    let mine: Vec<&Value> = results
        .iter()
        .filter(|r| r["request_id"] == "req-keyword")
        .collect();
    assert_eq!(mine.len(), 1);
    let r = mine[0];
    assert_eq!(r["status"], "completed");
    assert_eq!(r["counts"]["fetched"], truth.len());
    assert_eq!(r["counts"]["created"], truth.len());
    assert_eq!(r["counts"]["updated"], 0);
    assert!(r["pages"].as_i64().unwrap() >= 1);

    // Registered with the governance platform while running.
    assert_eq!(w.sim.sim.registrations().len(), 1);
    instance.stop().await;
    assert!(
        w.sim.sim.registrations().is_empty(),
        "deregistered at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_changes_become_update_events_listing_exactly_the_changed_fields() {
    let w = world(300, 3).await;
    let instance = w.start().await;
    w.command("first", json!({"category": "equity"})).await;
    w.wait_results(&["first"], Duration::from_secs(60)).await;
    w.wait_outbox_empty(Duration::from_secs(30)).await;
    let before = w.stored().await;
    let created = w.read_all(&w.settings.topics.changes).await.len();

    // Change some products upstream; only those in the category matter.
    let changed = w.sim.sim.mutate(60, 7);
    let in_category: Vec<&Product> = changed
        .iter()
        .filter(|p| p.content.category.as_deref() == Some("equity"))
        .collect();
    assert!(!in_category.is_empty());
    w.command("second", json!({"category": "equity"})).await;
    let results = w.wait_results(&["second"], Duration::from_secs(60)).await;
    w.wait_outbox_empty(Duration::from_secs(30)).await;

    let events = w.read_all(&w.settings.topics.changes).await;
    let updates: Vec<Value> = events
        .iter()
        .map(json_of)
        .filter(|e| e["op"] == "updated")
        .collect();
    assert_eq!(
        events.len(),
        created + in_category.len(),
        "unchanged products emitted nothing"
    );
    assert_eq!(updates.len(), in_category.len());
    for u in &updates {
        let after = Product::from_json(&u["after"]).unwrap();
        let (old, old_revision) = &before[&after.identity()];
        assert_eq!(u["revision"], old_revision + 1);
        let fields: Vec<&str> = u["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, ["nav", "expected_yield"]);
        for c in u["changes"].as_array().unwrap() {
            let field = c["field"].as_str().unwrap();
            assert_eq!(c["old"], old.to_json()[field]);
            assert_eq!(c["new"], after.to_json()[field]);
        }
    }
    let second = results
        .iter()
        .find(|r| r["request_id"] == "second")
        .unwrap();
    assert_eq!(second["counts"]["updated"], in_category.len());
    assert_eq!(second["counts"]["created"], 0);
    assert_eq!(
        second["counts"]["unchanged"].as_u64().unwrap()
            + second["counts"]["updated"].as_u64().unwrap(),
        second["counts"]["fetched"].as_u64().unwrap()
    );
    instance.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_command_twice_and_a_new_id_over_unchanged_data_change_nothing() {
    let w = world(200, 1).await;
    let instance = w.start().await;
    w.command("once", json!({"keyword": "稳健"})).await;
    w.wait_results(&["once"], Duration::from_secs(60)).await;
    w.wait_outbox_empty(Duration::from_secs(30)).await;
    let store_before = w.stored().await;
    let events_before = w.read_all(&w.settings.topics.changes).await.len();
    let product_requests = w
        .sim
        .sim
        .stats()
        .product_requests
        .load(std::sync::atomic::Ordering::SeqCst);

    // Same request id again: not fetched again, its result emitted again.
    w.command("once", json!({"keyword": "稳健"})).await;
    wait_for("the repeated result", Duration::from_secs(60), || async {
        (w.results()
            .await
            .iter()
            .filter(|r| r["request_id"] == "once")
            .count()
            == 2)
            .then_some(())
    })
    .await;
    assert_eq!(
        w.sim
            .sim
            .stats()
            .product_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        product_requests,
        "a completed request is not fetched again"
    );
    // A new id over unchanged data: fetched, nothing changes.
    w.command("again", json!({"keyword": "稳健"})).await;
    let results = w.wait_results(&["again"], Duration::from_secs(60)).await;
    w.wait_outbox_empty(Duration::from_secs(30)).await;
    let again = results.iter().find(|r| r["request_id"] == "again").unwrap();
    assert_eq!(again["counts"]["created"], 0);
    assert_eq!(again["counts"]["updated"], 0);
    assert_eq!(again["counts"]["unchanged"], again["counts"]["fetched"]);
    assert_eq!(w.stored().await, store_before);
    assert_eq!(
        w.read_all(&w.settings.topics.changes).await.len(),
        events_before
    );
    instance.stop().await;
    // Three commands on the one partition, all done: the group's committed offset is exactly 3
    // — not fewer (redelivery) and not more (a command skipped).
    assert_eq!(w.committed(0).await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_commands_go_to_the_dlq_and_never_block_their_partition() {
    let w = world(100, 1).await;
    let instance = w.start().await;
    let long_keyword = format!(
        r#"{{"request_id":"bad-long","selector":{{"keyword":"{}"}}}}"#,
        "长".repeat(300)
    );
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("bad-json", b"{not json".to_vec()),
        ("bad-utf8", b"\xff\xfe\xfd".to_vec()),
        ("bad-empty", Vec::new()),
        ("bad-missing", br#"{"selector":{"keyword":"x"}}"#.to_vec()),
        (
            "bad-unknown-field",
            br#"{"request_id":"bad-unknown-field","selector":{"keyword":"x"},"oops":1}"#.to_vec(),
        ),
        (
            "bad-type",
            br#"{"request_id":"bad-type","selector":{"product_codes":"WM1"}}"#.to_vec(),
        ),
        (
            "bad-selector",
            br#"{"request_id":"bad-selector","selector":{}}"#.to_vec(),
        ),
        (
            "bad-system",
            br#"{"request_id":"bad-system","system":"elsewhere","selector":{"keyword":"x"}}"#
                .to_vec(),
        ),
        ("bad-long", long_keyword.into_bytes()),
        (
            "bad-since",
            br#"{"request_id":"bad-since","selector":{"updated_since":"last tuesday"}}"#.to_vec(),
        ),
    ];
    let mut good = Vec::new();
    for (i, (key, body)) in bad.iter().enumerate() {
        w.send(key, body, &[]).await;
        let id = format!("good-{i}");
        w.command(&id, json!({"product_codes": [format!("WM{:07}", i + 1)]}))
            .await;
        good.push(id);
    }
    let ids: Vec<&str> = good.iter().map(String::as_str).collect();
    let results = w.wait_results(&ids, Duration::from_secs(90)).await;
    wait_for("ten DLQ records", Duration::from_secs(30), || async {
        (w.read_all(&w.settings.topics.dlq).await.len() >= 10).then_some(())
    })
    .await;

    let dlq = w.read_all(&w.settings.topics.dlq).await;
    assert_eq!(dlq.len(), 10);
    // The DLQ is keyed by the original key (so spread over its partitions): match by key.
    let by_key: HashMap<Vec<u8>, &OwnedMessage> =
        dlq.iter().map(|m| (m.key().unwrap().to_vec(), m)).collect();
    let mut kinds = Vec::new();
    for (key, body) in &bad {
        let m = by_key
            .get(key.as_bytes())
            .unwrap_or_else(|| panic!("{key} missing from the DLQ"));
        assert_eq!(
            m.payload().unwrap_or_default(),
            body.as_slice(),
            "DLQ keeps the original bytes"
        );
        assert!(!header_of(m, dlqh::REASON).unwrap().is_empty());
        assert_eq!(
            header_of(m, dlqh::ERROR_CLASS).as_deref(),
            Some("permanent")
        );
        assert_eq!(
            header_of(m, dlqh::ORIGINAL_TOPIC).as_deref(),
            Some(w.settings.topics.requests.as_str())
        );
        assert_eq!(header_of(m, dlqh::ORIGINAL_PARTITION).as_deref(), Some("0"));
        assert!(
            header_of(m, dlqh::ORIGINAL_OFFSET)
                .unwrap()
                .parse::<i64>()
                .is_ok()
        );
        kinds.push(header_of(m, dlqh::ERROR_KIND).unwrap());
    }
    assert_eq!(
        kinds,
        [
            "bad_json",
            "not_utf8",
            "empty",
            "missing_field",
            "unknown_field",
            "wrong_type",
            "empty_selector",
            "unknown_system",
            "invalid_field",
            "wrong_type"
        ]
    );
    let rejected: Vec<&Value> = results
        .iter()
        .filter(|r| r["status"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 10);
    assert!(
        rejected
            .iter()
            .all(|r| !r["error"].as_str().unwrap().is_empty())
    );
    assert!(
        rejected.iter().any(|r| r["request_id"] == "bad-system"),
        "a readable request id is kept"
    );
    // Every good command completed, in order on the partition (the result topic is keyed by
    // request id, so its order says nothing; the request rows' finish times do).
    let completed = results
        .iter()
        .filter(|r| r["status"] == "completed")
        .count();
    assert_eq!(completed, ids.len());
    use product_sync::store::entity::requests;
    use sea_orm::{EntityTrait, QueryOrder};
    let rows = requests::Entity::find()
        .order_by_asc(requests::Column::FinishedAt)
        .all(&w.db)
        .await
        .unwrap();
    let order: Vec<&str> = rows
        .iter()
        .filter(|r| r.status == "completed")
        .map(|r| r.request_id.as_str())
        .collect();
    assert_eq!(order, ids);
    instance.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_within_the_budget_heals_beyond_it_fails_to_the_dlq_and_replay_completes_it() {
    let w = world(300, 1).await;
    // The retry budget and the DLQ without the retry topic (off in this world) or the circuit
    // (which would keep refusing for `circuit_open_ms` after the outage: tests/…/systems.rs).
    let mut settings = w.settings.clone();
    settings.upstream.circuit_failures = 1000;
    let instance = w.start_with(settings).await;

    // Down for a moment: retried within upstream.retry_max_elapsed_ms (3 s here).
    w.sim.sim.set_faults(Faults {
        script: [
            product_sync::sim::Fault::Error500,
            product_sync::sim::Fault::Error500,
            product_sync::sim::Fault::Drop,
        ]
        .into(),
        ..Faults::default()
    });
    w.command("short-outage", json!({"keyword": "ESG"})).await;
    let results = w
        .wait_results(&["short-outage"], Duration::from_secs(60))
        .await;
    assert_eq!(
        results
            .iter()
            .find(|r| r["request_id"] == "short-outage")
            .unwrap()["status"],
        "completed"
    );

    // Down for longer than the budget: failed result, DLQ record with a transient class.
    w.sim.sim.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    w.command("long-outage", json!({"keyword": "绿色"})).await;
    let results = w
        .wait_results(&["long-outage"], Duration::from_secs(60))
        .await;
    let failed = results
        .iter()
        .find(|r| r["request_id"] == "long-outage")
        .unwrap();
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"].as_str().unwrap().contains("HTTP 503"),
        "{failed}"
    );
    let dlq = w.read_all(&w.settings.topics.dlq).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        header_of(&dlq[0], dlqh::ERROR_CLASS).as_deref(),
        Some("transient")
    );
    assert_eq!(
        header_of(&dlq[0], dlqh::ERROR_KIND).as_deref(),
        Some("upstream")
    );

    // Back up; replay puts it on the request topic again and it completes.
    w.sim.sim.set_faults(Faults::default());
    let replayed = product_sync::dlq::replay(&w.settings, None)
        .await
        .expect("replay");
    assert_eq!(replayed, 1);
    assert_eq!(
        product_sync::dlq::replay(&w.settings, None)
            .await
            .expect("replay again"),
        0,
        "replayed once"
    );
    wait_for(
        "the replayed command to complete",
        Duration::from_secs(60),
        || async {
            w.results()
                .await
                .iter()
                .any(|r| r["request_id"] == "long-outage" && r["status"] == "completed")
                .then_some(())
        },
    )
    .await;
    w.wait_outbox_empty(Duration::from_secs(30)).await;
    let truth = w.truth(&selector(json!({"keyword": "绿色"})));
    let stored = products_of(&w.stored().await);
    for (identity, product) in &truth {
        assert_eq!(
            stored.get(identity),
            Some(product),
            "{identity} after replay"
        );
    }
    instance.stop().await;
}

/// A child process that is killed if the test ends before it does.
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Guards a child spawned elsewhere.
    pub fn new(child: Child) -> Self {
        ChildGuard(child)
    }

    /// The child itself (its status, its pipes).
    pub fn child(&mut self) -> &mut Child {
        &mut self.0
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for a child to exit, failing the test after `deadline`.
pub async fn wait_exit(child: &mut ChildGuard, deadline: Duration) -> std::process::ExitStatus {
    wait_for("the process to exit", deadline, || {
        let status = child.0.try_wait().expect("try_wait");
        async move { status }
    })
    .await
}

pub fn signal(child: &ChildGuard, sig: &str) {
    let child = &child.0;
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{sig} failed");
}

/// Per product, in offset order ([`product_sync::audit`]): revisions 1..=n by one, each
/// following on the one before; a repeated revision is the same event; n is the stored
/// revision, and no other product has events. Returns the repeats.
pub fn assert_gapless(
    events: &[OwnedMessage],
    stored: &BTreeMap<Identity, (Product, i64)>,
) -> usize {
    let audit = product_sync::audit::Audit::of(events);
    assert!(
        audit.is_clean(),
        "change topic out of order: {:#?}",
        audit.problems
    );
    let stored = stored
        .iter()
        .map(|(identity, (_, revision))| (format!("wms/{}", identity.event_key()), *revision));
    assert_eq!(
        audit.gaps(stored),
        0,
        "the last revision of every product is the stored one"
    );
    audit.repeats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_in_one_group_with_overlapping_selectors_agree_with_the_truth() {
    let w = world(5000, 6).await;
    let mut a = w.spawn_process("a", &[]);
    let mut b = w.spawn_process("b", &[]);
    // Registration comes before the group join: wait for both to hold partitions.
    wait_for(
        "both instances to be assigned partitions",
        Duration::from_secs(60),
        || async {
            (w.log_of("a").contains("partitions assigned")
                && w.log_of("b").contains("partitions assigned"))
            .then_some(())
        },
    )
    .await;
    let selectors = [
        json!({"keyword": "稳健"}),
        json!({"keyword": "养老"}),
        json!({"category": "equity"}),
        json!({"category": "fixed_income"}),
        json!({"keyword": "ESG"}),
        json!({"product_codes": (1..=400).map(|i| format!("WM{i:07}")).collect::<Vec<_>>()}),
    ];
    let mut ids = Vec::new();
    for (round, s) in selectors.iter().chain(selectors.iter()).enumerate() {
        let id = format!("scale-{round}");
        w.command(&id, s.clone()).await;
        ids.push(id);
        if round == 5 {
            // Upstream changes while the second round is on its way.
            w.sim.sim.mutate(500, 3);
        }
    }
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let results = w.wait_results(&id_refs, Duration::from_secs(240)).await;
    for id in &ids {
        let r = results
            .iter()
            .find(|r| r["request_id"] == json!(id))
            .unwrap();
        assert_eq!(r["status"], "completed", "{r}");
    }
    w.wait_outbox_empty(Duration::from_secs(60)).await;

    // The store equals the truth for everything the second round asked for.
    let mut truth = BTreeMap::new();
    for s in &selectors {
        truth.extend(w.truth(&selector(s.clone())));
    }
    let stored = w.stored().await;
    let stored_products = products_of(&stored);
    assert_eq!(stored_products.len(), truth.len());
    assert_eq!(stored_products, truth);
    let events = w.read_all(&w.settings.topics.changes).await;
    assert_gapless(&events, &stored);
    // Both did work: each instance completed commands of its own partitions.
    for name in ["a", "b"] {
        assert!(
            w.log_of(name).contains("command completed"),
            "instance {name} completed no command"
        );
    }

    signal(&a, "TERM");
    signal(&b, "TERM");
    assert!(wait_exit(&mut a, Duration::from_secs(60)).await.success());
    assert!(wait_exit(&mut b, Duration::from_secs(60)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_in_the_middle_of_a_large_command_then_restart_loses_nothing() {
    let w = world(3000, 1).await;
    // A slow management system: the command takes many seconds.
    w.sim.sim.set_faults(Faults {
        latency_ms: 150,
        ..Faults::default()
    });
    // A timer commit every 100 ms: an offset stored too early would be committed at once.
    let mut a = w.spawn_process(
        "a",
        &[
            ("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "40"),
            FAST_TIMER_COMMIT,
        ],
    );
    // One small command done and committed first: the kill must not move the offset past
    // the big one.
    w.command("small", json!({"product_codes": ["WM0000001"]}))
        .await;
    w.wait_results(&["small"], Duration::from_secs(60)).await;
    wait_committed(&w, 0, 1).await;
    w.command("big", json!({"category": "mixed"})).await;
    wait_for(
        "the first pages to be folded",
        Duration::from_secs(60),
        || async { (w.stored().await.len() >= 80).then_some(()) },
    )
    .await;
    signal(&a, "KILL");
    wait_exit(&mut a, Duration::from_secs(10)).await;
    let partial = w.stored().await.len();
    let truth = w.truth(&selector(json!({"category": "mixed"})));
    assert!(
        partial < truth.len(),
        "killed mid-command ({partial} of {})",
        truth.len()
    );
    assert_eq!(
        w.committed(0).await,
        Some(1),
        "after kill -9 the committed offset is the unfinished command's own"
    );

    w.sim.sim.set_faults(Faults::default());
    let mut b = w.spawn_process("b", &[]);
    let results = w.wait_results(&["big"], Duration::from_secs(120)).await;
    assert_eq!(
        results.iter().find(|r| r["request_id"] == "big").unwrap()["status"],
        "completed"
    );
    wait_committed(&w, 0, 2).await;
    w.wait_outbox_empty(Duration::from_secs(60)).await;
    let stored = w.stored().await;
    let mut stored_products = products_of(&stored);
    stored_products.retain(|i, _| truth.contains_key(i));
    assert_eq!(stored_products, truth, "nothing missing from the store");
    let events = w.read_all(&w.settings.topics.changes).await;
    assert_gapless(&events, &stored);
    signal(&b, "TERM");
    assert!(wait_exit(&mut b, Duration::from_secs(60)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_a_command_exits_cleanly_and_the_command_completes_after_restart() {
    let w = world(3000, 1).await;
    // Pages slow enough that the rest of the command outlasts the drain (3 s here).
    w.sim.sim.set_faults(Faults {
        latency_ms: 400,
        ..Faults::default()
    });
    let mut a = w.spawn_process("a", &[("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "40")]);
    w.command("graceful", json!({"category": "cash"})).await;
    wait_for(
        "the first pages to be folded",
        Duration::from_secs(60),
        || async { (!w.stored().await.is_empty()).then_some(()) },
    )
    .await;
    let truth = w.truth(&selector(json!({"category": "cash"})));
    let unfinished = |stored: usize, results: &[Value]| {
        stored < truth.len() && !results.iter().any(|r| r["request_id"] == "graceful")
    };
    assert!(
        unfinished(w.stored().await.len(), &w.results().await),
        "the signal must arrive mid-command"
    );
    signal(&a, "TERM");
    let status = wait_exit(&mut a, Duration::from_secs(60)).await;
    assert!(status.success(), "clean exit on SIGTERM, got {status}");
    assert!(
        w.sim.sim.registrations().is_empty(),
        "deregistered before exiting"
    );
    // Cut: abandoned at the drain deadline, not finished and not skipped.
    assert!(
        unfinished(w.stored().await.len(), &w.results().await),
        "the command was cut, not completed, by the shutdown"
    );

    w.sim.sim.set_faults(Faults::default());
    let mut b = w.spawn_process("b", &[]);
    let results = w
        .wait_results(&["graceful"], Duration::from_secs(120))
        .await;
    assert!(
        results
            .iter()
            .any(|r| r["request_id"] == "graceful" && r["status"] == "completed")
    );
    w.wait_outbox_empty(Duration::from_secs(60)).await;
    let stored = w.stored().await;
    let stored_products = products_of(&stored);
    assert_eq!(
        stored_products,
        w.truth(&selector(json!({"category": "cash"})))
    );
    assert_gapless(&w.read_all(&w.settings.topics.changes).await, &stored);
    signal(&b, "TERM");
    assert!(wait_exit(&mut b, Duration::from_secs(60)).await.success());
}

/// The value of one sample of the Prometheus text page (0 when absent).
pub fn sample(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ops_endpoint_reports_health_readiness_and_moving_counters() {
    let w = world(300, 2).await;
    let instance = w.start().await;
    let base = format!("http://{}", instance.ops);
    let http = reqwest::Client::new();
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready: Value = wait_for("readiness", Duration::from_secs(30), || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        if r.status() == 200 {
            r.json().await.ok()
        } else {
            None
        }
    })
    .await;
    assert_eq!(ready["database"], true);
    assert_eq!(ready["broker"], true);
    assert_eq!(ready["upstream"], true);

    let page = || async {
        http.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = page().await;
    w.command("metered", json!({"category": "cash"})).await;
    w.wait_results(&["metered"], Duration::from_secs(60)).await;
    w.wait_outbox_empty(Duration::from_secs(30)).await;
    let after = page().await;
    let completed = r#"product_sync_commands_total{status="completed"}"#;
    let created = r#"product_sync_products_total{outcome="created"}"#;
    let expected = w.truth(&selector(json!({"category": "cash"}))).len() as f64;
    assert!(
        sample(&after, completed) >= sample(&before, completed) + 1.0,
        "{after}"
    );
    assert!(
        sample(&after, created) >= sample(&before, created) + expected,
        "{after}"
    );
    assert!(
        sample(&after, "product_sync_fold_page_seconds_count")
            > sample(&before, "product_sync_fold_page_seconds_count")
    );
    assert!(
        sample(
            &after,
            "product_sync_fetch_page_seconds_count{system=\"wms\"}"
        ) > 0.0
    );
    assert!(after.contains("product_sync_outbox_backlog 0"), "{after}");
    assert!(
        after.contains("product_sync_relay_published_total"),
        "{after}"
    );
    instance.stop().await;
}

/// The consumer blocks no runtime thread: on a single-threaded runtime, a second instance
/// joining the group revokes partitions from the first while its command runs (the revoke
/// drains it), both end up holding partitions, and every command completes.
#[tokio::test(flavor = "current_thread")]
async fn one_runtime_thread_is_enough_through_a_rebalance_with_a_command_in_flight() {
    let w = world(600, 4).await;
    w.sim.sim.set_faults(Faults {
        latency_ms: 1_000,
        ..Faults::default()
    });
    let mut settings = w.settings.clone();
    settings.upstream.page_size = 50;
    let a = w.start_with(settings.clone()).await;
    let partitions = |ops: std::net::SocketAddr| async move {
        let url = format!("http://{ops}/readyz");
        let body: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
        body["partitions_assigned"].as_u64()
    };
    wait_for(
        "the first instance to hold every partition",
        Duration::from_secs(60),
        || async { (partitions(a.ops).await? == 4).then_some(()) },
    )
    .await;
    w.command("slow", json!({"category": "mixed"})).await;
    wait_for(
        "the command to be under way",
        Duration::from_secs(60),
        || async { (!w.stored().await.is_empty()).then_some(()) },
    )
    .await;
    let b = w.start_with(settings).await;
    wait_for(
        "both instances to hold partitions",
        Duration::from_secs(60),
        || async {
            let (pa, pb) = (partitions(a.ops).await?, partitions(b.ops).await?);
            (pa > 0 && pb > 0 && pa + pb == 4).then_some(())
        },
    )
    .await;
    w.sim.sim.set_faults(Faults::default());
    for i in 0..8 {
        w.command(&format!("after-{i}"), json!({"category": "cash"}))
            .await;
    }
    let ids: Vec<String> = std::iter::once("slow".to_owned())
        .chain((0..8).map(|i| format!("after-{i}")))
        .collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let results = w.wait_results(&ids, Duration::from_secs(120)).await;
    for id in &ids {
        let r = results.iter().find(|r| r["request_id"] == *id).unwrap();
        assert_eq!(r["status"], "completed", "{id}: {r}");
    }
    a.stop().await;
    b.stop().await;
}

/// Waits until the group's committed offset of `partition` is `offset`.
pub async fn wait_committed(w: &World, partition: i32, offset: i64) {
    wait_for(
        &format!("offset {offset} committed on partition {partition}"),
        Duration::from_secs(60),
        || async { (w.committed(partition).await == Some(offset)).then_some(()) },
    )
    .await;
}

/// Stored offsets committed every 100 ms.
const FAST_TIMER_COMMIT: (&str, &str) = (
    "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__AUTO_COMMIT_INTERVAL_MS",
    "100",
);

/// Auto-commit effectively off: only the revoke and shutdown commits remain.
const NO_TIMER_COMMIT: (&str, &str) = (
    "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__AUTO_COMMIT_INTERVAL_MS",
    "3600000",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offsets_stored_before_a_rebalance_are_committed_on_revoke() {
    let w = world(300, 6).await;
    let _a = w.spawn_process("a", &[NO_TIMER_COMMIT]);
    wait_for("a to hold partitions", Duration::from_secs(60), || async {
        w.log_of("a").contains("partitions assigned").then_some(())
    })
    .await;
    let ids: Vec<String> = (0..6).map(|p| format!("revoke-{p}")).collect();
    for (p, id) in ids.iter().enumerate() {
        let body = json!({"request_id": id, "selector": {"category": "cash"}});
        w.send_to(p as i32, id, &body).await;
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    w.wait_results(&refs, Duration::from_secs(60)).await;
    // Done and stored, but no timer commit yet: what follows can only be the revoke's.
    for p in 0..6 {
        assert_eq!(
            w.committed(p).await,
            None,
            "partition {p} committed too early"
        );
    }
    let _b = w.spawn_process("b", &[NO_TIMER_COMMIT]);
    wait_for("b to hold partitions", Duration::from_secs(60), || async {
        w.log_of("b").contains("partitions assigned").then_some(())
    })
    .await;
    // The assignment (eager protocol) completes only after a's revoke callback has
    // returned: every partition it gave up carries its done command's offset.
    for p in 0..6 {
        assert_eq!(
            w.committed(p).await,
            Some(1),
            "partition {p}: stored offset not committed on revoke"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_holds_the_partition_and_the_command_completes_after_it() {
    let w = world(600, 1).await;
    let mut url = url::Url::parse(w.settings.database.url.expose_secret()).expect("url");
    let target = format!(
        "{}:{}",
        url.host_str().expect("host"),
        url.port().unwrap_or(5432)
    );
    let proxy = crate::helpers::Proxy::start(&target, true).await;
    url.set_port(Some(proxy.addr.port())).expect("port");
    // A timer commit every 100 ms: an offset stored too early would be committed at once.
    let mut a = w.spawn_process(
        "a",
        &[
            ("PRODUCT_SYNC__DATABASE__URL", url.as_str()),
            FAST_TIMER_COMMIT,
        ],
    );
    w.command("before", json!({"category": "cash"})).await;
    w.wait_results(&["before"], Duration::from_secs(60)).await;
    wait_committed(&w, 0, 1).await;

    proxy.cut();
    w.command("during", json!({"category": "mixed"})).await;
    let retrying = "command interrupted by a transient failure; retrying";
    wait_for(
        "the command to meet the outage (and retry twice)",
        Duration::from_secs(60),
        || async { (w.log_of("a").matches(retrying).count() >= 2).then_some(()) },
    )
    .await;
    assert!(proxy.refused() > 0, "the instance did try to reconnect");
    assert_eq!(
        w.committed(0).await,
        Some(1),
        "the partition waits: its offset does not pass the unfinished command"
    );
    assert_eq!(
        w.stored().await.len(),
        w.truth(&selector(json!({"category": "cash"}))).len()
    );

    proxy.restore();
    let results = w.wait_results(&["during"], Duration::from_secs(120)).await;
    let during = results
        .iter()
        .find(|r| r["request_id"] == "during")
        .expect("result");
    assert_eq!(during["status"], "completed", "{during}");
    wait_committed(&w, 0, 2).await;
    w.wait_outbox_empty(Duration::from_secs(60)).await;
    assert!(w.read_all(&w.settings.topics.dlq).await.is_empty());
    let mut truth = w.truth(&selector(json!({"category": "cash"})));
    truth.extend(w.truth(&selector(json!({"category": "mixed"}))));
    let stored = w.stored().await;
    assert_eq!(products_of(&stored), truth);
    assert_gapless(&w.read_all(&w.settings.topics.changes).await, &stored);
    signal(&a, "TERM");
    assert!(wait_exit(&mut a, Duration::from_secs(60)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_process_writes_no_secret_or_token_to_its_log_or_its_topics() {
    let w = world(300, 1).await;
    let ops = {
        // A free port for the console, whose admin token must not leak either.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    const ADMIN_TOKEN: &str = "admin-token-never-logged-7c1d";
    const WRONG_TOKEN: &str = "wrong-token-never-logged-3b9e";
    let mut a = w.spawn_process(
        "a",
        &[
            ("PRODUCT_SYNC__LOG__LEVEL", "trace"),
            ("PRODUCT_SYNC__LOG__FORMAT", "json"),
            ("PRODUCT_SYNC__HTTP__LISTEN", &ops),
            ("PRODUCT_SYNC__HTTP__ADMIN_TOKEN", ADMIN_TOKEN),
        ],
    );
    w.command("ok-1", json!({"category": "cash"})).await;
    w.wait_results(&["ok-1"], Duration::from_secs(60)).await;
    // Console actions with the right token and with a wrong one.
    let http = reqwest::Client::new();
    for (token, status) in [(ADMIN_TOKEN, 202), (WRONG_TOKEN, 401)] {
        let r = http
            .post(format!("http://{ops}/api/v1/requests"))
            .bearer_auth(token)
            .body(r#"{"request_id":"via-console","selector":{"category":"cash"}}"#)
            .send()
            .await
            .expect("the console answers");
        assert_eq!(r.status().as_u16(), status);
    }
    // The next page meets a 401: a refresh, and a second token.
    w.sim.sim.revoke_tokens();
    w.command("ok-2", json!({"category": "mixed"})).await;
    w.wait_results(&["ok-2"], Duration::from_secs(60)).await;
    w.send("bad", b"{\"request_id\": \"bad\", \"selector\": 7}", &[])
        .await;
    w.sim.sim.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    w.command("down", json!({"category": "equity"})).await;
    let results = w
        .wait_results(&["ok-1", "ok-2", "bad", "down"], Duration::from_secs(60))
        .await;
    let status = |id: &str| {
        results
            .iter()
            .find(|r| r["request_id"] == id)
            .map(|r| r["status"].clone())
    };
    assert_eq!(status("ok-2"), Some(json!("completed")));
    assert_eq!(status("bad"), Some(json!("rejected")));
    assert_eq!(status("down"), Some(json!("failed")));
    signal(&a, "TERM");
    assert!(wait_exit(&mut a, Duration::from_secs(60)).await.success());

    let tokens = w.sim.sim.issued_tokens();
    assert!(
        tokens.len() >= 2,
        "a refresh happened: {} tokens",
        tokens.len()
    );
    let log = std::fs::read(w.log_path("a")).expect("log");
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("\"level\":\"TRACE\""), "the log is at TRACE");
    assert!(text.contains("obtained an access token"));
    let mut haystacks = vec![("log".to_owned(), log)];
    for topic in [
        &w.settings.topics.results,
        &w.settings.topics.dlq,
        &w.settings.topics.changes,
    ] {
        let records = w.read_all(topic).await;
        assert!(!records.is_empty(), "{topic} holds records to search");
        for m in records {
            let mut bytes = m.payload().unwrap_or_default().to_vec();
            bytes.extend_from_slice(m.key().unwrap_or_default());
            for h in m
                .headers()
                .map(|h| h.iter().collect::<Vec<_>>())
                .unwrap_or_default()
            {
                bytes.extend_from_slice(h.key.as_bytes());
                bytes.extend_from_slice(h.value.unwrap_or_default());
            }
            haystacks.push((format!("{topic}@{}:{}", m.partition(), m.offset()), bytes));
        }
    }
    let secret = w.vars["PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET"].clone();
    let console = [ADMIN_TOKEN.to_owned(), WRONG_TOKEN.to_owned()];
    for (place, bytes) in &haystacks {
        for needle in std::iter::once(&secret)
            .chain(tokens.iter())
            .chain(console.iter())
        {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{place} holds a secret or a token ({} bytes long)",
                needle.len()
            );
        }
    }
}
