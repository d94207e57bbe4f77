//! The client session machine and the provider client, driven together on bytes: what the
//! client sends, what goes upstream, what the client gets, what is audited. No sockets.

use bytes::BytesMut;
use imap_codec::imap_types::command::{Command, CommandBody};

use super::*;
use crate::config::Permission;
use crate::imap::command::{UpstreamStep, append_skeleton};
use crate::imap::framing::{Assembled, CommandAssembler, CommandLimits};
use crate::imap::listing::answer_list;
use crate::imap::provider_client::{ProviderClient, ProviderEvent};
use crate::policy::FolderPolicy;

enum Held {
    Command(Command<'static>),
    Append(Command<'static>, u32, bool),
}

/// One session with its provider client, fed like the relay feeds them.
struct Rig {
    session: ClientSession,
    provider: ProviderClient,
    assembler: CommandAssembler,
    input: BytesMut,
    /// Every byte sent upstream.
    upstream: Vec<u8>,
    /// Every byte sent to the client.
    client: Vec<u8>,
    audits: Vec<AuditRecord>,
    /// A command held back until something completes.
    waiting: Option<Held>,
    /// Bytes of an APPEND message still to stream (true) or throw away (false).
    streaming: Option<(usize, bool)>,
    /// After a message: its command's line end is awaited (true: the message went up).
    message_end: Option<bool>,
    ended: Option<Ending>,
    /// Everything taken from `upstream` so far (for the random-stream test).
    upstream_log: Vec<u8>,
}

fn rig(patterns: &[&str], permissions: &[Permission]) -> Rig {
    let policy = SessionPolicy {
        folders: FolderPolicy::new(patterns),
        permissions: permissions.iter().copied().collect(),
        delimiter: Some('/'),
        provider_unselect: true,
        max_message_bytes: 1 << 20,
    };
    Rig {
        session: ClientSession::new(
            std::sync::Arc::new(policy),
            vec!["IMAP4rev1".into(), "IDLE".into()],
        ),
        provider: ProviderClient::new(true),
        assembler: CommandAssembler::new(CommandLimits::default()),
        input: BytesMut::new(),
        upstream: Vec::new(),
        client: Vec::new(),
        audits: Vec::new(),
        waiting: None,
        streaming: None,
        message_end: None,
        ended: None,
        upstream_log: Vec::new(),
    }
}

impl Rig {
    /// Bytes from the client, processed as far as they go (a waiting command stops intake).
    fn client_sends(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
        self.pump();
    }

    fn pump(&mut self) {
        while self.waiting.is_none() && self.ended.is_none() {
            if let Some((remaining, forward)) = self.streaming {
                // An APPEND message being streamed, or thrown away.
                let n = remaining.min(self.input.len());
                let chunk = self.input.split_to(n);
                if forward {
                    self.upstream.extend_from_slice(&chunk);
                }
                self.streaming = (remaining > n).then_some((remaining - n, forward));
                if remaining > n {
                    return;
                }
                self.message_end = Some(forward);
                continue;
            }
            if let Some(forward) = self.message_end {
                // As the relay does: the command must end right after the message; pecgate
                // sends its own CRLF, anything else ends the session.
                let Some(end) = crate::io::find_line_end(&self.input, 0) else {
                    return;
                };
                let rest = self.input.split_to(end);
                self.message_end = None;
                if &rest[..] != b"\r\n" && &rest[..] != b"\n" {
                    self.ended = Some(Ending::Logout);
                    return;
                }
                if forward {
                    self.upstream.extend_from_slice(b"\r\n");
                }
                continue;
            }
            let idling = self.session.client_idling();
            let assembled = if idling {
                self.assembler.poll(&mut self.input, |_, l| l.sync)
            } else {
                self.assembler
                    .poll(&mut self.input, |h, l| append_skeleton(h, l).is_some())
            };
            let actions = match assembled {
                Assembled::NeedMore => return,
                Assembled::SendContinuation => {
                    self.client.extend_from_slice(b"+ Ready\r\n");
                    continue;
                }
                Assembled::Command(line) | Assembled::MessageLiteral { head: line, .. }
                    if idling =>
                {
                    self.session.idle_line(&line)
                }
                Assembled::Refused { .. } if idling => self.session.idle_line(b"(refused)"),
                Assembled::Refused { tag, reason } => {
                    self.session
                        .refuse_unparsed(tag.as_deref(), reason.text(), String::new())
                }
                Assembled::Command(bytes) => match parse_command(&bytes) {
                    Ok(command) => self.submit(Held::Command(command)),
                    Err(_) => self.session.refuse_unparsed(None, "Invalid", String::new()),
                },
                Assembled::MessageLiteral { head, literal } => {
                    let skeleton = append_skeleton(&head, &literal).unwrap();
                    self.submit(Held::Append(skeleton, literal.length, literal.sync))
                }
            };
            self.perform(actions);
        }
    }

    fn submit(&mut self, held: Held) -> Vec<Action> {
        let (outcome, append) = match held {
            Held::Command(command) => (self.session.submit(command), None),
            Held::Append(skeleton, length, sync) => (
                self.session.submit_append(skeleton, length, sync),
                Some((length, sync)),
            ),
        };
        match outcome {
            Submit::Ready(actions) => {
                if let Some((length, sync)) = append {
                    let sent = actions
                        .iter()
                        .any(|a| matches!(a, Action::Provider(Request::AppendHead { .. })));
                    // Sent: the message streams up. Refused: a LITERAL+ message is thrown
                    // away; a synchronising one was never sent (the client got no `+`).
                    if sent || !sync {
                        self.streaming = Some((length as usize, sent));
                    }
                }
                actions
            }
            Submit::Wait(command) => {
                self.waiting = Some(match append {
                    Some((length, sync)) => Held::Append(command, length, sync),
                    None => Held::Command(command),
                });
                Vec::new()
            }
        }
    }

    /// A provider response line (whole units only: no literals in these tests).
    fn provider_sends(&mut self, line: &str) {
        self.provider_sends_bytes(line.as_bytes());
    }

    fn provider_sends_bytes(&mut self, line: &[u8]) {
        let actions = match self.provider.on_line(line) {
            ProviderEvent::Continuation { tag } => self.session.on_idle_continuation(&tag, line),
            ProviderEvent::Completed { tag, status, text } => {
                self.session.on_completed(&tag, status, &text)
            }
            ProviderEvent::Untagged(kind) => match self.session.plan_untagged(kind, line) {
                UntaggedPlan::Pass | UntaggedPlan::PassThenEnd => {
                    vec![Action::Client(line.to_vec())]
                }
                UntaggedPlan::PassRenamed => vec![Action::Client(
                    crate::imap::authorize::rename_rfc822_items(line),
                )],
                UntaggedPlan::PassRenumbered { line, .. } => vec![Action::Client(line)],
                UntaggedPlan::Cached { bytes, seen } => {
                    let mut actions = vec![Action::Client(bytes)];
                    actions.extend(
                        seen.map(|seen| self.session.on_fetch_seen(seen))
                            .unwrap_or_default(),
                    );
                    actions
                }
                UntaggedPlan::Replace(bytes) => vec![Action::Client(bytes)],
                UntaggedPlan::Gather => self.session.on_unit(kind, line),
                UntaggedPlan::Violation(reason) => self.session.on_violation(&reason),
            },
            ProviderEvent::Violation(reason) => self.session.on_violation(&reason),
        };
        self.perform(actions);
        if let Some(held) = self.waiting.take() {
            let actions = self.submit(held);
            self.perform(actions);
            self.pump();
        }
    }

    fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Audit(record) => self.audits.push(record),
                Action::Client(bytes) => self.client.extend_from_slice(&bytes),
                Action::ClientListing { request, entries } => {
                    for line in answer_list(&request, &entries, self.session.policy()) {
                        self.client.extend_from_slice(&line);
                    }
                }
                Action::Provider(Request::Command(command)) => {
                    for step in self.provider.encode(&command) {
                        if let UpstreamStep::Send(bytes) = step {
                            self.upstream.extend_from_slice(&bytes);
                        }
                    }
                }
                Action::Provider(Request::AppendHead {
                    skeleton, length, ..
                }) => {
                    for step in self.provider.encode_append(&skeleton, length) {
                        if let UpstreamStep::Send(bytes) = step {
                            self.upstream.extend_from_slice(&bytes);
                        }
                    }
                }
                Action::Provider(Request::Done) => {
                    if let Some(done) = self.provider.done() {
                        self.upstream.extend_from_slice(done);
                    }
                }
                Action::End(ending) => self.ended = Some(ending),
            }
        }
    }

    /// Upstream lines so far, and forget them.
    fn take_upstream(&mut self) -> Vec<String> {
        let text = String::from_utf8_lossy(&std::mem::take(&mut self.upstream)).into_owned();
        text.split_inclusive("\r\n").map(str::to_owned).collect()
    }

    fn take_client(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.client)).into_owned()
    }

    /// INBOX selected (the provider saying `untagged` first); what the client heard dropped.
    fn select_inbox(&mut self, untagged: &[&str]) {
        self.client_sends(b"s SELECT INBOX\r\n");
        let tag = Rig::last_tag(&self.take_upstream());
        for line in untagged {
            self.provider_sends(line);
        }
        self.provider_sends(&format!("{tag} OK [READ-WRITE] done\r\n"));
        self.take_client();
    }

    /// The IDLE whose DONE was sent and which the provider has not completed yet.
    fn idle_tag_waiting_for_done(&self) -> Option<String> {
        let idle = self.session.idle.as_ref()?;
        (idle.phase == IdlePhase::DoneSent).then(|| idle.upstream_tag.clone())
    }

    /// The upstream tag of the last command sent.
    fn last_tag(lines: &[String]) -> String {
        lines
            .iter()
            .rev()
            .find(|l| l.starts_with('c'))
            .and_then(|l| l.split(' ').next())
            .expect("a command went upstream")
            .to_owned()
    }
}

