//! The contract simulator: a real HTTP server (axum) playing the management system and the
//! governance platform exactly as DESIGN.md's "External contract" describes them — OAuth2
//! token endpoint, paginated products endpoint with filters and opaque cursors, registration
//! endpoints — plus fault injection and an admin API, for tests, the demo and benchmarks.
//!
//! Admin API (not part of the contract):
//! - `GET /admin/products` — the whole catalogue (the truth tests compare against);
//! - `POST /admin/products` `{"items":[record…]}` — insert or replace records;
//! - `POST /admin/mutate` `{"count":n,"seed":s}` — change n products (NAV, yield, version+1);
//! - `GET|PUT /admin/faults` — the fault settings (see [`Faults`]);
//! - `POST /admin/tokens/revoke` — refuse every token issued so far (a 401 on next use);
//! - `GET /admin/stats` — request counters; `GET /admin/registrations`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Form, Json, Router};
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::command::{Selector, Since};
use crate::product::Product;

pub mod catalogue;
pub mod tls;

pub use catalogue::Catalogue;

/// Largest page the products endpoint serves.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Fault injection. Rates are probabilities per products request (0.0–1.0); `script` is a
/// queue of faults the next products requests get, one each, before any rate applies.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer 500.
    pub error_rate: f64,
    /// Answer 429 with `Retry-After: retry_after_s`.
    pub throttle_rate: f64,
    pub retry_after_s: u64,
    /// Added to every products request.
    pub latency_ms: u64,
    /// Every page is read from the catalogue, then held this long before it is sent: the
    /// answer carries the catalogue as it was when asked.
    pub answer_delay_ms: u64,
    /// Answer 200 with a body that is not JSON.
    pub malformed_rate: f64,
    /// Cut the connection in the middle of the response body.
    pub drop_rate: f64,
    /// Serve a page with one record that breaks the contract (`nav` as a JSON number).
    pub bad_record_rate: f64,
    /// Refuse tokens this many seconds after issue, whatever `expires_in` promised.
    pub token_revoke_after_s: Option<u64>,
    /// Answer every request (token, products, governance) with 503: an outage.
    pub down: bool,
    /// Deterministic faults for the next products requests, in order.
    pub script: VecDeque<Fault>,
    /// A hostile or broken management system, for every products request whose keyword is
    /// `hostile_keyword` (every request when that is unset) while set.
    pub hostile: Option<Hostile>,
    pub hostile_keyword: Option<String>,
}

/// Misbehaviours of a hostile or broken management system (DESIGN.md "Limits on what the
/// upstream may send"); product-sync must end each command in bounded time or tolerate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hostile {
    /// `next_cursor` is the cursor just asked for: the paging loops.
    RepeatCursor,
    /// Empty pages, each with a new cursor, for ever.
    EndlessEmpty,
    /// 429 with `Retry-After: 0`, for ever.
    ThrottleZero,
    /// An 80 MB page.
    HugePage,
    /// Five times the items asked for.
    TooManyItems,
    /// Tokens whose `expires_in` no clock can add (every token request).
    AbsurdExpiry,
}

impl Hostile {
    /// Every misbehaviour, for tests and the chaos run.
    pub const ALL: [Hostile; 6] = [
        Hostile::RepeatCursor,
        Hostile::EndlessEmpty,
        Hostile::ThrottleZero,
        Hostile::HugePage,
        Hostile::TooManyItems,
        Hostile::AbsurdExpiry,
    ];
}

/// One scripted fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// No fault for this request (to aim a scripted fault at a later page).
    Pass,
    Error500,
    Throttle,
    Malformed,
    Drop,
    BadRecord,
    Unauthorized,
    Forbidden,
    /// The page starts one product after the cursor: what an offset cursor serves when a
    /// product before it was withdrawn during the scan (the product at the cursor is never
    /// served to that scan).
    SkipOne,
}

