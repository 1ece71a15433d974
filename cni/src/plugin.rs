//! The CNI commands: ADD, DEL, CHECK, STATUS, GC, VERSION.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;
use std::pin::Pin;
use std::task::Poll;

use ipamd_api::fast::{FastError, Sent};
use ipamd_api::v1::ipamd_client::IpamdClient;
use ipamd_api::v1::{
    AddNetworkReply, AddNetworkRequest, Attachment, DelNetworkRequest, GarbageCollectRequest,
};
use ipamd_api::Connection;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::datapath::{self, DatapathError, Wire};
use crate::netns::{Pod, Stranded};
use crate::nlsync::Netlink;
use crate::spec::{host_veth_name, AddResult, CniError, Command, Env, Msg, NetConf, SUPPORTED};

fn socket(conf: &NetConf) -> &str {
    conf.ipamd_socket
        .as_deref()
        .unwrap_or(ipamd_api::DEFAULT_SOCKET)
}

async fn ipamd(conf: &NetConf) -> Result<IpamdClient<Connection>, CniError> {
    ipamd_at(socket(conf)).await
}

async fn ipamd_at(socket: &str) -> Result<IpamdClient<Connection>, CniError> {
    ipamd_api::client_once(socket)
        .await
        .map_err(|e| CniError::IpamdUnreachable(Msg::new("ipamd is not reachable", e)))
}

fn from_status(what: &str, s: tonic::Status) -> CniError {
    let m = Msg::new(format!("{what} failed"), s.message());
    match s.code() {
        // Pool empty past its wait, or ipamd draining: the runtime retries.
        tonic::Code::ResourceExhausted
        | tonic::Code::Unavailable
        | tonic::Code::DeadlineExceeded => CniError::TryAgainLater(m),
        tonic::Code::InvalidArgument => CniError::InvalidConfig(m),
        _ => CniError::Ipamd(m),
    }
}

fn dp_err(msg: &str) -> impl FnOnce(datapath::DatapathError) -> CniError + '_ {
    move |e| match &e {
        datapath::DatapathError::Netns { .. } => CniError::IoFailure(Msg::new(msg, e)),
        _ => CniError::Datapath(Msg::new(msg, e)),
    }
}

/// The sockets CHECK needs in the pod's namespace, opened while the
/// single-threaded runtime can run nothing, outside `block_on` (see
/// [`crate::netns`]). `Err` means the plugin must exit at once.
pub fn prestart(
    cmd: Command,
    netns: &str,
    runtime: &tokio::runtime::Runtime,
) -> Result<Option<Result<Pod, DatapathError>>, Stranded> {
    match cmd {
        Command::Check => Pod::open(Path::new(netns), Some(runtime)).map(Some),
        _ => Ok(None),
    }
}

/// Runs one command but ADD (see [`start_add`] and [`add`]) and VERSION;
/// `Ok(Some(v))` is printed on stdout. `pod` is what [`prestart`] opened.
pub async fn run(
    cmd: Command,
    env: &Env,
    conf: &NetConf,
    pod: Option<Result<Pod, DatapathError>>,
) -> Result<Option<Value>, CniError> {
    match cmd {
        Command::Add => Err(CniError::Internal(Msg::new(
            "ADD runs without the runtime (plugin::add)",
            "",
        ))),
        Command::Del => del(env, conf).await.map(|_| None),
        Command::Check => {
            let pod = pod
                .unwrap_or_else(|| {
                    Err(DatapathError::Other(
                        "the pod's namespace was not opened".into(),
                    ))
                })
                .map_err(dp_err("entering the pod's namespace"))?;
            check(env, conf, pod).await.map(|_| None)
        }
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
        return Err(CniError::IncompatibleVersion(Msg::new(
            format!("{cmd} needs cniVersion 1.1.0"),
            format!("config has {}", conf.cni_version),
        )));
    }
    Ok(())
}

