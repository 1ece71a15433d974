//! Table tests for the pool policy. Each case drives `plan` to a fixed point
//! on a model node, adding pods one at a time (as a node fills up), and checks
//! the interfaces and addresses it ends with. The aws-node cases come from
//! aws-node's docs/eni-and-ip-target.md and docs/prefix-and-ip-target.md.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipamd::policy::{
    plan, Action, Blocked, IfaceView, PoolConfig, PoolView, PrefixView, PREFIX_SIZE,
};
use providers::{limits, AssignRequest};
use tokio::time::Instant;

/// A model node: interfaces with addresses, pods placed fullest-first.
struct Node {
    view: PoolView,
    next_ip: u32,
    next_id: u32,
    now: Instant,
}

fn node(instance_type: &str) -> Node {
    let info = limits::lookup(instance_type).expect("known type");
    let now = Instant::now();
    Node {
        view: PoolView {
            interfaces: vec![IfaceView {
                id: "eni-0".into(),
                subnet_id: "subnet-node".into(),
                subnet_full: false,
                device_index: 0,
                attached_at: now,
                ips: 0,
                prefixes: vec![],
                assigned: 0,
                cooling: 0,
                free_ips: vec![],
            }],
            limits: info.limits,
            hot_attach: true,
            waiting: 0,
            subnet_low: false,
            adaptive_warm: 0,
        },
        next_ip: u32::from(Ipv4Addr::new(10, 0, 0, 0)),
        next_id: 1,
        now,
    }
}

impl Node {
    fn ips(&mut self, n: u32) -> Vec<Ipv4Addr> {
        (0..n)
            .map(|_| {
                self.next_ip += 1;
                Ipv4Addr::from(self.next_ip)
            })
            .collect()
    }

    fn prefixes(&mut self, n: u32) -> Vec<PrefixView> {
        (0..n)
            .map(|_| {
                self.next_ip = (self.next_ip | 15) + 1;
                let p = PrefixView {
                    prefix: ipnet::Ipv4Net::new(Ipv4Addr::from(self.next_ip), 28).unwrap(),
                    in_use: 0,
                };
                self.next_ip += 15;
                p
            })
            .collect()
    }

    fn iface(&mut self, id: &str) -> &mut IfaceView {
        self.view
            .interfaces
            .iter_mut()
            .find(|i| i.id == id)
            .expect("iface")
    }

    /// Applies one action as the reconciler would after the cloud said yes.
    fn apply(&mut self, a: &Action) {
        match a {
            Action::AssignIps {
                interface_id,
                count,
            } => {
                let ips = self.ips(*count);
                let i = self.iface(interface_id);
                i.ips += count;
                i.free_ips.extend(ips);
            }
            Action::AssignPrefixes {
                interface_id,
                count,
            } => {
                let p = self.prefixes(*count);
                self.iface(interface_id).prefixes.extend(p);
            }
            Action::CreateInterface { initial } => {
                let id = format!("eni-{}", self.next_id);
                let index = (1..)
                    .find(|x| !self.view.interfaces.iter().any(|i| i.device_index == *x))
                    .unwrap();
                self.next_id += 1;
                self.view.interfaces.push(IfaceView {
                    id: id.clone(),
                    subnet_id: "subnet-node".into(),
                    subnet_full: false,
                    device_index: index,
                    attached_at: self.now,
                    ips: 0,
                    prefixes: vec![],
                    assigned: 0,
                    cooling: 0,
                    free_ips: vec![],
                });
                match initial {
                    AssignRequest::Ips(n) => self.apply(&Action::AssignIps {
                        interface_id: id,
                        count: *n,
                    }),
                    AssignRequest::Prefixes(n) => self.apply(&Action::AssignPrefixes {
                        interface_id: id,
                        count: *n,
                    }),
                }
            }
            Action::ReleaseIps { interface_id, ips } => {
                let i = self.iface(interface_id);
                for ip in ips {
                    let pos = i
                        .free_ips
                        .iter()
                        .position(|x| x == ip)
                        .expect("releasing a free ip");
                    i.free_ips.remove(pos);
                    i.ips -= 1;
                }
            }
            Action::ReleasePrefixes {
                interface_id,
                prefixes,
            } => {
                let i = self.iface(interface_id);
                for p in prefixes {
                    let pos = i
                        .prefixes
                        .iter()
                        .position(|x| x.prefix == *p)
                        .expect("prefix");
                    assert_eq!(i.prefixes[pos].in_use, 0, "released a prefix in use");
                    i.prefixes.remove(pos);
                }
            }
            Action::DeleteInterface { interface_id } => {
                let i = self.iface(interface_id);
                assert_eq!(i.assigned + i.cooling, 0, "deleted an interface in use");
                assert_ne!(i.device_index, 0, "deleted the primary interface");
                self.view.interfaces.retain(|i| i.id != *interface_id);
            }
        }
    }

