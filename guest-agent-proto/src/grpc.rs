//! gRPC over HTTP/2, the small part of it the service needs: length-prefixed protobuf
//! messages on h2 streams, with a size cap on every message and HTTP/2 flow control as the
//! back-pressure in both directions, and the status trailers. No compression (the agent
//! announces `grpc-accept-encoding: identity`; original hosts never compress).

use std::future::poll_fn;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue};
use prost::Message;

/// The largest message either side accepts: gRPC's default receive limit.
pub const MAX_MESSAGE_SIZE: usize = 4 << 20;
/// The largest chunk of file or output bytes either side puts in one message.
pub const CHUNK_SIZE: usize = 32 << 10;
/// HTTP/2 windows both sides advertise: enough in flight for throughput over vsock, and the
/// bound on what a peer can make us buffer per stream and per connection.
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONNECTION_WINDOW: u32 = 4 << 20;

pub const CONTENT_TYPE: &str = "application/grpc";

/// The service's method paths (`/<package>.<service>/<method>`).
pub mod method {
    pub const EXEC: &str = "/guest.GuestService/Exec";
    pub const COPY_TO_GUEST: &str = "/guest.GuestService/CopyToGuest";
    pub const COPY_FROM_GUEST: &str = "/guest.GuestService/CopyFromGuest";
    pub const STAT_PATH: &str = "/guest.GuestService/StatPath";
}

/// gRPC status codes used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    NotFound = 5,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("the peer closed the stream")]
    Closed,
    #[error("a {len}-byte message exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("a compressed message arrived, but only identity encoding is supported")]
    Compressed,
    #[error("the stream ended inside a message ({0} bytes of it received)")]
    Truncated(usize),
    #[error("malformed protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("gRPC status {code}: {message}")]
    Status { code: u32, message: String },
    #[error("protocol: {0}")]
    Protocol(String),
}

/// One message with its 5-byte prefix (uncompressed flag, big-endian length).
pub fn encode<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode(&mut buf)
        .expect("BytesMut grows to the encoded length");
    buf.freeze()
}

/// Reads length-prefixed messages from a stream, holding at most one message (plus one DATA
/// frame) in memory; flow-control capacity is released only as bytes are taken, so a peer
/// that sends faster than we consume is held back by its window.
pub struct MessageReader {
    stream: RecvStream,
    buf: BytesMut,
    max: usize,
    ended: bool,
}

impl MessageReader {
    pub fn new(stream: RecvStream, max: usize) -> Self {
        MessageReader {
            stream,
            buf: BytesMut::new(),
            max,
            ended: false,
        }
    }

    /// The next message, or `None` when the peer ended the stream cleanly (with an OK status
    /// in its trailers, if it sent any).
    pub async fn next<M: Message + Default>(&mut self) -> Result<Option<M>, GrpcError> {
        loop {
            if self.buf.len() >= 5 {
                if self.buf[0] != 0 {
                    return Err(GrpcError::Compressed);
                }
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > self.max {
                    return Err(GrpcError::TooLarge { len, max: self.max });
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let body = self.buf.split_to(len);
                    return Ok(Some(M::decode(body)?));
                }
            }
            if self.ended {
                return match self.buf.len() {
                    0 => Ok(None),
                    n => Err(GrpcError::Truncated(n)),
                };
            }
            match self.stream.data().await {
                Some(Ok(chunk)) => {
                    let n = chunk.len();
                    self.buf.extend_from_slice(&chunk);
                    // Release what we copied: our buffer is bounded by `max` above.
                    let _ = self.stream.flow_control().release_capacity(n);
                }
                Some(Err(err)) => return Err(err.into()),
                None => {
                    self.ended = true;
                    if let Some(trailers) = self.stream.trailers().await? {
                        check_status(&trailers)?;
                    }
                }
            }
        }
    }
}

/// Sends bytes only as the peer's window allows: a peer that does not read stops us here
/// instead of letting h2 queue without bound.
pub async fn send_bytes(stream: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), GrpcError> {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let capacity = match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(capacity)) => capacity,
            Some(Err(err)) => return Err(err.into()),
            None => return Err(GrpcError::Closed),
        };
        if capacity == 0 {
            continue;
        }
        let chunk = data.split_to(capacity.min(data.len()));
        stream.send_data(chunk, false)?;
    }
    Ok(())
}

pub async fn send_message<M: Message>(
    stream: &mut SendStream<Bytes>,
    msg: &M,
) -> Result<(), GrpcError> {
    send_bytes(stream, encode(msg)).await
}

/// Resolves when the peer resets the stream (a cancelled call), or the connection goes.
pub async fn reset(stream: &mut SendStream<Bytes>) {
    let _ = poll_fn(|cx| stream.poll_reset(cx)).await;
}

/// `grpc-status` and `grpc-message` (percent-encoded, as the gRPC HTTP/2 spec says).
pub fn status_headers(headers: &mut HeaderMap, code: Code, message: &str) {
    headers.insert("grpc-status", HeaderValue::from(code as u32));
    if !message.is_empty() {
        let encoded = percent_encode(message);
        headers.insert(
            "grpc-message",
            HeaderValue::from_str(&encoded).expect("percent-encoding leaves visible ASCII"),
        );
    }
}

pub fn trailers(code: Code, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    status_headers(&mut headers, code, message);
    headers
}

/// An error unless `headers` carry `grpc-status: 0` (or no status at all, for the response
/// headers that precede the messages).
pub fn check_status(headers: &HeaderMap) -> Result<(), GrpcError> {
    let Some(status) = headers.get("grpc-status") else {
        return Ok(());
    };
    let code: u32 = status
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| GrpcError::Protocol(format!("unreadable grpc-status {status:?}")))?;
    if code == 0 {
        return Ok(());
    }
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Err(GrpcError::Status { code, message })
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_message_round_trips_through_percent_encoding() {
        let text = "copy: /tmp/ä 100% failed\nnext";
        let headers = trailers(Code::NotFound, text);
        assert_eq!(headers["grpc-status"], "5");
        assert!(headers["grpc-message"].to_str().unwrap().is_ascii());
        match check_status(&headers) {
            Err(GrpcError::Status { code, message }) => {
                assert_eq!(code, 5);
                assert_eq!(message, text);
            }
            other => panic!("expected a status error, got {other:?}"),
        }
        assert!(check_status(&trailers(Code::Ok, "")).is_ok());
        assert!(check_status(&HeaderMap::new()).is_ok());
    }

    #[test]
    fn encode_prefixes_length() {
        let msg = crate::pb::StatPathRequest {
            path: "/etc".into(),
            follow_links: true,
        };
        let bytes = encode(&msg);
        assert_eq!(bytes[0], 0);
        assert_eq!(
            u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize,
            bytes.len() - 5
        );
        assert_eq!(
            crate::pb::StatPathRequest::decode(&bytes[5..]).unwrap(),
            msg
        );
    }
}
