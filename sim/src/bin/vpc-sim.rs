//! `vpc-sim`: the simulated VPC as a server several ipamd instances share,
//! plus the admin calls a test harness or operator makes against it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vpc_sim::client::SimAddr;
use vpc_sim::{server, Fault, FaultKind, Reply, Request, SimClient, Vpc, VpcConfig};

#[derive(Parser)]
#[command(version, about = "Simulated cloud VPC for vpc-cni")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the simulated VPC until SIGTERM or SIGINT.
    Serve {
        /// unix:/path or 127.0.0.1:PORT (port 0 picks one; the address is printed).
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: String,
        /// File the VPC state is kept in across restarts.
        #[arg(long)]
        state: Option<PathBuf>,
        #[arg(long, default_value_t = 200)]
        attach_latency_ms: u64,
        /// Turn off EC2's per-API token buckets.
        #[arg(long)]
        no_throttle: bool,
        /// Wire the VPC into network namespaces: this existing namespace
        /// routes every address to its interface's link; each node's
        /// namespace is named after its instance.
        #[arg(long)]
        fabric_vpc_netns: Option<String>,
        /// Also serve a fake Azure Resource Manager, IMDS and token
        /// endpoint over the same VPC on this TCP address (e.g.
        /// 127.0.0.1:7701), for ipamd's `--provider azure`; VMs are
        /// instances of an Azure size (`launch --type Standard_D2s_v3`).
        #[arg(long)]
        azure_listen: Option<String>,
        /// The VM the fake IMDS answers for when a request comes from an
        /// address that is no VM's (ipamd on this host, over loopback).
        #[arg(long)]
        azure_default_vm: Option<String>,
        /// Milliseconds a fake ARM PUT stays in progress.
        #[arg(long, default_value_t = 300)]
        azure_operation_ms: u64,
    },
    /// Launch (or find) an instance by name and print its id.
    Launch {
        #[arg(long)]
        server: String,
        #[arg(long)]
        name: String,
        #[arg(long = "type", default_value = "m5.large")]
        instance_type: String,
    },
    /// Print the whole VPC state as JSON.
    State {
        #[arg(long)]
        server: String,
    },
    /// Inject a fault into the next COUNT calls of an API.
    Fault {
        #[arg(long)]
        server: String,
        /// EC2 API name, e.g. AttachNetworkInterface; omitted: any API.
        #[arg(long)]
        api: Option<String>,
        /// throttle | server-error | timeout
        #[arg(long)]
        kind: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a container's log is a file, where
        // escape codes garble `kubectl logs` and log collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("vpc-sim: {e}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let admin = |server: &str| -> Result<SimClient, String> { Ok(SimClient::new(server.parse()?)) };
    match cli.cmd {
        Cmd::Serve {
            listen,
            state,
            attach_latency_ms,
            no_throttle,
            fabric_vpc_netns,
            azure_listen,
            azure_default_vm,
            azure_operation_ms,
        } => {
            let addr: SimAddr = listen.parse()?;
            let fabric = match fabric_vpc_netns {
                Some(ns) => {
                    let subnets: Vec<_> = vpc_sim::VpcState::default()
                        .subnets
                        .values()
                        .map(|s| s.cidr)
                        .collect();
                    let f = vpc_sim::fabric::NetnsFabric::new(&ns, &subnets)?;
                    Some(Arc::new(f) as Arc<dyn vpc_sim::fabric::Fabric>)
                }
                None => None,
            };
            let vpc = Arc::new(
                Vpc::open(VpcConfig {
                    attach_latency: Duration::from_millis(attach_latency_ms),
                    throttling: !no_throttle,
                    state_path: state,
                    fabric,
                    ..VpcConfig::default()
                })
                .map_err(|e| format!("cannot load state: {e}"))?,
            );
            let listener = server::Listener::bind(&addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let bound = listener.local_addr().map_err(|e| e.to_string())?;
            println!("vpc-sim listening on {bound}");
            let azure = match azure_listen {
                Some(a) => {
                    let l = tokio::net::TcpListener::bind(&a)
                        .await
                        .map_err(|e| format!("cannot listen on {a}: {e}"))?;
                    println!(
                        "fake Azure ARM and IMDS listening on http://{}",
                        l.local_addr().map_err(|e| e.to_string())?
                    );
                    let fake = vpc_sim::azure::ArmFake::new(
                        vpc.clone(),
                        vpc_sim::azure::ArmConfig {
                            operation_delay: Duration::from_millis(azure_operation_ms),
                            default_vm: azure_default_vm,
                            ..Default::default()
                        },
                    );
                    Some(tokio::spawn(vpc_sim::azure::serve(fake, l)))
                }
                None => None,
            };
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .map_err(|e| e.to_string())?;
            tokio::select! {
                r = server::serve(vpc, listener) => r.map_err(|e| e.to_string())?,
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if let Some(task) = azure {
                task.abort();
            }
            if let SimAddr::Unix(p) = bound {
                std::fs::remove_file(p).ok();
            }
            Ok(())
        }
        Cmd::Launch {
            server,
            name,
            instance_type,
        } => {
            match admin(&server)?
                .call(&Request::LaunchInstance {
                    name,
                    instance_type,
                    subnet_id: None,
                })
                .await
                .map_err(|e| e.to_string())?
            {
                Reply::InstanceId(id) => println!("{id}"),
                r => return Err(format!("unexpected reply {r:?}")),
            }
            Ok(())
        }
        Cmd::State { server } => {
            let r = admin(&server)?
                .call(&Request::DumpState)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "{}",
                serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        Cmd::Fault {
            server,
            api,
            kind,
            count,
        } => {
            let kind = match kind.as_str() {
                "throttle" => FaultKind::Throttle,
                "server-error" => FaultKind::ServerError,
                "timeout" => FaultKind::Timeout { applied: false },
                k => {
                    return Err(format!(
                        "unknown fault kind {k:?} (throttle | server-error | timeout)"
                    ))
                }
            };
            admin(&server)?
                .call(&Request::InjectFault(Fault { api, kind, count }))
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
    }
}
