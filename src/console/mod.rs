//! The ops console (DESIGN.md "The ops console"): a page for people at `/` and the JSON API
//! behind it under `/api/v1/`, on the ops endpoint's address. Reads are bounded (limits,
//! indexes, a timeout each) and the expensive figures — topic depths, the outbox backlog, the
//! relay's holders — are gathered in the background every few seconds, so no number of open
//! pages can slow the pipeline. Actions (replay the DLQ, pause or resume a system, submit a
//! request) are `POST`s that need `Authorization: Bearer <operator token>`
//! (`http.operator_tokens`, or `http.admin_token` as the operator `admin`); each is recorded in
//! the audit trail (`GET /api/v1/audit`) under the token's name. Without a token configured
//! actions are disabled. With `http.require_token_for_reads`, the API's reads need a token too.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sea_orm::DatabaseConnection;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::upstream::Systems;

mod history;
mod overview;
mod reads;

pub use overview::Overview;

/// The page, served from the binary (no CDN, no build step).
const PAGE: &str = include_str!("console.html");

/// Longest time one API read may take before it answers 503.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Most rows any list answers.
pub const MAX_ROWS: u64 = 200;

/// What the console reads and acts on.
#[derive(Clone)]
pub struct Console {
    db: DatabaseConnection,
    settings: Arc<Settings>,
    systems: Arc<Systems>,
    /// Operator names and their tokens.
    operators: Arc<Vec<(String, SecretString)>>,
    require_token_for_reads: bool,
    overview: Arc<RwLock<Overview>>,
    history: Arc<RwLock<history::History>>,
    depth_reader: overview::DepthReader,
}

impl Console {
    pub fn new(db: DatabaseConnection, settings: Arc<Settings>, systems: Arc<Systems>) -> Self {
        let operators = Arc::new(settings.http.operators());
        let require_token_for_reads = settings.http.require_token_for_reads;
        Console {
            db,
            settings,
            systems,
            operators,
            require_token_for_reads,
            overview: Arc::default(),
            history: Arc::default(),
            depth_reader: Arc::default(),
        }
    }

    /// The page and the API, to serve beside `/metrics`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(page))
            .route("/api/v1/overview", get(overview_api))
            .route("/api/v1/requests", get(requests_api).post(submit_api))
            .route("/api/v1/requests/{id}", get(request_api))
            .route("/api/v1/products/{system}/{key}", get(product_api))
            .route("/api/v1/dlq/replay", post(replay_api))
            .route("/api/v1/systems/{name}/pause", post(pause_api))
            .route("/api/v1/systems/{name}/resume", post(resume_api))
            .route("/api/v1/audit", get(audit_api))
            .route("/api/v1/history", get(history_api))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                guard_reads,
            ))
            .with_state(self.clone())
    }

    /// Refreshes the overview every `every` until `stop`.
    pub async fn keep_gathering(self, every: Duration, stop: CancellationToken) {
        loop {
            let fresh = overview::gather(&self.db, &self.settings, &self.depth_reader).await;
            // A pause made on any instance holds on this one within one round.
            match crate::store::pauses::paused(&self.db).await {
                Ok(paused) => {
                    for s in self.systems.iter() {
                        s.set_paused(paused.contains(&s.name));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not read the paused systems"),
            }
            let totals = history::Totals::read(&crate::metrics::metrics().registry.gather());
            self.history
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .record(chrono::Utc::now(), totals, &fresh);
            *self.overview.write().unwrap_or_else(|e| e.into_inner()) = fresh;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// The operator whose token the request carries (every token compared in constant time);
    /// tokens are never logged, nor echoed.
    fn operator(&self, headers: &HeaderMap) -> Option<String> {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let mut found = None;
        for (name, token) in self.operators.iter() {
            let same = constant_time_eq::constant_time_eq(
                given.as_bytes(),
                token.expose_secret().as_bytes(),
            );
            if same && found.is_none() {
                found = Some(name.clone());
            }
        }
        found
    }

    /// The operator allowed to act, or the refusal to answer (status and reason).
    fn actor(&self, headers: &HeaderMap) -> Result<String, (StatusCode, &'static str)> {
        if self.operators.is_empty() {
            return Err((
                StatusCode::FORBIDDEN,
                "actions are disabled: no http.operator_tokens (or http.admin_token) is configured",
            ));
        }
        self.operator(headers).ok_or_else(|| {
            tracing::warn!("a console action was refused: missing or unknown operator token");
            (
                StatusCode::UNAUTHORIZED,
                "this action needs Authorization: Bearer <an operator token>",
            )
        })
    }

    /// `None` when reads are open or the request carries an operator token.
    fn refuse_read(&self, headers: &HeaderMap) -> Option<Response> {
        if !self.require_token_for_reads || self.operator(headers).is_some() {
            return None;
        }
        Some(error(
            StatusCode::UNAUTHORIZED,
            "reading needs Authorization: Bearer <an operator token> (http.require_token_for_reads)",
        ))
    }

    /// Records an action in the audit trail; a failure to record is logged, never hidden.
    async fn audit(&self, operator: &str, action: &str, target: &str, ok: bool, detail: &str) {
        let entry = crate::store::audit::Entry {
            id: 0,
            at: chrono::Utc::now(),
            operator: operator.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome: if ok { "ok" } else { "failed" }.to_owned(),
            detail: detail.to_owned(),
        };
        let recorded = crate::store::audit::record(&self.db, &entry);
        match tokio::time::timeout(READ_TIMEOUT, recorded).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(operator, action, target, error = %e, "could not record a console action in the audit trail")
            }
            Err(_) => tracing::error!(
                operator,
                action,
                target,
                "recording a console action in the audit trail timed out"
            ),
        }
    }
}

/// Reads of the API need an operator token when `http.require_token_for_reads` is on (every
/// action checks its operator itself).
async fn guard_reads(
    State(c): State<Console>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let read = request.method() == axum::http::Method::GET;
    if read
        && request.uri().path().starts_with("/api/")
        && let Some(refused) = c.refuse_read(request.headers())
    {
        return refused;
    }
    next.run(request).await
}

/// A JSON error answer.
fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": message}))).into_response()
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

async fn overview_api(State(c): State<Console>) -> Response {
    let o = c.overview.read().unwrap_or_else(|e| e.into_inner()).clone();
    let systems: Vec<Value> = c
        .systems
        .iter()
        .map(|s| {
            let health = s.guard.health();
            json!({
                "name": s.name,
                "default": s.name == c.systems.default_name(),
                "circuit": s.guard.circuit().as_str(),
                "paused": s.is_paused(),
                "requests": health.requests,
                "last_success_at": health.last_success_at,
                "last_failure": health.last_failure,
                "token_valid_s": s.client.tokens().valid_for().map(|d| d.as_secs()),
            })
        })
        .collect();
    let mut body = serde_json::to_value(&o).unwrap_or(Value::Null);
    body["systems"] = json!(systems);
    body["actions_enabled"] = json!(!c.operators.is_empty());
    axum::Json(body).into_response()
}

/// `?q=` a request id or a product code; `limit` at most [`MAX_ROWS`].
#[derive(Debug, Deserialize)]
struct ListQuery {
    q: Option<String>,
    limit: Option<u64>,
}

async fn requests_api(State(c): State<Console>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_ROWS);
    let search = q.q.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let systems = c.systems.names();
    bounded(reads::requests(&c.db, search, limit, &systems)).await
}

