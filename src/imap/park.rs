//! A session parked in IDLE: it holds no provider connection. The relay hands over the
//! connection it was attached to; this module
//! 1. reads the session's view of its folder on that connection (`UID SEARCH ALL`; what the
//!    provider says meanwhile still reaches the client, as IDLE allows), and gives the
//!    connection back to the pool (`UNSELECT` first);
//! 2. serves the IDLE: the folder watcher's events ([`super::watcher`]), in UIDs, become
//!    EXPUNGE / EXISTS / FETCH FLAGS in the session's own numbering ([`View`]); `* OK Still
//!    here` every two minutes; a stop or the client's silence ends the session as when
//!    attached;
//! 3. on DONE (or any other line, which ends the IDLE with BAD), takes a connection from the
//!    pool (events keep flowing while it waits), selects the folder again (`SELECT` or
//!    `EXAMINE`, as the client did), checks UIDVALIDITY, reads the UIDs and tells the client
//!    what changed since the last event, so the new connection's numbering is the client's;
//!    only then is the IDLE completed and the session attached again.
//!
//! Nothing here changes the mailbox: pecgate's own commands are `UID SEARCH`, `UNSELECT`,
//! `SELECT`/`EXAMINE` of the folder the client had selected. Flag changes made between the
//! watcher's last event and the re-attachment are not told (the client learns them at its
//! next FETCH FLAGS, as Thunderbird does on waking); `\Recent` is not carried over.

use std::time::Duration;

use bytes::BytesMut;
use imap_codec::imap_types::command::{Command, CommandBody};
use tokio::io::{AsyncWriteExt, ReadHalf};
use tokio::sync::broadcast::error::RecvError;

use crate::imap::client_session::Action;
use crate::imap::command::{quoted, wire_name};
use crate::imap::framing::{Assembled, CommandAssembler};
use crate::imap::phase::{Attachment, ClientWriter, Core, SessionEnd, stop_bye};
use crate::imap::response::{self, ResponseKind, Status};
use crate::imap::view::{Diverged, News, View, news};
use crate::imap::watcher::{Signal, Subscription};
use crate::io::{self, BoxStream, LineError};
use crate::session::SessionContext;
use crate::upstream::pool::{self, PoolError};
use crate::upstream::slots::Class;
use crate::upstream::{ProviderConnection, SelectedFolder, read_unit};

/// A client in IDLE hears from pecgate this often (Dovecot's default): NATs and clients that
/// take silence for a dead link.
const STILL_HERE: Duration = Duration::from_secs(120);
const UNIT_MAX: usize = 16 * 1024 * 1024;

/// What the relay hands over when a session parks.
pub struct Parking {
    pub core: Core,
    pub client_writer: ClientWriter,
    pub provider: ProviderConnection,
    /// The folder's watcher; `None` for an IDLE with no folder selected (Outlook does that):
    /// there is nothing to tell, only DONE to wait for.
    pub subscription: Option<Subscription>,
}

pub enum Outcome {
    Resumed(Box<Attachment>),
    Ended(SessionEnd),
}

/// The provider name of the folder a SELECT/EXAMINE opens, if pecgate can send it quoted.
pub fn wire_folder(select: &Command<'_>) -> Option<String> {
    let mailbox = match &select.body {
        CommandBody::Select { mailbox, .. } | CommandBody::Examine { mailbox, .. } => mailbox,
        _ => return None,
    };
    let name = wire_name(mailbox);
    let quotable = name.iter().all(|b| (0x20..0x7f).contains(b));
    quotable.then(|| String::from_utf8(name).expect("ASCII"))
}

