//! The engine: one task that owns every host, runs [`slipway_reconcile::plan`] for the hosts
//! that need it and carries out the plans, for every source of declarations and every store.
//!
//! Everything that changes state arrives as a [`Msg`]: what changed in the source (host by
//! host), an agent enrolling, connecting, reporting or going away, a machine asking how to
//! boot, a token being created. The loop takes what is queued, plans the hosts it touched
//! (and those whose timer is due), and sorts each plan's effects:
//!
//! - **writes** go to the host's pending change; the pending changes of every host are handed
//!   to the store as one batch by a blocking task, off the engine's task, while the engine
//!   goes on (group commit: under load batches grow, fsyncs do not);
//! - **actions** (a command to the host's agent, an answer to an enrolment or a boot) wait
//!   until every change of *that host* planned before them is durable, then run. A host
//!   whose changes could not be stored acts on nothing: its answers are refusals, its
//!   commands are sent again once a retry has stored them.
//!
//! Progress reports change what clients see at once (the view is updated host by host) but
//! are made durable at most every 30 s per host or on a phase change. Slow work is never done
//! on the engine's task.
//!
//! **Invariant (commit before act, per host):** no command, enrolment answer or boot answer
//! leaves the engine before the state it follows from is durable.

mod boot;
mod enroll;
mod host;
pub mod msg;
mod slots;
mod source;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use slipway_reconcile::Policy;
use slipway_reconcile::host::{CommandKind, HostKey};
use tokio::sync::mpsc;
use tracing::{debug, error, info, info_span, warn};

use self::host::{Act, Entry, Held};
pub use self::msg::*;

/// The Secrets a host's spec references, resolved in the host's namespace (as the engine
/// resolves them).
pub fn secret_refs_of(
    key: &slipway_reconcile::host::HostKey,
    spec: &slipway_reconcile::host::HostSpec,
) -> Vec<crate::sources::SecretKey> {
    host::secret_refs(key, spec)
        .into_iter()
        .map(|(_, k)| k)
        .collect()
}
use self::slots::Slots;
use crate::hardware::{Hardware, HardwareData};
use crate::metrics::{Metrics, StateLabel};
use crate::pki::Ca;
use crate::sources::{Problem, SecretKey, SecretSource};
use crate::state::{Batch, Failed, HostChange, StateStore, StoreError, TokenRecord};
use crate::view::SharedView;

/// How long a progress-only change of a host may wait before it is made durable.
pub const PROGRESS_DURABLE_EVERY: SignedDuration = SignedDuration::from_secs(30);

/// Default bound on hosts inspecting, cleaning or writing images at once (see
/// `slipway serve --provisioning-limit`).
pub const DEFAULT_PROVISIONING_LIMIT: usize = 100;
/// Discovered hosts kept at most, by default (`--discovered-limit`).
pub const DEFAULT_DISCOVERED_LIMIT: usize = 256;

/// Settings of the engine.
#[derive(Clone, Debug)]
pub struct Settings {
    pub policy: Policy,
    /// How long agent certificates are valid.
    pub cert_validity: SignedDuration,
    pub unknown_hosts: UnknownHosts,
    /// Validity of the tokens put in boot scripts and ISOs.
    pub boot_token_ttl: SignedDuration,
    /// Hosts inspecting, cleaning or writing images at once.
    pub provisioning_limit: usize,
    /// Discovered hosts kept at most (undeclared machines that booted): past it, the oldest
    /// that never enrolled makes room, else new machines are refused.
    pub discovered_limit: usize,
    /// A discovered host whose agent enrolled goes after this long unseen (no boot request,
    /// no live session); one that never enrolled, after the boot token's validity.
    pub discovered_ttl: SignedDuration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            policy: Policy::default(),
            cert_validity: SignedDuration::from_hours(720),
            unknown_hosts: UnknownHosts::Discover,
            boot_token_ttl: SignedDuration::from_hours(1),
            provisioning_limit: DEFAULT_PROVISIONING_LIMIT,
            discovered_limit: DEFAULT_DISCOVERED_LIMIT,
            discovered_ttl: SignedDuration::from_hours(24),
        }
    }
}

pub struct Engine {
    ca: Arc<Ca>,
    settings: Settings,
    secrets: Arc<dyn SecretSource>,
    /// `None` while a commit holds it.
    store: Option<Box<dyn StateStore>>,
    metrics: Arc<Metrics>,
    view: SharedView,

