//! What `pecgate receipts ...` prints and writes: per-message tables, and the export of
//! archived receipts with a manifest for a preservation service.
//!
//! The export copies each archived file as `<sha256>.eml`, checks that the copy hashes to
//! its name, and writes `manifest.json` (one object per receipt: hash, kind, message,
//! recipients, certified and archived times, mailbox, sender) and `SHA256SUMS` (the format
//! `sha256sum -c` reads). Blocking file I/O: for the command line.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::archive;
use crate::ledger::{ExportedReceipt, MessageReport};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("archived file {} does not match its hash: the archive is damaged", path.display())]
    Corrupt { path: PathBuf },
}

/// Control characters escaped, so a hostile Message-ID cannot rewrite the terminal.
fn clean(text: &str) -> std::borrow::Cow<'_, str> {
    crate::text::escape(text, false)
}

/// Messages as a table: a header line per message, a line per recipient.
pub fn format_messages(reports: &[MessageReport]) -> String {
    let mut out = String::new();
    for (i, m) in reports.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "{}  mailbox {}  sent by {}{}",
            clean(&m.message_id),
            clean(&m.mailbox),
            m.user
                .as_deref()
                .map_or("(not sent through pecgate)".into(), clean),
            m.submitted_at
                .as_deref()
                .map(|at| format!(" at {at}"))
                .unwrap_or_default(),
        );
        if let Some(subject) = &m.subject {
            let _ = writeln!(out, "  subject: {}", clean(subject));
        }
        if let Some(ident) = &m.identificativo {
            let _ = writeln!(out, "  identificativo: {}", clean(ident));
        }
        let width = m
            .recipients
            .iter()
            .map(|r| r.address.chars().count())
            .max()
            .unwrap_or(0);
        for r in &m.recipients {
            let mut detail = String::new();
            if let Some(at) = &r.at {
                let _ = write!(detail, " {at}");
            }
            if let Some(provider) = &r.provider {
                let _ = write!(detail, " by {}", clean(provider));
            }
            if let Some(error) = &r.error {
                let _ = write!(detail, " error: {}", clean(error));
            }
            let _ = writeln!(
                out,
                "  {:<width$}  {:<9}{detail}",
                clean(&r.address),
                r.state
            );
            for link in &r.receipts {
                let _ = writeln!(out, "  {:<width$}    {} {}", "", link.kind, link.sha256);
            }
        }
        for link in &m.other_receipts {
            let _ = writeln!(out, "  (other) {} {}", link.kind, link.sha256);
        }
    }
    out
}

/// Receipts as a table, one per line (`receipts unmatched`).
pub fn format_receipts(receipts: &[ExportedReceipt]) -> String {
    let mut out = String::new();
    for r in receipts {
        let _ = writeln!(
            out,
            "{}  {}  {:<25} {}  {}  {}",
            r.archived_at,
            clean(&r.mailbox),
            r.kind,
            clean(r.message_id.as_deref().unwrap_or("-")),
            clean(&r.recipients.join(",")),
            r.sha256
        );
    }
    out
}

/// Unclassified messages as a table, one per line (`receipts unclassified`).
pub fn format_archived(archived: &[archive::Archived]) -> String {
    let mut out = String::new();
    for a in archived {
        let _ = writeln!(
            out,
            "{}  {}  {} uid {}  {}  {}",
            a.archived_at,
            clean(&a.mailbox),
            clean(&a.folder),
            a.uid,
            a.sha256,
            clean(a.note.as_deref().unwrap_or("-")),
        );
    }
    out
}

/// Copy `receipts` from `archive_dir` into `out` with a manifest; returns how many.
pub fn export(
    receipts: &[ExportedReceipt],
    archive_dir: &Path,
    out: &Path,
) -> Result<usize, ExportError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ExportError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut sums = String::new();
    for r in receipts {
        let from = archive::file_path(archive_dir, &r.sha256);
        let bytes = std::fs::read(&from).map_err(io(&from))?;
        if archive::sha256_hex(&bytes) != r.sha256 {
            return Err(ExportError::Corrupt { path: from });
        }
        let to = out.join(format!("{}.eml", r.sha256));
        std::fs::write(&to, &bytes).map_err(io(&to))?;
        let _ = writeln!(sums, "{}  {}.eml", r.sha256, r.sha256);
    }
    let manifest = out.join("manifest.json");
    let json = serde_json::to_string_pretty(receipts).expect("receipts serialise");
    std::fs::write(&manifest, json + "\n").map_err(io(&manifest))?;
    let sums_path = out.join("SHA256SUMS");
    std::fs::write(&sums_path, sums).map_err(io(&sums_path))?;
    Ok(receipts.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{ReceiptLink, RecipientReport};

    #[test]
    fn tables_escape_what_they_print() {
        let report = MessageReport {
            message_id: "<a\u{1b}[2J@b>".into(),
            user: Some("mario".into()),
            mailbox: "studio".into(),
            identificativo: Some("opec1@pec.it".into()),
            subject: Some("Fattura".into()),
            submitted_at: Some("2026-11-29T10:00:00.000000Z".into()),
            status: Some("accepted".into()),
            recipients: vec![RecipientReport {
                address: "a@pec.it".into(),
                state: "failed".into(),
                at: Some("2026-11-29T11:00:00+01:00".into()),
                error: Some("5.1.1 - indirizzo non valido".into()),
                provider: None,
                receipts: vec![ReceiptLink {
                    kind: "errore-consegna".into(),
                    sha256: "ab".repeat(32),
                }],
            }],
            other_receipts: Vec::new(),
        };
        let table = format_messages(&[report]);
        assert!(!table.contains('\u{1b}'), "{table}");
        assert!(table.contains("sent by mario at 2026-11-29T10:00:00.000000Z"));
        assert!(table.contains("a@pec.it  failed    2026-11-29T11:00:00+01:00 error: 5.1.1"));
        assert!(table.contains(&format!("errore-consegna {}", "ab".repeat(32))));
    }
}
