//! The authenticated relay: client commands to the provider, provider responses to the client.
//!
//! Two loops run concurrently for each session:
//! - *client → provider* ([`client_to_provider`]) frames and parses each command, decides
//!   whether it may be forwarded, registers it as pending and sends its re-encoding upstream;
//!   an APPEND's message is streamed, never held whole.
//! - *provider → client* ([`provider_to_client`]) reads responses unit by unit, passes them
//!   through byte for byte (FETCH literals streamed), rewrites the few that carry capability
//!   lists, and completes pending commands: a tagged response reaches the client only after
//!   its audit event has been queued.
//!
//! They share [`RelayState`] (pending commands, the provider-continuation waiter, the IDLE
//! state and the selected folder: the *client's view*, kept apart from the provider
//! connection) and the client's write half behind an async mutex. The provider→client loop
//! holds that mutex for a whole response unit, so local answers never land inside a literal.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use imap_codec::imap_types::command::CommandBody;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::audit::Outcome;
use crate::imap::authorize::{
    Decision, ListRequest, SessionPolicy, answer_list, authorize, is_mailbox_data, status_visible,
    substitute,
};
use crate::imap::command::{
    self, AuthenticatedAction, CommandSummary, UpstreamStep, append_skeleton, summarize,
};
use crate::imap::framing::{Assembled, CommandAssembler, CommandLimits, tag_of};
use crate::imap::response::{self, ListEntry, ResponseKind, Status, list_entry};
use crate::imap::session::SessionEnd;
use crate::imap::stream::{self, BoxStream, READ_CHUNK};
use crate::session::SessionContext;
use crate::upstream::ProviderConnection;

/// Longest response line relayed (literals excluded: those stream). A SEARCH result over a
/// very large mailbox is the longest line a provider sends in practice.
const MAX_RESPONSE_LINE: usize = 16 * 1024 * 1024;

/// How long the provider has to confirm a LOGOUT before the session is closed anyway.
const LOGOUT_GRACE: Duration = Duration::from_secs(10);

/// A command sent upstream and not yet completed.
struct Pending {
    tag: String,
    summary: CommandSummary,
    effect: Effect,
    /// Placeholders to put back into the provider's answer (hidden folder names).
    substitutions: Vec<(String, String)>,
}

/// What a successful completion changes in the client's view.
#[derive(Clone, PartialEq, Eq)]
enum Effect {
    None,
    Select(String),
    Unselect,
}

/// Whether the provider accepted a synchronising literal.
enum Continuation {
    Go,
    Rejected,
}

/// The client's view of the session, shared by both loops.
#[derive(Default)]
struct RelayState {
    pending: VecDeque<Pending>,
    /// Waiting for the provider's `+` for a literal of this tag.
    continuation: Option<(String, oneshot::Sender<Continuation>)>,
    /// The tag of an IDLE in progress: the next client line must be DONE.
    idle_tag: Option<String>,
    logout_tag: Option<String>,
    selected: Option<String>,
    /// The LIST/LSUB being answered: the provider's full listing is gathered here.
    list_job: Option<ListJob>,
}

/// A client's LIST or LSUB in flight. Only one at a time: untagged LIST lines carry no tag,
/// so they belong to the one job there is.
struct ListJob {
    tag: String,
    request: ListRequest,
    entries: Vec<ListEntry>,
}

/// Most folders gathered for one LIST: far beyond any real mailbox, and a bound on memory.
const MAX_LIST_ENTRIES: usize = 100_000;

/// Writes are buffered (64 KiB) and flushed when the relay is about to wait: a FETCH of many
/// messages goes out in large TLS records instead of one per provider read.
type ClientWriter = tokio::sync::Mutex<BufWriter<WriteHalf<BoxStream>>>;
type ProviderWriter = BufWriter<WriteHalf<BoxStream>>;

const WRITE_BUFFER: usize = 64 * 1024;

