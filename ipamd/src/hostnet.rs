//! The node's side of the datapath, kept by ipamd: each secondary interface
//! up with its address, its own route table (default via the subnet
//! gateway) and a `from <interface IP>` rule; loose reverse-path filtering;
//! and SNAT of pod traffic leaving the VPC to the node's primary IP, in one
//! nftables table of our own.
//!
//! Pod traffic to outside the VPC is connmarked and routed by the main
//! table (rule `fwmark 0x80/0x80 lookup main`, before the per-pod `from`
//! rules), so pods on secondary interfaces also leave through the primary
//! interface and are SNATed there, as aws-node does.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use providers::Interface;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::packet_route::rule::RuleAction;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{debug, info};

use crate::datastore::route_table;

/// Rule priorities of the connmark rule and of an interface's own `from
/// <interface IP>` rule, shared with the plugin (see
/// [`ipamd_api::datapath`]).
pub use ipamd_api::datapath::{PRIO_CONNMARK, PRIO_INTERFACE};
pub const SNAT_MARK: u32 = 0x80;
pub const NFT_TABLE: &str = "vpc-cni";

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{step}: {source}")]
    Netlink {
        step: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no link with MAC {mac} (interface {id}) on this node yet")]
    NoLink { mac: String, id: String },
    #[error("nft: {0}")]
    Nft(String),
    #[error("{0}")]
    Io(String),
}

fn nl(step: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> HostError {
    let step = step.into();
    move |source| HostError::Netlink { step, source }
}

fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.to_io().raw_os_error() == Some(17))
}

fn gone(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if matches!(m.to_io().raw_os_error(), Some(2 | 3 | 19)))
}

/// How the node SNATs pod traffic that leaves the VPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatConfig {
    pub external: bool,
    pub node_ip: Ipv4Addr,
    /// VPC CIDRs and AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS: never SNATed.
    pub no_snat: Vec<Ipv4Net>,
    pub veth_prefix: String,
}

pub struct HostNet {
    handle: Handle,
    /// The node's `/proc/sys/net` as ipamd sees it (a container mounts the
    /// host's elsewhere: the runtime keeps its own `/proc/sys` read-only).
    sys_net: std::path::PathBuf,
}

/// Where `/proc/sys/net` is when nothing else is said.
pub const PROC_SYS_NET: &str = "/proc/sys/net";

impl HostNet {
    /// Opens a netlink socket in ipamd's own network namespace; sysctls
    /// are written under [`PROC_SYS_NET`].
    pub fn new() -> Result<Self, HostError> {
        Self::with_sys_net(PROC_SYS_NET)
    }

