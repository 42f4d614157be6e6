//! Product-request commands: the wire shape on `topics.requests`, parsed and validated into a
//! domain type. Every way a command can be bad has its own [`CommandError`] kind, which the
//! pipeline writes into the DLQ record's headers.
//!
//! Wire form (version 2, DESIGN.md "Commands, version 2"): `{"request_id","system"?,
//! "selector":{"all"?,"keyword"?,"product_codes"?,"category"?,"updated_since"?},
//! "mode"?:"incremental"|"snapshot","dry_run"?,"force"?,"requested_by"?}`. Unknown fields are
//! refused: a misspelt selector field would otherwise silently widen the request.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::product::MAX_CODE_LEN;

/// Largest command accepted, in bytes.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Longest request id.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Most product codes in one command.
pub const MAX_PRODUCT_CODES: usize = 1000;
/// Longest keyword, in characters.
pub const MAX_KEYWORD_CHARS: usize = 100;
/// Longest category or `requested_by`, in characters.
pub const MAX_LABEL_CHARS: usize = 200;

/// Feature information of a product request: every product that matches all given parts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// The system's whole catalogue; stands alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// A keyword shared by the products (matched against names and keyword lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyword: Option<String>,
    /// Exact product codes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub product_codes: Vec<String>,
    /// A product category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Only products changed at or after this time; `"watermark"`: the system's stored
    /// watermark less the schedule's overlap (the whole catalogue while there is none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_since: Option<Since>,
}

/// `selector.updated_since`: a time, or the system's watermark, resolved when the command is
/// processed ([`Command::resolve_watermark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Products changed at or after this time.
    At(DateTime<Utc>),
    /// `"watermark"`.
    Watermark,
}

/// The word that stands for the watermark in `selector.updated_since`.
pub const WATERMARK: &str = "watermark";

impl Since {
    /// The time, once resolved (`None` for an unresolved watermark).
    pub fn at(self) -> Option<DateTime<Utc>> {
        match self {
            Since::At(t) => Some(t),
            Since::Watermark => None,
        }
    }
}

impl Serialize for Since {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Since::At(t) => t.serialize(s),
            Since::Watermark => s.serialize_str(WATERMARK),
        }
    }
}

impl<'de> Deserialize<'de> for Since {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == WATERMARK {
            return Ok(Since::Watermark);
        }
        text.parse::<DateTime<Utc>>().map(Since::At).map_err(|_| {
            serde::de::Error::custom(format!(
                "updated_since {:?} is neither an RFC 3339 time nor \"watermark\"",
                truncate(&text, 40)
            ))
        })
    }
}

impl schemars::JsonSchema for Since {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Since".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "An RFC 3339 time, or \"watermark\": the system's stored watermark less the schedule's overlap",
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "string", "const": "watermark"}
            ]
        })
    }
}

impl Selector {
    /// A selector that names nothing would ask for the whole catalogue.
    pub fn is_empty(&self) -> bool {
        !self.all
            && self.keyword.is_none()
            && self.product_codes.is_empty()
            && self.category.is_none()
            && self.updated_since.is_none()
    }

    /// `"updated_since": "watermark"` made concrete: the system's `watermark` less `overlap`,
    /// or — while there is no watermark — no time limit (`updated_since` alone becomes
    /// `{"all": true}`). Anything else is left as it is.
    pub fn resolve_watermark(
        &mut self,
        watermark: Option<DateTime<Utc>>,
        overlap: std::time::Duration,
    ) {
        if self.updated_since != Some(Since::Watermark) {
            return;
        }
        let overlap = chrono::Duration::from_std(overlap).unwrap_or_default();
        self.updated_since = watermark.map(|w| Since::At(w - overlap));
        if self.is_empty() {
            self.all = true;
        }
    }
}

/// What a command asks for.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Insert and update what the management system answers (the default).
    #[default]
    Incremental,
    /// The answer is the complete scope: what the store holds in it and the answer lacks is
    /// delisted (after a confirming lookup, under `upstream.max_delist_ratio`).
    Snapshot,
}

