//! The end of a snapshot command (DESIGN.md "Snapshot and delisting"): after every page of its
//! scope was fetched and folded, the stored products of the scope it did not see are looked up
//! by code once more; those still offered are folded as usual (moved to another category,
//! say), the others are delisted — unless they are more than `upstream.max_delist_ratio` of
//! the scope and the command does not say `force`. A dry run folds nothing and delists
//! nothing: it counts and lists what it would do.
//!
//! Code-less products cannot be looked up: a whole-catalogue snapshot that misses some scans
//! the catalogue a second time and delists only those missing from both scans. An upstream
//! whose cursors are offsets skips a product whenever one before the cursor is withdrawn
//! during the scan; a product skipped so must not be delisted.

use std::collections::HashSet;

use chrono::Utc;
use futures::StreamExt;

use super::{AttemptError, Failure, Processor, Scan};
use crate::command::{Command, Selector};
use crate::store::fold::{self, Candidate, FoldContext, FoldOutcome, Scope};
use crate::upstream::System;
use crate::wire::{DriftKind, FailureClass, FailureKind};

/// Codes per confirming lookup (keeps the request's URL short).
const LOOKUP_CODES: usize = 100;

/// Confirms and delists the scope's unseen products; `Some` failure when the management
/// system failed a lookup (nothing delisted) or the guard refused.
pub(super) async fn complete(
    p: &Processor,
    system: &System,
    command: &Command,
    ctx: &FoldContext<'_>,
    scan: &mut Scan,
) -> Result<Option<Failure>, AttemptError> {
    let Some(seen) = &scan.seen else {
        return Ok(None);
    };
    let selector = command.selector();
    let scope = match &selector.category {
        Some(category) if !selector.all => Scope::Category(category),
        _ => Scope::All,
    };
    let (in_scope, candidates) = fold::candidates(&p.db, command.system(), scope, seen).await?;
    if candidates.is_empty() {
        return Ok(None);
    }
    let dry_run = command.dry_run();
    let offered = match confirm((p, system), dry_run, ctx, scope, &candidates, scan).await? {
        Ok(offered) => offered,
        Err(failure) => return Ok(Some(failure)),
    };
    // Only a whole-catalogue snapshot vouches that a code-less product is gone.
    let gone: Vec<Candidate> = candidates
        .into_iter()
        .filter(|c| {
            !offered.contains(&c.identity) && (c.product_code.is_some() || scope == Scope::All)
        })
        .collect();
    if gone.is_empty() {
        return Ok(None);
    }
    if dry_run {
        // What a forced snapshot would delist; a dry run is never refused by the guard.
        scan.outcome.delisted = gone.len() as u64;
        for c in &gone {
            scan.drift.note(
                DriftKind::Delisted,
                format!("{}/{}", ctx.system, event_key(&c.identity)),
            );
        }
        return Ok(None);
    }
    let ratio = system.max_delist_ratio;
    if gone.len() as f64 > ratio * in_scope as f64 && !command.force() {
        tracing::error!(
            to_delist = gone.len(),
            in_scope,
            max_delist_ratio = ratio,
            "snapshot refused by the delisting guard"
        );
        return Ok(Some(Failure {
            reason: format!(
                "the snapshot would delist {} of the {in_scope} stored products in its scope, \
                 more than upstream.max_delist_ratio = {ratio} allows; nothing was delisted \
                 (send it again with \"force\": true to delist them)",
                gone.len()
            ),
            class: FailureClass::Permanent,
            kind: FailureKind::DelistGuard,
        }));
    }
    scan.outcome.delisted = fold::delist(&p.db, ctx, &gone, Utc::now()).await?;
    super::record_fold(&FoldOutcome {
        delisted: scan.outcome.delisted,
        ..FoldOutcome::default()
    });
    tracing::info!(
        delisted = scan.outcome.delisted,
        in_scope,
        "snapshot delisted the products the management system no longer offers"
    );
    Ok(None)
}

/// The change-topic key part of a stored identity key (`code:X` → `X`, `name:…` unchanged).
fn event_key(identity: &str) -> &str {
    identity.strip_prefix("code:").unwrap_or(identity)
}

/// Looks the coded candidates up by code and, for a whole-catalogue snapshot, scans once more
/// for the code-less ones; folds the candidates that come back and returns their identity
/// keys, or the management system's failure.
async fn confirm(
    p: (&Processor, &System),
    dry_run: bool,
    ctx: &FoldContext<'_>,
    scope: Scope<'_>,
    candidates: &[Candidate],
    scan: &mut Scan,
) -> Result<Result<HashSet<String>, Failure>, AttemptError> {
    let codes: Vec<String> = candidates
        .iter()
        .filter_map(|c| c.product_code.clone())
        .collect();
    let mut offered = HashSet::new();
    for batch in codes.chunks(LOOKUP_CODES) {
        let lookup = Selector {
            product_codes: batch.to_vec(),
            ..Selector::default()
        };
        if let Err(failure) = refetch(p, dry_run, ctx, lookup, None, &mut offered, scan).await? {
            return Ok(Err(failure));
        }
    }
    let codeless: HashSet<String> = candidates
        .iter()
        .filter(|c| c.product_code.is_none())
        .map(|c| c.identity.clone())
        .collect();
    if scope == Scope::All && !codeless.is_empty() {
        tracing::info!(
            codeless = codeless.len(),
            "scanning the catalogue again for the code-less products the snapshot missed"
        );
        let all = Selector {
            all: true,
            ..Selector::default()
        };
        let keep = Some(&codeless);
        if let Err(failure) = refetch(p, dry_run, ctx, all, keep, &mut offered, scan).await? {
            return Ok(Err(failure));
        }
    }
    Ok(Ok(offered))
}

/// Fetches `selector` page by page and folds the products it returns — only those in `keep`
/// when given — adding their identity keys to `offered`; the management system's failure
/// ends it.
async fn refetch(
    (p, system): (&Processor, &System),
    dry_run: bool,
    ctx: &FoldContext<'_>,
    selector: Selector,
    keep: Option<&HashSet<String>>,
    offered: &mut HashSet<String>,
    scan: &mut Scan,
) -> Result<Result<(), Failure>, AttemptError> {
    let mut pages = std::pin::pin!(system.client.pages(selector));
    while let Some(page) = pages.next().await {
        let mut items = match page {
            Ok(page) => page.items,
            Err(e) => {
                return Ok(Err(Failure {
                    reason: format!("confirming the snapshot's missing products: {e}"),
                    class: FailureClass::of(e.is_transient()),
                    kind: FailureKind::Upstream,
                }));
            }
        };
        if let Some(keep) = keep {
            items.retain(|item| keep.contains(&item.identity().key()));
            if items.is_empty() {
                continue;
            }
        }
        offered.extend(items.iter().map(|item| item.identity().key()));
        let (folded, drift) = p.apply(dry_run, ctx, &items).await?;
        if !dry_run {
            super::record_fold(&folded);
        }
        scan.outcome.add(folded);
        scan.drift.merge(drift);
    }
    Ok(Ok(()))
}