const ALL: &[Permission] = &Permission::ALL;

#[test]
fn commands_go_up_under_pecgate_tags_and_come_back_under_the_clients() {
    let mut r = rig(&["INBOX"], ALL);
    r.client_sends(b"a1 SELECT INBOX\r\n");
    let up = r.take_upstream();
    assert_eq!(up.len(), 1);
    let tag = Rig::last_tag(&up);
    assert_eq!(up[0], format!("{tag} SELECT INBOX\r\n"));
    assert!(!up[0].contains("a1"));
    r.provider_sends("* 3 EXISTS\r\n");
    r.provider_sends(&format!("{tag} OK [READ-WRITE] Select completed\r\n"));
    assert_eq!(
        r.take_client(),
        "* 3 EXISTS\r\na1 OK [READ-WRITE] Select completed\r\n"
    );
    assert_eq!(r.session.selected(), Some("INBOX"));
    let last = r.audits.last().unwrap();
    assert_eq!(last.command, "SELECT");
    assert_eq!(last.outcome, Outcome::Ok);
    assert!(
        last.detail.ends_with(&format!("upstream={tag}")),
        "{}",
        last.detail
    );
}

#[test]
fn idle_then_append_literal_never_reaches_the_provider() {
    // Route 1 of the report: during IDLE an APPEND whose literal carries commands.
    let mut r = rig(&["INBOX"], ALL);
    r.client_sends(b"a IDLE\r\n");
    let tag = Rig::last_tag(&r.take_upstream());
    r.provider_sends("+ idling\r\n");
    assert_eq!(r.take_client(), "+ idling\r\n");
    let literal = b"c SELECT Segreto\r\nd UID FETCH 1:* BODY.PEEK[]\r\n";
    let mut bytes = format!("b APPEND INBOX {{{}+}}\r\n", literal.len()).into_bytes();
    bytes.extend_from_slice(literal);
    bytes.extend_from_slice(b"\r\n");
    r.client_sends(&bytes);
    // Nothing of it went up but pecgate's own DONE.
    assert_eq!(r.take_upstream(), ["DONE\r\n"]);
    r.provider_sends(&format!("{tag} OK Idle completed\r\n"));
    let client = r.take_client();
    assert_eq!(client, "a BAD Expected DONE to end IDLE\r\n");
    // The whole APPEND, literal included, was the line that ended the IDLE: dropped.
    assert!(r.take_upstream().is_empty());
    // A synchronising literal during IDLE is never invited with a `+`.
    r.client_sends(b"e IDLE\r\n");
    let tag = Rig::last_tag(&r.take_upstream());
    r.provider_sends("+ idling\r\n");
    r.client_sends(b"f APPEND INBOX {5}\r\n");
    r.provider_sends(&format!("{tag} OK Idle completed\r\n"));
    assert_eq!(
        r.take_client(),
        "+ idling\r\ne BAD Expected DONE to end IDLE\r\n"
    );
    let idle_event = r.audits.iter().find(|a| a.command == "IDLE").unwrap();
    assert_eq!(idle_event.outcome, Outcome::Bad);
}

