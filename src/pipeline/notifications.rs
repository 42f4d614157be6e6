//! Change notifications ("these products changed", DESIGN.md part 3): how one is read and
//! checked, how a partition's notifications are coalesced into commands, and the bound on the
//! codes one instance holds. The task that runs this against Kafka is in [`task`].
//!
//! # The coalescing rule
//! Per partition and per system, codes are collected into one open batch, deduplicated, until
//! `upstream.page_size` distinct codes (the batch is published at once) or until
//! `notifications.window_ms` after its first code (published then). A batch becomes one
//! command `{"request_id": "notif:<system>:<topic>-<partition>-<first offset>:<codes hash>", "system",
//! "selector": {"product_codes": [...]}, "requested_by": "notifications"}`; a batch that starts
//! inside a notification another batch took the first codes of adds `.<index of its first
//! code>` to the offset. A re-read partition (after a crash) forms its first batch again from
//! the same notification: with the same codes it has the same request id (a re-run), with more
//! (read further this time) another one — never one id for two contents.
//!
//! # Nothing missed
//! A code is taken into a batch not yet published, so the fetch of that batch starts after the
//! notification arrived. A partition's stored offset is the first offset any of its unpublished
//! batches holds (or the next to read when none): a crash re-reads every code not yet
//! published.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::command::{CommandWire, MAX_REQUEST_ID_LEN, Mode, Selector, is_product_code};
use crate::metrics::metrics;
use crate::text::quote;

pub(super) mod task;

pub use task::NotificationRoute;

/// `requested_by` of the commands made from notifications.
pub const REQUESTED_BY: &str = "notifications";
/// The largest notification read (500 codes of 64 bytes fit several times over).
pub const MAX_NOTIFICATION_BYTES: usize = 64 * 1024;
/// The most codes one notification may name.
pub const MAX_NOTIFICATION_CODES: usize = 500;

/// Why a notification was refused (it goes to the DLQ with this reason). Always permanent:
/// the same bytes are refused again.
#[derive(Debug, thiserror::Error)]
pub enum NotificationError {
    #[error("the notification is empty (no value)")]
    Empty,
    #[error("the notification has {0} bytes; at most {MAX_NOTIFICATION_BYTES} are read")]
    TooLarge(usize),
    #[error("not a notification: {0}")]
    Malformed(String),
    #[error("unknown system {0}")]
    UnknownSystem(String),
    #[error("the notification gives both product_code and product_codes")]
    Ambiguous,
    #[error("the notification names no product code")]
    NoCodes,
    #[error("the notification names {0} codes; at most {MAX_NOTIFICATION_CODES}")]
    TooManyCodes(usize),
    #[error("{0} is not a product code (1 to 64 bytes, no spaces or commas)")]
    BadCode(String),
}

impl NotificationError {
    /// The same notification is refused again: never retried.
    pub fn is_transient(&self) -> bool {
        false
    }

    /// The DLQ's `dlq.error.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            NotificationError::Empty => "empty_notification",
            NotificationError::TooLarge(_) => "notification_too_large",
            NotificationError::Malformed(_) => "malformed_notification",
            NotificationError::UnknownSystem(_) => "unknown_system",
            NotificationError::Ambiguous => "ambiguous_notification",
            NotificationError::NoCodes => "no_codes",
            NotificationError::TooManyCodes(_) => "too_many_codes",
            NotificationError::BadCode(_) => "bad_code",
        }
    }
}

/// A notification as it travels. Fields beyond these (a timestamp, a reason) are ignored.
#[derive(Debug, Deserialize)]
struct NotificationWire {
    system: Option<String>,
    product_code: Option<String>,
    product_codes: Option<Vec<String>>,
}

/// A checked notification: a known system and 1 to 500 valid codes, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub system: String,
    pub codes: Vec<String>,
}

