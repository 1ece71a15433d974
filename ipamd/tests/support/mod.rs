//! Shared by the tests that run the real ipamd binary.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vpc_sim::client::SimAddr;
use vpc_sim::{server, Vpc, VpcConfig};

/// A simulated VPC served on a unix socket from the test process: it
/// outlives every ipamd the test starts and kills.
pub struct SimServer {
    pub vpc: Arc<Vpc>,
    pub addr: String,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl SimServer {
    pub async fn start(dir: &Path, config: VpcConfig) -> Self {
        let sock = dir.join("sim.sock");
        let vpc = Arc::new(
            Vpc::open(VpcConfig {
                state_path: Some(dir.join("sim-vpc.json")),
                ..config
            })
            .unwrap(),
        );
        let listener = server::Listener::bind(&SimAddr::Unix(sock.clone()))
            .await
            .unwrap();
        let task = tokio::spawn(server::serve(vpc.clone(), listener));
        Self {
            vpc,
            addr: format!("unix:{}", sock.display()),
            task,
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// AddNetwork for the attachment (vpc-cni, `id`, eth0).
pub fn add_request(id: &str) -> ipamd_api::v1::AddNetworkRequest {
    ipamd_api::v1::AddNetworkRequest {
        network_name: "vpc-cni".into(),
        container_id: id.into(),
        ifname: "eth0".into(),
        pod_namespace: "default".into(),
        pod_name: id.to_lowercase(),
        ..Default::default()
    }
}

/// DelNetwork for the attachment (vpc-cni, `id`, eth0).
pub fn del_request(id: &str) -> ipamd_api::v1::DelNetworkRequest {
    ipamd_api::v1::DelNetworkRequest {
        network_name: "vpc-cni".into(),
        container_id: id.into(),
        ifname: "eth0".into(),
        ..Default::default()
    }
}

/// `n` distinct free loopback ports (all bound at once, then released for
/// the children to take).
pub fn free_ports(n: usize) -> Vec<SocketAddr> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// One ipamd child process; killed when dropped.
pub struct Daemon {
    pub child: tokio::process::Child,
    pub socket: PathBuf,
    pub introspection: SocketAddr,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

pub struct DaemonSpec<'a> {
    pub dir: &'a Path,
    pub sim: &'a str,
    pub node: &'a str,
    pub instance_type: &'a str,
    pub env: &'a [(&'a str, &'a str)],
    pub introspection: SocketAddr,
}

impl Daemon {
    pub async fn start(spec: &DaemonSpec<'_>) -> Daemon {
        Self::start_bin(Path::new(env!("CARGO_BIN_EXE_ipamd")), spec).await
    }

    pub async fn start_bin(bin: &Path, spec: &DaemonSpec<'_>) -> Daemon {
        Self::start_wrapped(&[], bin, spec).await
    }

    /// [`Daemon::start_bin`] run as `wrapper... bin args...` (e.g. in a
    /// mount namespace of its own); the wrapper must end by exec'ing ipamd
    /// so that the child's pid is ipamd's.
    pub async fn start_wrapped(wrapper: &[&str], bin: &Path, spec: &DaemonSpec<'_>) -> Daemon {
        let socket = spec.dir.join("ipamd.sock");
        let state_dir = spec.dir.join("state");
        let log = spec.dir.join("ipamd.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => tokio::process::Command::new(bin),
        };
        if !spec.env.iter().any(|(k, _)| *k == "IPAMD_METRICS_ADDR") {
            cmd.args(["--metrics", "off"]);
        }
        cmd.args(["--provider", "sim"])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--introspection")
            .arg(spec.introspection.to_string())
            .args(["--sim-server", spec.sim, "--node-name", spec.node])
            .args(["--sim-instance-type", spec.instance_type])
            .env_clear()
            .env("IPAMD_LOG", "info")
            .envs(spec.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .kill_on_drop(true);
        let child = cmd.spawn().expect("spawn ipamd");
        let mut d = Daemon {
            child,
            socket,
            introspection: spec.introspection,
            state_dir,
            log,
        };
        d.wait_ready().await;
        d
    }

    async fn wait_ready(&mut self) {
        // Up to 60 s: start-up retries a throttled cloud with backoff.
        for _ in 0..2400 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "ipamd exited with {status}:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if ipamd_api::client(&self.socket).await.is_ok()
                && get(self.introspection, "/healthz").await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "ipamd did not become ready:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn journal(&self) -> PathBuf {
        self.state_dir.join("ipamd.journal")
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// (pod name, address) of every assignment; the pods' names are the
    /// container ids [`add_request`] gave.
    pub async fn assignments(&self) -> Vec<(String, Ipv4Addr)> {
        let v = get(self.introspection, "/v1/assignments").await.unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|a| {
                // `add_request` names the pod after the container id.
                let pod = a["pod"].as_str().expect("a pod name");
                (
                    pod.strip_prefix("default/").unwrap_or(pod).to_string(),
                    a["ip"].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }

    /// Every address in ipamd's pool, whatever its state.
    pub async fn pool_addresses(&self) -> Vec<Ipv4Addr> {
        let v = get(self.introspection, "/v1/interfaces").await.unwrap();
        let mut out = vec![];
        for i in v.as_array().unwrap() {
            for a in i["addresses"].as_array().unwrap() {
                out.push(a["ip"].as_str().unwrap().parse().unwrap());
            }
        }
        out.sort();
        out
    }

    pub async fn pool(&self) -> serde_json::Value {
        get(self.introspection, "/v1/pool").await.unwrap()
    }

    pub async fn kill(&mut self) {
        self.child.start_kill().ok();
        self.child.wait().await.ok();
    }

    /// SIGTERM, and the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.pid();
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("ipamd exits on SIGTERM")
            .unwrap()
    }
}

/// A minimal HTTP/1.0 GET: the status code and the body, whatever they are.
pub async fn get_any(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: ipamd\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_string())
}

/// A minimal HTTP/1.0 GET against the introspection server.
pub async fn get(addr: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: ipamd\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(head.to_string());
    }
    Ok(serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_string())))
}

/// Addresses the simulated VPC has on an instance's attached interfaces.
pub fn cloud_addresses(vpc: &Vpc, node: &str) -> Vec<Ipv4Addr> {
    let s = vpc.snapshot();
    let id = &s
        .instances
        .values()
        .find(|i| i.name == node)
        .expect("instance")
        .id;
    let mut out: Vec<Ipv4Addr> = s
        .interfaces
        .values()
        .filter(|e| e.attachment.as_ref().is_some_and(|a| &a.instance_id == id))
        .flat_map(|e| {
            e.secondary_ips
                .iter()
                .copied()
                .chain(e.prefixes.iter().flat_map(|p| {
                    (u32::from(p.network())..=u32::from(p.broadcast())).map(Ipv4Addr::from)
                }))
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out
}

/// The pool in this process on an in-process simulated VPC: the production
/// `Ipam` and reconciler, without the binary.
pub mod inproc {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use ipamd::config::Settings;
    use ipamd::datastore::PodKey;
    use ipamd::ipam::Ipam;
    use providers::layer::CallLayer;
    use tokio::sync::watch;
    use vpc_sim::provider::Backend;
    use vpc_sim::{SimProvider, Vpc, VpcConfig};

    pub struct Node {
        pub ipam: Arc<Ipam>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Node {
        pub async fn start(
            vpc: &Arc<Vpc>,
            instance_type: &str,
            env: &[(&str, &str)],
            journal: &std::path::Path,
        ) -> Node {
            Self::start_with(vpc, instance_type, env, journal, CallLayer::ec2()).await
        }

        /// [`Node::start`] with the provider's calls through `layer`.
        pub async fn start_with(
            vpc: &Arc<Vpc>,
            instance_type: &str,
            env: &[(&str, &str)],
            journal: &std::path::Path,
            layer: CallLayer,
        ) -> Node {
            let provider =
                SimProvider::join_with(Backend::Local(vpc.clone()), "node-a", instance_type, layer)
                    .await
                    .unwrap();
            Self::start_provider(Arc::new(provider), env, journal).await
        }

        /// The pool and reconciler on any provider (e.g. Azure's against
        /// the fake ARM).
        pub async fn start_provider(
            provider: Arc<dyn providers::CloudProvider>,
            env: &[(&str, &str)],
            journal: &std::path::Path,
        ) -> Node {
            let m: HashMap<&str, &str> = env.iter().copied().collect();
            let settings = Settings::from_source(&m).unwrap();
            let ipam = Ipam::start(provider, settings, journal).await.unwrap();
            let (stop, rx) = watch::channel(false);
            let task = tokio::spawn(ipam.clone().run(rx));
            Node { ipam, stop, task }
        }

        pub async fn stop(self) {
            self.stop.send(true).ok();
            self.task.await.ok();
        }
    }

    pub fn key(c: &str) -> PodKey {
        PodKey {
            network: "vpc-cni".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    pub fn vpc(attach_ms: u64) -> Arc<Vpc> {
        Arc::new(Vpc::with_config(VpcConfig {
            attach_latency: Duration::from_millis(attach_ms),
            ..VpcConfig::default()
        }))
    }

    /// Launches "node-a" (m5.large) in "subnet-tiny", a /28 alone in its
    /// zone: 11 usable addresses, the primary interface's own included.
    pub async fn tiny_subnet_node(vpc: &Vpc) {
        use vpc_sim::Request;
        vpc.handle(Request::CreateSubnet {
            id: "subnet-tiny".into(),
            cidr: "10.0.64.0/28".into(),
            zone: "sim-1c".into(),
            tags: Default::default(),
        })
        .await
        .unwrap();
        vpc.handle(Request::LaunchInstance {
            name: "node-a".into(),
            instance_type: "m5.large".into(),
            subnet_id: Some("subnet-tiny".into()),
        })
        .await
        .unwrap();
    }

    /// Injects `count` faults of `kind` into `api`'s calls.
    pub async fn inject(vpc: &Vpc, api: &str, kind: vpc_sim::FaultKind, count: u32) {
        vpc.handle(vpc_sim::Request::InjectFault(vpc_sim::Fault {
            api: Some(api.into()),
            kind,
            count,
        }))
        .await
        .unwrap();
    }

    /// Waits until the pool has `n` available addresses.
    pub async fn warm(ipam: &Ipam, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = ipam.summary();
            if s["counts"]["available"].as_u64().unwrap() >= n {
                return;
            }
            assert!(Instant::now() < deadline, "pool never warmed: {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