    /// Plans and applies until the plan is empty; returns the last plan.
    fn converge(&mut self, cfg: &PoolConfig) -> Option<Blocked> {
        for _ in 0..200 {
            let p = plan(&self.view, cfg, self.now);
            if p.actions.is_empty() {
                return p.blocked;
            }
            for a in &p.actions {
                self.apply(a);
            }
        }
        panic!("plan did not converge");
    }

    /// Puts one pod on the fullest interface with a free address.
    fn add_pod(&mut self) -> bool {
        let best = self
            .view
            .interfaces
            .iter_mut()
            .filter(|i| i.ips + PREFIX_SIZE * i.prefixes.len() as u32 > i.assigned + i.cooling)
            .max_by_key(|i| (i.assigned, std::cmp::Reverse(i.device_index)));
        let Some(i) = best else { return false };
        i.assigned += 1;
        if let Some(p) = i.prefixes.iter_mut().find(|p| p.in_use < PREFIX_SIZE) {
            p.in_use += 1;
        } else {
            i.free_ips.pop();
        }
        true
    }

    fn remove_pod(&mut self, cooling: bool) {
        let i = self
            .view
            .interfaces
            .iter_mut()
            .filter(|i| i.assigned > 0)
            .min_by_key(|i| i.assigned)
            .expect("a pod");
        i.assigned -= 1;
        if cooling {
            i.cooling += 1;
        } else if let Some(p) = i.prefixes.iter_mut().rev().find(|p| p.in_use > 0) {
            p.in_use -= 1;
        } else {
            let ip = Ipv4Addr::from(0xdead_0000 + i.assigned);
            i.free_ips.push(ip);
        }
    }

    /// Pods 0..n, converging between each, as pods arrive on a node.
    fn fill(&mut self, pods: u32, cfg: &PoolConfig) -> Option<Blocked> {
        let mut blocked = self.converge(cfg);
        for _ in 0..pods {
            if !self.add_pod() {
                self.view.waiting = 1;
                blocked = self.converge(cfg);
                self.view.waiting = 0;
                if !self.add_pod() {
                    return blocked;
                }
            }
            blocked = self.converge(cfg);
        }
        blocked
    }

    fn ips_per_iface(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.view.interfaces.iter().map(|i| i.ips).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    }

    fn prefixes_per_iface(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .view
            .interfaces
            .iter()
            .map(|i| i.prefixes.len() as u32)
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    }

    fn assigned(&self) -> u32 {
        self.view.interfaces.iter().map(|i| i.assigned).sum()
    }

    fn later(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
    }
}

fn eni(warm: u32) -> PoolConfig {
    PoolConfig {
        warm_eni_target: warm,
        ..PoolConfig::default()
    }
}

fn ip(warm: Option<u32>, min: Option<u32>) -> PoolConfig {
    PoolConfig {
        warm_ip_target: warm,
        minimum_ip_target: min,
        ..PoolConfig::default()
    }
}

fn pd(warm_prefix: Option<u32>, warm_ip: Option<u32>, min: Option<u32>) -> PoolConfig {
    PoolConfig {
        prefix_delegation: true,
        warm_prefix_target: warm_prefix,
        warm_ip_target: warm_ip,
        minimum_ip_target: min,
        ..PoolConfig::default()
    }
}

/// (instance type, config, pods, expected secondary IPs per interface, sorted descending)
type IpCase = (&'static str, PoolConfig, u32, &'static [u32]);

