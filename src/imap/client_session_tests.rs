//! The client session machine and the provider client, driven together on bytes: what the
//! client sends, what goes upstream, what the client gets, what is audited. No sockets.

use bytes::BytesMut;
use imap_codec::imap_types::command::Command;

use super::*;
use crate::config::Permission;
use crate::imap::authorize::answer_list;
use crate::imap::command::{UpstreamStep, append_skeleton};
use crate::imap::framing::{Assembled, CommandAssembler, CommandLimits};
use crate::imap::provider_client::{ProviderClient, ProviderEvent};
use crate::policy::FolderPolicy;

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
    waiting: Option<Command<'static>>,
    ended: Option<Ending>,
}

fn rig(patterns: &[&str], permissions: &[Permission]) -> Rig {
    let policy = SessionPolicy {
        folders: FolderPolicy::new(patterns),
        permissions: permissions.iter().copied().collect(),
        delimiter: Some('/'),
        provider_unselect: true,
    };
    Rig {
        session: ClientSession::new(policy, vec!["IMAP4rev1".into(), "IDLE".into()]),
        provider: ProviderClient::new(true),
        assembler: CommandAssembler::new(CommandLimits::default()),
        input: BytesMut::new(),
        upstream: Vec::new(),
        client: Vec::new(),
        audits: Vec::new(),
        waiting: None,
        ended: None,
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
            let assembled = if self.session.client_idling() {
                self.assembler.poll_line(&mut self.input)
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
                Assembled::Refused { tag, reason } => {
                    self.session
                        .refuse_unparsed(tag.as_deref(), reason.text(), String::new())
                }
                Assembled::Command(line) if self.session.client_idling() => {
                    self.session.idle_line(&line)
                }
                Assembled::Command(bytes) => match parse_command(&bytes) {
                    Ok(command) => self.submit(command),
                    Err(_) => self.session.refuse_unparsed(None, "Invalid", String::new()),
                },
                Assembled::MessageLiteral { head, literal } => {
                    let skeleton = append_skeleton(&head, &literal).unwrap();
                    match self.session.submit_append(skeleton, literal.length, literal.sync) {
                        Submit::Ready(actions) => {
                            // The message and the line end follow in the input: stream them.
                            let message = self.input.split_to(literal.length as usize + 2);
                            let sent = actions
                                .iter()
                                .any(|a| matches!(a, Action::Provider(Request::AppendHead { .. })));
                            self.perform(actions);
                            if sent {
                                self.upstream.extend_from_slice(&message);
                            }
                            continue;
                        }
                        Submit::Wait(_) => panic!("tests do not pipeline behind an APPEND"),
                    }
                }
            };
            self.perform(actions);
        }
    }

    fn submit(&mut self, command: Command<'static>) -> Vec<Action> {
        match self.session.submit(command) {
            Submit::Ready(actions) => actions,
            Submit::Wait(command) => {
                self.waiting = Some(command);
                Vec::new()
            }
        }
    }

    /// A provider response line (whole units only: no literals in these tests).
    fn provider_sends(&mut self, line: &str) {
        let line = line.as_bytes();
        let actions = match self.provider.on_line(line) {
            ProviderEvent::Continuation { tag } => self.session.on_idle_continuation(&tag, line),
            ProviderEvent::Completed { tag, status, text } => {
                self.session.on_completed(&tag, status, &text)
            }
            ProviderEvent::Untagged(kind) => match self.session.plan_untagged(kind, line) {
                UntaggedPlan::Pass | UntaggedPlan::PassThenEnd => vec![Action::Client(line.to_vec())],
                UntaggedPlan::PassRenamed => vec![Action::Client(
                    crate::imap::authorize::rename_rfc822_items(line),
                )],
                UntaggedPlan::Replace(bytes) => vec![Action::Client(bytes)],
                UntaggedPlan::Gather => self.session.on_unit(kind, line),
                UntaggedPlan::Violation(reason) => self.session.on_violation(&reason),
            },
            ProviderEvent::Violation(reason) => self.session.on_violation(&reason),
        };
        self.perform(actions);
        if let Some(command) = self.waiting.take() {
            let actions = self.submit(command);
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
                Action::Provider(Request::AppendHead { skeleton, length, .. }) => {
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
    assert!(last.detail.ends_with(&format!("upstream={tag}")), "{}", last.detail);
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
    assert!(client.starts_with("a BAD Expected DONE"), "{client}");
    // The rest was read as commands and decided on: the hidden SELECT went up under a
    // placeholder, so the provider answers it as nonexistent.
    let up = r.take_upstream();
    assert!(up.iter().all(|l| !l.contains("Segreto")), "{up:?}");
    assert!(up[0].contains("SELECT pecgate-none-"), "{up:?}");
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
    assert_eq!(r.take_client(), "a BAD Tag already in use by a running command\r\n");
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
    assert!(up[0].ends_with(" FETCH 1 (BODY.PEEK[TEXT] BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"), "{up:?}");
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
    assert!(client.starts_with("a BAD Mailbox names with control characters"), "{client}");
    assert!(client.contains("\r\nb BAD Mailbox names with control characters"), "{client}");
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
    assert!(client.contains("INBOX") && !client.contains("Segreto"), "{client}");
    assert!(client.ends_with("l OK List completed\r\n"));
    // A pattern of hundreds of wildcards is collapsed and answered.
    let pattern = "*".repeat(200);
    r.client_sends(format!("m LIST \"\" \"{pattern}]\"\r\n").as_bytes());
    let tag = Rig::last_tag(&r.take_upstream());
    r.provider_sends("* LIST () \"/\" INBOX\r\n");
    r.provider_sends(&format!("{tag} OK done\r\n"));
    assert!(r.take_client().ends_with("m OK done\r\n"));
}
