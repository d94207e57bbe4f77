//! Listeners, the accept loop and graceful shutdown, for IMAP and SMTP alike; the control
//! socket, the metrics endpoint and the receipts workers run beside them.
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

use crate::gateway::{Carried, Gateway, Live};
use crate::guard::AdmissionRefused;
use crate::registry::Stop;
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

/// The listeners a configuration asks for: (config key, address, protocol, kind).
fn wanted(
    config: &crate::config::Config,
) -> Vec<(&'static str, SocketAddr, Service, ListenerKind)> {
    let (imap, smtp) = (&config.imap, &config.smtp);
    let lists = [
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
    lists
        .into_iter()
        .flat_map(|(key, addresses, service, kind)| {
            addresses.iter().map(move |&a| (key, a, service, kind))
        })
        .collect()
}

/// A bound listener and where it comes from.
struct Bound {
    listener: TcpListener,
    key: &'static str,
    configured: SocketAddr,
    service: Service,
    kind: ListenerKind,
}

/// Bind `address` for the config key `key`, and say where.
async fn bind_address(address: SocketAddr, key: &'static str) -> Result<TcpListener, ServerError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| ServerError::Bind {
            address,
            key,
            source,
        })?;
    if let Ok(real) = listener.local_addr() {
        // With port 0 configured, this line is where the real port is learnt (the tests bind
        // that way: no probe-and-release race).
        tracing::info!(address = %real, listener = key, "listening");
    }
    Ok(listener)
}

async fn bind_one(
    (key, address, service, kind): (&'static str, SocketAddr, Service, ListenerKind),
) -> Result<Bound, ServerError> {
    let listener = bind_address(address, key).await?;
    Ok(Bound {
        listener,
        key,
        configured: address,
        service,
        kind,
    })
}

/// A listener being served: its config key and address, its own stop, its accept task.
struct Running {
    id: (&'static str, SocketAddr),
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Bound listeners, ready to serve.
pub struct Listeners {
    bound: Vec<Bound>,
    metrics: Option<TcpListener>,
    control: Option<tokio::net::UnixListener>,
}

impl Listeners {
    /// Bind every configured address (and the metrics endpoint, if configured).
    pub async fn bind(gateway: &Gateway) -> Result<Listeners, ServerError> {
        let mut bound = Vec::new();
        for wanted in wanted(&gateway.config) {
            bound.push(bind_one(wanted).await?);
        }
        let metrics = match gateway.config.metrics.listen {
            Some(address) => Some(bind_address(address, "metrics.listen").await?),
            None => None,
        };
        // The control socket too, before "ready": `pecgate sessions` works from then on.
        let control = match crate::control::bind(&gateway.config.gateway.state_dir) {
            Ok(control) => Some(control),
            Err(error) => {
                tracing::error!(%error, "control socket unavailable: `pecgate sessions` will not work");
                None
            }
        };
        Ok(Listeners {
            bound,
            metrics,
            control,
        })
    }
}

/// Serve until `shutdown` is cancelled, then wait (up to `grace`) for sessions to end.
/// A new generation published in `live` (a reload) takes effect for new connections: its
/// listeners are bound and those it no longer has are closed.
pub async fn run(live: Live, listeners: Listeners, shutdown: CancellationToken, grace: Duration) {
    let tracker = TaskTracker::new();
    let gateway = live.current();
    tracker.spawn(crate::disk::watch_free_space(
        gateway.config.gateway.state_dir.clone(),
        gateway.config.gateway.min_free_space_bytes,
        shutdown.clone(),
    ));
    tracker.spawn(tend_pools(gateway.carried.clone(), shutdown.clone()));
    // The receipts workers, one per mailbox, follow the generations themselves.
    tracker.spawn(crate::receipts::worker::supervise(
        live.clone(),
        shutdown.clone(),
        tracker.clone(),
    ));
    if let Some(control) = listeners.control {
        tracker.spawn(crate::control::serve(
            control,
            live.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(metrics) = listeners.metrics {
        tracker.spawn(crate::monitor::serve(
            metrics,
            live.clone(),
            shutdown.clone(),
        ));
    }
    // Each listener has its own stop, so a reload can close one and keep the others; its
    // task handle tells when its socket is closed (an address may move to another listener).
    let mut running: Vec<Running> = Vec::new();
    let start = |bound: Bound, running: &mut Vec<Running>| {
        let stop = shutdown.child_token();
        let id = (bound.key, bound.configured);
        let task = tracker.spawn(accept_loop(
            live.clone(),
            bound,
            stop.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        running.push(Running { id, stop, task });
    };
    for bound in listeners.bound {
        start(bound, &mut running);
    }
    let mut generations = live.watch();
    loop {
        tokio::select! {
            changed = generations.changed() => {
                if changed.is_err() {
                    break;
                }
                let config = generations.borrow_and_update().config.clone();
                let wanted = wanted(&config);
                let (kept, closed): (Vec<Running>, Vec<Running>) = running
                    .drain(..)
                    .partition(|r| wanted.iter().any(|(key, address, _, _)| (*key, *address) == r.id));
                running = kept;
                // Closed first, and waited for: their addresses may be bound again just below.
                for gone in closed {
                    tracing::info!(listener = gone.id.0, address = %gone.id.1, "listener closed by the reload");
                    gone.stop.cancel();
                    let _ = gone.task.await;
                }
                for new in wanted {
                    if running.iter().any(|r| r.id == (new.0, new.1)) {
                        continue;
                    }
                    match bind_one(new).await {
                        Ok(bound) => start(bound, &mut running),
                        Err(error) => tracing::error!(%error, "a listener added by the reload could not be bound"),
                    }
                }
            }
            () = shutdown.cancelled() => break,
        }
    }
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

/// How often idle provider connections are looked at.
const TEND_EVERY: Duration = Duration::from_secs(1);

/// Log out the idle provider connections that waited longer than `provider_idle_keep_secs`
/// (or that a lowered cap has no room for); at shutdown, stop the folder watchers and log
/// out every idle connection, politely and at once.
async fn tend_pools(carried: Arc<Carried>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(TEND_EVERY) => {}
            () = shutdown.cancelled() => break,
        }
        for pool in carried.pools() {
            for connection in pool.expired() {
                connection.logout().await;
            }
        }
    }
    // Folder watchers first: their connections are the pools' too.
    carried.watchers.shutdown().await;
    let mut goodbyes = tokio::task::JoinSet::new();
    for pool in carried.pools() {
        // Sessions still ending during the grace period close theirs themselves.
        pool.set_keep_idle(Duration::ZERO);
        for connection in pool.drain_idle() {
            goodbyes.spawn(connection.logout());
        }
    }
    while goodbyes.join_next().await.is_some() {}
}

async fn accept_loop(
    live: Live,
    bound: Bound,
    stop: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let Bound {
        listener,
        service,
        kind,
        ..
    } = bound;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
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
        let gateway = live.current();
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
        let live = live.clone();
        let session_stop = Stop::child_of(&shutdown);
        tracker.spawn(async move {
            match service {
                Service::Imap => {
                    crate::imap::session::serve(live, ticket, tcp, peer, kind, session_stop).await
                }
                Service::Smtp => {
                    crate::smtp::session::serve(live, ticket, tcp, peer, kind, session_stop).await
                }
            }
        });
    }
}
