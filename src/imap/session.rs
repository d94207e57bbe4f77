//! One client connection, from accept to close: TLS, the not-authenticated state (served
//! locally), login against the config and the vault, then the relay.
//!
//! Before login nothing reaches the provider: CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE PLAIN,
//! ID, NOOP and LOGOUT are answered here; anything else is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::BytesMut;
use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::command::CommandBody;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::audit::{Outcome, Protocol};
use crate::gateway::Gateway;
use crate::imap::authorize::SessionPolicy;
use crate::imap::command::{self, summarize};
use crate::imap::framing::{Assembled, CommandAssembler, CommandLimits, tag_of};
use crate::imap::relay::{self, SessionEnd};
use crate::imap::response;
use crate::io::{self, BoxStream};
use crate::login::{self, LoginRefusal};
use crate::policy::FolderPolicy;
use crate::session::{self, HandshakeFailure, ListenerKind, SessionContext};
use crate::upstream::{self, ProviderConnection};

/// A client that does not log in within this time is disconnected.
const PREAUTH_TIMEOUT: Duration = Duration::from_secs(120);
/// Limits before login: nobody unauthenticated gets to make pecgate buffer much. A line fits
/// an ID at RFC 2971's limits (30 pairs of 30-octet names and 1024-octet values).
const PREAUTH_LIMITS: CommandLimits = CommandLimits {
    max_line: 40 * 1024,
    max_literal: 8 * 1024,
    max_command: 48 * 1024,
};

impl From<HandshakeFailure> for SessionEnd {
    fn from(failure: HandshakeFailure) -> SessionEnd {
        match failure {
            HandshakeFailure::TimedOut => SessionEnd::Timeout,
            HandshakeFailure::Failed(text) => SessionEnd::Error(text),
        }
    }
}

/// Serve one accepted connection to the end.
pub async fn serve(
    gateway: Arc<Gateway>,
    tcp: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    shutdown: CancellationToken,
) {
    let mut ctx = SessionContext::new(gateway, Protocol::Imap, peer);
    let span = ctx.span();
    session::run_in_span(span, kind, run(&mut ctx, tcp, kind, &shutdown)).await
}

async fn run(
    ctx: &mut SessionContext,
    tcp: TcpStream,
    kind: ListenerKind,
    shutdown: &CancellationToken,
) -> SessionEnd {
    if let Err(error) = tcp.set_nodelay(true) {
        return SessionEnd::Error(error.to_string());
    }
    let (stream, tls) = match kind {
        ListenerKind::ImplicitTls => match ctx.accept_tls(Box::new(tcp)).await {
            Ok(stream) => (stream, true),
            Err(failure) => return failure.into(),
        },
        ListenerKind::StartTls => (Box::new(tcp) as BoxStream, false),
    };
    let (stream, buffer, provider, capabilities) =
        match not_authenticated(ctx, stream, tls, shutdown).await {
            PreAuthEnd::LoggedIn {
                stream,
                buffer,
                provider,
                capabilities,
            } => (stream, buffer, provider, capabilities),
            PreAuthEnd::Closed(end) => return end,
        };
    let (user, mailbox) = (
        ctx.user.clone().unwrap_or_default(),
        ctx.mailbox.clone().unwrap_or_default(),
    );
    let config = &ctx.gateway.config;
    let policy = SessionPolicy {
        folders: FolderPolicy::new(&config.folder_patterns(&user, &mailbox)),
        permissions: config.permissions(&user, &mailbox),
        delimiter: provider.delimiter,
        provider_unselect: provider
            .capabilities
            .iter()
            .any(|c| c.eq_ignore_ascii_case("UNSELECT")),
    };
    let end = relay::run(
        ctx,
        stream,
        buffer,
        provider,
        capabilities,
        policy,
        shutdown,
    )
    .await;
    let (command, outcome) = match &end {
        SessionEnd::Logout => ("logout", Outcome::Ok),
        SessionEnd::UpstreamClosed | SessionEnd::ProviderViolation(_) => {
            ("upstream-error", Outcome::Error)
        }
        SessionEnd::AuditFailed => ("disconnect", Outcome::Error),
        _ => ("disconnect", Outcome::Ok),
    };
    let _ = ctx
        .audit(command, None, format!("{end:?}").to_lowercase(), outcome)
        .await;
    end
}

enum PreAuthEnd {
    LoggedIn {
        stream: BoxStream,
        buffer: BytesMut,
        provider: ProviderConnection,
        capabilities: Vec<String>,
    },
    Closed(SessionEnd),
}

