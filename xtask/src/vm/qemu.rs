//! QEMU for microVM guests: the accelerator that works here, the machine and console per arch,
//! and the command line that boots a kernel + initrd with virtio disks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use system::Arch;

/// The accelerator for guests of `arch`: KVM only when the guest runs the host's architecture
/// and `/dev/kvm` can really run guests; TCG otherwise. A paravirtual KVM (`kvm_pvm`) opens
/// fine but hangs or fails real guests, so it counts as unusable.
pub fn accelerator(arch: Arch) -> &'static str {
    let usable_kvm = arch == Arch::host()
        && !Path::new("/sys/module/kvm_pvm").exists()
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
    if usable_kvm { "kvm" } else { "tcg" }
}

/// The QEMU binary, its Debian package, the machine and the kernel console for `arch`.
pub fn machine(arch: Arch) -> (&'static str, &'static str, &'static str, &'static str) {
    match arch {
        Arch::X86_64 => ("qemu-system-x86_64", "qemu-system-x86", "pc", "ttyS0"),
        Arch::Aarch64 => ("qemu-system-aarch64", "qemu-system-arm", "virt", "ttyAMA0"),
    }
}

/// One boot: kernel, initrd, disks in virtio order (vda, vdb, ...).
#[derive(Debug, Clone)]
pub struct Boot {
    pub arch: Arch,
    pub accel: String,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disks: Vec<PathBuf>,
    /// Appended to `console=<tty> panic=-1 loglevel=4`.
    pub append: String,
    /// A vhost-user vsock device served on this socket (by `vhost-device-vsock`); the guest's
    /// RAM is then a shared memfd the daemon maps.
    pub vhost_user_vsock: Option<PathBuf>,
}

impl Boot {
    /// The QEMU command: no display, no network, serial console on stdout, no reboot (a guest
    /// power-off or reset ends QEMU).
    pub fn command(&self) -> Command {
        let (qemu, _, machine, console) = machine(self.arch);
        let mut cmd = Command::new(qemu);
        cmd.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-M");
        match &self.vhost_user_vsock {
            None => cmd.arg(machine),
            Some(_) => cmd.arg(format!("{machine},memory-backend=mem")),
        };
        cmd.args(["-accel", &self.accel])
            .args(["-m", &self.memory_mib.to_string()]);
        if self.arch == Arch::Aarch64 {
            cmd.args([
                "-cpu",
                if self.accel == "kvm" {
                    "host"
                } else {
                    "cortex-a57"
                },
            ]);
        }
        cmd.args(["-serial", "stdio", "-net", "none"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(format!("console={console} panic=-1 loglevel=4 {}", self.append).trim_end());
        for disk in &self.disks {
            cmd.arg("-drive")
                .arg(format!("file={},if=virtio,format=raw", disk.display()));
        }
        if let Some(socket) = &self.vhost_user_vsock {
            cmd.arg("-object")
                .arg(format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.memory_mib
                ))
                .arg("-chardev")
                .arg(format!("socket,id=vsock0,path={}", socket.display()))
                .args(["-device", "vhost-user-vsock-pci,chardev=vsock0"]);
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_boots_kernel_initrd_and_disks_in_order() {
        let boot = Boot {
            arch: Arch::Aarch64,
            accel: "tcg".into(),
            memory_mib: 256,
            kernel: "/k".into(),
            initrd: "/i".into(),
            disks: vec!["/a.img".into(), "/b.img".into()],
            append: String::new(),
            vhost_user_vsock: None,
        };
        let cmd = boot.command();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let text = args.join(" ");
        assert_eq!(cmd.get_program(), "qemu-system-aarch64");
        assert!(
            text.contains("-M virt -accel tcg -m 256 -cpu cortex-a57"),
            "{text}"
        );
        assert!(text.contains("-kernel /k -initrd /i -append console=ttyAMA0 panic=-1 loglevel=4 -drive file=/a.img,if=virtio,format=raw -drive file=/b.img"), "{text}");
        // A guest of another architecture is always emulated.
        let foreign = if Arch::host() == Arch::X86_64 {
            Arch::Aarch64
        } else {
            Arch::X86_64
        };
        assert_eq!(accelerator(foreign), "tcg");
    }

    #[test]
    fn a_vsock_device_shares_the_guest_memory_with_its_daemon() {
        let boot = Boot {
            arch: Arch::X86_64,
            accel: "tcg".into(),
            memory_mib: 512,
            kernel: "/k".into(),
            initrd: "/i".into(),
            disks: vec![],
            append: String::new(),
            vhost_user_vsock: Some("/run/vhu.sock".into()),
        };
        let args: Vec<String> = boot
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let text = args.join(" ");
        assert!(
            text.contains("-M pc,memory-backend=mem -accel tcg -m 512"),
            "{text}"
        );
        assert!(
            text.contains(
                "-object memory-backend-memfd,id=mem,size=512M,share=on \
                 -chardev socket,id=vsock0,path=/run/vhu.sock \
                 -device vhost-user-vsock-pci,chardev=vsock0"
            ),
            "{text}"
        );
    }
}
