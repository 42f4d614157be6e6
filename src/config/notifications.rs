//! `[notifications]`: how "these products changed" notifications are coalesced into commands.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_with::{DurationMilliSeconds, serde_as};

/// How notifications are coalesced.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationSettings {
    /// Codes are collected per system and partition for this long (or until
    /// `upstream.page_size` distinct codes), then published as one command.
    #[serde(rename = "window_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub window: Duration,
    /// Codes waiting in one instance at most; beyond, the notification partitions pause.
    pub max_pending_codes: usize,
}

/// The shortest and longest coalescing window.
const WINDOW_RANGE: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(600));

impl NotificationSettings {
    /// The window and the bound in range.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        let (min, max) = WINDOW_RANGE;
        if self.window < min || self.window > max {
            return Err((
                "notifications.window_ms",
                format!(
                    "must be between {} and {} ms",
                    min.as_millis(),
                    max.as_millis()
                ),
            ));
        }
        if !(1..=10_000_000).contains(&self.max_pending_codes) {
            return Err((
                "notifications.max_pending_codes",
                "must be between 1 and 10000000".to_owned(),
            ));
        }
        Ok(())
    }

    /// `notifications.*`.
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "notifications.window_ms = {}", self.window.as_millis())?;
        writeln!(
            f,
            "notifications.max_pending_codes = {}",
            self.max_pending_codes
        )
    }
}
