//! One product record read loosely, straight from a page's bytes (or from a `Value`): each
//! field's JSON value kept only as far as the contract's checks look at it, without building a
//! JSON tree of the record. [`super::Product::from_raw`] applies the checks; a record of any
//! shape reads, so every contract error is the parser's, naming the field.
//!
//! Duplicate keys keep their last value, as `serde_json::Value` does.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

/// The fields the contract names whose values are scalars, in the order the parser checks
/// them; `keywords` and `attributes` are read on their own.
pub(super) const SCALARS: [&str; 15] = [
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
    "version",
    "updated_at",
];

/// A scalar field's JSON value, as far as the checks look at it.
#[derive(Debug, Default, Clone)]
pub(super) enum Loose {
    /// Absent, or `null`.
    #[default]
    Null,
    Str(String),
    Number(Number),
    /// A boolean, an array or an object: no scalar field takes one.
    Other,
}

impl Loose {
    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Loose::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// `keywords`: absent or `null`, a list of strings, or anything else.
#[derive(Debug, Default)]
pub(super) enum Keywords {
    #[default]
    Null,
    Strings(Vec<String>),
    Wrong,
}

/// `attributes`: absent or `null`, an object, or anything else.
#[derive(Debug, Default)]
pub(super) enum Attributes {
    #[default]
    Null,
    Object(BTreeMap<String, Value>),
    Wrong,
}

/// One record as read; `None` from [`Item`] when the record is not a JSON object.
#[derive(Debug, Default)]
pub struct RawRecord {
    pub(super) scalars: [Loose; 15],
    pub(super) keywords: Keywords,
    pub(super) attributes: Attributes,
    /// Fields the contract does not name (they join `attributes`).
    pub(super) extra: BTreeMap<String, Value>,
}

impl RawRecord {
    /// The product code and name as sent, when they are strings (to name the record in an
    /// error).
    pub fn code_and_name(&self) -> (Option<&str>, Option<&str>) {
        (self.scalars[0].as_str(), self.scalars[1].as_str())
    }
}

/// A record of a page: a [`RawRecord`], or `None` when the item is not a JSON object.
#[derive(Debug)]
pub struct Item(pub Option<RawRecord>);

/// A products page as read: `None` parts were absent or of another type.
#[derive(Debug, Default)]
pub struct RawPage {
    /// `false` when the body is not a JSON object.
    pub object: bool,
    /// `None` when `items` is absent or not an array.
    pub items: Option<Vec<Item>>,
    /// `next_cursor` as sent.
    pub(super) next_cursor: Loose,
}

impl RawPage {
    /// `next_cursor`: `Ok(None)` when absent, `null` or empty; `Err` (why) when not a string.
    pub fn next_cursor(&mut self) -> Result<Option<String>, &'static str> {
        match std::mem::take(&mut self.next_cursor) {
            Loose::Null => Ok(None),
            Loose::Str(s) if s.is_empty() => Ok(None),
            Loose::Str(s) => Ok(Some(s)),
            _ => Err("`next_cursor` is neither a string nor null"),
        }
    }
}

