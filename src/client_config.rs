//! What an employee types into a mail client, per mailbox they may use, from the
//! configuration: `pecgate client-config --user NAME` prints it, and a Thunderbird
//! autoconfig file (`config-v1.1.xml`) that IT can publish so that Thunderbird fills
//! everything in by itself. Pure: the configuration and a host name in, text out.

use std::fmt::Write as _;

use crate::config::Config;

/// Why no settings can be given.
#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    #[error("users.{0}: no such user")]
    UnknownUser(String),
    #[error("users.{0}: the user is disabled")]
    Disabled(String),
    #[error("users.{0}: the user's roles grant no mailbox")]
    NoMailbox(String),
}

/// One mailbox's settings for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxSettings {
    pub mailbox: String,
    pub address: String,
    /// What the user logs in as: `user`, or `user/mailbox` when they have several.
    pub login: String,
    /// Whether the user may send through this mailbox (`send` permission and an SMTP URL).
    pub can_send: bool,
    /// Whether the mailbox has an SMTP URL at all.
    pub smtp_configured: bool,
}

/// A user's settings on every mailbox they may use, and where pecgate listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub host: String,
    pub imaps_port: Option<u16>,
    pub imap_starttls_port: Option<u16>,
    pub smtps_port: Option<u16>,
    pub submission_port: Option<u16>,
    pub mailboxes: Vec<MailboxSettings>,
}

/// The settings of `user`, clients connecting to `host`.
pub fn settings(config: &Config, user: &str, host: &str) -> Result<Settings, ClientConfigError> {
    let account = config
        .users
        .get(user)
        .ok_or_else(|| ClientConfigError::UnknownUser(user.to_owned()))?;
    if account.disabled {
        return Err(ClientConfigError::Disabled(user.to_owned()));
    }
    let granted = config.mailboxes_of(user);
    if granted.is_empty() {
        return Err(ClientConfigError::NoMailbox(user.to_owned()));
    }
    let several = granted.len() > 1;
    let mailboxes = granted
        .into_iter()
        .map(|name| {
            let mailbox = &config.mailboxes[name];
            MailboxSettings {
                mailbox: name.to_owned(),
                address: mailbox.address.clone(),
                login: if several {
                    format!("{user}/{name}")
                } else {
                    user.to_owned()
                },
                smtp_configured: mailbox.smtp.is_some(),
                can_send: mailbox.smtp.is_some()
                    && config
                        .permissions(user, name)
                        .has(crate::config::Permission::Send),
            }
        })
        .collect();
    let port = |list: &[std::net::SocketAddr]| list.first().map(|a| a.port());
    Ok(Settings {
        host: host.to_owned(),
        imaps_port: port(&config.imap.listen_tls),
        imap_starttls_port: port(&config.imap.listen_starttls),
        smtps_port: port(&config.smtp.listen_tls),
        submission_port: port(&config.smtp.listen_starttls),
        mailboxes,
    })
}

/// The settings as a person reads them.
pub fn describe(s: &Settings) -> String {
    let mut out = String::new();
    for m in &s.mailboxes {
        let _ = writeln!(out, "Mailbox {} ({})", m.mailbox, m.address);
        let _ = writeln!(out, "  Name shown: your name; address: {}", m.address);
        match (s.imaps_port, s.imap_starttls_port) {
            (Some(port), _) => {
                let _ = writeln!(out, "  Incoming (IMAP): {}, port {port}, SSL/TLS", s.host);
            }
            (None, Some(port)) => {
                let _ = writeln!(out, "  Incoming (IMAP): {}, port {port}, STARTTLS", s.host);
            }
            (None, None) => {}
        }
        if m.can_send {
            match (s.smtps_port, s.submission_port) {
                (Some(port), _) => {
                    let _ = writeln!(out, "  Outgoing (SMTP): {}, port {port}, SSL/TLS", s.host);
                }
                (None, Some(port)) => {
                    let _ = writeln!(out, "  Outgoing (SMTP): {}, port {port}, STARTTLS", s.host);
                }
                (None, None) => {
                    let _ = writeln!(out, "  Outgoing (SMTP): not offered by this gateway");
                }
            }
        } else if m.smtp_configured {
            let _ = writeln!(out, "  Outgoing (SMTP): not allowed for this user");
        } else {
            let _ = writeln!(out, "  Outgoing (SMTP): this mailbox has no sending set up");
        }
        let _ = writeln!(
            out,
            "  User name: {} (your own pecgate password, normal password authentication)",
            m.login
        );
    }
    out
}

