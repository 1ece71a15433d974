//! The cluster simulator at 200 nodes: invariants, not timings. Every pod
//! is served, no address is on two pods or off its node, no instance or
//! account bucket is exceeded, and one seed gives the same figures twice.

use std::time::Duration;

use vpc_cni_e2e::cluster::{run, AfterStart, ClusterConfig, Policy};

fn config(policy: Policy, seed: u64) -> ClusterConfig {
    let mut c = ClusterConfig::new(200, policy, seed);
    c.horizon = Duration::from_secs(1800);
    c.then = Some(AfterStart {
        scale_down_for: Duration::from_secs(300),
        churn_for: Duration::from_secs(600),
        churn_every: Duration::from_secs(60),
    });
    c
}

#[test]
fn two_hundred_nodes_cold_start_keeps_every_invariant_and_is_deterministic() {
    for policy in Policy::all() {
        let a = run(&config(policy.clone(), 7));
        assert!(a.violations.is_empty(), "{}: {:?}", a.policy, a.violations);
        // Max pods less the two host-network pods, whatever the policy.
        assert_eq!(a.pods, 200 * 27, "{}", a.policy);
        assert_eq!(a.pods_served, a.pods, "{}: not every pod served", a.policy);
        assert!(a.all_served_after.is_some());
        // Scale down and churn ran, and the invariants above held after
        // them too (checked at the end of the run).
        let churn = a.churn.as_ref().expect("churn ran");
        assert!(
            churn.adds > 200 * 5,
            "{}: {} churn ADDs",
            a.policy,
            churn.adds
        );
        let down = a.scale_down.as_ref().expect("scale down ran");
        if a.policy.starts_with("WARM_IP") || a.policy.starts_with("adaptive (") {
            // The policies that move single addresses give them back (whole
            // interfaces stay under WARM_ENI_TARGET, and the pods left
            // still hold part of every prefix).
            assert!(
                down.figures
                    .calls
                    .contains_key("UnassignPrivateIpAddresses"),
                "{}: nothing released after half the pods went: {:?}",
                a.policy,
                down.figures.calls
            );
            // Every node released after the same scale down; their idle
            // buckets spread the releases instead of sending them in one
            // second (a count, not a timing: at most 5% throttled).
            assert!(
                down.figures.total_throttled() * 20 <= down.figures.total_calls(),
                "{}: scale down throttled {:?} of {:?}",
                a.policy,
                down.figures.throttled,
                down.figures.calls
            );
        }
        // Same seed, same run: every phase's figures.
        let b = run(&config(policy, 7));
        assert_eq!(a, b, "two runs with one seed differ");
    }
}

/// Nodes that know the cluster's node count take their share of the
/// account; nodes that each believe they are alone are throttled, and the
/// halving on throttling still gets every pod served.
#[test]
fn the_node_count_keeps_two_hundred_nodes_from_being_throttled() {
    let default = Policy::all().remove(0);
    let mut shared = config(default.clone(), 7);
    shared.then = None;
    let shared = run(&shared);
    let mut alone = config(default, 7);
    alone.then = None;
    alone.count_peers = false;
    let alone = run(&alone);
    for r in [&shared, &alone] {
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.pods_served, r.pods);
    }
    assert!(
        alone.figures.total_throttled() > 10 * shared.figures.total_throttled().max(1),
        "throttled calls: {} knowing the node count, {} without",
        shared.figures.total_throttled(),
        alone.figures.total_throttled()
    );
}

