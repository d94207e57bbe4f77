//! Responses about folders, answered or filtered by pecgate from the provider's data, free of
//! I/O.
//!
//! LIST and LSUB are answered from the provider's full listing ([`ListRequest`],
//! [`answer_list`]): exactly the visible tree, parents of visible folders as `\Noselect`,
//! children flags computed from the visible tree only. `* STATUS` data about a folder that is
//! not granted is dropped ([`status_visible`]). Matching is linear in pattern × name, so no
//! pattern can stall the daemon; the driver still runs [`answer_list`] off the async runtime,
//! since a listing can hold many folders.

use imap_codec::ResponseCodec;
use imap_codec::decode::Decoder;
use imap_codec::encode::Encoder;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::{Atom, QuotedChar};
use imap_codec::imap_types::flag::FlagNameAttribute;
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox, MailboxOther};
use imap_codec::imap_types::response::{Data, Response};

use crate::imap::authorize::SessionPolicy;
use crate::imap::command::wire_name;
use crate::imap::response::ListEntry;

/// A `* STATUS` response may reach the client only for a granted folder. What cannot be
/// parsed is dropped: closed by default.
pub fn status_visible(unit: &[u8], policy: &SessionPolicy) -> bool {
    match ResponseCodec::default().decode(unit) {
        Ok((&[], Response::Data(Data::Status { mailbox, .. }))) => policy
            .folders
            .grants_wire(&wire_name(&mailbox), policy.delimiter),
        _ => false,
    }
}

/// A client's LIST or LSUB, answered by pecgate from the provider's full listing.
///
/// Filtering the provider's answer to the client's own pattern cannot be airtight: whether a
/// visible folder has children, or whether a parent should show, depends on folders the
/// pattern did not list. So the provider is asked for everything (`LIST "" "*"`), and the
/// answer is computed from the visible part only: nothing hidden can leak through a
/// reference, a wildcard or a children flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    pub lsub: bool,
    /// The reference and the pattern concatenated, as RFC 3501 interprets them.
    pub pattern: Vec<u8>,
}

impl ListRequest {
    /// The LIST/LSUB request in a command, if it is one.
    pub fn of(body: &CommandBody<'_>) -> Option<ListRequest> {
        let (lsub, reference, wildcard) = match body {
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } => (false, reference, mailbox_wildcard),
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => (true, reference, mailbox_wildcard),
            _ => return None,
        };
        let wildcard: &[u8] = match wildcard {
            ListMailbox::Token(token) => token.as_ref(),
            ListMailbox::String(string) => string.as_ref(),
        };
        // An empty mailbox argument asks for the delimiter (and a root, which RFC 3501 lets
        // be empty), whatever the reference: answered like `LIST "" ""`, never as a folder.
        let mut pattern = Vec::new();
        if !wildcard.is_empty() {
            pattern = wire_name(reference);
            pattern.extend_from_slice(wildcard);
        }
        Some(ListRequest {
            lsub,
            pattern: collapse_wildcards(&pattern),
        })
    }

    /// Whether the pattern is longer than any folder name pecgate lists (refused with BAD).
    pub fn too_long(&self) -> bool {
        self.pattern.len() > MAX_LIST_PATTERN
    }

    /// The command sent to the provider instead: everything, under the client's tag.
    pub fn provider_command(&self, tag: &str) -> Vec<u8> {
        let verb = if self.lsub { "LSUB" } else { "LIST" };
        format!("{tag} {verb} \"\" \"*\"\r\n").into_bytes()
    }
}

/// Longest LIST/LSUB pattern (reference included) after collapsing wildcards.
pub const MAX_LIST_PATTERN: usize = 1024;

/// The response lines for `request`, computed from the provider's full listing.
pub fn answer_list(
    request: &ListRequest,
    entries: &[ListEntry],
    policy: &SessionPolicy,
) -> Vec<Vec<u8>> {
    visible_listing(request, entries, policy)
        .iter()
        .filter_map(|entry| encode_list(request.lsub, entry))
        .collect()
}

