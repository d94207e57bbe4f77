//! One client session's view of its selected folder while it is parked in IDLE (it holds no
//! provider connection then): the UIDs it knows, in its sequence order, and the untagged
//! responses that bring it up to date, in its own numbering. Pure; fed by the folder watcher's
//! events and by the UID lists pecgate reads when it parks and re-attaches a session.
//!
//! The rules it keeps (RFC 3501 §7.4.1, §5.2, §2.3.1.1): UIDs ascend with sequence numbers;
//! each EXPUNGE renumbers the messages after it at once, so each is told against the view as
//! it stands after the ones before; EXISTS never goes down; a message is told as new only
//! with a UID above every UID the session knows. Everything sent here is sent while the
//! client's IDLE is in progress, where EXPUNGE is allowed.
//!
//! [`news`] decodes (with imap-codec) the provider responses the folder watcher and the
//! parking session read: EXPUNGE, EXISTS, FETCH FLAGS, FLAGS, SEARCH, UIDVALIDITY.

use imap_codec::ResponseCodec;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::response::{Code, Data, Response, Status, StatusKind};
use imap_codec::imap_types::status::StatusDataItem;

/// What one untagged provider response says about the selected folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum News {
    Expunge(u32),
    Exists(u32),
    /// `* N FETCH (... FLAGS (...) ...)`: the flags as written, `\Recent` left out (which
    /// connection saw a message first says nothing to a client).
    Flags {
        seq: u32,
        flags: String,
    },
    /// `* FLAGS (...)`, the whole line.
    FlagList(Vec<u8>),
    Search(Vec<u32>),
    /// `* OK [UIDVALIDITY n]`, or a STATUS answer carrying UIDVALIDITY.
    UidValidity(u32),
    /// `* NO ...` / `* BAD ...` out of turn: something is wrong with the folder.
    Trouble,
    Other,
}

/// Decode one untagged response unit (a line and its literals).
pub fn news(unit: &[u8]) -> News {
    let Ok((_, response)) = ResponseCodec::default().decode(unit) else {
        return News::Other;
    };
    match response {
        Response::Data(Data::Expunge(n)) => News::Expunge(n.get()),
        Response::Data(Data::Exists(n)) => News::Exists(n),
        Response::Data(Data::Fetch { seq, .. }) => match raw_flags(unit) {
            Some(flags) => News::Flags {
                seq: seq.get(),
                flags,
            },
            None => News::Other,
        },
        Response::Data(Data::Flags(_)) => News::FlagList(unit.to_vec()),
        Response::Data(Data::Search(uids, ..)) => {
            News::Search(uids.iter().map(|u| u.get()).collect())
        }
        Response::Data(Data::Status { items, .. }) => items
            .iter()
            .find_map(|item| match item {
                StatusDataItem::UidValidity(v) => Some(News::UidValidity(v.get())),
                _ => None,
            })
            .unwrap_or(News::Other),
        Response::Status(Status::Untagged(body)) => match body.code {
            Some(Code::UidValidity(v)) => News::UidValidity(v.get()),
            _ if matches!(body.kind, StatusKind::No | StatusKind::Bad) => News::Trouble,
            _ => News::Other,
        },
        _ => News::Other,
    }
}

/// The flag list of a FETCH response as the provider wrote it (flags are atoms: no
/// parentheses inside), without `\Recent`.
fn raw_flags(unit: &[u8]) -> Option<String> {
    let upper = unit.to_ascii_uppercase();
    let start = upper.windows(7).position(|w| w == b"FLAGS (")? + 7;
    let end = start + unit[start..].iter().position(|&b| b == b')')?;
    let text = std::str::from_utf8(&unit[start..end]).ok()?;
    Some(
        text.split_ascii_whitespace()
            .filter(|flag| !flag.eq_ignore_ascii_case("\\Recent"))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// A change in the shared folder, in UIDs (the watcher's own sequence numbers never leave it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FolderEvent {
    /// Messages gone from the folder.
    Expunged(Vec<u32>),
    /// New messages, in ascending UID order.
    Arrived(Vec<u32>),
    /// A message's flags, as the provider wrote the list (`\Seen $Label1`).
    Flags { uid: u32, flags: String },
    /// The folder's `* FLAGS (...)` line changed (a new keyword), as the provider sent it.
    Keywords(Vec<u8>),
}

/// The view could not follow: a UID appeared below ones it knows (the folder was rebuilt).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the folder's UIDs no longer extend the session's view (UID {uid} below {known})")]
pub struct Diverged {
    pub uid: u32,
    pub known: u32,
}

/// What went from `known` and what is new in `now` (both ascending).
pub fn changes(known: &[u32], now: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let gone = known
        .iter()
        .copied()
        .filter(|u| now.binary_search(u).is_err())
        .collect();
    let new = now
        .iter()
        .copied()
        .filter(|u| known.binary_search(u).is_err())
        .collect();
    (gone, new)
}

/// A parked session's UIDs, in its sequence order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct View {
    uids: Vec<u32>,
}

