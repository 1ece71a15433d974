//! ipamd's parts on their own: the pool without any cloud provider or
//! netlink (journal in memory), the reconciler driven by a scripted
//! provider, a node side that is late, and the readiness latch over them.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ipamd::config::Settings;
use ipamd::datastore::PodKey;
use ipamd::hostnet::{HostError, SnatConfig};
use ipamd::ipam::Ipam;
use ipamd::journal::{MemStore, Replayed};
use ipamd::node::{NodeSide, NodeTracker};
use ipamd::pool::{JournalAt, Pool, Restore};
use ipamd::reconciler::StepError;
use providers::{
    AssignRequest, Assigned, Capabilities, CloudProvider, CreateInterface, Instance, Interface,
    Limits, ProviderError, Result, Subnet,
};

fn key(c: &str) -> PodKey {
    PodKey {
        network: "vpc-cni".into(),
        container_id: c.into(),
        ifname: "eth0".into(),
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn primary(secondary: &[&str]) -> Interface {
    Interface {
        id: "eni-primary".into(),
        mac: "02:00:00:00:00:01".into(),
        device_index: 0,
        subnet_id: "subnet-1".into(),
        subnet_cidr: "10.0.0.0/24".parse().unwrap(),
        primary_ip: ip("10.0.0.5"),
        secondary_ips: secondary.iter().map(|s| ip(s)).collect(),
        prefixes: vec![],
        tags: BTreeMap::new(),
        delete_on_termination: Some(true),
    }
}

fn settings(env: &[(&str, &str)]) -> Settings {
    let m: HashMap<&str, &str> = env.iter().copied().collect();
    Settings::from_source(&m).unwrap()
}

#[tokio::test]
async fn the_pool_works_and_restarts_without_any_provider() {
    let store = MemStore::default();
    let restore = |replayed| Restore {
        replayed,
        interfaces: vec![primary(&["10.0.0.10", "10.0.0.11"])],
        draining: BTreeSet::new(),
    };
    let pool = Pool::restore(
        settings(&[("IPAMD_ADD_WAIT_SECONDS", "1")]),
        restore(Replayed::default()),
        JournalAt::Memory(store.clone()),
    )
    .unwrap();
    let a = pool.add(key("a")).await.unwrap();
    let b = pool.add(key("b")).await.unwrap();
    assert_ne!(a.ip, b.ip);
    assert_eq!(a.interface_id, "eni-primary");
    assert_eq!(
        a.route_table, 254,
        "the primary interface uses the main table"
    );
    // Nothing left, and nobody to grow the pool: the ADD says so.
    let err = pool.add(key("c")).await.unwrap_err().to_string();
    assert!(err.contains("not enough IPs available"), "{err}");
    pool.del(key("a")).await.unwrap();
    drop(pool);

    // A new pool on the same (memory) journal holds b's address for b,
    // and a's address is cooling, not free.
    let replayed = store.replay().unwrap();
    assert_eq!(replayed.assignments.get(&key("b")), Some(&b.ip));
    assert!(!replayed.assignments.contains_key(&key("a")));
    let again = Pool::restore(
        settings(&[("IPAMD_ADD_WAIT_SECONDS", "1")]),
        restore(replayed),
        JournalAt::Memory(store.clone()),
    )
    .unwrap();
    assert_eq!(again.lookup(&key("b")).map(|w| w.ip), Some(b.ip));
    assert_eq!(again.holder_of(a.ip), None);
    let err = again.add(key("d")).await.unwrap_err().to_string();
    assert!(err.contains("cooling"), "a's address was reissued: {err}");
}

/// A provider that answers what the test scripted, and records the calls.
struct Scripted {
    interfaces: Mutex<Vec<Interface>>,
    assigns: Mutex<VecDeque<Result<Assigned>>>,
    calls: Mutex<Vec<String>>,
    blocker: Mutex<Option<String>>,
}

impl Scripted {
    fn new(interfaces: Vec<Interface>) -> Arc<Self> {
        Arc::new(Self {
            interfaces: Mutex::new(interfaces),
            assigns: Mutex::new(VecDeque::new()),
            calls: Mutex::new(vec![]),
            blocker: Mutex::new(None),
        })
    }

    fn then_assign(&self, r: Result<Assigned>) {
        self.assigns.lock().unwrap().push_back(r);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl CloudProvider for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            hot_attach: true,
            prefixes: false,
        }
    }

    async fn describe_instance(&self) -> Result<Instance> {
        Ok(Instance {
            id: "i-1".into(),
            instance_type: "t3.small".into(),
            zone: "az-1".into(),
            primary_ip: ip("10.0.0.5"),
            primary_interface_id: "eni-primary".into(),
            subnet_id: "subnet-1".into(),
            vpc_id: "vpc-1".into(),
            vpc_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
            security_groups: vec!["sg-1".into()],
            limits: Limits {
                max_interfaces: 1,
                ipv4_per_interface: 4,
                prefix_delegation: false,
            },
        })
    }

    async fn describe_interfaces(&self) -> Result<Vec<Interface>> {
        self.calls.lock().unwrap().push("describe".into());
        Ok(self.interfaces.lock().unwrap().clone())
    }

    async fn assign(&self, interface_id: &str, request: AssignRequest) -> Result<Assigned> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("assign {interface_id} {request:?}"));
        let r = self
            .assigns
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Err(ProviderError::Server("nothing scripted".into())));
        if let Ok(got) = &r {
            let mut all = self.interfaces.lock().unwrap();
            let i = all.iter_mut().find(|i| i.id == interface_id).unwrap();
            i.secondary_ips.extend(&got.ips);
        }
        r
    }

    async fn release(&self, interface_id: &str, _: &Assigned) -> Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("release {interface_id}"));
        Ok(())
    }

    async fn create_interface(&self, _: &CreateInterface) -> Result<Interface> {
        Err(ProviderError::LimitExceeded(
            "scripted: one interface".into(),
        ))
    }

    async fn detach_interface(&self, _: &str) -> Result<()> {
        Ok(())
    }

    async fn delete_interface(&self, _: &str) -> Result<()> {
        Ok(())
    }

    async fn list_subnets(&self) -> Result<Vec<Subnet>> {
        Ok(vec![])
    }

    fn blocker(&self) -> Option<String> {
        self.blocker.lock().unwrap().clone()
    }
}

