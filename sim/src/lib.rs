//! A simulated VPC that behaves like a real cloud: per-instance-type limits,
//! subnet exhaustion, unique device indexes, attach latency, EC2's per-API
//! token buckets shared by every node of the account, and injected faults.
//!
//! It runs in-process ([`Vpc`]) or as a small server on loopback or a unix
//! socket ([`server`], binary `vpc-sim`) that outlives any one ipamd and keeps
//! its state in a file. Either way [`SimProvider`] reaches it through the same
//! request type, so both paths run the same code.

pub mod azure;
pub mod client;
pub mod fabric;
pub mod model;
pub mod provider;
pub mod server;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use client::SimClient;
pub use model::VpcState;
pub use provider::SimProvider;

use providers::bucket::Buckets;
use providers::error::{ProviderError, Result};
use providers::types::{Assigned, Instance, Interface, Subnet};

/// One call to the simulated cloud: EC2's API shape, plus admin calls a test
/// harness makes (launch a node, inject a fault, read the whole state).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    DescribeInstance {
        instance_id: String,
    },
    /// What the instance metadata service tells an instance about itself
    /// (the same facts as `DescribeInstance`): IMDS is the instance's own,
    /// so it is billed to no EC2 API and never throttled.
    InstanceMetadata {
        instance_id: String,
    },
    DescribeInterfaces {
        instance_id: String,
    },
    CreateInterface {
        subnet_id: String,
        security_groups: Vec<String>,
        tags: BTreeMap<String, String>,
        ips: u32,
        prefixes: u32,
    },
    AttachInterface {
        interface_id: String,
        instance_id: String,
        device_index: Option<u32>,
    },
    DetachInterface {
        interface_id: String,
    },
    DeleteInterface {
        interface_id: String,
    },
    Assign {
        interface_id: String,
        ips: u32,
        prefixes: u32,
    },
    Unassign {
        interface_id: String,
        release: Assigned,
    },
    DescribeSubnets {
        zone: Option<String>,
    },
    // Admin calls: not throttled, not subject to faults.
    LaunchInstance {
        name: String,
        instance_type: String,
        subnet_id: Option<String>,
    },
    CreateSubnet {
        id: String,
        cidr: String,
        zone: String,
        tags: BTreeMap<String, String>,
    },
    /// Replaces an interface's tags, as an operator or another controller
    /// (aws-node) would have left them.
    SetInterfaceTags {
        interface_id: String,
        tags: BTreeMap<String, String>,
    },
    /// Attaches an interface to an instance as if the instance had been
    /// created with it (Azure: a VM's NICs are given at creation or while
    /// it is deallocated), at the lowest free device index.
    AttachAtLaunch {
        interface_id: String,
        instance_id: String,
    },
    InjectFault(Fault),
    ClearFaults,
    DumpState,
}

