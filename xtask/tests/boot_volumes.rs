//! guest-init's disks proven by booting them: volumes in their three modes, erofs images, disks
//! left clean at power off, config disks in vfat, and a power-button press during boot. Each
//! test boots Debian's cloud kernel under QEMU and asserts on the console and on the disk
//! images afterwards (never on QEMU's exit status).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use guest_protocol::ExitReason;
use serde_json::{Value, json};
use system::Arch;
use system::hash::sha256_reader;
use testkit::vm::{
    BOOT_TIMEOUT, Boot, Kernel, TEST_MODULES, Vm, VmSpec, busybox_rootfs, erofs_image, ext4_image,
};
use xtask::test_suite::prepare::arm64_guest_dir;

/// What the initrd of these tests carries besides [`TEST_MODULES`]: erofs for images and
/// volumes, and what vfat and iso9660 config disks need (guest-init/README.md lists the same).
const FILESYSTEM_MODULES: &[&str] = &["erofs", "vfat", "nls_cp437", "nls_ascii", "isofs"];

/// Which test initrd a guest boots.
#[derive(Clone, Copy)]
enum Initrd {
    /// [`TEST_MODULES`] + [`FILESYSTEM_MODULES`].
    WithFilesystems,
    /// [`TEST_MODULES`] only: no erofs, no vfat.
    Plain,
}

/// Built once per test process and kind, shared by the tests.
fn initrd(kind: Initrd) -> &'static Path {
    let (name, modules): (_, Vec<&str>) = match kind {
        Initrd::WithFilesystems => ("filesystems", [TEST_MODULES, FILESYSTEM_MODULES].concat()),
        Initrd::Plain => ("plain", TEST_MODULES.to_vec()),
    };
    testkit::vm::initrd_once(&format!("volumes-{name}"), || {
        let kernel = Kernel::debian_cloud()?;
        xtask::initrd::build_test_initrd(
            &xtask::initrd::TestInitrd::new(Arch::X86_64).with_modules(&kernel.modules, &modules),
        )
    })
}

/// A test VM's disks in virtio order: vda rootfs, vdb writable, vdc config, then volumes.
struct Guest {
    dir: tempfile::TempDir,
    disks: Vec<PathBuf>,
    append: String,
    initrd: Initrd,
}

impl Guest {
    /// A busybox rootfs in ext4, an empty writable ext4 disk, an ext4 config disk.
    fn new(config: Value) -> Guest {
        Guest::with_rootfs(config, |_| {})
    }

    /// The same, with `extra` changing the rootfs tree first.
    fn with_rootfs(config: Value, extra: impl FnOnce(&Path)) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let tree = busybox_tree(dir.path());
        extra(&tree);
        let rootfs = dir.path().join("rootfs.img");
        ext4_image(&rootfs, Some(&tree), 64).unwrap();
        Guest::around(dir, rootfs, config)
    }

    /// The same with the rootfs in erofs (lz4hc-compressed, as images are shipped).
    fn with_erofs_rootfs(config: Value) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let tree = busybox_tree(dir.path());
        fs::write(tree.join("etc/image-format"), "erofs image\n").unwrap();
        let rootfs = dir.path().join("rootfs.erofs");
        erofs_image(&rootfs, &tree, Some("lz4hc")).unwrap();
        Guest::around(dir, rootfs, config)
    }

    fn around(dir: tempfile::TempDir, rootfs: PathBuf, config: Value) -> Guest {
        let writable = dir.path().join("writable.img");
        ext4_image(&writable, None, 64).unwrap();
        let json = text(config);
        let config = dir.path().join("config.img");
        xtask::vm::config_image(&config, &json).unwrap();
        Guest {
            dir,
            disks: vec![rootfs, writable, config],
            append: String::new(),
            initrd: Initrd::WithFilesystems,
        }
    }

    fn writable(&self) -> &Path {
        &self.disks[1]
    }

    /// Adds an ext4 disk holding `files` (vdd, vde, ... in the order added).
    fn ext4_disk(&mut self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let tree = tree_with(self.dir.path(), &format!("{name}-tree"), files);
        let disk = self.dir.path().join(format!("{name}.img"));
        ext4_image(&disk, Some(&tree), 16).unwrap();
        self.disks.push(disk.clone());
        disk
    }

    /// Adds an erofs disk holding `files`.
    fn erofs_disk(&mut self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let tree = tree_with(self.dir.path(), &format!("{name}-tree"), files);
        let disk = self.dir.path().join(format!("{name}.erofs"));
        erofs_image(&disk, &tree, None).unwrap();
        self.disks.push(disk.clone());
        disk
    }

    fn start(&self) -> Vm {
        let kernel = Kernel::debian_cloud().unwrap();
        let mut spec = VmSpec::new(self.disks.clone());
        spec.append = self.append.clone();
        Vm::start_with(&kernel.image, initrd(self.initrd), &spec).unwrap()
    }

    fn boot(&self) -> Boot {
        self.start().finish(BOOT_TIMEOUT).unwrap()
    }
}

