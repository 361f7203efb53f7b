//! `plan` tested as a table: every state x every event, rendered one line per case and compared
//! with `tests/transitions.txt` (review changes with `UPDATE_EXPECT=1 cargo test -p
//! slipway-reconcile` and `git diff`). Targeted tests below check whole flows.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use expect_test::expect_file;
use jiff::{SignedDuration, Timestamp};
use slipway_reconcile::annotations;
use slipway_reconcile::host::{
    AgentStatus, ChecksumType, CleaningMode, CommandKind, CommandRecord, ERASE_ANNOTATION,
    ErrorType, HardwareDetails, HostSpec, HostStatus, Image, ImageFormat, Progress,
    ProvisioningState as S, REBOOT_ANNOTATION, SecretRef,
};
use slipway_reconcile::validate::{Problem, SecretKeys};
use slipway_reconcile::{
    Action, AgentLink, CommandFailure, CommandSuccess, CommandView, Desired, Observed, Plan,
    Policy, Slot, plan,
};

fn t0() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn image() -> Image {
    Image {
        url: "http://10.0.0.1:8080/images/os.img".into(),
        checksum: "ab".repeat(32),
        checksum_type: Some(ChecksumType::Sha256),
        format: Some(ImageFormat::Raw),
        ..Default::default()
    }
}

fn hardware() -> HardwareDetails {
    HardwareDetails {
        ram_mebibytes: 2048,
        hostname: "h".into(),
        ..Default::default()
    }
}

/// The command a host in `state` waits on, if any.
fn command_for(state: S) -> Option<CommandKind> {
    match state {
        S::Inspecting => Some(CommandKind::Inspect),
        S::Preparing | S::Deprovisioning => Some(CommandKind::EraseMetadata { full: false }),
        S::Provisioning => Some(CommandKind::WriteImage {
            image: image(),
            root_device_hints: None,
            config_drive: None,
        }),
        _ => None,
    }
}

/// A host sitting in `state` as it would after normal operation, agent connected.
struct Case {
    spec: HostSpec,
    annotations: BTreeMap<String, String>,
    secrets: SecretKeys,
    deleted: bool,
    status: HostStatus,
    agent: Option<AgentLink>,
    view: View,
    now: Timestamp,
    inventory: Option<std::sync::Arc<HardwareDetails>>,
    slot: Slot,
    conflicts: Vec<Problem>,
}

#[derive(Clone)]
enum View {
    Unknown,
    Running(Option<Progress>),
    Succeeded(CommandSuccess),
    Failed(CommandFailure),
}

fn link(since: Timestamp) -> AgentLink {
    AgentLink {
        since,
        address: "10.0.0.9:40000".into(),
        version: "0.1.0".into(),
    }
}

fn baseline(state: S) -> Case {
    let mut spec = HostSpec {
        online: true,
        ..Default::default()
    };
    if matches!(state, S::Provisioning | S::Provisioned) {
        spec.image = Some(image());
    }
    if state == S::ExternallyProvisioned {
        spec.externally_provisioned = true;
    }
    let mut status = HostStatus::default();
    status.provisioning.state = state;
    status.agent = Some(AgentStatus {
        connected: true,
        since: Some(t0()),
        address: "10.0.0.9:40000".into(),
        version: "0.1.0".into(),
        ..Default::default()
    });
    status.powered_on = true;
    if state >= S::Preparing {
        status.hardware = Some(std::sync::Arc::new(hardware()));
    }
    if matches!(state, S::Provisioning | S::Provisioned) {
        status.provisioning.image = Some(image());
    }
    let view = match command_for(state) {
        Some(kind) => {
            status.current_command = Some(CommandRecord {
                id: format!("{}-1", kind.name()),
                kind,
                issued_at: t0(),
            });
            View::Running(None)
        }
        None => View::Unknown,
    };
    Case {
        spec,
        annotations: BTreeMap::new(),
        secrets: SecretKeys::new(),
        deleted: matches!(state, S::PoweringOffBeforeDelete | S::Deleting),
        status,
        agent: Some(link(t0())),
        view,
        now: t0() + SignedDuration::from_secs(60),
        inventory: None,
        slot: Slot::Free,
        conflicts: Vec::new(),
    }
}

