//! `/metrics` of the real binary after a scripted sequence: ADDs, one that
//! finds the node full, a DEL, a grow the cloud throttles. Names and values
//! are checked one by one, then the exposition goes through promtool
//! (`scripts/check-metrics.sh`).

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use support::{add_request, del_request, free_ports, get_any, Daemon, DaemonSpec, SimServer};
use vpc_sim::{Fault, FaultKind, Request, VpcConfig};

/// `name{labels}` → value, from the text format.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("sample line");
            (k.to_string(), v.parse().expect("sample value"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_adds_a_full_node_a_del_and_throttling() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(dir.path(), VpcConfig::default()).await;
    // The first grow is throttled twice, then goes through.
    sim.vpc
        .handle(Request::InjectFault(Fault {
            api: Some("AssignPrivateIpAddresses".into()),
            kind: FaultKind::Throttle,
            count: 2,
        }))
        .await
        .unwrap();
    let ports = free_ports(2);
    let metrics_addr = ports[1].to_string();
    let env = [
        ("WARM_IP_TARGET", "2"),
        ("MAX_PODS", "3"),
        ("IPAMD_ADD_WAIT_SECONDS", "1"),
        ("IPAMD_METRICS_ADDR", metrics_addr.as_str()),
    ];
    let daemon = Daemon::start(&DaemonSpec {
        dir: dir.path(),
        sim: &sim.addr,
        node: "metrics-node",
        instance_type: "m5.large",
        env: &env,
        introspection: ports[0],
    })
    .await;
    // The throttled grow is retried with backoff: wait for its addresses.
    for _ in 0..400 {
        if daemon.pool().await["counts"]["assignable"].as_u64() >= Some(2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let mut c = ipamd_api::client(&daemon.socket).await.unwrap();
    for i in 0..3 {
        c.add_network(add_request(&format!("metrics-pod-{i}")))
            .await
            .expect("ADD within MAX_PODS");
    }
    let err = c
        .add_network(add_request("metrics-pod-3"))
        .await
        .expect_err("a fourth pod exceeds MAX_PODS=3");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    c.del_network(del_request("metrics-pod-0")).await.unwrap();

    let (status, text) = get_any(daemon.introspection, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let m = samples(&text);
    let v = |k: &str| -> f64 { *m.get(k).unwrap_or_else(|| panic!("no sample {k}:\n{text}")) };

    // aws-node's names, exact, with the values the sequence implies.
    assert_eq!(v("awscni_add_ip_req_count"), 4.0);
    assert_eq!(v(r#"awscni_del_ip_req_count{reason="PodDeleted"}"#), 1.0);
    assert_eq!(v("awscni_no_available_ip_addresses"), 1.0);
    assert_eq!(v("awscni_assigned_ip_addresses"), 2.0);
    assert_eq!(
        v("awscni_total_ip_addresses"),
        3.0,
        "MAX_PODS caps the pool"
    );
    assert_eq!(v("awscni_eni_allocated"), 1.0);
    // m5.large: 3 interfaces of 10 addresses, the primary one's own aside.
    assert_eq!(v("awscni_eni_max"), 3.0);
    assert_eq!(v("awscni_ip_max"), 27.0);
    let per_eni: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("awscni_assigned_ip_per_eni{eni=\"eni-"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(per_eni, 2.0, "{text}");
    assert!(v(r#"awscni_reconcile_count{fn="assign_ips"}"#) >= 1.0);
    let assign = r#"{api="AssignPrivateIpAddresses"}"#;
    assert_eq!(
        v(r#"awscni_aws_api_error_count{api="AssignPrivateIpAddresses",error="throttled"}"#),
        2.0
    );
    assert_eq!(
        v(&format!("vpc_cni_cloud_api_throttles_total{assign}")),
        2.0
    );
    let calls = v(&format!("vpc_cni_cloud_api_calls_total{assign}"));
    assert!(
        calls >= 3.0,
        "two throttled attempts and one that went through"
    );
    assert_eq!(
        v(&format!("awscni_aws_api_latency_ms_count{assign}")),
        calls
    );
    assert_eq!(
        v(r#"awscni_aws_api_latency_ms_bucket{api="AssignPrivateIpAddresses",le="+Inf"}"#),
        calls
    );
    assert_eq!(
        v(r#"awscni_ipamd_startup_duration_seconds_count{success="true"}"#),
        1.0
    );

    // Ours.
    assert_eq!(v("vpc_cni_cooling_ip_addresses"), 1.0, "the DEL's address");
    assert_eq!(v("vpc_cni_ready"), 1.0);
    assert_eq!(v(r#"vpc_cni_warm_target{setting="WARM_IP_TARGET"}"#), 2.0);
    assert!(!m.keys().any(|k| k.contains("MINIMUM_IP_TARGET")), "unset");
    // WARM_IP_TARGET set: the ENI target's default does not apply, in
    // /metrics as in /v1/pool's settings.
    assert!(
        !m.keys().any(|k| k.contains("WARM_ENI_TARGET")),
        "not in force"
    );
    let pool = daemon.pool().await;
    assert!(
        pool["config"]["pool"]["warm_eni_target"].is_null(),
        "{pool}"
    );
    assert_eq!(pool["config"]["pool"]["warm_ip_target"], 2);
    assert!(v("vpc_cni_add_waits_total") >= 1.0, "the fourth ADD waited");
    assert_eq!(v("vpc_cni_add_duration_seconds_count"), 4.0);
    assert_eq!(
        v(r#"vpc_cni_add_duration_seconds_bucket{le="1"}"#),
        3.0,
        "the fourth waited its second out, the others did not"
    );
    assert_eq!(v("vpc_cni_del_duration_seconds_count"), 1.0);
    assert_eq!(v(r#"vpc_cni_pool_blocked{reason="max_pods"}"#), 1.0);
    assert!(v("vpc_cni_journal_size_bytes") > 0.0);
    assert!(v("vpc_cni_journal_sync_duration_seconds_count") >= 4.0);

    // Nothing that names a pod.
    assert!(!text.contains("metrics-pod"), "{text}");

    // The dedicated listener serves the same families.
    let (status, again) = get_any(ports[1], "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        again.lines().filter(|l| l.starts_with("# TYPE")).count(),
        text.lines().filter(|l| l.starts_with("# TYPE")).count()
    );

    // The Grafana dashboard shipped with the chart asks only for series
    // this exposition has.
    let mut known = std::collections::BTreeSet::new();
    for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut w = l.split_whitespace().skip(2);
        let (name, kind) = (w.next().unwrap(), w.next().unwrap());
        known.insert(name.to_string());
        if kind == "histogram" {
            for s in ["_bucket", "_sum", "_count"] {
                known.insert(format!("{name}{s}"));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("charts/vpc-cni/files/grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut ids = std::collections::BTreeSet::new();
    let mut used = 0;
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("a panel id")),
            "duplicate id"
        );
        assert!(!p["title"].as_str().unwrap_or_default().is_empty());
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("an expr");
            let names = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("awscni_") || w.starts_with("vpc_cni_"));
            for name in names {
                assert!(
                    known.contains(name),
                    "panel {:?} asks for {name}, which /metrics lacks",
                    p["title"]
                );
                used += 1;
            }
        }
    }
    assert!(used >= 20, "{used}");

    // promtool: no finding beyond the listed ones from aws-node's names.
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let script = root.join("scripts/check-metrics.sh");
    let out = std::process::Command::new(script)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
