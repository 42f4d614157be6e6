//! Exactly once downstream (`pipeline.exactly_once`, DESIGN.md part 3), against the real
//! broker and PostgreSQL with `product-sync run` processes: relay holders killed with `kill -9`
//! in the middle of a 20,000-event publication, and a holder frozen with `SIGSTOP` while
//! another takes its shards. A read_committed reader sees every revision exactly once and in
//! order; a read_uncommitted reader sees the aborted records too (so the check can fail).

use std::sync::Arc;
use std::time::Duration;

use product_sync::command::Selector;
use product_sync::outbox::queue;
use product_sync::outbox::shards::Leases;
use product_sync::outbox::transactional::Transactions;
use product_sync::outbox::{Relay, RelaySettings};
use product_sync::product::Product;
use product_sync::retry::RetryPolicy;
use product_sync::store::fold::{FoldContext, fold_page};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use sea_orm::{ConnectionTrait, DatabaseBackend, EntityTrait, PaginatorTrait, Statement};

use crate::helpers::wait_for;
use crate::pipeline::{ChildGuard, World, signal, wait_exit, world};

/// Folds every product of the simulator into the store (in pages of 500), queueing one
/// change row per product for the relay; returns how many.
async fn fold_everything(w: &World, request_id: &str) -> usize {
    let products: Vec<Product> = w
        .sim
        .sim
        .catalogue()
        .select(&Selector::default())
        .cloned()
        .collect();
    let ctx = FoldContext {
        system: "wms",
        request_id: Some(request_id),
        traceparent: None,
    };
    for page in products.chunks(500) {
        fold_page(
            &w.db,
            &ctx,
            page,
            &RetryPolicy::with_budget(Duration::from_secs(30)),
        )
        .await
        .expect("fold");
    }
    products.len()
}

async fn queued(w: &World) -> u64 {
    product_sync::store::entity::outbox_pending::Entity::find()
        .count(&w.db)
        .await
        .expect("count the queue")
}

/// Waits until the queue is at most `at_most` rows (or empty).
async fn wait_queue_below(w: &World, at_most: u64, deadline: Duration) -> u64 {
    wait_for(
        &format!("the queue to shrink to {at_most} rows"),
        deadline,
        || async {
            let n = queued(w).await;
            (n <= at_most).then_some(n)
        },
    )
    .await
}

/// The change topic read both ways; asserts what a read_committed reader must see (every
/// stored revision exactly once, in order) and returns (committed, uncommitted) counts.
async fn audit_both_ways(w: &World) -> (usize, usize) {
    let committed = w.read_all(&w.settings.topics.changes).await;
    let stored = w.stored().await;
    let repeats = crate::pipeline::assert_gapless(&committed, &stored);
    assert_eq!(repeats, 0, "a read_committed reader sees no repeat");
    assert_eq!(
        committed.len(),
        stored.values().map(|(_, r)| *r as usize).sum::<usize>(),
        "one event per revision"
    );
    let uncommitted: Vec<OwnedMessage> = w
        .read_all_isolated(&w.settings.topics.changes, "read_uncommitted")
        .await;
    (committed.len(), uncommitted.len())
}

/// Relay batches small enough that a publication of 20,000 rows spans many transactions.
const SMALL_BATCHES: (&str, &str) = ("PRODUCT_SYNC__PIPELINE__RELAY_BATCH_SIZE", "800");

/// The topic's ends per partition: (last stable offset, the end a read_committed client is
/// told; high watermark, a read_uncommitted one's). Stable behind high: a transaction is open.
async fn ends(w: &World, topic: &str) -> Vec<(i64, i64)> {
    let kafka = w.settings.kafka.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let end = |isolation: &str| -> Vec<i64> {
            let consumer: BaseConsumer = product_sync::kafka::reader_config(&kafka, "watermarks")
                .set("isolation.level", isolation)
                .create()
                .expect("a watermark reader");
            let metadata = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .expect("the topic's metadata");
            let partitions = metadata.topics()[0].partitions().len() as i32;
            (0..partitions)
                .map(|p| {
                    consumer
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .expect("the partition's watermarks")
                        .1
                })
                .collect()
        };
        let (stable, high) = (end("read_committed"), end("read_uncommitted"));
        stable.into_iter().zip(high).collect()
    })
    .await
    .expect("the watermark task")
}