type Event = (&'static str, fn(&mut Case));

const EVENTS: &[Event] = &[
    ("nothing", |_| {}),
    ("agent reconnects", |c| {
        c.agent = Some(link(c.now));
        c.view = View::Unknown;
    }),
    ("agent disconnects", |c| {
        c.agent = None;
        c.view = View::Unknown;
    }),
    ("agent lost 11 min", |c| {
        c.agent = None;
        c.view = View::Unknown;
        if let Some(a) = &mut c.status.agent {
            a.connected = false;
            a.disconnected_at = Some(t0());
        }
        c.now = t0() + SignedDuration::from_mins(11);
    }),
    ("agent inventory", |c| {
        c.inventory = Some(std::sync::Arc::new(HardwareDetails {
            hostname: "reported".into(),
            ..hardware()
        }))
    }),
    ("progress", |c| {
        c.view = View::Running(Some(Progress {
            command_id: "x".into(),
            phase: "download".into(),
            bytes_done: 50,
            bytes_total: 100,
            bytes_per_second: 10,
        }))
    }),
    ("command succeeds", |c| {
        c.view = View::Succeeded(CommandSuccess {
            message: "done".into(),
            hardware: Some(std::sync::Arc::new(hardware())),
        })
    }),
    ("command fails", |c| {
        c.view = View::Failed(CommandFailure {
            message: "disk on fire".into(),
        })
    }),
    ("image set", |c| c.spec.image = Some(image())),
    ("image removed", |c| c.spec.image = None),
    ("spec invalid", |c| {
        c.spec.boot_mac_address = Some("nope".into())
    }),
    ("cleaning disabled", |c| {
        c.spec.automated_cleaning_mode = Some(CleaningMode::Disabled)
    }),
    ("user data missing", |c| {
        c.spec.user_data = Some(SecretRef {
            name: "ud".into(),
            namespace: None,
        })
    }),
    ("full erase asked", |c| {
        c.annotations.insert(ERASE_ANNOTATION.into(), "full".into());
    }),
    ("kexec reboot asked", |c| {
        c.annotations
            .insert(REBOOT_ANNOTATION.into(), "kexec".into());
    }),
    ("deleted", |c| c.deleted = true),
    ("deleted, cleaning disabled", |c| {
        c.deleted = true;
        c.spec.automated_cleaning_mode = Some(CleaningMode::Disabled);
    }),
    ("deleted, agent gone", |c| {
        c.deleted = true;
        c.agent = None;
        c.view = View::Unknown;
    }),
    ("paused", |c| {
        c.annotations
            .insert(annotations::PAUSED.into(), String::new());
        c.view = View::Succeeded(CommandSuccess {
            message: "done".into(),
            hardware: Some(std::sync::Arc::new(hardware())),
        });
    }),
    ("paused, deleted", |c| {
        c.annotations
            .insert(annotations::PAUSED.into(), String::new());
        c.deleted = true;
    }),
    ("pause removed", |c| c.status.paused = true),
    ("detached", |c| {
        c.annotations
            .insert(annotations::DETACHED.into(), String::new());
    }),
    ("detached, forced", |c| {
        c.annotations
            .insert(annotations::DETACHED.into(), r#"{"force":true}"#.into());
    }),
    ("detached, deleted", |c| {
        c.annotations
            .insert(annotations::DETACHED.into(), String::new());
        c.deleted = true;
    }),
    ("detached with delete delay, deleted", |c| {
        c.annotations.insert(
            annotations::DETACHED.into(),
            r#"{"deleteAction":"delay"}"#.into(),
        );
        c.deleted = true;
    }),
    ("detach removed", |c| {
        c.status.operational_status = slipway_reconcile::host::OperationalStatus::Detached;
    }),
    ("reboot asked", |c| {
        c.annotations
            .insert(annotations::REBOOT_PREFIX.into(), String::new());
    }),
    ("reboot asked, no agent", |c| {
        c.annotations
            .insert(annotations::REBOOT_PREFIX.into(), String::new());
        c.agent = None;
        c.view = View::Unknown;
    }),
    ("reboot asked, done before", |c| {
        c.annotations
            .insert(annotations::REBOOT_PREFIX.into(), String::new());
        c.status
            .handled_annotations
            .insert(annotations::REBOOT_PREFIX.into(), String::new());
    }),
    ("hard reboot forced", |c| {
        c.annotations.insert(
            annotations::REBOOT_PREFIX.into(),
            r#"{"mode":"hard","force":true}"#.into(),
        );
    }),
    ("held off by reboot.metal3.io/x", |c| {
        c.annotations.insert(
            "reboot.metal3.io/x".into(),
            r#"{"mode":"hard","force":true}"#.into(),
        );
    }),
    ("inspect asked", |c| {
        c.annotations
            .insert(annotations::INSPECT.into(), String::new());
    }),
    ("inspect disabled", |c| {
        c.annotations
            .insert(annotations::INSPECT.into(), "disabled".into());
    }),
    ("online false", |c| c.spec.online = false),
    ("online true, powered off", |c| {
        c.status.powered_on = false;
        c.agent = None;
        c.view = View::Unknown;
    }),
    ("boot MAC conflict", |c| {
        c.conflicts.push(Problem {
            field: "spec.bootMACAddress",
            message: "52:54:00:00:00:01 is also the boot MAC of host other".into(),
        })
    }),
    ("retry due", |c| {
        c.status.current_command = None;
        c.view = View::Unknown;
        c.status.error_type = Some(ErrorType::Provisioning);
        c.status.error_message = "earlier failure".into();
        c.status.error_count = 1;
        c.status.retry_after = Some(t0() + SignedDuration::from_secs(10));
    }),
    ("no free slot", |c| c.slot = Slot::Busy { limit: 20 }),
    ("image set, no free slot", |c| {
        c.spec.image = Some(image());
        c.slot = Slot::Busy { limit: 20 };
    }),
    ("retry due, no free slot", |c| {
        c.status.current_command = None;
        c.view = View::Unknown;
        c.status.error_type = Some(ErrorType::Provisioning);
        c.status.error_message = "earlier failure".into();
        c.status.error_count = 1;
        c.status.retry_after = Some(t0() + SignedDuration::from_secs(10));
        c.slot = Slot::Busy { limit: 20 };
    }),
    ("delayed, then a slot is free", |c| {
        c.spec.image = Some(image());
        c.status.current_command = None;
        c.view = View::Unknown;
        c.status.operational_status = slipway_reconcile::host::OperationalStatus::Delayed;
    }),
];

fn run(case: &Case) -> Plan {
    let policy = Policy::default();
    let view = match &case.view {
        View::Unknown => CommandView::Unknown,
        View::Running(p) => CommandView::Running(p.as_ref()),
        View::Succeeded(s) => CommandView::Succeeded(s),
        View::Failed(f) => CommandView::Failed(f),
    };
    let desired = Desired {
        name: "h",
        spec: &case.spec,
        annotations: &case.annotations,
        secrets: &case.secrets,
        deleted: case.deleted,
        policy: &policy,
        conflicts: &case.conflicts,
    };
    let observed = Observed {
        status: &case.status,
        agent: case.agent.as_ref(),
        command: view,
        inventory: case.inventory.as_ref(),
        slot: case.slot,
    };
    plan(&desired, &observed, case.now)
}

fn render(case: &Case, out: &Plan) -> String {
    let mut line = out.status.provisioning.state.to_string();
    if let Some(e) = out.status.error_type {
        write!(line, " [{e} #{}]", out.status.error_count).unwrap();
    }
    match out.status.operational_status {
        slipway_reconcile::host::OperationalStatus::Delayed => line.push_str(" (delayed)"),
        slipway_reconcile::host::OperationalStatus::Detached => line.push_str(" (detached)"),
        _ => {}
    }
    if out.status.paused {
        line.push_str(" (paused)");
    }
    if out.status.powered_on != case.status.powered_on {
        line.push_str(if out.status.powered_on {
            " powered:on"
        } else {
            " powered:off"
        });
    }
    for action in &out.actions {
        match action {
            Action::Send(cmd) => {
                let again = case
                    .status
                    .current_command
                    .as_ref()
                    .is_some_and(|c| c.id == cmd.id);
                write!(
                    line,
                    " send:{}{}",
                    cmd.kind.name(),
                    if again { "(again)" } else { "" }
                )
                .unwrap();
            }
            Action::Forget => line.push_str(" forget"),
            Action::Record(_) => {}
        }
    }
    if out.status.hardware != case.status.hardware {
        line.push_str(" +hardware");
    }
    if let Some(p) = &out.status.progress {
        write!(line, " progress:{}%", p.percent().unwrap_or(0)).unwrap();
    }
    if let Some(w) = out.wake_at {
        write!(line, " wake:+{}s", w.duration_since(case.now).as_secs()).unwrap();
    }
    line
}

#[test]
fn every_state_with_every_event() {
    let mut table = String::new();
    for state in S::ALL {
        let name = if state == S::None {
            "(new)"
        } else {
            state.as_str()
        };
        writeln!(table, "{name}").unwrap();
        for (event, apply) in EVENTS {
            let mut case = baseline(state);
            apply(&mut case);
            let out = run(&case);
            writeln!(table, "  {event:<18} -> {}", render(&case, &out)).unwrap();
            check_invariants(&case, &out);
        }
    }
    expect_file!["transitions.txt"].assert_eq(&table);
}

/// Properties that hold for every case, whatever the table says.
fn check_invariants(case: &Case, out: &Plan) {
    // Planning again with the result, the agent now running whatever was sent, asks for
    // nothing new: no command is sent twice.
    let again = Case {
        spec: case.spec.clone(),
        annotations: case.annotations.clone(),
        secrets: case.secrets.clone(),
        deleted: case.deleted,
        status: out.status.clone(),
        agent: case.agent.clone(),
        view: if out.status.current_command.is_some() && case.agent.is_some() {
            View::Running(None)
        } else {
            View::Unknown
        },
        now: case.now,
        inventory: case.inventory.clone(),
        conflicts: case.conflicts.clone(),
        // A host whose command takes a slot holds it, as the executor grants.
        slot: if out
            .status
            .current_command
            .as_ref()
            .is_some_and(|c| c.kind.takes_slot())
        {
            Slot::Free
        } else {
            case.slot
        },
    };
    let second = run(&again);
    let sends: Vec<_> = second
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Send(_)))
        .collect();
    assert!(
        sends.is_empty(),
        "re-planning {:?} sent {sends:?} again",
        case.status.provisioning.state
    );
    assert_eq!(
        second.status.provisioning.state,
        out.status.provisioning.state
    );
    // An error always carries a message.
    if out.status.error_type.is_some() {
        assert!(!out.status.error_message.is_empty());
    }
    // lastUpdated moves exactly when the status changed.
    if out.status != case.status {
        assert_eq!(out.status.last_updated, Some(case.now));
    } else {
        assert_eq!(out.status.last_updated, case.status.last_updated);
    }
}

