//! A fake Azure Resource Manager, Instance Metadata Service and token
//! endpoint, backed by the simulated VPC's own model (as the LocalStack IMDS
//! emulator is backed by LocalStack): a VM is a simulated instance of an
//! Azure size, a NIC is one of its interfaces, an ip-configuration is one of
//! the interface's addresses, the virtual network is the VPC.
//!
//! What it does as ARM does (Microsoft.Network 2024-03-01 shapes):
//! * every ARM request needs `Authorization: Bearer` with a token this fake
//!   issued (401 `AuthenticationFailed` otherwise) and an `api-version`;
//! * NIC GET answers with an `ETag`; a PUT whose `If-Match` is not the NIC's
//!   etag fails with 412 `PreconditionFailed`; a PUT changes the NIC at once
//!   and answers 200 with `provisioningState: Updating` and an
//!   `Azure-AsyncOperation` URL that says `InProgress` until
//!   [`ArmConfig::operation_delay`] has passed, then `Succeeded`;
//! * ip-configurations are added by naming new ones without an address
//!   (dynamic allocation in the NIC's subnet) and removed by leaving them
//!   out; at most 256 per NIC (400 `LimitExceeded`, nothing changed); a full
//!   subnet is 400 `SubnetIsFull`; the primary one cannot be removed;
//! * reads and writes draw from the subscription's token buckets
//!   ([`providers::bucket::arm_bucket`]); an empty bucket answers 429 with
//!   `Retry-After` (whole seconds until the next token);
//! * IMDS (`/metadata/instance`, header `Metadata: true`) answers for the VM
//!   whose primary address the request comes from;
//! * tokens: managed identity (`/metadata/identity/oauth2/token`) and
//!   workload identity (`POST /{tenant}/oauth2/v2.0/token`).
//!
//! Injected faults ([`ArmFault`]) make the next matching requests throttled
//! (with a chosen `Retry-After`), lose an etag race (a concurrent writer
//! changes the NIC just before the PUT), fail with a 500, or apply a PUT
//! and then answer 500.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;

use providers::bucket::{arm_bucket, Buckets, ARM_READS, ARM_WRITES};
use providers::types::Assigned;

use crate::model::{InstanceState, InterfaceState, VpcState};
use crate::{Reply, Request, Vpc};

/// The subscription every fake resource is in.
pub const SUBSCRIPTION: &str = "00000000-0000-4000-8000-00000000a2e0";
/// The resource group of the VMs, NICs and the virtual network.
pub const RESOURCE_GROUP: &str = "vpc-sim";
/// The virtual network (the simulated VPC).
pub const VNET: &str = "vnet-sim";
/// The region.
pub const LOCATION: &str = "simregion";
/// Microsoft.Network's API version these shapes follow.
pub const API_VERSION: &str = "2024-03-01";
/// Azure's limit of ip-configurations per NIC.
pub const MAX_IP_CONFIGURATIONS: usize = 256;

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct ArmConfig {
    /// How long a PUT's operation stays `InProgress`.
    pub operation_delay: Duration,
    /// Apply the subscription's read and write buckets.
    pub throttling: bool,
    /// The VM IMDS answers for when a request comes from an address that is
    /// no VM's primary (a test talking to the fake over loopback).
    pub default_vm: Option<String>,
}

impl Default for ArmConfig {
    fn default() -> Self {
        Self {
            operation_delay: Duration::from_millis(300),
            throttling: true,
            default_vm: None,
        }
    }
}

/// A fault for the next `count` matching requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmFault {
    /// `GET` or `PUT`, or `POLL` (a GET of a long-running operation's
    /// status only); `None` matches any ARM request.
    pub method: Option<String>,
    pub kind: ArmFaultKind,
    pub count: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArmFaultKind {
    /// 429 with this `Retry-After`, whatever the buckets say.
    Throttle { retry_after_secs: u64 },
    /// Another writer changes the NIC (its etag) just before this PUT.
    EtagRace,
    /// 500 `InternalServerError`; nothing happens.
    ServerError,
    /// A PUT takes effect, then its answer is a 500 (a reply lost after
    /// the change was made: the nastiest case for a client).
    ApplyThenServerError,
}

