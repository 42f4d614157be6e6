//! Smoke tests of the store against real PostgreSQL and SQLite: migrations apply, are
//! idempotent and safe when several instances migrate at once; an unreachable database is
//! reported as transient without leaking its password; the connections send without Nagle's
//! delay.

use std::time::Duration;

use product_sync::store::{self, migration::Migrator};
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};
use sea_orm_migration::MigratorTrait;
use secrecy::ExposeSecret;

use crate::helpers::{connect, database_settings, fresh_pg_database, fresh_sqlite_database};

async fn table_names(db: &sea_orm::DatabaseConnection) -> Vec<String> {
    let sql = match db.get_database_backend() {
        DatabaseBackend::Postgres => {
            "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"
        }
        _ => "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1",
    };
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect("list tables")
        .iter()
        .map(|row| row.try_get::<String>("", "name").expect("name column"))
        .collect()
}

async fn assert_schema(db: &sea_orm::DatabaseConnection) {
    let names = table_names(db).await;
    for table in [
        "products",
        "product_changes",
        "requests",
        "seaql_migrations",
    ] {
        assert!(
            names.iter().any(|n| n == table),
            "table {table} missing from {names:?}"
        );
    }
    assert!(
        Migrator::get_pending_migrations(db)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn postgres_migrations_apply_and_are_idempotent() {
    let settings = fresh_pg_database().await;
    let db = connect(&settings).await;
    assert_eq!(db.get_database_backend(), DatabaseBackend::Postgres);
    store::migrate(&db).await.expect("first migration");
    store::migrate(&db)
        .await
        .expect("second migration is a no-op");
    assert_schema(&db).await;
}

/// The sockets of this process connected to `port` on the loopback, with their TCP_NODELAY.
fn loopback_sockets_to(port: u16) -> Vec<(std::net::SocketAddr, bool)> {
    use std::os::fd::BorrowedFd;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let entry = entry.expect("fd entry");
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // closed meanwhile
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the fd was open a moment ago; if it closed meanwhile the calls below fail
        // (EBADF) or read another socket's options, which the port filter then sorts out.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let Some(peer) = socket.peer_addr().ok().and_then(|a| a.as_socket()) else {
            continue;
        };
        if peer.port() == port && peer.ip().is_loopback() {
            found.push((peer, socket.tcp_nodelay().expect("TCP_NODELAY readable")));
        }
    }
    found
}

/// sqlx 0.9.0 left Nagle's algorithm on: a statement whose bind message spanned two segments
/// waited for the server's delayed ACK (40 ms on Linux) — a page's fold took 90 ms instead of
/// 5. Every connection of the store's pool must have TCP_NODELAY set.
#[tokio::test]
async fn postgres_connections_send_without_nagle_delay() {
    let settings = fresh_pg_database().await;
    let url = url::Url::parse(settings.url.expose_secret()).expect("database URL");
    let port = url.port().unwrap_or(5432);
    // The check can fail: a plain socket to the same port (Nagle on) is seen as such.
    let plain = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to PostgreSQL");
    let local = plain.local_addr().expect("local address");
    let seen = loopback_sockets_to(port);
    assert!(
        seen.iter().any(|(_, nodelay)| !nodelay),
        "a plain socket ({local}) with Nagle on was not seen among {seen:?}"
    );
    drop(plain);
    let db = connect(&settings).await;
    // Two statements at once: at least two pooled connections are open afterwards.
    let sql = "SELECT pg_sleep(0.05)";
    let (a, b) = tokio::join!(db.execute_unprepared(sql), db.execute_unprepared(sql));
    a.expect("first statement");
    b.expect("second statement");
    let sockets = loopback_sockets_to(port);
    assert!(
        !sockets.is_empty(),
        "no socket of this process is connected to PostgreSQL's port {port}"
    );
    let nagled: Vec<_> = sockets.iter().filter(|(_, nodelay)| !nodelay).collect();
    assert!(
        nagled.is_empty(),
        "connections to PostgreSQL with Nagle's algorithm on (TCP_NODELAY unset): {nagled:?}"
    );
}

#[tokio::test]
async fn postgres_concurrent_migrations_from_several_instances() {
    let settings = fresh_pg_database().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let settings = settings.clone();
        tasks.push(tokio::spawn(async move {
            let db = connect(&settings).await;
            store::migrate(&db).await
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("every instance migrates without error");
    }
    let db = connect(&settings).await;
    assert_schema(&db).await;
    let applied = Migrator::get_applied_migrations(&db).await.unwrap();
    assert_eq!(
        applied.len(),
        Migrator::migrations().len(),
        "each migration recorded once"
    );
}

#[tokio::test]
async fn sqlite_migrations_apply_and_are_idempotent() {
    let (_dir, settings) = fresh_sqlite_database();
    let db = connect(&settings).await;
    assert_eq!(db.get_database_backend(), DatabaseBackend::Sqlite);
    store::migrate(&db).await.expect("first migration");
    store::migrate(&db)
        .await
        .expect("second migration is a no-op");
    assert_schema(&db).await;
}

#[tokio::test]
async fn unreachable_database_is_transient_and_hides_the_password() {
    // Port 1 on loopback: nothing listens there.
    let mut settings = database_settings("postgres://app:pw-must-not-leak-42@127.0.0.1:1/none");
    settings.connect_timeout = Duration::from_millis(600);
    let err = store::connect(&settings)
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_transient(), "{err}");
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains("pw-must-not-leak-42"),
        "password leaked: {shown}"
    );
    assert!(
        shown.contains("127.0.0.1:1"),
        "the error names the server: {shown}"
    );
}
