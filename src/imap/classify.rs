//! The one classification of IMAP commands, free of I/O.
//!
//! Everything pecgate needs to know about a command kind lives in [`classify`]: whether it is
//! relayed or answered by pecgate, which permissions it needs, how it uses each mailbox name
//! it carries, what it does to the selected folder, whether it must run alone on the provider
//! connection and whether it changes the mailbox (and so is audited durably before it is
//! sent). Adding a command means adding one arm here; the session, the policy and the audit
//! read this table and never match on the command kind for these questions themselves.
//!
//! The list is closed: a command not named here is refused, never forwarded blindly.

use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::flag::{Flag as MessageFlag, StoreType};
use imap_codec::imap_types::mailbox::Mailbox;

use crate::config::Permission;

/// Who answers a command once the user is logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Sent to the provider, answered with the provider's answer.
    Relay,
    /// Relayed; the provider idles until pecgate sends `DONE`.
    Idle,
    /// Relayed; the session ends when the provider completes it.
    Logout,
    /// Answered from pecgate's own capability list.
    LocalCapability,
    /// Answered by pecgate: nothing it advertises needs enabling.
    LocalEnable,
    /// Answered by pecgate: the client's identification is recorded, never sent upstream.
    LocalId,
    /// Refused with `BAD` and this text.
    Refuse(&'static str),
}

/// How a command uses one mailbox name it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameUse {
    /// Names a folder that must exist: a hidden one answers as nonexistent.
    Existing,
    /// Names a folder to create: decided on the name alone.
    Create,
    /// Acts on the folder and everything below it (DELETE, RENAME's source).
    Subtree,
}

/// What a successful completion does to the selected folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    Keep,
    /// SELECT or EXAMINE: on OK the named folder is selected; on NO none is.
    Select,
    /// CLOSE or UNSELECT: on OK no folder is selected.
    Deselect,
}

/// Everything pecgate decides from a command's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandClass {
    pub handling: Handling,
    /// Every permission needed (the first missing one is named in the refusal).
    pub permissions: &'static [Permission],
    /// How each name of [`mailboxes`] is used, in the same order.
    pub names: &'static [NameUse],
    pub selection: Selection,
    /// Runs alone on the provider connection: sent only when nothing else is in flight, and
    /// nothing else is sent until it completes. This is what makes the selected folder (and so
    /// each audit event's folder) exact, and what attributes untagged LIST lines to their LIST.
    pub exclusive: bool,
    /// Changes the mailbox: recorded durably before it is sent, completed after.
    pub changes_state: bool,
}

impl CommandClass {
    const fn relay(permissions: &'static [Permission]) -> Self {
        CommandClass {
            handling: Handling::Relay,
            permissions,
            names: &[],
            selection: Selection::Keep,
            exclusive: false,
            changes_state: false,
        }
    }

    const fn local(handling: Handling) -> Self {
        CommandClass {
            handling,
            ..CommandClass::relay(&[])
        }
    }

    const fn names(self, names: &'static [NameUse]) -> Self {
        CommandClass { names, ..self }
    }

    const fn exclusive(self, selection: Selection) -> Self {
        CommandClass {
            exclusive: true,
            selection,
            ..self
        }
    }

    const fn changing(self) -> Self {
        CommandClass {
            changes_state: true,
            ..self
        }
    }
}

