//! Links `verify-decoder` and the tests to libtorch, with an rpath (the CUDA backend is
//! loaded at start-up where there is a driver: modelmeter_reference::cuda_backend).

fn main() {
    modelmeter_libtorch_build::link_libtorch();
}