    /// Boxed: an entry is several KiB, and map nodes hold eleven.
    hosts: BTreeMap<HostKey, Box<Entry>>,
    /// Boot MAC (normalised) -> the hosts that declare it.
    macs: HashMap<String, BTreeSet<HostKey>>,
    /// Hosts by BMC endpoint (`validate::bmc_identity`), for duplicate BMC addresses.
    bmcs: HashMap<String, BTreeSet<HostKey>>,
    tokens: HashMap<String, TokenRecord>,
    tokens_by_host: HashMap<HostKey, BTreeSet<String>>,
    /// Key names of the source's Secrets, for the planner.
    secret_keys: HashMap<SecretKey, BTreeSet<String>>,
    /// The hosts that name each Secret.
    secret_users: HashMap<SecretKey, BTreeSet<HostKey>>,
    problems: Vec<Problem>,
    /// The source has listed everything once.
    synced: bool,
    /// Hosts the source declared since the start (until it has synced).
    declared: HashSet<HostKey>,
    timers: BTreeSet<(Timestamp, HostKey)>,
    to_plan: BTreeSet<HostKey>,
    slots: Slots,
    next_session: u64,

    /// Hosts with pending changes.
    unsaved: BTreeSet<HostKey>,
    next_batch: u64,
    inflight: Option<u64>,
    commit_failures: u32,
    commit_retry_at: Option<Timestamp>,
    view_dirty: BTreeSet<HostKey>,
    problems_dirty: bool,
    last_sweep: Timestamp,
    /// Discovered hosts (they may since have been removed: checked where used).
    discovered: BTreeSet<HostKey>,
}

