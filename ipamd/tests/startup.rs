//! Start-up as a DaemonSet would do it: no silent simulated cloud, every
//! bad setting at once, and the readiness latch seen from outside (GET
//! /readyz, the gRPC health service, CNI STATUS).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{free_port, get_any, Daemon, DaemonSpec, SimServer};
use vpc_sim::{Fault, FaultKind, Request, VpcConfig};

fn ipamd_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ipamd"))
}

/// ipamd on the shared simulated VPC at `sim`, with only the given
/// environment; killed when dropped.
fn sim_ipamd(sim: &str, socket: &Path, state: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(ipamd_bin());
    c.args(["--provider", "sim", "--sim-server", sim])
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state)
        .env_clear()
        .kill_on_drop(true);
    c
}

/// The plugin, built next to ipamd (`cargo build --workspace --bins`).
fn plugin_bin() -> PathBuf {
    let p = ipamd_bin().with_file_name("vpc-cni");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

#[test]
fn without_a_provider_setting_ipamd_refuses_to_start_and_lists_every_bad_setting() {
    let dir = tempfile::tempdir().unwrap();
    // As a DaemonSet that forgot IPAMD_PROVIDER would start it.
    let out = std::process::Command::new(ipamd_bin())
        .args(["--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_clear()
        .env("WARM_IP_TARGET", "many")
        .env("IPAMD_INTROSPECTION_ADDR", "not-an-address")
        .env("IPAMD_CONFIGURE_HOST", "yes")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("IPAMD_PROVIDER is not set"), "{err}");
    assert!(err.contains("WARM_IP_TARGET"), "{err}");
    assert!(err.contains("IPAMD_INTROSPECTION_ADDR"), "{err}");
    assert!(err.contains("IPAMD_CONFIGURE_HOST"), "{err}");
    assert!(
        !dir.path().join("state").join("sim-vpc.json").exists(),
        "a simulated VPC was started anyway"
    );
    assert!(!dir.path().join("s.sock").exists());

    // Azure settings that cannot work (an endpoint that is no URL, a
    // workload identity without its tenant and client) and an
    // introspection address off loopback: all named, before anything is
    // started or any cloud asked.
    let out = std::process::Command::new(ipamd_bin())
        .args(["--provider", "azure", "--introspection", "0.0.0.0:61679"])
        .args(["--azure-arm-endpoint", "management.azure.com"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_clear()
        .env("AZURE_FEDERATED_TOKEN", "a-token")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("IPAMD_AZURE_ARM_ENDPOINT"), "{err}");
    assert!(err.contains("AZURE_TENANT_ID"), "{err}");
    assert!(err.contains("AZURE_CLIENT_ID"), "{err}");
    assert!(err.contains("not a loopback address"), "{err}");
}

/// SIGTERM while start-up still waits for the cloud ends ipamd at once
/// (exit 0), with nothing served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_up_is_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        dir.path(),
        VpcConfig {
            timeout_after: Duration::from_millis(300),
            ..VpcConfig::default()
        },
    )
    .await;
    // Every Describe of the instance's interfaces times out: start-up
    // keeps retrying.
    sim.vpc
        .handle(Request::InjectFault(Fault {
            api: Some("DescribeNetworkInterfaces".into()),
            kind: FaultKind::Timeout { applied: false },
            count: 100_000,
        }))
        .await
        .unwrap();
    let socket = dir.path().join("s.sock");
    let mut child = sim_ipamd(&sim.addr, &socket, &dir.path().join("state"))
        .args(["--metrics", "off", "--introspection", "off"])
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "ipamd gave up at start"
    );
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .expect("ipamd did not stop on SIGTERM during start-up")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "a socket was served after SIGTERM");
}