/// Subnet pressure: two nodes on a /26 (59 usable addresses) that cannot
/// hold their 54 pods and the interfaces' own addresses. The full subnet
/// is not asked again at every retry: in an hour each node makes at most
/// its two interfaces' creates plus one probe (of up to four halving
/// calls) per five-minute mark, and lists the subnets about as often.
/// The pods get every address the subnet has, under prefix delegation too
/// (single addresses once no /28 is left).
#[test]
fn a_subnet_too_small_for_the_pods_is_used_up_and_not_asked_at_every_retry() {
    for policy in Policy::all() {
        let mut c = ClusterConfig::new(2, policy, 7);
        c.subnet_prefix_len = 26;
        c.horizon = Duration::from_secs(3600);
        c.then = None;
        let r = run(&c);
        assert!(r.violations.is_empty(), "{}: {:?}", r.policy, r.violations);
        assert_eq!(r.nodes_not_started, 0, "{}", r.policy);
        assert!(r.pods_served < r.pods, "{}: every pod fit", r.policy);
        assert_eq!(
            r.subnet_free_at_end, 0,
            "{}: pods waited while the subnet had addresses ({} served)",
            r.policy, r.pods_served
        );
        for api in ["CreateNetworkInterface", "DescribeSubnets"] {
            let n = r.figures.calls.get(api).copied().unwrap_or(0);
            assert!(
                n <= 2 * (2 + 4 * 12),
                "{}: {n} {api} calls in an hour: {:?}",
                r.policy,
                r.figures.calls
            );
        }
    }
}

/// Churn on nodes at their instance's limit (t2.micro: two pods, one
/// address per interface): the replacing pod finds the departed pod's
/// address in its cooldown and nothing left to grow, so its ADD waits for
/// the cooldown's end (retried as the kubelet retries) and is served then.
/// Every replacement keeps a valid pod name, however many there are.
#[test]
fn churn_at_the_instance_limit_waits_out_the_cooldown_and_serves_every_pod() {
    for policy in Policy::all().into_iter().filter(|p| !p.prefix_delegation()) {
        let mut c = ClusterConfig::new(4, policy, 7);
        c.instance_type = "t2.micro".into();
        c.then = Some(AfterStart {
            scale_down_for: Duration::from_secs(300),
            churn_for: Duration::from_secs(1800),
            churn_every: Duration::from_secs(60),
        });
        let r = run(&c);
        assert!(r.violations.is_empty(), "{}: {:?}", r.policy, r.violations);
        assert_eq!(r.pods_served, r.pods, "{}", r.policy);
        let churn = r.churn.as_ref().expect("churn ran");
        assert_eq!(churn.unserved, 0, "{}: {:?}", r.policy, churn.unserved_why);
        // Thirty replacements per node in 30 minutes, more than the 256
        // bytes a name grown at each replacement would allow.
        assert!(churn.adds >= 4 * 20, "{}: {} ADDs", r.policy, churn.adds);
        // Some ADDs met every address cooling and waited past one ADD
        // wait; none waited past the cooldown plus one wait and a retry.
        assert!(churn.figures.add_failures > 0, "{}", r.policy);
        assert!(
            churn.figures.add_wait_max > Duration::from_secs(10)
                && churn.figures.add_wait_max <= Duration::from_secs(30 + 10 + 2),
            "{}: longest churn ADD {:?}",
            r.policy,
            churn.figures.add_wait_max
        );
    }
}

/// Bad settings are refused together, before anything runs: exit 64 and
/// every one named.
#[test]
fn cluster_sim_refuses_every_bad_setting_at_once() {
    let bin = vpc_cni_e2e::Bins::find().dir.join("cluster-sim");
    let out = std::process::Command::new(&bin)
        .args(["--nodes", "2", "--instance-type", "m9.huge"])
        .args(["--policy", "nonesuch"])
        .args(["--join-within", "60", "--horizon", "30"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(out.stdout.is_empty(), "ran anyway");
    for named in ["\"m9.huge\"", "\"nonesuch\"", "--horizon 30"] {
        assert!(err.contains(named), "{named} not named: {err}");
    }
    // Only policies the instance type cannot run: nothing runs, and it
    // does not pass for a success.
    let out = std::process::Command::new(&bin)
        .args(["--nodes", "2", "--instance-type", "t2.micro"])
        .args(["--policy", "prefix"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("nothing ran"), "{err}");
}
