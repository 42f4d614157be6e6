//! The outbox relay: publishes change rows (`product_changes`) and finished requests' results
//! to Kafka, in id order, with an idempotent producer, and marks them published only after the
//! broker acknowledged them.
//!
//! Delivery guarantee: at least once. A row is marked only after its event was acked, so a
//! crash between ack and mark re-publishes it — with the same CloudEvents id
//! (`system:code:revision`), so consumers can drop the repeat. Events of one product share a
//! key (hence a partition) and are produced in revision order.
//!
//! One relay publishes at a time: on PostgreSQL the leader holds a session advisory lock on a
//! connection of its own; when its process dies the connection closes, the lock is released
//! and another instance's relay takes over. On SQLite (one embedded process) it always leads.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sea_orm::sea_query::Expr;
use sea_orm::sqlx::{Connection, PgConnection};
use sea_orm::{
    ColumnTrait, DatabaseBackend, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::entity::product_changes;
use crate::store::{StoreError, requests};

/// Advisory-lock key of the relay leader (any constant unique to this service).
const RELAY_LOCK_KEY: i64 = 7_262_646_173_790_002;

/// Errors of one relay round.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing to {topic} failed: {source}")]
    Publish {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("relay leadership lock: {0}")]
    Lock(String),
}

impl RelayError {
    /// Every relay error heals by retrying the round (nothing was marked).
    pub fn is_transient(&self) -> bool {
        match self {
            RelayError::Store(e) => e.is_transient(),
            RelayError::Publish { .. } | RelayError::Lock(_) => true,
        }
    }
}

/// What one round published.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub changes: usize,
    pub results: usize,
}

/// Publishes the outbox.
pub struct Relay {
    db: DatabaseConnection,
    database_url: SecretString,
    producer: FutureProducer,
    changes_topic: String,
    results_topic: String,
    batch: u64,
    interval: Duration,
    /// Woken by the pipeline after a command committed, for low latency.
    wake: Arc<Notify>,
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: DatabaseConnection,
        database_url: SecretString,
        producer: FutureProducer,
        changes_topic: String,
        results_topic: String,
        batch: u64,
        interval: Duration,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            db,
            database_url,
            producer,
            changes_topic,
            results_topic,
            batch,
            interval,
            wake,
        }
    }

    /// Runs until `stop`: wins leadership, then publishes whenever there is something to.
    /// After `stop` the leader makes one last round, so a clean shutdown leaves nothing behind.
    pub async fn run(&self, stop: CancellationToken) {
        let mut failures = 0u32;
        let mut lock: Option<PgConnection> = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            match self.lead(&mut lock).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!("another instance's relay is publishing");
                    self.idle(&stop, self.interval * 5).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay cannot take leadership; retrying");
                    lock = None;
                    self.idle(&stop, backoff(failures)).await;
                    failures = failures.saturating_add(1);
                    continue;
                }
            }
            match self.publish_round().await {
                Ok(p) if p.changes == 0 && p.results == 0 => {
                    failures = 0;
                    self.idle(&stop, self.interval).await;
                }
                Ok(p) => {
                    failures = 0;
                    tracing::debug!(changes = p.changes, results = p.results, "relay published");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay round failed; nothing was marked, retrying");
                    self.idle(&stop, backoff(failures)).await;
                    failures = failures.saturating_add(1);
                }
            }
        }
        if lock.is_some() || self.db.get_database_backend() != DatabaseBackend::Postgres {
            match self.drain().await {
                Ok(p) => tracing::info!(
                    changes = p.changes,
                    results = p.results,
                    "relay drained at shutdown"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "relay could not drain at shutdown; the next leader will publish")
                }
            }
        }
    }

    async fn idle(&self, stop: &CancellationToken, wait: Duration) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }

    /// Is this relay the leader? Holds (or takes) the advisory lock on its own connection.
    async fn lead(&self, lock: &mut Option<PgConnection>) -> Result<bool, RelayError> {
        if self.db.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(true);
        }
        if let Some(conn) = lock.as_mut() {
            // Still connected means still holding the lock.
            if sea_orm::sqlx::query("SELECT 1")
                .execute(&mut *conn)
                .await
                .is_ok()
            {
                return Ok(true);
            }
            *lock = None;
        }
        let mut conn = PgConnection::connect(self.database_url.expose_secret())
            .await
            .map_err(|e| RelayError::Lock(e.to_string()))?;
        let (won,): (bool,) = sea_orm::sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(RELAY_LOCK_KEY)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| RelayError::Lock(e.to_string()))?;
        if won {
            tracing::info!("this instance's relay is now the publisher");
            *lock = Some(conn);
        }
        Ok(won)
    }

    /// Publishes until nothing is left (bounded to avoid running forever under load).
    pub async fn drain(&self) -> Result<Published, RelayError> {
        let mut total = Published::default();
        for _ in 0..1000 {
            let p = self.publish_round().await?;
            total.changes += p.changes;
            total.results += p.results;
            if p.changes == 0 && p.results == 0 {
                break;
            }
        }
        Ok(total)
    }

    /// One round: up to `batch` change rows, then up to `batch` results.
    pub async fn publish_round(&self) -> Result<Published, RelayError> {
        let changes = self.publish_changes().await?;
        crate::metrics::metrics()
            .published
            .with_label_values(&["change"])
            .inc_by(changes as u64);
        let results = self.publish_results().await?;
        crate::metrics::metrics()
            .published
            .with_label_values(&["result"])
            .inc_by(results as u64);
        Ok(Published { changes, results })
    }

    async fn publish_changes(&self) -> Result<usize, RelayError> {
        use product_changes::Column as C;
        let rows = product_changes::Entity::find()
            .filter(C::PublishedAt.is_null())
            .order_by_asc(C::Id)
            .limit(self.batch)
            .all(&self.db)
            .await
            .map_err(StoreError::from)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let key = format!("{}/{}", row.system, event_key(row));
            let payload = row.payload.to_string();
            let ce_type = format!("com.product-sync.product.{}", row.op);
            let source = format!("product-sync/{}", row.system);
            let time = row
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let subject = event_key(row);
            let mut headers = cloudevent_headers(&row.event_id, &ce_type, &source, &subject, &time);
            if let Some(tp) = &row.traceparent {
                headers = headers.insert(Header {
                    key: "traceparent",
                    value: Some(tp.as_str()),
                });
            }
            let record = FutureRecord::to(&self.changes_topic)
                .key(&key)
                .payload(&payload)
                .headers(headers);
            pending.push(self.producer.send_result(record).map_err(|(e, _)| {
                RelayError::Publish {
                    topic: self.changes_topic.clone(),
                    source: e,
                }
            })?);
        }
        let acked = acked_prefix(&rows, pending, |r| r.id, &self.changes_topic).await;
        let count = acked.ids.len();
        if !acked.ids.is_empty() {
            product_changes::Entity::update_many()
                .col_expr(C::PublishedAt, Expr::value(Some(Utc::now())))
                .filter(C::Id.is_in(acked.ids))
                .exec(&self.db)
                .await
                .map_err(StoreError::from)?;
        }
        match acked.error {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    async fn publish_results(&self) -> Result<usize, RelayError> {
        let rows = requests::unpublished(&self.db, self.batch).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let payload = requests::result_event(row).to_string();
            let ce_id = format!(
                "{}:{}",
                row.request_id,
                row.finished_at
                    .map(|t| t.timestamp_micros())
                    .unwrap_or_default()
            );
            let ce_type = format!("com.product-sync.request.{}", row.status);
            let source = format!("product-sync/{}", row.system);
            let time = row
                .finished_at
                .unwrap_or_else(Utc::now)
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let mut headers = cloudevent_headers(&ce_id, &ce_type, &source, &row.request_id, &time);
            if let Some(tp) = &row.traceparent {
                headers = headers.insert(Header {
                    key: "traceparent",
                    value: Some(tp.as_str()),
                });
            }
            let record = FutureRecord::to(&self.results_topic)
                .key(&row.request_id)
                .payload(&payload)
                .headers(headers);
            pending.push(self.producer.send_result(record).map_err(|(e, _)| {
                RelayError::Publish {
                    topic: self.results_topic.clone(),
                    source: e,
                }
            })?);
        }
        let acked = acked_prefix(
            &rows,
            pending,
            |r| r.request_id.clone(),
            &self.results_topic,
        )
        .await;
        let count = acked.ids.len();
        requests::mark_published(&self.db, &acked.ids, Utc::now()).await?;
        match acked.error {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }
}

