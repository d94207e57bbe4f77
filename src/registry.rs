//! The sessions that are logged in right now, IMAP and SMTP: what `pecgate sessions` lists,
//! what `pecgate sessions kick` and a reload end, and what the metrics count.
//!
//! A session registers when its login succeeds and holds a [`Registration`]; dropping it
//! removes the entry, so no exit path leaves a ghost. Ending a session is asking it: its
//! [`Stop`] is cancelled with a reason, and the session says goodbye at its next boundary
//! (`* BYE` / `421`) and records the reason. Plain data behind a mutex held for microseconds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// How a session is asked to end: pecgate's shutdown, or a reason of its own (revoked by a
/// reload, kicked by an admin). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Stop {
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Stop {
    /// A session's own stop, also triggered by `shutdown`.
    pub fn child_of(shutdown: &CancellationToken) -> Stop {
        Stop {
            token: shutdown.child_token(),
            reason: Arc::new(Mutex::new(None)),
        }
    }

    /// End this session only, saying why (the first reason given wins).
    pub fn end(&self, reason: &str) {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| reason.to_owned());
        self.token.cancel();
    }

    /// Why this session was ended, if it was ended on its own (not by pecgate's shutdown).
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn stopped(&self) {
        self.token.cancelled().await
    }
}

/// What is known of a logged-in session.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionInfo {
    pub session: String,
    pub user: String,
    pub mailbox: String,
    pub protocol: String,
    pub peer: SocketAddr,
    /// RFC 3339, UTC.
    pub since: String,
    /// The folder selected (IMAP), if any.
    pub folder: Option<String>,
}

struct Entry {
    info: SessionInfo,
    stop: Stop,
}

/// Every logged-in session.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
}

/// A session's place in the registry; dropping it removes the entry.
pub struct Registration {
    registry: Arc<Registry>,
    key: u64,
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a session that has just logged in.
    pub fn register(self: &Arc<Self>, info: SessionInfo, stop: Stop) -> Registration {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.entries().insert(key, Entry { info, stop });
        Registration {
            registry: self.clone(),
            key,
        }
    }

    /// Every session, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        // `since` is RFC 3339 in UTC with a fixed width: it sorts as text.
        let mut all: Vec<SessionInfo> = self.entries().values().map(|e| e.info.clone()).collect();
        all.sort_by(|a, b| (&a.since, &a.session).cmp(&(&b.since, &b.session)));
        all
    }

    /// End the sessions `select` picks, each with the reason it returns; how many.
    pub fn end_where(&self, mut select: impl FnMut(&SessionInfo) -> Option<String>) -> usize {
        let entries = self.entries();
        let mut ended = 0;
        for entry in entries.values() {
            if let Some(reason) = select(&entry.info) {
                entry.stop.end(&reason);
                ended += 1;
            }
        }
        ended
    }

    /// Sessions per (protocol, mailbox), for the metrics.
    pub fn counts(&self) -> HashMap<(String, String), usize> {
        let mut counts = HashMap::new();
        for entry in self.entries().values() {
            *counts
                .entry((entry.info.protocol.clone(), entry.info.mailbox.clone()))
                .or_insert(0) += 1;
        }
        counts
    }
}

impl Registration {
    /// Record the folder the session has selected (IMAP), for `pecgate sessions`.
    pub fn set_folder(&self, folder: Option<&str>) {
        if let Some(entry) = self.registry.entries().get_mut(&self.key)
            && entry.info.folder.as_deref() != folder
        {
            entry.info.folder = folder.map(str::to_owned);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.entries().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(session: &str, user: &str) -> SessionInfo {
        SessionInfo {
            session: session.into(),
            user: user.into(),
            mailbox: "studio".into(),
            protocol: "imap".into(),
            peer: "127.0.0.1:5000".parse().unwrap(),
            since: "2026-11-29T00:00:00Z".into(),
            folder: None,
        }
    }

    #[test]
    fn sessions_are_listed_ended_and_gone_when_dropped() {
        let shutdown = CancellationToken::new();
        let registry = Registry::new();
        let (mario, anna) = (Stop::child_of(&shutdown), Stop::child_of(&shutdown));
        let a = registry.register(info("a", "mario"), mario.clone());
        let b = registry.register(info("b", "anna"), anna.clone());
        a.set_folder(Some("INBOX"));
        let listed = registry.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].folder.as_deref(), Some("INBOX"));
        let ended = registry.end_where(|s| (s.user == "mario").then(|| "kicked".to_owned()));
        assert_eq!(ended, 1);
        assert!(mario.is_stopped() && !anna.is_stopped());
        assert_eq!(mario.reason().as_deref(), Some("kicked"));
        drop(a);
        assert_eq!(registry.list().len(), 1);
        // pecgate's shutdown stops everyone, with no reason of their own.
        shutdown.cancel();
        assert!(anna.is_stopped());
        assert_eq!(anna.reason(), None);
        drop(b);
        assert!(registry.counts().is_empty());
    }
}
