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
//! `chaos: seed=<s> kills=<n> sigterms=<n> broker_restarts=<n> db_restarts=<n> bad_commands=<n> hostile_commands=<n> products=<n> lost=<n> doubled=<n> gaps=<n> stalled=<n> leaked_secrets=<n> crashes=<n> unclean_exits=<n> out_of_order=<n> max_stall_s=<n> repeats=<n> withdrawn=<n> delisted=<n> wrongly_delisted=<n> system_outages=<n> fund_products=<n> notifications=<n> notification_commands=<n> leader_kills=<n> net_faults=<n>`
//!
//! With `--cluster` it runs on the three-broker cluster (replication factor 3,
//! `min.insync.replicas=2`) with every link of the instances behind Toxiproxy, and adds
//! `kill -9` of partition leaders (`leader_kills`) and network toxics (`net_faults`); see
//! [`cluster`].
//!
//! A second management system, `fund`, gets every fourth command; the schedule takes it
//! down for 15–40 s at a time (`system_outages`) while `wms` carries on: its commands must
//! heal through the retry topic, its products match its own catalogue at the end.
//!
//! Every other step of the stream sends a burst of change notifications (either system,
//! single codes and lists, many twice, now and then a bad one): every notified code must be
//! asked for by a command made from notifications (else it counts as lost), every bad one
//! must be in the DLQ with its reason, and no notification partition may be left behind.
//!
//! Exit status 1 when any of lost, doubled, gaps, stalled, leaked_secrets, crashes,
//! unclean_exits, out_of_order is above zero, or max_stall_s above [`MAX_STALL`]; repeats —
//! identical re-publications seen by the audit, which reads committed records — too with
//! `pipeline.exactly_once` (the default; without it they are allowed and only reported).
//! Run it through `deploy/local/chaos.sh [--short] [--cluster] [--seed S]`.

use std::collections::BTreeSet;

mod checks;
mod cluster;
mod schedule;
mod stalls;
mod world;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use product_sync::config::Settings;
use product_sync::kafka::plain_producer_config;
use product_sync::sim::Faults;
use product_sync::wire::FailureClass;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

const SECRET: &str = "chaos-client-secret-5d1b7f";
/// The second management system's secret (searched for in logs and records too).
const FUND_SECRET: &str = "chaos-fund-secret-93c0aa";

struct Options {
    short: bool,
    /// The three-broker cluster behind Toxiproxy, with leader kills and network faults.
    cluster: bool,
    seed: u64,
    repo: PathBuf,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        short: false,
        cluster: false,
        seed: 1,
        repo: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--short" => o.short = true,
            "--cluster" => o.cluster = true,
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
                "unknown argument {other:?}; usage: product-sync-chaos [--short] [--cluster] [--seed S] [--repo DIR]"
            ),
        }
        i += 1;
    }
    Ok(o)
}

/// The `product-sync run` processes, by slot.
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

/// Thirty-odd kinds of malformed command.
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
    let group = format!("chaos-reader-{}", uuid::Uuid::new_v4().simple());
    let consumer = product_sync::kafka::reader(&settings.kafka, &group)?;
    Ok(product_sync::dlq::read_until_end(
        &settings.kafka,
        &consumer,
        topic,
        false,
    )?)
}

