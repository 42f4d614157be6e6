//! End-to-end benchmark on the real services: a `product-sync run` process, the simulator
//! process, the local Kafka broker and PostgreSQL. One command selects the whole catalogue;
//! the clock runs from producing it until the broker acknowledged its last event (the relay's
//! queue is empty) and its result (`result_published_at`). Prints parseable lines:
//!
//! ```text
//! pipeline-bench: case=limits fetch_per_s=… copy_per_s=… broker_per_s=… composite_per_s=…
//! pipeline-bench: case=<initial|unchanged|changed10> products=N e2e_per_s=… result_s=… all_events_s=… events=… fetch_s=… fold_s=… ratio=…
//! pipeline-bench: case=relay mode=<transactional|idempotent> rows=N relay_per_s=… broker_per_s=… ratio=… trials=… broker_before_per_s=… broker_after_per_s=…
//! pipeline-bench: case=million products=1000000 result_s=… all_events_s=… command_s=… peak_rss_mb=…
//! ```
//!
//! `limits`: the parts measured alone in the same run, after the initial case filled the store:
//! `fetch` the service's own client fetching and parsing every page with no store, `copy` the
//! stored rows (products, change rows, queue rows) loaded again by raw `COPY`, `broker` the
//! plain producer below; `composite` = 1 / (1/fetch + 1/copy + 1/broker). Each case's `ratio`
//! is its rate against its limit: `initial` against composite, `unchanged` against fetch,
//! `changed10` against 1 / (1/fetch + 0.1/copy + 0.1/broker).
//!
//! `fetch_s` and `fold_s` are the instance's own summed page timings (they overlap: the next
//! page is fetched while one is folded). `relay`: a plain producer (same settings) sends N change
//! events and their state records from memory (the broker's rate on this machine), then the
//! relay alone publishes a pre-filled queue of the same N rows, transactional
//! (`pipeline.exactly_once`) and idempotent, then the plain producer sends again; each relay
//! against the mean of the two plain sends around it. A trial measures the four in turn;
//! `--relay-trials` of them (default 3), each line giving medians and every trial's ratio.
//! `million` runs one command of a million products
//! in a fresh store (`peak_rss_mb` is the instance's own VmHWM), then the relay case again
//! with a million history rows.
//!
//! Run: `deploy/local/kafka.sh up && deploy/local/postgres.sh up && cargo bench --bench pipeline`
//! (options after `--`: `--products N` (default 100000), `--million N` (default 1000000; 0
//! skips it), `--relay-batch N` (the relay case's `pipeline.relay_batch_size`, default 5000),
//! `--relay-trials N` (default 3; the million's relay case runs one), `--relay-only` (only
//! the initial case, to fill the history, then the relay case),
//! `--keep-db`). `PRODUCT_SYNC_BENCH_DATABASE_URL` and `PRODUCT_SYNC_BENCH_KAFKA` name the
//! services (default: the local ones); every run makes its own database and topics and
//! deletes them at the end.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use product_sync::config::KafkaSettings;
use product_sync::kafka::producer_config;
use product_sync::outbox::shards::Leases;
use product_sync::outbox::transactional::Transactions;
use product_sync::outbox::{Relay, RelaySettings};
use product_sync::wire::CloudEvent;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sea_orm::sqlx::{self, PgPool, Row};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use secrecy::SecretString;

#[path = "support/copy.rs"]
mod copy;

/// mimalloc: the relay and the fold allocate and free many small strings across threads,
/// where glibc's allocator spent a fifth of the relay's time (perf, `case=relay`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Error = Box<dyn std::error::Error>;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pg_admin_url() -> String {
    std::env::var("PRODUCT_SYNC_BENCH_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://product_sync:product_sync@127.0.0.1:5432/product_sync".to_owned()
    })
}

