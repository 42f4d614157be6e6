//! The fold's decision, pure: given a page and what the store holds of its products, which
//! are created, updated (with their diff), left alone or stale — and which rows to write.
//! Reading and writing are the callers' ([`super`], and the writers [`super::pg`] and
//! [`super::sqlite`]); this module touches no database, so it is property-tested alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use sea_orm::FromQueryResult;

use super::FoldOutcome;
use crate::diff::{self, FieldChange};
use crate::product::{Identity, Product};

/// A record with what the fold needs of it computed once.
#[derive(Debug)]
pub(super) struct Prepared<'a> {
    pub(super) product: &'a Product,
    pub(super) identity: Identity,
    pub(super) key: String,
    /// The content hash, computed once (while the first read is on the server).
    hash: OnceLock<String>,
}

impl Prepared<'_> {
    pub(super) fn hash(&self) -> &str {
        self.hash.get_or_init(|| self.product.content.hash())
    }
}

/// One record per identity (the highest version; the later one on a tie), sorted by identity
/// key so concurrent writers touch rows in the same order. Returns how many were dropped.
pub(super) fn prepare(page: &[Product]) -> (Vec<Prepared<'_>>, u64) {
    let mut by_key: BTreeMap<String, Prepared<'_>> = BTreeMap::new();
    let mut duplicates = 0;
    for product in page {
        let identity = product.identity();
        let key = identity.key();
        let candidate = Prepared {
            product,
            hash: OnceLock::new(),
            identity,
            key: key.clone(),
        };
        match by_key.get(&key) {
            Some(existing) => {
                duplicates += 1;
                if product.version >= existing.product.version {
                    by_key.insert(key, candidate);
                }
            }
            None => {
                by_key.insert(key, candidate);
            }
        }
    }
    (by_key.into_values().collect(), duplicates)
}

#[derive(Debug, FromQueryResult)]
pub(super) struct StoredHead {
    pub(super) id: i64,
    pub(super) identity: String,
    pub(super) source_version: i64,
    pub(super) revision: i64,
    pub(super) content_hash: String,
    /// A snapshot delisted it: whatever the record holds, folding it relists the product.
    pub(super) delisted: bool,
}

/// A planned write of one product.
pub(super) struct Write<'a> {
    pub(super) record: &'a Prepared<'a>,
    pub(super) revision: i64,
    /// `None` for a plain version advance (no event).
    pub(super) event: Option<PlannedEvent>,
}

pub(super) enum PlannedEvent {
    /// Everything the event holds comes from the record: derived when the payload is rendered
    /// (on PostgreSQL while the server writes the product rows), not before.
    Created,
    /// The diff against the stored row, read before writing; `relisted` when the stored row
    /// was delisted (`before` is then its state at delisting, `changes` may be empty). The
    /// event's `after` is the record's product.
    Updated {
        product_id: i64,
        changes: Vec<FieldChange>,
        before: Box<Product>,
        relisted: bool,
    },
}

impl PlannedEvent {
    pub(super) fn op(&self) -> &'static str {
        match self {
            PlannedEvent::Created => "created",
            PlannedEvent::Updated { relisted: true, .. } => "relisted",
            PlannedEvent::Updated { .. } => "updated",
        }
    }

    /// The product's id when known before writing (updates); inserts learn it from the write.
    pub(super) fn product_id(&self) -> Option<i64> {
        match self {
            PlannedEvent::Created => None,
            PlannedEvent::Updated { product_id, .. } => Some(*product_id),
        }
    }
}

/// What to write for a page: inserts and updates in identity order (the lock order), and the
/// counts. Records that are stale or unchanged (at the same version) write nothing.
pub(super) struct Plan<'a> {
    pub(super) outcome: FoldOutcome,
    pub(super) inserts: Vec<Write<'a>>,
    pub(super) updates: Vec<Write<'a>>,
}

impl Plan<'_> {
    pub(super) fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.updates.is_empty()
    }
}

