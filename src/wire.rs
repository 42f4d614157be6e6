//! The wire contract: every shape product-sync sends to Kafka — change events (full and
//! reduced), result and rejected events, CloudEvents headers, `traceparent`, DLQ header names
//! and message keys — defined once, for the relay, the pipeline, the DLQ tools and the tests.
//!
//! A leaf module: it depends on nothing of product-sync but the pure diff and product types.

use rdkafka::message::{Header, Headers, OwnedHeaders};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::diff::FieldChange;
use crate::product::{Content, CreatedChanges, ProductJson, json_len};

/// Header names of every record product-sync produces.
pub mod headers {
    /// CloudEvents 1.0, Kafka protocol binding, binary mode.
    pub const CE_SPECVERSION: &str = "ce_specversion";
    pub const CE_ID: &str = "ce_id";
    pub const CE_TYPE: &str = "ce_type";
    pub const CE_SOURCE: &str = "ce_source";
    pub const CE_SUBJECT: &str = "ce_subject";
    pub const CE_TIME: &str = "ce_time";
    pub const CONTENT_TYPE: &str = "content-type";
    /// W3C trace context, carried from a command onto every event it causes.
    pub const TRACEPARENT: &str = "traceparent";
}

/// Header names of DLQ records (the original record's headers are kept beside them).
pub mod dlq {
    /// Every DLQ header starts with this; replays strip them.
    pub const PREFIX: &str = "dlq.";
    pub const REASON: &str = "dlq.reason";
    pub const ERROR_CLASS: &str = "dlq.error_class";
    pub const ERROR_KIND: &str = "dlq.error_kind";
    pub const ORIGINAL_TOPIC: &str = "dlq.original_topic";
    pub const ORIGINAL_PARTITION: &str = "dlq.original_partition";
    pub const ORIGINAL_OFFSET: &str = "dlq.original_offset";
    pub const FAILED_AT: &str = "dlq.failed_at";
}

/// Header names of a command on the retry topic (DESIGN.md "The retry topic").
pub mod retry {
    /// Every retry header starts with this; moving a command on replaces them, a DLQ replay
    /// strips them.
    pub const PREFIX: &str = "retry.";
    /// Which retry this is: 1 for the first.
    pub const ATTEMPT: &str = "retry.attempt";
    /// The earliest time the attempt may start (RFC 3339).
    pub const NOT_BEFORE: &str = "retry.not_before";
    /// Why the previous attempt failed (cut short).
    pub const REASON: &str = "retry.reason";
    /// `1` while the command waits out a pause of its system (no attempt used).
    pub const PAUSED: &str = "retry.paused";
}

/// A command's headers for its next attempt on the retry topic: the original ones (its
/// `traceparent` among them) without the previous attempt's `retry.*`, then the new ones.
pub fn for_retry<H: Headers>(
    original: Option<&H>,
    attempt: u32,
    not_before: &str,
    reason: &str,
    paused: bool,
) -> OwnedHeaders {
    let mut h = OwnedHeaders::new();
    if let Some(original) = original {
        for header in original
            .iter()
            .filter(|h| !h.key.starts_with(retry::PREFIX))
        {
            h = h.insert(Header {
                key: header.key,
                value: header.value,
            });
        }
    }
    let attempt = attempt.to_string();
    let reason = crate::text::quote(reason);
    let h = h
        .insert(Header {
            key: retry::ATTEMPT,
            value: Some(attempt.as_bytes()),
        })
        .insert(Header {
            key: retry::NOT_BEFORE,
            value: Some(not_before.as_bytes()),
        })
        .insert(Header {
            key: retry::REASON,
            value: Some(reason.as_bytes()),
        });
    match paused {
        true => h.insert(Header {
            key: retry::PAUSED,
            value: Some(b"1".as_slice()),
        }),
        false => h,
    }
}

/// Whether a dead-lettered command may succeed when replayed: `dlq.error_class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The cause may heal (the management system was down, throttled…): worth a replay.
    Transient,
    /// Replaying the same bytes fails the same way (a malformed command, a refused record).
    Permanent,
}

impl FailureClass {
    pub fn of(transient: bool) -> Self {
        if transient {
            FailureClass::Transient
        } else {
            FailureClass::Permanent
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Transient => "transient",
            FailureClass::Permanent => "permanent",
        }
    }

