//! The Azure provider: a VM's pool kept as ip-configurations of the NICs it
//! already has (Azure attaches NICs only to a deallocated VM, so the pool
//! never attaches or creates one).
//!
//! * Identity from the Instance Metadata Service (`GET
//!   /metadata/instance?api-version=2021-02-01`, header `Metadata: true`):
//!   the VM's resource id, size, zone and NICs (by MAC, in device order).
//! * Credentials ([`Identity`]) through `azure_identity` 0.21: workload
//!   identity (its federated-credential flow, with the projected token file
//!   read again at every token refresh, since the kubelet rotates it and
//!   azure_identity's own `WorkloadIdentityCredential` reads it once), or the
//!   VM's system-assigned managed identity (azure_identity 0.21 cannot pick
//!   a user-assigned one by client id).
//! * Azure Resource Manager (Microsoft.Network 2024-03-01, the shapes of
//!   `azure_mgmt_network` 0.21's models): grow = GET the NIC, append N
//!   ip-configurations in the NIC's subnet (copying the primary
//!   configuration's application security groups), one PUT with the NIC's
//!   etag in `If-Match`, then poll `Azure-AsyncOperation` until `Succeeded`.
//!   A 412 (another writer changed the NIC) re-reads and tries again. Shrink
//!   removes the named configurations the same way. The crate's own
//!   long-running-operation future re-sends the whole PUT and sleeps 30 s
//!   between polls, so requests are sent here, once, and polled here.
//! * Every ARM request goes through [`CallLayer::arm`] (ARM's
//!   per-subscription read and write buckets; a 429's `Retry-After` is
//!   waited out).
//!
//! Errors: 429 is [`ProviderError::Throttled`] (with `Retry-After`); 401
//! and 403 [`ProviderError::Denied`]; `SubnetIsFull` (and
//! `PrivateIPAddressSpaceExhausted`)
//! [`ProviderError::SubnetExhausted`]; a NIC at 256 ip-configurations
//! [`ProviderError::LimitExceeded`], refused before any request; 5xx
//! [`ProviderError::Server`]; no answer [`ProviderError::Transport`] or
//! [`ProviderError::Timeout`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::auth::TokenCredential;
use azure_core::headers::HeaderName;
use azure_core::{HttpClient, Method, Url};
use azure_mgmt_network::package_2024_03::models;
use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::layer::{CallLayer, Repeat};
use crate::types::*;
use crate::{CloudProvider, ProviderError, Result};

/// Azure's limit of ip-configurations per NIC ("Azure subscription and
/// service limits": private IP addresses per network interface, 256).
pub const MAX_IP_CONFIGURATIONS: u32 = 256;
/// Microsoft.Network API version of every request (`azure_mgmt_network`
/// 0.21's package-2024-03).
pub const API_VERSION: &str = "2024-03-01";
/// IMDS API version.
pub const IMDS_API_VERSION: &str = "2021-02-01";
/// Prefix of the names of the ip-configurations ipamd adds. Only these are
/// the pool's: another ip-configuration of the NIC (an operator's, a load
/// balancer's) is never handed out or removed.
pub const IPCONFIG_PREFIX: &str = "vpc-cni-";
/// How long one IMDS request may take.
pub const IMDS_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Whether `endpoint` is usable as an ARM or IMDS endpoint: an absolute
/// http(s) URL with a host (as [`AzureProvider::connect`] parses it).
pub fn check_endpoint(endpoint: &str) -> std::result::Result<(), String> {
    let u = Url::parse(endpoint.trim()).map_err(|e| e.to_string())?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none_or(str::is_empty) {
        return Err("expected an http:// or https:// URL with a host".into());
    }
    // Requests go to absolute paths from the endpoint's root: a path or a
    // query given here would be dropped without a word.
    if u.path() != "/" || u.query().is_some() {
        return Err("expected the endpoint's root, without a path or query".into());
    }
    Ok(())
}

/// A failure to get a token, in terms ipamd acts on: the identity
/// platform's refusal (4xx, or no identity) is a permission error; a 5xx,
/// a bad answer or no answer is transient.
fn token_error(api: &str, e: azure_core::Error) -> ProviderError {
    use azure_core::error::ErrorKind;
    let what = format!("{api}: no Azure token: {e}");
    match e.kind() {
        ErrorKind::HttpResponse { status, .. } if (*status as u16) < 500 => {
            ProviderError::Denied(what)
        }
        ErrorKind::Credential => ProviderError::Denied(what),
        ErrorKind::HttpResponse { .. } | ErrorKind::DataConversion => ProviderError::Server(what),
        _ => ProviderError::Transport(what),
    }
}

/// Where the provider finds Azure.
#[derive(Debug, Clone)]
pub struct AzureSettings {
    /// Azure Resource Manager, e.g. `https://management.azure.com`.
    pub arm_endpoint: String,
    /// The Instance Metadata Service, e.g. `http://169.254.169.254`.
    pub imds_endpoint: String,
    /// How long one HTTP request may take.
    pub request_timeout: Duration,
    /// How long a PUT's operation may stay `InProgress`.
    pub operation_timeout: Duration,
    /// Times a PUT is re-read and re-sent after a 412.
    pub etag_retries: u32,
    /// How ipamd gets its Azure tokens.
    pub identity: Identity,
}