#[test]
fn a_reused_tag_is_refused_and_idle_is_not_confused() {
    // Route 2: `a NOOP` and `a IDLE` pipelined under one tag, then an ID literal.
    let mut r = rig(&["INBOX"], &[Permission::Read]);
    r.client_sends(b"a NOOP\r\na IDLE\r\n");
    let up = r.take_upstream();
    assert_eq!(up.len(), 1, "{up:?}");
    assert!(up[0].ends_with(" NOOP\r\n"));
    assert_eq!(
        r.take_client(),
        "a BAD Tag already in use by a running command\r\n"
    );
    assert!(!r.session.client_idling());
    // The literal is part of one (invalid) ID command: refused whole, nothing goes up.
    r.client_sends(b"y ID {18+}\r\ny SELECT Segreto\r\n\r\n");
    assert!(r.take_upstream().is_empty());
    assert!(r.take_client().starts_with("* BAD"));
    r.client_sends(b"z ID (\"name\" \"Thunderbird\")\r\n");
    assert!(r.take_upstream().is_empty(), "ID is answered by pecgate");
    assert!(r.take_client().contains("* ID (\"name\" \"pecgate\""));
}

#[test]
fn selection_runs_alone_so_the_audit_names_the_right_folder() {
    let mut r = rig(&["INBOX", "Sent"], ALL);
    r.client_sends(b"s1 SELECT Sent\r\nf1 UID FETCH 1 FLAGS\r\n");
    let up = r.take_upstream();
    assert_eq!(up.len(), 1, "the FETCH waits for the SELECT: {up:?}");
    r.provider_sends(&format!("{} OK [READ-WRITE] done\r\n", Rig::last_tag(&up)));
    let up = r.take_upstream();
    assert!(up[0].ends_with(" UID FETCH 1 FLAGS\r\n"), "{up:?}");
    r.provider_sends(&format!("{} OK Fetch completed\r\n", Rig::last_tag(&up)));
    let fetch = r.audits.iter().find(|a| a.command == "UID FETCH").unwrap();
    assert_eq!(fetch.folder.as_deref(), Some("Sent"));
    assert!(r.take_client().ends_with("f1 OK Fetch completed\r\n"));
}

#[test]
fn state_changes_are_recorded_durably_before_they_leave() {
    let mut r = rig(&["INBOX"], ALL);
    r.client_sends(b"s SELECT INBOX\r\n");
    let tag = Rig::last_tag(&r.take_upstream());
    r.provider_sends(&format!("{tag} OK done\r\n"));
    r.audits.clear();
    r.client_sends(b"t UID STORE 4 +FLAGS (\\Seen)\r\n");
    let tag = Rig::last_tag(&r.take_upstream());
    assert_eq!(r.audits.len(), 1);
    assert!(r.audits[0].durable && r.audits[0].outcome == Outcome::Sent);
    r.provider_sends(&format!("{tag} OK Store completed\r\n"));
    assert_eq!(r.audits[1].outcome, Outcome::Ok);
    assert_eq!(r.audits[0].detail, r.audits[1].detail);
    assert_eq!(r.audits[1].folder.as_deref(), Some("INBOX"));
}

#[test]
fn what_the_provider_was_not_asked_ends_the_session() {
    for line in [
        "c999999 OK spoofed\r\n",
        "a1 OK client's tag\r\n",
        "+ nobody asked\r\n",
        "* LIST () \"/\" Segreto\r\n",
        "* PREAUTH\r\n",
        "garbage\r\n",
    ] {
        let mut r = rig(&["INBOX"], ALL);
        r.client_sends(b"a1 NOOP\r\n");
        r.provider_sends(line);
        assert!(
            matches!(r.ended, Some(Ending::ProviderViolation(_))),
            "{line:?} was accepted"
        );
        assert!(r.take_client().starts_with("* BYE"), "{line:?}");
    }
}