// ----- flows -----

/// Drives a host through plan calls the way the executor does: commands sent are answered by
/// `answer`, until nothing more happens. Returns the state transitions recorded.
fn drive(
    spec: &HostSpec,
    status: &mut HostStatus,
    now: Timestamp,
    answer: impl Fn(&CommandKind) -> View,
) -> Vec<String> {
    let (log, _) = drive_with(spec, &BTreeMap::new(), false, status, now, answer);
    log
}

/// [`drive`] with annotations and deletion; also returns the names of the commands sent and
/// `forget` when the host was forgotten, in order.
fn drive_with(
    spec: &HostSpec,
    annotations: &BTreeMap<String, String>,
    deleted: bool,
    status: &mut HostStatus,
    now: Timestamp,
    answer: impl Fn(&CommandKind) -> View,
) -> (Vec<String>, Vec<String>) {
    let policy = Policy::default();
    let agent = link(now);
    let mut log = Vec::new();
    let mut sent = Vec::new();
    let mut view = View::Unknown;
    for _ in 0..20 {
        let v = match &view {
            View::Unknown => CommandView::Unknown,
            View::Running(p) => CommandView::Running(p.as_ref()),
            View::Succeeded(s) => CommandView::Succeeded(s),
            View::Failed(f) => CommandView::Failed(f),
        };
        let out = plan(
            &Desired {
                name: "h",
                spec,
                annotations,
                secrets: &SecretKeys::new(),
                deleted,
                policy: &policy,
                conflicts: &[],
            },
            &Observed {
                status,
                agent: Some(&agent),
                command: v,
                inventory: None,
                slot: Slot::Free,
            },
            now,
        );
        for action in &out.actions {
            match action {
                Action::Record(e) if e.reason == "StateChanged" => log.push(e.message.clone()),
                Action::Send(cmd) => sent.push(cmd.kind.name().to_string()),
                Action::Forget => sent.push("forget".into()),
                Action::Record(_) => {}
            }
        }
        let quiet = out.actions.iter().all(|a| matches!(a, Action::Record(_)));
        let forgotten = out.actions.contains(&Action::Forget);
        *status = out.status;
        view = match status.current_command.as_ref() {
            Some(cmd) => answer(&cmd.kind),
            None => View::Unknown,
        };
        if forgotten || (quiet && status.current_command.is_none()) {
            break;
        }
    }
    (log, sent)
}

