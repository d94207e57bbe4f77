//! Receipts in the sent ledger: each archived receipt linked to the message it is about, and
//! the per-recipient state derived from them.
//!
//! ```sql
//! ALTER TABLE sent ADD COLUMN identificativo TEXT;  -- the provider's id, from the receipts
//! ALTER TABLE sent ADD COLUMN alerted_at TEXT;      -- when "not delivered yet" was alerted
//! CREATE TABLE receipt (
//!     id             INTEGER PRIMARY KEY,
//!     mailbox        TEXT NOT NULL,
//!     sha256         TEXT NOT NULL,     -- the archived file (state_dir/archive)
//!     sent_id        INTEGER,           -- the `sent` row it is about; NULL: unmatched
//!     kind           TEXT NOT NULL,     -- accettazione, avvenuta-consegna, ...
//!     message_id     TEXT,              -- original Message-ID, normalised (no brackets)
//!     identificativo TEXT,
//!     consegna       TEXT,              -- the one recipient a delivery/failure is about
//!     certified_at   TEXT,              -- daticert data/ora/zona, RFC 3339
//!     gestore        TEXT,
//!     errore         TEXT,
//!     errore_esteso  TEXT,
//!     destinatari    TEXT NOT NULL,     -- JSON [{"address":..,"certified":..}]
//!     received_at    TEXT NOT NULL,     -- when pecgate archived it
//!     UNIQUE (mailbox, sha256)
//! );
//! CREATE TABLE recipient (
//!     sent_id    INTEGER NOT NULL,
//!     address    TEXT NOT NULL,         -- lower case
//!     state      TEXT NOT NULL,         -- pending | accepted | delivered | failed | external
//!     at         TEXT,                  -- when delivered or failed (certified time)
//!     provider   TEXT,                  -- who delivered it
//!     error      TEXT,                  -- the provider's code and text
//!     updated_at TEXT NOT NULL,
//!     alerted_at TEXT,                  -- when its failure was alerted (audit, log)
//!     PRIMARY KEY (sent_id, address)
//! );
//! ```
//! The `recipient` rows are always recomputed from *all* the receipts of the message with
//! [`MessageState`], so they do not depend on the order receipts arrived in, and a receipt
//! recorded twice (a restart) changes nothing. A receipt is matched by the original
//! Message-ID (`X-Riferimento-Message-ID`, else daticert `msgid`), else by the
//! `identificativo` an earlier receipt of the same submission taught; one that matches no
//! message pecgate sent stays unmatched (sent from webmail or another client) and is linked
//! later if its submission's acceptance names the message.

use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};

use super::reports::{MessageReport, report_of_sent};
use super::{Ledger, LedgerError};
use crate::audit::format_timestamp;
use crate::receipts::classify::{Classified, Kind};
use crate::receipts::daticert::{Daticert, Recipient};
use crate::receipts::reconcile::{MessageState, RecipientState};

pub(super) const SCHEMA_V2: &str = "
ALTER TABLE sent ADD COLUMN identificativo TEXT;
ALTER TABLE sent ADD COLUMN alerted_at TEXT;
CREATE INDEX sent_identificativo ON sent (mailbox, identificativo);
CREATE TABLE receipt (
    id             INTEGER PRIMARY KEY,
    mailbox        TEXT NOT NULL,
    sha256         TEXT NOT NULL,
    sent_id        INTEGER,
    kind           TEXT NOT NULL,
    message_id     TEXT,
    identificativo TEXT,
    consegna       TEXT,
    certified_at   TEXT,
    gestore        TEXT,
    errore         TEXT,
    errore_esteso  TEXT,
    destinatari    TEXT NOT NULL,
    received_at    TEXT NOT NULL,
    UNIQUE (mailbox, sha256)
);
CREATE INDEX receipt_sent ON receipt (sent_id);
CREATE INDEX receipt_message ON receipt (message_id);
CREATE INDEX receipt_received ON receipt (received_at);
CREATE TABLE recipient (
    sent_id    INTEGER NOT NULL,
    address    TEXT NOT NULL,
    state      TEXT NOT NULL,
    at         TEXT,
    provider   TEXT,
    error      TEXT,
    updated_at TEXT NOT NULL,
    alerted_at TEXT,
    PRIMARY KEY (sent_id, address)
);
";

