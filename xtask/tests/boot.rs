//! guest-init proven by booting it: each test boots Debian's cloud kernel with the test initrd
//! under QEMU and asserts on the console (never on QEMU's exit status).

use std::fs;
use std::path::Path;

use guest_protocol::{Config, ExitReason};
use serde_json::{Value, json};
use system::Arch;
use system::hash::sha256_reader;
use testkit::vm::{BOOT_TIMEOUT, Boot, Guest, Kernel, TEST_MODULES, Vm, VmSpec};
use xtask::test_suite::prepare::arm64_guest_dir;

/// The test initrd for guests of `arch` (guest-init built from this workspace plus
/// [`TEST_MODULES`] of the kernel the guest boots), built once per test process and shared.
/// On arm64 the `button` module is built in (and skipped) and no input device sends `KEY_POWER`.
fn test_initrd(arch: Arch) -> &'static Path {
    testkit::vm::initrd_once(arch.as_str(), || {
        let kernel = Kernel::debian_cloud_for(arch, &arm64_guest_dir())?;
        xtask::initrd::build_test_initrd(
            &xtask::initrd::TestInitrd::new(arch).with_modules(&kernel.modules, TEST_MODULES),
        )
    })
}

/// An x86_64 guest whose config disk holds `config` (a JSON value, or raw text when a string).
fn guest(config: Value) -> Guest {
    Guest::busybox(config, |_| {})
}

trait Boots {
    /// Boots the guest's disks with the shared test initrd for its arch, to the end.
    fn boot(&self) -> Boot;
}

impl Boots for Guest {
    fn boot(&self) -> Boot {
        boot(&self.spec(None))
    }
}

/// Starts `spec` with Debian's cloud kernel for its arch and the shared test initrd.
fn start(spec: &VmSpec) -> Vm {
    let kernel = Kernel::debian_cloud_for(spec.arch, &arm64_guest_dir()).unwrap();
    Vm::start_with(&kernel.image, test_initrd(spec.arch), spec).unwrap()
}

fn boot(spec: &VmSpec) -> Boot {
    start(spec).finish(BOOT_TIMEOUT).unwrap()
}

fn sh(script: &str) -> Value {
    json!({ "entrypoint": ["/bin/sh", "-c"], "cmd": [script] })
}

fn sha256_file(path: &Path) -> String {
    sha256_reader(fs::File::open(path).unwrap())
        .unwrap()
        .0
        .hex()
}

#[test]
fn hello_app_exits_zero() {
    let boot = guest(json!({ "entrypoint": ["echo"], "cmd": ["hello from the app"] })).boot();
    boot.expect_exit(0)
        .expect_output("hello from the app")
        .expect_log("timings:");
}

#[test]
fn the_app_exit_code_is_reported() {
    guest(sh("exit 42")).boot().expect_exit(42);
}

#[test]
fn a_signal_death_is_128_plus_the_signal() {
    guest(sh("kill -KILL $$")).boot().expect_exit(128 + 9);
}

#[test]
fn env_workdir_and_user_are_honoured() {
    // Written the way a Rust host writes it: through guest-protocol's builder.
    let config = Config::exec(["/bin/sh", "-c"])
        .with_cmd(["echo ID=$(id); echo PWD=$(pwd); env | sort | sed 's/^/ENV /'"])
        .with_workdir("/work/dir")
        .with_env("GREETING", "hello world")
        .with_env("PATH", "/usr/bin:/bin")
        .with_user("app")
        .to_json()
        .unwrap();
    let boot = guest(Value::String(config)).boot();
    boot.expect_exit(0)
        .expect_output("ID=uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)")
        .expect_output("PWD=/work/dir")
        .expect_output("ENV GREETING=hello world")
        .expect_output("ENV PATH=/usr/bin:/bin")
        .expect_output("ENV HOME=/home/app");
}

#[test]
fn the_config_disk_is_out_of_the_app_s_sight_and_unmounted_at_power_off() {
    // guest-init leaves it mounted read-only under the initramfs, hidden by the root switch.
    let boot = guest(sh(
        "if grep -q guest-init/config /proc/self/mountinfo || [ -e /.guest-init ]; \
         then echo CONFIG-VISIBLE; else echo CONFIG-HIDDEN; fi",
    ))
    .boot();
    boot.expect_exit(0).expect_output("CONFIG-HIDDEN");
    assert!(
        !boot.console.contains("stays writable") && !boot.console.contains("not reachable"),
        "a mount was left behind at power off:\n{}",
        boot.console
    );
}