fn busybox_tree(dir: &Path) -> PathBuf {
    let tree = dir.join("rootfs-tree");
    busybox_rootfs(Arch::X86_64, &tree, &arm64_guest_dir()).unwrap();
    tree
}

fn tree_with(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let tree = dir.join(name);
    fs::create_dir_all(&tree).unwrap();
    for (path, contents) in files {
        fs::write(tree.join(path), contents).unwrap();
    }
    tree
}

/// A config as JSON text (a string is taken as raw text).
fn text(config: Value) -> String {
    match config {
        Value::String(raw) => raw,
        other => serde_json::to_string_pretty(&other).unwrap(),
    }
}

fn sh(script: &str) -> Value {
    json!({ "entrypoint": ["/bin/sh", "-c"], "cmd": [script] })
}

fn sh_with_volumes(script: &str, volumes: Value) -> Value {
    let mut config = sh(script);
    config["volume_mounts"] = volumes;
    config
}

fn sha256_file(path: &Path) -> String {
    sha256_reader(fs::File::open(path).unwrap())
        .unwrap()
        .0
        .hex()
}

/// `debugfs -R "cat <path>"` on an ext4 image: the file's contents as the disk holds them.
fn debugfs_cat(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .expect("running debugfs (apt-get install e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts `dumpe2fs -h` reports the ext4 image clean, its journal with nothing to replay.
fn assert_clean_ext4(image: &Path, console: &str) {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .expect("running dumpe2fs (apt-get install e2fsprogs)");
    let header = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(
        field("Filesystem state:"),
        "clean",
        "{} is not clean after power off:\n{header}\nconsole:\n{console}",
        image.display()
    );
    assert!(
        !field("Filesystem features:").contains("needs_recovery"),
        "{}'s journal needs recovery after power off:\n{header}\nconsole:\n{console}",
        image.display()
    );
}

#[test]
fn an_ro_volume_is_readable_and_refuses_writes() {
    let mut guest = Guest::new(sh_with_volumes(
        "cat /srv/data/greeting; echo x > /srv/data/new-file",
        json!([{ "device": "/dev/vdd", "path": "/srv/data", "mode": "ro" }]),
    ));
    let volume = guest.ext4_disk("ro-volume", &[("greeting", "hello from the volume\n")]);
    let before = sha256_file(&volume);
    let boot = guest.boot();
    // busybox's sh reports the failed redirect with strerror(EROFS) and exits 1.
    boot.expect_exit(1)
        .expect_output("hello from the volume")
        .expect_output("Read-only file system")
        .expect_log("volume_mounts[0]: /dev/vdd (ext4) read-only at /srv/data")
        .expect_log("initramfs freed: ");
    assert_eq!(sha256_file(&volume), before, "the ro volume was written to");
}

#[test]
fn an_rw_volume_write_is_on_the_disk_after_power_off() {
    // No sync in the app: the clean unmount at power off must write it out.
    let mut guest = Guest::new(sh_with_volumes(
        "echo written-in-the-guest > /data/out.txt && cat /data/seed.txt",
        json!([{ "device": "/dev/vdd", "path": "/data", "mode": "rw" }]),
    ));
    let volume = guest.ext4_disk("rw-volume", &[("seed.txt", "seeded\n")]);
    let boot = guest.boot();
    boot.expect_exit(0).expect_output("seeded");
    assert_eq!(
        debugfs_cat(&volume, "/out.txt"),
        "written-in-the-guest\n",
        "{}",
        boot.console
    );
    assert_clean_ext4(&volume, &boot.console);
}

#[test]
fn a_volume_path_through_an_absolute_link_in_the_image_lands_where_the_app_looks() {
    // In the image, /data is a link to /srv/data: the volume must appear there for the app,
    // not at /srv/data of the initramfs.
    let mut guest = Guest::with_rootfs(
        sh_with_volumes(
            "echo through-the-link > /data/linked.txt && cat /srv/data/seed.txt",
            json!([{ "device": "/dev/vdd", "path": "/data", "mode": "rw" }]),
        ),
        |tree| {
            fs::create_dir_all(tree.join("srv/data")).unwrap();
            std::os::unix::fs::symlink("/srv/data", tree.join("data")).unwrap();
        },
    );
    let volume = guest.ext4_disk("linked-volume", &[("seed.txt", "seeded\n")]);
    let boot = guest.boot();
    boot.expect_exit(0)
        .expect_output("seeded")
        .expect_log("volume_mounts[0]: /dev/vdd (ext4) read-write at /data");
    assert_eq!(
        debugfs_cat(&volume, "/linked.txt"),
        "through-the-link\n",
        "{}",
        boot.console
    );
}

#[test]
fn an_overlay_volume_writes_to_its_overlay_device_and_leaves_the_base_unchanged() {
    let mut guest = Guest::new(sh_with_volumes(
        "cat /cache/base.txt && echo new > /cache/new.txt && echo changed > /cache/base.txt \
         && cat /cache/base.txt",
        json!([{ "device": "/dev/vdd", "path": "/cache", "mode": "overlay",
                 "overlay_device": "/dev/vde" }]),
    ));
    // The base in erofs, the original system's image format for volumes too.
    let base = guest.erofs_disk("overlay-base", &[("base.txt", "from the base\n")]);
    // Empty: `upper` and `work` are created on it.
    let upper = guest.ext4_disk("overlay-upper", &[]);
    let before = sha256_file(&base);
    let boot = guest.boot();
    boot.expect_exit(0)
        .expect_output("from the base")
        .expect_output("changed")
        .expect_log("volume_mounts[0]: overlay at /cache of /dev/vdd (erofs), changes on /dev/vde");
    assert_eq!(
        sha256_file(&base),
        before,
        "the overlay's base was written to"
    );
    assert_eq!(
        debugfs_cat(&upper, "/upper/new.txt"),
        "new\n",
        "{}",
        boot.console
    );
    assert_eq!(debugfs_cat(&upper, "/upper/base.txt"), "changed\n");
    assert_clean_ext4(&upper, &boot.console);
}

#[test]
fn a_missing_volume_device_is_a_device_failure_naming_the_volume() {
    let mut guest = Guest::new(sh_with_volumes(
        "echo never",
        json!([
            { "device": "/dev/vdd", "path": "/present", "mode": "ro" },
            { "device": "/dev/vdz", "path": "/absent", "mode": "rw" }
        ]),
    ));
    guest.ext4_disk("present", &[("a", "a\n")]);
    guest.append = "guest_init.device_timeout_ms=1500".into();
    let boot = guest.boot();
    boot.expect_failure(ExitReason::Device).expect_log(
        "volume_mounts[1] (/absent): block device /dev/vdz did not appear within 1500 ms",
    );
    let fatal = boot
        .console
        .lines()
        .find(|l| l.contains("FATAL (device)"))
        .expect("a FATAL line");
    assert_eq!(fatal.matches("did not appear").count(), 1, "{fatal}");
}

#[test]
fn an_erofs_rootfs_boots_with_an_ext4_writable_layer() {
    let guest = Guest::with_erofs_rootfs(sh(
        "cat /etc/image-format && echo layered > /etc/added && cat /etc/added",
    ));
    let boot = guest.boot();
    boot.expect_exit(0)
        .expect_output("erofs image")
        .expect_output("layered")
        .expect_log("/dev/vda (erofs) read-only under overlay");
    assert_eq!(
        debugfs_cat(guest.writable(), "/upper/etc/added"),
        "layered\n"
    );
}

#[test]
fn the_writable_disk_is_clean_after_power_off() {
    let guest = Guest::new(sh("echo kept > /etc/kept && cat /etc/kept"));
    let boot = guest.boot();
    boot.expect_exit(0).expect_output("kept");
    assert_clean_ext4(guest.writable(), &boot.console);
    assert_eq!(debugfs_cat(guest.writable(), "/upper/etc/kept"), "kept\n");
}

/// Presses the power button the moment guest-init prints `line`, while it still boots: the
/// press must not be lost, so the application is stopped with SIGTERM as soon as it runs.
fn power_button_at(line: &str) {
    // If the press were lost, `sleep` would end on its own with 0 instead of 143.
    let guest = Guest::new(json!({ "entrypoint": ["/bin/sleep"], "cmd": ["60"] }));
    let vm = guest.start();
    vm.wait_for(line, BOOT_TIMEOUT).unwrap();
    vm.power_button().unwrap();
    let boot = vm.finish(BOOT_TIMEOUT).unwrap();
    boot.expect_exit(128 + 15)
        .expect_log("power button pressed");
}

#[test]
fn a_power_button_press_as_the_modules_line_appears_is_honoured() {
    power_button_at("] modules: ");
}

#[test]
fn a_power_button_press_as_the_devices_line_appears_is_honoured() {
    power_button_at("] devices: ");
}

/// A vfat disk holding `config` (mkfs.vfat, then mcopy: no root, no loop device).
fn vfat_config_disk(guest: &mut Guest, config: Value) {
    let disk = guest.dir.path().join("config.vfat");
    let run = |cmd: &mut Command, package: &str| {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e} (apt-get install {package})"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new("mkfs.vfat")
            .args(["-C", "-n", "CONFIG"])
            .arg(&disk)
            .arg("4096"),
        "dosfstools",
    );
    let json = guest.dir.path().join("config.json");
    fs::write(&json, text(config)).unwrap();
    run(
        Command::new("mcopy")
            .arg("-i")
            .arg(&disk)
            .arg(&json)
            .arg("::config.json"),
        "mtools",
    );
    guest.disks[2] = disk;
}

#[test]
fn a_vfat_config_disk_works_with_the_documented_modules() {
    let mut guest = Guest::new(json!({}));
    vfat_config_disk(&mut guest, sh("echo config from vfat"));
    guest
        .boot()
        .expect_exit(0)
        .expect_output("config from vfat");
}

#[test]
fn an_iso9660_config_disk_works_with_the_documented_modules() {
    let mut guest = Guest::new(json!({}));
    let tree = tree_with(
        guest.dir.path(),
        "iso-tree",
        &[("config.json", &text(sh("echo config from iso9660")))],
    );
    let disk = guest.dir.path().join("config.iso");
    let out = Command::new("genisoimage")
        .args(["-quiet", "-R", "-J", "-V", "CONFIG", "-o"])
        .arg(&disk)
        .arg(&tree)
        .output()
        .expect("running genisoimage (apt-get install genisoimage)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    guest.disks[2] = disk;
    guest
        .boot()
        .expect_exit(0)
        .expect_output("config from iso9660");
}

#[test]
fn a_vfat_config_disk_without_its_modules_says_the_module_is_missing() {
    let mut guest = Guest::new(json!({}));
    vfat_config_disk(&mut guest, sh("echo never"));
    guest.initrd = Initrd::Plain;
    guest
        .boot()
        .expect_failure(ExitReason::Mount)
        .expect_log("vfat: filesystem type not supported by this kernel (module missing?)");
}

#[test]
fn a_systemd_mode_init_that_cannot_be_executed_is_a_clear_failure_not_a_panic() {
    // Executable bits but no valid format: execve fails with ENOEXEC in PID 1 itself.
    let dir = tempfile::tempdir().unwrap();
    let tree = busybox_tree(dir.path());
    fs::write(tree.join("sbin/init"), "not a program\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(tree.join("sbin/init"), fs::Permissions::from_mode(0o755)).unwrap();
    let rootfs = dir.path().join("rootfs.img");
    ext4_image(&rootfs, Some(&tree), 64).unwrap();
    let guest = Guest::around(dir, rootfs, json!({ "init_mode": "systemd" }));
    guest
        .boot()
        .expect_failure(ExitReason::Spawn)
        .expect_log("exec /sbin/init: ");
}
