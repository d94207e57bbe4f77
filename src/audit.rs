//! Durable, tamper-evident audit log: who did what, when, on the shared PEC mailbox.
//!
//! Every IMAP/SMTP command an employee sends through pecgate is recorded as one
//! row in an SQLite file (normally `state_dir/audit.sqlite`). Sessions hand
//! events to a cheap [`AuditLog`] handle; a single dedicated thread
//! (`audit-writer`) owns the database connection and writes them in batches
//! ("group commit"), so SQLite never runs on an async runtime thread and a
//! burst of commands costs one fsync rather than one per command.
//!
//! # Storage
//!
//! The database runs with `journal_mode=WAL` (auditors can query while the
//! daemon writes) and `synchronous=FULL` (once a transaction commits, its events
//! are on disk). The schema version is kept in `PRAGMA user_version` (currently
//! [`SCHEMA_VERSION`] = 1) and the schema is created or migrated on open.
//!
//! ```sql
//! CREATE TABLE events (
//!     id        INTEGER PRIMARY KEY,
//!     ts        TEXT NOT NULL,
//!     session   TEXT NOT NULL,
//!     user      TEXT,
//!     mailbox   TEXT,
//!     peer      TEXT NOT NULL,
//!     protocol  TEXT NOT NULL,
//!     command   TEXT NOT NULL,
//!     folder    TEXT,
//!     detail    TEXT NOT NULL,
//!     outcome   TEXT NOT NULL,
//!     prev_hash TEXT NOT NULL,
//!     hash      TEXT NOT NULL
//! );
//! CREATE INDEX events_ts      ON events (ts);
//! CREATE INDEX events_user    ON events (user, ts);
//! CREATE INDEX events_session ON events (session, id);
//! CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
//! ```
//!
//! | column      | meaning |
//! |-------------|---------|
//! | `id`        | 1, 2, 3...: assigned by pecgate in commit order, never reused |
//! | `ts`        | when it happened, UTC RFC 3339 with microseconds (`2026-11-22T21:05:03.123456Z`) |
//! | `session`   | id of the client connection; ties together the commands of one session |
//! | `user`      | personal login of the employee; NULL before authentication |
//! | `mailbox`   | shared PEC mailbox the session acts on; NULL if none yet |
//! | `peer`      | client address (`ip:port`) |
//! | `protocol`  | `imap`, `smtp`, or `system` (pecgate's own events) |
//! | `command`   | `LOGIN`, `SELECT`, `UID FETCH`..., or a pseudo-command such as `session-start`, `logout`, `disconnect`, `upstream-error` |
//! | `folder`    | folder the command applies to (selected or named); NULL if none |
//! | `detail`    | arguments: UID sets, fetch items, recipients...; never passwords or message bodies |
//! | `outcome`   | `ok`, `no`, `bad` (upstream's answer), `denied` (refused by pecgate), `error` (upstream or internal failure) |
//! | `prev_hash` | `hash` of the previous row; 64 zeros for the first |
//! | `hash`      | link of the hash chain, see below |
//!
//! `meta` holds, updated in the same transaction as every batch of events:
//! `head_id` (id of the last event written, `0` if none), `head_hash` (its
//! hash, or the genesis hash), `event_count` (number of events written) and
//! `created_at` (when the file was created).
//!
//! Timestamps all have the same width, so comparing them as strings orders
//! them in time.
//!
//! # Tamper evidence
//!
//! Rows form a hash chain:
//!
//! ```text
//! hash = lowercase_hex(SHA-256(prev_hash || "\n" || enc(id) || enc(ts) || enc(session)
//!                              || enc(user) || enc(mailbox) || enc(peer) || enc(protocol)
//!                              || enc(command) || enc(folder) || enc(detail) || enc(outcome)))
//! enc(id)    = 8-byte big-endian two's-complement integer
//! enc(NULL)  = one byte 0x00
//! enc(text)  = one byte 0x01, then 8-byte big-endian byte length, then the UTF-8 bytes
//! ```
//!
//! `prev_hash` is the 64 ASCII hex characters of the previous row's hash; the
//! first row uses [`GENESIS_HASH`] (64 zeros). The length prefixes make the
//! encoding unambiguous, and NULL is distinct from the empty string.
//!
//! [`verify`] walks the whole table and reports the first row where a column
//! was edited or ids were swapped (the stored hash no longer matches), where a
//! row before it was deleted, inserted or moved (`prev_hash` no longer matches),
//! or where the chain does not end at the head recorded in `meta`.
//!
//! Limits, which auditors must know:
//! - A hash chain alone cannot reveal that its newest rows were deleted. The
//!   head copy in `meta` catches that, but only as long as `meta` itself was
//!   not rewritten.
//! - Anyone with write access to the file can recompute the entire chain and
//!   `meta`. The chain proves integrity only relative to a head kept
//!   somewhere else: an auditor should copy the head printed by
//!   `pecgate audit verify` (row id and hash) to a separate place, and later
//!   check it with [`verify_with_anchor`]. Rows up to that anchor cannot be
//!   changed without detection.
//! - When pecgate opens a file whose table does not end at the recorded head
//!   (rows were removed), it logs an error and continues the chain from the
//!   recorded head. It does not repair the chain, so `verify` keeps
//!   reporting the gap.
//! - Copy a live log with SQLite's backup (`sqlite3 audit.sqlite ".backup copy.sqlite"`)
//!   or together with its `-wal` file; copying only the main file can miss
//!   the latest commits.
//!
//! # Writer, durability and failure
//!
//! [`AuditLog::record`] queues an event on a bounded channel (capacity
//! 16384). When the channel is full it waits, so a slow disk slows the
//! sessions down and events are never dropped. The writer thread waits for
//! the first event, takes everything else already queued (up to 1000), writes
//! all of it in one transaction, and repeats. [`AuditLog::record_durable`]
//! additionally waits until the event's transaction has committed.
//!
//! If a write or commit fails (disk full, I/O error, read-only file), or the
//! database file is removed or replaced under the daemon, the writer logs one
//! `tracing::error!` and marks the log failed. From then on every `record`
//! returns [`AuditError::Unavailable`], so sessions refuse commands rather than
//! work unrecorded. Events of the failed batch, and any already queued, are
//! kept in memory (up to 100000) and are never counted as written. So is every
//! event refused while the log is failed. An event whose caller was told it
//! failed (so the command or login was not carried out) is kept with outcome
//! `error` and `; refused: audit log unavailable` added to its detail, so the
//! trail says what really happened.
//!
//! While failed, the writer retries the kept events every few seconds (a full
//! disk that an operator clears); once they are written the log is healthy
//! again and sessions carry on, with no restart. A database file removed or
//! replaced under the daemon is never written again: that needs a restart.
//! [`AuditWriter::shutdown`] tries once more to write what is still kept and
//! returns [`AuditError::EventsLost`] if that also fails.
//!
//! # Reading
//!
//! [`query`] and [`verify`] open the file read-only and work while the daemon
//! is writing. [`format_event_line`] renders one event for `pecgate audit show`.
//!
//! `open`, `shutdown`, `query` and `verify` block on disk I/O. From async code,
//! call them through `tokio::task::spawn_blocking`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::{Value, ValueRef};
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params, params_from_iter,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

/// Schema version stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// `prev_hash` of the first row.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Events that may wait in the queue before `record` starts waiting.
const CHANNEL_CAPACITY: usize = 16_384;
/// Upper bound of one group commit; keeps a single transaction (and the
/// latency of the acknowledgements in it) small.
const MAX_BATCH: usize = 1_000;

/// How long the writer waits for more events before committing a small batch.
const GROUP_COMMIT_LINGER: std::time::Duration = std::time::Duration::from_millis(2);
/// How often the linger looks for a durable event that must not wait.
const LINGER_STEP: std::time::Duration = std::time::Duration::from_micros(200);
/// After a failure, events are kept for one last attempt at shutdown; beyond
/// this many they are only counted, so a dead disk cannot also exhaust memory.
const MAX_RETAINED: usize = 100_000;
/// Added to the detail of an event whose caller was told the log could not take it (so the
/// command or login was not carried out); such an event is written later with outcome `error`.
const REFUSED_NOTE: &str = "; refused: audit log unavailable";
/// While failed, how often the writer retries the kept events.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(2);
/// Readers (`pecgate audit show`) and the writer may briefly contend for locks.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA_V1: &str = "
CREATE TABLE events (
    id        INTEGER PRIMARY KEY,
    ts        TEXT NOT NULL,
    session   TEXT NOT NULL,
    user      TEXT,
    mailbox   TEXT,
    peer      TEXT NOT NULL,
    protocol  TEXT NOT NULL,
    command   TEXT NOT NULL,
    folder    TEXT,
    detail    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_user ON events (user, ts);
CREATE INDEX events_session ON events (session, id);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

const EVENT_COLUMNS: &str = "id, ts, session, user, mailbox, peer, protocol, command, folder, \
                             detail, outcome, prev_hash, hash";

/// Names of the hashed columns after `id`, in hashing order (and column order).
const HASHED_COLUMNS: [&str; 10] = [
    "ts", "session", "user", "mailbox", "peer", "protocol", "command", "folder", "detail",
    "outcome",
];

const META_HEAD_ID: &str = "head_id";
const META_HEAD_HASH: &str = "head_hash";
const META_EVENT_COUNT: &str = "event_count";
const META_CREATED_AT: &str = "created_at";

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store has failed or the writer has stopped: the caller must not
    /// carry out the command it wanted to record.
    #[error("audit log unavailable (store failed or writer stopped); refusing to work unrecorded")]
    Unavailable,
    #[error("cannot open audit log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("audit log database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{} is not a pecgate audit log", path.display())]
    NotAnAuditLog { path: PathBuf },
    #[error(
        "audit log {} has schema version {found}; this pecgate supports up to {supported}",
        path.display()
    )]
    UnsupportedSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("SQLite refused WAL journal mode for {} (got {mode:?})", path.display())]
    NotWal { path: PathBuf, mode: String },
    /// `meta` lacks a valid chain head, so the chain cannot be continued
    /// without inventing one. Only happens if the file was edited.
    #[error("audit log meta entry {key:?} is missing or malformed (file edited?); run verify")]
    CorruptMeta { key: &'static str },
    #[error("audit log file {} was removed or replaced while in use", path.display())]
    FileReplaced { path: PathBuf },
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the audit writer thread panicked")]
    WriterPanicked,
    #[error("{lost} audit event(s) could not be written ({written} written)")]
    EventsLost { written: u64, lost: u64 },
    #[error("invalid time {value:?}: {reason}")]
    InvalidTime { value: String, reason: &'static str },
    #[error("unknown {kind} {value:?}")]
    UnknownValue { kind: &'static str, value: String },
}

/// Result of a command, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Upstream answered OK (or the SMTP equivalent).
    Ok,
    /// Upstream answered NO.
    No,
    /// Upstream answered BAD / syntax error.
    Bad,
    /// Refused by pecgate itself (folder policy, authentication...).
    Denied,
    /// Internal or upstream failure.
    Error,
    /// A state-changing command was sent to the provider; a later event with the same
    /// `upstream=` tag carries its outcome. Written durably before the command leaves, so a
    /// crash never hides a change that reached the provider.
    Sent,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::No => "no",
            Outcome::Bad => "bad",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
            Outcome::Sent => "sent",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = AuditError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Outcome::Ok,
            Outcome::No,
            Outcome::Bad,
            Outcome::Denied,
            Outcome::Error,
            Outcome::Sent,
        ]
        .into_iter()
        .find(|o| o.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| AuditError::UnknownValue {
            kind: "outcome",
            value: s.to_owned(),
        })
    }
}