fn succeed(_: &CommandKind) -> View {
    View::Succeeded(CommandSuccess {
        message: "ok".into(),
        hardware: Some(std::sync::Arc::new(hardware())),
    })
}

fn provisioned_host() -> (HostSpec, HostStatus) {
    let spec = HostSpec {
        online: true,
        image: Some(image()),
        ..Default::default()
    };
    let mut status = HostStatus::default();
    drive(&spec, &mut status, t0(), succeed);
    assert_eq!(status.provisioning.state, S::Provisioned);
    (spec, status)
}

#[test]
fn deleting_a_provisioned_host_cleans_it_first_as_metal3_does() {
    let (spec, mut status) = provisioned_host();
    let (log, sent) = drive_with(&spec, &BTreeMap::new(), true, &mut status, t0(), succeed);
    assert_eq!(
        log,
        [
            "provisioned -> deprovisioning",
            "deprovisioning -> powering off before delete",
            "powering off before delete -> deleting"
        ]
    );
    assert_eq!(sent, ["erase-metadata", "power-off", "forget"]);
    // With cleaning disabled, nothing is erased.
    let (mut spec, mut status) = provisioned_host();
    spec.automated_cleaning_mode = Some(CleaningMode::Disabled);
    let (_, sent) = drive_with(&spec, &BTreeMap::new(), true, &mut status, t0(), succeed);
    assert_eq!(sent, ["power-off", "forget"]);
    // Cleaning that keeps failing is given up after three attempts, as in metal3.
    let (spec, mut status) = provisioned_host();
    let fail = |_: &CommandKind| {
        View::Failed(CommandFailure {
            message: "disk gone".into(),
        })
    };
    let mut erases = 0;
    for i in 0..6 {
        let later = t0() + SignedDuration::from_hours(i);
        let (_, sent) = drive_with(&spec, &BTreeMap::new(), true, &mut status, later, fail);
        erases += sent.iter().filter(|s| *s == "erase-metadata").count();
        if sent.contains(&"forget".to_string()) {
            break;
        }
    }
    assert_eq!(status.provisioning.state, S::Deleting, "{status:?}");
    assert_eq!(erases, 4, "three retries after the first failure");
}

