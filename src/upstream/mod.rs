//! Connections to the PEC provider's IMAP server.
//!
//! A [`ProviderConnection`] is a logged-in provider session, kept apart from the client
//! session it serves (the client's state lives in the relay), so a session parked in IDLE
//! gives it back and takes another when it wakes, and it outlives the session that opened it.
//! Sessions, folder watchers and the receipts worker
//! get theirs from the mailbox's [`pool::Pool`], and the connection carries its place there:
//! dropping the connection gives the place to the next waiter.

pub mod pool;
pub mod slots;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use zeroize::Zeroizing;

use crate::config::{UpstreamEndpoint, UpstreamSecurity};
use crate::imap::response::{self, ListEntry, ResponseKind, Status};
use crate::io::{self, BoxStream, LineError};
use crate::provider_io::{self, TransportError};

/// Longest response line accepted during connection set-up.
const SETUP_LINE_MAX: usize = 64 * 1024;

/// Why a provider session could not be opened. Never carries the password.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP, TLS or a time limit.
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{endpoint} refused STARTTLS: {reply}")]
    StartTlsRefused { endpoint: String, reply: String },
    #[error("{endpoint} rejected the login of {login}: {reply}")]
    LoginRejected {
        endpoint: String,
        login: String,
        reply: String,
    },
    /// The provider refused the login for its own limit on simultaneous connections.
    #[error("{endpoint} refused another connection for its connection limit: {reply}")]
    ConnectionLimit { endpoint: String, reply: String },
    #[error("{endpoint} sent an unexpected greeting: {reply}")]
    Greeting { endpoint: String, reply: String },
    #[error("{endpoint}: protocol error: {reason}")]
    Protocol { endpoint: String, reason: String },
}

impl ProviderTarget<'_> {
    /// What a connection opened for this target is logged in to: endpoint, login and a
    /// digest of the password. A connection kept idle is reused only for the same (a reload
    /// may have changed any of them).
    pub fn identity(&self) -> [u8; 32] {
        use sha2::Digest as _;
        let mut hash = sha2::Sha256::new();
        for part in [
            self.endpoint.to_string().as_str(),
            self.login,
            self.password,
        ] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        hash.finalize().into()
    }
}

/// Everything needed to open a provider session for one mailbox.
pub struct ProviderTarget<'a> {
    pub endpoint: &'a UpstreamEndpoint,
    pub tls: Arc<rustls::ClientConfig>,
    pub login: &'a str,
    pub password: &'a str,
    pub timeout: Duration,
}

/// A logged-in provider session.
pub struct ProviderConnection {
    pub reader: ReadHalf<BoxStream>,
    pub writer: WriteHalf<BoxStream>,
    /// Bytes read from the provider and not consumed yet.
    pub buffer: BytesMut,
    /// The provider's capabilities after login.
    pub capabilities: Vec<String>,
    /// The provider's hierarchy delimiter (`None`: a flat namespace).
    pub delimiter: Option<char>,
    /// The connection's place in its mailbox's pool (`None` outside one, e.g. `check
    /// --live`), given back when the connection is dropped.
    pub slot: Option<pool::Slot>,
    /// [`ProviderTarget::identity`] of the target it was opened for.
    pub identity: [u8; 32],
    /// Set only while a session hands the connection to another with its folder still
    /// selected ([`pool::give_back`] to a waiter): otherwise a pooled connection is in the
    /// authenticated state.
    pub selected: Option<Box<SelectedFolder>>,
}

/// A folder left selected on a connection handed from one session to another, and the
/// connection's numbering of it: the next session of the same folder (and mode) needs no
/// SELECT and no search of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedFolder {
    /// As sent to the provider.
    pub name: String,
    /// Selected with EXAMINE.
    pub read_only: bool,
    pub uidvalidity: Option<u32>,
    /// The connection's message numbers: message n is `uids[n - 1]`.
    pub uids: Vec<u32>,
}