/// The product part of keys and subjects: the code, or `name:<name>`.
fn event_key(row: &product_changes::Model) -> String {
    match &row.product_code {
        Some(code) => code.clone(),
        None => row.identity.clone(),
    }
}

/// CloudEvents 1.0 binary-mode headers (Kafka protocol binding).
pub fn cloudevent_headers(
    id: &str,
    ce_type: &str,
    source: &str,
    subject: &str,
    time: &str,
) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(Header {
            key: "ce_specversion",
            value: Some("1.0"),
        })
        .insert(Header {
            key: "ce_id",
            value: Some(id),
        })
        .insert(Header {
            key: "ce_type",
            value: Some(ce_type),
        })
        .insert(Header {
            key: "ce_source",
            value: Some(source),
        })
        .insert(Header {
            key: "ce_subject",
            value: Some(subject),
        })
        .insert(Header {
            key: "ce_time",
            value: Some(time),
        })
        .insert(Header {
            key: "content-type",
            value: Some("application/json"),
        })
}

struct Acked<K> {
    ids: Vec<K>,
    error: Option<RelayError>,
}

/// Awaits deliveries in order and keeps the ids acked before the first failure: rows after a
/// failure stay unpublished and are sent again, in order, next round.
async fn acked_prefix<R, K>(
    rows: &[R],
    pending: Vec<rdkafka::producer::DeliveryFuture>,
    id: impl Fn(&R) -> K,
    topic: &str,
) -> Acked<K> {
    let mut ids = Vec::with_capacity(rows.len());
    let mut error = None;
    for (row, delivery) in rows.iter().zip(pending) {
        let result = match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(rdkafka::error::KafkaError::Canceled),
        };
        match result {
            Ok(()) if error.is_none() => ids.push(id(row)),
            Ok(()) => {}
            Err(e) => {
                if error.is_none() {
                    error = Some(RelayError::Publish {
                        topic: topic.to_owned(),
                        source: e,
                    });
                }
            }
        }
    }
    Acked { ids, error }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis((200u64 << failures.min(5)).min(5_000))
}
