//! One host in the engine: its record and status, its agent session, what is not durable
//! yet, and the actions that wait for it to be; and `plan_host`, which runs the planner for
//! it and sorts the plan's effects into writes and actions.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use jiff::Timestamp;
use slipway_reconcile::host::{
    HardwareDetails, HostKey, HostSpec, HostStatus, OperationalStatus, ProvisioningState, SecretRef,
};
use slipway_reconcile::validate::{Problem, SecretKeys};
use slipway_reconcile::{Action, AgentLink, CommandFailure, CommandView, Desired, Observed, Plan};
use tokio::sync::oneshot;
use tracing::{debug, info, info_span, warn};

use super::msg::{AgentReport, BootDecision, CommandSender, Enrolled, Outcome, Refusal};
use super::{Engine, PROGRESS_DURABLE_EVERY};
use crate::hardware::HardwareData;
use crate::metrics::{ErrorLabel, StateLabel, TransitionLabels};
use crate::sources::SecretKey;
use crate::state::{EventRecord, HostChange, HostRecord, TokenRecord};

pub(super) struct Session {
    pub id: u64,
    pub link: AgentLink,
    pub commands: CommandSender,
    /// Command ids sent on this session.
    pub sent: HashSet<String>,
    /// The latest report per command id.
    pub reports: HashMap<String, AgentReport>,
    /// The hardware reported in the hello.
    pub inventory: Option<std::sync::Arc<HardwareDetails>>,
    /// When the API last heard from this agent (Unix milliseconds).
    pub alive: Arc<std::sync::atomic::AtomicI64>,
}

impl Session {
    /// Heard from within [`super::SILENCE_LIMIT`].
    pub fn live(&self, now: Timestamp) -> bool {
        let heard = self.alive.load(std::sync::atomic::Ordering::Relaxed);
        now.as_millisecond() - heard < super::SILENCE_LIMIT.as_millis() as i64
    }
}

/// Changes of a host not yet handed to the store.
#[derive(Default)]
pub(super) struct Pending {
    pub remove: bool,
    pub record: bool,
    pub status: bool,
    pub events: Vec<(u64, EventRecord)>,
    /// Stored events dropped since (see [`crate::state::event_to_drop`]).
    pub events_dropped: Vec<u64>,
    pub hardware: Option<Box<HardwareData>>,
    pub tokens: Vec<(String, Option<TokenRecord>)>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        !self.remove
            && !self.record
            && !self.status
            && self.events.is_empty()
            && self.events_dropped.is_empty()
            && self.hardware.is_none()
            && self.tokens.is_empty()
    }

    /// A change that was not stored comes back in front of what happened since.
    pub fn restore(&mut self, failed: HostChange) {
        let later = std::mem::take(self);
        self.remove = failed.remove || later.remove;
        self.record = failed.record.is_some() || later.record;
        self.status = failed.status.is_some() || later.status;
        self.events = failed.events;
        self.events.extend(later.events);
        self.events_dropped = failed.events_dropped;
        self.events_dropped.extend(later.events_dropped);
        let dropped = &self.events_dropped;
        self.events.retain(|(s, _)| !dropped.contains(s));
        self.hardware = later.hardware.or(failed.hardware.map(Box::new));
        self.tokens = failed.tokens;
        self.tokens.extend(later.tokens);
    }
}

pub(super) enum Reply {
    Boot(oneshot::Sender<BootDecision>, BootDecision),
    Enrolled(
        oneshot::Sender<Result<Enrolled, Refusal>>,
        Result<Enrolled, Refusal>,
    ),
    Token(
        oneshot::Sender<Result<super::msg::Issued, String>>,
        Result<super::msg::Issued, String>,
    ),
}

impl Reply {
    pub fn send(self) {
        match self {
            Reply::Boot(tx, d) => {
                let _ = tx.send(d);
            }
            Reply::Enrolled(tx, r) => {
                let _ = tx.send(r);
            }
            Reply::Token(tx, r) => {
                let _ = tx.send(r);
            }
        }
    }

