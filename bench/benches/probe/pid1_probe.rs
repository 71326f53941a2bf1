//! The baseline of `cargo xtask bench pid1`: the kernel work guest-init's boot asks for, with
//! as little userspace as possible around it. The same early mounts, the same modules from
//! the same load order, the same config disk mount and read (left mounted, as guest-init
//! leaves it), the same overlay root and root switch, loopback up, and a `posix_spawn` of the
//! same entrypoint, in that order, timed the way guest-init times itself (from the top of `main`, marks named like its phases). What
//! guest-init takes beyond this probe is its own cost; what the probe takes is the floor any
//! PID 1 doing this work pays under the same kernel and accelerator.
//!
//! No validation, no messages, no fallbacks: a failing step prints one line and powers off.
//! Compiled by the bench with plain `rustc` for x86_64 musl (std only, raw syscall numbers of
//! x86_64), booted with the same disks and kernel command line as guest-init.

use std::ffi::CString;
use std::io::Write;
use std::time::{Duration, Instant};

unsafe extern "C" {
    fn mount(source: *const i8, target: *const i8, fstype: *const i8, flags: u64, data: *const i8)
    -> i32;
    fn chroot(path: *const i8) -> i32;
    fn syscall(number: i64, ...) -> i64;
    fn socket(domain: i32, kind: i32, protocol: i32) -> i32;
    fn ioctl(fd: i32, request: u64, ...) -> i32;
    fn reboot(command: i32) -> i32;
    fn sync();
}

const SYS_FINIT_MODULE: i64 = 313;
const MS_NOSUID: u64 = 2;
const MS_NODEV: u64 = 4;
const MS_NOEXEC: u64 = 8;
const MS_RDONLY: u64 = 1;
const MS_MOVE: u64 = 8192;
const SIOCGIFFLAGS: u64 = 0x8913;
const SIOCSIFFLAGS: u64 = 0x8914;
/// `LINUX_REBOOT_CMD_POWER_OFF`.
const POWER_OFF: i32 = 0x4321_fedc_u32 as i32;

fn c(text: &str) -> CString {
    CString::new(text).expect("no NUL in the probe's strings")
}

fn console(line: &str) {
    if let Ok(mut console) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = console.write_all(format!("[pid1-probe] {line}\n").as_bytes());
    }
}

fn power_off() -> ! {
    // SAFETY: plain syscalls; PID 1 must not return, so power off (a failure parks below).
    unsafe {
        sync();
        reboot(POWER_OFF);
    }
    loop {
        std::thread::park();
    }
}

fn check(what: &str, rc: i64) {
    if rc < 0 {
        console(&format!("{what} failed: {}", std::io::Error::last_os_error()));
        power_off();
    }
}

fn do_mount(source: &str, target: &str, fstype: &str, flags: u64, data: &str) {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe { mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr()) };
    check(&format!("mount {target}"), rc.into());
}

fn mount_move(from: &str, to: &str) {
    let _ = std::fs::create_dir_all(to);
    let (f, t) = (c(from), c(to));
    // SAFETY: NUL-terminated strings; MS_MOVE ignores fstype and data.
    let rc = unsafe { mount(f.as_ptr(), t.as_ptr(), std::ptr::null(), MS_MOVE, std::ptr::null()) };
    check(&format!("move {from}"), rc.into());
}

fn wait_for(path: &str) {
    while std::fs::metadata(path).is_err() {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn loopback_up() {
    // SAFETY: plain syscalls on a buffer laid out as `struct ifreq` (name, then flags).
    unsafe {
        let fd = socket(2, 2 | 0o2000000, 0);
        check("socket", fd.into());
        let mut ifreq = [0u8; 40];
        ifreq[..2].copy_from_slice(b"lo");
        check("SIOCGIFFLAGS", ioctl(fd, SIOCGIFFLAGS, ifreq.as_mut_ptr()).into());
        ifreq[16] |= 1; // IFF_UP
        check("SIOCSIFFLAGS", ioctl(fd, SIOCSIFFLAGS, ifreq.as_mut_ptr()).into());
    }
}

fn main() {
    let start = Instant::now();
    let mut marks = Vec::new();
    let mut mark = |name: &str| marks.push(format!("{name}={}ms", start.elapsed().as_millis()));

    let hardened = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    do_mount("proc", "/proc", "proc", hardened, "");
    do_mount("sysfs", "/sys", "sysfs", hardened, "");
    do_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    do_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620");
    do_mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    do_mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    do_mount("cgroup2", "/sys/fs/cgroup", "cgroup2", hardened, "nsdelegate");
    let _ = std::fs::write("/proc/sys/kernel/printk_devkmsg", "on\n");
    mark("mounts");

    let order = std::fs::read_to_string("/lib/modules/load-order").unwrap_or_default();
    for module in order.lines().filter(|l| l.ends_with(".ko")) {
        if let Ok(file) = std::fs::File::open(format!("/{}", module.trim_start_matches('/'))) {
            use std::os::fd::AsRawFd;
            let params = c("");
            // SAFETY: an open descriptor and an empty parameter string.
            unsafe { syscall(SYS_FINIT_MODULE, file.as_raw_fd(), params.as_ptr(), 0) };
        }
    }
    mark("modules");

    wait_for("/dev/vda");
    wait_for("/dev/vdb");
    mark("devices");

    do_mount("/dev/vdb", "/cfg", "ext4", MS_RDONLY, "noload");
    let config = std::fs::read("/cfg/config.json");
    check("read /cfg/config.json", config.map_or(-1, |_| 0));
    mark("config");

    do_mount("/dev/vda", "/lower", "ext4", MS_RDONLY, "noload");
    do_mount("tmpfs", "/rw", "tmpfs", 0, "mode=0755");
    for dir in ["/rw/upper", "/rw/work", "/newroot"] {
        let _ = std::fs::create_dir_all(dir);
    }
    do_mount(
        "overlay",
        "/newroot",
        "overlay",
        0,
        "lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work",
    );
    for moved in ["/dev", "/proc", "/sys", "/run"] {
        mount_move(moved, &format!("/newroot{moved}"));
    }
    check("chdir", std::env::set_current_dir("/newroot").map_or(-1, |_| 0));
    mount_move(".", "/");
    let dot = c(".");
    // SAFETY: NUL-terminated path.
    check("chroot", unsafe { chroot(dot.as_ptr()) }.into());
    check("chdir /", std::env::set_current_dir("/").map_or(-1, |_| 0));
    loopback_up();
    mark("root");

    let child = std::process::Command::new("/bin/true").spawn();
    mark("exec");
    console(&format!("timings: start=0ms {}", marks.join(" ")));
    if let Ok(mut child) = child {
        let _ = child.wait();
    }
    power_off();
}
