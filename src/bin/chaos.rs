//! `product-sync-chaos`: the chaos run. Starts the simulator (in this process), three
//! `product-sync run` processes in one group on a 12-partition request topic (against the real
//! broker and PostgreSQL that `deploy/local/*.sh` run), publishes a stream of overlapping and
//! malformed commands while upstream products keep changing, and injects faults on a schedule
//! drawn from a seed: kill -9, SIGTERM, 3 → 1 → 3 scaling, broker and database restarts, and
//! simulator fault bursts; once the scheduled time is up, any kind the dice left out is forced
//! once, so even the short run exercises every recovery path. When the faults stop and the
//! system drains, it checks that nothing was lost, doubled, left with a gap, stalled, or
//! leaked, and prints one line:
//!
//! `chaos: seed=<s> kills=<n> sigterms=<n> broker_restarts=<n> db_restarts=<n> bad_commands=<n> products=<n> lost=<n> doubled=<n> gaps=<n> stalled=<n> leaked_secrets=<n>`
//!
//! Exit status 1 when any of lost, doubled, gaps, stalled, leaked_secrets is above zero.
//! Run it through `deploy/local/chaos.sh [--short] [--seed S]`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use product_sync::command::Selector;
use product_sync::config::{self, Settings, Sources};
use product_sync::kafka::{TopicSpec, client_config, ensure_topics, header_text as header};
use product_sync::product::{Identity, Product};
use product_sync::sim::{Catalogue, Faults, Hostile, Sim, SimConfig};
use product_sync::store::fold::load_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "chaos-client-secret-5d1b7f";

struct Options {
    short: bool,
    seed: u64,
    repo: PathBuf,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        short: false,
        seed: 1,
        repo: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--short" => o.short = true,
            "--seed" => {
                i += 1;
                o.seed = args
                    .get(i)
                    .and_then(|s| s.parse().ok())
                    .context("--seed takes a number")?;
            }
            "--repo" => {
                i += 1;
                o.repo = PathBuf::from(args.get(i).context("--repo takes a directory")?);
            }
            other => bail!(
                "unknown argument {other:?}; usage: product-sync-chaos [--short] [--seed S] [--repo DIR]"
            ),
        }
        i += 1;
    }
    Ok(o)
}

/// The `product-sync run` processes, by slot.
struct Instances {
    binary: PathBuf,
    dir: PathBuf,
    env: HashMap<String, String>,
    slots: Vec<Option<Child>>,
    started: usize,
}

