//! One ipamd per state directory.
//!
//! The journal in the state directory is compacted (rewritten and renamed)
//! when ipamd starts. A second ipamd started on the same directory would
//! rewrite the journal of the one already running, which would then append
//! to a file no longer linked: a crash would lose acknowledged assignments.
//! So ipamd takes an exclusive advisory lock (flock(2), via
//! [`std::fs::File::try_lock`]) on the state directory itself before it
//! reads anything there, and holds it until it exits. The kernel drops the
//! lock when the process ends, however it ends, so a crash leaves nothing
//! stale. The lock is on the directory, not on a file in it, so deleting a
//! file (a cleanup of `/run`) cannot let a second ipamd in; `ipamd.lock`
//! only tells a second ipamd the holder's pid.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "ipamd.lock";

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the lock.
    #[error(
        "{path} is locked by another ipamd ({holder}); only one ipamd may use a state directory"
    )]
    Held { path: PathBuf, holder: String },
    /// The directory or the lock file cannot be created or locked.
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct StateLock {
    _dir: File,
    path: PathBuf,
}

impl StateLock {
    /// Creates `dir` if needed, then locks it without waiting and writes
    /// the holder's pid to `dir/ipamd.lock`, for the message a second ipamd
    /// gives.
    ///
    /// # Errors
    /// [`LockError::Held`] when another process holds it, [`LockError::Io`]
    /// when the directory or file cannot be made or locked.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let held = File::open(dir).map_err(io)?;
        if !held.metadata().map_err(io)?.is_dir() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "the state directory is not a directory",
            )));
        }
        match held.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                if let Ok(mut f) = File::open(&path) {
                    f.read_to_string(&mut text).ok();
                }
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "pid unknown".to_string(),
                };
                return Err(LockError::Held { path, holder });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _dir: held, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = StateLock::acquire(&state).expect("first lock");
        // flock locks belong to the open file description, so a second open
        // in the same process conflicts just as another process would.
        let err = StateLock::acquire(&state).expect_err("second lock must fail");
        match &err {
            LockError::Held { holder, .. } => {
                assert_eq!(holder, &format!("pid {}", std::process::id()));
            }
            other => panic!("unexpected error: {other}"),
        }
        assert!(err.to_string().contains("only one ipamd"));
        // Deleting the pid file (a cleanup of /run) lets no one in.
        std::fs::remove_file(first.path()).unwrap();
        let err = StateLock::acquire(&state).expect_err("still held");
        assert!(matches!(err, LockError::Held { .. }), "{err}");
        drop(first);
        StateLock::acquire(&state).expect("lock free again after the holder drops it");
    }

    #[test]
    fn unusable_directory_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = StateLock::acquire(&file).expect_err("a file is no directory");
        assert!(matches!(err, LockError::Io { .. }), "{err}");
    }
}
