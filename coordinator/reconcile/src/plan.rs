//! The host state machine: `plan(desired, observed, now) -> Plan`.
//!
//! `plan` is level-triggered: it looks at what the owner wants ([`Desired`]), what Slipway last
//! wrote and what it sees now ([`Observed`]), and returns the status to write and the actions to
//! take. It is called after every event (a spec change, an agent connecting, a command result,
//! a timer) and is safe to call any number of times: calling it again with the same inputs and
//! the returned status asks for nothing new.
//!
//! One handler per state, in metal3's vocabulary. A host moves through
//! `registering -> inspecting -> preparing -> available -> provisioning -> provisioned`;
//! removing the image deprovisions it, deleting its document removes it.
//!
//! Commands to the agent are tracked in `status.currentCommand` (persisted), so a restarted
//! coordinator asks the agent about the same command instead of starting another, and the agent
//! (which keeps commands by id) never runs one twice.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

use crate::annotations::{self, Inspect, RebootMode};
use crate::host::{
    self, AgentStatus, CleaningMode, CommandKind, CommandRecord, ConfigDriveRefs, ErrorType,
    HardwareDetails, HostSpec, HostStatus, InspectionMode, OperationalStatus, Progress,
    ProvisioningState,
};
use crate::validate::{self, SecretKeys};

/// Timing policy for retries and lost agents.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// First retry delay after a failure; doubles with every further failure.
    pub retry_base: SignedDuration,
    /// The longest retry delay.
    pub retry_max: SignedDuration,
    /// How long a command may wait for a disconnected agent before the host shows an error.
    pub agent_lost_after: SignedDuration,
    /// The CPU architecture of the ramdisk the coordinator serves (`spec.architecture` must
    /// match it).
    pub ramdisk_architecture: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            retry_base: SignedDuration::from_secs(10),
            retry_max: SignedDuration::from_mins(10),
            agent_lost_after: SignedDuration::from_mins(10),
            ramdisk_architecture: "x86_64".into(),
        }
    }
}

impl Policy {
    /// Delay before attempt `n + 1` after `n` consecutive failures (n >= 1).
    pub fn backoff(&self, failures: u32) -> SignedDuration {
        let exp = failures.saturating_sub(1).min(30);
        let secs = self.retry_base.as_secs().saturating_mul(1i64 << exp);
        SignedDuration::from_secs(secs).min(self.retry_max)
    }
}

/// What the owner wants.
#[derive(Clone, Copy, Debug)]
pub struct Desired<'a> {
    /// The host's name (for messages).
    pub name: &'a str,
    pub spec: &'a HostSpec,
    /// The host's annotations (`slipway.io/erase`).
    pub annotations: &'a BTreeMap<String, String>,
    /// The Secrets the host's source knows, by name, with their key names (never values).
    pub secrets: &'a SecretKeys,
    /// The host's document was removed (files mode) or is being deleted (Kubernetes).
    pub deleted: bool,
    pub policy: &'a Policy,
    /// Registration problems only the fleet shows: a boot MAC or BMC address another host
    /// declares too, a document declared twice. They hold the host like its own problems.
    pub conflicts: &'a [validate::Problem],
}

/// What Slipway knows: the status it last wrote, and what it sees now.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    pub status: &'a HostStatus,
    /// The host's live agent session, if any.
    pub agent: Option<&'a AgentLink>,
    /// What the agent says about `status.current_command`.
    pub command: CommandView<'a>,
    /// The hardware the live agent reported when it connected (its hello).
    pub inventory: Option<&'a std::sync::Arc<HardwareDetails>>,
    /// Whether the host may start an operation that takes a slot (inspection, cleaning, an
    /// image write): the fleet-wide bound on concurrent provisioning work.
    pub slot: Slot,
}

/// The host's standing with the fleet's slots for inspection, cleaning and image writes
/// (metal3's `PROVISIONING_LIMIT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Slot {
    /// The host holds a slot, or may take one now.
    #[default]
    Free,
    /// Every one of the `limit` slots is taken (or promised to hosts that waited longer).
    Busy { limit: usize },
}

/// A live agent session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentLink {
    pub since: Timestamp,
    pub address: String,
    pub version: String,
}

