//! Parsing, classification and re-encoding of client commands, free of I/O.
//!
//! Every client command is parsed with imap-codec before anything reaches the provider. What is
//! forwarded is the *re-encoding of the parsed command*, never the client's bytes: whatever the
//! parser did not understand cannot be smuggled upstream (see `docs/ARCHITECTURE.md`).
//!
//! An APPEND's message is the one literal that is not buffered: [`append_skeleton`] recognises
//! a command head that ends with the announcement of that literal by parsing the head with an
//! empty literal in its place, so the head is parsed just as strictly as any other command.

use imap_codec::CommandCodec;
use imap_codec::decode::{CommandDecodeError, Decoder};
use imap_codec::encode::{Encoder, Fragment};
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::mailbox::Mailbox;

use imap_codec::imap_types::IntoStatic;

use super::classify::{classify, is_uid, mailboxes_mut};
use super::framing::{LiteralHeader, literal_at_end};

/// Why a command could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("the command is not valid IMAP")]
    Invalid,
    #[error("unexpected bytes after the command")]
    TrailingBytes,
}

/// Parse one complete command (as assembled by the framer, literals included).
pub fn parse_command(bytes: &[u8]) -> Result<Command<'static>, ParseError> {
    match CommandCodec::default().decode_static(bytes) {
        Ok((&[], command)) => Ok(command),
        Ok(_) => Err(ParseError::TrailingBytes),
        Err(CommandDecodeError::Incomplete | CommandDecodeError::LiteralFound { .. }) => {
            Err(ParseError::Invalid)
        }
        Err(CommandDecodeError::Failed) => Err(ParseError::Invalid),
    }
}

/// If `head` (a command up to and including a literal announcement) is an APPEND whose message
/// is that literal, return the command parsed with an empty message in its place.
pub fn append_skeleton(head: &[u8], _literal: &LiteralHeader) -> Option<Command<'static>> {
    // Cheap filter first: the decoder is not run for every literal of every command.
    let first_line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let first_line = &head[..first_line_end];
    let has_append = first_line
        .split(|&b| b == b' ')
        .nth(1)
        .is_some_and(|word| word.eq_ignore_ascii_case(b"APPEND"));
    if !has_append {
        return None;
    }
    let line_start = head[..head.len().saturating_sub(1)]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    // The announcement's position within its own line (the caller's header may have been
    // computed on a different slice).
    let literal = literal_at_end(&head[line_start..])?;
    let mut skeleton = head[..line_start + literal.start].to_vec();
    skeleton.extend_from_slice(b"{0}\r\n\r\n");
    match parse_command(&skeleton) {
        Ok(command) if matches!(command.body, CommandBody::Append { .. }) => Some(command),
        _ => None,
    }
}

/// One step of sending a command to the provider.
#[derive(Debug, PartialEq, Eq)]
pub enum UpstreamStep {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Wait for the provider's `+` continuation before going on (synchronising literal).
    AwaitContinuation,
}

/// How the re-encoded command is sent: every literal uses LITERAL+ when the provider offers
/// it (no round trip), else a synchronising literal and a wait for the provider's `+`.
pub fn upstream_steps(command: &Command<'_>, literal_plus: bool) -> Vec<UpstreamStep> {
    let mut steps = Vec::new();
    let mut pending = Vec::new();
    let fragments: Vec<Fragment> = CommandCodec::default().encode(command).collect();
    let mut fragments = fragments.into_iter().peekable();
    while let Some(fragment) = fragments.next() {
        match fragment {
            Fragment::Line { mut data } => {
                if matches!(fragments.peek(), Some(Fragment::Literal { .. })) {
                    set_literal_mode(&mut data, literal_plus);
                    pending.extend_from_slice(&data);
                    if !literal_plus {
                        steps.push(UpstreamStep::Send(std::mem::take(&mut pending)));
                        steps.push(UpstreamStep::AwaitContinuation);
                    }
                } else {
                    pending.extend_from_slice(&data);
                }
            }
            Fragment::Literal { data, .. } => pending.extend_from_slice(&data),
        }
    }
    if !pending.is_empty() {
        steps.push(UpstreamStep::Send(pending));
    }
    steps
}

