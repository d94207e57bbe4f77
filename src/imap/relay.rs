//! The I/O driver of a logged-in IMAP session: sockets in, [`ClientSession`] and
//! [`ProviderClient`] decide, sockets out.
//!
//! Two loops run concurrently, so neither direction can block the other (a client busy
//! sending an APPEND while the provider streams it a FETCH must not deadlock):
//! - *upward* ([`upward`]) frames what the client sends, hands it to the session machine and
//!   carries out its actions: audit first, then pecgate's own encoding of the command to the
//!   provider (waiting for the provider's `+` where a literal is synchronising), or a local
//!   answer. An APPEND's message is streamed in bounded chunks, never held whole.
//! - *downward* ([`downward`]) reads provider responses unit by unit, has the provider client
//!   attribute each one and the session machine decide what the client sees: streamed as it
//!   comes (FETCH literals in bounded chunks), rewritten (capabilities, hidden names), gathered
//!   (LIST, STATUS) or refused by ending the session.
//!
//! Both machines sit behind one synchronous mutex, never held across an await. The client's
//! write half sits behind an async mutex that the downward loop holds for a whole response
//! unit, so nothing pecgate says itself can land inside a literal.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWriteExt, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{Notify, oneshot};

use imap_codec::imap_types::command::{Command, CommandBody};

use crate::body_cache;
use crate::imap::authorize::{SessionPolicy, rename_rfc822_items};
use crate::imap::cached_fetch::{self, Bodies, BodyCapture};
use crate::imap::client_session::{
    Action, AuditRecord, ClientSession, Ending, Request, Submit, UntaggedPlan,
};
use crate::imap::command::{UpstreamStep, append_skeleton, parse_command};
use crate::imap::framing::{Assembled, CommandAssembler, CommandLimits, literal_at_end, tag_of};
use crate::imap::identity::{self, FetchSeen, FetchTap};
use crate::imap::listing::answer_list;
use crate::imap::phase::{Attachment, ClientWriter, Core, SessionEnd, stop_bye};
use crate::imap::provider_client::{ProviderClient, ProviderEvent, Untagged};
use crate::imap::watcher;
use crate::imap::{lend, park};
use crate::io::{self, BoxStream, CopyError, ReadWait, Watched};
use crate::session::SessionContext;
use crate::upstream::{self, ProviderConnection, read_unit};

/// Longest response line relayed (literals excluded: those stream). A SEARCH result over a
/// very large mailbox is the longest line a provider sends in practice.
const MAX_RESPONSE_LINE: usize = 16 * 1024 * 1024;

/// Largest mailbox-data response (LIST/LSUB/STATUS) gathered for filtering.
const MAX_MAILBOX_DATA: usize = 64 * 1024;

/// Writes are buffered (64 KiB) and flushed when a loop is about to wait: a FETCH of many
/// messages goes out in large TLS records instead of one per provider read.
const WRITE_BUFFER: usize = 64 * 1024;

type Writer = tokio::sync::Mutex<ClientWriter>;
/// The provider's halves measure how long pecgate has waited for it since it last sent it
/// something, for the stall watchdog.
type ProviderReader = Watched<ReadHalf<BoxStream>>;
type ProviderWriter = BufWriter<Watched<WriteHalf<BoxStream>>>;

/// What both loops share.
struct Shared<'a> {
    ctx: &'a SessionContext,
    core: Mutex<Core>,
    client: Writer,
    provider: tokio::sync::Mutex<ProviderWriter>,
    /// Signalled after every completion: a command waiting to run alone may go.
    completed: Notify,
    /// An APPEND message is being streamed from the client: the provider waits for it.
    uploading: std::sync::atomic::AtomicBool,
    /// The provider has part of an APPEND and no end yet: only closing can end it cleanly
    /// (it then discards the message).
    mid_command: std::sync::atomic::AtomicBool,
    /// The downward loop is inside a response unit (the provider stream is not at a unit
    /// boundary): the connection cannot be handed to another session.
    mid_unit: std::sync::atomic::AtomicBool,
    /// The upward loop waiting for the provider's `+` to a literal of this tag.
    literal_wait: Mutex<Option<(String, oneshot::Sender<bool>)>>,
    /// Why the connection leaves the session, set by the upward loop, which then signals
    /// `leave_now`: the downward loop ends the attached phase at the next response boundary.
    leaving: Mutex<Option<Leaving>>,
    leave_now: Notify,
}

/// Why an attached phase ends with the session going on.
enum Leaving {
    /// A parked IDLE, with its subscription to the folder's watcher (`None`: an IDLE with
    /// no folder selected, which needs no watcher).
    Park(Option<watcher::Subscription>),
    /// Between two commands, the connection lent to a session waiting for one; the client
    /// has been silent since this instant (its idle time runs on while lent).
    Lend(tokio::time::Instant),
}

impl Shared<'_> {
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core
            .lock()
            .expect("the session machines never panic while locked")
    }
}

