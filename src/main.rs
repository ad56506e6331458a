//! The `s2s-authz` binary: parse the command line and hand over to the library.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    s2s_authz::cli::run(s2s_authz::cli::Cli::parse())
}