/// How many times [`send_grpc`] lets the runtime's tasks run: enough for the
/// request to pass the client's tasks and reach ipamd's socket.
const REQUEST_HEAD_START: usize = 4;

type Answer = Result<AddNetworkReply, CniError>;

/// ADD's call to ipamd once sent.
pub enum Ask {
    /// On the fast path (see [`ipamd_api::fast`]): no runtime at all.
    Fast(Sent),
    /// Over gRPC, for an ipamd without the fast path.
    Grpc(Box<GrpcCall>),
}

/// An AddNetwork over gRPC: answered already (a refused connection is), or
/// on its way on `runtime`.
pub struct GrpcCall {
    runtime: tokio::runtime::Runtime,
    answered: Option<Answer>,
    waiting: Option<Pin<Box<dyn Future<Output = Answer>>>>,
}

impl Ask {
    fn answered_error(&self) -> Option<CniError> {
        match self {
            Ask::Grpc(g) => g.answered.as_ref().and_then(|a| a.as_ref().err().cloned()),
            Ask::Fast(_) => None,
        }
    }

    fn answer(self) -> Answer {
        match self {
            Ask::Fast(sent) => sent.answer().map_err(|e| match e {
                FastError::Status(s) => from_status("AddNetwork", s),
                FastError::Io(e) => {
                    CniError::IpamdUnreachable(Msg::new("the call to ipamd failed", e))
                }
                FastError::Unavailable(e) => {
                    CniError::IpamdUnreachable(Msg::new("ipamd is not reachable", e))
                }
            }),
            Ask::Grpc(g) => match (g.answered, g.waiting) {
                (Some(answer), _) => answer,
                (None, Some(call)) => g.runtime.block_on(call),
                (None, None) => Err(CniError::Internal(Msg::new("no call to ipamd", ""))),
            },
        }
    }
}

fn add_request(env: &Env, conf: &NetConf, netns: (u64, u64)) -> AddNetworkRequest {
    AddNetworkRequest {
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
        netns_dev: netns.0,
        netns_ino: netns.1,
    }
}

/// The pod's namespace must be one before ipamd is asked for anything: its
/// identity (device, inode) lets ipamd tell later whether the pod is gone
/// (see the proto's `netns_dev`), and a bad path must not cost an address.
/// Refused (code 4): a path that does not exist, that is not a namespace
/// (nsfs), or that is the plugin's own network namespace (the node's: the
/// pod's end would be wired into the node).
fn netns_identity(netns: &str) -> Result<(u64, u64), CniError> {
    use std::os::unix::fs::MetadataExt;
    let bad = |why: String| {
        CniError::InvalidEnv(Msg::new(
            "CNI_NETNS is not a pod's network namespace",
            format!("{netns}: {why}"),
        ))
    };
    let id = std::fs::metadata(netns)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| bad(e.to_string()))?;
    let fs = nix::sys::statfs::statfs(netns).map_err(|e| bad(e.to_string()))?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(bad("not a namespace (nsfs)".into()));
    }
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| (m.dev(), m.ino()));
    if own.is_ok_and(|own| own == id) {
        return Err(bad("the plugin's own (the node's) network namespace".into()));
    }
    Ok(id)
}

