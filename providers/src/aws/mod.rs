//! AWS: EC2 through aws-sdk-ec2, the instance's own identity from IMDSv2.
//!
//! Discipline at this boundary: a client-side token bucket per EC2 API,
//! mirroring AWS's documented buckets, so a node waits for a token rather
//! than drawing RequestLimitExceeded for the whole account; retries with
//! jittered exponential backoff on throttling, 5xx and timeouts (the SDK's
//! own retries are off, so there is one policy); filtered Describe calls
//! only; per-API call, error, throttle and latency figures.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, NetworkInterface, NetworkInterfaceAttachmentChanges, ResourceType, Tag,
    TagSpecification,
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
    security_groups: Vec<String>,
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
    /// Each interface's own primary address, never a pod's.
    primaries: Mutex<HashMap<String, Ipv4Addr>>,
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
pub fn classify(api: &str, code: &str, msg: &str, status: u16) -> ProviderError {
    match code {
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
            ProviderError::Throttled { api: api.into() }
        }
        "InsufficientFreeAddressesInSubnet" => ProviderError::SubnetExhausted {
            subnet: msg.to_string(),
        },
        "InsufficientCidrBlocks" => ProviderError::InsufficientCidrBlocks {
            subnet: msg.to_string(),
        },
        "AttachmentLimitExceeded"
        | "PrivateIpAddressLimitExceeded"
        | "NetworkInterfaceLimitExceeded" => ProviderError::LimitExceeded(format!("{code}: {msg}")),
        c if c.ends_with(".NotFound") => ProviderError::NotFound(format!("{code}: {msg}")),
        _ if status >= 500 => ProviderError::Server(format!("{api}: {code} {msg}")),
        _ => ProviderError::Invalid(format!("{api}: {code}: {msg}")),
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
    }
}

impl AwsProvider {
    /// Reads the instance's identity from IMDSv2 and its limits from
    /// DescribeInstanceTypes (falling back to the built-in table).
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
        let groups = iface("security-group-ids").await.unwrap_or_default();
        let security_groups = lines(&groups).map(String::from).collect();
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
                security_groups,
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
            primaries: Mutex::new(HashMap::new()),
        };
        p.limits = p.instance_limits(&instance_type).await?;
        info!(instance = %p.id.instance_id, instance_type, limits = ?p.limits, "AWS instance identified");
        Ok(p)
    }

    async fn instance_limits(&self, instance_type: &str) -> Result<Limits> {
        let t = instance_type.to_string();
        let described = self
            .call("DescribeInstanceTypes", || {
                self.ec2
                    .describe_instance_types()
                    .instance_types(t.as_str().into())
                    .send()
            })
            .await;
        match described {
            Ok(out) => {
                if let Some(it) = out.instance_types().first() {
                    if let Some(n) = it.network_info() {
                        let nitro = it.hypervisor().map(|h| h.as_str()) == Some("nitro")
                            || it.bare_metal() == Some(true);
                        return Ok(Limits {
                            max_interfaces: n.maximum_network_interfaces().unwrap_or(1).max(1)
                                as u32,
                            ipv4_per_interface: n.ipv4_addresses_per_interface().unwrap_or(1).max(1)
                                as u32,
                            prefix_delegation: nitro,
                        });
                    }
                }
                warn!(
                    instance_type,
                    "DescribeInstanceTypes gave no network limits; using the built-in table"
                );
            }
            Err(e) => {
                warn!(instance_type, error = %e, "DescribeInstanceTypes failed; using the built-in table")
            }
        }
        crate::limits::lookup(instance_type)
            .map(|t| t.limits)
            .ok_or_else(|| {
                ProviderError::Invalid(format!("no limits known for instance type {instance_type}"))
            })
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
        self.primaries
            .lock()
            .expect("lock")
            .insert(i.id.clone(), i.primary_ip);
        i
    }

    async fn primary_of(&self, interface_id: &str) -> Option<Ipv4Addr> {
        if let Some(ip) = self.primaries.lock().expect("lock").get(interface_id) {
            return Some(*ip);
        }
        let n = self.interface(interface_id).await.ok()?;
        Some(self.to_interface(&n).await.primary_ip)
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
            security_groups: self.id.security_groups.clone(),
            limits: self.limits,
        })
    }

    async fn describe_interfaces(&self) -> Result<Vec<Interface>> {
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
        let mut v = vec![];
        for n in out.network_interfaces() {
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
            .await?;
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

    async fn create_interface(&self, spec: &CreateInterface) -> Result<Interface> {
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
                    .set_groups(
                        (!spec.security_groups.is_empty()).then(|| spec.security_groups.clone()),
                    )
                    .tag_specifications(tag_spec.clone());
                match spec.initial {
                    AssignRequest::Ips(0) | AssignRequest::Prefixes(0) => r,
                    AssignRequest::Ips(n) => r.secondary_private_ip_address_count(n as i32),
                    AssignRequest::Prefixes(n) => r.ipv4_prefix_count(n as i32),
                }
                .send()
            })
            .await
            .map_err(|e| match e {
                ProviderError::SubnetExhausted { .. } => ProviderError::SubnetExhausted {
                    subnet: spec.subnet_id.clone(),
                },
                ProviderError::InsufficientCidrBlocks { .. } => {
                    ProviderError::InsufficientCidrBlocks {
                        subnet: spec.subnet_id.clone(),
                    }
                }
                e => e,
            })?;
        let n = created
            .network_interface()
            .ok_or_else(|| {
                ProviderError::Server("CreateNetworkInterface returned no interface".into())
            })?
            .clone();
        let eni = n.network_interface_id().unwrap_or_default().to_string();
        match self.attach(&eni).await {
            Ok(index) => {
                let mut i = self.to_interface(&n).await;
                i.device_index = index;
                Ok(i)
            }
            Err(e) => {
                // Never leave a created, unattached interface behind; if the
                // delete fails too, leaked-interface GC finds it by its tags.
                if let Err(d) = self.delete_interface(&eni).await {
                    warn!(interface = %eni, error = %d, "could not delete an interface whose attach failed");
                }
                Err(e)
            }
        }
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
    /// AttachNetworkInterface at the lowest free device index, then
    /// DeleteOnTermination so the interface goes with the instance.
    async fn attach(&self, eni: &str) -> Result<u32> {
        let used: Vec<u32> = self
            .describe_interfaces()
            .await?
            .iter()
            .map(|i| i.device_index)
            .collect();
        if used.len() as u32 >= self.limits.max_interfaces {
            // Enforced here: an emulator may allow more than EC2 does.
            return Err(ProviderError::LimitExceeded(format!(
                "instance {} ({}) already has {} of {} network interfaces",
                self.id.instance_id,
                self.id.instance_type,
                used.len(),
                self.limits.max_interfaces
            )));
        }
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
            .await?;
        if let Some(att) = out.attachment_id() {
            let att = att.to_string();
            let r = self
                .call("ModifyNetworkInterfaceAttribute", || {
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
                .await;
            if let Err(e) = r {
                warn!(interface = eni, error = %e, "could not set DeleteOnTermination");
            }
        }
        Ok(index)
    }
}
