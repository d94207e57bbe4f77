//! The transport both provider clients share (IMAP in [`crate::upstream`], SMTP in
//! [`crate::smtp::provider`]): the TCP connection to an endpoint (NODELAY) and the TLS session
//! over it, verified against the mailbox's trust roots, each within a time limit; and the
//! errors of doing so, which each protocol's error type wraps.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::{UpstreamEndpoint, UpstreamSecurity};
use crate::io::{AsyncStream, BoxStream};

/// Why the transport to a provider failed. Never carries the password.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("{endpoint} did not answer within {seconds} s")]
    Timeout { endpoint: String, seconds: u64 },
    #[error("TLS with {endpoint} failed: {source}")]
    Tls {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("{endpoint}: invalid host name for TLS")]
    ServerName { endpoint: String },
}

impl TransportError {
    /// `endpoint` (as displayed) gave no answer within `timeout`.
    pub fn timeout(endpoint: &str, timeout: Duration) -> TransportError {
        TransportError::Timeout {
            endpoint: endpoint.to_owned(),
            seconds: timeout.as_secs(),
        }
    }
}

/// Open the connection to `endpoint`: TCP (NODELAY) within `timeout`, then, for an
/// implicit-TLS endpoint, TLS within `timeout` again. A STARTTLS endpoint's stream is returned
/// plain, for the protocol to upgrade with [`connect_tls`] once the provider agrees.
pub async fn connect(
    endpoint: &UpstreamEndpoint,
    tls: &Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<BoxStream, TransportError> {
    let tcp = connect_tcp(endpoint, timeout).await?;
    Ok(match endpoint.security {
        UpstreamSecurity::ImplicitTls => Box::new(connect_tls(endpoint, tls, tcp, timeout).await?),
        UpstreamSecurity::StartTls => Box::new(tcp),
    })
}

async fn connect_tcp(
    endpoint: &UpstreamEndpoint,
    timeout: Duration,
) -> Result<TcpStream, TransportError> {
    let connect = async {
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| TransportError::timeout(&endpoint.to_string(), timeout))?
        .map_err(|source| TransportError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })
}

/// Start TLS with `endpoint` over `io` within `timeout`, verifying the provider's
/// certificate for the endpoint's host name against `tls`'s roots.
pub async fn connect_tls<S: AsyncStream + 'static>(
    endpoint: &UpstreamEndpoint,
    tls: &Arc<rustls::ClientConfig>,
    io: S,
    timeout: Duration,
) -> Result<TlsStream<S>, TransportError> {
    let name =
        ServerName::try_from(endpoint.host.clone()).map_err(|_| TransportError::ServerName {
            endpoint: endpoint.to_string(),
        })?;
    let connect = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, io);
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| TransportError::timeout(&endpoint.to_string(), timeout))?
        .map_err(|source| TransportError::Tls {
            endpoint: endpoint.to_string(),
            source,
        })
}