/// Relay until the session ends. The session alternates between *attached* (relaying over a
/// provider connection) and, in IDLE, *parked* (no provider connection; see [`super::park`]),
/// or, between two commands, *lent* (its connection serving another; see [`super::lend`]).
pub async fn run(
    ctx: &SessionContext,
    client: BoxStream,
    client_buffer: BytesMut,
    provider: ProviderConnection,
    capabilities: Vec<String>,
    policy: SessionPolicy,
) -> SessionEnd {
    let (mut client_reader, client_writer) = tokio::io::split(client);
    let mut client_buffer = client_buffer;
    let mut assembler = CommandAssembler::new(CommandLimits {
        max_literal: ctx.gateway.config.imap.max_literal_bytes,
        ..CommandLimits::default()
    });
    let mut core = Core {
        session: ClientSession::new(Arc::new(policy), capabilities),
        provider: ProviderClient::new(provider.literal_plus()),
    };
    let mut client_writer = BufWriter::with_capacity(WRITE_BUFFER, client_writer);
    let mut provider = provider;
    loop {
        let attachment = Attachment {
            core,
            client_writer,
            provider,
        };
        let detached = attached(
            ctx,
            attachment,
            &mut client_reader,
            &mut client_buffer,
            &mut assembler,
        )
        .await;
        let outcome = match detached {
            Detached::Ended(end) => return end,
            Detached::Parking(parked) => {
                park::serve(
                    ctx,
                    *parked,
                    &mut client_reader,
                    &mut client_buffer,
                    &mut assembler,
                )
                .await
            }
            Detached::Lending(lent, quiet_since) => {
                lend::serve(
                    ctx,
                    *lent,
                    quiet_since,
                    &mut client_reader,
                    &mut client_buffer,
                )
                .await
            }
        };
        match outcome {
            park::Outcome::Resumed(attachment) => {
                let attachment = *attachment;
                core = attachment.core;
                client_writer = attachment.client_writer;
                provider = attachment.provider;
            }
            park::Outcome::Ended(end) => return end,
        }
    }
}

/// How an attached phase ended.
enum Detached {
    Ended(SessionEnd),
    Parking(Box<park::Parking>),
    Lending(Box<Attachment>, tokio::time::Instant),
}

/// Relay over one provider connection until the session ends, parks in IDLE or lends the
/// connection.
async fn attached(
    ctx: &SessionContext,
    attachment: Attachment,
    client_reader: &mut ReadHalf<BoxStream>,
    client_buffer: &mut BytesMut,
    assembler: &mut CommandAssembler,
) -> Detached {
    let Attachment {
        core,
        client_writer,
        provider,
    } = attachment;
    let (provider_reader, provider_writer, mut provider_buffer, rest) = provider.split_io();
    let provider_wait = ReadWait::new();
    let mut provider_reader = Watched::new(provider_reader, provider_wait.clone());
    let provider_writer = Watched::new(provider_writer, provider_wait.clone());
    let shared = Shared {
        ctx,
        core: Mutex::new(core),
        client: tokio::sync::Mutex::new(client_writer),
        provider: tokio::sync::Mutex::new(BufWriter::with_capacity(WRITE_BUFFER, provider_writer)),
        completed: Notify::new(),
        uploading: std::sync::atomic::AtomicBool::new(false),
        mid_command: std::sync::atomic::AtomicBool::new(false),
        mid_unit: std::sync::atomic::AtomicBool::new(false),
        literal_wait: Mutex::new(None),
        leaving: Mutex::new(None),
        leave_now: Notify::new(),
    };
    let end = {
        let up = upward(&shared, client_reader, client_buffer, assembler);
        let down = downward(&shared, &mut provider_reader, &mut provider_buffer);
        let watchdog = watch_provider(&shared, &provider_wait, ctx.gateway.provider_timeout);
        tokio::pin!(up, down, watchdog);
        tokio::select! {
            end = &mut up => end,
            end = &mut down => end,
            end = &mut watchdog => end,
        }
    };
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    if matches!(end, SessionEnd::Detaching) {
        let leaving = shared
            .leaving
            .lock()
            .expect("never poisoned")
            .take()
            .expect("leaving is requested with its reason");
        let mut writer = shared.provider.into_inner();
        let _ = writer.flush().await;
        let core = shared.core.into_inner().expect("never poisoned");
        let client_writer = shared.client.into_inner();
        let provider = rest.join(
            provider_reader.into_inner(),
            writer.into_inner().into_inner(),
            provider_buffer,
        );
        return match leaving {
            Leaving::Park(subscription) => Detached::Parking(Box::new(park::Parking {
                core,
                client_writer,
                provider,
                subscription,
            })),
            Leaving::Lend(quiet_since) => Detached::Lending(
                Box::new(Attachment {
                    core,
                    client_writer,
                    provider,
                }),
                quiet_since,
            ),
        };
    }
    // Commands the provider never completed are still recorded, as errors.
    let orphans = shared.core().session.abandon();
    for record in orphans {
        let _ = record_event(ctx, record).await;
    }
    let (quiet, selected, done) = {
        let mut core = shared.core();
        let quiet = core.provider.quiet();
        (
            quiet,
            core.session.selected().is_some(),
            core.provider.done(),
        )
    };
    let quiet = quiet && !shared.mid_command.load(relaxed) && !shared.mid_unit.load(relaxed);
    let provider_failed = matches!(
        end,
        SessionEnd::UpstreamClosed
            | SessionEnd::ProviderViolation(_)
            | SessionEnd::ProviderStalled(_)
    );
    // The client first: it should not wait on pecgate's housekeeping with the provider.
    let mut client_writer = shared.client.into_inner();
    let _ = tokio::time::timeout(Duration::from_secs(3), client_writer.shutdown()).await;
    drop(client_writer);
    if provider_failed || shared.mid_command.load(relaxed) {
        // Nothing more to say to a provider that failed, or that holds part of an APPEND
        // (closing is the only clean end of it: it discards the message).
        return Detached::Ended(end);
    }
    let mut writer = shared.provider.into_inner();
    // However the client went (LOGOUT, closed, timed out), a provider stream at a response
    // boundary with nothing owed is as good as new. A session stopped by pecgate (shutdown,
    // reload, kick) says goodbye to the provider instead.
    let reusable = quiet && !matches!(end, SessionEnd::Shutdown) && writer.flush().await.is_ok();
    let mut connection = rest.join(
        provider_reader.into_inner(),
        writer.into_inner().into_inner(),
        provider_buffer,
    );
    if reusable
        && upstream::pool::would_keep(&connection)
        && (!selected || connection.unselect(HOUSEKEEPING).await)
    {
        // In the authenticated state with nothing in flight: fit for the next session.
        upstream::pool::give_back(connection).await;
        return Detached::Ended(end);
    }
    // A polite goodbye; an IDLE is ended first, since an idling provider reads any other
    // line as the end of IDLE.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        if let Some(done) = done {
            connection.writer.write_all(done).await?;
        }
        connection.writer.write_all(b"s9 LOGOUT\r\n").await?;
        connection.writer.flush().await
    })
    .await;
    Detached::Ended(end)
}

