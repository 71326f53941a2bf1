//! `modules.dep` resolution: any `modules.dep`, `modules.builtin` and module names give an error
//! or a load order, never a panic, and a load order holds each module once, only paths inside
//! the modules directory, every module after its dependencies.
//!
//! The input is `modules.dep`, then a line `--builtin--` and `modules.builtin`, then a line
//! `--names--` and the wanted names, one per line (missing parts are empty).
#![no_main]

use std::collections::{HashMap, HashSet};

use libfuzzer_sys::fuzz_target;
use xtask::initrd::modules_dir::resolve;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (dep, rest) = text.split_once("\n--builtin--\n").unwrap_or((text, ""));
    let (builtin, names) = rest.split_once("\n--names--\n").unwrap_or((rest, ""));
    let names: Vec<String> = names.lines().map(str::to_owned).collect();
    let Ok(order) = resolve(dep, builtin, &names) else {
        return;
    };
    // What modules.dep says each module needs (its last line for a module wins, as in resolve).
    let mut needs: HashMap<&str, Vec<&str>> = HashMap::new();
    for line in dep.lines() {
        if let Some((module, deps)) = line.split_once(':') {
            needs.insert(module.trim(), deps.split_whitespace().collect());
        }
    }
    let mut loaded = HashSet::new();
    for module in &order {
        assert!(
            !module.starts_with('/') && !module.split('/').any(|c| c == ".."),
            "{module:?} leaves the modules directory"
        );
        let deps = needs
            .get(module.as_str())
            .unwrap_or_else(|| panic!("{module:?} has no line in modules.dep"));
        for dep in deps {
            assert!(
                loaded.contains(dep),
                "{module} loads before its dependency {dep}"
            );
        }
        assert!(loaded.insert(module.as_str()), "{module} is loaded twice");
    }
});
