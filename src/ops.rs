//! The ops endpoint on `http.listen`: `/healthz` (the process answers), `/readyz` (store,
//! broker and management system reachable — checked in the background every 5 s — and the
//! consumer group joined), `/metrics` (Prometheus).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;
use rdkafka::producer::Producer;

use crate::kafka::Publisher;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{metrics, render};
use crate::pipeline::Membership;

/// What the checks need.
#[derive(Clone)]
pub struct OpsState {
    pub db: DatabaseConnection,
    pub producer: Publisher,
    pub http: reqwest::Client,
    pub upstream_base_url: String,
    pub membership: Arc<Membership>,
    /// The last readiness check (see [`keep_checking`]).
    checked: Arc<std::sync::RwLock<Checked>>,
}

impl OpsState {
    pub fn new(
        db: DatabaseConnection,
        producer: Publisher,
        http: reqwest::Client,
        upstream_base_url: String,
        membership: Arc<Membership>,
    ) -> Self {
        OpsState {
            db,
            producer,
            http,
            upstream_base_url,
            membership,
            checked: Arc::default(),
        }
    }
}

/// The ops endpoint, bound but not yet serving.
pub struct OpsServer {
    listener: TcpListener,
    state: OpsState,
    /// More routes on the same address (the console).
    more: Option<Router>,
}

impl OpsServer {
    /// Binds the ops endpoint (port 0 picks one).
    pub async fn bind(addr: SocketAddr, state: OpsState) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(OpsServer {
            listener,
            state,
            more: None,
        })
    }

    /// Serves `routes` beside the ops endpoint's own.
    pub fn with_routes(mut self, routes: Router) -> Self {
        self.more = Some(routes);
        self
    }

    /// Where it listens.
    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop`, refreshing the readiness check in the background (every 5 s);
    /// returns when both have stopped.
    pub async fn run(self, stop: CancellationToken) {
        let mut router = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_page))
            .with_state(self.state.clone());
        if let Some(more) = self.more {
            router = router.merge(more);
        }
        if let Ok(bound) = self.listener.local_addr() {
            tracing::info!(%bound, "ops endpoint listening (/healthz, /readyz, /metrics)");
        }
        let stopped = stop.clone();
        let serve = axum::serve(self.listener, router)
            .with_graceful_shutdown(async move { stopped.cancelled().await });
        let ((), served) = tokio::join!(keep_checking(self.state, stop), serve);
        if let Err(e) = served {
            tracing::error!(error = %e, "the ops endpoint stopped");
        }
    }
}

/// The last dependency check, refreshed in the background: a `/readyz` hit costs nothing
/// (an unauthenticated caller cannot make this process query the store, the broker and the
/// management system at will).
#[derive(Debug, Clone, Copy, Default)]
struct Checked {
    database: bool,
    broker: bool,
    upstream: bool,
    /// When the check ran (`None`: not yet).
    at: Option<chrono::DateTime<Utc>>,
}

/// How often the dependencies are checked for `/readyz`.
const READINESS_EVERY: Duration = Duration::from_secs(5);

async fn check(s: &OpsState) -> Checked {
    let database = s.db.execute_unprepared("SELECT 1").await.is_ok();
    let producer = s.producer.current();
    let broker = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(None, Duration::from_secs(2))
            .is_ok()
    })
    .await
    .unwrap_or(false);
    // Any HTTP answer means the management system is reachable; only transport errors count.
    let upstream = s
        .http
        .get(&s.upstream_base_url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok();
    Checked {
        database,
        broker,
        upstream,
        at: Some(Utc::now()),
    }
}

/// Refreshes the readiness check until `stop`.
async fn keep_checking(s: OpsState, stop: CancellationToken) {
    loop {
        let checked = check(&s).await;
        let joined = s.membership.joined.load(Ordering::SeqCst);
        crate::metrics::metrics().ready.set(i64::from(
            checked.database && checked.broker && checked.upstream && joined,
        ));
        *s.checked.write().unwrap_or_else(|e| e.into_inner()) = checked;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(READINESS_EVERY) => {}
        }
    }
}

async fn readyz(State(s): State<OpsState>) -> Response {
    let c = *s.checked.read().unwrap_or_else(|e| e.into_inner());
    let joined = s.membership.joined.load(Ordering::SeqCst);
    let partitions = s.membership.partitions.load(Ordering::SeqCst);
    let ready = c.database && c.broker && c.upstream && joined;
    let body = json!({
        "ready": ready,
        "database": c.database,
        "broker": c.broker,
        "upstream": c.upstream,
        "consumer_group_joined": joined,
        "partitions_assigned": partitions,
        "checked_at": c.at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics_page(State(s): State<OpsState>) -> Response {
    if let Ok((queued, parked, oldest)) = crate::outbox::queue::backlog(&s.db).await {
        let m = metrics();
        m.outbox_backlog
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
        m.outbox_parked
            .set(i64::try_from(parked).unwrap_or(i64::MAX));
        let age = oldest
            .map(|t| (Utc::now() - t).num_seconds().max(0))
            .unwrap_or(0);
        m.outbox_oldest_age_seconds.set(age);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(),
    )
        .into_response()
}
