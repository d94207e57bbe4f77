//! pecgate's side of the conversation with the provider, free of I/O.
//!
//! The provider only ever hears pecgate's own words: commands pecgate encoded from what it
//! parsed, under pecgate's own tags ([`next_tag`]: `c1`, `c2`, … unique in the process, so an
//! audit row's `upstream=` names one provider command), literals announced the way pecgate
//! counts them (LITERAL+ when the provider offers it, else synchronising with a wait for the
//! provider's `+`), and `DONE` only while the provider idles.
//!
//! Every line the provider sends is attributed here ([`ProviderClient::on_line`]): a tagged
//! response must answer a tag that is in flight, a `+` must answer a wait pecgate registered,
//! an untagged response must be one of the kinds pecgate knows. Anything else is a
//! [`ProviderEvent::Violation`]: the caller ends the provider session rather than relay
//! what it cannot attribute.

use std::sync::atomic::{AtomicU64, Ordering};

use imap_codec::imap_types::command::Command;

use super::command::{UpstreamStep, append_head_steps, upstream_steps};
use super::response::{self, ResponseKind, Status};

/// A fresh upstream tag, never used before by this process.
pub fn next_tag() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("c{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Untagged responses pecgate knows how to relay or filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untagged {
    /// `* OK|NO|BAD ...` (a response code may carry capabilities).
    State,
    Bye,
    Capability,
    List,
    Lsub,
    Status,
    /// `* n FETCH ...`.
    Fetch,
    /// `* n EXISTS|RECENT|EXPUNGE`, `* FLAGS`, `* SEARCH`, `* ESEARCH`, `* NAMESPACE`.
    Other,
}

/// What one provider line is, once attributed.
#[derive(Debug, PartialEq, Eq)]
pub enum ProviderEvent {
    /// A `+` for the wait registered under this tag.
    Continuation {
        tag: String,
    },
    /// The completion of an in-flight command; `text` is the line after the tag (`OK ...`).
    Completed {
        tag: String,
        status: Status,
        text: Vec<u8>,
    },
    Untagged(Untagged),
    /// Something pecgate did not ask for or does not understand.
    Violation(String),
}

/// The provider conversation of one connection.
#[derive(Debug)]
pub struct ProviderClient {
    literal_plus: bool,
    /// Tags sent and not completed, oldest first.
    in_flight: Vec<String>,
    /// The tag whose `+` is awaited (a synchronising literal or IDLE).
    awaiting: Option<String>,
    /// The tag of an IDLE the provider has accepted (`+` seen) and not yet completed.
    idling: Option<String>,
    /// An IDLE sent, its `+` not seen yet.
    idle_requested: Option<String>,
}

impl ProviderClient {
    pub fn new(literal_plus: bool) -> Self {
        ProviderClient {
            literal_plus,
            in_flight: Vec::new(),
            awaiting: None,
            idling: None,
            idle_requested: None,
        }
    }

    /// The steps that send `command` (already carrying its upstream tag).
    pub fn encode(&mut self, command: &Command<'_>) -> Vec<UpstreamStep> {
        let tag = command.tag.as_ref().to_owned();
        if matches!(
            command.body,
            imap_codec::imap_types::command::CommandBody::Idle
        ) {
            self.idle_requested = Some(tag.clone());
            self.awaiting = Some(tag.clone());
        }
        self.in_flight.push(tag);
        upstream_steps(command, self.literal_plus)
    }

    /// The steps that announce an APPEND message of `length` bytes; the caller streams the
    /// message after them and then sends `\r\n`.
    pub fn encode_append(&mut self, skeleton: &Command<'_>, length: u32) -> Vec<UpstreamStep> {
        self.in_flight.push(skeleton.tag.as_ref().to_owned());
        append_head_steps(skeleton, length, self.literal_plus)
    }

    /// Whether the provider owes an answer: a command is in flight and it is not an accepted
    /// IDLE (where silence is normal).
    pub fn owes_answer(&self) -> bool {
        !self.in_flight.is_empty() && self.idling.is_none()
    }

    /// Whether nothing at all is in flight (not even an IDLE): the connection is between
    /// commands, fit to be handed to another session.
    pub fn quiet(&self) -> bool {
        self.in_flight.is_empty() && self.awaiting.is_none() && self.idling.is_none()
    }

    /// Register that the next `+` answers the literal announcement of `tag` about to be sent.
    pub fn expect_continuation(&mut self, tag: &str) {
        self.awaiting = Some(tag.to_owned());
    }

