//! The CNI commands: ADD, DEL, CHECK, STATUS, GC, VERSION.

use std::net::Ipv4Addr;
use std::path::Path;

use ipamd_api::v1::ipamd_client::IpamdClient;
use ipamd_api::v1::{AddNetworkRequest, Attachment, DelNetworkRequest, GarbageCollectRequest};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::datapath::{self, Wire};
use crate::spec::{code, host_veth_name, AddResult, CniError, Command, Env, NetConf, SUPPORTED};

fn socket(conf: &NetConf) -> &str {
    conf.ipamd_socket
        .as_deref()
        .unwrap_or(ipamd_api::DEFAULT_SOCKET)
}

async fn ipamd(conf: &NetConf) -> Result<IpamdClient<Channel>, CniError> {
    ipamd_api::client(socket(conf))
        .await
        .map_err(|e| CniError::new(code::TRY_AGAIN_LATER, "ipamd is not reachable", e))
}

fn from_status(what: &str, s: tonic::Status) -> CniError {
    let c = match s.code() {
        // Pool empty past its wait, or ipamd draining: the runtime retries.
        tonic::Code::ResourceExhausted
        | tonic::Code::Unavailable
        | tonic::Code::DeadlineExceeded => code::TRY_AGAIN_LATER,
        tonic::Code::InvalidArgument => code::INVALID_CONFIG,
        _ => code::PLUGIN,
    };
    CniError::new(c, format!("{what} failed"), s.message())
}

fn dp_err(msg: &str) -> impl FnOnce(datapath::DatapathError) -> CniError + '_ {
    move |e| {
        let c = match &e {
            datapath::DatapathError::Netns { .. } => code::IO_FAILURE,
            _ => code::PLUGIN,
        };
        CniError::new(c, msg, e)
    }
}

/// Runs one command; `Ok(Some(v))` is printed on stdout.
pub async fn run(cmd: Command, env: &Env, conf: &NetConf) -> Result<Option<Value>, CniError> {
    match cmd {
        Command::Add => add(env, conf).await.map(Some),
        Command::Del => del(env, conf).await.map(|_| None),
        Command::Check => check(env, conf).await.map(|_| None),
        Command::Status => status(conf).await.map(|_| None),
        Command::Gc => gc(conf).await.map(|_| None),
        Command::Version => Ok(Some(version(&conf.cni_version))),
    }
}

pub fn version(asked: &str) -> Value {
    let v = if SUPPORTED.contains(&asked) {
        asked
    } else {
        "1.1.0"
    };
    json!({"cniVersion": v, "supportedVersions": SUPPORTED})
}

fn needs_1_1(cmd: &str, conf: &NetConf) -> Result<(), CniError> {
    if conf.cni_version != "1.1.0" {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{cmd} needs cniVersion 1.1.0"),
            format!("config has {}", conf.cni_version),
        ));
    }
    Ok(())
}

async fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let host_veth = host_veth_name(conf.veth_prefix(), &env.container_id, &env.ifname);
    let host = datapath::handle_here().map_err(dp_err("netlink"))?;
    let request = AddNetworkRequest {
        network_name: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        pod_namespace: env
            .args
            .get("K8S_POD_NAMESPACE")
            .cloned()
            .unwrap_or_default(),
        pod_name: env.args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
    };
    // The veth does not need the address: make it while ipamd answers.
    let ask = async {
        let mut client = ipamd(conf).await?;
        let reply = client
            .add_network(request)
            .await
            .map_err(|s| from_status("AddNetwork", s))?
            .into_inner();
        Ok::<_, CniError>((client, reply))
    };
    let (asked, veth) = tokio::join!(
        ask,
        datapath::create_veth(
            &host,
            &host_veth,
            &env.ifname,
            Path::new(&env.netns),
            conf.mtu()
        )
    );
    let (mut client, reply, veth) = match (asked, veth) {
        (Ok((c, r)), Ok(v)) => (c, r, v),
        (Err(e), veth) => {
            if let Ok(v) = veth {
                v.remove(&host).await;
            }
            return Err(e);
        }
        (Ok((mut c, _)), Err(e)) => {
            release(&mut c, env, conf).await;
            return Err(dp_err("wiring the pod failed")(e));
        }
    };
    let ip: Ipv4Addr = match reply.ipv4_address.parse() {
        Ok(ip) => ip,
        Err(e) => {
            veth.remove(&host).await;
            return Err(CniError::new(
                code::PLUGIN,
                "ipamd answered a bad address",
                e,
            ));
        }
    };
    let table = reply
        .interface
        .as_ref()
        .map_or(datapath::MAIN_TABLE, |i| i.route_table);
    let fail_after = std::env::var("VPC_CNI_FAIL_AFTER").ok();
    let wire = Wire {
        host_veth: &host_veth,
        pod_ifname: &env.ifname,
        netns: Path::new(&env.netns),
        ip,
        route_table: table,
        mtu: conf.mtu(),
        fail_after: fail_after.as_deref(),
    };
    let wired = match datapath::wire(&host, veth, &wire).await {
        Ok(w) => w,
        Err(e) => {
            // Nothing of the pod is left in the host; give the address back.
            release(&mut client, env, conf).await;
            return Err(dp_err("wiring the pod failed")(e));
        }
    };
    info!(container = %env.container_id, %ip, veth = %host_veth, table, "pod wired");
    Ok(AddResult {
        host_ifname: host_veth,
        host_mac: wired.host_mac,
        pod_ifname: env.ifname.clone(),
        pod_mac: wired.pod_mac,
        netns: env.netns.clone(),
        ip,
        gateway: datapath::GATEWAY,
    }
    .to_json(&conf.cni_version))
}