/// What the fake has been asked, for tests and benches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ArmCounts {
    /// ARM GETs answered (operation polls included).
    pub reads: u64,
    /// NIC PUTs that changed a NIC.
    pub writes: u64,
    /// Operation status polls.
    pub polls: u64,
    /// 429 answers.
    pub throttled: u64,
    /// 412 answers.
    pub precondition_failed: u64,
    /// 401 answers.
    pub unauthorized: u64,
    /// Tokens issued.
    pub tokens: u64,
    /// IMDS answers.
    pub imds: u64,
}

#[derive(Debug, Clone)]
struct IpConfigMeta {
    name: String,
    /// `applicationSecurityGroups` as the writer gave them.
    asgs: Value,
}

#[derive(Debug)]
struct Operation {
    done_at: Instant,
}

#[derive(Debug)]
struct Inner {
    etags: HashMap<String, u64>,
    /// Names and extras of ip-configurations, per NIC and address.
    meta: HashMap<String, BTreeMap<Ipv4Addr, IpConfigMeta>>,
    ops: HashMap<String, Operation>,
    /// When each NIC's last operation is done (`Updating` until then).
    updating_until: HashMap<String, Instant>,
    buckets: Buckets,
    faults: VecDeque<ArmFault>,
    counts: ArmCounts,
    next: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct ArmFake {
    vpc: Arc<Vpc>,
    config: ArmConfig,
    inner: Mutex<Inner>,
}

/// An ARM error answer.
fn arm_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// ARM's id of a VM.
pub fn vm_id(name: &str) -> String {
    format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Compute/virtualMachines/{name}")
}

/// ARM's id of a NIC.
pub fn nic_id(name: &str) -> String {
    format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/networkInterfaces/{name}")
}

fn vnet_id() -> String {
    format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/virtualNetworks/{VNET}")
}

/// ARM's id of a subnet of the simulated VPC.
pub fn subnet_id(sim_id: &str) -> String {
    format!("{}/subnets/{sim_id}", vnet_id())
}

/// A MAC as ARM writes it (`00-0D-3A-...`).
fn arm_mac(mac: &str) -> String {
    mac.replace(':', "-").to_ascii_uppercase()
}

fn default_name(ip: Ipv4Addr) -> String {
    format!("ipconfig-{}", ip.to_string().replace('.', "-"))
}

impl ArmFake {
    /// A fake over `vpc`, whose instances of Azure sizes are the VMs.
    pub fn new(vpc: Arc<Vpc>, config: ArmConfig) -> Arc<Self> {
        Arc::new(Self {
            vpc,
            config,
            inner: Mutex::new(Inner {
                etags: HashMap::new(),
                meta: HashMap::new(),
                ops: HashMap::new(),
                updating_until: HashMap::new(),
                buckets: Buckets::with_spec(arm_bucket),
                faults: VecDeque::new(),
                counts: ArmCounts::default(),
                next: 1,
            }),
        })
    }

    /// Queues a fault.
    pub fn inject(&self, fault: ArmFault) {
        self.inner.lock().expect("lock").faults.push_back(fault);
    }

    /// What has been asked so far.
    pub fn counts(&self) -> ArmCounts {
        self.inner.lock().expect("lock").counts.clone()
    }

    /// Gives every existing ip-configuration of a VM's primary NIC these
    /// application security groups (as an operator would have set them).
    pub fn set_primary_asgs(&self, vm: &str, asgs: &[&str]) {
        let st = self.vpc.snapshot();
        let Some(inst) = st.instances.values().find(|i| i.name == vm) else {
            return;
        };
        let Some(e) = st.interfaces.get(&inst.primary_interface_id) else {
            return;
        };
        let v = Value::Array(asgs.iter().map(|a| json!({ "id": a })).collect());
        let mut inner = self.inner.lock().expect("lock");
        let m = inner.meta.entry(e.id.clone()).or_default();
        for ip in std::iter::once(e.primary_ip).chain(e.secondary_ips.iter().copied()) {
            let name = m
                .get(&ip)
                .map(|x| x.name.clone())
                .unwrap_or_else(|| primary_or_default(e, ip));
            m.insert(
                ip,
                IpConfigMeta {
                    name,
                    asgs: v.clone(),
                },
            );
        }
    }

