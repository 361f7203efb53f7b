//! Untrusted text in log lines. Anything a machine on the provisioning network or an agent
//! sends (a MAC in a URL, a path, an agent's log line) is escaped before it is logged, so it
//! cannot forge a line (`\n`) or drive a terminal (ESC sequences).

use std::borrow::Cow;

/// `s` with control characters (newlines, ESC, DEL, C1 controls ...) written as `\n`, `\r`,
/// `\t` or `\u{1b}`; backslashes doubled so the escaping is unambiguous.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_lines_or_drive_terminals() {
        assert_eq!(escape("52:54:00:00:00:01"), "52:54:00:00:00:01");
        assert_eq!(
            escape("zz\n2026-12-06T00:00:00Z INFO forged"),
            "zz\\n2026-12-06T00:00:00Z INFO forged"
        );
        assert_eq!(escape("\u{1b}[31mred\u{7f}"), "\\u{1b}[31mred\\u{7f}");
        assert_eq!(escape("a\\nb"), "a\\\\nb");
        assert_eq!(escape("tab\there\r"), "tab\\there\\r");
    }
}
