//! The baseline of `cargo xtask bench pid1`: the least any PID 1 does before it can start an
//! entrypoint (mount /proc, /sys and /dev, then say so on the console), timed the way
//! guest-init times itself (from the top of `main`). Compiled by the bench with plain `rustc`
//! for musl (std only: no crate to fetch), booted from an initrd holding nothing else.

use std::io::Write;
use std::time::Instant;

unsafe extern "C" {
    fn mount(
        source: *const u8,
        target: *const u8,
        fstype: *const u8,
        flags: u64,
        data: *const u8,
    ) -> i32;
    fn reboot(command: i32) -> i32;
    fn sync();
}

/// `LINUX_REBOOT_CMD_POWER_OFF`.
const POWER_OFF: i32 = 0x4321_fedc_u32 as i32;

fn main() {
    let start = Instant::now();
    let mut failed = Vec::new();
    for (source, target, fstype) in [
        ("proc\0", "/proc\0", "proc\0"),
        ("sysfs\0", "/sys\0", "sysfs\0"),
        ("devtmpfs\0", "/dev\0", "devtmpfs\0"),
    ] {
        let _ = std::fs::create_dir_all(target.trim_end_matches('\0'));
        // SAFETY: NUL-terminated strings that outlive the call; no data.
        let rc = unsafe {
            mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            failed.push(target.trim_end_matches('\0'));
        }
    }
    let line = if failed.is_empty() {
        format!(
            "[pid1-probe] timings: start=0ms exec={}ms\n",
            start.elapsed().as_millis()
        )
    } else {
        format!("[pid1-probe] mount failed: {failed:?}\n")
    };
    if let Ok(mut console) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = console.write_all(line.as_bytes());
    }
    // SAFETY: plain syscalls; PID 1 must not return, so power off (a failure loops below).
    unsafe {
        sync();
        reboot(POWER_OFF);
    }
    loop {
        std::thread::park();
    }
}
