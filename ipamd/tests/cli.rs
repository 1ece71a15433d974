//! ipamctl against the real ipamd: each command's table and its `--json`,
//! and the exit statuses.

mod support;

use std::process::Output;

use support::{free_ports, Daemon, DaemonSpec, SimServer};
use vpc_sim::VpcConfig;

fn ipamctl(d: &Daemon, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ipamctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["--introspection", &d.introspection.to_string()])
        .args(args)
        .env_clear()
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(d: &Daemon, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(&ipamctl(d, args))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_interfaces_assignments_and_explain_as_tables_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(dir.path(), VpcConfig::default()).await;
    let ports = free_ports(1);
    let d = Daemon::start(&DaemonSpec {
        dir: dir.path(),
        sim: &sim.addr,
        node: "cli-node",
        instance_type: "m5.large",
        env: &[("WARM_IP_TARGET", "3")],
        introspection: ports[0],
    })
    .await;
    let added = json(&d, &["add", "c-0123456789abcdef", "--pod", "shop/web-0"]);
    let web_ip = added["ip"].as_str().unwrap().to_string();
    let eni = added["interface"].as_str().unwrap().to_string();
    json(&d, &["add", "c-fedcba", "--pod", "shop/db-0"]);

    // status: the table's lines, and JSON equal to /v1/pool's shape.
    let text = ok(&ipamctl(&d, &["status"]));
    assert!(text.contains("ready      yes"), "{text}");
    assert!(
        text.contains("limits     3 interfaces x 10 addresses"),
        "{text}"
    );
    assert!(text.contains("2 assigned, 0 cooling"), "{text}");
    let api_header = text
        .lines()
        .find(|l| l.starts_with("API"))
        .expect("an API table");
    assert_eq!(
        api_header.split_whitespace().collect::<Vec<_>>(),
        ["API", "CALLS", "RETRIES", "THROTTLED", "ERRORS"]
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("AssignPrivateIpAddresses ")),
        "{text}"
    );
    let s = json(&d, &["status", "--json"]);
    assert_eq!(s["counts"]["assigned"], 2);
    assert_eq!(s["instance"]["type"], "m5.large");

    // interfaces: one row per interface, counts by state.
    let text = ok(&ipamctl(&d, &["interfaces"]));
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "INTERFACE",
            "DEVICE",
            "SUBNET",
            "PRIMARY",
            "IP",
            "ASSIGNED",
            "COOLING",
            "FREE",
            "NOTES"
        ]
    );
    let row = rows
        .iter()
        .find(|r| r[0] == eni)
        .expect("the pods' interface");
    assert_eq!(row[4], "2", "{text}");
    let v = json(&d, &["interfaces", "--json"]);
    let listed = v.as_array().unwrap();
    assert_eq!(listed.len(), rows.len() - 1);

    // assignments: pods by name, never container ids.
    let text = ok(&ipamctl(&d, &["assignments"]));
    assert!(!text.contains("c-0123456789abcdef"), "{text}");
    let web = text
        .lines()
        .find(|l| l.starts_with("shop/web-0 "))
        .expect("web-0's row");
    assert_eq!(
        web.split_whitespace().collect::<Vec<_>>(),
        ["shop/web-0", web_ip.as_str(), eni.as_str(), "vpc-cni/eth0"]
    );
    let v = json(&d, &["assignments", "--json"]);
    let pods: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["pod"].as_str().unwrap())
        .collect();
    assert_eq!(pods.len(), 2);
    assert!(pods.contains(&"shop/web-0") && pods.contains(&"shop/db-0"));
    assert!(!v.to_string().contains("c-0123456789abcdef"));

    // explain: a pod, a pod without an address, the next ADD.
    let text = ok(&ipamctl(&d, &["explain", "shop/web-0"]));
    assert!(text.starts_with("pod shop/web-0: assigned\n"), "{text}");
    assert!(text.contains(&format!("holds {web_ip} on {eni}")), "{text}");
    let v = json(&d, &["explain", "shop/web-0", "--json"]);
    assert_eq!(v["verdict"], "assigned");
    assert_eq!(v["held"][0]["ip"], web_ip.as_str());
    let v = json(&d, &["explain", "shop/nobody", "--json"]);
    assert_eq!(v["held"].as_array().unwrap().len(), 0);
    assert!(v["message"]
        .as_str()
        .unwrap()
        .starts_with("no address is assigned to shop/nobody"));
    let text = ok(&ipamctl(&d, &["explain"]));
    assert!(text.starts_with("the next ADD: "), "{text}");
    assert!(text.contains("\nfacts:\n"), "{text}");
    assert!(text.contains("  assigned: 2\n"), "{text}");

    // Exit statuses: bad arguments 64, ipamd unreachable 69.
    let out = ipamctl(&d, &["explain", "not-a-pod"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected NAMESPACE/NAME"));
    for odd in ["a b/c", "ns/x#y", "ns/a&pod=x", "ns/a\"b", "NS/upper"] {
        let out = ipamctl(&d, &["explain", odd]);
        assert_eq!(out.status.code(), Some(64), "{odd}: {out:?}");
    }
    let out = ipamctl(&d, &["status", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(64));
    let out = ipamctl(&d, &["status", "--introspection", "notanaddr"]);
    assert_eq!(out.status.code(), Some(64));
    // A socket that is not ipamd's gRPC socket (its fast path).
    let fast = ipamd_api::fast::path(&d.socket);
    let out = ipamctl(&d, &["add", "x", "--socket", fast.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let closed = free_ports(1)[0].to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ipamctl"))
        .args(["status", "--introspection", &closed])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is ipamd running"));
}
