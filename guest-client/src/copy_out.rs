//! Copy out of the guest: a file or tree streamed by the agent, written under a host
//! directory through [`Destination`] (confined, atomic per file). Anything the guest sends
//! that breaks the rules stops the copy with an error naming the path.

use std::path::Path;

use guest_agent_proto::grpc;
use guest_agent_proto::pb::copy_from_guest_response::Response;
use guest_agent_proto::pb::{CopyFromGuestHeader, CopyFromGuestRequest, CopyFromGuestResponse};

use crate::confined::{Destination, PendingFile, check_path};
use crate::{Client, ClientError};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyOutReport {
    pub entries: u64,
    pub bytes: u64,
}

enum Current {
    None,
    Entry,
    File {
        header: CopyFromGuestHeader,
        pending: PendingFile,
        received: u64,
    },
}

/// A guest's text, at most 1 KiB of it.
fn shorten(mut text: String) -> String {
    const MAX: usize = 1024;
    if text.len() > MAX {
        let mut end = MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

fn refused(path: &str, reason: impl Into<String>) -> ClientError {
    ClientError::Refused {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

impl Client {
    /// Copies the guest's `src` (file, symlink or tree) into the host directory `dest_dir`
    /// as `dest_dir/<name of src>`. Owners are applied only with `preserve_owner` (needs
    /// root); modes lose set-id and sticky bits.
    pub async fn copy_from_guest(
        &self,
        src: &str,
        dest_dir: &Path,
        follow_links: bool,
        preserve_owner: bool,
    ) -> Result<CopyOutReport, ClientError> {
        let dest = Destination::open(dest_dir, preserve_owner).map_err(|e| ClientError::Local {
            path: dest_dir.to_owned(),
            message: format!("opening the destination directory: {e}"),
        })?;
        let (mut send, response) = self.start_call(grpc::method::COPY_FROM_GUEST).await?;
        let request = CopyFromGuestRequest {
            path: src.to_owned(),
            follow_links,
        };
        crate::send_only_message(&mut send, &request).await;
        let mut reader = self.response(response).await?;

        let limits = self.limits;
        let mut report = CopyOutReport::default();
        let mut current = Current::None;
        let mut dirs: Vec<CopyFromGuestHeader> = Vec::new();
        let mut errors = Vec::new();
        while let Some(CopyFromGuestResponse { response }) = reader.next().await? {
            match response {
                Some(Response::Header(header)) => {
                    if let Current::File {
                        header: open,
                        received,
                        ..
                    } = &current
                    {
                        if *received != open.size as u64 {
                            return Err(refused(
                                &open.path,
                                format!(
                                    "a new entry began after {received} of its {} bytes",
                                    open.size
                                ),
                            ));
                        }
                        return Err(refused(&open.path, "a new entry began before its end"));
                    }
                    report.entries += 1;
                    if report.entries > limits.max_copy_entries {
                        return Err(ClientError::TooLarge {
                            what: "entries",
                            limit: limits.max_copy_entries,
                        });
                    }
                    let components =
                        check_path(&header.path).map_err(|r| refused(&header.path, r))?;
                    current = if header.is_symlink {
                        dest.create_symlink(&components, &header.link_target)
                            .map_err(|r| refused(&header.path, r))?;
                        Current::Entry
                    } else if header.is_dir {
                        dest.create_dir(&components)
                            .map_err(|r| refused(&header.path, r))?;
                        dirs.push(header);
                        Current::Entry
                    } else {
                        if header.size < 0 {
                            return Err(refused(
                                &header.path,
                                format!("negative size {}", header.size),
                            ));
                        }
                        if report.bytes + header.size as u64 > limits.max_copy_bytes {
                            return Err(ClientError::TooLarge {
                                what: "file bytes",
                                limit: limits.max_copy_bytes,
                            });
                        }
                        let pending = dest
                            .create_file(&components)
                            .map_err(|r| refused(&header.path, r))?;
                        Current::File {
                            header,
                            pending,
                            received: 0,
                        }
                    };
                }
                Some(Response::Data(bytes)) => {
                    let Current::File {
                        header,
                        pending,
                        received,
                    } = &mut current
                    else {
                        return Err(refused(
                            "",
                            format!("{} bytes of data outside any file", bytes.len()),
                        ));
                    };
                    let new_total = *received + bytes.len() as u64;
                    if new_total > header.size as u64 {
                        return Err(refused(
                            &header.path,
                            format!(
                                "more bytes than the {} its header announced; nothing was written",
                                header.size
                            ),
                        ));
                    }
                    pending
                        .write(&bytes)
                        .map_err(|r| refused(&header.path, r))?;
                    *received = new_total;
                    report.bytes += bytes.len() as u64;
                }
                Some(Response::End(_)) => {
                    if let Current::File {
                        header,
                        pending,
                        received,
                    } = std::mem::replace(&mut current, Current::None)
                    {
                        if received != header.size as u64 {
                            return Err(refused(
                                &header.path,
                                format!(
                                    "ended after {received} of its {} bytes; nothing was written",
                                    header.size
                                ),
                            ));
                        }
                        dest.commit_file(
                            pending,
                            header.mode,
                            header.uid,
                            header.gid,
                            header.mtime,
                        )
                        .map_err(|r| refused(&header.path, r))?;
                    }
                }
                Some(Response::Error(error)) => {
                    // The guest could not read this path; a file in progress is discarded.
                    // Errors count as entries, and their text is cut short, so a guest
                    // cannot grow this list without bound.
                    current = Current::None;
                    report.entries += 1;
                    if report.entries > limits.max_copy_entries {
                        return Err(ClientError::TooLarge {
                            what: "entries",
                            limit: limits.max_copy_entries,
                        });
                    }
                    errors.push((shorten(error.path), shorten(error.message)));
                }
                None => {}
            }
        }
        if let Current::File {
            header, received, ..
        } = &current
        {
            return Err(refused(
                &header.path,
                format!(
                    "the copy ended after {received} of its {} bytes; nothing was written",
                    header.size
                ),
            ));
        }
        // Deepest first: a parent's mode could forbid finishing its children.
        for header in dirs.iter().rev() {
            let components = check_path(&header.path).map_err(|r| refused(&header.path, r))?;
            if let Err(reason) = dest.finish_dir(
                &components,
                header.mode,
                header.uid,
                header.gid,
                header.mtime,
            ) {
                errors.push((header.path.clone(), reason));
            }
        }
        if errors.is_empty() {
            Ok(report)
        } else {
            Err(ClientError::PathErrors(errors))
        }
    }
}
