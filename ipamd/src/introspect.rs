//! Introspection over HTTP on loopback: the pool as JSON, built from
//! read-only views of the pool and the reconciler; `/healthz` (liveness)
//! and `/readyz` (the readiness latch, see [`Ipam::readiness`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};

use crate::datastore::{route_table, Slot};
use crate::ipam::Ipam;
use crate::pool::Pool;

/// Pool figures and reconciler status, for `/v1/pool`.
pub fn summary(ipam: &Ipam) -> serde_json::Value {
    let r = &ipam.reconciler;
    let instance = r.instance();
    let provider = r.provider();
    let ready = ipam.readiness();
    let status = r.status();
    let (counts, waiting, pending_deletes, unconfirmed) = ipam.pool.read(|p| {
        (
            p.ds.counts(tokio::time::Instant::now()),
            p.waiting,
            p.pending_deletes.clone(),
            p.unconfirmed.len(),
        )
    });
    serde_json::json!({
        "instance": {
            "id": instance.id,
            "type": instance.instance_type,
            "zone": instance.zone,
            "primary_ip": instance.primary_ip,
            "max_interfaces": instance.limits.max_interfaces,
            "ipv4_per_interface": instance.limits.ipv4_per_interface,
        },
        "provider": provider.name(),
        "provider_api": provider.api_stats(),
        "node_side": r.node().side().name(),
        "ready": ready.is_ok(),
        "not_ready_because": ready.err().unwrap_or_default(),
        "counts": counts,
        "waiting": waiting,
        "pending_deletes": pending_deletes,
        "foreign_interfaces": r.foreign(),
        "frozen_interfaces": r.frozen(),
        "unconfirmed_assignments": unconfirmed,
        "status": status,
        "pod_ip_capacity": ipam.pool.facts().pod_capacity(),
        "interfaces_held": r.interfaces_held(),
        "kubernetes": ipam.kube_snapshot(),
        "config": config(ipam.settings()),
    })
}

/// The settings, with `pool.warm_eni_target` null where it does not size
/// the pool (see [`crate::policy::PoolConfig::warm_eni_target_applies`]):
/// its default of 1 read as a target in force under the others.
fn config(settings: &crate::config::Settings) -> serde_json::Value {
    let mut v = serde_json::to_value(settings).unwrap_or_default();
    if !settings.pool.warm_eni_target_applies() {
        v["pool"]["warm_eni_target"] = serde_json::Value::Null;
    }
    v
}

/// Interfaces with every address and its state, for `/v1/interfaces`.
pub fn interfaces(pool: &Pool) -> serde_json::Value {
    let now = tokio::time::Instant::now();
    pool.read(|p| {
        let list: Vec<serde_json::Value> =
            p.ds.interfaces()
                .map(|e| {
                    let addrs: Vec<serde_json::Value> = e
                        .addrs
                        .iter()
                        .map(|(ip, s)| {
                            let (state, pod) = match s {
                                Slot::Free => ("free", None),
                                Slot::Assigned(k) => {
                                    ("assigned", p.pods.get(k).map(ToString::to_string))
                                }
                                Slot::Cooling { until } if *until > now => ("cooling", None),
                                Slot::Cooling { .. } => ("free", None),
                                Slot::Releasing => ("releasing", None),
                            };
                            serde_json::json!({"ip": ip, "state": state, "pod": pod})
                        })
                        .collect();
                    serde_json::json!({
                        "id": e.info.id,
                        "mac": e.info.mac,
                        "device_index": e.info.device_index,
                        "route_table": route_table(e.info.device_index),
                        "subnet_id": e.info.subnet_id,
                        "subnet_cidr": e.info.subnet_cidr,
                        "primary_ip": e.info.primary_ip,
                        "draining": e.draining,
                        "ready": e.ready,
                        "prefixes": e.prefixes,
                        "addresses": addrs,
                    })
                })
                .collect();
        serde_json::Value::Array(list)
    })
}

