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

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if !manager.has_column("products", "delisted_at").await? {
            manager
                .alter_table(
                    Table::alter()
                        .table(Products::Table)
                        .add_column(timestamp_with_time_zone_null(Products::DelistedAt))
                        .to_owned(),
                )
                .await?;
        }
        // SQLite adds one column per ALTER TABLE.
        for (name, column) in [
            ("delisted", Requests::Delisted),
            ("relisted", Requests::Relisted),
        ] {
            if !manager.has_column("requests", name).await? {
                manager
                    .alter_table(
                        Table::alter()
                            .table(Requests::Table)
                            .add_column(big_integer(column).default(0))
                            .to_owned(),
                    )
                    .await?;
            }
        }
        if !manager.has_column("requests", "error_kind").await? {
            manager
                .alter_table(
                    Table::alter()
                        .table(Requests::Table)
                        .add_column(string_len_null(Requests::ErrorKind, 64))
                        .to_owned(),
                )
                .await?;
        }
        if !manager.has_column("requests", "drift").await? {
            manager
                .alter_table(
                    Table::alter()
                        .table(Requests::Table)
                        .add_column(json_null(Requests::Drift))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
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
