//! Faults met against a real cloud, replayed on the simulated VPC with
//! fault injection: a DEL during a waiting ADD, interfaces ipamd does not
//! own, one stale Describe answer, a journal write that fails, a subnet
//! with fewer free addresses than asked for, a throttled release while an
//! ADD waits.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ipamd::ipam::IpamError;
use providers::tags::{NO_MANAGE, OWNER, OWNER_VALUE};
use support::cloud_addresses;
use support::inproc::{inject, key, vpc, warm, Node};
use vpc_sim::{Fault, FaultKind, Reply, Request, Vpc};

/// t3.small (3 addresses per interface) with the primary full and the next
/// interface 3 s away: the next ADD has to wait.
async fn node_with_a_full_primary(dir: &std::path::Path) -> (Node, std::sync::Arc<Vpc>) {
    let vpc = vpc(3000);
    let node = Node::start(
        &vpc,
        "t3.small",
        &[("WARM_IP_TARGET", "1"), ("IP_COOLDOWN_PERIOD", "0")],
        &dir.join("ipamd.journal"),
    )
    .await;
    warm(&node.ipam, 1).await;
    for i in 0..3 {
        node.ipam.add(key(&format!("p{i}"))).await.unwrap();
    }
    (node, vpc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_del_during_a_waiting_add_cancels_it_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _vpc) = node_with_a_full_primary(dir.path()).await;
    let ipam = node.ipam.clone();
    let add = tokio::spawn(async move { ipam.add(key("late")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!add.is_finished(), "the ADD should still be waiting");
    let found = node.ipam.del(key("late")).await.unwrap();
    assert!(found.is_none(), "nothing was assigned yet");
    let r = tokio::time::timeout(Duration::from_secs(2), add)
        .await
        .expect("a cancelled ADD answers at once")
        .unwrap();
    assert!(matches!(r, Err(IpamError::Cancelled)), "{r:?}");
    // Once the interface is there, nothing holds an address for "late".
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(node.ipam.lookup(&key("late")), None);
    let s = node.ipam.summary();
    assert_eq!(s["waiting"], 0, "{s}");
    assert_eq!(s["counts"]["assigned"], 3, "{s}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_whose_caller_went_away_does_not_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _vpc) = node_with_a_full_primary(dir.path()).await;
    let ipam = node.ipam.clone();
    // As tonic does when the client resets the call: the future is dropped.
    let add = tokio::spawn(async move { ipam.add(key("gone")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    add.abort();
    assert!(add.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(node.ipam.lookup(&key("gone")), None);
    let s = node.ipam.summary();
    assert_eq!(
        s["waiting"], 0,
        "a dropped ADD still counts as waiting: {s}"
    );
    assert_eq!(s["counts"]["assigned"], 3, "{s}");
    // The pool still serves.
    node.ipam.add(key("next")).await.unwrap();
    node.stop().await;
}

async fn call(vpc: &Vpc, r: Request) -> Reply {
    vpc.handle(r).await.unwrap()
}

/// Creates an interface in the node's subnet with `ips` secondary
/// addresses and `tags`, and attaches it to `node` at `device_index`.
async fn attach_foreign(
    vpc: &Vpc,
    node: &str,
    device_index: u32,
    ips: u32,
    tags: &[(&str, &str)],
) -> String {
    let Reply::InstanceId(instance_id) = call(
        vpc,
        Request::LaunchInstance {
            name: node.into(),
            instance_type: "m5.large".into(),
            subnet_id: None,
        },
    )
    .await
    else {
        panic!("no instance")
    };
    let subnet_id = vpc.snapshot().instances[&instance_id].subnet_id.clone();
    let Reply::Interface(iface) = call(
        vpc,
        Request::CreateInterface {
            subnet_id,
            security_groups: vec![],
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ips,
            prefixes: 0,
        },
    )
    .await
    else {
        panic!("no interface")
    };
    call(
        vpc,
        Request::AttachInterface {
            interface_id: iface.id.clone(),
            instance_id,
            device_index: Some(device_index),
        },
    )
    .await;
    iface.id
}

/// An interface ipamd does not own (another tool's: no owner tag; or tagged
/// `no_manage`) at device index 1: ipamd hands out none of its addresses,
/// releases none and never detaches or deletes it, while it keeps its pool
/// with its own interfaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interfaces_ipamd_does_not_own_are_left_alone() {
    for tags in [
        vec![(NO_MANAGE, "true")],
        vec![],
        vec![(OWNER, OWNER_VALUE), (NO_MANAGE, "true")],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let vpc = vpc(10);
        let foreign = attach_foreign(&vpc, "node-a", 1, 2, &tags).await;
        let foreign_ips = vpc.snapshot().interfaces[&foreign].secondary_ips.clone();
        assert_eq!(foreign_ips.len(), 2);
        let node = Node::start(
            &vpc,
            "m5.large",
            &[("WARM_IP_TARGET", "1"), ("IP_COOLDOWN_PERIOD", "0")],
            &dir.path().join("ipamd.journal"),
        )
        .await;
        warm(&node.ipam, 1).await;
        let mut got = vec![];
        for i in 0..12 {
            got.push(node.ipam.add(key(&format!("p{i}"))).await.unwrap());
        }
        for w in &got {
            assert_ne!(w.interface_id, foreign, "{tags:?}: a pod got {}", w.ip);
            assert!(!foreign_ips.contains(&w.ip), "{tags:?}: {}", w.ip);
        }
        for i in 0..12 {
            node.ipam.del(key(&format!("p{i}"))).await.unwrap();
        }
        // Long enough for the pool to shrink and idle interfaces to go.
        for _ in 0..40 {
            node.ipam.step().await.ok();
            node.ipam.resync().await.unwrap();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let snap = vpc.snapshot();
        let f = &snap.interfaces[&foreign];
        assert!(
            f.attachment.as_ref().is_some_and(|a| a.device_index == 1),
            "{tags:?}: the foreign interface was detached"
        );
        assert_eq!(
            f.secondary_ips, foreign_ips,
            "{tags:?}: its addresses changed"
        );
        let s = node.ipam.summary();
        assert_eq!(s["foreign_interfaces"][0], foreign.as_str(), "{s}");
        // m5.large: 3 interfaces; the foreign one takes a slot, so ipamd
        // attached at most one of its own besides the primary.
        let ours = snap
            .interfaces
            .values()
            .filter(|i| i.attachment.is_some() && i.id != foreign)
            .count();
        assert!(ours <= 2, "{tags:?}: {ours} interfaces of ipamd's attached");
        node.stop().await;
    }
}

/// t3.small, WARM_IP_TARGET=1: four pods, the fourth on the secondary
/// interface ipamd created; stop; the next Describe omits that interface
/// once; start: the fourth pod keeps its address, and once the interface is
/// seen again that address goes to nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stale_answer_at_restart_reissues_no_address() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("ipamd.journal");
    let vpc = vpc(10);
    let env = [("WARM_IP_TARGET", "1"), ("IP_COOLDOWN_PERIOD", "0")];
    let node = Node::start(&vpc, "t3.small", &env, &journal).await;
    warm(&node.ipam, 1).await;
    let mut pods = vec![];
    for i in 0..4 {
        pods.push(node.ipam.add(key(&format!("p{i}"))).await.unwrap());
    }
    let fourth = pods[3].clone();
    assert_eq!(fourth.device_index, 1, "the fourth pod should be on eth1");
    node.stop().await;

    call(
        &vpc,
        Request::InjectFault(Fault {
            api: Some("DescribeNetworkInterfaces".into()),
            kind: FaultKind::OmitDeviceIndex { device_index: 1 },
            count: 1,
        }),
    )
    .await;
    let node = Node::start(&vpc, "t3.small", &env, &journal).await;
    let s = node.ipam.summary();
    assert_eq!(s["status"]["unconfirmed_assignments"], 1, "{s}");
    // The journal (compacted at start) still holds the fourth pod.
    let replayed = ipamd::journal::replay(&journal).unwrap();
    assert_eq!(replayed.assignments.get(&key("p3")), Some(&fourth.ip));

    // The interface is seen again: the assignment is confirmed, and new
    // pods get other addresses.
    node.ipam.resync().await.unwrap();
    assert_eq!(node.ipam.lookup(&key("p3")).map(|w| w.ip), Some(fourth.ip));
    for i in 4..8 {
        let w = node.ipam.add(key(&format!("p{i}"))).await.unwrap();
        assert_ne!(
            w.ip, fourth.ip,
            "the fourth pod's address was given to p{i}"
        );
    }
    // The same on a running ipamd: one answer lacking the interface.
    call(
        &vpc,
        Request::InjectFault(Fault {
            api: Some("DescribeNetworkInterfaces".into()),
            kind: FaultKind::OmitDeviceIndex { device_index: 1 },
            count: 1,
        }),
    )
    .await;
    node.ipam.resync().await.unwrap();
    node.ipam.resync().await.unwrap();
    assert_eq!(node.ipam.lookup(&key("p3")).map(|w| w.ip), Some(fourth.ip));
    node.stop().await;
}

/// A journal write fails (a full disk: ENOSPC after half the record): that
/// ADD fails and ipamd says it is not healthy; once writes succeed again,
/// ADD and DEL work, health returns, and the journal replays to exactly
/// what was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_calls_until_writes_succeed_again() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("ipamd.journal");
    let vpc = vpc(10);
    let node = Node::start(&vpc, "m5.large", &[], &journal).await;
    warm(&node.ipam, 3).await;
    let a = node.ipam.add(key("a")).await.unwrap();
    assert!(node.ipam.health().is_ok());

    // Every write fails until the disk has room again (the reconciler
    // tries too, in the background).
    node.ipam.fail_next_journal_writes(u32::MAX);
    let e = node.ipam.add(key("b")).await.unwrap_err();
    assert!(matches!(e, IpamError::Journal(_)), "{e:?}");
    assert!(
        node.ipam.health().is_err(),
        "healthy while refusing every call"
    );
    assert_eq!(
        node.ipam.lookup(&key("b")),
        None,
        "a failed ADD kept its address"
    );
    // Still failing: the next write is refused too.
    assert!(node.ipam.add(key("c")).await.is_err());
    assert!(node.ipam.health().is_err());

    // The disk has room again.
    node.ipam.fail_next_journal_writes(0);
    let d = node.ipam.add(key("d")).await.unwrap();
    assert!(node.ipam.health().is_ok(), "{:?}", node.ipam.health());
    assert!(node.ipam.del(key("a")).await.unwrap().is_some());
    let replayed = ipamd::journal::replay(&journal).unwrap();
    let held: Vec<_> = replayed.assignments.iter().collect();
    assert_eq!(held, vec![(&key("d"), &d.ip)], "{replayed:?}");
    assert_ne!(a.ip, d.ip);
    node.stop().await;
}

/// With nothing to do, the reconciler finds the disk writable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_ipamd_recovers_its_journal_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    let node = Node::start(&vpc, "m5.large", &[], &dir.path().join("j")).await;
    warm(&node.ipam, 1).await;
    node.ipam.fail_next_journal_writes(u32::MAX);
    assert!(node.ipam.add(key("x")).await.is_err());
    node.ipam.step().await.unwrap();
    assert!(node.ipam.health().is_err());
    node.ipam.fail_next_journal_writes(0);
    node.ipam.step().await.unwrap();
    assert!(node.ipam.health().is_ok(), "{:?}", node.ipam.health());
    node.stop().await;
}

/// The subnet gives no more than one address per call (EC2 answers
/// InsufficientFreeAddressesInSubnet to larger requests): ipamd asks for
/// fewer, and the pending pods get the addresses that exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_subnet_still_serves_pods() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    call(
        &vpc,
        Request::InjectFault(Fault {
            api: None,
            kind: FaultKind::SubnetFreeAtMost { addresses: 1 },
            count: 10_000,
        }),
    )
    .await;
    // aws-node's default (WARM_ENI_TARGET=1) asks for whole interfaces.
    let node = Node::start(&vpc, "t3.small", &[], &dir.path().join("j")).await;
    for i in 0..4 {
        let w = node.ipam.add(key(&format!("p{i}"))).await;
        assert!(w.is_ok(), "p{i}: {w:?}\n{}", node.ipam.summary());
    }
    node.stop().await;
}

/// Takes `ip` off `interface_id` behind ipamd's back, as another actor (or
/// a lost answer) would.
async fn unassign_behind(vpc: &Vpc, interface_id: &str, ip: std::net::Ipv4Addr) {
    call(
        vpc,
        Request::Unassign {
            interface_id: interface_id.into(),
            release: providers::Assigned {
                ips: vec![ip],
                prefixes: vec![],
            },
        },
    )
    .await;
}

/// An address held unconfirmed that the cloud gives back through an Assign
/// (not a resync) goes back to its holder, never to a new pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_address_given_back_by_a_grow_goes_to_its_holder() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    let env = [("WARM_IP_TARGET", "1"), ("IP_COOLDOWN_PERIOD", "0")];
    let node = Node::start(&vpc, "t3.small", &env, &dir.path().join("j")).await;
    warm(&node.ipam, 1).await;
    node.ipam.add(key("p0")).await.unwrap();
    let held = node.ipam.add(key("p1")).await.unwrap();
    unassign_behind(&vpc, &held.interface_id, held.ip).await;
    node.ipam.resync().await.unwrap();
    assert_eq!(node.ipam.summary()["unconfirmed_assignments"], 1);
    for i in 0..6 {
        let w = node.ipam.add(key(&format!("n{i}"))).await.unwrap();
        assert_ne!(w.ip, held.ip, "n{i} got p1's unconfirmed address");
    }
    // Whichever way it came back, it is p1's again, or still held for it.
    let s = node.ipam.summary();
    let confirmed = node.ipam.lookup(&key("p1")).map(|w| w.ip) == Some(held.ip);
    assert!(confirmed || s["unconfirmed_assignments"] == 1, "{s}");
    node.stop().await;
}

/// CNI GC releases an unconfirmed assignment the runtime says is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_releases_a_stale_unconfirmed_assignment() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j");
    let vpc = vpc(10);
    let node = Node::start(&vpc, "m5.large", &[], &journal).await;
    warm(&node.ipam, 2).await;
    node.ipam.add(key("p0")).await.unwrap();
    let gone = node.ipam.add(key("p1")).await.unwrap();
    unassign_behind(&vpc, &gone.interface_id, gone.ip).await;
    node.ipam.resync().await.unwrap();
    assert_eq!(node.ipam.summary()["unconfirmed_assignments"], 1);
    let valid = [("p0".to_string(), "eth0".to_string())]
        .into_iter()
        .collect();
    node.ipam.gc("vpc-cni", &valid).await.unwrap();
    assert_eq!(node.ipam.summary()["unconfirmed_assignments"], 0);
    let replayed = ipamd::journal::replay(&journal).unwrap();
    assert!(
        !replayed.assignments.contains_key(&key("p1")),
        "{replayed:?}"
    );
    assert!(replayed.assignments.contains_key(&key("p0")));
    node.stop().await;
}

