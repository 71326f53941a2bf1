//! StatPath: what a path is, without following a final symlink unless asked.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use bytes::Bytes;
use guest_agent_proto::grpc::{self, Code, MessageReader};
use guest_agent_proto::pb::{StatPathRequest, StatPathResponse};
use h2::server::SendResponse;

use crate::call::{finish, response_head, single_request};

pub(crate) async fn serve(mut reader: MessageReader, mut respond: SendResponse<Bytes>) {
    let Some(request) = single_request::<StatPathRequest>(&mut reader, &mut respond).await else {
        return;
    };
    let answer = stat(Path::new(&request.path), request.follow_links);
    let Ok(mut stream) = respond.send_response(response_head(), false) else {
        return;
    };
    if grpc::send_message(&mut stream, &answer).await.is_ok() {
        finish(&mut stream, Code::Ok, "");
    }
}

pub(crate) fn stat(path: &Path, follow_links: bool) -> StatPathResponse {
    let metadata = if follow_links {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    };
    let metadata = match metadata {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return StatPathResponse::default();
        }
        Err(err) => {
            return StatPathResponse {
                error: format!("stat {}: {err}", path.display()),
                ..Default::default()
            };
        }
    };
    let file_type = metadata.file_type();
    let link_target = if file_type.is_symlink() {
        std::fs::read_link(path)
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        String::new()
    };
    StatPathResponse {
        exists: true,
        is_dir: file_type.is_dir(),
        is_file: file_type.is_file(),
        is_symlink: file_type.is_symlink(),
        link_target,
        mode: metadata.mode() & 0o7777,
        size: metadata.size() as i64,
        error: String::new(),
        mtime: metadata.mtime(),
        uid: metadata.uid(),
        gid: metadata.gid(),
    }
}
