//! Processing one product-request command: validate it (bad ones go to the DLQ with a
//! `rejected` result), skip it if already completed (its result is emitted again), otherwise
//! fetch every page from its management system and fold each into the store, then record the
//! request's outcome — whose result event the relay publishes. A command failed by a transient
//! cause (its system down beyond the retry budget, its circuit open, the system paused) moves
//! to the retry topic for a later attempt, until its delays run out and it goes to the DLQ.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::FutureRecord;

use crate::kafka::Publisher;
use rdkafka::util::Timeout;
use sea_orm::DatabaseConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::command::{Command, CommandError, Mode, valid_traceparent};
use crate::metrics::metrics;
use crate::product::Product;
use crate::retry::{Backoff, RetryPolicy};
use crate::store::fold::{FoldContext, FoldOutcome, compare_page, fold_page};
use crate::store::{StoreError, requests, schedules};
use crate::upstream::{System, Systems, UpstreamError};
use crate::wire::{self, CloudEvent, Drift, FailureClass, FailureKind, ResultEvent};

/// Header names of DLQ records (defined in [`crate::wire::dlq`]).
pub use crate::wire::dlq as dlq_headers;

mod snapshot;

/// Waits between attempts at a command while the store or the broker is failing (until it
/// heals or the command is abandoned).
const UNTIL_HEALED: RetryPolicy = RetryPolicy::until_cancelled(Duration::from_secs(10));

/// Pages of one command folded at once (each holds one store connection while it folds). A
/// page with few writes spends most of its fold waiting on round trips to the store, so four
/// at once rather than two: `changed10` 8,300–8,900 → 11,900–12,700 products/s, `initial`
/// and `unchanged` within their noise (`cargo bench --bench pipeline -- --million 0`,
/// 2026-12-07). A command's folds beyond the pool's free connections wait for one. The fold
/// benchmark folds its pages the same way.
pub const FOLDS_IN_FLIGHT: usize = 4;

/// The command was left unfinished (shutdown or revoke): its offset must not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

/// Failures inside one attempt at a command.
#[derive(Debug, thiserror::Error)]
pub(super) enum AttemptError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("producing to Kafka failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

impl AttemptError {
    fn is_transient(&self) -> bool {
        match self {
            AttemptError::Store(e) => e.is_transient(),
            AttemptError::Kafka(_) => true,
        }
    }
}

/// Everything processing needs; shared by the partition workers.
pub struct Processor {
    pub db: DatabaseConnection,
    /// The management systems, by name (commands route by their `system`).
    pub systems: Arc<Systems>,
    pub producer: Publisher,
    pub dlq_topic: String,
    pub results_topic: String,
    /// Where transiently failed commands wait for their next attempt; `None`: the DLQ.
    pub retry: Option<RetryRoute>,
    pub fold_policy: RetryPolicy,
    pub relay_wake: Arc<Notify>,
}

/// Where and when a command's next attempt goes.
struct Next<'a> {
    topic: &'a str,
    /// Which retry it will be.
    attempt: u32,
    delay: Duration,
    /// Waiting out a pause of its system (no attempt used).
    paused: bool,
}

/// The retry topic and the delays before each attempt on it (`pipeline.retry_delays_ms`).
#[derive(Debug, Clone)]
pub struct RetryRoute {
    pub topic: String,
    pub delays: Vec<Duration>,
}

/// Which retry a message is: 0 on the request topic, `retry.attempt` on the retry topic (a
/// header that does not parse counts as the last, so the command cannot loop).
fn retry_attempt(msg: &OwnedMessage) -> u32 {
    match header(msg, wire::retry::ATTEMPT) {
        None => 0,
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(u32::MAX),
    }
}

/// Why a command failed, as its DLQ record and `failed` result say.
struct Failure {
    reason: String,
    class: FailureClass,
    kind: FailureKind,
}

/// What a command's pages did: counts, pages, a dry run's drift, and the identity keys a
/// snapshot saw.
struct Scan {
    outcome: FoldOutcome,
    pages: i32,
    drift: Drift,
    seen: Option<HashSet<String>>,
    /// The greatest `updated_at` of the products fetched (what the watermark may move to).
    latest_update: Option<chrono::DateTime<Utc>>,
}

