//! A session whose sequence numbers differ from its provider connection's. Pure.
//!
//! A session that lent its provider connection to another (see [`super::lend`]) comes back on
//! a connection that selected the folder afresh: messages expunged meanwhile are gone from
//! that connection's numbering, but the client still counts them until it is told, and
//! RFC 3501 §7.4.1 forbids telling it while no command is in progress or while answering a
//! FETCH, STORE or SEARCH by sequence number. Until the next command that allows EXPUNGE,
//! [`Renumbering`] keeps the difference: the client's positions of the messages gone upstream
//! (`gone`), against which
//! - client sequence sets are translated to the provider's (a gone message is skipped);
//! - the provider's `* n FETCH`, `* n EXISTS` and `* SEARCH` are told in the client's numbers,
//!   and a provider EXPUNGE becomes one more gone position instead of reaching the client;
//! - at the next command that allows EXPUNGE, [`Renumbering::flush`] tells the client every
//!   gone message (highest first, so no number shifts under another) and the two numberings
//!   are one again.
//!
//! Messages arrive only above every known one (UIDs ascend with sequence numbers), so new
//! messages never open a difference: the client is told `EXISTS` at once.

use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::Vec1;
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use std::num::NonZeroU32;

use crate::imap::view::Diverged;

/// The client's numbering against its provider connection's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renumbering {
    /// Client sequence numbers, ascending, of messages gone upstream the client was not told.
    gone: Vec<u32>,
    /// Messages in the provider connection's numbering (its last EXISTS, less its EXPUNGEs).
    provider_count: u32,
}

/// What the session does with a command while the numberings differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// EXPUNGE may be told during it: [`Renumbering::flush`] first (its sequence numbers, if
    /// any, are already translated), then it runs in the one numbering left.
    FlushFirst,
    /// SELECT, EXAMINE, CLOSE, UNSELECT: the client's view of the folder ends; nothing to tell.
    Forget,
    /// FETCH, STORE or SEARCH by sequence number: translated; its answers are renumbered
    /// ([`Renumbering::untagged`]). `skipped`: it named messages gone upstream.
    Renumbered { skipped: bool },
    /// Every message it names is gone upstream: the provider has nothing to do.
    NothingLeft,
}

/// What becomes of one untagged provider line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renumbered {
    /// Unchanged (nothing numbered in it).
    Same,
    /// Told in the client's numbers: this first line instead (its literals follow as sent).
    Line(Vec<u8>),
    /// Not told now (an EXPUNGE: the client hears it at the next command that allows it).
    Held,
}

impl Renumbering {
    /// `None` when nothing differs.
    pub fn new(mut gone: Vec<u32>, provider_count: u32) -> Option<Renumbering> {
        gone.sort_unstable();
        gone.dedup();
        (!gone.is_empty()).then_some(Renumbering {
            gone,
            provider_count,
        })
    }

    /// For reading a connection's news while its numbering is still the client's: nothing
    /// differs yet, and the provider's next EXISTS sets the count.
    pub fn aligned() -> Renumbering {
        Renumbering {
            gone: Vec::new(),
            provider_count: 0,
        }
    }

    /// How many messages the client counts.
    pub fn client_count(&self) -> u32 {
        self.provider_count + self.gone.len() as u32
    }

    pub fn gone(&self) -> &[u32] {
        &self.gone
    }

    /// The client's number of the provider's message `provider`.
    pub fn to_client(&self, provider: u32) -> u32 {
        let mut client = provider;
        for &gone in &self.gone {
            if gone <= client {
                client += 1;
            } else {
                break;
            }
        }
        client
    }

    /// The provider's number of the client's message `client`; `None` if it is gone upstream.
    pub fn to_provider(&self, client: u32) -> Option<u32> {
        match self.gone.binary_search(&client) {
            Ok(_) => None,
            Err(below) => Some(client - below as u32),
        }
    }

    /// The provider expunged its message `provider`: one more the client still counts.
    pub fn provider_expunged(&mut self, provider: u32) {
        let client = self.to_client(provider);
        if let Err(at) = self.gone.binary_search(&client) {
            self.gone.insert(at, client);
        }
        self.provider_count = self.provider_count.saturating_sub(1);
    }

