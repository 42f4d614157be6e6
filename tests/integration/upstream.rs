//! The upstream client over real HTTP against the contract simulator: token reuse and refresh,
//! credential errors, 429, 5xx, retry budgets, malformed bodies and records, a 10,000-product
//! fetch compared field by field, a Chinese keyword filter, governance registration, and no
//! secret or token in any log line or error.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use product_sync::command::Selector;
use product_sync::product::Product;
use product_sync::retry::RetryPolicy;
use product_sync::sim::{Catalogue, Fault, Faults, Sim, SimConfig};
use product_sync::upstream::{
    Governance, Page, ProductClient, TokenSource, UpstreamError, http_client,
};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::helpers::{captured_logs, wait_for};

pub struct TestSim {
    pub sim: Sim,
    pub base_url: String,
    stop: CancellationToken,
}

impl Drop for TestSim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn start_sim(products: usize, config: SimConfig) -> TestSim {
    let sim = Sim::new(config, Catalogue::generate(products, 42));
    let stop = CancellationToken::new();
    let addr = sim
        .clone()
        .spawn("127.0.0.1:0".parse().unwrap(), stop.clone())
        .await
        .expect("simulator binds a free port");
    TestSim {
        sim,
        base_url: format!("http://{addr}"),
        stop,
    }
}

pub fn client_with(
    base_url: &str,
    secret: &str,
    page_size: u32,
    budget: Duration,
) -> ProductClient {
    let http = http_client(Duration::from_secs(5), None).unwrap();
    let policy = RetryPolicy {
        initial: Duration::from_millis(20),
        max_interval: Duration::from_millis(200),
        max_elapsed: budget,
    };
    let tokens = Arc::new(
        TokenSource::new(
            http.clone(),
            base_url,
            "product-sync".into(),
            SecretString::from(secret.to_owned()),
            policy,
        )
        .unwrap(),
    );
    ProductClient::new(http, base_url, tokens, page_size, policy).unwrap()
}

fn client(t: &TestSim, page_size: u32) -> ProductClient {
    client_with(
        &t.base_url,
        "local-dev-secret",
        page_size,
        Duration::from_secs(10),
    )
}

async fn fetch_all(client: &ProductClient, selector: Selector) -> Result<Vec<Page>, UpstreamError> {
    client.pages(selector).try_collect().await
}

fn all(pages: &[Page]) -> Vec<Product> {
    pages.iter().flat_map(|p| p.items.clone()).collect()
}

#[tokio::test]
async fn one_token_serves_many_pages() {
    let t = start_sim(1200, SimConfig::default()).await;
    let c = client(&t, 100);
    let pages = fetch_all(&c, Selector::default()).await.unwrap();
    assert_eq!(pages.len(), 12);
    assert_eq!(all(&pages).len(), 1200);
    assert_eq!(t.sim.stats().token_requests.load(Ordering::SeqCst), 1);
    assert_eq!(c.tokens().requests_sent(), 1);
    assert_eq!(t.sim.stats().product_requests.load(Ordering::SeqCst), 12);
}

#[tokio::test]
async fn token_is_refreshed_before_it_expires() {
    // 10 s tokens: the client plans to refresh 2 s (a fifth) before the end.
    let t = start_sim(
        50,
        SimConfig {
            token_ttl: Duration::from_secs(10),
            ..SimConfig::default()
        },
    )
    .await;
    let c = client(&t, 10);
    let fetches = std::sync::atomic::AtomicU64::new(0);
    // Page after page until the client takes a second token; at that moment the first one
    // must still be one the simulator accepts.
    let still_valid = wait_for("a second token", Duration::from_secs(20), || async {
        c.fetch_page(&Selector::default(), None, 1).await.unwrap();
        fetches.fetch_add(1, Ordering::SeqCst);
        (t.sim.stats().token_requests.load(Ordering::SeqCst) == 2).then(|| t.sim.valid_tokens())
    })
    .await;
    assert_eq!(
        still_valid, 2,
        "the new token was taken while the old one was still valid (ahead of expiry)"
    );
    assert_eq!(
        t.sim.stats().product_requests.load(Ordering::SeqCst),
        fetches.load(Ordering::SeqCst),
        "no 401 round trip"
    );
}

