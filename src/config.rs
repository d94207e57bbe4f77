//! The pecgate configuration file (TOML).
//!
//! The file is parsed strictly: unknown keys are errors, because a misspelt
//! key in an access-control file silently falling back to a default is worse
//! than refusing to start. Parsing happens in two steps: serde reads a "raw"
//! shape in which almost everything is optional and most values are plain
//! strings, then [`Config::parse`] converts and validates it, collecting
//! every problem (each with the key path it concerns) instead of stopping at
//! the first, so an operator can fix the file in one go.
//!
//! Relative paths are resolved against the directory of the config file.
//! Files are not opened while parsing (tests parse configs whose files do not
//! exist); [`Config::check_files`] does that for `pecgate check`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_MAX_SESSIONS: usize = 1000;
pub const DEFAULT_LOGIN_FAILURE_DELAY_MS: u64 = 1500;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 1800;
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 10;
pub const DEFAULT_MAX_PREAUTH_CONNECTIONS: usize = 512;
pub const DEFAULT_MAX_PREAUTH_PER_ADDRESS: usize = 64;
pub const DEFAULT_MAX_SESSIONS_PER_USER: usize = 20;
pub const DEFAULT_LOGIN_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_PROVIDER_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_CONNECTION_WAIT_SECS: u64 = 30;
pub const DEFAULT_PROVIDER_IDLE_KEEP_SECS: u64 = 300;
/// A client quiet for a minute (a folder Thunderbird keeps open, a poller between two NOOPs)
/// holds no provider connection: none can time out or die under it.
pub const DEFAULT_LEND_AFTER_QUIET_SECS: u64 = 60;
/// A PEC mailbox holds 1–2 GB at most (Aruba, Legalmail): half a gigabyte keeps the messages
/// people actually open.
pub const DEFAULT_BODY_CACHE_MIB: u64 = 512;
pub const DEFAULT_LOCKOUT_ADDRESS_FAILURES: u32 = 10;
pub const DEFAULT_LOCKOUT_USER_FAILURES: u32 = 20;
pub const DEFAULT_LOCKOUT_WINDOW_SECS: u64 = 900;
pub const DEFAULT_LOCKOUT_SECS: u64 = 900;
pub const DEFAULT_MIN_FREE_SPACE_MB: u64 = 1024;
pub const DEFAULT_MAX_LITERAL_BYTES: u32 = 65536;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 104_857_600;
pub const DEFAULT_RECEIPTS_POLL_SECS: u64 = 300;

/// RFC 3501 §5.4: an autologout timer must be at least 30 minutes.
const RFC3501_MIN_IDLE_SECS: u64 = 1800;

/// Name of the vault key inside `$CREDENTIALS_DIRECTORY` (systemd
/// `LoadCredential=vault-key:...`).
pub const CREDENTIAL_NAME: &str = "vault-key";
/// Default vault key file name inside the state directory.
pub const DEFAULT_KEY_FILE_NAME: &str = "vault.key";

// ---------------------------------------------------------------------------
// Validated configuration
// ---------------------------------------------------------------------------

/// A parsed and validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub metrics: MetricsConfig,
    pub receipts: ReceiptsConfig,
    pub tls: TlsConfig,
    pub imap: ImapConfig,
    pub smtp: SmtpConfig,
    pub mailboxes: BTreeMap<String, MailboxConfig>,
    pub roles: BTreeMap<String, RoleConfig>,
    pub users: BTreeMap<String, UserConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Absolute (or relative to the working directory if the config was
    /// parsed with a relative base).
    pub state_dir: PathBuf,
    /// Explicit `vault_key`; see [`Config::vault_key_path`] for the default.
    pub vault_key: Option<PathBuf>,
    pub max_sessions: usize,
    pub login_failure_delay: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Connections not yet logged in, across all listeners.
    pub max_preauth_connections: usize,
    /// Connections not yet logged in from one client address (IPv6: one /64).
    pub max_preauth_per_address: usize,
    /// Sessions (IMAP and SMTP) one user may hold at once.
    pub max_sessions_per_user: usize,
    /// Time from connecting to a successful login.
    pub login_timeout: Duration,
    /// Time the provider gets to connect, log in, or answer a command.
    pub provider_timeout: Duration,
    /// How long a login waits for one of its mailbox's provider connections to be free.
    pub connection_wait: Duration,
    /// How long a provider connection whose session ended waits, logged in, for the next
    /// session (zero: it is closed with its session).
    pub provider_idle_keep: Duration,
    /// Bytes of message bodies kept in `state_dir/cache/bodies` so the provider serves each
    /// message once (zero: no cache).
    pub body_cache_bytes: u64,
    /// Brute-force lockout.
    pub lockout: LockoutConfig,
    /// Below this much free space in `state_dir`, pecgate warns.
    pub min_free_space_bytes: u64,
}

/// When failed logins lock an address or a user (`[gateway] lockout_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutConfig {
    pub address_failures: u32,
    pub user_failures: u32,
    pub window: Duration,
    pub duration: Duration,
}

/// `[metrics]`: the monitoring endpoint, off unless `listen` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: Option<SocketAddr>,
}

/// `[receipts]`: the receipts worker of every mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptsConfig {
    /// Whether each mailbox has a receipts worker (it holds one of the mailbox's
    /// `max_connections`).
    pub enabled: bool,
    /// A message still not delivered to a recipient this long after it was sent is alerted.
    pub alert_after: Duration,
    /// How often watched folders are scanned besides IDLE (or instead of it, when the provider
    /// has no IDLE).
    pub poll_interval: Duration,
}

impl Default for ReceiptsConfig {
    fn default() -> Self {
        ReceiptsConfig {
            enabled: true,
            alert_after: Duration::from_secs(24 * 3600),
            poll_interval: Duration::from_secs(DEFAULT_RECEIPTS_POLL_SECS),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImapConfig {
    pub listen_tls: Vec<SocketAddr>,
    pub listen_starttls: Vec<SocketAddr>,
    pub max_literal_bytes: u32,
    /// A client in IDLE on a folder holds no provider connection: one watcher per folder
    /// serves every idling session (`[imap] park_idle`, default on).
    pub park_idle: bool,
    /// A session between two commands lends its provider connection to one that waits for
    /// a connection (`[imap] lend_between_commands`, default on).
    pub lend_between_commands: bool,
    /// ... and after this long quiet lends it anyway, into the pool (`[imap]
    /// lend_after_quiet_secs`, default 60; `None`: 0, only when asked).
    pub lend_after_quiet: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmtpConfig {
    pub listen_tls: Vec<SocketAddr>,
    pub listen_starttls: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxConfig {
    pub address: String,
    /// Provider user name; the password is in the vault under the mailbox
    /// name.
    pub login: String,
    pub imap: UpstreamEndpoint,
    pub smtp: Option<UpstreamEndpoint>,
    pub ca_file: Option<PathBuf>,
    pub max_connections: u32,
    pub max_message_bytes: u64,
    pub send_rate: Option<SendRate>,
    /// Where the receipts worker moves archived receipts (`None`: they stay where they are).
    pub receipts_folder: Option<String>,
    /// Folders the receipts worker scans besides INBOX.
    pub receipts_watch: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleConfig {
    pub mailboxes: Vec<String>,
    /// Folder patterns: `/`-separated segments, where a segment is a literal
    /// name, `*` (one segment) or `**` (any number of segments).
    pub folders: Vec<String>,
    pub permissions: Permissions,
}

#[derive(Clone, PartialEq, Eq)]
pub struct UserConfig {
    /// argon2id PHC string.
    pub password: String,
    pub roles: Vec<String>,
    pub disabled: bool,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hashes are not secrets, but there is no reason to spray them into
        // logs either.
        f.debug_struct("UserConfig")
            .field("password", &"<redacted>")
            .field("roles", &self.roles)
            .field("disabled", &self.disabled)
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Upstream endpoints
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    Imap,
    Smtp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamSecurity {
    /// TLS from the first byte (`imaps://`, `smtps://`).
    ImplicitTls,
    /// Plain connection upgraded with STARTTLS, which is mandatory
    /// (`imap://`, `smtp://`).
    StartTls,
}

impl UpstreamProtocol {
    fn scheme(self, security: UpstreamSecurity) -> &'static str {
        match (self, security) {
            (Self::Imap, UpstreamSecurity::ImplicitTls) => "imaps",
            (Self::Imap, UpstreamSecurity::StartTls) => "imap",
            (Self::Smtp, UpstreamSecurity::ImplicitTls) => "smtps",
            (Self::Smtp, UpstreamSecurity::StartTls) => "smtp",
        }
    }

    fn default_port(self, security: UpstreamSecurity) -> u16 {
        match (self, security) {
            (Self::Imap, UpstreamSecurity::ImplicitTls) => 993,
            (Self::Imap, UpstreamSecurity::StartTls) => 143,
            (Self::Smtp, UpstreamSecurity::ImplicitTls) => 465,
            (Self::Smtp, UpstreamSecurity::StartTls) => 587,
        }
    }
}

/// A provider server, parsed from a URL such as `imaps://host:993`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamEndpoint {
    pub protocol: UpstreamProtocol,
    pub security: UpstreamSecurity,
    /// Host name or IP address, without brackets for IPv6 (ready for TLS
    /// server-name and `(host, port)` connects).
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("the URL must start with {expected}")]
    Scheme { expected: &'static str },
    #[error("the host is missing")]
    MissingHost,
    #[error("the host is not a valid host name or IP address")]
    BadHost,
    #[error("the port must be a number from 1 to 65535")]
    BadPort,
    #[error("the URL must not have a path, query or fragment")]
    Path,
    #[error(
        "the URL must not contain a user name or password (the user name is `login`, the password lives in the vault)"
    )]
    UserInfo,
}

impl UpstreamEndpoint {
    /// Parses `scheme://host[:port][/]`. The port defaults to the standard
    /// one for the scheme (993/143 for IMAP, 465/587 for SMTP).
    pub fn parse(protocol: UpstreamProtocol, url: &str) -> Result<Self, EndpointError> {
        let scheme_error = EndpointError::Scheme {
            expected: match protocol {
                UpstreamProtocol::Imap => "imaps:// or imap://",
                UpstreamProtocol::Smtp => "smtps:// or smtp://",
            },
        };
        let (scheme, rest) = url.split_once("://").ok_or(scheme_error)?;
        let security = [UpstreamSecurity::ImplicitTls, UpstreamSecurity::StartTls]
            .into_iter()
            .find(|&s| scheme.eq_ignore_ascii_case(protocol.scheme(s)))
            .ok_or(scheme_error)?;
        let (authority, tail) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // A lone trailing slash is harmless; anything else would be ignored
        // and so is better rejected.
        if !(tail.is_empty() || tail == "/") {
            return Err(EndpointError::Path);
        }
        if authority.contains('@') {
            return Err(EndpointError::UserInfo);
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or(EndpointError::BadHost)?;
            host.parse::<Ipv6Addr>()
                .map_err(|_| EndpointError::BadHost)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or(EndpointError::BadHost)?),
            };
            (host, port)
        } else {
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
            if !host.is_empty() && (!host.chars().all(valid_char) || host.starts_with(['.', '-'])) {
                return Err(EndpointError::BadHost);
            }
            (host, port)
        };
        if host.is_empty() {
            return Err(EndpointError::MissingHost);
        }
        let port = match port {
            None => protocol.default_port(security),
            // Digits only: `u16::from_str` would also take a leading `+`.
            Some(port) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                match port.parse::<u16>() {
                    Ok(port) if port != 0 => port,
                    _ => return Err(EndpointError::BadPort),
                }
            }
            Some(_) => return Err(EndpointError::BadPort),
        };
        Ok(UpstreamEndpoint {
            protocol,
            security,
            host: host.to_owned(),
            port,
        })
    }

