//! A simulated VPC in network namespaces, for end-to-end tests and the demo.
//!
//! * a "vpc" namespace is the VPC router: the simulated VPC (in this
//!   process, served to every node on a unix socket) routes each address to
//!   the link of the interface that owns it;
//! * an "outside" namespace beyond it holds an internet host (198.51.100.10)
//!   and a host of a network excluded from SNAT (192.168.50.10);
//! * each node is a namespace running the real ipamd, its interfaces veth
//!   links into the vpc namespace;
//! * each pod is a namespace wired by the real vpc-cni binary, invoked as a
//!   runtime invokes it (CNI_* environment, config on stdin), in the node's
//!   namespace.
//!
//! Nothing is added to the machine's root namespace, and every namespace
//! (with every link, route, rule and nft table in it) is deleted on drop,
//! pass or fail.

pub mod cluster;
pub mod leftovers;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vpc_sim::client::SimAddr;
use vpc_sim::fabric::{Fabric, NetnsFabric};
use vpc_sim::{server, Request, Vpc, VpcConfig, VpcState};

pub const INTERNET_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const EXCLUDED_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
pub const EXCLUDED_CIDR: &str = "192.168.50.0/24";
pub const NODE_SUBNET: &str = "subnet-0sim00000000node";

/// The built binaries of this workspace, next to the test executable.
/// `VPC_CNI_BIN` names another vpc-cni binary to test (the statically
/// linked release build, as shipped); its directory is then the CNI plugin
/// directory the tests give runtimes.
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
    cni: PathBuf,
}

impl Bins {
    pub fn find() -> Self {
        let exe = std::env::current_exe().expect("current exe");
        for dir in exe.ancestors().skip(1) {
            if dir.join("ipamd").is_file() && dir.join("vpc-cni").is_file() {
                let cni = match std::env::var_os("VPC_CNI_BIN") {
                    Some(p) => {
                        let p = PathBuf::from(p);
                        assert!(p.is_file(), "VPC_CNI_BIN={} is not a file", p.display());
                        std::fs::canonicalize(p).expect("VPC_CNI_BIN")
                    }
                    None => dir.join("vpc-cni"),
                };
                return Self {
                    dir: dir.to_path_buf(),
                    cni,
                };
            }
        }
        panic!(
            "ipamd and vpc-cni binaries not found near {}: run `cargo build --workspace --bins` first",
            exe.display()
        );
    }
    pub fn ipamd(&self) -> PathBuf {
        self.dir.join("ipamd")
    }
    pub fn vpc_cni(&self) -> PathBuf {
        self.cni.clone()
    }
    /// The directory runtimes find vpc-cni in (CNI_PATH).
    pub fn cni_dir(&self) -> PathBuf {
        self.cni
            .parent()
            .map_or_else(|| self.dir.clone(), PathBuf::from)
    }
}

/// Fails loudly when the test cannot do what it must.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test builds network namespaces and must run as root"
    );
    for tool in ["ip", "nft", "nsenter", "setpriv"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
            || Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
        assert!(ok, "{tool} is not installed: run ./scripts/setup.sh");
    }
}

