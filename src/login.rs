//! Personal-credential checks shared by every protocol front end (IMAP, SMTP).
//!
//! [`check_credentials`] is the one place that decides whether a login name and password are
//! good and which mailbox the session acts on:
//! - the [`LoginThrottle`] is asked first: a locked address or user is refused without checking
//!   the password, answered like a wrong password (and as slowly), so a lock reveals nothing;
//! - argon2 runs off the async workers (`spawn_blocking`), at most one per core, and waiting
//!   for a turn is bounded ([`MAX_WAITING_CHECKS`], [`CHECK_QUEUE_DEADLINE`]): past either the
//!   client is told to come back (`Busy`) instead of piling up behind an attacker;
//! - unknown users are verified against a dummy hash so timing does not reveal which users
//!   exist, then [`Config::resolve_login`]; a repeat of a login verified in the last hour
//!   (same user, same stored hash, same password: a keyed MAC, no password kept) skips
//!   argon2, so a client opening five connections costs one check;
//! - on success the connection's pre-login [`Ticket`] becomes a session of that user, which
//!   enforces `max_sessions` and `max_sessions_per_user`.
//!
//! Every refusal for bad credentials is answered only once the throttle's delay has passed
//! since the attempt started (`login_failure_delay`, doubling after a few failures). What the
//! client is told, and what is audited, stays with the protocol.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::config::{Config, LoginError, LoginTarget};
use crate::guard::{
    AdmissionRefused, LockScope, LoginThrottle, MAX_FAILURE_DELAY, ThrottleSettings, Ticket,
    Verdict,
};
use crate::password;

/// Logins waiting for a password check beyond which new ones are told to come back.
pub const MAX_WAITING_CHECKS: usize = 256;
/// The longest a login waits for its turn at a password check.
pub const CHECK_QUEUE_DEADLINE: Duration = Duration::from_secs(10);

/// Why a login was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginRefusal {
    /// Wrong password, unknown user or disabled user: the client must not learn which.
    #[error("{reason}")]
    BadCredentials { reason: &'static str },
    /// Too many failures: refused unchecked. Told to the client exactly as `BadCredentials`.
    #[error("locked ({})", .0.as_str())]
    Locked(LockScope),
    /// The password checks are saturated: try again later (nothing was checked).
    #[error("too many logins waiting for a password check")]
    Busy,
    /// The password is right but the user has several mailboxes and did not choose one.
    #[error("no mailbox chosen")]
    NoMailboxChosen { choices: Vec<String> },
    /// The password is right but the named mailbox is not granted (or the user has none).
    #[error("{0}")]
    MailboxNotGranted(LoginError),
    /// The password is right but the user (or pecgate) has too many sessions open.
    #[error("{0}")]
    TooManySessions(AdmissionRefused),
}

impl LoginRefusal {
    /// The `outcome` label of `pecgate_logins_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            LoginRefusal::BadCredentials { .. } => "failed",
            LoginRefusal::Locked(_) => "locked",
            LoginRefusal::Busy => "busy",
            LoginRefusal::NoMailboxChosen { .. } | LoginRefusal::MailboxNotGranted(_) => {
                "not_granted"
            }
            LoginRefusal::TooManySessions(_) => "limit",
        }
    }

    /// Whether the client is told "wrong user name or password" (every credential failure,
    /// including a lock, looks the same from outside).
    pub fn looks_like_bad_credentials(&self) -> bool {
        matches!(
            self,
            LoginRefusal::BadCredentials { .. } | LoginRefusal::Locked(_)
        )
    }
}

/// A refused login, with what the audit trail may record about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginFailure {
    /// The user name, when such a user exists (`None` for unknown users).
    pub user: Option<String>,
    /// The part of the login before `/`.
    pub user_name: String,
    pub refusal: LoginRefusal,
}

impl LoginFailure {
    /// `login="mario/x" reason=...` for the audit log (never the password).
    pub fn audit_detail(&self, login: &str) -> String {
        format!("login={login:?} reason={}", self.refusal)
    }
}

/// Verified logins remembered, so that a repeat login with the same password (Thunderbird
/// opens five connections at once; clients reconnect all day) skips argon2.
const CACHE_MAX: usize = 4096;
/// How long a remembered login stays good.
const CACHE_AGE: Duration = Duration::from_secs(3600);

/// Logins verified recently, as keyed MACs (HMAC-SHA256 under a key drawn at start-up) of the
/// user, the stored hash and the password: no password is kept, a changed password (hash)
/// never matches, and the table is cleared on reload.
struct VerifiedLogins {
    key: Zeroizing<[u8; 32]>,
    entries: HashMap<[u8; 32], Instant>,
}

