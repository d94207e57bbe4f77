//! One SMTP client connection: TLS, EHLO, AUTH with personal credentials, then MAIL / RCPT /
//! DATA with the checks, spooling and relay. Every command is audited before it is answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use crate::audit::{Outcome, Protocol};
use crate::config::LoginTarget;
use crate::gateway::{Gateway, Live};
use crate::guard::{AdmissionRefused, Ticket};
use crate::io::{self, BoxStream};
use crate::ledger::{Begun, NewEntry, Status};
use crate::login::{self, LoginFailure, LoginRefusal};
use crate::registry::Stop;
use crate::session::{self, HandshakeFailure, ListenerKind, SessionContext};

use super::checks::{self, MailboxRules, RateSlot};
use super::command::{self, Body, Command, MAX_COMMAND_LINE, Mechanism, SaslLine};
use super::data::DataIntake;
use super::message;
use super::provider::{self, Envelope, SmtpTarget};
use super::reply::{Enhanced, Reply};
use super::spool::SpoolFile;

/// Longest SASL response line (RFC 4954 §4: at least 12288 octets).
const MAX_SASL_LINE: usize = 16 * 1024;
/// Recipients per message.
const MAX_RECIPIENTS: usize = 1000;
/// Protocol errors tolerated before the connection is closed.
const MAX_ERRORS: u32 = 10;
/// Failed authentications tolerated before the connection is closed.
const MAX_AUTH_FAILURES: u32 = 3;

/// How a session ended (for the log and the audit trail).
#[derive(Debug)]
pub enum SessionEnd {
    Quit,
    ClientClosed,
    Timeout,
    Shutdown,
    AuditFailed,
    TooManyErrors,
    Error(String),
}

impl From<HandshakeFailure> for SessionEnd {
    fn from(failure: HandshakeFailure) -> SessionEnd {
        match failure {
            HandshakeFailure::TimedOut => SessionEnd::Timeout,
            HandshakeFailure::Failed(text) => SessionEnd::Error(text),
        }
    }
}

/// An open mail transaction.
struct Transaction {
    body: Body,
    declared_size: u64,
    recipients: Vec<String>,
}

struct Session {
    ctx: SessionContext,
    /// The connection's place: pre-login, a session once authenticated.
    ticket: Ticket,
    stream: BoxStream,
    buffer: BytesMut,
    tls: bool,
    /// `Some(true)` after EHLO, `Some(false)` after HELO.
    greeted: Option<bool>,
    auth: Option<LoginTarget>,
    transaction: Option<Transaction>,
    errors: u32,
    auth_failures: u32,
    connected: Instant,
    /// How the session is asked to end (a clone of the context's).
    stop: Stop,
}

/// Serve one accepted connection to the end.
pub async fn serve(
    live: Live,
    ticket: Ticket,
    tcp: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    stop: Stop,
) {
    let ctx = SessionContext::new(live, stop, Protocol::Smtp, peer);
    let span = ctx.span();
    session::run_in_span(span, kind, run(ctx, ticket, tcp, kind)).await
}

async fn run(
    ctx: SessionContext,
    ticket: Ticket,
    tcp: TcpStream,
    kind: ListenerKind,
) -> SessionEnd {
    if let Err(error) = tcp.set_nodelay(true) {
        return SessionEnd::Error(error.to_string());
    }
    let ctx_stop = ctx.stop.clone();
    let mut session = Session {
        ctx,
        ticket,
        stream: Box::new(tcp),
        buffer: BytesMut::with_capacity(4096),
        tls: false,
        greeted: None,
        auth: None,
        transaction: None,
        errors: 0,
        auth_failures: 0,
        connected: Instant::now(),
        stop: ctx_stop,
    };
    if kind == ListenerKind::ImplicitTls
        && let Err(end) = session.handshake().await
    {
        return end;
    }
    let end = session.serve().await;
    let reason = session.stop.reason();
    let (command, outcome) = match &end {
        SessionEnd::Shutdown if reason.is_some() => ("revoked", Outcome::Ok),
        SessionEnd::Quit => ("logout", Outcome::Ok),
        SessionEnd::AuditFailed => ("disconnect", Outcome::Error),
        _ => ("disconnect", Outcome::Ok),
    };
    let detail = match reason {
        Some(reason) if matches!(end, SessionEnd::Shutdown) => reason,
        _ => format!("{end:?}").to_lowercase(),
    };
    let _ = session.ctx.audit(command, None, detail, outcome).await;
    end
}

impl Session {
    fn gateway(&self) -> &Arc<Gateway> {
        &self.ctx.gateway
    }

