//! A mailbox's provider connections as one shared budget: [`Pool::connect`] waits, fairly,
//! for a place under the live cap ([`super::slots`] keeps the books), opens a provider session
//! in it, and when the provider refuses that login for its own connection limit, lowers the
//! cap and waits again instead of failing. A [`Slot`] travels with the connection it paid for;
//! dropping the connection gives the place to the next waiter.
//!
//! A session that ends cleanly gives its connection back ([`give_back`]) in the authenticated
//! state (nothing selected, nothing in flight); one that lends it between commands or parks
//! in IDLE gives it back with its folder still selected and the UID list that is the
//! connection's numbering ([`ProviderConnection::selected`]). It goes straight to the next
//! waiter, or waits idle (logged in, `[gateway] provider_idle_keep_secs`). A login then costs
//! a NOOP instead of a TCP, TLS and LOGIN round (a folder left selected is closed with
//! UNSELECT first); a session wanting that very folder takes it as it is, with no command,
//! if the provider has sent nothing on it since ([`Pool::connect_keeping`]). Idle connections
//! are closed with a LOGOUT when they have waited too long ([`Pool::expired`]) or at shutdown
//! ([`Pool::drain_idle`]). Sessions between commands stand ready to lend ([`Pool::offer`]): a
//! waiter that finds no place asks the one quiet the longest.
//!
//! Clients wait up to `[gateway] connection_wait_secs`; background work (the receipts worker)
//! waits as long as it takes and never before a client.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::slots::{CapChange, Class, Slots, WaiterId};
use super::{ProviderConnection, ProviderTarget, UpstreamError};

/// Why no provider connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every place stayed taken for the whole wait.
    #[error("all {ceiling} provider connections of this mailbox stayed busy for {waited}s")]
    Busy { ceiling: u32, waited: u64 },
    /// The provider refuses more connections (its own limit) and the wait ran out.
    #[error(
        "the provider accepts no more connections for this mailbox (its own limit): pecgate uses {cap} of max_connections={ceiling}"
    )]
    ProviderLimit { cap: u32, ceiling: u32 },
    /// The provider could not be reached, or refused the login for another reason.
    #[error(transparent)]
    Upstream(UpstreamError),
}

/// What the metrics show of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolFigures {
    pub open: u32,
    pub cap: u32,
    pub ceiling: u32,
    pub waiting: usize,
    /// Connections logged in and waiting for a session.
    pub idle: usize,
    pub limit_refusals: u64,
    /// Connections lent between two commands to a waiting session, since start.
    pub lends: u64,
    /// Folder watchers of the mailbox (each holds one of its connections), and the sessions
    /// parked on them: filled in by the caller, which knows the watchers (0 here).
    pub watchers: usize,
    pub parked: usize,
}

/// One mailbox's provider connections (cheap to clone: a handle).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    mailbox: String,
    state: Mutex<State>,
}

struct State {
    slots: Slots,
    /// How to wake each queued waiter.
    wake: HashMap<WaiterId, oneshot::Sender<Grant>>,
    /// Logged-in connections nobody uses, newest last; each holds a place in `slots`.
    idle: Vec<IdleConnection>,
    /// How long an idle connection is kept (zero: none is).
    keep_idle: Duration,
    /// Sessions holding a connection between two commands, quiet the longest first: a waiter
    /// that finds no place asks the first to lend its connection ([`Offer`]).
    lenders: VecDeque<(u64, Arc<Notify>)>,
    next_lender: u64,
    lends: u64,
}

struct IdleConnection {
    connection: ProviderConnection,
    since: Instant,
}

/// What a waiter is given.
enum Grant {
    /// A place under the cap, to open a connection in.
    Place,
    /// A connection another session gave back, in its place.
    Connection(Box<ProviderConnection>),
}

impl State {
    /// Ask the session quiet the longest to lend its connection: a waiter found no place.
    fn ask_lender(&mut self, waiter: WaiterId) {
        if self.wake.contains_key(&waiter)
            && let Some((_, asked)) = self.lenders.pop_front()
        {
            asked.notify_one();
        }
    }

    /// Tell the waiters `served` they hold a place. One whose wait was abandoned in between
    /// gives its place straight back.
    fn hand_over(&mut self, mut served: Vec<WaiterId>) {
        while !served.is_empty() {
            let mut returned = 0;
            for id in served.drain(..) {
                let delivered = self
                    .wake
                    .remove(&id)
                    .is_some_and(|tx| tx.send(Grant::Place).is_ok());
                if !delivered {
                    returned += 1;
                }
            }
            for _ in 0..returned {
                served.extend(self.slots.release(now()));
            }
        }
    }

