//! `arm-writes`: Azure Resource Manager writes per 100 pods scheduled to a
//! node, per pool policy, in one run: ipamd's production pool and
//! reconciler on the Azure provider against the fake ARM and IMDS (over
//! HTTP on loopback, ARM's buckets on, each PUT's operation in progress for
//! `--operation-ms`).
//!
//! Per policy: the pods arrive one every `--arrival-ms`, stay, then all go;
//! printed are the NIC PUTs (ARM writes) while they arrive and after they
//! went (the pool shrinking once its addresses cooled), ARM reads, the ADD
//! wait p50/max, and the idle addresses at the peak and at the end. The
//! floor: one PUT can carry every address the pods need, and one can take
//! them back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ipamd::config::Settings;
use ipamd::datastore::PodKey;
use ipamd::ipam::Ipam;
use ipamd::journal::MemStore;
use ipamd::node::NodeTracker;
use ipamd::pool::JournalAt;
use providers::azure::{AzureProvider, AzureSettings, FederatedToken, Identity};
use providers::layer::CallLayer;
use vpc_sim::azure::{ArmConfig, ArmFake};
use vpc_sim::{Request, Vpc, VpcConfig};

#[derive(Parser, Debug)]
#[command(about = "ARM writes per 100 pods, per pool policy")]
struct Args {
    /// Pods scheduled to the node.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Milliseconds between two pods' ADDs.
    #[arg(long, default_value_t = 400)]
    arrival_ms: u64,
    /// Milliseconds a PUT's operation stays in progress.
    #[arg(long, default_value_t = 200)]
    operation_ms: u64,
}

struct Row {
    policy: &'static str,
    grow_writes: u64,
    shrink_writes: u64,
    reads: u64,
    wait_p50: Duration,
    wait_max: Duration,
    idle_peak: u64,
    idle_end: u64,
}

fn available(ipam: &Ipam) -> u64 {
    let s = ipam.summary();
    let count = |k: &str| s["counts"][k].as_u64().unwrap_or(0);
    count("available") + count("cooling")
}

async fn run(a: &Args, policy: &'static str, env: &[(&str, &str)]) -> Row {
    let vpc = Arc::new(Vpc::with_config(VpcConfig {
        throttling: false,
        ..VpcConfig::default()
    }));
    vpc.handle(Request::LaunchInstance {
        name: "vm-a".into(),
        instance_type: "Standard_D8s_v3".into(),
        subnet_id: None,
    })
    .await
    .expect("launch");
    let fake = ArmFake::new(
        vpc.clone(),
        ArmConfig {
            operation_delay: Duration::from_millis(a.operation_ms),
            default_vm: Some("vm-a".into()),
            ..ArmConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(vpc_sim::azure::serve(fake.clone(), listener));
    let provider = AzureProvider::connect(
        AzureSettings {
            arm_endpoint: url.clone(),
            imds_endpoint: url.clone(),
            identity: Identity::Workload {
                tenant_id: "tenant".into(),
                client_id: "client".into(),
                token: FederatedToken::Value("sa-token".into()),
                authority_host: format!("{url}/"),
            },
            ..AzureSettings::default()
        },
        CallLayer::arm(),
    )
    .await
    .expect("azure provider");
    let mut vars: Vec<(&str, &str)> = vec![("IP_COOLDOWN_PERIOD", "1")];
    vars.extend_from_slice(env);
    let m: std::collections::HashMap<&str, &str> = vars.into_iter().collect();
    let settings = Settings::from_source(&m).expect("settings");
    let ipam = Ipam::start_with(
        Arc::new(provider),
        settings,
        JournalAt::Memory(MemStore::default()),
        NodeTracker::nothing(),
    )
    .await
    .expect("ipam");
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(ipam.clone().run(rx));
    // Ready: the pool's first batch is there.
    let t = Instant::now();
    while ipam.readiness().is_err() && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let key = |i: usize| PodKey {
        network: "vpc-cni".into(),
        container_id: format!("pod-{i:03}"),
        ifname: "eth0".into(),
    };
    let mut adds = vec![];
    for i in 0..a.pods {
        let ipam = ipam.clone();
        let k = key(i);
        adds.push(tokio::spawn(async move {
            let t = Instant::now();
            ipam.add(k).await.expect("pod served");
            t.elapsed()
        }));
        tokio::time::sleep(Duration::from_millis(a.arrival_ms)).await;
    }
    let mut idle_peak = available(&ipam);
    let mut waits = vec![];
    for h in adds {
        waits.push(h.await.expect("add task"));
        idle_peak = idle_peak.max(available(&ipam));
    }
    // Settled: no write for `quiet_for` (the reconciler's periodic step,
    // which releases what has cooled, comes every 5 s).
    let settle = |fake: Arc<ArmFake>, quiet_for: Duration| async move {
        let mut last = fake.counts().writes;
        let mut quiet = Instant::now();
        while quiet.elapsed() < quiet_for {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = fake.counts().writes;
            if now != last {
                last = now;
                quiet = Instant::now();
            }
        }
        last
    };
    let grown = settle(fake.clone(), Duration::from_secs(2)).await;
    idle_peak = idle_peak.max(available(&ipam));
    for i in 0..a.pods {
        ipam.del(key(i)).await.expect("del");
    }
    let all = settle(fake.clone(), Duration::from_secs(8)).await;
    let idle_end = available(&ipam);
    stop.send(true).ok();
    task.await.ok();
    server.abort();
    waits.sort();
    Row {
        policy,
        grow_writes: grown,
        shrink_writes: all - grown,
        reads: fake.counts().reads,
        wait_p50: waits[waits.len() / 2],
        wait_max: *waits.last().expect("pods"),
        idle_peak,
        idle_end,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = Args::parse();
    println!(
        "arm-writes: {} pods on one Standard_D8s_v3 (1 NIC, 256 ip-configurations), one every {} ms, ARM operations {} ms, cooldown 1 s",
        a.pods, a.arrival_ms, a.operation_ms
    );
    println!(
        "{:<46} {:>11} {:>12} {:>9} {:>6} {:>20} {:>14}",
        "policy",
        "PUTs grow",
        "PUTs shrink",
        "per 100",
        "reads",
        "ADD wait p50/max ms",
        "idle peak/end"
    );
    let t = Instant::now();
    let policies: [(&'static str, &[(&str, &str)]); 3] = [
        (
            "Azure CNS batches (16, 50%, 150%)",
            &[("IPAM_SCALER_BATCH_SIZE", "16")],
        ),
        ("WARM_IP_TARGET=5", &[("WARM_IP_TARGET", "5")]),
        (
            "WARM_IP_TARGET=5 MINIMUM_IP_TARGET=10",
            &[("WARM_IP_TARGET", "5"), ("MINIMUM_IP_TARGET", "10")],
        ),
    ];
    for (name, env) in policies {
        let r = run(&a, name, env).await;
        let total = r.grow_writes + r.shrink_writes;
        println!(
            "{:<46} {:>11} {:>12} {:>9.1} {:>6} {:>20} {:>14}",
            r.policy,
            r.grow_writes,
            r.shrink_writes,
            total as f64 * 100.0 / a.pods as f64,
            r.reads,
            format!("{}/{}", r.wait_p50.as_millis(), r.wait_max.as_millis()),
            format!("{}/{}", r.idle_peak, r.idle_end),
        );
    }
    println!(
        "floor: 1 PUT can carry every address {} pods need and 1 can take them back (2 writes; {:.1} per 100 pods)",
        a.pods,
        200.0 / a.pods as f64
    );
    println!("bench: {:.1} s wall", t.elapsed().as_secs_f64());
}
