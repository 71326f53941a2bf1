//! Parsing `artifacts.lock`: every rejection names the JSON path and what is allowed.

use system::{Arch, Lock};

const KERNEL_SHA: &str = "9d3570b47d5abb069ca00edfbfcef4c68306a9c3d078a01f10082b258f1001b8";

fn lock_with(kernels: &str, defaults: &str) -> String {
    format!(
        r#"{{ "schema": 1, "defaults": {defaults}, "kernels": {kernels},
              "initrds": {{ "v1.0.0": {{ "outputs": {{}} }} }} }}"#
    )
}

fn kernel(arch: &str, sha: &str) -> String {
    format!(r#"{{ "{arch}": {{ "url": "https://example.invalid/k", "sha256": "{sha}" }} }}"#)
}

/// The `kernels` object with the default version alone, for `arch` pinned to `sha`.
fn kernels_with(arch: &str, sha: &str) -> String {
    format!(
        r#"{{ "ch-release-v6.16.9-20260508": {} }}"#,
        kernel(arch, sha)
    )
}

const DEFAULTS: &str = r#"{ "kernel": "ch-release-v6.16.9-20260508", "initrd": "v1.0.0" }"#;

fn error_of(text: &str) -> (String, String) {
    let err = Lock::parse(text).unwrap_err();
    let display = err.to_string();
    assert!(display.contains(&format!("`{}`", err.path)), "{display}");
    (err.path, err.message)
}

#[test]
fn the_committed_lock_is_valid_and_in_canonical_form() {
    let text = include_str!("../../artifacts.lock");
    let lock = Lock::parse(text).unwrap();
    let default = &lock.kernels[lock.defaults.kernel.as_str()];
    assert_eq!(default[&Arch::X86_64].sha256.hex(), KERNEL_SHA);
    assert_eq!(
        lock.to_json(),
        text,
        "artifacts.lock is not in the form the tools write"
    );
    assert_eq!(system::embedded_lock(), &lock);
}

#[test]
fn a_good_lock_round_trips() {
    let text = lock_with(&kernels_with("x86_64", KERNEL_SHA), DEFAULTS);
    let lock = Lock::parse(&text).unwrap();
    assert_eq!(Lock::parse(&lock.to_json()).unwrap(), lock);
}

#[test]
fn an_unknown_schema_is_refused_before_anything_else() {
    let (path, message) = error_of(r#"{ "schema": 2, "whatever": true }"#);
    assert_eq!(path, "schema");
    assert!(
        message.contains("unsupported schema 2") && message.contains("schema 1"),
        "{message}"
    );
    let (path, _) = error_of(r#"{ "defaults": {} }"#);
    assert_eq!(path, "schema");
}

#[test]
fn a_malformed_digest_names_its_path() {
    let text = lock_with(&kernels_with("x86_64", "ABCD"), DEFAULTS);
    let (path, message) = error_of(&text);
    assert_eq!(
        path,
        r#"kernels."ch-release-v6.16.9-20260508".x86_64.sha256"#
    );
    assert!(message.contains("64 lowercase hex digits"), "{message}");

    let text = lock_with(
        &kernels_with("x86_64", KERNEL_SHA),
        DEFAULTS,
    )
    .replace(
        r#""initrds""#,
        r#""bases": { "alpine": { "reference": "alpine:3.22", "index": "md5:00", "manifests": {} } }, "initrds""#,
    );
    let (path, message) = error_of(&text);
    assert_eq!(path, "bases.alpine.index");
    assert!(message.contains("`sha256:`"), "{message}");
}

#[test]
fn an_empty_version_is_refused() {
    let text = lock_with(
        &format!(r#"{{ "": {} }}"#, kernel("x86_64", KERNEL_SHA)),
        DEFAULTS,
    );
    let (path, message) = error_of(&text);
    assert_eq!(path, "kernels");
    assert!(message.contains("empty version"), "{message}");
}

#[test]
fn a_duplicate_version_is_refused() {
    let entry = kernel("x86_64", KERNEL_SHA);
    let text = lock_with(
        &format!(
            r#"{{ "ch-release-v6.16.9-20260508": {entry}, "ch-release-v6.16.9-20260508": {entry} }}"#
        ),
        DEFAULTS,
    );
    let (path, message) = error_of(&text);
    assert_eq!(path, "kernels");
    assert!(
        message.contains("duplicate key `ch-release-v6.16.9-20260508`"),
        "{message}"
    );
}

#[test]
fn an_unknown_arch_is_refused() {
    let text = lock_with(&kernels_with("riscv64", KERNEL_SHA), DEFAULTS);
    let (path, message) = error_of(&text);
    assert_eq!(path, r#"kernels."ch-release-v6.16.9-20260508""#);
    assert!(
        message.contains("riscv64") && message.contains("x86_64"),
        "{message}"
    );
}

#[test]
fn a_default_must_name_an_entry() {
    let kernels = kernels_with("x86_64", KERNEL_SHA);
    let (path, message) = error_of(&lock_with(
        &kernels,
        r#"{ "kernel": "ch-v9", "initrd": "v1.0.0" }"#,
    ));
    assert_eq!(path, "defaults.kernel");
    assert!(message.contains("`ch-v9`") && message.contains("`ch-release-v6.16.9-20260508`"));
    let (path, _) = error_of(&lock_with(
        &kernels,
        r#"{ "kernel": "ch-release-v6.16.9-20260508", "initrd": "v9" }"#,
    ));
    assert_eq!(path, "defaults.initrd");
}

#[test]
fn an_initrd_base_must_name_a_base() {
    let kernels = kernels_with("x86_64", KERNEL_SHA);
    let text = lock_with(&kernels, DEFAULTS).replace(
        r#"{ "outputs": {} }"#,
        r#"{ "base": "debian", "outputs": {} }"#,
    );
    let (path, message) = error_of(&text);
    assert_eq!(path, r#"initrds."v1.0.0".base"#);
    assert!(message.contains("`debian`"), "{message}");
}

#[test]
fn a_version_cannot_climb_out_of_the_store() {
    let text = lock_with(
        &format!(r#"{{ "..": {} }}"#, kernel("x86_64", KERNEL_SHA)),
        DEFAULTS,
    );
    assert!(error_of(&text).1.contains("not a usable directory name"));
    let text = lock_with(
        &format!(r#"{{ "a/b": {} }}"#, kernel("x86_64", KERNEL_SHA)),
        DEFAULTS,
    );
    assert!(error_of(&text).1.contains("'/'"));
}

#[test]
fn unknown_fields_are_typos() {
    let text = lock_with(
        r#"{ "ch-release-v6.16.9-20260508": { "x86_64": { "url": "https://e.invalid/k", "sha265": "x" } } }"#,
        DEFAULTS,
    );
    let (path, message) = error_of(&text);
    assert_eq!(
        path,
        r#"kernels."ch-release-v6.16.9-20260508".x86_64.sha265"#
    );
    assert!(message.contains("unknown field `sha265`"), "{message}");
}

#[test]
fn generated_constants_match_the_lock() {
    assert_eq!(
        system::DEFAULT_KERNEL.as_str(),
        system::embedded_lock().defaults.kernel.as_str()
    );
    assert_eq!(
        system::KERNEL_CH_RELEASE_V6_16_9_20260508.as_str(),
        "ch-release-v6.16.9-20260508"
    );
    assert_eq!(system::KERNELS.len(), system::embedded_lock().kernels.len());
    assert_eq!(system::INITRDS.len(), system::embedded_lock().initrds.len());
    assert_eq!(system::DEFAULT_INITRD, system::INITRD_V1_1_0);
    // The previous default is kept, for hosts whose running instances use it.
    assert_eq!(system::INITRD_V1_0_0.as_str(), "v1.0.0");
    let lock = system::embedded_lock();
    assert!(
        lock.initrds["v1.1.0"].agent,
        "v1.1.0 carries the guest agent"
    );
    assert!(!lock.initrds["v1.0.0"].agent, "v1.0.0 stays as it was");
}

#[test]
fn the_agent_flag_defaults_to_false_and_is_written_only_when_set() {
    let kernels = format!(
        r#"{{ "ch-release-v6.16.9-20260508": {} }}"#,
        kernel("x86_64", KERNEL_SHA)
    );
    // A lock written before the field: no agent, and written back without the field.
    let old = Lock::parse(&lock_with(&kernels, DEFAULTS)).unwrap();
    assert!(!old.initrds["v1.0.0"].agent);
    assert!(!old.to_json().contains("agent"));
    let text = lock_with(&kernels, DEFAULTS).replace(
        r#"{ "outputs": {} }"#,
        r#"{ "agent": true, "outputs": {} }"#,
    );
    let lock = Lock::parse(&text).unwrap();
    assert!(lock.initrds["v1.0.0"].agent);
    assert!(lock.to_json().contains(r#""agent": true"#));
    assert_eq!(Lock::parse(&lock.to_json()).unwrap(), lock);
    let (path, message) = error_of(&text.replace("true", r#""yes""#));
    assert_eq!(path, r#"initrds."v1.0.0".agent"#);
    assert!(message.contains("boolean"), "{message}");
}

#[test]
fn versions_whose_constants_collide_are_refused_naming_both() {
    let text = lock_with(
        &format!(
            r#"{{ "ch-release-v6.16.9-20260508": {k}, "ch-release-v6.16.9_20260508": {k} }}"#,
            k = kernel("x86_64", KERNEL_SHA)
        ),
        DEFAULTS,
    );
    let (path, message) = error_of(&text);
    assert_eq!(path, r#"kernels."ch-release-v6.16.9_20260508""#);
    for needle in [
        "`ch-release-v6.16.9-20260508`",
        "`ch-release-v6.16.9_20260508`",
        "KERNEL_CH_RELEASE_V6_16_9_20260508",
    ] {
        assert!(message.contains(needle), "missing {needle} in: {message}");
    }

    // Initrds too, and case alone does not tell two names apart.
    let text = r#"{ "schema": 1,
        "defaults": { "kernel": "k", "initrd": "v1" },
        "kernels": { "k": { "x86_64": { "url": "https://example.invalid/k",
            "sha256": "9d3570b47d5abb069ca00edfbfcef4c68306a9c3d078a01f10082b258f1001b8" } } },
        "initrds": { "V1": { "outputs": {} }, "v1": { "outputs": {} } } }"#;
    let (path, message) = error_of(text);
    assert_eq!(path, "initrds.v1");
    assert!(message.contains("INITRD_V1"), "{message}");
}

#[test]
fn a_new_kernel_is_checked_against_the_constants_of_the_others() {
    let lock = Lock::parse(include_str!("../../artifacts.lock")).unwrap();
    let clash = system::lock::Version::new("ch-release-v6.16.9_20260508").unwrap();
    let err = lock.check_new_kernel(&clash).unwrap_err().to_string();
    assert!(
        err.contains("`ch-release-v6.16.9-20260508` and `ch-release-v6.16.9_20260508`"),
        "{err}"
    );
    let same = system::lock::Version::new("ch-release-v6.16.9-20260508").unwrap();
    lock.check_new_kernel(&same).unwrap();
    let other = system::lock::Version::new("ch-release-v6.17.0-20260601").unwrap();
    lock.check_new_kernel(&other).unwrap();
}

fn lock_with_groups(groups: &str) -> String {
    let kernels = kernels_with("x86_64", KERNEL_SHA);
    lock_with(&kernels, DEFAULTS).replace(
        r#"{ "outputs": {} }"#,
        &format!(r#"{{ "modules": ["virtio_pci"], "module_groups": {groups}, "outputs": {{}} }}"#),
    )
}

#[test]
fn module_groups_round_trip_and_are_left_out_when_empty() {
    let text = lock_with_groups(
        r#"{ "gpu": { "pci": ["10de::03"], "modules": ["nvidia", "nvidia_uvm"],
                      "firmware": ["nvidia/570.86.15"] },
             "rng": { "pci": ["1af4:1005"], "modules": ["virtio_rng"] } }"#,
    );
    let lock = Lock::parse(&text).unwrap();
    let initrd = &lock.initrds["v1.0.0"];
    assert_eq!(initrd.module_groups["gpu"].firmware, ["nvidia/570.86.15"]);
    assert!(initrd.module_groups["rng"].firmware.is_empty());
    let json = lock.to_json();
    assert_eq!(Lock::parse(&json).unwrap(), lock);
    assert!(!json.contains(r#""firmware": []"#), "{json}");
    // A lock without groups writes no `module_groups` key: old locks stay byte for byte.
    let plain = Lock::parse(&lock_with_groups("{}")).unwrap();
    assert!(!plain.to_json().contains("module_groups"));
}

#[test]
fn module_groups_need_patterns_modules_and_plain_firmware_paths() {
    let (path, message) = error_of(&lock_with_groups(
        r#"{ "gpu": { "pci": [], "modules": ["nvidia"] } }"#,
    ));
    assert_eq!(path, r#"initrds."v1.0.0".module_groups.gpu.pci"#);
    assert!(message.contains("10de::03"), "{message}");
    let (path, _) = error_of(&lock_with_groups(
        r#"{ "gpu": { "pci": ["10de"], "modules": [] } }"#,
    ));
    assert_eq!(path, r#"initrds."v1.0.0".module_groups.gpu.modules"#);
    let (path, message) = error_of(&lock_with_groups(
        r#"{ "gpu": { "pci": ["10de"], "modules": ["nvidia"], "firmware": ["../etc"] } }"#,
    ));
    assert_eq!(path, r#"initrds."v1.0.0".module_groups.gpu.firmware[0]"#);
    assert!(message.contains("`../etc`"), "{message}");
    let (path, message) = error_of(&lock_with_groups(
        r#"{ "gpu": { "pci": ["10de"], "module": ["nvidia"] } }"#,
    ));
    assert!(
        path.starts_with(r#"initrds."v1.0.0".module_groups.gpu"#),
        "{path}"
    );
    assert!(message.contains("unknown field `module`"), "{message}");
}

#[test]
fn a_kernel_url_is_http_or_an_absolute_file_url() {
    let with_url = |url: &str| {
        lock_with(
            &format!(
                r#"{{ "ch-release-v6.16.9-20260508": {{ "x86_64": {{ "url": "{url}", "sha256": "{KERNEL_SHA}" }} }} }}"#
            ),
            DEFAULTS,
        )
    };
    assert!(Lock::parse(&with_url("file:///boot/vmlinuz")).is_ok());
    let (path, message) = error_of(&with_url("file://boot/vmlinuz"));
    assert_eq!(path, r#"kernels."ch-release-v6.16.9-20260508".x86_64.url"#);
    assert!(message.contains("file:///path"), "{message}");
    let (_, message) = error_of(&with_url("ftp://e.invalid/k"));
    assert!(
        message.contains("not an http(s) or file:/// URL"),
        "{message}"
    );
}

#[test]
fn an_initrd_compression_defaults_to_gzip_and_only_known_names_parse() {
    use system::lock::InitrdCompression;
    let kernels = kernels_with("x86_64", KERNEL_SHA);
    // A lock written before the field: gzip, and written back without the field.
    let old = Lock::parse(&lock_with(&kernels, DEFAULTS)).unwrap();
    assert_eq!(old.initrds["v1.0.0"].compression, InitrdCompression::Gzip);
    assert!(!old.to_json().contains("compression"));
    for name in ["zstd", "lz4", "none"] {
        let text = lock_with(&kernels, DEFAULTS).replace(
            r#"{ "outputs": {} }"#,
            &format!(r#"{{ "compression": "{name}", "outputs": {{}} }}"#),
        );
        let lock = Lock::parse(&text).unwrap();
        assert_eq!(lock.initrds["v1.0.0"].compression.as_str(), name);
        assert_eq!(Lock::parse(&lock.to_json()).unwrap(), lock);
    }
    let text = lock_with(&kernels, DEFAULTS).replace(
        r#"{ "outputs": {} }"#,
        r#"{ "compression": "xz", "outputs": {} }"#,
    );
    let (path, message) = error_of(&text);
    assert_eq!(path, r#"initrds."v1.0.0".compression"#);
    assert!(
        message.contains("`xz`") && message.contains("lz4"),
        "{message}"
    );
}

#[test]
fn an_initrd_entry_that_sets_nothing_is_the_default() {
    let lock = Lock::parse(&lock_with(&kernels_with("x86_64", KERNEL_SHA), DEFAULTS)).unwrap();
    assert_eq!(lock.initrds["v1.0.0"], system::lock::Initrd::default());
}
