//! The receipts worker: one per mailbox, on its own provider connection (one of the mailbox's
//! `max_connections`, waited for, never taken from a client that holds one). It scans INBOX
//! and the `receipts_watch` folders for messages it has not dealt with, and for each PEC
//! message, in this order:
//! 1. fetches it whole with `BODY.PEEK[]` and classifies it ([`super::classify`]);
//! 2. **archives it** byte for byte ([`super::archive`]), fsynced, before anything else;
//! 3. records a receipt in the sent ledger, which reconciles its message per recipient, and
//!    alerts a failure (warn log line, `system` audit event);
//! 4. files receipts in the mailbox's `receipts_folder`, when one is set (`UID MOVE`);
//! 5. only then advances its per-folder cursor (in the archive index).
//!
//! A crash anywhere repeats the steps after the last cursor: archive and ledger are
//! idempotent (UIDVALIDITY + UID, and the hash), so nothing is stored twice and nothing is
//! skipped. Between scans it waits in IDLE on INBOX (rescanning every `poll_secs`; without
//! IDLE it only polls), and checks for messages still undelivered after `alert_after`. When
//! parked client sessions already have a folder watcher on INBOX, the worker rides it
//! instead: its own connection goes back to the pool until the watcher tells of new mail (or
//! `poll_secs` pass), then it takes one again (behind every client) and scans.
//! Ordinary mail is looked at through two header fields only, and never changed.
//!
//! Every change it makes to the mailbox (CREATE of the receipts folder, the moves) is
//! audited under the `system` protocol, session `receipts-<mailbox>`, like what it archives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::archive::{Archive, ArchiveError, Origin};
use super::classify::{Classified, Kind, classify};
use super::conn::Conn;
use super::scan::{self, Disposition, Untagged};
use crate::audit::{AuditEvent, Outcome, Protocol};
use crate::gateway::{Gateway, Live};
use crate::imap::command::quoted;
use crate::imap::response::{self, ResponseKind};
use crate::imap::view::FolderEvent;
use crate::imap::watcher::{Signal, Subscription};
use crate::io::LineError;
use crate::ledger::LedgerError;
use crate::upstream::pool::PoolError;
use crate::upstream::slots::Class;

/// Longest wait between two attempts after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often, at most, messages still undelivered are looked for.
const OVERDUE_CHECK_EVERY: Duration = Duration::from_secs(60);

