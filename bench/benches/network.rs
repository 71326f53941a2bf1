//! Network figures: PID 1 start → entrypoint exec with networking on vs off (median of 10
//! boots each, alternating, from guest-init's timings line), and the network phase alone
//! (`network` − `config` of the same line). Both boot the same initrd (virtio_net loaded) and
//! the same VM with a virtio-net NIC on QEMU user networking; only `network_enabled` differs.

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use system::Arch;
use testkit::bench::{Figure, median};
use testkit::vm::{self, BOOT_TIMEOUT, Nic, Vm, VmSpec};
use xtask::initrd::TestInitrd;

const BOOTS: usize = 10;

/// One boot's figures in ms: (exec, network phase, exec after module loading).
fn boot_once(kernel: &Path, initrd: &Path, spec: &VmSpec) -> anyhow::Result<(u64, u64, u64)> {
    let boot = Vm::start_with(kernel, initrd, spec)?.finish(BOOT_TIMEOUT)?;
    if boot.exit != Some(guest_protocol::ExitLine::app(0)) {
        bail!("the boot ended with {:?}:\n{}", boot.exit, boot.console);
    }
    let field = |phase: &str| {
        boot.timing_ms(phase)
            .with_context(|| format!("no {phase}= in the timings line:\n{}", boot.console))
    };
    let (exec, config, network) = (field("exec")?, field("config")?, field("network")?);
    let modules = field("modules")?;
    Ok((
        exec,
        network.saturating_sub(config),
        exec.saturating_sub(modules),
    ))
}

fn disks(dir: &Path, name: &str, config: &str) -> anyhow::Result<VmSpec> {
    let config_image = dir.join(format!("{name}-config.img"));
    xtask::vm::config_image(&config_image, config)?;
    let mut spec = VmSpec::new(vec![dir.join("rootfs.img"), config_image]);
    spec.append = "guest_init.config=/dev/vdb guest_init.writable=tmpfs".into();
    spec.nic = Some(Nic {
        user: "net=192.0.2.0/24,host=192.0.2.2,dns=192.0.2.3,restrict=on".into(),
        mac: None,
    });
    Ok(spec)
}

fn main() -> anyhow::Result<()> {
    let kernel = vm::Kernel::debian_cloud()?;
    let modules: Vec<&str> = vm::TEST_MODULES
        .iter()
        .chain(vm::NET_MODULES)
        .copied()
        .collect();
    let initrd_bytes = xtask::initrd::build_test_initrd(
        &TestInitrd::new(Arch::X86_64).with_modules(&kernel.modules, &modules),
    )?;
    let dir = tempfile::tempdir()?;
    let initrd = dir.path().join("initrd.gz");
    fs::write(&initrd, initrd_bytes)?;
    let tree = dir.path().join("rootfs");
    vm::busybox_rootfs(Arch::X86_64, &tree, Path::new("/"))?;
    vm::ext4_image(&dir.path().join("rootfs.img"), Some(&tree), 64)?;

    let off = disks(dir.path(), "off", r#"{"entrypoint":["/bin/true"]}"#)?;
    let on = disks(
        dir.path(),
        "on",
        r#"{"entrypoint":["/bin/true"],"network_enabled":true,"guest_ip":"192.0.2.15",
            "guest_cidr":24,"guest_gw":"192.0.2.2","guest_dns":"192.0.2.3"}"#,
    )?;
    let (mut with_network, mut without) = (Vec::new(), Vec::new());
    for _ in 0..BOOTS {
        // Alternating, so a slow spell of the shared machine hits both sides alike.
        with_network.push(boot_once(&kernel.image, &initrd, &on)?);
        without.push(boot_once(&kernel.image, &initrd, &off)?);
    }
    let exec_on = median(with_network.iter().map(|b| b.0).collect());
    let exec_off = median(without.iter().map(|b| b.0).collect());
    let phase_on = median(with_network.iter().map(|b| b.1).collect());
    let phase_off = median(without.iter().map(|b| b.1).collect());
    // Module loading under TCG is most of a boot and the noisiest part on a shared machine.
    let after_on = median(with_network.iter().map(|b| b.2).collect());
    let after_off = median(without.iter().map(|b| b.2).collect());
    let ms = Duration::from_millis;
    Figure::time(
        "PID 1 -> exec after modules, networking on",
        ms(after_on),
        "off",
        ms(after_off),
    )
    .print();
    Figure::plain("network phase alone", format!("{phase_on} ms")).print();
    println!(
        "PID 1 start → entrypoint exec, median of {BOOTS} boots each ({}): networking on {exec_on} ms, \
         off {exec_off} ms (on/off {:.2}); after module loading: on {after_on} ms, off \
         {after_off} ms (on/off {:.2}); network phase alone: on {phase_on} ms, off {phase_off} ms",
        vm::accelerator(),
        exec_on as f64 / exec_off.max(1) as f64,
        after_on as f64 / after_off.max(1) as f64,
    );
    Ok(())
}