    /// The application security groups on each of a NIC's ip-configurations,
    /// by address.
    pub fn asgs_of(&self, nic: &str) -> BTreeMap<Ipv4Addr, Value> {
        let inner = self.inner.lock().expect("lock");
        inner
            .meta
            .get(nic)
            .map(|m| m.iter().map(|(ip, x)| (*ip, x.asgs.clone())).collect())
            .unwrap_or_default()
    }

    fn issue_token(&self) -> String {
        let mut inner = self.inner.lock().expect("lock");
        inner.counts.tokens += 1;
        inner.next += 1;
        format!("fake-arm-token-{}", inner.next)
    }

    fn etag(&self, inner: &mut Inner, nic: &str) -> String {
        let n = *inner.etags.entry(nic.to_string()).or_insert(1);
        format!("W/\"{n:08x}-0000-4000-8000-000000000000\"")
    }

    /// The NIC as ARM shows it.
    fn nic_json(&self, st: &VpcState, inner: &mut Inner, e: &InterfaceState) -> Value {
        let etag = self.etag(inner, &e.id);
        let updating = inner
            .updating_until
            .get(&e.id)
            .is_some_and(|t| *t > Instant::now());
        let state = if updating { "Updating" } else { "Succeeded" };
        let meta = inner.meta.get(&e.id);
        let id = nic_id(&e.id);
        let config = |ip: Ipv4Addr, primary: bool| {
            let m = meta.and_then(|m| m.get(&ip));
            let name = m
                .map(|x| x.name.clone())
                .unwrap_or_else(|| primary_or_default(e, ip));
            let mut props = json!({
                "provisioningState": state,
                "privateIPAddress": ip.to_string(),
                "privateIPAllocationMethod": "Dynamic",
                "privateIPAddressVersion": "IPv4",
                "subnet": {"id": subnet_id(&e.subnet_id)},
                "primary": primary,
            });
            if let Some(a) = m.map(|x| &x.asgs).filter(|a| !a.is_null()) {
                props["applicationSecurityGroups"] = a.clone();
            }
            json!({
                "name": name,
                "id": format!("{id}/ipConfigurations/{name}"),
                "etag": etag,
                "type": "Microsoft.Network/networkInterfaces/ipConfigurations",
                "properties": props,
            })
        };
        let mut configs = vec![config(e.primary_ip, true)];
        configs.extend(e.secondary_ips.iter().map(|ip| config(*ip, false)));
        let vm = e
            .attachment
            .as_ref()
            .and_then(|a| st.instances.get(&a.instance_id))
            .map(|i| json!({"id": vm_id(&i.name)}));
        let primary = e.attachment.as_ref().is_some_and(|a| a.device_index == 0);
        json!({
            "name": e.id,
            "id": id,
            "etag": etag,
            "type": "Microsoft.Network/networkInterfaces",
            "location": LOCATION,
            "tags": e.tags,
            "properties": {
                "provisioningState": state,
                "resourceGuid": format!("00000000-0000-4000-8000-{:012x}", fnv(&e.id)),
                "ipConfigurations": configs,
                "macAddress": arm_mac(&e.mac),
                "primary": primary,
                "enableAcceleratedNetworking": true,
                "enableIPForwarding": false,
                "virtualMachine": vm,
                "nicType": "Standard",
            },
        })
    }

