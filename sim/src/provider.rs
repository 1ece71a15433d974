//! `CloudProvider` over the simulated VPC, in-process or remote.

use std::sync::Arc;

use async_trait::async_trait;

use providers::layer::CallLayer;

use super::{Reply, Request, SimClient, Vpc};
use providers::error::{ProviderError, Result};
use providers::types::*;
use providers::CloudProvider;

#[derive(Debug, Clone)]
pub enum Backend {
    Local(Arc<Vpc>),
    Remote(Arc<SimClient>),
}

impl Backend {
    pub async fn call(&self, req: Request) -> Result<Reply> {
        match self {
            Self::Local(v) => v.handle(req).await,
            Self::Remote(c) => c.call(&req).await,
        }
    }
}

/// One node of the simulated VPC. Its calls go through the same
/// [`CallLayer`] as EC2's (client-side buckets, retries, figures), so the
/// simulator's throttling and 5xx exercise the production retry code.
#[derive(Debug, Clone)]
pub struct SimProvider {
    backend: Backend,
    layer: Arc<CallLayer>,
    instance_id: String,
    zone: String,
    caps: Capabilities,
}

fn unexpected(r: Reply) -> ProviderError {
    ProviderError::Transport(format!(
        "simulator answered with an unexpected reply: {r:?}"
    ))
}

impl SimProvider {
    /// Finds the instance named `node_name`, launching it with
    /// `instance_type` the first time, as a node boots and reads its identity.
    /// Its calls go through [`CallLayer::ec2`].
    pub async fn join(backend: Backend, node_name: &str, instance_type: &str) -> Result<Self> {
        Self::join_with(backend, node_name, instance_type, CallLayer::ec2()).await
    }

    /// [`SimProvider::join`] with the given call layer.
    pub async fn join_with(
        backend: Backend,
        node_name: &str,
        instance_type: &str,
        layer: CallLayer,
    ) -> Result<Self> {
        let layer = Arc::new(layer);
        let launch = Request::LaunchInstance {
            name: node_name.into(),
            instance_type: instance_type.into(),
            subnet_id: None,
        };
        match layer
            .call("LaunchInstance", || backend.call(launch.clone()))
            .await?
        {
            Reply::InstanceId(instance_id) => {
                // What the simulated cloud can do follows the instance's
                // family: Azure sizes cannot hot-attach or delegate prefixes.
                let caps = match providers::limits::lookup(instance_type).map(|t| t.family) {
                    Some(providers::limits::Family::Azure) => Capabilities {
                        hot_attach: false,
                        prefixes: false,
                    },
                    _ => Capabilities {
                        hot_attach: true,
                        prefixes: true,
                    },
                };
                let mut p = Self {
                    backend,
                    layer,
                    instance_id,
                    zone: String::new(),
                    caps,
                };
                p.zone = p.describe_instance().await?.zone;
                Ok(p)
            }
            r => Err(unexpected(r)),
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// One call to the simulated cloud through the layer.
    async fn call(&self, req: Request) -> Result<Reply> {
        let api = req.api().unwrap_or("Simulator");
        self.layer
            .call(api, || self.backend.call(req.clone()))
            .await
    }
}

#[async_trait]
impl CloudProvider for SimProvider {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// From the instance metadata service, as the AWS provider learns
    /// its instance (no EC2 call, so nothing throttled when 2,000 nodes
    /// start together).
    async fn describe_instance(&self) -> Result<Instance> {
        let req = Request::InstanceMetadata {
            instance_id: self.instance_id.clone(),
        };
        match self
            .layer
            .call("IMDS_Instance", || self.backend.call(req.clone()))
            .await?
        {
            Reply::Instance(i) => Ok(*i),
            r => Err(unexpected(r)),
        }
    }

    async fn describe_interfaces(&self) -> Result<Vec<Interface>> {
        match self
            .call(Request::DescribeInterfaces {
                instance_id: self.instance_id.clone(),
            })
            .await?
        {
            Reply::Interfaces(v) => Ok(v),
            r => Err(unexpected(r)),
        }
    }

    async fn assign(&self, interface_id: &str, request: AssignRequest) -> Result<Assigned> {
        let (ips, prefixes) = match request {
            AssignRequest::Ips(n) => (n, 0),
            AssignRequest::Prefixes(n) => (0, n),
        };
        match self
            .call(Request::Assign {
                interface_id: interface_id.into(),
                ips,
                prefixes,
            })
            .await?
        {
            Reply::Assigned(a) => Ok(a),
            r => Err(unexpected(r)),
        }
    }

    async fn release(&self, interface_id: &str, release: &Assigned) -> Result<()> {
        self.call(Request::Unassign {
            interface_id: interface_id.into(),
            release: release.clone(),
        })
        .await
        .map(drop)
    }

    async fn create_interface(&self, spec: &CreateInterface) -> Result<Interface> {
        let (ips, prefixes) = match spec.initial {
            AssignRequest::Ips(n) => (n, 0),
            AssignRequest::Prefixes(n) => (0, n),
        };
        let mut iface = match self
            .call(Request::CreateInterface {
                subnet_id: spec.subnet_id.clone(),
                security_groups: spec.security_groups.clone(),
                tags: spec.tags.clone(),
                ips,
                prefixes,
            })
            .await?
        {
            Reply::Interface(i) => *i,
            r => return Err(unexpected(r)),
        };
        let attached = self
            .call(Request::AttachInterface {
                interface_id: iface.id.clone(),
                instance_id: self.instance_id.clone(),
                device_index: None,
            })
            .await;
        match attached {
            Ok(Reply::DeviceIndex(i)) => {
                iface.device_index = i;
                Ok(iface)
            }
            Ok(r) => Err(unexpected(r)),
            Err(e) => {
                // Do not leave a created, unattached interface behind. If the
                // delete fails too, the tagged interface is collected later.
                if let Err(del) = self.delete_interface(&iface.id).await {
                    tracing::warn!(interface = %iface.id, error = %del, "could not delete interface after failed attach");
                }
                Err(e)
            }
        }
    }

    async fn detach_interface(&self, interface_id: &str) -> Result<()> {
        match self
            .call(Request::DetachInterface {
                interface_id: interface_id.into(),
            })
            .await
        {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn delete_interface(&self, interface_id: &str) -> Result<()> {
        match self
            .call(Request::DeleteInterface {
                interface_id: interface_id.into(),
            })
            .await
        {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn set_account_peers(&self, nodes: u32) {
        self.layer.set_peers(nodes);
    }

    fn set_account_growers(&self, nodes: Option<u32>) {
        self.layer.set_growers(nodes);
    }

    fn put_off(&self, change: providers::Change) -> Option<std::time::Duration> {
        self.layer.put_off(change.ec2_api())
    }

    fn api_figures(&self) -> std::collections::BTreeMap<String, providers::layer::ApiStats> {
        self.layer.stats()
    }

    async fn list_subnets(&self) -> Result<Vec<Subnet>> {
        match self
            .call(Request::DescribeSubnets {
                zone: Some(self.zone.clone()),
            })
            .await?
        {
            Reply::Subnets(v) => Ok(v),
            r => Err(unexpected(r)),
        }
    }
}