/// What the cloud gives counts as free only once: not an address the
/// pool knew already (free or a pod's), nor the interface's own primary
/// address, nor any on an interface the pool no longer has; a /28 counts
/// its 16. The reconciler counts a step's grows for waiting ADDs by it.
#[tokio::test]
async fn the_pool_counts_only_the_addresses_a_grow_made_free() {
    let pool = Pool::restore(
        settings(&[]),
        Restore {
            replayed: Replayed::default(),
            interfaces: vec![primary(&["10.0.0.10", "10.0.0.11"])],
            draining: BTreeSet::new(),
        },
        JournalAt::Memory(MemStore::default()),
    )
    .unwrap();
    let taken = pool.add(key("a")).await.unwrap().ip;
    let got = |ips: &[&str], prefixes: &[&str]| Assigned {
        ips: ips.iter().map(|s| ip(s)).collect(),
        prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
    };
    let known = if taken == ip("10.0.0.10") {
        "10.0.0.11"
    } else {
        "10.0.0.10"
    };
    let twice = got(&[&taken.to_string(), known, "10.0.0.5", "10.0.0.12"], &[]);
    assert_eq!(
        pool.add_addresses("eni-primary", &twice),
        1,
        "only .12 is new"
    );
    assert_eq!(
        pool.add_addresses("eni-primary", &got(&[], &["10.0.0.32/28"])),
        16
    );
    assert_eq!(pool.add_addresses("eni-gone", &got(&["10.0.0.13"], &[])), 0);
    assert_eq!(
        pool.add_addresses("eni-primary", &got(&["10.0.0.12"], &[])),
        0
    );
}

fn reasons(ipam: &Ipam) -> String {
    ipam.readiness().err().unwrap_or_default().join("; ")
}

