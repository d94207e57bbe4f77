//! Spool files: a message being received lives on disk (`state_dir/spool`), never whole in
//! memory, and its file is removed when the [`SpoolFile`] is dropped, whatever the outcome.
//! Nothing in the spool is ever acknowledged to a client, so files left by a crash are
//! deleted at start-up ([`clean`]).

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

/// A message on disk, removed on drop.
#[derive(Debug)]
pub struct SpoolFile {
    path: PathBuf,
    file: Option<tokio::fs::File>,
}

impl SpoolFile {
    /// A new, empty spool file readable by pecgate only.
    pub async fn create(dir: &Path, session: &str) -> io::Result<SpoolFile> {
        let path = dir.join(format!("{session}-{:016x}.eml", rand::random::<u64>()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await?;
        Ok(SpoolFile {
            path,
            file: Some(file),
        })
    }

    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.file {
            Some(file) => file.write_all(bytes).await,
            None => Err(io::Error::other("spool file already closed for writing")),
        }
    }

    /// Finish writing; the file can then be read with [`open`](Self::open).
    pub async fn close_write(&mut self) -> io::Result<()> {
        if let Some(mut file) = self.file.take() {
            file.flush().await?;
        }
        Ok(())
    }

    /// A fresh read handle on the spooled message.
    pub async fn open(&self) -> io::Result<tokio::fs::File> {
        tokio::fs::File::open(&self.path).await
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        // One unlink: cheap enough to do inline, and it must happen on every path.
        if let Err(error) = std::fs::remove_file(&self.path)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::error!(path = %self.path.display(), %error, "cannot remove spool file");
        }
    }
}

/// Create the spool directory (mode 0700) and remove files a previous run left behind.
/// Blocking; call at start-up.
pub fn clean(dir: &Path) -> io::Result<usize> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::warn!(
            removed,
            "removed spool files of messages that were being received when pecgate stopped (never acknowledged, so not lost: the clients will retry)"
        );
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn removed_on_drop_and_cleaned_at_start() {
        let dir = std::env::temp_dir().join(format!(
            "pecgate-spool-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        clean(&dir).unwrap();
        let mut spool = SpoolFile::create(&dir, "s1").await.unwrap();
        spool.write(b"hello").await.unwrap();
        spool.close_write().await.unwrap();
        let path = spool.path().to_owned();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        drop(spool);
        assert!(!path.exists());
        std::fs::write(dir.join("left-over.eml"), b"x").unwrap();
        assert_eq!(clean(&dir).unwrap(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
