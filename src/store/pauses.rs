//! `paused_systems`: the management systems an operator paused from the console. Kept in the
//! store so that every instance honours a pause (each reads the table every few seconds).

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};

use super::StoreError;

/// The paused systems' names.
pub async fn paused(db: &DatabaseConnection) -> Result<Vec<String>, StoreError> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT system FROM paused_systems",
        ))
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| r.try_get::<String>("", "system").ok())
        .collect())
}

/// Pauses (or resumes) `system` for every instance.
pub async fn set_paused(
    db: &DatabaseConnection,
    system: &str,
    paused: bool,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let backend = db.get_database_backend();
    let statement = match (paused, backend) {
        (true, DatabaseBackend::Postgres) => Statement::from_sql_and_values(
            backend,
            "INSERT INTO paused_systems (system, paused_at) VALUES ($1, $2) \
             ON CONFLICT (system) DO NOTHING",
            [system.into(), now.into()],
        ),
        (true, _) => Statement::from_sql_and_values(
            backend,
            "INSERT INTO paused_systems (system, paused_at) VALUES (?, ?) \
             ON CONFLICT (system) DO NOTHING",
            [system.into(), now.into()],
        ),
        (false, DatabaseBackend::Postgres) => Statement::from_sql_and_values(
            backend,
            "DELETE FROM paused_systems WHERE system = $1",
            [system.into()],
        ),
        (false, _) => Statement::from_sql_and_values(
            backend,
            "DELETE FROM paused_systems WHERE system = ?",
            [system.into()],
        ),
    };
    db.execute_raw(statement).await?;
    Ok(())
}
