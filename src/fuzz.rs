//! A small mutational fuzzer for the parsers and state machines, runnable on stable Rust
//! (cargo-fuzz needs nightly), and the targets that do not need a session rig.
//!
//! Each target is a `#[test]` that starts from a seed corpus, mutates inputs (bit flips, byte
//! insertions and deletions, splices, dictionary tokens such as `{5+}\r\n` or `\r\n.\r\n`) and
//! runs the code under test on them, checking properties, not just "no panic". A target returns
//! a small *feature* number describing the path an input took (which branch of a parser, which
//! decision); inputs that show a new feature join the corpus, a cheap stand-in for coverage
//! guidance.
//!
//! `cargo test` runs every target for a short, seeded pass (`PECGATE_FUZZ_SEED`, default
//! fixed; `PECGATE_FUZZ_ITERS` overrides the count). `scripts/fuzz.sh` runs them for a set
//! time with random seeds (`PECGATE_FUZZ_SECS`). A failing input is written to
//! `target/fuzz-crashes/` and the test fails naming it and the seed; every run replays the
//! inputs saved there first, and found crashes become ordinary regression tests next to the
//! code they broke.

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long or how many cases a target runs.
enum Budget {
    Cases(u64),
    Time(Duration),
}

fn budget(default_cases: u64) -> Budget {
    if let Some(secs) = std::env::var("PECGATE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        return Budget::Time(Duration::from_secs(secs));
    }
    Budget::Cases(
        std::env::var("PECGATE_FUZZ_ITERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_cases),
    )
}

fn seed() -> u64 {
    std::env::var("PECGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_9EC6)
}

/// Tokens that matter to IMAP and SMTP framing, spliced in whole.
pub const DICTIONARY: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b"{0}\r\n",
    b"{5}\r\n",
    b"{5+}\r\n",
    b"{4294967295}\r\n",
    b"{18446744073709551616+}\r\n",
    b"~{3}\r\n",
    b"\"",
    b"\\",
    b"(",
    b")",
    b"[",
    b"]",
    b"*",
    b"%",
    b"&",
    b"&-",
    b"&AA0ACg-",
    b"INBOX",
    b"INBOX.INBOX",
    b"Segreto",
    b"UID ",
    b"BODY[]",
    b"BODY.PEEK[HEADER.FIELDS (From)]<0.10>",
    b"RFC822",
    b"1:*",
    b"4294967295",
    b"IDLE\r\n",
    b"DONE\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r.\r",
    b"..",
    b"MAIL FROM:<a@b>",
    b"RCPT TO:<c@d>",
    b"DATA\r\n",
    b"=?utf-8?b?",
    b"<",
    b">",
    b"@",
    b",",
    b":",
    b"\xff\xfe",
    b"\xc3\xa8",
];

/// One mutation of `input` (never longer than `max_len`).
fn mutate(rng: &mut StdRng, input: &[u8], corpus: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        let len = out.len();
        match rng.gen_range(0..8) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                out[i] ^= 1 << rng.gen_range(0..8);
            }
            1 => {
                let i = rng.gen_range(0..=len);
                out.insert(i, rng.r#gen());
            }
            2 if len > 0 => {
                let start = rng.gen_range(0..len);
                let end = rng.gen_range(start..=len.min(start + 16));
                out.drain(start..end);
            }
            3 if len > 0 => {
                // Duplicate a range: repeated units stress state machines.
                let start = rng.gen_range(0..len);
                let end = rng.gen_range(start..=len.min(start + 64));
                let piece = out[start..end].to_vec();
                let at = rng.gen_range(0..=out.len());
                out.splice(at..at, piece);
            }
            4 | 5 => {
                let token = DICTIONARY[rng.gen_range(0..DICTIONARY.len())];
                let at = rng.gen_range(0..=len);
                out.splice(at..at, token.iter().copied());
            }
            6 if !corpus.is_empty() => {
                // Splice: our head with another input's tail.
                let other = &corpus[rng.gen_range(0..corpus.len())];
                let cut = rng.gen_range(0..=len);
                let from = rng.gen_range(0..=other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => {
                let i = rng.gen_range(0..len);
                const BYTES: &[u8] = b"0123456789 \r\n{}+*()\"\\";
                out[i] = BYTES[rng.gen_range(0..BYTES.len())];
            }
            _ => {}
        }
    }
    out.truncate(max_len);
    out
}

/// Run `target` on the seeds and on mutations of them, within the budget. `target` checks its
/// own properties (panicking when one fails) and returns a feature number.
pub fn run(
    name: &str,
    seeds: &[&[u8]],
    default_cases: u64,
    max_len: usize,
    mut target: impl FnMut(&[u8]) -> u64,
) {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed ^ fnv(name.as_bytes()));
    let mut corpus: Vec<Vec<u8>> = seeds.iter().map(|s| s.to_vec()).collect();
    // Inputs that failed before (this machine's target/fuzz-crashes/) are replayed first.
    corpus.extend(saved_crashes(name));
    let mut features = HashSet::new();
    let started = Instant::now();
    let budget = budget(default_cases);
    let mut cases = 0u64;
    loop {
        let done = match budget {
            Budget::Cases(n) => cases >= n,
            Budget::Time(limit) => started.elapsed() >= limit,
        };
        if done {
            break;
        }
        let input = if (cases as usize) < corpus.len() {
            corpus[cases as usize].clone()
        } else {
            let base = &corpus[rng.gen_range(0..corpus.len())];
            mutate(&mut rng, base, &corpus, max_len)
        };
        cases += 1;
        match catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(feature) => {
                if features.insert(feature) && corpus.len() < 4096 {
                    corpus.push(input);
                }
            }
            Err(panic) => {
                let path = save_crash(name, &input);
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                panic!(
                    "fuzz {name}: case {cases} failed (PECGATE_FUZZ_SEED={seed}): {message}\n\
                     input saved to {path}: {:?}",
                    crate::text::printable(&input, 400)
                );
            }
        }
    }
    // The figures scripts/fuzz.sh reports (visible with --nocapture).
    println!(
        "fuzz {name}: {cases} cases in {:.1}s, {} features, corpus {}, seed {seed}",
        started.elapsed().as_secs_f64(),
        features.len(),
        corpus.len()
    );
}