/// What recording one receipt did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiptRecorded {
    /// False when this receipt was recorded before (a restart, a second copy).
    pub new: bool,
    /// The sent message it is about, when pecgate sent it.
    pub message: Option<MessageReport>,
    /// Failed recipients of the message whose failure is not alerted yet: (address, error).
    /// The caller alerts each, then calls [`Ledger::failure_alerted`]; a crash in between
    /// alerts again rather than never.
    pub unalerted_failures: Vec<(String, String)>,
}

/// A receipt as stored, enough to apply it again.
pub(super) struct StoredReceipt {
    pub(super) sha256: String,
    pub(super) kind: Kind,
    pub(super) daticert: Daticert,
}

impl StoredReceipt {
    /// Whether this receipt speaks about `address`.
    pub(super) fn concerns(&self, address: &str) -> bool {
        match &self.daticert.consegna {
            Some(to) => to.eq_ignore_ascii_case(address),
            None => self
                .daticert
                .destinatari
                .iter()
                .any(|r| r.address.eq_ignore_ascii_case(address)),
        }
    }
}

fn kind_named(name: &str) -> Kind {
    [
        Kind::Acceptance,
        Kind::NonAcceptance,
        Kind::TakenInCharge,
        Kind::Delivery,
        Kind::DeliveryFailure,
        Kind::DeliveryTimeout,
        Kind::Virus,
    ]
    .into_iter()
    .find(|k| k.as_str() == name)
    .unwrap_or(Kind::Unknown)
}

/// One `receipt` row as stored.
fn stored_receipt(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredReceipt> {
    let destinatari: String = r.get(8)?;
    Ok(StoredReceipt {
        sha256: r.get(0)?,
        kind: kind_named(&r.get::<_, String>(1)?),
        daticert: Daticert {
            tipo: r.get(1)?,
            identificativo: r.get(2)?,
            consegna: r.get(3)?,
            at: r.get(4)?,
            gestore: r.get(5)?,
            errore: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
            errore_esteso: r.get(7)?,
            destinatari: serde_json::from_str::<Vec<Recipient>>(&destinatari).unwrap_or_default(),
            ..Daticert::default()
        },
    })
}

/// The receipts matching `condition` (SQL over `receipt`), oldest first.
pub(super) fn receipts_where(
    conn: &Connection,
    condition: &str,
    args: impl rusqlite::Params,
) -> rusqlite::Result<Vec<StoredReceipt>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT sha256, kind, identificativo, consegna, certified_at, gestore, errore, \
         errore_esteso, destinatari FROM receipt WHERE {condition} ORDER BY id"
    ))?;
    let rows = stmt.query_map(args, stored_receipt)?;
    rows.collect()
}

/// The receipts of one sent row, oldest first.
pub(super) fn receipts_of(conn: &Connection, sent_id: i64) -> rusqlite::Result<Vec<StoredReceipt>> {
    receipts_where(conn, "sent_id = ?1", [sent_id])
}

/// The `sent` row a receipt is about: by original Message-ID (stored with brackets), else by
/// the provider's identificativo.
fn match_sent(
    conn: &Connection,
    mailbox: &str,
    message_id: Option<&str>,
    identificativo: Option<&str>,
) -> rusqlite::Result<Option<i64>> {
    if let Some(id) = message_id {
        let found = conn
            .query_row(
                "SELECT id FROM sent WHERE mailbox = ?1 AND message_id IN (?2, '<' || ?2 || '>') \
                 ORDER BY (status IN ('accepted', 'unknown', 'sending')) DESC, id DESC LIMIT 1",
                params![mailbox, id],
                |r| r.get(0),
            )
            .optional()?;
        if found.is_some() {
            return Ok(found);
        }
    }
    match identificativo {
        Some(ident) => conn
            .query_row(
                "SELECT id FROM sent WHERE mailbox = ?1 AND identificativo = ?2 \
                 ORDER BY id DESC LIMIT 1",
                params![mailbox, ident],
                |r| r.get(0),
            )
            .optional(),
        None => Ok(None),
    }
}

