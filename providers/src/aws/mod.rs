//! AWS: EC2 through aws-sdk-ec2, the instance's own identity from IMDSv2.
//!
//! Discipline at this boundary: every EC2 call goes through the shared
//! [`crate::layer::CallLayer`] (client-side token bucket per EC2 API,
//! jittered exponential retries, per-API figures; the SDK's own retries are
//! off, so there is one policy); filtered Describe calls only.
//!
//! By concern: `identity` (IMDS, limits, security groups), `create` (an
//! interface's Create/Attach/DeleteOnTermination and rollback), `errors`
//! (EC2's codes in the project's terms), `convert` (EC2's shapes).
//!
//! Facts about the node and where they come from:
//! - security groups: the primary interface's `groupSet` (re-read by
//!   DescribeNetworkInterfaces before every CreateNetworkInterface); IMDS's
//!   `security-group-ids` is only the first guess. No interface is created
//!   without groups, since EC2 would give it the VPC's default group.
//! - limits: DescribeInstanceTypes, the default network card's
//!   `MaximumNetworkInterfaces` (interfaces are attached on card 0 only),
//!   bounded by the built-in table; for a type neither knows, conservative
//!   limits from what is attached now.
//! - a subnet that is out of addresses is named by its id, never by EC2's
//!   message text.
//! - creating an interface is Create, Attach and DeleteOnTermination; if a
//!   step fails the interface is detached and deleted, never kept half made.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, InstanceTypeInfo, NetworkInterface, NetworkInterfaceAttachmentChanges, ResourceType,
    Tag, TagSpecification,
};
use ipnet::Ipv4Net;
use tracing::{info, warn};

mod convert;
mod create;
mod errors;
mod identity;

use convert::*;
pub use errors::classify;
use errors::*;
use identity::*;

use crate::error::{ProviderError, Result};
use crate::layer::{CallLayer, Repeat};
use crate::types::*;
use crate::CloudProvider;

/// Where the provider finds EC2 and the instance metadata service.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    pub region: Option<String>,
    /// EC2 endpoint (LocalStack: http://127.0.0.1:4566).
    pub endpoint_url: Option<String>,
    /// IMDS endpoint; default http://169.254.169.254.
    pub imds_endpoint: Option<String>,
    /// Access key and secret; `None` uses the SDK's default chain.
    pub static_credentials: Option<(String, String)>,
}

/// How long an interface cap learned from AttachmentLimitExceeded holds.
pub const LEARNED_CAP_TTL: Duration = Duration::from_secs(30 * 60);

/// What the provider remembers of an interface it has described.
#[derive(Debug, Clone)]
struct Known {
    /// The interface's own primary address, never a pod's.
    primary_ip: Ipv4Addr,
    subnet_id: String,
}

pub struct AwsProvider {
    ec2: aws_sdk_ec2::Client,
    id: Identity,
    limits: Limits,
    /// Every EC2 call goes through it (see [`crate::layer`]).
    layer: CallLayer,
    subnet_cidrs: Mutex<HashMap<String, Ipv4Net>>,
    /// Interface id -> its primary address and subnet.
    known: Mutex<HashMap<String, Known>>,
    groups: Mutex<NodeGroups>,
    /// Card-0 interfaces at the moment EC2 answered AttachmentLimitExceeded
    /// (`u32::MAX`: never): a cap learned from EC2, so a limit that is too
    /// high never turns into a create/delete loop. It lapses after
    /// [`LEARNED_CAP_TTL`] (the refusal may have been a passing state, such
    /// as another agent's attach in flight), and is learned again if EC2
    /// still refuses.
    learned_max_interfaces: AtomicU32,
    /// When the cap was learned.
    learned_at: Mutex<Option<std::time::Instant>>,
    /// Where `limits` came from: "DescribeInstanceTypes", "table" or
    /// "fallback" (conservative limits for a type nobody knows).
    limits_source: &'static str,
}

impl std::fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsProvider")
            .field("instance", &self.id.instance_id)
            .finish()
    }
}

