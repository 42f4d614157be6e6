//! The batch fetch (seed claims 1–2): every product matching a selector, page by page,
//! following `next_cursor` to the end. Each page call has a timeout; transient failures are
//! retried with backoff, 429 waits for `Retry-After`, a 401 refreshes the token once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::time::Instant;

use super::auth::{Token, TokenSource};
use super::guard::Guard;
use super::{UpstreamError, join, read_limited, retry_after};
use crate::command::{Selector, Since};
use crate::product::{Item, Product, RawPage, RecordError};
use crate::retry::{RetryPolicy, retry};
use crate::text::quote;

/// One page of the answer.
#[derive(Debug, Clone)]
pub struct Page {
    /// 1-based position of the page within the fetch.
    pub number: usize,
    pub items: Vec<Product>,
    pub next_cursor: Option<String>,
}

/// What one command may take from the management system before it ends with a clear error.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest page body read (`upstream.max_page_bytes`).
    pub max_page_bytes: usize,
    /// Most pages one command follows (`upstream.max_pages`).
    pub max_pages: usize,
    /// Longest time one command's paging may take (`upstream.command_timeout_ms`).
    pub command_timeout: Duration,
    /// Largest record (`upstream.max_record_bytes`), counted over its unbounded fields.
    pub max_record_bytes: usize,
}

/// The longest `next_cursor` followed (it goes back into a URL).
pub const MAX_CURSOR_BYTES: usize = 4096;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_page_bytes: 32 * 1024 * 1024,
            max_pages: 100_000,
            command_timeout: Duration::from_secs(3600),
            max_record_bytes: 256 * 1024,
        }
    }
}

/// Fetches products from the management system.
pub struct ProductClient {
    http: reqwest::Client,
    products_url: url::Url,
    tokens: Arc<TokenSource>,
    page_size: u32,
    policy: RetryPolicy,
    limits: Limits,
    /// The system's rate limit and circuit; none in tools and some tests.
    guard: Option<Arc<Guard>>,
}

