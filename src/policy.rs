//! Folder visibility: which folders of a shared mailbox a user may see, free of I/O.
//!
//! Patterns come from the user's roles (`folders = ["INBOX", "Sent", "Ricevute/**"]`) and are
//! written with `/` as the separator whatever the provider's delimiter. A segment is a literal
//! name, `*` (exactly one level) or `**` (any number of levels, zero included: `Ricevute/**`
//! grants `Ricevute` and everything below it). `INBOX` compares case-insensitively as IMAP
//! says; every other name compares exactly, after decoding modified UTF-7.
//!
//! A folder is [`Visibility::Granted`] when a pattern matches it, [`Visibility::Parent`] when
//! it is not granted but lies on the path to something a pattern could grant (shown as
//! `\Noselect` so clients can draw the tree), and [`Visibility::Hidden`] otherwise. Names that
//! cannot be split into clean segments (bad modified UTF-7, empty segments from doubled,
//! leading or trailing delimiters, `.` or `..`) are never granted: a provider might read them
//! as some other folder.

use crate::imap::mutf7;

/// How a folder looks to a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    Granted,
    Parent,
    Hidden,
}

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

    /// Visibility of a folder given as decoded segments (see [`split_name`]).
    pub fn visibility(&self, segments: &[String]) -> Visibility {
        if self.patterns.iter().any(|p| matches(p, segments)) {
            Visibility::Granted
        } else if self.may_have_granted_descendants(segments) {
            Visibility::Parent
        } else {
            Visibility::Hidden
        }
    }

    /// Visibility of a folder given by its wire name (modified UTF-7) and the provider's
    /// hierarchy delimiter.
    pub fn visibility_of_wire(&self, wire: &[u8], delimiter: Option<char>) -> Visibility {
        match split_name(wire, delimiter) {
            Some(segments) => self.visibility(&segments),
            None => Visibility::Hidden,
        }
    }

    /// Whether some pattern could grant a folder strictly below `segments`.
    pub fn may_have_granted_descendants(&self, segments: &[String]) -> bool {
        self.patterns.iter().any(|p| extends(p, segments))
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
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return None;
    }
    if segments[0].eq_ignore_ascii_case("INBOX") {
        segments[0] = "INBOX".to_owned();
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

/// Whether `pattern` matches some name that has `prefix` as a proper prefix.
fn extends(pattern: &[Segment], prefix: &[String]) -> bool {
    match (pattern.split_first(), prefix.split_first()) {
        // The prefix is used up: something longer matches if the pattern still wants a
        // segment (a trailing `**` alone also accepts more).
        (Some(_), None) => true,
        (None, _) => false,
        (Some((Segment::AnyDepth, rest)), Some(_)) => {
            extends(rest, prefix) || extends(pattern, &prefix[1..])
        }
        (Some((Segment::Literal(literal), rest)), Some((first, prefix_rest))) => {
            literal == first && extends(rest, prefix_rest)
        }
        (Some((Segment::One, rest)), Some((_, prefix_rest))) => extends(rest, prefix_rest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Visibility::*;

    fn vis(patterns: &[&str], name: &str, delimiter: Option<char>) -> Visibility {
        FolderPolicy::new(patterns).visibility_of_wire(name.as_bytes(), delimiter)
    }

    #[test]
    fn pattern_table() {
        let segreteria = ["INBOX", "Sent", "Ricevute/**"];
        let cases: &[(&[&str], &str, Option<char>, Visibility)] = &[
            (&segreteria, "INBOX", Some('/'), Granted),
            (&segreteria, "inbox", Some('/'), Granted),
            (&segreteria, "InBoX", Some('/'), Granted),
            (&segreteria, "INBOX/Secret", Some('/'), Hidden),
            (&segreteria, "Sent", Some('/'), Granted),
            (&segreteria, "sent", Some('/'), Hidden),
            (&segreteria, "SENT", Some('/'), Hidden),
            (&segreteria, "Sent/Old", Some('/'), Hidden),
            (&segreteria, "Ricevute", Some('/'), Granted),
            (&segreteria, "Ricevute/Consegne", Some('/'), Granted),
            (&segreteria, "Ricevute/Consegne/2026", Some('/'), Granted),
            (&segreteria, "Riservata", Some('/'), Hidden),
            // Tricks: trailing, doubled, leading delimiters and dot segments.
            (&segreteria, "Sent/", Some('/'), Hidden),
            (&segreteria, "/Sent", Some('/'), Hidden),
            (&segreteria, "Ricevute//Consegne", Some('/'), Hidden),
            (&segreteria, "Ricevute/../Riservata", Some('/'), Hidden),
            (&segreteria, "Ricevute/./x", Some('/'), Hidden),
            // A provider delimiter other than `/`.
            (&segreteria, "Ricevute.Consegne", Some('.'), Granted),
            (&segreteria, "Ricevute/Consegne", Some('.'), Hidden),
            (&segreteria, "INBOX.Secret", Some('.'), Hidden),
            (&segreteria, "Ricevute.Consegne", Some('/'), Hidden),
            // Flat namespace.
            (&segreteria, "Sent", None, Granted),
            (&segreteria, "Ricevute/Consegne", None, Hidden),
            // Parents of granted folders.
            (&["Archivio/2026/Legale"], "Archivio", Some('/'), Parent),
            (
                &["Archivio/2026/Legale"],
                "Archivio/2026",
                Some('/'),
                Parent,
            ),
            (
                &["Archivio/2026/Legale"],
                "Archivio/2026/Legale",
                Some('/'),
                Granted,
            ),
            (
                &["Archivio/2026/Legale"],
                "Archivio/2025",
                Some('/'),
                Hidden,
            ),
            (&["*/Legale"], "Clienti", Some('/'), Parent),
            (&["*/Legale"], "Clienti/Legale", Some('/'), Granted),
            (&["*/Legale"], "Clienti/Altro", Some('/'), Hidden),
            (&["*"], "Anything", Some('/'), Granted),
            (&["*"], "Anything/Below", Some('/'), Hidden),
            (&["**"], "Any/thing/at/all", Some('/'), Granted),
            (&["a/**/z"], "a/z", Some('/'), Granted),
            (&["a/**/z"], "a/b/c/z", Some('/'), Granted),
            (&["a/**/z"], "a/b", Some('/'), Parent),
            (&["a/**/z"], "b", Some('/'), Hidden),
            // Modified UTF-7: decoded before matching, only the canonical spelling.
            (&["Riservat\u{e0}"], "Riservat&AOA-", Some('/'), Granted),
            (&["Riservat\u{e0}"], "Riservat\u{e0}", Some('/'), Hidden),
            (&["Sent"], "&AFM-ent", Some('/'), Hidden),
            (&["R&D"], "R&-D", Some('/'), Granted),
            (&["R&D"], "R&D", Some('/'), Hidden),
            // Nothing granted.
            (&[], "INBOX", Some('/'), Hidden),
        ];
        for (patterns, name, delimiter, want) in cases {
            assert_eq!(
                vis(patterns, name, *delimiter),
                *want,
                "{patterns:?} {name:?} {delimiter:?}"
            );
        }
    }

    #[test]
    fn descendants() {
        let policy = FolderPolicy::new(&["INBOX", "Ricevute/**"]);
        let seg = |s: &str| split_name(s.as_bytes(), Some('/')).unwrap();
        assert!(!policy.may_have_granted_descendants(&seg("INBOX")));
        assert!(policy.may_have_granted_descendants(&seg("Ricevute")));
        assert!(policy.may_have_granted_descendants(&seg("Ricevute/Consegne")));
        assert!(!policy.may_have_granted_descendants(&seg("Sent")));
    }
}
