//! The one place that turns ipamd's configuration into a cloud provider
//! (netavark's `get_network_driver` shape). Every provider it builds sends
//! its cloud calls through [`providers::layer::CallLayer`].
//!
//! There is no default: a node on a real cloud must never end up on the
//! simulated VPC because a setting was forgotten (it would hand pods
//! addresses no VPC routes), so `--provider` / `IPAMD_PROVIDER` is required.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use providers::layer::CallLayer;
use providers::{CloudProvider, ProviderError};
use tracing::info;
use vpc_sim::provider::Backend;
use vpc_sim::{SimClient, SimProvider, Vpc, VpcConfig};

/// Which cloud the node runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProviderKind {
    /// The simulated VPC (embedded, or a shared `vpc-sim` server): for
    /// trying ipamd out and for tests. Its addresses are routed by nothing.
    Sim,
    /// EC2, with the instance's identity from IMDSv2.
    Aws,
    /// Azure (not built yet).
    Azure,
}

/// Settings of the simulated VPC.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// A shared `vpc-sim` server; `None` runs one embedded.
    pub server: Option<String>,
    pub node_name: String,
    pub instance_type: String,
    pub attach_latency: Duration,
    /// Where the embedded VPC keeps its state.
    pub state: PathBuf,
}

/// What [`build`] needs.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub sim: SimOptions,
}

/// Why no provider could be built.
#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    /// A setting is wrong (exit 64).
    #[error("{0}")]
    Config(String),
    /// The cloud answered, or could not be reached; transient ones are
    /// worth another try.
    #[error("{0}")]
    Cloud(ProviderError),
    /// A local resource (the embedded VPC's state file) is not usable.
    #[error("{0}")]
    Unavailable(String),
}

impl FactoryError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Cloud(e) if e.is_transient())
    }
}

/// Builds the provider `cfg` names.
pub async fn build(cfg: &ProviderConfig) -> Result<Arc<dyn CloudProvider>, FactoryError> {
    match cfg.kind {
        ProviderKind::Sim => sim(&cfg.sim).await,
        ProviderKind::Aws => aws().await,
        ProviderKind::Azure => Err(FactoryError::Config(
            "provider azure is not built into this ipamd yet; use aws or sim".into(),
        )),
    }
}

async fn sim(o: &SimOptions) -> Result<Arc<dyn CloudProvider>, FactoryError> {
    let backend = match &o.server {
        Some(addr) => {
            Backend::Remote(Arc::new(SimClient::new(addr.parse().map_err(|e| {
                FactoryError::Config(format!("--sim-server {addr:?}: {e}"))
            })?)))
        }
        None => {
            if let Some(dir) = o.state.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| FactoryError::Unavailable(format!("{}: {e}", dir.display())))?;
            }
            let vpc = Vpc::open(VpcConfig {
                attach_latency: o.attach_latency,
                state_path: Some(o.state.clone()),
                ..VpcConfig::default()
            })
            .map_err(|e| FactoryError::Unavailable(format!("embedded simulated VPC: {e}")))?;
            info!("running an embedded simulated VPC: pod addresses are routed by nothing outside this host");
            Backend::Local(Arc::new(vpc))
        }
    };
    let p = SimProvider::join_with(backend, &o.node_name, &o.instance_type, CallLayer::ec2())
        .await
        .map_err(|e| match e {
            ProviderError::Invalid(_) => FactoryError::Config(e.to_string()),
            e => FactoryError::Cloud(e),
        })?;
    info!(instance = p.instance_id(), node = %o.node_name, "joined the simulated VPC");
    Ok(Arc::new(p))
}

async fn aws() -> Result<Arc<dyn CloudProvider>, FactoryError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let settings = providers::aws::AwsSettings {
        region: env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")),
        // AWS_EC2_ENDPOINT is aws-node's name for it.
        endpoint_url: env("AWS_ENDPOINT_URL_EC2")
            .or_else(|| env("AWS_EC2_ENDPOINT"))
            .or_else(|| env("AWS_ENDPOINT_URL")),
        imds_endpoint: env("AWS_EC2_METADATA_SERVICE_ENDPOINT"),
        static_credentials: None,
    };
    let p = providers::aws::AwsProvider::connect(&settings, CallLayer::ec2())
        .await
        // What IMDS or EC2 answered is not a setting of ours: 69.
        .map_err(FactoryError::Cloud)?;
    Ok(Arc::new(p))
}
