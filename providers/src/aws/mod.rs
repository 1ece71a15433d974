//! AWS: EC2 through aws-sdk-ec2, the instance's own identity from IMDSv2.
//!
//! Discipline at this boundary: a client-side token bucket per EC2 API,
//! mirroring AWS's documented buckets, so a node waits for a token rather
//! than drawing RequestLimitExceeded for the whole account; retries with
//! jittered exponential backoff on throttling, 5xx and timeouts (the SDK's
//! own retries are off, so there is one policy); filtered Describe calls
//! only; per-API call, error, throttle and latency figures.
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

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, InstanceTypeInfo, NetworkInterface, NetworkInterfaceAttachmentChanges, ResourceType,
    Tag, TagSpecification,
};
use ipnet::Ipv4Net;
use rand::Rng;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::error::{ProviderError, Result};
use crate::sim::bucket::Buckets;
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
    /// Attempts per call before giving up (first try included).
    pub max_attempts: u32,
    /// Access key and secret; `None` uses the SDK's default chain.
    pub static_credentials: Option<(String, String)>,
}

/// The instance's identity, read once from IMDS.
#[derive(Debug, Clone)]
struct Identity {
    instance_id: String,
    instance_type: String,
    zone: String,
    primary_interface_id: String,
    primary_ip: Ipv4Addr,
    subnet_id: String,
    vpc_id: String,
    vpc_cidrs: Vec<Ipv4Net>,
}

/// The node's security groups: those of the primary interface.
#[derive(Debug, Default)]
struct NodeGroups {
    /// The latest groups known (IMDS at start, then the primary interface's
    /// `groupSet` each time it is read); empty while unknown.
    current: Vec<String>,
}

impl NodeGroups {
    fn learn(&mut self, groups: &[String]) {
        if !groups.is_empty() {
            self.current = groups.to_vec();
        }
    }
}

/// What the provider remembers of an interface it has described.
#[derive(Debug, Clone)]
struct Known {
    /// The interface's own primary address, never a pod's.
    primary_ip: Ipv4Addr,
    subnet_id: String,
}

#[derive(Debug, Default, Clone, Serialize)]
struct ApiStats {
    calls: u64,
    errors: u64,
    throttles: u64,
    latency_ms_total: f64,
}

pub struct AwsProvider {
    ec2: aws_sdk_ec2::Client,
    id: Identity,
    limits: Limits,
    buckets: Mutex<Buckets>,
    stats: Mutex<BTreeMap<&'static str, ApiStats>>,
    max_attempts: u32,
    subnet_cidrs: Mutex<HashMap<String, Ipv4Net>>,
    /// Interface id -> its primary address and subnet.
    known: Mutex<HashMap<String, Known>>,
    groups: Mutex<NodeGroups>,
    /// Card-0 interfaces at the moment EC2 answered AttachmentLimitExceeded
    /// (`u32::MAX`: never): a cap learned from EC2, so a limit that is too
    /// high never turns into a create/delete loop.
    learned_max_interfaces: AtomicU32,
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

fn http_client() -> aws_sdk_ec2::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

async fn imds_get(imds: &aws_config::imds::Client, path: &str) -> Result<String> {
    imds.get(format!("/latest/meta-data/{path}"))
        .await
        .map(|v| v.as_ref().trim().to_string())
        .map_err(|e| ProviderError::Transport(format!("instance metadata {path}: {e}")))
}

fn lines(s: &str) -> impl Iterator<Item = &str> {
    s.lines().map(str::trim).filter(|l| !l.is_empty())
}

/// Maps an SDK error to what ipamd acts on.
fn map_err<E>(api: &str, e: SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &e {
        SdkError::TimeoutError(_) => ProviderError::Timeout { api: api.into() },
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            ProviderError::Timeout { api: api.into() }
        }
        SdkError::DispatchFailure(_) => ProviderError::Transport(format!(
            "{api}: {}",
            aws_sdk_ec2::error::DisplayErrorContext(&e)
        )),
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or_default().to_string();
            let msg = s.err().message().unwrap_or_default().to_string();
            let status = s.raw().status().as_u16();
            classify(api, &code, &msg, status)
        }
        _ => ProviderError::Transport(format!(
            "{api}: {}",
            aws_sdk_ec2::error::DisplayErrorContext(&e)
        )),
    }
}

