//! The chaos run's world: two management systems simulated in this process (`wms`, the
//! default, and `fund`), a database and topics of the run's own, the three instances, and the
//! stream of commands.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use product_sync::config::{self, Settings, Sources};
use product_sync::kafka::{TopicSpec, ensure_topics};
use product_sync::sim::{Catalogue, Sim, SimConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sea_orm::{ConnectionTrait, Database};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::{FUND_SECRET, Options, SECRET, bad_commands, selectors};

/// Everything the run set up.
pub struct World {
    pub dir: PathBuf,
    pub repo: PathBuf,
    pub sim: Sim,
    /// The second management system, `fund`: its own catalogue and secret.
    pub fund: Sim,
    pub sim_stop: CancellationToken,
    pub db_url: url::Url,
    pub settings: Settings,
    /// With `--cluster`: the cluster, its proxies, and the names of the run's links.
    pub cluster: Option<Cluster>,
    pub links: Vec<String>,
    env: HashMap<String, String>,
    binary: PathBuf,
}

impl World {
    pub async fn set_up(o: &Options, products: usize) -> anyhow::Result<Self> {
        let (dir, binary) = run_dir_and_binary(o.seed)?;
        eprintln!(
            "chaos: seed {} ({}), {products} products, logs in {}",
            o.seed,
            if o.short { "short" } else { "full" },
            dir.display()
        );
        let sims = Simulators::spawn(o.seed, products).await?;
        let db_url = own_database(o.seed).await?;
        let cluster = match o.cluster {
            true => Some(Cluster::find().await?),
            false => None,
        };
        // With the cluster, the instances reach everything through Toxiproxy; this run's own
        // readers and writers go straight to the brokers and the database.
        let (links, sim_url, fund_url) = match &cluster {
            Some(c) => proxied(c, o.seed, &sims.sim_addr, &sims.fund_addr).await?,
            None => (
                Vec::new(),
                format!("http://{}", sims.sim_addr),
                format!("http://{}", sims.fund_addr),
            ),
        };
        let env = instances_environment(o, &db_url, cluster.as_ref(), &sim_url, fund_url)?;
        let mut settings = config::load(&Sources {
            dir: Some(o.repo.join("config")),
            env_name: None,
            file: None,
            vars: Some(env.clone()),
        })?;
        if let Some(c) = &cluster {
            settings.kafka.bootstrap_servers = c.plaintext.clone();
        }
        own_topics(&settings).await?;
        Ok(World {
            dir,
            repo: o.repo.clone(),
            sim: sims.sim,
            fund: sims.fund,
            sim_stop: sims.stop,
            db_url,
            settings,
            cluster,
            links,
            env,
            binary,
        })
    }

    /// Removes the proxies this run made for its simulators.
    pub async fn remove_proxies(&self) -> anyhow::Result<()> {
        if let Some(c) = &self.cluster {
            for link in self.links.iter().filter(|l| l.starts_with("chaos-")) {
                c.toxiproxy.delete(link).await?;
            }
        }
        Ok(())
    }

    /// The three instances' slots, none started.
    pub fn instances(&self) -> anyhow::Result<Instances> {
        Ok(Instances {
            binary: self.binary.clone(),
            dir: self.dir.clone(),
            env: self.env.clone(),
            slots: vec![None, None, None],
            started: 0,
            crashes: 0,
            unclean_exits: 0,
        })
    }
}

/// The run's directory for logs, made, and the service's binary, which must have been built.
fn run_dir_and_binary(seed: u64) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir =
        std::env::temp_dir().join(format!("product-sync-chaos-{seed}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let binary = std::env::current_exe()?.with_file_name("product-sync");
    if !binary.is_file() {
        bail!(
            "{} is missing: build it first (cargo build --release --bins)",
            binary.display()
        );
    }
    Ok((dir, binary))
}

/// The two management systems, served from this process.
struct Simulators {
    sim: Sim,
    fund: Sim,
    stop: CancellationToken,
    sim_addr: String,
    fund_addr: String,
}

impl Simulators {
    /// `wms` with `products` products and `fund` with a fifth of that, each with the secret
    /// the logs are searched for.
    async fn spawn(seed: u64, products: usize) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let sim = Sim::new(
            SimConfig {
                client_secret: SECRET.to_owned(),
                seed,
                ..SimConfig::default()
            },
            Catalogue::generate(products, seed),
        );
        let sim_addr = sim
            .clone()
            .spawn("127.0.0.1:0".parse()?, stop.clone())
            .await?;
        let fund = Sim::new(
            SimConfig {
                client_secret: FUND_SECRET.to_owned(),
                seed: seed + 1,
                ..SimConfig::default()
            },
            Catalogue::generate(products / 5, seed + 1),
        );
        let fund_addr = fund
            .clone()
            .spawn("127.0.0.1:0".parse()?, stop.clone())
            .await?;
        Ok(Simulators {
            sim,
            fund,
            stop,
            sim_addr: sim_addr.to_string(),
            fund_addr: fund_addr.to_string(),
        })
    }
}

/// The instances' environment: with the cluster, the proxied brokers and database port and
/// replicated topics; the second system, `fund`, with a quick circuit breaker.
fn instances_environment(
    o: &Options,
    db_url: &url::Url,
    cluster: Option<&Cluster>,
    sim_url: &str,
    fund_url: String,
) -> anyhow::Result<HashMap<String, String>> {
    let mut instances_db = db_url.clone();
    if let Some(c) = cluster {
        instances_db
            .set_port(Some(c.pg_port))
            .map_err(|()| anyhow::anyhow!("the database URL takes no port"))?;
    }
    let mut env = environment(o, &instances_db, sim_url);
    if let Some(c) = cluster {
        env.insert(
            "PRODUCT_SYNC__KAFKA__BOOTSTRAP_SERVERS".to_owned(),
            c.proxied.clone(),
        );
        env.insert(
            "PRODUCT_SYNC__TOPICS__REPLICATION_FACTOR".to_owned(),
            "3".to_owned(),
        );
    }
    env.extend(
        [
            ("BASE_URL", fund_url),
            ("CLIENT_SECRET", FUND_SECRET.to_owned()),
            ("CIRCUIT_FAILURES", "3".to_owned()),
            ("CIRCUIT_OPEN_MS", "3000".to_owned()),
            ("RETRY_MAX_ELAPSED_MS", "10000".to_owned()),
        ]
        .map(|(k, v)| (format!("PRODUCT_SYNC__UPSTREAM__SYSTEMS__FUND__{k}"), v)),
    );
    Ok(env)
}

/// Proxies in front of the two simulators (the governance platform is the first one); returns
/// every link the network faults may hit (the brokers', the database's, the simulators') and
/// the simulators' URLs behind their proxies.
async fn proxied(
    cluster: &Cluster,
    seed: u64,
    sim: &str,
    fund: &str,
) -> anyhow::Result<(Vec<String>, String, String)> {
    let prefix = format!("chaos-{seed}-{}", std::process::id());
    let (wms_link, fund_link) = (format!("{prefix}-wms"), format!("{prefix}-fund"));
    let sim_url = format!("http://{}", cluster.toxiproxy.proxy(&wms_link, sim).await?);
    let fund_url = format!(
        "http://{}",
        cluster.toxiproxy.proxy(&fund_link, fund).await?
    );
    let links = ["kafka-1", "kafka-2", "kafka-3", "postgres"]
        .map(str::to_owned)
        .into_iter()
        .chain([wms_link, fund_link])
        .collect();
    Ok((links, sim_url, fund_url))
}

/// A database of this run's own; returns its URL.
async fn own_database(seed: u64) -> anyhow::Result<url::Url> {
    let admin_url = std::env::var("PRODUCT_SYNC_TEST_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://product_sync:product_sync@127.0.0.1:5432/product_sync".to_owned()
    });
    let db_name = format!("ps_chaos_{seed}_{}", std::process::id());
    let admin = Database::connect(admin_url.clone())
        .await
        .context("PostgreSQL (deploy/local/postgres.sh up)")?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE {db_name}"))
        .await?;
    let mut db_url = url::Url::parse(&admin_url)?;
    db_url.set_path(&format!("/{db_name}"));
    Ok(db_url)
}