/// Every assignment, for `/v1/assignments`: the pod (namespace/name, when
/// its ADD named one; never the container id), network, ifname, address,
/// interface, and whether the cloud has confirmed the address.
pub fn assignments(pool: &Pool) -> serde_json::Value {
    pool.read(|p| {
        let mut v: Vec<serde_json::Value> =
            p.ds.assignments()
                .map(|(k, place)| (k, place.ip, Some(place.interface_id.as_str())))
                .chain(p.unconfirmed.iter().map(|(k, ip)| (k, *ip, None)))
                .map(|(k, ip, iface)| {
                    serde_json::json!({
                        "pod": p.pods.get(k).map(ToString::to_string),
                        "network": k.network,
                        "ifname": k.ifname,
                        "ip": ip,
                        "interface": iface,
                        "confirmed": iface.is_some(),
                    })
                })
                .collect();
        v.sort_by_key(|a| {
            a["ip"]
                .as_str()
                .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok())
        });
        serde_json::Value::Array(v)
    })
}

#[derive(serde::Deserialize)]
struct ExplainQuery {
    /// `NAMESPACE/NAME`; absent: the next ADD.
    pod: Option<String>,
}

/// `GET /v1/explain[?pod=NAMESPACE/NAME]`: see [`Ipam::explain`]; 400 for a
/// `pod` that is not `NAMESPACE/NAME`.
async fn explain(
    State(i): State<Arc<Ipam>>,
    Query(q): Query<ExplainQuery>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let pod = match q.pod.as_deref() {
        None => None,
        Some(s) => match crate::datastore::PodName::parse(s) {
            Some(p) => Some(p),
            None => {
                return (
                    axum::http::StatusCode::BAD_REQUEST,
                    format!("pod {s:?}: expected NAMESPACE/NAME"),
                )
                    .into_response()
            }
        },
    };
    Json(i.explain(pod.as_ref())).into_response()
}

#[derive(serde::Deserialize)]
struct LatencyQuery {
    /// Start a new measuring window after answering.
    reset: Option<bool>,
}

pub fn router(ipam: Arc<Ipam>) -> Router {
    Router::new()
        .route(
            "/v1/pool",
            get(|State(i): State<Arc<Ipam>>| async move { Json(i.summary()) }),
        )
        .route(
            "/v1/interfaces",
            get(|State(i): State<Arc<Ipam>>| async move { Json(i.interfaces()) }),
        )
        .route(
            "/v1/assignments",
            get(|State(i): State<Arc<Ipam>>| async move { Json(assignments(&i.pool)) }),
        )
        .route(
            "/v1/latency",
            get(
                |State(i): State<Arc<Ipam>>, Query(q): Query<LatencyQuery>| async move {
                    let reset = q.reset.unwrap_or(false);
                    Json(serde_json::json!({
                        "add_network": i.pool.add_latency.percentiles(reset),
                        "del_network": i.pool.del_latency.percentiles(reset),
                    }))
                },
            ),
        )
        .route("/v1/explain", get(explain))
        .route("/metrics", get(crate::metrics::handler))
        .route(
            "/healthz",
            get(|State(i): State<Arc<Ipam>>| async move {
                match i.health() {
                    Ok(()) => (axum::http::StatusCode::OK, "ok".to_string()),
                    Err(e) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, e),
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(i): State<Arc<Ipam>>| async move {
                match i.readiness() {
                    Ok(()) => (axum::http::StatusCode::OK, "ready".to_string()),
                    Err(why) => (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}", why.join("; ")),
                    ),
                }
            }),
        )
        .with_state(ipam)
}

/// Binds on loopback only: the pool layout is not for the network.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("introspection address {addr} is not on loopback"),
        ));
    }
    tokio::net::TcpListener::bind(addr).await
}

pub async fn serve(
    ipam: Arc<Ipam>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(ipam))
        .with_graceful_shutdown(shutdown)
        .await
}