/// How the simulator starts.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub client_id: String,
    /// The simulator's own test credential; never logged.
    pub client_secret: String,
    pub token_ttl: Duration,
    /// App ids the governance platform accepts.
    pub app_ids: Vec<String>,
    pub lease_seconds: u64,
    pub faults: Faults,
    /// Seeds fault randomness.
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            client_id: "product-sync".into(),
            client_secret: "local-dev-secret".into(),
            token_ttl: Duration::from_secs(300),
            app_ids: vec!["product-sync".into()],
            lease_seconds: 30,
            faults: Faults::default(),
            seed: 1,
        }
    }
}

/// Request counters, for tests and the admin API.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    pub token_requests: AtomicU64,
    pub tokens_issued: AtomicU64,
    pub product_requests: AtomicU64,
    /// Pages read from the catalogue (counted before an `answer_delay_ms` hold).
    pub pages_read: AtomicU64,
    pub faults_injected: AtomicU64,
    pub registrations: AtomicU64,
    pub heartbeats: AtomicU64,
    pub deregistrations: AtomicU64,
    /// When each products request arrived (the first 100,000), to measure rate limits.
    #[serde(skip)]
    pub product_request_times: Mutex<Vec<std::time::Instant>>,
    /// What each first-page products request asked for (the first 10,000): tests check a
    /// scheduled incremental's `updated_since`.
    #[serde(skip)]
    pub first_pages: Mutex<Vec<Asked>>,
}

/// The selector of a first-page products request, as sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Asked {
    pub keyword: Option<String>,
    pub product_codes: Option<String>,
    pub category: Option<String>,
    pub updated_since: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct RegistrationEntry {
    registration_id: String,
    service: String,
    instance_id: String,
    app_id: String,
    version: String,
    systems: Vec<String>,
    heartbeats: u64,
}

struct Inner {
    config: SimConfig,
    catalogue: RwLock<Catalogue>,
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
    /// token → (issued, expires)
    tokens: Mutex<HashMap<String, (Instant, Instant)>>,
    /// Every token ever issued, revoked or not.
    issued: Mutex<Vec<String>>,
    registrations: Mutex<HashMap<String, RegistrationEntry>>,
    stats: Stats,
}

/// A handle on a simulator's state, shared by its server and by tests.
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Inner>,
}