fn json_of(m: &OwnedMessage) -> Value {
    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let run = RunPlan::of(&o);
    let world = world::World::set_up(&o, run.products).await?;
    let mut instances = world.instances()?;
    for slot in 0..3 {
        instances.start(slot)?;
    }
    let stall_watch = stalls::StallWatch::start(&world.settings, PARTITIONS);
    let producer: FutureProducer = plain_producer_config(&world.settings.kafka)
        .set("enable.idempotence", "true")
        .create()?;
    let stream = world::CommandStream::spawn(&world, &producer, o.seed);
    let net = world
        .cluster
        .as_ref()
        .map(|c| cluster::NetFaults::spawn(c.toxiproxy.clone(), world.links.clone(), o.seed));
    let mut faults = schedule::Schedule::new(&o, &run);
    faults
        .run(&world, &mut instances, &producer, run.run_for)
        .await?;
    let net_faults = match net {
        Some(net) => net.stop().await?,
        None => [0; 4],
    };
    let streamed = stream.stop().await?;
    let (mut good, bad_sent) = (streamed.good, streamed.bad);
    world.sim.set_faults(Faults::default());
    world.fund.set_faults(Faults::default());
    for slot in 0..3 {
        instances.start(slot)?;
    }
    good.extend(final_round(&producer, &world.settings).await?);
    let awaited = Awaited {
        good: &good,
        hostile: &faults.hostile_ids,
    };
    let results = drain(&world.settings, &awaited, run.drain, &mut instances).await?;
    let max_stall = stall_watch.stop().await?;
    let sent = checks::Sent {
        good: &good,
        bad: &bad_sent,
        hostile: &faults.hostile_ids,
        withdrawn: &streamed.withdrawn,
        notified: &streamed.notified,
        bad_notifications: &streamed.bad_notifications,
    };
    wind_down(&world, &sent, &mut instances).await?;
    let verdict = checks::Verdict::of(&world, &sent, &results).await?;
    if let Err(e) = world.remove_proxies().await {
        // The verdict stands; a proxy left only listens, idle, until Toxiproxy stops.
        eprintln!("chaos: removing this run's proxies: {e:#}");
    }
    world.sim_stop.cancel();
    let counts = Counts {
        bad_commands: bad_sent.len(),
        notifications: streamed.notifications,
        net_faults: net_faults.iter().sum(),
    };
    result_line(o.seed, &faults, &instances, &verdict, max_stall, &counts);
    eprintln!(
        "chaos: scale changes {}, good commands {}, change events {}, net faults {}, logs in {}",
        faults.scale_changes,
        good.len(),
        verdict.events,
        cluster::describe(&net_faults),
        world.dir.display()
    );
    let clean_run = instances.crashes + instances.unclean_exits == 0 && max_stall <= MAX_STALL;
    if !verdict.passed() || !clean_run {
        std::process::exit(1);
    }
    Ok(())
}

/// Lets the relay and the notification consumers finish, then stops the instances cleanly.
async fn wind_down(
    world: &world::World,
    sent: &checks::Sent<'_>,
    instances: &mut world::Instances,
) -> anyhow::Result<()> {
    checks::settle(world, sent, SETTLE).await?;
    instances.restart_the_dead()?;
    for slot in 0..3 {
        instances.terminate(slot);
    }
    // Rows queued after the settle stay queued, durably: a scheduled command that fired
    // meanwhile, or a row whose shard was moving between two stopping instances. One
    // instance started again holds every shard and publishes them, as the next holder would.
    if checks::queued(world).await? > 0 {
        eprintln!("chaos: rows queued after the settle; one instance publishes them");
        instances.start(0)?;
        checks::settle(world, sent, SETTLE).await?;
        instances.terminate(0);
    }
    Ok(())
}

/// Upstream settles; a last round asks for every selector once more and takes a snapshot of
/// the whole catalogue (delisting what was withdrawn), so the store's final state can be
/// compared with the final truth. Returns the commands' ids.
async fn final_round(
    producer: &FutureProducer,
    settings: &Settings,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for (i, selector) in selectors().iter().enumerate() {
        let id = format!("chaos-final-{i}");
        send_command(producer, settings, &id, selector).await?;
        ids.push(id);
    }
    let last = [
        json!({"request_id": "chaos-final-fund", "system": "fund", "selector": {"all": true}}),
        json!({"request_id": "chaos-final-snapshot", "selector": {"all": true}, "mode": "snapshot"}),
    ];
    for body in last {
        let id = body["request_id"].as_str().unwrap_or_default().to_owned();
        producer
            .send(
                FutureRecord::to(&settings.topics.requests)
                    .key(&id)
                    .payload(&body.to_string()),
                Duration::from_secs(60),
            )
            .await
            .map_err(|(e, _)| e)?;
        ids.push(id);
    }
    Ok(ids)
}

/// What the run sent and did besides the schedule's faults.
struct Counts {
    bad_commands: usize,
    notifications: usize,
    net_faults: u32,
}

