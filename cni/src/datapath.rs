//! Wiring a pod with rtnetlink: a veth pair whose pod end is created
//! directly in the pod's namespace (no move between namespaces, which costs
//! an RCU grace period), the address as /32 on the pod side, 169.254.1.1 as
//! the pod's gateway with a permanent neighbour entry to the host veth's MAC,
//! a host route to the pod, and policy routing: `to <pod> lookup main` (512)
//! and, for addresses on a secondary interface, `from <pod> lookup
//! <interface table>` (1536).
//!
//! ADD's steps go through [`crate::nlsync`] in a few batches; DEL, CHECK and
//! GC, which are not on a pod's start-up path, use rtnetlink's async client.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures_util::TryStreamExt;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    AddressMessageBuilder, Handle, IpVersion, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};
use tracing::{debug, warn};

use crate::netns::Pod;
use crate::nlsync::{Answer, Netlink};

/// Shared with ipamd; defined and explained in [`ipamd_api::datapath`].
pub use ipamd_api::datapath::{MAIN_TABLE, POD_GATEWAY, PRIO_FROM_POD, PRIO_TO_POD};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot open network namespace {path}: {source}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
    #[error("injected failure after step {0}")]
    Injected(&'static str),
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

/// The pod's rule: `to <pod> lookup main` (512) or `from <pod> lookup
/// <table>` (1536).
fn rule_message(ip: Ipv4Addr, to: bool, table: u32) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.action = RuleAction::ToTable;
    if table > 255 {
        m.header.table = 0;
        m.attributes.push(RuleAttribute::Table(table));
    } else {
        m.header.table = table as u8;
    }
    if to {
        m.header.dst_len = 32;
        m.attributes
            .push(RuleAttribute::Destination(IpAddr::V4(ip)));
        m.attributes.push(RuleAttribute::Priority(PRIO_TO_POD));
    } else {
        m.header.src_len = 32;
        m.attributes.push(RuleAttribute::Source(IpAddr::V4(ip)));
        m.attributes.push(RuleAttribute::Priority(PRIO_FROM_POD));
    }
    m
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
    pub ip: Ipv4Addr,
    pub route_table: u32,
    /// Test hook: fail right after the named step (VPC_CNI_FAIL_AFTER).
    pub fail_after: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct Wired {
    pub host_mac: String,
    pub pod_mac: String,
}

/// The veth pair ADD makes.
#[derive(Debug, Clone)]
pub struct PairSpec<'a> {
    pub host_veth: &'a str,
    pub pod_ifname: &'a str,
    pub mtu: u32,
    /// TX and RX queues of each end.
    pub queues: u32,
}

/// Two random locally administered unicast MACs, as the kernel would pick
/// them: chosen here so that the pod's neighbour entry for its gateway can be
/// written without reading the host veth back. Straight from getrandom(2):
/// a seeded generator would first probe the CPU's features, and each CPUID
/// costs microseconds in a VM.
fn random_macs() -> Result<([u8; 6], [u8; 6]), DatapathError> {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).map_err(|e| DatapathError::Other(format!("random MAC: {e}")))?;
    let mac = |m: &[u8]| {
        let mut a = [0u8; 6];
        a.copy_from_slice(m);
        a[0] = (a[0] & 0xfe) | 0x02;
        a
    };
    Ok((mac(&b[..6]), mac(&b[6..])))
}

/// The veth pair with the pod's side configured as far as it can be before
/// the pod's address is known.
#[derive(Debug)]
pub struct Veth {
    host_index: u32,
    host_mac: [u8; 6],
    pod_index: u32,
    pod_mac: [u8; 6],
}

const CREATE: u16 = NLM_F_CREATE | NLM_F_EXCL;
const REPLACE: u16 = NLM_F_CREATE | NLM_F_REPLACE;

fn link_named(name: &str) -> RouteNetlinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    RouteNetlinkMessage::GetLink(m)
}

fn del_link(index: u32) -> RouteNetlinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    RouteNetlinkMessage::DelLink(m)
}

/// The one answer of a one-message batch.
fn only(answers: std::io::Result<Vec<Answer>>) -> Answer {
    answers.and_then(|mut a| a.pop().unwrap_or_else(|| Ok(vec![])))
}

fn nl(step: &'static str) -> impl FnOnce(std::io::Error) -> DatapathError {
    move |source| DatapathError::Io { step, source }
}

/// The index and peer index of the link in a GetLink/NewLink answer.
fn indexes(msgs: &[RouteNetlinkMessage]) -> Option<(u32, Option<u32>)> {
    msgs.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(l) => Some((
            l.header.index,
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Link(i) => Some(*i),
                _ => None,
            }),
        )),
        _ => None,
    })
}