/// What the user sees for `request`: the visible folders of the provider's full listing that
/// match it, parents of visible folders as `\Noselect`, children flags from the visible tree.
/// (`pecgate check --live` prints the same, so what IT sees is what users get.)
pub fn visible_listing(
    request: &ListRequest,
    entries: &[ListEntry],
    policy: &SessionPolicy,
) -> Vec<ListEntry> {
    let delimiter = policy
        .delimiter
        .or_else(|| entries.iter().find_map(|e| e.delimiter));
    let listed = |wire: &[u8], attributes: Vec<String>| ListEntry {
        wire: wire.to_vec(),
        delimiter,
        attributes,
    };
    if request.pattern.is_empty() {
        // `LIST "" ""` asks for the delimiter only.
        return if request.lsub {
            Vec::new()
        } else {
            vec![listed(b"", vec!["\\Noselect".to_owned()])]
        };
    }
    let is = |attr: &str, name: &str| attr.eq_ignore_ascii_case(name);
    // The visible folders: granted, and for LSUB really subscribed (LSUB's \Noselect marks a
    // name that is only there because something below it is subscribed).
    let visible: Vec<&ListEntry> = entries
        .iter()
        .filter(|e| !(request.lsub && e.attributes.iter().any(|a| is(a, "\\Noselect"))))
        .filter(|e| policy.folders.grants_wire(&e.wire, delimiter))
        .collect();
    // For LSUB: the names the provider has subscribed (not its `\Noselect` placeholders).
    let provider_names: std::collections::HashSet<&[u8]> = entries
        .iter()
        .filter(|e| !e.attributes.iter().any(|a| is(a, "\\Noselect")))
        .map(|e| e.wire.as_slice())
        .collect();
    let visible_names: std::collections::HashSet<&[u8]> =
        visible.iter().map(|e| e.wire.as_slice()).collect();
    let ancestors_of = |wire: &[u8]| -> Vec<Vec<u8>> {
        let Some(d) = delimiter else {
            return Vec::new();
        };
        wire.iter()
            .enumerate()
            .filter(|&(_, &b)| b == d as u8)
            .map(|(i, _)| wire[..i].to_vec())
            .collect()
    };
    // Everything the user's tree holds: visible folders and the parents drawn above them.
    let mut tree: std::collections::HashSet<Vec<u8>> =
        visible_names.iter().map(|n| n.to_vec()).collect();
    for entry in &visible {
        tree.extend(ancestors_of(&entry.wire));
    }
    // Every name that has something below it in the user's tree (one pass, not a scan per entry).
    let parents: std::collections::HashSet<Vec<u8>> =
        tree.iter().flat_map(|name| ancestors_of(name)).collect();
    let has_children = |wire: &[u8]| parents.contains(wire);
    let pattern = normalise_inbox(&request.pattern, delimiter);
    let matches = |wire: &[u8]| list_match(&pattern, &normalise_inbox(wire, delimiter), delimiter);
    // RFC 3501's LSUB rule is about `%`: a parent shows when a `%` stopped at its level above a
    // subscribed child, i.e. when the child would match with `%` reading past the delimiter.
    let percent_as_star: Vec<u8> = collapse_wildcards(
        &pattern
            .iter()
            .map(|&b| if b == b'%' { b'*' } else { b })
            .collect::<Vec<u8>>(),
    );
    let percent_reaches = |wire: &[u8]| {
        pattern.contains(&b'%')
            && list_match(
                &percent_as_star,
                &normalise_inbox(wire, delimiter),
                delimiter,
            )
    };

    let mut out = Vec::new();
    let mut shown: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    for entry in &visible {
        // Parents first, so a client drawing the tree meets them before their children.
        for ancestor in ancestors_of(&entry.wire) {
            if visible_names.contains(ancestor.as_slice()) || shown.contains(&ancestor) {
                continue;
            }
            // Parents of visible folders show as `\Noselect` so the tree can be drawn. LSUB
            // lists subscriptions: a parent shows if it is itself subscribed, or where the
            // pattern stops above a subscribed folder (RFC 3501's `%` rule).
            let shows = matches(&ancestor)
                && (!request.lsub
                    || provider_names.contains(ancestor.as_slice())
                    || (!matches(&entry.wire) && percent_reaches(&entry.wire)));
            if !shows {
                continue;
            }
            let mut attributes = vec!["\\Noselect".to_owned()];
            if !request.lsub {
                attributes.push("\\HasChildren".to_owned());
            }
            out.push(listed(&ancestor, attributes));
            shown.insert(ancestor);
        }
        if !matches(&entry.wire) || shown.contains(&entry.wire) {
            continue;
        }
        let mut attributes: Vec<String> = entry
            .attributes
            .iter()
            .filter(|a| !is(a, "\\HasChildren") && !is(a, "\\HasNoChildren"))
            .cloned()
            .collect();
        if !request.lsub {
            attributes.push(if has_children(&entry.wire) {
                "\\HasChildren".to_owned()
            } else {
                "\\HasNoChildren".to_owned()
            });
        }
        out.push(listed(&entry.wire, attributes));
        shown.insert(entry.wire.clone());
    }
    out
}

