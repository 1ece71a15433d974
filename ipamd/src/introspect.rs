//! Introspection over HTTP on loopback: the pool as JSON.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};

use crate::ipam::Ipam;

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
            get(|State(i): State<Arc<Ipam>>| async move {
                let v: Vec<serde_json::Value> = i
                    .assignments()
                    .into_iter()
                    .map(|(k, ip)| {
                        serde_json::json!({
                            "network": k.network,
                            "container_id": k.container_id,
                            "ifname": k.ifname,
                            "ip": ip,
                        })
                    })
                    .collect();
                Json(v)
            }),
        )
        .route(
            "/v1/latency",
            get(
                |State(i): State<Arc<Ipam>>, Query(q): Query<LatencyQuery>| async move {
                    let reset = q.reset.unwrap_or(false);
                    Json(serde_json::json!({
                        "add_network": i.add_latency.percentiles(reset),
                        "del_network": i.del_latency.percentiles(reset),
                    }))
                },
            ),
        )
        .route(
            "/healthz",
            get(|State(i): State<Arc<Ipam>>| async move {
                match i.health() {
                    Ok(()) => (axum::http::StatusCode::OK, "ok".to_string()),
                    Err(e) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, e),
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