impl Request {
    /// The EC2 API this call is billed to, or `None` for admin calls.
    pub fn api(&self) -> Option<&'static str> {
        Some(match self {
            Self::DescribeInstance { .. } => "DescribeInstances",
            Self::DescribeInterfaces { .. } => "DescribeNetworkInterfaces",
            Self::CreateInterface { .. } => "CreateNetworkInterface",
            Self::AttachInterface { .. } => "AttachNetworkInterface",
            Self::DetachInterface { .. } => "DetachNetworkInterface",
            Self::DeleteInterface { .. } => "DeleteNetworkInterface",
            Self::Assign { .. } => "AssignPrivateIpAddresses",
            Self::Unassign { .. } => "UnassignPrivateIpAddresses",
            Self::DescribeSubnets { .. } => "DescribeSubnets",
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", content = "value", rename_all = "snake_case")]
pub enum Reply {
    Instance(Box<Instance>),
    Interfaces(Vec<Interface>),
    Interface(Box<Interface>),
    DeviceIndex(u32),
    Assigned(Assigned),
    Subnets(Vec<Subnet>),
    InstanceId(String),
    State(Box<VpcState>),
    Done,
}

/// A fault to inject into the next `count` matching calls.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fault {
    /// EC2 API name to match (e.g. "AttachNetworkInterface"); `None` matches any.
    pub api: Option<String>,
    pub kind: FaultKind,
    pub count: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// RequestLimitExceeded, whatever the bucket says.
    Throttle,
    /// A 5xx; nothing happens.
    ServerError,
    /// UnauthorizedOperation: the caller lacks the permission; nothing happens.
    PermissionDenied,
    /// The call hangs, then times out. `applied`: the operation took effect
    /// before the answer was lost, the nastiest case for a client.
    Timeout { applied: bool },
    /// Assign gives at most this many of what was asked.
    Partial { at_most: u32 },
    /// DescribeNetworkInterfaces leaves out the interface at this device
    /// index: EC2's Describe calls are eventually consistent.
    OmitDeviceIndex { device_index: u32 },
    /// Assign and Create fail with InsufficientFreeAddressesInSubnet when
    /// asked for more than this many addresses (a nearly full subnet).
    SubnetFreeAtMost { addresses: u32 },
}

/// How the simulated cloud behaves.
#[derive(Debug, Clone)]
pub struct VpcConfig {
    /// Time an AttachNetworkInterface takes before the interface is usable.
    pub attach_latency: Duration,
    /// How long a timed-out call hangs before failing.
    pub timeout_after: Duration,
    /// Apply EC2's per-API token buckets.
    pub throttling: bool,
    /// Where the state is kept, so it survives a restart of the simulator.
    pub state_path: Option<PathBuf>,
    /// The data plane in network namespaces, when there is one.
    pub fabric: Option<std::sync::Arc<dyn fabric::Fabric>>,
}

impl Default for VpcConfig {
    fn default() -> Self {
        Self {
            attach_latency: Duration::from_millis(200),
            timeout_after: Duration::from_secs(5),
            throttling: true,
            state_path: None,
            fabric: None,
        }
    }
}

#[derive(Debug, Default)]
struct Runtime {
    buckets: Buckets,
    faults: VecDeque<Fault>,
    calls: BTreeMap<String, u64>,
    throttled: BTreeMap<String, u64>,
}

/// The simulated VPC of one account.
#[derive(Debug)]
pub struct Vpc {
    config: VpcConfig,
    state: Mutex<VpcState>,
    runtime: Mutex<Runtime>,
}

impl Vpc {
    /// A fresh VPC, or the one saved at `config.state_path`.
    pub fn open(config: VpcConfig) -> std::io::Result<Self> {
        let state = match &config.state_path {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p)?;
                let s: VpcState = serde_json::from_str(&text).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", p.display()),
                    )
                })?;
                if s.version != model::STATE_VERSION {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{}: state version {} (this simulator reads {})",
                            p.display(),
                            s.version,
                            model::STATE_VERSION
                        ),
                    ));
                }
                s
            }
            _ => VpcState::default(),
        };
        Ok(Self {
            config,
            state: Mutex::new(state),
            runtime: Mutex::new(Runtime::default()),
        })
    }

    pub fn in_memory() -> Self {
        Self::open(VpcConfig::default()).expect("no file to read")
    }

    /// A VPC in memory starting from `state` (e.g. [`VpcState::with_layout`]).
    pub fn with_state(config: VpcConfig, state: VpcState) -> Self {
        Self {
            config: VpcConfig {
                state_path: None,
                ..config
            },
            state: Mutex::new(state),
            runtime: Mutex::new(Runtime::default()),
        }
    }

    pub fn with_config(config: VpcConfig) -> Self {
        Self::open(VpcConfig {
            state_path: None,
            ..config
        })
        .expect("no file to read")
    }

    /// A copy of the whole state, for assertions.
    pub fn snapshot(&self) -> VpcState {
        self.state.lock().expect("state lock").clone()
    }

    /// Calls and throttles so far, per API.
    pub fn call_counts(&self) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
        let rt = self.runtime.lock().expect("runtime lock");
        (rt.calls.clone(), rt.throttled.clone())
    }

    fn persist(&self, state: &VpcState) -> Result<()> {
        let Some(path) = &self.config.state_path else {
            return Ok(());
        };
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(state).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| ProviderError::Server(format!("simulator cannot save its state: {e}")))
    }

    /// Runs `f` on the state and saves it if `f` succeeded.
    fn mutate<T>(&self, f: impl FnOnce(&mut VpcState) -> Result<T>) -> Result<T> {
        let mut st = self.state.lock().expect("state lock");
        let out = f(&mut st)?;
        self.persist(&st)?;
        Ok(out)
    }

    /// Throttling and faults for one API call; returns a fault that applies
    /// after the operation (timeout with effect, partial).
    fn admit(&self, api: &str) -> Result<Option<FaultKind>> {
        let mut rt = self.runtime.lock().expect("runtime lock");
        *rt.calls.entry(api.to_string()).or_default() += 1;
        let fault = rt
            .faults
            .iter_mut()
            .position(|f| f.count > 0 && f.api.as_deref().is_none_or(|a| a == api))
            .map(|i| {
                rt.faults[i].count -= 1;
                let kind = rt.faults[i].kind;
                if rt.faults[i].count == 0 {
                    rt.faults.remove(i);
                }
                kind
            });
        let throttled = matches!(fault, Some(FaultKind::Throttle))
            || (self.config.throttling && !rt.buckets.try_take(api, Instant::now()));
        if throttled {
            *rt.throttled.entry(api.to_string()).or_default() += 1;
            return Err(ProviderError::throttled(api));
        }
        match fault {
            Some(FaultKind::ServerError) => Err(ProviderError::Server(format!(
                "{api}: InternalError (injected)"
            ))),
            Some(FaultKind::PermissionDenied) => Err(ProviderError::Denied(format!(
                "{api}: UnauthorizedOperation: You are not authorized to perform this operation (injected)"
            ))),
            other => Ok(other),
        }
    }

    /// Serves one call, as the cloud's endpoint would.
    pub async fn handle(&self, req: Request) -> Result<Reply> {
        let fault = match req.api() {
            Some(api) => self.admit(api)?,
            None => None,
        };
        if let Some(FaultKind::Timeout { applied: false }) = fault {
            tokio::time::sleep(self.config.timeout_after).await;
            return Err(ProviderError::Timeout {
                api: req.api().unwrap_or_default().into(),
            });
        }
        let api = req.api().unwrap_or_default();
        let partial = match fault {
            Some(FaultKind::Partial { at_most }) => Some(at_most),
            _ => None,
        };
        if let Some(FaultKind::SubnetFreeAtMost { addresses }) = fault {
            let (asked, subnet) = match &req {
                Request::Assign {
                    interface_id,
                    ips,
                    prefixes,
                } => (ips + prefixes * 16, self.subnet_of(interface_id)),
                Request::CreateInterface {
                    subnet_id,
                    ips,
                    prefixes,
                    ..
                } => (ips + prefixes * 16, Some(subnet_id.clone())),
                _ => (0, None),
            };
            if asked > addresses {
                return Err(ProviderError::SubnetExhausted {
                    subnet: subnet.unwrap_or_default(),
                });
            }
        }
        let omit = match fault {
            Some(FaultKind::OmitDeviceIndex { device_index }) => Some(device_index),
            _ => None,
        };
        let reply = self.apply(req, partial).await?;
        let reply = match (reply, omit) {
            (Reply::Interfaces(v), Some(d)) => {
                Reply::Interfaces(v.into_iter().filter(|i| i.device_index != d).collect())
            }
            (r, _) => r,
        };
        if let Some(FaultKind::Timeout { applied: true }) = fault {
            tokio::time::sleep(self.config.timeout_after).await;
            return Err(ProviderError::Timeout { api: api.into() });
        }
        Ok(reply)
    }

    fn subnet_of(&self, interface_id: &str) -> Option<String> {
        let st = self.state.lock().expect("state lock");
        st.interfaces.get(interface_id).map(|e| e.subnet_id.clone())
    }

    /// The fabric's view of an attached interface.
    fn port(&self, interface_id: &str) -> Option<fabric::Port> {
        let st = self.state.lock().expect("state lock");
        let e = st.interfaces.get(interface_id)?;
        let a = e.attachment.as_ref()?;
        Some(fabric::Port {
            interface_id: e.id.clone(),
            mac: e.mac.clone(),
            primary_ip: e.primary_ip,
            subnet: st.subnets.get(&e.subnet_id)?.cidr,
            device_index: a.device_index,
            node: st.instances.get(&a.instance_id)?.name.clone(),
            addresses: Assigned {
                ips: e.secondary_ips.clone(),
                prefixes: e.prefixes.clone(),
            },
        })
    }

    fn wire(
        &self,
        what: impl FnOnce(&dyn fabric::Fabric) -> std::result::Result<(), String>,
    ) -> Result<()> {
        match &self.config.fabric {
            Some(f) => what(f.as_ref())
                .map_err(|e| ProviderError::Server(format!("simulated VPC data plane: {e}"))),
            None => Ok(()),
        }
    }

    async fn apply(&self, req: Request, partial: Option<u32>) -> Result<Reply> {
        let reply = self.apply_state(req.clone(), partial).await?;
        match (&req, &reply) {
            (Request::LaunchInstance { .. }, Reply::InstanceId(id)) => {
                let primary = self
                    .state
                    .lock()
                    .expect("state lock")
                    .instances
                    .get(id)
                    .map(|i| i.primary_interface_id.clone());
                if let Some(port) = primary.and_then(|p| self.port(&p)) {
                    self.wire(|f| f.attach(&port))?;
                }
            }
            (Request::AttachInterface { interface_id, .. }, _)
            | (Request::AttachAtLaunch { interface_id, .. }, _) => {
                if let Some(port) = self.port(interface_id) {
                    self.wire(|f| f.attach(&port))?;
                }
            }
            (Request::Assign { interface_id, .. }, Reply::Assigned(got)) => {
                if let Some(port) = self.port(interface_id) {
                    self.wire(|f| f.assign(&port, got))?;
                }
            }
            (
                Request::Unassign {
                    interface_id,
                    release,
                },
                _,
            ) => {
                if let Some(port) = self.port(interface_id) {
                    self.wire(|f| f.unassign(&port, release))?;
                }
            }
            (Request::DetachInterface { interface_id }, _) => {
                self.wire(|f| f.detach(interface_id))?;
            }
            (Request::CreateSubnet { cidr, .. }, _) => {
                if let Ok(c) = cidr.parse() {
                    self.wire(|f| f.subnet(c))?;
                }
            }
            _ => {}
        }
        Ok(reply)
    }

    async fn apply_state(&self, req: Request, partial: Option<u32>) -> Result<Reply> {
        Ok(match req {
            Request::DescribeInstance { instance_id }
            | Request::InstanceMetadata { instance_id } => Reply::Instance(Box::new(
                self.state
                    .lock()
                    .expect("lock")
                    .describe_instance(&instance_id)?,
            )),
            Request::DescribeInterfaces { instance_id } => Reply::Interfaces(
                self.state
                    .lock()
                    .expect("lock")
                    .describe_interfaces(&instance_id)?,
            ),
            Request::CreateInterface {
                subnet_id,
                security_groups,
                tags,
                ips,
                prefixes,
            } => Reply::Interface(Box::new(self.mutate(|s| {
                s.create_interface(&subnet_id, security_groups, tags, ips, prefixes)
            })?)),
            Request::AttachInterface {
                interface_id,
                instance_id,
                device_index,
            } => {
                // Checked and recorded at once, usable only after the latency,
                // as an attachment goes "attaching" -> "attached".
                let index = self.mutate(|s| s.attach(&interface_id, &instance_id, device_index))?;
                tokio::time::sleep(self.config.attach_latency).await;
                Reply::DeviceIndex(index)
            }
            Request::DetachInterface { interface_id } => {
                self.mutate(|s| s.detach(&interface_id))?;
                Reply::Done
            }
            Request::DeleteInterface { interface_id } => {
                self.mutate(|s| s.delete_interface(&interface_id))?;
                Reply::Done
            }
            Request::Assign {
                interface_id,
                ips,
                prefixes,
            } => Reply::Assigned(self.mutate(|s| s.assign(&interface_id, ips, prefixes, partial))?),
            Request::Unassign {
                interface_id,
                release,
            } => {
                self.mutate(|s| s.unassign(&interface_id, &release))?;
                Reply::Done
            }
            Request::DescribeSubnets { zone } => Reply::Subnets(
                self.state
                    .lock()
                    .expect("lock")
                    .describe_subnets(zone.as_deref()),
            ),
            Request::LaunchInstance {
                name,
                instance_type,
                subnet_id,
            } => Reply::InstanceId(self.mutate(|s| {
                let subnet = subnet_id.unwrap_or_else(|| "subnet-0sim00000000node".into());
                s.launch_instance(&name, &instance_type, &subnet)
            })?),
            Request::CreateSubnet {
                id,
                cidr,
                zone,
                tags,
            } => {
                self.mutate(|s| {
                    let tags: Vec<(&str, &str)> =
                        tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    s.add_subnet(&id, &cidr, &zone, &tags)
                })?;
                Reply::Done
            }
            Request::SetInterfaceTags { interface_id, tags } => {
                self.mutate(|s| s.set_interface_tags(&interface_id, tags))?;
                Reply::Done
            }
            Request::AttachAtLaunch {
                interface_id,
                instance_id,
            } => Reply::DeviceIndex(
                self.mutate(|s| s.attach_at_launch(&interface_id, &instance_id))?,
            ),
            Request::InjectFault(f) => {
                self.runtime.lock().expect("lock").faults.push_back(f);
                Reply::Done
            }
            Request::ClearFaults => {
                self.runtime.lock().expect("lock").faults.clear();
                Reply::Done
            }
            Request::DumpState => Reply::State(Box::new(self.snapshot())),
        })
    }
}