/// Why the parked (or lent) phase cannot go on.
#[derive(Debug, thiserror::Error)]
pub(super) enum ParkError {
    #[error("client: {0:?}")]
    Client(SessionEnd),
    #[error("provider: {0}")]
    Provider(#[from] LineError),
    #[error("the provider did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Gone(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// Serve a parked session until it resumes on a provider connection or ends.
pub async fn serve(
    ctx: &SessionContext,
    parking: Parking,
    client_reader: &mut ReadHalf<BoxStream>,
    client_buffer: &mut BytesMut,
    assembler: &mut CommandAssembler,
) -> Outcome {
    let Parking {
        mut core,
        mut client_writer,
        provider,
        mut subscription,
    } = parking;
    let outcome = async {
        // The client has its `+` already (the machine answered the IDLE).
        let watched = subscription.is_some();
        let mut view = snapshot(ctx, &core, provider, watched, &mut client_writer).await?;
        catch_up_events(&mut subscription, &mut view, &mut client_writer).await?;
        let line = wait_parked(
            ctx,
            &mut subscription,
            &mut view,
            &mut client_writer,
            client_reader,
            client_buffer,
            assembler,
        )
        .await?;
        let provider = resume(ctx, &core, &mut subscription, &mut view, &mut client_writer).await?;
        Ok::<_, ParkError>((line, provider))
    }
    .await;
    match outcome {
        Ok((line, provider)) => {
            let actions = core.session.unpark(&line, "parked: served by pecgate");
            if let Err(end) = perform(ctx, actions, &mut client_writer).await {
                return Outcome::Ended(end);
            }
            Outcome::Resumed(Box::new(Attachment {
                core,
                client_writer,
                provider,
            }))
        }
        Err(error) => ended(ctx, error, core, client_writer).await,
    }
}

/// The session cannot go on without a provider connection: the client is told why, what
/// was in flight is recorded as abandoned.
pub(super) async fn ended(
    ctx: &SessionContext,
    error: ParkError,
    mut core: Core,
    mut client_writer: ClientWriter,
) -> Outcome {
    let end = match error {
        ParkError::Client(end) => end,
        ParkError::Gone(reason) => {
            let bye = format!("* BYE [UNAVAILABLE] {reason}; please reconnect\r\n");
            let _ = write(&mut client_writer, bye.as_bytes()).await;
            SessionEnd::FolderGone(reason)
        }
        ParkError::Pool(error @ (PoolError::Busy { .. } | PoolError::ProviderLimit { .. })) => {
            tracing::warn!(%error, "a session found no provider connection to go on with");
            let bye = b"* BYE [UNAVAILABLE] Every connection to the PEC provider for this mailbox stayed busy; please reconnect\r\n";
            let _ = write(&mut client_writer, bye).await;
            SessionEnd::Error(error.to_string())
        }
        other => {
            tracing::warn!(error = %other, "a session without its provider connection could not go on");
            let bye = b"* BYE [UNAVAILABLE] The PEC provider cannot be reached right now\r\n";
            let _ = write(&mut client_writer, bye).await;
            SessionEnd::UpstreamClosed
        }
    };
    for record in core.session.abandon() {
        let _ = ctx
            .audit(
                &record.command,
                record.folder,
                record.detail,
                record.outcome,
            )
            .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), client_writer.shutdown()).await;
    Outcome::Ended(end)
}

/// The folder's UIDs on `provider` (`UID SEARCH ALL`), with the untagged news about the
/// folder that came meanwhile, in order (the connection's own numbering). Dovecot tells news
/// at the end of a command, after the SEARCH answer it does not reflect: then the search is
/// asked again, until an answer comes with no news after it, so the UIDs returned are the
/// connection's numbering once every news item returned is applied.
pub(super) async fn search_all(
    provider: &mut ProviderConnection,
    tag: &str,
    timeout: Duration,
) -> Result<(Vec<u32>, Vec<Vec<u8>>), ParkError> {
    let mut told = Vec::new();
    for _ in 0..SEARCH_ROUNDS {
        let (uids, news_after) = search_once(provider, tag, timeout, &mut told).await?;
        if !news_after {
            return Ok((uids, told));
        }
    }
    Err(ParkError::Gone(
        "the folder kept changing while pecgate read it".into(),
    ))
}

/// A folder changing faster than this many searches can follow is given up on.
const SEARCH_ROUNDS: usize = 8;

/// One `UID SEARCH ALL`: its UIDs and whether news came after them.
async fn search_once(
    provider: &mut ProviderConnection,
    tag: &str,
    timeout: Duration,
    told: &mut Vec<Vec<u8>>,
) -> Result<(Vec<u32>, bool), ParkError> {
    send_own(provider, tag, "UID SEARCH ALL").await?;
    let mut found = None::<Vec<u32>>;
    let mut news_after = false;
    loop {
        let unit = next_unit(provider, timeout).await?;
        match response::classify(&unit) {
            ResponseKind::Tagged { tag: t, status } if t == tag => {
                return match (status, found) {
                    (Status::Ok, found) => Ok((found.unwrap_or_default(), news_after)),
                    _ => Err(ParkError::Gone(
                        "the folder could not be searched on the provider".into(),
                    )),
                };
            }
            ResponseKind::UntaggedStatus(Status::Bye) => return Err(LineError::Closed.into()),
            ResponseKind::Tagged { .. } | ResponseKind::Continuation | ResponseKind::Garbage => {
                return Err(ParkError::Gone(
                    "the PEC provider answered out of turn".into(),
                ));
            }
            _ => match news(&unit) {
                News::Search(uids) => found.get_or_insert_default().extend(uids),
                News::Expunge(_) | News::Exists(_) | News::Flags { .. } | News::FlagList(_) => {
                    news_after |= found.is_some();
                    told.push(unit);
                }
                _ => {}
            },
        }
    }
}

/// Read the session's UIDs on the connection it was attached to (none without a folder), and
/// give that connection back, its folder still selected with that UID list (a session waking
/// on the same folder takes it up with no command).
async fn snapshot(
    ctx: &SessionContext,
    core: &Core,
    mut provider: ProviderConnection,
    watched: bool,
    client: &mut ClientWriter,
) -> Result<View, ParkError> {
    if !watched {
        // Nothing selected: the connection is as a fresh login leaves it.
        pool::give_back(provider).await;
        return Ok(View::default());
    }
    let timeout = ctx.gateway.provider_timeout;
    let (uids, told) = search_all(&mut provider, "s7", timeout).await?;
    // The connection was the client's: its news is the client's, and in IDLE all of it is
    // allowed.
    for unit in told {
        write(client, &unit).await?;
    }
    let view = View::new(uids.clone());
    provider.selected = still_selected(core, uids);
    pool::give_back(provider).await;
    Ok(view)
}

/// What a connection leaving a session carries of the session's folder: its name and mode,
/// its UIDVALIDITY and `uids`, the connection's numbering of it.
pub(super) fn still_selected(core: &Core, uids: Vec<u32>) -> Option<Box<SelectedFolder>> {
    let (name, read_only) = core.session.reselect().and_then(folder_of)?;
    Some(Box::new(SelectedFolder {
        name,
        read_only,
        uidvalidity: core.session.uidvalidity(),
        uids,
    }))
}

/// Events queued since the subscription began: applied to the fresh view (idempotently).
async fn catch_up_events(
    subscription: &mut Option<Subscription>,
    view: &mut View,
    client: &mut ClientWriter,
) -> Result<(), ParkError> {
    let Some(subscription) = subscription else {
        return Ok(());
    };
    loop {
        match subscription.events.try_recv() {
            Ok(signal) => tell(&signal, view, client).await?,
            Err(tokio::sync::broadcast::error::TryRecvError::Empty) => return Ok(()),
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                resync(subscription, view, client).await?;
            }
            Err(tokio::sync::broadcast::error::TryRecvError::Closed) => {
                return Err(ParkError::Gone("the folder watcher stopped".into()));
            }
        }
    }
}