    pub fn scheme(&self) -> &'static str {
        self.protocol.scheme(self.security)
    }

    /// `host:port`, with brackets around IPv6 addresses.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for UpstreamEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme(), self.authority())
    }
}

// ---------------------------------------------------------------------------
// Send rate
// ---------------------------------------------------------------------------

/// A sending limit such as `6/min`: at most `count` messages per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SendRate {
    pub count: u32,
    pub per: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid send rate `{0}`: expected COUNT/UNIT with COUNT at least 1 and UNIT one of s, min, hour, day (e.g. \"6/min\")"
)]
pub struct SendRateError(String);

impl FromStr for SendRate {
    type Err = SendRateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || SendRateError(s.to_owned());
        let (count, unit) = s.split_once('/').ok_or_else(error)?;
        let count = count.trim();
        if !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error());
        }
        let count: u32 = count.parse().map_err(|_| error())?;
        if count == 0 {
            return Err(error());
        }
        let secs = match unit.trim().to_ascii_lowercase().as_str() {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86400,
            _ => return Err(error()),
        };
        Ok(SendRate {
            count,
            per: Duration::from_secs(secs),
        })
    }
}

impl fmt::Display for SendRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per.as_secs() {
            1 => write!(f, "{}/s", self.count),
            60 => write!(f, "{}/min", self.count),
            3600 => write!(f, "{}/hour", self.count),
            86400 => write!(f, "{}/day", self.count),
            secs => write!(f, "{}/{secs}s", self.count),
        }
    }
}

// ---------------------------------------------------------------------------
// Permissions
// ---------------------------------------------------------------------------

/// What a role allows on its mailboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// See folders and read messages.
    Read,
    /// Change flags (\Seen, \Flagged, keywords) other than \Deleted.
    Flag,
    /// Set \Deleted and expunge.
    Delete,
    /// Move or copy messages between folders.
    Move,
    /// Append messages to folders.
    Append,
    /// Create, rename and delete folders.
    ManageFolders,
    /// Send mail through the mailbox (SMTP).
    Send,
}

impl Permission {
    pub const ALL: [Permission; 7] = [
        Permission::Read,
        Permission::Flag,
        Permission::Delete,
        Permission::Move,
        Permission::Append,
        Permission::ManageFolders,
        Permission::Send,
    ];

    /// The name used in the config file.
    pub const fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Flag => "flag",
            Permission::Delete => "delete",
            Permission::Move => "move",
            Permission::Append => "append",
            Permission::ManageFolders => "manage_folders",
            Permission::Send => "send",
        }
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown permission `{0}` (known: read, flag, delete, move, append, manage_folders, send)")]
pub struct UnknownPermission(pub String);

impl FromStr for Permission {
    type Err = UnknownPermission;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Permission::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPermission(s.to_owned()))
    }
}

/// A set of [`Permission`]s.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Permissions(u8);

impl Permissions {
    pub const NONE: Permissions = Permissions(0);

    pub const fn all() -> Permissions {
        let mut bits = 0;
        let mut i = 0;
        while i < Permission::ALL.len() {
            bits |= Permission::ALL[i].bit();
            i += 1;
        }
        Permissions(bits)
    }

    pub const fn has(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }

    pub fn insert(&mut self, permission: Permission) {
        self.0 |= permission.bit();
    }

    #[must_use]
    pub const fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The permissions in the set, in [`Permission::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL.into_iter().filter(move |&p| self.has(p))
    }
}

impl FromIterator<Permission> for Permissions {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        let mut set = Permissions::NONE;
        for p in iter {
            set.insert(p);
        }
        set
    }
}

impl fmt::Display for Permissions {
    /// `read, flag, send`, or `none` for the empty set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        for (i, p) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(p.name())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Permissions({self})")
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// One thing wrong (or, from [`Config::warnings`], suspicious) in the
/// config, e.g. `users.mario.roles[1]: unknown role `segretria``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path in TOML dotted notation with `[i]` for array elements;
    /// names that are not bare keys are quoted.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or not the expected shape (unknown key, wrong type). The
    /// message has line and column but, unlike toml's own rendering, does not
    /// quote the offending source line, which might hold a password typed in
    /// by mistake.
    #[error("{}{message}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Syntax {
        path: Option<PathBuf>,
        message: String,
    },
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

fn display_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Why a login name cannot be served. The texts are for logs; what the
/// client is told is up to the caller (normally the same for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("unknown user")]
    UnknownUser,
    #[error("user is disabled")]
    Disabled,
    #[error("user has no mailbox")]
    NoMailbox,
    #[error("mailbox is not granted to the user")]
    MailboxNotGranted,
    #[error("user has several mailboxes and must log in as user/mailbox")]
    AmbiguousMailbox,
}

/// A login name resolved to the user and the mailbox they are acting on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginTarget {
    pub user: String,
    pub mailbox: String,
}

// ---------------------------------------------------------------------------
// Raw (serde) shape
// ---------------------------------------------------------------------------

// Nearly everything is optional here so that missing values become
// collected validation problems with key paths rather than a single serde
// error that stops the parse.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    gateway: RawGateway,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    receipts: RawReceipts,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    imap: RawImap,
    #[serde(default)]
    smtp: RawSmtp,
    #[serde(default)]
    mailboxes: BTreeMap<String, RawMailbox>,
    #[serde(default)]
    roles: BTreeMap<String, RawRole>,
    #[serde(default)]
    users: BTreeMap<String, RawUser>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    state_dir: Option<PathBuf>,
    vault_key: Option<PathBuf>,
    max_sessions: Option<usize>,
    login_failure_delay_ms: Option<u64>,
    idle_timeout_secs: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    max_preauth_connections: Option<usize>,
    max_preauth_per_address: Option<usize>,
    max_sessions_per_user: Option<usize>,
    login_timeout_secs: Option<u64>,
    provider_timeout_secs: Option<u64>,
    connection_wait_secs: Option<u64>,
    provider_idle_keep_secs: Option<u64>,
    body_cache_mib: Option<u64>,
    lockout_address_failures: Option<u32>,
    lockout_user_failures: Option<u32>,
    lockout_window_secs: Option<u64>,
    lockout_secs: Option<u64>,
    min_free_space_mb: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReceipts {
    enabled: Option<bool>,
    alert_after: Option<String>,
    poll_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawImap {
    #[serde(default)]
    listen_tls: Vec<String>,
    #[serde(default)]
    listen_starttls: Vec<String>,
    max_literal_bytes: Option<u32>,
    park_idle: Option<bool>,
    lend_between_commands: Option<bool>,
    lend_after_quiet_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    #[serde(default)]
    listen_tls: Vec<String>,
    #[serde(default)]
    listen_starttls: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMailbox {
    address: Option<String>,
    login: Option<String>,
    imap: Option<String>,
    smtp: Option<String>,
    ca_file: Option<PathBuf>,
    max_connections: Option<u32>,
    max_message_bytes: Option<u64>,
    send_rate: Option<String>,
    receipts_folder: Option<String>,
    #[serde(default)]
    receipts_watch: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    #[serde(default)]
    mailboxes: Vec<String>,
    #[serde(default)]
    folders: Vec<String>,
    #[serde(default)]
    permissions: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    password: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    disabled: bool,
}

// ---------------------------------------------------------------------------
// Parsing and validation
// ---------------------------------------------------------------------------

/// Formats a name as one segment of a key path, quoting it when it is not a
/// TOML bare key.
fn key_segment(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Reports a missing required value and passes the value through.
    fn required<T>(&mut self, key: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.push(key, "required but missing");
        }
        value
    }

    /// A required string that must also pass `check`; returns it (or an
    /// empty placeholder when missing).
    fn checked<E: fmt::Display>(
        &mut self,
        key: &str,
        value: Option<String>,
        check: impl FnOnce(&str) -> Result<(), E>,
    ) -> String {
        let Some(value) = self.required(key, value) else {
            return String::new();
        };
        if let Err(message) = check(&value) {
            self.push(key, message.to_string());
        }
        value
    }

    /// Parses an upstream URL. The message does not repeat the URL, which
    /// might (wrongly) contain a password.
    fn endpoint(
        &mut self,
        key: &str,
        protocol: UpstreamProtocol,
        url: &str,
    ) -> Option<UpstreamEndpoint> {
        UpstreamEndpoint::parse(protocol, url.trim())
            .map_err(|e| {
                let kind = match protocol {
                    UpstreamProtocol::Imap => "IMAP",
                    UpstreamProtocol::Smtp => "SMTP",
                };
                self.push(key, format!("invalid {kind} URL: {e}"));
            })
            .ok()
    }

    /// Checks a path value and resolves it against `base`.
    fn path(&mut self, key: &str, value: Option<PathBuf>, base: &Path) -> Option<PathBuf> {
        let value = value?;
        if value.as_os_str().is_empty() {
            self.push(key, "must not be empty");
            return None;
        }
        Some(base.join(value))
    }

    fn at_least_one<T: PartialEq + From<u8> + Copy>(&mut self, key: &str, value: T) -> T {
        if value == T::from(0) {
            self.push(key, "must be at least 1");
        }
        value
    }

    fn listeners(
        &mut self,
        section: &str,
        list: &str,
        raw: &[String],
        seen: &mut BTreeMap<SocketAddr, String>,
    ) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for (i, text) in raw.iter().enumerate() {
            let key = format!("{section}.{list}[{i}]");
            match text.trim().parse::<SocketAddr>() {
                // Port 0: the system picks a free port, reported in the `listening` log line
                // (how the tests bind, without a probe-and-release race). Never a duplicate.
                Ok(addr) if addr.port() == 0 => out.push(addr),
                Ok(addr) => {
                    if let Some(first) = seen.get(&addr) {
                        self.push(key, format!("duplicate listen address {addr} (also in {first})"));
                    } else {
                        seen.insert(addr, key);
                        out.push(addr);
                    }
                }
                Err(_) => self.push(
                    key,
                    format!(
                        "`{text}` is not a socket address (an IP address and port such as \"0.0.0.0:993\" or \"[::]:993\")"
                    ),
                ),
            }
        }
        out
    }
}

/// User, role and mailbox names become parts of login names (`user/mailbox`)
/// and of audit records, so they must be unambiguous there.
fn check_name(problems: &mut Problems, section: &str, kind: &str, name: &str) {
    let key = format!("{section}.{}", key_segment(name));
    if name.is_empty() {
        problems.push(key, format!("{kind} names must not be empty"));
    } else if name
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        problems.push(
            key,
            format!(
                "{kind} names must not contain `/`, whitespace or control characters (logins are `user/mailbox`)"
            ),
        );
    }
}

fn check_login(login: &str) -> Result<(), &'static str> {
    if login.is_empty() {
        Err("must not be empty")
    } else if login.chars().any(char::is_control) {
        Err("must not contain control characters")
    } else {
        Ok(())
    }
}

fn check_address(address: &str) -> Result<(), &'static str> {
    if address.is_empty() {
        return Err("must not be empty");
    }
    if address.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters");
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err("must be an e-mail address (local@domain)");
    };
    let domain_ok = !domain.is_empty()
        && !domain.starts_with(['.', '-'])
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '.'));
    if local.is_empty() || !domain_ok {
        return Err("must be an e-mail address (local@domain)");
    }
    Ok(())
}

/// Folder patterns are `/`-separated; a segment is a literal name, `*` or
/// `**`. Wildcards inside a segment (`a*`) are rejected rather than
/// guessed at.
/// A folder named for the receipts worker: not INBOX (receipts are moved *out* of it), no
/// control characters, no wildcards. Pushes the problem and says whether the name is usable.
fn check_receipts_folder(problems: &mut Problems, key: &str, folder: &str) -> bool {
    let problem = if folder.trim().is_empty() {
        Some("must not be empty")
    } else if folder.eq_ignore_ascii_case("INBOX") {
        Some("must not be INBOX (INBOX is always watched; receipts are moved out of it)")
    } else if folder
        .chars()
        .any(|c| c.is_control() || c == '*' || c == '%')
    {
        Some("must not contain control characters or the wildcards * and %")
    } else {
        None
    };
    if let Some(problem) = problem {
        problems.push(key, format!("{folder:?}: {problem}"));
    }
    problem.is_none()
}

/// A span of time as admins write it: a number and a unit, `s`, `m`, `h` or `d`
/// (`90s`, `15m`, `24h`, `7d`).
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_secs = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?} is not a span of time (e.g. \"90s\", \"15m\", \"24h\", \"7d\")"
            ));
        }
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    number
        .checked_mul(unit_secs)
        .filter(|&secs| secs > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} must be more than zero and less than centuries"))
}

pub fn check_folder_pattern(pattern: &str) -> Result<(), &'static str> {
    if pattern.is_empty() {
        return Err("empty folder pattern");
    }
    if pattern.starts_with('/') || pattern.ends_with('/') {
        return Err("a folder pattern must not start or end with `/`");
    }
    if pattern.contains("//") {
        return Err("a folder pattern must not contain `//`");
    }
    if pattern.chars().any(char::is_control) {
        return Err("a folder pattern must not contain control characters");
    }
    if pattern
        .split('/')
        .any(|segment| segment.contains('*') && segment != "*" && segment != "**")
    {
        return Err(
            "`*` and `**` must stand alone as a whole segment (`Ricevute/*` is fine, `Ricevute*` is not)",
        );
    }
    Ok(())
}

