//! `verify-decoder`: see `verify-decoder --help`.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    modelmeter_verify::timings::mark_main();
    // Before libtorch starts: exact CUDA allocator blocks (see cuda_allocator).
    modelmeter_verify::cuda_allocator::prepare();
    modelmeter_verify::app::run(&modelmeter_verify::app::Args::parse())
}