impl Scan {
    fn progress(&self) -> Progress<'_> {
        Progress {
            outcome: &self.outcome,
            pages: self.pages,
        }
    }
}

/// How far a command got before it failed.
#[derive(Clone, Copy)]
struct Progress<'a> {
    outcome: &'a FoldOutcome,
    pages: i32,
}

impl Progress<'_> {
    const NONE: Progress<'static> = Progress {
        outcome: &FoldOutcome {
            fetched: 0,
            created: 0,
            updated: 0,
            unchanged: 0,
            stale: 0,
            relisted: 0,
            delisted: 0,
        },
        pages: 0,
    };
}

impl Processor {
    /// Handles one message until its offset may be stored. Transient failures of the store or
    /// the broker are retried (with backoff) until they heal or `abandon` fires.
    pub async fn handle(
        &self,
        msg: &OwnedMessage,
        abandon: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let traceparent = header(msg, wire::headers::TRACEPARENT).and_then(valid_traceparent);
        let command = match self.parse(msg) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(kind = e.kind(), reason = %e, "rejected a malformed command");
                metrics().commands.with_label_values(&["rejected"]).inc();
                return self
                    .persist(abandon, || self.reject(msg, &e, traceparent.as_deref()))
                    .await;
            }
        };
        tracing::Span::current().record("request_id", command.request_id());
        // Debug builds only: a panic on demand, so a test can prove a panicking handler never
        // leaves its partition dead. Release builds carry no such hook.
        #[cfg(debug_assertions)]
        if std::env::var("PRODUCT_SYNC_DEBUG_PANIC_ON").is_ok_and(|id| id == command.request_id()) {
            panic!("injected panic for request {}", command.request_id());
        }
        let mut backoff = Backoff::new(UNTIL_HEALED);
        loop {
            match self.attempt(msg, &command, traceparent.as_deref()).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "command interrupted by a transient failure; retrying");
                    backoff.wait(abandon).await.map_err(|_| Abandoned)?;
                }
                Err(e) => {
                    // A permanent store failure (e.g. an unreadable stored row): fail the command.
                    let failure = Failure {
                        reason: e.to_string(),
                        class: FailureClass::Permanent,
                        kind: FailureKind::Store,
                    };
                    tracing::error!(error = %failure.reason, "command failed permanently");
                    return self
                        .persist(abandon, || {
                            self.fail(msg, &command, Progress::NONE, &failure)
                        })
                        .await;
                }
            }
        }
    }

    /// After a panic while handling `msg`: the command is failed (DLQ, `failed` result, kind
    /// `panic`) so its partition moves on; a command that cannot be read is rejected.
    pub async fn handle_panic(
        &self,
        msg: &OwnedMessage,
        panic: &str,
        abandon: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let reason = format!(
            "product-sync failed internally while handling this command (a bug; please report it): {}",
            crate::text::quote(panic)
        );
        tracing::error!(error = %reason, "a command handler panicked; failing the command");
        metrics().commands.with_label_values(&["panicked"]).inc();
        let failure = Failure {
            reason,
            class: FailureClass::Permanent,
            kind: FailureKind::Panic,
        };
        match self.parse(msg) {
            Ok(command) => {
                self.persist(abandon, || async {
                    requests::begin(&self.db, &command, None, Utc::now()).await?;
                    self.fail(msg, &command, Progress::NONE, &failure).await
                })
                .await
            }
            Err(e) => self.persist(abandon, || self.reject(msg, &e, None)).await,
        }
    }

    fn parse(&self, msg: &OwnedMessage) -> Result<Command, CommandError> {
        let systems = &self.systems;
        Command::parse_among(msg.payload(), systems.default_name(), &systems.names())
    }

    /// Retries `step` until it succeeds or `abandon` fires.
    async fn persist<F, Fut>(
        &self,
        abandon: &CancellationToken,
        mut step: F,
    ) -> Result<(), Abandoned>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), AttemptError>>,
    {
        let mut backoff = Backoff::new(UNTIL_HEALED);
        loop {
            match step().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "could not record a command's outcome; retrying");
                    backoff.wait(abandon).await.map_err(|_| Abandoned)?;
                }
            }
        }
    }

    /// One attempt at a command: skipped (its result emitted again) if already completed,
    /// else every page fetched and folded, then the request row finished — completed, or
    /// failed and dead-lettered when the management system failed it.
    async fn attempt(
        &self,
        msg: &OwnedMessage,
        command: &Command,
        traceparent: Option<&str>,
    ) -> Result<(), AttemptError> {
        let resolved;
        let command = if command.wants_watermark() {
            resolved = self.resolve_watermark(command).await?;
            &resolved
        } else {
            command
        };
        if let Some(row) = requests::find(&self.db, command.request_id()).await?
            && row.status == requests::Status::Completed.as_str()
        {
            tracing::info!("request already completed; emitting its result again");
            metrics().commands.with_label_values(&["repeated"]).inc();
            requests::reemit(&self.db, command.request_id()).await?;
            self.relay_wake.notify_one();
            return Ok(());
        }
        requests::begin(&self.db, command, traceparent, Utc::now()).await?;
        let system = match self.systems.get(command.system()) {
            Some(system) if !system.is_paused() => system.clone(),
            _ => return self.not_now(msg, command).await,
        };
        let ctx = FoldContext {
            system: command.system(),
            request_id: Some(command.request_id()),
            traceparent,
        };
        let (mut scan, upstream_failed) = self.fold_pages(&system, command, &ctx).await?;
        if let Some(e) = upstream_failed {
            let failure = Failure {
                reason: e.to_string(),
                class: FailureClass::of(e.is_transient()),
                kind: FailureKind::Upstream,
            };
            let class = failure.class.as_str();
            tracing::error!(error = %e, class, "the management system failed this command");
            return self
                .fail_or_retry(msg, command, scan.progress(), &failure)
                .await;
        }
        // A snapshot whose every page was folded: confirm and delist what it did not see.
        if let Some(failure) = snapshot::complete(self, &system, command, &ctx, &mut scan).await? {
            return self
                .fail_or_retry(msg, command, scan.progress(), &failure)
                .await;
        }
        self.complete(command, &scan).await
    }

    /// Records a command whose every page was folded as completed (its result queued for the
    /// relay), after moving the watermark or recording a drift check.
    async fn complete(&self, command: &Command, scan: &Scan) -> Result<(), AttemptError> {
        self.record_progress(command, scan).await?;
        let outcome = &scan.outcome;
        requests::finish(
            &self.db,
            command.request_id(),
            requests::Finished {
                status: requests::Status::Completed,
                outcome,
                pages: scan.pages,
                error: None,
                drift: command.dry_run().then_some(&scan.drift),
            },
            Utc::now(),
        )
        .await?;
        tracing::info!(
            pages = scan.pages,
            dry_run = command.dry_run(),
            fetched = outcome.fetched,
            created = outcome.created,
            updated = outcome.updated,
            unchanged = outcome.unchanged,
            stale = outcome.stale,
            relisted = outcome.relisted,
            delisted = outcome.delisted,
            "command completed"
        );
        metrics().commands.with_label_values(&["completed"]).inc();
        self.relay_wake.notify_one();
        Ok(())
    }

    /// `"updated_since": "watermark"` made concrete: the system's watermark less its
    /// overlap, or no time limit while it has none.
    async fn resolve_watermark(&self, command: &Command) -> Result<Command, StoreError> {
        let overlap = self
            .systems
            .get(command.system())
            .map(|s| s.watermark_overlap)
            .unwrap_or_default();
        let watermark = schedules::watermark(&self.db, command.system()).await?;
        let resolved = command.clone().resolve_watermark(watermark, overlap);
        let since = resolved.selector().updated_since;
        tracing::info!(watermark = ?watermark, since = ?since, "resolved updated_since \"watermark\"");
        Ok(resolved)
    }

    /// Before a completed command is recorded: an incremental of the whole system moves the
    /// watermark (forward only); a drift check records what it found. Done first, so a crash
    /// before the request row is finished leaves nothing to redo but the command itself.
    async fn record_progress(&self, command: &Command, scan: &Scan) -> Result<(), StoreError> {
        let now = Utc::now();
        let system = command.system();
        if command.moves_watermark() {
            let id = command.request_id();
            // A record stamped in the future (a clock ahead upstream) must not carry the
            // watermark past now: changes stamped before it would never be asked for again.
            let latest = scan.latest_update.map(|t| t.min(now));
            if latest != scan.latest_update {
                tracing::warn!(
                    latest_update = ?scan.latest_update,
                    "a fetched product is stamped in the future; the watermark stops at now"
                );
            }
            let moved = schedules::advance_watermark(&self.db, system, latest, id, now).await?;
            if moved {
                tracing::info!(watermark = ?latest, "watermark moved");
            }
            metrics().watermark_age.with_label_values(&[system]).set(0);
        }
        if command.is_drift_check() {
            let o = &scan.outcome;
            let found = schedules::DriftFound {
                request_id: command.request_id().to_owned(),
                checked_at: now,
                created: o.created as i64,
                updated: o.updated as i64,
                delisted: o.delisted as i64,
                relisted: o.relisted as i64,
            };
            schedules::record_drift(&self.db, system, &found).await?;
            crate::metrics::set_drift(system, found.counts());
            tracing::info!(
                created = o.created,
                updated = o.updated,
                delisted = o.delisted,
                relisted = o.relisted,
                "drift check recorded"
            );
        }
        Ok(())
    }

    /// Folds a page — or, for a dry run, compares it with the store and writes nothing.
    async fn apply(
        &self,
        dry_run: bool,
        ctx: &FoldContext<'_>,
        items: &[Product],
    ) -> Result<(FoldOutcome, Drift), StoreError> {
        if dry_run {
            compare_page(&self.db, ctx.system, items, &self.fold_policy).await
        } else {
            let folded = fold_page(&self.db, ctx, items, &self.fold_policy).await?;
            Ok((folded, Drift::default()))
        }
    }

    /// Fetches and folds every page of the command's selector. Pages are folded
    /// FOLDS_IN_FLIGHT at a time, and the next page is fetched while they fold: a command
    /// takes about the longer of its fetches and its folds, and the store works on two
    /// transactions at once. Concurrent folds of pages that share a product are safe
    /// (conditional writes, see `store::fold`); outcomes are taken in page order. Returns what
    /// was folded, and the management system's failure if paging stopped on one.
    async fn fold_pages(
        &self,
        system: &System,
        command: &Command,
        ctx: &FoldContext<'_>,
    ) -> Result<(Scan, Option<UpstreamError>), AttemptError> {
        let snapshot = command.mode() == Mode::Snapshot;
        let dry_run = command.dry_run();
        let mut scan = Scan {
            outcome: FoldOutcome::default(),
            pages: 0,
            drift: Drift::default(),
            seen: snapshot.then(HashSet::new),
            latest_update: None,
        };
        let folds = system
            .client
            .pages(command.selector().clone())
            .map(|page| async move {
                let page = page?;
                // A snapshot remembers what it saw (its scope's unseen products are candidates).
                let keys: Vec<String> = if snapshot {
                    page.items.iter().map(|p| p.identity().key()).collect()
                } else {
                    Vec::new()
                };
                let latest = page.items.iter().filter_map(|p| p.updated_at).max();
                let started = Instant::now();
                let folded = self.apply(dry_run, ctx, &page.items).await;
                metrics()
                    .fold_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok::<_, UpstreamError>((page.number, page.items.len(), folded, keys, latest))
            })
            .buffered(FOLDS_IN_FLIGHT);
        let mut folds = std::pin::pin!(folds);
        while let Some(next) = folds.next().await {
            let (number, items, folded, keys, latest) = match next {
                Ok(folded) => folded,
                Err(e) => return Ok((scan, Some(e))),
            };
            let (folded, drift) = folded?;
            if let Some(seen) = scan.seen.as_mut() {
                seen.extend(keys);
            }
            if !dry_run {
                record_fold(&folded);
            }
            scan.outcome.add(folded);
            scan.drift.merge(drift);
            scan.latest_update = scan.latest_update.max(latest);
            scan.pages += 1;
            tracing::debug!(page = number, items, "page folded");
        }
        Ok((scan, None))
    }

    /// A command whose system is paused waits on the retry topic, using up no attempt: it
    /// comes back after the first delay, as often as it takes. (A command for a system that
    /// is not configured cannot pass validation; should one get here, it fails.)
    async fn not_now(&self, msg: &OwnedMessage, command: &Command) -> Result<(), AttemptError> {
        let name = command.system();
        let Some(_) = self.systems.get(name) else {
            let failure = Failure {
                reason: format!("no management system {name:?} is configured"),
                class: FailureClass::Permanent,
                kind: FailureKind::Upstream,
            };
            return self.fail(msg, command, Progress::NONE, &failure).await;
        };
        let failure = Failure {
            reason: format!("management system {name:?} is paused by an operator"),
            class: FailureClass::Transient,
            kind: FailureKind::Upstream,
        };
        tracing::info!("the command's management system is paused");
        if let Some(route) = &self.retry
            && let Some(delay) = route.delays.first()
        {
            let again = Next {
                topic: &route.topic,
                attempt: retry_attempt(msg).min(route.delays.len() as u32),
                delay: *delay,
                paused: true,
            };
            return self
                .retry_later(msg, command, Progress::NONE, &failure, again)
                .await;
        }
        self.fail(msg, command, Progress::NONE, &failure).await
    }

    /// A command failed by a transient cause moves to the retry topic while it has delays
    /// left; any other failure, and the last, go to the DLQ.
    async fn fail_or_retry(
        &self,
        msg: &OwnedMessage,
        command: &Command,
        progress: Progress<'_>,
        failure: &Failure,
    ) -> Result<(), AttemptError> {
        let attempt = retry_attempt(msg);
        if failure.class == FailureClass::Transient
            && let Some(route) = &self.retry
            && let Some(delay) = route.delays.get(attempt as usize)
        {
            let next = Next {
                topic: &route.topic,
                attempt: attempt + 1,
                delay: *delay,
                paused: false,
            };
            return self
                .retry_later(msg, command, progress, failure, next)
                .await;
        }
        self.fail(msg, command, progress, failure).await
    }

    /// Puts the command on the retry topic for its next attempt (acknowledged before anything
    /// else: only then may its offset be stored), records it as retrying, and sends its
    /// `retrying` result — once per pause: a command already waiting out a pause goes back
    /// on the topic silently.
    async fn retry_later(
        &self,
        msg: &OwnedMessage,
        command: &Command,
        progress: Progress<'_>,
        failure: &Failure,
        next: Next<'_>,
    ) -> Result<(), AttemptError> {
        let now = Utc::now();
        let not_before = now + chrono::Duration::from_std(next.delay).unwrap_or_default();
        let at = not_before.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let headers = wire::for_retry(
            msg.headers(),
            next.attempt,
            &at,
            &failure.reason,
            next.paused,
        );
        self.forward(msg, next.topic, headers).await?;
        let id = command.request_id();
        let error = (failure.kind.as_str(), failure.reason.as_str());
        requests::retrying(&self.db, id, progress.outcome, progress.pages, error, now).await?;
        if next.paused && header(msg, wire::retry::PAUSED).is_some() {
            tracing::debug!(next_attempt_at = %at, "still paused; the command waits on");
            return Ok(());
        }
        let next = next.attempt;
        let Some(row) = requests::find(&self.db, id).await? else {
            return Ok(());
        };
        let mut event = requests::result_event(&row);
        event.attempt = Some(next);
        event.next_attempt_at = Some(at.clone());
        let payload = event.to_json();
        let ce_id = wire::result_ce_id(id, now.timestamp_micros());
        let time = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let headers = CloudEvent {
            id: &ce_id,
            ce_type: &wire::result_ce_type("retrying"),
            source: &wire::ce_source(command.system()),
            subject: id,
            time: &time,
            traceparent: row.traceparent.as_deref(),
        }
        .headers();
        let record = FutureRecord::to(&self.results_topic)
            .key(id)
            .payload(&payload)
            .headers(headers);
        self.producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map_err(|(e, _)| AttemptError::Kafka(e))?;
        metrics().commands.with_label_values(&["retrying"]).inc();
        metrics()
            .retried_commands
            .with_label_values(&[command.system()])
            .inc();
        tracing::warn!(
            attempt = next,
            next_attempt_at = %at,
            error = %failure.reason,
            "command moved to the retry topic"
        );
        Ok(())
    }

    /// Records a failed command and dead-letters it.
    async fn fail(
        &self,
        msg: &OwnedMessage,
        command: &Command,
        progress: Progress<'_>,
        failure: &Failure,
    ) -> Result<(), AttemptError> {
        self.dead_letter(msg, &failure.reason, failure.class, failure.kind)
            .await?;
        requests::finish(
            &self.db,
            command.request_id(),
            requests::Finished {
                status: requests::Status::Failed,
                outcome: progress.outcome,
                pages: progress.pages,
                error: Some((failure.kind.as_str(), &failure.reason)),
                drift: None,
            },
            Utc::now(),
        )
        .await?;
        metrics().commands.with_label_values(&["failed"]).inc();
        self.relay_wake.notify_one();
        Ok(())
    }

    /// A malformed command: to the DLQ, and a `rejected` result straight to the result topic
    /// (no database needed, so bad input moves on even while the store is down).
    async fn reject(
        &self,
        msg: &OwnedMessage,
        error: &CommandError,
        traceparent: Option<&str>,
    ) -> Result<(), AttemptError> {
        let kind = FailureKind::Command(error.kind());
        self.dead_letter(msg, &error.to_string(), FailureClass::Permanent, kind)
            .await?;
        let request_id = best_effort_request_id(msg);
        let now = Utc::now();
        let at = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let payload =
            ResultEvent::rejected(&request_id, &error.to_string(), error.kind(), &at).to_json();
        let ce_id = wire::rejected_ce_id(&request_id, msg.topic(), msg.partition(), msg.offset());
        let time = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let headers = CloudEvent {
            id: &ce_id,
            ce_type: &wire::result_ce_type("rejected"),
            source: &wire::ce_source(self.systems.default_name()),
            subject: &request_id,
            time: &time,
            traceparent,
        }
        .headers();
        let record = FutureRecord::to(&self.results_topic)
            .key(&request_id)
            .payload(&payload)
            .headers(headers);
        self.producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map_err(|(e, _)| AttemptError::Kafka(e))?;
        Ok(())
    }

    /// Sends the command's key and bytes to `topic` with `headers`; returns once acknowledged.
    async fn forward(
        &self,
        msg: &OwnedMessage,
        topic: &str,
        headers: rdkafka::message::OwnedHeaders,
    ) -> Result<(), AttemptError> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(key) = msg.key() {
            record = record.key(key);
        }
        if let Some(payload) = msg.payload() {
            record = record.payload(payload);
        }
        self.producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map_err(|(e, _)| AttemptError::Kafka(e))?;
        Ok(())
    }

    /// Sends the original bytes and key to the DLQ with headers naming the reason.
    pub(super) async fn dead_letter(
        &self,
        msg: &OwnedMessage,
        reason: &str,
        class: FailureClass,
        kind: FailureKind,
    ) -> Result<(), AttemptError> {
        let failed_at = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let headers = wire::DeadLetter {
            reason,
            class,
            kind,
            topic: msg.topic(),
            partition: msg.partition(),
            offset: msg.offset(),
            failed_at: &failed_at,
        }
        .headers(msg.headers());
        self.forward(msg, &self.dlq_topic, headers).await?;
        metrics()
            .dead_letters
            .with_label_values(&[kind.as_str()])
            .inc();
        tracing::info!(
            topic = %self.dlq_topic,
            kind = kind.as_str(),
            class = class.as_str(),
            "command dead-lettered"
        );
        Ok(())
    }
}

