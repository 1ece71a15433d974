//! ipamd's pool on the Azure provider against the fake ARM and IMDS
//! (`vpc_sim::azure`), over HTTP on loopback: Azure CNS's batches, one PUT
//! per batch, shrinking through the cooldown (CNS's pending release), a 412
//! race, 429s with Retry-After, the 256 ip-configurations of a NIC, a full
//! subnet.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use ipamd::ipam::IpamError;
use providers::azure::{AzureProvider, AzureSettings, FederatedToken, Identity};
use providers::layer::CallLayer;
use providers::{AssignRequest, CloudProvider, ProviderError};
use support::inproc::{key, Node};
use vpc_sim::azure::{ArmConfig, ArmFake, ArmFault, ArmFaultKind};
use vpc_sim::{Reply, Request, Vpc, VpcConfig};

struct Azure {
    vpc: Arc<Vpc>,
    fake: Arc<ArmFake>,
    url: String,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Azure {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A VM `vm-a` of `size` in `subnet` (the node subnet when `None`), and
/// the fake serving it on loopback.
async fn azure(size: &str, subnet: Option<(&str, &str)>) -> Azure {
    let vpc = Arc::new(Vpc::with_config(VpcConfig {
        // ARM's buckets are the fake's; EC2's do not apply.
        throttling: false,
        ..VpcConfig::default()
    }));
    if let Some((id, cidr)) = subnet {
        vpc.handle(Request::CreateSubnet {
            id: id.into(),
            cidr: cidr.into(),
            zone: "sim-1a".into(),
            tags: Default::default(),
        })
        .await
        .unwrap();
    }
    let r = vpc
        .handle(Request::LaunchInstance {
            name: "vm-a".into(),
            instance_type: size.into(),
            subnet_id: subnet.map(|(id, _)| id.to_string()),
        })
        .await
        .unwrap();
    assert!(matches!(r, Reply::InstanceId(_)));
    let fake = ArmFake::new(
        vpc.clone(),
        ArmConfig {
            operation_delay: Duration::from_millis(150),
            default_vm: Some("vm-a".into()),
            ..ArmConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(vpc_sim::azure::serve(fake.clone(), listener));
    Azure {
        vpc,
        fake,
        url,
        server,
    }
}

fn settings(az: &Azure) -> AzureSettings {
    AzureSettings {
        arm_endpoint: az.url.clone(),
        imds_endpoint: az.url.clone(),
        identity: Identity::Workload {
            tenant_id: "00000000-0000-4000-8000-0000000000aa".into(),
            client_id: "00000000-0000-4000-8000-0000000000bb".into(),
            token: FederatedToken::Value("service-account-token".into()),
            authority_host: format!("{}/", az.url),
        },
        ..AzureSettings::default()
    }
}

async fn provider(az: &Azure) -> Arc<AzureProvider> {
    Arc::new(
        AzureProvider::connect(settings(az), CallLayer::arm())
            .await
            .unwrap(),
    )
}

/// The next `count` ARM requests of `method` (GET, PUT) meet `kind`.
fn inject(az: &Azure, method: &str, kind: ArmFaultKind, count: u32) {
    az.fake.inject(ArmFault {
        method: Some(method.into()),
        kind,
        count,
    });
}

/// The VM's primary NIC, as the provider names it.
async fn primary_nic(p: &AzureProvider) -> String {
    p.describe_interfaces().await.unwrap()[0].id.clone()
}

/// The VM's primary NIC's secondary addresses, as the cloud holds them.
fn secondaries(az: &Azure) -> usize {
    let st = az.vpc.snapshot();
    let i = st.instances.values().find(|i| i.name == "vm-a").unwrap();
    st.interfaces[&i.primary_interface_id].secondary_ips.len()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cns_batches_grow_with_one_put_each_and_shrink_through_the_cooldown() {
    let az = azure("Standard_D4s_v3", None).await;
    az.fake.set_primary_asgs("vm-a", &["/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/applicationSecurityGroups/pods"]);
    let dir = tempfile::tempdir().unwrap();
    let p = provider(&az).await;
    let caps = p.capabilities();
    assert!(!caps.hot_attach && !caps.prefixes);
    let node = Node::start_provider(
        p,
        &[
            ("IPAM_SCALER_BATCH_SIZE", "16"),
            ("IP_COOLDOWN_PERIOD", "2"),
            ("IPAMD_ADD_WAIT_SECONDS", "10"),
        ],
        &dir.path().join("j"),
    )
    .await;
    // Nothing in use: CNS's target is 16 × ceil(0.5 + 0/16) = 16, in one PUT.
    until("16 addresses", || secondaries(&az) == 16).await;
    assert_eq!(az.fake.counts().writes, 1, "{:?}", az.fake.counts());
    // The new ip-configurations carry the primary's application security
    // groups.
    let nic = az
        .vpc
        .snapshot()
        .instances
        .values()
        .next()
        .unwrap()
        .primary_interface_id
        .clone();
    let asgs = az.fake.asgs_of(&nic);
    assert_eq!(asgs.len(), 17, "{asgs:?}");
    assert!(
        asgs.values()
            .all(|a| a[0]["id"].as_str().unwrap().ends_with("/pods")),
        "{asgs:?}"
    );

    // 9 in use: free 7 < 16 × 50% → target 16 × ceil(0.5 + 9/16) = 32, one more PUT.
    let mut pods = vec![];
    for i in 0..9 {
        pods.push(node.ipam.add(key(&format!("p{i}"))).await.unwrap());
    }
    until("32 addresses", || secondaries(&az) == 32).await;
    assert_eq!(az.fake.counts().writes, 2, "one PUT per batch");
    let put_at = Instant::now();

    // All gone: free 32 ≥ 16 × 150% → release to 16, but only once the
    // addresses have cooled (CNS's pending release): they stay on the NIC
    // meanwhile.
    for i in 0..9 {
        node.ipam.del(key(&format!("p{i}"))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(secondaries(&az), 32, "released while still cooling");
    until("back to 16", || secondaries(&az) == 16).await;
    assert!(put_at.elapsed() >= Duration::from_secs(2));
    assert_eq!(az.fake.counts().writes, 3, "one PUT for the release");
    az.vpc.snapshot().check_invariants().unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_412_race_and_429_bursts_are_ridden_out() {
    let az = azure("Standard_D2s_v3", None).await;
    let p = provider(&az).await;
    let nic = primary_nic(&p).await;
    // Another writer changes the NIC between our GET and PUT, twice.
    inject(&az, "PUT", ArmFaultKind::EtagRace, 2);
    let got = p.assign(&nic, AssignRequest::Ips(4)).await.unwrap();
    assert_eq!(got.ips.len(), 4);
    let c = az.fake.counts();
    assert_eq!((c.precondition_failed, c.writes), (2, 1), "{c:?}");

    // Three 429s asking for 1 s each: waited out, then served.
    inject(
        &az,
        "GET",
        ArmFaultKind::Throttle {
            retry_after_secs: 1,
        },
        3,
    );
    let t = Instant::now();
    let got = p.assign(&nic, AssignRequest::Ips(2)).await.unwrap();
    assert_eq!(got.ips.len(), 2);
    assert!(
        t.elapsed() >= Duration::from_secs(3),
        "Retry-After not honoured: {:?}",
        t.elapsed()
    );
    let stats = p.api_figures();
    assert_eq!(stats["NetworkInterfaces_Get"].throttles, 3, "{stats:?}");
    assert_eq!(secondaries(&az), 6);

    // A release that took effect is not applied twice after a 412.
    inject(&az, "PUT", ArmFaultKind::EtagRace, 1);
    p.release(&nic, &got).await.unwrap();
    assert_eq!(secondaries(&az), 4);
    az.vpc.snapshot().check_invariants().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nic_never_passes_256_ip_configurations() {
    let az = azure("Standard_D2s_v3", None).await;
    let p = provider(&az).await;
    let nic = primary_nic(&p).await;
    // 256 asked: the 255 that fit (the primary is the 256th), in one PUT.
    let before = az.fake.counts().writes;
    let got = p.assign(&nic, AssignRequest::Ips(256)).await.unwrap();
    assert_eq!(got.ips.len(), 255);
    assert_eq!(az.fake.counts().writes, before + 1);
    // Not one more, refused before any PUT.
    match p.assign(&nic, AssignRequest::Ips(1)).await {
        Err(ProviderError::LimitExceeded(m)) => assert!(m.contains("256"), "{m}"),
        r => panic!("expected the NIC's limit, got {r:?}"),
    }
    assert_eq!(
        az.fake.counts().writes,
        before + 1,
        "refused before any PUT"
    );
    // The fake refuses a PUT past the limit as ARM does.
    assert_eq!(secondaries(&az), 255);
    let info = p.describe_instance().await.unwrap();
    assert_eq!(
        (info.limits.max_interfaces, info.limits.ipv4_per_interface),
        (1, 256),
        "a VM's limit is the NICs it has"
    );
    assert!(matches!(
        p.create_interface(&providers::CreateInterface {
            subnet_id: info.subnet_id.clone(),
            security_groups: vec![],
            tags: Default::default(),
            initial: AssignRequest::Ips(1),
        })
        .await,
        Err(ProviderError::Unsupported(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subnet_drops_the_batch_to_one_and_says_why() {
    // A /27: 27 usable addresses, the primary's included: 26 for pods.
    let az = azure("Standard_D2s_v3", Some(("subnet-small", "10.0.48.0/27"))).await;
    let dir = tempfile::tempdir().unwrap();
    let p = provider(&az).await;
    let node = Node::start_provider(
        p,
        &[
            ("IPAM_SCALER_BATCH_SIZE", "16"),
            ("IPAMD_ADD_WAIT_SECONDS", "3"),
        ],
        &dir.path().join("j"),
    )
    .await;
    until("16 addresses", || secondaries(&az) == 16).await;
    let mut served = 0;
    let err = loop {
        match node.ipam.add(key(&format!("p{served}"))).await {
            Ok(_) => served += 1,
            Err(e) => break e,
        }
        assert!(served <= 26, "more pods than the subnet holds");
    };
    // The 32-address batch did not fit; batches of one took the rest.
    assert_eq!(served, 26, "every address the subnet has was served");
    match &err {
        IpamError::Exhausted { reason, .. } => {
            assert!(
                reason.contains("subnet"),
                "reason does not say why: {reason}"
            )
        }
        e => panic!("expected exhaustion, got {e:?}"),
    }
    let summary = node.ipam.summary();
    let kinds = &summary["status"]["errors_by_site"];
    assert!(!kinds.as_object().unwrap().is_empty(), "{summary}");
    assert_eq!(secondaries(&az), 26);
    az.vpc.snapshot().check_invariants().unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_arm_answers_401_and_ipamd_says_permission_denied() {
    let az = azure("Standard_D2s_v3", None).await;
    let mut s = settings(&az);
    // A workload identity whose token endpoint is elsewhere: no token.
    s.identity = Identity::Workload {
        tenant_id: "t".into(),
        client_id: "c".into(),
        token: FederatedToken::Value(String::new()),
        authority_host: format!("{}/", az.url),
    };
    match AzureProvider::connect(s, CallLayer::arm()).await {
        Err(ProviderError::Denied(m)) => assert!(m.contains("token"), "{m}"),
        r => panic!("expected permission denied, got {:?}", r.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_whose_answer_is_lost_after_it_applied_is_not_applied_twice() {
    let az = azure("Standard_D2s_v3", None).await;
    let p = provider(&az).await;
    let nic = primary_nic(&p).await;
    inject(&az, "PUT", ArmFaultKind::ApplyThenServerError, 1);
    // The PUT applies, its answer is a 500; the repeat (same etag) gets a
    // 412; the NIC read again already holds the named configurations.
    let got = p.assign(&nic, AssignRequest::Ips(3)).await.unwrap();
    assert_eq!(got.ips.len(), 3, "{got:?}");
    let c = az.fake.counts();
    assert_eq!((c.writes, c.precondition_failed), (1, 1), "{c:?}");
    assert_eq!(secondaries(&az), 3);
    // The same for a release.
    inject(&az, "PUT", ArmFaultKind::ApplyThenServerError, 1);
    p.release(&nic, &got).await.unwrap();
    assert_eq!(secondaries(&az), 0);
    assert_eq!(az.fake.counts().writes, 2);
    az.vpc.snapshot().check_invariants().unwrap();
}

/// A release ARM accepted whose operation cannot be followed (every status
/// poll throttled) is in doubt, not undone: the provider answers a
/// timeout, which the reconciler treats as "the addresses may be gone",
/// not a throttle, which it treats as "not made" and hands them out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_arm_accepted_but_could_not_be_followed_is_in_doubt() {
    let az = azure("Standard_D2s_v3", None).await;
    let quick = providers::layer::RetryPolicy {
        max_attempts: 3,
        max_throttled: 3,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(50),
    };
    let p = Arc::new(
        AzureProvider::connect(settings(&az), CallLayer::arm().with_policy(quick))
            .await
            .unwrap(),
    );
    let nic = primary_nic(&p).await;
    let got = p.assign(&nic, AssignRequest::Ips(3)).await.unwrap();
    inject(
        &az,
        "POLL",
        ArmFaultKind::Throttle {
            retry_after_secs: 0,
        },
        1_000,
    );
    let r = p.release(&nic, &got).await;
    assert!(
        matches!(r, Err(ProviderError::Timeout { .. })),
        "a change ARM made must not read as throttled (not made): {r:?}"
    );
    assert_eq!(secondaries(&az), 0, "ARM did make it");
    assert!(az.fake.counts().throttled >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_configurations_ipamd_did_not_add_are_never_used_or_removed() {
    let az = azure("Standard_D2s_v3", None).await;
    // An operator's ip-configuration (a VIP, say), made outside ipamd.
    let st = az.vpc.snapshot();
    let nic = st
        .instances
        .values()
        .next()
        .unwrap()
        .primary_interface_id
        .clone();
    let theirs = match az
        .vpc
        .handle(Request::Assign {
            interface_id: nic.clone(),
            ips: 1,
            prefixes: 0,
        })
        .await
        .unwrap()
    {
        Reply::Assigned(a) => a.ips[0],
        r => panic!("{r:?}"),
    };
    let p = provider(&az).await;
    let seen = p.describe_interfaces().await.unwrap();
    assert!(!seen[0].secondary_ips.contains(&theirs), "{seen:?}");
    // It takes one of the NIC's 256 slots: the pool plans with 255.
    let limits = p.describe_instance().await.unwrap().limits;
    assert_eq!(limits.ipv4_per_interface, 255);
    assert_eq!(p.current_limits(), Some(limits));
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_provider(
        p.clone(),
        &[("WARM_IP_TARGET", "2"), ("IP_COOLDOWN_PERIOD", "1")],
        &dir.path().join("j"),
    )
    .await;
    for i in 0..4 {
        let w = node.ipam.add(key(&format!("p{i}"))).await.unwrap();
        assert_ne!(w.ip, theirs, "an operator's address was handed to a pod");
    }
    for i in 0..4 {
        node.ipam.del(key(&format!("p{i}"))).await.unwrap();
    }
    // The pool shrinks back to its warm target; the operator's address stays.
    until("the pool shrank", || secondaries(&az) <= 3).await;
    let st = az.vpc.snapshot();
    assert!(st.interfaces[&nic].secondary_ips.contains(&theirs));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subnet_is_named_by_its_id_and_an_unreachable_token_endpoint_is_transient() {
    let az = azure("Standard_D2s_v3", Some(("subnet-small", "10.0.48.0/27"))).await;
    let p = provider(&az).await;
    let nic = &p.describe_interfaces().await.unwrap()[0];
    match p.assign(&nic.id, AssignRequest::Ips(30)).await {
        // The id the interface reports, which the pool keys full subnets by.
        Err(ProviderError::SubnetExhausted { subnet }) => assert_eq!(subnet, nic.subnet_id),
        r => panic!("expected a full subnet, got {r:?}"),
    }
    // A token endpoint that does not answer: transient (retried at start),
    // not a permission error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut s = settings(&az);
    s.identity = Identity::Workload {
        tenant_id: "t".into(),
        client_id: "c".into(),
        token: FederatedToken::Value("sa".into()),
        authority_host: format!("http://127.0.0.1:{port}/"),
    };
    let layer = CallLayer::new(
        providers::layer::RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        },
        None,
    );
    match AzureProvider::connect(s, layer).await {
        Err(e) => assert!(e.is_transient(), "{e:?}"),
        Ok(_) => panic!("connected without a token"),
    }
}
