//! ipamd: keeps a warm pool of VPC-routed addresses on this node and hands
//! them to the vpc-cni plugin over a unix socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipamd::config::{Env, Settings};
use ipamd::ipam::{Ipam, StartError};
use ipamd::{introspect, rpc};
use providers::CloudProvider;
use tokio::sync::watch;
use tracing::{error, info, warn};
use vpc_sim::provider::Backend;
use vpc_sim::{SimClient, SimProvider, Vpc, VpcConfig};

/// EX_USAGE: bad configuration.
const EXIT_CONFIG: i32 = 64;
/// EX_UNAVAILABLE: the cloud or a local resource is not there.
const EXIT_UNAVAILABLE: i32 = 69;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProviderKind {
    Sim,
    Aws,
    Azure,
}

/// Pool settings (WARM_ENI_TARGET, WARM_IP_TARGET, MINIMUM_IP_TARGET,
/// WARM_PREFIX_TARGET, ENABLE_PREFIX_DELEGATION, MAX_ENI, MAX_PODS,
/// IP_COOLDOWN_PERIOD, IPAMD_ADD_WAIT_SECONDS, AWS_VPC_K8S_CNI_EXTERNALSNAT,
/// AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS, CLUSTER_NAME) come from the
/// environment under aws-node's names.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Which cloud the node runs in.
    #[arg(long, env = "IPAMD_PROVIDER", value_enum, default_value = "sim")]
    provider: ProviderKind,
    /// Unix socket the CNI plugin calls.
    #[arg(long, env = "IPAMD_SOCKET", default_value = ipamd_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Directory for the journal (tmpfs on nodes: survives ipamd restarts).
    #[arg(long, env = "IPAMD_STATE_DIR", default_value = "/run/vpc-cni")]
    state_dir: PathBuf,
    /// Introspection HTTP address (loopback only); "off" disables it.
    #[arg(
        long,
        env = "IPAMD_INTROSPECTION_ADDR",
        default_value = "127.0.0.1:61679"
    )]
    introspection: String,
    /// sim: address of a shared vpc-sim server (unix:/path or 127.0.0.1:PORT).
    /// Without it ipamd runs an embedded simulated VPC.
    #[arg(long, env = "SIM_SERVER")]
    sim_server: Option<String>,
    /// sim: this node's name; the simulated instance is found or launched by it.
    #[arg(long, env = "MY_NODE_NAME", default_value = "sim-node-1")]
    node_name: String,
    /// sim: instance type of the simulated node.
    #[arg(long, env = "SIM_INSTANCE_TYPE", default_value = "m5.large")]
    sim_instance_type: String,
    /// sim (embedded): milliseconds an interface attach takes.
    #[arg(long, default_value_t = 200)]
    sim_attach_latency_ms: u64,
    /// sim (embedded): file the simulated VPC is kept in; default under --state-dir.
    #[arg(long)]
    sim_state: Option<PathBuf>,
    /// Configure the node's side of the datapath: secondary interfaces, their
    /// route tables and rules, SNAT (nftables), rp_filter. On by default for
    /// real clouds; for sim only when its VPC is wired into network
    /// namespaces (vpc-sim --fabric).
    #[arg(long, env = "IPAMD_CONFIGURE_HOST")]
    configure_host: Option<bool>,
    /// Seconds in-flight calls get to finish after SIGTERM.
    #[arg(long, default_value_t = 5)]
    grace_seconds: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IPAMD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let settings = match Settings::from_source(&Env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ipamd: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    let introspection: Option<SocketAddr> = match cli.introspection.as_str() {
        "off" | "" => None,
        a => match a.parse() {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("ipamd: invalid configuration:\n  --introspection {a:?}: {e}");
                std::process::exit(EXIT_CONFIG);
            }
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(run(cli, settings, introspection));
    std::process::exit(code);
}

async fn provider(cli: &Cli) -> Result<Arc<dyn CloudProvider>, (i32, String)> {
    match cli.provider {
        ProviderKind::Sim => {
            let backend = match &cli.sim_server {
                Some(addr) => Backend::Remote(Arc::new(SimClient::new(
                    addr.parse().map_err(|e| (EXIT_CONFIG, e))?,
                ))),
                None => {
                    let state = cli
                        .sim_state
                        .clone()
                        .unwrap_or_else(|| cli.state_dir.join("sim-vpc.json"));
                    std::fs::create_dir_all(&cli.state_dir).map_err(|e| {
                        (
                            EXIT_UNAVAILABLE,
                            format!("{}: {e}", cli.state_dir.display()),
                        )
                    })?;
                    let vpc = Vpc::open(VpcConfig {
                        attach_latency: Duration::from_millis(cli.sim_attach_latency_ms),
                        state_path: Some(state),
                        ..VpcConfig::default()
                    })
                    .map_err(|e| (EXIT_UNAVAILABLE, format!("embedded simulated VPC: {e}")))?;
                    info!("running an embedded simulated VPC");
                    Backend::Local(Arc::new(vpc))
                }
            };
            let p = SimProvider::join(backend, &cli.node_name, &cli.sim_instance_type)
                .await
                .map_err(|e| match e {
                    providers::ProviderError::Invalid(_) => (EXIT_CONFIG, e.to_string()),
                    _ => (EXIT_UNAVAILABLE, e.to_string()),
                })?;
            info!(instance = p.instance_id(), node = %cli.node_name, "joined the simulated VPC");
            Ok(Arc::new(p))
        }
        ProviderKind::Aws => {
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let settings = providers::aws::AwsSettings {
                region: env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")),
                endpoint_url: env("AWS_ENDPOINT_URL_EC2").or_else(|| env("AWS_ENDPOINT_URL")),
                imds_endpoint: env("AWS_EC2_METADATA_SERVICE_ENDPOINT"),
                static_credentials: None,
            };
            let p =
                providers::aws::AwsProvider::connect(&settings, providers::layer::CallLayer::ec2())
                    .await
                    .map_err(|e| (EXIT_UNAVAILABLE, format!("AWS: {e}")))?;
            Ok(Arc::new(p))
        }
        ProviderKind::Azure => Err((
            EXIT_CONFIG,
            format!(
                "provider {:?} is not built into this ipamd; only sim is available",
                cli.provider
            ),
        )),
    }
}

async fn run(cli: Cli, settings: Settings, introspection: Option<SocketAddr>) -> i32 {
    let provider = match provider(&cli).await {
        Ok(p) => p,
        Err((code, msg)) => {
            eprintln!("ipamd: {msg}");
            return code;
        }
    };
    let journal = cli.state_dir.join("ipamd.journal");
    let ipam = match Ipam::start(provider, settings, &journal).await {
        Ok(i) => i,
        Err(e) => {
            eprintln!("ipamd: {e}");
            return match e {
                StartError::Config(_) => EXIT_CONFIG,
                _ => EXIT_UNAVAILABLE,
            };
        }
    };
    let configure_host = cli
        .configure_host
        .unwrap_or(!matches!(cli.provider, ProviderKind::Sim));
    if configure_host {
        match ipamd::hostnet::HostNet::new() {
            Ok(h) => ipam.configure_host(h),
            Err(e) => {
                eprintln!("ipamd: {e}");
                return EXIT_UNAVAILABLE;
            }
        }
    }
    let listener = match rpc::bind_socket(&cli.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ipamd: cannot listen on {}: {e}", cli.socket.display());
            return EXIT_UNAVAILABLE;
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        rx.wait_for(|s| *s).await.ok();
    };
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = introspection {
        match introspect::bind(addr).await {
            Ok(l) => {
                let bound = l.local_addr().map_or(addr, |a| a);
                info!(addr = %bound, "introspection listening");
                let (ipam, stop) = (ipam.clone(), stopped(stop_rx.clone()));
                tasks.spawn(async move {
                    if let Err(e) = introspect::serve(ipam, l, stop).await {
                        error!(error = %e, "introspection server failed");
                    }
                });
            }
            Err(e) => {
                eprintln!("ipamd: introspection on {addr}: {e}");
                std::fs::remove_file(&cli.socket).ok();
                return EXIT_UNAVAILABLE;
            }
        }
    }
    let reconciler = tokio::spawn(ipam.clone().run(stop_rx.clone()));
    let fast_socket = ipamd_api::fast::path(&cli.socket);
    let fast = match rpc::bind_socket(&fast_socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ipamd: cannot listen on {}: {e}", fast_socket.display());
            std::fs::remove_file(&cli.socket).ok();
            return EXIT_UNAVAILABLE;
        }
    };
    let server = match rpc::spawn_server(ipam.clone(), listener, fast, stop_rx.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ipamd: cannot start the rpc server: {e}");
            std::fs::remove_file(&cli.socket).ok();
            std::fs::remove_file(&fast_socket).ok();
            return EXIT_UNAVAILABLE;
        }
    };
    info!(socket = %cli.socket.display(), journal = %journal.display(), "ipamd ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let mut server = server;
    // A server that stops on its own (it cannot serve any more) stops ipamd:
    // pods cannot start on this node until it is restarted.
    let mut failed = None;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: draining"),
        r = &mut server => {
            let why = match r {
                Ok(Err(e)) => e,
                _ => "stopped".to_string(),
            };
            error!(error = %why, "the rpc server stopped; ipamd stops");
            failed = Some(why);
        }
    }
    stop_tx.send(true).ok();
    let grace = Duration::from_secs(cli.grace_seconds);
    if failed.is_none() {
        match tokio::time::timeout(grace, server).await {
            Err(_) => warn!("in-flight calls did not finish within the grace period"),
            Ok(Ok(Err(e))) => error!(error = %e, "the rpc server failed"),
            Ok(_) => {}
        }
    }
    if tokio::time::timeout(grace, reconciler).await.is_err() {
        warn!("a cloud call was still running at shutdown; its result is reconciled on the next start");
    }
    tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .ok();
    std::fs::remove_file(&cli.socket).ok();
    std::fs::remove_file(&fast_socket).ok();
    info!("ipamd stopped");
    if failed.is_some() {
        EXIT_UNAVAILABLE
    } else {
        0
    }
}
