//! The daemon's shared runtime state: configuration, audit log, TLS, and per-mailbox provider
//! settings, built once at start-up and shared by every session behind an `Arc`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;

use crate::audit::AuditLog;
use crate::config::{Config, MailboxConfig};
use crate::guard::{Admission, AdmissionLimits, ThrottleSettings};
use crate::ledger::Ledger;
use crate::login::LoginGate;
use crate::smtp::checks::RateLimiter;
use crate::tls::{self, TlsError};
use crate::upstream::{ConnectionBudget, ProviderTarget};
use crate::vault::{SecretString, Vault};

/// Per-mailbox runtime state.
pub struct MailboxRuntime {
    pub name: String,
    pub config: MailboxConfig,
    pub provider_tls: Arc<rustls::ClientConfig>,
    pub budget: ConnectionBudget,
    /// The provider password, from the vault. `None` when the vault has no entry: logins to
    /// this mailbox then fail with `NO [UNAVAILABLE]` and a log line telling the admin why.
    pub password: Option<SecretString>,
}

impl MailboxRuntime {
    pub fn target(&self, timeout: Duration) -> Option<ProviderTarget<'_>> {
        Some(ProviderTarget {
            endpoint: &self.config.imap,
            tls: self.provider_tls.clone(),
            login: &self.config.login,
            password: self.password.as_ref()?.expose(),
            timeout,
        })
    }
}

/// Errors building the runtime state.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway TLS certificate: {0}")]
    ServerTls(TlsError),
    #[error("mailboxes.{mailbox}.ca_file: {source}")]
    ProviderTls { mailbox: String, source: TlsError },
}

/// Shared state of a running gateway.
pub struct Gateway {
    pub config: Config,
    pub audit: AuditLog,
    pub acceptor: TlsAcceptor,
    pub mailboxes: HashMap<String, MailboxRuntime>,
    /// How long a provider gets to accept a connection, a login, or answer a command.
    pub provider_timeout: Duration,
    /// Password checks: the brute-force throttle and the bounded argon2 queue (one check per
    /// core: argon2id takes ~19 MiB and tens of milliseconds of CPU each).
    pub logins: LoginGate,
    /// Pre-login places and sessions, per address and per user.
    pub admission: Arc<Admission>,
    /// State of the SMTP side.
    pub smtp: SmtpRuntime,
}

/// Runtime state of SMTP submission.
pub struct SmtpRuntime {
    /// The name pecgate gives in its greeting, EHLO and `Received:` lines.
    pub hostname: String,
    /// Where messages being received are spooled (`state_dir/spool`).
    pub spool_dir: std::path::PathBuf,
    /// The sent ledger; without one (see [`Gateway::with_ledger`]) nothing can be sent.
    pub ledger: Option<Ledger>,
    /// Per-mailbox `send_rate` windows (only mailboxes that have one).
    pub rate: HashMap<String, std::sync::Mutex<RateLimiter>>,
}

impl Gateway {
    /// Attach the sent ledger (opened by the caller, off the async runtime).
    pub fn with_ledger(mut self, ledger: Ledger) -> Gateway {
        self.smtp.ledger = Some(ledger);
        self
    }
}

/// The machine's host name, for SMTP greetings (`localhost` if it cannot be read).
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name)
            if rc == 0
                && !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') =>
        {
            name.to_owned()
        }
        _ => "localhost".to_owned(),
    }
}

impl Gateway {
    pub fn new(config: Config, audit: AuditLog, vault: &Vault) -> Result<Gateway, GatewayError> {
        let server = tls::server_config(&config.tls.cert, &config.tls.key)
            .map_err(GatewayError::ServerTls)?;
        let mut mailboxes = HashMap::new();
        for (name, mailbox) in &config.mailboxes {
            let provider_tls =
                tls::client_config(mailbox.ca_file.as_deref()).map_err(|source| {
                    GatewayError::ProviderTls {
                        mailbox: name.clone(),
                        source,
                    }
                })?;
            let password = vault.get(name);
            if password.is_none() {
                tracing::warn!(
                    mailbox = %name,
                    "no provider password in the vault: logins to this mailbox will fail until `pecgate vault set {name}` is run and pecgate restarted"
                );
            }
            mailboxes.insert(
                name.clone(),
                MailboxRuntime {
                    name: name.clone(),
                    config: mailbox.clone(),
                    provider_tls,
                    budget: ConnectionBudget::new(mailbox.max_connections),
                    password,
                },
            );
        }
        let rate = config
            .mailboxes
            .iter()
            .filter_map(|(name, m)| {
                m.send_rate
                    .map(|r| (name.clone(), std::sync::Mutex::new(RateLimiter::new(r))))
            })
            .collect();
        let smtp = SmtpRuntime {
            hostname: hostname(),
            spool_dir: config.gateway.state_dir.join("spool"),
            ledger: None,
            rate,
        };
        let throttle = ThrottleSettings::from_config(&config.gateway);
        let admission = Admission::new(AdmissionLimits::from_config(&config.gateway));
        Ok(Gateway {
            provider_timeout: config.gateway.provider_timeout,
            config,
            audit,
            acceptor: TlsAcceptor::from(server),
            mailboxes,
            logins: LoginGate::new(
                throttle,
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            admission,
            smtp,
        })
    }
}
