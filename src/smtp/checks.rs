//! The decisions: who may send, and the PEC formal checks a provider would otherwise answer
//! with a "non accettazione" hours later. Pure functions; each refusal is its own reply code,
//! enhanced code and a sentence an employee understands.
//!
//! | check | reply |
//! |---|---|
//! | no `send` permission on the mailbox | `550 5.7.1` |
//! | the mailbox has no `smtp` URL | `550 5.3.5` |
//! | no provider password in the vault | `451 4.3.5` |
//! | envelope sender (MAIL FROM) is not the mailbox's PEC address | `553 5.7.1` |
//! | size × recipients over `max_message_bytes` | `552 5.2.3` |
//! | `send_rate` reached | `451 4.7.0` (retry later) |
//! | header cannot be parsed, bare CR/LF | `554 5.6.0` |
//! | From (or Sender) is not exactly the mailbox's PEC address | `554 5.7.1` |
//! | a Bcc header | `554 5.7.0` |
//! | an envelope recipient missing from To/Cc, or the other way round | `554 5.1.0` |

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::{Permission, Permissions, SendRate};

use super::data::DataProblem;
use super::message::{HeaderError, HeaderSummary, Mailbox, same_address};
use super::reply::{Enhanced, Reply};

/// What MAIL FROM is checked against.
pub struct MailboxRules<'a> {
    pub name: &'a str,
    pub address: &'a str,
    pub permissions: Permissions,
    pub has_smtp: bool,
    pub has_password: bool,
    pub max_message_bytes: u64,
}

/// MAIL FROM: permission, configuration, envelope sender, declared size.
pub fn check_mail_from(
    rules: &MailboxRules<'_>,
    from: &str,
    declared_size: u64,
) -> Result<(), Reply> {
    if !rules.permissions.has(Permission::Send) {
        return Err(Reply::new(
            550,
            Enhanced(5, 7, 1),
            format!(
                "You may not send from mailbox {}: your roles do not include the send permission. Ask IT if you need it",
                rules.name
            ),
        ));
    }
    if !rules.has_smtp {
        return Err(Reply::new(
            550,
            Enhanced(5, 3, 5),
            format!(
                "Mailbox {} has no SMTP server configured in pecgate, so it cannot send; tell IT",
                rules.name
            ),
        ));
    }
    if !rules.has_password {
        return Err(Reply::new(
            451,
            Enhanced(4, 3, 5),
            format!(
                "Mailbox {} is not set up on the gateway yet (no provider password); tell IT and try again later",
                rules.name
            ),
        ));
    }
    if !same_address(from, rules.address) {
        let shown = if from.is_empty() { "<>" } else { from };
        return Err(Reply::new(
            553,
            Enhanced(5, 7, 1),
            format!(
                "Sender address rejected: PEC mailbox {} can only send as {}, not {shown}. Set your account's address to {}",
                rules.name, rules.address, rules.address
            ),
        ));
    }
    check_size(declared_size, 1, rules.max_message_bytes)
}

/// Size × recipients within the mailbox's limit (PEC providers count every copy).
pub fn check_size(size: u64, recipients: usize, limit: u64) -> Result<(), Reply> {
    let total = size.saturating_mul(recipients.max(1) as u64);
    if total > limit {
        return Err(Reply::new(
            552,
            Enhanced(5, 2, 3),
            format!(
                "Message too big for PEC: {} × {} recipient(s) = {} exceeds this mailbox's limit of {}. Send fewer or smaller attachments, or fewer recipients per message",
                human_size(size),
                recipients.max(1),
                human_size(total),
                human_size(limit)
            ),
        ));
    }
    Ok(())
}

/// The largest message accepted with `recipients` recipients.
pub fn size_limit(limit: u64, recipients: usize) -> u64 {
    limit / recipients.max(1) as u64
}

fn human_size(bytes: u64) -> String {
    if bytes >= 1024 * 1024 {
        format!("{:.1} MB", bytes as f64 / (1024.0 * 1024.0))
    } else if bytes >= 1024 {
        format!("{:.1} KB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} bytes")
    }
}

