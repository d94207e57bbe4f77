//! One message's history for auditors (`pecgate audit message`): who sent it (the sent
//! ledger), its receipts, and who opened, flagged, copied, moved or deleted it through
//! pecgate (the audit log), oldest first. Read-only over both files; blocking.
//!
//! How the audit knows which message a command touched:
//! - a FETCH that served a message's headers or body leaves an entry in a `message` event
//!   (`uid=17 message=<id> opened|headers`, entries joined by `; `, folder = the selected
//!   one): that message is at (mailbox, folder, UID 17);
//! - `UID COPY`/`UID MOVE` events carry the provider's `copyuid=V/SRC/DST` and the source
//!   folder (`from=`): the message is then also at the destination UID;
//! - an `APPEND` carries `message=<id>` (read from the stored message) and `appenduid=V/UID`;
//! - `UID STORE`, `UID COPY`, `UID MOVE` and `UID EXPUNGE` events whose UID set holds one of
//!   the message's places become timeline entries (flagged, deleted, copied, moved, expunged).
//!
//! Commands by sequence number (`STORE 3 ...`) name no message durably and are not
//! followed; every client pecgate has been tried with (Thunderbird, Outlook, mbsync) acts by
//! UID. UIDVALIDITY is not tracked: after a provider renumbers a folder, old places could
//! match new messages (a provider does that only when it rebuilds a mailbox).

use std::collections::HashSet;
use std::path::Path;

use crate::audit::{self, AuditError, StoredEvent};
use crate::ledger::{LedgerError, Reports};

/// Why a timeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// A message's history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Timeline {
    pub message_id: String,
    pub events: Vec<TimelineEvent>,
}

/// One thing that happened to the message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TimelineEvent {
    pub ts: String,
    /// The employee; `None` for the provider's receipts.
    pub user: Option<String>,
    /// `sent`, `receipt`, `opened`, `read-headers`, `appended`, `flagged`, `deleted`,
    /// `copied`, `moved`, `expunged`.
    pub action: String,
    pub folder: Option<String>,
    pub mailbox: Option<String>,
    /// What else is known (recipients, receipt kind and hash, destination, flags).
    pub detail: String,
    /// The outcome recorded (`ok`; `no`/`denied` for an attempt that did not happen).
    pub outcome: String,
}

/// The UID commands the timeline follows.
const UID_COMMANDS: [&str; 4] = ["UID STORE", "UID COPY", "UID MOVE", "UID EXPUNGE"];

/// A UID set as written in a command (`1:3,7,9:*`), as ranges.
fn uid_ranges(set: &str) -> Option<Vec<(u32, u32)>> {
    let number = |n: &str| {
        if n == "*" {
            Some(u32::MAX)
        } else {
            n.parse::<u32>().ok()
        }
    };
    set.split(',')
        .map(|part| match part.split_once(':') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                Some((a.min(b), a.max(b)))
            }
            None => number(part).map(|n| (n, n)),
        })
        .collect()
}

fn in_ranges(ranges: &[(u32, u32)], uid: u32) -> bool {
    ranges.iter().any(|&(a, b)| (a..=b).contains(&uid))
}

/// The UIDs of a set, in order (COPYUID pairs them by position); `None` if unbounded or huge.
fn expand(ranges: &[(u32, u32)]) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for &(a, b) in ranges {
        if b == u32::MAX || out.len() + (b - a) as usize > 1_000_000 {
            return None;
        }
        out.extend(a..=b);
    }
    Some(out)
}

/// `name=value` in an audit detail (values of the keys pecgate writes hold no spaces, except
/// `from=`, which runs up to the next key).
fn field<'a>(detail: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=");
    let start = detail
        .match_indices(&key)
        .find(|(i, _)| *i == 0 || detail.as_bytes()[i - 1] == b' ')?
        .0
        + key.len();
    let rest = &detail[start..];
    if name == "from" {
        let end = [" copyuid=", " upstream=", " message="]
            .iter()
            .filter_map(|k| rest.find(k))
            .min()
            .unwrap_or(rest.len());
        return Some(&rest[..end]);
    }
    Some(rest.split(' ').next().unwrap_or(""))
}

