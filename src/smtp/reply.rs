//! SMTP replies: what pecgate answers, and what the provider answered (kept line by line so
//! it can be relayed faithfully).

use std::fmt;

/// An enhanced status code (RFC 3463), e.g. `5.7.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced(pub u8, pub u16, pub u16);

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// `None` only for the greeting and EHLO, which carry no enhanced code.
    pub enhanced: Option<Enhanced>,
    /// The text of each line, without code, enhanced code or line ending.
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: Enhanced, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A reply without enhanced code (greeting, HELO/EHLO, 334 challenges).
    pub fn plain(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The wire form: `CODE-` on every line but the last, `CODE ` on the last, each with the
    /// enhanced code if there is one. Control characters in the text are replaced so a reply
    /// can never break the framing.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        let count = self.lines.len().max(1);
        for i in 0..count {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let separator = if i + 1 == count { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{separator}", self.code).as_bytes());
            if let Some(enhanced) = self.enhanced {
                out.extend_from_slice(enhanced.to_string().as_bytes());
                if !text.is_empty() {
                    out.push(b' ');
                }
            }
            for c in text.chars() {
                if c.is_control() {
                    out.push(b' ');
                } else {
                    let mut buf = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// One line for logs and the audit trail: `550 5.7.1 text / more text`.
    pub fn summary(&self) -> String {
        let mut s = self.code.to_string();
        if let Some(enhanced) = self.enhanced {
            s.push(' ');
            s.push_str(&enhanced.to_string());
        }
        let text = self.lines.join(" / ");
        if !text.is_empty() {
            s.push(' ');
            s.push_str(&text);
        }
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(500)
            .collect()
    }

    /// Parse a complete raw reply (as framed by [`reply_end`]) with smtp-proto, keeping each
    /// line's text. A reply without an enhanced code gets the generic one of its class
    /// (`2.0.0`, `4.0.0`, `5.0.0`), because pecgate advertises ENHANCEDSTATUSCODES.
    pub fn parse(raw: &[u8]) -> Option<Reply> {
        let mut receiver = smtp_proto::response::parser::ResponseReceiver::default();
        let parsed = receiver.parse(&mut raw.iter()).ok()?;
        if !(200..600).contains(&parsed.code) {
            return None;
        }
        let enhanced = match parsed.esc {
            [0, 0, 0] => Enhanced((parsed.code / 100) as u8, 0, 0),
            [class, subject, detail] => Enhanced(class, subject.into(), detail.into()),
        };
        Some(Reply {
            code: parsed.code,
            enhanced: Some(enhanced),
            lines: parsed
                .message
                .split('\n')
                .map(|l| l.trim_end_matches('\r').to_owned())
                .collect(),
        })
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

/// Where the first complete reply in `buf` ends (just past its last line's LF), or `None` if
/// more bytes are needed. A reply's last line has a space (or nothing) after the code.
pub fn reply_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(offset) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + offset];
        let end = start + offset + 1;
        if line.get(3) != Some(&b'-') {
            return Some(end);
        }
        start = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form() {
        let r = Reply::new(550, Enhanced(5, 7, 1), "No\r\nway");
        assert_eq!(r.to_bytes(), b"550 5.7.1 No  way\r\n");
        let r = Reply {
            code: 250,
            enhanced: None,
            lines: vec!["host".into(), "SIZE 10".into(), "8BITMIME".into()],
        };
        assert_eq!(
            r.to_bytes(),
            b"250-host\r\n250-SIZE 10\r\n250 8BITMIME\r\n".to_vec()
        );
        assert_eq!(
            Reply::new(250, Enhanced(2, 0, 0), "").to_bytes(),
            b"250 2.0.0\r\n"
        );
    }

    #[test]
    fn parse_provider_replies() {
        let r =
            Reply::parse(b"550-5.7.1 Too much traffic\r\n550 5.7.1 from this sender\r\n").unwrap();
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced, Some(Enhanced(5, 7, 1)));
        assert_eq!(r.lines, ["Too much traffic", "from this sender"]);
        assert_eq!(
            r.to_bytes(),
            b"550-5.7.1 Too much traffic\r\n550 5.7.1 from this sender\r\n".to_vec()
        );
        let r = Reply::parse(b"250 Ok: queued as 1234\r\n").unwrap();
        assert_eq!(r.enhanced, Some(Enhanced(2, 0, 0)));
        assert_eq!(r.lines, ["Ok: queued as 1234"]);
        let r = Reply::parse(b"452 4.5.3 Too many\n").unwrap();
        assert!(r.is_transient());
        assert!(Reply::parse(b"hello\r\n").is_none());
        assert!(Reply::parse(b"999 x\r\n").is_none());
    }

    #[test]
    fn framing() {
        assert_eq!(reply_end(b"250-a\r\n250 b\r\nrest"), Some(14));
        assert_eq!(reply_end(b"250-a\r\n250-b\r\n"), None);
        assert_eq!(reply_end(b"250 a"), None);
        assert_eq!(reply_end(b"220\r\n"), Some(5));
    }
}