impl Instances {
    fn start(&mut self, slot: usize) -> anyhow::Result<()> {
        if self.slots[slot].is_some() {
            return Ok(());
        }
        self.started += 1;
        let log = std::fs::File::create(
            self.dir
                .join(format!("instance-{slot}-{}.log", self.started)),
        )?;
        let child = Command::new(&self.binary)
            .arg("run")
            .current_dir(&self.dir)
            .env_remove("RUST_LOG")
            .envs(&self.env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting product-sync run")?;
        self.slots[slot] = Some(child);
        Ok(())
    }

    fn signal(&mut self, slot: usize, signal: &str) {
        if let Some(child) = &self.slots[slot] {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    /// Waits (bounded) for a signalled instance to exit; returns its exit status code.
    fn reap(&mut self, slot: usize, within: Duration) -> Option<i32> {
        let child = self.slots[slot].as_mut()?;
        let until = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.slots[slot] = None;
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                self.slots[slot] = None;
                return Some(-1);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|s| self.slots[*s].is_some())
            .collect()
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        for child in self.slots.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn script(repo: &Path, name: &str, action: &str) -> anyhow::Result<()> {
    let status = Command::new("bash")
        .arg(repo.join("deploy/local").join(name))
        .arg(action)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {name} {action}"))?;
    if !status.success() {
        bail!("{name} {action} failed");
    }
    Ok(())
}

/// Thirty-odd kinds of malformed command.
/// Produces a command with this id and selector on the request topic.
async fn send_command(
    producer: &FutureProducer,
    settings: &Settings,
    id: &str,
    selector: &Value,
) -> anyhow::Result<()> {
    let body = json!({"request_id": id, "selector": selector}).to_string();
    producer
        .send(
            FutureRecord::to(&settings.topics.requests)
                .key(id)
                .payload(&body),
            Duration::from_secs(60),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// The keyword of commands aimed at a hostile management system (it matches no product).
const HOSTILE_KEYWORD: &str = "chaos-hostile";

fn bad_commands() -> Vec<(&'static str, Vec<u8>)> {
    let huge_keyword = format!(
        r#"{{"request_id":"bad-huge","selector":{{"keyword":"{}"}}}}"#,
        "大".repeat(500)
    );
    let too_large = format!(
        r#"{{"request_id":"bad-too-large","selector":{{"keyword":"x"}},"pad":"{}"}}"#,
        "x".repeat(70_000)
    );
    let many_codes = format!(
        r#"{{"request_id":"bad-many-codes","selector":{{"product_codes":[{}]}}}}"#,
        (0..1001)
            .map(|i| format!("\"C{i}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    vec![
        ("bad-json", b"{not json".to_vec()),
        ("bad-utf8", b"\xff\xfe\xfd\xfc".to_vec()),
        (
            "bad-utf8-in-string",
            b"{\"request_id\":\"\xc3\x28\",\"selector\":{\"keyword\":\"k\"}}".to_vec(),
        ),
        ("bad-empty", Vec::new()),
        ("bad-whitespace", b"   ".to_vec()),
        ("bad-null", b"null".to_vec()),
        ("bad-array", b"[1,2,3]".to_vec()),
        ("bad-string", b"\"just a string\"".to_vec()),
        ("bad-number", b"42".to_vec()),
        (
            "bad-missing-id",
            br#"{"selector":{"keyword":"k"}}"#.to_vec(),
        ),
        (
            "bad-missing-selector",
            br#"{"request_id":"bad-missing-selector"}"#.to_vec(),
        ),
        (
            "bad-id-type",
            br#"{"request_id":7,"selector":{"keyword":"k"}}"#.to_vec(),
        ),
        (
            "bad-id-empty",
            br#"{"request_id":"","selector":{"keyword":"k"}}"#.to_vec(),
        ),
        (
            "bad-id-spaces",
            br#"{"request_id":"a b","selector":{"keyword":"k"}}"#.to_vec(),
        ),
        (
            "bad-id-long",
            format!(
                r#"{{"request_id":"{}","selector":{{"keyword":"k"}}}}"#,
                "i".repeat(200)
            )
            .into_bytes(),
        ),
        (
            "bad-unknown-field",
            br#"{"request_id":"bad-unknown-field","selector":{"keyword":"k"},"extra":1}"#.to_vec(),
        ),
        (
            "bad-selector-typo",
            br#"{"request_id":"bad-selector-typo","selector":{"kyeword":"k"}}"#.to_vec(),
        ),
        (
            "bad-selector-empty",
            br#"{"request_id":"bad-selector-empty","selector":{}}"#.to_vec(),
        ),
        (
            "bad-selector-null",
            br#"{"request_id":"bad-selector-null","selector":null}"#.to_vec(),
        ),
        (
            "bad-selector-array",
            br#"{"request_id":"bad-selector-array","selector":[]}"#.to_vec(),
        ),
        (
            "bad-codes-string",
            br#"{"request_id":"bad-codes-string","selector":{"product_codes":"A"}}"#.to_vec(),
        ),
        (
            "bad-codes-numbers",
            br#"{"request_id":"bad-codes-numbers","selector":{"product_codes":[1,2]}}"#.to_vec(),
        ),
        (
            "bad-code-comma",
            br#"{"request_id":"bad-code-comma","selector":{"product_codes":["A,B"]}}"#.to_vec(),
        ),
        (
            "bad-code-empty",
            br#"{"request_id":"bad-code-empty","selector":{"product_codes":[""]}}"#.to_vec(),
        ),
        ("bad-many-codes", many_codes.into_bytes()),
        (
            "bad-keyword-blank",
            br#"{"request_id":"bad-keyword-blank","selector":{"keyword":"  "}}"#.to_vec(),
        ),
        ("bad-huge", huge_keyword.into_bytes()),
        ("bad-too-large", too_large.into_bytes()),
        (
            "bad-since",
            br#"{"request_id":"bad-since","selector":{"updated_since":"yesterday"}}"#.to_vec(),
        ),
        (
            "bad-since-type",
            br#"{"request_id":"bad-since-type","selector":{"updated_since":12}}"#.to_vec(),
        ),
        (
            "bad-system",
            br#"{"request_id":"bad-system","system":"other-wms","selector":{"keyword":"k"}}"#
                .to_vec(),
        ),
        (
            "bad-category-type",
            br#"{"request_id":"bad-category-type","selector":{"category":5}}"#.to_vec(),
        ),
        (
            "bad-truncated",
            br#"{"request_id":"bad-truncated","selector":{"keyw"#.to_vec(),
        ),
    ]
}

fn selectors() -> Vec<Value> {
    let mut s: Vec<Value> = product_sync::sim::catalogue::KEYWORDS
        .iter()
        .map(|k| json!({"keyword": k}))
        .collect();
    for c in ["fixed_income", "equity", "mixed", "cash", "structured"] {
        s.push(json!({"category": c}));
    }
    for start in [1usize, 400, 900] {
        s.push(json!({"product_codes": (start..start + 300).map(|i| format!("WM{i:07}")).collect::<Vec<_>>()}));
    }
    s.push(json!({"keyword": "稳健", "category": "fixed_income"}));
    s
}

/// Every record of a topic from its start up to its end now.
fn read_all(settings: &Settings, topic: &str) -> anyhow::Result<Vec<OwnedMessage>> {
    let consumer: BaseConsumer = client_config(&settings.kafka)
        .set(
            "group.id",
            format!("chaos-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    Ok(product_sync::dlq::read_until_end(&consumer, topic, false)?)
}

fn json_of(m: &OwnedMessage) -> Value {
    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let mut rng = StdRng::seed_from_u64(o.seed);
    let products = if o.short { 5_000 } else { 50_000 };
    let run_for = if o.short {
        Duration::from_secs(150)
    } else {
        Duration::from_secs(900)
    };
    let min_kills = if o.short { 6 } else { 20 };
    let dir = std::env::temp_dir().join(format!(
        "product-sync-chaos-{}-{}",
        o.seed,
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let binary = std::env::current_exe()?.with_file_name("product-sync");
    if !binary.is_file() {
        bail!(
            "{} is missing: build it first (cargo build --release --bins)",
            binary.display()
        );
    }
    eprintln!(
        "chaos: seed {} ({}), {products} products, logs in {}",
        o.seed,
        if o.short { "short" } else { "full" },
        dir.display()
    );

    // The management system, in this process, with the secret the logs are searched for.
    let sim = Sim::new(
        SimConfig {
            client_secret: SECRET.to_owned(),
            seed: o.seed,
            ..SimConfig::default()
        },
        Catalogue::generate(products, o.seed),
    );
    let sim_stop = CancellationToken::new();
    let sim_addr = sim
        .clone()
        .spawn("127.0.0.1:0".parse()?, sim_stop.clone())
        .await?;

    // A database and topics of this run's own.
    let admin_url = std::env::var("PRODUCT_SYNC_TEST_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://product_sync:product_sync@127.0.0.1:5432/product_sync".to_owned()
    });
    let db_name = format!("ps_chaos_{}_{}", o.seed, std::process::id());
    {
        let admin = Database::connect(admin_url.clone())
            .await
            .context("PostgreSQL (deploy/local/postgres.sh up)")?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE {db_name}"))
            .await?;
    }
    let mut db_url = url::Url::parse(&admin_url)?;
    db_url.set_path(&format!("/{db_name}"));
    let prefix = format!("chaos-{}-{}", o.seed, std::process::id());
    let env: HashMap<String, String> = [
        ("PRODUCT_SYNC_ENV", "local".to_owned()),
        (
            "PRODUCT_SYNC_CONFIG_DIR",
            o.repo.join("config").display().to_string(),
        ),
        (
            "PRODUCT_SYNC__KAFKA__BOOTSTRAP_SERVERS",
            "127.0.0.1:9092".to_owned(),
        ),
        ("PRODUCT_SYNC__KAFKA__GROUP_ID", format!("{prefix}-group")),
        (
            "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SESSION_TIMEOUT_MS",
            "6000".to_owned(),
        ),
        (
            "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__HEARTBEAT_INTERVAL_MS",
            "1000".to_owned(),
        ),
        (
            "PRODUCT_SYNC__TOPICS__REQUESTS",
            format!("{prefix}.requests"),
        ),
        ("PRODUCT_SYNC__TOPICS__CHANGES", format!("{prefix}.changes")),
        ("PRODUCT_SYNC__TOPICS__RESULTS", format!("{prefix}.results")),
        ("PRODUCT_SYNC__TOPICS__DLQ", format!("{prefix}.dlq")),
        ("PRODUCT_SYNC__TOPICS__PARTITIONS", "12".to_owned()),
        ("PRODUCT_SYNC__DATABASE__URL", db_url.to_string()),
        ("PRODUCT_SYNC__DATABASE__MAX_CONNECTIONS", "6".to_owned()),
        (
            "PRODUCT_SYNC__DATABASE__CONNECT_TIMEOUT_MS",
            "120000".to_owned(),
        ),
        (
            "PRODUCT_SYNC__UPSTREAM__BASE_URL",
            format!("http://{sim_addr}"),
        ),
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", SECRET.to_owned()),
        (
            "PRODUCT_SYNC__UPSTREAM__RETRY_MAX_ELAPSED_MS",
            "60000".to_owned(),
        ),
        ("PRODUCT_SYNC__GOVERNANCE__ENABLED", "true".to_owned()),
        (
            "PRODUCT_SYNC__GOVERNANCE__BASE_URL",
            format!("http://{sim_addr}"),
        ),
        (
            "PRODUCT_SYNC__PIPELINE__DRAIN_TIMEOUT_MS",
            "3000".to_owned(),
        ),
        (
            "PRODUCT_SYNC__PIPELINE__BROKER_WAIT_MS",
            "120000".to_owned(),
        ),
        ("PRODUCT_SYNC__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        (
            "PRODUCT_SYNC__LOG__LEVEL",
            "debug,rdkafka=info,librdkafka=info,sqlx=warn,hyper=info,reqwest=info".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let settings = config::load(&Sources {
        dir: Some(o.repo.join("config")),
        env_name: None,
        file: None,
        vars: Some(env.clone()),
    })?;
    let specs: Vec<TopicSpec> = [
        &settings.topics.requests,
        &settings.topics.changes,
        &settings.topics.results,
        &settings.topics.dlq,
    ]
    .into_iter()
    .map(|n| TopicSpec {
        name: n.clone(),
        partitions: 12,
        replication_factor: 1,
    })
    .collect();
    ensure_topics(&settings.kafka, &specs)
        .await
        .context("the broker (deploy/local/kafka.sh up)")?;

    let mut instances = Instances {
        binary,
        dir: dir.clone(),
        env,
        slots: vec![None, None, None],
        started: 0,
    };
    for slot in 0..3 {
        instances.start(slot)?;
    }

    // The command stream, in the background.
    let producer: FutureProducer = client_config(&settings.kafka)
        .set("enable.idempotence", "true")
        .create()?;
    let selectors = selectors();
    let bad = bad_commands();
    let stream_stop = CancellationToken::new();
    let stream = {
        let producer = producer.clone();
        let topic = settings.topics.requests.clone();
        let selectors = selectors.clone();
        let bad = bad.clone();
        let stop = stream_stop.clone();
        let sim = sim.clone();
        let seed = o.seed;
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
            let mut good: Vec<String> = Vec::new();
            let mut bad_sent: Vec<String> = Vec::new();
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let id = format!("chaos-{n}");
                let selector = &selectors[rng.gen_range(0..selectors.len())];
                let body = json!({"request_id": id, "selector": selector}).to_string();
                let sent = producer
                    .send(
                        FutureRecord::to(&topic).key(&id).payload(&body),
                        Duration::from_secs(120),
                    )
                    .await;
                if sent.is_ok() {
                    good.push(id);
                }
                if n.is_multiple_of(3) && bad_sent.len() < bad.len() * 2 {
                    let (key, bytes) = &bad[bad_sent.len() % bad.len()];
                    let key = format!("{key}-{n}");
                    if producer
                        .send(
                            FutureRecord::to(&topic).key(&key).payload(bytes),
                            Duration::from_secs(120),
                        )
                        .await
                        .is_ok()
                    {
                        bad_sent.push(key);
                    }
                }
                if n.is_multiple_of(5) {
                    sim.mutate(rng.gen_range(10..60), rng.r#gen());
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1200))) => {}
                }
            }
            (good, bad_sent)
        })
    };

    // The fault schedule.
    let (mut kills, mut sigterms, mut broker_restarts, mut db_restarts, mut scale_changes) =
        (0u32, 0u32, 0u32, 0u32, 0u32);
    let mut sim_faults = 0u32;
    let mut hostile_ids: Vec<String> = Vec::new();
    let started = Instant::now();
    loop {
        // After the scheduled time, every kind of fault the dice left out is forced once (and
        // kills up to the minimum), so even a short run exercises each recovery path.
        let overtime = started.elapsed() >= run_for;
        let missing = [
            (kills < min_kills || kills == 0, 0),
            (sigterms == 0, 45),
            (scale_changes == 0, 55),
            (broker_restarts == 0, 62),
            (db_restarts == 0, 70),
            (hostile_ids.is_empty(), 78),
            (sim_faults == 0, 90),
        ]
        .into_iter()
        .find_map(|(missing, roll)| missing.then_some(roll));
        if overtime && missing.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(2_000..6_000))).await;
        let roll = match missing {
            Some(roll) if overtime => roll,
            _ => rng.gen_range(0..100),
        };
        let alive = instances.alive();
        match roll {
            0..=44 if !alive.is_empty() => {
                let slot = alive[rng.gen_range(0..alive.len())];
                instances.signal(slot, "KILL");
                instances.reap(slot, Duration::from_secs(10));
                kills += 1;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(200..4_000))).await;
                instances.start(slot)?;
            }
            45..=54 if !alive.is_empty() => {
                let slot = alive[rng.gen_range(0..alive.len())];
                instances.signal(slot, "TERM");
                let code = instances.reap(slot, Duration::from_secs(60));
                if code != Some(0) {
                    eprintln!("chaos: instance {slot} exited with {code:?} after SIGTERM");
                }
                sigterms += 1;
                instances.start(slot)?;
            }
            55..=61 => {
                // 3 → 1 → 3
                for slot in [1, 2] {
                    instances.signal(slot, "TERM");
                    instances.reap(slot, Duration::from_secs(60));
                    sigterms += 1;
                }
                scale_changes += 1;
                tokio::time::sleep(Duration::from_secs(rng.gen_range(3..10))).await;
                for slot in 0..3 {
                    instances.start(slot)?;
                }
            }
            62..=69 => {
                script(&o.repo, "kafka.sh", "down")?;
                tokio::time::sleep(Duration::from_secs(rng.gen_range(1..6))).await;
                script(&o.repo, "kafka.sh", "up")?;
                broker_restarts += 1;
            }
            70..=77 => {
                script(&o.repo, "postgres.sh", "down")?;
                tokio::time::sleep(Duration::from_secs(rng.gen_range(1..6))).await;
                script(&o.repo, "postgres.sh", "up")?;
                db_restarts += 1;
            }
            78..=86 => {
                // A hostile management system, for one command aimed at it: the command must
                // end (failed, or completed when tolerated) and never hold its partition.
                let mode = Hostile::ALL[rng.gen_range(0..Hostile::ALL.len())];
                sim.set_faults(Faults {
                    hostile: Some(mode),
                    hostile_keyword: Some(HOSTILE_KEYWORD.into()),
                    ..Faults::default()
                });
                let id = format!("chaos-hostile-{}", hostile_ids.len());
                let selector = json!({"keyword": HOSTILE_KEYWORD});
                send_command(&producer, &settings, &id, &selector).await?;
                hostile_ids.push(id);
                tokio::time::sleep(Duration::from_secs(rng.gen_range(4..10))).await;
                sim.set_faults(Faults::default());
            }
            _ => {
                let faults = match rng.gen_range(0..4) {
                    0 => Faults {
                        error_rate: 0.4,
                        ..Faults::default()
                    },
                    1 => Faults {
                        throttle_rate: 0.5,
                        retry_after_s: 1,
                        ..Faults::default()
                    },
                    2 => Faults {
                        latency_ms: 800,
                        ..Faults::default()
                    },
                    _ => Faults {
                        drop_rate: 0.3,
                        ..Faults::default()
                    },
                };
                sim.set_faults(faults);
                tokio::time::sleep(Duration::from_secs(rng.gen_range(2..8))).await;
                sim.set_faults(Faults::default());
                sim_faults += 1;
            }
        }
        for slot in 0..3 {
            // An instance that died on its own (not by our hand) is counted and restarted.
            if let Some(child) = instances.slots[slot].as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                eprintln!("chaos: instance {slot} exited by itself ({status}); restarting");
                instances.slots[slot] = None;
                instances.start(slot)?;
            }
        }
    }
    stream_stop.cancel();
    let (mut good, bad_sent) = stream.await?;
    sim.set_faults(Faults::default());
    for slot in 0..3 {
        instances.start(slot)?;
    }

    // Upstream settles; a last round asks for every selector once more, so the store's final
    // state can be compared with the final truth.
    let mut final_ids = Vec::new();
    for (i, selector) in selectors.iter().enumerate() {
        let id = format!("chaos-final-{i}");
        send_command(&producer, &settings, &id, selector).await?;
        final_ids.push(id.clone());
        good.push(id);
    }

    // Drain: every good command has a completed result (failed ones are replayed once).
    let deadline = Instant::now() + Duration::from_secs(if o.short { 600 } else { 1800 });
    let mut last_replay = Instant::now() - Duration::from_secs(60);
    let results = loop {
        let results: Vec<Value> = read_all(&settings, &settings.topics.results)?
            .iter()
            .map(json_of)
            .collect();
        let completed: BTreeSet<String> = results
            .iter()
            .filter(|r| r["status"] == "completed")
            .filter_map(|r| r["request_id"].as_str().map(str::to_owned))
            .collect();
        let missing = good.iter().filter(|id| !completed.contains(*id)).count();
        if missing == 0 {
            break results;
        }
        // Commands that failed during an outage are replayed, as an operator would (each DLQ
        // record once: replay remembers its place).
        if results.iter().any(|r| r["status"] == "failed")
            && last_replay.elapsed() > Duration::from_secs(20)
        {
            let n = product_sync::dlq::replay(&settings, Some("transient")).await?;
            if n > 0 {
                eprintln!("chaos: replayed {n} failed command(s) from the DLQ");
            }
            last_replay = Instant::now();
        }
        if Instant::now() > deadline {
            break results;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    // Let the relay finish, then stop the instances cleanly.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for slot in 0..3 {
        instances.signal(slot, "TERM");
        instances.reap(slot, Duration::from_secs(60));
    }

    // Checks.
    let db = Database::connect(db_url.to_string()).await?;
    let stored: BTreeMap<Identity, (Product, i64)> = load_all(&db, "wms")
        .await?
        .into_iter()
        .map(|(i, p, r)| (i, (p, r)))
        .collect();
    let catalogue = sim.catalogue();
    let mut truth: BTreeMap<Identity, Product> = BTreeMap::new();
    for s in &selectors {
        let selector: Selector = serde_json::from_value(s.clone())?;
        truth.extend(
            catalogue
                .select(&selector)
                .map(|p| (p.identity(), p.clone())),
        );
    }
    let completed: BTreeSet<String> = results
        .iter()
        .filter(|r| r["status"] == "completed")
        .filter_map(|r| r["request_id"].as_str().map(str::to_owned))
        .collect();
    let mut lost = truth
        .iter()
        .filter(|(i, p)| stored.get(*i).map(|(s, _)| s) != Some(*p))
        .count();
    lost += good.iter().filter(|id| !completed.contains(*id)).count();
    let unpublished = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT COUNT(*) AS n FROM outbox_pending",
        ))
        .await?
        .and_then(|r| r.try_get::<i64>("", "n").ok())
        .unwrap_or(-1);
    lost += usize::try_from(unpublished).unwrap_or(1);

    let events = read_all(&settings, &settings.topics.changes)?;
    let mut by_product: BTreeMap<String, BTreeMap<i64, (String, Value)>> = BTreeMap::new();
    let mut doubled = 0usize;
    for m in &events {
        let mut e = json_of(m);
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let revision = e["revision"].as_i64().unwrap_or(-1);
        let ce_id = header(m, product_sync::wire::headers::CE_ID).unwrap_or_default();
        if let Some(o) = e.as_object_mut() {
            o.remove("changed_at");
        }
        match by_product.entry(key).or_default().entry(revision) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((ce_id, e));
            }
            std::collections::btree_map::Entry::Occupied(o) => {
                if o.get().0 != ce_id || o.get().1 != e {
                    doubled += 1;
                }
            }
        }
    }
    let mut gaps = 0usize;
    for (identity, (product, revision)) in &stored {
        let key = format!("wms/{}", identity.event_key());
        let revisions: Vec<i64> = by_product
            .get(&key)
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default();
        if revisions != (1..=*revision).collect::<Vec<_>>() {
            gaps += 1;
        }
        // Replaying the change topic rebuilds the store: the last revision's `after` is the row.
        let rebuilt = by_product
            .get(&key)
            .and_then(|r| r.values().next_back())
            .and_then(|(_, e)| Product::from_json(&e["after"]).ok());
        if rebuilt.as_ref() != Some(product) {
            lost += 1;
        }
    }

