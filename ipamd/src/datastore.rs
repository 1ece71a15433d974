//! Interfaces, their addresses, and which pod holds which address.
//!
//! Assignments are keyed by (network name, container id, ifname), as the CNI
//! spec keys an attachment, so a repeated ADD gets the same address back.
//! Addresses released by a pod cool down before they are handed out again and
//! never count as available while cooling. New assignments go to the fullest
//! interface, so idle interfaces drain and can be released.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use providers::{Assigned, Interface};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::policy::{IfaceView, PoolView, PrefixView};

/// The CNI's key for one attachment of a container to a network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodKey {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.network, self.container_id, self.ifname)
    }
}

/// The Kubernetes pod an attachment belongs to, as the runtime's
/// `CNI_ARGS` name it (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

impl PodName {
    /// `namespace/name` as given (`ns/name`); `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let (namespace, name) = s.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains('/')).then(|| Self {
            namespace: namespace.into(),
            name: name.into(),
        })
    }
}

impl std::fmt::Display for PodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    Free,
    Assigned(PodKey),
    /// Released by a pod; not handed out before `until`.
    Cooling {
        until: Instant,
    },
    /// Being given back to the cloud.
    Releasing,
}

/// Route table for traffic from a secondary interface's addresses; the
/// primary interface uses the main table. Shared with the plugin.
pub use ipamd_api::datapath::route_table;

#[derive(Debug, Clone)]
pub struct IfaceEntry {
    pub info: Interface,
    pub attached_at: Instant,
    /// Pending delete: takes no new assignments and is not part of the pool.
    pub draining: bool,
    /// The node's side of the interface is set up; until then it takes no
    /// new assignments.
    pub ready: bool,
    pub addrs: BTreeMap<Ipv4Addr, Slot>,
    /// Delegated prefixes; their addresses are in `addrs`.
    pub prefixes: BTreeSet<Ipv4Net>,
}

impl IfaceEntry {
    fn count(&self, now: Instant, pred: impl Fn(&Slot, Instant) -> bool) -> u32 {
        self.addrs.values().filter(|s| pred(s, now)).count() as u32
    }

    fn assigned(&self) -> u32 {
        self.addrs
            .values()
            .filter(|s| matches!(s, Slot::Assigned(_)))
            .count() as u32
    }

    fn in_prefix(&self, ip: Ipv4Addr) -> bool {
        self.prefixes.iter().any(|p| p.contains(&ip))
    }
}

fn is_free(s: &Slot, now: Instant) -> bool {
    match s {
        Slot::Free => true,
        Slot::Cooling { until } => *until <= now,
        _ => false,
    }
}

fn is_cooling(s: &Slot, now: Instant) -> bool {
    matches!(s, Slot::Cooling { until } if *until > now)
}

/// Where a pod's address lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub ip: Ipv4Addr,
    pub interface_id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    pub interfaces: u32,
    pub total: u32,
    pub assigned: u32,
    pub cooling: u32,
    pub available: u32,
    /// Available on an interface whose node side is in place: what an ADD
    /// can be given right now.
    pub assignable: u32,
    pub prefixes: u32,
}

#[derive(Debug)]
pub struct Datastore {
    ifaces: BTreeMap<String, IfaceEntry>,
    owners: HashMap<PodKey, Placement>,
    cooldown: Duration,
}

impl Datastore {
    pub fn new(cooldown: Duration) -> Self {
        Self {
            ifaces: BTreeMap::new(),
            owners: HashMap::new(),
            cooldown,
        }
    }

    pub fn interfaces(&self) -> impl Iterator<Item = &IfaceEntry> {
        self.ifaces.values()
    }

    pub fn interface(&self, id: &str) -> Option<&IfaceEntry> {
        self.ifaces.get(id)
    }

    pub fn assignments(&self) -> impl Iterator<Item = (&PodKey, &Placement)> {
        self.owners.iter()
    }

    pub fn lookup(&self, key: &PodKey) -> Option<&Placement> {
        self.owners.get(key)
    }

    /// Adds an attached interface with every address it holds, free.
    pub fn add_interface(&mut self, info: Interface, attached_at: Instant) {
        let mut entry = IfaceEntry {
            info: Interface {
                secondary_ips: vec![],
                prefixes: vec![],
                ..info.clone()
            },
            attached_at,
            draining: false,
            ready: true,
            addrs: BTreeMap::new(),
            prefixes: BTreeSet::new(),
        };
        add_addrs(
            &mut entry,
            &Assigned {
                ips: info.secondary_ips,
                prefixes: info.prefixes,
            },
        );
        self.ifaces.insert(entry.info.id.clone(), entry);
    }

