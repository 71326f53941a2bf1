//! One call's response side, shared by the server (refusals before routing) and every
//! handler: the response headers, a Trailers-Only status, the closing status, and the single
//! request message of a unary or server-streaming call.

use bytes::Bytes;
use guest_agent_proto::grpc::{self, Code, MessageReader};
use h2::server::SendResponse;
use http::{HeaderMap, Response};

/// The response headers that start a call's messages.
pub(crate) fn response_head() -> Response<()> {
    Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE)
        .header("grpc-accept-encoding", "identity")
        .body(())
        .expect("static response headers are valid")
}

/// A call answered by its status alone (gRPC's Trailers-Only response).
pub(crate) fn trailers_only(respond: &mut SendResponse<Bytes>, code: Code, message: &str) {
    let mut response = response_head();
    grpc::status_headers(response.headers_mut(), code, message);
    let _ = respond.send_response(response, true);
}

/// Ends a call's response stream with its status.
pub(crate) fn finish(stream: &mut h2::SendStream<Bytes>, code: Code, message: &str) {
    let trailers: HeaderMap = grpc::trailers(code, message);
    let _ = stream.send_trailers(trailers);
}

/// The request of a unary or server-streaming call: exactly one message.
pub(crate) async fn single_request<M: prost::Message + Default>(
    reader: &mut MessageReader,
    respond: &mut SendResponse<Bytes>,
) -> Option<M> {
    match reader.next::<M>().await {
        Ok(Some(msg)) => Some(msg),
        Ok(None) => {
            trailers_only(
                respond,
                Code::InvalidArgument,
                "the call carried no request message",
            );
            None
        }
        Err(err) => {
            trailers_only(
                respond,
                Code::InvalidArgument,
                &format!("reading the request: {err}"),
            );
            None
        }
    }
}
