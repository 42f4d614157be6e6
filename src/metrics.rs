//! Metrics in Prometheus form, one registry per process: commands by status, products by
//! outcome, fetch and fold latency, relay throughput, retries by cause, consumer lag, and the
//! outbox backlog (measured at scrape time). Served by the ops endpoint at `/metrics`.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric of product-sync.
pub struct Metrics {
    pub registry: Registry,
    /// Commands handled, by final status (`completed`, `failed`, `rejected`, `repeated`).
    pub commands: IntCounterVec,
    /// Products folded, by outcome (`created`, `updated`, `unchanged`, `stale`).
    pub products: IntCounterVec,
    /// Time to fetch one page from the management system (retries included), by system.
    pub fetch_seconds: HistogramVec,
    /// Requests sent to each management system, by outcome (`ok`, `server_error`,
    /// `transport`, `throttled`, `refused`).
    pub upstream_requests: IntCounterVec,
    /// 1 while a system's circuit is open (or half-open), else 0.
    pub circuit_open: IntGaugeVec,
    /// Times a system's circuit opened.
    pub circuit_opened: IntCounterVec,
    /// Commands moved to the retry topic, by system.
    pub retried_commands: IntCounterVec,
    /// Time to fold one page into the store (retries included).
    pub fold_seconds: Histogram,
    /// Events the relay published, by kind (`change`, `result`).
    pub published: IntCounterVec,
    /// Transient failures retried, by operation.
    pub retries: IntCounterVec,
    /// Consumer lag of each assigned request-topic partition (from librdkafka statistics).
    pub consumer_lag: IntGaugeVec,
    /// Unpublished change rows at the last scrape.
    pub outbox_backlog: IntGauge,
    /// Age in seconds of the oldest unpublished change row at the last scrape.
    pub outbox_oldest_age_seconds: IntGauge,
    /// Outbox rows parked after a permanent refusal by the broker (cluster-wide).
    pub outbox_parked: IntGauge,
    /// Events published in the reduced form, by kind.
    pub reduced: IntCounterVec,
    /// Relay shards this instance publishes.
    pub relay_shards_held: IntGauge,
    /// Scheduled slots, by system, kind (`incremental`, `snapshot`, `drift`) and outcome
    /// (`published`, `skipped`).
    pub schedule_runs: IntCounterVec,
    /// Seconds since a completed incremental last confirmed each system's watermark.
    pub watermark_age: IntGaugeVec,
    /// What the last drift check of each system would have changed, by kind (`created`,
    /// `updated`, `delisted`, `relisted`): non-zero means the copy drifted.
    pub drift_products: IntGaugeVec,
    /// 1 while this instance holds the scheduler's lease.
    pub scheduler_leader: IntGauge,
    /// Notifications read, by system (`unknown` when it could not be told) and outcome
    /// (`accepted`, `rejected`).
    pub notifications: IntCounterVec,
    /// Commands made from notifications, by system.
    pub notification_commands: IntCounterVec,
    /// Times the shared producer failed for good and a new one took over.
    pub producer_renewals: IntCounterVec,
    /// Codes read from notifications and not yet published in a command (this instance).
    pub notification_pending: IntGauge,
    /// The most codes ever waiting at once in this instance (bounded by
    /// `notifications.max_pending_codes`).
    pub notification_pending_peak: IntGauge,
    /// Times a notification partition paused because `max_pending_codes` codes were waiting.
    pub notification_pauses: IntCounterVec,
    /// Commands sent to the dead-letter topic, by failure kind.
    pub dead_letters: IntCounterVec,
    /// 1 while this instance is ready (`/readyz`: store, broker, management system, group).
    pub ready: IntGauge,
    /// The relay's shards (`pipeline.relay_shards`): together the instances hold them all.
    pub relay_shards: IntGauge,
    /// 1 per configured schedule, by system and kind (`incremental`, `snapshot`, `drift`).
    pub schedules: IntGaugeVec,
    /// Each system's `incremental_every`, in seconds (for the watermark's alert bound).
    pub schedule_interval: IntGaugeVec,
}

/// The kinds of `product_sync_drift_products`, in the order [`set_drift`] takes them.
pub const DRIFT_KINDS: [&str; 4] = ["created", "updated", "delisted", "relisted"];

