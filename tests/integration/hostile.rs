//! A hostile or broken management system (a real HTTP server on port 0, misbehaving on
//! purpose; then the simulator's hostile modes under a real `run` process): every misbehaviour
//! ends the fetch in bounded time with a short, permanent error — or is tolerated — never
//! panics or buffers without bound, and the next command on the partition completes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use product_sync::command::Selector;
use product_sync::sim::Catalogue;
use product_sync::upstream::products::Limits;
use product_sync::upstream::{ProductClient, UpstreamError};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// `next_cursor` is always the same.
    RepeatCursor,
    /// Empty pages with a new cursor, for ever.
    EmptyForever,
    /// 429 with `Retry-After: 0`, for ever.
    ThrottleZero,
    /// An 80 MB page, streamed.
    Huge,
    /// Five times the items asked for.
    TooMany,
    /// A token lifetime no clock can add; then a normal last page.
    AbsurdExpiry,
    /// Slow pages with new cursors, for ever.
    Slow,
    /// One record with a 300 KB attribute.
    BigRecord,
    /// A `next_cursor` of a megabyte.
    LongCursor,
}

struct Server {
    mode: Mode,
    requests: AtomicUsize,
    items: Vec<Value>,
}

async fn token(State(s): State<Arc<Server>>) -> Response {
    let expires_in = if s.mode == Mode::AbsurdExpiry {
        json!(18_446_744_073_709_551_615u64)
    } else {
        json!(300)
    };
    axum::Json(json!({"access_token": "t", "token_type": "Bearer", "expires_in": expires_in}))
        .into_response()
}

async fn products(State(s): State<Arc<Server>>, headers: HeaderMap) -> Response {
    let n = s.requests.fetch_add(1, Ordering::SeqCst);
    assert!(headers.contains_key("authorization"));
    let page = |items: &[Value], cursor: Option<String>| {
        axum::Json(json!({"items": items, "next_cursor": cursor})).into_response()
    };
    match s.mode {
        Mode::RepeatCursor => page(&s.items[..1], Some("again".into())),
        Mode::EmptyForever => page(&[], Some(format!("c{n}"))),
        Mode::ThrottleZero => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "0")],
            "slow down",
        )
            .into_response(),
        Mode::Huge => {
            // {"items":[ then 80 MB of padding inside a string, streamed in 64 KiB chunks.
            let chunk = axum::body::Bytes::from(vec![b'x'; 64 * 1024]);
            let head = axum::body::Bytes::from_static(b"{\"items\":[],\"pad\":\"");
            let body = futures::stream::iter(
                std::iter::once(head)
                    .chain(std::iter::repeat_n(chunk, 80 * 16))
                    .map(Ok::<_, std::io::Error>),
            );
            (StatusCode::OK, Body::from_stream(body)).into_response()
        }
        Mode::TooMany => page(&s.items[..50], None),
        Mode::AbsurdExpiry => page(&s.items[..2], None),
        Mode::BigRecord => {
            let mut big = s.items[0].clone();
            big["attributes"] = json!({"prospectus": "p".repeat(300_000)});
            page(&[s.items[1].clone(), big], None)
        }
        Mode::LongCursor => page(&s.items[..1], Some("c".repeat(1_000_000))),
        Mode::Slow => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            page(&s.items[..1], Some(format!("c{n}")))
        }
    }
}

/// Starts the hostile server; returns its base URL, its state and the stop guard.
async fn hostile(mode: Mode) -> (String, Arc<Server>, tokio_util::sync::DropGuard) {
    let items: Vec<Value> = Catalogue::generate(60, 3)
        .products()
        .iter()
        .map(|p| p.to_json())
        .collect();
    let state = Arc::new(Server {
        mode,
        requests: AtomicUsize::new(0),
        items,
    });
    let app = Router::new()
        .route("/oauth2/token", post(token))
        .route("/v1/products", get(products))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let cancelled = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancelled.cancelled().await })
            .await
            .ok();
    });
    (format!("http://{addr}"), state, stop.drop_guard())
}

fn client(base_url: &str, page_size: u32, budget: Duration, limits: Limits) -> ProductClient {
    crate::upstream::client_with(base_url, "s3cret", page_size, budget).with_limits(limits)
}

/// Follows every page; returns how many came and the error that ended it, if any.
async fn fetch_all(client: &ProductClient) -> (usize, Option<UpstreamError>) {
    let selector = Selector {
        category: Some("mixed".into()),
        ..Selector::default()
    };
    let mut pages = std::pin::pin!(client.pages(selector));
    let mut n = 0;
    while let Some(page) = pages.next().await {
        match page {
            Ok(_) => n += 1,
            Err(e) => return (n, Some(e)),
        }
    }
    (n, None)
}