#[test]
fn aws_node_documented_cases() {
    let cases: Vec<IpCase> = vec![
        // docs/eni-and-ip-target.md, t3.small (3 ENIs x 3 secondary IPs)
        ("t3.small", eni(1), 0, &[3]),
        ("t3.small", eni(1), 5, &[3, 3, 3]),
        ("t3.small", eni(1), 9, &[3, 3, 3]),
        ("t3.small", ip(Some(1), Some(1)), 0, &[1]),
        ("t3.small", ip(Some(1), Some(1)), 5, &[3, 3]),
        ("t3.small", ip(Some(1), Some(1)), 9, &[3, 3, 3]),
        ("t3.small", ip(Some(2), Some(5)), 0, &[3, 2]),
        ("t3.small", ip(Some(2), Some(5)), 5, &[3, 3, 1]),
        ("t3.small", ip(Some(2), Some(5)), 9, &[3, 3, 3]),
        // p3dn.24xlarge (49 secondary IPs per ENI)
        ("p3dn.24xlarge", eni(1), 0, &[49]),
        ("p3dn.24xlarge", eni(1), 3, &[49, 49]),
        ("p3dn.24xlarge", eni(1), 95, &[49, 49, 49]),
        ("p3dn.24xlarge", ip(Some(5), Some(10)), 0, &[10]),
        ("p3dn.24xlarge", ip(Some(5), Some(10)), 7, &[12]),
        ("p3dn.24xlarge", ip(Some(5), Some(10)), 15, &[20]),
        ("p3dn.24xlarge", ip(Some(5), Some(10)), 45, &[49, 1]),
    ];
    let mut failures = vec![];
    for (i, (ty, cfg, pods, want)) in cases.iter().enumerate() {
        let mut n = node(ty);
        n.fill(*pods, cfg);
        let got = n.ips_per_iface();
        if got != *want {
            failures.push(format!(
                "case {i}: {ty} {cfg:?} pods={pods}: want {want:?}, got {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn warm_eni_target_two_keeps_two_interfaces_worth() {
    let mut n = node("m5.large"); // 3 ENIs x 9
    n.fill(0, &eni(2));
    assert_eq!(n.ips_per_iface(), vec![9, 9]);
    n.fill(1, &eni(2));
    assert_eq!(n.ips_per_iface(), vec![9, 9, 9]);
}

#[test]
fn warm_ip_target_alone_allocates_single_addresses() {
    let mut n = node("m5.large");
    n.fill(0, &ip(Some(3), None));
    assert_eq!(n.ips_per_iface(), vec![3]);
    n.fill(4, &ip(Some(3), None));
    assert_eq!(n.ips_per_iface(), vec![7]);
}

#[test]
fn minimum_ip_target_alone_is_a_floor() {
    let mut n = node("m5.large");
    n.fill(0, &ip(None, Some(12)));
    assert_eq!(n.ips_per_iface(), vec![9, 3]);
    // Twelve pods use the floor entirely; a thirteenth needs one more address.
    let mut n = node("m5.large");
    n.fill(13, &ip(None, Some(12)));
    assert_eq!(n.ips_per_iface().iter().sum::<u32>(), 13);
}

#[test]
fn ip_targets_override_the_eni_target() {
    let cfg = PoolConfig {
        warm_eni_target: 3,
        warm_ip_target: Some(2),
        ..PoolConfig::default()
    };
    let mut n = node("m5.large");
    n.fill(0, &cfg);
    assert_eq!(
        n.ips_per_iface(),
        vec![2],
        "WARM_ENI_TARGET must be ignored when WARM_IP_TARGET is set"
    );
}

#[test]
fn max_eni_caps_interfaces() {
    let cfg = PoolConfig {
        max_eni: Some(2),
        ..eni(1)
    };
    let mut n = node("m5.large");
    n.fill(18, &cfg);
    assert_eq!(n.ips_per_iface(), vec![9, 9]);
    assert_eq!(n.assigned(), 18, "18 pods fit");
    let mut n = node("m5.large");
    let blocked = n.fill(19, &cfg);
    assert_eq!(n.view.interfaces.len(), 2);
    assert_eq!(n.assigned(), 18, "the 19th pod gets no address");
    assert!(
        matches!(
            blocked,
            Some(Blocked::InterfaceLimit {
                interfaces: 2,
                per_interface: 9
            })
        ),
        "{blocked:?}"
    );
}

#[test]
fn instance_limit_blocks_with_a_reason() {
    let mut n = node("t3.small");
    let blocked = n.fill(10, &eni(1));
    assert_eq!(n.ips_per_iface(), vec![3, 3, 3]);
    assert_eq!(
        blocked,
        Some(Blocked::InterfaceLimit {
            interfaces: 3,
            per_interface: 3
        })
    );
}

#[test]
fn max_pods_caps_the_pool() {
    let cfg = PoolConfig {
        max_pods: Some(11),
        ..eni(1)
    };
    let mut n = node("m5.large");
    n.fill(5, &cfg);
    assert_eq!(
        n.ips_per_iface().iter().sum::<u32>(),
        11,
        "never more addresses than max pods"
    );
    let mut n = node("m5.large");
    let blocked = n.fill(12, &cfg);
    assert_eq!(blocked, Some(Blocked::MaxPods { max_pods: 11 }));
}

#[test]
fn no_hot_attach_grows_existing_interfaces_only() {
    let mut n = node("Standard_D2s_v3"); // Azure: 2 NICs x 255 secondary
    n.view.hot_attach = false;
    n.fill(300, &ip(Some(10), None));
    assert_eq!(
        n.view.interfaces.len(),
        1,
        "no NIC can be attached to a running VM"
    );
    assert_eq!(n.ips_per_iface(), vec![255]);
}

#[test]
fn cooling_addresses_are_not_available() {
    let cfg = ip(Some(2), None);
    let mut n = node("m5.large");
    n.fill(3, &cfg);
    assert_eq!(n.ips_per_iface(), vec![5]);
    // Three pods leave; their addresses cool down and must not count as free.
    for _ in 0..3 {
        n.remove_pod(true);
    }
    n.converge(&cfg);
    assert_eq!(
        n.ips_per_iface(),
        vec![5],
        "cooling addresses neither released nor counted free"
    );
    // A new pod arrives: 2 free + 3 cooling; after it, only 1 free, so grow.
    n.add_pod();
    n.converge(&cfg);
    assert_eq!(n.ips_per_iface(), vec![6]);
}

#[test]
fn warm_ip_target_shrinks_by_releasing_addresses() {
    let cfg = ip(Some(2), None);
    let mut n = node("m5.large");
    n.fill(6, &cfg);
    assert_eq!(n.ips_per_iface(), vec![8]);
    for _ in 0..4 {
        n.remove_pod(false);
    }
    n.converge(&cfg);
    assert_eq!(n.ips_per_iface(), vec![4], "2 pods + 2 warm");
}

#[test]
fn minimum_ip_target_stops_the_shrink() {
    let cfg = ip(Some(1), Some(6));
    let mut n = node("m5.large");
    n.fill(8, &cfg);
    for _ in 0..8 {
        n.remove_pod(false);
    }
    n.converge(&cfg);
    assert_eq!(n.ips_per_iface(), vec![6]);
}

#[test]
fn idle_interface_is_deleted_only_after_min_age() {
    let cfg = eni(1);
    let mut n = node("m5.large");
    n.fill(10, &cfg); // 3 ENIs: 10 pods + 9 warm > 18
    assert_eq!(n.view.interfaces.len(), 3);
    for _ in 0..10 {
        n.remove_pod(false);
    }
    n.converge(&cfg);
    assert_eq!(
        n.view.interfaces.len(),
        3,
        "interfaces younger than 60 s are kept"
    );
    n.later(61);
    let p = plan(&n.view, &cfg, n.now);
    let deletes = p
        .actions
        .iter()
        .filter(|a| matches!(a, Action::DeleteInterface { .. }))
        .count();
    assert_eq!(
        deletes, 1,
        "at most one interface freed per step: {:?}",
        p.actions
    );
    n.converge(&cfg);
    assert_eq!(n.ips_per_iface(), vec![9], "back to one ENI's worth");
}

#[test]
fn primary_interface_is_never_deleted() {
    let cfg = ip(Some(1), None);
    let mut n = node("m5.large");
    n.later(3600);
    n.fill(0, &cfg);
    n.later(3600);
    n.converge(&cfg);
    assert_eq!(n.view.interfaces.len(), 1);
    assert_eq!(n.view.interfaces[0].device_index, 0);
}

#[test]
fn interface_with_pods_is_never_deleted() {
    let cfg = ip(Some(1), None);
    let mut n = node("t3.small");
    n.fill(5, &cfg);
    n.later(120);
    // Leave one pod on the second interface.
    n.view.interfaces[0].assigned = 0;
    n.view.interfaces[0].free_ips = vec![Ipv4Addr::new(10, 9, 0, 1); 3];
    n.converge(&cfg);
    assert!(
        n.view.interfaces.iter().any(|i| i.device_index == 1),
        "interface holding a pod was deleted"
    );
}

#[test]
fn waiting_adds_count_as_demand() {
    let cfg = ip(Some(0), Some(0));
    let mut n = node("m5.large");
    n.view.waiting = 3;
    let p = plan(&n.view, &cfg, n.now);
    assert_eq!(
        p.actions,
        vec![Action::AssignIps {
            interface_id: "eni-0".into(),
            count: 3
        }]
    );
}

#[test]
fn no_shrink_while_adds_wait() {
    let cfg = ip(Some(1), None);
    let mut n = node("m5.large");
    n.fill(0, &cfg);
    n.view.interfaces[0].ips = 9;
    n.view.interfaces[0].free_ips = n.ips(9);
    n.view.interfaces[0].assigned = 0;
    n.view.waiting = 9;
    let p = plan(&n.view, &cfg, n.now);
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::ReleaseIps { .. })),
        "{:?}",
        p.actions
    );
}

#[test]
fn prefix_delegation_warm_prefix_target() {
    // m5.large: 9 prefix slots per ENI.
    let cfg = pd(Some(1), None, None);
    let mut n = node("m5.large");
    n.fill(0, &cfg);
    assert_eq!(n.prefixes_per_iface(), vec![1]);
    // One pod makes the prefix partial; one more wholly free prefix is kept.
    n.fill(1, &cfg);
    assert_eq!(n.prefixes_per_iface(), vec![2]);
    let mut n = node("m5.large");
    n.fill(17, &cfg);
    assert_eq!(
        n.prefixes_per_iface(),
        vec![3],
        "two prefixes in use + one free"
    );
}

#[test]
fn prefix_delegation_with_ip_targets_rounds_up_to_prefixes() {
    let cfg = pd(Some(4), Some(5), Some(20));
    let mut n = node("m5.large");
    n.fill(0, &cfg);
    assert_eq!(
        n.prefixes_per_iface(),
        vec![2],
        "ip targets override WARM_PREFIX_TARGET: 20 addresses -> 2 prefixes"
    );
    n.fill(28, &cfg);
    assert_eq!(
        n.prefixes_per_iface(),
        vec![3],
        "28 pods + 5 warm = 33 -> 3 prefixes"
    );
}

#[test]
fn prefix_delegation_spills_to_a_new_interface() {
    let cfg = pd(Some(1), None, None);
    let mut n = node("t3.small"); // 3 prefix slots per ENI
    n.fill(40, &cfg);
    // 40 pods -> 3 prefixes in use, plus one free prefix: 4 prefixes over 2 ENIs.
    assert_eq!(n.prefixes_per_iface(), vec![3, 1]);
}

#[test]
fn prefix_delegation_releases_free_prefixes() {
    let cfg = pd(Some(1), None, None);
    let mut n = node("m5.large");
    n.fill(40, &cfg);
    assert_eq!(n.prefixes_per_iface(), vec![4]);
    for _ in 0..40 {
        n.remove_pod(false);
    }
    n.converge(&cfg);
    assert_eq!(n.prefixes_per_iface(), vec![1]);
}

#[test]
fn prefix_delegation_respects_max_pods() {
    let cfg = PoolConfig {
        max_pods: Some(20),
        ..pd(Some(3), None, None)
    };
    let mut n = node("m5.large");
    n.fill(0, &cfg);
    assert_eq!(
        n.prefixes_per_iface(),
        vec![2],
        "20 max pods need only two prefixes"
    );
}

#[test]
fn interface_deletion_picks_an_idle_one_and_keeps_targets() {
    let cfg = ip(Some(2), None);
    let mut n = node("t3.small");
    n.fill(7, &cfg); // 3 ENIs
    assert_eq!(n.view.interfaces.len(), 3);
    for _ in 0..7 {
        n.remove_pod(false);
    }
    n.later(61);
    n.converge(&cfg);
    assert_eq!(n.ips_per_iface().iter().sum::<u32>(), 2);
    assert_eq!(
        n.view.interfaces.len(),
        1,
        "idle secondary interfaces go once empty"
    );
}

#[test]
fn max_pods_formula_matches_aws_node_for_every_instance_type() {
    let oracle = include_str!("../../providers/data/aws-eni-max-pods.txt");
    let mut checked = 0;
    let mut wrong = vec![];
    for line in oracle
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let mut f = line.split_whitespace();
        let (ty, want) = (f.next().unwrap(), f.next().unwrap().parse::<u32>().unwrap());
        match limits::lookup(ty) {
            Some(t) if t.limits.max_pods() == want => checked += 1,
            Some(t) => wrong.push(format!("{ty}: {} != {want}", t.limits.max_pods())),
            None => wrong.push(format!("{ty}: unknown")),
        }
    }
    assert!(wrong.is_empty(), "{wrong:?}");
    assert!(checked > 500, "only {checked} types checked");
}