    /// Addresses the cloud added to an interface.
    pub fn add_addresses(&mut self, interface_id: &str, got: &Assigned) -> bool {
        match self.ifaces.get_mut(interface_id) {
            Some(e) => {
                add_addrs(e, got);
                true
            }
            None => false,
        }
    }

    /// Gives a pod an address: its own if it has one, else a free one on the
    /// fullest interface. `None` when nothing is free. The bool says whether
    /// the assignment is new (and must be journalled).
    pub fn assign(&mut self, key: &PodKey, now: Instant) -> Option<(Placement, bool)> {
        if let Some(p) = self.owners.get(key) {
            return Some((p.clone(), false));
        }
        let best = self
            .ifaces
            .values()
            .filter(|e| !e.draining && e.ready)
            .filter_map(|e| {
                let ip = e
                    .addrs
                    .iter()
                    .find(|(_, s)| is_free(s, now))
                    .map(|(ip, _)| *ip)?;
                Some((
                    e.assigned(),
                    std::cmp::Reverse(e.info.device_index),
                    e.info.id.clone(),
                    ip,
                ))
            })
            .max_by_key(|(assigned, index, _, _)| (*assigned, *index))?;
        let (_, _, interface_id, ip) = best;
        let e = self.ifaces.get_mut(&interface_id).expect("present");
        e.addrs.insert(ip, Slot::Assigned(key.clone()));
        let p = Placement { ip, interface_id };
        self.owners.insert(key.clone(), p.clone());
        Some((p, true))
    }

    /// Restores an assignment from the journal. False if the address is not
    /// in the pool (the cloud no longer has it) or is held by another pod.
    pub fn restore(&mut self, key: &PodKey, ip: Ipv4Addr) -> bool {
        let Some(e) = self.ifaces.values_mut().find(|e| e.addrs.contains_key(&ip)) else {
            return false;
        };
        match e.addrs.get(&ip) {
            Some(Slot::Free) | Some(Slot::Cooling { .. }) => {}
            _ => return false,
        }
        e.addrs.insert(ip, Slot::Assigned(key.clone()));
        let p = Placement {
            ip,
            interface_id: e.info.id.clone(),
        };
        self.owners.insert(key.clone(), p);
        true
    }

    /// Marks an address as cooling until `until` (replayed releases).
    pub fn restore_cooling(&mut self, ip: Ipv4Addr, until: Instant) {
        for e in self.ifaces.values_mut() {
            if let Some(s @ Slot::Free) = e.addrs.get_mut(&ip) {
                *s = Slot::Cooling { until };
            }
        }
    }

    /// The pod lets go of its address, which starts cooling.
    pub fn release(&mut self, key: &PodKey, now: Instant) -> Option<Placement> {
        let p = self.owners.remove(key)?;
        if let Some(e) = self.ifaces.get_mut(&p.interface_id) {
            e.addrs.insert(
                p.ip,
                Slot::Cooling {
                    until: now + self.cooldown,
                },
            );
        }
        Some(p)
    }

    /// Undoes a new assignment whose journal write failed.
    pub fn unassign(&mut self, key: &PodKey) {
        if let Some(p) = self.owners.remove(key) {
            if let Some(e) = self.ifaces.get_mut(&p.interface_id) {
                e.addrs.insert(p.ip, Slot::Free);
            }
        }
    }

    /// Claims free addresses and wholly unused prefixes for release to the
    /// cloud; returns what was claimed (some may have been taken meanwhile).
    pub fn claim_for_release(
        &mut self,
        interface_id: &str,
        want: &Assigned,
        now: Instant,
    ) -> Assigned {
        let mut got = Assigned::default();
        let Some(e) = self.ifaces.get_mut(interface_id) else {
            return got;
        };
        for ip in &want.ips {
            if e.in_prefix(*ip) {
                continue;
            }
            if let Some(s) = e.addrs.get_mut(ip) {
                if is_free(s, now) {
                    *s = Slot::Releasing;
                    got.ips.push(*ip);
                }
            }
        }
        for p in &want.prefixes {
            if !e.prefixes.contains(p) {
                continue;
            }
            let all_free = e
                .addrs
                .range(p.network()..=p.broadcast())
                .all(|(_, s)| is_free(s, now));
            if all_free {
                for (_, s) in e.addrs.range_mut(p.network()..=p.broadcast()) {
                    *s = Slot::Releasing;
                }
                got.prefixes.push(*p);
            }
        }
        got
    }