/// EC2 error codes to the project's errors.
///
/// EC2's answers to a full subnet (`InsufficientFreeAddressesInSubnet`,
/// `InsufficientCidrBlocks`) do not name the subnet, so those come back with
/// an empty `subnet`, which the caller fills with the subnet's id (see
/// `in_subnet`); EC2's message text never goes there.
pub fn classify(api: &str, code: &str, msg: &str, status: u16) -> ProviderError {
    match code {
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
            ProviderError::Throttled { api: api.into() }
        }
        "InsufficientFreeAddressesInSubnet" => ProviderError::SubnetExhausted {
            subnet: String::new(),
        },
        "InsufficientCidrBlocks" => ProviderError::InsufficientCidrBlocks {
            subnet: String::new(),
        },
        "AttachmentLimitExceeded"
        | "PrivateIpAddressLimitExceeded"
        | "NetworkInterfaceLimitExceeded" => ProviderError::LimitExceeded(format!("{code}: {msg}")),
        c if c.ends_with(".NotFound") => ProviderError::NotFound(format!("{code}: {msg}")),
        _ if status >= 500 => ProviderError::Server(format!("{api}: {code} {msg}")),
        _ => ProviderError::Invalid(format!("{api}: {code}: {msg}")),
    }
}

/// Names `subnet` (a subnet id) in a full-subnet error; other errors pass.
fn in_subnet(e: ProviderError, subnet: &str) -> ProviderError {
    match e {
        ProviderError::SubnetExhausted { .. } => ProviderError::SubnetExhausted {
            subnet: subnet.to_string(),
        },
        ProviderError::InsufficientCidrBlocks { .. } => ProviderError::InsufficientCidrBlocks {
            subnet: subnet.to_string(),
        },
        e => e,
    }
}

/// The same kind of error (so retry and backoff decisions stay), its text
/// put in context by `ctx`.
fn with_context(e: ProviderError, ctx: impl Fn(&str) -> String) -> ProviderError {
    use ProviderError as E;
    match e {
        E::Throttled { api } => E::Throttled { api: ctx(&api) },
        E::Timeout { api } => E::Timeout { api: ctx(&api) },
        E::LimitExceeded(m) => E::LimitExceeded(ctx(&m)),
        E::Unsupported(m) => E::Unsupported(ctx(&m)),
        E::NotFound(m) => E::NotFound(ctx(&m)),
        E::Invalid(m) => E::Invalid(ctx(&m)),
        E::Server(m) => E::Server(ctx(&m)),
        E::Transport(m) => E::Transport(ctx(&m)),
        e @ (E::SubnetExhausted { .. } | E::InsufficientCidrBlocks { .. }) => e,
    }
}

/// The network card an attachment is on; EC2 omits it for card 0 on
/// single-card types (and emulators may omit it altogether).
fn card_of(n: &NetworkInterface) -> i32 {
    n.attachment()
        .and_then(|a| a.network_card_index())
        .unwrap_or(0)
}

/// The group ids of an interface's `groupSet`, in EC2's order.
fn groups_of(n: &NetworkInterface) -> Vec<String> {
    n.groups()
        .iter()
        .filter_map(|g| g.group_id().map(String::from))
        .collect()
}

/// Limits from one DescribeInstanceTypes answer, or `None` when it lacks
/// network figures.
///
/// `NetworkInfo.MaximumNetworkInterfaces` is the total over all network
/// cards, but interfaces are attached on the default card only (no
/// `NetworkCardIndex` in AttachNetworkInterface), so the default card's
/// `NetworkCards[].MaximumNetworkInterfaces` is the limit when cards are
/// listed (p5.48xlarge: 32 cards of 2, total 64 -> 2).
/// `Ipv4AddressesPerInterface` counts the interface's primary address.
/// Prefix delegation needs Nitro (or bare metal).
fn described_limits(it: &InstanceTypeInfo) -> Option<Limits> {
    let n = it.network_info()?;
    let default_card = n.default_network_card_index().unwrap_or(0);
    let on_card = n
        .network_cards()
        .iter()
        .find(|c| c.network_card_index().unwrap_or(0) == default_card)
        .and_then(|c| c.maximum_network_interfaces());
    let max_interfaces = on_card.or(n.maximum_network_interfaces())?;
    let ipv4 = n.ipv4_addresses_per_interface()?;
    if max_interfaces < 1 || ipv4 < 1 {
        return None;
    }
    let nitro =
        it.hypervisor().map(|h| h.as_str()) == Some("nitro") || it.bare_metal() == Some(true);
    Some(Limits {
        max_interfaces: max_interfaces as u32,
        ipv4_per_interface: ipv4 as u32,
        prefix_delegation: nitro,
    })
}

