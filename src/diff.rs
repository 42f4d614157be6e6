//! Field-level diff between a product's stored and incoming content: a pure function, the
//! `changes` list of a change event.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::product::Content;

/// One changed field: its contract name (`attributes.<key>` for attributes) and both values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FieldChange {
    pub field: String,
    pub old: Value,
    pub new: Value,
}

/// The fields that differ, in contract order; attributes compared key by key (sorted).
/// Empty exactly when `old == new`.
pub fn diff(old: &Content, new: &Content) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    for ((field, old_value), (_, new_value)) in
        old.field_values().into_iter().zip(new.field_values())
    {
        if field == "attributes" {
            diff_attributes(old, new, &mut changes);
        } else if old_value != new_value {
            changes.push(FieldChange {
                field: field.to_owned(),
                old: old_value,
                new: new_value,
            });
        }
    }
    changes
}

/// The changes of a newly created product: every field that has a value, from `null`
/// (attributes key by key; an empty keyword list counts as no value).
pub fn created(new: &Content) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    for (field, value) in new.field_values() {
        match value {
            Value::Null => {}
            Value::Array(ref a) if a.is_empty() => {}
            Value::Object(map) if field == "attributes" => {
                changes.extend(map.into_iter().map(|(key, v)| FieldChange {
                    field: format!("attributes.{key}"),
                    old: Value::Null,
                    new: v,
                }));
            }
            v => changes.push(FieldChange {
                field: field.to_owned(),
                old: Value::Null,
                new: v,
            }),
        }
    }
    changes
}

fn diff_attributes(old: &Content, new: &Content, out: &mut Vec<FieldChange>) {
    let mut keys: Vec<&String> = old.attributes.keys().chain(new.attributes.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let before = old.attributes.get(key);
        let after = new.attributes.get(key);
        if before != after {
            out.push(FieldChange {
                field: format!("attributes.{key}"),
                old: before.cloned().unwrap_or(Value::Null),
                new: after.cloned().unwrap_or(Value::Null),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::product::{ProductStatus, RiskLevel};
    use proptest::prelude::*;
    use rust_decimal::Decimal;
    use serde_json::json;

    fn base() -> Content {
        Content {
            product_code: Some("WM-1".into()),
            product_name: "稳健1号".into(),
            category: Some("bond".into()),
            risk_level: Some(RiskLevel::R2),
            currency: Some("CNY".into()),
            issuer: None,
            status: Some(ProductStatus::OnSale),
            nav: Some(Decimal::new(10234, 4)),
            expected_yield: None,
            min_investment: None,
            term_days: Some(90),
            sale_start: None,
            sale_end: None,
            keywords: vec!["稳健".into()],
            attributes: [("a".to_owned(), json!(1)), ("b".to_owned(), json!("x"))]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn reports_exactly_the_changed_fields() {
        let old = base();
        let mut new = base();
        new.nav = Some(Decimal::new(10300, 4).normalize());
        new.status = Some(ProductStatus::Suspended);
        new.attributes.remove("a");
        new.attributes.insert("c".into(), json!({"k": [1]}));
        let changes = diff(&old, &new);
        let fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["status", "nav", "attributes.a", "attributes.c"]);
        assert_eq!(changes[1].old, json!("1.0234"));
        assert_eq!(changes[1].new, json!("1.03"));
        assert_eq!(changes[2].new, Value::Null);
    }

    #[test]
    fn created_lists_every_present_field_from_null() {
        let changes = created(&base());
        assert!(changes.iter().all(|c| c.old.is_null()));
        assert!(
            changes
                .iter()
                .any(|c| c.field == "product_name" && c.new == json!("稳健1号"))
        );
        assert!(!changes.iter().any(|c| c.field == "issuer"));
    }

    fn content() -> impl Strategy<Value = Content> {
        (
            proptest::option::of("[A-Z]{1,3}-[0-9]{1,3}"),
            "[a-z理财]{1,6}",
            proptest::option::of(0u8..5),
            proptest::option::of(-100_000i64..100_000),
            proptest::option::of(0i32..400),
            proptest::collection::vec("[a-z]{1,3}", 0..3),
            proptest::collection::btree_map("[a-c]", 0i64..3, 0..3),
        )
            .prop_map(|(code, name, risk, nav, term, keywords, attrs)| Content {
                product_code: code,
                product_name: name,
                category: None,
                risk_level: risk.map(|r| RiskLevel::ALL[r as usize]),
                currency: None,
                issuer: None,
                status: None,
                nav: nav.map(|n| Decimal::new(n, 4).normalize()),
                expected_yield: None,
                min_investment: None,
                term_days: term,
                sale_start: None,
                sale_end: None,
                keywords,
                attributes: attrs.into_iter().map(|(k, v)| (k, json!(v))).collect(),
            })
    }

    proptest! {
        #[test]
        fn diff_is_empty_iff_equal(a in content(), b in content()) {
            prop_assert_eq!(diff(&a, &b).is_empty(), a == b);
            prop_assert!(diff(&a, &a).is_empty());
        }

        #[test]
        fn equal_hash_iff_equal(a in content(), b in content()) {
            prop_assert_eq!(a.hash() == b.hash(), a == b);
        }

        /// The fold writes a created product's changes straight from its content: the same
        /// bytes as this module's list.
        #[test]
        fn typed_created_changes_are_the_bytes_of_the_list(a in content()) {
            prop_assert_eq!(
                serde_json::to_string(&crate::product::CreatedChanges(&a)).unwrap(),
                serde_json::to_string(&created(&a)).unwrap()
            );
        }
    }
}
