//! One logged-in client session as a state machine, free of I/O.
//!
//! Fed with what the client sends (parsed commands, APPEND heads, lines during IDLE) and
//! with what the provider answers (already attributed by
//! [`super::provider_client::ProviderClient`]), it returns [`Action`]s in the order the
//! driver must carry them out: audit events, bytes for the client, requests for the provider,
//! the end of the session. The driver (`relay.rs`) only does I/O.
//!
//! The states: *authenticated* (no folder selected), *selected* (`selected` is set), *idle*
//! (an IDLE in flight), *append in progress* (the driver streams a message after an
//! [`Request::AppendHead`]), *logout* (answered locally: the provider connection is the
//! driver's to close or keep). The machine does not assume a
//! dedicated provider connection: it emits requests under fresh upstream tags and accepts
//! completions by tag.
//!
//! Invariants:
//! - Nothing goes to the provider that was not parsed, classified, authorized and given its
//!   audit event first; state-changing commands get a durable `sent` event before they leave.
//! - The client's tag never goes upstream; a client tag still in flight is refused.
//! - A command that changes the selected folder, a LIST/LSUB and an IDLE run alone (see
//!   [`CommandClass::exclusive`]), so each event's folder is the folder the provider had
//!   selected when it ran it, and untagged LIST lines belong to the one LIST in flight.
//! - While IDLE is in flight nothing but `DONE` is requested; a client line other than DONE
//!   ends the IDLE with `BAD` and is dropped.

use std::sync::Arc;

use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::Tag;
use imap_codec::imap_types::mailbox::Mailbox;

use crate::audit::Outcome;
use crate::config::Permission;
use crate::imap::authorize::{
    Decision, SessionPolicy, authorize, force_peek, renames_rfc822, substitute,
};
use crate::imap::cached_fetch::{self, Bodies};
use crate::imap::classify::{CommandClass, Handling, Selection, classify};
use crate::imap::command::{CommandSummary, parse_command, summarize};
use crate::imap::identity::{FetchSeen, FetchTap, Identities, uid_code};
use crate::imap::listing::{ListRequest, status_visible};
use crate::imap::provider_client::{Untagged, next_tag};
use crate::imap::renumber::{Renumbered, Renumbering, Translation};
use crate::imap::response::{self, ListEntry, Status, list_entry};
use crate::imap::view::{News, news};

/// Most commands of one session in flight at the provider: a client pipelining more waits
/// (it is not read from) until some complete, so a session's state stays bounded.
const MAX_IN_FLIGHT: usize = 64;

/// Most folders gathered for one LIST: far beyond any real mailbox, and a bound on memory.
const MAX_LIST_ENTRIES: usize = 100_000;

/// One thing for the driver to do.
#[derive(Debug)]
pub enum Action {
    /// Queue (or, `durable`, write) an audit event; on failure the session ends.
    Audit(AuditRecord),
    /// Write these bytes to the client.
    Client(Vec<u8>),
    /// Compute the answer to a LIST/LSUB from the provider's listing (CPU work: off the
    /// async runtime) and write it to the client.
    ClientListing {
        request: ListRequest,
        entries: Vec<ListEntry>,
    },
    /// Send this to the provider.
    Provider(Request),
    /// The session is over.
    End(Ending),
}

/// An audit event, as the session sees it (the driver adds who, where and when).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub command: String,
    pub folder: Option<String>,
    pub detail: String,
    pub outcome: Outcome,
    pub durable: bool,
}

/// A request for the provider, always under a pecgate tag.
#[derive(Debug)]
pub enum Request {
    Command(Command<'static>),
    /// An APPEND head announcing `length` bytes; the driver streams the client's message
    /// after it. `client_sync`: the client waits for a `+` before sending it.
    AppendHead {
        skeleton: Command<'static>,
        length: u32,
        client_sync: bool,
    },
    /// End the provider's IDLE.
    Done,
}

/// Why the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Logout,
    /// The provider said something pecgate cannot attribute.
    ProviderViolation(String),
}