impl Notification {
    /// Reads and checks a notification's value; `systems` are the known systems' names.
    pub fn parse(
        value: Option<&[u8]>,
        default_system: &str,
        systems: &[String],
    ) -> Result<Self, NotificationError> {
        let bytes = value.ok_or(NotificationError::Empty)?;
        if bytes.len() > MAX_NOTIFICATION_BYTES {
            return Err(NotificationError::TooLarge(bytes.len()));
        }
        let wire: NotificationWire = serde_json::from_slice(bytes)
            .map_err(|e| NotificationError::Malformed(quote(&e.to_string())))?;
        let system = wire.system.unwrap_or_else(|| default_system.to_owned());
        if !systems.contains(&system) {
            return Err(NotificationError::UnknownSystem(quote(&system)));
        }
        let codes = match (wire.product_code, wire.product_codes) {
            (Some(_), Some(_)) => return Err(NotificationError::Ambiguous),
            (Some(code), None) => vec![code],
            (None, Some(codes)) => codes,
            (None, None) => Vec::new(),
        };
        if codes.is_empty() {
            return Err(NotificationError::NoCodes);
        }
        if codes.len() > MAX_NOTIFICATION_CODES {
            return Err(NotificationError::TooManyCodes(codes.len()));
        }
        if let Some(bad) = codes.iter().find(|c| !is_product_code(c)) {
            return Err(NotificationError::BadCode(quote(bad)));
        }
        Ok(Notification { system, codes })
    }
}

/// Codes of one system collected from one partition, to be published as one command.
#[derive(Debug, Clone)]
pub struct Batch {
    pub system: String,
    /// The offset of the notification its first code came from.
    pub first_offset: i64,
    /// The index of its first code within that notification (0 unless another batch took the
    /// codes before it).
    pub first_index: usize,
    /// Distinct, in the order first named.
    pub codes: Vec<String>,
    seen: HashSet<String>,
    /// Notifications that contributed a code (new or already in it).
    pub notifications: u64,
    opened_at: Instant,
}

impl Batch {
    fn new(system: &str, offset: i64, index: usize, now: Instant) -> Self {
        Batch {
            system: system.to_owned(),
            first_offset: offset,
            first_index: index,
            codes: Vec::new(),
            seen: HashSet::new(),
            notifications: 0,
            opened_at: now,
        }
    }

    /// `notif:<system>:<topic>-<partition>-<first offset>[.<first index>]:<codes hash>`; a
    /// topic name that would make it longer than a request id may be is replaced by a short
    /// hash of it.
    ///
    /// The hash of the batch's codes makes the id name the batch's content, not only where it
    /// starts: a batch published part-way (its partition revoked) and the larger one its next
    /// owner forms from the same notification — when the first owner's offset never reached
    /// the group — are different commands. With one id, the second was skipped as a request
    /// already completed and its other codes never fetched (the cluster chaos run lost 38).
    /// The same batch formed again still has the same id.
    pub fn request_id(&self, topic: &str, partition: i32) -> String {
        let index = match self.first_index {
            0 => String::new(),
            i => format!(".{i}"),
        };
        let content = self
            .codes
            .iter()
            .fold(fnv1a(FNV_OFFSET, self.system.as_bytes()), |h, code| {
                fnv1a(fnv1a(h, b","), code.as_bytes())
            });
        let id = |topic: &str| {
            format!(
                "notif:{}:{topic}-{partition}-{}{index}:{:08x}",
                self.system, self.first_offset, content as u32
            )
        };
        let full = id(topic);
        if full.len() <= MAX_REQUEST_ID_LEN {
            return full;
        }
        id(&format!(
            "t{:08x}",
            fnv1a(FNV_OFFSET, topic.as_bytes()) as u32
        ))
    }

    /// The command that asks for this batch's codes.
    pub fn command(&self, topic: &str, partition: i32) -> CommandWire {
        CommandWire {
            request_id: self.request_id(topic, partition),
            system: Some(self.system.clone()),
            selector: Selector {
                product_codes: self.codes.clone(),
                ..Selector::default()
            },
            mode: Mode::Incremental,
            dry_run: false,
            force: false,
            requested_by: Some(REQUESTED_BY.to_owned()),
        }
    }
}

/// FNV-1a's offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `bytes` from `hash`: stable across builds and platforms (a request id must be
/// the same after a restart), unlike the standard library's hasher.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One partition's open batches (one per system) and where its reading stands.
#[derive(Debug)]
pub struct Coalescer {
    window: Duration,
    /// Each system's `upstream.page_size`: a batch is published once it holds this many.
    page_sizes: HashMap<String, usize>,
    open: BTreeMap<String, Batch>,
    /// After the last notification read (taken into a batch or refused).
    next_offset: Option<i64>,
}

