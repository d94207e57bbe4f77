//! Folder and permission policy applied to IMAP commands and responses, free of I/O.
//!
//! Commands: [`authorize`] decides, for a parsed command, whether it is forwarded as is,
//! refused for a missing permission (`NO [NOPERM]`), or forwarded with a hidden folder's name
//! replaced by a name that cannot exist ([`Decision::AsNonexistent`]). The last one is how a
//! hidden folder is made indistinguishable from a nonexistent one: the provider itself gives
//! its nonexistent-folder answer, with its own code, text and timing, and only the placeholder
//! in that answer is put back to the name the client typed. Commands that would *create* a
//! name (CREATE, RENAME's target) are decided on the name alone, so existence never shows.
//!
//! Responses: LIST and LSUB are answered by pecgate from the provider's full listing
//! ([`ListRequest`], [`answer_list`]): exactly the visible tree, parents of visible folders as
//! `\Noselect`, children flags computed from the visible tree only. `* STATUS` data about a
//! folder that is not granted is dropped ([`status_visible`]).

use imap_codec::ResponseCodec;
use imap_codec::decode::Decoder;
use imap_codec::encode::Encoder;
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::{Atom, QuotedChar};
use imap_codec::imap_types::flag::FlagNameAttribute;
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox, MailboxOther};
use imap_codec::imap_types::response::{Data, Response};

use imap_codec::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItemName, Section};

use crate::config::{Permission, Permissions};
use crate::imap::classify::{NameUse, classify, mailboxes_mut};
use crate::imap::command::wire_name;
use crate::imap::response::ListEntry;
use crate::policy::{FolderPolicy, split_name};

/// Everything the decisions of one session depend on.
#[derive(Debug, Clone)]
pub struct SessionPolicy {
    pub folders: FolderPolicy,
    pub permissions: Permissions,
    /// The provider's hierarchy delimiter (`None`: flat namespace).
    pub delimiter: Option<char>,
    /// Whether the provider offers UNSELECT (needed to close without expunging).
    pub provider_unselect: bool,
}

/// What to do with a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// The command was rewritten: hidden names replaced by placeholders. In the provider's
    /// answer each placeholder is replaced by the client's own name.
    AsNonexistent {
        substitutions: Vec<(String, String)>,
    },
    /// Refuse with `NO [NOPERM]` naming the missing permission.
    DenyPermission(Permission),
    /// Refuse creating (or renaming to) a name the roles do not grant.
    DenyName(String),
    /// Refuse renaming or deleting a folder whose sub-folders the user may not all see
    /// (the provider would act on hidden folders too).
    DenySubtree(String),
    /// CLOSE without `delete`: rewritten to UNSELECT so nothing is expunged.
    CloseAsUnselect,
    /// A name pecgate will not send anywhere (control characters, raw or mUTF-7 encoded):
    /// refused with `BAD` and this text.
    BadName(&'static str),
}

