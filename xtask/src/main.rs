//! `cargo xtask`: everything beyond cargo. See `cargo xtask --help`.

mod bench;
mod cmd;
mod demo;
mod deps;
mod kube;
mod ramdisk;
mod testimage;

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
    /// examples/hosts, two QEMU machines that PXE-boot the ramdisk, are inspected, provisioned
    /// and boot their new disk; prints the host table as it goes and a summary.
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
    /// Build the ramdisk (static agent, Debian kernel, modules, initramfs, ISO template) from
    /// ramdisk/recipe.toml into target/ramdisk/out.
    Ramdisk,
    /// Build the small bootable OS image the VM tests and the demo provision.
    TestImage,
    /// Build kube-apiserver 1.20.2 from Debian's source package into
    /// $SLIPWAY_CACHE/kube-apiserver-1.20.2 (default $HOME/.cache/slipway) unless it is there,
    /// installing the packages it needs (as root); prints the binary's path.
    KubeApiserver,
    /// Install the system packages the tests need (when missing, as root), build the ramdisk,
    /// the test image and (unless KUBECONFIG names a cluster to use) kube-apiserver, then run
    /// every test.
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

/// Packages for booting VMs (QEMU with iPXE ROMs), and the ramdisk's.
fn vm_deps() -> anyhow::Result<()> {
    deps::ensure(deps::TEST_TOOLS)?;
    deps::ensure(deps::VM_TOOLS)?;
    deps::ensure_packages(deps::VM_PACKAGES)?;
    ramdisk_deps()
}

/// Packages for the ramdisk and the test image.
fn ramdisk_deps() -> anyhow::Result<()> {
    deps::ensure(ramdisk::TOOLS)?;
    deps::ensure(testimage::TOOLS)?;
    deps::ensure_packages(ramdisk::PACKAGES)?;
    deps::ensure_packages(testimage::PACKAGES)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo => vm_deps().and_then(|()| demo::run(&root())),
        Command::Ramdisk => ramdisk_deps()
            .and_then(|()| ramdisk::build(&root()))
            .map(drop),
        Command::TestImage => ramdisk_deps()
            .and_then(|()| testimage::build(&root()))
            .map(drop),
        Command::KubeApiserver => kube::build(&root()).map(|bin| println!("{}", bin.display())),
        Command::Bench { name, runs, size } => bench::run(&root(), &name, runs, size),
        Command::Test { args } => vm_deps().and_then(|()| {
            deps::ensure(deps::VM_TEST_TOOLS)?;
            // The VM tests boot the real ramdisk and provision the test image.
            ramdisk::build(&root())?;
            testimage::build(&root())?;
            // The Kubernetes-mode tests start their own API server, unless KUBECONFIG names an
            // existing cluster for them.
            let apiserver = match std::env::var_os("KUBECONFIG") {
                Some(k) if !k.is_empty() => None,
                _ => Some(kube::build(&root())?),
            };
            let env: Vec<(&str, &std::ffi::OsStr)> = apiserver
                .iter()
                .map(|bin| ("SLIPWAY_KUBE_APISERVER", bin.as_os_str()))
                .collect();
            let mut a = vec!["test", "--workspace"];
            a.extend(args.iter().map(String::as_str));
            cmd::run_env("cargo", &a, Some(&root()), &env)
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
