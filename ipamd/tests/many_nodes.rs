//! A hundred real ipamd processes started at once on one shared simulated
//! account (a `vpc-sim` server), default settings, then every node given
//! the pods it has room for. EC2's account-wide buckets throttle many
//! calls; every node must start and every pod be served (the kubelet
//! retries an ADD that failed after its wait).

mod support;

use std::time::{Duration, Instant};

use support::{add_request, free_ports, Daemon, DaemonSpec, SimServer};
use vpc_sim::VpcConfig;

const NODES: usize = 100;
/// m5.large: 3 interfaces x 9 secondary addresses.
const PODS: usize = 27;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_ipamd_processes_on_one_account_all_start_and_serve_every_pod() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        dir.path(),
        VpcConfig {
            attach_latency: Duration::from_millis(500),
            ..VpcConfig::default()
        },
    )
    .await;
    let ports = free_ports(NODES);
    let starts = (0..NODES).map(|n| {
        let introspection = ports[n];
        let node_dir = dir.path().join(format!("n{n}"));
        std::fs::create_dir_all(&node_dir).unwrap();
        let addr = sim.addr.clone();
        async move {
            let name = format!("node-{n}");
            Daemon::start(&DaemonSpec {
                dir: &node_dir,
                sim: &addr,
                node: &name,
                instance_type: "m5.large",
                env: &[],
                introspection,
            })
            .await
        }
    });
    // Daemon::start panics with the log if a process exits at start.
    let daemons = futures_util::future::join_all(starts).await;
    assert_eq!(daemons.len(), NODES);

    let deadline = Instant::now() + Duration::from_secs(240);
    let pods = daemons.iter().flat_map(|d| {
        (0..PODS).map(move |p| {
            let socket = d.socket.clone();
            async move {
                let mut c = ipamd_api::client(&socket).await.unwrap();
                let mut failures = 0;
                loop {
                    let r = c.add_network(add_request(&format!("pod-{p}"))).await;
                    match r {
                        Ok(a) => return (a.into_inner().ipv4_address, failures),
                        Err(s) => {
                            assert!(
                                Instant::now() < deadline,
                                "pod-{p} on {} never served: {s:?}",
                                socket.display()
                            );
                            failures += 1;
                            // As the kubelet retries a failed sandbox.
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    }
                }
            }
        })
    });
    let served = futures_util::future::join_all(pods).await;
    assert_eq!(served.len(), NODES * PODS);
    let mut ips: Vec<&String> = served.iter().map(|(ip, _)| ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), NODES * PODS, "an address was given to two pods");
    let (_, throttled) = sim.vpc.call_counts();
    assert!(
        throttled.values().sum::<u64>() > 0,
        "the account never throttled: the test shows nothing"
    );
    for mut d in daemons {
        assert!(d.terminate().await.success());
    }
}