#[test]
fn without_flag_bodies_are_peeked_and_rfc822_keeps_its_name() {
    let mut r = rig(&["INBOX"], &[Permission::Read]);
    r.client_sends(b"s SELECT INBOX\r\n");
    let tag = Rig::last_tag(&r.take_upstream());
    r.provider_sends(&format!("{tag} OK done\r\n"));
    r.client_sends(b"f FETCH 1 (BODY[TEXT] BODY[HEADER.FIELDS (SUBJECT)])\r\n");
    let up = r.take_upstream();
    assert!(
        up[0].ends_with(" FETCH 1 (BODY.PEEK[TEXT] BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"),
        "{up:?}"
    );
    r.provider_sends(&format!("{} OK done\r\n", Rig::last_tag(&up)));
    r.take_client();
    r.client_sends(b"g FETCH 1 RFC822\r\n");
    let up = r.take_upstream();
    assert!(up[0].ends_with(" FETCH 1 BODY.PEEK[]\r\n"), "{up:?}");
    r.provider_sends("* 1 FETCH (BODY[] NIL)\r\n");
    r.provider_sends(&format!("{} OK done\r\n", Rig::last_tag(&up)));
    assert_eq!(r.take_client(), "* 1 FETCH (RFC822 NIL)\r\ng OK done\r\n");
    // With `flag` nothing is rewritten.
    let mut r = rig(&["INBOX"], ALL);
    r.client_sends(b"f FETCH 1 RFC822\r\n");
    assert!(r.take_upstream()[0].ends_with(" FETCH 1 RFC822\r\n"));
}

#[test]
fn meaning_is_preserved_on_the_way_up() {
    let mut r = rig(&["INBOX"], ALL);
    r.client_sends(b"s SELECT INBOX\r\n");
    let tag = Rig::last_tag(&r.take_upstream());
    r.provider_sends(&format!("{tag} OK done\r\n"));
    for (sent, expected) in [
        ("UID SEARCH UID 6:4294967295", "UID SEARCH UID 6:4294967295"),
        ("FETCH 5:3,1 FLAGS", "FETCH 5:3,1 FLAGS"),
        ("UID FETCH 1:* (FLAGS)", "UID FETCH 1:* FLAGS"),
    ] {
        r.client_sends(format!("x {sent}\r\n").as_bytes());
        let up = r.take_upstream();
        let tag = Rig::last_tag(&up);
        assert_eq!(up[0], format!("{tag} {expected}\r\n"));
        r.provider_sends(&format!("{tag} OK done\r\n"));
    }
}

#[test]
fn names_with_control_characters_never_leave() {
    let mut r = rig(&["**"], ALL);
    r.client_sends(b"a SELECT {5+}\r\nA\r\nBC\r\n");
    r.client_sends(b"b CREATE &AA0ACg-x\r\n");
    assert!(r.take_upstream().is_empty());
    let client = r.take_client();
    assert!(
        client.starts_with("a BAD Mailbox names with control characters"),
        "{client}"
    );
    assert!(
        client.contains("\r\nb BAD Mailbox names with control characters"),
        "{client}"
    );
    // Recorded, escaped: an auditor reads `A\r\nBC`, never a forged row.
    assert_eq!(r.audits[0].folder.as_deref(), Some("A\\r\\nBC"));
}

#[test]
fn a_subscription_to_a_hidden_folder_never_stays_with_the_provider() {
    let mut r = rig(&["INBOX", "Sent"], ALL);
    // The provider's own answer (here: it accepts names that do not exist) reaches the
    // client, and pecgate's UNSUBSCRIBE of the placeholder follows in the same write.
    r.client_sends(b"a SUBSCRIBE Riservata\r\n");
    let up = r.take_upstream();
    assert_eq!(up.len(), 2, "{up:?}");
    let (subscribe, undo) = (&up[0], &up[1]);
    let placeholder = subscribe.split(' ').nth(2).unwrap().trim_end().to_owned();
    assert!(placeholder.starts_with("pecgate-none-"), "{subscribe}");
    assert!(
        undo.ends_with(&format!(" UNSUBSCRIBE {placeholder}\r\n")),
        "{undo}"
    );
    let tag = |line: &str| line.split(' ').next().unwrap().to_owned();
    r.provider_sends(&format!("{} OK Subscribe completed.\r\n", tag(subscribe)));
    r.provider_sends(&format!("{} OK Unsubscribe completed.\r\n", tag(undo)));
    // The client hears only about its own command.
    assert_eq!(r.take_client(), "a OK Subscribe completed.\r\n");
    let undo_rows: Vec<_> = r
        .audits
        .iter()
        .filter(|a| a.command == "UNSUBSCRIBE")
        .collect();
    assert_eq!(undo_rows.len(), 2, "sent, then its outcome");
    assert!(undo_rows.iter().all(|a| a.detail.contains("by pecgate")));
    // A visible folder is relayed alone; an UNSUBSCRIBE of a hidden one needs no undo.
    r.client_sends(b"c SUBSCRIBE Sent\r\nd UNSUBSCRIBE Riservata\r\n");
    let up = r.take_upstream();
    assert_eq!(up.len(), 2, "{up:?}");
    assert!(up[0].ends_with(" SUBSCRIBE Sent\r\n"));
    assert!(up[1].contains(" UNSUBSCRIBE pecgate-none-"));
}

#[test]
fn an_append_over_the_mailbox_limit_is_refused_unread() {
    let mut r = rig(&["INBOX"], ALL);
    let too_big = (1 << 20) + 1;
    // Synchronising: never invited, nothing goes up.
    r.client_sends(format!("a APPEND INBOX {{{too_big}}}\r\n").as_bytes());
    assert!(r.take_upstream().is_empty());
    let client = r.take_client();
    assert!(
        client.starts_with("a NO [TOOBIG] Message too large"),
        "{client}"
    );
    // LITERAL+: thrown away, and the next command is served.
    let mut bytes = format!("b APPEND INBOX {{{too_big}+}}\r\n").into_bytes();
    bytes.extend(std::iter::repeat_n(b'x', too_big));
    bytes.extend_from_slice(b"\r\nc NOOP\r\n");
    r.client_sends(&bytes);
    let up = r.take_upstream();
    assert_eq!(up.len(), 1, "{up:?}");
    assert!(up[0].ends_with(" NOOP\r\n"));
    assert!(r.take_client().starts_with("b NO [TOOBIG]"));
    assert_eq!(r.audits[0].outcome, Outcome::No);
}