async fn health(socket: &Path, service: &str) -> i32 {
    let conn = ipamd_api::connect_once(socket).await.unwrap();
    let mut c =
        tonic_health::pb::health_client::HealthClient::with_origin(conn, ipamd_api::origin());
    c.check(tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
}

/// Runs the plugin's STATUS against `socket`: (exit ok, stdout).
fn cni_status(socket: &Path) -> (bool, serde_json::Value) {
    use std::io::Write;
    let conf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "vpc-cni",
        "type": "vpc-cni",
        "ipamdSocket": socket,
    });
    let mut child = std::process::Command::new(plugin_bin())
        .env_clear()
        .env("CNI_COMMAND", "STATUS")
        .env("CNI_PATH", "/nonexistent")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    (
        out.status.success(),
        serde_json::from_str(&stdout).unwrap_or(serde_json::Value::String(stdout)),
    )
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_health_and_cni_status_wait_for_an_assignable_address() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(dir.path(), VpcConfig::default()).await;
    // The pool cannot grow at first: every way to get an address fails.
    for api in ["AssignPrivateIpAddresses", "CreateNetworkInterface"] {
        sim.vpc
            .handle(Request::InjectFault(Fault {
                api: Some(api.into()),
                kind: FaultKind::ServerError,
                count: 100_000,
            }))
            .await
            .unwrap();
    }
    let introspection = free_port();
    let mut d = Daemon::start(&DaemonSpec {
        dir: dir.path(),
        sim: &sim.addr,
        node: "node-a",
        instance_type: "t3.small",
        env: &[("WARM_IP_TARGET", "1")],
        introspection,
    })
    .await;
    // Alive, serving the socket, but not ready, and saying why.
    let (code, body) = get_any(introspection, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = get_any(introspection, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no assignable address"), "{body}");
    assert_eq!(
        health(&d.socket, "vpccni.ipamd.v1.Ipamd").await,
        NOT_SERVING
    );
    assert_eq!(health(&d.socket, "").await, NOT_SERVING);
    let (ok, status) = cni_status(&d.socket);
    assert!(!ok, "STATUS succeeded while not ready: {status}");
    assert_eq!(status["code"], 50, "{status}");
    assert!(
        status["details"]
            .as_str()
            .unwrap_or_default()
            .contains("no assignable address"),
        "{status}"
    );

    // The cloud recovers: the pool grows and everything turns ready.
    sim.vpc.handle(Request::ClearFaults).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = get_any(introspection, "/readyz").await;
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready: {body}\n{}",
            std::fs::read_to_string(&d.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The health service follows within its 500 ms poll.
    let deadline = Instant::now() + Duration::from_secs(5);
    while health(&d.socket, "vpccni.ipamd.v1.Ipamd").await != SERVING {
        assert!(Instant::now() < deadline, "health never turned SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health(&d.socket, "").await, SERVING);
    let (ok, status) = cni_status(&d.socket);
    assert!(ok, "STATUS failed while ready: {status}");
    assert!(d.terminate().await.success());
}

/// A second ipamd on a state directory in use (as a DaemonSet's old and new
/// pod could overlap) exits 69 naming the holder, and leaves the running
/// ipamd's journal alone: the same file, still linked, and every assignment
/// acknowledged before and after survives a crash of the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ipamd_on_the_same_state_directory_exits_69_and_touches_nothing() {
    use std::os::unix::fs::MetadataExt;
    use support::add_request;

    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(dir.path(), VpcConfig::default()).await;
    let spec = |port| DaemonSpec {
        dir: dir.path(),
        sim: &sim.addr,
        node: "lock-node",
        instance_type: "m5.large",
        env: &[("WARM_IP_TARGET", "2")],
        introspection: port,
    };
    let mut first = Daemon::start(&spec(free_port())).await;
    let mut c = ipamd_api::client(&first.socket).await.unwrap();
    for id in ["a", "b", "c"] {
        c.add_network(add_request(id)).await.expect("ADD");
    }
    let inode = std::fs::metadata(first.journal()).unwrap().ino();

    // Same socket and state directory, and then another socket on the
    // same state directory: both refused before the journal is read.
    for socket in [first.socket.clone(), dir.path().join("other.sock")] {
        let out = sim_ipamd(&sim.addr, &socket, &first.state_dir)
            .args(["--metrics", "off", "--node-name", "lock-node"])
            .args(["--introspection", "off"])
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), out)
            .await
            .expect("the second ipamd exits at once")
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{err}");
        assert!(
            err.contains(&format!("locked by another ipamd (pid {})", first.pid())),
            "{err}"
        );
        let meta = std::fs::metadata(first.journal()).expect("journal still there");
        assert_eq!(
            meta.ino(),
            inode,
            "the running ipamd's journal was replaced"
        );
        assert!(
            first.socket.exists(),
            "the running ipamd's socket was removed"
        );
    }
    assert!(!dir.path().join("other.sock").exists());

    c.add_network(add_request("d")).await.expect("ADD after");
    let before = {
        let mut a = first.assignments().await;
        a.sort();
        a
    };
    assert_eq!(before.len(), 4);
    first.kill().await;
    let again = Daemon::start(&spec(free_port())).await;
    let mut after = again.assignments().await;
    after.sort();
    assert_eq!(after, before, "assignments lost across the crash");
}

/// aws-node's variables at start: refused ones stop ipamd with exit 64
/// naming each; warned ones are logged; the ones main reads take effect
/// (INTROSPECTION_BIND_ADDRESS, DISABLE_METRICS, DISABLE_INTROSPECTION,
/// AWS_VPC_K8S_CNI_BACKING_STORE, MY_NODE_NAME).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_node_variables_are_honoured_warned_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(dir.path(), VpcConfig::default()).await;
    let base = |state: &str| {
        let socket = dir.path().join(format!("{state}.sock"));
        let mut c = sim_ipamd(&sim.addr, &socket, &dir.path().join(state));
        c.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };

    // Refused: exit 64, every one named.
    let out = base("refused")
        .env("ENABLE_POD_ENI", "true")
        .env("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "TRUE")
        .env("ENABLE_IPv4", "true")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("ENABLE_POD_ENI=\"true\" is aws-node's and is not supported"),
        "{err}"
    );
    // Custom networking is honoured, but only with Kubernetes (where the
    // node's ENIConfig is).
    assert!(
        err.contains("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true: custom networking needs Kubernetes"),
        "{err}"
    );
    assert!(!err.contains("ENABLE_IPv4"), "{err}");

    // Honoured and warned, on a running ipamd.
    let ports = support::free_ports(2);
    let checkpoint = dir.path().join("aws-node-ipam.json");
    std::fs::write(
        &checkpoint,
        r#"{"version":"vpc-cni-ipam/1","allocations":[]}"#,
    )
    .unwrap();
    let mut child = base("honoured")
        .env("INTROSPECTION_BIND_ADDRESS", ports[0].to_string())
        .env("IPAMD_METRICS_ADDR", ports[1].to_string())
        .env("DISABLE_METRICS", "true")
        .env("AWS_VPC_K8S_CNI_BACKING_STORE", &checkpoint)
        .env("MY_NODE_NAME", "from-my-node-name")
        .env("AWS_VPC_K8S_CNI_LOGLEVEL", "DEBUG")
        .spawn()
        .unwrap();
    let mut up = false;
    for _ in 0..400 {
        if support::get(ports[0], "/healthz").await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "introspection at INTROSPECTION_BIND_ADDRESS");
    assert!(
        tokio::net::TcpStream::connect(ports[1]).await.is_err(),
        "DISABLE_METRICS=true left the metrics listener on"
    );
    assert!(sim
        .vpc
        .snapshot()
        .instances
        .values()
        .any(|i| i.name == "from-my-node-name"));
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("AWS_VPC_K8S_CNI_LOGLEVEL=\"DEBUG\" has no effect in vpc-cni"),
        "{log}"
    );
    assert!(log.contains("imported aws-node's allocations"), "{log}");

    // DISABLE_INTROSPECTION=true: no introspection listener.
    let port = support::free_port();
    let mut child = base("nointro")
        .env("INTROSPECTION_BIND_ADDRESS", port.to_string())
        .env("DISABLE_INTROSPECTION", "true")
        .env("IPAMD_METRICS_ADDR", "off")
        .spawn()
        .unwrap();
    let sock = dir.path().join("nointro.sock");
    for _ in 0..400 {
        if ipamd_api::client(&sock).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ipamd_api::client(&sock).await.is_ok(), "ipamd serves");
    assert!(tokio::net::TcpStream::connect(port).await.is_err());
    child.start_kill().unwrap();
}