/// Azure CNS's scaler at its defaults (batch 16, request 50%, release
/// 150%, max 250), or with `f` applied.
fn cns(f: impl FnOnce(&mut ipamd::policy::Scaler)) -> PoolConfig {
    let mut s = ipamd::policy::Scaler::default();
    f(&mut s);
    PoolConfig {
        scaler: Some(s),
        ..PoolConfig::default()
    }
}

impl Node {
    fn total(&self) -> u32 {
        self.view
            .interfaces
            .iter()
            .map(|i| i.ips + PREFIX_SIZE * i.prefixes.len() as u32)
            .sum()
    }
}

/// CNS's documented behaviour at its defaults: the pool moves in batches of
/// 16, holds `16 × ceil(0.5 + used/16)` (so between 8 and 23 free), grows
/// when fewer than 8 are free and releases a batch when 24 or more are.
#[test]
fn cns_batches_grow_and_release_between_the_thresholds() {
    let cfg = cns(|_| {});
    let mut n = node("m5.24xlarge"); // 15 interfaces x 49 addresses
    n.converge(&cfg);
    assert_eq!(n.total(), 16, "an empty node holds one batch");
    let mut sizes = vec![];
    for pods in 1..=40u32 {
        n.fill(1, &cfg);
        assert_eq!(n.assigned(), pods);
        let total = n.total();
        let free = total - pods;
        assert_eq!(total % 16, 0, "whole batches: {total} at {pods} pods");
        assert!((8..24).contains(&free), "{free} free at {pods} pods");
        assert_eq!(
            total,
            16 * (pods * 2 + 16).div_ceil(32),
            "the v2 target at {pods} pods"
        );
        sizes.push(total);
    }
    // CNS's examples: 8 pods fit one batch with 8 free; the 9th leaves 7 < 8
    // and a batch is requested; 24 pods hold 32, the 25th asks for 48.
    assert_eq!((sizes[7], sizes[8], sizes[23], sizes[24]), (16, 32, 32, 48));
    // Pods go: nothing moves until 24 are free, then one step back to the
    // target, which leaves at least 8 free (no grow right after).
    for pods in (9..40u32).rev() {
        n.remove_pod(false);
        let before = n.total();
        n.converge(&cfg);
        let (total, free) = (n.total(), n.total() - pods);
        assert!((8..24).contains(&free), "{free} free at {pods} pods");
        if before - pods < 24 {
            assert_eq!(total, before, "released with only {} free", before - pods);
        }
        assert!(
            !cns_would_grow(&n, &cfg),
            "a release that triggers a grow at {pods} pods"
        );
    }
    assert_eq!(n.total(), 32, "9 pods hold two batches");
}

