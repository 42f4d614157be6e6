//! Loading tests: layers, environment overrides, key naming in errors, redaction.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::ExposeSecret;

use super::*;

fn sources(vars: &[(&str, &str)]) -> Sources {
    Sources {
        dir: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")),
        env_name: None,
        file: None,
        vars: Some(
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
    }
}

#[test]
fn defaults_load_and_env_overrides_win() {
    let s = load(&sources(&[
        ("PRODUCT_SYNC__KAFKA__BOOTSTRAP_SERVERS", "10.0.0.1:9092"),
        ("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "250"),
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "s3cr3t-from-env"),
        ("PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SECURITY_PROTOCOL", "ssl"),
    ]))
    .unwrap();
    assert_eq!(s.kafka.bootstrap_servers, "10.0.0.1:9092");
    assert_eq!(s.upstream.page_size, 250);
    assert_eq!(s.upstream.client_secret.expose_secret(), "s3cr3t-from-env");
    assert_eq!(s.kafka.librdkafka.get("security.protocol"), Some("ssl"));
    // The local environment file is layered over the defaults.
    assert_eq!(s.log.format, LogFormat::Pretty);
}

#[test]
fn a_further_system_takes_its_own_keys_and_its_secret_from_the_environment() {
    let dir = std::env::temp_dir().join(format!("ps-systems-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("systems.toml");
    std::fs::write(
        &file,
        "[upstream.systems.fund]\nbase_url = \"https://fund.example\"\nrate_limit_per_s = 20\n",
    )
    .unwrap();
    let mut src = sources(&[
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "wms-secret-1"),
        (
            "PRODUCT_SYNC__UPSTREAM__SYSTEMS__FUND__CLIENT_SECRET",
            "fund-secret-2",
        ),
        ("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "250"),
    ]);
    src.file = Some(file.clone());
    let s = load(&src).unwrap();
    let names: Vec<&str> = s.all_systems().map(|u| u.system.as_str()).collect();
    assert_eq!(names, ["wms", "fund"]);
    let fund = &s.systems[0];
    assert_eq!(fund.base_url, "https://fund.example");
    assert_eq!(fund.client_secret.expose_secret(), "fund-secret-2");
    assert_eq!(fund.rate_limit_per_s, Some(20));
    assert_eq!(fund.page_size, 250, "inherited from [upstream]");
    assert_eq!(s.upstream.client_secret.expose_secret(), "wms-secret-1");
    let shown = s.to_string();
    assert!(shown.contains("upstream.systems.fund.base_url = \"https://fund.example\""));
    assert!(shown.contains("upstream.systems.fund.client_secret = \"[redacted]\""));
    assert!(!shown.contains("fund-secret-2") && !shown.contains("wms-secret-1"));

    std::fs::write(&file, "[upstream.systems.fund]\nbase_urll = \"x\"\n").unwrap();
    let err = load(&src).unwrap_err().to_string();
    assert!(err.contains("upstream.systems.fund.base_urll"), "{err}");
    assert!(err.contains("systems.toml"), "names the file: {err}");
    std::fs::write(&file, "[upstream.systems.fund]\ncircuit_failures = 0\n").unwrap();
    let err = load(&src).unwrap_err().to_string();
    assert!(
        err.contains("upstream.systems.fund.circuit_failures"),
        "{err}"
    );
    std::fs::write(&file, "[upstream.systems.wms]\n").unwrap();
    let err = load(&src).unwrap_err().to_string();
    assert!(err.contains("names a system twice"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn retry_delays_come_from_a_file_as_a_list_and_from_the_environment_as_text() {
    let s = load(&sources(&[])).unwrap();
    assert_eq!(s.pipeline.retry_delays.len(), 4, "the default list");
    assert_eq!(s.pipeline.retry_delays[0], Duration::from_secs(10));
    let s = load(&sources(&[(
        "PRODUCT_SYNC__PIPELINE__RETRY_DELAYS_MS",
        "5000, 15000",
    )]))
    .unwrap();
    assert_eq!(
        s.pipeline.retry_delays,
        [Duration::from_secs(5), Duration::from_secs(15)]
    );
    let err = load(&sources(&[(
        "PRODUCT_SYNC__PIPELINE__RETRY_DELAYS_MS",
        "5s",
    )]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("pipeline.retry_delays_ms"), "{err}");
}

#[test]
fn durations_are_typed_and_the_drain_must_end_before_the_session_does() {
    let s = load(&sources(&[(
        "PRODUCT_SYNC__PIPELINE__DRAIN_TIMEOUT_MS",
        "1500",
    )]))
    .unwrap();
    assert_eq!(s.pipeline.drain_timeout, Duration::from_millis(1500));
    let err = load(&sources(&[(
        "PRODUCT_SYNC__PIPELINE__DRAIN_TIMEOUT_MS",
        "45000",
    )]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("pipeline.drain_timeout_ms"), "{err}");
    assert!(err.contains("session timeout (45000 ms"), "{err}");
    let err = load(&sources(&[
        ("PRODUCT_SYNC__PIPELINE__DRAIN_TIMEOUT_MS", "7000"),
        (
            "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SESSION_TIMEOUT_MS",
            "6000",
        ),
    ]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("(6000 ms"), "{err}");
}

#[test]
fn environment_strings_stay_as_written() {
    let s = load(&sources(&[
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "00123"),
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_ID", "1e3"),
        ("PRODUCT_SYNC__UPSTREAM__SYSTEM", "TRUE"),
        ("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "0250"),
        ("PRODUCT_SYNC__GOVERNANCE__ENABLED", "true"),
    ]))
    .unwrap();
    assert_eq!(s.upstream.client_secret.expose_secret(), "00123");
    assert_eq!(s.upstream.client_id, "1e3");
    assert_eq!(s.upstream.system, "TRUE");
    // Numbers and booleans still parse from their strings.
    assert_eq!(s.upstream.page_size, 250);
    assert!(s.governance.enabled);
}

#[test]
fn a_password_in_a_url_query_is_redacted() {
    let r =
        redact_url("postgres://u:pw@db:5432/x?sslmode=verify-full&password=hunter2&sslpassword=k");
    assert!(
        !r.contains("hunter2") && !r.contains("pw@") && !r.contains("=k"),
        "{r}"
    );
    assert!(r.contains("sslmode=verify-full"), "{r}");
}

#[test]
fn production_file_selected_by_env() {
    let s = load(&sources(&[
        ("PRODUCT_SYNC_ENV", "production"),
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "x"),
        ("PRODUCT_SYNC__UPSTREAM__BASE_URL", "https://wms.example"),
        ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", "https://gov.example"),
    ]))
    .unwrap();
    assert_eq!(s.log.format, LogFormat::Json);
}

#[test]
fn production_requires_tls_to_the_store_and_the_broker() {
    let base = [
        ("PRODUCT_SYNC_ENV", "production"),
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "x"),
        ("PRODUCT_SYNC__UPSTREAM__BASE_URL", "https://wms.example"),
        ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", "https://gov.example"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut vars = base.to_vec();
        vars.extend_from_slice(extra);
        load(&sources(&vars))
    };
    let err = with(&[("PRODUCT_SYNC__DATABASE__URL", "postgres://u:pw@db/x")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("database.url") && err.contains("sslmode"),
        "{err}"
    );
    assert!(!err.contains("pw@"), "{err}");
    with(&[(
        "PRODUCT_SYNC__DATABASE__URL",
        "postgres://u:pw@db/x?sslmode=verify-full",
    )])
    .unwrap();
    let err = with(&[(
        "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SECURITY_PROTOCOL",
        "plaintext",
    )])
    .unwrap_err()
    .to_string();
    assert!(err.contains("kafka.require_tls"), "{err}");
}

#[test]
fn production_refuses_plain_http_unless_allowed() {
    let err = load(&sources(&[
        ("PRODUCT_SYNC_ENV", "production"),
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "x"),
        (
            "PRODUCT_SYNC__UPSTREAM__BASE_URL",
            "http://u:pw@wms.example",
        ),
        ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", "https://gov.example"),
    ]))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("upstream.base_url") && err.contains("upstream.allow_http"),
        "{err}"
    );
    assert!(!err.contains("pw"), "{err}");
    let allowed = load(&sources(&[
        ("PRODUCT_SYNC_ENV", "production"),
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "x"),
        ("PRODUCT_SYNC__UPSTREAM__BASE_URL", "http://wms.example"),
        ("PRODUCT_SYNC__UPSTREAM__ALLOW_HTTP", "true"),
        ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", "http://gov.example"),
    ]));
    let err = allowed.unwrap_err().to_string();
    assert!(err.contains("governance.allow_http"), "{err}");
}

#[test]
fn a_ca_file_must_hold_a_pem_certificate_and_is_named_when_it_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let missing = dir.path().join("missing.pem");
    for (key, var) in [
        ("upstream.ca_file", "PRODUCT_SYNC__UPSTREAM__CA_FILE"),
        ("governance.ca_file", "PRODUCT_SYNC__GOVERNANCE__CA_FILE"),
    ] {
        for (path, why) in [
            (&not_pem, "holds no PEM certificate"),
            (&missing, "cannot read"),
        ] {
            let err = load(&sources(&[(var, path.to_str().unwrap())]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(why), "{err}");
        }
    }
    let pem = dir.path().join("ca.pem");
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let s = load(&sources(&[(
        "PRODUCT_SYNC__UPSTREAM__CA_FILE",
        pem.to_str().unwrap(),
    )]))
    .unwrap();
    assert_eq!(s.upstream.ca_file.as_deref(), Some(pem.as_path()));
}

#[test]
fn unknown_env_key_is_named_with_origin() {
    let err = load(&sources(&[("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRETT", "x")])).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::UnknownKey { .. }), "{msg}");
    assert!(msg.contains("`upstream.client_secrett`"), "{msg}");
    assert!(msg.contains("the environment"), "{msg}");
    assert!(!msg.contains("\"x\""), "{msg}");
}

#[test]
fn unknown_file_key_is_named_with_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("extra.toml");
    std::fs::write(&file, "[database]\nurll = \"sqlite::memory:\"\n").unwrap();
    let mut src = sources(&[]);
    src.file = Some(file.clone());
    let msg = load(&src).unwrap_err().to_string();
    assert!(msg.contains("`database.urll`"), "{msg}");
    assert!(msg.contains("extra.toml"), "{msg}");
}

#[test]
fn wrong_type_is_named_with_origin() {
    let msg = load(&sources(&[("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "many")]))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("upstream.page_size"), "{msg}");
    assert!(msg.contains("the environment"), "{msg}");
}

#[test]
fn out_of_range_value_is_refused() {
    let msg = load(&sources(&[("PRODUCT_SYNC__UPSTREAM__PAGE_SIZE", "0")]))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("upstream.page_size") && msg.contains("between 1 and 1000"),
        "{msg}"
    );
    let msg = load(&sources(&[(
        "PRODUCT_SYNC__DATABASE__URL",
        "mysql://u:hunter2@h/db",
    )]))
    .unwrap_err()
    .to_string();
    assert!(msg.contains("database.url"), "{msg}");
    assert!(
        !msg.contains("hunter2"),
        "password leaked into the error: {msg}"
    );
}

#[test]
fn missing_explicit_env_file_is_an_error() {
    let msg = load(&sources(&[("PRODUCT_SYNC_ENV", "staging")]))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("staging.toml"), "{msg}");
}

#[test]
fn display_redacts_secrets() {
    let s = load(&sources(&[
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "topsecret-value"),
        (
            "PRODUCT_SYNC__DATABASE__URL",
            "postgres://app:dbpass-value@db:5432/ps",
        ),
        (
            "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SASL_PASSWORD",
            "kafkapass-value",
        ),
    ]))
    .unwrap();
    let shown = format!("{s}\n{s:?}");
    assert!(shown.contains("sasl.password"), "{shown}");
    for secret in ["topsecret-value", "dbpass-value", "kafkapass-value"] {
        assert!(!shown.contains(secret), "{secret} leaked: {shown}");
    }
}

#[test]
fn env_var_names_follow_the_contract() {
    assert_eq!(
        env_name_of("upstream.client_secret"),
        "PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET"
    );
}

#[test]
fn schedules_come_from_the_environment_and_a_system_table_replaces_the_inherited_one() {
    let dir = std::env::temp_dir().join(format!("ps-schedule-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("schedule.toml");
    std::fs::write(
        &file,
        "[upstream.schedule]\nsnapshot_cron = \"0 0 2 * * *\"\ntimezone = \"Asia/Shanghai\"\n\
         [upstream.systems.fund]\nbase_url = \"https://fund.example\"\n\
         [upstream.systems.bond]\nbase_url = \"https://bond.example\"\n\
         [upstream.systems.bond.schedule]\ndrift_check_cron = \"0 30 * * * *\"\n",
    )
    .unwrap();
    let mut src = sources(&[(
        "PRODUCT_SYNC__UPSTREAM__SCHEDULE__INCREMENTAL_EVERY_MS",
        "3000",
    )]);
    src.file = Some(file.clone());
    let s = load(&src).unwrap();
    let wms = &s.upstream.schedule;
    assert_eq!(wms.incremental_every, Some(Duration::from_secs(3)));
    assert_eq!(wms.snapshot_cron.as_ref().unwrap().source(), "0 0 2 * * *");
    assert_eq!(wms.timezone.name(), "Asia/Shanghai");
    assert_eq!(wms.watermark_overlap, Duration::from_secs(120), "default");
    // fund has no schedule table: it takes [upstream.schedule] whole.
    let system = |name: &str| s.systems.iter().find(|u| u.system == name).unwrap();
    assert_eq!(
        system("fund").schedule.incremental_every,
        Some(Duration::from_secs(3))
    );
    // bond's own table replaces it whole.
    let bond = &system("bond").schedule;
    assert_eq!(bond.incremental_every, None);
    assert!(bond.snapshot_cron.is_none());
    assert_eq!(
        bond.drift_check_cron.as_ref().unwrap().source(),
        "0 30 * * * *"
    );
    assert!(
        s.to_string()
            .contains("upstream.schedule.incremental_every_ms = 3000")
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_bad_schedule_setting_is_refused_naming_its_key() {
    let cases = [
        (
            "SNAPSHOT_CRON",
            "0 0 25 * * *",
            "upstream.schedule.snapshot_cron",
            "not a cron",
        ),
        (
            "DRIFT_CHECK_CRON",
            "0 2 * * *",
            "upstream.schedule.drift_check_cron",
            "5 fields",
        ),
        (
            "TIMEZONE",
            "Mars/Olympus",
            "upstream.schedule.timezone",
            "IANA",
        ),
        (
            "WATERMARK_OVERLAP_MS",
            "-5",
            "upstream.schedule.watermark_overlap_ms",
            "negative",
        ),
        (
            "INCREMENTAL_EVERY_MS",
            "10",
            "upstream.schedule.incremental_every_ms",
            "between",
        ),
        ("EVERY_MS", "10", "upstream.schedule.every_ms", "unknown"),
    ];
    for (leaf, value, key, why) in cases {
        let var = format!("PRODUCT_SYNC__UPSTREAM__SCHEDULE__{leaf}");
        let err = load(&sources(&[(var.as_str(), value)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        assert!(err.contains(why), "{key}: {err}");
        assert!(err.contains("environment"), "names the layer: {err}");
    }
    // An overlap longer than the interval is fine.
    let s = load(&sources(&[
        (
            "PRODUCT_SYNC__UPSTREAM__SCHEDULE__INCREMENTAL_EVERY_MS",
            "1000",
        ),
        (
            "PRODUCT_SYNC__UPSTREAM__SCHEDULE__WATERMARK_OVERLAP_MS",
            "600000",
        ),
    ]))
    .unwrap();
    assert_eq!(
        s.upstream.schedule.watermark_overlap,
        Duration::from_secs(600)
    );
}

#[test]
fn notifications_are_on_by_default_and_their_settings_are_checked_by_key() {
    let s = load(&sources(&[])).unwrap();
    assert_eq!(s.topics.notifications, "product-notifications");
    assert_eq!(s.notifications.window, Duration::from_millis(1000));
    assert_eq!(s.notifications.max_pending_codes, 10_000);
    let off = load(&sources(&[("PRODUCT_SYNC__TOPICS__NOTIFICATIONS", "")])).unwrap();
    assert!(off.topics.notifications.is_empty());
    for (var, value, key) in [
        (
            "PRODUCT_SYNC__NOTIFICATIONS__WINDOW_MS",
            "5",
            "notifications.window_ms",
        ),
        (
            "PRODUCT_SYNC__NOTIFICATIONS__MAX_PENDING_CODES",
            "0",
            "notifications.max_pending_codes",
        ),
        (
            "PRODUCT_SYNC__TOPICS__NOTIFICATIONS",
            "product-requests",
            "topics.notifications",
        ),
    ] {
        let e = load(&sources(&[(var, value)])).unwrap_err().to_string();
        assert!(
            e.contains(key) && e.contains("set in the environment"),
            "{e}"
        );
    }
}

#[test]
fn operator_tokens_come_from_the_environment_by_name_and_are_never_shown() {
    let s = load(&sources(&[
        (
            "PRODUCT_SYNC__HTTP__OPERATOR_TOKENS__ALICE",
            "alice-token-value",
        ),
        (
            "PRODUCT_SYNC__HTTP__OPERATOR_TOKENS__BOB",
            "bob-token-value",
        ),
        ("PRODUCT_SYNC__HTTP__ADMIN_TOKEN", "admin-token-value"),
    ]))
    .unwrap();
    let names: Vec<String> = s.http.operators().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["admin", "alice", "bob"]);
    assert!(!s.http.require_token_for_reads);
    let shown = format!("{s}\n{s:?}");
    assert!(shown.contains("alice") && shown.contains("bob"), "{shown}");
    for secret in ["alice-token-value", "bob-token-value", "admin-token-value"] {
        assert!(!shown.contains(secret), "{secret} leaked: {shown}");
    }
    // Production protects reads.
    let s = load(&sources(&[
        ("PRODUCT_SYNC_ENV", "production"),
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", "x"),
        ("PRODUCT_SYNC__UPSTREAM__BASE_URL", "https://wms.example"),
        ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", "https://gov.example"),
        (
            "PRODUCT_SYNC__DATABASE__URL",
            "postgres://u:pw@db/x?sslmode=verify-full",
        ),
    ]))
    .unwrap();
    assert!(s.http.require_token_for_reads);
}

#[test]
fn operator_tokens_that_could_not_be_told_apart_are_refused_naming_the_key() {
    for vars in [
        [
            (
                "PRODUCT_SYNC__HTTP__OPERATOR_TOKENS__ALICE",
                "same-token-value",
            ),
            (
                "PRODUCT_SYNC__HTTP__OPERATOR_TOKENS__BOB",
                "same-token-value",
            ),
        ],
        [
            (
                "PRODUCT_SYNC__HTTP__OPERATOR_TOKENS__ADMIN",
                "one-token-value",
            ),
            ("PRODUCT_SYNC__HTTP__ADMIN_TOKEN", "other-token-value"),
        ],
        [
            (
                "PRODUCT_SYNC__HTTP__OPERATOR_TOKENS__ALICE",
                "one-token-value",
            ),
            (
                "PRODUCT_SYNC__HTTP__OPERATOR_TOKENS__A B",
                "other-token-value",
            ),
        ],
    ] {
        let msg = load(&sources(&vars)).unwrap_err().to_string();
        assert!(msg.contains("http.operator_tokens"), "{msg}");
        assert!(!msg.contains("token-value"), "a token leaked: {msg}");
    }
}
