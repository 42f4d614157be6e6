//! Schedules and the watermark (DESIGN.md part 3): `leases` (one row per cluster-wide role —
//! today the scheduler — with its holder and expiry), `schedule_slots` (per system and kind,
//! the last slot handled and the last one published, so a slot is published once and a
//! takeover knows where the last holder stopped) and `system_state` (per system, the
//! watermark and the last drift check's findings). New tables only: safe on a live database.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Leases {
    Table,
    Name,
    Holder,
    AcquiredAt,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum ScheduleSlots {
    Table,
    System,
    Kind,
    Slot,
    RequestId,
    PublishedAt,
    Skipped,
}

#[derive(DeriveIden)]
enum SystemState {
    Table,
    System,
    Watermark,
    WatermarkRequestId,
    WatermarkConfirmedAt,
    DriftRequestId,
    DriftCheckedAt,
    DriftCreated,
    DriftUpdated,
    DriftDelisted,
    DriftRelisted,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Leases::Table)
                    .if_not_exists()
                    .col(string_len(Leases::Name, 64).primary_key())
                    .col(string_len(Leases::Holder, 200))
                    .col(timestamp_with_time_zone(Leases::AcquiredAt))
                    .col(timestamp_with_time_zone(Leases::ExpiresAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ScheduleSlots::Table)
                    .if_not_exists()
                    .col(string_len(ScheduleSlots::System, 64))
                    .col(string_len(ScheduleSlots::Kind, 16))
                    .col(timestamp_with_time_zone(ScheduleSlots::Slot))
                    .col(string_len_null(ScheduleSlots::RequestId, 128))
                    .col(timestamp_with_time_zone_null(ScheduleSlots::PublishedAt))
                    .col(big_integer(ScheduleSlots::Skipped).default(0))
                    .primary_key(
                        Index::create()
                            .col(ScheduleSlots::System)
                            .col(ScheduleSlots::Kind),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SystemState::Table)
                    .if_not_exists()
                    .col(string_len(SystemState::System, 64).primary_key())
                    .col(timestamp_with_time_zone_null(SystemState::Watermark))
                    .col(string_len_null(SystemState::WatermarkRequestId, 128))
                    .col(timestamp_with_time_zone_null(
                        SystemState::WatermarkConfirmedAt,
                    ))
                    .col(string_len_null(SystemState::DriftRequestId, 128))
                    .col(timestamp_with_time_zone_null(SystemState::DriftCheckedAt))
                    .col(big_integer_null(SystemState::DriftCreated))
                    .col(big_integer_null(SystemState::DriftUpdated))
                    .col(big_integer_null(SystemState::DriftDelisted))
                    .col(big_integer_null(SystemState::DriftRelisted))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in ["system_state", "schedule_slots", "leases"] {
            manager
                .drop_table(
                    Table::drop()
                        .table(Alias::new(table))
                        .if_exists()
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
