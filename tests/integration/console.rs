//! The ops console in a real headless browser (Debian's Chromium through ChromeDriver, which
//! `deploy/local/browser.sh up` installs and starts), against the real broker, PostgreSQL and
//! the simulator: the page loads with no error, a request submitted through it runs and shows
//! its counts, a failed command shows its error, an action without the token is refused,
//! actions are recorded in the audit trail under their operator's name, a viewer without a
//! token sees nothing when reads are protected — and the API behind it answers the same way
//! to scripts.
//!
//! With `PRODUCT_SYNC_SCREENSHOTS=<dir>` the test also saves the screenshots the README shows.

use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use product_sync::sim::{Fault, Faults};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::helpers::wait_for;
use crate::pipeline::world;

const TOKEN: &str = "console-admin-token-5f2e91";
/// The operator `alice`'s token (`http.operator_tokens`).
const ALICE: &str = "alice-token-0c8e1d7a";

/// A fresh headless Chromium session.
async fn browser() -> Client {
    let url = std::env::var("PRODUCT_SYNC_TEST_WEBDRIVER_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:9515".to_owned());
    let caps = json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1400,1200"],
        }
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::rustls()
        .expect("TLS roots")
        .capabilities(caps)
        .connect(&url)
        .await
        .unwrap_or_else(|e| {
            panic!("no WebDriver at {url} ({e}): start it with `deploy/local/browser.sh up`")
        })
}

