//! Which message a user touched: the Message-ID in what the provider served (a FETCH answer)
//! or what the user stored (an APPEND), for the audit's per-message timeline
//! (`pecgate audit message`). Pure: the relay shows it the bytes as they stream past (the
//! lines of a FETCH answer, and the first [`PREFIX_MAX`] bytes of each literal), never
//! holding a whole message.
//!
//! Only top-level header sections identify a message (`BODY[]`, `BODY[HEADER]`,
//! `BODY[HEADER.FIELDS (…)]`, `RFC822`, `RFC822.HEADER`, a partial `BODY[]<0>`): the headers
//! in `BODY[2.HEADER]` are those of an attached message, not of the one fetched.

use std::collections::{HashMap, HashSet};

/// How much of each literal is looked at: far more than any real header block.
pub const PREFIX_MAX: usize = 64 * 1024;
/// How much of a FETCH answer's text (outside literals) is kept to find `UID n`.
const TEXT_MAX: usize = 8 * 1024;

/// What one FETCH answer showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchSeen {
    pub seq: u32,
    pub uid: Option<u32>,
    /// From the message's own headers, normalised to `<…>`.
    pub message_id: Option<String>,
    /// Body content was served (the message was opened, or downloaded), not only headers.
    pub opened: bool,
}

/// What a literal of a FETCH answer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    /// The whole message from its start (headers included).
    Whole,
    /// The message's own header block only.
    Header,
    /// Body content without the message's headers (a part, the text, a later chunk).
    Body,
    /// Anything else (an attached message's headers, a part's MIME header).
    Other,
}

/// The section named by the item right before a literal announcement, e.g. the text
/// `... BODY[HEADER.FIELDS (MESSAGE-ID)] ` before `{123}`.
fn section_before_literal(text: &[u8]) -> Section {
    let text = text.trim_ascii_end();
    // A partial answer: `BODY[]<0>`; a later chunk has no headers.
    let (text, origin) = match text.strip_suffix(b">") {
        Some(rest) => match rest.iter().rposition(|&b| b == b'<') {
            Some(at) => (&rest[..at], std::str::from_utf8(&rest[at + 1..]).ok()),
            None => (text, None),
        },
        None => (text, None),
    };
    let later_chunk = origin.is_some_and(|o| o != "0");
    let upper = text.to_ascii_uppercase();
    let item = if upper.ends_with(b"]") {
        let open = match upper.iter().rposition(|&b| b == b'[') {
            Some(open) => open,
            None => return Section::Other,
        };
        let name_start = upper[..open]
            .iter()
            .rposition(|&b| b == b' ' || b == b'(')
            .map_or(0, |p| p + 1);
        let name = &upper[name_start..open];
        if name != b"BODY" && name != b"BINARY" {
            return Section::Other;
        }
        let section = &upper[open + 1..upper.len() - 1];
        if section.is_empty() {
            return if later_chunk {
                Section::Body
            } else {
                Section::Whole
            };
        }
        if section == b"HEADER" || section.starts_with(b"HEADER.FIELDS") {
            return Section::Header;
        }
        if section == b"TEXT" || section.first().is_some_and(u8::is_ascii_digit) {
            // `1`, `1.2`, `TEXT` are body; `2.HEADER` and `2.MIME` are headers of parts.
            return if section.ends_with(b"HEADER")
                || section.ends_with(b"MIME")
                || section.contains(&b'(')
            {
                Section::Other
            } else {
                Section::Body
            };
        }
        return Section::Other;
    } else {
        let start = upper
            .iter()
            .rposition(|&b| b == b' ' || b == b'(')
            .map_or(0, |p| p + 1);
        &upper[start..]
    };
    match item {
        b"RFC822" => Section::Whole,
        b"RFC822.HEADER" => Section::Header,
        b"RFC822.TEXT" => Section::Body,
        _ => Section::Other,
    }
}