/// Prints the run's one result line, then the change topic's problems if any.
fn result_line(
    seed: u64,
    faults: &schedule::Schedule,
    instances: &world::Instances,
    verdict: &checks::Verdict,
    max_stall: Duration,
    counts: &Counts,
) {
    let max_stall_s = max_stall.as_secs();
    let Counts {
        bad_commands,
        notifications,
        net_faults,
    } = counts;
    println!(
        "chaos: seed={seed} kills={} sigterms={} broker_restarts={} db_restarts={} bad_commands={bad_commands} hostile_commands={} products={} lost={} doubled={} gaps={} stalled={} leaked_secrets={} crashes={} unclean_exits={} out_of_order={} max_stall_s={max_stall_s} repeats={} withdrawn={} delisted={} wrongly_delisted={} system_outages={} fund_products={} notifications={notifications} notification_commands={} leader_kills={} net_faults={net_faults}",
        faults.kills,
        faults.sigterms,
        faults.broker_restarts,
        faults.db_restarts,
        faults.hostile_ids.len(),
        verdict.products,
        verdict.lost,
        verdict.doubled,
        verdict.gaps,
        verdict.stalled,
        verdict.leaked_secrets,
        instances.crashes,
        instances.unclean_exits,
        verdict.out_of_order,
        verdict.repeats,
        verdict.withdrawn,
        verdict.delisted,
        verdict.wrongly_delisted,
        faults.system_outages,
        verdict.fund_products,
        verdict.notification_commands,
        faults.leader_kills,
    );
    for (part, n) in &verdict.lost_parts {
        eprintln!("chaos: lost: {part}={n}");
    }
    for problem in &verdict.problems {
        eprintln!("chaos: change topic: {problem}");
    }
}

/// How long the instances may take, once every good command has completed, to publish what
/// is still queued and turn the last notifications into commands.
const SETTLE: Duration = Duration::from_secs(120);

/// Partitions of the run's request topic.
const PARTITIONS: i32 = 12;

/// The longest a partition with commands pending may go without progress: the upstream retry
/// budget the instances run with (60 s), a session timeout (6 s) and a broker or database
/// restart, with room to spare. Above it the run fails.
const MAX_STALL: Duration = Duration::from_secs(180);

/// How long and how large this run is.
struct RunPlan {
    products: usize,
    /// How long faults are scheduled (then any kind left out is forced once).
    run_for: Duration,
    min_kills: u32,
    /// How long the system may take to settle once the faults stop.
    drain: Duration,
}

impl RunPlan {
    fn of(o: &Options) -> Self {
        if o.short {
            RunPlan {
                products: 5_000,
                run_for: Duration::from_secs(150),
                min_kills: 6,
                drain: Duration::from_secs(600),
            }
        } else {
            RunPlan {
                products: 50_000,
                run_for: Duration::from_secs(900),
                min_kills: 20,
                drain: Duration::from_secs(1800),
            }
        }
    }
}

/// Waits until every good command has a completed result (failed ones are replayed from the
/// DLQ, as an operator would) or `within` passes; returns every result record read. An
/// instance that dies meanwhile is counted and restarted.
/// The commands the drain waits for: every good one completed, every hostile one ended
/// (completed or failed; one sent late in the run may still be at its retry budget when the
/// good ones are done, and the verdict counts an unended one as stalled).
struct Awaited<'a> {
    good: &'a [String],
    hostile: &'a [String],
}

async fn drain(
    settings: &Settings,
    awaited: &Awaited<'_>,
    within: Duration,
    instances: &mut world::Instances,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let deadline = Instant::now() + within;
    let mut last_replay = Instant::now() - Duration::from_secs(60);
    loop {
        let records = read_all(settings, &settings.topics.results)?;
        let results: Vec<Value> = records.iter().map(json_of).collect();
        let completed = with_status(&results, &["completed"]);
        let ended = with_status(&results, &["completed", "failed"]);
        let done = awaited
            .good
            .iter()
            .all(|id| completed.contains(id.as_str()))
            && awaited.hostile.iter().all(|id| ended.contains(id.as_str()));
        if done || Instant::now() > deadline {
            return Ok(records);
        }
        // Each DLQ record is replayed once: replay remembers its place.
        if results.iter().any(|r| r["status"] == "failed")
            && last_replay.elapsed() > Duration::from_secs(20)
        {
            let n = product_sync::dlq::replay(settings, Some(FailureClass::Transient)).await?;
            if n > 0 {
                eprintln!("chaos: replayed {n} failed command(s) from the DLQ");
            }
            last_replay = Instant::now();
        }
        instances.restart_the_dead()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// The request ids of the results with one of these statuses.
fn with_status<'a>(results: &'a [Value], statuses: &[&str]) -> BTreeSet<&'a str> {
    results
        .iter()
        .filter(|r| statuses.iter().any(|s| r["status"] == *s))
        .filter_map(|r| r["request_id"].as_str())
        .collect()
}
