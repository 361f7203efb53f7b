//! Runs the coordinator's commands, keeping each by id.
//!
//! Commands are idempotent by id: receiving an id again answers with what the command is doing
//! or how it ended, without running it twice. Commands keep running while the session is down;
//! their outcomes are reported in the next session's hello. One disk-touching command runs at a
//! time; another one arriving meanwhile is refused as busy.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::configdrive::{self, ConfigDrive};
use crate::disk::{self, FileDisk, Hints};
use crate::image::{self, ImageSpec, Progress, Written};
use crate::inventory::{self, Inventory};

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Inspect,
    WriteImage {
        spec: ImageSpec,
        hints: Hints,
        /// Written after the image, in a partition at the end of the same disk.
        config_drive: Option<ConfigDrive>,
        /// DER certificates of CAs to trust for this image's https URLs, besides the public
        /// roots and the coordinator's CA (`slipway serve --image-ca`).
        extra_ca: Vec<Vec<u8>>,
    },
    /// Cleaning of every disk: metadata only, or (`full`) every byte zeroed.
    EraseMetadata {
        full: bool,
    },
    Reboot,
    /// Boot the OS just written by kexec (a firmware reboot where that cannot be done).
    Kexec,
    PowerOff,
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Inspect => "inspect",
            Kind::WriteImage { .. } => "write-image",
            Kind::EraseMetadata { full: false } => "erase-metadata",
            Kind::EraseMetadata { full: true } => "erase-full",
            Kind::Reboot => "reboot",
            Kind::Kexec => "kexec",
            Kind::PowerOff => "power-off",
        }
    }

    fn touches_disks(&self) -> bool {
        matches!(self, Kind::WriteImage { .. } | Kind::EraseMetadata { .. })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub id: String,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Detail {
    None,
    Inventory(Box<Inventory>),
    Written(Written),
    /// A kexec command loaded the new OS: the power step boots it.
    KexecLoaded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    InvalidRequest,
    ChecksumMismatch,
    Download,
    Disk,
    Busy,
    Internal,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Success { message: String, detail: Detail },
    Failure { message: String, kind: FailureKind },
}

#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Running(Option<Progress>),
    Finished(Outcome),
}

/// Something to tell the coordinator.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    Progress {
        id: String,
        progress: Progress,
    },
    Finished {
        id: String,
        outcome: Outcome,
    },
    Log {
        id: String,
        warning: bool,
        message: String,
    },
}

/// What the agent must do to the machine once the coordinator has heard the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    Reboot,
    /// Boot what a kexec command loaded.
    Kexec,
    PowerOff,
    /// Not allowed to touch power (not the ramdisk's init): stop the agent instead.
    Exit,
}

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

#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Context,
    table: Mutex<BTreeMap<String, State>>,
    busy: Mutex<Option<String>>,
    updates: mpsc::UnboundedSender<Update>,
    power: watch::Sender<Option<PowerAction>>,
    /// The disk of the last image written, which a kexec command boots.
    last_written: Mutex<Option<PathBuf>>,
}

impl Runner {
    pub fn new(
        ctx: Context,
        updates: mpsc::UnboundedSender<Update>,
    ) -> (Runner, watch::Receiver<Option<PowerAction>>) {
        let (power, power_rx) = watch::channel(None);
        let inner = Inner {
            ctx,
            table: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(None),
            updates,
            power,
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

    /// Every command received so far, with its state (for the hello after a reconnect).
    pub fn statuses(&self) -> Vec<(String, State)> {
        lock(&self.inner.table)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn submit(&self, cmd: Command) {
        let known = lock(&self.inner.table).get(&cmd.id).cloned();
        if let Some(state) = known {
            // Sent again after a reconnect: answer, do not run twice.
            if let State::Finished(outcome) = state {
                self.send(Update::Finished {
                    id: cmd.id,
                    outcome,
                });
            }
            return;
        }
        if cmd.kind.touches_disks() {
            let mut busy = lock(&self.inner.busy);
            if let Some(other) = busy.as_ref() {
                let outcome = Outcome::Failure {
                    kind: FailureKind::Busy,
                    message: format!(
                        "the agent is still running command {other}; try again when it has finished"
                    ),
                };
                lock(&self.inner.table).insert(cmd.id.clone(), State::Finished(outcome.clone()));
                self.send(Update::Finished {
                    id: cmd.id,
                    outcome,
                });
                return;
            }
            *busy = Some(cmd.id.clone());
        }
        lock(&self.inner.table).insert(cmd.id.clone(), State::Running(None));
        let runner = self.clone();
        tokio::spawn(async move {
            let id = cmd.id.clone();
            let name = cmd.kind.name();
            info!(command = %id, "running {name}");
            runner.send(Update::Log {
                id: id.clone(),
                warning: false,
                message: format!("running {name} ({id})"),
            });
            let outcome = runner.execute(&cmd).await;
            let power = match &cmd.kind {
                Kind::Reboot => Some(PowerAction::Reboot),
                Kind::Kexec => Some(match &outcome {
                    Outcome::Success {
                        detail: Detail::KexecLoaded,
                        ..
                    } => PowerAction::Kexec,
                    _ => PowerAction::Reboot,
                }),
                Kind::PowerOff => Some(PowerAction::PowerOff),
                _ => None,
            };
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
                    runner.send(Update::Log {
                        id: id.clone(),
                        warning: true,
                        message: format!("{name} failed: {message}"),
                    });
                }
            }
            lock(&runner.inner.table).insert(id.clone(), State::Finished(outcome.clone()));
            if cmd.kind.touches_disks() {
                *lock(&runner.inner.busy) = None;
            }
            runner.send(Update::Finished { id, outcome });
            if let Some(action) = power {
                let action = if runner.inner.ctx.allow_power {
                    action
                } else {
                    PowerAction::Exit
                };
                let _ = runner.inner.power.send(Some(action));
            }
        });
    }

    fn send(&self, update: Update) {
        if let Update::Progress { id, progress } = &update
            && let Some(state) = lock(&self.inner.table).get_mut(id)
            && matches!(state, State::Running(_))
        {
            *state = State::Running(Some(progress.clone()));
        }
        let _ = self.inner.updates.send(update);
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
            Err(e) => {
                return Outcome::Failure {
                    kind: FailureKind::InvalidRequest,
                    message: e.0,
                };
            }
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
                ) + &w
                    .warnings
                    .iter()
                    .map(|x| format!("; warning: {x}"))
                    .collect::<String>(),
                detail: Detail::Written(w),
            },
            Err(e) => {
                let kind = match e.kind() {
                    "checksum" => FailureKind::ChecksumMismatch,
                    "download" => FailureKind::Download,
                    "disk" => FailureKind::Disk,
                    _ => FailureKind::InvalidRequest,
                };
                // The message says where it failed and that the disk was wiped.
                let message = chain(&e);
                Outcome::Failure { kind, message }
            }
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub use crate::error_chain as chain;
