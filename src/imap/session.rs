//! One client connection, from accept to close: TLS, the not-authenticated state (decided by
//! [`preauth`], served locally: nothing reaches the provider before login), login against the
//! config and the vault, then the relay.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use crate::audit::{Outcome, Protocol};
use crate::gateway::Live;
use crate::guard::{AdmissionRefused, Ticket};
use crate::imap::authorize::SessionPolicy;
use crate::imap::command;
use crate::imap::framing::{Assembled, CommandAssembler, CommandLimits, tag_of};
use crate::imap::phase::{SessionEnd, pool_connection, stop_bye};
use crate::imap::preauth;
use crate::imap::relay;
use crate::imap::response;
use crate::io::{self, BoxStream};
use crate::login::{self, LoginRefusal};
use crate::policy::FolderPolicy;
use crate::registry::Stop;
use crate::session::{self, HandshakeFailure, ListenerKind, SessionContext};
use crate::upstream::ProviderConnection;
use crate::upstream::pool::PoolError;

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
/// `ticket` is the connection's place (pre-login, a session once logged in), held to the end.
pub async fn serve(
    live: Live,
    mut ticket: Ticket,
    tcp: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    stop: Stop,
) {
    let mut ctx = SessionContext::new(live, stop, Protocol::Imap, peer);
    let span = ctx.span();
    session::run_in_span(span, kind, run(&mut ctx, &mut ticket, tcp, kind)).await
}

async fn run(
    ctx: &mut SessionContext,
    ticket: &mut Ticket,
    tcp: TcpStream,
    kind: ListenerKind,
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
        match not_authenticated(ctx, ticket, stream, tls).await {
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
        max_message_bytes: config.mailboxes[&mailbox].max_message_bytes,
        provider_unselect: provider.has("UNSELECT"),
    };
    let end = relay::run(ctx, stream, buffer, provider, capabilities, policy).await;
    let (command, outcome) = match &end {
        SessionEnd::Shutdown if ctx.stop_reason().is_some() => ("revoked", Outcome::Ok),
        SessionEnd::Logout => ("logout", Outcome::Ok),
        SessionEnd::UpstreamClosed
        | SessionEnd::ProviderViolation(_)
        | SessionEnd::ProviderStalled(_) => ("upstream-error", Outcome::Error),
        SessionEnd::AuditFailed => ("disconnect", Outcome::Error),
        _ => ("disconnect", Outcome::Ok),
    };
    let detail = match ctx.stop_reason() {
        Some(reason) if matches!(end, SessionEnd::Shutdown) => reason,
        _ => format!("{end:?}").to_lowercase(),
    };
    let _ = ctx.audit(command, None, detail, outcome).await;
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

/// Write and flush; any error ends the session.
async fn send(stream: &mut BoxStream, bytes: &[u8]) -> Result<(), SessionEnd> {
    let result = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    }
    .await;
    result.map_err(|e| SessionEnd::Error(e.to_string()))
}

/// Drive [`preauth`] until the client logs in or goes away, then record the connection's one
/// pre-login summary row.
async fn not_authenticated(
    ctx: &mut SessionContext,
    ticket: &mut Ticket,
    stream: BoxStream,
    tls: bool,
) -> PreAuthEnd {
    let mut tally = preauth::Tally {
        tls,
        ..Default::default()
    };
    let end = serve_preauth(ctx, ticket, stream, &mut tally).await;
    let ended = match &end {
        PreAuthEnd::LoggedIn { .. } => "login".to_owned(),
        PreAuthEnd::Closed(SessionEnd::Error(text)) => crate::text::printable(text.as_bytes(), 120),
        PreAuthEnd::Closed(end) => format!("{end:?}").to_lowercase(),
    };
    let preauth::Event {
        command,
        detail,
        outcome,
    } = tally.summary(&ended);
    // A failure here shows at the next event (the relay checks the log's health first).
    let _ = ctx.audit(&command, None, detail, outcome).await;
    end
}

