//! The [`Runner`]: commands carried out on this machine (its inventory, its disks, its
//! power).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    Command, Detail, Execute, FailureKind, Kind, Ledger, Outcome, PowerAction, State, Update,
    chain, lock, warnings_suffix,
};
use crate::configdrive::{self, ConfigDrive};
use crate::disk::{self, FileDisk, Hints};
use crate::image::{self, ImageSpec, Progress};
use crate::inventory::{self, Inventory};

/// What commands need from the machine.
#[derive(Clone, Debug)]
pub struct Context {
    /// Where /sys and /proc are (`/`).
    pub root: PathBuf,
    pub inventory: inventory::Options,
    /// Smallest root disk chosen when the host has no hints.
    pub min_root_bytes: u64,
    /// Whether reboot and power-off may act on this machine.
    pub allow_power: bool,
    /// Extra CA certificates (DER) trusted for https images: the coordinator's CA.
    pub extra_ca: Vec<Vec<u8>>,
}

/// Runs the coordinator's commands on this machine.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Context,
    ledger: Ledger,
    /// The disk of the last image written, which a kexec command boots.
    last_written: Mutex<Option<PathBuf>>,
}

impl Execute for Runner {
    /// Collected on a blocking thread, without an LLDP listen: it would delay every
    /// (re)connection; `inspect` listens.
    async fn hello_inventory(&self) -> Inventory {
        collect(&self.inner.ctx, false).await
    }

    fn statuses(&self) -> Vec<(String, State)> {
        self.inner.ledger.statuses()
    }

    fn submit(&self, cmd: Command) {
        if !self.inner.ledger.admit(&cmd) {
            return;
        }
        let runner = self.clone();
        tokio::spawn(async move {
            let id = cmd.id.clone();
            let name = cmd.kind.name();
            info!(command = %id, "running {name}");
            runner.inner.ledger.started(&cmd);
            let outcome = runner.execute(&cmd).await;
            match &outcome {
                Outcome::Success { message, .. } => {
                    info!(command = %id, "{name} done: {message}");
                    let event = match &cmd.kind {
                        Kind::Inspect => "inspected",
                        Kind::WriteImage { .. } => "image-written",
                        Kind::EraseMetadata { .. } => "cleaned",
                        Kind::Reboot | Kind::Kexec | Kind::PowerOff => "power-command",
                    };
                    crate::console::milestone(event, &format!("command={id}"));
                }
                Outcome::Failure { message, .. } => {
                    warn!(command = %id, "{name} failed: {message}");
                }
            }
            runner
                .inner
                .ledger
                .finish(&cmd, outcome, runner.inner.ctx.allow_power);
        });
    }
}

impl Runner {
    pub fn new(
        ctx: Context,
        updates: mpsc::UnboundedSender<Update>,
    ) -> (Runner, watch::Receiver<Option<PowerAction>>) {
        let (ledger, power_rx) = Ledger::new(updates);
        let inner = Inner {
            ctx,
            ledger,
            last_written: Mutex::new(None),
        };
        (
            Runner {
                inner: Arc::new(inner),
            },
            power_rx,
        )
    }

    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    fn send(&self, update: Update) {
        self.inner.ledger.send(update);
    }

