//! The static-ELF check of guest-init binaries: any bytes give an answer, never a panic, and a
//! file is never static for both architectures.
#![no_main]

use libfuzzer_sys::fuzz_target;
use system::Arch;
use xtask::initrd::guest_init::check_static_elf;

fuzz_target!(|data: &[u8]| {
    let x86 = check_static_elf(data, Arch::X86_64);
    let arm = check_static_elf(data, Arch::Aarch64);
    assert!(
        x86.is_err() || arm.is_err(),
        "one ELF machine, two architectures"
    );
    for result in [x86, arm] {
        if let Err(e) = result {
            let _ = format!("{e:#}");
        }
    }
});