impl Mode {
    fn is_incremental(&self) -> bool {
        *self == Mode::Incremental
    }
}

/// The command as it travels on Kafka.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandWire {
    pub request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub selector: Selector,
    #[serde(default, skip_serializing_if = "Mode::is_incremental")]
    pub mode: Mode,
    /// Compare only: write nothing, emit no change event; the result reports the drift.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Let a snapshot delist past `upstream.max_delist_ratio`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}

/// A validated product-request command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    request_id: String,
    system: String,
    selector: Selector,
    mode: Mode,
    dry_run: bool,
    force: bool,
    requested_by: Option<String>,
}

impl Command {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }
    pub fn system(&self) -> &str {
        &self.system
    }
    pub fn selector(&self) -> &Selector {
        &self.selector
    }
    pub fn requested_by(&self) -> Option<&str> {
        self.requested_by.as_deref()
    }
    pub fn mode(&self) -> Mode {
        self.mode
    }
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }
    pub fn force(&self) -> bool {
        self.force
    }

    /// Whether it says `"updated_since": "watermark"`.
    pub fn wants_watermark(&self) -> bool {
        self.selector.updated_since == Some(Since::Watermark)
    }

    /// The command with `"updated_since": "watermark"` resolved ([`Selector::resolve_watermark`]).
    pub fn resolve_watermark(
        mut self,
        watermark: Option<DateTime<Utc>>,
        overlap: std::time::Duration,
    ) -> Command {
        self.selector.resolve_watermark(watermark, overlap);
        self
    }

    /// Whether completing this command moves its system's watermark: an incremental run
    /// (no dry run) of the whole catalogue or of `updated_since` alone (DESIGN.md part 3).
    pub fn moves_watermark(&self) -> bool {
        let s = &self.selector;
        let whole = s.all
            || (s.updated_since.is_some()
                && s.keyword.is_none()
                && s.product_codes.is_empty()
                && s.category.is_none());
        self.mode == Mode::Incremental && !self.dry_run && whole
    }

    /// Whether this command is a drift check: a dry-run snapshot of the whole catalogue.
    pub fn is_drift_check(&self) -> bool {
        self.mode == Mode::Snapshot && self.dry_run && self.selector.all
    }

    /// The command in its wire form (stored with the request row).
    pub fn to_wire(&self) -> CommandWire {
        CommandWire {
            request_id: self.request_id.clone(),
            system: Some(self.system.clone()),
            selector: self.selector.clone(),
            mode: self.mode,
            dry_run: self.dry_run,
            force: self.force,
            requested_by: self.requested_by.clone(),
        }
    }

    /// Parses and validates a command's bytes for the management system `system`.
    pub fn parse(payload: Option<&[u8]>, system: &str) -> Result<Command, CommandError> {
        Command::parse_among(payload, system, &[])
    }

    /// Parses and validates a command's bytes for a deployment serving `default` (commands
    /// naming no system) and the `others`.
    pub fn parse_among(
        payload: Option<&[u8]>,
        default: &str,
        others: &[String],
    ) -> Result<Command, CommandError> {
        let bytes = payload.ok_or(CommandError::Empty)?;
        if bytes.is_empty() {
            return Err(CommandError::Empty);
        }
        if bytes.len() > MAX_COMMAND_BYTES {
            return Err(CommandError::TooLarge { bytes: bytes.len() });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| CommandError::NotUtf8 {
            at: e.valid_up_to(),
        })?;
        let wire: CommandWire = serde_json::from_str(text).map_err(|e| classify_json_error(&e))?;
        Command::validate_among(wire, default, others)
    }

    /// Checks a wire command against the rules, for the one system `system`.
    pub fn validate(wire: CommandWire, system: &str) -> Result<Command, CommandError> {
        Command::validate_among(wire, system, &[])
    }

    /// Checks a wire command against the rules, for a deployment serving `default` and the
    /// `others`.
    pub fn validate_among(
        wire: CommandWire,
        default: &str,
        others: &[String],
    ) -> Result<Command, CommandError> {
        validate_request_id(&wire.request_id)?;
        let named = wire.system.clone().unwrap_or_else(|| default.to_owned());
        if named != default && !others.contains(&named) {
            let expected: Vec<String> = std::iter::once(default)
                .chain(others.iter().map(String::as_str).filter(|s| *s != default))
                .map(|s| format!("{s:?}"))
                .collect();
            return Err(CommandError::UnknownSystem {
                named: truncate(&named, 64),
                expected: expected.join(", "),
            });
        }
        let s = &wire.selector;
        if s.is_empty() {
            return Err(CommandError::EmptySelector);
        }
        validate_scope(&wire)?;
        if let Some(k) = &s.keyword
            && (k.trim().is_empty() || k.chars().count() > MAX_KEYWORD_CHARS)
        {
            return Err(CommandError::invalid(
                "selector.keyword",
                format!("must be 1 to {MAX_KEYWORD_CHARS} characters, not blank"),
            ));
        }
        if s.product_codes.len() > MAX_PRODUCT_CODES {
            return Err(CommandError::invalid(
                "selector.product_codes",
                format!("more than {MAX_PRODUCT_CODES} codes"),
            ));
        }
        for code in &s.product_codes {
            if !is_product_code(code) {
                return Err(CommandError::invalid(
                    "selector.product_codes",
                    format!(
                        "{:?} is not a product code (1 to {MAX_CODE_LEN} bytes, no spaces or commas)",
                        truncate(code, 80)
                    ),
                ));
            }
        }
        if let Some(c) = &s.category
            && (c.trim().is_empty() || c.chars().count() > MAX_LABEL_CHARS)
        {
            return Err(CommandError::invalid(
                "selector.category",
                format!("must be 1 to {MAX_LABEL_CHARS} characters"),
            ));
        }
        if let Some(by) = &wire.requested_by
            && by.chars().count() > MAX_LABEL_CHARS
        {
            return Err(CommandError::invalid(
                "requested_by",
                format!("longer than {MAX_LABEL_CHARS} characters"),
            ));
        }
        Ok(Command {
            request_id: wire.request_id,
            system: named,
            selector: wire.selector,
            mode: wire.mode,
            dry_run: wire.dry_run,
            force: wire.force,
            requested_by: wire.requested_by,
        })
    }
}

