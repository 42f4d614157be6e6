//! Smoke tests of the store against real PostgreSQL and SQLite: migrations apply, are
//! idempotent and safe when several instances migrate at once; an unreachable database is
//! reported as transient without leaking its password.

use std::time::Duration;

use product_sync::store::{self, migration::Migrator};
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};
use sea_orm_migration::MigratorTrait;

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
