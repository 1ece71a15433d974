//! kube-bench: ipamd's memory with its Kubernetes watches, flat in the
//! cluster's size.
//!
//! The release ipamd (embedded simulated VPC) runs against the in-process
//! fake API server holding 250 pods on its node and N pods on other nodes
//! (each a realistic object with labels, annotations, containers and
//! managedFields, ~4 KiB of JSON), with 250 addresses assigned to the
//! node's pods. Its RSS is read once its pod watch is in sync, for N = 0,
//! 5,000 and 50,000, next to the same ipamd without Kubernetes (the floor
//! of this comparison). Prints one row per run and the ratios.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use fake_apiserver::{FakeApiServer, Options, Res};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "ipamd RSS with the pod watch of a 250-pod node while the cluster grows")]
struct Cli {
    /// The ipamd binary (the release build by default).
    #[arg(long, default_value = "target/release/ipamd")]
    ipamd: PathBuf,
    /// Pods on ipamd's node.
    #[arg(long, default_value_t = 250)]
    node_pods: usize,
    /// Pods elsewhere in the cluster, one run each.
    #[arg(long, value_delimiter = ',', default_value = "0,5000,50000")]
    others: Vec<usize>,
}

const NODE: &str = "bench-node";

/// A pod as the API server holds it (~4 KiB of JSON).
fn pod(ns: &str, name: &str, node: &str, i: usize) -> Value {
    let env: Vec<Value> = (0..12)
        .map(|k| json!({"name": format!("SETTING_{k}"), "value": format!("value-{k}-{i}")}))
        .collect();
    json!({
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"app": "web", "pod-template-hash": format!("{:x}", i * 7919), "tier": "frontend"},
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-11-01T00:00:00Z",
                "prometheus.io/scrape": "true",
                "description": "x".repeat(400),
            },
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d9c", "uid": "0b0e5f2a-0000-4000-8000-000000000001", "controller": true}],
            "managedFields": [{
                "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                "time": "2026-11-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}, "f:tier": {}}}, "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}, "f:env": {}}}}}
            }, {
                "manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
                "time": "2026-11-01T00:00:05Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:podIP": {}, "f:podIPs": {}}}
            }],
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": "web",
            "containers": [{
                "name": "web",
                "image": "registry.example/web:1.2.3",
                "env": env,
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
            }],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
        },
        "status": {
            "phase": "Running",
            "podIP": format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
            "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0, "image": "registry.example/web:1.2.3", "imageID": "sha256:0123", "containerID": format!("containerd://{i:064x}")}],
        },
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The body of a 200 answer to GET `path`.
async fn get_ok(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = vec![];
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.split(' ')
        .nth(1)
        .is_some_and(|code| code == "200")
        .then(|| body.to_string())
}

/// The JSON body of a 200 answer to GET `path`.
async fn get(addr: std::net::SocketAddr, path: &str) -> Option<Value> {
    serde_json::from_str(&get_ok(addr, path).await?).ok()
}

struct Run {
    label: String,
    rss_kib: u64,
    pods_cached: u64,
    sync_s: f64,
}

/// One ipamd run; `kube` is (fake, pods elsewhere) or none.
async fn run(cli: &Cli, dir: &Path, kube: Option<(&FakeApiServer, usize)>) -> Run {
    let state = dir.join(format!("state-{}", kube.map_or(usize::MAX, |k| k.1)));
    let socket = state.join("ipamd.sock");
    std::fs::create_dir_all(&state).unwrap();
    let intro = free_port();
    let mut cmd = tokio::process::Command::new(&cli.ipamd);
    cmd.args(["--provider", "sim", "--metrics", "off", "--node-name", NODE])
        .args([
            "--sim-instance-type",
            "m5.24xlarge",
            "--sim-attach-latency-ms",
            "0",
        ])
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .arg("--introspection")
        .arg(intro.to_string())
        .env_clear()
        .env("IPAMD_LOG", "warn")
        .env("WARM_IP_TARGET", "260")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some((fake, _)) = kube {
        cmd.arg("--kubeconfig").arg(fake.kubeconfig(dir));
    }
    let mut child = cmd.spawn().expect("spawn ipamd");
    let pid = child.id().unwrap();
    let start = Instant::now();
    // Ready, then 250 ADDs for the node's pods.
    let deadline = start + Duration::from_secs(60);
    while get_ok(intro, "/readyz").await.is_none() {
        assert!(Instant::now() < deadline, "ipamd never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = ipamd_api::client(&socket).await.expect("ipamd socket");
    for i in 0..cli.node_pods {
        let name = format!("web-{i}");
        c.add_network(ipamd_api::v1::AddNetworkRequest {
            network_name: "vpc-cni".into(),
            container_id: format!("{i:064x}"),
            ifname: "eth0".into(),
            pod_namespace: "shop".into(),
            pod_name: name,
            ..Default::default()
        })
        .await
        .expect("ADD");
    }
    let mut cached = 0;
    if kube.is_some() {
        loop {
            let k = get(intro, "/v1/pool").await.unwrap_or_default()["kubernetes"].clone();
            cached = k["pods_on_node"].as_u64().unwrap_or(0);
            if k["pods_in_sync"] == true && cached == cli.node_pods as u64 {
                break;
            }
            assert!(Instant::now() < deadline, "pod watch never in sync: {k}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let sync_s = start.elapsed().as_secs_f64();
    // Settle (allocator, the checks of gone pods), then read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_kib(pid);
    child.kill().await.ok();
    Run {
        label: match kube {
            None => "ipamd without Kubernetes (floor)".into(),
            Some((_, n)) => format!("ipamd, {} pods on node, {n} elsewhere", cli.node_pods),
        },
        rss_kib: rss,
        pods_cached: cached,
        sync_s,
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    assert!(
        cli.ipamd.is_file(),
        "{} is missing: build it (cargo build --release -p ipamd)",
        cli.ipamd.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut runs = vec![run(&cli, dir.path(), None).await];
    for &others in &cli.others {
        let fake = FakeApiServer::start(Options::default()).await;
        fake.put(
            Res::Nodes,
            json!({"metadata": {"name": NODE}, "spec": {}, "status": {}}),
        );
        for i in 0..cli.node_pods {
            fake.put(Res::Pods, pod("shop", &format!("web-{i}"), NODE, i));
        }
        for i in 0..others {
            let node = format!("node-{}", i % 2000);
            fake.put(Res::Pods, pod("shop", &format!("other-{i}"), &node, i));
        }
        runs.push(run(&cli, dir.path(), Some((&fake, others))).await);
    }
    let floor = runs[0].rss_kib.max(1) as f64;
    let base = runs.get(1).map_or(floor, |r| r.rss_kib.max(1) as f64);
    println!(
        "{:<48} {:>9} {:>11} {:>8} {:>10} {:>10}",
        "run", "RSS MiB", "pods cached", "ready+s", "vs floor", "vs 0 else"
    );
    for r in &runs {
        println!(
            "{:<48} {:>9.1} {:>11} {:>8.1} {:>9.2}x {:>9.2}x",
            r.label,
            r.rss_kib as f64 / 1024.0,
            r.pods_cached,
            r.sync_s,
            r.rss_kib as f64 / floor,
            r.rss_kib as f64 / base,
        );
    }
    println!("target: <= 24 MiB with 50,000 pods elsewhere, flat in the cluster's size");
}