/// Topics of this run's own, 12 partitions each.
async fn own_topics(settings: &Settings) -> anyhow::Result<()> {
    let t = &settings.topics;
    // All of them, the retry topic too: an instance that has to create one while the broker
    // restarts fails to start (the broker refuses with InvalidReplicationFactor meanwhile).
    let specs: Vec<TopicSpec> = [
        &t.requests,
        &t.changes,
        &t.results,
        &t.dlq,
        &t.state,
        &t.retry,
        &t.notifications,
    ]
    .into_iter()
    .map(|n| TopicSpec {
        name: n.clone(),
        partitions: 12,
        replication_factor: settings.topics.replication_factor,
        compacted: *n == t.state,
    })
    .collect();
    ensure_topics(&settings.kafka, &specs)
        .await
        .context("the broker (deploy/local/kafka.sh up)")
}

/// The instances' environment: this run's database, topics, group and simulator; short
/// session and drain timeouts so that faults show quickly.
fn environment(o: &Options, db_url: &url::Url, sim_url: &str) -> HashMap<String, String> {
    let prefix = format!("chaos-{}-{}", o.seed, std::process::id());
    let log = "debug,rdkafka=info,librdkafka=info,sqlx=warn,hyper=info,reqwest=info";
    [
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
            "PRODUCT_SYNC__PIPELINE__RETRY_DELAYS_MS",
            "5000,15000,30000,60000".to_owned(),
        ),
        ("PRODUCT_SYNC__TOPICS__PARTITIONS", "12".to_owned()),
        ("PRODUCT_SYNC__DATABASE__URL", db_url.to_string()),
        ("PRODUCT_SYNC__DATABASE__MAX_CONNECTIONS", "6".to_owned()),
        (
            "PRODUCT_SYNC__DATABASE__CONNECT_TIMEOUT_MS",
            "120000".to_owned(),
        ),
        ("PRODUCT_SYNC__UPSTREAM__BASE_URL", sim_url.to_owned()),
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", SECRET.to_owned()),
        (
            "PRODUCT_SYNC__UPSTREAM__RETRY_MAX_ELAPSED_MS",
            "60000".to_owned(),
        ),
        ("PRODUCT_SYNC__GOVERNANCE__ENABLED", "true".to_owned()),
        ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", sim_url.to_owned()),
        (
            "PRODUCT_SYNC__PIPELINE__DRAIN_TIMEOUT_MS",
            "3000".to_owned(),
        ),
        (
            "PRODUCT_SYNC__PIPELINE__BROKER_WAIT_MS",
            "120000".to_owned(),
        ),
        ("PRODUCT_SYNC__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        ("PRODUCT_SYNC__LOG__LEVEL", log.to_owned()),
        // The schedule stays on through every fault: an incremental of each system every
        // 5 s from its watermark, and a drift check (a dry run: it writes and delists
        // nothing) every 30 s. The checks hold with it as without it.
        (
            "PRODUCT_SYNC__UPSTREAM__SCHEDULE__INCREMENTAL_EVERY_MS",
            "5000".to_owned(),
        ),
        (
            "PRODUCT_SYNC__UPSTREAM__SCHEDULE__DRIFT_CHECK_CRON",
            "*/30 * * * * *".to_owned(),
        ),
    ]
    .into_iter()
    .chain(topics(&prefix))
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// This run's topics, all named after its prefix.
fn topics(prefix: &str) -> [(&'static str, String); 8] {
    [
        (
            "PRODUCT_SYNC__TOPICS__REQUESTS",
            format!("{prefix}.requests"),
        ),
        ("PRODUCT_SYNC__TOPICS__CHANGES", format!("{prefix}.changes")),
        ("PRODUCT_SYNC__TOPICS__RESULTS", format!("{prefix}.results")),
        ("PRODUCT_SYNC__TOPICS__DLQ", format!("{prefix}.dlq")),
        ("PRODUCT_SYNC__TOPICS__STATE", format!("{prefix}.state")),
        ("PRODUCT_SYNC__TOPICS__RETRY", format!("{prefix}.retry")),
        (
            "PRODUCT_SYNC__TOPICS__RELAY_PROGRESS",
            format!("{prefix}.relay-progress"),
        ),
        (
            "PRODUCT_SYNC__TOPICS__NOTIFICATIONS",
            format!("{prefix}.notifications"),
        ),
    ]
}

/// The background stream of commands: good ones on random selectors, every third step a
/// malformed one (each kind twice), and every fifth step a burst of upstream changes.
pub struct CommandStream {
    stop: CancellationToken,
    task: JoinHandle<Streamed>,
}

/// What the command stream did: the good commands' ids, the bad ones' keys, and the identity
/// keys of the products it withdrew upstream (never offered again), and the notifications it
/// sent: each (system, code) named, and the keys of the bad ones.
pub struct Streamed {
    pub good: Vec<String>,
    pub bad: Vec<String>,
    pub withdrawn: Vec<String>,
    pub notified: Vec<(String, String)>,
    pub bad_notifications: Vec<String>,
    /// Notifications sent in all (good and bad, duplicates counted).
    pub notifications: usize,
}

impl CommandStream {
    pub fn spawn(world: &World, producer: &FutureProducer, seed: u64) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(stream(
            producer.clone(),
            world.settings.topics.requests.clone(),
            world.settings.topics.notifications.clone(),
            world.sim.clone(),
            world.fund.clone(),
            seed,
            stop.clone(),
        ));
        CommandStream { stop, task }
    }

    /// Stops the stream; returns what it sent and withdrew.
    pub async fn stop(self) -> anyhow::Result<Streamed> {
        self.stop.cancel();
        Ok(self.task.await?)
    }
}

async fn stream(
    producer: FutureProducer,
    topic: String,
    notifications: String,
    sim: Sim,
    fund: Sim,
    seed: u64,
    stop: CancellationToken,
) -> Streamed {
    let (selectors, bad) = (selectors(), bad_commands());
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let (mut good, mut bad_sent, mut withdrawn) = (Vec::new(), Vec::new(), Vec::new());
    let send = |key: String, payload: Vec<u8>| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            let record = FutureRecord::to(&topic).key(&key).payload(&payload);
            producer
                .send(record, Duration::from_secs(120))
                .await
                .is_ok()
                .then_some(key)
        }
    };
    let mut n = 0u64;
    let mut notes = Notes::default();
    while !stop.is_cancelled() {
        n += 1;
        if n.is_multiple_of(2) {
            notes
                .burst(&producer, &notifications, &sim, &fund, &mut rng, n)
                .await;
        }
        let id = format!("chaos-{n}");
        let body = if n.is_multiple_of(4) {
            // The second system: its whole catalogue or one category.
            let scope = snapshot_scopes()[rng.gen_range(0..6)].clone();
            json!({"request_id": id, "system": "fund", "selector": scope})
        } else if n.is_multiple_of(11) {
            // A snapshot: the whole catalogue or one category.
            let scope = snapshot_scopes()[rng.gen_range(0..6)].clone();
            json!({"request_id": id, "selector": scope, "mode": "snapshot"})
        } else {
            let selector = &selectors[rng.gen_range(0..selectors.len())];
            json!({"request_id": id, "selector": selector})
        };
        good.extend(send(id, body.to_string().into_bytes()).await);
        if n.is_multiple_of(7) {
            // Upstream stops offering a few products, for good.
            let catalogue = sim.catalogue();
            let products = catalogue.products();
            let keys: Vec<String> = (0..rng.gen_range(1..4))
                .map(|_| products[rng.gen_range(0..products.len())].identity().key())
                .collect();
            withdrawn.extend(sim.withdraw(&keys).iter().map(|p| p.identity().key()));
        }
        if n.is_multiple_of(3) && bad_sent.len() < bad.len() * 2 {
            let (key, bytes) = &bad[bad_sent.len() % bad.len()];
            bad_sent.extend(send(format!("{key}-{n}"), bytes.clone()).await);
        }
        if n.is_multiple_of(5) {
            sim.mutate(rng.gen_range(10..60), rng.r#gen());
        }
        if n.is_multiple_of(6) {
            fund.mutate(rng.gen_range(5..20), rng.r#gen());
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1200))) => {}
        }
    }
    Streamed {
        good,
        bad: bad_sent,
        withdrawn,
        notified: notes.notified,
        bad_notifications: notes.bad,
        notifications: notes.sent,
    }
}

