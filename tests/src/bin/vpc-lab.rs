//! vpc-lab: the main job. A simulated VPC in network namespaces with two
//! nodes running ipamd; pods on both wired by vpc-cni; then they talk, and
//! everything is removed again. Needs root.

use std::time::Duration;

use vpc_cni_e2e::*;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Interrupted (Ctrl-C, SIGTERM, a closed terminal): no Drop runs, so
    // the lab is removed by name, its ipamd processes with it, before
    // exiting.
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        let code = tokio::select! {
            _ = int.recv() => 130,
            _ = term.recv() => 143,
            _ = hup.recv() => 129,
        };
        // The main thread goes on until the exit: its output (checks, or
        // panics as its namespaces vanish) would read as the lab's result.
        // Holding both streams (reentrant for this thread) silences it;
        // a panic's message bypasses the lock, so panics are silenced too.
        std::panic::set_hook(Box::new(|_| {}));
        std::mem::forget(std::io::stdout().lock());
        std::mem::forget(std::io::stderr().lock());
        eprintln!("vpc-lab: interrupted, removing the lab");
        leftovers::remove_this_run();
        std::process::exit(code);
    });
    let mut lab = Lab::new().await;
    println!(
        "== simulated VPC 10.0.0.0/16 in namespace {} (outside world: {})",
        lab.vpc_ns.name, lab.outside.name
    );
    let env = || {
        vec![(
            "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
            EXCLUDED_CIDR.to_string(),
        )]
    };
    let a = lab
        .add_node(NodeSpec {
            name: "node-a",
            instance_type: "t3.small",
            env: env(),
        })
        .await;
    let b = lab
        .add_node(NodeSpec {
            name: "node-b",
            instance_type: "t3.small",
            env: env(),
        })
        .await;
    for n in &lab.nodes {
        println!(
            "   node {} ({}, t3.small), primary IP {}, ipamd on {}",
            n.name(),
            n.instance_id,
            n.primary_ip,
            n.socket.display()
        );
    }
    let mut pods = vec![];
    for (node, tag) in [(a, "a"), (b, "b")] {
        for i in 1..=4 {
            pods.push(lab.add_pod(node, &format!("pod-{tag}{i}")));
        }
    }
    println!("== 8 pods wired by vpc-cni (the 4th on each node takes an address of a secondary interface)");
    for p in &pods {
        let veth = p.result["interfaces"][0]["name"].as_str().unwrap_or("?");
        println!(
            "   {:<24} {:<12} on {} via {veth}",
            p.ns.name,
            p.ip,
            lab.nodes[p.node].name()
        );
    }
    println!("== traffic (the receiver reports the source address it saw)");
    // What failed: the demo exits 1 if anything did, after cleaning up.
    let failed = std::cell::Cell::new(0u32);
    let show = |what: &str, r: Result<std::net::Ipv4Addr, String>| match r {
        Ok(src) => println!("   {what:<52} ok, seen from {src}"),
        Err(e) => {
            failed.set(failed.get() + 1);
            println!("   {what:<52} FAILED: {e}");
        }
    };
    let (p, q) = (&pods[0], &pods[1]);
    show(
        &format!("{} -> {} (same node)", p.ip, q.ip),
        udp_probe(&p.ns.path(), &q.ns.path(), q.ip),
    );
    for (x, y) in [(0, 4), (3, 7), (7, 0)] {
        let (p, q) = (&pods[x], &pods[y]);
        show(
            &format!("{} -> {} (across nodes)", p.ip, q.ip),
            udp_probe(&p.ns.path(), &q.ns.path(), q.ip),
        );
    }
    show(
        &format!("node {} -> {}", lab.nodes[a].primary_ip, pods[0].ip),
        udp_probe(&lab.nodes[a].ns.path(), &pods[0].ns.path(), pods[0].ip),
    );
    show(
        &format!("{} -> internet {INTERNET_HOST} (SNAT)", pods[3].ip),
        udp_probe(&pods[3].ns.path(), &lab.outside.path(), INTERNET_HOST),
    );
    show(
        &format!("{} -> {EXCLUDED_HOST} (excluded from SNAT)", pods[3].ip),
        udp_probe(&pods[3].ns.path(), &lab.outside.path(), EXCLUDED_HOST),
    );
    println!("== node-a's policy routing");
    for l in ip_out(lab.nodes[a].name(), &["rule"]).lines() {
        println!("   {l}");
    }
    println!("== removing the pods (vpc-cni DEL) and the lab");
    for p in pods {
        let r = lab.del_pod(p);
        if !r.ok {
            failed.set(failed.get() + 1);
            println!("   DEL failed: {}", r.stdout);
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let prefix = lab.prefix.clone();
    drop(lab);
    let left = leftover_namespaces(&prefix);
    println!(
        "   namespaces left: {}",
        if left.is_empty() {
            "none".to_string()
        } else {
            left.join(", ")
        }
    );
    if !left.is_empty() {
        failed.set(failed.get() + 1);
    }
    if failed.get() > 0 {
        eprintln!("vpc-lab: {} check(s) failed (see above)", failed.get());
        std::process::exit(1);
    }
}