async fn request_api(State(c): State<Console>, Path(id): Path<String>) -> Response {
    bounded(reads::request(&c.db, &id)).await
}

async fn product_api(
    State(c): State<Console>,
    Path((system, key)): Path<(String, String)>,
) -> Response {
    bounded(reads::product(&c.db, &system, &key)).await
}

/// The charts' samples of the last hour, oldest first.
async fn history_api(State(c): State<Console>) -> Response {
    let samples = c
        .history
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .samples();
    axum::Json(json!({"window_s": history::WINDOW.as_secs(), "samples": samples})).into_response()
}

/// The audit trail, newest first (`limit` at most [`MAX_ROWS`]).
async fn audit_api(State(c): State<Console>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_ROWS);
    let db = c.db.clone();
    bounded(async move {
        let items = crate::store::audit::latest(&db, limit).await?;
        Ok(Some(json!({ "items": items })))
    })
    .await
}

/// Runs a read under [`READ_TIMEOUT`]: its JSON, 404 when it found nothing, 503 on a store
/// failure or timeout.
async fn bounded<F>(read: F) -> Response
where
    F: std::future::Future<Output = Result<Option<Value>, crate::store::StoreError>>,
{
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(Some(v))) => axum::Json(v).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "not found"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "a console read failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "the store did not answer")
        }
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the store took too long to answer",
        ),
    }
}

/// Submits a request: the same validation as a command on the topic, then published there.
async fn submit_api(State(c): State<Console>, headers: HeaderMap, body: String) -> Response {
    let operator = match c.actor(&headers) {
        Ok(operator) => operator,
        Err((status, reason)) => return error(status, reason),
    };
    let (answer, target) = submit(&c, &body, &operator).await;
    let detail = detail_of(&answer, "submitted");
    let ok = answer.status().is_success();
    c.audit(&operator, "submit", &target, ok, &detail).await;
    answer
}

/// What an answer says, for the audit trail: `ok` for a success, else its error.
fn detail_of(answer: &Response, ok: &str) -> String {
    if answer.status().is_success() {
        ok.to_owned()
    } else {
        format!("HTTP {}", answer.status().as_u16())
    }
}

