//! Snapshots and delisting: `products.delisted_at` (set when a snapshot found the product
//! gone from the management system; the row stays, its history goes on) and the result
//! counts `requests.delisted` / `requests.relisted`, and `requests.error_kind` (a failed
//! command's stable error kind, e.g. `delist_guard`, carried on its result) and
//! `requests.drift` (what a dry run found different).
//!
//! Safe on a live database with several instances: nullable or defaulted columns only
//! (PostgreSQL adds them without rewriting the table), run under the existing migration lock;
//! instances of the previous version never read the new columns.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Products {
    Table,
    DelistedAt,
}

#[derive(DeriveIden)]
enum Requests {
    Table,
    Delisted,
    Relisted,
    ErrorKind,
    Drift,
}

/// Adds `column` to `table` unless it is there already.
async fn add_column<T: IntoIden + 'static>(
    manager: &SchemaManager<'_>,
    table: T,
    table_name: &str,
    mut column: ColumnDef,
) -> Result<(), DbErr> {
    let name = column.get_column_name();
    if manager.has_column(table_name, &name).await? {
        return Ok(());
    }
    manager
        .alter_table(
            Table::alter()
                .table(table)
                .add_column(&mut column)
                .to_owned(),
        )
        .await
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per ALTER TABLE (SQLite's rule); each skipped when there (a re-run).
        add_column(
            manager,
            Products::Table,
            "products",
            timestamp_with_time_zone_null(Products::DelistedAt),
        )
        .await?;
        add_column(
            manager,
            Requests::Table,
            "requests",
            big_integer(Requests::Delisted).default(0).to_owned(),
        )
        .await?;
        add_column(
            manager,
            Requests::Table,
            "requests",
            big_integer(Requests::Relisted).default(0).to_owned(),
        )
        .await?;
        add_column(
            manager,
            Requests::Table,
            "requests",
            string_len_null(Requests::ErrorKind, 64),
        )
        .await?;
        add_column(
            manager,
            Requests::Table,
            "requests",
            json_null(Requests::Drift),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Products::Table)
                    .drop_column(Products::DelistedAt)
                    .to_owned(),
            )
            .await?;
        for column in [
            Requests::Delisted,
            Requests::Relisted,
            Requests::ErrorKind,
            Requests::Drift,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Requests::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
