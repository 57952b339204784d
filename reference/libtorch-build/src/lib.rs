//! Build-script helpers for the crates that link libtorch (`modelmeter-reference`,
//! `modelmeter-verify`). Call [`link_libtorch`] from the build script of a crate that
//! depends directly on `torch-sys`.

use std::path::{Path, PathBuf};

/// What to run when libtorch is missing or wrong.
pub const SETUP_HINT: &str =
    "Run `scripts/setup-libtorch` from the repository root (it installs PyPI \
     torch==2.11.0 into .venv/, about 5 GB once), then build again.";

/// The libtorch lib folder torch-sys built against (`DEP_TCH_LIBTORCH_LIB`).
pub fn libtorch_lib() -> PathBuf {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("DEP_TCH_LIBTORCH_LIB is set for crates that depend directly on torch-sys");
    let lib = PathBuf::from(lib);
    lib.canonicalize().unwrap_or(lib)
}

/// Stops the build with [`SETUP_HINT`] unless the libtorch at `lib`'s parent is 2.11.0.
pub fn check_version(lib: &Path) {
    let version_py = lib.parent().map(|p| p.join("version.py"));
    let Some(text) = version_py
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
    else {
        return; // a libtorch zip has no version.py; torch-sys checked build-version
    };
    println!("cargo:rerun-if-changed={}", version_py.unwrap().display());
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim_matches(['\'', '"', ' ']).to_string())
        .unwrap_or_default();
    if !version.starts_with("2.11.0") {
        eprintln!(
            "\nerror: libtorch at {} is {version}; tch 0.24 needs 2.11.0.\n{SETUP_HINT}\n",
            lib.display()
        );
        std::process::exit(1);
    }
}

/// Links this crate's binaries and tests to libtorch's CPU library and records an rpath
/// to the libtorch they were built against. Returns the lib folder.
///
/// `libtorch_cuda` (and `libtorch`, a shim that needs it) are left to the linker's
/// as-needed rule, which drops them: nothing references their symbols, and a CPU run
/// would pay about 235 MB of resident memory and 0.2 s to load the CUDA libraries they
/// pull in. A run on a GPU loads the backend at run time
/// (`modelmeter_reference::cuda_backend`), from the folder `libtorch_cpu` came from.
pub fn link_libtorch() -> PathBuf {
    let lib = libtorch_lib();
    check_version(&lib);
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    lib
}