fn crash_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes")
}

fn saved_crashes(name: &str) -> Vec<Vec<u8>> {
    let prefix = format!("{name}-");
    let Ok(entries) = std::fs::read_dir(crash_dir()) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect()
}

fn save_crash(name: &str, input: &[u8]) -> String {
    let dir = crash_dir();
    let path = dir.join(format!("{name}-{:016x}.bin", fnv(input)));
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(&path, input);
    path.display().to_string()
}

/// FNV-1a: a stable hash for names, features and file names.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A feature from a few small values.
pub fn feature(parts: &[u64]) -> u64 {
    fnv(&parts
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .collect::<Vec<_>>())
}

#[cfg(test)]
mod targets {
    use super::*;
    use crate::config::Config;
    use crate::imap::authorize::{Decision, SessionPolicy, authorize, force_peek};
    use crate::imap::classify::{Handling, classify, mailboxes_mut};
    use crate::imap::command::{UpstreamStep, parse_command, upstream_steps};
    use crate::imap::framing::{Assembled, CommandAssembler, CommandLimits};
    use crate::imap::{mutf7, response};
    use crate::policy::FolderPolicy;
    use crate::smtp::data::{DataIntake, DotStuffer};
    use crate::smtp::{command as smtp_command, message};
    use bytes::BytesMut;

