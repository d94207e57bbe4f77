//! The not-authenticated state of a client session, free of I/O.
//!
//! Before login nothing reaches the provider: CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE PLAIN
//! (with SASL-IR or one continuation), ID, NOOP and LOGOUT are answered here; anything else is
//! refused. Each decision says what to record in the audit log and what to answer; the driver
//! (`session.rs`) records login attempts first, then writes, and does the TLS handshake and the
//! credential check when told to. Everything else before login is counted in a [`Tally`] and
//! recorded as one row per connection; at most [`MAX_COMMANDS`] commands are served.

use base64::Engine;
use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::command::{Command, CommandBody};
use zeroize::Zeroizing;

use crate::audit::Outcome;
use crate::imap::command::summarize;

/// What to record about a command before it is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub command: String,
    pub detail: String,
    pub outcome: Outcome,
}

/// What the driver does with one client command before login.
#[derive(Debug)]
pub enum Step {
    /// Record, then write `reply`.
    Answer { event: Event, reply: String },
    /// Record, write `reply`, then the TLS handshake; anything the client pipelined in clear
    /// text is discarded (a man in the middle could have injected it).
    StartTls { event: Event, reply: String },
    /// Record, write `reply`, close.
    Logout { event: Event, reply: String },
    /// Send `+ ` and read one line: the SASL PLAIN response, for [`on_sasl_line`].
    SaslContinuation { tag: String },
    /// Check these credentials (the driver records and answers the result).
    LogIn {
        tag: String,
        command: &'static str,
        login: String,
        secret: Zeroizing<Vec<u8>>,
    },
}

/// Most commands a connection may send before logging in. Thunderbird and Outlook send three or
/// four; past this the connection is closed (`* BYE`), so nobody can keep a pre-login
/// connection busy for ever.
pub const MAX_COMMANDS: u32 = 32;

/// What one connection did before login. Login attempts are recorded one by one; everything
/// else before login (CAPABILITY, NOOP, ID, STARTTLS, refused input) only counts here, and
/// [`Tally::summary`] is the one row the connection leaves for it: a client cannot fill the
/// audit log (and so close it for everyone) without logging in.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub commands: u32,
    pub bytes: u64,
    pub tls: bool,
}

impl Tally {
    /// Count one command; false once the connection is over [`MAX_COMMANDS`].
    pub fn count(&mut self) -> bool {
        self.commands += 1;
        self.commands <= MAX_COMMANDS
    }

    /// The connection's one summary row, `ended` saying how the state ended.
    pub fn summary(&self, ended: &str) -> Event {
        Event {
            command: "preauth".into(),
            detail: format!(
                "commands={} bytes={} tls={} ended={ended}",
                self.commands,
                self.bytes,
                if self.tls { "yes" } else { "no" }
            ),
            outcome: if self.commands > MAX_COMMANDS {
                Outcome::Denied
            } else {
                Outcome::Ok
            },
        }
    }
}

/// Whether an event is recorded on its own (a login attempt) rather than only counted in the
/// connection's [`Tally`].
pub fn recorded_alone(event: &Event) -> bool {
    event.command == "LOGIN" || event.command == "AUTHENTICATE"
}

/// Capabilities offered before login.
pub fn capabilities(tls: bool) -> &'static str {
    if tls {
        "IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN"
    } else {
        "IMAP4rev1 LITERAL+ SASL-IR ID STARTTLS LOGINDISABLED"
    }
}

/// The greeting.
pub fn greeting(tls: bool) -> String {
    format!("* OK [CAPABILITY {}] pecgate ready\r\n", capabilities(tls))
}

/// A command the framer or the parser refused.
pub fn on_unparsed(tag: Option<&str>, text: &str, detail: String) -> Step {
    answer("(unparsed)", detail, Outcome::Bad, bad(tag, text))
}

