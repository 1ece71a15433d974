//! Pods' network namespaces, for reclaiming the address of a pod whose DEL
//! never reached ipamd (it was down, or the runtime gave up).
//!
//! A namespace is judged by its identity (stat(2)'s `st_dev` and `st_ino`
//! of the nsfs inode), recorded when the ADD came, never by its path
//! existing: containerd passes `/proc/<pid>/ns/net`, a path that exists
//! again as soon as the pid is reused, and a runtime may bind-mount a new
//! namespace where an old one was.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tracing::warn;

/// Where a pod's namespace is and what it was when the ADD came.
/// `dev == 0 && ino == 0`: identity unknown, never judged gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsRef {
    pub path: String,
    #[serde(default)]
    pub dev: u64,
    #[serde(default)]
    pub ino: u64,
}

/// What a look at a namespace found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The path holds the namespace the ADD named.
    Alive,
    /// The path is gone, or holds another namespace or file.
    Gone,
    /// ipamd cannot tell (identity unknown, path not visible here).
    Unknown,
}

static WARNED: AtomicBool = AtomicBool::new(false);

impl NetnsRef {
    fn known(&self) -> bool {
        self.dev != 0 || self.ino != 0
    }

    /// The namespace at `path` as ipamd sees it at ADD time. The plugin's
    /// identity (`dev`, `ino`; 0 from an older plugin) is kept only when
    /// ipamd sees the same inode at the path: otherwise ipamd runs in
    /// another mount or pid namespace than the runtime, cannot judge this
    /// pod, and says so once.
    pub fn at_add(path: String, dev: u64, ino: u64) -> Self {
        let seen = std::fs::metadata(&path).map(|m| (m.dev(), m.ino()));
        let (dev, ino) = match seen {
            Ok(here) if (dev, ino) == (0, 0) || here == (dev, ino) => here,
            other => {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    warn!(
                        netns = %path,
                        seen = ?other.as_ref().map_err(ToString::to_string),
                        plugin = ?(dev, ino),
                        "ipamd does not see the pods' network namespaces as the runtime does \
                         (mount the runtime's netns directory, and share the host's pid \
                         namespace for /proc paths); addresses of pods whose DEL never \
                         arrives are then released only by CNI GC"
                    );
                }
                (0, 0)
            }
        };
        Self { path, dev, ino }
    }

    /// Looks at the namespace now.
    pub fn judge(&self) -> Verdict {
        if !self.known() {
            return Verdict::Unknown;
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == (self.dev, self.ino) => Verdict::Alive,
            Ok(_) => Verdict::Gone,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let path = Path::new(&self.path);
                // /proc/<pid> vanishes with its process; elsewhere a missing
                // directory means ipamd lost sight of it (a mount), not that
                // the namespace went.
                if path.starts_with("/proc") || path.parent().is_some_and(Path::exists) {
                    Verdict::Gone
                } else {
                    Verdict::Unknown
                }
            }
            Err(_) => Verdict::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judged_by_identity_not_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ns");
        std::fs::write(&p, "a").unwrap();
        let path = p.display().to_string();
        let r = NetnsRef::at_add(path.clone(), 0, 0);
        assert_eq!(r.judge(), Verdict::Alive);
        // Another file at the same path (a reused pid, a new bind mount);
        // a second link keeps the old inode in use so it cannot be reused.
        std::fs::hard_link(&p, dir.path().join("old")).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, "b").unwrap();
        assert_eq!(r.judge(), Verdict::Gone);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(r.judge(), Verdict::Gone);
    }

    #[test]
    fn what_ipamd_cannot_see_is_never_gone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ns");
        std::fs::write(&p, "a").unwrap();
        let m = std::fs::metadata(&p).unwrap();
        // The plugin saw another inode: ipamd looks at something else.
        let r = NetnsRef::at_add(p.display().to_string(), m.dev(), m.ino() + 1);
        assert_eq!((r.dev, r.ino), (0, 0));
        std::fs::remove_file(&p).unwrap();
        assert_eq!(r.judge(), Verdict::Unknown);
        // A directory ipamd does not see (not mounted into its container).
        let hidden = NetnsRef {
            path: dir.path().join("absent-dir/ns").display().to_string(),
            dev: 1,
            ino: 2,
        };
        assert_eq!(hidden.judge(), Verdict::Unknown);
        // Not visible at ADD either.
        let never = NetnsRef::at_add(dir.path().join("nope").display().to_string(), 0, 0);
        assert_eq!(never.judge(), Verdict::Unknown);
        // A process gone takes its /proc directory with it.
        let proc_gone = NetnsRef {
            path: "/proc/999999999/ns/net".into(),
            dev: 4,
            ino: 4026531840,
        };
        assert_eq!(proc_gone.judge(), Verdict::Gone);
    }
}
