//! ipamd with the AWS provider against LocalStack's EC2 (on the host, no
//! Docker; the test command starts it with ./localstack/start.sh) and the
//! IMDSv2 emulator localstack/imds.py. Nothing reaches 169.254.169.254 or a
//! real AWS endpoint: explicit region, dummy credentials, endpoint URLs.
//! Fails, never skips, when LocalStack is not there.

mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ipamd_api::v1::{AddNetworkRequest, DelNetworkRequest};
use serde_json::Value;
use support::{free_port, get};
use tokio::io::AsyncBufReadExt;

fn localstack_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../localstack")
}

fn python() -> PathBuf {
    let p = localstack_dir().join(".venv/bin/python");
    assert!(
        p.is_file(),
        "LocalStack's venv is missing: run ./localstack/start.sh"
    );
    p
}

fn py(args: &[&str]) -> String {
    let out = std::process::Command::new(python())
        .args(args)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn require_localstack() {
    let ok = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:4566".parse().unwrap(),
        Duration::from_secs(2),
    )
    .is_ok();
    assert!(ok, "LocalStack is not listening on 127.0.0.1:4566: run ./localstack/start.sh (the test command does)");
}

struct Enis(Vec<Value>);

impl Enis {
    fn of(instance: &str) -> Self {
        let script = localstack_dir().join("ec2.py");
        Enis(
            serde_json::from_str::<Vec<Value>>(&py(&[script.to_str().unwrap(), "enis", instance]))
                .unwrap(),
        )
    }
    fn secondaries(&self) -> usize {
        self.0
            .iter()
            .map(|e| e["secondary"].as_array().unwrap().len())
            .sum()
    }
}

struct Node {
    child: tokio::process::Child,
    imds: tokio::process::Child,
    socket: PathBuf,
    introspection: std::net::SocketAddr,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.imds.start_kill();
    }
}

