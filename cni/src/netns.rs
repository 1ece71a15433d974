//! Netlink sockets inside a pod's network namespace.
//!
//! A netlink socket stays in the namespace it was opened in, whichever
//! thread later uses it; so the plugin enters the pod's namespace once, opens
//! its sockets there and leaves again, and all later work in the pod goes
//! through those sockets from the plugin's own namespace.
//!
//! `setns` changes only the calling thread. The hazard is a runtime thread
//! that runs tasks while it is in a namespace not its own; so this happens
//! on the main thread while no runtime can run anything on it: ADD on the
//! fast path has no runtime at all; ADD's gRPC fallback and CHECK have a
//! single-threaded runtime, which runs tasks only inside `block_on`, and
//! `open` is called outside it. The thread is back in its own namespace
//! before `open` returns, or the plugin stops: it must not carry on in the
//! wrong one. A dedicated thread would do the same at the price of waking a
//! second CPU: measured on the 2-vCPU test machine, a new thread started
//! 0.2 to 0.6 ms after it was spawned, a quarter of ADD's whole time then.

use std::fs::File;
use std::path::Path;

use rtnetlink::Handle;

use crate::datapath::DatapathError;
use crate::nlsync::Netlink;

/// Netlink sockets in the pod's namespace and the namespace itself (to
/// create links in it): a blocking one for ADD's batches and, when a runtime
/// is given, an asynchronous one for CHECK's dumps.
pub struct Pod {
    pub nl: Netlink,
    pub handle: Option<Handle>,
    pub netns: File,
}

/// Why the plugin could not return to its own namespace: it must stop at
/// once rather than carry on in the pod's.
#[derive(Debug, thiserror::Error)]
#[error("cannot return to the plugin's own network namespace: {0}")]
pub struct Stranded(#[source] pub std::io::Error);

impl Pod {
    /// Opens netlink sockets in the namespace at `netns`; the asynchronous
    /// one is registered with `runtime`. Call it only while no runtime can
    /// run anything on this thread (see the module documentation). The outer
    /// error means this thread may be left in the pod's namespace and the
    /// process must exit.
    pub fn open(
        netns: &Path,
        runtime: Option<&tokio::runtime::Runtime>,
    ) -> Result<Result<Pod, DatapathError>, Stranded> {
        let err = |source| DatapathError::Netns {
            path: netns.display().to_string(),
            source,
        };
        let home = match File::open("/proc/thread-self/ns/net") {
            Ok(f) => f,
            Err(e) => return Ok(Err(err(e))),
        };
        let target = match File::open(netns) {
            Ok(f) => f,
            Err(e) => return Ok(Err(err(e))),
        };
        if let Err(e) = nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET) {
            return Ok(Err(err(e.into())));
        }
        let opened = Netlink::open().and_then(|nl| match runtime {
            Some(rt) => {
                let _context = rt.enter();
                let (conn, handle, _) = rtnetlink::new_connection()?;
                rt.spawn(conn);
                Ok((nl, Some(handle)))
            }
            None => Ok((nl, None)),
        });
        nix::sched::setns(&home, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Stranded(e.into()))?;
        Ok(opened.map_err(err).map(|(nl, handle)| Pod {
            nl,
            handle,
            netns: target,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_namespace_that_cannot_be_entered_is_reported() {
        let rt = runtime();
        let err = Pod::open(Path::new("/nonexistent/netns"), Some(&rt))
            .expect("not stranded")
            .err()
            .expect("no such namespace");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/netns"), "{text}");
        assert!(text.contains("No such file"), "{text}");
    }

    #[test]
    fn the_socket_answers_from_the_pod_and_the_thread_comes_home() {
        // A fresh namespace needs CAP_SYS_ADMIN: this test runs as root, as CI
        // does. The namespace is made by a throwaway thread that unshares.
        let rt = runtime();
        let home_before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare needs root (CAP_SYS_ADMIN)");
            tx.send(File::open("/proc/thread-self/ns/net").unwrap())
                .unwrap();
            std::thread::park();
        });
        let ns = rx.recv().unwrap();
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&ns));
        let pod = Pod::open(Path::new(&path), Some(&rt)).unwrap().unwrap();
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            home_before,
            "the thread did not return to its namespace"
        );
        // A fresh namespace has only lo, and it is down.
        let links: Vec<_> = rt
            .block_on(pod.handle.unwrap().link().get().execute().try_collect())
            .unwrap();
        let names: Vec<_> = links
            .iter()
            .flat_map(|l| l.attributes.iter())
            .filter_map(|a| match a {
                rtnetlink::packet_route::link::LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(names, vec!["lo".to_string()]);
        holder.thread().unpark();
        holder.join().unwrap();
    }
}
