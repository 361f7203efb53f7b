//! The `slipway-agent` command line. Every layer runs alone, without a coordinator.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::commands::{Context, PowerAction, Runner};
use crate::config::{self, parse_size};
use crate::disk::{self, FileDisk, Hints};
use crate::image::{self, Algo, Format, ImageSpec};
use crate::inventory::{self, Inventory};
use crate::session::{self, End, Refused, Settings};
use crate::sys;
use crate::tls::Fingerprint;

/// The Slipway agent: inspects, cleans and images this machine for a Slipway coordinator, and
/// runs each of those steps alone for operators and tests.
#[derive(Debug, Parser)]
#[command(name = "slipway-agent", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Enrol with the coordinator and carry out its commands. Settings not given as flags are
    /// read from the kernel command line (slipway.coordinator=, slipway.token=, slipway.ca=,
    /// slipway.mac= or BOOTIF=).
    Run(RunArgs),
    /// Print this machine's hardware inventory.
    Inventory {
        #[arg(short, long, value_enum, default_value_t = Output::Json)]
        output: Output,
        /// Read /sys and /proc under this directory instead of the running machine's.
        #[arg(long, default_value = "/", value_name = "DIR")]
        root: PathBuf,
        /// Report only these disks (block devices or plain files).
        #[arg(long = "disk", value_name = "PATH")]
        disks: Vec<PathBuf>,
    },
    /// List the disks and show which one the root device hints choose, and why not the others.
    Disks {
        #[command(flatten)]
        hints: HintArgs,
        #[arg(long = "disk", value_name = "PATH")]
        disks: Vec<PathBuf>,
    },
    /// Stream an image onto DEVICE (a block device or a file), verifying its checksum.
    /// Raw (also gzip, zstd or xz compressed) and qcow2 images, detected by their magic.
    WriteImage {
        url: String,
        device: PathBuf,
        /// The image's hex digest, or the http(s) URL of a checksum file (SHA256SUMS style).
        #[arg(long)]
        checksum: String,
        /// Default: chosen by the digest's length.
        #[arg(long, value_enum)]
        checksum_type: Option<ChecksumArg>,
        /// The declared format, checked against the file's magic (default: accept either).
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// PEM file of CA certificates to trust for https URLs besides the system roots.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// DEVICE is known to read as zeros (new sparse file, or just discarded with a
        /// zeroing guarantee): zero runs are skipped rather than zeroed.
        #[arg(long)]
        target_zeroed: bool,
        /// Retries in a row, without progress, after network errors.
        #[arg(long, default_value_t = 5)]
        retries: u32,
        /// Seconds a stalled connection is waited for before it is resumed.
        #[arg(long, default_value_t = 60)]
        read_timeout: u64,
    },
    /// Wipe partition tables and signatures from DEVICE (metal3's metadata cleaning).
    Wipe { device: PathBuf },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Json,
    Yaml,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
    LiveIso,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ChecksumArg {
    Auto,
    Md5,
    Sha256,
    Sha512,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The coordinator's agent URL, https://HOST:PORT.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// The one-time bootstrap token (`slipway token create HOST`).
    #[arg(long, env = "SLIPWAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// SHA-256 fingerprint of the coordinator's CA (`slipway info`).
    #[arg(long)]
    pub ca_fingerprint: Option<String>,
    /// Where the agent keeps its key and certificate.
    #[arg(long, default_value = "/run/slipway-agent", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Manage only these disks (block devices or plain files) instead of the machine's own.
    #[arg(long = "disk", value_name = "PATH")]
    pub disks: Vec<PathBuf>,
    /// MAC address of the interface the machine booted from.
    #[arg(long)]
    pub boot_mac: Option<String>,
    /// Let reboot and power-off commands act on this machine (always on as the ramdisk's init).
    #[arg(long)]
    pub allow_reboot: bool,
    /// Smallest disk chosen as root disk when the host has no root device hints.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub min_root_size: u64,
    /// Interval of heartbeats to the coordinator.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    pub heartbeat_seconds: u64,
}

