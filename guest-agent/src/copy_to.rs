//! CopyToGuest: entries (directories, files, symlinks) written into the guest. A file is
//! written to a temporary name beside its destination and renamed into place only once all
//! its announced bytes arrived and are on disk, so a cut transfer leaves no half file. An
//! entry that fails is reported with its path and the transfer goes on.
//!
//! Paths are the guest's (relative ones are taken from `/`); the host may write anywhere, as
//! it may run any command.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use guest_agent_proto::grpc::{self, Code, MessageReader};
use guest_agent_proto::pb::copy_to_guest_request::Request;
use guest_agent_proto::pb::{CopyToGuestRequest, CopyToGuestResponse, CopyToGuestStart, PathError};
use h2::server::SendResponse;
use tokio::sync::mpsc;

use crate::call::{finish, response_head};

pub(crate) async fn serve(mut reader: MessageReader, respond: SendResponse<Bytes>) {
    let mut respond = respond;
    let (tx, rx) = mpsc::channel::<Request>(4);
    let writer = tokio::task::spawn_blocking(move || receive(rx));
    let mut cut = None;
    loop {
        match reader.next::<CopyToGuestRequest>().await {
            Ok(Some(CopyToGuestRequest {
                request: Some(request),
            })) => {
                if tx.send(request).await.is_err() {
                    break;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(err) => {
                cut = Some(err);
                break;
            }
        }
    }
    drop(tx);
    if cut.is_some() {
        // The transfer was cut: the writer discards the file in progress; nobody is left to
        // answer.
        let _ = writer.await;
        return;
    }
    let Ok(response) = writer.await else {
        return crate::call::trailers_only(
            &mut respond,
            Code::Internal,
            "the copy's writer failed",
        );
    };
    let Ok(mut stream) = respond.send_response(response_head(), false) else {
        return;
    };
    if grpc::send_message(&mut stream, &response).await.is_ok() {
        finish(&mut stream, Code::Ok, "");
    }
}

fn receive(mut rx: mpsc::Receiver<Request>) -> CopyToGuestResponse {
    let mut writer = Writer::default();
    while let Some(request) = rx.blocking_recv() {
        match request {
            Request::Start(start) => writer.start(start),
            Request::Data(bytes) => writer.data(&bytes),
            Request::End(_) => writer.end(),
        }
    }
    writer.finish()
}

/// The transfer's state: the entry being written and what went wrong so far.
#[derive(Default)]
pub(crate) struct Writer {
    current: Option<Entry>,
    bytes_written: i64,
    errors: Vec<PathError>,
    /// Directory mtimes are set last: writing their children would change them again.
    dir_times: Vec<(PathBuf, i64)>,
}

enum Entry {
    File(PendingFile),
    /// An entry that failed: its remaining bytes are dropped.
    Skip,
}

impl Writer {
    pub(crate) fn start(&mut self, start: CopyToGuestStart) {
        self.close_current();
        let path = guest_path(&start.path);
        let result = if start.is_symlink {
            write_symlink(&path, &start)
        } else if start.is_dir {
            self.make_dir(&path, &start)
        } else {
            match PendingFile::create(&path, &start) {
                Ok(file) => {
                    self.current = Some(Entry::File(file));
                    self.commit_if_complete();
                    Ok(())
                }
                Err(err) => Err(err),
            }
        };
        if let Err(message) = result {
            self.fail(&start.path, message);
        }
    }

    pub(crate) fn data(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match &mut self.current {
            Some(Entry::File(file)) => {
                if let Err(message) = file.write(bytes) {
                    let path = file.path.display().to_string();
                    self.fail(&path, message);
                    return;
                }
                self.commit_if_complete();
            }
            Some(Entry::Skip) => {}
            None => self.errors.push(PathError {
                path: String::new(),
                message: format!("{} bytes of data outside any file entry", bytes.len()),
            }),
        }
    }

    pub(crate) fn end(&mut self) {
        self.close_current();
    }

    /// The stream ended: a file still short of its size was cut and is discarded.
    pub(crate) fn finish(mut self) -> CopyToGuestResponse {
        self.close_current();
        for (dir, mtime) in self.dir_times.iter().rev() {
            if let Err(err) = set_mtime(&File::open(dir).map_err(|e| e.to_string()), *mtime) {
                let path = dir.display().to_string();
                self.errors.push(PathError { path, message: err });
            }
        }
        let error = self
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect::<Vec<_>>()
            .join("\n");
        CopyToGuestResponse {
            success: self.errors.is_empty(),
            error,
            bytes_written: self.bytes_written,
            errors: self.errors,
        }
    }

    fn fail(&mut self, path: &str, message: String) {
        // Dropping a pending file removes its temporary.
        self.current = Some(Entry::Skip);
        self.errors.push(PathError {
            path: path.to_owned(),
            message,
        });
    }

    fn close_current(&mut self) {
        if let Some(Entry::File(file)) = self.current.take() {
            let message = format!(
                "the transfer ended after {} of its {} bytes; nothing was written",
                file.written, file.size
            );
            let path = file.path.display().to_string();
            drop(file);
            self.errors.push(PathError { path, message });
        }
    }

    fn commit_if_complete(&mut self) {
        let Some(Entry::File(file)) = &self.current else {
            return;
        };
        if file.written < file.size {
            return;
        }
        let Some(Entry::File(file)) = self.current.take() else {
            unreachable!("checked above")
        };
        let path = file.path.display().to_string();
        let written = file.written as i64;
        match file.commit() {
            Ok(()) => self.bytes_written += written,
            Err(message) => self.fail(&path, message),
        }
    }

    fn make_dir(&mut self, path: &Path, start: &CopyToGuestStart) -> Result<(), String> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err("exists and is not a directory".into()),
            Err(_) => std::fs::create_dir_all(path).map_err(|e| format!("mkdir: {e}"))?,
        }
        let dir = File::open(path).map_err(|e| format!("open: {e}"))?;
        if start.mode != 0 {
            dir.set_permissions(std::fs::Permissions::from_mode(start.mode & 0o7777))
                .map_err(|e| format!("chmod: {e}"))?;
        }
        chown(&dir, start)?;
        if start.mtime != 0 {
            self.dir_times.push((path.to_owned(), start.mtime));
        }
        Ok(())
    }
}