/// A place where the message is: (mailbox, folder, UID).
type Place = (String, String, u32);

/// Build the timeline of `message_id` from the ledger (if there is one) and the audit log.
pub fn build(
    message_id: &str,
    ledger: Option<&Path>,
    audit_path: &Path,
) -> Result<Timeline, TimelineError> {
    let normalised = crate::receipts::daticert::normalise_message_id(message_id)
        .unwrap_or_else(|| message_id.trim().to_owned());
    let bracketed = format!("<{normalised}>");
    let mut events = Vec::new();
    // The provider's identificativo names the same message in its recipients' copies.
    let mut ids = vec![bracketed.clone()];
    if let Some(path) = ledger.filter(|p| p.exists()) {
        let reports = Reports::open(path)?;
        for sent in reports.show(&normalised, &Default::default())? {
            if let Some(ident) = &sent.identificativo {
                ids.push(format!("<{ident}>"));
            }
            let Some(user) = sent.user.clone() else {
                continue;
            };
            let to: Vec<&str> = sent.recipients.iter().map(|r| r.address.as_str()).collect();
            events.push(TimelineEvent {
                ts: sent.submitted_at.clone().unwrap_or_default(),
                user: Some(user),
                action: "sent".to_owned(),
                folder: None,
                mailbox: Some(sent.mailbox.clone()),
                detail: format!("to {}", to.join(", ")),
                outcome: sent.status.clone().unwrap_or_default(),
            });
        }
        for receipt in reports.receipts_of(&normalised)? {
            events.push(TimelineEvent {
                ts: receipt.archived_at.clone(),
                user: None,
                action: "receipt".to_owned(),
                folder: None,
                mailbox: Some(receipt.mailbox.clone()),
                detail: format!(
                    "{} for {} certified {} sha256 {}",
                    receipt.kind,
                    receipt.recipients.join(", "),
                    receipt.certified_at.as_deref().unwrap_or("-"),
                    receipt.sha256
                ),
                outcome: "ok".to_owned(),
            });
        }
    }
    let rows = audit::message_rows(audit_path, &ids, &UID_COMMANDS)?;
    events.extend(follow(&rows, &ids));
    // Timestamps of both files are UTC RFC 3339 of one width: text order is time order.
    events.sort_by(|a, b| a.ts.cmp(&b.ts));
    Ok(Timeline {
        message_id: bracketed,
        events,
    })
}