    /// The goodbye when the session is asked to end (shutdown, revoked, kicked).
    fn stop_reply(&self) -> Reply {
        shutting_down(self.stop.reason())
    }

    async fn handshake(&mut self) -> Result<(), SessionEnd> {
        // The stream is moved into the handshake; a closed placeholder stands in meanwhile.
        let placeholder: BoxStream =
            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink()));
        let plain = std::mem::replace(&mut self.stream, placeholder);
        self.stream = self.ctx.accept_tls(plain).await?;
        self.tls = true;
        Ok(())
    }

    async fn send(&mut self, reply: &Reply) -> Result<(), SessionEnd> {
        let bytes = reply.to_bytes();
        let result = async {
            self.stream.write_all(&bytes).await?;
            self.stream.flush().await
        }
        .await;
        result.map_err(|e| SessionEnd::Error(e.to_string()))
    }

    /// Audit, then answer. An unavailable audit log closes the session.
    async fn respond(
        &mut self,
        command: &str,
        detail: String,
        outcome: Outcome,
        reply: &Reply,
    ) -> Result<(), SessionEnd> {
        if self
            .ctx
            .audit(command, None, detail, outcome)
            .await
            .is_err()
        {
            let _ = self.send(&audit_unavailable()).await;
            return Err(SessionEnd::AuditFailed);
        }
        self.send(reply).await?;
        if reply.code >= 500 && outcome == Outcome::Bad {
            self.errors += 1;
            return self
                .close_after(
                    self.errors,
                    MAX_ERRORS,
                    "Too many errors; closing the connection",
                )
                .await;
        }
        Ok(())
    }

    /// After a failure: once `count` reaches `max`, say why (`421 4.7.0 {text}`) and close.
    async fn close_after(&mut self, count: u32, max: u32, text: &str) -> Result<(), SessionEnd> {
        if count < max {
            return Ok(());
        }
        let _ = self.send(&Reply::new(421, Enhanced(4, 7, 0), text)).await;
        Err(SessionEnd::TooManyErrors)
    }

    fn command_deadline(&self) -> tokio::time::Instant {
        let deadline = if self.auth.is_some() {
            Instant::now() + self.gateway().config.gateway.idle_timeout
        } else {
            self.connected + self.gateway().config.gateway.login_timeout
        };
        deadline.into()
    }

    /// The next line from the client. `interruptible`: pecgate's shutdown ends the wait.
    async fn read_line(&mut self, max: usize, interruptible: bool) -> Result<Vec<u8>, SessionEnd> {
        let deadline = self.command_deadline();
        loop {
            if let Some(end) = command::line_end(&self.buffer) {
                if end > max {
                    return Err(self.line_too_long().await);
                }
                return Ok(self.buffer.split_to(end).to_vec());
            }
            if self.buffer.len() > max {
                return Err(self.line_too_long().await);
            }
            tokio::select! {
                read = io::fill(&mut self.stream, &mut self.buffer) => match read {
                    Ok(true) => {}
                    Ok(false) => return Err(SessionEnd::ClientClosed),
                    Err(e) => return Err(SessionEnd::Error(e.to_string())),
                },
                () = tokio::time::sleep_until(deadline) => {
                    let _ = self.send(&Reply::new(421, Enhanced(4, 4, 2), "Timeout: closing the connection")).await;
                    return Err(SessionEnd::Timeout);
                }
                () = self.stop.stopped(), if interruptible => {
                    let _ = self.send(&self.stop_reply()).await;
                    return Err(SessionEnd::Shutdown);
                }
            }
        }
    }

    async fn line_too_long(&mut self) -> SessionEnd {
        let _ = self
            .ctx
            .audit("(unparsed)", None, "line too long".to_owned(), Outcome::Bad)
            .await;
        let _ = self
            .send(&Reply::new(
                500,
                Enhanced(5, 5, 2),
                "Line too long; closing the connection",
            ))
            .await;
        SessionEnd::Error("line too long".to_owned())
    }

    async fn serve(&mut self) -> SessionEnd {
        let greeting = Reply::plain(
            220,
            format!("{} ESMTP pecgate ready", self.gateway().smtp.hostname),
        );
        if let Err(end) = self.send(&greeting).await {
            return end;
        }
        loop {
            if self.stop.is_stopped() {
                let _ = self.send(&self.stop_reply()).await;
                return SessionEnd::Shutdown;
            }
            let line = match self.read_line(MAX_COMMAND_LINE, true).await {
                Ok(line) => line,
                Err(end) => return end,
            };
            let command = match command::parse(&line) {
                Ok(command) => command,
                Err(reply) => {
                    let detail = command::printable(&String::from_utf8_lossy(&line), 100);
                    if let Err(end) = self
                        .respond("(unparsed)", detail, Outcome::Bad, &reply)
                        .await
                    {
                        return end;
                    }
                    continue;
                }
            };
            if let Err(end) = self.dispatch(command).await {
                return end;
            }
        }
    }

    async fn dispatch(&mut self, command: Command) -> Result<(), SessionEnd> {
        let name = command.name();
        let detail = command.audit_detail();
        match command {
            Command::Ehlo(client) | Command::Helo(client) => {
                let esmtp = name == "EHLO";
                self.greeted = Some(esmtp);
                self.transaction = None;
                let reply = if esmtp {
                    command::ehlo_reply(
                        &self.gateway().smtp.hostname,
                        &client,
                        self.tls,
                        self.advertised_size(),
                    )
                } else {
                    Reply::plain(250, self.gateway().smtp.hostname.clone())
                };
                self.respond(name, detail, Outcome::Ok, &reply).await
            }
            Command::StartTls => {
                if self.tls {
                    let reply = Reply::new(503, Enhanced(5, 5, 1), "TLS is already active");
                    return self
                        .respond(name, "already using TLS".into(), Outcome::Bad, &reply)
                        .await;
                }
                let reply = Reply::new(220, Enhanced(2, 0, 0), "Ready to start TLS");
                self.respond(name, detail, Outcome::Ok, &reply).await?;
                // Anything pipelined after STARTTLS came in clear text and could have been
                // injected by a man in the middle: discard it (RFC 3207 §4.2).
                self.buffer.clear();
                self.handshake().await?;
                self.greeted = None;
                self.transaction = None;
                Ok(())
            }
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial, detail).await,
            Command::Mail { from, size, body } => self.mail(from, size, body, detail).await,
            Command::Rcpt { to } => self.rcpt(to, detail).await,
            Command::Data => self.data().await,
            Command::Rset => {
                self.transaction = None;
                let reply = Reply::new(250, Enhanced(2, 0, 0), "Reset");
                self.respond(name, detail, Outcome::Ok, &reply).await
            }
            Command::Noop => {
                let reply = Reply::new(250, Enhanced(2, 0, 0), "OK");
                self.respond(name, detail, Outcome::Ok, &reply).await
            }
            Command::Help => {
                let reply = Reply::new(
                    214,
                    Enhanced(2, 0, 0),
                    "pecgate: log in with your personal account (AUTH), then send from the mailbox's PEC address",
                );
                self.respond(name, detail, Outcome::Ok, &reply).await
            }
            Command::Quit => {
                let reply = Reply::new(221, Enhanced(2, 0, 0), "Bye");
                self.respond(name, detail, Outcome::Ok, &reply).await?;
                Err(SessionEnd::Quit)
            }
            Command::NotImplemented(what) => {
                let reply = Reply::new(502, Enhanced(5, 5, 1), format!("{what} is not supported"));
                self.respond(name, detail, Outcome::Bad, &reply).await
            }
        }
    }

    /// SIZE in EHLO: the mailbox's limit once authenticated, else the largest of any mailbox.
    fn advertised_size(&self) -> u64 {
        let config = &self.gateway().config;
        match &self.auth {
            Some(target) => config
                .mailboxes
                .get(&target.mailbox)
                .map_or(0, |m| m.max_message_bytes),
            None => config
                .mailboxes
                .values()
                .map(|m| m.max_message_bytes)
                .max()
                .unwrap_or(crate::config::DEFAULT_MAX_MESSAGE_BYTES),
        }
    }

    async fn read_sasl(&mut self, prompt: &str) -> Result<SaslLine, SessionEnd> {
        self.send(&Reply::plain(334, prompt)).await?;
        let line = Zeroizing::new(self.read_line(MAX_SASL_LINE, false).await?);
        Ok(command::sasl_line(&line))
    }

    async fn auth(
        &mut self,
        mechanism: Mechanism,
        initial: Option<String>,
        detail: String,
    ) -> Result<(), SessionEnd> {
        let initial = initial.map(Zeroizing::new);
        let refuse = |code, enhanced, text: &str| Reply::new(code, enhanced, text);
        if !self.tls {
            let reply = refuse(
                530,
                Enhanced(5, 7, 0),
                "Must issue a STARTTLS command first",
            );
            return self
                .respond("AUTH", "before STARTTLS".into(), Outcome::Denied, &reply)
                .await;
        }
        if self.greeted != Some(true) {
            let reply = refuse(503, Enhanced(5, 5, 1), "Send EHLO first");
            return self.respond("AUTH", detail, Outcome::Bad, &reply).await;
        }
        if self.auth.is_some() {
            let reply = refuse(503, Enhanced(5, 5, 1), "Already authenticated");
            return self.respond("AUTH", detail, Outcome::Bad, &reply).await;
        }
        let decode_initial = |text: &str| command::sasl_line(text.as_bytes());
        let (login, secret) = match mechanism {
            Mechanism::Other => {
                let reply = refuse(
                    504,
                    Enhanced(5, 5, 4),
                    "Unrecognized authentication type: use PLAIN or LOGIN",
                );
                return self.respond("AUTH", detail, Outcome::Bad, &reply).await;
            }
            Mechanism::Plain => {
                let response = match &initial {
                    Some(text) => decode_initial(text),
                    None => self.read_sasl("").await?,
                };
                let parsed = match response {
                    SaslLine::Data(bytes) => crate::password::parse_sasl_plain(&bytes),
                    SaslLine::Cancel => return self.auth_cancelled(detail).await,
                    SaslLine::Invalid => None,
                };
                match parsed {
                    Some(pair) => pair,
                    None => return self.auth_malformed(detail).await,
                }
            }
            Mechanism::Login => {
                let user = match &initial {
                    Some(text) => decode_initial(text),
                    None => self.read_sasl(command::LOGIN_USERNAME_PROMPT).await?,
                };
                let user = match user {
                    SaslLine::Data(bytes) => match String::from_utf8(bytes.to_vec()) {
                        Ok(user) if !user.is_empty() => user,
                        _ => return self.auth_malformed(detail).await,
                    },
                    SaslLine::Cancel => return self.auth_cancelled(detail).await,
                    SaslLine::Invalid => return self.auth_malformed(detail).await,
                };
                match self.read_sasl(command::LOGIN_PASSWORD_PROMPT).await? {
                    SaslLine::Data(secret) => (user, secret),
                    SaslLine::Cancel => return self.auth_cancelled(detail).await,
                    SaslLine::Invalid => return self.auth_malformed(detail).await,
                }
            }
        };
        let gateway = self.ctx.refresh();
        let peer = self.ctx.peer.ip();
        match login::check_credentials(
            &gateway.config,
            &gateway.logins,
            &mut self.ticket,
            peer,
            &login,
            secret,
        )
        .await
        {
            Ok(target) => {
                gateway.metrics.login("ok");
                self.ctx.logged_in(&target);
                tracing::info!("authenticated");
                let reply = Reply::new(
                    235,
                    Enhanced(2, 7, 0),
                    format!(
                        "Authenticated as {} on mailbox {}",
                        target.user, target.mailbox
                    ),
                );
                self.auth = Some(target);
                self.respond(
                    "AUTH",
                    format!("login={login:?} {detail}"),
                    Outcome::Ok,
                    &reply,
                )
                .await
            }
            Err(failure) => {
                gateway.metrics.login(failure.refusal.metric_label());
                // RFC 4954: 454 for a temporary failure, 535 when the credentials are refused.
                let temporary = |text: String| Reply::new(454, Enhanced(4, 7, 0), text);
                let text = match &failure.refusal {
                    LoginRefusal::BadCredentials { .. } | LoginRefusal::Locked(_) => {
                        "Authentication failed: wrong user name or password".to_owned()
                    }
                    LoginRefusal::Busy => {
                        return self
                            .auth_refused(
                                &failure,
                                &login,
                                &detail,
                                temporary("Too many logins at once; try again in a moment".into()),
                            )
                            .await;
                    }
                    LoginRefusal::TooManySessions(refused) => {
                        let text = if *refused == AdmissionRefused::UserFull {
                            format!(
                                "Too many sessions open for {} (at most {})",
                                failure.user_name, gateway.config.gateway.max_sessions_per_user
                            )
                        } else {
                            "pecgate is serving as many sessions as it may; try again later"
                                .to_owned()
                        };
                        return self
                            .auth_refused(&failure, &login, &detail, temporary(text))
                            .await;
                    }
                    LoginRefusal::NoMailboxChosen { choices } => format!(
                        "Choose a mailbox: log in as {}/MAILBOX (one of: {})",
                        failure.user_name,
                        choices.join(", ")
                    ),
                    LoginRefusal::MailboxNotGranted(_) => {
                        "Your roles do not grant that mailbox".to_owned()
                    }
                };
                let reply = Reply::new(535, Enhanced(5, 7, 8), text);
                self.auth_refused(&failure, &login, &detail, reply).await?;
                self.auth_failures += 1;
                self.close_after(
                    self.auth_failures,
                    MAX_AUTH_FAILURES,
                    "Too many failed logins; closing the connection",
                )
                .await
            }
        }
    }

    /// Audit a refused AUTH under the user it named (when that user exists), then answer.
    async fn auth_refused(
        &mut self,
        failure: &LoginFailure,
        login: &str,
        detail: &str,
        reply: Reply,
    ) -> Result<(), SessionEnd> {
        let event_user = std::mem::replace(&mut self.ctx.user, failure.user.clone());
        let result = self
            .respond(
                "AUTH",
                format!("{} {detail}", failure.audit_detail(login)),
                Outcome::No,
                &reply,
            )
            .await;
        self.ctx.user = event_user;
        result
    }

    async fn auth_cancelled(&mut self, detail: String) -> Result<(), SessionEnd> {
        let reply = Reply::new(501, Enhanced(5, 0, 0), "Authentication cancelled");
        self.respond("AUTH", format!("cancelled {detail}"), Outcome::Bad, &reply)
            .await
    }

    async fn auth_malformed(&mut self, detail: String) -> Result<(), SessionEnd> {
        let reply = Reply::new(501, Enhanced(5, 5, 2), "Malformed authentication response");
        self.respond("AUTH", format!("malformed {detail}"), Outcome::Bad, &reply)
            .await
    }

    /// Why MAIL may not start now, if it may not.
    fn mail_precondition(&self) -> Option<(Reply, Outcome)> {
        if !self.tls {
            return Some((
                Reply::new(
                    530,
                    Enhanced(5, 7, 0),
                    "Must issue a STARTTLS command first",
                ),
                Outcome::Denied,
            ));
        }
        if self.auth.is_none() {
            return Some((
                Reply::new(
                    530,
                    Enhanced(5, 7, 0),
                    "Authentication required: log in with your personal pecgate account",
                ),
                Outcome::Denied,
            ));
        }
        if self.greeted.is_none() {
            return Some((
                Reply::new(503, Enhanced(5, 5, 1), "Send EHLO first"),
                Outcome::Bad,
            ));
        }
        if self.transaction.is_some() {
            return Some((
                Reply::new(503, Enhanced(5, 5, 1), "Sender already specified"),
                Outcome::Bad,
            ));
        }
        None
    }

    async fn mail(
        &mut self,
        from: String,
        size: u64,
        body: Body,
        detail: String,
    ) -> Result<(), SessionEnd> {
        if let Some((reply, outcome)) = self.mail_precondition() {
            return self.respond("MAIL", detail, outcome, &reply).await;
        }
        let gateway = self.gateway().clone();
        let target = self.auth.as_ref().expect("checked above");
        let mailbox = &gateway.mailboxes[&target.mailbox];
        let rules = MailboxRules {
            name: &mailbox.name,
            address: &mailbox.config.address,
            permissions: gateway.config.permissions(&target.user, &target.mailbox),
            has_smtp: mailbox.config.smtp.is_some(),
            has_password: mailbox.password.is_some(),
            max_message_bytes: mailbox.config.max_message_bytes,
        };
        if let Err(reply) = checks::check_mail_from(&rules, &from, size) {
            if reply.code == 451 {
                tracing::error!(
                    "no provider password in the vault for this mailbox: run `pecgate vault set {}`",
                    mailbox.name
                );
            }
            let detail = format!(
                "{detail} refused={}",
                reply.enhanced.map_or(String::new(), |e| e.to_string())
            );
            return self.respond("MAIL", detail, Outcome::Denied, &reply).await;
        }
        let rate_refusal = gateway.smtp.rate.get(&mailbox.name).and_then(|limiter| {
            let mut limiter = limiter.lock().unwrap_or_else(|e| e.into_inner());
            limiter
                .wait_time(Instant::now())
                .map(|wait| limiter.reply(&mailbox.name, wait))
        });
        if let Some(reply) = rate_refusal {
            return self
                .respond(
                    "MAIL",
                    format!("{detail} refused=send_rate"),
                    Outcome::Denied,
                    &reply,
                )
                .await;
        }
        self.transaction = Some(Transaction {
            body,
            declared_size: size,
            recipients: Vec::new(),
        });
        let reply = Reply::new(250, Enhanced(2, 1, 0), format!("Sender <{from}> OK"));
        self.respond("MAIL", detail, Outcome::Ok, &reply).await
    }

    async fn rcpt(&mut self, to: String, detail: String) -> Result<(), SessionEnd> {
        let limit = self.mailbox_limit();
        let Some(transaction) = &mut self.transaction else {
            let reply = Reply::new(503, Enhanced(5, 5, 1), "Need MAIL before RCPT");
            return self.respond("RCPT", detail, Outcome::Bad, &reply).await;
        };
        if to.is_empty() {
            let reply = Reply::new(501, Enhanced(5, 1, 3), "Empty recipient address");
            return self.respond("RCPT", detail, Outcome::Bad, &reply).await;
        }
        if transaction
            .recipients
            .iter()
            .any(|r| message::same_address(r, &to))
        {
            let reply = Reply::new(
                250,
                Enhanced(2, 1, 5),
                format!("Recipient <{to}> already listed"),
            );
            return self
                .respond("RCPT", format!("{detail} duplicate"), Outcome::Ok, &reply)
                .await;
        }
        if transaction.recipients.len() >= MAX_RECIPIENTS {
            let reply = Reply::new(
                452,
                Enhanced(4, 5, 3),
                format!("Too many recipients (at most {MAX_RECIPIENTS} per message)"),
            );
            return self.respond("RCPT", detail, Outcome::Denied, &reply).await;
        }
        if let Err(reply) = checks::check_size(
            transaction.declared_size,
            transaction.recipients.len() + 1,
            limit,
        ) {
            return self
                .respond(
                    "RCPT",
                    format!("{detail} refused=size"),
                    Outcome::Denied,
                    &reply,
                )
                .await;
        }
        transaction.recipients.push(to.clone());
        let reply = Reply::new(250, Enhanced(2, 1, 5), format!("Recipient <{to}> OK"));
        self.respond("RCPT", detail, Outcome::Ok, &reply).await
    }

    fn mailbox_limit(&self) -> u64 {
        self.auth
            .as_ref()
            .and_then(|t| self.gateway().config.mailboxes.get(&t.mailbox))
            .map_or(0, |m| m.max_message_bytes)
    }

    async fn data(&mut self) -> Result<(), SessionEnd> {
        let transaction = match self.transaction.take() {
            Some(t) if !t.recipients.is_empty() => t,
            Some(t) => {
                self.transaction = Some(t);
                let reply = Reply::new(554, Enhanced(5, 5, 1), "No valid recipients");
                return self
                    .respond("DATA", String::new(), Outcome::Bad, &reply)
                    .await;
            }
            None => {
                let reply = Reply::new(503, Enhanced(5, 5, 1), "Need MAIL and RCPT before DATA");
                return self
                    .respond("DATA", String::new(), Outcome::Bad, &reply)
                    .await;
            }
        };
        let gateway = self.gateway().clone();
        let target = self
            .auth
            .clone()
            .expect("a transaction needs authentication");
        let mailbox = &gateway.mailboxes[&target.mailbox];
        let limit = mailbox.config.max_message_bytes;
        let recipients = transaction.recipients;

        let mut spool = match SpoolFile::create(&gateway.smtp.spool_dir, &self.ctx.id).await {
            Ok(spool) => spool,
            Err(error) => {
                tracing::error!(%error, dir = %gateway.smtp.spool_dir.display(), "cannot create a spool file");
                let reply = local_error();
                return self
                    .respond("DATA", format!("spool: {error}"), Outcome::Error, &reply)
                    .await;
            }
        };
        self.send(&Reply::plain(354, "End data with <CR><LF>.<CR><LF>"))
            .await?;

        // Receive: memory stays at one read buffer whatever the message size.
        let mut intake = DataIntake::new(checks::size_limit(limit, recipients.len()));
        let mut out = Vec::with_capacity(io::READ_CHUNK);
        let mut spool_error = None;
        loop {
            let mut input = &self.buffer[..];
            let done = intake.ingest(&mut input, &mut out);
            let consumed = self.buffer.len() - input.len();
            self.buffer.advance(consumed);
            if !out.is_empty()
                && spool_error.is_none()
                && let Err(error) = spool.write(&out).await
            {
                spool_error = Some(error);
            }
            out.clear();
            if done {
                break;
            }
            let deadline = tokio::time::Instant::now() + gateway.config.gateway.idle_timeout;
            tokio::select! {
                read = io::fill(&mut self.stream, &mut self.buffer) => match read {
                    Ok(true) => {}
                    Ok(false) => return Err(SessionEnd::ClientClosed),
                    Err(e) => return Err(SessionEnd::Error(e.to_string())),
                },
                () = tokio::time::sleep_until(deadline) => {
                    let _ = self.send(&Reply::new(421, Enhanced(4, 4, 2), "Timeout while receiving the message")).await;
                    return Err(SessionEnd::Timeout);
                }
            }
        }
        let received = intake.size();
        if let Some(error) = spool_error.or(spool.close_write().await.err()) {
            tracing::error!(%error, "cannot write the spool file");
            return self
                .respond(
                    "DATA",
                    format!("spool: {error}"),
                    Outcome::Error,
                    &local_error(),
                )
                .await;
        }
        let header = match intake.finish() {
            Ok((header, _)) => header,
            Err(problem) => {
                let reply = checks::data_problem_reply(problem, received, recipients.len(), limit);
                let detail = format!(
                    "size={received} recipients={} refused={problem:?}",
                    recipients.len()
                );
                return self.respond("DATA", detail, Outcome::Denied, &reply).await;
            }
        };
        let summary = match message::summarize(&header) {
            Ok(summary) => summary,
            Err(error) => {
                let reply = checks::header_error_reply(&error);
                let detail = format!("size={received} refused=header: {error}");
                return self.respond("DATA", detail, Outcome::Denied, &reply).await;
            }
        };
        if let Err(reply) = checks::check_message(&mailbox.config.address, &recipients, &summary) {
            let detail = format!(
                "size={received} recipients={} refused={} {summary}",
                recipients.len(),
                reply.enhanced.map_or(String::new(), |e| e.to_string())
            );
            return self.respond("DATA", detail, Outcome::Denied, &reply).await;
        }

        let now = SystemTime::now();
        let (message_id, generated) = match &summary.message_id {
            Some(id) => (id.clone(), false),
            None => (
                message::generate_message_id(&mailbox.config.address, now),
                true,
            ),
        };
        let prefix = message::relay_prefix(
            &gateway.smtp.hostname,
            &self.ctx.id,
            generated.then_some(message_id.as_str()),
            now,
        );
        let size = received + prefix.len() as u64;
        let base_detail = format!(
            "message-id={message_id}{} size={size} recipients={}",
            if generated { " (generated)" } else { "" },
            recipients.len()
        );

        // The send rate, now for real: a slot is taken and given back if nothing is sent.
        let slot = match self.take_rate_slot(&mailbox.name) {
            Ok(slot) => slot,
            Err(reply) => {
                return self
                    .respond(
                        "DATA",
                        format!("{base_detail} refused=send_rate"),
                        Outcome::Denied,
                        &reply,
                    )
                    .await;
            }
        };
        let release = |slot: Option<RateSlot>| {
            if let (Some(slot), Some(limiter)) = (slot, gateway.smtp.rate.get(&mailbox.name)) {
                limiter
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .release(slot);
            }
        };

        // The ledger row goes in before anything is sent.
        let Some(ledger) = gateway.smtp.ledger.clone() else {
            release(slot);
            tracing::error!("no sent ledger: refusing to send unrecorded");
            return self
                .respond(
                    "DATA",
                    format!("{base_detail} no ledger"),
                    Outcome::Error,
                    &ledger_unavailable(),
                )
                .await;
        };
        let entry = NewEntry {
            message_id: message_id.clone(),
            generated_id: generated,
            session: self.ctx.id.clone(),
            user: target.user.clone(),
            mailbox: target.mailbox.clone(),
            sender: mailbox.config.address.clone(),
            recipients: recipients.clone(),
            subject: summary.subject.clone(),
            size,
        };
        let row = match ledger.begin(entry).await {
            Ok(Begun::Row(row)) => row,
            Ok(Begun::AlreadySent {
                status,
                submitted_at,
            }) => {
                // The same message again (a client retrying after a timeout or an unclear
                // answer): it did or may have reached the provider, and a PEC sent twice is
                // two legal sendings. Refused permanently, so the user sees why instead of a
                // silent second send.
                release(slot);
                gateway.metrics.smtp_message("duplicate");
                let reply = Reply::new(
                    554,
                    Enhanced(5, 7, 1),
                    format!(
                        "This message (Message-ID {message_id}) was already handed to the PEC provider at {submitted_at} (status {status}); it is not sent again. Check its receipts; to send it anyway, send it as a new message"
                    ),
                );
                return self
                    .respond(
                        "DATA",
                        format!("{base_detail} refused=duplicate earlier={status}"),
                        Outcome::Denied,
                        &reply,
                    )
                    .await;
            }
            Err(error) => {
                release(slot);
                tracing::error!(%error, "cannot write the sent ledger: refusing to send unrecorded");
                return self
                    .respond(
                        "DATA",
                        format!("{base_detail} ledger: {error}"),
                        Outcome::Error,
                        &ledger_unavailable(),
                    )
                    .await;
            }
        };

        let (Some(endpoint), Some(password)) = (&mailbox.config.smtp, &mailbox.password) else {
            unreachable!("checked at MAIL FROM");
        };
        let smtp_target = SmtpTarget {
            endpoint,
            tls: mailbox.provider_tls.clone(),
            login: &mailbox.config.login,
            password: password.expose(),
            timeout: gateway.provider_timeout,
            hostname: &gateway.smtp.hostname,
        };
        let envelope = Envelope {
            from: &mailbox.config.address,
            recipients: &recipients,
            eight_bit: transaction.body == Body::EightBitMime,
            prefix: &prefix,
            spool: &spool,
            size,
        };
        tracing::info!(%message_id, size, recipients = recipients.len(), "relaying to the provider");
        let relayed = provider::relay(&smtp_target, &envelope).await;
        drop(spool);

        let (reply, status, outcome, detail) = match relayed {
            Ok(reply) if reply.is_positive() => {
                tracing::info!(%message_id, reply = %reply, "the provider accepted the message");
                let detail = format!("{base_detail} provider=\"{}\"", reply.summary());
                (reply, Status::Accepted, Outcome::Ok, detail)
            }
            Ok(reply) => {
                release(slot);
                tracing::info!(%message_id, reply = %reply, "the provider refused the message");
                let (status, outcome) = if reply.is_transient() {
                    (Status::Failed, Outcome::Error)
                } else {
                    (Status::Rejected, Outcome::No)
                };
                let detail = format!("{base_detail} provider=\"{}\"", reply.summary());
                (reply, status, outcome, detail)
            }
            Err(error) if error.outcome_unknown() => {
                // The slot stays taken: the message may have left.
                tracing::error!(%error, %message_id, "the provider did not confirm the message: outcome unknown");
                let reply = Reply::new(
                    451,
                    Enhanced(4, 4, 2),
                    format!(
                        "The PEC provider did not confirm the message (Message-ID {message_id}): it may have been sent. Check its receipts before sending it again; pecgate will not send it twice"
                    ),
                );
                let detail = format!("{base_detail} upstream-error=\"{error}\"");
                (reply, Status::Unknown, Outcome::Error, detail)
            }
            Err(error) => {
                release(slot);
                tracing::error!(%error, %message_id, "cannot relay to the provider");
                let reply = if error.is_login_rejected() {
                    Reply::new(
                        451,
                        Enhanced(4, 3, 0),
                        format!(
                            "pecgate cannot log in to the PEC provider for mailbox {} (the stored provider password was refused); nothing was sent. Tell IT",
                            mailbox.name
                        ),
                    )
                } else {
                    Reply::new(
                        451,
                        Enhanced(4, 4, 1),
                        "The PEC provider cannot be reached right now; nothing was sent, try again later",
                    )
                };
                let detail = format!("{base_detail} upstream-error=\"{error}\"");
                (reply, Status::Failed, Outcome::Error, detail)
            }
        };
        gateway.metrics.smtp_message(status.as_str());
        if let Err(error) = ledger.finish(row, status, reply.summary()).await {
            tracing::error!(%error, %message_id, row, "cannot complete the sent ledger row (the audit log has the outcome)");
        }
        let audited = self.ctx.audit_durable("DATA", None, detail, outcome).await;
        // The provider has answered: the client gets that answer, recorded or not.
        self.send(&reply).await?;
        if audited.is_err() {
            let _ = self.send(&audit_unavailable()).await;
            return Err(SessionEnd::AuditFailed);
        }
        Ok(())
    }

    fn take_rate_slot(&self, mailbox: &str) -> Result<Option<RateSlot>, Reply> {
        let Some(limiter) = self.gateway().smtp.rate.get(mailbox) else {
            return Ok(None);
        };
        let mut limiter = limiter.lock().unwrap_or_else(|e| e.into_inner());
        limiter
            .acquire(Instant::now())
            .map(Some)
            .map_err(|wait| limiter.reply(mailbox, wait))
    }
}

fn shutting_down(reason: Option<String>) -> Reply {
    match reason {
        Some(reason) => Reply::new(421, Enhanced(4, 7, 0), format!("Session ended: {reason}")),
        None => Reply::new(
            421,
            Enhanced(4, 3, 2),
            "pecgate is shutting down; try again later",
        ),
    }
}

fn audit_unavailable() -> Reply {
    Reply::new(
        421,
        Enhanced(4, 3, 0),
        "Audit log unavailable; closing the connection",
    )
}

fn local_error() -> Reply {
    Reply::new(
        451,
        Enhanced(4, 3, 0),
        "Local error in pecgate; nothing was sent, try again later",
    )
}

fn ledger_unavailable() -> Reply {
    Reply::new(
        451,
        Enhanced(4, 3, 0),
        "pecgate cannot record the message in its sent ledger; nothing was sent, try again later",
    )
}