impl VerifiedLogins {
    fn new() -> VerifiedLogins {
        VerifiedLogins {
            key: Zeroizing::new(rand::random()),
            entries: HashMap::new(),
        }
    }

    fn mac(&self, user: &str, hash: &str, secret: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key[..])
            .expect("HMAC takes any key length");
        // Lengths first, so that no two (user, hash, secret) triples share an encoding.
        for part in [user.as_bytes(), hash.as_bytes(), secret] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    fn knows(&self, mac: &[u8; 32], now: Instant) -> bool {
        self.entries
            .get(mac)
            .is_some_and(|&at| now.duration_since(at) < CACHE_AGE)
    }

    fn remember(&mut self, mac: [u8; 32], now: Instant) {
        if self.entries.len() >= CACHE_MAX {
            self.entries
                .retain(|_, at| now.duration_since(*at) < CACHE_AGE);
            if self.entries.len() >= CACHE_MAX
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(k, _)| *k)
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(mac, now);
    }
}

/// The shared state of password checking: the throttle, the bounded check queue and the
/// verified-login cache.
pub struct LoginGate {
    throttle: Mutex<LoginThrottle>,
    checks: Arc<Semaphore>,
    waiting: AtomicUsize,
    verified: Mutex<VerifiedLogins>,
}

impl LoginGate {
    /// `parallel` password checks at once.
    pub fn new(settings: ThrottleSettings, parallel: usize) -> LoginGate {
        LoginGate {
            throttle: Mutex::new(LoginThrottle::new(settings)),
            checks: Arc::new(Semaphore::new(parallel.max(1))),
            waiting: AtomicUsize::new(0),
            verified: Mutex::new(VerifiedLogins::new()),
        }
    }