/// The notifications the stream sent.
#[derive(Default)]
struct Notes {
    notified: Vec<(String, String)>,
    bad: Vec<String>,
    sent: usize,
}

impl Notes {
    /// A burst as a management system sends them: 5–60 products of either system named one
    /// by one or in lists, many twice, and now and then a notification that must be refused.
    async fn burst(
        &mut self,
        producer: &FutureProducer,
        topic: &str,
        wms: &Sim,
        fund: &Sim,
        rng: &mut StdRng,
        n: u64,
    ) {
        let (system, sim) = if rng.gen_bool(0.25) {
            ("fund", fund)
        } else {
            ("wms", wms)
        };
        let catalogue = sim.catalogue();
        let codes: Vec<String> = (0..rng.gen_range(5..60))
            .filter_map(|_| {
                let products = catalogue.products();
                products[rng.gen_range(0..products.len())]
                    .content
                    .product_code
                    .clone()
            })
            .collect();
        let mut bodies: Vec<(&[String], serde_json::Value)> = Vec::new();
        for chunk in codes.chunks(rng.gen_range(1..8)) {
            let body = match chunk {
                [one] => json!({"system": system, "product_code": one}),
                many => json!({"system": system, "product_codes": many}),
            };
            if rng.gen_bool(0.5) {
                bodies.push((chunk, body.clone()));
            }
            bodies.push((chunk, body));
        }
        let bad = match n % 26 {
            0 => Some(json!({"system": "nowhere", "product_code": "WM0000001"})),
            12 => Some(json!({"product_code": "two words"})),
            _ => None,
        };
        for (chunk, body) in &bodies {
            let payload = body.to_string();
            let record = FutureRecord::to(topic).key(&chunk[0]).payload(&payload);
            if producer
                .send(record, Duration::from_secs(120))
                .await
                .is_ok()
            {
                self.sent += 1;
                self.notified
                    .extend(chunk.iter().map(|c| (system.to_owned(), c.clone())));
            }
        }
        if let Some(body) = bad {
            let key = format!("bad-notification-{n}");
            let payload = body.to_string();
            let record = FutureRecord::to(topic).key(&key).payload(&payload);
            if producer
                .send(record, Duration::from_secs(120))
                .await
                .is_ok()
            {
                self.sent += 1;
                self.bad.push(key);
            }
        }
    }
}