    /// The cloud confirmed the release.
    pub fn forget(&mut self, interface_id: &str, released: &Assigned) {
        let Some(e) = self.ifaces.get_mut(interface_id) else {
            return;
        };
        for ip in &released.ips {
            e.addrs.remove(ip);
        }
        for p in &released.prefixes {
            e.prefixes.remove(p);
            let inside: Vec<Ipv4Addr> = e
                .addrs
                .range(p.network()..=p.broadcast())
                .map(|(ip, _)| *ip)
                .collect();
            for ip in inside {
                e.addrs.remove(&ip);
            }
        }
    }

    /// The release failed: the addresses are free again.
    pub fn unclaim(&mut self, interface_id: &str, claimed: &Assigned) {
        let Some(e) = self.ifaces.get_mut(interface_id) else {
            return;
        };
        let mut back: Vec<Ipv4Addr> = claimed.ips.clone();
        for p in &claimed.prefixes {
            back.extend(
                e.addrs
                    .range(p.network()..=p.broadcast())
                    .map(|(ip, _)| *ip),
            );
        }
        for ip in back {
            if let Some(s @ Slot::Releasing) = e.addrs.get_mut(&ip) {
                *s = Slot::Free;
            }
        }
    }

    /// Marks an idle interface for deletion. False if it holds pods or
    /// cooling addresses, or is the primary.
    pub fn start_draining(&mut self, interface_id: &str, now: Instant) -> bool {
        let Some(e) = self.ifaces.get_mut(interface_id) else {
            return false;
        };
        if e.info.device_index == 0 || !e.addrs.values().all(|s| is_free(s, now)) {
            return false;
        }
        e.draining = true;
        true
    }

    /// Marks an interface as pending delete whatever it holds (replay).
    pub fn set_draining(&mut self, interface_id: &str) {
        if let Some(e) = self.ifaces.get_mut(interface_id) {
            e.draining = true;
        }
    }

    pub fn set_ready(&mut self, interface_id: &str, ready: bool) {
        if let Some(e) = self.ifaces.get_mut(interface_id) {
            e.ready = ready;
        }
    }

    pub fn stop_draining(&mut self, interface_id: &str) {
        if let Some(e) = self.ifaces.get_mut(interface_id) {
            e.draining = false;
        }
    }

    pub fn remove_interface(&mut self, interface_id: &str) {
        self.ifaces.remove(interface_id);
    }

    pub fn draining(&self) -> Vec<String> {
        self.ifaces
            .values()
            .filter(|e| e.draining)
            .map(|e| e.info.id.clone())
            .collect()
    }

    /// Brings the pool in line with what the cloud reports: adds interfaces
    /// and addresses it did not know, drops unassigned ones the cloud no
    /// longer has. Returns assignments whose address vanished.
    pub fn resync(&mut self, cloud: &[Interface], now: Instant) -> Vec<(PodKey, Ipv4Addr)> {
        let mut lost = vec![];
        let ids: BTreeSet<&str> = cloud.iter().map(|i| i.id.as_str()).collect();
        let gone: Vec<String> = self
            .ifaces
            .keys()
            .filter(|id| !ids.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            if let Some(e) = self.ifaces.remove(&id) {
                lost.extend(e.addrs.into_iter().filter_map(|(ip, s)| match s {
                    Slot::Assigned(k) => Some((k, ip)),
                    _ => None,
                }));
            }
        }
        for c in cloud {
            let Some(e) = self.ifaces.get_mut(&c.id) else {
                self.add_interface(c.clone(), now);
                continue;
            };
            let mut have: BTreeSet<Ipv4Addr> = c.secondary_ips.iter().copied().collect();
            for p in &c.prefixes {
                have.extend(
                    (u32::from(p.network())..=u32::from(p.broadcast())).map(Ipv4Addr::from),
                );
            }
            let stale: Vec<Ipv4Addr> = e
                .addrs
                .iter()
                .filter(|(ip, s)| !have.contains(ip) && !matches!(s, Slot::Releasing))
                .map(|(ip, _)| *ip)
                .collect();
            for ip in stale {
                if let Some(Slot::Assigned(k)) = e.addrs.remove(&ip) {
                    lost.push((k, ip));
                }
            }
            e.prefixes = c.prefixes.iter().copied().collect();
            add_addrs(
                e,
                &Assigned {
                    ips: c.secondary_ips.clone(),
                    prefixes: c.prefixes.clone(),
                },
            );
            e.info.device_index = c.device_index;
        }
        for (k, _) in &lost {
            self.owners.remove(k);
        }
        lost
    }