    /// The state this reply depends on could not be stored: say so instead.
    pub fn refuse(self, reason: &str) {
        let why = format!("the coordinator cannot store state right now ({reason}); try again");
        match self {
            Reply::Boot(tx, _) => {
                let _ = tx.send(BootDecision::Refuse(why));
            }
            Reply::Enrolled(tx, _) => {
                let _ = tx.send(Err(Refusal(why)));
            }
            Reply::Token(tx, _) => {
                let _ = tx.send(Err(why));
            }
        }
    }
}

/// Something to do once the host's changes up to batch `need` are durable.
pub(super) enum Act {
    Send {
        session: u64,
        cmd: slipway_reconcile::host::CommandRecord,
    },
    Reply(Reply),
}

pub(super) struct Held {
    pub need: u64,
    pub act: Act,
}

pub(super) struct Entry {
    /// Shared with the view (changed copy-on-write, `Arc::make_mut`).
    pub record: Arc<HostRecord>,
    /// Shared with the view and, once stored, with `saved_status`.
    pub status: Arc<HostStatus>,
    /// Recent events, oldest first, with their sequence numbers (shared with the view).
    pub events: VecDeque<(u64, Arc<EventRecord>)>,
    pub next_event: u64,
    pub session: Option<Session>,
    pub wake_at: Option<Timestamp>,
    pub pending: Pending,
    /// The batch in flight holding the host's latest change.
    pub inflight: Option<u64>,
    /// The status as last handed to the store.
    pub saved_status: Arc<HostStatus>,
    /// When a status was last handed to the store (progress-only changes wait for 30 s).
    pub status_saved_at: Timestamp,
    pub held: Vec<Held>,
    /// The planner said Forget: removed once the removal is durable.
    pub forgotten: bool,
    /// Since when the host has a significant change not yet durable (for the metric).
    pub dirty_since: Option<Instant>,
    pub sealed_since: Option<Instant>,
    /// The boot token handed out for the host's current boot (memory only: a restart mints
    /// a new one and revokes the old), given again to a repeated fetch until it is used.
    pub boot_token: Option<crate::tokens::TokenSecret>,
    /// When the machine was last heard of (a boot request, a session; memory only, so a
    /// restart counts as seen), for the expiry of discovered hosts.
    pub seen_at: Timestamp,
    /// The source declares the host more than once (two files), or its declaration no longer
    /// parses: the field, and why. The host keeps its last good declaration and shows this as
    /// a registration error.
    pub source_conflict: Option<(&'static str, String)>,
}

impl Entry {
    pub fn new(record: HostRecord, status: HostStatus, now: Timestamp) -> Entry {
        let status = Arc::new(status);
        Entry {
            record: Arc::new(record),
            saved_status: status.clone(),
            status,
            events: VecDeque::new(),
            next_event: 0,
            session: None,
            wake_at: None,
            pending: Pending::default(),
            inflight: None,
            status_saved_at: now,
            held: Vec::new(),
            forgotten: false,
            dirty_since: None,
            sealed_since: None,
            boot_token: None,
            seen_at: now,
            source_conflict: None,
        }
    }

    pub fn push_event(&mut self, event: EventRecord) {
        let seq = self.next_event;
        self.next_event += 1;
        let kind = event.reason.clone();
        self.events
            .push_back((seq, std::sync::Arc::new(event.clone())));
        self.pending.events.push((seq, event));
        let drop = crate::state::event_to_drop(
            self.events.iter().map(|(s, e)| (*s, e.reason.as_str())),
            &kind,
        );
        if let Some(drop) = drop {
            self.events.retain(|(s, _)| *s != drop);
            let before = self.pending.events.len();
            self.pending.events.retain(|(s, _)| *s != drop);
            if self.pending.events.len() == before {
                self.pending.events_dropped.push(drop);
            }
        }
    }

    /// The oldest event sequence the store keeps for this host.
    pub fn events_keep_from(&self) -> u64 {
        self.events.front().map_or(self.next_event, |(s, _)| *s)
    }

    pub fn state(&self) -> ProvisioningState {
        self.status.provisioning.state
    }