/// The scopes of the stream's snapshots: the whole catalogue, and each category.
pub fn snapshot_scopes() -> Vec<serde_json::Value> {
    let mut scopes = vec![json!({"all": true})];
    for c in ["fixed_income", "equity", "mixed", "cash", "structured"] {
        scopes.push(json!({"category": c}));
    }
    scopes
}

/// The three `product-sync run` processes, by slot.
pub struct Instances {
    binary: PathBuf,
    dir: PathBuf,
    env: HashMap<String, String>,
    pub slots: Vec<Option<Child>>,
    started: usize,
    /// Instances that exited by themselves (not by our hand).
    pub crashes: u32,
    /// Instances that did not exit 0 within a minute of SIGTERM.
    pub unclean_exits: u32,
}

impl Instances {
    /// SIGTERM, then waits up to a minute: anything but exit 0 in time is an unclean exit.
    pub fn terminate(&mut self, slot: usize) {
        if self.slots[slot].is_none() {
            return;
        }
        self.signal(slot, "TERM");
        let code = self.reap(slot, Duration::from_secs(60));
        if code != Some(0) {
            eprintln!("chaos: instance {slot} exited with {code:?} after SIGTERM");
            self.unclean_exits += 1;
        }
    }

    /// An instance that died on its own is counted as a crash and restarted.
    pub fn restart_the_dead(&mut self) -> anyhow::Result<()> {
        for slot in 0..self.slots.len() {
            if let Some(child) = self.slots[slot].as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                eprintln!("chaos: instance {slot} exited by itself ({status}); restarting");
                self.crashes += 1;
                self.slots[slot] = None;
                self.start(slot)?;
            }
        }
        Ok(())
    }

    pub fn start(&mut self, slot: usize) -> anyhow::Result<()> {
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

    pub fn signal(&mut self, slot: usize, signal: &str) {
        if let Some(child) = &self.slots[slot] {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    /// Waits (bounded) for a signalled instance to exit; returns its exit status code.
    pub fn reap(&mut self, slot: usize, within: Duration) -> Option<i32> {
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

    pub fn alive(&self) -> Vec<usize> {
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

/// Runs `deploy/local/<name> <args>`, its output appended to the run's `scripts.log`.
pub fn script(world: &World, name: &str, args: &[&str]) -> anyhow::Result<()> {
    let action = args.join(" ");
    let log_path = world.dir.join("scripts.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    // A broker killed with -9 recovers every partition's log before it answers: with a few
    // hundred partitions on a busy 2-core machine that took more than kafka.sh's default two
    // minutes (full cluster run, seed 2). The run measures the stall it causes either way.
    let ready_timeout = std::env::var("KAFKA_READY_TIMEOUT_S").unwrap_or_else(|_| "600".into());
    let status = Command::new("bash")
        .arg(world.repo.join("deploy/local").join(name))
        .args(args)
        .env("KAFKA_READY_TIMEOUT_S", ready_timeout)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("running {name} {action}"))?;
    if !status.success() {
        bail!(
            "{name} {action} failed (its output: {})",
            log_path.display()
        );
    }
    Ok(())
}
