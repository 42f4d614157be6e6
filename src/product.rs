//! The product record: the domain type the management system's JSON is parsed into (contract
//! v1), the identity a record is matched by, and its canonical JSON form used in events.
//!
//! Parsing is strict and names the field at fault: decimals must arrive as strings and are
//! parsed exactly (never through `f64`) and normalised (`1.10` → `1.1`), so equal values compare
//! and hash equal. Unknown extra fields are kept in `attributes`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, SubsecRound, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub mod raw;

use raw::Loose;
pub use raw::{Item, RawPage, RawRecord};

/// Longest product code the contract allows.
pub const MAX_CODE_LEN: usize = 64;
/// Longest product name (in characters) the contract allows.
pub const MAX_NAME_LEN: usize = 200;
/// Longest `category` (its column's length).
pub const MAX_CATEGORY_LEN: usize = 64;
/// Longest `issuer` (its column's length).
pub const MAX_ISSUER_LEN: usize = 200;

/// A record that breaks the contract: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct RecordError {
    pub field: String,
    pub reason: String,
}

impl RecordError {
    /// A record larger than `limit` bytes (`upstream.max_record_bytes`).
    pub fn too_large(field: &str, bytes: usize, limit: usize) -> Self {
        Self::new(
            field,
            format!(
                "{bytes} bytes, above the {limit} a record may hold (upstream.max_record_bytes)"
            ),
        )
    }

    /// Field and reason are cut short: both may quote what the management system sent.
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: cut(field.into(), 100),
            reason: cut(reason.into(), 300),
        }
    }
}

/// The length of `value`'s JSON text, counted without building it.
pub fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail; a value that cannot serialize counts what it wrote.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// `text` cut to `max` characters (with `…` when cut).
fn cut(text: String, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// Risk rating `R1` (lowest) … `R5`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RiskLevel {
    R1,
    R2,
    R3,
    R4,
    R5,
}

impl RiskLevel {
    pub const ALL: [RiskLevel; 5] = [Self::R1, Self::R2, Self::R3, Self::R4, Self::R5];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::R1 => "R1",
            Self::R2 => "R2",
            Self::R3 => "R3",
            Self::R4 => "R4",
            Self::R5 => "R5",
        }
    }
}

impl FromStr for RiskLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not one of R1…R5"))
    }
}

/// Sale status at the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProductStatus {
    OnSale,
    Suspended,
    Closed,
}

impl ProductStatus {
    pub const ALL: [ProductStatus; 3] = [Self::OnSale, Self::Suspended, Self::Closed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnSale => "on_sale",
            Self::Suspended => "suspended",
            Self::Closed => "closed",
        }
    }
}

impl FromStr for ProductStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not one of on_sale, suspended, closed"))
    }
}

/// How a record is matched against the store: by code, or by name when the source gives no
/// code. Always scoped to one management system.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    Code(String),
    Name(String),
}

impl Identity {
    /// The stored form, unique per system: `code:<code>` or `name:<name>`.
    pub fn key(&self) -> String {
        match self {
            Identity::Code(c) => format!("code:{c}"),
            Identity::Name(n) => format!("name:{n}"),
        }
    }

    /// The form used in event keys and ids: the code itself, or `name:<name>`.
    pub fn event_key(&self) -> String {
        match self {
            Identity::Code(c) => c.clone(),
            Identity::Name(n) => format!("name:{n}"),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Code(c) => write!(f, "code {c}"),
            Identity::Name(n) => write!(f, "name {n:?}"),
        }
    }
}

/// What a product is: every field that, when it changes, makes a change event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Content {
    pub product_code: Option<String>,
    pub product_name: String,
    pub category: Option<String>,
    pub risk_level: Option<RiskLevel>,
    pub currency: Option<String>,
    pub issuer: Option<String>,
    pub status: Option<ProductStatus>,
    pub nav: Option<Decimal>,
    pub expected_yield: Option<Decimal>,
    pub min_investment: Option<Decimal>,
    pub term_days: Option<i32>,
    pub sale_start: Option<NaiveDate>,
    pub sale_end: Option<NaiveDate>,
    pub keywords: Vec<String>,
    /// Free-form; diffed key by key. Also holds unknown extra fields of the record.
    pub attributes: BTreeMap<String, Value>,
}

