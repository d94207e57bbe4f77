//! The message header section: strict field splitting and unfolding, RFC 5322 address lists
//! (display names, quoted strings, comments, groups, encoded words left encoded), Message-ID,
//! and the decoded Subject for the ledger.
//!
//! The PEC checks depend on exactly which addresses are in From/To/Cc, so this parser is
//! strict: anything it cannot parse with certainty is an error (the message is refused)
//! rather than guessed at, so pecgate never checks something other than what the provider
//! will see. Pure functions on bytes.

use std::fmt;

/// Why a header section cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("line {line} of the header is not a header field (`Name: value`)")]
    NotAField { line: usize },
    #[error("the header starts with a continuation line")]
    LeadingContinuation,
    #[error("the {field} header cannot be parsed: {reason}")]
    Address { field: String, reason: String },
    #[error("the message has more than one {0} header")]
    Duplicate(&'static str),
    #[error("the Message-ID header is not of the form <id@domain>")]
    MessageId,
}

/// One header field: its name as written and its unfolded value (without the leading space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub value: Vec<u8>,
}

/// Split a header section (as captured by `DataIntake`, CRLF line endings) into fields.
pub fn split_fields(header: &[u8]) -> Result<Vec<Field>, HeaderError> {
    let mut fields: Vec<Field> = Vec::new();
    for (i, line) in header.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            // The empty line ending the header (or the end of the captured bytes).
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            let Some(last) = fields.last_mut() else {
                return Err(HeaderError::LeadingContinuation);
            };
            // Unfolding removes the CRLF, keeping the whitespace (RFC 5322 §2.2.3).
            last.value.extend_from_slice(line);
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(HeaderError::NotAField { line: i + 1 });
        };
        // obs-optional allows whitespace between the name and the colon.
        let name = trim_end_wsp(&line[..colon]);
        if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b)) {
            return Err(HeaderError::NotAField { line: i + 1 });
        }
        let value = &line[colon + 1..];
        let value = value.strip_prefix(b" ").unwrap_or(value);
        fields.push(Field {
            name: String::from_utf8_lossy(name).into_owned(),
            value: value.to_vec(),
        });
    }
    Ok(fields)
}

fn trim_end_wsp(s: &[u8]) -> &[u8] {
    let end = s
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    &s[..end]
}

/// A mailbox of an address list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// `local@domain` as written (quotes of a quoted local part kept).
    pub address: String,
    /// Whether it was inside a group (`Name: a@b, c@d;`).
    pub in_group: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// An atom or dot-atom (atext and `.`; bytes ≥ 0x80 allowed, RFC 6532).
    Atom(String),
    Quoted(String),
    DomainLiteral(String),
    Special(u8),
}

fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b) || b >= 0x80
}