/// Tell the client one signal from the watcher.
async fn tell(
    signal: &Signal,
    view: &mut View,
    client: &mut ClientWriter,
) -> Result<(), ParkError> {
    match signal {
        Signal::Event(event) => {
            let bytes = view.apply(event).map_err(diverged)?;
            if !bytes.is_empty() {
                write(client, &bytes).await?;
            }
            Ok(())
        }
        Signal::Invalidated(reason) => Err(ParkError::Gone(reason.clone())),
    }
}

pub(super) fn diverged(error: Diverged) -> ParkError {
    ParkError::Gone(format!(
        "the folder changed in a way pecgate cannot follow ({error})"
    ))
}

/// A subscriber that fell behind starts again from the watcher's current UID list.
async fn resync(
    subscription: &mut Subscription,
    view: &mut View,
    client: &mut ClientWriter,
) -> Result<(), ParkError> {
    let uids = subscription.resync();
    let bytes = view.reconcile(&uids).map_err(diverged)?;
    write(client, &bytes).await
}

/// Serve the IDLE until the client sends a line; returns it.
async fn wait_parked(
    ctx: &SessionContext,
    subscription: &mut Option<Subscription>,
    view: &mut View,
    client: &mut ClientWriter,
    client_reader: &mut ReadHalf<BoxStream>,
    client_buffer: &mut BytesMut,
    assembler: &mut CommandAssembler,
) -> Result<Vec<u8>, ParkError> {
    let idle_timeout = ctx.gateway.config.gateway.idle_timeout;
    let mut silent_until = tokio::time::Instant::now() + idle_timeout;
    let mut still_here =
        tokio::time::interval_at(tokio::time::Instant::now() + STILL_HERE, STILL_HERE);
    loop {
        // A synchronising literal is never invited during IDLE (as when attached).
        match assembler.poll(client_buffer, |_, literal| literal.sync) {
            Assembled::Command(line) | Assembled::MessageLiteral { head: line, .. } => {
                return Ok(line);
            }
            Assembled::Refused { .. } => return Ok(b"(a command refused while framing)".to_vec()),
            Assembled::SendContinuation | Assembled::NeedMore => {}
        }
        tokio::select! {
            read = io::fill(client_reader, client_buffer) => match read {
                Ok(true) => silent_until = tokio::time::Instant::now() + idle_timeout,
                Ok(false) => return Err(ParkError::Client(SessionEnd::ClientClosed)),
                Err(e) => return Err(ParkError::Client(SessionEnd::Error(e.to_string()))),
            },
            signal = next_signal(subscription) => on_signal(signal, subscription, view, client).await?,
            _ = still_here.tick() => write(client, b"* OK Still here\r\n").await?,
            () = tokio::time::sleep_until(silent_until) => {
                let _ = write(client, b"* BYE Autologout: idle for too long\r\n").await;
                return Err(ParkError::Client(SessionEnd::Timeout));
            }
            () = ctx.stop.stopped() => {
                let _ = write(client, &stop_bye(ctx)).await;
                return Err(ParkError::Client(SessionEnd::Shutdown));
            }
        }
    }
}

