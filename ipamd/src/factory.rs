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
    /// Azure: the VM's identity from IMDS, its NICs through Azure Resource
    /// Manager; credentials by workload identity or the VM's managed
    /// identity.
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

/// Settings of the Azure provider.
#[derive(Debug, Clone)]
pub struct AzureOptions {
    /// Azure Resource Manager (`--azure-arm-endpoint`).
    pub arm_endpoint: String,
    /// The Instance Metadata Service (`--azure-imds-endpoint`).
    pub imds_endpoint: String,
}

/// What [`build`] needs.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub sim: SimOptions,
    pub azure: AzureOptions,
}

/// The Azure settings that are wrong, each as one line for the
/// configuration error: endpoints that are not http(s) URLs with a host,
/// and a workload identity (`AZURE_FEDERATED_TOKEN_FILE`) without
/// `AZURE_TENANT_ID` or `AZURE_CLIENT_ID`, or whose token file cannot be
/// read. `env` reads a variable (unset and empty are the same).
pub fn check_azure(
    arm_endpoint: &str,
    imds_endpoint: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let mut bad = vec![];
    for (flag, v) in [
        (
            "--azure-arm-endpoint / IPAMD_AZURE_ARM_ENDPOINT",
            arm_endpoint,
        ),
        (
            "--azure-imds-endpoint / IPAMD_AZURE_IMDS_ENDPOINT",
            imds_endpoint,
        ),
    ] {
        if let Err(e) = providers::azure::check_endpoint(v) {
            bad.push(format!("{flag} {v:?}: {e}"));
        }
    }
    let token = env("AZURE_FEDERATED_TOKEN_FILE");
    if token.is_some() || env("AZURE_FEDERATED_TOKEN").is_some() {
        for k in ["AZURE_TENANT_ID", "AZURE_CLIENT_ID"] {
            if env(k).is_none() {
                bad.push(format!(
                    "{k} is not set: workload identity (AZURE_FEDERATED_TOKEN_FILE or AZURE_FEDERATED_TOKEN) needs it"
                ));
            }
        }
        if let Some(f) = token {
            match std::fs::read_to_string(&f) {
                Err(e) => bad.push(format!(
                    "AZURE_FEDERATED_TOKEN_FILE {f:?} cannot be read: {e}"
                )),
                Ok(t) if t.trim().is_empty() => bad.push(format!(
                    "AZURE_FEDERATED_TOKEN_FILE {f:?} is empty: it should hold the service account's token"
                )),
                Ok(_) => {}
            }
        }
        if let Some(h) = env("AZURE_AUTHORITY_HOST") {
            if let Err(e) = providers::azure::check_endpoint(&h) {
                bad.push(format!("AZURE_AUTHORITY_HOST {h:?}: {e}"));
            }
        }
    }
    bad
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

/// Builds the provider `cfg` names, its client-side buckets already the
/// share of the account of one node in `peers` (the cluster's node count,
/// see [`providers::bucket::Buckets`]; 1: alone) for its first calls.
pub async fn build(
    cfg: &ProviderConfig,
    peers: u32,
) -> Result<Arc<dyn CloudProvider>, FactoryError> {
    let shared = |layer: CallLayer| {
        layer.set_peers(peers);
        layer
    };
    match cfg.kind {
        ProviderKind::Sim => sim(&cfg.sim, shared(CallLayer::ec2())).await,
        ProviderKind::Aws => aws(shared(CallLayer::ec2())).await,
        ProviderKind::Azure => azure(&cfg.azure, shared(CallLayer::arm())).await,
    }
}

/// The identity the environment names: workload identity when
/// `AZURE_FEDERATED_TOKEN_FILE` or `AZURE_FEDERATED_TOKEN` is set (as AKS's
/// workload identity webhook sets them, with `AZURE_TENANT_ID`,
/// `AZURE_CLIENT_ID` and `AZURE_AUTHORITY_HOST`), else the VM's managed
/// identity.
pub fn azure_identity_from(env: impl Fn(&str) -> Option<String>) -> providers::azure::Identity {
    use providers::azure::{FederatedToken, Identity};
    let token = env("AZURE_FEDERATED_TOKEN_FILE")
        .map(|f| FederatedToken::File(f.into()))
        .or_else(|| env("AZURE_FEDERATED_TOKEN").map(FederatedToken::Value));
    match token {
        Some(token) => Identity::Workload {
            tenant_id: env("AZURE_TENANT_ID").unwrap_or_default(),
            client_id: env("AZURE_CLIENT_ID").unwrap_or_default(),
            token,
            authority_host: env("AZURE_AUTHORITY_HOST")
                .unwrap_or_else(|| "https://login.microsoftonline.com/".into()),
        },
        None => Identity::ManagedIdentity,
    }
}

async fn azure(o: &AzureOptions, layer: CallLayer) -> Result<Arc<dyn CloudProvider>, FactoryError> {
    let settings = providers::azure::AzureSettings {
        arm_endpoint: o.arm_endpoint.clone(),
        imds_endpoint: o.imds_endpoint.clone(),
        identity: azure_identity_from(|k| std::env::var(k).ok().filter(|v| !v.is_empty())),
        ..Default::default()
    };
    // The settings were checked with the rest (check_azure); what IMDS or
    // ARM answered is not a setting of ours: 69.
    let p = providers::azure::AzureProvider::connect(settings, layer)
        .await
        .map_err(FactoryError::Cloud)?;
    Ok(Arc::new(p))
}

async fn sim(o: &SimOptions, layer: CallLayer) -> Result<Arc<dyn CloudProvider>, FactoryError> {
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
    let p = SimProvider::join_with(backend, &o.node_name, &o.instance_type, layer)
        .await
        .map_err(|e| match e {
            ProviderError::Invalid(_) => FactoryError::Config(e.to_string()),
            e => FactoryError::Cloud(e),
        })?;
    info!(instance = p.instance_id(), node = %o.node_name, "joined the simulated VPC");
    Ok(Arc::new(p))
}

async fn aws(layer: CallLayer) -> Result<Arc<dyn CloudProvider>, FactoryError> {
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
    let p = providers::aws::AwsProvider::connect(&settings, layer)
        .await
        // What IMDS or EC2 answered is not a setting of ours: 69.
        .map_err(FactoryError::Cloud)?;
    Ok(Arc::new(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use providers::azure::{FederatedToken, Identity};

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| m.get(k).cloned().filter(|v| !v.is_empty())
    }

    #[test]
    fn azure_settings_are_checked_together() {
        let ok = check_azure(
            "https://management.azure.com",
            "http://169.254.169.254",
            env(&[]),
        );
        assert_eq!(ok, Vec::<String>::new());
        let bad = check_azure(
            "management.azure.com",
            "http://169.254.169.254/metadata?x=1",
            env(&[
                ("AZURE_FEDERATED_TOKEN_FILE", "/nonexistent/token"),
                ("AZURE_AUTHORITY_HOST", "login"),
            ]),
        );
        let text = bad.join("\n");
        for want in [
            "IPAMD_AZURE_ARM_ENDPOINT",
            "IPAMD_AZURE_IMDS_ENDPOINT",
            "AZURE_TENANT_ID",
            "AZURE_CLIENT_ID",
            "/nonexistent/token",
            "AZURE_AUTHORITY_HOST",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        assert_eq!(bad.len(), 6, "{text}");
    }

    #[test]
    fn the_environment_names_the_identity() {
        assert_eq!(azure_identity_from(env(&[])), Identity::ManagedIdentity);
        assert_eq!(
            azure_identity_from(env(&[
                (
                    "AZURE_FEDERATED_TOKEN_FILE",
                    "/var/run/secrets/azure/tokens/azure-identity-token"
                ),
                ("AZURE_TENANT_ID", "t"),
                ("AZURE_CLIENT_ID", "c"),
            ])),
            Identity::Workload {
                tenant_id: "t".into(),
                client_id: "c".into(),
                token: FederatedToken::File(
                    "/var/run/secrets/azure/tokens/azure-identity-token".into()
                ),
                authority_host: "https://login.microsoftonline.com/".into(),
            }
        );
    }
}
