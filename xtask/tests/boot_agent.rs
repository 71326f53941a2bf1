//! guest-init starting the guest agent, proven by booting it under QEMU (x86_64). There is no
//! vsock device in these VMs (no `/dev/vhost-vsock` on the test machines; the vsock tests
//! through `vhost-device-vsock` live elsewhere): they show the agent starts from the initrd,
//! says once that it cannot listen and backs off quietly, is restarted when killed, never
//! appears in the image, never delays the power off, and that an initrd without it boots as
//! before.

#[allow(dead_code)]
mod guest_vm;

use std::fs;
use std::path::Path;

use guest_vm::Guest;
use serde_json::{Value, json};
use system::Arch;
use testkit::vm::{BOOT_TIMEOUT, Boot, Kernel, TEST_MODULES, Vm};
use xtask::initrd::TestInitrd;

/// The test initrd, with or without the agent, built once per test process.
fn initrd(agent: bool) -> &'static Path {
    let name = if agent { "agent" } else { "no-agent" };
    testkit::vm::initrd_once(name, || {
        let kernel = Kernel::debian_cloud()?;
        xtask::initrd::build_test_initrd(&TestInitrd {
            agent,
            ..TestInitrd::new(Arch::X86_64).with_modules(&kernel.modules, TEST_MODULES)
        })
    })
}

/// Boots a busybox rootfs (plus `extra` in its tree) with `config` on the chosen initrd.
fn boot(agent: bool, config: Value, extra: impl FnOnce(&Path)) -> Boot {
    let guest = Guest::busybox(config, extra);
    let kernel = Kernel::debian_cloud().unwrap();
    Vm::start_with(&kernel.image, initrd(agent), &guest.spec(None))
        .unwrap()
        .finish(BOOT_TIMEOUT)
        .unwrap()
}

fn sh(script: &str) -> Value {
    json!({ "entrypoint": ["/bin/sh", "-c"], "cmd": [script] })
}

/// Shell functions, with builtins only (a fork per process would take minutes under TCG):
/// `agent_pid supervisor|server` is the pid of the agent's supervisor (`guest-agent`, child of
/// PID 1) or of the serving agent (`guest-agent`, child of the supervisor), from /proc/*/stat;
/// `wait_new_server OLD` waits up to 30 s for a serving agent whose pid is not OLD.
const FIND_AGENT: &str = r#"
agent_pid() {
  want=$1
  for p in /proc/[0-9]*; do
    read -r l < $p/stat 2>/dev/null || continue
    set -- $l
    [ "$2" = "(guest-agent)" ] || continue
    if [ "$4" = 1 ]; then role=supervisor; else role=server; fi
    [ "$role" = "$want" ] && { echo $1; return; }
  done
}
wait_new_server() {
  i=0
  while [ $i -lt 300 ]; do
    p=$(agent_pid server); [ -n "$p" ] && [ "$p" != "$1" ] && { echo $p; return; }
    sleep 0.1; i=$((i+1))
  done
}
"#;