/// How ipamd proves who it is to Azure Resource Manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Microsoft Entra workload identity (AKS: `AZURE_TENANT_ID`,
    /// `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE`,
    /// `AZURE_AUTHORITY_HOST`).
    Workload {
        tenant_id: String,
        client_id: String,
        /// The service-account token, read at every refresh.
        token: FederatedToken,
        /// e.g. `https://login.microsoftonline.com/`.
        authority_host: String,
    },
    /// The VM's system-assigned managed identity, from IMDS's token
    /// endpoint at 169.254.169.254.
    ManagedIdentity,
}

/// Where the workload identity's assertion comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FederatedToken {
    /// A file the kubelet keeps fresh (`AZURE_FEDERATED_TOKEN_FILE`).
    File(std::path::PathBuf),
    /// A fixed token (`AZURE_FEDERATED_TOKEN`).
    Value(String),
}

impl Default for AzureSettings {
    fn default() -> Self {
        Self {
            arm_endpoint: "https://management.azure.com".into(),
            imds_endpoint: "http://169.254.169.254".into(),
            request_timeout: Duration::from_secs(20),
            operation_timeout: Duration::from_secs(300),
            etag_retries: 5,
            identity: Identity::ManagedIdentity,
        }
    }
}

/// What IMDS says of the VM (`compute` and `network` of
/// `/metadata/instance`).
#[derive(Debug, Clone, Deserialize)]
struct ImdsInstance {
    compute: ImdsCompute,
    network: ImdsNetwork,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImdsCompute {
    name: String,
    resource_id: String,
    vm_size: String,
    location: String,
    #[serde(default)]
    zone: String,
}

#[derive(Debug, Clone, Deserialize)]
struct ImdsNetwork {
    interface: Vec<ImdsInterface>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImdsInterface {
    mac_address: String,
}

/// One NIC of the VM.
#[derive(Debug, Clone)]
struct Nic {
    /// ARM resource id.
    id: String,
    name: String,
    device_index: u32,
}

/// An ARM resource id's parts: subscription, resource group, the rest.
fn parse_id(id: &str) -> Option<(String, String)> {
    let seg: Vec<&str> = id.trim_matches('/').split('/').collect();
    let sub = seg
        .iter()
        .position(|s| s.eq_ignore_ascii_case("subscriptions"))?;
    let rg = seg
        .iter()
        .position(|s| s.eq_ignore_ascii_case("resourceGroups"))?;
    Some((seg.get(sub + 1)?.to_string(), seg.get(rg + 1)?.to_string()))
}

/// A MAC as `aa:bb:cc:dd:ee:ff`, from IMDS's `000D3A...` or ARM's
/// `00-0D-3A-...`.
fn normal_mac(m: &str) -> String {
    let hex: String = m
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_ascii_lowercase();
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// An answer from ARM or IMDS.
struct Answer {
    status: u16,
    headers: azure_core::headers::Headers,
    body: bytes::Bytes,
}

impl Answer {
    fn header(&self, name: &'static str) -> Option<String> {
        self.headers
            .get_optional_string(&HeaderName::from_static(name))
    }
}

/// The ARM error body's code and message.
fn arm_error(body: &[u8]) -> (String, String) {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    let e = &v["error"];
    (
        e["code"].as_str().unwrap_or("").to_string(),
        e["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect()),
    )
}

/// An ARM or IMDS answer that is not a success, as a provider error.
fn classify(api: &str, a: &Answer) -> ProviderError {
    let (code, message) = arm_error(&a.body);
    let what = format!("{api}: {} {code}: {message}", a.status);
    match a.status {
        429 => ProviderError::Throttled {
            api: api.to_string(),
            // At most MAX_RETRY_AFTER: a wrong or hostile answer must not
            // stall the pool for hours.
            retry_after_ms: a
                .header("retry-after")
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(|s| s.min(MAX_RETRY_AFTER.as_secs()).saturating_mul(1000)),
        },
        401 | 403 => ProviderError::Denied(what),
        404 => ProviderError::NotFound(what),
        // The subnet is named by the caller, which knows the NIC's
        // (ARM's message only describes it).
        400 if code == "SubnetIsFull" || code == "PrivateIPAddressSpaceExhausted" => {
            ProviderError::SubnetExhausted {
                subnet: String::new(),
            }
        }
        // The NIC is busy with another operation: worth another try.
        409 if code == "AnotherOperationInProgress" || code == "RetryableError" => {
            ProviderError::Server(what)
        }
        400 | 409 if code.contains("LimitExceeded") || code.contains("LimitReached") => {
            ProviderError::LimitExceeded(what)
        }
        s if s >= 500 => ProviderError::Server(what),
        _ => ProviderError::Invalid(what),
    }
}

/// See the module documentation.
pub struct AzureProvider {
    http: Arc<dyn HttpClient>,
    credential: Arc<dyn TokenCredential>,
    scope: String,
    arm: Url,
    settings: AzureSettings,
    layer: CallLayer,
    vm_name: String,
    vm_id: String,
    vm_size: String,
    zone: String,
    nics: Vec<Nic>,
    vnet_id: String,
    vpc_cidrs: Vec<Ipv4Net>,
    /// Subnet CIDRs of the virtual network, by ARM id (lower case).
    subnet_cidrs: BTreeMap<String, Ipv4Net>,
    seq: AtomicU64,
    /// Per NIC, the ip-configurations that are neither its primary nor
    /// ipamd's (an operator's): they take slots of the 256.
    foreign: std::sync::Mutex<BTreeMap<String, u32>>,
}

impl std::fmt::Debug for AzureProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureProvider")
            .field("vm", &self.vm_id)
            .finish_non_exhaustive()
    }
}

/// Workload identity: azure_identity's federated-credential flow with the
/// assertion read again at every refresh; tokens are kept until 5 minutes
/// before they expire.
#[derive(Debug)]
struct Workload {
    http: Arc<dyn HttpClient>,
    authority: Url,
    tenant_id: String,
    client_id: String,
    token: FederatedToken,
    cache: tokio::sync::Mutex<Option<azure_core::auth::AccessToken>>,
}

#[async_trait]
impl TokenCredential for Workload {
    async fn get_token(
        &self,
        scopes: &[&str],
    ) -> azure_core::Result<azure_core::auth::AccessToken> {
        use azure_core::error::{Error, ErrorKind};
        let mut cache = self.cache.lock().await;
        let now = time::OffsetDateTime::now_utc();
        if let Some(t) = cache.as_ref() {
            if t.expires_on > now + time::Duration::minutes(5) {
                return Ok(t.clone());
            }
        }
        let assertion = match &self.token {
            FederatedToken::Value(v) => v.clone(),
            FederatedToken::File(f) => std::fs::read_to_string(f).map_err(|e| {
                Error::with_message(ErrorKind::Credential, || {
                    format!("federated token file {}: {e}", f.display())
                })
            })?,
        };
        let r = azure_identity::federated_credentials_flow::perform(
            self.http.clone(),
            &self.client_id,
            assertion.trim(),
            scopes,
            &self.tenant_id,
            &self.authority,
        )
        .await?;
        let expires_on = r
            .expires_on
            .unwrap_or(now + time::Duration::seconds(r.expires_in as i64));
        let t = azure_core::auth::AccessToken::new(r.access_token, expires_on);
        *cache = Some(t.clone());
        Ok(t)
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        *self.cache.lock().await = None;
        Ok(())
    }
}

fn credential(identity: &Identity, http: Arc<dyn HttpClient>) -> Result<Arc<dyn TokenCredential>> {
    match identity {
        Identity::Workload {
            tenant_id,
            client_id,
            token,
            authority_host,
        } => {
            let authority = Url::parse(authority_host).map_err(|e| {
                ProviderError::Invalid(format!("AZURE_AUTHORITY_HOST {authority_host:?}: {e}"))
            })?;
            info!(%authority, "Azure credentials: workload identity");
            Ok(Arc::new(Workload {
                http,
                authority,
                tenant_id: tenant_id.clone(),
                client_id: client_id.clone(),
                token: token.clone(),
                cache: tokio::sync::Mutex::new(None),
            }))
        }
        Identity::ManagedIdentity => {
            info!("Azure credentials: the VM's managed identity");
            Ok(Arc::new(
                azure_identity::VirtualMachineManagedIdentityCredential::new(http),
            ))
        }
    }
}

impl AzureProvider {
    /// Reads the VM from IMDS and its NICs and virtual network from ARM.
    ///
    /// Errors: endpoints that are not URLs are [`ProviderError::Invalid`];
    /// an instance of a Uniform scale set is [`ProviderError::Unsupported`];
    /// the rest is what IMDS, the identity platform or ARM answered.
    pub async fn connect(settings: AzureSettings, layer: CallLayer) -> Result<Self> {
        let arm = Url::parse(&settings.arm_endpoint).map_err(|e| {
            ProviderError::Invalid(format!(
                "Azure Resource Manager endpoint {:?}: {e}",
                settings.arm_endpoint
            ))
        })?;
        let imds = Url::parse(&settings.imds_endpoint).map_err(|e| {
            ProviderError::Invalid(format!(
                "Azure IMDS endpoint {:?}: {e}",
                settings.imds_endpoint
            ))
        })?;
        let http = azure_core::new_http_client();
        let credential = credential(&settings.identity, http.clone())?;
        let scope = arm
            .join("/.default")
            .map_err(|e| ProviderError::Invalid(format!("{arm}: {e}")))?
            .to_string();
        let mut p = Self {
            http,
            credential,
            scope,
            arm,
            settings,
            layer,
            vm_name: String::new(),
            vm_id: String::new(),
            vm_size: String::new(),
            zone: String::new(),
            nics: vec![],
            vnet_id: String::new(),
            vpc_cidrs: vec![],
            subnet_cidrs: BTreeMap::new(),
            seq: AtomicU64::new(0),
            foreign: std::sync::Mutex::new(BTreeMap::new()),
        };
        let vm = p.imds(&imds).await?;
        let (sub, rg) = parse_id(&vm.compute.resource_id).ok_or_else(|| {
            ProviderError::Invalid(format!(
                "IMDS gave a VM resource id ARM cannot have: {:?}",
                vm.compute.resource_id
            ))
        })?;
        p.vm_name = vm.compute.name.clone();
        p.vm_id = vm.compute.resource_id.clone();
        if p.vm_id.contains("/virtualMachineScaleSets/") {
            return Err(ProviderError::Unsupported(format!(
                "VM {} is an instance of a scale set in Uniform orchestration (as AKS node pools are): its NICs are the scale set's model and cannot be changed for one VM; vpc-cni's Azure provider runs on standalone VMs and Flexible scale sets",
                p.vm_id
            )));
        }
        p.vm_size = vm.compute.vm_size.clone();
        p.zone = if vm.compute.zone.is_empty() {
            vm.compute.location.clone()
        } else {
            format!("{}-{}", vm.compute.location, vm.compute.zone)
        };
        // The VM's NICs: those of its resource group whose virtualMachine
        // is this VM, in IMDS's order (the device order).
        let order: Vec<String> = vm
            .network
            .interface
            .iter()
            .map(|i| normal_mac(&i.mac_address))
            .collect();
        let listed = p
            .list_nics(&format!(
                "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/networkInterfaces"
            ))
            .await?;
        let mut nics = vec![];
        for n in listed {
            let props = n.properties.as_ref();
            let on_vm = props
                .and_then(|p| p.virtual_machine.as_ref())
                .and_then(|v| v.id.as_deref())
                .is_some_and(|id| id.eq_ignore_ascii_case(&p.vm_id));
            if !on_vm {
                continue;
            }
            let mac = normal_mac(props.and_then(|p| p.mac_address.as_deref()).unwrap_or(""));
            let primary = props.and_then(|p| p.primary).unwrap_or(false);
            let pos = order.iter().position(|m| *m == mac);
            let (Some(id), Some(name)) = (n.resource.id.clone(), n.resource.name.clone()) else {
                continue;
            };
            nics.push((
                primary,
                pos,
                Nic {
                    id,
                    name,
                    device_index: 0,
                },
            ));
        }
        // The primary NIC is device 0; the others follow in IMDS's order.
        nics.sort_by_key(|(primary, pos, _)| (!primary, pos.unwrap_or(usize::MAX)));
        p.nics = nics
            .into_iter()
            .enumerate()
            .map(|(i, (_, _, n))| Nic {
                device_index: i as u32,
                ..n
            })
            .collect();
        if p.nics.is_empty() {
            return Err(ProviderError::NotFound(format!(
                "no NIC of resource group {rg} belongs to VM {}",
                p.vm_id
            )));
        }
        let primary = p.get_nic(&p.nics[0].id).await?;
        let subnet = primary_config(&primary.0)
            .and_then(|c| c.properties.as_ref())
            .and_then(|c| c.subnet.as_ref())
            .and_then(|s| s.sub_resource.id.clone())
            .ok_or_else(|| {
                ProviderError::Invalid(format!(
                    "NIC {} has no primary ip-configuration with a subnet",
                    p.nics[0].name
                ))
            })?;
        p.vnet_id = subnet
            .rsplit_once("/subnets/")
            .map(|(v, _)| v.to_string())
            .unwrap_or_default();
        p.read_vnet().await?;
        info!(vm = %p.vm_id, size = %p.vm_size, nics = p.nics.len(), "Azure VM found");
        Ok(p)
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        headers: &[(&'static str, String)],
        api: &str,
    ) -> Result<Answer> {
        let mut req = azure_core::Request::new(url, method);
        for (k, v) in headers {
            req.insert_header(*k, v.clone());
        }
        if let Some(b) = body {
            req.insert_header("content-type", "application/json");
            req.set_body(b);
        }
        let go = async {
            let rsp = self
                .http
                .execute_request(&req)
                .await
                .map_err(|e| ProviderError::Transport(format!("{api}: {e}")))?;
            let (status, headers, body) = rsp.deconstruct();
            let body = body
                .collect()
                .await
                .map_err(|e| ProviderError::Transport(format!("{api}: {e}")))?;
            Ok(Answer {
                status: status as u16,
                headers,
                body,
            })
        };
        tokio::time::timeout(self.settings.request_timeout, go)
            .await
            .map_err(|_| ProviderError::Timeout {
                api: api.to_string(),
            })?
    }

    /// One ARM request with a bearer token, through the call layer. A 2xx
    /// or a 412 (the caller re-reads) is an answer; any other status is the
    /// error [`classify`] makes of it.
    async fn arm_call(
        &self,
        api: &str,
        method: Method,
        url: Url,
        body: Option<&Value>,
        if_match: Option<&str>,
        repeat: Repeat,
    ) -> Result<Answer> {
        let body = body.map(|b| serde_json::to_vec(b).expect("json"));
        self.layer
            .call_with(api, repeat, || {
                let (url, body) = (url.clone(), body.clone());
                async move {
                    let token = tokio::time::timeout(
                        self.settings.request_timeout,
                        self.credential.get_token(&[self.scope.as_str()]),
                    )
                    .await
                    .map_err(|_| ProviderError::Timeout {
                        api: format!("{api} (token)"),
                    })?
                    .map_err(|e| token_error(api, e))?;
                    let mut headers =
                        vec![("authorization", format!("Bearer {}", token.token.secret()))];
                    if let Some(m) = if_match {
                        headers.push(("if-match", m.to_string()));
                    }
                    let a = self.send(method, url, body, &headers, api).await?;
                    if (200..300).contains(&a.status) || a.status == 412 {
                        Ok(a)
                    } else {
                        Err(classify(api, &a))
                    }
                }
            })
            .await
    }

    /// A URL ARM handed back (`nextLink`, `Azure-AsyncOperation`,
    /// `Location`), refused unless it is on the ARM endpoint itself: the
    /// bearer token goes with every request to it.
    fn same_origin(&self, what: &str, link: &str) -> Result<Url> {
        let u =
            Url::parse(link).map_err(|e| ProviderError::Invalid(format!("{what} {link}: {e}")))?;
        if u.origin() != self.arm.origin() {
            return Err(ProviderError::Invalid(format!(
                "{what} {link} is not on the Azure Resource Manager endpoint {}; not sending the token there",
                self.arm
            )));
        }
        Ok(u)
    }

    /// A GET through [`AzureProvider::arm_call`]: safe to repeat.
    async fn arm_get(&self, api: &str, url: Url) -> Result<Answer> {
        self.arm_call(api, Method::Get, url, None, None, Repeat::IfSafe)
            .await
    }

    fn url(&self, path: &str) -> Result<Url> {
        let mut u = self
            .arm
            .join(path)
            .map_err(|e| ProviderError::Invalid(format!("{path}: {e}")))?;
        if !u.query_pairs().any(|(k, _)| k == "api-version") {
            u.query_pairs_mut().append_pair("api-version", API_VERSION);
        }
        Ok(u)
    }

    async fn imds(&self, imds: &Url) -> Result<ImdsInstance> {
        let mut url = imds
            .join("/metadata/instance")
            .map_err(|e| ProviderError::Invalid(format!("{imds}: {e}")))?;
        url.query_pairs_mut()
            .append_pair("api-version", IMDS_API_VERSION);
        let a = self
            .layer
            .call("IMDS_Instance", || {
                let url = url.clone();
                async move {
                    // IMDS is link-local and answers in milliseconds.
                    let a = tokio::time::timeout(
                        IMDS_TIMEOUT,
                        self.send(
                            Method::Get,
                            url,
                            None,
                            &[("metadata", "true".into())],
                            "IMDS_Instance",
                        ),
                    )
                    .await
                    .map_err(|_| ProviderError::Timeout {
                        api: "IMDS_Instance".into(),
                    })??;
                    if a.status == 200 {
                        Ok(a)
                    } else {
                        Err(classify("IMDS_Instance", &a))
                    }
                }
            })
            .await?;
        serde_json::from_slice(&a.body)
            .map_err(|e| ProviderError::Invalid(format!("IMDS /metadata/instance: {e}")))
    }

    async fn list_nics(&self, path: &str) -> Result<Vec<models::NetworkInterface>> {
        let mut out = vec![];
        let mut next = Some(self.url(path)?);
        while let Some(url) = next.take() {
            let a = self.arm_get("NetworkInterfaces_List", url).await?;
            let page: models::NetworkInterfaceListResult = serde_json::from_slice(&a.body)
                .map_err(|e| ProviderError::Invalid(format!("NetworkInterfaces_List: {e}")))?;
            out.extend(page.value);
            next = match page.next_link {
                Some(l) => Some(self.same_origin("nextLink", &l)?),
                None => None,
            };
        }
        Ok(out)
    }

    /// The NIC (typed and as sent) and its etag.
    async fn get_nic(&self, id: &str) -> Result<(models::NetworkInterface, Value, String)> {
        let a = self.arm_get("NetworkInterfaces_Get", self.url(id)?).await?;
        let raw: Value = serde_json::from_slice(&a.body)
            .map_err(|e| ProviderError::Invalid(format!("NetworkInterfaces_Get {id}: {e}")))?;
        let typed: models::NetworkInterface = serde_json::from_value(raw.clone())
            .map_err(|e| ProviderError::Invalid(format!("NetworkInterfaces_Get {id}: {e}")))?;
        let etag = a
            .header("etag")
            .or_else(|| typed.etag.clone())
            .unwrap_or_default();
        Ok((typed, raw, etag))
    }

    async fn read_vnet(&mut self) -> Result<()> {
        let a = self
            .arm_get("VirtualNetworks_Get", self.url(&self.vnet_id)?)
            .await?;
        let v: models::VirtualNetwork = serde_json::from_slice(&a.body)
            .map_err(|e| ProviderError::Invalid(format!("VirtualNetworks_Get: {e}")))?;
        let props = v.properties.unwrap_or_default();
        self.vpc_cidrs = props
            .address_space
            .map(|s| s.address_prefixes)
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        self.subnet_cidrs = props
            .subnets
            .iter()
            .filter_map(|s| {
                let id = s.sub_resource.id.as_deref()?.to_ascii_lowercase();
                let p = s.properties.as_ref()?;
                let prefix = p
                    .address_prefix
                    .clone()
                    .or_else(|| p.address_prefixes.first().cloned())?;
                Some((id, prefix.parse().ok()?))
            })
            .collect();
        Ok(())
    }

    fn nic(&self, name: &str) -> Result<&Nic> {
        self.nics
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ProviderError::NotFound(format!("NIC {name} is not one of this VM's")))
    }

    /// Polls a PUT's operation until it is done.
    async fn wait_operation(&self, put: &Answer, nic: &str) -> Result<()> {
        let async_op = put.header("azure-asyncoperation");
        let via_location = async_op.is_none();
        let Some(op) = async_op.or_else(|| put.header("location")) else {
            // No operation to follow: done when the answer says so.
            return Ok(());
        };
        let url = self.same_origin("Azure-AsyncOperation", &op)?;
        let deadline = tokio::time::Instant::now() + self.settings.operation_timeout;
        // ARM's Retry-After (often 10 s) is an upper bound here: an
        // ip-configuration change usually finishes within a second or two.
        let mut pause = Duration::from_millis(200);
        loop {
            tokio::time::sleep(pause).await;
            let a = self.arm_get("AzureAsyncOperation_Get", url.clone()).await?;
            // A Location is polled until it stops answering 202.
            if via_location && a.status != 202 {
                return Ok(());
            }
            let v: Value = serde_json::from_slice(&a.body).unwrap_or_default();
            let status = v["status"]
                .as_str()
                .or_else(|| v["properties"]["provisioningState"].as_str())
                .unwrap_or("InProgress");
            match status {
                "Succeeded" => return Ok(()),
                "Failed" | "Canceled" => {
                    let code = v["error"]["code"].as_str().unwrap_or("");
                    let message = v["error"]["message"].as_str().unwrap_or(status);
                    let what = format!("update of NIC {nic} {status}: {code}: {message}");
                    return Err(match code {
                        "SubnetIsFull" | "PrivateIPAddressSpaceExhausted" => {
                            ProviderError::SubnetExhausted {
                                subnet: String::new(),
                            }
                        }
                        c if c.contains("LimitExceeded") => ProviderError::LimitExceeded(what),
                        _ => ProviderError::Server(what),
                    });
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProviderError::Timeout {
                    api: format!(
                        "NetworkInterfaces_CreateOrUpdate {nic} (operation still in progress)"
                    ),
                });
            }
            let asked = a
                .header("retry-after")
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map_or(pause * 2, Duration::from_secs);
            pause = asked.clamp(Duration::from_millis(200), Duration::from_secs(2));
        }
    }

    /// Read-modify-write of a NIC's ip-configurations under its etag: `edit`
    /// changes the NIC's JSON and says whether there is anything to send.
    /// After a 412 the NIC is read again and `edit` runs again.
    async fn update_nic(
        &self,
        nic: &Nic,
        mut edit: impl FnMut(&models::NetworkInterface, &mut Value) -> Result<bool>,
    ) -> Result<models::NetworkInterface> {
        let mut races = 0;
        let deadline = tokio::time::Instant::now() + self.settings.operation_timeout;
        loop {
            let (typed, mut raw, etag) = self.get_nic(&nic.id).await?;
            if !edit(&typed, &mut raw)? {
                // Nothing to send (a PUT of ours already applied, answered
                // by a lost reply or a 412): done once ARM has finished it.
                if raw["properties"]["provisioningState"].as_str() == Some("Updating")
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                return Ok(typed);
            }
            // The subnet a "full" answer is about: the NIC's.
            let subnet = primary_config(&typed)
                .and_then(|c| c.properties.as_ref())
                .and_then(|p| p.subnet.as_ref())
                .and_then(|s| s.sub_resource.id.clone())
                .unwrap_or_default();
            let named = |e: ProviderError| match e {
                ProviderError::SubnetExhausted { .. } => ProviderError::SubnetExhausted {
                    subnet: subnet.clone(),
                },
                e => e,
            };
            // Read-only parts ARM ignores on PUT are left as they were.
            let put = self
                .arm_call(
                    "NetworkInterfaces_CreateOrUpdate",
                    Method::Put,
                    self.url(&nic.id)?,
                    Some(&raw),
                    Some(&etag),
                    // Safe to repeat: under If-Match a repeat of a PUT that
                    // took effect gets 412 and is re-read, never applied twice.
                    Repeat::Always,
                )
                .await
                .map_err(named)?;
            if put.status == 412 {
                races += 1;
                if races > self.settings.etag_retries {
                    return Err(ProviderError::Server(format!(
                        "NIC {} changed under every one of {races} updates (412 PreconditionFailed): another writer keeps changing it",
                        nic.name
                    )));
                }
                debug!(nic = %nic.name, races, "NIC changed since it was read (412); reading it again");
                continue;
            }
            // ARM took the change: a read after it that stays throttled
            // says nothing of whether it was made, so it must not read as
            // "not made" (a release would hand out addresses ARM took
            // back). A timeout is what callers treat as in doubt.
            let in_doubt = |e: ProviderError| match e {
                ProviderError::Throttled { api, .. } => ProviderError::Timeout {
                    api: format!(
                        "{api}: NIC {} was changed, but following the change stayed throttled",
                        nic.name
                    ),
                },
                e => e,
            };
            self.wait_operation(&put, &nic.name)
                .await
                .map_err(named)
                .map_err(in_doubt)?;
            return Ok(self.get_nic(&nic.id).await.map_err(in_doubt)?.0);
        }
    }

    fn view(&self, n: &Nic, nic: &models::NetworkInterface) -> Interface {
        let props = nic.properties.clone().unwrap_or_default();
        let mut primary_ip = Ipv4Addr::UNSPECIFIED;
        let mut secondary = vec![];
        let mut subnet = String::new();
        let mut others = 0u32;
        for c in &props.ip_configurations {
            let Some(p) = c.properties.as_ref() else {
                continue;
            };
            let Some(ip) = p
                .private_ip_address
                .as_deref()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if p.primary == Some(true) {
                primary_ip = ip;
                subnet = p
                    .subnet
                    .as_ref()
                    .and_then(|s| s.sub_resource.id.clone())
                    .unwrap_or_default();
            } else if ours(c) {
                secondary.push(ip);
            } else {
                others += 1;
            }
        }
        self.foreign
            .lock()
            .expect("foreign lock")
            .insert(n.name.clone(), others);
        let tags: BTreeMap<String, String> = nic
            .resource
            .tags
            .as_ref()
            .and_then(|t| t.as_object())
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Interface {
            id: n.name.clone(),
            mac: normal_mac(props.mac_address.as_deref().unwrap_or("")),
            device_index: n.device_index,
            subnet_cidr: self
                .subnet_cidrs
                .get(&subnet.to_ascii_lowercase())
                .copied()
                .unwrap_or_else(|| Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("net")),
            subnet_id: subnet,
            primary_ip,
            secondary_ips: secondary,
            prefixes: vec![],
            tags,
            delete_on_termination: None,
        }
    }

    /// The NICs a VM has are all it will have while it runs, so they are
    /// its interface limit whatever its size allows; each holds 256
    /// ip-configurations, less those of others on the fullest such NIC.
    fn limits(&self) -> Limits {
        let others = self
            .foreign
            .lock()
            .expect("foreign lock")
            .values()
            .copied()
            .max()
            .unwrap_or(0);
        Limits {
            max_interfaces: self.nics.len() as u32,
            ipv4_per_interface: MAX_IP_CONFIGURATIONS.saturating_sub(others).max(1),
            prefix_delegation: false,
        }
    }

    fn unsupported(what: &str) -> ProviderError {
        ProviderError::Unsupported(format!(
            "{what}: Azure attaches NICs only to a deallocated VM; the pool grows on the NICs the VM has"
        ))
    }
}

/// An ip-configuration ipamd added (see [`IPCONFIG_PREFIX`]).
fn ours(c: &models::NetworkInterfaceIpConfiguration) -> bool {
    c.name
        .as_deref()
        .is_some_and(|n| n.starts_with(IPCONFIG_PREFIX))
}

fn primary_config(
    nic: &models::NetworkInterface,
) -> Option<&models::NetworkInterfaceIpConfiguration> {
    nic.properties.as_ref()?.ip_configurations.iter().find(|c| {
        c.properties
            .as_ref()
            .and_then(|p| p.primary)
            .unwrap_or(false)
    })
}

#[async_trait]
impl CloudProvider for AzureProvider {
    fn name(&self) -> &'static str {
        "azure"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            hot_attach: false,
            prefixes: false,
        }
    }

