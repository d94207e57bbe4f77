//! The daemon's shared runtime state, in two parts:
//! - [`Carried`]: what outlives a configuration (audit log, ledger, session registry,
//!   admission counters, login throttle, provider connection pools, send-rate windows,
//!   metrics), created once at start-up;
//! - [`Gateway`]: one *generation* built from a configuration and the vault (TLS acceptor,
//!   per-mailbox provider settings and passwords) over the carried state. A reload builds a
//!   new generation and publishes it in [`Live`]; new connections and logins take the
//!   current one, sessions already running keep theirs (or are ended when the reload
//!   changed what they may do).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_rustls::TlsAcceptor;

use crate::audit::AuditLog;
use crate::config::{Config, MailboxConfig, SendRate};
use crate::guard::{Admission, AdmissionLimits, ThrottleSettings};
use crate::ledger::Ledger;
use crate::login::LoginGate;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::smtp::checks::RateLimiter;
use crate::tls::{self, TlsError};
use crate::upstream::ProviderTarget;
use crate::upstream::pool::{Pool, PoolFigures};
use crate::vault::{SecretString, Vault};

/// Per-mailbox runtime state.
pub struct MailboxRuntime {
    pub name: String,
    pub config: MailboxConfig,
    pub provider_tls: Arc<rustls::ClientConfig>,
    /// The mailbox's provider connections (`max_connections`), shared by its sessions and
    /// its receipts worker; carried across reloads.
    pub pool: Pool,
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
    /// State carried from generation to generation.
    pub carried: Arc<Carried>,
    pub audit: AuditLog,
    pub acceptor: TlsAcceptor,
    pub mailboxes: HashMap<String, MailboxRuntime>,
    /// How long a provider gets to accept a connection, a login, or answer a command.
    pub provider_timeout: Duration,
    /// Password checks: the brute-force throttle and the bounded argon2 queue (one check per
    /// core: argon2id takes ~19 MiB and tens of milliseconds of CPU each).
    pub logins: Arc<LoginGate>,
    /// Pre-login places and sessions, per address and per user.
    pub admission: Arc<Admission>,
    /// The logged-in sessions.
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
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
    pub rate: HashMap<String, Arc<std::sync::Mutex<RateLimiter>>>,
}

/// A mailbox's `send_rate` and its window.
type KeptRate = (SendRate, Arc<Mutex<RateLimiter>>);

/// What outlives a configuration: kept across reloads.
pub struct Carried {
    pub audit: AuditLog,
    /// The sent ledger (opened by the caller, off the async runtime); without one nothing
    /// can be sent.
    pub ledger: Option<Ledger>,
    pub registry: Arc<Registry>,
    pub admission: Arc<Admission>,
    pub logins: Arc<LoginGate>,
    pub metrics: Arc<Metrics>,
    /// Provider connection pools by mailbox name: connections opened under one generation
    /// count against the next, and a limit the provider taught is kept.
    pools: Mutex<HashMap<String, Pool>>,
    /// `send_rate` windows by mailbox name: a reload does not reset a sending limit.
    rates: Mutex<HashMap<String, KeptRate>>,
    /// The folder watchers of parked IMAP sessions.
    pub watchers: crate::imap::watcher::Watchers,
    /// Message bodies fetched once (`None`: `body_cache_mib = 0`). Opened at start: a reload
    /// does not resize it.
    pub body_cache: Option<Arc<crate::body_cache::BodyCache>>,
}

