//! Relaying one message to the provider's SMTP server: TLS (implicit, or mandatory
//! STARTTLS) verified against the mailbox's trust roots, EHLO, AUTH with the vaulted
//! credentials, then MAIL / RCPT / DATA with the spooled message dot-stuffed on the way.
//!
//! The provider's negative answers to MAIL, RCPT and DATA are results, not errors: they are
//! relayed to the client as they are. [`ProviderError`] means no answer could be had (nothing
//! was sent), which the client gets as a 4xx.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::BytesMut;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_SIZE, EXT_START_TLS, EhloResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::config::{UpstreamEndpoint, UpstreamSecurity};
use crate::io::{self, BoxStream};
use crate::provider_io::{self, TransportError};

use super::data::DotStuffer;
use super::reply::{Reply, reply_end};
use super::spool::SpoolFile;

/// Largest reply accepted from the provider.
const MAX_REPLY: usize = 64 * 1024;
/// How long one write of message data may take (RFC 5321 §4.5.3.2.5: 3 minutes per block).
const DATA_BLOCK_TIMEOUT: Duration = Duration::from_secs(180);
/// Size of the chunks read from the spool.
const CHUNK: usize = 64 * 1024;

/// Why the provider could not be reached or used. Never carries the password.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// TCP, TLS or a time limit.
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{endpoint} refused the session: {reply}")]
    Refused { endpoint: String, reply: String },
    #[error("{endpoint} does not offer STARTTLS, which pecgate requires for smtp:// URLs")]
    NoStartTls { endpoint: String },
    #[error("{endpoint} offers neither AUTH PLAIN nor AUTH LOGIN")]
    NoAuth { endpoint: String },
    #[error("{endpoint} rejected the login of {login}: {reply}")]
    LoginRejected {
        endpoint: String,
        login: String,
        reply: String,
    },
    #[error("{endpoint}: protocol error: {reason}")]
    Protocol { endpoint: String, reason: String },
    #[error("reading the spooled message: {0}")]
    Spool(std::io::Error),
    /// The end of the message went out and no answer came back: the provider may have
    /// accepted it (and may send it) or not. Never to be reported as "nothing was sent".
    #[error("{endpoint}: no answer after the end of the message ({reason}): it may have been sent")]
    OutcomeUnknown { endpoint: String, reason: String },
}

impl ProviderError {
    /// Whether the provider refused pecgate's own login (a configuration problem for IT, not
    /// an outage).
    pub fn is_login_rejected(&self) -> bool {
        matches!(
            self,
            ProviderError::LoginRejected { .. } | ProviderError::NoAuth { .. }
        )
    }

    /// Whether the message may have been sent in spite of the error.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, ProviderError::OutcomeUnknown { .. })
    }
}

/// Where and as whom to relay.
pub struct SmtpTarget<'a> {
    pub endpoint: &'a UpstreamEndpoint,
    pub tls: Arc<rustls::ClientConfig>,
    pub login: &'a str,
    pub password: &'a str,
    /// Connect, greeting, EHLO, AUTH and per-command timeout.
    pub timeout: Duration,
    /// The name pecgate gives in EHLO.
    pub hostname: &'a str,
}

/// What to relay.
pub struct Envelope<'a> {
    pub from: &'a str,
    pub recipients: &'a [String],
    pub eight_bit: bool,
    /// Bytes sent before the spooled message (pecgate's trace and Message-ID headers).
    pub prefix: &'a [u8],
    pub spool: &'a SpoolFile,
    pub size: u64,
}

struct Connection<'a> {
    stream: BoxStream,
    buffer: BytesMut,
    endpoint: &'a str,
    timeout: Duration,
    size_supported: bool,
    eight_bit_supported: bool,
}

