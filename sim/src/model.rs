//! The simulated VPC's state and the EC2-like operations on it.
//!
//! Pure state transitions: no clock, no I/O. [`super::Vpc`] adds throttling,
//! latency, faults and persistence around them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use providers::error::{ProviderError, Result};
use providers::limits;
use providers::types::{Assigned, Instance, Interface, Limits, Subnet};

/// Addresses AWS reserves in every subnet: network, router, DNS, future use,
/// and the broadcast address.
const RESERVED_LOW: u32 = 4;
const RESERVED_HIGH: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubnetState {
    pub id: String,
    pub cidr: Ipv4Net,
    pub zone: String,
    pub tags: BTreeMap<String, String>,
    /// Addresses in use: interface primaries, secondaries, and every address
    /// of delegated prefixes.
    pub used: BTreeSet<Ipv4Addr>,
}

impl SubnetState {
    fn usable(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let first = u32::from(self.cidr.network()) + RESERVED_LOW;
        let last = u32::from(self.cidr.broadcast()) - RESERVED_HIGH;
        (first..=last).map(Ipv4Addr::from)
    }

    pub fn free_count(&self) -> u32 {
        let total =
            (self.cidr.hosts().count() as u32 + 2).saturating_sub(RESERVED_LOW + RESERVED_HIGH);
        total.saturating_sub(self.used.len() as u32)
    }

    fn take_ips(&mut self, n: u32) -> Result<Vec<Ipv4Addr>> {
        if self.free_count() < n {
            return Err(ProviderError::SubnetExhausted {
                subnet: self.id.clone(),
            });
        }
        let picked: Vec<Ipv4Addr> = self
            .usable()
            .filter(|ip| !self.used.contains(ip))
            .take(n as usize)
            .collect();
        self.used.extend(picked.iter().copied());
        Ok(picked)
    }

    /// Aligned /28 blocks with every address free (reserved ones excluded).
    fn take_prefixes(&mut self, n: u32) -> Result<Vec<Ipv4Net>> {
        let mut found = Vec::new();
        let start = u32::from(self.cidr.network());
        let end = u32::from(self.cidr.broadcast());
        let lo = start + RESERVED_LOW;
        let hi = end - RESERVED_HIGH;
        let mut base = start;
        while base + 15 <= end && (found.len() as u32) < n {
            let block_ok = (base..base + 16)
                .all(|a| a >= lo && a <= hi && !self.used.contains(&Ipv4Addr::from(a)));
            if block_ok {
                found.push(Ipv4Net::new(Ipv4Addr::from(base), 28).expect("valid /28"));
            }
            base += 16;
        }
        if (found.len() as u32) < n {
            return Err(if self.free_count() >= 16 * n {
                ProviderError::InsufficientCidrBlocks {
                    subnet: self.id.clone(),
                }
            } else {
                ProviderError::SubnetExhausted {
                    subnet: self.id.clone(),
                }
            });
        }
        for p in &found {
            self.used
                .extend(p.hosts().chain([p.network(), p.broadcast()]));
        }
        Ok(found)
    }