impl AwsProvider {
    /// Interfaces attached to this instance, as EC2 describes them
    /// (instance-filtered DescribeNetworkInterfaces).
    async fn attached(&self) -> Result<Vec<NetworkInterface>> {
        let id = self.id.instance_id.clone();
        let out = self
            .call("DescribeNetworkInterfaces", || {
                self.ec2
                    .describe_network_interfaces()
                    .filters(
                        Filter::builder()
                            .name("attachment.instance-id")
                            .values(id.as_str())
                            .build(),
                    )
                    .send()
            })
            .await?;
        let v = out.network_interfaces().to_vec();
        if let Some(p) = v
            .iter()
            .find(|n| n.network_interface_id() == Some(self.id.primary_interface_id.as_str()))
        {
            self.groups.lock().expect("lock").learn(&groups_of(p));
        }
        Ok(v)
    }
    /// One EC2 call through the shared layer (bucket, retries, figures).
    async fn call<T, E, F, Fut>(&self, api: &'static str, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        self.call_with(api, Repeat::IfSafe, f).await
    }

    /// [`AwsProvider::call`], saying whether a repeat is safe.
    async fn call_with<T, E, F, Fut>(&self, api: &'static str, repeat: Repeat, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        self.layer
            .call_with(api, repeat, || {
                let attempt = f();
                async move { attempt.await.map_err(|e| map_err(api, e)) }
            })
            .await
    }

    async fn subnet_cidr(&self, subnet_id: &str) -> Ipv4Net {
        if let Some(c) = self.subnet_cidrs.lock().expect("lock").get(subnet_id) {
            return *c;
        }
        let id = subnet_id.to_string();
        let out = self
            .call("DescribeSubnets", || {
                self.ec2.describe_subnets().subnet_ids(id.as_str()).send()
            })
            .await;
        let cidr = out
            .ok()
            .and_then(|o| {
                o.subnets()
                    .first()
                    .and_then(|s| s.cidr_block()?.parse().ok())
            })
            .unwrap_or_default();
        self.subnet_cidrs
            .lock()
            .expect("lock")
            .insert(subnet_id.to_string(), cidr);
        cidr
    }

    async fn interface(&self, id: &str) -> Result<NetworkInterface> {
        let id_s = id.to_string();
        let out = self
            .call("DescribeNetworkInterfaces", || {
                self.ec2
                    .describe_network_interfaces()
                    .network_interface_ids(id_s.as_str())
                    .send()
            })
            .await?;
        out.network_interfaces()
            .first()
            .cloned()
            .ok_or_else(|| ProviderError::NotFound(format!("network interface {id}")))
    }

    async fn to_interface(&self, n: &NetworkInterface) -> Interface {
        let cidr = self.subnet_cidr(n.subnet_id().unwrap_or_default()).await;
        let i = interface_of(n, cidr);
        self.known.lock().expect("lock").insert(
            i.id.clone(),
            Known {
                primary_ip: i.primary_ip,
                subnet_id: i.subnet_id.clone(),
            },
        );
        i
    }

    async fn known(&self, interface_id: &str) -> Option<Known> {
        if let Some(k) = self.known.lock().expect("lock").get(interface_id) {
            return Some(k.clone());
        }
        let n = self.interface(interface_id).await.ok()?;
        self.to_interface(&n).await;
        self.known.lock().expect("lock").get(interface_id).cloned()
    }

    async fn primary_of(&self, interface_id: &str) -> Option<Ipv4Addr> {
        self.known(interface_id).await.map(|k| k.primary_ip)
    }

    /// The subnet an interface is in, by id, for naming it in an error.
    async fn subnet_of(&self, interface_id: &str) -> String {
        if interface_id == self.id.primary_interface_id {
            return self.id.subnet_id.clone();
        }
        match self.known(interface_id).await {
            Some(k) if !k.subnet_id.is_empty() => k.subnet_id,
            _ => format!("(unknown, of interface {interface_id})"),
        }
    }
}

