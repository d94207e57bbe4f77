//! Client commands: line framing, parsing with smtp-proto, the EHLO answer, and audit
//! summaries. Pure functions on bytes.

use base64::Engine;
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, MAIL_BODY_7BIT, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8, Request,
};

use super::reply::{Enhanced, Reply};

/// Longest command line accepted (RFC 4954 asks for 12288 octets for AUTH lines).
pub const MAX_COMMAND_LINE: usize = 16 * 1024;

/// The SASL mechanisms pecgate offers (after TLS only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
    /// Anything else the client named (refused with 504).
    Other,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::Other => "other",
        }
    }
}

/// `BODY=` of MAIL FROM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    Unspecified,
    SevenBit,
    EightBitMime,
}

/// A parsed client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    StartTls,
    Auth {
        mechanism: Mechanism,
        /// The initial response as sent (base64, or `=` for an empty one).
        initial: Option<String>,
    },
    Mail {
        from: String,
        /// `SIZE=` (0 when absent).
        size: u64,
        body: Body,
    },
    Rcpt {
        to: String,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Help,
    /// A command pecgate knows but does not offer (VRFY, EXPN, BDAT, ETRN, ...).
    NotImplemented(&'static str),
}

impl Command {
    /// The name recorded in the audit log.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Ehlo(_) => "EHLO",
            Command::Helo(_) => "HELO",
            Command::StartTls => "STARTTLS",
            Command::Auth { .. } => "AUTH",
            Command::Mail { .. } => "MAIL",
            Command::Rcpt { .. } => "RCPT",
            Command::Data => "DATA",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::Help => "HELP",
            Command::NotImplemented(name) => name,
        }
    }

    /// What the audit log records about the command's arguments (never secrets).
    pub fn audit_detail(&self) -> String {
        match self {
            Command::Ehlo(host) | Command::Helo(host) => printable(host, 100),
            Command::Auth { mechanism, .. } => format!("mechanism={}", mechanism.name()),
            Command::Mail { from, size, body } => {
                let mut s = format!("from=<{}>", printable(from, 300));
                if *size > 0 {
                    s.push_str(&format!(" size={size}"));
                }
                if *body == Body::EightBitMime {
                    s.push_str(" body=8BITMIME");
                }
                s
            }
            Command::Rcpt { to } => format!("to=<{}>", printable(to, 300)),
            _ => String::new(),
        }
    }
}

/// Text from the client as it is written to logs and the audit trail (see [`crate::text`]).
pub fn printable(text: &str, max: usize) -> String {
    crate::text::printable(text.as_bytes(), max)
}

/// Where the first line in `buf` ends (just past its LF).
pub fn line_end(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n').map(|i| i + 1)
}

