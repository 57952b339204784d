//! Fails early, with the command to run, when libtorch has not been set up.
//!
//! This build script has no dependencies, so cargo runs it long before torch-sys has
//! finished compiling its own; a missing libtorch therefore reports this message first
//! instead of a C++ compiler error from torch-sys.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(dir) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        fail("LIBTORCH is not set (the repository's .cargo/config.toml sets it to .venv/libtorch)");
    };
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("version.py").display()
    );
    let lib = dir.join("lib");
    if !lib.join("libtorch_cpu.so").exists() && !lib.join("libtorch_cpu.dylib").exists() {
        fail(&format!("no libtorch at {}", dir.display()));
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("version.py")) {
        let version = text
            .lines()
            .find_map(|l| l.strip_prefix("__version__ = "))
            .map(|v| v.trim_matches(['\'', '"', ' ']).to_string())
            .unwrap_or_default();
        if !version.starts_with("2.11.0") {
            fail(&format!(
                "libtorch at {} is {version}; tch 0.24 needs 2.11.0",
                dir.display()
            ));
        }
    }
}

fn fail(reason: &str) -> ! {
    eprintln!(
        "\nerror: {reason}.\n\
         Run `scripts/setup-libtorch` from the repository root (it installs PyPI torch==2.11.0 \
         into .venv/, about 5 GB once), then build again.\n"
    );
    std::process::exit(1);
}
