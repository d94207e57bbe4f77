//! Fetch once: a message's bytes never change for a given UIDVALIDITY and UID, so a body
//! one session downloaded can serve every other session's download of it. Pure: which client
//! commands pecgate may answer from its body cache, what then goes to the provider, how the
//! cached body joins the provider's answer, and which answers fill the cache.
//!
//! Served from the cache: a `UID FETCH` of explicit UIDs (at most [`MAX_UIDS`]) asking for
//! `BODY.PEEK[]`, whole or a part of it (`BODY.PEEK[]<0.65536>`, how Thunderbird shows a
//! message in chunks), and otherwise only items that carry no literal (`UID`, `FLAGS`,
//! `RFC822.SIZE`, `INTERNALDATE`): mbsync's and Thunderbird's message downloads. The
//! provider still answers the command without the body: it says which of those messages
//! exist, their sequence numbers and flags, so nothing pecgate says about the folder comes
//! from the cache; only the bytes of the messages do. `BODY[]` without `.PEEK` (which sets
//! `\Seen`) always goes to the provider.
//!
//! Filled from: a provider answer carrying a whole message (`BODY[] {n}` or `RFC822 {n}`, not
//! a partial one) with its UID.

use std::collections::HashMap;
use std::sync::Arc;

use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItemName};
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence};

/// Most messages one command may ask for and still be served from the cache (Thunderbird
/// downloads in chunks well below this).
pub const MAX_UIDS: usize = 500;

/// Bodies read from the cache for one command, by UID.
pub type Bodies = Arc<HashMap<u32, Arc<Vec<u8>>>>;

/// A `UID FETCH` the cache may answer (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyRequest {
    pub uids: Vec<u32>,
    /// `<origin.length>` of a partial fetch.
    pub partial: Option<(u32, u32)>,
}

/// What of a `UID FETCH` the cache may answer (see the module docs), or `None`.
pub fn body_request(body: &CommandBody<'_>) -> Option<BodyRequest> {
    let CommandBody::Fetch {
        sequence_set,
        macro_or_item_names: MacroOrMessageDataItemNames::MessageDataItemNames(items),
        uid: true,
    } = body
    else {
        return None;
    };
    let mut whole = 0;
    let mut part = None;
    for item in items {
        match item {
            MessageDataItemName::BodyExt {
                section: None,
                partial,
                peek: true,
            } => {
                whole += 1;
                part = partial.map(|(origin, length)| (origin, length.get()));
            }
            MessageDataItemName::Uid
            | MessageDataItemName::Flags
            | MessageDataItemName::Rfc822Size
            | MessageDataItemName::InternalDate => {}
            _ => return None,
        }
    }
    if whole != 1 {
        return None;
    }
    let mut uids = Vec::new();
    for sequence in sequence_set.0.as_ref() {
        let (a, b) = match sequence {
            Sequence::Single(SeqOrUid::Value(n)) => (n.get(), n.get()),
            Sequence::Range(SeqOrUid::Value(a), SeqOrUid::Value(b)) => (a.get(), b.get()),
            _ => return None,
        };
        let (low, high) = (a.min(b), a.max(b));
        if (high - low) as usize >= MAX_UIDS || uids.len() + (high - low) as usize >= MAX_UIDS {
            return None;
        }
        uids.extend(low..=high);
    }
    uids.sort_unstable();
    uids.dedup();
    Some(BodyRequest {
        uids,
        partial: part,
    })
}

/// The command the provider gets when the cache has every body: the same items without
/// `BODY.PEEK[]`, with `UID` (a UID FETCH answers it anyway; asked, it is certain).
pub fn without_body(body: &mut CommandBody<'_>) {
    if let CommandBody::Fetch {
        macro_or_item_names: MacroOrMessageDataItemNames::MessageDataItemNames(items),
        ..
    } = body
    {
        items.retain(|item| !matches!(item, MessageDataItemName::BodyExt { .. }));
        if !items.contains(&MessageDataItemName::Uid) {
            items.insert(0, MessageDataItemName::Uid);
        }
    }
}