    // Bad commands: each in the DLQ with a reason, each with a rejected result.
    let dlq = read_all(&settings, &settings.topics.dlq)?;
    let dlq_keys: BTreeSet<String> = dlq
        .iter()
        .filter(|m| header(m, product_sync::wire::dlq::REASON).is_some_and(|r| !r.is_empty()))
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
        .collect();
    let rejected = results.iter().filter(|r| r["status"] == "rejected").count();
    lost += bad_sent.iter().filter(|k| !dlq_keys.contains(*k)).count();
    if rejected < bad_sent.len() {
        lost += bad_sent.len() - rejected;
    }

    // Hostile commands: each ended (failed, or completed when the misbehaviour is tolerated).
    let ended: BTreeSet<&str> = results
        .iter()
        .filter(|r| r["status"] == "failed" || r["status"] == "completed")
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    let unended_hostile = hostile_ids
        .iter()
        .filter(|id| !ended.contains(id.as_str()))
        .count();

    // Stalled partitions: the group's committed offset is behind the end.
    let consumer: BaseConsumer = client_config(&settings.kafka)
        .set("group.id", &settings.kafka.group_id)
        .create()?;
    let mut stalled = 0usize;
    for p in 0..12 {
        let (_, high) =
            consumer.fetch_watermarks(&settings.topics.requests, p, Duration::from_secs(10))?;
        let mut list = TopicPartitionList::new();
        list.add_partition(&settings.topics.requests, p);
        let committed = match consumer
            .committed_offsets(list, Duration::from_secs(10))?
            .find_partition(&settings.topics.requests, p)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        if committed < high {
            stalled += 1;
        }
    }
    stalled += unended_hostile;

    // Secrets: the client secret and every token ever issued, in no log line of any process.
    let mut needles: Vec<String> = sim.issued_tokens();
    needles.push(SECRET.to_owned());
    let mut leaked_secrets = 0usize;
    for entry in std::fs::read_dir(&dir)? {
        let text = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        leaked_secrets += needles.iter().filter(|n| text.contains(n.as_str())).count();
    }

    sim_stop.cancel();
    println!(
        "chaos: seed={} kills={kills} sigterms={sigterms} broker_restarts={broker_restarts} db_restarts={db_restarts} bad_commands={} hostile_commands={} products={} lost={lost} doubled={doubled} gaps={gaps} stalled={stalled} leaked_secrets={leaked_secrets}",
        o.seed,
        bad_sent.len(),
        hostile_ids.len(),
        stored.len(),
    );
    eprintln!(
        "chaos: scale changes {scale_changes}, good commands {}, change events {}, logs in {}",
        good.len(),
        events.len(),
        dir.display()
    );
    if lost + doubled + gaps + stalled + leaked_secrets > 0 {
        std::process::exit(1);
    }
    Ok(())
}