impl SelectedFolder {
    /// Whether this is the folder, in the mode, `wanted` says (name as sent, read-only).
    pub fn is(&self, wanted: Option<(&str, bool)>) -> bool {
        wanted == Some((self.name.as_str(), self.read_only))
    }
}

/// What a [`ProviderConnection`] is besides its stream, kept aside while a driver uses the
/// stream halves on their own (the relay) and joined back afterwards.
pub struct ConnectionRest {
    capabilities: Vec<String>,
    delimiter: Option<char>,
    slot: Option<pool::Slot>,
    identity: [u8; 32],
}

impl ConnectionRest {
    pub fn join(
        self,
        reader: ReadHalf<BoxStream>,
        writer: WriteHalf<BoxStream>,
        buffer: BytesMut,
    ) -> ProviderConnection {
        ProviderConnection {
            reader,
            writer,
            buffer,
            capabilities: self.capabilities,
            delimiter: self.delimiter,
            slot: self.slot,
            identity: self.identity,
            selected: None,
        }
    }
}

impl ProviderConnection {
    /// The stream halves and unread bytes, and the rest to [`ConnectionRest::join`] them with.
    pub fn split_io(
        self,
    ) -> (
        ReadHalf<BoxStream>,
        WriteHalf<BoxStream>,
        BytesMut,
        ConnectionRest,
    ) {
        let rest = ConnectionRest {
            capabilities: self.capabilities,
            delimiter: self.delimiter,
            slot: self.slot,
            identity: self.identity,
        };
        (self.reader, self.writer, self.buffer, rest)
    }

    /// Whether the provider accepts non-synchronising literals.
    pub fn literal_plus(&self) -> bool {
        self.has("LITERAL+")
    }

    /// Best-effort polite goodbye; the connection is dropped either way.
    pub async fn logout(mut self) {
        let goodbye = async {
            self.writer.write_all(b"s9 LOGOUT\r\n").await?;
            self.writer.flush().await?;
            // Wait for the tagged answer so the provider records a clean logout.
            loop {
                let line =
                    io::next_line(&mut self.reader, &mut self.buffer, SETUP_LINE_MAX).await?;
                if matches!(response::classify(&line), ResponseKind::Tagged { .. }) {
                    return Ok::<_, LineError>(());
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), goodbye).await;
    }
}

impl ProviderConnection {
    /// Whether an idle connection is as it was left: the provider has sent nothing on it
    /// since (it has no news to tell unasked, and has not closed it). Looks without waiting.
    pub async fn untouched(&mut self) -> bool {
        if !self.buffer.is_empty() {
            return false;
        }
        // One poll of a read: ready means bytes or the end of the stream, either of which
        // says the connection is not as it was.
        let read = io::fill(&mut self.reader, &mut self.buffer);
        tokio::time::timeout(Duration::ZERO, read).await.is_err()
    }

    /// A NOOP answered `OK` within `limit`: an idle connection is still logged in and in step.
    pub async fn still_there(&mut self, limit: Duration) -> bool {
        self.simple("s5", "NOOP", limit).await == Some(Status::Ok)
    }

    /// Back to the authenticated state after a session that had a folder selected, with
    /// `UNSELECT` (never CLOSE: that would expunge). `false` when the provider lacks UNSELECT
    /// or did not say OK: the connection is not fit for another session.
    pub async fn unselect(&mut self, limit: Duration) -> bool {
        self.selected = None;
        self.has("UNSELECT") && self.simple("s6", "UNSELECT", limit).await == Some(Status::Ok)
    }

    pub fn has(&self, capability: &str) -> bool {
        self.capabilities
            .iter()
            .any(|c| c.eq_ignore_ascii_case(capability))
    }