/// Decide on a parsed command, rewriting it where the decision says so.
pub fn authorize(command: &mut Command<'static>, policy: &SessionPolicy) -> Decision {
    let class = classify(&command.body);
    if let Some(&missing) = class
        .permissions
        .iter()
        .find(|&&p| !policy.permissions.has(p))
    {
        return Decision::DenyPermission(missing);
    }
    if matches!(command.body, CommandBody::Close) && !policy.permissions.has(Permission::Delete) {
        if !policy.provider_unselect {
            return Decision::DenyPermission(Permission::Delete);
        }
        command.body = CommandBody::Unselect;
        return Decision::CloseAsUnselect;
    }
    let mut substitutions = Vec::new();
    let is_create = matches!(command.body, CommandBody::Create { .. });
    for (mailbox, &usage) in mailboxes_mut(&mut command.body).into_iter().zip(class.names) {
        let wire = wire_name(mailbox);
        let shown = display_name(&wire);
        if crate::text::has_control(&shown) || crate::text::has_control(&String::from_utf8_lossy(&wire)) {
            return Decision::BadName("Mailbox names with control characters are not accepted");
        }
        // RFC 3501: a trailing delimiter on CREATE declares a folder meant to hold others;
        // the folder is the name without it. (Not for RENAME: there it is no folder name.)
        let decided = match policy.delimiter {
            Some(d) if is_create && wire.len() > 1 && wire.ends_with(&[d as u8]) => {
                &wire[..wire.len() - 1]
            }
            _ => &wire[..],
        };
        let granted = split_name(decided, policy.delimiter)
            .filter(|segments| policy.folders.grants(segments));
        match (usage, granted) {
            (NameUse::Create, None) => return Decision::DenyName(shown),
            (NameUse::Subtree, Some(segments)) if !subtree_granted(&policy.folders, &segments) => {
                return Decision::DenySubtree(shown);
            }
            (NameUse::Existing | NameUse::Subtree, None) => {
                let (placeholder, tokens) = placeholder_for(&wire, policy.delimiter);
                *mailbox = Mailbox::Other(
                    MailboxOther::try_from(placeholder).expect("placeholders are atoms"),
                );
                substitutions.extend(tokens);
            }
            _ => {}
        }
    }
    if substitutions.is_empty() {
        Decision::Allow
    } else {
        Decision::AsNonexistent { substitutions }
    }
}

/// Without `flag`, reading a message must not mark it `\Seen`: every body item of a FETCH
/// becomes its `.PEEK` form. Returns true when `RFC822` or `RFC822.TEXT` were rewritten: their
/// answers come back as `BODY[]` / `BODY[TEXT]` and must be renamed for the client
/// ([`rename_rfc822_items`]).
pub fn force_peek(command: &mut Command<'static>, policy: &SessionPolicy) -> bool {
    if policy.permissions.has(Permission::Flag) {
        return false;
    }
    let CommandBody::Fetch {
        macro_or_item_names: MacroOrMessageDataItemNames::MessageDataItemNames(items),
        ..
    } = &mut command.body
    else {
        return false;
    };
    let mut renamed = false;
    for item in items.iter_mut() {
        match item {
            MessageDataItemName::BodyExt { peek, .. } => *peek = true,
            MessageDataItemName::Rfc822 => {
                *item = MessageDataItemName::BodyExt {
                    section: None,
                    partial: None,
                    peek: true,
                };
                renamed = true;
            }
            MessageDataItemName::Rfc822Text => {
                *item = MessageDataItemName::BodyExt {
                    section: Some(Section::Text(None)),
                    partial: None,
                    peek: true,
                };
                renamed = true;
            }
            _ => {}
        }
    }
    renamed
}

/// In a FETCH response line to a command rewritten by [`force_peek`], give `BODY[]` and
/// `BODY[TEXT]` items back the names the client asked for. Only item names directly followed by
/// a space (`BODY[] {12}` / `BODY[] NIL` / `BODY[] "..."`) are renamed, never text inside a
/// quoted value or a literal (the caller passes line segments, not literals).
pub fn rename_rfc822_items(line: &[u8]) -> Vec<u8> {
    let line = replace_all(line, b" BODY[] ", b" RFC822 ");
    let line = replace_all(&line, b"(BODY[] ", b"(RFC822 ");
    let line = replace_all(&line, b" BODY[TEXT] ", b" RFC822.TEXT ");
    replace_all(&line, b"(BODY[TEXT] ", b"(RFC822.TEXT ")
}

/// The name as the provider would print it in a message: decoded when it decodes.
fn display_name(wire: &[u8]) -> String {
    crate::imap::mutf7::decode_canonical(wire)
        .unwrap_or_else(|_| String::from_utf8_lossy(wire).into_owned())
}

