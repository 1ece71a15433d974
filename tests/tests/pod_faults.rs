//! Faults that harm live pods or leak addresses (late DEL, GC without a
//! list, DEL while ipamd is down, names the kernel refuses), each replayed
//! through the real binaries as a runtime would cause it.

use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use vpc_cni_e2e::*;

fn rules_of(lab: &Lab, node: usize) -> String {
    ip_out(&lab.nodes[node].ns.name, &["rule"])
}

fn has_to_rule(rules: &str, ip: std::net::Ipv4Addr) -> bool {
    rules.contains(&format!("to {ip} lookup main"))
}

fn has_from_rule(rules: &str, ip: std::net::Ipv4Addr) -> bool {
    rules.contains(&format!("from {ip} lookup "))
}

fn check(lab: &Lab, pod: &Pod) -> Invocation {
    let mut conf = lab.netconf(pod.node, "1.0.0");
    conf["prevResult"] = pod.result.clone();
    lab.invoke(
        pod.node,
        &lab.bins.vpc_cni(),
        "CHECK",
        &pod.container_id,
        &pod.ns.path().display().to_string(),
        "eth0",
        &conf,
        &[],
    )
}

/// ADD old (A), DEL old, ADD new (A again: no cooldown), then DEL old again
/// with its prevResult, with ipamd up and with ipamd down: new's rules and
/// route stay, and CHECK of new passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_del_leaves_the_addresses_new_holder_alone() {
    let mut lab = Lab::new().await;
    let prefix = lab.prefix.clone();
    let a = lab
        .add_node(NodeSpec {
            name: "a",
            instance_type: "t3.small",
            env: vec![("IP_COOLDOWN_PERIOD", "0".to_string())],
        })
        .await;
    // Fill the primary interface so the pods land on a secondary one: then
    // both rules (to ... lookup main, from ... lookup <table>) are at stake.
    for i in 0..3 {
        lab.reserve(a, &format!("held{i}")).await;
    }
    let old = lab.add_pod(a, "old");
    let addr = old.ip;
    assert!(
        has_from_rule(&rules_of(&lab, a), addr),
        "old should sit on a secondary interface:\n{}",
        rules_of(&lab, a)
    );
    let (old_id, old_netns, old_result) = (
        old.container_id.clone(),
        old.ns.path().display().to_string(),
        old.result.clone(),
    );
    let r = lab.del_pod(old);
    assert!(r.ok, "DEL old: {} {}", r.stdout, r.stderr);
    let new = lab.add_pod(a, "new");
    assert_eq!(
        new.ip, addr,
        "with no cooldown, new should get old's address back"
    );
    let r = check(&lab, &new);
    assert!(r.ok, "CHECK new before the late DEL: {}", r.stdout);

    // The runtime retries old's DEL.
    let r = lab.del_attachment(a, &old_id, &old_netns, &old_result);
    assert!(r.ok, "late DEL must succeed: {} {}", r.stdout, r.stderr);
    let rules = rules_of(&lab, a);
    assert!(
        has_to_rule(&rules, addr) && has_from_rule(&rules, addr),
        "a late DEL of old removed new's rules:\n{rules}"
    );
    let r = check(&lab, &new);
    assert!(r.ok, "CHECK new after the late DEL: {}", r.stdout);

    // Again with ipamd down: the plugin tears down from prevResult alone.
    lab.stop_ipamd(a);
    let r = lab.del_attachment(a, &old_id, &old_netns, &old_result);
    assert!(r.ok, "late DEL with ipamd down: {} {}", r.stdout, r.stderr);
    let rules = rules_of(&lab, a);
    assert!(
        has_to_rule(&rules, addr) && has_from_rule(&rules, addr),
        "a late DEL with ipamd down removed new's rules:\n{rules}"
    );
    let routes = ip_out(&lab.nodes[a].ns.name, &["route"]);
    assert!(
        routes.contains(&format!("{addr} dev ")),
        "new's host route went:\n{routes}"
    );
    lab.restart_ipamd(a).await;
    let r = check(&lab, &new);
    assert!(r.ok, "CHECK new after both late DELs: {}", r.stdout);

    // A DEL whose prevResult names an interface's own primary address (a
    // bad or foreign prevResult) leaves ipamd's rule for that interface,
    // with ipamd up and down.
    let instance = lab.nodes[a].instance_id.clone();
    let eth1 = lab
        .vpc
        .snapshot()
        .interfaces
        .values()
        .find(|i| {
            i.attachment
                .as_ref()
                .is_some_and(|t| t.instance_id == instance && t.device_index == 1)
        })
        .map(|i| i.primary_ip)
        .expect("eth1");
    let ghost = json!({"cniVersion": "1.0.0", "ips": [{"address": format!("{eth1}/32")}]});
    for down in [false, true] {
        if down {
            lab.stop_ipamd(a);
        }
        let r = lab.del_attachment(a, "ghost", "", &ghost);
        assert!(r.ok, "DEL ghost: {} {}", r.stdout, r.stderr);
        assert!(
            has_from_rule(&rules_of(&lab, a), eth1),
            "a DEL (ipamd down: {down}) removed the rule of eth1's own address:\n{}",
            rules_of(&lab, a)
        );
    }
    lab.restart_ipamd(a).await;

    // new's own DEL still removes everything of new.
    let r = lab.del_pod(new);
    assert!(r.ok, "DEL new: {}", r.stdout);
    let rules = rules_of(&lab, a);
    assert!(
        !has_to_rule(&rules, addr) && !has_from_rule(&rules, addr),
        "DEL new left its rules:\n{rules}"
    );
    drop(lab);
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
}