    /// The class a header value names.
    pub fn parse(value: &str) -> Option<Self> {
        [FailureClass::Transient, FailureClass::Permanent]
            .into_iter()
            .find(|c| c.as_str() == value)
    }
}

/// What failed: `dlq.error_kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The management system (after its retries), or what it sent.
    Upstream,
    /// The store refused the command's writes for good.
    Store,
    /// product-sync itself (a caught panic: a bug).
    Panic,
    /// A snapshot would have delisted more than `upstream.max_delist_ratio` allows.
    DelistGuard,
    /// The command could not be read; the kind of its parse error (`malformed_json`, …).
    Command(&'static str),
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Upstream => "upstream",
            FailureKind::Store => "store",
            FailureKind::Panic => "panic",
            FailureKind::DelistGuard => "delist_guard",
            FailureKind::Command(kind) => kind,
        }
    }
}

/// What the DLQ headers say about a dead-lettered record.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    /// Why; cut to [`DLQ_REASON_CHARS`] characters.
    pub reason: &'a str,
    pub class: FailureClass,
    pub kind: FailureKind,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// RFC 3339.
    pub failed_at: &'a str,
}

/// The longest reason a DLQ header carries.
pub const DLQ_REASON_CHARS: usize = 2000;

impl DeadLetter<'_> {
    /// The original record's headers (earlier `dlq.*` ones dropped) followed by the DLQ's.
    pub fn headers<H: Headers>(&self, original: Option<&H>) -> OwnedHeaders {
        let mut h = without_dlq(original);
        let reason: String = self.reason.chars().take(DLQ_REASON_CHARS).collect();
        let (partition, offset) = (self.partition.to_string(), self.offset.to_string());
        let pairs = [
            (dlq::REASON, reason.as_str()),
            (dlq::ERROR_CLASS, self.class.as_str()),
            (dlq::ERROR_KIND, self.kind.as_str()),
            (dlq::ORIGINAL_TOPIC, self.topic),
            (dlq::ORIGINAL_PARTITION, partition.as_str()),
            (dlq::ORIGINAL_OFFSET, offset.as_str()),
            (dlq::FAILED_AT, self.failed_at),
        ];
        for (key, value) in pairs {
            h = h.insert(Header {
                key,
                value: Some(value),
            });
        }
        h
    }
}

/// A record's headers without the DLQ's (a DLQ record keeps the retry topic's: they say how
/// many attempts the command had).
pub fn without_dlq<H: Headers>(original: Option<&H>) -> OwnedHeaders {
    without(original, &[dlq::PREFIX])
}

/// What a replay puts back on the request topic: the headers without the DLQ's and the retry
/// topic's (a replayed command starts its attempts over).
pub fn for_replay<H: Headers>(original: Option<&H>) -> OwnedHeaders {
    without(original, &[dlq::PREFIX, retry::PREFIX])
}

fn without<H: Headers>(original: Option<&H>, prefixes: &[&str]) -> OwnedHeaders {
    let mut h = OwnedHeaders::new();
    if let Some(original) = original {
        for header in original
            .iter()
            .filter(|h| !prefixes.iter().any(|p| h.key.starts_with(p)))
        {
            h = h.insert(Header {
                key: header.key,
                value: header.value,
            });
        }
    }
    h
}

/// `ce_source` of everything a deployment says about one management system.
pub fn ce_source(system: &str) -> String {
    format!("product-sync/{system}")
}

/// `ce_type` of a change event: `com.product-sync.product.<op>`.
pub fn change_ce_type(op: &str) -> String {
    format!("com.product-sync.product.{op}")
}

/// `ce_type` of a result event: `com.product-sync.request.<status>`.
pub fn result_ce_type(status: &str) -> String {
    format!("com.product-sync.request.{status}")
}

/// Key of a change event: `system/product_code` (or `system/name:<name>` without a code).
/// All events of one product share it, hence a partition, hence their order.
pub fn change_key(system: &str, product: &str) -> String {
    format!("{system}/{product}")
}

/// The CloudEvents attributes of one record.
#[derive(Debug, Clone, Copy)]
pub struct CloudEvent<'a> {
    pub id: &'a str,
    pub ce_type: &'a str,
    pub source: &'a str,
    pub subject: &'a str,
    /// RFC 3339.
    pub time: &'a str,
    pub traceparent: Option<&'a str>,
}