fn cns_would_grow(n: &Node, cfg: &PoolConfig) -> bool {
    plan(&n.view, cfg, n.now)
        .actions
        .iter()
        .any(|a| matches!(a, Action::AssignIps { .. } | Action::CreateInterface { .. }))
}

#[test]
fn cns_max_ip_count_caps_the_pool_and_release_is_clamped_above_request() {
    let cfg = cns(|s| s.max_ip_count = 40);
    let mut n = node("m5.24xlarge");
    n.fill(30, &cfg);
    assert_eq!(n.total(), 40, "capped at the max IP count, not 48");
    // ADDs waiting beyond it get nothing more.
    n.view.waiting = 15;
    n.converge(&cfg);
    assert_eq!(n.total(), 40, "waiting ADDs went past the max IP count");
    n.view.waiting = 0;
    // A release threshold under request + 100 is raised to it (CNS).
    let s = ipamd::policy::Scaler {
        release_threshold_percent: 120,
        ..Default::default()
    }
    .clamped();
    assert_eq!(s.release_threshold_percent, 150);
    let s = ipamd::policy::Scaler {
        batch_size: 500,
        request_threshold_percent: 400,
        ..Default::default()
    }
    .clamped();
    assert_eq!((s.batch_size, s.request_threshold_percent), (250, 100));
}

