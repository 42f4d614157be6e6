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
    /// "These products changed" notifications, coalesced into commands on `requests`; empty
    /// disables them.
    pub notifications: String,
    /// Compacted: each relay shard's progress, written in the shard's transactions
    /// (`pipeline.exactly_once`); one partition per shard when created at start-up.
    pub relay_progress: String,
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
            ("topics.relay_progress", &self.relay_progress),
        ];
        for (key, value) in non_empty {
            if value.trim().is_empty() {
                return Err((key, "must not be empty".to_owned()));
            }
        }
        // A notification is no command: the two may not share a topic.
        let others = [
            &self.requests,
            &self.changes,
            &self.results,
            &self.dlq,
            &self.state,
            &self.retry,
            &self.relay_progress,
        ];
        if !self.notifications.is_empty() && others.contains(&&self.notifications) {
            return Err((
                "topics.notifications",
                format!("{:?} is already another topic", self.notifications),
            ));
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
        writeln!(f, "topics.notifications = {:?}", self.notifications)?;
        writeln!(f, "topics.relay_progress = {:?}", self.relay_progress)?;
        writeln!(f, "topics.create = {}", self.create)?;
        writeln!(f, "topics.partitions = {}", self.partitions)?;
        writeln!(f, "topics.replication_factor = {}", self.replication_factor)
    }
}