/// A GC without a list of valid attachments releases nothing; the early
/// spec text's key is read as the same list; ipamd refuses a GC that does
/// not say its list is complete; ipamd refuses names the plugin refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_releases_only_what_it_is_told_is_stale() {
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
    let p1 = lab.add_pod(a, "p1");
    let p2 = lab.add_pod(a, "p2");

    let r = lab.invoke(a, &cni, "GC", "", "", "", &conf11, &[]);
    assert!(!r.ok, "GC without a list succeeded: {}", r.stdout);
    assert_eq!(r.json()["code"], 7, "{}", r.stdout);
    for p in [&p1, &p2] {
        assert!(
            lab.lookup(a, &p.container_id).await.found,
            "GC without a list released {}",
            p.container_id
        );
        let rules = rules_of(&lab, a);
        assert!(has_to_rule(&rules, p.ip), "GC removed a rule:\n{rules}");
    }

    // ipamd itself refuses a list not said to be complete.
    let mut c = ipamd_api::client(&lab.nodes[a].socket).await.unwrap();
    let e = c
        .garbage_collect(ipamd_api::v1::GarbageCollectRequest {
            network_name: "vpc-cni".into(),
            valid: vec![],
            valid_is_complete: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(lab.lookup(a, &p1.container_id).await.found);

    // ... and names the plugin refuses, before assigning anything.
    let e = c
        .add_network(ipamd_api::v1::AddNetworkRequest {
            network_name: "vpc-cni".into(),
            container_id: "bad".into(),
            ifname: "eth:0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("eth:0"), "{e}");

    // The early key names the valid list: p1 stays, p2 goes.
    let mut gc = conf11.clone();
    gc["cni.dev/attachments"] = json!([{"containerID": p1.container_id, "ifname": "eth0"}]);
    let r = lab.invoke(a, &cni, "GC", "", "", "", &gc, &[]);
    assert!(
        r.ok,
        "GC with cni.dev/attachments: {} {}",
        r.stdout, r.stderr
    );
    assert!(lab.lookup(a, &p1.container_id).await.found, "GC freed p1");
    assert!(!lab.lookup(a, &p2.container_id).await.found, "GC kept p2");
    let rules = rules_of(&lab, a);
    assert!(
        has_to_rule(&rules, p1.ip) && !has_to_rule(&rules, p2.ip),
        "{rules}"
    );
    drop((p1, p2));
    drop(lab);
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
}

/// ADD, stop ipamd, DEL (from prevResult), the runtime deletes the
/// namespace and a new one appears at the same path (as /proc/<pid>/ns/net
/// does when the pid is reused), start ipamd: with default settings the
/// address is reclaimed, judged by the namespace's identity; a live pod's
/// is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_while_ipamd_is_down_leaks_nothing_even_when_the_path_is_reused() {
    let mut lab = Lab::new().await;
    let prefix = lab.prefix.clone();
    let a = lab
        .add_node(NodeSpec {
            name: "a",
            instance_type: "m5.large",
            env: vec![],
        })
        .await;
    let live = lab.add_pod(a, "live");
    let gone = lab.add_pod(a, "gone");
    let (gone_id, gone_ns) = (gone.container_id.clone(), gone.ns.name.clone());
    lab.stop_ipamd(a);
    let r = lab.del_pod(gone);
    assert!(r.ok, "DEL with ipamd down: {} {}", r.stdout, r.stderr);
    // Another namespace now lives at the same path.
    let reused = Netns::new(&gone_ns);
    lab.restart_ipamd(a).await;
    let mut freed = false;
    for _ in 0..100 {
        if !lab.lookup(a, &gone_id).await.found {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        freed,
        "the address of a pod whose namespace was replaced leaked:\n{}",
        lab.node_ipamd_log(a)
    );
    assert!(
        lab.lookup(a, &live.container_id).await.found,
        "a live pod's address was reclaimed"
    );
    drop((live, reused));
    drop(lab);
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
}

/// Names the kernel or the spec refuse get code 4 (environment) or 7
/// (configuration) before the plugin does anything: ipamd is never called.
#[test]
fn bad_names_are_refused_before_any_side_effect() {
    let bins = Bins::find();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipamd.sock");
    // A stand-in for ipamd that only counts who connects.
    let grpc = UnixListener::bind(&socket).unwrap();
    let fast = UnixListener::bind(ipamd_api::fast::path(&socket)).unwrap();
    grpc.set_nonblocking(true).unwrap();
    fast.set_nonblocking(true).unwrap();
    let netns = dir.path().join("netns");
    std::fs::write(&netns, "").unwrap();
    let netns = netns.display().to_string();
    let run = |container: &str, ns: &str, ifname: &str, name: &str| -> Value {
        use std::io::Write;
        let conf = json!({
            "cniVersion": "1.0.0", "name": name, "type": "vpc-cni",
            "ipamdSocket": socket, "logFile": "",
        });
        let mut child = Command::new(bins.vpc_cni())
            .env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", ns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success());
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    for ifname in ["eth:0", ".", "..", "eth\t0", "eth 0", "a-name-too-long-x"] {
        let e = run("c1", &netns, ifname, "vpc-cni");
        assert_eq!(e["code"], 4, "ifname {ifname:?}: {e}");
    }
    for id in ["-c", "c 1", "c/1", "c:1", "c\u{e9}"] {
        let e = run(id, &netns, "eth0", "vpc-cni");
        assert_eq!(e["code"], 4, "container id {id:?}: {e}");
    }
    let e = run("c1", "relative/ns", "eth0", "vpc-cni");
    assert_eq!(e["code"], 4, "relative netns: {e}");
    let e = run("c1", "/nonexistent/netns", "eth0", "vpc-cni");
    assert_eq!(e["code"], 4, "missing netns: {e}");
    // Paths that are not a pod's network namespace: a plain file, a
    // directory, and the plugin's own namespace (the node's).
    for ns in [netns.as_str(), "/tmp", "/proc/self/ns/net"] {
        let e = run("c1", ns, "eth0", "vpc-cni");
        assert_eq!(e["code"], 4, "netns {ns}: {e}");
    }
    let e = run("c1", &netns, "eth\u{a0}", "vpc-cni");
    assert_eq!(e["code"], 4, "ifname with U+00A0: {e}");
    let long = "c".repeat(300);
    let e = run(&long, &netns, "eth0", "vpc-cni");
    assert_eq!(e["code"], 4, "a 300-byte container id: {e}");
    let e = run("c1", &netns, "eth0", "my net");
    assert_eq!(e["code"], 7, "network name: {e}");
    assert_eq!(e["cniVersion"], "1.0.0", "answered in another version: {e}");
    for l in [&grpc, &fast] {
        assert!(
            l.accept().is_err(),
            "the plugin called ipamd although its input was refused"
        );
    }
}