/// A nearly exhausted subnet: batches of one; a pod that arrives finds
/// the one free address, and the rest is released (two free reach the
/// 150% release threshold of a batch of one).
#[test]
fn cns_on_a_nearly_exhausted_subnet_keeps_one_or_two_free() {
    let cfg = cns(|_| {});
    let mut n = node("m5.24xlarge");
    n.fill(20, &cfg);
    assert_eq!(n.total(), 32);
    n.view.subnet_low = true;
    n.converge(&cfg);
    assert_eq!(n.total(), 21, "the rest released: one free");
    n.fill(3, &cfg);
    assert_eq!(n.total(), 24, "one at a time");
    // A pod goes: two free reach the release threshold (1.5), and the
    // pool is back to one free; none free grows by one.
    n.remove_pod(false);
    n.converge(&cfg);
    assert_eq!(n.total(), 23, "two free: back to one");
    n.fill(1, &cfg);
    assert_eq!(n.total(), 24, "none free: one more");
}

/// A node whose subnet is full grows on a new interface (in another
/// subnet) instead of asking the full one again.
#[test]
fn a_full_subnet_is_not_asked_again_a_new_interface_is_made() {
    let cfg = ip(Some(5), None);
    let mut n = node("m5.24xlarge");
    n.fill(3, &cfg);
    assert_eq!(n.view.interfaces.len(), 1);
    n.view.interfaces[0].subnet_full = true;
    n.fill(5, &cfg);
    assert_eq!(n.view.interfaces.len(), 2, "no new interface");
    assert_eq!(
        n.view.interfaces[0].ips, 8,
        "the full subnet was asked again"
    );
}