    fn vm_of_source(&self, st: &VpcState, from: SocketAddr) -> Option<InstanceState> {
        let by_ip = st.instances.values().find(|i| {
            st.interfaces
                .get(&i.primary_interface_id)
                .is_some_and(|e| std::net::IpAddr::V4(e.primary_ip) == from.ip())
        });
        by_ip
            .or_else(|| {
                let name = self.config.default_vm.as_deref()?;
                st.instances.values().find(|i| i.name == name)
            })
            .cloned()
    }

    fn imds(&self, st: &VpcState, inst: &InstanceState) -> Value {
        // The VM's NICs in device order, as the model's Describe gives them.
        let nics = st.describe_interfaces(&inst.id).unwrap_or_default();
        let interfaces: Vec<Value> = nics
            .iter()
            .map(|e| {
                let cidr = e.subnet_cidr;
                let ips: Vec<Value> = std::iter::once(e.primary_ip)
                    .chain(e.secondary_ips.iter().copied())
                    .map(|ip| json!({"privateIpAddress": ip.to_string(), "publicIpAddress": ""}))
                    .collect();
                json!({
                    "macAddress": arm_mac(&e.mac).replace('-', ""),
                    "ipv4": {
                        "ipAddress": ips,
                        "subnet": [{
                            "address": cidr.network().to_string(),
                            "prefix": cidr.prefix_len().to_string(),
                        }],
                    },
                    "ipv6": {"ipAddress": []},
                })
            })
            .collect();
        json!({
            "compute": {
                "azEnvironment": "AzurePublicCloud",
                "location": LOCATION,
                "name": inst.name,
                "osType": "Linux",
                "resourceGroupName": RESOURCE_GROUP,
                "resourceId": vm_id(&inst.name),
                "subscriptionId": SUBSCRIPTION,
                "vmId": format!("00000000-0000-4000-8000-{:012x}", fnv(&inst.id)),
                "vmSize": inst.instance_type,
                "zone": inst.zone.rsplit('-').next().unwrap_or("1"),
                "tags": "",
            },
            "network": {"interface": interfaces},
        })
    }

    /// A matching injected fault, taken.
    fn fault(&self, method: &Method, uri: &Uri) -> Option<ArmFaultKind> {
        let poll =
            method == Method::GET && uri.path().to_ascii_lowercase().contains("/operations/");
        let mut inner = self.inner.lock().expect("lock");
        let i = inner.faults.iter().position(|f| {
            f.count > 0
                && f.method.as_deref().is_none_or(|m| {
                    if m.eq_ignore_ascii_case("POLL") {
                        poll
                    } else {
                        m.eq_ignore_ascii_case(method.as_str())
                    }
                })
        })?;
        inner.faults[i].count -= 1;
        let kind = inner.faults[i].kind;
        if inner.faults[i].count == 0 {
            inner.faults.remove(i);
        }
        Some(kind)
    }