#[tokio::test]
async fn the_reconciler_follows_a_scripted_provider_and_readiness_latches() {
    let cloud = Scripted::new(vec![primary(&[])]);
    *cloud.blocker.lock().unwrap() = Some("security groups are unknown (scripted)".into());
    let ipam = Ipam::start_with(
        cloud.clone(),
        settings(&[("WARM_IP_TARGET", "2"), ("IPAMD_ADD_WAIT_SECONDS", "1")]),
        JournalAt::Memory(MemStore::default()),
        NodeTracker::nothing(),
    )
    .await
    .unwrap();
    // Not ready: no address, and the provider says why it cannot grow.
    let why = reasons(&ipam);
    assert!(why.contains("no assignable address"), "{why}");
    assert!(why.contains("security groups are unknown"), "{why}");

    // The cloud refuses: the step fails with the cloud's error, still unready.
    cloud.then_assign(Err(ProviderError::LimitExceeded("scripted".into())));
    let err = ipam.step().await.unwrap_err();
    assert!(
        matches!(err, StepError::Cloud(ProviderError::LimitExceeded(_))),
        "{err}"
    );
    assert!(ipam.readiness().is_err());
    assert_eq!(
        cloud.calls(),
        vec![
            "describe".to_string(), // at start
            "assign eni-primary Ips(2)".to_string()
        ],
        "the policy asked for WARM_IP_TARGET addresses on the primary"
    );

    // The cloud gives two addresses; the provider's blocker is gone.
    cloud.then_assign(Ok(Assigned {
        ips: vec![ip("10.0.0.20"), ip("10.0.0.21")],
        prefixes: vec![],
    }));
    *cloud.blocker.lock().unwrap() = None;
    assert_eq!(ipam.step().await.unwrap(), 1);
    assert_eq!(ipam.readiness(), Ok(()));
    assert_eq!(ipam.summary()["ready"], true);

    // Latched: using every address does not make ipamd unready.
    ipam.add(key("a")).await.unwrap();
    ipam.add(key("b")).await.unwrap();
    assert_eq!(ipam.summary()["counts"]["assignable"], 0);
    assert_eq!(ipam.readiness(), Ok(()));

    // A journal that cannot be written does (every call would fail).
    ipam.fail_next_journal_writes(1);
    ipam.del(key("a")).await.unwrap_err();
    let why = reasons(&ipam);
    assert!(why.contains("cannot be written"), "{why}");
    // It heals at the next step, and ipamd is ready again.
    ipam.step().await.ok();
    assert_eq!(ipam.readiness(), Ok(()));
}

/// A node side whose links appear only after `late` attempts; shared
/// with the test, which looks at what was set up.
#[derive(Default)]
struct LateLinks {
    late: Mutex<u32>,
    set_up: Mutex<Vec<String>>,
    /// The primary interface each SNAT set-up was given.
    snat: Mutex<Vec<String>>,
}

struct Late(Arc<LateLinks>);

#[async_trait]
impl NodeSide for Late {
    fn name(&self) -> &'static str {
        "late"
    }

    async fn setup_interface(&self, iface: &Interface) -> std::result::Result<(), HostError> {
        let mut late = self.0.late.lock().unwrap();
        if *late > 0 {
            *late -= 1;
            return Err(HostError::NoLink {
                mac: iface.mac.clone(),
                id: iface.id.clone(),
            });
        }
        self.0.set_up.lock().unwrap().push(iface.id.clone());
        Ok(())
    }

    async fn teardown_interface(&self, _: &Interface) -> std::result::Result<(), HostError> {
        Ok(())
    }

    async fn setup_snat(
        &self,
        _: &SnatConfig,
        primary: &Interface,
    ) -> std::result::Result<(), HostError> {
        self.0.snat.lock().unwrap().push(primary.id.clone());
        Ok(())
    }
}