/// XML-escape `text` for an element's content or an attribute value.
fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A Thunderbird autoconfig file (`config-v1.1.xml`, served at
/// `https://autoconfig.DOMAIN/mail/config-v1.1.xml`) with one provider per mailbox.
pub fn thunderbird_autoconfig(s: &Settings) -> String {
    let mut out = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<clientConfig version=\"1.1\">\n",
    );
    for m in &s.mailboxes {
        let domain = m.address.rsplit('@').next().unwrap_or_default();
        let _ = writeln!(out, "  <emailProvider id=\"{}\">", xml(domain));
        let _ = writeln!(out, "    <domain>{}</domain>", xml(domain));
        let _ = writeln!(
            out,
            "    <displayName>PEC {} (pecgate)</displayName>",
            xml(&m.mailbox)
        );
        let server = |out: &mut String, kind: &str, port: u16, socket: &str| {
            let tag = if kind == "imap" {
                "incomingServer"
            } else {
                "outgoingServer"
            };
            let _ = writeln!(out, "    <{tag} type=\"{kind}\">");
            let _ = writeln!(out, "      <hostname>{}</hostname>", xml(&s.host));
            let _ = writeln!(out, "      <port>{port}</port>");
            let _ = writeln!(out, "      <socketType>{socket}</socketType>");
            let _ = writeln!(out, "      <username>{}</username>", xml(&m.login));
            let _ = writeln!(
                out,
                "      <authentication>password-cleartext</authentication>"
            );
            let _ = writeln!(out, "    </{tag}>");
        };
        match (s.imaps_port, s.imap_starttls_port) {
            (Some(port), _) => server(&mut out, "imap", port, "SSL"),
            (None, Some(port)) => server(&mut out, "imap", port, "STARTTLS"),
            (None, None) => {}
        }
        if m.can_send {
            match (s.smtps_port, s.submission_port) {
                (Some(port), _) => server(&mut out, "smtp", port, "SSL"),
                (None, Some(port)) => server(&mut out, "smtp", port, "STARTTLS"),
                (None, None) => {}
            }
        }
        out.push_str("  </emailProvider>\n");
    }
    out.push_str("</clientConfig>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[gateway]
state_dir = "s"
[tls]
cert = "c"
key = "k"
[imap]
listen_tls = ["0.0.0.0:993"]
listen_starttls = ["0.0.0.0:143"]
[smtp]
listen_tls = ["0.0.0.0:465"]
[mailboxes.studio]
address = "studio@pec.example.it"
login = "studio"
imap = "imaps://h"
smtp = "smtps://h"
[mailboxes.legal]
address = "legal&co@pec.example.it"
login = "legal"
imap = "imaps://h"
[roles.all]
mailboxes = ["studio", "legal"]
permissions = ["read", "send"]
[roles.one]
mailboxes = ["studio"]
permissions = ["read"]
[users.anna]
password = "$argon2id$v=19$m=19456,t=2,p=1$VHjHv64CViNy8yoyEAVadg$nbSDqcWNHaZIp/bmbEnvNj0ZvQK273Ydu8Nym4+pLw8"
roles = ["all"]
[users.mario]
password = "$argon2id$v=19$m=19456,t=2,p=1$VHjHv64CViNy8yoyEAVadg$nbSDqcWNHaZIp/bmbEnvNj0ZvQK273Ydu8Nym4+pLw8"
roles = ["one"]
"#;

    fn config() -> Config {
        Config::parse(CONFIG, std::path::Path::new("/etc/pecgate")).unwrap()
    }

    #[test]
    fn one_mailbox_logs_in_as_the_user_several_as_user_slash_mailbox() {
        let c = config();
        let mario = settings(&c, "mario", "mail.example.it").unwrap();
        assert_eq!(mario.mailboxes.len(), 1);
        assert_eq!(mario.mailboxes[0].login, "mario");
        assert!(!mario.mailboxes[0].can_send);
        assert_eq!((mario.imaps_port, mario.smtps_port), (Some(993), Some(465)));
        let text = describe(&mario);
        assert!(
            text.contains("Incoming (IMAP): mail.example.it, port 993, SSL/TLS"),
            "{text}"
        );
        assert!(text.contains("not allowed for this user"), "{text}");
        let anna = settings(&c, "anna", "mail.example.it").unwrap();
        let logins: Vec<&str> = anna.mailboxes.iter().map(|m| m.login.as_str()).collect();
        assert_eq!(logins, ["anna/legal", "anna/studio"]);
        // Sending needs the permission and an SMTP URL on the mailbox.
        let sends: Vec<bool> = anna.mailboxes.iter().map(|m| m.can_send).collect();
        assert_eq!(sends, [false, true]);
        assert!(matches!(
            settings(&c, "ghost", "h"),
            Err(ClientConfigError::UnknownUser(_))
        ));
    }

    #[test]
    fn autoconfig_is_escaped_xml_with_one_provider_per_mailbox() {
        let c = config();
        let xml = thunderbird_autoconfig(&settings(&c, "anna", "mail.example.it").unwrap());
        assert!(xml.starts_with("<?xml"));
        assert_eq!(xml.matches("<emailProvider").count(), 2);
        assert!(xml.contains("<username>anna/studio</username>"));
        assert!(xml.contains("<socketType>SSL</socketType>"));
        // Text from the configuration or the command line is escaped.
        let odd = thunderbird_autoconfig(&settings(&c, "anna", "mail<&>\"example").unwrap());
        assert!(
            odd.contains("<hostname>mail&lt;&amp;&gt;&quot;example</hostname>"),
            "{odd}"
        );
        assert!(xml.contains("<domain>pec.example.it</domain>"));
        assert_eq!(xml.matches("<outgoingServer").count(), 1);
    }
}
