//! EC2's shapes to the project's: interfaces, limits, groups.

use super::*;

/// The network card an attachment is on; EC2 omits it for card 0 on
/// single-card types (and emulators may omit it altogether).
pub(super) fn card_of(n: &NetworkInterface) -> i32 {
    n.attachment()
        .and_then(|a| a.network_card_index())
        .unwrap_or(0)
}

/// The group ids of an interface's `groupSet`, in EC2's order.
pub(super) fn groups_of(n: &NetworkInterface) -> Vec<String> {
    n.groups()
        .iter()
        .filter_map(|g| g.group_id().map(String::from))
        .collect()
}

/// Limits from one DescribeInstanceTypes answer, or `None` when it lacks
/// network figures.
///
/// `NetworkInfo.MaximumNetworkInterfaces` is the total over all network
/// cards, but interfaces are attached on the default card only (no
/// `NetworkCardIndex` in AttachNetworkInterface), so the default card's
/// `NetworkCards[].MaximumNetworkInterfaces` is the limit when cards are
/// listed (p5.48xlarge: 32 cards of 2, total 64 -> 2).
/// `Ipv4AddressesPerInterface` counts the interface's primary address.
/// Prefix delegation needs Nitro (or bare metal).
pub(super) fn described_limits(it: &InstanceTypeInfo) -> Option<Limits> {
    let n = it.network_info()?;
    let default_card = n.default_network_card_index().unwrap_or(0);
    let on_card = n
        .network_cards()
        .iter()
        .find(|c| c.network_card_index().unwrap_or(0) == default_card)
        .and_then(|c| c.maximum_network_interfaces());
    let max_interfaces = on_card.or(n.maximum_network_interfaces())?;
    let ipv4 = n.ipv4_addresses_per_interface()?;
    if max_interfaces < 1 || ipv4 < 1 {
        return None;
    }
    let nitro =
        it.hypervisor().map(|h| h.as_str()) == Some("nitro") || it.bare_metal() == Some(true);
    Some(Limits {
        max_interfaces: max_interfaces as u32,
        ipv4_per_interface: ipv4 as u32,
        prefix_delegation: nitro,
    })
}

/// Conservative limits for an instance type whose limits nobody knows,
/// from the interfaces attached to it now: as many interfaces as are
/// attached on the default card (at least 1), as many addresses per
/// interface as the fullest of them holds (a prefix takes one address slot;
/// at least 2, the least any EC2 type has), no prefix delegation. Both are
/// figures EC2 has already allowed, so they never overcommit.
pub(super) fn fallback_limits(attached: &[NetworkInterface]) -> Limits {
    let on_card0: Vec<&NetworkInterface> = attached.iter().filter(|n| card_of(n) == 0).collect();
    let most = on_card0
        .iter()
        .map(|n| {
            let ips = n.private_ip_addresses().len().max(1);
            (ips + n.ipv4_prefixes().len()) as u32
        })
        .max()
        .unwrap_or(0);
    Limits {
        max_interfaces: (on_card0.len() as u32).max(1),
        ipv4_per_interface: most.max(2),
        prefix_delegation: false,
    }
}

pub(super) fn interface_of(n: &NetworkInterface, cidr: Ipv4Net) -> Interface {
    let primary_ip: Ipv4Addr = n
        .private_ip_address()
        .and_then(|a| a.parse().ok())
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    Interface {
        id: n.network_interface_id().unwrap_or_default().to_string(),
        mac: n.mac_address().unwrap_or_default().to_string(),
        device_index: n
            .attachment()
            .and_then(|a| a.device_index())
            .map_or(u32::MAX, |i| i as u32),
        subnet_id: n.subnet_id().unwrap_or_default().to_string(),
        subnet_cidr: cidr,
        primary_ip,
        secondary_ips: n
            .private_ip_addresses()
            .iter()
            .filter(|a| a.primary() != Some(true))
            .filter_map(|a| a.private_ip_address()?.parse().ok())
            .filter(|ip| *ip != primary_ip)
            .collect(),
        prefixes: n
            .ipv4_prefixes()
            .iter()
            .filter_map(|p| p.ipv4_prefix()?.parse().ok())
            .collect(),
        tags: n
            .tag_set()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
            .collect(),
        delete_on_termination: n.attachment().and_then(|a| a.delete_on_termination()),
    }
}
