//! A mailbox's provider connections as one shared budget: [`Pool::connect`] waits, fairly,
//! for a place under the live cap ([`super::slots`] keeps the books), opens a provider session
//! in it, and when the provider refuses that login for its own connection limit, lowers the
//! cap and waits again instead of failing. A [`Slot`] travels with the connection it paid for;
//! dropping the connection gives the place to the next waiter.
//!
//! Clients wait up to `[gateway] connection_wait_secs`; background work (the receipts worker)
//! waits as long as it takes and never before a client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
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
    pub limit_refusals: u64,
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
    wake: HashMap<WaiterId, oneshot::Sender<()>>,
}

impl State {
    /// Tell the waiters `served` they hold a place. One whose wait was abandoned in between
    /// gives its place straight back.
    fn hand_over(&mut self, mut served: Vec<WaiterId>) {
        while !served.is_empty() {
            let mut returned = 0;
            for id in served.drain(..) {
                let delivered = self.wake.remove(&id).is_some_and(|tx| tx.send(()).is_ok());
                if !delivered {
                    returned += 1;
                }
            }
            for _ in 0..returned {
                served.extend(self.slots.release(Instant::now().into_std()));
            }
        }
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

    pub fn figures(&self) -> PoolFigures {
        let state = self.state();
        PoolFigures {
            open: state.slots.open(),
            cap: state.slots.live_cap(),
            ceiling: state.slots.ceiling(),
            waiting: state.slots.waiting(),
            limit_refusals: state.slots.limit_refusals(),
        }
    }

    /// A logged-in provider session, waiting for a place until `deadline` (`None`: as long
    /// as it takes). `user` is whose turn it is in the fair queue.
    pub async fn connect(
        &self,
        target: &ProviderTarget<'_>,
        user: &str,
        class: Class,
        deadline: Option<Instant>,
    ) -> Result<ProviderConnection, PoolError> {
        let started = Instant::now();
        let mut retry = false;
        loop {
            let Some(slot) = self.acquire(user, class, deadline, retry).await else {
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
    ) -> Option<Slot> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.state();
            if !retry && state.slots.try_take(class, now()) {
                return Some(Slot::new(self.clone()));
            }
            let id = state.slots.enqueue(user, class, retry);
            state.wake.insert(id, tx);
            // Perhaps a place is free already (a retry after a pause).
            let (change, served) = state.slots.tick(now());
            self.log_raise(change);
            state.hand_over(served);
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
                served = &mut waiting.rx => {
                    // The sender is only ever used to serve (never dropped while queued).
                    debug_assert!(served.is_ok());
                    waiting.served = true;
                    return Some(Slot::new(self.clone()));
                }
                () = tokio::time::sleep_until(wake.map_or(soon, |w| w.min(soon))) => {
                    let mut state = self.state();
                    let (change, served) = state.slots.tick(now());
                    self.log_raise(change);
                    state.hand_over(served);
                }
                () = sleep_until_some(deadline) => return None,
            }
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
    rx: oneshot::Receiver<()>,
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
            // Served between the last poll and now: the place is ours to return.
            let served = state.slots.release(now());
            state.hand_over(served);
        }
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