/// How long the provider has to answer pecgate's own UNSELECT after a session.
const HOUSEKEEPING: Duration = Duration::from_secs(5);

/// A flag raised for as long as this value lives.
struct Raised<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> Raised<'a> {
    fn new(flag: &'a std::sync::atomic::AtomicBool) -> Raised<'a> {
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        Raised(flag)
    }
}

impl Drop for Raised<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Ends the session when the provider owes an answer (a whole command sent, IDLE excepted)
/// and pecgate has been waiting for its next byte for `timeout`: a stopped or unreachable
/// provider must not leave a client waiting longer than its own patience (Thunderbird gives
/// up at 100 s). A client slow to read or to send its APPEND is not the provider's fault and
/// does not count (the read is not waiting, or the command is not whole yet).
async fn watch_provider(shared: &Shared<'_>, wait: &ReadWait, timeout: Duration) -> SessionEnd {
    let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        let quiet = wait.waiting_for();
        if quiet < timeout
            || shared.uploading.load(std::sync::atomic::Ordering::Relaxed)
            || !shared.core().provider.owes_answer()
        {
            continue;
        }
        tracing::warn!(
            seconds = quiet.as_secs(),
            "the provider stopped answering: ending the session"
        );
        // Only between response units: a BYE inside a literal would corrupt the stream, and
        // a client mid-literal is better served by the connection closing.
        if let Ok(mut client) = shared.client.try_lock() {
            let bye = format!(
                "* BYE [UNAVAILABLE] The PEC provider has not answered for {} seconds\r\n",
                quiet.as_secs()
            );
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                client.write_all(bye.as_bytes()).await?;
                client.flush().await
            })
            .await;
        }
        return SessionEnd::ProviderStalled(quiet);
    }
}

async fn record_event(ctx: &SessionContext, record: AuditRecord) -> Result<(), SessionEnd> {
    let AuditRecord {
        command,
        folder,
        detail,
        outcome,
        durable,
    } = record;
    let result = if durable {
        ctx.audit_durable(&command, folder, detail, outcome).await
    } else {
        ctx.audit(&command, folder, detail, outcome).await
    };
    result.map_err(|_| SessionEnd::AuditFailed)
}

const AUDIT_BYE: &[u8] =
    b"* BYE [UNAVAILABLE] Audit log unavailable: pecgate refuses to work unrecorded\r\n";

/// Write (buffered) and flush a locally generated answer.
async fn answer(client: &Writer, bytes: &[u8]) -> Result<(), SessionEnd> {
    let mut writer = client.lock().await;
    let result = async {
        writer.write_all(bytes).await?;
        writer.flush().await
    }
    .await;
    result.map_err(|_| SessionEnd::ClientClosed)
}

