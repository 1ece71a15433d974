//! Crash safety of the real ipamd binary: 16 clients drive Add/Del over the
//! socket, ipamd is killed with SIGKILL at random moments and restarted, and
//! after each restart the clients' answers, the journal and the simulated VPC
//! must agree: no address assigned twice, none lost.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use support::*;
use support::{add_request as add, del_request as del};
use tonic::Code;

const CLIENTS: usize = 16;
const MIN_CALLS: u64 = 1_000;
const MIN_KILLS: usize = 4;
const NODE: &str = "node-crash";

/// What a client was told about one of its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// ADD answered with this address, no DEL answered since.
    Held(Ipv4Addr),
    /// DEL answered (or ADD refused): holds nothing.
    Gone,
    /// A call was in flight when ipamd died: either outcome is allowed.
    Unsure,
}

type Model = Arc<Mutex<BTreeMap<String, Known>>>;

/// One client: its own pods, added and deleted at random until ipamd dies.
async fn client(
    n: usize,
    socket: std::path::PathBuf,
    model: Model,
    calls: Arc<AtomicU64>,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ n as u64);
    let Ok(mut c) = ipamd_api::client(&socket).await else {
        return;
    };
    let mut held: Vec<String> = model
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, v)| k.starts_with(&format!("c{n}-")) && matches!(v, Known::Held(_)))
        .map(|(k, _)| k.clone())
        .collect();
    let mut next = 0u64;
    loop {
        if held.len() < 2 || (held.len() < 6 && rng.random_bool(0.55)) {
            let id = format!("c{n}-{}-{next}", rng.random::<u32>());
            next += 1;
            model.lock().unwrap().insert(id.clone(), Known::Unsure);
            match c.add_network(add(&id)).await {
                Ok(r) => {
                    let ip = r.into_inner().ipv4_address.parse().unwrap();
                    model.lock().unwrap().insert(id.clone(), Known::Held(ip));
                    held.push(id);
                }
                Err(s) if s.code() == Code::ResourceExhausted => {
                    model.lock().unwrap().insert(id, Known::Gone);
                }
                Err(_) => return, // ipamd died mid-call: stays Unsure
            }
        } else {
            let id = held.swap_remove(rng.random_range(0..held.len()));
            model.lock().unwrap().insert(id.clone(), Known::Unsure);
            match c.del_network(del(&id)).await {
                Ok(_) => {
                    model.lock().unwrap().insert(id, Known::Gone);
                }
                Err(_) => return,
            }
        }
        calls.fetch_add(1, Ordering::Relaxed);
    }
}