/// Turns a toml error into "line L, column C (in [table]): message" without
/// quoting the source line.
fn syntax_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return message.to_owned();
    };
    let mut start = span.start.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..start].chars().count() + 1;
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    // The innermost table header at or above the error, for orientation.
    let table = text[..line_end]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.split('#').next().unwrap_or("").trim_end().ends_with(']'))
        .map(|l| format!(" (in {})", l.split('#').next().unwrap_or("").trim_end()))
        .unwrap_or_default();
    format!("line {line}, column {column}{table}: {message}")
}

impl Config {
    /// Reads, parses and validates the config file at `path`; relative paths
    /// inside it are resolved against its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        // Absolute, so that resolved paths do not depend on the working
        // directory staying the same.
        let base = std::path::absolute(dir).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_inner(&text, &base, Some(path))
    }

    /// Parses and validates config text; relative paths are resolved against
    /// `base_dir`. Does not touch the file system.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        Self::parse_inner(text, base_dir, None)
    }

    fn parse_inner(text: &str, base: &Path, path: Option<&Path>) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.map(Path::to_owned),
            message: syntax_message(text, &e),
        })?;
        let mut problems = Problems::default();
        let config = Self::build(raw, base, &mut problems);
        if problems.0.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems.0))
        }
    }

    /// Converts the raw shape, recording every problem. Values that fail
    /// validation are replaced by placeholders; the result is only used when
    /// no problem was recorded.
    fn build(raw: RawConfig, base: &Path, p: &mut Problems) -> Config {
        let g = raw.gateway;
        let state_dir = p.required("gateway.state_dir", g.state_dir);
        let gateway = GatewayConfig {
            state_dir: p
                .path("gateway.state_dir", state_dir, base)
                .unwrap_or_default(),
            vault_key: p.path("gateway.vault_key", g.vault_key, base),
            max_sessions: p.at_least_one(
                "gateway.max_sessions",
                g.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS),
            ),
            login_failure_delay: Duration::from_millis(
                g.login_failure_delay_ms
                    .unwrap_or(DEFAULT_LOGIN_FAILURE_DELAY_MS),
            ),
            idle_timeout: Duration::from_secs(p.at_least_one(
                "gateway.idle_timeout_secs",
                g.idle_timeout_secs.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS),
            )),
            shutdown_grace: Duration::from_secs(
                g.shutdown_grace_secs.unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS),
            ),
            max_preauth_connections: p.at_least_one(
                "gateway.max_preauth_connections",
                g.max_preauth_connections
                    .unwrap_or(DEFAULT_MAX_PREAUTH_CONNECTIONS),
            ),
            max_preauth_per_address: p.at_least_one(
                "gateway.max_preauth_per_address",
                g.max_preauth_per_address
                    .unwrap_or(DEFAULT_MAX_PREAUTH_PER_ADDRESS),
            ),
            max_sessions_per_user: p.at_least_one(
                "gateway.max_sessions_per_user",
                g.max_sessions_per_user
                    .unwrap_or(DEFAULT_MAX_SESSIONS_PER_USER),
            ),
            login_timeout: Duration::from_secs(p.at_least_one(
                "gateway.login_timeout_secs",
                g.login_timeout_secs.unwrap_or(DEFAULT_LOGIN_TIMEOUT_SECS),
            )),
            provider_timeout: Duration::from_secs(
                p.at_least_one(
                    "gateway.provider_timeout_secs",
                    g.provider_timeout_secs
                        .unwrap_or(DEFAULT_PROVIDER_TIMEOUT_SECS),
                ),
            ),
            connection_wait: Duration::from_secs(
                p.at_least_one(
                    "gateway.connection_wait_secs",
                    g.connection_wait_secs
                        .unwrap_or(DEFAULT_CONNECTION_WAIT_SECS),
                ),
            ),
            provider_idle_keep: Duration::from_secs(
                g.provider_idle_keep_secs
                    .unwrap_or(DEFAULT_PROVIDER_IDLE_KEEP_SECS),
            ),
            body_cache_bytes: g
                .body_cache_mib
                .unwrap_or(DEFAULT_BODY_CACHE_MIB)
                .saturating_mul(1024 * 1024),
            lockout: LockoutConfig {
                address_failures: p.at_least_one(
                    "gateway.lockout_address_failures",
                    g.lockout_address_failures
                        .unwrap_or(DEFAULT_LOCKOUT_ADDRESS_FAILURES),
                ),
                user_failures: p.at_least_one(
                    "gateway.lockout_user_failures",
                    g.lockout_user_failures
                        .unwrap_or(DEFAULT_LOCKOUT_USER_FAILURES),
                ),
                window: Duration::from_secs(p.at_least_one(
                    "gateway.lockout_window_secs",
                    g.lockout_window_secs.unwrap_or(DEFAULT_LOCKOUT_WINDOW_SECS),
                )),
                duration: Duration::from_secs(g.lockout_secs.unwrap_or(DEFAULT_LOCKOUT_SECS)),
            },
            min_free_space_bytes: g
                .min_free_space_mb
                .unwrap_or(DEFAULT_MIN_FREE_SPACE_MB)
                .saturating_mul(1024 * 1024),
        };

        let cert = p.required("tls.cert", raw.tls.cert);
        let key = p.required("tls.key", raw.tls.key);
        let tls = TlsConfig {
            cert: p.path("tls.cert", cert, base).unwrap_or_default(),
            key: p.path("tls.key", key, base).unwrap_or_default(),
        };

        let mut seen = BTreeMap::new();
        if raw.imap.listen_tls.is_empty() && raw.imap.listen_starttls.is_empty() {
            p.push(
                "imap",
                "no IMAP listener configured: set imap.listen_tls and/or imap.listen_starttls",
            );
        }
        let imap = ImapConfig {
            listen_tls: p.listeners("imap", "listen_tls", &raw.imap.listen_tls, &mut seen),
            listen_starttls: p.listeners(
                "imap",
                "listen_starttls",
                &raw.imap.listen_starttls,
                &mut seen,
            ),
            max_literal_bytes: p.at_least_one(
                "imap.max_literal_bytes",
                raw.imap
                    .max_literal_bytes
                    .unwrap_or(DEFAULT_MAX_LITERAL_BYTES),
            ),
            park_idle: raw.imap.park_idle.unwrap_or(true),
            lend_between_commands: raw.imap.lend_between_commands.unwrap_or(true),
            lend_after_quiet: match raw
                .imap
                .lend_after_quiet_secs
                .unwrap_or(DEFAULT_LEND_AFTER_QUIET_SECS)
            {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
        };
        let smtp = SmtpConfig {
            listen_tls: p.listeners("smtp", "listen_tls", &raw.smtp.listen_tls, &mut seen),
            listen_starttls: p.listeners(
                "smtp",
                "listen_starttls",
                &raw.smtp.listen_starttls,
                &mut seen,
            ),
        };

        let mut mailboxes = BTreeMap::new();
        for (name, m) in raw.mailboxes {
            check_name(p, "mailboxes", "mailbox", &name);
            let prefix = format!("mailboxes.{}", key_segment(&name));
            let key = |field: &str| format!("{prefix}.{field}");

            let address = p.checked(&key("address"), m.address, check_address);
            let login = p.checked(&key("login"), m.login, check_login);
            let imap_url = p
                .required(&key("imap"), m.imap)
                .and_then(|url| p.endpoint(&key("imap"), UpstreamProtocol::Imap, &url));
            let smtp_url = m
                .smtp
                .and_then(|url| p.endpoint(&key("smtp"), UpstreamProtocol::Smtp, &url));
            let send_rate = m.send_rate.and_then(|s| {
                s.parse::<SendRate>()
                    .map_err(|e| p.push(key("send_rate"), e.to_string()))
                    .ok()
            });
            let config = MailboxConfig {
                address,
                login,
                imap: imap_url.unwrap_or(UpstreamEndpoint {
                    protocol: UpstreamProtocol::Imap,
                    security: UpstreamSecurity::ImplicitTls,
                    host: String::new(),
                    port: 0,
                }),
                smtp: smtp_url,
                ca_file: p.path(&key("ca_file"), m.ca_file, base),
                max_connections: p.at_least_one(
                    &key("max_connections"),
                    m.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                ),
                max_message_bytes: p.at_least_one(
                    &key("max_message_bytes"),
                    m.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
                ),
                send_rate,
                receipts_folder: m
                    .receipts_folder
                    .filter(|folder| check_receipts_folder(p, &key("receipts_folder"), folder)),
                receipts_watch: m
                    .receipts_watch
                    .into_iter()
                    .enumerate()
                    .filter(|(i, folder)| {
                        check_receipts_folder(p, &format!("{}[{i}]", key("receipts_watch")), folder)
                    })
                    .map(|(_, folder)| folder)
                    .collect(),
            };
            if let Some(folder) = &config.receipts_folder
                && config.receipts_watch.contains(folder)
            {
                p.push(
                    key("receipts_watch"),
                    format!("{folder:?} is the receipts_folder: receipts moved there would be scanned again"),
                );
            }
            if raw.receipts.enabled != Some(false) && config.max_connections == 1 {
                p.push(
                    key("max_connections"),
                    "the receipts worker holds one provider connection: at least 2 are needed \
                     (or set receipts.enabled = false)",
                );
            }
            mailboxes.insert(name, config);
        }

        let mut roles = BTreeMap::new();
        for (name, r) in raw.roles {
            check_name(p, "roles", "role", &name);
            let prefix = format!("roles.{}", key_segment(&name));
            if r.mailboxes.is_empty() {
                p.push(
                    format!("{prefix}.mailboxes"),
                    "a role must name at least one mailbox",
                );
            }
            for (i, mailbox) in r.mailboxes.iter().enumerate() {
                if !mailboxes.contains_key(mailbox) {
                    p.push(
                        format!("{prefix}.mailboxes[{i}]"),
                        format!("unknown mailbox `{mailbox}` (not defined under [mailboxes])"),
                    );
                }
            }
            for (i, pattern) in r.folders.iter().enumerate() {
                if let Err(msg) = check_folder_pattern(pattern) {
                    p.push(
                        format!("{prefix}.folders[{i}]"),
                        format!("{pattern:?}: {msg}"),
                    );
                }
            }
            let mut permissions = Permissions::NONE;
            for (i, name) in r.permissions.iter().enumerate() {
                match name.parse::<Permission>() {
                    Ok(permission) => permissions.insert(permission),
                    Err(e) => p.push(format!("{prefix}.permissions[{i}]"), e.to_string()),
                }
            }
            roles.insert(
                name,
                RoleConfig {
                    mailboxes: r.mailboxes,
                    folders: r.folders,
                    permissions,
                },
            );
        }

        let mut users = BTreeMap::new();
        for (name, u) in raw.users {
            check_name(p, "users", "user", &name);
            let prefix = format!("users.{}", key_segment(&name));
            let password = p.checked(&format!("{prefix}.password"), u.password, |phc| {
                crate::password::check_phc(phc)
                    .map_err(|e| format!("{e}; generate one with `pecgate hash-password`"))
            });
            if u.roles.is_empty() {
                p.push(format!("{prefix}.roles"), "a user needs at least one role");
            }
            for (i, role) in u.roles.iter().enumerate() {
                if !roles.contains_key(role) {
                    p.push(
                        format!("{prefix}.roles[{i}]"),
                        format!("unknown role `{role}` (not defined under [roles])"),
                    );
                }
            }
            users.insert(
                name,
                UserConfig {
                    password,
                    roles: u.roles,
                    disabled: u.disabled,
                },
            );
        }

        let metrics = MetricsConfig {
            listen: raw.metrics.listen.as_deref().and_then(|text| {
                match text.trim().parse::<SocketAddr>() {
                    Ok(address) => Some(address),
                    Err(_) => {
                        p.push(
                            "metrics.listen",
                            format!("`{text}` is not a socket address (e.g. \"127.0.0.1:9187\")"),
                        );
                        None
                    }
                }
            }),
        };
        let defaults = ReceiptsConfig::default();
        let receipts = ReceiptsConfig {
            enabled: raw.receipts.enabled.unwrap_or(defaults.enabled),
            alert_after: match raw.receipts.alert_after.as_deref().map(parse_span) {
                None => defaults.alert_after,
                Some(Ok(span)) => span,
                Some(Err(reason)) => {
                    p.push("receipts.alert_after", reason);
                    defaults.alert_after
                }
            },
            poll_interval: Duration::from_secs(p.at_least_one(
                "receipts.poll_secs",
                raw.receipts.poll_secs.unwrap_or(DEFAULT_RECEIPTS_POLL_SECS),
            )),
        };
        Config {
            gateway,
            metrics,
            receipts,
            tls,
            imap,
            smtp,
            mailboxes,
            roles,
            users,
        }
    }
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