#[test]
fn create_with_a_trailing_delimiter_is_decided_on_the_name() {
    let mut r = rig(&["INBOX", "Ricevute/**"], ALL);
    r.client_sends(b"a CREATE Ricevute/2027/\r\n");
    let up = r.take_upstream();
    assert!(up[0].ends_with(" CREATE Ricevute/2027/\r\n"), "{up:?}");
    r.client_sends(b"b CREATE Segreto/\r\n");
    assert!(r.take_client().starts_with("b NO [NOPERM]"));
}

#[test]
fn listings_come_from_the_visible_tree_only() {
    let mut r = rig(&["INBOX"], ALL);
    r.client_sends(b"l LIST \"\" \"*\"\r\n");
    let up = r.take_upstream();
    let tag = Rig::last_tag(&up);
    assert_eq!(up[0], format!("{tag} LIST \"\" \"*\"\r\n"));
    r.provider_sends("* LIST (\\HasNoChildren) \"/\" INBOX\r\n");
    r.provider_sends("* LIST (\\HasNoChildren) \"/\" Segreto\r\n");
    r.provider_sends(&format!("{tag} OK List completed\r\n"));
    let client = r.take_client();
    assert!(
        client.contains("INBOX") && !client.contains("Segreto"),
        "{client}"
    );
    assert!(client.ends_with("l OK List completed\r\n"));
    // A pattern of hundreds of wildcards is collapsed and answered.
    let pattern = "*".repeat(200);
    r.client_sends(format!("m LIST \"\" \"{pattern}]\"\r\n").as_bytes());
    let tag = Rig::last_tag(&r.take_upstream());
    r.provider_sends("* LIST () \"/\" INBOX\r\n");
    r.provider_sends(&format!("{tag} OK done\r\n"));
    assert!(r.take_client().ends_with("m OK done\r\n"));
}

#[test]
fn id_with_many_long_fields_is_answered() {
    let mut r = rig(&["INBOX"], ALL);
    // Beyond RFC 2971's limits (30 pairs, 30-octet names, 1024-octet values) and still
    // answered: pecgate records what fits and never sends it upstream.
    for (pairs, value) in [(30, 1024), (45, 1200)] {
        let fields: Vec<String> = (0..pairs)
            .map(|i| format!("\"field-{i}-{}\" \"{}\"", "k".repeat(40), "v".repeat(value)))
            .collect();
        r.client_sends(format!("i ID ({})\r\n", fields.join(" ")).as_bytes());
        let client = r.take_client();
        assert!(client.ends_with("i OK ID completed\r\n"), "{client}");
    }
    assert!(r.take_upstream().is_empty());
    let event = r.audits.last().unwrap();
    assert!(event.detail.len() <= 2048, "{}", event.detail.len());
}

/// Random client streams (tag reuse, IDLE/DONE at wrong times, literals of both kinds in every
/// position, APPEND messages that look like commands, garbage) against a provider that answers
/// everything. Whatever the client sends, every command the provider receives is one pecgate
/// encoded: its own tag, a granted name or a placeholder, never a hidden name.
#[test]
fn random_streams_never_put_client_words_upstream() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("PECGATE_STREAM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (PECGATE_STREAM_SEED={seed} to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pieces: &[&[u8]] = &[
        b"a NOOP\r\n",
        b"a IDLE\r\n",
        b"DONE\r\n",
        b"b SELECT INBOX\r\n",
        b"b SELECT Segreto\r\n",
        b"c SELECT {7+}\r\nSegreto\r\n",
        b"c EXAMINE {5}\r\nINBOX\r\n",
        b"d UID FETCH 1:* (BODY.PEEK[] FLAGS)\r\n",
        b"d FETCH 1 RFC822\r\n",
        b"e LIST \"\" *\r\n",
        b"e LSUB \"\" \"*\"\r\n",
        b"f STATUS Segreto (MESSAGES)\r\n",
        b"g APPEND INBOX {40+}\r\nx SELECT Segreto\r\ny UID FETCH 1:* BODY[]\r\n\r\n",
        b"g APPEND INBOX {40}\r\nx SELECT Segreto\r\ny UID FETCH 1:* BODY[]\r\n\r\n",
        b"h ID {18+}\r\ny SELECT Segreto\r\n\r\n",
        b"i UID STORE 1 +FLAGS (\\Seen)\r\n",
        b"i UID MOVE 1 Segreto\r\n",
        b"j CREATE Segreto/x\r\n",
        b"j RENAME INBOX/a {7+}\r\nSegreto\r\n",
        b"k CLOSE\r\n",
        b"k UNSELECT\r\n",
        b"l SEARCH TEXT {6+}\r\nSELECT\r\n",
        b"\x00\xff garbage {3+}\r\n",
        b"m CAPABILITY\r\n",
        b"z SELECT\r\n",
    ];
    for role in [
        &[Permission::Read][..],
        &[Permission::Read, Permission::Flag, Permission::Append][..],
        ALL,
    ] {
        let mut r = rig(&["INBOX", "INBOX/**", "Sent"], role);
        for _ in 0..3000 {
            let piece = pieces[rng.gen_range(0..pieces.len())];
            if rng.gen_bool(0.1) {
                // Cut anywhere: the rest arrives with the next piece.
                let cut = rng.gen_range(0..piece.len());
                r.client_sends(&piece[..cut]);
                r.client_sends(&piece[cut..]);
            } else {
                r.client_sends(piece);
            }
            // The provider answers what is in flight, now or a little later.
            if rng.gen_bool(0.7) {
                answer_everything(&mut r);
            }
            if r.ended.is_some() {
                panic!("seed {seed}: the session ended: {:?}", r.ended);
            }
        }
        answer_everything(&mut r);
        let (commands, dones, appends) = check_upstream(&r.upstream_log, seed, false);
        // The stream really went through every path (else the checks above prove little).
        assert!(
            commands > 1000 && dones > 20,
            "seed {seed}: {commands} commands, {dones} DONE"
        );
        assert_eq!(
            appends > 0,
            role.contains(&Permission::Append),
            "seed {seed}"
        );
        let client = String::from_utf8_lossy(&r.client);
        assert!(!client.contains("Segreto\r\n* "), "seed {seed}");
    }
}

