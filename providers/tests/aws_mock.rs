//! The AWS provider against a mock of IMDSv2 and EC2's query API that
//! answers as EC2 does (XML, error codes, HTTP statuses): the prefix-
//! delegation request path (LocalStack ignores Ipv4PrefixCount), backoff on
//! RequestLimitExceeded, the client-side buckets' call rate, and the faults
//! of issue 9 (a nearly full subnet, a half-created interface, unknown
//! security groups, instance limits).
//!
//! The mock keeps the interfaces it knows (create, attach, detach, delete
//! and describe by id or by filter change and read them), answers scripted
//! replies per action before its own, and serves IMDS paths that a test can
//! override or make answer 404.

#![cfg(feature = "aws")]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use providers::aws::{AwsProvider, AwsSettings};
use providers::{AssignRequest, Assigned, CloudProvider, CreateInterface, ProviderError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One EC2 call the mock received: action, parameters, when.
type Call = (String, HashMap<String, String>, Instant);

/// An attachment of an interface to the mock's instance (i-mock).
#[derive(Clone, Debug)]
struct Att {
    id: String,
    device_index: u32,
    card: u32,
    delete_on_termination: bool,
}

/// An interface as the mock keeps it.
#[derive(Clone, Debug)]
struct Eni {
    id: String,
    subnet: String,
    mac: String,
    ip: String,
    secondaries: Vec<String>,
    groups: Vec<String>,
    attachment: Option<Att>,
    tags: Vec<(String, String)>,
}

impl Eni {
    fn xml(&self, tag: &str) -> String {
        let groups: String = self
            .groups
            .iter()
            .map(|g| format!("<item><groupId>{g}</groupId><groupName>{g}-name</groupName></item>"))
            .collect();
        let att = self.attachment.as_ref().map_or(String::new(), |a| {
            format!(
                "<attachment><attachmentId>{}</attachmentId><instanceId>i-mock</instanceId><instanceOwnerId>111122223333</instanceOwnerId><deviceIndex>{}</deviceIndex><networkCardIndex>{}</networkCardIndex><status>attached</status><deleteOnTermination>{}</deleteOnTermination></attachment>",
                a.id, a.device_index, a.card, a.delete_on_termination
            )
        });
        let tags: String = self
            .tags
            .iter()
            .map(|(k, v)| format!("<item><key>{k}</key><value>{v}</value></item>"))
            .collect();
        let ips: String = std::iter::once(format!(
            "<item><privateIpAddress>{}</privateIpAddress><primary>true</primary></item>",
            self.ip
        ))
        .chain(self.secondaries.iter().map(|ip| {
            format!(
                "<item><privateIpAddress>{ip}</privateIpAddress><primary>false</primary></item>"
            )
        }))
        .collect();
        let status = if self.attachment.is_some() {
            "in-use"
        } else {
            "available"
        };
        format!(
            "<{tag}><networkInterfaceId>{}</networkInterfaceId><subnetId>{}</subnetId><vpcId>vpc-1</vpcId><availabilityZone>us-east-1a</availabilityZone><ownerId>111122223333</ownerId><requesterManaged>false</requesterManaged><status>{status}</status><macAddress>{}</macAddress><privateIpAddress>{}</privateIpAddress><sourceDestCheck>true</sourceDestCheck><interfaceType>interface</interfaceType><groupSet>{groups}</groupSet>{att}<tagSet>{tags}</tagSet><privateIpAddressesSet>{ips}</privateIpAddressesSet></{tag}>",
            self.id, self.subnet, self.mac, self.ip
        )
    }
}

struct Mock {
    calls: Mutex<Vec<Call>>,
    /// Action -> how many more calls answer RequestLimitExceeded.
    throttle: Mutex<HashMap<String, u32>>,
    /// Action -> the next answers (status, body), before the mock's own.
    script: Mutex<HashMap<String, VecDeque<(u16, String)>>>,
    /// IMDS path under /latest/meta-data/ -> its value, or `None`: 404.
    imds: Mutex<HashMap<String, Option<String>>>,
    /// The interfaces in the mock's VPC; eni-primary is i-mock's primary.
    enis: Mutex<Vec<Eni>>,
    /// Free addresses in every subnet: a request for more answers
    /// InsufficientFreeAddressesInSubnet, as EC2 does. `None`: plenty.
    subnet_free: Mutex<Option<u32>>,
    /// Creates and attaches so far, for new ids.
    created: Mutex<u32>,
    attached: Mutex<u32>,
}

impl Default for Mock {
    fn default() -> Self {
        Mock {
            calls: Mutex::default(),
            throttle: Mutex::default(),
            script: Mutex::default(),
            imds: Mutex::default(),
            enis: Mutex::new(vec![Eni {
                id: "eni-primary".into(),
                subnet: "subnet-1".into(),
                mac: "02:00:00:00:00:01".into(),
                ip: "10.0.0.4".into(),
                secondaries: vec![],
                groups: vec!["sg-1".into()],
                attachment: Some(Att {
                    id: "att-0".into(),
                    device_index: 0,
                    card: 0,
                    delete_on_termination: true,
                }),
                tags: vec![],
            }]),
            subnet_free: Mutex::default(),
            created: Mutex::default(),
            attached: Mutex::default(),
        }
    }
}

impl Mock {
    /// The next answer to `action` is EC2's error `code` with `status`.
    fn fail_next(&self, action: &str, status: u16, code: &str, msg: &str) {
        self.script
            .lock()
            .unwrap()
            .entry(action.into())
            .or_default()
            .push_back(error(status, code, msg));
    }

    /// The next answer to `action` is `body` (a whole response).
    fn answer_next(&self, action: &str, body: (u16, String)) {
        self.script
            .lock()
            .unwrap()
            .entry(action.into())
            .or_default()
            .push_back(body);
    }

    /// Sets an IMDS path (under /latest/meta-data/); `None` answers 404.
    fn imds_set(&self, path: &str, v: Option<&str>) {
        self.imds
            .lock()
            .unwrap()
            .insert(path.into(), v.map(String::from));
    }

    fn eni(&self, id: &str) -> Option<Eni> {
        self.enis
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.id == id)
            .cloned()
    }

    fn with_eni(&self, id: &str, f: impl FnOnce(&mut Eni)) {
        let mut enis = self.enis.lock().unwrap();
        f(enis
            .iter_mut()
            .find(|e| e.id == id)
            .expect("a known interface"));
    }

    fn add_eni(&self, e: Eni) {
        self.enis.lock().unwrap().push(e);
    }
}

