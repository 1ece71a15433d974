//! The gRPC service the CNI plugin calls, on a unix socket (mode 0600).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use ipamd_api::v1::ipamd_server::{Ipamd, IpamdServer};
use ipamd_api::v1::{
    AddNetworkReply, AddNetworkRequest, Attachment, DelNetworkReply, DelNetworkRequest,
    GarbageCollectReply, GarbageCollectRequest, InterfaceInfo, ReadinessReply, ReadinessRequest,
    SnatMode,
};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::datastore::PodKey;
use crate::ipam::{check_key, Ipam, IpamError, Wiring};

pub struct IpamdService {
    ipam: Arc<Ipam>,
}

impl IpamdService {
    pub fn new(ipam: Arc<Ipam>) -> Self {
        Self { ipam }
    }

    fn interface(w: &Wiring) -> InterfaceInfo {
        InterfaceInfo {
            id: w.interface_id.clone(),
            mac: w.mac.clone(),
            device_number: w.device_index,
            route_table: w.route_table,
            primary: w.device_index == 0,
            subnet_cidr: w.subnet_cidr.to_string(),
            gateway: w.gateway.to_string(),
        }
    }
}

fn key(network: String, container_id: String, ifname: String) -> PodKey {
    PodKey {
        network,
        container_id,
        ifname,
    }
}

fn to_status(e: IpamError) -> Status {
    match e {
        IpamError::Exhausted { .. } => Status::resource_exhausted(e.to_string()),
        IpamError::Invalid(_) => Status::invalid_argument(e.to_string()),
        IpamError::Journal(_) => Status::unavailable(e.to_string()),
        IpamError::Cancelled => Status::aborted(e.to_string()),
    }
}

#[tonic::async_trait]
impl Ipamd for IpamdService {
    async fn add_network(
        &self,
        request: Request<AddNetworkRequest>,
    ) -> Result<Response<AddNetworkReply>, Status> {
        let started = std::time::Instant::now();
        self.ipam.pool.events.add_requests.inc();
        let r = request.into_inner();
        let key = key(r.network_name, r.container_id, r.ifname);
        if r.netns.len() > 4096 {
            return Err(Status::invalid_argument(
                "netns is longer than PATH_MAX (4096 bytes)",
            ));
        }
        let netns = (!r.netns.is_empty())
            .then(|| crate::netns::NetnsRef::at_add(r.netns, r.netns_dev, r.netns_ino));
        let pod = if r.pod_namespace.is_empty() && r.pod_name.is_empty() {
            None
        } else {
            let bad: Vec<String> = [
                ipamd_api::names::check_k8s_name("pod namespace", &r.pod_namespace),
                ipamd_api::names::check_k8s_name("pod name", &r.pod_name),
            ]
            .into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect();
            // Only shown and journalled, never acted on: a runtime that
            // passes other names (podman's container names) still gets
            // its address, and the attachment is shown by its key.
            if bad.is_empty() {
                Some(crate::datastore::PodName {
                    namespace: r.pod_namespace,
                    name: r.pod_name,
                })
            } else {
                info!(pod = %key, problems = %bad.join("; "), "CNI_ARGS names no Kubernetes pod; the assignment is kept without one");
                None
            }
        };
        let result = self.ipam.add_in(key.clone(), netns, pod).await;
        // Failures too: an ADD that waited out its time is what an
        // operator looks for in this histogram.
        self.ipam
            .pool
            .events
            .add_seconds
            .observe(started.elapsed().as_secs_f64());
        let w = result.map_err(|e| {
            warn!(pod = %key, error = %e, "AddNetwork failed");
            to_status(e)
        })?;
        self.ipam.pool.add_latency.record(started.elapsed());
        let inst = self.ipam.instance();
        let s = self.ipam.settings();
        Ok(Response::new(AddNetworkReply {
            ipv4_address: w.ip.to_string(),
            interface: Some(Self::interface(&w)),
            vpc_cidrs: inst.vpc_cidrs.iter().map(ToString::to_string).collect(),
            snat_mode: if s.external_snat {
                SnatMode::External
            } else {
                SnatMode::Node
            } as i32,
            exclude_snat_cidrs: s
                .exclude_snat_cidrs
                .iter()
                .map(ToString::to_string)
                .collect(),
            node_ip: inst.primary_ip.to_string(),
        }))
    }