impl Coalescer {
    pub fn new(window: Duration, page_sizes: HashMap<String, usize>) -> Self {
        Coalescer {
            window,
            page_sizes,
            open: BTreeMap::new(),
            next_offset: None,
        }
    }

    /// How many codes taking `n` would add to what this partition holds (its distinct codes
    /// not already in its system's open batch).
    pub fn new_codes(&self, n: &Notification) -> usize {
        let open = self.open.get(&n.system);
        let mut fresh = HashSet::new();
        n.codes
            .iter()
            .filter(|c| !open.is_some_and(|b| b.seen.contains(*c)))
            .filter(|c| fresh.insert(c.as_str()))
            .count()
    }

    /// Takes the notification at `offset`; returns the batches it filled (to publish now).
    /// Exactly [`Coalescer::new_codes`] codes are added: a code already in the open batch
    /// stays there (that batch is published after this notification arrived), a code named
    /// twice counts once, and no batch is opened without a code.
    pub fn add(&mut self, offset: i64, n: &Notification, now: Instant) -> Vec<Batch> {
        let page = self.page_sizes.get(&n.system).copied().unwrap_or(1).max(1);
        let known: HashSet<&str> = match self.open.get(&n.system) {
            Some(open) => n
                .codes
                .iter()
                .filter(|c| open.seen.contains(*c))
                .map(String::as_str)
                .collect(),
            None => HashSet::new(),
        };
        let mut placed = HashSet::new();
        let mut counted = false;
        let mut full = Vec::new();
        for (index, code) in n.codes.iter().enumerate() {
            if known.contains(code.as_str()) || !placed.insert(code.as_str()) {
                continue;
            }
            let batch = self
                .open
                .entry(n.system.clone())
                .or_insert_with(|| Batch::new(&n.system, offset, index, now));
            batch.seen.insert(code.clone());
            batch.codes.push(code.clone());
            // Counted once, in the batch its first new code went to.
            batch.notifications += u64::from(!counted);
            counted = true;
            if batch.codes.len() >= page
                && let Some(done) = self.open.remove(&n.system)
            {
                full.push(done);
            }
        }
        if !counted && let Some(open) = self.open.get_mut(&n.system) {
            // Every code was already waiting: the notification joins that batch.
            open.notifications += 1;
        }
        self.next_offset = Some(offset + 1);
        full
    }

    /// Passes over the notification at `offset` (refused, dead-lettered).
    pub fn skip(&mut self, offset: i64) {
        self.next_offset = Some(offset + 1);
    }

    /// When the oldest open batch is due.
    pub fn deadline(&self) -> Option<Instant> {
        self.open.values().map(|b| b.opened_at + self.window).min()
    }

    /// The open batches whose window has passed.
    pub fn take_due(&mut self, now: Instant) -> Vec<Batch> {
        let due: Vec<String> = self
            .open
            .iter()
            .filter(|(_, b)| b.opened_at + self.window <= now)
            .map(|(s, _)| s.clone())
            .collect();
        due.iter().filter_map(|s| self.open.remove(s)).collect()
    }

    /// Every open batch (a drain, or codes waiting past the instance's bound).
    pub fn take_all(&mut self) -> Vec<Batch> {
        std::mem::take(&mut self.open).into_values().collect()
    }

    /// Codes held in open batches.
    pub fn held(&self) -> usize {
        self.open.values().map(|b| b.codes.len()).sum()
    }

    /// The offset that may be stored: the first any open batch holds, else the next to read.
    pub fn offset_to_store(&self) -> Option<i64> {
        self.open
            .values()
            .map(|b| b.first_offset)
            .min()
            .or(self.next_offset)
    }
}

/// The codes waiting in one instance (`notifications.max_pending_codes`), shared by its
/// notification partitions: codes are taken when read and given back once the command
/// carrying them is acknowledged.
#[derive(Debug)]
pub struct Budget {
    max: usize,
    pending: AtomicUsize,
    peak: AtomicUsize,
    /// Woken whenever codes are given back.
    freed: Notify,
}