impl View {
    /// A view from a `UID SEARCH ALL` answer (any order; duplicates ignored).
    pub fn new(mut uids: Vec<u32>) -> View {
        uids.sort_unstable();
        uids.dedup();
        View { uids }
    }

    pub fn len(&self) -> usize {
        self.uids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.uids.is_empty()
    }

    pub fn uids(&self) -> &[u32] {
        &self.uids
    }

    /// The untagged responses that tell the session about `event`; the view follows them.
    pub fn apply(&mut self, event: &FolderEvent) -> Result<Vec<u8>, Diverged> {
        let mut out = Vec::new();
        match event {
            FolderEvent::Expunged(gone) => {
                for uid in gone {
                    self.expunge(*uid, &mut out);
                }
            }
            FolderEvent::Arrived(new) => self.arrive(new, &mut out)?,
            FolderEvent::Flags { uid, flags } => {
                if let Ok(at) = self.uids.binary_search(uid) {
                    out.extend_from_slice(
                        format!("* {} FETCH (FLAGS ({flags}))\r\n", at + 1).as_bytes(),
                    );
                }
            }
            FolderEvent::Keywords(line) => {
                out.extend_from_slice(line);
                if !line.ends_with(b"\n") {
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        Ok(out)
    }

    /// Bring the view to `current` (the folder's UIDs as read now): EXPUNGE for what is gone,
    /// EXISTS for what is new.
    pub fn reconcile(&mut self, current: &[u32]) -> Result<Vec<u8>, Diverged> {
        let mut current = current.to_vec();
        current.sort_unstable();
        current.dedup();
        let (gone, new) = changes(&self.uids, &current);
        let mut out = Vec::new();
        for uid in gone {
            self.expunge(uid, &mut out);
        }
        self.arrive(&new, &mut out)?;
        Ok(out)
    }

    fn expunge(&mut self, uid: u32, out: &mut Vec<u8>) {
        if let Ok(at) = self.uids.binary_search(&uid) {
            self.uids.remove(at);
            out.extend_from_slice(format!("* {} EXPUNGE\r\n", at + 1).as_bytes());
        }
    }

    fn arrive(&mut self, new: &[u32], out: &mut Vec<u8>) -> Result<(), Diverged> {
        let before = self.uids.len();
        for &uid in new {
            match self.uids.last() {
                Some(&last) if uid == last => {}
                Some(&last) if uid < last => {
                    if self.uids.binary_search(&uid).is_err() {
                        return Err(Diverged { uid, known: last });
                    }
                }
                _ => self.uids.push(uid),
            }
        }
        if self.uids.len() > before {
            out.extend_from_slice(format!("* {} EXISTS\r\n", self.uids.len()).as_bytes());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn expunges_are_told_in_the_views_own_numbering_as_it_shrinks() {
        let mut view = View::new(vec![10, 20, 30, 40]);
        let out = view
            .apply(&FolderEvent::Expunged(vec![20, 40, 99]))
            .unwrap();
        // 20 is message 2; then 40 is message 3 of the view that is left.
        assert_eq!(text(out), "* 2 EXPUNGE\r\n* 3 EXPUNGE\r\n");
        assert_eq!(view.uids(), [10, 30]);
    }

    #[test]
    fn arrivals_grow_the_count_once_and_never_below_known_uids() {
        let mut view = View::new(vec![5, 7]);
        let out = view.apply(&FolderEvent::Arrived(vec![7, 8, 9])).unwrap();
        assert_eq!(text(out), "* 4 EXISTS\r\n");
        assert_eq!(view.apply(&FolderEvent::Arrived(vec![9])).unwrap(), b"");
        assert_eq!(
            view.apply(&FolderEvent::Arrived(vec![6])),
            Err(Diverged { uid: 6, known: 9 })
        );
    }

    #[test]
    fn flags_are_told_for_known_messages_only() {
        let mut view = View::new(vec![3, 4]);
        let flags = |uid| FolderEvent::Flags {
            uid,
            flags: "\\Seen".into(),
        };
        assert_eq!(
            text(view.apply(&flags(4)).unwrap()),
            "* 2 FETCH (FLAGS (\\Seen))\r\n"
        );
        assert_eq!(view.apply(&flags(5)).unwrap(), b"");
    }

    #[test]
    fn reconcile_tells_what_changed_and_leaves_the_view_equal() {
        let mut view = View::new(vec![1, 2, 3, 5]);
        let out = view.reconcile(&[2, 5, 6, 7]).unwrap();
        assert_eq!(text(out), "* 1 EXPUNGE\r\n* 2 EXPUNGE\r\n* 4 EXISTS\r\n");
        assert_eq!(view.uids(), [2, 5, 6, 7]);
        assert_eq!(view.reconcile(&[2, 5, 6, 7]).unwrap(), b"");
        assert!(view.reconcile(&[1, 2, 5, 6, 7]).is_err());
    }

    #[test]
    fn provider_news_is_decoded() {
        assert_eq!(news(b"* 3 EXPUNGE\r\n"), News::Expunge(3));
        assert_eq!(news(b"* 7 EXISTS\r\n"), News::Exists(7));
        assert_eq!(
            news(b"* 2 FETCH (UID 9 FLAGS (\\Seen \\Recent $Label1))\r\n"),
            News::Flags {
                seq: 2,
                flags: "\\Seen $Label1".into()
            }
        );
        assert_eq!(
            news(b"* 2 FETCH (FLAGS ())\r\n"),
            News::Flags {
                seq: 2,
                flags: String::new()
            }
        );
        assert_eq!(news(b"* 2 FETCH (UID 9)\r\n"), News::Other);
        assert_eq!(news(b"* SEARCH 4 9 12\r\n"), News::Search(vec![4, 9, 12]));
        assert_eq!(news(b"* SEARCH\r\n"), News::Search(vec![]));
        assert_eq!(
            news(b"* OK [UIDVALIDITY 1700000000] UIDs valid\r\n"),
            News::UidValidity(1_700_000_000)
        );
        assert!(matches!(
            news(b"* FLAGS (\\Seen $X)\r\n"),
            News::FlagList(_)
        ));
        assert_eq!(news(b"* 1 RECENT\r\n"), News::Other);
        assert_eq!(
            news(b"* STATUS \"Ricevute\" (UIDVALIDITY 42 MESSAGES 3)\r\n"),
            News::UidValidity(42)
        );
        assert_eq!(news(b"* NO Internal error occurred.\r\n"), News::Trouble);
        assert_eq!(news(b"garbage\r\n"), News::Other);
    }

    /// A client's model built only from what the view told it stays equal to the view, over
    /// random event streams (a small deterministic generator: no dependency).
    #[test]
    fn a_client_following_the_responses_always_matches() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let mut folder: Vec<u32> = (1..=next(20) as u32).collect();
            let mut next_uid = folder.len() as u32 + 1;
            let mut view = View::new(folder.clone());
            // The client's own list: message n is client[n - 1].
            let mut client: Vec<Option<u32>> = folder.iter().map(|u| Some(*u)).collect();
            for _ in 0..50 {
                let event = match next(3) {
                    0 if !folder.is_empty() => {
                        let k = 1 + next(3) as usize;
                        let gone: Vec<u32> = (0..k)
                            .filter_map(|_| folder.get(next(folder.len() as u64) as usize).copied())
                            .collect();
                        folder.retain(|u| !gone.contains(u));
                        FolderEvent::Expunged(gone)
                    }
                    1 => {
                        let new: Vec<u32> = (0..1 + next(3) as u32).map(|i| next_uid + i).collect();
                        next_uid += new.len() as u32;
                        folder.extend(&new);
                        FolderEvent::Arrived(new)
                    }
                    _ => {
                        // A reconcile against the truth, as at re-attachment.
                        let out = view.reconcile(&folder).unwrap();
                        follow(&mut client, &out);
                        assert_eq!(view.uids(), folder.as_slice());
                        continue;
                    }
                };
                let out = view.apply(&event).unwrap();
                follow(&mut client, &out);
                assert_eq!(view.uids(), folder.as_slice());
                assert_eq!(client.len(), folder.len(), "the client's count");
            }
        }
    }

    /// What a client does with EXPUNGE and EXISTS lines.
    fn follow(client: &mut Vec<Option<u32>>, out: &[u8]) {
        for line in String::from_utf8_lossy(out).lines() {
            let words: Vec<&str> = line.split(' ').collect();
            let n: usize = words[1].parse().unwrap();
            match words[2] {
                "EXPUNGE" => {
                    assert!(
                        n >= 1 && n <= client.len(),
                        "EXPUNGE {n} of {}",
                        client.len()
                    );
                    client.remove(n - 1);
                }
                "EXISTS" => {
                    assert!(n >= client.len(), "EXISTS went down");
                    client.resize(n, None);
                }
                other => panic!("unexpected {other}"),
            }
        }
    }
}