/// Where no new interface can be made (Azure attaches no NIC to a running
/// VM), a subnet that said it is full is asked again, one address at a
/// time, so the addresses it still has reach pods.
#[test]
fn without_hot_attach_a_full_subnet_is_asked_one_address_at_a_time() {
    let cfg = ip(Some(5), None);
    let mut n = node("Standard_D2s_v3");
    n.view.hot_attach = false;
    n.view.interfaces[0].subnet_full = true;
    let plan = ipamd::policy::plan(&n.view, &cfg, n.now);
    assert_eq!(
        plan.actions,
        vec![Action::AssignIps {
            interface_id: "eni-0".into(),
            count: 1
        }],
        "{plan:?}"
    );
    // With room for a new interface the full subnet is left alone.
    n.view.hot_attach = true;
    let plan = ipamd::policy::plan(&n.view, &cfg, n.now);
    assert!(
        plan.actions
            .iter()
            .all(|a| matches!(a, Action::CreateInterface { .. })),
        "{plan:?}"
    );
}

/// ADAPTIVE_WARM_TARGET: the pool keeps the warm count the reconciler
/// measured (arrivals × refill latency) free, address by address, bounded
/// by max pods; prefixes in prefix mode; one free while the subnet is low.
#[test]
fn the_adaptive_warm_target_keeps_what_the_arrivals_need_and_no_more() {
    use ipamd::policy::adaptive_warm;
    // No arrivals: one address for the next pod.
    assert_eq!(adaptive_warm(0.0, 0.0, 2.0, 30.0), 1);
    // One pod a second, none leaving, 2 s grows: a Poisson count of mean
    // 2 is 9 or more with a chance of 2.4e-4 and 10 or more with 4.6e-5.
    assert_eq!(adaptive_warm(1.0, 0.0, 2.0, 30.0), 10);
    assert_eq!(adaptive_warm(f64::NAN, 0.0, 2.0, 30.0), 1);
    // Churn, a pod replaced a minute: each arrival is covered by the
    // departed pod's address after its 30 s cooldown, not by a 400 s grow
    // (mean 0.5: 5 or more 1.7e-4, 6 or more 1.4e-5).
    assert_eq!(adaptive_warm(1.0 / 60.0, 1.0 / 60.0, 400.0, 30.0), 6);
    // Growth with no departures waits for the grow (mean 6.7: 19 or more
    // has a chance under 1e-4, 18 or more over).
    assert_eq!(adaptive_warm(1.0 / 60.0, 0.0, 400.0, 30.0), 19);
    // A grow faster than the cooldown does not shorten what churn needs:
    // the cooling addresses count toward the target, and they come back
    // only after the cooldown (mean 30: 53 or more under 1e-4, 52 over).
    assert_eq!(adaptive_warm(1.0, 1.0, 2.0, 30.0), 53);
    // Far past the exact sum's range: the normal tail, still finite.
    let big = adaptive_warm(100.0, 0.0, 100.0, 30.0);
    assert!((10_370..=10_380).contains(&big), "{big}");
    let cfg = PoolConfig {
        adaptive: true,
        ..PoolConfig::default()
    };
    let mut n = node("m5.4xlarge"); // 8 interfaces x 29 addresses
    n.view.adaptive_warm = 6;
    n.fill(10, &cfg);
    assert_eq!(n.assigned(), 10);
    assert_eq!(n.total(), 16, "10 in use and 6 warm");
    // A burst of arrivals over a slow refill: capped by max pods.
    n.view.adaptive_warm = 500;
    let capped = PoolConfig {
        max_pods: Some(110),
        ..cfg.clone()
    };
    n.converge(&capped);
    assert_eq!(n.total(), 110);
    // The arrivals stop: back down to twice the warm count (the pool
    // releases only above that), single addresses.
    n.view.adaptive_warm = 3;
    n.converge(&capped);
    assert_eq!(n.total(), 16, "10 in use and 2 x 3 kept");
    n.view.adaptive_warm = 1;
    n.converge(&capped);
    assert_eq!(n.total(), 12);
    n.view.subnet_low = true;
    n.view.adaptive_warm = 40;
    n.converge(&capped);
    assert_eq!(n.total(), 12, "one free, two kept while the subnet is low");
    // Prefix mode: whole prefixes.
    let pd_cfg = PoolConfig {
        prefix_delegation: true,
        ..cfg
    };
    let mut p = node("m5.large");
    p.view.adaptive_warm = 20;
    p.fill(5, &pd_cfg);
    assert_eq!(p.total(), 32, "25 addresses rounded up to two /28s");
}