/// Under custom networking the primary interface is not the pool's, and
/// the node's SNAT is still set up on it (readiness waits for SNAT).
#[tokio::test]
async fn custom_networking_sets_up_snat_on_the_primary_it_does_not_manage() {
    let cloud = Scripted::new(vec![primary(&["10.0.0.10"])]);
    let side = Arc::new(LateLinks::default());
    let ipam = Ipam::start_with(
        cloud.clone(),
        settings(&[("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true")]),
        JournalAt::Memory(MemStore::default()),
        NodeTracker::new(Box::new(Late(side.clone()))),
    )
    .await
    .unwrap();
    assert_eq!(
        ipam.summary()["counts"]["interfaces"],
        0,
        "the primary is not the pool's"
    );
    ipam.step().await.unwrap();
    assert_eq!(*side.snat.lock().unwrap(), vec!["eni-primary".to_string()]);
    let why = reasons(&ipam);
    assert!(!why.contains("SNAT"), "{why}");
    // The scripted instance has one interface: under custom networking no
    // interface is left for pods, and ipamd says so.
    assert!(why.contains("limit of 0 interfaces"), "{why}");
}

#[tokio::test]
async fn addresses_wait_for_the_node_side_and_so_does_readiness() {
    let cloud = Scripted::new(vec![primary(&["10.0.0.10", "10.0.0.11"])]);
    let side = Arc::new(LateLinks {
        late: Mutex::new(1),
        ..Default::default()
    });
    let ipam = Ipam::start_with(
        cloud.clone(),
        settings(&[("WARM_IP_TARGET", "1"), ("IPAMD_ADD_WAIT_SECONDS", "1")]),
        JournalAt::Memory(MemStore::default()),
        NodeTracker::new(Box::new(Late(side.clone()))),
    )
    .await
    .unwrap();
    // The addresses exist but their interface is not set up on the node.
    assert_eq!(ipam.summary()["counts"]["available"], 2);
    assert_eq!(ipam.summary()["counts"]["assignable"], 0);
    let why = reasons(&ipam);
    assert!(why.contains("node side"), "{why}");
    assert!(why.contains("eni-primary"), "{why}");
    // The link is not there at the first step...
    ipam.step().await.unwrap();
    assert!(side.set_up.lock().unwrap().is_empty());
    assert!(ipam.readiness().is_err());
    // ... and is at the next one.
    ipam.step().await.unwrap();
    assert_eq!(
        *side.set_up.lock().unwrap(),
        vec!["eni-primary".to_string()]
    );
    assert_eq!(ipam.readiness(), Ok(()));
    assert_eq!(ipam.summary()["node_side"], "late");
    ipam.add(key("a")).await.unwrap();
}

/// A node full at MAX_PODS whose ipamd restarts is ready at once: its pods
/// hold their addresses, and failing STATUS would make the runtime report
/// the node's network as down.
#[tokio::test]
async fn a_full_node_that_restarts_is_ready() {
    let cloud = Scripted::new(vec![primary(&["10.0.0.10", "10.0.0.11"])]);
    let store = MemStore::default();
    let env = [("MAX_PODS", "2"), ("IPAMD_ADD_WAIT_SECONDS", "1")];
    let ipam = Ipam::start_with(
        cloud.clone(),
        settings(&env),
        JournalAt::Memory(store.clone()),
        NodeTracker::nothing(),
    )
    .await
    .unwrap();
    ipam.add(key("a")).await.unwrap();
    ipam.add(key("b")).await.unwrap();
    drop(ipam);
    let again = Ipam::start_with(
        cloud,
        settings(&env),
        JournalAt::Memory(store),
        NodeTracker::nothing(),
    )
    .await
    .unwrap();
    assert_eq!(again.summary()["counts"]["assignable"], 0);
    assert_eq!(again.summary()["counts"]["assigned"], 2);
    assert_eq!(again.readiness(), Ok(()));
}

