//! Which interfaces ipamd may manage: the instance's primary interface, the
//! interfaces ipamd created (its owner tag) and those aws-node created for
//! this instance (aws-node's `node.k8s.amazonaws.com/instance_id` tag: a
//! node moved from aws-node keeps using them), unless tagged
//! `node.k8s.amazonaws.com/no_manage=true` (aws-node's tag). Any other
//! interface (another controller's, an operator's) is left untouched: its
//! addresses are never handed out or counted, it is never shrunk, detached
//! or deleted. It still takes one of the instance's attachment slots.

use std::collections::{BTreeMap, BTreeSet};

use providers::tags::{AWS_NODE_INSTANCE, INSTANCE, NO_MANAGE, OWNER, OWNER_VALUE};
use providers::Interface;
use tracing::{info, warn};

/// Whether ipamd may use and change `i`, an interface of instance
/// `instance_id`. Under custom networking the primary interface is not the
/// pool's (`primary_for_pods` false): its subnet is the node's, not the
/// ENIConfig's.
pub fn managed(i: &Interface, instance_id: &str, primary_for_pods: bool) -> bool {
    if i.is_primary() {
        return primary_for_pods;
    }
    let tag = |k: &str| i.tags.get(k).map(String::as_str);
    if tag(NO_MANAGE).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    let ours = tag(OWNER) == Some(OWNER_VALUE) && tag(INSTANCE).is_none_or(|id| id == instance_id);
    ours || tag(AWS_NODE_INSTANCE) == Some(instance_id)
}

/// Splits the cloud's interfaces into those for the pool and the foreign
/// ones (by id). An unmanaged interface that `keep` still wants (it holds
/// pods' addresses, or ipamd managed it until now) goes to the pool and
/// joins `frozen`: its pods keep their addresses, it gets no new ones and
/// is never freed.
pub fn split(
    all: Vec<Interface>,
    instance_id: &str,
    primary_for_pods: bool,
    keep: impl Fn(&Interface) -> bool,
    frozen: &mut BTreeSet<String>,
) -> (Vec<Interface>, BTreeMap<String, Interface>) {
    let mut pool = vec![];
    let mut foreign = BTreeMap::new();
    for i in all {
        if managed(&i, instance_id, primary_for_pods) {
            pool.push(i);
        } else if keep(&i) {
            if frozen.insert(i.id.clone()) {
                warn!(interface = %i.id, "interface is not ipamd's to manage but holds pods' addresses; keeping them, adding none");
            }
            pool.push(i);
        } else {
            foreign.insert(i.id.clone(), i);
        }
    }
    (pool, foreign)
}

/// Logs the foreign interfaces not in `before` (once each, not at every
/// resync).
pub fn log_new_foreign(now: &BTreeMap<String, Interface>, before: &BTreeMap<String, Interface>) {
    for (id, i) in now.iter().filter(|(id, _)| !before.contains_key(*id)) {
        info!(interface = %id, device_index = i.device_index, "leaving an interface ipamd does not own alone");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(device_index: u32, tags: &[(&str, &str)]) -> Interface {
        Interface {
            id: "eni-1".into(),
            mac: "02:00:00:00:00:01".into(),
            device_index,
            subnet_id: "subnet-1".into(),
            subnet_cidr: "10.0.0.0/24".parse().unwrap(),
            primary_ip: "10.0.0.10".parse().unwrap(),
            secondary_ips: vec![],
            prefixes: vec![],
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            delete_on_termination: None,
        }
    }

    #[test]
    fn only_the_primary_and_our_own_are_managed() {
        assert!(managed(&iface(0, &[]), "i-1", true));
        assert!(
            !managed(&iface(0, &[]), "i-1", false),
            "custom networking: the primary gives no pod addresses"
        );
        assert!(!managed(&iface(1, &[]), "i-1", true), "untagged");
        assert!(managed(&iface(1, &[(OWNER, OWNER_VALUE)]), "i-1", true));
        assert!(managed(
            &iface(1, &[(OWNER, OWNER_VALUE), (INSTANCE, "i-1")]),
            "i-1",
            true
        ));
        assert!(
            !managed(
                &iface(1, &[(OWNER, OWNER_VALUE), (INSTANCE, "i-2")]),
                "i-1",
                true
            ),
            "another instance's"
        );
        assert!(!managed(&iface(1, &[(OWNER, "someone-else")]), "i-1", true));
        for v in ["true", "TRUE", "True"] {
            assert!(
                !managed(
                    &iface(1, &[(OWNER, OWNER_VALUE), (NO_MANAGE, v)]),
                    "i-1",
                    true
                ),
                "no_manage={v} is honoured even on our own"
            );
        }
        assert!(managed(
            &iface(1, &[(OWNER, OWNER_VALUE), (NO_MANAGE, "false")]),
            "i-1",
            true
        ));
        // aws-node's, for this instance: taken over; for another: not.
        assert!(managed(
            &iface(1, &[(AWS_NODE_INSTANCE, "i-1")]),
            "i-1",
            true
        ));
        assert!(!managed(
            &iface(1, &[(AWS_NODE_INSTANCE, "i-2")]),
            "i-1",
            true
        ));
        assert!(!managed(
            &iface(1, &[(AWS_NODE_INSTANCE, "i-1"), (NO_MANAGE, "true")]),
            "i-1",
            true
        ));
    }
}
