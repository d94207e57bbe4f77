//! Reading provider responses and rewriting the few that need it, free of I/O.
//!
//! Responses pass to the client byte for byte except where pecgate must change what the
//! client learns: the capability list (an allow-list of what pecgate relays end to end). The
//! relay asks [`classify`] about the first line of every response and only buffers and
//! rewrites what it must.

use imap_codec::ResponseCodec;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::response::{Data, Response};

use super::command::wire_name;

/// Capabilities pecgate relays end to end, when the provider offers them too.
const RELAYED_WHEN_UPSTREAM_HAS: &[&str] = &[
    "IDLE",
    "UIDPLUS",
    "MOVE",
    "UNSELECT",
    "NAMESPACE",
    "CHILDREN",
    "ID",
];

/// Capabilities the gateway itself implements towards the client, whatever the provider has.
const GATEWAY_OWN: &[&str] = &["IMAP4rev1", "LITERAL+"];

/// The capability list offered to a logged-in client, given the provider's list.
/// Anything not on the allow-list (COMPRESS, NOTIFY, unknown extensions) is dropped.
pub fn client_capabilities<'a>(upstream: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let upstream: Vec<&str> = upstream.into_iter().collect();
    let mut caps: Vec<String> = GATEWAY_OWN.iter().map(|c| (*c).to_owned()).collect();
    for cap in RELAYED_WHEN_UPSTREAM_HAS {
        if upstream.iter().any(|u| u.eq_ignore_ascii_case(cap)) {
            caps.push((*cap).to_owned());
        }
    }
    caps
}

/// Status of a tagged or untagged status response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    Bye,
    PreAuth,
}

/// What the first line of a provider response is.
#[derive(Debug, PartialEq, Eq)]
pub enum ResponseKind<'a> {
    /// `+ ...`: a continuation request.
    Continuation,
    /// `TAG OK|NO|BAD ...`.
    Tagged { tag: &'a str, status: Status },
    /// `* OK|NO|BAD|BYE|PREAUTH ...`.
    UntaggedStatus(Status),
    /// Any other untagged response (`* 3 FETCH`, `* LIST`, ...).
    UntaggedData,
    /// Not IMAP.
    Garbage,
}

/// Classify a response by its first line.
pub fn classify(line: &[u8]) -> ResponseKind<'_> {
    if line.starts_with(b"+") {
        return ResponseKind::Continuation;
    }
    let mut words = line.splitn(3, |&b| b == b' ');
    let (Some(first), Some(second)) = (words.next(), words.next()) else {
        return ResponseKind::Garbage;
    };
    let second = trim_line_end(second);
    let status = parse_status(second);
    if first == b"*" {
        return match status {
            Some(s) => ResponseKind::UntaggedStatus(s),
            None => ResponseKind::UntaggedData,
        };
    }
    match (std::str::from_utf8(first), status) {
        (Ok(tag), Some(status @ (Status::Ok | Status::No | Status::Bad))) => {
            ResponseKind::Tagged { tag, status }
        }
        _ => ResponseKind::Garbage,
    }
}

fn trim_line_end(word: &[u8]) -> &[u8] {
    let word = word.strip_suffix(b"\n").unwrap_or(word);
    word.strip_suffix(b"\r").unwrap_or(word)
}

fn parse_status(word: &[u8]) -> Option<Status> {
    let upper = word.to_ascii_uppercase();
    Some(match upper.as_slice() {
        b"OK" => Status::Ok,
        b"NO" => Status::No,
        b"BAD" => Status::Bad,
        b"BYE" => Status::Bye,
        b"PREAUTH" => Status::PreAuth,
        _ => return None,
    })
}