/// Walk the audit rows in order, tracking where the message is and what was done to it.
fn follow(rows: &[StoredEvent], ids: &[String]) -> Vec<TimelineEvent> {
    let names: HashSet<String> = ids
        .iter()
        .map(|id| format!("message={}", crate::text::escape(id, false)))
        .collect();
    let mut places: HashSet<Place> = HashSet::new();
    let mut out = Vec::new();
    // A state-changing command has a `sent` row before it leaves and its outcome after:
    // the `sent` row stands alone only when the outcome never came (a crash in between).
    let completed: HashSet<(&str, &str)> = rows
        .iter()
        .filter(|r| r.outcome != "sent")
        .filter_map(|r| Some((r.session.as_str(), field(&r.detail, "upstream")?)))
        .collect();
    for row in rows {
        if row.outcome == "sent"
            && field(&row.detail, "upstream")
                .is_some_and(|tag| completed.contains(&(row.session.as_str(), tag)))
        {
            continue;
        }
        let mailbox = row.mailbox.clone().unwrap_or_default();
        let folder = row.folder.clone().unwrap_or_default();
        let names_it = row.detail.split(' ').any(|w| names.contains(w));
        let event = |action: &str, folder: Option<String>, detail: String| TimelineEvent {
            ts: row.ts.clone(),
            user: row.user.clone(),
            action: action.to_owned(),
            folder,
            mailbox: row.mailbox.clone(),
            detail,
            outcome: row.outcome.clone(),
        };
        match row.command.as_str() {
            "message" if names_it => {
                // Entries `uid=N message=<id> opened|headers`, joined by `; `.
                for entry in row.detail.split("; ") {
                    if !entry.split(' ').any(|w| names.contains(w)) {
                        continue;
                    }
                    if let Some(uid) = field(entry, "uid").and_then(|u| u.parse().ok()) {
                        places.insert((mailbox.clone(), folder.clone(), uid));
                    }
                    let action = if entry.ends_with("opened") {
                        "opened"
                    } else {
                        "read-headers"
                    };
                    out.push(event(action, Some(folder.clone()), String::new()));
                }
            }
            "APPEND" if names_it => {
                if let Some((_, uid)) = field(&row.detail, "appenduid")
                    .and_then(|v| v.split_once('/'))
                    .and_then(|(v, u)| Some((v, u.parse::<u32>().ok()?)))
                {
                    places.insert((mailbox, folder.clone(), uid));
                }
                out.push(event("appended", Some(folder), String::new()));
            }
            "UID STORE" | "UID EXPUNGE" | "UID COPY" | "UID MOVE" => {
                let Some(ranges) = row.detail.split(' ').next().and_then(uid_ranges) else {
                    continue;
                };
                // COPY/MOVE events name the destination as their folder; the source is `from=`.
                let moving = row.command.ends_with("COPY") || row.command.ends_with("MOVE");
                let source = if moving {
                    field(&row.detail, "from").unwrap_or("").to_owned()
                } else {
                    folder.clone()
                };
                let here: Vec<u32> = places
                    .iter()
                    .filter(|(m, f, uid)| *m == mailbox && *f == source && in_ranges(&ranges, *uid))
                    .map(|p| p.2)
                    .collect();
                if here.is_empty() {
                    continue;
                }
                let (action, detail) = match row.command.as_str() {
                    "UID STORE" => {
                        let deleting =
                            row.detail.contains("+FLAGS") && row.detail.contains("\\Deleted");
                        let flags = row.detail.split(" upstream=").next().unwrap_or("");
                        let flags = flags.split_once(' ').map_or("", |(_, f)| f);
                        (
                            if deleting { "deleted" } else { "flagged" },
                            flags.to_owned(),
                        )
                    }
                    "UID EXPUNGE" => ("expunged", String::new()),
                    command => {
                        let action = if command.ends_with("MOVE") {
                            "moved"
                        } else {
                            "copied"
                        };
                        if let Some(copyuid) = field(&row.detail, "copyuid")
                            && row.outcome == "ok"
                        {
                            let parts: Vec<&str> = copyuid.split('/').collect();
                            if let [_, src, dst] = parts.as_slice()
                                && let (Some(src), Some(dst)) = (
                                    uid_ranges(src).as_deref().and_then(expand),
                                    uid_ranges(dst).as_deref().and_then(expand),
                                )
                            {
                                for (s, d) in src.iter().zip(dst.iter()) {
                                    if here.contains(s) {
                                        places.insert((mailbox.clone(), folder.clone(), *d));
                                    }
                                }
                            }
                        }
                        (action, format!("to {folder}"))
                    }
                };
                out.push(event(action, Some(source), detail));
            }
            _ => {}
        }
    }
    out
}

