//! ADDs in flight: how operations on one attachment are ordered (a DEL
//! cancels a waiting ADD) and what an ADD whose caller left gives back.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

use tokio::time::Instant;
use tracing::warn;

use super::{now_ms, Pool};
use crate::datastore::PodKey;
use crate::journal::Record;

/// ADDs of one attachment in flight, and how many DELs came meanwhile.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    pub(super) adds: u32,
    pub(super) dels: u64,
    /// One of them answered with the address: a caller holds it, so another
    /// one's caller leaving does not release it.
    pub(super) answered: bool,
}

/// One ADD's claim on its attachment: counts it in flight and waiting, and
/// when the ADD ends without answering (its future dropped because the
/// caller left), gives back what was assigned for it.
pub(super) struct AddGuard<'a> {
    pool: &'a Pool,
    key: PodKey,
    /// DELs of this attachment seen when the ADD began.
    pub(super) dels: u64,
    pub(super) waiting: bool,
    /// Assigned for this ADD but not yet answered.
    pub(super) pending: Option<Ipv4Addr>,
}

impl<'a> AddGuard<'a> {
    pub(super) fn enter(pool: &'a Pool, key: &PodKey) -> Self {
        let mut st = pool.lock();
        let f = st.inflight.entry(key.clone()).or_default();
        f.adds += 1;
        let dels = f.dels;
        Self {
            pool,
            key: key.clone(),
            dels,
            waiting: false,
            pending: None,
        }
    }
}

impl Drop for AddGuard<'_> {
    fn drop(&mut self) {
        if self.waiting {
            self.pool.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        let mut st = self.pool.lock();
        let answered = st.inflight.get(&self.key).is_some_and(|f| f.answered);
        if let Some(f) = st.inflight.get_mut(&self.key) {
            f.adds -= 1;
            if f.adds == 0 {
                st.inflight.remove(&self.key);
            }
        }
        let Some(ip) = self.pending else { return };
        if answered || st.ds.lookup(&self.key).map(|p| p.ip) != Some(ip) {
            return;
        }
        warn!(pod = %self.key, %ip, "the caller of ADD went away before its answer; releasing the address");
        st.ds.release(&self.key, Instant::now());
        st.netns.remove(&self.key);
        st.pods.remove(&self.key);
        // Queued behind the Assign; the next commit makes it durable.
        let _ = self.pool.append(
            &mut st,
            vec![Record::Release {
                key: self.key.clone(),
                ip,
                at_ms: now_ms(),
            }],
        );
        drop(st);
        self.pool.wake.notify_one();
        self.pool.publish();
    }
}
