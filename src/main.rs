//! The `pecgate` command line: `serve`, `check`, `hash-password`, `vault`, `audit`, `ledger`,
//! `receipts`, `sessions`, `client-config`.
//!
//! This is the binary edge: errors become `anyhow` reports here and nowhere else.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use pecgate::audit::{self, AuditLog, QueryFilter};
use pecgate::config::Config;
use pecgate::gateway::{Carried, Gateway, Live};
use pecgate::ledger::{self, Ledger, LedgerFilter};
use pecgate::password;
use pecgate::server::{self, Listeners};
use pecgate::vault::{self, SecretString, Vault};

const DEFAULT_CONFIG: &str = "/etc/pecgate/proxy.toml";

#[derive(Parser)]
#[command(
    name = "pecgate",
    version,
    about = "Personal logins, audit and folder policy for shared PEC mailboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway in the foreground (logs to stderr; RUST_LOG sets the level).
    Serve {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration and print a summary, like `nginx -t`.
    Check {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Also log in to each provider and show, per user, the folders they will see.
        #[arg(long)]
        live: bool,
    },
    /// Read a password (prompt on a terminal, else one line of stdin) and print its argon2id hash.
    HashPassword,
    /// Manage provider passwords in the encrypted vault.
    Vault {
        #[command(subcommand)]
        action: VaultAction,
    },
    /// Read and verify the audit log.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Read the sent ledger (who sent which message through which mailbox).
    Ledger {
        #[command(subcommand)]
        action: LedgerAction,
    },
    /// PEC receipts: per-recipient state of sent messages, pending deliveries, export.
    Receipts {
        #[command(subcommand)]
        action: ReceiptsAction,
    },
    /// List the sessions logged in to the running pecgate (through its control socket).
    Sessions {
        #[arg(short, long, default_value = DEFAULT_CONFIG, global = true)]
        config: PathBuf,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<SessionsAction>,
    },
    /// Print the mail client settings of a user (and a Thunderbird autoconfig file).
    ClientConfig {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        user: String,
        /// The host name employees' clients connect to (default: this machine's name).
        #[arg(long)]
        host: Option<String>,
        /// Only the Thunderbird autoconfig XML (config-v1.1.xml), to publish for IT.
        #[arg(long)]
        autoconfig: bool,
    },
}

#[derive(Subcommand)]
enum SessionsAction {
    /// End every session of USER at once (`* BYE` / `421`), recorded in the audit log.
    Kick { user: String },
}