/// The agent's view of the host's current command.
#[derive(Clone, Copy, Debug)]
pub enum CommandView<'a> {
    /// No agent, or an agent that has not heard of the command (e.g. it restarted).
    Unknown,
    /// Sent in this session, or reported running; with its latest progress.
    Running(Option<&'a Progress>),
    Succeeded(&'a CommandSuccess),
    Failed(&'a CommandFailure),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommandSuccess {
    pub message: String,
    /// Present in the result of `inspect`.
    pub hardware: Option<std::sync::Arc<HardwareDetails>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandFailure {
    pub message: String,
}

/// The outcome of [`plan`].
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The status to write (identical to the observed one when nothing changed).
    pub status: HostStatus,
    pub actions: Vec<Action>,
    /// Call `plan` again at this time even if nothing happens (a retry or a timeout is due).
    pub wake_at: Option<Timestamp>,
}

/// Something the executor must do, after it has stored `Plan::status`.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send a command to the host's agent (again, if it has the same id as before).
    Send(CommandRecord),
    /// The host is gone: drop its record, tokens and certificates.
    Forget,
    /// Record an event for `describe` / `kubectl describe`.
    Record(Event),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub warning: bool,
    /// CamelCase reason, as in Kubernetes events.
    pub reason: &'static str,
    pub message: String,
}

/// Steps a single `plan` call may take through states that finish at once.
const MAX_STEPS: usize = 8;

/// Decide what to do for one host.
pub fn plan(desired: &Desired<'_>, observed: &Observed<'_>, now: Timestamp) -> Plan {
    let mut p = Planner {
        d: *desired,
        o: *observed,
        now,
        status: observed.status.clone(),
        actions: Vec::new(),
        wake_at: None,
        view_for: observed
            .status
            .current_command
            .as_ref()
            .map(|c| c.id.clone()),
        delayed: false,
    };
    if p.paused() {
        return p.finish();
    }
    p.forget_handled();
    p.track_agent();
    if p.detached() {
        return p.finish();
    }
    for _ in 0..MAX_STEPS {
        let before = p.status.provisioning.state;
        p.step();
        if p.status.provisioning.state == before {
            break;
        }
    }
    // A detach asked during an operation takes effect once the host is steady.
    p.detached();
    p.finish()
}

struct Planner<'a> {
    d: Desired<'a>,
    o: Observed<'a>,
    now: Timestamp,
    status: HostStatus,
    actions: Vec<Action>,
    wake_at: Option<Timestamp>,
    /// The command id the observed `CommandView` is about.
    view_for: Option<String>,
    /// This plan waits for a slot (so `delayed` stays; otherwise it is cleared at the end).
    delayed: bool,
}

/// Where a command-driven step stands.
enum Drive {
    Waiting,
    Done(CommandSuccess),
    Failed,
}