    /// Authentication, the api-version, the buckets and injected throttles
    /// and 500s; `Err` is the answer to give instead.
    fn admit(
        &self,
        method: &Method,
        headers: &HeaderMap,
        uri: &Uri,
    ) -> Result<Option<ArmFaultKind>, Box<Response>> {
        let authorized = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t.starts_with("fake-arm-token-"));
        if !authorized {
            self.inner.lock().expect("lock").counts.unauthorized += 1;
            return Err(Box::new(arm_error(
                StatusCode::UNAUTHORIZED,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing or not a bearer token this tenant issued.",
            )));
        }
        if !uri.query().unwrap_or("").contains("api-version=") {
            return Err(Box::new(arm_error(
                StatusCode::BAD_REQUEST,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )));
        }
        let fault = self.fault(method, uri);
        let throttle = |retry_after_secs: u64| {
            let mut r = arm_error(
                StatusCode::TOO_MANY_REQUESTS,
                "SubscriptionRequestsThrottled",
                format!("Number of requests for subscription '{SUBSCRIPTION}' exceeded the limit. Please try again after '{retry_after_secs}' seconds."),
            );
            r.headers_mut().insert(
                "retry-after",
                HeaderValue::from_str(&retry_after_secs.to_string()).expect("digits"),
            );
            r
        };
        let mut inner = self.inner.lock().expect("lock");
        match fault {
            Some(ArmFaultKind::Throttle { retry_after_secs }) => {
                inner.counts.throttled += 1;
                return Err(Box::new(throttle(retry_after_secs)));
            }
            Some(ArmFaultKind::ServerError) => {
                return Err(Box::new(arm_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                    "An error occurred. (injected)",
                )))
            }
            _ => {}
        }
        if self.config.throttling {
            let key = if method == Method::GET {
                ARM_READS
            } else {
                ARM_WRITES
            };
            if let Some(wait) = inner.buckets.take_or_wait(key, Instant::now()) {
                inner.counts.throttled += 1;
                return Err(Box::new(
                    throttle(wait.as_secs_f64().ceil().max(1.0) as u64),
                ));
            }
        }
        if method == Method::GET {
            inner.counts.reads += 1;
        }
        Ok(fault)
    }

    async fn handle(
        self: Arc<Self>,
        from: SocketAddr,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let path = uri.path().to_string();
        let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
        let lseg: Vec<String> = seg.iter().map(|s| lower(s)).collect();
        let l: Vec<&str> = lseg.iter().map(String::as_str).collect();
        // IMDS and the token endpoints.
        match (&method, l.as_slice()) {
            (&Method::GET, ["metadata", "instance"]) => return self.get_imds(from, &headers),
            (&Method::GET, ["metadata", "identity", "oauth2", "token"]) => {
                if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
                    return (
                        StatusCode::BAD_REQUEST,
                        "Required metadata header not specified",
                    )
                        .into_response();
                }
                let token = self.issue_token();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                return axum::Json(json!({
                    "access_token": token,
                    "expires_in": "86399",
                    "expires_on": (now + 86_399).to_string(),
                    "not_before": now.to_string(),
                    "resource": "https://management.azure.com/",
                    "token_type": "Bearer",
                }))
                .into_response();
            }
            (&Method::POST, [_tenant, "oauth2", "v2.0", "token"]) => {
                let form = String::from_utf8_lossy(&body);
                let assertion = form
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("client_assertion="))
                    .unwrap_or("");
                if assertion.is_empty() {
                    return (
                        StatusCode::BAD_REQUEST,
                        axum::Json(json!({"error": "invalid_request", "error_description": "AADSTS900144: The request body must contain the following parameter: 'client_assertion'."})),
                    )
                        .into_response();
                }
                let token = self.issue_token();
                return axum::Json(json!({
                    "token_type": "Bearer",
                    "expires_in": 3599,
                    "ext_expires_in": 3599,
                    "access_token": token,
                }))
                .into_response();
            }
            _ => {}
        }
        let fault = match self.admit(&method, &headers, &uri) {
            Ok(f) => f,
            Err(r) => return *r,
        };
        let base = format!(
            "http://{}",
            headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost")
        );
        match (&method, l.as_slice()) {
            (
                &Method::GET,
                ["subscriptions", _, "providers", "microsoft.network", "locations", _, "operations", op],
            ) => self.get_operation(op),
            (
                &Method::GET,
                ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.network", "networkinterfaces"],
            ) => self.list_nics(),
            (
                &Method::GET,
                ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.network", "networkinterfaces", _],
            ) => self.get_nic(seg[7]),
            (
                &Method::PUT,
                ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.network", "networkinterfaces", _],
            ) => self.put_nic(seg[7], &headers, &body, fault, &base).await,
            (
                &Method::GET,
                ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.network", "virtualnetworks", vnet],
            ) if *vnet == lower(VNET) => self.get_vnet(),
            (
                &Method::GET,
                ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.network", "virtualnetworks", vnet, "usages"],
            ) if *vnet == lower(VNET) => self.vnet_usages(),
            _ => arm_error(
                StatusCode::NOT_FOUND,
                "ResourceNotFound",
                format!("The resource at {path} was not found."),
            ),
        }
    }

    fn get_imds(&self, from: SocketAddr, headers: &HeaderMap) -> Response {
        if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": "Bad request. Required metadata header not specified"})),
            )
                .into_response();
        }
        let st = self.vpc.snapshot();
        let Some(inst) = self.vm_of_source(&st, from) else {
            return (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": format!("no VM has the address {}", from.ip())})),
            )
                .into_response();
        };
        self.inner.lock().expect("lock").counts.imds += 1;
        axum::Json(self.imds(&st, &inst)).into_response()
    }

    fn get_operation(&self, op: &str) -> Response {
        let mut inner = self.inner.lock().expect("lock");
        inner.counts.polls += 1;
        let Some(o) = inner.ops.get(op) else {
            return arm_error(
                StatusCode::NOT_FOUND,
                "OperationNotFound",
                format!("operation {op} not found"),
            );
        };
        let status = if Instant::now() >= o.done_at {
            "Succeeded"
        } else {
            "InProgress"
        };
        let mut r = axum::Json(json!({"status": status})).into_response();
        if status == "InProgress" {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        r
    }

    fn list_nics(&self) -> Response {
        let st = self.vpc.snapshot();
        let mut inner = self.inner.lock().expect("lock");
        let value: Vec<Value> = st
            .interfaces
            .values()
            .filter(|e| self.is_azure(&st, e))
            .map(|e| self.nic_json(&st, &mut inner, e))
            .collect();
        axum::Json(json!({ "value": value })).into_response()
    }

    /// An interface of the simulated VPC that ARM shows: one attached to an
    /// instance of an Azure size, or attached to nothing.
    fn is_azure(&self, st: &VpcState, e: &InterfaceState) -> bool {
        e.attachment.as_ref().is_none_or(|a| {
            st.instances.get(&a.instance_id).is_some_and(|i| {
                matches!(
                    providers::limits::lookup(&i.instance_type).map(|t| t.family),
                    Some(providers::limits::Family::Azure)
                )
            })
        })
    }

    fn get_nic(&self, name: &str) -> Response {
        let st = self.vpc.snapshot();
        let Some(e) = st.interfaces.get(name).filter(|e| self.is_azure(&st, e)) else {
            return arm_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("Resource {} not found.", nic_id(name)),
            );
        };
        let mut inner = self.inner.lock().expect("lock");
        let v = self.nic_json(&st, &mut inner, e);
        let etag = self.etag(&mut inner, name);
        let mut r = axum::Json(v).into_response();
        r.headers_mut()
            .insert("etag", HeaderValue::from_str(&etag).expect("ascii"));
        r
    }

    async fn put_nic(
        &self,
        name: &str,
        headers: &HeaderMap,
        body: &[u8],
        fault: Option<ArmFaultKind>,
        base: &str,
    ) -> Response {
        let st = self.vpc.snapshot();
        let Some(e) = st
            .interfaces
            .get(name)
            .filter(|e| self.is_azure(&st, e))
            .cloned()
        else {
            return arm_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!(
                    "Resource {} not found (this fake updates NICs, it does not create them).",
                    nic_id(name)
                ),
            );
        };
        {
            let mut inner = self.inner.lock().expect("lock");
            if fault == Some(ArmFaultKind::EtagRace) {
                *inner.etags.entry(name.to_string()).or_insert(1) += 1;
            }
            if let Some(want) = headers.get("if-match").and_then(|v| v.to_str().ok()) {
                let have = self.etag(&mut inner, name);
                if want != "*" && want != have {
                    inner.counts.precondition_failed += 1;
                    return arm_error(
                        StatusCode::PRECONDITION_FAILED,
                        "PreconditionFailed",
                        format!("Precondition failed: the etag {want} does not match the resource's {have}."),
                    );
                }
            }
        }
        let nic: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(err) => {
                return arm_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestContent",
                    format!("The request content was invalid and could not be deserialized: {err}"),
                )
            }
        };
        let configs = nic["properties"]["ipConfigurations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if configs.len() > MAX_IP_CONFIGURATIONS {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "LimitExceeded",
                format!(
                    "Network interface {} has {} ip-configurations; at most {MAX_IP_CONFIGURATIONS} are allowed per network interface.",
                    nic_id(name),
                    configs.len()
                ),
            );
        }
        let mut kept: BTreeMap<Ipv4Addr, IpConfigMeta> = BTreeMap::new();
        let mut new: Vec<IpConfigMeta> = vec![];
        for c in &configs {
            let cname = c["name"].as_str().unwrap_or("").to_string();
            if cname.is_empty() {
                return arm_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestFormat",
                    "Every ip-configuration needs a name.",
                );
            }
            let props = &c["properties"];
            if let Some(sub) = props["subnet"]["id"].as_str() {
                if !sub.eq_ignore_ascii_case(&subnet_id(&e.subnet_id)) {
                    return arm_error(
                        StatusCode::BAD_REQUEST,
                        "IpConfigurationsOnSameNicCannotUseDifferentSubnets",
                        format!("ip-configuration {cname} names subnet {sub}; the NIC's ip-configurations are in {} (this fake keeps one subnet per NIC).", subnet_id(&e.subnet_id)),
                    );
                }
            }
            let meta = IpConfigMeta {
                name: cname.clone(),
                asgs: props["applicationSecurityGroups"].clone(),
            };
            match props["privateIPAddress"].as_str() {
                Some(a) => {
                    let Ok(ip) = a.parse::<Ipv4Addr>() else {
                        return arm_error(
                            StatusCode::BAD_REQUEST,
                            "InvalidPrivateIPAddressFormat",
                            format!("{a} is not an IPv4 address."),
                        );
                    };
                    if ip != e.primary_ip && !e.secondary_ips.contains(&ip) {
                        return arm_error(
                            StatusCode::BAD_REQUEST,
                            "PrivateIPAddressNotInSubnet",
                            format!("{ip} is not an address of {} (this fake allocates new ip-configurations dynamically only).", nic_id(name)),
                        );
                    }
                    kept.insert(ip, meta);
                }
                None => new.push(meta),
            }
        }
        if !kept.contains_key(&e.primary_ip) {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "NicMustHavePrimaryIpConfiguration",
                format!(
                    "The primary ip-configuration ({}) of {} cannot be removed.",
                    e.primary_ip,
                    nic_id(name)
                ),
            );
        }
        let removed: Vec<Ipv4Addr> = e
            .secondary_ips
            .iter()
            .copied()
            .filter(|ip| !kept.contains_key(ip))
            .collect();
        // Added first: a full subnet changes nothing.
        let mut added = vec![];
        if !new.is_empty() {
            match self
                .vpc
                .handle(Request::Assign {
                    interface_id: name.to_string(),
                    ips: new.len() as u32,
                    prefixes: 0,
                })
                .await
            {
                Ok(Reply::Assigned(a)) => added = a.ips,
                Ok(_) => {}
                Err(providers::ProviderError::SubnetExhausted { subnet }) => {
                    return arm_error(
                        StatusCode::BAD_REQUEST,
                        "SubnetIsFull",
                        format!("Subnet {} with address prefix {} does not have enough capacity for {} IP addresses.", subnet_id(&subnet), st.subnets.get(&subnet).map(|s| s.cidr.to_string()).unwrap_or_default(), new.len()),
                    )
                }
                Err(providers::ProviderError::LimitExceeded(m)) => {
                    return arm_error(StatusCode::BAD_REQUEST, "LimitExceeded", m)
                }
                // The simulated VPC's own throttling or injected throttle.
                Err(providers::ProviderError::Throttled { .. }) => {
                    let mut r = arm_error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "SubscriptionRequestsThrottled",
                        "Number of write requests exceeded the limit. Please try again after '1' seconds.",
                    );
                    r.headers_mut()
                        .insert("retry-after", HeaderValue::from_static("1"));
                    return r;
                }
                Err(err) => {
                    return arm_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalServerError",
                        err.to_string(),
                    )
                }
            }
        }
        if !removed.is_empty() {
            if let Err(err) = self
                .vpc
                .handle(Request::Unassign {
                    interface_id: name.to_string(),
                    release: Assigned {
                        ips: removed.clone(),
                        prefixes: vec![],
                    },
                })
                .await
            {
                return arm_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                    err.to_string(),
                );
            }
        }
        let st = self.vpc.snapshot();
        let mut inner = self.inner.lock().expect("lock");
        let m = inner.meta.entry(name.to_string()).or_default();
        for ip in &removed {
            m.remove(ip);
        }
        for (ip, meta) in kept.into_iter().chain(added.into_iter().zip(new)) {
            m.insert(ip, meta);
        }
        *inner.etags.entry(name.to_string()).or_insert(1) += 1;
        inner.counts.writes += 1;
        inner.next += 1;
        let op = format!("00000000-0000-4000-8000-{:012x}", inner.next);
        let done_at = Instant::now() + self.config.operation_delay;
        inner.ops.insert(op.clone(), Operation { done_at });
        inner.updating_until.insert(name.to_string(), done_at);
        let e = st.interfaces.get(name).expect("still there").clone();
        let v = self.nic_json(&st, &mut inner, &e);
        let etag = self.etag(&mut inner, name);
        drop(inner);
        if fault == Some(ArmFaultKind::ApplyThenServerError) {
            return arm_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "An error occurred after the change was made. (injected)",
            );
        }
        let mut r = axum::Json(v).into_response();
        let h = r.headers_mut();
        h.insert(
            "azure-asyncoperation",
            HeaderValue::from_str(&format!(
                "{base}/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Network/locations/{LOCATION}/operations/{op}?api-version={API_VERSION}"
            ))
            .expect("ascii"),
        );
        h.insert("retry-after", HeaderValue::from_static("1"));
        h.insert("etag", HeaderValue::from_str(&etag).expect("ascii"));
        r
    }

    fn get_vnet(&self) -> Response {
        let st = self.vpc.snapshot();
        let subnets: Vec<Value> = st
            .subnets
            .values()
            .map(|s| {
                json!({
                    "name": s.id,
                    "id": subnet_id(&s.id),
                    "properties": {"addressPrefix": s.cidr.to_string(), "provisioningState": "Succeeded"},
                })
            })
            .collect();
        axum::Json(json!({
            "name": VNET,
            "id": vnet_id(),
            "location": LOCATION,
            "properties": {
                "addressSpace": {"addressPrefixes": [st.cidr.to_string()]},
                "subnets": subnets,
                "provisioningState": "Succeeded",
            },
        }))
        .into_response()
    }

    fn vnet_usages(&self) -> Response {
        let st = self.vpc.snapshot();
        let value: Vec<Value> = st
            .subnets
            .values()
            .map(|s| {
                let used = s.used.len() as u64;
                json!({
                    "id": subnet_id(&s.id),
                    "currentValue": used,
                    "limit": used + u64::from(s.free_count()),
                    "name": {"value": "Subnet size and usage", "localizedValue": "Subnet size and usage"},
                    "unit": "Count",
                })
            })
            .collect();
        axum::Json(json!({ "value": value })).into_response()
    }
}

fn primary_or_default(e: &InterfaceState, ip: Ipv4Addr) -> String {
    if ip == e.primary_ip {
        "ipconfig1".into()
    } else {
        default_name(ip)
    }
}

/// A stable 48-bit hash for made-up GUIDs.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) & 0xffff_ffff_ffff
}

/// Serves the fake on `listener` until the task is dropped.
pub async fn serve(fake: Arc<ArmFake>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let app = axum::Router::new()
        .fallback(
            |State(f): State<Arc<ArmFake>>,
             ConnectInfo(from): ConnectInfo<SocketAddr>,
             method: Method,
             uri: Uri,
             headers: HeaderMap,
             body: Bytes| async move { f.handle(from, method, uri, headers, body).await },
        )
        .with_state(fake);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}
