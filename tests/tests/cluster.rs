//! The cluster simulator at 200 nodes: invariants, not timings. Every pod
//! is served, no address is on two pods or off its node, no instance or
//! account bucket is exceeded, and one seed gives the same figures twice.

use std::time::Duration;

use vpc_cni_e2e::cluster::{run, ClusterConfig, Policy};

fn config(policy: Policy, seed: u64) -> ClusterConfig {
    let mut c = ClusterConfig::new(200, policy, seed);
    c.horizon = Duration::from_secs(1800);
    c
}

#[test]
fn two_hundred_nodes_cold_start_keeps_every_invariant_and_is_deterministic() {
    for policy in Policy::all() {
        let a = run(&config(policy.clone(), 7));
        assert!(a.violations.is_empty(), "{}: {:?}", a.policy, a.violations);
        assert_eq!(a.pods, 200 * 27, "{}", a.policy);
        assert_eq!(a.pods_served, a.pods, "{}: not every pod served", a.policy);
        assert!(a.all_served_after.is_some());
        assert!(
            a.total_throttled() > 0 || a.policy.contains("prefix"),
            "{}: the account's buckets never throttled; the run shows nothing",
            a.policy
        );
        // Same seed, same run.
        let b = run(&config(policy, 7));
        assert_eq!(a, b, "two runs with one seed differ");
    }
}
