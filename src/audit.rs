//! The change topic, audited (the tests and the chaos run share it): per product key, in
//! offset order, revisions start at 1 and grow by exactly one; a revision seen again must be an
//! identical re-publication (same `ce_id`, same content but `changed_at`) — counted, allowed;
//! each event follows on the one before it: revision 1 is `created`; later ones are `updated`
//! (non-empty `changes`), `delisted` (`after` null) or — only after a delisting — `relisted`,
//! each with a `before` equal to the product's last state (the previous event's `after`, or
//! for `relisted` the state at delisting), unless either was published in the reduced form,
//! which carries neither.

use std::collections::{BTreeMap, HashMap};

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use serde_json::Value;

use crate::kafka::header_text;
use crate::wire::headers::CE_ID;

/// Problems described in full, at most this many (the counts go on).
const PROBLEMS_KEPT: usize = 20;

/// What the audit found.
#[derive(Debug, Default)]
pub struct Audit {
    /// Per product key: the last revision in order and its `after` (null once delisted).
    pub last: BTreeMap<String, (i64, Value)>,
    /// Identical re-publications (at-least-once delivery): allowed.
    pub repeats: usize,
    /// A revision published again under another id or with other content.
    pub doubled: usize,
    /// Events out of order: after a higher revision of their product, past a missing one, or
    /// not following on the event before (`before` ≠ previous `after`, an update without
    /// changes, a `created` after revision 1).
    pub out_of_order: usize,
    /// The first problems, described.
    pub problems: Vec<String>,
}

/// The last event of a key, as the next one must follow on it.
struct Previous {
    revision: i64,
    /// The product's last state: the previous `after`, or the state it was delisted in.
    state: Value,
    delisted: bool,
    reduced: bool,
}

impl Audit {
    /// Audits the records of a change topic (any order across partitions; a product's events
    /// are all in its key's partition, read here in offset order).
    pub fn of(events: &[OwnedMessage]) -> Audit {
        let mut ordered: Vec<&OwnedMessage> = events.iter().collect();
        ordered.sort_by_key(|m| (m.partition(), m.offset()));
        let mut audit = Audit::default();
        let mut previous: HashMap<String, Previous> = HashMap::new();
        let mut seen: HashMap<(String, i64), (String, Value)> = HashMap::new();
        for m in ordered {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let event: Value =
                serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null);
            let revision = event["revision"].as_i64().unwrap_or(-1);
            let ce_id = header_text(m, CE_ID).unwrap_or_default();
            let mut body = event.clone();
            if let Some(o) = body.as_object_mut() {
                o.remove("changed_at");
            }
            if let Some((id, earlier)) = seen.get(&(key.clone(), revision)) {
                if *id == ce_id && *earlier == body {
                    audit.repeats += 1;
                } else {
                    audit.doubled += 1;
                    audit.problem(format!("{key} r{revision}: published again, differently"));
                }
                continue;
            }
            let before = previous.get(&key);
            let expected = before.map_or(1, |p| p.revision + 1);
            if revision != expected {
                audit.out_of_order += 1;
                audit.problem(format!(
                    "{key} r{revision} at {}@{}: expected r{expected}",
                    m.partition(),
                    m.offset()
                ));
            } else if let Some(why) = not_following(&event, before) {
                audit.out_of_order += 1;
                audit.problem(format!("{key} r{revision}: {why}"));
            }
            let reduced = event.get("reduced").and_then(Value::as_bool) == Some(true);
            let latest = before.is_none_or(|p| revision > p.revision);
            seen.insert((key.clone(), revision), (ce_id, body));
            if latest {
                audit
                    .last
                    .insert(key.clone(), (revision, event["after"].clone()));
                let delisted = event["op"] == "delisted";
                let state = if delisted {
                    event["before"].clone()
                } else {
                    event["after"].clone()
                };
                previous.insert(
                    key,
                    Previous {
                        revision,
                        state,
                        delisted,
                        reduced,
                    },
                );
            }
        }
        audit
    }

    /// No event doubled or out of order.
    pub fn is_clean(&self) -> bool {
        self.doubled + self.out_of_order == 0
    }

    /// Products whose last published revision is not the stored one (or that have events and
    /// are not delisted but are not stored, or are stored without events).
    pub fn gaps<'a>(&self, stored: impl IntoIterator<Item = (String, i64)> + 'a) -> usize {
        let stored: BTreeMap<String, i64> = stored.into_iter().collect();
        let unpublished = stored
            .iter()
            .filter(|(key, revision)| self.last.get(*key).map(|(r, _)| r) != Some(*revision))
            .count();
        let unknown = self
            .last
            .iter()
            .filter(|(k, (_, after))| !after.is_null() && !stored.contains_key(*k))
            .count();
        unpublished + unknown
    }

    fn problem(&mut self, what: String) {
        if self.problems.len() < PROBLEMS_KEPT {
            self.problems.push(what);
        }
    }
}

