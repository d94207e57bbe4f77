//! The body cache (fetch once): message bytes the provider served, on disk under
//! `state_dir/cache/bodies`, so the provider serves each message once however many employees
//! download it. For speed only, never the archive of record: a miss, an unreadable file or a
//! checksum that does not match goes to the provider.
//!
//! One file per (mailbox, provider folder, UIDVALIDITY, UID), named by the SHA-256 of those
//! (so no folder name or UID shows on disk), written whole under a temporary name and renamed
//! (a crash leaves no partial entry), readable only by pecgate (0600 in a 0700 directory).
//! Each file starts with the SHA-256 of the body, checked on every read. The cache is bounded
//! (`[gateway] body_cache_mib`): past the budget the least recently used bodies go. The books
//! ([`Index`]) are in memory, rebuilt from the directory at start (oldest file first). It
//! never takes the space the audit log needs: nothing is kept while the file system has less
//! than `min_free_space_mb` free beyond the body (a full disk stops the audit, and with it
//! every session).
//!
//! Every function here blocks: callers run them off the async runtime.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::text::hex;

/// What names one cached body.
pub type Key = [u8; 32];

#[derive(Debug, thiserror::Error)]
#[error("body cache {}: {source}", path.display())]
pub struct CacheError {
    path: PathBuf,
    source: std::io::Error,
}

/// The key of a message's body.
pub fn key(mailbox: &str, folder: &str, uidvalidity: u32, uid: u32) -> Key {
    let mut hash = Sha256::new();
    for part in [mailbox.as_bytes(), folder.as_bytes()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.update(uidvalidity.to_be_bytes());
    hash.update(uid.to_be_bytes());
    hash.finalize().into()
}

/// Which bodies are kept, their sizes, and which was used least recently. Pure.
#[derive(Debug, Default)]
pub struct Index {
    entries: HashMap<Key, Entry>,
    total: u64,
    clock: u64,
    budget: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    used: u64,
}

impl Index {
    pub fn new(budget: u64) -> Index {
        Index {
            budget,
            ..Index::default()
        }
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.entries.contains_key(key)
    }

    /// Bytes kept.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A body was served: it is now the most recently used.
    pub fn touch(&mut self, key: &Key) {
        self.clock += 1;
        if let Some(entry) = self.entries.get_mut(key) {
            entry.used = self.clock;
        }
    }

    /// Keep a body of `size` bytes: the keys to delete to stay within the budget (least
    /// recently used first; never the new one). `None`: larger than the whole budget, not
    /// kept.
    pub fn insert(&mut self, key: Key, size: u64) -> Option<Vec<Key>> {
        if size > self.budget {
            return None;
        }
        self.remove(&key);
        self.clock += 1;
        self.entries.insert(
            key,
            Entry {
                size,
                used: self.clock,
            },
        );
        self.total += size;
        let mut evicted = Vec::new();
        if self.total > self.budget {
            let mut by_age: Vec<(u64, Key)> = self
                .entries
                .iter()
                .filter(|(k, _)| **k != key)
                .map(|(k, e)| (e.used, *k))
                .collect();
            by_age.sort_unstable();
            for (_, old) in by_age {
                if self.total <= self.budget {
                    break;
                }
                self.remove(&old);
                evicted.push(old);
            }
        }
        Some(evicted)
    }

    pub fn remove(&mut self, key: &Key) {
        if let Some(entry) = self.entries.remove(key) {
            self.total -= entry.size;
        }
    }
}

/// The cache on disk.
#[derive(Debug)]
pub struct BodyCache {
    dir: PathBuf,
    index: Mutex<Index>,
    /// Largest body kept (larger ones are relayed, never gathered in memory).
    max_body: usize,
    /// Free space left to the rest of `state_dir` (the audit log first).
    reserve: u64,
}

/// Largest single body kept: PEC messages are limited in size by the providers (Aruba: 100
/// MB with attachments); a download this large is rare and is streamed, not gathered.
const MAX_BODY: u64 = 32 * 1024 * 1024;

impl BodyCache {
    /// Open (or create) the cache in `dir` with a budget of `budget` bytes, never filling the
    /// file system past `reserve` free bytes; what is already there is counted, oldest first,
    /// and the excess removed.
    pub fn open(dir: &Path, budget: u64, reserve: u64) -> Result<BodyCache, CacheError> {
        let error = |source| CacheError {
            path: dir.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(error)?;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(error)? {
            let entry = entry.map_err(error)?;
            let name = entry.file_name();
            let path = entry.path();
            let key = name.to_str().and_then(key_from_name);
            let meta = entry.metadata().map_err(error)?;
            match key {
                Some(key) if meta.is_file() => {
                    let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                    found.push((modified, key, meta.len().saturating_sub(32)));
                }
                // A temporary file a crash left, or something that is not pecgate's.
                _ if meta.is_file() => {
                    let _ = fs::remove_file(&path);
                }
                _ => {}
            }
        }
        found.sort_unstable_by_key(|(modified, _, _)| *modified);
        let mut index = Index::new(budget);
        let cache = BodyCache {
            dir: dir.to_owned(),
            index: Mutex::new(Index::new(budget)),
            max_body: budget.min(MAX_BODY) as usize,
            reserve,
        };
        for (_, key, size) in found {
            match index.insert(key, size) {
                Some(evicted) => evicted.iter().for_each(|k| cache.delete(k)),
                None => cache.delete(&key),
            }
        }
        *cache.lock() = index;
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(hex(key))
    }

    fn delete(&self, key: &Key) {
        let _ = fs::remove_file(self.path(key));
    }

    pub fn max_body(&self) -> usize {
        self.max_body
    }

    pub fn has(&self, key: &Key) -> bool {
        self.lock().contains(key)
    }

    /// Bytes kept and bodies, for the metrics.
    pub fn figures(&self) -> (u64, usize) {
        let index = self.lock();
        (index.total(), index.len())
    }

    /// The body, if kept and intact (a damaged entry is removed).
    pub fn read(&self, key: &Key) -> Option<Vec<u8>> {
        if !self.has(key) {
            return None;
        }
        let bytes = fs::read(self.path(key)).ok();
        let body = bytes.and_then(|mut bytes| {
            if bytes.len() < 32 {
                return None;
            }
            let body = bytes.split_off(32);
            (Sha256::digest(&body).as_slice() == bytes.as_slice()).then_some(body)
        });
        match &body {
            Some(_) => self.lock().touch(key),
            None => {
                tracing::warn!("a body cache entry was missing or damaged: removed");
                self.lock().remove(key);
                self.delete(key);
            }
        }
        body
    }

    /// Keep `body` (written whole, then renamed into place), evicting what the budget needs.
    pub fn store(&self, key: &Key, body: &[u8]) -> Result<(), CacheError> {
        if body.len() > self.max_body || self.has(key) {
            return Ok(());
        }
        let free = crate::disk::free_bytes(&self.dir).unwrap_or(0);
        if free < self.reserve.saturating_add(body.len() as u64) {
            tracing::debug!(free, "body not kept: state_dir is short of space");
            return Ok(());
        }
        let path = self.path(key);
        let temporary = self.dir.join(format!("{}.tmp", hex(key)));
        let error = |source| CacheError {
            path: temporary.clone(),
            source,
        };
        let written = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(&Sha256::digest(body))?;
            file.write_all(body)?;
            fs::rename(&temporary, &path)
        })();
        if let Err(source) = written {
            let _ = fs::remove_file(&temporary);
            return Err(error(source));
        }
        let evicted = self.lock().insert(*key, body.len() as u64);
        match evicted {
            Some(evicted) => evicted.iter().for_each(|k| self.delete(k)),
            None => self.delete(key),
        }
        Ok(())
    }
}

