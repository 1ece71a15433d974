//! Client of a `vpc-sim` server: one JSON request per line, one reply per line.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::sync::Mutex;

use super::{Reply, Request};
use providers::error::{ProviderError, Result};

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Where a simulator listens: `unix:/path` or `host:port` on loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimAddr {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl std::str::FromStr for SimAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Self::Unix(p.into()));
        }
        let addr: std::net::SocketAddr = s.parse().map_err(|e| {
            format!("simulator address {s:?}: {e} (want unix:/path or 127.0.0.1:PORT)")
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!("simulator address {s} is not on loopback"));
        }
        Ok(Self::Tcp(s.to_string()))
    }
}

impl std::fmt::Display for SimAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => f.write_str(a),
        }
    }
}

#[derive(Debug)]
pub struct SimClient {
    addr: SimAddr,
    timeout: Duration,
    conn: Mutex<Option<BufStream<Box<dyn Stream>>>>,
}

impl std::fmt::Debug for dyn Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream")
    }
}

impl SimClient {
    pub fn new(addr: SimAddr) -> Self {
        Self {
            addr,
            // Longer than the simulator's own injected timeouts, so those
            // surface as the simulator's answer.
            timeout: Duration::from_secs(30),
            conn: Mutex::new(None),
        }
    }

    async fn dial(&self) -> std::io::Result<BufStream<Box<dyn Stream>>> {
        let s: Box<dyn Stream> = match &self.addr {
            SimAddr::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
            SimAddr::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        };
        Ok(BufStream::new(s))
    }

    /// Sends one request. A broken connection is dropped and reported; the
    /// next call dials again (the caller decides whether to retry, since a
    /// mutating call may or may not have been applied).
    ///
    /// Cancel-safe: the connection is taken out for the call and put back
    /// only once its reply is read, so a call dropped half-way (a caller's
    /// timeout, a resync giving way to an ADD) takes its connection with
    /// it. Kept, the connection would hand that call's late reply to the
    /// next call, and every call after it the reply of the one before.
    pub async fn call(&self, req: &Request) -> Result<Reply> {
        let api = req.api().unwrap_or("admin");
        let mut guard = self.conn.lock().await;
        let taken = guard.take();
        let attempt = async {
            let mut conn = match taken {
                Some(c) => c,
                None => self.dial().await?,
            };
            let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
            line.push(b'\n');
            conn.write_all(&line).await?;
            conn.flush().await?;
            let mut answer = String::new();
            if conn.read_line(&mut answer).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "simulator closed the connection",
                ));
            }
            let reply = serde_json::from_str::<Result<Reply, ProviderError>>(&answer)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            Ok((conn, reply))
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok((conn, answer))) => {
                *guard = Some(conn);
                answer
            }
            Ok(Err(e)) => Err(ProviderError::Transport(format!(
                "simulator at {}: {e}",
                self.addr
            ))),
            Err(_) => Err(ProviderError::Timeout { api: api.into() }),
        }
    }
}
