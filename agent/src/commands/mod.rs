//! The coordinator's commands, kept by id, and what carries them out.
//!
//! Commands are idempotent by id: receiving an id again answers with what the command is doing
//! or how it ended, without running it twice. Commands keep running while the session is down;
//! their outcomes are reported in the next session's hello. One disk-touching command runs at a
//! time; another one arriving meanwhile is refused as busy. That bookkeeping is the
//! [`Ledger`], shared by every [`Execute`]: the real [`Runner`] ([`runner`]), and the load
//! generator's simulated machines.

pub mod runner;

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::{mpsc, watch};

use crate::configdrive::ConfigDrive;
use crate::disk::{self, Hints};
use crate::image::{ImageError, ImageSpec, Progress, Written};
use crate::inventory::Inventory;
pub use runner::{Context, Runner};

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

impl Outcome {
    /// A failed image write: the kind from the error's, the whole chain as the message (it
    /// says where the write failed and what was done about it).
    pub fn image_failure(e: &ImageError) -> Outcome {
        let kind = match e.kind() {
            "checksum" => FailureKind::ChecksumMismatch,
            "download" => FailureKind::Download,
            "disk" => FailureKind::Disk,
            _ => FailureKind::InvalidRequest,
        };
        Outcome::Failure {
            kind,
            message: chain(e),
        }
    }
}

/// No disk fits the root device hints: an invalid request (the hints or the machine must
/// change), saying why each disk was passed over.
impl From<disk::NoMatch> for Outcome {
    fn from(e: disk::NoMatch) -> Outcome {
        Outcome::Failure {
            kind: FailureKind::InvalidRequest,
            message: e.0,
        }
    }
}