    /// A reload: new throttle settings (counts kept), and every remembered login forgotten.
    pub fn reconfigure(&self, settings: ThrottleSettings) {
        self.throttle().set_settings(settings);
        self.verified().entries.clear();
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, VerifiedLogins> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn throttle(&self) -> std::sync::MutexGuard<'_, LoginThrottle> {
        self.throttle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A turn at a password check, or `None` if the queue is full or the wait too long.
    async fn turn(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(permit) = self.checks.clone().try_acquire_owned() {
            return Some(permit);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= MAX_WAITING_CHECKS {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let permit =
            tokio::time::timeout(CHECK_QUEUE_DEADLINE, self.checks.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        permit.ok()?.ok()
    }
}

/// Check `login` / `secret` from `peer` against the configuration. On success the user and
/// mailbox the session acts on, and `ticket` has become a session; on failure, after the
/// throttle's delay for credential failures, why.
pub async fn check_credentials(
    config: &Config,
    gate: &LoginGate,
    ticket: &mut Ticket,
    peer: IpAddr,
    login: &str,
    secret: Zeroizing<Vec<u8>>,
) -> Result<LoginTarget, LoginFailure> {
    let started = Instant::now();
    let user_name = login.split('/').next().unwrap_or(login).to_owned();
    let hash = config.users.get(&user_name).map(|u| u.password.clone());
    let user_exists = hash.is_some();
    let failure = |refusal| LoginFailure {
        user: user_exists.then(|| user_name.clone()),
        user_name: user_name.clone(),
        refusal,
    };

    let verdict = gate.throttle().before_attempt(&user_name, peer, started);
    if let Verdict::Locked(scope) = verdict {
        tracing::warn!(
            login,
            scope = scope.as_str(),
            "login locked: refused unchecked"
        );
        tokio::time::sleep_until((started + MAX_FAILURE_DELAY).into()).await;
        return Err(failure(LoginRefusal::Locked(scope)));
    }
    // A repeat of a login verified recently: no argon2 (only a right password can match).
    let mac = hash
        .as_ref()
        .map(|hash| gate.verified().mac(&user_name, hash, &secret));
    let remembered = mac
        .as_ref()
        .is_some_and(|mac| gate.verified().knows(mac, started));
    let verified = if remembered {
        true
    } else {
        // argon2 takes tens of milliseconds of CPU and ~19 MiB: keep it off the async
        // workers, bounded, with a bounded wait. Unknown users are checked against a dummy
        // hash so both cases cost the same.
        let Some(permit) = gate.turn().await else {
            tracing::warn!(login, "login refused: password checks saturated");
            return Err(failure(LoginRefusal::Busy));
        };
        let verified = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            match hash {
                Some(hash) => password::verify_password(&hash, &secret),
                None => {
                    password::verify_against_dummy(&secret);
                    false
                }
            }
        })
        .await
        .unwrap_or(false);
        if verified && let Some(mac) = mac {
            gate.verified().remember(mac, Instant::now());
        }
        verified
    };

    let resolved = if verified {
        config.resolve_login(login)
    } else {
        Err(LoginError::UnknownUser)
    };
    let refusal = match resolved {
        Ok(target) => {
            gate.throttle().on_success(&user_name, peer, Instant::now());
            return match ticket.promote(&target.user) {
                Ok(()) => Ok(target),
                Err(refused) => {
                    tracing::warn!(login, %refused, "login refused: too many sessions");
                    Err(failure(LoginRefusal::TooManySessions(refused)))
                }
            };
        }
        Err(LoginError::AmbiguousMailbox) => LoginRefusal::NoMailboxChosen {
            choices: config
                .mailboxes_of(&user_name)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        },
        Err(error @ (LoginError::MailboxNotGranted | LoginError::NoMailbox)) => {
            LoginRefusal::MailboxNotGranted(error)
        }
        Err(error @ (LoginError::UnknownUser | LoginError::Disabled)) => {
            LoginRefusal::BadCredentials {
                reason: if !verified && user_exists {
                    "wrong password"
                } else if error == LoginError::Disabled {
                    "user is disabled"
                } else {
                    "unknown user"
                },
            }
        }
    };
    let mut delay = config.gateway.login_failure_delay;
    if refusal.looks_like_bad_credentials() {
        let after = gate.throttle().on_failure(&user_name, peer, started);
        delay = after.delay;
        if let Some(scope) = after.locked {
            tracing::warn!(
                login,
                scope = scope.as_str(),
                "login locked: too many failures"
            );
        }
    }
    tracing::info!(login, reason = %refusal, "login failed");
    tokio::time::sleep_until((started + delay).into()).await;
    Err(failure(refusal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::{Admission, AdmissionLimits};
    use std::path::Path;

    fn config() -> Config {
        let hash = password::hash_password(b"secret").unwrap();
        let text = format!(
            r#"
[gateway]
state_dir = "state"
login_failure_delay_ms = 50
{mailboxes}[roles.one]
mailboxes = ["studio"]
permissions = ["send"]
[roles.both]
mailboxes = ["studio", "legal"]
permissions = ["send"]
[users.mario]
password = "{hash}"
roles = ["one"]
[users.anna]
password = "{hash}"
roles = ["both"]
[users.ex]
password = "{hash}"
roles = ["one"]
disabled = true
"#,
            mailboxes = crate::config::TEST_MAILBOXES
        );
        Config::parse(&text, Path::new("/x")).unwrap()
    }

    fn pw(s: &str) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(s.as_bytes().to_vec())
    }

    fn gate(c: &Config) -> LoginGate {
        LoginGate::new(ThrottleSettings::from_config(&c.gateway), 2)
    }

    fn admission() -> Arc<Admission> {
        Admission::new(AdmissionLimits {
            max_preauth: 100,
            max_preauth_per_address: 100,
            max_sessions: 100,
            max_sessions_per_user: 1,
        })
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    async fn check_credentials(
        c: &Config,
        login: &str,
        secret: Zeroizing<Vec<u8>>,
    ) -> Result<LoginTarget, LoginFailure> {
        let mut ticket = admission().admit(PEER).unwrap();
        super::check_credentials(c, &gate(c), &mut ticket, PEER, login, secret).await
    }

    #[tokio::test]
    async fn a_locked_address_is_refused_unchecked_and_looks_the_same() {
        let c = config();
        let gate = LoginGate::new(
            ThrottleSettings {
                address_failures: 2,
                base_delay: Duration::ZERO,
                ..ThrottleSettings::from_config(&c.gateway)
            },
            2,
        );
        let admission = admission();
        let mut ticket = admission.admit(PEER).unwrap();
        for _ in 0..2 {
            let e = super::check_credentials(&c, &gate, &mut ticket, PEER, "mario", pw("x"))
                .await
                .unwrap_err();
            assert!(matches!(e.refusal, LoginRefusal::BadCredentials { .. }));
        }
        tokio::time::pause();
        let e = super::check_credentials(&c, &gate, &mut ticket, PEER, "mario", pw("secret"))
            .await
            .unwrap_err();
        assert_eq!(e.refusal, LoginRefusal::Locked(LockScope::Address));
        assert!(e.refusal.looks_like_bad_credentials());
        assert!(e.audit_detail("mario").contains("reason=locked (address)"));
    }

    #[tokio::test]
    async fn waiting_for_a_password_check_is_bounded() {
        let c = config();
        let gate = LoginGate::new(ThrottleSettings::from_config(&c.gateway), 1);
        let _busy = gate.checks.clone().try_acquire_owned().unwrap();
        // A full queue: told at once.
        gate.waiting.store(MAX_WAITING_CHECKS, Ordering::SeqCst);
        assert!(gate.turn().await.is_none());
        gate.waiting.store(0, Ordering::SeqCst);
        // A turn that does not come within the deadline: told then, and no longer counted.
        tokio::time::pause();
        let started = tokio::time::Instant::now();
        assert!(gate.turn().await.is_none());
        assert!(started.elapsed() >= CHECK_QUEUE_DEADLINE);
        assert_eq!(gate.waiting.load(Ordering::SeqCst), 0);
        // And the refusal is `Busy`, nothing checked.
        let admission = admission();
        let mut ticket = admission.admit(PEER).unwrap();
        let e = super::check_credentials(&c, &gate, &mut ticket, PEER, "mario", pw("secret"))
            .await
            .unwrap_err();
        assert_eq!(e.refusal, LoginRefusal::Busy);
    }

    #[tokio::test]
    async fn a_repeat_login_skips_argon2_and_a_new_password_does_not() {
        let c = config();
        let gate = gate(&c);
        let admission = admission();
        let mut ticket = admission.admit(PEER).unwrap();
        super::check_credentials(&c, &gate, &mut ticket, PEER, "mario", pw("secret"))
            .await
            .unwrap();
        // Every check slot taken: only a remembered login can get through now.
        let _slots = gate.checks.clone().try_acquire_many_owned(2).unwrap();
        gate.waiting.store(MAX_WAITING_CHECKS, Ordering::SeqCst);
        let mut again = admission.admit(PEER).unwrap();
        let twin = Admission::new(AdmissionLimits {
            max_preauth: 10,
            max_preauth_per_address: 10,
            max_sessions: 10,
            max_sessions_per_user: 10,
        });
        let mut again_ok = twin.admit(PEER).unwrap();
        super::check_credentials(&c, &gate, &mut again_ok, PEER, "mario", pw("secret"))
            .await
            .unwrap();
        // A wrong password is never remembered: it needs a check (refused here: none free).
        let e = super::check_credentials(&c, &gate, &mut again, PEER, "mario", pw("other"))
            .await
            .unwrap_err();
        assert_eq!(e.refusal, LoginRefusal::Busy);
        // A reload forgets every remembered login.
        gate.reconfigure(ThrottleSettings::from_config(&c.gateway));
        let e = super::check_credentials(&c, &gate, &mut again, PEER, "mario", pw("secret"))
            .await
            .unwrap_err();
        assert_eq!(e.refusal, LoginRefusal::Busy);
    }

    #[tokio::test]
    async fn sessions_per_user_are_enforced_at_login() {
        let c = config();
        let gate = gate(&c);
        let admission = admission();
        let mut first = admission.admit(PEER).unwrap();
        let mut second = admission.admit(PEER).unwrap();
        super::check_credentials(&c, &gate, &mut first, PEER, "mario", pw("secret"))
            .await
            .unwrap();
        let e = super::check_credentials(&c, &gate, &mut second, PEER, "mario", pw("secret"))
            .await
            .unwrap_err();
        assert_eq!(
            e.refusal,
            LoginRefusal::TooManySessions(AdmissionRefused::UserFull)
        );
        drop(first);
        super::check_credentials(&c, &gate, &mut second, PEER, "mario", pw("secret"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn outcomes_and_delay() {
        let c = config();
        let ok = check_credentials(&c, "mario", pw("secret")).await.unwrap();
        assert_eq!((ok.user.as_str(), ok.mailbox.as_str()), ("mario", "studio"));
        let ok = check_credentials(&c, "anna/legal", pw("secret"))
            .await
            .unwrap();
        assert_eq!(ok.mailbox, "legal");

        let started = Instant::now();
        let e = check_credentials(&c, "mario", pw("nope"))
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(
            e.refusal,
            LoginRefusal::BadCredentials {
                reason: "wrong password"
            }
        );
        assert_eq!(e.user.as_deref(), Some("mario"));
        assert!(!e.audit_detail("mario").contains("nope"));

        let e = check_credentials(&c, "ghost", pw("secret"))
            .await
            .unwrap_err();
        assert_eq!(e.user, None);
        let e = check_credentials(&c, "ex", pw("secret")).await.unwrap_err();
        assert!(matches!(e.refusal, LoginRefusal::BadCredentials { .. }));
        let e = check_credentials(&c, "anna", pw("secret"))
            .await
            .unwrap_err();
        assert_eq!(
            e.refusal,
            LoginRefusal::NoMailboxChosen {
                choices: vec!["legal".into(), "studio".into()]
            }
        );
        let e = check_credentials(&c, "mario/legal", pw("secret"))
            .await
            .unwrap_err();
        assert!(matches!(e.refusal, LoginRefusal::MailboxNotGranted(_)));
    }
}