    /// One of pecgate's own commands without arguments, its untagged answers (literals
    /// included) read and dropped; the tagged status, or `None` (closed, garbled, too slow).
    async fn simple(&mut self, tag: &str, command: &str, limit: Duration) -> Option<Status> {
        let exchange = async {
            self.writer
                .write_all(format!("{tag} {command}\r\n").as_bytes())
                .await?;
            self.writer.flush().await?;
            loop {
                let line =
                    io::next_line(&mut self.reader, &mut self.buffer, SETUP_LINE_MAX).await?;
                match response::classify(&line) {
                    ResponseKind::Tagged { tag: t, status } if t == tag => {
                        return Ok::<_, LineError>(Some(status));
                    }
                    ResponseKind::Tagged { .. }
                    | ResponseKind::Continuation
                    | ResponseKind::Garbage
                    | ResponseKind::UntaggedStatus(Status::Bye) => return Ok(None),
                    _ => {
                        read_unit(&mut self.reader, &mut self.buffer, &line, MAX_UNIT).await?;
                    }
                }
            }
        };
        tokio::time::timeout(limit, exchange)
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    }
}

/// Largest untagged answer read (and dropped) during pecgate's own NOOP or UNSELECT.
const MAX_UNIT: usize = 16 * 1024 * 1024;

impl ProviderConnection {
    /// `LIST "" "*"`: every folder of the mailbox (for `pecgate check --live`).
    pub async fn list_all(&mut self) -> Result<Vec<ListEntry>, LineError> {
        self.writer.write_all(b"s4 LIST \"\" \"*\"\r\n").await?;
        self.writer.flush().await?;
        let mut folders = Vec::new();
        loop {
            let line = io::next_line(&mut self.reader, &mut self.buffer, SETUP_LINE_MAX).await?;
            if let ResponseKind::Tagged { tag: "s4", .. } = response::classify(&line) {
                return Ok(folders);
            }
            // A name may come as a literal: read the whole response.
            let unit = read_unit(&mut self.reader, &mut self.buffer, &line, SETUP_LINE_MAX).await?;
            folders.extend(response::list_entry(&unit));
        }
    }
}

/// Open a session to the provider and log in with the mailbox's credentials.
pub async fn connect(target: &ProviderTarget<'_>) -> Result<ProviderConnection, UpstreamError> {
    let endpoint = target.endpoint.to_string();
    tokio::time::timeout(target.timeout, connect_inner(target, &endpoint))
        .await
        .map_err(|_| TransportError::timeout(&endpoint, target.timeout))?
}

async fn connect_inner(
    target: &ProviderTarget<'_>,
    endpoint: &str,
) -> Result<ProviderConnection, UpstreamError> {
    let protocol = |reason: String| UpstreamError::Protocol {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let line_error = |e: LineError| protocol(e.to_string());

    let mut stream = provider_io::connect(target.endpoint, &target.tls, target.timeout).await?;
    let mut buffer = BytesMut::with_capacity(4096);

    let greeting = io::next_line(&mut stream, &mut buffer, SETUP_LINE_MAX)
        .await
        .map_err(line_error)?;
    if response::classify(&greeting) != ResponseKind::UntaggedStatus(Status::Ok) {
        if response::names_connection_limit(&greeting) {
            return Err(UpstreamError::ConnectionLimit {
                endpoint: endpoint.to_owned(),
                reply: printable(&greeting),
            });
        }
        return Err(UpstreamError::Greeting {
            endpoint: endpoint.to_owned(),
            reply: printable(&greeting),
        });
    }
    let mut capabilities = response::capabilities_in(&greeting);

    if target.endpoint.security == UpstreamSecurity::StartTls {
        stream
            .write_all(b"s0 STARTTLS\r\n")
            .await
            .map_err(|e| protocol(e.to_string()))?;
        let reply = read_tagged(&mut stream, &mut buffer, "s0", |_| {})
            .await
            .map_err(line_error)?;
        if response::classify(&reply)
            != (ResponseKind::Tagged {
                tag: "s0",
                status: Status::Ok,
            })
        {
            return Err(UpstreamError::StartTlsRefused {
                endpoint: endpoint.to_owned(),
                reply: printable(&reply),
            });
        }
        if !buffer.is_empty() {
            // Bytes sent before the TLS handshake could be an injection attempt.
            return Err(protocol("data after the STARTTLS answer".to_owned()));
        }
        stream = Box::new(
            provider_io::connect_tls(target.endpoint, &target.tls, stream, target.timeout).await?,
        );
        capabilities.clear();
    }

    let login_steps = login_command(target.login, target.password);
    for (i, step) in login_steps.iter().enumerate() {
        stream
            .write_all(step)
            .await
            .map_err(|e| protocol(e.to_string()))?;
        stream.flush().await.map_err(|e| protocol(e.to_string()))?;
        if i + 1 < login_steps.len() {
            // A synchronising literal: wait for the provider's continuation.
            let line = io::next_line(&mut stream, &mut buffer, SETUP_LINE_MAX)
                .await
                .map_err(line_error)?;
            if response::classify(&line) != ResponseKind::Continuation {
                return Err(login_refused(endpoint, target.login, &line));
            }
        }
    }
    let mut login_caps = Vec::new();
    let reply = read_tagged(
        &mut stream,
        &mut buffer,
        "s1",
        note_capabilities(&mut login_caps),
    )
    .await
    .map_err(line_error)?;
    if response::classify(&reply)
        != (ResponseKind::Tagged {
            tag: "s1",
            status: Status::Ok,
        })
    {
        return Err(login_refused(endpoint, target.login, &reply));
    }
    if login_caps.is_empty() {
        stream
            .write_all(b"s2 CAPABILITY\r\n")
            .await
            .map_err(|e| protocol(e.to_string()))?;
        read_tagged(
            &mut stream,
            &mut buffer,
            "s2",
            note_capabilities(&mut login_caps),
        )
        .await
        .map_err(line_error)?;
    }
    // The hierarchy delimiter: folder policy splits names on it.
    stream
        .write_all(b"s3 LIST \"\" \"\"\r\n")
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let mut delimiter = None;
    read_tagged(&mut stream, &mut buffer, "s3", |line| {
        if let Some(found) = list_delimiter(line) {
            delimiter = found;
        }
    })
    .await
    .map_err(line_error)?;
    let (reader, writer) = tokio::io::split(stream);
    Ok(ProviderConnection {
        reader,
        writer,
        buffer,
        capabilities: login_caps,
        delimiter,
        slot: None,
        identity: target.identity(),
        selected: None,
    })
}

/// Read responses until the tagged one for `tag`, which is returned; every line before it
/// (and the tagged one) is shown to `inspect`.
async fn read_tagged(
    stream: &mut BoxStream,
    buffer: &mut BytesMut,
    tag: &str,
    mut inspect: impl FnMut(&[u8]),
) -> Result<BytesMut, LineError> {
    loop {
        let line = io::next_line(stream, buffer, SETUP_LINE_MAX).await?;
        inspect(&line);
        if matches!(response::classify(&line), ResponseKind::Tagged { tag: t, .. } if t == tag) {
            return Ok(line);
        }
    }
}

/// Complete a small response whose first line is `line`: while a line ends with a literal
/// announcement, read the literal and the line that follows. For responses that must be
/// inspected whole (mailbox names may be literals); `max` bounds the total.
pub async fn read_unit<R: tokio::io::AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    buf: &mut BytesMut,
    line: &[u8],
    max: usize,
) -> Result<Vec<u8>, LineError> {
    let mut unit = line.to_vec();
    let mut line_start = 0;
    while let Some(literal) = crate::imap::framing::literal_at_end(&unit[line_start..]) {
        let length = literal.length as usize;
        if unit.len() + length > max {
            return Err(LineError::TooLong(max));
        }
        while buf.len() < length {
            if !io::fill(reader, buf).await? {
                return Err(LineError::Closed);
            }
        }
        unit.extend_from_slice(&buf.split_to(length));
        line_start = unit.len();
        let rest = io::next_line(reader, buf, max - unit.len()).await?;
        unit.extend_from_slice(&rest);
    }
    Ok(unit)
}

/// Collect the capability list from a line that carries one.
fn note_capabilities(found: &mut Vec<String>) -> impl FnMut(&[u8]) + '_ {
    |line| {
        if response::carries_capabilities(line) {
            *found = response::capabilities_in(line);
        }
    }
}

