//! A real container runtime calls the plugin: podman (runc, cgroupfs, CNI
//! backend, a busybox rootfs) starts a container on a node of the lab,
//! vpc-cni wires it, and the container reaches a pod on another node.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use vpc_cni_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_container_wired_by_vpc_cni_reaches_another_pod() {
    require_root();
    for tool in ["podman", "runc"] {
        assert!(
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} missing: run ./scripts/setup.sh"
        );
    }
    assert!(
        std::path::Path::new("/bin/busybox").is_file(),
        "busybox-static missing: run ./scripts/setup.sh"
    );
    let mut lab = Lab::new().await;
    let prefix = lab.prefix.clone();
    let a = lab
        .add_node(NodeSpec {
            name: "a",
            instance_type: "m5.large",
            env: vec![],
        })
        .await;
    let b = lab
        .add_node(NodeSpec {
            name: "b",
            instance_type: "m5.large",
            env: vec![],
        })
        .await;
    let peer = lab.add_pod(b, "peer");

    // What podman needs: a rootfs, a CNI network, and its own storage.
    let d = lab.dir.path().join("podman");
    let rootfs = d.join("rootfs");
    for sub in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    let confdir = d.join("net.d");
    std::fs::create_dir_all(&confdir).unwrap();
    let net = format!("{prefix}net");
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": net,
        "plugins": [{"type": "vpc-cni", "ipamdSocket": lab.nodes[a].socket, "mtu": 1500, "logFile": lab.dir.path().join("plugin.log")}],
    });
    std::fs::write(
        confdir.join(format!("{net}.conflist")),
        conflist.to_string(),
    )
    .unwrap();
    let containers_conf = d.join("containers.conf");
    std::fs::write(
        &containers_conf,
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n[engine]\nevents_logger = \"file\"\n",
            lab.bins.cni_dir().display(),
            confdir.display()
        ),
    )
    .unwrap();

    let port = 31000 + (std::process::id() % 1000) as u16;
    let listener = tcp_listen(&peer.ns.path(), peer.ip, port, Duration::from_secs(90));
    let script = format!(
        "/bin/busybox ip -4 -o addr show eth0; echo probe | /bin/busybox nc -w 3 {} {port}",
        peer.ip
    );
    let node_ns = lab.nodes[a].ns.path();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg("90")
            .arg("nsenter")
            .arg(format!("--net={}", node_ns.display()))
            .arg("podman")
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args([
                "--storage-driver",
                "vfs",
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--network-backend",
                "cni",
            ])
            .args(["run", "--rm", "--network", &net])
            .args([
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=4096:4096",
            ])
            .arg("--rootfs")
            .arg(&rootfs)
            .args(["/bin/busybox", "sh", "-c", &script])
            .env("CONTAINERS_CONF", &containers_conf)
            .output()
            .expect("run podman")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podman failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let container_ip: std::net::Ipv4Addr = stdout
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no address in the container's output: {stdout}"));
    let seen = listener
        .join()
        .unwrap()
        .expect("the container connected to the pod");
    assert_eq!(
        seen, container_ip,
        "the pod saw another source than the container's address"
    );
    // --rm ran DEL: nothing of the container is left on the node.
    let node = &lab.nodes[a].ns.name;
    assert!(
        !ip_out(node, &["rule"]).contains(&format!("{container_ip} ")),
        "rule left after podman --rm"
    );
    assert!(
        !ip_out(node, &["route"]).contains(&format!("{container_ip} ")),
        "route left after podman --rm"
    );
    drop(peer);
    drop(lab);
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
}