    /// The pool as the policy sees it.
    pub fn view(
        &self,
        limits: providers::Limits,
        hot_attach: bool,
        waiting: u32,
        now: Instant,
    ) -> PoolView {
        let interfaces = self
            .ifaces
            .values()
            .filter(|e| !e.draining)
            .map(|e| {
                let prefixes = e
                    .prefixes
                    .iter()
                    .map(|p| PrefixView {
                        prefix: *p,
                        in_use: e
                            .addrs
                            .range(p.network()..=p.broadcast())
                            .filter(|(_, s)| !is_free(s, now))
                            .count() as u32,
                    })
                    .collect();
                let single = |ip: &Ipv4Addr| !e.in_prefix(*ip);
                IfaceView {
                    id: e.info.id.clone(),
                    subnet_id: e.info.subnet_id.clone(),
                    subnet_full: false,
                    device_index: e.info.device_index,
                    attached_at: e.attached_at,
                    ips: e.addrs.keys().filter(|ip| single(ip)).count() as u32,
                    prefixes,
                    assigned: e.count(now, |s, _| matches!(s, Slot::Assigned(_))),
                    cooling: e.count(now, |s, n| is_cooling(s, n) || matches!(s, Slot::Releasing)),
                    free_ips: e
                        .addrs
                        .iter()
                        .filter(|(ip, s)| single(ip) && is_free(s, now))
                        .map(|(ip, _)| *ip)
                        .collect(),
                }
            })
            .collect();
        PoolView {
            interfaces,
            limits,
            hot_attach,
            waiting,
            subnet_low: false,
            adaptive_warm: 0,
        }
    }

    pub fn counts(&self, now: Instant) -> Counts {
        let mut c = Counts {
            interfaces: 0,
            total: 0,
            assigned: 0,
            cooling: 0,
            available: 0,
            assignable: 0,
            prefixes: 0,
        };
        for e in self.ifaces.values().filter(|e| !e.draining) {
            c.interfaces += 1;
            c.prefixes += e.prefixes.len() as u32;
            for s in e.addrs.values() {
                c.total += 1;
                match s {
                    Slot::Assigned(_) => c.assigned += 1,
                    s if is_free(s, now) => {
                        c.available += 1;
                        if e.ready {
                            c.assignable += 1;
                        }
                    }
                    _ => c.cooling += 1,
                }
            }
        }
        c
    }

    /// Addresses cooling now, with the end of their cooldown.
    pub fn cooling(&self, now: Instant) -> Vec<(Ipv4Addr, Instant)> {
        self.ifaces
            .values()
            .flat_map(|e| e.addrs.iter())
            .filter_map(|(ip, s)| match s {
                Slot::Cooling { until } if *until > now => Some((*ip, *until)),
                _ => None,
            })
            .collect()
    }

    /// The earliest moment a cooling address becomes free.
    pub fn next_cooldown_expiry(&self, now: Instant) -> Option<Instant> {
        self.ifaces
            .values()
            .flat_map(|e| e.addrs.values())
            .filter_map(|s| match s {
                Slot::Cooling { until } if *until > now => Some(*until),
                _ => None,
            })
            .min()
    }
}

