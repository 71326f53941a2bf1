//! guest-init: PID 1 of every microVM. `main` only orders the boot phases; each phase lives in
//! its own module.
//!
//! The phases reach the kernel through the traits in [`syscalls`]: mounts, root switch, module
//! loads and hostname through `Syscalls`; signals, children (spawn, exec, credentials, wait)
//! through `Process`; power off, Ctrl-Alt-Del, the power button's events and the loopback
//! flags through `Machine`. Unit tests replay them on `syscalls::fake::Recorder`. What still
//! touches the system directly, and is covered only by the VM tests or by tests on temporary
//! directories: this file's reads of `/proc/cmdline`, the module load order and `config.json`
//! and its write of `printk_devkmsg`; the PCI scan and firmware copy in `drivers` (tested on
//! fixture trees); the logger's `/dev/console` and `/dev/kmsg`; the PATH
//! lookup in `command` (tested on fixture trees); the input device listing read in `shutdown`
//! (its parser tested on the kernel's text); the initramfs walk in `initramfs`, reached through
//! `Syscalls::free_initramfs` (tested on a temporary tree).
//! The network phase has its own seam, `network::Netlink` (the
//! rtnetlink socket in production); its name-service files are tested on temporary trees.

mod agent;
mod command;
mod config;
mod drivers;
mod error;
mod ext4;
mod image_path;
mod initramfs;
mod logger;
mod mode_exec;
mod mode_systemd;
mod modules;
mod mount;
mod network;
mod nvidia;
mod reaper;
mod root;
mod shutdown;
mod syscalls;
mod user;
mod volumes;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use error::{AppExit, ExitLine, ExitReason, Fatal};
use guest_protocol::cmdline::{self, BootOptions};
use guest_protocol::{Config, InitMode};
use logger::Timings;
use syscalls::{ChildStep, Kernel, Linux, MountFlags, Spawn, Syscalls};

/// Where the config disk is mounted (read-only) while config.json is read.
const CONFIG_MOUNT: &str = "/.guest-init/config";
/// Filesystems tried for the config disk.
const CONFIG_TYPES: [&str; 4] = ["ext4", "erofs", "vfat", "iso9660"];

/// Set once a debug shell was asked for (cmdline or config); read by the fatal path.
static DEBUG_SHELL: AtomicBool = AtomicBool::new(false);
/// Exactly one exit line, whoever gets there first (the fatal path or the panic hook).
static EXIT_LINE_WRITTEN: AtomicBool = AtomicBool::new(false);

fn main() {
    logger::start_clock();
    if rustix::process::getpid() != rustix::process::Pid::INIT {
        eprintln!("guest-init: must run as PID 1 inside a microVM; refusing to mount anything");
        std::process::exit(1);
    }
    // PID 1 never returns from main: the seam lives as long as the watcher threads and the
    // panic hook that use it.
    let sys: &'static Linux = Box::leak(Box::new(Linux::new()));
    install_panic_hook(sys);
    match boot(sys) {
        Ok(exit) => {
            write_exit_line(ExitLine::from(exit));
            shutdown::power_off(sys);
        }
        Err(fatal) => fail(sys, fatal),
    }
}

