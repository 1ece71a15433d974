//! One node's ipamd put together: the journal replayed, the instance and
//! its interfaces read, the [`Pool`] restored, the [`Reconciler`] and the
//! node side ([`NodeTracker`]) around it, and the readiness latch.
//!
//! The parts keep their own state; this module only starts them in order
//! and answers for the whole.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use providers::{CloudProvider, Instance, ProviderError};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::Settings;
use crate::datastore::{PodKey, PodName};
use crate::journal::{self, JournalError};
use crate::netns::NetnsRef;
use crate::node::NodeTracker;
use crate::pool::{JournalAt, Pool, Restore};
use crate::reconciler::{complete_half_made, Reconciler, Start, StepError};

pub use crate::pool::{check_key, IpamError, Wiring};
pub use crate::reconciler::Status;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("cloud provider: {0}")]
    Provider(#[from] ProviderError),
    #[error("{0}")]
    Config(String),
    /// The node side cannot be opened (no netlink socket).
    #[error("node side: {0}")]
    Node(String),
}

impl StartError {
    /// Worth trying again after a backoff (throttling, 5xx, timeouts).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Provider(e) if e.is_transient())
    }
}

/// See the module documentation.
pub struct Ipam {
    pub pool: Arc<Pool>,
    pub reconciler: Arc<Reconciler>,
    /// Latched once ipamd has been ready: the journal replayed, the node
    /// side in place, the provider able to grow the pool, and at least one
    /// assignable address (or pods holding addresses already).
    latched: AtomicBool,
    /// Time from the process's start ([`crate::metrics::process_started`])
    /// to the first time it was ready.
    ready_after: std::sync::OnceLock<std::time::Duration>,
    /// The Kubernetes side's status, once it runs (see [`crate::k8s`]).
    kube: std::sync::OnceLock<Arc<std::sync::Mutex<crate::k8s::KubeStatus>>>,
}

impl Ipam {
    /// [`Ipam::start_with`] with the journal at `journal_path` and no node
    /// side.
    pub async fn start(
        provider: Arc<dyn CloudProvider>,
        settings: Settings,
        journal_path: &Path,
    ) -> Result<Arc<Self>, StartError> {
        Self::start_with(
            provider,
            settings,
            JournalAt::File(journal_path),
            NodeTracker::nothing(),
        )
        .await
    }

    /// Replays the journal, reads the instance and its interfaces, restores
    /// every assignment onto the interfaces ipamd manages, compacts the
    /// journal, and puts the reconciler and `node` around the pool.
    pub async fn start_with(
        provider: Arc<dyn CloudProvider>,
        settings: Settings,
        journal_at: JournalAt<'_>,
        node: NodeTracker,
    ) -> Result<Arc<Self>, StartError> {
        let replayed = match &journal_at {
            JournalAt::File(path) => journal::replay(path)?,
            JournalAt::Memory(store) => store.replay()?,
        };
        if replayed.truncated > 0 {
            warn!(
                bytes = replayed.truncated,
                "cut a torn record off the end of the journal"
            );
        }
        let instance = provider.describe_instance().await?;
        let caps = provider.capabilities();
        if settings.pool.prefix_delegation && !(caps.prefixes && instance.limits.prefix_delegation)
        {
            return Err(StartError::Config(format!(
                "ENABLE_PREFIX_DELEGATION=true but instance type {} on {} does not support prefix delegation",
                instance.instance_type,
                provider.name()
            )));
        }
        let held: BTreeSet<Ipv4Addr> = replayed.assignments.values().copied().collect();
        let mut frozen = BTreeSet::new();
        let all = provider.describe_interfaces().await?;
        // A failure is logged; the next resync tries again.
        complete_half_made(&*provider, &instance.id, &all).await;
        let (interfaces, foreign) = crate::ownership::split(
            all,
            &instance.id,
            !settings.custom_networking,
            |i| holds_any(i, &held),
            &mut frozen,
        );
        crate::ownership::log_new_foreign(&foreign, &BTreeMap::new());
        let pool = Arc::new(Pool::restore(
            settings,
            Restore {
                replayed,
                interfaces,
                draining: frozen.clone(),
            },
            journal_at,
        )?);
        info!(
            instance = %instance.id,
            instance_type = %instance.instance_type,
            node_side = node.side().name(),
            "ipamd started"
        );
        let reconciler = Arc::new(Reconciler::new(
            pool.clone(),
            Start {
                provider,
                instance,
                caps,
                foreign,
                frozen,
                node: Arc::new(node),
            },
        ));
        Ok(Arc::new(Self {
            pool,
            reconciler,
            latched: AtomicBool::new(false),
            ready_after: std::sync::OnceLock::new(),
            kube: std::sync::OnceLock::new(),
        }))
    }