/// How often `needle` is on the console in `text`.
fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn the_agent_starts_backs_off_quietly_without_vsock_and_is_restarted_when_killed() {
    let script = format!(
        r#"{FIND_AGENT}
first=$(wait_new_server none)
echo AGENT-FIRST=$first SUPERVISOR=$(agent_pid supervisor)
echo AGENT-COMM=$(cat /proc/$first/comm)
[ -e /.guest-init/guest-agent ] && echo AGENT-VISIBLE-IN-IMAGE || echo AGENT-NOT-IN-IMAGE
# Its quiet back-off: several bind retries (1 s, 2 s) with no new line.
sleep 4
echo AGENT-KILL
kill $first
second=$(wait_new_server $first)
echo AGENT-SECOND=$second
exit 3"#
    );
    let boot = boot(true, sh(&script), |_| {});
    // The application's exit code, and the power off right after it although the agent runs.
    boot.expect_exit(3)
        .expect_log("agent: started its supervisor as pid")
        .expect_log("agent: serving agent started as pid")
        .expect_output("AGENT-COMM=guest-agent")
        .expect_output("AGENT-NOT-IN-IMAGE");
    let console = &boot.console;
    let first = value_of(console, "AGENT-FIRST=");
    let second = value_of(console, "AGENT-SECOND=");
    assert!(
        !first.is_empty() && !second.is_empty() && first != second,
        "no restart seen (first {first:?}, second {second:?}):\n{console}"
    );
    // One line about the missing vsock per serving agent, then back-off without a word.
    // At the line the application printed (the config's argv, logged earlier, has the word).
    let (before, after) = console
        .split_once("\nAGENT-KILL\n")
        .unwrap_or_else(|| panic!("no AGENT-KILL:\n{console}"));
    let cannot = "agent: cannot listen on vsock port 2222";
    assert_eq!(count(before, cannot), 1, "{console}");
    assert!(
        before.contains("Attach a vsock device"),
        "the line says what to do:\n{console}"
    );
    // The restarted one says it again at most once (the power off may come first).
    assert!(count(after, cannot) <= 1, "{console}");
    // The kill is logged as a restart with its back-off.
    let restart = format!("agent: the serving agent (pid {first}) was killed by signal 15 after");
    assert!(after.contains(&restart), "no `{restart}`:\n{console}");
    assert!(after.contains("restarting it in 250 ms"), "{console}");
    assert!(
        after.contains(&format!(
            "agent: serving agent restarted as pid {second} (restart 1)"
        )),
        "{console}"
    );
}

/// The value of the first whitespace-separated `KEY=value` token (`key` is `KEY=`) the
/// application printed (not in guest-init's lines, which quote the script).
fn value_of(console: &str, key: &str) -> String {
    console
        .lines()
        .filter(|line| !line.starts_with("[guest-init "))
        .flat_map(str::split_whitespace)
        .find_map(|token| token.strip_prefix(key).map(str::to_owned))
        .unwrap_or_default()
}

#[test]
fn an_initrd_without_the_agent_boots_as_before_with_one_line() {
    let boot = boot(
        false,
        sh("ls /proc/*/cmdline | wc -l > /dev/null; echo HELLO"),
        |_| {},
    );
    boot.expect_exit(0)
        .expect_output("HELLO")
        .expect_log("agent: this initrd carries no agent (/.guest-init/guest-agent): none started");
    assert_eq!(
        count(&boot.console, "] agent: "),
        1,
        "one agent line, nothing else:\n{}",
        boot.console
    );
}

#[test]
fn in_systemd_mode_the_agent_outlives_the_handover_to_the_images_init() {
    // busybox init as /sbin/init: it runs the script as PID 1's child, long after guest-init
    // exec'd it, then powers off.
    let config = json!({ "init_mode": "systemd" });
    let boot = boot(true, config, |tree| {
        std::os::unix::fs::symlink("../bin/busybox", tree.join("sbin/init")).unwrap();
        let script = format!(
            "{FIND_AGENT}\nsup=$(agent_pid supervisor); agent=$(wait_new_server none)\n\
             echo INIT-COMM=$(cat /proc/1/comm) SUPERVISOR=$sup \
             SUPERVISOR-PPID=$(cut -d' ' -f4 /proc/$sup/stat) AGENT=$agent\n"
        );
        fs::write(tree.join("etc/agent-check"), script).unwrap();
        fs::write(
            tree.join("etc/inittab"),
            "::sysinit:/bin/sh /etc/agent-check\n::sysinit:/bin/poweroff\n",
        )
        .unwrap();
    });
    assert!(
        boot.console.contains("reboot: Power down"),
        "the init did not power off:\n{}",
        boot.console
    );
    boot.expect_log("systemd: handing PID 1 to /sbin/init")
        .expect_output("INIT-COMM=init");
    let line = boot
        .console
        .lines()
        .find(|l| l.contains("INIT-COMM="))
        .unwrap();
    // The supervisor runs, is now the child of the image's init (PID 1), and has a serving
    // agent.
    assert!(!value_of(line, "SUPERVISOR=").is_empty(), "{line}");
    assert_eq!(value_of(line, "SUPERVISOR-PPID="), "1", "{line}");
    assert!(!value_of(line, "AGENT=").is_empty(), "{line}");
}