/// The first half of ADD: sends AddNetwork and returns with the answer
/// still to come, so that what the plugin does next (entering the pod's
/// namespace, making the veth) overlaps ipamd's work. On the fast path this
/// is a connect and a write, without any runtime; an ipamd without the fast
/// path is asked over gRPC on a runtime made for it.
pub fn start_add(env: &Env, conf: &NetConf) -> Result<Ask, CniError> {
    let request = add_request(env, conf, netns_identity(&env.netns)?);
    match ipamd_api::fast::send(Path::new(socket(conf)), &request) {
        Ok(sent) => return Ok(Ask::Fast(sent)),
        Err(FastError::Unavailable(_)) => {}
        Err(e) => {
            return Err(CniError::IpamdUnreachable(Msg::new(
                "cannot send the request to ipamd",
                e,
            )))
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::IoFailure(Msg::new("cannot start the runtime", e)))?;
    let (answered, waiting) = rt.block_on(send_grpc(socket(conf).to_string(), request));
    Ok(Ask::Grpc(Box::new(GrpcCall {
        runtime: rt,
        answered,
        waiting,
    })))
}

/// AddNetwork over gRPC, driven until the request is on its way.
async fn send_grpc(
    socket: String,
    request: AddNetworkRequest,
) -> (
    Option<Answer>,
    Option<Pin<Box<dyn Future<Output = Answer>>>>,
) {
    let mut call: Pin<Box<dyn Future<Output = Answer>>> = Box::pin(async move {
        let mut client = ipamd_at(&socket).await?;
        let reply = client
            .add_network(request)
            .await
            .map_err(|s| from_status("AddNetwork", s))?
            .into_inner();
        Ok(reply)
    });
    for _ in 0..REQUEST_HEAD_START {
        if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await
        {
            return (Some(r), None);
        }
        tokio::task::yield_now().await;
    }
    (None, Some(call))
}

/// Gives the address back after a failed ADD (on a runtime of its own: ADD
/// runs without one).
fn release_now(env: &Env, conf: &NetConf) {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(release(env, conf)),
        Err(e) => warn!(error = %e, "could not release the address after a failed ADD"),
    }
}