impl Budget {
    pub fn new(max: usize) -> Self {
        Budget {
            max,
            pending: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Takes `n` codes when they fit, or when nothing waits at all (so one notification larger
    /// than the bound still passes, alone).
    pub fn try_take(&self, n: usize) -> bool {
        let taken = self
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                (cur == 0 || cur + n <= self.max).then_some(cur + n)
            });
        match taken {
            Ok(before) => {
                let now = before + n;
                let peak = self.peak.fetch_max(now, Ordering::SeqCst).max(now);
                metrics().notification_pending.set(now as i64);
                metrics().notification_pending_peak.set(peak as i64);
                true
            }
            Err(_) => false,
        }
    }

    /// Gives `n` codes back and wakes the partitions waiting for room.
    pub fn give_back(&self, n: usize) {
        let before = self
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                Some(cur.saturating_sub(n))
            })
            .unwrap_or(0);
        metrics()
            .notification_pending
            .set(before.saturating_sub(n) as i64);
        self.freed.notify_waiters();
    }

    /// Codes waiting now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// The most that ever waited at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn systems() -> Vec<String> {
        vec!["wms".to_owned(), "fund".to_owned()]
    }

    fn parse(s: &str) -> Result<Notification, NotificationError> {
        Notification::parse(Some(s.as_bytes()), "wms", &systems())
    }

    fn note(system: &str, codes: &[&str]) -> Notification {
        Notification {
            system: system.to_owned(),
            codes: codes.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    #[test]
    fn both_shapes_read_and_the_system_defaults() {
        assert_eq!(
            parse(r#"{"product_code":"A"}"#).unwrap(),
            note("wms", &["A"])
        );
        assert_eq!(
            parse(r#"{"system":"fund","product_codes":["A","B"],"changed_at":"x"}"#).unwrap(),
            note("fund", &["A", "B"])
        );
    }

    #[test]
    fn bad_notifications_are_refused_with_their_kind() {
        let kind = |s: &str| parse(s).unwrap_err().kind();
        assert_eq!(kind("not json"), "malformed_notification");
        assert_eq!(
            kind(r#"{"system":"nope","product_code":"A"}"#),
            "unknown_system"
        );
        assert_eq!(
            kind(r#"{"product_code":"A","product_codes":["B"]}"#),
            "ambiguous_notification"
        );
        assert_eq!(kind(r#"{"product_codes":[]}"#), "no_codes");
        assert_eq!(kind(r#"{"system":"wms"}"#), "no_codes");
        assert_eq!(
            kind(&format!(r#"{{"product_code":"{}"}}"#, "x".repeat(65))),
            "bad_code"
        );
        assert_eq!(kind(r#"{"product_code":"A,B"}"#), "bad_code");
        let many: Vec<String> = (0..501).map(|i| format!("C{i}")).collect();
        let body = serde_json::json!({ "product_codes": many }).to_string();
        assert_eq!(kind(&body), "too_many_codes");
        let huge = format!(r#"{{"product_code":"A","pad":"{}"}}"#, "x".repeat(70_000));
        assert_eq!(kind(&huge), "notification_too_large");
        assert_eq!(
            Notification::parse(None, "wms", &systems())
                .unwrap_err()
                .kind(),
            "empty_notification"
        );
    }

    #[test]
    fn a_quoted_value_in_an_error_is_cut_short() {
        let system = "s".repeat(5000);
        let e = parse(&format!(r#"{{"system":"{system}","product_code":"A"}}"#)).unwrap_err();
        assert!(e.to_string().len() < 300, "{e}");
    }

    fn coalescer(page: usize) -> Coalescer {
        let sizes = [("wms".to_owned(), page), ("fund".to_owned(), page)].into();
        Coalescer::new(Duration::from_millis(1000), sizes)
    }

    #[test]
    fn codes_are_deduplicated_per_system_and_published_at_the_page_size() {
        let now = Instant::now();
        let mut c = coalescer(3);
        assert!(c.add(10, &note("wms", &["A", "B"]), now).is_empty());
        assert_eq!(c.new_codes(&note("wms", &["A", "B", "C", "C"])), 1);
        assert!(c.add(11, &note("fund", &["A"]), now).is_empty());
        assert!(c.add(12, &note("wms", &["A", "B"]), now).is_empty());
        assert_eq!(c.offset_to_store(), Some(10));
        let full = c.add(13, &note("wms", &["C", "D"]), now);
        assert_eq!(full.len(), 1);
        assert_eq!(full[0].codes, ["A", "B", "C"]);
        assert_eq!(full[0].notifications, 3);
        assert!(full[0].request_id("n", 2).starts_with("notif:wms:n-2-10:"));
        // "D" opened a new batch inside notification 13; fund's batch still holds 11.
        assert_eq!(c.offset_to_store(), Some(11));
        assert_eq!(c.held(), 2);
        let rest = c.take_all();
        let d = rest.iter().find(|b| b.system == "wms").unwrap();
        assert!(d.request_id("n", 2).starts_with("notif:wms:n-2-13.1:"));
        assert_eq!(c.offset_to_store(), Some(14));
    }

    #[test]
    fn the_codes_added_are_exactly_the_new_ones_and_no_batch_is_empty() {
        let now = Instant::now();
        let mut c = coalescer(3);
        c.add(0, &note("wms", &["A", "B"]), now);
        // "B" and "A" wait already; "C" fills the page; the second "B" stays covered by the
        // batch just filled, "D" twice is one code.
        let n = note("wms", &["B", "C", "A", "B", "D", "D"]);
        assert_eq!(c.new_codes(&n), 2);
        let full = c.add(1, &n, now);
        assert_eq!(full[0].codes, ["A", "B", "C"]);
        assert_eq!(c.held(), 1);
        // All already waiting: nothing opened, nothing added.
        let again = note("wms", &["D"]);
        assert_eq!(c.new_codes(&again), 0);
        assert!(c.add(2, &again, now).is_empty());
        let rest = c.take_all();
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].codes.len(), rest[0].notifications), (1, 1));
        c.add(3, &note("fund", &["X"]), now);
        c.add(4, &note("fund", &["X"]), now);
        assert_eq!(c.take_all()[0].notifications, 2);
    }

    #[test]
    fn a_batch_is_due_a_window_after_its_first_code() {
        let t0 = Instant::now();
        let mut c = coalescer(100);
        c.add(0, &note("wms", &["A"]), t0);
        c.add(1, &note("fund", &["B"]), t0 + Duration::from_millis(600));
        assert_eq!(c.deadline(), Some(t0 + Duration::from_millis(1000)));
        assert!(c.take_due(t0 + Duration::from_millis(999)).is_empty());
        let due = c.take_due(t0 + Duration::from_millis(1000));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].system, "wms");
        assert_eq!(c.offset_to_store(), Some(1));
        c.skip(2);
        assert_eq!(c.offset_to_store(), Some(1));
        c.take_all();
        assert_eq!(c.offset_to_store(), Some(3));
    }

    #[test]
    fn a_long_topic_name_still_makes_a_valid_request_id() {
        let b = Batch::new("wms", 123_456_789, 0, Instant::now());
        let id = b.request_id(&"t".repeat(249), 5);
        assert!(crate::command::is_request_id(&id), "{id}");
        assert_eq!(id, b.request_id(&"t".repeat(249), 5));
        assert!(id.starts_with("notif:wms:t"));
    }

    #[test]
    fn batches_from_one_notification_with_other_codes_have_other_ids() {
        let now = Instant::now();
        // The first owner publishes part-way (its partition revoked after notification 10);
        // the next owner re-reads from 10 and its batch takes notification 11 too.
        let mut first = coalescer(100);
        first.add(10, &note("wms", &["A", "B"]), now);
        let partial = first.take_all();
        let mut next = coalescer(100);
        next.add(10, &note("wms", &["A", "B"]), now);
        next.add(11, &note("wms", &["C"]), now);
        let larger = next.take_all();
        let (a, b) = (partial[0].request_id("n", 2), larger[0].request_id("n", 2));
        assert_ne!(
            a, b,
            "the larger batch must not pass for the one already run"
        );
        assert!(a.starts_with("notif:wms:n-2-10:") && b.starts_with("notif:wms:n-2-10:"));
        assert!(crate::command::is_request_id(&a) && crate::command::is_request_id(&b));
        // The same batch formed again keeps its id (a re-run is recognised).
        let mut again = coalescer(100);
        again.add(10, &note("wms", &["A", "B"]), now);
        assert_eq!(again.take_all()[0].request_id("n", 2), a);
    }

    #[test]
    fn the_budget_holds_its_bound_but_never_refuses_one_alone() {
        let b = Budget::new(10);
        assert!(b.try_take(500));
        assert!(!b.try_take(1));
        b.give_back(500);
        assert!(b.try_take(6));
        assert!(!b.try_take(5));
        assert!(b.try_take(4));
        assert_eq!(b.pending(), 10);
        assert!(b.peak() >= 10);
    }
}