impl Sim {
    pub fn new(config: SimConfig, catalogue: Catalogue) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        let faults = config.faults.clone();
        Self {
            inner: Arc::new(Inner {
                config,
                catalogue: RwLock::new(catalogue),
                faults: Mutex::new(faults),
                rng: Mutex::new(rng),
                tokens: Mutex::new(HashMap::new()),
                issued: Mutex::new(Vec::new()),
                registrations: Mutex::new(HashMap::new()),
                stats: Stats::default(),
            }),
        }
    }

    /// The current catalogue (a copy).
    pub fn catalogue(&self) -> Catalogue {
        read(&self.inner.catalogue).clone()
    }

    /// Changes `count` products upstream; returns them.
    pub fn mutate(&self, count: usize, seed: u64) -> Vec<Product> {
        write(&self.inner.catalogue).mutate(count, seed, Utc::now())
    }

    /// Inserts or replaces products upstream.
    pub fn upsert(&self, products: Vec<Product>) {
        let mut c = write(&self.inner.catalogue);
        for p in products {
            c.upsert(p);
        }
    }

    /// Withdraws products upstream by identity key (`code:…` or `name:…`); returns them.
    pub fn withdraw(&self, keys: &[String]) -> Vec<Product> {
        let keys = keys.iter().cloned().collect();
        write(&self.inner.catalogue).remove(&keys)
    }

    /// Replaces the fault settings.
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.inner.faults) = faults;
    }

    /// Refuses every token issued so far.
    pub fn revoke_tokens(&self) {
        lock(&self.inner.tokens).clear();
    }

    /// Every token this simulator ever issued (tests search logs for them).
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.inner.issued).clone()
    }

    /// How many issued tokens would still be accepted now.
    pub fn valid_tokens(&self) -> usize {
        let now = Instant::now();
        lock(&self.inner.tokens)
            .values()
            .filter(|(_, expires)| now < *expires)
            .count()
    }

    /// What every first-page products request asked for, in order.
    pub fn first_pages(&self) -> Vec<Asked> {
        lock(&self.inner.stats.first_pages).clone()
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Live registrations as JSON objects.
    pub fn registrations(&self) -> Vec<Value> {
        lock(&self.inner.registrations)
            .values()
            .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
            .collect()
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/oauth2/token", post(token))
            .route("/v1/products", get(products))
            .route("/v1/registrations", post(register))
            .route("/v1/registrations/{id}/heartbeat", put(heartbeat))
            .route("/v1/registrations/{id}", axum::routing::delete(deregister))
            .route("/admin/products", get(admin_products).post(admin_upsert))
            .route("/admin/mutate", post(admin_mutate))
            .route("/admin/faults", get(admin_get_faults).put(admin_put_faults))
            .route("/admin/tokens/revoke", post(admin_revoke))
            .route("/admin/stats", get(admin_stats))
            .route("/admin/registrations", get(admin_registrations))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `stop` fires.
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    }

    /// Serves https on `listener` with `acceptor`'s identity until `stop` fires.
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        acceptor: tokio_native_tls::TlsAcceptor,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let listener = tls::TlsListener::new(listener, acceptor, stop.clone())?;
        axum::serve(listener, self.router())
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    }

    /// Binds `addr` (port 0 picks one), serves in the background; returns the bound address.
    pub async fn spawn(
        self,
        addr: SocketAddr,
        stop: CancellationToken,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = self.serve(listener, stop).await {
                tracing::error!(error = %e, "simulator stopped");
            }
        });
        Ok(bound)
    }

    fn roll(&self, rate: f64) -> bool {
        rate > 0.0 && lock(&self.inner.rng).gen_bool(rate.clamp(0.0, 1.0))
    }

    /// The fault, if any, for this products request.
    fn count_fault(&self) {
        self.inner
            .stats
            .faults_injected
            .fetch_add(1, Ordering::Relaxed);
    }

    fn next_fault(&self) -> Option<Fault> {
        let mut faults = lock(&self.inner.faults);
        if let Some(f) = faults.script.pop_front() {
            return (f != Fault::Pass).then_some(f);
        }
        let f = faults.clone();
        drop(faults);
        [
            (f.error_rate, Fault::Error500),
            (f.throttle_rate, Fault::Throttle),
            (f.malformed_rate, Fault::Malformed),
            (f.drop_rate, Fault::Drop),
            (f.bad_record_rate, Fault::BadRecord),
        ]
        .into_iter()
        .find(|(rate, _)| self.roll(*rate))
        .map(|(_, fault)| fault)
    }

    /// The hostile behaviour for a products request with this keyword, if any.
    fn hostile_for(&self, keyword: Option<&str>) -> Option<Hostile> {
        let f = lock(&self.inner.faults);
        let applies = f.hostile_keyword.is_none() || f.hostile_keyword.as_deref() == keyword;
        f.hostile.filter(|_| applies)
    }

    fn is_down(&self) -> bool {
        lock(&self.inner.faults).down
    }
}

// Poisoned locks only follow a panic in a handler; the state is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

fn json_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

fn unavailable() -> Response {
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the simulator is down (fault injection)",
    )
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

async fn token(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Response {
    sim.inner
        .stats
        .token_requests
        .fetch_add(1, Ordering::Relaxed);
    if sim.is_down() {
        return unavailable();
    }
    if form.grant_type.as_deref() != Some("client_credentials") {
        return json_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials",
        );
    }
    let (id, secret) = basic_credentials(&headers).unwrap_or((
        form.client_id.unwrap_or_default(),
        form.client_secret.unwrap_or_default(),
    ));
    let config = &sim.inner.config;
    if id != config.client_id || secret != config.client_secret {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "unknown client or wrong secret",
        );
    }
    let value = format!("sim-{}", uuid::Uuid::new_v4().simple());
    let now = Instant::now();
    let revoke_after = lock(&sim.inner.faults)
        .token_revoke_after_s
        .map(Duration::from_secs);
    let valid_for = revoke_after.map_or(config.token_ttl, |r| r.min(config.token_ttl));
    lock(&sim.inner.tokens).insert(value.clone(), (now, now + valid_for));
    lock(&sim.inner.issued).push(value.clone());
    sim.inner
        .stats
        .tokens_issued
        .fetch_add(1, Ordering::Relaxed);
    let expires_in = if lock(&sim.inner.faults).hostile == Some(Hostile::AbsurdExpiry) {
        json!(u64::MAX)
    } else {
        json!(config.token_ttl.as_secs())
    };
    Json(json!({
        "access_token": value,
        "token_type": "Bearer",
        "expires_in": expires_in,
    }))
    .into_response()
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

