//! End to end in network namespaces: a simulated VPC, two nodes running the
//! real ipamd, pods wired by the real vpc-cni. Needs root (CI is root); it
//! fails, never skips, when it cannot set up.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;
use vpc_cni_e2e::*;

fn node_env() -> Vec<(&'static str, String)> {
    vec![(
        "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
        EXCLUDED_CIDR.to_string(),
    )]
}

async fn route_table_of(lab: &Lab, pod: &Pod) -> u32 {
    let r = lab.lookup(pod.node, &pod.container_id).await;
    assert!(r.found);
    r.interface.unwrap().route_table
}

/// The route a packet of pod `from` (on `node`) to `to` takes: `ip route
/// get TO from FROM iif <from's host veth>`.
fn route_from(lab: &Lab, node: usize, from: &Pod, to: Ipv4Addr) -> String {
    ip_out(
        &lab.nodes[node].ns.name,
        &[
            "route",
            "get",
            &to.to_string(),
            "from",
            &from.ip.to_string(),
            "iif",
            &host_veth(from),
        ],
    )
}

fn host_veth(pod: &Pod) -> String {
    pod.result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The same rules with ipamd's Azure provider: two VMs of an Azure size,
/// their pools kept as ip-configurations of their NICs through the fake ARM
/// and IMDS (backed by the same simulated VPC, reached at 169.254.169.254
/// through the subnet's router). VM b's pods are on its primary NIC, in the
/// main table; VM a was created with a second NIC, and once its primary
/// NIC's 255 addresses are taken its pods are on the second, in that NIC's
/// own table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_azure_vms_pods_follow_the_kubernetes_networking_rules() {
    let mut lab = Lab::on(Cloud::Azure).await;
    let prefix = lab.prefix.clone();
    let mut env = node_env();
    env.push(("IPAM_SCALER_BATCH_SIZE", "4".to_string()));
    // The primary NIC's 255 and one more, from the start.
    let mut env_a = node_env();
    env_a.push(("WARM_IP_TARGET", "256".to_string()));
    let a = lab
        .add_node_with_nics(
            NodeSpec {
                name: "a",
                instance_type: "Standard_D2s_v3",
                env: env_a,
            },
            1,
        )
        .await;
    let b = lab
        .add_node(NodeSpec {
            name: "b",
            instance_type: "Standard_D2s_v3",
            env,
        })
        .await;
    // Attachments that are not wired pods fill VM a's primary NIC (the
    // fullest interface is served first).
    for i in 0..255 {
        lab.reserve(a, &format!("held-{i}")).await;
    }
    let mut pods = vec![];
    for (node, n) in [(a, "a"), (b, "b")] {
        for i in 0..3 {
            pods.push(lab.add_pod(node, &format!("{n}{i}")));
        }
    }
    for (i, p) in pods.iter().enumerate() {
        let table = route_table_of(&lab, p).await;
        if p.node == a {
            assert_ne!(table, 254, "pod {i} should be on VM a's second NIC");
        } else {
            assert_eq!(table, 254, "pod {i} on the primary NIC uses the main table");
        }
    }
    // The addresses are ip-configurations of the VMs' NICs, made through
    // ARM (PUTs), never EC2-style assigns or attaches by ipamd.
    let (fake, _) = lab.arm.as_ref().unwrap();
    let counts = fake.counts();
    assert!(counts.writes >= 2 && counts.imds >= 2, "{counts:?}");
    let (calls, _) = lab.vpc.call_counts();
    assert_eq!(calls.get("AttachNetworkInterface"), None, "{calls:?}");
    let st = lab.vpc.snapshot();
    for p in &pods {
        let node = &lab.nodes[p.node];
        let nic = st
            .interfaces
            .values()
            .find(|e| e.secondary_ips.contains(&p.ip))
            .unwrap_or_else(|| panic!("{} on no NIC", p.ip));
        let at = nic.attachment.as_ref().unwrap();
        assert_eq!(at.instance_id, node.instance_id);
        assert_eq!(at.device_index, if p.node == a { 1 } else { 0 }, "{}", p.ip);
    }
    // Pod to pod on a node and across nodes, without NAT.
    for (x, y) in [(0, 1), (0, 3), (3, 0), (2, 5), (4, 1)] {
        let seen = udp_probe(&pods[x].ns.path(), &pods[y].ns.path(), pods[y].ip)
            .unwrap_or_else(|e| panic!("pod {x} -> pod {y}: {e}\n{}", lab.diagnose()));
        assert_eq!(seen, pods[x].ip, "pod {x} -> pod {y} was NATed");
    }
    // A pod on the second NIC leaves through that NIC's table.
    let route = route_from(&lab, a, &pods[0], pods[3].ip);
    assert!(
        route.contains("dev eth1"),
        "second-NIC pod does not use its table: {route}"
    );
    // The node reaches its pods; leaving the VPC is SNATed to the node,
    // from either NIC.
    udp_probe(&lab.nodes[a].ns.path(), &pods[0].ns.path(), pods[0].ip).expect("node -> pod");
    let seen = udp_probe(&pods[1].ns.path(), &lab.outside.path(), INTERNET_HOST).unwrap();
    assert_eq!(
        seen, lab.nodes[a].primary_ip,
        "second-NIC pod -> internet not SNATed"
    );
    let seen = udp_probe(&pods[4].ns.path(), &lab.outside.path(), INTERNET_HOST).unwrap();
    assert_eq!(seen, lab.nodes[b].primary_ip, "pod -> internet not SNATed");
    let seen = udp_probe(&pods[1].ns.path(), &lab.outside.path(), EXCLUDED_HOST).unwrap();
    assert_eq!(seen, pods[1].ip, "traffic to an excluded CIDR was SNATed");
    for p in pods {
        let r = lab.del_pod(p);
        assert!(r.ok, "DEL: {} {}", r.stdout, r.stderr);
    }
    drop(lab);
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_three_pods_follow_the_kubernetes_networking_rules() {
    let mut lab = Lab::new().await;
    let prefix = lab.prefix.clone();
    // t3.small: three addresses per interface. One attachment that is not
    // a wired pod fills the primary interface's first address, so each
    // node's third pod lands on a secondary interface.
    let a = lab
        .add_node(NodeSpec {
            name: "a",
            instance_type: "t3.small",
            env: node_env(),
        })
        .await;
    let b = lab
        .add_node(NodeSpec {
            name: "b",
            instance_type: "t3.small",
            env: node_env(),
        })
        .await;
    lab.reserve(a, "held-a").await;
    lab.reserve(b, "held-b").await;
    let mut pods = vec![];
    for (node, n) in [(a, "a"), (b, "b")] {
        for i in 0..3 {
            pods.push(lab.add_pod(node, &format!("{n}{i}")));
        }
    }
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    eprintln!("pods: {ips:?}");
    for (i, p) in pods.iter().enumerate() {
        let table = route_table_of(&lab, p).await;
        if i % 3 == 2 {
            assert_ne!(table, 254, "pod {i} should be on a secondary interface");
        } else {
            assert_eq!(table, 254, "pod {i} should be on the primary interface");
        }
    }

    // Pod to pod on one node, without NAT.
    assert_eq!(
        udp_probe(&pods[0].ns.path(), &pods[1].ns.path(), pods[1].ip).unwrap(),
        pods[0].ip
    );
    assert_eq!(
        udp_probe(&pods[2].ns.path(), &pods[0].ns.path(), pods[0].ip).unwrap(),
        pods[2].ip
    );
    // Pod to pod across nodes, without NAT: primary and secondary interfaces both ways.
    for (x, y) in [(0, 3), (3, 0), (2, 5), (5, 2), (2, 4), (4, 1)] {
        let seen = udp_probe(&pods[x].ns.path(), &pods[y].ns.path(), pods[y].ip)
            .unwrap_or_else(|e| panic!("pod {x} -> pod {y}: {e}\n{}", lab.diagnose()));
        assert_eq!(seen, pods[x].ip, "pod {x} -> pod {y} was NATed");
    }
    // The node reaches its pods.
    for p in [&pods[0], &pods[2]] {
        udp_probe(&lab.nodes[a].ns.path(), &p.ns.path(), p.ip).expect("node -> pod");
    }
    // Leaving the VPC: SNATed to the node's primary IP, from either interface.
    for p in [&pods[0], &pods[2], &pods[4]] {
        let seen = udp_probe(&p.ns.path(), &lab.outside.path(), INTERNET_HOST).unwrap();
        assert_eq!(
            seen, lab.nodes[p.node].primary_ip,
            "pod {} -> internet not SNATed to its node",
            p.ip
        );
    }
    // An excluded CIDR sees the pod's own address.
    for p in [&pods[1], &pods[2]] {
        let seen = udp_probe(&p.ns.path(), &lab.outside.path(), EXCLUDED_HOST).unwrap();
        assert_eq!(seen, p.ip, "traffic to an excluded CIDR was SNATed");
    }
    // A pod on a secondary interface leaves through that interface's table.
    let route = route_from(&lab, a, &pods[2], pods[3].ip);
    assert!(
        route.contains("dev eth1"),
        "secondary-interface pod does not use its table: {route}"
    );
    let route = route_from(&lab, a, &pods[0], pods[3].ip);
    assert!(
        route.contains("dev eth0"),
        "primary-interface pod should use the main table: {route}"
    );

    // CHECK passes on a wired pod.
    let mut conf = lab.netconf(a, "1.0.0");
    conf["prevResult"] = pods[2].result.clone();
    let r = lab.invoke(
        a,
        &lab.bins.vpc_cni(),
        "CHECK",
        &pods[2].container_id,
        &pods[2].ns.path().display().to_string(),
        "eth0",
        &conf,
        &[],
    );
    assert!(r.ok, "CHECK: {} {}", r.stdout, r.stderr);

    // Each veth end has one TX and one RX queue (vethQueues' default), not
    // one per CPU.
    let details = ip_out(
        &lab.nodes[a].ns.name,
        &["-d", "link", "show", &host_veth(&pods[0])],
    );
    assert!(
        details.contains("numtxqueues 1 numrxqueues 1"),
        "host veth queues: {details}"
    );
    let details = ip_out(&pods[0].ns.name, &["-d", "link", "show", "eth0"]);
    assert!(
        details.contains("numtxqueues 1 numrxqueues 1"),
        "pod veth queues: {details}"
    );

    // A host veth of the same name left by an interrupted ADD is replaced.
    let node_ns = lab.nodes[a].ns.name.clone();
    let stale = vpc_cni::spec::host_veth_name("eni", &format!("{prefix}-again"), "eth0");
    ip(&[
        "-n",
        &node_ns,
        "link",
        "add",
        &stale,
        "type",
        "veth",
        "peer",
        "name",
        "stalepeer",
    ]);
    let again = lab.add_pod(a, "again");
    let links = ip_out(&node_ns, &["link"]);
    assert!(
        links.contains(&stale) && !links.contains("stalepeer"),
        "the stale veth was not replaced:\n{links}"
    );
    assert!(ip_out(&again.ns.name, &["link"]).contains("eth0"));
    let mut pods = pods;
    pods.push(again);

    // DEL every pod: no rule, route or veth of theirs remains.
    for p in pods {
        let (node, ip, veth) = (p.node, p.ip, host_veth(&p));
        let r = lab.del_pod(p);
        assert!(r.ok, "DEL: {} {}", r.stdout, r.stderr);
        let ns = &lab.nodes[node].ns.name;
        let rules = ip_out(ns, &["rule"]);
        assert!(
            !rules.contains(&format!("{ip} ")),
            "rule for {ip} left behind:\n{rules}"
        );
        assert!(
            !ip_out(ns, &["route"]).contains(&format!("{ip} ")),
            "route to {ip} left behind"
        );
        // The kernel destroys a namespace (and the veth in it) asynchronously.
        let mut tries = 0;
        while ip_out(ns, &["link"]).contains(&veth) {
            tries += 1;
            assert!(tries < 300, "{veth} left behind");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    drop(lab);
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_in_the_middle_of_add_leaves_nothing_behind() {
    let mut lab = Lab::new().await;
    let prefix = lab.prefix.clone();
    let a = lab
        .add_node(NodeSpec {
            name: "a",
            instance_type: "t3.small",
            env: node_env(),
        })
        .await;
    lab.reserve(a, "held").await;
    lab.reserve(a, "held2").await;
    lab.reserve(a, "held3").await;
    // The pod's address now comes from a secondary interface: all of
    // ADD's steps run, the from-rule included.
    for step in ["veth", "pod", "host-route", "rule-to", "rule-from"] {
        let ns = Netns::new(&format!("{prefix}-f{step}"));
        let id = format!("{prefix}-fail-{step}");
        let conf = lab.netconf(a, "1.0.0");
        let r = lab.invoke(
            a,
            &lab.bins.vpc_cni(),
            "ADD",
            &id,
            &ns.path().display().to_string(),
            "eth0",
            &conf,
            &[("VPC_CNI_FAIL_AFTER", step)],
        );
        assert!(!r.ok, "ADD with a failure after {step} succeeded");
        let err: Value = r.json();
        assert_eq!(err["code"], 999, "{}", r.stdout);
        assert!(
            err["details"].as_str().unwrap().contains(step),
            "{}",
            r.stdout
        );
        let node = &lab.nodes[a].ns.name;
        // The pool may attach interfaces meanwhile (with rules of their own);
        // what must not remain is anything of the pod's.
        let interface_ips: Vec<String> = lab
            .vpc
            .snapshot()
            .interfaces
            .values()
            .filter(|e| {
                e.attachment
                    .as_ref()
                    .is_some_and(|x| x.instance_id == lab.nodes[a].instance_id)
            })
            .map(|e| e.primary_ip.to_string())
            .collect();
        let rules = ip_out(node, &["rule"]);
        for l in rules.lines() {
            assert!(
                !l.starts_with("512:"),
                "pod rule left after failing at {step}: {l}"
            );
            if l.starts_with("1536:") {
                assert!(
                    interface_ips
                        .iter()
                        .any(|ip| l.contains(&format!("from {ip} "))),
                    "pod rule left after failing at {step}: {l}"
                );
            }
        }
        let routes = ip_out(node, &["route"]);
        assert!(
            !routes.contains(" dev eni"),
            "pod route left after failing at {step}:\n{routes}"
        );
        let veth = vpc_cni::spec::host_veth_name("eni", &id, "eth0");
        assert!(
            !ip_out(node, &["link"]).contains(&veth),
            "veth left after failing at {step}"
        );
        assert!(
            !ip_out(&ns.name, &["link"]).contains("eth0"),
            "pod interface left after failing at {step}"
        );
        // ipamd no longer holds an address for the attachment.
        let held = lab.lookup(a, &id).await;
        assert!(
            !held.found,
            "address still assigned after failing at {step}"
        );
    }
    drop(lab);
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
}

/// The namespaces of vpc-lab's run with process `pid`.
fn namespaces_of_run(pid: u32) -> Vec<String> {
    leftovers::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("vcni{pid}s")))
        .collect()
}

/// Whether process `pid` is gone (a zombie, never reaped where PID 1 does
/// not reap, counts as gone).
fn gone(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Starts the main job and waits until both of its nodes run ipamd;
/// returns it with the ipamd processes in its namespaces.
fn start_vpc_lab() -> (std::process::Child, Vec<String>) {
    use std::io::BufRead;
    let bin = Bins::find().dir.join("vpc-lab");
    let mut lab = std::process::Command::new(&bin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let mut lines = std::io::BufReader::new(lab.stdout.take().unwrap()).lines();
    // "   node node-a (...), ipamd on ...": printed once both nodes run.
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.starts_with("   node ")),
        "vpc-lab ended before its nodes ran"
    );
    // Read on, or its next line would fail on a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let ipamds: Vec<String> = namespaces_of_run(lab.id())
        .iter()
        .flat_map(|ns| {
            let out = std::process::Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .expect("ip netns pids");
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        // Not a plugin being run meanwhile.
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "ipamd")
        })
        .collect();
    assert_eq!(ipamds.len(), 2, "one ipamd per node: {ipamds:?}");
    (lab, ipamds)
}

/// The main job killed at the worst moment (both nodes running, pods
/// coming): its ipamd processes die with it (no orphan retrying a gone
/// VPC), and the next lab removes the namespaces and temporary directory
/// it left. Interrupted (SIGTERM), it removes everything itself.
#[test]
fn a_killed_vpc_lab_leaves_no_process_and_the_next_lab_removes_its_namespaces() {
    require_root();
    let (mut lab, ipamds) = start_vpc_lab();
    let pid = lab.id();
    lab.kill().unwrap();
    lab.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !ipamds.iter().all(|p| gone(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ipamds.iter().all(|p| gone(p)),
        "ipamd outlived the killed lab: {ipamds:?}"
    );
    // What a new lab does first (a concurrent test's lab may have done it).
    leftovers::remove_gone_runs();
    assert_eq!(namespaces_of_run(pid), Vec::<String>::new());
    let tmp: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("vcni{pid}s")))
        .collect();
    assert_eq!(tmp, Vec::<String>::new(), "temporary directories left");

    let (lab, ipamds) = start_vpc_lab();
    let pid = lab.id();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let out = lab.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "vpc-lab on SIGTERM");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "output after the signal: {err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !ipamds.iter().all(|p| gone(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ipamds.iter().all(|p| gone(p)), "{ipamds:?}");
    assert_eq!(namespaces_of_run(pid), Vec::<String>::new());
}