impl Veth {
    /// Deletes the pair (both ends go together, and the routes with them).
    pub fn remove(self, host: &mut Netlink) {
        if let Err(e) = only(host.batch(vec![(del_link(self.host_index), 0)])) {
            if !matches!(e.raw_os_error(), Some(ENOENT | ENODEV)) {
                warn!(error = %e, "removing the veth of a failed ADD");
            }
        }
    }
}

fn injected(w: &Wire<'_>, step: &'static str) -> Result<(), DatapathError> {
    debug!(step, "ADD step done");
    if w.fail_after == Some(step) {
        return Err(DatapathError::Injected(step));
    }
    Ok(())
}

/// Creates the veth pair: the host end up, its peer made directly in the
/// pod's namespace (no move between namespaces), both with MACs chosen here.
/// A host veth of the same name left by an earlier, interrupted ADD of the
/// same attachment is removed and the pair made again. Returns the host's
/// and the pod's index.
fn make_pair(
    host: &mut Netlink,
    pod: &mut Pod,
    p: &PairSpec<'_>,
    macs: ([u8; 6], [u8; 6]),
) -> Result<(u32, u32), DatapathError> {
    let (host_veth, pod_ifname) = (p.host_veth, p.pod_ifname);
    let build = || {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(pod_ifname.to_string())
            .mtu(p.mtu)
            .address(macs.1.to_vec())
            .append_extra_attribute(LinkAttribute::NumTxQueues(p.queues))
            .append_extra_attribute(LinkAttribute::NumRxQueues(p.queues))
            .setns_by_fd(pod.netns.as_raw_fd())
            .build();
        let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_veth.to_string())
            .mtu(p.mtu)
            .address(macs.0.to_vec())
            .append_extra_attribute(LinkAttribute::NumTxQueues(p.queues))
            .append_extra_attribute(LinkAttribute::NumRxQueues(p.queues))
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        vec![(RouteNetlinkMessage::NewLink(pair), CREATE)]
    };
    match only(host.batch(build())) {
        Err(e) if e.raw_os_error() == Some(EEXIST) => {
            let stale = only(host.batch(vec![(link_named(host_veth), 0)]));
            if let Some((index, _)) = stale.ok().as_deref().and_then(indexes) {
                debug!(veth = host_veth, "removing a veth left by an earlier ADD");
                only(host.batch(vec![(del_link(index), 0)])).map_err(nl("remove stale veth"))?;
            }
            only(host.batch(build()))
        }
        other => other,
    }
    .map_err(nl("create veth pair"))?;
    // The pod's end names its peer, the host end. (NLM_F_ECHO on the
    // creation would answer with the host end from kernel 6.1 on; one read
    // costs ~20 us and works on every kernel.)
    let read = only(pod.nl.batch(vec![(link_named(pod_ifname), 0)]));
    match read.as_deref().ok().and_then(indexes) {
        Some((pod_index, Some(host_index))) => Ok((host_index, pod_index)),
        _ => {
            if let Ok(Some((host_index, _))) = only(host.batch(vec![(link_named(host_veth), 0)]))
                .as_deref()
                .map(indexes)
            {
                only(host.batch(vec![(del_link(host_index), 0)])).ok();
            }
            Err(match read {
                Err(e) => nl("read pod interface")(e),
                Ok(_) => DatapathError::Other(format!(
                    "{pod_ifname} is not in the pod after creating it"
                )),
            })
        }
    }
}

/// Creates the veth pair and configures the pod's side as far as it can be
/// before the address is known: its end up, the route to the gateway, the
/// default route and the gateway's permanent neighbour entry, in one batch.
/// On failure nothing of it is left.
///
/// This blocks the calling thread while the kernel makes the pair (a few
/// hundred microseconds): ADD calls it once its request to ipamd is on the
/// wire, so that ipamd answers meanwhile.
pub fn create_veth(
    host: &mut Netlink,
    pod: &mut Pod,
    p: &PairSpec<'_>,
) -> Result<Veth, DatapathError> {
    let (host_mac, pod_mac) = random_macs()?;
    let (host_index, pod_index) = make_pair(host, pod, p, (host_mac, pod_mac))?;
    let veth = Veth {
        host_index,
        host_mac,
        pod_index,
        pod_mac,
    };
    let mut neighbour = NeighbourMessage::default();
    neighbour.header.family = AddressFamily::Inet;
    neighbour.header.ifindex = pod_index;
    neighbour.header.state = NeighbourState::Permanent;
    neighbour.attributes = vec![
        NeighbourAttribute::Destination(NeighbourAddress::Inet(POD_GATEWAY)),
        NeighbourAttribute::LinkLayerAddress(host_mac.to_vec()),
    ];
    let steps = [
        "pod link up",
        "pod route to gateway",
        "pod default route",
        "pod gateway neighbour",
    ];
    let answers = pod.nl.batch(vec![
        (
            RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(pod_index).up().build()),
            0,
        ),
        (
            RouteNetlinkMessage::NewRoute(host_route(POD_GATEWAY, pod_index)),
            CREATE,
        ),
        (
            RouteNetlinkMessage::NewRoute(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                    .gateway(POD_GATEWAY)
                    .output_interface(pod_index)
                    .build(),
            ),
            CREATE,
        ),
        (RouteNetlinkMessage::NewNeighbour(neighbour), REPLACE),
    ]);
    let configured = answers
        .map_err(nl("pod configuration"))
        .and_then(|answers| {
            answers
                .into_iter()
                .zip(steps)
                .try_for_each(|(a, step)| a.map(drop).map_err(nl(step)))
        });
    match configured {
        Ok(()) => Ok(veth),
        Err(e) => {
            veth.remove(host);
            Err(e)
        }
    }
}