/// The answer to a submitted command.
#[derive(Debug)]
pub enum Submit {
    Ready(Vec<Action>),
    /// The command must wait until what is in flight completes (it runs alone, or something
    /// running alone is in flight). Submit it again after the next completion.
    Wait(Command<'static>),
}

/// What to do with an untagged provider response.
#[derive(Debug, PartialEq, Eq)]
pub enum UntaggedPlan {
    /// Relay it as it comes (literals streamed).
    Pass,
    /// Relay it with FETCH item names restored (see [`rename_rfc822_items`]).
    PassRenamed,
    /// Relay it with this first line instead (the client's message number: see
    /// [`Renumbering`]); `rename` as for [`UntaggedPlan::PassRenamed`].
    PassRenumbered { line: Vec<u8>, rename: bool },
    /// Write this instead: the provider's answer with the message body from pecgate's cache
    /// (see [`cached_fetch`]); then hand `seen` to [`ClientSession::on_fetch_seen`].
    Cached {
        bytes: Vec<u8>,
        seen: Option<FetchSeen>,
    },
    /// Write this instead (capabilities replaced).
    Replace(Vec<u8>),
    /// Read the whole response (literals included) and hand it to [`ClientSession::on_unit`].
    Gather,
    /// Relay it, then the session is over (the provider said BYE).
    PassThenEnd,
    /// End the session: it does not fit what is in flight.
    Violation(String),
}

struct InFlight {
    upstream_tag: String,
    client_tag: String,
    summary: CommandSummary,
    class: CommandClass,
    /// Placeholders to put back into the provider's answer (hidden folder names).
    substitutions: Vec<(String, String)>,
    /// For SELECT/EXAMINE: the folder selected on success.
    select_target: Option<String>,
    /// For SELECT/EXAMINE of a granted folder: the command, to select the folder again on
    /// another provider connection when a parked session comes back.
    reselect: Option<Command<'static>>,
    runs_alone: bool,
    /// A FETCH rewritten to `.PEEK` whose `RFC822` items must be renamed back (it runs alone,
    /// so every FETCH line while it is in flight answers it).
    renames: bool,
    list: Option<ListRequest>,
    /// pecgate's own command, not the client's: its answer is audited, never relayed.
    internal: bool,
    /// It named messages gone upstream that the client still counts: its OK says so, as
    /// Dovecot's does (RFC 5530 `EXPUNGEISSUED`).
    expunge_issued: bool,
    /// A download answered from the body cache: the provider was asked without the body,
    /// which joins each of its answers from here (the part asked, for a partial fetch).
    bodies: Option<(Bodies, Option<(u32, u32)>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdlePhase {
    /// IDLE sent, the provider's `+` not seen yet.
    Starting,
    /// The provider idles; the client may send DONE.
    Idling,
    /// The client ended it before the provider's `+`: DONE goes up when `+` comes.
    DoneWanted,
    /// DONE sent; waiting for the tagged completion.
    DoneSent,
}

/// A parked IDLE: the client's tag and the event to write when it ends.
struct Parked {
    client_tag: String,
    summary: CommandSummary,
}

struct Idle {
    upstream_tag: String,
    phase: IdlePhase,
    /// What the client sent instead of DONE (the IDLE then completes with BAD).
    broken: Option<String>,
}

/// The state of one logged-in client session.
pub struct ClientSession {
    /// Shared with the driver, which answers listings off the async runtime.
    policy: Arc<SessionPolicy>,
    capabilities: Vec<String>,
    /// The folder selected on the provider connection, as known from completions.
    selected: Option<String>,
    /// The SELECT/EXAMINE that selected it.
    reselect: Option<Command<'static>>,
    /// The selected folder's UIDVALIDITY, as its SELECT/EXAMINE answered.
    uidvalidity: Option<u32>,
    /// Set while the client's numbering differs from the provider connection's (after a
    /// lent connection was replaced): see [`Renumbering`].
    renumbering: Option<Renumbering>,
    in_flight: Vec<InFlight>,
    idle: Option<Idle>,
    /// An IDLE served by pecgate while the session holds no provider connection.
    parked: Option<Parked>,
    /// Entries of the LIST/LSUB in flight.
    listing: Vec<ListEntry>,
    /// Which message each (folder, UID) is, as far as this session has seen.
    identities: Identities,
}

impl ClientSession {
    pub fn new(policy: Arc<SessionPolicy>, capabilities: Vec<String>) -> Self {
        ClientSession {
            policy,
            capabilities,
            selected: None,
            reselect: None,
            uidvalidity: None,
            renumbering: None,
            in_flight: Vec::new(),
            idle: None,
            parked: None,
            listing: Vec::new(),
            identities: Identities::default(),
        }
    }

    pub fn policy(&self) -> &Arc<SessionPolicy> {
        &self.policy
    }

    pub fn selected(&self) -> Option<&str> {
        self.selected.as_deref()
    }

    /// Whether the client is in IDLE: its next line must be DONE (read as a line, not as a
    /// command).
    pub fn client_idling(&self) -> bool {
        self.idle.as_ref().is_some_and(|idle| {
            idle.broken.is_none() && matches!(idle.phase, IdlePhase::Starting | IdlePhase::Idling)
        })
    }

    /// A command the framer or the parser refused.
    pub fn refuse_unparsed(&self, tag: Option<&str>, text: &str, detail: String) -> Vec<Action> {
        vec![
            audit("(unparsed)", self.selected.clone(), detail, Outcome::Bad),
            Action::Client(format!("{} BAD {text}\r\n", tag.unwrap_or("*")).into_bytes()),
        ]
    }

    /// A parsed command from the client.
    pub fn submit(&mut self, command: Command<'static>) -> Submit {
        self.submit_inner(command, None, None)
    }

    /// A parsed command, with the bodies pecgate's cache holds for it when it is a download
    /// the cache can answer ([`cached_fetch::body_request`]; every UID must be there).
    pub fn submit_cached(&mut self, command: Command<'static>, bodies: Option<Bodies>) -> Submit {
        self.submit_inner(command, None, bodies)
    }

    /// Whether the selected folder stays as it is until the next command is submitted (no
    /// SELECT, EXAMINE, CLOSE or UNSELECT in flight): what the cache may key on.
    pub fn folder_settled(&self) -> bool {
        self.in_flight
            .iter()
            .all(|f| f.class.selection == Selection::Keep)
    }

    /// An APPEND whose message (`length` bytes) the driver will stream; `command` is the
    /// skeleton parsed with an empty message.
    pub fn submit_append(&mut self, skeleton: Command<'static>, length: u32, sync: bool) -> Submit {
        self.submit_inner(skeleton, Some((length, sync)), None)
    }

    fn submit_inner(
        &mut self,
        mut command: Command<'static>,
        append: Option<(u32, bool)>,
        bodies: Option<Bodies>,
    ) -> Submit {
        let client_tag = command.tag.as_ref().to_owned();
        let class = classify(&command.body);
        let mut summary = summarize(&command);
        if let Some((length, _)) = append {
            summary.detail.push_str(&format!(" size={length}"));
        }
        if class.permissions.contains(&Permission::Move) {
            // COPY/MOVE: the event's folder is the destination; the source is the selected one.
            let from = self.selected.as_deref().unwrap_or("");
            summary.detail = join_detail(&summary.detail, &format!("from={from}"));
        }
        if summary.folder.is_none() {
            summary.folder = self.selected.clone();
        }
        if self.in_flight.iter().any(|f| f.client_tag == client_tag) {
            return self.refuse(
                &client_tag,
                &summary,
                "Tag already in use by a running command",
            );
        }
        if let Some((length, _)) = append
            && u64::from(length) > self.policy.max_message_bytes
        {
            // Refused before a byte of it is read: a synchronising literal is never invited,
            // a LITERAL+ one is thrown away by the caller.
            let text = format!(
                "Message too large ({length} bytes; this mailbox accepts at most {})",
                self.policy.max_message_bytes
            );
            return Submit::Ready(vec![
                audit(
                    &summary.name,
                    summary.folder.clone(),
                    format!("{} (too large)", summary.detail),
                    Outcome::No,
                ),
                Action::Client(format!("{client_tag} NO [TOOBIG] {text}\r\n").into_bytes()),
            ]);
        }
        let ok = |text: String| {
            Submit::Ready(vec![
                audit(
                    &summary.name,
                    summary.folder.clone(),
                    summary.detail.clone(),
                    Outcome::Ok,
                ),
                Action::Client(text.into_bytes()),
            ])
        };
        match class.handling {
            Handling::Refuse(text) => return self.refuse(&client_tag, &summary, text),
            Handling::LocalCapability => {
                return ok(format!(
                    "* CAPABILITY {}\r\n{client_tag} OK CAPABILITY completed\r\n",
                    self.capabilities.join(" ")
                ));
            }
            Handling::LocalEnable => {
                return ok(format!("* ENABLED\r\n{client_tag} OK ENABLE completed\r\n"));
            }
            Handling::LocalId => return ok(id_answer(&client_tag)),
            Handling::Relay | Handling::Idle | Handling::Logout => {}
        }
        let list = ListRequest::of(&command.body);
        if list.as_ref().is_some_and(ListRequest::too_long) {
            return self.refuse(&client_tag, &summary, "LIST pattern too long");
        }
        let renames = renames_rfc822(&command, &self.policy);
        // While the numberings differ, commands run one at a time: each is translated against
        // the difference as it stands, and may end it.
        let runs_alone = class.exclusive || renames || self.renumbering.is_some();
        if (runs_alone && !self.in_flight.is_empty())
            || self.in_flight.iter().any(|f| f.runs_alone)
            || self.in_flight.len() >= MAX_IN_FLIGHT
        {
            return Submit::Wait(command);
        }
        if class.handling == Handling::Logout {
            // Answered here, with nothing in flight (LOGOUT runs alone): the provider
            // connection is pecgate's to close, or to keep for the next session.
            return Submit::Ready(vec![
                audit(
                    &summary.name,
                    summary.folder.clone(),
                    summary.detail.clone(),
                    Outcome::Ok,
                ),
                Action::Client(
                    format!("* BYE Logging out\r\n{client_tag} OK LOGOUT completed\r\n")
                        .into_bytes(),
                ),
                Action::End(Ending::Logout),
            ]);
        }
        let substitutions = match authorize(&mut command, &self.policy) {
            Decision::Allow => Vec::new(),
            Decision::AsNonexistent { substitutions } => substitutions,
            Decision::CloseAsUnselect => {
                summary.detail = "without expunge: no delete permission".into();
                Vec::new()
            }
            Decision::BadName(text) => return self.refuse(&client_tag, &summary, text),
            denial => return Submit::Ready(deny(&client_tag, &summary, &denial)),
        };
        force_peek(&mut command, &self.policy);
        let mut told_first = Vec::new();
        let mut expunge_issued = false;
        if let Some(renumbering) = &self.renumbering {
            match renumbering.translate(&mut command.body) {
                Translation::FlushFirst => {
                    told_first = self
                        .renumbering
                        .take()
                        .map(Renumbering::flush)
                        .unwrap_or_default();
                }
                Translation::Forget => self.renumbering = None,
                Translation::Renumbered { skipped } => expunge_issued = skipped,
                Translation::NothingLeft => {
                    return self.nothing_left(&client_tag, &summary, &command);
                }
            }
        }
        // Every body asked for is at hand: the provider is asked the rest.
        let bodies = bodies.and_then(|bodies| {
            let request = cached_fetch::body_request(&command.body)?;
            let all = request.uids.iter().all(|uid| bodies.contains_key(uid));
            all.then_some((bodies, request.partial))
        });
        if bodies.is_some() {
            cached_fetch::without_body(&mut command.body);
            summary.detail = join_detail(&summary.detail, "bodies from pecgate's cache");
        }
        let upstream_tag = next_tag();
        command.tag = Tag::try_from(upstream_tag.clone()).expect("c<digits> is a valid tag");
        let select_target = (class.selection == Selection::Select)
            .then(|| summary.folder.clone())
            .flatten();
        let reselect =
            (select_target.is_some() && substitutions.is_empty()).then(|| command.clone());
        let mut actions = Vec::new();
        if !told_first.is_empty() {
            actions.push(Action::Client(told_first));
        }
        if class.changes_state {
            actions.push(Action::Audit(AuditRecord {
                durable: true,
                ..relayed(&summary, &upstream_tag, Outcome::Sent, None)
            }));
        }
        let request = match (&list, append) {
            (Some(list), _) => {
                let verb = if list.lsub { "LSUB" } else { "LIST" };
                let own = format!("{upstream_tag} {verb} \"\" \"*\"\r\n");
                Request::Command(parse_command(own.as_bytes()).expect("pecgate's own LIST parses"))
            }
            (None, Some((length, client_sync))) => Request::AppendHead {
                skeleton: command,
                length,
                client_sync,
            },
            (None, None) => Request::Command(command),
        };
        if class.handling == Handling::Idle {
            self.idle = Some(Idle {
                upstream_tag: upstream_tag.clone(),
                phase: IdlePhase::Starting,
                broken: None,
            });
        }
        self.listing.clear();
        // A SUBSCRIBE of a hidden folder goes up with its placeholder, so the client gets the
        // provider's own answer for a missing folder; a provider that records subscriptions
        // to names that do not exist would keep the placeholder, so pecgate's own UNSUBSCRIBE
        // of it follows in the same write (harmless when the SUBSCRIBE was refused).
        let undo = command_for_undo(&request, &substitutions)
            .map(|mailbox| self.internal_unsubscribe(mailbox, &summary, &substitutions));
        self.in_flight.push(InFlight {
            upstream_tag,
            client_tag,
            summary,
            class,
            substitutions,
            select_target,
            reselect,
            runs_alone,
            renames,
            list,
            internal: false,
            expunge_issued,
            bodies,
        });
        actions.push(Action::Provider(request));
        if let Some(undo) = undo {
            actions.extend(undo);
        }
        Submit::Ready(actions)
    }

    /// pecgate's own `UNSUBSCRIBE mailbox`, in flight, recorded durably before it leaves.
    fn internal_unsubscribe(
        &mut self,
        mailbox: Mailbox<'static>,
        cause: &CommandSummary,
        substitutions: &[(String, String)],
    ) -> Vec<Action> {
        let upstream_tag = next_tag();
        let command = Command {
            tag: Tag::try_from(upstream_tag.clone()).expect("c<digits> is a valid tag"),
            body: CommandBody::Unsubscribe { mailbox },
        };
        let summary = CommandSummary {
            name: "UNSUBSCRIBE".to_owned(),
            folder: cause.folder.clone(),
            detail: "by pecgate: undoes a placeholder subscription the provider may have kept"
                .to_owned(),
        };
        let class = classify(&command.body);
        let actions = vec![
            Action::Audit(AuditRecord {
                durable: true,
                ..relayed(&summary, &upstream_tag, Outcome::Sent, None)
            }),
            Action::Provider(Request::Command(command)),
        ];
        self.in_flight.push(InFlight {
            upstream_tag,
            client_tag: String::new(),
            summary,
            class,
            // Like every command carrying a placeholder, its outcome is recorded as `denied`.
            substitutions: substitutions.to_vec(),
            select_target: None,
            reselect: None,
            runs_alone: false,
            renames: false,
            list: None,
            internal: true,
            expunge_issued: false,
            bodies: None,
        });
        actions
    }

    /// A command naming only messages gone upstream (the client was not told yet): answered
    /// as Dovecot answers them in its own session. COPY and MOVE may carry EXPUNGE, so the
    /// client hears of the gone messages at once.
    fn nothing_left(
        &mut self,
        tag: &str,
        summary: &CommandSummary,
        command: &Command<'_>,
    ) -> Submit {
        let copies = matches!(
            command.body,
            CommandBody::Copy { .. } | CommandBody::Move { .. }
        );
        let (outcome, mut answer) = if copies {
            let told = self
                .renumbering
                .take()
                .map(Renumbering::flush)
                .unwrap_or_default();
            (Outcome::No, told)
        } else {
            (Outcome::Ok, Vec::new())
        };
        let text = if copies {
            "NO [EXPUNGEISSUED] Some of the requested messages no longer exist."
        } else {
            "OK [EXPUNGEISSUED] Some messages were already expunged."
        };
        answer.extend_from_slice(format!("{tag} {text}\r\n").as_bytes());
        Submit::Ready(vec![
            audit(
                &summary.name,
                summary.folder.clone(),
                join_detail(&summary.detail, "only messages expunged by another session"),
                outcome,
            ),
            Action::Client(answer),
        ])
    }

    /// The session's connection selected its folder afresh while messages the client still
    /// counts were gone: until they can be told, its numbering differs (`None`: it does not).
    pub fn renumber(&mut self, renumbering: Option<Renumbering>) {
        self.renumbering = renumbering;
    }

    /// The difference in numbering left, if any (a session lent again keeps it).
    pub fn renumbering(&self) -> Option<&Renumbering> {
        self.renumbering.as_ref()
    }

    /// The selected folder's UIDVALIDITY, when its SELECT/EXAMINE said it.
    pub fn uidvalidity(&self) -> Option<u32> {
        self.uidvalidity
    }

    /// Nothing is in flight and the client is not in IDLE: the provider connection may leave
    /// the session until its next command.
    pub fn between_commands(&self) -> bool {
        self.in_flight.is_empty() && self.idle.is_none() && self.parked.is_none()
    }

    fn refuse(&self, tag: &str, summary: &CommandSummary, text: &str) -> Submit {
        Submit::Ready(vec![
            audit(
                &summary.name,
                summary.folder.clone(),
                text.to_owned(),
                Outcome::Bad,
            ),
            Action::Client(format!("{tag} BAD {text}\r\n").into_bytes()),
        ])
    }

    /// A line from the client while it is in IDLE.
    pub fn idle_line(&mut self, line: &[u8]) -> Vec<Action> {
        let Some(idle) = self.idle.as_mut() else {
            return Vec::new();
        };
        let trimmed = line.strip_suffix(b"\n").unwrap_or(line);
        let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
        if !trimmed.eq_ignore_ascii_case(b"DONE") {
            // What a server does: the IDLE ends with BAD, the line is not a command.
            idle.broken = Some(crate::text::printable(trimmed, 200));
        }
        match idle.phase {
            IdlePhase::Idling => {
                idle.phase = IdlePhase::DoneSent;
                vec![Action::Provider(Request::Done)]
            }
            IdlePhase::Starting => {
                idle.phase = IdlePhase::DoneWanted;
                Vec::new()
            }
            IdlePhase::DoneWanted | IdlePhase::DoneSent => Vec::new(),
        }
    }

    /// Park the IDLE just submitted under `upstream_tag` instead of sending it: pecgate
    /// answers the client's IDLE itself while the session holds no provider connection.
    /// `None` (nothing changes) unless that IDLE is the only command in flight and either no
    /// folder or one the session can select again is selected.
    pub fn park_idle(&mut self, upstream_tag: &str) -> Option<Vec<Action>> {
        let idle = self.idle.as_ref()?;
        // With a folder selected, it must be one pecgate can select again on another
        // connection; with none (Outlook idles so at times) there is nothing to select.
        let reselectable = self.selected.is_none() || self.reselect.is_some();
        if idle.upstream_tag != upstream_tag
            || idle.phase != IdlePhase::Starting
            || self.in_flight.len() != 1
            || !reselectable
        {
            return None;
        }
        self.idle = None;
        let done = self.in_flight.pop().expect("checked: one in flight");
        self.parked = Some(Parked {
            client_tag: done.client_tag,
            summary: done.summary,
        });
        Some(vec![Action::Client(b"+ idling\r\n".to_vec())])
    }

    /// The SELECT/EXAMINE that selects the session's folder on another connection.
    pub fn reselect(&self) -> Option<&Command<'static>> {
        self.reselect.as_ref()
    }

    /// The parked IDLE ends: `line` is what the client sent (DONE, or anything else, which
    /// ends it with BAD as a server would). `how` says how it was served, for the audit.
    pub fn unpark(&mut self, line: &[u8], how: &str) -> Vec<Action> {
        let Some(parked) = self.parked.take() else {
            return Vec::new();
        };
        let trimmed = line.strip_suffix(b"\n").unwrap_or(line);
        let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
        let done = trimmed.eq_ignore_ascii_case(b"DONE");
        let mut detail = join_detail(&parked.summary.detail, how);
        if !done {
            detail = join_detail(
                &format!(
                    "client sent {:?} instead of DONE",
                    crate::text::printable(trimmed, 200)
                ),
                &detail,
            );
        }
        let reply = if done {
            format!("{} OK IDLE terminated\r\n", parked.client_tag)
        } else {
            format!("{} BAD Expected DONE to end IDLE\r\n", parked.client_tag)
        };
        vec![
            audit(
                &parked.summary.name,
                parked.summary.folder.clone(),
                detail,
                if done { Outcome::Ok } else { Outcome::Bad },
            ),
            Action::Client(reply.into_bytes()),
        ]
    }

    /// The provider's `+` for the IDLE in flight (`line` is the continuation as sent).
    pub fn on_idle_continuation(&mut self, tag: &str, line: &[u8]) -> Vec<Action> {
        let Some(idle) = self.idle.as_mut().filter(|idle| idle.upstream_tag == tag) else {
            return vec![violation_end("a continuation for no IDLE")];
        };
        match idle.phase {
            IdlePhase::Starting => {
                idle.phase = IdlePhase::Idling;
                vec![Action::Client(line.to_vec())]
            }
            IdlePhase::DoneWanted => {
                idle.phase = IdlePhase::DoneSent;
                let mut actions = Vec::new();
                if idle.broken.is_none() {
                    actions.push(Action::Client(line.to_vec()));
                }
                actions.push(Action::Provider(Request::Done));
                actions
            }
            IdlePhase::Idling | IdlePhase::DoneSent => {
                vec![violation_end("a second continuation for IDLE")]
            }
        }
    }

    /// The provider completed the command sent under `tag`; `text` is the rest of its line.
    pub fn on_completed(&mut self, tag: &str, status: Status, text: &[u8]) -> Vec<Action> {
        let Some(position) = self.in_flight.iter().position(|f| f.upstream_tag == tag) else {
            return vec![violation_end(
                "a completion for a command this session did not send",
            )];
        };
        let done = self.in_flight.remove(position);
        match (done.class.selection, status) {
            (Selection::Select, Status::Ok) if done.substitutions.is_empty() => {
                self.selected = done.select_target.clone();
                self.reselect = done.reselect.clone();
            }
            // A failed SELECT leaves no folder selected (RFC 3501 6.3.1); BAD was not run.
            (Selection::Select, Status::Ok | Status::No) | (Selection::Deselect, Status::Ok) => {
                self.selected = None;
                self.reselect = None;
                self.uidvalidity = None;
            }
            _ => {}
        }
        let idle_broken = match &self.idle {
            Some(idle) if idle.upstream_tag == tag => self.idle.take().and_then(|i| i.broken),
            _ => None,
        };
        let outcome = match status {
            _ if idle_broken.is_some() => Outcome::Bad,
            // A hidden folder, answered as nonexistent by the provider.
            _ if !done.substitutions.is_empty() => Outcome::Denied,
            Status::Ok => Outcome::Ok,
            Status::No => Outcome::No,
            _ => Outcome::Bad,
        };
        let mut summary = done.summary.clone();
        if let Some(code) = (status == Status::Ok && text.contains(&b'['))
            .then(|| uid_code(text))
            .flatten()
        {
            // COPYUID / APPENDUID: where the message went, for the per-message timeline.
            summary.detail = join_detail(&summary.detail, &code);
        }
        if let Some(line) = &idle_broken {
            summary.detail = join_detail(
                &format!("client sent {line:?} instead of DONE"),
                &summary.detail,
            );
        }
        // The messages its answers served, before the command's own row.
        let mut actions: Vec<Action> = self
            .identities
            .take_batch()
            .map(message_event)
            .into_iter()
            .collect();
        actions.push(Action::Audit(relayed(&summary, tag, outcome, None)));
        if done.internal {
            // pecgate's own command: the client never sent it and hears nothing of it.
            return actions;
        }
        if let Some(request) = done.list
            && status == Status::Ok
        {
            actions.push(Action::ClientListing {
                request,
                entries: std::mem::take(&mut self.listing),
            });
        }
        let line = match idle_broken {
            Some(_) => {
                format!("{} BAD Expected DONE to end IDLE\r\n", done.client_tag).into_bytes()
            }
            None => {
                let mut line = done.client_tag.clone().into_bytes();
                line.push(b' ');
                if done.expunge_issued && status == Status::Ok {
                    line.extend_from_slice(
                        b"OK [EXPUNGEISSUED] Some messages were already expunged.\r\n",
                    );
                } else {
                    line.extend_from_slice(&substitute(text, &done.substitutions));
                }
                if response::carries_capabilities(&line) {
                    line = response::replace_capabilities(&line, &self.capabilities);
                }
                line
            }
        };
        actions.push(Action::Client(line));
        actions
    }

    /// An untagged provider response, by its first line.
    pub fn plan_untagged(&mut self, kind: Untagged, line: &[u8]) -> UntaggedPlan {
        if kind == Untagged::State {
            self.on_untagged_code(line);
        }
        // Downloads may be pipelined: the answer's UID says whose body it takes.
        if kind == Untagged::Fetch
            && let Some(spliced) = self.in_flight.iter().find_map(|f| {
                let (bodies, partial) = f.bodies.as_ref()?;
                cached_fetch::splice(line, bodies, *partial)
            })
        {
            // The served message is named in the audit as if it had streamed from the
            // provider.
            let mut tap = FetchTap::default();
            tap.line(&spliced.bytes[..spliced.literal_at], true);
            tap.literal(spliced.literal());
            tap.line(b")\r\n", false);
            let seen = tap.finish();
            return UntaggedPlan::Cached {
                bytes: spliced.bytes,
                seen,
            };
        }
        if let Some(renumbering) = &mut self.renumbering
            && matches!(kind, Untagged::Fetch | Untagged::Other)
        {
            match renumbering.untagged(line) {
                Renumbered::Same => {}
                Renumbered::Held => return UntaggedPlan::Replace(Vec::new()),
                Renumbered::Line(line) if kind == Untagged::Fetch => {
                    let rename = self.in_flight.iter().any(|f| f.renames);
                    return UntaggedPlan::PassRenumbered { line, rename };
                }
                Renumbered::Line(line) => return UntaggedPlan::Replace(line),
            }
        }
        let list_in_flight = |lsub: bool| {
            self.in_flight
                .iter()
                .any(|f| f.list.as_ref().is_some_and(|l| l.lsub == lsub))
        };
        match kind {
            Untagged::Bye => UntaggedPlan::PassThenEnd,
            Untagged::Capability | Untagged::State if response::carries_capabilities(line) => {
                UntaggedPlan::Replace(response::replace_capabilities(line, &self.capabilities))
            }
            Untagged::List if list_in_flight(false) => UntaggedPlan::Gather,
            Untagged::Lsub if list_in_flight(true) => UntaggedPlan::Gather,
            Untagged::List | Untagged::Lsub => {
                UntaggedPlan::Violation("folder listing outside a LIST/LSUB".into())
            }
            Untagged::Status => UntaggedPlan::Gather,
            Untagged::Fetch if self.in_flight.iter().any(|f| f.renames) => {
                UntaggedPlan::PassRenamed
            }
            Untagged::Capability => {
                UntaggedPlan::Replace(response::replace_capabilities(line, &self.capabilities))
            }
            Untagged::State | Untagged::Fetch | Untagged::Other => UntaggedPlan::Pass,
        }
    }

    /// A whole gathered response (LIST, LSUB, STATUS).
    pub fn on_unit(&mut self, kind: Untagged, unit: &[u8]) -> Vec<Action> {
        match kind {
            Untagged::List | Untagged::Lsub => {
                match list_entry(unit) {
                    Some(entry) if self.listing.len() < MAX_LIST_ENTRIES => {
                        self.listing.push(entry)
                    }
                    Some(_) => {}
                    // Not relayed: the listing is computed from what parses.
                    None => tracing::warn!(
                        line = %crate::text::printable(unit, 200),
                        "unparseable folder listing line from the provider"
                    ),
                }
                Vec::new()
            }
            Untagged::Status if status_visible(unit, &self.policy) => {
                vec![Action::Client(unit.to_vec())]
            }
            _ => Vec::new(),
        }
    }

    /// A FETCH answer served a message's headers or body: its `message` event, so the audit
    /// can tell who read which message (`pecgate audit message`).
    /// Batched: a bulk download writes one event per many messages (the rest are written
    /// with the next completion).
    pub fn on_fetch_seen(&mut self, seen: FetchSeen) -> Vec<Action> {
        let Some(folder) = self.selected.clone() else {
            return Vec::new();
        };
        self.identities
            .seen(&folder, seen)
            .map(message_event)
            .into_iter()
            .collect()
    }

    /// An untagged `OK` carrying `[COPYUID …]` (what a MOVE answers before its expunges):
    /// kept in the detail of the oldest MOVE in flight, so the audit can follow the message;
    /// `[UIDVALIDITY n]` while a SELECT/EXAMINE is in flight: the folder's UIDVALIDITY.
    fn on_untagged_code(&mut self, line: &[u8]) {
        if !line.contains(&b'[') {
            return;
        }
        if let News::UidValidity(uidvalidity) = news(line)
            && self
                .in_flight
                .iter()
                .any(|f| f.class.selection == Selection::Select)
        {
            self.uidvalidity = Some(uidvalidity);
        }
        if let Some(code) = uid_code(line)
            && let Some(moving) = self.in_flight.iter_mut().find(|f| {
                f.summary.name.ends_with("MOVE") && !f.summary.detail.contains("copyuid=")
            })
        {
            moving.summary.detail = join_detail(&moving.summary.detail, &code);
        }
    }

    /// The Message-ID of the message an APPEND in flight (`upstream_tag`) carried.
    pub fn on_appended(&mut self, upstream_tag: &str, message_id: &str) {
        if let Some(append) = self
            .in_flight
            .iter_mut()
            .find(|f| f.upstream_tag == upstream_tag)
        {
            let id = crate::text::escape(message_id, false);
            append.summary.detail = join_detail(&append.summary.detail, &format!("message={id}"));
        }
    }

    /// The provider broke the protocol: end the session (its end event records why).
    pub fn on_violation(&self, reason: &str) -> Vec<Action> {
        vec![
            Action::Client(b"* BYE [UNAVAILABLE] The PEC provider sent something pecgate cannot attribute; reconnect\r\n".to_vec()),
            Action::End(Ending::ProviderViolation(reason.to_owned())),
        ]
    }

    /// The session is over: every command the provider never completed, as an error event.
    pub fn abandon(&mut self) -> Vec<AuditRecord> {
        let served = self
            .identities
            .take_batch()
            .map(|(folder, detail)| AuditRecord {
                command: "message".to_owned(),
                folder: Some(folder),
                detail,
                outcome: Outcome::Ok,
                durable: false,
            });
        served
            .into_iter()
            .chain(self.in_flight.drain(..).map(|f| {
                relayed(
                    &f.summary,
                    &f.upstream_tag,
                    Outcome::Error,
                    Some("no answer from the provider before the session ended"),
                )
            }))
            .chain(self.parked.take().map(|p| AuditRecord {
                command: p.summary.name,
                folder: p.summary.folder,
                detail: join_detail(&p.summary.detail, "parked; the session ended in IDLE"),
                outcome: Outcome::Ok,
                durable: false,
            }))
            .collect()
    }
}

/// pecgate's own identification: the provider never hears the client's.
fn id_answer(tag: &str) -> String {
    format!(
        "* ID (\"name\" \"pecgate\" \"version\" \"{}\")\r\n{tag} OK ID completed\r\n",
        env!("CARGO_PKG_VERSION")
    )
}

fn join_detail(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a} {b}"),
    }
}

