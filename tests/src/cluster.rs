//! A cluster of simulated nodes on one simulated EC2 account: each node runs
//! the production ipamd pool and reconciler ([`ipamd::ipam::Ipam`], journal
//! in memory, no node side) on [`vpc_sim`], whose per-API buckets are
//! account-wide as AWS documents them. Under tokio's paused clock on one
//! thread, with every jitter drawn from one seed, so thousands of nodes and
//! an hour run in minutes and two runs with one seed give the same figures.
//!
//! Pods: when a node is ready it is given its pods at once (a DaemonSet and
//! a deployment scaled up); an ADD that fails after its wait is retried by
//! the "kubelet" after [`KUBELET_RETRY`].

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use ipamd::config::Settings;
use ipamd::datastore::PodKey;
use ipamd::ipam::{Ipam, IpamError, StartError};
use ipamd::journal::MemStore;
use ipamd::k8s::growers::{Spell, GROWS_WITHIN, PUBLISH_EVERY};
use ipamd::k8s::peers::reread_after;
use ipamd::node::NodeTracker;
use ipamd::pool::JournalAt;
use providers::bucket::ec2_bucket;
use providers::layer::CallLayer;
use tokio::sync::watch;
use tokio::time::Instant;
use vpc_sim::provider::Backend;
use vpc_sim::{SimProvider, Vpc, VpcConfig, VpcState};

/// How long the "kubelet" waits before it tries a failed ADD again.
pub const KUBELET_RETRY: Duration = Duration::from_secs(2);
/// How often idle addresses are counted.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// A pool policy: a name and the settings (aws-node's variables) it means.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: &'static str,
    pub env: Vec<(&'static str, &'static str)>,
}

impl Policy {
    /// Whether it turns prefix delegation on (which Xen types cannot run).
    pub fn prefix_delegation(&self) -> bool {
        self.env.contains(&("ENABLE_PREFIX_DELEGATION", "true"))
    }

    /// The policies compared by `cluster-sim`.
    pub fn all() -> Vec<Policy> {
        vec![
            Policy {
                name: "aws-node default (WARM_ENI_TARGET=1)",
                env: vec![],
            },
            Policy {
                name: "WARM_IP_TARGET=5 MINIMUM_IP_TARGET=10",
                env: vec![("WARM_IP_TARGET", "5"), ("MINIMUM_IP_TARGET", "10")],
            },
            Policy {
                name: "prefix delegation (WARM_PREFIX_TARGET=1)",
                env: vec![
                    ("ENABLE_PREFIX_DELEGATION", "true"),
                    ("WARM_PREFIX_TARGET", "1"),
                ],
            },
            Policy {
                name: "adaptive (ADAPTIVE_WARM_TARGET=true)",
                env: vec![("ADAPTIVE_WARM_TARGET", "true")],
            },
            Policy {
                name: "adaptive with prefix delegation",
                env: vec![
                    ("ADAPTIVE_WARM_TARGET", "true"),
                    ("ENABLE_PREFIX_DELEGATION", "true"),
                ],
            },
        ]
    }
}

/// What a run simulates.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub nodes: usize,
    pub instance_type: String,
    /// Nodes join at moments spread evenly (seeded) over this.
    pub join_within: Duration,
    /// Pods per node; `None`: the instance's max pods under the policy.
    pub pods_per_node: Option<u32>,
    pub policy: Policy,
    pub seed: u64,
    /// The run stops here even if pods are still waiting.
    pub horizon: Duration,
    /// EC2's attach latency.
    pub attach_latency: Duration,
    /// The one subnet every node and its pods take addresses from, a /N
    /// (a small one: subnet pressure). A node whose primary interface finds
    /// no address does not start, and its pods go unserved.
    pub subnet_prefix_len: u8,
    /// What follows a cold start in which every pod was served; `None`:
    /// the run ends there.
    pub then: Option<AfterStart>,
    /// Nodes learn the cluster's node count, as ipamd does from the API
    /// server (at start and then as [`reread_after`] says); false: each node
    /// believes it is alone until throttled.
    pub count_peers: bool,
    /// With `count_peers`, nodes also learn how many nodes grow their
    /// pools, as ipamd does from the growers Leases
    /// (`ipamd::k8s::growers`): each node's grow calls take their share of
    /// those.
    pub count_growers: bool,
}

