//! `cluster-sim`: N simulated nodes on one simulated EC2 account, each with
//! ipamd's production pool and reconciler, for every pool policy in one
//! run: a cold start (time until every pod has an address against the
//! floor the account's buckets allow, ADD waits, calls and throttles, idle
//! addresses), then a scale down and steady churn; and the simulator's own
//! wall time and peak RSS.

use std::time::{Duration, Instant};

use clap::Parser;
use vpc_cni_e2e::cluster::{run, AfterStart, ClusterConfig, Policy};

/// The longest simulated time a flag takes, in seconds.
const WEEK: u64 = 7 * 24 * 3600;

#[derive(Parser, Debug)]
#[command(about = "A cluster on one simulated EC2 account: cold start, scale down, churn")]
struct Args {
    /// Nodes.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    nodes: u64,
    /// Seed of every jitter (same seed, same figures).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Instance type of every node.
    #[arg(long, default_value = "m5.large")]
    instance_type: String,
    /// Seconds over which the nodes join.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(..=WEEK))]
    join_within: u64,
    /// Simulated seconds after which a run stops.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(..=WEEK))]
    horizon: u64,
    /// Only policies whose name contains this.
    #[arg(long)]
    policy: Option<String>,
    /// Prefix length (10 to 28) of the one subnet the nodes and their pods
    /// take addresses from (a smaller subnet: subnet pressure).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u8).range(10..=28))]
    subnet: u8,
    /// Stop after the cold start (no scale down, no churn).
    #[arg(long)]
    cold_start_only: bool,
    /// Also run each policy with nodes that do not know the cluster's node
    /// count (each believes it is alone until throttled), the peer.
    #[arg(long)]
    with_alone: bool,
    /// Also run each policy with every node's grow calls taking their
    /// share of every node, not of the nodes that grow (no growers count).
    #[arg(long)]
    with_node_count_only: bool,
    /// Simulated seconds for the pools to shrink after half the pods go.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(..=WEEK))]
    scale_down_for: u64,
    /// Simulated seconds of steady churn.
    #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(..=WEEK))]
    churn_for: u64,
    /// Mean seconds between pod replacements on each node during churn.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=WEEK))]
    churn_every: u64,
}