/// Which side of the gateway produced the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Smtp,
    /// Events of pecgate itself (startup, shutdown, upstream trouble).
    System,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Smtp => "smtp",
            Protocol::System => "system",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = AuditError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Protocol::Imap, Protocol::Smtp, Protocol::System]
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| AuditError::UnknownValue {
                kind: "protocol",
                value: s.to_owned(),
            })
    }
}

/// One event to record. `detail` must never contain passwords or message
/// bodies; this module stores whatever it is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub ts: SystemTime,
    pub session: String,
    pub user: Option<String>,
    pub mailbox: Option<String>,
    pub peer: String,
    pub protocol: Protocol,
    pub command: String,
    pub folder: Option<String>,
    pub detail: String,
    pub outcome: Outcome,
}

/// One row of `events`, as stored. Text is returned as found, even if it is not a
/// valid protocol or outcome name, so that tampered rows can still be shown.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredEvent {
    pub id: i64,
    pub ts: String,
    pub session: String,
    pub user: Option<String>,
    pub mailbox: Option<String>,
    pub peer: String,
    pub protocol: String,
    pub command: String,
    pub folder: Option<String>,
    pub detail: String,
    pub outcome: String,
    pub prev_hash: String,
    pub hash: String,
}

/// Counters of the writer thread (since this process opened the log).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Events committed to disk.
    pub events_written: u64,
    /// Transactions committed (one per group commit).
    pub commits: u64,
    /// Largest number of events committed in one transaction.
    pub largest_batch: u64,
    /// Events accepted by `record` that could not be written (so far).
    pub events_failed: u64,
}

#[derive(Debug)]
struct Shared {
    healthy: AtomicBool,
    closing: AtomicBool,
    events_written: AtomicU64,
    commits: AtomicU64,
    largest_batch: AtomicU64,
    events_failed: AtomicU64,
    /// Test hook: lets the shutdown retry run with the page cap lifted, as if
    /// disk space had been freed meanwhile.
    #[cfg(test)]
    lift_page_cap: AtomicBool,
}

impl Shared {
    fn stats(&self) -> WriterStats {
        WriterStats {
            events_written: self.events_written.load(Ordering::Acquire),
            commits: self.commits.load(Ordering::Acquire),
            largest_batch: self.largest_batch.load(Ordering::Acquire),
            events_failed: self.events_failed.load(Ordering::Acquire),
        }
    }
}

struct Pending {
    event: AuditEvent,
    /// Told `true` once the event is committed, `false` if it was not.
    ack: Option<oneshot::Sender<bool>>,
}

// Nearly every message is an `Event`, so its size is not wasted; boxing
// would cost an allocation per recorded command to shrink a one-off marker.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Event(Pending),
    Shutdown,
}

/// Cheap, cloneable handle through which sessions record events.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.is_healthy())
            .finish_non_exhaustive()
    }
}

/// Owner of the writer thread. Call [`AuditWriter::shutdown`] at the end.
/// Dropping it without calling `shutdown` leaves the thread running until
/// every [`AuditLog`] handle is gone.
pub struct AuditWriter {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    handle: JoinHandle<Result<u64, AuditError>>,
}

impl fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditWriter")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (creating or migrating) the log at `path` and starts the
    /// `audit-writer` thread. Blocking.
    pub fn open(path: &Path) -> Result<(AuditLog, AuditWriter), AuditError> {
        Self::open_inner(path, None)
    }

    /// `max_page_count` lets tests make the database "full" on demand.
    fn open_inner(
        path: &Path,
        max_page_count: Option<u32>,
    ) -> Result<(AuditLog, AuditWriter), AuditError> {
        let conn = open_writer_connection(path)?;
        report_tail_mismatch(&conn, path)?;
        if let Some(pages) = max_page_count {
            conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
        }
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            events_written: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            largest_batch: AtomicU64::new(0),
            events_failed: AtomicU64::new(0),
            #[cfg(test)]
            lift_page_cap: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let writer = Writer {
            conn,
            path: path.to_owned(),
            identity: file_identity(path),
            shared: Arc::clone(&shared),
            rx,
            failed: false,
            retained: Vec::new(),
            dropped: 0,
            retry_every: if cfg!(test) {
                Duration::from_millis(20)
            } else {
                RECOVERY_INTERVAL
            },
        };
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run())
            .map_err(AuditError::Spawn)?;
        tracing::info!(path = %path.display(), "audit log opened");
        let log = AuditLog {
            tx: tx.clone(),
            shared: Arc::clone(&shared),
        };
        Ok((log, AuditWriter { tx, shared, handle }))
    }

    /// Queues `event`. `Ok` means queued: it will be written unless the store
    /// fails, in which case the log turns unhealthy and later calls fail.
    /// Waits while the queue is full (backpressure); never drops.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.check_available_or_hold(&event)?;
        self.tx
            .send(Msg::Event(Pending { event, ack: None }))
            .await
            .map_err(|_| AuditError::Unavailable)
    }

    /// Like [`record`](Self::record), but returns only once the event's
    /// transaction has committed; use it when the command must not proceed
    /// before its record is on disk.
    pub async fn record_durable(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.check_available_or_hold(&event)?;
        let (ack_tx, ack_rx) = oneshot::channel();
        let pending = Pending {
            event,
            ack: Some(ack_tx),
        };
        self.tx
            .send(Msg::Event(pending))
            .await
            .map_err(|_| AuditError::Unavailable)?;
        match ack_rx.await {
            Ok(true) => Ok(()),
            _ => Err(AuditError::Unavailable),
        }
    }

    /// Events queued and not yet taken by the writer.
    pub fn queue_depth(&self) -> usize {
        CHANNEL_CAPACITY - self.tx.capacity()
    }

    /// `false` once the store has failed or the writer is stopping.
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
            && !self.shared.closing.load(Ordering::Acquire)
            && !self.tx.is_closed()
    }

    pub fn stats(&self) -> WriterStats {
        self.shared.stats()
    }

    /// `Ok` when the log is healthy. Otherwise the event is refused, and (unless pecgate is
    /// stopping) handed to the writer to be kept and written once the log recovers, marked so
    /// that the row says its caller did not go on: what happened during an outage (a login
    /// attempt, a session cut) is not lost from the trail.
    fn check_available_or_hold(&self, event: &AuditEvent) -> Result<(), AuditError> {
        if self.is_healthy() {
            return Ok(());
        }
        if !self.shared.closing.load(Ordering::Acquire) {
            let mut held = event.clone();
            held.outcome = Outcome::Error;
            held.detail.push_str(REFUSED_NOTE);
            // Never waits: with the queue full (the writer far behind) the refused event is
            // only logged.
            if self
                .tx
                .try_send(Msg::Event(Pending {
                    event: held,
                    ack: None,
                }))
                .is_err()
            {
                tracing::warn!(command = %event.command, "audit queue full: a refused event was not kept");
            }
        }
        Err(AuditError::Unavailable)
    }
}

impl AuditWriter {
    pub fn stats(&self) -> WriterStats {
        self.shared.stats()
    }