/// Finishes what [`create_veth`] began once the address is known: the
/// address in the pod, and the host route and rules in one batch; on any
/// failure undoes every step, the veth included.
pub fn wire(
    host: &mut Netlink,
    pod: &mut Pod,
    veth: Veth,
    w: &Wire<'_>,
) -> Result<Wired, DatapathError> {
    let ip = w.ip;
    let pod_addr = only(pod.nl.batch(vec![(
        RouteNetlinkMessage::NewAddress(
            AddressMessageBuilder::<Ipv4Addr>::new()
                .index(veth.pod_index)
                .address(ip, 32)
                .build(),
        ),
        CREATE,
    )]));
    let mut rules = vec![(true, MAIN_TABLE, "rule-to", "rule to pod")];
    if w.route_table != MAIN_TABLE {
        rules.push((false, w.route_table, "rule-from", "rule from pod"));
    }
    let mut batch = vec![(
        RouteNetlinkMessage::NewRoute(host_route(ip, veth.host_index)),
        REPLACE,
    )];
    batch.extend(rules.iter().map(|(to, table, _, _)| {
        (
            RouteNetlinkMessage::NewRule(rule_message(ip, *to, *table)),
            CREATE,
        )
    }));
    let answers = host.batch(batch);
    let (route, rule_answers) = match answers {
        Ok(mut a) => {
            let rest = a.split_off(1.min(a.len()));
            (a.pop().unwrap_or_else(|| Ok(vec![])), rest)
        }
        Err(e) => (Err(e), vec![]),
    };
    // A rule that exists already is the pod's (a retried ADD).
    let rule_results: Vec<_> = rule_answers
        .into_iter()
        .map(|a| match a {
            Err(e) if e.raw_os_error() == Some(EEXIST) => Ok(vec![]),
            other => other,
        })
        .collect();
    // Every rule that went in is undone on failure.
    let undo: Vec<RuleMessage> = rules
        .iter()
        .zip(&rule_results)
        .filter(|(_, r)| r.is_ok())
        .map(|((to, table, _, _), _)| rule_message(ip, *to, *table))
        .collect();
    let outcome = (|| {
        injected(w, "veth")?;
        pod_addr.map_err(nl("pod address"))?;
        injected(w, "pod")?;
        route.map_err(nl("host route to pod"))?;
        injected(w, "host-route")?;
        if rule_results.len() < rules.len() {
            return Err(DatapathError::Other(
                "the kernel did not answer every rule".into(),
            ));
        }
        for ((_, _, step, what), r) in rules.iter().zip(rule_results) {
            r.map_err(nl(what))?;
            injected(w, step)?;
        }
        Ok(())
    })();
    let Err(e) = outcome else {
        return Ok(Wired {
            host_mac: fmt_mac(&veth.host_mac),
            pod_mac: fmt_mac(&veth.pod_mac),
        });
    };
    if !undo.is_empty() {
        let undone = host.batch(
            undo.into_iter()
                .map(|m| (RouteNetlinkMessage::DelRule(m), 0))
                .collect(),
        );
        for a in undone.into_iter().flatten() {
            if let Err(e) = a {
                if !matches!(e.raw_os_error(), Some(ENOENT | ESRCH)) {
                    warn!(error = %e, "undoing a failed ADD step");
                }
            }
        }
    }
    // The host route and everything in the pod go with the veth.
    veth.remove(host);
    Err(e)
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
                host.rule().del(rule_message(ip, to, t)).execute().await
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

/// The links the host's /32 routes to `ip` in the main table leave by:
/// the host veth of the pod that holds `ip` on this node.
async fn pod_route_links(host: &Handle, ip: Ipv4Addr) -> Result<Vec<u32>, rtnetlink::Error> {
    let routes: Vec<RouteMessage> = host
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await?;
    Ok(routes
        .iter()
        .filter(|r| {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            table == MAIN_TABLE
                && r.header.destination_prefix_length == 32
                && r.attributes.iter().any(
                    |a| matches!(a, RouteAttribute::Destination(RouteAddress::Inet(d)) if *d == ip),
                )
        })
        .filter_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        })
        .collect())
}