/// The envelope recipients of a sent row.
fn envelope_recipients(conn: &Connection, sent_id: i64) -> rusqlite::Result<Vec<String>> {
    let json: String = conn.query_row(
        "SELECT recipients FROM sent WHERE id = ?1",
        [sent_id],
        |r| r.get(0),
    )?;
    Ok(serde_json::from_str(&json).unwrap_or_default())
}

/// Recompute the `recipient` rows of `sent_id` from all its receipts; returns the failed
/// recipients whose failure has not been alerted.
fn recompute(conn: &Connection, sent_id: i64) -> rusqlite::Result<Vec<(String, String)>> {
    let mut state = MessageState::default();
    for address in envelope_recipients(conn, sent_id)? {
        state
            .recipients
            .entry(address.trim().to_ascii_lowercase())
            .or_insert(RecipientState::Pending);
    }
    for receipt in receipts_of(conn, sent_id)? {
        state.apply(receipt.kind, &receipt.daticert);
    }
    let now = format_timestamp(SystemTime::now());
    for (address, recipient) in &state.recipients {
        let (at, provider, error) = match recipient {
            RecipientState::Delivered { at, by } => (at.clone(), by.clone(), None),
            RecipientState::Failed { at, error } => (at.clone(), None, Some(error.clone())),
            _ => (None, None, None),
        };
        conn.execute(
            "INSERT INTO recipient (sent_id, address, state, at, provider, error, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (sent_id, address) DO UPDATE SET \
             state = excluded.state, at = excluded.at, provider = excluded.provider, \
             error = excluded.error, updated_at = excluded.updated_at \
             WHERE state IS NOT excluded.state OR at IS NOT excluded.at \
             OR error IS NOT excluded.error",
            params![
                sent_id,
                address,
                recipient.as_str(),
                at,
                provider,
                error,
                now
            ],
        )?;
    }
    if let Some(ident) = &state.identificativo {
        conn.execute(
            "UPDATE sent SET identificativo = ?1 WHERE id = ?2 AND identificativo IS NULL",
            params![ident, sent_id],
        )?;
    }
    let mut stmt = conn.prepare(
        "SELECT address, COALESCE(error, '') FROM recipient WHERE sent_id = ?1 \
         AND state = 'failed' AND alerted_at IS NULL ORDER BY address",
    )?;
    let unalerted = stmt.query_map([sent_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    unalerted.collect()
}

/// What [`record`] did.
struct Recorded {
    new: bool,
    sent_id: Option<i64>,
    unalerted_failures: Vec<(String, String)>,
}

/// Record one archived receipt (in one transaction): insert it unless known, match it, link
/// the unmatched receipts its identificativo now explains, and recompute the recipients.
fn record(
    conn: &mut Connection,
    mailbox: &str,
    sha256: &str,
    what: &Classified,
) -> rusqlite::Result<Recorded> {
    let tx = conn.transaction()?;
    let empty = Daticert::default();
    let d = what.daticert.as_ref().unwrap_or(&empty);
    let message_id = what.original_message_id.as_deref();
    let ident = d.identificativo.as_deref();
    let known: Option<Option<i64>> = tx
        .query_row(
            "SELECT sent_id FROM receipt WHERE mailbox = ?1 AND sha256 = ?2",
            params![mailbox, sha256],
            |r| r.get(0),
        )
        .optional()?;
    let (new, sent_id) = match known {
        Some(sent_id) => (false, sent_id),
        None => {
            let sent_id = match_sent(&tx, mailbox, message_id, ident)?;
            let destinatari = serde_json::to_string(&d.destinatari).unwrap_or_else(|_| "[]".into());
            tx.execute(
                "INSERT INTO receipt (mailbox, sha256, sent_id, kind, message_id, identificativo, \
                 consegna, certified_at, gestore, errore, errore_esteso, destinatari, received_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    mailbox,
                    sha256,
                    sent_id,
                    what.kind.as_str(),
                    message_id,
                    ident,
                    d.consegna,
                    d.at,
                    d.gestore,
                    d.errore,
                    d.errore_esteso,
                    destinatari,
                    format_timestamp(SystemTime::now()),
                ],
            )?;
            (true, sent_id)
        }
    };
    let mut unalerted_failures = Vec::new();
    if let Some(sent_id) = sent_id {
        if let Some(ident) = ident {
            // Receipts that came first with only the identificativo belong here too.
            tx.execute(
                "UPDATE receipt SET sent_id = ?1 WHERE mailbox = ?2 AND sent_id IS NULL \
                 AND identificativo = ?3",
                params![sent_id, mailbox, ident],
            )?;
        }
        unalerted_failures = recompute(&tx, sent_id)?;
    }
    tx.commit()?;
    Ok(Recorded {
        new,
        sent_id,
        unalerted_failures,
    })
}

impl Ledger {
    /// Record a receipt archived as `sha256` for `mailbox` and reconcile its message.
    /// Idempotent: recording it again reports `new: false` and changes nothing.
    pub async fn record_receipt(
        &self,
        mailbox: &str,
        sha256: &str,
        what: &Classified,
    ) -> Result<ReceiptRecorded, LedgerError> {
        let (mailbox, sha256, what) = (mailbox.to_owned(), sha256.to_owned(), what.clone());
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().map_err(|_| LedgerError::Unavailable)?;
            let Recorded {
                new,
                sent_id,
                unalerted_failures,
            } = record(&mut conn, &mailbox, &sha256, &what)?;
            let message = match sent_id {
                Some(id) => Some(report_of_sent(&conn, id)?),
                None => None,
            };
            Ok(ReceiptRecorded {
                new,
                message,
                unalerted_failures,
            })
        })
        .await
        .map_err(|_| LedgerError::Unavailable)?
    }

    /// The failure of `address` for the message sent as `message_id` from `mailbox` has been
    /// alerted: it is not reported again.
    pub async fn failure_alerted(
        &self,
        mailbox: &str,
        message_id: &str,
        address: &str,
    ) -> Result<(), LedgerError> {
        let (mailbox, message_id, address) = (
            mailbox.to_owned(),
            message_id.to_owned(),
            address.to_owned(),
        );
        let now = format_timestamp(SystemTime::now());
        self.with_conn(move |conn| {
            conn.execute(
                "UPDATE recipient SET alerted_at = ?1 WHERE address = ?2 AND alerted_at IS NULL \
                 AND sent_id IN (SELECT id FROM sent WHERE mailbox = ?3 AND message_id = ?4)",
                params![now, address, mailbox, message_id],
            )
            .map(|_| ())
        })
        .await
    }

    /// Messages sent more than `after` ago with a recipient still waiting for a delivery or
    /// failure receipt, not alerted yet; each is marked alerted as it is returned.
    pub async fn take_overdue(
        &self,
        mailbox: &str,
        after: Duration,
    ) -> Result<Vec<MessageReport>, LedgerError> {
        let cutoff = format_timestamp(SystemTime::now() - after);
        let mailbox = mailbox.to_owned();
        self.with_conn(move |conn| {
            let ids = overdue_ids(conn, &cutoff, Some(&mailbox), true)?;
            let mut out = Vec::new();
            for id in ids {
                conn.execute(
                    "UPDATE sent SET alerted_at = ?1 WHERE id = ?2",
                    params![format_timestamp(SystemTime::now()), id],
                )?;
                out.push(report_of_sent(conn, id)?);
            }
            Ok(out)
        })
        .await
    }
}

