//! The node side: what each of the node's interfaces needs on the host
//! before its addresses can be handed out (link up, route table, `from`
//! rule), and SNAT for traffic leaving the VPC.
//!
//! Behind the small [`NodeSide`] trait, as netavark keeps its firewall
//! drivers: [`crate::hostnet::HostNet`] does it with netlink and nftables,
//! [`Nothing`] does nothing (the simulated VPC without a fabric, tests, and
//! in-process simulations of many nodes). [`NodeTracker`] remembers what is
//! still to be done; the reconciler drives it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use providers::Interface;

use crate::hostnet::{HostError, HostNet, SnatConfig};

/// One implementation of the node's side of the datapath. Every method is
/// idempotent: the reconciler calls it again after a failure or a resync.
#[async_trait]
pub trait NodeSide: Send + Sync + 'static {
    /// For logs and introspection ("netlink", "none").
    fn name(&self) -> &'static str;

    /// Whether this implementation does nothing (interfaces are ready as
    /// soon as the cloud attaches them).
    fn is_noop(&self) -> bool {
        false
    }

    /// Brings up `iface`'s link and sets up its route table and rule.
    /// [`HostError::NoLink`] means "not yet": the link has not appeared.
    async fn setup_interface(&self, iface: &Interface) -> Result<(), HostError>;

    /// Removes what [`NodeSide::setup_interface`] added, before the
    /// interface is detached.
    async fn teardown_interface(&self, iface: &Interface) -> Result<(), HostError>;

    /// Sets up (or re-applies) SNAT and forwarding; `primary` is the
    /// primary interface.
    async fn setup_snat(&self, cfg: &SnatConfig, primary: &Interface) -> Result<(), HostError>;
}

/// Does nothing: for clouds whose datapath is not on this host.
#[derive(Debug, Default)]
pub struct Nothing;

#[async_trait]
impl NodeSide for Nothing {
    fn name(&self) -> &'static str {
        "none"
    }

    fn is_noop(&self) -> bool {
        true
    }

    async fn setup_interface(&self, _: &Interface) -> Result<(), HostError> {
        Ok(())
    }

    async fn teardown_interface(&self, _: &Interface) -> Result<(), HostError> {
        Ok(())
    }

    async fn setup_snat(&self, _: &SnatConfig, _: &Interface) -> Result<(), HostError> {
        Ok(())
    }
}

#[async_trait]
impl NodeSide for HostNet {
    fn name(&self) -> &'static str {
        "netlink"
    }

    async fn setup_interface(&self, iface: &Interface) -> Result<(), HostError> {
        HostNet::setup_interface(self, iface).await
    }

    async fn teardown_interface(&self, iface: &Interface) -> Result<(), HostError> {
        HostNet::teardown_interface(self, iface).await
    }

    async fn setup_snat(&self, cfg: &SnatConfig, primary: &Interface) -> Result<(), HostError> {
        HostNet::setup_snat(self, cfg, primary).await
    }
}

/// A node side and what it still has to do.
pub struct NodeTracker {
    side: Box<dyn NodeSide>,
    /// Interfaces whose node side is not set up yet (held back from
    /// assignments until it is).
    pending: Mutex<BTreeSet<String>>,
    snat_done: AtomicBool,
}

impl NodeTracker {
    pub fn new(side: Box<dyn NodeSide>) -> Self {
        let noop = side.is_noop();
        Self {
            side,
            pending: Mutex::new(BTreeSet::new()),
            snat_done: AtomicBool::new(noop),
        }
    }

    /// A tracker with nothing to do.
    pub fn nothing() -> Self {
        Self::new(Box::new(Nothing))
    }

    pub fn side(&self) -> &dyn NodeSide {
        &*self.side
    }

    /// Whether interfaces must wait for their node side.
    pub fn active(&self) -> bool {
        !self.side.is_noop()
    }

    /// Marks `id` as waiting for its node side; false when there is none.
    pub fn hold(&self, id: &str) -> bool {
        if !self.active() {
            return false;
        }
        self.pending
            .lock()
            .expect("node lock")
            .insert(id.to_string());
        true
    }

    pub fn done(&self, id: &str) {
        self.pending.lock().expect("node lock").remove(id);
    }

    pub fn pending(&self) -> Vec<String> {
        self.pending
            .lock()
            .expect("node lock")
            .iter()
            .cloned()
            .collect()
    }

    /// SNAT is to be (re-)applied at the next step.
    pub fn redo_snat(&self) {
        if self.active() {
            self.snat_done.store(false, Ordering::SeqCst);
        }
    }

    pub fn snat_done(&self) -> bool {
        self.snat_done.load(Ordering::SeqCst)
    }

    pub fn set_snat_done(&self) {
        self.snat_done.store(true, Ordering::SeqCst);
    }

    /// `Err` with what is still missing on the node, for readiness.
    pub fn in_place(&self) -> Result<(), String> {
        let pending = self.pending();
        let mut missing = vec![];
        if !pending.is_empty() {
            missing.push(format!(
                "interfaces {} not set up on the node yet",
                pending.join(", ")
            ));
        }
        if !self.snat_done() {
            missing.push("SNAT not set up yet".to_string());
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }
}
