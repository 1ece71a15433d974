//! ipamd: keeps a warm pool of VPC-routed addresses on this node and hands
//! them to the vpc-cni plugin over a unix socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipamd::config::{Env, Settings};
use ipamd::exit::Fatal;
use ipamd::factory::{self, ProviderConfig, ProviderKind, SimOptions};
use ipamd::ipam::{Ipam, StartError};
use ipamd::node::NodeTracker;
use ipamd::pool::JournalAt;
use ipamd::startup::with_retries;
use ipamd::{introspect, rpc};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Pool settings (WARM_ENI_TARGET, WARM_IP_TARGET, MINIMUM_IP_TARGET,
/// WARM_PREFIX_TARGET, ENABLE_PREFIX_DELEGATION, MAX_ENI, MAX_PODS,
/// IP_COOLDOWN_PERIOD, IPAMD_ADD_WAIT_SECONDS, AWS_VPC_K8S_CNI_EXTERNALSNAT,
/// AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS, CLUSTER_NAME) come from the
/// environment under aws-node's names.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Which cloud the node runs in: aws, azure, or sim.
    /// Required: a node on a real cloud must never run the simulated VPC
    /// because the setting was forgotten.
    #[arg(long, env = "IPAMD_PROVIDER")]
    provider: Option<String>,
    /// Unix socket the CNI plugin calls.
    #[arg(long, env = "IPAMD_SOCKET", default_value = ipamd_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Directory for the journal (tmpfs on nodes: survives ipamd restarts).
    #[arg(long, env = "IPAMD_STATE_DIR", default_value = "/run/vpc-cni")]
    state_dir: PathBuf,
    /// Introspection HTTP address (loopback only) [default: aws-node's
    /// INTROSPECTION_BIND_ADDRESS, else 127.0.0.1:61679]; "off" disables it,
    /// as does aws-node's DISABLE_INTROSPECTION=true.
    #[arg(long, env = "IPAMD_INTROSPECTION_ADDR")]
    introspection: Option<String>,
    /// Prometheus metrics address (`GET /metrics`, no pod or secret in any
    /// label); reachable from the cluster's Prometheus by default, on
    /// aws-node's port. "off" disables it (`/metrics` stays on the
    /// introspection address); aws-node's DISABLE_METRICS=true turns it off
    /// too.
    #[arg(long, env = "IPAMD_METRICS_ADDR", default_value = "0.0.0.0:61678")]
    metrics: String,
    /// aws-node's checkpoint, imported on ipamd's first start on a node (no
    /// journal yet) so that pods wired by aws-node keep their addresses
    /// [default: aws-node's AWS_VPC_K8S_CNI_BACKING_STORE, else
    /// /var/run/aws-node/ipam.json]; "off" never imports.
    #[arg(long, env = "IPAMD_AWS_NODE_CHECKPOINT")]
    aws_node_checkpoint: Option<String>,
    /// The `name` of vpc-cni's network configuration (conflist): the
    /// network under which imported aws-node pods' DELs will arrive.
    #[arg(long, env = "IPAMD_CNI_NETWORK_NAME", default_value = "vpc-cni")]
    cni_network_name: String,
    /// Write the node's CNI configuration (conflist) into this directory
    /// once ipamd is ready (the host's /etc/cni/net.d, mounted); unset: no
    /// conflist is written.
    #[arg(long, env = "IPAMD_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// The conflist's file name (runtimes take the first by name).
    #[arg(
        long,
        env = "IPAMD_CNI_CONFLIST_FILE",
        default_value = "10-vpc-cni.conflist"
    )]
    cni_conflist_file: String,
    /// The conflist's cniVersion (0.3.1 for the policy engines' chaining
    /// guides).
    #[arg(long, env = "IPAMD_CNI_VERSION", default_value = "1.0.0")]
    cni_version: String,
    /// Plugins chained after vpc-cni in the conflist: a JSON array of plugin
    /// objects (portmap, bandwidth, Calico or Cilium in chaining mode).
    #[arg(long, env = "IPAMD_CHAINED_PLUGINS", default_value = "[]")]
    chained_plugins: String,
    /// Also install the vpc-cni plugin into this directory (the host's CNI
    /// bin dir, mounted) before each conflist write, so the conflist never
    /// names a missing plugin; unset: the plugin is installed by others
    /// (`ipamctl install-cni`).
    #[arg(long, env = "IPAMD_CNI_BIN_DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// The plugin to install with --cni-bin-dir.
    #[arg(
        long,
        env = "IPAMD_CNI_PLUGIN_SOURCE",
        default_value = "/usr/local/bin/vpc-cni"
    )]
    cni_plugin_source: PathBuf,
    /// Remove the conflist (and, with --cni-bin-dir, the plugin) when ipamd
    /// stops (a clean uninstall; off by default, so a restart or rolling
    /// update keeps the node's network).
    #[arg(long, env = "IPAMD_CNI_UNINSTALL_ON_EXIT")]
    cni_uninstall_on_exit: Option<String>,
    /// sim: address of a shared vpc-sim server (unix:/path or 127.0.0.1:PORT).
    /// Without it ipamd runs an embedded simulated VPC.
    #[arg(long, env = "SIM_SERVER")]
    sim_server: Option<String>,
    /// This node's Kubernetes name (aws-node's MY_NODE_NAME, from the
    /// downward API); required with Kubernetes. sim: the simulated instance
    /// is found or launched by it [default for sim: sim-node-1].
    #[arg(long, env = "MY_NODE_NAME")]
    node_name: Option<String>,
    /// Talk to Kubernetes: auto (when a kubeconfig is given or ipamd runs
    /// in a pod, KUBERNETES_SERVICE_HOST), on, or off.
    #[arg(long, env = "IPAMD_KUBERNETES", default_value = "auto")]
    kubernetes: String,
    /// The kubeconfig to use [default: in-cluster, else KUBECONFIG or
    /// ~/.kube/config].
    #[arg(long, env = "IPAMD_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The NoSchedule taint key removed from the node once ipamd is ready
    /// and the CNI configuration is installed; "off": none.
    #[arg(long, env = "IPAMD_STARTUP_TAINT", default_value = ipamd::k8s::DEFAULT_STARTUP_TAINT)]
    startup_taint: String,
    /// Set the vpc-cni.io/ip-exhausted NoSchedule taint while the node's pod
    /// addresses are exhausted (the node condition is set either way).
    #[arg(long, env = "IPAMD_EXHAUSTION_TAINT")]
    exhaustion_taint: Option<String>,
    /// Seconds a pod must be gone from the API (or finished) before the
    /// address it holds without a DEL is released.
    #[arg(long, env = "IPAMD_POD_GONE_GRACE_SECONDS", default_value_t = 60)]
    pod_gone_grace_seconds: u64,
    /// The namespace (holding nothing else) where ipamd keeps a Lease
    /// named after its node while its pool grows, and counts them: the
    /// calls that grow a pool share the cloud account's budget among the
    /// nodes that grow, not every node [default: none, every node].
    #[arg(long, env = "IPAMD_GROWERS_NAMESPACE")]
    growers_namespace: Option<String>,
    /// azure: Azure Resource Manager's endpoint.
    #[arg(
        long,
        env = "IPAMD_AZURE_ARM_ENDPOINT",
        default_value = "https://management.azure.com"
    )]
    azure_arm_endpoint: String,
    /// azure: the Instance Metadata Service's endpoint.
    #[arg(
        long,
        env = "IPAMD_AZURE_IMDS_ENDPOINT",
        default_value = "http://169.254.169.254"
    )]
    azure_imds_endpoint: String,
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
    configure_host: Option<String>,
    /// The node's /proc/sys/net (sysctls: forwarding, rp_filter); in a
    /// container, the host's mounted elsewhere (the runtime keeps the
    /// container's /proc/sys read-only unless it is privileged).
    #[arg(long, env = "IPAMD_HOST_PROC_SYS_NET", default_value = ipamd::hostnet::PROC_SYS_NET)]
    host_proc_sys_net: PathBuf,
    /// Seconds in-flight calls get to finish after SIGTERM.
    #[arg(long, default_value_t = 5)]
    grace_seconds: u64,
}