/// The Message-ID in a header block (or the start of a message), normalised to `<…>`.
pub fn message_id_in(headers: &[u8]) -> Option<String> {
    let mut value: Option<Vec<u8>> = None;
    for line in headers.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if let Some(v) = &mut value {
            if line.starts_with(b" ") || line.starts_with(b"\t") {
                v.extend_from_slice(line);
                continue;
            }
            break;
        }
        if line.len() >= 11 && line[..11].eq_ignore_ascii_case(b"message-id:") {
            value = Some(line[11..].to_vec());
        }
    }
    let text = String::from_utf8_lossy(&value?).into_owned();
    let id = crate::receipts::daticert::normalise_message_id(&text)?;
    // One token: a header value with spaces inside is not an id to match on.
    (!id.contains(char::is_whitespace) && id.len() <= 998).then(|| format!("<{id}>"))
}

/// Add `bytes` to `head` while the header block has not ended (and within [`PREFIX_MAX`]):
/// only the headers are ever copied, never the body streaming past.
pub fn keep_header(head: &mut Vec<u8>, bytes: &[u8]) {
    const END: &[u8; 4] = b"\r\n\r\n";
    if head.len() >= PREFIX_MAX || head.ends_with(END) || head.as_slice() == b"\r\n" {
        return;
    }
    if head.is_empty() && bytes.starts_with(b"\r\n") {
        // No headers at all.
        head.extend_from_slice(b"\r\n");
        return;
    }
    let bytes = &bytes[..bytes.len().min(PREFIX_MAX - head.len())];
    // The end may straddle the previous chunk (the longest overlap is the earliest end), else
    // it is found in this one (the search stops there: a body is not scanned).
    let straddling = (1..4)
        .rev()
        .find(|&k| head.ends_with(&END[..k]) && bytes.starts_with(&END[k..]));
    let end = match straddling {
        Some(k) => 4 - k,
        None => bytes
            .windows(4)
            .position(|w| w == END)
            .map_or(bytes.len(), |at| at + 4),
    };
    head.extend_from_slice(&bytes[..end]);
}

/// Follows one FETCH answer as the relay streams it.
#[derive(Debug, Default)]
pub struct FetchTap {
    /// The answer's text outside literals (bounded).
    text: Vec<u8>,
    current: Option<(Section, Vec<u8>)>,
    message_id: Option<String>,
    opened: bool,
}

impl FetchTap {
    /// A line of the answer (the first, or one after a literal), CRLF and any literal
    /// announcement included.
    pub fn line(&mut self, line: &[u8], literal_follows: bool) {
        self.close_literal();
        let body = line.strip_suffix(b"\r\n").unwrap_or(line);
        let (text, announcement) = match (literal_follows, body.iter().rposition(|&b| b == b'{')) {
            (true, Some(at)) => (&body[..at], true),
            _ => (body, false),
        };
        if self.text.len() + text.len() <= TEXT_MAX {
            self.text.extend_from_slice(text);
            self.text.push(b' ');
        }
        if announcement {
            let section = section_before_literal(text);
            self.opened |= matches!(section, Section::Whole | Section::Body);
            self.current = Some((section, Vec::new()));
        }
    }

    /// Bytes of the literal being streamed. Kept only up to the end of the header block:
    /// a body is never copied.
    pub fn literal(&mut self, bytes: &[u8]) {
        if let Some((Section::Whole | Section::Header, prefix)) = &mut self.current {
            keep_header(prefix, bytes);
        }
    }

    fn close_literal(&mut self) {
        if let Some((Section::Whole | Section::Header, prefix)) = self.current.take()
            && self.message_id.is_none()
        {
            self.message_id = message_id_in(&prefix);
        }
    }