/// Freezes the holder (`SIGSTOP`) at a moment it has a transaction open on the change topic:
/// freeze, look, and if none is open, thaw until the topic grows and look again. `since` is
/// each partition's high watermark when the previous holder was killed: its transactions
/// must have been aborted (fenced by this holder) before an open one counts as this one's.
/// Returns the high watermarks at the catch, or None when the queue ran dry first (the holder
/// stays frozen either way).
async fn freeze_mid_transaction(w: &World, holder: &ChildGuard, since: &[i64]) -> Option<Vec<i64>> {
    let topic = w.settings.topics.changes.clone();
    for _ in 0..500 {
        signal(holder, "STOP");
        let now = ends(w, &topic).await;
        let previous_resolved = now
            .iter()
            .zip(since.iter().chain(std::iter::repeat(&0)))
            .all(|((stable, _), since)| stable >= since);
        if previous_resolved && now.iter().any(|(stable, high)| stable < high) {
            return Some(now.iter().map(|(_, high)| *high).collect());
        }
        if queued(w).await == 0 {
            return None;
        }
        let before: i64 = now.iter().map(|(_, high)| high).sum();
        signal(holder, "CONT");
        wait_for(
            "the holder to publish more",
            Duration::from_secs(120),
            || async {
                let high: i64 = ends(w, &topic).await.iter().map(|(_, h)| h).sum();
                (high > before || queued(w).await == 0).then_some(())
            },
        )
        .await;
    }
    panic!("no open transaction of the holder seen in 500 looks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_relay_holders_mid_publication_repeats_nothing_for_read_committed_readers() {
    let w = world(20_000, 1).await;
    let total = fold_everything(&w, "bulk").await as u64;
    assert_eq!(queued(&w).await, total);

    // Holders killed one after another, each caught with a transaction open (its records
    // on the log, visible to read_uncommitted readers only, aborted by the next holder's
    // fencing); at least three kills, each in the middle of the publication.
    // A holder that drains the queue before it is caught gets more work: the whole
    // catalogue changed upstream and folded again (more revisions, each to be seen once).
    let mut since = Vec::new();
    let mut refills = 0;
    for kill in 0..3 {
        let mut holder = w.spawn_process(&format!("holder-{kill}"), &[SMALL_BATCHES]);
        since = loop {
            if let Some(caught) = freeze_mid_transaction(&w, &holder, &since).await {
                break caught;
            }
            // The refill is queued while the holder stays frozen: thawed, it publishes the
            // whole backlog in full rounds back to back (a transaction open most of the
            // time). Thawed during the fold, it published the trickle of pages as it came,
            // mostly waiting between small rounds (`TXN_LINGER`), and drained refill after
            // refill uncaught (16 times once, after the relay's store work got faster; then 6
            // and 8 refills of 8,000 changed products; 1–3 of all 20,000).
            refills += 1;
            assert!(
                refills <= 15,
                "holders drained the queue {refills} times uncaught"
            );
            w.sim.sim.mutate(20_000, 100 + refills);
            fold_everything(&w, &format!("more-{refills}")).await;
            signal(&holder, "CONT");
        };
        signal(&holder, "KILL");
        wait_exit(&mut holder, Duration::from_secs(10)).await;
    }

    eprintln!("kill_9: three holders caught mid-transaction after {refills} refills");

    // The last holder finishes the publication.
    let mut last = w.spawn_process("holder-last", &[SMALL_BATCHES]);
    w.wait_outbox_empty(Duration::from_secs(120)).await;
    let (committed, uncommitted) = audit_both_ways(&w).await;
    assert!(committed as u64 >= total, "every product's event");
    assert!(
        uncommitted > committed,
        "a read_uncommitted reader sees the killed holders' aborted records \
         ({uncommitted} records against {committed} committed)"
    );
    signal(&last, "TERM");
    assert!(
        wait_exit(&mut last, Duration::from_secs(60))
            .await
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_holder_is_fenced_when_another_takes_its_shards_and_publishes_nothing_twice() {
    let w = world(20_000, 1).await;
    let total = fold_everything(&w, "bulk").await as u64;
    let mut a = w.spawn_process("frozen", &[SMALL_BATCHES]);
    wait_queue_below(&w, total - 1000, Duration::from_secs(120)).await;
    signal(&a, "STOP");
    let frozen_at = queued(&w).await;
    assert!(frozen_at > 0, "frozen before it finished");

    // The frozen holder is cut off from the database (as a partition would): its shard
    // leases go, and a second instance takes every shard, fencing the first's producers.
    let cut =
        w.db.execute_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name LIKE '{}%' AND datname = current_database()",
                product_sync::outbox::shards::APPLICATION_NAME_PREFIX
            ),
        ))
        .await
        .expect("cut the frozen holder's lease sessions");
    assert!(
        cut.rows_affected() > 0,
        "the frozen holder had lease sessions"
    );
    let mut b = w.spawn_process("taker", &[SMALL_BATCHES]);
    w.wait_outbox_empty(Duration::from_secs(120)).await;

    // Resumed, the old holder's open transaction can no longer commit; more work arrives
    // while both run (both may try, fencing decides).
    signal(&a, "CONT");
    w.sim.sim.mutate(3000, 11);
    let again = fold_everything(&w, "after").await;
    assert_eq!(again as u64, total);
    w.wait_outbox_empty(Duration::from_secs(120)).await;
    let (committed, uncommitted) = audit_both_ways(&w).await;
    assert!(committed as u64 >= total, "every event published");
    assert!(uncommitted >= committed);

    for (name, child) in [("frozen", &mut a), ("taker", &mut b)] {
        signal(child, "TERM");
        assert!(
            wait_exit(child, Duration::from_secs(60)).await.success(),
            "{name} exits cleanly"
        );
        assert!(!w.log_of(name).contains("panicked"), "{name} did not panic");
    }
}

