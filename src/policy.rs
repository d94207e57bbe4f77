//! Folder visibility: which folders of a shared mailbox a user may see, free of I/O.
//!
//! Patterns come from the user's roles (`folders = ["INBOX", "Sent", "Ricevute/**"]`) and are
//! written with `/` as the separator whatever the provider's delimiter. A segment is a literal
//! name, `*` (exactly one level) or `**` (any number of levels, zero included: `Ricevute/**`
//! grants `Ricevute` and everything below it). `INBOX` compares case-insensitively as IMAP
//! says; every other name compares exactly, after decoding modified UTF-7.
//!
//! A folder is granted when a pattern matches it; everything else is hidden. (Parents of
//! visible folders are drawn as `\Noselect` by the LIST answer, from the folders that really
//! exist and are visible: see `imap::listing::visible_listing`.) Names that cannot be split
//! into clean segments (bad modified UTF-7, empty segments from doubled, leading or trailing
//! delimiters, `.` or `..`) are never granted: a provider might read them as some other folder.

use crate::imap::mutf7;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    AnyDepth,
}

/// The folder patterns of one user on one mailbox.
#[derive(Debug, Clone, Default)]
pub struct FolderPolicy {
    patterns: Vec<Vec<Segment>>,
}

impl FolderPolicy {
    /// Build from validated config patterns (see `config::check_folder_pattern`).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Self {
        let patterns = patterns
            .iter()
            .map(|p| {
                p.as_ref()
                    .split('/')
                    .enumerate()
                    .map(|(i, segment)| match segment {
                        "*" => Segment::One,
                        "**" => Segment::AnyDepth,
                        s if i == 0 && s.eq_ignore_ascii_case("INBOX") => {
                            Segment::Literal("INBOX".to_owned())
                        }
                        s => Segment::Literal(s.to_owned()),
                    })
                    .collect()
            })
            .collect();
        FolderPolicy { patterns }
    }

    /// Whether a folder, given as decoded segments (see [`split_name`]), is granted.
    pub fn grants(&self, segments: &[String]) -> bool {
        self.patterns.iter().any(|p| matches(p, segments))
    }

    /// Whether a folder given by its wire name (modified UTF-7) and the provider's hierarchy
    /// delimiter is granted; unclean names never are.
    pub fn grants_wire(&self, wire: &[u8], delimiter: Option<char>) -> bool {
        split_name(wire, delimiter).is_some_and(|segments| self.grants(&segments))
    }
}

/// Split a wire name into decoded segments; `None` for names that are not clean.
pub fn split_name(wire: &[u8], delimiter: Option<char>) -> Option<Vec<String>> {
    let name = mutf7::decode_canonical(wire).ok()?;
    if name.is_empty() {
        return None;
    }
    let mut segments: Vec<String> = match delimiter {
        Some(d) => name.split(d).map(str::to_owned).collect(),
        None => vec![name],
    };
    if segments
        .iter()
        .any(|s| s.is_empty() || s == "." || s == ".." || crate::text::has_control(s))
    {
        return None;
    }
    if segments[0].eq_ignore_ascii_case("INBOX") {
        segments[0] = "INBOX".to_owned();
        // A provider that keeps every folder under `INBOX.` (Aruba's layout, Dovecot with
        // `prefix = INBOX.`) reads `INBOX.INBOX` as INBOX itself: a pattern that grants
        // "a folder named INBOX below INBOX" must never open INBOX. No such name is clean.
        if segments
            .get(1)
            .is_some_and(|s| s.eq_ignore_ascii_case("INBOX"))
        {
            return None;
        }
    }
    Some(segments)
}

