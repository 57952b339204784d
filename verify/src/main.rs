//! `verify-decoder`: see `verify-decoder --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    modelmeter_verify::timings::mark_main();
    // Before libtorch starts: exact CUDA allocator blocks (see cuda_allocator).
    modelmeter_verify::cuda_allocator::prepare();
    let args: modelmeter_verify::app::Args = modelmeter::cli::parse_args("verify-decoder");
    modelmeter_verify::app::run(&args)
}
