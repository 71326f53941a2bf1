//! One kernel's modules directory (`lib/modules/<kver>`, or a root that contains exactly one):
//! `modules.dep` and `modules.builtin` parsed into a dependency graph, names resolved to module
//! files dependencies first, and module files read decompressed. `modules.rs` (the always-loaded
//! list) and `groups.rs` (drivers on demand) both build on it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::compression::Compression;

/// One kernel's modules: its release name and the directory that holds `modules.dep`.
#[derive(Debug, Clone)]
pub struct ModulesDir {
    pub kver: String,
    pub root: PathBuf,
}

impl ModulesDir {
    /// `dir` is `lib/modules/<kver>` itself, or a root with exactly one `lib/modules/<kver>`.
    pub fn locate(dir: &Path) -> anyhow::Result<ModulesDir> {
        if dir.join("modules.dep").is_file() {
            let kver = dir
                .canonicalize()
                .with_context(|| format!("resolving {}", dir.display()))?
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned)
                .with_context(|| format!("{} has no usable kernel release name", dir.display()))?;
            return Ok(ModulesDir {
                kver,
                root: dir.to_path_buf(),
            });
        }
        let parent = dir.join("lib/modules");
        let mut kvers: Vec<String> = match fs::read_dir(&parent) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter(|e| e.path().join("modules.dep").is_file())
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect(),
            Err(_) => Vec::new(),
        };
        kvers.sort();
        match kvers.as_slice() {
            [kver] => Ok(ModulesDir {
                kver: kver.clone(),
                root: parent.join(kver),
            }),
            [] => bail!(
                "--modules-dir {}: no modules.dep there nor in lib/modules/<kver>/ below it; \
                 pass a kernel's module directory like /lib/modules/$(uname -r) (run `depmod` \
                 first if modules.dep is missing)",
                dir.display()
            ),
            several => bail!(
                "--modules-dir {}: holds modules for several kernels ({}); pass one of them, \
                 e.g. {}",
                dir.display(),
                several.join(", "),
                parent.join(&several[0]).display()
            ),
        }
    }
}

/// A module as it goes into the initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Path relative to `/`, e.g. `lib/modules/6.1.0-56-cloud-amd64/kernel/fs/overlayfs/overlay.ko`.
    pub path: String,
    /// Decompressed content.
    pub data: Vec<u8>,
}

/// Reads one module file (relative to the modules directory), decompressed.
pub(super) fn read_module(dir: &ModulesDir, relative: &str) -> anyhow::Result<Module> {
    let source = dir.root.join(relative);
    let raw = fs::read(&source).with_context(|| format!("reading module {}", source.display()))?;
    let data = decompress(relative, &raw)
        .with_context(|| format!("decompressing module {}", source.display()))?;
    Ok(Module {
        path: format!("lib/modules/{}/{}", dir.kver, plain_name(relative)),
        data,
    })
}

/// The name the kernel knows a module file by: `kernel/fs/fuse/cuse.ko.xz` is `cuse`, and `-`
/// and `_` are the same.
pub(super) fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The path without its compression suffix: `a/b.ko.zst` becomes `a/b.ko`.
fn plain_name(path: &str) -> &str {
    match path.rfind(".ko") {
        Some(i) => &path[..i + 3],
        None => path,
    }
}

/// The module files to load for `names`, relative to the modules directory, dependencies first
/// and each once. Built-in modules are skipped; a name that is neither is an error naming it.
pub fn resolve(
    modules_dep: &str,
    modules_builtin: &str,
    names: &[String],
) -> anyhow::Result<Vec<String>> {
    DepGraph::parse(modules_dep, modules_builtin)?.closure(names, &mut HashSet::new())
}

/// `modules.dep` and `modules.builtin`, parsed.
pub struct DepGraph {
    /// Module file to the files it needs, as modules.dep lists them.
    deps: HashMap<String, Vec<String>>,
    /// Module name (`virtio_blk`) to its file.
    by_name: BTreeMap<String, String>,
    builtin: HashSet<String>,
}

