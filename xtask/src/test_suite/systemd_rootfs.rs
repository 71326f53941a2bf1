//! The systemd-mode VM test's rootfs: Debian (the host's release) with `systemd-sysv` as
//! `/sbin/init`, built by `mmdebstrap` from the host's apt sources, plus one test unit that
//! runs once `multi-user.target` is reached, prints what the network looks like on the
//! console, and powers the VM off with `systemctl poweroff`. Made into an ext4 image once and
//! cached under `target/vm-tests/systemd-rootfs/`, named by a digest of this recipe, so a
//! change to it builds a new image and nothing else does.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

/// Packages on top of `--variant=minbase`: systemd as init, udev (without it the serial
/// console's device unit never appears and getty waits 90 s), and busybox for the test unit's
/// `ip`, `hostname` and `wget`.
const PACKAGES: &[&str] = &["systemd-sysv", "udev", "busybox"];

/// The unit: ordered after `multi-user.target` (without default dependencies, so the target
/// does not order itself after it), so that it runs only once the target is reached.
const UNIT_NAME: &str = "vm-test-report.service";
const UNIT: &str = "\
[Unit]
Description=guest-init VM test: report the network, then power off
DefaultDependencies=no
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/bin/vm-test-report

[Install]
WantedBy=multi-user.target
";

/// What the unit runs; every line it prints starts with `VM-TEST `.
const REPORT: &str = r#"#!/bin/sh
exec > /dev/console 2>&1
say() { sed 's/^ */VM-TEST /'; }
echo "multi-user.target $(systemctl is-active multi-user.target)" | say
echo "pid1 $(readlink /proc/1/exe)" | say
echo "hostname $(busybox hostname)" | say
sed 's/^/etc-hostname /' /etc/hostname | say
grep -v '^#' /etc/resolv.conf | say
busybox ip -4 addr show dev eth0 | say
busybox ip route | say
echo "poweroff" | say
systemctl poweroff --no-block
"#;

/// A fixed machine id: with none, systemd treats the boot as a first boot and
/// `systemd-firstboot` may prompt on the console.
const MACHINE_ID: &str = "5eedc0de5eedc0de5eedc0de5eedc0de\n";

/// Size of the ext4 image (sparse; the tree is ~250 MB).
const IMAGE_MIB: u32 = 1024;

/// The cached image for the current recipe.
pub fn image() -> PathBuf {
    cache_dir().join(format!("rootfs-{}.ext4", recipe_digest()))
}

fn cache_dir() -> PathBuf {
    crate::workspace_root().join("target/vm-tests/systemd-rootfs")
}

fn recipe_digest() -> String {
    let recipe = format!("{PACKAGES:?}\n{UNIT}\n{REPORT}\n{MACHINE_ID}");
    system::hash::sha256_bytes(recipe.as_bytes()).hex()[..16].to_owned()
}

/// Builds [`image`] unless it exists (idempotent; older recipes' images are removed).
pub fn prepare(sh: &Shell) -> anyhow::Result<()> {
    let image = image();
    if image.is_file() {
        return Ok(());
    }
    eprintln!(
        "preparing the systemd VM test's rootfs: mmdebstrap {} from the host's apt sources",
        PACKAGES.join(",")
    );
    build(sh, &image).with_context(|| {
        format!(
            "preparing {} (Debian with systemd-sysv for the systemd-mode VM test, from the \
             host's apt sources with mmdebstrap)",
            image.display()
        )
    })
}

