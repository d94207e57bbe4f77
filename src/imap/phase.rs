//! What a session carries from one phase to the next (attached to a provider connection in
//! [`super::relay`], parked in IDLE in [`super::park`]) and how it ends: shared by both, so
//! neither imports the other's internals.

use std::time::Duration;

use tokio::io::{BufWriter, WriteHalf};

use crate::imap::client_session::ClientSession;
use crate::imap::provider_client::ProviderClient;
use crate::io::BoxStream;
use crate::session::SessionContext;
use crate::upstream::ProviderConnection;

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
    /// Internal: the attached phase ends because the session parks in IDLE (never the end
    /// of a session).
    Parking,
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
