//! Command-line tools around the service: `request` publishes a command, `notify` a change
//! notification, `tail` follows a
//! topic and pretty-prints its events, `schema` prints the JSON Schemas of the messages.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::command::{Command, CommandWire, Since};
use crate::config::Settings;
use crate::kafka::{KafkaError, client_config, plain_producer_config};

/// Errors of the tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("the command would be rejected: {0}")]
    Invalid(#[from] crate::command::CommandError),
    #[error("the notification would be refused: {0}")]
    InvalidNotification(#[from] crate::pipeline::notifications::NotificationError),
    #[error("notifications are disabled (topics.notifications is empty)")]
    NotificationsDisabled,
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

/// Builds, validates and publishes a command; returns its request id.
pub async fn request(settings: &Settings, mut wire: CommandWire) -> Result<String, ToolError> {
    if wire.request_id.is_empty() {
        wire.request_id = format!("req-{}", uuid::Uuid::new_v4().simple());
    }
    let request_id = wire.request_id.clone();
    let systems: Vec<String> = settings.all_systems().map(|u| u.system.clone()).collect();
    wire.system = Some(
        wire.system
            .unwrap_or_else(|| settings.upstream.system.clone()),
    );
    // Refuse here what the service would refuse, with the same message.
    Command::validate_among(wire.clone(), &settings.upstream.system, &systems)?;
    let body = serde_json::to_string(&wire).unwrap_or_default();
    let producer: FutureProducer = plain_producer_config(&settings.kafka)
        .set("enable.idempotence", "true")
        .create()
        .map_err(KafkaError::Client)?;
    producer
        .send(
            FutureRecord::to(&settings.topics.requests)
                .key(&request_id)
                .payload(&body),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| KafkaError::Other(e))?;
    Ok(request_id)
}

/// Publishes a change notification naming `codes` (of `system`, default `upstream.system`)
/// on `topics.notifications`, keyed by its first code; returns the topic.
pub async fn notify(
    settings: &Settings,
    system: Option<String>,
    codes: Vec<String>,
) -> Result<String, ToolError> {
    let topic = &settings.topics.notifications;
    if topic.is_empty() {
        return Err(ToolError::NotificationsDisabled);
    }
    let mut body = json!({ "product_codes": codes });
    if let Some(system) = system {
        body["system"] = Value::String(system);
    }
    let body = body.to_string();
    // Refuse here what the service would refuse, with the same message.
    let systems: Vec<String> = settings.all_systems().map(|u| u.system.clone()).collect();
    crate::pipeline::notifications::Notification::parse(
        Some(body.as_bytes()),
        &settings.upstream.system,
        &systems,
    )?;
    let producer: FutureProducer = plain_producer_config(&settings.kafka)
        .set("enable.idempotence", "true")
        .create()
        .map_err(KafkaError::Client)?;
    let key = codes.first().cloned().unwrap_or_default();
    producer
        .send(
            FutureRecord::to(topic).key(&key).payload(&body),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| KafkaError::Other(e))?;
    Ok(topic.clone())
}

/// Parses `--since` (RFC 3339).
pub fn parse_since(s: &str) -> Result<Since, String> {
    if s == crate::command::WATERMARK {
        return Ok(Since::Watermark);
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| Since::At(t.with_timezone(&Utc)))
        .map_err(|e| {
            format!(
                "{s:?} is neither \"watermark\" nor an RFC 3339 time such as \
                 2026-11-01T00:00:00Z: {e}"
            )
        })
}

/// Follows `topic`, printing each record (key, CloudEvents id and type, pretty JSON) until
/// `stop` fires or `count` records were printed.
pub async fn tail(
    settings: &Settings,
    topic: &str,
    from_beginning: bool,
    count: Option<usize>,
    stop: CancellationToken,
) -> Result<usize, ToolError> {
    let consumer: StreamConsumer = client_config(&settings.kafka)
        .set(
            "group.id",
            format!(
                "{}-tail-{}",
                settings.kafka.group_id,
                uuid::Uuid::new_v4().simple()
            ),
        )
        .set("enable.auto.commit", "false")
        // Only what the relay committed: never a record of an aborted transaction.
        .set("isolation.level", "read_committed")
        .set(
            "auto.offset.reset",
            if from_beginning { "earliest" } else { "latest" },
        )
        .create()
        .map_err(KafkaError::Client)?;
    consumer.subscribe(&[topic]).map_err(KafkaError::Other)?;
    let mut printed = 0;
    while count.is_none_or(|n| printed < n) {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            m = consumer.recv() => m.map_err(KafkaError::Other)?,
        };
        let key = message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let mut headers = serde_json::Map::new();
        if let Some(h) = message.headers() {
            for h in h.iter() {
                headers.insert(
                    h.key.to_owned(),
                    json!(h.value.map(|v| String::from_utf8_lossy(v).into_owned())),
                );
            }
        }
        let value: Value = message
            .payload()
            .map(|p| {
                serde_json::from_slice(p).unwrap_or_else(|_| json!(String::from_utf8_lossy(p)))
            })
            .unwrap_or(Value::Null);
        let summary = summarize(&value);
        println!(
            "── {topic}[{}]@{}  key={key}  {summary}",
            message.partition(),
            message.offset()
        );
        if !headers.is_empty() {
            println!("   headers: {}", Value::Object(headers));
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        printed += 1;
    }
    Ok(printed)
}

fn summarize(v: &Value) -> String {
    match (v.get("op"), v.get("status")) {
        (Some(op), _) => {
            let fields: Vec<&str> = v["changes"]
                .as_array()
                .map(|c| c.iter().filter_map(|c| c["field"].as_str()).collect())
                .unwrap_or_default();
            format!(
                "{} revision {} ({} field(s): {})",
                op.as_str().unwrap_or("?"),
                v["revision"],
                fields.len(),
                fields.join(", ")
            )
        }
        (None, Some(status)) => format!(
            "{} {}",
            v["request_id"].as_str().unwrap_or("?"),
            status.as_str().unwrap_or("?")
        ),
        _ => String::new(),
    }
}

/// JSON Schemas of the command, the change event and the result event, generated from the
/// Rust types the service uses.
pub fn schemas() -> Value {
    json!({
        "command": schemars::schema_for!(CommandWire),
        "change_event": schemars::schema_for!(crate::wire::ChangeEvent<'static>),
        "result_event": schemars::schema_for!(crate::wire::ResultEvent),
    })
}