impl ClusterConfig {
    pub fn new(nodes: usize, policy: Policy, seed: u64) -> Self {
        Self {
            nodes,
            instance_type: "m5.large".into(),
            join_within: Duration::from_secs(60),
            pods_per_node: None,
            policy,
            seed,
            horizon: Duration::from_secs(3600),
            attach_latency: Duration::from_secs(2),
            subnet_prefix_len: 12,
            count_peers: true,
            count_growers: true,
            then: Some(AfterStart::default()),
        }
    }
}

/// The scenarios after the cold start: scale down (half of every node's
/// pods deleted at once, then `scale_down_for` for the pools to shrink),
/// then steady churn for `churn_for` (on every node, a pod deleted and a
/// new one created every `churn_every` on average).
#[derive(Debug, Clone)]
pub struct AfterStart {
    pub scale_down_for: Duration,
    pub churn_for: Duration,
    pub churn_every: Duration,
}

impl Default for AfterStart {
    /// Ten minutes to shrink, 30 minutes of churn at one pod replaced per
    /// node a minute (at 2,000 nodes, 33 ADDs a second in the cluster).
    fn default() -> Self {
        Self {
            scale_down_for: Duration::from_secs(600),
            churn_for: Duration::from_secs(1800),
            churn_every: Duration::from_secs(60),
        }
    }
}

/// ADD waits, calls and idle addresses: the cold start's and each later
/// phase's.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub add_wait_p50: Duration,
    pub add_wait_p99: Duration,
    pub add_wait_max: Duration,
    /// ADD attempts that failed after their wait (retried by the kubelet).
    pub add_failures: u64,
    /// Calls the account received per API, and of those throttled.
    pub calls: BTreeMap<String, u64>,
    pub throttled: BTreeMap<String, u64>,
    pub idle_mean: f64,
    pub idle_peak: u64,
}

impl Figures {
    /// From the ADD waits (sorted), failed attempts, calls and idle samples.
    fn new(
        sorted_waits: &[Duration],
        add_failures: u64,
        calls: BTreeMap<String, u64>,
        throttled: BTreeMap<String, u64>,
        idle: &Idle,
    ) -> Self {
        Self {
            add_wait_p50: percentile(sorted_waits, 0.5),
            add_wait_p99: percentile(sorted_waits, 0.99),
            add_wait_max: sorted_waits.last().copied().unwrap_or_default(),
            add_failures,
            calls,
            throttled,
            idle_mean: idle.mean(),
            idle_peak: idle.peak,
        }
    }

    pub fn total_calls(&self) -> u64 {
        self.calls.values().sum()
    }

    pub fn total_throttled(&self) -> u64 {
        self.throttled.values().sum()
    }
}

/// The figures of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub policy: String,
    pub nodes: usize,
    pub pods: u64,
    pub pods_served: u64,
    /// From the first node's join to the last pod's address.
    pub all_served_after: Option<Duration>,
    /// The cold start's.
    pub figures: Figures,
    /// Seconds the account's buckets need at least for the changes that
    /// went through: max over mutating APIs of (calls − burst) / refill.
    /// Reads are left out: most are the periodic resync, whose number
    /// grows with the run's length, not with what the pods need.
    pub floor: Duration,
    /// How long the cold start ran (until every pod was served, or the
    /// horizon).
    pub cold_start_for: Duration,
    /// After the cold start ([`ClusterConfig::then`]): half of every
    /// node's pods deleted at once.
    pub scale_down: Option<Phase>,
    /// Then steady churn on the pods left.
    pub churn: Option<Phase>,
    /// Invariant violations found (empty when all hold).
    pub violations: Vec<String>,
    /// Nodes that could not start (their pods unserved), and the first
    /// one's reason.
    pub nodes_not_started: u64,
    pub not_started_why: Option<String>,
    /// Addresses the subnet still had free at the end (subnet pressure:
    /// 0 when the pods that went unserved could not have had one).
    pub subnet_free_at_end: u32,
}

