//! CopyFromGuest: walk a path (a file, a symlink or a whole tree) and stream every entry:
//! header, a file's bytes, end. A path that cannot be read is reported on its own and the
//! walk goes on. Only the requested path itself is followed when it is a symlink and
//! `follow_links` is set; links inside a tree are sent as links.
//!
//! The walk and the reads block, so they run on a blocking thread feeding a small channel;
//! the call sends only as fast as the host reads.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use bytes::Bytes;
use guest_agent_proto::grpc::{self, CHUNK_SIZE, Code, MessageReader};
use guest_agent_proto::pb::copy_from_guest_response::Response;
use guest_agent_proto::pb::{
    CopyFromGuestEnd, CopyFromGuestError, CopyFromGuestHeader, CopyFromGuestRequest,
    CopyFromGuestResponse,
};
use h2::server::SendResponse;
use tokio::sync::mpsc;

use crate::call::{finish, response_head, single_request};

pub(crate) async fn serve(mut reader: MessageReader, mut respond: SendResponse<Bytes>) {
    let Some(request) = single_request::<CopyFromGuestRequest>(&mut reader, &mut respond).await
    else {
        return;
    };
    let Ok(mut stream) = respond.send_response(response_head(), false) else {
        return;
    };
    let (tx, mut rx) = mpsc::channel(4);
    let walker = tokio::task::spawn_blocking(move || {
        let mut sink = Sink {
            tx,
            pending_end: false,
        };
        walk_root(Path::new(&request.path), request.follow_links, &mut sink);
        sink.close();
    });
    while let Some(message) = rx.recv().await {
        if grpc::send_message(&mut stream, &message).await.is_err() {
            return; // the host went away: dropping `rx` stops the walker
        }
    }
    let _ = walker.await;
    finish(&mut stream, Code::Ok, "");
}

/// Where the walk's messages go. Holds back each entry's `end` until it knows whether
/// another entry follows, so the last one carries `final: true`.
pub(crate) struct Sink {
    tx: mpsc::Sender<CopyFromGuestResponse>,
    pending_end: bool,
}

/// The host stopped listening: stop walking.
struct Gone;

impl Sink {
    fn send(&mut self, response: Response) -> Result<(), Gone> {
        self.tx
            .blocking_send(CopyFromGuestResponse {
                response: Some(response),
            })
            .map_err(|_| Gone)
    }

    fn begin_entry(&mut self, header: CopyFromGuestHeader) -> Result<(), Gone> {
        self.flush_end(false)?;
        self.send(Response::Header(header))
    }

    fn end_entry(&mut self) {
        self.pending_end = true;
    }

    fn error(&mut self, path: &str, message: String) -> Result<(), Gone> {
        self.flush_end(false)?;
        self.send(Response::Error(CopyFromGuestError {
            message,
            path: path.to_owned(),
        }))
    }

    fn flush_end(&mut self, last: bool) -> Result<(), Gone> {
        if std::mem::take(&mut self.pending_end) {
            self.send(Response::End(CopyFromGuestEnd { r#final: last }))?;
        }
        Ok(())
    }

    fn close(mut self) {
        let _ = self.flush_end(true);
    }
}

fn walk_root(root: &Path, follow_links: bool, sink: &mut Sink) {
    // The root's own name heads every relative path; `/` has none.
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".to_owned());
    let metadata = if follow_links {
        std::fs::metadata(root)
    } else {
        std::fs::symlink_metadata(root)
    };
    let result = match metadata {
        Ok(metadata) => walk(root, &name, &metadata, sink),
        Err(err) => sink.error(&name, format!("{}: {err}", root.display())),
    };
    let _ = result;
}

fn walk(path: &Path, rel: &str, metadata: &Metadata, sink: &mut Sink) -> Result<(), Gone> {
    let file_type = metadata.file_type();
    let mut header = CopyFromGuestHeader {
        path: rel.to_owned(),
        mode: metadata.mode() & 0o7777,
        is_dir: file_type.is_dir(),
        is_symlink: file_type.is_symlink(),
        link_target: String::new(),
        size: 0,
        mtime: metadata.mtime(),
        uid: metadata.uid(),
        gid: metadata.gid(),
    };
    if file_type.is_symlink() {
        match std::fs::read_link(path) {
            Ok(target) => header.link_target = target.to_string_lossy().into_owned(),
            Err(err) => return sink.error(rel, format!("{}: {err}", path.display())),
        }
        sink.begin_entry(header)?;
        sink.end_entry();
    } else if file_type.is_file() {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(err) => return sink.error(rel, format!("{}: {err}", path.display())),
        };
        header.size = metadata.size() as i64;
        sink.begin_entry(header)?;
        send_file(path, rel, file, metadata.size(), sink)?;
    } else if file_type.is_dir() {
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(err) => return sink.error(rel, format!("{}: {err}", path.display())),
        };
        let mut names: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        sink.begin_entry(header)?;
        sink.end_entry();
        for name in names {
            let child = path.join(&name);
            let child_rel = format!("{rel}/{}", name.to_string_lossy());
            match std::fs::symlink_metadata(&child) {
                Ok(metadata) => walk(&child, &child_rel, &metadata, sink)?,
                Err(err) => sink.error(&child_rel, format!("{}: {err}", child.display()))?,
            }
        }
    } else {
        let message = format!("{}: not a file, directory or symlink", path.display());
        return sink.error(rel, message);
    }
    Ok(())
}

/// Exactly the announced size: a file that shrinks meanwhile is reported as failed (the
/// host discards it), bytes it grew by are not sent.
fn send_file(path: &Path, rel: &str, file: File, size: u64, sink: &mut Sink) -> Result<(), Gone> {
    let mut remaining = size;
    let mut reader = file.take(size);
    let mut buf = vec![0u8; CHUNK_SIZE];
    while remaining > 0 {
        match reader.read(&mut buf) {
            Ok(0) => {
                let message = format!("{}: shrank while being copied", path.display());
                return sink.error(rel, message);
            }
            Ok(n) => {
                remaining -= n as u64;
                sink.send(Response::Data(buf[..n].to_vec()))?;
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return sink.error(rel, format!("{}: {err}", path.display())),
        }
    }
    sink.end_entry();
    Ok(())
}