/// Whether something else on this host holds `ip`: the host routes it to a
/// link other than `host_veth` (another pod), or it is an address of a host
/// link (an interface's own primary address, whose `from` rule is ipamd's).
/// Then its rules are not this attachment's.
pub async fn held_elsewhere_on_host(
    host: &Handle,
    host_veth: &str,
    ip: Ipv4Addr,
) -> Result<bool, rtnetlink::Error> {
    if on_a_host_link(host, ip).await? {
        return Ok(true);
    }
    let ours = if host_veth.is_empty() {
        None
    } else {
        link_by_name(host, host_veth).await?.map(|l| l.header.index)
    };
    Ok(pod_route_links(host, ip)
        .await?
        .into_iter()
        .any(|oif| Some(oif) != ours))
}

/// Whether `ip` is an address of a link of this host (an interface's own
/// primary address, whose `from` rule is ipamd's): never a pod's.
pub async fn on_a_host_link(host: &Handle, ip: Ipv4Addr) -> Result<bool, rtnetlink::Error> {
    let local: Vec<_> = host.address().get().execute().try_collect().await?;
    Ok(local.iter().any(|a| {
        a.attributes.iter().any(|x| {
            matches!(x, AddressAttribute::Address(IpAddr::V4(v)) | AddressAttribute::Local(IpAddr::V4(v)) if *v == ip)
        })
    }))
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

/// What CHECK verifies inside the pod.
async fn check_pod(pod: &Handle, ifname: &str, ip: Ipv4Addr, host_mac: &[u8]) -> Vec<String> {
    let mut bad = vec![];
    match link_by_name(pod, ifname).await.ok().flatten() {
        None => bad.push(format!("{ifname} is missing in the pod")),
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
                    && a.attributes
                        .iter()
                        .any(|x| matches!(x, AddressAttribute::Address(IpAddr::V4(v)) if *v == ip))
            });
            if !has_ip {
                bad.push(format!("{ip}/32 is not on {ifname} in the pod"));
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
                    && r.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(g)) if *g == POD_GATEWAY))
            });
            if !default_ok {
                bad.push(format!("the pod has no default route via {POD_GATEWAY}"));
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
                    && n.attributes.iter().any(|a| matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(g)) if *g == POD_GATEWAY))
                    && n.attributes.iter().any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(m) if *m == host_mac))
            });
            if !neigh_ok {
                bad.push(format!(
                    "no permanent neighbour entry {POD_GATEWAY} -> {} in the pod",
                    fmt_mac(host_mac)
                ));
            }
        }
    }
    bad
}

/// Verifies what ADD made; lists everything that is not as it should be.
pub async fn check(host: &Handle, pod: &Handle, w: &Wire<'_>) -> Result<(), Vec<String>> {
    let host_link = link_by_name(host, w.host_veth).await.ok().flatten();
    let Some(host_link) = host_link else {
        return Err(vec![format!("host veth {} is missing", w.host_veth)]);
    };
    let host_mac = mac_of(&host_link);
    let mut bad = check_pod(pod, w.pod_ifname, w.ip, &host_mac).await;
    let route_ok = pod_route_links(host, w.ip)
        .await
        .unwrap_or_default()
        .contains(&host_link.header.index);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_local_unicast_and_differ() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let (a, b) = random_macs().unwrap();
            for m in [a, b] {
                assert_eq!(m[0] & 0x01, 0, "multicast bit set: {}", fmt_mac(&m));
                assert_eq!(
                    m[0] & 0x02,
                    0x02,
                    "not locally administered: {}",
                    fmt_mac(&m)
                );
                assert!(seen.insert(m), "repeated MAC {}", fmt_mac(&m));
            }
        }
    }

    #[test]
    fn rules_name_the_table_in_the_header_or_an_attribute() {
        let ip = Ipv4Addr::new(10, 0, 0, 5);
        let to = rule_message(ip, true, MAIN_TABLE);
        assert_eq!(to.header.table, 254);
        assert_eq!(to.header.dst_len, 32);
        assert!(to
            .attributes
            .contains(&RuleAttribute::Priority(PRIO_TO_POD)));
        let from = rule_message(ip, false, 1000);
        assert_eq!(from.header.table, 0);
        assert_eq!(from.header.src_len, 32);
        assert!(from.attributes.contains(&RuleAttribute::Table(1000)));
        assert!(from
            .attributes
            .contains(&RuleAttribute::Priority(PRIO_FROM_POD)));
    }
}