    /// What the answer showed, if it carried a literal at all.
    pub fn finish(mut self) -> Option<FetchSeen> {
        self.close_literal();
        // Most answers (flags, sizes) carry no header or body: nothing to parse.
        if self.message_id.is_none() && !self.opened {
            return None;
        }
        let text = String::from_utf8_lossy(&self.text);
        let mut words = text
            .split(|c: char| c.is_ascii_whitespace() || c == '(' || c == ')')
            .filter(|w| !w.is_empty());
        // `* 12 FETCH`
        let seq = match (words.next(), words.next(), words.next()) {
            (Some("*"), Some(n), Some(f)) if f.eq_ignore_ascii_case("FETCH") => n.parse().ok()?,
            _ => return None,
        };
        let mut uid = None;
        let mut previous = "";
        for word in words {
            if previous.eq_ignore_ascii_case("UID") {
                uid = word.parse().ok();
            }
            previous = word;
        }
        Some(FetchSeen {
            seq,
            uid,
            message_id: self.message_id,
            opened: self.opened,
        })
    }
}

/// Most identities one session remembers, and most messages it deduplicates.
const IDENTITIES_MAX: usize = 50_000;
/// Most messages named in one `message` event: a bulk download writes one row per this
/// many messages, not one per message (each row costs the audit writer a chained insert).
pub const MESSAGES_PER_EVENT: usize = 64;

/// What one session learnt: which Message-ID each (folder, UID) holds, and which messages it
/// already named in a `message` event (a client refetching headers adds nothing). Both
/// bounded: when full they start over, which only costs repeated entries. Entries wait in a
/// batch until [`Identities::take_batch`] makes an event of them.
#[derive(Debug, Default)]
pub struct Identities {
    /// By folder (no key allocated per message), then UID.
    known: HashMap<String, HashMap<u32, String>>,
    recorded: HashMap<String, HashSet<(u32, bool)>>,
    /// Entries in `known` and `recorded`, for the bound.
    size: usize,
    /// The folder of the entries waiting, and the entries.
    batch: Option<(String, Vec<String>)>,
}

impl Identities {
    /// Note what a FETCH answer showed in `folder`: an entry (`uid=17 message=<id> opened`,
    /// or `headers` when only headers were served) joins the batch, unless this session
    /// named that message already or it cannot be identified. Returns a full batch to record
    /// (a change of folder, or [`MESSAGES_PER_EVENT`] entries).
    pub fn seen(&mut self, folder: &str, seen: FetchSeen) -> Option<(String, String)> {
        let entry = self.entry(folder, seen)?;
        let full = match &self.batch {
            Some((f, _)) if f != folder => self.take_batch(),
            _ => None,
        };
        let (_, entries) = self
            .batch
            .get_or_insert_with(|| (folder.to_owned(), Vec::new()));
        entries.push(entry);
        if full.is_some() {
            return full;
        }
        if entries.len() >= MESSAGES_PER_EVENT {
            return self.take_batch();
        }
        None
    }

    /// The waiting entries as (folder, detail of one `message` event: entries joined by
    /// `; `, which no Message-ID contains).
    pub fn take_batch(&mut self) -> Option<(String, String)> {
        let (folder, entries) = self.batch.take()?;
        Some((folder, entries.join("; ")))
    }

    fn entry(&mut self, folder: &str, seen: FetchSeen) -> Option<String> {
        let FetchSeen {
            seq,
            uid,
            message_id,
            opened,
        } = seen;
        if self.size >= IDENTITIES_MAX {
            self.known.clear();
            self.recorded.clear();
            self.size = 0;
        }
        let message_id = match (message_id, uid) {
            (Some(id), Some(uid)) => {
                self.size += 1;
                folder_entry(&mut self.known, folder).insert(uid, id.clone());
                id
            }
            (Some(id), None) => id,
            // A part of a message whose headers this session saw earlier.
            (None, Some(uid)) => self.known.get(folder)?.get(&uid)?.clone(),
            (None, None) => return None,
        };
        let what = if opened { "opened" } else { "headers" };
        let id = crate::text::escape(&message_id, false);
        match uid {
            Some(uid) => {
                self.size += 1;
                if !folder_entry(&mut self.recorded, folder).insert((uid, opened)) {
                    return None;
                }
                Some(format!("uid={uid} message={id} {what}"))
            }
            None => Some(format!("seq={seq} message={id} {what}")),
        }
    }
}

