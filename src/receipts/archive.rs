//! The receipts archive: every receipt and incoming envelope stored byte for byte as the
//! provider served it, before anything else happens to it.
//!
//! Files are content-addressed: `state_dir/archive/ab/abcdef….eml`, named by their SHA-256,
//! written to a temporary file, fsynced, renamed into place and the directory fsynced, so a
//! crash leaves either the whole file or none. An index (`state_dir/archive/index.sqlite`,
//! WAL, `synchronous=FULL`) records where each one came from (mailbox, folder, UIDVALIDITY,
//! UID) and what it is. Storing is idempotent: the same message at the same place is stored
//! once, whatever restarts happen between, and the same bytes are one file however many
//! places they came from.
//!
//! Blocking (file and SQLite I/O): call it from a dedicated thread or `spawn_blocking`.

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::classify::Classified;

/// Errors of the archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("archive index: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("archive {}: a stored file does not match its name (expected {expected})", path.display())]
    Corrupt { path: PathBuf, expected: String },
}

/// Where a message was found in the mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin<'a> {
    pub mailbox: &'a str,
    pub folder: &'a str,
    pub uidvalidity: u32,
    pub uid: u32,
}

/// What storing did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub sha256: String,
    /// False when this message at this place was already archived (a restart, a re-scan).
    pub new: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS archived (
    mailbox       TEXT NOT NULL,
    folder        TEXT NOT NULL,
    uidvalidity   INTEGER NOT NULL,
    uid           INTEGER NOT NULL,
    sha256        TEXT NOT NULL,
    size          INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    message_id    TEXT,
    identificativo TEXT,
    consegna      TEXT,
    certified_at  TEXT,
    note          TEXT,
    archived_at   TEXT NOT NULL,
    PRIMARY KEY (mailbox, folder, uidvalidity, uid)
);
CREATE INDEX IF NOT EXISTS archived_message ON archived (message_id);
CREATE INDEX IF NOT EXISTS archived_hash ON archived (sha256);
CREATE TABLE IF NOT EXISTS scanned (
    mailbox     TEXT NOT NULL,
    folder      TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    filing      INTEGER NOT NULL,
    last_uid    INTEGER NOT NULL,
    PRIMARY KEY (mailbox, folder, uidvalidity, filing)
);
";

/// One archived message as the index lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Archived {
    pub mailbox: String,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub sha256: String,
    pub kind: String,
    pub message_id: Option<String>,
    /// Why it could not be classified (or a warning on a known kind).
    pub note: Option<String>,
    pub archived_at: String,
}

