//! Build-script helpers for the crates that link libtorch (`modelmeter-reference`,
//! `modelmeter-verify`). Call [`link_libtorch`] from a build script of a crate that
//! depends directly on `torch-sys`.

use std::path::PathBuf;

/// The libtorch lib folder torch-sys built against (`DEP_TCH_LIBTORCH_LIB`).
pub fn libtorch_lib() -> PathBuf {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("DEP_TCH_LIBTORCH_LIB is set for crates that depend directly on torch-sys");
    let lib = PathBuf::from(lib);
    lib.canonicalize().unwrap_or(lib)
}

/// Links this crate's binaries and tests to libtorch so that CUDA works where a GPU is
/// present: keeps `libtorch_cuda` although no symbol of it is referenced (the linker's
/// as-needed rule would drop it, and then libtorch sees no CUDA), and records an rpath
/// to the libtorch they were built against. Returns the lib folder.
pub fn link_libtorch() -> PathBuf {
    let lib = libtorch_lib();
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    lib
}
