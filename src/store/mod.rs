//! The store: connecting to PostgreSQL (production) or SQLite (embedded default) through
//! sea-orm, retrying an unreachable database, and applying migrations safely when several
//! instances start at once.

use std::time::Duration;

use sea_orm::sqlx;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection, DbErr,
    RuntimeErr, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use secrecy::ExposeSecret;

use crate::config::DatabaseSettings;
use crate::retry::{RetryPolicy, Transient, retry};

pub mod audit;
pub mod entity;
pub mod fold;
pub mod migration;
pub mod notifications;
pub mod pauses;
pub mod requests;
pub mod schedules;

/// Errors at the store boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached (within the start-up budget, or mid-operation).
    #[error("database at {url} is unreachable: {source}")]
    Unreachable { url: String, source: DbErr },
    /// The database refused this client's TLS or password: a setting to fix (permanent).
    #[error("database at {url} refused the connection: {reason}; check {settings}")]
    Refused {
        url: String,
        reason: String,
        settings: &'static str,
    },
    /// A statement failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    /// Applying migrations failed.
    #[error("migrating the schema failed: {0}")]
    Migration(DbErr),
    /// A concurrent writer changed a row this transaction read; it was rolled back and may be
    /// run again from a fresh read.
    #[error("a concurrent writer changed the same products; the fold was rolled back")]
    Conflict,
    /// A record of the page breaks the contract; nothing of the page was applied.
    #[error("record {index} ({identity}) of the page breaks the contract: {error}")]
    InvalidRecord {
        index: usize,
        identity: String,
        error: crate::product::RecordError,
    },
    /// A stored row cannot be read back as a product (edited by hand, or a bug).
    #[error("stored product {id} is unreadable: {reason}")]
    Corrupt { id: i64, reason: String },
}

impl Transient for StoreError {
    fn is_transient(&self) -> bool {
        match self {
            StoreError::Unreachable { .. } => true,
            StoreError::Db(e) => db_err_is_transient(e),
            StoreError::Migration(e) => db_err_is_transient(e),
            StoreError::Conflict => true,
            StoreError::Corrupt { .. }
            | StoreError::InvalidRecord { .. }
            | StoreError::Refused { .. } => false,
        }
    }
}

impl StoreError {
    /// See [`Transient::is_transient`].
    pub fn is_transient(&self) -> bool {
        Transient::is_transient(self)
    }
}

/// Connection loss, pool exhaustion, serialization failures and deadlocks heal by retrying;
/// constraint violations and type errors do not. A protocol or TLS error on a statement
/// comes from a connection the pool opened or used mid-run, broken on the way (the cluster
/// chaos run saw `unexpected response from SSLRequest: 0x00` through a faulty link and
/// dead-lettered a command for good): the start-up connection has already proven the server
/// and its certificate, so a retry on a new connection heals it.
pub fn db_err_is_transient(e: &DbErr) -> bool {
    match e {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            sqlx_is_transient(e)
        }
        _ => false,
    }
}

fn sqlx_is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // PostgreSQL: connection exceptions (08…), serialization failure, deadlock,
            // shutdown / crash, too many connections. SQLite: BUSY (5) and LOCKED (6).
            Some(code) => {
                code.starts_with("08")
                    || matches!(
                        code,
                        "40001"
                            | "40P01"
                            | "57P01"
                            | "57P02"
                            | "57P03"
                            | "53300"
                            | "5"
                            | "6"
                            | "517"
                            | "262"
                    )
            }
            None => false,
        },
        _ => false,
    }
}

/// A connection error no retry cures, with the settings to check: a failed TLS handshake
/// (the CA, the host the certificate names) or refused credentials (28P01, 28000). A
/// handshake the network cut short is not one of them.
fn refusal(e: &DbErr) -> Option<(String, &'static str)> {
    let DbErr::Conn(RuntimeErr::SqlxError(e)) = e else {
        return None;
    };
    let cut = |text: &str| crate::text::cut(text, crate::text::REASON_CHARS);
    match &**e {
        sqlx::Error::Tls(tls) if !cut_by_network(&**tls) => Some((
            cut(&tls.to_string()),
            "the sslrootcert= of database.url (the CA that signed the server's certificate) and that the certificate names the URL's host",
        )),
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("28P01" | "28000")) => {
            Some((cut(db.message()), "the user and password of database.url"))
        }
        _ => None,
    }
}