impl ProductClient {
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        tokens: Arc<TokenSource>,
        page_size: u32,
        policy: RetryPolicy,
    ) -> Result<Self, UpstreamError> {
        Ok(Self {
            http,
            products_url: join(base_url, "v1/products")?,
            tokens,
            page_size,
            policy,
            limits: Limits::default(),
            guard: None,
        })
    }

    /// The same client behind a system's rate limit and circuit.
    pub fn with_guard(mut self, guard: Arc<Guard>) -> Self {
        self.guard = Some(guard);
        self
    }

    /// The same client with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The token source (shared with other clients of the same credentials).
    pub fn tokens(&self) -> &Arc<TokenSource> {
        &self.tokens
    }

    /// Every page for `selector`, in order; the stream ends after the page without a cursor
    /// or at the first error (which it yields). Paging that would not end — a cursor seen
    /// before, more than `max_pages` pages, longer than `command_timeout` — ends with a
    /// permanent [`UpstreamError::Runaway`].
    pub fn pages(
        &self,
        selector: Selector,
    ) -> impl Stream<Item = Result<Page, UpstreamError>> + '_ {
        struct State {
            selector: Selector,
            cursor: Option<String>,
            seen: HashSet<String>,
            number: usize,
            done: bool,
            deadline: Instant,
        }
        let start = State {
            selector,
            cursor: None,
            seen: HashSet::new(),
            number: 0,
            done: false,
            deadline: Instant::now() + self.limits.command_timeout,
        };
        futures::stream::try_unfold(start, move |mut state| async move {
            if state.done {
                return Ok(None);
            }
            state.number += 1;
            let what = format!("products page {}", state.number);
            let runaway = |reason: String| UpstreamError::Runaway {
                what: what.clone(),
                reason,
            };
            if state.number > self.limits.max_pages {
                return Err(runaway(format!(
                    "more than {} pages (upstream.max_pages): the paging does not end",
                    self.limits.max_pages
                )));
            }
            let page = tokio::time::timeout_at(
                state.deadline,
                self.fetch_page(&state.selector, state.cursor.as_deref(), state.number),
            )
            .await
            .map_err(|_| {
                runaway(format!(
                    "the command's paging took longer than {} s (upstream.command_timeout_ms)",
                    self.limits.command_timeout.as_secs()
                ))
            })??;
            if page.items.len() > self.page_size as usize {
                return Err(runaway(format!(
                    "{} items on a page of {} asked for",
                    page.items.len(),
                    self.page_size
                )));
            }
            if let Some(next) = &page.next_cursor
                && next.len() > MAX_CURSOR_BYTES
            {
                return Err(runaway(format!(
                    "next_cursor is {} bytes, above {MAX_CURSOR_BYTES}",
                    next.len()
                )));
            }
            if let Some(next) = &page.next_cursor
                && !state.seen.insert(next.clone())
            {
                return Err(runaway(format!(
                    "next_cursor {} was already followed: the paging loops",
                    quote(next)
                )));
            }
            state.cursor = page.next_cursor.clone();
            state.done = state.cursor.is_none();
            Ok(Some((page, state)))
        })
    }

    /// One page, retried under the policy.
    pub async fn fetch_page(
        &self,
        selector: &Selector,
        cursor: Option<&str>,
        number: usize,
    ) -> Result<Page, UpstreamError> {
        let what = format!("products page {number}");
        let started = std::time::Instant::now();
        let system = self.guard.as_ref().map_or("default", |g| g.system());
        let page = retry(&self.policy, &what, || async {
            if let Some(guard) = &self.guard {
                guard.admit()?;
            }
            let outcome = self.fetch_once(selector, cursor, number, &what).await;
            if let Some(guard) = &self.guard {
                guard.record(&outcome);
            }
            let label = outcome
                .as_ref()
                .map_or_else(UpstreamError::outcome, |_| "ok");
            crate::metrics::metrics()
                .upstream_requests
                .with_label_values(&[system, label])
                .inc();
            outcome
        })
        .await;
        crate::metrics::metrics()
            .fetch_seconds
            .with_label_values(&[system])
            .observe(started.elapsed().as_secs_f64());
        page
    }

    async fn fetch_once(
        &self,
        selector: &Selector,
        cursor: Option<&str>,
        number: usize,
        what: &str,
    ) -> Result<Page, UpstreamError> {
        let token = self.tokens.token().await?;
        let mut response = self.send(selector, cursor, &token, what).await?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED {
            // Expired or revoked early: one fresh token, one more try.
            self.tokens.invalidate(&token).await;
            let token = self.tokens.token().await?;
            response = self.send(selector, cursor, &token, what).await?;
            if response.status() == reqwest::StatusCode::UNAUTHORIZED {
                return Err(UpstreamError::Unauthorized {
                    what: what.to_owned(),
                });
            }
        }
        let status = response.status();
        let wait = retry_after(response.headers());
        let body = read_limited(response, self.limits.max_page_bytes, what).await?;
        if !status.is_success() {
            return Err(UpstreamError::from_status(
                what,
                status,
                wait,
                &String::from_utf8_lossy(&body),
            ));
        }
        let page = parse_page(&body, number, what)?;
        for (index, product) in page.items.iter().enumerate() {
            let bytes = product.content.unbounded_bytes();
            if bytes > self.limits.max_record_bytes {
                return Err(UpstreamError::InvalidRecord {
                    what: what.to_owned(),
                    index,
                    identity: product.identity().to_string().chars().take(80).collect(),
                    error: crate::product::RecordError::too_large(
                        "attributes",
                        bytes,
                        self.limits.max_record_bytes,
                    ),
                });
            }
        }
        Ok(page)
    }

    async fn send(
        &self,
        selector: &Selector,
        cursor: Option<&str>,
        token: &Token,
        what: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut query: Vec<(&str, String)> = vec![("page_size", self.page_size.to_string())];
        if let Some(k) = &selector.keyword {
            query.push(("keyword", k.clone()));
        }
        if !selector.product_codes.is_empty() {
            query.push(("product_codes", selector.product_codes.join(",")));
        }
        if let Some(c) = &selector.category {
            query.push(("category", c.clone()));
        }
        // An unresolved "watermark" never gets here (the pipeline resolves it first); were it
        // to, asking with no time limit is the safe reading.
        if let Some(t) = selector.updated_since.and_then(Since::at) {
            query.push((
                "updated_since",
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ));
        }
        if let Some(c) = cursor {
            query.push(("cursor", c.to_owned()));
        }
        if let Some(guard) = &self.guard {
            guard.pace().await;
        }
        self.http
            .get(self.products_url.clone())
            .query(&query)
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(|source| super::unanswered(what, source, "upstream.ca_file"))
    }
}