    /// Whether a connection given back is kept: a waiter wants one, or idle connections are
    /// kept and the cap has room for this one.
    fn keeps_one(&self) -> bool {
        self.slots.waiting() > 0
            || (self.slots.open() <= self.slots.live_cap() && !self.keep_idle.is_zero())
    }

    /// A clean connection (its place still counted): to the waiter whose turn it is, else
    /// idle.
    fn place(&mut self, mut connection: ProviderConnection) {
        while let Some(id) = self.slots.next_waiter() {
            let Some(tx) = self.wake.remove(&id) else {
                continue;
            };
            match tx.send(Grant::Connection(Box::new(connection))) {
                Ok(()) => return,
                Err(Grant::Connection(back)) => connection = *back,
                Err(Grant::Place) => unreachable!("sent a connection"),
            }
        }
        self.idle.push(IdleConnection {
            connection,
            since: Instant::now(),
        });
    }
}

impl Pool {
    pub fn new(mailbox: &str, ceiling: u32) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                mailbox: mailbox.to_owned(),
                state: Mutex::new(State {
                    slots: Slots::new(ceiling),
                    wake: HashMap::new(),
                    idle: Vec::new(),
                    keep_idle: Duration::ZERO,
                    lenders: VecDeque::new(),
                    next_lender: 0,
                    lends: 0,
                }),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Plain bookkeeping: a panic cannot leave it half-changed in a way that matters more
        // than refusing every later login would.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ceiling(&self) -> u32 {
        self.state().slots.ceiling()
    }

    /// A new `max_connections` from a reload; waiters it makes room for go at once.
    pub fn set_ceiling(&self, ceiling: u32) {
        let mut state = self.state();
        let served = state.slots.set_ceiling(ceiling, now());
        state.hand_over(served);
    }

    /// How long a connection given back may wait idle for the next session (a reload may
    /// change it; zero closes connections with their sessions).
    pub fn set_keep_idle(&self, keep: Duration) {
        self.state().keep_idle = keep;
    }

    /// Idle connections that waited longer than they may, or that the cap no longer has room
    /// for (the provider lowered it, or a reload did): out of the pool, each with its place,
    /// for the caller to log out (dropping one frees its place).
    pub fn expired(&self) -> Vec<ProviderConnection> {
        let mut state = self.state();
        let keep = state.keep_idle;
        let mut over = state.slots.open().saturating_sub(state.slots.live_cap()) as usize;
        let mut out = Vec::new();
        let mut kept = Vec::new();
        // Oldest first: they go first when the cap has no room.
        for idle in std::mem::take(&mut state.idle) {
            if over > 0 || idle.since.elapsed() >= keep {
                over = over.saturating_sub(1);
                out.push(idle.connection);
            } else {
                kept.push(idle);
            }
        }
        state.idle = kept;
        drop(state);
        out.into_iter().map(|c| self.with_place(c)).collect()
    }

    /// Every idle connection, for a polite LOGOUT at shutdown.
    pub fn drain_idle(&self) -> Vec<ProviderConnection> {
        let idle = std::mem::take(&mut self.state().idle);
        idle.into_iter()
            .map(|i| self.with_place(i.connection))
            .collect()
    }

    /// A connection out of the idle list or a hand-over gets its place back as a [`Slot`].
    fn with_place(&self, mut connection: ProviderConnection) -> ProviderConnection {
        connection.slot = Some(Slot::new(self.clone()));
        connection
    }

    /// The newest idle connection logged in to `identity` with `folder` selected, else the
    /// newest one, if one is fresh enough to try.
    fn take_idle(
        &self,
        identity: &[u8; 32],
        folder: Option<(&str, bool)>,
    ) -> Option<ProviderConnection> {
        let mut state = self.state();
        let keep = state.keep_idle;
        let on_folder = state.idle.iter().rposition(|idle| {
            let selected = idle.connection.selected.as_ref();
            selected.is_some_and(|s| s.is(folder))
        });
        if let Some(at) = on_folder {
            let idle = state.idle.remove(at);
            state.idle.push(idle);
        }
        while let Some(idle) = state.idle.pop() {
            let connection = self.with_place(idle.connection);
            if idle.since.elapsed() < keep && connection.identity == *identity {
                return Some(connection);
            }
            // Waited too long, or opened for settings a reload has changed: closed (its
            // place freed) without a word.
            drop(state);
            drop(connection);
            state = self.state();
        }
        None
    }

    pub fn figures(&self) -> PoolFigures {
        let state = self.state();
        PoolFigures {
            open: state.slots.open(),
            cap: state.slots.live_cap(),
            ceiling: state.slots.ceiling(),
            waiting: state.slots.waiting(),
            idle: state.idle.len(),
            limit_refusals: state.slots.limit_refusals(),
            lends: state.lends,
            watchers: 0,
            parked: 0,
        }
    }

    /// A logged-in provider session in the authenticated state, waiting for a place until
    /// `deadline` (`None`: as long as it takes). `user` is whose turn it is in the fair queue.
    pub async fn connect(
        &self,
        target: &ProviderTarget<'_>,
        user: &str,
        class: Class,
        deadline: Option<Instant>,
    ) -> Result<ProviderConnection, PoolError> {
        self.connect_keeping(target, user, class, deadline, None)
            .await
    }

    /// As [`Pool::connect`], but a connection handed over with `keep` (folder, read-only)
    /// still selected comes as it is ([`ProviderConnection::selected`]); any other is put
    /// back in the authenticated state first.
    pub async fn connect_keeping(
        &self,
        target: &ProviderTarget<'_>,
        user: &str,
        class: Class,
        deadline: Option<Instant>,
        keep: Option<(&str, bool)>,
    ) -> Result<ProviderConnection, PoolError> {
        let started = Instant::now();
        let identity = target.identity();
        let mut retry = false;
        loop {
            if !retry && let Some(mut connection) = self.take_idle(&identity, keep) {
                let limit = REUSE_CHECK.min(target.timeout);
                let wanted = connection.selected.as_ref().is_some_and(|s| s.is(keep));
                if wanted {
                    // Its folder as this caller wants it: a command would make the provider
                    // tell the news it holds (and spoil the UID list), so only what already
                    // came is looked at. Nothing: it is as it was left.
                    if connection.untouched().await {
                        return Ok(connection);
                    }
                } else if (connection.selected.is_none() || connection.unselect(limit).await)
                    && connection.still_there(limit).await
                {
                    return Ok(connection);
                }
                // Dropped, or it spoke while idle: closed (its place freed).
                connection.logout().await;
                continue;
            }
            let slot = match self.acquire(user, class, deadline, retry).await {
                Some(Grant::Connection(connection)) => {
                    let mut connection = self.with_place(*connection);
                    if connection.identity != identity {
                        // Opened for settings a reload has changed since: closed, try again.
                        continue;
                    }
                    // Handed over by a session: its folder, if it is not the one wanted, is
                    // closed first.
                    let limit = REUSE_CHECK.min(target.timeout);
                    let fits = connection.selected.as_ref().is_none_or(|s| s.is(keep));
                    if fits || connection.unselect(limit).await {
                        return Ok(connection);
                    }
                    // Unfit for anyone: closed, its place freed; try again.
                    connection.logout().await;
                    continue;
                }
                Some(Grant::Place) => Slot::new(self.clone()),
                None => {
                    let state = self.state();
                    return Err(if state.slots.limited_by_provider() {
                        PoolError::ProviderLimit {
                            cap: state.slots.live_cap(),
                            ceiling: state.slots.ceiling(),
                        }
                    } else {
                        PoolError::Busy {
                            ceiling: state.slots.ceiling(),
                            waited: started.elapsed().as_secs(),
                        }
                    });
                }
            };
            match super::connect(target).await {
                Ok(mut connection) => {
                    self.state().slots.connected();
                    connection.slot = Some(slot);
                    return Ok(connection);
                }
                Err(UpstreamError::ConnectionLimit { reply, .. }) => {
                    slot.refused_by_limit(&reply);
                    retry = true;
                }
                Err(error) => return Err(PoolError::Upstream(error)),
            }
        }
    }

    /// A place under the cap, or `None` once `deadline` passes. `retry`: the caller's last
    /// attempt was refused for the provider's limit; it keeps its place in its queue.
    async fn acquire(
        &self,
        user: &str,
        class: Class,
        deadline: Option<Instant>,
        retry: bool,
    ) -> Option<Grant> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.state();
            if !retry && state.slots.try_take(class, now()) {
                return Some(Grant::Place);
            }
            let id = state.slots.enqueue(user, class, retry);
            state.wake.insert(id, tx);
            // Perhaps a place is free already (a retry after a pause).
            let (change, served) = state.slots.tick(now());
            self.log_raise(change);
            state.hand_over(served);
            state.ask_lender(id);
            id
        };
        let mut waiting = Waiting {
            pool: self,
            id,
            rx,
            served: false,
        };
        loop {
            // Other waiters' events (a refusal's pause) move the next wake: look again soon.
            let soon = Instant::now() + RECHECK;
            let wake = self.state().slots.next_wake().map(Instant::from_std);
            tokio::select! {
                grant = &mut waiting.rx => {
                    waiting.served = true;
                    // The sender is only ever used to serve (never dropped while queued).
                    return Some(grant.unwrap_or(Grant::Place));
                }
                () = tokio::time::sleep_until(wake.map_or(soon, |w| w.min(soon))) => {
                    let mut state = self.state();
                    let (change, served) = state.slots.tick(now());
                    self.log_raise(change);
                    state.hand_over(served);
                    // The one asked may have had a command to run by then: ask the next.
                    state.ask_lender(id);
                }
                () = sleep_until_some(deadline) => return None,
            }
        }
    }

    /// Offer the connection a session holds but is not using (it is between two commands):
    /// while the offer lives, a waiter that finds no place may ask for it
    /// ([`Offer::asked`]). With a waiter already queued, it is asked at once; so it is when
    /// every place is taken and fewer than [`READY_RESERVE`] connections wait idle (and idle
    /// ones are kept): the next command of any session then finds one ready, its folder still
    /// selected, instead of waiting for a lender to wake.
    pub fn offer(&self) -> Offer {
        let asked = Arc::new(Notify::new());
        let mut state = self.state();
        state.next_lender += 1;
        let id = state.next_lender;
        let crowded = state.idle.len() < READY_RESERVE
            && !state.keep_idle.is_zero()
            && state.slots.open() >= state.slots.live_cap();
        if state.slots.waiting() > 0 || crowded {
            asked.notify_one();
        } else {
            state.lenders.push_back((id, Arc::clone(&asked)));
        }
        Offer {
            pool: self.clone(),
            id,
            asked,
        }
    }

    fn log_raise(&self, change: Option<CapChange>) {
        if let Some(CapChange { from, to }) = change {
            tracing::info!(
                mailbox = %self.inner.mailbox,
                from, to,
                "trying one more provider connection for this mailbox after a quiet spell without refusals"
            );
        }
    }
}