/// A TLS handshake the network cut short says nothing of the certificate: an I/O error, or
/// the peer gone mid-handshake (OpenSSL's `unexpected EOF`: the cluster chaos run's link
/// reset the connection while an instance started, and the instance stopped for good on a
/// "refusal"). The connection is retried like any unreachable database.
fn cut_by_network(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<std::io::Error>() || e.to_string() == "unexpected EOF" {
            return true;
        }
        next = e.source();
    }
    false
}

/// Opens the pool, retrying with backoff while the database is unreachable, up to
/// `database.connect_timeout_ms`. The password never appears in logs or errors.
pub async fn connect(settings: &DatabaseSettings) -> Result<DatabaseConnection, StoreError> {
    let url = settings.redacted_url();
    let mut options = ConnectOptions::new(settings.url.expose_secret().to_owned());
    options
        .max_connections(settings.max_connections)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false)
        // The fold's statements carry hundreds of keys; a generic plan cached while the table
        // was small (a sequential scan) would stay in use as it grows. Plan each execution.
        // No JIT: every statement here is short and keyed, yet the relay's batch read and the
        // fold's array statements look costly enough to the planner to be JIT-compiled on
        // every execution (12 ms of a 65 ms read of 5,000 queued rows, measured).
        .map_sqlx_postgres_opts(|o| {
            o.options([("plan_cache_mode", "force_custom_plan"), ("jit", "off")])
        })
        .map_sqlx_sqlite_opts(|o| {
            o.foreign_keys(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(10))
        });
    let policy = RetryPolicy::with_budget(settings.connect_timeout);
    let db = retry(&policy, "connect to database", || {
        let options = options.clone();
        let url = url.clone();
        async move {
            Database::connect(options)
                .await
                .map_err(|source| match refusal(&source) {
                    Some((reason, settings)) => StoreError::Refused {
                        url,
                        reason,
                        settings,
                    },
                    None => StoreError::Unreachable { url, source },
                })
        }
    })
    .await?;
    tracing::info!(database = %url, "connected to the store");
    Ok(db)
}

/// Applies pending migrations. On PostgreSQL the whole run happens in one transaction holding
/// an advisory lock, so instances starting together apply each migration exactly once.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), StoreError> {
    match db.get_database_backend() {
        DatabaseBackend::Postgres => {
            let txn = db.begin().await.map_err(StoreError::Migration)?;
            txn.execute_unprepared("SELECT pg_advisory_xact_lock(7262646173790001)")
                .await
                .map_err(StoreError::Migration)?;
            migration::Migrator::up(&txn, None)
                .await
                .map_err(StoreError::Migration)?;
            txn.commit().await.map_err(StoreError::Migration)?;
        }
        _ => migration::Migrator::up(db, None)
            .await
            .map_err(StoreError::Migration)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn on_statement(e: sqlx::Error) -> DbErr {
        DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e)))
    }

    #[test]
    fn a_connection_broken_under_a_statement_is_retried_a_refused_statement_is_not() {
        let broken = on_statement(sqlx::Error::Protocol(
            "unexpected response from SSLRequest: 0x00".to_owned(),
        ));
        assert!(db_err_is_transient(&broken), "{broken}");
        let reset = on_statement(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(db_err_is_transient(&reset), "{reset}");
        let decode = on_statement(sqlx::Error::ColumnNotFound("nav".to_owned()));
        assert!(!db_err_is_transient(&decode), "{decode}");
        assert!(StoreError::Db(broken).is_transient());
    }

    /// A server that says yes to TLS (`S`) and hangs up before the handshake: what a link
    /// reset mid-handshake looks like to the client. Start-up keeps retrying it as an
    /// unreachable database (every connection attempt reaches the server), and does not
    /// report a refused certificate.
    #[tokio::test]
    async fn a_tls_handshake_cut_by_the_network_is_retried_not_refused() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = attempts.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut request = [0u8; 8];
                if socket.read_exact(&mut request).await.is_ok() {
                    let _ = socket.write_all(b"S").await;
                }
            }
        });
        let settings = DatabaseSettings {
            url: format!("postgres://u:hunter2@127.0.0.1:{port}/db?sslmode=require").into(),
            max_connections: 1,
            migrate_on_start: false,
            connect_timeout: Duration::from_millis(1500),
            require_tls: false,
        };
        let err = connect(&settings).await.expect_err("nothing to connect to");
        assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
        assert!(err.is_transient());
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(
            attempts.load(Ordering::SeqCst) >= 2,
            "start-up tried once and gave up: {err}"
        );
    }
}