/// Two hundred nodes of one simulated account start at once, as a
/// DaemonSet rollout does (each reads its instance from the metadata
/// service and its interfaces with one DescribeNetworkInterfaces, twice the
/// bucket's burst of 100): EC2's account-wide buckets throttle many of their first
/// calls, and every node still starts (the shared layer and start-up retry
/// throttling; nothing is fatal). Under tokio's paused clock, with the
/// production start-up code.
#[tokio::test(start_paused = true)]
async fn two_hundred_nodes_starting_at_once_all_start() {
    use ipamd::ipam::StartError;
    use vpc_sim::provider::Backend;
    use vpc_sim::{SimProvider, Vpc, VpcConfig};

    let vpc = Arc::new(Vpc::with_config(VpcConfig {
        attach_latency: std::time::Duration::from_millis(200),
        ..VpcConfig::default()
    }));
    // One task, a hundred futures: with_retries takes an async closure,
    // whose futures are not Send (the paused clock runs one thread anyway).
    let start = |n: usize| {
        let vpc = vpc.clone();
        async move {
            let (_keep, mut stop) = tokio::sync::watch::channel(false);
            let name = format!("node-{n}");
            ipamd::startup::with_retries("start", &mut stop, StartError::is_transient, async || {
                let p = SimProvider::join(Backend::Local(vpc.clone()), &name, "m5.large").await?;
                Ipam::start_with(
                    Arc::new(p),
                    settings(&[]),
                    JournalAt::Memory(MemStore::default()),
                    NodeTracker::nothing(),
                )
                .await
            })
            .await
        }
    };
    let all = futures_util::future::join_all((0..200).map(start)).await;
    let mut started = 0;
    for r in all {
        let ipam = r.expect("a node failed to start").expect("not stopped");
        assert_eq!(ipam.instance().instance_type, "m5.large");
        started += 1;
    }
    assert_eq!(started, 200);
    let (calls, throttled) = vpc.call_counts();
    assert!(
        throttled.values().sum::<u64>() > 0,
        "the account's buckets never throttled: the test shows nothing ({calls:?})"
    );
}

/// A node of `instance_type` in a 2,000-node account (a grow call's
/// share: one call per 400 s) started with `env`, after an idle hour
/// (each grow bucket holds its call and one more in reserve for a grow
/// ADDs wait for), whose
/// Create bucket's own call another caller of its layer then spent: the
/// provider, the pool, the stop switch, the reconciler's task.
async fn idle_node_with_create_spent(
    instance_type: &str,
    env: &[(&str, &str)],
) -> (
    Arc<vpc_sim::SimProvider>,
    Arc<Ipam>,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    use std::time::Duration;
    use vpc_sim::provider::Backend;
    use vpc_sim::{SimProvider, Vpc, VpcConfig};

    let vpc = Arc::new(Vpc::with_config(VpcConfig {
        attach_latency: Duration::from_millis(200),
        ..VpcConfig::default()
    }));
    let layer = providers::layer::CallLayer::ec2();
    layer.set_peers(2000);
    let p = Arc::new(
        SimProvider::join_with(Backend::Local(vpc.clone()), "node-a", instance_type, layer)
            .await
            .unwrap(),
    );
    let (ipam, stop, task) = node_on(p.clone(), env).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let t = tokio::time::Instant::now();
    p.create_interface(&CreateInterface {
        subnet_id: ipam.instance().subnet_id.clone(),
        security_groups: vec![],
        tags: BTreeMap::new(),
        initial: AssignRequest::Ips(1),
    })
    .await
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "Create's own call");
    (p, ipam, stop, task)
}

/// `n` pods' ADDs at once on `ipam`, each asserted served.
async fn add_all(ipam: &Arc<Ipam>, n: usize) {
    let adds = (0..n).map(|i| {
        let ipam = ipam.clone();
        async move { ipam.add(key(&format!("pod-{i}"))).await }
    });
    for (i, r) in futures_util::future::join_all(adds)
        .await
        .into_iter()
        .enumerate()
    {
        assert!(r.is_ok(), "pod-{i}: {:?}", r.err());
    }
}

/// [`add_all`], every ADD served within its 10 s wait (`add_wait`).
async fn add_all_within_their_wait(ipam: &Arc<Ipam>, n: usize) {
    let t = tokio::time::Instant::now();
    add_all(ipam, n).await;
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
}