/// The real ipamd, asked over ADD's fast path by a caller that gives up
/// (a runtime's timeout kills the plugin) while the ADD waits for an
/// interface to attach: the ADD is abandoned and keeps no address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_path_add_whose_caller_left_keeps_no_address() {
    let dir = tempfile::tempdir().unwrap();
    let sim = support::SimServer::start(
        dir.path(),
        vpc_sim::VpcConfig {
            attach_latency: Duration::from_millis(3000),
            ..Default::default()
        },
    )
    .await;
    let d = support::Daemon::start(&support::DaemonSpec {
        dir: dir.path(),
        sim: &sim.addr,
        node: "node-a",
        instance_type: "t3.small",
        env: &[("WARM_IP_TARGET", "1"), ("IP_COOLDOWN_PERIOD", "0")],
        introspection: support::free_port(),
    })
    .await;
    let request = support::add_request;
    // Fill the primary interface (3 addresses); the next waits for eth1.
    for i in 0..3 {
        let sent = ipamd_api::fast::send(&d.socket, &request(&format!("p{i}"))).unwrap();
        tokio::task::spawn_blocking(move || sent.answer())
            .await
            .unwrap()
            .unwrap();
    }
    let sent = ipamd_api::fast::send(&d.socket, &request("gone")).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(sent); // the plugin is killed: its end of the socket closes
    tokio::time::sleep(Duration::from_secs(4)).await;
    let held: Vec<String> = d.assignments().await.into_iter().map(|(c, _)| c).collect();
    assert!(!held.contains(&"gone".to_string()), "{held:?}");
    assert_eq!(held.len(), 3, "{held:?}");
}

