//! Byte-level framing of IMAP traffic, free of I/O.
//!
//! IMAP is line based, except that a line may end with a *literal announcement* (`{42}`,
//! `{42+}` or `~{42}`) after which exactly that many raw bytes follow, and then the line goes
//! on. This module finds those boundaries. It never interprets a command: that is
//! [`super::command`]'s job, and it happens only once a command has been framed here.
//!
//! Two consumers:
//! - [`CommandAssembler`] gathers one client command at a time. Small literals (mailbox names,
//!   search strings) are buffered so the whole command can be parsed before anything is
//!   forwarded; the one literal that may be large, an APPEND's message, is reported as
//!   [`Assembled::MessageLiteral`] so the session can stream it instead of holding it.
//! - The response relay uses [`find_line_end`] and [`literal_at_end`] on upstream bytes.
//!
//! Invariant: every buffer here is bounded by a limit given by the caller; exceeding it is a
//! [`FramingError`], never an allocation that grows with the peer's input.

use bytes::{Buf, BytesMut};

pub use crate::io::find_line_end;

/// A literal announced at the end of a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiteralHeader {
    /// Number of raw bytes that follow the line ending.
    pub length: u32,
    /// `{n}`: the sender waits for a `+` continuation before sending the bytes.
    /// `{n+}` (LITERAL+) is non-synchronising: the bytes follow at once.
    pub sync: bool,
    /// `~{n}`: a BINARY literal8, which may contain NUL bytes.
    pub binary: bool,
    /// Offset in the line where the announcement (`{` or `~`) starts.
    pub start: usize,
}

/// The literal announcement at the end of `line` (which includes its line ending), if any.
///
/// Lines end with CRLF in IMAP; a bare LF is tolerated because some clients send it and the
/// command is re-encoded before it is forwarded anyway.
pub fn literal_at_end(line: &[u8]) -> Option<LiteralHeader> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner_end = line.len().checked_sub(1)?;
    if line[inner_end] != b'}' {
        return None;
    }
    let open = line.iter().rposition(|&b| b == b'{')?;
    let mut digits = &line[open + 1..inner_end];
    let mut sync = true;
    if let Some(rest) = digits.strip_suffix(b"+") {
        digits = rest;
        sync = false;
    }
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 10 ASCII digits: fits in u64; IMAP numbers are 32-bit.
    let value: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let length = u32::try_from(value).ok()?;
    let binary = open > 0 && line[open - 1] == b'~';
    let start = if binary { open - 1 } else { open };
    Some(LiteralHeader {
        length,
        sync,
        binary,
        start,
    })
}

/// Limits for [`CommandAssembler`].
#[derive(Clone, Copy, Debug)]
pub struct CommandLimits {
    /// Longest single line (without literals) accepted from a client.
    pub max_line: usize,
    /// Largest literal that is buffered (anything but an APPEND message).
    pub max_literal: u32,
    /// Largest whole command (lines plus buffered literals).
    pub max_command: usize,
}

impl Default for CommandLimits {
    fn default() -> Self {
        CommandLimits {
            max_line: 64 * 1024,
            max_literal: 64 * 1024,
            max_command: 256 * 1024,
        }
    }
}

/// What [`CommandAssembler::poll`] found in the buffered input.
#[derive(Debug, PartialEq, Eq)]
pub enum Assembled {
    /// More input is needed.
    NeedMore,
    /// The client announced a synchronising literal that will be buffered: send it a `+`
    /// continuation, then poll again as bytes arrive.
    SendContinuation,
    /// A complete command, literals included, ready to be parsed.
    Command(Vec<u8>),
    /// The command so far ends with the announcement of a literal that the caller's
    /// classifier said must be streamed (an APPEND message). `head` holds every byte up to and
    /// including that announcement's line; the literal's bytes are still in the buffer or yet
    /// to come. After streaming them, the caller reads the rest of the command's line.
    MessageLiteral {
        head: Vec<u8>,
        literal: LiteralHeader,
    },
    /// The command was refused while framing; the literal's bytes (if the client sends them
    /// without waiting) have been or will be discarded. `tag` is what the client sent, if it
    /// is usable for a tagged answer.
    Refused {
        tag: Option<String>,
        reason: Refusal,
    },
}

/// Why a command was refused by the framer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    LineTooLong,
    LiteralTooLarge,
    CommandTooLarge,
    BinaryLiteral,
}

impl Refusal {
    /// Text for the client's BAD answer.
    pub fn text(self) -> &'static str {
        match self {
            Refusal::LineTooLong => "Command line too long",
            Refusal::LiteralTooLarge => "Literal too large for this command",
            Refusal::CommandTooLarge => "Command too large",
            Refusal::BinaryLiteral => "BINARY literals are not supported",
        }
    }
}