fn decode(s: &str) -> String {
    let b = s.replace('+', " ").into_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap(), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

const NS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

fn ok(action: &str, inner: &str) -> (u16, String) {
    (
        200,
        format!(
            "<{action}Response xmlns=\"{NS}\"><requestId>r</requestId>{inner}</{action}Response>"
        ),
    )
}

/// EC2's error shape: `<Response><Errors><Error>` with code and message.
fn error(status: u16, code: &str, msg: &str) -> (u16, String) {
    (
        status,
        format!("<Response><Errors><Error><Code>{code}</Code><Message>{msg}</Message></Error></Errors><RequestID>r</RequestID></Response>"),
    )
}

const NO_FREE_ADDRESSES: &str =
    "The specified subnet does not have enough free addresses to satisfy the request.";

/// The values of a query list parameter: `Name.1`, `Name.2`, ...
fn list(p: &HashMap<String, String>, name: &str) -> Vec<String> {
    (1..)
        .map_while(|i| p.get(&format!("{name}.{i}")).cloned())
        .collect()
}

/// DescribeNetworkInterfaces' filters: name -> values.
fn filters(p: &HashMap<String, String>) -> Vec<(String, Vec<String>)> {
    (1..)
        .map_while(|i| {
            let name = p.get(&format!("Filter.{i}.Name"))?.clone();
            Some((name, list(p, &format!("Filter.{i}.Value"))))
        })
        .collect()
}

fn matches(e: &Eni, name: &str, values: &[String]) -> bool {
    let any = |v: &str| values.iter().any(|x| x == v);
    match name {
        "attachment.instance-id" => e.attachment.is_some() && any("i-mock"),
        "status" => any(if e.attachment.is_some() {
            "in-use"
        } else {
            "available"
        }),
        "vpc-id" => any("vpc-1"),
        n => match n.strip_prefix("tag:") {
            Some(k) => e.tags.iter().any(|(tk, tv)| tk == k && any(tv)),
            None => true,
        },
    }
}

fn count(p: &HashMap<String, String>, k: &str) -> u32 {
    p.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn answer(m: &Mock, action: &str, p: &HashMap<String, String>) -> (u16, String) {
    if let Some(n) = m.throttle.lock().unwrap().get_mut(action) {
        if *n > 0 {
            *n -= 1;
            return (503, "<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>r</RequestID></Response>".into());
        }
    }
    if let Some(a) = m
        .script
        .lock()
        .unwrap()
        .get_mut(action)
        .and_then(VecDeque::pop_front)
    {
        return a;
    }
    let prefixes = |n: usize| -> String {
        (0..n)
            .map(|i| {
                format!(
                    "<item><ipv4Prefix>10.0.{}.{}/28</ipv4Prefix></item>",
                    16 + i / 16,
                    (i % 16) * 16
                )
            })
            .collect()
    };
    let full = |n: u32| m.subnet_free.lock().unwrap().is_some_and(|free| n > free);
    match action {
        "DescribeInstanceTypes" => ok(action, "<instanceTypeSet><item><instanceType>m5.large</instanceType><hypervisor>nitro</hypervisor><networkInfo><maximumNetworkInterfaces>3</maximumNetworkInterfaces><ipv4AddressesPerInterface>10</ipv4AddressesPerInterface></networkInfo></item></instanceTypeSet>"),
        "AssignPrivateIpAddresses" => {
            let n = count(p, "Ipv4PrefixCount") as usize;
            let ips = count(p, "SecondaryPrivateIpAddressCount");
            if full(ips) {
                return error(400, "InsufficientFreeAddressesInSubnet", NO_FREE_ADDRESSES);
            }
            let ip_items: String = (0..ips).map(|i| format!("<item><privateIpAddress>10.0.0.{}</privateIpAddress></item>", 10 + i)).collect();
            ok(action, &format!("<networkInterfaceId>{}</networkInterfaceId><assignedPrivateIpAddressesSet>{ip_items}</assignedPrivateIpAddressesSet><assignedIpv4PrefixSet>{}</assignedIpv4PrefixSet>", p["NetworkInterfaceId"], prefixes(n)))
        }
        "UnassignPrivateIpAddresses" => ok(action, "<return>true</return>"),
        "CreateNetworkInterface" => {
            let n = count(p, "Ipv4PrefixCount") as usize;
            // The primary address and the secondaries.
            if full(1 + count(p, "SecondaryPrivateIpAddressCount")) {
                return error(400, "InsufficientFreeAddressesInSubnet", NO_FREE_ADDRESSES);
            }
            let k = {
                let mut c = m.created.lock().unwrap();
                *c += 1;
                *c
            };
            let mut groups = list(p, "SecurityGroupId");
            if groups.is_empty() {
                // EC2 gives an interface created without groups the VPC's
                // default group.
                groups.push("sg-default".into());
            }
            let e = Eni {
                id: if k == 1 { "eni-new".into() } else { format!("eni-new{k}") },
                subnet: p["SubnetId"].clone(),
                mac: format!("02:00:00:00:01:{k:02x}"),
                ip: format!("10.0.0.{}", 49 + k),
                secondaries: vec![],
                groups,
                attachment: None,
                tags: vec![],
            };
            m.add_eni(e.clone());
            let xml = e.xml("networkInterface").replace(
                "</privateIpAddressesSet>",
                &format!("</privateIpAddressesSet><ipv4PrefixSet>{}</ipv4PrefixSet>", prefixes(n)),
            );
            ok(action, &xml)
        }
        "DescribeNetworkInterfaces" => {
            let ids = list(p, "NetworkInterfaceId");
            let enis = m.enis.lock().unwrap().clone();
            let picked: Vec<&Eni> = if ids.is_empty() {
                let f = filters(p);
                enis.iter().filter(|e| f.iter().all(|(n, v)| matches(e, n, v))).collect()
            } else {
                let mut v = vec![];
                for id in &ids {
                    match enis.iter().find(|e| &e.id == id) {
                        Some(e) => v.push(e),
                        None => return error(400, "InvalidNetworkInterfaceID.NotFound", &format!("The networkInterface ID '{id}' does not exist")),
                    }
                }
                v
            };
            let items: String = picked.iter().map(|e| e.xml("item")).collect();
            ok(action, &format!("<networkInterfaceSet>{items}</networkInterfaceSet>"))
        }
        "DescribeSubnets" => ok(action, "<subnetSet><item><subnetId>subnet-1</subnetId><cidrBlock>10.0.0.0/16</cidrBlock><availabilityZone>us-east-1a</availabilityZone><availableIpAddressCount>1000</availableIpAddressCount></item></subnetSet>"),
        "AttachNetworkInterface" => {
            let id = &p["NetworkInterfaceId"];
            let index: u32 = count(p, "DeviceIndex");
            let card: u32 = count(p, "NetworkCardIndex");
            let Some(e) = m.eni(id) else {
                return error(400, "InvalidNetworkInterfaceID.NotFound", &format!("The networkInterface ID '{id}' does not exist"));
            };
            if e.attachment.is_some() {
                return error(400, "InvalidParameterValue", &format!("Interface: {id} is currently in use."));
            }
            let taken = m.enis.lock().unwrap().iter().any(|o| {
                o.attachment.as_ref().is_some_and(|a| a.card == card && a.device_index == index)
            });
            if taken {
                return error(400, "InvalidParameterValue", &format!("Instance 'i-mock' already has an interface attached at device index '{index}'."));
            }
            let k = {
                let mut c = m.attached.lock().unwrap();
                *c += 1;
                *c
            };
            let att = format!("att-{k}");
            m.with_eni(id, |e| {
                e.attachment = Some(Att { id: att.clone(), device_index: index, card, delete_on_termination: false });
            });
            ok(action, &format!("<attachmentId>{att}</attachmentId><networkCardIndex>{card}</networkCardIndex>"))
        }
        "ModifyNetworkInterfaceAttribute" => {
            let id = &p["NetworkInterfaceId"];
            if let Some(v) = p.get("Attachment.DeleteOnTermination") {
                let att = p.get("Attachment.AttachmentId").cloned().unwrap_or_default();
                let mut enis = m.enis.lock().unwrap();
                let Some(a) = enis.iter_mut().find(|e| &e.id == id).and_then(|e| e.attachment.as_mut()).filter(|a| a.id == att) else {
                    return error(400, "InvalidAttachmentID.NotFound", &format!("The attachment ID '{att}' does not exist"));
                };
                a.delete_on_termination = v == "true";
            }
            ok(action, "<return>true</return>")
        }
        "DetachNetworkInterface" => {
            let att = &p["AttachmentId"];
            let mut enis = m.enis.lock().unwrap();
            match enis.iter_mut().find(|e| e.attachment.as_ref().is_some_and(|a| &a.id == att)) {
                Some(e) => {
                    e.attachment = None;
                    ok(action, "<return>true</return>")
                }
                None => error(400, "InvalidAttachmentID.NotFound", &format!("The attachment ID '{att}' does not exist")),
            }
        }
        "DeleteNetworkInterface" => {
            let id = &p["NetworkInterfaceId"];
            let mut enis = m.enis.lock().unwrap();
            match enis.iter().position(|e| &e.id == id) {
                Some(i) if enis[i].attachment.is_some() => error(400, "InvalidNetworkInterface.InUse", &format!("The network interface {id} is currently in use")),
                Some(i) => {
                    enis.remove(i);
                    ok(action, "<return>true</return>")
                }
                None => error(400, "InvalidNetworkInterfaceID.NotFound", &format!("The networkInterface ID '{id}' does not exist")),
            }
        }
        _ => error(400, "InvalidAction", action),
    }
}

fn imds(m: &Mock, path: &str) -> Option<String> {
    if let Some(v) = path
        .strip_prefix("/latest/meta-data/")
        .and_then(|p| m.imds.lock().unwrap().get(p).cloned())
    {
        return v;
    }
    Some(
        match path {
            "/latest/meta-data/instance-id" => "i-mock",
            "/latest/meta-data/instance-type" => "m5.large",
            "/latest/meta-data/placement/availability-zone" => "us-east-1a",
            "/latest/meta-data/mac" => "02:00:00:00:00:01",
            "/latest/meta-data/local-ipv4" => "10.0.0.4",
            "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/interface-id" => {
                "eni-primary"
            }
            "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/subnet-id" => "subnet-1",
            "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/vpc-id" => "vpc-1",
            "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/vpc-ipv4-cidr-blocks" => {
                "10.0.0.0/16"
            }
            "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/security-group-ids" => {
                "sg-1"
            }
            _ => return None,
        }
        .to_string(),
    )
}

/// A small HTTP/1.1 server: IMDSv2 on /latest/, EC2's query API on POST /.
async fn serve(m: Arc<Mock>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let m = m.clone();
            tokio::spawn(async move {
                loop {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    let (head, mut body) = loop {
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break (
                                String::from_utf8_lossy(&buf[..i]).to_string(),
                                buf[i + 4..].to_vec(),
                            );
                        }
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while body.len() < len {
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        body.extend_from_slice(&chunk[..n]);
                    }
                    let first = head.lines().next().unwrap_or_default().to_string();
                    let mut parts = first.split_whitespace();
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let (status, extra, text) = if method == "PUT" && path == "/latest/api/token" {
                        (
                            200,
                            "x-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
                            "token".to_string(),
                        )
                    } else if method == "GET" {
                        match imds(&m, path) {
                            Some(v) => (200, "", v),
                            None => (404, "", String::new()),
                        }
                    } else {
                        let form: HashMap<String, String> = String::from_utf8_lossy(&body)
                            .split('&')
                            .filter_map(|kv| kv.split_once('='))
                            .map(|(k, v)| (decode(k), decode(v)))
                            .collect();
                        let action = form.get("Action").cloned().unwrap_or_default();
                        m.calls.lock().unwrap().push((
                            action.clone(),
                            form.clone(),
                            Instant::now(),
                        ));
                        let (st, xml) = answer(&m, &action, &form);
                        (st, "content-type: text/xml\r\n", xml)
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\n{extra}content-length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

async fn provider(m: &Arc<Mock>) -> AwsProvider {
    provider_with(m, 6).await
}

async fn provider_with(m: &Arc<Mock>, max_attempts: u32) -> AwsProvider {
    let url = serve(m.clone()).await;
    AwsProvider::connect(
        &AwsSettings {
            region: Some("us-east-1".into()),
            endpoint_url: Some(url.clone()),
            imds_endpoint: Some(url),
            static_credentials: Some(("test".into(), "test".into())),
        },
        providers::layer::CallLayer::new(
            providers::layer::RetryPolicy {
                max_attempts,
                max_throttled: max_attempts,
                ..Default::default()
            },
            Some(providers::bucket::ec2_bucket),
        ),
    )
    .await
    .expect("connect to the mock")
}

fn calls(m: &Mock, action: &str) -> Vec<(HashMap<String, String>, Instant)> {
    m.calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.0 == action)
        .map(|c| (c.1.clone(), c.2))
        .collect()
}

#[tokio::test]
async fn identity_from_imds_and_limits_from_describe_instance_types() {
    let m = Arc::new(Mock::default());
    let p = provider(&m).await;
    let i = p.describe_instance().await.unwrap();
    assert_eq!(i.id, "i-mock");
    assert_eq!(i.primary_interface_id, "eni-primary");
    assert_eq!(i.vpc_cidrs, vec!["10.0.0.0/16".parse().unwrap()]);
    assert_eq!(i.security_groups, vec!["sg-1".to_string()]);
    assert_eq!(
        (
            i.limits.max_interfaces,
            i.limits.ipv4_per_interface,
            i.limits.prefix_delegation
        ),
        (3, 10, true)
    );
    assert_eq!(calls(&m, "DescribeInstanceTypes").len(), 1);
}

#[tokio::test]
async fn prefix_delegation_asks_for_prefixes() {
    let m = Arc::new(Mock::default());
    let p = provider(&m).await;
    let got = p
        .assign("eni-primary", AssignRequest::Prefixes(2))
        .await
        .unwrap();
    assert_eq!(got.prefixes.len(), 2);
    assert!(got.ips.is_empty());
    let c = calls(&m, "AssignPrivateIpAddresses");
    assert_eq!(c[0].0.get("Ipv4PrefixCount").map(String::as_str), Some("2"));
    assert!(!c[0].0.contains_key("SecondaryPrivateIpAddressCount"));
    // A new interface gets its prefixes in the create call itself.
    let eni = p
        .create_interface(&CreateInterface {
            subnet_id: "subnet-1".into(),
            security_groups: vec!["sg-1".into()],
            tags: [("vpc-cni.io/owner".to_string(), "vpc-cni".to_string())].into(),
            initial: AssignRequest::Prefixes(1),
        })
        .await
        .unwrap();
    assert_eq!(eni.prefixes.len(), 1);
    assert_eq!(eni.device_index, 1, "the first free device index");
    let create = &calls(&m, "CreateNetworkInterface")[0].0;
    assert_eq!(create.get("Ipv4PrefixCount").map(String::as_str), Some("1"));
    assert_eq!(
        create
            .get("TagSpecification.1.ResourceType")
            .map(String::as_str),
        Some("network-interface")
    );
    assert!(
        create.values().any(|v| v == "vpc-cni.io/created-at"),
        "created-at tag missing: {create:?}"
    );
    let attach = &calls(&m, "AttachNetworkInterface")[0].0;
    assert_eq!(attach.get("DeviceIndex").map(String::as_str), Some("1"));
    let modify = &calls(&m, "ModifyNetworkInterfaceAttribute")[0].0;
    assert_eq!(
        modify
            .get("Attachment.DeleteOnTermination")
            .map(String::as_str),
        Some("true")
    );
    p.release(
        "eni-primary",
        &Assigned {
            ips: vec![],
            prefixes: got.prefixes.clone(),
        },
    )
    .await
    .unwrap();
    let un = &calls(&m, "UnassignPrivateIpAddresses")[0].0;
    assert_eq!(
        un.get("Ipv4Prefix.1").map(String::as_str),
        Some("10.0.16.0/28")
    );
}

#[tokio::test]
async fn request_limit_exceeded_is_retried_with_growing_backoff() {
    let m = Arc::new(Mock::default());
    m.throttle
        .lock()
        .unwrap()
        .insert("AssignPrivateIpAddresses".into(), 3);
    let p = provider(&m).await;
    let got = p
        .assign("eni-primary", AssignRequest::Ips(2))
        .await
        .expect("succeeds after the burst");
    assert_eq!(got.ips.len(), 2);
    let c = calls(&m, "AssignPrivateIpAddresses");
    assert_eq!(
        c.len(),
        4,
        "three throttled attempts and one that went through"
    );
    let gaps: Vec<Duration> = c.windows(2).map(|w| w[1].1 - w[0].1).collect();
    // Jittered within [half, full] of 200, 400, 800 ms.
    assert!(gaps[0] >= Duration::from_millis(90), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(190), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(390), "{gaps:?}");
    let stats = p.api_stats();
    assert_eq!(stats["AssignPrivateIpAddresses"]["throttles"], 3);
    // Throttling that does not stop is reported as such.
    m.throttle
        .lock()
        .unwrap()
        .insert("AssignPrivateIpAddresses".into(), 100);
    let err = p
        .assign("eni-primary", AssignRequest::Ips(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, providers::ProviderError::Throttled { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn client_side_buckets_keep_the_documented_rate() {
    let m = Arc::new(Mock::default());
    let p = provider(&m).await;
    // UnassignPrivateIpAddresses: 50 burst, 5 per second.
    let one = Assigned {
        ips: vec!["10.0.0.10".parse().unwrap()],
        prefixes: vec![],
    };
    let t0 = Instant::now();
    for _ in 0..58 {
        p.release("eni-primary", &one).await.unwrap();
    }
    let c = calls(&m, "UnassignPrivateIpAddresses");
    assert_eq!(c.len(), 58);
    // The burst goes at once; the eight after it wait for tokens at 5/s.
    // 58 tokens by time T need 50 + 5 T >= 58: T >= 1.6 s from the first
    // call (tokens that refill during the burst count, so measuring from
    // the burst's end would be off by up to one token).
    let burst = c[49].1 - t0;
    let all = c[57].1 - t0;
    assert!(burst < Duration::from_millis(1500), "burst took {burst:?}");
    assert!(
        all >= Duration::from_millis(1590),
        "58 calls in {all:?}: faster than 50 + 5/s"
    );
    assert!(
        m.throttle.lock().unwrap().is_empty(),
        "the mock never had to throttle"
    );
}

fn spec(subnet: &str, groups: &[&str], initial: AssignRequest) -> CreateInterface {
    CreateInterface {
        subnet_id: subnet.into(),
        security_groups: groups.iter().map(|g| g.to_string()).collect(),
        tags: [("vpc-cni.io/owner".to_string(), "vpc-cni".to_string())].into(),
        initial,
    }
}

// ---- A nearly full subnet: the error names the subnet, not EC2's text.

#[tokio::test]
async fn a_full_subnet_is_named_by_its_id_on_assign_and_create() {
    let m = Arc::new(Mock::default());
    let p = provider(&m).await;
    // One address left: EC2 refuses a request for more.
    *m.subnet_free.lock().unwrap() = Some(1);
    let err = p
        .assign("eni-primary", AssignRequest::Ips(3))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ProviderError::SubnetExhausted {
            subnet: "subnet-1".into()
        }
    );
    assert_eq!(err.to_string(), "subnet subnet-1 has no free addresses");
    // Not retried: a full subnet is not transient.
    assert_eq!(calls(&m, "AssignPrivateIpAddresses").len(), 1);
    // What is left can still be had.
    assert_eq!(
        p.assign("eni-primary", AssignRequest::Ips(1))
            .await
            .unwrap()
            .ips
            .len(),
        1
    );

    let err = p
        .create_interface(&spec("subnet-2", &["sg-1"], AssignRequest::Ips(3)))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ProviderError::SubnetExhausted {
            subnet: "subnet-2".into()
        }
    );

    // A secondary interface in another subnet, one the provider created...
    *m.subnet_free.lock().unwrap() = None;
    let eni = p
        .create_interface(&spec("subnet-2", &["sg-1"], AssignRequest::Ips(0)))
        .await
        .unwrap();
    *m.subnet_free.lock().unwrap() = Some(1);
    let err = p.assign(&eni.id, AssignRequest::Ips(2)).await.unwrap_err();
    assert_eq!(
        err,
        ProviderError::SubnetExhausted {
            subnet: "subnet-2".into()
        }
    );
    // ...and one it has never described.
    m.add_eni(Eni {
        id: "eni-other".into(),
        subnet: "subnet-3".into(),
        mac: "02:00:00:00:02:01".into(),
        ip: "10.0.3.4".into(),
        secondaries: vec![],
        groups: vec!["sg-1".into()],
        attachment: Some(Att {
            id: "att-other".into(),
            device_index: 2,
            card: 0,
            delete_on_termination: true,
        }),
        tags: vec![],
    });
    let err = p
        .assign("eni-other", AssignRequest::Ips(2))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ProviderError::SubnetExhausted {
            subnet: "subnet-3".into()
        }
    );
}

#[tokio::test]
async fn no_free_cidr_block_is_named_by_the_subnet_id() {
    let m = Arc::new(Mock::default());
    let p = provider(&m).await;
    let no_block =
        "There are not enough free cidr blocks in the specified subnet to satisfy the request.";
    m.fail_next(
        "AssignPrivateIpAddresses",
        400,
        "InsufficientCidrBlocks",
        no_block,
    );
    let err = p
        .assign("eni-primary", AssignRequest::Prefixes(1))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ProviderError::InsufficientCidrBlocks {
            subnet: "subnet-1".into()
        }
    );
    m.fail_next(
        "CreateNetworkInterface",
        400,
        "InsufficientCidrBlocks",
        no_block,
    );
    let err = p
        .create_interface(&spec("subnet-2", &["sg-1"], AssignRequest::Prefixes(1)))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ProviderError::InsufficientCidrBlocks {
            subnet: "subnet-2".into()
        }
    );
    assert!(!err.to_string().contains("cidr blocks"), "{err}");
}

// ---- A half-created interface is rolled back.

#[tokio::test]
async fn delete_on_termination_refused_rolls_the_interface_back() {
    let m = Arc::new(Mock::default());
    let p = provider(&m).await;
    m.fail_next(
        "ModifyNetworkInterfaceAttribute",
        403,
        "UnauthorizedOperation",
        "You are not authorized to perform this operation.",
    );
    let err = p
        .create_interface(&spec("subnet-1", &["sg-1"], AssignRequest::Ips(2)))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("ModifyNetworkInterfaceAttribute")
            && text.contains("DeleteOnTermination")
            && text.contains("UnauthorizedOperation")
            && text.contains("eni-new")
            && text.contains("detached and deleted"),
        "{text}"
    );
    // Not retried: a refusal is not transient.
    assert_eq!(calls(&m, "ModifyNetworkInterfaceAttribute").len(), 1);
    let detach = calls(&m, "DetachNetworkInterface");
    assert_eq!(detach.len(), 1);
    assert_eq!(detach[0].0["AttachmentId"], "att-1");
    let delete = calls(&m, "DeleteNetworkInterface");
    assert_eq!(delete.len(), 1);
    assert_eq!(delete[0].0["NetworkInterfaceId"], "eni-new");
    assert!(delete[0].1 > detach[0].1, "deleted after the detach");
    assert!(m.eni("eni-new").is_none(), "the interface is gone");
}

#[tokio::test]
async fn delete_on_termination_is_retried_when_transient_and_rolled_back_when_it_persists() {
    let m = Arc::new(Mock::default());
    let p = provider_with(&m, 3).await;
    let internal = |m: &Mock| {
        m.fail_next(
            "ModifyNetworkInterfaceAttribute",
            500,
            "InternalError",
            "An internal error has occurred.",
        )
    };
    // Twice, then it goes through: kept, with the flag set.
    internal(&m);
    internal(&m);
    let eni = p
        .create_interface(&spec("subnet-1", &["sg-1"], AssignRequest::Ips(1)))
        .await
        .unwrap();
    assert_eq!(calls(&m, "ModifyNetworkInterfaceAttribute").len(), 3);
    assert!(calls(&m, "DetachNetworkInterface").is_empty());
    assert!(
        m.eni(&eni.id)
            .unwrap()
            .attachment
            .unwrap()
            .delete_on_termination
    );
    // Every attempt fails: rolled back, a transient error still.
    for _ in 0..3 {
        internal(&m);
    }
    let err = p
        .create_interface(&spec("subnet-1", &["sg-1"], AssignRequest::Ips(1)))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("InternalError"), "{err}");
    assert_eq!(calls(&m, "ModifyNetworkInterfaceAttribute").len(), 6);
    assert!(m.eni("eni-new2").is_none(), "rolled back");
    assert!(m.eni(&eni.id).is_some(), "the good one stays");
}

#[tokio::test]
async fn a_failed_attach_deletes_the_created_interface() {
    let m = Arc::new(Mock::default());
    let p = provider(&m).await;
    m.fail_next(
        "AttachNetworkInterface",
        400,
        "InvalidParameterValue",
        "Instance 'i-mock' already has an interface attached at device index '1'.",
    );
    let err = p
        .create_interface(&spec("subnet-1", &["sg-1"], AssignRequest::Ips(1)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("AttachNetworkInterface"), "{err}");
    assert!(
        calls(&m, "DetachNetworkInterface").is_empty(),
        "never attached"
    );
    assert!(m.eni("eni-new").is_none());
}

// ---- Unknown security groups.

fn create_groups(m: &Mock) -> Vec<Vec<String>> {
    calls(m, "CreateNetworkInterface")
        .iter()
        .map(|c| list(&c.0, "SecurityGroupId"))
        .collect()
}

#[tokio::test]
async fn imds_without_groups_takes_them_from_the_primary_interface() {
    let m = Arc::new(Mock::default());
    m.imds_set(
        "network/interfaces/macs/02:00:00:00:00:01/security-group-ids",
        None,
    );
    let p = provider(&m).await;
    let inst = p.describe_instance().await.unwrap();
    assert_eq!(inst.security_groups, vec!["sg-1".to_string()]);
    // ipamd passes what describe_instance said; an empty list as well.
    p.create_interface(&CreateInterface {
        security_groups: inst.security_groups.clone(),
        ..spec("subnet-1", &[], AssignRequest::Ips(1))
    })
    .await
    .unwrap();
    p.create_interface(&spec("subnet-1", &[], AssignRequest::Ips(1)))
        .await
        .unwrap();
    assert_eq!(
        create_groups(&m),
        vec![vec!["sg-1".to_string()], vec!["sg-1".to_string()]]
    );
    assert_eq!(m.eni("eni-new").unwrap().groups, vec!["sg-1".to_string()]);
}

#[tokio::test]
async fn groups_that_cannot_be_known_fail_the_create_before_it_is_sent() {
    let m = Arc::new(Mock::default());
    m.imds_set(
        "network/interfaces/macs/02:00:00:00:00:01/security-group-ids",
        None,
    );
    m.with_eni("eni-primary", |e| e.groups.clear());
    // Not an error at start: ipamd runs, only creating waits for groups.
    let p = provider(&m).await;
    assert!(p
        .describe_instance()
        .await
        .unwrap()
        .security_groups
        .is_empty());
    let err = p
        .create_interface(&spec("subnet-1", &[], AssignRequest::Ips(1)))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("security groups of the node's primary interface are unknown"),
        "{err}"
    );
    assert!(calls(&m, "CreateNetworkInterface").is_empty());
    // ipamd is not ready meanwhile, and says why.
    let why = p.blocker().expect("a blocker while groups are unknown");
    assert!(why.contains("security groups"), "{why}");
    assert!(why.contains("eni-primary"), "{why}");
    // Once the primary shows groups (a resync's Describe), creating works
    // and nothing blocks.
    m.with_eni("eni-primary", |e| e.groups = vec!["sg-9".into()]);
    p.describe_interfaces().await.unwrap();
    assert_eq!(p.blocker(), None);
    p.create_interface(&spec("subnet-1", &[], AssignRequest::Ips(1)))
        .await
        .unwrap();
    assert_eq!(create_groups(&m), vec![vec!["sg-9".to_string()]]);
}

#[tokio::test]
async fn a_replaced_node_group_is_followed() {
    let m = Arc::new(Mock::default());
    let p = provider(&m).await;
    let node_groups = p.describe_instance().await.unwrap().security_groups;
    assert_eq!(node_groups, vec!["sg-1".to_string()]);
    let with = |g: &[String]| CreateInterface {
        security_groups: g.to_vec(),
        ..spec("subnet-1", &[], AssignRequest::Ips(1))
    };
    // ipamd names no groups: the node's, as they are at each create.
    p.create_interface(&with(&[])).await.unwrap();
    // The node's group is replaced while ipamd runs.
    m.with_eni("eni-primary", |e| e.groups = vec!["sg-2".into()]);
    p.create_interface(&with(&[])).await.unwrap();
    assert_eq!(
        create_groups(&m),
        vec![vec!["sg-1".to_string()], vec!["sg-2".to_string()]]
    );
    assert_eq!(
        p.describe_instance().await.unwrap().security_groups,
        vec!["sg-2".to_string()]
    );
    // Groups the caller chose itself are used as given.
    m.with_eni("eni-new", |e| e.attachment = None);
    m.with_eni("eni-new2", |e| e.attachment = None);
    p.create_interface(&with(&["sg-pods".to_string()]))
        .await
        .unwrap();
    assert_eq!(create_groups(&m)[2], vec!["sg-pods".to_string()]);
}

/// An interface of ours left attached without DeleteOnTermination (a
/// create cut short by a crash, or a rollback whose detach failed) is
/// reported as such, and the flag can be set on it afterwards.
#[tokio::test]
async fn a_half_made_interface_is_reported_and_completed() {
    let m = Arc::new(Mock::default());
    let p = provider(&m).await;
    m.add_eni(Eni {
        id: "eni-half".into(),
        subnet: "subnet-1".into(),
        mac: "02:00:00:00:04:01".into(),
        ip: "10.0.1.40".into(),
        secondaries: vec![],
        groups: vec!["sg-1".into()],
        attachment: Some(Att {
            id: "att-half".into(),
            device_index: 1,
            card: 0,
            delete_on_termination: false,
        }),
        tags: vec![("vpc-cni.io/owner".into(), "vpc-cni".into())],
    });
    let listed = p.describe_interfaces().await.unwrap();
    let half = listed.iter().find(|i| i.id == "eni-half").unwrap();
    assert_eq!(half.delete_on_termination, Some(false));
    p.ensure_delete_on_termination("eni-half").await.unwrap();
    let modify = calls(&m, "ModifyNetworkInterfaceAttribute");
    assert_eq!(modify.len(), 1);
    assert_eq!(modify[0].0["Attachment.AttachmentId"], "att-half");
    assert!(
        m.eni("eni-half")
            .unwrap()
            .attachment
            .unwrap()
            .delete_on_termination
    );
}

// ---- Instance limits.

/// DescribeInstanceTypes' answer for one type: `total` interfaces over
/// `cards` cards of `per_card` each (EC2 lists no cards when `cards` is 0).
fn instance_type(name: &str, total: u32, cards: u32, per_card: u32, ipv4: u32) -> (u16, String) {
    let items: String = (0..cards)
        .map(|i| {
            format!(
                "<item><networkCardIndex>{i}</networkCardIndex><networkPerformance>100 Gigabit</networkPerformance><maximumNetworkInterfaces>{per_card}</maximumNetworkInterfaces><baselineBandwidthInGbps>100.0</baselineBandwidthInGbps><peakBandwidthInGbps>100.0</peakBandwidthInGbps></item>"
            )
        })
        .collect();
    let cards_xml = if cards == 0 {
        String::new()
    } else {
        format!("<maximumNetworkCards>{cards}</maximumNetworkCards><defaultNetworkCardIndex>0</defaultNetworkCardIndex><networkCards>{items}</networkCards>")
    };
    ok(
        "DescribeInstanceTypes",
        &format!("<instanceTypeSet><item><instanceType>{name}</instanceType><currentGeneration>true</currentGeneration><hypervisor>nitro</hypervisor><bareMetal>false</bareMetal><networkInfo><networkPerformance>3200 Gigabit</networkPerformance><maximumNetworkInterfaces>{total}</maximumNetworkInterfaces>{cards_xml}<ipv4AddressesPerInterface>{ipv4}</ipv4AddressesPerInterface><ipv6AddressesPerInterface>{ipv4}</ipv6AddressesPerInterface><ipv6Supported>true</ipv6Supported><enaSupport>required</enaSupport><efaSupported>true</efaSupported></networkInfo></item></instanceTypeSet>"),
    )
}

async fn limits_of(m: &Arc<Mock>) -> (u32, u32, bool) {
    let l = provider(m).await.describe_instance().await.unwrap().limits;
    (l.max_interfaces, l.ipv4_per_interface, l.prefix_delegation)
}

#[tokio::test]
async fn multi_card_types_are_limited_to_the_default_card() {
    // EC2's figures (DescribeInstanceTypes, as in ../shared/data): p5.48xlarge
    // has 32 cards of 2 interfaces (64 in all), hpc6id.32xlarge 2 cards of 1,
    // trn2.48xlarge 16 cards of 2.
    for (name, total, cards, per_card, ipv4) in [
        ("p5.48xlarge", 64, 32, 2, 50),
        ("hpc6id.32xlarge", 2, 2, 1, 50),
        ("trn2.48xlarge", 32, 16, 2, 50),
    ] {
        let m = Arc::new(Mock::default());
        m.imds_set("instance-type", Some(name));
        m.answer_next(
            "DescribeInstanceTypes",
            instance_type(name, total, cards, per_card, ipv4),
        );
        assert_eq!(limits_of(&m).await, (per_card, ipv4, true), "{name}");
    }
    // Without a card list the total is all there is (and the table bounds it).
    let m = Arc::new(Mock::default());
    m.answer_next(
        "DescribeInstanceTypes",
        instance_type("m5.large", 3, 0, 0, 10),
    );
    assert_eq!(limits_of(&m).await, (3, 10, true));
    // A described figure above the table's is not believed.
    let m = Arc::new(Mock::default());
    m.answer_next(
        "DescribeInstanceTypes",
        instance_type("m5.large", 4, 1, 4, 10),
    );
    assert_eq!(limits_of(&m).await, (3, 10, true));
}

#[tokio::test]
async fn only_default_card_interfaces_count_when_attaching() {
    let m = Arc::new(Mock::default());
    m.imds_set("instance-type", Some("p5.48xlarge"));
    m.answer_next(
        "DescribeInstanceTypes",
        instance_type("p5.48xlarge", 64, 32, 2, 50),
    );
    // An EFA interface on card 1, at its own device index 1.
    m.add_eni(Eni {
        id: "eni-efa".into(),
        subnet: "subnet-1".into(),
        mac: "02:00:00:00:03:01".into(),
        ip: "10.0.5.4".into(),
        secondaries: vec![],
        groups: vec!["sg-1".into()],
        attachment: Some(Att {
            id: "att-efa".into(),
            device_index: 1,
            card: 1,
            delete_on_termination: true,
        }),
        tags: vec![],
    });
    let p = provider(&m).await;
    let eni = p
        .create_interface(&spec("subnet-1", &["sg-1"], AssignRequest::Ips(1)))
        .await
        .unwrap();
    assert_eq!(eni.device_index, 1, "device indexes are per card");
    assert!(calls(&m, "AttachNetworkInterface")[0]
        .0
        .get("NetworkCardIndex")
        .is_none_or(|c| c == "0"));
    // Card 0 is full now (2 of 2): refused before anything is created.
    let err = p
        .create_interface(&spec("subnet-1", &["sg-1"], AssignRequest::Ips(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::LimitExceeded(_)), "{err:?}");
    assert_eq!(calls(&m, "CreateNetworkInterface").len(), 1);
}

#[tokio::test]
async fn attachment_limit_exceeded_lowers_the_limit() {
    let m = Arc::new(Mock::default());
    let p = provider(&m).await;
    m.fail_next(
        "AttachNetworkInterface",
        400,
        "AttachmentLimitExceeded",
        "Interface count 2 exceeds the limit for m5.large",
    );
    let err = p
        .create_interface(&spec("subnet-1", &["sg-1"], AssignRequest::Ips(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::LimitExceeded(_)), "{err:?}");
    assert!(m.eni("eni-new").is_none(), "rolled back");
    // EC2's word stands: no create/delete loop.
    let err = p
        .create_interface(&spec("subnet-1", &["sg-1"], AssignRequest::Ips(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::LimitExceeded(_)), "{err:?}");
    assert_eq!(calls(&m, "CreateNetworkInterface").len(), 1);
    assert_eq!(
        p.describe_instance().await.unwrap().limits.max_interfaces,
        1
    );
    // ipamd's planner reads the cap while it runs, not only at start.
    assert_eq!(p.current_limits().map(|l| l.max_interfaces), Some(1));
}

#[tokio::test]
async fn an_unknown_instance_type_starts_with_conservative_limits() {
    let m = Arc::new(Mock::default());
    m.imds_set("instance-type", Some("zz9.hyper"));
    m.fail_next(
        "DescribeInstanceTypes",
        400,
        "InvalidInstanceType",
        "The following supplied instance types do not exist: [zz9.hyper]",
    );
    m.with_eni("eni-primary", |e| {
        e.secondaries = vec!["10.0.0.5".into(), "10.0.0.6".into(), "10.0.0.7".into()];
    });
    // An interface on another card counts for neither figure.
    m.add_eni(Eni {
        id: "eni-efa".into(),
        subnet: "subnet-1".into(),
        mac: "02:00:00:00:03:01".into(),
        ip: "10.0.5.4".into(),
        secondaries: (5..20).map(|i| format!("10.0.5.{i}")).collect(),
        groups: vec!["sg-1".into()],
        attachment: Some(Att {
            id: "att-efa".into(),
            device_index: 1,
            card: 1,
            delete_on_termination: true,
        }),
        tags: vec![],
    });
    let p = provider(&m).await;
    let l = p.describe_instance().await.unwrap().limits;
    assert_eq!(
        (l.max_interfaces, l.ipv4_per_interface, l.prefix_delegation),
        (1, 4, false),
        "the primary alone, with the 4 addresses it holds"
    );
    assert_eq!(p.limits_source(), "fallback");

    // A bare primary: at least 2 addresses.
    let m = Arc::new(Mock::default());
    m.imds_set("instance-type", Some("zz9.hyper"));
    m.fail_next(
        "DescribeInstanceTypes",
        400,
        "InvalidInstanceType",
        "The following supplied instance types do not exist: [zz9.hyper]",
    );
    assert_eq!(limits_of(&m).await, (1, 2, false));
}

#[tokio::test]
async fn a_type_only_the_table_knows_uses_the_table() {
    let m = Arc::new(Mock::default());
    m.imds_set("instance-type", Some("p5.48xlarge"));
    m.fail_next(
        "DescribeInstanceTypes",
        400,
        "InvalidInstanceType",
        "The following supplied instance types do not exist: [p5.48xlarge]",
    );
    let p = provider(&m).await;
    let l = p.describe_instance().await.unwrap().limits;
    assert_eq!((l.max_interfaces, l.ipv4_per_interface), (2, 50));
    assert_eq!(p.limits_source(), "table");
}