    fn give_back(&mut self, ips: &[Ipv4Addr], prefixes: &[Ipv4Net]) {
        for ip in ips {
            self.used.remove(ip);
        }
        for p in prefixes {
            for a in u32::from(p.network())..=u32::from(p.broadcast()) {
                self.used.remove(&Ipv4Addr::from(a));
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub instance_id: String,
    pub device_index: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceState {
    pub id: String,
    pub mac: String,
    pub subnet_id: String,
    pub primary_ip: Ipv4Addr,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Net>,
    pub security_groups: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub attachment: Option<Attachment>,
}

impl InterfaceState {
    /// Slots used against the per-interface IPv4 limit: the primary, each
    /// secondary and each prefix.
    fn slots(&self) -> u32 {
        1 + self.secondary_ips.len() as u32 + self.prefixes.len() as u32
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceState {
    pub id: String,
    pub name: String,
    pub instance_type: String,
    pub zone: String,
    pub subnet_id: String,
    pub primary_interface_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VpcState {
    pub version: u32,
    pub vpc_id: String,
    pub cidr: Ipv4Net,
    pub security_group: String,
    pub subnets: BTreeMap<String, SubnetState>,
    pub instances: BTreeMap<String, InstanceState>,
    pub interfaces: BTreeMap<String, InterfaceState>,
    pub next_id: u64,
}

pub const STATE_VERSION: u32 = 1;

impl Default for VpcState {
    /// A VPC 10.0.0.0/16 with a node subnet and a pod subnet (tagged for
    /// discovery) in zone sim-1a, and one more subnet in sim-1b.
    fn default() -> Self {
        let mut s = VpcState {
            version: STATE_VERSION,
            vpc_id: "vpc-0sim0000000000001".into(),
            cidr: "10.0.0.0/16".parse().expect("cidr"),
            security_group: "sg-0sim0000000000001".into(),
            subnets: BTreeMap::new(),
            instances: BTreeMap::new(),
            interfaces: BTreeMap::new(),
            next_id: 1,
        };
        s.add_subnet("subnet-0sim00000000node", "10.0.0.0/20", "sim-1a", &[])
            .expect("subnet");
        s.add_subnet(
            "subnet-0sim00000000pods",
            "10.0.16.0/20",
            "sim-1a",
            &[("kubernetes.io/role/cni", "1")],
        )
        .expect("subnet");
        s.add_subnet("subnet-0sim0000000000b", "10.0.32.0/20", "sim-1b", &[])
            .expect("subnet");
        s
    }
}

/// One subnet of [`VpcState::with_layout`]: id, CIDR, zone, tags.
pub type SubnetLayout<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)]);

impl VpcState {
    /// A VPC of `cidr` with exactly `subnets` (for simulations larger than
    /// the default /16 holds). Instances launched without a subnet go to
    /// `subnet-0sim00000000node`, which should be among them.
    pub fn with_layout(cidr: &str, subnets: &[SubnetLayout<'_>]) -> Result<Self> {
        let mut s = VpcState {
            cidr: cidr
                .parse()
                .map_err(|e| ProviderError::Invalid(format!("VPC cidr {cidr}: {e}")))?,
            subnets: BTreeMap::new(),
            ..VpcState::default()
        };
        for (id, c, zone, tags) in subnets {
            s.add_subnet(id, c, zone, tags)?;
        }
        Ok(s)
    }

    fn new_id(&mut self, prefix: &str) -> String {
        let n = self.next_id;
        self.next_id += 1;
        format!("{prefix}-0{n:016x}")
    }

    fn new_mac(&mut self) -> String {
        let n = self.next_id;
        self.next_id += 1;
        let b = n.to_be_bytes();
        format!(
            "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[3], b[4], b[5], b[6], b[7]
        )
    }

    pub fn add_subnet(
        &mut self,
        id: &str,
        cidr: &str,
        zone: &str,
        tags: &[(&str, &str)],
    ) -> Result<()> {
        let cidr: Ipv4Net = cidr
            .parse()
            .map_err(|e| ProviderError::Invalid(format!("subnet cidr {cidr}: {e}")))?;
        if !self.cidr.contains(&cidr) {
            return Err(ProviderError::Invalid(format!(
                "subnet {cidr} is outside the VPC {}",
                self.cidr
            )));
        }
        if self
            .subnets
            .values()
            .any(|s| s.cidr.contains(&cidr.network()) || cidr.contains(&s.cidr.network()))
        {
            if self.subnets.get(id).map(|s| s.cidr) == Some(cidr) {
                return Ok(()); // idempotent re-create
            }
            return Err(ProviderError::Invalid(format!(
                "subnet {cidr} overlaps an existing subnet"
            )));
        }
        self.subnets.insert(
            id.to_string(),
            SubnetState {
                id: id.to_string(),
                cidr,
                zone: zone.to_string(),
                tags: tags
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                used: BTreeSet::new(),
            },
        );
        Ok(())
    }

    fn subnet_mut(&mut self, id: &str) -> Result<&mut SubnetState> {
        self.subnets
            .get_mut(id)
            .ok_or_else(|| ProviderError::NotFound(format!("subnet {id}")))
    }

    fn instance(&self, id: &str) -> Result<&InstanceState> {
        self.instances
            .get(id)
            .ok_or_else(|| ProviderError::NotFound(format!("instance {id}")))
    }

    /// Replaces interface `id`'s tags.
    pub fn set_interface_tags(&mut self, id: &str, tags: BTreeMap<String, String>) -> Result<()> {
        self.interface_mut(id)?.tags = tags;
        Ok(())
    }

    fn interface_mut(&mut self, id: &str) -> Result<&mut InterfaceState> {
        self.interfaces
            .get_mut(id)
            .ok_or_else(|| ProviderError::NotFound(format!("network interface {id}")))
    }

    fn limits_of(&self, instance_type: &str) -> Result<Limits> {
        limits::lookup(instance_type)
            .map(|t| t.limits)
            .ok_or_else(|| ProviderError::Invalid(format!("unknown instance type {instance_type}")))
    }

    /// Starts an instance named `name`, or returns the one already running
    /// under that name (so a restarted node finds itself again).
    pub fn launch_instance(
        &mut self,
        name: &str,
        instance_type: &str,
        subnet_id: &str,
    ) -> Result<String> {
        if let Some(i) = self.instances.values().find(|i| i.name == name) {
            if i.instance_type != instance_type {
                return Err(ProviderError::Invalid(format!(
                    "instance {name} already runs as {}, not {instance_type}",
                    i.instance_type
                )));
            }
            return Ok(i.id.clone());
        }
        self.limits_of(instance_type)?;
        let zone = self.subnet_mut(subnet_id)?.zone.clone();
        let id = self.new_id("i");
        let eni = self.create_interface_raw(subnet_id, vec![], BTreeMap::new())?;
        self.interface_mut(&eni)?.attachment = Some(Attachment {
            instance_id: id.clone(),
            device_index: 0,
        });
        self.instances.insert(
            id.clone(),
            InstanceState {
                id: id.clone(),
                name: name.to_string(),
                instance_type: instance_type.to_string(),
                zone,
                subnet_id: subnet_id.to_string(),
                primary_interface_id: eni,
            },
        );
        Ok(id)
    }

    pub fn describe_instance(&self, id: &str) -> Result<Instance> {
        let i = self.instance(id)?;
        let primary = self
            .interfaces
            .get(&i.primary_interface_id)
            .ok_or_else(|| ProviderError::NotFound(i.primary_interface_id.clone()))?;
        Ok(Instance {
            id: i.id.clone(),
            instance_type: i.instance_type.clone(),
            zone: i.zone.clone(),
            primary_ip: primary.primary_ip,
            primary_interface_id: primary.id.clone(),
            subnet_id: i.subnet_id.clone(),
            vpc_id: self.vpc_id.clone(),
            vpc_cidrs: vec![self.cidr],
            security_groups: vec![self.security_group.clone()],
            limits: self.limits_of(&i.instance_type)?,
        })
    }

    pub fn describe_interfaces(&self, instance_id: &str) -> Result<Vec<Interface>> {
        self.instance(instance_id)?;
        let mut v: Vec<Interface> = self
            .interfaces
            .values()
            .filter_map(|e| {
                let a = e.attachment.as_ref()?;
                (a.instance_id == instance_id).then(|| self.view(e))
            })
            .collect();
        v.sort_by_key(|e| e.device_index);
        Ok(v)
    }

    pub fn view(&self, e: &InterfaceState) -> Interface {
        Interface {
            id: e.id.clone(),
            mac: e.mac.clone(),
            device_index: e.attachment.as_ref().map_or(u32::MAX, |a| a.device_index),
            subnet_id: e.subnet_id.clone(),
            subnet_cidr: self.subnets.get(&e.subnet_id).map_or_else(
                || Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("net"),
                |s| s.cidr,
            ),
            primary_ip: e.primary_ip,
            secondary_ips: e.secondary_ips.clone(),
            prefixes: e.prefixes.clone(),
            tags: e.tags.clone(),
            // The simulated cloud has no such flag.
            delete_on_termination: None,
        }
    }

    fn create_interface_raw(
        &mut self,
        subnet_id: &str,
        security_groups: Vec<String>,
        tags: BTreeMap<String, String>,
    ) -> Result<String> {
        let primary = self.subnet_mut(subnet_id)?.take_ips(1)?[0];
        // None named: the node's, which in this VPC is its one group.
        let security_groups = if security_groups.is_empty() {
            vec![self.security_group.clone()]
        } else {
            security_groups
        };
        let id = self.new_id("eni");
        let mac = self.new_mac();
        self.interfaces.insert(
            id.clone(),
            InterfaceState {
                id: id.clone(),
                mac,
                subnet_id: subnet_id.to_string(),
                primary_ip: primary,
                secondary_ips: vec![],
                prefixes: vec![],
                security_groups,
                tags,
                attachment: None,
            },
        );
        Ok(id)
    }

    /// CreateNetworkInterface: an unattached interface, with secondary IPs or
    /// prefixes assigned in the same call. All or nothing.
    pub fn create_interface(
        &mut self,
        subnet_id: &str,
        security_groups: Vec<String>,
        tags: BTreeMap<String, String>,
        ips: u32,
        prefixes: u32,
    ) -> Result<Interface> {
        let id = self.create_interface_raw(subnet_id, security_groups, tags)?;
        if let Err(e) = self.assign(&id, ips, prefixes, None) {
            self.delete_interface(&id).ok();
            return Err(e);
        }
        Ok(self.view(&self.interfaces[&id]))
    }

    /// AttachNetworkInterface at `device_index`, or at the lowest free index.
    pub fn attach(
        &mut self,
        interface_id: &str,
        instance_id: &str,
        device_index: Option<u32>,
    ) -> Result<u32> {
        self.attach_checked(interface_id, instance_id, device_index, false)
    }

    /// An interface given to an instance at its creation (Azure's NICs of a
    /// VM), at the lowest free device index: allowed where a running
    /// instance takes none.
    pub fn attach_at_launch(&mut self, interface_id: &str, instance_id: &str) -> Result<u32> {
        self.attach_checked(interface_id, instance_id, None, true)
    }

    fn attach_checked(
        &mut self,
        interface_id: &str,
        instance_id: &str,
        device_index: Option<u32>,
        at_launch: bool,
    ) -> Result<u32> {
        let inst = self.instance(instance_id)?.clone();
        let limits = self.limits_of(&inst.instance_type)?;
        if !at_launch
            && matches!(
                limits::lookup(&inst.instance_type).map(|t| t.family),
                Some(limits::Family::Azure)
            )
        {
            return Err(ProviderError::Unsupported(format!(
                "{instance_id} ({}) is running: Azure attaches a NIC only while the VM is deallocated",
                inst.instance_type
            )));
        }
        let e = self
            .interfaces
            .get(interface_id)
            .ok_or_else(|| ProviderError::NotFound(format!("network interface {interface_id}")))?;
        if let Some(a) = &e.attachment {
            return Err(ProviderError::Invalid(format!(
                "network interface {interface_id} is already attached to {} at device index {}",
                a.instance_id, a.device_index
            )));
        }
        let iface_zone = &self.subnets[&e.subnet_id].zone;
        if *iface_zone != inst.zone {
            return Err(ProviderError::Invalid(format!(
                "network interface {interface_id} is in {iface_zone}, instance {instance_id} in {}",
                inst.zone
            )));
        }
        if e.slots() > limits.ipv4_per_interface {
            return Err(ProviderError::LimitExceeded(format!(
                "interface {interface_id} has {} addresses, {} allows {} per interface",
                e.slots(),
                inst.instance_type,
                limits.ipv4_per_interface
            )));
        }
        let used: BTreeSet<u32> = self
            .interfaces
            .values()
            .filter_map(|x| x.attachment.as_ref())
            .filter(|a| a.instance_id == instance_id)
            .map(|a| a.device_index)
            .collect();
        if used.len() as u32 >= limits.max_interfaces {
            return Err(ProviderError::LimitExceeded(format!(
                "instance {instance_id} ({}) already has {} of {} network interfaces",
                inst.instance_type,
                used.len(),
                limits.max_interfaces
            )));
        }
        let index = match device_index {
            Some(i) if used.contains(&i) => {
                return Err(ProviderError::Invalid(format!(
                    "device index {i} is in use on instance {instance_id}"
                )))
            }
            Some(i) => i,
            None => (1..).find(|i| !used.contains(i)).expect("free index"),
        };
        self.interface_mut(interface_id)?.attachment = Some(Attachment {
            instance_id: instance_id.to_string(),
            device_index: index,
        });
        Ok(index)
    }

    pub fn detach(&mut self, interface_id: &str) -> Result<()> {
        let e = self.interface_mut(interface_id)?;
        if e.attachment.as_ref().is_some_and(|a| a.device_index == 0) {
            return Err(ProviderError::Invalid(format!(
                "network interface {interface_id} is the primary interface and cannot be detached"
            )));
        }
        e.attachment = None;
        Ok(())
    }

    pub fn delete_interface(&mut self, interface_id: &str) -> Result<()> {
        let e = self
            .interfaces
            .get(interface_id)
            .ok_or_else(|| ProviderError::NotFound(format!("network interface {interface_id}")))?;
        if e.attachment.is_some() {
            return Err(ProviderError::Invalid(format!(
                "network interface {interface_id} is in use (attached)"
            )));
        }
        let e = self.interfaces.remove(interface_id).expect("present");
        let mut ips = e.secondary_ips.clone();
        ips.push(e.primary_ip);
        self.subnet_mut(&e.subnet_id)?.give_back(&ips, &e.prefixes);
        Ok(())
    }

    /// AssignPrivateIpAddresses with a count, or Ipv4PrefixCount. `partial`
    /// caps how many are actually assigned (fault injection).
    pub fn assign(
        &mut self,
        interface_id: &str,
        ips: u32,
        prefixes: u32,
        partial: Option<u32>,
    ) -> Result<Assigned> {
        let e = self
            .interfaces
            .get(interface_id)
            .ok_or_else(|| ProviderError::NotFound(format!("network interface {interface_id}")))?
            .clone();
        if ips > 0 && prefixes > 0 {
            return Err(ProviderError::Invalid(
                "ask for addresses or prefixes, not both".into(),
            ));
        }
        if let Some(a) = &e.attachment {
            let inst = self.instance(&a.instance_id)?.clone();
            let limits = self.limits_of(&inst.instance_type)?;
            if prefixes > 0 && !limits.prefix_delegation {
                return Err(ProviderError::Unsupported(format!(
                    "{} does not support prefix delegation",
                    inst.instance_type
                )));
            }
            if e.slots() + ips + prefixes > limits.ipv4_per_interface {
                return Err(ProviderError::LimitExceeded(format!(
                    "interface {interface_id} would have {} addresses; {} allows {} per interface",
                    e.slots() + ips + prefixes,
                    inst.instance_type,
                    limits.ipv4_per_interface
                )));
            }
        }
        let (ips, prefixes) = match partial {
            Some(cap) => (ips.min(cap), prefixes.min(cap)),
            None => (ips, prefixes),
        };
        let subnet = self.subnet_mut(&e.subnet_id)?;
        let got = Assigned {
            ips: if ips > 0 {
                subnet.take_ips(ips)?
            } else {
                vec![]
            },
            prefixes: if prefixes > 0 {
                subnet.take_prefixes(prefixes)?
            } else {
                vec![]
            },
        };
        let e = self.interface_mut(interface_id)?;
        e.secondary_ips.extend(got.ips.iter().copied());
        e.prefixes.extend(got.prefixes.iter().copied());
        Ok(got)
    }

    /// UnassignPrivateIpAddresses / UnassignIpv4Prefixes. Addresses the
    /// interface does not hold are rejected, as EC2 does, and nothing changes.
    pub fn unassign(&mut self, interface_id: &str, what: &Assigned) -> Result<()> {
        let e = self.interface_mut(interface_id)?;
        if let Some(ip) = what.ips.iter().find(|ip| !e.secondary_ips.contains(ip)) {
            return Err(ProviderError::Invalid(format!(
                "{ip} is not a secondary address of {interface_id}"
            )));
        }
        if let Some(p) = what.prefixes.iter().find(|p| !e.prefixes.contains(p)) {
            return Err(ProviderError::Invalid(format!(
                "{p} is not a prefix of {interface_id}"
            )));
        }
        e.secondary_ips.retain(|ip| !what.ips.contains(ip));
        e.prefixes.retain(|p| !what.prefixes.contains(p));
        let subnet_id = e.subnet_id.clone();
        self.subnet_mut(&subnet_id)?
            .give_back(&what.ips, &what.prefixes);
        Ok(())
    }

    pub fn describe_subnets(&self, zone: Option<&str>) -> Vec<Subnet> {
        self.subnets
            .values()
            .filter(|s| zone.is_none_or(|z| s.zone == z))
            .map(|s| Subnet {
                id: s.id.clone(),
                cidr: s.cidr,
                zone: s.zone.clone(),
                free_addresses: s.free_count(),
                tags: s.tags.clone(),
            })
            .collect()
    }

    /// Consistency checks a real VPC guarantees: no address on two
    /// interfaces, device indexes unique per instance, subnet accounting exact.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let mut seen: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        let mut per_subnet: BTreeMap<&str, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        let mut indexes: BTreeSet<(&str, u32)> = BTreeSet::new();
        for e in self.interfaces.values() {
            let prefix_ips = e.prefixes.iter().flat_map(|p| {
                (u32::from(p.network())..=u32::from(p.broadcast())).map(Ipv4Addr::from)
            });
            for ip in std::iter::once(e.primary_ip)
                .chain(e.secondary_ips.iter().copied())
                .chain(prefix_ips)
            {
                if let Some(other) = seen.insert(ip, &e.id) {
                    return Err(format!("{ip} is on both {other} and {}", e.id));
                }
                per_subnet.entry(&e.subnet_id).or_default().insert(ip);
            }
            if let Some(a) = &e.attachment {
                if !indexes.insert((&a.instance_id, a.device_index)) {
                    return Err(format!(
                        "device index {} used twice on {}",
                        a.device_index, a.instance_id
                    ));
                }
            }
        }
        for s in self.subnets.values() {
            let want = per_subnet.remove(s.id.as_str()).unwrap_or_default();
            if want != s.used {
                return Err(format!(
                    "subnet {} accounting differs from its interfaces",
                    s.id
                ));
            }
        }
        Ok(())
    }
}