/// One parsed command in the not-authenticated state.
pub fn on_command(command: Command<'static>, tls: bool) -> Step {
    let tag = command.tag.as_ref().to_owned();
    let name = command.body.name();
    let detail = summarize(&command).detail;
    match command.body {
        CommandBody::Capability => answer(
            name,
            String::new(),
            Outcome::Ok,
            format!(
                "* CAPABILITY {}\r\n{tag} OK CAPABILITY completed\r\n",
                capabilities(tls)
            ),
        ),
        CommandBody::Noop => answer(
            name,
            String::new(),
            Outcome::Ok,
            format!("{tag} OK NOOP completed\r\n"),
        ),
        CommandBody::Id { .. } => answer(
            name,
            detail,
            Outcome::Ok,
            format!(
                "* ID (\"name\" \"pecgate\" \"version\" \"{}\")\r\n{tag} OK ID completed\r\n",
                env!("CARGO_PKG_VERSION")
            ),
        ),
        CommandBody::Logout => Step::Logout {
            event: event(name, String::new(), Outcome::Ok),
            reply: format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n"),
        },
        CommandBody::StartTLS if tls => answer(
            name,
            "already using TLS".into(),
            Outcome::Bad,
            bad(Some(&tag), "TLS is already active"),
        ),
        CommandBody::StartTLS => Step::StartTls {
            event: event(name, String::new(), Outcome::Ok),
            reply: format!("{tag} OK Begin TLS negotiation now\r\n"),
        },
        CommandBody::Login { .. } | CommandBody::Authenticate { .. } if !tls => answer(
            name,
            "before STARTTLS".into(),
            Outcome::Denied,
            format!("{tag} NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n"),
        ),
        CommandBody::Authenticate {
            mechanism: AuthMechanism::Plain,
            initial_response: Some(secret),
        } => sasl_plain(&tag, &Zeroizing::new(secret.declassify().to_vec())),
        CommandBody::Authenticate {
            mechanism: AuthMechanism::Plain,
            initial_response: None,
        } => Step::SaslContinuation { tag },
        CommandBody::Authenticate { mechanism, .. } => answer(
            name,
            mechanism.to_string(),
            Outcome::No,
            format!("{tag} NO [CANNOT] Only AUTHENTICATE PLAIN is supported\r\n"),
        ),
        CommandBody::Login { username, password } => Step::LogIn {
            tag,
            command: name,
            login: String::from_utf8_lossy(username.as_ref()).into_owned(),
            secret: Zeroizing::new(password.declassify().as_ref().to_vec()),
        },
        _ => answer(
            name,
            "before login".into(),
            Outcome::Bad,
            bad(Some(&tag), "Log in first"),
        ),
    }
}

/// The client's line after an AUTHENTICATE PLAIN continuation.
pub fn on_sasl_line(tag: &str, line: &[u8]) -> Step {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line == b"*" {
        return answer(
            "AUTHENTICATE",
            "cancelled".into(),
            Outcome::Bad,
            bad(Some(tag), "Authentication cancelled"),
        );
    }
    match base64::engine::general_purpose::STANDARD.decode(line) {
        Ok(decoded) => sasl_plain(tag, &Zeroizing::new(decoded)),
        Err(_) => answer(
            "AUTHENTICATE",
            "invalid base64".into(),
            Outcome::Bad,
            bad(Some(tag), "Invalid base64 in SASL response"),
        ),
    }
}

fn sasl_plain(tag: &str, response: &[u8]) -> Step {
    match crate::password::parse_sasl_plain(response) {
        Some((login, secret)) => Step::LogIn {
            tag: tag.to_owned(),
            command: "AUTHENTICATE",
            login,
            secret,
        },
        None => answer(
            "AUTHENTICATE",
            "malformed PLAIN response".into(),
            Outcome::Bad,
            bad(Some(tag), "Malformed SASL PLAIN response"),
        ),
    }
}

fn event(command: &str, detail: String, outcome: Outcome) -> Event {
    Event {
        command: command.to_owned(),
        detail,
        outcome,
    }
}

fn answer(command: &str, detail: String, outcome: Outcome, reply: String) -> Step {
    Step::Answer {
        event: event(command, detail, outcome),
        reply,
    }
}