    /// Whether the host holds a slot (its command takes one) and whether it waits for one.
    pub fn slot_use(&self) -> (bool, bool) {
        let holds = self
            .status
            .current_command
            .as_ref()
            .is_some_and(|c| c.kind.takes_slot());
        let delayed = self.status.operational_status == OperationalStatus::Delayed;
        (holds, delayed)
    }

    /// Managed by the engine: declared (or discovered) and not deleted, or deleted but still
    /// being cleaned (its agent must connect and boot for that).
    pub fn in_play(&self) -> bool {
        !self.forgotten
            && (!self.record.deleted || self.state() == ProvisioningState::Deprovisioning)
    }

    /// Declared by a source and not deleted (discovered machines are not declared).
    pub fn declared(&self) -> bool {
        !self.forgotten && !self.record.deleted && self.record.origin != super::msg::DISCOVERED
    }

    /// The BMC endpoint, normalised (`validate::bmc_identity`).
    pub fn bmc_identity(&self) -> Option<String> {
        self.record
            .host
            .spec
            .bmc
            .as_ref()
            .and_then(|b| slipway_reconcile::validate::bmc_identity(&b.address))
    }

    pub fn boot_mac(&self) -> Option<String> {
        self.record
            .host
            .spec
            .boot_mac_address
            .as_deref()
            .and_then(crate::boot::normalize_mac)
    }
}

/// Whether `new` differs from `saved` in more than progress counters and the time stamp:
/// such changes are made durable at once; progress alone waits (at most 30 s per host, or a
/// phase change).
pub(super) fn significant(new: &HostStatus, saved: &HostStatus) -> bool {
    let HostStatus {
        operational_status,
        error_type,
        error_message,
        error_count,
        last_updated: _,
        hardware,
        provisioning,
        powered_on,
        operation_history,
        conditions,
        progress,
        agent,
        current_command,
        retry_after,
        possible_impostor,
        paused,
        handled_annotations,
    } = new;
    let same_progress = match (progress, &saved.progress) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.command_id == b.command_id && a.phase == b.phase && a.bytes_total == b.bytes_total
        }
        _ => false,
    };
    !(same_progress
        && *operational_status == saved.operational_status
        && *error_type == saved.error_type
        && *error_message == saved.error_message
        && *error_count == saved.error_count
        && *hardware == saved.hardware
        && *provisioning == saved.provisioning
        && *powered_on == saved.powered_on
        && *operation_history == saved.operation_history
        && *conditions == saved.conditions
        && *agent == saved.agent
        && *current_command == saved.current_command
        && *retry_after == saved.retry_after
        && *possible_impostor == saved.possible_impostor
        && *paused == saved.paused
        && *handled_annotations == saved.handled_annotations)
}

/// The Secret references of a spec (config drive, BMC credentials), resolved in the host's
/// namespace unless a reference names another (the BMC credentials are always the host's).
pub(super) fn secret_refs(key: &HostKey, spec: &HostSpec) -> Vec<(String, SecretKey)> {
    let mut out: Vec<(String, SecretKey)> = [&spec.user_data, &spec.network_data, &spec.meta_data]
        .into_iter()
        .flatten()
        .filter(|r| !r.name.is_empty())
        .map(|r: &SecretRef| {
            let ns = r
                .namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or(&key.namespace);
            (r.name.clone(), SecretKey::new(ns, r.name.clone()))
        })
        .collect();
    if let Some(name) = spec
        .bmc
        .as_ref()
        .map(|b| &b.credentials_name)
        .filter(|n| !n.is_empty())
    {
        out.push((name.clone(), SecretKey::new(&key.namespace, name.clone())));
    }
    out
}

