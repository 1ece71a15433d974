//! The wire contract between `ipamd` and the `vpc-cni` plugin.
//!
//! Kept in its own crate so the CNI binary links only tonic and prost, never
//! a cloud SDK.

#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("vpccni.ipamd.v1");
}

pub mod datapath;
pub mod fast;
pub mod names;

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where ipamd listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vpc-cni/ipamd.sock";

/// Why a connection to ipamd could not be made, with a hint an operator can act on.
#[derive(Debug)]
pub struct ConnectError {
    pub socket: PathBuf,
    pub source: std::io::Error,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hint = match self.source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "is ipamd running?"
            }
            std::io::ErrorKind::PermissionDenied => "the socket is root-only (mode 0600)",
            _ => "cannot reach ipamd",
        };
        write!(
            f,
            "{hint} socket {}: {}",
            self.socket.display(),
            self.source
        )
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Opens a gRPC channel to ipamd over its unix socket, eagerly, so that a
/// missing daemon is reported as such, not on the first call.
pub async fn connect(socket: impl AsRef<Path>) -> Result<Channel, ConnectError> {
    let socket = socket.as_ref().to_path_buf();
    let path = socket.clone();
    // The URI is required by the builder but unused: the connector dials the socket.
    Endpoint::from_static("http://ipamd.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| ConnectError {
            socket,
            source: io_cause(&e),
        })
}

/// The operating system's reason under tonic's transport error, so that
/// "connection refused" reads as such (and gets its hint).
fn io_cause(e: &(dyn std::error::Error + 'static)) -> std::io::Error {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return std::io::Error::new(io.kind(), io.to_string());
        }
        cur = err.source();
    }
    std::io::Error::other(e.to_string())
}

/// A client for the ipamd service over its unix socket.
pub async fn client(
    socket: impl AsRef<Path>,
) -> Result<v1::ipamd_client::IpamdClient<Channel>, ConnectError> {
    Ok(v1::ipamd_client::IpamdClient::new(connect(socket).await?))
}

/// One HTTP/2 connection to ipamd as a gRPC transport, without tonic's
/// `Channel` (its request buffer task and reconnect logic): for a process
/// that makes one or two calls and exits, as the CNI plugin does, those cost
/// more start-up work than the calls themselves.
#[derive(Clone)]
pub struct Connection(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

/// Connects once to ipamd's socket and returns the HTTP/2 connection; its
/// driver runs as a task on the current runtime.
pub async fn connect_once(socket: impl AsRef<Path>) -> Result<Connection, ConnectError> {
    let socket = socket.as_ref().to_path_buf();
    let err = |source| ConnectError {
        socket: socket.clone(),
        source,
    };
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(err)?;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .map_err(|e| err(io_cause(&e)))?;
    tokio::spawn(conn);
    Ok(Connection(send))
}

/// The origin the generated clients put in each request's URI; the
/// connection, not the URI, says where the request goes.
pub fn origin() -> Uri {
    Uri::from_static("http://ipamd.invalid")
}

/// An ipamd client on one connection (see [`Connection`]).
pub async fn client_once(
    socket: impl AsRef<Path>,
) -> Result<v1::ipamd_client::IpamdClient<Connection>, ConnectError> {
    Ok(v1::ipamd_client::IpamdClient::with_origin(
        connect_once(socket).await?,
        origin(),
    ))
}