/// Why an event in revision order does not follow on the one before it, if it does not.
fn not_following(event: &Value, previous: Option<&Previous>) -> Option<String> {
    let op = event["op"].as_str().unwrap_or_default();
    let reduced = event.get("reduced").and_then(Value::as_bool) == Some(true);
    match previous {
        None if op != "created" => Some(format!("revision 1 is {op:?}, not \"created\"")),
        None => None,
        Some(p) => match (op, p.delisted) {
            ("updated" | "delisted", true) => Some(format!("{op:?} of a delisted product")),
            ("relisted", false) => Some("\"relisted\" of a listed product".to_owned()),
            ("updated" | "delisted" | "relisted", _) if reduced => None,
            ("updated", _) if event["changes"].as_array().is_none_or(Vec::is_empty) => {
                Some("an update without changes".to_owned())
            }
            ("delisted", _) if !event["after"].is_null() => {
                Some("a delisting with an `after`".to_owned())
            }
            ("updated" | "delisted" | "relisted", _)
                if !p.reduced && event["before"] != p.state =>
            {
                Some("`before` is not the product's last state".to_owned())
            }
            ("updated" | "delisted" | "relisted", _) => None,
            _ => Some(format!("{op:?} after revision 1")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;
    use rdkafka::message::{Header, OwnedHeaders};
    use serde_json::json;

    fn event(
        offset: i64,
        key: &str,
        revision: i64,
        op: &str,
        before: Value,
        after: Value,
    ) -> OwnedMessage {
        let changes = if op == "updated" && before == after {
            json!([])
        } else {
            json!([{"field": "nav"}])
        };
        let payload = json!({"op": op, "revision": revision, "before": before, "after": after,
            "changes": changes, "changed_at": format!("t{offset}")});
        let headers = OwnedHeaders::new().insert(Header {
            key: CE_ID,
            value: Some(&format!("wms:{key}:{revision}")),
        });
        OwnedMessage::new(
            Some(payload.to_string().into_bytes()),
            Some(key.as_bytes().to_vec()),
            "changes".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            Some(headers),
        )
    }

    fn v(n: i64) -> Value {
        json!({"nav": n})
    }

    #[test]
    fn a_clean_log_with_a_repeat_passes() {
        let log = [
            event(0, "a", 1, "created", Value::Null, v(1)),
            event(1, "a", 2, "updated", v(1), v(2)),
            event(2, "a", 2, "updated", v(1), v(2)),
            event(3, "a", 3, "updated", v(2), v(3)),
        ];
        let audit = Audit::of(&log);
        assert!(audit.is_clean(), "{:?}", audit.problems);
        assert_eq!(audit.repeats, 1);
        assert_eq!(audit.gaps([("a".to_owned(), 3)]), 0);
        assert_eq!(audit.gaps([("a".to_owned(), 4)]), 1);
    }

    #[test]
    fn a_delisting_and_a_relisting_follow_on_the_last_state() {
        let log = [
            event(0, "a", 1, "created", Value::Null, v(1)),
            event(1, "a", 2, "delisted", v(1), Value::Null),
            event(2, "a", 3, "relisted", v(1), v(2)),
            event(3, "a", 4, "updated", v(2), v(3)),
        ];
        let audit = Audit::of(&log);
        assert!(audit.is_clean(), "{:?}", audit.problems);
        assert_eq!(audit.gaps([("a".to_owned(), 4)]), 0);
        // Delisted last: not stored, and no gap for it.
        assert_eq!(Audit::of(&log[..2]).gaps([]), 0);
        let broken = [
            // relisted while listed; updated while delisted; delisted from another state
            vec![
                event(0, "a", 1, "created", Value::Null, v(1)),
                event(1, "a", 2, "relisted", v(1), v(2)),
            ],
            vec![
                event(0, "a", 1, "created", Value::Null, v(1)),
                event(1, "a", 2, "delisted", v(1), Value::Null),
                event(2, "a", 3, "updated", v(1), v(2)),
            ],
            vec![
                event(0, "a", 1, "created", Value::Null, v(1)),
                event(1, "a", 2, "delisted", v(7), Value::Null),
            ],
            vec![
                event(0, "a", 1, "created", Value::Null, v(1)),
                event(1, "a", 2, "delisted", v(1), Value::Null),
                event(2, "a", 3, "relisted", v(5), v(2)),
            ],
        ];
        for log in broken {
            assert_eq!(Audit::of(&log).out_of_order, 1, "{log:?}");
        }
    }

    #[test]
    fn revisions_swapped_a_broken_chain_and_an_empty_update_are_out_of_order() {
        let swapped = [
            event(0, "a", 1, "created", Value::Null, v(1)),
            event(1, "a", 3, "updated", v(2), v(3)),
            event(2, "a", 2, "updated", v(1), v(2)),
        ];
        assert_eq!(Audit::of(&swapped).out_of_order, 2);
        let broken = [
            event(0, "a", 1, "created", Value::Null, v(1)),
            event(1, "a", 2, "updated", v(7), v(2)),
        ];
        assert_eq!(Audit::of(&broken).out_of_order, 1);
        let empty = [
            event(0, "a", 1, "created", Value::Null, v(1)),
            event(1, "a", 2, "updated", v(1), v(1)),
        ];
        assert_eq!(Audit::of(&empty).out_of_order, 1);
        let doubled = [
            event(0, "a", 1, "created", Value::Null, v(1)),
            event(1, "a", 1, "created", Value::Null, v(9)),
        ];
        assert_eq!(Audit::of(&doubled).doubled, 1);
    }
}