/// An Unassign that times out after the cloud took the addresses back: the
/// answer is ambiguous, so the addresses are neither repeated to the cloud
/// (the shared layer does not repeat an Unassign) nor handed out again
/// before a resync says whether they still exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_release_hands_out_no_address_the_cloud_took_back() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = Arc::new(Vpc::with_config(vpc_sim::VpcConfig {
        attach_latency: Duration::from_millis(10),
        timeout_after: Duration::from_millis(50),
        ..vpc_sim::VpcConfig::default()
    }));
    let env = [("WARM_IP_TARGET", "1"), ("IP_COOLDOWN_PERIOD", "0")];
    let node = Node::start(&vpc, "m5.large", &env, &dir.path().join("j")).await;
    for i in 0..4 {
        node.ipam.add(key(&format!("p{i}"))).await.unwrap();
    }
    warm(&node.ipam, 1).await;
    vpc.handle(Request::InjectFault(Fault {
        api: Some("UnassignPrivateIpAddresses".into()),
        kind: FaultKind::Timeout { applied: true },
        count: 1,
    }))
    .await
    .unwrap();
    for i in 0..4 {
        node.ipam.del(key(&format!("p{i}"))).await.unwrap();
    }
    // The pool shrinks; its Unassign times out having taken effect, and
    // the reconciler reports the timeout.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = node.ipam.summary();
        if s["status"]["last_error_kind"] == "timeout" {
            break;
        }
        assert!(Instant::now() < deadline, "no release timed out: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let summary = node.ipam.summary();
    assert_eq!(
        summary["provider_api"]["UnassignPrivateIpAddresses"]["retries"], 0,
        "an ambiguous Unassign was repeated: {summary}"
    );
    // Every address the pool would hand out is one the cloud still has.
    let cloud = cloud_addresses(&vpc, "node-a");
    for i in node.ipam.interfaces().as_array().unwrap() {
        for a in i["addresses"].as_array().unwrap() {
            let ip: std::net::Ipv4Addr = a["ip"].as_str().unwrap().parse().unwrap();
            if a["state"] == "free" {
                assert!(
                    cloud.contains(&ip),
                    "{ip} is free in the pool but the cloud took it back"
                );
            }
        }
    }
    node.stop().await;
}