/// The next AssignPrivateIpAddresses on `p`'s simulated cloud meets `kind`.
async fn fault_next_assign(p: &vpc_sim::SimProvider, kind: vpc_sim::FaultKind) {
    p.backend()
        .call(vpc_sim::Request::InjectFault(vpc_sim::Fault {
            api: Some("AssignPrivateIpAddresses".into()),
            kind,
            count: 1,
        }))
        .await
        .unwrap();
}

/// On such a node, a step for waiting ADDs that assigns the primary
/// interface's free slots (the Assign bucket's own call) and then creates
/// an interface for the rest takes the Create bucket's reserve for that
/// second grow, instead of waiting for its token (400 s) inside the call
/// while the ADDs time out. Under tokio's paused clock, with the
/// production pool, reconciler and call layer.
#[tokio::test(start_paused = true)]
async fn a_second_grow_of_a_step_adds_wait_for_takes_its_buckets_reserve() {
    let env = [("WARM_IP_TARGET", "1"), ("MINIMUM_IP_TARGET", "1")];
    let (p, ipam, stop, task) = idle_node_with_create_spent("m5.large", &env).await;
    // 15 pods: one takes the free address; for the 14 others the step
    // assigns the primary interface's 8 free slots and creates an
    // interface for the rest.
    add_all_within_their_wait(&ipam, 15).await;
    let created = p.api_figures()["CreateNetworkInterface"].calls;
    assert_eq!(created, 2, "the test's and the step's");
    stop.send(true).ok();
    task.await.ok();
}

/// On such a node under WARM_IP_TARGET=5: of six pods five take the free
/// addresses and one waits; the step's Assign of the primary interface's
/// four free slots serves it, and its Create is for the warm target
/// alone, ahead of demand: that Create does not take the Create bucket's
/// reserve (it waits for the bucket's token). Found in review.
#[tokio::test(start_paused = true)]
async fn a_grow_for_the_warm_target_in_a_step_adds_wait_for_takes_no_reserve() {
    let env = [("WARM_IP_TARGET", "5"), ("MINIMUM_IP_TARGET", "5")];
    let (p, ipam, stop, task) = idle_node_with_create_spent("m5.large", &env).await;
    add_all(&ipam, 6).await;
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    let figures = p.api_figures();
    assert_eq!(figures["AssignPrivateIpAddresses"].calls, 2, "start, step");
    assert_eq!(
        figures["CreateNetworkInterface"].calls, 1,
        "the test's only: the warm target's Create waits for its token"
    );
    stop.send(true).ok();
    task.await.ok();
}

/// On such a node with prefix delegation (a t3.small: three /28 slots an
/// interface), a step for two waiting ADDs plans a prefix on the primary
/// interface's last slot (for the ADDs) and an interface for the warm
/// target. The subnet has no /28 left for the Assign, which then gives
/// one single address: the Create serves the other ADD and takes the
/// Create bucket's reserve. Counted by what the planned prefix would
/// have added (16), the Create was the warm target's and waited for its
/// token (400 s) while the ADD timed out. Found in review.
#[tokio::test(start_paused = true)]
async fn a_prefix_sent_as_one_address_leaves_the_adds_next_grow_its_reserve() {
    let env = [
        ("ENABLE_PREFIX_DELEGATION", "true"),
        ("WARM_IP_TARGET", "20"),
        ("MINIMUM_IP_TARGET", "20"),
    ];
    let (p, ipam, stop, task) = idle_node_with_create_spent("t3.small", &env).await;
    // 32 free on the primary interface's first two /28s; 34 pods leave
    // two waiting, and the plan is the last slot's /28 and an interface.
    let counts = &ipam.summary()["counts"];
    assert_eq!(
        (counts["prefixes"].as_u64(), counts["total"].as_u64()),
        (Some(2), Some(32))
    );
    fault_next_assign(&p, vpc_sim::FaultKind::SubnetFreeAtMost { addresses: 1 }).await;
    add_all_within_their_wait(&ipam, 34).await;
    let figures = p.api_figures();
    let assign = &figures["AssignPrivateIpAddresses"];
    assert_eq!(
        (assign.calls, assign.errors),
        (3, 1),
        "start, the refused /28, the single address"
    );
    assert_eq!(
        figures["CreateNetworkInterface"].calls, 2,
        "the test's and the step's"
    );
    // 32 + the single address + the new interface's /28.
    assert_eq!(ipam.summary()["counts"]["total"].as_u64(), Some(49));
    stop.send(true).ok();
    task.await.ok();
}

