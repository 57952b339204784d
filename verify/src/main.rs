//! `verify-decoder`: see `verify-decoder --help`.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    modelmeter_verify::app::run(&modelmeter_verify::app::Args::parse())
}