/// The steps for an APPEND head (the skeleton from [`append_skeleton`]) announcing a message of
/// `length` bytes. After them the caller streams the message and then sends `\r\n`.
pub fn append_head_steps(
    skeleton: &Command<'_>,
    length: u32,
    literal_plus: bool,
) -> Vec<UpstreamStep> {
    let mut steps = upstream_steps(skeleton, literal_plus);
    // The skeleton encodes as `... {0}\r\n` + `` + `\r\n`: drop the final CRLF and put the
    // real length into the last announcement.
    let mut last = match steps.pop() {
        Some(UpstreamStep::Send(bytes)) => bytes,
        _ => unreachable!("an APPEND encodes to a final line"),
    };
    if literal_plus {
        debug_assert!(last.ends_with(b"{0+}\r\n\r\n"));
        last.truncate(last.len() - b"{0+}\r\n\r\n".len());
        last.extend_from_slice(format!("{{{length}+}}\r\n").as_bytes());
        steps.push(UpstreamStep::Send(last));
    } else {
        // Without LITERAL+ the last steps are [Send(.. {0}\r\n), Await, Send(\r\n)].
        debug_assert_eq!(last, b"\r\n");
        let Some(UpstreamStep::AwaitContinuation) = steps.pop() else {
            unreachable!("a synchronising literal is followed by a wait")
        };
        let Some(UpstreamStep::Send(mut head)) = steps.pop() else {
            unreachable!("a literal is announced by a line")
        };
        debug_assert!(head.ends_with(b"{0}\r\n"));
        head.truncate(head.len() - b"{0}\r\n".len());
        head.extend_from_slice(format!("{{{length}}}\r\n").as_bytes());
        steps.push(UpstreamStep::Send(head));
        steps.push(UpstreamStep::AwaitContinuation);
    }
    steps
}

/// Rewrite the literal announcement that ends `line` to the wanted mode.
fn set_literal_mode(line: &mut Vec<u8>, non_sync: bool) {
    let body_end = line.len() - 3; // index of `}` before CRLF
    debug_assert_eq!(&line[body_end..], b"}\r\n");
    let has_plus = line[body_end - 1] == b'+';
    match (has_plus, non_sync) {
        (true, false) => {
            line.remove(body_end - 1);
        }
        (false, true) => line.insert(body_end, b'+'),
        _ => {}
    }
}

/// What the audit log records about a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSummary {
    /// Command name as a client would write it, e.g. `UID FETCH`.
    pub name: String,
    /// The mailbox the command names (target), if any.
    pub folder: Option<String>,
    /// Arguments, printable, never a password or a message body.
    pub detail: String,
}

/// Longest `detail` stored: arguments beyond this are elided (a search with a huge literal).
const MAX_DETAIL: usize = 1024;

/// Summarise a parsed command for the audit log.
pub fn summarize(command: &Command<'_>) -> CommandSummary {
    let body = &command.body;
    let uid = is_uid(body);
    let name = if uid {
        format!("UID {}", body.name())
    } else {
        body.name().to_owned()
    };
    let folder = target_mailbox(body);
    let detail = match body {
        // Never the password, and the user name is the session's own column.
        CommandBody::Login { .. } => String::new(),
        CommandBody::Authenticate { mechanism, .. } => mechanism.to_string(),
        CommandBody::Append { flags, date, .. } => {
            let mut detail = format!("flags=({})", join_flags(flags));
            if let Some(date) = date {
                detail.push_str(&format!(" date={:?}", date.as_ref().to_rfc3339()));
            }
            detail
        }
        _ => arguments_text(command, uid),
    };
    CommandSummary {
        name,
        folder,
        detail,
    }
}

/// The folder a command targets, for the audit log: its first mailbox name (COPY/MOVE's
/// destination, RENAME's source), in wire form.
fn target_mailbox(body: &CommandBody<'_>) -> Option<String> {
    // Most commands (FETCH, STORE, SEARCH…) name no folder: no copy of them is made.
    if classify(body).names.is_empty() {
        return None;
    }
    let mut body = body.clone().into_static();
    mailboxes_mut(&mut body).first().map(|m| mailbox_name(m))
}