    async fn del_network(
        &self,
        request: Request<DelNetworkRequest>,
    ) -> Result<Response<DelNetworkReply>, Status> {
        self.ipam.pool.events.del_requests.inc();
        let r = request.into_inner();
        let key = key(r.network_name, r.container_id, r.ifname);
        check_key(&key).map_err(to_status)?;
        let started = std::time::Instant::now();
        let found = self.ipam.del(key.clone()).await.map_err(to_status)?;
        self.ipam.pool.del_latency.record(started.elapsed());
        self.ipam
            .pool
            .events
            .del_seconds
            .observe(started.elapsed().as_secs_f64());
        let mut reply = Self::found(found);
        if !reply.found {
            // A late or repeated DEL: the address its prevResult names may
            // be another pod's by now, and so are its rules.
            if let Ok(ip) = r.prev_ipv4_address.parse() {
                if let Some(holder) = self.ipam.holder_of(ip) {
                    if holder != key {
                        info!(pod = %key, %ip, holder = %holder, "DEL of an attachment ipamd no longer has; its old address is another attachment's now");
                        reply.prev_address_held_elsewhere = true;
                    }
                }
            }
        }
        Ok(Response::new(reply))
    }

    async fn get_network(
        &self,
        request: Request<DelNetworkRequest>,
    ) -> Result<Response<DelNetworkReply>, Status> {
        let r = request.into_inner();
        let key = key(r.network_name, r.container_id, r.ifname);
        check_key(&key).map_err(to_status)?;
        Ok(Response::new(Self::found(self.ipam.lookup(&key))))
    }

    async fn readiness(
        &self,
        _: Request<ReadinessRequest>,
    ) -> Result<Response<ReadinessReply>, Status> {
        let r = self.ipam.readiness();
        Ok(Response::new(ReadinessReply {
            ready: r.is_ok(),
            reasons: r.err().unwrap_or_default(),
        }))
    }

    async fn garbage_collect(
        &self,
        request: Request<GarbageCollectRequest>,
    ) -> Result<Response<GarbageCollectReply>, Status> {
        let r = request.into_inner();
        if let Err(e) = ipamd_api::names::check_id("network name", &r.network_name) {
            return Err(Status::invalid_argument(e.to_string()));
        }
        if !r.valid_is_complete {
            // An empty or absent list is not a statement that everything is
            // stale: releasing on it would hand live pods' addresses out.
            return Err(Status::invalid_argument(
                "GarbageCollect needs the complete list of valid attachments (valid_is_complete); nothing was released",
            ));
        }
        let valid = r
            .valid
            .into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect();
        let released = self
            .ipam
            .gc(&r.network_name, &valid)
            .await
            .map_err(to_status)?;
        Ok(Response::new(GarbageCollectReply {
            released: released
                .into_iter()
                .map(|(k, w)| DelNetworkReply {
                    attachment: Some(Attachment {
                        container_id: k.container_id,
                        ifname: k.ifname,
                    }),
                    ..Self::found(Some(w))
                })
                .collect(),
        }))
    }
}

impl IpamdService {
    fn found(w: Option<Wiring>) -> DelNetworkReply {
        match w {
            Some(w) => DelNetworkReply {
                found: true,
                ipv4_address: w.ip.to_string(),
                interface: Some(Self::interface(&w)),
                ..Default::default()
            },
            None => DelNetworkReply::default(),
        }
    }
}

/// Binds the socket with mode 0600 from the first moment: bound under a
/// temporary name, restricted, then renamed into place.
pub fn bind_socket(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another ipamd is serving {}", path.display()),
        ));
    }
    // A stale socket is replaced; anything else at the path is someone's
    // file, which a typo in --socket must not destroy.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ));
        }
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::remove_file(&tmp).ok();
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    listener.set_nonblocking(true)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(listener)
}

/// Serves gRPC on `listener` and ADD's fast path (see [`ipamd_api::fast`])
/// on `fast`, on a thread of their own with a single-threaded runtime, until
/// `stop` turns true; the receiver answers once in-flight calls are done.
///
/// Every ADD of every pod waits on this server, so it does not share the
/// daemon's work-stealing runtime: there, a request woke idle workers that
/// searched for work on the other CPUs, the CPUs the plugin making the
/// pod's veth needs. Measured with fresh connections as the plugin makes
/// them: half the CPU per call in ipamd (185 vs 376 us) and fewer context
/// switches. The handlers' state (the pool, the journal) is shared with the
/// reconciler through runtime-independent tokio primitives.
pub fn spawn_server(
    ipam: Arc<Ipam>,
    listener: std::os::unix::net::UnixListener,
    fast: std::os::unix::net::UnixListener,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::sync::oneshot::Receiver<Result<(), String>>> {
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ipamd-rpc".into())
        .spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("rpc runtime: {e}"))
                .and_then(|rt| {
                    rt.block_on(async move {
                        let listener = tokio::net::UnixListener::from_std(listener)
                            .map_err(|e| format!("rpc socket: {e}"))?;
                        let fast = tokio::net::UnixListener::from_std(fast)
                            .map_err(|e| format!("fast-path socket: {e}"))?;
                        let service = Arc::new(IpamdService::new(ipam.clone()));
                        let fast = tokio::spawn(serve_fast(service, fast, stop.clone()));
                        let mut stop = stop;
                        let shutdown = async move {
                            stop.wait_for(|s| *s).await.ok();
                        };
                        let grpc = serve(ipam, listener, shutdown)
                            .await
                            .map_err(|e| e.to_string());
                        fast.await.ok();
                        grpc
                    })
                });
            done.send(served).ok();
        })?;
    Ok(finished)
}