impl Report {
    /// Achieved time over the floor.
    pub fn ratio(&self) -> Option<f64> {
        let t = self.all_served_after?;
        (self.floor > Duration::ZERO).then(|| t.as_secs_f64() / self.floor.as_secs_f64())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The policy's settings. The leaked-interface collection is off: it
/// judges an interface's age by its wall-clock tag, which a paused clock
/// does not move, so what it found would depend on how fast the
/// simulation ran (two runs with one seed differed by a few calls).
fn settings(policy: &Policy) -> Settings {
    let mut m: std::collections::HashMap<&str, &str> = policy.env.iter().copied().collect();
    m.insert("DISABLE_LEAKED_ENI_CLEANUP", "true");
    Settings::from_source(&m).expect("policy settings")
}

/// Runs one simulation on a fresh single-threaded runtime with a paused
/// clock.
pub fn run(cfg: &ClusterConfig) -> Report {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    providers::jitter::seed_this_thread(cfg.seed);
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, simulate(cfg.clone()))
}

struct Shared {
    waits: Vec<Duration>,
    failures: u64,
    served: u64,
    last_served: Option<Instant>,
    /// Nodes that could not start, with the first reason.
    not_started: u64,
    not_started_why: Option<String>,
}

async fn simulate(cfg: ClusterConfig) -> Report {
    // One subnet: a second one for pods only would never be used while
    // the nodes' own subnet has more addresses free (ipamd picks the
    // candidate with the most), so it could not show subnet pressure.
    let cidr = format!("10.0.0.0/{}", cfg.subnet_prefix_len);
    let state = VpcState::with_layout(
        "10.0.0.0/8",
        &[("subnet-0sim00000000node", &cidr, "sim-1a", &[])],
    )
    .expect("layout");
    let vpc = Arc::new(Vpc::with_state(
        VpcConfig {
            attach_latency: cfg.attach_latency,
            throttling: true,
            ..VpcConfig::default()
        },
        state,
    ));
    let settings = settings(&cfg.policy);
    let started = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Rc::new(std::cell::RefCell::new(Shared {
        waits: vec![],
        failures: 0,
        served: 0,
        last_served: None,
        not_started: 0,
        not_started_why: None,
    }));
    let nodes: Rc<std::cell::RefCell<Vec<Arc<Ipam>>>> = Rc::default();
    // Nodes registered with the API server so far: what ipamd's node count
    // reads (`ipamd::k8s::peers`).
    let registered: Rc<std::cell::Cell<u32>> = Rc::default();
    // Nodes whose pool grew lately, as they publish it: what ipamd's
    // growers count reads (`ipamd::k8s::growers`).
    let growers: Rc<std::cell::Cell<u32>> = Rc::default();
    let count_growers = cfg.count_peers && cfg.count_growers;
    let mut total_pods = 0u64;
    let mut joins: Vec<Duration> = (0..cfg.nodes)
        .map(|_| {
            Duration::from_millis(providers::jitter::between(
                0,
                cfg.join_within.as_millis() as u64,
            ))
        })
        .collect();
    joins.sort();
    // The same pods for every policy: aws-node's max pods for the type
    // (its IP-based figure, also under prefix delegation) less the two
    // host-network pods it counts, which take no VPC address.
    let pods_per_node = cfg.pods_per_node.unwrap_or_else(|| {
        let t = providers::limits::lookup(&cfg.instance_type).expect("instance type");
        settings
            .pool
            .max_pods
            .unwrap_or(t.limits.max_pods())
            .saturating_sub(2)
    });
    let mut tasks = vec![];
    for (n, at) in joins.into_iter().enumerate() {
        total_pods += u64::from(pods_per_node);
        let (vpc, settings, stop_rx) = (vpc.clone(), settings.clone(), stop_rx.clone());
        let (shared, nodes, registered) = (shared.clone(), nodes.clone(), registered.clone());
        let growers = growers.clone();
        // The growers count this node last read.
        let read_growers: Rc<std::cell::Cell<Option<u32>>> = Rc::default();
        let instance_type = cfg.instance_type.clone();
        let count_peers = cfg.count_peers;
        tasks.push(tokio::task::spawn_local(async move {
            tokio::time::sleep(at).await;
            registered.set(registered.get() + 1);
            let name = format!("node-{n:05}");
            let mut never = stop_rx.clone();
            let ipam = ipamd::startup::with_retries(
                "start",
                &mut never,
                StartError::is_transient,
                async || {
                    // The node count read before the provider's first
                    // calls, as ipamd's start does.
                    let layer = CallLayer::ec2();
                    if count_peers {
                        layer.set_peers(registered.get());
                    }
                    let p = SimProvider::join_with(
                        Backend::Local(vpc.clone()),
                        &name,
                        &instance_type,
                        layer,
                    )
                    .await?;
                    Ipam::start_with(
                        Arc::new(p),
                        settings.clone(),
                        JournalAt::Memory(MemStore::default()),
                        NodeTracker::nothing(),
                    )
                    .await
                },
            )
            .await;
            let ipam = match ipam {
                Ok(Some(ipam)) => ipam,
                Ok(None) => return,
                Err(e) => {
                    // A fatal start error (a subnet with no address for
                    // the node's own interface): its pods go unserved.
                    let mut s = shared.borrow_mut();
                    s.not_started += 1;
                    s.not_started_why.get_or_insert(format!("{name}: {e}"));
                    return;
                }
            };
            tokio::task::spawn_local(ipam.clone().run(stop_rx.clone()));
            if count_peers {
                // As ipamd's Kubernetes side reads the node count.
                let (ipam, registered, growers) =
                    (ipam.clone(), registered.clone(), growers.clone());
                let read = read_growers.clone();
                tokio::task::spawn_local(async move {
                    for n in 0.. {
                        tokio::time::sleep(reread_after(n)).await;
                        let p = ipam.reconciler.provider();
                        p.set_account_peers(registered.get());
                        // Read only while the node grows, as ipamd does.
                        if count_growers && ipam.reconciler.grows(GROWS_WITHIN) {
                            read.set(Some(growers.get()));
                        }
                    }
                });
            }
            if count_growers {
                // As ipamd's Kubernetes side publishes that it grows.
                let (ipam, growers) = (ipam.clone(), growers.clone());
                let read = read_growers.clone();
                tokio::task::spawn_local(async move {
                    let mut spell = Spell::default();
                    loop {
                        let now = ipam.reconciler.grows(GROWS_WITHIN);
                        if now != spell.grows() {
                            growers.set(if now {
                                growers.get() + 1
                            } else {
                                growers.get() - 1
                            });
                        }
                        // As ipamd does: the count applies after a long
                        // spell of growth.
                        let share = spell.look(now, Instant::now(), read.get());
                        ipam.reconciler.provider().set_account_growers(share);
                        tokio::time::sleep(PUBLISH_EVERY).await;
                    }
                });
            }
            nodes.borrow_mut().push(ipam.clone());
            // Pods are scheduled once the node is ready.
            let mut changes = ipam.subscribe();
            while ipam.readiness().is_err() {
                tokio::time::timeout(Duration::from_secs(1), changes.changed())
                    .await
                    .ok();
            }
            for p in 0..pods_per_node {
                let (ipam, shared, name) = (ipam.clone(), shared.clone(), name.clone());
                tokio::task::spawn_local(async move {
                    let key = PodKey {
                        network: "vpc-cni".into(),
                        container_id: format!("{name}-pod-{p:03}"),
                        ifname: "eth0".into(),
                    };
                    let created = Instant::now();
                    loop {
                        match ipam.add(key.clone()).await {
                            Ok(_) => {
                                let mut s = shared.borrow_mut();
                                s.waits.push(created.elapsed());
                                s.served += 1;
                                s.last_served = Some(Instant::now());
                                return;
                            }
                            Err(_) => {
                                shared.borrow_mut().failures += 1;
                                tokio::time::sleep(KUBELET_RETRY).await;
                            }
                        }
                    }
                });
            }
        }));
    }
    // Count idle addresses until every pod is served or the horizon.
    let mut idle = Idle::default();
    loop {
        tokio::time::sleep(SAMPLE_EVERY).await;
        idle.sample(&nodes.borrow());
        let served = shared.borrow().served;
        if served == total_pods || started.elapsed() >= cfg.horizon {
            break;
        }
    }
    let (calls, throttled) = vpc.call_counts();
    let cold_elapsed = started.elapsed();
    let all_nodes: Vec<Arc<Ipam>> = nodes.borrow().clone();
    let (scale_down, churn) = if shared.borrow().served == total_pods && cfg.then.is_some() {
        let then = cfg.then.clone().expect("checked");
        let down = phase(&vpc, &all_nodes, then.scale_down_for, |ipam| {
            let mut pods: Vec<PodKey> = ipam.assignments().into_iter().map(|(k, _)| k).collect();
            pods.sort();
            let half = pods.len() / 2;
            async move {
                for key in pods.into_iter().take(half) {
                    ipam.del(key).await.ok();
                }
                vec![]
            }
        })
        .await;
        let churn = phase(&vpc, &all_nodes, then.churn_for, |ipam| {
            let (every, until) = (then.churn_every, Instant::now() + then.churn_for);
            async move { churn_node(ipam, every, until).await }
        })
        .await;
        (Some(down), Some(churn))
    } else {
        (None, None)
    };
    stop_tx.send(true).ok();
    for t in tasks {
        t.abort();
    }
    let s = shared.borrow();
    let mut waits = s.waits.clone();
    waits.sort();
    let floor = calls
        .iter()
        .filter(|(api, _)| !api.starts_with("Describe"))
        .map(|(api, n)| {
            let ok = n - throttled.get(api).copied().unwrap_or(0);
            let b = ec2_bucket(api);
            Duration::from_secs_f64((ok as f64 - b.burst).max(0.0) / b.refill_per_sec)
        })
        .max()
        .unwrap_or_default();
    let (all_calls, all_throttled) = vpc.call_counts();
    let violations = check(
        &vpc,
        &nodes.borrow(),
        &all_calls,
        &all_throttled,
        started.elapsed(),
    );
    Report {
        policy: cfg.policy.name.to_string(),
        nodes: cfg.nodes,
        pods: total_pods,
        pods_served: s.served,
        all_served_after: (s.served == total_pods)
            .then(|| s.last_served.map(|t| t - started))
            .flatten(),
        figures: Figures::new(&waits, s.failures, calls, throttled, &idle),
        floor,
        cold_start_for: cold_elapsed,
        scale_down,
        churn,
        violations,
        nodes_not_started: s.not_started,
        not_started_why: s.not_started_why.clone(),
        subnet_free_at_end: vpc
            .snapshot()
            .subnets
            .values()
            .map(|s| s.free_count())
            .sum(),
    }
}

/// Idle (available) addresses over the nodes, sampled.
#[derive(Default)]
struct Idle {
    sum: u64,
    samples: u64,
    peak: u64,
    last: u64,
}

impl Idle {
    fn sample(&mut self, nodes: &[Arc<Ipam>]) {
        let now = Instant::now();
        let idle: u64 = nodes
            .iter()
            .map(|i| u64::from(i.pool.read(|r| r.ds.counts(now)).available))
            .sum();
        self.sum += idle;
        self.samples += 1;
        self.peak = self.peak.max(idle);
        self.last = idle;
    }

