//! Copy into the guest: a host file, symlink or tree sent as entries (directories first,
//! then their contents, in name order); the agent writes each file atomically.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use guest_agent_proto::grpc::{self, CHUNK_SIZE};
use guest_agent_proto::pb::copy_to_guest_request::Request;
use guest_agent_proto::pb::{
    CopyToGuestEnd, CopyToGuestRequest, CopyToGuestResponse, CopyToGuestStart,
};
use tokio::io::AsyncReadExt;

use crate::{Client, ClientError};

struct LocalEntry {
    path: PathBuf,
    /// The guest path.
    dest: String,
    metadata: std::fs::Metadata,
}

fn local_error(path: &Path, err: std::io::Error) -> ClientError {
    ClientError::Local {
        path: path.to_owned(),
        message: err.to_string(),
    }
}

/// Pre-order, names sorted, symlinks not followed.
fn walk(path: &Path, dest: String, out: &mut Vec<LocalEntry>) -> Result<(), ClientError> {
    let metadata = std::fs::symlink_metadata(path).map_err(|e| local_error(path, e))?;
    let is_dir = metadata.is_dir();
    out.push(LocalEntry {
        path: path.to_owned(),
        dest: dest.clone(),
        metadata,
    });
    if is_dir {
        let mut names: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| local_error(path, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| local_error(path, e))?;
        names.sort();
        for name in names {
            let child_dest = format!("{}/{}", dest.trim_end_matches('/'), name.to_string_lossy());
            walk(&path.join(&name), child_dest, out)?;
        }
    }
    Ok(())
}

fn request(request: Request) -> CopyToGuestRequest {
    CopyToGuestRequest {
        request: Some(request),
    }
}

impl Client {
    /// Copies the host's `src` to the guest path `dest` (the root entry lands at `dest`
    /// itself). Returns the bytes written; a failed path fails the call, naming every path.
    pub async fn copy_to_guest(&self, src: &Path, dest: &str) -> Result<i64, ClientError> {
        let mut entries = Vec::new();
        walk(src, dest.to_owned(), &mut entries)?;
        let (mut send, response) = self.start_call(grpc::method::COPY_TO_GUEST).await?;
        let sent = send_entries(&mut send, &entries).await;
        if let Err(err) = sent {
            // The agent may have stopped the call: its status explains better than ours.
            return match self.response(response).await {
                Err(answer) => Err(answer),
                Ok(_) => Err(err),
            };
        }
        let mut reader = self.response(response).await?;
        let answer: CopyToGuestResponse = reader
            .next()
            .await?
            .ok_or(ClientError::Truncated("CopyToGuest returned no response"))?;
        if answer.success {
            return Ok(answer.bytes_written);
        }
        let errors = if answer.errors.is_empty() {
            // An agent without the per-path extension: its one error string.
            vec![(String::new(), answer.error)]
        } else {
            answer
                .errors
                .into_iter()
                .map(|e| (e.path, e.message))
                .collect()
        };
        Err(ClientError::PathErrors(errors))
    }
}

async fn send_entries(
    send: &mut h2::SendStream<Bytes>,
    entries: &[LocalEntry],
) -> Result<(), ClientError> {
    for entry in entries {
        let metadata = &entry.metadata;
        let file_type = metadata.file_type();
        let mut start = CopyToGuestStart {
            path: entry.dest.clone(),
            mode: metadata.permissions().mode() & 0o7777,
            is_dir: file_type.is_dir(),
            size: 0,
            mtime: metadata.mtime(),
            uid: metadata.uid(),
            gid: metadata.gid(),
            is_symlink: file_type.is_symlink(),
            link_target: String::new(),
        };
        if file_type.is_symlink() {
            let target =
                std::fs::read_link(&entry.path).map_err(|e| local_error(&entry.path, e))?;
            start.link_target = target.to_string_lossy().into_owned();
            grpc::send_message(send, &request(Request::Start(start))).await?;
        } else if file_type.is_dir() {
            grpc::send_message(send, &request(Request::Start(start))).await?;
        } else if file_type.is_file() {
            let mut file = tokio::fs::File::open(&entry.path)
                .await
                .map_err(|e| local_error(&entry.path, e))?;
            start.size = metadata.size() as i64;
            grpc::send_message(send, &request(Request::Start(start))).await?;
            let mut remaining = metadata.size();
            let mut buf = vec![0u8; CHUNK_SIZE];
            while remaining > 0 {
                let want = buf.len().min(remaining as usize);
                let n = file
                    .read(&mut buf[..want])
                    .await
                    .map_err(|e| local_error(&entry.path, e))?;
                if n == 0 {
                    // Dropping the call without `end` makes the agent discard the file.
                    return Err(ClientError::Local {
                        path: entry.path.clone(),
                        message: "the file shrank while being copied".into(),
                    });
                }
                remaining -= n as u64;
                grpc::send_message(send, &request(Request::Data(buf[..n].to_vec()))).await?;
            }
        } else {
            return Err(ClientError::Local {
                path: entry.path.clone(),
                message: "not a file, directory or symlink".into(),
            });
        }
    }
    grpc::send_message(send, &request(Request::End(CopyToGuestEnd {}))).await?;
    send.send_data(Bytes::new(), true)?;
    Ok(())
}
