//! Every explain verdict, reached on the simulated VPC with the production
//! pool and reconciler: why a pod has an address, or why the next ADD would
//! get none, with the facts behind it.

mod support;

use std::time::{Duration, Instant};

use ipamd::datastore::PodName;
use ipamd::explain::{Explanation, Verdict};
use ipamd::ipam::Ipam;
use providers::layer::{CallLayer, RetryPolicy};
use support::inproc::{inject, key, vpc, warm, Node};
use vpc_sim::FaultKind;

fn pod(name: &str) -> PodName {
    PodName {
        namespace: "shop".into(),
        name: name.into(),
    }
}

/// Waits (up to 15 s) until the next ADD's verdict is `want`.
async fn until_verdict(ipam: &Ipam, want: Verdict) -> Explanation {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let e = ipam.explain(None);
        if e.verdict == want {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "never {want:?}; last: {:?}: {}",
            e.verdict,
            e.message
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A call layer that gives up after the second throttled answer, so the
/// reconciler's own failure and backoff show at once.
fn impatient_layer() -> CallLayer {
    CallLayer::new(
        RetryPolicy {
            max_throttled: 2,
            base: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        None,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_with_an_address_one_without_and_the_next_add() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    let node = Node::start(
        &vpc,
        "m5.large",
        &[("WARM_IP_TARGET", "2")],
        &dir.path().join("j"),
    )
    .await;
    warm(&node.ipam, 2).await;
    let w = node
        .ipam
        .add_in(key("c-web"), None, Some(pod("web-0")))
        .await
        .unwrap();

    let e = node.ipam.explain(Some(&pod("web-0")));
    assert_eq!(e.verdict, Verdict::Assigned, "{}", e.message);
    assert_eq!(e.subject, "pod shop/web-0");
    assert_eq!(e.held.len(), 1);
    assert_eq!(e.held[0].ip, w.ip);
    assert_eq!(
        e.held[0].interface.as_deref(),
        Some(w.interface_id.as_str())
    );
    assert!(e.message.contains(&w.ip.to_string()), "{}", e.message);
    assert!(
        !e.message.contains("c-web"),
        "no container id: {}",
        e.message
    );

    let e = until_verdict(&node.ipam, Verdict::AddressAvailable).await;
    assert_eq!(e.subject, "the next ADD");
    assert!(e.facts.assignable >= 1);
    assert_eq!(e.facts.assigned, 1);

    let e = node.ipam.explain(Some(&pod("ghost")));
    assert_eq!(e.verdict, Verdict::AddressAvailable);
    assert!(e.held.is_empty());
    assert!(
        e.message
            .starts_with("no address is assigned to shop/ghost; an ADD now:"),
        "{}",
        e.message
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pods_counts_assigned_and_cooling_apart() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    let env = [("MAX_PODS", "2"), ("IPAMD_ADD_WAIT_SECONDS", "1")];
    let node = Node::start(&vpc, "m5.large", &env, &dir.path().join("j")).await;
    node.ipam.add(key("a")).await.unwrap();
    node.ipam.add(key("b")).await.unwrap();
    node.ipam.del(key("a")).await.unwrap();
    let e = until_verdict(&node.ipam, Verdict::MaxPods).await;
    assert!(
        e.message.contains("max pods (2) reached on this node: 1 assigned, 1 cooling down (IP_COOLDOWN_PERIOD 30s; the next is free in"),
        "{}",
        e.message
    );
    let next = e.facts.next_free_in_s.expect("a cooling address");
    assert!(next > 20.0 && next <= 30.0, "{next}");
    // The ADD that waits in vain says the same, and that the next address
    // frees after its wait.
    let err = node.ipam.add(key("c")).await.unwrap_err().to_string();
    assert!(
        err.contains("failed to assign an IP address to container"),
        "{err}"
    );
    assert!(err.contains("1 assigned, 1 cooling down"), "{err}");
    assert!(err.contains("after this ADD's wait of 1s"), "{err}");
    assert!(err.contains("ipamctl explain"), "{err}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interface_limit() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    // t3.nano: 2 interfaces with one secondary address each.
    let env = [("IPAMD_ADD_WAIT_SECONDS", "5")];
    let node = Node::start(&vpc, "t3.nano", &env, &dir.path().join("j")).await;
    node.ipam.add(key("a")).await.unwrap();
    node.ipam.add(key("b")).await.unwrap();
    let e = until_verdict(&node.ipam, Verdict::InterfaceLimit).await;
    assert!(
        e.message.contains(
            "limit of 2 interfaces with 1 addresses or prefixes each: 2 assigned, 0 cooling down"
        ),
        "{}",
        e.message
    );
    assert_eq!(e.facts.interfaces, 2);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnet_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    // A /28 alone in its zone: the primary's 10 addresses leave 1.
    support::inproc::tiny_subnet_node(&vpc).await;
    let env = [("IPAMD_ADD_WAIT_SECONDS", "1")];
    let node = Node::start(&vpc, "m5.large", &env, &dir.path().join("j")).await;
    for i in 0..9 {
        node.ipam.add(key(&format!("p{i}"))).await.unwrap();
    }
    let e = until_verdict(&node.ipam, Verdict::SubnetExhausted).await;
    assert!(
        e.message.contains("subnet-tiny has no free addresses"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("9 assigned, 0 cooling down"),
        "{}",
        e.message
    );
    assert!(e.facts.retry_in_s.is_some(), "when the next attempt is");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_says_when_the_next_attempt_is() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    inject(&vpc, "AssignPrivateIpAddresses", FaultKind::Throttle, 1000).await;
    // A layer that gives up after the second throttled answer, so the
    // reconciler's own backoff shows.
    let layer = impatient_layer();
    let node = Node::start_with(&vpc, "m5.large", &[], &dir.path().join("j"), layer).await;
    let e = until_verdict(&node.ipam, Verdict::Throttled).await;
    assert!(
        e.message
            .contains("the cloud throttled the pool's last grow (throttled by the cloud API (AssignPrivateIpAddresses))"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("the next attempt is in"),
        "{}",
        e.message
    );
    assert!(e.facts.retry_in_s.is_some());
    assert_eq!(e.facts.last_error_kind, Some("throttled"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_and_other_cloud_errors() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    inject(
        &vpc,
        "AssignPrivateIpAddresses",
        FaultKind::PermissionDenied,
        1000,
    )
    .await;
    let node = Node::start(&vpc, "m5.large", &[], &dir.path().join("j")).await;
    let e = until_verdict(&node.ipam, Verdict::PermissionDenied).await;
    assert!(e.message.contains("UnauthorizedOperation"), "{}", e.message);
    assert!(e.message.contains("grant the permissions"), "{}", e.message);
    // Not ready either: no address was ever assignable.
    assert!(!e.facts.not_ready_because.is_empty());
    assert!(e.message.contains("ipamd is not ready"), "{}", e.message);
    node.stop().await;

    // A 5xx on Assign is not repeated (it may have taken effect): the
    // step fails and says so.
    let dir = tempfile::tempdir().unwrap();
    let vpc2 = support::inproc::vpc(10);
    inject(
        &vpc2,
        "AssignPrivateIpAddresses",
        FaultKind::ServerError,
        1000,
    )
    .await;
    let node = Node::start(&vpc2, "m5.large", &[], &dir.path().join("j")).await;
    let e = until_verdict(&node.ipam, Verdict::CloudError).await;
    assert!(
        e.message
            .contains("the pool's last grow failed (cloud server error"),
        "{}",
        e.message
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_growing_while_an_interface_attaches() {
    let dir = tempfile::tempdir().unwrap();
    // Attaching takes 3 s: the grow after the primary fills is in flight.
    let vpc = vpc(3000);
    let node = Node::start(
        &vpc,
        "m5.large",
        &[("WARM_IP_TARGET", "1")],
        &dir.path().join("j"),
    )
    .await;
    for i in 0..9 {
        node.ipam.add(key(&format!("p{i}"))).await.unwrap();
    }
    let e = node.ipam.explain(None);
    assert_eq!(e.verdict, Verdict::PoolGrowing, "{}", e.message);
    assert!(e.message.contains("the pool is growing"), "{}", e.message);
    assert!(
        e.message.contains("9 assigned, 0 cooling down"),
        "{}",
        e.message
    );
    // And once the interface is attached, an address is there.
    until_verdict(&node.ipam, Verdict::AddressAvailable).await;
    node.stop().await;
}

/// A failure the pool no longer needs to retry does not stay as the pool's
/// last error: once a step passes without one, explain stops citing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_no_longer_current_is_not_cited() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = vpc(10);
    let layer = impatient_layer();
    let env = [("WARM_IP_TARGET", "2"), ("IP_COOLDOWN_PERIOD", "0")];
    let node = Node::start_with(&vpc, "m5.large", &env, &dir.path().join("j"), layer).await;
    warm(&node.ipam, 2).await;
    // Growing is throttled from now on; two ADDs take the free addresses.
    inject(
        &vpc,
        "AssignPrivateIpAddresses",
        FaultKind::Throttle,
        1_000_000,
    )
    .await;
    node.ipam.add(key("a")).await.unwrap();
    node.ipam.add(key("b")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while node.ipam.summary()["status"]["last_error_kind"] != "throttled" {
        assert!(Instant::now() < deadline, "the grow was never throttled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The pods go: the pool is back at its target without growing.
    node.ipam.del(key("a")).await.unwrap();
    node.ipam.del(key("b")).await.unwrap();
    let e = until_verdict(&node.ipam, Verdict::AddressAvailable).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = node.ipam.summary();
        if s["status"]["last_error"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a stale error stays: {}",
            s["status"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!e.message.contains("throttled"), "{}", e.message);
    node.stop().await;
}
