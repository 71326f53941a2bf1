//! Validates `artifacts.lock` at build time, embeds it, and generates one typed constant per
//! kernel and initrd version, so a host that compiles knows its versions exist in the lock.

#[allow(dead_code)]
#[path = "src/arch.rs"]
mod arch;
#[allow(dead_code)]
#[path = "src/lock.rs"]
mod lock;
#[path = "src/lock_path.rs"]
mod lock_path;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::{env, fs};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=SYSTEM_ARTIFACTS_LOCK");
    let lock_path = lock_path::resolve(
        env::var_os("SYSTEM_ARTIFACTS_LOCK").as_deref(),
        &manifest_dir,
    )
    .unwrap_or_else(|e| fail(&e));
    println!("cargo:rerun-if-changed={}", lock_path.display());

    let text = fs::read_to_string(&lock_path).unwrap_or_else(|e| {
        fail(&format!(
            "cannot read {}: {e}; set SYSTEM_ARTIFACTS_LOCK to the lock this build should embed",
            lock_path.display()
        ))
    });
    let lock = lock::Lock::parse(&text)
        .unwrap_or_else(|e| fail(&format!("{} is invalid: {e}", lock_path.display())));

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    fs::write(out_dir.join("artifacts.lock"), &text).unwrap();
    // Only for messages: which lock the store's copy is compared with, and which is newer.
    let modified = fs::metadata(&lock_path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let mut code = generate(&lock);
    let _ = writeln!(
        code,
        "/// The lock file this crate was built from (the resolved path).\n\
         pub const EMBEDDED_LOCK_PATH: &str = {:?};\n\
         /// Its modification time when this crate was built, in seconds since the epoch.\n\
         pub const EMBEDDED_LOCK_MODIFIED: Option<u64> = {modified:?};",
        lock_path.display().to_string()
    );
    fs::write(out_dir.join("versions.rs"), code).unwrap();
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

fn generate(lock: &lock::Lock) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "/// The lock this crate was built with, verbatim.\n\
         pub const EMBEDDED_LOCK: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/artifacts.lock\"));\n"
    );
    let kernels: Vec<&str> = lock.kernels.keys().map(|v| v.as_str()).collect();
    let initrds: Vec<&str> = lock.initrds.keys().map(|v| v.as_str()).collect();
    constants(
        &mut out,
        lock::KERNEL_PREFIX,
        "KernelVersion",
        "kernel",
        &kernels,
    );
    constants(
        &mut out,
        lock::INITRD_PREFIX,
        "InitrdVersion",
        "initrd",
        &initrds,
    );
    let _ = writeln!(
        out,
        "/// The kernel a host boots unless told otherwise (`defaults.kernel`).\n\
         pub const DEFAULT_KERNEL: KernelVersion = KernelVersion::from_static({:?});\n\
         /// The initrd a host boots unless told otherwise (`defaults.initrd`).\n\
         pub const DEFAULT_INITRD: InitrdVersion = InitrdVersion::from_static({:?});",
        lock.defaults.kernel.as_str(),
        lock.defaults.initrd.as_str()
    );
    out
}

fn constants(out: &mut String, prefix: &str, ty: &str, what: &str, versions: &[&str]) {
    let mut idents = BTreeMap::new();
    for version in versions {
        let ident = lock::constant_name(prefix, version);
        // Lock::parse refused versions whose constants collide.
        idents.insert(ident.clone(), *version);
        let _ = writeln!(
            out,
            "/// {what} `{version}`, pinned in artifacts.lock.\n\
             pub const {ident}: {ty} = {ty}::from_static({version:?});"
        );
    }
    let list: Vec<&str> = idents.keys().map(String::as_str).collect();
    let _ = writeln!(
        out,
        "/// Every {what} version in artifacts.lock.\npub const {prefix}S: &[{ty}] = &[{}];\n",
        list.join(", ")
    );
}