fn assert_short_permanent(e: &UpstreamError) {
    assert!(!e.is_transient(), "permanent: {e}");
    assert!(e.to_string().len() < 300, "short: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeating_cursor_ends_the_command_at_once() {
    let (url, server, _stop) = hostile(Mode::RepeatCursor).await;
    let (pages, error) = fetch_all(&client(
        &url,
        100,
        Duration::from_secs(2),
        Limits::default(),
    ))
    .await;
    let e = error.expect("an error");
    assert!(matches!(e, UpstreamError::Runaway { .. }), "{e}");
    assert!(e.to_string().contains("already followed"), "{e}");
    assert_short_permanent(&e);
    assert_eq!(pages, 1);
    assert_eq!(server.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_pages_with_a_cursor_for_ever_stop_at_max_pages() {
    let (url, server, _stop) = hostile(Mode::EmptyForever).await;
    let limits = Limits {
        max_pages: 50,
        ..Limits::default()
    };
    let (pages, error) = fetch_all(&client(&url, 100, Duration::from_secs(2), limits)).await;
    let e = error.expect("an error");
    assert!(e.to_string().contains("upstream.max_pages"), "{e}");
    assert_short_permanent(&e);
    assert_eq!(pages, 50);
    assert_eq!(server.requests.load(Ordering::SeqCst), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_slow_paging_stops_at_the_command_deadline() {
    let (url, _server, _stop) = hostile(Mode::Slow).await;
    let limits = Limits {
        command_timeout: Duration::from_millis(1500),
        ..Limits::default()
    };
    let started = Instant::now();
    let (pages, error) = fetch_all(&client(&url, 100, Duration::from_secs(2), limits)).await;
    let e = error.expect("an error");
    assert!(e.to_string().contains("command_timeout_ms"), "{e}");
    assert_short_permanent(&e);
    assert!(pages >= 3, "{pages} pages before the deadline");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_zero_for_ever_stays_inside_the_retry_budget() {
    let (url, server, _stop) = hostile(Mode::ThrottleZero).await;
    let started = Instant::now();
    let (_, error) = fetch_all(&client(
        &url,
        100,
        Duration::from_secs(2),
        Limits::default(),
    ))
    .await;
    let e = error.expect("an error");
    assert!(matches!(e, UpstreamError::Throttled { .. }), "{e}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "ended within the budget: {took:?}"
    );
    let requests = server.requests.load(Ordering::SeqCst);
    // At least 250 ms between tries: about 8 in 2 s, never thousands.
    assert!(
        (2..=12).contains(&requests),
        "{requests} requests in {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_80_mb_page_is_refused_at_the_byte_limit() {
    let (url, _server, _stop) = hostile(Mode::Huge).await;
    let limits = Limits {
        max_page_bytes: 1024 * 1024,
        ..Limits::default()
    };
    let started = Instant::now();
    let (_, error) = fetch_all(&client(&url, 100, Duration::from_secs(2), limits)).await;
    let e = error.expect("an error");
    assert!(
        matches!(
            e,
            UpstreamError::TooLarge {
                limit: 1_048_576,
                ..
            }
        ),
        "{e}"
    );
    assert_short_permanent(&e);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_items_than_asked_for_end_the_command() {
    let (url, _server, _stop) = hostile(Mode::TooMany).await;
    let (_, error) = fetch_all(&client(&url, 10, Duration::from_secs(2), Limits::default())).await;
    let e = error.expect("an error");
    assert!(e.to_string().contains("50 items on a page of 10"), "{e}");
    assert_short_permanent(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_above_max_record_bytes_ends_the_command_naming_it() {
    let (url, _server, _stop) = hostile(Mode::BigRecord).await;
    let (_, error) = fetch_all(&client(
        &url,
        100,
        Duration::from_secs(2),
        Limits::default(),
    ))
    .await;
    let e = error.expect("an error");
    assert!(
        matches!(e, UpstreamError::InvalidRecord { index: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("upstream.max_record_bytes"), "{e}");
    assert_short_permanent(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_cursor_is_not_followed() {
    let (url, server, _stop) = hostile(Mode::LongCursor).await;
    let (pages, error) = fetch_all(&client(
        &url,
        100,
        Duration::from_secs(2),
        Limits::default(),
    ))
    .await;
    let e = error.expect("an error");
    assert!(
        e.to_string().contains("next_cursor is 1000000 bytes"),
        "{e}"
    );
    assert_short_permanent(&e);
    assert_eq!((pages, server.requests.load(Ordering::SeqCst)), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_token_lifetime_is_clamped_not_a_panic() {
    let (url, _server, _stop) = hostile(Mode::AbsurdExpiry).await;
    let (pages, error) = fetch_all(&client(
        &url,
        100,
        Duration::from_secs(2),
        Limits::default(),
    ))
    .await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(pages, 1);
}

/// Peak resident memory (VmHWM) of a process, in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .expect("VmHWM of the child")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_misbehaviour_ends_its_command_and_the_next_one_on_the_partition_completes() {
    use crate::helpers::wait_for;
    use crate::pipeline::{signal, wait_exit, world};
    use product_sync::sim::{Faults, Hostile};

    // One partition: every harmless command waits behind the hostile one before it.
    let w = world(300, 1).await;
    let mut child = w.spawn_process(
        "hostile",
        &[
            ("PRODUCT_SYNC__UPSTREAM__MAX_PAGES", "40"),
            ("PRODUCT_SYNC__UPSTREAM__COMMAND_TIMEOUT_MS", "20000"),
        ],
    );
    wait_for(
        "the instance registered",
        Duration::from_secs(60),
        || async { (w.sim.sim.registrations().len() == 1).then_some(()) },
    )
    .await;
    for (i, mode) in Hostile::ALL.into_iter().enumerate() {
        w.sim.sim.set_faults(Faults {
            hostile: Some(mode),
            hostile_keyword: Some("hostile".into()),
            ..Faults::default()
        });
        let (bad, good) = (format!("bad-{i}"), format!("good-{i}"));
        let started = Instant::now();
        w.command(&bad, json!({"keyword": "hostile"})).await;
        w.command(&good, json!({"keyword": "养老"})).await;
        let results = w
            .wait_results(&[bad.as_str(), good.as_str()], Duration::from_secs(90))
            .await;
        let of = |id: &str| {
            results
                .iter()
                .find(|r| r["request_id"] == json!(id))
                .cloned()
                .unwrap()
        };
        let (b, g) = (of(&bad), of(&good));
        if mode == Hostile::AbsurdExpiry {
            assert_eq!(b["status"], "completed", "{mode:?} is tolerated: {b}");
        } else {
            assert_eq!(b["status"], "failed", "{mode:?}: {b}");
            let error = b["error"].as_str().unwrap();
            assert!(error.len() < 400, "{mode:?}: a short error: {error}");
        }
        assert_eq!(g["status"], "completed", "{mode:?}: the next command: {g}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{mode:?}: bounded time ({:?})",
            started.elapsed()
        );
    }
    let peak = peak_rss_mb(child.id());
    assert!(peak < 200.0, "peak RSS {peak:.0} MB with an 80 MB page");
    signal(&child, "TERM");
    assert!(
        wait_exit(&mut child, Duration::from_secs(60))
            .await
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_handler_fails_its_command_and_the_partition_moves_on() {
    use crate::helpers::wait_for;
    use crate::pipeline::{header_of, sample, signal, wait_exit, world};

    let w = world(200, 1).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let listen = format!("127.0.0.1:{port}");
    // The debug build's hook: handling request `boom` panics.
    let mut child = w.spawn_process(
        "panic",
        &[
            ("PRODUCT_SYNC_DEBUG_PANIC_ON", "boom"),
            ("PRODUCT_SYNC__HTTP__LISTEN", listen.as_str()),
        ],
    );
    wait_for(
        "the instance registered",
        Duration::from_secs(60),
        || async { (w.sim.sim.registrations().len() == 1).then_some(()) },
    )
    .await;
    w.command("boom", json!({"keyword": "养老"})).await;
    w.command("after", json!({"keyword": "养老"})).await;
    let results = w
        .wait_results(&["boom", "after"], Duration::from_secs(60))
        .await;
    let of = |id: &str| {
        results
            .iter()
            .find(|r| r["request_id"] == json!(id))
            .unwrap()
    };
    assert_eq!(of("boom")["status"], "failed", "{}", of("boom"));
    assert!(
        of("boom")["error"]
            .as_str()
            .unwrap()
            .contains("injected panic")
    );
    assert_eq!(of("after")["status"], "completed");
    let dlq = w.read_all(&w.settings.topics.dlq).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        header_of(&dlq[0], product_sync::wire::dlq::ERROR_KIND).as_deref(),
        Some("panic")
    );
    let page = reqwest::get(format!("http://{listen}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(&page, "product_sync_commands_total{status=\"panicked\"}"),
        1.0
    );
    signal(&child, "TERM");
    assert!(
        wait_exit(&mut child, Duration::from_secs(60))
            .await
            .success()
    );
}
