//! Wiring a pod with rtnetlink: a veth pair created with its peer directly
//! in the pod's namespace (no move), the address as /32 on the pod side,
//! 169.254.1.1 as the pod's gateway with a permanent neighbour entry to the
//! host veth's MAC, a host route to the pod, and policy routing: `to <pod>
//! lookup main` (512) and, for addresses on a secondary interface,
//! `from <pod> lookup <interface table>` (1536).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tracing::{debug, warn};

/// The pod's gateway: link-local, answered by the host veth's MAC.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const PRIO_TO_POD: u32 = 512;
pub const PRIO_FROM_POD: u32 = 1536;
pub const MAIN_TABLE: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot open network namespace {path}: {source}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: {source}")]
    Netlink {
        step: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Other(String),
    #[error("injected failure after step {0}")]
    Injected(&'static str),
}

fn nl(step: &'static str) -> impl FnOnce(rtnetlink::Error) -> DatapathError {
    move |source| DatapathError::Netlink { step, source }
}

/// The errno of a netlink error answer, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().raw_os_error(),
        _ => None,
    }
}

const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;

fn gone(e: &rtnetlink::Error) -> bool {
    matches!(errno(e), Some(ENOENT | ESRCH | ENODEV))
}

/// A netlink socket inside another network namespace. `setns` changes only
/// the calling thread, so the socket is opened on a short-lived thread of
/// its own; the socket stays in the namespace it was opened in.
pub fn handle_in(netns: &Path) -> Result<(Handle, File), DatapathError> {
    let err = |source| DatapathError::Netns {
        path: netns.display().to_string(),
        source,
    };
    let file = File::open(netns).map_err(err)?;
    let thread_fd = file.try_clone().map_err(err)?;
    let rt = tokio::runtime::Handle::current();
    let opened = std::thread::spawn(move || -> std::io::Result<_> {
        nix::sched::setns(&thread_fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        let _runtime = rt.enter();
        let (conn, handle, _) = rtnetlink::new_connection()?;
        Ok((conn, handle))
    })
    .join()
    .map_err(|_| err(std::io::Error::other("namespace thread panicked")))?;
    let (conn, handle) = opened.map_err(err)?;
    tokio::spawn(conn);
    Ok((handle, file))
}

/// A netlink socket in this process's own namespace.
pub fn handle_here() -> Result<Handle, DatapathError> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| DatapathError::Other(format!("netlink socket: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l),
        Err(e) if gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn mac_of(l: &LinkMessage) -> Vec<u8> {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(m) => Some(m.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

pub fn fmt_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn rule_add(h: &Handle, ip: Ipv4Addr, to: bool, table: u32) -> rtnetlink::RuleAddRequest<Ipv4Addr> {
    let req = h
        .rule()
        .add()
        .v4()
        .action(RuleAction::ToTable)
        .table_id(table);
    if to {
        req.destination_prefix(ip, 32).priority(PRIO_TO_POD)
    } else {
        req.source_prefix(ip, 32).priority(PRIO_FROM_POD)
    }
}

fn rule_msg(h: &Handle, ip: Ipv4Addr, to: bool, table: u32) -> RuleMessage {
    rule_add(h, ip, to, table).message_mut().clone()
}

fn host_route(ip: Ipv4Addr, index: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build()
}

/// What one ADD wires.
#[derive(Debug, Clone)]
pub struct Wire<'a> {
    pub host_veth: &'a str,
    pub pod_ifname: &'a str,
    pub netns: &'a Path,
    pub ip: Ipv4Addr,
    pub route_table: u32,
    pub mtu: u32,
    /// Test hook: fail right after the named step (VPC_CNI_FAIL_AFTER).
    pub fail_after: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct Wired {
    pub host_mac: String,
    pub pod_mac: String,
}

/// The veth pair, made before the pod's address is known so that it
/// overlaps with the call to ipamd.
pub struct Veth {
    pod: Handle,
    host_index: u32,
    host_mac: Vec<u8>,
    pod_index: u32,
    pod_mac: Vec<u8>,
    _netns: File,
}

impl Veth {
    /// Deletes the pair (both ends go together).
    pub async fn remove(self, host: &Handle) {
        if let Err(e) = host.link().del(self.host_index).execute().await {
            if !gone(&e) {
                warn!(error = %e, "removing the veth of a failed ADD");
            }
        }
    }
}

enum Undo {
    Rule(RuleMessage),
}

fn injected(w: &Wire<'_>, step: &'static str) -> Result<(), DatapathError> {
    debug!(step, "ADD step done");
    if w.fail_after == Some(step) {
        return Err(DatapathError::Injected(step));
    }
    Ok(())
}

/// Creates the veth pair with its peer directly in the pod's namespace.
pub async fn create_veth(
    host: &Handle,
    host_veth: &str,
    pod_ifname: &str,
    netns: &Path,
    mtu: u32,
) -> Result<Veth, DatapathError> {
    let (pod, ns) = handle_in(netns)?;
    let build = || {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(pod_ifname.to_string())
            .mtu(mtu)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_veth.to_string())
            .mtu(mtu)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build()
    };
    match host.link().add(build()).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(EEXIST) => {
            // Left by an earlier, interrupted ADD of the same attachment.
            debug!(veth = host_veth, "removing a veth left by an earlier ADD");
            if let Some(old) = link_by_name(host, host_veth)
                .await
                .map_err(nl("look up stale veth"))?
            {
                host.link()
                    .del(old.header.index)
                    .execute()
                    .await
                    .map_err(nl("remove stale veth"))?;
            }
            host.link()
                .add(build())
                .execute()
                .await
                .map_err(nl("create veth pair"))?;
        }
        Err(e) => return Err(nl("create veth pair")(e)),
    }
    let host_link = link_by_name(host, host_veth)
        .await
        .map_err(nl("read host veth"))?
        .ok_or_else(|| DatapathError::Other("host veth vanished after creation".into()))?;
    let veth = Veth {
        host_index: host_link.header.index,
        host_mac: mac_of(&host_link),
        pod_index: 0,
        pod_mac: vec![],
        pod,
        _netns: ns,
    };
    match link_by_name(&veth.pod, pod_ifname).await {
        Ok(Some(l)) => Ok(Veth {
            pod_index: l.header.index,
            pod_mac: mac_of(&l),
            ..veth
        }),
        other => {
            veth.remove(host).await;
            Err(match other {
                Err(e) => nl("read pod interface")(e),
                _ => DatapathError::Other(format!("{pod_ifname} not found in the pod namespace")),
            })
        }
    }
}

/// Configures the address, routes, neighbour and rules on a veth made by
/// [`create_veth`]; on any failure undoes every step, the veth included.
pub async fn wire(host: &Handle, veth: Veth, w: &Wire<'_>) -> Result<Wired, DatapathError> {
    let mut undo = Vec::new();
    match wire_steps(host, &veth, w, &mut undo).await {
        Ok(()) => Ok(Wired {
            host_mac: fmt_mac(&veth.host_mac),
            pod_mac: fmt_mac(&veth.pod_mac),
        }),
        Err(e) => {
            for Undo::Rule(m) in undo.into_iter().rev() {
                if let Err(e) = host.rule().del(m).execute().await {
                    if !gone(&e) {
                        warn!(error = %e, "undoing a failed ADD step");
                    }
                }
            }
            // The host route goes with the veth.
            veth.remove(host).await;
            Err(e)
        }
    }
}

async fn wire_steps(
    host: &Handle,
    veth: &Veth,
    w: &Wire<'_>,
    undo: &mut Vec<Undo>,
) -> Result<(), DatapathError> {
    injected(w, "veth")?;
    let (pod, pi) = (&veth.pod, veth.pod_index);
    pod.link()
        .set(LinkUnspec::new_with_index(pi).up().build())
        .execute()
        .await
        .map_err(nl("pod link up"))?;
    pod.address()
        .add(pi, IpAddr::V4(w.ip), 32)
        .execute()
        .await
        .map_err(nl("pod address"))?;
    pod.route()
        .add(host_route(GATEWAY, pi))
        .execute()
        .await
        .map_err(nl("pod route to gateway"))?;
    pod.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .gateway(GATEWAY)
                .output_interface(pi)
                .build(),
        )
        .execute()
        .await
        .map_err(nl("pod default route"))?;
    pod.neighbours()
        .add(pi, IpAddr::V4(GATEWAY))
        .link_layer_address(&veth.host_mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(nl("pod gateway neighbour"))?;
    injected(w, "pod")?;

    // Host side: the route to the pod goes with the veth when it is deleted.
    host.route()
        .add(host_route(w.ip, veth.host_index))
        .replace()
        .execute()
        .await
        .map_err(nl("host route to pod"))?;
    injected(w, "host-route")?;
    for (to, table, step) in [
        (true, MAIN_TABLE, "rule-to"),
        (false, w.route_table, "rule-from"),
    ] {
        if !to && table == MAIN_TABLE {
            continue;
        }
        match rule_add(host, w.ip, to, table).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(EEXIST) => {}
            Err(e) => return Err(nl(if to { "rule to pod" } else { "rule from pod" })(e)),
        }
        undo.push(Undo::Rule(rule_msg(host, w.ip, to, table)));
        injected(w, step)?;
    }
    Ok(())
}

/// Tears down what ADD made, collecting every error and carrying on.
/// The pod's veth is left to the runtime's deletion of the namespace (a veth
/// delete costs an RCU grace period); without a namespace it is deleted here.
pub async fn del(
    host: &Handle,
    host_veth: &str,
    netns: Option<&Path>,
    ip: Option<Ipv4Addr>,
    table: Option<u32>,
) -> Vec<String> {
    let mut errors = vec![];
    let veth = match link_by_name(host, host_veth).await {
        Ok(l) => l,
        Err(e) => {
            errors.push(format!("look up {host_veth}: {e}"));
            None
        }
    };
    if let Some(ip) = ip {
        let tables: Vec<(bool, u32)> = match table {
            Some(t) if t != MAIN_TABLE => vec![(true, MAIN_TABLE), (false, t)],
            Some(_) => vec![(true, MAIN_TABLE)],
            // Unknown table (ipamd down): find the from-rule by address.
            None => vec![(true, MAIN_TABLE), (false, 0)],
        };
        for (to, t) in tables {
            let result = if !to && t == 0 {
                delete_from_rules(host, ip).await
            } else {
                host.rule().del(rule_msg(host, ip, to, t)).execute().await
            };
            if let Err(e) = result {
                if !gone(&e) {
                    errors.push(format!(
                        "delete rule {} {ip}: {e}",
                        if to { "to" } else { "from" }
                    ));
                }
            }
        }
        if let Some(v) = &veth {
            if let Err(e) = host
                .route()
                .del(host_route(ip, v.header.index))
                .execute()
                .await
            {
                if !gone(&e) {
                    errors.push(format!("delete host route to {ip}: {e}"));
                }
            }
        }
    }
    let netns_alive = netns.is_some_and(|p| p.exists());
    if let (Some(v), false) = (veth, netns_alive) {
        if let Err(e) = host.link().del(v.header.index).execute().await {
            if !gone(&e) {
                errors.push(format!("delete {host_veth}: {e}"));
            }
        }
    }
    errors
}

async fn delete_from_rules(host: &Handle, ip: Ipv4Addr) -> Result<(), rtnetlink::Error> {
    let rules: Vec<RuleMessage> = host
        .rule()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await?;
    for r in rules {
        let prio = r
            .attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::Priority(PRIO_FROM_POD)));
        let src = r
            .attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::Source(IpAddr::V4(s)) if *s == ip));
        if prio && src && r.header.src_len == 32 {
            host.rule().del(r).execute().await?;
        }
    }
    Ok(())
}