#[test]
fn a_reboot_annotation_reboots_once_per_value() {
    let (spec, mut status) = provisioned_host();
    let mut a = BTreeMap::new();
    a.insert(annotations::REBOOT_PREFIX.to_string(), String::new());
    let (_, sent) = drive_with(&spec, &a, false, &mut status, t0(), succeed);
    assert_eq!(sent, ["reboot"]);
    let (_, sent) = drive_with(&spec, &a, false, &mut status, t0(), succeed);
    assert!(sent.is_empty(), "{sent:?}");
    // Removed, then asked again: another reboot.
    drive_with(&spec, &BTreeMap::new(), false, &mut status, t0(), succeed);
    assert!(status.handled_annotations.is_empty());
    let (_, sent) = drive_with(&spec, &a, false, &mut status, t0(), succeed);
    assert_eq!(sent, ["reboot"]);
    // A suffixed one holds the host off until removed.
    a.insert(
        "reboot.metal3.io/remediation".into(),
        r#"{"mode":"hard"}"#.into(),
    );
    let (_, sent) = drive_with(&spec, &a, false, &mut status, t0(), succeed);
    assert_eq!(sent, ["power-off"]);
    assert!(!status.powered_on);
}

#[test]
fn a_paused_host_does_nothing_until_the_annotation_goes() {
    let spec = HostSpec {
        online: true,
        image: Some(image()),
        ..Default::default()
    };
    let mut status = HostStatus::default();
    let mut paused = BTreeMap::new();
    paused.insert(annotations::PAUSED.to_string(), "any".to_string());
    let (log, sent) = drive_with(&spec, &paused, false, &mut status, t0(), succeed);
    assert!(log.is_empty() && sent.is_empty(), "{log:?} {sent:?}");
    assert!(status.paused);
    // Deleting a paused host waits too.
    let (_, sent) = drive_with(&spec, &paused, true, &mut status, t0(), succeed);
    assert!(sent.is_empty(), "{sent:?}");
    let (log, _) = drive_with(&spec, &BTreeMap::new(), false, &mut status, t0(), succeed);
    assert!(!status.paused);
    assert_eq!(
        log.last().map(String::as_str),
        Some("provisioning -> provisioned")
    );
}