/// The LOGIN command as the writes it takes: one write with quoted strings, or, when a value
/// cannot be quoted (8-bit or control characters), synchronising literals, each write after
/// the first waiting for a continuation. Buffers holding the password are zeroized.
fn login_command(login: &str, password: &str) -> Vec<Zeroizing<Vec<u8>>> {
    let mut steps = Vec::new();
    let mut current = Zeroizing::new(b"s1 LOGIN ".to_vec());
    for (i, value) in [login, password].into_iter().enumerate() {
        if i == 1 {
            current.push(b' ');
        }
        let quotable = value.bytes().all(|b| (0x20..0x7f).contains(&b));
        if quotable {
            current.push(b'"');
            for b in value.bytes() {
                if b == b'"' || b == b'\\' {
                    current.push(b'\\');
                }
                current.push(b);
            }
            current.push(b'"');
        } else {
            current.extend_from_slice(format!("{{{}}}\r\n", value.len()).as_bytes());
            steps.push(std::mem::replace(&mut current, Zeroizing::new(Vec::new())));
            current.extend_from_slice(value.as_bytes());
        }
    }
    current.extend_from_slice(b"\r\n");
    steps.push(current);
    steps
}

/// The delimiter in a `* LIST (..) "/" ""` answer: `Some(Some('/'))`, `Some(None)` for NIL,
/// `None` if the line is not such an answer.
fn list_delimiter(line: &[u8]) -> Option<Option<char>> {
    response::list_entry(line).map(|entry| entry.delimiter)
}

