//! The byte streams sessions run over, and buffered reading and copying on them, shared by
//! IMAP, SMTP and the provider transport.
//!
//! A client connection starts as plain TCP (STARTTLS port) or TLS and may be upgraded, so the
//! session code works on a boxed [`AsyncStream`]. Every read goes through a caller's buffer
//! with a bound: nothing here grows with what a peer sends.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Anything a session can run over: TCP, TLS over TCP, or (in tests) an in-memory pipe.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// A boxed stream.
pub type BoxStream = Box<dyn AsyncStream>;

/// Read size: large enough for bulk transfers, small enough to keep idle sessions cheap
/// (the buffer only grows to this while data is flowing).
pub const READ_CHUNK: usize = 64 * 1024;

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("connection closed")]
    Closed,
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Read more bytes into `buf`. Returns false at end of stream. Cancel safe.
pub async fn fill<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<bool> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(READ_CHUNK);
    }
    Ok(reader.read_buf(buf).await? > 0)
}

/// Take the next complete line (with its line ending) from `buf`, reading as needed.
pub async fn next_line<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<BytesMut, LineError> {
    let mut scanned = 0;
    loop {
        if let Some(end) = find_line_end(buf, scanned) {
            if end > max {
                return Err(LineError::TooLong(max));
            }
            return Ok(buf.split_to(end));
        }
        scanned = buf.len();
        if buf.len() > max {
            return Err(LineError::TooLong(max));
        }
        if !fill(reader, buf).await? {
            return Err(LineError::Closed);
        }
    }
}

/// Index just past the first LF at or after `from`, if any.
pub fn find_line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .iter()
        .position(|&b| b == b'\n')
        .map(|pos| from + pos + 1)
}

/// Why [`copy_exact`] stopped.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source failed.
    Source(std::io::Error),
    /// The source ended before `length` bytes.
    Closed,
    /// Writing the sink failed.
    Sink,
}

/// Move exactly `length` bytes from `buffer` + `source` to `sink`, never holding more than
/// one read chunk: this is what keeps memory flat in message size.
pub async fn copy_exact<R, W>(
    source: &mut R,
    buffer: &mut BytesMut,
    sink: &mut W,
    length: u64,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    copy_exact_observed(source, buffer, sink, length, |_| {}).await
}

/// [`copy_exact`], showing every chunk to `observe` as it passes (the audit's look at the
/// headers of a message streaming by).
pub async fn copy_exact_observed<R, W>(
    source: &mut R,
    buffer: &mut BytesMut,
    sink: &mut W,
    mut length: u64,
    mut observe: impl FnMut(&[u8]),
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    while length > 0 {
        if buffer.is_empty() {
            buffer.reserve(READ_CHUNK);
            if !fill(source, buffer).await.map_err(CopyError::Source)? {
                return Err(CopyError::Closed);
            }
        }
        let n = (buffer.len() as u64).min(length) as usize;
        observe(&buffer[..n]);
        sink.write_all(&buffer[..n])
            .await
            .map_err(|_| CopyError::Sink)?;
        buffer.advance(n);
        length -= n as u64;
    }
    Ok(())
}

/// Since when a reader has been waiting for its peer, shared between a [`Watched`] reader and
/// whoever watches for a stalled peer. Only time spent *waiting on the peer* counts: a reader
/// nobody polls (because its consumer is blocked writing elsewhere) is not waiting.
#[derive(Debug)]
pub struct ReadWait {
    origin: std::time::Instant,
    /// 0 when not waiting; otherwise 1 + milliseconds since `origin` when the wait began.
    since: std::sync::atomic::AtomicU64,
}

impl ReadWait {
    pub fn new() -> std::sync::Arc<ReadWait> {
        std::sync::Arc::new(ReadWait {
            origin: std::time::Instant::now(),
            since: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn pending(&self) {
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        // Keep the start of a wait that is already running.
        let _ = self.since.compare_exchange(
            0,
            now,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn ready(&self) {
        self.since.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes went to the peer: a wait in progress counts from now (the peer owes an answer
    /// to what was just sent, not to what came before it).
    fn restart(&self) {
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        let _ = self.since.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |since| (since != 0).then_some(now),
        );
    }

    /// How long the reader has been waiting for bytes (zero when it is not waiting).
    pub fn waiting_for(&self) -> std::time::Duration {
        match self.since.load(std::sync::atomic::Ordering::Relaxed) {
            0 => std::time::Duration::ZERO,
            since => self
                .origin
                .elapsed()
                .saturating_sub(std::time::Duration::from_millis(since - 1)),
        }
    }
}

/// A stream half tied to a [`ReadWait`]: as a reader it records when it waits for its peer;
/// as a writer, bytes written restart a wait in progress.
pub struct Watched<S> {
    inner: S,
    wait: std::sync::Arc<ReadWait>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, wait: std::sync::Arc<ReadWait>) -> Watched<S> {
        Watched { inner, wait }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Watched<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.wait.restart();
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Watched<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_pending() {
            self.wait.pending();
        } else {
            self.wait.ready();
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_read_wait_counts_only_while_the_peer_is_silent() {
        let (mut near, far) = tokio::io::duplex(64);
        let wait = ReadWait::new();
        let mut reader = Watched::new(far, wait.clone());
        let mut buf = BytesMut::new();
        assert_eq!(wait.waiting_for(), std::time::Duration::ZERO);
        // Polled with nothing to read: waiting from now on.
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            fill(&mut reader, &mut buf),
        )
        .await;
        assert!(pending.is_err());
        assert!(wait.waiting_for() >= std::time::Duration::from_millis(20));
        // Writing to the peer restarts the wait: it owes an answer from now on.
        let mut writer = Watched::new(tokio::io::sink(), wait.clone());
        writer.write_all(b"a NOOP\r\n").await.unwrap();
        assert!(wait.waiting_for() < std::time::Duration::from_millis(20));
        near.write_all(b"x").await.unwrap();
        assert!(fill(&mut reader, &mut buf).await.unwrap());
        assert_eq!(wait.waiting_for(), std::time::Duration::ZERO);
    }
}