/// Complete every command in flight (OK), accept IDLE with `+`.
fn answer_everything(r: &mut Rig) {
    for _ in 0..8 {
        // The log keeps the raw bytes (a message may hold any octet).
        r.upstream_log.extend_from_slice(&r.upstream);
        let sent = r.take_upstream();
        let tags: Vec<(String, bool)> = sent
            .iter()
            .filter_map(|l| {
                let mut words = l.split(' ');
                let tag = words.next()?;
                let verb = words.next()?.trim_end();
                (tag.starts_with('c') && tag[1..].chars().all(|c| c.is_ascii_digit()))
                    .then(|| (tag.to_owned(), verb.eq_ignore_ascii_case("IDLE")))
            })
            .collect();
        if tags.is_empty() && !sent.iter().any(|l| l == "DONE\r\n") {
            return;
        }
        for (tag, idle) in tags {
            if idle {
                r.provider_sends("+ idling\r\n");
                if r.session.client_idling() {
                    continue;
                }
            }
            r.provider_sends(&format!("{tag} OK done\r\n"));
        }
        if let Some(tag) = r.idle_tag_waiting_for_done() {
            r.provider_sends(&format!("{tag} OK Idle done\r\n"));
        }
    }
}

/// Frame the upstream bytes as a server would and check every command.
fn check_upstream(bytes: &[u8], seed: u64, partial_end: bool) -> (usize, usize, usize) {
    let (mut commands, mut dones, mut appends) = (0, 0, 0);
    let mut input = BytesMut::from(bytes);
    let mut assembler = CommandAssembler::new(CommandLimits {
        max_literal: 1 << 20,
        ..CommandLimits::default()
    });
    let mut after_idle = false;
    loop {
        if after_idle {
            // An idling server reads the next line as a plain line: it must be DONE.
            let Some(end) = crate::io::find_line_end(&input, 0) else {
                break;
            };
            assert_eq!(
                &input[..end],
                b"DONE\r\n",
                "seed {seed}: only DONE during IDLE"
            );
            let _ = input.split_to(end);
            after_idle = false;
            dones += 1;
            continue;
        }
        match assembler.poll(&mut input, |h, l| append_skeleton(h, l).is_some()) {
            Assembled::NeedMore => break,
            Assembled::MessageLiteral { head, literal } => {
                // An APPEND: its head is pecgate's; the message is the client's, passed as is
                // (never parsed), then pecgate's CRLF ends the command.
                let skeleton = append_skeleton(&head, &literal)
                    .unwrap_or_else(|| panic!("seed {seed}: bad APPEND head {head:?}"));
                let tag = skeleton.tag.as_ref();
                assert!(
                    tag.starts_with('c') && tag[1..].chars().all(|c| c.is_ascii_digit()),
                    "seed {seed}: not a pecgate tag: {head:?}"
                );
                let mut skeleton = skeleton;
                for mailbox in crate::imap::classify::mailboxes_mut(&mut skeleton.body) {
                    assert_visible_or_placeholder(mailbox, seed, "APPEND");
                }
                let length = literal.length as usize;
                if input.len() < length + 2 {
                    break;
                }
                let _ = input.split_to(length);
                assert_eq!(
                    &input[..2],
                    b"\r\n",
                    "seed {seed}: APPEND not ended by CRLF"
                );
                let _ = input.split_to(2);
                commands += 1;
                appends += 1;
            }
            Assembled::SendContinuation => continue,
            Assembled::Command(command) => {
                let text = String::from_utf8_lossy(&command);
                let parsed = parse_command(&command)
                    .unwrap_or_else(|_| panic!("seed {seed}: unparseable upstream {text:?}"));
                let tag = parsed.tag.as_ref();
                assert!(
                    tag.starts_with('c') && tag[1..].chars().all(|c| c.is_ascii_digit()),
                    "seed {seed}: not a pecgate tag: {text:?}"
                );
                let is_append = matches!(parsed.body, CommandBody::Append { .. });
                let mut parsed = parsed;
                for mailbox in crate::imap::classify::mailboxes_mut(&mut parsed.body) {
                    assert_visible_or_placeholder(mailbox, seed, &text);
                }
                after_idle = matches!(parsed.body, CommandBody::Idle);
                commands += 1;
                appends += usize::from(is_append);
            }
            other => panic!("seed {seed}: upstream framing: {other:?}"),
        }
    }
    assert!(
        partial_end || input.is_empty(),
        "seed {seed}: trailing upstream bytes"
    );
    (commands, dones, appends)
}