/// Incremental assembly of one client command at a time.
#[derive(Debug, Default)]
pub struct CommandAssembler {
    limits: CommandLimits,
    /// Bytes of the current command gathered so far.
    command: Vec<u8>,
    /// A literal being buffered: bytes still expected.
    literal_remaining: u32,
    /// Bytes of a refused non-synchronising literal still to be thrown away.
    discard_remaining: u64,
    /// The pending refusal to report once discarding is done.
    pending_refusal: Option<(Option<String>, Refusal)>,
}

impl CommandAssembler {
    pub fn new(limits: CommandLimits) -> Self {
        CommandAssembler {
            limits,
            ..Default::default()
        }
    }

    /// True when no command is partly assembled (the session is between commands).
    pub fn is_idle(&self) -> bool {
        self.command.is_empty() && self.discard_remaining == 0 && self.pending_refusal.is_none()
    }

    /// Consume what it can from `input`. `streams` decides, for a command head that ends with
    /// a literal announcement, whether that literal is a message to stream rather than buffer.
    pub fn poll(
        &mut self,
        input: &mut BytesMut,
        streams: impl Fn(&[u8], &LiteralHeader) -> bool,
    ) -> Assembled {
        loop {
            if self.discard_remaining > 0 {
                let n = self.discard_remaining.min(input.len() as u64) as usize;
                input.advance(n);
                self.discard_remaining -= n as u64;
                if self.discard_remaining > 0 {
                    return Assembled::NeedMore;
                }
            }
            if let Some((tag, reason)) = self.pending_refusal.take() {
                // After a refused literal the rest of the client's line is garbage to us:
                // skip it so the next command starts clean.
                match find_line_end(input, 0) {
                    Some(end) => input.advance(end),
                    None => {
                        if input.len() > self.limits.max_line {
                            input.clear();
                        }
                        self.pending_refusal = Some((tag, reason));
                        return Assembled::NeedMore;
                    }
                }
                return Assembled::Refused { tag, reason };
            }
            if self.literal_remaining > 0 {
                let n = (self.literal_remaining as usize).min(input.len());
                self.command.extend_from_slice(&input[..n]);
                input.advance(n);
                self.literal_remaining -= n as u32;
                if self.literal_remaining > 0 {
                    return Assembled::NeedMore;
                }
                continue;
            }
            let Some(end) = find_line_end(input, 0) else {
                if input.len() > self.limits.max_line {
                    return self.refuse_unterminated_line(input);
                }
                return Assembled::NeedMore;
            };
            if end > self.limits.max_line {
                let tag = tag_of(&self.command, &input[..end]);
                input.advance(end);
                self.reset();
                return Assembled::Refused {
                    tag,
                    reason: Refusal::LineTooLong,
                };
            }
            let line = input.split_to(end);
            let literal = literal_at_end(&line);
            self.command.extend_from_slice(&line);
            let Some(literal) = literal else {
                let command = std::mem::take(&mut self.command);
                self.reset();
                return Assembled::Command(command);
            };
            if literal.binary {
                match self.refuse_literal(literal, Refusal::BinaryLiteral) {
                    Some(refused) => return refused,
                    None => continue,
                }
            }
            if streams(&self.command, &literal) {
                let head = std::mem::take(&mut self.command);
                self.reset();
                return Assembled::MessageLiteral { head, literal };
            }
            if literal.length > self.limits.max_literal {
                match self.refuse_literal(literal, Refusal::LiteralTooLarge) {
                    Some(refused) => return refused,
                    None => continue,
                }
            }
            if self.command.len() + literal.length as usize > self.limits.max_command {
                match self.refuse_literal(literal, Refusal::CommandTooLarge) {
                    Some(refused) => return refused,
                    None => continue,
                }
            }
            self.literal_remaining = literal.length;
            if literal.sync {
                return Assembled::SendContinuation;
            }
        }
    }

    /// Refuse the command whose literal was just announced. A synchronising literal is never
    /// sent (the client waits for a `+`): the refusal is the answer. A non-synchronising one is
    /// on its way: `None`, and the caller's loop goes on discarding it (its bytes may already
    /// be buffered, so the caller must not wait for more input first).
    fn refuse_literal(&mut self, literal: LiteralHeader, reason: Refusal) -> Option<Assembled> {
        let tag = tag_of(&self.command, &[]);
        self.reset();
        if literal.sync {
            Some(Assembled::Refused { tag, reason })
        } else {
            self.discard_remaining = u64::from(literal.length);
            self.pending_refusal = Some((tag, reason));
            None
        }
    }

