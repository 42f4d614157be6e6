//! Stalls, measured while the run goes on: every two seconds, for each partition of the
//! request topic, the group's committed offset against the partition's end. A partition with
//! commands pending whose committed offset does not move is stalled; the longest such stretch
//! is the run's `max_stall_s`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use product_sync::config::Settings;
use product_sync::kafka::client_config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often the partitions are looked at.
const EVERY: Duration = Duration::from_secs(2);

pub struct StallWatch {
    stop: CancellationToken,
    task: JoinHandle<Duration>,
}

impl StallWatch {
    pub fn start(settings: &Settings, partitions: i32) -> Self {
        let stop = CancellationToken::new();
        let (settings, stopped) = (settings.clone(), stop.clone());
        let task = tokio::task::spawn_blocking(move || watch(&settings, partitions, &stopped));
        StallWatch { stop, task }
    }

    /// Stops watching; the longest stall seen.
    pub async fn stop(mut self) -> anyhow::Result<Duration> {
        self.stop.cancel();
        Ok((&mut self.task).await?)
    }
}

/// A run that ends early with an error stops the watch too: its blocking thread would hold
/// the runtime's shutdown, and the error would never be printed.
impl Drop for StallWatch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn watch(settings: &Settings, partitions: i32, stop: &CancellationToken) -> Duration {
    let Some(mut consumer) = watch_client(settings) else {
        return Duration::MAX;
    };
    let topic = &settings.topics.requests;
    // Per partition: the committed offset last seen and since when it has not moved while
    // commands were pending.
    let mut since: HashMap<i32, (i64, Instant)> = HashMap::new();
    let mut longest = Duration::ZERO;
    // Since when no partition could be looked at (the run's faults, or a client stuck after
    // them: full cluster seed 3 saw nothing for 15 minutes while the instances went on).
    let mut blind: Option<Instant> = None;
    while !stop.is_cancelled() {
        let mut seen_any = false;
        for p in 0..partitions {
            // While the broker does not answer, the stretch goes on.
            let Ok((committed, high)) = position(&consumer, topic, p, Duration::from_secs(5))
            else {
                continue;
            };
            seen_any = true;
            let now = Instant::now();
            match since.get(&p) {
                Some((seen, from)) if *seen == committed && committed < high => {
                    longest = longest.max(now - *from);
                }
                ended => {
                    if let Some((at, from)) = ended {
                        report(p, *at, now - *from);
                    }
                    if committed >= high {
                        since.remove(&p);
                    } else {
                        since.insert(p, (committed, now));
                    }
                }
            }
        }
        match (seen_any, blind) {
            (true, Some(from)) => {
                if from.elapsed() >= REPORTED {
                    eprintln!(
                        "chaos: the stall watch saw no partition for {} s",
                        from.elapsed().as_secs()
                    );
                }
                blind = None;
            }
            (false, None) => blind = Some(Instant::now()),
            (false, Some(from)) if from.elapsed() >= REPORTED => {
                // A fresh client finds the coordinator and the leaders anew.
                if let Some(fresh) = watch_client(settings) {
                    consumer = fresh;
                }
            }
            _ => {}
        }
        std::thread::sleep(EVERY);
    }
    longest
}

/// The watch's client: it reads the group's committed offsets, as a member would.
fn watch_client(settings: &Settings) -> Option<BaseConsumer> {
    let consumer = client_config(&settings.kafka)
        .set("group.id", &settings.kafka.group_id)
        .create()
        .ok();
    if consumer.is_none() {
        eprintln!("chaos: the stall watch could not create its client");
    }
    consumer
}

/// A stretch long enough to look into, on the run's log: the partition, the offset it stood
/// at, when it began (UTC) and when the partition was next seen past it — while the broker
/// does not answer nothing is seen, so this can exceed `max_stall_s`, which counts only the
/// time seen standing.
fn report(partition: i32, offset: i64, lasted: Duration) {
    if lasted >= REPORTED {
        let began = chrono::Utc::now() - lasted;
        eprintln!(
            "chaos: request partition {partition} stood at offset {offset} from {} until seen moving {} s later",
            began.format("%H:%M:%S"),
            lasted.as_secs()
        );
    }
}

/// Stretches at least this long are reported as they end.
const REPORTED: Duration = Duration::from_secs(30);

/// The group's committed offset (0 when none) and the end of a partition.
pub fn position(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<(i64, i64), KafkaError> {
    let (_, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    let committed = match consumer
        .committed_offsets(list, timeout)?
        .find_partition(topic, partition)
        .map(|e| e.offset())
    {
        Some(Offset::Offset(o)) => o,
        _ => 0,
    };
    Ok((committed, high))
}
