//! Compiles the C++ shims (the op observer, the allocation observer, the profiler range and
//! the CUDA-backend loader) against the libtorch torch-sys found, and links this
//! crate's tests and examples to libtorch.

fn main() {
    let lib = modelmeter_libtorch_build::link_libtorch();
    let include = lib
        .parent()
        .expect("libtorch lib folder has a parent")
        .join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-changed=csrc/op_observer.cpp");
    println!("cargo:rerun-if-changed=csrc/op_observer.h");
    println!("cargo:rerun-if-changed=csrc/alloc_observer.cpp");
    println!("cargo:rerun-if-changed=csrc/alloc_observer.h");
    println!("cargo:rerun-if-changed=csrc/sequence.h");
    println!("cargo:rerun-if-changed=csrc/ffi_export.h");
    println!("cargo:rerun-if-changed=csrc/profiler_range.cpp");
    println!("cargo:rerun-if-changed=csrc/profiler_range.h");
    println!("cargo:rerun-if-changed=csrc/cuda_backend.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda_backend.h");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // libtorch's headers are system includes, so their warnings stay quiet while the
    // shim's own are on (and errors).
    let system = |dir: &std::path::Path| format!("-isystem{}", dir.display());
    let build = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .warnings(true)
            .extra_warnings(true)
            .warnings_into_errors(true)
            .include("csrc")
            .flag(system(&include))
            .flag(system(&include.join("torch/csrc/api/include")))
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT")
            // libtorch is a release build; at::RecordFunction has a debug-only field, so
            // the shim must see the same layout.
            .define("NDEBUG", None);
        b
    };
    build()
        .file("csrc/op_observer.cpp")
        .file("csrc/alloc_observer.cpp")
        .file("csrc/profiler_range.cpp")
        .compile("modelmeter_op_observer");
    // The CUDA-backend loader is a static initializer that nothing references: linked
    // whole, so that it runs in every binary built on this crate.
    build()
        .link_lib_modifier("+whole-archive")
        .file("csrc/cuda_backend.cpp")
        .compile("modelmeter_cuda_backend");
}
