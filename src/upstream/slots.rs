//! The bookkeeping of one mailbox's provider connections, as plain data with time passed in
//! (the async side is [`super::pool`]): how many may be open, who waits for one, and who gets
//! the next one that frees.
//!
//! - **The ceiling** is the mailbox's `max_connections`. **The live cap** is what pecgate
//!   uses now: the ceiling, unless the provider refused a login for its own connection limit
//!   (something else, a webmail or another gateway, uses part of the budget). Then the cap
//!   drops to the connections the provider does accept, openings pause with a growing
//!   back-off (1 s doubling to 30 s), and the cap climbs back by one per
//!   [`RAISE_AFTER`] without a refusal. The provider's real limit wins; pecgate finds it.
//! - **The queue is fair between users**: waiters queue per user and users are served in
//!   turn, so one user with many sessions opening at once cannot starve another's single
//!   login. Interactive work (a client logging in) always goes before background work (the
//!   receipts worker), which waits as long as it takes.
//! - A waiter whose attempt the provider refused keeps its place at the head of its user's
//!   queue.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long the live cap stays lowered before pecgate tries one connection more.
pub const RAISE_AFTER: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Who is waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A client waiting for its session: served first.
    Interactive,
    /// Work nobody waits on (the receipts worker): served when no client waits.
    Background,
}

/// One waiter's number, to find it again when it is served or gives up.
pub type WaiterId = u64;

/// A change of the live cap, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapChange {
    pub from: u32,
    pub to: u32,
}

/// The state of one mailbox's connections.
#[derive(Debug)]
pub struct Slots {
    ceiling: u32,
    live_cap: u32,
    /// Connections open or being opened.
    open: u32,
    /// Interactive waiters: one queue per user, users in serving order.
    interactive: VecDeque<(String, VecDeque<WaiterId>)>,
    background: VecDeque<WaiterId>,
    next_id: WaiterId,
    /// No new connection before this (after a refusal).
    paused_until: Option<Instant>,
    backoff: Duration,
    /// When the cap last went down or up, for the next raise.
    last_change: Option<Instant>,
    /// Logins the provider refused for its connection limit, since start.
    limit_refusals: u64,
}

impl Slots {
    pub fn new(ceiling: u32) -> Slots {
        let ceiling = ceiling.max(1);
        Slots {
            ceiling,
            live_cap: ceiling,
            open: 0,
            interactive: VecDeque::new(),
            background: VecDeque::new(),
            next_id: 0,
            paused_until: None,
            backoff: FIRST_BACKOFF,
            last_change: None,
            limit_refusals: 0,
        }
    }

    pub fn ceiling(&self) -> u32 {
        self.ceiling
    }

    pub fn live_cap(&self) -> u32 {
        self.live_cap
    }

    pub fn open(&self) -> u32 {
        self.open
    }

    pub fn limit_refusals(&self) -> u64 {
        self.limit_refusals
    }

    /// Waiters of both classes.
    pub fn waiting(&self) -> usize {
        self.background.len() + self.interactive.iter().map(|(_, q)| q.len()).sum::<usize>()
    }

    /// Whether the cap is below the ceiling because the provider refused logins.
    pub fn limited_by_provider(&self) -> bool {
        self.live_cap < self.ceiling
    }

    /// A slot at once, if one is free and nobody waits before the caller.
    pub fn try_take(&mut self, class: Class, now: Instant) -> bool {
        let ahead = match class {
            Class::Interactive => !self.interactive.is_empty(),
            Class::Background => self.waiting() > 0,
        };
        if ahead || !self.can_open(now) {
            return false;
        }
        self.open += 1;
        true
    }

    /// Join the queue; `first` puts the waiter at the head of its own queue (a retry after a
    /// refusal keeps its place).
    pub fn enqueue(&mut self, user: &str, class: Class, first: bool) -> WaiterId {
        let id = self.next_id;
        self.next_id += 1;
        match class {
            Class::Background if first => self.background.push_front(id),
            Class::Background => self.background.push_back(id),
            Class::Interactive => match self.interactive.iter_mut().find(|(u, _)| u == user) {
                Some((_, queue)) if first => queue.push_front(id),
                Some((_, queue)) => queue.push_back(id),
                None => self
                    .interactive
                    .push_back((user.to_owned(), VecDeque::from([id]))),
            },
        }
        id
    }