#[test]
fn inspect_annotation_reinspects_an_available_host_once() {
    let spec = HostSpec {
        online: true,
        ..Default::default()
    };
    let mut status = HostStatus::default();
    drive(&spec, &mut status, t0(), succeed);
    assert_eq!(status.provisioning.state, S::Available);
    let mut a = BTreeMap::new();
    a.insert(annotations::INSPECT.to_string(), String::new());
    let (log, sent) = drive_with(&spec, &a, false, &mut status, t0(), succeed);
    assert_eq!(log[0], "available -> inspecting");
    assert_eq!(sent[0], "inspect");
    assert_eq!(status.provisioning.state, S::Available);
    let (log, _) = drive_with(&spec, &a, false, &mut status, t0(), succeed);
    assert!(log.is_empty(), "once per value: {log:?}");
    // inspect.metal3.io: disabled skips inspection of a new host.
    a.insert(annotations::INSPECT.to_string(), "disabled".into());
    let mut fresh = HostStatus::default();
    let (log, sent) = drive_with(&spec, &a, false, &mut fresh, t0(), succeed);
    assert!(!sent.contains(&"inspect".to_string()), "{sent:?}");
    assert!(
        log.contains(&"registering -> preparing".to_string()),
        "{log:?}"
    );
}

#[test]
fn new_host_with_image_reaches_provisioned() {
    let spec = HostSpec {
        online: true,
        image: Some(image()),
        ..Default::default()
    };
    let mut status = HostStatus::default();
    let log = drive(&spec, &mut status, t0(), |_| {
        View::Succeeded(CommandSuccess {
            message: "ok".into(),
            hardware: Some(std::sync::Arc::new(hardware())),
        })
    });
    assert_eq!(
        log,
        [
            "host is registering",
            "registering -> inspecting",
            "inspecting -> preparing",
            "preparing -> available",
            "available -> provisioning",
            "provisioning -> provisioned",
        ]
    );
    assert_eq!(status.hardware, Some(std::sync::Arc::new(hardware())));
    assert_eq!(status.provisioning.image, Some(image()));
    assert!(status.powered_on);
    assert!(status.error_type.is_none());
    let h = &status.operation_history;
    assert!(h.register.end.is_some() && h.inspect.end.is_some() && h.provision.end.is_some());
}