/// Relay until the session ends.
pub async fn run(
    ctx: &SessionContext,
    client: BoxStream,
    client_buffer: BytesMut,
    provider: ProviderConnection,
    capabilities: Vec<String>,
    policy: SessionPolicy,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let literal_plus = provider.literal_plus();
    let ProviderConnection {
        reader: mut provider_reader,
        writer: provider_writer,
        buffer: mut provider_buffer,
        ..
    } = provider;
    let mut provider_writer = BufWriter::with_capacity(WRITE_BUFFER, provider_writer);
    let (mut client_reader, client_writer) = tokio::io::split(client);
    let shared = Shared {
        ctx,
        client: tokio::sync::Mutex::new(BufWriter::with_capacity(WRITE_BUFFER, client_writer)),
        state: Mutex::new(RelayState::default()),
        list_done: Notify::new(),
        capabilities: &capabilities,
        policy: &policy,
    };
    let idle_timeout = ctx.gateway.config.gateway.idle_timeout;
    let limits = CommandLimits {
        max_literal: ctx.gateway.config.imap.max_literal_bytes,
        ..CommandLimits::default()
    };

    let end = {
        let upward = client_to_provider(
            &shared,
            &mut client_reader,
            client_buffer,
            &mut provider_writer,
            literal_plus,
            limits,
            idle_timeout,
        );
        let downward = provider_to_client(
            &shared,
            &mut provider_reader,
            &mut provider_buffer,
            shutdown,
        );
        tokio::pin!(upward, downward);
        tokio::select! {
            end = &mut upward => match end {
                // The provider's BYE and tagged OK still have to reach the client.
                UpwardEnd::LogoutSent => tokio::time::timeout(LOGOUT_GRACE, &mut downward)
                    .await
                    .unwrap_or(SessionEnd::Timeout),
                UpwardEnd::Ended(end) => end,
            },
            end = &mut downward => end,
        }
    };

    // Commands the provider never completed are still recorded, as errors.
    let orphans: Vec<Pending> = shared.state.lock().unwrap().pending.drain(..).collect();
    for pending in orphans {
        let _ = ctx
            .audit(
                &pending.summary.name,
                pending.summary.folder.clone(),
                pending.summary.detail.clone(),
                Outcome::Error,
            )
            .await;
    }
    if !matches!(end, SessionEnd::Logout | SessionEnd::UpstreamClosed) {
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            provider_writer.write_all(b"pg9 LOGOUT\r\n").await?;
            provider_writer.flush().await
        })
        .await;
    }
    let mut client_writer = shared.client.into_inner();
    let _ = tokio::time::timeout(Duration::from_secs(3), client_writer.shutdown()).await;
    end
}

/// What both loops of a session share.
struct Shared<'a> {
    ctx: &'a SessionContext,
    client: ClientWriter,
    state: Mutex<RelayState>,
    /// Signalled when a LIST/LSUB job completes.
    list_done: Notify,
    capabilities: &'a [String],
    policy: &'a SessionPolicy,
}

enum UpwardEnd {
    LogoutSent,
    Ended(SessionEnd),
}

/// Write a locally generated answer to the client.
async fn answer(client: &ClientWriter, bytes: &[u8]) -> Result<(), SessionEnd> {
    let mut writer = client.lock().await;
    let result = async {
        writer.write_all(bytes).await?;
        writer.flush().await
    }
    .await;
    result.map_err(|e| SessionEnd::Error(e.to_string()))
}

