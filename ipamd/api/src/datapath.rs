//! Datapath facts that ipamd (the node's side) and the plugin (the pod's
//! side) must agree on: policy-rule priorities, route-table numbering, the
//! pod's gateway and the name of a pod's host veth. Defined once here, in
//! the crate both link, so that the two binaries cannot drift apart.
//!
//! The rules, in the order the kernel evaluates them (lowest priority
//! number first):
//!
//! | priority | rule | set up by |
//! |---|---|---|
//! | [`PRIO_TO_POD`] 512 | `to <pod IP> lookup main` | plugin |
//! | [`PRIO_CONNMARK`] 1024 | `fwmark 0x80/0x80 lookup main` | ipamd |
//! | [`PRIO_FROM_POD`] 1536 | `from <pod IP> lookup <interface table>` | plugin |
//! | [`PRIO_INTERFACE`] 1536 | `from <interface primary IP> lookup <interface table>` | ipamd |
//! | [`PRIO_MAIN_RULE`] 32766 | `lookup main` | the kernel |
//!
//! Only std: the plugin links this crate and must stay small.

use std::net::Ipv4Addr;

/// Priority of the pod's `to <pod IP> lookup main` rule (a number, lower
/// is evaluated first). It comes first of all of ours: traffic to a pod on
/// this node is delivered through the main table's host route to the pod's
/// veth, whatever its mark or its source (another pod's `from` rule would
/// otherwise send pod-to-pod traffic out of a secondary interface).
pub const PRIO_TO_POD: u32 = 512;

/// Priority of ipamd's connmark rule `fwmark 0x80/0x80 lookup main`. After
/// [`PRIO_TO_POD`] (traffic to a local pod is delivered, marked or not) and
/// before [`PRIO_FROM_POD`]: pod traffic leaving the VPC is marked for SNAT
/// and must leave through the primary interface (the main table), not the
/// secondary interface the pod's `from` rule would choose.
pub const PRIO_CONNMARK: u32 = 1024;

/// Priority of the pod's `from <pod IP> lookup <interface table>` rule, made
/// for a pod whose address is on a secondary interface: its traffic leaves
/// through that interface. After [`PRIO_CONNMARK`] (see there) and before
/// the kernel's main-table rule ([`PRIO_MAIN_RULE`]), which would otherwise
/// send it out of the primary interface with a source that interface does
/// not own.
pub const PRIO_FROM_POD: u32 = 1536;

/// Priority of ipamd's `from <interface primary IP> lookup <interface table>`
/// rule, one per secondary interface. The same number as [`PRIO_FROM_POD`],
/// as it always was: sharing is safe because the selectors are disjoint
/// source addresses (an interface's primary IP is never handed to a pod, and
/// each pod address is a /32 of its own), so at most one rule of that
/// priority matches a packet and their relative order does not matter. It
/// must stay after [`PRIO_CONNMARK`] and before [`PRIO_MAIN_RULE`] for the
/// same reasons as the pods' rule.
pub const PRIO_INTERFACE: u32 = PRIO_FROM_POD;

/// Priority of the kernel's own `lookup main` rule (made at boot, not by
/// us). Every rule above must come before it, or it would never be reached.
pub const PRIO_MAIN_RULE: u32 = 32766;

/// The kernel's main route table (`RT_TABLE_MAIN`). The primary interface
/// (device index 0) routes through it.
pub const MAIN_TABLE: u32 = 254;

/// The route table of the interface at `device_index` (the cloud's
/// attachment index): the main table ([`MAIN_TABLE`]) for the primary
/// interface, `device_index + 1` for a secondary one. aws-node's numbering,
/// kept so that a node moved between the two finds its tables where it left
/// them; for any real index (1 to 250 at most) it stays clear of the
/// kernel's reserved tables (0 unspec, 253 default, 254 main, 255 local).
pub fn route_table(device_index: u32) -> u32 {
    if device_index == 0 {
        MAIN_TABLE
    } else {
        device_index + 1
    }
}

/// The pod's default gateway: link-local, never a real host, answered by a
/// permanent neighbour entry with the host veth's MAC in the pod. Also the
/// `gateway` in the plugin's result.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The name of the pod's veth peer in the host: `prefix` and the first
/// hex digits of a stable hash of the attachment (64-bit FNV-1a over
/// `container_id`, `/`, `ifname`), 15 bytes in all (the kernel's IFNAMSIZ
/// less its NUL; see [`crate::names::IFNAME_MAX`]).
///
/// The algorithm is fixed across builds and releases: a DEL by a newer
/// plugin must find the veth an older ADD made (and GC names a stale
/// attachment's veth the same way). Do not change it.
///
/// # Panics
///
/// If `prefix` is longer than 15 bytes (the plugin's configuration allows
/// at most 4).
pub fn host_veth_name(prefix: &str, container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let hex = format!("{h:016x}");
    format!("{prefix}{}", &hex[..15 - prefix.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_priorities_are_in_order() {
        // Each rule and the one that must come after it (`true`: strictly).
        let chain = [
            // The kernel's `from all lookup local`, which must stay first.
            ("kernel's local", 0, true),
            ("to pod", PRIO_TO_POD, true),
            ("connmark", PRIO_CONNMARK, true),
            ("from pod", PRIO_FROM_POD, false),
            ("interface", PRIO_INTERFACE, true),
            ("kernel's main", PRIO_MAIN_RULE, true),
        ];
        for w in chain.windows(2) {
            let ((a, pa, strict), (b, pb, _)) = (w[0], w[1]);
            if strict {
                assert!(pa < pb, "{a} ({pa}) must come before {b} ({pb})");
            } else {
                assert!(pa <= pb, "{a} ({pa}) must not come after {b} ({pb})");
            }
        }
        // The numbers the README, aws-node and existing nodes know.
        assert_eq!(
            [PRIO_TO_POD, PRIO_CONNMARK, PRIO_FROM_POD, PRIO_INTERFACE],
            [512, 1024, 1536, 1536]
        );
    }

    #[test]
    fn route_tables_avoid_the_kernels_and_each_other() {
        const UNSPEC: u32 = 0;
        const DEFAULT: u32 = 253;
        const LOCAL: u32 = 255;
        assert_eq!(MAIN_TABLE, 254);
        assert_eq!(route_table(0), MAIN_TABLE);
        let mut seen = std::collections::BTreeSet::new();
        for d in 1..=250 {
            let t = route_table(d);
            assert!(
                ![UNSPEC, DEFAULT, MAIN_TABLE, LOCAL].contains(&t),
                "device {d} got reserved table {t}"
            );
            assert!(seen.insert(t), "device {d} shares table {t}");
        }
        // aws-node's numbering, which nodes already carry.
        assert_eq!((route_table(1), route_table(2)), (2, 3));
    }

    #[test]
    fn veth_names_are_pinned() {
        // Computed by the plugin before this function moved here: a change
        // would leave older pods' veths behind on DEL.
        assert_eq!(host_veth_name("eni", "abcdef", "eth0"), "enif70d50a81cce");
        assert_eq!(host_veth_name("v", "x", "eth0"), "v304ecda156c891");
        let a = host_veth_name("eni", "abcdef", "eth0");
        assert_eq!(a.len(), crate::names::IFNAME_MAX);
        assert_ne!(a, host_veth_name("eni", "abcdef", "eth1"));
        assert_ne!(a, host_veth_name("eni", "abcdeg", "eth0"));
    }
}