/// The conflist is written only once ipamd is ready, whole, with the
/// chained plugins after vpc-cni; it stays when ipamd stops, unless a clean
/// uninstall asks for it to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cni_configuration_is_written_once_ready_and_removed_only_on_uninstall() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(dir.path(), VpcConfig::default()).await;
    // No address can be had: ipamd is not ready.
    sim.vpc
        .handle(vpc_sim::Request::InjectFault(Fault {
            api: Some("AssignPrivateIpAddresses".into()),
            kind: FaultKind::PermissionDenied,
            count: 1000,
        }))
        .await
        .unwrap();
    let conf_dir = dir.path().join("net.d");
    let conflist = conf_dir.join("10-vpc-cni.conflist");
    let conf_dir_s = conf_dir.display().to_string();
    let start = |env: &[(&'static str, &str)]| {
        let env: Vec<(&'static str, String)> =
            env.iter().map(|(k, v)| (*k, v.to_string())).collect();
        let (dir, sim) = (dir.path().to_path_buf(), sim.addr.clone());
        async move {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            Daemon::start(&DaemonSpec {
                dir: &dir,
                sim: &sim,
                node: "conf-node",
                instance_type: "m5.large",
                env: &env,
                introspection: free_port(),
            })
            .await
        }
    };
    let env = [
        ("IPAMD_CNI_CONF_DIR", conf_dir_s.as_str()),
        ("IPAMD_CNI_VERSION", "0.3.1"),
        (
            "IPAMD_CHAINED_PLUGINS",
            r#"[{"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}]"#,
        ),
    ];
    let mut d = start(&env).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!conflist.exists(), "written before ipamd was ready");
    assert_eq!(get_any(d.introspection, "/readyz").await.0, 503);
    sim.vpc.handle(vpc_sim::Request::ClearFaults).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !conflist.exists() {
        assert!(Instant::now() < deadline, "never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get_any(d.introspection, "/readyz").await.0, 200);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(v["cniVersion"], "0.3.1");
    assert_eq!(v["name"], "vpc-cni");
    assert_eq!(v["plugins"][0]["type"], "vpc-cni");
    assert_eq!(
        v["plugins"][0]["ipamdSocket"],
        d.socket.display().to_string()
    );
    assert_eq!(v["plugins"][1]["type"], "portmap");
    assert_eq!(
        std::fs::read_dir(&conf_dir).unwrap().count(),
        1,
        "a temporary file was left"
    );
    // Removed by someone else while ipamd runs: put back.
    std::fs::remove_file(&conflist).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !conflist.exists() {
        assert!(Instant::now() < deadline, "not put back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A restart or rolling update: the node keeps its network.
    assert!(d.terminate().await.success());
    assert!(conflist.exists(), "removed on an ordinary stop");

    // A clean uninstall removes it.
    let env = [
        ("IPAMD_CNI_CONF_DIR", conf_dir_s.as_str()),
        ("IPAMD_CNI_UNINSTALL_ON_EXIT", "true"),
    ];
    let mut d = start(&env).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_any(d.introspection, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The configuration now has no chained plugins: rewritten.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
        if v["plugins"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "not rewritten: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(d.terminate().await.success());
    assert!(!conflist.exists(), "not removed on uninstall");

    // Bad settings: exit 64, each named.
    let out = tokio::process::Command::new(ipamd_bin())
        .args(["--provider", "sim", "--metrics", "off"])
        .env_clear()
        .env("IPAMD_CNI_CONF_DIR", &conf_dir)
        .env("IPAMD_CHAINED_PLUGINS", r#"[{"name": "no type"}]"#)
        .env("IPAMD_CNI_VERSION", "0.2.0")
        .env("IPAMD_CNI_CONFLIST_FILE", "../escape.conflist")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for k in [
        "IPAMD_CHAINED_PLUGINS[0]",
        "IPAMD_CNI_VERSION",
        "IPAMD_CNI_CONFLIST_FILE",
    ] {
        assert!(err.contains(k), "{k}: {err}");
    }
}

/// A --socket that names an existing regular file (a typo) is refused with
/// exit 69, and the file is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_path_that_is_a_regular_file_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, b"keep me").unwrap();
    let out = tokio::process::Command::new(ipamd_bin())
        .args([
            "--provider",
            " sim ",
            "--metrics",
            "off",
            "--introspection",
            "off",
        ])
        .arg("--socket")
        .arg(&file)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_clear()
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}
