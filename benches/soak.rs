//! The soak, as a documented command: `cargo bench --bench soak` holds the real binary at half its
//! measured capacity for 10 minutes (both configurable) with key rotations and registry edits mid-run,
//! checks every answer, samples RSS, and exits non-zero unless there was no failed call, no wrong answer,
//! RSS stayed within the tolerance and the server stopped cleanly. The harness is tests/soak/mod.rs
//! (shared with the suite's short run, tests/soak_smoke.rs); `-- --help` lists the options.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/soak/mod.rs"]
mod soak;

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "soak",
    about = "Soak s2s-authz: a fraction of its measured capacity for minutes, with key rotations and \
             registry edits, every answer checked, RSS sampled",
    after_help = "Example, the issue's soak: cargo bench --bench soak -- --minutes 10 --load-fraction 0.5"
)]
struct Args {
    /// Length of the steady phase.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Share of the measured capacity sent during the steady phase (open loop).
    #[arg(long, default_value_t = 0.5)]
    load_fraction: f64,
    /// Seconds of the capacity measurement (closed loop, same token mix) before the steady phase.
    #[arg(long, default_value_t = 15)]
    capacity_secs: u64,
    /// Seconds between key rotations.
    #[arg(long, default_value_t = 60)]
    rotate_every: u64,
    /// Seconds between registry edits.
    #[arg(long, default_value_t = 10)]
    edit_every: u64,
    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 5)]
    rss_every: u64,
    /// Allowed RSS drift after the warm-up (the first tenth of the steady phase), as a fraction.
    #[arg(long, default_value_t = 0.10)]
    rss_tolerance: f64,
    /// The product's minimum key refresh interval (how soon a new kid can be fetched).
    #[arg(long, default_value_t = 5)]
    min_key_refresh_secs: u64,
    /// The product's RUST_LOG (its log is read and counted, not stored; errors fail the soak).
    #[arg(long, default_value = "info")]
    log_filter: String,
    /// The `s2s-authz` binary [default: the one cargo built with this bench].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Passed by `cargo bench`; without it (as under `cargo test --benches`) nothing is run.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> std::process::ExitCode {
    // Under `cargo test --all-targets` this target gets no `--bench`: the suite runs the short soak
    // in tests/soak_smoke.rs instead, so nothing is parsed or run here.
    if !std::env::args().any(|a| a == "--bench") {
        println!("soak: nothing run outside `cargo bench --bench soak` (see -- --help)");
        return std::process::ExitCode::SUCCESS;
    }
    let args = Args::parse();
    let defaults = soak::Options::full();
    let options = soak::Options {
        duration: Duration::from_secs_f64(args.minutes * 60.0),
        load_fraction: args.load_fraction,
        capacity_duration: Duration::from_secs(args.capacity_secs),
        rotate_every: Duration::from_secs(args.rotate_every),
        edit_every: Duration::from_secs(args.edit_every),
        rss_every: Duration::from_secs(args.rss_every),
        rss_tolerance: Some(args.rss_tolerance),
        min_key_refresh_secs: args.min_key_refresh_secs,
        log_filter: args.log_filter,
        server_bin: args.server_bin.unwrap_or(defaults.server_bin.clone()),
        ..defaults
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(soak::run(options));
    report.print();
    if report.passed() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