#[allow(clippy::too_many_arguments)]
async fn client_to_provider(
    shared: &Shared<'_>,
    client: &mut ReadHalf<BoxStream>,
    mut buffer: BytesMut,
    provider: &mut ProviderWriter,
    literal_plus: bool,
    limits: CommandLimits,
    idle_timeout: Duration,
) -> UpwardEnd {
    let Shared {
        ctx,
        client: client_writer,
        state,
        list_done,
        capabilities,
        policy,
    } = shared;
    let mut assembler = CommandAssembler::new(limits);
    macro_rules! try_end {
        ($result:expr) => {
            match $result {
                Ok(value) => value,
                Err(end) => return UpwardEnd::Ended(end),
            }
        };
    }
    loop {
        let assembled = match assembler.poll(&mut buffer, |head, literal| {
            append_skeleton(head, literal).is_some()
        }) {
            Assembled::NeedMore => {
                match tokio::time::timeout(idle_timeout, stream::fill(client, &mut buffer)).await {
                    Ok(Ok(true)) => continue,
                    Ok(Ok(false)) => return UpwardEnd::Ended(SessionEnd::ClientClosed),
                    Ok(Err(e)) => return UpwardEnd::Ended(SessionEnd::Error(e.to_string())),
                    Err(_) => {
                        let _ =
                            answer(client_writer, b"* BYE Autologout: idle for too long\r\n").await;
                        return UpwardEnd::Ended(SessionEnd::Timeout);
                    }
                }
            }
            Assembled::SendContinuation => {
                try_end!(answer(client_writer, b"+ Ready for literal data\r\n").await);
                continue;
            }
            other => other,
        };
        let idle_tag = state.lock().unwrap().idle_tag.clone();
        match assembled {
            Assembled::Refused { tag, reason } => {
                try_end!(
                    refuse(
                        ctx,
                        client_writer,
                        tag.as_deref(),
                        "(unparsed)",
                        None,
                        reason.text()
                    )
                    .await
                );
            }
            Assembled::Command(bytes) if idle_tag.is_some() => {
                if trim_line(&bytes).eq_ignore_ascii_case(b"DONE") {
                    // Cleared here, not when the provider completes the IDLE: a client may
                    // pipeline its next command right after DONE.
                    state.lock().unwrap().idle_tag = None;
                    try_end!(send_upstream(provider, b"DONE\r\n").await);
                } else {
                    try_end!(answer(client_writer, b"* BAD Expected DONE to end IDLE\r\n").await);
                }
            }
            Assembled::Command(bytes) => {
                let mut command = match command::parse_command(&bytes) {
                    Ok(command) => command,
                    Err(error) => {
                        let tag = tag_of(&bytes, &[]);
                        let detail = command::printable(&bytes, 200);
                        tracing::debug!(%error, detail, "unparseable command refused");
                        try_end!(
                            refuse(
                                ctx,
                                client_writer,
                                tag.as_deref(),
                                "(unparsed)",
                                None,
                                &format!("Invalid command: {error}")
                            )
                            .await
                        );
                        continue;
                    }
                };
                let tag = command.tag.as_ref().to_owned();
                let mut summary = summarize(&command);
                if summary.folder.is_none() {
                    summary.folder = state.lock().unwrap().selected.clone();
                }
                if !ctx.gateway.audit.is_healthy() {
                    let _ = answer(
                        client_writer,
                        b"* BYE [UNAVAILABLE] Audit log unavailable: pecgate refuses to work unrecorded\r\n",
                    )
                    .await;
                    return UpwardEnd::Ended(SessionEnd::AuditFailed);
                }
                match command::authenticated_action(&command.body) {
                    AuthenticatedAction::LocalCapability => {
                        try_end!(audited(ctx, &summary, Outcome::Ok).await);
                        let reply = format!(
                            "* CAPABILITY {}\r\n{tag} OK CAPABILITY completed\r\n",
                            capabilities.join(" ")
                        );
                        try_end!(answer(client_writer, reply.as_bytes()).await);
                    }
                    AuthenticatedAction::LocalEnable => {
                        try_end!(audited(ctx, &summary, Outcome::Ok).await);
                        let reply = format!("* ENABLED\r\n{tag} OK ENABLE completed\r\n");
                        try_end!(answer(client_writer, reply.as_bytes()).await);
                    }
                    AuthenticatedAction::Refuse(text) => {
                        try_end!(
                            refuse(
                                ctx,
                                client_writer,
                                Some(&tag),
                                &summary.name,
                                summary.folder.clone(),
                                text
                            )
                            .await
                        );
                    }
                    action @ (AuthenticatedAction::Forward
                    | AuthenticatedAction::ForwardIdle
                    | AuthenticatedAction::ForwardLogout) => {
                        let substitutions = match authorize(&mut command, policy) {
                            Decision::Allow => Vec::new(),
                            Decision::AsNonexistent { substitutions } => substitutions,
                            Decision::CloseAsUnselect => {
                                summary.detail = "without expunge: no delete permission".into();
                                Vec::new()
                            }
                            denial => {
                                try_end!(deny(ctx, client_writer, &tag, &summary, &denial).await);
                                continue;
                            }
                        };
                        let effect = match &command.body {
                            CommandBody::Select { mailbox, .. }
                            | CommandBody::Examine { mailbox, .. } => {
                                Effect::Select(command::mailbox_name(mailbox))
                            }
                            CommandBody::Close | CommandBody::Unselect => Effect::Unselect,
                            _ => Effect::None,
                        };
                        {
                            let mut state = state.lock().unwrap();
                            state.pending.push_back(Pending {
                                tag: tag.clone(),
                                summary,
                                effect,
                                substitutions,
                            });
                            match action {
                                AuthenticatedAction::ForwardIdle => {
                                    state.idle_tag = Some(tag.clone())
                                }
                                AuthenticatedAction::ForwardLogout => {
                                    state.logout_tag = Some(tag.clone())
                                }
                                _ => {}
                            }
                        }
                        let list_request = ListRequest::of(&command.body);
                        if list_request.is_some() {
                            // One LIST/LSUB at a time (see ListJob).
                            loop {
                                let done = list_done.notified();
                                if state.lock().unwrap().list_job.is_none() {
                                    break;
                                }
                                done.await;
                            }
                        }
                        let steps = match list_request {
                            Some(request) => {
                                let bytes = request.provider_command(&tag);
                                state.lock().unwrap().list_job = Some(ListJob {
                                    tag: tag.clone(),
                                    request,
                                    entries: Vec::new(),
                                });
                                vec![UpstreamStep::Send(bytes)]
                            }
                            None => command::upstream_steps(&command, literal_plus),
                        };
                        match run_steps(provider, state, &tag, &steps).await {
                            Ok(Continuation::Go) => {}
                            // The provider refused a literal: its tagged answer completes
                            // the command and is relayed by the other loop.
                            Ok(Continuation::Rejected) => continue,
                            Err(end) => return UpwardEnd::Ended(end),
                        }
                        if action == AuthenticatedAction::ForwardLogout {
                            return UpwardEnd::LogoutSent;
                        }
                    }
                }
            }
            Assembled::MessageLiteral { head, literal } => {
                let Some(mut skeleton) = append_skeleton(&head, &literal) else {
                    unreachable!("the assembler asked the same question")
                };
                let tag = skeleton.tag.as_ref().to_owned();
                let mut summary = summarize(&skeleton);
                summary
                    .detail
                    .push_str(&format!(" size={}", literal.length));
                let substitutions = match authorize(&mut skeleton, policy) {
                    Decision::Allow => Vec::new(),
                    Decision::AsNonexistent { substitutions } => substitutions,
                    denial => {
                        if !literal.sync {
                            // LITERAL+: the message is on its way regardless; drop it.
                            try_end!(discard(client, &mut buffer, u64::from(literal.length)).await);
                            try_end!(skip_line(client, &mut buffer).await);
                        }
                        try_end!(deny(ctx, client_writer, &tag, &summary, &denial).await);
                        continue;
                    }
                };
                state.lock().unwrap().pending.push_back(Pending {
                    tag: tag.clone(),
                    summary,
                    effect: Effect::None,
                    substitutions,
                });
                let steps = command::append_head_steps(&skeleton, literal.length, literal_plus);
                let accepted = match run_steps(provider, state, &tag, &steps).await {
                    Ok(Continuation::Go) => true,
                    Ok(Continuation::Rejected) => false,
                    Err(end) => return UpwardEnd::Ended(end),
                };
                if !accepted {
                    if !literal.sync {
                        // LITERAL+: the client sends the message regardless; drop it.
                        try_end!(discard(client, &mut buffer, u64::from(literal.length)).await);
                        try_end!(skip_line(client, &mut buffer).await);
                    }
                    continue;
                }
                if literal.sync {
                    try_end!(answer(client_writer, b"+ Ready for literal data\r\n").await);
                }
                try_end!(
                    stream_literal(client, &mut buffer, provider, u64::from(literal.length)).await
                );
                // Without MULTIAPPEND (not offered) the command must end right after the
                // message. Anything else leaves the provider mid-command: close, rather
                // than forward bytes that were not parsed.
                let rest = match stream::next_line(client, &mut buffer, 1024).await {
                    Ok(rest) => rest,
                    Err(e) => return UpwardEnd::Ended(SessionEnd::Error(e.to_string())),
                };
                if !trim_line(&rest).is_empty() {
                    let _ = answer(
                        client_writer,
                        format!("{tag} BAD Unexpected data after the APPEND message\r\n* BYE Protocol error\r\n").as_bytes(),
                    )
                    .await;
                    return UpwardEnd::Ended(SessionEnd::Error(
                        "data after an APPEND message".to_owned(),
                    ));
                }
                try_end!(send_upstream(provider, b"\r\n").await);
            }
            Assembled::NeedMore | Assembled::SendContinuation => unreachable!("handled above"),
        }
    }
}