/// Client → provider, until the session ends.
async fn upward(
    shared: &Shared<'_>,
    client: &mut ReadHalf<BoxStream>,
    buffer: &mut BytesMut,
    assembler: &mut CommandAssembler,
) -> SessionEnd {
    let idle_timeout = shared.ctx.gateway.config.gateway.idle_timeout;
    macro_rules! try_end {
        ($result:expr) => {
            match $result {
                Ok(value) => value,
                Err(end) => return end,
            }
        };
    }
    loop {
        let client_idling = shared.core().session.client_idling();
        // In IDLE the client's next command is framed like any other (a LITERAL+ belongs to
        // it and is dropped with it), but a synchronising literal is never invited: no `+`.
        let assembled = if client_idling {
            assembler.poll(buffer, |_, literal| literal.sync)
        } else {
            assembler.poll(buffer, |head, literal| {
                append_skeleton(head, literal).is_some()
            })
        };
        let actions = match assembled {
            Assembled::NeedMore => {
                // Between commands, the connection is offered to sessions waiting for one;
                // with a command in flight, its completion is when to look again.
                let completed = shared.completed.notified();
                tokio::pin!(completed);
                completed.as_mut().enable();
                let offer = lendable(shared, assembler, buffer);
                let quiet = shared.ctx.gateway.config.imap.lend_after_quiet;
                let asked = async {
                    match &offer {
                        Some(offer) => offer.asked_or_after(quiet).await,
                        None => std::future::pending().await,
                    }
                };
                let lending = shared.ctx.gateway.config.imap.lend_between_commands;
                let quiet_since = tokio::time::Instant::now();
                let read = tokio::select! {
                    read = tokio::time::timeout(idle_timeout, io::fill(client, buffer)) => read,
                    () = &mut completed, if lending && offer.is_none() => continue,
                    () = asked => {
                        *shared.leaving.lock().expect("never poisoned") =
                            Some(Leaving::Lend(quiet_since));
                        // The downward loop ends the phase at its next response boundary.
                        shared.leave_now.notify_one();
                        return std::future::pending().await;
                    }
                };
                match read {
                    Ok(Ok(true)) => continue,
                    Ok(Ok(false)) => return SessionEnd::ClientClosed,
                    Ok(Err(e)) => return SessionEnd::Error(e.to_string()),
                    Err(_) => {
                        let _ = answer(&shared.client, b"* BYE Autologout: idle for too long\r\n")
                            .await;
                        return SessionEnd::Timeout;
                    }
                }
            }
            Assembled::SendContinuation => {
                try_end!(answer(&shared.client, b"+ Ready for literal data\r\n").await);
                continue;
            }
            Assembled::Command(line) | Assembled::MessageLiteral { head: line, .. }
                if client_idling =>
            {
                shared.core().session.idle_line(&line)
            }
            Assembled::Refused { .. } if client_idling => shared
                .core()
                .session
                .idle_line(b"(a command refused while framing)"),
            Assembled::Refused { tag, reason } => shared.core().session.refuse_unparsed(
                tag.as_deref(),
                reason.text(),
                reason.text().to_owned(),
            ),
            Assembled::Command(bytes) => match parse_command(&bytes) {
                Err(error) => shared.core().session.refuse_unparsed(
                    tag_of(&bytes, &[]).as_deref(),
                    &format!("Invalid command: {error}"),
                    crate::text::printable(&bytes, 200),
                ),
                Ok(command) => {
                    try_end!(audit_healthy(shared).await);
                    let bodies = cached_bodies(shared, &command).await;
                    submit_when_ready(shared, command, |s, c| s.submit_cached(c, bodies.clone()))
                        .await
                }
            },
            Assembled::MessageLiteral { head, literal } => {
                let Some(skeleton) = append_skeleton(&head, &literal) else {
                    unreachable!("the assembler asked the same question")
                };
                try_end!(audit_healthy(shared).await);
                let actions = submit_when_ready(shared, skeleton, |s, c| {
                    s.submit_append(c, literal.length, literal.sync)
                })
                .await;
                let sent = actions
                    .iter()
                    .any(|a| matches!(a, Action::Provider(Request::AppendHead { .. })));
                if !sent && !literal.sync {
                    // Refused, but LITERAL+: the message is on its way regardless; drop it.
                    try_end!(discard(client, buffer, u64::from(literal.length)).await);
                }
                actions
            }
        };
        for action in actions {
            try_end!(perform_upward(shared, action, client, buffer).await);
        }
    }
}

/// The pool's offer of this session's connection, when it may leave the session: lending is
/// on, nothing is in flight or half-sent either way, the client is between commands and not
/// in IDLE, and a selected folder can be selected again by name.
fn lendable(
    shared: &Shared<'_>,
    assembler: &CommandAssembler,
    buffer: &BytesMut,
) -> Option<upstream::pool::Offer> {
    let ctx = shared.ctx;
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    if !ctx.gateway.config.imap.lend_between_commands
        || !buffer.is_empty()
        || !assembler.is_idle()
        || shared.mid_command.load(relaxed)
        || shared.mid_unit.load(relaxed)
    {
        return None;
    }
    {
        let core = shared.core();
        let reselectable = core.session.selected().is_none()
            || core
                .session
                .reselect()
                .and_then(park::wire_folder)
                .is_some();
        if !core.session.between_commands() || !core.provider.quiet() || !reselectable {
            return None;
        }
    }
    let mailbox = ctx.mailbox.as_deref()?;
    Some(ctx.gateway.mailboxes.get(mailbox)?.pool.offer())
}

/// pecgate's encoding of a command, to the provider.
async fn send_command(shared: &Shared<'_>, command: Command<'static>) -> Result<(), SessionEnd> {
    let steps = shared.core().provider.encode(&command);
    let tag = command.tag.as_ref().to_owned();
    let mut provider = shared.provider.lock().await;
    send_steps(shared, &mut provider, &tag, &steps).await?;
    provider
        .flush()
        .await
        .map_err(|_| SessionEnd::UpstreamClosed)
}