/// The first value of a header, as bytes.
pub fn header<'a>(msg: &'a OwnedMessage, name: &str) -> Option<&'a [u8]> {
    msg.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

/// The request id of a command that failed validation, if one can be read; else the message
/// key; else the message's position.
fn best_effort_request_id(msg: &OwnedMessage) -> String {
    let from_json = msg
        .payload()
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        .and_then(|v| {
            v.get("request_id")
                .and_then(|r| r.as_str())
                .map(str::to_owned)
        })
        .filter(|id| !id.is_empty() && id.len() <= crate::command::MAX_REQUEST_ID_LEN);
    from_json
        .or_else(|| {
            msg.key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("{}:{}:{}", msg.topic(), msg.partition(), msg.offset()))
}

/// Counts the outcome of one folded page.
fn record_fold(outcome: &FoldOutcome) {
    let p = &metrics().products;
    p.with_label_values(&["created"]).inc_by(outcome.created);
    p.with_label_values(&["updated"]).inc_by(outcome.updated);
    p.with_label_values(&["unchanged"])
        .inc_by(outcome.unchanged);
    p.with_label_values(&["stale"]).inc_by(outcome.stale);
    p.with_label_values(&["relisted"]).inc_by(outcome.relisted);
    p.with_label_values(&["delisted"]).inc_by(outcome.delisted);
}