    async fn execute(&self, cmd: &Command) -> Outcome {
        let ctx = &self.inner.ctx;
        match &cmd.kind {
            Kind::Inspect => {
                let inv = collect(ctx, true).await;
                let message = format!(
                    "{} CPUs, {} MiB RAM, {} disks, {} NICs",
                    inv.cpu.count,
                    inv.memory.total_bytes >> 20,
                    inv.disks.len(),
                    inv.nics.len()
                );
                Outcome::Success {
                    message,
                    detail: Detail::Inventory(Box::new(inv)),
                }
            }
            Kind::WriteImage {
                spec,
                hints,
                config_drive,
                extra_ca,
            } => {
                self.write_image(&cmd.id, spec, hints, config_drive.as_ref(), extra_ca)
                    .await
            }
            Kind::EraseMetadata { full } => {
                let full = *full;
                let inv = collect(ctx, false).await;
                let targets = disk::select_for_cleaning(&inv.disks);
                let runner = self.clone();
                let cmd_id = cmd.id.clone();
                let result = tokio::task::spawn_blocking(move || {
                    let mut done = Vec::new();
                    // A full erase reports its progress over all the disks it cleans.
                    let total: u64 = targets.iter().map(|t| t.disk().size_bytes).sum();
                    let start = std::time::Instant::now();
                    let mut before = 0u64;
                    for target in &targets {
                        let mut w = FileDisk::open(target)?;
                        done.push(if full {
                            let e = disk::erase_full(target, &mut w, &mut |d, _| {
                                let secs = start.elapsed().as_secs_f64().max(1e-3);
                                runner.send(Update::Progress {
                                    id: cmd_id.clone(),
                                    progress: Progress {
                                        phase: "erase",
                                        bytes_done: before + d,
                                        bytes_total: total,
                                        bytes_per_second: ((before + d) as f64 / secs) as u64,
                                        stalled_seconds: 0,
                                    },
                                });
                            })?;
                            before += e.bytes;
                            format!(
                                "{} ({} zeroed by {} in {:.1}s)",
                                e.device,
                                disk::human(e.bytes),
                                e.method,
                                e.seconds
                            )
                        } else {
                            let w = disk::wipe_metadata(target, &mut w)?;
                            format!(
                                "{} ({} areas, {} zeroed in {:.2}s)",
                                w.device,
                                w.areas.len(),
                                disk::human(w.bytes()),
                                w.seconds
                            )
                        });
                    }
                    Ok::<_, disk::DiskError>(done)
                })
                .await;
                match result {
                    Ok(Ok(done)) if done.is_empty() => Outcome::Success {
                        message: "no disks to clean".into(),
                        detail: Detail::None,
                    },
                    Ok(Ok(done)) => Outcome::Success {
                        message: if full {
                            format!("erased every byte of {}", done.join(", "))
                        } else {
                            format!(
                                "wiped partition tables and signatures of {}",
                                done.join(", ")
                            )
                        },
                        detail: Detail::None,
                    },
                    Ok(Err(e)) => Outcome::Failure {
                        kind: FailureKind::Disk,
                        message: chain(&e),
                    },
                    Err(e) => Outcome::Failure {
                        kind: FailureKind::Internal,
                        message: e.to_string(),
                    },
                }
            }
            Kind::Kexec => self.kexec().await,
            Kind::Reboot | Kind::PowerOff => {
                let what = if matches!(cmd.kind, Kind::Reboot) {
                    "rebooting"
                } else {
                    "powering off"
                };
                let message = if ctx.allow_power {
                    format!("{what} now")
                } else {
                    format!(
                        "not {what}: this agent is not the ramdisk's init (pass --allow-reboot to let it act on this machine); the agent exits instead"
                    )
                };
                Outcome::Success {
                    message,
                    detail: Detail::None,
                }
            }
        }
    }