    fn mean(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.sum as f64 / self.samples as f64
        }
    }
}

/// What happened in the cluster during one phase after the cold start.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    /// ADDs served.
    pub adds: u64,
    /// Pods created in the phase whose ADD was not served by
    /// `CHURN_GRACE` (60 s) after its end.
    pub unserved: u64,
    /// The first of them: its node and the last error its ADD got.
    pub unserved_why: Option<String>,
    /// The phase's own (calls: those made during it).
    pub figures: Figures,
    /// Idle addresses at the phase's end.
    pub idle_end: u64,
}

fn minus(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    a.iter()
        .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// One pod's ADD in a phase, with the attempts that failed after their
/// wait (each retried as the kubelet retries).
enum Add {
    Served {
        wait: Duration,
        failures: u64,
    },
    /// Not served by `CHURN_GRACE` (60 s) after the phase ended, or
    /// refused as invalid (never retried): the node and the last error.
    Unserved {
        failures: u64,
        why: String,
    },
}

/// Runs `work` on every node at once for `length`, sampling idle
/// addresses; `work` returns the ADDs it made.
async fn phase<F, Fut>(vpc: &Vpc, nodes: &[Arc<Ipam>], length: Duration, work: F) -> Phase
where
    F: Fn(Arc<Ipam>) -> Fut,
    Fut: std::future::Future<Output = Vec<Add>> + 'static,
{
    let (calls0, throttled0) = vpc.call_counts();
    let started = Instant::now();
    let tasks: Vec<_> = nodes
        .iter()
        .map(|n| tokio::task::spawn_local(work(n.clone())))
        .collect();
    let mut idle = Idle::default();
    while started.elapsed() < length {
        tokio::time::sleep(SAMPLE_EVERY).await;
        idle.sample(nodes);
    }
    let (mut waits, mut failures, mut unserved) = (vec![], 0, 0);
    let mut unserved_why = None;
    for t in tasks {
        for add in t.await.unwrap_or_default() {
            match add {
                Add::Served { wait, failures: f } => {
                    waits.push(wait);
                    failures += f;
                }
                Add::Unserved { failures: f, why } => {
                    unserved += 1;
                    failures += f;
                    unserved_why.get_or_insert(why);
                }
            }
        }
    }
    waits.sort();
    let (calls, throttled) = vpc.call_counts();
    Phase {
        adds: waits.len() as u64,
        unserved,
        unserved_why,
        figures: Figures::new(
            &waits,
            failures,
            minus(&calls, &calls0),
            minus(&throttled, &throttled0),
            &idle,
        ),
        idle_end: idle.last,
    }
}

/// How long after churn's end a pod created in it is still retried.
const CHURN_GRACE: Duration = Duration::from_secs(60);

/// Steady churn on one node until `until`: every `every` on average
/// (exponential gaps, seeded) a pod is deleted and a new one created; each
/// ADD is retried as the kubelet retries.
async fn churn_node(ipam: Arc<Ipam>, every: Duration, until: Instant) -> Vec<Add> {
    let mut out = vec![];
    let mut n = 0u32;
    loop {
        let u = providers::jitter::between(1, 1_000_000) as f64 / 1e6;
        // Never past the phase's end: the phase ends when every node's
        // task has, and its calls are counted then.
        let gap = every.mul_f64(-u.ln());
        tokio::time::sleep(gap.min(until.saturating_duration_since(Instant::now()))).await;
        if Instant::now() >= until {
            return out;
        }
        let mut pods: Vec<PodKey> = ipam.assignments().into_iter().map(|(k, _)| k).collect();
        if pods.is_empty() {
            continue;
        }
        pods.sort();
        let gone = pods.swap_remove(providers::jitter::between(0, pods.len() as u64 - 1) as usize);
        ipam.del(gone.clone()).await.ok();
        n += 1;
        // Named after the node's first pod, not after the one it replaces:
        // a name grown at each replacement passes the CNI's 256-byte limit
        // on a node with few pods.
        let base = gone
            .container_id
            .split("-churn-")
            .next()
            .unwrap_or_default();
        let key = PodKey {
            container_id: format!("{base}-churn-{n}"),
            ..gone
        };
        let created = Instant::now();
        let mut failures = 0;
        loop {
            match ipam.add(key.clone()).await {
                Ok(_) => {
                    out.push(Add::Served {
                        wait: created.elapsed(),
                        failures,
                    });
                    break;
                }
                // Retried a little past the phase's end too: an ADD that
                // failed in its last seconds is not "never served". Only
                // waits are retried: any other refusal is the simulator's
                // fault or ipamd's, and is reported at once.
                Err(IpamError::Exhausted { .. }) if Instant::now() < until + CHURN_GRACE => {
                    failures += 1;
                    tokio::time::sleep(KUBELET_RETRY).await;
                }
                Err(e) => {
                    out.push(Add::Unserved {
                        failures: failures + 1,
                        why: format!("{}: {e}", key.container_id),
                    });
                    return out;
                }
            }
        }
    }
}

/// The invariants: no address on two pods, every pod's address on an
/// interface of its node in the cloud, no instance over its limits, no
/// account bucket exceeded.
fn check(
    vpc: &Vpc,
    nodes: &[Arc<Ipam>],
    calls: &BTreeMap<String, u64>,
    throttled: &BTreeMap<String, u64>,
    elapsed: Duration,
) -> Vec<String> {
    let mut bad = vec![];
    let state = vpc.snapshot();
    let mut seen: HashSet<Ipv4Addr> = HashSet::new();
    for ipam in nodes {
        let inst = ipam.instance();
        let attached: Vec<_> = state
            .interfaces
            .values()
            .filter(|e| {
                e.attachment
                    .as_ref()
                    .is_some_and(|a| a.instance_id == inst.id)
            })
            .collect();
        let on_node: HashSet<Ipv4Addr> = attached
            .iter()
            .flat_map(|e| {
                let mut v = e.secondary_ips.clone();
                for p in &e.prefixes {
                    v.extend(
                        (u32::from(p.network())..=u32::from(p.broadcast())).map(Ipv4Addr::from),
                    );
                }
                v
            })
            .collect();
        if attached.len() as u32 > inst.limits.max_interfaces {
            bad.push(format!(
                "{} has {} interfaces, over its limit of {}",
                inst.id,
                attached.len(),
                inst.limits.max_interfaces
            ));
        }
        for (key, ip) in ipam.assignments() {
            if !seen.insert(ip) {
                bad.push(format!("{ip} is on two pods (one is {key})"));
            }
            if !on_node.contains(&ip) {
                bad.push(format!("{key}'s {ip} is not on its node in the cloud"));
            }
        }
    }
    for e in state.interfaces.values() {
        let slots = e.secondary_ips.len() + e.prefixes.len() + 1;
        let limit = e
            .attachment
            .as_ref()
            .and_then(|a| state.instances.get(&a.instance_id))
            .and_then(|i| providers::limits::lookup(&i.instance_type))
            .map(|t| t.limits.ipv4_per_interface as usize);
        if let Some(limit) = limit {
            if slots > limit {
                bad.push(format!(
                    "{} holds {slots} address slots, over {limit}",
                    e.id
                ));
            }
        }
    }
    for (api, n) in calls {
        let ok = n - throttled.get(api).copied().unwrap_or(0);
        let b = ec2_bucket(api);
        let allowed = b.burst + b.refill_per_sec * elapsed.as_secs_f64() + 1.0;
        if ok as f64 > allowed {
            bad.push(format!(
                "{api}: {ok} calls went through, more than the account's bucket allows ({allowed:.0})"
            ));
        }
    }
    bad
}