    fn policies() -> [SessionPolicy; 2] {
        let plain = SessionPolicy {
            folders: FolderPolicy::new(&["INBOX", "Sent", "Ricevute/**"]),
            permissions: crate::config::Permission::ALL.iter().copied().collect(),
            delimiter: Some('/'),
            provider_unselect: true,
            max_message_bytes: 1 << 20,
        };
        let aruba = SessionPolicy {
            folders: FolderPolicy::new(&["INBOX", "INBOX/Sent"]),
            permissions: [crate::config::Permission::Read].into_iter().collect(),
            delimiter: Some('.'),
            provider_unselect: false,
            max_message_bytes: 1 << 20,
        };
        [plain, aruba]
    }

    /// Framing, parsing, authorization and re-encoding of client commands: whatever comes
    /// in, what would go upstream parses back as the same tag, and never names `Segreto`
    /// (hidden by both policies) outside an APPEND's message.
    #[test]
    fn fuzz_imap_command_path() {
        let policies = policies();
        run(
            "imap_command_path",
            &[
                b"a SELECT INBOX\r\n",
                b"b UID FETCH 1:* (FLAGS BODY[] RFC822)\r\n",
                b"c COPY 1:4 {7+}\r\nSegreto\r\n",
                b"d LIST \"\" \"*\"\r\n",
                b"e STATUS Segreto (MESSAGES UIDNEXT)\r\n",
                b"f RENAME Sent/a Segreto/b\r\n",
                b"g APPEND Sent (\\Seen) {3}\r\nabc\r\n",
                b"h STORE 1 FLAGS (\\Deleted)\r\n",
                b"i SEARCH CHARSET UTF-8 TEXT {3+}\r\n\xc3\xa8a\r\n",
                b"j SUBSCRIBE INBOX.Segreto\r\n",
                b"k ID (\"name\" \"x\")\r\n",
            ],
            20_000,
            4096,
            |input| {
                let mut buffer = BytesMut::from(input);
                let mut assembler = CommandAssembler::new(CommandLimits {
                    max_line: 2048,
                    max_literal: 1024,
                    max_command: 4096,
                });
                let mut path = Vec::new();
                loop {
                    match assembler.poll(&mut buffer, |_, _| false) {
                        Assembled::NeedMore => break,
                        Assembled::SendContinuation => path.push(1),
                        Assembled::Refused { .. } => path.push(2),
                        Assembled::MessageLiteral { .. } => path.push(3),
                        Assembled::Command(bytes) => {
                            let Ok(command) = parse_command(&bytes) else {
                                path.push(4);
                                continue;
                            };
                            for (i, policy) in policies.iter().enumerate() {
                                let mut command = command.clone();
                                let decision = authorize(&mut command, policy);
                                path.push(10 + i as u64 * 10 + decision_kind(&decision));
                                let relayed = matches!(
                                    classify(&command.body).handling,
                                    Handling::Relay | Handling::Idle | Handling::Logout
                                );
                                if !relayed
                                    || !matches!(
                                        decision,
                                        Decision::Allow
                                            | Decision::AsNonexistent { .. }
                                            | Decision::CloseAsUnselect
                                    )
                                {
                                    continue;
                                }
                                force_peek(&mut command, policy);
                                // Sessions send every command under pecgate's own tag.
                                command.tag = imap_codec::imap_types::core::Tag::try_from("c1")
                                    .expect("a valid tag");
                                check_encoding(&command, policy);
                            }
                        }
                    }
                }
                feature(&path)
            },
        );
    }

    fn decision_kind(decision: &Decision) -> u64 {
        match decision {
            Decision::Allow => 0,
            Decision::AsNonexistent { .. } => 1,
            Decision::DenyPermission(_) => 2,
            Decision::DenyName(_) => 3,
            Decision::DenySubtree(_) => 4,
            Decision::CloseAsUnselect => 5,
            Decision::BadName(_) => 6,
        }
    }