impl Planner<'_> {
    fn state(&self) -> ProvisioningState {
        self.status.provisioning.state
    }

    fn go(&mut self, to: ProvisioningState) {
        let from = self.state();
        if from == to {
            return;
        }
        self.status.provisioning.state = to;
        let message = if from == ProvisioningState::None {
            format!("host is {to}")
        } else {
            format!("{from} -> {to}")
        };
        self.record(false, "StateChanged", message);
    }

    fn record(&mut self, warning: bool, reason: &'static str, message: String) {
        self.actions.push(Action::Record(Event {
            warning,
            reason,
            message,
        }));
    }

    fn wake(&mut self, at: Timestamp) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    fn after(&self, d: SignedDuration) -> Timestamp {
        self.now.checked_add(d).unwrap_or(Timestamp::MAX)
    }

    /// Mirror the live agent session into `status.agent`.
    fn track_agent(&mut self) {
        match (self.o.agent, &mut self.status.agent) {
            (Some(link), current) => {
                let fresh = current
                    .as_ref()
                    .is_none_or(|a| !a.connected || a.since != Some(link.since));
                if fresh {
                    *current = Some(AgentStatus {
                        connected: true,
                        since: Some(link.since),
                        disconnected_at: None,
                        address: link.address.clone(),
                        version: link.version.clone(),
                    });
                    let message = format!("agent {} connected from {}", link.version, link.address);
                    self.record(false, "AgentConnected", message);
                    // A machine whose agent talks is on.
                    self.status.powered_on = true;
                }
            }
            (None, Some(agent)) if agent.connected => {
                agent.connected = false;
                agent.disconnected_at = Some(self.now);
                self.record(false, "AgentDisconnected", "agent session ended".into());
            }
            (None, _) => {}
        }
    }

    fn step(&mut self) {
        use ProvisioningState as S;
        if self.d.deleted {
            // As metal3: a host that was (or is being) written to is deprovisioned (cleaned)
            // first; one never registered goes at once; any other is powered off.
            match self.state() {
                S::PoweringOffBeforeDelete | S::Deleting | S::Deprovisioning => {}
                S::Provisioning | S::Provisioned => {
                    self.abandon_command();
                    self.begin_deprovisioning();
                    // The next step drives the cleaning (this one's view of the agent was
                    // about the abandoned command).
                    return;
                }
                S::None | S::Unmanaged | S::Registering => {
                    self.abandon_command();
                    self.go(S::Deleting);
                }
                _ => {
                    self.abandon_command();
                    self.go(S::PoweringOffBeforeDelete);
                }
            }
        } else if matches!(self.state(), S::PoweringOffBeforeDelete | S::Deleting) {
            // Deleted and declared again before the record was dropped: start afresh.
            self.abandon_command();
            self.go(S::Registering);
            self.status.operation_history.register.begin(self.now);
            return;
        }
        if !matches!(self.state(), S::None | S::Unmanaged | S::Registering) && !self.d.deleted {
            // A spec that became invalid after registration holds the host (no new commands)
            // with the problem shown, until the owner fixes it.
            let problems = self.registration_problems();
            if !problems.is_empty() {
                self.fail_steady(ErrorType::Registration, validate::describe(&problems));
                return;
            }
            if self.status.error_type == Some(ErrorType::Registration) {
                self.clear_error();
            }
        }
        match self.state() {
            S::None => {
                self.go(S::Registering);
                self.status.operation_history.register.begin(self.now);
            }
            S::Unmanaged => {
                if self.d.spec.bmc.is_some() {
                    self.go(S::Registering);
                    self.status.operation_history.register.begin(self.now);
                } else if let Some(inv) = self.o.inventory {
                    // A discovered machine: keep what its agent reports.
                    if self.status.hardware.as_ref() != Some(inv) {
                        self.status.hardware = Some(inv.clone());
                        self.record(
                            false,
                            "Discovered",
                            "inventory received from the agent".into(),
                        );
                    }
                }
            }
            S::Registering => self.registering(),
            S::Inspecting => self.inspecting(),
            S::Preparing => self.preparing(),
            S::Available => self.available(),
            S::Provisioning => self.provisioning(),
            S::Provisioned => self.provisioned(),
            S::ExternallyProvisioned => self.externally_provisioned(),
            S::Deprovisioning => self.deprovisioning(),
            S::PoweringOffBeforeDelete => {
                if self.o.agent.is_some() && !self.d.spec.disable_power_off {
                    let cmd = self.new_command(CommandKind::PowerOff);
                    self.actions.push(Action::Send(cmd));
                    self.status.powered_on = false;
                }
                self.go(S::Deleting);
            }
            S::Deleting => {
                if !self.actions.contains(&Action::Forget) {
                    self.actions.push(Action::Forget);
                }
            }
        }
    }

    fn registration_problems(&self) -> Vec<validate::Problem> {
        let mut problems = validate::registration_problems(self.d.spec);
        problems.extend(validate::architecture_problems(
            self.d.spec,
            &self.d.policy.ramdisk_architecture,
        ));
        problems.extend(validate::bmc_credentials_problems(
            self.d.name,
            self.d.spec,
            self.d.secrets,
        ));
        problems.extend(validate::annotation_problems(self.d.annotations));
        problems.extend(self.d.conflicts.iter().cloned());
        problems
    }

    // ----- annotations -----

    /// `baremetalhost.metal3.io/paused`: the host is frozen (no state change, no command);
    /// the status says so.
    fn paused(&mut self) -> bool {
        let paused = annotations::paused(self.d.annotations);
        if paused != self.status.paused {
            self.status.paused = paused;
            if paused {
                self.record(
                    false,
                    "Paused",
                    format!(
                        "{} is set: Slipway does nothing for the host (not even delete it) \
                         until the annotation is removed",
                        annotations::PAUSED
                    ),
                );
            } else {
                self.record(
                    false,
                    "Resumed",
                    format!("{} was removed: management resumes", annotations::PAUSED),
                );
            }
        }
        if paused {
            // Whatever it waited for, it still does.
            self.delayed = self.status.operational_status == OperationalStatus::Delayed;
        }
        paused
    }

    /// One-shot requests whose annotation is gone (or changed) may be asked again.
    fn forget_handled(&mut self) {
        let a = self.d.annotations;
        self.status
            .handled_annotations
            .retain(|k, v| a.get(k) == Some(v));
    }

    /// `baremetalhost.metal3.io/detached`: management stops without deprovisioning, in a
    /// steady state (or any, with `force`); deleting a detached host skips cleaning and power
    /// off (or waits, with `deleteAction: delay`). Returns whether the host is detached now.
    fn detached(&mut self) -> bool {
        use ProvisioningState as S;
        let Some(args) = annotations::detached(self.d.annotations) else {
            if self.status.operational_status == OperationalStatus::Detached {
                self.status.operational_status = if self.status.error_type.is_some() {
                    OperationalStatus::Error
                } else {
                    OperationalStatus::Ok
                };
                self.record(
                    false,
                    "Reattached",
                    format!(
                        "{} was removed: Slipway manages the host again",
                        annotations::DETACHED
                    ),
                );
            }
            return false;
        };
        let state = self.state();
        if state == S::Deleting {
            return false;
        }
        if self.d.deleted && !args.delay_delete {
            self.abandon_command();
            self.record(
                false,
                "DetachedDelete",
                "the host is detached: it is removed without deprovisioning or powering off".into(),
            );
            self.go(S::Deleting);
            self.actions.push(Action::Forget);
            return true;
        }
        let steady = matches!(
            state,
            S::Provisioned | S::ExternallyProvisioned | S::Available
        );
        if !(steady || args.force || self.d.deleted) {
            // The current operation finishes first, as in metal3.
            return false;
        }
        if self.status.operational_status != OperationalStatus::Detached {
            self.abandon_command();
            self.status.operational_status = OperationalStatus::Detached;
            self.record(
                false,
                "Detached",
                format!(
                    "{} is set: Slipway no longer manages the host (nothing is sent to it; \
                     deleting it skips deprovisioning{}) until the annotation is removed",
                    annotations::DETACHED,
                    if args.delay_delete {
                        ", and waits while it is detached"
                    } else {
                        ""
                    }
                ),
            );
        }
        true
    }

    /// Inspection is off (`inspectionMode: disabled`, or metal3's older
    /// `inspect.metal3.io: disabled`).
    fn inspection_disabled(&self) -> bool {
        self.d.spec.inspection_mode == Some(InspectionMode::Disabled)
            || annotations::inspect(self.d.annotations) == Inspect::Disabled
    }

    /// With inspection off, `inspect.metal3.io/hardwaredetails` gives the hardware, when the
    /// status has none.
    fn hardware_from_annotation(&mut self) {
        if self.status.hardware.is_some() {
            return;
        }
        if let Some(Ok(hw)) = annotations::hardware_details(self.d.annotations) {
            self.status.hardware = Some(std::sync::Arc::new(hw));
            self.record(
                false,
                "HardwareDetails",
                format!(
                    "hardware details taken from the {} annotation",
                    annotations::HARDWARE_DETAILS
                ),
            );
        }
    }

    /// Power as `spec.online` and the reboot annotations ask, in the states where metal3
    /// manages it (available, provisioned, externally provisioned). Slipway has no BMC driver
    /// yet: power goes through the host's agent, and where there is none the status says what
    /// to do by hand.
    fn manage_power(&mut self) {
        use ProvisioningState as S;
        let provisioned = matches!(self.state(), S::Provisioned | S::ExternallyProvisioned);
        // As metal3: a host that is not provisioned reboots only when forced.
        let requests: Vec<_> = annotations::reboot_requests(self.d.annotations)
            .into_iter()
            .filter(|r| provisioned || r.force)
            .collect();
        // A host that may never be powered off (disablePowerOff) is rebooted once for a
        // suffixed annotation instead of held off, as metal3 does.
        let never_off = self.d.spec.disable_power_off;
        let hold = requests
            .iter()
            .find(|r| r.hold && !never_off)
            .map(|r| r.key.clone());
        let once = requests
            .iter()
            .find(|r| {
                (!r.hold || never_off)
                    && self.status.handled_annotations.get(&r.key) != Some(&r.value)
            })
            .cloned();
        let agent = self.o.agent.is_some();
        if let Some(r) = once {
            if agent {
                self.status
                    .handled_annotations
                    .insert(r.key.clone(), r.value.clone());
                let mode = match r.mode {
                    RebootMode::Soft => "soft",
                    RebootMode::Hard => "hard",
                };
                let note = if r.unreadable {
                    " (its value is not metal3's {\"mode\": \"hard\"|\"soft\"} JSON: a soft reboot \
                     is assumed)"
                } else {
                    ""
                };
                self.record(
                    false,
                    "Rebooting",
                    format!(
                        "{} asks for a {mode} reboot{note}: the agent reboots the machine",
                        r.key
                    ),
                );
                self.clear_power_error();
                let cmd = self.new_command(CommandKind::Reboot);
                self.actions.push(Action::Send(cmd));
                return;
            }
            if self.status.powered_on {
                let message = format!(
                    "{} asks to reboot host {}, which has no agent running (it runs its \
                     installed OS, or is off) and Slipway cannot drive BMCs yet: reboot it by \
                     hand, then remove the annotation",
                    r.key, self.d.name
                );
                self.fail_steady(ErrorType::PowerManagement, message);
                return;
            }
            // Already off: the reboot is the power on that follows.
            self.status.handled_annotations.insert(r.key, r.value);
        }
        let want_on = self.d.spec.online && hold.is_none();
        if want_on == self.status.powered_on {
            self.clear_power_error();
            return;
        }
        let why = match &hold {
            Some(key) => format!("{key} holds the host off until it is removed"),
            None if !want_on => "spec.online is false".to_string(),
            None => "spec.online is true".to_string(),
        };
        if !want_on && agent {
            self.record(
                false,
                "PoweringOff",
                format!("{why}: the agent powers the machine off"),
            );
            self.clear_power_error();
            self.status.powered_on = false;
            let cmd = self.new_command(CommandKind::PowerOff);
            self.actions.push(Action::Send(cmd));
            return;
        }
        if want_on && agent {
            self.status.powered_on = true;
            self.clear_power_error();
            return;
        }
        let message = if want_on {
            format!(
                "{why} but host {} is off, and Slipway cannot drive BMCs yet: power it on by \
                 hand (this clears when its agent connects)",
                self.d.name
            )
        } else {
            format!(
                "{why} but host {} has no agent running (it runs its installed OS) and Slipway \
                 cannot drive BMCs yet: power it off by hand, or set spec.online back to true",
                self.d.name
            )
        };
        self.fail_steady(ErrorType::PowerManagement, message);
    }

    fn clear_power_error(&mut self) {
        if self.status.error_type == Some(ErrorType::PowerManagement) {
            self.clear_error();
        }
    }

    /// Cleaning as the host asks for it: metadata, or every byte with `slipway.io/erase: full`.
    fn erase(&self) -> CommandKind {
        CommandKind::EraseMetadata {
            full: host::full_erase(self.d.annotations),
        }
    }

    fn registering(&mut self) {
        let problems = self.registration_problems();
        if !problems.is_empty() {
            self.fail_steady(ErrorType::Registration, validate::describe(&problems));
            return;
        }
        self.clear_error();
        self.status.operation_history.register.end = Some(self.now);
        if self.d.spec.externally_provisioned {
            self.externally_provisioned_now();
        } else if self.inspection_disabled() {
            self.hardware_from_annotation();
            self.go(ProvisioningState::Preparing);
        } else {
            self.status.operation_history.inspect.begin(self.now);
            self.go(ProvisioningState::Inspecting);
        }
    }

    fn inspecting(&mut self) {
        if self.inspection_disabled() {
            self.abandon_command();
            self.hardware_from_annotation();
            self.go(ProvisioningState::Preparing);
            return;
        }
        if let Drive::Done(success) = self.drive(CommandKind::Inspect, ErrorType::Inspection) {
            match success.hardware {
                Some(hardware) => {
                    self.status.hardware = Some(hardware);
                    self.status.operation_history.inspect.end = Some(self.now);
                    self.clear_error();
                    self.go(ProvisioningState::Preparing);
                }
                None => self.fail(
                    ErrorType::Inspection,
                    "the agent answered the inspect command without an inventory; this is a bug \
                     in the agent, report it with the agent's log"
                        .into(),
                ),
            }
        }
    }

    /// Automated cleaning before the host becomes available (metal3's `preparing`).
    fn preparing(&mut self) {
        if self.d.spec.externally_provisioned {
            self.abandon_command();
            self.externally_provisioned_now();
            return;
        }
        if self.d.spec.cleaning_mode() == CleaningMode::Disabled {
            self.abandon_command();
            self.go(ProvisioningState::Available);
            return;
        }
        if let Drive::Done(success) = self.drive(self.erase(), ErrorType::Preparation) {
            self.record(false, "CleaningComplete", success.message);
            self.clear_error();
            self.go(ProvisioningState::Available);
        }
    }

    fn available(&mut self) {
        if self.d.spec.externally_provisioned {
            self.externally_provisioned_now();
            return;
        }
        if let Inspect::Again(value) = annotations::inspect(self.d.annotations)
            && self.status.handled_annotations.get(annotations::INSPECT) != Some(&value)
        {
            self.status
                .handled_annotations
                .insert(annotations::INSPECT.to_string(), value);
            self.record(
                false,
                "InspectionRequested",
                format!("{} asks for a new inspection", annotations::INSPECT),
            );
            self.status.operation_history.inspect.begin(self.now);
            self.go(ProvisioningState::Inspecting);
            return;
        }
        if let Some(image) = self.d.spec.wanted_image() {
            if let Slot::Busy { limit } = self.o.slot {
                // As metal3 does: the host stays available, delayed, until a slot is free.
                self.delay(limit, "provisioning");
                return;
            }
            self.status.provisioning.image = Some(image.clone());
            self.status.provisioning.root_device_hints = self.d.spec.root_device_hints.clone();
            self.status.provisioning.boot_mode = self.d.spec.boot_mode;
            self.status.operation_history.provision.begin(self.now);
            self.go(ProvisioningState::Provisioning);
            if self.o.agent.is_none() {
                self.record(
                    false,
                    "WaitingForAgent",
                    "writing the image needs the host's agent: boot the machine over PXE or \
                     from its ISO (it is off, or runs another OS; Slipway cannot drive BMCs yet)"
                        .into(),
                );
            }
            return;
        }
        self.manage_power();
    }

    fn provisioning(&mut self) {
        let Some(image) = self.d.spec.wanted_image().cloned() else {
            self.abandon_command();
            self.begin_deprovisioning();
            return;
        };
        // The spec changed since the attempt began: the next attempt uses it, at once.
        if self.status.current_command.is_none()
            && self.status.provisioning.image.as_ref() != Some(&image)
        {
            self.status.provisioning.image = Some(image.clone());
            self.status.provisioning.root_device_hints = self.d.spec.root_device_hints.clone();
            self.status.retry_after = None;
        }
        let mut problems = validate::provisioning_problems(self.d.spec);
        problems.extend(validate::secret_problems(
            self.d.name,
            self.d.spec,
            self.d.secrets,
        ));
        if !problems.is_empty() && self.status.current_command.is_none() {
            self.fail_steady(ErrorType::Provisioning, validate::describe(&problems));
            return;
        }
        let written = self
            .status
            .provisioning
            .image
            .clone()
            .unwrap_or_else(|| image.clone());
        let want = CommandKind::WriteImage {
            image: written.clone(),
            root_device_hints: self.status.provisioning.root_device_hints.clone(),
            config_drive: ConfigDriveRefs::of(self.d.spec),
        };
        if let Drive::Done(success) = self.drive(want, ErrorType::Provisioning) {
            if written != image {
                // The owner changed the image while the old one was being written.
                self.wake(self.now);
                self.record(
                    false,
                    "ImageChanged",
                    format!(
                        "spec.image changed to {} while writing {}; writing it now",
                        image.url, written.url
                    ),
                );
                self.status.provisioning.image = Some(image);
                self.status.provisioning.root_device_hints = self.d.spec.root_device_hints.clone();
                return;
            }
            self.status.operation_history.provision.end = Some(self.now);
            self.clear_error();
            self.record(false, "ProvisioningComplete", success.message);
            self.go(ProvisioningState::Provisioned);
            // Boot the new OS (or stay off), without waiting for an answer: the agent goes away.
            let kind = if self.d.spec.online {
                if host::kexec_reboot(self.d.annotations) {
                    CommandKind::Kexec
                } else {
                    CommandKind::Reboot
                }
            } else {
                CommandKind::PowerOff
            };
            self.status.powered_on = self.d.spec.online;
            let cmd = self.new_command(kind);
            self.actions.push(Action::Send(cmd));
        }
    }

    fn provisioned(&mut self) {
        if self.d.spec.wanted_image().is_none() {
            self.begin_deprovisioning();
        } else {
            self.manage_power();
        }
    }

    fn begin_deprovisioning(&mut self) {
        self.status.operation_history.deprovision.begin(self.now);
        self.go(ProvisioningState::Deprovisioning);
        if self.o.agent.is_none() && self.d.spec.cleaning_mode() != CleaningMode::Disabled {
            let delete = if self.d.deleted {
                format!(
                    "; `slipway delete host {}` removes it without cleaning",
                    self.d.name
                )
            } else {
                String::new()
            };
            self.record(
                false,
                "WaitingForAgent",
                format!(
                    "cleaning needs the host's agent: boot the machine over PXE (Slipway serves \
                     it the ramdisk) or from its ISO; Slipway cannot drive BMCs yet{delete}"
                ),
            );
        }
    }

    fn deprovisioning(&mut self) {
        let done = self.d.spec.cleaning_mode() == CleaningMode::Disabled
            || match self.drive(self.erase(), ErrorType::Provisioning) {
                Drive::Done(success) => {
                    self.record(false, "CleaningComplete", success.message);
                    true
                }
                // As metal3: a host being deleted is given up on after three failed cleanings.
                Drive::Failed if self.d.deleted && self.status.error_count > 3 => {
                    self.record(
                        true,
                        "CleaningAbandoned",
                        format!(
                            "giving up cleaning after {} failed attempts; the host is deleted \
                             with its disks as they are: clean them by hand",
                            self.status.error_count
                        ),
                    );
                    true
                }
                _ => false,
            };
        if done {
            self.abandon_command();
            self.status.provisioning.image = None;
            self.status.provisioning.root_device_hints = None;
            self.status.operation_history.deprovision.end = Some(self.now);
            self.clear_error();
            if self.d.deleted {
                self.go(ProvisioningState::PoweringOffBeforeDelete);
            } else {
                self.go(ProvisioningState::Available);
            }
        }
    }

    /// Something else provisioned the host, and powers it: Slipway takes its power as the
    /// owner says it is (it has no BMC driver to read it), so an unknown power state is not
    /// an error; later changes of `online` are managed.
    fn externally_provisioned_now(&mut self) {
        if self.o.agent.is_none() {
            self.status.powered_on = self.d.spec.online;
        }
        self.go(ProvisioningState::ExternallyProvisioned);
    }

    fn externally_provisioned(&mut self) {
        if !self.d.spec.externally_provisioned {
            if self.status.hardware.is_some() {
                self.go(ProvisioningState::Preparing);
            } else {
                self.status.operation_history.inspect.begin(self.now);
                self.go(ProvisioningState::Inspecting);
            }
        } else {
            self.manage_power();
        }
    }

    // ----- commands -----

    fn new_command(&self, kind: CommandKind) -> CommandRecord {
        CommandRecord {
            id: format!("{}-{}", kind.name(), self.now.as_millisecond()),
            kind,
            issued_at: self.now,
        }
    }

    /// The agent's view of the current command, if it is still the one that was observed.
    fn view(&self) -> CommandView<'_> {
        let current = self.status.current_command.as_ref().map(|c| &c.id);
        if current.is_some() && current == self.view_for.as_ref() {
            self.o.command
        } else {
            CommandView::Unknown
        }
    }

    fn abandon_command(&mut self) {
        self.status.current_command = None;
        self.status.progress = None;
    }

    /// Get `want` done by the agent: send it, wait for it, resend it after a reconnect, and
    /// turn its failure or a lost agent into `error_type`.
    fn drive(&mut self, want: CommandKind, error_type: ErrorType) -> Drive {
        if let Some(current) = &self.status.current_command
            && !current.kind.same_kind(&want)
        {
            // Left over from an earlier state; its answer no longer matters.
            self.abandon_command();
        }
        let view = self.view();
        let Some(current) = self.status.current_command.clone() else {
            if self.o.agent.is_none() {
                return Drive::Waiting;
            }
            if let Some(at) = self.status.retry_after.filter(|at| *at > self.now) {
                self.wake(at);
                return Drive::Waiting;
            }
            if want.takes_slot() {
                if let Slot::Busy { limit } = self.o.slot {
                    self.delay(limit, want.name());
                    return Drive::Waiting;
                }
                self.undelay();
            }
            let cmd = self.new_command(want);
            self.status.current_command = Some(cmd.clone());
            self.status.progress = None;
            self.status.retry_after = None;
            self.actions.push(Action::Send(cmd));
            return Drive::Waiting;
        };
        match view {
            CommandView::Succeeded(success) => {
                let success = success.clone();
                self.abandon_command();
                Drive::Done(success)
            }
            CommandView::Failed(failure) => {
                let message = failure.message.clone();
                self.abandon_command();
                self.fail(error_type, message);
                Drive::Failed
            }
            CommandView::Running(progress) => {
                if let Some(progress) = progress {
                    self.status.progress = Some(progress.clone());
                }
                Drive::Waiting
            }
            CommandView::Unknown if self.o.agent.is_some() => {
                // A new session that has not heard of the command: ask again, same id.
                self.actions.push(Action::Send(current));
                Drive::Waiting
            }
            CommandView::Unknown => {
                let lost_since = self
                    .status
                    .agent
                    .as_ref()
                    .and_then(|a| a.disconnected_at)
                    .map_or(current.issued_at, |t| t.max(current.issued_at));
                let deadline = lost_since
                    .checked_add(self.d.policy.agent_lost_after)
                    .unwrap_or(Timestamp::MAX);
                if self.now < deadline {
                    self.wake(deadline);
                    return Drive::Waiting;
                }
                self.abandon_command();
                let minutes = self.now.duration_since(lost_since).as_secs() / 60;
                self.fail_no_retry(
                    error_type,
                    format!(
                        "lost contact with the agent {minutes} min ago while it was running {}; \
                         the host may have rebooted or lost its network: check its console. \
                         Slipway sends the command again when the agent reconnects",
                        current.id
                    ),
                );
                Drive::Failed
            }
        }
    }

    // ----- slots -----

    /// No slot is free for `what`: wait, delayed (metal3's operational status for it), until
    /// the executor plans the host again with a free slot.
    fn delay(&mut self, limit: usize, what: &str) {
        self.delayed = true;
        if self.status.operational_status != OperationalStatus::Delayed {
            self.status.operational_status = OperationalStatus::Delayed;
            self.record(
                false,
                "Delayed",
                format!(
                    "waiting for a free slot to start {what}: {limit} hosts are already \
                     inspecting, cleaning or writing images (slipway serve \
                     --provisioning-limit {limit})"
                ),
            );
        }
    }

    /// A slot was granted: the host is no longer delayed.
    fn undelay(&mut self) {
        if self.status.operational_status == OperationalStatus::Delayed {
            self.status.operational_status = if self.status.error_type.is_some() {
                OperationalStatus::Error
            } else {
                OperationalStatus::Ok
            };
        }
    }

    // ----- errors -----

    /// A failure that is retried after a backoff.
    fn fail(&mut self, error_type: ErrorType, message: String) {
        self.set_error(error_type, message);
        let at = self.after(self.d.policy.backoff(self.status.error_count));
        self.status.retry_after = Some(at);
        self.wake(at);
    }

    /// A failure retried as soon as the agent is back.
    fn fail_no_retry(&mut self, error_type: ErrorType, message: String) {
        self.set_error(error_type, message);
        self.status.retry_after = None;
    }

    /// A failure that only a spec change can fix: counted once, not retried.
    fn fail_steady(&mut self, error_type: ErrorType, message: String) {
        if self.status.error_type == Some(error_type) && self.status.error_message == message {
            return;
        }
        self.set_error(error_type, message);
    }

    fn set_error(&mut self, error_type: ErrorType, message: String) {
        self.status.error_type = Some(error_type);
        self.status.error_count = self.status.error_count.saturating_add(1);
        self.status.operational_status = OperationalStatus::Error;
        self.record(true, "Error", format!("{error_type}: {message}"));
        self.status.error_message = message;
    }

    fn clear_error(&mut self) {
        if self.status.error_type.is_some() || self.status.error_count > 0 {
            self.status.error_type = None;
            self.status.error_message.clear();
            self.status.error_count = 0;
            self.status.retry_after = None;
        }
        if self.status.operational_status == OperationalStatus::Error {
            self.status.operational_status = OperationalStatus::Ok;
        }
    }

    fn finish(mut self) -> Plan {
        if !self.delayed {
            // Whatever waited for a slot no longer does (a spec change, a deletion).
            self.undelay();
        }
        crate::conditions::update(&mut self.status, self.now);
        if self.status != *self.o.status {
            self.status.last_updated = Some(self.now);
        }
        Plan {
            status: self.status,
            actions: self.actions,
            wake_at: self.wake_at,
        }
    }
}
