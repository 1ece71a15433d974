//! The simulated VPC's data plane in network namespaces, as the real VPC
//! does it: a "vpc" namespace routes every address to the link of the
//! interface that owns it. Launching an instance wires the node's primary
//! interface (as DHCP would); attaching an interface creates its link, with
//! the interface's MAC, in the node's namespace; assigning an address routes
//! it. The node's namespace is named after the instance.
//!
//! Uses `ip -batch`: this is test and demo infrastructure that mirrors the
//! cloud, not the node's datapath (which ipamd and vpc-cni drive with
//! rtnetlink).

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

use providers::types::{subnet_gateway, Assigned};

/// What the fabric needs to know of an interface.
#[derive(Debug, Clone)]
pub struct Port {
    pub interface_id: String,
    pub mac: String,
    pub primary_ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub device_index: u32,
    pub node: String,
    pub addresses: Assigned,
}

/// Hooks the simulated VPC calls after each change it accepted.
pub trait Fabric: Send + Sync + std::fmt::Debug {
    fn subnet(&self, cidr: Ipv4Net) -> Result<(), String>;
    fn attach(&self, port: &Port) -> Result<(), String>;
    fn assign(&self, port: &Port, what: &Assigned) -> Result<(), String>;
    fn unassign(&self, port: &Port, what: &Assigned) -> Result<(), String>;
    fn detach(&self, interface_id: &str) -> Result<(), String>;
}

#[derive(Debug, Clone)]
pub struct NetnsFabric {
    vpc_ns: String,
}

/// The VPC router's side of an interface's link.
pub fn vpc_side(interface_id: &str) -> String {
    let tail: String = interface_id
        .chars()
        .rev()
        .take(11)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("v{tail}")
}

fn batch(ns: &str, lines: &[String]) -> Result<(), String> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(lines.join("\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip -n {ns}: {} (commands: {})",
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("; ")
        ))
    }
}

fn exists(ns: &str, link: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", link])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn targets(what: &Assigned) -> Vec<String> {
    what.ips
        .iter()
        .map(|ip| format!("{ip}/32"))
        .chain(what.prefixes.iter().map(ToString::to_string))
        .collect()
}

impl NetnsFabric {
    /// Uses the existing namespace `vpc_ns` as the VPC router.
    pub fn new(vpc_ns: &str, subnets: &[Ipv4Net]) -> Result<Self, String> {
        let f = Self {
            vpc_ns: vpc_ns.to_string(),
        };
        batch(vpc_ns, &["link set lo up".to_string()])?;
        f.sysctl_forward()?;
        for s in subnets {
            f.subnet(*s)?;
        }
        Ok(f)
    }

    fn sysctl_forward(&self) -> Result<(), String> {
        // Forwarding, and proxy ARP on every link: the VPC's router answers
        // ARP for any address it routes, as a real VPC does.
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.vpc_ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.default.proxy_arp=1",
                "net.ipv4.conf.all.proxy_arp=1",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "enable forwarding in {}: {}",
                self.vpc_ns,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    fn routes(&self, port: &Port, what: &Assigned, verb: &str) -> Vec<String> {
        let side = vpc_side(&port.interface_id);
        targets(what)
            .into_iter()
            .map(|t| match verb {
                "del" => format!("route del {t}"),
                _ => format!(
                    "route replace {t} via {} dev {side} onlink",
                    port.primary_ip
                ),
            })
            .collect()
    }
}

impl Fabric for NetnsFabric {
    fn subnet(&self, cidr: Ipv4Net) -> Result<(), String> {
        // The subnet's router answers on every link of the VPC namespace.
        batch(
            &self.vpc_ns,
            &[format!("addr replace {}/32 dev lo", subnet_gateway(cidr))],
        )
    }

    fn attach(&self, port: &Port) -> Result<(), String> {
        let side = vpc_side(&port.interface_id);
        if !exists(&self.vpc_ns, &side) {
            let node_if = format!("eth{}", port.device_index);
            batch(
                &self.vpc_ns,
                &[
                    format!(
                        "link add {side} type veth peer name {node_if} address {} netns {}",
                        port.mac, port.node
                    ),
                    format!("link set {side} up"),
                ],
            )?;
            if port.device_index == 0 {
                // The primary interface is configured at boot, as DHCP does.
                let gw = subnet_gateway(port.subnet);
                batch(
                    &port.node,
                    &[
                        "link set lo up".to_string(),
                        format!("link set {node_if} up"),
                        format!(
                            "addr add {}/{} dev {node_if}",
                            port.primary_ip,
                            port.subnet.prefix_len()
                        ),
                        format!("route replace default via {gw} dev {node_if}"),
                    ],
                )?;
            }
        }
        let mut lines = vec![
            format!(
                "neigh replace {} lladdr {} dev {side} nud permanent",
                port.primary_ip, port.mac
            ),
            format!("route replace {}/32 dev {side}", port.primary_ip),
        ];
        lines.extend(self.routes(port, &port.addresses, "add"));
        batch(&self.vpc_ns, &lines)
    }

    fn assign(&self, port: &Port, what: &Assigned) -> Result<(), String> {
        batch(&self.vpc_ns, &self.routes(port, what, "add"))
    }

    fn unassign(&self, port: &Port, what: &Assigned) -> Result<(), String> {
        batch(&self.vpc_ns, &self.routes(port, what, "del"))
    }

    fn detach(&self, interface_id: &str) -> Result<(), String> {
        let side = vpc_side(interface_id);
        if exists(&self.vpc_ns, &side) {
            // Deleting one end deletes the pair, and the routes through it.
            batch(&self.vpc_ns, &[format!("link del {side}")])?;
        }
        Ok(())
    }
}