/// The messages archived as `unknown` (PEC headers that could not be read with certainty),
/// oldest first, from the index in `dir` opened read-only (beside a running pecgate). An
/// archive not created yet lists nothing.
pub fn unclassified(dir: &Path) -> Result<Vec<Archived>, ArchiveError> {
    let path = dir.join("index.sqlite");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let index = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    index.busy_timeout(std::time::Duration::from_secs(5))?;
    let mut stmt = index.prepare(
        "SELECT mailbox, folder, uidvalidity, uid, sha256, kind, message_id, note, archived_at \
         FROM archived WHERE kind = 'unknown' ORDER BY archived_at",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Archived {
            mailbox: r.get(0)?,
            folder: r.get(1)?,
            uidvalidity: r.get(2)?,
            uid: r.get(3)?,
            sha256: r.get(4)?,
            kind: r.get(5)?,
            message_id: r.get(6)?,
            note: r.get(7)?,
            archived_at: r.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The archive under `state_dir/archive`.
pub struct Archive {
    dir: PathBuf,
    index: Connection,
}

/// The file of the message stored as `sha256` in the archive directory `dir`.
pub fn file_path(dir: &Path, sha256: &str) -> PathBuf {
    dir.join(sha256.get(..2).unwrap_or("00"))
        .join(format!("{sha256}.eml"))
}

/// The SHA-256 of `bytes`, lower-case hex: the name archived files go by.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

use crate::text::hex;

impl Archive {
    /// Open (creating) the archive in `dir` (0700).
    pub fn open(dir: &Path) -> Result<Archive, ArchiveError> {
        let io = |source| ArchiveError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io)?;
        let index = Connection::open(dir.join("index.sqlite"))?;
        // One index for every mailbox's worker: wait for each other's commits.
        index.busy_timeout(std::time::Duration::from_secs(10))?;
        index.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        index.execute_batch("PRAGMA synchronous = FULL")?;
        index.execute_batch(SCHEMA)?;
        Ok(Archive {
            dir: dir.to_owned(),
            index,
        })
    }

    /// The file of a stored message.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        file_path(&self.dir, sha256)
    }

    /// The hash already archived for this place, if any.
    pub fn archived_at(&self, origin: &Origin<'_>) -> Result<Option<String>, ArchiveError> {
        Ok(self
            .index
            .query_row(
                "SELECT sha256 FROM archived WHERE mailbox = ?1 AND folder = ?2 \
                 AND uidvalidity = ?3 AND uid = ?4",
                params![
                    origin.mailbox,
                    origin.folder,
                    origin.uidvalidity,
                    origin.uid
                ],
                |row| row.get(0),
            )
            .optional()?)
    }

    /// Store `raw` (as served) found at `origin`, classified as `what`: the file first
    /// (durably), then its index row. Idempotent.
    pub fn store(
        &mut self,
        origin: &Origin<'_>,
        raw: &[u8],
        what: &Classified,
    ) -> Result<Stored, ArchiveError> {
        let sha256 = hex(&Sha256::digest(raw));
        if let Some(known) = self.archived_at(origin)? {
            return Ok(Stored {
                sha256: known,
                new: false,
            });
        }
        self.write_file(&sha256, raw)?;
        let d = what.daticert.as_ref();
        self.index.execute(
            "INSERT OR IGNORE INTO archived (mailbox, folder, uidvalidity, uid, sha256, size, \
             kind, message_id, identificativo, consegna, certified_at, note, archived_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                origin.mailbox,
                origin.folder,
                origin.uidvalidity,
                origin.uid,
                sha256,
                raw.len() as i64,
                what.kind.as_str(),
                what.original_message_id,
                d.and_then(|d| d.identificativo.clone()),
                d.and_then(|d| d.consegna.clone()),
                d.and_then(|d| d.at.clone()),
                what.note,
                crate::audit::format_timestamp(std::time::SystemTime::now()),
            ],
        )?;
        Ok(Stored { sha256, new: true })
    }

    /// Write the file for `sha256` unless an intact one is there.
    fn write_file(&self, sha256: &str, raw: &[u8]) -> Result<(), ArchiveError> {
        let path = self.path_of(sha256);
        let parent = path.parent().expect("archive files sit in a subdirectory");
        let io = |source| ArchiveError::Io {
            path: path.clone(),
            source,
        };
        if let Ok(existing) = std::fs::read(&path) {
            if hex(&Sha256::digest(&existing)) == sha256 {
                return Ok(());
            }
            // A damaged file (a crash mid-write cannot leave one, a disk can): rewrite it.
            tracing::warn!(path = %path.display(), "archived file did not match its hash: rewritten");
        }
        std::fs::create_dir_all(parent).map_err(io)?;
        let temp = parent.join(format!(".{sha256}.{}.tmp", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(io)?;
        file.write_all(raw).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&temp, &path).map_err(io)?;
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// The highest UID of `folder` (at `uidvalidity`) every message up to which has been
    /// dealt with by a worker that files receipts (`filing`) or leaves them in place. Kept
    /// apart per `filing`, so that setting a `receipts_folder` later rescans the folder and
    /// files the receipts already archived there.
    pub fn scanned_up_to(
        &self,
        mailbox: &str,
        folder: &str,
        uidvalidity: u32,
        filing: bool,
    ) -> Result<u32, ArchiveError> {
        Ok(self
            .index
            .query_row(
                "SELECT last_uid FROM scanned WHERE mailbox = ?1 AND folder = ?2 \
                 AND uidvalidity = ?3 AND filing = ?4",
                params![mailbox, folder, uidvalidity, filing],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    /// Record that every message of `folder` up to `last_uid` has been dealt with.
    pub fn set_scanned(
        &self,
        mailbox: &str,
        folder: &str,
        uidvalidity: u32,
        filing: bool,
        last_uid: u32,
    ) -> Result<(), ArchiveError> {
        self.index.execute(
            "INSERT INTO scanned (mailbox, folder, uidvalidity, filing, last_uid) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (mailbox, folder, uidvalidity, filing) \
             DO UPDATE SET last_uid = max(last_uid, excluded.last_uid)",
            params![mailbox, folder, uidvalidity, filing, last_uid],
        )?;
        Ok(())
    }

    /// Check a stored file against its name.
    pub fn verify(&self, sha256: &str) -> Result<(), ArchiveError> {
        let path = self.path_of(sha256);
        let bytes = std::fs::read(&path).map_err(|source| ArchiveError::Io {
            path: path.clone(),
            source,
        })?;
        if hex(&Sha256::digest(&bytes)) != sha256 {
            return Err(ArchiveError::Corrupt {
                path,
                expected: sha256.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receipts::classify::classify;

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "pecgate-archive-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        TempDir(dir)
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/receipts")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn stored_once_byte_for_byte_across_reopens() {
        let dir = temp("once");
        let raw = fixture("fattura-3-consegna-completa.eml");
        let what = classify(&raw);
        let here = Origin {
            mailbox: "studio",
            folder: "INBOX",
            uidvalidity: 7,
            uid: 41,
        };
        let first = Archive::open(&dir.0)
            .unwrap()
            .store(&here, &raw, &what)
            .unwrap();
        assert!(first.new);
        // A restart, the same message found again: nothing new.
        let mut archive = Archive::open(&dir.0).unwrap();
        let again = archive.store(&here, &raw, &what).unwrap();
        assert_eq!(
            (again.sha256.as_str(), again.new),
            (first.sha256.as_str(), false)
        );
        assert_eq!(std::fs::read(archive.path_of(&first.sha256)).unwrap(), raw);
        archive.verify(&first.sha256).unwrap();
        // The same bytes at another place (moved to Ricevute): one more row, the same file.
        let moved = Origin {
            folder: "Ricevute",
            uid: 3,
            ..here.clone()
        };
        assert!(archive.store(&moved, &raw, &what).unwrap().new);
        let rows: i64 = archive
            .index
            .query_row(
                "SELECT COUNT(*) FROM archived WHERE sha256 = ?1",
                [&first.sha256],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 2);
        let (kind, message_id, consegna): (String, String, String) = archive
            .index
            .query_row(
                "SELECT kind, message_id, consegna FROM archived WHERE uid = 41",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(kind, "avvenuta-consegna");
        assert_eq!(message_id, what.original_message_id.unwrap());
        assert_eq!(consegna, what.daticert.unwrap().consegna.unwrap());
    }

    #[test]
    fn a_damaged_file_is_detected_and_rewritten() {
        let dir = temp("damaged");
        let raw = fixture("fattura-1-accettazione.eml");
        let what = classify(&raw);
        let mut archive = Archive::open(&dir.0).unwrap();
        let origin = Origin {
            mailbox: "studio",
            folder: "INBOX",
            uidvalidity: 1,
            uid: 1,
        };
        let stored = archive.store(&origin, &raw, &what).unwrap();
        std::fs::write(archive.path_of(&stored.sha256), b"damaged").unwrap();
        assert!(matches!(
            archive.verify(&stored.sha256),
            Err(ArchiveError::Corrupt { .. })
        ));
        let elsewhere = Origin { uid: 2, ..origin };
        archive.store(&elsewhere, &raw, &what).unwrap();
        archive.verify(&stored.sha256).unwrap();
    }
}