/// Parse one complete command line (with its line ending). The error is the reply to send.
pub fn parse(line: &[u8]) -> Result<Command, Reply> {
    use smtp_proto::Error as E;
    let syntax = |text: String| Reply::new(501, Enhanced(5, 5, 4), text);
    let request = match Request::parse(&mut line.iter()) {
        Ok(request) => request,
        Err(E::UnknownCommand) => {
            return Err(Reply::new(500, Enhanced(5, 5, 2), "Command not recognized"));
        }
        Err(E::SyntaxError { syntax: s }) => return Err(syntax(format!("Syntax: {s}"))),
        Err(E::InvalidSenderAddress) => {
            return Err(Reply::new(501, Enhanced(5, 1, 7), "Invalid sender address"));
        }
        Err(E::InvalidRecipientAddress) => {
            return Err(Reply::new(
                501,
                Enhanced(5, 1, 3),
                "Invalid recipient address",
            ));
        }
        Err(E::InvalidParameter { param }) => {
            return Err(syntax(format!("Invalid value for parameter {param}")));
        }
        Err(E::UnsupportedParameter { param }) => {
            return Err(unsupported_parameter(&param));
        }
        Err(_) => return Err(syntax("Syntax error".to_owned())),
    };
    Ok(match request {
        Request::Ehlo { host } => Command::Ehlo(host.into_owned()),
        Request::Helo { host } => Command::Helo(host.into_owned()),
        Request::StartTls => Command::StartTls,
        Request::Auth {
            mechanism,
            initial_response,
        } => Command::Auth {
            mechanism: match mechanism {
                AUTH_PLAIN => Mechanism::Plain,
                AUTH_LOGIN => Mechanism::Login,
                _ => Mechanism::Other,
            },
            initial: (!initial_response.is_empty()).then(|| initial_response.into_owned()),
        },
        Request::Mail { from } => {
            let known = MAIL_BODY_7BIT | MAIL_BODY_8BITMIME;
            if from.flags & MAIL_SMTPUTF8 != 0 {
                return Err(unsupported_parameter("SMTPUTF8"));
            }
            let extras = from.flags & !known != 0
                || from.env_id.is_some()
                || from.trans_id.is_some()
                || from.solicit.is_some()
                || from.mtrk.is_some()
                || from.by != 0
                || from.hold_for != 0
                || from.hold_until != 0
                || from.mt_priority != 0;
            if extras {
                return Err(unsupported_parameter("other than SIZE, BODY or AUTH"));
            }
            Command::Mail {
                from: from.address.into_owned(),
                size: from.size as u64,
                body: if from.flags & MAIL_BODY_8BITMIME != 0 {
                    Body::EightBitMime
                } else if from.flags & MAIL_BODY_7BIT != 0 {
                    Body::SevenBit
                } else {
                    Body::Unspecified
                },
            }
        }
        Request::Rcpt { to } => {
            if to.flags != 0 || to.orcpt.is_some() || to.rrvs != 0 {
                return Err(unsupported_parameter("on RCPT (DSN is not offered)"));
            }
            Command::Rcpt {
                to: to.address.into_owned(),
            }
        }
        Request::Data => Command::Data,
        Request::Rset => Command::Rset,
        Request::Noop { .. } => Command::Noop,
        Request::Quit => Command::Quit,
        Request::Help { .. } => Command::Help,
        Request::Vrfy { .. } => Command::NotImplemented("VRFY"),
        Request::Expn { .. } => Command::NotImplemented("EXPN"),
        Request::Bdat { .. } => Command::NotImplemented("BDAT"),
        Request::Etrn { .. } => Command::NotImplemented("ETRN"),
        Request::Atrn { .. } => Command::NotImplemented("ATRN"),
        Request::Burl { .. } => Command::NotImplemented("BURL"),
        Request::Lhlo { .. } => Command::NotImplemented("LHLO"),
    })
}

fn unsupported_parameter(param: &str) -> Reply {
    Reply::new(
        555,
        Enhanced(5, 5, 4),
        format!("Unsupported parameter {}", printable(param, 60)),
    )
}

/// The EHLO answer: what pecgate really supports in this state.
pub fn ehlo_reply(hostname: &str, client: &str, tls: bool, max_size: u64) -> Reply {
    let mut lines = vec![format!("{hostname} greets {}", printable(client, 100))];
    lines.push("PIPELINING".to_owned());
    lines.push(format!("SIZE {max_size}"));
    lines.push("8BITMIME".to_owned());
    lines.push("ENHANCEDSTATUSCODES".to_owned());
    if tls {
        lines.push("AUTH PLAIN LOGIN".to_owned());
    } else {
        lines.push("STARTTLS".to_owned());
    }
    Reply {
        code: 250,
        enhanced: None,
        lines,
    }
}

/// A client's answer to a SASL challenge: `*` cancels (RFC 4954), anything else is base64.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslLine {
    Cancel,
    Data(zeroize::Zeroizing<Vec<u8>>),
    Invalid,
}

/// Decode one SASL response line (without or with its line ending).
pub fn sasl_line(line: &[u8]) -> SaslLine {
    let trimmed = line
        .strip_suffix(b"\n")
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .unwrap_or(line);
    if trimmed == b"*" {
        return SaslLine::Cancel;
    }
    if trimmed == b"=" {
        return SaslLine::Data(zeroize::Zeroizing::new(Vec::new()));
    }
    match base64::engine::general_purpose::STANDARD.decode(trimmed) {
        Ok(bytes) => SaslLine::Data(zeroize::Zeroizing::new(bytes)),
        Err(_) => SaslLine::Invalid,
    }
}