/// Sent rows (handed to the provider) submitted before `cutoff` with a recipient still
/// pending or accepted (or no recipient row yet).
pub(super) fn overdue_ids(
    conn: &Connection,
    cutoff: &str,
    mailbox: Option<&str>,
    not_alerted: bool,
) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare(
        "SELECT id, recipients FROM sent WHERE status IN ('accepted', 'unknown') \
         AND submitted_at <= ?1 AND (?2 IS NULL OR mailbox = ?2) \
         AND (?3 = 0 OR alerted_at IS NULL) ORDER BY id",
    )?;
    let candidates: Vec<(i64, String)> = stmt
        .query_map(params![cutoff, mailbox, not_alerted], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::new();
    for (id, recipients) in candidates {
        let envelope: Vec<String> = serde_json::from_str(&recipients).unwrap_or_default();
        let settled: Vec<String> = {
            let mut stmt = conn.prepare(
                "SELECT address FROM recipient WHERE sent_id = ?1 \
                 AND state IN ('delivered', 'failed', 'external')",
            )?;
            stmt.query_map([id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        if envelope
            .iter()
            .any(|a| !settled.contains(&a.trim().to_ascii_lowercase()))
        {
            out.push(id);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Begun, NewEntry, ReportFilter, Reports, Status};
    use crate::receipts::classify::classify;

    fn fixtures() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/receipts")
    }

    fn temp_ledger(tag: &str) -> (std::path::PathBuf, Ledger) {
        let dir = std::env::temp_dir().join(format!(
            "pecgate-ledger-receipts-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(crate::ledger::LEDGER_FILE_NAME);
        let ledger = Ledger::open(&path).unwrap();
        (path, ledger)
    }

    async fn sent(ledger: &Ledger, message_id: &str, recipients: &[&str]) {
        let Begun::Row(id) = ledger
            .begin(NewEntry {
                message_id: format!("<{message_id}>"),
                generated_id: false,
                session: "s".into(),
                user: "mario".into(),
                mailbox: "studio".into(),
                sender: "studio@pec.example.test".into(),
                recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
                subject: None,
                size: 1,
            })
            .await
            .unwrap()
        else {
            panic!("new row")
        };
        ledger
            .finish(id, Status::Accepted, "250 ok".into())
            .await
            .unwrap();
    }

    async fn record_file(ledger: &Ledger, name: &str) -> ReceiptRecorded {
        let raw = std::fs::read(fixtures().join(name)).unwrap();
        let sha = crate::receipts::archive::sha256_hex(&raw);
        ledger
            .record_receipt("studio", &sha, &classify(&raw))
            .await
            .unwrap()
    }

    fn states(report: &MessageReport) -> Vec<(String, String)> {
        report
            .recipients
            .iter()
            .map(|r| (r.address.clone(), r.state.clone()))
            .collect()
    }

    /// Every scenario of the fixtures, in arrival order and reversed: the same states, and
    /// the ones the scenario's note describes.
    #[tokio::test]
    async fn fixture_scenarios_reconcile_in_any_order() {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures().join("MANIFEST.json")).unwrap())
                .unwrap();
        let expected: &[(&str, &[(&str, &str)])] = &[
            (
                "fattura",
                &[
                    ("altro@pec.example.test", "delivered"),
                    ("ufficio@pec.ente.test", "failed"),
                    ("copia@pec.ente.test", "delivered"),
                ],
            ),
            ("timeout", &[("lento@pec.lento.test", "failed")]),
            ("tardiva", &[("segreteria@pec.lento.test", "delivered")]),
            ("virus", &[("protocollo@pec.ente.test", "failed")]),
            (
                "estate",
                &[
                    ("ufficio@pec.ente.test", "delivered"),
                    ("fornitore@posta.example.com", "external"),
                    ("mario.rossi@gmail.com", "external"),
                ],
            ),
            ("poste", &[("urp@pec.comune.test", "delivered")]),
        ];
        for (name, want) in expected {
            let scenario = manifest["scenarios"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == *name)
                .unwrap();
            let msgid = scenario["msgid"].as_str().unwrap();
            let arrival: Vec<&str> = scenario["arrival"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap())
                .collect();
            let recipients: Vec<&str> = want.iter().map(|(a, _)| *a).collect();
            let mut outcomes = Vec::new();
            for reversed in [false, true] {
                let (path, ledger) = temp_ledger(name);
                sent(&ledger, msgid, &recipients).await;
                let mut order = arrival.clone();
                if reversed {
                    order.reverse();
                }
                let mut last = None;
                for file in order {
                    let recorded = record_file(&ledger, file).await;
                    assert!(recorded.new, "{file}");
                    last = recorded.message;
                }
                let report = last.expect("matched");
                assert_eq!(
                    report.identificativo.as_deref(),
                    scenario["identificativo"].as_str()
                );
                outcomes.push(states(&report));
                std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
            }
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(a, s)| ((*a).to_owned(), (*s).to_owned()))
                .collect();
            assert_eq!(outcomes[0], want, "{name}");
            assert_eq!(outcomes[1], want, "{name} in reverse");
        }
    }

    #[tokio::test]
    async fn recording_twice_changes_nothing_and_failures_are_reported_until_alerted() {
        let (path, ledger) = temp_ledger("twice");
        let msgid = "fattura.42.20261120@pec.example.test";
        sent(&ledger, msgid, &["ufficio@pec.ente.test"]).await;
        let first = record_file(&ledger, "fattura-5-errore-consegna-nouser.eml").await;
        assert_eq!(first.unalerted_failures.len(), 1);
        assert!(first.unalerted_failures[0].1.starts_with("5.1.1"));
        // Recorded again before the alert was marked (a crash in between): reported again.
        let again = record_file(&ledger, "fattura-5-errore-consegna-nouser.eml").await;
        assert!(!again.new);
        assert_eq!(again.unalerted_failures, first.unalerted_failures);
        assert_eq!(again.message, first.message);
        ledger
            .failure_alerted("studio", &format!("<{msgid}>"), "ufficio@pec.ente.test")
            .await
            .unwrap();
        let third = record_file(&ledger, "fattura-5-errore-consegna-nouser.eml").await;
        assert!(third.unalerted_failures.is_empty());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn unmatched_receipts_are_kept_and_linked_by_identificativo_later() {
        let (path, ledger) = temp_ledger("unmatched");
        // Nothing sent: kept, unmatched.
        let alone = record_file(&ledger, "sintetica-consegna.eml").await;
        assert!(alone.new && alone.message.is_none());
        let reports = Reports::open(&path).unwrap();
        let listed = reports.unmatched(&ReportFilter::default()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].user, None);
        let shown = reports
            .show("<comunicazione.12@pec.example.test>", &Default::default())
            .unwrap();
        assert_eq!(shown[0].user, None);
        assert_eq!(
            states(&shown[0]),
            [(
                "amministrazione@pec.ente.test".to_owned(),
                "delivered".to_owned()
            )]
        );

        // A receipt naming no Message-ID at all, only the submission's identificativo, comes
        // before the acceptance that teaches it.
        sent(
            &ledger,
            "fattura.42.20261120@pec.example.test",
            &["altro@pec.example.test"],
        )
        .await;
        let raw = std::fs::read(fixtures().join("fattura-3-consegna-completa.eml")).unwrap();
        let mut what = classify(&raw);
        what.original_message_id = None;
        let early = ledger
            .record_receipt("studio", "early", &what)
            .await
            .unwrap();
        assert!(early.message.is_none(), "nothing to match on yet");
        let acceptance = record_file(&ledger, "fattura-1-accettazione.eml").await;
        let report = acceptance.message.unwrap();
        let altro = &report.recipients[0];
        assert_eq!(
            (altro.address.as_str(), altro.state.as_str()),
            ("altro@pec.example.test", "delivered")
        );
        assert!(altro.receipts.iter().any(|r| r.sha256 == "early"));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn overdue_messages_are_taken_once() {
        let (path, ledger) = temp_ledger("overdue");
        sent(
            &ledger,
            "sollecito.7@pec.example.test",
            &["lento@pec.lento.test", "b@pec.it"],
        )
        .await;
        record_file(&ledger, "timeout-1-accettazione.eml").await;
        let none = ledger
            .take_overdue("studio", Duration::from_secs(3600))
            .await
            .unwrap();
        assert!(none.is_empty(), "sent just now");
        let due = ledger.take_overdue("studio", Duration::ZERO).await.unwrap();
        assert_eq!(due.len(), 1);
        assert!(
            ledger
                .take_overdue("studio", Duration::ZERO)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            ledger
                .take_overdue("other", Duration::ZERO)
                .await
                .unwrap()
                .is_empty()
        );
        let pending = Reports::open(&path)
            .unwrap()
            .pending(Duration::ZERO, &ReportFilter::default())
            .unwrap();
        assert_eq!(pending.len(), 1, "still pending, alerted or not");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