/// Give a session's connection back to its pool: pecgate has left it with nothing in flight,
/// in the authenticated state or with a folder selected as [`ProviderConnection::selected`]
/// says. It goes to the next waiter, or idle (a folder stays selected: the provider tells a
/// connection nothing until it is sent a command, so its UID list stays its numbering); when
/// the pool keeps no idle connection or has no room for it, it is logged out.
pub async fn give_back(mut connection: ProviderConnection) {
    let Some(pool) = connection.slot.as_ref().and_then(|slot| slot.pool.clone()) else {
        connection.logout().await;
        return;
    };
    {
        let mut state = pool.state();
        if state.keeps_one() {
            connection.slot.take().map(Slot::keep);
            state.place(connection);
            return;
        }
    }
    connection.logout().await;
}

/// Whether [`give_back`] would keep `connection` for another session (a waiter wants one,
/// or the pool keeps idle connections and has room): otherwise there is no point in
/// cleaning it up first.
pub fn would_keep(connection: &ProviderConnection) -> bool {
    let Some(pool) = connection.slot.as_ref().and_then(|slot| slot.pool.as_ref()) else {
        return false;
    };
    pool.state().keeps_one()
}

/// While every place is taken, quiet sessions lend their connections until this many wait
/// idle, ready for the next command of anyone.
const READY_RESERVE: usize = 2;