/// Capabilities offered before login.
fn preauth_capabilities(tls: bool) -> &'static str {
    if tls {
        "IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN"
    } else {
        "IMAP4rev1 LITERAL+ SASL-IR ID STARTTLS LOGINDISABLED"
    }
}

/// Write and flush; any error ends the session.
async fn send(stream: &mut BoxStream, bytes: &[u8]) -> Result<(), SessionEnd> {
    let result = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    }
    .await;
    result.map_err(|e| SessionEnd::Error(e.to_string()))
}

async fn not_authenticated(
    ctx: &mut SessionContext,
    mut stream: BoxStream,
    mut tls: bool,
    shutdown: &CancellationToken,
) -> PreAuthEnd {
    macro_rules! send_or_close {
        ($bytes:expr) => {
            if let Err(end) = send(&mut stream, $bytes).await {
                return PreAuthEnd::Closed(end);
            }
        };
    }
    macro_rules! audit_or_close {
        ($command:expr, $detail:expr, $outcome:expr) => {
            if ctx.audit($command, None, $detail, $outcome).await.is_err() {
                let _ = send(
                    &mut stream,
                    b"* BYE [UNAVAILABLE] Audit log unavailable\r\n",
                )
                .await;
                return PreAuthEnd::Closed(SessionEnd::AuditFailed);
            }
        };
    }
    let greeting = format!(
        "* OK [CAPABILITY {}] pecgate ready\r\n",
        preauth_capabilities(tls)
    );
    send_or_close!(greeting.as_bytes());
    let mut buffer = BytesMut::with_capacity(1024);
    let mut assembler = CommandAssembler::new(PREAUTH_LIMITS);
    let deadline = tokio::time::Instant::now() + PREAUTH_TIMEOUT;
    loop {
        let assembled = match assembler.poll(&mut buffer, |_, _| false) {
            Assembled::NeedMore => {
                tokio::select! {
                    read = io::fill(&mut stream, &mut buffer) => match read {
                        Ok(true) => continue,
                        Ok(false) => return PreAuthEnd::Closed(SessionEnd::ClientClosed),
                        Err(e) => return PreAuthEnd::Closed(SessionEnd::Error(e.to_string())),
                    },
                    () = tokio::time::sleep_until(deadline) => {
                        let _ = send(&mut stream, b"* BYE Autologout: no login in time\r\n").await;
                        return PreAuthEnd::Closed(SessionEnd::Timeout);
                    }
                    () = shutdown.cancelled() => {
                        let _ = send(&mut stream, b"* BYE pecgate is shutting down\r\n").await;
                        return PreAuthEnd::Closed(SessionEnd::Shutdown);
                    }
                }
            }
            Assembled::SendContinuation => {
                send_or_close!(b"+ Ready for literal data\r\n");
                continue;
            }
            other => other,
        };
        let bytes = match assembled {
            Assembled::Command(bytes) => bytes,
            Assembled::Refused { tag, reason } => {
                audit_or_close!("(unparsed)", reason.text().to_owned(), Outcome::Bad);
                send_or_close!(bad(tag.as_deref(), reason.text()).as_bytes());
                continue;
            }
            Assembled::MessageLiteral { .. }
            | Assembled::NeedMore
            | Assembled::SendContinuation => {
                unreachable!("handled above")
            }
        };
        let command = match command::parse_command(&bytes) {
            Ok(command) => command,
            Err(error) => {
                let tag = tag_of(&bytes, &[]);
                audit_or_close!("(unparsed)", crate::text::printable(&bytes, 200), Outcome::Bad);
                send_or_close!(
                    bad(tag.as_deref(), &format!("Invalid command: {error}")).as_bytes()
                );
                continue;
            }
        };
        let tag = command.tag.as_ref().to_owned();
        let name = command.body.name();
        let (login, secret) = match command.body {
            CommandBody::Capability => {
                audit_or_close!(name, String::new(), Outcome::Ok);
                let reply = format!(
                    "* CAPABILITY {}\r\n{tag} OK CAPABILITY completed\r\n",
                    preauth_capabilities(tls)
                );
                send_or_close!(reply.as_bytes());
                continue;
            }
            CommandBody::Noop => {
                audit_or_close!(name, String::new(), Outcome::Ok);
                send_or_close!(format!("{tag} OK NOOP completed\r\n").as_bytes());
                continue;
            }
            CommandBody::Id { .. } => {
                audit_or_close!(name, summarize(&command).detail, Outcome::Ok);
                let reply = format!(
                    "* ID (\"name\" \"pecgate\" \"version\" \"{}\")\r\n{tag} OK ID completed\r\n",
                    env!("CARGO_PKG_VERSION")
                );
                send_or_close!(reply.as_bytes());
                continue;
            }
            CommandBody::Logout => {
                audit_or_close!(name, String::new(), Outcome::Ok);
                let _ = send(
                    &mut stream,
                    format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n").as_bytes(),
                )
                .await;
                return PreAuthEnd::Closed(SessionEnd::Logout);
            }
            CommandBody::StartTLS if tls => {
                audit_or_close!(name, "already using TLS".to_owned(), Outcome::Bad);
                send_or_close!(bad(Some(&tag), "TLS is already active").as_bytes());
                continue;
            }
            CommandBody::StartTLS => {
                audit_or_close!(name, String::new(), Outcome::Ok);
                send_or_close!(format!("{tag} OK Begin TLS negotiation now\r\n").as_bytes());
                // Anything the client pipelined after STARTTLS was sent in clear text and
                // could have been injected by a man in the middle: discard it.
                buffer.clear();
                assembler = CommandAssembler::new(PREAUTH_LIMITS);
                stream = match ctx.accept_tls(stream).await {
                    Ok(stream) => stream,
                    Err(failure) => return PreAuthEnd::Closed(failure.into()),
                };
                tls = true;
                continue;
            }
            CommandBody::Login { .. } | CommandBody::Authenticate { .. } if !tls => {
                audit_or_close!(name, "before STARTTLS".to_owned(), Outcome::Denied);
                send_or_close!(
                    format!("{tag} NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n")
                        .as_bytes()
                );
                continue;
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                if mechanism != AuthMechanism::Plain {
                    audit_or_close!(name, mechanism.to_string(), Outcome::No);
                    send_or_close!(
                        format!("{tag} NO [CANNOT] Only AUTHENTICATE PLAIN is supported\r\n")
                            .as_bytes()
                    );
                    continue;
                }
                let response: Zeroizing<Vec<u8>> = match initial_response {
                    Some(secret) => Zeroizing::new(secret.declassify().to_vec()),
                    None => {
                        send_or_close!(b"+ \r\n");
                        let line = match io::next_line(&mut stream, &mut buffer, 8 * 1024).await
                        {
                            Ok(line) => Zeroizing::new(line.to_vec()),
                            Err(e) => return PreAuthEnd::Closed(SessionEnd::Error(e.to_string())),
                        };
                        let trimmed = line
                            .strip_suffix(b"\n")
                            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
                            .unwrap_or(&line);
                        if trimmed == b"*" {
                            audit_or_close!(name, "cancelled".to_owned(), Outcome::Bad);
                            send_or_close!(bad(Some(&tag), "Authentication cancelled").as_bytes());
                            continue;
                        }
                        match base64::engine::general_purpose::STANDARD.decode(trimmed) {
                            Ok(decoded) => Zeroizing::new(decoded),
                            Err(_) => {
                                audit_or_close!(name, "invalid base64".to_owned(), Outcome::Bad);
                                send_or_close!(
                                    bad(Some(&tag), "Invalid base64 in SASL response").as_bytes()
                                );
                                continue;
                            }
                        }
                    }
                };
                let Some((login, secret)) = login::parse_sasl_plain(&response) else {
                    audit_or_close!(name, "malformed PLAIN response".to_owned(), Outcome::Bad);
                    send_or_close!(bad(Some(&tag), "Malformed SASL PLAIN response").as_bytes());
                    continue;
                };
                (login, secret)
            }
            CommandBody::Login { username, password } => (
                String::from_utf8_lossy(username.as_ref()).into_owned(),
                Zeroizing::new(password.declassify().as_ref().to_vec()),
            ),
            _ => {
                audit_or_close!(name, "before login".to_owned(), Outcome::Bad);
                send_or_close!(bad(Some(&tag), "Log in first").as_bytes());
                continue;
            }
        };
        match log_in(ctx, &tag, name, &login, secret).await {
            LoginResult::Success {
                provider,
                capabilities,
                reply,
            } => {
                send_or_close!(reply.as_bytes());
                return PreAuthEnd::LoggedIn {
                    stream,
                    buffer,
                    provider,
                    capabilities,
                };
            }
            LoginResult::Refused(reply) => send_or_close!(reply.as_bytes()),
            LoginResult::AuditFailed => {
                let _ = send(
                    &mut stream,
                    b"* BYE [UNAVAILABLE] Audit log unavailable\r\n",
                )
                .await;
                return PreAuthEnd::Closed(SessionEnd::AuditFailed);
            }
        }
    }
}

