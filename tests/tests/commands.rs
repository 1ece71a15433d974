//! The CNI commands beyond ADD: DEL with ipamd down, STATUS, GC, VERSION,
//! and the spec's error codes, through the real binary.

use serde_json::{json, Value};
use vpc_cni_e2e::*;

async fn holds(lab: &Lab, node: usize, container_id: &str) -> bool {
    lab.lookup(node, container_id).await.found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_with_ipamd_down_succeeds_and_ipamd_reclaims_the_address() {
    let mut lab = Lab::new().await;
    let prefix = lab.prefix.clone();
    let a = lab
        .add_node(NodeSpec {
            name: "a",
            instance_type: "m5.large",
            env: vec![],
        })
        .await;
    let pod = lab.add_pod(a, "p");
    let (ip, id) = (pod.ip, pod.container_id.clone());
    lab.stop_ipamd(a);
    let r = lab.del_pod(pod);
    assert!(
        r.ok,
        "DEL with ipamd down must succeed: {} {}",
        r.stdout, r.stderr
    );
    assert!(
        r.stderr.contains("prevResult"),
        "says it tore down from prevResult: {}",
        r.stderr
    );
    let node = lab.nodes[a].ns.name.clone();
    assert!(
        !ip_out(&node, &["rule"]).contains(&format!("{ip} ")),
        "rule left after DEL"
    );
    assert!(
        !ip_out(&node, &["route"]).contains(&format!("{ip} ")),
        "route left after DEL"
    );
    // ipamd comes back, sees the pod's namespace gone, and frees the address.
    lab.restart_ipamd(a).await;
    let mut freed = false;
    for _ in 0..100 {
        if !holds(&lab, a, &id).await {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        freed,
        "ipamd did not reclaim {ip}:\n{}",
        lab.node_ipamd_log(a)
    );
    // Its log is a file (as a container's is): no terminal colour codes.
    let log = lab.node_ipamd_log(a);
    assert!(log.contains("INFO") && !log.contains('\x1b'), "{log}");
    drop(lab);
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_gc_version_and_error_codes() {
    let mut lab = Lab::new().await;
    let prefix = lab.prefix.clone();
    let a = lab
        .add_node(NodeSpec {
            name: "a",
            instance_type: "m5.large",
            env: vec![],
        })
        .await;
    let cni = lab.bins.vpc_cni();
    let conf11 = lab.netconf(a, "1.1.0");

    let r = lab.invoke(
        a,
        &cni,
        "VERSION",
        "",
        "",
        "",
        &json!({"cniVersion": "1.1.0"}),
        &[],
    );
    assert!(r.ok);
    assert_eq!(
        r.json()["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );

    // STATUS follows ipamd's readiness latch.
    lab.wait_ready(a).await;
    let r = lab.invoke(a, &cni, "STATUS", "", "", "", &conf11, &[]);
    assert!(r.ok, "STATUS with ipamd ready: {}", r.stdout);

    // GC keeps the valid attachment and frees the other one.
    let keep = lab.add_pod(a, "keep");
    let stale = lab.add_pod(a, "stale");
    let mut gc = conf11.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": keep.container_id, "ifname": "eth0"}]);
    let r = lab.invoke(a, &cni, "GC", "", "", "", &gc, &[]);
    assert!(r.ok, "GC: {} {}", r.stdout, r.stderr);
    assert!(
        holds(&lab, a, &keep.container_id).await,
        "GC freed a valid attachment"
    );
    assert!(
        !holds(&lab, a, &stale.container_id).await,
        "GC kept a stale attachment"
    );
    let rules = ip_out(&lab.nodes[a].ns.name, &["rule"]);
    assert!(
        !rules.contains(&format!("{} ", stale.ip)),
        "GC left the stale pod's rule:\n{rules}"
    );
    assert!(
        rules.contains(&format!("{} ", keep.ip)),
        "GC removed the valid pod's rule"
    );

    // The spec's error codes.
    let code = |r: &Invocation| -> u64 {
        assert!(!r.ok, "expected a failure: {}", r.stdout);
        let v: Value = r.json();
        v["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no error JSON on stdout: {}", r.stdout))
    };
    let netns = keep.ns.path().display().to_string();
    assert_eq!(
        code(&lab.invoke(a, &cni, "ADD", "", &netns, "eth0", &conf11, &[])),
        4,
        "missing CNI_CONTAINERID"
    );
    assert_eq!(
        code(&lab.invoke(
            a,
            &cni,
            "ADD",
            "x",
            &netns,
            "eth0",
            &json!("not an object"),
            &[]
        )),
        6
    );
    let mut bad = conf11.clone();
    bad["mtu"] = json!(10);
    assert_eq!(
        code(&lab.invoke(a, &cni, "ADD", "x", &netns, "eth0", &bad, &[])),
        7
    );
    let mut old = conf11.clone();
    old["cniVersion"] = json!("0.2.0");
    assert_eq!(
        code(&lab.invoke(a, &cni, "ADD", "x", &netns, "eth0", &old, &[])),
        1
    );
    let mut status10 = conf11.clone();
    status10["cniVersion"] = json!("1.0.0");
    assert_eq!(
        code(&lab.invoke(a, &cni, "STATUS", "", "", "", &status10, &[])),
        1,
        "STATUS needs 1.1.0"
    );

    // ipamd down: ADD says try again later (11), STATUS says not available (50).
    lab.stop_ipamd(a);
    let other = Netns::new(&format!("{prefix}-other"));
    let r = lab.invoke(
        a,
        &cni,
        "ADD",
        "y",
        &other.path().display().to_string(),
        "eth0",
        &conf11,
        &[],
    );
    assert_eq!(code(&r), 11);
    assert!(
        r.stdout.contains("is ipamd running?"),
        "hint missing: {}",
        r.stdout
    );
    let veth = vpc_cni::spec::host_veth_name("eni", "y", "eth0");
    assert!(
        !ip_out(&lab.nodes[a].ns.name, &["link"]).contains(&veth),
        "ADD left a veth when ipamd was down"
    );
    assert_eq!(
        code(&lab.invoke(a, &cni, "STATUS", "", "", "", &conf11, &[])),
        50
    );
    drop((keep, stale, other));
    drop(lab);
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
}

/// ADD asks over the fast path (one protobuf frame each way) and falls back
/// to gRPC when an ipamd has no fast path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_uses_the_fast_path_and_falls_back_to_grpc() {
    let mut lab = Lab::new().await;
    let prefix = lab.prefix.clone();
    let a = lab
        .add_node(NodeSpec {
            name: "a",
            instance_type: "t3.small",
            env: vec![
                ("IPAMD_ADD_WAIT_SECONDS", "1".to_string()),
                ("IP_COOLDOWN_PERIOD", "0".to_string()),
            ],
        })
        .await;
    let grpc = lab.nodes[a].socket.clone();
    let fast = ipamd_api::fast::path(&grpc);
    assert!(
        fast.exists(),
        "ipamd serves no fast path at {}",
        fast.display()
    );
    let hidden = grpc.with_extension("hidden");

    // With the gRPC socket out of the way, only the fast path can answer.
    std::fs::rename(&grpc, &hidden).unwrap();
    let p1 = lab.add_pod(a, "fast");
    std::fs::rename(&hidden, &grpc).unwrap();
    assert!(holds(&lab, a, &p1.container_id).await);

    // An error crosses the fast path with its reason: t3.small holds 9 pod
    // addresses (3 interfaces x 3 secondary addresses).
    for i in 0..8 {
        lab.reserve(a, &format!("held{i}")).await;
    }
    std::fs::rename(&grpc, &hidden).unwrap();
    let ns = Netns::new(&format!("{prefix}-full"));
    let conf = lab.netconf(a, "1.0.0");
    let r = lab.invoke(
        a,
        &lab.bins.vpc_cni(),
        "ADD",
        "full",
        &ns.path().display().to_string(),
        "eth0",
        &conf,
        &[],
    );
    std::fs::rename(&hidden, &grpc).unwrap();
    assert!(!r.ok, "ADD past the instance's limit succeeded");
    let err: Value = r.json();
    assert_eq!(err["code"], 11, "{}", r.stdout);
    assert!(
        err["details"].as_str().unwrap_or("").contains("limit"),
        "the reason is lost: {}",
        r.stdout
    );

    // Without the fast path (an older ipamd), ADD goes over gRPC.
    let mut c = ipamd_api::client(&grpc).await.unwrap();
    c.del_network(ipamd_api::v1::DelNetworkRequest {
        network_name: "vpc-cni".into(),
        container_id: "held0".into(),
        ifname: "eth0".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    std::fs::remove_file(&fast).unwrap();
    let p2 = lab.add_pod(a, "grpc");
    assert!(holds(&lab, a, &p2.container_id).await);
    drop((p1, p2, ns));
    drop(lab);
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
}
