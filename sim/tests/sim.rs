//! The simulated VPC says no where EC2 says no.

use std::sync::Arc;
use std::time::Duration;

use providers::layer::{CallLayer, RetryPolicy};
use providers::{AssignRequest, CloudProvider, CreateInterface, ProviderError};
use vpc_sim::provider::Backend;
use vpc_sim::{Fault, FaultKind, Request, SimProvider, Vpc, VpcConfig};

fn quiet() -> Arc<Vpc> {
    Arc::new(Vpc::with_config(VpcConfig {
        attach_latency: Duration::ZERO,
        throttling: false,
        ..VpcConfig::default()
    }))
}

/// A node that sees the simulated cloud's answers as they are: one attempt
/// per call and no client-side bucket (ipamd's layer, which retries and
/// waits for tokens, has tests of its own).
async fn node(vpc: &Arc<Vpc>, name: &str, ty: &str) -> SimProvider {
    let raw = CallLayer::new(
        RetryPolicy {
            max_attempts: 1,
            max_throttled: 1,
            ..Default::default()
        },
        None,
    );
    SimProvider::join_with(Backend::Local(vpc.clone()), name, ty, raw)
        .await
        .unwrap()
}

/// What ipamd runs: the shared layer retries the simulated cloud's
/// throttling, and its 5xx where repeating the call is safe; it counts them.
#[tokio::test(start_paused = true)]
async fn the_shared_layer_retries_the_simulated_clouds_faults() {
    let vpc = quiet();
    let n = SimProvider::join(Backend::Local(vpc.clone()), "a", "m5.large")
        .await
        .unwrap();
    let primary = n.describe_instance().await.unwrap().primary_interface_id;
    let inject = |api: &str, kind| {
        vpc.handle(Request::InjectFault(Fault {
            api: Some(api.into()),
            kind,
            count: 1,
        }))
    };
    inject("AssignPrivateIpAddresses", FaultKind::Throttle)
        .await
        .unwrap();
    inject("AssignPrivateIpAddresses", FaultKind::ServerError)
        .await
        .unwrap();
    // Throttled: retried. Then a 5xx: an Assign may have happened, so it
    // is not repeated.
    let err = n.assign(&primary, AssignRequest::Ips(1)).await.unwrap_err();
    assert!(matches!(err, ProviderError::Server(_)), "{err}");
    let s = &n.api_stats()["AssignPrivateIpAddresses"];
    assert_eq!(s["calls"], 2, "{s}");
    assert_eq!(s["retries"], 1, "{s}");
    assert_eq!(s["throttles"], 1, "{s}");
    assert_eq!(s["errors"], 1, "{s}");
    // A read is safe to repeat: its 5xx is retried.
    inject("DescribeNetworkInterfaces", FaultKind::ServerError)
        .await
        .unwrap();
    assert!(!n.describe_interfaces().await.unwrap().is_empty());
    let s = &n.api_stats()["DescribeNetworkInterfaces"];
    assert_eq!(s["retries"], 1, "{s}");
}

fn spec(initial: AssignRequest) -> CreateInterface {
    CreateInterface {
        subnet_id: "subnet-0sim00000000pods".into(),
        security_groups: vec!["sg-1".into()],
        tags: [("vpc-cni.io/owner".to_string(), "vpc-cni".to_string())].into(),
        initial,
    }
}