/// Why a worker's provider session ended.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connect(#[from] PoolError),
    #[error("provider connection: {0}")]
    Line(#[from] LineError),
    #[error("the provider did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the provider answered {command}: {reply}")]
    Refused {
        command: &'static str,
        reply: String,
    },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("sent ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("audit log unavailable: nothing is archived or moved until it is back")]
    Audit,
    #[error("no provider password in the vault")]
    NoPassword,
    #[error("a store operation panicked")]
    Panicked,
}

/// What a worker was started with: a reload that changes any of it replaces the worker.
/// The provider password is kept only as a digest.
#[derive(PartialEq, Eq)]
struct Started {
    mailbox: crate::config::MailboxConfig,
    receipts: crate::config::ReceiptsConfig,
    password: Option<[u8; 32]>,
    provider_timeout: Duration,
}

impl Started {
    fn of(gateway: &Gateway, name: &str) -> Started {
        use sha2::Digest as _;
        let runtime = &gateway.mailboxes[name];
        Started {
            mailbox: runtime.config.clone(),
            receipts: gateway.config.receipts.clone(),
            password: runtime
                .password
                .as_ref()
                .map(|p| sha2::Sha256::digest(p.expose().as_bytes()).into()),
            provider_timeout: gateway.provider_timeout,
        }
    }
}

/// Start and stop workers as generations come and go: one per mailbox while the receipts
/// worker is enabled and the mailbox has a password; a mailbox whose settings (or password)
/// a reload changed gets a new worker.
pub async fn supervise(live: Live, shutdown: CancellationToken, tracker: TaskTracker) {
    let mut running: HashMap<String, (Started, CancellationToken)> = HashMap::new();
    let mut generations = live.watch();
    loop {
        let gateway = generations.borrow_and_update().clone();
        let wanted: Vec<&str> = if gateway.config.receipts.enabled {
            gateway
                .mailboxes
                .iter()
                .filter(|(_, m)| m.password.is_some())
                .map(|(name, _)| name.as_str())
                .collect()
        } else {
            Vec::new()
        };
        running.retain(|name, (started, stop)| {
            let keep = wanted.contains(&name.as_str()) && *started == Started::of(&gateway, name);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for name in wanted {
            if running.contains_key(name) {
                continue;
            }
            let stop = shutdown.child_token();
            running.insert(name.to_owned(), (Started::of(&gateway, name), stop.clone()));
            let span = tracing::info_span!("receipts", mailbox = %name);
            tracker.spawn(run(gateway.clone(), name.to_owned(), stop).instrument(span));
        }
        tokio::select! {
            changed = generations.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

/// One mailbox's worker, until `stop`.
async fn run(gateway: Arc<Gateway>, mailbox: String, stop: CancellationToken) {
    let archive_dir = gateway.config.gateway.state_dir.join("archive");
    let mut backoff = Duration::from_secs(1);
    let archive = loop {
        let dir = archive_dir.clone();
        match tokio::task::spawn_blocking(move || Archive::open(&dir)).await {
            Ok(Ok(archive)) => break Arc::new(Mutex::new(archive)),
            Ok(Err(error)) => {
                tracing::error!(%error, "receipts archive unavailable; retrying")
            }
            Err(_) => return,
        }
        if wait(&stop, &mut backoff).await {
            return;
        }
    };
    let mut worker = Worker {
        gateway,
        mailbox,
        archive,
        session: format!("receipts-{}", crate::session::new_session_id()),
        last_overdue_check: None,
        warned_cannot_file: false,
    };
    tracing::info!("receipts worker started");
    loop {
        let outcome = tokio::select! {
            outcome = worker.connection(&mut backoff) => outcome,
            () = stop.cancelled() => break,
        };
        match outcome {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "receipts worker: provider session ended")
            }
        }
        if wait(&stop, &mut backoff).await {
            break;
        }
    }
    tracing::info!("receipts worker stopped");
}

/// Wait out `backoff` (doubling it for next time); true if stopped meanwhile.
async fn wait(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let this = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    tokio::select! {
        () = tokio::time::sleep(this) => false,
        () = stop.cancelled() => true,
    }
}

struct Worker {
    gateway: Arc<Gateway>,
    mailbox: String,
    archive: Arc<Mutex<Archive>>,
    /// The audit session of this worker's events.
    session: String,
    last_overdue_check: Option<Instant>,
    warned_cannot_file: bool,
}

impl Worker {
    fn event(
        &self,
        command: &str,
        folder: Option<&str>,
        detail: String,
        outcome: Outcome,
    ) -> AuditEvent {
        AuditEvent {
            ts: SystemTime::now(),
            session: self.session.clone(),
            user: None,
            mailbox: Some(self.mailbox.clone()),
            peer: "pecgate".to_owned(),
            protocol: Protocol::System,
            command: command.to_owned(),
            folder: folder.map(str::to_owned),
            detail,
            outcome,
        }
    }

    /// Record an event durably before going on: what the worker does must be on the trail.
    async fn audit(&self, event: AuditEvent) -> Result<(), WorkerError> {
        self.gateway
            .audit
            .record_durable(event)
            .await
            .map_err(|_| WorkerError::Audit)
    }

    fn settings(&self) -> &crate::config::MailboxConfig {
        &self.gateway.mailboxes[&self.mailbox].config
    }

    /// Provider sessions: connect, then scan and wait until the connection fails.
    async fn connection(&mut self, backoff: &mut Duration) -> Result<(), WorkerError> {
        loop {
            let subscription = self.one_connection(backoff).await?;
            tracing::debug!("receipts worker: waiting on the folder watcher, no connection held");
            self.wait_with_watcher(subscription).await;
        }
    }

    /// Until new mail, `poll_secs` or the watcher's end, with no connection of its own.
    async fn wait_with_watcher(&self, mut subscription: Subscription) {
        let poll = self.gateway.config.receipts.poll_interval;
        let arrival = async {
            loop {
                match subscription.events.recv().await {
                    Ok(signal) => {
                        if let Signal::Event(FolderEvent::Expunged(_) | FolderEvent::Flags { .. })
                        | Signal::Event(FolderEvent::Keywords(_)) = &*signal
                        {
                            continue;
                        }
                        return;
                    }
                    // Behind, invalidated or stopped: look for ourselves.
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(poll, arrival).await;
    }

    /// One provider session: connect, then scan and wait in IDLE until the connection fails,
    /// or until a watcher on INBOX can do the waiting (the connection is then given back).
    async fn one_connection(
        &mut self,
        backoff: &mut Duration,
    ) -> Result<Subscription, WorkerError> {
        let runtime = &self.gateway.mailboxes[&self.mailbox];
        let timeout = self.gateway.provider_timeout;
        let target = runtime.target(timeout).ok_or(WorkerError::NoPassword)?;
        // Background work: it waits for a connection behind every client, as long as it takes.
        let inner = runtime
            .pool
            .connect(&target, "", Class::Background, None)
            .await?;
        // A unit may hold a whole message, up to the mailbox's size limit.
        let unit_max = usize::try_from(runtime.config.max_message_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(64 * 1024);
        let mut conn = Conn::new(inner, timeout, unit_max);
        let filing = self.prepare_receipts_folder(&mut conn).await?;
        let mut folders: Vec<String> = self.settings().receipts_watch.clone();
        // INBOX last: it stays selected for IDLE.
        folders.push("INBOX".to_owned());
        loop {
            for folder in &folders {
                self.scan(&mut conn, folder, filing.as_deref()).await?;
            }
            *backoff = Duration::from_secs(1);
            self.alert_overdue().await?;
            let watchers = &self.gateway.carried.watchers;
            if let Some(subscription) = watchers.existing(&self.mailbox, "INBOX") {
                let mut inner = conn.inner;
                if inner.unselect(self.gateway.provider_timeout).await {
                    crate::upstream::pool::give_back(inner).await;
                } else {
                    inner.logout().await;
                }
                return Ok(subscription);
            }
            conn.wait_for_news(self.gateway.config.receipts.poll_interval)
                .await?;
        }
    }

    /// The wire name of the receipts folder, created if missing; `None` when receipts are
    /// left in place.
    async fn prepare_receipts_folder(
        &mut self,
        conn: &mut Conn,
    ) -> Result<Option<String>, WorkerError> {
        let Some(configured) = self.settings().receipts_folder.clone() else {
            return Ok(None);
        };
        if !conn.has("MOVE") && !conn.has("UIDPLUS") {
            if !self.warned_cannot_file {
                tracing::warn!(mailbox = %self.mailbox, "the provider has neither MOVE nor UIDPLUS: receipts are archived but left in INBOX (moving them safely needs one of the two)");
                self.warned_cannot_file = true;
            }
            return Ok(None);
        }
        let wire = scan::wire_name(&configured, conn.inner.delimiter);
        if !self.folder_exists(conn, &wire).await? {
            let event = self.event(
                "CREATE",
                Some(&configured),
                "receipts folder".to_owned(),
                Outcome::Sent,
            );
            self.audit(event).await?;
            let created = conn
                .run("CREATE", &format!("CREATE {}", quoted(&wire)))
                .await;
            let outcome = match &created {
                Ok(_) => Outcome::Ok,
                Err(WorkerError::Refused { .. }) => Outcome::No,
                Err(_) => Outcome::Error,
            };
            self.audit(self.event(
                "CREATE",
                Some(&configured),
                "receipts folder".to_owned(),
                outcome,
            ))
            .await?;
            match created {
                Ok(_) => {}
                // Filing must never hold up archiving: receipts stay where they are.
                Err(WorkerError::Refused { reply, .. }) => {
                    if !self.warned_cannot_file {
                        tracing::warn!(folder = %configured, %reply, "the provider refused to create the receipts folder: receipts are archived but left in place");
                        self.warned_cannot_file = true;
                    }
                    return Ok(None);
                }
                Err(error) => return Err(error),
            }
            tracing::info!(folder = %configured, "receipts folder created");
        }
        Ok(Some(wire))
    }

    /// Whether `LIST "" name` names the folder.
    async fn folder_exists(&mut self, conn: &mut Conn, wire: &str) -> Result<bool, WorkerError> {
        let tag = conn.send(&format!("LIST \"\" {}", quoted(wire))).await?;
        let mut found = false;
        loop {
            let unit = conn.unit().await?;
            match response::classify(&unit) {
                ResponseKind::Tagged { tag: t, .. } if t == tag => return Ok(found),
                _ => found |= response::list_entry(&unit).is_some(),
            }
        }
    }

    /// Deal with every message of `folder` past the cursor.
    async fn scan(
        &mut self,
        conn: &mut Conn,
        folder: &str,
        filing: Option<&str>,
    ) -> Result<(), WorkerError> {
        let wire = scan::wire_name(folder, conn.inner.delimiter);
        // EXAMINE: read-only, so the worker never takes \Recent from a client.
        let opened = match conn
            .run("EXAMINE", &format!("EXAMINE {}", quoted(&wire)))
            .await
        {
            Err(WorkerError::Refused { reply, .. }) if folder != "INBOX" => {
                tracing::warn!(%folder, %reply, "receipts_watch folder cannot be opened; skipped");
                return Ok(());
            }
            other => other?,
        };
        let Some(uidvalidity) = opened.iter().find_map(|u| match u {
            Untagged::UidValidity(v) => Some(*v),
            _ => None,
        }) else {
            return Err(WorkerError::Refused {
                command: "EXAMINE",
                reply: "no UIDVALIDITY".to_owned(),
            });
        };
        let filing_here = filing.is_some_and(|f| f != wire);
        let (archive, mailbox, name) = (
            self.archive.clone(),
            self.mailbox.clone(),
            folder.to_owned(),
        );
        let after = blocking(move || {
            archive
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .scanned_up_to(&mailbox, &name, uidvalidity, filing_here)
        })
        .await?;
        let first = after.saturating_add(1);
        let headers = conn
            .run(
                "UID FETCH",
                &format!("UID FETCH {first}:* {}", scan::PEC_HEADER_ITEMS),
            )
            .await?;
        // `N:*` also answers the last message when all UIDs are below N.
        let mut seen: Vec<(u32, bool)> = headers
            .into_iter()
            .filter_map(|u| match u {
                Untagged::Fetched(f) if f.uid > after => {
                    Some((f.uid, scan::has_pec_header(&f.body)))
                }
                _ => None,
            })
            .collect();
        seen.sort_unstable();
        let Some(&(last, _)) = seen.last() else {
            return Ok(());
        };
        let mut to_file = Vec::new();
        for &(uid, pec) in &seen {
            if !pec {
                continue;
            }
            if self.take(conn, folder, uidvalidity, uid).await? == Disposition::ArchiveAndFile {
                to_file.push(uid);
            }
        }
        if let (Some(target), false) = (filing.filter(|_| filing_here), to_file.is_empty()) {
            self.file(conn, folder, &wire, target, &to_file).await?;
        }
        let (archive, mailbox, name) = (
            self.archive.clone(),
            self.mailbox.clone(),
            folder.to_owned(),
        );
        blocking(move || {
            archive
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_scanned(&mailbox, &name, uidvalidity, filing_here, last)
        })
        .await?;
        Ok(())
    }

    /// Fetch, classify, archive and reconcile one PEC message.
    async fn take(
        &mut self,
        conn: &mut Conn,
        folder: &str,
        uidvalidity: u32,
        uid: u32,
    ) -> Result<Disposition, WorkerError> {
        let fetched = conn
            .run(
                "UID FETCH",
                &format!("UID FETCH {uid} {}", scan::WHOLE_MESSAGE_ITEMS),
            )
            .await?;
        let Some(raw) = fetched.into_iter().find_map(|u| match u {
            Untagged::Fetched(f) if f.uid == uid => Some(f.body),
            _ => None,
        }) else {
            // Expunged by someone else meanwhile: nothing left to keep.
            return Ok(Disposition::Ignore);
        };
        let raw = Arc::new(raw);
        let what = {
            let raw = raw.clone();
            tokio::task::spawn_blocking(move || classify(&raw))
                .await
                .unwrap_or_else(|_| Classified {
                    kind: Kind::Unknown,
                    note: Some("the classifier failed on this message".to_owned()),
                    original_message_id: None,
                    daticert: None,
                })
        };
        let disposition = Disposition::of(what.kind);
        if disposition == Disposition::Ignore {
            return Ok(disposition);
        }
        let stored = {
            let (archive, mailbox, folder, what) = (
                self.archive.clone(),
                self.mailbox.clone(),
                folder.to_owned(),
                what.clone(),
            );
            blocking(move || {
                let origin = Origin {
                    mailbox: &mailbox,
                    folder: &folder,
                    uidvalidity,
                    uid,
                };
                archive
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .store(&origin, &raw, &what)
            })
            .await?
        };
        let message = what.original_message_id.as_deref().unwrap_or("-");
        // Recorded again when a restart repeats the work (marked): an event is never lost
        // between the archive and the audit.
        let detail = format!(
            "uid={uid} kind={} sha256={} message={}{}{}",
            what.kind.as_str(),
            stored.sha256,
            crate::text::escape(message, false),
            what.note
                .as_deref()
                .map(|n| format!(" note={}", crate::text::escape(n, true)))
                .unwrap_or_default(),
            if stored.new {
                ""
            } else {
                " (already archived)"
            },
        );
        self.audit(self.event("receipt-archived", Some(folder), detail, Outcome::Ok))
            .await?;
        if stored.new && what.kind == Kind::Unknown {
            tracing::warn!(%folder, uid, sha256 = %stored.sha256, note = what.note.as_deref().unwrap_or(""), "a PEC message could not be classified: archived and left in place");
        }
        if what.kind.is_receipt()
            && let Some(ledger) = &self.gateway.smtp.ledger
        {
            let recorded = ledger
                .record_receipt(&self.mailbox, &stored.sha256, &what)
                .await?;
            match &recorded.message {
                Some(sent) => {
                    for (address, error) in &recorded.unalerted_failures {
                        tracing::warn!(message_id = %sent.message_id, user = sent.user.as_deref().unwrap_or(""), recipient = %address, %error, "PEC not delivered");
                        let detail = format!(
                            "message={} sent-by={} recipient={} failed: {}",
                            crate::text::escape(&sent.message_id, false),
                            crate::text::escape(sent.user.as_deref().unwrap_or("-"), false),
                            crate::text::escape(address, false),
                            crate::text::escape(error, true),
                        );
                        self.audit(self.event(
                            "receipt-alert",
                            Some(folder),
                            detail,
                            Outcome::Error,
                        ))
                        .await?;
                        // Marked only once on the trail: a crash before this alerts again.
                        ledger
                            .failure_alerted(&self.mailbox, &sent.message_id, address)
                            .await?;
                    }
                }
                None if recorded.new => {
                    tracing::info!(
                        kind = what.kind.as_str(),
                        message_id = message,
                        "receipt for a message not sent through pecgate: archived as unmatched"
                    );
                }
                None => {}
            }
        }
        Ok(disposition)
    }

    /// Move `uids` from `folder` (wire name `wire`) to the receipts folder, audited.
    async fn file(
        &mut self,
        conn: &mut Conn,
        folder: &str,
        wire: &str,
        target: &str,
        uids: &[u32],
    ) -> Result<(), WorkerError> {
        let set = scan::uid_set(uids);
        let to = self.settings().receipts_folder.clone().unwrap_or_default();
        let detail = format!("uids={set} to={}", crate::text::escape(&to, true));
        self.audit(self.event("receipts-file", Some(folder), detail.clone(), Outcome::Sent))
            .await?;
        // Read-write for the move; EXAMINE again afterwards happens at the next scan.
        let moved = async {
            conn.run("SELECT", &format!("SELECT {}", quoted(wire)))
                .await?;
            if conn.has("MOVE") {
                conn.run("UID MOVE", &format!("UID MOVE {set} {}", quoted(target)))
                    .await?;
            } else {
                conn.run("UID COPY", &format!("UID COPY {set} {}", quoted(target)))
                    .await?;
                conn.run(
                    "UID STORE",
                    &format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"),
                )
                .await?;
                // UIDPLUS: only these messages, never another user's \Deleted ones.
                conn.run("UID EXPUNGE", &format!("UID EXPUNGE {set}"))
                    .await?;
            }
            conn.run("EXAMINE", &format!("EXAMINE {}", quoted(wire)))
                .await?;
            Ok::<_, WorkerError>(())
        }
        .await;
        let outcome = if moved.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Error
        };
        self.audit(self.event("receipts-file", Some(folder), detail, outcome))
            .await?;
        moved?;
        tracing::info!(%folder, count = uids.len(), to = %to, "receipts filed");
        Ok(())
    }

    /// Alert the messages of this mailbox still undelivered after `alert_after` (once each).
    async fn alert_overdue(&mut self) -> Result<(), WorkerError> {
        if self.last_overdue_check.is_some_and(|at| {
            at.elapsed() < OVERDUE_CHECK_EVERY.min(self.gateway.config.receipts.poll_interval)
        }) {
            return Ok(());
        }
        self.last_overdue_check = Some(Instant::now());
        let Some(ledger) = &self.gateway.smtp.ledger else {
            return Ok(());
        };
        let after = self.gateway.config.receipts.alert_after;
        for message in ledger.take_overdue(&self.mailbox, after).await? {
            let waiting: Vec<&str> = message
                .recipients
                .iter()
                .filter(|r| r.state == "pending" || r.state == "accepted")
                .map(|r| r.address.as_str())
                .collect();
            tracing::warn!(message_id = %message.message_id, user = message.user.as_deref().unwrap_or(""), recipients = ?waiting, after = ?after, "PEC still not delivered");
            let detail = format!(
                "message={} sent-by={} undelivered after {}s: {}",
                crate::text::escape(&message.message_id, false),
                crate::text::escape(message.user.as_deref().unwrap_or("-"), false),
                after.as_secs(),
                crate::text::escape(&waiting.join(","), false),
            );
            self.audit(self.event("receipt-alert", None, detail, Outcome::Error))
                .await?;
        }
        Ok(())
    }
}

/// Run blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ArchiveError> + Send + 'static,
) -> Result<T, WorkerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| WorkerError::Panicked)?
        .map_err(WorkerError::from)
}