/// The warnings of an image write, as `; warning: ...` after its success message.
pub fn warnings_suffix(w: &Written) -> String {
    w.warnings
        .iter()
        .map(|x| format!("; warning: {x}"))
        .collect()
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

/// What the session needs from whatever carries out the coordinator's commands: the real
/// [`Runner`] on this machine, or a simulated machine of the load generator. Updates reach
/// the session on the channel each executor was made with, power actions on a watch (see
/// [`Ledger::new`]).
pub trait Execute: Send + Sync {
    /// The inventory for the hello that opens every session.
    fn hello_inventory(&self) -> impl Future<Output = Inventory> + Send;
    /// Every command received so far, with its state (for the hello after a reconnect).
    fn statuses(&self) -> Vec<(String, State)>;
    /// A command from the coordinator. Idempotent by id: a command received again is
    /// answered with its state, never run twice.
    fn submit(&self, cmd: Command);
    /// A session opened (the coordinator accepted the hello). Nothing by default.
    fn session_opened(&self) {}
    /// The open session ended. Nothing by default.
    fn session_closed(&self) {}
}

/// The commands received, by id, and where their news goes: the bookkeeping that makes
/// commands idempotent, shared by every [`Execute`] so the real and the simulated machine
/// answer the coordinator alike.
pub struct Ledger {
    table: Mutex<BTreeMap<String, State>>,
    busy: Mutex<Option<String>>,
    updates: mpsc::UnboundedSender<Update>,
    power: watch::Sender<Option<PowerAction>>,
}

impl Ledger {
    /// A ledger reporting to `updates`, and the receiving end of its power requests.
    pub fn new(
        updates: mpsc::UnboundedSender<Update>,
    ) -> (Ledger, watch::Receiver<Option<PowerAction>>) {
        let (power, power_rx) = watch::channel(None);
        let ledger = Ledger {
            table: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(None),
            updates,
            power,
        };
        (ledger, power_rx)
    }

    /// Every command received so far, with its state.
    pub fn statuses(&self) -> Vec<(String, State)> {
        lock(&self.table)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Takes a command in: `true` when it is new and is to run now (it is recorded as
    /// running, and holds the disks if it touches them); `false` when it was answered
    /// instead: received before (its outcome sent again once finished), or refused because
    /// another disk-touching command is running.
    pub fn admit(&self, cmd: &Command) -> bool {
        let known = lock(&self.table).get(&cmd.id).cloned();
        if let Some(state) = known {
            // Sent again after a reconnect: answer, do not run twice.
            if let State::Finished(outcome) = state {
                self.send(Update::Finished {
                    id: cmd.id.clone(),
                    outcome,
                });
            }
            return false;
        }
        if cmd.kind.touches_disks() {
            let mut busy = lock(&self.busy);
            if let Some(other) = busy.as_ref() {
                let outcome = Outcome::Failure {
                    kind: FailureKind::Busy,
                    message: format!(
                        "the agent is still running command {other}; try again when it has finished"
                    ),
                };
                lock(&self.table).insert(cmd.id.clone(), State::Finished(outcome.clone()));
                self.send(Update::Finished {
                    id: cmd.id.clone(),
                    outcome,
                });
                return false;
            }
            *busy = Some(cmd.id.clone());
        }
        lock(&self.table).insert(cmd.id.clone(), State::Running(None));
        true
    }

    /// Tells the coordinator that `cmd` is running.
    pub fn started(&self, cmd: &Command) {
        self.send(Update::Log {
            id: cmd.id.clone(),
            warning: false,
            message: format!("running {} ({})", cmd.kind.name(), cmd.id),
        });
    }

    /// Records how `cmd` ended and reports it (a failure also as a warning line), frees the
    /// disks, and after a power command asks the session for the power action (with
    /// `allow_power` false: for the agent to exit instead).
    pub fn finish(&self, cmd: &Command, outcome: Outcome, allow_power: bool) {
        let id = cmd.id.clone();
        if let Outcome::Failure { message, .. } = &outcome {
            self.send(Update::Log {
                id: id.clone(),
                warning: true,
                message: format!("{} failed: {message}", cmd.kind.name()),
            });
        }
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
        lock(&self.table).insert(id.clone(), State::Finished(outcome.clone()));
        if cmd.kind.touches_disks() {
            *lock(&self.busy) = None;
        }
        self.send(Update::Finished { id, outcome });
        if let Some(action) = power {
            let action = if allow_power {
                action
            } else {
                PowerAction::Exit
            };
            let _ = self.power.send(Some(action));
        }
    }

    /// Tells the coordinator; progress is also kept as the running command's state.
    pub fn send(&self, update: Update) {
        if let Update::Progress { id, progress } = &update
            && let Some(state) = lock(&self.table).get_mut(id)
            && matches!(state, State::Running(_))
        {
            *state = State::Running(Some(progress.clone()));
        }
        let _ = self.updates.send(update);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub use crate::error_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(id: &str, kind: Kind) -> Command {
        Command {
            id: id.into(),
            kind,
        }
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Update>) -> Vec<Update> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn ok(message: &str) -> Outcome {
        Outcome::Success {
            message: message.into(),
            detail: Detail::None,
        }
    }

    #[test]
    fn a_command_runs_once_and_is_answered_with_its_outcome_when_sent_again() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (ledger, power) = Ledger::new(tx);
        let inspect = cmd("i-1", Kind::Inspect);
        assert!(ledger.admit(&inspect));
        // Again while running: not run again, nothing to say yet.
        assert!(!ledger.admit(&inspect));
        assert_eq!(drain(&mut rx), vec![]);
        assert_eq!(
            ledger.statuses(),
            vec![("i-1".to_string(), State::Running(None))]
        );
        ledger.finish(&inspect, ok("done"), true);
        let finished = Update::Finished {
            id: "i-1".into(),
            outcome: ok("done"),
        };
        assert_eq!(drain(&mut rx), vec![finished.clone()]);
        // Again once finished: the same outcome, still not run.
        assert!(!ledger.admit(&inspect));
        assert_eq!(drain(&mut rx), vec![finished]);
        assert!(power.borrow().is_none(), "not a power command");
    }

    #[test]
    fn a_second_disk_command_is_refused_as_busy_until_the_first_ends() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (ledger, _power) = Ledger::new(tx);
        let first = cmd("e-1", Kind::EraseMetadata { full: false });
        let second = cmd("e-2", Kind::EraseMetadata { full: true });
        assert!(ledger.admit(&first));
        assert!(
            ledger.admit(&cmd("i-1", Kind::Inspect)),
            "not a disk command"
        );
        assert!(!ledger.admit(&second));
        let refused = drain(&mut rx);
        assert!(
            matches!(&refused[..], [Update::Finished { id, outcome: Outcome::Failure { kind: FailureKind::Busy, message } }]
                if id == "e-2" && message.contains("e-1")),
            "{refused:?}"
        );
        ledger.finish(&first, ok("wiped"), true);
        assert!(ledger.admit(&cmd("e-3", Kind::EraseMetadata { full: false })));
    }

    #[test]
    fn power_commands_ask_for_their_action_or_for_an_exit() {
        for (kind, detail, allowed, want) in [
            (Kind::Reboot, Detail::None, true, PowerAction::Reboot),
            (Kind::PowerOff, Detail::None, true, PowerAction::PowerOff),
            (Kind::Kexec, Detail::KexecLoaded, true, PowerAction::Kexec),
            (Kind::Kexec, Detail::None, true, PowerAction::Reboot),
            (Kind::Reboot, Detail::None, false, PowerAction::Exit),
        ] {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let (ledger, power) = Ledger::new(tx);
            let c = cmd("p", kind);
            assert!(ledger.admit(&c));
            ledger.started(&c);
            let outcome = Outcome::Success {
                message: "now".into(),
                detail,
            };
            ledger.finish(&c, outcome, allowed);
            assert_eq!(*power.borrow(), Some(want));
            let updates = drain(&mut rx);
            assert!(matches!(
                &updates[..],
                [Update::Log { .. }, Update::Finished { .. }]
            ));
        }
    }

    #[test]
    fn failures_are_also_logged_and_progress_is_kept_as_the_state() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (ledger, _power) = Ledger::new(tx);
        let w = cmd("w", Kind::EraseMetadata { full: true });
        assert!(ledger.admit(&w));
        let progress = Progress {
            phase: "erase",
            bytes_done: 1,
            bytes_total: 2,
            bytes_per_second: 1,
            stalled_seconds: 0,
        };
        ledger.send(Update::Progress {
            id: "w".into(),
            progress: progress.clone(),
        });
        assert_eq!(
            ledger.statuses(),
            vec![("w".to_string(), State::Running(Some(progress)))]
        );
        let failure = Outcome::Failure {
            kind: FailureKind::Disk,
            message: "gone".into(),
        };
        ledger.finish(&w, failure.clone(), true);
        let updates = drain(&mut rx);
        assert!(
            matches!(&updates[1], Update::Log { warning: true, message, .. } if message == "erase-full failed: gone"),
            "{updates:?}"
        );
        assert_eq!(
            ledger.statuses(),
            vec![("w".to_string(), State::Finished(failure))]
        );
    }
}