fn add_addrs(e: &mut IfaceEntry, got: &Assigned) {
    // An interface's own primary address is never a pod's, whatever a
    // provider (or an emulator) reports.
    for ip in got.ips.iter().filter(|ip| **ip != e.info.primary_ip) {
        e.addrs.entry(*ip).or_insert(Slot::Free);
    }
    for p in &got.prefixes {
        e.prefixes.insert(*p);
        for a in u32::from(p.network())..=u32::from(p.broadcast()) {
            e.addrs.entry(Ipv4Addr::from(a)).or_insert(Slot::Free);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(id: &str, index: u32, ips: &[&str]) -> Interface {
        Interface {
            id: id.into(),
            mac: "02:00:00:00:00:01".into(),
            device_index: index,
            subnet_id: "subnet-1".into(),
            subnet_cidr: "10.0.0.0/24".parse().unwrap(),
            primary_ip: "10.0.0.4".parse().unwrap(),
            secondary_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            prefixes: vec![],
            tags: Default::default(),
            delete_on_termination: None,
        }
    }

    fn key(c: &str) -> PodKey {
        PodKey {
            network: "vpc".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn repeated_add_returns_the_same_address() {
        let now = Instant::now();
        let mut ds = Datastore::new(Duration::from_secs(30));
        ds.add_interface(iface("eni-a", 0, &["10.0.0.10", "10.0.0.11"]), now);
        let (a, new_a) = ds.assign(&key("c1"), now).unwrap();
        let (b, new_b) = ds.assign(&key("c1"), now).unwrap();
        assert!(new_a && !new_b);
        assert_eq!(a, b);
        let (c, _) = ds.assign(&key("c2"), now).unwrap();
        assert_ne!(a.ip, c.ip);
        assert!(ds.assign(&key("c3"), now).is_none(), "only two addresses");
    }

    #[test]
    fn cooling_address_is_not_reused_until_cooldown_ends() {
        let now = Instant::now();
        let mut ds = Datastore::new(Duration::from_secs(30));
        ds.add_interface(iface("eni-a", 0, &["10.0.0.10"]), now);
        let (p, _) = ds.assign(&key("c1"), now).unwrap();
        ds.release(&key("c1"), now).unwrap();
        assert!(ds
            .assign(&key("c2"), now + Duration::from_secs(29))
            .is_none());
        assert_eq!(ds.counts(now).cooling, 1);
        assert_eq!(ds.counts(now).available, 0);
        let (q, _) = ds
            .assign(&key("c2"), now + Duration::from_secs(30))
            .unwrap();
        assert_eq!(p.ip, q.ip);
    }

    #[test]
    fn fullest_interface_is_used_first() {
        let now = Instant::now();
        let mut ds = Datastore::new(Duration::from_secs(30));
        ds.add_interface(
            iface("eni-a", 0, &["10.0.0.10", "10.0.0.11", "10.0.0.12"]),
            now,
        );
        ds.add_interface(
            iface("eni-b", 1, &["10.0.1.10", "10.0.1.11", "10.0.1.12"]),
            now,
        );
        // Put one pod on eni-b by hand; the next pods must follow it there.
        assert!(ds.restore(&key("seed"), "10.0.1.10".parse().unwrap()));
        let (p, _) = ds.assign(&key("c1"), now).unwrap();
        assert_eq!(p.interface_id, "eni-b");
        let (p, _) = ds.assign(&key("c2"), now).unwrap();
        assert_eq!(p.interface_id, "eni-b");
        let (p, _) = ds.assign(&key("c3"), now).unwrap();
        assert_eq!(p.interface_id, "eni-a", "eni-b is full");
    }

    #[test]
    fn release_claims_skip_addresses_taken_meanwhile() {
        let now = Instant::now();
        let mut ds = Datastore::new(Duration::from_secs(30));
        ds.add_interface(iface("eni-a", 0, &["10.0.0.10", "10.0.0.11"]), now);
        let (p, _) = ds.assign(&key("c1"), now).unwrap();
        let want = Assigned {
            ips: vec!["10.0.0.10".parse().unwrap(), "10.0.0.11".parse().unwrap()],
            prefixes: vec![],
        };
        let got = ds.claim_for_release("eni-a", &want, now);
        assert_eq!(got.ips.len(), 1);
        assert!(!got.ips.contains(&p.ip));
        assert!(
            ds.assign(&key("c2"), now).is_none(),
            "claimed address is not assignable"
        );
        ds.unclaim("eni-a", &got);
        assert!(ds.assign(&key("c2"), now).is_some());
    }

    #[test]
    fn an_interface_primary_address_never_enters_the_pool() {
        let now = Instant::now();
        let mut ds = Datastore::new(Duration::from_secs(30));
        // 10.0.0.4 is the interface's primary address (see `iface`).
        ds.add_interface(iface("eni-a", 0, &["10.0.0.4", "10.0.0.10"]), now);
        ds.add_addresses(
            "eni-a",
            &Assigned {
                ips: vec!["10.0.0.4".parse().unwrap()],
                prefixes: vec![],
            },
        );
        assert_eq!(ds.counts(now).total, 1);
        let (p, _) = ds.assign(&key("c"), now).unwrap();
        assert_eq!(p.ip, "10.0.0.10".parse::<Ipv4Addr>().unwrap());
        assert!(ds.assign(&key("d"), now).is_none());
    }

    #[test]
    fn busy_interface_cannot_drain() {
        let now = Instant::now();
        let mut ds = Datastore::new(Duration::from_secs(30));
        ds.add_interface(iface("eni-a", 0, &["10.0.0.10"]), now);
        ds.add_interface(iface("eni-b", 1, &["10.0.1.10"]), now);
        assert!(!ds.start_draining("eni-a", now), "primary");
        ds.restore(&key("c"), "10.0.1.10".parse().unwrap());
        assert!(!ds.start_draining("eni-b", now), "holds a pod");
        ds.release(&key("c"), now);
        assert!(!ds.start_draining("eni-b", now), "address cooling");
        assert!(ds.start_draining("eni-b", now + Duration::from_secs(31)));
        assert!(
            ds.assign(&key("d"), now + Duration::from_secs(31))
                .unwrap()
                .0
                .interface_id
                == "eni-a"
        );
    }
}
