//! Test helpers: each test gets its own topics, consumer group and database on the real
//! broker and the real PostgreSQL; nothing is shared between tests.

use std::time::Duration;

use product_sync::config::{DatabaseSettings, KafkaSettings, LibrdkafkaOptions};
use rdkafka::consumer::{BaseConsumer, Consumer};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use secrecy::SecretString;

/// Broker of the tests; override with `PRODUCT_SYNC_TEST_KAFKA`.
pub fn kafka_bootstrap() -> String {
    std::env::var("PRODUCT_SYNC_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// Server-level URL of the tests' PostgreSQL; override with `PRODUCT_SYNC_TEST_DATABASE_URL`.
pub fn pg_admin_url() -> String {
    std::env::var("PRODUCT_SYNC_TEST_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://product_sync:product_sync@127.0.0.1:5432/product_sync".to_owned()
    })
}

/// A short unique suffix for names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Kafka settings pointing at the test broker, with a fresh group id.
pub fn kafka_settings() -> KafkaSettings {
    KafkaSettings {
        bootstrap_servers: kafka_bootstrap(),
        group_id: unique("test-group"),
        librdkafka: LibrdkafkaOptions::default(),
        require_tls: false,
    }
}

/// Fails the test, with the command that starts it, when the broker does not answer.
pub async fn require_kafka() -> KafkaSettings {
    let settings = kafka_settings();
    let bootstrap = settings.bootstrap_servers.clone();
    let probe = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("a consumer config with only bootstrap.servers is valid");
        consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|_| ())
    })
    .await
    .expect("metadata probe task panicked");
    if let Err(e) = probe {
        panic!(
            "Kafka is not reachable at {}: {e}. Start it with `deploy/local/kafka.sh up` \
             (or run the whole suite with `deploy/local/test.sh`).",
            settings.bootstrap_servers
        );
    }
    settings
}

/// A fresh, empty PostgreSQL database for one test. Fails with the command that starts
/// PostgreSQL when the server does not answer.
pub async fn fresh_pg_database() -> DatabaseSettings {
    let admin_url = pg_admin_url();
    let admin = Database::connect(admin_url.clone()).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at {}: {e}. Start it with `deploy/local/postgres.sh up` \
             (or run the whole suite with `deploy/local/test.sh`).",
            product_sync::config::redact_url(&admin_url)
        )
    });
    let name = unique("ps_test").replace('-', "_");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
    admin.close().await.ok();
    let mut url = url::Url::parse(&admin_url).expect("PRODUCT_SYNC_TEST_DATABASE_URL is a URL");
    url.set_path(&format!("/{name}"));
    database_settings(url.as_str())
}

/// A fresh SQLite file store; the directory lives as long as the returned guard.
pub fn fresh_sqlite_database() -> (tempfile::TempDir, DatabaseSettings) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("store.sqlite").display()
    );
    (dir, database_settings(&url))
}

/// Store settings for a URL, with a short connect budget so a missing server fails fast.
pub fn database_settings(url: &str) -> DatabaseSettings {
    DatabaseSettings {
        url: SecretString::from(url.to_owned()),
        max_connections: 5,
        migrate_on_start: true,
        connect_timeout: Duration::from_secs(5),
        require_tls: false,
    }
}

/// Connects to a test database (panics with context: tests only).
pub async fn connect(settings: &DatabaseSettings) -> DatabaseConnection {
    product_sync::store::connect(settings)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test database: {e}"))
}

/// Polls `check` until it returns `Some`, failing the test after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Everything every test logged through `tracing`, at TRACE level, in the production JSON
/// format; installed once for the whole test binary.
#[derive(Clone, Default)]
pub struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogBuffer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

pub struct LogWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter(self.0.clone())
    }
}

static LOGS: std::sync::OnceLock<LogBuffer> = std::sync::OnceLock::new();

pub fn captured_logs() -> LogBuffer {
    LOGS.get_or_init(|| {
        let buffer = LogBuffer::default();
        product_sync::telemetry::init_with_writer(
            &product_sync::config::LogSettings {
                level: "trace".into(),
                format: product_sync::config::LogFormat::Json,
            },
            buffer.clone(),
        );
        buffer
    })
    .clone()
}

/// A TCP proxy the test can cut and restore: an outage of one server (the broker, PostgreSQL)
/// for one process, without stopping the server the other tests share. Cut, it closes every
/// open connection and each new one at once; `refused` counts the connections it turned away.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    state: std::sync::Arc<ProxyState>,
    _stop: tokio_util::sync::DropGuard,
}

struct ProxyState {
    target: String,
    open: std::sync::atomic::AtomicBool,
    refused: std::sync::atomic::AtomicU64,
    /// Cancelled on every cut; the connections of one generation hold a child of it.
    live: std::sync::Mutex<tokio_util::sync::CancellationToken>,
}

impl Proxy {
    /// Listens on a free local port and forwards to `target` (`host:port`); `open` or cut.
    pub async fn start(target: &str, open: bool) -> Proxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy listens");
        let addr = listener.local_addr().expect("proxy address");
        let stop = tokio_util::sync::CancellationToken::new();
        let state = std::sync::Arc::new(ProxyState {
            target: target.to_owned(),
            open: AtomicBool::new(open),
            refused: AtomicU64::new(0),
            live: std::sync::Mutex::new(stop.child_token()),
        });
        let accepting = state.clone();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(c) => c,
                        Err(_) => continue,
                    },
                };
                if !accepting.open.load(Ordering::SeqCst) {
                    accepting.refused.fetch_add(1, Ordering::SeqCst);
                    drop(inbound);
                    continue;
                }
                let live = accepting
                    .live
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .child_token();
                let target = accepting.target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    // As the clients it stands in for: no Nagle delay (and a socket with it on
                    // would fail `store_smoke`'s check of the sockets to PostgreSQL).
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    tokio::select! {
                        _ = live.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            state,
            _stop: stop.drop_guard(),
        }
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.state.open.store(false, Ordering::SeqCst);
        let mut live = self.state.live.lock().unwrap_or_else(|e| e.into_inner());
        live.cancel();
        *live = tokio_util::sync::CancellationToken::new();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.state
            .open
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections turned away while cut.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}
