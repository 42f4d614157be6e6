//! What the ops console needs: indexes for its reads (recent commands by start time, the
//! change events of one command) and `paused_systems`, the management systems an operator
//! paused (shared by every instance). Only new indexes and a new table: safe on a live
//! database (on a very large `product_changes`, creating its index takes a while and holds
//! writes to that table back meanwhile; create it beforehand with `CREATE INDEX CONCURRENTLY`
//! under the same name to avoid that — the migration then finds it and does nothing).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum PausedSystems {
    Table,
    System,
    PausedAt,
}

const INDEXES: [&str; 2] = [
    "CREATE INDEX IF NOT EXISTS ix_requests_started_at ON requests (started_at)",
    "CREATE INDEX IF NOT EXISTS ix_product_changes_request ON product_changes (request_id, id)",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for sql in INDEXES {
            db.execute_unprepared(sql).await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(PausedSystems::Table)
                    .if_not_exists()
                    .col(string_len(PausedSystems::System, 64).primary_key())
                    .col(timestamp_with_time_zone(PausedSystems::PausedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(PausedSystems::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        for index in ["ix_requests_started_at", "ix_product_changes_request"] {
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {index}"))
                .await?;
        }
        Ok(())
    }
}