impl CloudEvent<'_> {
    /// The binary-mode headers, with `traceparent` when the command carried one.
    pub fn headers(&self) -> OwnedHeaders {
        let pairs = [
            (headers::CE_SPECVERSION, "1.0"),
            (headers::CE_ID, self.id),
            (headers::CE_TYPE, self.ce_type),
            (headers::CE_SOURCE, self.source),
            (headers::CE_SUBJECT, self.subject),
            (headers::CE_TIME, self.time),
            (headers::CONTENT_TYPE, "application/json"),
        ];
        let mut h = OwnedHeaders::new_with_capacity(pairs.len() + 1);
        for (key, value) in pairs {
            h = h.insert(Header {
                key,
                value: Some(value),
            });
        }
        if let Some(tp) = self.traceparent {
            h = h.insert(Header {
                key: headers::TRACEPARENT,
                value: Some(tp),
            });
        }
        h
    }
}

/// The change event published on `topics.changes` (DESIGN.md "Topics and messages"),
/// serialized straight from references: no copy of the product's JSON tree is made.
/// `product-sync schema` prints its JSON Schema.
#[derive(Serialize, schemars::JsonSchema)]
pub struct ChangeEvent<'a> {
    /// `created` or `updated`.
    pub op: &'a str,
    /// The management system.
    pub system: &'a str,
    /// Absent for products known by name only.
    pub product_code: Option<&'a str>,
    /// Grows by one with each change of this product; with `system` and the code it forms the
    /// CloudEvents id.
    pub revision: i64,
    /// The command that caused the change.
    pub request_id: Option<&'a str>,
    /// The changed fields (every field with a value, for `created`).
    #[schemars(with = "Vec<FieldChange>")]
    pub changes: Changes<'a>,
    /// The product before (`null` for `created`), in the contract's JSON form.
    #[schemars(with = "Value")]
    pub before: Option<ProductJson<'a>>,
    /// The product after (`null` for `delisted`), in the contract's JSON form.
    #[schemars(with = "Value")]
    pub after: Option<ProductJson<'a>>,
    /// The management system's `version` of `after`.
    pub source_version: i64,
    /// When the store changed (RFC 3339).
    pub changed_at: &'a str,
    /// Present and `true` only on an event published in the reduced form: values too large
    /// for the broker were replaced by `{"omitted_bytes": n}` (see [`reduce`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schemars(default)]
    pub reduced: bool,
}

/// A change event's `changes`: a diff already made, or a created product's fields written
/// straight from its content (the same bytes as [`crate::diff::created`]).
pub enum Changes<'a> {
    List(&'a [FieldChange]),
    Created(&'a Content),
}

impl Serialize for Changes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Changes::List(list) => list.serialize(serializer),
            Changes::Created(content) => CreatedChanges(content).serialize(serializer),
        }
    }
}

/// A record of the compacted state topic: the product's full current state at `revision`.
/// Key as on the change topic; a delisted product's record is a tombstone (no value).
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StateRecord<'a> {
    #[serde(borrow)]
    pub system: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    pub product_code: Option<std::borrow::Cow<'a, str>>,
    pub revision: i64,
    /// The product in the contract's JSON form (the change event's `after`).
    #[serde(borrow)]
    #[schemars(with = "Value")]
    pub product: &'a serde_json::value::RawValue,
    #[serde(borrow)]
    pub changed_at: std::borrow::Cow<'a, str>,
    /// Present and `true` when derived from a change event published reduced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schemars(default)]
    pub reduced: bool,
}

/// The fields of a change event the state record is made of.
#[derive(Deserialize)]
struct ChangeHead<'a> {
    #[serde(borrow)]
    op: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    system: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    product_code: Option<std::borrow::Cow<'a, str>>,
    revision: i64,
    #[serde(borrow)]
    after: &'a serde_json::value::RawValue,
    #[serde(borrow)]
    changed_at: std::borrow::Cow<'a, str>,
    #[serde(default)]
    reduced: bool,
}