    /// Loads the OS last written for kexec. Never fails the command: where the OS cannot be
    /// loaded the machine reboots through the firmware, and the message says why.
    async fn kexec(&self) -> Outcome {
        if !self.inner.ctx.allow_power {
            return Outcome::Success {
                message: "not rebooting: this agent is not the ramdisk's init (pass --allow-reboot to let it act on this machine); the agent exits instead".into(),
                detail: Detail::None,
            };
        }
        let device = lock(&self.inner.last_written).clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let device = device
                .ok_or_else(|| "this agent has written no image since it started".to_string())?;
            let found = crate::kexec::find(&device)?;
            crate::sys::kexec_load(&found.kernel, &found.initrd, &found.entry.append).map_err(
                |e| {
                    format!(
                        "the kernel refused {} from {}: {e}",
                        found.entry.kernel, found.source
                    )
                },
            )?;
            Ok::<_, String>(format!(
                "kexec into /{} ({} bytes, initrd {} bytes, \"{}\") from {}",
                found.entry.kernel,
                found.kernel.len(),
                found.initrd.len(),
                found.entry.append,
                found.source
            ))
        })
        .await
        .unwrap_or_else(|e| Err(format!("the kexec task failed: {e}")));
        match loaded {
            Ok(message) => Outcome::Success {
                message,
                detail: Detail::KexecLoaded,
            },
            Err(why) => {
                warn!("cannot kexec ({why}); rebooting through the firmware");
                Outcome::Success {
                    message: format!("cannot kexec: {why}; rebooting through the firmware instead"),
                    detail: Detail::None,
                }
            }
        }
    }

    async fn write_image(
        &self,
        id: &str,
        spec: &ImageSpec,
        hints: &Hints,
        config_drive: Option<&ConfigDrive>,
        extra_ca: &[Vec<u8>],
    ) -> Outcome {
        let ctx = &self.inner.ctx;
        let inv = collect(ctx, false).await;
        let target = match disk::select_root_disk(hints, &inv.disks, ctx.min_root_bytes) {
            Ok(t) => t,
            Err(none) => return none.into(),
        };
        let device = target.disk().name.clone();
        if let Some(drive) = config_drive
            && let Err(e) = drive.check()
        {
            return Outcome::Failure {
                kind: FailureKind::InvalidRequest,
                message: chain(&e),
            };
        }
        let writer = match FileDisk::open(&target) {
            Ok(w) => Box::new(w),
            Err(e) => {
                return Outcome::Failure {
                    kind: FailureKind::Disk,
                    message: chain(&e),
                };
            }
        };
        let cas: Vec<Vec<u8>> = ctx.extra_ca.iter().chain(extra_ca).cloned().collect();
        let client = match image::client(&cas) {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Failure {
                    kind: FailureKind::Internal,
                    message: format!("cannot build the HTTP client: {e}"),
                };
            }
        };
        info!(command = %id, "writing {} to {device}", spec.url);
        let runner = self.clone();
        let cmd_id = id.to_string();
        let progress = Box::new(move |p: Progress| {
            runner.send(Update::Progress {
                id: cmd_id.clone(),
                progress: p,
            })
        });
        let result = image::write_image(
            &client,
            spec,
            writer,
            &image::WriteOptions::default(),
            progress,
        )
        .await;
        let mut placed_text = String::new();
        if let (Ok(w), Some(drive)) = (&result, config_drive) {
            // Image (verified, first MiB last) -> config drive -> sync; a failure wipes.
            let (drive, target, image_end) = (drive.clone(), target.clone(), w.bytes);
            let placed = tokio::task::spawn_blocking(move || {
                let mut writer = FileDisk::open(&target)?;
                configdrive::write_config_drive(&target, &mut writer, &drive, image_end)
                    .inspect_err(|_| {
                        if let Err(e) = disk::zero_ends(&mut writer) {
                            tracing::error!(
                                "could not wipe {} after the failed config drive: {e}",
                                target.disk().name
                            );
                        }
                    })
            })
            .await;
            match placed {
                Ok(Ok(p)) => {
                    info!(command = %id, "wrote the {p}");
                    placed_text = format!("; {p}");
                }
                Ok(Err(e)) => {
                    return Outcome::Failure {
                        kind: match e {
                            configdrive::ConfigDriveError::Partition { .. }
                            | configdrive::ConfigDriveError::Invalid(_) => {
                                FailureKind::InvalidRequest
                            }
                            _ => FailureKind::Disk,
                        },
                        message: format!(
                            "the image was written but the config drive was not: {}; the first and last MiB of {device} were zeroed, so it cannot boot without its first-boot data",
                            chain(&e)
                        ),
                    };
                }
                Err(e) => {
                    return Outcome::Failure {
                        kind: FailureKind::Internal,
                        message: format!("the config-drive task failed: {e}"),
                    };
                }
            }
        }
        if result.is_ok() {
            *lock(&self.inner.last_written) = Some(target.path().to_path_buf());
        }
        match result {
            Ok(w) => Outcome::Success {
                message: format!(
                    "wrote {} to {} in {:.1}s ({}/s), {} verified{}",
                    disk::human(w.bytes),
                    w.device,
                    w.seconds,
                    disk::human((w.bytes as f64 / w.seconds.max(1e-3)) as u64),
                    w.algo,
                    placed_text
                ) + &warnings_suffix(&w),
                detail: Detail::Written(w),
            },
            // The message says where it failed and that the disk was wiped.
            Err(e) => Outcome::image_failure(&e),
        }
    }
}

/// The inventory; `lldp`: listen for LLDP neighbours as configured (only `inspect` waits for
/// them; choosing a disk does not need them).
async fn collect(ctx: &Context, lldp: bool) -> Inventory {
    let root = ctx.root.clone();
    let mut opts = ctx.inventory.clone();
    if !lldp {
        opts.lldp = std::time::Duration::ZERO;
    }
    tokio::task::spawn_blocking(move || Inventory::collect(&root, &opts))
        .await
        .unwrap_or_default()
}
