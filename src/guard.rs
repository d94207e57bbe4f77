//! Abuse guards shared by both front ends, as bookkeeping without I/O:
//!
//! - [`Admission`]: who may hold a connection. A connection that has not logged in holds a
//!   *pre-login* ticket, from a smaller pool (`max_preauth_connections`) and at most
//!   `max_preauth_per_address` per client address; a successful login turns it into a
//!   *session* ticket, counted against `max_sessions` and `max_sessions_per_user`. Tickets give
//!   their place back when dropped, so no exit path can leak one.
//! - [`LoginThrottle`]: failed logins counted per client address and per user name in a fixed
//!   window. Past a few failures each further failure is answered more slowly (doubling up to a
//!   cap); past the threshold the address (or the user) is locked for a while, and attempts are
//!   refused without checking the password. While a user is locked, addresses that recently
//!   logged in as that user keep working, so an attacker cannot lock an employee out of their
//!   own desk.
//!
//! Both are plain data behind a mutex held for microseconds; time comes in as an argument so the
//! rules are tested without waiting. IPv6 clients are counted per /64, the block one host
//! usually holds, so an attacker cannot dodge the limits by walking its own addresses.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::GatewayConfig;

/// The part of a client address that limits count against (IPv6 per /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddressKey(IpAddr);