    /// Stops accepting events, writes every event already queued, commits
    /// and joins the writer thread. Returns the number of events written
    /// since open. Blocking: from async code use `spawn_blocking`.
    pub fn shutdown(self) -> Result<u64, AuditError> {
        let AuditWriter { tx, shared, handle } = self;
        shared.closing.store(true, Ordering::Release);
        // try_send in a loop rather than blocking_send: the latter panics
        // when called from inside a runtime, and this must work anywhere.
        let mut msg = Msg::Shutdown;
        loop {
            match tx.try_send(msg) {
                Ok(()) | Err(TrySendError::Closed(_)) => break,
                Err(TrySendError::Full(m)) => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        drop(tx);
        let result = handle.join().map_err(|_| AuditError::WriterPanicked)?;
        tracing::info!(stats = ?shared.stats(), "audit log closed");
        result
    }
}

/// Marks the log failed if the writer thread unwinds, so sessions stop
/// instead of queueing into a channel nobody reads.
struct PanicGuard(Arc<Shared>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.healthy.store(false, Ordering::Release);
            tracing::error!("audit writer thread panicked; audit log unavailable");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// Identity of the file at `path`, used to notice that the database was
/// deleted or swapped: SQLite keeps writing happily into an unlinked inode.
fn file_identity(path: &Path) -> Option<FileId> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Some(FileId { dev: 0, ino: 0 })
    }
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    identity: Option<FileId>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Msg>,
    failed: bool,
    /// Accepted events that could not be written.
    retained: Vec<AuditEvent>,
    /// Events beyond `MAX_RETAINED`, only counted.
    dropped: u64,
    /// While failed, how often to retry.
    retry_every: Duration,
}

impl Writer {
    fn run(mut self) -> Result<u64, AuditError> {
        let _guard = PanicGuard(Arc::clone(&self.shared));
        let mut msgs = Vec::with_capacity(MAX_BATCH);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // Waits for at least one message, then takes whatever else is queued:
        // that is the group commit. Returns 0 only once the channel is
        // closed *and* drained, so no queued event is left behind.
        loop {
            if self.failed && !self.wait_for_recovery() {
                break;
            }
            if self.rx.blocking_recv_many(&mut msgs, MAX_BATCH) == 0 {
                break;
            }
            for msg in msgs.drain(..) {
                match msg {
                    Msg::Event(pending) => batch.push(pending),
                    // Refuse new sends but keep draining what is buffered.
                    Msg::Shutdown => self.rx.close(),
                }
            }
            // A short linger turns a trickle of sequential commands into one transaction
            // (one fsync) per few commands instead of one each: the writer's CPU is taken
            // from the sessions on a small machine. Nobody waits for it (`record` returns
            // once queued), except `record_durable` (a state-changing command waits for its
            // row before it goes to the provider): the linger ends as soon as one is queued.
            let durable_waiting = |batch: &[Pending]| batch.iter().any(|p| p.ack.is_some());
            if !durable_waiting(&batch)
                && !batch.is_empty()
                && batch.len() < MAX_BATCH
                && !self.rx.is_closed()
            {
                let deadline = std::time::Instant::now() + GROUP_COMMIT_LINGER;
                'linger: while std::time::Instant::now() < deadline {
                    std::thread::sleep(LINGER_STEP);
                    while batch.len() < MAX_BATCH {
                        match self.rx.try_recv() {
                            Ok(Msg::Event(pending)) => batch.push(pending),
                            Ok(Msg::Shutdown) => self.rx.close(),
                            Err(_) => break,
                        }
                    }
                    if batch.len() >= MAX_BATCH || durable_waiting(&batch) || self.rx.is_closed() {
                        break 'linger;
                    }
                }
            }
            if !batch.is_empty() {
                self.flush(&mut batch);
            }
        }
        self.finish()
    }

