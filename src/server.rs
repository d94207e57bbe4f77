//! Listeners, the accept loop and graceful shutdown.
//!
//! Every listener is bound before the daemon reports ready, so a wrong address fails start-up
//! instead of failing later. Accepting is limited by a semaphore (`max_sessions`); a session
//! task holds its permit until it ends. All tasks are tracked: on shutdown the accept loops
//! stop, every session says `* BYE` at its next response boundary, and `run` returns once they
//! are gone (or the grace period is over).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gateway::Gateway;
use crate::imap::session::{self, ListenerKind};

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
    imap: Vec<(TcpListener, ListenerKind)>,
}

impl Listeners {
    /// Bind every configured address.
    pub async fn bind(gateway: &Gateway) -> Result<Listeners, ServerError> {
        let mut imap = Vec::new();
        let kinds = [
            (
                "imap.listen_tls",
                &gateway.config.imap.listen_tls,
                ListenerKind::ImplicitTls,
            ),
            (
                "imap.listen_starttls",
                &gateway.config.imap.listen_starttls,
                ListenerKind::StartTls,
            ),
        ];
        for (key, addresses, kind) in kinds {
            for &address in addresses {
                let listener =
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| ServerError::Bind {
                            address,
                            key,
                            source,
                        })?;
                imap.push((listener, kind));
            }
        }
        Ok(Listeners { imap })
    }

    /// The bound addresses (with the real port where 0 was configured).
    pub fn addresses(&self) -> Vec<(SocketAddr, ListenerKind)> {
        self.imap
            .iter()
            .filter_map(|(l, kind)| l.local_addr().ok().map(|a| (a, *kind)))
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
    for (listener, kind) in listeners.imap {
        tracker.spawn(accept_loop(
            gateway.clone(),
            listener,
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
            tracing::warn!(%peer, "max_sessions reached: connection refused");
            if kind == ListenerKind::StartTls {
                let _ = tcp
                    .write_all(b"* BYE [UNAVAILABLE] Too many connections to pecgate\r\n")
                    .await;
            }
            continue;
        };
        let gateway = gateway.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            session::serve(gateway, tcp, peer, kind, shutdown).await;
            drop(permit);
        });
    }
}