fn tokenize(value: &[u8]) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < value.len() {
        let b = value[i];
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'(' => {
                // Comments nest and may contain quoted pairs.
                let mut depth = 0usize;
                loop {
                    let Some(&c) = value.get(i) else {
                        return Err("unterminated comment".into());
                    };
                    match c {
                        b'\\' => i += 1,
                        b'(' => depth += 1,
                        b')' => {
                            depth -= 1;
                            if depth == 0 {
                                i += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            }
            b'"' => {
                let mut text = Vec::new();
                i += 1;
                loop {
                    let Some(&c) = value.get(i) else {
                        return Err("unterminated quoted string".into());
                    };
                    i += 1;
                    match c {
                        b'"' => break,
                        b'\\' => {
                            let Some(&escaped) = value.get(i) else {
                                return Err("unterminated quoted string".into());
                            };
                            text.push(escaped);
                            i += 1;
                        }
                        _ => text.push(c),
                    }
                }
                tokens.push(Token::Quoted(utf8(text)?));
            }
            b'[' => {
                let end = value[i..]
                    .iter()
                    .position(|&c| c == b']')
                    .ok_or("unterminated domain literal")?;
                let inner = &value[i..i + end + 1];
                if inner[1..inner.len() - 1]
                    .iter()
                    .any(|&c| c == b'[' || c == b'\\')
                {
                    return Err("invalid domain literal".into());
                }
                tokens.push(Token::DomainLiteral(utf8(inner.to_vec())?));
                i += end + 1;
            }
            b'<' | b'>' | b'@' | b',' | b':' | b';' => {
                tokens.push(Token::Special(b));
                i += 1;
            }
            _ if is_atext(b) => {
                let end = value[i..]
                    .iter()
                    .position(|&c| !is_atext(c))
                    .map_or(value.len(), |e| i + e);
                tokens.push(Token::Atom(utf8(value[i..end].to_vec())?));
                i = end;
            }
            _ => return Err(format!("unexpected character {:?}", b as char)),
        }
    }
    Ok(tokens)
}

fn utf8(bytes: Vec<u8>) -> Result<String, String> {
    String::from_utf8(bytes).map_err(|_| "invalid UTF-8".to_owned())
}

/// Parse an address-list (To, Cc, Bcc, Reply-To) or mailbox-list (From) value.
pub fn parse_address_list(value: &[u8]) -> Result<Vec<Mailbox>, String> {
    let tokens = tokenize(value)?;
    let mut parser = AddressParser {
        tokens: &tokens,
        pos: 0,
    };
    let mut out = Vec::new();
    loop {
        // Empty list elements (`a@b, , c@d`) are allowed by the obsolete syntax.
        while parser.eat(b',') {}
        if parser.at_end() {
            break;
        }
        parser.address(&mut out)?;
        if parser.at_end() {
            break;
        }
        if !parser.eat(b',') {
            return Err(format!("unexpected {}", parser.describe()));
        }
    }
    Ok(out)
}

struct AddressParser<'a> {
    tokens: &'a [Token],
    pos: usize,
}

impl AddressParser<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.tokens.len()
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn eat(&mut self, special: u8) -> bool {
        if self.peek() == Some(&Token::Special(special)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn describe(&self) -> String {
        match self.peek() {
            None => "end of header".into(),
            Some(Token::Special(b)) => format!("`{}`", *b as char),
            Some(Token::Atom(a)) => format!("`{a}`"),
            Some(Token::Quoted(q)) => format!("\"{q}\""),
            Some(Token::DomainLiteral(d)) => format!("`{d}`"),
        }
    }

    /// address = mailbox / group.
    fn address(&mut self, out: &mut Vec<Mailbox>) -> Result<(), String> {
        // A group starts with its display name and `:`; anything else is a mailbox.
        let start = self.pos;
        if self.skip_words() == 0 || !self.eat(b':') {
            self.pos = start;
            out.push(self.mailbox(false)?);
            return Ok(());
        }
        // group-list: mailboxes up to `;` (possibly none).
        loop {
            while self.eat(b',') {}
            if self.eat(b';') {
                return Ok(());
            }
            if self.at_end() {
                return Err("group without `;`".into());
            }
            out.push(self.mailbox(true)?);
            if !matches!(self.peek(), Some(Token::Special(b',' | b';'))) {
                return Err(format!("unexpected {} in group", self.describe()));
            }
        }
    }

    /// mailbox = name-addr / addr-spec (no group).
    fn mailbox(&mut self, in_group: bool) -> Result<Mailbox, String> {
        // Scan the phrase (display name) or local part: words until a special.
        let start = self.pos;
        let words = self.skip_words();
        let address = match self.peek() {
            Some(Token::Special(b'<')) => self.angle_addr()?,
            Some(Token::Special(b'@')) if words == 1 => {
                self.pos = start;
                self.addr_spec()?
            }
            _ => return Err(format!("expected an address, found {}", self.describe())),
        };
        Ok(Mailbox { address, in_group })
    }

    /// Skip atoms and quoted strings; returns how many.
    fn skip_words(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(Token::Atom(_) | Token::Quoted(_))) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn angle_addr(&mut self) -> Result<String, String> {
        self.pos += 1; // `<`
        if self.peek() == Some(&Token::Special(b'@')) {
            return Err("source routes (<@host:...>) are not accepted".into());
        }
        let address = self.addr_spec()?;
        if !self.eat(b'>') {
            return Err(format!("expected `>`, found {}", self.describe()));
        }
        Ok(address)
    }

    /// addr-spec = local-part "@" domain.
    fn addr_spec(&mut self) -> Result<String, String> {
        let local = match self.peek() {
            Some(Token::Atom(a)) => {
                check_dot_atom(a)?;
                a.clone()
            }
            Some(Token::Quoted(q)) => quote_local(q),
            _ => return Err(format!("expected a local part, found {}", self.describe())),
        };
        self.pos += 1;
        if !self.eat(b'@') {
            return Err(format!("expected `@`, found {}", self.describe()));
        }
        let domain = match self.peek() {
            Some(Token::Atom(a)) => {
                check_dot_atom(a)?;
                a.clone()
            }
            Some(Token::DomainLiteral(d)) => d.clone(),
            _ => return Err(format!("expected a domain, found {}", self.describe())),
        };
        self.pos += 1;
        Ok(format!("{local}@{domain}"))
    }
}

fn check_dot_atom(s: &str) -> Result<(), String> {
    if s.starts_with('.') || s.ends_with('.') || s.contains("..") {
        Err(format!("`{s}` is not a valid address part"))
    } else {
        Ok(())
    }
}

/// A quoted local part as it would be written in an envelope: without quotes if it is a
/// valid dot-atom, else quoted.
fn quote_local(q: &str) -> String {
    if !q.is_empty() && q.bytes().all(is_atext) && check_dot_atom(q).is_ok() {
        q.to_owned()
    } else {
        let escaped = q.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\"")
    }
}

/// Addresses compare case-insensitively (ASCII), as PEC providers do.
pub fn same_address(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Parse a Message-ID value: exactly one `<left@right>`, optionally surrounded by CFWS.
pub fn parse_message_id(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let trimmed = strip_comments(text);
    let trimmed = trimmed.trim();
    let inner = trimmed.strip_prefix('<')?.strip_suffix('>')?;
    let (left, right) = inner.split_once('@')?;
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && !b"<>@\"()\\,;:".contains(&b) || b == b'.')
    };
    let right_ok = valid(right)
        || (right.starts_with('[')
            && right.ends_with(']')
            && !right[1..right.len() - 1].contains(['[', ']']));
    (valid(left) && right_ok).then(|| format!("<{inner}>"))
}

fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// What pecgate needs from a message's header section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderSummary {
    /// Every mailbox of every From field, with the number of From fields.
    pub from: Vec<Mailbox>,
    pub from_fields: usize,
    /// The Sender field's mailboxes, if there is one.
    pub sender: Option<Vec<Mailbox>>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    /// Whether a Bcc field is present (even empty).
    pub has_bcc: bool,
    pub message_id: Option<String>,
    /// Decoded (RFC 2047) subject, for the ledger.
    pub subject: Option<String>,
}

impl fmt::Display for HeaderSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |m: &[Mailbox]| {
            m.iter()
                .map(|m| m.address.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            f,
            "from={} to={} cc={}",
            list(&self.from),
            list(&self.to),
            list(&self.cc)
        )
    }
}

/// Parse the header section into what the checks need. Errors mean "refuse the message".
pub fn summarize(header: &[u8]) -> Result<HeaderSummary, HeaderError> {
    let fields = split_fields(header)?;
    let mut summary = HeaderSummary {
        from: Vec::new(),
        from_fields: 0,
        sender: None,
        to: Vec::new(),
        cc: Vec::new(),
        has_bcc: false,
        message_id: None,
        subject: None,
    };
    let addresses = |field: &Field| {
        parse_address_list(&field.value).map_err(|reason| HeaderError::Address {
            field: field.name.clone(),
            reason,
        })
    };
    let mut seen_to = false;
    let mut seen_cc = false;
    for field in &fields {
        let name = field.name.to_ascii_lowercase();
        match name.as_str() {
            "from" => {
                summary.from_fields += 1;
                summary.from.extend(addresses(field)?);
            }
            "sender" => {
                if summary.sender.is_some() {
                    return Err(HeaderError::Duplicate("Sender"));
                }
                summary.sender = Some(addresses(field)?);
            }
            "to" => {
                if std::mem::replace(&mut seen_to, true) {
                    return Err(HeaderError::Duplicate("To"));
                }
                summary.to = addresses(field)?;
            }
            "cc" => {
                if std::mem::replace(&mut seen_cc, true) {
                    return Err(HeaderError::Duplicate("Cc"));
                }
                summary.cc = addresses(field)?;
            }
            "bcc" => summary.has_bcc = true,
            "message-id" => {
                if summary.message_id.is_some() {
                    return Err(HeaderError::Duplicate("Message-ID"));
                }
                summary.message_id =
                    Some(parse_message_id(&field.value).ok_or(HeaderError::MessageId)?);
            }
            "subject" => {
                if summary.subject.is_some() {
                    return Err(HeaderError::Duplicate("Subject"));
                }
                summary.subject = Some(decode_subject(&field.value));
            }
            _ => {}
        }
    }
    Ok(summary)
}