#[test]
fn checksum_failure_is_a_provisioning_error_with_backoff() {
    let spec = HostSpec {
        image: Some(image()),
        ..Default::default()
    };
    let mut status = HostStatus::default();
    let log = drive(&spec, &mut status, t0(), |kind| match kind {
        CommandKind::WriteImage { .. } => View::Failed(CommandFailure {
            message: "checksum mismatch for http://x: expected ab.., got cd..".into(),
        }),
        _ => View::Succeeded(CommandSuccess {
            message: "ok".into(),
            hardware: Some(std::sync::Arc::new(hardware())),
        }),
    });
    assert_eq!(
        log.last().map(String::as_str),
        Some("available -> provisioning")
    );
    assert_eq!(status.error_type, Some(ErrorType::Provisioning));
    assert!(status.error_message.contains("checksum mismatch"));
    assert_eq!(status.error_count, 1);
    assert_eq!(
        status.retry_after,
        Some(t0() + SignedDuration::from_secs(10))
    );
}

#[test]
fn changing_the_image_after_a_failure_retries_at_once() {
    let policy = Policy::default();
    let mut spec = HostSpec {
        image: Some(image()),
        ..Default::default()
    };
    let mut status = HostStatus::default();
    status.provisioning.state = S::Provisioning;
    status.provisioning.image = Some(image());
    status.error_type = Some(ErrorType::Provisioning);
    status.error_message = "checksum mismatch".into();
    status.error_count = 3;
    status.retry_after = Some(t0() + SignedDuration::from_mins(5));
    spec.image.as_mut().unwrap().checksum = "cd".repeat(32);
    let agent = link(t0());
    let out = plan(
        &Desired {
            name: "h",
            spec: &spec,
            annotations: &BTreeMap::new(),
            secrets: &SecretKeys::new(),
            deleted: false,
            policy: &policy,
            conflicts: &[],
        },
        &Observed {
            status: &status,
            agent: Some(&agent),
            command: CommandView::Unknown,
            inventory: None,
            slot: Slot::Free,
        },
        t0(),
    );
    let sent: Vec<_> = out
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(c) => Some(&c.kind),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent,
        [&CommandKind::WriteImage {
            image: spec.image.clone().unwrap(),
            root_device_hints: None,
            config_drive: None,
        }]
    );
}

#[test]
fn backoff_doubles_and_caps() {
    let p = Policy::default();
    let secs: Vec<_> = (1..=9).map(|n| p.backoff(n).as_secs()).collect();
    assert_eq!(secs, [10, 20, 40, 80, 160, 320, 600, 600, 600]);
    assert_eq!(p.backoff(u32::MAX).as_secs(), 600);
}

#[test]
fn registration_error_is_counted_once_and_cleared_by_a_fix() {
    let policy = Policy::default();
    let mut spec = HostSpec {
        boot_mac_address: Some("zz".into()),
        ..Default::default()
    };
    let mut status = HostStatus::default();
    for _ in 0..3 {
        let out = plan(
            &Desired {
                name: "h",
                spec: &spec,
                annotations: &BTreeMap::new(),
                secrets: &SecretKeys::new(),
                deleted: false,
                policy: &policy,
                conflicts: &[],
            },
            &Observed {
                status: &status,
                agent: None,
                command: CommandView::Unknown,
                inventory: None,
                slot: Slot::Free,
            },
            t0(),
        );
        status = out.status;
    }
    assert_eq!(status.provisioning.state, S::Registering);
    assert_eq!(status.error_type, Some(ErrorType::Registration));
    assert_eq!(status.error_count, 1);
    assert!(status.error_message.starts_with("spec.bootMACAddress:"));
    spec.boot_mac_address = Some("52:54:00:00:00:01".into());
    let out = plan(
        &Desired {
            name: "h",
            spec: &spec,
            annotations: &BTreeMap::new(),
            secrets: &SecretKeys::new(),
            deleted: false,
            policy: &policy,
            conflicts: &[],
        },
        &Observed {
            status: &status,
            agent: None,
            command: CommandView::Unknown,
            inventory: None,
            slot: Slot::Free,
        },
        t0(),
    );
    assert_eq!(out.status.provisioning.state, S::Inspecting);
    assert_eq!(out.status.error_type, None);
    assert_eq!(out.status.error_count, 0);
}