impl DepGraph {
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> anyhow::Result<DepGraph> {
        let mut deps: HashMap<String, Vec<String>> = HashMap::new();
        let mut by_name: BTreeMap<String, String> = BTreeMap::new();
        for (index, line) in modules_dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((module, rest)) = line.split_once(':') else {
                bail!("modules.dep:{}: {line:?} has no `:`", index + 1);
            };
            let module = module.trim().to_owned();
            if module.starts_with('/') || module.split('/').any(|c| c == "..") {
                bail!(
                    "modules.dep:{}: {module:?} is not a path inside the modules directory; \
                     regenerate it with `depmod`",
                    index + 1
                );
            }
            by_name.insert(module_name(&module), module.clone());
            deps.insert(module, rest.split_whitespace().map(str::to_owned).collect());
        }
        let builtin = modules_builtin.lines().map(module_name).collect();
        Ok(DepGraph {
            deps,
            by_name,
            builtin,
        })
    }

    /// The files `names` need that are not in `done` yet, dependencies first; adds them to
    /// `done`. Starting from another list's `done` leaves out what that list already loads.
    pub fn closure(
        &self,
        names: &[String],
        done: &mut HashSet<String>,
    ) -> anyhow::Result<Vec<String>> {
        let mut order = Vec::new();
        for name in names {
            let wanted = module_name(name.trim());
            let Some(path) = self.by_name.get(&wanted) else {
                if self.builtin.contains(&wanted) {
                    continue;
                }
                bail!(
                    "kernel module `{name}` is not in modules.dep (nor built in); check the name \
                     (`modinfo {name}`) and that the modules directory belongs to the kernel you boot"
                );
            };
            visit(path, &self.deps, done, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }
}

/// Depth-first: a module's dependencies (in the reverse of the order modules.dep lists them,
/// as modprobe loads them) before the module itself.
fn visit(
    module: &str,
    deps: &HashMap<String, Vec<String>>,
    done: &mut HashSet<String>,
    stack: &mut Vec<String>,
    order: &mut Vec<String>,
) -> anyhow::Result<()> {
    if done.contains(module) {
        return Ok(());
    }
    if stack.iter().any(|m| m == module) {
        bail!(
            "modules.dep has a dependency cycle: {} -> {module}",
            stack.join(" -> ")
        );
    }
    let Some(needs) = deps.get(module) else {
        bail!(
            "modules.dep names {module} as a dependency of {} but has no line for it; \
             regenerate it with `depmod`",
            stack.last().map_or("?", String::as_str)
        );
    };
    stack.push(module.to_owned());
    for dep in needs.iter().rev() {
        visit(dep, deps, done, stack, order)?;
    }
    stack.pop();
    done.insert(module.to_owned());
    order.push(module.to_owned());
    Ok(())
}

/// What follows the last `.ko` of a module path: `""`, `.xz`, `.zst`, `.gz`, or anything else.
fn suffix_after_ko(path: &str) -> Option<&str> {
    path.rfind(".ko").map(|at| &path[at + ".ko".len()..])
}

/// Decompresses a module file by its suffix: `.ko` as is, `.ko.xz`, `.ko.zst`, `.ko.gz`.
pub fn decompress(path: &str, raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let Some(compression) = suffix_after_ko(path).and_then(Compression::from_suffix) else {
        bail!("{path}: unknown module file type; expected .ko, .ko.xz, .ko.zst or .ko.gz");
    };
    compression
        .decode_all(raw)
        .with_context(|| format!("{path}: decoding {compression}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/overlayfs/overlay.ko.zst:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko.gz:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko.gz kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";

    pub(crate) fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn dependencies_come_first_each_once_in_modprobe_order() {
        let order = resolve(DEP, "", &names(&["virtio_blk", "virtio-pci", "virtio_blk"])).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz",
                "kernel/drivers/virtio/virtio_pci_legacy_dev.ko.gz",
                "kernel/drivers/virtio/virtio_pci.ko",
            ]
        );
    }

    #[test]
    fn the_vm_boot_order_from_design_comes_out() {
        let wanted = names(&["virtio_pci", "virtio_blk", "overlay"]);
        let order = resolve(DEP, "", &wanted).unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "virtio_blk",
                "overlay"
            ]
        );
    }

    #[test]
    fn a_missing_module_is_named_and_builtins_are_skipped() {
        let err = resolve(DEP, "", &names(&["virtio_blk", "nvidia"])).unwrap_err();
        assert!(err.to_string().contains("`nvidia`"), "{err}");
        let order = resolve(DEP, "kernel/fs/ext4/ext4.ko\n", &names(&["ext4"])).unwrap();
        assert!(order.is_empty());
    }

    #[test]
    fn broken_dependency_data_is_reported() {
        let err = resolve("a.ko: b.ko\nb.ko: a.ko\n", "", &names(&["a"])).unwrap_err();
        assert!(
            err.to_string().contains("cycle: a.ko -> b.ko -> a.ko"),
            "{err}"
        );
        let err = resolve("a.ko: gone.ko\n", "", &names(&["a"])).unwrap_err();
        assert!(err.to_string().contains("gone.ko"), "{err}");
        assert!(resolve("../x.ko:\n", "", &names(&["x"])).is_err());
    }

    /// A modules directory with every compression, as a test fixture.
    pub(crate) fn fixture(root: &Path) -> ModulesDir {
        let kver = root.join("lib/modules/6.1.0-test");
        let write = |rel: &str, bytes: Vec<u8>| {
            let path = kver.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, bytes).unwrap();
        };
        let content = |name: &str| format!("\x7fELF module {name}").into_bytes();
        for line in DEP.lines() {
            let path = line.split(':').next().unwrap();
            let plain = content(&module_name(path));
            let suffix = suffix_after_ko(path).unwrap();
            let bytes = Compression::from_suffix(suffix).unwrap().encode(&plain);
            write(path, bytes);
        }
        write("modules.dep", DEP.as_bytes().to_vec());
        ModulesDir::locate(root).unwrap()
    }

    #[test]
    fn a_dir_without_modules_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let err = ModulesDir::locate(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no modules.dep"), "{err}");
    }

    #[test]
    fn unknown_or_broken_module_files_are_named() {
        let err = decompress("kernel/a.ko.bz2", b"BZh").unwrap_err();
        assert!(
            err.to_string().contains("unknown module file type"),
            "{err}"
        );
        let err = decompress("kernel/a.ko.xz", b"\x7fELF not xz").unwrap_err();
        assert!(
            format!("{err:#}").contains("kernel/a.ko.xz: decoding xz"),
            "{err:#}"
        );
        let plain = b"\x7fELF module".to_vec();
        let mut two_members = Compression::Gzip.encode(&plain[..4]);
        two_members.extend(Compression::Gzip.encode(&plain[4..]));
        assert_eq!(decompress("a.ko.gz", &two_members).unwrap(), plain);
        assert_eq!(decompress("a.ko", &plain).unwrap(), plain);
    }
}
