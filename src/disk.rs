//! Free space where pecgate keeps its state (audit log, ledger, spool, archive).
//!
//! A full disk makes the audit log fail closed: every session refuses commands until space
//! returns (see [`crate::audit`]). [`watch_free_space`] warns well before that, when the free
//! space in `state_dir` drops below `min_free_space_mb`, and says when it is back.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the free space is checked.
const CHECK_EVERY: Duration = Duration::from_secs(30);

/// Bytes available to pecgate (not root's reserve) on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
}

/// Whether the free space crossed the watermark since the last check: `Some(true)` when it
/// just dropped below, `Some(false)` when it just came back.
fn crossing(was_low: bool, free: u64, min: u64) -> Option<bool> {
    let low = free < min;
    (low != was_low).then_some(low)
}

/// Warn (once per crossing) while `dir` has less than `min` bytes free, until `shutdown`.
pub async fn watch_free_space(dir: PathBuf, min: u64, shutdown: CancellationToken) {
    let mut low = false;
    loop {
        match free_bytes(&dir) {
            Ok(free) => match crossing(low, free, min) {
                Some(true) => {
                    low = true;
                    tracing::warn!(
                        state_dir = %dir.display(),
                        free_mib = free / (1024 * 1024),
                        min_free_space_mib = min / (1024 * 1024),
                        "state_dir is running out of space: when it is full the audit log \
                         stops and sessions refuse commands until space is freed"
                    );
                }
                Some(false) => {
                    low = false;
                    tracing::info!(
                        free_mib = free / (1024 * 1024),
                        "state_dir has enough free space again"
                    );
                }
                None => {}
            },
            Err(error) => tracing::debug!(%error, "cannot read the free space of state_dir"),
        }
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_read_and_crossings_reported_once() {
        let free = free_bytes(Path::new(".")).unwrap();
        assert!(free > 0);
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
        assert_eq!(crossing(false, 10, 100), Some(true));
        assert_eq!(crossing(true, 10, 100), None);
        assert_eq!(crossing(true, 100, 100), Some(false));
        assert_eq!(crossing(false, 100, 100), None);
    }
}
