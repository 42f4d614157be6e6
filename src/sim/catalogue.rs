//! The simulator's product catalogue: generated deterministically from a seed (Chinese and
//! ASCII names, shared keywords, every risk level, exact decimals with many digits, some
//! records without a code) or loaded from a JSON file; changed through the admin endpoint.

use std::collections::HashMap;

use chrono::{DateTime, Duration as ChronoDuration, NaiveDate, SubsecRound, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::command::{Selector, Since};
use crate::product::{Content, Product, ProductStatus, RecordError, RiskLevel};

const PREFIXES: [&str; 8] = [
    "稳健",
    "安享",
    "悦享",
    "丰利",
    "鑫益",
    "睿远",
    "天天盈",
    "季季红",
];
const SUFFIXES: [&str; 5] = ["理财", "增利", "优选", "成长", "固收+"];
const ASCII_NAMES: [&str; 5] = [
    "Prosperity",
    "Harbor Income",
    "Evergreen",
    "Silver Bridge",
    "Lotus Yield",
];
const CATEGORIES: [&str; 5] = ["fixed_income", "equity", "mixed", "cash", "structured"];
const ISSUERS: [&str; 4] = [
    "示例银行理财有限公司",
    "Harbor Asset Management",
    "联合财富",
    "Eastern Trust",
];
/// Keywords shared by many products, so keyword selectors match batches.
pub const KEYWORDS: [&str; 8] = [
    "稳健",
    "养老",
    "绿色",
    "ESG",
    "fixed",
    "短期",
    "高净值",
    "新客专享",
];

/// The catalogue: products in insertion order, with an index by identity key.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    products: Vec<Product>,
    /// Each product's contract JSON, rendered once when it changes: a page is then a
    /// concatenation, so the simulator is never the bottleneck of a benchmark.
    rendered: Vec<String>,
    index: HashMap<String, usize>,
}

impl Catalogue {
    pub fn new(products: Vec<Product>) -> Self {
        let mut c = Catalogue::default();
        for p in products {
            c.upsert(p);
        }
        c
    }

    /// `n` products, the same for the same seed.
    pub fn generate(n: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let base = Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_else(Utc::now);
        let products = (0..n).map(|i| generate_one(&mut rng, i, base)).collect();
        Self::new(products)
    }