    /// Leave the queue. `false`: the waiter is not queued any more, because it was served
    /// (it then holds a slot, which the caller must release).
    pub fn cancel(&mut self, id: WaiterId) -> bool {
        if let Some(at) = self.background.iter().position(|w| *w == id) {
            self.background.remove(at);
            return true;
        }
        for i in 0..self.interactive.len() {
            let queue = &mut self.interactive[i].1;
            if let Some(at) = queue.iter().position(|w| *w == id) {
                queue.remove(at);
                if queue.is_empty() {
                    self.interactive.remove(i);
                }
                return true;
            }
        }
        false
    }

    /// A connection closed (or an opening failed for another reason than the limit): its
    /// slot goes to the next waiters. Returns the waiters served.
    pub fn release(&mut self, now: Instant) -> Vec<WaiterId> {
        self.open = self.open.saturating_sub(1);
        self.serve(now)
    }

    /// The provider accepted a login: the back-off starts over.
    pub fn connected(&mut self) {
        self.backoff = FIRST_BACKOFF;
    }

    /// The provider refused a login for its connection limit. The refused attempt's slot is
    /// given up, the cap drops to the connections still open (at least 1), and openings
    /// pause. Returns the change of the cap, if any.
    pub fn refused_by_limit(&mut self, now: Instant) -> Option<CapChange> {
        self.limit_refusals += 1;
        self.open = self.open.saturating_sub(1);
        self.paused_until = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.last_change = Some(now);
        let lowered = self.open.max(1).min(self.live_cap);
        let change = (lowered != self.live_cap).then_some(CapChange {
            from: self.live_cap,
            to: lowered,
        });
        self.live_cap = lowered;
        change
    }

    /// Time passed: the pause may be over, the cap may rise by one. Returns the change of the
    /// cap and the waiters served.
    pub fn tick(&mut self, now: Instant) -> (Option<CapChange>, Vec<WaiterId>) {
        let mut change = None;
        if self.live_cap < self.ceiling
            && self
                .last_change
                .is_none_or(|at| now.duration_since(at) >= RAISE_AFTER)
        {
            change = Some(CapChange {
                from: self.live_cap,
                to: self.live_cap + 1,
            });
            self.live_cap += 1;
            self.last_change = Some(now);
        }
        (change, self.serve(now))
    }