/// An Assign that times out having taken effect leaves addresses on the
/// interface the pool does not know. The reconciler resyncs at the next
/// step and learns them, instead of asking for them again (the cloud
/// answering "limit reached") until the periodic resync a minute later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assign_that_timed_out_is_learned_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = Arc::new(Vpc::with_config(vpc_sim::VpcConfig {
        attach_latency: Duration::from_millis(10),
        timeout_after: Duration::from_millis(50),
        ..vpc_sim::VpcConfig::default()
    }));
    inject(
        &vpc,
        "AssignPrivateIpAddresses",
        FaultKind::Timeout { applied: true },
        1,
    )
    .await;
    // m5.large: the primary interface takes 9 addresses, all of them wanted.
    let env = [("WARM_IP_TARGET", "9")];
    let started = Instant::now();
    let node = Node::start(&vpc, "m5.large", &env, &dir.path().join("j")).await;
    warm(&node.ipam, 9).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the pool waited for the periodic resync ({:?})",
        started.elapsed()
    );
    let s = node.ipam.summary();
    assert_eq!(s["counts"]["interfaces"], 1, "{s}");
    // The addresses the timed-out call assigned are the pool's: none was
    // asked for twice, none is missing.
    let pool: Vec<String> = node.ipam.interfaces().as_array().unwrap()[0]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pool.len(), 9);
    assert_eq!(cloud_addresses(&vpc, "node-a").len(), 9, "asked for twice");
    node.stop().await;
}

