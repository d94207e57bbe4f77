//! What a session carries from one phase to the next (attached to a provider connection in
//! [`super::relay`], parked in IDLE in [`super::park`], lent between commands in
//! [`super::lend`]), how it ends, and how it waits for a pooled connection: shared by all,
//! so none imports another's internals.

use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter, WriteHalf};

use crate::gateway::MailboxRuntime;
use crate::imap::client_session::ClientSession;
use crate::imap::provider_client::ProviderClient;
use crate::io::BoxStream;
use crate::session::SessionContext;
use crate::upstream::pool::PoolError;
use crate::upstream::slots::Class;
use crate::upstream::{ProviderConnection, ProviderTarget};

/// The client's write half, buffered.
pub type ClientWriter = BufWriter<WriteHalf<BoxStream>>;

/// How a session ended (for the log and the audit trail).
#[derive(Debug)]
pub enum SessionEnd {
    Logout,
    ClientClosed,
    Timeout,
    Shutdown,
    AuditFailed,
    UpstreamClosed,
    /// The provider sent something pecgate could not attribute.
    ProviderViolation(String),
    /// The provider owed an answer and moved no byte for this long.
    ProviderStalled(Duration),
    /// The folder the session had selected was replaced or removed on the provider.
    FolderGone(String),
    Error(String),
    /// Internal: the attached phase ends because the session parks in IDLE or lends its
    /// connection between two commands (never the end of a session).
    Detaching,
}

/// What an IMAP client is told when its session is asked to end.
pub fn stop_bye(ctx: &SessionContext) -> Vec<u8> {
    match ctx.stop_reason() {
        Some(reason) => format!("* BYE [UNAVAILABLE] Session ended: {reason}\r\n").into_bytes(),
        None => b"* BYE pecgate is shutting down\r\n".to_vec(),
    }
}

/// The two machines of one session.
pub struct Core {
    pub session: ClientSession,
    pub provider: ProviderClient,
}

/// What a session needs to be attached to a provider connection.
pub struct Attachment {
    pub core: Core,
    pub client_writer: ClientWriter,
    pub provider: ProviderConnection,
}

/// A provider connection from the mailbox's pool, waiting up to `wait` for a free one (a
/// login, or a command of a session that lent its connection). A waiting client is told so
/// every few seconds (an untagged `OK`, allowed at any time, which also keeps its own timers
/// from firing). `keep`: see [`crate::upstream::pool::Pool::connect_keeping`].
pub async fn pool_connection<W: AsyncWrite + Unpin>(
    client: &mut W,
    mailbox: &MailboxRuntime,
    target: &ProviderTarget<'_>,
    user: &str,
    wait: Duration,
    keep: Option<(&str, bool)>,
) -> Result<ProviderConnection, PoolError> {
    let deadline = tokio::time::Instant::now() + wait;
    let connect =
        mailbox
            .pool
            .connect_keeping(target, user, Class::Interactive, Some(deadline), keep);
    tokio::pin!(connect);
    let every = (wait / 3).clamp(Duration::from_secs(1), WAITING_NOTE_EVERY);
    let mut note = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut notes_reach_client = true;
    loop {
        tokio::select! {
            result = &mut connect => return result,
            _ = note.tick(), if notes_reach_client => {
                // A client gone meanwhile finds out at its answer; the wait goes on regardless.
                let sent = async {
                    client.write_all(WAITING_NOTE).await?;
                    client.flush().await
                };
                notes_reach_client = sent.await.is_ok();
            }
        }
    }
}

/// How often a client waiting for a provider connection hears from pecgate, at most.
const WAITING_NOTE_EVERY: Duration = Duration::from_secs(15);
const WAITING_NOTE: &[u8] =
    b"* OK Waiting for a free connection to the PEC provider for this mailbox\r\n";
