//! The host side of the guest agent (`guest-agent`): run commands (pipes or a tty), copy
//! paths in and out, stat, over Cloud Hypervisor's hybrid vsock Unix socket.
//!
//! The guest is untrusted: a workload may own its VM and answer anything. Every message and
//! every transfer is size-capped ([`Limits`]); every path the guest sends is confined to the
//! destination ([`confined`]): relative, no `..`, never written through a symlink.

pub mod confined;
mod copy_in;
mod copy_out;
mod error;
mod exec;

use std::path::Path;

use bytes::Bytes;
use guest_agent_proto::grpc::{self, MessageReader};
use guest_agent_proto::pb::{StatPathRequest, StatPathResponse};
use h2::SendStream;
use h2::client::{ResponseFuture, SendRequest};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub use copy_out::CopyOutReport;
pub use error::ClientError;
pub use exec::{Exec, ExecEvent, ExecInput, ExecOutput, ExecSpec, Output};
pub use guest_agent_proto::AGENT_PORT;

/// What the client accepts from a guest before it gives up.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest single message.
    pub max_message: usize,
    /// Bytes one copy out of the guest may write.
    pub max_copy_bytes: u64,
    /// Entries one copy out of the guest may create.
    pub max_copy_entries: u64,
    /// Stdout plus stderr that [`Client::exec_output`] keeps.
    pub max_captured_output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: grpc::MAX_MESSAGE_SIZE,
            max_copy_bytes: 64 << 30,
            max_copy_entries: 1 << 20,
            max_captured_output: 64 << 20,
        }
    }
}

/// One connection to an agent; cheap to clone, and calls on clones run concurrently.
#[derive(Clone)]
pub struct Client {
    h2: SendRequest<Bytes>,
    limits: Limits,
}

impl Client {
    /// Connects through a hybrid vsock socket (Cloud Hypervisor's `--vsock socket=PATH`):
    /// `CONNECT <port>\n`, then `OK <port>\n`, then the stream is the agent's.
    pub async fn connect(socket: &Path, port: u32) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: socket.to_owned(),
                message: format!(
                    "{source} (is the VM running with a vsock device on this socket?)"
                ),
            })?;
        let stream =
            hybrid_handshake(stream, port)
                .await
                .map_err(|message| ClientError::Connect {
                    socket: socket.to_owned(),
                    message,
                })?;
        Client::handshake(stream, Limits::default()).await
    }

    /// HTTP/2 on an already connected stream.
    pub async fn handshake<IO>(io: IO, limits: Limits) -> Result<Client, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (h2, connection) = h2::client::Builder::new()
            .initial_window_size(grpc::STREAM_WINDOW)
            .initial_connection_window_size(grpc::CONNECTION_WINDOW)
            .max_frame_size(1 << 20)
            // Bound what a guest can make us hold in headers.
            .max_header_list_size(64 << 10)
            .handshake::<_, Bytes>(io)
            .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Client { h2, limits })
    }

    pub fn with_limits(mut self, limits: Limits) -> Client {
        self.limits = limits;
        self
    }

    pub async fn stat(
        &self,
        path: &str,
        follow_links: bool,
    ) -> Result<StatPathResponse, ClientError> {
        let (mut send, response) = self.start_call(grpc::method::STAT_PATH).await?;
        let request = StatPathRequest {
            path: path.to_owned(),
            follow_links,
        };
        send_only_message(&mut send, &request).await;
        let mut reader = self.response(response).await?;
        reader
            .next::<StatPathResponse>()
            .await?
            .ok_or(ClientError::Truncated("StatPath returned no response"))
    }

    async fn start_call(
        &self,
        method: &str,
    ) -> Result<(SendStream<Bytes>, ResponseFuture), ClientError> {
        let mut h2 = self.h2.clone().ready().await?;
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("http://guest-agent{method}"))
            .header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE)
            .header("te", "trailers")
            .body(())
            .expect("static request headers are valid");
        let (response, send) = h2.send_request(request, false)?;
        Ok((send, response))
    }

    async fn response(&self, response: ResponseFuture) -> Result<MessageReader, ClientError> {
        let response = response.await?;
        if response.status() != http::StatusCode::OK {
            return Err(ClientError::Grpc(grpc::GrpcError::Protocol(format!(
                "HTTP status {}",
                response.status()
            ))));
        }
        grpc::check_status(response.headers())?;
        Ok(MessageReader::new(
            response.into_body(),
            self.limits.max_message,
        ))
    }
}

/// The one request message of a unary or server-streaming call, then the half-close. A
/// failure here is not reported: the agent may already have answered and closed the call,
/// and reading its answer says what happened.
async fn send_only_message<M: prost::Message>(send: &mut SendStream<Bytes>, message: &M) {
    if grpc::send_message(send, message).await.is_ok() {
        let _ = send.send_data(Bytes::new(), true);
    }
}

/// Cloud Hypervisor's hybrid vsock handshake; the reply line is capped (the guest side is
/// untrusted, and so is whatever answers on the socket).
async fn hybrid_handshake(mut stream: UnixStream, port: u32) -> Result<UnixStream, String> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| format!("sending CONNECT {port}: {e}"))?;
    let mut reader = BufReader::with_capacity(1, stream);
    let mut line = Vec::new();
    (&mut reader)
        .take(64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("reading the reply to CONNECT {port}: {e}"))?;
    if !line.starts_with(b"OK ") || !line.ends_with(b"\n") {
        return Err(format!(
            "CONNECT {port} was answered {:?}, not `OK <port>` (is the agent listening on port {port}?)",
            String::from_utf8_lossy(&line)
        ));
    }
    Ok(reader.into_inner())
}