/// `INBOX` is case-insensitive, also as the first level of a path: fold it for matching.
fn normalise_inbox(wire: &[u8], delimiter: Option<char>) -> Vec<u8> {
    let mut out = wire.to_vec();
    let prefix_ok = wire.len() >= 5
        && wire[..5].eq_ignore_ascii_case(b"INBOX")
        && (wire.len() == 5 || delimiter.is_some_and(|d| wire[5] == d as u8));
    if prefix_ok {
        out[..5].copy_from_slice(b"INBOX");
    }
    out
}

/// RFC 3501 LIST matching: `*` matches anything, `%` anything but the delimiter.
///
/// A simulation of the pattern as an automaton: time is pattern length × name length, whatever
/// the pattern (a backtracking matcher is exponential in the number of `*`, and one client's
/// `LIST "" "****…"` would stall the daemon). Runs of wildcards are collapsed by
/// [`ListRequest::of`] first.
fn list_match(pattern: &[u8], name: &[u8], delimiter: Option<char>) -> bool {
    let delimiter = delimiter.map(|d| d as u8);
    let wildcard = |b: u8| b == b'*' || b == b'%';
    let n = pattern.len();
    let close = |states: &mut Vec<bool>| {
        for i in 0..n {
            if states[i] && wildcard(pattern[i]) {
                states[i + 1] = true;
            }
        }
    };
    let mut states = vec![false; n + 1];
    states[0] = true;
    close(&mut states);
    let mut next = vec![false; n + 1];
    for &c in name {
        next.iter_mut().for_each(|s| *s = false);
        for i in (0..n).filter(|&i| states[i]) {
            match pattern[i] {
                b'*' => next[i] = true,
                b'%' if Some(c) != delimiter => next[i] = true,
                b'%' => {}
                p if p == c => next[i + 1] = true,
                _ => {}
            }
        }
        close(&mut next);
        std::mem::swap(&mut states, &mut next);
        if !states.iter().any(|&s| s) {
            return false;
        }
    }
    states[n]
}

/// Collapse runs of wildcards: `**`, `*%`, `%*` are `*`; `%%` is `%`. Same meaning, shorter.
fn collapse_wildcards(pattern: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(pattern.len());
    for &b in pattern {
        match (out.last().copied(), b) {
            (Some(b'*'), b'*' | b'%') => {}
            (Some(b'%'), b'*') => *out.last_mut().expect("not empty") = b'*',
            (Some(b'%'), b'%') => {}
            _ => out.push(b),
        }
    }
    out
}