#[test]
fn writes_land_in_the_overlay_and_the_rootfs_is_unchanged() {
    let guest = guest(sh(
        "echo changed > /etc/motd && echo new > /etc/new-file && rm /etc/group && \
         cat /etc/motd /etc/new-file && if [ -e /etc/group ]; then echo STILL-THERE; \
         else echo GROUP-\"\"GONE; fi; sync",
    ));
    let before = sha256_file(&guest.rootfs);
    let boot = guest.boot();
    boot.expect_exit(0)
        .expect_output("changed")
        .expect_output("new")
        .expect_output("GROUP-GONE");
    assert_eq!(
        sha256_file(&guest.rootfs),
        before,
        "the rootfs disk was written to"
    );
    // The writes are in the writable disk's upper directory.
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /upper/etc/new-file"])
        .arg(&guest.writable)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "new",
        "{}",
        boot.console
    );
    let _ = &guest.dir;
}

#[test]
fn a_thousand_orphans_are_all_reaped() {
    let script = "i=0; while [ $i -lt 1000 ]; do sh -c 'sleep 0.2 &'; i=$((i+1)); done; \
        echo SPAWNED=$i; \
        n=0; while [ $n -lt 100 ]; do \
          z=0; for s in /proc/[0-9]*/stat; do read -r l < $s 2>/dev/null; \
            case \"$l\" in *') Z '*) z=$((z+1));; esac; done; \
          [ $z -eq 0 ] && break; sleep 0.2; n=$((n+1)); done; \
        echo ZOMBIES=$z";
    let boot = guest(sh(script)).boot();
    boot.expect_exit(0)
        .expect_output("SPAWNED=1000")
        .expect_output("ZOMBIES=0");
}

#[test]
fn the_power_button_sends_sigterm_to_the_app() {
    let guest = guest(sh(
        // Quoted apart so that guest-init's log of the command does not match.
        "trap 'echo APP-GOT-\"\"SIGTERM; exit 0' TERM; echo APP-\"\"READY; while :; do sleep 0.1; done",
    ));
    let vm = start(&guest.spec(None));
    vm.wait_for("APP-READY", BOOT_TIMEOUT).unwrap();
    vm.power_button().unwrap();
    let boot = vm.finish(BOOT_TIMEOUT).unwrap();
    boot.expect_exit(0).expect_output("APP-GOT-SIGTERM");
}

#[test]
fn invalid_json_is_a_clear_config_error() {
    let boot = guest(Value::String("{ \"entrypoint\": [\"echo\", }".into())).boot();
    boot.expect_failure(ExitReason::Config)
        .expect_log("config.json");
}

#[test]
fn a_missing_config_disk_is_a_clear_device_error() {
    let guest = guest(json!({}));
    let mut spec = VmSpec::new(vec![guest.rootfs.clone(), guest.writable.clone()]);
    spec.append = "guest_init.device_timeout_ms=1500".into();
    let boot = boot(&spec);
    boot.expect_failure(ExitReason::Device)
        .expect_log("/dev/vdc");
}

#[test]
fn a_missing_entrypoint_is_a_clear_error() {
    let boot = guest(json!({ "entrypoint": ["/no/such/app"] })).boot();
    boot.expect_failure(ExitReason::Entrypoint)
        .expect_log("/no/such/app");
}

#[test]
fn without_a_writable_disk_the_upper_layer_is_a_tmpfs() {
    let guest = guest(sh("echo scratch > /scratch && cat /scratch"));
    let mut spec = guest.spec(None);
    spec.append = "guest_init.writable=tmpfs".into();
    boot(&spec).expect_exit(0).expect_output("scratch");
}

/// The same guest-init, cross-built for aarch64, booting Debian's arm64 cloud kernel under
/// `qemu-system-aarch64 -M virt -cpu cortex-a57` (TCG) with virtio-pci disks and an arm64
/// busybox rootfs. `cargo xtask test` fetches the kernel and busybox beforehand.
mod aarch64 {
    use super::*;

    fn guest(config: Value) -> Guest {
        Guest::busybox_for(Arch::Aarch64, &arm64_guest_dir(), config, |_| {})
    }

    #[test]
    fn hello_app_exits_zero() {
        let boot = guest(json!({ "entrypoint": ["echo"], "cmd": ["hello from aarch64"] })).boot();
        boot.expect_exit(0)
            .expect_output("hello from aarch64")
            .expect_log("timings:");
    }

    #[test]
    fn the_app_exit_code_is_reported() {
        guest(sh("echo MACHINE=$(uname -m); exit 42"))
            .boot()
            .expect_exit(42)
            .expect_output("MACHINE=aarch64");
    }

    #[test]
    fn a_missing_entrypoint_is_a_clear_error() {
        let boot = guest(json!({ "entrypoint": ["/no/such/app"] })).boot();
        boot.expect_failure(ExitReason::Entrypoint)
            .expect_log("/no/such/app");
    }
}