/// The class of a command in the authenticated and selected states.
pub fn classify(body: &CommandBody<'_>) -> CommandClass {
    use NameUse::*;
    use Permission::*;
    use Selection::*;
    const EXISTING: &[NameUse] = &[Existing];
    match body {
        CommandBody::Capability => CommandClass::local(Handling::LocalCapability),
        CommandBody::Enable { .. } => CommandClass::local(Handling::LocalEnable),
        CommandBody::Id { .. } => CommandClass::local(Handling::LocalId),
        CommandBody::Noop | CommandBody::Check | CommandBody::Namespace => CommandClass::relay(&[]),
        CommandBody::Idle => CommandClass {
            handling: Handling::Idle,
            ..CommandClass::relay(&[]).exclusive(Keep)
        },
        CommandBody::Logout => CommandClass {
            handling: Handling::Logout,
            ..CommandClass::relay(&[]).exclusive(Keep)
        },
        CommandBody::Select { .. } | CommandBody::Examine { .. } => CommandClass::relay(&[Read])
            .names(EXISTING)
            .exclusive(Select),
        CommandBody::Unselect => CommandClass::relay(&[]).exclusive(Deselect),
        // CLOSE expunges; without `delete` the policy sends UNSELECT instead.
        CommandBody::Close => CommandClass::relay(&[]).exclusive(Deselect).changing(),
        CommandBody::List { .. } | CommandBody::Lsub { .. } => {
            CommandClass::relay(&[]).exclusive(Keep)
        }
        CommandBody::Status { .. } => CommandClass::relay(&[Read]).names(EXISTING),
        CommandBody::Fetch { .. } | CommandBody::Search { .. } => CommandClass::relay(&[Read]),
        CommandBody::Store { flags, kind, .. } => {
            let deleted = flags.contains(&MessageFlag::Deleted);
            // FLAGS (...) replaces the whole set: it removes \Deleted where it was set.
            let permissions: &'static [Permission] = match (kind, deleted) {
                (StoreType::Replace, _) => &[Flag, Delete],
                (_, true) if flags.len() == 1 => &[Delete],
                (_, true) => &[Flag, Delete],
                (_, false) => &[Flag],
            };
            CommandClass::relay(permissions).changing()
        }
        CommandBody::Expunge | CommandBody::ExpungeUid { .. } => {
            CommandClass::relay(&[Delete]).changing()
        }
        CommandBody::Copy { .. } => CommandClass::relay(&[Move]).names(EXISTING).changing(),
        // MOVE expunges from the source, as Dovecot's ACL asks the expunge right for it.
        CommandBody::Move { .. } => CommandClass::relay(&[Move, Delete])
            .names(EXISTING)
            .changing(),
        CommandBody::Append { .. } => CommandClass::relay(&[Append]).names(EXISTING).changing(),
        CommandBody::Create { .. } => CommandClass::relay(&[ManageFolders])
            .names(&[Create])
            .changing(),
        // Deleting a folder destroys its messages.
        CommandBody::Delete { .. } => CommandClass::relay(&[ManageFolders, Delete])
            .names(&[Subtree])
            .changing(),
        CommandBody::Rename { .. } => CommandClass::relay(&[ManageFolders])
            .names(&[Subtree, Create])
            .changing(),
        CommandBody::Subscribe { .. } | CommandBody::Unsubscribe { .. } => {
            CommandClass::relay(&[ManageFolders])
                .names(EXISTING)
                .changing()
        }
        CommandBody::StartTLS | CommandBody::Login { .. } | CommandBody::Authenticate { .. } => {
            CommandClass::local(Handling::Refuse("Already logged in"))
        }
        CommandBody::Compress { .. } => {
            CommandClass::local(Handling::Refuse("COMPRESS is not offered by pecgate"))
        }
        _ => CommandClass::local(Handling::Refuse("Command not supported by pecgate")),
    }
}

/// The mailbox names a command carries, in the order of [`CommandClass::names`] (mutable:
/// the policy puts placeholders in place of hidden folders).
pub fn mailboxes_mut<'b>(body: &'b mut CommandBody<'static>) -> Vec<&'b mut Mailbox<'static>> {
    match body {
        CommandBody::Select { mailbox, .. }
        | CommandBody::Examine { mailbox, .. }
        | CommandBody::Create { mailbox }
        | CommandBody::Delete { mailbox }
        | CommandBody::Subscribe { mailbox }
        | CommandBody::Unsubscribe { mailbox }
        | CommandBody::Status { mailbox, .. }
        | CommandBody::Append { mailbox, .. }
        | CommandBody::Copy { mailbox, .. }
        | CommandBody::Move { mailbox, .. } => vec![mailbox],
        CommandBody::Rename { from, to } => vec![from, to],
        _ => Vec::new(),
    }
}

