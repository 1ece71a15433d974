//! The pool's side of the reconciler: what the cloud gave, took back or
//! shows at a resync, and the interfaces' deletes. Kept apart from the
//! ADD/DEL path in `mod.rs`; the state is the same.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use providers::{Assigned, Interface, Limits};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Pool, State};
use crate::datastore::PodKey;
use crate::journal::{self, Record};
use crate::policy::PoolView;

impl Pool {
    /// The policy's view of the pool, at `limits`.
    pub fn policy_view(&self, limits: Limits, hot_attach: bool, now: Instant) -> PoolView {
        self.lock().ds.view(limits, hot_attach, self.waiting(), now)
    }

    /// Adds an attached interface; `ready` false holds its addresses back
    /// until [`Pool::set_ready`]. The addresses it made free (see
    /// [`Pool::add_addresses`]).
    pub fn add_interface(&self, iface: Interface, ready: bool) -> u32 {
        let mut st = self.lock();
        let now = Instant::now();
        let before = st.ds.counts(now).available;
        let id = iface.id.clone();
        st.ds.add_interface(iface, now);
        if !ready {
            st.ds.set_ready(&id, false);
        }
        confirm_seen(&mut st);
        st.ds.counts(now).available.saturating_sub(before)
    }

    /// Adds what the cloud assigned to `interface_id`; the addresses that
    /// became free, which may be fewer than it gave: not one the pool
    /// knew already, nor one a pod holds unconfirmed (the cloud may give
    /// it back), nor any on an interface the pool no longer has. Free
    /// addresses on an interface waiting for its node side count, as the
    /// policy counts them.
    pub fn add_addresses(&self, interface_id: &str, got: &Assigned) -> u32 {
        let mut st = self.lock();
        let now = Instant::now();
        let before = st.ds.counts(now).available;
        st.ds.add_addresses(interface_id, got);
        confirm_seen(&mut st);
        st.ds.counts(now).available.saturating_sub(before)
    }

    pub fn set_ready(&self, interface_id: &str, ready: bool) {
        self.lock().ds.set_ready(interface_id, ready);
    }

    /// Takes free addresses of `want` out of use before giving them back.
    pub fn claim_for_release(&self, interface_id: &str, want: &Assigned) -> Assigned {
        self.lock()
            .ds
            .claim_for_release(interface_id, want, Instant::now())
    }

    /// The cloud took `released` back.
    pub fn forget(&self, interface_id: &str, released: &Assigned) {
        self.lock().ds.forget(interface_id, released);
    }

    /// The release failed: `claimed` is free again.
    pub fn unclaim(&self, interface_id: &str, claimed: &Assigned) {
        self.lock().ds.unclaim(interface_id, claimed);
    }

    /// The interface as last described.
    pub fn interface(&self, interface_id: &str) -> Option<Interface> {
        self.lock()
            .ds
            .interface(interface_id)
            .map(|e| e.info.clone())
    }

    pub fn interface_ids(&self) -> BTreeSet<String> {
        self.lock()
            .ds
            .interfaces()
            .map(|e| e.info.id.clone())
            .collect()
    }

    /// The primary interface, once known.
    pub fn primary(&self) -> Option<Interface> {
        self.lock()
            .ds
            .interfaces()
            .find(|e| e.info.is_primary())
            .map(|e| e.info.clone())
    }

    /// Starts deleting an interface: drains it and journals the intent.
    /// `None` when it has been taken into use since the plan.
    pub fn begin_delete(&self, interface_id: &str) -> Option<journal::Durable> {
        let mut st = self.lock();
        if !st.ds.start_draining(interface_id, Instant::now()) {
            return None;
        }
        st.pending_deletes.insert(interface_id.to_string());
        Some(self.append(
            &mut st,
            vec![Record::PendingDelete {
                interface_id: interface_id.to_string(),
            }],
        ))
    }

    /// The intent could not be journaled: the interface stays.
    pub fn abort_delete(&self, interface_id: &str) {
        let mut st = self.lock();
        st.pending_deletes.remove(interface_id);
        st.ds.stop_draining(interface_id);
    }

    /// The cloud deleted the interface.
    pub fn deleted(&self, interface_id: &str) -> journal::Durable {
        let mut st = self.lock();
        st.ds.remove_interface(interface_id);
        st.pending_deletes.remove(interface_id);
        self.append(
            &mut st,
            vec![Record::Deleted {
                interface_id: interface_id.to_string(),
            }],
        )
    }

    pub fn pending_deletes(&self) -> Vec<String> {
        self.lock().pending_deletes.iter().cloned().collect()
    }

    /// Compares the pool with the cloud's answer `cloud` (the interfaces
    /// the pool manages). Addresses missing from it keep their pods, held
    /// unconfirmed until seen again. Interfaces in `hold` (new ones whose
    /// node side is not set up) are added not ready, under the same lock,
    /// so no ADD gets their addresses early. `frozen` interfaces take no
    /// new pods while they hold some; those that hold none any more, or are
    /// gone from the pool, are returned (with what is known of them) to be
    /// unfrozen.
    pub fn apply_cloud(
        &self,
        cloud: &[Interface],
        hold: &BTreeSet<String>,
        frozen: &BTreeSet<String>,
    ) -> Vec<(String, Option<Interface>)> {
        let mut st = self.lock();
        let vanished = st.ds.resync(cloud, Instant::now());
        for id in hold {
            st.ds.set_ready(id, false);
        }
        let mut unfreeze = vec![];
        for id in frozen {
            let holds = st.ds.interface(id).map(|e| {
                e.addrs
                    .values()
                    .any(|s| matches!(s, crate::datastore::Slot::Assigned(_)))
            });
            match holds {
                Some(true) => st.ds.set_draining(id),
                Some(false) => {
                    let info = st.ds.interface(id).map(|e| e.info.clone());
                    st.ds.remove_interface(id);
                    unfreeze.push((id.clone(), info));
                }
                // Gone from the cloud's answer altogether.
                None => unfreeze.push((id.clone(), None)),
            }
        }
        // An address missing from one answer is not proof it is gone.
        for (key, ip) in vanished {
            warn!(pod = %key, %ip, "the cloud's answer lacks this pod's address; holding the assignment until it is seen again");
            st.unconfirmed.insert(key, ip);
        }
        confirm_seen(&mut st);
        let pending: Vec<String> = st.pending_deletes.iter().cloned().collect();
        for id in pending {
            st.ds.set_draining(&id);
        }
        unfreeze
    }

    /// Assignments held until the cloud shows their address again.
    pub fn unconfirmed(&self) -> usize {
        self.lock().unconfirmed.len()
    }
}

/// Restores every unconfirmed assignment whose address the pool holds now
/// (seen again at a resync, or given back by an Assign or a Create), before
/// anything else can hand that address out: call under the same lock that
/// added the addresses.
pub(super) fn confirm_seen(st: &mut State) {
    let pending: Vec<(PodKey, Ipv4Addr)> = st
        .unconfirmed
        .iter()
        .map(|(k, ip)| (k.clone(), *ip))
        .collect();
    for (key, ip) in pending {
        if st.ds.restore(&key, ip) {
            info!(pod = %key, %ip, "the pod's address is seen again; assignment confirmed");
            st.unconfirmed.remove(&key);
        }
    }
}