fn build(sh: &Shell, image: &Path) -> anyhow::Result<()> {
    let dir = cache_dir();
    fs::create_dir_all(&dir)?;
    let tree = dir.join("tree.partial");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    let suite = host_suite()?;
    let sources = host_sources()?;
    let apt_conf = dir.join("host-acquire.conf");
    fs::write(&apt_conf, host_acquire_options()?)?;
    let include = format!("--include={}", PACKAGES.join(","));
    let aptopt = format!("--aptopt={}", apt_conf.display());
    // Each source file is a "mirror" argument (one-line or deb822, by its extension).
    cmd!(
        sh,
        "mmdebstrap --variant=minbase {include} {aptopt} {suite} {tree} {sources...}"
    )
    .run()
    .context("mmdebstrap (apt-get install mmdebstrap)")?;

    fs::write(tree.join("etc/machine-id"), MACHINE_ID)?;
    let units = tree.join("etc/systemd/system");
    fs::create_dir_all(units.join("multi-user.target.wants"))?;
    fs::write(units.join(UNIT_NAME), UNIT)?;
    std::os::unix::fs::symlink(
        format!("/etc/systemd/system/{UNIT_NAME}"),
        units.join("multi-user.target.wants").join(UNIT_NAME),
    )?;
    std::os::unix::fs::symlink("/dev/null", units.join("systemd-firstboot.service"))?;
    let report = tree.join("usr/local/bin/vm-test-report");
    fs::create_dir_all(report.parent().unwrap())?;
    fs::write(&report, REPORT)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&report, fs::Permissions::from_mode(0o755))?;

    let partial = image.with_extension("ext4.partial");
    let size = format!("{IMAGE_MIB}M");
    cmd!(sh, "mkfs.ext4 -q -F -d {tree} {partial} {size}")
        .run()
        .context("mkfs.ext4 (apt-get install e2fsprogs)")?;
    fs::File::open(&partial)?.sync_all()?;
    // Older recipes' images go; the tree is not needed once the image holds it.
    for entry in fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("rootfs-") && name.ends_with(".ext4") {
            fs::remove_file(&path)?;
        }
    }
    fs::rename(&partial, image)?;
    fs::remove_dir_all(&tree)?;
    eprintln!("prepared {}", image.display());
    Ok(())
}

/// The host's Debian release (`VERSION_CODENAME` of /etc/os-release).
fn host_suite() -> anyhow::Result<String> {
    let text = fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|line| line.strip_prefix("VERSION_CODENAME="))
        .map(|name| name.trim_matches('"').to_owned())
        .filter(|name| !name.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME: is this Debian?")
}

/// The host's apt source files.
fn host_sources() -> anyhow::Result<Vec<PathBuf>> {
    let mut sources = Vec::new();
    let main = Path::new("/etc/apt/sources.list");
    if fs::read_to_string(main)
        .is_ok_and(|text| text.lines().any(|l| l.trim_start().starts_with("deb")))
    {
        sources.push(main.to_owned());
    }
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.ends_with(".list") || name.ends_with(".sources") {
                sources.push(path);
            }
        }
    }
    sources.sort();
    if sources.is_empty() {
        bail!("the host has no apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/)");
    }
    Ok(sources)
}

/// The host's transport settings (proxies, release-file validity for snapshot mirrors): the
/// `Acquire::` statements of /etc/apt/apt.conf.d. Hooks and other settings stay on the host.
fn host_acquire_options() -> anyhow::Result<String> {
    let mut options = String::from("// The host's Acquire:: settings, for mmdebstrap.\n");
    let mut files: Vec<PathBuf> = match fs::read_dir("/etc/apt/apt.conf.d") {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        options.push_str(&acquire_statements(&text));
    }
    Ok(options)
}

/// The one-line `Acquire::...;` statements of an apt.conf text.
fn acquire_statements(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| line.starts_with("Acquire::") && line.ends_with(';'))
        .map(|line| format!("{line}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_acquire_statements_are_taken_from_the_host() {
        let text = "// comment\nAcquire::Check-Valid-Until \"false\";\n\
                    DPkg::Post-Invoke { \"rm -f /x\"; };\n  Acquire::http::Proxy \"http://p:3128\";\n\
                    Acquire::Languages {\n";
        assert_eq!(
            acquire_statements(text),
            "Acquire::Check-Valid-Until \"false\";\nAcquire::http::Proxy \"http://p:3128\";\n"
        );
    }

    #[test]
    fn the_image_name_follows_the_recipe() {
        let name = image().file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name, format!("rootfs-{}.ext4", recipe_digest()));
        assert_eq!(recipe_digest().len(), 16);
        assert!(UNIT.contains("After=multi-user.target"));
        assert!(REPORT.contains("systemctl poweroff"));
    }
}