/// A refused login: for the provider's connection limit (the pool then waits and retries)
/// or for anything else.
fn login_refused(endpoint: &str, login: &str, reply: &[u8]) -> UpstreamError {
    if response::names_connection_limit(reply) {
        UpstreamError::ConnectionLimit {
            endpoint: endpoint.to_owned(),
            reply: printable(reply),
        }
    } else {
        UpstreamError::LoginRejected {
            endpoint: endpoint.to_owned(),
            login: login.to_owned(),
            reply: printable(reply),
        }
    }
}

fn printable(line: &[u8]) -> String {
    crate::text::printable(line, 300)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(steps: Vec<Zeroizing<Vec<u8>>>) -> Vec<String> {
        steps
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }

    #[test]
    fn login_quotes_or_uses_literals() {
        assert_eq!(
            text(login_command("studio@pec.it", "a\"b\\c")),
            ["s1 LOGIN \"studio@pec.it\" \"a\\\"b\\\\c\"\r\n"]
        );
        assert_eq!(
            text(login_command("studio", "pässword")),
            ["s1 LOGIN \"studio\" {9}\r\n", "pässword\r\n"]
        );
    }

    #[test]
    fn delimiter_probe() {
        assert_eq!(
            list_delimiter(b"* LIST (\\Noselect) \"/\" \"\"\r\n"),
            Some(Some('/'))
        );
        assert_eq!(
            list_delimiter(b"* LIST (\\Noselect) \".\" \"\"\r\n"),
            Some(Some('.'))
        );
        assert_eq!(
            list_delimiter(b"* LIST (\\Noselect) NIL \"\"\r\n"),
            Some(None)
        );
        assert_eq!(list_delimiter(b"s3 OK done\r\n"), None);
    }
}