    /// Loads `{"items":[…]}` or a bare array of contract records.
    pub fn from_json(value: &Value) -> Result<Self, (usize, RecordError)> {
        let items = match value {
            Value::Array(a) => a.as_slice(),
            Value::Object(o) => o
                .get("items")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[]),
            _ => &[],
        };
        let products = items
            .iter()
            .enumerate()
            .map(|(i, v)| Product::from_json(v).map_err(|e| (i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(products))
    }

    pub fn len(&self) -> usize {
        self.products.len()
    }

    pub fn is_empty(&self) -> bool {
        self.products.is_empty()
    }

    pub fn products(&self) -> &[Product] {
        &self.products
    }

    /// Inserts or replaces by identity; returns the stored product.
    pub fn upsert(&mut self, product: Product) -> &Product {
        let key = product.identity().key();
        let json = product.to_json().to_string();
        let at = match self.index.get(&key) {
            Some(&i) => {
                self.products[i] = product;
                self.rendered[i] = json;
                i
            }
            None => {
                self.products.push(product);
                self.rendered.push(json);
                self.index.insert(key, self.products.len() - 1);
                self.products.len() - 1
            }
        };
        &self.products[at]
    }

    /// Withdraws the products with these identity keys (the management system stops offering
    /// them); returns them.
    pub fn remove(&mut self, keys: &std::collections::HashSet<String>) -> Vec<Product> {
        let mut removed = Vec::new();
        let (products, rendered) = (
            std::mem::take(&mut self.products),
            std::mem::take(&mut self.rendered),
        );
        self.index.clear();
        for (product, json) in products.into_iter().zip(rendered) {
            let key = product.identity().key();
            if keys.contains(&key) {
                removed.push(product);
            } else {
                self.index.insert(key, self.products.len());
                self.products.push(product);
                self.rendered.push(json);
            }
        }
        removed
    }

    /// The contract JSON of the product at `index` (as in [`Catalogue::products`]).
    pub fn rendered(&self, index: usize) -> &str {
        self.rendered
            .get(index)
            .map(String::as_str)
            .unwrap_or("null")
    }

    /// Changes `count` products (chosen from `seed`): their NAV and expected yield move, their
    /// version grows by one. Returns the changed products.
    pub fn mutate(&mut self, count: usize, seed: u64, now: DateTime<Utc>) -> Vec<Product> {
        if self.products.is_empty() {
            return Vec::new();
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut chosen: Vec<usize> = (0..self.products.len()).collect();
        // Partial Fisher-Yates: the first `count` entries are a random sample.
        let count = count.min(chosen.len());
        for i in 0..count {
            let j = rng.gen_range(i..chosen.len());
            chosen.swap(i, j);
        }
        let mut changed = Vec::with_capacity(count);
        for &i in &chosen[..count] {
            let p = &mut self.products[i];
            let step = Decimal::new(rng.gen_range(1..500), 6);
            p.content.nav = Some((p.content.nav.unwrap_or(Decimal::ONE) + step).normalize());
            p.content.expected_yield = Some(
                (p.content.expected_yield.unwrap_or_default() + Decimal::new(1, 4)).normalize(),
            );
            p.version += 1;
            p.updated_at = Some(now.trunc_subsecs(6));
            self.rendered[i] = p.to_json().to_string();
            changed.push(p.clone());
        }
        changed
    }

    /// The products matching every part of the selector, in catalogue order.
    pub fn select<'a>(&'a self, selector: &'a Selector) -> impl Iterator<Item = &'a Product> + 'a {
        self.products.iter().filter(move |p| matches(p, selector))
    }
}

/// Does `p` match the selector? Keyword: one of its keywords, or part of its name.
pub fn matches(p: &Product, s: &Selector) -> bool {
    let c = &p.content;
    if let Some(k) = &s.keyword
        && !(c.keywords.iter().any(|w| w == k) || c.product_name.contains(k.as_str()))
    {
        return false;
    }
    if !s.product_codes.is_empty()
        && !c
            .product_code
            .as_ref()
            .is_some_and(|code| s.product_codes.contains(code))
    {
        return false;
    }
    if let Some(cat) = &s.category
        && c.category.as_ref() != Some(cat)
    {
        return false;
    }
    if let Some(since) = s.updated_since.and_then(Since::at)
        && p.updated_at.is_none_or(|t| t < since)
    {
        return false;
    }
    true
}

fn generate_one(rng: &mut StdRng, i: usize, base: DateTime<Utc>) -> Product {
    let chinese = rng.gen_bool(0.7);
    let name = if chinese {
        format!(
            "{}{}{}号",
            PREFIXES[rng.gen_range(0..PREFIXES.len())],
            SUFFIXES[rng.gen_range(0..SUFFIXES.len())],
            i + 1
        )
    } else {
        format!(
            "{} Fund No.{}",
            ASCII_NAMES[rng.gen_range(0..ASCII_NAMES.len())],
            i + 1
        )
    };
    // About one record in forty has no code and is known by its (unique) name only.
    let code = (i % 40 != 39).then(|| format!("WM{:07}", i + 1));
    let mut keywords: Vec<String> = Vec::new();
    for _ in 0..rng.gen_range(1..=3) {
        let k = KEYWORDS[rng.gen_range(0..KEYWORDS.len())].to_owned();
        if !keywords.contains(&k) {
            keywords.push(k);
        }
    }
    let start = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap_or_default()
        + ChronoDuration::days(rng.gen_range(0..300));
    let term = rng.gen_range(7..1_100);
    let currency = ["CNY", "CNY", "CNY", "USD", "HKD"][rng.gen_range(0..5)];
    let content = Content {
        product_code: code,
        product_name: name,
        category: Some(CATEGORIES[rng.gen_range(0..CATEGORIES.len())].to_owned()),
        risk_level: Some(RiskLevel::ALL[rng.gen_range(0..5)]),
        currency: Some(currency.to_owned()),
        issuer: Some(ISSUERS[rng.gen_range(0..ISSUERS.len())].to_owned()),
        status: Some(
            ProductStatus::ALL[if rng.gen_bool(0.85) {
                0
            } else {
                rng.gen_range(1..3)
            }],
        ),
        // Ten decimal places: values no binary float holds exactly.
        nav: Some(Decimal::new(rng.gen_range(9_000_000_000i64..13_000_000_000), 10).normalize()),
        expected_yield: Some(Decimal::new(rng.gen_range(100_000..650_000), 7).normalize()),
        min_investment: Some(
            Decimal::new(
                [100_000, 1_000_000, 5_000_000, 100_050][rng.gen_range(0..4)],
                2,
            )
            .normalize(),
        ),
        term_days: Some(term),
        sale_start: Some(start),
        sale_end: Some(start + ChronoDuration::days(i64::from(term))),
        keywords,
        attributes: [
            (
                "channel".to_owned(),
                json!(["app", "branch", "partner"][rng.gen_range(0..3)]),
            ),
            (
                "fee_rate".to_owned(),
                json!(format!("0.00{}", rng.gen_range(10..99))),
            ),
        ]
        .into_iter()
        .collect(),
    };
    Product {
        content,
        version: rng.gen_range(1..4),
        updated_at: Some(base + ChronoDuration::minutes(i as i64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_valid() {
        let a = Catalogue::generate(300, 7);
        let b = Catalogue::generate(300, 7);
        assert_eq!(a.products(), b.products());
        assert_ne!(a.products(), Catalogue::generate(300, 8).products());
        assert_eq!(a.len(), 300, "identities are unique");
        for p in a.products() {
            p.content.validate().unwrap();
            assert_eq!(&Product::from_json(&p.to_json()).unwrap(), p);
        }
        assert!(
            a.products()
                .iter()
                .any(|p| p.content.product_code.is_none())
        );
        assert!(
            a.products()
                .iter()
                .any(|p| p.content.product_name.is_ascii())
        );
        assert!(
            a.products()
                .iter()
                .any(|p| !p.content.product_name.is_ascii())
        );
    }

    #[test]
    fn mutate_bumps_versions_of_the_chosen() {
        let mut c = Catalogue::generate(50, 1);
        let before = c.clone();
        let changed = c.mutate(5, 9, Utc::now());
        assert_eq!(changed.len(), 5);
        for p in &changed {
            let old = before
                .products()
                .iter()
                .find(|o| o.identity() == p.identity())
                .unwrap();
            assert_eq!(p.version, old.version + 1);
            assert_ne!(p.content, old.content);
        }
    }
}
