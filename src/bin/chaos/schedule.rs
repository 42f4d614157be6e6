//! The fault schedule: every few seconds a fault drawn from the seed — kill -9, SIGTERM,
//! 3 → 1 → 3 scaling, a broker or database restart, a hostile management system for one
//! command, the second management system down for a while, a burst of simulator faults, and
//! with `--cluster` the kill of a partition leader. Once the scheduled time is up, every kind
//! the dice left out is forced once (and kills up to the minimum).

use std::time::{Duration, Instant};

use product_sync::sim::{Faults, Hostile};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::FutureProducer;
use serde_json::json;

use crate::world::{Instances, World, script};
use crate::{HOSTILE_KEYWORD, Options, RunPlan, send_command};

/// What the schedule did, counted.
pub struct Schedule {
    rng: StdRng,
    min_kills: u32,
    pub kills: u32,
    pub sigterms: u32,
    pub broker_restarts: u32,
    pub db_restarts: u32,
    /// Partition leaders killed (`--cluster` only).
    pub leader_kills: u32,
    cluster: bool,
    pub scale_changes: u32,
    pub sim_faults: u32,
    /// Times the second management system went down for a while.
    pub system_outages: u32,
    /// The commands aimed at a hostile management system.
    pub hostile_ids: Vec<String>,
}

impl Schedule {
    pub fn new(o: &Options, run: &RunPlan) -> Self {
        Schedule {
            rng: StdRng::seed_from_u64(o.seed),
            min_kills: run.min_kills,
            kills: 0,
            sigterms: 0,
            broker_restarts: 0,
            db_restarts: 0,
            leader_kills: 0,
            cluster: o.cluster,
            scale_changes: 0,
            sim_faults: 0,
            system_outages: 0,
            hostile_ids: Vec::new(),
        }
    }

    /// The roll that forces the first kind of fault not seen yet, if any.
    fn missing(&self) -> Option<u32> {
        [
            (self.kills < self.min_kills || self.kills == 0, 0),
            (self.sigterms == 0, 45),
            (self.scale_changes == 0, 55),
            (self.broker_restarts == 0, 62),
            (self.db_restarts == 0, 70),
            (self.hostile_ids.is_empty(), 78),
            (self.system_outages == 0, 85),
            (self.sim_faults == 0, 92),
            (self.cluster && self.leader_kills == 0, 100),
        ]
        .into_iter()
        .find_map(|(missing, roll)| missing.then_some(roll))
    }