/// On such a node under WARM_IP_TARGET=5, seven pods: five take the free
/// addresses and two wait; the step plans the primary interface's four
/// free slots (for the ADDs) and an interface (for the warm target). The
/// cloud gives one address of the four: the Create serves the other ADD
/// and takes the Create bucket's reserve. Found in review.
#[tokio::test(start_paused = true)]
async fn an_assign_partly_served_leaves_the_adds_create_its_reserve() {
    let env = [("WARM_IP_TARGET", "5"), ("MINIMUM_IP_TARGET", "5")];
    let (p, ipam, stop, task) = idle_node_with_create_spent("m5.large", &env).await;
    fault_next_assign(&p, vpc_sim::FaultKind::Partial { at_most: 1 }).await;
    add_all_within_their_wait(&ipam, 7).await;
    let figures = p.api_figures();
    assert_eq!(figures["AssignPrivateIpAddresses"].calls, 2, "start, step");
    assert_eq!(
        figures["CreateNetworkInterface"].calls, 2,
        "the test's and the step's"
    );
    stop.send(true).ok();
    task.await.ok();
}

/// A node `name` of `instance_type` on the simulated `vpc`, started with
/// `env` (in-memory journal, no node side) and its reconciler running:
/// the pool, the stop switch, the reconciler's task.
async fn sim_node(
    vpc: &Arc<vpc_sim::Vpc>,
    name: &str,
    instance_type: &str,
    env: &[(&str, &str)],
) -> (
    Arc<Ipam>,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    use vpc_sim::provider::Backend;
    let p = vpc_sim::SimProvider::join(Backend::Local(vpc.clone()), name, instance_type)
        .await
        .unwrap();
    node_on(Arc::new(p), env).await
}

/// The pool on `provider`, started with `env` (in-memory journal, no node
/// side), and its reconciler running: the pool, the stop switch, the
/// reconciler's task.
async fn node_on(
    provider: Arc<dyn CloudProvider>,
    env: &[(&str, &str)],
) -> (
    Arc<Ipam>,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let ipam = Ipam::start_with(
        provider,
        settings(env),
        JournalAt::Memory(MemStore::default()),
        NodeTracker::nothing(),
    )
    .await
    .unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(ipam.clone().run(rx));
    (ipam, stop, task)
}

