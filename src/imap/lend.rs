//! A session between two commands whose provider connection another session is waiting for
//! lends it ([`crate::upstream::pool::Pool::offer`]): the relay ends the attached phase at a
//! response boundary with nothing in flight, and this module
//! 1. reads the session's UIDs on that connection (`UID SEARCH ALL`), tells the client the
//!    connection's news in its own numbers (an EXPUNGE is held: no command is in progress),
//!    and gives the connection back to the pool with the folder still selected and that UID
//!    list ([`crate::upstream::SelectedFolder`]): a waiter on the same folder and mode (the
//!    usual case: everybody works in INBOX) goes on with no SELECT and no search of its own,
//!    anyone else gets it back in the authenticated state (`UNSELECT`);
//! 2. waits for the client's next command (its silence and pecgate's stops end the session
//!    as when attached);
//! 3. takes a connection from the pool, fairly, as logins do (`* OK Waiting…` meanwhile),
//!    selects the folder again as the client did (unless the connection comes with it
//!    selected), checks UIDVALIDITY, reads the UIDs, tells
//!    the client `EXISTS` for what arrived, and leaves the session machine the difference in
//!    numbering for what went ([`super::renumber`]): the command then runs on the new
//!    connection, translated until the client can be told.
//!
//! Nothing here changes the mailbox: pecgate's own commands are `UID SEARCH`, `UNSELECT` and
//! the client's own `SELECT`/`EXAMINE`. As when parked, flag changes made while the session
//! had no connection are learnt at the client's next FETCH FLAGS, and `\Recent` is not
//! carried over.

use bytes::BytesMut;
use tokio::io::ReadHalf;

use crate::imap::park::{
    self, Outcome, ParkError, diverged, folder_of, on_folder, search_all, write,
};
use crate::imap::phase::{Attachment, ClientWriter, Core, SessionEnd, pool_connection, stop_bye};
use crate::imap::renumber::{Positions, Renumbered, Renumbering};
use crate::io::{self, BoxStream};
use crate::session::SessionContext;
use crate::upstream::ProviderConnection;
use crate::upstream::pool;

/// Lend the session's connection, then serve its next command on a pooled one.
pub async fn serve(
    ctx: &SessionContext,
    lent: Attachment,
    quiet_since: tokio::time::Instant,
    client_reader: &mut ReadHalf<BoxStream>,
    client_buffer: &mut BytesMut,
) -> Outcome {
    let Attachment {
        mut core,
        mut client_writer,
        provider,
    } = lent;
    let result = async {
        let positions = lend(ctx, &mut core, provider, &mut client_writer).await?;
        let silent_until = quiet_since + ctx.gateway.config.gateway.idle_timeout;
        wait_for_command(
            ctx,
            silent_until,
            &mut client_writer,
            client_reader,
            client_buffer,
        )
        .await?;
        take_up(ctx, &mut core, &positions, &mut client_writer).await
    }
    .await;
    match result {
        Ok(provider) => Outcome::Resumed(Box::new(Attachment {
            core,
            client_writer,
            provider,
        })),
        Err(error) => park::ended(ctx, error, core, client_writer).await,
    }
}

/// The session's messages as the client numbers them, read on the connection it holds, which
/// then goes back to the pool.
async fn lend(
    ctx: &SessionContext,
    core: &mut Core,
    mut provider: ProviderConnection,
    client: &mut ClientWriter,
) -> Result<Positions, ParkError> {
    if core.session.selected().is_none() {
        // Nothing selected: the connection is as a fresh login leaves it.
        tracing::debug!("lending the provider connection to a waiting session");
        pool::give_back(provider).await;
        return Ok(Positions::default());
    }
    let (uids, news) = search_all(&mut provider, "s7", ctx.gateway.provider_timeout).await?;
    // The connection's news is the client's; with no command in progress it hears all but
    // EXPUNGE, which waits in the difference of numbering.
    let mut numbering = core
        .session
        .renumbering()
        .cloned()
        .unwrap_or_else(Renumbering::aligned);
    for unit in news {
        match numbering.untagged(&unit) {
            Renumbered::Same => write(client, &unit).await?,
            Renumbered::Line(line) => write(client, &line).await?,
            Renumbered::Held => {}
        }
    }
    let positions = Positions::new(&uids, Some(&numbering));
    tracing::debug!(
        messages = positions.len(),
        "lending the provider connection to a waiting session"
    );
    // Handed over with the folder selected: a waiter on the same folder uses it as it is
    // (the pool puts it back in the authenticated state for anyone else).
    provider.selected = park::still_selected(core, uids);
    pool::give_back(provider).await;
    Ok(positions)
}

