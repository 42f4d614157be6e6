//! TLS as in production: `product-sync run` with `PRODUCT_SYNC_ENV=production` and only the
//! settings docs/src/deploying.md lists for production completes a command against the
//! three-broker cluster's SASL_SSL listeners (SCRAM-SHA-512), PostgreSQL with ssl on and the
//! simulator over https with a CA made here; a wrong CA, a wrong SCRAM password and a
//! certificate for another host each stop the start with an error naming the setting, the
//! secrets never printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use product_sync::sim::{Catalogue, Sim, SimConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{fresh_pg_database, unique, wait_for};
use crate::pipeline::{ChildGuard, wait_exit};

/// The cluster `deploy/local/kafka.sh up --brokers 3` runs, as its client.properties says.
struct Cluster {
    plaintext: String,
    sasl_ssl: String,
    ca: String,
    user: String,
    password: String,
}

fn cluster() -> Cluster {
    let cache = std::env::var("PRODUCT_SYNC_CACHE").unwrap_or_else(|_| {
        format!(
            "{}/.cache/product-sync",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let port = std::env::var("KAFKA_CLUSTER_PORT").unwrap_or_else(|_| "19092".to_owned());
    let file = format!("{cache}/kafka-cluster-{port}/client.properties");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "the three-broker cluster's {file} cannot be read ({e}). Start the cluster with \
             `deploy/local/kafka.sh up --brokers 3` (or run the suite with `deploy/local/test.sh`)."
        )
    });
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{file} has no {key}"))
            .to_owned()
    };
    let password = std::fs::read_to_string(get("sasl.password.file"))
        .expect("the SCRAM password file of client.properties")
        .trim()
        .to_owned();
    let cluster = Cluster {
        plaintext: get("plaintext.bootstrap"),
        sasl_ssl: get("sasl_ssl.bootstrap"),
        ca: get("ssl.ca.location"),
        user: get("sasl.username"),
        password,
    };
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.plaintext)
        .create()
        .expect("a consumer with only bootstrap.servers");
    let nodes = probe
        .fetch_metadata(None, Duration::from_secs(10))
        .map(|m| m.brokers().len())
        .unwrap_or(0);
    assert_eq!(
        nodes, 3,
        "the three-broker cluster does not answer on {}: start it with \
         `deploy/local/kafka.sh up --brokers 3`",
        cluster.plaintext
    );
    cluster
}

/// A CA made with openssl for this test, and server certificates it signs.
struct TestCa {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    fn new() -> TestCa {
        let dir = tempfile::tempdir().expect("temporary directory");
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=tls test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        );
        TestCa { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server certificate for `san` (e.g. `IP:127.0.0.1`): its PEM and its PKCS#8 key.
    fn server(&self, name: &str, san: &str) -> (Vec<u8>, Vec<u8>) {
        let d = self.dir.path();
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(d.join(&ext), format!("subjectAltName={san}\n")).expect("ext file");
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=server",
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
        );
        let read = |f: &str| std::fs::read(d.join(f)).expect("certificate file");
        (read(&pem), read(&key))
    }
}