    /// While failed: retry the kept events every `retry_every`, holding back (as kept events)
    /// whatever is still queued. `true` once recovered; `false` when shutting down.
    fn wait_for_recovery(&mut self) -> bool {
        loop {
            loop {
                match self.rx.try_recv() {
                    Ok(Msg::Event(pending)) => self.retain(&mut vec![pending]),
                    Ok(Msg::Shutdown) => self.rx.close(),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return false,
                }
            }
            if self.rx.is_closed() || self.shared.closing.load(Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(self.retry_every);
            if self.write_retained() {
                self.failed = false;
                self.shared.healthy.store(true, Ordering::Release);
                tracing::warn!(
                    path = %self.path.display(),
                    "audit log writable again: held-back events written, sessions may go on"
                );
                return true;
            }
        }
    }

    /// Write the events kept after a failure, never into a file that replaced ours.
    fn write_retained(&mut self) -> bool {
        #[cfg(test)]
        if self.shared.lift_page_cap.load(Ordering::Acquire) {
            self.conn
                .query_row("PRAGMA max_page_count = 1000000", [], |_| Ok(()))
                .unwrap();
        }
        if self.check_identity().is_err() {
            return false;
        }
        if self.retained.is_empty() {
            return true;
        }
        let n = self.retained.len() as u64;
        match insert_events(&mut self.conn, self.retained.iter())
            .and_then(|_| self.check_identity())
        {
            Ok(()) => {
                self.retained.clear();
                self.shared.events_written.fetch_add(n, Ordering::AcqRel);
                self.shared.commits.fetch_add(1, Ordering::AcqRel);
                self.shared.events_failed.fetch_sub(n, Ordering::AcqRel);
                true
            }
            Err(error) => {
                tracing::debug!(%error, "the audit log is still not writable");
                false
            }
        }
    }

    fn flush(&mut self, batch: &mut Vec<Pending>) {
        if self.failed {
            self.retain(batch);
            return;
        }
        let n = batch.len() as u64;
        let written = insert_events(&mut self.conn, batch.iter().map(|p| &p.event))
            .and_then(|_| self.check_identity());
        match written {
            Ok(()) => {
                self.shared.events_written.fetch_add(n, Ordering::AcqRel);
                self.shared.commits.fetch_add(1, Ordering::AcqRel);
                self.shared.largest_batch.fetch_max(n, Ordering::AcqRel);
                for pending in batch.drain(..) {
                    if let Some(ack) = pending.ack {
                        let _ = ack.send(true);
                    }
                }
            }
            Err(e) => {
                self.fail(&e, n);
                self.retain(batch);
            }
        }
    }

    fn check_identity(&self) -> Result<(), AuditError> {
        match self.identity {
            Some(id) if file_identity(&self.path) != Some(id) => Err(AuditError::FileReplaced {
                path: self.path.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn fail(&mut self, error: &AuditError, batch_len: u64) {
        self.failed = true;
        if self.shared.healthy.swap(false, Ordering::AcqRel) {
            tracing::error!(
                path = %self.path.display(),
                %error,
                events_in_batch = batch_len,
                "AUDIT LOG WRITE FAILED: audit log unavailable, sessions will refuse commands \
                 until it can be written again (retried every few seconds; free disk space \
                 if it is full)"
            );
        }
    }

    fn retain(&mut self, batch: &mut Vec<Pending>) {
        for pending in batch.drain(..) {
            // Count before acknowledging, so a waiter sees consistent stats.
            self.shared.events_failed.fetch_add(1, Ordering::AcqRel);
            let mut event = pending.event;
            if let Some(ack) = pending.ack {
                // Its caller learns it failed and does not go on: say so in the row.
                let _ = ack.send(false);
                event.outcome = Outcome::Error;
                event.detail.push_str(REFUSED_NOTE);
            }
            if self.retained.len() < MAX_RETAINED {
                self.retained.push(event);
            } else {
                self.dropped += 1;
            }
        }
    }

    fn finish(mut self) -> Result<u64, AuditError> {
        // One last attempt for events kept after a failure (the disk may have
        // been freed meanwhile).
        if !self.retained.is_empty() {
            let n = self.retained.len();
            if self.write_retained() {
                tracing::warn!(
                    events = n,
                    "audit events held back after the failure were written at shutdown"
                );
            } else {
                tracing::error!("retrying the held-back audit events failed");
            }
        }
        let lost = self.retained.len() as u64 + self.dropped;
        let written = self.shared.events_written.load(Ordering::Acquire);
        if let Err((_, error)) = self.conn.close() {
            tracing::warn!(%error, "closing the audit database failed");
        }
        if lost > 0 {
            tracing::error!(lost, written, "audit events were lost");
            return Err(AuditError::EventsLost { written, lost });
        }
        Ok(written)
    }
}

fn open_writer_connection(path: &Path) -> Result<Connection, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(AuditError::NotWal {
            path: path.to_owned(),
            mode,
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), AuditError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    match version {
        0 => {
            // Version 0 with tables means some other database: do not touch it.
            let objects: i64 =
                tx.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
            if objects != 0 {
                return Err(AuditError::NotAnAuditLog {
                    path: path.to_owned(),
                });
            }
            tx.execute_batch(SCHEMA_V1)?;
            write_meta(&tx, META_CREATED_AT, &format_timestamp(SystemTime::now()))?;
            write_head(
                &tx,
                &Head {
                    id: 0,
                    hash: GENESIS_HASH.to_owned(),
                    count: 0,
                },
            )?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        SCHEMA_VERSION => {}
        found => {
            return Err(AuditError::UnsupportedSchema {
                path: path.to_owned(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
    }
    tx.commit()?;
    Ok(())
}

/// The chain head recorded in `meta`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    id: i64,
    hash: String,
    count: u64,
}

fn read_meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    let value: Option<Value> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?;
    Ok(match value {
        Some(Value::Text(s)) => Some(s),
        Some(Value::Integer(i)) => Some(i.to_string()),
        _ => None,
    })
}

fn read_head(conn: &Connection) -> Result<Head, AuditError> {
    let id = read_meta(conn, META_HEAD_ID)?
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|id| *id >= 0)
        .ok_or(AuditError::CorruptMeta { key: META_HEAD_ID })?;
    let hash = read_meta(conn, META_HEAD_HASH)?
        .filter(|h| is_hash(h))
        .ok_or(AuditError::CorruptMeta {
            key: META_HEAD_HASH,
        })?;
    let count = read_meta(conn, META_EVENT_COUNT)?
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or(AuditError::CorruptMeta {
            key: META_EVENT_COUNT,
        })?;
    Ok(Head { id, hash, count })
}

fn write_meta(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

fn write_head(conn: &Connection, head: &Head) -> rusqlite::Result<()> {
    write_meta(conn, META_HEAD_ID, &head.id.to_string())?;
    write_meta(conn, META_HEAD_HASH, &head.hash)?;
    write_meta(conn, META_EVENT_COUNT, &head.count.to_string())
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The last row of `events` as (id, hash); (0, genesis) for an empty table.
fn table_tail(conn: &Connection) -> rusqlite::Result<(i64, Value, u64)> {
    let last: Option<(i64, Value)> = conn
        .query_row(
            "SELECT id, hash FROM events ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let count: i64 = conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    let (id, hash) = last.unwrap_or((0, Value::Text(GENESIS_HASH.to_owned())));
    Ok((id, hash, count as u64))
}

/// Logs loudly if the table does not end where the last commit left it.
/// Writing continues from the recorded head, which keeps the gap visible
/// to `verify` instead of papering over it.
fn report_tail_mismatch(conn: &Connection, path: &Path) -> Result<(), AuditError> {
    let head = read_head(conn)?;
    let (id, hash, count) = table_tail(conn)?;
    if id != head.id || hash != Value::Text(head.hash.clone()) || count != head.count {
        tracing::error!(
            path = %path.display(),
            recorded_head_id = head.id,
            recorded_event_count = head.count,
            table_last_id = id,
            table_event_count = count,
            "audit log does not end at its recorded head: rows were removed or added outside \
             pecgate; run `pecgate audit verify`"
        );
    }
    Ok(())
}

/// Writes `events` in one transaction, continuing the chain from the head in
/// `meta`. Reading the head inside the transaction (rather than caching
/// it) keeps the chain right even if another process wrote in between.
fn insert_events<'a>(
    conn: &mut Connection,
    events: impl IntoIterator<Item = &'a AuditEvent>,
) -> Result<(), AuditError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let head = read_head(&tx)?;
    let max_id: Option<i64> = tx.query_row("SELECT max(id) FROM events", [], |r| r.get(0))?;
    // Never reuse an id, even one whose row was deleted.
    let mut id = head.id.max(max_id.unwrap_or(0));
    let mut prev = head.hash;
    let mut count = head.count;
    {
        let mut stmt = tx.prepare_cached(&format!(
            "INSERT INTO events ({EVENT_COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
        ))?;
        for ev in events {
            id += 1;
            let ts = format_timestamp(ev.ts);
            let fields = [
                Some(ts.as_bytes()),
                Some(ev.session.as_bytes()),
                ev.user.as_deref().map(str::as_bytes),
                ev.mailbox.as_deref().map(str::as_bytes),
                Some(ev.peer.as_bytes()),
                Some(ev.protocol.as_str().as_bytes()),
                Some(ev.command.as_bytes()),
                ev.folder.as_deref().map(str::as_bytes),
                Some(ev.detail.as_bytes()),
                Some(ev.outcome.as_str().as_bytes()),
            ];
            let hash = chain_hash(prev.as_bytes(), id, &fields);
            stmt.execute(params![
                id,
                ts,
                ev.session,
                ev.user,
                ev.mailbox,
                ev.peer,
                ev.protocol.as_str(),
                ev.command,
                ev.folder,
                ev.detail,
                ev.outcome.as_str(),
                prev,
                hash,
            ])?;
            prev = hash;
            count += 1;
        }
    }
    write_head(
        &tx,
        &Head {
            id,
            hash: prev,
            count,
        },
    )?;
    tx.commit()?;
    Ok(())
}

/// The chain link of one row; see the module docs for the encoding.
fn chain_hash(prev_hash: &[u8], id: i64, fields: &[Option<&[u8]>; 10]) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(b"\n");
    h.update(id.to_be_bytes());
    for field in fields {
        match field {
            None => h.update([0u8]),
            Some(bytes) => {
                h.update([1u8]);
                h.update((bytes.len() as u64).to_be_bytes());
                h.update(bytes);
            }
        }
    }
    hex(&h.finalize())
}

use crate::text::hex;

fn open_read_only(path: &Path) -> Result<Connection, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(open_err)?;
    match version {
        SCHEMA_VERSION => Ok(conn),
        0 => Err(AuditError::NotAnAuditLog {
            path: path.to_owned(),
        }),
        found => Err(AuditError::UnsupportedSchema {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        }),
    }
}

// ---------------------------------------------------------------------------
// Verification

/// Result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Rows checked and found intact: all rows if `problem` is `None`.
    pub events: u64,
    /// Id of the last intact row (0 if none).
    pub head_id: i64,
    /// Hash of the last intact row ([`GENESIS_HASH`] if none). When the
    /// report is OK, this is the chain head an auditor should copy elsewhere.
    pub head_hash: String,
    /// The first problem found, if any.
    pub problem: Option<VerifyProblem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problem.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            None => write!(
                f,
                "OK: {} events, chain head id {} hash {}",
                self.events, self.head_id, self.head_hash
            ),
            Some(problem) => write!(
                f,
                "TAMPERED: {problem} ({} events intact up to id {})",
                self.events, self.head_id
            ),
        }
    }
}

/// The first inconsistency [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyProblem {
    /// The row's stored hash does not match its content: a column was
    /// edited, or ids were swapped.
    ContentMismatch { id: i64 },
    /// The row's `prev_hash` is not the previous row's hash: a row before
    /// it was deleted, inserted or moved.
    ChainBroken { id: i64 },
    /// A column holds a value of the wrong type (not written by pecgate).
    MalformedRow { id: i64, column: &'static str },
    /// The row the auditor's anchor names has a different hash.
    AnchorMismatch { id: i64 },
    /// The row the auditor's anchor names is gone.
    AnchorMissing { id: i64 },
    /// The chain is consistent but does not end at the head recorded in
    /// `meta`: the newest rows were deleted (or `meta` was edited).
    HeadMismatch {
        recorded_id: i64,
        recorded_hash: String,
        recorded_count: u64,
        found_id: i64,
        found_count: u64,
    },
    /// `meta` has no valid head.
    MetaCorrupt { key: &'static str },
}

impl VerifyProblem {
    /// Id of the first broken row, where the problem is tied to one.
    pub fn row_id(&self) -> Option<i64> {
        match self {
            VerifyProblem::ContentMismatch { id }
            | VerifyProblem::ChainBroken { id }
            | VerifyProblem::MalformedRow { id, .. }
            | VerifyProblem::AnchorMismatch { id }
            | VerifyProblem::AnchorMissing { id } => Some(*id),
            VerifyProblem::HeadMismatch { .. } | VerifyProblem::MetaCorrupt { .. } => None,
        }
    }
}

impl fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyProblem::ContentMismatch { id } => {
                write!(f, "row {id}: content does not match its hash (row edited)")
            }
            VerifyProblem::ChainBroken { id } => write!(
                f,
                "row {id}: prev_hash does not match the preceding row (rows deleted, inserted \
                 or reordered before it)"
            ),
            VerifyProblem::MalformedRow { id, column } => {
                write!(f, "row {id}: column {column} has a value of the wrong type")
            }
            VerifyProblem::AnchorMismatch { id } => {
                write!(f, "row {id}: hash differs from the anchor copied earlier")
            }
            VerifyProblem::AnchorMissing { id } => {
                write!(f, "row {id}, named by the anchor, no longer exists")
            }
            VerifyProblem::HeadMismatch {
                recorded_id,
                recorded_hash,
                recorded_count,
                found_id,
                found_count,
            } => write!(
                f,
                "chain ends at id {found_id} with {found_count} events, but the last commit \
                 recorded id {recorded_id} hash {recorded_hash} with {recorded_count} events \
                 (newest rows deleted or meta edited)"
            ),
            VerifyProblem::MetaCorrupt { key } => {
                write!(f, "meta entry {key} is missing or malformed")
            }
        }
    }
}

/// Walks the whole chain of the log at `path` (read-only; fine while the
/// daemon runs) and reports the first problem, or OK with the count and head.
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    verify_with_anchor(path, None)
}

/// Like [`verify`], and also checks that row `anchor.0` still has hash
/// `anchor.1` (a head an auditor copied from an earlier verify).
pub fn verify_with_anchor(
    path: &Path,
    anchor: Option<(i64, &str)>,
) -> Result<VerifyReport, AuditError> {
    let mut conn = open_read_only(path)?;
    // One read transaction: events and meta come from the same snapshot even
    // while the writer keeps committing.
    let tx = conn.transaction()?;
    let mut report = VerifyReport {
        events: 0,
        head_id: 0,
        head_hash: GENESIS_HASH.to_owned(),
        problem: None,
    };
    let mut anchor_seen = false;
    {
        let mut stmt = tx.prepare(&format!("SELECT {EVENT_COLUMNS} FROM events ORDER BY id"))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let (id, hash) = match check_row(row, &report.head_hash)? {
                Ok(link) => link,
                Err(problem) => {
                    report.problem = Some(problem);
                    return Ok(report);
                }
            };
            if let Some((anchor_id, anchor_hash)) = anchor
                && anchor_id == id
            {
                anchor_seen = true;
                if !anchor_hash.eq_ignore_ascii_case(&hash) {
                    report.problem = Some(VerifyProblem::AnchorMismatch { id });
                    return Ok(report);
                }
            }
            report.events += 1;
            report.head_id = id;
            report.head_hash = hash;
        }
    }
    if let Some((anchor_id, _)) = anchor
        && !anchor_seen
    {
        report.problem = Some(VerifyProblem::AnchorMissing { id: anchor_id });
        return Ok(report);
    }
    match read_head(&tx) {
        Ok(head) => {
            if head.id != report.head_id
                || head.hash != report.head_hash
                || head.count != report.events
            {
                report.problem = Some(VerifyProblem::HeadMismatch {
                    recorded_id: head.id,
                    recorded_hash: head.hash,
                    recorded_count: head.count,
                    found_id: report.head_id,
                    found_count: report.events,
                });
            }
        }
        Err(AuditError::CorruptMeta { key }) => {
            report.problem = Some(VerifyProblem::MetaCorrupt { key });
        }
        Err(e) => return Err(e),
    }
    Ok(report)
}