    /// [`HostNet::new`] with the node's `/proc/sys/net` at `sys_net`.
    pub fn with_sys_net(sys_net: impl Into<std::path::PathBuf>) -> Result<Self, HostError> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| HostError::Io(format!("netlink socket: {e}")))?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            sys_net: sys_net.into(),
        })
    }

    async fn link_by_mac(&self, mac: &str) -> Result<Option<LinkMessage>, HostError> {
        let want: Vec<u8> = mac
            .split(':')
            .filter_map(|b| u8::from_str_radix(b, 16).ok())
            .collect();
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list links"))?;
        Ok(links.into_iter().find(|l| {
            l.attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Address(m) if *m == want))
        }))
    }

    fn name(l: &LinkMessage) -> String {
        l.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Name of the link that carries `iface` on this node.
    pub async fn link_name(&self, iface: &Interface) -> Result<String, HostError> {
        let l = self
            .link_by_mac(&iface.mac)
            .await?
            .ok_or_else(|| HostError::NoLink {
                mac: iface.mac.clone(),
                id: iface.id.clone(),
            })?;
        Ok(Self::name(&l))
    }

    /// Brings an interface into service. Idempotent.
    pub async fn setup_interface(&self, iface: &Interface) -> Result<(), HostError> {
        let link = self
            .link_by_mac(&iface.mac)
            .await?
            .ok_or_else(|| HostError::NoLink {
                mac: iface.mac.clone(),
                id: iface.id.clone(),
            })?;
        let index = link.header.index;
        let name = Self::name(&link);
        set_rp_filter_loose(&self.sys_net, &name)?;
        if iface.is_primary() {
            return Ok(());
        }
        let h = &self.handle;
        h.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("{name} up")))?;
        let prefix = iface.subnet_cidr.prefix_len();
        match h
            .address()
            .add(index, IpAddr::V4(iface.primary_ip), prefix)
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if exists(&e) => {}
            Err(e) => return Err(nl(format!("{name} address"))(e)),
        }
        // The kernel adds the subnet's connected route to main; the
        // interface's traffic belongs to its own table instead.
        let connected = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(iface.subnet_cidr.network(), prefix)
            .output_interface(index)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Kernel)
            .build();
        if let Err(e) = h.route().del(connected).execute().await {
            if !gone(&e) {
                debug!(error = %e, link = %name, "connected route not removed");
            }
        }
        let table = route_table(iface.device_index);
        let gw = iface.gateway();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(gw, 32)
                .output_interface(index)
                .scope(RouteScope::Link)
                .table_id(table)
                .build(),
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .gateway(gw)
                .output_interface(index)
                .table_id(table)
                .build(),
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(iface.subnet_cidr.network(), prefix)
                .output_interface(index)
                .scope(RouteScope::Link)
                .table_id(table)
                .build(),
        ] {
            h.route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("table {table} routes")))?;
        }
        match h
            .rule()
            .add()
            .v4()
            .action(RuleAction::ToTable)
            .source_prefix(iface.primary_ip, 32)
            .table_id(table)
            .priority(PRIO_INTERFACE)
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if exists(&e) => {}
            Err(e) => return Err(nl("interface rule")(e)),
        }
        info!(interface = %iface.id, link = %name, table, "secondary interface in service");
        Ok(())
    }

    /// Takes an interface out of service before it is detached.
    pub async fn teardown_interface(&self, iface: &Interface) -> Result<(), HostError> {
        let table = route_table(iface.device_index);
        let h = &self.handle;
        let mut rule = h
            .rule()
            .add()
            .v4()
            .action(RuleAction::ToTable)
            .source_prefix(iface.primary_ip, 32)
            .table_id(table)
            .priority(PRIO_INTERFACE);
        if let Err(e) = h.rule().del(rule.message_mut().clone()).execute().await {
            if !gone(&e) {
                return Err(nl("remove interface rule")(e));
            }
        }
        // The table's routes go with the link when it is detached.
        Ok(())
    }

    /// Turns on forwarding and installs (or removes, for external SNAT) the
    /// SNAT table and the connmark rule. Idempotent; the nft script replaces
    /// our table whole.
    pub async fn setup_snat(&self, cfg: &SnatConfig, primary: &Interface) -> Result<(), HostError> {
        // The node routes between pods' veths and its interfaces.
        let forward = self.sys_net.join("ipv4/ip_forward");
        std::fs::write(&forward, "1").map_err(|e| {
            HostError::Io(format!(
                "enable IPv4 forwarding ({}): {e}",
                forward.display()
            ))
        })?;
        let primary_link = self.link_name(primary).await?;
        let h = &self.handle;
        let mut rule = h
            .rule()
            .add()
            .v4()
            .action(RuleAction::ToTable)
            .fw_mark(SNAT_MARK)
            .table_id(254)
            .priority(PRIO_CONNMARK);
        rule.message_mut()
            .attributes
            .push(rtnetlink::packet_route::rule::RuleAttribute::FwMask(
                SNAT_MARK,
            ));
        let msg = rule.message_mut().clone();
        if cfg.external {
            if let Err(e) = h.rule().del(msg).execute().await {
                if !gone(&e) {
                    return Err(nl("remove connmark rule")(e));
                }
            }
            nft(&format!(
                "table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"
            ))?;
            info!("external SNAT: the node does no SNAT");
            return Ok(());
        }
        match rule.execute().await {
            Ok(()) => {}
            Err(e) if exists(&e) => {}
            Err(e) => return Err(nl("connmark rule")(e)),
        }
        nft(&snat_script(cfg, &primary_link))?;
        info!(node_ip = %cfg.node_ip, link = %primary_link, "SNAT to the node's primary IP installed");
        Ok(())
    }
}

/// The nft script for our table: replaces it whole, atomically.
pub fn snat_script(cfg: &SnatConfig, primary_link: &str) -> String {
    let no_snat = cfg
        .no_snat
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let prefix = &cfg.veth_prefix;
    let ip = cfg.node_ip;
    let mark = SNAT_MARK;
    format!(
        "table ip {NFT_TABLE}
delete table ip {NFT_TABLE}
table ip {NFT_TABLE} {{
  set no_snat {{
    type ipv4_addr
    flags interval
    auto-merge
    elements = {{ {no_snat} }}
  }}
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    iifname \"{prefix}*\" ct state new ip daddr != @no_snat ct mark set ct mark or {mark:#x}
    iifname \"{prefix}*\" ct mark and {mark:#x} == {mark:#x} meta mark set meta mark or {mark:#x}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{primary_link}\" ct mark and {mark:#x} == {mark:#x} ip saddr != {ip} snat to {ip}
  }}
}}
"
    )
}

fn nft(script: &str) -> Result<(), HostError> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| HostError::Nft(format!("cannot run nft (is nftables installed?): {e}")))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| HostError::Nft(e.to_string()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| HostError::Nft(e.to_string()))?;
    if !out.status.success() {
        return Err(HostError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Loose reverse-path filtering: replies to pods on a secondary interface
/// arrive on that interface while the main table routes elsewhere.
fn set_rp_filter_loose(sys_net: &std::path::Path, link: &str) -> Result<(), HostError> {
    let path = sys_net.join(format!("ipv4/conf/{link}/rp_filter"));
    std::fs::write(&path, "2").map_err(|e| HostError::Io(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snat_script_excludes_vpc_and_configured_cidrs() {
        let s = snat_script(
            &SnatConfig {
                external: false,
                node_ip: "10.0.0.4".parse().unwrap(),
                no_snat: vec![
                    "10.0.0.0/16".parse().unwrap(),
                    "192.168.50.0/24".parse().unwrap(),
                ],
                veth_prefix: "eni".into(),
            },
            "eth0",
        );
        assert!(
            s.contains("elements = { 10.0.0.0/16, 192.168.50.0/24 }"),
            "{s}"
        );
        assert!(s.contains("snat to 10.0.0.4"));
        assert!(s.contains("iifname \"eni*\""));
        assert!(s.contains("oifname \"eth0\""));
        assert!(
            s.starts_with("table ip vpc-cni\ndelete table ip vpc-cni\n"),
            "replaces the table whole"
        );
    }
}