fn trim_line(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

async fn audited(
    ctx: &SessionContext,
    summary: &CommandSummary,
    outcome: Outcome,
) -> Result<(), SessionEnd> {
    ctx.audit(
        &summary.name,
        summary.folder.clone(),
        summary.detail.clone(),
        outcome,
    )
    .await
    .map_err(|_| SessionEnd::AuditFailed)
}

/// Record and answer a command refused by the gateway.
async fn refuse(
    ctx: &SessionContext,
    client: &ClientWriter,
    tag: Option<&str>,
    name: &str,
    folder: Option<String>,
    text: &str,
) -> Result<(), SessionEnd> {
    ctx.audit(name, folder, text.to_owned(), Outcome::Bad)
        .await
        .map_err(|_| SessionEnd::AuditFailed)?;
    answer(
        client,
        format!("{} BAD {text}\r\n", tag.unwrap_or("*")).as_bytes(),
    )
    .await
}

/// Record and answer a command refused by the folder and permission policy.
async fn deny(
    ctx: &SessionContext,
    client: &ClientWriter,
    tag: &str,
    summary: &CommandSummary,
    decision: &Decision,
) -> Result<(), SessionEnd> {
    let text = match decision {
        Decision::DenyPermission(permission) => {
            format!("Permission denied: your roles do not grant \"{permission}\" on this mailbox")
        }
        Decision::DenyName(name) => {
            format!("Permission denied: your roles do not allow a folder named \"{name}\"")
        }
        Decision::DenySubtree(name) => format!(
            "Permission denied: \"{name}\" may have sub-folders outside your roles, so it cannot be renamed or deleted"
        ),
        other => unreachable!("not a denial: {other:?}"),
    };
    tracing::info!(command = %summary.name, folder = ?summary.folder, "denied: {text}");
    ctx.audit(
        &summary.name,
        summary.folder.clone(),
        format!("{} ({text})", summary.detail),
        Outcome::Denied,
    )
    .await
    .map_err(|_| SessionEnd::AuditFailed)?;
    answer(client, format!("{tag} NO [NOPERM] {text}\r\n").as_bytes()).await
}

async fn send_upstream(provider: &mut ProviderWriter, bytes: &[u8]) -> Result<(), SessionEnd> {
    let result = async {
        provider.write_all(bytes).await?;
        provider.flush().await
    }
    .await;
    result.map_err(|_| SessionEnd::UpstreamClosed)
}

/// Send a command's steps, waiting for the provider's `+` where a literal is synchronising.
async fn run_steps(
    provider: &mut ProviderWriter,
    state: &Mutex<RelayState>,
    tag: &str,
    steps: &[UpstreamStep],
) -> Result<Continuation, SessionEnd> {
    let mut steps = steps.iter().peekable();
    while let Some(step) = steps.next() {
        let UpstreamStep::Send(bytes) = step else {
            continue;
        };
        // The waiter is registered before the announcement is sent, so the provider's `+`
        // can never reach the other loop first and be relayed to the client by mistake.
        let waiter = matches!(steps.peek(), Some(UpstreamStep::AwaitContinuation)).then(|| {
            let (tx, rx) = oneshot::channel();
            state.lock().unwrap().continuation = Some((tag.to_owned(), tx));
            rx
        });
        send_upstream(provider, bytes).await?;
        if let Some(rx) = waiter
            && let Continuation::Rejected = wait(rx).await?
        {
            return Ok(Continuation::Rejected);
        }
    }
    Ok(Continuation::Go)
}

async fn wait(rx: oneshot::Receiver<Continuation>) -> Result<Continuation, SessionEnd> {
    rx.await.map_err(|_| SessionEnd::UpstreamClosed)
}

/// Copy `length` bytes of a literal from the client to the provider in bounded chunks.
async fn stream_literal(
    client: &mut ReadHalf<BoxStream>,
    buffer: &mut BytesMut,
    provider: &mut ProviderWriter,
    length: u64,
) -> Result<(), SessionEnd> {
    copy_exact(client, buffer, provider, length)
        .await
        .map_err(|e| match e {
            CopyError::Source(e) => SessionEnd::Error(format!("client: {e}")),
            CopyError::Closed => SessionEnd::ClientClosed,
            CopyError::Sink => SessionEnd::UpstreamClosed,
        })
}

async fn discard(
    client: &mut ReadHalf<BoxStream>,
    buffer: &mut BytesMut,
    length: u64,
) -> Result<(), SessionEnd> {
    copy_exact(client, buffer, &mut tokio::io::sink(), length)
        .await
        .map_err(|_| SessionEnd::ClientClosed)
}

async fn skip_line(
    client: &mut ReadHalf<BoxStream>,
    buffer: &mut BytesMut,
) -> Result<(), SessionEnd> {
    stream::next_line(client, buffer, 64 * 1024)
        .await
        .map(|_| ())
        .map_err(|_| SessionEnd::ClientClosed)
}

enum CopyError {
    Source(std::io::Error),
    Sink,
    Closed,
}

/// Move exactly `length` bytes from `buffer` + `source` to `sink`, never holding more than
/// one read chunk: this is what keeps memory flat in message size.
async fn copy_exact<R, W>(
    source: &mut R,
    buffer: &mut BytesMut,
    sink: &mut W,
    mut length: u64,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    while length > 0 {
        if buffer.is_empty() {
            buffer.reserve(READ_CHUNK);
            if !stream::fill(source, buffer)
                .await
                .map_err(CopyError::Source)?
            {
                return Err(CopyError::Closed);
            }
        }
        let n = (buffer.len() as u64).min(length) as usize;
        sink.write_all(&buffer[..n])
            .await
            .map_err(|_| CopyError::Sink)?;
        buffer.advance(n);
        length -= n as u64;
    }
    Ok(())
}

async fn provider_to_client(
    shared: &Shared<'_>,
    provider: &mut ReadHalf<BoxStream>,
    buffer: &mut BytesMut,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let Shared {
        ctx,
        client,
        state,
        list_done,
        capabilities,
        policy,
    } = shared;
    loop {
        // Between responses: the only place where the session may stop cleanly.
        if !buffer.contains(&b'\n') {
            let mut writer = client.lock().await;
            if writer.flush().await.is_err() {
                return SessionEnd::ClientClosed;
            }
            drop(writer);
            tokio::select! {
                read = stream::fill(provider, buffer) => match read {
                    Ok(true) => continue,
                    Ok(false) | Err(_) => {
                        let logout = state.lock().unwrap().logout_tag.is_some();
                        if logout {
                            return SessionEnd::Logout;
                        }
                        tracing::warn!("the provider closed the connection");
                        let _ = answer(client, b"* BYE The PEC provider closed the connection\r\n").await;
                        return SessionEnd::UpstreamClosed;
                    }
                },
                () = shutdown.cancelled(), if buffer.is_empty() => {
                    let _ = answer(client, b"* BYE pecgate is shutting down\r\n").await;
                    return SessionEnd::Shutdown;
                }
            }
        }
        let line = match stream::next_line(provider, buffer, MAX_RESPONSE_LINE).await {
            Ok(line) => line,
            Err(error) => {
                tracing::warn!(%error, "provider stream ended mid-response");
                let _ = answer(client, b"* BYE The PEC provider connection failed\r\n").await;
                return SessionEnd::UpstreamClosed;
            }
        };
        match response::classify(&line) {
            ResponseKind::Continuation => {
                let waiter = state.lock().unwrap().continuation.take();
                match waiter {
                    Some((_, tx)) => {
                        let _ = tx.send(Continuation::Go);
                    }
                    None => {
                        if let Err(end) = answer(client, &line).await {
                            return end;
                        }
                    }
                }
            }
            ResponseKind::Tagged { tag, status } => {
                let tag = tag.to_owned();
                let (pending, logout) = {
                    let mut state = state.lock().unwrap();
                    if state.continuation.as_ref().is_some_and(|(t, _)| *t == tag) {
                        let (_, tx) = state.continuation.take().unwrap();
                        let _ = tx.send(Continuation::Rejected);
                    }
                    if state.idle_tag.as_deref() == Some(tag.as_str()) {
                        state.idle_tag = None;
                    }
                    let position = state.pending.iter().position(|p| p.tag == tag);
                    let pending = position.and_then(|i| state.pending.remove(i));
                    if let Some(pending) = &pending {
                        match (&pending.effect, status) {
                            (Effect::Select(folder), Status::Ok) => {
                                state.selected = Some(folder.clone())
                            }
                            // A failed SELECT leaves no mailbox selected (RFC 3501 6.3.1).
                            (Effect::Select(_), _) | (Effect::Unselect, Status::Ok) => {
                                state.selected = None
                            }
                            _ => {}
                        }
                    }
                    (pending, state.logout_tag.as_deref() == Some(tag.as_str()))
                };
                let mut line = line.to_vec();
                if let Some(pending) = pending {
                    if !pending.substitutions.is_empty() {
                        line = substitute(&line, &pending.substitutions);
                    }
                    let outcome = match status {
                        // A hidden folder, answered as nonexistent by the provider.
                        _ if !pending.substitutions.is_empty() => Outcome::Denied,
                        Status::Ok => Outcome::Ok,
                        Status::No => Outcome::No,
                        _ => Outcome::Bad,
                    };
                    if audited(ctx, &pending.summary, outcome).await.is_err() {
                        let _ = answer(
                            client,
                            b"* BYE [UNAVAILABLE] Audit log unavailable: pecgate refuses to work unrecorded\r\n",
                        )
                        .await;
                        return SessionEnd::AuditFailed;
                    }
                }
                let finished_list = {
                    let mut state = state.lock().unwrap();
                    match &state.list_job {
                        Some(job) if job.tag == tag => state.list_job.take(),
                        _ => None,
                    }
                };
                let mut out = Vec::new();
                if let Some(job) = finished_list {
                    if status == Status::Ok {
                        for listed in answer_list(&job.request, &job.entries, policy) {
                            out.extend_from_slice(&listed);
                        }
                    }
                    list_done.notify_waiters();
                }
                if response::carries_capabilities(&line) {
                    out.extend_from_slice(&response::replace_capabilities(&line, capabilities));
                } else {
                    out.extend_from_slice(&line);
                }
                if let Err(end) = answer(client, &out).await {
                    return end;
                }
                if logout {
                    return SessionEnd::Logout;
                }
            }
            _ if response::carries_capabilities(&line) => {
                let out = response::replace_capabilities(&line, capabilities);
                if let Err(end) = answer(client, &out).await {
                    return end;
                }
            }
            ResponseKind::UntaggedStatus(Status::Bye) => {
                let logging_out = state.lock().unwrap().logout_tag.is_some();
                if let Err(end) = answer(client, &line).await {
                    return end;
                }
                if !logging_out {
                    tracing::warn!(
                        reply = %command::printable(&line, 200),
                        "the provider ended the session"
                    );
                    return SessionEnd::UpstreamClosed;
                }
            }
            _ if is_mailbox_data(&line) => {
                let unit = match stream::read_unit(provider, buffer, &line, MAX_MAILBOX_DATA).await
                {
                    Ok(unit) => unit,
                    Err(error) => {
                        tracing::warn!(%error, "unreadable mailbox data from the provider");
                        let _ =
                            answer(client, b"* BYE The PEC provider connection failed\r\n").await;
                        return SessionEnd::UpstreamClosed;
                    }
                };
                if let Some(entry) = list_entry(&unit) {
                    // Gathered for the LIST/LSUB job; without one, dropped (closed default).
                    let mut state = state.lock().unwrap();
                    if let Some(job) = state.list_job.as_mut()
                        && job.entries.len() < MAX_LIST_ENTRIES
                    {
                        job.entries.push(entry);
                    }
                } else if status_visible(&unit, policy)
                    && let Err(end) = answer(client, &unit).await
                {
                    return end;
                }
            }
            _ => {
                if let Err(end) = pass_through(provider, buffer, client, line).await {
                    return end;
                }
            }
        }
    }
}

/// Largest mailbox-data response (LIST/LSUB/STATUS) buffered for filtering.
const MAX_MAILBOX_DATA: usize = 64 * 1024;

/// Relay one untagged response byte for byte, streaming its literals.
async fn pass_through(
    provider: &mut ReadHalf<BoxStream>,
    buffer: &mut BytesMut,
    client: &ClientWriter,
    mut line: BytesMut,
) -> Result<(), SessionEnd> {
    let mut writer = client.lock().await;
    loop {
        writer
            .write_all(&line)
            .await
            .map_err(|_| SessionEnd::ClientClosed)?;
        let Some(literal) = crate::imap::framing::literal_at_end(&line) else {
            return Ok(());
        };
        copy_exact(provider, buffer, &mut *writer, u64::from(literal.length))
            .await
            .map_err(|e| match e {
                CopyError::Sink => SessionEnd::ClientClosed,
                CopyError::Source(_) | CopyError::Closed => SessionEnd::UpstreamClosed,
            })?;
        line = stream::next_line(provider, buffer, MAX_RESPONSE_LINE)
            .await
            .map_err(|_| SessionEnd::UpstreamClosed)?;
    }
}