/// A product code as selectors and notifications take it: 1 to [`MAX_CODE_LEN`] bytes, no
/// whitespace, control character or comma (codes travel comma-separated upstream).
pub fn is_product_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= MAX_CODE_LEN
        && !code.contains(',')
        && !code.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A request id as commands carry it (1 to [`MAX_REQUEST_ID_LEN`] bytes of letters, digits
/// and `- _ . :`).
pub fn is_request_id(id: &str) -> bool {
    validate_request_id(id).is_ok()
}

fn validate_request_id(id: &str) -> Result<(), CommandError> {
    if id.is_empty() || id.len() > MAX_REQUEST_ID_LEN {
        return Err(CommandError::invalid(
            "request_id",
            format!("must be 1 to {MAX_REQUEST_ID_LEN} bytes"),
        ));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(CommandError::invalid(
            "request_id",
            "may hold only letters, digits and - _ . :",
        ));
    }
    Ok(())
}

/// `all` stands alone; a snapshot's scope must be complete (`all`, or one category alone);
/// `force` means something only for a snapshot.
fn validate_scope(wire: &CommandWire) -> Result<(), CommandError> {
    let s = &wire.selector;
    let others = s.keyword.is_some()
        || !s.product_codes.is_empty()
        || s.category.is_some()
        || s.updated_since.is_some();
    if s.all && others {
        return Err(CommandError::invalid(
            "selector.all",
            "stands alone: the whole catalogue, nothing else",
        ));
    }
    let category_alone = s.category.is_some()
        && s.keyword.is_none()
        && s.product_codes.is_empty()
        && s.updated_since.is_none();
    if wire.mode == Mode::Snapshot && !(s.all || category_alone) {
        return Err(CommandError::invalid(
            "mode",
            "a snapshot needs {\"all\": true} or {\"category\": …} alone: a keyword, codes or \
             updated_since answer is not a complete set",
        ));
    }
    if wire.force && wire.mode != Mode::Snapshot {
        return Err(CommandError::invalid(
            "force",
            "only a snapshot delists; force means nothing without mode \"snapshot\"",
        ));
    }
    Ok(())
}

/// Why a command was refused. All are permanent: the same bytes will never pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("the command is empty")]
    Empty,
    #[error("the command is {bytes} bytes, more than the {MAX_COMMAND_BYTES} allowed")]
    TooLarge { bytes: usize },
    #[error("the command is not UTF-8 (invalid byte at {at})")]
    NotUtf8 { at: usize },
    #[error("the command is not JSON: {0}")]
    BadJson(String),
    #[error("the command lacks `{0}`")]
    MissingField(String),
    #[error("the command has an unknown field `{0}`")]
    UnknownField(String),
    #[error("a field of the command has the wrong type: {0}")]
    WrongType(String),
    #[error("`{field}` is invalid: {reason}")]
    Invalid { field: String, reason: String },
    #[error(
        "the selector names nothing (give a keyword, product codes, a category or updated_since)"
    )]
    EmptySelector,
    #[error("the command names system {named:?}, but this service syncs {expected}")]
    UnknownSystem { named: String, expected: String },
}

