//! Listeners, the accept loop and graceful shutdown, for IMAP and SMTP alike.
//!
//! Every listener is bound before the daemon reports ready, so a wrong address fails start-up
//! instead of failing later. Accepting is limited by the gateway's [`Admission`] shared by both
//! protocols: a new connection needs a pre-login place (`max_preauth_connections`, and
//! `max_preauth_per_address` from one address), which becomes a session at login
//! (`max_sessions`, `max_sessions_per_user`); the session task holds its ticket until it ends,
//! and dropping it gives the place back. All tasks are tracked: on
//! shutdown the accept loops stop, every session says goodbye at its next response boundary
//! (`* BYE` / `421`), and `run` returns once they are gone (or the grace period is over).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gateway::Gateway;
use crate::guard::AdmissionRefused;
use crate::session::ListenerKind;

/// Which protocol a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Imap,
    Smtp,
}

impl Service {
    /// What a plain-text (STARTTLS-port) client is told when it is not admitted.
    fn busy_line(self, refused: AdmissionRefused) -> &'static [u8] {
        match (self, refused) {
            (Service::Imap, AdmissionRefused::AddressFull) => {
                b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
            }
            (Service::Imap, _) => b"* BYE [UNAVAILABLE] Too many connections to pecgate\r\n",
            (Service::Smtp, AdmissionRefused::AddressFull) => {
                b"421 4.7.0 Too many connections from your address, try again later\r\n"
            }
            (Service::Smtp, _) => b"421 4.3.2 Too many connections to pecgate, try again later\r\n",
        }
    }
}

/// Errors starting the listeners.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {address} ({key}): {source}")]
    Bind {
        address: SocketAddr,
        key: &'static str,
        source: std::io::Error,
    },
}

/// Bound listeners, ready to serve.
pub struct Listeners {
    bound: Vec<(TcpListener, Service, ListenerKind, &'static str)>,
}

impl Listeners {
    /// Bind every configured address.
    pub async fn bind(gateway: &Gateway) -> Result<Listeners, ServerError> {
        let mut bound = Vec::new();
        let (imap, smtp) = (&gateway.config.imap, &gateway.config.smtp);
        let kinds = [
            (
                "imap.listen_tls",
                &imap.listen_tls,
                Service::Imap,
                ListenerKind::ImplicitTls,
            ),
            (
                "imap.listen_starttls",
                &imap.listen_starttls,
                Service::Imap,
                ListenerKind::StartTls,
            ),
            (
                "smtp.listen_tls",
                &smtp.listen_tls,
                Service::Smtp,
                ListenerKind::ImplicitTls,
            ),
            (
                "smtp.listen_starttls",
                &smtp.listen_starttls,
                Service::Smtp,
                ListenerKind::StartTls,
            ),
        ];
        for (key, addresses, service, kind) in kinds {
            for &address in addresses {
                let listener =
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| ServerError::Bind {
                            address,
                            key,
                            source,
                        })?;
                bound.push((listener, service, kind, key));
            }
        }
        Ok(Listeners { bound })
    }

    /// The bound addresses (with the real port where 0 was configured) and the config key
    /// each comes from (`imap.listen_tls`...).
    pub fn addresses(&self) -> Vec<(SocketAddr, &'static str)> {
        self.bound
            .iter()
            .filter_map(|(l, _, _, key)| l.local_addr().ok().map(|a| (a, *key)))
            .collect()
    }
}

/// Serve until `shutdown` is cancelled, then wait (up to `grace`) for sessions to end.
pub async fn run(
    gateway: Arc<Gateway>,
    listeners: Listeners,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let tracker = TaskTracker::new();
    tracker.spawn(crate::disk::watch_free_space(
        gateway.config.gateway.state_dir.clone(),
        gateway.config.gateway.min_free_space_bytes,
        shutdown.clone(),
    ));
    for (listener, service, kind, _) in listeners.bound {
        tracker.spawn(accept_loop(
            gateway.clone(),
            listener,
            service,
            kind,
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    shutdown.cancelled().await;
    tracker.close();
    tracing::info!(
        sessions = tracker.len(),
        "shutting down: waiting for sessions to end"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = tracker.len(),
            "sessions still running after the grace period; exiting anyway"
        );
    }
}

async fn accept_loop(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    service: Service,
    kind: ListenerKind,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let (mut tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ticket = match gateway.admission.admit(peer.ip()) {
            Ok(ticket) => ticket,
            Err(refused) => {
                tracing::warn!(%peer, ?service, %refused, "connection refused");
                if kind == ListenerKind::StartTls {
                    // Best effort and bounded: a client that does not read must not stall
                    // the accept loop.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        tcp.write_all(service.busy_line(refused)),
                    )
                    .await;
                }
                continue;
            }
        };
        let gateway = gateway.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            match service {
                Service::Imap => {
                    crate::imap::session::serve(gateway, ticket, tcp, peer, kind, shutdown).await
                }
                Service::Smtp => {
                    crate::smtp::session::serve(gateway, ticket, tcp, peer, kind, shutdown).await
                }
            }
        });
    }
}