/// The reply for a message that could not be received cleanly.
pub fn data_problem_reply(problem: DataProblem, size: u64, recipients: usize, limit: u64) -> Reply {
    match problem {
        DataProblem::TooBig => check_size(size, recipients, limit)
            .err()
            .unwrap_or_else(|| check_size(u64::MAX, 1, limit).unwrap_err()),
        DataProblem::BareLineEnding => Reply::new(
            554,
            Enhanced(5, 6, 0),
            "The message has lines not ending in CRLF (a bare CR or LF); your mail program sent a malformed message",
        ),
        DataProblem::HeaderTooBig => Reply::new(
            554,
            Enhanced(5, 6, 0),
            "The message header is too large to be checked",
        ),
        DataProblem::NulByte => Reply::new(
            554,
            Enhanced(5, 6, 0),
            "The message contains NUL bytes; your mail program sent a malformed message",
        ),
    }
}

/// The reply for a header pecgate cannot parse.
pub fn header_error_reply(error: &HeaderError) -> Reply {
    Reply::new(
        554,
        Enhanced(5, 6, 0),
        format!("The message cannot be checked for PEC: {error}"),
    )
}

/// The PEC formal checks on a received message.
pub fn check_message(
    mailbox_address: &str,
    recipients: &[String],
    header: &HeaderSummary,
) -> Result<(), Reply> {
    let from_ok = header.from_fields == 1
        && header.from.len() == 1
        && !header.from[0].in_group
        && same_address(&header.from[0].address, mailbox_address);
    if !from_ok {
        let found = match (header.from_fields, header.from.as_slice()) {
            (0, _) => "the message has no From header".to_owned(),
            (1, [one]) => format!("it says {}", one.address),
            _ => "it has more than one address".to_owned(),
        };
        return Err(Reply::new(
            554,
            Enhanced(5, 7, 1),
            format!(
                "The From header must be exactly this mailbox's PEC address {mailbox_address}, but {found}. Set your account's address to {mailbox_address}"
            ),
        ));
    }
    if let Some(sender) = &header.sender {
        let ok = matches!(sender.as_slice(), [one] if same_address(&one.address, mailbox_address));
        if !ok {
            return Err(Reply::new(
                554,
                Enhanced(5, 7, 1),
                format!(
                    "The Sender header must be this mailbox's PEC address {mailbox_address} (or absent)"
                ),
            ));
        }
    }
    if header.has_bcc {
        return Err(Reply::new(
            554,
            Enhanced(5, 7, 0),
            "PEC does not allow Bcc recipients: move them to To or Cc",
        ));
    }
    let listed: Vec<&Mailbox> = header.to.iter().chain(&header.cc).collect();
    let missing: Vec<&str> = recipients
        .iter()
        .filter(|r| !listed.iter().any(|m| same_address(&m.address, r)))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(Reply::new(
            554,
            Enhanced(5, 1, 0),
            format!(
                "PEC requires every recipient to appear in To or Cc, and {} does not (hidden recipients are not allowed): add it to To or Cc",
                list(&missing)
            ),
        ));
    }
    let extra: Vec<&str> = listed
        .iter()
        .filter(|m| !recipients.iter().any(|r| same_address(&m.address, r)))
        .map(|m| m.address.as_str())
        .collect();
    if !extra.is_empty() {
        return Err(Reply::new(
            554,
            Enhanced(5, 1, 0),
            format!(
                "{} is in To or Cc but was not given as a recipient: PEC requires the envelope recipients and To/Cc to be the same",
                list(&extra)
            ),
        ));
    }
    Ok(())
}

fn list(addresses: &[&str]) -> String {
    const SHOWN: usize = 3;
    let mut s = addresses
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if addresses.len() > SHOWN {
        s.push_str(&format!(" and {} more", addresses.len() - SHOWN));
    }
    s
}

/// A sliding-window limit on messages sent per mailbox (`send_rate`).
#[derive(Debug)]
pub struct RateLimiter {
    rate: SendRate,
    /// Start times of the messages in the current window (sent or being sent).
    sent: VecDeque<Instant>,
}

