//! Making the pool's changes durable: records queued in state order,
//! compaction, a whole snapshot after a failed write, and healing.

use tokio::time::Instant;
use tracing::{debug, error};

use super::{now_ms, Pool, State, COMPACT_AFTER};
use crate::config::Settings;
use crate::journal::{self, Record, Replayed};

impl Pool {
    /// Queues records under the state lock so the journal's order is the
    /// state's order; compacts now and then.
    pub(super) fn append(&self, st: &mut State, records: Vec<Record>) -> journal::Durable {
        if self.journal.needs_rewrite() {
            // After a failed write (a full disk) the file may end torn: the
            // state so far, this change included, goes out as a snapshot.
            st.appends_since_compact = 0;
            return self
                .journal
                .compact(snapshot(st, &self.settings, Instant::now()));
        }
        st.appends_since_compact += records.len() as u64;
        let durable = self.journal.append(records);
        if st.appends_since_compact >= COMPACT_AFTER {
            st.appends_since_compact = 0;
            let done = self
                .journal
                .compact(snapshot(st, &self.settings, Instant::now()));
            tokio::spawn(async move {
                if let Err(e) = done.wait().await {
                    error!(error = %e, "journal compaction failed");
                }
            });
        }
        durable
    }

    /// After a failed write, tries to record again (the disk may have room
    /// now) without waiting for the next ADD or DEL.
    pub async fn heal_journal(&self) {
        if !self.journal.needs_rewrite() {
            return;
        }
        let durable = {
            let mut st = self.lock();
            self.append(&mut st, vec![])
        };
        if let Err(e) = durable.wait().await {
            debug!(error = %e, "journal still cannot be written");
        }
    }
}

/// The journal's view of the current state: what compaction writes.
pub(super) fn snapshot(st: &State, settings: &Settings, now: Instant) -> Vec<Record> {
    let wall = now_ms();
    let released_at = st
        .ds
        .cooling(now)
        .into_iter()
        .map(|(ip, until)| {
            let left = until.saturating_duration_since(now);
            let age = settings.cooldown.saturating_sub(left);
            (ip, wall.saturating_sub(age.as_millis() as u64))
        })
        .collect();
    Replayed {
        netns: st
            .netns
            .iter()
            .map(|(k, n)| (k.clone(), n.clone()))
            .collect(),
        pods: st
            .pods
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect(),
        assignments: st
            .ds
            .assignments()
            .map(|(k, p)| (k.clone(), p.ip))
            .chain(st.unconfirmed.iter().map(|(k, ip)| (k.clone(), *ip)))
            .collect(),
        released_at,
        pending_deletes: st.pending_deletes.clone(),
        records: 0,
        truncated: 0,
    }
    .to_records()
}
