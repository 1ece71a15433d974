//! ipamd and Kubernetes, against the in-process fake API server (watches
//! with resource versions, bookmarks, 410 Gone and field selectors) and
//! the production pool and reconciler on the simulated VPC: the startup
//! taint, the exhaustion condition and taint, the capacity annotation,
//! cordon, gone pods, Events, and an API server that is down.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_apiserver::{FakeApiServer, Options, Res, Verb};
use ipamd::datastore::PodName;
use ipamd::ipam::Ipam;
use ipamd::k8s::{
    KubeSettings, CAPACITY_ANNOTATION, CONDITION, DEFAULT_STARTUP_TAINT, EXHAUSTED_TAINT,
};
use serde_json::{json, Value};
use support::inproc::{inject, key, vpc, warm, Node};
use tokio::sync::watch;

const NODE: &str = "node-a";

fn node_object(taints: &[&str], unschedulable: bool) -> Value {
    let taints: Vec<Value> = taints
        .iter()
        .map(|k| json!({"key": k, "effect": "NoSchedule"}))
        .collect();
    json!({
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "sim-1a"}},
        "spec": {"taints": taints, "unschedulable": unschedulable},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    })
}

fn pod_object(ns: &str, name: &str, node: &str, phase: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.example/web:1"}]},
        "status": {"phase": phase},
    })
}

