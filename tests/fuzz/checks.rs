//! What the fuzz targets assert about the two decoders that read other systems' bytes — the
//! command decoder (Kafka) and the product-page decoder (management system) — shared by the
//! `cargo fuzz` targets and by the integration test that replays the kept corpus and the
//! regression inputs on every CI run.
//!
//! Beyond "never panics": whatever a decoder accepts must survive its own round trip.

#![allow(dead_code)] // each fuzz target uses one of the checks

use product_sync::command::{Command, valid_traceparent};
use product_sync::diff;
use product_sync::product::{CreatedChanges, ProductJson};
use product_sync::upstream::products::parse_page;

/// The management system the fuzzed commands are checked against.
pub const SYSTEM: &str = "wealth";

/// Command bytes: an error is a value (never a panic); an accepted command re-encodes to a
/// command that decodes to itself; a traceparent header is accepted only in its one form.
pub fn command(data: &[u8]) {
    match Command::parse(Some(data), SYSTEM) {
        Ok(command) => {
            let wire = serde_json::to_vec(&command.to_wire()).expect("a command serializes");
            let again = Command::parse(Some(&wire), SYSTEM).expect("a re-encoded command parses");
            assert_eq!(again, command, "round trip changed the command");
        }
        Err(error) => {
            // Every rejection has a kind (the DLQ header) and a reason (the result event).
            assert!(!error.kind().is_empty());
            assert!(!error.to_string().is_empty());
        }
    }
    if let Some(tp) = valid_traceparent(data) {
        assert_eq!(tp.len(), 55, "traceparent {tp:?}");
        let text = std::str::from_utf8(data).expect("an accepted traceparent is UTF-8");
        assert_eq!(
            tp,
            text.trim(),
            "a traceparent is passed on as sent, trimmed"
        );
    }
}

/// Page bytes: an error is a value; every accepted record re-encodes (canonical JSON) to a
/// record that decodes to itself with the same hash, and differs from itself in no field.
pub fn product_page(data: &[u8]) {
    let Ok(page) = parse_page(data, 1, "fuzzed page") else {
        return;
    };
    for product in &page.items {
        let (json, hash) = product.to_json_and_hash();
        assert_eq!(hash, product.content.hash(), "two hashes of one content");
        let again = product_sync::product::Product::from_json(&json)
            .unwrap_or_else(|e| panic!("canonical form of an accepted record rejected: {e}"));
        assert_eq!(&again, product, "round trip changed the record");
        assert_eq!(again.content.hash(), hash, "round trip changed the hash");
        assert!(diff::diff(&product.content, &again.content).is_empty());
        // The forms the fold writes events with are the same bytes as the JSON trees.
        let typed = serde_json::to_string(&ProductJson(product)).expect("a product serializes");
        assert_eq!(typed, json.to_string(), "typed product form differs");
        let created =
            serde_json::to_string(&CreatedChanges(&product.content)).expect("changes serialize");
        let tree =
            serde_json::to_string(&diff::created(&product.content)).expect("changes serialize");
        assert_eq!(created, tree, "typed created changes differ");
    }
    // The whole page, re-encoded, decodes to the same page.
    let items: Vec<_> = page.items.iter().map(|p| p.to_json()).collect();
    let body = serde_json::json!({ "items": items, "next_cursor": page.next_cursor });
    let bytes = serde_json::to_vec(&body).expect("a page serializes");
    let again = parse_page(&bytes, 1, "re-encoded page").expect("a re-encoded page parses");
    assert_eq!(again.items, page.items);
    assert_eq!(again.next_cursor, page.next_cursor);
}
