//! Folder watchers: one provider connection per (mailbox, folder) that parked sessions have
//! selected, in IDLE on that folder (opened read-only with `EXAMINE`, so it takes no
//! `\Recent` and changes nothing), turning what the provider says into [`FolderEvent`]s in
//! UIDs for every parked session of the folder. However many clients idle on INBOX, the
//! provider sees one connection.
//!
//! A watcher starts with its first subscriber, keeps the folder's UID list, and stops (its
//! connection back to the pool) once nobody has subscribed for [`LINGER`]. When its connection
//! drops it opens another and tells subscribers what changed meanwhile; if the folder's
//! UIDVALIDITY changed, every subscriber is told [`Signal::Invalidated`] (their sessions end:
//! IMAP has no other way to say it). Every task is tracked and stops on shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::gateway::Gateway;
use crate::imap::command::quoted;
use crate::imap::response::{self, ResponseKind, Status};
use crate::imap::view::{FolderEvent, News, changes, news};
use crate::io::{self, LineError};
use crate::upstream::pool::{self, PoolError};
use crate::upstream::slots::Class;
use crate::upstream::{ProviderConnection, read_unit};

/// How long a watcher nobody subscribes to keeps its connection.
pub const LINGER: Duration = Duration::from_secs(30);
/// IDLE is ended this often to check the folder (opened again: its UIDVALIDITY, and its UIDs
/// in case the provider's IDLE missed something): well within servers' 30-minute limit
/// (RFC 2177).
const VERIFY_EVERY: Duration = Duration::from_secs(60);
/// At most one check of the folder per this long on account of out-of-turn `* NO`s.
const TROUBLE_CHECK_GAP: Duration = Duration::from_secs(2);
/// How often an idling watcher looks at its subscriber count.
const LOOK_EVERY: Duration = Duration::from_secs(5);
/// Events a slow subscriber may fall behind by before it must resynchronise.
const BACKLOG: usize = 4096;
const UNIT_MAX: usize = 16 * 1024 * 1024;

/// What a subscriber hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    Event(FolderEvent),
    /// The folder was replaced (UIDVALIDITY changed, or it is gone): sessions on it must end.
    Invalidated(String),
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("provider connection: {0}")]
    Line(#[from] LineError),
    #[error("the provider did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the provider answered {command}: {reply}")]
    Refused {
        command: &'static str,
        reply: String,
    },
    #[error("no provider password in the vault")]
    NoPassword,
    #[error("the folder watcher stopped")]
    Stopped,
    #[error("the folder was replaced on the provider (UIDVALIDITY {was:?} is now {now:?})")]
    Replaced { was: Option<u32>, now: Option<u32> },
    #[error("the folder can no longer be opened: {0}")]
    Gone(String),
}

/// The folder watchers of the whole daemon.
#[derive(Default)]
pub struct Watchers {
    running: Mutex<HashMap<(String, String), Arc<Watch>>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// One watched folder's shared state.
struct Watch {
    state: Mutex<WatchState>,
    events: broadcast::Sender<Arc<Signal>>,
    /// Flips to true once the first UID list is known (or stays false and closes on failure).
    ready: watch::Sender<Option<Result<(), String>>>,
}

struct WatchState {
    uidvalidity: Option<u32>,
    uids: Vec<u32>,
    subscribers: usize,
    /// When the last subscriber left.
    alone_since: Option<tokio::time::Instant>,
}

/// A parked session's place at a watcher: its events, and the folder as it stood when it
/// subscribed. Dropping it unsubscribes.
pub struct Subscription {
    watch: Arc<Watch>,
    pub events: broadcast::Receiver<Arc<Signal>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = self.watch.state();
        state.subscribers -= 1;
        if state.subscribers == 0 {
            state.alone_since = Some(tokio::time::Instant::now());
        }
    }
}

impl Subscription {
    /// The folder's UIDVALIDITY as the watcher knows it.
    pub fn uidvalidity(&self) -> Option<u32> {
        self.watch.state().uidvalidity
    }

    /// The folder's UIDs now, and a fresh event stream from this point (after a subscriber
    /// fell behind).
    pub fn resync(&mut self) -> Vec<u32> {
        let state = self.watch.state();
        self.events = self.watch.events.subscribe();
        state.uids.clone()
    }
}

impl Watch {
    fn state(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, signal: Signal) {
        let _ = self.events.send(Arc::new(signal));
    }
}