#[derive(Subcommand)]
enum LedgerAction {
    /// Print sent messages, oldest first.
    Show {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        mailbox: Option<String>,
        /// Only the message with this Message-ID (with the angle brackets).
        #[arg(long)]
        message_id: Option<String>,
        /// Only the most recent N messages.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum ReceiptsAction {
    /// A message: who sent it, and each recipient's state with times and receipt hashes.
    Show {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// With or without the angle brackets.
        #[arg(long)]
        message_id: String,
        #[arg(long)]
        mailbox: Option<String>,
        /// One JSON object (an array if several mailboxes sent it) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Messages with a recipient still undelivered this long after sending.
    Pending {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// A number and s, m, h or d.
        #[arg(long, default_value = "24h")]
        older_than: String,
        #[arg(long)]
        mailbox: Option<String>,
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Receipts for messages that were not sent through pecgate (webmail, other clients).
    Unmatched {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        mailbox: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// PEC messages that could not be classified: archived and left where they were.
    Unclassified {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Copy archived receipts into DIR with manifest.json and SHA256SUMS.
    Export {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Archived since: `YYYY-MM-DD` or RFC 3339.
        #[arg(long)]
        since: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        mailbox: Option<String>,
    },
}

#[derive(Subcommand)]
enum VaultAction {
    /// Store the provider password of MAILBOX (read from stdin or a prompt).
    Set {
        mailbox: String,
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// List the mailboxes that have a password stored (never the passwords).
    List {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Remove the provider password of MAILBOX.
    Remove {
        mailbox: String,
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Check the hash chain; prints the chain head to copy somewhere safe.
    Verify {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// A head from an earlier verify, as ID:HASH, that must still be intact.
        #[arg(long)]
        anchor: Option<String>,
    },
    /// One message's history: who sent it, its receipts, and who opened, flagged, copied,
    /// moved or deleted it through pecgate.
    Message {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// With or without the angle brackets.
        #[arg(long)]
        message_id: String,
        /// One JSON object (`message_id`, `events`) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Print events, oldest first.
    Show {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        mailbox: Option<String>,
        #[arg(long)]
        session: Option<String>,
        /// `YYYY-MM-DD` or RFC 3339.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        command: Option<String>,
        /// Only the most recent N events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Check { config, live } => check(&config, live),
        Command::HashPassword => hash_password(),
        Command::Vault { action } => vault_command(action),
        Command::Audit { action } => audit_command(action),
        Command::Ledger { action } => ledger_command(action),
        Command::Receipts { action } => receipts_command(action),
        Command::Sessions {
            config,
            json,
            action,
        } => sessions_command(&config, json, action),
        Command::ClientConfig {
            config,
            user,
            host,
            autoconfig,
        } => client_config(&config, &user, host, autoconfig),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("pecgate: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn sessions_command(
    path: &Path,
    json: bool,
    action: Option<SessionsAction>,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match action {
        Some(SessionsAction::Kick { user }) => {
            let state_dir = load_config(path)?.gateway.state_dir;
            let ended = runtime.block_on(pecgate::control::kick(&state_dir, &user))?;
            println!("{ended} session(s) of {user} ended");
        }
        None => {
            let state_dir = load_config(path)?.gateway.state_dir;
            let sessions = runtime.block_on(pecgate::control::sessions(&state_dir))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sessions)?);
            } else {
                println!(
                    "{:<16} {:<12} {:<12} {:<5} {:<22} {:<20} FOLDER",
                    "SESSION", "USER", "MAILBOX", "PROTO", "PEER", "SINCE"
                );
                for s in &sessions {
                    println!(
                        "{:<16} {:<12} {:<12} {:<5} {:<22} {:<20} {}",
                        s.session,
                        pecgate::text::escape(&s.user, false),
                        s.mailbox,
                        s.protocol,
                        s.peer,
                        s.since,
                        s.folder
                            .as_deref()
                            .map(|f| pecgate::text::escape(f, false).into_owned())
                            .unwrap_or_else(|| "-".to_owned())
                    );
                }
                println!("{} session(s)", sessions.len());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn client_config(
    path: &Path,
    user: &str,
    host: Option<String>,
    autoconfig: bool,
) -> anyhow::Result<ExitCode> {
    let config = load_config(path)?;
    let host = host.unwrap_or_else(pecgate::gateway::hostname);
    let settings = pecgate::client_config::settings(&config, user, &host)?;
    if autoconfig {
        print!(
            "{}",
            pecgate::client_config::thunderbird_autoconfig(&settings)
        );
    } else {
        print!("{}", pecgate::client_config::describe(&settings));
    }
    Ok(ExitCode::SUCCESS)
}

fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Keep secrets out of core dumps: no core file, and not dumpable by other processes.
fn forbid_core_dumps() {
    // SAFETY: plain libc calls with valid arguments; failure is harmless (best effort).
    unsafe {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// A gateway holds two sockets per session: lift the soft descriptor limit to the hard one.
fn raise_file_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn check(path: &Path, live: bool) -> anyhow::Result<ExitCode> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{}: configuration is invalid", path.display());
            eprintln!("{error}");
            return Ok(ExitCode::from(1));
        }
    };
    let mut problems = config.check_files();
    let mut warnings = config.warnings();
    // A mailbox without a vaulted password is a warning, as `serve` treats it: the other
    // mailboxes keep working, and logins to that one fail with a clear log line.
    match vault::load_key(&config.vault_key_path())
        .and_then(|key| Vault::open(&config.vault_path(), key))
    {
        Ok(vault) => {
            for name in config.mailboxes.keys().filter(|name| !vault.contains(name)) {
                warnings.push(pecgate::config::Problem {
                    key: format!("mailboxes.{name}"),
                    message: format!(
                        "no provider password in the vault (run `pecgate vault set {name}`)"
                    ),
                });
            }
        }
        Err(vault::VaultError::KeyMissing { .. }) if !config.vault_path().exists() => {
            warnings.push(pecgate::config::Problem {
                key: "gateway.vault_key".to_owned(),
                message: "no vault yet (run `pecgate vault set MAILBOX`)".to_owned(),
            });
        }
        Err(error) => problems.push(pecgate::config::Problem {
            key: "gateway.vault_key".to_owned(),
            message: error.to_string(),
        }),
    }
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    if !problems.is_empty() {
        eprintln!("{}: configuration has problems", path.display());
        for problem in &problems {
            eprintln!("{problem}");
        }
        return Ok(ExitCode::from(1));
    }
    println!("{}: configuration OK", path.display());
    print!("{}", config.summary());
    if live {
        return check_live(&config);
    }
    println!("access (folder patterns; `--live` lists the real folders):");
    for (user, mailbox) in user_mailboxes(&config) {
        println!(
            "  {user} on {mailbox}: permissions {}; folders {}",
            config.permissions(&user, &mailbox),
            config.folder_patterns(&user, &mailbox).join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn user_mailboxes(config: &Config) -> Vec<(String, String)> {
    config
        .users
        .keys()
        .flat_map(|user| {
            config
                .mailboxes_of(user)
                .into_iter()
                .map(move |mailbox| (user.clone(), mailbox.to_owned()))
        })
        .collect()
}

/// `check --live`: list every mailbox's folders on the provider and show what each user sees.
fn check_live(config: &Config) -> anyhow::Result<ExitCode> {
    use pecgate::imap::authorize::SessionPolicy;
    use pecgate::imap::listing::{ListRequest, visible_listing};
    use pecgate::imap::mutf7;
    use pecgate::policy::FolderPolicy;
    use pecgate::upstream;

    let key = vault::load_key(&config.vault_key_path())?;
    let vault = Vault::open(&config.vault_path(), key)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut failed = false;
    for (name, mailbox) in &config.mailboxes {
        let Some(password) = vault.get(name) else {
            println!("{name}: no provider password in the vault; skipped");
            failed = true;
            continue;
        };
        let tls = pecgate::tls::client_config(mailbox.ca_file.as_deref())?;
        let target = upstream::ProviderTarget {
            endpoint: &mailbox.imap,
            tls,
            login: &mailbox.login,
            password: password.expose(),
            timeout: std::time::Duration::from_secs(30),
        };
        let folders = runtime.block_on(async {
            let mut connection = upstream::connect(&target)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let folders = connection
                .list_all()
                .await
                .map_err(|e| anyhow::anyhow!("LIST on {}: {e}", mailbox.imap))?;
            connection.logout().await;
            anyhow::Ok(folders)
        });
        let folders = match folders {
            Ok(folders) => folders,
            Err(error) => {
                println!("{name}: {error:#}");
                failed = true;
                continue;
            }
        };
        println!("{name}: {} folders on {}", folders.len(), mailbox.imap);
        for (user, _) in user_mailboxes(config)
            .into_iter()
            .filter(|(_, m)| m == name)
        {
            // Exactly the answer a client of this user gets to `LIST "" "*"`.
            let policy = SessionPolicy {
                folders: FolderPolicy::new(&config.folder_patterns(&user, name)),
                permissions: config.permissions(&user, name),
                delimiter: folders.iter().find_map(|f| f.delimiter),
                provider_unselect: true,
                max_message_bytes: mailbox.max_message_bytes,
            };
            let everything = ListRequest {
                lsub: false,
                pattern: b"*".to_vec(),
            };
            let shown = visible_listing(&everything, &folders, &policy);
            println!("  {user} sees:");
            for folder in &shown {
                let text = mutf7::decode_canonical(&folder.wire)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&folder.wire).into_owned());
                if folder
                    .attributes
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case("\\Noselect"))
                {
                    println!("    {text}  (\\Noselect: parent of a visible folder)");
                } else {
                    println!("    {text}");
                }
            }
            if shown.is_empty() {
                println!("    (nothing)");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn hash_password() -> anyhow::Result<ExitCode> {
    let secret = password::read_password_interactive("Password: ", true)?;
    println!("{}", password::hash_password(secret.as_bytes())?);
    Ok(ExitCode::SUCCESS)
}

fn open_vault_for_edit(config: &Config) -> anyhow::Result<Vault> {
    std::fs::create_dir_all(&config.gateway.state_dir).with_context(|| {
        format!(
            "cannot create state_dir {}",
            config.gateway.state_dir.display()
        )
    })?;
    Ok(Vault::open_or_create(
        &config.vault_path(),
        &config.vault_key_path(),
    )?)
}

fn vault_command(action: VaultAction) -> anyhow::Result<ExitCode> {
    forbid_core_dumps();
    match action {
        VaultAction::Set { mailbox, config } => {
            let config = load_config(&config)?;
            if !config.mailboxes.contains_key(&mailbox) {
                bail!("mailbox {mailbox:?} is not in the configuration (mailboxes.{mailbox})");
            }
            let mut vault = open_vault_for_edit(&config)?;
            let prompt = format!("Provider password for {mailbox}: ");
            let secret = password::read_password_interactive(&prompt, true)?;
            vault.set(&mailbox, SecretString::new(secret.to_string()))?;
            eprintln!(
                "stored the provider password of {mailbox} in {}",
                vault.path().display()
            );
        }
        VaultAction::List { config } => {
            let config = load_config(&config)?;
            let key = vault::load_key(&config.vault_key_path())?;
            let vault = Vault::open(&config.vault_path(), key)?;
            for name in vault.names() {
                let note = if config.mailboxes.contains_key(&name) {
                    ""
                } else {
                    "  (not in the configuration)"
                };
                println!("{name}{note}");
            }
        }
        VaultAction::Remove { mailbox, config } => {
            let config = load_config(&config)?;
            let key = vault::load_key(&config.vault_key_path())?;
            let mut vault = Vault::open(&config.vault_path(), key)?;
            if !vault.remove(&mailbox)? {
                bail!("the vault holds no password for {mailbox:?}");
            }
            eprintln!("removed the provider password of {mailbox}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn audit_path(config: &Path) -> anyhow::Result<PathBuf> {
    Ok(load_config(config)?.gateway.state_dir.join("audit.sqlite"))
}

fn audit_command(action: AuditAction) -> anyhow::Result<ExitCode> {
    match action {
        AuditAction::Verify { config, anchor } => {
            let path = audit_path(&config)?;
            let anchor = match &anchor {
                Some(text) => {
                    let (id, hash) = text
                        .split_once(':')
                        .context("--anchor takes ID:HASH as printed by an earlier verify")?;
                    Some((
                        id.parse::<i64>().context("--anchor: ID is not a number")?,
                        hash,
                    ))
                }
                None => None,
            };
            let report = audit::verify_with_anchor(&path, anchor)?;
            println!("{report}");
            Ok(if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        AuditAction::Message {
            config,
            message_id,
            json,
        } => {
            let config = load_config(&config)?;
            let state = &config.gateway.state_dir;
            let timeline = pecgate::timeline::build(
                &message_id,
                Some(&state.join(ledger::LEDGER_FILE_NAME)),
                &state.join("audit.sqlite"),
            )?;
            print_either(json, &timeline, pecgate::timeline::format)
        }
        AuditAction::Show {
            config,
            user,
            mailbox,
            session,
            since,
            until,
            command,
            limit,
        } => {
            let path = audit_path(&config)?;
            let filter = QueryFilter {
                user,
                mailbox,
                session,
                since,
                until,
                command,
                outcome: None,
                limit: Some(limit),
            };
            for event in audit::query(&path, &filter)? {
                println!("{}", audit::format_event_line(&event));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// glibc raises its mmap threshold after large blocks are freed, after which argon2's 19 MiB
/// buffers come from the heap arenas and are never returned: a burst of logins left the
/// daemon at ~1 GiB RSS (measured with scripts/bench.sh). A fixed threshold keeps large
/// blocks mmapped, so they go back to the system when freed.
fn pin_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt is safe to call at any time; 128 KiB is glibc's default threshold.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn ledger_command(action: LedgerAction) -> anyhow::Result<ExitCode> {
    match action {
        LedgerAction::Show {
            config,
            user,
            mailbox,
            message_id,
            limit,
        } => {
            let path = load_config(&config)?
                .gateway
                .state_dir
                .join(ledger::LEDGER_FILE_NAME);
            if !path.exists() {
                bail!("no sent ledger at {} yet", path.display());
            }
            let filter = LedgerFilter {
                user,
                mailbox,
                message_id,
                limit: Some(limit),
            };
            for entry in ledger::query(&path, &filter)? {
                println!("{}", ledger::format_entry(&entry));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The sent ledger's reports, for `pecgate receipts`.
fn reports(config: &Config) -> anyhow::Result<ledger::Reports> {
    let path = config.gateway.state_dir.join(ledger::LEDGER_FILE_NAME);
    if !path.exists() {
        bail!("no sent ledger at {} yet", path.display());
    }
    Ok(ledger::Reports::open(&path)?)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `value` as JSON (`--json`) or as the text `table` makes of it.
fn print_either<T: serde::Serialize + ?Sized>(
    json: bool,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<ExitCode> {
    if json {
        print_json(&value)?;
    } else {
        print!("{}", table(value));
    }
    Ok(ExitCode::SUCCESS)
}

fn receipts_command(action: ReceiptsAction) -> anyhow::Result<ExitCode> {
    use pecgate::receipts::report;
    match action {
        ReceiptsAction::Show {
            config,
            message_id,
            mailbox,
            json,
        } => {
            let found = reports(&load_config(&config)?)?
                .show(&message_id, &ledger::ReportFilter { mailbox })?;
            if found.is_empty() {
                eprintln!("no message or receipt with Message-ID {message_id}");
                return Ok(ExitCode::from(1));
            }
            match found.as_slice() {
                // The one message as an object, as scripts expect; several as an array.
                [one] if json => print_json(one).map(|()| ExitCode::SUCCESS),
                all => print_either(json, all, report::format_messages),
            }
        }
        ReceiptsAction::Pending {
            config,
            older_than,
            mailbox,
            json,
        } => {
            let span = pecgate::config::parse_span(&older_than)
                .map_err(|reason| anyhow::anyhow!("--older-than: {reason}"))?;
            let found = reports(&load_config(&config)?)?
                .pending(span, &ledger::ReportFilter { mailbox })?;
            print_either(json, found.as_slice(), report::format_messages)
        }
        ReceiptsAction::Unmatched {
            config,
            mailbox,
            json,
        } => {
            let found =
                reports(&load_config(&config)?)?.unmatched(&ledger::ReportFilter { mailbox })?;
            print_either(json, found.as_slice(), report::format_receipts)
        }
        ReceiptsAction::Unclassified { config, json } => {
            let archive = load_config(&config)?.gateway.state_dir.join("archive");
            let found = pecgate::receipts::archive::unclassified(&archive)?;
            print_either(json, found.as_slice(), report::format_archived)
        }
        ReceiptsAction::Export {
            config,
            since,
            out,
            mailbox,
        } => {
            let config = load_config(&config)?;
            let since = audit::normalize_time_bound(&since).context("--since")?;
            let found = reports(&config)?.since(&since, &ledger::ReportFilter { mailbox })?;
            let archive = config.gateway.state_dir.join("archive");
            let count = report::export(&found, &archive, &out)?;
            println!(
                "{count} receipts exported to {} (manifest.json, SHA256SUMS)",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn serve(path: &Path) -> anyhow::Result<ExitCode> {
    forbid_core_dumps();
    raise_file_limit();
    pin_mmap_threshold();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a journal or a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = load_config(path)?;
    let state_dir = config.gateway.state_dir.clone();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create state_dir {}", state_dir.display()))?;

    let (vault, existed) = vault::open_or_empty(&config.vault_key_path(), &config.vault_path())?;
    if !existed {
        tracing::warn!("no vault yet: run `pecgate vault set MAILBOX` for each mailbox");
    }
    let (audit_log, audit_writer) = AuditLog::open(&state_dir.join("audit.sqlite"))?;
    let sent_ledger = Ledger::open(&state_dir.join(ledger::LEDGER_FILE_NAME))?;
    let body_cache = match config.gateway.body_cache_bytes {
        0 => None,
        budget => Some(pecgate::body_cache::BodyCache::open(
            &state_dir.join("cache").join("bodies"),
            budget,
            config.gateway.min_free_space_bytes,
        )?),
    };
    let spool_dir = state_dir.join("spool");
    pecgate::smtp::spool::clean(&spool_dir)
        .with_context(|| format!("cannot prepare the spool directory {}", spool_dir.display()))?;
    let grace = config.gateway.shutdown_grace;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pecgate")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let carried = Carried::new(&config, audit_log, Some(sent_ledger), body_cache);
        let gateway = Arc::new(Gateway::new(config, &carried, &vault)?);
        drop(vault);
        let listeners = Listeners::bind(&gateway).await?;
        let live = Live::new(gateway);
        let shutdown = CancellationToken::new();
        // Installed before "ready": a SIGHUP sent the moment pecgate says it is ready must
        // reload it, not kill it (SIGHUP's default action).
        let signals = Signals::install().context("cannot install signal handlers")?;
        let signals = tokio::spawn(handle_signals(
            signals,
            path.to_owned(),
            live.clone(),
            shutdown.clone(),
        ));
        tracing::info!("pecgate ready");
        pecgate::notify::notify("READY=1");
        server::run(live, listeners, shutdown, grace).await;
        signals.abort();
        anyhow::Ok(())
    })?;
    drop(runtime);
    let written = audit_writer.shutdown()?;
    tracing::info!(written, "audit log flushed; pecgate stopped");
    Ok(ExitCode::SUCCESS)
}

/// The signals pecgate handles.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// SIGTERM/SIGINT stop pecgate; SIGHUP reloads the configuration and the vault.
async fn handle_signals(
    signals: Signals,
    config: PathBuf,
    live: Live,
    shutdown: CancellationToken,
) {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading");
                // Refusals are logged and audited by `reload`; pecgate keeps running.
                let _ = pecgate::reload::reload(&config, &live).await;
                continue;
            }
        }
        break;
    }
    pecgate::notify::notify("STOPPING=1");
    shutdown.cancel();
}
