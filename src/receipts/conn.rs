//! The receipts worker's conversation with the provider: commands under its own tags
//! (`r1`, `r2`…), each response unit (a line and its literals) read within the provider
//! timeout (plus a second per 256 KiB of literal: a large receipt is not a stall), and the
//! wait for news in IDLE, which may last far longer than any single response.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::scan::{self, Untagged};
use super::worker::WorkerError;
use crate::imap::response::{self, ResponseKind, Status};
use crate::io::{self, LineError};
use crate::upstream::{self, ProviderConnection};

/// Longest line (not counting literals) the worker accepts from the provider.
const LINE_MAX: usize = 64 * 1024;

/// A logged-in provider connection and the worker's tag counter.
pub struct Conn {
    pub inner: ProviderConnection,
    next_tag: u32,
    pub timeout: Duration,
    /// Largest response unit accepted (a whole message and its line).
    unit_max: usize,
}

impl Conn {
    /// A conversation over `inner`: each response must start within `timeout`, and a unit
    /// may hold a literal of at most `unit_max` bytes.
    pub fn new(inner: ProviderConnection, timeout: Duration, unit_max: usize) -> Conn {
        Conn {
            inner,
            next_tag: 0,
            timeout,
            unit_max,
        }
    }

    pub fn has(&self, capability: &str) -> bool {
        self.inner.has(capability)
    }

    pub async fn send(&mut self, text: &str) -> Result<String, WorkerError> {
        self.next_tag += 1;
        let tag = format!("r{}", self.next_tag);
        let line = format!("{tag} {text}\r\n");
        self.inner
            .writer
            .write_all(line.as_bytes())
            .await
            .map_err(LineError::from)?;
        self.inner.writer.flush().await.map_err(LineError::from)?;
        Ok(tag)
    }

    /// The next response unit (a line and its literals), within `provider_timeout`, plus a
    /// second per 256 KiB of literal announced (a 100 MB receipt on a slow link is not a
    /// stall).
    pub async fn unit(&mut self) -> Result<Vec<u8>, WorkerError> {
        self.unit_waiting(self.timeout).await
    }

    /// [`Conn::unit`], waiting up to `line_wait` for the response to start (IDLE waits
    /// longer than the provider timeout for news).
    async fn unit_waiting(&mut self, line_wait: Duration) -> Result<Vec<u8>, WorkerError> {
        let c = &mut self.inner;
        let line = tokio::time::timeout(
            line_wait,
            io::next_line(&mut c.reader, &mut c.buffer, LINE_MAX),
        )
        .await
        .map_err(|_| WorkerError::Timeout(line_wait))??;
        let literal = crate::imap::framing::literal_at_end(&line).map_or(0, |l| l.length);
        let allowance = self.timeout + Duration::from_secs(u64::from(literal) / (256 * 1024));
        tokio::time::timeout(
            allowance,
            upstream::read_unit(&mut c.reader, &mut c.buffer, &line, self.unit_max),
        )
        .await
        .map_err(|_| WorkerError::Timeout(allowance))?
        .map_err(WorkerError::from)
    }

    /// Run `text` and collect its untagged responses; an answer other than OK is an error
    /// naming `command`. Each response must come within the time [`Conn::unit`] allows.
    pub async fn run(
        &mut self,
        command: &'static str,
        text: &str,
    ) -> Result<Vec<Untagged>, WorkerError> {
        let tag = self.send(text).await?;
        let mut untagged = Vec::new();
        loop {
            let unit = self.unit().await?;
            match response::classify(&unit) {
                ResponseKind::Tagged { tag: t, status } if t == tag => {
                    if status == Status::Ok {
                        return Ok(untagged);
                    }
                    return Err(WorkerError::Refused {
                        command,
                        reply: crate::text::printable(&unit, 300),
                    });
                }
                _ => untagged.push(scan::untagged(&unit)),
            }
        }
    }

    /// Wait for new mail in the selected folder (IDLE, ended by `* N EXISTS` or after
    /// `poll`), or, without IDLE, for `poll`.
    pub async fn wait_for_news(&mut self, poll: Duration) -> Result<(), WorkerError> {
        let conn = self;
        if !conn.has("IDLE") {
            tokio::time::sleep(poll).await;
            return Ok(());
        }
        let tag = conn.send("IDLE").await?;
        let deadline = tokio::time::Instant::now() + poll;
        let mut idling = false;
        loop {
            // The `+` must come within the provider timeout; news may take until the deadline.
            let wait = if idling {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            } else {
                conn.timeout
            };
            let unit = match conn.unit_waiting(wait).await {
                Ok(unit) => unit,
                Err(WorkerError::Timeout(_)) if idling => break,
                Err(error) => return Err(error),
            };
            match response::classify(&unit) {
                ResponseKind::Continuation => idling = true,
                ResponseKind::Tagged { tag: t, .. } if t == tag => {
                    // The provider ended IDLE by itself: scan again.
                    return Ok(());
                }
                _ => {
                    if matches!(scan::untagged(&unit), Untagged::Exists(_)) {
                        break;
                    }
                }
            }
        }
        conn.inner
            .writer
            .write_all(b"DONE\r\n")
            .await
            .map_err(LineError::from)?;
        conn.inner.writer.flush().await.map_err(LineError::from)?;
        loop {
            let unit = conn.unit().await?;
            if matches!(response::classify(&unit), ResponseKind::Tagged { tag: t, .. } if t == tag)
            {
                return Ok(());
            }
        }
    }
}