/// The boot phases, in order. Returns when the application exited.
fn boot(sys: &'static (dyn Kernel + Sync)) -> Result<AppExit, Fatal> {
    let mut timings = Timings::default();

    mount::mount_early(sys).map_err(|e| Fatal::new("mount", ExitReason::Mount, e))?;
    // Userspace lines to /dev/kmsg are rate limited by default; ours are few and wanted.
    let _ = std::fs::write("/proc/sys/kernel/printk_devkmsg", "on\n");
    logger::attach_console();
    shutdown::disable_ctrl_alt_del(sys);
    reaper::block_signals(sys).map_err(|e| Fatal::new("signals", ExitReason::Internal, e))?;
    // Bringing lo up is kernel work (addrconf, routes) that needs nothing else: it runs beside
    // the phases that follow and is joined before the application starts. After the signal
    // mask, which the thread inherits.
    let loopback = std::thread::Builder::new()
        .name("loopback".into())
        .spawn(move || network::loopback_up(sys));
    timings.mark("mounts");
    info!("mount", "early mounts done");

    let options = boot_options()?;
    DEBUG_SHELL.store(options.debug_shell, Ordering::SeqCst);

    let loaded = load_modules(sys)?;
    timings.mark("modules");
    // Right after the button/evdev drivers load and before the phase's first line: a press
    // before the device is open is lost, so the devices are open before anything is announced.
    // A press during boot stays pending as SIGPWR and is honoured once the app runs.
    let watchers = shutdown::watch_power_button(sys, Path::new(shutdown::INPUT_DEVICES));
    for line in loaded {
        info!("modules", "{line}");
    }
    if watchers.devices.is_empty() {
        info!(
            "shutdown",
            "no input device sends KEY_POWER (button/evdev modules?): a power-button shutdown will not be graceful"
        );
    }

    // Drivers on demand (module groups whose PCI devices are present), after the watcher so
    // a slow driver does not delay it.
    let drivers = drivers::load_on_demand(sys, Path::new("/"))
        .map_err(|e| Fatal::new("drivers", e.class(), e))?;
    if !drivers.groups.is_empty() {
        timings.mark("drivers");
    }

    for device in [&options.rootfs, &options.config] {
        let waited = mount::wait_for_device(sys, device, options.device_timeout)
            .map_err(|e| Fatal::new("devices", ExitReason::Device, e))?;
        info!(
            "devices",
            "{} present after {} ms",
            device.display(),
            waited.as_millis()
        );
    }
    timings.mark("devices");

    // The root's mounts need only the kernel command line: they run beside the config and
    // network phases (each ext4 mount waits on its disk), and are joined before volumes
    // mount into the new root. The scope joins every thread on each path out, errors too, so
    // a failure is reported as before: config, then network, then root.
    let (config, layout) = std::thread::scope(|scope| {
        let mount_root = || root::mount_overlay_root(sys, &options.rootfs, &options.writable);
        let root_mounts = std::thread::Builder::new()
            .name("root-mounts".into())
            .spawn_scoped(scope, mount_root);
        let config = read_config(sys, &options)?;
        drivers::check_gpu(config.gpu, &drivers)
            .map_err(|e| Fatal::new("drivers", e.class(), e))?;
        timings.mark("config");

        configure_network(sys, &config, &options)?;
        timings.mark("network");

        let layout = match root_mounts {
            Ok(thread) => thread.join().map_err(|_| {
                Fatal::new(
                    "root",
                    ExitReason::Internal,
                    "the root-mounts thread panicked",
                )
            })?,
            Err(_) => mount_root(),
        }
        .map_err(|e| Fatal::new("root", ExitReason::Rootfs, e))?;
        Ok::<_, Fatal>((config, layout))
    })?;
    shutdown::remember_hidden_mounts(&[PathBuf::from(CONFIG_MOUNT)]);
    shutdown::remember_hidden_mounts(&layout.hidden);
    info!(
        "root",
        "{} ({}) read-only under overlay, writable layer on {}",
        options.rootfs.display(),
        layout.rootfs_type,
        layout.writable
    );
    let mounted = volumes::mount_all(
        sys,
        &config.volume_mounts,
        Path::new(root::NEW_ROOT),
        options.device_timeout,
    )
    .map_err(|e| Fatal::new("volumes", e.class(), e))?;
    shutdown::remember_hidden_mounts(&mounted.hidden);
    for line in &mounted.described {
        info!("volumes", "{line}");
    }
    let written = network::write_files(
        Path::new(root::NEW_ROOT),
        config.network.as_ref(),
        config.hostname.as_deref(),
    )
    .map_err(|e| Fatal::new("network", ExitReason::Network, e))?;
    if !written.0.is_empty() {
        info!("network", "wrote {} in the image", written.0.join(", "));
    }
    root::switch_root(sys, Path::new(root::NEW_ROOT))
        .map_err(|e| Fatal::new("root", ExitReason::Rootfs, e))?;
    timings.mark("root");
    // The agent's binary is copied out of the initramfs before it is freed; root's
    // environment for it (its execs overlay theirs on it), inside the new root.
    let start_agent = || {
        agent::load(sys).map(|exe| {
            let env = command::environment(&config.env, "/root");
            agent::start(sys, exe, env, logger::start_monotonic_ms())
        })
    };

    match loopback.map(std::thread::JoinHandle::join) {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => info!("network", "{err} (continuing without loopback)"),
        // Not started (no thread) or panicked (the hook has powered off by then): do it here.
        Ok(Err(_)) | Err(_) => {
            if let Err(err) = network::loopback_up(sys) {
                info!("network", "{err} (continuing without loopback)");
            }
        }
    }

    match config.effective_init_mode() {
        InitMode::Systemd => {
            // Before the exec: the supervisor is a process of its own and outlives it.
            start_agent();
            root::free_initramfs(sys);
            timings.mark("exec");
            info!("timings", "{}", timings.line());
            Err(mode_systemd::hand_over(sys, &config))
        }
        InitMode::Exec => {
            let launch = mode_exec::prepare(sys, &config)?;
            let app = mode_exec::spawn(sys, &launch)?;
            timings.mark("exec");
            info!(
                "exec",
                "started {:?} as pid {app} (uid {} gid {}) in {}",
                launch.argv,
                launch.credentials.uid,
                launch.credentials.gid,
                launch.workdir.display()
            );
            info!("timings", "{}", timings.line());
            // After the application's start, so it never waits for the agent.
            start_agent();
            root::free_initramfs(sys);
            let exit = mode_exec::supervise(sys, app, config.shutdown_grace);
            info!("exec", "application exited: {exit:?}");
            Ok(exit)
        }
    }
}

