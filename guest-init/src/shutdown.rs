//! Graceful shutdown triggers and the final power off.
//!
//! Without acpid nothing in the kernel signals init for the ACPI power button: the event only
//! reaches userspace as `KEY_POWER` on an input device ("Power Button" from the `button`
//! driver on x86, `gpio-keys` on arm64 virt). A watcher thread per such device turns the key
//! press into [`reaper::SHUTDOWN_SIGNAL`] for PID 1's signal loop.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::mount;
use crate::reaper;
use crate::syscalls::{Kernel, Machine, MountFlags, Power, Syscalls};

/// Where the kernel lists input devices, with their names, key capabilities and event
/// handlers: one read, where walking `/sys/class/input` took ~4 sysfs reads per device (16–23
/// ms under TCG).
pub const INPUT_DEVICES: &str = "/proc/bus/input/devices";

/// How long the kill of everything may take to reap before power off.
pub const REAP_AT_SHUTDOWN: Duration = Duration::from_secs(2);

/// How long an input device's node may take to appear in /dev after its sysfs entry (devtmpfs
/// creates nodes asynchronously).
pub const INPUT_NODE_WAIT: Duration = Duration::from_secs(1);

/// Mounts the root switch hides under the new root (the overlay layers), in mount order.
static HIDDEN_MOUNTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remember mounts the power off cannot find in /proc/self/mounts once the root switched.
pub fn remember_hidden_mounts(mounts: &[PathBuf]) {
    let mut hidden = HIDDEN_MOUNTS.lock().unwrap_or_else(|p| p.into_inner());
    hidden.extend_from_slice(mounts);
}

pub const EV_KEY: u16 = 1;
pub const KEY_POWER: u16 = 116;

/// `struct input_event`: a `timeval` (two longs) then type u16, code u16, value i32.
pub const INPUT_EVENT_SIZE: usize = 2 * std::mem::size_of::<libc::c_long>() + 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputEvent {
    pub kind: u16,
    pub code: u16,
    pub value: i32,
}

pub fn parse_event(bytes: &[u8]) -> Option<InputEvent> {
    if bytes.len() < INPUT_EVENT_SIZE {
        return None;
    }
    let at = INPUT_EVENT_SIZE - 8;
    Some(InputEvent {
        kind: u16::from_ne_bytes([bytes[at], bytes[at + 1]]),
        code: u16::from_ne_bytes([bytes[at + 2], bytes[at + 3]]),
        value: i32::from_ne_bytes(bytes[at + 4..at + 8].try_into().ok()?),
    })
}

pub fn is_power_press(event: InputEvent) -> bool {
    event.kind == EV_KEY && event.code == KEY_POWER && event.value == 1
}

/// `capabilities/key` in sysfs: hex words of `unsigned long`, most significant first.
pub fn has_key(capabilities: &str, key: u16) -> bool {
    let bits = 8 * std::mem::size_of::<libc::c_ulong>();
    let words: Vec<&str> = capabilities.split_whitespace().collect();
    let index = key as usize / bits;
    if index >= words.len() {
        return false;
    }
    let word = words[words.len() - 1 - index];
    u64::from_str_radix(word, 16)
        .map(|w| w & (1 << (key as usize % bits)) != 0)
        .unwrap_or(false)
}

/// Event device nodes of input devices that can send KEY_POWER, from the text of
/// [`INPUT_DEVICES`]: one block per device, `N: Name="…"`, `H: Handlers=… eventN`,
/// `B: KEY=<bitmap>` (the same bitmap as sysfs' `capabilities/key`).
pub fn power_key_devices(listing: &str) -> Vec<PathBuf> {
    let mut devices = Vec::new();
    for block in listing.split("\n\n") {
        let (mut name, mut keys, mut handlers) = ("", "", "");
        for line in block.lines() {
            if let Some(value) = line.strip_prefix("N: Name=") {
                name = value.trim().trim_matches('"');
            } else if let Some(value) = line.strip_prefix("B: KEY=") {
                keys = value;
            } else if let Some(value) = line.strip_prefix("H: Handlers=") {
                handlers = value;
            }
        }
        if name != "Power Button" && !has_key(keys, KEY_POWER) {
            continue;
        }
        devices.extend(
            handlers
                .split_whitespace()
                .filter(|handler| handler.starts_with("event"))
                .map(|event| Path::new("/dev/input").join(event)),
        );
    }
    devices
}

/// The watched devices and their threads.
pub struct Watchers {
    pub devices: Vec<PathBuf>,
    // Only tests join; in PID 1 the handles are dropped, which detaches the threads.
    #[cfg_attr(not(test), expect(dead_code))]
    threads: Vec<JoinHandle<()>>,
}