/// One product as the management system describes it: content plus source metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub content: Content,
    /// Grows with each change at the source; a lower version than the stored one is stale.
    pub version: i64,
    /// When the source last changed it.
    pub updated_at: Option<DateTime<Utc>>,
}

/// The contract's field names, in the order of the canonical JSON form.
pub const CONTENT_FIELDS: [&str; 15] = [
    "product_code",
    "product_name",
    "category",
    "risk_level",
    "currency",
    "issuer",
    "status",
    "nav",
    "expected_yield",
    "min_investment",
    "term_days",
    "sale_start",
    "sale_end",
    "keywords",
    "attributes",
];

impl Product {
    /// The identity the store matches this record by.
    pub fn identity(&self) -> Identity {
        match &self.content.product_code {
            Some(code) => Identity::Code(code.clone()),
            None => Identity::Name(self.content.product_name.clone()),
        }
    }

    /// Parses one record of a products page. Errors name the field.
    pub fn from_json(value: &Value) -> Result<Product, RecordError> {
        match Item::deserialize(value) {
            Ok(Item(Some(mut raw))) => Product::from_raw(&mut raw),
            Ok(Item(None)) => Err(RecordError::new("(record)", "is not a JSON object")),
            // Reading a tree cannot fail on syntax; nothing else fails a loose read.
            Err(e) => Err(RecordError::new("(record)", e.to_string())),
        }
    }

    /// Checks one record as read (see [`raw`]) and makes the product of it: the fields are
    /// taken out of `raw`, except the code and the name, which stay to name the record in an
    /// error. Errors name the field, checked in the contract's field order.
    pub fn from_raw(raw: &mut RawRecord) -> Result<Product, RecordError> {
        use std::mem::take;
        let [
            code,
            name,
            category,
            risk,
            currency,
            issuer,
            status,
            nav,
            expected,
            min,
            term,
            start,
            end,
            version,
            updated,
        ] = &mut raw.scalars;
        let content = Content {
            product_code: opt_string(code.clone(), "product_code")?,
            product_name: opt_string(name.clone(), "product_name")?.unwrap_or_default(),
            category: opt_string(take(category), "category")?,
            risk_level: opt_parsed(take(risk), "risk_level")?,
            currency: opt_string(take(currency), "currency")?,
            issuer: opt_string(take(issuer), "issuer")?,
            status: opt_parsed(take(status), "status")?,
            nav: opt_decimal(take(nav), "nav")?,
            expected_yield: opt_decimal(take(expected), "expected_yield")?,
            min_investment: opt_decimal(take(min), "min_investment")?,
            term_days: term_days(take(term))?,
            sale_start: opt_date(take(start), "sale_start")?,
            sale_end: opt_date(take(end), "sale_end")?,
            keywords: keywords(take(&mut raw.keywords))?,
            attributes: attributes(take(&mut raw.attributes), take(&mut raw.extra))?,
        };
        content.validate()?;
        Ok(Product {
            content,
            version: parse_version(take(version))?,
            updated_at: updated_at(take(updated))?,
        })
    }

    /// The canonical JSON form (contract field names, decimals as strings, dates as
    /// `YYYY-MM-DD`), as served by the management system and carried in events.
    pub fn to_json(&self) -> Value {
        self.to_json_and_hash().0
    }

    /// The canonical JSON form and the content hash.
    pub fn to_json_and_hash(&self) -> (Value, String) {
        let mut obj = self.content.to_json_map();
        let hash = self.content.hash();
        obj.insert("version".into(), Value::from(self.version));
        obj.insert(
            "updated_at".into(),
            self.updated_at
                .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)))
                .unwrap_or(Value::Null),
        );
        (Value::Object(obj), hash)
    }
}

