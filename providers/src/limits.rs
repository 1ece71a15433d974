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