/// The placeholder name of a SUBSCRIBE of a hidden folder, which must be undone.
fn command_for_undo(
    request: &Request,
    substitutions: &[(String, String)],
) -> Option<Mailbox<'static>> {
    match request {
        Request::Command(Command {
            body: CommandBody::Subscribe { mailbox },
            ..
        }) if !substitutions.is_empty() => Some(mailbox.clone()),
        _ => None,
    }
}

/// The event of a relayed command: its detail always ends with `upstream=<tag>`, the tag the
/// provider saw (auditors match it with the provider's own logs).
fn relayed(
    summary: &CommandSummary,
    upstream_tag: &str,
    outcome: Outcome,
    note: Option<&str>,
) -> AuditRecord {
    let detail = join_detail(&summary.detail, note.unwrap_or(""));
    AuditRecord {
        command: summary.name.clone(),
        folder: summary.folder.clone(),
        detail: join_detail(&detail, &format!("upstream={upstream_tag}")),
        outcome,
        durable: false,
    }
}

fn audit(command: &str, folder: Option<String>, detail: String, outcome: Outcome) -> Action {
    Action::Audit(AuditRecord {
        command: command.to_owned(),
        folder,
        detail,
        outcome,
        durable: false,
    })
}

/// The `message` event of a batch of served messages (see [`Identities`]).
fn message_event((folder, detail): (String, String)) -> Action {
    audit("message", Some(folder), detail, Outcome::Ok)
}

