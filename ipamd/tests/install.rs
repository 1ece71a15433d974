//! The chart's install and uninstall steps against a scratch host
//! directory: `ipamctl install-cni` puts the plugin in the CNI bin
//! directory, ipamd writes the conflist once ready (putting the plugin
//! back if it went), and removes both when it stops with
//! IPAMD_CNI_UNINSTALL_ON_EXIT; `ipamctl uninstall-cni` does it by hand.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{free_port, Daemon, DaemonSpec, SimServer};

/// `ipamctl install-cni` of `src` into `bin_dir`, as the init container.
fn install_cni(src: &Path, bin_dir: &Path) -> std::process::Output {
    ipamctl(&[
        "install-cni",
        "--source",
        src.to_str().unwrap(),
        "--bin-dir",
        bin_dir.to_str().unwrap(),
    ])
}

fn ipamctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ipamctl"))
        .args(args)
        .env_clear()
        .output()
        .unwrap()
}

/// The plugin, built next to ipamd (`cargo build --workspace --bins`).
fn plugin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_ipamd")).with_file_name("vpc-cni");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_and_the_conflist_appear_on_install_and_vanish_on_uninstall() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let bin_dir = host.join("opt/cni/bin");
    let conf_dir = host.join("etc/cni/net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let src = plugin();
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // The init container's step.
    let out = install_cni(&src, &bin_dir);
    assert!(out.status.success(), "{out:?}");
    let installed = bin_dir.join("vpc-cni");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&src).unwrap()
    );
    // It runs: the plugin answers VERSION.
    let v = Command::new(&installed)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("supportedVersions"),
        "{v:?}"
    );
    let again = install_cni(&src, &bin_dir);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("up to date"),
        "{again:?}"
    );

    // ipamd writes the conflist once ready (installing the plugin first),
    // and removes both when it stops (uninstall.removeFromNodes sets
    // IPAMD_CNI_UNINSTALL_ON_EXIT).
    let sim = SimServer::start(dir.path(), vpc_sim::VpcConfig::default()).await;
    let (conf_env, bin_env, src_env) = (s(&conf_dir), s(&bin_dir), s(&src));
    let mut d = Daemon::start(&DaemonSpec {
        dir: dir.path(),
        sim: &sim.addr,
        node: "node-a",
        instance_type: "m5.large",
        env: &[
            ("IPAMD_CNI_CONF_DIR", &conf_env),
            ("IPAMD_CNI_BIN_DIR", &bin_env),
            ("IPAMD_CNI_PLUGIN_SOURCE", &src_env),
            ("IPAMD_CNI_UNINSTALL_ON_EXIT", "true"),
        ],
        introspection: free_port(),
    })
    .await;
    let conflist = conf_dir.join("10-vpc-cni.conflist");
    let until = |p: PathBuf, there: bool, what: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.exists() != there {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    until(conflist.clone(), true, "no conflist").await;
    // A plugin removed under a running ipamd (a restart after a stop that
    // removed it) is put back with the conflist's next check.
    std::fs::remove_file(&installed).unwrap();
    until(installed.clone(), true, "the plugin was not put back").await;
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&src).unwrap()
    );

    // The uninstall: ipamd stops, and both go.
    let status = d.terminate().await;
    assert!(status.success(), "{status:?}");
    assert!(!conflist.exists(), "the conflist is still there");
    assert!(!installed.exists(), "the plugin is still there");
    let left: Vec<_> = std::fs::read_dir(&bin_dir)
        .unwrap()
        .chain(std::fs::read_dir(&conf_dir).unwrap())
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // By hand: ipamctl uninstall-cni takes what is vpc-cni's and leaves
    // another tool's conflist.
    let out = install_cni(&src, &bin_dir);
    assert!(out.status.success(), "{out:?}");
    std::fs::write(&conflist, r#"{"plugins":[{"type":"calico"}]}"#).unwrap();
    let out = ipamctl(&[
        "uninstall-cni",
        "--source",
        &s(&src),
        "--bin-dir",
        &s(&bin_dir),
        "--conf-dir",
        &s(&conf_dir),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed"),
        "{out:?}"
    );
    assert!(!installed.exists());
    assert!(conflist.exists(), "another tool's conflist was removed");

    // Bad arguments and a directory that cannot be written.
    assert_eq!(ipamctl(&["install-cni"]).status.code(), Some(64));
    let ro = dir.path().join("a-file");
    std::fs::write(&ro, "x").unwrap();
    let out = ipamctl(&[
        "install-cni",
        "--source",
        &s(&src),
        "--bin-dir",
        &s(&ro.join("bin")),
    ]);
    assert_eq!(out.status.code(), Some(74), "{out:?}");
}
