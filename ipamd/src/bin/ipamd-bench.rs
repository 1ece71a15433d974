//! ipamd-bench: AddNetwork/DelNetwork latency at 1 and 64 concurrent clients
//! and ipamd's memory with 250 assignments, against the real binary.
//!
//! The peer in the same run is the gRPC health Check on the same socket: the
//! floor the transport sets, so the ratio shows what ipamd itself adds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use ipamd_api::v1::{AddNetworkRequest, DelNetworkRequest};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Parser)]
#[command(about = "Benchmark ipamd over its unix socket")]
struct Cli {
    /// Directory for the journal; tmpfs by default, as on a node.
    #[arg(long, default_value = "/dev/shm")]
    journal_dir: PathBuf,
    /// Add+Del cycles for the single client.
    #[arg(long, default_value_t = 3000)]
    single: usize,
    /// Add+Del cycles per client at 64 clients.
    #[arg(long, default_value_t = 100)]
    per_client: usize,
    /// The ipamd binary; default: next to this one.
    #[arg(long)]
    ipamd: Option<PathBuf>,
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[derive(Default)]
struct Samples {
    add: Vec<Duration>,
    del: Vec<Duration>,
    health: Vec<Duration>,
}

impl Samples {
    fn merge(&mut self, o: Samples) {
        self.add.extend(o.add);
        self.del.extend(o.del);
        self.health.extend(o.health);
    }
}

async fn cycles(socket: PathBuf, tag: String, n: usize) -> Samples {
    let channel = ipamd_api::connect(&socket).await.expect("connect");
    let mut c = ipamd_api::v1::ipamd_client::IpamdClient::new(channel.clone());
    let mut h = HealthClient::new(channel);
    let mut s = Samples::default();
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let t = Instant::now();
        h.check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health");
        s.health.push(t.elapsed());
        let t = Instant::now();
        c.add_network(AddNetworkRequest {
            network_name: "bench".into(),
            container_id: id.clone(),
            ifname: "eth0".into(),
            ..Default::default()
        })
        .await
        .expect("add");
        s.add.push(t.elapsed());
        let t = Instant::now();
        c.del_network(DelNetworkRequest {
            network_name: "bench".into(),
            container_id: id,
            ifname: "eth0".into(),
            ..Default::default()
        })
        .await
        .expect("del");
        s.del.push(t.elapsed());
    }
    s
}

fn report(clients: usize, mut s: Samples) -> (Duration, Duration) {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut p99s = (Duration::ZERO, Duration::ZERO);
    for (name, v) in [
        ("AddNetwork", &mut s.add),
        ("DelNetwork", &mut s.del),
        ("Health.Check (peer)", &mut s.health),
    ] {
        v.sort();
        let (p50, p99) = (percentile(v, 0.50), percentile(v, 0.99));
        println!(
            "{clients:>7}  {name:<20} {:>9.0} {:>9.0} {:>8}",
            us(p50),
            us(p99),
            v.len()
        );
        match name {
            "AddNetwork" => p99s.0 = p99,
            "Health.Check (peer)" => p99s.1 = p99,
            _ => {}
        }
    }
    p99s
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn introspect(addr: &str, path: &str) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return serde_json::Value::Null;
    };
    if s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .is_err()
    {
        return serde_json::Value::Null;
    }
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok();
    let body = buf.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

async fn pool_available(addr: &str) -> u64 {
    introspect(addr, "/v1/pool").await["counts"]["available"]
        .as_u64()
        .unwrap_or(0)
}

/// ipamd's own time in the AddNetwork handler since the last reset.
async fn handler_line(addr: &str, clients: usize) {
    let v = introspect(addr, "/v1/latency?reset=true").await;
    let a = &v["add_network"];
    println!(
        "{clients:>7}  {:<20} {:>9} {:>9} {:>8}",
        "AddNetwork in ipamd", a["p50_us"], a["p99_us"], a["count"]
    );
}

fn ipamd_path(cli: &Cli) -> PathBuf {
    cli.ipamd.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("current exe")
            .parent()
            .expect("dir")
            .join("ipamd")
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let cli = Cli::parse();
    let bin = ipamd_path(&cli);
    let dir = tempfile_dir(&cli.journal_dir);
    let socket = dir.join("ipamd.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = std::fs::File::create(dir.join("ipamd.log")).unwrap();
    let child = Command::new(&bin)
        .args(["--metrics", "off", "--provider", "sim", "--state-dir"])
        .arg(&dir)
        .arg("--socket")
        .arg(&socket)
        .args(["--introspection", &port.to_string()])
        .args([
            "--sim-instance-type",
            "m5.16xlarge",
            "--sim-attach-latency-ms",
            "0",
        ])
        .env("MINIMUM_IP_TARGET", "400")
        .env("WARM_IP_TARGET", "64")
        .env("IP_COOLDOWN_PERIOD", "0")
        .env("IPAMD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let daemon = Daemon(child);
    let pid = daemon.0.id();
    let t = Instant::now();
    while pool_available(&port.to_string()).await < 400 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "pool did not warm; see {}",
            dir.join("ipamd.log").display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "ipamd-bench: {} (pid {pid}), journal on {}",
        bin.display(),
        dir.display()
    );
    println!(
        "pool warmed to 400 addresses in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    println!(
        "{:>7}  {:<20} {:>9} {:>9} {:>8}",
        "clients", "call", "p50 µs", "p99 µs", "calls"
    );

    // Warm the connection paths, then one client.
    let addr = port.to_string();
    cycles(socket.clone(), "warmup".into(), 200).await;
    introspect(&addr, "/v1/latency?reset=true").await;
    let (add1, health1) = report(1, cycles(socket.clone(), "one".into(), cli.single).await);
    handler_line(&addr, 1).await;

    let tasks: Vec<_> = (0..64)
        .map(|i| tokio::spawn(cycles(socket.clone(), format!("c{i}"), cli.per_client)))
        .collect();
    let mut all = Samples::default();
    for t in tasks {
        all.merge(t.await.unwrap());
    }
    let (add64, health64) = report(64, all);
    handler_line(&addr, 64).await;

    // Memory with 250 pods holding addresses.
    let channel = ipamd_api::connect(&socket).await.unwrap();
    let mut c = ipamd_api::v1::ipamd_client::IpamdClient::new(channel);
    let before = rss_kib(pid);
    for i in 0..250 {
        c.add_network(AddNetworkRequest {
            network_name: "bench".into(),
            container_id: format!("held-{i}"),
            ifname: "eth0".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss = rss_kib(pid);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!();
    println!(
        "AddNetwork p99 / Health.Check p99: {:.2}x at 1 client, {:.2}x at 64 clients",
        ratio(add1, health1),
        ratio(add64, health64)
    );
    println!(
        "AddNetwork p99 at 64 clients: {:.3} ms (target <= 1 ms)",
        add64.as_secs_f64() * 1e3
    );
    println!(
        "ipamd RSS with 250 assignments: {:.1} MiB (before them: {:.1} MiB; target <= 24 MiB)",
        rss as f64 / 1024.0,
        before as f64 / 1024.0
    );
    drop(daemon);
    std::fs::remove_dir_all(&dir).ok();
}

fn tempfile_dir(base: &Path) -> PathBuf {
    let d = base.join(format!("ipamd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("bench dir");
    d
}