/// The watcher's next signal; never, without a watcher.
async fn next_signal(
    subscription: &mut Option<Subscription>,
) -> Result<std::sync::Arc<Signal>, RecvError> {
    match subscription {
        Some(subscription) => subscription.events.recv().await,
        None => std::future::pending().await,
    }
}

/// Tell the client a signal, or resynchronise after falling behind.
async fn on_signal(
    signal: Result<std::sync::Arc<Signal>, RecvError>,
    subscription: &mut Option<Subscription>,
    view: &mut View,
    client: &mut ClientWriter,
) -> Result<(), ParkError> {
    match (signal, subscription) {
        (Ok(signal), _) => tell(&signal, view, client).await,
        (Err(RecvError::Lagged(_)), Some(subscription)) => resync(subscription, view, client).await,
        _ => Err(ParkError::Gone("the folder watcher stopped".into())),
    }
}

/// Take a provider connection, select the session's folder on it and bring the client to
/// the folder as that connection now numbers it.
async fn resume(
    ctx: &SessionContext,
    core: &Core,
    subscription: &mut Option<Subscription>,
    view: &mut View,
    client: &mut ClientWriter,
) -> Result<ProviderConnection, ParkError> {
    let gateway = &ctx.gateway;
    let mailbox = ctx.mailbox.as_deref().unwrap_or_default();
    let runtime = &gateway.mailboxes[mailbox];
    let target = runtime
        .target(gateway.provider_timeout)
        .ok_or_else(|| ParkError::Gone("no provider password in the vault".into()))?;
    let user = ctx.user.as_deref().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + gateway.config.gateway.connection_wait;
    let wanted = match subscription {
        None => None,
        Some(_) => Some(
            core.session
                .reselect()
                .and_then(folder_of)
                .ok_or_else(|| ParkError::Gone("the folder cannot be selected again".into()))?,
        ),
    };
    let keep = wanted
        .as_ref()
        .map(|(name, read_only)| (name.as_str(), *read_only));
    let mut provider = {
        let connect =
            runtime
                .pool
                .connect_keeping(&target, user, Class::Interactive, Some(deadline), keep);
        tokio::pin!(connect);
        // News keeps reaching the client while it waits for a connection.
        loop {
            tokio::select! {
                connected = &mut connect => break connected?,
                signal = next_signal(subscription) => on_signal(signal, subscription, view, client).await?,
            }
        }
    };
    let (Some(subscription), Some((folder, read_only))) = (subscription, wanted) else {
        // Nothing was selected: the connection is ready as it is.
        return Ok(provider);
    };
    let expected = subscription.uidvalidity();
    let timeout = gateway.provider_timeout;
    // Waking from IDLE, the client hears of everything before its IDLE ends: the connection
    // is read even when handed over with the folder selected.
    let (uidvalidity, uids) = on_folder(&mut provider, &folder, read_only, None, timeout).await?;
    if expected.is_some() && uidvalidity != expected {
        return Err(ParkError::Gone(
            "the folder was replaced on the provider (UIDVALIDITY changed)".into(),
        ));
    }
    // The connection's numbering is `uids`: the reconcile tells the client what differs
    // from the view it has.
    let bytes = view.reconcile(&uids).map_err(diverged)?;
    write(client, &bytes).await?;
    Ok(provider)
}

/// The folder a SELECT/EXAMINE opens, as sent to the provider, and whether read-only.
pub(super) fn folder_of(select: &Command<'_>) -> Option<(String, bool)> {
    let read_only = matches!(select.body, CommandBody::Examine { .. });
    wire_folder(select).map(|name| (name, read_only))
}