/// The Kubernetes side of `ipam`, running against `fake` until dropped.
struct Kube {
    stop: watch::Sender<bool>,
    installed: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Kube {
    async fn start(
        fake: &FakeApiServer,
        ipam: &Arc<Ipam>,
        settings: KubeSettings,
        installed: bool,
    ) -> Kube {
        let dir = tempfile::tempdir().unwrap();
        let client = ipamd::k8s::client(Some(&fake.kubeconfig(dir.path())))
            .await
            .unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let (installed, installed_rx) = watch::channel(installed);
        let task = tokio::spawn(ipamd::k8s::run(
            client,
            ipam.clone(),
            settings,
            installed_rx,
            stop_rx,
        ));
        Kube {
            stop,
            installed,
            task,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.stop.send(true).ok();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .ok();
    }
}

fn settings() -> KubeSettings {
    KubeSettings {
        settle: Duration::from_millis(300),
        ..KubeSettings::new(NODE)
    }
}

/// Waits (up to `secs`) until `f` holds for the fake's node.
async fn until_node(
    fake: &FakeApiServer,
    secs: u64,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let n = fake.get(Res::Nodes, "", NODE).expect("node");
        if f(&n) {
            return n;
        }
        assert!(Instant::now() < deadline, "never {what}; node: {n:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn taint_keys(n: &Value) -> Vec<String> {
    n["spec"]["taints"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| t["key"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn condition(n: &Value) -> Option<(String, String)> {
    n["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == CONDITION)
        .map(|c| {
            (
                c["status"].as_str().unwrap().to_string(),
                c["reason"].as_str().unwrap().to_string(),
            )
        })
}

fn pod(name: &str) -> PodName {
    PodName {
        namespace: "shop".into(),
        name: name.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_taint_goes_only_once_ready_and_the_conflist_is_installed() {
    let fake = FakeApiServer::start(Options::default()).await;
    fake.put(
        Res::Nodes,
        node_object(&[DEFAULT_STARTUP_TAINT, "example.com/other"], false),
    );
    let v = vpc(50);
    // The pool cannot get an address at first: ipamd is not ready.
    for api in ["AssignPrivateIpAddresses", "CreateNetworkInterface"] {
        inject(&v, api, vpc_sim::FaultKind::ServerError, 100_000).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&v, "m5.large", &[], &dir.path().join("j")).await;
    let kube = Kube::start(&fake, &node.ipam, settings(), false).await;
    let still_tainted = |why: &str| {
        let n = fake.get(Res::Nodes, "", NODE).unwrap();
        assert!(
            taint_keys(&n).contains(&DEFAULT_STARTUP_TAINT.to_string()),
            "removed {why}"
        );
    };
    // Neither ready nor installed: the taint stays, though the node was
    // seen (its condition is written).
    let n = until_node(&fake, 5, "the condition written", |n| {
        condition(n).is_some()
    })
    .await;
    assert_eq!(
        condition(&n),
        Some(("False".into(), "AddressesAvailable".into()))
    );
    still_tainted("with neither");
    // The conflist is in place but ipamd is not ready: it stays.
    kube.installed.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(node.ipam.readiness().is_err());
    still_tainted("before ipamd was ready");
    kube.stop().await;
    // Ready, but (a fresh start of the Kubernetes side) the conflist is
    // not installed: it stays.
    v.handle(vpc_sim::Request::ClearFaults).await.unwrap();
    warm(&node.ipam, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.ipam.readiness().is_err() {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kube = Kube::start(&fake, &node.ipam, settings(), false).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    still_tainted("before the conflist was in place");
    // Both: the taint goes, the other stays; the
    // capacity annotation says what the pool may hold (m5.large: 3
    // interfaces x 9 secondary addresses).
    kube.installed.send(true).unwrap();
    let n = until_node(&fake, 5, "the startup taint removed", |n| {
        !taint_keys(n).contains(&DEFAULT_STARTUP_TAINT.to_string())
    })
    .await;
    assert_eq!(taint_keys(&n), ["example.com/other"]);
    let n = until_node(&fake, 5, "the capacity annotation", |n| {
        n["metadata"]["annotations"][CAPACITY_ANNOTATION].is_string()
    })
    .await;
    assert_eq!(n["metadata"]["annotations"][CAPACITY_ANNOTATION], "27");
    assert_eq!(
        n["status"]["conditions"][0]["type"], "Ready",
        "kubelet's condition kept"
    );
    assert_eq!(node.ipam.summary()["pod_ip_capacity"], 27);
    // A taint put back (a re-registered node) is removed again.
    let mut n = fake.get(Res::Nodes, "", NODE).unwrap();
    n["spec"]["taints"] = json!([{"key": DEFAULT_STARTUP_TAINT, "effect": "NoSchedule"}]);
    fake.put(Res::Nodes, n);
    until_node(&fake, 5, "the startup taint removed again", |n| {
        taint_keys(n).is_empty()
    })
    .await;
    let s = node.ipam.summary();
    assert_eq!(s["kubernetes"]["startup_taint_removed"], true, "{s}");
    kube.stop().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_sets_the_condition_and_taint_and_clears_them() {
    let fake = FakeApiServer::start(Options::default()).await;
    fake.put(Res::Nodes, node_object(&[], false));
    let v = vpc(50);
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("MAX_PODS", "2"),
        ("IP_COOLDOWN_PERIOD", "1"),
        ("WARM_IP_TARGET", "1"),
    ];
    let node = Node::start(&v, "m5.large", &env, &dir.path().join("j")).await;
    let kube = Kube::start(
        &fake,
        &node.ipam,
        KubeSettings {
            exhaustion_taint: true,
            ..settings()
        },
        true,
    )
    .await;
    warm(&node.ipam, 1).await;
    node.ipam
        .add_in(key("a"), None, Some(pod("a")))
        .await
        .unwrap();
    node.ipam
        .add_in(key("b"), None, Some(pod("b")))
        .await
        .unwrap();
    let n = until_node(&fake, 10, "exhausted", |n| {
        condition(n).is_some_and(|c| c.0 == "True")
    })
    .await;
    assert_eq!(condition(&n).unwrap().1, "MaxPods");
    assert!(
        taint_keys(&n).contains(&EXHAUSTED_TAINT.to_string()),
        "{n:#}"
    );
    let ev = fake.list(Res::Events);
    assert!(
        ev.iter().any(|e| e["reason"] == "MaxPods"
            && e["regarding"]["name"] == NODE
            && e["type"] == "Warning"),
        "an Event on the node: {ev:#?}"
    );
    // A pod goes; once its address has cooled down the node has room.
    node.ipam.del(key("a")).await.unwrap();
    let n = until_node(&fake, 10, "no longer exhausted", |n| {
        condition(n).is_some_and(|c| c.0 == "False")
    })
    .await;
    assert!(
        !taint_keys(&n).contains(&EXHAUSTED_TAINT.to_string()),
        "{n:#}"
    );
    kube.stop().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_pods_address_is_reclaimed_after_the_grace_and_not_while_the_api_is_down() {
    let fake = FakeApiServer::start(Options::default()).await;
    fake.put(Res::Nodes, node_object(&[], false));
    for p in ["p1", "p2", "p3", "p4"] {
        fake.put(Res::Pods, pod_object("shop", p, NODE, "Running"));
    }
    // 2,000 pods elsewhere: the watch sees none of them.
    for i in 0..2000 {
        fake.put(
            Res::Pods,
            pod_object("shop", &format!("other-{i}"), "node-b", "Running"),
        );
    }
    let v = vpc(50);
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&v, "m5.large", &[], &dir.path().join("j")).await;
    let grace = Duration::from_secs(2);
    let kube = Kube::start(
        &fake,
        &node.ipam,
        KubeSettings {
            pod_gone_grace: grace,
            ..settings()
        },
        true,
    )
    .await;
    warm(&node.ipam, 4).await;
    for p in ["p1", "p2", "p3", "p4"] {
        node.ipam.add_in(key(p), None, Some(pod(p))).await.unwrap();
    }
    // A pod with the same name on another node is not ours: its address
    // stays (it was never seen here and never held by that pod).
    let held = |ipam: &Ipam, p: &str| ipam.lookup(&key(p)).is_some();
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.ipam.summary()["kubernetes"]["pods_in_sync"] != true {
        assert!(
            Instant::now() < deadline,
            "pod watch never in sync: {}",
            node.ipam.summary()["kubernetes"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        node.ipam.summary()["kubernetes"]["pods_on_node"],
        4,
        "only this node's pods are cached"
    );
    // p2 is deleted, p3 finishes: both are released after the grace, not before.
    fake.delete(Res::Pods, "shop", "p2");
    let mut p3 = fake.get(Res::Pods, "shop", "p3").unwrap();
    p3["status"]["phase"] = json!("Succeeded");
    fake.put(Res::Pods, p3);
    let gone_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        held(&node.ipam, "p2") && held(&node.ipam, "p3"),
        "released before the grace"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&node.ipam, "p2") || held(&node.ipam, "p3") {
        assert!(Instant::now() < deadline, "never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone_at.elapsed() >= grace);
    assert!(held(&node.ipam, "p1") && held(&node.ipam, "p4"));
    // The API server goes down and p4 goes meanwhile: nothing is judged on
    // a watch that is not in sync.
    fake.set_down(true);
    fake.delete(Res::Pods, "shop", "p4");
    // A pod scheduled meanwhile is ADDed: the watch cannot have seen it.
    fake.put(Res::Pods, pod_object("shop", "p5", NODE, "Pending"));
    node.ipam
        .add_in(key("p5"), None, Some(pod("p5")))
        .await
        .unwrap();
    tokio::time::sleep(grace * 3).await;
    assert!(held(&node.ipam, "p4"), "released on a watch that was down");
    assert!(
        held(&node.ipam, "p5"),
        "a pod the watch could not see lost its address"
    );
    assert!(held(&node.ipam, "p1"));
    // Back (the watch resumes from its resource version, no re-list): p4
    // is released after a full grace, p5 kept.
    fake.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while held(&node.ipam, "p4") {
        assert!(
            Instant::now() < deadline,
            "p4 never released once the API was back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        held(&node.ipam, "p1"),
        "a pod that is there keeps its address"
    );
    assert!(
        held(&node.ipam, "p5"),
        "a pod that is there keeps its address"
    );
    // Down again with the history compacted: the watch cannot resume (410
    // Gone) and lists again; p1, deleted meanwhile, is released after it.
    fake.set_down(true);
    fake.delete(Res::Pods, "shop", "p1");
    fake.compact();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fake.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while held(&node.ipam, "p1") {
        assert!(
            Instant::now() < deadline,
            "p1 never released after the re-list"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        held(&node.ipam, "p5"),
        "a pod that is there keeps its address"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while node.ipam.summary()["kubernetes"]["released_gone_pods"] != 4 {
        assert!(
            Instant::now() < deadline,
            "{}",
            node.ipam.summary()["kubernetes"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Only this node's pods were ever asked for.
    let asked: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|(verb, res, _)| *res == Res::Pods && matches!(verb, Verb::List | Verb::Watch))
        .map(|(_, _, path)| path)
        .collect();
    assert!(!asked.is_empty());
    kube.stop().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_errors_of_the_cloud_and_of_rbac_become_events() {
    let fake = FakeApiServer::start(Options::default()).await;
    fake.put(Res::Nodes, node_object(&[], false));
    fake.forbid(Verb::Patch, Res::Nodes);
    let v = vpc(50);
    let dir = tempfile::tempdir().unwrap();
    let env = [("WARM_IP_TARGET", "1"), ("WARM_ENI_TARGET", "0")];
    let node = Node::start(&v, "m5.large", &env, &dir.path().join("j")).await;
    warm(&node.ipam, 1).await;
    let kube = Kube::start(&fake, &node.ipam, settings(), true).await;
    // Every grow is refused for lack of permission.
    inject(
        &v,
        "AssignPrivateIpAddresses",
        vpc_sim::FaultKind::PermissionDenied,
        1000,
    )
    .await;
    inject(
        &v,
        "CreateNetworkInterface",
        vpc_sim::FaultKind::PermissionDenied,
        1000,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    loop {
        let ev = fake.list(Res::Events);
        let reasons: Vec<&str> = ev.iter().filter_map(|e| e["reason"].as_str()).collect();
        if reasons.contains(&"CloudPermissionDenied") && reasons.contains(&"KubernetesForbidden") {
            let e = ev
                .iter()
                .find(|e| e["reason"] == "CloudPermissionDenied")
                .unwrap();
            assert_eq!(e["regarding"]["kind"], "Node");
            assert_eq!(e["regarding"]["name"], NODE);
            assert_eq!(e["reportingController"], ipamd::k8s::REPORTER);
            assert!(e["note"].as_str().unwrap().contains("ermission"), "{e:#}");
            break;
        }
        assert!(Instant::now() < deadline, "events: {ev:#?}");
        // Pods arrive and use what is free, so the pool must grow.
        if i < 20 {
            node.ipam
                .add_in(key(&format!("c{i}")), None, Some(pod(&format!("c{i}"))))
                .await
                .ok();
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = node.ipam.summary();
    assert!(
        s["kubernetes"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("403"),
        "{s}"
    );
    kube.stop().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordoned_node_attaches_no_interface_unless_told_to() {
    let fake = FakeApiServer::start(Options::default()).await;
    fake.put(Res::Nodes, node_object(&[], false));
    let v = vpc(50);
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&v, "m5.large", &[], &dir.path().join("j")).await;
    let kube = Kube::start(&fake, &node.ipam, settings(), true).await;
    // WARM_ENI_TARGET=1: the primary interface, all free, is the warm one.
    warm(&node.ipam, 9).await;
    let interfaces = |ipam: &Ipam| ipam.summary()["counts"]["interfaces"].as_u64().unwrap();
    assert_eq!(interfaces(&node.ipam), 1);
    fake.put(Res::Nodes, node_object(&[], true));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node.ipam.reconciler.interfaces_held() {
        assert!(Instant::now() < deadline, "cordon not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nine pods fill the primary interface, so the warm target asks for a
    // second; the cordon holds it.
    for i in 0..9 {
        node.ipam
            .add_in(key(&format!("c{i}")), None, Some(pod(&format!("c{i}"))))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        interfaces(&node.ipam),
        1,
        "an interface attached on a cordoned node"
    );
    assert_eq!(node.ipam.summary()["kubernetes"]["cordoned"], true);
    fake.put(Res::Nodes, node_object(&[], false));
    let deadline = Instant::now() + Duration::from_secs(10);
    while interfaces(&node.ipam) < 2 {
        assert!(Instant::now() < deadline, "no interface once uncordoned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kube.stop().await;
    // AWS_MANAGE_ENIS_NON_SCHEDULABLE=true: a cordon holds nothing.
    fake.put(Res::Nodes, node_object(&[], true));
    let kube = Kube::start(
        &fake,
        &node.ipam,
        KubeSettings {
            manage_enis_non_schedulable: true,
            ..settings()
        },
        true,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.ipam.summary()["kubernetes"]["cordoned"] != true {
        assert!(Instant::now() < deadline, "cordon not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!node.ipam.reconciler.interfaces_held());
    kube.stop().await;
    node.stop().await;
}

#[test]
fn bad_kubernetes_settings_are_all_named_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ipamd"))
            .args(["--provider", "sim", "--metrics", "off"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .args(args)
            .env_clear()
            .output()
            .unwrap()
    };
    let out = run(&[
        "--kubernetes",
        "maybe",
        "--startup-taint",
        "Bad Key",
        "--pod-gone-grace-seconds",
        "1",
        "--exhaustion-taint",
        "yes",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for name in [
        "IPAMD_KUBERNETES",
        "IPAMD_STARTUP_TAINT",
        "IPAMD_POD_GONE_GRACE_SECONDS",
        "IPAMD_EXHAUSTION_TAINT",
    ] {
        assert!(err.contains(name), "{name} not named: {err}");
    }
    // A kubeconfig that cannot be read is listed with the rest, before
    // anything is created.
    let out = run(&[
        "--kubeconfig",
        "/nonexistent/kubeconfig",
        "--node-name",
        "n1",
        "--startup-taint",
        "Bad Key",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("IPAMD_KUBECONFIG") && err.contains("IPAMD_STARTUP_TAINT"),
        "{err}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "the state directory was created"
    );
    // Kubernetes on, but no node name: which node would it taint?
    let out = run(&["--kubernetes", "on"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("MY_NODE_NAME is not set"), "{err}");
    assert!(!dir.path().join("s.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_server_down_at_start_ipamd_serves_pods_and_catches_up_later() {
    use support::{add_request, free_port, get, Daemon, DaemonSpec, SimServer};
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeApiServer::start(Options::default()).await;
    fake.put(Res::Nodes, node_object(&[DEFAULT_STARTUP_TAINT], false));
    fake.set_down(true);
    let sim = SimServer::start(dir.path(), vpc_sim::VpcConfig::default()).await;
    let kubeconfig = fake.kubeconfig(dir.path());
    let kc = kubeconfig.to_str().unwrap();
    let d = Daemon::start(&DaemonSpec {
        dir: dir.path(),
        sim: &sim.addr,
        node: NODE,
        instance_type: "m5.large",
        env: &[("IPAMD_KUBECONFIG", kc)],
        introspection: free_port(),
    })
    .await;
    // Ready and serving ADDs from its own pool while the API is down.
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(d.introspection, "/readyz").await.is_err() {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = ipamd_api::client(&d.socket).await.unwrap();
    let r = c
        .add_network(add_request("pod-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.ipv4_address.is_empty(), "{r:?}");
    let n = fake.get(Res::Nodes, "", NODE).unwrap();
    assert_eq!(
        taint_keys(&n),
        [DEFAULT_STARTUP_TAINT],
        "nothing written while down"
    );
    // It tried (the client retries 503s with backoff; the watches then
    // back off in turn), and wrote nothing.
    let tried = fake
        .requests()
        .iter()
        .filter(|(verb, res, _)| *verb == Verb::List && *res == Res::Nodes)
        .count();
    assert!(tried >= 1, "{tried} lists of the node while down");
    // The API server is back: the taint goes and the condition appears.
    fake.set_down(false);
    let n = until_node(&fake, 30, "caught up", |n| {
        taint_keys(n).is_empty() && condition(n).is_some()
    })
    .await;
    assert_eq!(condition(&n).unwrap().0, "False");
    let r2 = c
        .add_network(add_request("pod-2"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(r.ipv4_address, r2.ipv4_address);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_networking_puts_interfaces_in_the_eniconfigs_subnet_with_its_groups() {
    let fake = FakeApiServer::start(Options::default()).await;
    // The node selects its ENIConfig by its zone label (one per zone).
    fake.put(Res::Nodes, node_object(&[], false));
    let v = vpc(50);
    v.handle(vpc_sim::Request::CreateSubnet {
        id: "subnet-custom-a".into(),
        cidr: "10.0.96.0/20".into(),
        zone: "sim-1a".into(),
        tags: Default::default(),
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true"),
        ("ENI_CONFIG_LABEL_DEF", "topology.kubernetes.io/zone"),
    ];
    let node = Node::start(&v, "m5.large", &env, &dir.path().join("j")).await;
    let kube = Kube::start(&fake, &node.ipam, settings(), true).await;
    // No ENIConfig "sim-1a" yet: no interface, no address, not ready, and
    // the operator is told why.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = fake.list(Res::Events);
        if let Some(e) = ev.iter().find(|e| e["reason"] == "ENIConfigMissing") {
            let note = e["note"].as_str().unwrap();
            assert!(
                note.contains("\"sim-1a\"") && note.contains("topology.kubernetes.io/zone"),
                "{note}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ENIConfigMissing event: {ev:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let e = node.ipam.explain(None);
    assert_eq!(
        e.verdict,
        ipamd::explain::Verdict::NoEniConfig,
        "{}",
        e.message
    );
    assert!(e.message.contains("does not exist"), "{}", e.message);
    assert!(node.ipam.readiness().is_err());
    let ours = |v: &vpc_sim::Vpc| -> Vec<vpc_sim::model::InterfaceState> {
        v.snapshot()
            .interfaces
            .into_values()
            .filter(|i| {
                i.attachment
                    .as_ref()
                    .is_some_and(|a| a.instance_id == node.ipam.instance().id)
            })
            .collect()
    };
    let now = ours(&v);
    assert_eq!(now.len(), 1, "only the primary: {now:#?}");
    assert!(
        now[0].secondary_ips.is_empty(),
        "the primary gives no pod addresses"
    );
    // The ENIConfig appears: interfaces go to its subnet, with its groups.
    fake.put(
        Res::EniConfigs,
        json!({"metadata": {"name": "sim-1a"}, "spec": {"subnet": "subnet-custom-a", "securityGroups": ["sg-custom"]}}),
    );
    warm(&node.ipam, 1).await;
    let w = node
        .ipam
        .add_in(key("p"), None, Some(pod("p")))
        .await
        .unwrap();
    let ip: std::net::Ipv4Addr = w.ip;
    assert!(
        "10.0.96.0/20"
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .contains(&ip),
        "{ip}"
    );
    let now = ours(&v);
    let primary = now
        .iter()
        .find(|i| i.attachment.as_ref().unwrap().device_index == 0)
        .unwrap();
    assert!(
        primary.secondary_ips.is_empty(),
        "the primary gives no pod addresses"
    );
    for i in now
        .iter()
        .filter(|i| i.attachment.as_ref().unwrap().device_index > 0)
    {
        assert_eq!(i.subnet_id, "subnet-custom-a");
        assert_eq!(i.security_groups, ["sg-custom"]);
    }
    // Capacity: the primary does not count (2 interfaces x 9).
    let n = until_node(&fake, 5, "the capacity annotation", |n| {
        n["metadata"]["annotations"][CAPACITY_ANNOTATION] == "18"
    })
    .await;
    assert!(n["metadata"]["annotations"].is_object());
    assert_eq!(
        node.ipam.summary()["kubernetes"]["eni_config"],
        "sim-1a: subnet-custom-a"
    );
    kube.stop().await;
    node.stop().await;
}

/// Against an API server that cannot be reached, the watches wait longer
/// after each failure (1, 2, 4 s ...) instead of retrying every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_back_off_while_the_api_server_cannot_be_reached() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        serde_json::to_vec(&json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }))
        .unwrap(),
    )
    .unwrap();
    let v = vpc(50);
    let node = Node::start(&v, "m5.large", &[], &dir.path().join("j")).await;
    let client = ipamd::k8s::client(Some(&kubeconfig)).await.unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let (_installed, installed_rx) = watch::channel(true);
    let task = tokio::spawn(ipamd::k8s::run(
        client,
        node.ipam.clone(),
        settings(),
        installed_rx,
        stop_rx,
    ));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let failures = node.ipam.summary()["kubernetes"]["watch_failures"]
        .as_u64()
        .unwrap();
    // Two watches (node, pods), each failing at about 0, 1, 3 and 7 s:
    // about 8, where retrying every second would be about 16.
    assert!(
        (2..=10).contains(&failures),
        "{failures} failed attempts in 8 s"
    );
    // ipamd serves pods all the while.
    node.ipam
        .add_in(key("p"), None, Some(pod("p")))
        .await
        .unwrap();
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_node_count_becomes_the_provider_share_of_the_account() {
    use ipamd::factory::{AzureOptions, ProviderConfig, ProviderKind, SimOptions};
    let fake = FakeApiServer::start(Options::default()).await;
    fake.put_all(
        Res::Nodes,
        (0..7).map(|i| json!({"metadata": {"name": format!("node-{i}")}})),
    );
    let dir = tempfile::tempdir().unwrap();
    let client = ipamd::k8s::client(Some(&fake.kubeconfig(dir.path())))
        .await
        .unwrap();
    // One node listed and the rest counted by the API server.
    assert_eq!(ipamd::k8s::peers::count(&client).await.unwrap(), 7);
    let peers = ipamd::k8s::peers::prime(&client).await;
    assert_eq!(peers, Some(7));
    // The provider is built with its share, as ipamd's start does.
    let cfg = ProviderConfig {
        kind: ProviderKind::Sim,
        sim: SimOptions {
            server: None,
            node_name: NODE.into(),
            instance_type: "m5.large".into(),
            attach_latency: Duration::ZERO,
            state: dir.path().join("vpc.json"),
        },
        azure: AzureOptions {
            arm_endpoint: String::new(),
            imds_endpoint: String::new(),
        },
    };
    let provider = ipamd::factory::build(&cfg, peers.unwrap()).await.unwrap();
    provider.describe_interfaces().await.unwrap();
    let rate = provider.api_figures()["DescribeNetworkInterfaces"].client_rate_per_sec;
    assert!(
        (rate - 20.0 / 7.0).abs() < 1e-9,
        "a seventh of the account's 20 Describe calls a second, not {rate}"
    );
}

/// The growers namespace of the Lease tests.
const GROWERS_NS: &str = "vpc-cni-growers";

/// A node keeping two addresses warm whose Kubernetes side publishes
/// whether it grows in [`GROWERS_NS`], looking every 50 ms, a grow
/// counting for `grows_within`.
async fn growers_node(
    fake: &FakeApiServer,
    dir: &std::path::Path,
    grows_within: Duration,
) -> (Node, Kube) {
    let v = vpc(50);
    let env = [("WARM_IP_TARGET", "2"), ("MINIMUM_IP_TARGET", "2")];
    let node = Node::start(&v, "m5.large", &env, &dir.join("j")).await;
    let kube = Kube::start(
        fake,
        &node.ipam,
        KubeSettings {
            growers_namespace: Some(GROWERS_NS.into()),
            grows_within,
            growers_every: Duration::from_millis(50),
            ..settings()
        },
        true,
    )
    .await;
    (node, kube)
}

/// Waits (up to `secs`) until `f` holds.
async fn until(secs: u64, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "never {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holds_a_lease_in_the_growers_namespace_while_its_pool_grows() {
    const NS: &str = GROWERS_NS;
    let fake = FakeApiServer::start(Options::default()).await;
    fake.put(Res::Nodes, node_object(&[], false));
    // Two other nodes grow.
    fake.put_all(
        Res::Leases,
        ["node-b", "node-c"].map(
            |n| json!({"metadata": {"name": n, "namespace": NS}, "spec": {"holderIdentity": n}}),
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let (node, kube) = growers_node(&fake, dir.path(), Duration::from_secs(2)).await;
    let mine = || fake.get(Res::Leases, NS, NODE);
    // The pool fills at start: the node holds its Lease, then, once the
    // pool has not grown for `grows_within`, deletes it.
    until(10, "the node's Lease while its pool grows", || {
        mine().is_some_and(|l| l["spec"]["holderIdentity"] == NODE)
    })
    .await;
    warm(&node.ipam, 2).await;
    until(
        10,
        "the Lease deleted once the pool stopped growing",
        || mine().is_none(),
    )
    .await;
    let others: Vec<Value> = fake.list(Res::Leases);
    assert_eq!(
        others.len(),
        2,
        "other nodes' Leases untouched: {others:#?}"
    );
    // Pods take the warm addresses: the pool grows again.
    for p in ["a", "b", "c"] {
        node.ipam.add_in(key(p), None, Some(pod(p))).await.unwrap();
    }
    until(10, "the Lease again as the pool grows", || mine().is_some()).await;
    // Owned by the node's Node object, so that the garbage collector
    // deletes it with the Node (a node gone while it grew).
    let owner = &mine().unwrap()["metadata"]["ownerReferences"][0];
    let node_obj = fake.get(Res::Nodes, "", NODE).unwrap();
    assert_eq!(owner["kind"], "Node");
    assert_eq!(owner["uid"], node_obj["metadata"]["uid"]);
    // Stopped while it grows (the pool counts as growing for 2 s after a
    // grow): the Lease goes with it.
    kube.stop().await;
    assert!(mine().is_none(), "the Lease outlived ipamd's stop");
    // Counted as nodes are: one listed and the rest by the API server.
    let client = ipamd::k8s::client(Some(&fake.kubeconfig(dir.path())))
        .await
        .unwrap();
    let n = ipamd::k8s::growers::count(&client, NS).await.unwrap();
    assert_eq!(n, 2, "the two other nodes grow");
    node.stop().await;
    // The fake's garbage collector, as the real one: a Lease owned by a
    // Node goes with it.
    fake.put(
        Res::Leases,
        json!({"metadata": {"name": NODE, "namespace": NS, "ownerReferences": [
            {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": node_obj["metadata"]["uid"]}
        ]}}),
    );
    assert!(fake.delete(Res::Nodes, "", NODE));
    assert!(mine().is_none(), "the Lease outlived its Node");
    assert_eq!(fake.list(Res::Leases).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refused_its_lease_tries_again_less_and_less_often() {
    const NS: &str = GROWERS_NS;
    let fake = FakeApiServer::start(Options::default()).await;
    fake.put(Res::Nodes, node_object(&[], false));
    // RBAC without the growers Role.
    fake.forbid(Verb::Create, Res::Leases);
    let dir = tempfile::tempdir().unwrap();
    // The pool fills at start and counts as growing for 30 s after.
    let (node, kube) = growers_node(&fake, dir.path(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let creates = fake
        .requests()
        .iter()
        .filter(|(verb, res, _)| *verb == Verb::Create && *res == Res::Leases)
        .count();
    // Every 50 ms would be about 60; doubling from 50 ms, about 6.
    assert!(
        (2..=10).contains(&creates),
        "{creates} Lease creates in 3 s"
    );
    assert!(fake.get(Res::Leases, NS, NODE).is_none());
    kube.stop().await;
    node.stop().await;
}
