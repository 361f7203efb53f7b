//! The `slipway-agent` command line. Every layer runs alone, without a coordinator.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{info, warn};

use crate::configdrive::{self, ConfigDrive};
use crate::disk::{self, FileDisk, Hints};
use crate::image::{self, Algo, Format, ImageSpec};
use crate::inventory::{self, Inventory};
use crate::run::{RunArgs, run_agent, seconds};
use crate::sys;

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
    /// Print this machine's hardware inventory (no coordinator needed).
    Inventory {
        #[arg(short, long, value_enum, default_value_t = Output::Json)]
        output: Output,
        /// Read /sys, /proc and /dev under this directory instead of the running machine's
        /// (a fixture or a capture).
        #[arg(long, default_value = "/", value_name = "DIR")]
        root: PathBuf,
        /// Also copy exactly the files the inventory reads into DIR (which must not exist yet),
        /// so the machine can become a test fixture: `--root DIR` reads it back.
        #[arg(long, value_name = "DIR")]
        capture: Option<PathBuf>,
        /// How long to listen for LLDP frames from the switches (0: not at all). Only on the
        /// running machine; needs root (CAP_NET_RAW) and interfaces that are up.
        #[arg(long, default_value = "3", value_name = "SECONDS")]
        lldp_seconds: f64,
        /// Report only these disks (block devices or plain files).
        #[arg(long = "disk", value_name = "PATH")]
        disks: Vec<PathBuf>,
        /// MAC of the interface the machine booted from (marks it `pxe`).
        #[arg(long)]
        boot_mac: Option<String>,
        /// Also print on stderr how long the collection itself took (without process start
        /// and output; with --capture, the copying too), as `collected in SECONDS s` (for
        /// benchmarks).
        #[arg(long)]
        time: bool,
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
        /// PEM file of CA certificates to trust for https URLs, besides the public roots built
        /// in and the machine's own store (/etc/ssl/certs, or SSL_CERT_FILE / SSL_CERT_DIR).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// DEVICE is known to read as zeros (new sparse file, or just discarded with a
        /// zeroing guarantee): zero runs are skipped rather than zeroed.
        #[arg(long)]
        target_zeroed: bool,
        /// Retries in a row, without progress (64 KiB), after network errors, server errors
        /// and stalls.
        #[arg(long, default_value_t = 5)]
        retries: u32,
        /// Seconds a silent connection (not a byte) is waited for before it is resumed.
        #[arg(long, default_value_t = 60)]
        read_timeout: u64,
        /// Seconds within which every 64 KiB must arrive (the head of an answer too): a
        /// download bringing less is stalled and resumed with a Range request; once the
        /// stalls use up --retries, the write fails, naming the bytes received, and the
        /// disk's ends are zeroed. A server dripping a byte now and then stalls as surely as
        /// a silent one. Progress lines say "stalled" after 5 s without progress (half the
        /// timeout, if that is shorter).
        #[arg(long, default_value_t = 60, value_name = "SECONDS",
              value_parser = clap::value_parser!(u64).range(1..))]
        stall_timeout: u64,
    },
    /// Wipe partition tables and filesystem, RAID, LVM and ZFS signatures from DEVICE and from
    /// each of its partitions (metal3's metadata cleaning); with --full, zero every byte.
    Wipe {
        device: PathBuf,
        /// Make every byte read back as zero (discard with a zeroing guarantee, BLKZEROOUT, or
        /// writing zeros), for decommissioning. Takes as long as the disk needs.
        #[arg(long)]
        full: bool,
        /// Only print what metadata wiping would zero.
        #[arg(long, conflicts_with = "full")]
        dry_run: bool,
    },
    /// Boot the OS on DEVICE without the firmware: find its default syslinux/extlinux entry on
    /// a FAT partition, load the kernel and initrd with kexec_file_load and reboot into them.
    /// Reboots this machine: use --dry-run to only show what would be booted.
    Kexec {
        device: PathBuf,
        /// Only print the entry found (kernel, initrd, command line); load and boot nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Simulate COUNT machines in this one process, for load tests of a coordinator: each
    /// asks /boot/ipxe for its token, enrols for real, holds its own session, reports
    /// generated hardware, and answers commands (images are downloaded and verified into a
    /// disk that only hashes). Prints a status line every 5 s and a summary at the end.
    Simulate(crate::simulate::SimulateArgs),
    /// Write the hosts directory for `simulate`: a BareMetalHost (sim-NNNNN, its boot MAC,
    /// the image, its first generated disk as root device hint) and a userData Secret per
    /// machine, several hosts per file.
    SimulateHosts(crate::simulate::HostsArgs),
    /// Add a config-2 partition with first-boot data at the end of DEVICE (after the image
    /// already on it), as provisioning does after writing the image.
    ConfigDrive {
        device: PathBuf,
        /// openstack/*/user_data.
        #[arg(long, value_name = "FILE")]
        user_data: Option<PathBuf>,
        /// openstack/*/network_data.json (JSON or YAML).
        #[arg(long, value_name = "FILE")]
        network_data: Option<PathBuf>,
        /// openstack/*/meta_data.json (a JSON or YAML object); uuid, name, hostname and
        /// public_keys are filled in when missing.
        #[arg(long, value_name = "FILE")]
        meta_data: Option<PathBuf>,
        /// Host name for meta_data.json.
        #[arg(long, default_value = "")]
        hostname: String,
        /// Instance uuid for meta_data.json (default: a new random one).
        #[arg(long)]
        uuid: Option<String>,
    },
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
    pub wwn_with_extension: Option<String>,
    #[arg(long)]
    pub wwn_vendor_extension: Option<String>,
    #[arg(long)]
    pub rotational: Option<bool>,
}