/// Whether the command is one of the `UID` forms.
pub fn is_uid(body: &CommandBody<'_>) -> bool {
    matches!(
        body,
        CommandBody::Fetch { uid: true, .. }
            | CommandBody::Store { uid: true, .. }
            | CommandBody::Copy { uid: true, .. }
            | CommandBody::Move { uid: true, .. }
            | CommandBody::Search { uid: true, .. }
            | CommandBody::Sort { uid: true, .. }
            | CommandBody::Thread { uid: true, .. }
            | CommandBody::ExpungeUid { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::command::parse_command;

    fn class(text: &str) -> CommandClass {
        classify(
            &parse_command(format!("{text}\r\n").as_bytes())
                .unwrap()
                .body,
        )
    }

    #[test]
    fn handling_is_closed() {
        let cases: &[(&str, Handling)] = &[
            ("a NOOP", Handling::Relay),
            ("a IDLE", Handling::Idle),
            ("a LOGOUT", Handling::Logout),
            ("a CAPABILITY", Handling::LocalCapability),
            ("a ENABLE CONDSTORE", Handling::LocalEnable),
            ("a ID NIL", Handling::LocalId),
            (
                "a COMPRESS DEFLATE",
                Handling::Refuse("COMPRESS is not offered by pecgate"),
            ),
            ("a LOGIN x y", Handling::Refuse("Already logged in")),
            (
                "a GETQUOTAROOT INBOX",
                Handling::Refuse("Command not supported by pecgate"),
            ),
            (
                "a UID SORT (DATE) UTF-8 ALL",
                Handling::Refuse("Command not supported by pecgate"),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(class(text).handling, *want, "{text}");
        }
    }

    #[test]
    fn destroying_commands_need_delete() {
        use Permission::*;
        let cases: &[(&str, &[Permission])] = &[
            ("a UID MOVE 1 Sent", &[Move, Delete]),
            ("a COPY 1 Sent", &[Move]),
            ("a DELETE Old", &[ManageFolders, Delete]),
            ("a STORE 1 FLAGS (\\Seen)", &[Flag, Delete]),
            ("a STORE 1 FLAGS ()", &[Flag, Delete]),
            ("a STORE 1 +FLAGS (\\Deleted)", &[Delete]),
            ("a STORE 1 -FLAGS.SILENT (\\Deleted)", &[Delete]),
            ("a STORE 1 +FLAGS (\\Seen \\Deleted)", &[Flag, Delete]),
            ("a STORE 1 +FLAGS (\\Seen)", &[Flag]),
            ("a UID EXPUNGE 1", &[Delete]),
            ("a FETCH 1 FLAGS", &[Read]),
        ];
        for (text, want) in cases {
            assert_eq!(class(text).permissions, *want, "{text}");
        }
    }

    #[test]
    fn selection_changes_run_alone_and_changes_are_durable() {
        for text in ["a SELECT INBOX", "a EXAMINE INBOX", "a CLOSE", "a UNSELECT"] {
            assert!(class(text).exclusive, "{text}");
            assert_ne!(class(text).selection, Selection::Keep, "{text}");
        }
        for text in ["a LIST \"\" *", "a LSUB \"\" *", "a IDLE", "a LOGOUT"] {
            assert!(class(text).exclusive, "{text}");
        }
        for text in [
            "a FETCH 1 FLAGS",
            "a UID SEARCH ALL",
            "a NOOP",
            "a STATUS INBOX (MESSAGES)",
        ] {
            assert!(!class(text).exclusive, "{text}");
            assert!(!class(text).changes_state, "{text}");
        }
        for text in [
            "a STORE 1 +FLAGS (\\Seen)",
            "a EXPUNGE",
            "a COPY 1 X",
            "a MOVE 1 X",
            "a CREATE X",
            "a DELETE X",
            "a RENAME X Y",
            "a SUBSCRIBE X",
            "a UNSUBSCRIBE X",
            "a APPEND X {1}\r\nx",
        ] {
            assert!(class(text).changes_state, "{text}");
        }
    }

    #[test]
    fn names_line_up_with_mailboxes() {
        for text in [
            "a SELECT INBOX",
            "a RENAME A B",
            "a CREATE A",
            "a UID MOVE 1 A",
            "a STATUS A (UIDNEXT)",
            "a FETCH 1 FLAGS",
        ] {
            let mut command = parse_command(format!("{text}\r\n").as_bytes()).unwrap();
            let names = classify(&command.body).names.len();
            assert_eq!(mailboxes_mut(&mut command.body).len(), names, "{text}");
        }
    }
}