/// RFC 2047 decoding of an unstructured value, with mail-parser.
fn decode_subject(value: &[u8]) -> String {
    let mut raw = b"Subject: ".to_vec();
    raw.extend_from_slice(value);
    raw.extend_from_slice(b"\r\n\r\n");
    mail_parser::MessageParser::new()
        .parse_headers(&raw)
        .and_then(|m| m.subject().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(value).trim().to_owned())
}

/// A Message-ID for a message that has none: `<pecgate.SECONDS.RANDOM@DOMAIN>`, with the
/// domain of the mailbox's PEC address.
pub fn generate_message_id(mailbox_address: &str, now: std::time::SystemTime) -> String {
    let domain = mailbox_address
        .rsplit_once('@')
        .map_or("pecgate.invalid", |(_, d)| d);
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("<pecgate.{secs}.{:016x}@{domain}>", rand::random::<u64>())
}

/// The header lines pecgate puts on top of a relayed message: its `Received:` trace line
/// (no client address, no user name: those stay in the ledger and the audit log, tied by the
/// session id) and, if the message had none, the generated `Message-ID:`.
pub fn relay_prefix(
    hostname: &str,
    session: &str,
    generated_message_id: Option<&str>,
    now: std::time::SystemTime,
) -> Vec<u8> {
    let mut prefix = format!(
        "Received: by {hostname} (pecgate) with ESMTPSA id {session};\r\n\t{}\r\n",
        rfc5322_date(now)
    );
    if let Some(id) = generated_message_id {
        prefix.push_str(&format!("Message-ID: {id}\r\n"));
    }
    prefix.into_bytes()
}