/// Whether a refusal (a `NO`/`BAD` to a login, or a `BYE` greeting) says the provider has
/// reached its limit of simultaneous connections, rather than that the credentials are wrong
/// or the server is down. Servers word it differently (Dovecot: `NO [UNAVAILABLE] Maximum
/// number of connections from user+IP exceeded`; Gmail: `NO [ALERT] Too many simultaneous
/// connections`), so the test is on the text: it names connections and a limit, and carries no
/// response code that means something else (`[AUTHENTICATIONFAILED]`...).
pub fn names_connection_limit(line: &[u8]) -> bool {
    let refusal = matches!(
        classify(line),
        ResponseKind::Tagged {
            status: Status::No | Status::Bad,
            ..
        } | ResponseKind::UntaggedStatus(Status::Bye)
    );
    if !refusal {
        return false;
    }
    let text = String::from_utf8_lossy(line).to_ascii_lowercase();
    let code = text
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(code, _)| code.split(' ').next().unwrap_or_default().to_owned());
    let code_fits = code
        .as_deref()
        .is_none_or(|code| matches!(code, "unavailable" | "limit" | "alert" | "inuse"));
    let names_limit = ["too many", "maximum", "exceeded", "limit"]
        .iter()
        .any(|word| text.contains(word));
    code_fits && text.contains("connection") && names_limit
}

/// Whether the response line carries a capability list that must be replaced. Called on every
/// provider line, so it looks before it allocates: FETCH lines can be long.
pub fn carries_capabilities(line: &[u8]) -> bool {
    let starts_with = |prefix: &[u8]| {
        line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
    };
    if starts_with(b"* CAPABILITY ") || starts_with(b"* CAPABILITY\r") {
        return true;
    }
    matches!(
        classify(line),
        ResponseKind::Tagged { .. } | ResponseKind::UntaggedStatus(_)
    ) && line
        .windows(12)
        .any(|w| w.eq_ignore_ascii_case(b"[CAPABILITY "))
}

/// Replace the capability list in `line` with `caps`.
pub fn replace_capabilities(line: &[u8], caps: &[String]) -> Vec<u8> {
    let list = caps.join(" ");
    let upper = line.to_ascii_uppercase();
    if upper.starts_with(b"* CAPABILITY") {
        return format!("* CAPABILITY {list}\r\n").into_bytes();
    }
    let Some(open) = upper.windows(12).position(|w| w == b"[CAPABILITY ") else {
        return line.to_vec();
    };
    let Some(close) = line[open..].iter().position(|&b| b == b']') else {
        return line.to_vec();
    };
    let mut out = line[..open].to_vec();
    out.extend_from_slice(format!("[CAPABILITY {list}]").as_bytes());
    out.extend_from_slice(&line[open + close + 1..]);
    out
}

/// The capability atoms of a `* CAPABILITY` line or a `[CAPABILITY ...]` code.
pub fn capabilities_in(line: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(line);
    let upper = text.to_ascii_uppercase();
    let list = if let Some(rest) = upper.strip_prefix("* CAPABILITY") {
        &text[text.len() - rest.len()..]
    } else if let Some(open) = upper.find("[CAPABILITY ") {
        let after = &text[open + "[CAPABILITY ".len()..];
        &after[..after.find(']').unwrap_or(after.len())]
    } else {
        return Vec::new();
    };
    list.split_ascii_whitespace().map(str::to_owned).collect()
}

/// One `* LIST` / `* LSUB` entry: a folder of the provider's listing, or of the listing
/// pecgate shows a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub wire: Vec<u8>,
    pub delimiter: Option<char>,
    pub attributes: Vec<String>,
}

