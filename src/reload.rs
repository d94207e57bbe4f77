//! Reloading the configuration and the vault without a restart (SIGHUP, `systemctl reload`).
//!
//! The new files are validated as `pecgate check` does (configuration, referenced files,
//! vault, certificates); if anything is wrong pecgate keeps running on the old ones and says
//! why, naming the key. Otherwise a new generation of the gateway is published: new
//! connections and logins use it at once (listener and certificate changes included), and
//! every logged-in session the change concerns is ended within the second, with its reason
//! (user removed or disabled, password changed, mailbox no longer granted, its folders or
//! permissions changed, its mailbox's provider settings changed). Everyone else notices
//! nothing. The reload and its outcome are an audit event (`protocol = system`) and one log
//! line; systemd hears `RELOADING=1` then `READY=1`.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::audit::{AuditEvent, Outcome, Protocol};
use crate::config::{Config, ConfigError};
use crate::gateway::{Gateway, GatewayError, Live};
use crate::notify;
use crate::vault::{self, VaultError};

/// Why a reload was refused (the old configuration stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Files(String),
    #[error("vault: {0}")]
    Vault(#[from] VaultError),
    #[error("{0}")]
    Gateway(#[from] GatewayError),
    #[error("state_dir cannot change without a restart (it holds the open audit log)")]
    StateDir,
}

/// Build the next generation from `path` (blocking: files and argon2-free checks only).
fn next_generation(path: &Path, current: &Gateway) -> Result<Gateway, ReloadError> {
    let config = Config::load(path)?;
    if config.gateway.state_dir != current.config.gateway.state_dir {
        return Err(ReloadError::StateDir);
    }
    let problems = config.check_files();
    if !problems.is_empty() {
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Err(ReloadError::Files(text.join("; ")));
    }
    let (vault, _) = vault::open_or_empty(&config.vault_key_path(), &config.vault_path())?;
    Ok(Gateway::new(config, &current.carried, &vault)?)
}

/// Reload from `path`. Returns how many sessions were ended, or why nothing changed.
pub async fn reload(path: &Path, live: &Live) -> Result<usize, ReloadError> {
    notify::reloading();
    let current = live.current();
    let built = {
        let (path, current) = (path.to_owned(), current.clone());
        tokio::task::spawn_blocking(move || next_generation(&path, &current))
            .await
            .unwrap_or_else(|_| Err(ReloadError::Files("reload task failed".to_owned())))
    };
    let result = match built {
        Ok(next) => {
            let next = Arc::new(next);
            live.publish(next.clone());
            let (old, new) = (&current.config, &next.config);
            let ended = next.registry.end_where(|session| {
                old.revocation(new, &session.user, &session.mailbox)
                    .map(str::to_owned)
            });
            next.metrics.revoked(ended);
            next.metrics.reload("ok");
            tracing::info!(sessions_ended = ended, "configuration reloaded");
            record(&next, Outcome::Ok, format!("sessions_ended={ended}")).await;
            Ok(ended)
        }
        Err(error) => {
            current.metrics.reload("error");
            tracing::error!(%error, "reload refused: still running on the previous configuration");
            record(&current, Outcome::Error, error.to_string()).await;
            Err(error)
        }
    };
    notify::notify("READY=1");
    result
}

async fn record(gateway: &Gateway, outcome: Outcome, detail: String) {
    let _ = gateway
        .audit
        .record_durable(AuditEvent {
            ts: SystemTime::now(),
            session: "reload".to_owned(),
            user: None,
            mailbox: None,
            peer: "signal".to_owned(),
            protocol: Protocol::System,
            command: "reload".to_owned(),
            folder: None,
            detail,
            outcome,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two mailboxes, one role on `studio`, two users.
    fn base() -> String {
        format!(
            r#"
[gateway]
state_dir = "s"
{}[roles.r]
mailboxes = ["studio"]
folders = ["INBOX"]
permissions = ["read"]
[users.mario]
password = "$argon2id$v=19$m=19456,t=2,p=1$VHjHv64CViNy8yoyEAVadg$nbSDqcWNHaZIp/bmbEnvNj0ZvQK273Ydu8Nym4+pLw8"
roles = ["r"]
[users.anna]
password = "$argon2id$v=19$m=19456,t=2,p=1$VHjHv64CViNy8yoyEAVadg$nbSDqcWNHaZIp/bmbEnvNj0ZvQK273Ydu8Nym4+pLw8"
roles = ["r"]
"#,
            crate::config::TEST_MAILBOXES
        )
    }

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/pecgate")).unwrap()
    }

    #[test]
    fn what_a_change_does_to_a_session() {
        let base = base();
        let old = parse(&base);
        let same = parse(&format!("{base}\n# a comment\n"));
        assert_eq!(old.revocation(&same, "mario", "studio"), None);
        let removed = parse(&base.replace("[users.anna]", "[users.zoe]"));
        assert_eq!(
            old.revocation(&removed, "anna", "studio"),
            Some("user removed")
        );
        assert_eq!(old.revocation(&removed, "mario", "studio"), None);
        let disabled = parse(&format!("{base}disabled = true\n"));
        assert_eq!(
            old.revocation(&disabled, "anna", "studio"),
            Some("user disabled")
        );
        let folders =
            parse(&base.replace(r#"folders = ["INBOX"]"#, r#"folders = ["INBOX", "Sent"]"#));
        assert_eq!(
            old.revocation(&folders, "mario", "studio"),
            Some("folders or permissions changed")
        );
        let moved = parse(&base.replace(r#"mailboxes = ["studio"]"#, r#"mailboxes = ["legal"]"#));
        assert_eq!(
            old.revocation(&moved, "mario", "studio"),
            Some("mailbox no longer granted")
        );
        let provider = parse(&base.replace("login = \"studio\"", "login = \"studio2\""));
        assert_eq!(
            old.revocation(&provider, "mario", "studio"),
            Some("mailbox settings changed")
        );
    }
}
