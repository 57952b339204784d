//! `verify-decoder`: see `verify-decoder --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    modelmeter_verify::timings::mark_main();
    // Before libtorch starts: exact CUDA allocator blocks (see cuda_allocator).
    modelmeter_verify::cuda_allocator::prepare();
    // Before the run allocates: large CPU tensors reused from glibc's heap.
    modelmeter_reference::host_memory::reuse_freed_blocks();
    let args: modelmeter_verify::app::Args = modelmeter::cli::parse_args("verify-decoder");
    let status = modelmeter_verify::app::run(&args);
    // Every result is written: libtorch's teardown would only cost time (see process_exit).
    modelmeter_verify::process_exit::finish(status)
}