/// Checks one row against the expected previous hash; returns its (id, hash).
fn check_row(
    row: &Row<'_>,
    expected_prev: &str,
) -> rusqlite::Result<Result<(i64, String), VerifyProblem>> {
    // `id` is the rowid alias, so SQLite guarantees an integer.
    let id: i64 = row.get(0)?;
    let mut fields: [Option<&[u8]>; 10] = [None; 10];
    for (i, field) in fields.iter_mut().enumerate() {
        *field = match row.get_ref(i + 1)? {
            ValueRef::Null => None,
            ValueRef::Text(t) => Some(t),
            _ => {
                return Ok(Err(VerifyProblem::MalformedRow {
                    id,
                    column: HASHED_COLUMNS[i],
                }));
            }
        };
    }
    let stored_hash = match row.get_ref(12)? {
        ValueRef::Text(t) => t,
        _ => {
            return Ok(Err(VerifyProblem::MalformedRow { id, column: "hash" }));
        }
    };
    // Hash over the *stored* prev_hash: a row whose content is intact but
    // whose predecessor vanished is then reported as a broken link, not as
    // an edit.
    let prev = match row.get_ref(11)? {
        ValueRef::Text(t) => t,
        _ => {
            return Ok(Err(VerifyProblem::MalformedRow {
                id,
                column: "prev_hash",
            }));
        }
    };
    let computed = chain_hash(prev, id, &fields);
    if computed.as_bytes() != stored_hash {
        return Ok(Err(VerifyProblem::ContentMismatch { id }));
    }
    if prev != expected_prev.as_bytes() {
        return Ok(Err(VerifyProblem::ChainBroken { id }));
    }
    Ok(Ok((id, computed)))
}

// ---------------------------------------------------------------------------
// Queries

/// Filter for [`query`]; every field set must match (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryFilter {
    /// Exact personal login.
    pub user: Option<String>,
    /// Exact shared mailbox name.
    pub mailbox: Option<String>,
    /// Exact session id.
    pub session: Option<String>,
    /// Inclusive lower bound on `ts`: `YYYY-MM-DD` (UTC midnight) or RFC 3339
    /// with a zone (`Z` or `±HH:MM`, seconds and fraction optional).
    pub since: Option<String>,
    /// Exclusive upper bound on `ts`, same syntax as `since`.
    pub until: Option<String>,
    /// Command name, compared case-insensitively (`uid fetch` = `UID FETCH`).
    pub command: Option<String>,
    pub outcome: Option<Outcome>,
    /// At most this many events: the *most recent* matching ones (still
    /// returned oldest first), which is what `audit show` wants.
    pub limit: Option<usize>,
}

/// Events matching `filter`, ordered by id. Opens the file read-only.
pub fn query(path: &Path, filter: &QueryFilter) -> Result<Vec<StoredEvent>, AuditError> {
    let mut sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE 1 = 1");
    let mut args: Vec<Value> = Vec::new();
    let text_filters = [
        ("user = ?", &filter.user),
        ("mailbox = ?", &filter.mailbox),
        ("session = ?", &filter.session),
        ("command = ? COLLATE NOCASE", &filter.command),
    ];
    for (clause, value) in text_filters {
        if let Some(value) = value {
            sql.push_str(" AND ");
            sql.push_str(clause);
            args.push(Value::Text(value.clone()));
        }
    }
    if let Some(since) = &filter.since {
        sql.push_str(" AND ts >= ?");
        args.push(Value::Text(normalize_time_bound(since)?));
    }
    if let Some(until) = &filter.until {
        sql.push_str(" AND ts < ?");
        args.push(Value::Text(normalize_time_bound(until)?));
    }
    if let Some(outcome) = filter.outcome {
        sql.push_str(" AND outcome = ?");
        args.push(Value::Text(outcome.as_str().to_owned()));
    }
    let sql = match filter.limit {
        Some(limit) => {
            args.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
            format!("SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?) ORDER BY id")
        }
        None => sql + " ORDER BY id",
    };
    let conn = open_read_only(path)?;
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args.iter()), stored_event)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The rows a message's timeline is built from (`pecgate audit message`), oldest first:
/// `message` and `APPEND` events naming one of `message_ids` (`<…>`), and every event of the
/// `commands` that act on UIDs (resolved against the message's places by the caller).
pub fn message_rows(
    path: &Path,
    message_ids: &[String],
    commands: &[&str],
) -> Result<Vec<StoredEvent>, AuditError> {
    let mut args: Vec<Value> = Vec::new();
    let mut named = Vec::new();
    for id in message_ids {
        named.push("instr(detail, ?) > 0");
        args.push(Value::Text(format!(
            "message={}",
            crate::text::escape(id, false)
        )));
    }
    let named = if named.is_empty() {
        "0".to_owned()
    } else {
        named.join(" OR ")
    };
    let listed = vec!["?"; commands.len()].join(", ");
    args.extend(commands.iter().map(|c| Value::Text((*c).to_owned())));
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE (command IN ('message', 'APPEND') AND ({named})) \
         OR command IN ({listed}) ORDER BY id"
    );
    let conn = open_read_only(path)?;
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args.iter()), stored_event)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn stored_event(row: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    let text = |i: usize| -> rusqlite::Result<String> {
        Ok(lenient_text(row.get_ref(i)?).unwrap_or_default())
    };
    let opt = |i: usize| -> rusqlite::Result<Option<String>> { Ok(lenient_text(row.get_ref(i)?)) };
    Ok(StoredEvent {
        id: row.get(0)?,
        ts: text(1)?,
        session: text(2)?,
        user: opt(3)?,
        mailbox: opt(4)?,
        peer: text(5)?,
        protocol: text(6)?,
        command: text(7)?,
        folder: opt(8)?,
        detail: text(9)?,
        outcome: text(10)?,
        prev_hash: text(11)?,
        hash: text(12)?,
    })
}

/// Shows whatever a (possibly tampered) column holds instead of failing the
/// whole query on a type mismatch.
fn lenient_text(value: ValueRef<'_>) -> Option<String> {
    match value {
        ValueRef::Null => None,
        ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Integer(i) => Some(i.to_string()),
        ValueRef::Real(r) => Some(r.to_string()),
        ValueRef::Blob(b) => Some(format!("<blob of {} bytes>", b.len())),
    }
}

/// One line for `pecgate audit show`:
/// `ts #id user/mailbox peer protocol [session] command "folder" "detail" -> outcome`.
/// Missing values print as `-`. Control and bidi characters are escaped so a
/// crafted argument cannot fake extra lines or reorder the text on screen.
pub fn format_event_line(ev: &StoredEvent) -> String {
    let plain = |s: &Option<String>| match s {
        Some(s) => crate::text::escape(s, false).into_owned(),
        None => "-".to_owned(),
    };
    let folder = match &ev.folder {
        Some(f) => format!("\"{}\"", crate::text::escape(f, true)),
        None => "-".to_owned(),
    };
    format!(
        "{} #{} {}/{} {} {} [{}] {} {} \"{}\" -> {}",
        crate::text::escape(&ev.ts, false),
        ev.id,
        plain(&ev.user),
        plain(&ev.mailbox),
        crate::text::escape(&ev.peer, false),
        crate::text::escape(&ev.protocol, false),
        crate::text::escape(&ev.session, false),
        crate::text::escape(&ev.command, false),
        folder,
        crate::text::escape(&ev.detail, true),
        crate::text::escape(&ev.outcome, false),
    )
}

// ---------------------------------------------------------------------------
// Timestamps (UTC, with the `time` crate)

/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z, so every stamp has
/// the same width and string order is time order.
const MIN_MICROS: i128 = -62_167_219_200 * 1_000_000;
const MAX_MICROS: i128 = 253_402_300_800 * 1_000_000 - 1;

/// The stored form: `2026-11-22T21:05:03.123456Z`.
const STORED: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
);

/// `t` as stored in `ts`: UTC RFC 3339 with microseconds,
/// e.g. `2026-11-22T21:05:03.123456Z`.
pub fn format_timestamp(t: SystemTime) -> String {
    let micros = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i128,
        Err(e) => -(e.duration().as_micros() as i128),
    };
    format_unix_micros(micros)
}

fn format_unix_micros(micros: i128) -> String {
    let micros = micros.clamp(MIN_MICROS, MAX_MICROS);
    time::OffsetDateTime::from_unix_timestamp_nanos(micros * 1000)
        .expect("clamped into the range of four-digit years")
        .format(STORED)
        .expect("a UTC instant of a four-digit year formats")
}