pub fn main() -> ExitCode {
    let cli = if crate::init::wanted() {
        Cli { command: None }
    } else {
        Cli::parse()
    };
    let simulating = matches!(cli.command, Some(Cmd::Simulate(_)));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if simulating {
            // Thousands of sessions: their lines are counted in the status line instead.
            "info,slipway_agent::session=error"
        } else {
            // fatfs warns about FAT layouts other implementations might dislike (kexec reads
            // the images' boot partitions): not the operator's concern.
            "info,fatfs=error"
        })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && !crate::init::wanted())
        .init();
    // As the ramdisk's /init: mount, load modules, configure the network, then run.
    if crate::init::wanted() {
        crate::init::main();
    }
    let command = cli
        .command
        .unwrap_or_else(|| Cmd::Run(RunArgs::from_cmdline()));
    // The inventory is a few hundred file reads: run it on this thread, without starting an
    // async runtime and its threads (they cost more than the inventory itself).
    if let Cmd::Inventory {
        output,
        root,
        capture,
        lldp_seconds,
        disks,
        boot_mac,
        time,
    } = command
    {
        let run = inventory_cmd(output, root, capture, lldp_seconds, disks, boot_mac, time);
        return match run {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // The load generator sizes its own runtime.
    let command = match command {
        Cmd::Simulate(args) => {
            return match crate::simulate::main(args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        other => other,
    };
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
        Cmd::Run(args) => run_agent(args, sys::is_init()).await,
        Cmd::Inventory {
            output,
            root,
            capture,
            lldp_seconds,
            disks,
            boot_mac,
            time,
        } => {
            tokio::task::spawn_blocking(move || {
                inventory_cmd(output, root, capture, lldp_seconds, disks, boot_mac, time)
            })
            .await?
        }
        Cmd::Disks { hints, disks } => {
            let inv = Inventory::collect(
                Path::new("/"),
                &inventory::Options {
                    disks,
                    ..Default::default()
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
                wwn_with_extension: hints.wwn_with_extension,
                wwn_vendor_extension: hints.wwn_vendor_extension,
                rotational: hints.rotational,
            };
            print(&disks_table(&hints, &inv.disks))
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
            stall_timeout,
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
                if p.phase == image::STALLED {
                    warn!("{p}");
                } else {
                    info!("{p}");
                }
            });
            let opts = image::WriteOptions {
                fetch: image::FetchOptions {
                    retries,
                    read_timeout: Duration::from_secs(read_timeout.max(1)),
                    stall: image::StallOptions {
                        timeout: Duration::from_secs(stall_timeout),
                        ..Default::default()
                    },
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
        Cmd::Simulate(args) => {
            bail!("internal error: simulate {args:?} reached the common runtime")
        }
        Cmd::SimulateHosts(args) => print(&crate::simulate::write_hosts(args)?),
        Cmd::Kexec { device, dry_run } => {
            let found = crate::kexec::find(&device).map_err(|e| anyhow!(e))?;
            let summary = format!(
                "{}: kernel /{} ({} bytes), initrd {} ({} bytes), command line \"{}\"\n",
                found.source,
                found.entry.kernel,
                found.kernel.len(),
                if found.entry.initrds.is_empty() {
                    "none".to_string()
                } else {
                    found.entry.initrds.join(" + ")
                },
                found.initrd.len(),
                found.entry.append
            );
            if dry_run {
                return print(&summary);
            }
            sys::kexec_load(&found.kernel, &found.initrd, &found.entry.append)
                .with_context(|| format!("the kernel refused /{}", found.entry.kernel))?;
            eprint!("{summary}");
            Err(anyhow!(sys::kexec_reboot()).context("cannot reboot into the loaded kernel"))
        }
        Cmd::Wipe {
            device,
            full,
            dry_run,
        } => {
            let target = only_disk(&device)?;
            let mut writer = FileDisk::open(&target)?;
            if full {
                let mut last = std::time::Instant::now();
                let e = disk::erase_full(&target, &mut writer, &mut |done, total| {
                    if last.elapsed().as_secs() >= 1 || done == total {
                        info!("erase: {done} of {total} bytes");
                        last = std::time::Instant::now();
                    }
                })?;
                return print(&format!(
                    "zeroed all {} bytes of {} ({}) in {:.2}s\n",
                    e.bytes, e.device, e.method, e.seconds
                ));
            }
            let mut out = String::new();
            let areas = if dry_run {
                let sector = u64::from(target.disk().logical_block_size);
                disk::plan_metadata_wipe(&mut disk::Reader(&mut writer), sector)
                    .with_context(|| format!("cannot read {}", device.display()))?
            } else {
                let w = disk::wipe_metadata(&target, &mut writer)?;
                out.push_str(&format!(
                    "wiped {} in {} areas of {} in {:.3}s\n",
                    disk::human(w.bytes()),
                    w.areas.len(),
                    w.device,
                    w.seconds
                ));
                w.areas
            };
            for a in &areas {
                out.push_str(&format!(
                    "  {:>14} .. {:<14} {:>10}  {}\n",
                    a.start,
                    a.end,
                    disk::human(a.len()),
                    a.what
                ));
            }
            print(&out)
        }
        Cmd::ConfigDrive {
            device,
            user_data,
            network_data,
            meta_data,
            hostname,
            uuid,
        } => {
            let read = |p: &Option<PathBuf>| -> anyhow::Result<Option<Vec<u8>>> {
                p.as_ref()
                    .map(|p| {
                        std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
                    })
                    .transpose()
            };
            let network_data = match read(&network_data)? {
                Some(bytes) => Some(serde_json::to_vec(&yaml_or_json(
                    &bytes,
                    "--network-data",
                )?)?),
                None => None,
            };
            let meta = match read(&meta_data)? {
                Some(bytes) => match yaml_or_json(&bytes, "--meta-data")? {
                    serde_json::Value::Object(m) => m,
                    _ => bail!("--meta-data must hold an object (key: value pairs)"),
                },
                None => Default::default(),
            };
            let uuid = match uuid {
                Some(u) => u,
                None => random_uuid()?,
            };
            let drive = ConfigDrive {
                user_data: read(&user_data)?,
                network_data,
                meta_data: serde_json::to_vec(&configdrive::complete_meta_data(
                    meta, &uuid, &hostname,
                ))?,
            };
            let target = only_disk(&device)?;
            let mut writer = FileDisk::open(&target)?;
            // After everything already on the disk.
            let placed = configdrive::write_config_drive(&target, &mut writer, &drive, 0)?;
            print(&format!("wrote the {placed}\n"))
        }
    }
}

/// Parses a file given as YAML or JSON (JSON is YAML) into a JSON value. Errors name the flag,
/// not the contents.
fn yaml_or_json(bytes: &[u8], flag: &str) -> anyhow::Result<serde_json::Value> {
    serde_yaml_ng::from_slice(bytes).map_err(|e| {
        anyhow!(
            "{flag}: not YAML or JSON{}",
            e.location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default()
        )
    })
}

/// A random (version 4) UUID, as text.
fn random_uuid() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| anyhow!("no entropy for a uuid: {e}"))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
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
            ..Default::default()
        },
    );
    let hints = Hints {
        device_name: Some(device.display().to_string()),
        ..Default::default()
    };
    Ok(disk::select_root_disk(&hints, &inv.disks, 0)?)
}