/// An in-process relay of the world's database with the transactional relay on, as instance
/// `instance` (leases on PostgreSQL).
async fn transactional_relay(w: &World, instance: &str) -> Relay {
    let s = &w.settings;
    product_sync::kafka::ensure_topics(
        &s.kafka,
        &[product_sync::kafka::TopicSpec {
            name: s.topics.relay_progress.clone(),
            partitions: s.pipeline.relay_shards as i32,
            replication_factor: 1,
            compacted: true,
        }],
    )
    .await
    .expect("the progress topic");
    let producer = product_sync::kafka::Publisher::create(product_sync::kafka::producer_config(
        &s.kafka, 900_000,
    ))
    .expect("producer");
    Relay::new(
        w.db.clone(),
        producer,
        RelaySettings {
            changes_topic: s.topics.changes.clone(),
            results_topic: s.topics.results.clone(),
            state_topic: Some(s.topics.state.clone()),
            batch: 5000,
            interval: Duration::from_millis(20),
            max_event_bytes: 900_000,
            exactly_once: Some(Transactions {
                kafka: s.kafka.clone(),
                id_prefix: format!("{}-relay", s.kafka.group_id),
                progress_topic: s.topics.relay_progress.clone(),
                shards: s.pipeline.relay_shards,
                max_event_bytes: 900_000,
            }),
        },
        Leases::postgres(
            s.database.url.clone(),
            instance.to_owned(),
            s.pipeline.relay_shards,
        ),
        Arc::new(tokio::sync::Notify::new()),
    )
}