/// Conservative limits for an instance type whose limits nobody knows,
/// from the interfaces attached to it now: as many interfaces as are
/// attached on the default card (at least 1), as many addresses per
/// interface as the fullest of them holds (a prefix takes one address slot;
/// at least 2, the least any EC2 type has), no prefix delegation. Both are
/// figures EC2 has already allowed, so they never overcommit.
fn fallback_limits(attached: &[NetworkInterface]) -> Limits {
    let on_card0: Vec<&NetworkInterface> = attached.iter().filter(|n| card_of(n) == 0).collect();
    let most = on_card0
        .iter()
        .map(|n| {
            let ips = n.private_ip_addresses().len().max(1);
            (ips + n.ipv4_prefixes().len()) as u32
        })
        .max()
        .unwrap_or(0);
    Limits {
        max_interfaces: (on_card0.len() as u32).max(1),
        ipv4_per_interface: most.max(2),
        prefix_delegation: false,
    }
}

fn interface_of(n: &NetworkInterface, cidr: Ipv4Net) -> Interface {
    let primary_ip: Ipv4Addr = n
        .private_ip_address()
        .and_then(|a| a.parse().ok())
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    Interface {
        id: n.network_interface_id().unwrap_or_default().to_string(),
        mac: n.mac_address().unwrap_or_default().to_string(),
        device_index: n
            .attachment()
            .and_then(|a| a.device_index())
            .map_or(u32::MAX, |i| i as u32),
        subnet_id: n.subnet_id().unwrap_or_default().to_string(),
        subnet_cidr: cidr,
        primary_ip,
        secondary_ips: n
            .private_ip_addresses()
            .iter()
            .filter(|a| a.primary() != Some(true))
            .filter_map(|a| a.private_ip_address()?.parse().ok())
            .filter(|ip| *ip != primary_ip)
            .collect(),
        prefixes: n
            .ipv4_prefixes()
            .iter()
            .filter_map(|p| p.ipv4_prefix()?.parse().ok())
            .collect(),
        tags: n
            .tag_set()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
            .collect(),
        delete_on_termination: n.attachment().and_then(|a| a.delete_on_termination()),
    }
}