async fn release(client: &mut IpamdClient<Channel>, env: &Env, conf: &NetConf) {
    if let Err(s) = client.del_network(del_request(env, conf)).await {
        warn!(error = %s.message(), "could not release the address after a failed ADD");
    }
}

fn del_request(env: &Env, conf: &NetConf) -> DelNetworkRequest {
    DelNetworkRequest {
        network_name: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

async fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    // ipamd first: once it has the address back, nothing can route to a
    // pod that is going away. If it is down, tear down from prevResult; it
    // reclaims the address when it sees the pod gone.
    let (ip, table) = match ipamd(conf).await {
        Ok(mut c) => {
            let r = c
                .del_network(del_request(env, conf))
                .await
                .map_err(|s| from_status("DelNetwork", s))?
                .into_inner();
            if r.found {
                (
                    r.ipv4_address.parse().ok(),
                    r.interface.map(|i| i.route_table),
                )
            } else {
                (conf.prev_ipv4(), None)
            }
        }
        Err(e) => {
            warn!(error = %e, "ipamd unreachable on DEL; tearing down from prevResult");
            (conf.prev_ipv4(), None)
        }
    };
    let host_veth = host_veth_name(conf.veth_prefix(), &env.container_id, &env.ifname);
    let host = datapath::handle_here().map_err(dp_err("netlink"))?;
    let netns = (!env.netns.is_empty()).then(|| Path::new(&env.netns));
    let errors = datapath::del(&host, &host_veth, netns, ip, table).await;
    if !errors.is_empty() {
        return Err(CniError::new(
            code::PLUGIN,
            "DEL could not remove everything",
            errors.join("; "),
        ));
    }
    info!(container = %env.container_id, ip = ?ip, "pod unwired");
    Ok(())
}

async fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let ip = conf.prev_ipv4().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult with the pod's address",
            "",
        )
    })?;
    let mut client = ipamd(conf).await?;
    let r = client
        .get_network(del_request(env, conf))
        .await
        .map_err(|s| from_status("GetNetwork", s))?
        .into_inner();
    if !r.found || r.ipv4_address != ip.to_string() {
        return Err(CniError::new(
            code::PLUGIN,
            "ipamd does not hold the pod's address",
            format!("prevResult has {ip}; ipamd has {:?}", r.ipv4_address),
        ));
    }
    let host_veth = host_veth_name(conf.veth_prefix(), &env.container_id, &env.ifname);
    let host = datapath::handle_here().map_err(dp_err("netlink"))?;
    let wire = Wire {
        host_veth: &host_veth,
        pod_ifname: &env.ifname,
        netns: Path::new(&env.netns),
        ip,
        route_table: r.interface.map_or(datapath::MAIN_TABLE, |i| i.route_table),
        mtu: conf.mtu(),
        fail_after: None,
    };
    datapath::check(&host, &wire).await.map_err(|bad| {
        CniError::new(
            code::PLUGIN,
            "CHECK found the pod's network not as ADD left it",
            bad.join("; "),
        )
    })
}

async fn status(conf: &NetConf) -> Result<(), CniError> {
    needs_1_1("STATUS", conf)?;
    let channel = ipamd_api::connect(socket(conf))
        .await
        .map_err(|e| CniError::new(code::NOT_AVAILABLE, "ipamd is not reachable", e))?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "vpccni.ipamd.v1.Ipamd".into(),
        })
        .await
        .map_err(|s| {
            CniError::new(
                code::NOT_AVAILABLE,
                "ipamd health check failed",
                s.message(),
            )
        })?;
    if r.into_inner().status
        != tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    {
        return Err(CniError::new(
            code::NOT_AVAILABLE,
            "ipamd is not serving",
            "",
        ));
    }
    Ok(())
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    needs_1_1("GC", conf)?;
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let mut client = ipamd(conf).await?;
    let released = client
        .garbage_collect(GarbageCollectRequest {
            network_name: conf.name.clone(),
            valid: valid
                .into_iter()
                .map(|a| Attachment {
                    container_id: a.container_id,
                    ifname: a.ifname,
                })
                .collect(),
        })
        .await
        .map_err(|s| from_status("GarbageCollect", s))?
        .into_inner()
        .released;
    let host = datapath::handle_here().map_err(dp_err("netlink"))?;
    let mut errors = vec![];
    for r in released {
        let Ok(ip) = r.ipv4_address.parse::<Ipv4Addr>() else {
            continue;
        };
        let table = r.interface.map(|i| i.route_table);
        // The pod's namespace is gone already: only rules and the route remain.
        errors.extend(datapath::del(&host, "", None, Some(ip), table).await);
        info!(%ip, "garbage-collected a stale attachment");
    }
    if !errors.is_empty() {
        return Err(CniError::new(
            code::PLUGIN,
            "GC could not remove everything",
            errors.join("; "),
        ));
    }
    Ok(())
}