/// "Api calls (throttled), ..." per API.
fn per_api(
    calls: &std::collections::BTreeMap<String, u64>,
    throttled: &std::collections::BTreeMap<String, u64>,
) -> String {
    calls
        .iter()
        .map(|(k, v)| format!("{k} {v} ({})", throttled.get(k).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

fn main() {
    let a = Args::parse();
    // Every bad setting at once.
    let mut bad = vec![];
    let limits = providers::limits::lookup(&a.instance_type)
        .filter(|t| t.family != providers::limits::Family::Azure)
        .map(|t| t.limits);
    if limits.is_none() {
        bad.push(format!(
            "unknown instance type {:?} (EC2's names, e.g. m5.large: the simulated account is EC2's)",
            a.instance_type
        ));
    }
    if let Some(p) = a
        .policy
        .as_ref()
        .filter(|p| !Policy::all().iter().any(|x| x.name.contains(p.as_str())))
    {
        let names: Vec<_> = Policy::all().iter().map(|x| x.name).collect();
        bad.push(format!("no policy matches {p:?} (the policies: {names:?})"));
    }
    if a.horizon <= a.join_within {
        bad.push(format!(
            "--horizon {} is not after --join-within {}: nodes joining late would never be waited for",
            a.horizon, a.join_within
        ));
    }
    let Some(limits) = limits.filter(|_| bad.is_empty()) else {
        for b in &bad {
            eprintln!("cluster-sim: {b}");
        }
        std::process::exit(64);
    };
    let mut failed = false;
    let mut ran = 0;
    println!(
        "cluster-sim: {} x {}, joining within {} s, one account (EC2's documented buckets), seed {}",
        a.nodes, a.instance_type, a.join_within, a.seed
    );
    println!(
        "{:<44} {:>9} {:>8} {:>6} {:>22} {:>8} {:>7} {:>12} {:>8}",
        "policy",
        "served s",
        "floor s",
        "ratio",
        "ADD wait p50/p99/max s",
        "calls",
        "thr %",
        "idle mean/pk",
        "retries"
    );
    let wall = Instant::now();
    // (policy, nodes learn the node count, and the growers count)
    let runs: Vec<(Policy, bool, bool)> = Policy::all()
        .into_iter()
        .flat_map(|p| {
            let nodes_only = a.with_node_count_only.then(|| (p.clone(), true, false));
            let alone = a.with_alone.then(|| (p.clone(), false, false));
            std::iter::once((p, true, true))
                .chain(nodes_only)
                .chain(alone)
        })
        .collect();
    for (policy, count_peers, count_growers) in runs {
        if a.policy
            .as_ref()
            .is_some_and(|p| !policy.name.contains(p.as_str()))
        {
            continue;
        }
        if policy.prefix_delegation() && !limits.prefix_delegation {
            println!(
                "{:<44} skipped: {} does not support prefix delegation",
                policy.name, a.instance_type
            );
            continue;
        }
        ran += 1;
        let mut cfg = ClusterConfig::new(a.nodes as usize, policy, a.seed);
        cfg.count_peers = count_peers;
        cfg.count_growers = count_growers;
        cfg.instance_type = a.instance_type.clone();
        cfg.join_within = Duration::from_secs(a.join_within);
        cfg.horizon = Duration::from_secs(a.horizon);
        cfg.subnet_prefix_len = a.subnet;
        cfg.then = (!a.cold_start_only).then(|| AfterStart {
            scale_down_for: Duration::from_secs(a.scale_down_for),
            churn_for: Duration::from_secs(a.churn_for),
            churn_every: Duration::from_secs(a.churn_every),
        });
        let t = Instant::now();
        let r = run(&cfg);
        let served = r
            .all_served_after
            .map_or_else(|| format!(">{}", a.horizon), secs);
        let thr =
            100.0 * r.figures.total_throttled() as f64 / r.figures.total_calls().max(1) as f64;
        let name = match (count_peers, count_growers) {
            (true, true) => r.policy.clone(),
            (true, false) => format!("{} NODES", r.policy),
            (false, _) => format!("{} ALONE", r.policy),
        };
        println!(
            "{:<44} {:>9} {:>8} {:>6} {:>22} {:>8} {:>7.1} {:>12} {:>8}",
            name,
            served,
            secs(r.floor),
            r.ratio().map_or("-".into(), |x| format!("{x:.2}")),
            format!(
                "{}/{}/{}",
                secs(r.figures.add_wait_p50),
                secs(r.figures.add_wait_p99),
                secs(r.figures.add_wait_max)
            ),
            r.figures.total_calls(),
            thr,
            format!("{:.0}/{}", r.figures.idle_mean, r.figures.idle_peak),
            r.figures.add_failures,
        );
        println!(
            "    {} of {} pods served; calls (throttled) per API: {}; {:.1} s wall",
            r.pods_served,
            r.pods,
            per_api(&r.figures.calls, &r.figures.throttled),
            t.elapsed().as_secs_f64()
        );
        if let Some(d) = &r.scale_down {
            println!(
                "    scale down (half of every node's pods deleted, {} s): {} calls ({} throttled): {}; idle mean/peak/end {:.0}/{}/{}",
                a.scale_down_for,
                d.figures.total_calls(),
                d.figures.total_throttled(),
                per_api(&d.figures.calls, &d.figures.throttled),
                d.figures.idle_mean,
                d.figures.idle_peak,
                d.idle_end
            );
        }
        if let Some(c) = &r.churn {
            println!(
                "    churn (a pod replaced per node every {} s on average, {} s): {} ADDs ({} never served), wait p50/p99/max {}/{}/{} s, {} retries, {} calls ({} throttled): {}; idle mean/peak {:.0}/{}",
                a.churn_every,
                a.churn_for,
                c.adds,
                c.unserved,
                secs(c.figures.add_wait_p50),
                secs(c.figures.add_wait_p99),
                secs(c.figures.add_wait_max),
                c.figures.add_failures,
                c.figures.total_calls(),
                c.figures.total_throttled(),
                per_api(&c.figures.calls, &c.figures.throttled),
                c.figures.idle_mean,
                c.figures.idle_peak
            );
        }
        if let Some(why) = r.churn.as_ref().and_then(|c| c.unserved_why.as_ref()) {
            println!("    churn: the first pod never served: {why}");
        }
        if r.pods_served < r.pods {
            println!(
                "    {} pods unserved; {} addresses left free in the subnet",
                r.pods - r.pods_served,
                r.subnet_free_at_end
            );
        }
        if !r.violations.is_empty()
            || r.pods_served < r.pods
            || r.churn.as_ref().is_some_and(|c| c.unserved > 0)
        {
            failed = true;
        }
        for v in &r.violations {
            println!("    INVARIANT BROKEN: {v}");
        }
        if let Some(why) = &r.not_started_why {
            println!(
                "    {} node(s) did not start, their pods unserved; the first: {why}",
                r.nodes_not_started
            );
        }
    }
    println!(
        "simulator: {:.1} s wall, peak RSS {:.0} MiB",
        wall.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    if ran == 0 {
        eprintln!(
            "cluster-sim: nothing ran: {} supports none of the policies chosen (see above)",
            a.instance_type
        );
        std::process::exit(64);
    }
    if failed {
        eprintln!(
            "cluster-sim: not every pod was served (in the cold start or in churn), or an invariant broke (see above)"
        );
        std::process::exit(1);
    }
}