/// Whether `pattern` matches exactly `name`.
fn matches(pattern: &[Segment], name: &[String]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((Segment::AnyDepth, rest)) => {
            matches(rest, name) || (!name.is_empty() && matches(pattern, &name[1..]))
        }
        Some((segment, rest)) => match name.split_first() {
            None => false,
            Some((first, name_rest)) => {
                let head_ok = match segment {
                    Segment::Literal(literal) => literal == first,
                    Segment::One => true,
                    Segment::AnyDepth => unreachable!(),
                };
                head_ok && matches(rest, name_rest)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRANTED: bool = true;
    const HIDDEN: bool = false;

    fn grants(patterns: &[&str], name: &str, delimiter: Option<char>) -> bool {
        FolderPolicy::new(patterns).grants_wire(name.as_bytes(), delimiter)
    }

    #[test]
    fn pattern_table() {
        let segreteria = ["INBOX", "Sent", "Ricevute/**"];
        let cases: &[(&[&str], &str, Option<char>, bool)] = &[
            (&segreteria, "INBOX", Some('/'), GRANTED),
            (&segreteria, "inbox", Some('/'), GRANTED),
            (&segreteria, "InBoX", Some('/'), GRANTED),
            (&segreteria, "INBOX/Secret", Some('/'), HIDDEN),
            (&segreteria, "Sent", Some('/'), GRANTED),
            (&segreteria, "sent", Some('/'), HIDDEN),
            (&segreteria, "SENT", Some('/'), HIDDEN),
            (&segreteria, "Sent/Old", Some('/'), HIDDEN),
            (&segreteria, "Ricevute", Some('/'), GRANTED),
            (&segreteria, "Ricevute/Consegne", Some('/'), GRANTED),
            (&segreteria, "Ricevute/Consegne/2026", Some('/'), GRANTED),
            (&segreteria, "Riservata", Some('/'), HIDDEN),
            // Tricks: trailing, doubled, leading delimiters and dot segments.
            (&segreteria, "Sent/", Some('/'), HIDDEN),
            (&segreteria, "/Sent", Some('/'), HIDDEN),
            (&segreteria, "Ricevute//Consegne", Some('/'), HIDDEN),
            (&segreteria, "Ricevute/../Riservata", Some('/'), HIDDEN),
            (&segreteria, "Ricevute/./x", Some('/'), HIDDEN),
            // A provider delimiter other than `/`.
            (&segreteria, "Ricevute.Consegne", Some('.'), GRANTED),
            (&segreteria, "Ricevute/Consegne", Some('.'), HIDDEN),
            (&segreteria, "INBOX.Secret", Some('.'), HIDDEN),
            (&segreteria, "Ricevute.Consegne", Some('/'), HIDDEN),
            // `INBOX.INBOX` is INBOX itself on an `INBOX.`-prefixed provider: never granted
            // through a pattern below INBOX.
            (&["INBOX/*"], "INBOX.INBOX", Some('.'), HIDDEN),
            (&["INBOX/*"], "inbox.Inbox", Some('.'), HIDDEN),
            (&["INBOX/**"], "INBOX.INBOX.X", Some('.'), HIDDEN),
            (&["INBOX/*"], "INBOX.Ricevute", Some('.'), GRANTED),
            (&["**"], "INBOX/INBOX", Some('/'), HIDDEN),
            // Flat namespace.
            (&segreteria, "Sent", None, GRANTED),
            (&segreteria, "Ricevute/Consegne", None, HIDDEN),
            // Parents of granted folders are not granted (the LIST answer draws them).
            (&["Archivio/2026/Legale"], "Archivio", Some('/'), HIDDEN),
            (
                &["Archivio/2026/Legale"],
                "Archivio/2026",
                Some('/'),
                HIDDEN,
            ),
            (
                &["Archivio/2026/Legale"],
                "Archivio/2026/Legale",
                Some('/'),
                GRANTED,
            ),
            (
                &["Archivio/2026/Legale"],
                "Archivio/2025",
                Some('/'),
                HIDDEN,
            ),
            (&["*/Legale"], "Clienti", Some('/'), HIDDEN),
            (&["*/Legale"], "Clienti/Legale", Some('/'), GRANTED),
            (&["*/Legale"], "Clienti/Altro", Some('/'), HIDDEN),
            (&["*"], "Anything", Some('/'), GRANTED),
            (&["*"], "Anything/Below", Some('/'), HIDDEN),
            (&["**"], "Any/thing/at/all", Some('/'), GRANTED),
            (&["a/**/z"], "a/z", Some('/'), GRANTED),
            (&["a/**/z"], "a/b/c/z", Some('/'), GRANTED),
            (&["a/**/z"], "a/b", Some('/'), HIDDEN),
            (&["a/**/z"], "b", Some('/'), HIDDEN),
            // Modified UTF-7: decoded before matching, only the canonical spelling.
            (&["Riservat\u{e0}"], "Riservat&AOA-", Some('/'), GRANTED),
            (&["Riservat\u{e0}"], "Riservat\u{e0}", Some('/'), HIDDEN),
            (&["Sent"], "&AFM-ent", Some('/'), HIDDEN),
            (&["R&D"], "R&-D", Some('/'), GRANTED),
            (&["R&D"], "R&D", Some('/'), HIDDEN),
            // Nothing granted.
            (&[], "INBOX", Some('/'), HIDDEN),
        ];
        for (patterns, name, delimiter, want) in cases {
            assert_eq!(
                grants(patterns, name, *delimiter),
                *want,
                "{patterns:?} {name:?} {delimiter:?}"
            );
        }
    }
}