/// A slot taken by [`RateLimiter::acquire`]; give it back with [`RateLimiter::release`] when
/// the provider did not accept the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSlot(Instant);

impl RateLimiter {
    pub fn new(rate: SendRate) -> RateLimiter {
        RateLimiter {
            rate,
            sent: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&first) = self.sent.front() {
            if now.duration_since(first) >= self.rate.per {
                self.sent.pop_front();
            } else {
                break;
            }
        }
    }

    /// How long until a message may be sent (`None`: now).
    pub fn wait_time(&mut self, now: Instant) -> Option<Duration> {
        self.expire(now);
        if self.sent.len() < self.rate.count as usize {
            return None;
        }
        let first = *self.sent.front()?;
        Some(self.rate.per.saturating_sub(now.duration_since(first)))
    }

    /// Take a slot for a message about to be sent, or say how long to wait.
    pub fn acquire(&mut self, now: Instant) -> Result<RateSlot, Duration> {
        match self.wait_time(now) {
            Some(wait) => Err(wait),
            None => {
                self.sent.push_back(now);
                Ok(RateSlot(now))
            }
        }
    }

    /// Return a slot whose message was not sent.
    pub fn release(&mut self, slot: RateSlot) {
        if let Some(i) = self.sent.iter().position(|&t| t == slot.0) {
            self.sent.remove(i);
        }
    }

