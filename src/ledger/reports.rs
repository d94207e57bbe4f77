//! Read side of the receipts: per-message reports (`pecgate receipts show|pending`), the
//! receipts of a message or a period (`unmatched`, `export`, the audit timeline). The CLI
//! opens the ledger read-only ([`Reports`]), beside a running pecgate; the receipts worker
//! gets the same report of the message a receipt was about.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, params};

use super::LedgerError;
use super::receipts::{StoredReceipt, overdue_ids, receipts_of, receipts_where};
use crate::audit::format_timestamp;
use crate::receipts::classify::Kind;
use crate::receipts::daticert::{Recipient, normalise_message_id};
use crate::receipts::reconcile::{MessageState, RecipientState};

/// A receipt as listed in a report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReceiptLink {
    pub kind: String,
    pub sha256: String,
}

/// One recipient of a message, as `pecgate receipts show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecipientReport {
    pub address: String,
    /// `pending`, `accepted`, `delivered`, `failed` or `external`.
    pub state: String,
    /// When it was delivered or failed (certified time), else when it was accepted.
    pub at: Option<String>,
    /// The provider's code and text, for a failure.
    pub error: Option<String>,
    /// Who delivered it (the recipient's provider).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub receipts: Vec<ReceiptLink>,
}

/// One message and its recipients.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MessageReport {
    /// As relayed (`<...>`), or as the receipts name it for an unmatched one.
    pub message_id: String,
    /// The employee who sent it; `None` for a message pecgate did not send.
    pub user: Option<String>,
    pub mailbox: String,
    pub identificativo: Option<String>,
    pub subject: Option<String>,
    pub submitted_at: Option<String>,
    /// The provider's SMTP answer (`accepted`, `rejected`, ...); `None` when unmatched.
    pub status: Option<String>,
    pub recipients: Vec<RecipientReport>,
    /// Receipts about the whole message that name no recipient it had (kept, shown).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_receipts: Vec<ReceiptLink>,
}