impl Watchers {
    /// Wait until every watcher's device went away (tests: the fake's events end).
    #[cfg(test)]
    pub fn join(self) {
        for thread in self.threads {
            thread.join().expect("watcher thread panicked");
        }
    }
}

/// Open every power key device `input_devices` lists, then start one watcher thread
/// per device. The devices are open when this returns: a press from then on is not lost, so
/// the caller announces its phase only afterwards.
pub fn watch_power_button(sys: &'static (dyn Kernel + Sync), input_devices: &Path) -> Watchers {
    let mut devices = Vec::new();
    let mut threads = Vec::new();
    // No listing (no input subsystem): nothing to watch, as with no device.
    let listing = std::fs::read_to_string(input_devices).unwrap_or_default();
    for device in power_key_devices(&listing) {
        let events = match open_when_present(sys, &device) {
            Ok(events) => events,
            Err(err) => {
                crate::info!(
                    "shutdown",
                    "cannot open {}: {err}; power button ignored",
                    device.display()
                );
                continue;
            }
        };
        let watched = device.clone();
        let spawned = std::thread::Builder::new()
            .name("power-button".into())
            .spawn(move || watch(sys, &watched, events));
        threads.extend(spawned.ok());
        devices.push(device);
    }
    Watchers { devices, threads }
}

/// Open `device`, waiting up to [`INPUT_NODE_WAIT`] for devtmpfs to create its node.
fn open_when_present(sys: &dyn Kernel, device: &Path) -> io::Result<Box<dyn Read + Send>> {
    // A missing node is reported by the open itself.
    let _ = crate::mount::wait_for_device(sys, device, INPUT_NODE_WAIT);
    sys.open_input(device)
}

/// Read `device`'s events until it goes away; each power key press asks PID 1 to shut down.
pub fn watch(sys: &dyn Kernel, device: &Path, mut events: Box<dyn Read + Send>) {
    let mut buf = vec![0u8; INPUT_EVENT_SIZE * 16];
    loop {
        let n = match events.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if buf[..n]
            .chunks_exact(INPUT_EVENT_SIZE)
            .filter_map(parse_event)
            .any(is_power_press)
        {
            crate::info!("shutdown", "power button pressed ({})", device.display());
            reaper::send(sys, reaper::INIT_PID, reaper::SHUTDOWN_SIGNAL);
        }
    }
}

/// Let Ctrl-Alt-Del send SIGINT to PID 1 instead of an immediate reboot.
pub fn disable_ctrl_alt_del(sys: &dyn Machine) {
    let _ = sys.reboot(Power::CtrlAltDelOff);
}

/// Kill what is left, sync, make read-only and unmount in reverse order, then the `hidden`
/// mounts under the initramfs the same way, power off. Every filesystem ends
/// unmounted or read-only, so ext4 journals are clean. Returns only when the power off failed
/// (the real one does not return on success).
pub fn shut_down(sys: &dyn Kernel, hidden: &[PathBuf]) -> io::Result<()> {
    // kill(-1) reaches every process but PID 1 itself.
    reaper::send(sys, -1, libc::SIGKILL);
    reaper::reap_remaining(sys, REAP_AT_SHUTDOWN);
    sys.sync();
    unmount_all(sys);
    unmount_hidden(sys, hidden);
    sys.sync();
    sys.reboot(Power::PowerOff)
}

/// [`shut_down`], and if the power off fails, halt here: PID 1 must never exit.
pub fn power_off(sys: &dyn Kernel) -> ! {
    let hidden = HIDDEN_MOUNTS
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    if let Err(err) = shut_down(sys, &hidden) {
        crate::info!("shutdown", "power off failed: {err}; halting here");
    }
    loop {
        std::thread::park();
    }
}

fn unmount_all(sys: &dyn Syscalls) {
    let mounts = sys
        .read_to_string(Path::new("/proc/self/mounts"))
        .unwrap_or_default();
    for target in mount::mount_targets(&mounts).iter().rev() {
        if target != "/" {
            read_only_then_unmount(sys, Path::new(target));
        }
    }
    // The root itself cannot be unmounted: make it read-only.
    let _ = sys.remount(Path::new("/"), MountFlags::RDONLY);
}

