//! The enrol-and-serve loop shared by `slipway-agent run` and the ramdisk's init: settings
//! from flags or the kernel command line, enrolment (retried with backoff), sessions until
//! the coordinator asks for a power action, then that action.
//!
//! Layering: `cli` and `init` call this; this calls `session` and `commands` (and prints
//! milestones through `console`), never the other way round (`agent/tests/tidy.rs`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::commands::{Context, PowerAction, Runner};
use crate::config::{self, parse_size};
use crate::console::milestone;
use crate::disk;
use crate::inventory;
use crate::session::{self, End, Refused, Settings};
use crate::sys;
use crate::tls::Fingerprint;

/// The settings of `slipway-agent run`; the ramdisk's init builds them from the kernel
/// command line ([`RunArgs::from_cmdline`]).
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The coordinator's agent URL, https://HOST:PORT.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// The one-time bootstrap token (`slipway token create HOST`). It is base64url, so it
    /// may begin with '-': that is taken as the token, not as an option.
    #[arg(
        long,
        env = "SLIPWAY_TOKEN",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
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
    /// How long each inventory listens for LLDP frames. Default: 3 s as the ramdisk's init,
    /// 0 (no listen) as a normal program, where it would delay every hello.
    #[arg(long, value_name = "SECONDS")]
    pub lldp_seconds: Option<f64>,
}

impl RunArgs {
    /// Everything from the kernel command line, defaults otherwise (the ramdisk's settings).
    pub fn from_cmdline() -> RunArgs {
        RunArgs {
            coordinator: None,
            token: None,
            ca_fingerprint: None,
            state_dir: "/run/slipway-agent".into(),
            disks: Vec::new(),
            boot_mac: None,
            allow_reboot: false,
            min_root_size: disk::DEFAULT_MIN_ROOT_BYTES,
            heartbeat_seconds: 10,
            lldp_seconds: None,
        }
    }
}

/// Enrols and serves the coordinator until a power action. `ramdisk`: this is the ramdisk's
/// init (reboots and power-offs act on the machine; refusals are retried forever).
pub async fn run_agent(args: RunArgs, ramdisk: bool) -> anyhow::Result<()> {
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
        reconnect_jitter: Duration::ZERO,
        milestones: true,
    };
    let base = Context {
        root: PathBuf::from("/"),
        inventory: inventory::Options {
            disks: args.disks,
            boot_mac,
            lldp: seconds(args.lldp_seconds.unwrap_or(if ramdisk { 3.0 } else { 0.0 }))?,
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
                milestone(
                    match action {
                        PowerAction::Reboot => "rebooting",
                        PowerAction::Kexec => "kexec",
                        _ => "powering-off",
                    },
                    "",
                );
                let e = if action == PowerAction::Kexec {
                    // Where the kernel refuses at the last moment, the firmware still boots
                    // the disk.
                    let e = sys::kexec_reboot();
                    error!("{e}; rebooting through the firmware");
                    sys::power(true)
                } else {
                    sys::power(action == PowerAction::Reboot)
                };
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

/// A flag's seconds as a duration.
pub fn seconds(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| anyhow!("{s} is not a number of seconds (0 or more)"))
}