/// The wire form of one listing entry; `None` for what cannot be encoded (never guessed).
fn encode_list(lsub: bool, entry: &ListEntry) -> Option<Vec<u8>> {
    let items = entry
        .attributes
        .iter()
        .map(|text| {
            let atom = Atom::try_from(text.strip_prefix('\\')?.to_owned()).ok()?;
            Some(FlagNameAttribute::from(atom))
        })
        .collect::<Option<Vec<_>>>()?;
    let delimiter = match entry.delimiter {
        Some(d) => Some(QuotedChar::try_from(d).ok()?),
        None => None,
    };
    let mailbox = if entry.wire.is_empty() {
        Mailbox::Other(MailboxOther::try_from(Vec::new()).ok()?)
    } else {
        Mailbox::try_from(entry.wire.clone()).ok()?
    };
    let data = if lsub {
        Data::Lsub {
            items,
            delimiter,
            mailbox,
        }
    } else {
        Data::List {
            items,
            delimiter,
            mailbox,
        }
    };
    Some(
        ResponseCodec::default()
            .encode(&Response::Data(data))
            .dump(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Permission;
    use crate::imap::command::parse_command;
    use crate::policy::FolderPolicy;

    fn policy(patterns: &[&str]) -> SessionPolicy {
        SessionPolicy {
            folders: FolderPolicy::new(patterns),
            permissions: Permission::ALL.iter().copied().collect(),
            delimiter: Some('/'),
            provider_unselect: true,
            max_message_bytes: 1 << 20,
        }
    }

    fn entry(attrs: &str, name: &str) -> ListEntry {
        ListEntry {
            wire: name.as_bytes().to_vec(),
            delimiter: Some('/'),
            attributes: attrs.split_whitespace().map(str::to_owned).collect(),
        }
    }

    fn listing(request: &str, entries: &[ListEntry], policy: &SessionPolicy) -> Vec<String> {
        let command = parse_command(format!("a {request}\r\n").as_bytes()).unwrap();
        let request = ListRequest::of(&command.body).unwrap();
        answer_list(&request, entries, policy)
            .into_iter()
            .map(|l| String::from_utf8(l).unwrap().trim_end().to_owned())
            .collect()
    }

    fn mailbox_folders() -> Vec<ListEntry> {
        vec![
            entry("\\HasChildren", "INBOX"),
            entry("\\HasNoChildren", "INBOX/Personale"),
            entry("\\HasChildren \\Sent", "Sent"),
            entry("\\HasNoChildren", "Sent/Zeta"),
            entry("\\HasChildren", "Ricevute"),
            entry("\\HasNoChildren", "Ricevute/Consegne"),
            entry("\\HasChildren", "Archivio"),
            entry("\\HasChildren", "Archivio/2026"),
            entry("\\HasNoChildren", "Archivio/2026/Legale"),
            entry("\\HasChildren", "Riservata"),
            entry("\\HasNoChildren", "Riservata/Legale"),
        ]
    }

    #[test]
    fn list_shows_exactly_the_visible_tree() {
        let p = policy(&["INBOX", "Sent", "*/Consegne/**", "Archivio/2026/Legale"]);
        let entries = mailbox_folders();
        assert_eq!(
            listing("LIST \"\" *", &entries, &p),
            [
                "* LIST (\\HasNoChildren) \"/\" INBOX",
                "* LIST (\\Sent \\HasNoChildren) \"/\" Sent",
                "* LIST (\\Noselect \\HasChildren) \"/\" Ricevute",
                "* LIST (\\HasNoChildren) \"/\" Ricevute/Consegne",
                "* LIST (\\Noselect \\HasChildren) \"/\" Archivio",
                "* LIST (\\Noselect \\HasChildren) \"/\" Archivio/2026",
                "* LIST (\\HasNoChildren) \"/\" Archivio/2026/Legale",
            ]
        );
        assert_eq!(
            listing("LIST \"\" %", &entries, &p),
            [
                "* LIST (\\HasNoChildren) \"/\" INBOX",
                "* LIST (\\Sent \\HasNoChildren) \"/\" Sent",
                "* LIST (\\Noselect \\HasChildren) \"/\" Ricevute",
                "* LIST (\\Noselect \\HasChildren) \"/\" Archivio",
            ]
        );
        // References and patterns cannot re-root into hidden folders.
        for request in [
            "LIST Riservata/ *",
            "LIST \"\" Riservata/*",
            "LIST Ricevute ../Riservata",
            "LIST \"\" *Legale",
        ] {
            let lines = listing(request, &entries, &p);
            assert!(
                lines.iter().all(|l| !l.contains("Riservata")),
                "{request}: {lines:?}"
            );
        }
        assert_eq!(
            listing("LIST \"\" *Legale", &entries, &p),
            ["* LIST (\\HasNoChildren) \"/\" Archivio/2026/Legale"]
        );
        assert_eq!(
            listing("LIST \"\" inbox", &entries, &p),
            ["* LIST (\\HasNoChildren) \"/\" INBOX"]
        );
        assert_eq!(
            listing("LIST \"\" \"\"", &entries, &p),
            ["* LIST (\\Noselect) \"/\" \"\""]
        );
    }

    #[test]
    fn lsub_shows_only_visible_subscriptions() {
        let p = policy(&["INBOX", "Sent"]);
        // INBOX itself unsubscribed; its hidden child subscribed (LSUB marks INBOX \Noselect).
        let entries = vec![
            entry("\\Noselect", "INBOX"),
            entry("", "INBOX/Personale"),
            entry("", "Sent"),
            entry("", "Riservata"),
        ];
        assert_eq!(
            listing("LSUB \"\" %", &entries, &p),
            ["* LSUB () \"/\" Sent"]
        );
        assert_eq!(
            listing("LSUB \"\" *", &entries, &p),
            ["* LSUB () \"/\" Sent"]
        );
        // A subscribed visible child below an unsubscribed parent: `%` shows the parent.
        let p = policy(&["Ricevute/**"]);
        let entries = vec![entry("", "Ricevute/Consegne")];
        assert_eq!(
            listing("LSUB \"\" %", &entries, &p),
            ["* LSUB (\\Noselect) \"/\" Ricevute"]
        );
        assert_eq!(
            listing("LSUB \"\" *", &entries, &p),
            ["* LSUB () \"/\" Ricevute/Consegne"]
        );
        // Without a `%` there is no such rule: the exact name of the parent lists nothing
        // (as Dovecot answers).
        assert!(listing("LSUB \"\" Ricevute", &entries, &p).is_empty());
        assert_eq!(
            listing("LSUB \"\" Ric%", &entries, &p),
            ["* LSUB (\\Noselect) \"/\" Ricevute"]
        );
        // A subscribed parent that is not granted shows as `\Noselect`, never as itself.
        let p = policy(&["Ricevute/Consegne"]);
        let entries = vec![entry("", "Ricevute"), entry("", "Ricevute/Consegne")];
        assert_eq!(
            listing("LSUB \"\" *", &entries, &p),
            [
                "* LSUB (\\Noselect) \"/\" Ricevute",
                "* LSUB () \"/\" Ricevute/Consegne"
            ]
        );
    }

    #[test]
    fn an_empty_pattern_asks_for_the_delimiter_only() {
        let p = policy(&["Riservata/**"]);
        let entries = mailbox_folders();
        for request in [
            "LIST \"\" \"\"",
            "LIST \"Riservata\" \"\"",
            "LIST Riservata/ \"\"",
        ] {
            assert_eq!(
                listing(request, &entries, &p),
                ["* LIST (\\Noselect) \"/\" \"\""],
                "{request}"
            );
        }
    }

    #[test]
    fn list_wildcards() {
        let d = Some('/');
        assert!(list_match(b"*", b"a/b/c", d));
        assert!(list_match(b"%", b"abc", d));
        assert!(!list_match(b"%", b"a/b", d));
        assert!(list_match(b"a/%", b"a/b", d));
        assert!(!list_match(b"a/%", b"a/b/c", d));
        assert!(list_match(b"a*c", b"a/b/c", d));
        assert!(list_match(b"%/%", b"a/b", d));
        assert!(!list_match(b"a", b"ab", d));
    }

    #[test]
    fn status_of_hidden_folders_is_dropped() {
        let p = policy(&["INBOX", "Sent"]);
        assert!(status_visible(b"* STATUS Sent (MESSAGES 3)\r\n", &p));
        assert!(!status_visible(b"* STATUS Riservata (MESSAGES 3)\r\n", &p));
        assert!(!status_visible(
            b"* STATUS {9}\r\nRiservata (MESSAGES 3)\r\n",
            &p
        ));
        assert!(!status_visible(b"* STATUS garbage\r\n", &p));
    }
}
