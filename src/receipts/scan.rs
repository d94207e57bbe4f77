//! The receipts worker's IMAP, without I/O: the commands it sends (its own words, built
//! here from values it controls), what it reads back (decoded with imap-codec), and what it
//! does with each message it finds.
//!
//! The worker only ever sends: `EXAMINE`/`SELECT` of a watched folder, `UID FETCH` of PEC
//! headers and of whole messages with `BODY.PEEK` (never setting `\Seen`), `LIST`/`CREATE`
//! of the receipts folder, and, to file receipts, `UID MOVE` (or `UID COPY` + `UID STORE
//! +FLAGS.SILENT (\Deleted)` + `UID EXPUNGE` on the same UIDs), `IDLE`/`DONE`, `LOGOUT`.

use imap_codec::ResponseCodec;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::fetch::MessageDataItem;
use imap_codec::imap_types::response::{Code, Data, Response, Status};

use super::classify::Kind;

/// What the worker does with a message, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Ordinary mail: not the worker's business.
    Ignore,
    /// Archived and left where it is: incoming PEC (transport envelopes), anomaly envelopes,
    /// and anything that cannot be classified (kept, reported).
    Archive,
    /// A receipt: archived, reconciled, and filed in the receipts folder when there is one.
    ArchiveAndFile,
}

impl Disposition {
    pub fn of(kind: Kind) -> Disposition {
        match kind {
            Kind::Ordinary => Disposition::Ignore,
            Kind::Envelope | Kind::Anomaly | Kind::Unknown => Disposition::Archive,
            _ if kind.is_receipt() => Disposition::ArchiveAndFile,
            _ => Disposition::Archive,
        }
    }
}

/// The wire name of a folder configured with `/` as separator, for a provider whose
/// delimiter is `delimiter`, modified UTF-7 encoded.
pub fn wire_name(configured: &str, delimiter: Option<char>) -> String {
    let native: String = match delimiter {
        Some(d) if d != '/' => configured.replace('/', &d.to_string()),
        _ => configured.to_owned(),
    };
    crate::imap::mutf7::encode(&native)
}

/// A UID set in IMAP syntax with runs compressed (`3:5,9`). `uids` sorted, not empty.
pub fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            end = uids[i + 1];
            i += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// The fetch items of the first pass: enough to tell PEC messages from ordinary mail.
pub const PEC_HEADER_ITEMS: &str = "(UID BODY.PEEK[HEADER.FIELDS (X-TRASPORTO X-RICEVUTA)])";
/// The fetch items of the second pass: the whole message, as served, never marked \Seen.
pub const WHOLE_MESSAGE_ITEMS: &str = "(UID BODY.PEEK[])";

/// A FETCH response that carried a UID and a body section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub uid: u32,
    pub body: Vec<u8>,
}

/// What one untagged response unit (a line and its literals) says, as far as the worker
/// cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Untagged {
    Fetched(Fetched),
    UidValidity(u32),
    /// `* N EXISTS`: new mail (during IDLE).
    Exists(u32),
    Other,
}

/// Decode one untagged unit.
pub fn untagged(unit: &[u8]) -> Untagged {
    let Ok((_, response)) = ResponseCodec::default().decode(unit) else {
        return Untagged::Other;
    };
    match response {
        Response::Data(Data::Fetch { items, .. }) => {
            let mut uid = None;
            let mut body = None;
            for item in items.into_iter() {
                match item {
                    MessageDataItem::Uid(u) => uid = Some(u.get()),
                    MessageDataItem::BodyExt { data, .. } => {
                        body = Some(data.0.as_ref().map_or(Vec::new(), |s| s.as_ref().to_vec()));
                    }
                    _ => {}
                }
            }
            match (uid, body) {
                (Some(uid), Some(body)) => Untagged::Fetched(Fetched { uid, body }),
                _ => Untagged::Other,
            }
        }
        Response::Data(Data::Exists(n)) => Untagged::Exists(n),
        Response::Status(Status::Untagged(body)) => match body.code {
            Some(Code::UidValidity(v)) => Untagged::UidValidity(v.get()),
            _ => Untagged::Other,
        },
        _ => Untagged::Other,
    }
}

/// Whether the header fields fetched in the first pass include a PEC header.
pub fn has_pec_header(fields: &[u8]) -> bool {
    fields.split(|&b| b == b'\n').any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with(b"x-trasporto:") || line.starts_with(b"x-ricevuta:")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_units_are_decoded_whatever_the_item_order() {
        let unit = b"* 4 FETCH (UID 17 BODY[] {14}\r\nX-Ricevuta: \r\n)\r\n";
        assert_eq!(
            untagged(unit),
            Untagged::Fetched(Fetched {
                uid: 17,
                body: b"X-Ricevuta: \r\n".to_vec()
            })
        );
        let unit =
            b"* 4 FETCH (BODY[HEADER.FIELDS (X-TRASPORTO X-RICEVUTA)] {2}\r\n\r\n UID 9)\r\n";
        assert_eq!(
            untagged(unit),
            Untagged::Fetched(Fetched {
                uid: 9,
                body: b"\r\n".to_vec()
            })
        );
        // A flags update another client caused is not a fetched body.
        assert_eq!(
            untagged(b"* 4 FETCH (FLAGS (\\Seen) UID 9)\r\n"),
            Untagged::Other
        );
        assert_eq!(untagged(b"* 12 EXISTS\r\n"), Untagged::Exists(12));
        assert_eq!(
            untagged(b"* OK [UIDVALIDITY 1700000000] UIDs valid\r\n"),
            Untagged::UidValidity(1_700_000_000)
        );
        assert_eq!(untagged(b"* garbage\r\n"), Untagged::Other);
    }

    #[test]
    fn pec_headers_and_dispositions() {
        assert!(has_pec_header(b"X-Ricevuta: accettazione\r\n\r\n"));
        assert!(has_pec_header(b"x-TRASPORTO: posta-certificata\r\n\r\n"));
        assert!(!has_pec_header(b"\r\n"));
        assert!(!has_pec_header(b"Subject: X-Ricevuta: no\r\n\r\n"));
        assert_eq!(Disposition::of(Kind::Delivery), Disposition::ArchiveAndFile);
        assert_eq!(
            Disposition::of(Kind::DeliveryTimeout),
            Disposition::ArchiveAndFile
        );
        assert_eq!(Disposition::of(Kind::Envelope), Disposition::Archive);
        assert_eq!(Disposition::of(Kind::Unknown), Disposition::Archive);
        assert_eq!(Disposition::of(Kind::Ordinary), Disposition::Ignore);
    }

    #[test]
    fn names_and_sets() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[4]), "4");
        assert_eq!(wire_name("INBOX/Ricevute", Some('.')), "INBOX.Ricevute");
        assert_eq!(
            wire_name("Ricevute/Già lette", Some('/')),
            "Ricevute/Gi&AOA- lette"
        );
    }
}