/// Whether the client's IDLE can be served without a provider connection: parking is on, a
/// folder is selected and nothing else is in flight, and the folder's watcher is ready. Then
/// the machine answers the IDLE itself (its actions are returned) and the subscription is
/// kept for the parked phase; otherwise (`None`) the IDLE goes to the provider as usual.
async fn park_idle(shared: &Shared<'_>, command: &Command<'static>) -> Option<Vec<Action>> {
    let ctx = shared.ctx;
    if !ctx.gateway.config.imap.park_idle {
        return None;
    }
    let folder = {
        let core = shared.core();
        if !core.provider.quiet() {
            return None;
        }
        match core.session.selected() {
            None => None,
            Some(_) => Some(park::wire_folder(core.session.reselect()?)?),
        }
    };
    let subscription = match folder {
        None => None,
        Some(folder) => {
            let mailbox = ctx.mailbox.clone()?;
            let wait = ctx.gateway.config.gateway.connection_wait;
            let subscribed = ctx
                .gateway
                .carried
                .watchers
                .subscribe(&ctx.gateway, &mailbox, &folder, wait)
                .await;
            match subscribed {
                Ok(subscription) => Some(subscription),
                Err(error) => {
                    tracing::info!(%error, "IDLE not parked: the folder watcher is not available");
                    return None;
                }
            }
        }
    };
    let tag = command.tag.as_ref().to_owned();
    let actions = shared.core().session.park_idle(&tag)?;
    *shared.leaving.lock().expect("never poisoned") = Some(Leaving::Park(subscription));
    Some(actions)
}

async fn audit_healthy(shared: &Shared<'_>) -> Result<(), SessionEnd> {
    if shared.ctx.gateway.audit.is_healthy() {
        return Ok(());
    }
    let _ = answer(&shared.client, AUDIT_BYE).await;
    Err(SessionEnd::AuditFailed)
}