    async fn describe_instance(&self) -> Result<Instance> {
        let primary = self.describe_interfaces().await?;
        let p = primary
            .iter()
            .find(|i| i.is_primary())
            .ok_or_else(|| ProviderError::NotFound("the VM's primary NIC".into()))?;
        Ok(Instance {
            id: self.vm_name.clone(),
            instance_type: self.vm_size.clone(),
            zone: self.zone.clone(),
            primary_ip: p.primary_ip,
            primary_interface_id: p.id.clone(),
            subnet_id: p.subnet_id.clone(),
            vpc_id: self.vnet_id.clone(),
            vpc_cidrs: self.vpc_cidrs.clone(),
            security_groups: vec![],
            limits: self.limits(),
        })
    }

    fn current_limits(&self) -> Option<Limits> {
        Some(self.limits())
    }

    async fn describe_interfaces(&self) -> Result<Vec<Interface>> {
        let mut out = vec![];
        for n in &self.nics {
            let (nic, _, _) = self.get_nic(&n.id).await?;
            out.push(self.view(n, &nic));
        }
        Ok(out)
    }

    async fn assign(&self, interface_id: &str, request: AssignRequest) -> Result<Assigned> {
        let AssignRequest::Ips(count) = request else {
            return Err(ProviderError::Unsupported(
                "Azure has no prefix delegation".into(),
            ));
        };
        let n = self.nic(interface_id)?.clone();
        let batch = self.seq.fetch_add(1, Ordering::Relaxed);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let names: Vec<String> = (0..count)
            .map(|i| format!("{IPCONFIG_PREFIX}{stamp:x}-{batch}-{i}"))
            .collect();
        // How many of `names` the last PUT sent.
        let mut sent: Option<usize> = None;
        let after = self
            .update_nic(&n, |typed, raw| {
                let have = typed
                    .properties
                    .as_ref()
                    .map_or(0, |p| p.ip_configurations.len()) as u32;
                let configs = raw["properties"]["ipConfigurations"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                // A repeat of a PUT that took effect: the names are there.
                if let Some(k) = sent {
                    if names[..k]
                        .iter()
                        .all(|want| configs.iter().any(|c| c["name"].as_str() == Some(want)))
                    {
                        return Ok(false);
                    }
                }
                // Fewer than asked when the NIC has less room (other
                // ip-configurations take slots too); none is an error.
                let room = MAX_IP_CONFIGURATIONS.saturating_sub(have);
                if room == 0 {
                    return Err(ProviderError::LimitExceeded(format!(
                        "NIC {} has {have} ip-configurations, Azure's {MAX_IP_CONFIGURATIONS} per NIC",
                        n.name
                    )));
                }
                let k = (count.min(room)) as usize;
                sent = Some(k);
                let primary = configs
                    .iter()
                    .find(|c| c["properties"]["primary"].as_bool() == Some(true))
                    .cloned()
                    .ok_or_else(|| {
                        ProviderError::Invalid(format!(
                            "NIC {} has no primary ip-configuration",
                            n.name
                        ))
                    })?;
                let mut configs = configs;
                for name in &names[..k] {
                    let mut props = serde_json::json!({
                        "privateIPAllocationMethod": "Dynamic",
                        "privateIPAddressVersion": "IPv4",
                        "primary": false,
                        "subnet": primary["properties"]["subnet"].clone(),
                    });
                    let asgs = &primary["properties"]["applicationSecurityGroups"];
                    if asgs.as_array().is_some_and(|a| !a.is_empty()) {
                        props["applicationSecurityGroups"] = asgs.clone();
                    }
                    configs.push(serde_json::json!({"name": name, "properties": props}));
                }
                raw["properties"]["ipConfigurations"] = Value::Array(configs);
                Ok(true)
            })
            .await?;
        let mut got = vec![];
        for c in after
            .properties
            .as_ref()
            .map(|p| p.ip_configurations.as_slice())
            .unwrap_or_default()
        {
            if c.name.as_ref().is_some_and(|x| names.contains(x)) {
                if let Some(ip) = c
                    .properties
                    .as_ref()
                    .and_then(|p| p.private_ip_address.as_deref())
                    .and_then(|a| a.parse().ok())
                {
                    got.push(ip);
                }
            }
        }
        if got.len() < count as usize {
            warn!(nic = %n.name, asked = count, got = got.len(), "ARM allocated fewer addresses than asked");
        }
        Ok(Assigned {
            ips: got,
            prefixes: vec![],
        })
    }

    async fn release(&self, interface_id: &str, release: &Assigned) -> Result<()> {
        if !release.prefixes.is_empty() {
            return Err(ProviderError::Unsupported(
                "Azure has no prefix delegation".into(),
            ));
        }
        let n = self.nic(interface_id)?.clone();
        let gone: Vec<String> = release.ips.iter().map(ToString::to_string).collect();
        self.update_nic(&n, |_, raw| {
            let configs = raw["properties"]["ipConfigurations"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let before = configs.len();
            let kept: Vec<Value> = configs
                .into_iter()
                .filter(|c| {
                    let p = &c["properties"];
                    let ours = c["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(IPCONFIG_PREFIX));
                    p["primary"].as_bool() == Some(true)
                        || !ours
                        || !p["privateIPAddress"]
                            .as_str()
                            .is_some_and(|a| gone.iter().any(|g| g == a))
                })
                .collect();
            if kept.len() == before {
                // Already gone (a repeat after a 412, or released by hand).
                return Ok(false);
            }
            raw["properties"]["ipConfigurations"] = Value::Array(kept);
            Ok(true)
        })
        .await?;
        Ok(())
    }

    async fn create_interface(&self, _spec: &CreateInterface) -> Result<Interface> {
        Err(Self::unsupported("create a NIC"))
    }

    async fn detach_interface(&self, _interface_id: &str) -> Result<()> {
        Err(Self::unsupported("detach a NIC"))
    }

    async fn delete_interface(&self, _interface_id: &str) -> Result<()> {
        Err(Self::unsupported("delete a NIC"))
    }

    async fn list_subnets(&self) -> Result<Vec<Subnet>> {
        let a = self
            .arm_get(
                "VirtualNetworks_ListUsage",
                self.url(&format!("{}/usages", self.vnet_id))?,
            )
            .await?;
        let u: models::VirtualNetworkListUsageResult = serde_json::from_slice(&a.body)
            .map_err(|e| ProviderError::Invalid(format!("VirtualNetworks_ListUsage: {e}")))?;
        Ok(u.value
            .iter()
            .filter_map(|x| {
                let id = x.id.clone()?;
                let cidr = *self.subnet_cidrs.get(&id.to_ascii_lowercase())?;
                let free = (x.limit? - x.current_value?).max(0.0) as u32;
                Some(Subnet {
                    id,
                    cidr,
                    zone: self.zone.clone(),
                    free_addresses: free,
                    tags: BTreeMap::new(),
                })
            })
            .collect())
    }

    fn set_account_peers(&self, nodes: u32) {
        self.layer.set_peers(nodes);
    }

    /// Every change is a PUT of the NIC: ARM's per-subscription writes.
    fn put_off(&self, _change: crate::Change) -> Option<std::time::Duration> {
        self.layer.put_off("NetworkInterfaces_CreateOrUpdate")
    }

    fn api_figures(&self) -> BTreeMap<String, crate::layer::ApiStats> {
        self.layer.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_ids_read_as_arm_and_imds_write_them() {
        assert_eq!(normal_mac("000D3A1B2C3D"), "00:0d:3a:1b:2c:3d");
        assert_eq!(normal_mac("00-0D-3A-1B-2C-3D"), "00:0d:3a:1b:2c:3d");
        assert_eq!(
            parse_id("/subscriptions/s1/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/vm"),
            Some(("s1".into(), "rg-1".into()))
        );
        assert_eq!(parse_id("/nothing/here"), None);
    }

    #[test]
    fn arm_answers_map_to_what_ipamd_acts_on() {
        let answer = |status: u16, code: &str, retry: Option<&str>| {
            let mut headers = azure_core::headers::Headers::new();
            if let Some(r) = retry {
                headers.insert("retry-after", r.to_string());
            }
            Answer {
                status,
                headers,
                body: serde_json::to_vec(
                    &serde_json::json!({"error": {"code": code, "message": "m"}}),
                )
                .unwrap()
                .into(),
            }
        };
        // A Retry-After of an hour is cut to MAX_RETRY_AFTER.
        assert_eq!(
            classify("x", &answer(429, "x", Some("3600"))),
            ProviderError::Throttled {
                api: "x".into(),
                retry_after_ms: Some(60_000)
            }
        );
        assert!(matches!(
            classify("x", &answer(409, "AnotherOperationInProgress", None)),
            ProviderError::Server(_)
        ));
        assert_eq!(
            classify(
                "x",
                &answer(429, "SubscriptionRequestsThrottled", Some("7"))
            ),
            ProviderError::Throttled {
                api: "x".into(),
                retry_after_ms: Some(7000)
            }
        );
        assert!(matches!(
            classify("x", &answer(400, "SubnetIsFull", None)),
            ProviderError::SubnetExhausted { .. }
        ));
        assert!(matches!(
            classify("x", &answer(400, "LimitExceeded", None)),
            ProviderError::LimitExceeded(_)
        ));
        assert!(matches!(
            classify("x", &answer(403, "AuthorizationFailed", None)),
            ProviderError::Denied(_)
        ));
        assert!(matches!(
            classify("x", &answer(503, "ServerBusy", None)),
            ProviderError::Server(_)
        ));
        assert!(matches!(
            classify("x", &answer(400, "InvalidRequestFormat", None)),
            ProviderError::Invalid(_)
        ));
    }
}