#[tokio::test]
async fn interface_limit_of_the_instance_type_is_enforced() {
    let vpc = quiet();
    let n = node(&vpc, "a", "t3.small").await; // 3 interfaces
    let mut indexes = vec![];
    for _ in 0..2 {
        indexes.push(
            n.create_interface(&spec(AssignRequest::Ips(1)))
                .await
                .unwrap()
                .device_index,
        );
    }
    assert_eq!(indexes, vec![1, 2], "lowest free device index each time");
    let err = n
        .create_interface(&spec(AssignRequest::Ips(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::LimitExceeded(m) if m.contains("3 of 3")),
        "{err}"
    );
    // The interface created before the failed attach was deleted again.
    assert_eq!(vpc.snapshot().interfaces.len(), 3);
    vpc.snapshot().check_invariants().unwrap();
}

#[tokio::test]
async fn address_limit_per_interface_is_enforced() {
    let vpc = quiet();
    let n = node(&vpc, "a", "m5.large").await; // 10 per interface, primary included
    let primary = n.describe_instance().await.unwrap().primary_interface_id;
    n.assign(&primary, AssignRequest::Ips(9)).await.unwrap();
    let err = n.assign(&primary, AssignRequest::Ips(1)).await.unwrap_err();
    assert!(matches!(err, ProviderError::LimitExceeded(_)), "{err}");
    // Prefixes take the same slots.
    let eni = n
        .create_interface(&spec(AssignRequest::Prefixes(9)))
        .await
        .unwrap();
    assert_eq!(eni.prefixes.len(), 9);
    assert!(n.assign(&eni.id, AssignRequest::Prefixes(1)).await.is_err());
}

#[tokio::test]
async fn prefixes_need_a_nitro_type() {
    let vpc = quiet();
    let n = node(&vpc, "a", "m4.large").await; // xen
    let primary = n.describe_instance().await.unwrap().primary_interface_id;
    let err = n
        .assign(&primary, AssignRequest::Prefixes(1))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Unsupported(_)), "{err}");
}

#[tokio::test]
async fn a_full_subnet_says_so_and_nothing_is_half_done() {
    let vpc = quiet();
    vpc.handle(Request::CreateSubnet {
        id: "subnet-small".into(),
        cidr: "10.0.80.0/28".into(),
        zone: "sim-1a".into(),
        tags: Default::default(),
    })
    .await
    .unwrap();
    let n = node(&vpc, "a", "m5.large").await;
    let mut s = spec(AssignRequest::Ips(9));
    s.subnet_id = "subnet-small".into();
    let eni = n.create_interface(&s).await.unwrap(); // 1 + 9 of 11
    assert_eq!(eni.secondary_ips.len(), 9);
    let err = n.create_interface(&s).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::SubnetExhausted { subnet } if subnet == "subnet-small"),
        "{err}"
    );
    let snap = vpc.snapshot();
    assert_eq!(
        snap.subnets["subnet-small"].used.len(),
        10,
        "failed create took no address"
    );
    snap.check_invariants().unwrap();
    // A fragmented subnet has addresses but no free /28.
    let mut p = spec(AssignRequest::Prefixes(1));
    p.subnet_id = "subnet-small".into();
    assert!(n.create_interface(&p).await.is_err());
}

#[tokio::test]
async fn fragmented_subnet_answers_insufficient_cidr_blocks() {
    let vpc = quiet();
    // A /26: four /28 blocks; the first and last hold reserved addresses.
    vpc.handle(Request::CreateSubnet {
        id: "subnet-frag".into(),
        cidr: "10.0.96.0/26".into(),
        zone: "sim-1a".into(),
        tags: Default::default(),
    })
    .await
    .unwrap();
    let n = node(&vpc, "a", "m5.24xlarge").await;
    let mut s = spec(AssignRequest::Ips(49));
    s.subnet_id = "subnet-frag".into();
    let eni = n.create_interface(&s).await.unwrap();
    // Keep one address in each of the two middle blocks, free the rest.
    let pinned: Vec<std::net::Ipv4Addr> =
        vec!["10.0.96.16".parse().unwrap(), "10.0.96.32".parse().unwrap()];
    let release: Vec<_> = eni
        .secondary_ips
        .iter()
        .copied()
        .filter(|ip| !pinned.contains(ip))
        .collect();
    assert_eq!(release.len(), 47);
    n.release(
        &eni.id,
        &providers::Assigned {
            ips: release,
            prefixes: vec![],
        },
    )
    .await
    .unwrap();
    assert!(vpc.snapshot().subnets["subnet-frag"].free_count() >= 16);
    let err = n
        .assign(&eni.id, AssignRequest::Prefixes(1))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ProviderError::InsufficientCidrBlocks {
            subnet: "subnet-frag".into()
        }
    );
    // Single addresses still work.
    assert_eq!(
        n.assign(&eni.id, AssignRequest::Ips(3))
            .await
            .unwrap()
            .ips
            .len(),
        3
    );
}

