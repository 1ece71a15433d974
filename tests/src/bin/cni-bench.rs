//! cni-bench: vpc-cni ADD and DEL against Debian's ptp + host-local, in the
//! same run, alternating, with a fresh pod namespace per cycle. The plugins
//! are executed as a runtime executes them (env + stdin); creating and
//! deleting the namespace is not timed. Needs root; leaves nothing behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use vpc_cni_e2e::{leftovers, require_root, Bins, Netns};

#[derive(Parser)]
#[command(about = "Time vpc-cni ADD/DEL against ptp + host-local")]
struct Cli {
    /// ADD+DEL cycles per plugin.
    #[arg(long, default_value_t = 100)]
    cycles: usize,
    /// Directory of Debian's CNI plugins.
    #[arg(long, default_value = "/usr/lib/cni")]
    peer_dir: PathBuf,
    /// Another vpc-cni binary (another build of it) to time in the same run,
    /// interleaved with the others.
    #[arg(long)]
    candidate: Option<PathBuf>,
}

fn run(
    plugin: &Path,
    cmd: &str,
    id: &str,
    netns: &Path,
    conf: &Value,
    cni_path: &str,
) -> (Duration, Value) {
    let t = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", plugin.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{} {cmd} failed: {}{}",
        plugin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        took,
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
    )
}

struct Stats(Vec<Duration>);

impl Stats {
    fn mean_ms(&self) -> f64 {
        self.0.iter().map(Duration::as_secs_f64).sum::<f64>() / self.0.len().max(1) as f64 * 1e3
    }
    fn p50_ms(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort();
        v.get(v.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    }
}

fn main() {
    let cli = Cli::parse();
    require_root();
    let bins = Bins::find();
    let ptp = cli.peer_dir.join("ptp");
    assert!(
        ptp.is_file() && cli.peer_dir.join("host-local").is_file(),
        "{} needs ptp and host-local: run ./scripts/setup.sh",
        cli.peer_dir.display()
    );
    // Named after the run, as the labs are: what a killed run left is
    // removed by the next (see `leftovers`).
    leftovers::remove_gone_runs();
    let prefix = format!("{}xb", leftovers::run_tag());
    // ipamd's journal on tmpfs, as on a node (/run/vpc-cni is tmpfs there).
    let dir = leftovers::tempdir_in(std::path::Path::new(leftovers::SHM));
    let node = Netns::new(&format!("{prefix}-node"));

    // ipamd in the node namespace on an embedded simulated VPC, pool warm.
    let log = std::fs::File::create(dir.path().join("ipamd.log")).unwrap();
    let socket = dir.path().join("ipamd.sock");
    let mut ipamd = leftovers::dying_with_this_process("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .arg(bins.ipamd())
        .args(["--provider", "sim", "--metrics", "off"])
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--socket")
        .arg(&socket)
        .args([
            "--introspection",
            "off",
            "--sim-instance-type",
            "m5.16xlarge",
            "--sim-attach-latency-ms",
            "0",
        ])
        .env("MINIMUM_IP_TARGET", "200")
        .env("IP_COOLDOWN_PERIOD", "0")
        .env("IPAMD_LOG", "warn")
        .stderr(log)
        .spawn()
        .expect("ipamd");
    // Everything from here runs in the node's namespace, as the runtime
    // does: the plugins are exec'd from it directly.
    let f = std::fs::File::open(node.path()).unwrap();
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter node namespace");
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "ipamd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500)); // let the pool warm

    let vpc_conf = json!({
        "cniVersion": "1.0.0", "name": "vpc-cni", "type": "vpc-cni",
        "ipamdSocket": socket, "mtu": 1500, "logFile": dir.path().join("plugin.log"),
    });
    let ptp_conf = json!({
        "cniVersion": "1.0.0", "name": "ptpnet", "type": "ptp", "ipMasq": false, "mtu": 1500,
        "ipam": {"type": "host-local", "subnet": "10.99.0.0/16", "dataDir": dir.path().join("host-local")},
    });
    let cni_path = format!("{}:{}", bins.cni_dir().display(), cli.peer_dir.display());
    // Each plugin in turn per cycle, so that a slow phase of the machine
    // weighs on all of them alike.
    let mut plugins = vec![
        ("vpc-cni", bins.vpc_cni(), &vpc_conf),
        ("ptp+host-local", ptp.clone(), &ptp_conf),
    ];
    if let Some(c) = &cli.candidate {
        assert!(c.is_file(), "--candidate {} is not a file", c.display());
        plugins.push(("candidate", c.clone(), &vpc_conf));
    }
    let mut add: Vec<Stats> = plugins.iter().map(|_| Stats(vec![])).collect();
    let mut del: Vec<Stats> = plugins.iter().map(|_| Stats(vec![])).collect();
    for i in 0..cli.cycles {
        for (k, (_, plugin, conf)) in plugins.iter().enumerate() {
            let pod = Netns::new(&format!("{prefix}-p{i}-{k}"));
            let id = format!("{prefix}-{i}-{k}");
            let (t_add, result) = run(plugin, "ADD", &id, &pod.path(), conf, &cni_path);
            let mut with_prev = (*conf).clone();
            with_prev["prevResult"] = result;
            let (t_del, _) = run(plugin, "DEL", &id, &pod.path(), &with_prev, &cni_path);
            add[k].0.push(t_add);
            del[k].0.push(t_del);
            drop(pod); // the runtime deletes the namespace after DEL
        }
    }
    // The floor every invocation pays: exec of the binary, VERSION only.
    let mut ver: Vec<Stats> = plugins.iter().map(|_| Stats(vec![])).collect();
    for _ in 0..cli.cycles {
        for (k, (_, plugin, _)) in plugins.iter().enumerate() {
            let (t, _) = run(
                plugin,
                "VERSION",
                "",
                Path::new(""),
                &json!({"cniVersion": "1.0.0"}),
                &cni_path,
            );
            ver[k].0.push(t);
        }
    }
    println!(
        "cni-bench: {} cycles each, fresh namespace per cycle, plugins exec'd as a runtime does",
        cli.cycles
    );
    println!("{:<26} {:>10} {:>10}", "", "mean ms", "p50 ms");
    for (what, stats) in [("VERSION", &ver), ("ADD", &add), ("DEL", &del)] {
        for ((name, _, _), s) in plugins.iter().zip(stats) {
            // VERSION execs the first plugin of a chain only.
            let name = if what == "VERSION" {
                name.split('+').next().unwrap_or(name)
            } else {
                name
            };
            let label = format!("{name} {what}");
            println!("{label:<26} {:>10.2} {:>10.2}", s.mean_ms(), s.p50_ms());
        }
    }
    for (k, (name, _, _)) in plugins.iter().enumerate().filter(|(k, _)| *k != 1) {
        println!(
            "ratio {name}/ptp: ADD {:.2}x (p50 {:.2}x), DEL {:.2}x (target <= 0.25x)",
            add[k].mean_ms() / add[1].mean_ms(),
            add[k].p50_ms() / add[1].p50_ms(),
            del[k].mean_ms() / del[1].mean_ms()
        );
    }
    ipamd.kill().ok();
    ipamd.wait().ok();
}