impl Config {
    /// Resolves a login name: `user` for a user with exactly one mailbox, or
    /// `user/mailbox`. Does not check the password; callers should verify it
    /// (or [`crate::password::verify_against_dummy`]) before acting on the
    /// outcome, so the answer does not leak which users exist.
    pub fn resolve_login(&self, login: &str) -> Result<LoginTarget, LoginError> {
        let (user_name, mailbox) = match login.split_once('/') {
            Some((user, mailbox)) => (user, Some(mailbox)),
            None => (login, None),
        };
        let user = self.users.get(user_name).ok_or(LoginError::UnknownUser)?;
        if user.disabled {
            return Err(LoginError::Disabled);
        }
        let granted = self.granted_mailboxes(user);
        let mailbox = match mailbox {
            Some(mailbox) if granted.contains(mailbox) => mailbox,
            Some(_) => return Err(LoginError::MailboxNotGranted),
            None => {
                let mut granted = granted.into_iter();
                match (granted.next(), granted.next()) {
                    (None, _) => return Err(LoginError::NoMailbox),
                    (Some(only), None) => only,
                    (Some(_), Some(_)) => return Err(LoginError::AmbiguousMailbox),
                }
            }
        };
        Ok(LoginTarget {
            user: user_name.to_owned(),
            mailbox: mailbox.to_owned(),
        })
    }

    /// What `user` may do on `mailbox`: the union over the user's roles that
    /// grant the mailbox. Empty for unknown or disabled users.
    pub fn permissions(&self, user: &str, mailbox: &str) -> Permissions {
        self.granting_roles(user, mailbox)
            .fold(Permissions::NONE, |acc, role| acc.union(role.permissions))
    }

    /// The folder patterns `user` may see on `mailbox`: the union (first
    /// occurrence order, no duplicates) of `folders` over the user's roles
    /// that grant the mailbox. Empty for unknown or disabled users.
    pub fn folder_patterns(&self, user: &str, mailbox: &str) -> Vec<String> {
        let mut patterns: Vec<String> = Vec::new();
        for role in self.granting_roles(user, mailbox) {
            for pattern in &role.folders {
                if !patterns.contains(pattern) {
                    patterns.push(pattern.clone());
                }
            }
        }
        patterns
    }

    /// The mailboxes granted to `user`, sorted. Empty for unknown or
    /// disabled users.
    pub fn mailboxes_of(&self, user: &str) -> Vec<&str> {
        match self.users.get(user) {
            Some(u) if !u.disabled => self.granted_mailboxes(u).into_iter().collect(),
            _ => Vec::new(),
        }
    }

    /// Mailboxes granted by the user's roles, ignoring `disabled`.
    fn granted_mailboxes(&self, user: &UserConfig) -> BTreeSet<&str> {
        user.roles
            .iter()
            .filter_map(|role| self.roles.get(role))
            .flat_map(|role| &role.mailboxes)
            .filter(|mailbox| self.mailboxes.contains_key(*mailbox))
            .map(String::as_str)
            .collect()
    }

