//! The image's name-service files, written into the new root before the switch:
//! `/etc/resolv.conf` from `guest_dns` (the image's file is left alone when unset),
//! `/etc/hostname` from `hostname`, and `/etc/hosts` when the image has none. Each file is
//! written whole (temp file, fsync, rename, directory fsync), so a crash never leaves half a
//! file; a symlink in its place (systemd-resolved's `resolv.conf`) is replaced, not followed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use guest_protocol::config::Network;

use super::NetworkError;

/// The address `/etc/hosts` gives the hostname when there is no network (Debian's choice).
const HOSTNAME_LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 1);

/// Which files [`write_files`] wrote, for the log (paths inside the image).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written(pub Vec<&'static str>);

/// Write the files `network` and `hostname` ask for under `root` (the new root, still
/// mounted at its staging path). Without either, the image is not touched.
pub fn write_files(
    root: &Path,
    network: Option<&Network>,
    hostname: Option<&str>,
) -> Result<Written, NetworkError> {
    let mut written = Written::default();
    if let Some(network) = network.filter(|network| !network.dns.is_empty()) {
        write(root, "etc/resolv.conf", &resolv_conf(&network.dns))?;
        written.0.push("/etc/resolv.conf");
    }
    if let Some(hostname) = hostname {
        write(root, "etc/hostname", &format!("{hostname}\n"))?;
        written.0.push("/etc/hostname");
    }
    if network.is_some() || hostname.is_some() {
        let hosts = root.join("etc/hosts");
        match fs::symlink_metadata(&hosts) {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let address = network.map_or(HOSTNAME_LOOPBACK, |network| network.ip);
                write(root, "etc/hosts", &hosts_file(hostname, address))?;
                written.0.push("/etc/hosts");
            }
            Err(cause) => {
                return Err(NetworkError::WriteFile {
                    path: PathBuf::from("/etc/hosts"),
                    cause,
                });
            }
        }
    }
    Ok(written)
}

fn resolv_conf(servers: &[Ipv4Addr]) -> String {
    let mut text = String::from("# From config.json's guest_dns, written by guest-init at boot.\n");
    for server in servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    text
}

/// Loopback names, and the hostname (with its first label as an alias when it is a FQDN).
fn hosts_file(hostname: Option<&str>, address: Ipv4Addr) -> String {
    let mut text = String::from(
        "# Written by guest-init at boot: the image had no /etc/hosts.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    if let Some(hostname) = hostname {
        text.push_str(&format!("{address}\t{hostname}"));
        if let Some((short, _)) = hostname.split_once('.') {
            text.push_str(&format!(" {short}"));
        }
        text.push('\n');
    }
    text
}

/// `root/relative`, whole or not at all.
fn write(root: &Path, relative: &'static str, contents: &str) -> Result<(), NetworkError> {
    let path = root.join(relative);
    write_atomically(&path, contents).map_err(|cause| NetworkError::WriteFile {
        path: Path::new("/").join(relative),
        cause,
    })
}

fn write_atomically(path: &Path, contents: &str) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("no parent directory"))?;
    fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.guest-init"));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&temp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn network() -> Network {
        Network::new(Ipv4Addr::new(192, 0, 2, 15), 24)
            .with_dns(Ipv4Addr::new(192, 0, 2, 3))
            .with_dns(Ipv4Addr::new(9, 9, 9, 9))
    }

    fn read(root: &Path, relative: &str) -> String {
        fs::read_to_string(root.join(relative)).unwrap()
    }

    #[test]
    fn dns_hostname_and_hosts_when_the_image_has_none() {
        let root = tempfile::tempdir().unwrap();
        let written = write_files(root.path(), Some(&network()), Some("web-1.example")).unwrap();
        assert_eq!(
            written.0,
            ["/etc/resolv.conf", "/etc/hostname", "/etc/hosts"]
        );
        let resolv = read(root.path(), "etc/resolv.conf");
        let servers: Vec<&str> = resolv.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(servers, ["nameserver 192.0.2.3", "nameserver 9.9.9.9"]);
        assert_eq!(read(root.path(), "etc/hostname"), "web-1.example\n");
        let hosts = read(root.path(), "etc/hosts");
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(
            hosts.contains("192.0.2.15\tweb-1.example web-1\n"),
            "{hosts}"
        );
        let mode = fs::metadata(root.path().join("etc/hosts"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        // No temp file is left behind.
        let names: Vec<String> = fs::read_dir(root.path().join("etc"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn the_image_s_hosts_and_resolv_conf_stay_when_nothing_asks_to_change_them() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("etc")).unwrap();
        fs::write(root.path().join("etc/hosts"), "10.1.1.1 image-own\n").unwrap();
        fs::write(
            root.path().join("etc/resolv.conf"),
            "nameserver 10.1.1.53\n",
        )
        .unwrap();
        let no_dns = Network::new(Ipv4Addr::new(192, 0, 2, 15), 24);
        let written = write_files(root.path(), Some(&no_dns), None).unwrap();
        assert_eq!(written, Written::default());
        assert_eq!(read(root.path(), "etc/hosts"), "10.1.1.1 image-own\n");
        assert_eq!(
            read(root.path(), "etc/resolv.conf"),
            "nameserver 10.1.1.53\n"
        );
    }

    #[test]
    fn nothing_configured_touches_nothing() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(
            write_files(root.path(), None, None).unwrap(),
            Written::default()
        );
        assert!(!root.path().join("etc").exists());
    }

    #[test]
    fn hostname_without_network_maps_to_127_0_1_1() {
        let root = tempfile::tempdir().unwrap();
        write_files(root.path(), None, Some("box")).unwrap();
        let hosts = read(root.path(), "etc/hosts");
        assert!(hosts.contains("127.0.1.1\tbox\n"), "{hosts}");
        assert!(!root.path().join("etc/resolv.conf").exists());
    }

    #[test]
    fn a_resolv_conf_symlink_is_replaced_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("stub-resolv.conf");
        fs::write(&target, "nameserver 127.0.0.53\n").unwrap();
        fs::create_dir_all(root.path().join("etc")).unwrap();
        symlink(&target, root.path().join("etc/resolv.conf")).unwrap();
        write_files(root.path(), Some(&network()), None).unwrap();
        assert_eq!(
            fs::read_to_string(&target).unwrap(),
            "nameserver 127.0.0.53\n"
        );
        let meta = fs::symlink_metadata(root.path().join("etc/resolv.conf")).unwrap();
        assert!(meta.file_type().is_file());
        assert!(read(root.path(), "etc/resolv.conf").contains("nameserver 9.9.9.9\n"));
    }

    #[test]
    fn a_failed_write_names_the_file_in_the_image() {
        let root = tempfile::tempdir().unwrap();
        // `etc` is a file: nothing can be created under it.
        fs::write(root.path().join("etc"), "").unwrap();
        let err = write_files(root.path(), None, Some("box")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("writing /etc/hostname in the new root: "),
            "{err}"
        );
    }
}