/// How long a reused idle connection has to answer its NOOP.
const REUSE_CHECK: Duration = Duration::from_secs(5);

/// How often a waiter looks at the books even when nothing woke it.
const RECHECK: Duration = Duration::from_secs(1);

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// A queued wait; dropped before it is served, it leaves the queue (served in the meantime,
/// it gives the place back).
struct Waiting<'a> {
    pool: &'a Pool,
    id: WaiterId,
    rx: oneshot::Receiver<Grant>,
    served: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.served {
            return;
        }
        let mut state = self.pool.state();
        state.wake.remove(&self.id);
        if !state.slots.cancel(self.id) {
            // Served between the last poll and now: what was given is ours to pass on.
            match self.rx.try_recv() {
                Ok(Grant::Connection(connection)) => state.place(*connection),
                Ok(Grant::Place) | Err(_) => {
                    let served = state.slots.release(now());
                    state.hand_over(served);
                }
            }
        }
    }
}

/// A session's standing offer of its connection to waiters; withdrawn when dropped.
pub struct Offer {
    pool: Pool,
    id: u64,
    asked: Arc<Notify>,
}

impl Offer {
    /// Resolves when a waiter asks for the connection (the session then lends it: counted).
    pub async fn asked(&self) {
        self.asked_or_after(None).await;
    }