    /// The 4xx reply for a client that must wait.
    pub fn reply(&self, mailbox: &str, wait: Duration) -> Reply {
        Reply::new(
            451,
            Enhanced(4, 7, 0),
            format!(
                "Mailbox {mailbox} may send at most {} messages (send_rate); nothing was sent, try again in {} seconds",
                self.rate,
                wait.as_secs().max(1)
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::message::summarize;

    fn rules(permissions: Permissions) -> MailboxRules<'static> {
        MailboxRules {
            name: "studio",
            address: "studio@pec.it",
            permissions,
            has_smtp: true,
            has_password: true,
            max_message_bytes: 1000,
        }
    }

    fn code(r: Result<(), Reply>) -> Option<(u16, String)> {
        r.err().map(|r| (r.code, r.enhanced.unwrap().to_string()))
    }

    #[test]
    fn mail_from_decisions() {
        let send: Permissions = [Permission::Send].into_iter().collect();
        let read: Permissions = [Permission::Read].into_iter().collect();
        assert_eq!(
            code(check_mail_from(&rules(send), "studio@pec.it", 0)),
            None
        );
        assert_eq!(
            code(check_mail_from(&rules(send), "STUDIO@PEC.IT", 999)),
            None
        );
        assert_eq!(
            code(check_mail_from(&rules(read), "studio@pec.it", 0)),
            Some((550, "5.7.1".into()))
        );
        let r = check_mail_from(&rules(send), "mario@gmail.com", 0).unwrap_err();
        assert_eq!((r.code, r.enhanced), (553, Some(Enhanced(5, 7, 1))));
        assert!(r.lines[0].contains("studio@pec.it"));
        assert_eq!(
            code(check_mail_from(&rules(send), "", 0)),
            Some((553, "5.7.1".into()))
        );
        assert_eq!(
            code(check_mail_from(&rules(send), "studio@pec.it", 1001)),
            Some((552, "5.2.3".into()))
        );
        let mut r = rules(send);
        r.has_smtp = false;
        assert_eq!(
            code(check_mail_from(&r, "studio@pec.it", 0)),
            Some((550, "5.3.5".into()))
        );
        let mut r = rules(send);
        r.has_password = false;
        assert_eq!(
            code(check_mail_from(&r, "studio@pec.it", 0)),
            Some((451, "4.3.5".into()))
        );
    }

    #[test]
    fn size_times_recipients() {
        assert!(check_size(500, 2, 1000).is_ok());
        assert_eq!(code(check_size(501, 2, 1000)), Some((552, "5.2.3".into())));
        assert_eq!(size_limit(1000, 3), 333);
        assert_eq!(size_limit(1000, 0), 1000);
    }

    fn check(header: &str, rcpts: &[&str]) -> Option<(u16, String)> {
        let summary = summarize(header.as_bytes()).unwrap();
        let rcpts: Vec<String> = rcpts.iter().map(|s| s.to_string()).collect();
        code(check_message("studio@pec.it", &rcpts, &summary))
    }

    #[test]
    fn formal_checks() {
        let ok = "From: Studio <studio@pec.it>\r\nTo: a@x.it\r\nCc: B <b@y.it>\r\n\r\n";
        assert_eq!(check(ok, &["a@x.it", "B@Y.IT"]), None);
        // From
        assert_eq!(
            check("From: other@pec.it\r\nTo: a@x.it\r\n\r\n", &["a@x.it"]),
            Some((554, "5.7.1".into()))
        );
        assert_eq!(
            check("To: a@x.it\r\n\r\n", &["a@x.it"]),
            Some((554, "5.7.1".into()))
        );
        assert_eq!(
            check(
                "From: studio@pec.it, x@y.it\r\nTo: a@x.it\r\n\r\n",
                &["a@x.it"]
            ),
            Some((554, "5.7.1".into()))
        );
        assert_eq!(
            check(
                "From: studio@pec.it\r\nFrom: studio@pec.it\r\nTo: a@x.it\r\n\r\n",
                &["a@x.it"]
            ),
            Some((554, "5.7.1".into()))
        );
        assert_eq!(
            check(
                "From: studio@pec.it\r\nSender: x@y.it\r\nTo: a@x.it\r\n\r\n",
                &["a@x.it"]
            ),
            Some((554, "5.7.1".into()))
        );
        // Bcc, even empty
        assert_eq!(
            check(
                "From: studio@pec.it\r\nTo: a@x.it\r\nBcc:\r\n\r\n",
                &["a@x.it"]
            ),
            Some((554, "5.7.0".into()))
        );
        // RCPT <-> To/Cc
        assert_eq!(
            check(
                "From: studio@pec.it\r\nTo: a@x.it\r\n\r\n",
                &["a@x.it", "hidden@z.it"]
            ),
            Some((554, "5.1.0".into()))
        );
        assert_eq!(
            check(
                "From: studio@pec.it\r\nTo: a@x.it, b@y.it\r\n\r\n",
                &["a@x.it"]
            ),
            Some((554, "5.1.0".into()))
        );
        // Groups count as To recipients.
        assert_eq!(
            check(
                "From: studio@pec.it\r\nTo: Uffici: a@x.it, b@y.it;\r\n\r\n",
                &["a@x.it", "b@y.it"]
            ),
            None
        );
    }

    #[test]
    fn refusal_texts_are_specific() {
        let summary =
            summarize(b"From: studio@pec.it\r\nTo: a@x.it\r\nBcc: c@z.it\r\n\r\n").unwrap();
        let r = check_message(
            "studio@pec.it",
            &["a@x.it".into(), "c@z.it".into()],
            &summary,
        )
        .unwrap_err();
        assert_eq!(
            r.lines[0],
            "PEC does not allow Bcc recipients: move them to To or Cc"
        );
    }

    #[test]
    fn rate_limiter_window() {
        let rate: SendRate = "2/min".parse().unwrap();
        let mut limiter = RateLimiter::new(rate);
        let t0 = Instant::now();
        let a = limiter.acquire(t0).unwrap();
        limiter.acquire(t0 + Duration::from_secs(10)).unwrap();
        let wait = limiter.acquire(t0 + Duration::from_secs(20)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(40));
        let reply = limiter.reply("studio", wait);
        assert_eq!((reply.code, reply.enhanced), (451, Some(Enhanced(4, 7, 0))));
        // A message the provider did not accept gives its slot back.
        limiter.release(a);
        assert!(limiter.acquire(t0 + Duration::from_secs(20)).is_ok());
        assert!(limiter.wait_time(t0 + Duration::from_secs(30)).is_some());
        // The window slides.
        assert_eq!(limiter.wait_time(t0 + Duration::from_secs(80)), None);
    }
}