impl Connection<'_> {
    fn protocol(&self, reason: impl Into<String>) -> ProviderError {
        ProviderError::Protocol {
            endpoint: self.endpoint.to_owned(),
            reason: reason.into(),
        }
    }

    fn timed_out(&self, timeout: Duration) -> ProviderError {
        TransportError::timeout(self.endpoint, timeout).into()
    }

    /// Read one complete reply; returns its raw bytes and the parsed reply.
    async fn reply_within(&mut self, timeout: Duration) -> Result<(Vec<u8>, Reply), ProviderError> {
        let read = async {
            loop {
                if let Some(end) = reply_end(&self.buffer) {
                    let raw = self.buffer.split_to(end).to_vec();
                    return match Reply::parse(&raw) {
                        Some(reply) => Ok((raw, reply)),
                        None => Err(self.protocol(format!(
                            "unparseable reply {:?}",
                            String::from_utf8_lossy(&raw[..raw.len().min(200)])
                        ))),
                    };
                }
                if self.buffer.len() > MAX_REPLY {
                    return Err(self.protocol("reply too long"));
                }
                match io::fill(&mut self.stream, &mut self.buffer).await {
                    Ok(true) => {}
                    Ok(false) => return Err(self.protocol("connection closed")),
                    Err(e) => return Err(self.protocol(e.to_string())),
                }
            }
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| self.timed_out(timeout))?
    }

    async fn reply(&mut self) -> Result<(Vec<u8>, Reply), ProviderError> {
        self.reply_within(self.timeout).await
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ProviderError> {
        let timeout = self.timeout;
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.protocol(e.to_string())),
            Err(_) => Err(self.timed_out(timeout)),
        }
    }

    async fn command(&mut self, line: &[u8]) -> Result<(Vec<u8>, Reply), ProviderError> {
        self.send(line).await?;
        self.reply().await
    }

    async fn ehlo(&mut self, hostname: &str) -> Result<EhloResponse<String>, ProviderError> {
        let (raw, reply) = self
            .command(format!("EHLO {hostname}\r\n").as_bytes())
            .await?;
        if reply.code != 250 {
            return Err(ProviderError::Refused {
                endpoint: self.endpoint.to_owned(),
                reply: reply.summary(),
            });
        }
        EhloResponse::parse(&mut raw.iter()).map_err(|e| self.protocol(format!("EHLO reply: {e}")))
    }

    async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            self.send(b"QUIT\r\n").await?;
            self.reply().await
        })
        .await;
    }
}

/// Relay one message. `Ok` carries the provider's final answer (positive or not).
pub async fn relay(
    target: &SmtpTarget<'_>,
    envelope: &Envelope<'_>,
) -> Result<Reply, ProviderError> {
    let endpoint = target.endpoint.to_string();
    let mut conn = connect(target, &endpoint).await?;
    let result = transaction(&mut conn, envelope).await;
    if result.is_ok() {
        conn.quit().await;
    }
    result
}

async fn connect<'a>(
    target: &SmtpTarget<'_>,
    endpoint: &'a str,
) -> Result<Connection<'a>, ProviderError> {
    let stream = provider_io::connect(target.endpoint, &target.tls, target.timeout).await?;
    let mut conn = Connection {
        stream,
        buffer: BytesMut::with_capacity(4096),
        endpoint,
        timeout: target.timeout,
        size_supported: false,
        eight_bit_supported: false,
    };
    let (_, greeting) = conn.reply().await?;
    if greeting.code != 220 {
        return Err(ProviderError::Refused {
            endpoint: endpoint.to_owned(),
            reply: greeting.summary(),
        });
    }
    let mut ehlo = conn.ehlo(target.hostname).await?;
    if target.endpoint.security == UpstreamSecurity::StartTls {
        if !ehlo.has_capability(EXT_START_TLS) {
            return Err(ProviderError::NoStartTls {
                endpoint: endpoint.to_owned(),
            });
        }
        let (_, reply) = conn.command(b"STARTTLS\r\n").await?;
        if reply.code != 220 {
            return Err(ProviderError::Refused {
                endpoint: endpoint.to_owned(),
                reply: reply.summary(),
            });
        }
        if !conn.buffer.is_empty() {
            // Bytes before the handshake could be an injection attempt.
            return Err(conn.protocol("data after the STARTTLS answer"));
        }
        let plain = conn.stream;
        conn.stream = Box::new(
            provider_io::connect_tls(target.endpoint, &target.tls, plain, target.timeout).await?,
        );
        ehlo = conn.ehlo(target.hostname).await?;
    }
    authenticate(&mut conn, target, &ehlo).await?;
    conn.size_supported = ehlo.has_capability(EXT_SIZE);
    conn.eight_bit_supported = ehlo.has_capability(EXT_8BIT_MIME);
    Ok(conn)
}

