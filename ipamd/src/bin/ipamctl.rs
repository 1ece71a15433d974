//! ipamctl: talk to ipamd over its socket, as the CNI plugin does. For
//! operators and demos: add or delete an attachment, check health.

use clap::{Parser, Subcommand};
use ipamd_api::v1::{AddNetworkRequest, DelNetworkRequest};

#[derive(Parser)]
#[command(version, about = "Client for ipamd's unix socket")]
struct Cli {
    #[arg(long, env = "IPAMD_SOCKET", default_value = ipamd_api::DEFAULT_SOCKET)]
    socket: std::path::PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ask for an address for CONTAINER_ID; prints the reply as JSON.
    Add {
        container_id: String,
        #[arg(long, default_value = "eth0")]
        ifname: String,
        #[arg(long, default_value = "vpc-cni")]
        network: String,
    },
    /// Print the pool summary from ipamd's introspection endpoint.
    Pool {
        #[arg(
            long,
            env = "IPAMD_INTROSPECTION_ADDR",
            default_value = "127.0.0.1:61679"
        )]
        introspection: String,
    },
    /// Print every interface and the state of each address.
    Interfaces {
        #[arg(
            long,
            env = "IPAMD_INTROSPECTION_ADDR",
            default_value = "127.0.0.1:61679"
        )]
        introspection: String,
    },
    /// Release CONTAINER_ID's address.
    Del {
        container_id: String,
        #[arg(long, default_value = "eth0")]
        ifname: String,
        #[arg(long, default_value = "vpc-cni")]
        network: String,
    },
}

/// GET on the loopback introspection server; prints the JSON body.
fn introspect(addr: &str, path: &str) -> ! {
    use std::io::{Read, Write};
    let fetch = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: ipamd\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    match fetch() {
        Ok(resp) => {
            let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            match serde_json::from_str::<serde_json::Value>(body) {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
                Err(_) => println!("{body}"),
            }
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("ipamctl: introspection at {addr}: {e} (is ipamd running?)");
            std::process::exit(69)
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Pool { introspection } => introspect(introspection, "/v1/pool"),
        Cmd::Interfaces { introspection } => introspect(introspection, "/v1/interfaces"),
        _ => {}
    }
    let mut client = match ipamd_api::client(&cli.socket).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipamctl: {e}");
            std::process::exit(69);
        }
    };
    let out = match cli.cmd {
        Cmd::Pool { .. } | Cmd::Interfaces { .. } => unreachable!("answered above"),
        Cmd::Add {
            container_id,
            ifname,
            network,
        } => client
            .add_network(AddNetworkRequest {
                network_name: network,
                container_id,
                ifname,
                ..Default::default()
            })
            .await
            .map(|r| {
                let r = r.into_inner();
                let i = r.interface.unwrap_or_default();
                serde_json::json!({
                    "ip": r.ipv4_address,
                    "interface": i.id,
                    "device_number": i.device_number,
                    "route_table": i.route_table,
                    "vpc_cidrs": r.vpc_cidrs,
                    "node_ip": r.node_ip,
                })
            }),
        Cmd::Del {
            container_id,
            ifname,
            network,
        } => client
            .del_network(DelNetworkRequest {
                network_name: network,
                container_id,
                ifname,
                ..Default::default()
            })
            .await
            .map(|r| {
                let r = r.into_inner();
                serde_json::json!({"found": r.found, "ip": r.ipv4_address})
            }),
    };
    match out {
        Ok(v) => println!("{v}"),
        Err(s) => {
            eprintln!("ipamctl: {:?}: {}", s.code(), s.message());
            std::process::exit(1);
        }
    }
}