impl Content {
    /// The contract's rules on values (the ones types alone do not enforce). Parsing applies
    /// them, and so does the fold, so no record that breaks them reaches the store.
    pub fn validate(&self) -> Result<(), RecordError> {
        if let Some(code) = &self.product_code {
            if code.is_empty() || code.len() > MAX_CODE_LEN {
                return Err(RecordError::new(
                    "product_code",
                    format!("must be 1 to {MAX_CODE_LEN} bytes"),
                ));
            }
            if code.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(RecordError::new(
                    "product_code",
                    "must not contain spaces or control characters",
                ));
            }
        }
        if self.product_name.chars().count() > MAX_NAME_LEN {
            return Err(RecordError::new(
                "product_name",
                format!("longer than {MAX_NAME_LEN} characters"),
            ));
        }
        if self.product_name.trim().is_empty() && self.product_code.is_none() {
            return Err(RecordError::new(
                "product_code",
                "absent, and product_name is empty: the record has no identity",
            ));
        }
        // What the store's columns hold, checked here so both backends refuse the same
        // records with the same error (PostgreSQL alone used to, with a raw database error).
        if self.product_name.chars().any(char::is_control) {
            return Err(RecordError::new(
                "product_name",
                "must not contain control characters",
            ));
        }
        for (field, value, max) in [
            ("category", &self.category, MAX_CATEGORY_LEN),
            ("issuer", &self.issuer, MAX_ISSUER_LEN),
        ] {
            if let Some(v) = value {
                if v.chars().count() > max {
                    return Err(RecordError::new(
                        field,
                        format!("longer than {max} characters"),
                    ));
                }
                if v.chars().any(char::is_control) {
                    return Err(RecordError::new(
                        field,
                        "must not contain control characters",
                    ));
                }
            }
        }
        if let Some(c) = &self.currency
            && !(c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(RecordError::new(
                "currency",
                format!("{c:?} is not an ISO 4217 code"),
            ));
        }
        if self.term_days.is_some_and(|t| t < 0) {
            return Err(RecordError::new(
                "term_days",
                "must be a non-negative whole number",
            ));
        }
        Ok(())
    }

    /// The JSON size of the fields whose size the contract does not bound (`keywords`,
    /// `attributes`); every other field is bounded by [`Content::validate`].
    pub fn unbounded_bytes(&self) -> usize {
        json_len(&self.keywords) + json_len(&self.attributes)
    }

    /// Each content field's canonical JSON value, in `CONTENT_FIELDS` order.
    pub fn field_values(&self) -> [(&'static str, Value); 15] {
        let s = |v: &Option<String>| v.clone().map(Value::String).unwrap_or(Value::Null);
        let d = |v: &Option<Decimal>| {
            v.map(|d| Value::String(d.to_string()))
                .unwrap_or(Value::Null)
        };
        let date = |v: &Option<NaiveDate>| {
            v.map(|d| Value::String(d.to_string()))
                .unwrap_or(Value::Null)
        };
        [
            ("product_code", s(&self.product_code)),
            ("product_name", Value::String(self.product_name.clone())),
            ("category", s(&self.category)),
            (
                "risk_level",
                self.risk_level
                    .map(|r| Value::from(r.as_str()))
                    .unwrap_or(Value::Null),
            ),
            ("currency", s(&self.currency)),
            ("issuer", s(&self.issuer)),
            (
                "status",
                self.status
                    .map(|r| Value::from(r.as_str()))
                    .unwrap_or(Value::Null),
            ),
            ("nav", d(&self.nav)),
            ("expected_yield", d(&self.expected_yield)),
            ("min_investment", d(&self.min_investment)),
            (
                "term_days",
                self.term_days.map(Value::from).unwrap_or(Value::Null),
            ),
            ("sale_start", date(&self.sale_start)),
            ("sale_end", date(&self.sale_end)),
            ("keywords", Value::from(self.keywords.clone())),
            (
                "attributes",
                Value::Object(self.attributes.clone().into_iter().collect()),
            ),
        ]
    }

    fn to_json_map(&self) -> Map<String, Value> {
        self.field_values()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    /// SHA-256 of the canonical content, hex: equal content ⇔ equal hash (up to collisions).
    /// Streams the canonical JSON (keys sorted) into the hasher: nothing is allocated.
    pub fn hash(&self) -> String {
        use std::fmt::Write;
        let mut hasher = Sha256::new();
        // Writing to a hasher cannot fail; serializing these types cannot either.
        let _ = serde_json::to_writer(&mut hasher, &Canonical(self));
        let mut out = String::with_capacity(64);
        for b in hasher.finalize() {
            let _ = write!(out, "{b:02x}");
        }
        out
    }
}

/// The content in canonical JSON form — the same bytes as the sorted map of
/// `Content::field_values` — serialized without building that map.
struct Canonical<'a>(&'a Content);