async fn serve_preauth(
    ctx: &mut SessionContext,
    ticket: &mut Ticket,
    mut stream: BoxStream,
    tally: &mut preauth::Tally,
) -> PreAuthEnd {
    let stop = ctx.stop.clone();
    let mut tls = tally.tls;
    macro_rules! send_or_close {
        ($bytes:expr) => {
            if let Err(end) = send(&mut stream, $bytes).await {
                return PreAuthEnd::Closed(end);
            }
        };
    }
    macro_rules! record_or_close {
        ($event:expr) => {{
            let event: preauth::Event = $event;
            if preauth::recorded_alone(&event)
                && ctx
                    .audit(&event.command, None, event.detail, event.outcome)
                    .await
                    .is_err()
            {
                let _ = send(&mut stream, AUDIT_BYE).await;
                return PreAuthEnd::Closed(SessionEnd::AuditFailed);
            }
        }};
    }
    send_or_close!(preauth::greeting(tls).as_bytes());
    let mut buffer = BytesMut::with_capacity(1024);
    let mut assembler = CommandAssembler::new(PREAUTH_LIMITS);
    let deadline = tokio::time::Instant::now() + ctx.gateway.config.gateway.login_timeout;
    loop {
        let mut step = match assembler.poll(&mut buffer, |_, _| false) {
            Assembled::NeedMore => {
                let before = buffer.len();
                tokio::select! {
                    read = io::fill(&mut stream, &mut buffer) => match read {
                        Ok(true) => {
                            tally.bytes += (buffer.len() - before) as u64;
                            continue;
                        }
                        Ok(false) => return PreAuthEnd::Closed(SessionEnd::ClientClosed),
                        Err(e) => return PreAuthEnd::Closed(SessionEnd::Error(e.to_string())),
                    },
                    () = tokio::time::sleep_until(deadline) => {
                        let _ = send(&mut stream, b"* BYE Autologout: no login in time\r\n").await;
                        return PreAuthEnd::Closed(SessionEnd::Timeout);
                    }
                    () = stop.stopped() => {
                        let _ = send(&mut stream, &stop_bye(ctx)).await;
                        return PreAuthEnd::Closed(SessionEnd::Shutdown);
                    }
                }
            }
            Assembled::SendContinuation => {
                send_or_close!(b"+ Ready for literal data\r\n");
                continue;
            }
            Assembled::Refused { tag, reason } => {
                preauth::on_unparsed(tag.as_deref(), reason.text(), reason.text().to_owned())
            }
            Assembled::Command(bytes) => match command::parse_command(&bytes) {
                Ok(command) => preauth::on_command(command, tls),
                Err(error) => preauth::on_unparsed(
                    tag_of(&bytes, &[]).as_deref(),
                    &format!("Invalid command: {error}"),
                    crate::text::printable(&bytes, 200),
                ),
            },
            Assembled::MessageLiteral { .. } => unreachable!("nothing streams before login"),
        };
        if !tally.count() {
            let _ = send(&mut stream, b"* BYE Too many commands before login\r\n").await;
            return PreAuthEnd::Closed(SessionEnd::Error("too many commands before login".into()));
        }
        if let preauth::Step::SaslContinuation { tag } = &step {
            send_or_close!(b"+ \r\n");
            step = match io::next_line(&mut stream, &mut buffer, 8 * 1024).await {
                Ok(line) => preauth::on_sasl_line(tag, &Zeroizing::new(line.to_vec())),
                Err(e) => return PreAuthEnd::Closed(SessionEnd::Error(e.to_string())),
            };
        }
        match step {
            preauth::Step::Answer { event, reply } => {
                record_or_close!(event);
                send_or_close!(reply.as_bytes());
            }
            preauth::Step::Logout { event, reply } => {
                record_or_close!(event);
                let _ = send(&mut stream, reply.as_bytes()).await;
                return PreAuthEnd::Closed(SessionEnd::Logout);
            }
            preauth::Step::StartTls { event, reply } => {
                record_or_close!(event);
                send_or_close!(reply.as_bytes());
                buffer.clear();
                assembler = CommandAssembler::new(PREAUTH_LIMITS);
                stream = match ctx.accept_tls(stream).await {
                    Ok(stream) => stream,
                    Err(failure) => return PreAuthEnd::Closed(failure.into()),
                };
                tls = true;
                tally.tls = true;
            }
            preauth::Step::SaslContinuation { .. } => unreachable!("answered above"),
            preauth::Step::LogIn {
                tag,
                command,
                login,
                secret,
            } => match log_in(ctx, ticket, &mut stream, &tag, command, &login, secret).await {
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
                    let _ = send(&mut stream, AUDIT_BYE).await;
                    return PreAuthEnd::Closed(SessionEnd::AuditFailed);
                }
            },
        }
    }
}