/// Checks one snapshot of assignments (from ipamd or the journal) against
/// what the clients were told.
fn check(what: &str, assigned: &[(String, Ipv4Addr)], model: &BTreeMap<String, Known>) {
    let mut by_ip: HashMap<Ipv4Addr, &str> = HashMap::new();
    for (id, ip) in assigned {
        if let Some(other) = by_ip.insert(*ip, id) {
            panic!("{what}: {ip} assigned to both {other} and {id}");
        }
        match model.get(id) {
            Some(Known::Held(h)) => assert_eq!(h, ip, "{what}: {id} was told {h}, holds {ip}"),
            Some(Known::Unsure) => {}
            Some(Known::Gone) => panic!("{what}: {id} holds {ip} after its DEL was acknowledged"),
            None => panic!("{what}: {id} was never asked for"),
        }
    }
    let held: BTreeMap<&str, Ipv4Addr> = assigned.iter().map(|(k, ip)| (k.as_str(), *ip)).collect();
    for (id, k) in model {
        if let Known::Held(ip) = k {
            assert_eq!(
                held.get(id.as_str()),
                Some(ip),
                "{what}: acknowledged {id} -> {ip} was lost"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let seed: u64 = rand::rng().random();
    eprintln!("crash test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        dir.path(),
        vpc_sim::VpcConfig {
            attach_latency: Duration::from_millis(50),
            ..Default::default()
        },
    )
    .await;
    let env = [
        ("WARM_IP_TARGET", "16"),
        ("MINIMUM_IP_TARGET", "32"),
        ("IP_COOLDOWN_PERIOD", "1"),
        ("IPAMD_ADD_WAIT_SECONDS", "10"),
    ];
    let spec = |port| DaemonSpec {
        dir: dir.path(),
        sim: &sim.addr,
        node: NODE,
        instance_type: "m5.4xlarge",
        env: &env,
        introspection: port,
    };
    let model: Model = Arc::default();
    let calls = Arc::new(AtomicU64::new(0));
    let mut kills = 0;
    let mut daemon = Daemon::start(&spec(free_port())).await;
    while kills < MIN_KILLS || calls.load(Ordering::Relaxed) < MIN_CALLS {
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|n| {
                tokio::spawn(client(
                    n,
                    daemon.socket.clone(),
                    model.clone(),
                    calls.clone(),
                    seed.wrapping_add(kills as u64 * 101),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        daemon.kill().await;
        kills += 1;
        for t in tasks {
            t.await.unwrap();
        }
        let snapshot = model.lock().unwrap().clone();

        // The journal, as the dead daemon left it (replayed from a copy).
        let copy = dir.path().join("journal.copy");
        std::fs::copy(daemon.journal(), &copy).unwrap();
        let replayed = ipamd::journal::replay(&copy).unwrap();
        let from_journal: Vec<(String, Ipv4Addr)> = replayed
            .assignments
            .iter()
            .map(|(k, ip)| (k.container_id.clone(), *ip))
            .collect();
        check("journal", &from_journal, &snapshot);

        daemon = Daemon::start(&spec(free_port())).await;
        let assigned = daemon.assignments().await;
        check("restarted ipamd", &assigned, &snapshot);

        // Pool and cloud agree once the calls in flight settle: ipamd holds
        // no address the cloud lacks and misses none it has. While the
        // reconciler grows or shrinks the pool the two differ for the length
        // of a cloud call (the cloud changes first), so a difference counts
        // only if it lasts.
        let mut last = (vec![], vec![]);
        let mut settled = false;
        for _ in 0..100 {
            let pool = daemon.pool_addresses().await;
            let cloud = cloud_addresses(&sim.vpc, NODE);
            if pool == cloud {
                settled = true;
                break;
            }
            last = (
                pool.iter()
                    .filter(|ip| !cloud.contains(ip))
                    .copied()
                    .collect::<Vec<_>>(),
                cloud
                    .iter()
                    .filter(|ip| !pool.contains(ip))
                    .copied()
                    .collect::<Vec<_>>(),
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            settled,
            "after restart, for 5 s: ipamd holds addresses the cloud does not: {:?}; \
             the cloud has addresses the pool lacks: {:?}",
            last.0, last.1
        );
        sim.vpc.snapshot().check_invariants().unwrap();

        // Calls that died in flight: the runtime retries DEL, as kubelet does.
        let unsure: Vec<String> = snapshot
            .iter()
            .filter(|(_, k)| **k == Known::Unsure)
            .map(|(id, _)| id.clone())
            .collect();
        let mut c = ipamd_api::client(&daemon.socket).await.unwrap();
        for id in unsure {
            c.del_network(del(&id)).await.unwrap();
            model.lock().unwrap().insert(id, Known::Gone);
        }
        check(
            "after retried DELs",
            &daemon.assignments().await,
            &model.lock().unwrap(),
        );
    }

    // Everyone leaves; nothing may stay assigned.
    let mut c = ipamd_api::client(&daemon.socket).await.unwrap();
    let held: Vec<String> = model
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, k)| matches!(k, Known::Held(_)))
        .map(|(id, _)| id.clone())
        .collect();
    for id in &held {
        assert!(c.del_network(del(id)).await.unwrap().into_inner().found);
    }
    assert!(daemon.assignments().await.is_empty());
    let status = daemon.terminate().await;
    assert!(status.success(), "ipamd exits 0 on SIGTERM: {status}");
    assert!(!daemon.socket.exists(), "socket removed on shutdown");
    let total = calls.load(Ordering::Relaxed);
    let leaked_detached = sim
        .vpc
        .snapshot()
        .interfaces
        .values()
        .filter(|e| e.attachment.is_none())
        .count();
    eprintln!(
        "crash test: {total} acknowledged calls, {kills} SIGKILLs, {} pods, {leaked_detached} created-but-unattached interfaces left for leaked-interface GC",
        model.lock().unwrap().len()
    );
    assert!(total >= MIN_CALLS);
}

/// Readiness and error answers of the real binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_64_listing_every_problem() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ipamd"))
        .env_clear()
        .env("WARM_IP_TARGET", "many")
        .env("MAX_ENI", "lots")
        .env("ENABLE_PREFIX_DELEGATION", "perhaps")
        .args([
            "--state-dir",
            "/nonexistent/never-created",
            "--socket",
            "/nonexistent/s.sock",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for k in ["WARM_IP_TARGET", "MAX_ENI", "ENABLE_PREFIX_DELEGATION"] {
        assert!(err.contains(k), "{k} not reported: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gets_an_actionable_error_when_ipamd_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let err = ipamd_api::client(dir.path().join("ipamd.sock"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is ipamd running?"), "{err}");
    assert!(err.contains("ipamd.sock"), "{err}");
}