impl serde::Serialize for Canonical<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = serializer.serialize_map(Some(CONTENT_FIELDS.len()))?;
        content_entries(&mut m, self.0)?;
        m.end()
    }
}

/// A product's canonical JSON form — the bytes of [`Product::to_json`] written out — serialized
/// straight from the product: no JSON tree is built (the fold renders every event's `before`
/// and `after` this way).
pub struct ProductJson<'a>(pub &'a Product);

impl serde::Serialize for ProductJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let p = self.0;
        let mut m = serializer.serialize_map(Some(CONTENT_FIELDS.len() + 2))?;
        content_entries(&mut m, &p.content)?;
        // Both sort after every content field ("term_days" is the last of those).
        m.serialize_entry(
            "updated_at",
            &p.updated_at
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        )?;
        m.serialize_entry("version", &p.version)?;
        m.end()
    }
}

/// The content's entries with their keys in sorted order, as serde_json's ordered map writes
/// them; decimals and dates as text (`Display`), written without an intermediate string.
fn content_entries<M: serde::ser::SerializeMap>(m: &mut M, c: &Content) -> Result<(), M::Error> {
    m.serialize_entry("attributes", &c.attributes)?;
    m.serialize_entry("category", &c.category)?;
    m.serialize_entry("currency", &c.currency)?;
    m.serialize_entry("expected_yield", &AsText(c.expected_yield.as_ref()))?;
    m.serialize_entry("issuer", &c.issuer)?;
    m.serialize_entry("keywords", &c.keywords)?;
    m.serialize_entry("min_investment", &AsText(c.min_investment.as_ref()))?;
    m.serialize_entry("nav", &AsText(c.nav.as_ref()))?;
    m.serialize_entry("product_code", &c.product_code)?;
    m.serialize_entry("product_name", &c.product_name)?;
    m.serialize_entry("risk_level", &c.risk_level.map(RiskLevel::as_str))?;
    m.serialize_entry("sale_end", &AsText(c.sale_end.as_ref()))?;
    m.serialize_entry("sale_start", &AsText(c.sale_start.as_ref()))?;
    m.serialize_entry("status", &c.status.map(ProductStatus::as_str))?;
    m.serialize_entry("term_days", &c.term_days)
}

/// An optional value written as its `Display` text (a JSON string), or `null`.
struct AsText<'a, T>(Option<&'a T>);

impl<T: fmt::Display> serde::Serialize for AsText<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(v) => serializer.collect_str(v),
            None => serializer.serialize_none(),
        }
    }
}

/// The `changes` of a newly created product (the bytes of the diff module's `created`), serialized
/// straight from its content: every field with a value, from `null`, attributes key by key.
pub struct CreatedChanges<'a>(pub &'a Content);

