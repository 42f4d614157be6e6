//! The management systems of one deployment (DESIGN.md "Several management systems"): the
//! default `[upstream]` and every `[upstream.systems.<name>]`, each with its own HTTP client,
//! token cache, rate limit and circuit, so that a failing system never slows another's
//! commands. Commands are routed here by their `system`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::guard::Guard;
use super::products::{Limits, ProductClient};
use super::{TokenSource, UpstreamError, http_client};
use crate::config::{Settings, UpstreamSettings};
use crate::retry::RetryPolicy;

/// One management system as product-sync reaches it.
pub struct System {
    pub name: String,
    pub client: Arc<ProductClient>,
    pub guard: Arc<Guard>,
    /// `upstream.max_delist_ratio` of this system: the snapshot guard.
    pub max_delist_ratio: f64,
    /// How far behind the watermark an incremental asks again (`schedule.watermark_overlap_ms`).
    pub watermark_overlap: std::time::Duration,
    /// Paused by an operator: its commands wait on the retry topic, nothing is sent to it.
    paused: AtomicBool,
}

impl System {
    /// The client, tokens, rate limit and circuit of one configured system.
    pub fn build(u: &UpstreamSettings) -> Result<Self, UpstreamError> {
        let ca = u.ca_file.as_deref().map(|p| (p, "upstream.ca_file"));
        let http = http_client(u.timeout, ca)?;
        let policy = RetryPolicy::with_budget(u.retry_max_elapsed);
        let guard = Arc::new(Guard::new(
            &u.system,
            u.rate_limit_per_s,
            u.circuit_failures,
            u.circuit_open,
        ));
        let tokens = Arc::new(
            TokenSource::new(
                http.clone(),
                &u.base_url,
                u.client_id.clone(),
                u.client_secret.clone(),
                policy,
            )?
            .with_guard(guard.clone()),
        );
        let client = ProductClient::new(http, &u.base_url, tokens, u.page_size, policy)?
            .with_limits(Limits {
                max_page_bytes: u.max_page_bytes,
                max_pages: u.max_pages,
                command_timeout: u.command_timeout,
                max_record_bytes: u.max_record_bytes,
            })
            .with_guard(guard.clone());
        Ok(System {
            name: u.system.clone(),
            client: Arc::new(client),
            guard,
            max_delist_ratio: u.max_delist_ratio,
            watermark_overlap: u.schedule.watermark_overlap,
            paused: AtomicBool::new(false),
        })
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
}

/// Every configured system, by name; the default one first.
pub struct Systems {
    default: String,
    by_name: BTreeMap<String, Arc<System>>,
}

impl Systems {
    pub fn build(settings: &Settings) -> Result<Self, UpstreamError> {
        let mut by_name = BTreeMap::new();
        for u in settings.all_systems() {
            by_name.insert(u.system.clone(), Arc::new(System::build(u)?));
        }
        Ok(Systems {
            default: settings.upstream.system.clone(),
            by_name,
        })
    }

    /// The system commands go to when they name none.
    pub fn default_name(&self) -> &str {
        &self.default
    }

    pub fn get(&self, name: &str) -> Option<&Arc<System>> {
        self.by_name.get(name)
    }

    /// Every system's name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<System>> {
        self.by_name.values()
    }
}