/// A resync whose Describe the cloud keeps throttling gives up after its
/// budget instead of holding the step (the call layer alone would retry it
/// for minutes), so an ADD waiting for the pool is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_resync_does_not_hold_a_waiting_add() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = Arc::new(Vpc::with_config(vpc_sim::VpcConfig {
        attach_latency: Duration::from_millis(10),
        timeout_after: Duration::from_millis(50),
        ..vpc_sim::VpcConfig::default()
    }));
    let env = [("WARM_IP_TARGET", "1"), ("IPAMD_ADD_WAIT_SECONDS", "20")];
    let node = Node::start(&vpc, "m5.large", &env, &dir.path().join("j")).await;
    warm(&node.ipam, 1).await;
    // The next grow times out without effect, which asks for a resync at
    // the next step; every Describe from now on is throttled.
    inject(
        &vpc,
        "AssignPrivateIpAddresses",
        FaultKind::Timeout { applied: false },
        1,
    )
    .await;
    inject(
        &vpc,
        "DescribeNetworkInterfaces",
        FaultKind::Throttle,
        10_000,
    )
    .await;
    let started = Instant::now();
    node.ipam
        .add(key("a"))
        .await
        .expect("the first from the pool");
    node.ipam
        .add(key("b"))
        .await
        .expect("served although every Describe is throttled");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "{took:?}");
    let s = node.ipam.summary();
    assert!(
        s["provider_api"]["DescribeNetworkInterfaces"]["throttles"]
            .as_u64()
            .unwrap()
            > 0,
        "no resync was tried: {s}"
    );
    node.stop().await;
}