/// Every folder name that goes upstream is one the test policies (`INBOX`, `INBOX/**`,
/// `Sent`) grant, or a placeholder for a hidden one.
fn assert_visible_or_placeholder(
    mailbox: &imap_codec::imap_types::mailbox::Mailbox<'static>,
    seed: u64,
    text: &str,
) {
    let name = crate::imap::command::mailbox_name(mailbox);
    let placeholder = name.split('/').any(|s| s.starts_with("pecgate-none-"));
    let granted =
        FolderPolicy::new(&["INBOX", "INBOX/**", "Sent"]).grants_wire(name.as_bytes(), Some('/'));
    assert!(
        placeholder || granted,
        "seed {seed}: a hidden name went upstream: {name:?} in {text:?}"
    );
}

#[test]
fn pipelining_is_bounded() {
    let mut r = rig(&["INBOX"], ALL);
    let burst: Vec<u8> = (0..200)
        .flat_map(|i| format!("n{i} NOOP\r\n").into_bytes())
        .collect();
    r.client_sends(&burst);
    let up = r.take_upstream();
    assert_eq!(up.len(), MAX_IN_FLIGHT, "the rest waits, unread");
    // Each completion lets one more go; in the end every NOOP is answered, in order.
    for line in up {
        r.provider_sends(&format!("{} OK done\r\n", Rig::last_tag(&[line])));
    }
    while !r.session.in_flight.is_empty() {
        let up = r.take_upstream();
        for line in up {
            r.provider_sends(&format!("{} OK done\r\n", Rig::last_tag(&[line])));
        }
    }
    let client = r.take_client();
    assert_eq!(client.lines().count(), 200);
    assert!(
        client
            .lines()
            .enumerate()
            .all(|(i, l)| l == format!("n{i} OK done"))
    );
}

/// Fuzz target: mutated client streams against a provider that answers everything. Every
/// command that reaches the provider is pecgate's own encoding (see `check_upstream`).
#[test]
fn fuzz_imap_session() {
    crate::fuzz::run(
        "imap_session",
        &[
            b"a SELECT INBOX\r\nb UID FETCH 1:* (BODY[] FLAGS)\r\nc IDLE\r\nDONE\r\n",
            b"a SELECT {7+}\r\nSegreto\r\nb LIST \"\" *\r\n",
            b"g APPEND INBOX {40+}\r\nx SELECT Segreto\r\ny UID FETCH 1:* BODY[]\r\n\r\n",
            b"i UID STORE 1 +FLAGS (\\Seen)\r\nj UID MOVE 1 Segreto\r\nk CLOSE\r\n",
            b"l SEARCH TEXT {6+}\r\nSELECT\r\nm IDLE\r\nn NOOP\r\n",
        ],
        3_000,
        2048,
        |input| {
            let mut r = rig(&["INBOX", "INBOX/**", "Sent"], ALL);
            // Delivered in two pieces: a command cut anywhere must assemble the same way.
            let cut = input.len() / 2;
            r.client_sends(&input[..cut]);
            answer_everything(&mut r);
            r.client_sends(&input[cut..]);
            answer_everything(&mut r);
            let upstream = std::mem::take(&mut r.upstream_log);
            // Input that stops mid-APPEND leaves the provider mid-command, as does a session
            // ended there (the relay then closes the connection, sending nothing more).
            let partial = r.ended.is_some() || r.streaming.is_some() || r.message_end.is_some();
            let (commands, dones, appends) = check_upstream(&upstream, 0, partial);
            crate::fuzz::feature(&[
                commands.min(8) as u64,
                dones.min(2) as u64,
                appends.min(2) as u64,
                r.ended.is_some() as u64,
            ])
        },
    );
}

