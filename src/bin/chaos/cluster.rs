//! The cluster chaos run's world (`--cluster`): the three-broker cluster `deploy/local/kafka.sh
//! up --brokers 3` runs, reached through the Toxiproxy `deploy/local/toxiproxy.sh up` runs;
//! the faults only it can make — `kill -9` of a busy partition's leader, and network toxics
//! (latency, bandwidth limits, connections reset, black holes) on each link.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use product_sync::config::Settings;
use product_sync::kafka::client_config;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where the cluster and its proxies are, as `kafka.sh` and `toxiproxy.sh` left them.
pub struct Cluster {
    /// The nodes' PLAINTEXT listeners: what the run's own readers and writers use.
    pub plaintext: String,
    /// The nodes' listeners behind Toxiproxy: what the instances use.
    pub proxied: String,
    /// `kafka-cluster-<port>`, where each node keeps its pid.
    dir: PathBuf,
    pub toxiproxy: Toxiproxy,
    /// The PostgreSQL proxy's port.
    pub pg_port: u16,
}

impl Cluster {
    /// Reads `client.properties` (written by `kafka.sh up --brokers 3`) and checks that
    /// Toxiproxy answers; names the command that starts what is missing.
    pub async fn find() -> anyhow::Result<Self> {
        let cache = std::env::var_os("PRODUCT_SYNC_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/product-sync"))
            })
            .context("neither PRODUCT_SYNC_CACHE nor HOME is set")?;
        let port = env_or("KAFKA_CLUSTER_PORT", "19092");
        let dir = cache.join(format!("kafka-cluster-{port}"));
        let file = dir.join("client.properties");
        let text = std::fs::read_to_string(&file).with_context(|| {
            format!(
                "{} is missing: start the cluster with deploy/local/kafka.sh up --brokers 3",
                file.display()
            )
        })?;
        let props: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let get = |key: &str| {
            props
                .get(key)
                .map(|v| (*v).to_owned())
                .with_context(|| format!("{} has no {key}", file.display()))
        };
        let toxiproxy = Toxiproxy::new(&format!(
            "http://127.0.0.1:{}",
            env_or("TOXIPROXY_PORT", "8474")
        ))?;
        toxiproxy
            .check()
            .await
            .context("Toxiproxy does not answer: start it with deploy/local/toxiproxy.sh up")?;
        // A run that ended early may have left a toxic in place.
        toxiproxy.reset().await?;
        Ok(Cluster {
            plaintext: get("plaintext.bootstrap")?,
            proxied: get("proxied.bootstrap")?,
            dir,
            toxiproxy,
            pg_port: env_or("TOXI_PG_PORT", "15432")
                .parse()
                .context("TOXI_PG_PORT is not a port")?,
        })
    }

    /// The node leading a random partition of `topic` (every command writes to the change
    /// topic, so each of its partitions is busy).
    pub async fn busy_leader(
        &self,
        settings: &Settings,
        topic: &str,
        rng: &mut StdRng,
    ) -> anyhow::Result<i32> {
        let config = client_config(&settings.kafka);
        let topic = topic.to_owned();
        let leaders = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<i32>> {
            let consumer: BaseConsumer = config.create()?;
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(30))?;
            Ok(metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions())
                .map(|p| p.leader())
                .filter(|l| *l > 0)
                .collect())
        })
        .await??;
        if leaders.is_empty() {
            bail!("no partition of the change topic has a leader");
        }
        Ok(leaders[rng.gen_range(0..leaders.len())])
    }

    /// `kill -9` of node `id` (its pid from `kafka.sh`'s pid file); waits until it is gone.
    pub async fn kill_node(&self, id: i32) -> anyhow::Result<()> {
        let file = self.dir.join(format!("node-{id}/kafka.pid"));
        let pid = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let pid = pid.trim();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", pid])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while runs(pid) {
            if Instant::now() > deadline {
                bail!("node {id} (pid {pid}) still runs 30 s after kill -9");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

/// Whether a process runs: a zombie (killed, not yet reaped by a parent that may never reap
/// it, as a container's first process may not) has stopped running.
fn runs(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| !matches!(state, 'Z' | 'X')),
        Err(_) => false,
    }
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// Toxiproxy's HTTP API, the parts the run uses.
#[derive(Clone)]
pub struct Toxiproxy {
    api: String,
    http: reqwest::Client,
}

impl Toxiproxy {
    fn new(api: &str) -> anyhow::Result<Self> {
        Ok(Toxiproxy {
            api: api.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    async fn check(&self) -> anyhow::Result<()> {
        self.http
            .get(format!("{}/version", self.api))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Removes every toxic from every proxy (and enables them all).
    async fn reset(&self) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/reset", self.api))
            .send()
            .await?
            .error_for_status()
            .context("resetting Toxiproxy's toxics")?;
        Ok(())
    }

    /// A proxy of this name on a free port in front of `upstream` (replacing one of the same
    /// name); returns the address it listens on.
    pub async fn proxy(&self, name: &str, upstream: &str) -> anyhow::Result<String> {
        let _ = self.delete(name).await;
        let body =
            json!({"name": name, "listen": "127.0.0.1:0", "upstream": upstream, "enabled": true});
        let created: Value = self
            .http
            .post(format!("{}/proxies", self.api))
            .json(&body)
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("creating proxy {name}"))?
            .json()
            .await?;
        created["listen"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("Toxiproxy did not say where proxy {name} listens"))
    }

    pub async fn delete(&self, name: &str) -> anyhow::Result<()> {
        self.http
            .delete(format!("{}/proxies/{name}", self.api))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    async fn add_toxic(&self, proxy: &str, toxic: &Value) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/proxies/{proxy}/toxics", self.api))
            .json(toxic)
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("adding a toxic to {proxy}"))?;
        Ok(())
    }

    /// Removes a toxic, asking again while Toxiproxy cannot (it answers 503 after 10 s when
    /// a link's reader does not take the data held back: full cluster run, seed 3); a toxic
    /// already gone counts as removed, and one that stays is cleared by the reset when the
    /// faults stop, so the run goes on either way.
    async fn remove_toxic_patiently(&self, proxy: &str, name: &str) {
        for attempt in 1..=5 {
            match self.remove_toxic(proxy, name).await {
                Ok(()) => return,
                Err(e) => {
                    eprintln!(
                        "chaos: removing toxic {name} from {proxy} (attempt {attempt}): {e:#}"
                    );
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }

    /// Removes every toxic left (when the faults stop); passes `counts` through.
    async fn clear(&self, counts: [u32; 4]) -> [u32; 4] {
        if let Err(e) = self.reset().await {
            eprintln!("chaos: clearing the toxics left: {e:#}");
        }
        counts
    }

    async fn remove_toxic(&self, proxy: &str, name: &str) -> anyhow::Result<()> {
        let response = self
            .http
            .delete(format!("{}/proxies/{proxy}/toxics/{name}", self.api))
            .send()
            .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        response
            .error_for_status()
            .with_context(|| format!("removing toxic {name} from {proxy}"))?;
        Ok(())
    }
}

/// The kinds of network fault, by the name of their Toxiproxy toxic.
const KINDS: [&str; 4] = ["latency", "bandwidth", "reset_peer", "timeout"];

/// Network faults on a schedule of their own, beside the process faults: one link at a time
/// gets a toxic for 2–15 s, then a pause of 1–5 s.
pub struct NetFaults {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<[u32; 4]>>,
}

impl NetFaults {
    pub fn spawn(toxiproxy: Toxiproxy, links: Vec<String>, seed: u64) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(net_faults(toxiproxy, links, seed, stop.clone()));
        NetFaults { stop, task }
    }

    /// Stops the faults, removing the one in place; returns how many of each kind there were.
    pub async fn stop(self) -> anyhow::Result<[u32; 4]> {
        self.stop.cancel();
        self.task.await?
    }
}

/// One toxic of kind `kind`, drawn from the seed: latency 200–2000 ms, bandwidth 8–256 KB/s,
/// connections reset after 0–1000 ms, or a black hole (data held until the toxic goes, or the
/// connection closed after 3–20 s).
fn toxic(kind: usize, name: &str, rng: &mut StdRng) -> Value {
    let attributes = match KINDS[kind] {
        "latency" => {
            let latency = rng.gen_range(200..=2000);
            json!({"latency": latency, "jitter": latency / 10})
        }
        "bandwidth" => json!({"rate": rng.gen_range(8..=256)}),
        "reset_peer" => json!({"timeout": rng.gen_range(0..=1000)}),
        _ if rng.gen_bool(0.5) => json!({"timeout": 0}),
        _ => json!({"timeout": rng.gen_range(3_000..=20_000)}),
    };
    let stream = if rng.gen_bool(0.5) {
        "downstream"
    } else {
        "upstream"
    };
    json!({"name": name, "type": KINDS[kind], "stream": stream, "toxicity": 1.0, "attributes": attributes})
}

async fn net_faults(
    toxiproxy: Toxiproxy,
    links: Vec<String>,
    seed: u64,
    stop: CancellationToken,
) -> anyhow::Result<[u32; 4]> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7011c);
    let mut counts = [0u32; 4];
    let pause = |rng: &mut StdRng, ms: std::ops::Range<u64>| {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(ms)))
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(toxiproxy.clear(counts).await),
            _ = pause(&mut rng, 1_000..5_000) => {}
        }
        let link = &links[rng.gen_range(0..links.len())];
        let kind = rng.gen_range(0..KINDS.len());
        let name = format!("chaos-{}", counts.iter().sum::<u32>());
        let toxic = toxic(kind, &name, &mut rng);
        toxiproxy.add_toxic(link, &toxic).await?;
        counts[kind] += 1;
        eprintln!("chaos: net fault on {link}: {toxic}");
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = pause(&mut rng, 2_000..15_000) => {}
        }
        toxiproxy.remove_toxic_patiently(link, &name).await;
        if stop.is_cancelled() {
            return Ok(toxiproxy.clear(counts).await);
        }
    }
}

/// Names the kinds with their counts, for the run's summary.
pub fn describe(counts: &[u32; 4]) -> String {
    KINDS
        .iter()
        .zip(counts)
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_process_not_yet_reaped_has_stopped_running() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        let pid = child.id().to_string();
        assert!(runs(&pid), "a sleeping child runs");
        child.kill().expect("kill -9");
        // Not reaped (no wait yet): the child stays a zombie, which has stopped running.
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs(&pid) {
            assert!(
                Instant::now() < deadline,
                "pid {pid} still runs after kill -9"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the zombie is still there"
        );
        child.wait().expect("reaped");
        assert!(!runs(&pid));
        assert!(runs(&std::process::id().to_string()));
    }
}
