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
//! Responses: [`filter_mailbox_data`] drops LIST/LSUB/STATUS data about hidden folders, shows
//! parents of granted folders as `\Noselect`, and hides children flags that would betray a
//! hidden sub-folder.

use imap_codec::ResponseCodec;
use imap_codec::decode::Decoder;
use imap_codec::encode::Encoder;
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::Atom;
use imap_codec::imap_types::flag::{Flag, FlagNameAttribute};
use imap_codec::imap_types::mailbox::{Mailbox, MailboxOther};
use imap_codec::imap_types::response::{Data, Response};

use crate::config::{Permission, Permissions};
use crate::policy::{FolderPolicy, Visibility, split_name};

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
}

/// How a command uses a mailbox name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NameUse {
    /// Names a folder that must exist: hidden ones answer as nonexistent.
    Existing,
    /// Names a folder to create: decided on the name alone.
    Create,
    /// Acts on the folder and everything below it (DELETE, RENAME's source).
    Subtree,
}

/// The permission a command needs, if any.
pub fn required_permission(body: &CommandBody<'_>) -> Option<Permission> {
    Some(match body {
        CommandBody::Select { .. }
        | CommandBody::Examine { .. }
        | CommandBody::Status { .. }
        | CommandBody::Fetch { .. }
        | CommandBody::Search { .. } => Permission::Read,
        CommandBody::Store { flags, .. } => {
            if flags.iter().any(|f| *f == Flag::Deleted) {
                Permission::Delete
            } else {
                Permission::Flag
            }
        }
        CommandBody::Expunge | CommandBody::ExpungeUid { .. } => Permission::Delete,
        CommandBody::Copy { .. } | CommandBody::Move { .. } => Permission::Move,
        CommandBody::Append { .. } => Permission::Append,
        CommandBody::Create { .. }
        | CommandBody::Delete { .. }
        | CommandBody::Rename { .. }
        | CommandBody::Subscribe { .. }
        | CommandBody::Unsubscribe { .. } => Permission::ManageFolders,
        _ => return None,
    })
}

