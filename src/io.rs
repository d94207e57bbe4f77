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
    mut length: u64,
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
        sink.write_all(&buffer[..n])
            .await
            .map_err(|_| CopyError::Sink)?;
        buffer.advance(n);
        length -= n as u64;
    }
    Ok(())
}