impl serde::Serialize for CreatedChanges<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        /// One entry, in `FieldChange`'s field order; `()` is written as `null`.
        #[derive(serde::Serialize)]
        struct Entry<'a, V: serde::Serialize> {
            field: &'a str,
            old: (),
            new: V,
        }
        let c = self.0;
        let mut seq = serializer.serialize_seq(None)?;
        macro_rules! entry {
            ($field:literal, $value:expr) => {
                seq.serialize_element(&Entry {
                    field: $field,
                    old: (),
                    new: $value,
                })?
            };
        }
        if let Some(v) = &c.product_code {
            entry!("product_code", v);
        }
        entry!("product_name", &c.product_name);
        if let Some(v) = &c.category {
            entry!("category", v);
        }
        if let Some(v) = c.risk_level {
            entry!("risk_level", v.as_str());
        }
        if let Some(v) = &c.currency {
            entry!("currency", v);
        }
        if let Some(v) = &c.issuer {
            entry!("issuer", v);
        }
        if let Some(v) = c.status {
            entry!("status", v.as_str());
        }
        for (field, value) in [
            ("nav", &c.nav),
            ("expected_yield", &c.expected_yield),
            ("min_investment", &c.min_investment),
        ] {
            if value.is_some() {
                seq.serialize_element(&Entry {
                    field,
                    old: (),
                    new: AsText(value.as_ref()),
                })?;
            }
        }
        if let Some(v) = c.term_days {
            entry!("term_days", v);
        }
        for (field, value) in [("sale_start", &c.sale_start), ("sale_end", &c.sale_end)] {
            if value.is_some() {
                seq.serialize_element(&Entry {
                    field,
                    old: (),
                    new: AsText(value.as_ref()),
                })?;
            }
        }
        if !c.keywords.is_empty() {
            entry!("keywords", &c.keywords);
        }
        for (key, value) in &c.attributes {
            let field = format!("attributes.{key}");
            seq.serialize_element(&Entry {
                field: &field,
                old: (),
                new: value,
            })?;
        }
        seq.end()
    }
}

/// `attributes`, with every field the contract does not name folded in (an unknown field
/// that contradicts an attribute of the same name is refused).
fn attributes(
    attributes: raw::Attributes,
    extra: BTreeMap<String, Value>,
) -> Result<BTreeMap<String, Value>, RecordError> {
    let mut attributes = match attributes {
        raw::Attributes::Null => BTreeMap::new(),
        raw::Attributes::Object(m) => m,
        raw::Attributes::Wrong => return Err(RecordError::new("attributes", "must be an object")),
    };
    for (key, value) in extra {
        match attributes.get(&key) {
            Some(existing) if *existing != value => {
                return Err(RecordError::new(
                    key,
                    "unknown field also present in attributes with another value",
                ));
            }
            _ => {
                attributes.insert(key, value);
            }
        }
    }
    Ok(attributes)
}

fn term_days(value: Loose) -> Result<Option<i32>, RecordError> {
    match value {
        Loose::Null => Ok(None),
        Loose::Number(n) => n
            .as_i64()
            .and_then(|v| i32::try_from(v).ok())
            .filter(|v| *v >= 0)
            .map(Some)
            .ok_or_else(|| RecordError::new("term_days", "must be a non-negative whole number")),
        _ => Err(RecordError::new("term_days", "must be a number")),
    }
}

fn keywords(value: raw::Keywords) -> Result<Vec<String>, RecordError> {
    match value {
        raw::Keywords::Null => Ok(Vec::new()),
        raw::Keywords::Strings(k) => Ok(k),
        raw::Keywords::Wrong => Err(RecordError::new("keywords", "must be an array of strings")),
    }
}

fn parse_version(value: Loose) -> Result<i64, RecordError> {
    match value {
        Loose::Number(n) => n
            .as_i64()
            .filter(|v| *v >= 0)
            .ok_or_else(|| RecordError::new("version", "must be a non-negative integer")),
        Loose::Null => Err(RecordError::new("version", "is required")),
        _ => Err(RecordError::new("version", "must be an integer")),
    }
}