/// Validates and publishes a submitted command; the answer and the request id.
async fn submit(c: &Console, body: &str, operator: &str) -> (Response, String) {
    if body.len() > crate::command::MAX_COMMAND_BYTES {
        return (
            error(StatusCode::PAYLOAD_TOO_LARGE, "the command is too large"),
            String::new(),
        );
    }
    // The request id may be left out: one is made up, as `product-sync request` does.
    let wire = serde_json::from_str::<Value>(body).and_then(|mut v| {
        if let Some(o) = v.as_object_mut() {
            o.entry("request_id").or_insert(json!(""));
        }
        serde_json::from_value::<crate::command::CommandWire>(v)
    });
    let wire = match wire {
        Ok(w) => w,
        Err(e) => {
            let reason = crate::text::quote(&e.to_string());
            let answer = error(StatusCode::BAD_REQUEST, &format!("not a command: {reason}"));
            return (answer, String::new());
        }
    };
    let target = wire.request_id.clone();
    let answer = match crate::tools::request(&c.settings, wire).await {
        Ok(id) => {
            tracing::info!(request_id = %id, operator, "a request was submitted from the console");
            let answer = (StatusCode::ACCEPTED, axum::Json(json!({"request_id": id})));
            return (answer.into_response(), id);
        }
        Err(crate::tools::ToolError::Invalid(e)) => error(
            StatusCode::BAD_REQUEST,
            &format!("the command would be rejected: {e}"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    (answer, target)
}

/// `{"only": "transient"}` replays the transient failures only; `{}` every record.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    only: Option<String>,
}

async fn replay_api(State(c): State<Console>, headers: HeaderMap, body: String) -> Response {
    let operator = match c.actor(&headers) {
        Ok(operator) => operator,
        Err((status, reason)) => return error(status, reason),
    };
    let (answer, detail) = replay(&c, &body, &operator).await;
    let target = if body.contains("transient") {
        "transient"
    } else {
        "all"
    };
    let ok = answer.status().is_success();
    c.audit(&operator, "dlq-replay", target, ok, &detail).await;
    answer
}

/// Replays the DLQ as the body asks; the answer and what it did.
async fn replay(c: &Console, body: &str, operator: &str) -> (Response, String) {
    let body: ReplayBody = match body.trim() {
        "" => ReplayBody::default(),
        text => match serde_json::from_str(text) {
            Ok(b) => b,
            Err(_) => {
                let answer = error(
                    StatusCode::BAD_REQUEST,
                    "expected {\"only\": \"transient\"} or {}",
                );
                return (answer, "HTTP 400".to_owned());
            }
        },
    };
    let only = match body.only.as_deref() {
        None => None,
        Some(class) => match crate::wire::FailureClass::parse(class) {
            Some(c) => Some(c),
            None => {
                let answer = error(StatusCode::BAD_REQUEST, "only: transient or permanent");
                return (answer, "HTTP 400".to_owned());
            }
        },
    };
    match crate::dlq::replay(&c.settings, only).await {
        Ok(n) => {
            tracing::info!(
                replayed = n,
                operator,
                "the DLQ was replayed from the console"
            );
            let answer = axum::Json(json!({"replayed": n})).into_response();
            (answer, format!("replayed {n}"))
        }
        Err(e) => {
            let answer = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            (answer, "HTTP 503".to_owned())
        }
    }
}

async fn pause_api(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    set_paused(&c, &headers, &name, true).await
}

async fn resume_api(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    set_paused(&c, &headers, &name, false).await
}

/// Pauses or resumes a system: in the store (every instance follows within a few seconds)
/// and at once in this instance.
async fn set_paused(c: &Console, headers: &HeaderMap, name: &str, paused: bool) -> Response {
    let operator = match c.actor(headers) {
        Ok(operator) => operator,
        Err((status, reason)) => return error(status, reason),
    };
    let answer = pause(c, name, paused, &operator).await;
    let (action, done) = if paused {
        ("pause", "paused")
    } else {
        ("resume", "resumed")
    };
    let detail = detail_of(&answer, done);
    let ok = answer.status().is_success();
    c.audit(&operator, action, name, ok, &detail).await;
    answer
}

/// Records a pause (or its end) and applies it in this instance.
async fn pause(c: &Console, name: &str, paused: bool, operator: &str) -> Response {
    let Some(system) = c.systems.get(name) else {
        return error(StatusCode::NOT_FOUND, "no such management system");
    };
    let stored = crate::store::pauses::set_paused(&c.db, name, paused, chrono::Utc::now());
    match tokio::time::timeout(READ_TIMEOUT, stored).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not record a pause");
            return error(StatusCode::SERVICE_UNAVAILABLE, "the store did not answer");
        }
        Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "the store took too long"),
    }
    system.set_paused(paused);
    tracing::warn!(system = %name, paused, operator, "a management system was paused or resumed from the console");
    axum::Json(json!({"system": name, "paused": paused})).into_response()
}