/// The overlay layers under the covered initramfs, reached by relative paths from its root.
/// The root overlay still holds its upper disk, so that one ends read-only, which is enough
/// for ext4 to mark its journal clean.
fn unmount_hidden(sys: &dyn Syscalls, hidden: &[PathBuf]) {
    if hidden.is_empty() {
        return;
    }
    if let Err(err) = sys.chdir_initramfs() {
        // Before the root switch they are in /proc/self/mounts and already unmounted.
        crate::info!("shutdown", "initramfs root not reachable ({err})");
        return;
    }
    for mount in hidden.iter().rev() {
        read_only_then_unmount(sys, mount.strip_prefix("/").unwrap_or(mount));
    }
}

/// Read-only first: unmounting a mount whose filesystem another mount still uses (an overlay
/// holds its layers through private mounts) succeeds without ever closing the filesystem, while
/// a read-only remount acts on the filesystem itself and leaves an ext4 journal clean.
fn read_only_then_unmount(sys: &dyn Syscalls, target: &Path) {
    let read_only = sys.remount(target, MountFlags::RDONLY);
    let unmounted = sys.unmount(target);
    if let (Err(read_only), Err(unmount)) = (read_only, unmounted) {
        crate::info!(
            "shutdown",
            "{} stays writable: read-only remount: {read_only}; unmount: {unmount}",
            target.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_bytes(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut bytes = vec![0u8; INPUT_EVENT_SIZE - 8];
        bytes.extend(kind.to_ne_bytes());
        bytes.extend(code.to_ne_bytes());
        bytes.extend(value.to_ne_bytes());
        bytes
    }

    #[test]
    fn input_event_layout() {
        assert_eq!(INPUT_EVENT_SIZE, 24); // 64-bit targets
        let event = parse_event(&event_bytes(EV_KEY, KEY_POWER, 1)).unwrap();
        assert!(is_power_press(event));
        assert!(!is_power_press(
            parse_event(&event_bytes(EV_KEY, KEY_POWER, 0)).unwrap()
        ));
        assert!(!is_power_press(parse_event(&event_bytes(0, 0, 0)).unwrap()));
        assert!(parse_event(&[0u8; 10]).is_none());
    }

    #[test]
    fn key_capability_bitmap() {
        // The ACPI power button: only KEY_POWER (bit 116 = word 1, bit 52).
        assert!(has_key("10000000000000 0", KEY_POWER));
        assert!(!has_key("0", KEY_POWER));
        assert!(!has_key("10000000000000 0", 115));
        assert!(!has_key("", KEY_POWER));
    }

    #[test]
    fn finds_power_key_devices_in_the_input_listing() {
        // As /proc/bus/input/devices prints them (x86 power button, a mouse, arm64 gpio-keys).
        let listing = "\
I: Bus=0019 Vendor=0000 Product=0001 Version=0000
N: Name=\"Power Button\"
P: Phys=LNXPWRBN/button/input0
S: Sysfs=/devices/LNXSYSTM:00/LNXPWRBN:00/input/input0
U: Uniq=
H: Handlers=kbd event0 
B: PROP=0
B: EV=3
B: KEY=10000000000000 0

I: Bus=0011 Vendor=0002 Product=0006 Version=0000
N: Name=\"ImExPS/2 Generic Explorer Mouse\"
P: Phys=isa0060/serio1/input0
S: Sysfs=/devices/platform/i8042/serio1/input/input3
U: Uniq=
H: Handlers=mouse0 event2 
B: PROP=1
B: EV=7
B: KEY=1f0000 0 0 0 0

I: Bus=0019 Vendor=0001 Product=0001 Version=0100
N: Name=\"gpio-keys\"
P: Phys=gpio-keys/input0
S: Sysfs=/devices/platform/gpio-keys/input/input1
U: Uniq=
H: Handlers=event1 
B: PROP=0
B: EV=3
B: KEY=10000000000000 0

";
        assert_eq!(
            power_key_devices(listing),
            [
                PathBuf::from("/dev/input/event0"),
                PathBuf::from("/dev/input/event1")
            ]
        );
        assert!(power_key_devices("").is_empty());
    }

    use crate::mode_exec;
    use crate::syscalls::fake::{Call, ChildState, FIRST_CHILD_PID, Op, Recorder};
    use crate::syscalls::{AppExit, Clock};

    const MOUNTS: &str = "none / rootfs rw 0 0\n\
                          proc /proc proc rw 0 0\n\
                          /dev/vdd /data ext4 rw 0 0\n";

    /// What the power off does, without the reaping polls.
    fn power_calls(sys: &Recorder) -> Vec<Call> {
        sys.calls_where(|call| {
            matches!(
                call,
                Call::Kill { .. }
                    | Call::Sync
                    | Call::Unmount(_)
                    | Call::Remount { .. }
                    | Call::Reboot(_)
            )
        })
    }

    #[test]
    fn kill_reap_sync_unmount_in_reverse_then_power_off() {
        let sys = Recorder::default();
        sys.add_file("/proc/self/mounts", MOUNTS);
        sys.add_child(100, ChildState::running());
        sys.add_child(101, ChildState::Exited(AppExit::Exited(0)));
        shut_down(&sys, &[]).unwrap();
        assert_eq!(
            power_calls(&sys),
            [
                Call::Kill {
                    pid: -1,
                    signal: libc::SIGKILL
                },
                Call::Sync,
                Call::Remount {
                    target: PathBuf::from("/data"),
                    flags: MountFlags::RDONLY
                },
                Call::Unmount(PathBuf::from("/data")),
                Call::Remount {
                    target: PathBuf::from("/proc"),
                    flags: MountFlags::RDONLY
                },
                Call::Unmount(PathBuf::from("/proc")),
                Call::Remount {
                    target: PathBuf::from("/"),
                    flags: MountFlags::RDONLY
                },
                Call::Sync,
                Call::Reboot(Power::PowerOff),
            ]
        );
        assert!(sys.children().is_empty());
    }

    #[test]
    fn a_stuck_process_delays_the_power_off_by_the_bound_only() {
        let sys = Recorder::default();
        sys.add_child(100, ChildState::Stuck);
        shut_down(&sys, &[]).unwrap();
        assert_eq!(sys.now(), REAP_AT_SHUTDOWN);
        assert_eq!(
            power_calls(&sys).last(),
            Some(&Call::Reboot(Power::PowerOff))
        );
    }

    #[test]
    fn failures_on_the_way_are_survived_and_a_failed_power_off_is_returned() {
        let sys = Recorder::default();
        sys.add_file("/proc/self/mounts", MOUNTS);
        sys.fail(Op::Kill { pid: -1 }, libc::ESRCH);
        sys.fail(
            Op::Unmount {
                target: "/data".into(),
            },
            libc::EBUSY,
        );
        sys.fail(Op::Remount { target: "/".into() }, libc::EBUSY);
        sys.fail(Op::Reboot(Power::PowerOff), libc::EPERM);
        let err = shut_down(&sys, &[]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        let calls = power_calls(&sys);
        assert!(calls.contains(&Call::Unmount(PathBuf::from("/proc"))));
        assert_eq!(calls.last(), Some(&Call::Reboot(Power::PowerOff)));

        // Without /proc/self/mounts: nothing to unmount, still read-only root and power off.
        let sys = Recorder::default();
        shut_down(&sys, &[]).unwrap();
        let calls = power_calls(&sys);
        assert!(!calls.iter().any(|call| matches!(call, Call::Unmount(_))));
        assert!(calls.contains(&Call::Reboot(Power::PowerOff)));
    }

    #[test]
    fn filesystems_go_read_only_before_unmount_and_hidden_layers_are_reached_from_the_initramfs() {
        let sys = Recorder::default();
        sys.add_file("/proc/self/mounts", MOUNTS);
        let busy = |target: &str| Op::Unmount {
            target: target.into(),
        };
        sys.fail(busy("/data"), libc::EBUSY);
        // The root overlay still holds its image.
        sys.fail(busy(".guest-init/lower"), libc::EBUSY);
        let hidden = [
            PathBuf::from("/.guest-init/lower"),
            PathBuf::from("/.guest-init/rw"),
            PathBuf::from("/.guest-init/volumes/0/lower"),
            PathBuf::from("/.guest-init/volumes/0/rw"),
        ];
        shut_down(&sys, &hidden).unwrap();
        let read_only = |target: &str| Call::Remount {
            target: target.into(),
            flags: MountFlags::RDONLY,
        };
        let unmount = |target: &str| Call::Unmount(target.into());
        let calls = sys.calls_where(|call| {
            matches!(
                call,
                Call::Unmount(_) | Call::Remount { .. } | Call::ChdirInitramfs
            )
        });
        assert_eq!(
            calls,
            [
                read_only("/data"),
                unmount("/data"),
                read_only("/proc"),
                unmount("/proc"),
                read_only("/"),
                Call::ChdirInitramfs,
                read_only(".guest-init/volumes/0/rw"),
                unmount(".guest-init/volumes/0/rw"),
                read_only(".guest-init/volumes/0/lower"),
                unmount(".guest-init/volumes/0/lower"),
                // Unmounting it alone would leave the upper disk's filesystem open under the
                // overlay: the read-only remount is what makes its journal clean.
                read_only(".guest-init/rw"),
                unmount(".guest-init/rw"),
                read_only(".guest-init/lower"),
                unmount(".guest-init/lower"),
            ]
        );

        // Without a held initramfs (a failure before the switch) the hidden step is skipped.
        let sys = Recorder::default();
        sys.fail(Op::ChdirInitramfs, libc::ENOENT);
        shut_down(&sys, &hidden).unwrap();
        assert!(
            !power_calls(&sys)
                .iter()
                .any(|c| matches!(c, Call::Unmount(_)))
        );
    }

    #[test]
    fn ctrl_alt_del_is_turned_off_and_a_failure_ignored() {
        let sys = Recorder::default();
        sys.fail(Op::Reboot(Power::CtrlAltDelOff), libc::EPERM);
        disable_ctrl_alt_del(&sys);
        assert_eq!(sys.calls(), [Call::Reboot(Power::CtrlAltDelOff)]);
    }

    #[test]
    fn watcher_signals_pid_1_once_per_press_and_ends_with_the_device() {
        let sys = Recorder::default();
        let mut events = event_bytes(EV_KEY, KEY_POWER, 1);
        events.extend(event_bytes(EV_KEY, KEY_POWER, 0)); // release
        events.extend(event_bytes(EV_KEY, 115, 1)); // another key
        watch(
            &sys,
            Path::new("/dev/input/event0"),
            Box::new(std::io::Cursor::new(events)),
        );
        let shutdown = Call::Kill {
            pid: reaper::INIT_PID,
            signal: reaper::SHUTDOWN_SIGNAL,
        };
        assert_eq!(
            sys.calls_where(|call| matches!(call, Call::Kill { .. })),
            [shutdown]
        );
    }

    fn power_button_fixture(inputs: &[(&str, &str)]) -> tempfile::TempDir {
        let fixture = tempfile::tempdir().unwrap();
        let listing: String = inputs
            .iter()
            .map(|(input, event)| {
                format!(
                    "S: Sysfs=/devices/LNXSYSTM:00/LNXPWRBN:00/input/{input}\n\
                     N: Name=\"Power Button\"\nH: Handlers=kbd {event}\n\
                     B: KEY=10000000000000 0\n\n"
                )
            })
            .collect();
        std::fs::write(fixture.path().join("devices"), listing).unwrap();
        fixture
    }

    #[test]
    fn devices_are_open_when_the_watch_starts_even_when_their_node_comes_late() {
        let fixture = power_button_fixture(&[("input0", "event0"), ("input1", "event1")]);
        let sys: &'static Recorder = Box::leak(Box::new(Recorder::default()));
        // devtmpfs creates the node a little after the sysfs entry.
        sys.appear_at("/dev/input/event0", Duration::from_millis(30));
        sys.add_input("/dev/input/event0", event_bytes(EV_KEY, KEY_POWER, 0));
        // event1's node never appears: skipped after the bounded wait.
        let watchers = watch_power_button(sys, &fixture.path().join("devices"));
        // Open before returning, so the phase announced next cannot race a press.
        let opened = sys.calls_where(|call| matches!(call, Call::OpenInput(_)));
        assert_eq!(
            opened,
            [
                Call::OpenInput("/dev/input/event0".into()),
                Call::OpenInput("/dev/input/event1".into())
            ]
        );
        assert_eq!(watchers.devices, [PathBuf::from("/dev/input/event0")]);
        assert!(sys.now() >= Duration::from_millis(30) + INPUT_NODE_WAIT);
        watchers.join();
    }

    #[test]
    fn power_button_press_sends_sigterm_to_the_application() {
        let fixture = power_button_fixture(&[("input0", "event0")]);
        // Watcher threads need a seam that outlives them, as in PID 1.
        let sys: &'static Recorder =
            Box::leak(Box::new(Recorder::with_existing(&["/dev/input/event0"])));
        sys.add_input("/dev/input/event0", event_bytes(EV_KEY, KEY_POWER, 1));
        sys.add_child(FIRST_CHILD_PID, ChildState::running());

        let watchers = watch_power_button(sys, &fixture.path().join("devices"));
        assert_eq!(watchers.devices, [PathBuf::from("/dev/input/event0")]);
        watchers.join();
        let exit = mode_exec::supervise(sys, FIRST_CHILD_PID, Duration::from_secs(10));
        assert_eq!(exit.code(), 143);
        assert_eq!(
            sys.calls_where(|call| matches!(call, Call::Kill { .. })),
            [
                Call::Kill {
                    pid: reaper::INIT_PID,
                    signal: libc::SIGPWR
                },
                Call::Kill {
                    pid: FIRST_CHILD_PID,
                    signal: libc::SIGTERM
                },
            ]
        );
    }
}