/// The second half of ADD, once [`start_add`] has sent the request: makes
/// the veth and the pod's routes (they do not need the address; the
/// synchronous netlink holds this thread in the kernel for a few hundred
/// microseconds, see [`crate::nlsync`]) while ipamd answers, then wires the
/// address. Synchronous: no runtime on the fast path. Measured on a 2-vCPU
/// VM, a second thread for either half did worse: a new thread waited 0.2
/// to 0.6 ms for a CPU.
pub fn add(
    env: &Env,
    conf: &NetConf,
    pod: Result<Pod, DatapathError>,
    ask: Ask,
) -> Result<Value, CniError> {
    // Nothing to wire if ipamd could not be asked or said no.
    if let Some(e) = ask.answered_error() {
        return Err(e);
    }
    let host_veth = host_veth_name(conf.veth_prefix(), &env.container_id, &env.ifname);
    // While ipamd answers the request already sent.
    let made = pod.and_then(|mut pod| {
        let mut host = Netlink::open().map_err(|source| DatapathError::Io {
            step: "netlink socket",
            source,
        })?;
        let pair = datapath::PairSpec {
            host_veth: &host_veth,
            pod_ifname: &env.ifname,
            mtu: conf.mtu(),
            queues: conf.veth_queues(),
        };
        let veth = datapath::create_veth(&mut host, &mut pod, &pair)?;
        Ok((host, pod, veth))
    });
    let asked = ask.answer();
    let (reply, (mut host, mut pod, veth)) = match (asked, made) {
        (Ok(r), Ok(m)) => (r, m),
        (Err(e), made) => {
            if let Ok((mut host, _, v)) = made {
                v.remove(&mut host);
            }
            return Err(e);
        }
        (Ok(_), Err(e)) => {
            release_now(env, conf);
            return Err(dp_err("wiring the pod failed")(e));
        }
    };
    let ip: Ipv4Addr = match reply.ipv4_address.parse() {
        Ok(ip) => ip,
        Err(e) => {
            veth.remove(&mut host);
            release_now(env, conf);
            return Err(CniError::Ipamd(Msg::new("ipamd answered a bad address", e)));
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
        ip,
        route_table: table,
        fail_after: fail_after.as_deref(),
    };
    let wired = match datapath::wire(&mut host, &mut pod, veth, &wire) {
        Ok(w) => w,
        Err(e) => {
            // Nothing of the pod is left in the host; give the address back.
            release_now(env, conf);
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
        gateway: datapath::POD_GATEWAY,
    }
    .to_json(&conf.cni_version))
}

async fn release(env: &Env, conf: &NetConf) {
    let released = match ipamd(conf).await {
        Ok(mut c) => c
            .del_network(del_request(env, conf))
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = released {
        warn!(error = %e, "could not release the address after a failed ADD");
    }
}

fn del_request(env: &Env, conf: &NetConf) -> DelNetworkRequest {
    DelNetworkRequest {
        network_name: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        ..Default::default()
    }
}

/// `ip` if the node state for it (rules, host route) is this attachment's
/// to remove: not when ipamd says another attachment holds it, nor when
/// the host routes it to another pod's veth (a late or repeated DEL whose
/// prevResult names an address given out again since). Unsure is no.
async fn ours(
    host: &rtnetlink::Handle,
    host_veth: &str,
    ip: Option<Ipv4Addr>,
    held_elsewhere: bool,
    errors: &mut Vec<String>,
) -> Option<Ipv4Addr> {
    let ip = ip?;
    if held_elsewhere {
        info!(%ip, "another attachment holds this address now; leaving its rules and route");
        return None;
    }
    match datapath::held_elsewhere_on_host(host, host_veth, ip).await {
        Ok(false) => Some(ip),
        Ok(true) => {
            info!(%ip, "another pod or a host interface holds this address; leaving its rules and route");
            None
        }
        Err(e) => {
            errors.push(format!("cannot tell who holds {ip}, left its rules: {e}"));
            None
        }
    }
}

async fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    // ipamd first: once it has the address back, nothing can route to a
    // pod that is going away. If it is down, tear down from prevResult; it
    // reclaims the address when it sees the pod gone.
    let prev = conf.prev_ipv4();
    // `found`: ipamd released this attachment's address, so the rules of
    // that address are this attachment's whatever link the host route
    // names (a pod wired by aws-node before the node moved to vpc-cni has
    // aws-node's veth name); otherwise they are judged on the host.
    let (ip, table, held_elsewhere, found) = match ipamd(conf).await {
        Ok(mut c) => {
            let mut request = del_request(env, conf);
            request.prev_ipv4_address = prev.map(|ip| ip.to_string()).unwrap_or_default();
            let r = c
                .del_network(request)
                .await
                .map_err(|s| from_status("DelNetwork", s))?
                .into_inner();
            if r.found {
                (
                    r.ipv4_address.parse().ok(),
                    r.interface.map(|i| i.route_table),
                    false,
                    true,
                )
            } else {
                (prev, None, r.prev_address_held_elsewhere, false)
            }
        }
        Err(e) => {
            warn!(error = %e, "ipamd unreachable on DEL; tearing down from prevResult");
            (prev, None, false, false)
        }
    };
    let host_veth = host_veth_name(conf.veth_prefix(), &env.container_id, &env.ifname);
    let host = datapath::handle_here().map_err(dp_err("netlink"))?;
    let netns = (!env.netns.is_empty()).then(|| Path::new(&env.netns));
    let mut errors = vec![];
    let ip = if found {
        // Whatever ipamd said, a host link's own address is never a pod's.
        match ip {
            Some(a) => match datapath::on_a_host_link(&host, a).await {
                Ok(false) => Some(a),
                Ok(true) => {
                    info!(ip = %a, "a host interface holds this address; leaving its rules");
                    None
                }
                Err(e) => {
                    errors.push(format!("cannot tell who holds {a}, left its rules: {e}"));
                    None
                }
            },
            None => None,
        }
    } else {
        ours(&host, &host_veth, ip, held_elsewhere, &mut errors).await
    };
    errors.extend(datapath::del(&host, &host_veth, netns, ip, table).await);
    if !errors.is_empty() {
        return Err(CniError::Datapath(Msg::new(
            "DEL could not remove everything",
            errors.join("; "),
        )));
    }
    info!(container = %env.container_id, ip = ?ip, "pod unwired");
    Ok(())
}

async fn check(env: &Env, conf: &NetConf, pod: Pod) -> Result<(), CniError> {
    let ip = conf.prev_ipv4().ok_or_else(|| {
        CniError::InvalidConfig(Msg::new(
            "CHECK needs prevResult with the pod's address",
            "",
        ))
    })?;
    let mut client = ipamd(conf).await?;
    let r = client
        .get_network(del_request(env, conf))
        .await
        .map_err(|s| from_status("GetNetwork", s))?
        .into_inner();
    if !r.found || r.ipv4_address != ip.to_string() {
        return Err(CniError::Ipamd(Msg::new(
            "ipamd does not hold the pod's address",
            format!("prevResult has {ip}; ipamd has {:?}", r.ipv4_address),
        )));
    }
    let host_veth = host_veth_name(conf.veth_prefix(), &env.container_id, &env.ifname);
    let host = datapath::handle_here().map_err(dp_err("netlink"))?;
    let wire = Wire {
        host_veth: &host_veth,
        pod_ifname: &env.ifname,
        ip,
        route_table: r.interface.map_or(datapath::MAIN_TABLE, |i| i.route_table),
        fail_after: None,
    };
    let pod = pod.handle.ok_or_else(|| {
        CniError::Datapath(Msg::new("no netlink socket in the pod's namespace", ""))
    })?;
    datapath::check(&host, &pod, &wire).await.map_err(|bad| {
        CniError::Datapath(Msg::new(
            "CHECK found the pod's network not as ADD left it",
            bad.join("; "),
        ))
    })
}

async fn status(conf: &NetConf) -> Result<(), CniError> {
    needs_1_1("STATUS", conf)?;
    let conn = ipamd_api::connect_once(socket(conf))
        .await
        .map_err(|e| CniError::NotAvailable(Msg::new("ipamd is not reachable", e)))?;
    let mut health =
        tonic_health::pb::health_client::HealthClient::with_origin(conn, ipamd_api::origin());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "vpccni.ipamd.v1.Ipamd".into(),
        })
        .await
        .map_err(|s| CniError::NotAvailable(Msg::new("ipamd health check failed", s.message())))?;
    if r.into_inner().status
        != tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    {
        // Say why, as ipamd's readiness latch sees it.
        let why = match ipamd(conf).await {
            Ok(mut c) => match c.readiness(ipamd_api::v1::ReadinessRequest {}).await {
                Ok(r) if r.get_ref().ready => "it turned ready meanwhile; ask again".to_string(),
                Ok(r) => r.into_inner().reasons.join("; "),
                Err(s) => s.message().to_string(),
            },
            Err(_) => String::new(),
        };
        return Err(CniError::NotAvailable(Msg::new("ipamd is not ready", why)));
    }
    Ok(())
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    needs_1_1("GC", conf)?;
    // Only what the runtime positively says is stale goes: without its list
    // of valid attachments, every live pod would look stale.
    let valid = conf.valid_list().ok_or_else(|| {
        CniError::InvalidConfig(Msg::new("GC needs the runtime's list of valid attachments (cni.dev/valid-attachments); nothing was released",
            ""))
    })?;
    let mut client = ipamd(conf).await?;
    let released = client
        .garbage_collect(GarbageCollectRequest {
            network_name: conf.name.clone(),
            valid: valid
                .iter()
                .map(|a| Attachment {
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                })
                .collect(),
            valid_is_complete: true,
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
        // The stale attachment's host veth, if the runtime left it behind.
        let veth = r
            .attachment
            .map(|a| host_veth_name(conf.veth_prefix(), &a.container_id, &a.ifname))
            .unwrap_or_default();
        let ip = ours(&host, &veth, Some(ip), false, &mut errors).await;
        errors.extend(datapath::del(&host, &veth, None, ip, table).await);
        info!(ip = ?ip, veth, "garbage-collected a stale attachment");
    }
    if !errors.is_empty() {
        return Err(CniError::Datapath(Msg::new(
            "GC could not remove everything",
            errors.join("; "),
        )));
    }
    Ok(())
}