    /// Readiness: `Ok` once ipamd can wire pods, with every reason it
    /// cannot otherwise. The start-up conditions (node side in place, the
    /// provider able to grow the pool, one assignable address or pods that
    /// hold theirs already, as on a full node that restarts) latch: once
    /// met, later exhaustion does not make ipamd unready (pods already
    /// running still need their DEL). A journal that cannot be written
    /// makes it unready while it lasts.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut why = vec![];
        if let Err(e) = self.pool.health() {
            why.push(e);
        }
        if !self.latched.load(Ordering::SeqCst) {
            if let Err(e) = self.reconciler.node().in_place() {
                why.push(format!("node side: {e}"));
            }
            if let Some(b) = self.reconciler.provider().blocker() {
                why.push(b);
            }
            // An address to give, or pods already holding theirs (a node
            // full at MAX_PODS or its interface limit that restarts ipamd
            // must not turn unready: runtimes fail STATUS and the kubelet
            // would mark the node NotReady).
            let counts = self.pool.read(|r| r.ds.counts(Instant::now()));
            if counts.assignable == 0 && counts.assigned == 0 {
                why.push(format!(
                    "no assignable address yet: {}",
                    self.pool.exhaustion_reason()
                ));
            }
            if why.is_empty() {
                self.latched.store(true, Ordering::SeqCst);
                self.ready_after
                    .get_or_init(|| crate::metrics::process_started().elapsed());
                info!("ready: the pool has addresses and the node side is in place");
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }

    /// Why `pod` has an address or not, or (`None`) why the next ADD would
    /// get one or not: a verdict, its message and the facts behind it (see
    /// [`crate::explain`]).
    pub fn explain(&self, pod: Option<&PodName>) -> crate::explain::Explanation {
        use crate::explain::{Explanation, Held, Verdict};
        let mut facts = self.pool.facts();
        facts.not_ready_because = self.readiness().err().unwrap_or_default();
        let held: Vec<Held> = match pod {
            None => vec![],
            Some(pod) => self.pool.read(|p| {
                p.pods
                    .iter()
                    .filter(|(_, name)| *name == pod)
                    .filter_map(|(k, _)| {
                        let (ip, interface) = match p.ds.lookup(k) {
                            Some(place) => (place.ip, Some(place.interface_id.clone())),
                            None => (*p.unconfirmed.get(k)?, None),
                        };
                        Some(Held {
                            network: k.network.clone(),
                            ifname: k.ifname.clone(),
                            ip,
                            confirmed: interface.is_some(),
                            interface,
                        })
                    })
                    .collect()
            }),
        };
        let (verdict, mut message) = facts.next_add();
        let (subject, verdict, message) = match pod {
            None => ("the next ADD".to_string(), verdict, message),
            Some(pod) if !held.is_empty() => {
                let list: Vec<String> = held
                    .iter()
                    .map(|h| {
                        let on = h.interface.as_deref().unwrap_or(
                            "an interface the cloud's last answer did not show (held until seen again)",
                        );
                        format!("{} on {} ({} {})", h.ip, on, h.network, h.ifname)
                    })
                    .collect();
                (
                    format!("pod {pod}"),
                    Verdict::Assigned,
                    format!("{pod} holds {}", list.join(", ")),
                )
            }
            Some(pod) => {
                message = format!("no address is assigned to {pod}; an ADD now: {message}");
                (format!("pod {pod}"), verdict, message)
            }
        };
        let message = if facts.not_ready_because.is_empty() {
            message
        } else {
            format!(
                "{message}; ipamd is not ready: {}",
                facts.not_ready_because.join("; ")
            )
        };
        Explanation {
            subject,
            verdict,
            message,
            held,
            facts,
        }
    }

    /// How long after the process started ipamd was first ready; `None`
    /// until it has been.
    pub fn ready_after(&self) -> Option<std::time::Duration> {
        self.ready_after.get().copied()
    }

    /// The Kubernetes side's status (created at the first call: the
    /// Kubernetes side runs from then on).
    pub fn kube_status(&self) -> Arc<std::sync::Mutex<crate::k8s::KubeStatus>> {
        self.kube.get_or_init(Default::default).clone()
    }

    /// [`Ipam::kube_status`] now, if the Kubernetes side runs.
    pub fn kube_snapshot(&self) -> Option<crate::k8s::KubeStatus> {
        self.kube.get().map(|k| k.lock().expect("lock").clone())
    }

    /// Liveness (see [`Pool::health`]).
    pub fn health(&self) -> Result<(), String> {
        self.pool.health()
    }

    pub fn instance(&self) -> &Instance {
        self.reconciler.instance()
    }

    pub fn settings(&self) -> &Settings {
        self.pool.settings()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.pool.subscribe()
    }

    pub async fn add(&self, key: PodKey) -> Result<Wiring, IpamError> {
        self.pool.add(key).await
    }

    pub async fn add_in(
        &self,
        key: PodKey,
        netns: Option<NetnsRef>,
        pod: Option<PodName>,
    ) -> Result<Wiring, IpamError> {
        self.pool.add_in(key, netns, pod).await
    }

    pub async fn del(&self, key: PodKey) -> Result<Option<Wiring>, IpamError> {
        self.pool.del(key).await
    }

    pub fn lookup(&self, key: &PodKey) -> Option<Wiring> {
        self.pool.lookup(key)
    }

    pub fn holder_of(&self, ip: Ipv4Addr) -> Option<PodKey> {
        self.pool.holder_of(ip)
    }

    pub fn assignments(&self) -> Vec<(PodKey, Ipv4Addr)> {
        self.pool.assignments()
    }

    pub async fn gc(
        &self,
        network: &str,
        valid: &std::collections::HashSet<(String, String)>,
    ) -> Result<Vec<(PodKey, Wiring)>, IpamError> {
        self.pool.gc(network, valid).await
    }

    /// Test hook: see [`crate::journal::Journal::fail_next_writes`].
    #[doc(hidden)]
    pub fn fail_next_journal_writes(&self, n: u32) {
        self.pool.fail_next_journal_writes(n);
    }

    /// One reconciler pass (see [`Reconciler::step`]).
    pub async fn step(&self) -> Result<usize, StepError> {
        self.reconciler.step().await
    }

    /// Compares the pool with the cloud now (see [`Reconciler::resync`]).
    pub async fn resync(&self) -> Result<(), ProviderError> {
        self.reconciler.resync().await
    }

    /// Runs the reconciler until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        self.reconciler.clone().run(shutdown).await
    }

    /// Pool figures and reconciler status (see [`crate::introspect`]).
    pub fn summary(&self) -> serde_json::Value {
        crate::introspect::summary(self)
    }

    /// Interfaces with every address (see [`crate::introspect`]).
    pub fn interfaces(&self) -> serde_json::Value {
        crate::introspect::interfaces(&self.pool)
    }
}

/// Whether `i` holds any of `ips`.
fn holds_any(i: &providers::Interface, ips: &BTreeSet<Ipv4Addr>) -> bool {
    i.secondary_ips.iter().any(|ip| ips.contains(ip))
        || i.prefixes
            .iter()
            .any(|p| ips.iter().any(|ip| p.contains(ip)))
}