/// Every rule in the host's policy database.
pub async fn rules(host: &Handle) -> Result<Vec<RuleMessage>, rtnetlink::Error> {
    host.rule().get(IpVersion::V4).execute().try_collect().await
}

fn has_rule(rules: &[RuleMessage], ip: Ipv4Addr, to: bool, table: u32) -> bool {
    rules.iter().any(|r| {
        let prio = if to { PRIO_TO_POD } else { PRIO_FROM_POD };
        let addr = r.attributes.iter().any(|a| match a {
            RuleAttribute::Destination(IpAddr::V4(d)) if to => *d == ip,
            RuleAttribute::Source(IpAddr::V4(s)) if !to => *s == ip,
            _ => false,
        });
        let t = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RuleAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(r.header.table));
        addr && t == table
            && r.attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == prio))
    })
}

/// Verifies what ADD made; lists everything that is not as it should be.
pub async fn check(host: &Handle, w: &Wire<'_>) -> Result<(), Vec<String>> {
    let mut bad = vec![];
    let (pod, _ns) = handle_in(w.netns).map_err(|e| vec![e.to_string()])?;
    let host_link = link_by_name(host, w.host_veth).await.ok().flatten();
    let Some(host_link) = host_link else {
        return Err(vec![format!("host veth {} is missing", w.host_veth)]);
    };
    let host_mac = mac_of(&host_link);
    match link_by_name(&pod, w.pod_ifname).await.ok().flatten() {
        None => bad.push(format!("{} is missing in the pod", w.pod_ifname)),
        Some(l) => {
            let pi = l.header.index;
            let addrs: Vec<_> = pod
                .address()
                .get()
                .set_link_index_filter(pi)
                .execute()
                .try_collect()
                .await
                .unwrap_or_default();
            let has_ip = addrs.iter().any(|a| {
                a.header.prefix_len == 32
                    && a.attributes.iter().any(
                        |x| matches!(x, AddressAttribute::Address(IpAddr::V4(v)) if *v == w.ip),
                    )
            });
            if !has_ip {
                bad.push(format!("{}/32 is not on {} in the pod", w.ip, w.pod_ifname));
            }
            let routes: Vec<RouteMessage> = pod
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .unwrap_or_default();
            let default_ok = routes.iter().any(|r| {
                r.header.destination_prefix_length == 0
                    && r.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(g)) if *g == GATEWAY))
            });
            if !default_ok {
                bad.push(format!("the pod has no default route via {GATEWAY}"));
            }
            let neighbours: Vec<_> = pod
                .neighbours()
                .get()
                .execute()
                .try_collect()
                .await
                .unwrap_or_default();
            let neigh_ok = neighbours.iter().any(|n| {
                n.header.ifindex == pi
                    && n.header.state == NeighbourState::Permanent
                    && n.attributes.iter().any(|a| matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(g)) if *g == GATEWAY))
                    && n.attributes.iter().any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(m) if *m == host_mac))
            });
            if !neigh_ok {
                bad.push(format!(
                    "no permanent neighbour entry {GATEWAY} -> {} in the pod",
                    fmt_mac(&host_mac)
                ));
            }
        }
    }
    let host_routes: Vec<RouteMessage> = host
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .unwrap_or_default();
    let route_ok = host_routes.iter().any(|r| {
        r.header.destination_prefix_length == 32
            && r.attributes.iter().any(
                |a| matches!(a, RouteAttribute::Destination(RouteAddress::Inet(d)) if *d == w.ip),
            )
            && r.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == host_link.header.index))
    });
    if !route_ok {
        bad.push(format!(
            "the host has no route to {} via {}",
            w.ip, w.host_veth
        ));
    }
    let rules = rules(host).await.unwrap_or_default();
    if !has_rule(&rules, w.ip, true, MAIN_TABLE) {
        bad.push(format!(
            "rule 'to {} lookup main' ({PRIO_TO_POD}) is missing",
            w.ip
        ));
    }
    if w.route_table != MAIN_TABLE && !has_rule(&rules, w.ip, false, w.route_table) {
        bad.push(format!(
            "rule 'from {} lookup {}' ({PRIO_FROM_POD}) is missing",
            w.ip, w.route_table
        ));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad)
    }
}