/// Takes every shard (waiting for a previous holder's leases to go).
async fn take_all(relay: &mut Relay, shards: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if relay.refresh_shards().await.is_ok() && relay.shards_held().len() == shards {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out taking every shard ({:?} held)",
            relay.shards_held()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Drains the relay until the queue is empty (a shard whose producer is not ready yet is
/// published on a later round); returns the change events it published.
async fn publish_all(w: &World, relay: &mut Relay) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut changes = 0;
    loop {
        match relay.drain().await {
            Ok(published) => changes += published.changes,
            Err(e) => assert!(e.is_transient(), "a relay error: {e}"),
        }
        if queued(w).await == 0 {
            return changes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue did not drain ({} left)",
            queued(w).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn sql(w: &World, statement: &str) -> u64 {
    w.db.execute_raw(Statement::from_string(DatabaseBackend::Postgres, statement))
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"))
        .rows_affected()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_dead_between_its_commit_and_its_delete_is_not_published_again() {
    let w = world(300, 1).await;
    let total = fold_everything(&w, "bulk").await as u64;
    let shards = w.settings.pipeline.relay_shards as usize;
    // What the queue holds now is what the first holder's last transactions will publish.
    sql(
        &w,
        "CREATE TABLE queued_before AS SELECT * FROM outbox_pending",
    )
    .await;
    let mut first = transactional_relay(&w, "first").await;
    take_all(&mut first, shards).await;
    assert_eq!(publish_all(&w, &mut first).await as u64, total);
    drop(first);
    // It "died" after its transactions committed, before its rows left the queue.
    assert_eq!(
        sql(&w, "INSERT INTO outbox_pending SELECT * FROM queued_before").await,
        total
    );

    // The next holder reads the progress records and publishes none of those rows again.
    let mut next = transactional_relay(&w, "next").await;
    take_all(&mut next, shards).await;
    assert_eq!(
        publish_all(&w, &mut next).await,
        0,
        "the published rows left the queue unpublished"
    );
    let (committed, _) = audit_both_ways(&w).await;
    assert_eq!(committed as u64, total, "each event once");

    // And what it queues later is published as usual.
    w.sim.sim.mutate(50, 3);
    fold_everything(&w, "later").await;
    assert!(publish_all(&w, &mut next).await > 0);
    let (after, _) = audit_both_ways(&w).await;
    assert!(after as u64 > total);
}

/// A row the broker refuses for good (its topic now takes less than its event) fails its
/// shard's transaction at the commit: the transaction is aborted, the row parked, and the
/// shard's other rows go in the next transaction. A read_committed reader sees every other
/// event once; after the operator raises the limit and releases the row, it follows in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_the_broker_refuses_at_commit_is_parked_and_the_rest_published_once() {
    let w = world(100, 1).await;
    crate::relay::set_topic_limit(&w, 30_000).await;
    let big = "WM0000003";
    w.sim
        .sim
        .upsert(vec![crate::relay::with_big_attribute(&w, big, 60_000)]);
    let total = fold_everything(&w, "bulk").await;
    let mut relay = transactional_relay(&w, "refused").await;
    take_all(&mut relay, w.settings.pipeline.relay_shards as usize).await;

    // Drained until only the parked row is left (the aborted transaction is an error).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut errors = Vec::new();
    let parked = loop {
        if let Err(e) = relay.drain().await {
            assert!(e.is_transient(), "a relay error: {e}");
            errors.push(e.to_string());
        }
        let parked = queue::parked(&w.db).await.expect("parked rows");
        if queued(&w).await == 1 && parked.len() == 1 {
            break parked;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue: {} rows, {} parked; the relay's errors (last 5 of {}): {:?}",
            queued(&w).await,
            parked.len(),
            errors.len(),
            &errors[errors.len().saturating_sub(5)..]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The refusal costs the shard its producer (sequence numbers with a gap), not a further
    // failed transaction.
    assert!(
        errors.iter().all(|e| e.contains("refused")),
        "only refusals: {errors:?}"
    );
    let error = parked[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("too large") || error.contains("TooLarge"),
        "{error}"
    );
    let committed = w.read_all(&w.settings.topics.changes).await;
    assert!(crate::relay::codes(&committed, big).is_empty());
    assert_eq!(committed.len(), total - 1, "every other event, once");

    crate::relay::set_topic_limit(&w, 1_000_000).await;
    assert_eq!(queue::unpark(&w.db, &[]).await.expect("unpark"), 1);
    assert_eq!(publish_all(&w, &mut relay).await, 1);
    let (committed, _) = audit_both_ways(&w).await;
    assert_eq!(committed, total);
}

/// A read to the end (`dlq::read_until_end`, which the audits, `dlq list` and the chaos run
/// use) reads to each partition's high watermark, also with read_committed: a transaction
/// committed behind one still open is read once that one ends (here the coordinator aborts it
/// when its timeout passes). A read to the last stable offset — what a read_committed client
/// is told the end is — stops before the open transaction and misses what was committed behind
/// it (and, the same way, a transaction whose commit returned before its markers were written).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_to_the_end_misses_nothing_committed_behind_an_open_transaction() {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let (kafka, topic) = crate::cli::one_partition_topic("read-to-end").await;
    let transactional = |id: &str, timeout_ms: &str| {
        let p: ThreadedProducer<DefaultProducerContext> =
            product_sync::kafka::producer_config(&kafka, 100_000)
                .set("transactional.id", crate::helpers::unique(id))
                .set("transaction.timeout.ms", timeout_ms)
                .set("message.timeout.ms", timeout_ms)
                .create()
                .expect("a transactional producer");
        p.init_transactions(Duration::from_secs(30))
            .expect("init_transactions");
        p.begin_transaction().expect("begin");
        p
    };
    let send = |p: &ThreadedProducer<DefaultProducerContext>, value: &str| {
        p.send(BaseRecord::<str, str>::to(&topic).key("k").payload(value))
            .map_err(|(e, _)| e)
            .expect("produce");
        p.flush(Duration::from_secs(30)).expect("flush");
    };
    // A transaction left open (its producer hangs), then a whole committed one behind it.
    let open = transactional("open", "2000");
    let committed = transactional("committed", "60000");
    send(&open, "from the open transaction");
    send(&committed, "committed");
    committed
        .commit_transaction(Duration::from_secs(30))
        .expect("commit");

    let (settings, name) = (kafka.clone(), topic.clone());
    let records = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer =
            product_sync::kafka::reader_config(&settings, &crate::helpers::unique("reader"))
                .create()
                .expect("a reader");
        product_sync::dlq::read_until_end(&settings, &consumer, &name, false)
    })
    .await
    .expect("the read's thread")
    .expect("read");
    drop(open);
    let values: Vec<String> = records
        .iter()
        .map(|m| String::from_utf8_lossy(rdkafka::Message::payload(m).unwrap_or_default()).into())
        .collect();
    assert_eq!(
        values,
        ["committed"],
        "the committed record, not the aborted one"
    );
}

/// Rows trickling into the queue (a command's pages folding one after another) go in few
/// transactions: a round that found fewer rows than a relay batch holds the next round from
/// the queue's head back until `TXN_LINGER` after its own start. Forty small commits of one
/// shard over two seconds take at most one transaction per linger (and one more at each end);
/// without the linger each took one of its own, and every transaction costs the broker a
/// marker per partition it touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_trickling_in_go_in_few_transactions() {
    use product_sync::outbox::transactional::TXN_LINGER;
    let w = world(200, 1).await;
    fold_everything(&w, "bulk").await;
    let shards = w.settings.pipeline.relay_shards as usize;
    let mut relay = transactional_relay(&w, "trickle").await;
    take_all(&mut relay, shards).await;
    publish_all(&w, &mut relay).await;
    let progress = w.settings.topics.relay_progress.clone();
    let offsets = |ends: Vec<(i64, i64)>| ends.iter().map(|(_, high)| high).sum::<i64>();
    let before = offsets(ends(&w, &progress).await);

    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone()));
    let started = std::time::Instant::now();
    const COMMITS: usize = 40;
    for k in 0..COMMITS {
        // Five history rows queued again, all of shard 0 (shard key = the shard count).
        sql(
            &w,
            &format!(
                "INSERT INTO outbox_pending (shard_key, change_id, product_id, created_at) \
                 SELECT {shards}, id, product_id, now() FROM product_changes \
                 ORDER BY id LIMIT 5 OFFSET {}",
                k * 5
            ),
        )
        .await;
        // The trickle's pace (the input), not a wait for the relay.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_queue_below(&w, 0, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    stop.cancel();
    running.await.expect("the relay task");

    // Each transaction of shard 0 wrote its progress record and its commit marker.
    let transactions = (offsets(ends(&w, &progress).await) - before) / 2;
    let bound = (elapsed.as_secs_f64() / TXN_LINGER.as_secs_f64()).ceil() as i64 + 2;
    assert!(transactions >= 1, "the trickle was published");
    assert!(
        transactions <= bound,
        "{transactions} transactions for {COMMITS} small commits over {elapsed:?} \
         (at most {bound}: one per {TXN_LINGER:?})"
    );
}