#[tokio::test]
async fn a_401_refreshes_the_token_once_and_retries() {
    let t = start_sim(50, SimConfig::default()).await;
    let c = client(&t, 10);
    c.fetch_page(&Selector::default(), None, 1).await.unwrap();
    t.sim.revoke_tokens();
    c.fetch_page(&Selector::default(), None, 1).await.unwrap();
    assert_eq!(t.sim.stats().token_requests.load(Ordering::SeqCst), 2);
    assert_eq!(t.sim.stats().product_requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn concurrent_callers_share_one_refresh() {
    let t = start_sim(200, SimConfig::default()).await;
    let c = Arc::new(client(&t, 10));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.fetch_page(&Selector::default(), None, i)
                .await
                .map(|_| ())
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(
        t.sim.stats().token_requests.load(Ordering::SeqCst),
        1,
        "no thundering herd"
    );
}

#[tokio::test]
async fn wrong_credentials_are_permanent_and_name_the_client_id() {
    let t = start_sim(10, SimConfig::default()).await;
    let c = client_with(&t.base_url, "not-the-secret", 10, Duration::from_secs(10));
    let err = c
        .fetch_page(&Selector::default(), None, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::InvalidClient { .. }), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("\"product-sync\""), "{err}");
    assert!(!format!("{err} {err:?}").contains("not-the-secret"));
    assert_eq!(
        t.sim.stats().token_requests.load(Ordering::SeqCst),
        1,
        "not retried"
    );
}

#[tokio::test]
async fn a_429_waits_for_retry_after() {
    let t = start_sim(10, SimConfig::default()).await;
    t.sim.set_faults(Faults {
        retry_after_s: 1,
        script: [Fault::Throttle].into(),
        ..Faults::default()
    });
    let c = client(&t, 10);
    let started = Instant::now();
    c.fetch_page(&Selector::default(), None, 1).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(t.sim.stats().product_requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn server_errors_and_dropped_connections_are_retried_until_success() {
    let t = start_sim(30, SimConfig::default()).await;
    t.sim.set_faults(Faults {
        script: [Fault::Error500, Fault::Drop, Fault::Error500].into(),
        ..Faults::default()
    });
    let c = client(&t, 10);
    let page = c.fetch_page(&Selector::default(), None, 1).await.unwrap();
    assert_eq!(page.items.len(), 10);
    assert_eq!(t.sim.stats().product_requests.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn an_exhausted_retry_budget_surfaces_a_transient_error() {
    let t = start_sim(10, SimConfig::default()).await;
    t.sim.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let c = client_with(
        &t.base_url,
        "local-dev-secret",
        10,
        Duration::from_millis(500),
    );
    let err = c
        .fetch_page(&Selector::default(), None, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::Server { status: 500, .. }),
        "{err}"
    );
    assert!(err.is_transient());
    assert!(
        t.sim.stats().product_requests.load(Ordering::SeqCst) > 1,
        "it retried"
    );
}

#[tokio::test]
async fn a_malformed_body_is_permanent_and_names_the_page() {
    let t = start_sim(30, SimConfig::default()).await;
    t.sim.set_faults(Faults {
        script: [Fault::Pass, Fault::Malformed].into(),
        ..Faults::default()
    });
    let c = client(&t, 10);
    let err = fetch_all(&c, Selector::default()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::MalformedBody { .. }), "{err}");
    assert!(err.to_string().contains("products page 2"), "{err}");
    assert!(!err.is_transient());
    assert_eq!(
        t.sim.stats().product_requests.load(Ordering::SeqCst),
        2,
        "not retried"
    );
}

#[tokio::test]
async fn a_record_breaking_the_contract_names_page_record_and_field() {
    let t = start_sim(30, SimConfig::default()).await;
    t.sim.set_faults(Faults {
        script: [Fault::BadRecord].into(),
        ..Faults::default()
    });
    let c = client(&t, 10);
    let err = c
        .fetch_page(&Selector::default(), None, 1)
        .await
        .unwrap_err();
    match &err {
        UpstreamError::InvalidRecord { index, error, .. } => {
            assert_eq!(*index, 0);
            assert_eq!(error.field, "nav");
        }
        other => panic!("expected InvalidRecord, got {other}"),
    }
    assert!(err.to_string().contains("products page 1"), "{err}");
}

#[tokio::test]
async fn forbidden_is_permanent() {
    let t = start_sim(10, SimConfig::default()).await;
    t.sim.set_faults(Faults {
        script: [Fault::Forbidden].into(),
        ..Faults::default()
    });
    let err = client(&t, 10)
        .fetch_page(&Selector::default(), None, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Forbidden { .. }), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn ten_thousand_products_over_many_pages_equal_the_catalogue() {
    let t = start_sim(10_000, SimConfig::default()).await;
    let c = client(&t, 1000);
    let pages = fetch_all(&c, Selector::default()).await.unwrap();
    assert_eq!(pages.len(), 10);
    assert_eq!(
        pages.iter().map(|p| p.number).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    let fetched = all(&pages);
    let truth = t.sim.catalogue();
    assert_eq!(fetched.len(), 10_000);
    // Every field of every product, in order.
    assert_eq!(fetched.as_slice(), truth.products());
}

#[tokio::test]
async fn a_chinese_keyword_selects_exactly_the_matching_products() {
    let t = start_sim(2000, SimConfig::default()).await;
    let c = client(&t, 100);
    let selector = Selector {
        keyword: Some("养老".into()),
        ..Selector::default()
    };
    let fetched = all(&fetch_all(&c, selector.clone()).await.unwrap());
    let catalogue = t.sim.catalogue();
    let expected: Vec<Product> = catalogue.select(&selector).cloned().collect();
    assert!(!expected.is_empty() && expected.len() < 2000);
    assert_eq!(fetched, expected);
    assert!(
        fetched
            .iter()
            .all(|p| p.content.keywords.iter().any(|k| k == "养老")
                || p.content.product_name.contains("养老"))
    );

    let codes = Selector {
        product_codes: vec!["WM0000001".into(), "WM0000002".into(), "NOPE".into()],
        category: None,
        ..Selector::default()
    };
    let fetched = all(&fetch_all(&c, codes).await.unwrap());
    assert_eq!(fetched.len(), 2);
}

#[tokio::test]
async fn governance_registers_heartbeats_and_deregisters() {
    let t = start_sim(
        1,
        SimConfig {
            lease_seconds: 1,
            ..SimConfig::default()
        },
    )
    .await;
    let http = http_client(Duration::from_secs(5), None).unwrap();
    let policy = RetryPolicy::with_budget(Duration::from_secs(5));
    let gov = Arc::new(Governance::new(
        http.clone(),
        &t.base_url,
        "product-sync",
        "host-1:42".into(),
        policy,
    ));
    let stop = CancellationToken::new();
    let first = gov.register().await.expect("registered");
    let task = tokio::spawn(gov.clone().keep(first, stop.clone()));
    let regs = t.sim.registrations();
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0]["instance_id"], "host-1:42");
    wait_for("two heartbeats", Duration::from_secs(10), || async {
        (t.sim.stats().heartbeats.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    assert!(t.sim.registrations().is_empty(), "deregistered at stop");

    let stranger = Governance::new(http, &t.base_url, "unknown-app", "host-2:1".into(), policy);
    let err = stranger.register().await.unwrap_err();
    assert!(
        matches!(err, UpstreamError::UnknownIdentity { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("unknown-app"));
    assert!(!err.is_transient());
}

#[tokio::test]
async fn no_secret_or_token_reaches_a_log_line_or_an_error() {
    let logs = captured_logs();
    let secret = format!("s3cr3t-{}", uuid::Uuid::new_v4().simple());
    let wrong = format!("wr0ng-{}", uuid::Uuid::new_v4().simple());
    let t = start_sim(
        300,
        SimConfig {
            client_secret: secret.clone(),
            ..SimConfig::default()
        },
    )
    .await;
    t.sim.set_faults(Faults {
        script: [Fault::Error500, Fault::Unauthorized, Fault::Throttle].into(),
        retry_after_s: 0,
        ..Faults::default()
    });

    // A failing run: wrong secret.
    let bad = client_with(&t.base_url, &wrong, 50, Duration::from_secs(5));
    let err = bad
        .fetch_page(&Selector::default(), None, 1)
        .await
        .unwrap_err();
    tracing::error!(error = %err, debug = ?err, "failing run ended");
    // A succeeding run through retries and a token refresh.
    let good = client_with(&t.base_url, &secret, 50, Duration::from_secs(10));
    let pages = fetch_all(&good, Selector::default()).await.unwrap();
    tracing::info!(pages = pages.len(), tokens = ?good.tokens(), "succeeding run ended");
    assert_eq!(all(&pages).len(), 300);

    let tokens = t.sim.issued_tokens();
    assert!(tokens.len() >= 2, "the run refreshed its token");
    let text = logs.text();
    assert!(
        text.contains("obtained an access token"),
        "log capture works"
    );
    assert!(
        text.contains("transient failure; retrying"),
        "retries were logged"
    );
    for needle in tokens.iter().chain([&secret, &wrong]) {
        assert!(
            !text.contains(needle.as_str()),
            "a secret or token leaked into the logs"
        );
        assert!(!format!("{err} {err:?}").contains(needle.as_str()));
    }
}