/// A release the cloud throttles is handed back to the reconciler and put
/// off, instead of being retried inside the call: the retries' waits (the
/// node's bucket halved and emptied, then delays up to 10 s, twenty times)
/// held the reconciler for minutes, while an ADD that came to wait
/// needed it to grow, and the addresses claimed for the release could not
/// be handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_release_does_not_hold_an_add_that_comes_to_wait() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    let env = [
        ("WARM_IP_TARGET", "1"),
        ("IP_COOLDOWN_PERIOD", "0"),
        ("IPAMD_ADD_WAIT_SECONDS", "20"),
    ];
    let node = Node::start(&vpc, "m5.large", &env, &dir.path().join("j")).await;
    for i in 0..5 {
        node.ipam.add(key(&format!("p{i}"))).await.unwrap();
    }
    warm(&node.ipam, 1).await;
    inject(
        &vpc,
        "UnassignPrivateIpAddresses",
        FaultKind::Throttle,
        10_000,
    )
    .await;
    // Five addresses more than the warm target: the pool releases them,
    // and the cloud throttles the release.
    for i in 0..5 {
        node.ipam.del(key(&format!("p{i}"))).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = node.ipam.summary();
        if s["provider_api"]["UnassignPrivateIpAddresses"]["throttles"]
            .as_u64()
            .unwrap_or(0)
            >= 1
        {
            break;
        }
        assert!(Instant::now() < deadline, "no release was throttled: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // More pods than the pool's six addresses: a grow is needed too.
    let started = Instant::now();
    for p in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        node.ipam
            .add(key(p))
            .await
            .expect("served while the release is throttled");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    let s = node.ipam.summary();
    let unassign = &s["provider_api"]["UnassignPrivateIpAddresses"];
    assert_eq!(unassign["retries"], 0, "retried inside the call: {s}");
    assert_eq!(
        s["status"]["consecutive_errors"], 0,
        "a release put off is not a failure: {s}"
    );
    node.stop().await;
}