fn kafka() -> KafkaSettings {
    KafkaSettings {
        bootstrap_servers: std::env::var("PRODUCT_SYNC_BENCH_KAFKA")
            .unwrap_or_else(|_| "127.0.0.1:9092".to_owned()),
        group_id: "pipeline-bench".to_owned(),
        librdkafka: Default::default(),
        require_tls: false,
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Proc {
    /// SIGTERM, then wait for the exit.
    fn stop(mut self) -> Result<(), Error> {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status()?;
        let status = self.0.wait()?;
        if !status.success() {
            return Err(format!("product-sync exited with {status}").into());
        }
        Ok(())
    }

    /// Peak resident memory (VmHWM) in MB.
    fn peak_rss_mb(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_product-sync");
const SECRET: &str = "bench-secret";

/// The simulator with `n` products; returns it and its base URL.
fn simulator(n: usize) -> Result<(Proc, String), Error> {
    let mut child = Command::new(BIN)
        .args(["simulate", "--listen", "127.0.0.1:0", "--seed", "42"])
        .args(["--products", &n.to_string(), "--client-secret", SECRET])
        .args(["--token-ttl-s", "3600"])
        .env("PRODUCT_SYNC__LOG__LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("simulator stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("simulator said {line:?}"))?
        .to_owned();
    Ok((Proc(child), url))
}

/// One benchmark world: a fresh database and topic names.
struct World {
    db_url: String,
    db: DatabaseConnection,
    prefix: String,
    sim_url: String,
    ops_port: u16,
}

impl World {
    async fn new(sim_url: String) -> Result<Self, Error> {
        let admin = Database::connect(pg_admin_url()).await.map_err(|e| {
            format!(
                "PostgreSQL is not reachable ({e}): start it with `deploy/local/postgres.sh up`"
            )
        })?;
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let name = format!("ps_bench_{suffix}");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await?;
        let mut url = url::Url::parse(&pg_admin_url())?;
        url.set_path(&format!("/{name}"));
        let db_url = url.to_string();
        let db = product_sync::store::connect(&product_sync::config::DatabaseSettings {
            url: SecretString::from(db_url.clone()),
            max_connections: 4,
            migrate_on_start: true,
            connect_timeout: Duration::from_secs(10),
            require_tls: false,
        })
        .await?;
        product_sync::store::migrate(&db).await?;
        let ops_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Ok(World {
            db_url,
            db,
            prefix: format!("bench-{suffix}"),
            sim_url,
            ops_port,
        })
    }

    fn topic(&self, t: &str) -> String {
        format!("{}.{t}", self.prefix)
    }

    fn pool(&self) -> &PgPool {
        self.db.get_postgres_connection_pool()
    }

    /// `product-sync run` on this world, with the default settings otherwise.
    fn instance(&self) -> Result<Proc, Error> {
        let log = std::fs::File::create(std::env::temp_dir().join(format!("{}.log", self.prefix)))?;
        let vars: HashMap<&str, String> = [
            ("PRODUCT_SYNC_ENV", "local".to_owned()),
            (
                "PRODUCT_SYNC__KAFKA__BOOTSTRAP_SERVERS",
                kafka().bootstrap_servers,
            ),
            ("PRODUCT_SYNC__KAFKA__GROUP_ID", self.topic("group")),
            ("PRODUCT_SYNC__TOPICS__REQUESTS", self.topic("requests")),
            ("PRODUCT_SYNC__TOPICS__CHANGES", self.topic("changes")),
            ("PRODUCT_SYNC__TOPICS__RESULTS", self.topic("results")),
            ("PRODUCT_SYNC__TOPICS__DLQ", self.topic("dlq")),
            ("PRODUCT_SYNC__TOPICS__STATE", self.topic("state")),
            (
                "PRODUCT_SYNC__TOPICS__RELAY_PROGRESS",
                self.topic("relay-progress"),
            ),
            ("PRODUCT_SYNC__DATABASE__URL", self.db_url.clone()),
            ("PRODUCT_SYNC__UPSTREAM__BASE_URL", self.sim_url.clone()),
            ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", SECRET.to_owned()),
            (
                "PRODUCT_SYNC__HTTP__LISTEN",
                format!("127.0.0.1:{}", self.ops_port),
            ),
            ("PRODUCT_SYNC__LOG__LEVEL", "warn".to_owned()),
        ]
        .into_iter()
        .collect();
        let child = Command::new(BIN)
            .arg("run")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("RUST_LOG")
            .envs(vars)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Proc(child))
    }

    /// Waits until the instance's consumer joined (its /readyz says so).
    async fn wait_ready(&self) -> Result<(), Error> {
        let until = Instant::now() + Duration::from_secs(120);
        let url = format!("http://127.0.0.1:{}/readyz", self.ops_port);
        while Instant::now() < until {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err("the instance did not become ready within 120 s".into())
    }

    async fn metric(&self, name: &str) -> f64 {
        let Ok(r) = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.ops_port)).await
        else {
            return f64::NAN;
        };
        let text = r.text().await.unwrap_or_default();
        // A labelled series appears with its first sample: absent is zero.
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Produces a command selecting every product; returns when its result and all its events
    /// were acknowledged: (result_s, all_events_s, events, command_s).
    async fn run_command(
        &self,
        producer: &FutureProducer,
        id: &str,
    ) -> Result<(f64, f64, i64, f64), Error> {
        let body = serde_json::json!({"request_id": id,
            "selector": {"updated_since": "2000-01-01T00:00:00Z"}})
        .to_string();
        let before: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) FROM product_changes")
            .fetch_one(self.pool())
            .await?
            .try_get(0)?;
        let started = Instant::now();
        producer
            .send(
                FutureRecord::to(&self.topic("requests"))
                    .key(id)
                    .payload(&body),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        let mut result_s = None;
        let deadline = started + Duration::from_secs(1800);
        loop {
            if Instant::now() > deadline {
                return Err(format!("command {id} not done within 30 minutes").into());
            }
            let row = sqlx::query(
                "SELECT result_published_at IS NOT NULL AS published, \
                 EXTRACT(EPOCH FROM finished_at - started_at)::float8 AS took, \
                 EXISTS (SELECT 1 FROM outbox_pending) AS queued \
                 FROM requests WHERE request_id = $1",
            )
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
            if let Some(row) = row {
                let published: bool = row.try_get("published")?;
                let queued: bool = row.try_get("queued")?;
                if published && result_s.is_none() {
                    result_s = Some(started.elapsed().as_secs_f64());
                }
                if published && !queued {
                    let all = started.elapsed().as_secs_f64();
                    let took: Option<f64> = row.try_get("took")?;
                    let events: i64 =
                        sqlx::query("SELECT COUNT(*) FROM product_changes WHERE id > $1")
                            .bind(before)
                            .fetch_one(self.pool())
                            .await?
                            .try_get(0)?;
                    return Ok((
                        result_s.unwrap_or(all),
                        all,
                        events,
                        took.unwrap_or(f64::NAN),
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Deletes this run's topics and database (`--keep-db` keeps the database).
    async fn clean_up(self) {
        self.delete_topics().await;
        if std::env::args().any(|a| a == "--keep-db") {
            eprintln!("pipeline-bench: database kept: {}", self.db_url);
            return;
        }
        let name = self
            .db_url
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let _ = self.db.close().await;
        if let Ok(admin) = Database::connect(pg_admin_url()).await {
            let _ = admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }

    async fn delete_topics(&self) {
        let Ok(admin) = product_sync::kafka::client_config(&kafka())
            .create::<AdminClient<DefaultClientContext>>()
        else {
            return;
        };
        let names: Vec<String> = [
            "requests",
            "changes",
            "results",
            "dlq",
            "state",
            "relay-progress",
        ]
        .iter()
        .map(|t| self.topic(t))
        .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let _ = admin.delete_topics(&refs, &AdminOptions::new()).await;
    }
}

fn plain_producer() -> Result<FutureProducer, Error> {
    Ok(producer_config(&kafka(), 900_000).create()?)
}

/// One case of the three: its line (without its ratio) and its end-to-end rate.
async fn case(
    w: &World,
    producer: &FutureProducer,
    name: &str,
    n: usize,
) -> Result<(String, f64), Error> {
    let (fetch0, fold0) = (
        w.metric("product_sync_fetch_page_seconds_sum{system=\"wms\"}")
            .await,
        w.metric("product_sync_fold_page_seconds_sum").await,
    );
    let (result_s, all_s, events, _) = w.run_command(producer, &format!("bench-{name}")).await?;
    let (fetch1, fold1) = (
        w.metric("product_sync_fetch_page_seconds_sum{system=\"wms\"}")
            .await,
        w.metric("product_sync_fold_page_seconds_sum").await,
    );
    let rate = n as f64 / all_s;
    let line = format!(
        "pipeline-bench: case={name} products={n} e2e_per_s={rate:.0} result_s={result_s:.2} \
         all_events_s={all_s:.2} events={events} fetch_s={:.2} fold_s={:.2}",
        fetch1 - fetch0,
        fold1 - fold0,
    );
    Ok((line, rate))
}

/// What this machine can do, each part measured alone in the same run (products per second;
/// the broker's figure is rows: a change event and a state record each).
struct Limits {
    fetch: f64,
    copy: f64,
    broker: f64,
}

impl Limits {
    /// The parts one after the other — the honest limit on a machine where they share the
    /// CPU — when every product is fetched and `share` of them stored and published.
    fn with_changed(&self, share: f64) -> f64 {
        1.0 / (1.0 / self.fetch + share / self.copy + share / self.broker)
    }

    /// Every product fetched, stored and published.
    fn composite(&self) -> f64 {
        self.with_changed(1.0)
    }

    /// `plain`: the initial case's change events, for the broker's rate.
    async fn measure(w: &World, plain: &Plain) -> Result<Self, Error> {
        let (fetched, fetch_s) = fetch_alone(&w.sim_url).await?;
        let (copied, copy_s) = copy_alone(w).await?;
        let limits = Limits {
            fetch: fetched as f64 / fetch_s,
            copy: copied as f64 / copy_s,
            broker: plain.send(w).await?,
        };
        println!(
            "pipeline-bench: case=limits fetch_per_s={:.0} copy_per_s={:.0} broker_per_s={:.0} composite_per_s={:.0}",
            limits.fetch,
            limits.copy,
            limits.broker,
            limits.composite()
        );
        Ok(limits)
    }
}

/// The service's own client fetching and parsing every page of the simulator (the instance's
/// page size and credentials), storing nothing; the products and the seconds.
async fn fetch_alone(sim_url: &str) -> Result<(usize, f64), Error> {
    use futures::StreamExt;
    let policy = product_sync::retry::RetryPolicy::with_budget(Duration::from_secs(60));
    let http = product_sync::upstream::http_client(Duration::from_secs(30), None)?;
    let tokens = Arc::new(product_sync::upstream::TokenSource::new(
        http.clone(),
        sim_url,
        "product-sync".to_owned(),
        SecretString::from(SECRET),
        policy,
    )?);
    let client = product_sync::upstream::ProductClient::new(http, sim_url, tokens, 500, policy)?;
    let selector: product_sync::command::Selector =
        serde_json::from_value(serde_json::json!({"all": true}))?;
    let started = Instant::now();
    let mut products = 0;
    let mut pages = std::pin::pin!(client.pages(selector));
    while let Some(page) = pages.next().await {
        products += page?.items.len();
    }
    Ok((products, started.elapsed().as_secs_f64()))
}

/// The rows the initial case stored (its products, their change rows and their queue rows)
/// loaded again by raw `COPY` into empty copies of their tables (same columns, indexes and
/// defaults); the products and the seconds of the three `COPY`s.
async fn copy_alone(w: &World) -> Result<(usize, f64), Error> {
    let tables = vec![
        ("products", "SELECT * FROM products".to_owned(), ""),
        (
            "product_changes",
            "SELECT * FROM product_changes".to_owned(),
            "",
        ),
        (
            "outbox_pending",
            "SELECT product_id, id, product_id, created_at FROM product_changes".to_owned(),
            "(shard_key, change_id, product_id, created_at)",
        ),
    ];
    let (products, took) = copy::copy_again(&w.db, tables).await?;
    Ok((usize::try_from(products)?, took.as_secs_f64()))
}

/// Publishes the first `rows` change rows with the relay alone, transactional and then
/// idempotent (the queue filled again before each), bracketed by the same messages sent with
/// a plain producer just before and just after, `trials` times in turn. Prints one relay line
/// per mode: the median of its trials' rates, the plain producer's median (each trial's the
/// mean of its two sends; the medians of the sends before and after follow), and the median
/// of the trials' ratios (each trial's relay against its own plain producer). This machine's
/// speed drifts within a run as well as between runs: one trial of each swung the ratio from
/// 0.28 to 0.51 between runs, and a plain producer measured only before the relays sent a
/// million rows at 85,000 to 129,000 a second in five runs of the same commit.
async fn relay_case(w: &World, plain: &Plain, trials: usize) -> Result<(), Error> {
    let rows = plain.messages.len();
    let (mut broker, mut before, mut after) = (Vec::new(), Vec::new(), Vec::new());
    let mut modes: [(&str, Vec<f64>, Vec<f64>); 2] = [
        ("transactional", Vec::new(), Vec::new()),
        ("idempotent", Vec::new(), Vec::new()),
    ];
    for _ in 0..trials.max(1) {
        let first = plain.send(w).await?;
        let mut trial = Vec::new();
        for (mode, ..) in &modes {
            trial.push(rows as f64 / relay_alone(w, rows, *mode == "transactional").await?);
        }
        let last = plain.send(w).await?;
        let broker_rate = (first + last) / 2.0;
        broker.push(broker_rate);
        before.push(first);
        after.push(last);
        for ((_, rates, ratios), rate) in modes.iter_mut().zip(trial) {
            rates.push(rate);
            ratios.push(rate / broker_rate);
        }
    }
    let broker_rate = median(&broker);
    let (before, after) = (median(&before), median(&after));
    for (mode, rates, ratios) in &modes {
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "pipeline-bench: case=relay mode={mode} rows={rows} (each a change event and a state record) relay_per_s={:.0} broker_per_s={broker_rate:.0} ratio={:.2} trials={} broker_before_per_s={before:.0} broker_after_per_s={after:.0}",
            median(rates),
            median(ratios),
            each.join("/")
        );
    }
    Ok(())
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Re-queues the first `rows` change rows and publishes them with the relay alone; returns
/// the seconds it took.
async fn relay_alone(w: &World, rows: usize, exactly_once: bool) -> Result<f64, Error> {
    let transactions = exactly_once.then(|| Transactions {
        kafka: kafka(),
        id_prefix: format!("{}-relay", w.topic("group")),
        progress_topic: w.topic("relay-progress"),
        shards: 16,
        max_event_bytes: 900_000,
    });
    let mut relay = Relay::new(
        w.db.clone(),
        product_sync::kafka::Publisher::create(producer_config(&kafka(), 900_000))?,
        RelaySettings {
            changes_topic: w.topic("changes"),
            results_topic: w.topic("results"),
            state_topic: Some(w.topic("state")),
            batch: arg("--relay-batch", 5000) as u64,
            interval: Duration::from_millis(200),
            max_event_bytes: 900_000,
            exactly_once: transactions,
        },
        Leases::postgres(SecretString::from(w.db_url.clone()), "bench".to_owned(), 16),
        Arc::new(tokio::sync::Notify::new()),
    );
    // The previous run's leases go with its connection: wait until every shard is ours.
    let until = Instant::now() + Duration::from_secs(600);
    while {
        relay.refresh_shards().await?;
        relay.shards_held().len() < 16
    } {
        if Instant::now() > until {
            return Err("the relay could not take every shard".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Taking a shard (a transactional producer's `init_transactions`, its progress read) is
    // done once per shard move, before the clock starts.
    relay.drain().await?;
    sqlx::query(
        "INSERT INTO outbox_pending (shard_key, change_id, product_id, created_at) \
         SELECT product_id, id, product_id, now() FROM product_changes ORDER BY id LIMIT $1",
    )
    .bind(rows as i64)
    .execute(w.pool())
    .await?;
    sqlx::query("ANALYZE outbox_pending")
        .execute(w.pool())
        .await?;
    let started = Instant::now();
    let mut published = 0;
    // A shard whose transactional producer was not ready yet is published on a later round.
    while published < rows && Instant::now() < until {
        match relay.drain().await?.changes {
            0 => tokio::time::sleep(Duration::from_millis(20)).await,
            n => published += n,
        }
    }
    let relay_s = started.elapsed().as_secs_f64();
    if published != rows {
        return Err(format!("the relay published {published} of {rows} rows").into());
    }
    let stop = tokio_util::sync::CancellationToken::new();
    stop.cancel();
    relay.run(stop).await;
    Ok(relay_s)
}

/// The first `rows` change events as the plain producer sends them: (key, payload, id, op,
/// time) and each one's state record (`None`: a tombstone), all made before any clock starts.
struct Plain {
    messages: Vec<(String, String, String, String, String)>,
    states: Vec<Option<String>>,
}

impl Plain {
    async fn load(w: &World, rows: usize) -> Result<Self, Error> {
        let messages: Vec<(String, String, String, String, String)> = sqlx::query(
            "SELECT system || '/' || COALESCE(product_code, identity) AS key, payload::text AS payload, \
             event_id, op, to_char(created_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS time \
             FROM product_changes ORDER BY id LIMIT $1",
        )
        .bind(rows as i64)
        .fetch_all(w.pool())
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get("key")?,
                r.try_get("payload")?,
                r.try_get("event_id")?,
                r.try_get("op")?,
                r.try_get("time")?,
            ))
        })
        .collect::<Result<_, sqlx::Error>>()?;
        // The relay also sends each product's state record: the plain producer sends the same
        // records.
        let states = messages
            .iter()
            .map(|(_, payload, ..)| product_sync::wire::state_of(payload))
            .collect::<Result<_, _>>()?;
        Ok(Plain { messages, states })
    }

    /// Sends them with a plain producer, straight from memory; returns the rate per change
    /// event: the broker's on this machine.
    async fn send(&self, w: &World) -> Result<f64, Error> {
        let producer = plain_producer()?;
        let (topic, state_topic) = (w.topic("changes"), w.topic("state"));
        let started = Instant::now();
        let mut deliveries = Vec::with_capacity(self.messages.len() * 2);
        for ((key, payload, id, op, time), state) in self.messages.iter().zip(&self.states) {
            let ce_type = format!("com.product-sync.product.{op}");
            let headers = CloudEvent {
                id,
                ce_type: &ce_type,
                source: "product-sync/wms",
                subject: key,
                time,
                traceparent: None,
            }
            .headers();
            let record = FutureRecord::to(&topic)
                .key(key)
                .payload(payload)
                .headers(headers);
            deliveries.push(send_waiting(&producer, record).await);
            let mut record = FutureRecord::<String, String>::to(&state_topic).key(key);
            if let Some(state) = state {
                record = record.payload(state);
            }
            deliveries.push(send_waiting(&producer, record).await);
        }
        for d in deliveries {
            d.await?.map_err(|(e, _)| e)?;
        }
        Ok(self.messages.len() as f64 / started.elapsed().as_secs_f64())
    }
}

/// Hands a record to the producer, waiting while its local queue is full.
async fn send_waiting<'a>(
    producer: &FutureProducer,
    mut record: FutureRecord<'a, String, String>,
) -> rdkafka::producer::DeliveryFuture {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return delivery,
            Err((_, r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

async fn mutate(sim_url: &str, count: usize) -> Result<(), Error> {
    let r = reqwest::Client::new()
        .post(format!("{sim_url}/admin/mutate"))
        .json(&serde_json::json!({"count": count, "seed": 1}))
        .send()
        .await?;
    if !r.status().is_success() {
        return Err(format!("mutate: {}", r.status()).into());
    }
    Ok(())
}

/// The initial case fills the store; then the parts are measured alone (the copy needs the
/// stored rows) and the case lines are printed with their ratios.
async fn three_cases(n: usize) -> Result<(), Error> {
    let (_sim, sim_url) = simulator(n)?;
    let w = World::new(sim_url.clone()).await?;
    let instance = w.instance()?;
    w.wait_ready().await?;
    let producer = plain_producer()?;
    let (initial, rate) = case(&w, &producer, "initial", n).await?;
    // The initial case's change events, read once: the broker's limit and the relay case.
    let plain = Plain::load(&w, n).await?;
    let limits = Limits::measure(&w, &plain).await?;
    println!("{initial} ratio={:.2}", rate / limits.composite());
    if !std::env::args().any(|a| a == "--relay-only") {
        let (line, rate) = case(&w, &producer, "unchanged", n).await?;
        println!("{line} ratio={:.2}", rate / limits.fetch);
        mutate(&sim_url, n / 10).await?;
        let (line, rate) = case(&w, &producer, "changed10", n).await?;
        println!("{line} ratio={:.2}", rate / limits.with_changed(0.1));
    }
    instance.stop()?;
    relay_case(&w, &plain, arg("--relay-trials", 3)).await?;
    w.clean_up().await;
    Ok(())
}

async fn million(n: usize) -> Result<(), Error> {
    let (_sim, sim_url) = simulator(n)?;
    let w = World::new(sim_url).await?;
    let instance = w.instance()?;
    w.wait_ready().await?;
    let producer = plain_producer()?;
    let (result_s, all_s, events, command_s) = w.run_command(&producer, "bench-million").await?;
    let peak = instance.peak_rss_mb();
    println!(
        "pipeline-bench: case=million products={n} result_s={result_s:.1} all_events_s={all_s:.1} \
         command_s={command_s:.1} events={events} peak_rss_mb={peak:.0}"
    );
    instance.stop()?;
    // A million rows take minutes a trial: one.
    relay_case(&w, &Plain::load(&w, n).await?, 1).await?;
    w.clean_up().await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    // `cargo bench` passes --bench; `cargo test --benches` would run it as a test: skip then.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    // As the binary does: the relay case runs the service's relay in this process.
    product_sync::allocator::return_freed_memory_at_once();
    let n = arg("--products", 100_000);
    let m = arg("--million", 1_000_000);
    three_cases(n).await?;
    if m > 0 {
        million(m).await?;
    }
    Ok(())
}