fn violation_end(reason: &str) -> Action {
    Action::End(Ending::ProviderViolation(reason.to_owned()))
}

/// The refusal of a command by the folder and permission policy.
fn deny(tag: &str, summary: &CommandSummary, decision: &Decision) -> Vec<Action> {
    let text = match decision {
        Decision::DenyPermission(permission) => {
            format!("Permission denied: your roles do not grant \"{permission}\" on this mailbox")
        }
        Decision::DenyName(name) => format!(
            "Permission denied: your roles do not allow a folder named \"{}\"",
            crate::text::escape(name, true)
        ),
        Decision::DenySubtree(name) => format!(
            "Permission denied: \"{}\" may have sub-folders outside your roles, so it cannot be renamed or deleted",
            crate::text::escape(name, true)
        ),
        other => unreachable!("not a denial: {other:?}"),
    };
    tracing::info!(command = %summary.name, folder = ?summary.folder, "denied: {text}");
    vec![
        audit(
            &summary.name,
            summary.folder.clone(),
            format!("{} ({text})", summary.detail),
            Outcome::Denied,
        ),
        Action::Client(format!("{tag} NO [NOPERM] {text}\r\n").into_bytes()),
    ]
}

#[cfg(test)]
#[path = "client_session_tests.rs"]
mod tests;
