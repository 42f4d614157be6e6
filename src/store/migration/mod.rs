//! Schema migrations (sea-orm-migration), identical in meaning on PostgreSQL and SQLite.

use sea_orm_migration::prelude::*;

mod m20261127_000001_initial;
mod m20261128_000001_outbox_pending;
mod m20261130_000001_delisting;
mod m20261201_000001_console;
mod m20261202_000001_schedules;
mod m20261203_000001_notifications;
mod m20261204_000001_audit;

/// All migrations, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261127_000001_initial::Migration),
            Box::new(m20261128_000001_outbox_pending::Migration),
            Box::new(m20261130_000001_delisting::Migration),
            Box::new(m20261201_000001_console::Migration),
            Box::new(m20261202_000001_schedules::Migration),
            Box::new(m20261203_000001_notifications::Migration),
            Box::new(m20261204_000001_audit::Migration),
        ]
    }
}