impl AddressKey {
    pub fn of(address: IpAddr) -> AddressKey {
        match address {
            IpAddr::V4(_) => AddressKey(address),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey(IpAddr::V4(v4)),
                None => {
                    let mut segments = v6.segments();
                    segments[4..].fill(0);
                    AddressKey(IpAddr::V6(segments.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

// ---------------------------------------------------------------------------
// Admission
// ---------------------------------------------------------------------------

/// Connection limits (from `[gateway]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    pub max_preauth: usize,
    pub max_preauth_per_address: usize,
    pub max_sessions: usize,
    pub max_sessions_per_user: usize,
}

impl AdmissionLimits {
    pub fn from_config(g: &GatewayConfig) -> AdmissionLimits {
        AdmissionLimits {
            max_preauth: g.max_preauth_connections,
            max_preauth_per_address: g.max_preauth_per_address,
            max_sessions: g.max_sessions,
            max_sessions_per_user: g.max_sessions_per_user,
        }
    }
}

/// Why a connection or a session was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionRefused {
    #[error("max_preauth_connections reached")]
    PreauthFull,
    #[error("max_preauth_per_address reached")]
    AddressFull,
    #[error("max_sessions reached")]
    SessionsFull,
    #[error("max_sessions_per_user reached")]
    UserFull,
}

#[derive(Default)]
struct Counts {
    preauth: usize,
    per_address: HashMap<AddressKey, usize>,
    sessions: usize,
    per_user: HashMap<String, usize>,
}

/// Connection and session counters shared by every listener.
pub struct Admission {
    limits: Mutex<AdmissionLimits>,
    counts: Mutex<Counts>,
}

enum Place {
    Preauth(AddressKey),
    Session(String),
}

/// A connection's place: pre-login until [`Admission::promote`] succeeds, then a session.
/// Dropping it gives the place back.
pub struct Ticket {
    admission: Arc<Admission>,
    place: Place,
    address: AddressKey,
}

fn decrement<K: Eq + Hash>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = map.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            map.remove(key);
        }
    }
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits: Mutex::new(limits),
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counters stay consistent even if a holder panicked: every update is one step.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New limits (a reload): places already held are kept; the limits apply to new ones.
    pub fn set_limits(&self, limits: AdmissionLimits) {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    /// A pre-login place for a new connection from `address`.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Ticket, AdmissionRefused> {
        let key = AddressKey::of(address);
        let limits = self.limits();
        let mut counts = self.counts();
        if counts.preauth >= limits.max_preauth {
            return Err(AdmissionRefused::PreauthFull);
        }
        let from_address = counts.per_address.entry(key).or_insert(0);
        if *from_address >= limits.max_preauth_per_address {
            return Err(AdmissionRefused::AddressFull);
        }
        *from_address += 1;
        counts.preauth += 1;
        Ok(Ticket {
            admission: self.clone(),
            place: Place::Preauth(key),
            address: key,
        })
    }

    /// Turn a pre-login place into a session of `user`. On refusal the ticket is unchanged.
    /// A ticket that already is a session stays one (a session's user does not change; a
    /// login that fails after its password check gives the place back with `demote`).
    pub fn promote(&self, ticket: &mut Ticket, user: &str) -> Result<(), AdmissionRefused> {
        let Place::Preauth(key) = ticket.place else {
            return Ok(());
        };
        let limits = self.limits();
        let mut counts = self.counts();
        if counts.sessions >= limits.max_sessions {
            return Err(AdmissionRefused::SessionsFull);
        }
        let of_user = counts.per_user.get(user).copied().unwrap_or(0);
        if of_user >= limits.max_sessions_per_user {
            return Err(AdmissionRefused::UserFull);
        }
        counts.per_user.insert(user.to_owned(), of_user + 1);
        counts.sessions += 1;
        counts.preauth -= 1;
        decrement(&mut counts.per_address, &key);
        ticket.place = Place::Session(user.to_owned());
        Ok(())
    }

    /// Connections not logged in, and sessions, right now.
    pub fn load(&self) -> (usize, usize) {
        let counts = self.counts();
        (counts.preauth, counts.sessions)
    }

    pub fn limits(&self) -> AdmissionLimits {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Ticket {
    /// Promote through the admission this ticket came from.
    pub fn promote(&mut self, user: &str) -> Result<(), AdmissionRefused> {
        let admission = self.admission.clone();
        admission.promote(self, user)
    }

    /// Back to a pre-login place (the login did not complete after all: the provider
    /// refused it); the connection may try again, as any user.
    pub fn demote(&mut self) {
        let Place::Session(user) = &self.place else {
            return;
        };
        let mut counts = self.admission.counts();
        counts.sessions -= 1;
        decrement(&mut counts.per_user, user);
        counts.preauth += 1;
        *counts.per_address.entry(self.address).or_insert(0) += 1;
        drop(counts);
        self.place = Place::Preauth(self.address);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = self.admission.counts();
        match &self.place {
            Place::Preauth(key) => {
                counts.preauth -= 1;
                decrement(&mut counts.per_address, key);
            }
            Place::Session(user) => {
                counts.sessions -= 1;
                decrement(&mut counts.per_user, user);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Login throttle
// ---------------------------------------------------------------------------

/// Brute-force limits (from `[gateway]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrottleSettings {
    /// Failures from one address within `window` that lock the address.
    pub address_failures: u32,
    /// Failures for one user name (from anywhere) within `window` that lock the user.
    pub user_failures: u32,
    pub window: Duration,
    /// How long a lock lasts.
    pub lockout: Duration,
    /// The delay before any failure is answered (`login_failure_delay_ms`).
    pub base_delay: Duration,
}

impl ThrottleSettings {
    pub fn from_config(g: &GatewayConfig) -> ThrottleSettings {
        ThrottleSettings {
            address_failures: g.lockout.address_failures,
            user_failures: g.lockout.user_failures,
            window: g.lockout.window,
            lockout: g.lockout.duration,
            base_delay: g.login_failure_delay,
        }
    }
}

/// Failures answered with the base delay; each one after these doubles it.
const FREE_FAILURES: u32 = 3;
/// The longest a failure answer is held back (locked attempts wait this long too).
pub const MAX_FAILURE_DELAY: Duration = Duration::from_secs(30);
/// Entries kept per table; past it, the stalest unlocked entries go first.
const MAX_TRACKED: usize = 65_536;
/// How long a successful login keeps its address trusted for that user.
const TRUSTED_FOR: Duration = Duration::from_secs(30 * 24 * 3600);

/// What is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockScope {
    Address,
    User,
}

impl LockScope {
    pub fn as_str(self) -> &'static str {
        match self {
            LockScope::Address => "address",
            LockScope::User => "user",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Tally {
    failures: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

impl Tally {
    fn new(now: Instant) -> Tally {
        Tally {
            failures: 0,
            window_start: now,
            locked_until: None,
        }
    }

    fn locked(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|until| now < until)
    }

    /// Failures in the current window (a window that has passed starts over).
    fn refresh(&mut self, now: Instant, window: Duration) -> u32 {
        if now.duration_since(self.window_start) >= window {
            self.failures = 0;
            self.window_start = now;
        }
        if self.locked_until.is_some_and(|until| now >= until) {
            self.locked_until = None;
        }
        self.failures
    }

    fn stale(&self, now: Instant, window: Duration) -> bool {
        !self.locked(now) && now.duration_since(self.window_start) >= window
    }
}

/// What to do with a login attempt before checking its password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Check,
    /// Refuse without checking, answered like a wrong password after [`MAX_FAILURE_DELAY`].
    Locked(LockScope),
}

/// What a failure leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AfterFailure {
    /// How long after the attempt began the refusal may be answered.
    pub delay: Duration,
    /// Set when this failure locked the address or the user.
    pub locked: Option<LockScope>,
}

/// Failed-login bookkeeping.
pub struct LoginThrottle {
    settings: ThrottleSettings,
    addresses: HashMap<AddressKey, Tally>,
    users: HashMap<String, Tally>,
    trusted: HashMap<(String, AddressKey), Instant>,
}

/// Make room for one more entry: drop stale ones, then the oldest unlocked ones.
fn make_room<K: Clone + Eq + Hash>(map: &mut HashMap<K, Tally>, now: Instant, window: Duration) {
    if map.len() < MAX_TRACKED {
        return;
    }
    map.retain(|_, t| !t.stale(now, window));
    while map.len() >= MAX_TRACKED {
        let oldest = map
            .iter()
            .filter(|(_, t)| !t.locked(now))
            .min_by_key(|(_, t)| t.window_start)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(key) => map.remove(&key),
            // Everything is locked: keep the locks; the caller counts nothing new.
            None => break,
        };
    }
}

impl LoginThrottle {
    pub fn new(settings: ThrottleSettings) -> LoginThrottle {
        LoginThrottle {
            settings,
            addresses: HashMap::new(),
            users: HashMap::new(),
            trusted: HashMap::new(),
        }
    }

    fn is_trusted(&self, user: &str, address: AddressKey, now: Instant) -> bool {
        self.trusted
            .get(&(user.to_owned(), address))
            .is_some_and(|&since| now.duration_since(since) < TRUSTED_FOR)
    }

    /// Before checking a password for `user` from `address`.
    pub fn before_attempt(&mut self, user: &str, address: IpAddr, now: Instant) -> Verdict {
        let key = AddressKey::of(address);
        if let Some(tally) = self.addresses.get_mut(&key) {
            tally.refresh(now, self.settings.window);
            if tally.locked(now) {
                return Verdict::Locked(LockScope::Address);
            }
        }
        if let Some(tally) = self.users.get_mut(user) {
            tally.refresh(now, self.settings.window);
            if tally.locked(now) && !self.is_trusted(user, key, now) {
                return Verdict::Locked(LockScope::User);
            }
        }
        Verdict::Check
    }

    /// The delay for the refusal of the `failures`-th failure in the window.
    fn delay_after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(FREE_FAILURES).min(16);
        self.settings
            .base_delay
            .saturating_mul(1 << doublings)
            .min(MAX_FAILURE_DELAY.max(self.settings.base_delay))
    }

    /// Record a wrong password (or unknown or disabled user).
    pub fn on_failure(&mut self, user: &str, address: IpAddr, now: Instant) -> AfterFailure {
        let key = AddressKey::of(address);
        let settings = self.settings;
        make_room(&mut self.addresses, now, settings.window);
        make_room(&mut self.users, now, settings.window);
        let mut locked = None;
        if (self.addresses.len() >= MAX_TRACKED && !self.addresses.contains_key(&key))
            || (self.users.len() >= MAX_TRACKED && !self.users.contains_key(user))
        {
            // Every tracked entry is locked: nothing new can be counted (the tables stay
            // bounded); the failure gets the longest delay.
            return AfterFailure {
                delay: MAX_FAILURE_DELAY.max(settings.base_delay),
                locked: None,
            };
        }
        let address_tally = self.addresses.entry(key).or_insert(Tally::new(now));
        let before_address = address_tally.refresh(now, settings.window);
        address_tally.failures += 1;
        if address_tally.failures >= settings.address_failures {
            address_tally.locked_until = Some(now + settings.lockout);
            address_tally.failures = 0;
            address_tally.window_start = now;
            locked = Some(LockScope::Address);
        }
        let user_tally = self.users.entry(user.to_owned()).or_insert(Tally::new(now));
        let before_user = user_tally.refresh(now, settings.window);
        user_tally.failures += 1;
        if user_tally.failures >= settings.user_failures {
            user_tally.locked_until = Some(now + settings.lockout);
            user_tally.failures = 0;
            user_tally.window_start = now;
            locked = locked.or(Some(LockScope::User));
        }
        AfterFailure {
            // Counting this failure: the first FREE_FAILURES get the base delay.
            delay: self.delay_after(before_address.max(before_user) + 1),
            locked,
        }
    }

    /// Record a good login: the address's failures are forgiven and it is trusted for `user`.
    pub fn on_success(&mut self, user: &str, address: IpAddr, now: Instant) {
        let key = AddressKey::of(address);
        if let Some(tally) = self.addresses.get_mut(&key)
            && !tally.locked(now)
        {
            tally.failures = 0;
        }
        if self.trusted.len() >= MAX_TRACKED {
            self.trusted
                .retain(|_, since| now.duration_since(*since) < TRUSTED_FOR);
            if self.trusted.len() >= MAX_TRACKED {
                self.trusted.clear();
            }
        }
        self.trusted.insert((user.to_owned(), key), now);
    }

    pub fn settings(&self) -> ThrottleSettings {
        self.settings
    }

    /// New settings (a reload); the counts so far are kept.
    pub fn set_settings(&mut self, settings: ThrottleSettings) {
        self.settings = settings;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            max_preauth: 3,
            max_preauth_per_address: 2,
            max_sessions: 2,
            max_sessions_per_user: 1,
        }
    }

    #[test]
    fn preauth_places_per_address_and_in_total() {
        let admission = Admission::new(limits());
        let a1 = admission.admit(ip("10.0.0.1")).unwrap();
        let _a2 = admission.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            admission.admit(ip("10.0.0.1")).err(),
            Some(AdmissionRefused::AddressFull)
        );
        let _b1 = admission.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(
            admission.admit(ip("10.0.0.3")).err(),
            Some(AdmissionRefused::PreauthFull)
        );
        drop(a1);
        let _a3 = admission.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(admission.load(), (3, 0));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let admission = Admission::new(limits());
        let _x = admission.admit(ip("2001:db8:1:2::1")).unwrap();
        let _y = admission.admit(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(
            admission.admit(ip("2001:db8:1:2::77")).err(),
            Some(AdmissionRefused::AddressFull)
        );
        assert_eq!(
            AddressKey::of(ip("::ffff:10.0.0.1")),
            AddressKey::of(ip("10.0.0.1"))
        );
    }

    #[test]
    fn promotion_frees_the_preauth_place_and_counts_per_user() {
        let admission = Admission::new(limits());
        let mut a = admission.admit(ip("10.0.0.1")).unwrap();
        let mut b = admission.admit(ip("10.0.0.1")).unwrap();
        a.promote("mario").unwrap();
        assert_eq!(admission.load(), (1, 1));
        // The address has a free pre-login place again.
        let mut c = admission.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(b.promote("mario"), Err(AdmissionRefused::UserFull));
        b.promote("anna").unwrap();
        assert_eq!(c.promote("luca"), Err(AdmissionRefused::SessionsFull));
        drop(a);
        c.promote("luca").unwrap();
        assert_eq!(admission.load(), (0, 2));
        // A login the provider then refused: back to pre-login, the user's place freed.
        b.demote();
        assert_eq!(admission.load(), (1, 1));
        let mut d = admission.admit(ip("10.0.0.9")).unwrap();
        d.promote("zoe").unwrap();
        assert_eq!(b.promote("anna"), Err(AdmissionRefused::SessionsFull));
        drop(d);
        b.promote("anna").unwrap();
        drop((b, c));
        assert_eq!(admission.load(), (0, 0));
        assert!(admission.counts().per_user.is_empty());
        assert!(admission.counts().per_address.is_empty());
    }

    fn settings() -> ThrottleSettings {
        ThrottleSettings {
            address_failures: 5,
            user_failures: 8,
            window: Duration::from_secs(900),
            lockout: Duration::from_secs(900),
            base_delay: Duration::from_millis(1500),
        }
    }

    #[test]
    fn delay_doubles_after_the_free_failures_up_to_the_cap() {
        let mut throttle = LoginThrottle::new(ThrottleSettings {
            address_failures: 100,
            user_failures: 100,
            ..settings()
        });
        let now = Instant::now();
        let delays: Vec<u64> = (0..10)
            .map(|i| {
                let address = ip(&format!("10.0.0.{i}"));
                throttle.on_failure("mario", address, now).delay.as_millis() as u64
            })
            .collect();
        // Counted per user even though every attempt came from a new address.
        assert_eq!(
            delays,
            [
                1500, 1500, 1500, 3000, 6000, 12000, 24000, 30000, 30000, 30000
            ]
        );
    }

    #[test]
    fn an_address_is_locked_for_the_lockout_then_free() {
        let mut throttle = LoginThrottle::new(settings());
        let t0 = Instant::now();
        let a = ip("192.0.2.7");
        for i in 0..4 {
            let after = throttle.on_failure(&format!("user{i}"), a, t0);
            assert_eq!(after.locked, None);
            assert_eq!(throttle.before_attempt("anyone", a, t0), Verdict::Check);
        }
        let after = throttle.on_failure("user4", a, t0);
        assert_eq!(after.locked, Some(LockScope::Address));
        let later = t0 + Duration::from_secs(899);
        assert_eq!(
            throttle.before_attempt("anyone", a, later),
            Verdict::Locked(LockScope::Address)
        );
        // Other addresses are unaffected.
        assert_eq!(
            throttle.before_attempt("anyone", ip("192.0.2.8"), later),
            Verdict::Check
        );
        let free = t0 + Duration::from_secs(900);
        assert_eq!(throttle.before_attempt("anyone", a, free), Verdict::Check);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let mut throttle = LoginThrottle::new(settings());
        let a = ip("192.0.2.7");
        let mut now = Instant::now();
        for _ in 0..20 {
            assert_eq!(throttle.on_failure("mario", a, now).locked, None);
            now += Duration::from_secs(300); // 3 per 15 minutes stays below 5
        }
    }

    #[test]
    fn a_locked_user_keeps_working_from_a_trusted_address() {
        let mut throttle = LoginThrottle::new(settings());
        let t0 = Instant::now();
        let desk = ip("10.1.1.1");
        throttle.on_success("mario", desk, t0);
        let mut locked = None;
        for i in 0..8 {
            locked = throttle
                .on_failure("mario", ip(&format!("198.51.100.{i}")), t0)
                .locked;
        }
        assert_eq!(locked, Some(LockScope::User));
        assert_eq!(
            throttle.before_attempt("mario", ip("198.51.100.200"), t0),
            Verdict::Locked(LockScope::User)
        );
        assert_eq!(throttle.before_attempt("mario", desk, t0), Verdict::Check);
        assert_eq!(
            throttle.before_attempt("anna", ip("198.51.100.200"), t0),
            Verdict::Check
        );
    }

    #[test]
    fn success_forgives_the_address_but_not_a_lock() {
        let mut throttle = LoginThrottle::new(settings());
        let t0 = Instant::now();
        let a = ip("10.9.9.9");
        for _ in 0..4 {
            throttle.on_failure("mario", a, t0);
        }
        throttle.on_success("mario", a, t0);
        assert_eq!(throttle.on_failure("mario", a, t0).locked, None);
        for _ in 0..3 {
            throttle.on_failure("x", a, t0);
        }
        assert_eq!(
            throttle.on_failure("x", a, t0).locked,
            Some(LockScope::Address)
        );
        throttle.on_success("x", a, t0);
        assert_eq!(
            throttle.before_attempt("x", a, t0),
            Verdict::Locked(LockScope::Address)
        );
    }

    #[test]
    fn tables_stay_bounded_under_address_walking() {
        let mut throttle = LoginThrottle::new(ThrottleSettings {
            address_failures: 1000,
            user_failures: 1000,
            ..settings()
        });
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 100) {
            let address = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            throttle.on_failure("mario", address, t0);
        }
        assert!(throttle.addresses.len() <= MAX_TRACKED);
    }
}