/// The text of the first element matching `css`, or "" while there is none.
async fn text_of(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// What the page recorded in `window.__errors` (uncaught errors, rejections, console.error).
async fn page_errors(c: &Client) -> Vec<Value> {
    match c.execute("return window.__errors || null;", vec![]).await {
        Ok(Value::Array(errors)) => errors,
        other => panic!("the page's error hook is missing: {other:?}"),
    }
}

/// The JSON answer of a GET.
async fn get_json(url: &str) -> Value {
    reqwest::get(url)
        .await
        .expect("the console answers")
        .json()
        .await
        .expect("JSON")
}

async fn screenshot(c: &Client, name: &str) {
    if let Ok(dir) = std::env::var("PRODUCT_SYNC_SCREENSHOTS") {
        let png = c.screenshot().await.expect("screenshot");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/{name}.png"), png).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_commands_runs_a_submitted_request_and_refuses_an_action_without_the_token()
 {
    let w = world(150, 1).await;
    let mut settings = w.settings.clone();
    settings.http.admin_token = Some(SecretString::from(TOKEN));
    settings
        .http
        .operator_tokens
        .insert("alice".to_owned(), SecretString::from(ALICE));
    // A nightly drift check: shown with its next slot (it never comes due in this test).
    settings.upstream.schedule.drift_check_cron = Some("0 0 2 * * *".parse().unwrap());
    settings.topics.notifications = settings
        .topics
        .requests
        .replace(".requests", ".notifications");
    let app = w.start_with(settings).await;
    let base = format!("http://{}", app.ops);
    // Two commands made from 100 notifications naming 40 codes (as any instance counts them).
    for _ in 0..2 {
        product_sync::store::notifications::count_command(&w.db, "wms", 50, 20, chrono::Utc::now())
            .await
            .expect("count notification commands");
    }
    // A command the management system refuses (403): the console must show its error.
    w.sim.sim.set_faults(Faults {
        script: [Fault::Forbidden].into(),
        ..Faults::default()
    });
    w.command("refused-1", json!({"keyword": "稳健"})).await;
    let results = w
        .wait_results(&["refused-1"], Duration::from_secs(60))
        .await;
    assert!(results.iter().any(|r| r["status"] == "failed"));

    let c = browser().await;
    c.goto(&base).await.expect("open the console");
    wait_for("the page to refresh", Duration::from_secs(30), || async {
        text_of(&c, "#refreshed")
            .await
            .starts_with("refreshed")
            .then_some(())
    })
    .await;
    assert_eq!(
        text_of(&c, "#systems tbody tr[data-system=wms] td:nth-child(2)").await,
        "closed"
    );
    // The schedules: the drift check with its next slot, and this instance as the holder.
    // (Read until it holds: the page rebuilds these rows on every refresh, so one read may
    // land on a row just replaced.)
    let drift = "#schedules tbody tr[data-system=wms][data-kind=drift]";
    wait_for("the drift check's row", Duration::from_secs(30), || async {
        let schedule = text_of(&c, &format!("{drift} td:nth-child(3)")).await;
        let next = text_of(&c, &format!("{drift} td:nth-child(4)")).await;
        (schedule == "cron 0 0 2 * * *" && !next.is_empty() && next != "–").then_some(())
    })
    .await;
    wait_for(
        "the scheduler's holder shown",
        Duration::from_secs(30),
        || async {
            let shown = text_of(&c, "#scheduler").await;
            (shown.starts_with("scheduler: ") && !shown.contains("no holder")).then_some(())
        },
    )
    .await;
    // The coalescing of notifications: counts across instances and the ratio.
    let notes = "#notifications tbody tr[data-system=wms]";
    wait_for(
        "the notifications' row",
        Duration::from_secs(30),
        || async {
            let cells = [2, 3, 4, 5].map(|i| format!("{notes} td:nth-child({i})"));
            let mut shown = Vec::new();
            for cell in &cells {
                shown.push(text_of(&c, cell).await);
            }
            (shown == ["100", "40", "2", "50"]).then_some(())
        },
    )
    .await;
    assert!(
        text_of(&c, "#notifications-pending")
            .await
            .contains("bound 10000")
    );
    // The failed command, with its error in the list and in its detail.
    let failed = "#commands tr[data-request-id='refused-1'][data-status=failed]";
    let listed = wait_for(
        "the failed command listed",
        Duration::from_secs(30),
        || async { c.find(Locator::Css(failed)).await.ok() },
    )
    .await;
    // The page refreshes every 2 s and updates its rows in place: the row found before two
    // refreshes is still the one on the page (a replaced row would be a stale element).
    for _ in 0..2 {
        let before = text_of(&c, "#refreshed").await;
        wait_for("a refresh of the page", Duration::from_secs(30), || async {
            (text_of(&c, "#refreshed").await != before).then_some(())
        })
        .await;
    }
    listed
        .click()
        .await
        .expect("open the failed command: its row survived the refreshes");
    let error = wait_for("its error shown", Duration::from_secs(30), || async {
        let t = text_of(&c, "#detail-error").await;
        (!t.is_empty()).then_some(t)
    })
    .await;
    assert!(error.contains("HTTP 403"), "{error}");
    screenshot(&c, "console-failed-command").await;

    // A request submitted through the page runs and shows its counts.
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(ALICE)
        .await
        .unwrap();
    let body = c.find(Locator::Css("#submit-body")).await.unwrap();
    body.clear().await.unwrap();
    body.send_keys(r#"{"request_id": "from-console", "selector": {"category": "cash"}}"#)
        .await
        .unwrap();
    c.find(Locator::Css("#submit-btn"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let row = "#commands tr[data-request-id='from-console'][data-status=completed]";
    wait_for(
        "the submitted request completed",
        Duration::from_secs(60),
        || async { c.find(Locator::Css(row)).await.ok() },
    )
    .await;
    let cash = w
        .truth(&serde_json::from_value(json!({"category": "cash"})).unwrap())
        .len();
    assert!(cash > 0);
    // Columns: request, system, mode, status, fetched, created, …
    assert_eq!(
        text_of(&c, &format!("{row} td:nth-child(5)")).await,
        cash.to_string()
    );
    assert_eq!(
        text_of(&c, &format!("{row} td:nth-child(6)")).await,
        cash.to_string()
    );
    c.find(Locator::Css(row))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        "its change events shown",
        Duration::from_secs(30),
        || async {
            let n = c
                .execute(
                    "return document.querySelectorAll('#detail-changes tbody tr').length;",
                    vec![],
                )
                .await
                .ok()?;
            (n == json!(cash)).then_some(())
        },
    )
    .await;
    // The charts of the last hour are drawn from the samples: the submitted request's events
    // show up as a non-zero rate.
    wait_for(
        "the events chart drawn with the request's events",
        Duration::from_secs(30),
        || async {
            let max = c
                .execute(
                    "const l = document.querySelector('#chart-events polyline'); \
                 return l ? [Number(l.dataset.points), Number(l.dataset.max)] : null;",
                    vec![],
                )
                .await
                .ok()?;
            let (points, max) = (max[0].as_f64()?, max[1].as_f64()?);
            (points >= 2.0 && max > 0.0).then_some(())
        },
    )
    .await;
    for chart in ["commands", "lag", "outbox", "errors"] {
        c.find(Locator::Css(&format!("#chart-{chart} polyline")))
            .await
            .unwrap_or_else(|_| panic!("the {chart} chart is drawn"));
    }
    let history = get_json(&format!("{base}/api/v1/history")).await;
    assert_eq!(history["window_s"], 3600);
    assert!(
        history["samples"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["events_per_s"].as_f64() > Some(0.0))),
        "{history}"
    );
    // The submission is in the audit trail, under alice's name.
    let audited = "#audit tr[data-operator=alice][data-action=submit][data-outcome=ok]";
    wait_for(
        "alice's submission audited",
        Duration::from_secs(30),
        || async { c.find(Locator::Css(audited)).await.ok() },
    )
    .await;
    assert_eq!(
        text_of(&c, &format!("{audited} td:nth-child(4)")).await,
        "from-console"
    );
    screenshot(&c, "console").await;

    // An action without the token is refused, and says so.
    let token = c.find(Locator::Css("#token")).await.unwrap();
    token.clear().await.unwrap();
    c.find(Locator::Css("#replay-transient"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let said = wait_for("the refusal shown", Duration::from_secs(30), || async {
        let t = text_of(&c, "#action-result").await;
        (!t.is_empty()).then_some(t)
    })
    .await;
    assert!(said.contains("refused (HTTP 401)"), "{said}");
    assert_eq!(
        page_errors(&c).await,
        Vec::<Value>::new(),
        "no error on the page"
    );
    c.close().await.expect("close the browser");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_answers_scripts_and_guards_its_actions() {
    let w = world(40, 1).await;
    let mut settings = w.settings.clone();
    settings.http.admin_token = Some(SecretString::from(TOKEN));
    let app = w.start_with(settings).await;
    let base = format!("http://{}", app.ops);
    let http = reqwest::Client::new();
    let post = |path: &str, token: Option<&str>, body: &str| {
        let mut r = http.post(format!("{base}{path}")).body(body.to_owned());
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    // Refused without a token and with a wrong one; nothing was sent.
    for token in [None, Some("wrong-token")] {
        let r = post("/api/v1/requests", token, r#"{"selector":{"all":true}}"#)
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = post("/api/v1/systems/wms/pause", Some("x"), "")
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The same validation as a command on the topic.
    let r = post(
        "/api/v1/requests",
        Some(TOKEN),
        r#"{"selector":{"keyword":"k"},"mode":"snapshot"}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let why: Value = r.json().await.unwrap();
    assert!(why["error"].as_str().unwrap().contains("snapshot"), "{why}");
    // Accepted, it runs like any command.
    let r = post(
        "/api/v1/requests",
        Some(TOKEN),
        r#"{"request_id":"api-1","selector":{"all":true}}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202);
    w.wait_results(&["api-1"], Duration::from_secs(60)).await;
    let one: Value = get_json(&format!("{base}/api/v1/requests/api-1")).await;
    assert_eq!(one["status"], "completed", "{one}");
    assert_eq!(one["counts"]["created"], 40);
    assert_eq!(one["changes"].as_array().unwrap().len(), 40);
    // Searching by a product code finds the command that changed it; the product view shows
    // its state and history.
    let found: Value = get_json(&format!("{base}/api/v1/requests?q=WM0000001")).await;
    assert_eq!(found["items"][0]["request_id"], "api-1", "{found}");
    let product: Value = get_json(&format!("{base}/api/v1/products/wms/WM0000001")).await;
    assert_eq!(product["revision"], 1);
    assert_eq!(product["history"][0]["op"], "created");
    assert_eq!(product["state"]["product_code"], "WM0000001");
    // Pausing a system parks its commands on the retry topic; resuming lets them run.
    let r = post("/api/v1/systems/wms/pause", Some(TOKEN), "")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let overview: Value = get_json(&format!("{base}/api/v1/overview")).await;
    assert_eq!(overview["systems"][0]["paused"], true, "{overview}");
    assert_eq!(overview["actions_enabled"], true);
    let r = post("/api/v1/systems/wms/resume", Some(TOKEN), "")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Every action is in the audit trail, newest first, under the admin token's name (the
    // refused submission too); attempts without a valid token are not (nobody to attribute
    // them to), and no token is in it.
    let audit = http
        .get(format!("{base}/api/v1/audit"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!audit.contains(TOKEN), "{audit}");
    let audit: Value = serde_json::from_str(&audit).unwrap();
    let actions: Vec<(&str, &str, &str, &str)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let field = |k: &str| a[k].as_str().unwrap_or_default();
            (
                field("operator"),
                field("action"),
                field("target"),
                field("outcome"),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("admin", "resume", "wms", "ok"),
            ("admin", "pause", "wms", "ok"),
            ("admin", "submit", "api-1", "ok"),
            ("admin", "submit", "", "failed"),
        ],
        "{audit}"
    );
    // The overview's background figures: a malformed command's DLQ record is counted, and
    // every relay shard has its holder (this instance).
    w.send("bad-1", b"{not json", &[]).await;
    let shards = w.settings.pipeline.relay_shards as usize;
    let what = "the DLQ record and the shard holders in the overview";
    wait_for(what, Duration::from_secs(30), || async {
        let o: Value = http
            .get(format!("{base}/api/v1/overview"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let holders = o["relay"].as_array().map(Vec::len);
        (o["dlq_depth"] == 1 && holders == Some(shards)).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_reads_protected_a_viewer_without_a_token_sees_nothing() {
    let w = world(20, 1).await;
    let mut settings = w.settings.clone();
    settings
        .http
        .operator_tokens
        .insert("alice".to_owned(), SecretString::from(ALICE));
    settings.http.require_token_for_reads = true;
    let app = w.start_with(settings).await;
    let base = format!("http://{}", app.ops);
    let http = reqwest::Client::new();
    for path in ["overview", "requests", "audit", "products/wms/WM0000001"] {
        let url = format!("{base}/api/v1/{path}");
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a token");
        let r = http.get(&url).bearer_auth("wrong").send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} with a wrong token");
    }
    let r = http
        .get(format!("{base}/api/v1/overview"))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The page says it needs a token, and shows the figures once one is given.
    let c = browser().await;
    c.goto(&format!("{base}/")).await.expect("open the console");
    let said = wait_for(
        "the refusal on the page",
        Duration::from_secs(30),
        || async {
            let t = text_of(&c, "#refreshed").await;
            t.contains("HTTP 401").then_some(t)
        },
    )
    .await;
    assert!(said.contains("operator token"), "{said}");
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(ALICE)
        .await
        .unwrap();
    c.execute(
        "document.getElementById('token').dispatchEvent(new Event('change'));",
        vec![],
    )
    .await
    .expect("signal the token");
    wait_for("the figures shown", Duration::from_secs(30), || async {
        let t = text_of(&c, "#refreshed").await;
        t.starts_with("refreshed").then_some(())
    })
    .await;
    c.find(Locator::Css("#systems tr[data-system=wms]"))
        .await
        .expect("the systems listed once the token is given");
    c.close().await.expect("close the browser");
    app.stop().await;
}
