//! ADD's fast path: one length-delimited protobuf request and answer on a
//! unix socket next to the gRPC one (see `AddNetworkResult` in the proto).
//!
//! A CNI plugin process makes one call and exits, so it opens a connection
//! per call; over gRPC that is an HTTP/2 connection's exchange (preface,
//! settings, their acknowledgements) on both sides, measured at ~0.4 ms of
//! a 2 ms ADD. The messages and the handler are the same; only the framing
//! differs (prost's varint length prefix).

use std::io;
use std::path::{Path, PathBuf};

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::v1::{add_network_result, AddNetworkReply, AddNetworkResult, CallError};
use crate::ConnectError;

/// The fast path's socket for the gRPC socket at `socket`.
pub fn path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".add");
    PathBuf::from(p)
}

/// The largest frame either side accepts.
const MAX_FRAME: usize = 64 * 1024;

/// The message at the start of `buf`, once all of it has arrived.
fn try_frame<M: Message + Default>(buf: &[u8]) -> io::Result<Option<M>> {
    // The length prefix is a varint of at most 10 bytes.
    match prost::decode_length_delimiter(buf) {
        Ok(len) if len > MAX_FRAME => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        )),
        Ok(len) => {
            let head = prost::length_delimiter_len(len);
            if buf.len() < head + len {
                return Ok(None);
            }
            M::decode(&buf[head..head + len])
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        }
        Err(_) if buf.len() >= 10 => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad length prefix",
        )),
        Err(_) => Ok(None),
    }
}

fn eof() -> io::Error {
    io::ErrorKind::UnexpectedEof.into()
}

/// Reads one length-delimited message.
pub async fn read_frame<M: Message + Default>(io: &mut (impl AsyncRead + Unpin)) -> io::Result<M> {
    let (mut buf, mut chunk) = (Vec::with_capacity(512), [0u8; 512]);
    loop {
        if let Some(m) = try_frame(&buf)? {
            return Ok(m);
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(eof());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one length-delimited message, blocking.
pub fn read_frame_blocking<M: Message + Default>(io: &mut impl std::io::Read) -> io::Result<M> {
    let (mut buf, mut chunk) = (Vec::with_capacity(512), [0u8; 512]);
    loop {
        if let Some(m) = try_frame(&buf)? {
            return Ok(m);
        }
        let n = io.read(&mut chunk)?;
        if n == 0 {
            return Err(eof());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Writes one length-delimited message.
pub async fn write_frame(io: &mut (impl AsyncWrite + Unpin), m: &impl Message) -> io::Result<()> {
    io.write_all(&m.encode_length_delimited_to_vec()).await?;
    io.flush().await
}

/// The server's answer for a handler's result.
pub fn result_of(r: Result<AddNetworkReply, tonic::Status>) -> AddNetworkResult {
    AddNetworkResult {
        result: Some(match r {
            Ok(reply) => add_network_result::Result::Reply(reply),
            Err(s) => add_network_result::Result::Error(CallError {
                code: s.code() as i32,
                message: s.message().to_string(),
            }),
        }),
    }
}

/// The client's reading of the server's answer.
pub fn status_of(r: AddNetworkResult) -> Result<AddNetworkReply, tonic::Status> {
    match r.result {
        Some(add_network_result::Result::Reply(reply)) => Ok(reply),
        Some(add_network_result::Result::Error(e)) => {
            Err(tonic::Status::new(tonic::Code::from(e.code), e.message))
        }
        None => Err(tonic::Status::internal("ipamd answered nothing")),
    }
}

/// Why a fast-path call failed.
#[derive(Debug)]
pub enum FastError {
    /// No fast path at this socket (an ipamd without it, or none at all):
    /// the caller falls back to gRPC, which reports a missing ipamd.
    Unavailable(ConnectError),
    /// ipamd answered with an error.
    Status(tonic::Status),
    /// The connection failed mid-call.
    Io(io::Error),
}

impl std::fmt::Display for FastError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FastError::Unavailable(e) => write!(f, "{e}"),
            FastError::Status(s) => write!(f, "{}: {}", s.code(), s.message()),
            FastError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FastError {}

/// How long a client waits for ipamd's answer (ipamd's own wait for the
/// pool, `IPAMD_ADD_WAIT_SECONDS`, is far shorter).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A request sent on the fast path, its answer still to read: what the
/// caller does meanwhile overlaps ipamd's work. Blocking, for a process that
/// needs no async runtime for it.
pub struct Sent(std::os::unix::net::UnixStream);

/// Sends AddNetwork on the fast path of the ipamd serving gRPC at `socket`.
pub fn send(socket: &Path, request: &crate::v1::AddNetworkRequest) -> Result<Sent, FastError> {
    let fast = path(socket);
    let mut stream = std::os::unix::net::UnixStream::connect(&fast).map_err(|source| {
        FastError::Unavailable(ConnectError {
            socket: fast.clone(),
            source,
        })
    })?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(FastError::Io)?;
    std::io::Write::write_all(&mut stream, &request.encode_length_delimited_to_vec())
        .map_err(FastError::Io)?;
    Ok(Sent(stream))
}

impl Sent {
    /// Waits for ipamd's answer.
    pub fn answer(mut self) -> Result<AddNetworkReply, FastError> {
        let result: AddNetworkResult = read_frame_blocking(&mut self.0).map_err(FastError::Io)?;
        status_of(result).map_err(FastError::Status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::AddNetworkRequest;

    #[tokio::test]
    async fn frames_survive_any_split() {
        let req = AddNetworkRequest {
            network_name: "n".repeat(300),
            container_id: "c".into(),
            ..Default::default()
        };
        let bytes = req.encode_length_delimited_to_vec();
        assert!(bytes.len() > 300, "a two-byte length prefix is exercised");
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let writer = tokio::spawn(async move {
            // One byte at a time: the reader must not assume whole frames.
            for byte in bytes {
                a.write_all(&[byte]).await.unwrap();
                a.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            a
        });
        let got: AddNetworkRequest = read_frame(&mut b).await.unwrap();
        assert_eq!(got, req);
        // The blocking reader reads the same frames.
        let mut bytes = std::io::Cursor::new(req.encode_length_delimited_to_vec());
        assert_eq!(
            read_frame_blocking::<AddNetworkRequest>(&mut bytes).unwrap(),
            req
        );
        drop(writer.await.unwrap());
        let eof: io::Result<AddNetworkRequest> = read_frame(&mut b).await;
        assert_eq!(eof.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let mut prefix = Vec::new();
        prost::encode_length_delimiter(MAX_FRAME + 1, &mut prefix).unwrap();
        a.write_all(&prefix).await.unwrap();
        let r: io::Result<AddNetworkRequest> = read_frame(&mut b).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn statuses_cross_as_they_were() {
        let s = status_of(result_of(Err(tonic::Status::resource_exhausted(
            "instance at its interface limit",
        ))))
        .unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.message(), "instance at its interface limit");
        let reply = AddNetworkReply {
            ipv4_address: "10.0.0.5".into(),
            ..Default::default()
        };
        assert_eq!(status_of(result_of(Ok(reply.clone()))).unwrap(), reply);
    }

    #[test]
    fn the_fast_socket_sits_next_to_the_grpc_one() {
        assert_eq!(
            path(Path::new("/run/vpc-cni/ipamd.sock")),
            PathBuf::from("/run/vpc-cni/ipamd.sock.add")
        );
    }
}
