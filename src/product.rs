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
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

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
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
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
        let obj = value
            .as_object()
            .ok_or_else(|| RecordError::new("(record)", "is not a JSON object"))?;
        let content = Content {
            product_code: opt_string(obj, "product_code")?,
            product_name: opt_string(obj, "product_name")?.unwrap_or_default(),
            category: opt_string(obj, "category")?,
            risk_level: opt_parsed(obj, "risk_level")?,
            currency: opt_string(obj, "currency")?,
            issuer: opt_string(obj, "issuer")?,
            status: opt_parsed(obj, "status")?,
            nav: opt_decimal(obj, "nav")?,
            expected_yield: opt_decimal(obj, "expected_yield")?,
            min_investment: opt_decimal(obj, "min_investment")?,
            term_days: term_days(obj)?,
            sale_start: opt_date(obj, "sale_start")?,
            sale_end: opt_date(obj, "sale_end")?,
            keywords: keywords(obj)?,
            attributes: attributes(obj)?,
        };
        content.validate()?;
        Ok(Product {
            content,
            version: version(obj)?,
            updated_at: updated_at(obj)?,
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
        let c = self.0;
        let decimal = |d: &Option<Decimal>| d.map(|d| d.to_string());
        let date = |d: &Option<NaiveDate>| d.map(|d| d.to_string());
        // Keys in sorted order, as serde_json's ordered map would write them.
        let mut m = serializer.serialize_map(Some(CONTENT_FIELDS.len()))?;
        m.serialize_entry("attributes", &c.attributes)?;
        m.serialize_entry("category", &c.category)?;
        m.serialize_entry("currency", &c.currency)?;
        m.serialize_entry("expected_yield", &decimal(&c.expected_yield))?;
        m.serialize_entry("issuer", &c.issuer)?;
        m.serialize_entry("keywords", &c.keywords)?;
        m.serialize_entry("min_investment", &decimal(&c.min_investment))?;
        m.serialize_entry("nav", &decimal(&c.nav))?;
        m.serialize_entry("product_code", &c.product_code)?;
        m.serialize_entry("product_name", &c.product_name)?;
        m.serialize_entry("risk_level", &c.risk_level.map(RiskLevel::as_str))?;
        m.serialize_entry("sale_end", &date(&c.sale_end))?;
        m.serialize_entry("sale_start", &date(&c.sale_start))?;
        m.serialize_entry("status", &c.status.map(ProductStatus::as_str))?;
        m.serialize_entry("term_days", &c.term_days)?;
        m.end()
    }
}

/// `attributes`, with every field the contract does not name folded in (an unknown field
/// that contradicts an attribute of the same name is refused).
fn attributes(obj: &Map<String, Value>) -> Result<BTreeMap<String, Value>, RecordError> {
    let mut attributes: BTreeMap<String, Value> = match obj.get("attributes") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m.clone().into_iter().collect(),
        Some(_) => return Err(RecordError::new("attributes", "must be an object")),
    };
    let known =
        |key: &str| CONTENT_FIELDS.contains(&key) || key == "version" || key == "updated_at";
    for (key, value) in obj.iter().filter(|(k, _)| !known(k)) {
        match attributes.get(key) {
            Some(existing) if existing != value => {
                return Err(RecordError::new(
                    key.clone(),
                    "unknown field also present in attributes with another value",
                ));
            }
            _ => {
                attributes.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(attributes)
}

fn term_days(obj: &Map<String, Value>) -> Result<Option<i32>, RecordError> {
    match obj.get("term_days") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|v| i32::try_from(v).ok())
            .filter(|v| *v >= 0)
            .map(Some)
            .ok_or_else(|| RecordError::new("term_days", "must be a non-negative whole number")),
        Some(_) => Err(RecordError::new("term_days", "must be a number")),
    }
}

fn keywords(obj: &Map<String, Value>) -> Result<Vec<String>, RecordError> {
    let not_strings = || RecordError::new("keywords", "must be an array of strings");
    match obj.get("keywords") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|k| k.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(not_strings),
        Some(_) => Err(not_strings()),
    }
}

fn version(obj: &Map<String, Value>) -> Result<i64, RecordError> {
    match obj.get("version") {
        Some(Value::Number(n)) => n
            .as_i64()
            .filter(|v| *v >= 0)
            .ok_or_else(|| RecordError::new("version", "must be a non-negative integer")),
        None | Some(Value::Null) => Err(RecordError::new("version", "is required")),
        Some(_) => Err(RecordError::new("version", "must be an integer")),
    }
}

/// Stores keep microseconds (PostgreSQL timestamptz): finer digits are dropped here, so what
/// is stored is exactly what was parsed.
fn updated_at(obj: &Map<String, Value>) -> Result<Option<DateTime<Utc>>, RecordError> {
    opt_string(obj, "updated_at")?
        .map(|s| {
            DateTime::parse_from_rfc3339(&s)
                .map(|d| d.with_timezone(&Utc).trunc_subsecs(6))
                .map_err(|e| RecordError::new("updated_at", format!("{s:?} is not RFC 3339: {e}")))
        })
        .transpose()
}

fn opt_string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, RecordError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RecordError::new(field, "must be a string")),
    }
}

fn opt_parsed<T: FromStr<Err = String>>(
    obj: &Map<String, Value>,
    field: &str,
) -> Result<Option<T>, RecordError> {
    opt_string(obj, field)?
        .map(|s| s.parse().map_err(|e| RecordError::new(field, e)))
        .transpose()
}

fn opt_date(obj: &Map<String, Value>, field: &str) -> Result<Option<NaiveDate>, RecordError> {
    opt_string(obj, field)?
        .map(|s| {
            NaiveDate::parse_from_str(&s, "%Y-%m-%d")
                .map_err(|_| RecordError::new(field, format!("{s:?} is not a YYYY-MM-DD date")))
        })
        .transpose()
}

/// Decimals travel as strings and are parsed exactly, then normalised.
fn opt_decimal(obj: &Map<String, Value>, field: &str) -> Result<Option<Decimal>, RecordError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_decimal(s)
            .map(Some)
            .map_err(|reason| RecordError::new(field, reason)),
        Some(Value::Number(_)) => Err(RecordError::new(
            field,
            "must be a decimal string, not a JSON number (precision)",
        )),
        Some(_) => Err(RecordError::new(field, "must be a decimal string")),
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