/// `folder` selected on `provider` (read-only or not) and the connection's numbering of it
/// (its UIDs), with the folder's UIDVALIDITY: as handed over by the session that had it
/// selected (no command), or selected again and read. `newest_known`: the highest UID the
/// client knows, or `None` when the client must hear of everything now (a wake from IDLE).
/// A handed-over list older than what the client knows (mail came after it was read) cannot
/// tell a message gone from one the connection was not told of yet: it is read again.
pub(super) async fn on_folder(
    provider: &mut ProviderConnection,
    folder: &str,
    read_only: bool,
    newest_known: Option<u32>,
    timeout: Duration,
) -> Result<(Option<u32>, Vec<u32>), ParkError> {
    match provider.selected.take() {
        Some(selected) if selected.is(Some((folder, read_only))) => {
            let newest = selected.uids.last().copied().unwrap_or(0);
            if newest_known.is_some_and(|known| newest >= known) {
                return Ok((selected.uidvalidity, selected.uids));
            }
            // Still selected: one search brings the connection up to date (what it is told
            // meanwhile describes its own older view, not the client's).
            let (uids, _) = search_all(provider, "s8", timeout).await?;
            Ok((selected.uidvalidity, uids))
        }
        _ => {
            let verb = if read_only { "EXAMINE" } else { "SELECT" };
            let uidvalidity = select_again(provider, verb, folder, timeout).await?;
            // The new connection's news describes its own fresh view: not the client's.
            let (uids, _) = search_all(provider, "s8", timeout).await?;
            Ok((uidvalidity, uids))
        }
    }
}

/// `SELECT`/`EXAMINE` the folder on a fresh connection; its answers are the connection's, not
/// news for the client (the reconcile tells the client what differs). Returns UIDVALIDITY.
async fn select_again(
    provider: &mut ProviderConnection,
    verb: &str,
    folder: &str,
    timeout: Duration,
) -> Result<Option<u32>, ParkError> {
    let tag = "s7";
    send_own(provider, tag, &format!("{verb} {}", quoted(folder))).await?;
    let mut uidvalidity = None;
    loop {
        let unit = next_unit(provider, timeout).await?;
        match response::classify(&unit) {
            ResponseKind::Tagged { tag: t, status } if t == tag => {
                return match status {
                    Status::Ok => Ok(uidvalidity),
                    _ => Err(ParkError::Gone(
                        "the folder can no longer be opened on the provider".into(),
                    )),
                };
            }
            ResponseKind::UntaggedStatus(Status::Bye) => return Err(LineError::Closed.into()),
            _ => {
                if let News::UidValidity(v) = news(&unit) {
                    uidvalidity = Some(v);
                }
            }
        }
    }
}

/// One of pecgate's own commands, written and flushed.
async fn send_own(
    provider: &mut ProviderConnection,
    tag: &str,
    text: &str,
) -> Result<(), ParkError> {
    provider
        .writer
        .write_all(format!("{tag} {text}\r\n").as_bytes())
        .await
        .map_err(LineError::from)?;
    provider.writer.flush().await.map_err(LineError::from)?;
    Ok(())
}

/// The next response unit (a line and its literals) within `timeout`.
async fn next_unit(
    provider: &mut ProviderConnection,
    timeout: Duration,
) -> Result<Vec<u8>, ParkError> {
    tokio::time::timeout(timeout, async {
        let line = io::next_line(&mut provider.reader, &mut provider.buffer, UNIT_MAX).await?;
        read_unit(&mut provider.reader, &mut provider.buffer, &line, UNIT_MAX).await
    })
    .await
    .map_err(|_| ParkError::Timeout(timeout))?
    .map_err(ParkError::from)
}

/// Carry out the machine's actions for the end of a parked IDLE.
async fn perform(
    ctx: &SessionContext,
    actions: Vec<Action>,
    client: &mut ClientWriter,
) -> Result<(), SessionEnd> {
    for action in actions {
        match action {
            Action::Audit(record) => {
                ctx.audit(
                    &record.command,
                    record.folder,
                    record.detail,
                    record.outcome,
                )
                .await
                .map_err(|_| SessionEnd::AuditFailed)?;
            }
            Action::Client(bytes) => write(client, &bytes)
                .await
                .map_err(|_| SessionEnd::ClientClosed)?,
            _ => unreachable!("unparking only audits and answers"),
        }
    }
    Ok(())
}

pub(super) async fn write(client: &mut ClientWriter, bytes: &[u8]) -> Result<(), ParkError> {
    let result = async {
        client.write_all(bytes).await?;
        client.flush().await
    }
    .await;
    result.map_err(|_| ParkError::Client(SessionEnd::ClientClosed))
}
