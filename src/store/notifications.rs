//! What the coalescing of change notifications has done, per system (`notification_counts`):
//! notifications and distinct codes taken, commands made. Counted by every instance into one
//! row per system, read by the console.

use chrono::{DateTime, Utc};
use sea_orm::ConnectionTrait;

use super::StoreError;
use super::schedules::{execute, query};

/// One system's coalescing so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NotificationCounts {
    pub system: String,
    /// Notifications whose codes went into a command.
    pub notifications: i64,
    /// Codes those commands carried (distinct within each command).
    pub codes: i64,
    pub commands: i64,
    pub last_command_at: Option<DateTime<Utc>>,
}

/// Counts one published command of `system` that carried `codes` codes from `notifications`
/// notifications.
pub async fn count_command(
    db: &impl ConnectionTrait,
    system: &str,
    notifications: i64,
    codes: i64,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    execute(
        db,
        "INSERT INTO notification_counts (system, notifications, codes, commands, last_command_at) \
         VALUES ($1, $2, $3, 1, $4) ON CONFLICT (system) DO UPDATE SET \
         notifications = notification_counts.notifications + excluded.notifications, \
         codes = notification_counts.codes + excluded.codes, \
         commands = notification_counts.commands + 1, \
         last_command_at = excluded.last_command_at",
        vec![
            system.into(),
            notifications.into(),
            codes.into(),
            now.into(),
        ],
    )
    .await?;
    Ok(())
}

/// Every system's counts, by name.
pub async fn counts(db: &impl ConnectionTrait) -> Result<Vec<NotificationCounts>, StoreError> {
    let rows = query(
        db,
        "SELECT system, notifications, codes, commands, last_command_at \
         FROM notification_counts ORDER BY system",
        vec![],
    )
    .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some(NotificationCounts {
                system: r.try_get("", "system").ok()?,
                notifications: r.try_get("", "notifications").ok()?,
                codes: r.try_get("", "codes").ok()?,
                commands: r.try_get("", "commands").ok()?,
                last_command_at: r.try_get("", "last_command_at").ok()?,
            })
        })
        .collect())
}
