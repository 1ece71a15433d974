//! The AWS provider against a mock of IMDSv2 and EC2's query API that
//! answers as EC2 does (XML, error codes, HTTP statuses): the prefix-
//! delegation request path (LocalStack ignores Ipv4PrefixCount), backoff on
//! RequestLimitExceeded, and the client-side buckets' call rate.

#![cfg(feature = "aws")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use providers::aws::{AwsProvider, AwsSettings};
use providers::{AssignRequest, Assigned, CloudProvider, CreateInterface};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One EC2 call the mock received: action, parameters, when.
type Call = (String, HashMap<String, String>, Instant);

#[derive(Default)]
struct Mock {
    calls: Mutex<Vec<Call>>,
    /// Action -> how many more calls answer RequestLimitExceeded.
    throttle: Mutex<HashMap<String, u32>>,
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

fn answer(m: &Mock, action: &str, p: &HashMap<String, String>) -> (u16, String) {
    if let Some(n) = m.throttle.lock().unwrap().get_mut(action) {
        if *n > 0 {
            *n -= 1;
            return (503, "<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>r</RequestID></Response>".into());
        }
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
    match action {
        "DescribeInstanceTypes" => ok(action, "<instanceTypeSet><item><instanceType>m5.large</instanceType><hypervisor>nitro</hypervisor><networkInfo><maximumNetworkInterfaces>3</maximumNetworkInterfaces><ipv4AddressesPerInterface>10</ipv4AddressesPerInterface></networkInfo></item></instanceTypeSet>"),
        "AssignPrivateIpAddresses" => {
            let n: usize = p.get("Ipv4PrefixCount").and_then(|v| v.parse().ok()).unwrap_or(0);
            let ips: usize = p.get("SecondaryPrivateIpAddressCount").and_then(|v| v.parse().ok()).unwrap_or(0);
            let ip_items: String = (0..ips).map(|i| format!("<item><privateIpAddress>10.0.0.{}</privateIpAddress></item>", 10 + i)).collect();
            ok(action, &format!("<networkInterfaceId>{}</networkInterfaceId><assignedPrivateIpAddressesSet>{ip_items}</assignedPrivateIpAddressesSet><assignedIpv4PrefixSet>{}</assignedIpv4PrefixSet>", p["NetworkInterfaceId"], prefixes(n)))
        }
        "UnassignPrivateIpAddresses" => ok(action, "<return>true</return>"),
        "CreateNetworkInterface" => {
            let n: usize = p.get("Ipv4PrefixCount").and_then(|v| v.parse().ok()).unwrap_or(0);
            ok(action, &format!("<networkInterface><networkInterfaceId>eni-new</networkInterfaceId><subnetId>subnet-1</subnetId><macAddress>02:00:00:00:00:09</macAddress><privateIpAddress>10.0.0.50</privateIpAddress><privateIpAddressesSet><item><privateIpAddress>10.0.0.50</privateIpAddress><primary>true</primary></item></privateIpAddressesSet><ipv4PrefixSet>{}</ipv4PrefixSet><status>available</status></networkInterface>", prefixes(n)))
        }
        "DescribeNetworkInterfaces" => ok(action, "<networkInterfaceSet><item><networkInterfaceId>eni-primary</networkInterfaceId><subnetId>subnet-1</subnetId><macAddress>02:00:00:00:00:01</macAddress><privateIpAddress>10.0.0.4</privateIpAddress><attachment><attachmentId>att-0</attachmentId><deviceIndex>0</deviceIndex><instanceId>i-mock</instanceId></attachment><status>in-use</status></item></networkInterfaceSet>"),
        "DescribeSubnets" => ok(action, "<subnetSet><item><subnetId>subnet-1</subnetId><cidrBlock>10.0.0.0/16</cidrBlock><availabilityZone>us-east-1a</availabilityZone><availableIpAddressCount>1000</availableIpAddressCount></item></subnetSet>"),
        "AttachNetworkInterface" => ok(action, "<attachmentId>att-1</attachmentId><networkCardIndex>0</networkCardIndex>"),
        "ModifyNetworkInterfaceAttribute" => ok(action, "<return>true</return>"),
        _ => (400, format!("<Response><Errors><Error><Code>InvalidAction</Code><Message>{action}</Message></Error></Errors><RequestID>r</RequestID></Response>")),
    }
}

fn imds(path: &str) -> Option<&'static str> {
    Some(match path {
        "/latest/meta-data/instance-id" => "i-mock",
        "/latest/meta-data/instance-type" => "m5.large",
        "/latest/meta-data/placement/availability-zone" => "us-east-1a",
        "/latest/meta-data/mac" => "02:00:00:00:00:01",
        "/latest/meta-data/local-ipv4" => "10.0.0.4",
        "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/interface-id" => "eni-primary",
        "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/subnet-id" => "subnet-1",
        "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/vpc-id" => "vpc-1",
        "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/vpc-ipv4-cidr-blocks" => {
            "10.0.0.0/16"
        }
        "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/security-group-ids" => "sg-1",
        _ => return None,
    })
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
                        match imds(path) {
                            Some(v) => (200, "", v.to_string()),
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
    let url = serve(m.clone()).await;
    AwsProvider::connect(&AwsSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(url.clone()),
        imds_endpoint: Some(url),
        max_attempts: 6,
        static_credentials: Some(("test".into(), "test".into())),
    })
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
    let burst = c[49].1 - t0;
    let rest = c[57].1 - c[49].1;
    assert!(burst < Duration::from_millis(1500), "burst took {burst:?}");
    assert!(
        rest >= Duration::from_millis(1500),
        "8 calls past the burst in {rest:?}: faster than 5/s"
    );
    assert!(
        m.throttle.lock().unwrap().is_empty(),
        "the mock never had to throttle"
    );
}