async fn authenticate(
    conn: &mut Connection<'_>,
    target: &SmtpTarget<'_>,
    ehlo: &EhloResponse<String>,
) -> Result<(), ProviderError> {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let rejected = |reply: &Reply| ProviderError::LoginRejected {
        endpoint: conn.endpoint.to_owned(),
        login: target.login.to_owned(),
        reply: reply.summary(),
    };
    let reply = if ehlo.auth_mechanisms & AUTH_PLAIN != 0 {
        let mut token = Zeroizing::new(Vec::with_capacity(target.login.len() * 2 + 64));
        token.push(0);
        token.extend_from_slice(target.login.as_bytes());
        token.push(0);
        token.extend_from_slice(target.password.as_bytes());
        let line = Zeroizing::new(format!("AUTH PLAIN {}\r\n", b64(&token)));
        conn.command(line.as_bytes()).await?.1
    } else if ehlo.auth_mechanisms & AUTH_LOGIN != 0 {
        let (_, reply) = conn.command(b"AUTH LOGIN\r\n").await?;
        if reply.code != 334 {
            return Err(rejected(&reply));
        }
        let (_, reply) = conn
            .command(format!("{}\r\n", b64(target.login.as_bytes())).as_bytes())
            .await?;
        if reply.code != 334 {
            return Err(rejected(&reply));
        }
        let line = Zeroizing::new(format!("{}\r\n", b64(target.password.as_bytes())));
        conn.command(line.as_bytes()).await?.1
    } else {
        return Err(ProviderError::NoAuth {
            endpoint: conn.endpoint.to_owned(),
        });
    };
    if reply.code != 235 {
        return Err(rejected(&reply));
    }
    Ok(())
}

/// MAIL, RCPT, DATA. A negative answer ends the transaction (with RSET) and is returned.
async fn transaction(
    conn: &mut Connection<'_>,
    envelope: &Envelope<'_>,
) -> Result<Reply, ProviderError> {
    let mut mail = format!("MAIL FROM:<{}>", envelope.from);
    if conn.size_supported {
        mail.push_str(&format!(" SIZE={}", envelope.size));
    }
    if envelope.eight_bit && conn.eight_bit_supported {
        mail.push_str(" BODY=8BITMIME");
    }
    mail.push_str("\r\n");
    let (_, reply) = conn.command(mail.as_bytes()).await?;
    if !reply.is_positive() {
        return Ok(reply);
    }
    for rcpt in envelope.recipients {
        let (_, reply) = conn
            .command(format!("RCPT TO:<{rcpt}>\r\n").as_bytes())
            .await?;
        if !reply.is_positive() {
            let _ = conn.command(b"RSET\r\n").await;
            return Ok(reply);
        }
    }
    let (_, reply) = conn.command(b"DATA\r\n").await?;
    if reply.code != 354 {
        if !reply.is_positive() {
            return Ok(reply);
        }
        return Err(conn.protocol(format!("unexpected answer to DATA: {}", reply.summary())));
    }
    send_message(conn, envelope).await?;
    // RFC 5321 §4.5.3.2.6 suggests waiting 10 minutes for this answer; clients give up long
    // before (Thunderbird: 100 s) and would retry a message that may have left. pecgate waits
    // the provider timeout and then says honestly that the outcome is unknown.
    let timeout = conn.timeout;
    match conn.reply_within(timeout).await {
        Ok((_, reply)) => Ok(reply),
        Err(error) => Err(ProviderError::OutcomeUnknown {
            endpoint: conn.endpoint.to_owned(),
            reason: error.to_string(),
        }),
    }
}

/// Stream prefix + spool, dot-stuffed, then the end-of-data line. Memory: one chunk.
async fn send_message(
    conn: &mut Connection<'_>,
    envelope: &Envelope<'_>,
) -> Result<(), ProviderError> {
    let mut stuffer = DotStuffer::default();
    let mut out = Vec::with_capacity(CHUNK + CHUNK / 8);
    stuffer.push(envelope.prefix, &mut out);
    let mut file = envelope.spool.open().await.map_err(ProviderError::Spool)?;
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut chunk).await.map_err(ProviderError::Spool)?;
        if n == 0 {
            break;
        }
        stuffer.push(&chunk[..n], &mut out);
        write_block(conn, &out).await?;
        out.clear();
    }
    out.extend_from_slice(stuffer.finish());
    // Once any of the end-of-data line may have gone out, the outcome is no longer known.
    write_block(conn, &out)
        .await
        .map_err(|error| ProviderError::OutcomeUnknown {
            endpoint: conn.endpoint.to_owned(),
            reason: error.to_string(),
        })
}

async fn write_block(conn: &mut Connection<'_>, bytes: &[u8]) -> Result<(), ProviderError> {
    match tokio::time::timeout(DATA_BLOCK_TIMEOUT, conn.stream.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(conn.protocol(e.to_string())),
        Err(_) => Err(conn.timed_out(DATA_BLOCK_TIMEOUT)),
    }
}
