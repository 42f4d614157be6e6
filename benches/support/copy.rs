//! The raw `COPY` path both benchmarks measure as the store's limit: rows already stored, read
//! out as text, then loaded again by `COPY … FROM STDIN` into empty copies of their tables.

use std::time::{Duration, Instant};

use futures::StreamExt;
use sea_orm::sqlx::postgres::PgPoolCopyExt;
use sea_orm::{ConnectionTrait, DatabaseConnection};

/// One table to load again: its name, the `SELECT` giving its rows, and the column list of
/// the `COPY` (`""`: all of them).
pub type CopyTable<'a> = (&'a str, String, &'a str);

/// Loads each table's rows again into `bench_copy_<table>` (made `LIKE` it, with its indexes
/// and defaults; dropped afterwards). Returns the rows loaded into the first table and the
/// time of the `COPY`s alone (the rows are read out beforehand).
pub async fn copy_again(
    db: &DatabaseConnection,
    tables: Vec<CopyTable<'_>>,
) -> Result<(u64, Duration), Box<dyn std::error::Error>> {
    let pool = db.get_postgres_connection_pool();
    let mut data = Vec::new();
    for (table, select, columns) in tables {
        db.execute_unprepared(&format!(
            "CREATE TABLE bench_copy_{table} (LIKE {table} INCLUDING ALL)"
        ))
        .await?;
        let mut out = pool
            .copy_out_raw(&format!("COPY ({select}) TO STDOUT"))
            .await?;
        let mut bytes = Vec::new();
        while let Some(chunk) = out.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        data.push((table, columns, bytes));
    }
    let started = Instant::now();
    let mut first = None;
    for (table, columns, bytes) in &data {
        let mut copy = pool
            .copy_in_raw(&format!("COPY bench_copy_{table} {columns} FROM STDIN"))
            .await?;
        copy.send(bytes.as_slice()).await?;
        let rows = copy.finish().await?;
        first.get_or_insert(rows);
    }
    let took = started.elapsed();
    for (table, ..) in &data {
        db.execute_unprepared(&format!("DROP TABLE bench_copy_{table}"))
            .await?;
    }
    Ok((first.unwrap_or(0), took))
}
