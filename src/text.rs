//! Quoting values that came from outside (the management system, a command, a panic message)
//! into errors and log lines: cut short and with control characters escaped.

/// The longest prefix of an outside value quoted anywhere.
pub const QUOTE_CHARS: usize = 64;

/// The longest library message (TLS, SASL, a driver's) carried into an error.
pub const REASON_CHARS: usize = 300;

/// `value` cut to `max` characters, control characters escaped: a message from a library or a
/// server carried into an error can neither flood nor forge a line.
pub fn cut(value: &str, max: usize) -> String {
    value
        .chars()
        .take(max)
        .flat_map(char::escape_debug)
        .collect()
}

/// A value quoted in an error or a log line: cut to [`QUOTE_CHARS`] characters, control
/// characters escaped, so a hostile value can neither flood nor forge a line.
pub fn quote(value: &str) -> String {
    let mut out = cut(value, QUOTE_CHARS);
    if value.chars().nth(QUOTE_CHARS).is_some() {
        out.push('…');
    }
    format!("\"{out}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quote_is_cut_short_and_escapes_control_characters() {
        let long = "x".repeat(QUOTE_CHARS + 10);
        let q = quote(&long);
        assert_eq!(q.chars().filter(|c| *c == 'x').count(), QUOTE_CHARS);
        assert!(q.ends_with("…\""), "{q}");
        assert_eq!(quote("a\nb"), "\"a\\nb\"");
    }
}