async fn start_imds(instance: &str) -> (tokio::process::Child, u16) {
    let mut imds = tokio::process::Command::new(python())
        .arg(localstack_dir().join("imds.py"))
        .args([instance, "0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(imds.stdout.take().unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    (imds, port)
}

async fn start(dir: &Path, instance: &str, env: &[(&str, &str)]) -> Node {
    let (imds, port) = start_imds(instance).await;
    let socket = dir.join("ipamd.sock");
    let log = dir.join("ipamd.log");
    let introspection = free_port();
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ipamd"))
        .args([
            "--provider",
            "aws",
            "--configure-host",
            "false",
            "--metrics",
            "off",
        ])
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--introspection", &introspection.to_string()])
        .env_clear()
        .env("IPAMD_LOG", "info")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        // aws-node's name for the EC2 endpoint (AWS_ENDPOINT_URL would do too).
        .env("AWS_EC2_ENDPOINT", "http://127.0.0.1:4566")
        .env(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(logf)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut node = Node {
        child,
        imds,
        socket,
        introspection,
        log,
    };
    for _ in 0..400 {
        if let Some(s) = node.child.try_wait().unwrap() {
            panic!(
                "ipamd exited with {s}:\n{}",
                std::fs::read_to_string(&node.log).unwrap_or_default()
            );
        }
        if ipamd_api::client(&node.socket).await.is_ok() {
            return node;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "ipamd did not start:\n{}",
        std::fs::read_to_string(&node.log).unwrap_or_default()
    );
}

async fn add(node: &Node, id: &str) -> Result<Ipv4Addr, tonic::Status> {
    let mut c = ipamd_api::client(&node.socket).await.unwrap();
    c.add_network(AddNetworkRequest {
        network_name: "k8s".into(),
        container_id: id.into(),
        ifname: "eth0".into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().ipv4_address.parse().unwrap())
}

async fn del(node: &Node, id: &str) {
    let mut c = ipamd_api::client(&node.socket).await.unwrap();
    c.del_network(DelNetworkRequest {
        network_name: "k8s".into(),
        container_id: id.into(),
        ifname: "eth0".into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Waits until `f` holds of LocalStack's view of the instance.
async fn until(instance: &str, what: &str, log: Option<&Path>, f: impl Fn(&Enis) -> bool) -> Enis {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let e = Enis::of(instance);
        if f(&e) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {:?}\n{}",
            e.0,
            log.map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipamd_keeps_its_pool_in_localstack_ec2() {
    require_localstack();
    let seed: Value = serde_json::from_str(&py(&[
        localstack_dir().join("seed.py").to_str().unwrap(),
        "m5.large",
        "3",
    ]))
    .unwrap();
    let instance = seed["instance"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("WARM_IP_TARGET", "4"),
        ("IP_COOLDOWN_PERIOD", "0"),
        ("IPAMD_ADD_WAIT_SECONDS", "3"),
        ("IPAMD_LEAKED_INTERFACE_GC_SECONDS", "2"),
        ("CLUSTER_NAME", "localstack-test"),
    ];
    let node = start(dir.path(), &instance, &env).await;

    // The pool reaches its warm target on the primary interface.
    until(&instance, "warm pool of 4", Some(&node.log), |e| {
        e.secondaries() == 4
    })
    .await;

    // Past one interface's capacity (9 on m5.large) a second is created,
    // attached at the next device index, tagged, with addresses.
    let mut pods = vec![];
    for i in 0..12 {
        pods.push((
            format!("p{i}"),
            add(&node, &format!("p{i}")).await.expect("add"),
        ));
    }
    let enis = until(&instance, "a second interface", Some(&node.log), |e| {
        e.0.len() == 2 && e.secondaries() >= 16
    })
    .await;
    let mut indexes: Vec<i64> = enis
        .0
        .iter()
        .map(|e| e["device_index"].as_i64().unwrap())
        .collect();
    indexes.sort();
    assert_eq!(indexes, vec![0, 1], "distinct device indexes");
    let second = enis.0.iter().find(|e| e["device_index"] == 1).unwrap();
    assert_eq!(second["tags"]["vpc-cni.io/owner"], "vpc-cni");
    assert_eq!(second["tags"]["vpc-cni.io/instance-id"], instance.as_str());
    assert_eq!(second["tags"]["vpc-cni.io/cluster-name"], "localstack-test");
    assert!(second["tags"]["vpc-cni.io/created-at"].as_str().is_some());
    assert_eq!(
        second["subnet"], seed["pods_subnet"],
        "the tagged subnet with most free addresses"
    );
    let ips: std::collections::HashSet<_> = pods.iter().map(|p| p.1).collect();
    assert_eq!(ips.len(), 12, "no address handed out twice");

    // Restart: assignments come back from the journal, nothing is reassigned
    // or re-created.
    let before = Enis::of(&instance);
    drop(node);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let node = start(dir.path(), &instance, &env).await;
    for (id, ip) in &pods {
        assert_eq!(
            add(&node, id).await.unwrap(),
            *ip,
            "{id} keeps its address across the restart"
        );
    }
    let after = Enis::of(&instance);
    assert_eq!(
        before.0.len(),
        after.0.len(),
        "restart created or deleted interfaces"
    );

    // Releasing shrinks the pool back to WARM_IP_TARGET.
    for (id, _) in &pods {
        del(&node, id).await;
    }
    until(&instance, "shrink to 4 addresses", Some(&node.log), |e| {
        e.secondaries() == 4
    })
    .await;

    // An orphaned interface of ours (unattached, older than 5 minutes) is
    // collected; a young one is left alone.
    let ec2 = localstack_dir().join("ec2.py");
    let old = py(&[
        ec2.to_str().unwrap(),
        "orphan",
        seed["pods_subnet"].as_str().unwrap(),
        "600",
    ]);
    let young = py(&[
        ec2.to_str().unwrap(),
        "orphan",
        seed["pods_subnet"].as_str().unwrap(),
        "10",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while py(&[ec2.to_str().unwrap(), "exists", &old]) == "true" {
        assert!(
            Instant::now() < deadline,
            "leaked interface {old} was not collected:\n{}",
            std::fs::read_to_string(&node.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        py(&[ec2.to_str().unwrap(), "exists", &young]),
        "true",
        "a young unattached interface was deleted"
    );

    // Per-API figures are reported.
    let pool = get(node.introspection, "/v1/pool").await.unwrap();
    // (This ipamd started after the restart: it described and released.)
    for api in ["DescribeNetworkInterfaces", "UnassignPrivateIpAddresses"] {
        assert!(
            pool["provider_api"][api]["calls"].as_u64().unwrap_or(0) >= 1,
            "{api} not counted: {pool}"
        );
    }
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_limits_are_enforced_although_localstack_would_allow_more() {
    require_localstack();
    let seed: Value = serde_json::from_str(&py(&[
        localstack_dir().join("seed.py").to_str().unwrap(),
        "t3.small",
        "4",
    ]))
    .unwrap();
    let instance = seed["instance"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), &instance, &[("IPAMD_ADD_WAIT_SECONDS", "3")]).await;
    // t3.small: 3 interfaces x 3 secondary addresses.
    for i in 0..9 {
        add(&node, &format!("q{i}"))
            .await
            .expect("within the limit");
    }
    let err = match add(&node, "one-too-many").await {
        Err(e) => e,
        Ok(ip) => panic!(
            "got {ip} past the limit:\n{}",
            std::fs::read_to_string(&node.log).unwrap_or_default()
        ),
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.message().contains("limit"), "{}", err.message());
    let enis = Enis::of(&instance);
    assert_eq!(
        enis.0.len(),
        3,
        "ipamd attached more interfaces than t3.small has"
    );
    assert!(
        enis.0
            .iter()
            .all(|e| e["secondary"].as_array().unwrap().len() <= 3),
        "{:?}",
        enis.0
    );
}