fn bad(tag: Option<&str>, text: &str) -> String {
    format!("{} BAD {text}\r\n", tag.unwrap_or("*"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::command::parse_command;

    fn step(text: &str, tls: bool) -> Step {
        on_command(
            parse_command(format!("{text}\r\n").as_bytes()).unwrap(),
            tls,
        )
    }

    fn reply_of(step: &Step) -> &str {
        match step {
            Step::Answer { reply, .. }
            | Step::StartTls { reply, .. }
            | Step::Logout { reply, .. } => reply,
            other => panic!("no reply: {other:?}"),
        }
    }

    #[test]
    fn one_summary_row_instead_of_a_row_per_command() {
        let mut tally = Tally::default();
        for text in ["a CAPABILITY", "b NOOP", "c ID NIL", "d STARTTLS"] {
            let (Step::Answer { event, .. } | Step::StartTls { event, .. }) = step(text, false)
            else {
                panic!("{text}")
            };
            assert!(!recorded_alone(&event), "{text}");
            assert!(tally.count());
        }
        let Step::Answer { event, .. } = step("e LOGIN mario x", false) else {
            panic!()
        };
        assert!(
            recorded_alone(&event),
            "a login attempt is always on record"
        );
        tally.bytes = 120;
        tally.tls = true;
        assert_eq!(
            tally.summary("login"),
            Event {
                command: "preauth".into(),
                detail: "commands=4 bytes=120 tls=yes ended=login".into(),
                outcome: Outcome::Ok
            }
        );
        while tally.count() {}
        assert_eq!(tally.commands, MAX_COMMANDS + 1);
        assert_eq!(tally.summary("too many commands").outcome, Outcome::Denied);
    }

    #[test]
    fn nothing_but_the_login_commands_before_login() {
        assert!(reply_of(&step("a SELECT INBOX", true)).starts_with("a BAD Log in first"));
        assert!(reply_of(&step("a LIST \"\" *", true)).starts_with("a BAD Log in first"));
        assert!(reply_of(&step("a CAPABILITY", false)).contains("STARTTLS LOGINDISABLED"));
        assert!(reply_of(&step("a CAPABILITY", true)).contains("AUTH=PLAIN"));
        assert!(reply_of(&step("a ID NIL", true)).contains("\"pecgate\""));
        assert!(matches!(step("a STARTTLS", false), Step::StartTls { .. }));
        assert!(reply_of(&step("a STARTTLS", true)).starts_with("a BAD"));
        assert!(matches!(step("a LOGOUT", true), Step::Logout { .. }));
    }

    #[test]
    fn credentials_only_over_tls_and_never_recorded() {
        let refused = step("a LOGIN mario s3cret", false);
        assert!(reply_of(&refused).contains("[PRIVACYREQUIRED]"));
        let Step::Answer { event, .. } = &refused else {
            panic!()
        };
        assert!(!event.detail.contains("s3cret"));
        match step("a LOGIN mario s3cret", true) {
            Step::LogIn {
                login, secret, tag, ..
            } => {
                assert_eq!((login.as_str(), tag.as_str()), ("mario", "a"));
                assert_eq!(secret.as_slice(), b"s3cret");
            }
            other => panic!("{other:?}"),
        }
        // SASL-IR and the continuation form.
        let ir = base64::engine::general_purpose::STANDARD.encode(b"\0mario\0s3cret");
        assert!(matches!(
            step(&format!("b AUTHENTICATE PLAIN {ir}"), true),
            Step::LogIn { .. }
        ));
        assert!(matches!(
            step("c AUTHENTICATE PLAIN", true),
            Step::SaslContinuation { .. }
        ));
        assert!(matches!(
            on_sasl_line("c", format!("{ir}\r\n").as_bytes()),
            Step::LogIn { .. }
        ));
        assert!(
            reply_of(&on_sasl_line("c", b"*\r\n")).starts_with("c BAD Authentication cancelled")
        );
        assert!(reply_of(&on_sasl_line("c", b"!!\r\n")).starts_with("c BAD Invalid base64"));
        assert!(reply_of(&step("d AUTHENTICATE CRAM-MD5", true)).contains("[CANNOT]"));
    }
}
