//! Product-request commands: the feature information a command names (the selector) that the
//! management system is asked for.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Feature information of a product request: every product that matches all given parts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// A keyword shared by the products (matched against names and keyword lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyword: Option<String>,
    /// Exact product codes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub product_codes: Vec<String>,
    /// A product category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Only products changed at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_since: Option<DateTime<Utc>>,
}

impl Selector {
    /// A selector that names nothing would ask for the whole catalogue.
    pub fn is_empty(&self) -> bool {
        self.keyword.is_none()
            && self.product_codes.is_empty()
            && self.category.is_none()
            && self.updated_since.is_none()
    }
}