    /// The roles of an enabled `user` that grant `mailbox`, in the user's
    /// order.
    fn granting_roles<'a>(
        &'a self,
        user: &str,
        mailbox: &'a str,
    ) -> impl Iterator<Item = &'a RoleConfig> + use<'a> {
        self.users
            .get(user)
            .filter(|u| !u.disabled)
            .into_iter()
            .flat_map(|u| &u.roles)
            .filter_map(|role| self.roles.get(role))
            .filter(move |role| role.mailboxes.iter().any(|m| m == mailbox))
    }

    /// Where the vault key is read from: `gateway.vault_key` if set, else
    /// `$CREDENTIALS_DIRECTORY/vault-key` when systemd provides credentials,
    /// else `state_dir/vault.key`.
    pub fn vault_key_path(&self) -> PathBuf {
        self.vault_key_path_with(std::env::var_os("CREDENTIALS_DIRECTORY").as_deref())
    }

    fn vault_key_path_with(&self, credentials_dir: Option<&OsStr>) -> PathBuf {
        if let Some(path) = &self.gateway.vault_key {
            return path.clone();
        }
        match credentials_dir {
            Some(dir) if !dir.is_empty() => Path::new(dir).join(CREDENTIAL_NAME),
            _ => self.gateway.state_dir.join(DEFAULT_KEY_FILE_NAME),
        }
    }

    /// The vault file: `state_dir/vault.bin`.
    pub fn vault_path(&self) -> PathBuf {
        self.gateway.state_dir.join(crate::vault::VAULT_FILE_NAME)
    }

    /// Things that are allowed but probably not intended. `pecgate check`
    /// shows them; the daemon logs them at startup.
    pub fn warnings(&self) -> Vec<Problem> {
        self.warnings_with(std::env::var_os("CREDENTIALS_DIRECTORY").as_deref())
    }

    fn warnings_with(&self, credentials_dir: Option<&OsStr>) -> Vec<Problem> {
        let mut p = Problems::default();
        let key = self.vault_key_path_with(credentials_dir);
        if key.starts_with(&self.gateway.state_dir) {
            p.push(
                "gateway.vault_key",
                format!(
                    "the vault key ({}) is inside state_dir, next to the vault it opens: whoever \
                     copies state_dir (a backup, a snapshot) can read the provider passwords. \
                     Move it out and hand it to pecgate as a systemd credential: \
                     `LoadCredential=vault-key:/etc/pecgate/vault.key` in the unit (see \
                     systemd/pecgate.service), or set gateway.vault_key",
                    key.display()
                ),
            );
        }
        if self.gateway.idle_timeout.as_secs() < RFC3501_MIN_IDLE_SECS {
            p.push(
                "gateway.idle_timeout_secs",
                "shorter than the 30 minutes RFC 3501 requires; idle clients may be cut off",
            );
        }
        if self.users.is_empty() {
            p.push("users", "no users configured");
        }
        let mut logins: BTreeMap<(&str, &str, u16), &str> = BTreeMap::new();
        for (name, mailbox) in &self.mailboxes {
            let key = format!("mailboxes.{}", key_segment(name));
            if !self.roles.values().any(|r| r.mailboxes.contains(name)) {
                p.push(&*key, "no role grants this mailbox");
            }
            let login = (
                mailbox.login.as_str(),
                mailbox.imap.host.as_str(),
                mailbox.imap.port,
            );
            if let Some(first) = logins.insert(login, name) {
                p.push(
                    format!("{key}.login"),
                    format!(
                        "same provider login and server as mailbox `{first}`; their max_connections add up"
                    ),
                );
            }
        }
        for (name, role) in &self.roles {
            let key = format!("roles.{}", key_segment(name));
            if role.permissions.is_empty() {
                p.push(
                    format!("{key}.permissions"),
                    "the role grants no permissions",
                );
            } else if role.folders.is_empty()
                && role.permissions.iter().any(|p| p != Permission::Send)
            {
                p.push(
                    format!("{key}.folders"),
                    "no folders listed, so the role's folder permissions apply to nothing",
                );
            }
            if role.permissions.has(Permission::Send) {
                for mailbox in &role.mailboxes {
                    if self
                        .mailboxes
                        .get(mailbox)
                        .is_some_and(|m| m.smtp.is_none())
                    {
                        p.push(
                            format!("{key}.permissions"),
                            format!("grants `send` but mailbox `{mailbox}` has no smtp URL"),
                        );
                    }
                }
            }
            if !self.users.values().any(|u| u.roles.contains(name)) {
                p.push(key, "no user has this role");
            }
        }
        for (name, user) in &self.users {
            let grants_something = self
                .granted_mailboxes(user)
                .into_iter()
                .any(|m| !self.permissions(name, m).is_empty());
            if !user.disabled && !grants_something {
                p.push(
                    format!("users.{}", key_segment(name)),
                    "the user's roles grant no permission on any mailbox",
                );
            }
        }
        p.0
    }

    /// Checks that the files the config names can be read: the TLS
    /// certificate and key and the mailboxes' `ca_file`s.
    pub fn check_files(&self) -> Vec<Problem> {
        let mut files = vec![
            ("tls.cert".to_owned(), &self.tls.cert),
            ("tls.key".to_owned(), &self.tls.key),
        ];
        for (name, mailbox) in &self.mailboxes {
            if let Some(ca_file) = &mailbox.ca_file {
                files.push((format!("mailboxes.{}.ca_file", key_segment(name)), ca_file));
            }
        }
        let mut p = Problems::default();
        for (key, path) in files {
            let readable = std::fs::File::open(path).and_then(|f| f.metadata());
            match readable {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => p.push(key, format!("{} is not a regular file", path.display())),
                Err(e) => p.push(key, format!("cannot read {}: {e}", path.display())),
            }
        }
        p.0
    }

    /// Why changing from this configuration to `new` ends a session of `user` on `mailbox`, if it does.
    pub fn revocation(&self, new: &Config, user: &str, mailbox: &str) -> Option<&'static str> {
        let old = self;
        let Some(account) = new.users.get(user) else {
            return Some("user removed");
        };
        if account.disabled {
            return Some("user disabled");
        }
        if old.users.get(user).map(|u| &u.password) != Some(&account.password) {
            return Some("password changed");
        }
        if !new.mailboxes_of(user).contains(&mailbox) {
            return Some("mailbox no longer granted");
        }
        if old.folder_patterns(user, mailbox) != new.folder_patterns(user, mailbox)
            || old.permissions(user, mailbox) != new.permissions(user, mailbox)
        {
            return Some("folders or permissions changed");
        }
        // Where the receipts worker files receipts is no business of a client session.
        let session_settings = |config: &Config| {
            config.mailboxes.get(mailbox).map(|m| MailboxConfig {
                receipts_folder: None,
                receipts_watch: Vec::new(),
                ..m.clone()
            })
        };
        if session_settings(old) != session_settings(new) {
            return Some("mailbox settings changed");
        }
        None
    }

    /// A short human-readable overview for `pecgate check`.
    pub fn summary(&self) -> String {
        use fmt::Write as _;

        fn list<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
            let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
            if items.is_empty() {
                "none".to_owned()
            } else {
                items.join(", ")
            }
        }

        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = (|| -> fmt::Result {
            writeln!(out, "listeners:")?;
            writeln!(out, "  imap implicit TLS: {}", list(&self.imap.listen_tls))?;
            writeln!(
                out,
                "  imap STARTTLS:     {}",
                list(&self.imap.listen_starttls)
            )?;
            writeln!(out, "  smtp implicit TLS: {}", list(&self.smtp.listen_tls))?;
            writeln!(
                out,
                "  smtp STARTTLS:     {}",
                list(&self.smtp.listen_starttls)
            )?;
            writeln!(out, "mailboxes:")?;
            if self.mailboxes.is_empty() {
                writeln!(out, "  none")?;
            }
            for (name, m) in &self.mailboxes {
                write!(
                    out,
                    "  {name}: {} via {}, max_connections {}",
                    m.address, m.imap, m.max_connections
                )?;
                if let Some(smtp) = &m.smtp {
                    write!(out, ", smtp {smtp}")?;
                }
                if !self.receipts.enabled {
                    write!(out, ", receipts worker off")?;
                } else if let Some(folder) = &m.receipts_folder {
                    write!(out, ", receipts filed in {folder:?}")?;
                } else {
                    write!(out, ", receipts archived (left in place)")?;
                }
                writeln!(out)?;
            }
            writeln!(out, "users:")?;
            if self.users.is_empty() {
                writeln!(out, "  none")?;
            }
            for (name, user) in &self.users {
                let mailboxes = self.granted_mailboxes(user);
                let logins = if user.disabled {
                    "none (disabled)".to_owned()
                } else if mailboxes.len() == 1 {
                    list(
                        std::iter::once(name.clone())
                            .chain(mailboxes.iter().map(|m| format!("{name}/{m}"))),
                    )
                } else {
                    list(mailboxes.iter().map(|m| format!("{name}/{m}")))
                };
                writeln!(
                    out,
                    "  {name}: logins {logins}; roles {}; mailboxes {}",
                    list(&user.roles),
                    list(&mailboxes)
                )?;
            }
            writeln!(out, "roles:")?;
            if self.roles.is_empty() {
                writeln!(out, "  none")?;
            }
            for (name, role) in &self.roles {
                writeln!(
                    out,
                    "  {name}: mailboxes {}; folders {}; permissions {}",
                    list(&role.mailboxes),
                    list(&role.folders),
                    role.permissions
                )?;
            }
            Ok(())
        })();
        out
    }
}

/// For tests across the crate: the TLS files, one IMAP listener and two mailboxes
/// (`studio`, `legal`) most test configurations share; each test adds its own `[gateway]`,
/// roles and users (TOML tables may come in any order).
#[cfg(test)]
pub(crate) const TEST_MAILBOXES: &str = r#"
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
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// A systemd credentials directory, so that the default key is not in state_dir.
    const CREDS: &str = "/run/credentials/pecgate.service";

    /// argon2id of "change-me".
    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$VHjHv64CViNy8yoyEAVadg$nbSDqcWNHaZIp/bmbEnvNj0ZvQK273Ydu8Nym4+pLw8";

    const VALID: &str = r#"
[gateway]
state_dir = "state"

[tls]
cert = "certs/gateway.crt"
key = "/etc/pecgate/gateway.key"

[imap]
listen_tls = ["0.0.0.0:993"]
listen_starttls = ["[::]:143"]

[smtp]
listen_tls = ["0.0.0.0:465"]

[mailboxes.studio]
address = "studio@pec.example.it"
login = "studio@pec.example.it"
imap = "imaps://imaps.pec.example.it"
smtp = "smtps://smtps.pec.example.it"
ca_file = "certs/provider-ca.pem"
send_rate = "6/min"

[mailboxes.legal]
address = "legal@pec.example.it"
login = "legal-login"
imap = "imap://imap.pec.example.it:1143"
max_connections = 3

[roles.segreteria]
mailboxes = ["studio"]
folders = ["INBOX", "Sent", "Ricevute/**"]
permissions = ["read", "flag", "delete", "move", "append", "manage_folders", "send"]

[roles.reader]
mailboxes = ["studio", "legal"]
folders = ["INBOX", "Archivio/*/2024"]
permissions = ["read"]

[roles.legal_flag]
mailboxes = ["legal"]
folders = ["INBOX", "Legal/**"]
permissions = ["flag"]

[users.mario]
password = "HASH"
roles = ["segreteria"]

[users.anna]
password = "HASH"
roles = ["reader", "legal_flag"]

