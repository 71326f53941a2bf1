//! The guest agent in a real VM, reached over real virtio-vsock: QEMU's `vhost-user-vsock-pci`
//! served by rust-vmm's `vhost-device-vsock`, whose hybrid Unix socket is exactly Cloud
//! Hypervisor's (`CONNECT 2222\n` → `OK 2222\n`). Shared by the agent VM tests
//! (`xtask/tests/agent_vm.rs`) and the agent benchmark (`bench/benches/agent.rs`).
//!
//! The agent comes the way it does in production: the test initrd carries it (`agent: true`)
//! and guest-init starts it after the root switch, beside an application that only waits
//! (busybox provides `sh` and the tools exec'd commands use).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::vm::{
    BOOT_TIMEOUT, Kernel, TEST_MODULES, VSOCK_MODULES, Vm, VmSpec, Vsock, busybox_rootfs,
    ext4_image,
};
use anyhow::Context;
use guest_client::{AGENT_PORT, Client};
use guest_protocol::Config;
use system::Arch;

/// What the agent logs (in guest-init's line format) once it accepts connections.
const LISTENING: &str = "agent: listening on vsock port 2222";

/// The guest's writable disk: room for the 50 MiB copies (sparse on the host).
const WRITABLE_MIB: u32 = 512;

/// A booted VM whose agent answers on vsock port 2222.
pub struct AgentVm {
    pub vm: Vm,
    /// The hybrid vsock socket hosts connect to.
    pub socket: PathBuf,
    _disks: tempfile::TempDir,
}

impl AgentVm {
    /// A new connection to the agent.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        Client::connect(&self.socket, AGENT_PORT)
            .await
            .with_context(|| self.context())
    }

    /// The console and the vsock daemon's log, for failure messages.
    pub fn context(&self) -> String {
        format!(
            "console:\n{}\nvhost-device-vsock:\n{}",
            self.vm.console(),
            self.vm.vsock_log()
        )
    }
}

/// The test initrd for `kernel`: guest-init, the agent, [`TEST_MODULES`] and
/// [`VSOCK_MODULES`]. Built once per process and arch.
fn vsock_initrd(arch: Arch, kernel: &Kernel) -> &'static Path {
    crate::vm::initrd_once(&format!("vsock-{arch}"), || {
        let modules: Vec<&str> = TEST_MODULES.iter().chain(VSOCK_MODULES).copied().collect();
        xtask::initrd::build_test_initrd(&xtask::initrd::TestInitrd {
            agent: true,
            ..xtask::initrd::TestInitrd::new(arch).with_modules(&kernel.modules, &modules)
        })
    })
}

/// `guest-agent` for `arch`'s musl target, built by the generator's own guest build (or taken
/// as is when its fingerprint still matches), so this is a no-op after an initrd build; checked
/// to be a static ELF for `arch`. The benchmark reports its size.
pub fn agent_binary(arch: Arch) -> anyhow::Result<Vec<u8>> {
    let sh = xshell::Shell::new()?;
    let built =
        xtask::initrd::guest_init::build(&sh, &xtask::workspace_root(), arch, &Default::default())?;
    Ok(built.agent.bytes)
}

/// Boots an x86_64 VM whose agent serves on vsock port 2222, and waits until it listens.
pub fn agent_vm() -> anyhow::Result<AgentVm> {
    agent_vm_for(Arch::X86_64)
}

/// [`agent_vm`] for guests of `arch` (aarch64: Debian's arm64 kernel and busybox as
/// `cargo xtask test` unpacks them, `-M virt` under TCG).
pub fn agent_vm_for(arch: Arch) -> anyhow::Result<AgentVm> {
    let arm64_root = xtask::test_suite::prepare::arm64_guest_dir();
    let kernel = Kernel::debian_cloud_for(arch, &arm64_root)?;
    let dir = tempfile::tempdir()?;
    let tree = dir.path().join("rootfs-tree");
    busybox_rootfs(arch, &tree, &arm64_root)?;
    let rootfs = dir.path().join("rootfs.img");
    ext4_image(&rootfs, Some(&tree), 64)?;
    let writable = dir.path().join("writable.img");
    ext4_image(&writable, None, WRITABLE_MIB)?;
    // The app only waits; APP_DEFAULT: an application default an exec's env sits over.
    let json = Config::exec(["/bin/sh", "-c", "while :; do sleep 3600; done"])
        .with_env("APP_DEFAULT", "from-config")
        .to_json()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = dir.path().join("config.img");
    xtask::vm::config_image(&config, &json)?;

    let mut spec = VmSpec::new(vec![rootfs, writable, config]);
    spec.arch = arch;
    spec.vsock = Some(Vsock {
        daemon: xtask::test_suite::prepare::vsock_daemon_path(),
        guest_cid: 3,
    });
    let vm = Vm::start_with(&kernel.image, vsock_initrd(arch, &kernel), &spec)?;
    vm.wait_for(LISTENING, BOOT_TIMEOUT)?;
    let socket = vm
        .vsock_socket()
        .context("the spec had a vsock device")?
        .to_owned();
    Ok(AgentVm {
        vm,
        socket,
        _disks: dir,
    })
}

/// One agent VM for the whole test process (TCG boots are slow): booted by the first caller,
/// killed when the process exits. A failed boot fails every caller with its cause.
pub fn shared_agent_vm() -> &'static AgentVm {
    static VM: OnceLock<Result<AgentVm, String>> = OnceLock::new();
    let vm = VM.get_or_init(|| {
        let mut vm = agent_vm().map_err(|e| format!("{e:#}"))?;
        vm.vm.stop_at_process_exit().map_err(|e| format!("{e:#}"))?;
        Ok(vm)
    });
    match vm {
        Ok(vm) => vm,
        Err(e) => panic!("booting the agent VM: {e}"),
    }
}

/// Polls `check` every 200 ms until it returns `Some`, failing after `timeout` (a hang guard,
/// never an assertion on speed).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