/// The report of one sent row.
pub(super) fn report_of_sent(conn: &Connection, id: i64) -> rusqlite::Result<MessageReport> {
    let (message_id, user, mailbox, identificativo, subject, submitted_at, status, json): (
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        String,
        String,
        String,
    ) = conn.query_row(
        "SELECT message_id, user, mailbox, identificativo, subject, submitted_at, status, \
         recipients FROM sent WHERE id = ?1",
        [id],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        },
    )?;
    let receipts = receipts_of(conn, id)?;
    let mut stored: BTreeMap<String, RecipientReport> = {
        let mut stmt = conn.prepare(
            "SELECT address, state, at, provider, error FROM recipient WHERE sent_id = ?1",
        )?;
        let rows = stmt.query_map([id], |r| {
            let address: String = r.get(0)?;
            let report = RecipientReport {
                address: address.clone(),
                state: r.get(1)?,
                at: r.get(2)?,
                provider: r.get(3)?,
                error: r.get(4)?,
                receipts: Vec::new(),
            };
            Ok((address, report))
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    // Envelope recipients first, in the order they were given; then any a receipt added.
    let mut addresses: Vec<String> = serde_json::from_str::<Vec<String>>(&json)
        .unwrap_or_default()
        .into_iter()
        .map(|a| a.trim().to_ascii_lowercase())
        .collect();
    addresses.dedup();
    for address in stored.keys() {
        if !addresses.contains(address) {
            addresses.push(address.clone());
        }
    }
    let recipients = addresses
        .into_iter()
        .map(|address| {
            let mut report = stored.remove(&address).unwrap_or_else(|| {
                RecipientReport::from_state(&address, &RecipientState::Pending, Vec::new())
            });
            report.receipts = receipt_links(&receipts, &address);
            // An accepted recipient shows when it was accepted.
            if report.at.is_none() {
                report.at = receipts
                    .iter()
                    .filter(|r| r.kind == Kind::Acceptance && r.concerns(&address))
                    .find_map(|r| r.daticert.at.clone());
            }
            report
        })
        .collect::<Vec<_>>();
    let other_receipts = receipts
        .iter()
        .filter(|r| !recipients.iter().any(|p| r.concerns(&p.address)))
        .map(link)
        .collect();
    Ok(MessageReport {
        message_id,
        user: Some(user),
        mailbox,
        identificativo,
        subject,
        submitted_at: Some(submitted_at),
        status: Some(status),
        recipients,
        other_receipts,
    })
}

fn link(r: &StoredReceipt) -> ReceiptLink {
    ReceiptLink {
        kind: r.kind.as_str().to_owned(),
        sha256: r.sha256.clone(),
    }
}

fn receipt_links(receipts: &[StoredReceipt], address: &str) -> Vec<ReceiptLink> {
    receipts
        .iter()
        .filter(|r| r.concerns(address))
        .map(link)
        .collect()
}

/// A message pecgate did not send, reconstructed from its (unmatched) receipts.
fn report_of_unmatched(
    conn: &Connection,
    mailbox: &str,
    message_id: &str,
) -> rusqlite::Result<MessageReport> {
    let receipts = receipts_where(
        conn,
        "sent_id IS NULL AND mailbox = ?1 AND message_id = ?2",
        params![mailbox, message_id],
    )?;
    let mut state = MessageState::default();
    for r in &receipts {
        state.apply(r.kind, &r.daticert);
    }
    let recipients = state
        .recipients
        .iter()
        .map(|(address, s)| {
            RecipientReport::from_state(address, s, receipt_links(&receipts, address))
        })
        .collect();
    Ok(MessageReport {
        message_id: message_id.to_owned(),
        user: None,
        mailbox: mailbox.to_owned(),
        identificativo: state.identificativo.clone(),
        subject: None,
        submitted_at: None,
        status: None,
        recipients,
        other_receipts: Vec::new(),
    })
}

impl RecipientReport {
    fn from_state(address: &str, state: &RecipientState, receipts: Vec<ReceiptLink>) -> Self {
        let (at, provider, error) = match state {
            RecipientState::Delivered { at, by } => (at.clone(), by.clone(), None),
            RecipientState::Failed { at, error } => (at.clone(), None, Some(error.clone())),
            _ => (None, None, None),
        };
        RecipientReport {
            address: address.to_owned(),
            state: state.as_str().to_owned(),
            at,
            error,
            provider,
            receipts,
        }
    }
}

/// Which messages a report covers.
#[derive(Debug, Clone, Default)]
pub struct ReportFilter {
    pub mailbox: Option<String>,
}

/// Read-only queries for the CLI (`pecgate receipts ...`), on a ledger file opened
/// read-only. Blocking.
pub struct Reports {
    conn: Connection,
}

impl Reports {
    pub fn open(path: &std::path::Path) -> Result<Reports, LedgerError> {
        let conn = super::open_read_only(path)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version < 2 {
            // A ledger pecgate has not opened since the upgrade: no receipts recorded yet.
            return Err(LedgerError::NotMigrated {
                path: path.to_owned(),
            });
        }
        Ok(Reports { conn })
    }

    /// Every message (sent through pecgate, or only known from its receipts) with this
    /// Message-ID, given with or without brackets.
    pub fn show(
        &self,
        message_id: &str,
        filter: &ReportFilter,
    ) -> Result<Vec<MessageReport>, LedgerError> {
        let Some(id) = normalise_message_id(message_id) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let sent: Vec<i64> = {
            let mut stmt = self.conn.prepare(
                "SELECT id FROM sent WHERE message_id IN (?1, '<' || ?1 || '>') \
                 AND (?2 IS NULL OR mailbox = ?2) ORDER BY id",
            )?;
            stmt.query_map(params![id, filter.mailbox], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        for sent_id in sent {
            out.push(report_of_sent(&self.conn, sent_id)?);
        }
        let unmatched: Vec<String> = {
            let mut stmt = self.conn.prepare(
                "SELECT DISTINCT mailbox FROM receipt WHERE sent_id IS NULL AND message_id = ?1 \
                 AND (?2 IS NULL OR mailbox = ?2) ORDER BY mailbox",
            )?;
            stmt.query_map(params![id, filter.mailbox], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        for mailbox in unmatched {
            out.push(report_of_unmatched(&self.conn, &mailbox, &id)?);
        }
        Ok(out)
    }

    /// Messages with a recipient still undelivered `older_than` after sending.
    pub fn pending(
        &self,
        older_than: Duration,
        filter: &ReportFilter,
    ) -> Result<Vec<MessageReport>, LedgerError> {
        let cutoff = format_timestamp(SystemTime::now() - older_than);
        let mut out = Vec::new();
        for id in overdue_ids(&self.conn, &cutoff, filter.mailbox.as_deref(), false)? {
            out.push(report_of_sent(&self.conn, id)?);
        }
        Ok(out)
    }

    /// Receipts for messages pecgate did not send.
    pub fn unmatched(&self, filter: &ReportFilter) -> Result<Vec<ExportedReceipt>, LedgerError> {
        self.receipts(true, "", None, filter)
    }

    /// The receipts of one message (Message-ID with or without brackets), matched or not.
    pub fn receipts_of(&self, message_id: &str) -> Result<Vec<ExportedReceipt>, LedgerError> {
        match normalise_message_id(message_id) {
            Some(id) => self.receipts(false, "", Some(&id), &ReportFilter::default()),
            None => Ok(Vec::new()),
        }
    }

    /// Every receipt archived since `since` (RFC 3339 UTC, compared as text).
    pub fn since(
        &self,
        since: &str,
        filter: &ReportFilter,
    ) -> Result<Vec<ExportedReceipt>, LedgerError> {
        self.receipts(false, since, None, filter)
    }

    fn receipts(
        &self,
        only_unmatched: bool,
        since: &str,
        message: Option<&str>,
        filter: &ReportFilter,
    ) -> Result<Vec<ExportedReceipt>, LedgerError> {
        let sql = "SELECT r.sha256, r.kind, r.mailbox, COALESCE(s.message_id, r.message_id), \
             r.consegna, r.destinatari, r.certified_at, r.received_at, s.user FROM receipt r \
             LEFT JOIN sent s ON s.id = r.sent_id WHERE (?1 IS NULL OR r.mailbox = ?1) \
             AND r.received_at >= ?2 AND (?3 = 0 OR r.sent_id IS NULL) \
             AND (?4 IS NULL OR r.message_id = ?4 OR s.message_id IN (?4, '<' || ?4 || '>')) \
             ORDER BY r.id";
        let mut stmt = self.conn.prepare(sql)?;
        let rows = stmt.query_map(
            params![filter.mailbox, since, only_unmatched, message],
            |r| {
                let consegna: Option<String> = r.get(4)?;
                let destinatari: String = r.get(5)?;
                let recipients = match consegna {
                    Some(one) => vec![one],
                    None => serde_json::from_str::<Vec<Recipient>>(&destinatari)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|r| r.address)
                        .collect(),
                };
                Ok(ExportedReceipt {
                    sha256: r.get(0)?,
                    kind: r.get(1)?,
                    mailbox: r.get(2)?,
                    message_id: r.get(3)?,
                    recipients,
                    certified_at: r.get(6)?,
                    archived_at: r.get(7)?,
                    user: r.get(8)?,
                })
            },
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// One receipt in an export manifest (and in `receipts unmatched`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExportedReceipt {
    pub sha256: String,
    pub kind: String,
    pub mailbox: String,
    /// The message it is about.
    pub message_id: Option<String>,
    /// The recipients it certifies something about.
    pub recipients: Vec<String>,
    /// The certified time (daticert).
    pub certified_at: Option<String>,
    pub archived_at: String,
    /// Who sent the message through pecgate (`None`: unmatched).
    pub user: Option<String>,
}
