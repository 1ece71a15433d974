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
//! | `nodes` (all, `limit=1`) | list | the cluster's node count, how many share the cloud account's request budget ([`peers`]) |
//! | `nodes` | patch | remove the startup taint, set or clear the exhaustion taint, the capacity annotation |
//! | `nodes/status` | patch | the [`CONDITION`] node condition |
//! | `coordination.k8s.io` `leases` in the growers namespace | create, delete, list (`limit=1`) | while its pool grows, the node's Lease; their count, how many share the budget of the calls that grow ([`growers`]) |
//! | `pods` (this node's, field selector `spec.nodeName`) | list, watch | release the address of a pod gone without its DEL |
//! | `pods` | get | confirm that a pod is gone before its address is released |
//! | `events.k8s.io` `events` | create, patch | Events on the node (patch: a repeated Event's count) |
//! | `crd.k8s.amazonaws.com` `eniconfigs` | list, watch | custom networking: the node's ENIConfig |
//!
//! Memory stays flat in the cluster's size: both watches select this node's
//! objects on the server, and the cached objects keep only what is used
//! (`managedFields`, specs and most of the status dropped).

pub mod eniconfig;
pub mod growers;
mod node;
pub mod peers;
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
    /// The namespace of the growers Leases ([`growers`]); `None`: grow
    /// calls share the account among every node.
    pub growers_namespace: Option<String>,
    /// How long after its last grow this node still counts as growing
    /// ([`growers::GROWS_WITHIN`]).
    pub grows_within: Duration,
    /// How often whether it grows is looked at ([`growers::PUBLISH_EVERY`]).
    pub growers_every: Duration,
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
            growers_namespace: None,
            grows_within: growers::GROWS_WITHIN,
            growers_every: growers::PUBLISH_EVERY,
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
    /// Failed attempts of the watches (each waits before the next, see
    /// [`WatchBackoff`]).
    pub watch_failures: u64,
    /// Custom networking: the ENIConfig new interfaces follow
    /// (`name: subnet`), or why there is none.
    pub eni_config: Option<String>,
    /// The cluster's node count last read: the nodes this one believes
    /// share the cloud account's request budget ([`peers`]).
    pub account_peers: Option<u32>,
    /// The cluster's nodes whose pools grow, last counted ([`growers`]);
    /// `None` without a growers namespace or before the first count.
    pub account_growers: Option<u32>,
    pub last_error: Option<String>,
}

/// Builds a client from a kubeconfig file (`Some`) or the usual inference
/// (`KUBECONFIG`, `~/.kube/config`, then in-cluster). Nothing is contacted.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, String> {
    client_from(config(kubeconfig).await?)
}

/// The client for `config` (no I/O).
pub fn client_from(config: kube::Config) -> Result<Client, String> {
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// The client's configuration from a kubeconfig file (`Some`) or the usual
/// inference; read at start, so a bad one is a configuration error.
pub async fn config(kubeconfig: Option<&std::path::Path>) -> Result<kube::Config, String> {
    Ok(match kubeconfig {
        Some(path) => {
            // Never opens a FIFO or a device (it would block or not end).
            if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
                return Err(format!("kubeconfig {}: not a regular file", path.display()));
            }
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("Kubernetes client configuration: {e}"))?,
    })
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
    let cx = Ctx {
        status: ipam.kube_status(),
        client,
        ipam,
        s: settings,
    };
    let node = node::NodeTask::new(cx.clone());
    let pods = pods::PodTask::new(cx.clone());
    let publish = {
        let (cx, stop) = (cx.clone(), stop.clone());
        async move {
            if let Some(ns) = cx.s.growers_namespace.clone() {
                growers::run(cx, ns, stop).await
            }
        }
    };
    tokio::join!(
        node.run(cni_installed, stop.clone()),
        pods.run(stop.clone()),
        publish,
        peers::run(cx, stop)
    );
}

/// The wait between failed attempts of a watch: 1 s doubling to 60 s,
/// jittered, reset only by progress (a list done, an object seen). kube's
/// own backoff is reset by the `Init` event its watcher sends before every
/// list attempt, so against an API server that is down it retried about
/// once a second for ever: at 2,000 nodes, thousands of lists a second.
#[derive(Debug)]
pub struct WatchBackoff {
    delay: Duration,
    not_before: tokio::time::Instant,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self {
            delay: Self::FIRST,
            not_before: tokio::time::Instant::now(),
        }
    }
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);

    /// Whether the watch may be polled again.
    pub fn ready(&self) -> bool {
        tokio::time::Instant::now() >= self.not_before
    }

    /// When it may.
    pub fn not_before(&self) -> tokio::time::Instant {
        self.not_before
    }

    /// An attempt failed: wait, and longer next time.
    pub fn failed(&mut self) {
        self.not_before = tokio::time::Instant::now() + crate::reconciler::jittered(self.delay);
        self.delay = (self.delay * 2).min(Self::MAX);
    }

    /// The watch made progress: the next failure waits the least again.
    pub fn progressed(&mut self) {
        self.delay = Self::FIRST;
    }
}

/// What the node and pod tasks share.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub client: Client,
    pub ipam: Arc<Ipam>,
    pub s: KubeSettings,
    pub status: Arc<std::sync::Mutex<KubeStatus>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failing_watch_waits_longer_each_time_until_it_progresses() {
        let mut b = WatchBackoff::default();
        assert!(b.ready());
        let mut waits = vec![];
        for _ in 0..8 {
            let before = tokio::time::Instant::now();
            b.failed();
            assert!(!b.ready());
            waits.push(b.not_before() - before);
            tokio::time::advance(b.not_before() - before).await;
            assert!(b.ready());
        }
        // 1, 2, 4, ... 60 s, each give or take a fifth.
        let secs: Vec<f64> = waits.iter().map(Duration::as_secs_f64).collect();
        for (w, want) in secs
            .iter()
            .zip([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0])
        {
            assert!((w / want - 1.0).abs() <= 0.21, "{secs:?}");
        }
        b.progressed();
        b.failed();
        let w = (b.not_before() - tokio::time::Instant::now()).as_secs_f64();
        assert!(w <= 1.21, "reset by progress: {w}");
    }
}