/// Turns a user-supplied bound into the stored `ts` form so that plain
/// string comparison is correct (`+01:00` times are converted to UTC).
/// Accepts `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM[:SS[.fraction]]` (`T`, `t` or a
/// space) followed by `Z` or `±HH:MM`; a fraction finer than a microsecond is rounded up,
/// so `>=` and `<` stay exact against stored stamps.
pub fn normalize_time_bound(input: &str) -> Result<String, AuditError> {
    const SYNTAX: &str =
        "expected YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS[.ffffff]] followed by Z or ±HH:MM";
    let err = |reason| AuditError::InvalidTime {
        value: input.to_owned(),
        reason,
    };
    let text = input.trim();
    let (date_text, rest) = match text.get(10..) {
        Some("") | None => (text, None),
        Some(rest) if rest.starts_with(['T', 't', ' ']) => (&text[..10], Some(&rest[1..])),
        Some(_) => return Err(err(SYNTAX)),
    };
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(date_text, date_format).map_err(|e| {
        err(match e {
            time::error::Parse::TryFromParsed(_) => "no such date",
            _ => SYNTAX,
        })
    })?;
    let Some(rest) = rest else {
        return Ok(format_unix_micros(
            i128::from(date.midnight().assume_utc().unix_timestamp()) * 1_000_000,
        ));
    };
    // The zone: `Z`, or the last six characters `±HH:MM`.
    let (clock_text, offset) = if let Some(clock) = rest.strip_suffix(['Z', 'z']) {
        (clock, time::UtcOffset::UTC)
    } else {
        let split = rest
            .len()
            .checked_sub(6)
            .filter(|&at| rest.is_char_boundary(at) && rest[at..].starts_with(['+', '-']));
        let Some(at) = split else {
            return Err(err("a time of day needs a zone: Z or ±HH:MM"));
        };
        let offset_format =
            time::macros::format_description!("[offset_hour sign:mandatory]:[offset_minute]");
        let offset = time::UtcOffset::parse(&rest[at..], offset_format)
            .map_err(|_| err("no such zone offset"))?;
        (&rest[..at], offset)
    };
    // `HH:MM`, `HH:MM:SS`, `HH:MM:SS.f…` (a comma works as the decimal mark too).
    let (whole, fraction) = match clock_text.split_once(['.', ',']) {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (clock_text, None),
    };
    let clock_format = time::macros::format_description!("[hour]:[minute][optional [:[second]]]");
    let clock = time::Time::parse(whole, clock_format).map_err(|e| {
        err(match e {
            time::error::Parse::TryFromParsed(_) => "no such time of day",
            _ => SYNTAX,
        })
    })?;
    let mut micros: i128 = 0;
    if let Some(fraction) = fraction {
        if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(SYNTAX));
        }
        for k in 0..6 {
            let digit = fraction.as_bytes().get(k).map_or(0, |d| d - b'0');
            micros = micros * 10 + i128::from(digit);
        }
        if fraction.bytes().skip(6).any(|d| d != b'0') {
            micros += 1;
        }
    }
    let at = time::PrimitiveDateTime::new(date, clock).assume_offset(offset);
    Ok(format_unix_micros(
        i128::from(at.unix_timestamp()) * 1_000_000 + micros,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "pecgate-audit-{}-{tag}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn db(&self) -> PathBuf {
            self.0.join("audit.sqlite")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn at(secs: u64, micros: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, micros * 1000)
    }

    fn event(session: &str, user: &str, command: &str, detail: &str) -> AuditEvent {
        AuditEvent {
            ts: SystemTime::now(),
            session: session.to_owned(),
            user: Some(user.to_owned()),
            mailbox: Some("ufficio".to_owned()),
            peer: "192.0.2.7:51234".to_owned(),
            protocol: Protocol::Imap,
            command: command.to_owned(),
            folder: Some("INBOX".to_owned()),
            detail: detail.to_owned(),
            outcome: Outcome::Ok,
        }
    }

    async fn shutdown(writer: AuditWriter) -> Result<u64, AuditError> {
        tokio::task::spawn_blocking(move || writer.shutdown())
            .await
            .unwrap()
    }

    /// Writes `n` events and closes the log.
    async fn write_n(path: &Path, n: usize, tag: &str) {
        let (log, writer) = AuditLog::open(path).unwrap();
        for i in 0..n {
            log.record(event("s1", "mario", "FETCH", &format!("{tag} {i}")))
                .await
                .unwrap();
        }
        drop(log);
        assert_eq!(shutdown(writer).await.unwrap(), n as u64);
    }

    fn tamper(path: &Path, sql: &str) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(sql).unwrap();
    }

    fn all(path: &Path) -> Vec<StoredEvent> {
        query(path, &QueryFilter::default()).unwrap()
    }

    #[test]
    fn timestamps_format_known_instants() {
        assert_eq!(format_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            format_timestamp(at(1_000_000_000, 123_456)),
            "2001-09-09T01:46:40.123456Z"
        );
        assert_eq!(
            format_timestamp(at(951_782_400, 0)),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(
            format_timestamp(at(1_795_381_503, 123_456)),
            "2026-11-22T21:05:03.123456Z"
        );
        assert_eq!(
            format_timestamp(UNIX_EPOCH - Duration::from_micros(1)),
            "1969-12-31T23:59:59.999999Z"
        );
        // Beyond four-digit years: clamped, the width stays.
        assert_eq!(format_unix_micros(i128::MAX), "9999-12-31T23:59:59.999999Z");
        assert_eq!(format_unix_micros(i128::MIN), "0000-01-01T00:00:00.000000Z");
    }

    #[test]
    fn time_bounds_are_normalised_to_utc() {
        let n = |s: &str| normalize_time_bound(s).unwrap();
        assert_eq!(n("2026-11-22"), "2026-11-22T00:00:00.000000Z");
        assert_eq!(n("2026-11-22T21:05Z"), "2026-11-22T21:05:00.000000Z");
        assert_eq!(n("2026-11-22 21:05:03.5z"), "2026-11-22T21:05:03.500000Z");
        assert_eq!(
            n("2026-11-22T00:30:00+01:00"),
            "2026-11-21T23:30:00.000000Z"
        );
        assert_eq!(
            n("2026-11-22T23:30:00-01:30"),
            "2026-11-23T01:00:00.000000Z"
        );
        assert_eq!(
            n("2026-11-22T21:05:03.1234561Z"),
            "2026-11-22T21:05:03.123457Z"
        );
        for bad in [
            "",
            "2026-11-22T21:05",
            "2026-02-29",
            "2026-13-01",
            "2026-11-22T24:00Z",
            "22/11/2026",
            "2026-11-22Tx",
            "2026-11-22T21:05Z junk",
        ] {
            assert!(
                matches!(
                    normalize_time_bound(bad),
                    Err(AuditError::InvalidTime { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn canonical_encoding_is_unambiguous() {
        let prev = GENESIS_HASH.as_bytes();
        let base: [Option<&[u8]>; 10] = [
            Some(b"t"),
            Some(b"s"),
            None,
            None,
            Some(b"p"),
            Some(b"imap"),
            Some(b"X"),
            None,
            Some(b""),
            Some(b"ok"),
        ];
        let mut empty_user = base;
        empty_user[2] = Some(b"");
        assert_ne!(chain_hash(prev, 1, &base), chain_hash(prev, 1, &empty_user));
        let mut shifted = base;
        shifted[0] = Some(b"ts");
        shifted[1] = Some(b"");
        let mut unshifted = base;
        unshifted[0] = Some(b"t");
        unshifted[1] = Some(b"s");
        assert_ne!(
            chain_hash(prev, 1, &shifted),
            chain_hash(prev, 1, &unshifted)
        );
        assert_ne!(chain_hash(prev, 1, &base), chain_hash(prev, 2, &base));
        assert_eq!(chain_hash(prev, 1, &base).len(), 64);
    }

    #[test]
    fn enums_round_trip_through_strings() {
        for o in [
            Outcome::Ok,
            Outcome::No,
            Outcome::Bad,
            Outcome::Denied,
            Outcome::Error,
        ] {
            assert_eq!(o.as_str().parse::<Outcome>().unwrap(), o);
        }
        for p in [Protocol::Imap, Protocol::Smtp, Protocol::System] {
            assert_eq!(p.to_string().to_uppercase().parse::<Protocol>().unwrap(), p);
        }
        assert!("maybe".parse::<Outcome>().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_round_trip_with_all_fields() {
        let dir = TempDir::new("roundtrip");
        let path = dir.db();
        let (log, writer) = AuditLog::open(&path).unwrap();
        assert!(log.is_healthy());
        let full = AuditEvent {
            ts: at(1_795_381_503, 123_456),
            session: "c0ffee".into(),
            user: Some("mario.rossi".into()),
            mailbox: Some("pec-ufficio".into()),
            peer: "[2001:db8::1]:993".into(),
            protocol: Protocol::Imap,
            command: "UID FETCH".into(),
            folder: Some("Posta inviata/Attività".into()),
            detail: "1:5,7 (FLAGS BODY.PEEK[HEADER])\nsecond line".into(),
            outcome: Outcome::Denied,
        };
        let bare = AuditEvent {
            ts: at(1_795_467_904, 0),
            session: "c0ffee".into(),
            user: None,
            mailbox: None,
            peer: "198.51.100.2:25".into(),
            protocol: Protocol::Smtp,
            command: "session-start".into(),
            folder: None,
            detail: String::new(),
            outcome: Outcome::Error,
        };
        log.record_durable(full.clone()).await.unwrap();
        log.record(bare.clone()).await.unwrap();
        drop(log);
        assert_eq!(shutdown(writer).await.unwrap(), 2);

        let rows = all(&path);
        assert_eq!(rows.len(), 2);
        let (a, b) = (&rows[0], &rows[1]);
        assert_eq!((a.id, b.id), (1, 2));
        assert_eq!(a.ts, "2026-11-22T21:05:03.123456Z");
        assert_eq!(a.session, full.session);
        assert_eq!(a.user, full.user);
        assert_eq!(a.mailbox, full.mailbox);
        assert_eq!(a.peer, full.peer);
        assert_eq!(a.protocol, "imap");
        assert_eq!(a.command, "UID FETCH");
        assert_eq!(a.folder, full.folder);
        assert_eq!(a.detail, full.detail);
        assert_eq!(a.outcome, "denied");
        assert_eq!(a.prev_hash, GENESIS_HASH);
        assert_eq!(b.prev_hash, a.hash);
        assert_eq!(
            (b.user.as_deref(), b.mailbox.as_deref(), b.folder.as_deref()),
            (None, None, None)
        );
        assert_eq!(
            (b.protocol.as_str(), b.outcome.as_str(), b.detail.as_str()),
            ("smtp", "error", "")
        );

        let report = verify(&path).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!((report.events, report.head_id), (2, 2));
        assert_eq!(report.head_hash, b.hash);
        assert!(
            verify_with_anchor(&path, Some((1, &a.hash)))
                .unwrap()
                .is_ok()
        );

        // Pragmas that make "written" mean "on disk".
        let conn = Connection::open(&path).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_producers_keep_their_order() {
        const TASKS: usize = 8;
        const PER_TASK: usize = 500;
        let dir = TempDir::new("concurrent");
        let path = dir.db();
        let (log, writer) = AuditLog::open(&path).unwrap();
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..PER_TASK {
                    let ev = event(&format!("task{t}"), "mario", "FETCH", &i.to_string());
                    log.record(ev).await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        drop(log);
        assert_eq!(shutdown(writer).await.unwrap(), (TASKS * PER_TASK) as u64);

        let rows = all(&path);
        assert_eq!(rows.len(), TASKS * PER_TASK);
        let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
        for w in rows.windows(2) {
            assert!(w[0].id < w[1].id);
        }
        for row in &rows {
            seen.entry(row.session.clone())
                .or_default()
                .push(row.detail.parse().unwrap());
        }
        assert_eq!(seen.len(), TASKS);
        for seq in seen.values() {
            assert_eq!(*seq, (0..PER_TASK).collect::<Vec<_>>());
        }
        assert!(verify(&path).unwrap().is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bursts_are_group_committed() {
        const N: u64 = 5_000;
        let dir = TempDir::new("group");
        let path = dir.db();
        let (log, writer) = AuditLog::open(&path).unwrap();
        for i in 0..N {
            log.record(event("s", "mario", "NOOP", &i.to_string()))
                .await
                .unwrap();
        }
        assert_eq!(shutdown(writer).await.unwrap(), N);
        let stats = log.stats();
        assert_eq!(stats.events_written, N);
        assert!(stats.commits >= N.div_ceil(MAX_BATCH as u64));
        assert!(stats.commits < N, "no batching: {stats:?}");
        assert!(stats.largest_batch > 1 && stats.largest_batch <= MAX_BATCH as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_drains_everything_queued() {
        const N: u64 = 10_000;
        let dir = TempDir::new("drain");
        let path = dir.db();
        let (log, writer) = AuditLog::open(&path).unwrap();
        for i in 0..N {
            log.record(event("s", "mario", "NOOP", &i.to_string()))
                .await
                .unwrap();
        }
        // The handle stays alive: shutdown must not wait for it to drop.
        assert_eq!(shutdown(writer).await.unwrap(), N);
        assert!(!log.is_healthy());
        assert!(matches!(
            log.record(event("s", "mario", "NOOP", "late")).await,
            Err(AuditError::Unavailable)
        ));
        assert_eq!(all(&path).len() as u64, N);
        let report = verify(&path).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.events, N);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopening_continues_the_chain() {
        let dir = TempDir::new("reopen");
        let path = dir.db();
        write_n(&path, 100, "first").await;
        let head1 = verify(&path).unwrap();
        write_n(&path, 50, "second").await;
        let rows = all(&path);
        assert_eq!(rows.len(), 150);
        assert!(rows.iter().map(|r| r.id).eq(1..=150));
        assert_eq!(rows[100].prev_hash, rows[99].hash);
        let report = verify(&path).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!((report.events, report.head_id), (150, 150));
        // The head copied after the first run still anchors the longer chain.
        let anchor = (head1.head_id, head1.head_hash.as_str());
        assert!(verify_with_anchor(&path, Some(anchor)).unwrap().is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edited_row_is_detected() {
        let dir = TempDir::new("edit");
        let path = dir.db();
        write_n(&path, 10, "x").await;
        tamper(&path, "UPDATE events SET detail = '1:*' WHERE id = 5");
        let report = verify(&path).unwrap();
        assert_eq!(
            report.problem,
            Some(VerifyProblem::ContentMismatch { id: 5 })
        );
        assert_eq!(report.events, 4);
        // NULL instead of a value is an edit too.
        let dir2 = TempDir::new("edit-null");
        write_n(&dir2.db(), 3, "x").await;
        tamper(&dir2.db(), "UPDATE events SET folder = NULL WHERE id = 2");
        let problem = verify(&dir2.db()).unwrap().problem.unwrap();
        assert_eq!(problem.row_id(), Some(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rewritten_row_breaks_the_next_link() {
        let dir = TempDir::new("rehash");
        let path = dir.db();
        write_n(&path, 10, "x").await;
        // An attacker who recomputes the edited row's hash is caught one row later.
        let row = all(&path).into_iter().find(|r| r.id == 5).unwrap();
        let detail = "innocent";
        let fields: [Option<&[u8]>; 10] = [
            Some(row.ts.as_bytes()),
            Some(row.session.as_bytes()),
            row.user.as_deref().map(str::as_bytes),
            row.mailbox.as_deref().map(str::as_bytes),
            Some(row.peer.as_bytes()),
            Some(row.protocol.as_bytes()),
            Some(row.command.as_bytes()),
            row.folder.as_deref().map(str::as_bytes),
            Some(detail.as_bytes()),
            Some(row.outcome.as_bytes()),
        ];
        let hash = chain_hash(row.prev_hash.as_bytes(), 5, &fields);
        tamper(
            &path,
            &format!("UPDATE events SET detail = '{detail}', hash = '{hash}' WHERE id = 5"),
        );
        let report = verify(&path).unwrap();
        assert_eq!(report.problem, Some(VerifyProblem::ChainBroken { id: 6 }));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleted_middle_row_is_detected() {
        let dir = TempDir::new("delete-mid");
        let path = dir.db();
        write_n(&path, 10, "x").await;
        tamper(&path, "DELETE FROM events WHERE id = 5");
        let report = verify(&path).unwrap();
        assert_eq!(report.problem, Some(VerifyProblem::ChainBroken { id: 6 }));
        assert_eq!((report.events, report.head_id), (4, 4));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reordered_ids_are_detected() {
        let dir = TempDir::new("reorder");
        let path = dir.db();
        write_n(&path, 10, "x").await;
        tamper(
            &path,
            "UPDATE events SET id = 1000 WHERE id = 3;
             UPDATE events SET id = 3 WHERE id = 4;
             UPDATE events SET id = 4 WHERE id = 1000;",
        );
        let report = verify(&path).unwrap();
        assert_eq!(
            report.problem,
            Some(VerifyProblem::ContentMismatch { id: 3 })
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleted_tail_is_detected_through_meta() {
        let dir = TempDir::new("delete-tail");
        let path = dir.db();
        write_n(&path, 10, "x").await;
        let original = verify(&path).unwrap();
        tamper(&path, "DELETE FROM events WHERE id > 7");
        let report = verify(&path).unwrap();
        assert_eq!(
            report.problem,
            Some(VerifyProblem::HeadMismatch {
                recorded_id: 10,
                recorded_hash: original.head_hash.clone(),
                recorded_count: 10,
                found_id: 7,
                found_count: 7,
            })
        );
        assert!(report.problem.as_ref().unwrap().row_id().is_none());

        // The daemon restarting on the truncated file must not hide the gap.
        write_n(&path, 3, "after").await;
        let rows = all(&path);
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7, 11, 12, 13]
        );
        let report = verify(&path).unwrap();
        assert_eq!(report.problem, Some(VerifyProblem::ChainBroken { id: 11 }));

        // Deleting everything is caught as well.
        tamper(&path, "DELETE FROM events");
        let report = verify(&path).unwrap();
        assert!(matches!(
            report.problem,
            Some(VerifyProblem::HeadMismatch { found_count: 0, .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn anchor_mismatch_is_detected() {
        let dir = TempDir::new("anchor");
        let path = dir.db();
        write_n(&path, 5, "x").await;
        let report = verify_with_anchor(&path, Some((3, GENESIS_HASH))).unwrap();
        assert_eq!(
            report.problem,
            Some(VerifyProblem::AnchorMismatch { id: 3 })
        );
        let report = verify_with_anchor(&path, Some((9, GENESIS_HASH))).unwrap();
        assert_eq!(report.problem, Some(VerifyProblem::AnchorMissing { id: 9 }));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_column_type_is_reported_not_fatal() {
        let dir = TempDir::new("types");
        let path = dir.db();
        write_n(&path, 3, "x").await;
        tamper(&path, "UPDATE events SET detail = x'00ff' WHERE id = 2");
        let report = verify(&path).unwrap();
        assert_eq!(
            report.problem,
            Some(VerifyProblem::MalformedRow {
                id: 2,
                column: "detail"
            })
        );
        assert_eq!(all(&path)[1].detail, "<blob of 2 bytes>");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_database_makes_the_log_unavailable() {
        let dir = TempDir::new("full");
        let path = dir.db();
        // Capped at its current size: the next page the writer needs fails
        // with SQLITE_FULL, like a full disk.
        let (log, writer) = AuditLog::open_inner(&path, Some(1)).unwrap();
        let big = "x".repeat(64 * 1024);
        let result = log
            .record_durable(event("s", "mario", "APPEND", &big))
            .await;
        assert!(matches!(result, Err(AuditError::Unavailable)), "{result:?}");
        assert!(!log.is_healthy());
        assert!(matches!(
            log.record(event("s", "mario", "NOOP", "")).await,
            Err(AuditError::Unavailable)
        ));
        assert_eq!(log.stats().events_written, 0);
        // Still full at shutdown: both (the refused NOOP is kept too) reported, never
        // counted as written.
        match shutdown(writer).await {
            Err(AuditError::EventsLost {
                written: 0,
                lost: 2,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        let report = verify(&path).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.events, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_batch_is_written_at_shutdown_if_possible() {
        let dir = TempDir::new("retry");
        let path = dir.db();
        let (log, writer) = AuditLog::open_inner(&path, Some(1)).unwrap();
        let big = "x".repeat(64 * 1024);
        assert!(
            log.record_durable(event("s", "mario", "APPEND", &big))
                .await
                .is_err()
        );
        // Events refused after the failure are held back too, marked.
        let late = log.record(event("s", "mario", "NOOP", "queued")).await;
        assert!(matches!(late, Err(AuditError::Unavailable)));
        // Space comes back (an operator freed the disk) before shutdown.
        log.shared.lift_page_cap.store(true, Ordering::Release);
        assert_eq!(shutdown(writer).await.unwrap(), 2);
        assert_eq!(log.stats().events_failed, 0);
        let rows = all(&path);
        assert_eq!(rows.len(), 2);
        // Its caller was told it failed: the row says the command was refused.
        assert_eq!(
            rows[0].detail,
            format!("{big}; refused: audit log unavailable")
        );
        assert_eq!(rows[0].outcome, "error");
        assert_eq!(rows[1].detail, format!("queued{REFUSED_NOTE}"));
        assert_eq!(rows[1].outcome, "error");
        assert!(verify(&path).unwrap().is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_recovers_by_itself_when_space_returns() {
        let dir = TempDir::new("recover");
        let path = dir.db();
        let (log, writer) = AuditLog::open_inner(&path, Some(1)).unwrap();
        let big = "x".repeat(64 * 1024);
        assert!(
            log.record_durable(event("s", "mario", "STORE", &big))
                .await
                .is_err()
        );
        assert!(!log.is_healthy());
        log.shared.lift_page_cap.store(true, Ordering::Release);
        // The writer retries on its own; wait for the outcome, bounded.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !log.is_healthy() {
            assert!(std::time::Instant::now() < deadline, "never recovered");
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(5));
        }
        log.record_durable(event("s", "mario", "NOOP", "after"))
            .await
            .unwrap();
        assert_eq!(log.stats().events_failed, 0);
        assert_eq!(shutdown(writer).await.unwrap(), 2);
        let rows = all(&path);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].outcome, "error");
        assert_eq!(rows[1].detail, "after");
        assert!(verify(&path).unwrap().is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removed_file_makes_the_log_unavailable() {
        let dir = TempDir::new("removed");
        let path = dir.db();
        let (log, writer) = AuditLog::open(&path).unwrap();
        log.record_durable(event("s", "mario", "LOGIN", ""))
            .await
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let result = log.record_durable(event("s", "mario", "SELECT", "")).await;
        assert!(matches!(result, Err(AuditError::Unavailable)), "{result:?}");
        assert!(!log.is_healthy());
        assert!(matches!(
            log.record(event("s", "mario", "FETCH", "")).await,
            Err(AuditError::Unavailable)
        ));
        match shutdown(writer).await {
            Err(AuditError::EventsLost {
                written: 1,
                lost: 2,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn query_filters_select_the_right_events() {
        let dir = TempDir::new("query");
        let path = dir.db();
        let (log, writer) = AuditLog::open(&path).unwrap();
        let base = 1_795_381_503; // 2026-11-22T21:05:03Z
        let specs = [
            (
                "s1",
                Some("mario"),
                Some("ufficio"),
                "LOGIN",
                Outcome::Ok,
                0,
            ),
            (
                "s1",
                Some("mario"),
                Some("ufficio"),
                "UID FETCH",
                Outcome::Ok,
                60,
            ),
            (
                "s2",
                Some("anna"),
                Some("ufficio"),
                "LOGIN",
                Outcome::Ok,
                120,
            ),
            (
                "s2",
                Some("anna"),
                Some("legale"),
                "SELECT",
                Outcome::Denied,
                180,
            ),
            ("s3", None, None, "LOGIN", Outcome::No, 3600),
            (
                "s1",
                Some("mario"),
                Some("ufficio"),
                "logout",
                Outcome::Ok,
                7200,
            ),
        ];
        for (session, user, mailbox, command, outcome, offset) in specs {
            log.record(AuditEvent {
                ts: at(base + offset, 0),
                session: session.into(),
                user: user.map(Into::into),
                mailbox: mailbox.map(Into::into),
                peer: "192.0.2.1:1".into(),
                protocol: Protocol::Imap,
                command: command.into(),
                folder: None,
                detail: String::new(),
                outcome,
            })
            .await
            .unwrap();
        }
        drop(log);
        shutdown(writer).await.unwrap();

        let ids = |filter: QueryFilter| -> Vec<i64> {
            query(&path, &filter)
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect()
        };
        assert_eq!(ids(QueryFilter::default()), [1, 2, 3, 4, 5, 6]);
        assert_eq!(
            ids(QueryFilter {
                user: Some("mario".into()),
                ..Default::default()
            }),
            [1, 2, 6]
        );
        assert_eq!(
            ids(QueryFilter {
                mailbox: Some("legale".into()),
                ..Default::default()
            }),
            [4]
        );
        assert_eq!(
            ids(QueryFilter {
                session: Some("s2".into()),
                ..Default::default()
            }),
            [3, 4]
        );
        assert_eq!(
            ids(QueryFilter {
                command: Some("uid fetch".into()),
                ..Default::default()
            }),
            [2]
        );
        assert_eq!(
            ids(QueryFilter {
                outcome: Some(Outcome::Denied),
                ..Default::default()
            }),
            [4]
        );
        assert_eq!(
            ids(QueryFilter {
                command: Some("LOGIN".into()),
                outcome: Some(Outcome::Ok),
                ..Default::default()
            }),
            [1, 3]
        );
        assert_eq!(
            ids(QueryFilter {
                since: Some("2026-11-22T21:07:03Z".into()),
                ..Default::default()
            }),
            [3, 4, 5, 6]
        );
        assert_eq!(
            ids(QueryFilter {
                until: Some("2026-11-22T21:07:03Z".into()),
                ..Default::default()
            }),
            [1, 2]
        );
        // 23:05:03+01:00 is 22:05:03Z: the bound is exclusive.
        assert_eq!(
            ids(QueryFilter {
                since: Some("2026-11-22T22:05:03+01:00".into()),
                until: Some("2026-11-22T23:05:03+01:00".into()),
                ..Default::default()
            }),
            [1, 2, 3, 4]
        );
        assert_eq!(
            ids(QueryFilter {
                since: Some("2026-11-23".into()),
                ..Default::default()
            }),
            Vec::<i64>::new()
        );
        assert_eq!(
            ids(QueryFilter {
                limit: Some(2),
                ..Default::default()
            }),
            [5, 6]
        );
        assert_eq!(
            ids(QueryFilter {
                user: Some("mario".into()),
                limit: Some(2),
                ..Default::default()
            }),
            [2, 6]
        );
        assert!(matches!(
            query(
                &path,
                &QueryFilter {
                    since: Some("yesterday".into()),
                    ..Default::default()
                }
            ),
            Err(AuditError::InvalidTime { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_work_while_the_writer_is_open() {
        let dir = TempDir::new("live");
        let path = dir.db();
        let (log, writer) = AuditLog::open(&path).unwrap();
        log.record_durable(event("s", "mario", "LOGIN", ""))
            .await
            .unwrap();
        let p = path.clone();
        let (rows, report) = tokio::task::spawn_blocking(move || (all(&p), verify(&p).unwrap()))
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert!(report.is_ok(), "{report}");
        log.record_durable(event("s", "mario", "LOGOUT", ""))
            .await
            .unwrap();
        drop(log);
        assert_eq!(shutdown(writer).await.unwrap(), 2);
    }

    #[test]
    fn foreign_and_future_databases_are_refused() {
        let dir = TempDir::new("foreign");
        let path = dir.db();
        tamper(&path, "CREATE TABLE other (x)");
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::NotAnAuditLog { .. })
        ));
        assert!(matches!(
            verify(&path),
            Err(AuditError::NotAnAuditLog { .. })
        ));

        let future = dir.0.join("future.sqlite");
        tamper(&future, "PRAGMA user_version = 99");
        assert!(matches!(
            AuditLog::open(&future),
            Err(AuditError::UnsupportedSchema { found: 99, .. })
        ));
        assert!(matches!(
            query(&dir.0.join("missing.sqlite"), &QueryFilter::default()),
            Err(AuditError::Open { .. })
        ));
    }

    #[test]
    fn event_lines_are_readable_and_escaped() {
        let ev = StoredEvent {
            id: 42,
            ts: "2026-11-22T21:05:03.123456Z".into(),
            session: "c0ffee".into(),
            user: Some("mario".into()),
            mailbox: None,
            peer: "192.0.2.7:51234".into(),
            protocol: "imap".into(),
            command: "UID FETCH".into(),
            folder: Some("Posta inviata".into()),
            detail: "1:5 (FLAGS)\r\nA1 LOGOUT \"x\" \u{202E}".into(),
            outcome: "ok".into(),
            prev_hash: GENESIS_HASH.into(),
            hash: GENESIS_HASH.into(),
        };
        assert_eq!(
            format_event_line(&ev),
            "2026-11-22T21:05:03.123456Z #42 mario/- 192.0.2.7:51234 imap [c0ffee] UID FETCH \
             \"Posta inviata\" \"1:5 (FLAGS)\\r\\nA1 LOGOUT \\\"x\\\" \\u{202e}\" -> ok"
        );
        let no_folder = StoredEvent {
            folder: None,
            detail: String::new(),
            ..ev
        };
        assert!(format_event_line(&no_folder).ends_with("UID FETCH - \"\" -> ok"));
    }
}