/// The configured interface and the kernel hostname, before the root switch so that both
/// modes start with them; the image's files follow once the new root is mounted.
fn configure_network(
    sys: &'static (dyn Kernel + Sync),
    config: &Config,
    options: &BootOptions,
) -> Result<(), Fatal> {
    let fatal = |e| Fatal::new("network", ExitReason::Network, e);
    if let Some(wanted) = &config.network {
        let done = network::configure(&network::Rtnetlink, sys, wanted, options.device_timeout)
            .map_err(fatal)?;
        let mtu = wanted
            .mtu
            .map(|mtu| format!(", MTU {mtu}"))
            .unwrap_or_default();
        let route = wanted
            .gateway
            .map(|gateway| format!(", default via {gateway}"))
            .unwrap_or_default();
        info!(
            "network",
            "{}: {}/{}{mtu}{route} (interface found after {} ms)",
            done.link,
            wanted.ip,
            wanted.prefix_len,
            done.waited.as_millis()
        );
    }
    if let Some(hostname) = &config.hostname {
        network::set_hostname(sys, hostname).map_err(fatal)?;
    }
    Ok(())
}

fn boot_options() -> Result<BootOptions, Fatal> {
    let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (options, warnings) =
        cmdline::parse(&text).map_err(|e| Fatal::new("cmdline", ExitReason::Config, e))?;
    for warning in warnings {
        info!("cmdline", "{warning}");
    }
    Ok(options)
}

/// Load the initrd's modules; returns the lines to log (logged once the power key is watched).
fn load_modules(sys: &dyn Syscalls) -> Result<Vec<String>, Fatal> {
    let path = Path::new(modules::LOAD_ORDER);
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(vec![format!(
                "no {}: drivers are built into the kernel",
                path.display()
            )]);
        }
        Err(source) => {
            let err = modules::ModuleError::ReadLoadOrder {
                path: path.to_owned(),
                source,
            };
            return Err(Fatal::new("modules", ExitReason::Modules, err));
        }
    };
    let list = modules::parse_load_order(&text, path)
        .map_err(|e| Fatal::new("modules", ExitReason::Modules, e))?;
    let outcomes =
        modules::load_all(sys, &list).map_err(|e| Fatal::new("modules", ExitReason::Modules, e))?;
    let mut lines: Vec<String> = list
        .iter()
        .zip(&outcomes)
        .filter(|(_, outcome)| **outcome != modules::Outcome::Loaded)
        .map(|(module, outcome)| format!("{}: {outcome:?}", module.display()))
        .collect();
    lines.push(format!("{} modules from {}", list.len(), path.display()));
    Ok(lines)
}

