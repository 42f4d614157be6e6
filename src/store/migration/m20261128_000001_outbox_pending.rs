//! The relay's work queue and its members: `outbox_pending` (one small row per event still to
//! publish, deleted once the broker acknowledged it, so `product_changes` history is never
//! rewritten and a relay round costs the same at ten million history rows as at ten
//! thousand) and `relay_members` (the instances whose relays share the shards).
//!
//! Safe on a live database: only new tables and indexes, plus one backfill of what the older
//! relay had not yet published (rows it publishes meanwhile are published once more, with
//! the same CloudEvents id). The obsolete `ix_product_changes_unpublished` index is dropped:
//! keeping it up to date only slowed the fold.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum OutboxPending {
    Table,
    Id,
    ShardKey,
    ChangeId,
    ProductId,
    RequestId,
    CreatedAt,
    ParkedAt,
    ParkError,
}

#[derive(DeriveIden)]
enum RelayMembers {
    Table,
    InstanceId,
    HeartbeatAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(OutboxPending::Table)
                    .if_not_exists()
                    // Taken in the writing transaction: a product's rows are in revision order.
                    .col(big_pk_auto(OutboxPending::Id))
                    // The shard is `shard_key % pipeline.relay_shards`: the product row's id for
                    // change rows (fixed for a product for ever), a hash of the request id for
                    // results.
                    .col(big_integer(OutboxPending::ShardKey))
                    // A change row to publish, or…
                    .col(big_integer_null(OutboxPending::ChangeId))
                    .col(big_integer_null(OutboxPending::ProductId))
                    // …a request whose result to publish.
                    .col(string_len_null(OutboxPending::RequestId, 128))
                    .col(timestamp_with_time_zone(OutboxPending::CreatedAt))
                    // Set when the broker refused the row for good: it and its product's later
                    // rows wait for an operator (`product-sync outbox parked`).
                    .col(timestamp_with_time_zone_null(OutboxPending::ParkedAt))
                    .col(text_null(OutboxPending::ParkError))
                    .to_owned(),
            )
            .await?;
        // "Is this product held behind a parked row?": a probe of a tiny partial index.
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX IF NOT EXISTS ix_outbox_pending_parked \
                 ON outbox_pending (product_id) WHERE parked_at IS NOT NULL",
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RelayMembers::Table)
                    .if_not_exists()
                    .col(string_len(RelayMembers::InstanceId, 200).primary_key())
                    .col(timestamp_with_time_zone(RelayMembers::HeartbeatAt))
                    .to_owned(),
            )
            .await?;
        // What the previous relay had not published yet.
        let db = manager.get_connection();
        db.execute_unprepared(
            "INSERT INTO outbox_pending (shard_key, change_id, product_id, created_at) \
             SELECT product_id, id, product_id, created_at FROM product_changes \
             WHERE published_at IS NULL ORDER BY id",
        )
        .await?;
        db.execute_unprepared(
            "INSERT INTO outbox_pending (shard_key, request_id, created_at) \
             SELECT 0, request_id, finished_at FROM requests \
             WHERE result_published_at IS NULL AND finished_at IS NOT NULL \
             AND status IN ('completed', 'failed') ORDER BY finished_at",
        )
        .await?;
        db.execute_unprepared("DROP INDEX IF EXISTS ix_product_changes_unpublished")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RelayMembers::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(OutboxPending::Table).to_owned())
            .await
    }
}
