//! `[topics]`: the topic names and how missing topics are created.

use std::fmt;

use serde::Deserialize;

/// Topic names and how missing topics are created.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    /// Product-request commands (input).
    pub requests: String,
    /// Field-level diff events (output).
    pub changes: String,
    /// One result event per command (output).
    pub results: String,
    /// Commands that could not be processed, with the reason in headers.
    pub dlq: String,
    /// Compacted: the current state of every product (a tombstone once delisted); empty
    /// disables it.
    pub state: String,
    /// Where commands failed by a transient cause wait for their next attempt (same
    /// partitions as `requests`); empty sends them straight to the DLQ.
    pub retry: String,
    /// Create missing topics at start-up.
    pub create: bool,
    /// Partition count for topics created at start-up; bounds the consumer group's parallelism.
    pub partitions: i32,
    /// Replication factor for topics created at start-up (3 in production).
    pub replication_factor: i32,
}

impl TopicSettings {
    /// The required topics are named; creation settings in range.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        let non_empty = [
            ("topics.requests", &self.requests),
            ("topics.changes", &self.changes),
            ("topics.results", &self.results),
            ("topics.dlq", &self.dlq),
        ];
        for (key, value) in non_empty {
            if value.trim().is_empty() {
                return Err((key, "must not be empty".to_owned()));
            }
        }
        if self.partitions < 1 {
            return Err(("topics.partitions", "must be at least 1".to_owned()));
        }
        if self.replication_factor < 1 {
            return Err(("topics.replication_factor", "must be at least 1".to_owned()));
        }
        Ok(())
    }

    /// `topics.*`.
    pub(super) fn fmt_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "topics.requests = {:?}", self.requests)?;
        writeln!(f, "topics.changes = {:?}", self.changes)?;
        writeln!(f, "topics.results = {:?}", self.results)?;
        writeln!(f, "topics.dlq = {:?}", self.dlq)?;
        writeln!(f, "topics.state = {:?}", self.state)?;
        writeln!(f, "topics.retry = {:?}", self.retry)?;
        writeln!(f, "topics.create = {}", self.create)?;
        writeln!(f, "topics.partitions = {}", self.partitions)?;
        writeln!(f, "topics.replication_factor = {}", self.replication_factor)
    }
}
