//! The observability kit (`deploy/observability/`, `docs/src/runbooks.md`) against the code:
//! every metric the alerting rules and the Grafana dashboard name is exported by `/metrics` of
//! a running instance after real work (a scheduled incremental, a drift check, a command, a
//! dead letter), and every alert has a runbook section and a promtool unit test.

use std::collections::BTreeSet;
use std::time::Duration;

use product_sync::config::ScheduleSettings;
use serde_json::json;

use crate::pipeline::world;

const ALERTS: &str = include_str!("../../deploy/observability/alerts.yaml");
const ALERT_TESTS: &str = include_str!("../../deploy/observability/alerts.test.yaml");
const DASHBOARD: &str = include_str!("../../deploy/observability/dashboard.json");
const RUNBOOKS: &str = include_str!("../../docs/src/runbooks.md");

/// Every `product_sync_…` name in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("product_sync_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The names with at least one sample in a Prometheus text exposition.
fn exported(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The alert names of alerts.yaml.
fn alerts() -> Vec<String> {
    ALERTS
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_alert_has_a_runbook_section_and_a_unit_test() {
    let alerts = alerts();
    assert!(alerts.len() >= 10, "alerts.yaml lists {alerts:?}");
    for alert in &alerts {
        assert!(
            RUNBOOKS.contains(&format!("\n## {alert}\n")),
            "docs/src/runbooks.md has no section `## {alert}`"
        );
        assert!(
            ALERT_TESTS.contains(&format!("alertname: {alert}\n")),
            "deploy/observability/alerts.test.yaml does not test {alert}"
        );
        assert!(
            ALERTS.contains(&format!("runbooks.md#{}\"", alert.to_lowercase())),
            "{alert} does not link its runbook section"
        );
    }
}

#[test]
fn the_dashboard_is_grafana_json_with_queries() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard.json");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                expr.contains("product_sync_"),
                "panel {}: {expr}",
                panel["title"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_named_by_the_alerts_and_the_dashboard_is_exported() {
    let named: BTreeSet<String> = metric_names(ALERTS)
        .into_iter()
        .chain(metric_names(DASHBOARD))
        .collect();
    assert!(named.len() >= 15, "{named:?}");
    let w = world(30, 2).await;
    let mut settings = w.settings.clone();
    settings.upstream.schedule = ScheduleSettings {
        incremental_every: Some(Duration::from_secs(1)),
        drift_check_cron: Some("*/2 * * * * *".parse().expect("cron")),
        ..ScheduleSettings::default()
    };
    let app = w.start_with(settings).await;
    // Real work: a command, a malformed one (dead-lettered), the schedules running.
    w.command("observed-1", json!({"all": true})).await;
    w.send("observed-bad", b"{not json", &[]).await;
    w.wait_results(&["observed-1"], Duration::from_secs(60))
        .await;
    let url = format!("http://{}/metrics", app.ops);
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let page = reqwest::get(&url)
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .expect("the page");
        let have = exported(&page);
        let missing: Vec<&String> = named.iter().filter(|n| !have.contains(*n)).collect();
        if missing.is_empty() || tokio::time::Instant::now() >= until {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    app.stop().await;
    assert!(
        missing.is_empty(),
        "named by deploy/observability/ but not exported by /metrics after a minute of work: {missing:?}"
    );
}