const AUDIT_BYE: &[u8] = b"* BYE [UNAVAILABLE] Audit log unavailable\r\n";

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
    ticket: &mut Ticket,
    stream: &mut BoxStream,
    tag: &str,
    command: &str,
    login: &str,
    secret: Zeroizing<Vec<u8>>,
) -> LoginResult {
    let gateway = ctx.refresh();
    let target = match login::check_credentials(
        &gateway.config,
        &gateway.logins,
        ticket,
        ctx.peer.ip(),
        login,
        secret,
    )
    .await
    {
        Ok(target) => {
            gateway.metrics.login("ok");
            target
        }
        Err(failure) => {
            gateway.metrics.login(failure.refusal.metric_label());
            let reply = match &failure.refusal {
                LoginRefusal::BadCredentials { .. } | LoginRefusal::Locked(_) => {
                    format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed\r\n")
                }
                LoginRefusal::Busy => format!(
                    "{tag} NO [UNAVAILABLE] Too many logins at once; try again in a moment\r\n"
                ),
                LoginRefusal::TooManySessions(AdmissionRefused::UserFull) => format!(
                    "{tag} NO [LIMIT] Too many sessions open for {} (at most {}); close one\r\n",
                    failure.user_name, gateway.config.gateway.max_sessions_per_user
                ),
                LoginRefusal::TooManySessions(_) => format!(
                    "{tag} NO [UNAVAILABLE] pecgate is serving as many sessions as it may; try again later\r\n"
                ),
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
    if !gateway.audit.is_healthy() {
        // Not even the provider login happens unrecorded (the row is kept for later).
        tracing::error!("audit log unavailable: login refused before contacting the provider");
        let _ = ctx
            .audit(
                command,
                None,
                format!("login={login:?} reason=audit log unavailable"),
                Outcome::No,
            )
            .await;
        return LoginResult::AuditFailed;
    }

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
        Some(provider_target) => {
            let user = target.user.clone();
            let wait = gateway.config.gateway.connection_wait;
            match pool_connection(stream, mailbox, &provider_target, &user, wait, None).await {
                Ok(provider) => Ok(provider),
                Err(PoolError::Busy { ceiling, waited }) => {
                    tracing::warn!(
                        max_connections = ceiling,
                        waited,
                        "every provider connection of this mailbox stayed busy: login refused"
                    );
                    Err((
                        format!("max_connections={ceiling} busy for {waited}s"),
                        unavailable(format!(
                            "Every connection to the PEC provider for this mailbox ({ceiling} at most) stayed busy for {waited} seconds; try again in a moment"
                        )),
                    ))
                }
                Err(error @ PoolError::ProviderLimit { .. }) => {
                    tracing::warn!(%error, "login refused: the provider's connection limit");
                    Err((
                        error.to_string(),
                        unavailable(
                            "The PEC provider accepts no more connections for this mailbox right now (its own limit, which other programs using the mailbox share); try again in a moment"
                                .to_owned(),
                        ),
                    ))
                }
                Err(PoolError::Upstream(error)) => {
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
            }
        }
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
        Err((detail, reply)) => {
            let audited = ctx.audit(command, None, detail, Outcome::No).await;
            // Not logged in after all: the place, the registry entry and the identity go.
            ticket.demote();
            ctx.logged_out();
            match audited {
                Ok(()) => LoginResult::Refused(reply),
                Err(_) => LoginResult::AuditFailed,
            }
        }
    }
}