/// `UID n` in a FETCH answer's line (outside any literal: the line has none here).
pub fn uid_in(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split(|c: char| c.is_ascii_whitespace() || c == '(' || c == ')');
    while let Some(word) = words.next() {
        if word.eq_ignore_ascii_case("UID") {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// One answer with its body from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spliced {
    pub uid: u32,
    pub bytes: Vec<u8>,
    /// Where the literal starts in `bytes` (after the announcement's CRLF).
    pub literal_at: usize,
}

impl Spliced {
    /// The bytes of the message served.
    pub fn literal(&self) -> &[u8] {
        &self.bytes[self.literal_at..self.bytes.len() - 3]
    }
}

/// The provider's answer for one message, `* n FETCH (…)`, with its body from the cache:
/// `* n FETCH (… BODY[] {len}` CRLF, the bytes, `)` CRLF; for a partial fetch
/// `BODY[]<origin> {len}` and the bytes from `origin`, at most `length` of them (none past
/// the end, RFC 3501 §6.4.5). `None` when the line is not such an answer or its UID has no
/// body here (then it is relayed as it came).
pub fn splice(
    line: &[u8],
    bodies: &HashMap<u32, Arc<Vec<u8>>>,
    partial: Option<(u32, u32)>,
) -> Option<Spliced> {
    let text = line.strip_suffix(b"\r\n").unwrap_or(line);
    let head = text.strip_suffix(b")")?;
    if !head.starts_with(b"* ") || head.contains(&b'{') {
        return None;
    }
    let uid = uid_in(head)?;
    let body = bodies.get(&uid)?;
    let (item, served) = match partial {
        None => ("BODY[]".to_owned(), &body[..]),
        Some((origin, length)) => {
            let start = (origin as usize).min(body.len());
            let end = start.saturating_add(length as usize).min(body.len());
            (format!("BODY[]<{origin}>"), &body[start..end])
        }
    };
    let mut out = Vec::with_capacity(head.len() + served.len() + 48);
    out.extend_from_slice(head);
    out.extend_from_slice(format!(" {item} {{{}}}\r\n", served.len()).as_bytes());
    let literal_at = out.len();
    out.extend_from_slice(served);
    out.extend_from_slice(b")\r\n");
    Some(Spliced {
        uid,
        bytes: out,
        literal_at,
    })
}

/// Gathers the whole message a FETCH answer carries, for the cache, as the relay streams it.
#[derive(Debug)]
pub struct BodyCapture {
    max: usize,
    /// The literal being gathered (a whole message that fits).
    current: Option<Vec<u8>>,
    done: Option<Vec<u8>>,
}

impl BodyCapture {
    /// Messages above `max` bytes are not gathered.
    pub fn new(max: usize) -> BodyCapture {
        BodyCapture {
            max,
            current: None,
            done: None,
        }
    }

    /// A line of the answer announcing a literal of `length` bytes (`None`: no literal).
    pub fn line(&mut self, line: &[u8], length: Option<u32>) {
        if let Some(bytes) = self.current.take() {
            self.done = Some(bytes);
        }
        let Some(length) = length else { return };
        let text = line.strip_suffix(b"\r\n").unwrap_or(line);
        let before = match text.iter().rposition(|&b| b == b'{') {
            Some(at) => text[..at].trim_ascii_end(),
            None => return,
        };
        let upper = before.to_ascii_uppercase();
        let whole = upper.ends_with(b" BODY[]")
            || upper.ends_with(b"(BODY[]")
            || upper.ends_with(b" RFC822")
            || upper.ends_with(b"(RFC822");
        if whole && self.done.is_none() && (length as usize) <= self.max {
            self.current = Some(Vec::with_capacity(length as usize));
        }
    }

    pub fn literal(&mut self, bytes: &[u8]) {
        if let Some(current) = &mut self.current {
            current.extend_from_slice(bytes);
        }
    }

    /// The whole message, once the answer has ended.
    pub fn finish(mut self) -> Option<Vec<u8>> {
        self.done.take().or(self.current.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::command::parse_command;

    fn body_of(text: &str) -> CommandBody<'static> {
        parse_command(format!("{text}\r\n").as_bytes())
            .unwrap()
            .body
    }

    #[test]
    fn only_whole_peeked_downloads_of_known_uids_are_served() {
        let served = |text: &str| body_request(&body_of(text));
        let request = |uids: Vec<u32>, partial| Some(BodyRequest { uids, partial });
        assert_eq!(
            served("a UID FETCH 7 (BODY.PEEK[])"),
            request(vec![7], None)
        );
        assert_eq!(
            served("a UID FETCH 3:5,9 (UID RFC822.SIZE FLAGS BODY.PEEK[])"),
            request(vec![3, 4, 5, 9], None)
        );
        assert_eq!(
            served("a UID FETCH 7 (UID RFC822.SIZE BODY.PEEK[]<0.65536>)"),
            request(vec![7], Some((0, 65536)))
        );
        for refused in [
            "a FETCH 7 (BODY.PEEK[])",
            "a UID FETCH 7 (BODY[])",
            "a UID FETCH 7 (BODY[]<0.100>)",
            "a UID FETCH 7 (BODY.PEEK[HEADER])",
            "a UID FETCH 7 (ENVELOPE BODY.PEEK[])",
            "a UID FETCH 7:* (BODY.PEEK[])",
            "a UID FETCH 1:100000 (BODY.PEEK[])",
            "a UID FETCH 7 (FLAGS)",
            "a UID FETCH 7 RFC822",
        ] {
            assert_eq!(served(refused), None, "{refused}");
        }
    }

    #[test]
    fn the_provider_is_asked_the_rest_and_the_body_joins_its_answer() {
        let mut body = body_of("a UID FETCH 3:4 (FLAGS BODY.PEEK[])");
        without_body(&mut body);
        let mut command = parse_command(b"a NOOP\r\n").unwrap();
        command.body = body;
        let steps = crate::imap::provider_client::ProviderClient::new(false).encode(&command);
        let crate::imap::command::UpstreamStep::Send(wire) = &steps[0] else {
            panic!()
        };
        assert_eq!(wire, b"a UID FETCH 3:4 (UID FLAGS)\r\n");
        let bodies = HashMap::from([(3, Arc::new(b"Subject: x\r\n\r\nhi\r\n".to_vec()))]);
        let spliced = splice(b"* 1 FETCH (UID 3 FLAGS (\\Seen))\r\n", &bodies, None).unwrap();
        assert_eq!(spliced.uid, 3);
        assert_eq!(
            spliced.bytes,
            b"* 1 FETCH (UID 3 FLAGS (\\Seen) BODY[] {18}\r\nSubject: x\r\n\r\nhi\r\n)\r\n"
        );
        assert_eq!(spliced.literal(), b"Subject: x\r\n\r\nhi\r\n");
        assert_eq!(
            splice(b"* 2 FETCH (UID 4 FLAGS ())\r\n", &bodies, None),
            None
        );
        assert_eq!(splice(b"* 2 FETCH (FLAGS ())\r\n", &bodies, None), None);
        // Parts: from the origin, at most the length, nothing past the end.
        let part = |partial| splice(b"* 1 FETCH (UID 3)\r\n", &bodies, Some(partial)).unwrap();
        assert_eq!(
            part((0, 7)).bytes,
            b"* 1 FETCH (UID 3 BODY[]<0> {7}\r\nSubject)\r\n"
        );
        assert_eq!(part((14, 100)).literal(), b"hi\r\n");
        assert_eq!(
            part((500, 10)).bytes,
            b"* 1 FETCH (UID 3 BODY[]<500> {0}\r\n)\r\n"
        );
    }

    #[test]
    fn whole_messages_are_captured_and_partial_ones_are_not() {
        let mut capture = BodyCapture::new(100);
        capture.line(b"* 1 FETCH (UID 3 BODY[] {5}\r\n", Some(5));
        capture.literal(b"he");
        capture.literal(b"llo");
        capture.line(b")\r\n", None);
        assert_eq!(capture.finish(), Some(b"hello".to_vec()));
        for (line, length) in [
            (&b"* 1 FETCH (UID 3 BODY[]<0> {5}\r\n"[..], 5),
            (b"* 1 FETCH (UID 3 BODY[HEADER] {5}\r\n", 5),
            (b"* 1 FETCH (UID 3 BODY[] {500}\r\n", 500),
        ] {
            let mut capture = BodyCapture::new(100);
            capture.line(line, Some(length));
            capture.literal(b"hello");
            capture.line(b")\r\n", None);
            assert_eq!(capture.finish(), None, "{}", String::from_utf8_lossy(line));
        }
        let mut capture = BodyCapture::new(100);
        capture.line(b"* 1 FETCH (RFC822 {2}\r\n", Some(2));
        capture.literal(b"hi");
        capture.line(b" UID 3)\r\n", None);
        assert_eq!(capture.finish(), Some(b"hi".to_vec()));
    }
}
