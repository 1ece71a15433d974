//! A real full disk: the real ipamd binary with its state directory on a
//! small tmpfs (in a mount namespace of its own, so nothing is mounted on
//! the machine), filled until a journal write fails with ENOSPC, then
//! freed. Needs root; fails (never skips) without it.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{add_request as add, del_request as del};
use support::{free_port, get_any, Daemon, DaemonSpec, SimServer};
use vpc_sim::VpcConfig;

/// Writes zeros to `path` until the file system is full; returns the
/// bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("create the filler");
    let chunk = [0u8; 4096];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_full_disk_fails_calls_and_readiness_until_space_returns() {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "this test mounts a tmpfs in a mount namespace: run it as root (CI does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(dir.path(), VpcConfig::default()).await;
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let introspection = free_port();
    // ipamd in a private mount namespace with a 256 KiB tmpfs on its state
    // directory; the socket stays outside it.
    let script = "mount -t tmpfs -o size=256k vpc-cni-test \"$0\" && exec \"$@\"";
    let state_arg = state.to_str().unwrap().to_string();
    let mut d = Daemon::start_wrapped(
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            &state_arg,
        ],
        Path::new(env!("CARGO_BIN_EXE_ipamd")),
        &DaemonSpec {
            dir: dir.path(),
            sim: &sim.addr,
            node: "node-a",
            instance_type: "m5.large",
            env: &[("WARM_IP_TARGET", "3"), ("IP_COOLDOWN_PERIOD", "0")],
            introspection,
        },
    )
    .await;
    // The state directory as ipamd sees it: its tmpfs, not ours.
    let seen: PathBuf = format!("/proc/{}/root{}", d.pid(), state.display()).into();
    assert!(
        seen.join("ipamd.journal").exists(),
        "no journal in ipamd's tmpfs"
    );
    assert!(
        !state.join("ipamd.journal").exists(),
        "the tmpfs is not private to ipamd"
    );
    let mut c = ipamd_api::client(&d.socket).await.unwrap();
    c.add_network(add("before")).await.expect("ADD with room");

    // Fill the tmpfs; ADD and DEL until a journal write meets ENOSPC
    // (a write can still fit in the journal's last page at first).
    let filler = seen.join("filler");
    let filled = fill(&filler);
    assert!(filled > 0);
    let mut failed = None;
    for i in 0..200 {
        let id = format!("p{i}");
        match c.add_network(add(&id)).await {
            Ok(_) => {
                if let Err(s) = c.del_network(del(&id)).await {
                    failed = Some(s);
                    break;
                }
            }
            Err(s) => {
                failed = Some(s);
                break;
            }
        }
    }
    let failed = failed.expect("no journal write ever failed on a full tmpfs");
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    assert!(
        failed.message().contains("No space left on device")
            || failed.message().contains("unusable"),
        "{failed:?}"
    );
    // Refusing every call: neither healthy nor ready, and saying why.
    let (code, body) = get_any(introspection, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    let (code, body) = get_any(introspection, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot be written"), "{body}");
    assert!(c.add_network(add("during")).await.is_err());

    // Space returns: ipamd recovers by itself (the reconciler rewrites the
    // journal within its 5 s pass) and serves again.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = get_any(introspection, "/healthz").await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never healthy again: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = get_any(introspection, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    c.add_network(add("after"))
        .await
        .expect("ADD after recovery");
    c.del_network(del("before"))
        .await
        .expect("DEL after recovery");
    // What the journal says is what was acknowledged: "after" only (every
    // p<i> that was added was deleted, or its ADD failed).
    let replayed = ipamd::journal::replay(&seen.join("ipamd.journal")).unwrap();
    let held: Vec<&str> = replayed
        .assignments
        .keys()
        .map(|k| k.container_id.as_str())
        .collect();
    assert_eq!(held, vec!["after"], "{replayed:?}");
    assert!(d.terminate().await.success());
}