#[tokio::test]
async fn an_address_is_never_on_two_interfaces() {
    let vpc = quiet();
    let a = node(&vpc, "a", "m5.xlarge").await;
    let b = node(&vpc, "b", "m5.xlarge").await;
    for n in [&a, &b] {
        for _ in 0..3 {
            let e = n
                .create_interface(&spec(AssignRequest::Ips(5)))
                .await
                .unwrap();
            n.assign(&e.id, AssignRequest::Ips(3)).await.unwrap();
            let got = n.describe_interfaces().await.unwrap();
            let victim = got.iter().find(|i| i.id == e.id).unwrap();
            n.release(
                &e.id,
                &providers::Assigned {
                    ips: victim.secondary_ips[..2].to_vec(),
                    prefixes: vec![],
                },
            )
            .await
            .unwrap();
        }
    }
    vpc.snapshot().check_invariants().unwrap();
    // Releasing an address the interface does not hold is refused, as EC2 does.
    let ia = a.describe_interfaces().await.unwrap();
    let ib = b.describe_interfaces().await.unwrap();
    let foreign = ib[1].secondary_ips[0];
    let err = a
        .release(
            &ia[1].id,
            &providers::Assigned {
                ips: vec![foreign],
                prefixes: vec![],
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Invalid(_)));
    // The primary interface cannot be detached.
    assert!(a.detach_interface(&ia[0].id).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn token_buckets_are_shared_by_every_node_of_the_account() {
    let vpc = Arc::new(Vpc::with_config(VpcConfig {
        attach_latency: Duration::ZERO,
        ..VpcConfig::default()
    }));
    let a = node(&vpc, "a", "m5.24xlarge").await;
    let b = node(&vpc, "b", "m5.24xlarge").await;
    let pa = a.describe_instance().await.unwrap().primary_interface_id;
    let pb = b.describe_instance().await.unwrap().primary_interface_id;
    let mut ok = 0;
    let mut throttled = 0;
    for i in 0..150 {
        let (n, p) = if i % 2 == 0 { (&a, &pa) } else { (&b, &pb) };
        match n.assign(p, AssignRequest::Ips(0)).await {
            Ok(_) => ok += 1,
            Err(ProviderError::Throttled { api, .. }) => {
                assert_eq!(api, "AssignPrivateIpAddresses");
                throttled += 1
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        (ok, throttled),
        (100, 50),
        "one burst of 100 for the whole account"
    );
    // Ten seconds refill 50 tokens at 5/s, deterministically under the paused clock.
    tokio::time::advance(Duration::from_secs(10)).await;
    let mut ok = 0;
    for _ in 0..80 {
        if a.assign(&pa, AssignRequest::Ips(0)).await.is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 50);
}

#[tokio::test(start_paused = true)]
async fn injected_faults() {
    let vpc = quiet();
    let n = node(&vpc, "a", "m5.large").await;
    let primary = n.describe_instance().await.unwrap().primary_interface_id;
    let inject = |api: &str, kind| {
        vpc.handle(Request::InjectFault(Fault {
            api: Some(api.into()),
            kind,
            count: 1,
        }))
    };
    inject("AssignPrivateIpAddresses", FaultKind::ServerError)
        .await
        .unwrap();
    assert!(matches!(
        n.assign(&primary, AssignRequest::Ips(1)).await,
        Err(ProviderError::Server(_))
    ));
    inject(
        "AssignPrivateIpAddresses",
        FaultKind::Partial { at_most: 2 },
    )
    .await
    .unwrap();
    assert_eq!(
        n.assign(&primary, AssignRequest::Ips(5))
            .await
            .unwrap()
            .ips
            .len(),
        2
    );
    // A timeout whose operation took effect: the client sees an error but
    // the cloud has the addresses, as after a lost response.
    inject(
        "AssignPrivateIpAddresses",
        FaultKind::Timeout { applied: true },
    )
    .await
    .unwrap();
    let before = n.describe_interfaces().await.unwrap()[0]
        .secondary_ips
        .len();
    assert!(matches!(
        n.assign(&primary, AssignRequest::Ips(3)).await,
        Err(ProviderError::Timeout { .. })
    ));
    assert_eq!(
        n.describe_interfaces().await.unwrap()[0]
            .secondary_ips
            .len(),
        before + 3
    );
    inject(
        "AssignPrivateIpAddresses",
        FaultKind::Timeout { applied: false },
    )
    .await
    .unwrap();
    assert!(n.assign(&primary, AssignRequest::Ips(3)).await.is_err());
    assert_eq!(
        n.describe_interfaces().await.unwrap()[0]
            .secondary_ips
            .len(),
        before + 3
    );
}

#[tokio::test]
async fn limits_table_covers_every_ec2_type_and_some_azure_sizes() {
    let n = providers::limits::known_types().count();
    assert!(n > 800, "{n} types");
    let t = providers::limits::lookup("m5.large").unwrap().limits;
    assert_eq!(
        (t.max_interfaces, t.ipv4_per_interface, t.prefix_delegation),
        (3, 10, true)
    );
    let az = providers::limits::lookup("Standard_D8s_v3").unwrap();
    assert_eq!(az.family, providers::limits::Family::Azure);
    assert_eq!(az.limits.ipv4_per_interface, 256);
}

/// The server binary: state survives a restart of the simulator.
#[tokio::test]
async fn vpc_sim_server_keeps_its_state_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sim.sock");
    let state = dir.path().join("vpc.json");
    let start = || {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_vpc-sim"));
        c.args([
            "serve",
            "--listen",
            &format!("unix:{}", sock.display()),
            "--state",
        ])
        .arg(&state)
        .args(["--attach-latency-ms", "0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
        c.spawn().unwrap()
    };
    async fn ready(child: &mut tokio::process::Child) {
        use tokio::io::AsyncBufReadExt;
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(out)
            .read_line(&mut line)
            .await
            .unwrap();
        assert!(line.starts_with("vpc-sim listening on"), "{line}");
    }
    let mut server = start();
    ready(&mut server).await;
    let client = || {
        Backend::Remote(Arc::new(vpc_sim::SimClient::new(
            format!("unix:{}", sock.display()).parse().unwrap(),
        )))
    };
    let n = SimProvider::join(client(), "node-a", "m5.large")
        .await
        .unwrap();
    let eni = n
        .create_interface(&spec(AssignRequest::Ips(4)))
        .await
        .unwrap();
    server.kill().await.unwrap();
    server.wait().await.unwrap();

    let mut server = start();
    ready(&mut server).await;
    let again = SimProvider::join(client(), "node-a", "m5.large")
        .await
        .unwrap();
    assert_eq!(
        again.instance_id(),
        n.instance_id(),
        "the node finds itself again"
    );
    let ifaces = again.describe_interfaces().await.unwrap();
    let found = ifaces
        .iter()
        .find(|i| i.id == eni.id)
        .expect("interface survived the restart");
    assert_eq!(found.secondary_ips, eni.secondary_ips);
    assert_eq!(found.device_index, 1);
    // Malformed requests get an error, not a dropped connection.
    let raw = vpc_sim::SimClient::new(format!("unix:{}", sock.display()).parse().unwrap());
    let err = raw
        .call(&Request::DescribeInstance {
            instance_id: "i-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ProviderError::NotFound("instance i-nope".into()),
        "the simulator's own answer, not a broken connection"
    );
    server.kill().await.ok();
}

#[tokio::test]
async fn azure_sizes_cannot_hot_attach() {
    let vpc = quiet();
    let n = node(&vpc, "az", "Standard_D4s_v3").await;
    assert!(!n.capabilities().hot_attach);
    let err = n
        .create_interface(&spec(AssignRequest::Ips(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::Unsupported(m) if m.contains("deallocated")),
        "{err}"
    );
    assert_eq!(
        vpc.snapshot().interfaces.len(),
        1,
        "the refused NIC was not left behind"
    );
    // Growth happens by adding ip-configurations to the existing NIC.
    let primary = n.describe_instance().await.unwrap().primary_interface_id;
    assert_eq!(
        n.assign(&primary, AssignRequest::Ips(200))
            .await
            .unwrap()
            .ips
            .len(),
        200
    );
}

/// A node learns its instance from the metadata service, as on EC2: no
/// DescribeInstances call, so nothing throttled however many nodes ask,
/// while the EC2 call itself is still billed and throttled.
#[tokio::test(start_paused = true)]
async fn the_instance_comes_from_metadata_not_from_a_throttled_describe() {
    let vpc = Arc::new(Vpc::with_config(VpcConfig {
        attach_latency: Duration::ZERO,
        throttling: true,
        ..VpcConfig::default()
    }));
    let n = node(&vpc, "meta", "m5.large").await;
    for _ in 0..300 {
        assert_eq!(
            n.describe_instance().await.unwrap().instance_type,
            "m5.large"
        );
    }
    let (calls, _) = vpc.call_counts();
    assert!(!calls.contains_key("DescribeInstances"), "{calls:?}");
    // 300 DescribeInstances at once: past the account's burst of 100.
    let mut throttled = 0;
    for _ in 0..300 {
        let r = vpc
            .handle(Request::DescribeInstance {
                instance_id: n.instance_id().to_string(),
            })
            .await;
        throttled += usize::from(matches!(r, Err(ProviderError::Throttled { .. })));
    }
    assert!(throttled >= 150, "{throttled} throttled");
}

/// A call to a served simulator dropped before its reply (a caller's
/// timeout, a resync giving way to an ADD) does not leave that reply for
/// the next call: each later call gets its own answer.
#[tokio::test]
async fn a_call_dropped_half_way_leaves_no_reply_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let addr: vpc_sim::client::SimAddr = format!("unix:{}", dir.path().join("sim.sock").display())
        .parse()
        .unwrap();
    let vpc = Arc::new(Vpc::with_config(VpcConfig {
        timeout_after: Duration::from_millis(300),
        ..VpcConfig::default()
    }));
    let listener = vpc_sim::server::Listener::bind(&addr).await.unwrap();
    let server = tokio::spawn(vpc_sim::server::serve(vpc.clone(), listener));
    let client = vpc_sim::SimClient::new(addr);
    let zone = || Request::DescribeSubnets { zone: None };
    assert!(matches!(
        client.call(&zone()).await,
        Ok(vpc_sim::Reply::Subnets(_))
    ));
    vpc.handle(Request::InjectFault(Fault {
        api: Some("DescribeNetworkInterfaces".into()),
        kind: FaultKind::Timeout { applied: false },
        count: 1,
    }))
    .await
    .unwrap();
    // The Describe hangs 300 ms on the server; its caller gives up first.
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        client.call(&Request::DescribeInterfaces {
            instance_id: "i-any".into(),
        }),
    )
    .await;
    assert!(dropped.is_err(), "the call should still be waiting");
    // Its late answer comes meanwhile.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..3 {
        let r = client.call(&zone()).await;
        assert!(
            matches!(r, Ok(vpc_sim::Reply::Subnets(_))),
            "another call's reply: {r:?}"
        );
    }
    server.abort();
}
