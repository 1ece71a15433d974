//! The simulator as a server shared by several nodes' ipamd.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tracing::{debug, warn};

use super::client::SimAddr;
use super::{Request, Vpc};
use providers::error::ProviderError;

/// A bound listener; `local_addr` is known before serving (port 0 works).
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl Listener {
    pub async fn bind(addr: &SimAddr) -> std::io::Result<Self> {
        Ok(match addr {
            SimAddr::Tcp(a) => Self::Tcp(tokio::net::TcpListener::bind(a).await?),
            SimAddr::Unix(p) => {
                match std::fs::remove_file(p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                Self::Unix(tokio::net::UnixListener::bind(p)?, p.clone())
            }
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SimAddr> {
        Ok(match self {
            Self::Tcp(l) => SimAddr::Tcp(l.local_addr()?.to_string()),
            Self::Unix(_, p) => SimAddr::Unix(p.clone()),
        })
    }
}

/// Serves until the task is dropped or aborted.
pub async fn serve(vpc: Arc<Vpc>, listener: Listener) -> std::io::Result<()> {
    loop {
        match &listener {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true).ok();
                tokio::spawn(connection(vpc.clone(), s));
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                tokio::spawn(connection(vpc.clone(), s));
            }
        }
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(vpc: Arc<Vpc>, stream: S) {
    let (r, mut w) = tokio::io::split(stream);
    let mut lines = BufReader::new(r).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "simulator connection ended");
                return;
            }
        };
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(req) => vpc.handle(req).await,
            Err(e) => Err(ProviderError::Invalid(format!("malformed request: {e}"))),
        };
        let mut out = match serde_json::to_vec(&answer) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "cannot encode reply");
                return;
            }
        };
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
}