/// The timeline as text, one event per line.
pub fn format(timeline: &Timeline) -> String {
    let mut out = format!("{}\n", crate::text::escape(&timeline.message_id, false));
    for e in &timeline.events {
        let who = e.user.as_deref().unwrap_or("(provider)");
        let folder = e.folder.as_deref().unwrap_or("-");
        out.push_str(&format!(
            "{}  {:<12} {:<13} {:<20} {}{}\n",
            e.ts,
            crate::text::escape(who, false),
            e.action,
            crate::text::escape(folder, false),
            crate::text::escape(&e.detail, false),
            if e.outcome == "ok" || e.outcome == "accepted" {
                String::new()
            } else {
                format!(" ({})", e.outcome)
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, user: &str, command: &str, folder: &str, detail: &str) -> StoredEvent {
        StoredEvent {
            id,
            ts: format!("2026-11-29T10:00:{id:02}.000000Z"),
            session: "s".into(),
            user: Some(user.into()),
            mailbox: Some("studio".into()),
            peer: "p".into(),
            protocol: "imap".into(),
            command: command.into(),
            folder: Some(folder.into()),
            detail: detail.into(),
            outcome: "ok".into(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn places_are_followed_through_copies_and_moves() {
        let ids = vec!["<m@x>".to_owned()];
        let rows = vec![
            row(
                1,
                "anna",
                "message",
                "INBOX",
                "uid=6 message=<o@x> opened; uid=7 message=<m@x> headers",
            ),
            StoredEvent {
                outcome: "sent".into(),
                ..row(
                    2,
                    "anna",
                    "UID STORE",
                    "INBOX",
                    "5:8 +FLAGS.SILENT (\\Seen) upstream=c3",
                )
            },
            row(
                2,
                "anna",
                "UID STORE",
                "INBOX",
                "5:8 +FLAGS.SILENT (\\Seen) upstream=c3",
            ),
            // Another message's flags: not this one.
            row(
                3,
                "anna",
                "UID STORE",
                "INBOX",
                "9 +FLAGS (\\Flagged) upstream=c4",
            ),
            row(
                4,
                "mario",
                "UID COPY",
                "Archivio 2026",
                "7 \"Archivio 2026\" from=INBOX copyuid=99/7/41 upstream=c5",
            ),
            row(
                5,
                "mario",
                "UID MOVE",
                "Trash",
                "41 Trash from=Archivio 2026 copyuid=98/41/3 upstream=c6",
            ),
            row(
                6,
                "mario",
                "UID STORE",
                "Trash",
                "3 +FLAGS (\\Deleted) upstream=c7",
            ),
            row(7, "mario", "UID EXPUNGE", "Trash", "1:* upstream=c8"),
            row(
                8,
                "mario",
                "message",
                "INBOX",
                "uid=7 message=<other@x> opened",
            ),
        ];
        let events = follow(&rows, &ids);
        let got: Vec<(&str, &str, Option<&str>)> = events
            .iter()
            .map(|e| {
                (
                    e.user.as_deref().unwrap(),
                    e.action.as_str(),
                    e.folder.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("anna", "read-headers", Some("INBOX")),
                ("anna", "flagged", Some("INBOX")),
                ("mario", "copied", Some("INBOX")),
                ("mario", "moved", Some("Archivio 2026")),
                ("mario", "deleted", Some("Trash")),
                ("mario", "expunged", Some("Trash")),
            ]
        );
        assert_eq!(events[2].detail, "to Archivio 2026");
        assert_eq!(events[1].detail, "+FLAGS.SILENT (\\Seen)");
    }

    #[test]
    fn sets_and_fields() {
        assert_eq!(
            uid_ranges("1:3,7,9:*"),
            Some(vec![(1, 3), (7, 7), (9, u32::MAX)])
        );
        assert_eq!(uid_ranges("x"), None);
        assert_eq!(expand(&[(3, 5), (9, 9)]), Some(vec![3, 4, 5, 9]));
        assert_eq!(expand(&[(3, u32::MAX)]), None);
        assert_eq!(
            field("a b=1 from=My Folder copyuid=1/2/3", "from"),
            Some("My Folder")
        );
        assert_eq!(field("xuid=3 uid=4", "uid"), Some("4"));
    }
}
