//! `cargo xtask`: everything beyond cargo. See `cargo xtask --help`.

mod bench;
mod cmd;
mod demo;
mod deps;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Slipway's main job on its embedded default: a coordinator in files mode on
    /// examples/hosts provisions every host there, printing the host table as it goes.
    Demo,
    /// Measure a benchmark beside its reference (dd, qemu-img, sha256sum, IPA where installed);
    /// prints the figures and writes target/bench/NAME.json.
    Bench {
        name: String,
        /// Repetitions per figure; medians are reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Data size where the benchmark has one (image: 4G by default; e.g. --size 1G for a
        /// quick run).
        #[arg(long)]
        size: Option<String>,
    },
    /// Install the system packages the tests need (when missing, as root), then run every test.
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo => deps::ensure(deps::TEST_TOOLS).and_then(|()| demo::run(&root())),
        Command::Bench { name, runs, size } => bench::run(&root(), &name, runs, size),
        Command::Test { args } => deps::ensure(deps::TEST_TOOLS).and_then(|()| {
            let mut a = vec!["test", "--workspace"];
            a.extend(args.iter().map(String::as_str));
            cmd::run("cargo", &a, Some(&root()))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
