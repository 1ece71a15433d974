//! vpc-cni first in a chain with Debian's portmap and bandwidth, run as a
//! runtime runs a conflist: ADD in order with each plugin's prevResult,
//! CHECK in order and DEL in reverse with the final result. At cniVersion
//! 1.0.0, and at 0.3.1 as Calico's and Cilium's chaining guides write it.

use serde_json::{json, Value};
use vpc_cni_e2e::*;

fn plugin_conf(
    lab: &Lab,
    node: usize,
    version: &str,
    plugin: &Value,
    runtime: &Value,
    prev: Option<&Value>,
) -> Value {
    let mut c = plugin.clone();
    c["cniVersion"] = json!(version);
    c["name"] = json!("vpc-cni");
    // A plugin gets the runtimeConfig keys of the capabilities it declares.
    if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
        let mut rc = serde_json::Map::new();
        for (k, on) in caps {
            if on.as_bool() == Some(true) {
                if let Some(v) = runtime.get(k) {
                    rc.insert(k.clone(), v.clone());
                }
            }
        }
        c["runtimeConfig"] = Value::Object(rc);
    }
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    if c["type"] == "vpc-cni" {
        c["ipamdSocket"] = json!(lab.nodes[node].socket);
        c["logFile"] = json!(lab.dir.path().join("plugin.log"));
    }
    c
}

fn binary(lab: &Lab, t: &str) -> std::path::PathBuf {
    if t == "vpc-cni" {
        lab.bins.vpc_cni()
    } else {
        std::path::Path::new("/usr/lib/cni").join(t)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portmap_and_bandwidth_chained_after_vpc_cni() {
    let plugins = [
        json!({"type": "vpc-cni", "mtu": 1500}),
        json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
    ];
    chain("1.0.0", &plugins).await;
}

/// The conflist shape of the policy engines' chaining guides: cniVersion
/// 0.3.1, vpc-cni first. Results come in the 0.3.x shape (per-IP
/// `version`) and the next plugin takes them as its prevResult.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_at_cni_version_0_3_1() {
    let plugins = [
        json!({"type": "vpc-cni", "mtu": 1500}),
        json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
    ];
    chain("0.3.1", &plugins).await;
}

async fn chain(version: &str, plugins: &[Value]) {
    require_root();
    assert!(
        std::path::Path::new("/usr/lib/cni/portmap").is_file(),
        "portmap missing: run ./scripts/setup.sh"
    );
    let mut lab = Lab::new().await;
    let prefix = lab.prefix.clone();
    let a = lab
        .add_node(NodeSpec {
            name: "a",
            instance_type: "m5.large",
            env: vec![],
        })
        .await;
    let b = lab
        .add_node(NodeSpec {
            name: "b",
            instance_type: "m5.large",
            env: vec![],
        })
        .await;
    let client = lab.add_pod(b, "client");
    let runtime = json!({
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 100_000_000, "ingressBurst": 1_000_000, "egressRate": 100_000_000, "egressBurst": 1_000_000},
    });
    let pod_ns = Netns::new(&format!("{prefix}-web"));
    let id = format!("{prefix}-web");
    let netns = pod_ns.path().display().to_string();

    let mut prev: Option<Value> = None;
    for p in plugins {
        let conf = plugin_conf(&lab, a, version, p, &runtime, prev.as_ref());
        let r = lab.invoke(
            a,
            &binary(&lab, p["type"].as_str().unwrap()),
            "ADD",
            &id,
            &netns,
            "eth0",
            &conf,
            &[],
        );
        assert!(r.ok, "ADD {}: {} {}", p["type"], r.stdout, r.stderr);
        let out = r.json();
        assert_eq!(out["cniVersion"], version, "{}", r.stdout);
        if version.starts_with("0.") {
            assert_eq!(out["ips"][0]["version"], "4", "{}", r.stdout);
        }
        prev = Some(out);
    }
    let result = prev.unwrap();
    let pod_ip: std::net::Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let host_veth = result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let node = lab.nodes[a].ns.name.clone();

    // The chain did its work: a shaping qdisc on the pod's veth, and the
    // host port reaches the pod from a pod on the other node.
    if plugins.iter().any(|p| p["type"] == "bandwidth") {
        let qdisc = ns_out(&node, &["tc", "qdisc", "show", "dev", &host_veth]);
        assert!(
            qdisc.contains("tbf"),
            "bandwidth left no tbf qdisc on {host_veth}: {qdisc}"
        );
    }
    let node_ip = lab.nodes[a].primary_ip;
    tcp_probe(&client.ns.path(), &pod_ns.path(), 80, node_ip, 8080)
        .unwrap_or_else(|e| panic!("hostPort 8080 -> {pod_ip}:80: {e}"));

    for p in plugins {
        let conf = plugin_conf(&lab, a, version, p, &runtime, Some(&result));
        let r = lab.invoke(
            a,
            &binary(&lab, p["type"].as_str().unwrap()),
            "CHECK",
            &id,
            &netns,
            "eth0",
            &conf,
            &[],
        );
        if p["type"] != "vpc-cni" && version.starts_with("0.3") {
            // CHECK came with spec 0.4.0: the plugins' shared skeleton
            // refuses it below that (code 1), and libcni never sends it.
            // vpc-cni answers it at 0.3.x all the same (checked above).
            assert!(!r.ok);
            assert_eq!(r.json()["code"], 1, "{}", r.stdout);
            continue;
        }
        if p["type"] == "portmap" && !r.ok {
            // Debian bookworm's portmap (1.1.1) checks for IPv6 chains its
            // ADD never made when the result is IPv4 only: upstream
            // containernetworking/plugins#819, fixed after 1.1.1. Accept
            // exactly that failure, and check its IPv4 rules ourselves.
            assert!(
                r.stdout.contains("could not check ipv6 dnat"),
                "CHECK portmap: {} {}",
                r.stdout,
                r.stderr
            );
            let nat = ns_out(&lab.nodes[a].ns.name, &["iptables", "-t", "nat", "-S"]);
            assert!(
                nat.contains(&format!("--to-destination {pod_ip}:80")),
                "portmap's DNAT to {pod_ip}:80 is missing:\n{nat}"
            );
            eprintln!(
                "portmap CHECK: known IPv6 bug of portmap 1.1.1 (plugins#819); IPv4 DNAT verified"
            );
            continue;
        }
        assert!(r.ok, "CHECK {}: {} {}", p["type"], r.stdout, r.stderr);
    }
    for p in plugins.iter().rev() {
        let conf = plugin_conf(&lab, a, version, p, &runtime, Some(&result));
        let r = lab.invoke(
            a,
            &binary(&lab, p["type"].as_str().unwrap()),
            "DEL",
            &id,
            &netns,
            "eth0",
            &conf,
            &[],
        );
        assert!(r.ok, "DEL {}: {} {}", p["type"], r.stdout, r.stderr);
    }
    drop(pod_ns);
    let nat = ns_out(&node, &["iptables", "-t", "nat", "-S"]);
    assert!(
        !nat.contains(&pod_ip.to_string()),
        "portmap rules for {pod_ip} left behind:\n{nat}"
    );
    assert!(
        !ip_out(&node, &["rule"]).contains(&format!("{pod_ip} ")),
        "vpc-cni rule left behind"
    );
    let links = ip_out(&node, &["link"]);
    assert!(
        !links.contains("bwp"),
        "bandwidth's ifb left behind:\n{links}"
    );
    drop(client);
    drop(lab);
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
}