/// Mount the config disk (read-only) and read config.json. The disk stays mounted: after the
/// root switch it is hidden under the initramfs with the overlay's layers, out of the
/// application's sight, and unmounted with them at power off. Unmounting it here cost a thread
/// and the unmount's kernel work on the way to the application's exec.
fn read_config(sys: &dyn Kernel, options: &BootOptions) -> Result<Config, Fatal> {
    let mount_point = Path::new(CONFIG_MOUNT);
    mount::mount_device(
        sys,
        &options.config,
        mount_point,
        &CONFIG_TYPES,
        MountFlags::RDONLY,
    )
    .map_err(|e| Fatal::new("config", ExitReason::Mount, e))?;
    let loaded = config::load(&mount_point.join(config::FILE_NAME));
    let (config, warnings) = loaded.map_err(|e| Fatal::new("config", ExitReason::Config, e))?;
    for warning in warnings {
        info!("config", "{warning}");
    }
    if config.debug_shell {
        DEBUG_SHELL.store(true, Ordering::SeqCst);
    }
    volumes::check(&config.volume_mounts, options)
        .map_err(|e| Fatal::new("volumes", e.class(), e))?;
    info!(
        "config",
        "{} from {}: argv {:?}, mode {:?}",
        config::FILE_NAME,
        options.config.display(),
        config.argv(),
        config.effective_init_mode()
    );
    Ok(config)
}

fn write_exit_line(line: ExitLine) {
    if !EXIT_LINE_WRITTEN.swap(true, Ordering::SeqCst) {
        logger::write_line(&line.to_string());
    }
}

/// Log the failure with its cause chain, print the exit line, optionally a debug shell,
/// then power off. Never returns: PID 1 exiting panics the kernel.
fn fail(sys: &dyn Kernel, fatal: Fatal) -> ! {
    info!(fatal.phase, "FATAL ({}): {}", fatal.class, fatal.message());
    write_exit_line(fatal.exit_line());
    debug_shell_then_power_off(sys)
}

fn debug_shell_then_power_off(sys: &dyn Kernel) -> ! {
    if DEBUG_SHELL.load(Ordering::SeqCst) {
        info!(
            "debug",
            "starting /bin/sh on the console; exit it to power off"
        );
        let shell = Spawn {
            program: PathBuf::from("/bin/sh"),
            argv: vec!["/bin/sh".to_owned()],
            env: None,
            workdir: None,
            console: true,
            in_child: vec![
                ChildStep::UnblockSignals,
                ChildStep::NewSession,
                ChildStep::ControllingTerminal,
            ],
        };
        match sys.spawn(&shell) {
            Ok(pid) => {
                reaper::wait_for(sys, pid);
            }
            Err(err) => info!("debug", "cannot start /bin/sh: {}", err.into_io()),
        }
    }
    shutdown::power_off(sys)
}

/// A panic is a fatal error like any other: log it, exit line, power off.
fn install_panic_hook(sys: &'static Linux) {
    std::panic::set_hook(Box::new(move |panic| {
        info!("panic", "FATAL (internal): {panic}");
        if let Some(line) = ExitLine::failure(ExitReason::Panic) {
            write_exit_line(line);
        }
        debug_shell_then_power_off(sys);
    }));
}

#[cfg(test)]
mod tests {
    use guest_protocol::CmdlineKey;

    #[test]
    fn readme_documents_every_kernel_parameter() {
        let readme = include_str!("../README.md");
        for key in CmdlineKey::ALL {
            let param = format!("`guest_init.{}=", key.name());
            assert!(readme.contains(&param), "README.md lacks {param}");
        }
    }
}