    fn refuse_unterminated_line(&mut self, input: &mut BytesMut) -> Assembled {
        let tag = tag_of(&self.command, input);
        input.clear();
        self.reset();
        // Skip the rest of this over-long line when it finally ends.
        self.pending_refusal = Some((tag, Refusal::LineTooLong));
        Assembled::NeedMore
    }

    fn reset(&mut self) {
        self.command.clear();
        self.literal_remaining = 0;
    }
}

/// The tag at the start of a command, if it is a valid IMAP tag (so that it can be echoed).
pub fn tag_of(command: &[u8], line: &[u8]) -> Option<String> {
    let source = if command.is_empty() { line } else { command };
    let end = source.iter().position(|&b| b == b' ')?;
    let tag = &source[..end];
    let valid =
        !tag.is_empty() && tag.len() <= 64 && tag.iter().all(|&b| is_astring_char(b) && b != b'+');
    valid.then(|| String::from_utf8_lossy(tag).into_owned())
}

/// ASTRING-CHAR of RFC 3501 (ATOM-CHAR or `]`).
fn is_astring_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: &[u8], _: &LiteralHeader) -> bool {
        false
    }

    fn append_streams(head: &[u8], _: &LiteralHeader) -> bool {
        head.windows(7).any(|w| w.eq_ignore_ascii_case(b"APPEND "))
    }

    #[test]
    fn literal_announcements() {
        type Case<'a> = (&'a [u8], Option<(u32, bool, bool)>);
        let cases: &[Case] = &[
            (b"a LOGIN {5}\r\n", Some((5, true, false))),
            (b"a LOGIN {5+}\r\n", Some((5, false, false))),
            (b"a APPEND x ~{7}\r\n", Some((7, true, true))),
            (b"a APPEND x {0}\n", Some((0, true, false))),
            (b"a NOOP\r\n", None),
            (b"a SEARCH \"{5}\"\r\n", None),
            (b"a X {}\r\n", None),
            (b"a X {5a}\r\n", None),
            (b"a X {99999999999}\r\n", None),
            (b"a X {4294967296}\r\n", None),
            (b"a X {4294967295}\r\n", Some((u32::MAX, true, false))),
            (b"a X {5}", None),
        ];
        for (line, want) in cases {
            let got = literal_at_end(line).map(|l| (l.length, l.sync, l.binary));
            assert_eq!(got, *want, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn assembles_split_and_pipelined_input() {
        let mut asm = CommandAssembler::new(CommandLimits::default());
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"a1 NO");
        assert_eq!(asm.poll(&mut buf, never), Assembled::NeedMore);
        buf.extend_from_slice(b"OP\r\na2 SELECT INBOX\r\na3 ");
        assert_eq!(
            asm.poll(&mut buf, never),
            Assembled::Command(b"a1 NOOP\r\n".to_vec())
        );
        assert_eq!(
            asm.poll(&mut buf, never),
            Assembled::Command(b"a2 SELECT INBOX\r\n".to_vec())
        );
        assert_eq!(asm.poll(&mut buf, never), Assembled::NeedMore);
        assert!(!buf.is_empty());
        buf.extend_from_slice(b"LOGOUT\r\n");
        assert_eq!(
            asm.poll(&mut buf, never),
            Assembled::Command(b"a3 LOGOUT\r\n".to_vec())
        );
        assert!(asm.is_idle());
    }

    #[test]
    fn synchronising_literal_asks_for_continuation() {
        let mut asm = CommandAssembler::new(CommandLimits::default());
        let mut buf = BytesMut::from(&b"a SELECT {5}\r\n"[..]);
        assert_eq!(asm.poll(&mut buf, never), Assembled::SendContinuation);
        assert_eq!(asm.poll(&mut buf, never), Assembled::NeedMore);
        buf.extend_from_slice(b"IN");
        assert_eq!(asm.poll(&mut buf, never), Assembled::NeedMore);
        buf.extend_from_slice(b"BOX\r\n");
        assert_eq!(
            asm.poll(&mut buf, never),
            Assembled::Command(b"a SELECT {5}\r\nINBOX\r\n".to_vec())
        );
    }

    #[test]
    fn non_synchronising_literal_needs_no_continuation() {
        let mut asm = CommandAssembler::new(CommandLimits::default());
        let mut buf = BytesMut::from(&b"a SELECT {5+}\r\nINBOX\r\nb NOOP\r\n"[..]);
        assert_eq!(
            asm.poll(&mut buf, never),
            Assembled::Command(b"a SELECT {5+}\r\nINBOX\r\n".to_vec())
        );
        assert_eq!(
            asm.poll(&mut buf, never),
            Assembled::Command(b"b NOOP\r\n".to_vec())
        );
    }

    #[test]
    fn message_literal_is_handed_over_for_streaming() {
        let mut asm = CommandAssembler::new(CommandLimits::default());
        let mut buf = BytesMut::from(&b"a APPEND {5}\r\n"[..]);
        // The mailbox-name literal is buffered (the classifier says no for it here).
        let classify = |head: &[u8], l: &LiteralHeader| append_streams(head, l) && head.len() > 20;
        assert_eq!(asm.poll(&mut buf, classify), Assembled::SendContinuation);
        buf.extend_from_slice(b"INBOX {3000000}\r\nFrom:");
        match asm.poll(&mut buf, classify) {
            Assembled::MessageLiteral { head, literal } => {
                assert_eq!(head, b"a APPEND {5}\r\nINBOX {3000000}\r\n");
                assert_eq!(literal.length, 3_000_000);
                assert!(literal.sync);
            }
            other => panic!("unexpected {other:?}"),
        }
        // The literal's first bytes stay in the buffer for the streamer.
        assert_eq!(&buf[..], b"From:");
    }

    #[test]
    fn oversized_sync_literal_is_refused_before_the_client_sends_it() {
        let mut asm = CommandAssembler::new(CommandLimits::default());
        let mut buf = BytesMut::from(&b"t1 SEARCH TEXT {100000000}\r\n"[..]);
        assert_eq!(
            asm.poll(&mut buf, never),
            Assembled::Refused {
                tag: Some("t1".into()),
                reason: Refusal::LiteralTooLarge
            }
        );
        assert!(asm.is_idle());
    }

    #[test]
    fn oversized_non_sync_literal_is_discarded_then_refused() {
        let limits = CommandLimits {
            max_literal: 4,
            ..CommandLimits::default()
        };
        let mut asm = CommandAssembler::new(limits);
        let mut buf = BytesMut::from(&b"t1 SEARCH TEXT {10+}\r\n0123"[..]);
        assert_eq!(asm.poll(&mut buf, never), Assembled::NeedMore);
        buf.extend_from_slice(b"456789 UNSEEN\r\nt2 NOOP\r\n");
        assert_eq!(
            asm.poll(&mut buf, never),
            Assembled::Refused {
                tag: Some("t1".into()),
                reason: Refusal::LiteralTooLarge
            }
        );
        assert_eq!(
            asm.poll(&mut buf, never),
            Assembled::Command(b"t2 NOOP\r\n".to_vec())
        );
    }

    #[test]
    fn over_long_line_is_refused_and_skipped() {
        let limits = CommandLimits {
            max_line: 16,
            ..CommandLimits::default()
        };
        let mut asm = CommandAssembler::new(limits);
        let mut buf = BytesMut::from(&b"x1 SEARCH 1234567890123456789"[..]);
        assert_eq!(asm.poll(&mut buf, never), Assembled::NeedMore);
        assert!(buf.is_empty(), "an over-long line is not kept in memory");
        buf.extend_from_slice(b"0000\r\nx2 NOOP\r\n");
        assert_eq!(
            asm.poll(&mut buf, never),
            Assembled::Refused {
                tag: Some("x1".into()),
                reason: Refusal::LineTooLong
            }
        );
        assert_eq!(
            asm.poll(&mut buf, never),
            Assembled::Command(b"x2 NOOP\r\n".to_vec())
        );
    }

    #[test]
    fn binary_literal_is_refused() {
        let mut asm = CommandAssembler::new(CommandLimits::default());
        let mut buf = BytesMut::from(&b"b APPEND INBOX ~{5}\r\n"[..]);
        assert_eq!(
            asm.poll(&mut buf, append_streams),
            Assembled::Refused {
                tag: Some("b".into()),
                reason: Refusal::BinaryLiteral
            }
        );
    }

    #[test]
    fn refused_non_sync_literal_already_buffered_does_not_stall() {
        // The whole refused command and the next one arrive in one read: both are answered
        // without waiting for more input.
        let mut a = CommandAssembler::new(CommandLimits {
            max_literal: 4,
            ..CommandLimits::default()
        });
        let mut input = BytesMut::from(&b"a SELECT {10+}\r\n0123456789\r\nb NOOP\r\n"[..]);
        assert_eq!(
            a.poll(&mut input, never),
            Assembled::Refused {
                tag: Some("a".into()),
                reason: Refusal::LiteralTooLarge
            }
        );
        assert_eq!(
            a.poll(&mut input, never),
            Assembled::Command(b"b NOOP\r\n".to_vec())
        );
    }

    #[test]
    fn tags() {
        assert_eq!(tag_of(b"", b"a1 NOOP\r\n"), Some("a1".into()));
        assert_eq!(tag_of(b"", b"a{1 NOOP\r\n"), None);
        assert_eq!(tag_of(b"", b"+ NOOP\r\n"), None);
        assert_eq!(tag_of(b"", b"NOOP\r\n"), None);
    }
}