/// Stores keep microseconds (PostgreSQL timestamptz): finer digits are dropped here, so what
/// is stored is exactly what was parsed.
fn updated_at(value: Loose) -> Result<Option<DateTime<Utc>>, RecordError> {
    opt_string(value, "updated_at")?
        .map(|s| {
            DateTime::parse_from_rfc3339(&s)
                .map(|d| d.with_timezone(&Utc).trunc_subsecs(6))
                .map_err(|e| RecordError::new("updated_at", format!("{s:?} is not RFC 3339: {e}")))
        })
        .transpose()
}

fn opt_string(value: Loose, field: &str) -> Result<Option<String>, RecordError> {
    match value {
        Loose::Null => Ok(None),
        Loose::Str(s) => Ok(Some(s)),
        _ => Err(RecordError::new(field, "must be a string")),
    }
}

fn opt_parsed<T: FromStr<Err = String>>(
    value: Loose,
    field: &str,
) -> Result<Option<T>, RecordError> {
    opt_string(value, field)?
        .map(|s| s.parse().map_err(|e| RecordError::new(field, e)))
        .transpose()
}

fn opt_date(value: Loose, field: &str) -> Result<Option<NaiveDate>, RecordError> {
    opt_string(value, field)?
        .map(|s| {
            NaiveDate::parse_from_str(&s, "%Y-%m-%d")
                .map_err(|_| RecordError::new(field, format!("{s:?} is not a YYYY-MM-DD date")))
        })
        .transpose()
}

/// Decimals travel as strings and are parsed exactly, then normalised.
fn opt_decimal(value: Loose, field: &str) -> Result<Option<Decimal>, RecordError> {
    match value {
        Loose::Null => Ok(None),
        Loose::Str(s) => parse_decimal(&s)
            .map(Some)
            .map_err(|reason| RecordError::new(field, reason)),
        Loose::Number(_) => Err(RecordError::new(
            field,
            "must be a decimal string, not a JSON number (precision)",
        )),
        Loose::Other => Err(RecordError::new(field, "must be a decimal string")),
    }
}