/// Submit a command, waiting for completions while the session says it must run alone.
async fn submit_when_ready(
    shared: &Shared<'_>,
    mut command: imap_codec::imap_types::command::Command<'static>,
    submit: impl Fn(&mut ClientSession, imap_codec::imap_types::command::Command<'static>) -> Submit,
) -> Vec<Action> {
    loop {
        // Registered before asking, so a completion in between is not missed.
        let completed = shared.completed.notified();
        tokio::pin!(completed);
        completed.as_mut().enable();
        let outcome = submit(&mut shared.core().session, command);
        match outcome {
            Submit::Ready(actions) => return actions,
            Submit::Wait(back) => {
                command = back;
                let _ = shared.provider.lock().await.flush().await;
                completed.await;
            }
        }
    }
}

async fn perform_upward(
    shared: &Shared<'_>,
    action: Action,
    client: &mut ReadHalf<BoxStream>,
    buffer: &mut BytesMut,
) -> Result<(), SessionEnd> {
    match action {
        Action::Audit(record) => audited(shared, record).await,
        Action::Client(bytes) => answer(&shared.client, &bytes).await,
        Action::ClientListing { .. } => unreachable!("listings come with completions"),
        Action::End(ending) => Err(ending_to_end(ending)),
        Action::Provider(Request::Done) => send_done(shared).await,
        Action::Provider(Request::Command(command))
            if matches!(command.body, CommandBody::Idle) =>
        {
            if let Some(actions) = park_idle(shared, &command).await {
                for action in actions {
                    Box::pin(perform_upward(shared, action, client, buffer)).await?;
                }
                // The downward loop ends the phase at its next response boundary.
                shared.leave_now.notify_one();
                return std::future::pending().await;
            }
            send_command(shared, command).await
        }
        Action::Provider(Request::Command(command)) => send_command(shared, command).await,
        Action::Provider(Request::AppendHead {
            skeleton,
            length,
            client_sync,
        }) => {
            let steps = shared.core().provider.encode_append(&skeleton, length);
            let tag = skeleton.tag.as_ref().to_owned();
            let mut provider = shared.provider.lock().await;
            if !send_steps(shared, &mut provider, &tag, &steps).await? {
                // The provider refused the message: its tagged answer completes the command.
                if !client_sync {
                    discard(client, buffer, u64::from(length)).await?;
                }
                return Ok(());
            }
            // From here the provider waits for the client's bytes, however slow they are, and
            // is mid-command until pecgate's CRLF: no goodbye may be sent into it.
            let _uploading = Raised::new(&shared.uploading);
            shared
                .mid_command
                .store(true, std::sync::atomic::Ordering::Relaxed);
            if client_sync {
                answer(&shared.client, b"+ Ready for literal data\r\n").await?;
            }
            // The message's headers, for the audit: which message was stored.
            let mut head = Vec::new();
            io::copy_exact_observed(client, buffer, &mut *provider, u64::from(length), |chunk| {
                identity::keep_header(&mut head, chunk)
            })
            .await
            .map_err(|e| match e {
                CopyError::Source(e) => SessionEnd::Error(format!("client: {e}")),
                CopyError::Closed => SessionEnd::ClientClosed,
                CopyError::Sink => SessionEnd::UpstreamClosed,
            })?;
            if let Some(id) = identity::message_id_in(&head) {
                shared.core().session.on_appended(&tag, &id);
            }
            // Without MULTIAPPEND (not offered) the command ends right after the message.
            // Anything else would leave the provider mid-command: close instead.
            let rest = io::next_line(client, buffer, 1024)
                .await
                .map_err(|e| SessionEnd::Error(e.to_string()))?;
            if rest.as_ref() != b"\r\n" && rest.as_ref() != b"\n" {
                let tag = skeleton.tag.as_ref();
                let _ = answer(
                    &shared.client,
                    b"* BYE Protocol error: unexpected data after the APPEND message\r\n",
                )
                .await;
                return Err(SessionEnd::Error(format!(
                    "data after the APPEND message ({tag})"
                )));
            }
            provider
                .write_all(b"\r\n")
                .await
                .map_err(|_| SessionEnd::UpstreamClosed)?;
            shared
                .mid_command
                .store(false, std::sync::atomic::Ordering::Relaxed);
            provider
                .flush()
                .await
                .map_err(|_| SessionEnd::UpstreamClosed)
        }
    }
}

async fn send_done(shared: &Shared<'_>) -> Result<(), SessionEnd> {
    let done = shared.core().provider.done();
    if let Some(bytes) = done {
        let mut provider = shared.provider.lock().await;
        provider
            .write_all(bytes)
            .await
            .map_err(|_| SessionEnd::UpstreamClosed)?;
        provider
            .flush()
            .await
            .map_err(|_| SessionEnd::UpstreamClosed)?;
    }
    Ok(())
}

/// Send a command's steps, waiting for the provider's `+` before each synchronising literal.
/// Returns false if the provider refused a literal (its tagged answer completes the command).
async fn send_steps(
    shared: &Shared<'_>,
    provider: &mut ProviderWriter,
    tag: &str,
    steps: &[UpstreamStep],
) -> Result<bool, SessionEnd> {
    let mut steps = steps.iter().peekable();
    while let Some(step) = steps.next() {
        let UpstreamStep::Send(bytes) = step else {
            continue;
        };
        // The wait is registered before the announcement leaves, so the provider's `+` can
        // never reach the downward loop first.
        let waiter = matches!(steps.peek(), Some(UpstreamStep::AwaitContinuation)).then(|| {
            let (tx, rx) = oneshot::channel();
            *shared.literal_wait.lock().expect("never poisoned") = Some((tag.to_owned(), tx));
            shared.core().provider.expect_continuation(tag);
            rx
        });
        provider
            .write_all(bytes)
            .await
            .map_err(|_| SessionEnd::UpstreamClosed)?;
        if let Some(rx) = waiter {
            provider
                .flush()
                .await
                .map_err(|_| SessionEnd::UpstreamClosed)?;
            if !rx.await.map_err(|_| SessionEnd::UpstreamClosed)? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

async fn audited(shared: &Shared<'_>, record: AuditRecord) -> Result<(), SessionEnd> {
    if record_event(shared.ctx, record).await.is_err() {
        let _ = answer(&shared.client, AUDIT_BYE).await;
        return Err(SessionEnd::AuditFailed);
    }
    Ok(())
}

fn ending_to_end(ending: Ending) -> SessionEnd {
    match ending {
        Ending::Logout => SessionEnd::Logout,
        Ending::ProviderViolation(reason) => {
            tracing::warn!(%reason, "the provider broke the protocol: session ended");
            SessionEnd::ProviderViolation(reason)
        }
    }
}

async fn discard(
    client: &mut ReadHalf<BoxStream>,
    buffer: &mut BytesMut,
    length: u64,
) -> Result<(), SessionEnd> {
    io::copy_exact(client, buffer, &mut tokio::io::sink(), length)
        .await
        .map_err(|_| SessionEnd::ClientClosed)?;
    io::next_line(client, buffer, 64 * 1024)
        .await
        .map(|_| ())
        .map_err(|_| SessionEnd::ClientClosed)
}

/// Provider → client.
async fn downward(
    shared: &Shared<'_>,
    provider: &mut ProviderReader,
    buffer: &mut BytesMut,
) -> SessionEnd {
    let mid_unit = |inside: bool| {
        shared
            .mid_unit
            .store(inside, std::sync::atomic::Ordering::Relaxed)
    };
    loop {
        mid_unit(false);
        // Between responses: the only place where the session may stop cleanly.
        if !buffer.contains(&b'\n') {
            if shared.client.lock().await.flush().await.is_err() {
                return SessionEnd::ClientClosed;
            }
            tokio::select! {
                read = io::fill(provider, buffer) => match read {
                    Ok(true) => continue,
                    Ok(false) | Err(_) => {
                        tracing::warn!("the provider closed the connection");
                        let _ = answer(&shared.client, b"* BYE The PEC provider closed the connection\r\n").await;
                        return SessionEnd::UpstreamClosed;
                    }
                },
                () = shared.ctx.stop.stopped(), if buffer.is_empty() => {
                    let bye = stop_bye(shared.ctx);
                    let _ = answer(&shared.client, &bye).await;
                    return SessionEnd::Shutdown;
                }
                // Between responses with nothing owed: the connection can leave the session.
                () = shared.leave_now.notified() => return SessionEnd::Detaching,
            }
        }
        let line = match io::next_line(provider, buffer, MAX_RESPONSE_LINE).await {
            Ok(line) => {
                mid_unit(true);
                line
            }
            Err(error) => {
                return provider_failed(shared, &error, "provider stream ended mid-response").await;
            }
        };
        let event = shared.core().provider.on_line(&line);
        let actions = match event {
            ProviderEvent::Continuation { tag } => {
                let waiter = {
                    let mut wait = shared.literal_wait.lock().expect("never poisoned");
                    match wait.take() {
                        Some((t, tx)) if t == tag => Some(tx),
                        other => {
                            *wait = other;
                            None
                        }
                    }
                };
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(true);
                        continue;
                    }
                    None => shared.core().session.on_idle_continuation(&tag, &line),
                }
            }
            ProviderEvent::Completed { tag, status, text } => {
                {
                    let mut wait = shared.literal_wait.lock().expect("never poisoned");
                    if wait.as_ref().is_some_and(|(t, _)| *t == tag) {
                        let (_, tx) = wait.take().expect("checked");
                        let _ = tx.send(false);
                    }
                }
                let (actions, selected) = {
                    let mut core = shared.core();
                    let actions = core.session.on_completed(&tag, status, &text);
                    (actions, core.session.selected().map(str::to_owned))
                };
                if let Some(registration) = &shared.ctx.registration {
                    registration.set_folder(selected.as_deref());
                }
                shared.completed.notify_waiters();
                actions
            }
            ProviderEvent::Untagged(kind) => {
                let plan = shared.core().session.plan_untagged(kind, &line);
                match plan {
                    UntaggedPlan::Pass
                    | UntaggedPlan::PassRenamed
                    | UntaggedPlan::PassRenumbered { .. } => {
                        let (line, rename) = match plan {
                            UntaggedPlan::PassRenumbered { line, rename } => {
                                (BytesMut::from(&line[..]), rename)
                            }
                            plan => (line, plan == UntaggedPlan::PassRenamed),
                        };
                        // A FETCH answer is watched as it streams: which message it served,
                        // and the whole message for the body cache.
                        let mut tap = (kind == Untagged::Fetch).then(FetchTap::default);
                        let cache = shared.ctx.gateway.carried.body_cache.as_ref();
                        let mut capture = cache
                            .filter(|_| kind == Untagged::Fetch)
                            .map(|cache| BodyCapture::new(cache.max_body()));
                        if let Err(end) = pass_through(
                            provider,
                            buffer,
                            &shared.client,
                            line,
                            rename,
                            tap.as_mut(),
                            capture.as_mut(),
                        )
                        .await
                        {
                            return end;
                        }
                        let seen = tap.and_then(FetchTap::finish);
                        if let (Some(capture), Some(seen)) = (capture, &seen) {
                            keep_body(shared, capture, seen).await;
                        }
                        let Some(seen) = seen else { continue };
                        shared.core().session.on_fetch_seen(seen)
                    }
                    UntaggedPlan::PassThenEnd => {
                        let reply = crate::text::printable(&line, 200);
                        let _ =
                            pass_through(provider, buffer, &shared.client, line, false, None, None)
                                .await;
                        let _ = shared.client.lock().await.flush().await;
                        tracing::warn!(%reply, "the provider ended the session");
                        return SessionEnd::UpstreamClosed;
                    }
                    UntaggedPlan::Replace(bytes) => vec![Action::Client(bytes)],
                    UntaggedPlan::Cached { bytes, seen } => {
                        let mut actions = vec![Action::Client(bytes)];
                        if let Some(seen) = seen {
                            actions.extend(shared.core().session.on_fetch_seen(seen));
                        }
                        actions
                    }
                    UntaggedPlan::Gather => {
                        match read_unit(provider, buffer, &line, MAX_MAILBOX_DATA).await {
                            Ok(unit) => shared.core().session.on_unit(kind, &unit),
                            Err(error) => {
                                return provider_failed(
                                    shared,
                                    &error,
                                    "unreadable mailbox data from the provider",
                                )
                                .await;
                            }
                        }
                    }
                    UntaggedPlan::Violation(reason) => shared.core().session.on_violation(&reason),
                }
            }
            ProviderEvent::Violation(reason) => shared.core().session.on_violation(&reason),
        };
        for action in actions {
            if let Err(end) = perform_downward(shared, action).await {
                return end;
            }
        }
    }
}

/// The bodies the cache holds for a download it can answer, every one of them, read off the
/// runtime; `None` otherwise (the command then goes to the provider whole).
async fn cached_bodies(shared: &Shared<'_>, command: &Command<'static>) -> Option<Bodies> {
    let cache = shared.ctx.gateway.carried.body_cache.clone()?;
    let uids = cached_fetch::body_request(&command.body)?.uids;
    let keys: Vec<(u32, body_cache::Key)> = {
        let core = shared.core();
        if !core.session.folder_settled() {
            return None;
        }
        let folder = park::wire_folder(core.session.reselect()?)?;
        let uidvalidity = core.session.uidvalidity()?;
        let mailbox = shared.ctx.mailbox.as_deref()?;
        uids.iter()
            .map(|&uid| (uid, body_cache::key(mailbox, &folder, uidvalidity, uid)))
            .collect()
    };
    if !keys.iter().all(|(_, key)| cache.has(key)) {
        return None;
    }
    let read = tokio::task::spawn_blocking(move || {
        let mut bodies = std::collections::HashMap::new();
        for (uid, key) in keys {
            bodies.insert(uid, Arc::new(cache.read(&key)?));
        }
        Some(Arc::new(bodies))
    });
    read.await.ok().flatten()
}

/// A whole message the provider just served, kept in the body cache (off the runtime). Only
/// with its UID and the folder's UIDVALIDITY known: nothing else names it for good.
async fn keep_body(shared: &Shared<'_>, capture: BodyCapture, seen: &FetchSeen) {
    let Some(cache) = shared.ctx.gateway.carried.body_cache.clone() else {
        return;
    };
    let (Some(uid), Some(body)) = (seen.uid, capture.finish()) else {
        return;
    };
    let key = {
        let core = shared.core();
        let folder = core.session.reselect().and_then(park::wire_folder);
        match (
            folder,
            core.session.uidvalidity(),
            shared.ctx.mailbox.as_deref(),
        ) {
            (Some(folder), Some(uidvalidity), Some(mailbox)) => {
                body_cache::key(mailbox, &folder, uidvalidity, uid)
            }
            _ => return,
        }
    };
    let stored = tokio::task::spawn_blocking(move || cache.store(&key, &body)).await;
    if let Ok(Err(error)) = stored {
        tracing::warn!(%error, "a body could not be kept in the cache");
    }
}

/// The provider connection broke mid-response: say so to the client and end.
async fn provider_failed(
    shared: &Shared<'_>,
    error: &crate::io::LineError,
    what: &str,
) -> SessionEnd {
    tracing::warn!(%error, "{what}");
    let _ = answer(
        &shared.client,
        b"* BYE The PEC provider connection failed\r\n",
    )
    .await;
    SessionEnd::UpstreamClosed
}

async fn perform_downward(shared: &Shared<'_>, action: Action) -> Result<(), SessionEnd> {
    match action {
        Action::Audit(record) => audited(shared, record).await,
        Action::Client(bytes) => {
            let mut writer = shared.client.lock().await;
            writer
                .write_all(&bytes)
                .await
                .map_err(|_| SessionEnd::ClientClosed)
        }
        Action::ClientListing { request, entries } => {
            // Matching a listing is CPU work that grows with the mailbox: off the runtime.
            let policy = Arc::clone(shared.core().session.policy());
            let lines =
                tokio::task::spawn_blocking(move || answer_list(&request, &entries, &policy))
                    .await
                    .map_err(|e| SessionEnd::Error(format!("listing: {e}")))?;
            let mut writer = shared.client.lock().await;
            for line in lines {
                writer
                    .write_all(&line)
                    .await
                    .map_err(|_| SessionEnd::ClientClosed)?;
            }
            Ok(())
        }
        Action::Provider(Request::Done) => send_done(shared).await,
        Action::Provider(_) => unreachable!("commands are sent by the upward loop"),
        Action::End(ending) => {
            let _ = shared.client.lock().await.flush().await;
            Err(ending_to_end(ending))
        }
    }
}

/// Relay one untagged response as it comes, streaming its literals; with `rename`, FETCH
/// item names restored in every line segment.
async fn pass_through(
    provider: &mut ProviderReader,
    buffer: &mut BytesMut,
    client: &Writer,
    mut line: BytesMut,
    rename: bool,
    mut tap: Option<&mut FetchTap>,
    mut capture: Option<&mut BodyCapture>,
) -> Result<(), SessionEnd> {
    let mut writer = client.lock().await;
    loop {
        let written = if rename {
            writer.write_all(&rename_rfc822_items(&line)).await
        } else {
            writer.write_all(&line).await
        };
        written.map_err(|_| SessionEnd::ClientClosed)?;
        let literal = literal_at_end(&line);
        if let Some(tap) = tap.as_deref_mut() {
            tap.line(&line, literal.is_some());
        }
        if let Some(capture) = capture.as_deref_mut() {
            capture.line(&line, literal.as_ref().map(|l| l.length));
        }
        let Some(literal) = literal else {
            return Ok(());
        };
        io::copy_exact_observed(
            provider,
            buffer,
            &mut *writer,
            u64::from(literal.length),
            |chunk| {
                if let Some(tap) = tap.as_deref_mut() {
                    tap.literal(chunk);
                }
                if let Some(capture) = capture.as_deref_mut() {
                    capture.literal(chunk);
                }
            },
        )
        .await
        .map_err(|e| match e {
            CopyError::Sink => SessionEnd::ClientClosed,
            CopyError::Source(_) | CopyError::Closed => SessionEnd::UpstreamClosed,
        })?;
        line = io::next_line(provider, buffer, MAX_RESPONSE_LINE)
            .await
            .map_err(|_| SessionEnd::UpstreamClosed)?;
    }
}