    /// The untagged EXPUNGEs that make the client's numbering the provider's.
    pub fn flush(self) -> Vec<u8> {
        let mut out = Vec::new();
        for gone in self.gone.iter().rev() {
            out.extend_from_slice(format!("* {gone} EXPUNGE\r\n").as_bytes());
        }
        out
    }

    /// Rewrite a command's sequence numbers into the provider's, and say how it runs.
    pub fn translate(&self, body: &mut CommandBody<'static>) -> Translation {
        match body {
            CommandBody::Select { .. }
            | CommandBody::Examine { .. }
            | CommandBody::Close
            | CommandBody::Unselect => Translation::Forget,
            CommandBody::Fetch {
                sequence_set,
                uid: false,
                ..
            }
            | CommandBody::Store {
                sequence_set,
                uid: false,
                ..
            } => match self.translate_set(sequence_set) {
                (Some(set), skipped) => {
                    *sequence_set = set;
                    Translation::Renumbered { skipped }
                }
                (None, _) => Translation::NothingLeft,
            },
            CommandBody::Copy {
                sequence_set,
                uid: false,
                ..
            }
            | CommandBody::Move {
                sequence_set,
                uid: false,
                ..
            } => match self.translate_set(sequence_set) {
                (Some(set), _) => {
                    *sequence_set = set;
                    Translation::FlushFirst
                }
                (None, _) => Translation::NothingLeft,
            },
            CommandBody::Search { criteria, uid, .. } => {
                let keys = std::mem::replace(criteria, Vec1::from(SearchKey::All));
                let keys: Vec<_> = keys
                    .into_inner()
                    .into_iter()
                    .map(|key| self.translate_key(key))
                    .collect();
                *criteria = Vec1::try_from(keys).expect("as many keys as before");
                if *uid {
                    Translation::FlushFirst
                } else {
                    Translation::Renumbered { skipped: false }
                }
            }
            _ => Translation::FlushFirst,
        }
    }

    /// A client sequence set in the provider's numbers (`None`: every message it names is
    /// gone), and whether it named a gone one. `*` is the client's last message; numbers
    /// past the client's last stay past the provider's, so the provider refuses them as it
    /// would have.
    fn translate_set(&self, set: &SequenceSet) -> (Option<SequenceSet>, bool) {
        let last = self.client_count();
        let value = |s: &SeqOrUid| match s {
            SeqOrUid::Value(n) => n.get(),
            SeqOrUid::Asterisk => last.max(1),
        };
        let mut out = Vec::new();
        let mut skipped = false;
        for sequence in set.0.as_ref() {
            let (a, b) = match sequence {
                Sequence::Single(s) => (value(s), value(s)),
                Sequence::Range(a, b) => (value(a), value(b)),
            };
            let (low, high) = (a.min(b), a.max(b));
            skipped |= self.gone.iter().any(|g| (low..=high).contains(g));
            let mut first = low;
            while self.gone.binary_search(&first).is_ok() {
                first += 1;
            }
            let mut end = high;
            while end >= first && self.gone.binary_search(&end).is_ok() {
                end -= 1;
            }
            if end < first {
                continue;
            }
            let (Some(from), Some(to)) = (self.to_provider(first), self.to_provider(end)) else {
                unreachable!("both ends are live messages");
            };
            let number = |n: u32| SeqOrUid::Value(NonZeroU32::new(n).expect("at least 1"));
            out.push(if from == to {
                Sequence::Single(number(from))
            } else {
                Sequence::Range(number(from), number(to))
            });
        }
        let set = Vec1::try_from(out).ok().map(SequenceSet);
        (set, skipped)
    }