fn guest_path(path: &str) -> PathBuf {
    Path::new("/").join(path)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary name in the destination's directory (same filesystem: the rename is atomic).
fn temp_beside(path: &Path) -> Result<PathBuf, String> {
    let parent = path.parent().ok_or("has no parent directory")?;
    let name = path.file_name().ok_or("has no file name")?;
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(parent.join(format!(
        ".{}.guest-agent-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn ensure_parent(path: &Path) -> Result<(), String> {
    match path.parent() {
        Some(parent) => std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating its directory {}: {e}", parent.display())),
        None => Err("has no parent directory".into()),
    }
}

/// A file being received under a temporary name; removed unless committed.
pub(crate) struct PendingFile {
    path: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    size: u64,
    written: u64,
    start: CopyToGuestStart,
}

impl PendingFile {
    fn create(path: &Path, start: &CopyToGuestStart) -> Result<PendingFile, String> {
        if start.size < 0 {
            return Err(format!("negative size {}", start.size));
        }
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
            return Err("is a directory".into());
        }
        ensure_parent(path)?;
        let temp = temp_beside(path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
            .map_err(|e| format!("creating {}: {e}", temp.display()))?;
        Ok(PendingFile {
            path: path.to_owned(),
            temp,
            file: Some(file),
            size: start.size as u64,
            written: 0,
            start: start.clone(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.written + bytes.len() as u64 > self.size {
            return Err(format!(
                "more bytes than the {} announced; nothing was written",
                self.size
            ));
        }
        let file = self.file.as_mut().expect("open until committed");
        file.write_all(bytes).map_err(|e| format!("write: {e}"))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Mode, owner and mtime on the temporary, then fsync, rename, fsync the directory.
    fn commit(mut self) -> Result<(), String> {
        let file = self.file.take().expect("open until committed");
        let mode = match self.start.mode & 0o7777 {
            0 => 0o644,
            mode => mode,
        };
        chown(&file, &self.start)?;
        // After chown, which clears set-id bits.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod: {e}"))?;
        if self.start.mtime != 0 {
            set_mtime(
                &Ok(file.try_clone().map_err(|e| e.to_string())?),
                self.start.mtime,
            )?;
        }
        file.sync_all().map_err(|e| format!("fsync: {e}"))?;
        std::fs::rename(&self.temp, &self.path).map_err(|e| format!("rename into place: {e}"))?;
        self.file = None;
        self.temp = PathBuf::new();
        if let Some(parent) = self.path.parent() {
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

fn write_symlink(path: &Path, start: &CopyToGuestStart) -> Result<(), String> {
    if start.link_target.is_empty() {
        return Err("a symlink without a target".into());
    }
    ensure_parent(path)?;
    let temp = temp_beside(path)?;
    std::os::unix::fs::symlink(&start.link_target, &temp).map_err(|e| format!("symlink: {e}"))?;
    if start.uid != 0 || start.gid != 0 {
        let owner = (start.uid != 0).then_some(start.uid);
        let group = (start.gid != 0).then_some(start.gid);
        if let Err(e) = std::os::unix::fs::lchown(&temp, owner, group) {
            let _ = std::fs::remove_file(&temp);
            return Err(format!("chown: {e}"));
        }
    }
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        format!("rename into place: {e}")
    })
}

/// uid/gid 0 mean "the default" (the agent's own), as the original protocol says.
fn chown(file: &File, start: &CopyToGuestStart) -> Result<(), String> {
    if start.uid == 0 && start.gid == 0 {
        return Ok(());
    }
    let owner = (start.uid != 0).then_some(start.uid);
    let group = (start.gid != 0).then_some(start.gid);
    std::os::unix::fs::fchown(file, owner, group).map_err(|e| format!("chown: {e}"))
}

fn set_mtime(file: &Result<File, String>, mtime: i64) -> Result<(), String> {
    let file = file.as_ref().map_err(|e| e.clone())?;
    let time = if mtime >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(mtime as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(mtime.unsigned_abs())
    };
    file.set_modified(time)
        .map_err(|e| format!("setting mtime: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &Path, size: i64) -> CopyToGuestStart {
        CopyToGuestStart {
            path: path.to_str().unwrap().to_owned(),
            mode: 0o640,
            size,
            mtime: 1_000_000_000,
            ..Default::default()
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_file_appears_only_when_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut writer = Writer::default();
        writer.start(file(&path, 6));
        writer.data(b"abc");
        assert!(!path.exists(), "no half file under the final name");
        writer.data(b"def");
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdef");
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.mode() & 0o777, meta.mtime()), (0o640, 1_000_000_000));
        writer.end();
        let response = writer.finish();
        assert!(response.success, "{}", response.error);
        assert_eq!(response.bytes_written, 6);
    }

    #[test]
    fn a_cut_transfer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut writer = Writer::default();
        writer.start(file(&path, 100));
        writer.data(&[1; 40]);
        assert_eq!(entries(dir.path()).len(), 1, "the temporary");
        let response = writer.finish();
        assert!(entries(dir.path()).is_empty());
        assert!(!response.success);
        assert_eq!(response.errors.len(), 1);
        assert_eq!(response.errors[0].path, path.to_str().unwrap());
        assert!(
            response.errors[0].message.contains("40 of its 100"),
            "{}",
            response.error
        );
    }

    #[test]
    fn errors_are_per_path_and_the_transfer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let over = dir.path().join("over");
        let blocked = dir.path().join("blocker/inner");
        std::fs::write(dir.path().join("blocker"), b"a file, not a dir").unwrap();
        let good = dir.path().join("good");
        let mut writer = Writer::default();
        writer.start(file(&over, 2));
        writer.data(b"too long");
        writer.start(file(&blocked, 1));
        writer.data(b"x");
        writer.start(file(&good, 2));
        writer.data(b"ok");
        writer.end();
        let response = writer.finish();
        let failed: Vec<_> = response.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(failed, [over.to_str().unwrap(), blocked.to_str().unwrap()]);
        assert!(response.error.contains("more bytes than the 2 announced"));
        assert_eq!(std::fs::read(&good).unwrap(), b"ok");
        assert!(!over.exists());
        assert_eq!(entries(dir.path()), ["blocker", "good"]);
    }
}