/// Parse a `* LIST` or `* LSUB` response (literals included).
pub fn list_entry(unit: &[u8]) -> Option<ListEntry> {
    let (rest, response) = ResponseCodec::default().decode(unit).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let (items, delimiter, mailbox) = match response {
        Response::Data(Data::List {
            items,
            delimiter,
            mailbox,
        })
        | Response::Data(Data::Lsub {
            items,
            delimiter,
            mailbox,
        }) => (items, delimiter, mailbox),
        _ => return None,
    };
    Some(ListEntry {
        wire: wire_name(&mailbox),
        delimiter: delimiter.map(|d| d.inner()),
        attributes: items.iter().map(ToString::to_string).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOVECOT: &str = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY \
        THREAD=REFERENCES MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS \
        LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH LIST-STATUS BINARY MOVE \
        SNIPPET=FUZZY STATUS=SIZE LITERAL+ NOTIFY SPECIAL-USE COMPRESS=DEFLATE";

    #[test]
    fn allow_list_strips_what_pecgate_does_not_relay() {
        let caps = client_capabilities(DOVECOT.split(' '));
        assert_eq!(
            caps,
            [
                "IMAP4rev1",
                "LITERAL+",
                "IDLE",
                "UIDPLUS",
                "MOVE",
                "UNSELECT",
                "NAMESPACE",
                "CHILDREN",
                "ID"
            ]
        );
        // A minimal provider gets only the gateway's own.
        assert_eq!(
            client_capabilities(["IMAP4rev1"]),
            ["IMAP4rev1", "LITERAL+"]
        );
    }

    #[test]
    fn classification() {
        assert_eq!(classify(b"+ idling\r\n"), ResponseKind::Continuation);
        assert_eq!(classify(b"+\r\n"), ResponseKind::Continuation);
        assert_eq!(
            classify(b"a1 OK done\r\n"),
            ResponseKind::Tagged {
                tag: "a1",
                status: Status::Ok
            }
        );
        assert_eq!(
            classify(b"a1 no [TRYCREATE] x\r\n"),
            ResponseKind::Tagged {
                tag: "a1",
                status: Status::No
            }
        );
        assert_eq!(
            classify(b"* BYE bye\r\n"),
            ResponseKind::UntaggedStatus(Status::Bye)
        );
        assert_eq!(
            classify(b"* 3 FETCH (BODY[] {5}\r\n"),
            ResponseKind::UntaggedData
        );
        assert_eq!(classify(b"a1 FETCH\r\n"), ResponseKind::Garbage);
        assert_eq!(classify(b"junk\r\n"), ResponseKind::Garbage);
    }

    #[test]
    fn capability_rewrites() {
        let caps = vec!["IMAP4rev1".to_owned(), "IDLE".to_owned()];
        let line = format!("a OK [CAPABILITY {DOVECOT}] Logged in\r\n");
        assert!(carries_capabilities(line.as_bytes()));
        assert_eq!(
            replace_capabilities(line.as_bytes(), &caps),
            b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
        );
        let line = format!("* CAPABILITY {DOVECOT}\r\n");
        assert!(carries_capabilities(line.as_bytes()));
        assert_eq!(
            replace_capabilities(line.as_bytes(), &caps),
            b"* CAPABILITY IMAP4rev1 IDLE\r\n"
        );
        assert!(!carries_capabilities(b"* 1 FETCH (FLAGS (\\Seen))\r\n"));
        assert!(!carries_capabilities(
            b"* LIST () \"/\" \"[CAPABILITY x]\"\r\n"
        ));
        assert_eq!(
            capabilities_in(line.as_bytes()).len(),
            DOVECOT.split_whitespace().count()
        );
        assert_eq!(
            capabilities_in(b"a OK [CAPABILITY IMAP4rev1 IDLE] hi\r\n"),
            ["IMAP4rev1", "IDLE"]
        );
    }

    #[test]
    fn connection_limit_refusals_are_told_from_other_refusals() {
        for limit in [
            &b"s1 NO [UNAVAILABLE] Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10)\r\n"[..],
            b"s1 NO [ALERT] Too many simultaneous connections. (Failure)\r\n",
            b"s1 NO [LIMIT] Connection limit reached\r\n",
            b"* BYE Too many connections from your account\r\n",
        ] {
            assert!(names_connection_limit(limit), "{}", String::from_utf8_lossy(limit));
        }
        for other in [
            &b"s1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"[..],
            b"s1 NO [AUTHENTICATIONFAILED] Too many failed logins: connection limit\r\n",
            b"s1 NO [UNAVAILABLE] Temporary authentication failure\r\n",
            b"* BYE Server shutting down\r\n",
            b"s1 OK Too many connections are fine\r\n",
            b"* OK [ALERT] Maximum connections exceeded\r\n",
        ] {
            assert!(
                !names_connection_limit(other),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