/// Decide on a parsed command, rewriting it where the decision says so.
pub fn authorize(command: &mut Command<'static>, policy: &SessionPolicy) -> Decision {
    if let Some(permission) = required_permission(&command.body) {
        if !policy.permissions.has(permission) {
            return Decision::DenyPermission(permission);
        }
    }
    if matches!(command.body, CommandBody::Close) && !policy.permissions.has(Permission::Delete) {
        if !policy.provider_unselect {
            return Decision::DenyPermission(Permission::Delete);
        }
        command.body = CommandBody::Unselect;
        return Decision::CloseAsUnselect;
    }
    let mut substitutions = Vec::new();
    for (mailbox, usage) in names_mut(&mut command.body) {
        let wire = wire_name(mailbox);
        let segments = split_name(&wire, policy.delimiter);
        let visibility = segments
            .as_ref()
            .map_or(Visibility::Hidden, |s| policy.folders.visibility(s));
        let shown = display_name(&wire);
        match usage {
            NameUse::Create if visibility != Visibility::Granted => {
                return Decision::DenyName(shown);
            }
            NameUse::Subtree if visibility == Visibility::Granted => {
                let segments = segments.expect("granted names are clean");
                if !subtree_granted(&policy.folders, &segments) {
                    return Decision::DenySubtree(shown);
                }
            }
            NameUse::Existing | NameUse::Subtree if visibility != Visibility::Granted => {
                let placeholder = placeholder_for(&wire, policy.delimiter);
                *mailbox = Mailbox::Other(
                    MailboxOther::try_from(placeholder.clone()).expect("placeholders are atoms"),
                );
                substitutions.push((placeholder, shown));
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

/// Every mailbox name a command carries, with how it is used.
fn names_mut<'b>(body: &'b mut CommandBody<'static>) -> Vec<(&'b mut Mailbox<'static>, NameUse)> {
    match body {
        CommandBody::Select { mailbox, .. }
        | CommandBody::Examine { mailbox, .. }
        | CommandBody::Status { mailbox, .. }
        | CommandBody::Append { mailbox, .. }
        | CommandBody::Copy { mailbox, .. }
        | CommandBody::Move { mailbox, .. }
        | CommandBody::Subscribe { mailbox }
        | CommandBody::Unsubscribe { mailbox } => vec![(mailbox, NameUse::Existing)],
        CommandBody::Delete { mailbox } => vec![(mailbox, NameUse::Subtree)],
        CommandBody::Create { mailbox } => vec![(mailbox, NameUse::Create)],
        CommandBody::Rename { from, to } => {
            vec![(from, NameUse::Subtree), (to, NameUse::Create)]
        }
        _ => Vec::new(),
    }
}

/// The name as the client wrote it on the wire (modified UTF-7).
fn wire_name(mailbox: &Mailbox<'_>) -> Vec<u8> {
    match mailbox {
        Mailbox::Inbox => b"INBOX".to_vec(),
        Mailbox::Other(other) => other.as_ref().to_vec(),
    }
}

/// The name as the provider would print it in a message: decoded when it decodes.
fn display_name(wire: &[u8]) -> String {
    crate::imap::mutf7::decode_canonical(wire)
        .unwrap_or_else(|_| String::from_utf8_lossy(wire).into_owned())
}

/// A name that cannot exist, with the same shape as `wire` (same delimiters, same empty
/// segments), so the provider's syntax checks answer for it exactly as for the original.
fn placeholder_for(wire: &[u8], delimiter: Option<char>) -> String {
    let text = String::from_utf8_lossy(wire);
    let token = || {
        format!(
            "pecgate-none-{:012x}",
            rand::random::<u64>() & 0xffff_ffff_ffff
        )
    };
    match delimiter {
        Some(d) => text
            .split(d)
            .map(|segment| {
                if segment.is_empty() {
                    String::new()
                } else {
                    token()
                }
            })
            .collect::<Vec<_>>()
            .join(&d.to_string()),
        None => token(),
    }
}

/// Whether every folder below `segments` is granted (a pattern ending in `**` covers it).
fn subtree_granted(policy: &FolderPolicy, segments: &[String]) -> bool {
    // A segment no literal pattern can name: NUL never appears in a folder name.
    let probe = "\u{0}".to_owned();
    let mut child = segments.to_vec();
    child.push(probe.clone());
    let mut grandchild = child.clone();
    grandchild.push(probe);
    policy.visibility(&child) == Visibility::Granted
        && policy.visibility(&grandchild) == Visibility::Granted
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

/// Whether a response line starts mailbox data that [`filter_mailbox_data`] must see.
pub fn is_mailbox_data(line: &[u8]) -> bool {
    let upper: Vec<u8> = line.iter().take(10).map(u8::to_ascii_uppercase).collect();
    upper.starts_with(b"* LIST ")
        || upper.starts_with(b"* LSUB ")
        || upper.starts_with(b"* STATUS ")
}

/// What to do with a LIST/LSUB/STATUS response.
#[derive(Debug, PartialEq, Eq)]
pub enum Filtered {
    Pass,
    Replace(Vec<u8>),
    Drop,
}

/// Filter one complete mailbox-data response (literals included). What cannot be parsed is
/// dropped: closed by default.
pub fn filter_mailbox_data(unit: &[u8], policy: &SessionPolicy) -> Filtered {
    let Ok((rest, response)) = ResponseCodec::default().decode(unit) else {
        return Filtered::Drop;
    };
    if !rest.is_empty() {
        return Filtered::Drop;
    }
    let Response::Data(data) = response else {
        return Filtered::Drop;
    };
    match data {
        Data::List {
            items,
            delimiter,
            mailbox,
        } => filter_list(items, delimiter, mailbox, policy, true),
        Data::Lsub {
            items,
            delimiter,
            mailbox,
        } => filter_list(items, delimiter, mailbox, policy, false),
        Data::Status { mailbox, .. } => {
            let wire = wire_name(&mailbox);
            if policy.folders.visibility_of_wire(&wire, policy.delimiter) == Visibility::Granted {
                Filtered::Pass
            } else {
                Filtered::Drop
            }
        }
        _ => Filtered::Drop,
    }
}

fn filter_list(
    items: Vec<FlagNameAttribute<'_>>,
    delimiter: Option<imap_codec::imap_types::core::QuotedChar>,
    mailbox: Mailbox<'_>,
    policy: &SessionPolicy,
    list: bool,
) -> Filtered {
    let wire = wire_name(&mailbox);
    // `LIST "" ""` asks only for the delimiter: the empty name reveals no folder.
    if wire.is_empty() {
        return Filtered::Pass;
    }
    let delim = delimiter.map(|d| d.inner()).or(policy.delimiter);
    let Some(segments) = split_name(&wire, delim) else {
        return Filtered::Drop;
    };
    let is = |attr: &FlagNameAttribute<'_>, name: &str| attr.to_string().eq_ignore_ascii_case(name);
    let (new_items, changed) = match policy.folders.visibility(&segments) {
        Visibility::Hidden => return Filtered::Drop,
        Visibility::Granted => {
            if policy.folders.may_have_granted_descendants(&segments)
                || !items.iter().any(|a| is(a, "\\HasChildren"))
            {
                return Filtered::Pass;
            }
            // Its children are all hidden: \HasChildren would betray them.
            let items: Vec<_> = items
                .into_iter()
                .map(|a| {
                    if is(&a, "\\HasChildren") {
                        attribute("HasNoChildren")
                    } else {
                        a
                    }
                })
                .collect();
            (items, true)
        }
        Visibility::Parent => {
            // Shown only so the client can draw the path to a granted folder: nothing of
            // its own (special-use, marks) shows.
            let mut items = vec![FlagNameAttribute::Noselect];
            if list {
                items.push(attribute("HasChildren"));
            }
            (items, true)
        }
    };
    debug_assert!(changed);
    let data = if list {
        Data::List {
            items: new_items,
            delimiter,
            mailbox,
        }
    } else {
        Data::Lsub {
            items: new_items,
            delimiter,
            mailbox,
        }
    };
    Filtered::Replace(
        ResponseCodec::default()
            .encode(&Response::Data(data))
            .dump(),
    )
}

fn attribute(name: &'static str) -> FlagNameAttribute<'static> {
    FlagNameAttribute::from(Atom::try_from(name).expect("valid atom"))
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
        let cases: &[(&str, Permission)] = &[
            ("a SELECT INBOX", Read),
            ("a EXAMINE INBOX", Read),
            ("a STATUS INBOX (MESSAGES)", Read),
            ("a UID FETCH 1 FLAGS", Read),
            ("a STORE 1 +FLAGS (\\Seen)", Flag),
            ("a STORE 1 +FLAGS (\\Seen \\Deleted)", Delete),
            ("a UID STORE 1 FLAGS (\\Deleted)", Delete),
            ("a EXPUNGE", Delete),
            ("a UID EXPUNGE 1:3", Delete),
            ("a COPY 1 Sent", Move),
            ("a UID MOVE 1 Sent", Move),
            ("a APPEND INBOX {1+}\r\nx", Append),
            ("a CREATE Sent/New", ManageFolders),
            ("a SUBSCRIBE Sent", ManageFolders),
        ];
        for (text, needed) in cases {
            let without: Vec<Permission> = Permission::ALL
                .iter()
                .copied()
                .filter(|p| p != needed)
                .collect();
            let p = policy(&["INBOX", "Sent/**"], &without);
            assert_eq!(
                decide(&p, text).0,
                Decision::DenyPermission(*needed),
                "{text}"
            );
            let p = policy(&["INBOX", "Sent/**"], &[*needed]);
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
        // Shape preserved: a trailing delimiter stays, so syntax errors stay the same.
        let (decision, encoded) = decide(&p, "a SELECT Riservata/");
        let Decision::AsNonexistent { substitutions } = decision else {
            panic!()
        };
        assert!(substitutions[0].0.ends_with('/'), "{substitutions:?}");
        assert!(encoded.contains(&substitutions[0].0));
        assert_eq!(substitutions[0].1, "Riservata/");
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

    #[test]
    fn list_responses() {
        let p = policy(&["INBOX", "Sent", "Archivio/2026/**"], &all());
        let cases: &[(&[u8], Filtered)] = &[
            (b"* LIST (\\HasNoChildren) \"/\" INBOX\r\n", Filtered::Pass),
            (
                b"* LIST (\\HasNoChildren) \"/\" Riservata\r\n",
                Filtered::Drop,
            ),
            (
                b"* LIST (\\HasNoChildren) \"/\" {9}\r\nRiservata\r\n",
                Filtered::Drop,
            ),
            (b"* LSUB () \"/\" Riservata\r\n", Filtered::Drop),
            (b"* STATUS Riservata (MESSAGES 3)\r\n", Filtered::Drop),
            (b"* STATUS Sent (MESSAGES 3)\r\n", Filtered::Pass),
            (
                b"* LIST (\\HasChildren) \"/\" INBOX\r\n",
                Filtered::Replace(b"* LIST (\\HasNoChildren) \"/\" INBOX\r\n".to_vec()),
            ),
            (
                b"* LIST (\\HasChildren \\Archive) \"/\" Archivio\r\n",
                Filtered::Replace(b"* LIST (\\Noselect \\HasChildren) \"/\" Archivio\r\n".to_vec()),
            ),
            (
                b"* LIST (\\HasChildren) \"/\" Archivio/2026\r\n",
                Filtered::Pass,
            ),
            (b"* LIST (\\Noselect) \"/\" \"\"\r\n", Filtered::Pass),
            (b"* LIST garbage\r\n", Filtered::Drop),
        ];
        for (unit, want) in cases {
            assert_eq!(
                filter_mailbox_data(unit, &p),
                *want,
                "{}",
                String::from_utf8_lossy(unit)
            );
        }
    }
}
