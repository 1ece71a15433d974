use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Per-instance-type limits, as the cloud enforces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Network interfaces an instance of this type can have attached.
    pub max_interfaces: u32,
    /// IPv4 addresses per interface, the interface's primary address included.
    /// Under prefix delegation each /28 takes one of these slots.
    pub ipv4_per_interface: u32,
    /// Whether /28 prefixes can be delegated to interfaces (AWS Nitro).
    pub prefix_delegation: bool,
}

impl Limits {
    /// Secondary slots per interface (addresses or prefixes) available to pods.
    pub fn slots_per_interface(&self) -> u32 {
        self.ipv4_per_interface.saturating_sub(1)
    }

    /// aws-node's max pods: every secondary IP of every interface, plus two
    /// for host-network pods.
    pub fn max_pods(&self) -> u32 {
        self.max_interfaces * self.slots_per_interface() + 2
    }
}

/// What a cloud can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Interfaces can be attached to a running instance (AWS yes, Azure no).
    pub hot_attach: bool,
    /// /28 prefix delegation exists in this cloud.
    pub prefixes: bool,
}

/// The instance a node runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub instance_type: String,
    pub zone: String,
    pub primary_ip: Ipv4Addr,
    pub primary_interface_id: String,
    pub subnet_id: String,
    pub vpc_id: String,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub security_groups: Vec<String>,
    pub limits: Limits,
}

/// An interface attached to the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub id: String,
    pub mac: String,
    pub device_index: u32,
    pub subnet_id: String,
    pub subnet_cidr: Ipv4Net,
    pub primary_ip: Ipv4Addr,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Net>,
    pub tags: BTreeMap<String, String>,
    /// The attachment's DeleteOnTermination flag, where the cloud has one
    /// (EC2); `Some(false)` on an interface of ours means it would outlive
    /// the instance (a create cut short between Attach and the flag).
    #[serde(default)]
    pub delete_on_termination: Option<bool>,
}

impl Interface {
    /// The interface is the instance's primary one (device index 0), which is
    /// never detached.
    pub fn is_primary(&self) -> bool {
        self.device_index == 0
    }

    /// The subnet's router: the first host address, as in AWS and Azure.
    pub fn gateway(&self) -> Ipv4Addr {
        subnet_gateway(self.subnet_cidr)
    }
}

pub fn subnet_gateway(cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

/// A subnet new interfaces can be created in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub id: String,
    pub cidr: Ipv4Net,
    pub zone: String,
    pub free_addresses: u32,
    pub tags: BTreeMap<String, String>,
}

/// How many addresses to add to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AssignRequest {
    Ips(u32),
    /// /28 prefixes (prefix delegation).
    Prefixes(u32),
}

/// Addresses added to (or to be removed from) an interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Net>,
}

/// A new interface for this instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateInterface {
    pub subnet_id: String,
    /// Empty: the node's own groups, those of its primary interface as they
    /// are when the interface is created (a group replaced on the node is
    /// followed). Named groups are used as given (e.g. an ENIConfig's).
    pub security_groups: Vec<String>,
    pub tags: BTreeMap<String, String>,
    /// Addresses to assign in the same call as the create.
    pub initial: AssignRequest,
}

/// Tags put on every interface ipamd creates, and by which leaked ones are
/// recognised.
pub mod tags {
    pub const OWNER: &str = "vpc-cni.io/owner";
    pub const OWNER_VALUE: &str = "vpc-cni";
    pub const INSTANCE: &str = "vpc-cni.io/instance-id";
    pub const CLUSTER: &str = "vpc-cni.io/cluster-name";
    /// Seconds since the Unix epoch.
    pub const CREATED: &str = "vpc-cni.io/created-at";
    /// On a subnet: "1" offers it for new interfaces, "0" excludes it.
    pub const SUBNET_ROLE: &str = "kubernetes.io/role/cni";
    /// On an interface: "true" tells ipamd to leave it alone (aws-node's
    /// tag and meaning: its addresses are never used, it is never freed).
    pub const NO_MANAGE: &str = "node.k8s.amazonaws.com/no_manage";
    /// aws-node's tag on the interfaces it creates: the instance's id. An
    /// interface so tagged for this instance is taken over by ipamd when a
    /// node moves from aws-node (see ipamd's `migrate`).
    pub const AWS_NODE_INSTANCE: &str = "node.k8s.amazonaws.com/instance_id";
}

/// A pool change the reconciler makes ahead of demand, which no ADD waits
/// for ([`crate::CloudProvider::put_off`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// More addresses or prefixes on an interface.
    Assign,
    /// A new interface (with its first addresses).
    CreateInterface,
    /// Addresses or prefixes given back.
    Release,
    /// An interface detached and deleted.
    DeleteInterface,
}

impl Change {
    /// The EC2 API that makes the change (its first call, for a chain):
    /// the bucket it draws from, in EC2's API names.
    pub fn ec2_api(self) -> &'static str {
        match self {
            Self::Assign => "AssignPrivateIpAddresses",
            Self::CreateInterface => "CreateNetworkInterface",
            Self::Release => "UnassignPrivateIpAddresses",
            Self::DeleteInterface => "DetachNetworkInterface",
        }
    }
}