/// A fresh ClientToken for one idempotent EC2 request (at most 64 ASCII
/// characters, per EC2's "Ensuring idempotency").
fn client_token() -> String {
    use rand::Rng;
    format!("vpc-cni-{:032x}", rand::rng().random::<u128>())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[async_trait]
impl CloudProvider for AwsProvider {
    fn name(&self) -> &'static str {
        "aws"
    }

    async fn ensure_delete_on_termination(&self, interface_id: &str) -> Result<()> {
        self.set_delete_on_termination(interface_id, None).await
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            hot_attach: true,
            prefixes: true,
        }
    }

    async fn describe_instance(&self) -> Result<Instance> {
        Ok(Instance {
            id: self.id.instance_id.clone(),
            instance_type: self.id.instance_type.clone(),
            zone: self.id.zone.clone(),
            primary_ip: self.id.primary_ip,
            primary_interface_id: self.id.primary_interface_id.clone(),
            subnet_id: self.id.subnet_id.clone(),
            vpc_id: self.id.vpc_id.clone(),
            vpc_cidrs: self.id.vpc_cidrs.clone(),
            // Empty while unknown; create_interface re-reads them anyway.
            security_groups: self.groups.lock().expect("lock").current.clone(),
            limits: self.effective_limits(),
        })
    }

    async fn describe_interfaces(&self) -> Result<Vec<Interface>> {
        let mut v = vec![];
        for n in &self.attached().await? {
            let mut i = self.to_interface(n).await;
            // The primary interface is known by its MAC even where an
            // emulator reports no attachment index.
            if n.network_interface_id() == Some(self.id.primary_interface_id.as_str()) {
                i.device_index = 0;
            }
            v.push(i);
        }
        v.sort_by_key(|i| i.device_index);
        Ok(v)
    }

    async fn assign(&self, interface_id: &str, request: AssignRequest) -> Result<Assigned> {
        let id = interface_id.to_string();
        let out = self
            .call("AssignPrivateIpAddresses", || {
                let r = self
                    .ec2
                    .assign_private_ip_addresses()
                    .network_interface_id(id.as_str());
                match request {
                    AssignRequest::Ips(n) => r.secondary_private_ip_address_count(n as i32),
                    AssignRequest::Prefixes(n) => r.ipv4_prefix_count(n as i32),
                }
                .send()
            })
            .await;
        let out = match out {
            Ok(o) => o,
            Err(
                e @ (ProviderError::SubnetExhausted { .. }
                | ProviderError::InsufficientCidrBlocks { .. }),
            ) => return Err(in_subnet(e, &self.subnet_of(interface_id).await)),
            Err(e) => return Err(e),
        };
        // EC2 lists the addresses just assigned; LocalStack lists every
        // address of the interface, its primary among them. The primary
        // address is never a pod's.
        let primary = self.primary_of(interface_id).await;
        Ok(Assigned {
            ips: out
                .assigned_private_ip_addresses()
                .iter()
                .filter_map(|a| a.private_ip_address()?.parse().ok())
                .filter(|ip| Some(*ip) != primary)
                .collect(),
            prefixes: out
                .assigned_ipv4_prefixes()
                .iter()
                .filter_map(|p| p.ipv4_prefix()?.parse().ok())
                .collect(),
        })
    }

    async fn release(&self, interface_id: &str, release: &Assigned) -> Result<()> {
        let id = interface_id.to_string();
        let ips: Vec<String> = release.ips.iter().map(ToString::to_string).collect();
        let prefixes: Vec<String> = release.prefixes.iter().map(ToString::to_string).collect();
        self.call("UnassignPrivateIpAddresses", || {
            let mut r = self
                .ec2
                .unassign_private_ip_addresses()
                .network_interface_id(id.as_str());
            if !ips.is_empty() {
                r = r.set_private_ip_addresses(Some(ips.clone()));
            }
            if !prefixes.is_empty() {
                r = r.set_ipv4_prefixes(Some(prefixes.clone()));
            }
            r.send()
        })
        .await
        .map(drop)
    }

    /// Create, Attach (on card 0), then DeleteOnTermination. The groups are
    /// the primary interface's as they are now unless the spec names others
    /// (see `groups_for_create`); without groups nothing is created. If
    /// Attach or DeleteOnTermination fails (after retries of transient
    /// errors), the interface is detached and deleted and the error names
    /// the step and its cause.
    async fn create_interface(&self, spec: &CreateInterface) -> Result<Interface> {
        // One Describe gives the primary's groups as they are now and the
        // room left. No create that the attach would refuse: an interface
        // created and deleted again on every try is churn on the account's
        // buckets.
        let attached = self.attached().await?;
        let groups = self
            .groups_for_create(&spec.security_groups, &attached)
            .await?;
        self.room_for_one(&attached)?;
        // Every interface we create is tagged, so one that leaks is found.
        let mut tags: Vec<Tag> = spec
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        if !spec.tags.contains_key(tags::CREATED) {
            tags.push(
                Tag::builder()
                    .key(tags::CREATED)
                    .value(unix_now().to_string())
                    .build(),
            );
        }
        let tag_spec = TagSpecification::builder()
            .resource_type(ResourceType::NetworkInterface)
            .set_tags(Some(tags))
            .build();
        // The same token on every attempt: a retry after a timeout whose
        // create went through gets that interface back, not a second one.
        let token = client_token();
        let created = self
            .call_with("CreateNetworkInterface", Repeat::Always, || {
                let r = self
                    .ec2
                    .create_network_interface()
                    .client_token(token.as_str())
                    .subnet_id(spec.subnet_id.as_str())
                    .set_groups(Some(groups.clone()))
                    .tag_specifications(tag_spec.clone());
                match spec.initial {
                    AssignRequest::Ips(0) | AssignRequest::Prefixes(0) => r,
                    AssignRequest::Ips(n) => r.secondary_private_ip_address_count(n as i32),
                    AssignRequest::Prefixes(n) => r.ipv4_prefix_count(n as i32),
                }
                .send()
            })
            .await
            .map_err(|e| in_subnet(e, &spec.subnet_id))?;
        let n = created
            .network_interface()
            .ok_or_else(|| {
                ProviderError::Server("CreateNetworkInterface returned no interface".into())
            })?
            .clone();
        let eni = n.network_interface_id().unwrap_or_default().to_string();
        let (index, attachment) = match self.attach(&eni, &attached).await {
            Ok(a) => a,
            Err(e) => return Err(self.roll_back(&eni, "AttachNetworkInterface", e).await),
        };
        if let Err(e) = self.set_delete_on_termination(&eni, attachment).await {
            return Err(self
                .roll_back(
                    &eni,
                    "ModifyNetworkInterfaceAttribute (DeleteOnTermination)",
                    e,
                )
                .await);
        }
        let mut i = self.to_interface(&n).await;
        i.device_index = index;
        Ok(i)
    }

    async fn detach_interface(&self, interface_id: &str) -> Result<()> {
        let n = match self.interface(interface_id).await {
            Ok(n) => n,
            Err(ProviderError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(att) = n
            .attachment()
            .and_then(|a| a.attachment_id())
            .map(String::from)
        else {
            return Ok(());
        };
        self.call("DetachNetworkInterface", || {
            self.ec2
                .detach_network_interface()
                .attachment_id(att.as_str())
                .send()
        })
        .await?;
        // DeleteNetworkInterface fails while the detach is in progress.
        for _ in 0..60 {
            match self.interface(interface_id).await {
                Ok(n)
                    if n.attachment().is_none()
                        || n.status().map(|s| s.as_str()) == Some("available") =>
                {
                    return Ok(())
                }
                Err(ProviderError::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e),
                Ok(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        Err(ProviderError::Timeout {
            api: "DetachNetworkInterface".into(),
        })
    }

    async fn delete_interface(&self, interface_id: &str) -> Result<()> {
        let id = interface_id.to_string();
        match self
            .call("DeleteNetworkInterface", || {
                self.ec2
                    .delete_network_interface()
                    .network_interface_id(id.as_str())
                    .send()
            })
            .await
        {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list_subnets(&self) -> Result<Vec<Subnet>> {
        let (vpc, zone) = (self.id.vpc_id.clone(), self.id.zone.clone());
        let out = self
            .call("DescribeSubnets", || {
                self.ec2
                    .describe_subnets()
                    .filters(
                        Filter::builder()
                            .name("vpc-id")
                            .values(vpc.as_str())
                            .build(),
                    )
                    .filters(
                        Filter::builder()
                            .name("availability-zone")
                            .values(zone.as_str())
                            .build(),
                    )
                    .send()
            })
            .await?;
        Ok(out
            .subnets()
            .iter()
            .filter_map(|s| {
                let cidr: Ipv4Net = s.cidr_block()?.parse().ok()?;
                self.subnet_cidrs
                    .lock()
                    .expect("lock")
                    .insert(s.subnet_id()?.to_string(), cidr);
                Some(Subnet {
                    id: s.subnet_id()?.to_string(),
                    cidr,
                    zone: s.availability_zone().unwrap_or_default().to_string(),
                    free_addresses: s.available_ip_address_count().unwrap_or(0).max(0) as u32,
                    tags: s
                        .tags()
                        .iter()
                        .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                        .collect(),
                })
            })
            .collect())
    }

    async fn collect_leaked(&self, min_age: Duration) -> Result<Vec<String>> {
        let vpc = self.id.vpc_id.clone();
        let out = self
            .call("DescribeNetworkInterfaces", || {
                self.ec2
                    .describe_network_interfaces()
                    .filters(Filter::builder().name("status").values("available").build())
                    .filters(
                        Filter::builder()
                            .name(format!("tag:{}", tags::OWNER))
                            .values(tags::OWNER_VALUE)
                            .build(),
                    )
                    .filters(
                        Filter::builder()
                            .name("vpc-id")
                            .values(vpc.as_str())
                            .build(),
                    )
                    .send()
            })
            .await?;
        let now = unix_now();
        let mut deleted = vec![];
        for n in out.network_interfaces() {
            let created = n
                .tag_set()
                .iter()
                .find(|t| t.key() == Some(tags::CREATED))
                .and_then(|t| t.value()?.parse::<u64>().ok());
            let old_enough = created.is_some_and(|c| now.saturating_sub(c) >= min_age.as_secs());
            if !old_enough || n.attachment().is_some() {
                continue;
            }
            let id = n.network_interface_id().unwrap_or_default().to_string();
            match self.delete_interface(&id).await {
                Ok(()) => {
                    info!(interface = %id, "deleted a leaked interface");
                    deleted.push(id);
                }
                Err(e) => warn!(interface = %id, error = %e, "could not delete a leaked interface"),
            }
        }
        Ok(deleted)
    }

    fn current_limits(&self) -> Option<Limits> {
        Some(self.effective_limits())
    }

    fn blocker(&self) -> Option<String> {
        if self.groups.lock().expect("lock").current.is_empty() {
            return Some(format!(
                "security groups of the node's primary interface {} are unknown (neither IMDS nor DescribeNetworkInterfaces gave them); no interface is created without them",
                self.id.primary_interface_id
            ));
        }
        None
    }

    fn set_account_peers(&self, nodes: u32) {
        self.layer.set_peers(nodes);
    }

    fn set_account_growers(&self, nodes: Option<u32>) {
        self.layer.set_growers(nodes);
    }

    fn put_off(&self, change: crate::Change) -> Option<std::time::Duration> {
        self.layer.put_off(change.ec2_api())
    }

    fn api_figures(&self) -> std::collections::BTreeMap<String, crate::layer::ApiStats> {
        self.layer.stats()
    }
}