/// Runs `ip` with these arguments; panics with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Output of `ip` in a namespace.
pub fn ip_out(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        let _creating = leftovers::creating();
        assert!(
            !Path::new("/var/run/netns").join(name).exists(),
            "namespace {name} already exists"
        );
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Self {
            name: name.to_string(),
        }
    }
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs a command inside a namespace (nsenter) and returns its stdout and stderr.
pub fn ns_out(ns: &str, cmd: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .args(cmd)
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Namespaces left behind by the lab named `prefix` (its namespaces are
/// `<prefix>-<name>`), for the cleanup assertions.
pub fn leftover_namespaces(prefix: &str) -> Vec<String> {
    let prefix = format!("{prefix}-");
    leftovers::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Runs `f` on a thread inside a network namespace.
pub fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = std::fs::File::open(ns).unwrap_or_else(|e| panic!("open {}: {e}", ns.display()));
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// Sends a UDP probe from namespace `from` to `to` (an address inside
/// namespace `to_ns`) and waits for the echo. Returns the source address
/// the receiver saw: the test of "without NAT" and "SNATed".
pub fn udp_probe(from: &Path, to_ns: &Path, to: Ipv4Addr) -> Result<Ipv4Addr, String> {
    static PORT: AtomicU32 = AtomicU32::new(0);
    let port = 20000
        + (std::process::id() % 1000) as u16 * 20
        + (PORT.fetch_add(1, Ordering::Relaxed) % 20) as u16;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = in_netns(to_ns, move || -> Result<Ipv4Addr, String> {
        let sock = std::net::UdpSocket::bind(SocketAddrV4::new(to, port))
            .map_err(|e| format!("bind {to}:{port}: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(3))).ok();
        ready_tx.send(()).ok();
        let mut buf = [0u8; 64];
        let (_, src) = sock
            .recv_from(&mut buf)
            .map_err(|e| format!("nothing arrived at {to}:{port}: {e}"))?;
        sock.send_to(b"echo", src).map_err(|e| e.to_string())?;
        match src {
            std::net::SocketAddr::V4(a) => Ok(*a.ip()),
            _ => Err("IPv6 source".into()),
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(3))
        .map_err(|_| "receiver did not start".to_string())?;
    let sender = in_netns(from, move || -> Result<(), String> {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(3))).ok();
        sock.send_to(b"probe", SocketAddrV4::new(to, port))
            .map_err(|e| format!("send to {to}: {e}"))?;
        let mut buf = [0u8; 16];
        sock.recv_from(&mut buf)
            .map_err(|e| format!("no echo from {to}: {e}"))?;
        Ok(())
    });
    let seen = receiver.join().map_err(|_| "receiver panicked")??;
    sender.join().map_err(|_| "sender panicked")??;
    Ok(seen)
}

/// Connects over TCP from namespace `from` to `to:port`, sends a line and
/// waits for it to come back from a listener on `listen_port` in `server_ns`
/// (which may differ from `port` when a port mapping sits in between).
pub fn tcp_probe(
    from: &Path,
    server_ns: &Path,
    listen_port: u16,
    to: Ipv4Addr,
    port: u16,
) -> Result<(), String> {
    use std::io::{Read, Write};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = in_netns(server_ns, move || -> Result<(), String> {
        let l = std::net::TcpListener::bind(("0.0.0.0", listen_port))
            .map_err(|e| format!("listen :{listen_port}: {e}"))?;
        l.set_nonblocking(false).ok();
        ready_tx.send(()).ok();
        let (mut c, _) = l.accept().map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(3))).ok();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).map_err(|e| e.to_string())?;
        c.write_all(&buf).map_err(|e| e.to_string())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(3))
        .map_err(|_| "listener did not start".to_string())?;
    let client = in_netns(from, move || -> Result<(), String> {
        let addr = std::net::SocketAddr::from((to, port));
        let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        c.set_read_timeout(Some(Duration::from_secs(3))).ok();
        c.write_all(b"hello").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf)
            .map_err(|e| format!("no answer through {addr}: {e}"))?;
        (&buf == b"hello")
            .then_some(())
            .ok_or_else(|| "garbled answer".to_string())
    });
    let c = client.join().map_err(|_| "client panicked")?;
    if c.is_err() {
        // Unblock the listener so its thread ends.
        let _ = in_netns(server_ns, move || {
            std::net::TcpStream::connect(("127.0.0.1", listen_port))
        })
        .join();
    }
    let s = server.join().map_err(|_| "server panicked")?;
    c.and(s)
}

/// Accepts one TCP connection on `ip:port` inside `ns`, echoes what it
/// reads; the handle returns the peer's address.
pub fn tcp_listen(
    ns: &Path,
    ip: Ipv4Addr,
    port: u16,
    wait: Duration,
) -> std::thread::JoinHandle<Result<Ipv4Addr, String>> {
    use std::io::{Read, Write};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = in_netns(ns, move || -> Result<Ipv4Addr, String> {
        let l = std::net::TcpListener::bind(SocketAddrV4::new(ip, port))
            .map_err(|e| format!("listen {ip}:{port}: {e}"))?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        ready_tx.send(()).ok();
        let deadline = std::time::Instant::now() + wait;
        let (mut c, peer) = loop {
            match l.accept() {
                Ok(x) => break x,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(format!("nothing connected to {ip}:{port}: {e}")),
            }
        };
        c.set_nonblocking(false).ok();
        c.set_read_timeout(Some(Duration::from_secs(3))).ok();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).unwrap_or(0);
        c.write_all(&buf[..n]).ok();
        match peer {
            std::net::SocketAddr::V4(a) => Ok(*a.ip()),
            _ => Err("IPv6 peer".into()),
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(3))
        .expect("listener started");
    h
}

pub struct NodeSpec<'a> {
    pub name: &'a str,
    pub instance_type: &'a str,
    pub env: Vec<(&'a str, String)>,
}

pub struct Node {
    instance_type: String,
    env: Vec<(String, String)>,
    state: PathBuf,
    pub ns: Netns,
    pub socket: PathBuf,
    pub instance_id: String,
    pub primary_ip: Ipv4Addr,
    ipamd: Option<std::process::Child>,
    pub log: PathBuf,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.ns.name
    }

    /// ipamd's `--state-dir` (its journal and lock).
    pub fn state_dir(&self) -> &Path {
        &self.state
    }
}

/// A pod wired by vpc-cni.
#[derive(Debug)]
pub struct Pod {
    pub ns: Netns,
    pub container_id: String,
    pub ip: Ipv4Addr,
    pub result: Value,
    pub node: usize,
}

/// What one plugin invocation printed and how it ended.
#[derive(Debug)]
pub struct Invocation {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Invocation {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }
}

static LABS: AtomicU32 = AtomicU32::new(0);

/// The cloud a lab's nodes run ipamd against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    /// ipamd's `--provider sim` on the lab's simulated VPC server.
    Sim,
    /// ipamd's `--provider azure` on the fake ARM and IMDS, served over the
    /// same simulated VPC at 169.254.169.254:80 inside the VPC namespace
    /// (reached from the nodes through their subnet's router, as IMDS is).
    Azure,
}

/// The address the fake ARM and IMDS listen on inside the VPC namespace.
pub const AZURE_ENDPOINT: &str = "169.254.169.254";

pub struct Lab {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub vpc: Arc<Vpc>,
    pub bins: Bins,
    sim_addr: String,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    pub cloud: Cloud,
    /// The fake ARM and IMDS (Azure labs), and its server task.
    pub arm: Option<(
        Arc<vpc_sim::azure::ArmFake>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    )>,
    pub nodes: Vec<Node>,
    pub vpc_ns: Netns,
    pub outside: Netns,
}

impl Lab {
    /// A VPC with an outside network; no nodes yet.
    pub async fn new() -> Lab {
        Self::on(Cloud::Sim).await
    }

    /// [`Lab::new`] whose nodes run ipamd against `cloud`.
    pub async fn on(cloud: Cloud) -> Lab {
        require_root();
        let bins = Bins::find();
        // What killed runs left (their ipamd processes too) goes first.
        leftovers::remove_gone_runs();
        let prefix = format!(
            "{}x{}",
            leftovers::run_tag(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let dir = leftovers::tempdir_in(&std::env::temp_dir());
        let vpc_ns = Netns::new(&format!("{prefix}-vpc"));
        let outside = Netns::new(&format!("{prefix}-out"));
        let subnets: Vec<_> = VpcState::default()
            .subnets
            .values()
            .map(|s| s.cidr)
            .collect();
        let fabric = NetnsFabric::new(&vpc_ns.name, &subnets).expect("vpc fabric");
        // The internet gateway and what lies beyond it.
        ip(&[
            "-n",
            &vpc_ns.name,
            "link",
            "add",
            "vout",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &outside.name,
        ]);
        ip(&[
            "-n",
            &vpc_ns.name,
            "addr",
            "add",
            "100.64.0.1/30",
            "dev",
            "vout",
        ]);
        ip(&["-n", &vpc_ns.name, "link", "set", "vout", "up"]);
        ip(&[
            "-n",
            &vpc_ns.name,
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            "100.64.0.2",
        ]);
        ip(&[
            "-n",
            &vpc_ns.name,
            "route",
            "add",
            EXCLUDED_CIDR,
            "via",
            "100.64.0.2",
        ]);
        ip(&[
            "-n",
            &outside.name,
            "addr",
            "add",
            "100.64.0.2/30",
            "dev",
            "eth0",
        ]);
        ip(&["-n", &outside.name, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &outside.name,
            "addr",
            "add",
            &format!("{INTERNET_HOST}/32"),
            "dev",
            "lo",
        ]);
        ip(&[
            "-n",
            &outside.name,
            "addr",
            "add",
            &format!("{EXCLUDED_HOST}/32"),
            "dev",
            "lo",
        ]);
        ip(&[
            "-n",
            &outside.name,
            "route",
            "add",
            "10.0.0.0/16",
            "via",
            "100.64.0.1",
        ]);
        let vpc = Arc::new(
            Vpc::open(VpcConfig {
                attach_latency: Duration::from_millis(20),
                state_path: Some(dir.path().join("vpc.json")),
                fabric: Some(Arc::new(fabric) as Arc<dyn Fabric>),
                // On Azure, ARM's buckets are the fake's.
                throttling: cloud == Cloud::Sim,
                ..VpcConfig::default()
            })
            .expect("vpc"),
        );
        let sock = dir.path().join("vpc.sock");
        let listener = server::Listener::bind(&SimAddr::Unix(sock.clone()))
            .await
            .expect("bind sim");
        let server = tokio::spawn(server::serve(vpc.clone(), listener));
        let arm = match cloud {
            Cloud::Sim => None,
            Cloud::Azure => {
                // IMDS's well-known address, on the VPC router's loopback.
                ip(&[
                    "-n",
                    &vpc_ns.name,
                    "addr",
                    "add",
                    &format!("{AZURE_ENDPOINT}/32"),
                    "dev",
                    "lo",
                ]);
                let std_listener = in_netns(&vpc_ns.path(), || {
                    std::net::TcpListener::bind((AZURE_ENDPOINT, 80))
                })
                .join()
                .expect("bind thread")
                .expect("bind the fake ARM in the VPC namespace");
                std_listener.set_nonblocking(true).expect("nonblocking");
                let listener =
                    tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
                let fake =
                    vpc_sim::azure::ArmFake::new(vpc.clone(), vpc_sim::azure::ArmConfig::default());
                let task = tokio::spawn(vpc_sim::azure::serve(fake.clone(), listener));
                Some((fake, task))
            }
        };
        Lab {
            cloud,
            arm,
            prefix,
            sim_addr: format!("unix:{}", sock.display()),
            dir,
            vpc,
            bins,
            server,
            nodes: vec![],
            vpc_ns,
            outside,
        }
    }

    /// Boots a node: its namespace, its instance in the VPC, its ipamd.
    pub async fn add_node(&mut self, spec: NodeSpec<'_>) -> usize {
        self.add_node_with_nics(spec, 0).await
    }

    /// [`Lab::add_node`] whose instance is created with `extra` more
    /// interfaces in the node subnet (as an Azure VM is created with its
    /// NICs), tagged as ipamd's so that its pool may use them.
    pub async fn add_node_with_nics(&mut self, spec: NodeSpec<'_>, extra: u32) -> usize {
        let ns = Netns::new(&format!("{}-{}", self.prefix, spec.name));
        let id = match self
            .vpc
            .handle(Request::LaunchInstance {
                name: ns.name.clone(),
                instance_type: spec.instance_type.into(),
                subnet_id: Some(NODE_SUBNET.into()),
            })
            .await
            .expect("launch instance")
        {
            vpc_sim::Reply::InstanceId(id) => id,
            r => panic!("unexpected {r:?}"),
        };
        for _ in 0..extra {
            let nic = match self
                .vpc
                .handle(Request::CreateInterface {
                    subnet_id: NODE_SUBNET.into(),
                    security_groups: vec![],
                    tags: [(
                        providers::tags::OWNER.to_string(),
                        providers::tags::OWNER_VALUE.to_string(),
                    )]
                    .into(),
                    ips: 0,
                    prefixes: 0,
                })
                .await
                .expect("create NIC")
            {
                vpc_sim::Reply::Interface(i) => i.id,
                r => panic!("unexpected {r:?}"),
            };
            self.vpc
                .handle(Request::AttachAtLaunch {
                    interface_id: nic,
                    instance_id: id.clone(),
                })
                .await
                .expect("NIC at launch");
        }
        let primary_ip = self.vpc.snapshot().interfaces
            [&self.vpc.snapshot().instances[&id].primary_interface_id]
            .primary_ip;
        let state = self.dir.path().join(&ns.name);
        std::fs::create_dir_all(&state).unwrap();
        let mut node = Node {
            instance_type: spec.instance_type.to_string(),
            env: spec
                .env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            socket: state.join("ipamd.sock"),
            log: state.join("ipamd.log"),
            state,
            ns,
            instance_id: id,
            primary_ip,
            ipamd: None,
        };
        self.start_ipamd(&mut node).await;
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The state of the VPC router and of every node, for failure messages.
    pub fn diagnose(&self) -> String {
        let mut out = String::new();
        let mut dump = |ns: &str, args: &[&str]| {
            out.push_str(&format!(
                "--- {ns}: ip {}\n{}",
                args.join(" "),
                ip_out(ns, args)
            ));
        };
        dump(&self.vpc_ns.name, &["-br", "addr"]);
        dump(&self.vpc_ns.name, &["route"]);
        dump(&self.vpc_ns.name, &["neigh"]);
        for n in &self.nodes {
            dump(&n.ns.name, &["-br", "addr"]);
            dump(&n.ns.name, &["route", "show", "table", "all"]);
            dump(&n.ns.name, &["rule"]);
            dump(&n.ns.name, &["neigh"]);
        }
        out
    }

    async fn start_ipamd(&self, node: &mut Node) {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        // Dies with the lab, even when the lab is killed (no Drop runs).
        let mut cmd = leftovers::dying_with_this_process("nsenter");
        cmd.arg(format!("--net={}", node.ns.path().display()))
            .arg(self.bins.ipamd())
            .args(["--metrics", "off", "--node-name", &node.ns.name]);
        match self.cloud {
            Cloud::Sim => cmd
                .args(["--provider", "sim", "--sim-server", &self.sim_addr])
                .args(["--sim-instance-type", &node.instance_type]),
            // The VM's managed identity, IMDS and ARM: all the fake's.
            Cloud::Azure => cmd.args(["--provider", "azure"]).args([
                "--azure-arm-endpoint",
                &format!("http://{AZURE_ENDPOINT}"),
                "--azure-imds-endpoint",
                &format!("http://{AZURE_ENDPOINT}"),
            ]),
        };
        cmd.arg("--socket")
            .arg(&node.socket)
            .arg("--state-dir")
            .arg(&node.state)
            .args(["--introspection", "off", "--configure-host", "true"])
            .env("IPAMD_LOG", "info")
            .envs(node.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        let mut child = cmd.spawn().expect("spawn ipamd");
        for _ in 0..200 {
            if let Some(s) = child.try_wait().unwrap() {
                panic!(
                    "ipamd on {} exited with {s}:\n{}",
                    node.ns.name,
                    std::fs::read_to_string(&node.log).unwrap_or_default()
                );
            }
            if ipamd_api::client(&node.socket).await.is_ok() {
                node.ipamd = Some(child);
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("ipamd on {} did not start", node.ns.name);
    }

    /// Kills a node's ipamd (SIGKILL), as a crash would.
    pub fn stop_ipamd(&mut self, node: usize) {
        if let Some(mut c) = self.nodes[node].ipamd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a node's ipamd again with the same state.
    pub async fn restart_ipamd(&mut self, node: usize) {
        self.stop_ipamd(node);
        let mut n = self.nodes.remove(node);
        self.start_ipamd(&mut n).await;
        self.nodes.insert(node, n);
    }

    pub fn node_ipamd_log(&self, node: usize) -> String {
        std::fs::read_to_string(&self.nodes[node].log).unwrap_or_default()
    }

    /// The network configuration every pod of this lab gets.
    pub fn netconf(&self, node: usize, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "vpc-cni",
            "type": "vpc-cni",
            "ipamdSocket": self.nodes[node].socket,
            "mtu": 1500,
            "logFile": self.dir.path().join("plugin.log"),
        })
    }

    /// Runs a plugin binary in the node's namespace, as a runtime would.
    // One parameter per CNI_* variable, plus stdin and extra environment:
    // the call reads like the invocation it makes.
    #[allow(clippy::too_many_arguments)]
    pub fn invoke(
        &self,
        node: usize,
        plugin: &Path,
        command: &str,
        container_id: &str,
        netns: &str,
        ifname: &str,
        conf: &Value,
        extra_env: &[(&str, &str)],
    ) -> Invocation {
        use std::io::Write;
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.nodes[node].ns.path().display()))
            .arg(plugin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env(
                "CNI_PATH",
                format!("{}:/usr/lib/cni", self.bins.cni_dir().display()),
            )
            .envs(extra_env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn plugin");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        Invocation {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Creates a pod namespace and wires it with vpc-cni ADD.
    pub fn add_pod(&self, node: usize, name: &str) -> Pod {
        let ns = Netns::new(&format!("{}-{}", self.prefix, name));
        let container_id = format!("{}-{name}", self.prefix);
        let conf = self.netconf(node, "1.0.0");
        let r = self.invoke(
            node,
            &self.bins.vpc_cni(),
            "ADD",
            &container_id,
            &ns.path().display().to_string(),
            "eth0",
            &conf,
            &[],
        );
        assert!(
            r.ok,
            "ADD {name} failed: {}\n{}\nipamd:\n{}",
            r.stdout,
            r.stderr,
            self.node_ipamd_log(node)
        );
        let result = r.json();
        let ip = result["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        Pod {
            ns,
            container_id,
            ip,
            result,
            node,
        }
    }

    /// vpc-cni DEL with prevResult, then the namespace goes, as a runtime does.
    pub fn del_pod(&self, pod: Pod) -> Invocation {
        let r = self.del_attachment(
            pod.node,
            &pod.container_id,
            &pod.ns.path().display().to_string(),
            &pod.result,
        );
        drop(pod);
        r
    }

    /// vpc-cni DEL of an attachment with its `prevResult`, as a runtime
    /// sends it (also again, later: runtimes retry DELs).
    pub fn del_attachment(
        &self,
        node: usize,
        container_id: &str,
        netns: &str,
        prev: &Value,
    ) -> Invocation {
        let mut conf = self.netconf(node, "1.0.0");
        conf["prevResult"] = prev.clone();
        self.invoke(
            node,
            &self.bins.vpc_cni(),
            "DEL",
            container_id,
            netns,
            "eth0",
            &conf,
            &[],
        )
    }

    /// What a node's ipamd holds for an attachment (GetNetwork).
    pub async fn lookup(&self, node: usize, container_id: &str) -> ipamd_api::v1::DelNetworkReply {
        let mut c = ipamd_api::client(&self.nodes[node].socket).await.unwrap();
        c.get_network(ipamd_api::v1::DelNetworkRequest {
            network_name: "vpc-cni".into(),
            container_id: container_id.into(),
            ifname: "eth0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    }

    /// Waits until a node's ipamd is ready (its readiness latch: the node
    /// side in place and an assignable address), as the kubelet would
    /// before scheduling pods; panics with ipamd's reasons after 30 s.
    pub async fn wait_ready(&self, node: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = ipamd_api::client(&self.nodes[node].socket).await.unwrap();
            let r = c
                .readiness(ipamd_api::v1::ReadinessRequest {})
                .await
                .unwrap()
                .into_inner();
            if r.ready {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ipamd on node {node} never became ready: {:?}\n{}",
                r.reasons,
                self.node_ipamd_log(node)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks a node's ipamd directly (an attachment that is not a wired pod).
    pub async fn reserve(&self, node: usize, id: &str) -> Ipv4Addr {
        let mut c = ipamd_api::client(&self.nodes[node].socket).await.unwrap();
        c.add_network(ipamd_api::v1::AddNetworkRequest {
            network_name: "vpc-cni".into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ipv4_address
        .parse()
        .unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.ipamd.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.server.abort();
        if let Some((_, task)) = &self.arm {
            task.abort();
        }
        // Namespaces go when their fields drop: nodes, then vpc and outside.
    }
}