/// A name that cannot exist, with the same shape as `wire` (same delimiters, same empty
/// segments), so the provider's syntax checks answer for it exactly as for the original.
fn placeholder_for(wire: &[u8], delimiter: Option<char>) -> (String, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(wire);
    let segments: Vec<&str> = match delimiter {
        Some(d) => text.split(d).collect(),
        None => vec![&text],
    };
    // Each replaced segment gets its own unique token, put back one by one: the provider may
    // print the name normalised (a trailing delimiter dropped), and every token still maps back.
    let mut tokens = Vec::new();
    let mut placeholder = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        placeholder.push(match *segment {
            "" => String::new(),
            // INBOX always exists: kept as the first level of a longer name, so a provider
            // that keeps every folder under `INBOX.` answers "no such folder" rather than
            // "wrong namespace" (and prints it as `INBOX`, as it would for the real name).
            s if i == 0 && segments.len() > 1 && s.eq_ignore_ascii_case("INBOX") => {
                "INBOX".to_owned()
            }
            s => {
                let token = format!(
                    "pecgate-none-{:012x}",
                    rand::random::<u64>() & 0xffff_ffff_ffff
                );
                tokens.push((token.clone(), display_name(s.as_bytes())));
                token
            }
        });
    }
    let joined = match delimiter {
        Some(d) => placeholder.join(&d.to_string()),
        None => placeholder.concat(),
    };
    (joined, tokens)
}

/// Whether every folder below `segments` is granted (a pattern ending in `**` covers it).
fn subtree_granted(policy: &FolderPolicy, segments: &[String]) -> bool {
    // A segment no literal pattern can name: NUL never appears in a folder name.
    let probe = "\u{0}".to_owned();
    let mut child = segments.to_vec();
    child.push(probe.clone());
    let mut grandchild = child.clone();
    grandchild.push(probe);
    policy.grants(&child) && policy.grants(&grandchild)
}