impl Watchers {
    /// Watch `folder` (its provider name) of `mailbox`, starting a watcher if none runs, and
    /// wait (up to `wait`) until it knows the folder. Events from the moment of subscribing
    /// are queued in the subscription.
    pub async fn subscribe(
        &self,
        gateway: &Arc<Gateway>,
        mailbox: &str,
        folder: &str,
        wait: Duration,
    ) -> Result<Subscription, WatchError> {
        if self.stop.is_cancelled() {
            return Err(WatchError::Stopped);
        }
        let key = (mailbox.to_owned(), folder.to_owned());
        let watch = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let watch = match running.get(&key) {
                Some(watch) => watch.clone(),
                None => {
                    let (events, _) = broadcast::channel(BACKLOG);
                    let watch = Arc::new(Watch {
                        state: Mutex::new(WatchState {
                            uidvalidity: None,
                            uids: Vec::new(),
                            subscribers: 0,
                            alone_since: None,
                        }),
                        events,
                        ready: watch::channel(None).0,
                    });
                    running.insert(key.clone(), watch.clone());
                    // Not a child of the session that happened to start it.
                    let span = tracing::info_span!(
                        parent: None,
                        "watcher",
                        mailbox = %mailbox,
                        folder = %crate::text::printable(folder.as_bytes(), 200)
                    );
                    let task = run(
                        watch.clone(),
                        gateway.clone(),
                        key.clone(),
                        self.stop.clone(),
                    );
                    self.tasks.spawn(task.instrument(span));
                    watch
                }
            };
            // Counted under the registry's lock: a watcher retires only with the same lock
            // held and nobody counted, so no one joins a watcher that is leaving.
            let mut state = watch.state();
            state.subscribers += 1;
            state.alone_since = None;
            drop(state);
            watch
        };
        let subscription = Subscription {
            events: watch.events.subscribe(),
            watch: watch.clone(),
        };
        let mut ready = watch.ready.subscribe();
        let outcome = tokio::time::timeout(wait, ready.wait_for(Option::is_some)).await;
        match outcome {
            Ok(Ok(value)) => {
                if let Some(Err(reason)) = value.as_ref() {
                    return Err(WatchError::Refused {
                        command: "EXAMINE",
                        reply: reason.clone(),
                    });
                }
            }
            Ok(Err(_)) => return Err(WatchError::Stopped),
            Err(_) => return Err(WatchError::Timeout(wait)),
        }
        Ok(subscription)
    }

    /// A subscription to the watcher of `folder` of `mailbox` if one runs and knows its
    /// folder; none is started (the receipts worker rides what parked sessions already use).
    pub fn existing(&self, mailbox: &str, folder: &str) -> Option<Subscription> {
        let key = (mailbox.to_owned(), folder.to_owned());
        let watch = {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let watch = running.get(&key)?.clone();
            if !matches!(&*watch.ready.borrow(), Some(Ok(()))) {
                return None;
            }
            // Counted under the registry's lock, as in `subscribe`.
            let mut state = watch.state();
            state.subscribers += 1;
            state.alone_since = None;
            drop(state);
            watch
        };
        Some(Subscription {
            events: watch.events.subscribe(),
            watch,
        })
    }

    /// Remove `watch` from the registry if nobody has subscribed to it for [`LINGER`]: it may
    /// then stop (no subscriber can join it any more).
    fn retire(&self, key: &(String, String), watch: &Watch) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let registered = running
            .get(key)
            .is_some_and(|w| std::ptr::eq(Arc::as_ptr(w), watch));
        if registered && lonely(watch) {
            running.remove(key);
            return true;
        }
        !registered
    }

    /// Remove a watcher that has stopped, so the next subscriber starts a new one.
    fn forget(&self, key: &(String, String), watch: &Arc<Watch>) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.get(key).is_some_and(|w| Arc::ptr_eq(w, watch)) {
            running.remove(key);
        }
    }

    /// Stop every watcher and wait for them (their connections are logged out).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Per mailbox: folder watchers running, and the sessions parked on them (for the
    /// metrics).
    pub fn figures(&self) -> Vec<(String, usize, usize)> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, usize, usize)> = Vec::new();
        for ((mailbox, _), watch) in running.iter() {
            let parked = watch.state().subscribers;
            match out.iter_mut().find(|(m, _, _)| m == mailbox) {
                Some(entry) => {
                    entry.1 += 1;
                    entry.2 += parked;
                }
                None => out.push((mailbox.clone(), 1, parked)),
            }
        }
        out
    }
}