/// Parses a products page; a record that breaks the contract fails the page, naming it.
pub fn parse_page(body: &[u8], number: usize, what: &str) -> Result<Page, UpstreamError> {
    let malformed = |reason: String| UpstreamError::MalformedBody {
        what: what.to_owned(),
        reason,
    };
    // Read straight into the records' fields: no JSON tree of the page is built.
    let mut raw: RawPage =
        serde_json::from_slice(body).map_err(|e| malformed(format!("not JSON: {e}")))?;
    if !raw.object {
        return Err(malformed("not a JSON object".into()));
    }
    let items = raw
        .items
        .take()
        .ok_or_else(|| malformed("`items` is missing or not an array".into()))?;
    let next_cursor = raw
        .next_cursor()
        .map_err(|reason| malformed(reason.into()))?;
    let mut products = Vec::with_capacity(items.len());
    for (index, Item(item)) in items.into_iter().enumerate() {
        let invalid = |identity: String, error| UpstreamError::InvalidRecord {
            what: what.to_owned(),
            index,
            identity,
            error,
        };
        let Some(mut record) = item else {
            let error = RecordError::new("(record)", "is not a JSON object");
            return Err(invalid(describe_record(None, None), error));
        };
        let product = Product::from_raw(&mut record).map_err(|error| {
            let (code, name) = record.code_and_name();
            invalid(describe_record(code, name), error)
        })?;
        products.push(product);
    }
    Ok(Page {
        number,
        items: products,
        next_cursor,
    })
}

/// How to name a record in an error: its code, else its name, else its position only.
fn describe_record(code: Option<&str>, name: Option<&str>) -> String {
    match (code, name) {
        (Some(code), _) => format!("code {}", quote(code)),
        (None, Some(name)) => format!("name {}", quote(name)),
        _ => "no code or name".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_product_code_is_quoted_short() {
        let code = "X".repeat(5_000_000);
        let body = format!(
            r#"{{"items":[{{"product_code":"{code}","product_name":"a","version":1}}],"next_cursor":null}}"#
        );
        let err = parse_page(body.as_bytes(), 1, "products page 1").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.len() < 400,
            "{} bytes: {}",
            msg.len(),
            &msg[..400.min(msg.len())]
        );
        assert!(msg.contains("product_code"), "{msg}");
    }

    #[test]
    fn a_bad_record_names_page_record_and_field() {
        let body = br#"{"items":[{"product_code":"A","product_name":"a","version":1},{"product_code":"B","product_name":"b","nav":1.5,"version":1}],"next_cursor":null}"#;
        let err = parse_page(body, 3, "products page 3").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("products page 3")
                && msg.contains("record 1")
                && msg.contains("code \"B\"")
                && msg.contains("`nav`"),
            "{msg}"
        );
        assert!(!err.is_transient());
    }

    #[test]
    fn malformed_bodies_are_permanent_and_name_the_page() {
        for body in [
            &b"<html>"[..],
            b"{\"items\":5}",
            b"[]",
            b"{\"items\":[],\"next_cursor\":7}",
        ] {
            let err = parse_page(body, 2, "products page 2").unwrap_err();
            assert!(matches!(err, UpstreamError::MalformedBody { .. }), "{err}");
            assert!(err.to_string().contains("products page 2"));
        }
    }
}