/// Put the client's names back in place of placeholders in a provider answer.
pub fn substitute(line: &[u8], substitutions: &[(String, String)]) -> Vec<u8> {
    let mut text = line.to_vec();
    for (placeholder, original) in substitutions {
        text = replace_all(&text, placeholder.as_bytes(), original.as_bytes());
    }
    text
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// Whether a response line starts mailbox data (LIST, LSUB, STATUS) that the relay must
/// not pass through unexamined.
pub fn is_mailbox_data(line: &[u8]) -> bool {
    let upper: Vec<u8> = line.iter().take(10).map(u8::to_ascii_uppercase).collect();
    upper.starts_with(b"* LIST ")
        || upper.starts_with(b"* LSUB ")
        || upper.starts_with(b"* STATUS ")
}

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
        let mut pattern = wire_name(reference);
        pattern.extend_from_slice(match wildcard {
            ListMailbox::Token(token) => token.as_ref(),
            ListMailbox::String(string) => string.as_ref(),
        });
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
            && list_match(&percent_as_star, &normalise_inbox(wire, delimiter), delimiter)
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
    use crate::imap::command::parse_command;

    fn policy(patterns: &[&str], permissions: &[Permission]) -> SessionPolicy {
        SessionPolicy {
            folders: FolderPolicy::new(patterns),
            permissions: permissions.iter().copied().collect(),
            delimiter: Some('/'),
            provider_unselect: true,
        }
    }

    fn all() -> Vec<Permission> {
        Permission::ALL.to_vec()
    }

    fn decide(policy: &SessionPolicy, text: &str) -> (Decision, String) {
        let mut command = parse_command(format!("{text}\r\n").as_bytes()).unwrap();
        let decision = authorize(&mut command, policy);
        let encoded = imap_codec::CommandCodec::default().encode(&command).dump();
        (decision, String::from_utf8(encoded).unwrap())
    }

    #[test]
    fn permissions_table() {
        use Permission::*;
        // Each command, and every permission it needs: without any one of them it is
        // refused naming that one; with exactly those it is allowed.
        let cases: &[(&str, &[Permission])] = &[
            ("a SELECT INBOX", &[Read]),
            ("a EXAMINE INBOX", &[Read]),
            ("a STATUS INBOX (MESSAGES)", &[Read]),
            ("a UID FETCH 1 FLAGS", &[Read]),
            ("a STORE 1 +FLAGS (\\Seen)", &[Flag]),
            ("a STORE 1 +FLAGS (\\Seen \\Deleted)", &[Flag, Delete]),
            ("a UID STORE 1 +FLAGS (\\Deleted)", &[Delete]),
            ("a UID STORE 1 FLAGS (\\Deleted)", &[Flag, Delete]),
            ("a STORE 1 FLAGS (\\Seen)", &[Flag, Delete]),
            ("a EXPUNGE", &[Delete]),
            ("a UID EXPUNGE 1:3", &[Delete]),
            ("a COPY 1 Sent", &[Move]),
            ("a UID MOVE 1 Sent", &[Move, Delete]),
            ("a APPEND INBOX {1+}\r\nx", &[Append]),
            ("a CREATE Sent/New", &[ManageFolders]),
            ("a DELETE Sent/Old", &[ManageFolders, Delete]),
            ("a SUBSCRIBE Sent", &[ManageFolders]),
        ];
        for (text, needed) in cases {
            for missing in *needed {
                let without: Vec<Permission> = Permission::ALL
                    .iter()
                    .copied()
                    .filter(|p| p != missing)
                    .collect();
                let p = policy(&["INBOX", "Sent/**"], &without);
                assert_eq!(
                    decide(&p, text).0,
                    Decision::DenyPermission(*missing),
                    "{text}"
                );
            }
            let p = policy(&["INBOX", "Sent/**"], needed);
            assert_eq!(decide(&p, text).0, Decision::Allow, "{text}");
        }
        // No permission needed to list or idle.
        let none = policy(&["INBOX"], &[]);
        assert_eq!(decide(&none, "a LIST \"\" *").0, Decision::Allow);
        assert_eq!(decide(&none, "a IDLE").0, Decision::Allow);
    }

    #[test]
    fn close_without_delete_never_expunges() {
        let p = policy(&["INBOX"], &[Permission::Read]);
        let (decision, encoded) = decide(&p, "a CLOSE");
        assert_eq!(decision, Decision::CloseAsUnselect);
        assert_eq!(encoded, "a UNSELECT\r\n");
        let p = policy(&["INBOX"], &[Permission::Read, Permission::Delete]);
        assert_eq!(decide(&p, "a CLOSE").1, "a CLOSE\r\n");
        let mut p = policy(&["INBOX"], &[Permission::Read]);
        p.provider_unselect = false;
        assert_eq!(
            decide(&p, "a CLOSE").0,
            Decision::DenyPermission(Permission::Delete)
        );
    }

    #[test]
    fn hidden_names_become_placeholders() {
        let p = policy(&["INBOX", "Sent"], &all());
        for text in [
            "a SELECT Riservata",
            "a EXAMINE \"Riservata\"",
            "a SELECT {9+}\r\nRiservata",
            "a STATUS Riservata (MESSAGES)",
            "a COPY 1 Riservata",
            "a UID MOVE 1 Riservata",
            "a SUBSCRIBE Riservata",
            "a UNSUBSCRIBE Riservata",
            "a APPEND Riservata {1+}\r\nx",
            "a SELECT sent",
            "a SELECT Sent/",
            "a SELECT &AFM-ent",
        ] {
            let (decision, encoded) = decide(&p, text);
            let Decision::AsNonexistent { substitutions } = decision else {
                panic!("{text}: {decision:?}")
            };
            assert_eq!(substitutions.len(), 1);
            assert!(encoded.contains(&substitutions[0].0), "{encoded}");
            assert!(!encoded.contains("Riservata"), "{encoded}");
        }
        // Shape preserved: a trailing delimiter stays, so syntax errors stay the same; each
        // segment has its own token, so a provider that prints the name without the trailing
        // delimiter still gets the client's name back.
        let (decision, encoded) = decide(&p, "a SELECT Riservata/");
        let Decision::AsNonexistent { substitutions } = decision else {
            panic!()
        };
        assert_eq!(substitutions.len(), 1, "{substitutions:?}");
        assert!(encoded.contains(&format!("{}/", substitutions[0].0)), "{encoded}");
        assert_eq!(substitutions[0].1, "Riservata");
        let reply = format!("a NO Mailbox doesn't exist: {}\r\n", substitutions[0].0);
        assert_eq!(
            substitute(reply.as_bytes(), &substitutions),
            b"a NO Mailbox doesn't exist: Riservata\r\n"
        );
        // On a provider that keeps every folder under `INBOX.`, the INBOX level stays.
        let aruba = SessionPolicy {
            delimiter: Some('.'),
            ..policy(&["INBOX", "INBOX/Sent"], &all())
        };
        let (decision, encoded) = decide(&aruba, "a SELECT inbox.Riservata.Legale");
        let Decision::AsNonexistent { substitutions } = decision else {
            panic!()
        };
        assert_eq!(substitutions.len(), 2);
        assert!(encoded.starts_with("a SELECT INBOX.pecgate-none-"), "{encoded}");
        // Granted names go through untouched.
        assert_eq!(
            decide(&p, "a SELECT inbox"),
            (Decision::Allow, "a SELECT INBOX\r\n".into())
        );
        assert_eq!(decide(&p, "a SELECT Sent").0, Decision::Allow);
    }

    #[test]
    fn creating_and_renaming() {
        let p = policy(&["INBOX", "Progetti/**", "Sent"], &all());
        assert_eq!(decide(&p, "a CREATE Progetti/Nuovo").0, Decision::Allow);
        assert_eq!(
            decide(&p, "a CREATE Riservata/X").0,
            Decision::DenyName("Riservata/X".into())
        );
        assert_eq!(
            decide(&p, "a RENAME Progetti/A Riservata").0,
            Decision::DenyName("Riservata".into())
        );
        assert_eq!(
            decide(&p, "a RENAME Progetti/A Progetti/B").0,
            Decision::Allow
        );
        // A trailing delimiter is CREATE's alone: as a RENAME target it is no clean name.
        assert_eq!(decide(&p, "a CREATE Progetti/Nuovo/").0, Decision::Allow);
        assert_eq!(
            decide(&p, "a RENAME Progetti/A Progetti/").0,
            Decision::DenyName("Progetti/".into())
        );
        // Sent may have hidden sub-folders: deleting or renaming it would touch them.
        assert_eq!(
            decide(&p, "a DELETE Sent").0,
            Decision::DenySubtree("Sent".into())
        );
        assert_eq!(decide(&p, "a DELETE Progetti/A").0, Decision::Allow);
        // A hidden source answers as nonexistent.
        assert!(matches!(
            decide(&p, "a RENAME Riservata Progetti/X").0,
            Decision::AsNonexistent { .. }
        ));
        assert!(matches!(
            decide(&p, "a DELETE Riservata").0,
            Decision::AsNonexistent { .. }
        ));
    }

    #[test]
    fn substitution_restores_the_clients_name() {
        let subs = vec![("pecgate-none-1".to_owned(), "Riservata".to_owned())];
        assert_eq!(
            substitute(
                b"a NO Mailbox doesn't exist: pecgate-none-1 (0.001 secs)\r\n",
                &subs
            ),
            b"a NO Mailbox doesn't exist: Riservata (0.001 secs)\r\n"
        );
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
        let p = policy(
            &["INBOX", "Sent", "*/Consegne/**", "Archivio/2026/Legale"],
            &all(),
        );
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
        let p = policy(&["INBOX", "Sent"], &all());
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
        let p = policy(&["Ricevute/**"], &all());
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
        let p = policy(&["Ricevute/Consegne"], &all());
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
        let p = policy(&["INBOX", "Sent"], &all());
        assert!(status_visible(b"* STATUS Sent (MESSAGES 3)\r\n", &p));
        assert!(!status_visible(b"* STATUS Riservata (MESSAGES 3)\r\n", &p));
        assert!(!status_visible(
            b"* STATUS {9}\r\nRiservata (MESSAGES 3)\r\n",
            &p
        ));
        assert!(!status_visible(b"* STATUS garbage\r\n", &p));
    }
}
