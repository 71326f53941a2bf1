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

/// A virtio-net NIC on QEMU user networking (slirp; with `restrict=on` the guest reaches only
/// what `hostfwd`/`guestfwd` open).
#[derive(Debug, Clone)]
pub struct Nic {
    /// The options of `-netdev user,id=n0,<options>`, e.g.
    /// `net=192.0.2.0/24,host=192.0.2.2,restrict=on,hostfwd=tcp:127.0.0.1:PORT-192.0.2.15:80`.
    pub user: String,
    /// The NIC's MAC address; QEMU's default (52:54:00:12:34:56) when `None`.
    pub mac: Option<String>,
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
    /// Appended to `console=<tty> panic=-1 loglevel=4` (and `no_timer_check` under TCG on
    /// x86_64).
    pub append: String,
    /// A vhost-user vsock device served on this socket (by `vhost-device-vsock`); the guest's
    /// RAM is then a shared memfd the daemon maps.
    pub vhost_user_vsock: Option<PathBuf>,
    /// A NIC; `None`: no network device at all.
    pub nic: Option<Nic>,
    /// A QEMU monitor listening on this Unix socket (`system_powerdown` presses the ACPI power
    /// button).
    pub monitor: Option<PathBuf>,
    /// Appended as they are (e.g. `-device virtio-rng-pci`).
    pub extra_args: Vec<String>,
}

impl Boot {
    /// The console, no reboot on panic, quiet, then [`Boot::append`]. Under TCG on x86_64 also
    /// `no_timer_check`: on a busy host the emulated timer can miss the ticks the kernel's
    /// IO-APIC check counts, and it panics ("IO-APIC + timer doesn't work!") before PID 1.
    fn kernel_command_line(&self, console: &str) -> String {
        let timer = match (self.arch, self.accel.as_str()) {
            (Arch::X86_64, "tcg") => " no_timer_check",
            _ => "",
        };
        format!(
            "console={console} panic=-1 loglevel=4{timer} {}",
            self.append
        )
        .trim_end()
        .to_owned()
    }

    /// The QEMU command: no display, no network unless a [`Nic`], serial console on stdout, no
    /// reboot (a guest power-off or reset ends QEMU).
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
            // PSCI powers the guest off; `-no-reboot` turns a reset into an exit too.
            cmd.args([
                "-cpu",
                if self.accel == "kvm" {
                    "host"
                } else {
                    "cortex-a57"
                },
            ]);
        }
        cmd.args(["-serial", "stdio"]);
        match &self.nic {
            None => {
                cmd.args(["-net", "none"]);
            }
            Some(nic) => {
                // No option ROM: the kernel is booted directly, PXE is never used.
                let mut device = "virtio-net-pci,netdev=n0,romfile=".to_owned();
                if let Some(mac) = &nic.mac {
                    device.push_str(&format!(",mac={mac}"));
                }
                cmd.arg("-netdev")
                    .arg(format!("user,id=n0,{}", nic.user))
                    .args(["-device", &device]);
            }
        }
        if let Some(monitor) = &self.monitor {
            cmd.arg("-monitor")
                .arg(format!("unix:{},server=on,wait=off", monitor.display()));
        }
        cmd.arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(self.kernel_command_line(console));
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
        cmd.args(&self.extra_args);
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 512 MiB TCG boot of /k and /i with no devices.
    fn plain(arch: Arch) -> Boot {
        Boot {
            arch,
            accel: "tcg".into(),
            memory_mib: 512,
            kernel: "/k".into(),
            initrd: "/i".into(),
            disks: vec![],
            append: String::new(),
            vhost_user_vsock: None,
            nic: None,
            monitor: None,
            extra_args: Vec::new(),
        }
    }

    /// The command's arguments, space-joined.
    fn text(boot: &Boot) -> String {
        let args: Vec<String> = boot
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        args.join(" ")
    }

    #[test]
    fn the_command_boots_kernel_initrd_and_disks_in_order() {
        let boot = Boot {
            memory_mib: 256,
            disks: vec!["/a.img".into(), "/b.img".into()],
            ..plain(Arch::Aarch64)
        };
        let text = text(&boot);
        assert_eq!(boot.command().get_program(), "qemu-system-aarch64");
        assert!(
            text.contains("-M virt -accel tcg -m 256 -cpu cortex-a57"),
            "{text}"
        );
        assert!(text.contains("-net none"), "{text}");
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
    fn a_nic_a_monitor_and_extra_arguments_are_options() {
        let boot = Boot {
            append: "quiet".into(),
            nic: Some(Nic {
                user: "net=192.0.2.0/24,restrict=on".into(),
                mac: Some("52:54:00:00:00:01".into()),
            }),
            monitor: Some("/run/mon.sock".into()),
            extra_args: vec!["-device".into(), "virtio-rng-pci".into()],
            ..plain(Arch::X86_64)
        };
        let text = text(&boot);
        assert!(!text.contains("-net none"), "{text}");
        assert!(
            text.contains(
                "-netdev user,id=n0,net=192.0.2.0/24,restrict=on \
                 -device virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:00:00:01 \
                 -monitor unix:/run/mon.sock,server=on,wait=off"
            ),
            "{text}"
        );
        assert!(
            text.contains("-append console=ttyS0 panic=-1 loglevel=4 no_timer_check quiet"),
            "{text}"
        );
        assert!(text.ends_with("-device virtio-rng-pci"), "{text}");
    }

    #[test]
    fn only_an_emulated_x86_64_skips_the_timer_check() {
        let kvm = Boot {
            accel: "kvm".into(),
            ..plain(Arch::X86_64)
        };
        let kvm = text(&kvm);
        assert!(
            kvm.ends_with("-append console=ttyS0 panic=-1 loglevel=4"),
            "{kvm}"
        );
        let tcg = text(&plain(Arch::X86_64));
        assert!(tcg.ends_with("loglevel=4 no_timer_check"), "{tcg}");
        let arm = text(&plain(Arch::Aarch64));
        assert!(!arm.contains("no_timer_check"), "{arm}");
    }

    #[test]
    fn a_vsock_device_shares_the_guest_memory_with_its_daemon() {
        let boot = Boot {
            vhost_user_vsock: Some("/run/vhu.sock".into()),
            ..plain(Arch::X86_64)
        };
        let text = text(&boot);
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
