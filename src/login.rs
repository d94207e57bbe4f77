//! Personal-credential checks shared by every protocol front end (IMAP, SMTP).
//!
//! [`check_credentials`] is the one place that decides whether a login name and password are
//! good and which mailbox the session acts on: argon2 verification off the async workers
//! (`spawn_blocking`), unknown users verified against a dummy hash so timing does not reveal
//! which users exist, then [`Config::resolve_login`]. Every refusal is returned only once
//! `login_failure_delay` has passed since the attempt started, so guessing is slow whatever
//! the reason. What the client is told, and what is audited, stays with the protocol.

use std::time::Instant;

use zeroize::Zeroizing;

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::config::{Config, LoginError, LoginTarget};
use crate::password;

/// Why a login was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginRefusal {
    /// Wrong password, unknown user or disabled user: the client must not learn which.
    #[error("{reason}")]
    BadCredentials { reason: &'static str },
    /// The password is right but the user has several mailboxes and did not choose one.
    #[error("no mailbox chosen")]
    NoMailboxChosen { choices: Vec<String> },
    /// The password is right but the named mailbox is not granted (or the user has none).
    #[error("{0}")]
    MailboxNotGranted(LoginError),
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

/// Check `login` / `secret` against the configuration. On success the user and mailbox the
/// session acts on; on failure, after the configured failure delay, why. `password_checks`
/// bounds the argon2 verifications running at once (the gateway's `password_checks`).
pub async fn check_credentials(
    config: &Config,
    password_checks: &Arc<Semaphore>,
    login: &str,
    secret: Zeroizing<Vec<u8>>,
) -> Result<LoginTarget, LoginFailure> {
    let started = Instant::now();
    let user_name = login.split('/').next().unwrap_or(login).to_owned();
    let hash = config.users.get(&user_name).map(|u| u.password.clone());
    let user_exists = hash.is_some();
    // argon2 takes tens of milliseconds of CPU and ~19 MiB: keep it off the async workers
    // and bounded by `password_checks`. Unknown users are checked against a dummy hash so
    // both cases cost the same.
    let permit = password_checks.clone().acquire_owned().await;
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

    let refusal = if !verified {
        LoginRefusal::BadCredentials {
            reason: if user_exists {
                "wrong password"
            } else {
                "unknown user"
            },
        }
    } else {
        match config.resolve_login(login) {
            Ok(target) => return Ok(target),
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
                    reason: if error == LoginError::Disabled {
                        "user is disabled"
                    } else {
                        "unknown user"
                    },
                }
            }
        }
    };
    tracing::info!(login, reason = %refusal, "login failed");
    tokio::time::sleep_until((started + config.gateway.login_failure_delay).into()).await;
    Err(LoginFailure {
        user: user_exists.then(|| user_name.clone()),
        user_name,
        refusal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn config() -> Config {
        let hash = password::hash_password(b"secret").unwrap();
        let text = format!(
            r#"
[gateway]
state_dir = "state"
login_failure_delay_ms = 50
[tls]
cert = "c"
key = "k"
[imap]
listen_tls = ["127.0.0.1:993"]
[mailboxes.studio]
address = "studio@pec.example.it"
login = "studio"
imap = "imaps://h"
[mailboxes.legal]
address = "legal@pec.example.it"
login = "legal"
imap = "imaps://h"
[roles.one]
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
"#
        );
        Config::parse(&text, Path::new("/x")).unwrap()
    }

    fn pw(s: &str) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(s.as_bytes().to_vec())
    }

    async fn check_credentials(
        c: &Config,
        login: &str,
        secret: Zeroizing<Vec<u8>>,
    ) -> Result<LoginTarget, LoginFailure> {
        super::check_credentials(c, &Arc::new(Semaphore::new(2)), login, secret).await
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
