//! What the IMAP and SMTP front ends share about one client connection: the listener kind,
//! the session's identity ([`SessionContext`]: id, peer, and the user and mailbox once logged
//! in), its audit events, its tracing span, and the server-side TLS handshake.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::Instrument;

use crate::audit::{AuditError, AuditEvent, Outcome, Protocol};
use crate::config::LoginTarget;
use crate::gateway::{Gateway, Live};
use crate::io::BoxStream;
use crate::registry::{Registration, SessionInfo, Stop};

/// Which kind of listener accepted the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// TLS from the first byte (IMAPS 993, SMTPS 465).
    ImplicitTls,
    /// Plain until the client sends STARTTLS (IMAP 143, submission 587); no login before that.
    StartTls,
}

/// A client that does not finish its TLS handshake in this time is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a client's TLS handshake did not complete.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// Not finished within [`HANDSHAKE_TIMEOUT`].
    TimedOut,
    /// The handshake failed; the text is for the log (`TLS handshake: ...`).
    Failed(String),
}

/// A fresh random session id (16 hex digits), as written in the audit log.
pub fn new_session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Identity of a session, for its audit events and its log span.
#[derive(Clone)]
pub struct SessionContext {
    /// The generation this session works under (the current one when it logged in).
    pub gateway: Arc<Gateway>,
    /// The current generation, for the login (a reload may have come since the accept).
    pub live: Live,
    /// How the session is asked to end (shutdown, reload, kick).
    pub stop: Stop,
    /// Its entry in the registry of logged-in sessions, once logged in.
    pub registration: Option<Arc<Registration>>,
    /// The front end serving the session (`Protocol::Imap` or `Protocol::Smtp`).
    pub protocol: Protocol,
    pub id: String,
    pub peer: SocketAddr,
    pub user: Option<String>,
    pub mailbox: Option<String>,
}

impl SessionContext {
    /// A new, not yet authenticated session with a fresh id.
    pub fn new(live: Live, stop: Stop, protocol: Protocol, peer: SocketAddr) -> SessionContext {
        SessionContext {
            gateway: live.current(),
            live,
            stop,
            registration: None,
            protocol,
            id: new_session_id(),
            peer,
            user: None,
            mailbox: None,
        }
    }

    /// The session's tracing span, named after the protocol; `user` and `mailbox` are filled
    /// in by [`SessionContext::logged_in`].
    pub fn span(&self) -> tracing::Span {
        macro_rules! span {
            ($name:literal) => {
                tracing::info_span!(
                    $name,
                    session = %self.id,
                    peer = %self.peer,
                    user = tracing::field::Empty,
                    mailbox = tracing::field::Empty
                )
            };
        }
        match self.protocol {
            Protocol::Imap => span!("imap"),
            Protocol::Smtp => span!("smtp"),
            Protocol::System => span!("system"),
        }
    }

    /// Take the current generation of the gateway: a login is checked against the
    /// configuration in force now, whatever it was when the connection was accepted.
    pub fn refresh(&mut self) -> Arc<Gateway> {
        self.gateway = self.live.current();
        self.gateway.clone()
    }

    /// Record a successful login: later events carry the user and mailbox, and so does the
    /// current span; the session joins the registry (listed, and ended by a reload or a kick).
    pub fn logged_in(&mut self, target: &LoginTarget) {
        self.user = Some(target.user.clone());
        self.mailbox = Some(target.mailbox.clone());
        let span = tracing::Span::current();
        span.record("user", target.user.as_str());
        span.record("mailbox", target.mailbox.as_str());
        let info = SessionInfo {
            session: self.id.clone(),
            user: target.user.clone(),
            mailbox: target.mailbox.clone(),
            protocol: self.protocol.as_str().to_owned(),
            peer: self.peer,
            since: crate::audit::format_timestamp(SystemTime::now()),
            folder: None,
        };
        self.registration = Some(Arc::new(
            self.gateway.registry.register(info, self.stop.clone()),
        ));
        // A reload may have been published while the password was checked, and its sweep of
        // the registry may have run before this session joined it: judge the change here too
        // (a reload publishes before it sweeps, so one of the two always sees the other).
        let current = self.live.current();
        if !Arc::ptr_eq(&current, &self.gateway)
            && let Some(reason) =
                self.gateway
                    .config
                    .revocation(&current.config, &target.user, &target.mailbox)
        {
            self.stop.end(reason);
        }
    }

    /// Undo [`SessionContext::logged_in`]: the login did not complete (the provider refused
    /// it), so the connection is anonymous again and leaves the registry.
    pub fn logged_out(&mut self) {
        self.user = None;
        self.mailbox = None;
        self.registration = None;
    }

    /// Why the session was asked to end, for its goodbye: pecgate's shutdown, or its own
    /// reason (revoked by a reload, kicked by an admin).
    pub fn stop_reason(&self) -> Option<String> {
        self.stop.reason()
    }

    fn event(
        &self,
        command: &str,
        folder: Option<String>,
        detail: String,
        outcome: Outcome,
    ) -> AuditEvent {
        AuditEvent {
            ts: SystemTime::now(),
            session: self.id.clone(),
            user: self.user.clone(),
            mailbox: self.mailbox.clone(),
            peer: self.peer.to_string(),
            protocol: self.protocol,
            command: command.to_owned(),
            folder,
            detail,
            outcome,
        }
    }

    /// Queue an audit event for this session. The caller acknowledges the command to the
    /// client only after this returns `Ok`.
    pub async fn audit(
        &self,
        command: &str,
        folder: Option<String>,
        detail: String,
        outcome: Outcome,
    ) -> Result<(), AuditError> {
        let event = self.event(command, folder, detail, outcome);
        self.gateway
            .metrics
            .command(self.protocol.as_str(), outcome.as_str());
        self.gateway.audit.record(event).await.inspect_err(|error| {
            tracing::error!(%error, "audit log unavailable: refusing to go on unrecorded");
        })
    }

    /// Like [`SessionContext::audit`], but returns once the event is on disk (for the outcome
    /// of a message).
    pub async fn audit_durable(
        &self,
        command: &str,
        folder: Option<String>,
        detail: String,
        outcome: Outcome,
    ) -> Result<(), AuditError> {
        let event = self.event(command, folder, detail, outcome);
        self.gateway
            .metrics
            .command(self.protocol.as_str(), outcome.as_str());
        self.gateway
            .audit
            .record_durable(event)
            .await
            .inspect_err(|error| {
                tracing::error!(%error, "audit log unavailable");
            })
    }

    /// The server side of the TLS handshake, with the gateway's certificate, within
    /// [`HANDSHAKE_TIMEOUT`].
    pub async fn accept_tls(&self, stream: BoxStream) -> Result<BoxStream, HandshakeFailure> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.gateway.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Ok(Box::new(tls)),
            Ok(Err(error)) => {
                tracing::info!(%error, "TLS handshake failed");
                Err(HandshakeFailure::Failed(format!("TLS handshake: {error}")))
            }
            Err(_) => Err(HandshakeFailure::TimedOut),
        }
    }
}

/// Run one connection's session inside `span`, logging its start and how it ended.
pub async fn run_in_span<E: Debug>(
    span: tracing::Span,
    kind: ListenerKind,
    session: impl Future<Output = E>,
) {
    async move {
        tracing::debug!(?kind, "connection accepted");
        let end = session.await;
        tracing::info!(?end, "session ended");
    }
    .instrument(span)
    .await
}
