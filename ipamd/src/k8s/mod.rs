//! Kubernetes in ipamd: its own Node, the pods on this node, Events.
//!
//! Everything here runs beside the pool, never in front of it: ipamd serves
//! ADDs and DELs from its journal whether or not the API server answers
//! (the watches retry with kube-rs' default backoff), and what it tells
//! Kubernetes catches up once the API server is back.
//!
//! What ipamd reads and writes (the chart's RBAC, verb by verb):
//!
//! | resource | verbs | why |
//! |---|---|---|
//! | `nodes` (its own, by field selector) | list, watch | labels, annotations, taints, cordon |
//! | `nodes` | patch | remove the startup taint, set or clear the exhaustion taint, the capacity annotation |
//! | `nodes/status` | patch | the [`CONDITION`] node condition |
//! | `pods` (this node's, field selector `spec.nodeName`) | list, watch | release the address of a pod gone without its DEL |
//! | `pods` | get | confirm that a pod is gone before its address is released |
//! | `events.k8s.io` `events` | create, patch | Events on the node (patch: a repeated Event's count) |
//! | `crd.k8s.amazonaws.com` `eniconfigs` | list, watch | custom networking: the node's ENIConfig |
//!
//! Memory stays flat in the cluster's size: both watches select this node's
//! objects on the server, and the cached objects keep only what is used
//! (`managedFields`, specs and most of the status dropped).

pub mod eniconfig;
mod node;
mod pods;

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;

use crate::ipam::Ipam;

pub use node::{plan_node, Desired, NodePatch, NodeView};
pub use pods::GoneTracker;

/// The startup taint ipamd removes once it can wire pods, unless another
/// key is configured: nodes registered with it (kubelet
/// `--register-with-taints=vpc-cni.io/agent-not-ready=true:NoSchedule`)
/// get no pod before their network is ready.
pub const DEFAULT_STARTUP_TAINT: &str = "vpc-cni.io/agent-not-ready";
/// The NoSchedule taint set while the pool cannot grow and nothing is free
/// (when enabled).
pub const EXHAUSTED_TAINT: &str = "vpc-cni.io/ip-exhausted";
/// The node condition that says whether the node's pod addresses are
/// exhausted (`True`: the pool cannot grow and nothing is free).
pub const CONDITION: &str = "VpcCniIPExhausted";
/// The node annotation holding the node's pod address capacity: addresses
/// the pool may hold for pods (interfaces × addresses or prefixes each,
/// MAX_ENI, MAX_PODS, prefix delegation counted). Host-network pods come
/// on top (aws-node's max-pods adds 2 for them).
pub const CAPACITY_ANNOTATION: &str = "vpc-cni.io/pod-ip-capacity";
/// The controller name on Events.
pub const REPORTER: &str = "vpc-cni-ipamd";

/// What the Kubernetes side is told.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// This node's name (aws-node's `MY_NODE_NAME`).
    pub node_name: String,
    /// The taint key to remove once ready; `None`: none.
    pub startup_taint: Option<String>,
    /// Set [`EXHAUSTED_TAINT`] while exhausted.
    pub exhaustion_taint: bool,
    /// How long a pod must be gone from the API (and the pod watch in sync
    /// all along) before its addresses are released.
    pub pod_gone_grace: Duration,
    /// aws-node's `AWS_MANAGE_ENIS_NON_SCHEDULABLE`: on a cordoned node,
    /// interfaces are attached and deleted only when this is true.
    pub manage_enis_non_schedulable: bool,
    /// How long a state (exhausted or not) must hold before the node says
    /// so, so a node at its limit under churn does not flap.
    pub settle: Duration,
}

impl KubeSettings {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            startup_taint: Some(DEFAULT_STARTUP_TAINT.into()),
            exhaustion_taint: false,
            pod_gone_grace: Duration::from_secs(60),
            manage_enis_non_schedulable: false,
            settle: Duration::from_secs(3),
        }
    }
}

/// What the Kubernetes side last did, for `/v1/pool` (`kubernetes`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KubeStatus {
    /// The node's watch has listed this node.
    pub node_seen: bool,
    /// The pod watch is in sync (listed, no error since).
    pub pods_in_sync: bool,
    pub pods_on_node: usize,
    pub startup_taint_removed: bool,
    pub exhausted: bool,
    pub capacity: Option<u32>,
    pub cordoned: bool,
    /// Addresses released because their pod left the API without a DEL.
    pub released_gone_pods: u64,
    /// Custom networking: the ENIConfig new interfaces follow
    /// (`name: subnet`), or why there is none.
    pub eni_config: Option<String>,
    pub last_error: Option<String>,
}

/// Builds a client from a kubeconfig file (`Some`) or the usual inference
/// (`KUBECONFIG`, `~/.kube/config`, then in-cluster). Nothing is contacted.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("Kubernetes client configuration: {e}"))?,
    };
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// Runs the node and pod tasks until `stop`. `cni_installed` turns true
/// once the conflist is in place (always true when ipamd writes none).
pub async fn run(
    client: Client,
    ipam: Arc<Ipam>,
    settings: KubeSettings,
    cni_installed: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) {
    let status = ipam.kube_status();
    let node = node::NodeTask::new(
        client.clone(),
        ipam.clone(),
        settings.clone(),
        status.clone(),
    );
    let pods = pods::PodTask::new(client, ipam, settings, status);
    tokio::join!(node.run(cni_installed, stop.clone()), pods.run(stop));
}

/// The error's text, with the API's status reason where there is one.
pub(crate) fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        e => e.to_string(),
    }
}

/// Whether the API refused for lack of permission (RBAC).
pub(crate) fn forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}