/// The state-topic value for a change event (as published): the product's state after it,
/// or `None` — a tombstone — for a delisting. Reads only the fields it needs; `after` is
/// copied as it is, never parsed into a tree.
pub fn state_of(change_event: &str) -> Result<Option<String>, serde_json::Error> {
    let head: ChangeHead<'_> = serde_json::from_str(change_event)?;
    if head.op == "delisted" {
        return Ok(None);
    }
    serde_json::to_string(&StateRecord {
        system: head.system,
        product_code: head.product_code,
        revision: head.revision,
        product: head.after,
        changed_at: head.changed_at,
        reduced: head.reduced,
    })
    .map(Some)
}

/// Most product keys a dry run's result lists per kind of drift.
pub const DRIFT_SAMPLES: usize = 100;

/// What a dry run found different: product keys (as on the change topic), at most
/// [`DRIFT_SAMPLES`] per kind, `truncated` when there were more.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Drift {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub delisted: Vec<String>,
    pub relisted: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// A kind of drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftKind {
    Created,
    Updated,
    Delisted,
    Relisted,
}

impl Drift {
    /// Notes one product key.
    pub fn note(&mut self, kind: DriftKind, key: String) {
        let list = match kind {
            DriftKind::Created => &mut self.created,
            DriftKind::Updated => &mut self.updated,
            DriftKind::Delisted => &mut self.delisted,
            DriftKind::Relisted => &mut self.relisted,
        };
        if list.len() < DRIFT_SAMPLES {
            list.push(key);
        } else {
            self.truncated = true;
        }
    }

    /// Adds another page's drift.
    pub fn merge(&mut self, other: Drift) {
        self.truncated |= other.truncated;
        for (kind, keys) in [
            (DriftKind::Created, other.created),
            (DriftKind::Updated, other.updated),
            (DriftKind::Delisted, other.delisted),
            (DriftKind::Relisted, other.relisted),
        ] {
            for key in keys {
                self.note(kind, key);
            }
        }
    }
}

/// Product counts of a command.
#[derive(Debug, Clone, Copy, Default, Serialize, schemars::JsonSchema)]
pub struct Counts {
    pub fetched: i64,
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub stale: i64,
    /// Products a snapshot found gone and delisted.
    pub delisted: i64,
    /// Delisted products that came back.
    pub relisted: i64,
}

/// The result event on `topics.results`, one per command. `product-sync schema` prints its
/// JSON Schema.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ResultEvent {
    pub request_id: String,
    /// `completed`, `failed`, `rejected`, or `retrying` (a later result follows).
    pub status: String,
    pub counts: Counts,
    /// Pages fetched from the management system.
    pub pages: i32,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339.
    pub finished_at: Option<String>,
    /// Why it failed or was rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A stable name of the failure (`upstream`, `store`, `delist_guard`, or a rejected
    /// command's kind such as `unknown_field`), for scripts and alerts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// Present and `true` for a dry run: the counts are what it would have done.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schemars(default)]
    pub dry_run: bool,
    /// A dry run's drift: which products it would have changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<Drift>,
    /// A `retrying` result: which retry comes next (1 for the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// A `retrying` result: the earliest time that retry starts (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// Present and `true` only when published in the reduced form (see [`reduce`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schemars(default)]
    pub reduced: bool,
}

impl ResultEvent {
    /// The `rejected` result of a command that never became a request.
    pub fn rejected(request_id: &str, error: &str, kind: &str, at: &str) -> Self {
        ResultEvent {
            request_id: request_id.to_owned(),
            status: "rejected".to_owned(),
            counts: Counts::default(),
            pages: 0,
            started_at: at.to_owned(),
            finished_at: Some(at.to_owned()),
            error: Some(error.to_owned()),
            error_kind: Some(kind.to_owned()),
            dry_run: false,
            drift: None,
            attempt: None,
            next_attempt_at: None,
            reduced: false,
        }
    }