#[derive(Debug, Default, clap::Args)]
pub struct HintArgs {
    #[arg(long)]
    pub device_name: Option<String>,
    #[arg(long)]
    pub hctl: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub vendor: Option<String>,
    #[arg(long)]
    pub serial_number: Option<String>,
    #[arg(long)]
    pub min_size_gigabytes: Option<u64>,
    #[arg(long)]
    pub wwn: Option<String>,
    #[arg(long)]
    pub rotational: Option<bool>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // As the ramdisk's init with no arguments: run from the kernel command line.
    let command = cli.command.unwrap_or_else(|| {
        Cmd::Run(RunArgs {
            coordinator: None,
            token: None,
            ca_fingerprint: None,
            state_dir: "/run/slipway-agent".into(),
            disks: Vec::new(),
            boot_mac: None,
            allow_reboot: false,
            min_root_size: disk::DEFAULT_MIN_ROOT_BYTES,
            heartbeat_seconds: 10,
        })
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run(args) => run(args).await,
        Cmd::Inventory {
            output,
            root,
            disks,
        } => {
            let inv = tokio::task::spawn_blocking(move || {
                Inventory::collect(
                    &root,
                    &inventory::Options {
                        disks,
                        boot_mac: None,
                    },
                )
            })
            .await?;
            print(&match output {
                Output::Json => serde_json::to_string_pretty(&inv)? + "\n",
                Output::Yaml => serde_yaml_ng::to_string(&inv)?,
            })
        }
        Cmd::Disks { hints, disks } => {
            let inv = Inventory::collect(
                Path::new("/"),
                &inventory::Options {
                    disks,
                    boot_mac: None,
                },
            );
            let hints = Hints {
                device_name: hints.device_name,
                hctl: hints.hctl,
                model: hints.model,
                vendor: hints.vendor,
                serial_number: hints.serial_number,
                min_size_gigabytes: hints.min_size_gigabytes,
                wwn: hints.wwn,
                rotational: hints.rotational,
                ..Default::default()
            };
            let mut out = String::new();
            for d in &inv.disks {
                out.push_str(&format!(
                    "{:<24} {:>10}  {:<5} {:<20} {:<20}\n",
                    d.name,
                    disk::human(d.size_bytes),
                    d.kind,
                    d.model,
                    d.serial_number
                ));
            }
            match disk::select_root_disk(&hints, &inv.disks, disk::DEFAULT_MIN_ROOT_BYTES) {
                Ok(sel) => out.push_str(&format!("root disk for {hints}: {}\n", sel.disk().name)),
                Err(e) => out.push_str(&format!("{e}\n")),
            }
            print(&out)
        }
        Cmd::WriteImage {
            url,
            device,
            checksum,
            checksum_type,
            format,
            ca,
            target_zeroed,
            retries,
            read_timeout,
        } => {
            let algo = checksum_type.and_then(|c| match c {
                ChecksumArg::Auto => None,
                ChecksumArg::Md5 => Some(Algo::Md5),
                ChecksumArg::Sha256 => Some(Algo::Sha256),
                ChecksumArg::Sha512 => Some(Algo::Sha512),
            });
            let format = match format {
                None => Format::Detect,
                Some(FormatArg::Raw) => Format::Raw,
                Some(FormatArg::Qcow2) => Format::Qcow2,
                Some(FormatArg::LiveIso) => Format::LiveIso,
            };
            let spec = ImageSpec::new(&url, &checksum, algo, format)?;
            let extra_ca = match &ca {
                Some(path) => image::source::pem_certs(
                    &std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
                .map_err(|e| anyhow!("{}: {e}", path.display()))?,
                None => Vec::new(),
            };
            let target = only_disk(&device)?;
            let writer = Box::new(FileDisk::open(&target)?);
            let client = image::client_with(&extra_ca, Duration::from_secs(read_timeout.max(1)))
                .map_err(|e| anyhow!(e))?;
            let progress = Box::new(|p: image::Progress| {
                info!(
                    "{}: {} of {} bytes ({}/s)",
                    p.phase,
                    p.bytes_done,
                    p.bytes_total,
                    disk::human(p.bytes_per_second)
                );
            });
            let opts = image::WriteOptions {
                fetch: image::FetchOptions {
                    retries,
                    ..Default::default()
                },
                target_zeroed,
            };
            let w = image::write_image(&client, &spec, writer, &opts, progress).await?;
            print(&format!(
                "wrote {} ({}, {} of disk, {} zeroed or skipped) to {} in {:.2}s, {} {} verified\n",
                disk::human(w.bytes),
                w.format,
                disk::human(w.image_size),
                disk::human(w.zeroed),
                w.device,
                w.seconds,
                w.algo,
                w.digest
            ))
        }
        Cmd::Wipe { device } => {
            let target = only_disk(&device)?;
            let mut writer = FileDisk::open(&target)?;
            let parts = disk::wipe_metadata(&target, &mut writer)?;
            print(&format!(
                "wiped the first and last MiB of {} and of its {} partitions\n",
                device.display(),
                parts.len()
            ))
        }
    }
}

/// The selection for a device named on the command line: only that device can be chosen.
fn only_disk(device: &Path) -> anyhow::Result<disk::SelectedDisk> {
    if !device.exists() {
        bail!("{} does not exist", device.display());
    }
    let inv = Inventory::collect(
        Path::new("/"),
        &inventory::Options {
            disks: vec![device.to_path_buf()],
            boot_mac: None,
        },
    );
    let hints = Hints {
        device_name: Some(device.display().to_string()),
        ..Default::default()
    };
    Ok(disk::select_root_disk(&hints, &inv.disks, 0)?)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let ramdisk = sys::is_init();
    let cmdline = match std::fs::read_to_string("/proc/cmdline") {
        Ok(t) => config::parse_cmdline(&t),
        Err(_) => config::Cmdline::default(),
    };
    let coordinator = args.coordinator.or(cmdline.coordinator).ok_or_else(|| {
        anyhow!(
            "no coordinator: pass --coordinator https://HOST:PORT or boot with slipway.coordinator="
        )
    })?;
    let ca = args.ca_fingerprint.or(cmdline.ca).ok_or_else(|| {
        anyhow!(
            "no CA fingerprint: pass --ca-fingerprint (see `slipway info`) or boot with slipway.ca="
        )
    })?;
    let boot_mac = args.boot_mac.or(cmdline.boot_mac);
    let settings = Settings {
        address: session::address_of(&coordinator)?,
        token: args.token.or(cmdline.token),
        ca: Fingerprint::parse(&ca).map_err(|e| anyhow!(e))?,
        state_dir: args.state_dir,
        boot_mac: boot_mac.clone(),
        ramdisk,
        heartbeat: Duration::from_secs(args.heartbeat_seconds.max(1)),
        exit_on_refusal: !ramdisk,
    };
    let base = Context {
        root: PathBuf::from("/"),
        inventory: inventory::Options {
            disks: args.disks,
            boot_mac,
        },
        min_root_bytes: args.min_root_size,
        allow_power: ramdisk || args.allow_reboot,
        extra_ca: Vec::new(),
    };
    let mut backoff = Duration::from_secs(1);
    let mut runner: Option<(Runner, _, _)> = None;
    loop {
        let id = match session::identity(&settings).await {
            Ok(id) => id,
            Err(e) => {
                let permanent = e.downcast_ref::<Refused>().is_some_and(|r| r.1);
                if permanent && settings.exit_on_refusal {
                    return Err(e.context("enrolment failed"));
                }
                warn!("enrolment failed: {e:#}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let (runner, updates, power) = runner.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let ctx = Context {
                extra_ca: vec![id.ca_der.clone()],
                ..base.clone()
            };
            let (r, power) = Runner::new(ctx, tx);
            (r, rx, power)
        });
        match session::run(&settings, &id, runner, updates, power).await {
            End::Power(PowerAction::Exit) => {
                info!(
                    "done: the coordinator asked to reboot or power off, which this agent may not do here"
                );
                return Ok(());
            }
            End::Power(action) => {
                let e = sys::power(action == PowerAction::Reboot);
                error!("{e}; staying up");
                std::future::pending::<()>().await;
            }
            End::Refused(reason) => {
                session::forget_identity(&settings.state_dir);
                if settings.exit_on_refusal {
                    bail!("the coordinator refused this agent's certificate: {reason}");
                }
                warn!(
                    "the coordinator refused this agent's certificate ({reason}); enrolling again"
                );
            }
        }
    }
}

/// Prints to stdout; a closed pipe is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