impl Engine {
    /// Loads every host and token from `store`.
    pub fn new(
        mut store: Box<dyn StateStore>,
        ca: Arc<Ca>,
        secrets: Arc<dyn SecretSource>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Result<Engine, StoreError> {
        let loaded = store.load()?;
        let now = Timestamp::now();
        let mut engine = Engine {
            ca,
            slots: Slots::new(settings.provisioning_limit),
            settings,
            secrets,
            store: Some(store),
            metrics,
            view: SharedView::default(),
            hosts: BTreeMap::new(),
            macs: HashMap::new(),
            bmcs: HashMap::new(),
            tokens: HashMap::new(),
            tokens_by_host: HashMap::new(),
            secret_keys: HashMap::new(),
            secret_users: HashMap::new(),
            problems: Vec::new(),
            synced: false,
            declared: HashSet::new(),
            timers: BTreeSet::new(),
            to_plan: BTreeSet::new(),
            next_session: 1,
            unsaved: BTreeSet::new(),
            next_batch: 1,
            inflight: None,
            commit_failures: 0,
            commit_retry_at: None,
            view_dirty: BTreeSet::new(),
            problems_dirty: true,
            last_sweep: now,
            discovered: BTreeSet::new(),
        };
        for (key, stored) in loaded.hosts {
            let mut entry = Entry::new(stored.record, stored.status, now);
            entry.next_event = stored.events.last().map_or(0, |(s, _)| s + 1);
            entry.events = stored
                .events
                .into_iter()
                .map(|(s, e)| (s, Arc::new(e)))
                .collect();
            engine.add_entry(&key, entry);
        }
        for (hash, token) in loaded.tokens {
            engine
                .tokens_by_host
                .entry(token.host.clone())
                .or_default()
                .insert(hash.clone());
            engine.tokens.insert(hash, token);
        }
        Ok(engine)
    }

    /// Indexes a new entry (MAC, Secrets, slots, metrics) and plans it soon.
    fn add_entry(&mut self, key: &HostKey, entry: Entry) {
        if entry.record.origin == msg::DISCOVERED && !entry.record.deleted {
            self.discovered.insert(key.clone());
        }
        let (mac, bmc) = (entry.boot_mac(), entry.bmc_identity());
        if let Some(mac) = &mac {
            self.index_mac(mac, key);
        }
        if let Some(bmc) = &bmc {
            self.index_bmc(bmc, key);
        }
        self.replan_peers(mac.as_deref(), bmc.as_deref());
        for (_, sk) in host::secret_refs(key, &entry.record.host.spec) {
            self.secret_users.entry(sk).or_default().insert(key.clone());
        }
        let (holds, delayed) = entry.slot_use();
        self.slots.update(key, holds, delayed);
        if entry.status.current_command.is_some() {
            self.metrics.commands_in_flight.inc();
        }
        self.metrics
            .hosts
            .get_or_create(&StateLabel {
                state: entry.status.provisioning.state.to_string(),
            })
            .inc();
        self.hosts.insert(key.clone(), Box::new(entry));
        self.to_plan.insert(key.clone());
        self.view_dirty.insert(key.clone());
    }

    pub fn view(&self) -> SharedView {
        self.view.clone()
    }

    /// Runs until every sender of `rx` is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        type CommitResult = (Box<dyn StateStore>, Batch, Result<(), Failed>, Duration);
        let mut commit: Option<tokio::task::JoinHandle<CommitResult>> = None;
        self.turn(Timestamp::now());
        loop {
            if commit.is_none()
                && let Some(batch) = self.seal(Timestamp::now())
                && let Some(mut store) = self.store.take()
            {
                commit = Some(tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let result = store.commit(&batch);
                    (store, batch, result, started.elapsed())
                }));
            }
            let wait = self.next_wake().map(|at| {
                Duration::try_from(Timestamp::now().duration_until(at)).unwrap_or_default()
            });
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    self.handle(m);
                    for _ in 0..1024 {
                        match rx.try_recv() {
                            Ok(m) => self.handle(m),
                            Err(_) => break,
                        }
                    }
                }
                done = async { commit.as_mut().expect("guarded").await }, if commit.is_some() => {
                    commit = None;
                    match done {
                        Ok((store, batch, result, took)) => {
                            self.store = Some(store);
                            self.committed(batch, result, took, Timestamp::now());
                        }
                        Err(e) => {
                            error!("the store's commit task failed ({e}); stopping");
                            return;
                        }
                    }
                }
                () = async {
                    match wait {
                        Some(w) => tokio::time::sleep(w).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            self.turn(Timestamp::now());
        }
        if let Some(c) = commit {
            let _ = c.await;
        }
        info!("engine stopped");
    }

    fn next_wake(&self) -> Option<Timestamp> {
        if !self.to_plan.is_empty() {
            return Some(Timestamp::now());
        }
        let timer = self.timers.first().map(|(t, _)| *t);
        let retry = if self.inflight.is_none() && !self.unsaved.is_empty() {
            self.commit_retry_at
        } else {
            None
        };
        let sweep = self.last_sweep + SignedDuration::from_secs(60);
        [timer, retry, Some(sweep)].into_iter().flatten().min()
    }

    /// Plans what is due, then updates the view.
    pub fn turn(&mut self, now: Timestamp) {
        while let Some((at, key)) = self.timers.first().cloned() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(e) = self.hosts.get_mut(&key)
                && e.wake_at == Some(at)
            {
                e.wake_at = None;
            }
            self.to_plan.insert(key);
        }
        // Planning may ask for more planning (a command that could not be sent); bounded.
        for _ in 0..4 {
            if self.to_plan.is_empty() {
                break;
            }
            let keys = std::mem::take(&mut self.to_plan);
            for key in keys {
                self.plan_host(&key, now);
            }
            for key in self.slots.invite() {
                self.to_plan.insert(key);
            }
        }
        if now.duration_since(self.last_sweep) >= SignedDuration::from_secs(60) {
            self.last_sweep = now;
            self.sweep_tokens(now);
            self.sweep_discovered(now);
        }
        self.publish();
    }

    /// Takes every pending change into a batch, unless one is in flight.
    pub fn seal(&mut self, now: Timestamp) -> Option<Batch> {
        if self.inflight.is_some() || self.unsaved.is_empty() {
            return None;
        }
        if self.commit_retry_at.is_some_and(|at| at > now) {
            return None;
        }
        let id = self.next_batch;
        self.next_batch += 1;
        let mut batch = Batch {
            id,
            hosts: Vec::new(),
        };
        for key in std::mem::take(&mut self.unsaved) {
            let Some(entry) = self.hosts.get_mut(&key) else {
                continue;
            };
            let p = std::mem::take(&mut entry.pending);
            if p.is_empty() {
                continue;
            }
            let status = p.status.then(|| {
                entry.saved_status = entry.status.clone();
                entry.status_saved_at = now;
                (*entry.status).clone()
            });
            let change = HostChange {
                remove: p.remove,
                record: (p.record && !entry.forgotten).then(|| (*entry.record).clone()),
                status: status.filter(|_| !entry.forgotten),
                events: if entry.forgotten {
                    Vec::new()
                } else {
                    p.events
                },
                events_keep_from: entry.events_keep_from(),
                events_dropped: if entry.forgotten {
                    Vec::new()
                } else {
                    p.events_dropped
                },
                hardware: p.hardware.map(|h| *h),
                tokens: p.tokens,
            };
            entry.inflight = Some(id);
            if let Some(t) = entry.dirty_since.take() {
                entry.sealed_since.get_or_insert(t);
            }
            batch.hosts.push((key, change));
        }
        if batch.hosts.is_empty() {
            return None;
        }
        self.inflight = Some(id);
        Some(batch)
    }

    /// The store's answer for a batch: act for the hosts whose changes are durable; for the
    /// others, refuse what waited on them and try the write again.
    pub fn committed(
        &mut self,
        batch: Batch,
        result: Result<(), Failed>,
        took: Duration,
        now: Timestamp,
    ) {
        if result.is_ok() {
            crate::failpoint::hit_tagged("engine-after-commit", || batch.command_kinds());
        }
        self.inflight = None;
        self.metrics.commit_seconds.observe(took.as_secs_f64());
        self.metrics.commit_hosts.observe(batch.hosts.len() as f64);
        let failed: HashMap<HostKey, String> =
            result.err().unwrap_or_default().into_iter().collect();
        if failed.is_empty() {
            if self.commit_failures > 0 {
                info!("the store accepts writes again; carrying on");
            }
            self.commit_failures = 0;
            self.commit_retry_at = None;
        } else {
            self.commit_failures = self.commit_failures.saturating_add(1);
            let delay =
                SignedDuration::from_millis((100i64 << self.commit_failures.min(6)).min(5_000));
            self.commit_retry_at = Some(now + delay);
            let reason = failed.values().next().cloned().unwrap_or_default();
            if self.commit_failures == 1 || self.commit_failures.is_power_of_two() {
                error!(
                    "cannot store the state of {} host(s): {reason}; nothing is sent for them \
                     until it is stored; retrying in {delay:#} (attempt {})",
                    failed.len(),
                    self.commit_failures
                );
            }
        }
        let mut acts: Vec<(HostKey, Act)> = Vec::new();
        for (key, change) in batch.hosts {
            let Some(entry) = self.hosts.get_mut(&key) else {
                continue;
            };
            if entry.inflight == Some(batch.id) {
                entry.inflight = None;
            }
            let held = std::mem::take(&mut entry.held);
            let (due, later): (Vec<Held>, Vec<Held>) =
                held.into_iter().partition(|h| h.need <= batch.id);
            entry.held = later;
            if let Some(reason) = failed.get(&key) {
                entry.pending.restore(change);
                if let Some(t) = entry.sealed_since.take() {
                    entry.dirty_since.get_or_insert(t);
                }
                self.unsaved.insert(key.clone());
                for h in due {
                    match h.act {
                        Act::Send { cmd, .. } => {
                            // Not sent: the plan sends it again once it is stored.
                            if let Some(s) = entry.session.as_mut() {
                                s.sent.remove(&cmd.id);
                            }
                        }
                        Act::Reply(r) => r.refuse(reason),
                    }
                }
                self.to_plan.insert(key);
                continue;
            }
            if let Some(t) = entry.sealed_since.take() {
                self.metrics
                    .event_to_durable_seconds
                    .observe(t.elapsed().as_secs_f64());
            }
            let removed = entry.forgotten && change.remove;
            for h in due {
                acts.push((key.clone(), h.act));
            }
            if removed {
                // Its last actions (a power-off) go out before the session handle drops.
                for (k, act) in acts.drain(..) {
                    self.act(&k, act);
                }
                if self.hosts.remove(&key).is_some_and(|e| e.session.is_some()) {
                    self.metrics.sessions.dec();
                }
            }
        }
        let tags = if acts.len() > 1 {
            acts.iter()
                .filter_map(|(_, a)| match a {
                    Act::Send { cmd, .. } => Some(cmd.kind.name()),
                    Act::Reply(_) => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        for (i, (key, act)) in acts.into_iter().enumerate() {
            self.act(&key, act);
            if i == 0 {
                crate::failpoint::hit_tagged("engine-mid-act", || tags.clone());
            }
        }
    }

    /// Runs `act` now if nothing of the host waits to be stored, else once it is.
    fn hold_or_act(&mut self, key: &HostKey, act: Act) {
        let need = match self.hosts.get(key) {
            Some(e) if !e.pending.is_empty() => self.next_batch,
            Some(e) => match e.inflight {
                Some(b) => b,
                None => return self.act(key, act),
            },
            None => return,
        };
        if let Some(e) = self.hosts.get_mut(key) {
            e.held.push(Held { need, act });
        }
    }

    fn act(&mut self, key: &HostKey, act: Act) {
        match act {
            Act::Reply(r) => r.send(),
            Act::Send { session, cmd } => {
                let Some(entry) = self.hosts.get(key) else {
                    return;
                };
                let Some(s) = entry.session.as_ref().filter(|s| s.id == session) else {
                    debug!(host = %key, command = %cmd.id, "the session this command was for has ended; the plan sends it to the next one");
                    return;
                };
                let _span = info_span!("host", host = %key).entered();
                let config_drive = match &cmd.kind {
                    CommandKind::WriteImage {
                        config_drive: Some(refs),
                        ..
                    } => {
                        let secrets = &self.secrets;
                        let lookup = |r: &slipway_reconcile::host::SecretRef| {
                            let ns = r
                                .namespace
                                .as_deref()
                                .filter(|n| !n.is_empty())
                                .unwrap_or(&key.namespace);
                            secrets.get(&SecretKey::new(ns, r.name.clone()))
                        };
                        match crate::configdrive::resolve(&entry.record.host, refs, lookup) {
                            Ok(data) => Some(data),
                            Err(message) => {
                                // The plan checked that the Secrets and keys exist; only
                                // contents that do not parse get here. Not sent: the command
                                // fails as if the agent had refused it, so the host shows a
                                // provisioning error and retries later.
                                warn!(command = %cmd.id, "not sending {}: {message}", cmd.kind.name());
                                let id = cmd.id.clone();
                                self.fail_unsent(key, &id, message);
                                return;
                            }
                        }
                    }
                    _ => None,
                };
                info!(command = %cmd.id, "sending {} to the agent", cmd.kind.name());
                let _ = s.commands.send(Box::new(Outgoing {
                    record: cmd,
                    config_drive,
                }));
            }
        }
    }

    /// Puts the changed hosts into the view clients read.
    fn publish(&mut self) {
        let ready = self.synced;
        if self.view_dirty.is_empty() && !self.problems_dirty {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            if view.ready == ready {
                return;
            }
        }
        let updates: Vec<_> = std::mem::take(&mut self.view_dirty)
            .into_iter()
            .map(|key| {
                let v = self
                    .hosts
                    .get(&key)
                    .filter(|e| !e.forgotten)
                    .map(|e| Arc::new(Self::host_view(e)));
                (key, v)
            })
            .collect();
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        for (key, v) in updates {
            match v {
                Some(v) => view.hosts.insert(key, v),
                None => view.hosts.remove(&key),
            };
        }
        if self.problems_dirty {
            view.problems = self.problems.clone();
            self.problems_dirty = false;
        }
        view.ready = ready;
        self.metrics.hosts_delayed.set(self.slots.waiting() as i64);
        self.metrics.slots_in_use.set(self.slots.in_use() as i64);
    }

    pub fn handle(&mut self, msg: Msg) {
        let now = Timestamp::now();
        match msg {
            Msg::Source(event) => self.apply_source(event, now),
            Msg::Enroll {
                token,
                csr_der,
                agent,
                peer,
                reply,
            } => self.enroll(&token, &csr_der, &agent, &peer, reply, now),
            Msg::Connect {
                host,
                cert_sha256,
                peer,
                agent,
                reports,
                inventory,
                identity,
                alive,
                commands,
                reply,
            } => {
                let result = self.connect(
                    &host,
                    &cert_sha256,
                    &peer,
                    &agent,
                    reports,
                    inventory,
                    identity,
                    alive,
                    commands,
                    now,
                );
                if let Err(Refusal(reason)) = &result {
                    warn!(host = %host, peer = %peer, "agent session refused: {reason}");
                }
                let _ = reply.send(result);
            }
            Msg::Report {
                host,
                session,
                report,
            } => {
                let Some(entry) = self.hosts.get_mut(&host) else {
                    return;
                };
                match &mut entry.session {
                    Some(s) if s.id == session => {
                        debug!(host = %host, command = report.id(), "agent report");
                        s.reports.insert(report.id().to_string(), report);
                        self.to_plan.insert(host);
                    }
                    _ => debug!(host = %host, session, "report from a replaced session ignored"),
                }
            }
            Msg::AgentLog {
                host,
                session,
                warning,
                message,
            } => {
                let current = self
                    .hosts
                    .get(&host)
                    .and_then(|e| e.session.as_ref())
                    .is_some_and(|s| s.id == session);
                if current {
                    let _span = info_span!("agent", host = %host).entered();
                    let message = crate::log::escape(&message).into_owned();
                    if warning {
                        warn!("{message}");
                        self.event(&host, true, "AgentLog", message);
                    } else {
                        info!("{message}");
                    }
                }
            }
            Msg::Inventory {
                host,
                session,
                hardware,
                by,
            } => self.inventory(&host, session, *hardware, by, now),
            Msg::Disconnect {
                host,
                session,
                reason,
            } => {
                let Some(entry) = self.hosts.get_mut(&host) else {
                    return;
                };
                if entry.session.as_ref().is_some_and(|s| s.id == session) {
                    info!(host = %host, session, "agent session ended: {reason}");
                    entry.session = None;
                    entry.seen_at = now;
                    self.metrics.sessions.dec();
                    self.to_plan.insert(host);
                }
            }
            Msg::Boot { mac, reply } => self.boot(&mac, reply, now),
            Msg::CreateToken { host, ttl, reply } => {
                let result = self.create_token(&host, ttl, now);
                self.answer_token(&host, result, reply);
            }
            Msg::BootToken { host, ttl, reply } => {
                let result = self.iso_token(&host, ttl, now);
                self.answer_token(&host, result, reply);
            }
            Msg::DeleteHost { host, reply } => {
                let _ = reply.send(self.delete_discovered(&host));
            }
        }
    }

    /// Answers a token request: a new token once it is stored, a refusal at once.
    fn answer_token(
        &mut self,
        host: &HostKey,
        result: Result<(crate::tokens::TokenSecret, Timestamp), String>,
        reply: tokio::sync::oneshot::Sender<Result<Issued, String>>,
    ) {
        let boot_mac = self.hosts.get(host).and_then(|e| e.boot_mac());
        match result {
            Ok((token, expires_at)) => {
                let issued = Issued {
                    token,
                    expires_at,
                    boot_mac,
                };
                self.hold_or_act(host, Act::Reply(host::Reply::Token(reply, Ok(issued))));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The agent's full inventory: stored when it differs from the one stored.
    fn inventory(
        &mut self,
        key: &HostKey,
        session: u64,
        hardware: Hardware,
        by: &'static str,
        now: Timestamp,
    ) {
        let Some(entry) = self.hosts.get_mut(key) else {
            return;
        };
        if entry.session.as_ref().is_none_or(|s| s.id != session) {
            debug!(host = %key, session, "inventory from a replaced session ignored");
            return;
        }
        // Inspection says which machine the host is; a host inspected before identities were
        // kept takes it from its agent's first report.
        let inspected = by == "inspect" || entry.status.hardware.is_some();
        if inspected && (by == "inspect" || entry.record.identity.is_none()) {
            let identity = crate::hardware::Identity::of(&hardware);
            if entry.record.identity.as_ref() != Some(&identity) {
                Arc::make_mut(&mut entry.record).identity = Some(identity);
                entry.pending.record = true;
                self.unsaved.insert(key.clone());
            }
        }
        let digest = crate::hardware::digest(&hardware);
        if entry.record.hardware_sha256.as_deref() == Some(digest.as_str()) {
            debug!(host = %key, by, "full inventory received; unchanged");
            return;
        }
        debug!(host = %key, by, "full inventory received; storing it");
        entry.pending.hardware = Some(Box::new(HardwareData::new(key, hardware, now, by)));
        Arc::make_mut(&mut entry.record).hardware_sha256 = Some(digest);
        entry.pending.record = true;
        self.unsaved.insert(key.clone());
    }
}