/// The stored rows whose full content the plan needs (the diff): records that are neither
/// new, nor stale, nor of the same content hash.
pub(super) fn to_read(page: &[Prepared<'_>], heads: &HashMap<String, StoredHead>) -> Vec<i64> {
    page.iter()
        .filter_map(|record| match heads.get(&record.key) {
            Some(head)
                if record.product.version >= head.source_version
                    && (record.hash() != head.content_hash || head.delisted) =>
            {
                Some(head.id)
            }
            _ => None,
        })
        .collect()
}

/// Decides the fold of `page` against the stored `heads` and the full `stored` rows of
/// [`to_read`] (each moves into the event whose `before` it is). `None` when a stored row the
/// heads promised is missing (deleted meanwhile): the caller folds again from a fresh read.
pub(super) fn plan<'a>(
    page: &'a [Prepared<'a>],
    heads: &HashMap<String, StoredHead>,
    mut stored: HashMap<i64, Product>,
) -> Option<Plan<'a>> {
    let mut outcome = FoldOutcome {
        fetched: page.len() as u64,
        ..FoldOutcome::default()
    };
    let (mut inserts, mut updates) = (Vec::new(), Vec::new());
    for record in page {
        let Some(head) = heads.get(&record.key) else {
            inserts.push(Write {
                record,
                revision: 1,
                event: Some(PlannedEvent::Created),
            });
            continue;
        };
        if record.product.version < head.source_version {
            outcome.stale += 1;
            continue;
        }
        if head.delisted {
            let before = stored.remove(&head.id)?;
            outcome.relisted += 1;
            updates.push(Write {
                record,
                revision: head.revision + 1,
                event: Some(PlannedEvent::Updated {
                    product_id: head.id,
                    changes: diff::diff(&before.content, &record.product.content),
                    before: Box::new(before),
                    relisted: true,
                }),
            });
            continue;
        }
        // Identities are unique within a page, so each stored row is taken at most once.
        let (changes, before) = if record.hash() == head.content_hash {
            (Vec::new(), None)
        } else {
            // Equal content under a different hash (an older canonical form) diffs empty.
            let before = stored.remove(&head.id)?;
            (
                diff::diff(&before.content, &record.product.content),
                Some(before),
            )
        };
        let Some(before) = before.filter(|_| !changes.is_empty()) else {
            outcome.unchanged += 1;
            // A newer version of the same content: advance the stored version alone.
            if record.product.version > head.source_version {
                updates.push(Write {
                    record,
                    revision: head.revision,
                    event: None,
                });
            }
            continue;
        };
        outcome.updated += 1;
        updates.push(Write {
            record,
            revision: head.revision + 1,
            event: Some(PlannedEvent::Updated {
                product_id: head.id,
                changes,
                before: Box::new(before),
                relisted: false,
            }),
        });
    }
    outcome.created = inserts.len() as u64;
    Some(Plan {
        outcome,
        inserts,
        updates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::product::Content;
    use proptest::prelude::*;
    use rust_decimal::Decimal;

    /// A few codes, versions and contents, so that pages repeat products and overlap the
    /// store in every way: new, stale, same, newer with the same content, changed.
    fn product() -> impl Strategy<Value = Product> {
        (0usize..4, 1i64..4, 0i64..3).prop_map(|(code, version, nav)| Product {
            content: Content {
                product_code: Some(["A", "B", "C", "D"][code].to_owned()),
                product_name: "p".to_owned(),
                nav: Some(Decimal::new(10_000 + nav, 4)),
                ..Content::default()
            },
            version,
            updated_at: None,
        })
    }

    /// The store: for some codes, a row (id, content, version, revision).
    fn stored() -> impl Strategy<Value = Vec<(Product, i64)>> {
        proptest::collection::vec((product(), 1i64..5), 0..4)
    }

    fn heads_of(rows: &[(Product, i64)]) -> (HashMap<String, StoredHead>, HashMap<i64, Product>) {
        let (mut heads, mut full) = (HashMap::new(), HashMap::new());
        for (id, (p, revision)) in rows.iter().enumerate() {
            let key = p.identity().key();
            if heads.contains_key(&key) {
                continue;
            }
            let id = id as i64 + 100;
            heads.insert(
                key.clone(),
                StoredHead {
                    id,
                    identity: key,
                    source_version: p.version,
                    revision: *revision,
                    content_hash: p.content.hash(),
                    delisted: false,
                },
            );
            full.insert(id, p.clone());
        }
        (heads, full)
    }

    proptest! {
        #[test]
        fn every_record_is_decided_once_and_as_the_store_says(
            page in proptest::collection::vec(product(), 0..8),
            rows in stored(),
        ) {
            let (prepared, duplicates) = prepare(&page);
            prop_assert_eq!(prepared.len() as u64 + duplicates, page.len() as u64);
            let (heads, full) = heads_of(&rows);
            let wanted: std::collections::HashSet<i64> = to_read(&prepared, &heads).into_iter().collect();
            let stored: HashMap<i64, Product> =
                full.into_iter().filter(|(id, _)| wanted.contains(id)).collect();
            let plan = plan(&prepared, &heads, stored.clone()).expect("every row read");
            let o = plan.outcome;
            prop_assert_eq!(o.fetched, prepared.len() as u64);
            prop_assert_eq!(o.created + o.updated + o.unchanged + o.stale, o.fetched);

            for w in &plan.inserts {
                prop_assert!(!heads.contains_key(&w.record.key));
                prop_assert_eq!(w.revision, 1);
                prop_assert!(matches!(w.event, Some(PlannedEvent::Created)));
            }
            prop_assert_eq!(o.created as usize, plan.inserts.len());
            let mut events = 0;
            for w in &plan.updates {
                let head = &heads[&w.record.key];
                prop_assert!(w.record.product.version >= head.source_version);
                match &w.event {
                    None => {
                        // A version advance: same content, newer version, same revision.
                        prop_assert_eq!(w.record.hash(), head.content_hash.as_str());
                        prop_assert!(w.record.product.version > head.source_version);
                        prop_assert_eq!(w.revision, head.revision);
                    }
                    Some(PlannedEvent::Updated { product_id, changes, .. }) => {
                        events += 1;
                        prop_assert_eq!(*product_id, head.id);
                        prop_assert_eq!(w.revision, head.revision + 1);
                        prop_assert!(!changes.is_empty());
                        prop_assert_eq!(changes, &diff::diff(&stored[&head.id].content, &w.record.product.content));
                    }
                    Some(PlannedEvent::Created) => prop_assert!(false, "a create among updates"),
                }
            }
            prop_assert_eq!(o.updated, events);
            // Stale records and unchanged ones at the same version write nothing.
            let written = plan.inserts.len() + plan.updates.len();
            let silent = prepared.iter().filter(|r| match heads.get(&r.key) {
                Some(h) => r.product.version < h.source_version
                    || (r.product.version == h.source_version && r.hash() == h.content_hash),
                None => false,
            }).count();
            prop_assert_eq!(written + silent, prepared.len());
            // Identity order: the lock order of concurrent writers.
            for ws in [&plan.inserts, &plan.updates] {
                prop_assert!(ws.windows(2).all(|p| p[0].record.key < p[1].record.key));
            }
        }

        #[test]
        fn folding_what_the_store_holds_plans_nothing(rows in stored()) {
            let (heads, full) = heads_of(&rows);
            let page: Vec<Product> = full.values().cloned().collect();
            let (prepared, _) = prepare(&page);
            let plan = plan(&prepared, &heads, HashMap::new()).expect("nothing to read");
            prop_assert!(plan.is_empty());
            prop_assert_eq!(plan.outcome.unchanged, prepared.len() as u64);
        }
    }

    #[test]
    fn a_stored_row_gone_since_the_heads_were_read_is_a_conflict() {
        let old = Product {
            content: Content {
                product_code: Some("A".into()),
                product_name: "old".into(),
                ..Content::default()
            },
            version: 1,
            updated_at: None,
        };
        let mut new = old.clone();
        new.content.product_name = "new".into();
        new.version = 2;
        let (heads, _) = heads_of(&[(old, 1)]);
        let page = [new];
        let (prepared, _) = prepare(&page);
        assert_eq!(to_read(&prepared, &heads), vec![100]);
        assert!(plan(&prepared, &heads, HashMap::new()).is_none());
    }
}