/// The map of `folder`, created on first use (the name is allocated once per folder).
fn folder_entry<'a, T: Default>(maps: &'a mut HashMap<String, T>, folder: &str) -> &'a mut T {
    if !maps.contains_key(folder) {
        maps.insert(folder.to_owned(), T::default());
    }
    maps.get_mut(folder).expect("inserted above")
}

/// `[COPYUID v src dst]` or `[APPENDUID v uid]` in a completion or untagged OK, as the
/// audit detail records it (`copyuid=v/src/dst`, `appenduid=v/uid`: `/` because the sets
/// themselves hold `:` and `,`).
pub fn uid_code(text: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(text);
    let upper = text.to_ascii_uppercase();
    for (code, name) in [("[COPYUID ", "copyuid"), ("[APPENDUID ", "appenduid")] {
        if let Some(start) = upper.find(code) {
            let rest = &text[start + code.len()..];
            let end = rest.find(']')?;
            let parts: Vec<&str> = rest[..end].split_ascii_whitespace().collect();
            let valid = parts.iter().all(|p| {
                p.bytes()
                    .all(|b| b.is_ascii_digit() || b == b':' || b == b',')
            });
            if valid && (2..=3).contains(&parts.len()) {
                return Some(format!("{name}={}", parts.join("/")));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap(pieces: &[&[u8]]) -> Option<FetchSeen> {
        let mut tap = FetchTap::default();
        let mut literal = false;
        for piece in pieces {
            if literal {
                tap.literal(piece);
                literal = false;
            } else {
                literal = piece.ends_with(b"}\r\n");
                tap.line(piece, literal);
            }
        }
        tap.finish()
    }

    #[test]
    fn a_whole_message_is_opened_and_identified() {
        let seen = tap(&[
            b"* 3 FETCH (UID 17 FLAGS (\\Seen) BODY[] {52}\r\n",
            b"Subject: x\r\nMessage-ID:\r\n <abc@studio.it>\r\n\r\nbody",
            b")\r\n",
        ])
        .unwrap();
        assert_eq!(
            seen,
            FetchSeen {
                seq: 3,
                uid: Some(17),
                message_id: Some("<abc@studio.it>".into()),
                opened: true
            }
        );
    }

    #[test]
    fn headers_identify_without_opening_and_parts_never_identify() {
        let seen = tap(&[
            b"* 3 FETCH (BODY[HEADER.FIELDS (MESSAGE-ID SUBJECT)] {26}\r\n",
            b"message-id: <h@x>\r\n\r\n    ",
            b" UID 9)\r\n",
        ])
        .unwrap();
        assert_eq!((seen.uid, seen.opened), (Some(9), false));
        assert_eq!(seen.message_id.as_deref(), Some("<h@x>"));
        // The headers of an attached message are not this message's.
        let seen = tap(&[
            b"* 3 FETCH (UID 9 BODY[2.HEADER] {22}\r\n",
            b"Message-ID: <att@x>\r\n\r\n",
            b")\r\n",
        ]);
        assert_eq!(seen, None);
        // A part is body content: opened, identity unknown here.
        let seen = tap(&[b"* 3 FETCH (UID 9 BODY[1] {4}\r\n", b"ciao", b")\r\n"]).unwrap();
        assert_eq!((seen.opened, seen.message_id), (true, None));
        // A later chunk of a partial fetch carries no headers.
        let seen = tap(&[
            b"* 3 FETCH (UID 9 BODY[]<4096> {20}\r\n",
            b"Message-ID: <no@x>\r\n",
            b")\r\n",
        ])
        .unwrap();
        assert_eq!((seen.opened, seen.message_id), (true, None));
        // Flags only: nothing to say.
        assert_eq!(tap(&[b"* 3 FETCH (UID 9 FLAGS (\\Seen))\r\n"]), None);
    }

    #[test]
    fn rfc822_items_and_odd_ids() {
        let seen = tap(&[
            b"* 1 FETCH (RFC822.HEADER {25}\r\n",
            b"Message-Id: <a b@x>\r\n\r\n",
            b")\r\n",
        ]);
        assert_eq!(seen, None, "an id with a space is not matched on");
        assert_eq!(
            message_id_in(b"From: a\r\n\r\nMessage-ID: <late@x>\r\n"),
            None
        );
        assert_eq!(
            message_id_in(b"MESSAGE-ID: plain@x\r\n"),
            Some("<plain@x>".into())
        );
    }

    #[test]
    fn identities_are_learnt_batched_and_recorded_once() {
        let mut ids = Identities::default();
        let headers = FetchSeen {
            seq: 1,
            uid: Some(5),
            message_id: Some("<m@x>".into()),
            opened: false,
        };
        assert_eq!(ids.seen("INBOX", headers.clone()), None, "batched");
        assert_eq!(ids.seen("INBOX", headers), None, "named once");
        // Opening part 1 later: identified from the headers seen before.
        let part = FetchSeen {
            seq: 1,
            uid: Some(5),
            message_id: None,
            opened: true,
        };
        assert_eq!(ids.seen("INBOX", part.clone()), None);
        // Another folder's UID 5 is another message, and another folder ends the batch.
        let other = FetchSeen {
            message_id: Some("<n@x>".into()),
            ..part.clone()
        };
        assert_eq!(
            ids.seen("Sent", other),
            Some((
                "INBOX".into(),
                "uid=5 message=<m@x> headers; uid=5 message=<m@x> opened".into()
            ))
        );
        assert_eq!(
            ids.take_batch(),
            Some(("Sent".into(), "uid=5 message=<n@x> opened".into()))
        );
        assert_eq!(ids.take_batch(), None);
        // A bulk download: one event per MESSAGES_PER_EVENT messages.
        let events = (1..=2 * MESSAGES_PER_EVENT as u32)
            .filter_map(|uid| {
                ids.seen(
                    "Bulk",
                    FetchSeen {
                        seq: uid,
                        uid: Some(uid),
                        message_id: Some(format!("<{uid}@x>")),
                        opened: true,
                    },
                )
            })
            .count();
        assert_eq!(events, 2);
    }

    #[test]
    fn only_the_header_block_is_kept() {
        let mut head = Vec::new();
        keep_header(&mut head, b"Message-ID: <a@b>\r\nSubject: x\r");
        keep_header(&mut head, b"\n\r\nthe body, never copied");
        assert_eq!(head, b"Message-ID: <a@b>\r\nSubject: x\r\n\r\n");
        keep_header(&mut head, b"more body");
        assert_eq!(head.len(), 33, "nothing after the header block");
        assert_eq!(message_id_in(&head).as_deref(), Some("<a@b>"));
        // Found by the fuzzer: `\r\n\r` then `\n\r\n…` ends after one byte, not three.
        let mut head = b"A: b\r\n\r".to_vec();
        keep_header(&mut head, b"\n\r\nbody");
        assert_eq!(head, b"A: b\r\n\r\n");
    }

    #[test]
    fn uid_codes() {
        assert_eq!(
            uid_code(b"OK [COPYUID 1700 3:5,9 101:104] Done"),
            Some("copyuid=1700/3:5,9/101:104".into())
        );
        assert_eq!(
            uid_code(b"OK [APPENDUID 1700 12] Append completed."),
            Some("appenduid=1700/12".into())
        );
        assert_eq!(uid_code(b"OK [COPYUID 1 2 x] no"), None);
        assert_eq!(uid_code(b"OK done"), None);
    }
}