fn join_flags(flags: &[imap_codec::imap_types::flag::Flag<'_>]) -> String {
    flags
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The arguments as they would be sent, made printable: literals inlined, CRLFs folded.
fn arguments_text(command: &Command<'_>, uid: bool) -> String {
    let encoded = CommandCodec::default().encode(command).dump();
    let skip_words = if uid { 3 } else { 2 };
    let mut start = 0;
    for _ in 0..skip_words {
        match encoded[start..].iter().position(|&b| b == b' ') {
            Some(p) => start += p + 1,
            None => return String::new(),
        }
    }
    let arguments = &encoded[start..];
    let arguments = arguments.strip_suffix(b"\r\n").unwrap_or(arguments);
    crate::text::printable(arguments, MAX_DETAIL)
}

/// A mailbox name as the client wrote it on the wire (modified UTF-7); `INBOX` in any case
/// becomes `INBOX`.
pub fn wire_name(mailbox: &Mailbox<'_>) -> Vec<u8> {
    match mailbox {
        Mailbox::Inbox => b"INBOX".to_vec(),
        Mailbox::Other(other) => other.as_ref().to_vec(),
    }
}

/// A folder name as an IMAP quoted string, for pecgate's own commands: the name is ASCII
/// without control characters (from the configuration, checked, modified-UTF-7 encoded, or a
/// wire name checked quotable by the caller).
pub fn quoted(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A mailbox name as text, in its wire form, escaped (for the audit log and logs): a name
/// given as a literal may hold CR or LF.
pub fn mailbox_name(mailbox: &Mailbox<'_>) -> String {
    crate::text::printable(&wire_name(mailbox), 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps_text(steps: &[UpstreamStep]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                UpstreamStep::Send(b) => String::from_utf8_lossy(b).into_owned(),
                UpstreamStep::AwaitContinuation => "<wait>".to_owned(),
            })
            .collect()
    }

    #[test]
    fn quoted_escapes_quotes_and_backslashes() {
        assert_eq!(quoted("Ric\"e\\vute"), "\"Ric\\\"e\\\\vute\"");
    }

    #[test]
    fn parses_and_rejects() {
        assert!(parse_command(b"a1 NOOP\r\n").is_ok());
        assert!(parse_command(b"a1 UID FETCH 1:* (FLAGS)\r\n").is_ok());
        assert!(parse_command(b"a1 SELECT {5}\r\nINBOX\r\n").is_ok());
        assert_eq!(parse_command(b"a1 FROB\r\n"), Err(ParseError::Invalid));
        assert_eq!(
            parse_command(b"a1 NOOP extra\r\n"),
            Err(ParseError::Invalid)
        );
        assert_eq!(
            parse_command(b"a1 NOOP\r\na2 NOOP\r\n"),
            Err(ParseError::TrailingBytes)
        );
        assert_eq!(
            parse_command(b"a1 FETCH 1 (FLAGS\r\n"),
            Err(ParseError::Invalid)
        );
    }

    #[test]
    fn forwarding_re_encodes_literals_for_the_provider() {
        let cmd = parse_command(b"a SELECT {5+}\r\nIN\"OX\r\n").unwrap();
        assert_eq!(
            steps_text(&upstream_steps(&cmd, false)),
            ["a SELECT {5}\r\n", "<wait>", "IN\"OX\r\n"]
        );
        assert_eq!(
            steps_text(&upstream_steps(&cmd, true)),
            ["a SELECT {5+}\r\nIN\"OX\r\n"]
        );
        let plain = parse_command(b"b uid fetch 1:3 (flags)\r\n").unwrap();
        assert_eq!(
            steps_text(&upstream_steps(&plain, false)),
            ["b UID FETCH 1:3 FLAGS\r\n"]
        );
    }

    #[test]
    fn append_skeleton_recognises_only_the_message_literal() {
        let head = b"a APPEND Sent (\\Seen) {1000}\r\n";
        let lit = literal_at_end(head).unwrap();
        let skeleton = append_skeleton(head, &lit).expect("an APPEND message");
        assert_eq!(summarize(&skeleton).folder.as_deref(), Some("Sent"));
        assert_eq!(
            steps_text(&append_head_steps(&skeleton, 1000, true)),
            ["a APPEND Sent (\\Seen) {1000+}\r\n"]
        );
        assert_eq!(
            steps_text(&append_head_steps(&skeleton, 1000, false)),
            ["a APPEND Sent (\\Seen) {1000}\r\n", "<wait>"]
        );

        // A mailbox name given as a literal is not the message.
        let head = b"a APPEND {4}\r\n";
        assert!(append_skeleton(head, &literal_at_end(head).unwrap()).is_none());
        let head = b"a APPEND {4}\r\nSent {12+}\r\n";
        let skeleton = append_skeleton(head, &literal_at_end(head).unwrap()).unwrap();
        assert_eq!(
            steps_text(&append_head_steps(&skeleton, 12, false)),
            ["a APPEND {4}\r\n", "<wait>", "Sent {12}\r\n", "<wait>"]
        );
        // Not an APPEND, or a malformed one.
        let head = b"a SEARCH TEXT {4}\r\n";
        assert!(append_skeleton(head, &literal_at_end(head).unwrap()).is_none());
        let head = b"a APPEND Sent (\\Bogus \" {4}\r\n";
        assert!(append_skeleton(head, &literal_at_end(head).unwrap()).is_none());
    }

    #[test]
    fn summaries_never_hold_secrets() {
        let login = parse_command(b"a LOGIN mario s3cret\r\n").unwrap();
        let s = summarize(&login);
        assert_eq!(s.name, "LOGIN");
        assert!(!s.detail.contains("s3cret"));
        let fetch = parse_command(b"a UID FETCH 1:5 (BODY.PEEK[] FLAGS)\r\n").unwrap();
        let s = summarize(&fetch);
        assert_eq!(s.name, "UID FETCH");
        assert_eq!(s.detail, "1:5 (BODY.PEEK[] FLAGS)");
        let mv = parse_command(b"a UID MOVE 7 Archive\r\n").unwrap();
        let s = summarize(&mv);
        assert_eq!(
            (s.name.as_str(), s.folder.as_deref()),
            ("UID MOVE", Some("Archive"))
        );
        let append = parse_command(b"a APPEND INBOX (\\Seen) {3}\r\nabc\r\n").unwrap();
        assert!(!summarize(&append).detail.contains("abc"));
    }
}