/// Fuzz target: whatever the provider sends while commands are in flight, the session
/// machine never panics, and no LIST line that reaches the client names a hidden folder.
#[test]
fn fuzz_imap_provider_responses() {
    crate::fuzz::run(
        "imap_provider_responses",
        &[
            b"* 2 EXISTS\r\n* 1 FETCH (UID 4 FLAGS (\\Seen))\r\nc1 OK done\r\n",
            b"* LIST () \"/\" Segreto\r\n* LIST () \"/\" INBOX\r\nc3 OK done\r\n",
            b"+ idling\r\n* 3 EXPUNGE\r\nc4 OK idle done\r\n",
            b"* STATUS Segreto (MESSAGES 1)\r\n* BYE bye\r\n",
            b"c2 NO [TRYCREATE] no\r\nc9 OK stray\r\n",
        ],
        5_000,
        2048,
        |input| {
            let mut r = rig(&["INBOX", "Sent"], ALL);
            r.client_sends(b"a SELECT INBOX\r\nb UID FETCH 1:* FLAGS\r\nc LIST \"\" *\r\n");
            // Rename the seed's c1..c9 to the tags really in flight.
            let sent = r.take_upstream();
            let tags: Vec<String> = sent
                .iter()
                .filter_map(|l| l.split(' ').next().map(str::to_owned))
                .collect();
            let mut text = input.to_vec();
            for (i, tag) in tags.iter().enumerate() {
                let seed_tag = format!("c{} ", i + 1);
                text = replace_all(&text, seed_tag.as_bytes(), format!("{tag} ").as_bytes());
            }
            let mut lines = 0u64;
            for line in text.split_inclusive(|&b| b == b'\n') {
                if r.ended.is_some() {
                    break;
                }
                r.provider_sends_bytes(line);
                lines += 1;
            }
            let client = String::from_utf8_lossy(&r.client).into_owned();
            for line in client.lines().filter(|l| l.starts_with("* LIST")) {
                assert!(!line.contains("Segreto"), "hidden folder listed: {line:?}");
            }
            crate::fuzz::feature(&[lines.min(6), r.ended.is_some() as u64])
        },
    );
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn a_session_whose_numbering_differs_is_translated_until_it_can_be_told() {
    let mut r = rig(&["INBOX", "Archive"], ALL);
    r.select_inbox(&["* OK [UIDVALIDITY 7] UIDs valid\r\n"]);
    assert_eq!(r.session.uidvalidity(), Some(7));
    // Client: 1 live, 2 gone upstream, 3 live; the new connection numbers 1 and 2.
    r.session
        .renumber(crate::imap::renumber::Renumbering::new(vec![2], 2));
    r.client_sends(b"f FETCH 1:* (UID FLAGS)\r\n");
    let up = r.take_upstream();
    assert!(up[0].ends_with(" FETCH 1:2 (UID FLAGS)\r\n"), "{up:?}");
    r.provider_sends("* 1 FETCH (UID 10 FLAGS ())\r\n");
    r.provider_sends("* 2 FETCH (UID 12 FLAGS (\\Seen))\r\n");
    r.provider_sends("* 3 EXISTS\r\n");
    // Pipelined behind it: waits, as every command does while the numberings differ.
    r.client_sends(b"g FETCH 2 FLAGS\r\n");
    assert_eq!(r.take_upstream().len(), 0);
    r.provider_sends(&format!("{} OK Fetch completed\r\n", Rig::last_tag(&up)));
    assert_eq!(
        r.take_client(),
        "* 1 FETCH (UID 10 FLAGS ())\r\n* 3 FETCH (UID 12 FLAGS (\\Seen))\r\n* 4 EXISTS\r\n\
         f OK [EXPUNGEISSUED] Some messages were already expunged.\r\n\
         g OK [EXPUNGEISSUED] Some messages were already expunged.\r\n"
    );
    assert!(
        r.take_upstream().is_empty(),
        "only a gone message: nothing to ask"
    );
    // COPY may carry EXPUNGE: told first, then the one numbering.
    r.client_sends(b"c COPY 3 Archive\r\n");
    let up = r.take_upstream();
    assert!(up[0].ends_with(" COPY 2 Archive\r\n"), "{up:?}");
    assert_eq!(r.take_client(), "* 2 EXPUNGE\r\n");
    r.provider_sends(&format!("{} OK done\r\n", Rig::last_tag(&up)));
    r.client_sends(b"n FETCH 2 FLAGS\r\n");
    let up = r.take_upstream();
    assert!(up[0].ends_with(" FETCH 2 FLAGS\r\n"), "{up:?}");
    assert!(r.session.renumbering().is_none());
}

#[test]
fn a_download_the_cache_holds_asks_the_provider_only_the_rest() {
    let mut r = rig(&["INBOX"], ALL);
    r.select_inbox(&[]);
    let body = b"Message-ID: <a@b>\r\n\r\nhello\r\n".to_vec();
    let bodies: crate::imap::cached_fetch::Bodies = std::sync::Arc::new(
        std::collections::HashMap::from([(3, std::sync::Arc::new(body))]),
    );
    let command = parse_command(b"f UID FETCH 3 (FLAGS BODY.PEEK[])\r\n").unwrap();
    let actions = match r.session.submit_cached(command, Some(bodies)) {
        Submit::Ready(actions) => actions,
        Submit::Wait(_) => panic!("nothing in flight"),
    };
    r.perform(actions);
    let up = r.take_upstream();
    assert!(up[0].ends_with(" UID FETCH 3 (UID FLAGS)\r\n"), "{up:?}");
    r.provider_sends("* 1 FETCH (UID 3 FLAGS (\\Seen))\r\n");
    r.provider_sends(&format!("{} OK Fetch completed\r\n", Rig::last_tag(&up)));
    assert_eq!(
        r.take_client(),
        "* 1 FETCH (UID 3 FLAGS (\\Seen) BODY[] {28}\r\nMessage-ID: <a@b>\r\n\r\nhello\r\n)\r\n\
         f OK Fetch completed\r\n"
    );
    let fetch = r.audits.iter().find(|a| a.command == "UID FETCH").unwrap();
    assert!(
        fetch.detail.contains("bodies from pecgate's cache"),
        "{}",
        fetch.detail
    );
    let seen = r.audits.iter().find(|a| a.command == "message").unwrap();
    assert!(
        seen.detail.contains("uid=3 message=<a@b> opened"),
        "{}",
        seen.detail
    );
    // A body the cache does not have: the command goes up whole.
    let command = parse_command(b"g UID FETCH 4 (BODY.PEEK[])\r\n").unwrap();
    let bodies = Some(std::sync::Arc::new(std::collections::HashMap::new()));
    let Submit::Ready(actions) = r.session.submit_cached(command, bodies) else {
        panic!()
    };
    r.perform(actions);
    assert!(r.take_upstream()[0].ends_with(" UID FETCH 4 BODY.PEEK[]\r\n"));
}

#[test]
fn pipelined_cached_downloads_each_get_their_own_bodies() {
    let mut r = rig(&["INBOX"], ALL);
    r.select_inbox(&[]);
    for (tag, uid) in [("f", 3), ("g", 4)] {
        let body = std::sync::Arc::new(format!("body {uid}").into_bytes());
        let bodies = std::sync::Arc::new(std::collections::HashMap::from([(uid, body)]));
        let text = format!("{tag} UID FETCH {uid} (BODY.PEEK[])\r\n");
        let command = parse_command(text.as_bytes()).unwrap();
        let Submit::Ready(actions) = r.session.submit_cached(command, Some(bodies)) else {
            panic!("downloads do not run alone")
        };
        r.perform(actions);
        assert_eq!(r.take_upstream().len(), 1);
    }
    r.provider_sends("* 2 FETCH (UID 4)\r\n");
    r.provider_sends("* 1 FETCH (UID 3)\r\n");
    assert_eq!(
        r.take_client(),
        "* 2 FETCH (UID 4 BODY[] {6}\r\nbody 4)\r\n* 1 FETCH (UID 3 BODY[] {6}\r\nbody 3)\r\n"
    );
}
