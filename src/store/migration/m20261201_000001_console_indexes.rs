//! Indexes for the ops console's reads: recent commands by start time, and the change events
//! of one command. Only new indexes: safe on a live database (on a very large
//! `product_changes`, creating the second takes a while and holds writes to that table back
//! meanwhile; create it beforehand with `CREATE INDEX CONCURRENTLY` under the same name to
//! avoid that — the migration then finds it and does nothing).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: [&str; 2] = [
    "CREATE INDEX IF NOT EXISTS ix_requests_started_at ON requests (started_at)",
    "CREATE INDEX IF NOT EXISTS ix_product_changes_request ON product_changes (request_id, id)",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for sql in UP {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for index in ["ix_requests_started_at", "ix_product_changes_request"] {
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {index}"))
                .await?;
        }
        Ok(())
    }
}