impl Carried {
    /// The carried state for a first configuration.
    pub fn new(
        config: &Config,
        audit: AuditLog,
        ledger: Option<Ledger>,
        body_cache: Option<crate::body_cache::BodyCache>,
    ) -> Arc<Carried> {
        Arc::new(Carried {
            audit,
            ledger,
            registry: Registry::new(),
            admission: Admission::new(AdmissionLimits::from_config(&config.gateway)),
            logins: Arc::new(LoginGate::new(
                ThrottleSettings::from_config(&config.gateway),
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            metrics: Arc::new(Metrics::new()),
            pools: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
            watchers: Default::default(),
            body_cache: body_cache.map(Arc::new),
        })
    }

    /// The pool of `mailbox`, with `limit` as its ceiling: the same pool as before (a new
    /// limit applies to it in place, so connections still open count against it).
    fn pool(&self, mailbox: &str, limit: u32, keep_idle: Duration) -> Pool {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let pool = match pools.get(mailbox) {
            Some(pool) => {
                if pool.ceiling() != limit {
                    pool.set_ceiling(limit);
                }
                pool.clone()
            }
            None => {
                let pool = Pool::new(mailbox, limit);
                pools.insert(mailbox.to_owned(), pool.clone());
                pool
            }
        };
        pool.set_keep_idle(keep_idle);
        pool
    }

    /// Every mailbox's pool (for tending their idle connections).
    pub fn pools(&self) -> Vec<Pool> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.values().cloned().collect()
    }

    /// The send-rate window of `mailbox`: the same one unless its rate changed.
    fn rate(&self, mailbox: &str, rate: SendRate) -> Arc<Mutex<RateLimiter>> {
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        match rates.get(mailbox) {
            Some((kept, limiter)) if *kept == rate => limiter.clone(),
            _ => {
                let limiter = Arc::new(Mutex::new(RateLimiter::new(rate)));
                rates.insert(mailbox.to_owned(), (rate, limiter.clone()));
                limiter
            }
        }
    }

    /// Each mailbox's pool figures, with its folder watchers and parked sessions, for the
    /// metrics.
    pub fn provider_connections(&self) -> Vec<(String, PoolFigures)> {
        let watched = self.watchers.figures();
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .iter()
            .map(|(name, pool)| {
                let mut figures = pool.figures();
                if let Some((_, watchers, parked)) = watched.iter().find(|(m, _, _)| m == name) {
                    figures.watchers = *watchers;
                    figures.parked = *parked;
                }
                (name.clone(), figures)
            })
            .collect()
    }
}

/// The current generation of the gateway, as new connections and logins see it.
#[derive(Clone)]
pub struct Live {
    current: tokio::sync::watch::Receiver<Arc<Gateway>>,
    publish: Arc<tokio::sync::watch::Sender<Arc<Gateway>>>,
}

impl Live {
    pub fn new(first: Arc<Gateway>) -> Live {
        let (publish, current) = tokio::sync::watch::channel(first);
        Live {
            current,
            publish: Arc::new(publish),
        }
    }

    /// The gateway new work should use.
    pub fn current(&self) -> Arc<Gateway> {
        self.current.borrow().clone()
    }

    /// A receiver told of every new generation.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Arc<Gateway>> {
        self.current.clone()
    }

    /// Make `next` the current generation.
    pub fn publish(&self, next: Arc<Gateway>) {
        self.publish.send_replace(next);
    }
}

/// The machine's host name, for SMTP greetings (`localhost` if it cannot be read).
pub fn hostname() -> String {
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
    /// A generation built from `config` and the vault over the carried state.
    pub fn new(
        config: Config,
        carried: &Arc<Carried>,
        vault: &Vault,
    ) -> Result<Gateway, GatewayError> {
        // Everything that can fail first: a refused generation must leave the carried state
        // (budgets, rate windows, limits) exactly as it was.
        let server = tls::server_config(&config.tls.cert, &config.tls.key)
            .map_err(GatewayError::ServerTls)?;
        let mut provider_tls = HashMap::new();
        for (name, mailbox) in &config.mailboxes {
            let client = tls::client_config(mailbox.ca_file.as_deref()).map_err(|source| {
                GatewayError::ProviderTls {
                    mailbox: name.clone(),
                    source,
                }
            })?;
            provider_tls.insert(name.clone(), client);
        }
        let mut mailboxes = HashMap::new();
        for (name, mailbox) in &config.mailboxes {
            let provider_tls = provider_tls.remove(name).expect("built above");
            let password = vault.get(name);
            if password.is_none() {
                tracing::warn!(
                    mailbox = %name,
                    "no provider password in the vault: logins to this mailbox will fail until `pecgate vault set {name}` is run and pecgate reloaded"
                );
            }
            mailboxes.insert(
                name.clone(),
                MailboxRuntime {
                    name: name.clone(),
                    config: mailbox.clone(),
                    provider_tls,
                    pool: carried.pool(
                        name,
                        mailbox.max_connections,
                        config.gateway.provider_idle_keep,
                    ),
                    password,
                },
            );
        }
        let rate = config
            .mailboxes
            .iter()
            .filter_map(|(name, m)| m.send_rate.map(|r| (name.clone(), carried.rate(name, r))))
            .collect();
        let smtp = SmtpRuntime {
            hostname: hostname(),
            spool_dir: config.gateway.state_dir.join("spool"),
            ledger: carried.ledger.clone(),
            rate,
        };
        // The carried limits follow the configuration.
        carried
            .admission
            .set_limits(AdmissionLimits::from_config(&config.gateway));
        carried
            .logins
            .reconfigure(ThrottleSettings::from_config(&config.gateway));
        Ok(Gateway {
            provider_timeout: config.gateway.provider_timeout,
            audit: carried.audit.clone(),
            logins: carried.logins.clone(),
            admission: carried.admission.clone(),
            registry: carried.registry.clone(),
            metrics: carried.metrics.clone(),
            carried: carried.clone(),
            config,
            acceptor: TlsAcceptor::from(server),
            mailboxes,
            smtp,
        })
    }
}