/// The simulator over https with `identity`; its base URL. Stops with `stop`.
async fn https_sim(identity: (Vec<u8>, Vec<u8>), secret: &str, stop: &CancellationToken) -> String {
    let acceptor = product_sync::sim::tls::acceptor(&identity.0, &identity.1).expect("identity");
    let sim = Sim::new(
        SimConfig {
            client_secret: secret.to_owned(),
            ..SimConfig::default()
        },
        Catalogue::generate(40, 7),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(sim.serve_tls(listener, acceptor, stop.clone()));
    format!("https://127.0.0.1:{}", addr.port())
}

/// One test's world: the cluster, a database reached over verified TLS, the simulator over
/// https, its own topics and group.
struct World {
    cluster: Cluster,
    ca: TestCa,
    env: Vec<(String, String)>,
    topics: (String, String),
    secret: String,
    logs: tempfile::TempDir,
    stop: CancellationToken,
}

async fn world() -> World {
    let cluster = cluster();
    let ca = TestCa::new();
    let stop = CancellationToken::new();
    let secret = format!("s3cr3t-{}", unique("c"));
    let sim = https_sim(ca.server("sim", "IP:127.0.0.1"), &secret, &stop).await;
    let db = fresh_pg_database().await;
    let mut url = url::Url::parse(secrecy::ExposeSecret::expose_secret(&db.url)).expect("url");
    url.query_pairs_mut()
        .append_pair("sslmode", "verify-full")
        .append_pair("sslrootcert", &cluster.ca);
    let name = unique("tls");
    let (requests, results) = (format!("{name}-requests"), format!("{name}-results"));
    let sim_ca = ca.ca().display().to_string();
    let env = [
        ("PRODUCT_SYNC_ENV", "production"),
        ("PRODUCT_SYNC__KAFKA__BOOTSTRAP_SERVERS", &cluster.sasl_ssl),
        ("PRODUCT_SYNC__KAFKA__GROUP_ID", &name),
        (
            "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SASL_USERNAME",
            &cluster.user,
        ),
        (
            "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SASL_PASSWORD",
            &cluster.password,
        ),
        (
            "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SSL_CA_LOCATION",
            &cluster.ca,
        ),
        ("PRODUCT_SYNC__DATABASE__URL", url.as_str()),
        ("PRODUCT_SYNC__UPSTREAM__BASE_URL", &sim),
        ("PRODUCT_SYNC__UPSTREAM__CLIENT_SECRET", &secret),
        ("PRODUCT_SYNC__UPSTREAM__CA_FILE", &sim_ca),
        ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", &sim),
        ("PRODUCT_SYNC__GOVERNANCE__CA_FILE", &sim_ca),
        ("PRODUCT_SYNC__HTTP__LISTEN", "127.0.0.1:0"),
        ("PRODUCT_SYNC__TOPICS__REQUESTS", &requests),
        ("PRODUCT_SYNC__TOPICS__RESULTS", &results),
        ("PRODUCT_SYNC__TOPICS__CHANGES", &format!("{name}-changes")),
        ("PRODUCT_SYNC__TOPICS__STATE", &format!("{name}-state")),
        ("PRODUCT_SYNC__TOPICS__DLQ", &format!("{name}-dlq")),
        ("PRODUCT_SYNC__TOPICS__RETRY", &format!("{name}-retry")),
        (
            "PRODUCT_SYNC__TOPICS__NOTIFICATIONS",
            &format!("{name}-notifications"),
        ),
        (
            "PRODUCT_SYNC__TOPICS__RELAY_PROGRESS",
            &format!("{name}-relay-progress"),
        ),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into();
    World {
        cluster,
        ca,
        env,
        topics: (requests, results),
        secret,
        logs: tempfile::tempdir().expect("log directory"),
        stop,
    }
}

impl World {
    /// `product-sync run` with this world's settings, `changes` applied on top; stderr to `log`.
    fn spawn(&self, log: &str, changes: &[(&str, &str)]) -> ChildGuard {
        let file = std::fs::File::create(self.logs.path().join(log)).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_product-sync"));
        command
            .arg("run")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (k, v) in changes {
            command.env(k, v);
        }
        command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map(ChildGuard::new)
            .expect("spawn product-sync run")
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.path().join(name)).unwrap_or_default()
    }

    /// Starts with `changes`, waits for the process to end on its own; its stderr.
    async fn refused_start(&self, name: &str, changes: &[(&str, &str)]) -> String {
        let mut child = self.spawn(name, changes);
        let status = wait_exit(&mut child, Duration::from_secs(90)).await;
        let log = self.log(name);
        assert!(!status.success(), "{name}: the start should fail: {log}");
        for secret in [&self.cluster.password, &self.secret] {
            assert!(
                !log.contains(secret.as_str()),
                "{name}: a secret was printed: {log}"
            );
        }
        log
    }
}

/// Every record of `topic` on the cluster (read_committed), as JSON.
fn read_all(cluster: &Cluster, topic: &str) -> Vec<Value> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.plaintext)
        .set("group.id", unique("tls-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .expect("reader");
    if consumer.subscribe(&[topic]).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < until {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let Some(v) = m.payload().and_then(|p| serde_json::from_slice(p).ok()) {
                    out.push(v);
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_production_configured_instance_completes_a_command_over_tls_everywhere() {
    let w = world().await;
    let mut child = w.spawn("run.log", &[]);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &w.cluster.plaintext)
        .create()
        .expect("producer");
    let (requests, results) = &w.topics;
    // The instance creates the topics at start; the command is sent once they exist.
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &w.cluster.plaintext)
        .create()
        .expect("metadata client");
    let until = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(status)) = child.child().try_wait() {
            panic!(
                "product-sync run exited with {status}: {}",
                w.log("run.log")
            );
        }
        let exists = probe
            .fetch_metadata(Some(requests.as_str()), Duration::from_secs(5))
            .is_ok_and(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.error().is_none() && !t.partitions().is_empty())
            });
        if exists {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the instance did not create {requests}: {}",
            w.log("run.log")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = json!({"request_id": "tls-1", "selector": {"all": true}}).to_string();
    producer
        .send(
            FutureRecord::to(requests.as_str())
                .key("tls-1")
                .payload(&body),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("the command sent");
    let result = wait_for(
        "a completed result over TLS",
        Duration::from_secs(120),
        || {
            let found = read_all(&w.cluster, results)
                .into_iter()
                .find(|r| r["request_id"] == "tls-1");
            std::future::ready(found)
        },
    )
    .await;
    assert_eq!(result["status"], "completed", "{result}");
    assert_eq!(result["counts"]["fetched"], 40, "{result}");
    drop(child);
    let log = w.log("run.log");
    assert!(
        log.contains("authorized with the management system"),
        "{log}"
    );
    for secret in [&w.cluster.password, &w.secret] {
        assert!(
            !log.contains(secret.as_str()),
            "a secret was printed: {log}"
        );
    }
    w.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_a_wrong_password_and_a_certificate_for_another_host_each_stop_the_start() {
    let w = world().await;
    let other_ca = w.ca.ca().display().to_string();
    let log = w
        .refused_start(
            "kafka-ca.log",
            &[(
                "PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SSL_CA_LOCATION",
                &other_ca,
            )],
        )
        .await;
    assert!(
        log.contains("\"ssl.ca.location\""),
        "names the Kafka CA setting: {log}"
    );

    let wrong = format!("wr0ng-{}", unique("p"));
    let log = w
        .refused_start(
            "kafka-password.log",
            &[("PRODUCT_SYNC__KAFKA__LIBRDKAFKA__SASL_PASSWORD", &wrong)],
        )
        .await;
    assert!(
        log.contains("\"sasl.password\""),
        "names the SCRAM password setting: {log}"
    );
    assert!(
        !log.contains(&wrong),
        "the wrong password was printed: {log}"
    );

    let log = w
        .refused_start(
            "database-ca.log",
            &[(
                "PRODUCT_SYNC__DATABASE__URL",
                &database_url_with_ca(&w, &other_ca),
            )],
        )
        .await;
    assert!(
        log.contains("sslrootcert"),
        "names the database's CA setting: {log}"
    );

    // The simulator presents a certificate its CA signed, but for another host.
    let elsewhere = https_sim(
        w.ca.server("other", "DNS:other.example"),
        &w.secret,
        &w.stop,
    )
    .await;
    let log = w
        .refused_start(
            "other-host.log",
            &[
                ("PRODUCT_SYNC__UPSTREAM__BASE_URL", &elsewhere),
                ("PRODUCT_SYNC__GOVERNANCE__BASE_URL", &elsewhere),
            ],
        )
        .await;
    assert!(log.contains("ca_file"), "names the CA setting: {log}");
    assert!(
        log.contains("names the host"),
        "says the host may be wrong: {log}"
    );
    w.stop.cancel();
}

/// The world's database URL with `sslrootcert` set to `ca`.
fn database_url_with_ca(w: &World, ca: &str) -> String {
    let url = &w
        .env
        .iter()
        .find(|(k, _)| k == "PRODUCT_SYNC__DATABASE__URL")
        .expect("a database URL")
        .1;
    let mut url = url::Url::parse(url).expect("url");
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "sslrootcert" {
                ca.to_owned()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    url.to_string()
}

#[tokio::test]
async fn the_simulator_serves_https_with_tls_cert_and_tls_key() {
    let ca = TestCa::new();
    let (cert, key) = ca.server("cli", "IP:127.0.0.1");
    let dir = tempfile::tempdir().expect("temporary directory");
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert).expect("cert file");
    std::fs::write(&key_file, key).expect("key file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_product-sync"))
        .args([
            "simulate",
            "--listen",
            "127.0.0.1:0",
            "--products",
            "3",
            "--tls-cert",
        ])
        .arg(&cert_file)
        .arg("--tls-key")
        .arg(&key_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(ChildGuard::new)
        .expect("spawn product-sync simulate");
    let stdout = child.child().stdout.take().expect("stdout");
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    })
    .await
    .expect("reader task")
    .expect("first line");
    let base = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    let pem = std::fs::read(ca.ca()).expect("CA file");
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA"))
        .build()
        .expect("client");
    let token = trusting
        .post(format!("{base}/oauth2/token"))
        .basic_auth("product-sync", Some("local-dev-secret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("a token over https");
    assert!(token.status().is_success(), "{}", token.status());
    // A client that does not trust the test CA is refused by its own verification.
    let plain = reqwest::Client::new()
        .post(format!("{base}/oauth2/token"))
        .send()
        .await;
    assert!(plain.is_err(), "an untrusted certificate was accepted");
    drop(child);
}