/// `slipway-agent inventory`.
fn inventory_cmd(
    output: Output,
    root: PathBuf,
    capture: Option<PathBuf>,
    lldp_seconds: f64,
    disks: Vec<PathBuf>,
    boot_mac: Option<String>,
    time: bool,
) -> anyhow::Result<()> {
    let opts = inventory::Options {
        disks,
        boot_mac: boot_mac.map(|m| m.to_ascii_lowercase()),
        lldp: seconds(lldp_seconds)?,
    };
    let start = std::time::Instant::now();
    let inv = match capture {
        Some(dir) => {
            if dir.exists() {
                bail!(
                    "{} already exists; the capture goes into a new directory",
                    dir.display()
                );
            }
            let (inv, files) = inventory::capture(&root, &opts, &dir)?;
            info!("captured {files} files into {}", dir.display());
            inv
        }
        None => Inventory::collect(&root, &opts),
    };
    if time {
        eprintln!("collected in {:.6} s", start.elapsed().as_secs_f64());
    }
    print(&match output {
        Output::Json => serde_json::to_string_pretty(&inv)? + "\n",
        Output::Yaml => serde_yaml_ng::to_string(&inv)?,
    })
}

/// What `slipway-agent disks` prints: every disk, then the choice or why none.
pub fn disks_table(hints: &Hints, disks: &[inventory::Disk]) -> String {
    let mut out = String::new();
    for d in disks {
        out.push_str(&format!(
            "{:<14} {:>10}  {:<5} {:<7} {:<20} {:<20} {}\n",
            d.name,
            disk::human(d.size_bytes),
            d.kind,
            d.transport.as_deref().unwrap_or("-"),
            d.model.as_deref().unwrap_or("-"),
            d.serial_number.as_deref().unwrap_or("-"),
            d.by_path.as_deref().unwrap_or("-"),
        ));
    }
    match disk::select_root_disk(hints, disks, disk::DEFAULT_MIN_ROOT_BYTES) {
        Ok(sel) => out.push_str(&format!("root disk for {hints}: {}\n", sel.disk().name)),
        Err(e) => out.push_str(&format!("{e}\n")),
    }
    out
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

    /// A base64url token may begin with '-' (1 in 32 do): it is still the token. CI once
    /// failed on a token "-G...", refused as an unknown option.
    #[test]
    fn a_token_that_begins_with_a_hyphen_is_the_token() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "slipway-agent",
            "run",
            "--token",
            "-Gx2kq_9",
            "--coordinator",
            "https://127.0.0.1:1",
        ])
        .expect("parsed");
        match cli.command {
            Some(Cmd::Run(args)) => {
                assert_eq!(args.token.as_deref(), Some("-Gx2kq_9"));
                assert_eq!(args.coordinator.as_deref(), Some("https://127.0.0.1:1"));
            }
            _ => panic!("not run"),
        }
    }
}