/// How long a fast-path client has to send its request.
const FAST_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// ADD's fast path: one request and one answer per connection, handled by
/// the same code as the gRPC AddNetwork. Stops accepting when `stop` turns
/// true and lets the calls in flight finish.
async fn serve_fast(
    service: Arc<IpamdService>,
    listener: tokio::net::UnixListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut calls = tokio::task::JoinSet::new();
    let mut stopped = std::pin::pin!(async move {
        stop.wait_for(|s| *s).await.ok();
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut conn, _)) => {
                    let service = service.clone();
                    calls.spawn(async move {
                        let request = match tokio::time::timeout(
                            FAST_READ_TIMEOUT,
                            ipamd_api::fast::read_frame::<AddNetworkRequest>(&mut conn),
                        )
                        .await
                        {
                            Ok(Ok(r)) => r,
                            Ok(Err(e)) => {
                                debug!(error = %e, "fast path: no request");
                                return;
                            }
                            Err(_) => {
                                debug!("fast path: no request within the timeout");
                                return;
                            }
                        };
                        let attachment = key(
                            request.network_name.clone(),
                            request.container_id.clone(),
                            request.ifname.clone(),
                        );
                        // The client sends nothing after its request: its
                        // end closing means it gave up (a runtime's timeout),
                        // and dropping the ADD releases what it assigned.
                        let answer = tokio::select! {
                            a = service.add_network(Request::new(request)) => a.map(Response::into_inner),
                            _ = client_gone(&mut conn) => {
                                info!(pod = %attachment, "fast path: the client left; ADD abandoned");
                                return;
                            }
                        };
                        let result = ipamd_api::fast::result_of(answer);
                        // Left between the commit and the answer: the address
                        // is not released here, since a repeated ADD answers a
                        // live pod's own address. The runtime's DEL after a
                        // failed ADD, or the reclaim of a gone namespace,
                        // releases a new one.
                        if let Err(e) = ipamd_api::fast::write_frame(&mut conn, &result).await {
                            debug!(pod = %attachment, error = %e, "fast path: the client left before its answer");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "fast path: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            // Reap finished calls as they end.
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
            _ = &mut stopped => break,
        }
    }
    while calls.join_next().await.is_some() {}
}

/// Resolves when the fast-path client closes its end (or sends more than
/// its one request, which it never does).
async fn client_gone(conn: &mut tokio::net::UnixStream) {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    let _ = conn.read(&mut byte).await;
}

/// Serves until `shutdown` resolves, then lets in-flight calls finish.
pub async fn serve(
    ipam: Arc<Ipam>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // The readiness latch (see `Ipam::readiness`): NOT_SERVING, and CNI
    // STATUS "not available", until the pool has an assignable address and
    // the node side is in place, and while every call would fail (the
    // journal cannot be written). Both the service and "" (the server).
    reporter
        .set_not_serving::<IpamdServer<IpamdService>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let watched = ipam.clone();
    let health_task = tokio::spawn(async move {
        let mut serving = false;
        let mut changes = watched.subscribe();
        loop {
            let ok = watched.readiness().is_ok();
            if ok != serving {
                serving = ok;
                let status = if ok {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter
                    .set_service_status("vpccni.ipamd.v1.Ipamd", status)
                    .await;
                reporter.set_service_status("", status).await;
            }
            // Pool changes, or every 500 ms (a journal that heals changes
            // nothing the pool publishes).
            tokio::time::timeout(std::time::Duration::from_millis(500), changes.changed())
                .await
                .ok();
        }
    });
    info!("serving AddNetwork/DelNetwork");
    let served = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(IpamdServer::new(IpamdService::new(ipam)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    health_task.abort();
    served
}