impl AwsProvider {
    /// Reads the instance's identity from IMDSv2, its limits from
    /// DescribeInstanceTypes and the built-in table (conservative limits
    /// for a type neither knows, with a warning: never an error), and the
    /// node's security groups from IMDS or else the primary interface's
    /// `groupSet`. Groups that cannot be read are not an error here; creating
    /// an interface then fails until they can be.
    pub async fn connect(s: &AwsSettings) -> Result<Self> {
        let http = http_client();
        let mut imds = aws_config::imds::Client::builder().configure(
            &aws_config::provider_config::ProviderConfig::without_region()
                .with_http_client(http.clone()),
        );
        if let Some(e) = &s.imds_endpoint {
            imds = imds
                .endpoint(e)
                .map_err(|e| ProviderError::Invalid(format!("IMDS endpoint: {e}")))?;
        }
        let imds = imds.build();
        let get = |p: &'static str| imds_get(&imds, p);
        let instance_id = get("instance-id").await?;
        let instance_type = get("instance-type").await?;
        let zone = get("placement/availability-zone").await?;
        let primary_mac = get("mac").await?;
        let base = format!("network/interfaces/macs/{primary_mac}");
        let iface = |p: &str| {
            let path = format!("{base}/{p}");
            let imds = &imds;
            async move { imds_get(imds, &path).await }
        };
        let primary_interface_id = iface("interface-id").await?;
        let subnet_id = iface("subnet-id").await?;
        let vpc_id = iface("vpc-id").await?;
        let cidrs = iface("vpc-ipv4-cidr-blocks").await?;
        let vpc_cidrs = lines(&cidrs).filter_map(|c| c.parse().ok()).collect();
        let imds_groups: Vec<String> = match iface("security-group-ids").await {
            Ok(g) => lines(&g).map(String::from).collect(),
            Err(e) => {
                warn!(error = %e, "IMDS does not give the primary interface's security groups; reading them from EC2");
                vec![]
            }
        };
        let primary_ip = get("local-ipv4")
            .await?
            .parse()
            .map_err(|e| ProviderError::Invalid(format!("local-ipv4: {e}")))?;
        let region = s.region.clone().unwrap_or_else(|| {
            zone.trim_end_matches(|c: char| c.is_ascii_alphabetic())
                .to_string()
        });
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region))
            .http_client(http)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .build(),
            );
        if let Some(u) = &s.endpoint_url {
            loader = loader.endpoint_url(u);
        }
        if let Some((key, secret)) = &s.static_credentials {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                key.clone(),
                secret.clone(),
                None,
                None,
                "static",
            ));
        }
        let ec2 = aws_sdk_ec2::Client::new(&loader.load().await);
        let mut p = Self {
            ec2,
            id: Identity {
                instance_id,
                instance_type: instance_type.clone(),
                zone,
                primary_interface_id,
                primary_ip,
                subnet_id,
                vpc_id,
                vpc_cidrs,
            },
            limits: Limits {
                max_interfaces: 0,
                ipv4_per_interface: 0,
                prefix_delegation: false,
            },
            buckets: Mutex::new(Buckets::default()),
            stats: Mutex::new(BTreeMap::new()),
            max_attempts: s.max_attempts.max(1),
            subnet_cidrs: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
            groups: Mutex::new(NodeGroups::default()),
            learned_max_interfaces: AtomicU32::new(u32::MAX),
            limits_source: "",
        };
        p.groups.lock().expect("lock").learn(&imds_groups);
        if imds_groups.is_empty() {
            match p.primary_groups().await {
                Ok(g) => info!(groups = ?g, "security groups from the primary interface"),
                Err(e) => {
                    warn!(error = %e, "no interface can be created until the node's security groups are known")
                }
            }
        }
        (p.limits, p.limits_source) = p.instance_limits(&instance_type).await;
        info!(instance = %p.id.instance_id, instance_type, limits = ?p.limits, source = p.limits_source, "AWS instance identified");
        Ok(p)
    }

    /// The instance type's limits and where they came from: the smaller of
    /// DescribeInstanceTypes (default card) and the built-in table where
    /// both know the type, else whichever does, else [`fallback_limits`].
    async fn instance_limits(&self, instance_type: &str) -> (Limits, &'static str) {
        let t = instance_type.to_string();
        let described = match self
            .call("DescribeInstanceTypes", || {
                self.ec2
                    .describe_instance_types()
                    .instance_types(t.as_str().into())
                    .send()
            })
            .await
        {
            Ok(out) => {
                let l = out.instance_types().first().and_then(described_limits);
                if l.is_none() {
                    warn!(
                        instance_type,
                        "DescribeInstanceTypes gave no network limits"
                    );
                }
                l
            }
            Err(e) => {
                warn!(instance_type, error = %e, "DescribeInstanceTypes failed");
                None
            }
        };
        let table = crate::limits::lookup(instance_type).map(|t| t.limits);
        match (described, table) {
            (Some(d), Some(t)) => {
                if (d.max_interfaces, d.ipv4_per_interface)
                    != (t.max_interfaces, t.ipv4_per_interface)
                {
                    warn!(instance_type, described = ?d, table = ?t, "DescribeInstanceTypes and the built-in table differ; using the smaller limits");
                }
                let l = Limits {
                    max_interfaces: d.max_interfaces.min(t.max_interfaces),
                    ipv4_per_interface: d.ipv4_per_interface.min(t.ipv4_per_interface),
                    prefix_delegation: d.prefix_delegation,
                };
                (l, "DescribeInstanceTypes")
            }
            (Some(d), None) => (d, "DescribeInstanceTypes"),
            (None, Some(t)) => {
                info!(instance_type, "limits from the built-in table");
                (t, "table")
            }
            (None, None) => {
                let attached = match self.attached().await {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "cannot list the attached interfaces either");
                        vec![]
                    }
                };
                let l = fallback_limits(&attached);
                warn!(
                    instance_type,
                    limits = ?l,
                    "neither DescribeInstanceTypes nor the built-in table knows this instance type; \
                     using conservative limits (the interfaces attached now on card 0, the most \
                     addresses one of them holds, no prefix delegation)"
                );
                (l, "fallback")
            }
        }
    }

    /// Where the limits in [`CloudProvider::describe_instance`] came from:
    /// "DescribeInstanceTypes", "table", or "fallback".
    pub fn limits_source(&self) -> &'static str {
        self.limits_source
    }

    /// The limits, lowered to a cap EC2 has taught by AttachmentLimitExceeded.
    fn effective_limits(&self) -> Limits {
        let mut l = self.limits;
        l.max_interfaces = l
            .max_interfaces
            .min(self.learned_max_interfaces.load(Ordering::Relaxed));
        l
    }

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

    /// The primary interface's security groups, read now from its
    /// `groupSet` (DescribeNetworkInterfaces by id). An empty set is an error.
    async fn primary_groups(&self) -> Result<Vec<String>> {
        let n = self.interface(&self.id.primary_interface_id).await?;
        let g = groups_of(&n);
        if g.is_empty() {
            return Err(ProviderError::Invalid(format!(
                "DescribeNetworkInterfaces lists no groups for {}",
                self.id.primary_interface_id
            )));
        }
        self.groups.lock().expect("lock").learn(&g);
        Ok(g)
    }

    /// The groups for a new interface. A spec naming no groups (the node's,
    /// see [`CreateInterface::security_groups`]) gets the primary
    /// interface's groups as they are now (from `attached`, a fresh answer,
    /// or else read by id), so a replaced group is followed; named groups
    /// are used as given. Never empty.
    async fn groups_for_create(
        &self,
        requested: &[String],
        attached: &[NetworkInterface],
    ) -> Result<Vec<String>> {
        if !requested.is_empty() {
            return Ok(requested.to_vec());
        }
        let fresh = attached
            .iter()
            .find(|n| n.network_interface_id() == Some(self.id.primary_interface_id.as_str()))
            .map(groups_of)
            .filter(|g| !g.is_empty());
        if let Some(g) = fresh {
            return Ok(g);
        }
        match self.primary_groups().await {
            Ok(g) => Ok(g),
            Err(e) => {
                let last = self.groups.lock().expect("lock").current.clone();
                if e.is_transient() && !last.is_empty() {
                    warn!(error = %e, groups = ?last, "cannot re-read the node's security groups; using the last known");
                    return Ok(last);
                }
                Err(with_context(e, |m| {
                    format!("security groups of the node's primary interface are unknown: {m}")
                }))
            }
        }
    }

    /// One EC2 call under the client-side bucket, with retries.
    async fn call<T, E, F, Fut>(&self, api: &'static str, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            loop {
                let wait = self
                    .buckets
                    .lock()
                    .expect("bucket lock")
                    .take_or_wait(api, tokio::time::Instant::now());
                match wait {
                    None => break,
                    Some(d) => tokio::time::sleep(d).await,
                }
            }
            let t = Instant::now();
            let r = f().await.map_err(|e| map_err(api, e));
            {
                let mut st = self.stats.lock().expect("stats lock");
                let s = st.entry(api).or_default();
                s.calls += 1;
                s.latency_ms_total += t.elapsed().as_secs_f64() * 1e3;
                match &r {
                    Err(ProviderError::Throttled { .. }) => s.throttles += 1,
                    Err(_) => s.errors += 1,
                    Ok(_) => {}
                }
            }
            match r {
                Err(e) if e.is_transient() && attempt < self.max_attempts => {
                    let cap = Duration::from_millis(200)
                        .saturating_mul(1 << (attempt - 1).min(8))
                        .min(Duration::from_secs(10));
                    let ms = cap.as_millis() as u64;
                    let delay = Duration::from_millis(rand::rng().random_range(ms / 2..=ms.max(1)));
                    debug!(api, attempt, error = %e, delay_ms = delay.as_millis() as u64, "retrying");
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
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
        let created = self
            .call("CreateNetworkInterface", || {
                let r = self
                    .ec2
                    .create_network_interface()
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

    fn api_stats(&self) -> serde_json::Value {
        serde_json::to_value(&*self.stats.lock().expect("stats lock")).unwrap_or_default()
    }
}

impl AwsProvider {
    /// Err unless one more interface fits on the default network card.
    /// Interfaces on other cards (EFA on p5, for example) have their own
    /// limits and do not count.
    fn room_for_one(&self, attached: &[NetworkInterface]) -> Result<()> {
        let on_card0 = attached.iter().filter(|n| card_of(n) == 0).count() as u32;
        let max = self.effective_limits().max_interfaces;
        if on_card0 >= max {
            // Enforced here: an emulator may allow more than EC2 does.
            return Err(ProviderError::LimitExceeded(format!(
                "instance {} ({}) already has {on_card0} of {max} network interfaces on its default network card",
                self.id.instance_id, self.id.instance_type,
            )));
        }
        Ok(())
    }

    /// AttachNetworkInterface on the default network card at its lowest
    /// free device index among `attached` (the instance's interfaces as
    /// described just before the create, which checked there is room).
    /// Returns the index and the attachment id.
    async fn attach(
        &self,
        eni: &str,
        attached: &[NetworkInterface],
    ) -> Result<(u32, Option<String>)> {
        // Device indexes are numbered per network card.
        let used: Vec<u32> = attached
            .iter()
            .filter(|n| card_of(n) == 0)
            .map(|n| {
                if n.network_interface_id() == Some(self.id.primary_interface_id.as_str()) {
                    return 0;
                }
                n.attachment()
                    .and_then(|a| a.device_index())
                    .map_or(u32::MAX, |i| i as u32)
            })
            .collect();
        let index = (1..).find(|i| !used.contains(i)).expect("a free index");
        let inst = self.id.instance_id.clone();
        let out = self
            .call("AttachNetworkInterface", || {
                self.ec2
                    .attach_network_interface()
                    .network_interface_id(eni)
                    .instance_id(inst.as_str())
                    .device_index(index as i32)
                    .send()
            })
            .await;
        match out {
            Ok(o) => Ok((index, o.attachment_id().map(String::from))),
            Err(e @ ProviderError::LimitExceeded(_)) => {
                // EC2 knows better than our figures: never try above this again.
                let now = attached.iter().filter(|n| card_of(n) == 0).count() as u32;
                self.learned_max_interfaces
                    .fetch_min(now.max(1), Ordering::Relaxed);
                warn!(interfaces = now, error = %e, "EC2 refused one more interface; lowering the interface limit to what is attached");
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// ModifyNetworkInterfaceAttribute DeleteOnTermination=true, so the
    /// interface goes with the instance. Transient errors are retried by
    /// `call`; whatever remains is the caller's to act on.
    async fn set_delete_on_termination(&self, eni: &str, attachment: Option<String>) -> Result<()> {
        let att = match attachment {
            Some(a) => a,
            // An answer without the attachment id: read it back.
            None => self
                .interface(eni)
                .await?
                .attachment()
                .and_then(|a| a.attachment_id())
                .map(String::from)
                .ok_or_else(|| {
                    ProviderError::Server(format!(
                        "{eni} shows no attachment after AttachNetworkInterface"
                    ))
                })?,
        };
        self.call("ModifyNetworkInterfaceAttribute", || {
            self.ec2
                .modify_network_interface_attribute()
                .network_interface_id(eni)
                .attachment(
                    NetworkInterfaceAttachmentChanges::builder()
                        .attachment_id(att.as_str())
                        .delete_on_termination(true)
                        .build(),
                )
                .send()
        })
        .await
        .map(drop)
    }

    /// Undoes a create whose `step` failed with `cause`: detaches (waiting
    /// as `detach_interface` does; nothing to do if it never attached) and
    /// deletes the interface. Returns the error to report, of `cause`'s
    /// kind, naming the step, the cause and how the rollback went. If the
    /// rollback fails, the interface carries our tags, so leaked-interface GC
    /// deletes it once it is detached.
    async fn roll_back(&self, eni: &str, step: &str, cause: ProviderError) -> ProviderError {
        let undone = match self.detach_interface(eni).await {
            Ok(()) => self.delete_interface(eni).await,
            Err(e) => Err(e),
        };
        let outcome = match &undone {
            Ok(()) => "the interface was detached and deleted".to_string(),
            Err(d) => {
                warn!(interface = eni, error = %d, "could not roll back a half-created interface");
                format!("rolling the interface back failed too: {d}")
            }
        };
        warn!(interface = eni, step, error = %cause, "creating an interface failed; rolled back");
        with_context(cause, |m| {
            format!("creating interface {eni}: {step} failed: {m}; {outcome}")
        })
    }
}