/// Azure CNS's exhaustion mode, entered and left, on a VM of an Azure size
/// (no NIC can be attached) whose subnet fills: once the subnet cannot give
/// even one address, the batch drops to one and the pool releases down to
/// one or two free; once the subnet has room again and the 5 minutes are
/// over, the pool is back to whole batches. Under tokio's paused clock.
#[tokio::test(start_paused = true)]
async fn cns_exhaustion_mode_is_entered_on_a_full_subnet_and_left_after_it() {
    use std::time::Duration;
    use vpc_sim::{Reply, Request, Vpc, VpcConfig};

    let vpc = Arc::new(Vpc::with_config(VpcConfig {
        throttling: false,
        ..VpcConfig::default()
    }));
    // A /26 (59 usable addresses) alone in its zone; another interface
    // holds 43 of them, so the VM's primary leaves 15.
    vpc.handle(Request::CreateSubnet {
        id: "subnet-small".into(),
        cidr: "10.0.96.0/26".into(),
        zone: "sim-1z".into(),
        tags: Default::default(),
    })
    .await
    .unwrap();
    let blocker = match vpc
        .handle(Request::CreateInterface {
            subnet_id: "subnet-small".into(),
            security_groups: vec![],
            tags: Default::default(),
            ips: 42,
            prefixes: 0,
        })
        .await
        .unwrap()
    {
        Reply::Interface(i) => i.id,
        r => panic!("{r:?}"),
    };
    vpc.handle(Request::LaunchInstance {
        name: "vm-a".into(),
        instance_type: "Standard_D2s_v3".into(),
        subnet_id: Some("subnet-small".into()),
    })
    .await
    .unwrap();
    let (ipam, stop, task) = sim_node(
        &vpc,
        "vm-a",
        "Standard_D2s_v3",
        &[("IPAM_SCALER_BATCH_SIZE", "16")],
    )
    .await;
    let total = |ipam: &Ipam| ipam.summary()["counts"]["total"].as_u64().unwrap();
    for i in 0..12 {
        ipam.add(PodKey {
            network: "vpc-cni".into(),
            container_id: format!("p{i}"),
            ifname: "eth0".into(),
        })
        .await
        .expect("the subnet holds 15");
    }
    // The batch wants 16 × ceil(0.5 + 12/16) = 32; the subnet gives 15 and
    // then nothing: exhaustion mode, batches of one, 1-2 free kept.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let low = total(&ipam);
    assert!(
        (13..=14).contains(&low),
        "in exhaustion mode the pool keeps 1-2 free of 12 in use, not {low}: {}",
        ipam.summary()
    );
    // The other interface goes: the subnet has room again. Within the 5
    // minutes the pool stays in exhaustion mode; after them, whole batches.
    vpc.handle(Request::DeleteInterface {
        interface_id: blocker,
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(total(&ipam) <= 14, "left exhaustion mode early");
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(total(&ipam), 32, "{}", ipam.summary());
    stop.send(true).ok();
    task.await.ok();
}

/// A periodic resync whose Describe the cloud keeps throttling (the call
/// layer retries it until the resync's 5 s budget) gives way to an ADD that
/// comes to wait: the step grows for the ADD at once, and the resync is
/// made at the next step, not cut again. Under tokio's paused clock, so
/// the waits are the code's, not the machine's.
#[tokio::test(start_paused = true)]
async fn a_periodic_resync_gives_way_to_an_add_that_comes_to_wait() {
    use std::time::Duration;
    use tokio::time::Instant;
    use vpc_sim::{FaultKind, Vpc, VpcConfig};

    let vpc = Arc::new(Vpc::with_config(VpcConfig {
        attach_latency: Duration::from_millis(10),
        ..VpcConfig::default()
    }));
    let (ipam, stop, task) = sim_node(
        &vpc,
        "node-a",
        "m5.large",
        &[("WARM_IP_TARGET", "1"), ("IPAMD_ADD_WAIT_SECONDS", "20")],
    )
    .await;
    let describes_throttled = |ipam: &Ipam| {
        ipam.summary()["provider_api"]["DescribeNetworkInterfaces"]["throttles"]
            .as_u64()
            .unwrap_or(0)
    };
    while ipam.summary()["counts"]["available"].as_u64().unwrap() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    support::inproc::inject(
        &vpc,
        "DescribeNetworkInterfaces",
        FaultKind::Throttle,
        100_000,
    )
    .await;
    // The next periodic resync (within 72 s) starts: its first Describe
    // is throttled, and the call layer waits to retry it.
    let deadline = Instant::now() + Duration::from_secs(120);
    while describes_throttled(&ipam) == 0 {
        assert!(Instant::now() < deadline, "no resync: {}", ipam.summary());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Now "a" takes the warm address and "b" waits for a grow.
    ipam.add(key("a")).await.expect("from the pool");
    let started = Instant::now();
    ipam.add(key("b")).await.expect("served");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the ADD waited behind the resync's Describe (its budget is 5 s): {took:?}"
    );
    // The resync is not put off for good: the next step makes it.
    let after = describes_throttled(&ipam);
    let deadline = Instant::now() + Duration::from_secs(30);
    while describes_throttled(&ipam) == after {
        assert!(
            Instant::now() < deadline,
            "the resync was not made again: {}",
            ipam.summary()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(true).ok();
    task.await.ok();
}