[users.ex]
password = "HASH"
roles = ["segreteria"]
disabled = true
"#;

    fn base() -> &'static Path {
        Path::new("/etc/pecgate")
    }

    fn valid_text() -> String {
        VALID.replace("HASH", HASH)
    }

    fn valid() -> Config {
        Config::parse(&valid_text(), base()).unwrap()
    }

    /// The valid config with each `(from, to)` replacement applied (before
    /// `HASH` is substituted); `from` must occur exactly once.
    fn edited(edits: &[(&str, &str)]) -> String {
        let mut text = VALID.to_owned();
        for (from, to) in edits {
            assert_eq!(
                text.matches(from).count(),
                1,
                "edit {from:?} must match once"
            );
            text = text.replace(from, to);
        }
        text.replace("HASH", HASH)
    }

    fn problems(text: &str) -> Vec<Problem> {
        match Config::parse(text, base()) {
            Err(ConfigError::Invalid(problems)) => problems,
            Err(e) => panic!("expected validation problems, got: {e}"),
            Ok(_) => panic!("expected validation problems, config was accepted"),
        }
    }

    fn syntax_error(text: &str) -> String {
        match Config::parse(text, base()) {
            Err(e @ ConfigError::Syntax { .. }) => e.to_string(),
            Err(e) => panic!("expected a syntax error, got: {e}"),
            Ok(_) => panic!("expected a syntax error, config was accepted"),
        }
    }

    #[test]
    fn full_config_parses() {
        let c = valid();
        assert_eq!(c.gateway.state_dir, Path::new("/etc/pecgate/state"));
        assert_eq!(c.gateway.vault_key, None);
        assert_eq!(c.gateway.max_sessions, DEFAULT_MAX_SESSIONS);
        assert_eq!(c.gateway.login_failure_delay, Duration::from_millis(1500));
        assert_eq!(c.gateway.idle_timeout, Duration::from_secs(1800));
        assert_eq!(c.gateway.shutdown_grace, Duration::from_secs(10));
        assert_eq!(
            (c.gateway.connection_wait, c.gateway.provider_idle_keep),
            (Duration::from_secs(30), Duration::from_secs(300))
        );
        assert_eq!(c.imap.listen_tls, ["0.0.0.0:993".parse().unwrap()]);
        assert_eq!(c.imap.listen_starttls, ["[::]:143".parse().unwrap()]);
        assert_eq!(c.imap.max_literal_bytes, 65536);
        assert_eq!(c.smtp.listen_tls, ["0.0.0.0:465".parse().unwrap()]);
        assert!(c.smtp.listen_starttls.is_empty());

        let studio = &c.mailboxes["studio"];
        assert_eq!(studio.imap.security, UpstreamSecurity::ImplicitTls);
        assert_eq!(studio.imap.host, "imaps.pec.example.it");
        assert_eq!(studio.imap.port, 993);
        assert_eq!(studio.smtp.as_ref().unwrap().port, 465);
        assert_eq!(studio.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(studio.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
        assert_eq!(
            studio.send_rate,
            Some(SendRate {
                count: 6,
                per: Duration::from_secs(60)
            })
        );
        let legal = &c.mailboxes["legal"];
        assert_eq!(legal.imap.security, UpstreamSecurity::StartTls);
        assert_eq!(legal.imap.port, 1143);
        assert_eq!(legal.imap.to_string(), "imap://imap.pec.example.it:1143");
        assert_eq!(legal.max_connections, 3);
        assert_eq!(legal.smtp, None);
        assert_eq!(legal.send_rate, None);

        assert_eq!(c.roles["segreteria"].permissions, Permissions::all());
        assert!(c.users["ex"].disabled);
        assert!(!c.users["mario"].disabled);
    }

    #[test]
    fn example_file_parses() {
        let c = Config::parse(include_str!("../proxy.toml.example"), base()).unwrap();
        assert_eq!(c.mailboxes.keys().collect::<Vec<_>>(), ["studio"]);
        assert_eq!(c.resolve_login("mario").unwrap().mailbox, "studio");
        assert_eq!(
            c.permissions("anna", "studio"),
            [Permission::Read, Permission::Flag].into_iter().collect()
        );
        assert_eq!(c.permissions("mario", "studio"), Permissions::all());
        assert_eq!(c.tls.cert, Path::new("/etc/pecgate/certs/gateway.crt"));
        assert_eq!(c.warnings_with(Some(OsStr::new(CREDS))), []);
        // The placeholder hashes really are of "change-me".
        let phc = &c.users["anna"].password;
        assert!(crate::password::verify_password(phc, b"change-me"));
    }

    #[test]
    fn validation_rules_name_their_key() {
        // (edits to the valid config, expected key, expected message part)
        type Case = (
            &'static [(&'static str, &'static str)],
            &'static str,
            &'static str,
        );
        let cases: &[Case] = &[
            (
                &[(
                    "mailboxes = [\"studio\"]\nfolders = [\"INBOX\", \"Sent\"",
                    "mailboxes = [\"studio\", \"nope\"]\nfolders = [\"INBOX\", \"Sent\"",
                )],
                "roles.segreteria.mailboxes[1]",
                "unknown mailbox `nope`",
            ),
            (
                &[(
                    "roles = [\"reader\", \"legal_flag\"]",
                    "roles = [\"reader\", \"nope\"]",
                )],
                "users.anna.roles[1]",
                "unknown role `nope`",
            ),
            (
                &[(
                    "[users.mario]\npassword = \"HASH\"",
                    "[users.mario]\npassword = \"$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$vBaNuXkCu4w7JoGJ4Y8i6A\"",
                )],
                "users.mario.password",
                "argon2id",
            ),
            (
                &[(
                    "[users.ex]\npassword = \"HASH\"",
                    "[users.ex]\npassword = \"\"",
                )],
                "users.ex.password",
                "pecgate hash-password",
            ),
            (
                &[("[users.ex]\npassword = \"HASH\"\n", "[users.ex]\n")],
                "users.ex.password",
                "required",
            ),
            (
                &[("[users.ex]", "[users.\"e/x\"]")],
                "users.\"e/x\"",
                "must not contain `/`",
            ),
            (
                &[("[users.ex]", "[users.\"e x\"]")],
                "users.\"e x\"",
                "whitespace",
            ),
            (
                &[("[users.ex]", "[users.\"\"]")],
                "users.\"\"",
                "must not be empty",
            ),
            (
                &[
                    ("[roles.legal_flag]", "[roles.\"legal\\tflag\"]"),
                    ("\"reader\", \"legal_flag\"", "\"reader\", \"legal\\tflag\""),
                ],
                "roles.\"legal\\tflag\"",
                "control",
            ),
            (
                &[
                    ("[mailboxes.legal]", "[mailboxes.\"le/gal\"]"),
                    ("mailboxes = [\"legal\"]", "mailboxes = [\"le/gal\"]"),
                    ("[\"studio\", \"legal\"]", "[\"studio\", \"le/gal\"]"),
                ],
                "mailboxes.\"le/gal\"",
                "must not contain `/`",
            ),
            (
                &[(
                    "permissions = [\"read\"]",
                    "permissions = [\"read\", \"fly\"]",
                )],
                "roles.reader.permissions[1]",
                "unknown permission `fly`",
            ),
            (
                &[("\"Archivio/*/2024\"", "\"\"")],
                "roles.reader.folders[1]",
                "empty",
            ),
            (
                &[("\"Archivio/*/2024\"", "\"/Archivio\"")],
                "roles.reader.folders[1]",
                "start or end",
            ),
            (
                &[("\"Archivio/*/2024\"", "\"Archivio/\"")],
                "roles.reader.folders[1]",
                "start or end",
            ),
            (
                &[("\"Archivio/*/2024\"", "\"Archivio//2024\"")],
                "roles.reader.folders[1]",
                "`//`",
            ),
            (
                &[("\"Archivio/*/2024\"", "\"Archivio*\"")],
                "roles.reader.folders[1]",
                "whole segment",
            ),
            (
                &[("\"Archivio/*/2024\"", "\"Archivio/**x\"")],
                "roles.reader.folders[1]",
                "whole segment",
            ),
            (
                &[("\"Archivio/*/2024\"", "\"Archivio/*.pdf\"")],
                "roles.reader.folders[1]",
                "whole segment",
            ),
            (
                &[(
                    "\"imaps://imaps.pec.example.it\"",
                    "\"https://imaps.pec.example.it\"",
                )],
                "mailboxes.studio.imap",
                "imaps:// or imap://",
            ),
            (
                &[(
                    "\"imaps://imaps.pec.example.it\"",
                    "\"imaps.pec.example.it\"",
                )],
                "mailboxes.studio.imap",
                "imaps:// or imap://",
            ),
            (
                &[("\"imaps://imaps.pec.example.it\"", "\"imaps://\"")],
                "mailboxes.studio.imap",
                "host is missing",
            ),
            (
                &[("\"imaps://imaps.pec.example.it\"", "\"imaps://:993\"")],
                "mailboxes.studio.imap",
                "host is missing",
            ),
            (
                &[("\"imaps://imaps.pec.example.it\"", "\"imaps://bad host\"")],
                "mailboxes.studio.imap",
                "not a valid host",
            ),
            (
                &[(
                    "\"imaps://imaps.pec.example.it\"",
                    "\"imaps://imaps.pec.example.it:0\"",
                )],
                "mailboxes.studio.imap",
                "port",
            ),
            (
                &[(
                    "\"imaps://imaps.pec.example.it\"",
                    "\"imaps://imaps.pec.example.it:99999\"",
                )],
                "mailboxes.studio.imap",
                "port",
            ),
            (
                &[(
                    "\"imaps://imaps.pec.example.it\"",
                    "\"imaps://imaps.pec.example.it:+993\"",
                )],
                "mailboxes.studio.imap",
                "port",
            ),
            (
                &[(
                    "\"imaps://imaps.pec.example.it\"",
                    "\"imaps://imaps.pec.example.it:\"",
                )],
                "mailboxes.studio.imap",
                "port",
            ),
            (
                &[(
                    "\"imaps://imaps.pec.example.it\"",
                    "\"imaps://imaps.pec.example.it/INBOX\"",
                )],
                "mailboxes.studio.imap",
                "path",
            ),
            (
                &[(
                    "\"imaps://imaps.pec.example.it\"",
                    "\"imaps://imaps.pec.example.it?x=1\"",
                )],
                "mailboxes.studio.imap",
                "path",
            ),
            (
                &[("\"imaps://imaps.pec.example.it\"", "\"imaps://[::1\"")],
                "mailboxes.studio.imap",
                "not a valid host",
            ),
            (
                &[("imap = \"imaps://imaps.pec.example.it\"\n", "")],
                "mailboxes.studio.imap",
                "required",
            ),
            (
                &[(
                    "\"smtps://smtps.pec.example.it\"",
                    "\"imaps://smtps.pec.example.it\"",
                )],
                "mailboxes.studio.smtp",
                "smtps:// or smtp://",
            ),
            (
                &[("max_connections = 3", "max_connections = 0")],
                "mailboxes.legal.max_connections",
                "at least 1",
            ),
            (
                &[("max_connections = 3", "max_message_bytes = 0")],
                "mailboxes.legal.max_message_bytes",
                "at least 1",
            ),
            (
                &[("send_rate = \"6/min\"", "send_rate = \"6/fortnight\"")],
                "mailboxes.studio.send_rate",
                "invalid send rate",
            ),
            (
                &[("address = \"legal@pec.example.it\"", "address = \"\"")],
                "mailboxes.legal.address",
                "must not be empty",
            ),
            (
                &[(
                    "address = \"legal@pec.example.it\"",
                    "address = \"legal.pec.example.it\"",
                )],
                "mailboxes.legal.address",
                "local@domain",
            ),
            (
                &[(
                    "address = \"legal@pec.example.it\"",
                    "address = \"@pec.example.it\"",
                )],
                "mailboxes.legal.address",
                "local@domain",
            ),
            (
                &[("address = \"legal@pec.example.it\"", "address = \"legal@\"")],
                "mailboxes.legal.address",
                "local@domain",
            ),
            (
                &[(
                    "address = \"legal@pec.example.it\"",
                    "address = \"le gal@pec.example.it\"",
                )],
                "mailboxes.legal.address",
                "whitespace",
            ),
            (
                &[("address = \"legal@pec.example.it\"\n", "")],
                "mailboxes.legal.address",
                "required",
            ),
            (
                &[("login = \"legal-login\"", "login = \"\"")],
                "mailboxes.legal.login",
                "must not be empty",
            ),
            (
                &[(
                    "listen_tls = [\"0.0.0.0:993\"]\nlisten_starttls = [\"[::]:143\"]",
                    "",
                )],
                "imap",
                "no IMAP listener",
            ),
            (
                &[(
                    "listen_tls = [\"0.0.0.0:993\"]\nlisten_starttls = [\"[::]:143\"]",
                    "listen_tls = []\nlisten_starttls = []",
                )],
                "imap",
                "no IMAP listener",
            ),
            (
                &[(
                    "listen_tls = [\"0.0.0.0:465\"]",
                    "listen_tls = [\"0.0.0.0:993\"]",
                )],
                "smtp.listen_tls[0]",
                "also in imap.listen_tls[0]",
            ),
            (
                &[(
                    "listen_starttls = [\"[::]:143\"]",
                    "listen_starttls = [\"[::]:143\", \"[::]:143\"]",
                )],
                "imap.listen_starttls[1]",
                "duplicate listen address",
            ),
            (
                &[(
                    "listen_tls = [\"0.0.0.0:993\"]",
                    "listen_tls = [\"localhost:993\"]",
                )],
                "imap.listen_tls[0]",
                "not a socket address",
            ),
            (
                &[("roles = [\"reader\", \"legal_flag\"]", "roles = []")],
                "users.anna.roles",
                "at least one role",
            ),
            (
                &[("mailboxes = [\"legal\"]", "mailboxes = []")],
                "roles.legal_flag.mailboxes",
                "at least one mailbox",
            ),
            (
                &[("state_dir = \"state\"\n", "")],
                "gateway.state_dir",
                "required",
            ),
            (
                &[("state_dir = \"state\"", "state_dir = \"\"")],
                "gateway.state_dir",
                "must not be empty",
            ),
            (
                &[(
                    "state_dir = \"state\"",
                    "state_dir = \"s\"\nmax_sessions = 0",
                )],
                "gateway.max_sessions",
                "at least 1",
            ),
            (
                &[(
                    "state_dir = \"state\"",
                    "state_dir = \"s\"\nidle_timeout_secs = 0",
                )],
                "gateway.idle_timeout_secs",
                "at least 1",
            ),
            (
                &[(
                    "state_dir = \"state\"",
                    "state_dir = \"s\"\nconnection_wait_secs = 0",
                )],
                "gateway.connection_wait_secs",
                "at least 1",
            ),
            (
                &[(
                    "state_dir = \"state\"",
                    "state_dir = \"s\"\nvault_key = \"\"",
                )],
                "gateway.vault_key",
                "must not be empty",
            ),
            (
                &[("cert = \"certs/gateway.crt\"\n", "")],
                "tls.cert",
                "required",
            ),
            (
                &[("key = \"/etc/pecgate/gateway.key\"\n", "")],
                "tls.key",
                "required",
            ),
            (
                &[("ca_file = \"certs/provider-ca.pem\"", "ca_file = \"\"")],
                "mailboxes.studio.ca_file",
                "must not be empty",
            ),
            (
                &[(
                    "listen_tls = [\"0.0.0.0:993\"]",
                    "listen_tls = [\"0.0.0.0:993\"]\nmax_literal_bytes = 0",
                )],
                "imap.max_literal_bytes",
                "at least 1",
            ),
        ];
        for (edits, key, message) in cases {
            let found = problems(&edited(edits));
            assert!(
                found
                    .iter()
                    .any(|p| p.key == *key && p.message.contains(message)),
                "edits {edits:?}: expected `{key}: ...{message}...`, got {found:#?}"
            );
            assert_eq!(found.len(), 1, "edits {edits:?}: {found:#?}");
        }
    }

    #[test]
    fn password_problems_do_not_echo_the_value() {
        let text = edited(&[(
            "[users.mario]\npassword = \"HASH\"",
            "[users.mario]\npassword = \"hunter2-plaintext\"",
        )]);
        let err = Config::parse(&text, base()).unwrap_err().to_string();
        assert!(err.starts_with("users.mario.password: "), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        // A syntax error on a password line does not quote the line either.
        let text = valid_text().replace(HASH, "hunter2-plaintext\n");
        let err = syntax_error(&text);
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("line "), "{err}");
    }

    #[test]
    fn all_problems_are_collected() {
        let text = edited(&[
            ("max_connections = 3", "max_connections = 0"),
            (
                "roles = [\"reader\", \"legal_flag\"]",
                "roles = [\"reader\", \"nope\"]",
            ),
            ("\"Archivio/*/2024\"", "\"Archivio*\""),
        ]);
        let err = Config::parse(&text, base()).unwrap_err();
        let ConfigError::Invalid(found) = &err else {
            panic!("{err}");
        };
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "mailboxes.legal.max_connections",
                "roles.reader.folders[1]",
                "users.anna.roles[1]"
            ]
        );
        // One problem per line, "key: message".
        let text = err.to_string();
        assert_eq!(text.lines().count(), 3, "{text}");
        for (line, problem) in text.lines().zip(found) {
            assert_eq!(line, format!("{}: {}", problem.key, problem.message));
        }
    }

    #[test]
    fn unknown_keys_are_rejected_naming_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "state_dir = \"state\"",
                "state_dirr = \"state\"",
                "state_dirr",
            ),
            ("[imap]", "[imapp]", "imapp"),
            (
                "[users.mario]\n",
                "[users.mario]\npasword = \"x\"\n",
                "pasword",
            ),
            (
                "max_connections = 3",
                "max_conections = 3",
                "max_conections",
            ),
            (
                "[roles.reader]\n",
                "[roles.reader]\nfolder = []\n",
                "folder",
            ),
            ("[smtp]\n", "[smtp]\nlisten = []\n", "listen"),
            ("[tls]\n", "[tls]\nca = \"x\"\n", "ca"),
        ];
        for (from, to, key) in cases {
            let err = syntax_error(&edited(&[(from, to)]));
            assert!(err.contains(&format!("unknown field `{key}`")), "{err}");
            assert!(err.contains("line "), "{err}");
        }
        let err = syntax_error(&edited(&[(
            "[users.mario]\n",
            "[users.mario]\npasword = \"x\"\n",
        )]));
        assert!(err.contains("(in [users.mario])"), "{err}");
        // Wrong types are syntax errors too, with a position.
        let err = syntax_error(&edited(&[(
            "max_connections = 3",
            "max_connections = \"three\"",
        )]));
        assert!(
            err.contains("line ") && err.contains("(in [mailboxes.legal])"),
            "{err}"
        );
        let err = syntax_error("[gateway\n");
        assert!(err.starts_with("line 1, column"), "{err}");
        // The file name prefixes errors from `load`.
        let err = ConfigError::Syntax {
            path: Some(PathBuf::from("proxy.toml")),
            message: "line 1, column 1: oops".into(),
        };
        assert_eq!(err.to_string(), "proxy.toml: line 1, column 1: oops");
    }

    #[test]
    fn resolve_login_cases() {
        let c = valid();
        let ok = |user: &str, mailbox: &str| {
            Ok(LoginTarget {
                user: user.into(),
                mailbox: mailbox.into(),
            })
        };
        let cases: &[(&str, Result<LoginTarget, LoginError>)] = &[
            ("mario", ok("mario", "studio")),
            ("mario/studio", ok("mario", "studio")),
            ("mario/legal", Err(LoginError::MailboxNotGranted)),
            ("mario/nope", Err(LoginError::MailboxNotGranted)),
            ("mario/", Err(LoginError::MailboxNotGranted)),
            ("mario/studio/x", Err(LoginError::MailboxNotGranted)),
            ("anna", Err(LoginError::AmbiguousMailbox)),
            ("anna/legal", ok("anna", "legal")),
            ("anna/studio", ok("anna", "studio")),
            ("nobody", Err(LoginError::UnknownUser)),
            ("nobody/studio", Err(LoginError::UnknownUser)),
            ("", Err(LoginError::UnknownUser)),
            ("Mario", Err(LoginError::UnknownUser)),
            ("ex", Err(LoginError::Disabled)),
            ("ex/studio", Err(LoginError::Disabled)),
        ];
        for (login, expected) in cases {
            assert_eq!(&c.resolve_login(login), expected, "{login:?}");
        }
        // Unreachable with a validated config, but handled.
        let mut c = c;
        c.users.get_mut("anna").unwrap().roles.clear();
        assert_eq!(c.resolve_login("anna"), Err(LoginError::NoMailbox));
    }

    #[test]
    fn permissions_are_the_union_over_roles() {
        let c = valid();
        let set = |ps: &[Permission]| ps.iter().copied().collect::<Permissions>();
        assert_eq!(
            c.permissions("anna", "legal"),
            set(&[Permission::Read, Permission::Flag])
        );
        assert_eq!(c.permissions("anna", "studio"), set(&[Permission::Read]));
        assert_eq!(c.permissions("mario", "studio"), Permissions::all());
        assert_eq!(c.permissions("mario", "legal"), Permissions::NONE);
        assert_eq!(c.permissions("ex", "studio"), Permissions::NONE);
        assert_eq!(c.permissions("nobody", "studio"), Permissions::NONE);
        assert_eq!(
            c.folder_patterns("anna", "legal"),
            ["INBOX", "Archivio/*/2024", "Legal/**"]
        );
        assert_eq!(
            c.folder_patterns("anna", "studio"),
            ["INBOX", "Archivio/*/2024"]
        );
        assert!(c.folder_patterns("mario", "legal").is_empty());
        assert_eq!(c.mailboxes_of("anna"), ["legal", "studio"]);
        assert_eq!(c.mailboxes_of("mario"), ["studio"]);
        assert!(c.mailboxes_of("ex").is_empty());
        assert!(c.mailboxes_of("nobody").is_empty());
    }

    #[test]
    fn permission_set_operations() {
        let read_flag: Permissions = [Permission::Read, Permission::Flag].into_iter().collect();
        assert!(read_flag.has(Permission::Read) && !read_flag.has(Permission::Send));
        assert_eq!(read_flag.to_string(), "read, flag");
        assert_eq!(Permissions::NONE.to_string(), "none");
        assert_eq!(
            Permissions::all().to_string(),
            "read, flag, delete, move, append, manage_folders, send"
        );
        let send: Permissions = [Permission::Send].into_iter().collect();
        assert_eq!(
            read_flag.union(send).iter().collect::<Vec<_>>(),
            [Permission::Read, Permission::Flag, Permission::Send]
        );
        for p in Permission::ALL {
            assert_eq!(p.name().parse::<Permission>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
        assert!("Read".parse::<Permission>().is_err());
    }

    #[test]
    fn relative_paths_resolve_against_config_dir() {
        let c = valid();
        assert_eq!(c.tls.cert, Path::new("/etc/pecgate/certs/gateway.crt"));
        assert_eq!(c.tls.key, Path::new("/etc/pecgate/gateway.key"));
        assert_eq!(c.gateway.state_dir, Path::new("/etc/pecgate/state"));
        assert_eq!(
            c.mailboxes["studio"].ca_file.as_deref(),
            Some(Path::new("/etc/pecgate/certs/provider-ca.pem"))
        );
        let c = Config::parse(
            &edited(&[(
                "state_dir = \"state\"",
                "state_dir = \"/var/lib/pecgate\"\nvault_key = \"keys/vault.key\"",
            )]),
            base(),
        )
        .unwrap();
        assert_eq!(c.gateway.state_dir, Path::new("/var/lib/pecgate"));
        assert_eq!(
            c.gateway.vault_key.as_deref(),
            Some(Path::new("/etc/pecgate/keys/vault.key"))
        );
    }

    #[test]
    fn vault_key_inside_state_dir_is_warned_about() {
        let c = valid();
        let warnings = c.warnings_with(None);
        let warning = warnings
            .iter()
            .find(|p| p.key == "gateway.vault_key")
            .expect("a warning about the key");
        assert!(warning.message.contains("LoadCredential=vault-key:"));
        assert!(c.warnings_with(Some(OsStr::new(CREDS))).is_empty());
        let mut c = c;
        c.gateway.vault_key = Some(PathBuf::from("/etc/pecgate/vault.key"));
        assert!(c.warnings_with(None).is_empty());
    }

    #[test]
    fn vault_key_path_defaults() {
        let c = valid();
        assert_eq!(
            c.vault_key_path_with(None),
            Path::new("/etc/pecgate/state/vault.key")
        );
        assert_eq!(
            c.vault_key_path_with(Some(OsStr::new(""))),
            Path::new("/etc/pecgate/state/vault.key")
        );
        assert_eq!(
            c.vault_key_path_with(Some(OsStr::new("/run/credentials/pecgate.service"))),
            Path::new("/run/credentials/pecgate.service/vault-key")
        );
        assert_eq!(c.vault_path(), Path::new("/etc/pecgate/state/vault.bin"));
        let mut c = c;
        c.gateway.vault_key = Some(PathBuf::from("/etc/pecgate/vault.key"));
        assert_eq!(
            c.vault_key_path_with(Some(OsStr::new("/run/credentials/pecgate.service"))),
            Path::new("/etc/pecgate/vault.key")
        );
    }

    #[test]
    fn send_rate_parsing() {
        let ok = |count, secs| {
            Some(SendRate {
                count,
                per: Duration::from_secs(secs),
            })
        };
        let cases: &[(&str, Option<SendRate>)] = &[
            ("6/min", ok(6, 60)),
            ("100/hour", ok(100, 3600)),
            ("1/s", ok(1, 1)),
            ("10 / minute", ok(10, 60)),
            ("500/day", ok(500, 86400)),
            ("2/H", ok(2, 3600)),
            ("0/min", None),
            ("-1/min", None),
            ("+1/min", None),
            ("6", None),
            ("6/", None),
            ("/min", None),
            ("six/min", None),
            ("6/fortnight", None),
            ("6/min/x", None),
            ("99999999999/s", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<SendRate>().ok(), *expected, "{text:?}");
        }
        assert_eq!("6/min".parse::<SendRate>().unwrap().to_string(), "6/min");
        assert_eq!(
            "100/hours".parse::<SendRate>().unwrap().to_string(),
            "100/hour"
        );
    }

    #[test]
    fn endpoint_parsing() {
        use UpstreamProtocol::{Imap, Smtp};
        let cases: &[(UpstreamProtocol, &str, &str)] = &[
            (Imap, "imaps://h.example", "imaps://h.example:993"),
            (Imap, "imap://h.example", "imap://h.example:143"),
            (Imap, "IMAPS://h.example:1993/", "imaps://h.example:1993"),
            (Imap, "imaps://127.0.0.1:10993", "imaps://127.0.0.1:10993"),
            (Imap, "imaps://[::1]", "imaps://[::1]:993"),
            (
                Imap,
                "imap://[2001:db8::1]:1143",
                "imap://[2001:db8::1]:1143",
            ),
            (Smtp, "smtps://h.example", "smtps://h.example:465"),
            (Smtp, "smtp://h.example", "smtp://h.example:587"),
        ];
        for (protocol, url, shown) in cases {
            let endpoint = UpstreamEndpoint::parse(*protocol, url).unwrap();
            assert_eq!(endpoint.to_string(), *shown);
        }
        let e = UpstreamEndpoint::parse(Imap, "imaps://[::1]:5").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 5));
        let err = UpstreamEndpoint::parse(Imap, "imaps://user:s3cret@h.example").unwrap_err();
        assert_eq!(err, EndpointError::UserInfo);
        assert!(!err.to_string().contains("s3cret"));
        assert_eq!(
            UpstreamEndpoint::parse(Smtp, "imaps://h.example"),
            Err(EndpointError::Scheme {
                expected: "smtps:// or smtp://"
            })
        );
    }

    #[test]
    fn warnings_are_not_errors() {
        let text = edited(&[
            (
                "state_dir = \"state\"",
                "state_dir = \"s\"\nidle_timeout_secs = 60",
            ),
            ("permissions = [\"flag\"]", "permissions = []"),
        ]);
        let c = Config::parse(&text, base()).unwrap();
        let keys: Vec<String> = c
            .warnings_with(Some(OsStr::new(CREDS)))
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            ["gateway.idle_timeout_secs", "roles.legal_flag.permissions"]
        );

        // A user whose roles grant nothing; a role nobody has; send without smtp.
        let text = edited(&[
            (
                "roles = [\"reader\", \"legal_flag\"]",
                "roles = [\"legal_flag\"]",
            ),
            ("permissions = [\"flag\"]", "permissions = [\"send\"]"),
        ]);
        let c = Config::parse(&text, base()).unwrap();
        let warnings: Vec<String> = c
            .warnings_with(Some(OsStr::new(CREDS)))
            .iter()
            .map(Problem::to_string)
            .collect();
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
        assert!(
            warnings[0]
                .starts_with("roles.legal_flag.permissions: grants `send` but mailbox `legal`")
        );
        assert!(warnings[1].starts_with("roles.reader: no user has this role"));

        let text = edited(&[("permissions = [\"flag\"]", "permissions = []")]).replace(
            "roles = [\"reader\", \"legal_flag\"]",
            "roles = [\"legal_flag\"]",
        );
        let c = Config::parse(&text, base()).unwrap();
        let keys: Vec<String> = c
            .warnings_with(Some(OsStr::new(CREDS)))
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            ["roles.legal_flag.permissions", "roles.reader", "users.anna"]
        );
        assert_eq!(valid().warnings_with(Some(OsStr::new(CREDS))), []);
    }

    #[test]
    fn check_files_reports_missing_files() {
        let c = valid();
        let keys: Vec<String> = c.check_files().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["tls.cert", "tls.key", "mailboxes.studio.ca_file"]);
    }

    #[test]
    fn summary_lists_everything() {
        let summary = valid().summary();
        for needle in [
            "imap implicit TLS: 0.0.0.0:993",
            "imap STARTTLS:     [::]:143",
            "smtp STARTTLS:     none",
            "legal: legal@pec.example.it via imap://imap.pec.example.it:1143, max_connections 3",
            "studio: studio@pec.example.it via imaps://imaps.pec.example.it:993, max_connections 10, smtp smtps://smtps.pec.example.it:465",
            "mario: logins mario, mario/studio; roles segreteria; mailboxes studio",
            "anna: logins anna/legal, anna/studio; roles reader, legal_flag; mailboxes legal, studio",
            "ex: logins none (disabled)",
            "reader: mailboxes studio, legal; folders INBOX, Archivio/*/2024; permissions read",
        ] {
            assert!(
                summary.contains(needle),
                "missing {needle:?} in:\n{summary}"
            );
        }
        assert!(!summary.contains("argon2"));
    }

    #[test]
    fn debug_redacts_password_hashes() {
        let c = valid();
        let shown = format!("{c:?}");
        assert!(!shown.contains("argon2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn load_reads_file_and_resolves_against_its_dir() {
        let dir = std::env::temp_dir().join(format!("pecgate-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxy.toml");
        std::fs::write(&path, valid_text()).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.tls.cert, dir.join("certs/gateway.crt"));
        std::fs::write(&path, "[gateway\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: line 1", path.display())),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }), "{err:?}");
    }
}
