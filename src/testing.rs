//! Helpers for the unit tests only.

use std::path::{Path, PathBuf};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        use rand::RngCore;
        let dir = std::env::temp_dir().join(format!(
            "pecgate-{what}-test-{}-{:016x}",
            std::process::id(),
            rand::rngs::OsRng.next_u64()
        ));
        std::fs::create_dir(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
