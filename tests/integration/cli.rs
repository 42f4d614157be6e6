//! The binary as a person meets it: the demo runs to the end on embedded parts, and
//! configuration errors exit with 2 and name the key.

use std::process::Command;

fn binary() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_product-sync"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG");
    c
}

#[test]
fn the_demo_runs_to_the_end_and_shows_creates_updates_and_no_op_resyncs() {
    let out = binary().arg("demo").output().expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("`created` events on `product-changes`"),
        "{stdout}"
    );
    assert!(stdout.contains("\"op\": \"created\""), "{stdout}");
    assert!(stdout.contains("\"op\": \"updated\""), "{stdout}");
    assert!(
        stdout.contains("unchanged ones emitted nothing"),
        "{stdout}"
    );
    assert!(
        stdout.contains("demo-pension-again       completed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("SQLite"),
        "the output says where the data is: {stdout}"
    );
    assert!(stdout.contains("(delist_guard)"), "{stdout}");
    assert!(stdout.contains("3 `delisted` events"), "{stdout}");
    assert!(stdout.contains("\"op\": \"relisted\""), "{stdout}");
    // Act 4: a schedule picks a change made upstream up with no command sent.
    assert!(
        stdout.contains("5 `updated` events, each caused by a scheduled command"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"request_id\": \"sched:wms:incremental:"),
        "{stdout}"
    );
}

#[test]
fn a_configuration_error_exits_2_and_names_the_key_and_its_origin() {
    let out = binary()
        .arg("config")
        .env("PRODUCT_SYNC__UPSTREAM__PAGE_SIZ", "10")
        .output()
        .expect("config runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("upstream.page_siz") && stderr.contains("the environment"),
        "{stderr}"
    );
}

#[test]
fn the_effective_configuration_prints_without_secrets() {
    let out = binary()
        .arg("config")
        .env(
            "PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET",
            "cli-secret-value-123",
        )
        .env(
            "PRODUCT_SYNC__DATABASE__URL",
            "postgres://u:cli-db-password-456@db/ps",
        )
        .output()
        .expect("config runs");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("upstream.client_secret = \"[redacted]\""),
        "{stdout}"
    );
    assert!(
        !stdout.contains("cli-secret-value-123") && !stdout.contains("cli-db-password-456"),
        "{stdout}"
    );
}

#[test]
fn config_shows_every_system_with_its_secret_redacted() {
    let out = binary()
        .arg("config")
        .env(
            "PRODUCT_SYNC__UPSTREAM__SYSTEMS__FUND__BASE_URL",
            "https://fund.example",
        )
        .env(
            "PRODUCT_SYNC__UPSTREAM__SYSTEMS__FUND__CLIENT_SECRET",
            "cli-fund-secret-789",
        )
        .output()
        .expect("config runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("upstream.systems.fund.base_url = \"https://fund.example\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("upstream.systems.fund.client_secret = \"[redacted]\""),
        "{stdout}"
    );
    assert!(!stdout.contains("cli-fund-secret-789"), "{stdout}");
}

#[tokio::test]
async fn simulate_serves_several_systems_each_with_its_own_secret() {
    use std::io::{BufRead, BufReader};
    /// Killed when the test ends, however it ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut c = binary();
    c.args([
        "simulate",
        "--systems",
        "wms,fund",
        "--listen",
        "127.0.0.1:0",
        "--products",
        "5",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    let mut child = Killed(c.spawn().expect("simulate starts"));
    let stdout = child.0.stdout.take().expect("stdout");
    let lines: Vec<String> = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .take(2)
            .map(|l| l.expect("a line"))
            .collect()
    })
    .await
    .unwrap();
    let url_of = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{name} listening on ")))
            .unwrap_or_else(|| panic!("{name} in {lines:?}"))
            .to_owned()
    };
    let http = reqwest::Client::new();
    let token = |base: String, secret: &'static str| {
        let http = http.clone();
        async move {
            http.post(format!("{base}/oauth2/token"))
                .basic_auth("product-sync", Some(secret))
                .form(&[("grant_type", "client_credentials")])
                .send()
                .await
                .expect("token request")
                .status()
                .as_u16()
        }
    };
    assert_eq!(token(url_of("wms"), "local-dev-secret").await, 200);
    assert_eq!(token(url_of("fund"), "local-dev-secret-fund").await, 200);
    assert_eq!(token(url_of("fund"), "local-dev-secret").await, 401);
}