    /// Injects faults for `run_for`, then until every kind has happened.
    pub async fn run(
        &mut self,
        world: &World,
        instances: &mut Instances,
        producer: &FutureProducer,
        run_for: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let overtime = started.elapsed() >= run_for;
            let missing = self.missing();
            if overtime && missing.is_none() {
                return Ok(());
            }
            self.pause(2_000..6_000).await;
            // The cluster adds leader kills to the dice (100..=114).
            let sides = if self.cluster { 115 } else { 100 };
            let roll = match missing {
                Some(roll) if overtime => roll,
                _ => self.rng.gen_range(0..sides),
            };
            let alive = instances.alive();
            match roll {
                0..=44 if !alive.is_empty() => self.kill(instances, &alive).await?,
                45..=54 if !alive.is_empty() => self.sigterm(instances, &alive)?,
                55..=61 => self.scale_down_and_up(instances).await?,
                62..=69 => self.restart(world, "kafka.sh").await?,
                70..=77 => self.restart(world, "postgres.sh").await?,
                78..=84 => self.hostile(world, producer).await?,
                85..=91 => self.system_outage(world).await,
                100.. => self.leader_kill(world).await?,
                _ => self.sim_fault(world).await,
            }
            instances.restart_the_dead()?;
        }
    }

    async fn pause(&mut self, millis: std::ops::Range<u64>) {
        tokio::time::sleep(Duration::from_millis(self.rng.gen_range(millis))).await;
    }

    async fn kill(&mut self, instances: &mut Instances, alive: &[usize]) -> anyhow::Result<()> {
        let slot = alive[self.rng.gen_range(0..alive.len())];
        instances.signal(slot, "KILL");
        instances.reap(slot, Duration::from_secs(10));
        self.kills += 1;
        self.pause(200..4_000).await;
        instances.start(slot)
    }

    fn sigterm(&mut self, instances: &mut Instances, alive: &[usize]) -> anyhow::Result<()> {
        let slot = alive[self.rng.gen_range(0..alive.len())];
        instances.terminate(slot);
        self.sigterms += 1;
        instances.start(slot)
    }

    /// 3 → 1 → 3.
    async fn scale_down_and_up(&mut self, instances: &mut Instances) -> anyhow::Result<()> {
        for slot in [1, 2] {
            instances.terminate(slot);
            self.sigterms += 1;
        }
        self.scale_changes += 1;
        self.pause(3_000..10_000).await;
        (0..3).try_for_each(|slot| instances.start(slot))
    }

    /// The broker (with `--cluster`, all three nodes at once) or the database, down and up.
    async fn restart(&mut self, world: &World, service: &str) -> anyhow::Result<()> {
        let nodes: &[&str] = match service {
            "kafka.sh" if self.cluster => &["--brokers", "3"],
            _ => &[],
        };
        script(world, service, &[&["down"], nodes].concat())?;
        self.pause(1_000..6_000).await;
        script(world, service, &[&["up"], nodes].concat())?;
        match service {
            "kafka.sh" => self.broker_restarts += 1,
            _ => self.db_restarts += 1,
        }
        Ok(())
    }

    /// `kill -9` of the node leading a busy partition, then (after 2–10 s with two nodes, which
    /// `min.insync.replicas=2` still lets write) the node started again.
    async fn leader_kill(&mut self, world: &World) -> anyhow::Result<()> {
        let Some(cluster) = &world.cluster else {
            return Ok(());
        };
        let leader = cluster
            .busy_leader(
                &world.settings,
                &world.settings.topics.changes,
                &mut self.rng,
            )
            .await?;
        eprintln!("chaos: kill -9 of node {leader}, a leader of the change topic");
        cluster.kill_node(leader).await?;
        self.leader_kills += 1;
        self.pause(2_000..10_000).await;
        script(world, "kafka.sh", &["up", "--brokers", "3"])
    }

    /// A hostile management system, for one command aimed at it: the command must end
    /// (failed, or completed when tolerated) and never hold its partition.
    async fn hostile(&mut self, world: &World, producer: &FutureProducer) -> anyhow::Result<()> {
        let mode = Hostile::ALL[self.rng.gen_range(0..Hostile::ALL.len())];
        world.sim.set_faults(Faults {
            hostile: Some(mode),
            hostile_keyword: Some(HOSTILE_KEYWORD.into()),
            ..Faults::default()
        });
        let id = format!("chaos-hostile-{}", self.hostile_ids.len());
        let selector = json!({"keyword": HOSTILE_KEYWORD});
        send_command(producer, &world.settings, &id, &selector).await?;
        self.hostile_ids.push(id);
        self.pause(4_000..10_000).await;
        world.sim.set_faults(Faults::default());
        Ok(())
    }

    /// The second management system down (503 for everything) for 15–40 s: its circuit
    /// opens, its commands move to the retry topic, the other system's go on.
    async fn system_outage(&mut self, world: &World) {
        world.fund.set_faults(Faults {
            down: true,
            ..Faults::default()
        });
        self.pause(15_000..40_000).await;
        world.fund.set_faults(Faults::default());
        self.system_outages += 1;
    }

    /// A burst of 500s, 429s, latency or dropped connections.
    async fn sim_fault(&mut self, world: &World) {
        let faults = match self.rng.gen_range(0..4) {
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
        world.sim.set_faults(faults);
        self.pause(2_000..8_000).await;
        world.sim.set_faults(Faults::default());
        self.sim_faults += 1;
    }
}
