//! Instance-type limits: every EC2 type (from EC2's DescribeInstanceTypes as
//! published with aws-node) and a few Azure VM sizes.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::types::Limits;

const AWS_TABLE: &str = include_str!("../data/aws-instance-limits.tsv");

/// Azure sizes: max NICs by size, 256 IP configurations per NIC (Azure's
/// documented limit). No prefix delegation.
const AZURE_SIZES: &[(&str, u32)] = &[
    ("Standard_D2s_v3", 2),
    ("Standard_D4s_v3", 2),
    ("Standard_D8s_v3", 4),
    ("Standard_D16s_v3", 8),
    ("Standard_D2s_v5", 2),
    ("Standard_D4s_v5", 2),
    ("Standard_D8s_v5", 4),
];
const AZURE_IPS_PER_NIC: u32 = 256;

/// Cloud family of an instance type, which decides what it can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Aws { nitro: bool },
    Azure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeInfo {
    pub limits: Limits,
    pub family: Family,
}

fn table() -> &'static HashMap<String, TypeInfo> {
    static TABLE: OnceLock<HashMap<String, TypeInfo>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut m = HashMap::new();
        for line in AWS_TABLE.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split('\t').collect();
            let (Some(name), Some(enis), Some(ips), Some(hv)) =
                (f.first(), f.get(1), f.get(2), f.get(4))
            else {
                continue;
            };
            let (Ok(enis), Ok(ips)) = (enis.parse(), ips.parse()) else {
                continue;
            };
            let nitro = *hv == "nitro" || f.get(5) == Some(&"true");
            m.insert(
                (*name).to_string(),
                TypeInfo {
                    limits: Limits {
                        max_interfaces: enis,
                        ipv4_per_interface: ips,
                        prefix_delegation: nitro,
                    },
                    family: Family::Aws { nitro },
                },
            );
        }
        for (name, nics) in AZURE_SIZES {
            m.insert(
                (*name).to_string(),
                TypeInfo {
                    limits: Limits {
                        max_interfaces: *nics,
                        ipv4_per_interface: AZURE_IPS_PER_NIC,
                        prefix_delegation: false,
                    },
                    family: Family::Azure,
                },
            );
        }
        m
    })
}

/// Limits of an instance type, or `None` for a type we know nothing of.
pub fn lookup(instance_type: &str) -> Option<TypeInfo> {
    table().get(instance_type).copied()
}

/// All known instance type names.
pub fn known_types() -> impl Iterator<Item = &'static str> {
    table().keys().map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// aws-node's published max pods (`max_enis * (ipv4_per_eni - 1) + 2`).
    const MAX_PODS: &str = include_str!("../data/aws-eni-max-pods.txt");

    /// The table's `max_enis` is the default network card's count, not
    /// DescribeInstanceTypes' total over all cards: interfaces are attached
    /// on card 0 only. For every multi-card row, aws-node's max pods (which
    /// it computes from the default card) agrees with `max_enis` and not with
    /// `max_enis * network_cards`, and `lookup` gives `max_enis`.
    #[test]
    fn multi_card_rows_count_the_default_card_only() {
        let max_pods: HashMap<&str, u32> = MAX_PODS
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?, f.next()?.parse().ok()?))
            })
            .collect();
        let mut rows = 0;
        for line in AWS_TABLE.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split('\t').collect();
            let [name, enis, ips, cards, ..] = f[..] else {
                continue;
            };
            let (enis, ips, cards): (u32, u32, u32) = (
                enis.parse().unwrap(),
                ips.parse().unwrap(),
                cards.parse().unwrap(),
            );
            if cards < 2 {
                continue;
            }
            rows += 1;
            let per_card = enis * (ips - 1) + 2;
            let total = enis * cards * (ips - 1) + 2;
            let oracle = max_pods[name];
            assert_eq!(oracle, per_card, "{name}: max_enis is not card 0's count");
            assert_ne!(oracle, total, "{name}");
            assert_eq!(lookup(name).unwrap().limits.max_interfaces, enis, "{name}");
        }
        // 67 types had more than one card in aws-node v1.23.1's table.
        assert_eq!(rows, 67);
        let p5 = lookup("p5.48xlarge").unwrap().limits;
        assert_eq!((p5.max_interfaces, p5.ipv4_per_interface), (2, 50));
        assert_eq!(lookup("hpc6id.32xlarge").unwrap().limits.max_interfaces, 1);
    }
}