/// ADAPTIVE_WARM_TARGET under churn: a departed pod's address in its
/// cooldown counts toward the warm target, so replacing a pod makes no
/// grow (WARM_IP_TARGET grows for it and releases the address again once
/// cooled); an ADD that finds nothing free still gets a grow at once.
#[test]
fn adaptive_counts_cooling_addresses_and_still_serves_a_waiting_add() {
    let cfg = PoolConfig {
        adaptive: true,
        ..PoolConfig::default()
    };
    let mut n = node("m5.large");
    n.view.adaptive_warm = 3;
    n.fill(4, &cfg);
    assert_eq!(n.total(), 7, "4 pods and 3 warm");
    // A pod replaced: its address cools, the new pod takes a free one.
    n.remove_pod(true);
    n.add_pod();
    n.converge(&cfg);
    assert_eq!(n.total(), 7, "2 free + 1 cooling cover the target");
    // Two more replaced: nothing free, three cooling; no ADD waits yet.
    for _ in 0..2 {
        n.remove_pod(true);
        n.add_pod();
    }
    n.converge(&cfg);
    assert_eq!(n.total(), 7, "3 cooling still cover the target");
    // The next ADD finds nothing free and waits: it gets an address now.
    assert!(!n.add_pod());
    n.view.waiting = 1;
    n.converge(&cfg);
    n.view.waiting = 0;
    assert!(n.add_pod(), "a grow for the waiting ADD");
    assert_eq!(n.total(), 8);
    // WARM_IP_TARGET=3 on the same replacement grows for it.
    let warm_ip = ip(Some(3), None);
    let mut w = node("m5.large");
    w.fill(4, &warm_ip);
    let before = w.total();
    w.remove_pod(true);
    w.add_pod();
    w.converge(&warm_ip);
    assert_eq!(w.total(), before + 1);
}
