//! Crash-safe file writes and the lock that serialises registry edits.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// What to do when the destination of [`write_atomic`] already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (in one rename).
    Replace,
    /// Fail with `AlreadyExists` and leave it untouched.
    Refuse,
}

/// Writes `bytes` to `path` so that a crash at any point leaves either the old file or the new
/// one, whole, never a mix: write a temporary file in the same directory (same file system, so
/// the rename is atomic), fsync it, move it into place, fsync the directory (so the rename itself
/// survives a power loss). The file is created with `mode` from the start, so a secret is never
/// readable by others, not even briefly.
///
/// With [`Existing::Refuse`] the move is a `link(2)`, which fails if the destination exists,
/// so two concurrent writers cannot both "create" the same file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, existing: Existing) -> io::Result<()> {
    let dir = parent_dir(path);
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        match existing {
            Existing::Replace => std::fs::rename(&tmp, path)?,
            Existing::Refuse => {
                std::fs::hard_link(&tmp, path)?;
                std::fs::remove_file(&tmp)?;
            }
        }
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        // Best effort: a leftover temp file is harmless (readers never look at it), but tidy.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `.NAME.tmp.PID.RANDOM` beside `path`: hidden, and unique even between concurrent processes.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nonce = rand::rng().next_u32();
    parent_dir(path).join(format!(".{name}.tmp.{}.{nonce:08x}", std::process::id()))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates a directory (and its parents) readable by its owner only, if missing.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// An exclusive advisory lock (flock) on a lock file, released when dropped (or when the process
/// dies, so a crash never leaves it stuck). Serialises `add-client` and `revoke` runs so two
/// concurrent edits of the registry cannot lose one another's change.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock on `path` (created if missing, mode 0600) is held.
    pub fn acquire(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
        loop {
            // SAFETY: the fd is valid for the lifetime of `file`; flock has no memory effects.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Self { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.toml");
        write_atomic(&p, b"one", 0o600, Existing::Replace).unwrap();
        write_atomic(&p, b"two", 0o600, Existing::Replace).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.toml")]);
    }

    #[test]
    fn refuse_keeps_the_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        write_atomic(&p, b"original", 0o600, Existing::Refuse).unwrap();
        let err = write_atomic(&p, b"other", 0o600, Existing::Refuse).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), b"original");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temp file removed");
    }

    #[test]
    fn lock_can_be_taken_again_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        drop(FileLock::acquire(&p).unwrap());
        drop(FileLock::acquire(&p).unwrap());
    }
}