fn bearer_ok(sim: &Sim, headers: &HeaderMap) -> bool {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let now = Instant::now();
    lock(&sim.inner.tokens)
        .get(token)
        .is_some_and(|(_, expires)| now < *expires)
}

#[derive(Deserialize)]
struct ProductQuery {
    keyword: Option<String>,
    product_codes: Option<String>,
    category: Option<String>,
    updated_since: Option<String>,
    page_size: Option<String>,
    cursor: Option<String>,
}

/// The answer of a hostile management system (`None`: answer normally).
fn hostile_answer(
    sim: &Sim,
    hostile: Hostile,
    cursor: Option<&str>,
    page_size: usize,
) -> Option<Response> {
    let page = |items: Vec<Value>, next: Option<String>| {
        Json(json!({"items": items, "next_cursor": next})).into_response()
    };
    match hostile {
        Hostile::RepeatCursor => {
            let again = cursor.map_or_else(|| encode_cursor(0), str::to_owned);
            let first = read(&sim.inner.catalogue)
                .products()
                .first()
                .map(Product::to_json);
            Some(page(first.into_iter().collect(), Some(again)))
        }
        Hostile::EndlessEmpty => {
            let n = sim.inner.stats.product_requests.load(Ordering::Relaxed);
            Some(page(Vec::new(), Some(encode_cursor(n as usize))))
        }
        Hostile::ThrottleZero => {
            let mut r = json_error(StatusCode::TOO_MANY_REQUESTS, "throttled", "hostile");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(0));
            Some(r)
        }
        Hostile::HugePage => {
            // A page whose body goes on for 80 MB, streamed (the simulator holds 64 KiB).
            let head = Bytes::from_static(b"{\"items\":[],\"next_cursor\":null,\"pad\":\"");
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let tail = Bytes::from_static(b"\"}");
            let body = futures::stream::iter(
                std::iter::once(head)
                    .chain(std::iter::repeat_n(chunk, 80 * 16))
                    .chain(std::iter::once(tail))
                    .map(Ok::<Bytes, std::io::Error>),
            );
            Some(
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    Body::from_stream(body),
                )
                    .into_response(),
            )
        }
        Hostile::TooManyItems => {
            let catalogue = read(&sim.inner.catalogue);
            let items: Vec<Value> = catalogue
                .products()
                .iter()
                .cycle()
                .take(page_size * 5)
                .map(Product::to_json)
                .collect();
            Some(page(items, None))
        }
        Hostile::AbsurdExpiry => None,
    }
}

/// Cursors are opaque to clients: a prefix and the offset into the filtered list.
fn encode_cursor(offset: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("sim:{offset}"))
}

fn decode_cursor(cursor: &str) -> Option<usize> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    String::from_utf8(raw)
        .ok()?
        .strip_prefix("sim:")?
        .parse()
        .ok()
}