/// One watcher's life: connect, follow the folder, reconnect after failures, stop when alone
/// long enough or at shutdown.
async fn run(
    watch: Arc<Watch>,
    gateway: Arc<Gateway>,
    key: (String, String),
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let outcome = tokio::select! {
            outcome = follow(&watch, &gateway, &key) => outcome,
            () = stop.cancelled() => Err(WatchError::Stopped),
        };
        match outcome {
            // Retired: out of the registry with nobody subscribed.
            Ok(()) => return,
            Err(WatchError::Stopped) => break,
            Err(WatchError::Gone(reply)) => {
                tracing::warn!(%reply, "folder watcher: the folder can no longer be opened; its parked sessions end");
                watch.ready.send_replace(Some(Err(reply)));
                watch.send(Signal::Invalidated(
                    "the folder no longer exists on the provider".into(),
                ));
                break;
            }
            Err(error) => {
                tracing::warn!(%error, "folder watcher: starting over on a new connection");
                if watch.ready.borrow().is_none() {
                    // Nobody has been served yet: tell the waiting subscribers.
                    watch.ready.send_replace(Some(Err(error.to_string())));
                }
                if gateway.carried.watchers.retire(&key, &watch) {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    // Stopped or gone with subscribers: out of the registry first, so nobody new joins, then
    // every subscriber is told.
    gateway.carried.watchers.forget(&key, &watch);
    watch.send(Signal::Invalidated("the folder watcher stopped".into()));
}

/// Whether nobody has subscribed for [`LINGER`].
fn lonely(watch: &Watch) -> bool {
    let state = watch.state();
    state.subscribers == 0
        && state
            .alone_since
            .is_none_or(|since| since.elapsed() >= LINGER)
}

/// The watcher's own conversation on one connection.
struct Conn {
    inner: ProviderConnection,
    timeout: Duration,
    next: u32,
    /// An out-of-turn `* NO`/`* BAD` came with some answer: check the folder before idling.
    trouble: bool,
    /// When the folder was last checked (a provider repeating `* NO` is not answered with a
    /// check each time).
    verified: tokio::time::Instant,
}

impl Conn {
    async fn send(&mut self, text: &str) -> Result<String, WatchError> {
        self.next += 1;
        let tag = format!("w{}", self.next);
        self.inner
            .writer
            .write_all(format!("{tag} {text}\r\n").as_bytes())
            .await
            .map_err(LineError::from)?;
        self.inner.writer.flush().await.map_err(LineError::from)?;
        Ok(tag)
    }

    async fn unit(&mut self, wait: Duration) -> Result<Vec<u8>, WatchError> {
        let c = &mut self.inner;
        let line =
            tokio::time::timeout(wait, io::next_line(&mut c.reader, &mut c.buffer, UNIT_MAX))
                .await
                .map_err(|_| WatchError::Timeout(wait))??;
        let unit = tokio::time::timeout(
            self.timeout,
            read_unit(&mut c.reader, &mut c.buffer, &line, UNIT_MAX),
        )
        .await
        .map_err(|_| WatchError::Timeout(self.timeout))??;
        Ok(unit)
    }

    /// Run a command; its untagged answers go to `seen`.
    async fn run(
        &mut self,
        command: &'static str,
        text: &str,
        mut seen: impl FnMut(News),
    ) -> Result<(), WatchError> {
        let tag = self.send(text).await?;
        loop {
            let unit = self.unit(self.timeout).await?;
            match response::classify(&unit) {
                ResponseKind::Tagged { tag: t, status } if t == tag => {
                    return match status {
                        Status::Ok => Ok(()),
                        _ => Err(WatchError::Refused {
                            command,
                            reply: crate::text::printable(&unit, 300),
                        }),
                    };
                }
                ResponseKind::UntaggedStatus(Status::Bye) => return Err(LineError::Closed.into()),
                _ => match news(&unit) {
                    News::Trouble => self.trouble = true,
                    other => seen(other),
                },
            }
        }
    }
}

/// Connect, learn the folder, tell subscribers what changed since the last connection, then
/// IDLE and relay news until the connection fails (`Err`) or nobody needs the watcher
/// (`Ok`).
async fn follow(
    watch: &Watch,
    gateway: &Arc<Gateway>,
    key: &(String, String),
) -> Result<(), WatchError> {
    let (mailbox, folder) = key;
    let retire = || gateway.carried.watchers.retire(key, watch);
    let runtime = &gateway.mailboxes[mailbox];
    let target = runtime
        .target(gateway.provider_timeout)
        .ok_or(WatchError::NoPassword)?;
    let deadline = tokio::time::Instant::now() + gateway.config.gateway.connection_wait;
    let connection = runtime
        .pool
        .connect(
            &target,
            "(folder watcher)",
            Class::Interactive,
            Some(deadline),
        )
        .await?;
    let mut conn = Conn {
        inner: connection,
        timeout: gateway.provider_timeout,
        next: 0,
        trouble: false,
        // The first out-of-turn `* NO` is checked at once.
        verified: tokio::time::Instant::now()
            .checked_sub(TROUBLE_CHECK_GAP)
            .unwrap_or_else(tokio::time::Instant::now),
    };
    let uidvalidity = examine(&mut conn, folder).await?;
    conn.trouble = false;
    let uids = search_all(&mut conn).await?;
    {
        let mut state = watch.state();
        if state.uidvalidity.is_some() && state.uidvalidity != uidvalidity {
            drop(state);
            watch.send(Signal::Invalidated(
                "the folder was replaced on the provider (UIDVALIDITY changed)".into(),
            ));
            let mut state = watch.state();
            state.uidvalidity = uidvalidity;
            state.uids = uids;
        } else if watch.ready.borrow().as_ref().is_some_and(Result::is_ok) {
            // A reconnection: what happened while nobody watched.
            state.uidvalidity = uidvalidity;
            drop(state);
            replace_uids(watch, uids);
        } else {
            state.uidvalidity = uidvalidity;
            state.uids = uids;
        }
    }
    watch.ready.send_replace(Some(Ok(())));
    tracing::debug!("folder watcher following");
    loop {
        if !idle_once(watch, &mut conn, folder, &retire).await? {
            break;
        }
    }
    // Alone for long enough: the connection goes back to the pool.
    if conn.inner.unselect(Duration::from_secs(5)).await {
        pool::give_back(conn.inner).await;
    } else {
        conn.inner.logout().await;
    }
    Ok(())
}

/// `UID SEARCH ALL`, ascending.
async fn search_all(conn: &mut Conn) -> Result<Vec<u32>, WatchError> {
    let mut uids = Vec::new();
    conn.run("UID SEARCH", "UID SEARCH ALL", |n| {
        if let News::Search(found) = n {
            uids.extend(found);
        }
    })
    .await?;
    uids.sort_unstable();
    uids.dedup();
    Ok(uids)
}

/// One IDLE: news is turned into events as it comes; new messages end the IDLE so their UIDs
/// can be read; `retire` is asked every few seconds whether the watcher may stop; trouble (`* NO` out of turn: Dovecot's answer once the folder is deleted) or
/// [`VERIFY_EVERY`] ends it to check the folder. `Ok(false)`: nobody needs the watcher any
/// more.
async fn idle_once(
    watch: &Watch,
    conn: &mut Conn,
    folder: &str,
    retire: &(dyn Fn() -> bool + Sync),
) -> Result<bool, WatchError> {
    if std::mem::take(&mut conn.trouble) && conn.verified.elapsed() >= TROUBLE_CHECK_GAP {
        verify_folder(watch, conn, folder).await?;
        catch_up(watch, conn).await?;
    }
    let tag = conn.send("IDLE").await?;
    let started = tokio::time::Instant::now();
    let mut idling = false;
    let mut arrived = false;
    let mut alone = false;
    let mut verify = false;
    loop {
        let wait = if idling { LOOK_EVERY } else { conn.timeout };
        let unit = match conn.unit(wait).await {
            Ok(unit) => unit,
            Err(WatchError::Timeout(_)) if idling => {
                alone = retire();
                verify = started.elapsed() >= VERIFY_EVERY;
                if alone || verify {
                    break;
                }
                continue;
            }
            Err(error) => return Err(error),
        };
        match response::classify(&unit) {
            ResponseKind::Continuation => idling = true,
            ResponseKind::Tagged { tag: t, .. } if t == tag => {
                // The provider ended IDLE itself: look for new mail and idle again.
                return catch_up(watch, conn).await.map(|()| true);
            }
            ResponseKind::UntaggedStatus(Status::Bye) => return Err(LineError::Closed.into()),
            _ => match news(&unit) {
                News::Trouble if conn.verified.elapsed() >= TROUBLE_CHECK_GAP => {
                    verify = true;
                    break;
                }
                News::Trouble => {}
                other => {
                    if on_news(watch, other) {
                        arrived = true;
                        break;
                    }
                }
            },
        }
    }
    conn.inner
        .writer
        .write_all(b"DONE\r\n")
        .await
        .map_err(LineError::from)?;
    conn.inner.writer.flush().await.map_err(LineError::from)?;
    loop {
        let unit = conn.unit(conn.timeout).await?;
        match response::classify(&unit) {
            ResponseKind::Tagged { tag: t, .. } if t == tag => break,
            ResponseKind::UntaggedStatus(Status::Bye) => return Err(LineError::Closed.into()),
            _ => {
                if on_news(watch, news(&unit)) {
                    arrived = true;
                }
            }
        }
    }
    let troubled =
        std::mem::take(&mut conn.trouble) && conn.verified.elapsed() >= TROUBLE_CHECK_GAP;
    if verify || troubled {
        verify_folder(watch, conn, folder).await?;
        catch_up(watch, conn).await?;
    } else if arrived {
        catch_up(watch, conn).await?;
    }
    Ok(!alone)
}

/// Still the same folder? A deleted and recreated one has a new UIDVALIDITY. Opened again
/// with `EXAMINE` (a STATUS of the selected folder may answer from what the server had
/// selected: Dovecot does); the caller then reads the UIDs afresh.
async fn verify_folder(watch: &Watch, conn: &mut Conn, folder: &str) -> Result<(), WatchError> {
    conn.verified = tokio::time::Instant::now();
    let now = examine(conn, folder).await?;
    let was = watch.state().uidvalidity;
    if now != was {
        return Err(WatchError::Replaced { was, now });
    }
    Ok(())
}

/// `EXAMINE` the folder: its UIDVALIDITY, or [`WatchError::Gone`] when it cannot be opened.
async fn examine(conn: &mut Conn, folder: &str) -> Result<Option<u32>, WatchError> {
    let mut uidvalidity = None;
    let examined = conn
        .run("EXAMINE", &format!("EXAMINE {}", quoted(folder)), |n| {
            if let News::UidValidity(v) = n {
                uidvalidity = Some(v);
            }
        })
        .await;
    match examined {
        Err(WatchError::Refused { reply, .. }) => Err(WatchError::Gone(reply)),
        other => other.map(|()| uidvalidity),
    }
}

/// Apply one piece of news to the folder's state and tell subscribers; `true` when new
/// messages arrived (their UIDs are not known yet).
fn on_news(watch: &Watch, news: News) -> bool {
    let mut state = watch.state();
    match news {
        News::Expunge(seq) => {
            let at = seq as usize;
            if at >= 1 && at <= state.uids.len() {
                let uid = state.uids.remove(at - 1);
                drop(state);
                watch.send(Signal::Event(FolderEvent::Expunged(vec![uid])));
            }
            false
        }
        News::Exists(n) => n as usize > state.uids.len(),
        News::Flags { seq, flags } => {
            if let Some(&uid) = state.uids.get((seq as usize).wrapping_sub(1)) {
                drop(state);
                watch.send(Signal::Event(FolderEvent::Flags { uid, flags }));
            }
            false
        }
        News::FlagList(line) => {
            drop(state);
            watch.send(Signal::Event(FolderEvent::Keywords(line)));
            false
        }
        _ => false,
    }
}

/// Read the folder's UIDs again and tell subscribers what arrived (and what went, had an
/// EXPUNGE been missed).
async fn catch_up(watch: &Watch, conn: &mut Conn) -> Result<(), WatchError> {
    let uids = search_all(conn).await?;
    replace_uids(watch, uids);
    Ok(())
}

/// The folder's UIDs as just read: subscribers hear what went and what arrived.
fn replace_uids(watch: &Watch, uids: Vec<u32>) {
    let (gone, new) = {
        let mut state = watch.state();
        let changes = changes(&state.uids, &uids);
        state.uids = uids;
        changes
    };
    if !gone.is_empty() {
        watch.send(Signal::Event(FolderEvent::Expunged(gone)));
    }
    if !new.is_empty() {
        watch.send(Signal::Event(FolderEvent::Arrived(new)));
    }
}