impl CommandError {
    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        CommandError::Invalid {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// A short stable name of the failure, for DLQ headers and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandError::Empty => "empty",
            CommandError::TooLarge { .. } => "too_large",
            CommandError::NotUtf8 { .. } => "not_utf8",
            CommandError::BadJson(_) => "bad_json",
            CommandError::MissingField(_) => "missing_field",
            CommandError::UnknownField(_) => "unknown_field",
            CommandError::WrongType(_) => "wrong_type",
            CommandError::Invalid { .. } => "invalid_field",
            CommandError::EmptySelector => "empty_selector",
            CommandError::UnknownSystem { .. } => "unknown_system",
        }
    }
}

fn classify_json_error(e: &serde_json::Error) -> CommandError {
    let msg = e.to_string();
    if let Some(field) = between(&msg, "missing field `", "`") {
        return CommandError::MissingField(field.to_owned());
    }
    if let Some(field) = between(&msg, "unknown field `", "`") {
        return CommandError::UnknownField(field.to_owned());
    }
    match e.classify() {
        serde_json::error::Category::Data => CommandError::WrongType(truncate(&msg, 200)),
        _ => CommandError::BadJson(truncate(&msg, 200)),
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

fn truncate(s: &str, chars: usize) -> String {
    s.chars().take(chars).collect()
}

/// A W3C `traceparent` value worth carrying (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase hex, no
/// all-zero ids, version not `ff`), trimmed; else `None`.
pub fn valid_traceparent(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let nonzero = |p: &str| p.bytes().any(|b| b != b'0');
    (parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && nonzero(parts[1])
        && hex(parts[2], 16)
        && nonzero(parts[2])
        && hex(parts[3], 2))
    .then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Command, CommandError> {
        Command::parse(Some(s.as_bytes()), "wms")
    }

    #[test]
    fn a_good_command_parses() {
        let c = parse(r#"{"request_id":"r-1","selector":{"keyword":"稳健","product_codes":["A","B"],"updated_since":"2026-01-01T00:00:00Z"},"requested_by":"ops"}"#).unwrap();
        assert_eq!(c.request_id(), "r-1");
        assert_eq!(c.system(), "wms");
        assert_eq!(c.selector().product_codes, ["A", "B"]);
        assert_eq!(Command::validate(c.to_wire(), "wms").unwrap(), c);
    }

    #[test]
    fn each_kind_of_bad_command_is_named() {
        let big = format!(
            r#"{{"request_id":"r","selector":{{"keyword":"{}"}}}}"#,
            "x".repeat(MAX_COMMAND_BYTES)
        );
        let cases: Vec<(&[u8], &str)> = vec![
            (b"", "empty"),
            (big.as_bytes(), "too_large"),
            (b"\xff\xfe{}", "not_utf8"),
            (b"{not json", "bad_json"),
            (br#"{"selector":{"keyword":"k"}}"#, "missing_field"),
            (
                br#"{"request_id":"r","selector":{"keyword":"k"},"extra":1}"#,
                "unknown_field",
            ),
            (
                br#"{"request_id":"r","selector":{"kyeword":"k"}}"#,
                "unknown_field",
            ),
            (
                br#"{"request_id":7,"selector":{"keyword":"k"}}"#,
                "wrong_type",
            ),
            (
                br#"{"request_id":"r","selector":{"product_codes":"A"}}"#,
                "wrong_type",
            ),
            (
                br#"{"request_id":"r","selector":{"updated_since":"yesterday"}}"#,
                "wrong_type",
            ),
            (br#"{"request_id":"r","selector":{}}"#, "empty_selector"),
            (
                br#"{"request_id":"r","system":"other","selector":{"keyword":"k"}}"#,
                "unknown_system",
            ),
            (
                br#"{"request_id":"","selector":{"keyword":"k"}}"#,
                "invalid_field",
            ),
            (
                br#"{"request_id":"a b","selector":{"keyword":"k"}}"#,
                "invalid_field",
            ),
            (
                br#"{"request_id":"r","selector":{"keyword":"  "}}"#,
                "invalid_field",
            ),
            (
                br#"{"request_id":"r","selector":{"product_codes":["A,B"]}}"#,
                "invalid_field",
            ),
            (br#"[1,2,3]"#, "wrong_type"),
            (
                br#"{"request_id":"r","selector":{"all":true,"keyword":"k"}}"#,
                "invalid_field",
            ),
            (
                br#"{"request_id":"r","selector":{"keyword":"k"},"mode":"snapshot"}"#,
                "invalid_field",
            ),
            (
                br#"{"request_id":"r","selector":{"category":"c","keyword":"k"},"mode":"snapshot"}"#,
                "invalid_field",
            ),
            (
                br#"{"request_id":"r","selector":{"all":true},"force":true}"#,
                "invalid_field",
            ),
            (
                br#"{"request_id":"r","selector":{"all":true},"mode":"full"}"#,
                "wrong_type",
            ),
        ];
        for (bytes, kind) in cases {
            let err = Command::parse(Some(bytes), "wms").unwrap_err();
            assert_eq!(
                err.kind(),
                kind,
                "{err} for {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(60)])
            );
        }
        assert_eq!(Command::parse(None, "wms").unwrap_err().kind(), "empty");
    }

    #[test]
    fn version_2_commands_parse_and_round_trip() {
        for text in [
            r#"{"request_id":"s-1","selector":{"all":true},"mode":"snapshot","force":true}"#,
            r#"{"request_id":"s-2","selector":{"category":"cash"},"mode":"snapshot"}"#,
            r#"{"request_id":"s-3","selector":{"all":true}}"#,
        ] {
            let c = parse(text).unwrap();
            assert_eq!(Command::validate(c.to_wire(), "wms").unwrap(), c, "{text}");
        }
        let c = parse(r#"{"request_id":"s-1","selector":{"all":true},"mode":"snapshot"}"#).unwrap();
        assert_eq!(c.mode(), Mode::Snapshot);
        assert!(c.selector().all && !c.force() && !c.dry_run());
        // Version 1 commands mean what they meant.
        let v1 = parse(r#"{"request_id":"v1","selector":{"keyword":"k"}}"#).unwrap();
        assert_eq!(v1.mode(), Mode::Incremental);
        assert_eq!(
            serde_json::to_value(v1.to_wire()).unwrap(),
            serde_json::json!({"request_id":"v1","system":"wms","selector":{"keyword":"k"}})
        );
    }

    #[test]
    fn traceparent_is_validated() {
        assert!(
            valid_traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").is_some()
        );
        for bad in [
            &b"garbage"[..],
            b"00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
            b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        ] {
            assert!(
                valid_traceparent(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
