//! The initial schema: `products`, `product_changes` (the outbox and change history) and
//! `requests` (one row per command).
//!
//! Money and rates are exact: `NUMERIC` on PostgreSQL; on SQLite, `TEXT` holding the decimal's
//! canonical string, because SQLite's numeric affinity would turn it into a binary float.

use sea_orm::DatabaseBackend;
use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Products {
    Table,
    Id,
    System,
    Identity,
    ProductCode,
    ProductName,
    Category,
    RiskLevel,
    Currency,
    Issuer,
    Status,
    Nav,
    ExpectedYield,
    MinInvestment,
    TermDays,
    SaleStart,
    SaleEnd,
    Keywords,
    Attributes,
    SourceVersion,
    SourceUpdatedAt,
    ContentHash,
    Revision,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum ProductChanges {
    Table,
    Id,
    ProductId,
    System,
    Identity,
    ProductCode,
    Revision,
    EventId,
    Op,
    RequestId,
    Traceparent,
    Payload,
    CreatedAt,
    PublishedAt,
}

#[derive(DeriveIden)]
enum Requests {
    Table,
    RequestId,
    System,
    Status,
    Command,
    Fetched,
    Created,
    Updated,
    Unchanged,
    Stale,
    Pages,
    Error,
    Traceparent,
    StartedAt,
    FinishedAt,
    ResultPublishedAt,
}

/// An exact decimal column for the backend at hand (see the module header).
fn exact_decimal_null(backend: DatabaseBackend, col: impl IntoIden) -> ColumnDef {
    match backend {
        DatabaseBackend::Sqlite => text_null(col),
        _ => ColumnDef::new(col).decimal().null().to_owned(),
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();

        manager
            .create_table(
                Table::create()
                    .table(Products::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Products::Id))
                    .col(string_len(Products::System, 64))
                    // `code:<product_code>`, or `name:<product_name>` for records without a code:
                    // one unique key covers both ways a product is identified.
                    .col(string_len(Products::Identity, 300))
                    .col(string_len_null(Products::ProductCode, 64))
                    .col(string_len(Products::ProductName, 200))
                    .col(string_len_null(Products::Category, 64))
                    .col(string_len_null(Products::RiskLevel, 2))
                    .col(string_len_null(Products::Currency, 3))
                    .col(string_len_null(Products::Issuer, 200))
                    .col(string_len_null(Products::Status, 16))
                    .col(exact_decimal_null(backend, Products::Nav))
                    .col(exact_decimal_null(backend, Products::ExpectedYield))
                    .col(exact_decimal_null(backend, Products::MinInvestment))
                    .col(integer_null(Products::TermDays))
                    .col(date_null(Products::SaleStart))
                    .col(date_null(Products::SaleEnd))
                    .col(json(Products::Keywords))
                    .col(json(Products::Attributes))
                    .col(big_integer(Products::SourceVersion))
                    .col(timestamp_with_time_zone_null(Products::SourceUpdatedAt))
                    .col(string_len(Products::ContentHash, 64))
                    .col(big_integer(Products::Revision))
                    .col(timestamp_with_time_zone(Products::CreatedAt))
                    .col(timestamp_with_time_zone(Products::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_products_system_identity")
                    .table(Products::Table)
                    .col(Products::System)
                    .col(Products::Identity)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ProductChanges::Table)
                    .if_not_exists()
                    .col(big_pk_auto(ProductChanges::Id))
                    .col(big_integer(ProductChanges::ProductId))
                    .col(string_len(ProductChanges::System, 64))
                    .col(string_len(ProductChanges::Identity, 300))
                    .col(string_len_null(ProductChanges::ProductCode, 64))
                    .col(big_integer(ProductChanges::Revision))
                    // CloudEvents id: the same for every re-publication of one change.
                    .col(string_len(ProductChanges::EventId, 400))
                    .col(string_len(ProductChanges::Op, 16))
                    .col(string_len_null(ProductChanges::RequestId, 128))
                    .col(string_len_null(ProductChanges::Traceparent, 64))
                    .col(json(ProductChanges::Payload))
                    .col(timestamp_with_time_zone(ProductChanges::CreatedAt))
                    .col(timestamp_with_time_zone_null(ProductChanges::PublishedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_product_changes_product")
                            .from(ProductChanges::Table, ProductChanges::ProductId)
                            .to(Products::Table, Products::Id),
                    )
                    .to_owned(),
            )
            .await?;
        // One change row per product revision: a second writer of the same revision fails.
        manager
            .create_index(
                Index::create()
                    .name("ux_product_changes_product_revision")
                    .table(ProductChanges::Table)
                    .col(ProductChanges::ProductId)
                    .col(ProductChanges::Revision)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        // The relay scans unpublished rows in id order.
        manager
            .create_index(
                Index::create()
                    .name("ix_product_changes_unpublished")
                    .table(ProductChanges::Table)
                    .col(ProductChanges::PublishedAt)
                    .col(ProductChanges::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Requests::Table)
                    .if_not_exists()
                    .col(string_len(Requests::RequestId, 128).primary_key())
                    .col(string_len(Requests::System, 64))
                    .col(string_len(Requests::Status, 16))
                    .col(json(Requests::Command))
                    .col(big_integer(Requests::Fetched).default(0))
                    .col(big_integer(Requests::Created).default(0))
                    .col(big_integer(Requests::Updated).default(0))
                    .col(big_integer(Requests::Unchanged).default(0))
                    .col(big_integer(Requests::Stale).default(0))
                    .col(integer(Requests::Pages).default(0))
                    .col(text_null(Requests::Error))
                    .col(string_len_null(Requests::Traceparent, 64))
                    .col(timestamp_with_time_zone(Requests::StartedAt))
                    .col(timestamp_with_time_zone_null(Requests::FinishedAt))
                    .col(timestamp_with_time_zone_null(Requests::ResultPublishedAt))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Requests::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ProductChanges::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Products::Table).to_owned())
            .await
    }
}