    /// `DONE`, if the provider is idling; `None` otherwise (nothing is sent).
    pub fn done(&mut self) -> Option<&'static [u8]> {
        self.idling.take().map(|_| &b"DONE\r\n"[..])
    }

    /// Attribute the first line of a provider response.
    pub fn on_line(&mut self, line: &[u8]) -> ProviderEvent {
        match response::classify(line) {
            ResponseKind::Continuation => match self.awaiting.take() {
                Some(tag) => {
                    if self.idle_requested.as_ref() == Some(&tag) {
                        self.idle_requested = None;
                        self.idling = Some(tag.clone());
                    }
                    ProviderEvent::Continuation { tag }
                }
                None => ProviderEvent::Violation("a continuation nobody asked for".into()),
            },
            ResponseKind::Tagged { tag, status } => {
                let Some(position) = self.in_flight.iter().position(|t| t == tag) else {
                    return ProviderEvent::Violation(format!(
                        "a tagged response for tag {} that pecgate did not send",
                        crate::text::printable(tag.as_bytes(), 64)
                    ));
                };
                let tag = self.in_flight.remove(position);
                if self.awaiting.as_ref() == Some(&tag) {
                    self.awaiting = None;
                }
                if self.idling.as_ref() == Some(&tag) {
                    self.idling = None;
                }
                if self.idle_requested.as_ref() == Some(&tag) {
                    self.idle_requested = None;
                }
                let text = line[tag.len() + 1..].to_vec();
                ProviderEvent::Completed { tag, status, text }
            }
            ResponseKind::UntaggedStatus(Status::Bye) => ProviderEvent::Untagged(Untagged::Bye),
            ResponseKind::UntaggedStatus(Status::PreAuth) => {
                ProviderEvent::Violation("PREAUTH in an authenticated session".into())
            }
            ResponseKind::UntaggedStatus(_) => ProviderEvent::Untagged(Untagged::State),
            ResponseKind::UntaggedData => match untagged_kind(line) {
                Some(kind) => ProviderEvent::Untagged(kind),
                None => ProviderEvent::Violation(format!(
                    "an untagged response pecgate does not know: {}",
                    crate::text::printable(line, 80)
                )),
            },
            ResponseKind::Garbage => ProviderEvent::Violation(format!(
                "a line that is not IMAP: {}",
                crate::text::printable(line, 80)
            )),
        }
    }
}

/// The kind of an untagged data response, if pecgate knows it.
fn untagged_kind(line: &[u8]) -> Option<Untagged> {
    let mut words = line[2..].split(|&b| b == b' ' || b == b'\r' || b == b'\n');
    let first = words.next()?;
    let upper = |w: &[u8]| w.to_ascii_uppercase();
    if first.iter().all(u8::is_ascii_digit) && !first.is_empty() {
        return match upper(words.next()?).as_slice() {
            b"FETCH" => Some(Untagged::Fetch),
            b"EXISTS" | b"RECENT" | b"EXPUNGE" => Some(Untagged::Other),
            _ => None,
        };
    }
    match upper(first).as_slice() {
        b"CAPABILITY" => Some(Untagged::Capability),
        b"LIST" => Some(Untagged::List),
        b"LSUB" => Some(Untagged::Lsub),
        b"STATUS" => Some(Untagged::Status),
        b"FLAGS" | b"SEARCH" | b"ESEARCH" | b"NAMESPACE" => Some(Untagged::Other),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::command::parse_command;

    #[test]
    fn only_what_was_asked_is_attributed() {
        let mut provider = ProviderClient::new(true);
        assert!(matches!(
            provider.on_line(b"c1 OK done\r\n"),
            ProviderEvent::Violation(_)
        ));
        provider.encode(&parse_command(b"c7 NOOP\r\n").unwrap());
        assert!(matches!(
            provider.on_line(b"+ go\r\n"),
            ProviderEvent::Violation(_)
        ));
        assert_eq!(
            provider.on_line(b"* 3 EXISTS\r\n"),
            ProviderEvent::Untagged(Untagged::Other)
        );
        assert!(matches!(
            provider.on_line(b"* XYZZY 1\r\n"),
            ProviderEvent::Violation(_)
        ));
        assert!(matches!(
            provider.on_line(b"garbage\r\n"),
            ProviderEvent::Violation(_)
        ));
        assert_eq!(
            provider.on_line(b"c7 OK NOOP completed\r\n"),
            ProviderEvent::Completed {
                tag: "c7".into(),
                status: Status::Ok,
                text: b"OK NOOP completed\r\n".to_vec()
            }
        );
        // Completed once: the same tag again is not pecgate's.
        assert!(matches!(
            provider.on_line(b"c7 OK again\r\n"),
            ProviderEvent::Violation(_)
        ));
    }

    #[test]
    fn done_only_while_idling() {
        let mut provider = ProviderClient::new(true);
        assert_eq!(provider.done(), None);
        provider.encode(&parse_command(b"c9 IDLE\r\n").unwrap());
        assert_eq!(
            provider.done(),
            None,
            "the provider has not accepted IDLE yet"
        );
        assert_eq!(
            provider.on_line(b"+ idling\r\n"),
            ProviderEvent::Continuation { tag: "c9".into() }
        );
        assert_eq!(provider.done(), Some(&b"DONE\r\n"[..]));
        assert_eq!(provider.done(), None, "DONE is sent once");
        assert!(matches!(
            provider.on_line(b"c9 OK Idle completed\r\n"),
            ProviderEvent::Completed { .. }
        ));
    }

    #[test]
    fn synchronising_literal_waits_are_registered() {
        let mut provider = ProviderClient::new(false);
        let steps = provider.encode(&parse_command(b"c3 SELECT {5+}\r\nIN\"OX\r\n").unwrap());
        assert_eq!(steps.len(), 3);
        provider.expect_continuation("c3");
        assert_eq!(
            provider.on_line(b"+ OK\r\n"),
            ProviderEvent::Continuation { tag: "c3".into() }
        );
        assert!(matches!(
            provider.on_line(b"+ OK\r\n"),
            ProviderEvent::Violation(_)
        ));
    }

    #[test]
    fn tags_are_unique() {
        let a = next_tag();
        let b = next_tag();
        assert_ne!(a, b);
        assert!(a.starts_with('c') && a[1..].parse::<u64>().is_ok());
    }
}