/// The base64 prompts of AUTH LOGIN.
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_commands_pecgate_serves() {
        let cases: &[(&[u8], Command)] = &[
            (
                b"EHLO client.example\r\n",
                Command::Ehlo("client.example".into()),
            ),
            (b"helo x\r\n", Command::Helo("x".into())),
            (b"STARTTLS\r\n", Command::StartTls),
            (
                b"AUTH PLAIN AG1hcmlvAHNlY3JldA==\r\n",
                Command::Auth {
                    mechanism: Mechanism::Plain,
                    initial: Some("AG1hcmlvAHNlY3JldA==".into()),
                },
            ),
            (
                b"AUTH LOGIN\r\n",
                Command::Auth {
                    mechanism: Mechanism::Login,
                    initial: None,
                },
            ),
            (
                b"AUTH CRAM-MD5\r\n",
                Command::Auth {
                    mechanism: Mechanism::Other,
                    initial: None,
                },
            ),
            (
                b"MAIL FROM:<studio@pec.it> SIZE=1234 BODY=8BITMIME\r\n",
                Command::Mail {
                    from: "studio@pec.it".into(),
                    size: 1234,
                    body: Body::EightBitMime,
                },
            ),
            (
                b"MAIL FROM:<> AUTH=<>\r\n",
                Command::Mail {
                    from: "".into(),
                    size: 0,
                    body: Body::Unspecified,
                },
            ),
            (
                b"RCPT TO:<a@b.it>\r\n",
                Command::Rcpt {
                    to: "a@b.it".into(),
                },
            ),
            (b"DATA\r\n", Command::Data),
            (b"RSET\r\n", Command::Rset),
            (b"NOOP\r\n", Command::Noop),
            (b"QUIT\r\n", Command::Quit),
            (b"VRFY x\r\n", Command::NotImplemented("VRFY")),
            (b"BDAT 10 LAST\r\n", Command::NotImplemented("BDAT")),
        ];
        for (line, expected) in cases {
            assert_eq!(
                &parse(line).unwrap(),
                expected,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn refusals_carry_codes() {
        let code = |line: &[u8]| {
            let r = parse(line).unwrap_err();
            (r.code, r.enhanced.unwrap().to_string())
        };
        assert_eq!(code(b"FOO bar\r\n"), (500, "5.5.2".into()));
        assert_eq!(code(b"MAIL FROM:studio@pec.it\r\n"), (501, "5.5.4".into()));
        assert_eq!(code(b"MAIL FROM:<a@b> SMTPUTF8\r\n"), (555, "5.5.4".into()));
        assert_eq!(code(b"MAIL FROM:<a@b> RET=FULL\r\n"), (555, "5.5.4".into()));
        assert_eq!(
            code(b"RCPT TO:<a@b> NOTIFY=SUCCESS\r\n"),
            (555, "5.5.4".into())
        );
        assert_eq!(code(b"EHLO\r\n").0, 501);
    }

    #[test]
    fn audit_details_never_hold_secrets() {
        let c = parse(b"AUTH PLAIN AG1hcmlvAHNlY3JldA==\r\n").unwrap();
        assert_eq!(c.audit_detail(), "mechanism=PLAIN");
        let c = parse(b"MAIL FROM:<s@p.it> SIZE=10\r\n").unwrap();
        assert_eq!(c.audit_detail(), "from=<s@p.it> size=10");
    }

    #[test]
    fn ehlo_depends_on_tls() {
        let plain = ehlo_reply("gw", "c", false, 100);
        assert!(plain.lines.contains(&"STARTTLS".to_owned()));
        assert!(!plain.lines.iter().any(|l| l.starts_with("AUTH")));
        let tls = ehlo_reply("gw", "c", true, 100);
        assert!(tls.lines.contains(&"AUTH PLAIN LOGIN".to_owned()));
        assert!(tls.lines.contains(&"SIZE 100".to_owned()));
        assert!(!tls.lines.contains(&"STARTTLS".to_owned()));
        let wire = String::from_utf8(tls.to_bytes()).unwrap();
        assert!(wire.starts_with("250-gw greets c\r\n"));
        assert!(wire.ends_with("250 AUTH PLAIN LOGIN\r\n"));
    }

    #[test]
    fn sasl_lines() {
        assert_eq!(sasl_line(b"*\r\n"), SaslLine::Cancel);
        assert_eq!(sasl_line(b"!!\r\n"), SaslLine::Invalid);
        match sasl_line(b"bWFyaW8=\r\n") {
            SaslLine::Data(d) => assert_eq!(d.as_slice(), b"mario"),
            other => panic!("{other:?}"),
        }
    }
}