fn bad(tag: Option<&str>, text: &str) -> String {
    format!("{} BAD {text}\r\n", tag.unwrap_or("*"))
}

enum LoginResult {
    Success {
        provider: ProviderConnection,
        capabilities: Vec<String>,
        reply: String,
    },
    Refused(String),
    AuditFailed,
}

/// Check personal credentials, then open the provider session.
async fn log_in(
    ctx: &mut SessionContext,
    tag: &str,
    command: &str,
    login: &str,
    secret: Zeroizing<Vec<u8>>,
) -> LoginResult {
    let gateway = ctx.gateway.clone();
    let target = match login::check_credentials(
        &gateway.config,
        &gateway.password_checks,
        login,
        secret,
    )
    .await
    {
        Ok(target) => target,
        Err(failure) => {
            let reply = match &failure.refusal {
                LoginRefusal::BadCredentials { .. } => {
                    format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed\r\n")
                }
                LoginRefusal::NoMailboxChosen { choices } => format!(
                    "{tag} NO [AUTHENTICATIONFAILED] Choose a mailbox: log in as {}/MAILBOX (one of: {})\r\n",
                    failure.user_name,
                    choices.join(", ")
                ),
                LoginRefusal::MailboxNotGranted(_) => format!(
                    "{tag} NO [AUTHORIZATIONFAILED] Your roles do not grant that mailbox\r\n"
                ),
            };
            // The failed attempt is recorded under the user it named, when that user exists.
            let event_ctx = SessionContext {
                user: failure.user.clone(),
                mailbox: None,
                ..ctx.clone()
            };
            return match event_ctx
                .audit(command, None, failure.audit_detail(login), Outcome::No)
                .await
            {
                Ok(()) => LoginResult::Refused(reply),
                Err(_) => LoginResult::AuditFailed,
            };
        }
    };
    ctx.logged_in(&target);

    let unavailable = |text: String| format!("{tag} NO [UNAVAILABLE] {text}\r\n");
    let mailbox = &gateway.mailboxes[&target.mailbox];
    let outcome = match mailbox.target(gateway.provider_timeout) {
        None => {
            tracing::error!(
                "no provider password in the vault for this mailbox: run `pecgate vault set {}`",
                target.mailbox
            );
            Err((
                "no provider password in the vault".to_owned(),
                unavailable("The mailbox is not configured on the gateway yet; tell IT".to_owned()),
            ))
        }
        Some(provider_target) => match mailbox.budget.try_acquire() {
            None => {
                tracing::warn!(
                    limit = mailbox.budget.limit(),
                    "all provider connections of this mailbox are in use"
                );
                Err((
                    format!("max_connections={} reached", mailbox.budget.limit()),
                    unavailable(format!(
                        "All {} connections to the PEC provider for this mailbox are in use; try again in a moment",
                        mailbox.budget.limit()
                    )),
                ))
            }
            Some(permit) => match upstream::connect(&provider_target, permit).await {
                Ok(provider) => Ok(provider),
                Err(error) => {
                    tracing::error!(%error, "cannot open the provider session");
                    let _ = ctx
                        .audit("upstream-error", None, error.to_string(), Outcome::Error)
                        .await;
                    Err((
                        "provider unavailable".to_owned(),
                        unavailable(
                            "The PEC provider cannot be reached right now; try again later"
                                .to_owned(),
                        ),
                    ))
                }
            },
        },
    };
    match outcome {
        Ok(provider) => {
            let capabilities =
                response::client_capabilities(provider.capabilities.iter().map(String::as_str));
            if ctx
                .audit(command, None, format!("login={login:?}"), Outcome::Ok)
                .await
                .is_err()
            {
                return LoginResult::AuditFailed;
            }
            tracing::info!("logged in");
            let reply = format!(
                "{tag} OK [CAPABILITY {}] Logged in as {} on mailbox {}\r\n",
                capabilities.join(" "),
                target.user,
                target.mailbox
            );
            LoginResult::Success {
                provider,
                capabilities,
                reply,
            }
        }
        Err((detail, reply)) => match ctx.audit(command, None, detail, Outcome::No).await {
            Ok(()) => LoginResult::Refused(reply),
            Err(_) => LoginResult::AuditFailed,
        },
    }
}