impl Engine {
    /// Registration problems of `key` that only the fleet shows: its boot MAC or BMC declared
    /// by other hosts too, its document declared twice.
    pub(super) fn conflicts_for(&self, key: &HostKey, entry: &Entry) -> Vec<Problem> {
        let mut out = Vec::new();
        if !entry.declared() {
            return out;
        }
        let others = |index: &HashMap<String, std::collections::BTreeSet<HostKey>>, id: &str| {
            index
                .get(id)
                .map(|keys| {
                    keys.iter()
                        .filter(|k| *k != key && self.hosts.get(*k).is_some_and(|e| e.declared()))
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        if let Some(mac) = entry.boot_mac() {
            let hosts = others(&self.macs, &mac);
            if !hosts.is_empty() {
                out.push(Problem {
                    field: "spec.bootMACAddress",
                    message: format!(
                        "{mac} is also the boot MAC of {} {}: a MAC names one machine, so none \
                         of them is booted by MAC until all but one are changed",
                        if hosts.len() == 1 { "host" } else { "hosts" },
                        hosts.join(", ")
                    ),
                });
            }
        }
        if let Some(bmc) = entry.bmc_identity() {
            let hosts = others(&self.bmcs, &bmc);
            if !hosts.is_empty() {
                out.push(Problem {
                    field: "spec.bmc.address",
                    message: format!(
                        "the BMC at {} is also the BMC of {} {}: a BMC controls one machine; \
                         fix the address of all but one",
                        entry
                            .record
                            .host
                            .spec
                            .bmc
                            .as_ref()
                            .map_or("", |b| b.address.as_str()),
                        if hosts.len() == 1 { "host" } else { "hosts" },
                        hosts.join(", ")
                    ),
                });
            }
        }
        if let Some((field, why)) = &entry.source_conflict {
            out.push(Problem {
                field,
                message: why.clone(),
            });
        }
        out
    }

    /// The hosts that share an identity (MAC, BMC) with `key` plan again: a conflict began
    /// or ended for each of them.
    pub(super) fn replan_peers(&mut self, mac: Option<&str>, bmc: Option<&str>) {
        for (index, id) in [(&self.macs, mac), (&self.bmcs, bmc)] {
            if let Some(keys) = id.and_then(|id| index.get(id)) {
                self.to_plan.extend(keys.iter().cloned());
            }
        }
    }

    /// The key names of the Secrets `spec` names, for the planner.
    fn secret_keys_for(&self, key: &HostKey, spec: &HostSpec) -> SecretKeys {
        let mut out = SecretKeys::new();
        for (name, sk) in secret_refs(key, spec) {
            if let Some(keys) = self.secret_keys.get(&sk) {
                out.insert(name, keys.clone());
            }
        }
        out
    }

    /// Plans one host and sorts out the effects: status and events to store, commands and
    /// replies held until they are durable.
    pub(super) fn plan_host(&mut self, key: &HostKey, now: Timestamp) {
        let (secrets, conflicts) = match self.hosts.get(key) {
            Some(e) if !e.forgotten => (
                self.secret_keys_for(key, &e.record.host.spec),
                self.conflicts_for(key, e),
            ),
            _ => return,
        };
        let slot = self.slots.standing(key);
        let Some(entry) = self.hosts.get_mut(key) else {
            return;
        };
        let _span = info_span!("host", host = %key).entered();
        let session = entry.session.as_ref();
        let view = match (&entry.status.current_command, session) {
            (Some(cmd), Some(s)) => match s.reports.get(&cmd.id) {
                Some(AgentReport::Running { progress, .. }) => {
                    CommandView::Running(progress.as_ref())
                }
                Some(AgentReport::Finished {
                    outcome: Outcome::Success(ok),
                    ..
                }) => CommandView::Succeeded(ok),
                Some(AgentReport::Finished {
                    outcome: Outcome::Failure(f),
                    ..
                }) => CommandView::Failed(f),
                None if s.sent.contains(&cmd.id) => CommandView::Running(None),
                None => CommandView::Unknown,
            },
            _ => CommandView::Unknown,
        };
        let name = key.to_string();
        let desired = Desired {
            name: &name,
            spec: &entry.record.host.spec,
            annotations: &entry.record.host.metadata.annotations,
            secrets: &secrets,
            deleted: entry.record.deleted,
            policy: &self.settings.policy,
            conflicts: &conflicts,
        };
        let observed = Observed {
            status: &entry.status,
            agent: session.map(|s| &s.link),
            command: view,
            inventory: session.and_then(|s| s.inventory.as_ref()),
            slot,
        };
        let started = Instant::now();
        let Plan {
            status,
            actions,
            wake_at,
        } = slipway_reconcile::plan(&desired, &observed, now);
        self.metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());

        let changed = *entry.status != status;
        let old = if changed {
            std::mem::replace(&mut entry.status, Arc::new(status))
        } else {
            entry.status.clone()
        };
        if changed {
            self.view_dirty.insert(key.clone());
            if significant(&entry.status, &entry.saved_status) {
                entry.pending.status = true;
                entry.dirty_since.get_or_insert_with(Instant::now);
            }
        }
        // Progress alone becomes durable after PROGRESS_DURABLE_EVERY.
        let mut wake_at = wake_at;
        if !entry.pending.status && !Arc::ptr_eq(&entry.status, &entry.saved_status) {
            let due = entry
                .status_saved_at
                .checked_add(PROGRESS_DURABLE_EVERY)
                .unwrap_or(Timestamp::MAX);
            if now >= due {
                entry.pending.status = true;
            } else {
                wake_at = Some(wake_at.map_or(due, |w| w.min(due)));
            }
        }
        // Metrics of what changed.
        if old.provisioning.state != entry.status.provisioning.state {
            let (from, to) = (old.provisioning.state, entry.status.provisioning.state);
            self.metrics
                .hosts
                .get_or_create(&StateLabel {
                    state: from.to_string(),
                })
                .dec();
            self.metrics
                .hosts
                .get_or_create(&StateLabel {
                    state: to.to_string(),
                })
                .inc();
            self.metrics
                .transitions
                .get_or_create(&TransitionLabels {
                    from: from.to_string(),
                    to: to.to_string(),
                })
                .inc();
        }
        if entry.status.error_count > old.error_count
            && let Some(t) = entry.status.error_type
        {
            self.metrics
                .errors
                .get_or_create(&ErrorLabel {
                    error_type: t.to_string(),
                })
                .inc();
        }
        match (&old.current_command, &entry.status.current_command) {
            (None, Some(_)) => {
                self.metrics.commands_in_flight.inc();
            }
            (Some(_), None) => {
                self.metrics.commands_in_flight.dec();
            }
            _ => {}
        }
        let (holds, delayed) = entry.slot_use();
        self.slots.update(key, holds, delayed);
        // Only the current command's report and sending matter from now on (an inspect
        // result carries an inventory: keeping every old one cost kilobytes per session).
        if let Some(s) = entry.session.as_mut() {
            let current = entry.status.current_command.as_ref().map(|c| c.id.as_str());
            s.reports.retain(|id, _| Some(id.as_str()) == current);
            s.sent.retain(|id| Some(id.as_str()) == current);
        }

        // Timers.
        if let Some(w) = entry.wake_at.take() {
            self.timers.remove(&(w, key.clone()));
        }
        if let Some(w) = wake_at {
            let w = w.max(now);
            entry.wake_at = Some(w);
            self.timers.insert((w, key.clone()));
        }

        let mut acts = Vec::new();
        let mut forget = false;
        for action in actions {
            match action {
                Action::Send(cmd) => match &mut entry.session {
                    Some(s) => {
                        s.sent.insert(cmd.id.clone());
                        acts.push(Act::Send { session: s.id, cmd });
                    }
                    None => debug!(command = %cmd.id, "no agent session; command not sent"),
                },
                Action::Record(event) => {
                    if event.warning {
                        warn!("{}: {}", event.reason, event.message);
                    } else {
                        info!("{}: {}", event.reason, event.message);
                    }
                    entry.push_event(EventRecord {
                        time: now,
                        warning: event.warning,
                        reason: event.reason.to_string(),
                        message: event.message,
                    });
                    entry.dirty_since.get_or_insert_with(Instant::now);
                    self.view_dirty.insert(key.clone());
                }
                Action::Forget => forget = true,
            }
        }
        if !entry.pending.is_empty() {
            self.unsaved.insert(key.clone());
        }
        for act in acts {
            self.hold_or_act(key, act);
        }
        if forget {
            self.forget(key);
        }
    }

    /// The planner is done with the host: its record, tokens and certificate go, once that is
    /// durable.
    pub(super) fn forget(&mut self, key: &HostKey) {
        let tokens: Vec<String> = self
            .tokens_by_host
            .remove(key)
            .map(|t| t.into_iter().collect())
            .unwrap_or_default();
        for t in &tokens {
            self.tokens.remove(t);
        }
        let Some(entry) = self.hosts.get_mut(key) else {
            return;
        };
        if entry.forgotten {
            return;
        }
        info!(host = %key, "host removed");
        entry.forgotten = true;
        entry.pending = Pending {
            remove: true,
            tokens: tokens.into_iter().map(|t| (t, None)).collect(),
            ..Default::default()
        };
        // The session stays until the removal is durable: the host's last command (the
        // power-off before delete) still goes out on it.
        if entry.status.current_command.is_some() {
            self.metrics.commands_in_flight.dec();
        }
        self.metrics
            .hosts
            .get_or_create(&StateLabel {
                state: entry.status.provisioning.state.to_string(),
            })
            .dec();
        if let Some(w) = entry.wake_at.take() {
            self.timers.remove(&(w, key.clone()));
        }
        let mac = entry.boot_mac();
        let bmc = entry.bmc_identity();
        let refs = secret_refs(key, &entry.record.host.spec);
        if let Some(mac) = &mac {
            self.unindex_mac(mac, key);
        }
        if let Some(bmc) = &bmc {
            self.unindex_bmc(bmc, key);
        }
        self.replan_peers(mac.as_deref(), bmc.as_deref());
        for (_, sk) in refs {
            if let Some(users) = self.secret_users.get_mut(&sk) {
                users.remove(key);
            }
        }
        self.slots.forget(key);
        self.unsaved.insert(key.clone());
        self.view_dirty.insert(key.clone());
    }

    /// A finished command the engine could not send (its Secrets do not parse): answered as
    /// the agent would have, so the host shows the error and retries.
    pub(super) fn fail_unsent(&mut self, key: &HostKey, id: &str, message: String) {
        if let Some(s) = self.hosts.get_mut(key).and_then(|e| e.session.as_mut()) {
            s.reports.insert(
                id.to_string(),
                AgentReport::Finished {
                    id: id.to_string(),
                    outcome: Outcome::Failure(CommandFailure { message }),
                },
            );
            self.to_plan.insert(key.clone());
        }
    }

    pub(super) fn index_mac(&mut self, mac: &str, key: &HostKey) {
        self.macs
            .entry(mac.to_string())
            .or_default()
            .insert(key.clone());
    }

    pub(super) fn unindex_mac(&mut self, mac: &str, key: &HostKey) {
        if let Some(set) = self.macs.get_mut(mac) {
            set.remove(key);
            if set.is_empty() {
                self.macs.remove(mac);
            }
        }
    }

    pub(super) fn index_bmc(&mut self, bmc: &str, key: &HostKey) {
        self.bmcs
            .entry(bmc.to_string())
            .or_default()
            .insert(key.clone());
    }

    pub(super) fn unindex_bmc(&mut self, bmc: &str, key: &HostKey) {
        if let Some(set) = self.bmcs.get_mut(bmc) {
            set.remove(key);
            if set.is_empty() {
                self.bmcs.remove(bmc);
            }
        }
    }

    /// The host as the view shows it: the entry's own record, status and events, shared.
    pub(super) fn host_view(entry: &Entry) -> crate::view::SharedHost {
        crate::view::SharedHost {
            record: entry.record.clone(),
            status: entry.status.clone(),
            events: entry.events.iter().map(|(_, e)| e.clone()).collect(),
        }
    }

    /// Records an event outside a plan (enrolment, boot, agent warnings).
    pub(super) fn event(&mut self, key: &HostKey, warning: bool, reason: &str, message: String) {
        if let Some(entry) = self.hosts.get_mut(key) {
            entry.push_event(EventRecord {
                time: Timestamp::now(),
                warning,
                reason: reason.into(),
                message,
            });
            self.unsaved.insert(key.clone());
            self.view_dirty.insert(key.clone());
        }
    }
}
