//! Links `verify-decoder` and the tests to libtorch (CUDA included), with an rpath.

fn main() {
    modelmeter_libtorch_build::link_libtorch();
}
