//! Moving a node from aws-node: a node whose pods were wired aws-node's way
//! (one by hand, with aws-node's veth name), with aws-node's interface tags
//! and its checkpoint, and no ipamd journal. ipamd's first start imports the
//! checkpoint: the same pods keep the same addresses, their routes and rules
//! stay as they were and keep carrying traffic, new pods get other
//! addresses, and vpc-cni's DEL removes a migrated pod's rules. Needs root.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::{json, Value};
use vpc_cni_e2e::*;

/// The rules and the main table's /32 routes of a node: what the pods'
/// wiring left there.
fn wiring(node: &str) -> (Vec<String>, Vec<String>) {
    let rules = ip_out(node, &["rule"])
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let routes = ip_out(node, &["route", "show", "table", "main"])
        .lines()
        .filter(|l| l.contains("scope link") && !l.contains('/'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    (rules, routes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_node_checkpoint_is_imported_and_the_pods_keep_addresses_and_routes() {
    let mut lab = Lab::new().await;
    let checkpoint = lab.dir.path().join("aws-node-ipam.json");
    // t3.small: three addresses per interface, so pods land on the primary
    // and on a secondary interface (whose pods have a `from` rule).
    let n = lab
        .add_node(NodeSpec {
            name: "n",
            instance_type: "t3.small",
            env: vec![
                (
                    "IPAMD_AWS_NODE_CHECKPOINT",
                    checkpoint.display().to_string(),
                ),
                ("WARM_IP_TARGET", "1".to_string()),
            ],
        })
        .await;
    lab.wait_ready(n).await;
    let node_ns = lab.nodes[n].name().to_string();
    let mut pods: Vec<Pod> = ["a", "b", "c", "d"]
        .iter()
        .map(|p| lab.add_pod(n, p))
        .collect();

    // Pod e, wired by hand the way aws-node's plugin does: host veth
    // "eni" + 11 hex digits, /32 in the pod, gateway 169.254.1.1, host
    // route, `to` rule at 512 and, off the primary interface, `from` rule
    // at 1536.
    let e_id = format!("{}-e", lab.prefix);
    let e_ip = lab.reserve(n, &e_id).await;
    let e_table = lab.lookup(n, &e_id).await.interface.unwrap().route_table;
    let e_ns = Netns::new(&format!("{}-e", lab.prefix));
    let e_veth = format!("eni{:011x}", std::process::id());
    ip(&[
        "-n", &node_ns, "link", "add", &e_veth, "type", "veth", "peer", "name", "eth0", "netns",
        &e_ns.name,
    ]);
    let host_mac = ip_out(&node_ns, &["-br", "link", "show", &e_veth])
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    let e_cidr = format!("{e_ip}/32");
    let e_ip_s = e_ip.to_string();
    ip(&["-n", &e_ns.name, "link", "set", "lo", "up"]);
    ip(&["-n", &e_ns.name, "addr", "add", &e_cidr, "dev", "eth0"]);
    ip(&["-n", &e_ns.name, "link", "set", "eth0", "up"]);
    ip(&[
        "-n",
        &e_ns.name,
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    ip(&[
        "-n",
        &e_ns.name,
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &e_ns.name,
        "neigh",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "lladdr",
        &host_mac,
        "nud",
        "permanent",
    ]);
    ip(&["-n", &node_ns, "link", "set", &e_veth, "up"]);
    ip(&[
        "-n", &node_ns, "route", "add", &e_cidr, "dev", &e_veth, "scope", "link",
    ]);
    ip(&[
        "-n", &node_ns, "rule", "add", "to", &e_ip_s, "lookup", "main", "prio", "512",
    ]);
    if e_table != 254 {
        let t = e_table.to_string();
        ip(&[
            "-n", &node_ns, "rule", "add", "from", &e_ip_s, "lookup", &t, "prio", "1536",
        ]);
    }
    let on_secondary = pods
        .iter()
        .filter(|p| p.result["ips"][0]["gateway"].is_string())
        .count();
    udp_probe(&pods[0].ns.path(), &e_ns.path(), e_ip).expect("a reaches the hand-wired pod");

    // Make the node aws-node's: its checkpoint, its tags on the secondary
    // interfaces, no ipamd journal.
    let mut expected: BTreeMap<String, Ipv4Addr> = pods
        .iter()
        .map(|p| (p.container_id.clone(), p.ip))
        .collect();
    expected.insert(e_id.clone(), e_ip);
    let allocations: Vec<Value> = expected
        .iter()
        .map(|(cid, ip)| {
            json!({
                "networkName": "aws-cni",
                "containerID": cid,
                "ifName": "eth0",
                "sandbox": format!("/var/run/netns/{cid}"),
                "ipv4": ip.to_string(),
                "allocationTimestamp": 1_764_000_000,
                "metadata": {"k8sPodNamespace": "shop", "k8sPodName": cid.to_lowercase()},
            })
        })
        .collect();
    lab.stop_ipamd(n);
    std::fs::write(
        &checkpoint,
        json!({"version": "vpc-cni-ipam/1", "allocations": allocations}).to_string(),
    )
    .unwrap();
    std::fs::remove_file(lab.nodes[n].state_dir().join("ipamd.journal")).unwrap();
    let instance = lab.nodes[n].instance_id.clone();
    let state = lab.vpc.snapshot();
    let mut retagged = 0;
    for i in state.interfaces.values() {
        if i.attachment
            .as_ref()
            .is_some_and(|a| a.instance_id == instance && a.device_index > 0)
        {
            lab.vpc
                .handle(vpc_sim::Request::SetInterfaceTags {
                    interface_id: i.id.clone(),
                    tags: [
                        (
                            "node.k8s.amazonaws.com/instance_id".to_string(),
                            instance.clone(),
                        ),
                        (
                            "node.k8s.amazonaws.com/createdAt".to_string(),
                            "2026-11-01T00:00:00Z".to_string(),
                        ),
                    ]
                    .into(),
                })
                .await
                .unwrap();
            retagged += 1;
        }
    }
    assert!(
        retagged >= 1 && on_secondary + usize::from(e_table != 254) >= 1,
        "a pod on a secondary interface"
    );
    let before = wiring(&node_ns);

    // ipamd's first start: the checkpoint is imported.
    lab.restart_ipamd(n).await;
    lab.wait_ready(n).await;
    let log = lab.node_ipamd_log(n);
    assert!(log.contains("imported aws-node's allocations"), "{log}");
    assert!(
        !log.contains("keeping them, adding none"),
        "aws-node's interfaces are taken over, not frozen:\n{log}"
    );
    for (cid, ip) in &expected {
        let r = lab.lookup(n, cid).await;
        assert!(r.found, "{cid} lost its address:\n{log}");
        assert_eq!(r.ipv4_address, ip.to_string(), "{cid}");
    }
    assert_eq!(wiring(&node_ns), before, "routes and rules changed");
    for p in &pods {
        udp_probe(&p.ns.path(), &e_ns.path(), e_ip).unwrap_or_else(|err| {
            panic!(
                "{} -> e after the move: {err}\n{}",
                p.container_id,
                lab.diagnose()
            )
        });
    }

    // New pods get other addresses and reach the migrated ones.
    let f = lab.add_pod(n, "f");
    assert!(
        !expected.values().any(|ip| *ip == f.ip),
        "{} handed out again",
        f.ip
    );
    udp_probe(&f.ns.path(), &e_ns.path(), e_ip).expect("f reaches e");
    udp_probe(&e_ns.path(), &f.ns.path(), f.ip).expect("e reaches f");

    // vpc-cni's DEL of the hand-wired pod (aws-node's veth name): its rules
    // go, its address is released.
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": e_veth}, {"name": "eth0", "sandbox": e_ns.path()}],
        "ips": [{"address": e_cidr, "interface": 1}],
    });
    let r = lab.del_attachment(n, &e_id, &e_ns.path().display().to_string(), &prev);
    assert!(r.ok, "DEL of a migrated pod: {} {}", r.stdout, r.stderr);
    assert!(!lab.lookup(n, &e_id).await.found);
    let rules = ip_out(&node_ns, &["rule"]);
    assert!(
        !rules.contains(&format!("{e_ip} ")) && !rules.contains(&format!("{e_ip}\n")),
        "{rules}"
    );
    drop(e_ns);

    // And the plugin's own pods go as usual.
    let r = lab.del_pod(f);
    assert!(r.ok, "{}", r.stderr);
    while let Some(p) = pods.pop() {
        let r = lab.del_pod(p);
        assert!(r.ok, "{}", r.stderr);
    }
}