    /// The event as JSON text.
    pub fn to_json(&self) -> String {
        // Strings and integers only: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The CloudEvents id of a `rejected` result: unique per rejected record.
pub fn rejected_ce_id(request_id: &str, topic: &str, partition: i32, offset: i64) -> String {
    format!("{request_id}:rejected:{topic}:{partition}:{offset}")
}

/// The CloudEvents id of a request's result: one per finishing of the request.
pub fn result_ce_id(request_id: &str, finished_at_micros: i64) -> String {
    format!("{request_id}:{finished_at_micros}")
}

/// The top-level fields of an event that are never reduced: they identify it.
const KEPT: [&str; 10] = [
    "op",
    "system",
    "product_code",
    "revision",
    "request_id",
    "source_version",
    "changed_at",
    "status",
    "started_at",
    "finished_at",
];

/// Value-size thresholds tried in turn, largest first.
const THRESHOLDS: [usize; 5] = [16_384, 4_096, 1_024, 256, 64];

/// The reduced form of an event larger than `max_bytes` (DESIGN.md "The outbox relay at
/// scale"): field values larger than a threshold — inside `before`, `after`, each change's
/// `old`/`new`, and any other non-identifying field — are replaced by
/// `{"omitted_bytes": n}`, and `"reduced": true` is added. Thresholds go down from 16 KiB to
/// 64 bytes until the event fits; identifying fields (op, system, code, revision, request,
/// status, times) are never touched. `None` when `payload` already fits or is not a JSON
/// object; `Some` may still exceed `max_bytes` when even the smallest threshold is not
/// enough (the broker then refuses it and the relay parks it).
pub fn reduce(payload: &str, max_bytes: usize) -> Option<String> {
    if payload.len() <= max_bytes {
        return None;
    }
    let original: Value = serde_json::from_str(payload).ok()?;
    if !original.is_object() {
        return None;
    }
    let mut best = None;
    for threshold in THRESHOLDS {
        let mut event = original.clone();
        if let Value::Object(fields) = &mut event {
            for (name, value) in fields.iter_mut() {
                if !KEPT.contains(&name.as_str()) {
                    shrink(value, threshold, 0);
                }
            }
            fields.insert("reduced".to_owned(), Value::Bool(true));
        }
        let text = event.to_string();
        let fits = text.len() <= max_bytes;
        best = Some(text);
        if fits {
            break;
        }
    }
    best
}

/// Replaces, below `value`, every value whose JSON text exceeds `threshold` bytes by a
/// marker — descending into objects and arrays first, so small siblings survive. Containers
/// below the top-level fields (`before.attributes`, a change's `new`) are replaced whole when
/// they are still too large after their own children were shrunk.
fn shrink(value: &mut Value, threshold: usize, depth: usize) {
    let size = json_len(value);
    if size <= threshold {
        return;
    }
    match value {
        Value::Object(map) => {
            for child in map.values_mut() {
                shrink(child, threshold, depth + 1);
            }
        }
        Value::Array(items) => {
            for child in items.iter_mut() {
                shrink(child, threshold, depth + 1);
            }
        }
        _ => {
            *value = omitted(size);
            return;
        }
    }
    let after = json_len(value);
    if depth >= 1 && after > threshold {
        *value = omitted(after);
    }
}

fn omitted(bytes: usize) -> Value {
    serde_json::json!({ "omitted_bytes": bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_state_record_is_the_state_after_a_change_and_a_tombstone_after_a_delisting() {
        let after = json!({"product_code": "WM\"1", "product_name": "稳健", "nav": "1.10"});
        let event = json!({"op": "relisted", "system": "wms", "product_code": "WM\"1",
            "revision": 3, "request_id": "r", "changes": [], "before": {}, "after": after,
            "source_version": 2, "changed_at": "2026-11-30T00:00:00Z"});
        let state: Value =
            serde_json::from_str(&state_of(&event.to_string()).unwrap().unwrap()).unwrap();
        assert_eq!(
            state,
            json!({"system": "wms", "product_code": "WM\"1", "revision": 3, "product": after,
                "changed_at": "2026-11-30T00:00:00Z"})
        );
        let delisted = json!({"op": "delisted", "system": "wms", "product_code": "WM1",
            "revision": 4, "changes": [], "before": after, "after": null,
            "source_version": 2, "changed_at": "t"});
        assert_eq!(state_of(&delisted.to_string()).unwrap(), None);
        assert!(state_of("{not json").is_err());
    }

    fn big_event(attr_bytes: usize) -> String {
        let big = "x".repeat(attr_bytes);
        json!({
            "op": "updated", "system": "wms", "product_code": "WM1", "revision": 7,
            "request_id": "r1",
            "changes": [{"field": "attributes.blob", "old": null, "new": big},
                        {"field": "nav", "old": "1.0", "new": "1.1"}],
            "before": {"product_code": "WM1", "nav": "1.0", "attributes": {}},
            "after": {"product_code": "WM1", "nav": "1.1", "attributes": {"blob": big}},
            "source_version": 3, "changed_at": "2026-11-28T00:00:00Z"
        })
        .to_string()
    }

    #[test]
    fn an_event_that_fits_is_not_reduced() {
        assert_eq!(reduce(&big_event(10), 10_000), None);
    }

    #[test]
    fn a_large_value_is_replaced_and_small_ones_kept() {
        let event = big_event(200_000);
        let reduced = reduce(&event, 20_000).expect("reduced");
        assert!(reduced.len() <= 20_000, "{} bytes", reduced.len());
        let v: Value = serde_json::from_str(&reduced).unwrap();
        assert_eq!(v["reduced"], json!(true));
        assert_eq!(v["revision"], json!(7));
        assert_eq!(v["product_code"], json!("WM1"));
        assert_eq!(v["after"]["nav"], json!("1.1"));
        assert_eq!(v["changes"][1]["new"], json!("1.1"));
        assert_eq!(
            v["after"]["attributes"]["blob"]["omitted_bytes"],
            json!(200_002)
        );
        assert_eq!(v["changes"][0]["new"]["omitted_bytes"], json!(200_002));
    }

    #[test]
    fn many_small_values_are_replaced_by_their_container() {
        let attrs: serde_json::Map<String, Value> =
            (0..5000).map(|i| (format!("k{i}"), json!("v"))).collect();
        let event = json!({"op": "created", "revision": 1, "changes": [],
            "before": null, "after": {"product_code": "A", "attributes": attrs}})
        .to_string();
        let reduced = reduce(&event, 2_000).expect("reduced");
        assert!(reduced.len() <= 2_000, "{} bytes", reduced.len());
        let v: Value = serde_json::from_str(&reduced).unwrap();
        assert_eq!(v["after"]["product_code"], json!("A"));
        assert!(v["after"]["attributes"]["omitted_bytes"].as_u64().unwrap() > 2_000);
    }

    #[test]
    fn a_result_with_a_huge_error_is_reduced_the_same_way() {
        let mut result = ResultEvent::rejected(
            "r-1",
            &"e".repeat(2_000_000),
            "bad_json",
            "2026-11-28T00:00:00Z",
        );
        result.status = "failed".into();
        let reduced = reduce(&result.to_json(), 10_000).expect("reduced");
        let v: Value = serde_json::from_str(&reduced).unwrap();
        assert_eq!(v["request_id"], json!("r-1"));
        assert_eq!(v["status"], json!("failed"));
        assert_eq!(v["reduced"], json!(true));
        assert!(v["error"]["omitted_bytes"].as_u64().unwrap() > 2_000_000);
        assert_eq!(v["counts"]["fetched"], json!(0));
    }

    #[test]
    fn identifying_fields_are_never_reduced() {
        let event = json!({"op": "updated", "request_id": "r".repeat(5000), "revision": 2,
            "after": {"x": "y".repeat(5000)}})
        .to_string();
        let reduced = reduce(&event, 6_000).expect("reduced");
        let v: Value = serde_json::from_str(&reduced).unwrap();
        assert_eq!(v["request_id"].as_str().unwrap().len(), 5000);
        assert!(v["after"]["x"]["omitted_bytes"].is_number());
    }

    #[test]
    fn headers_carry_every_cloudevents_attribute_and_the_trace() {
        let h = CloudEvent {
            id: "wms:A:1",
            ce_type: &change_ce_type("created"),
            source: &ce_source("wms"),
            subject: "A",
            time: "2026-11-28T00:00:00Z",
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        }
        .headers();
        let names: Vec<&str> = h.iter().map(|h| h.key).collect();
        assert_eq!(
            names,
            [
                headers::CE_SPECVERSION,
                headers::CE_ID,
                headers::CE_TYPE,
                headers::CE_SOURCE,
                headers::CE_SUBJECT,
                headers::CE_TIME,
                headers::CONTENT_TYPE,
                headers::TRACEPARENT
            ]
        );
    }
}
