//! Text that came from a peer, made safe to write where people read it.
//!
//! One function decides how untrusted text looks in logs, in audit details, in error
//! messages and in the CLI's listings, for IMAP and SMTP alike: [`printable`] for bytes off
//! the wire (lossy UTF-8, capped), [`escape`] for text already in a string. Control
//! characters (CR and LF included: a folder name decoded from modified UTF-7 may hold them),
//! bidi overrides and invisible characters are escaped, never passed through and never dropped
//! silently, so what an auditor reads is what the peer sent.

use std::borrow::Cow;

/// Bytes as lowercase hexadecimal (digests, keys).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// `s` with control, bidi and invisible characters escaped (`\r`, `\u{202e}`); with `quoted`,
/// `"` and `\` too (for a value printed between quotes).
pub fn escape(s: &str, quoted: bool) -> Cow<'_, str> {
    let needs = |c: char| needs_escape(c) || (quoted && matches!(c, '"' | '\\'));
    if !s.chars().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Bytes from a peer as one printable line: invalid UTF-8 replaced, escaped as [`escape`]
/// does, at most `max` bytes of output before an ellipsis.
pub fn printable(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len().min(max) + 4);
    for c in text.chars() {
        if out.len() >= max {
            out.push('…');
            break;
        }
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `s` holds a character [`escape`] would change (ignoring quotes).
pub fn has_control(s: &str) -> bool {
    s.chars().any(needs_escape)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || is_bidi_or_invisible(c)
}

fn is_bidi_or_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_forge_a_line() {
        assert_eq!(printable(b"a\r\n* OK forged", 100), "a\\r\\n* OK forged");
        assert_eq!(printable(b"x\x1b[31m", 100), "x\\u{1b}[31m");
        assert_eq!(
            printable("evil\u{202e}txt".as_bytes(), 100),
            "evil\\u{202e}txt"
        );
        assert_eq!(printable(b"\xff", 100), "\u{fffd}");
        assert_eq!(printable(b"abcdef", 3), "abc…");
        assert_eq!(escape("plain", true), Cow::Borrowed("plain"));
        assert_eq!(escape("say \"hi\"\n", true), "say \\\"hi\\\"\\n");
        assert!(has_control("a\rb") && !has_control("Ricevute/2027"));
    }
}
