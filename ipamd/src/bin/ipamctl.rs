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
    /// Release CONTAINER_ID's address.
    Del {
        container_id: String,
        #[arg(long, default_value = "eth0")]
        ifname: String,
        #[arg(long, default_value = "vpc-cni")]
        network: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let mut client = match ipamd_api::client(&cli.socket).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipamctl: {e}");
            std::process::exit(69);
        }
    };
    let out = match cli.cmd {
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
