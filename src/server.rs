//! Listeners, the accept loop and graceful shutdown, for IMAP and SMTP alike.
//!
//! Every listener is bound before the daemon reports ready, so a wrong address fails start-up
//! instead of failing later. Accepting is limited by one semaphore (`max_sessions`) shared by
//! both protocols; a session task holds its permit until it ends. All tasks are tracked: on
//! shutdown the accept loops stop, every session says goodbye at its next response boundary
//! (`* BYE` / `421`), and `run` returns once they are gone (or the grace period is over).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gateway::Gateway;
use crate::session::ListenerKind;

/// Which protocol a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Imap,
    Smtp,
}

impl Service {
    /// What a plain-text (STARTTLS-port) client is told when `max_sessions` is reached.
    fn busy_line(self) -> &'static [u8] {
        match self {
            Service::Imap => b"* BYE [UNAVAILABLE] Too many connections to pecgate\r\n",
            Service::Smtp => b"421 4.3.2 Too many connections to pecgate, try again later\r\n",
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
    bound: Vec<(TcpListener, Service, ListenerKind)>,
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
                bound.push((listener, service, kind));
            }
        }
        Ok(Listeners { bound })
    }

    /// The bound addresses (with the real port where 0 was configured).
    pub fn addresses(&self) -> Vec<(SocketAddr, Service, ListenerKind)> {
        self.bound
            .iter()
            .filter_map(|(l, service, kind)| l.local_addr().ok().map(|a| (a, *service, *kind)))
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
    let sessions = Arc::new(Semaphore::new(gateway.config.gateway.max_sessions));
    for (listener, service, kind) in listeners.bound {
        tracker.spawn(accept_loop(
            gateway.clone(),
            listener,
            service,
            kind,
            sessions.clone(),
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
    sessions: Arc<Semaphore>,
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
        let Ok(permit) = sessions.clone().try_acquire_owned() else {
            tracing::warn!(%peer, ?service, "max_sessions reached: connection refused");
            if kind == ListenerKind::StartTls {
                let _ = tcp.write_all(service.busy_line()).await;
            }
            continue;
        };
        let gateway = gateway.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            match service {
                Service::Imap => {
                    crate::imap::session::serve(gateway, tcp, peer, kind, shutdown).await
                }
                Service::Smtp => {
                    crate::smtp::session::serve(gateway, tcp, peer, kind, shutdown).await
                }
            }
            drop(permit);
        });
    }
}