/// Consumes whatever value comes: the answer when a field has the wrong type.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A visitor that answers `other` for booleans, arrays and objects it does not take, and
/// leaves everything else to `$body`.
macro_rules! answers_other {
    ($other:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
}

struct LooseVisitor;

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = Loose;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Loose, E> {
        Ok(Loose::Null)
    }
    fn visit_none<E>(self) -> Result<Loose, E> {
        Ok(Loose::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Loose, E> {
        Ok(Loose::Other)
    }
    fn visit_i64<E>(self, v: i64) -> Result<Loose, E> {
        Ok(Loose::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Loose, E> {
        Ok(Loose::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Loose, E> {
        Ok(Number::from_f64(v).map_or(Loose::Null, Loose::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Loose, E> {
        Ok(Loose::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Loose, E> {
        Ok(Loose::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Loose, A::Error> {
        skip_seq(seq).map(|()| Loose::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Loose, A::Error> {
        skip_map(map).map(|()| Loose::Other)
    }
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseVisitor)
    }
}

struct KeywordsVisitor;

impl<'de> Visitor<'de> for KeywordsVisitor {
    type Value = Keywords;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    answers_other!(Keywords::Wrong);
    fn visit_unit<E>(self) -> Result<Keywords, E> {
        Ok(Keywords::Null)
    }
    fn visit_none<E>(self) -> Result<Keywords, E> {
        Ok(Keywords::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Keywords, A::Error> {
        let mut strings = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        let mut wrong = false;
        while let Some(item) = seq.next_element::<Loose>()? {
            match item {
                Loose::Str(s) if !wrong => strings.push(s),
                _ => wrong = true,
            }
        }
        Ok(if wrong {
            Keywords::Wrong
        } else {
            Keywords::Strings(strings)
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Keywords, A::Error> {
        skip_map(map).map(|()| Keywords::Wrong)
    }
}

impl<'de> Deserialize<'de> for Keywords {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KeywordsVisitor)
    }
}

struct AttributesVisitor;

impl<'de> Visitor<'de> for AttributesVisitor {
    type Value = Attributes;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    answers_other!(Attributes::Wrong);
    fn visit_unit<E>(self) -> Result<Attributes, E> {
        Ok(Attributes::Null)
    }
    fn visit_none<E>(self) -> Result<Attributes, E> {
        Ok(Attributes::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Attributes, A::Error> {
        skip_seq(seq).map(|()| Attributes::Wrong)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Attributes, A::Error> {
        let mut out = BTreeMap::new();
        while let Some((key, value)) = map.next_entry::<String, Value>()? {
            out.insert(key, value);
        }
        Ok(Attributes::Object(out))
    }
}

impl<'de> Deserialize<'de> for Attributes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AttributesVisitor)
    }
}

/// A record's key: one of the contract's fields, or another.
enum Key {
    Scalar(usize),
    Keywords,
    Attributes,
    Other(String),
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E>(self, v: &str) -> Result<Key, E> {
        Ok(match v {
            "keywords" => Key::Keywords,
            "attributes" => Key::Attributes,
            _ => match SCALARS.iter().position(|f| *f == v) {
                Some(i) => Key::Scalar(i),
                None => Key::Other(v.to_owned()),
            },
        })
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    answers_other!(Item(None));
    fn visit_unit<E>(self) -> Result<Item, E> {
        Ok(Item(None))
    }
    fn visit_none<E>(self) -> Result<Item, E> {
        Ok(Item(None))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Item, A::Error> {
        skip_seq(seq).map(|()| Item(None))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
        let mut record = RawRecord::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Scalar(i) => record.scalars[i] = map.next_value()?,
                Key::Keywords => record.keywords = map.next_value()?,
                Key::Attributes => record.attributes = map.next_value()?,
                Key::Other(name) => {
                    let value: Value = map.next_value()?;
                    record.extra.insert(name, value);
                }
            }
        }
        Ok(Item(Some(record)))
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemVisitor)
    }
}

/// `items`: an array of records, or `None`.
struct Items(Option<Vec<Item>>);

struct ItemsVisitor;

impl<'de> Visitor<'de> for ItemsVisitor {
    type Value = Items;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    answers_other!(Items(None));
    fn visit_unit<E>(self) -> Result<Items, E> {
        Ok(Items(None))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(10_000));
        while let Some(item) = seq.next_element::<Item>()? {
            items.push(item);
        }
        Ok(Items(Some(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Items, A::Error> {
        skip_map(map).map(|()| Items(None))
    }
}

impl<'de> Deserialize<'de> for Items {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemsVisitor)
    }
}

struct PageVisitor;

impl<'de> Visitor<'de> for PageVisitor {
    type Value = RawPage;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    answers_other!(RawPage::default());
    fn visit_unit<E>(self) -> Result<RawPage, E> {
        Ok(RawPage::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<RawPage, A::Error> {
        skip_seq(seq).map(|()| RawPage::default())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawPage, A::Error> {
        let mut page = RawPage {
            object: true,
            ..RawPage::default()
        };
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Other(name) if name == "items" => page.items = map.next_value::<Items>()?.0,
                Key::Other(name) if name == "next_cursor" => page.next_cursor = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(page)
    }
}

impl<'de> Deserialize<'de> for RawPage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PageVisitor)
    }
}
