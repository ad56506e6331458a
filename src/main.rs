//! The `s2s-authz` binary: parse the command line and hand over to the library.

use clap::Parser;
use std::process::ExitCode;

/// jemalloc, not the system allocator. A decision allocates and frees many small objects on whichever
/// runtime thread serves it (parsed claims, protobuf strings); glibc's allocator spends its slow paths
/// and arena consolidation on that, and keeps what a burst took. Measured in the same run against the
/// glibc build (benches/README.md): server CPU per hot Check 1.23x the no-op's instead of 1.32x, and a
/// cold Check 48 µs over the no-op instead of 68 µs.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    s2s_authz::cli::run(s2s_authz::cli::Cli::parse())
}