/// Parses a decimal string exactly ("12345678901234.123456789", "-0.0001"); no exponents,
/// no rounding: a value with more digits than fit is refused, never rounded.
pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
    let t = s.trim();
    if t.is_empty() || t.contains(['e', 'E', '_']) || t != s {
        return Err(format!("{s:?} is not a plain decimal number"));
    }
    let d =
        Decimal::from_str_exact(t).map_err(|e| format!("{s:?} is not an exact decimal: {e}"))?;
    Ok(d.normalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> Value {
        json!({
            "product_code": "WM-001", "product_name": "稳健理财1号", "category": "fixed_income",
            "risk_level": "R2", "currency": "CNY", "issuer": "示例银行", "status": "on_sale",
            "nav": "1.0234500", "expected_yield": "0.0385", "min_investment": "10000.00",
            "term_days": 180, "sale_start": "2026-01-01", "sale_end": "2026-12-31",
            "keywords": ["稳健", "fixed"], "attributes": {"channel": "app"},
            "version": 3, "updated_at": "2026-11-01T08:00:00Z", "custodian": "某托管行"
        })
    }

    #[test]
    fn parses_a_full_record_exactly() {
        let p = Product::from_json(&record()).unwrap();
        assert_eq!(p.identity(), Identity::Code("WM-001".into()));
        assert_eq!(p.content.nav.unwrap().to_string(), "1.02345");
        assert_eq!(p.content.min_investment.unwrap().to_string(), "10000");
        assert_eq!(
            p.content.attributes["custodian"],
            json!("某托管行"),
            "unknown fields kept"
        );
        assert_eq!(p.version, 3);
        // Round trip through the canonical form.
        assert_eq!(Product::from_json(&p.to_json()).unwrap(), p);
    }

    /// Fuzz finding (tests/fuzz/regressions/product_page/): a large number in an unknown field
    /// read back as a neighbouring f64 after a trip through text, so the stored product and the
    /// event differed from the record. serde_json's `float_roundtrip` parses exactly.
    #[test]
    fn attribute_number_changes_on_round_trip() {
        let text = r#"{"product_name":"a","version":1,"extra":18555555555555055555550}"#;
        let p = Product::from_json(&serde_json::from_str(text).unwrap()).unwrap();
        let again = serde_json::to_string(&p.to_json()).unwrap();
        let back = Product::from_json(&serde_json::from_str(&again).unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.content.hash(), p.content.hash());
    }

    #[test]
    fn large_and_small_decimals_survive() {
        for s in ["12345678901234.123456789", "0.1", "-0.0001", "0"] {
            let d = parse_decimal(s).unwrap();
            assert_eq!(d.to_string(), s);
        }
        assert!(parse_decimal("1e5").is_err());
        assert!(parse_decimal(" 1").is_err());
        assert!(parse_decimal("abc").is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("nav", json!(1.5)),
            ("risk_level", json!("R9")),
            ("status", json!("gone")),
            ("currency", json!("yuan")),
            ("sale_end", json!("31/12/2026")),
            ("keywords", json!([1, 2])),
            ("term_days", json!(-1)),
            ("version", json!("3")),
            ("product_code", json!("x".repeat(65))),
        ];
        for (field, bad) in cases {
            let mut r = record();
            r[field] = bad;
            let err = Product::from_json(&r).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        let mut r = record();
        r.as_object_mut().unwrap().remove("version");
        assert_eq!(Product::from_json(&r).unwrap_err().field, "version");
    }

    #[test]
    fn name_only_records_are_identified_by_name() {
        let mut r = record();
        r.as_object_mut().unwrap().remove("product_code");
        let p = Product::from_json(&r).unwrap();
        assert_eq!(p.identity(), Identity::Name("稳健理财1号".into()));
        assert_eq!(p.identity().key(), "name:稳健理财1号");
        r["product_name"] = json!("");
        assert_eq!(Product::from_json(&r).unwrap_err().field, "product_code");
    }

    #[test]
    fn the_streamed_hash_is_the_hash_of_the_canonical_map() {
        let p = Product::from_json(&record()).unwrap();
        let bytes = serde_json::to_vec(&p.content.to_json_map()).unwrap();
        let expected: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(p.content.hash(), expected);
    }

    /// The typed form writes the same bytes as the JSON tree it replaces, for a full record,
    /// a name-only one with no optional field, and one whose attributes are empty (the
    /// created changes: in the diff module's tests).
    #[test]
    fn the_typed_form_writes_the_bytes_of_the_json_tree() {
        let full = Product::from_json(&record()).unwrap();
        let bare = Product::from_json(&json!({"product_name": "n", "version": 0})).unwrap();
        let mut plain = record();
        plain.as_object_mut().unwrap().remove("custodian");
        plain["attributes"] = json!({});
        plain["keywords"] = json!([]);
        plain["updated_at"] = json!("2026-11-01T08:00:00.123456+08:00");
        let plain = Product::from_json(&plain).unwrap();
        for p in [full, bare, plain] {
            assert_eq!(
                serde_json::to_string(&ProductJson(&p)).unwrap(),
                serde_json::to_string(&p.to_json()).unwrap()
            );
        }
    }

    #[test]
    fn equal_values_hash_equal() {
        let a = Product::from_json(&record()).unwrap();
        let mut r = record();
        r["nav"] = json!("1.02345");
        let b = Product::from_json(&r).unwrap();
        assert_eq!(a.content, b.content);
        assert_eq!(a.content.hash(), b.content.hash());
        r["nav"] = json!("1.02346");
        assert_ne!(
            a.content.hash(),
            Product::from_json(&r).unwrap().content.hash()
        );
    }
}