fn main() {
    // The origin of awscni_ipamd_startup_duration_seconds.
    ipamd::metrics::process_started();
    // 1. Logging.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IPAMD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a container's log is a file, where
        // escape codes garble `kubectl logs` and log collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // 2. Configuration, read once: every bad setting at once.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // --help and --version print and exit 0; anything else clap
        // refuses is bad configuration too.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("ipamd: invalid configuration:\n  {}", e.to_string().trim());
            std::process::exit(ipamd::exit::EX_USAGE);
        }
    };
    let config = match Config::read(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipamd: {e}");
            std::process::exit(e.code());
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(config)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ipamd: {e}");
            e.code()
        }
    };
    std::process::exit(code);
}

/// Everything ipamd is told, checked.
struct Config {
    cli: Cli,
    provider: ProviderConfig,
    settings: Settings,
    introspection: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    configure_host: bool,
    cni_conf: Option<ipamd::cniconf::CniConf>,
    kube: Option<(kube::Config, ipamd::k8s::KubeSettings)>,
}

impl Config {
    fn read(cli: Cli) -> Result<Self, Fatal> {
        let mut bad = vec![];
        let settings = match Settings::from_source(&Env) {
            Ok(s) => Some(s),
            Err(e) => {
                bad.extend(e.problems);
                None
            }
        };
        // aws-node's variables: warnings now, refusals came with the
        // settings above.
        for w in ipamd::awsnode::check(&Env).warnings {
            warn!("{w}");
        }
        use ipamd::awsnode::{is_true, value};
        let introspection_addr = match (
            &cli.introspection,
            value(&Env, "INTROSPECTION_BIND_ADDRESS"),
        ) {
            (Some(a), _) => a.clone(),
            (None, Some(a)) => a,
            (None, None) => "127.0.0.1:61679".into(),
        };
        let introspection_addr = if is_true(&Env, "DISABLE_INTROSPECTION") {
            "off".to_string()
        } else {
            introspection_addr
        };
        let introspection = match introspection_addr.as_str() {
            "off" | "" => None,
            a => match a.parse::<SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => Some(a),
                Ok(_) => {
                    bad.push(format!(
                        "--introspection / IPAMD_INTROSPECTION_ADDR / INTROSPECTION_BIND_ADDRESS {a:?}: not a loopback address (the pool layout is not for the network)"
                    ));
                    None
                }
                Err(e) => {
                    bad.push(format!(
                        "--introspection / IPAMD_INTROSPECTION_ADDR / INTROSPECTION_BIND_ADDRESS {a:?}: {e}"
                    ));
                    None
                }
            },
        };
        if let Err(e) = ipamd_api::names::check_id("network name", &cli.cni_network_name) {
            bad.push(format!("--cni-network-name / IPAMD_CNI_NETWORK_NAME: {e}"));
        }
        let metrics_addr = if is_true(&Env, "DISABLE_METRICS") {
            "off"
        } else {
            cli.metrics.as_str()
        };
        let metrics = match metrics_addr {
            "off" | "" => None,
            a => match a.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    bad.push(format!("--metrics / IPAMD_METRICS_ADDR {a:?}: {e}"));
                    None
                }
            },
        };
        let kind = match cli.provider.as_deref().map(str::trim) {
            None | Some("") => {
                bad.push(
                    "--provider / IPAMD_PROVIDER is not set: say which cloud this node runs in (aws, azure, or sim for the simulated VPC)"
                        .into(),
                );
                None
            }
            Some(p) => match ProviderKind::from_str(p, true) {
                Ok(ProviderKind::Azure) => {
                    bad.extend(factory::check_azure(
                        &cli.azure_arm_endpoint,
                        &cli.azure_imds_endpoint,
                        |k| std::env::var(k).ok().filter(|v| !v.is_empty()),
                    ));
                    Some(ProviderKind::Azure)
                }
                Ok(k) => Some(k),
                Err(_) => {
                    bad.push(format!(
                        "--provider / IPAMD_PROVIDER {p:?}: expected aws, azure or sim"
                    ));
                    None
                }
            },
        };
        // An optional boolean flag, read as aws-node reads booleans.
        let flag_bool = |v: Option<&str>, name: &str, bad: &mut Vec<String>| match v.map(str::trim)
        {
            None | Some("") => None,
            Some(v) => ipamd::awsnode::parse_bool(v).or_else(|| {
                bad.push(format!(
                    "{name} {v:?}: expected true or false (1, t, TRUE, 0, f, FALSE, ...)"
                ));
                None
            }),
        };
        let configure_host = flag_bool(
            cli.configure_host.as_deref(),
            "--configure-host / IPAMD_CONFIGURE_HOST",
            &mut bad,
        );
        let chained = ipamd::cniconf::parse_chained(&cli.chained_plugins)
            .map_err(|e| bad.push(e))
            .ok();
        if let Err(e) = ipamd::cniconf::check_version(&cli.cni_version) {
            bad.push(e);
        }
        if let Some(dir) = &cli.cni_bin_dir {
            if cli.cni_conf_dir.is_none() {
                bad.push(format!(
                    "--cni-bin-dir / IPAMD_CNI_BIN_DIR {}: only with --cni-conf-dir (the plugin is installed with the conflist)",
                    dir.display()
                ));
            }
            if !cli.cni_plugin_source.is_file() {
                bad.push(format!(
                    "--cni-plugin-source / IPAMD_CNI_PLUGIN_SOURCE {}: not a file",
                    cli.cni_plugin_source.display()
                ));
            }
        }
        if let Err(e) = ipamd::cniconf::check_file_name(&cli.cni_conflist_file) {
            bad.push(format!(
                "--cni-conflist-file / IPAMD_CNI_CONFLIST_FILE: {e}"
            ));
        }
        let uninstall_on_exit = flag_bool(
            cli.cni_uninstall_on_exit.as_deref(),
            "--cni-uninstall-on-exit / IPAMD_CNI_UNINSTALL_ON_EXIT",
            &mut bad,
        )
        .unwrap_or(false);
        let kube_on = match cli.kubernetes.trim() {
            "auto" => {
                cli.kubeconfig.is_some() || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            }
            v => ipamd::awsnode::parse_bool(v)
                .or(match v {
                    "on" => Some(true),
                    "off" => Some(false),
                    _ => None,
                })
                .unwrap_or_else(|| {
                    bad.push(format!(
                        "--kubernetes / IPAMD_KUBERNETES {v:?}: expected auto, on or off"
                    ));
                    false
                }),
        };
        let exhaustion_taint = flag_bool(
            cli.exhaustion_taint.as_deref(),
            "--exhaustion-taint / IPAMD_EXHAUSTION_TAINT",
            &mut bad,
        )
        .unwrap_or(false);
        let startup_taint = match cli.startup_taint.trim() {
            "off" | "" => None,
            t => match ipamd_api::names::check_k8s_qualified_name(t) {
                Ok(()) => Some(t.to_string()),
                Err(e) => {
                    bad.push(format!("--startup-taint / IPAMD_STARTUP_TAINT {t:?}: {e}"));
                    None
                }
            },
        };
        if cli.pod_gone_grace_seconds < 10 {
            bad.push(format!(
                "--pod-gone-grace-seconds / IPAMD_POD_GONE_GRACE_SECONDS {}: at least 10 (a pod's watch event may lag its ADD)",
                cli.pod_gone_grace_seconds
            ));
        }
        let growers_namespace = match cli.growers_namespace.as_deref().map(str::trim) {
            None | Some("") => None,
            // A namespace's name is a DNS label (RFC 1123).
            Some(ns)
                if ns.len() <= 63
                    && ns
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !ns.starts_with('-')
                    && !ns.ends_with('-') =>
            {
                Some(ns.to_string())
            }
            Some(ns) => {
                bad.push(format!("--growers-namespace / IPAMD_GROWERS_NAMESPACE {ns:?}: a namespace is a DNS label: at most 63 lowercase letters, digits and '-', beginning and ending with a letter or digit"));
                None
            }
        };
        let node_name = cli
            .node_name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty());
        if let Some(n) = node_name {
            if let Err(e) = ipamd_api::names::check_k8s_name("MY_NODE_NAME", n) {
                bad.push(format!("--node-name / MY_NODE_NAME: {e}"));
            }
        }
        // Read from the variable itself: listed even when other settings
        // are bad.
        if is_true(&Env, "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG") && !kube_on {
            bad.push("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true: custom networking needs Kubernetes (the node's ENIConfig is read there); give --kubeconfig or run ipamd in a pod".into());
        }
        let kube = match (kube_on, node_name) {
            (false, _) => None,
            (true, None) => {
                bad.push("--node-name / MY_NODE_NAME is not set: with Kubernetes, ipamd must know its node (the chart sets it from spec.nodeName)".into());
                None
            }
            (true, Some(n)) => Some(ipamd::k8s::KubeSettings {
                startup_taint,
                exhaustion_taint,
                pod_gone_grace: Duration::from_secs(cli.pod_gone_grace_seconds),
                manage_enis_non_schedulable: is_true(&Env, "AWS_MANAGE_ENIS_NON_SCHEDULABLE"),
                growers_namespace,
                ..ipamd::k8s::KubeSettings::new(n)
            }),
        };
        // The client's configuration is read now (files only, nothing is
        // contacted), so a bad kubeconfig is listed with the rest.
        let kube = kube.and_then(|k| {
            let read = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    rt.block_on(async {
                        let c = ipamd::k8s::config(cli.kubeconfig.as_deref()).await?;
                        // Certificates and exec plugins are checked when a
                        // client is made: made once here, and dropped.
                        ipamd::k8s::client_from(c.clone())?;
                        Ok::<_, String>(c)
                    })
                });
            match read {
                Ok(c) => Some((c, k)),
                Err(e) => {
                    bad.push(format!(
                        "--kubeconfig / IPAMD_KUBECONFIG (or in-cluster): {e}"
                    ));
                    None
                }
            }
        });
        let (Some(settings), Some(kind), true) = (settings, kind, bad.is_empty()) else {
            return Err(Fatal::Config(bad));
        };
        let provider = ProviderConfig {
            kind,
            azure: factory::AzureOptions {
                arm_endpoint: cli.azure_arm_endpoint.trim().to_string(),
                imds_endpoint: cli.azure_imds_endpoint.trim().to_string(),
            },
            sim: SimOptions {
                server: cli.sim_server.clone(),
                node_name: node_name.unwrap_or("sim-node-1").to_string(),
                instance_type: cli.sim_instance_type.clone(),
                attach_latency: Duration::from_millis(cli.sim_attach_latency_ms),
                state: cli
                    .sim_state
                    .clone()
                    .unwrap_or_else(|| cli.state_dir.join("sim-vpc.json")),
            },
        };
        let configure_host = configure_host.unwrap_or(kind != ProviderKind::Sim);
        let cni_conf = cli.cni_conf_dir.clone().map(|dir| ipamd::cniconf::CniConf {
            dir,
            file: cli.cni_conflist_file.clone(),
            network: cli.cni_network_name.clone(),
            cni_version: cli.cni_version.clone(),
            socket: cli.socket.clone(),
            veth_prefix: settings.veth_prefix.clone(),
            chained: chained.unwrap_or_default(),
            uninstall_on_exit,
            plugin: cli
                .cni_bin_dir
                .clone()
                .map(|dir| (cli.cni_plugin_source.clone(), dir)),
        });
        Ok(Self {
            cli,
            provider,
            settings,
            introspection,
            metrics,
            configure_host,
            cni_conf,
            kube,
        })
    }
}