    /// A search key with its sequence sets in the provider's numbers (one that names only
    /// gone messages matches nothing).
    fn translate_key(&self, key: SearchKey<'static>) -> SearchKey<'static> {
        match key {
            SearchKey::SequenceSet(set) => match self.translate_set(&set) {
                (Some(set), _) => SearchKey::SequenceSet(set),
                (None, _) => SearchKey::Not(Box::new(SearchKey::All)),
            },
            SearchKey::And(keys) => {
                let keys: Vec<_> = keys
                    .into_inner()
                    .into_iter()
                    .map(|k| self.translate_key(k))
                    .collect();
                SearchKey::And(Vec1::try_from(keys).expect("as many keys as before"))
            }
            SearchKey::Not(key) => SearchKey::Not(Box::new(self.translate_key(*key))),
            SearchKey::Or(a, b) => SearchKey::Or(
                Box::new(self.translate_key(*a)),
                Box::new(self.translate_key(*b)),
            ),
            other => other,
        }
    }

    /// One untagged provider line (the first line of its unit) in the client's numbers.
    pub fn untagged(&mut self, line: &[u8]) -> Renumbered {
        let Some(rest) = line.strip_prefix(b"* ") else {
            return Renumbered::Same;
        };
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            let keyword = rest
                .split(|&b| b == b' ' || b == b'\r')
                .next()
                .unwrap_or(b"");
            if keyword.eq_ignore_ascii_case(b"SEARCH") {
                return Renumbered::Line(self.search_line(&rest[keyword.len()..]));
            }
            return Renumbered::Same;
        }
        let Some(number) = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|d| d.parse::<u32>().ok())
        else {
            return Renumbered::Same;
        };
        let after = &rest[digits..];
        let keyword = after
            .strip_prefix(b" ")
            .unwrap_or(after)
            .split(|&b| b == b' ' || b == b'\r' || b == b'\n')
            .next()
            .unwrap_or(b"");
        let told = |n: u32| {
            let mut out = format!("* {n}").into_bytes();
            out.extend_from_slice(after);
            out
        };
        if keyword.eq_ignore_ascii_case(b"FETCH") {
            Renumbered::Line(told(self.to_client(number)))
        } else if keyword.eq_ignore_ascii_case(b"EXISTS") {
            self.provider_count = number;
            Renumbered::Line(told(self.client_count()))
        } else if keyword.eq_ignore_ascii_case(b"EXPUNGE") {
            self.provider_expunged(number);
            Renumbered::Held
        } else {
            Renumbered::Same
        }
    }

    /// `* SEARCH` numbers in the client's numbering (anything else in the line kept).
    fn search_line(&self, rest: &[u8]) -> Vec<u8> {
        let body = rest.strip_suffix(b"\r\n").unwrap_or(rest);
        let mut out = b"* SEARCH".to_vec();
        for word in body.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
            out.push(b' ');
            match std::str::from_utf8(word)
                .ok()
                .and_then(|w| w.parse::<u32>().ok())
            {
                Some(n) => out.extend_from_slice(self.to_client(n).to_string().as_bytes()),
                None => out.extend_from_slice(word),
            }
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// A lent session's messages by its sequence numbers: `Some(uid)`, or `None` for one already
/// gone upstream that the client still counts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Positions(Vec<Option<u32>>);

impl Positions {
    /// From the UIDs the connection being lent numbers (`live`, ascending) and the
    /// difference it already had with the client.
    pub fn new(live: &[u32], renumbering: Option<&Renumbering>) -> Positions {
        let gone = renumbering.map(Renumbering::gone).unwrap_or_default();
        let count = live.len() + gone.len();
        let mut live = live.iter().copied();
        Positions(
            (1..=count as u32)
                .map(|n| {
                    if gone.binary_search(&n).is_ok() {
                        None
                    } else {
                        live.next()
                    }
                })
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The highest UID the client knows (0: none).
    pub fn newest(&self) -> u32 {
        self.0.iter().flatten().copied().max().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Against the folder's UIDs on a fresh connection (`now`, ascending): the difference
    /// left (if any) and the client's new message count when messages arrived.
    pub fn resume(&self, now: &[u32]) -> Result<(Option<Renumbering>, Option<u32>), Diverged> {
        // Ascending, as positions are.
        let live: Vec<u32> = self.0.iter().flatten().copied().collect();
        let known = live.last().copied().unwrap_or(0);
        let mut new = 0u32;
        for &uid in now {
            if uid > known {
                new += 1;
            } else if live.binary_search(&uid).is_err() {
                return Err(Diverged { uid, known });
            }
        }
        let gone = self
            .0
            .iter()
            .enumerate()
            .filter(|(_, uid)| uid.is_none_or(|u| now.binary_search(&u).is_err()))
            .map(|(at, _)| at as u32 + 1)
            .collect();
        let exists = (new > 0).then_some(self.0.len() as u32 + new);
        Ok((Renumbering::new(gone, now.len() as u32), exists))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::command::parse_command;
    use rand::{Rng, SeedableRng};

    fn renumbering(gone: &[u32], provider_count: u32) -> Renumbering {
        Renumbering::new(gone.to_vec(), provider_count).unwrap()
    }

    fn translated(r: &Renumbering, text: &str) -> (String, Translation) {
        let mut command = parse_command(format!("{text}\r\n").as_bytes()).unwrap();
        let translation = r.translate(&mut command.body);
        let steps = crate::imap::provider_client::ProviderClient::new(false).encode(&command);
        let mut wire = Vec::new();
        for step in steps {
            if let crate::imap::command::UpstreamStep::Send(bytes) = step {
                wire.extend(bytes);
            }
        }
        (
            String::from_utf8(wire).unwrap().trim_end().to_owned(),
            translation,
        )
    }

    #[test]
    fn numbers_map_both_ways_around_gone_messages() {
        // Client: 1 live, 2 gone, 3 live, 4 gone, 5 live.
        let r = renumbering(&[2, 4], 3);
        assert_eq!(r.client_count(), 5);
        assert_eq!(
            (1..=3).map(|p| r.to_client(p)).collect::<Vec<_>>(),
            [1, 3, 5]
        );
        assert_eq!(
            (1..=5).map(|c| r.to_provider(c)).collect::<Vec<_>>(),
            [Some(1), None, Some(2), None, Some(3)]
        );
    }

    #[test]
    fn commands_are_translated_and_classed() {
        let r = renumbering(&[2, 4], 3);
        let (wire, how) = translated(&r, "a FETCH 1:* (FLAGS)");
        assert!(wire.ends_with("FETCH 1:3 FLAGS"), "{wire}");
        assert_eq!(how, Translation::Renumbered { skipped: true });
        let (wire, how) = translated(&r, "a STORE 5 +FLAGS (\\Seen)");
        assert!(wire.ends_with("STORE 3 +FLAGS (\\Seen)"), "{wire}");
        assert_eq!(how, Translation::Renumbered { skipped: false });
        assert_eq!(
            translated(&r, "a FETCH 4 FLAGS").1,
            Translation::NothingLeft
        );
        assert_eq!(
            translated(&r, "a COPY 2 Archive").1,
            Translation::NothingLeft
        );
        let (wire, how) = translated(&r, "a COPY 3:4 Archive");
        assert!(wire.ends_with("COPY 2 Archive"), "{wire}");
        assert_eq!(how, Translation::FlushFirst);
        let (wire, _) = translated(&r, "a SEARCH 3:5 UNSEEN NOT 4");
        assert!(wire.ends_with("SEARCH 2:3 UNSEEN NOT NOT ALL"), "{wire}");
        let (wire, how) = translated(&r, "a UID FETCH 1:* FLAGS");
        assert!(wire.ends_with("UID FETCH 1:* FLAGS"), "{wire}");
        assert_eq!(how, Translation::FlushFirst);
        assert_eq!(translated(&r, "a NOOP").1, Translation::FlushFirst);
        assert_eq!(translated(&r, "a SELECT INBOX").1, Translation::Forget);
        // Past the client's last message stays past the provider's: refused as before.
        let (wire, _) = translated(&r, "a FETCH 7 FLAGS");
        assert!(wire.ends_with("FETCH 5 FLAGS"), "{wire}");
    }

    #[test]
    fn answers_are_told_in_the_clients_numbers() {
        let mut r = renumbering(&[2, 4], 3);
        assert_eq!(
            r.untagged(b"* 2 FETCH (UID 9 FLAGS (\\Seen))\r\n"),
            Renumbered::Line(b"* 3 FETCH (UID 9 FLAGS (\\Seen))\r\n".to_vec())
        );
        assert_eq!(
            r.untagged(b"* 3 FETCH (BODY[] {12}\r\n"),
            Renumbered::Line(b"* 5 FETCH (BODY[] {12}\r\n".to_vec())
        );
        assert_eq!(
            r.untagged(b"* SEARCH 1 3\r\n"),
            Renumbered::Line(b"* SEARCH 1 5\r\n".to_vec())
        );
        assert_eq!(r.untagged(b"* 1 RECENT\r\n"), Renumbered::Same);
        assert_eq!(
            r.untagged(b"* 4 EXISTS\r\n"),
            Renumbered::Line(b"* 6 EXISTS\r\n".to_vec())
        );
        // The provider's message 1 goes: the client's 1 joins the gone ones.
        assert_eq!(r.untagged(b"* 1 EXPUNGE\r\n"), Renumbered::Held);
        assert_eq!(r.gone(), [1, 2, 4]);
        assert_eq!(r.client_count(), 6);
        assert_eq!(r.flush(), b"* 4 EXPUNGE\r\n* 2 EXPUNGE\r\n* 1 EXPUNGE\r\n");
    }

    #[test]
    fn a_lent_view_resumes_with_what_went_and_what_came() {
        let positions = Positions::new(&[10, 11, 12, 13], None);
        let (r, exists) = positions.resume(&[10, 12, 14, 15]).unwrap();
        assert_eq!(exists, Some(6));
        let r = r.unwrap();
        assert_eq!(r.gone(), [2, 4]);
        assert_eq!(r.client_count(), 6);
        // Lent again while still different: the gone stay gone.
        let again = Positions::new(&[10, 12, 14, 15], Some(&r));
        assert_eq!(again.len(), 6);
        let (r, exists) = again.resume(&[10, 12, 14, 15]).unwrap();
        assert_eq!((r.unwrap().gone().to_vec(), exists), (vec![2, 4], None));
        assert!(
            positions.resume(&[9, 10]).is_err(),
            "a UID below known ones"
        );
        let (r, exists) = positions.resume(&[10, 11, 12, 13]).unwrap();
        assert_eq!((r, exists), (None, None));
    }

    #[test]
    fn news_on_a_connection_being_lent_becomes_gone_positions() {
        // Dovecot numbers each EXPUNGE after the ones before: 2 then 3 is the client's 2 and 4.
        let mut r = Renumbering::aligned();
        assert_eq!(r.untagged(b"* 2 EXPUNGE\r\n"), Renumbered::Held);
        assert_eq!(r.untagged(b"* 3 EXPUNGE\r\n"), Renumbered::Held);
        assert_eq!(
            r.untagged(b"* 4 EXISTS\r\n"),
            Renumbered::Line(b"* 6 EXISTS\r\n".to_vec())
        );
        let positions = Positions::new(&[1, 3, 5, 6], Some(&r));
        assert_eq!(
            positions,
            Positions(vec![Some(1), None, Some(3), None, Some(5), Some(6)])
        );
        let (r, exists) = positions.resume(&[1, 3, 5, 6]).unwrap();
        assert_eq!((r.unwrap().gone().to_vec(), exists), (vec![2, 4], None));
    }

    /// Random folders and gone sets: translating a client message set and renumbering the
    /// provider's answer names exactly the live messages the client asked for.
    #[test]
    fn translation_agrees_with_a_model() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for _ in 0..2000 {
            let count = rng.gen_range(1..30u32);
            let gone: Vec<u32> = (1..=count).filter(|_| rng.gen_bool(0.3)).collect();
            let Some(r) = Renumbering::new(gone.clone(), count - gone.len() as u32) else {
                continue;
            };
            let a = rng.gen_range(1..=count);
            let b = rng.gen_range(1..=count);
            let asked: Vec<u32> = (a.min(b)..=a.max(b)).collect();
            let set = SequenceSet::try_from(format!("{a}:{b}").as_str()).unwrap();
            let (translated, skipped) = r.translate_set(&set);
            let wanted: Vec<u32> = asked
                .iter()
                .copied()
                .filter(|c| !gone.contains(c))
                .collect();
            assert_eq!(skipped, asked.len() != wanted.len());
            let answered: Vec<u32> = match translated {
                None => Vec::new(),
                Some(set) => set
                    .0
                    .as_ref()
                    .iter()
                    .flat_map(|s| match s {
                        Sequence::Single(SeqOrUid::Value(n)) => n.get()..=n.get(),
                        Sequence::Range(SeqOrUid::Value(x), SeqOrUid::Value(y)) => {
                            x.get()..=y.get()
                        }
                        other => panic!("unexpected {other:?}"),
                    })
                    .map(|p| r.to_client(p))
                    .collect(),
            };
            assert_eq!(
                answered, wanted,
                "count {count} gone {gone:?} asked {a}:{b}"
            );
        }
    }
}