    /// When [`tick`](Self::tick) may next change something for waiters (the end of a pause,
    /// the next raise); `None` if only a release can.
    pub fn next_wake(&self) -> Option<Instant> {
        if self.waiting() == 0 {
            return None;
        }
        let pause = self.paused_until;
        let raise = (self.live_cap < self.ceiling)
            .then(|| self.last_change.map(|at| at + RAISE_AFTER))
            .flatten();
        match (pause, raise) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A new `max_connections` (reload): a cap the provider lowered stays lowered (it cannot
    /// exceed the new ceiling); otherwise the cap follows the ceiling.
    pub fn set_ceiling(&mut self, ceiling: u32, now: Instant) -> Vec<WaiterId> {
        let ceiling = ceiling.max(1);
        self.live_cap = if self.limited_by_provider() {
            self.live_cap.min(ceiling)
        } else {
            ceiling
        };
        self.ceiling = ceiling;
        self.serve(now)
    }

    fn can_open(&self, now: Instant) -> bool {
        self.open < self.live_cap && self.paused_until.is_none_or(|until| now >= until)
    }

    /// The waiter whose turn it is (interactive ones in turn by user, then background
    /// ones), out of the queue; its place is not counted: for handing over a connection
    /// that is already open.
    pub fn next_waiter(&mut self) -> Option<WaiterId> {
        if let Some((user, mut queue)) = self.interactive.pop_front() {
            let id = queue.pop_front().expect("empty queues are removed");
            if !queue.is_empty() {
                // The user goes to the back of the turn.
                self.interactive.push_back((user, queue));
            }
            return Some(id);
        }
        self.background.pop_front()
    }

    /// Hand free slots to waiters, in turn.
    fn serve(&mut self, now: Instant) -> Vec<WaiterId> {
        if self.paused_until.is_some_and(|until| now >= until) {
            self.paused_until = None;
        }
        let mut served = Vec::new();
        while self.can_open(now) {
            let Some(next) = self.next_waiter() else {
                break;
            };
            self.open += 1;
            served.push(next);
        }
        served
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn takes_up_to_the_ceiling_then_queues() {
        let now = Instant::now();
        let mut slots = Slots::new(2);
        assert!(slots.try_take(Class::Interactive, now));
        assert!(slots.try_take(Class::Interactive, now));
        assert!(!slots.try_take(Class::Interactive, now));
        let waiter = slots.enqueue("mario", Class::Interactive, false);
        assert_eq!(slots.waiting(), 1);
        assert_eq!(slots.release(now), vec![waiter]);
        assert_eq!((slots.open(), slots.waiting()), (2, 0));
    }

    #[test]
    fn users_are_served_in_turn() {
        let now = Instant::now();
        let mut slots = Slots::new(1);
        assert!(slots.try_take(Class::Interactive, now));
        let m1 = slots.enqueue("mario", Class::Interactive, false);
        let m2 = slots.enqueue("mario", Class::Interactive, false);
        let m3 = slots.enqueue("mario", Class::Interactive, false);
        let a1 = slots.enqueue("anna", Class::Interactive, false);
        // Each release serves one: mario, then anna (her turn), then mario's others.
        assert_eq!(slots.release(now), vec![m1]);
        assert_eq!(slots.release(now), vec![a1]);
        assert_eq!(slots.release(now), vec![m2]);
        assert_eq!(slots.release(now), vec![m3]);
        assert_eq!(slots.release(now), Vec::<WaiterId>::new());
        assert_eq!(slots.open(), 0);
    }

    #[test]
    fn background_work_waits_behind_every_client() {
        let now = Instant::now();
        let mut slots = Slots::new(1);
        assert!(slots.try_take(Class::Interactive, now));
        let worker = slots.enqueue("", Class::Background, false);
        let client = slots.enqueue("anna", Class::Interactive, false);
        assert_eq!(slots.release(now), vec![client]);
        assert_eq!(slots.release(now), vec![worker]);
        // A background caller never jumps a queue, even with a slot free.
        let mut slots = Slots::new(2);
        assert!(slots.try_take(Class::Interactive, now));
        assert!(slots.try_take(Class::Interactive, now));
        slots.enqueue("anna", Class::Interactive, false);
        assert!(!slots.try_take(Class::Background, now));
        assert!(!slots.try_take(Class::Interactive, now));
    }

    #[test]
    fn a_cancelled_waiter_is_gone_and_a_served_one_says_so() {
        let now = Instant::now();
        let mut slots = Slots::new(1);
        assert!(slots.try_take(Class::Interactive, now));
        let a = slots.enqueue("mario", Class::Interactive, false);
        let b = slots.enqueue("anna", Class::Interactive, false);
        assert!(slots.cancel(a));
        assert_eq!(slots.release(now), vec![b]);
        // Served already: not in the queue; the caller then holds (and must release) a slot.
        assert!(!slots.cancel(b));
        assert_eq!(slots.open(), 1);
    }

    #[test]
    fn a_limit_refusal_lowers_the_cap_pauses_and_keeps_the_waiters_place() {
        let t0 = Instant::now();
        let mut slots = Slots::new(5);
        for _ in 0..3 {
            assert!(slots.try_take(Class::Interactive, t0));
        }
        // The third opening is refused: the provider takes two.
        assert_eq!(
            slots.refused_by_limit(t0),
            Some(CapChange { from: 5, to: 2 })
        );
        assert!(slots.limited_by_provider());
        assert_eq!(slots.open(), 2);
        let other = slots.enqueue("anna", Class::Interactive, false);
        let retry = slots.enqueue("mario", Class::Interactive, true);
        // A connection closes while openings are paused: nobody is served yet.
        assert_eq!(slots.release(t0), Vec::<WaiterId>::new());
        assert_eq!(slots.next_wake(), Some(at(t0, 1)));
        // The pause is over: the first in turn (anna queued first) goes, within the cap.
        let (change, served) = slots.tick(at(t0, 1));
        assert_eq!((change, served), (None, vec![other]));
        assert_eq!(slots.open(), 2);
        assert_eq!(slots.release(at(t0, 2)), vec![retry]);
    }

    #[test]
    fn back_off_doubles_and_resets_on_success() {
        let t0 = Instant::now();
        let mut slots = Slots::new(1);
        assert!(slots.try_take(Class::Interactive, t0));
        slots.refused_by_limit(t0);
        assert!(!slots.try_take(Class::Interactive, t0));
        assert!(slots.try_take(Class::Interactive, at(t0, 1)));
        slots.refused_by_limit(at(t0, 1));
        assert!(!slots.try_take(Class::Interactive, at(t0, 2)));
        assert!(slots.try_take(Class::Interactive, at(t0, 3)));
        slots.refused_by_limit(at(t0, 3));
        // 4 s now.
        assert!(!slots.try_take(Class::Interactive, at(t0, 6)));
        assert!(slots.try_take(Class::Interactive, at(t0, 7)));
        slots.connected();
        slots.release(at(t0, 8));
        assert!(slots.try_take(Class::Interactive, at(t0, 8)));
        slots.refused_by_limit(at(t0, 8));
        assert!(slots.try_take(Class::Interactive, at(t0, 9)));
        // Never below one connection, never above the 30 s pause.
        assert_eq!(slots.live_cap(), 1);
        for i in 0..20 {
            slots.refused_by_limit(at(t0, 10 + i));
            slots.open += 1;
        }
        assert_eq!(slots.backoff, MAX_BACKOFF);
    }

    #[test]
    fn the_cap_climbs_back_one_at_a_time_without_refusals() {
        let t0 = Instant::now();
        let mut slots = Slots::new(4);
        assert!(slots.try_take(Class::Interactive, t0));
        assert!(slots.try_take(Class::Interactive, t0));
        slots.refused_by_limit(t0);
        assert_eq!(slots.live_cap(), 1);
        assert_eq!(slots.tick(at(t0, 59)).0, None);
        assert_eq!(slots.tick(at(t0, 60)).0, Some(CapChange { from: 1, to: 2 }));
        assert_eq!(slots.tick(at(t0, 100)).0, None);
        assert_eq!(
            slots.tick(at(t0, 120)).0,
            Some(CapChange { from: 2, to: 3 })
        );
        assert_eq!(slots.tick(at(t0, 180)).0.map(|c| c.to), Some(4));
        assert_eq!(slots.tick(at(t0, 600)).0, None);
        assert!(!slots.limited_by_provider());
    }

    #[test]
    fn a_waiter_wakes_for_the_next_raise_when_only_time_can_help() {
        let t0 = Instant::now();
        let mut slots = Slots::new(3);
        assert!(slots.try_take(Class::Interactive, t0));
        assert!(slots.try_take(Class::Interactive, t0));
        slots.refused_by_limit(t0);
        assert_eq!(slots.next_wake(), None, "nobody waits");
        let w = slots.enqueue("mario", Class::Interactive, true);
        assert_eq!(slots.next_wake(), Some(at(t0, 1)));
        assert_eq!(slots.tick(at(t0, 1)).1, Vec::<WaiterId>::new());
        assert_eq!(slots.next_wake(), Some(at(t0, 60)));
        let (change, served) = slots.tick(at(t0, 60));
        assert_eq!(change, Some(CapChange { from: 1, to: 2 }));
        assert_eq!(served, vec![w]);
    }

    #[test]
    fn a_new_ceiling_applies_at_once_but_keeps_a_provider_limit() {
        let t0 = Instant::now();
        let mut slots = Slots::new(2);
        assert!(slots.try_take(Class::Interactive, t0));
        assert!(slots.try_take(Class::Interactive, t0));
        let w = slots.enqueue("mario", Class::Interactive, false);
        assert_eq!(slots.set_ceiling(3, t0), vec![w]);
        assert_eq!(slots.live_cap(), 3);
        // Lowered by the provider to 2: a larger ceiling does not lift that.
        assert_eq!(slots.open(), 3);
        slots.refused_by_limit(t0);
        assert_eq!(slots.live_cap(), 2);
        slots.set_ceiling(10, t0);
        assert_eq!((slots.ceiling(), slots.live_cap()), (10, 2));
        slots.set_ceiling(1, t0);
        assert_eq!(slots.live_cap(), 1);
    }
}