/// Turns true at the first SIGTERM or SIGINT, from the start of `run` on,
/// so a signal during start-up is never lost.
fn signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: draining"),
        }
        tx.send(true).ok();
    });
    rx
}

/// Start-up in a fixed order: provider, pool restore, node side, servers;
/// then signals and drain.
async fn run(config: Config) -> Result<(), Fatal> {
    let Config {
        cli,
        provider,
        settings,
        introspection,
        metrics,
        configure_host,
        cni_conf,
        kube,
    } = config;
    // 2b. The state directory is ours alone before anything in it is read
    // (the journal is compacted at start); held until the process ends.
    let lock = ipamd::statelock::StateLock::acquire(&cli.state_dir)
        .map_err(|e| Fatal::Unavailable(e.to_string()))?;
    info!(lock = %lock.path().display(), "state directory locked");
    let mut signal = signals();
    // 2c. The Kubernetes client (nothing is contacted yet: the API server
    // may be down, and ipamd serves pods without it).
    let kube = match kube {
        None => {
            info!(
                "Kubernetes: off (--kubernetes {}; no --kubeconfig and not in a pod)",
                cli.kubernetes
            );
            None
        }
        Some((config, k)) => Some((ipamd::k8s::client_from(config).map_err(Fatal::config)?, k)),
    };
    // 3. How many nodes share the cloud account's request budget, before
    // the provider's first calls; then the provider.
    let peers = match &kube {
        Some((client, _)) => ipamd::k8s::peers::prime(client).await,
        None => None,
    };
    let built = with_retries(
        "provider",
        &mut signal,
        factory::FactoryError::is_transient,
        async || factory::build(&provider, peers.unwrap_or(1)).await,
    )
    .await
    .map_err(|e| match e {
        factory::FactoryError::Config(m) => Fatal::config(m),
        e => Fatal::Unavailable(e.to_string()),
    })?;
    let Some(provider) = built else {
        info!("stopped before start-up finished");
        return Ok(());
    };
    // 4. The pool, restored from the journal onto what the cloud says
    // (on a node's first start, from aws-node's checkpoint); 5. the node
    // side around it.
    let journal = cli.state_dir.join("ipamd.journal");
    let checkpoint = cli
        .aws_node_checkpoint
        .clone()
        .or_else(|| ipamd::awsnode::value(&Env, "AWS_VPC_K8S_CNI_BACKING_STORE"))
        .unwrap_or_else(|| ipamd::migrate::DEFAULT_CHECKPOINT.to_string());
    if checkpoint != "off" {
        ipamd::migrate::import_on_first_start(
            std::path::Path::new(&checkpoint),
            &journal,
            &cli.cni_network_name,
        )
        .map_err(|e| Fatal::Unavailable(e.to_string()))?;
    }
    let started = with_retries(
        "pool restore",
        &mut signal,
        StartError::is_transient,
        async || {
            let node = if configure_host {
                let host = ipamd::hostnet::HostNet::with_sys_net(&cli.host_proc_sys_net)
                    .map_err(|e| StartError::Node(e.to_string()))?;
                NodeTracker::new(Box::new(host))
            } else {
                NodeTracker::nothing()
            };
            Ipam::start_with(
                provider.clone(),
                settings.clone(),
                JournalAt::File(&journal),
                node,
            )
            .await
        },
    )
    .await
    .map_err(|e| match e {
        StartError::Config(m) => Fatal::config(m),
        e => Fatal::Unavailable(e.to_string()),
    })?;
    let Some(ipam) = started else {
        info!("stopped before start-up finished");
        return Ok(());
    };
    // 6. The servers. The ADD fast path is bound before the gRPC socket,
    // so a client that reaches the gRPC socket finds the fast path too.
    let fast_socket = ipamd_api::fast::path(&cli.socket);
    let fast = rpc::bind_socket(&fast_socket).map_err(|e| {
        Fatal::Unavailable(format!("cannot listen on {}: {e}", fast_socket.display()))
    })?;
    let listener = match rpc::bind_socket(&cli.socket) {
        Ok(l) => l,
        Err(e) => {
            std::fs::remove_file(&fast_socket).ok();
            return Err(Fatal::Unavailable(format!(
                "cannot listen on {}: {e}",
                cli.socket.display()
            )));
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
                std::fs::remove_file(&cli.socket).ok();
                std::fs::remove_file(&fast_socket).ok();
                return Err(Fatal::Unavailable(format!("introspection on {addr}: {e}")));
            }
        }
    }
    if let Some(addr) = metrics {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let bound = l.local_addr().map_or(addr, |a| a);
                info!(addr = %bound, "metrics listening");
                let (ipam, stop) = (ipam.clone(), stopped(stop_rx.clone()));
                tasks.spawn(async move {
                    if let Err(e) = ipamd::metrics::serve(ipam, l, stop).await {
                        error!(error = %e, "metrics server failed");
                    }
                });
            }
            Err(e) => {
                std::fs::remove_file(&cli.socket).ok();
                std::fs::remove_file(&fast_socket).ok();
                return Err(Fatal::Unavailable(format!("metrics on {addr}: {e}")));
            }
        }
    }
    let reconciler = tokio::spawn(ipam.clone().run(stop_rx.clone()));
    // Without a conflist to write, there is nothing to wait for.
    let (installed_tx, installed_rx) = watch::channel(cni_conf.is_none());
    if let Some(conf) = cni_conf.clone() {
        tasks.spawn(ipamd::cniconf::install_when_ready(
            ipam.clone(),
            conf,
            installed_tx,
            stop_rx.clone(),
        ));
    }
    if let Some((client, k)) = kube {
        info!(node = %k.node_name, "Kubernetes: watching this node and its pods");
        ipam.kube_status().lock().expect("lock").account_peers = peers;
        tasks.spawn(ipamd::k8s::run(
            client,
            ipam.clone(),
            k,
            installed_rx,
            stop_rx.clone(),
        ));
    }
    let server = match rpc::spawn_server(ipam.clone(), listener, fast, stop_rx.clone()) {
        Ok(s) => s,
        Err(e) => {
            std::fs::remove_file(&cli.socket).ok();
            std::fs::remove_file(&fast_socket).ok();
            return Err(Fatal::Unavailable(format!(
                "cannot start the rpc server: {e}"
            )));
        }
    };
    info!(socket = %cli.socket.display(), journal = %journal.display(), "ipamd serving; ready once the pool has an address (GET /readyz)");

    // 7. Signals and drain.
    let mut server = server;
    // A server that stops on its own (it cannot serve any more) stops ipamd:
    // pods cannot start on this node until it is restarted.
    let mut failed = None;
    tokio::select! {
        _ = signal.wait_for(|s| *s) => {}
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
    if let Some(conf) = cni_conf.filter(|c| c.uninstall_on_exit) {
        match conf.uninstall() {
            Ok(true) => {
                info!(path = %conf.path().display(), "CNI configuration removed (IPAMD_CNI_UNINSTALL_ON_EXIT)")
            }
            Ok(false) => {
                info!(path = %conf.path().display(), "CNI configuration left: it is not the one ipamd wrote")
            }
            Err(e) => {
                error!(path = %conf.path().display(), error = %e, "cannot remove the CNI configuration")
            }
        }
    }
    std::fs::remove_file(&cli.socket).ok();
    std::fs::remove_file(&fast_socket).ok();
    info!("ipamd stopped");
    match failed {
        Some(why) => Err(Fatal::ServerStopped(format!(
            "the rpc server stopped: {why}"
        ))),
        None => Ok(()),
    }
}