/// Sets one system's drift gauges (counts in [`DRIFT_KINDS`] order).
pub fn set_drift(system: &str, counts: [i64; 4]) {
    for (kind, n) in DRIFT_KINDS.iter().zip(counts) {
        metrics()
            .drift_products
            .with_label_values(&[system, kind])
            .set(n);
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    let buckets = vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    h
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    h
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

// The names and label sets above are constants: registering them cannot fail at run time
// except by a programming error caught by the first test that touches `metrics()`.
static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let consumer_lag = IntGaugeVec::new(
        Opts::new(
            "product_sync_consumer_lag",
            "Consumer lag per request-topic partition",
        ),
        &["topic", "partition"],
    )
    .unwrap_or_else(|e| panic!("metric consumer_lag: {e}"));
    registry
        .register(Box::new(consumer_lag.clone()))
        .unwrap_or_else(|e| panic!("metric consumer_lag: {e}"));
    let m = Metrics {
        commands: counter(
            &registry,
            "product_sync_commands_total",
            "Commands handled, by status",
            &["status"],
        ),
        products: counter(
            &registry,
            "product_sync_products_total",
            "Products folded, by outcome",
            &["outcome"],
        ),
        fetch_seconds: histogram_vec(
            &registry,
            "product_sync_fetch_page_seconds",
            "Time to fetch one page, by management system",
            &["system"],
        ),
        upstream_requests: counter(
            &registry,
            "product_sync_upstream_requests_total",
            "Requests sent to a management system, by outcome",
            &["system", "outcome"],
        ),
        circuit_open: gauge_vec(
            &registry,
            "product_sync_upstream_circuit_open",
            "1 while a management system's circuit is open or half-open",
            &["system"],
        ),
        circuit_opened: counter(
            &registry,
            "product_sync_upstream_circuit_opened_total",
            "Times a management system's circuit opened",
            &["system"],
        ),
        retried_commands: counter(
            &registry,
            "product_sync_commands_retried_total",
            "Commands moved to the retry topic, by management system",
            &["system"],
        ),
        fold_seconds: histogram(
            &registry,
            "product_sync_fold_page_seconds",
            "Time to fold one page",
        ),
        published: counter(
            &registry,
            "product_sync_relay_published_total",
            "Events published by the relay",
            &["kind"],
        ),
        retries: counter(
            &registry,
            "product_sync_retries_total",
            "Transient failures retried, by operation",
            &["operation"],
        ),
        consumer_lag,
        outbox_backlog: gauge(
            &registry,
            "product_sync_outbox_backlog",
            "Events (change and result) queued for the relay",
        ),
        outbox_oldest_age_seconds: gauge(
            &registry,
            "product_sync_outbox_oldest_age_seconds",
            "Age of the oldest event queued for the relay",
        ),
        outbox_parked: gauge(
            &registry,
            "product_sync_outbox_parked",
            "Outbox rows parked after a permanent refusal by the broker",
        ),
        reduced: counter(
            &registry,
            "product_sync_relay_reduced_total",
            "Events published in the reduced form (larger than pipeline.max_event_bytes)",
            &["kind"],
        ),
        relay_shards_held: gauge(
            &registry,
            "product_sync_relay_shards_held",
            "Relay shards this instance publishes",
        ),
        schedule_runs: counter(
            &registry,
            "product_sync_schedule_runs_total",
            "Scheduled slots, by system, kind and outcome (published, skipped)",
            &["system", "kind", "outcome"],
        ),
        watermark_age: gauge_vec(
            &registry,
            "product_sync_watermark_age_seconds",
            "Seconds since a completed incremental last confirmed the watermark",
            &["system"],
        ),
        drift_products: gauge_vec(
            &registry,
            "product_sync_drift_products",
            "What the last drift check would have changed, by system and kind",
            &["system", "kind"],
        ),
        scheduler_leader: gauge(
            &registry,
            "product_sync_scheduler_leader",
            "1 while this instance holds the scheduler lease",
        ),
        notifications: counter(
            &registry,
            "product_sync_notifications_total",
            "Change notifications read, by system and outcome (accepted, rejected)",
            &["system", "outcome"],
        ),
        notification_commands: counter(
            &registry,
            "product_sync_notification_commands_total",
            "Commands made from coalesced notifications, by system",
            &["system"],
        ),
        producer_renewals: counter(
            &registry,
            "product_sync_producer_renewals_total",
            "Times the shared Kafka producer failed for good (a librdkafka fatal error) and a new one took over",
            &[],
        ),
        notification_pending: gauge(
            &registry,
            "product_sync_notification_pending_codes",
            "Codes read from notifications and not yet published in a command",
        ),
        notification_pending_peak: gauge(
            &registry,
            "product_sync_notification_pending_codes_peak",
            "The most notification codes that waited at once in this instance",
        ),
        notification_pauses: counter(
            &registry,
            "product_sync_notification_pauses_total",
            "Times a notification partition paused at notifications.max_pending_codes",
            &["topic"],
        ),
        dead_letters: counter(
            &registry,
            "product_sync_dead_letters_total",
            "Commands sent to the dead-letter topic, by failure kind",
            &["kind"],
        ),
        ready: gauge(
            &registry,
            "product_sync_ready",
            "1 while this instance is ready (store, broker, management system, consumer group)",
        ),
        relay_shards: gauge(
            &registry,
            "product_sync_relay_shards",
            "The relay's shards (pipeline.relay_shards); together the instances hold them all",
        ),
        schedules: gauge_vec(
            &registry,
            "product_sync_schedules",
            "1 per configured schedule, by system and kind",
            &["system", "kind"],
        ),
        schedule_interval: gauge_vec(
            &registry,
            "product_sync_schedule_interval_seconds",
            "Each system's incremental_every, in seconds",
            &["system"],
        ),
        registry,
    };
    // Label-less, so exported at 0 from the start (a vector without children exports nothing,
    // and its alert could not tell "none yet" from "not exported").
    m.producer_renewals.with_label_values(&[] as &[&str]);
    m
});

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buffer = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&metrics().registry.gather(), &mut buffer) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(buffer).unwrap_or_default()
}
