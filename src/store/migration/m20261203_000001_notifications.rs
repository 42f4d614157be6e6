//! Change notifications (DESIGN.md part 3): `notification_counts`, per system, how many
//! notifications and distinct codes were coalesced into how many commands — the console's
//! coalescing ratio across every instance. A new table only: safe on a live database.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum NotificationCounts {
    Table,
    System,
    Notifications,
    Codes,
    Commands,
    LastCommandAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(NotificationCounts::Table)
                    .if_not_exists()
                    .col(string_len(NotificationCounts::System, 64).primary_key())
                    .col(big_integer(NotificationCounts::Notifications).default(0))
                    .col(big_integer(NotificationCounts::Codes).default(0))
                    .col(big_integer(NotificationCounts::Commands).default(0))
                    .col(timestamp_with_time_zone_null(
                        NotificationCounts::LastCommandAt,
                    ))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(NotificationCounts::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
