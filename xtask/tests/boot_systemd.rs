//! Systemd mode proven by booting it: guest-init configures the network, switches root and
//! hands PID 1 to the image's init, which then owns the VM until it powers off. Two inits:
//! Debian's systemd (a rootfs `cargo xtask test` builds with mmdebstrap and caches) and
//! busybox `init`. No exit line is expected in this mode: the init powers off by itself.

mod guest_vm;

use std::fs;
use std::process::Command;
use std::time::Duration;

use guest_vm::{DNS, GATEWAY, GUEST_IP, Guest, nic, start};
use serde_json::json;
use testkit::vm::Boot;
use xtask::test_suite::{prepare::PREPARE_COMMAND, systemd_rootfs};

/// systemd under TCG on a shared machine: udev, journald and the units take a while.
const SYSTEMD_TIMEOUT: Duration = Duration::from_secs(420);

fn network_config() -> serde_json::Map<String, serde_json::Value> {
    let value = json!({
        "network_enabled": true,
        "guest_ip": GUEST_IP.to_string(),
        "guest_cidr": 24,
        "guest_gw": GATEWAY.to_string(),
        "guest_dns": DNS.to_string(),
    });
    value.as_object().unwrap().clone()
}

/// The init powered the VM off itself: the kernel's last words, no panic, and no exit line
/// (guest-init was gone long before).
fn expect_clean_power_off(boot: &Boot) {
    assert!(
        boot.console.contains("reboot: Power down"),
        "the VM did not power off through the kernel:\n{}",
        boot.console
    );
    assert!(
        !boot.console.contains("Kernel panic"),
        "kernel panicked:\n{}",
        boot.console
    );
    assert_eq!(
        boot.exit, None,
        "an exit line in systemd mode:\n{}",
        boot.console
    );
}

#[test]
fn debian_systemd_reaches_multi_user_and_powers_off_with_the_network_up() {
    let cached = systemd_rootfs::image();
    assert!(
        cached.is_file(),
        "no {}: the systemd VM test boots a Debian rootfs built by mmdebstrap; prepare it with \
         `{PREPARE_COMMAND}`",
        cached.display()
    );
    // A copy per boot: QEMU locks its disk images, and the cache stays pristine.
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs.img");
    let copied = Command::new("cp")
        .arg("--sparse=always")
        .arg(&cached)
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(copied.success(), "copying {}", cached.display());

    let mut config = network_config();
    // `init_mode` is left out: the command alone selects systemd mode.
    config.insert("cmd".into(), json!(["/sbin/init"]));
    config.insert("hostname".into(), json!("systemd-guest"));
    let guest = Guest::with_rootfs_image(dir, rootfs, json!(config));
    let mut spec = guest.spec(Some(nic(&[])));
    spec.memory_mib = 1024;
    let boot = start(&spec).finish(SYSTEMD_TIMEOUT).unwrap();
    expect_clean_power_off(&boot);
    boot.expect_log("systemd: handing PID 1 to /sbin/init")
        .expect_log("VM-TEST multi-user.target active")
        .expect_log("VM-TEST pid1 /usr/lib/systemd/systemd")
        .expect_log("VM-TEST hostname systemd-guest")
        .expect_log("VM-TEST etc-hostname systemd-guest")
        .expect_log(&format!("VM-TEST nameserver {DNS}"))
        .expect_log(&format!("VM-TEST inet {GUEST_IP}/24"))
        .expect_log(&format!("VM-TEST default via {GATEWAY} dev eth0"))
        .expect_log("VM-TEST poweroff");
}

#[test]
fn busybox_init_as_sbin_init_in_systemd_mode() {
    let mut config = network_config();
    // No command: systemd mode runs /sbin/init.
    config.insert("init_mode".into(), json!("systemd"));
    let guest = Guest::busybox(json!(config), |tree| {
        std::os::unix::fs::symlink("../bin/busybox", tree.join("sbin/init")).unwrap();
        fs::write(
            tree.join("etc/inittab"),
            "::sysinit:/bin/sh -c 'echo INIT-PID=$$ INIT-COMM=$(cat /proc/1/comm); \
             ip -4 addr show dev eth0 | sed \"s/^ */INIT-ADDR /\"; \
             ip route | sed \"s/^/INIT-ROUTE /\"'\n\
             ::sysinit:/bin/poweroff\n",
        )
        .unwrap();
    });
    let boot = start(&guest.spec(Some(nic(&[]))))
        .finish(testkit::vm::BOOT_TIMEOUT)
        .unwrap();
    expect_clean_power_off(&boot);
    boot.expect_log("systemd: handing PID 1 to /sbin/init")
        .expect_output("INIT-COMM=init")
        .expect_output(&format!("INIT-ADDR inet {GUEST_IP}/24"))
        .expect_output(&format!("INIT-ROUTE default via {GATEWAY} dev eth0"));
}