    /// What would go upstream parses back with the same tag, and every folder name in it is
    /// one the policy grants or a placeholder for a hidden one.
    fn check_encoding(
        command: &imap_codec::imap_types::command::Command<'static>,
        policy: &SessionPolicy,
    ) {
        let mut bytes = Vec::new();
        for step in upstream_steps(command, true) {
            if let UpstreamStep::Send(part) = step {
                bytes.extend_from_slice(&part);
            }
        }
        let mut again = parse_command(&bytes).unwrap_or_else(|e| {
            panic!(
                "pecgate's own encoding does not parse ({e:?}): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(again.tag, command.tag);
        for mailbox in mailboxes_mut(&mut again.body) {
            let wire = crate::imap::command::wire_name(mailbox);
            let placeholder = String::from_utf8_lossy(&wire).contains("pecgate-none-");
            assert!(
                placeholder || policy.folders.grants_wire(&wire, policy.delimiter),
                "a hidden name would go upstream: {:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    /// Provider response lines: classification, capability rewriting and LIST parsing never
    /// panic, and rewritten capability lines stay one line.
    #[test]
    fn fuzz_imap_response_parsing() {
        run(
            "imap_response_parsing",
            &[
                b"* OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE] ready\r\n",
                b"c1 OK [READ-WRITE] done\r\n",
                b"* LIST (\\HasNoChildren) \"/\" \"INBOX\"\r\n",
                b"* LIST () \".\" {5}\r\nINBOX\r\n",
                b"* 3 FETCH (UID 7 FLAGS (\\Seen) BODY[] {3}\r\n",
                b"+ idling\r\n",
                b"* BYE going\r\n",
                b"* STATUS \"Sent\" (MESSAGES 2)\r\n",
            ],
            20_000,
            2048,
            |input| {
                // The relay classifies one line at a time.
                let line = match input.iter().position(|&b| b == b'\n') {
                    Some(end) => &input[..=end],
                    None => input,
                };
                let kind = format!("{:?}", response::classify(line));
                let caps = response::carries_capabilities(line);
                if caps {
                    let out = response::replace_capabilities(line, &["IMAP4rev1".into()]);
                    let newlines = out.iter().filter(|&&b| b == b'\n').count();
                    assert!(newlines <= 1, "capability rewrite split a line");
                }
                let _ = response::capabilities_in(line);
                let list = response::list_entry(line).is_some();
                feature(&[
                    fnv(kind.split('(').next().unwrap_or("").as_bytes()),
                    caps as u64,
                    list as u64,
                ])
            },
        );
    }

    /// SMTP command lines and SASL lines never panic, and a parsed command's audit detail is
    /// one printable line.
    #[test]
    fn fuzz_smtp_commands() {
        run(
            "smtp_commands",
            &[
                b"EHLO client.example\r\n",
                b"MAIL FROM:<studio@pec.example.it> SIZE=100 BODY=8BITMIME\r\n",
                b"RCPT TO:<a@pec.example.it>\r\n",
                b"AUTH PLAIN AG1hcmlvAHNlY3JldA==\r\n",
                b"AUTH LOGIN\r\n",
                b"DATA\r\n",
                b"BDAT 10 LAST\r\n",
                b"STARTTLS\r\n",
            ],
            30_000,
            1024,
            |line| match smtp_command::parse(line) {
                Ok(command) => {
                    let detail = command.audit_detail();
                    assert!(
                        !detail.contains('\n') && !detail.contains('\r'),
                        "{detail:?}"
                    );
                    feature(&[1, fnv(command.name().as_bytes())])
                }
                Err(reply) => {
                    let _ = smtp_command::sasl_line(line);
                    feature(&[2, u64::from(reply.code)])
                }
            },
        );
    }

    /// DATA intake: the result does not depend on how the bytes are split across reads, the
    /// message never contains an end-of-data sequence, and what follows the terminator is
    /// left for the next command.
    #[test]
    fn fuzz_smtp_data_split_invariance() {
        run(
            "smtp_data",
            &[
                b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",
                b"a\r\n..b\r\n.\r\n",
                b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n",
                b"a\r\n.\nRCPT TO:<x@y>\r\n\r\n.\r\n",
                b"a\r.\r\nb\r\n.\r\n",
                b"\0a\r\n.\r\n",
                b".\r\n",
            ],
            30_000,
            2048,
            |input| {
                let whole = intake(input, &[]);
                let cuts: Vec<usize> = (1..input.len()).step_by(7).collect();
                assert_eq!(whole, intake(input, &cuts), "split changes the result");
                if let (true, _, Some(message), _) = &whole {
                    // What goes to the provider (stuffed, after DATA's CRLF) ends exactly once.
                    let mut stuffer = DotStuffer::default();
                    let mut wire = b"\r\n".to_vec();
                    stuffer.push(message, &mut wire);
                    let body_end = wire.len();
                    wire.extend_from_slice(stuffer.finish());
                    let ends: Vec<usize> = wire
                        .windows(5)
                        .enumerate()
                        .filter(|(_, w)| *w == b"\r\n.\r\n")
                        .map(|(i, _)| i)
                        .collect();
                    assert_eq!(ends.len(), 1, "ends of data in what is relayed: {ends:?}");
                    assert!(
                        ends[0] + 5 == wire.len() && ends[0] + 2 >= body_end.min(wire.len() - 3)
                    );
                }
                feature(&[whole.0 as u64, whole.2.is_some() as u64, whole.3 as u64])
            },
        );
    }

    /// (done, bytes left after the terminator, message if relayable, problem kind).
    fn intake(input: &[u8], cuts: &[usize]) -> (bool, usize, Option<Vec<u8>>, u8) {
        let mut intake = DataIntake::new(1 << 20);
        let mut out = Vec::new();
        let mut start = 0;
        let mut ends: Vec<usize> = cuts.to_vec();
        ends.push(input.len());
        for end in ends {
            let mut rest = &input[start..end];
            if intake.ingest(&mut rest, &mut out) {
                let left = rest.len() + (input.len() - end);
                return match intake.finish() {
                    Ok(_) => (true, left, Some(out), 0),
                    Err(problem) => (true, left, None, problem as u8 + 1),
                };
            }
            assert!(rest.is_empty(), "unfinished intake left input unread");
            start = end;
        }
        (false, 0, None, 0)
    }

    /// Header sections: field splitting, summaries, address lists and Message-IDs never
    /// panic.
    #[test]
    fn fuzz_smtp_headers() {
        run(
            "smtp_headers",
            &[
                b"From: Studio <studio@pec.example.it>\r\nTo: a@b.it, \"C, D\" <c@d.it>\r\nSubject: =?utf-8?q?prova?=\r\nMessage-ID: <x@y>\r\n\r\n",
                b"To: undisclosed-recipients:;\r\nCc: g: a@b, c@d;\r\n\r\n",
                b"From: a@b\r\n folded\r\n\r\n",
            ],
            20_000,
            4096,
            |header| {
                let fields = message::split_fields(header).map(|f| f.len());
                let summary = message::summarize(header).is_ok();
                let addresses = message::parse_address_list(header).map(|a| a.len());
                let id = message::parse_message_id(header).is_some();
                feature(&[
                    fields.is_ok() as u64,
                    summary as u64,
                    addresses.unwrap_or(99).min(4) as u64,
                    id as u64,
                ])
            },
        );
    }

    /// Modified UTF-7: whatever decodes canonically encodes back to the same bytes.
    #[test]
    fn fuzz_mutf7_round_trip() {
        run(
            "mutf7",
            &[b"INBOX", b"&AOg-", b"Ricevute/&AOg-/x", b"&-", b"&AA0ACg-"],
            50_000,
            256,
            |wire| match mutf7::decode_canonical(wire) {
                Ok(text) => {
                    assert_eq!(mutf7::encode(&text).as_bytes(), wire, "{text:?}");
                    feature(&[1, text.chars().count().min(8) as u64])
                }
                Err(_) => feature(&[2]),
            },
        );
    }

    /// daticert.xml: parsing never panics; a parsed Message-ID has no brackets left.
    #[test]
    fn fuzz_daticert() {
        run(
            "daticert",
            &[
                br#"<postacert tipo="avvenuta-consegna" errore="nessuno"><intestazione><mittente>a@b</mittente><destinatari tipo="esterno">c@d</destinatari></intestazione><dati><data zona="+0200"><giorno>29/06/2026</giorno><ora>14:05:09</ora></data><identificativo>opec1@x</identificativo><msgid>&lt;m@x&gt;</msgid><consegna>c@d</consegna></dati></postacert>"#,
                b"<?xml version=\"1.0\"?><postacert tipo=\"accettazione\"/>",
            ],
            30_000,
            4096,
            |xml| match crate::receipts::daticert::parse(xml) {
                Ok(d) => {
                    if let Some(id) = &d.msgid {
                        assert!(!(id.starts_with('<') && id.ends_with('>')), "{id:?}");
                    }
                    feature(&[1, d.destinatari.len().min(4) as u64, d.at.is_some() as u64])
                }
                Err(e) => feature(&[2, fnv(format!("{e:?}").split('(').next().unwrap_or("").as_bytes())]),
            },
        );
    }

    /// Receipts: classifying any message never panics, and never from the subject alone.
    #[test]
    fn fuzz_receipt_classify() {
        run(
            "receipt_classify",
            &[
                b"X-Ricevuta: accettazione\r\nX-Riferimento-Message-ID: <m@x>\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/xml; name=daticert.xml\r\nContent-Disposition: attachment; filename=daticert.xml\r\n\r\n<postacert tipo=\"accettazione\"/>\r\n--b--\r\n",
                b"Subject: CONSEGNA: x\r\n\r\nbody\r\n",
                b"X-Trasporto: posta-certificata\r\n\r\n",
            ],
            20_000,
            4096,
            |raw| {
                let c = crate::receipts::classify::classify(raw);
                let text = String::from_utf8_lossy(raw).to_ascii_lowercase();
                let has_pec_header = text.contains("x-ricevuta") || text.contains("x-trasporto");
                if !has_pec_header {
                    assert!(matches!(
                        c.kind,
                        crate::receipts::classify::Kind::Ordinary | crate::receipts::classify::Kind::Unknown
                    ));
                }
                feature(&[fnv(c.kind.as_str().as_bytes()), c.note.is_some() as u64])
            },
        );
    }

    /// FETCH answers as the relay streams them: the identity tap never panics, keeps at most
    /// the header block, and names only a one-token Message-ID in brackets.
    #[test]
    fn fuzz_fetch_identity() {
        use crate::imap::identity::{FetchTap, PREFIX_MAX, uid_code};
        run(
            "fetch_identity",
            &[
                b"* 3 FETCH (UID 17 BODY[] {33}\r\nMessage-ID: <a@b>\r\nSubject: x\r\n\r\n)\r\n",
                b"* 1 FETCH (BODY[HEADER.FIELDS (MESSAGE-ID)] {22}\r\nmessage-id: <h@x>\r\n\r\n UID 4)\r\n",
                b"* 2 FETCH (UID 9 BODY[2.HEADER] {20}\r\nMessage-ID: <n@x>\r\n)\r\n",
                b"c4 OK [COPYUID 1700 3:5,9 101:104] Done\r\n",
            ],
            30_000,
            2048,
            |input| {
                // Split the input as the relay does: lines, and literals after `{n}`.
                let mut tap = FetchTap::default();
                let mut rest = input;
                let mut literals = 0u64;
                while !rest.is_empty() {
                    let end = rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |p| p + 1);
                    let line = &rest[..end];
                    rest = &rest[end..];
                    let literal = crate::imap::framing::literal_at_end(line);
                    tap.line(line, literal.is_some());
                    if let Some(literal) = literal {
                        let n = (literal.length as usize).min(rest.len());
                        for chunk in rest[..n].chunks(7) {
                            tap.literal(chunk);
                        }
                        rest = &rest[n..];
                        literals += 1;
                    }
                }
                let seen = tap.finish();
                if let Some(id) = seen.as_ref().and_then(|s| s.message_id.as_deref()) {
                    assert!(id.starts_with('<') && id.ends_with('>'), "{id:?}");
                    assert!(!id.contains(char::is_whitespace), "{id:?}");
                }
                let mut head = Vec::new();
                for chunk in input.chunks(5) {
                    crate::imap::identity::keep_header(&mut head, chunk);
                }
                assert!(head.len() <= PREFIX_MAX && input.starts_with(&head));
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    assert_eq!(end + 4, head.len(), "nothing kept after the header block");
                }
                let code = uid_code(input);
                if let Some(code) = &code {
                    assert!(!code.contains(' '), "{code:?}");
                }
                feature(&[
                    seen.is_some() as u64,
                    seen.as_ref().is_some_and(|s| s.opened) as u64,
                    literals.min(3),
                    code.is_some() as u64,
                ])
            },
        );
    }

    /// What the receipts worker reads from a provider: decoding any response unit never
    /// panics, and a fetched body is a literal or quoted string of the unit.
    #[test]
    fn fuzz_receipts_scan() {
        use crate::receipts::scan::{Untagged, has_pec_header, untagged};
        run(
            "receipts_scan",
            &[
                b"* 4 FETCH (UID 17 BODY[] {14}\r\nX-Ricevuta: \r\n)\r\n",
                b"* OK [UIDVALIDITY 1700000000] UIDs valid\r\n",
                b"* 12 EXISTS\r\n",
            ],
            20_000,
            2048,
            |unit| {
                let decoded = untagged(unit);
                let kind = match &decoded {
                    Untagged::Fetched(f) => {
                        assert!(f.body.len() <= unit.len());
                        let _ = has_pec_header(&f.body);
                        1
                    }
                    Untagged::UidValidity(v) => {
                        assert_ne!(*v, 0);
                        2
                    }
                    Untagged::Exists(_) => 3,
                    Untagged::Other => 4,
                };
                feature(&[kind])
            },
        );
    }

    /// Configuration files: parsing never panics; an accepted config also yields warnings
    /// and its policies without panicking.
    #[test]
    fn fuzz_config() {
        const SEED: &[u8] = br#"[gateway]
state_dir = "s"
max_sessions_per_user = 3
[tls]
cert = "c"
key = "k"
[imap]
listen_tls = ["127.0.0.1:993"]
[mailboxes.studio]
address = "studio@pec.example.it"
login = "studio"
imap = "imaps://h:993"
smtp = "smtps://h"
send_rate = "6/min"
[roles.r]
mailboxes = ["studio"]
folders = ["INBOX", "Ricevute/**"]
permissions = ["read", "flag"]
[users.mario]
password = "$argon2id$v=19$m=19456,t=2,p=1$VHjHv64CViNy8yoyEAVadg$nbSDqcWNHaZIp/bmbEnvNj0ZvQK273Ydu8Nym4+pLw8"
roles = ["r"]
"#;
        run("config", &[SEED], 3_000, 8192, |bytes| {
            let Ok(text) = std::str::from_utf8(bytes) else {
                return feature(&[0]);
            };
            match Config::parse(text, std::path::Path::new("/etc/pecgate")) {
                Ok(config) => {
                    let _ = config.warnings();
                    for user in config.users.keys() {
                        for mailbox in config.mailboxes_of(user) {
                            let _ = config.folder_patterns(user, mailbox);
                            let _ = config.permissions(user, mailbox);
                        }
                    }
                    feature(&[1])
                }
                Err(error) => {
                    let text = error.to_string();
                    feature(&[2, fnv(text.split(':').next().unwrap_or("").as_bytes())])
                }
            }
        });
    }
}