/// Until the client sends something (its next command, read by the relay once attached), or
/// its silence reaches `silent_until` (the idle timeout, counted from its last byte).
async fn wait_for_command(
    ctx: &SessionContext,
    silent_until: tokio::time::Instant,
    client: &mut ClientWriter,
    client_reader: &mut ReadHalf<BoxStream>,
    client_buffer: &mut BytesMut,
) -> Result<(), ParkError> {
    if !client_buffer.is_empty() {
        return Ok(());
    }
    tokio::select! {
        read = tokio::time::timeout_at(silent_until, io::fill(client_reader, client_buffer)) => {
            match read {
                Ok(Ok(true)) => Ok(()),
                Ok(Ok(false)) => Err(ParkError::Client(SessionEnd::ClientClosed)),
                Ok(Err(e)) => Err(ParkError::Client(SessionEnd::Error(e.to_string()))),
                Err(_) => {
                    let _ = write(client, b"* BYE Autologout: idle for too long\r\n").await;
                    Err(ParkError::Client(SessionEnd::Timeout))
                }
            }
        }
        () = ctx.stop.stopped() => {
            let _ = write(client, &stop_bye(ctx)).await;
            Err(ParkError::Client(SessionEnd::Shutdown))
        }
    }
}

/// A pooled connection with the session's folder selected again, and the client's numbering
/// against it handed to the session machine.
async fn take_up(
    ctx: &SessionContext,
    core: &mut Core,
    positions: &Positions,
    client: &mut ClientWriter,
) -> Result<ProviderConnection, ParkError> {
    let gateway = &ctx.gateway;
    let mailbox = ctx.mailbox.as_deref().unwrap_or_default();
    let runtime = gateway
        .mailboxes
        .get(mailbox)
        .ok_or_else(|| ParkError::Gone("the mailbox is no longer configured".into()))?;
    let target = runtime
        .target(gateway.provider_timeout)
        .ok_or_else(|| ParkError::Gone("no provider password in the vault".into()))?;
    let user = ctx.user.as_deref().unwrap_or_default();
    let wait = gateway.config.gateway.connection_wait;
    let wanted = core.session.reselect().map(|select| {
        folder_of(select)
            .ok_or_else(|| ParkError::Gone("the folder's name cannot be sent again".into()))
    });
    let wanted = wanted.transpose()?;
    let keep = wanted
        .as_ref()
        .map(|(name, read_only)| (name.as_str(), *read_only));
    // A stop (shutdown, reload, kick) ends the wait: the client is told, as when attached.
    let connected = tokio::select! {
        connected = pool_connection(client, runtime, &target, user, wait, keep) => connected,
        () = ctx.stop.stopped() => {
            let _ = write(client, &stop_bye(ctx)).await;
            return Err(ParkError::Client(SessionEnd::Shutdown));
        }
    };
    let mut provider = connected?;
    let Some((folder, read_only)) = wanted else {
        // Nothing was selected: the connection is ready as it is.
        return Ok(provider);
    };
    let timeout = gateway.provider_timeout;
    // The command itself brings the connection's news: a handed-over list is enough unless
    // the client knows newer mail than it.
    let newest_known = Some(positions.newest());
    let (uidvalidity, uids) =
        on_folder(&mut provider, &folder, read_only, newest_known, timeout).await?;
    if let (Some(known), Some(now)) = (core.session.uidvalidity(), uidvalidity)
        && known != now
    {
        return Err(ParkError::Gone(
            "the folder was replaced on the provider (UIDVALIDITY changed)".into(),
        ));
    }
    let (renumbering, exists) = positions.resume(&uids).map_err(diverged)?;
    if let Some(count) = exists {
        write(client, format!("* {count} EXISTS\r\n").as_bytes()).await?;
    }
    tracing::debug!(
        expunged_meanwhile = renumbering.as_ref().map_or(0, |r| r.gone().len()),
        "back on a provider connection"
    );
    core.session.renumber(renumbering);
    Ok(provider)
}