async fn products(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Query(q): Query<ProductQuery>,
) -> Response {
    sim.inner
        .stats
        .product_requests
        .fetch_add(1, Ordering::Relaxed);
    {
        let mut times = lock(&sim.inner.stats.product_request_times);
        if times.len() < 100_000 {
            times.push(std::time::Instant::now());
        }
    }
    if sim.is_down() {
        return unavailable();
    }
    let latency = lock(&sim.inner.faults).latency_ms;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if !bearer_ok(&sim, &headers) {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "missing, unknown or expired token",
        );
    }
    let cursor = q.cursor.clone();
    if cursor.as_deref().is_none_or(str::is_empty) {
        let mut asked = lock(&sim.inner.stats.first_pages);
        if asked.len() < 10_000 {
            asked.push(Asked {
                keyword: q.keyword.clone(),
                product_codes: q.product_codes.clone(),
                category: q.category.clone(),
                updated_since: q.updated_since.clone(),
            });
        }
    }
    let (selector, page_size, offset) = match parse_query(q) {
        Ok(parsed) => parsed,
        Err(reason) => return json_error(StatusCode::BAD_REQUEST, "invalid_request", reason),
    };
    let fault = sim.next_fault();
    if fault.is_some() {
        sim.count_fault();
    }
    if let Some(response) = fault.and_then(|f| injected_failure(&sim, f)) {
        return response;
    }
    if let Some(hostile) = sim.hostile_for(selector.keyword.as_deref())
        && let Some(response) = hostile_answer(&sim, hostile, cursor.as_deref(), page_size)
    {
        sim.count_fault();
        return response;
    }
    let bad_record = fault == Some(Fault::BadRecord);
    let offset = offset + usize::from(fault == Some(Fault::SkipOne));
    let body = render_page(&sim, &selector, offset, page_size, bad_record);
    sim.inner.stats.pages_read.fetch_add(1, Ordering::SeqCst);
    let hold = lock(&sim.inner.faults).answer_delay_ms;
    if hold > 0 {
        tokio::time::sleep(Duration::from_millis(hold)).await;
    }
    if fault == Some(Fault::Drop) {
        return dropped(body);
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The selector, page size and catalogue offset a products request asks for, or why it is
/// refused.
fn parse_query(q: ProductQuery) -> Result<(Selector, usize, usize), &'static str> {
    let page_size = match q.page_size.as_deref().map(str::parse::<usize>) {
        None => 100,
        Some(Ok(n)) if (1..=MAX_PAGE_SIZE).contains(&n) => n,
        _ => return Err("page_size must be 1..=1000"),
    };
    let offset = match q.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => decode_cursor(c).ok_or("unknown cursor")?,
    };
    let updated_since = match q.updated_since.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(Since::At(
            DateTime::parse_from_rfc3339(s)
                .map_err(|_| "updated_since must be RFC 3339")?
                .with_timezone(&Utc),
        )),
    };
    let selector = Selector {
        all: false,
        keyword: q.keyword.filter(|s| !s.is_empty()),
        product_codes: q
            .product_codes
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        category: q.category.filter(|s| !s.is_empty()),
        updated_since,
    };
    Ok((selector, page_size, offset))
}

/// The answer of a fault that replaces the page, if this one does.
fn injected_failure(sim: &Sim, fault: Fault) -> Option<Response> {
    Some(match fault {
        Fault::Error500 => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "injected",
        ),
        Fault::Throttle => {
            let wait = lock(&sim.inner.faults).retry_after_s;
            let mut r = json_error(StatusCode::TOO_MANY_REQUESTS, "throttled", "injected");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(wait));
            r
        }
        Fault::Unauthorized => json_error(StatusCode::UNAUTHORIZED, "invalid_token", "injected"),
        Fault::Forbidden => json_error(StatusCode::FORBIDDEN, "forbidden", "injected"),
        Fault::Malformed => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "<html>oops</html>",
        )
            .into_response(),
        _ => return None,
    })
}

/// One page of the matching products from `offset` on. The cursor is the catalogue position
/// to scan on from: a page costs its own size, not the pages before it (a million-product
/// catalogue is paged in linear time). `bad_record`: the first record breaks the contract.
fn render_page(
    sim: &Sim,
    selector: &Selector,
    offset: usize,
    page_size: usize,
    bad_record: bool,
) -> String {
    let catalogue = read(&sim.inner.catalogue);
    let mut matching = catalogue
        .products()
        .iter()
        .enumerate()
        .skip(offset)
        .filter(|(_, p)| catalogue::matches(p, selector));
    let mut body = String::with_capacity(page_size * 1600 + 64);
    body.push_str("{\"items\":[");
    let mut next = offset;
    for (n, (i, _)) in matching.by_ref().take(page_size).enumerate() {
        if n > 0 {
            body.push(',');
        }
        let item = catalogue.rendered(i);
        if n == 0 && bad_record {
            // A float where the contract wants a decimal string.
            let mut first: Value = serde_json::from_str(item).unwrap_or(Value::Null);
            first["nav"] = json!(1.25);
            body.push_str(&first.to_string());
        } else {
            body.push_str(item);
        }
        next = i + 1;
    }
    let more = matching.next().is_some();
    let next_cursor = more.then(|| encode_cursor(next));
    body.push_str("],\"next_cursor\":");
    body.push_str(&json!(next_cursor).to_string());
    body.push('}');
    body
}

