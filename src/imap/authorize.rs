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
//! Responses about folders (LIST, LSUB, STATUS) are decided in [`super::listing`].

use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::mailbox::{Mailbox, MailboxOther};

use imap_codec::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItemName, Section};

use crate::config::{Permission, Permissions};
use crate::imap::classify::{NameUse, classify, mailboxes_mut};
use crate::imap::command::wire_name;
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
    /// The largest APPEND accepted (the mailbox's `max_message_bytes`).
    pub max_message_bytes: u64,
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
    for (mailbox, &usage) in mailboxes_mut(&mut command.body)
        .into_iter()
        .zip(class.names)
    {
        let wire = wire_name(mailbox);
        let shown = display_name(&wire);
        if crate::text::has_control(&shown)
            || crate::text::has_control(&String::from_utf8_lossy(&wire))
        {
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

/// Without `flag`, reading a message must not mark it `\\Seen`: every body item of a FETCH
/// becomes its `.PEEK` form (`RFC822` → `BODY.PEEK[]`, `RFC822.TEXT` → `BODY.PEEK[TEXT]`;
/// [`renames_rfc822`] says beforehand whether the answers must get those names back).
pub fn force_peek(command: &mut Command<'static>, policy: &SessionPolicy) {
    if policy.permissions.has(Permission::Flag) {
        return;
    }
    let CommandBody::Fetch {
        macro_or_item_names: MacroOrMessageDataItemNames::MessageDataItemNames(items),
        ..
    } = &mut command.body
    else {
        return;
    };
    for item in items.iter_mut() {
        let section = match item {
            MessageDataItemName::BodyExt { peek, .. } => {
                *peek = true;
                continue;
            }
            MessageDataItemName::Rfc822 => None,
            MessageDataItemName::Rfc822Text => Some(Section::Text(None)),
            _ => continue,
        };
        *item = MessageDataItemName::BodyExt {
            section,
            partial: None,
            peek: true,
        };
    }
}

/// Whether [`force_peek`] will rewrite `RFC822` or `RFC822.TEXT` items of `command`: their
/// answers then come back as `BODY[]` / `BODY[TEXT]` and must be renamed for the client
/// ([`rename_rfc822_items`]).
pub fn renames_rfc822(command: &Command<'_>, policy: &SessionPolicy) -> bool {
    !policy.permissions.has(Permission::Flag)
        && matches!(
            &command.body,
            CommandBody::Fetch {
                macro_or_item_names: MacroOrMessageDataItemNames::MessageDataItemNames(items),
                ..
            } if items.iter().any(|i| matches!(
                i,
                MessageDataItemName::Rfc822 | MessageDataItemName::Rfc822Text
            ))
        )
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
    if tokens.is_empty() {
        // Only INBOX and empty segments (`INBOX/`): kept as they are, the name would still
        // reach INBOX on a provider that normalises it. Closed by default: the last segment
        // becomes a token too.
        let token = format!(
            "pecgate-none-{:012x}",
            rand::random::<u64>() & 0xffff_ffff_ffff
        );
        let last = segments.last().copied().unwrap_or_default();
        tokens.push((token.clone(), display_name(last.as_bytes())));
        if let Some(slot) = placeholder.last_mut() {
            *slot = token;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::command::parse_command;
    use imap_codec::encode::Encoder;

    fn policy(patterns: &[&str], permissions: &[Permission]) -> SessionPolicy {
        SessionPolicy {
            folders: FolderPolicy::new(patterns),
            permissions: permissions.iter().copied().collect(),
            delimiter: Some('/'),
            provider_unselect: true,
            max_message_bytes: 1 << 20,
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

    /// Found by the fuzzer: a hidden `INBOX/` kept no token and went up as `INBOX/`, which a
    /// provider that drops trailing delimiters would read as INBOX.
    #[test]
    fn a_placeholder_always_hides_something() {
        let p = policy(&["Sent"], &all());
        for text in [
            "a SELECT INBOX/",
            "a APPEND INBOX/ {1+}\r\nx",
            "a SELECT inbox//",
            "a SELECT /",
        ] {
            let (decision, encoded) = decide(&p, text);
            let Decision::AsNonexistent { substitutions } = decision else {
                panic!("{text}: {decision:?}")
            };
            assert!(!substitutions.is_empty(), "{text}");
            assert!(encoded.contains("pecgate-none-"), "{text}: {encoded}");
        }
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
        assert!(
            encoded.contains(&format!("{}/", substitutions[0].0)),
            "{encoded}"
        );
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
        assert!(
            encoded.starts_with("a SELECT INBOX.pecgate-none-"),
            "{encoded}"
        );
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
}