/// The broker's settings and a new one-partition topic named after `prefix`.
pub(crate) async fn one_partition_topic(
    prefix: &str,
) -> (product_sync::config::KafkaSettings, String) {
    let kafka = crate::helpers::require_kafka().await;
    let topic = crate::helpers::unique(prefix);
    product_sync::kafka::ensure_topics(
        &kafka,
        &[product_sync::kafka::TopicSpec {
            name: topic.clone(),
            partitions: 1,
            replication_factor: 1,
            compacted: false,
        }],
    )
    .await
    .unwrap();
    (kafka, topic)
}

#[tokio::test]
async fn request_publishes_a_command_that_tail_shows() {
    let (kafka, topic) = one_partition_topic("cli-requests").await;
    let env = [
        (
            "PRODUCT_SYNC__KAFKA__BOOTSTRAP_SERVERS",
            kafka.bootstrap_servers.as_str(),
        ),
        ("PRODUCT_SYNC__TOPICS__REQUESTS", topic.as_str()),
    ];
    let out = binary()
        .args([
            "request",
            "--keyword",
            "稳健",
            "--codes",
            "WM0000001,WM0000002",
            "--id",
            "cli-req-1",
        ])
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cli-req-1");

    let out = binary()
        .args([
            "tail",
            "--topic",
            "requests",
            "--from-beginning",
            "--count",
            "1",
        ])
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("key=cli-req-1") && shown.contains("稳健") && shown.contains("WM0000002"),
        "{shown}"
    );

    // A command the service would reject is refused before it is sent.
    let out = binary()
        .args(["request", "--id", "cli-req-2"])
        .envs(env)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("selector names nothing"));

    // A snapshot of the whole catalogue, forced; a keyword snapshot is refused with the reason.
    let out = binary()
        .args([
            "request",
            "--snapshot",
            "--all",
            "--force",
            "--id",
            "cli-snap",
        ])
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = binary()
        .args([
            "tail",
            "--topic",
            "requests",
            "--from-beginning",
            "--count",
            "2",
        ])
        .envs(env)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("key=cli-snap")
            && shown.contains("\"snapshot\"")
            && shown.contains("\"all\": true")
            && shown.contains("\"force\": true"),
        "{shown}"
    );
    let out = binary()
        .args(["request", "--snapshot", "--keyword", "稳健"])
        .envs(env)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a complete set"));
}

#[tokio::test]
async fn notify_publishes_a_notification_that_tail_shows_and_refuses_a_bad_one() {
    let (kafka, topic) = one_partition_topic("cli-notifications").await;
    let env = [
        (
            "PRODUCT_SYNC__KAFKA__BOOTSTRAP_SERVERS",
            kafka.bootstrap_servers.as_str(),
        ),
        ("PRODUCT_SYNC__TOPICS__NOTIFICATIONS", topic.as_str()),
    ];
    let out = binary()
        .args(["notify", "--codes", "WM0000001,WM0000002"])
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = binary()
        .args([
            "tail",
            "--topic",
            "notifications",
            "--from-beginning",
            "--count",
            "1",
        ])
        .envs(env)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("key=WM0000001") && shown.contains("\"WM0000002\""),
        "{shown}"
    );
    // What the service would refuse is refused before it is sent, with the same reason.
    for (args, reason) in [
        (vec!["notify", "--codes", "A B"], "not a product code"),
        (
            vec!["notify", "--system", "nope", "--codes", "A"],
            "unknown system",
        ),
    ] {
        let out = binary().args(&args).envs(env).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}

#[test]
fn schema_prints_the_three_message_schemas() {
    let out = binary().arg("schema").output().unwrap();
    assert!(out.status.success());
    let schemas: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("schema output is JSON");
    for (name, field) in [
        ("command", "selector"),
        ("change_event", "changes"),
        ("result_event", "counts"),
    ] {
        assert!(
            schemas[name]["properties"][field].is_object(),
            "{name} lacks {field}: {}",
            schemas[name]
        );
    }
}