#[test]
fn restart_mid_provisioning_resends_the_same_command() {
    // The coordinator restarted: its stored status has the command, the agent reconnects
    // and has either never heard of it or is still running it.
    let case = {
        let mut c = baseline(S::Provisioning);
        c.agent = Some(link(c.now));
        c.view = View::Unknown;
        c
    };
    let out = run(&case);
    let resent = out.actions.iter().find_map(|a| match a {
        Action::Send(c) => Some(c.id.clone()),
        _ => None,
    });
    assert_eq!(resent.as_deref(), Some("write-image-1"));
    assert_eq!(out.status.current_command, case.status.current_command);
}

#[test]
fn config_drive_secrets_wait_for_their_secret_and_commands_carry_references_only() {
    let policy = Policy::default();
    let spec = HostSpec {
        image: Some(image()),
        user_data: Some(SecretRef {
            name: "worker-0-user-data".into(),
            namespace: None,
        }),
        ..Default::default()
    };
    let mut status = HostStatus::default();
    status.provisioning.state = S::Provisioning;
    status.provisioning.image = Some(image());
    let agent = link(t0());
    let annotations = BTreeMap::new();
    let run = |secrets: &SecretKeys, status: &HostStatus| {
        plan(
            &Desired {
                name: "worker-0",
                spec: &spec,
                annotations: &annotations,
                secrets,
                deleted: false,
                policy: &policy,
                conflicts: &[],
            },
            &Observed {
                status,
                agent: Some(&agent),
                command: CommandView::Unknown,
                inventory: None,
                slot: Slot::Free,
            },
            t0(),
        )
    };
    let out = run(&SecretKeys::new(), &status);
    assert_eq!(out.status.error_type, Some(ErrorType::Provisioning));
    let msg = &out.status.error_message;
    assert!(
        msg.contains("spec.userData")
            && msg.contains("worker-0")
            && msg.contains("worker-0-user-data"),
        "{msg}"
    );
    assert!(!out.actions.iter().any(|a| matches!(a, Action::Send(_))));
    assert_eq!(out.wake_at, None, "waits for the Secret, not a timer");
    // Planning again with nothing new changes nothing (no error count creep).
    let again = run(&SecretKeys::new(), &out.status);
    assert_eq!(again.status.error_count, 1);

    let mut secrets = SecretKeys::new();
    secrets.insert("worker-0-user-data".into(), ["value".to_string()].into());
    let out = run(&secrets, &out.status);
    let sent: Vec<_> = out
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(c) => Some(c.kind.clone()),
            _ => None,
        })
        .collect();
    let [CommandKind::WriteImage { config_drive, .. }] = &sent[..] else {
        panic!("expected one write-image, got {sent:?}");
    };
    assert_eq!(
        config_drive
            .as_ref()
            .unwrap()
            .user_data
            .as_ref()
            .unwrap()
            .name,
        "worker-0-user-data"
    );
}

#[test]
fn a_written_image_reboots_by_kexec_when_annotated() {
    for (annotation, want) in [(None, "reboot"), (Some("kexec"), "kexec")] {
        let mut c = baseline(S::Provisioning);
        if let Some(a) = annotation {
            c.annotations.insert(REBOOT_ANNOTATION.into(), a.into());
        }
        c.view = View::Succeeded(CommandSuccess {
            message: "wrote 48 MiB".into(),
            hardware: None,
        });
        let out = run(&c);
        assert_eq!(out.status.provisioning.state, S::Provisioned);
        let sent: Vec<&str> = out
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(cmd) => Some(cmd.kind.name()),
                _ => None,
            })
            .collect();
        assert_eq!(sent, [want], "annotation {annotation:?}");
    }
}
