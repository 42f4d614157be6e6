//! `dlq replay`: every record goes back to the request topic once, as it was (key, payload,
//! the original headers without the DLQ's), and `--only <class>` leaves the other class's
//! records for a later replay.

use std::time::Duration;

use product_sync::dlq::replay;
use product_sync::wire::{DeadLetter, FailureClass, FailureKind, dlq as dlqh};
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::pipeline::world;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_only_transient_keeps_the_permanent_records_for_later_and_replays_each_once() {
    let w = world(10, 1).await;
    let records = [
        ("t-1", FailureClass::Transient, FailureKind::Upstream),
        (
            "p-1",
            FailureClass::Permanent,
            FailureKind::Command("malformed_json"),
        ),
        ("t-2", FailureClass::Transient, FailureKind::Upstream),
    ];
    for (key, class, kind) in records {
        let original = OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        });
        let headers = DeadLetter {
            reason: "why",
            class,
            kind,
            topic: &w.settings.topics.requests,
            partition: 0,
            offset: 7,
            failed_at: "2026-11-30T00:00:00Z",
        }
        .headers(Some(&original));
        let payload = format!("{{\"payload-of\":\"{key}\"}}");
        w.producer
            .send(
                FutureRecord::to(&w.settings.topics.dlq)
                    .key(key)
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("dead-letter a record");
    }

    let only = |class| replay(&w.settings, Some(class));
    assert_eq!(only(FailureClass::Transient).await.unwrap(), 2);
    assert_eq!(only(FailureClass::Transient).await.unwrap(), 0, "once");
    let replayed = w.read_all(&w.settings.topics.requests).await;
    let keys: Vec<&[u8]> = replayed.iter().filter_map(|m| m.key()).collect();
    assert_eq!(keys, [b"t-1".as_slice(), b"t-2".as_slice()]);

    // The permanent record was left for later: a plain replay takes it, and only it.
    assert_eq!(replay(&w.settings, None).await.unwrap(), 1);
    assert_eq!(replay(&w.settings, None).await.unwrap(), 0, "once");
    assert_eq!(only(FailureClass::Permanent).await.unwrap(), 0, "once");
    let replayed = w.read_all(&w.settings.topics.requests).await;
    assert_eq!(replayed.len(), 3);
    for m in &replayed {
        let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
        assert_eq!(
            m.payload().unwrap(),
            format!("{{\"payload-of\":\"{key}\"}}").as_bytes(),
            "{key}: the original bytes"
        );
        let headers: Vec<(String, Vec<u8>)> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(headers.len(), 1, "{key}: {headers:?}");
        assert_eq!(headers[0].0, "traceparent");
        assert!(!headers.iter().any(|(k, _)| k.starts_with(dlqh::PREFIX)));
    }
}