/// `Sun, 22 Nov 2026 21:05:03 +0000` (UTC).
pub fn rfc5322_date(now: std::time::SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // Reuse the audit log's UTC formatting: "YYYY-MM-DDTHH:MM:SS.ffffffZ".
    let stamp = crate::audit::format_timestamp(now);
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let weekday = DAYS[((secs / 86_400) % 7) as usize];
    let month = stamp[5..7].parse::<usize>().unwrap_or(1).clamp(1, 12);
    let day = stamp[8..10].trim_start_matches('0');
    format!(
        "{weekday}, {day} {} {} {} +0000",
        MONTHS[month - 1],
        &stamp[0..4],
        &stamp[11..19]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(value: &str) -> Vec<String> {
        parse_address_list(value.as_bytes())
            .unwrap()
            .into_iter()
            .map(|m| m.address)
            .collect()
    }

    #[test]
    fn address_lists() {
        let cases: &[(&str, &[&str])] = &[
            ("a@b.it", &["a@b.it"]),
            ("<a@b.it>", &["a@b.it"]),
            ("Mario Rossi <a@b.it>, c@d.it", &["a@b.it", "c@d.it"]),
            ("\"Rossi, Mario\" <a@b.it>", &["a@b.it"]),
            ("\"x <evil@e.it>\" <a@b.it>", &["a@b.it"]),
            ("=?UTF-8?B?TWFyaW8gUm9zc2k=?= <a@b.it>", &["a@b.it"]),
            ("a@b.it (Mario (nested) Rossi)", &["a@b.it"]),
            ("Mario R. Rossi <a@b.it>", &["a@b.it"]),
            (
                "Ufficio: a@b.it, Mario <c@d.it>;, e@f.it",
                &["a@b.it", "c@d.it", "e@f.it"],
            ),
            ("undisclosed-recipients:;", &[]),
            ("a@b.it,,  c@d.it,", &["a@b.it", "c@d.it"]),
            ("\"mario.rossi\"@b.it", &["mario.rossi@b.it"]),
            ("\"mario rossi\"@b.it", &["\"mario rossi\"@b.it"]),
            ("a@[192.0.2.1]", &["a@[192.0.2.1]"]),
            ("", &[]),
        ];
        for (value, expected) in cases {
            assert_eq!(addrs(value), *expected, "{value}");
        }
        let group = parse_address_list(b"G: a@b.it;").unwrap();
        assert!(group[0].in_group);
    }

    #[test]
    fn unparseable_address_lists_are_errors() {
        for value in [
            "Mario Rossi",
            "a@",
            "@b.it",
            "<a@b.it",
            "a@b.it c@d.it",
            "\"unterminated <a@b.it>",
            "a@b.it (unterminated",
            "<@route.it:a@b.it>",
            "G: a@b.it",
            "a..b@c.it",
            "a@b.it>",
            "a\u{1}@b.it",
        ] {
            assert!(
                parse_address_list(value.as_bytes()).is_err(),
                "{value:?} parsed as {:?}",
                parse_address_list(value.as_bytes())
            );
        }
    }

    #[test]
    fn fields_are_split_and_unfolded() {
        let header = b"From: a@b.it\r\nTo: x@y.it,\r\n\tz@w.it\r\nsubject : hi\r\n\r\n";
        let fields = split_fields(header).unwrap();
        assert_eq!(fields.len(), 3);
        assert_eq!(fields[1].value, b"x@y.it,\tz@w.it");
        assert_eq!(fields[2].name, "subject");
        assert_eq!(
            split_fields(b" x\r\nA: b\r\n\r\n"),
            Err(HeaderError::LeadingContinuation)
        );
        assert_eq!(
            split_fields(b"A: b\r\nno colon here\r\n\r\n"),
            Err(HeaderError::NotAField { line: 2 })
        );
        assert!(split_fields(b"Bad Name: x\r\n\r\n").is_err());
    }

    #[test]
    fn summary_of_a_message() {
        let header = concat!(
            "FROM: \"Studio\" <studio@pec.it>\r\n",
            "to: a@x.it,\r\n b@y.it\r\n",
            "Cc: Ufficio: c@z.it;\r\n",
            "Subject: =?UTF-8?Q?Fattura_n=C2=B0_42?=\r\n",
            "Message-Id: <abc.123@pec.it> (comment)\r\n",
            "\r\n"
        );
        let s = summarize(header.as_bytes()).unwrap();
        assert_eq!(s.from_fields, 1);
        assert_eq!(s.from[0].address, "studio@pec.it");
        assert_eq!(s.to.len(), 2);
        assert_eq!(s.cc[0].address, "c@z.it");
        assert!(!s.has_bcc);
        assert_eq!(s.message_id.as_deref(), Some("<abc.123@pec.it>"));
        assert_eq!(s.subject.as_deref(), Some("Fattura n° 42"));

        let s = summarize(b"From: a@b.it\r\nBcc:\r\n\r\n").unwrap();
        assert!(s.has_bcc);
        assert_eq!(
            summarize(b"To: a@b.it\r\nTo: c@d.it\r\n\r\n"),
            Err(HeaderError::Duplicate("To"))
        );
        assert_eq!(
            summarize(b"Message-ID: not-an-id\r\n\r\n"),
            Err(HeaderError::MessageId)
        );
        assert!(matches!(
            summarize(b"To: Mario Rossi\r\n\r\n"),
            Err(HeaderError::Address { .. })
        ));
    }

    #[test]
    fn generated_headers() {
        use std::time::{Duration, UNIX_EPOCH};
        let t = UNIX_EPOCH + Duration::from_secs(1_795_381_503); // 2026-11-22 21:05:03 UTC
        assert_eq!(rfc5322_date(t), "Sun, 22 Nov 2026 21:05:03 +0000");
        let id = generate_message_id("studio@pec.it", t);
        assert!(
            id.starts_with("<pecgate.1795381503.") && id.ends_with("@pec.it>"),
            "{id}"
        );
        assert_eq!(parse_message_id(id.as_bytes()), Some(id.clone()));
        let prefix = String::from_utf8(relay_prefix("gw", "abc", Some(&id), t)).unwrap();
        assert_eq!(
            prefix,
            format!(
                "Received: by gw (pecgate) with ESMTPSA id abc;\r\n\tSun, 22 Nov 2026 21:05:03 +0000\r\nMessage-ID: {id}\r\n"
            )
        );
        let fields = split_fields(prefix.as_bytes()).unwrap();
        assert_eq!(fields.len(), 2);
    }

    #[test]
    fn message_ids() {
        assert_eq!(
            parse_message_id(b" <a.b@c.d> ").as_deref(),
            Some("<a.b@c.d>")
        );
        assert_eq!(
            parse_message_id(b"<a@[1.2.3.4]>").as_deref(),
            Some("<a@[1.2.3.4]>")
        );
        for bad in [&b"a@b"[..], b"<ab>", b"<a@b> <c@d>", b"<a b@c>", b"<@b>"] {
            assert_eq!(
                parse_message_id(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
