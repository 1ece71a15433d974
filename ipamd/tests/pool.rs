//! The pool against the in-process simulated VPC: waiting for a grow,
//! failing with a reason at a limit or on a full subnet, surviving throttling,
//! restarts and a crash between detach and delete.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use ipamd::config::Settings;
use ipamd::ipam::{Ipam, IpamError};
use support::inproc::{key, tiny_subnet_node, vpc, warm, Node};
use tokio::sync::watch;
use vpc_sim::provider::Backend;
use vpc_sim::{Fault, FaultKind, Request, SimProvider};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_on_an_empty_pool_waits_for_the_grow_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(600);
    // t3.small: 3 addresses per interface. The primary fills at once; the
    // fourth pod needs a new interface, which takes 600 ms to attach.
    let node = Node::start(
        &vpc,
        "t3.small",
        &[("IPAMD_ADD_WAIT_SECONDS", "5")],
        &dir.path().join("j"),
    )
    .await;
    warm(&node.ipam, 3).await;
    let mut ips = vec![];
    for c in ["a", "b", "c"] {
        ips.push(node.ipam.add(key(c)).await.unwrap().ip);
    }
    // The reconciler already started the grow after the first add; the
    // interface cannot be there yet.
    let t = Instant::now();
    let w = node
        .ipam
        .add(key("d"))
        .await
        .expect("add waits for the new interface, then succeeds");
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "add did not wait: {:?}",
        t.elapsed()
    );
    assert_eq!(w.device_index, 1, "address comes from the new interface");
    assert_eq!(w.route_table, 2);
    assert!(!ips.contains(&w.ip));
    vpc.snapshot().check_invariants().unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_fails_with_a_reason_when_the_instance_is_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    let node = Node::start(
        &vpc,
        "t3.small",
        &[("IPAMD_ADD_WAIT_SECONDS", "1")],
        &dir.path().join("j"),
    )
    .await;
    for i in 0..9 {
        node.ipam.add(key(&format!("p{i}"))).await.unwrap();
    }
    let t = Instant::now();
    let err = node.ipam.add(key("one-too-many")).await.unwrap_err();
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "gave up before the bound"
    );
    match &err {
        IpamError::Exhausted { reason, .. } => {
            assert!(
                reason.contains("limit"),
                "reason does not say why: {reason}"
            );
            assert!(reason.contains("3 interfaces"), "{reason}");
        }
        e => panic!("unexpected error {e}"),
    }
    assert_eq!(
        vpc.snapshot().interfaces.len(),
        3,
        "no interface beyond the type's limit"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_fails_with_a_reason_when_the_subnet_is_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    // A /28 alone in its zone: 11 usable addresses.
    tiny_subnet_node(&vpc).await;
    let node = Node::start(
        &vpc,
        "m5.large",
        &[("IPAMD_ADD_WAIT_SECONDS", "1")],
        &dir.path().join("j"),
    )
    .await;
    // Primary: 1 + 9 secondaries; a second interface would need 10 more.
    for i in 0..9 {
        node.ipam.add(key(&format!("p{i}"))).await.unwrap();
    }
    let err = node.ipam.add(key("p9")).await.unwrap_err().to_string();
    assert!(err.contains("subnet-tiny has no free addresses"), "{err}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_backed_off_and_the_pool_still_grows() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    vpc.handle(Request::InjectFault(Fault {
        api: Some("AssignPrivateIpAddresses".into()),
        kind: FaultKind::Throttle,
        count: 3,
    }))
    .await
    .unwrap();
    let node = Node::start(
        &vpc,
        "m5.large",
        &[("IPAMD_ADD_WAIT_SECONDS", "8")],
        &dir.path().join("j"),
    )
    .await;
    let w = node
        .ipam
        .add(key("a"))
        .await
        .expect("succeeds once the throttling passes");
    assert_eq!(w.device_index, 0);
    let (calls, throttled) = vpc.call_counts();
    assert_eq!(throttled["AssignPrivateIpAddresses"], 3);
    assert!(calls["AssignPrivateIpAddresses"] >= 4);
    // The simulator's throttling went through the shared retry layer, the
    // one that runs against EC2: retried there, not by the reconciler, and
    // counted in /v1/pool.
    let api = &node.ipam.summary()["provider_api"]["AssignPrivateIpAddresses"];
    assert_eq!(api["throttles"], 3, "{api}");
    assert_eq!(api["retries"], 3, "{api}");
    assert_eq!(api["calls"], calls["AssignPrivateIpAddresses"], "{api}");
    assert_eq!(
        node.ipam.summary()["status"]["consecutive_errors"],
        0,
        "the reconciler never saw the throttling"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_assignments_without_reassigning() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j");
    let vpc = vpc(10);
    // Single addresses: no interface is attached just before or after the
    // restart, so the cloud's interface list must stay as it was.
    let env = [("WARM_IP_TARGET", "2")];
    let node = Node::start(&vpc, "m5.large", &env, &journal).await;
    let a = node.ipam.add(key("a")).await.unwrap();
    let b = node.ipam.add(key("b")).await.unwrap();
    assert_eq!(node.ipam.add(key("a")).await.unwrap(), a, "repeated ADD");
    node.ipam
        .del(key("b"))
        .await
        .unwrap()
        .expect("b was assigned");
    assert!(
        node.ipam.del(key("b")).await.unwrap().is_none(),
        "DEL is idempotent"
    );
    warm(&node.ipam, 2).await;
    node.stop().await;
    let before = vpc.snapshot();

    let node = Node::start(&vpc, "m5.large", &env, &journal).await;
    assert_eq!(
        node.ipam.add(key("a")).await.unwrap().ip,
        a.ip,
        "a keeps its address across restarts"
    );
    // b's address is cooling (30 s), so a new pod must not get it.
    let c = node.ipam.add(key("c")).await.unwrap();
    assert_ne!(c.ip, b.ip, "cooldown survives the restart");
    assert_ne!(c.ip, a.ip);
    // Nothing was reassigned or re-created in the cloud by the restart.
    let after = vpc.snapshot();
    assert_eq!(
        before.interfaces.keys().collect::<Vec<_>>(),
        after.interfaces.keys().collect::<Vec<_>>()
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_shrinks_to_warm_ip_target_and_drops_idle_interfaces() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    let env = [("WARM_IP_TARGET", "2"), ("IP_COOLDOWN_PERIOD", "0")];
    let node = Node::start(&vpc, "t3.small", &env, &dir.path().join("j")).await;
    for i in 0..7 {
        node.ipam.add(key(&format!("p{i}"))).await.unwrap();
    }
    warm(&node.ipam, 2).await;
    assert_eq!(vpc.snapshot().interfaces.len(), 3);
    for i in 0..7 {
        node.ipam.del(key(&format!("p{i}"))).await.unwrap();
    }
    // Addresses go at once; idle interfaces only once older than 60 s, so
    // here the pool is back to two addresses on the interfaces it has.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = node.ipam.summary();
        if s["counts"]["total"].as_u64() == Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "pool did not shrink: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secondaries: usize = vpc
        .snapshot()
        .interfaces
        .values()
        .map(|i| i.secondary_ips.len())
        .sum();
    assert_eq!(secondaries, 2, "the cloud holds only what the pool keeps");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_detach_and_delete_leaks_no_interface() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j");
    let vpc = vpc(10);
    let provider = SimProvider::join(Backend::Local(vpc.clone()), "node-a", "m5.large")
        .await
        .unwrap();
    // An interface of ours, attached, with a pending-delete intent in the
    // journal: what a crash after the intent was written leaves behind.
    let iface = providers::CloudProvider::create_interface(
        &provider,
        &providers::CreateInterface {
            subnet_id: "subnet-0sim00000000pods".into(),
            security_groups: vec![],
            tags: Default::default(),
            initial: providers::AssignRequest::Ips(2),
        },
    )
    .await
    .unwrap();
    providers::CloudProvider::detach_interface(&provider, &iface.id)
        .await
        .unwrap();
    std::fs::write(
        &journal,
        format!("{{\"op\":\"header\",\"version\":1}}\n{{\"op\":\"pending_delete\",\"interface_id\":\"{}\"}}\n", iface.id),
    )
    .unwrap();
    let node = Node::start(&vpc, "m5.large", &[], &journal).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while vpc.snapshot().interfaces.contains_key(&iface.id) {
        assert!(
            Instant::now() < deadline,
            "pending delete was not finished after restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vpc.snapshot().check_invariants().unwrap();
    node.stop().await;
    let replayed = ipamd::journal::replay(&journal).unwrap();
    assert!(replayed.pending_deletes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_delegation_hands_out_addresses_from_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    let env = [
        ("ENABLE_PREFIX_DELEGATION", "true"),
        ("WARM_PREFIX_TARGET", "1"),
    ];
    let node = Node::start(&vpc, "m5.large", &env, &dir.path().join("j")).await;
    let w = node.ipam.add(key("a")).await.unwrap();
    let iface = &vpc.snapshot().interfaces[&w.interface_id];
    assert!(
        iface.prefixes.iter().any(|p| p.contains(&w.ip)),
        "{} not in {:?}",
        w.ip,
        iface.prefixes
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_node_grows_its_existing_nic_and_never_attaches() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    let env = [("WARM_IP_TARGET", "5"), ("IPAMD_ADD_WAIT_SECONDS", "2")];
    let node = Node::start(&vpc, "Standard_D2s_v3", &env, &dir.path().join("j")).await;
    for i in 0..20 {
        node.ipam.add(key(&format!("p{i}"))).await.unwrap();
    }
    warm(&node.ipam, 5).await;
    let (calls, _) = vpc.call_counts();
    assert_eq!(
        calls.get("CreateNetworkInterface"),
        None,
        "no NIC creation on Azure"
    );
    assert_eq!(vpc.snapshot().interfaces.len(), 1);
    node.stop().await;
}

/// The simulated VPC with EC2's answers that it does not model: "no free
/// addresses" for creates in the `full` subnet (as EC2 does when its free
/// count was stale), and interfaces reported without DeleteOnTermination
/// (`half_made`) until it is set.
#[derive(Default)]
struct FullSubnet {
    inner: Option<SimProvider>,
    full: String,
    tried: std::sync::Mutex<Vec<String>>,
    half_made: std::sync::Mutex<Vec<String>>,
    ensured: std::sync::Mutex<Vec<String>>,
}

impl FullSubnet {
    fn sim(&self) -> &SimProvider {
        self.inner.as_ref().expect("inner provider")
    }
}

#[async_trait::async_trait]
impl providers::CloudProvider for FullSubnet {
    fn name(&self) -> &'static str {
        "sim"
    }
    fn capabilities(&self) -> providers::Capabilities {
        self.sim().capabilities()
    }
    async fn describe_instance(&self) -> providers::Result<providers::Instance> {
        self.sim().describe_instance().await
    }
    async fn describe_interfaces(&self) -> providers::Result<Vec<providers::Interface>> {
        let mut v = self.sim().describe_interfaces().await?;
        let half = self.half_made.lock().unwrap();
        for i in v.iter_mut().filter(|i| i.device_index > 0) {
            i.delete_on_termination = Some(!half.contains(&i.id));
        }
        Ok(v)
    }
    async fn ensure_delete_on_termination(&self, id: &str) -> providers::Result<()> {
        self.ensured.lock().unwrap().push(id.to_string());
        self.half_made.lock().unwrap().retain(|h| h != id);
        Ok(())
    }
    async fn assign(
        &self,
        id: &str,
        r: providers::AssignRequest,
    ) -> providers::Result<providers::Assigned> {
        self.sim().assign(id, r).await
    }
    async fn release(&self, id: &str, r: &providers::Assigned) -> providers::Result<()> {
        self.sim().release(id, r).await
    }
    async fn create_interface(
        &self,
        spec: &providers::CreateInterface,
    ) -> providers::Result<providers::Interface> {
        self.tried.lock().unwrap().push(spec.subnet_id.clone());
        if spec.subnet_id == self.full {
            return Err(providers::ProviderError::SubnetExhausted {
                subnet: self.full.clone(),
            });
        }
        self.sim().create_interface(spec).await
    }
    async fn detach_interface(&self, id: &str) -> providers::Result<()> {
        self.sim().detach_interface(id).await
    }
    async fn delete_interface(&self, id: &str) -> providers::Result<()> {
        self.sim().delete_interface(id).await
    }
    async fn list_subnets(&self) -> providers::Result<Vec<providers::Subnet>> {
        self.sim().list_subnets().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subnet_moves_interface_creation_to_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    // The pods subnet (tagged, most free) says it is full; the node's
    // subnet is next in line.
    let inner = SimProvider::join(Backend::Local(vpc.clone()), "node-a", "t3.small")
        .await
        .unwrap();
    let provider = Arc::new(FullSubnet {
        inner: Some(inner),
        full: "subnet-0sim00000000pods".into(),
        ..Default::default()
    });
    let m: HashMap<&str, &str> = [("IPAMD_ADD_WAIT_SECONDS", "5")].into_iter().collect();
    let ipam = Ipam::start(
        provider.clone(),
        Settings::from_source(&m).unwrap(),
        &dir.path().join("j"),
    )
    .await
    .unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(ipam.clone().run(rx));
    // Three addresses on the primary; the fourth pod needs a new interface.
    for i in 0..4 {
        ipam.add(key(&format!("p{i}")))
            .await
            .expect("a subnet with room is found");
    }
    let tried = provider.tried.lock().unwrap().clone();
    assert_eq!(
        tried.first().map(String::as_str),
        Some("subnet-0sim00000000pods"),
        "{tried:?}"
    );
    assert!(
        tried.iter().any(|s| s == "subnet-0sim00000000node"),
        "{tried:?}"
    );
    let snap = vpc.snapshot();
    let secondary: Vec<_> = snap
        .interfaces
        .values()
        .filter(|e| e.attachment.as_ref().is_some_and(|a| a.device_index > 0))
        .collect();
    assert!(
        !secondary.is_empty()
            && secondary
                .iter()
                .all(|e| e.subnet_id == "subnet-0sim00000000node"),
        "{secondary:?}"
    );
    stop.send(true).ok();
    task.await.ok();
}

/// An interface of ours that a crash (or a failed rollback) left attached
/// without DeleteOnTermination gets the flag when ipamd starts, and at a
/// resync for one found later; one that already has it is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_made_interface_is_completed_at_start_and_resync() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j");
    let vpc = vpc(10);
    // A first ipamd attaches a secondary interface (t3.small: 3 per interface).
    let node = Node::start(&vpc, "t3.small", &[], &journal).await;
    warm(&node.ipam, 3).await;
    for i in 0..4 {
        node.ipam.add(key(&format!("p{i}"))).await.unwrap();
    }
    let eth1 = node.ipam.lookup(&key("p3")).unwrap().interface_id;
    node.stop().await;

    let inner = SimProvider::join(Backend::Local(vpc.clone()), "node-a", "t3.small")
        .await
        .unwrap();
    let provider = Arc::new(FullSubnet {
        inner: Some(inner),
        half_made: std::sync::Mutex::new(vec![eth1.clone()]),
        ..Default::default()
    });
    let ipam = Ipam::start(provider.clone(), Settings::default(), &journal)
        .await
        .unwrap();
    assert_eq!(*provider.ensured.lock().unwrap(), vec![eth1.clone()]);
    // Found half made again later (e.g. a rollback that could not detach).
    provider.half_made.lock().unwrap().push(eth1.clone());
    ipam.resync().await.unwrap();
    ipam.resync().await.unwrap();
    assert_eq!(
        *provider.ensured.lock().unwrap(),
        vec![eth1.clone(), eth1.clone()],
        "completed once at start and once at the resync that found it"
    );
}

/// At its cap with every address assigned or cooling down, an ADD waits
/// for the next address to leave its cooldown when that falls within its
/// wait, and otherwise says when it will.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_at_the_cap_waits_for_a_cooldown_or_says_when_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    let env = [
        ("MAX_PODS", "2"),
        ("IP_COOLDOWN_PERIOD", "2"),
        ("IPAMD_ADD_WAIT_SECONDS", "5"),
    ];
    let node = Node::start(&vpc, "m5.large", &env, &dir.path().join("j")).await;
    let a = node.ipam.add(key("a")).await.unwrap();
    node.ipam.add(key("b")).await.unwrap();
    node.ipam.del(key("a")).await.unwrap();
    let started = Instant::now();
    let c = node
        .ipam
        .add(key("c"))
        .await
        .expect("served once a's cooldown ends");
    assert_eq!(
        c.ip, a.ip,
        "the cooled address, not a new one past max pods"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    node.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("MAX_PODS", "2"),
        ("IP_COOLDOWN_PERIOD", "30"),
        ("IPAMD_ADD_WAIT_SECONDS", "1"),
    ];
    let node = Node::start(
        &support::inproc::vpc(10),
        "m5.large",
        &env,
        &dir.path().join("j"),
    )
    .await;
    node.ipam.add(key("a")).await.unwrap();
    node.ipam.add(key("b")).await.unwrap();
    node.ipam.del(key("a")).await.unwrap();
    let err = node.ipam.add(key("c")).await.unwrap_err().to_string();
    assert!(err.contains("max pods (2)"), "{err}");
    assert!(err.contains("1 cooling down"), "{err}");
    assert!(err.contains("the next is free in"), "{err}");
    node.stop().await;
}

/// A journal (damaged, or imported from aws-node) that gives a pod an
/// interface's own address: the assignment is dropped at start, never
/// held, so no DEL could take that address's rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_of_an_interfaces_own_address_is_dropped_at_start() {
    use ipamd::journal::{Journal, Record};
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    vpc.handle(Request::LaunchInstance {
        name: "node-a".into(),
        instance_type: "m5.large".into(),
        subnet_id: None,
    })
    .await
    .unwrap();
    let state = vpc.snapshot();
    let primary_ip = state.interfaces[&state
        .instances
        .values()
        .next()
        .unwrap()
        .primary_interface_id]
        .primary_ip;
    let journal = dir.path().join("j");
    let records = vec![
        Record::Header { version: 1 },
        Record::Assign {
            key: key("impostor"),
            ip: primary_ip,
            netns: None,
            netns_id: None,
            pod: None,
        },
    ];
    drop(Journal::open(&journal, records).unwrap());
    let node = Node::start(&vpc, "m5.large", &[], &journal).await;
    assert!(node.ipam.lookup(&key("impostor")).is_none());
    let s = node.ipam.summary();
    assert_eq!(s["unconfirmed_assignments"], 0, "{s}");
    assert_eq!(s["counts"]["assigned"], 0, "{s}");
    node.stop().await;
}

/// The node's subnet runs out while its interface still has free slots:
/// the pool grows on a new interface in a subnet tagged for the CNI
/// instead of asking the full one again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_subnet_moves_growth_to_a_new_interface_in_a_tagged_subnet() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    for (id, cidr, tags) in [
        ("subnet-small", "10.0.64.0/27", vec![]),
        (
            "subnet-cni-c",
            "10.0.65.0/28",
            vec![("kubernetes.io/role/cni", "1")],
        ),
    ] {
        vpc.handle(Request::CreateSubnet {
            id: id.into(),
            cidr: cidr.into(),
            zone: "sim-1c".into(),
            tags: tags
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .await
        .unwrap();
    }
    vpc.handle(Request::LaunchInstance {
        name: "node-a".into(),
        instance_type: "m5.24xlarge".into(),
        subnet_id: Some("subnet-small".into()),
    })
    .await
    .unwrap();
    let node = Node::start(
        &vpc,
        "m5.24xlarge",
        &[("WARM_IP_TARGET", "2"), ("IPAMD_ADD_WAIT_SECONDS", "8")],
        &dir.path().join("j"),
    )
    .await;
    // The /27 gives 26 addresses besides the node's own; the 27th pod and
    // later ones get theirs from the tagged /28.
    let cni: ipnet::Ipv4Net = "10.0.65.0/28".parse().unwrap();
    let mut in_cni = 0;
    for i in 0..30 {
        let w = node.ipam.add(key(&format!("p{i}"))).await.unwrap();
        if cni.contains(&w.ip) {
            in_cni += 1;
        }
    }
    assert!(in_cni >= 4, "only {in_cni} pods in the tagged subnet");
    assert_eq!(node.ipam.summary()["counts"]["interfaces"], 2);
    node.stop().await;
}