/// The key a file is named after (64 lowercase hex digits), if it is one.
fn key_from_name(name: &str) -> Option<Key> {
    if name.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (at, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(at * 2..at * 2 + 2)?, 16).ok()?;
    }
    (hex(&key) == name).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u8) -> Key {
        [n; 32]
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_budget_holds() {
        let mut index = Index::new(100);
        assert_eq!(index.insert(k(1), 40), Some(vec![]));
        assert_eq!(index.insert(k(2), 40), Some(vec![]));
        index.touch(&k(1));
        // 120 > 100: the one used longest ago (2) goes, never the new one.
        assert_eq!(index.insert(k(3), 40), Some(vec![k(2)]));
        assert_eq!(index.total(), 80);
        assert_eq!(index.insert(k(4), 101), None, "larger than the budget");
        assert_eq!(index.insert(k(5), 100), Some(vec![k(1), k(3)]));
        assert_eq!((index.total(), index.len()), (100, 1));
    }

    #[test]
    fn bodies_survive_a_restart_and_damage_is_a_miss() {
        let dir = crate::testing::TempDir::new("body-cache");
        let cache = BodyCache::open(dir.path(), 1000, 0).unwrap();
        let a = key("studio", "INBOX", 7, 1);
        let b = key("studio", "INBOX", 7, 2);
        assert_ne!(a, key("studio", "INBOX", 8, 1));
        cache.store(&a, b"message one").unwrap();
        cache.store(&b, b"message two").unwrap();
        assert_eq!(cache.read(&a).as_deref(), Some(&b"message one"[..]));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(cache.path(&a)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A leftover temporary file is cleared at start; kept bodies are counted again.
        fs::write(dir.path().join("leftover.tmp"), b"x").unwrap();
        drop(cache);
        let cache = BodyCache::open(dir.path(), 1000, 0).unwrap();
        assert!(!dir.path().join("leftover.tmp").exists());
        assert_eq!(cache.figures(), (22, 2));
        // A damaged file is not served, and is gone.
        let mut bytes = fs::read(cache.path(&b)).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(cache.path(&b), bytes).unwrap();
        assert_eq!(cache.read(&b), None);
        assert!(!cache.has(&b));
        // A smaller budget at start keeps the newest.
        drop(cache);
        let cache = BodyCache::open(dir.path(), 15, 0).unwrap();
        assert_eq!(cache.figures(), (11, 1));
        // A file system short of the reserve keeps nothing more.
        let cramped = BodyCache::open(dir.path(), 1000, u64::MAX).unwrap();
        let c = key("studio", "INBOX", 7, 3);
        cramped.store(&c, b"message three").unwrap();
        assert!(!cramped.has(&c));
    }
}
