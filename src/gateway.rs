//! The daemon's shared runtime state: configuration, audit log, TLS, and per-mailbox provider
//! settings, built once at start-up and shared by every session behind an `Arc`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;

use crate::audit::AuditLog;
use crate::config::{Config, MailboxConfig};
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
    /// How long a provider gets to accept a connection and a login.
    pub provider_timeout: Duration,
    /// Password verifications running at once. argon2id takes ~19 MiB and tens of
    /// milliseconds of CPU each: unbounded, a burst of logins (or a guessing attack) would
    /// take every core and grow memory by 19 MiB per concurrent login.
    pub password_checks: Arc<tokio::sync::Semaphore>,
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
        Ok(Gateway {
            config,
            audit,
            acceptor: TlsAcceptor::from(server),
            mailboxes,
            provider_timeout: Duration::from_secs(30),
            password_checks: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
        })
    }
}