    /// As [`Offer::asked`], or once the session has been quiet for `quiet` (`None`: never):
    /// a session silent that long holds no connection at all, so none can die under it.
    pub async fn asked_or_after(&self, quiet: Option<Duration>) {
        let quiet_enough = async {
            match quiet {
                Some(quiet) => tokio::time::sleep(quiet).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = self.asked.notified() => {}
            () = quiet_enough => {}
        }
        self.pool.state().lends += 1;
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        let id = self.id;
        self.pool
            .state()
            .lenders
            .retain(|(lender, _)| *lender != id);
    }
}

/// One place in a mailbox's pool, held by the connection it was taken for.
pub struct Slot {
    pool: Option<Pool>,
}

impl Slot {
    fn new(pool: Pool) -> Slot {
        Slot { pool: Some(pool) }
    }

    /// Its place stays counted, now by an idle or handed-over connection.
    fn keep(mut self) -> Pool {
        self.pool.take().expect("a slot is used once")
    }

    /// The provider refused the login made in this place for its connection limit.
    fn refused_by_limit(mut self, reply: &str) {
        let pool = self.pool.take().expect("a slot is used once");
        let mut state = pool.state();
        let change = state.slots.refused_by_limit(now());
        let (open, cap) = (state.slots.open(), state.slots.live_cap());
        drop(state);
        match change {
            Some(CapChange { from, to }) => tracing::warn!(
                mailbox = %pool.inner.mailbox,
                from, to, reply,
                "the provider refused a connection for its own connection limit: pecgate now uses at most {to} for this mailbox and retries later"
            ),
            None => tracing::warn!(
                mailbox = %pool.inner.mailbox,
                open, cap, reply,
                "the provider still refuses a connection for its own connection limit: waiting before the next attempt"
            ),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let mut state = pool.state();
            let served = state.slots.release(now());
            state.hand_over(served);
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued wait for a place, as `connect` makes one.
    fn wait_for_place(pool: &Pool, user: &'static str) -> tokio::task::JoinHandle<bool> {
        let pool = pool.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            matches!(
                pool.acquire(user, Class::Interactive, Some(deadline), false)
                    .await,
                Some(Grant::Place)
            )
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_asks_the_session_quiet_the_longest_to_lend() {
        let pool = Pool::new("studio", 1);
        assert!(matches!(
            pool.acquire("mario", Class::Interactive, None, false).await,
            Some(Grant::Place)
        ));
        let quiet_longest = pool.offer();
        let quiet_since_now = pool.offer();
        let waiter = wait_for_place(&pool, "anna");
        tokio::time::timeout(Duration::from_secs(1), quiet_longest.asked())
            .await
            .expect("the session quiet the longest is asked");
        let asked = tokio::time::timeout(Duration::from_millis(100), quiet_since_now.asked()).await;
        assert!(asked.is_err(), "one waiter asks one session");
        // The one asked had a command to run after all (its offer is gone): a second later
        // the waiter asks the next.
        drop(quiet_longest);
        tokio::time::timeout(RECHECK * 2, quiet_since_now.asked())
            .await
            .expect("the next session is asked");
        // The place comes free (the lent connection, here just its place): the waiter has it.
        drop(Slot::new(pool.clone()));
        assert!(waiter.await.unwrap());
        assert_eq!(pool.figures().lends, 2);
        // With nobody waiting, an offer is only registered.
        drop(quiet_since_now);
        let idle = pool.offer();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), idle.asked())
                .await
                .is_err()
        );
        // One made while somebody waits is asked at once.
        let waiter = wait_for_place(&pool, "carla");
        tokio::task::yield_now().await;
        while pool.figures().waiting == 0 {
            tokio::task::yield_now().await;
        }
        let late = pool.offer();
        tokio::time::timeout(Duration::from_millis(1), late.asked())
            .await
            .expect("asked at once");
        drop(Slot::new(pool.clone()));
        assert!(waiter.await.unwrap());
        // Quiet long enough, a session lends with nobody asking.
        drop((idle, late));
        let lends = pool.figures().lends;
        let quiet = pool.offer();
        let quiet_for = Duration::from_secs(60);
        let early = tokio::time::timeout(quiet_for / 2, quiet.asked_or_after(Some(quiet_for)));
        assert!(early.await.is_err(), "not before its time");
        tokio::time::timeout(quiet_for * 2, quiet.asked_or_after(Some(quiet_for)))
            .await
            .expect("lent once quiet that long");
        assert_eq!(pool.figures().lends, lends + 1);
    }
}