/// Half the body, then a broken connection.
fn dropped(body: String) -> Response {
    let bytes = Bytes::from(body.into_bytes());
    let half = bytes.slice(..bytes.len() / 2);
    let stream = futures::stream::iter(vec![
        Ok::<Bytes, std::io::Error>(half),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected drop",
        )),
    ]);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

#[derive(Deserialize)]
struct RegisterBody {
    service: String,
    instance_id: String,
    app_id: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    systems: Vec<String>,
}

async fn register(State(sim): State<Sim>, Json(body): Json<RegisterBody>) -> Response {
    if sim.is_down() {
        return unavailable();
    }
    if !sim.inner.config.app_ids.contains(&body.app_id) {
        return json_error(
            StatusCode::FORBIDDEN,
            "unknown_identity",
            "app id not registered with the platform",
        );
    }
    sim.inner
        .stats
        .registrations
        .fetch_add(1, Ordering::Relaxed);
    let id = format!("reg-{}", uuid::Uuid::new_v4().simple());
    lock(&sim.inner.registrations).insert(
        id.clone(),
        RegistrationEntry {
            registration_id: id.clone(),
            service: body.service,
            instance_id: body.instance_id,
            app_id: body.app_id,
            version: body.version,
            systems: body.systems,
            heartbeats: 0,
        },
    );
    (
        StatusCode::CREATED,
        Json(json!({"registration_id": id, "lease_seconds": sim.inner.config.lease_seconds})),
    )
        .into_response()
}

async fn heartbeat(State(sim): State<Sim>, Path(id): Path<String>) -> Response {
    if sim.is_down() {
        return unavailable();
    }
    sim.inner.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
    match lock(&sim.inner.registrations).get_mut(&id) {
        Some(r) => {
            r.heartbeats += 1;
            StatusCode::NO_CONTENT.into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn deregister(State(sim): State<Sim>, Path(id): Path<String>) -> Response {
    if sim.is_down() {
        return unavailable();
    }
    sim.inner
        .stats
        .deregistrations
        .fetch_add(1, Ordering::Relaxed);
    match lock(&sim.inner.registrations).remove(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn admin_products(State(sim): State<Sim>) -> Response {
    let items: Vec<Value> = read(&sim.inner.catalogue)
        .products()
        .iter()
        .map(Product::to_json)
        .collect();
    Json(json!({"items": items})).into_response()
}

async fn admin_upsert(State(sim): State<Sim>, Json(body): Json<Value>) -> Response {
    match Catalogue::from_json(&body) {
        Ok(incoming) => {
            let n = incoming.len();
            sim.upsert(incoming.products().to_vec());
            Json(json!({"upserted": n})).into_response()
        }
        Err((index, e)) => json_error(
            StatusCode::BAD_REQUEST,
            "invalid_record",
            &format!("record {index}: {e}"),
        ),
    }
}

#[derive(Deserialize)]
struct MutateBody {
    count: usize,
    #[serde(default)]
    seed: u64,
}

async fn admin_mutate(State(sim): State<Sim>, Json(body): Json<MutateBody>) -> Response {
    let changed: Vec<Value> = sim
        .mutate(body.count, body.seed)
        .iter()
        .map(Product::to_json)
        .collect();
    Json(json!({"changed": changed})).into_response()
}

async fn admin_get_faults(State(sim): State<Sim>) -> Response {
    Json(lock(&sim.inner.faults).clone()).into_response()
}

async fn admin_put_faults(State(sim): State<Sim>, Json(faults): Json<Faults>) -> Response {
    sim.set_faults(faults);
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_revoke(State(sim): State<Sim>) -> Response {
    sim.revoke_tokens();
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_stats(State(sim): State<Sim>) -> Response {
    Json(json!(&sim.inner.stats)).into_response()
}

async fn admin_registrations(State(sim): State<Sim>) -> Response {
    Json(json!({"registrations": sim.registrations()})).into_response()
}
