//! Smoke tests against the real broker: topics through the AdminClient, a produce/consume
//! round trip through a consumer group, a manual commit read back from the broker, and the shared
//! producer made again after a fatal error.

use std::collections::HashMap;
use std::time::Duration;

use product_sync::kafka::{
    Publisher, TopicSpec, client_config, ensure_topics, producer_config, wait_for_broker,
};
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;

use crate::helpers::{require_kafka, unique, wait_for};

#[tokio::test]
async fn topics_are_created_once_and_described_by_the_broker() {
    let settings = require_kafka().await;
    wait_for_broker(&settings, Duration::from_secs(10))
        .await
        .expect("broker ready");
    let topic = unique("smoke-topics");
    let spec = [TopicSpec {
        name: topic.clone(),
        partitions: 3,
        replication_factor: 1,
        compacted: false,
    }];
    ensure_topics(&settings, &spec).await.expect("create topic");
    // A second call finds it existing and succeeds.
    ensure_topics(&settings, &spec)
        .await
        .expect("create topic again");

    let admin: AdminClient<DefaultClientContext> = client_config(&settings).create().unwrap();
    let metadata = admin
        .inner()
        .fetch_metadata(Some(&topic), Duration::from_secs(5))
        .expect("metadata");
    let described = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .expect("topic listed");
    assert_eq!(described.partitions().len(), 3);
    admin
        .delete_topics(&[&topic], &AdminOptions::new())
        .await
        .expect("delete topic");
}

#[tokio::test]
async fn produce_consume_commit_and_read_the_committed_offset_back() {
    let settings = require_kafka().await;
    let topic = unique("smoke-roundtrip");
    ensure_topics(
        &settings,
        &[TopicSpec {
            name: topic.clone(),
            partitions: 2,
            replication_factor: 1,
            compacted: false,
        }],
    )
    .await
    .expect("create topic");

    let producer: FutureProducer = client_config(&settings)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer");
    let sent = 20usize;
    for i in 0..sent {
        let key = format!("k{i}");
        let payload = format!("{{\"n\":{i},\"name\":\"理财产品{i}\"}}");
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivery acknowledged");
    }

    let consumer: StreamConsumer = client_config(&settings)
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let mut seen = Vec::new();
    let mut next_offsets: HashMap<i32, i64> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < sent {
        let msg = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("only {} of {sent} messages arrived within 30 s", seen.len())
            })
            .expect("consume");
        let payload = std::str::from_utf8(msg.payload().unwrap())
            .unwrap()
            .to_owned();
        next_offsets.insert(msg.partition(), msg.offset() + 1);
        seen.push(payload);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), sent, "every message exactly once");
    assert!(
        seen.iter().any(|p| p.contains("理财产品7")),
        "UTF-8 payloads survive"
    );

    let mut to_commit = TopicPartitionList::new();
    for (partition, offset) in &next_offsets {
        to_commit
            .add_partition_offset(&topic, *partition, Offset::Offset(*offset))
            .unwrap();
    }
    consumer
        .commit(&to_commit, CommitMode::Sync)
        .expect("commit");

    // Read the committed offsets back from the group coordinator.
    let committed = wait_for("committed offsets", Duration::from_secs(10), || {
        let consumer = &consumer;
        async move {
            let list = consumer.committed(Duration::from_secs(5)).ok()?;
            let total: i64 = list
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .sum();
            (total == sent as i64).then_some(total)
        }
    })
    .await;
    assert_eq!(committed, sent as i64);
}

/// An idempotent producer that failed for good (librdkafka's fatal error: here raised through
/// its testing hook, in the chaos run by a sequence desynchronization after a connection
/// reset) refuses every message from then on. The shared producer makes a new one: the send
/// that met the fatal error fails, the next one is acknowledged by the broker.
#[tokio::test]
async fn the_shared_producer_is_made_again_after_a_fatal_error() {
    let settings = require_kafka().await;
    let topic = unique("smoke-fatal");
    ensure_topics(
        &settings,
        &[TopicSpec {
            name: topic.clone(),
            partitions: 1,
            replication_factor: 1,
            compacted: false,
        }],
    )
    .await
    .expect("create topic");
    let publisher = Publisher::create(producer_config(&settings, 900_000)).expect("producer");
    let send = |n: u32| {
        let (publisher, topic) = (publisher.clone(), topic.clone());
        async move {
            let payload = format!("message {n}");
            publisher
                .send(
                    FutureRecord::to(&topic).key("k").payload(&payload),
                    Timeout::After(Duration::from_secs(30)),
                )
                .await
                .map_err(|(e, _)| e)
        }
    };
    send(1).await.expect("a healthy producer is acknowledged");
    let first = publisher.current();
    let reason = std::ffi::CString::new("the test's fatal error").expect("no NUL");
    // SAFETY: the client pointer is valid while `first` lives; librdkafka copies the reason.
    let raised = unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            first.client().native_ptr(),
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        )
    };
    assert_eq!(
        raised,
        rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
        "librdkafka raised the fatal error"
    );
    let refused = send(2).await.expect_err("the dead producer refuses");
    assert_eq!(refused.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal));
    assert!(first.client().fatal_error().is_some());
    assert_ne!(
        publisher.current().client().native_ptr(),
        first.client().native_ptr(),
        "a new producer took over"
    );
    send(3).await.expect("the new producer is acknowledged");
}
