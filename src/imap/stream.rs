//! The byte streams sessions run over, and buffered line reading on them.
//!
//! A client connection starts as plain TCP (STARTTLS port) or TLS and may be upgraded, so the
//! session code works on a boxed [`AsyncStream`].

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::framing::find_line_end;

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

/// Complete a small response whose first line is `line`: while a line ends with a literal
/// announcement, read the literal and the line that follows. For responses that must be
/// inspected whole (mailbox names may be literals); `max` bounds the total.
pub async fn read_unit<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    buf: &mut BytesMut,
    line: &[u8],
    max: usize,
) -> Result<Vec<u8>, LineError> {
    let mut unit = line.to_vec();
    let mut line_start = 0;
    while let Some(literal) = super::framing::literal_at_end(&unit[line_start..]) {
        let length = literal.length as usize;
        if unit.len() + length > max {
            return Err(LineError::TooLong(max));
        }
        while buf.len() < length {
            if !fill(reader, buf).await? {
                return Err(LineError::Closed);
            }
        }
        unit.extend_from_slice(&buf.split_to(length));
        line_start = unit.len();
        let rest = next_line(reader, buf, max - unit.len()).await?;
        unit.extend_from_slice(&rest);
    }
    Ok(unit)
}
