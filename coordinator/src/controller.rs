//! The executor: one task that owns every host record, calls [`reconcile::plan`] and performs
//! the actions it returns.
//!
//! Everything that changes state arrives as a [`Msg`]: a new snapshot of the hosts directory,
//! an agent enrolling, connecting, reporting or going away, a token being created. The loop
//! takes a batch of messages, plans every host they touched (and every host whose timer is
//! due), writes all changed records in one store transaction, and only then acts: sends
//! commands, answers enrolments, drops forgotten hosts. Slow work (none yet; BMC calls later)
//! is spawned and reports back as a message, so one host never holds up another.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use jiff::{SignedDuration, Timestamp};
use slipway_reconcile::host::{
    BareMetalHost, CommandKind, CommandRecord, HardwareDetails, HostSpec, HostStatus,
    OperationalStatus, Progress, ProvisioningState,
};
use slipway_reconcile::validate::SecretKeys;
use slipway_reconcile::{
    Action, AgentLink, CommandFailure, CommandSuccess, CommandView, Desired, Observed, Policy,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, info_span, warn};

use crate::configdrive::{self, ConfigDriveData};
use crate::hardware::{Hardware, HardwareData};
use crate::pki::Ca;
use crate::sources::files::{Problem, Secret, Snapshot};
use crate::store::{Batch, EventRecord, HostRecord, Store, TokenRecord};
use crate::tokens::{self, TokenSecret};

/// What the agent says about one command.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentReport {
    Running {
        id: String,
        progress: Option<Progress>,
    },
    Finished {
        id: String,
        outcome: Outcome,
    },
}

impl AgentReport {
    pub fn id(&self) -> &str {
        match self {
            AgentReport::Running { id, .. } | AgentReport::Finished { id, .. } => id,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Success(CommandSuccess),
    Failure(CommandFailure),
}

/// The agent's description of itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentInfo {
    pub version: String,
    pub boot_mac: String,
    pub ramdisk: bool,
}

/// Why an agent was turned away. The message is logged and returned to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

/// A successful enrolment.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub host: String,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
    pub not_after: Timestamp,
}

/// A command on its way to an agent session: the record as planned (and stored), with the
/// config-drive contents resolved from the host's Secrets at the moment of sending. The
/// contents are never stored and never logged.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub record: CommandRecord,
    pub config_drive: Option<ConfigDriveData>,
}

/// A command on its way to an agent session.
pub type CommandSender = mpsc::UnboundedSender<Outgoing>;

pub enum Msg {
    Snapshot(Snapshot),
    Enroll {
        token: TokenSecret,
        csr_der: Vec<u8>,
        agent: AgentInfo,
        peer: String,
        reply: oneshot::Sender<Result<Enrolled, Refusal>>,
    },
    Connect {
        host: String,
        cert_sha256: String,
        peer: String,
        agent: AgentInfo,
        reports: Vec<AgentReport>,
        /// The hardware the agent reported in its hello.
        inventory: Option<HardwareDetails>,
        commands: CommandSender,
        reply: oneshot::Sender<Result<u64, Refusal>>,
    },
    /// A machine asks how to boot (its iPXE script asks by MAC).
    Boot {
        mac: String,
        reply: oneshot::Sender<BootDecision>,
    },
    Report {
        host: String,
        session: u64,
        report: AgentReport,
    },
    AgentLog {
        host: String,
        session: u64,
        warning: bool,
        message: String,
    },
    /// The agent's full inventory, from its hello or an inspect result (`by`).
    Inventory {
        host: String,
        session: u64,
        hardware: Box<Hardware>,
        by: &'static str,
    },
    Disconnect {
        host: String,
        session: u64,
        reason: String,
    },
    CreateToken {
        host: String,
        ttl: SignedDuration,
        reply: oneshot::Sender<Result<(TokenSecret, Timestamp), String>>,
    },
}

/// What a booting machine gets.
#[derive(Clone, Debug, PartialEq)]
pub enum BootDecision {
    /// The Slipway ramdisk, with a fresh one-time token for `host`.
    Ramdisk {
        host: String,
        token: TokenSecret,
        mac: String,
    },
    /// Its own disk (the host is provisioned).
    LocalDisk { host: String, state: String },
    /// Nothing; the reason is shown on the machine's console.
    Refuse(String),
}

/// What happens to machines whose MAC no host declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownHosts {
    /// Boot the ramdisk and register them as discovered hosts (state unmanaged, operational
    /// status discovered) with their inventory.
    Discover,
    /// Do not boot them.
    Refuse,
}

/// Where a discovered host's record says it came from.
pub const DISCOVERED: &str = "discovered";

/// What the admin API shows: a copy of every host, refreshed after each batch.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub hosts: BTreeMap<String, HostView>,
    /// Each host's latest full inventory (shared, not copied, at each publish).
    pub hardware: BTreeMap<String, Arc<HardwareData>>,
    pub problems: Vec<Problem>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostView {
    pub host: BareMetalHost,
    pub source: String,
    pub deleted: bool,
    pub events: Vec<EventRecord>,
}

pub type SharedView = Arc<RwLock<View>>;

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct Settings {
    pub policy: Policy,
    /// How long agent certificates are valid.
    pub cert_validity: SignedDuration,
    pub unknown_hosts: UnknownHosts,
    /// Validity of the tokens put in boot scripts and ISOs.
    pub boot_token_ttl: SignedDuration,
}

struct Session {
    id: u64,
    link: AgentLink,
    commands: CommandSender,
    /// Command ids sent on this session.
    sent: HashSet<String>,
    /// The latest report per command id.
    reports: HashMap<String, AgentReport>,
    /// The hardware reported in the hello.
    inventory: Option<HardwareDetails>,
}

struct Entry {
    record: HostRecord,
    session: Option<Session>,
    wake_at: Option<Timestamp>,
}

enum Reply {
    Boot(oneshot::Sender<BootDecision>, BootDecision),
    Enrolled(
        oneshot::Sender<Result<Enrolled, Refusal>>,
        Result<Enrolled, Refusal>,
    ),
    Token(
        oneshot::Sender<Result<(TokenSecret, Timestamp), String>>,
        Result<(TokenSecret, Timestamp), String>,
    ),
}

pub struct Controller {
    store: Store,
    ca: Arc<Ca>,
    settings: Settings,
    hosts: BTreeMap<String, Entry>,
    tokens: HashMap<String, TokenRecord>,
    hardware: BTreeMap<String, Arc<HardwareData>>,
    problems: Vec<Problem>,
    /// The Secrets of the hosts directory (userData, networkData, metaData), and their key
    /// names for the planner.
    secrets: BTreeMap<String, Secret>,
    secret_keys: SecretKeys,
    view: SharedView,
    next_session: u64,
    // Per batch:
    to_plan: HashSet<String>,
    changed_hosts: HashSet<String>,
    changed_tokens: HashSet<String>,
    changed_hardware: HashSet<String>,
    removed_hosts: HashSet<String>,
    replies: Vec<Reply>,
    outbox: Vec<(CommandSender, Outgoing)>,
    view_dirty: bool,
}

impl Controller {
    /// Loads every host and token from the store.
    pub fn new(
        store: Store,
        ca: Arc<Ca>,
        settings: Settings,
    ) -> Result<Controller, crate::store::StoreError> {
        let mut hosts = BTreeMap::new();
        for (name, record) in store.load_hosts()? {
            hosts.insert(
                name,
                Entry {
                    record,
                    session: None,
                    wake_at: None,
                },
            );
        }
        let tokens = store.load_tokens()?.into_iter().collect();
        let hardware = store
            .load_hardware()?
            .into_iter()
            .filter(|(name, _)| hosts.contains_key(name))
            .map(|(name, h)| (name, Arc::new(h)))
            .collect();
        let to_plan = hosts.keys().cloned().collect();
        Ok(Controller {
            store,
            ca,
            settings,
            hosts,
            tokens,
            hardware,
            problems: Vec::new(),
            secrets: BTreeMap::new(),
            secret_keys: SecretKeys::new(),
            view: SharedView::default(),
            next_session: 1,
            to_plan,
            changed_hosts: HashSet::new(),
            changed_tokens: HashSet::new(),
            changed_hardware: HashSet::new(),
            removed_hosts: HashSet::new(),
            replies: Vec::new(),
            outbox: Vec::new(),
            view_dirty: true,
        })
    }

    pub fn view(&self) -> SharedView {
        self.view.clone()
    }

    /// Runs until every sender of `rx` is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        loop {
            let wake = self.next_wake();
            let msg = match wake {
                Some(at) => {
                    let wait = Timestamp::now().duration_until(at);
                    let wait = std::time::Duration::try_from(wait).unwrap_or_default();
                    tokio::select! {
                        m = rx.recv() => m.map(Some),
                        () = tokio::time::sleep(wait) => Some(None),
                    }
                }
                None => rx.recv().await.map(Some),
            };
            let Some(msg) = msg else { break };
            if let Some(msg) = msg {
                self.handle(msg);
            }
            for _ in 0..256 {
                match rx.try_recv() {
                    Ok(m) => self.handle(m),
                    Err(_) => break,
                }
            }
            self.turn(Timestamp::now());
        }
        info!("controller stopped");
    }

    fn next_wake(&self) -> Option<Timestamp> {
        if !self.to_plan.is_empty() {
            return Some(Timestamp::now());
        }
        self.hosts.values().filter_map(|e| e.wake_at).min()
    }

    /// One batch: plan, store, act.
    pub fn turn(&mut self, now: Timestamp) {
        for (name, entry) in &self.hosts {
            if entry.wake_at.is_some_and(|w| w <= now) {
                self.to_plan.insert(name.clone());
            }
        }
        let names: Vec<String> = self.to_plan.drain().collect();
        for name in names {
            self.plan_host(&name, now);
        }
        self.commit_and_act();
        if self.view_dirty {
            self.publish();
        }
    }

    fn handle(&mut self, msg: Msg) {
        let now = Timestamp::now();
        match msg {
            Msg::Snapshot(snap) => self.apply_snapshot(snap, now),
            Msg::Enroll {
                token,
                csr_der,
                agent,
                peer,
                reply,
            } => {
                let result = self.enroll(&token, &csr_der, &agent, &peer, now);
                if let Err(Refusal(reason)) = &result {
                    warn!(peer = %peer, token = %token.fingerprint(), "enrolment refused: {reason}");
                    let _ = reply.send(result);
                } else {
                    self.replies.push(Reply::Enrolled(reply, result));
                }
            }
            Msg::Connect {
                host,
                cert_sha256,
                peer,
                agent,
                reports,
                inventory,
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
                let Some(entry) = self.hosts.get_mut(&host) else {
                    return;
                };
                if entry.session.as_ref().is_some_and(|s| s.id == session) {
                    let _span = info_span!("agent", host = %host).entered();
                    if warning {
                        warn!("{message}");
                        entry.record.push_event(EventRecord {
                            time: now,
                            warning: true,
                            reason: "AgentLog".into(),
                            message,
                        });
                        self.changed_hosts.insert(host);
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
            } => {
                let current = self
                    .hosts
                    .get(&host)
                    .and_then(|e| e.session.as_ref())
                    .is_some_and(|s| s.id == session);
                if current {
                    debug!(host = %host, by, "full inventory received");
                    let data = HardwareData::new(&host, *hardware, now, by);
                    self.hardware.insert(host.clone(), Arc::new(data));
                    self.changed_hardware.insert(host);
                } else {
                    debug!(host = %host, session, "inventory from a replaced session ignored");
                }
            }
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
                    self.to_plan.insert(host);
                }
            }
            Msg::Boot { mac, reply } => {
                let decision = self.boot(&mac, now);
                match &decision {
                    BootDecision::Ramdisk { host, .. } => {
                        info!(host = %host, mac = %mac, "boot: serving the ramdisk")
                    }
                    BootDecision::LocalDisk { host, .. } => {
                        info!(host = %host, mac = %mac, "boot: local disk")
                    }
                    BootDecision::Refuse(reason) => warn!(mac = %mac, "boot refused: {reason}"),
                }
                self.replies.push(Reply::Boot(reply, decision));
            }
            Msg::CreateToken { host, ttl, reply } => {
                let result = self.create_token(&host, ttl, now);
                self.replies.push(Reply::Token(reply, result));
            }
        }
    }

    fn apply_snapshot(&mut self, snap: Snapshot, now: Timestamp) {
        if snap.problems != self.problems {
            for p in snap.problems.iter().filter(|p| !self.problems.contains(p)) {
                if p.warning {
                    info!("hosts directory: {p}");
                } else {
                    warn!("hosts directory: {p}");
                }
            }
            self.problems = snap.problems.clone();
            self.view_dirty = true;
        }
        if snap.secrets != self.secrets {
            // Hosts that use a Secret plan again: one that waited for it can go on.
            for (name, entry) in &self.hosts {
                let spec = &entry.record.host.spec;
                if spec.user_data.is_some()
                    || spec.network_data.is_some()
                    || spec.meta_data.is_some()
                {
                    self.to_plan.insert(name.clone());
                }
            }
            self.secret_keys = configdrive::secret_keys(&snap.secrets);
            self.secrets = snap.secrets.clone();
        }
        for (name, sourced) in &snap.hosts {
            let source = sourced.path.display().to_string();
            match self.hosts.get_mut(name) {
                Some(entry) => {
                    let r = &mut entry.record;
                    let changed = r.host.spec != sourced.host.spec
                        || r.host.metadata != sourced.host.metadata
                        || r.source != source
                        || r.deleted;
                    if changed {
                        if r.deleted {
                            info!(host = %name, "host declared again in {source}");
                        } else {
                            info!(host = %name, "spec changed in {source}");
                        }
                        r.host.spec = sourced.host.spec.clone();
                        r.host.metadata = sourced.host.metadata.clone();
                        r.source = source;
                        r.deleted = false;
                        self.changed_hosts.insert(name.clone());
                        self.to_plan.insert(name.clone());
                    }
                }
                None => {
                    info!(host = %name, "new host declared in {source}");
                    let mut host = sourced.host.clone();
                    host.status = Some(HostStatus::default());
                    host.metadata.creation_timestamp.get_or_insert(now);
                    let record = HostRecord {
                        host,
                        source,
                        ..Default::default()
                    };
                    self.hosts.insert(
                        name.clone(),
                        Entry {
                            record,
                            session: None,
                            wake_at: None,
                        },
                    );
                    self.changed_hosts.insert(name.clone());
                    self.to_plan.insert(name.clone());
                }
            }
        }
        let declared_macs: HashSet<String> = snap
            .hosts
            .values()
            .filter_map(|h| {
                h.host
                    .spec
                    .boot_mac_address
                    .as_deref()
                    .and_then(crate::boot::normalize_mac)
            })
            .collect();
        for (name, entry) in &mut self.hosts {
            if entry.record.source == DISCOVERED {
                // Kept until a declared host claims its MAC.
                let mac = entry
                    .record
                    .host
                    .spec
                    .boot_mac_address
                    .as_deref()
                    .and_then(crate::boot::normalize_mac);
                if !entry.record.deleted && mac.is_some_and(|m| declared_macs.contains(&m)) {
                    info!(host = %name, "a declared host now has this discovered host's MAC: dropping the discovered record");
                    entry.record.deleted = true;
                    self.changed_hosts.insert(name.clone());
                    self.to_plan.insert(name.clone());
                }
                continue;
            }
            if !snap.hosts.contains_key(name) && !entry.record.deleted {
                info!(host = %name, "host no longer declared in the hosts directory: deleting it");
                entry.record.deleted = true;
                self.changed_hosts.insert(name.clone());
                self.to_plan.insert(name.clone());
            }
        }
    }

    fn enroll(
        &mut self,
        token: &TokenSecret,
        csr_der: &[u8],
        agent: &AgentInfo,
        peer: &str,
        now: Timestamp,
    ) -> Result<Enrolled, Refusal> {
        let hash = token.hash();
        let Some(record) = self.tokens.get(&hash) else {
            return Err(Refusal(
                "unknown bootstrap token (never issued here, or its host was removed)".into(),
            ));
        };
        if let Some(used) = record.used_at {
            return Err(Refusal(format!(
                "bootstrap token for host {} was already used at {used} by {}; tokens are single-use: \
                 create a new one with `slipway token create {}`",
                record.host,
                record.used_by.as_deref().unwrap_or("?"),
                record.host
            )));
        }
        if record.expires_at <= now {
            return Err(Refusal(format!(
                "bootstrap token for host {} expired at {}; create a new one with `slipway token create {}`",
                record.host, record.expires_at, record.host
            )));
        }
        let host = record.host.clone();
        let Some(entry) = self.hosts.get_mut(&host).filter(|e| !e.record.deleted) else {
            return Err(Refusal(format!("host {host} is no longer declared")));
        };
        // A ramdisk says which NIC it booted from; it must be the host's.
        let declared = entry
            .record
            .host
            .spec
            .boot_mac_address
            .as_deref()
            .and_then(crate::boot::normalize_mac);
        let booted = crate::boot::normalize_mac(&agent.boot_mac);
        if let (Some(declared), Some(booted)) = (&declared, &booted)
            && declared != booted
        {
            return Err(Refusal(format!(
                "the agent booted from MAC {booted}, but host {host} has bootMACAddress {declared}"
            )));
        }
        let cert = self
            .ca
            .sign_agent(&host, csr_der, self.settings.cert_validity, now)
            .map_err(|e| Refusal(format!("{e}")))?;
        if let Some(t) = self.tokens.get_mut(&hash) {
            t.used_at = Some(now);
            t.used_by = Some(peer.to_string());
        }
        self.changed_tokens.insert(hash);
        entry.record.agent_cert_sha256 = Some(cert.sha256.clone());
        entry.record.push_event(EventRecord {
            time: now,
            warning: false,
            reason: "Enrolled".into(),
            message: format!(
                "agent {} enrolled from {peer}{}; certificate valid until {}",
                agent.version,
                if agent.boot_mac.is_empty() {
                    String::new()
                } else {
                    format!(" (boot MAC {})", agent.boot_mac)
                },
                cert.not_after
            ),
        });
        // A session on an older certificate is over.
        if entry.session.take().is_some() {
            self.to_plan.insert(host.clone());
        }
        self.changed_hosts.insert(host.clone());
        info!(host = %host, peer = %peer, "agent enrolled");
        Ok(Enrolled {
            host,
            cert_der: cert.der,
            ca_der: self.ca.cert_der().to_vec(),
            not_after: cert.not_after,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn connect(
        &mut self,
        host: &str,
        cert_sha256: &str,
        peer: &str,
        agent: &AgentInfo,
        reports: Vec<AgentReport>,
        inventory: Option<HardwareDetails>,
        commands: CommandSender,
        now: Timestamp,
    ) -> Result<u64, Refusal> {
        let Some(entry) = self.hosts.get_mut(host).filter(|e| !e.record.deleted) else {
            return Err(Refusal(format!("host {host} is not declared")));
        };
        if entry.record.agent_cert_sha256.as_deref() != Some(cert_sha256) {
            return Err(Refusal(format!(
                "the client certificate is not host {host}'s current one (a later enrolment \
                 replaced it, or the host was re-created); enrol again with a new token"
            )));
        }
        let id = self.next_session;
        self.next_session += 1;
        let reports = reports
            .into_iter()
            .map(|r| (r.id().to_string(), r))
            .collect();
        entry.session = Some(Session {
            id,
            link: AgentLink {
                since: now,
                address: peer.to_string(),
                version: agent.version.clone(),
            },
            commands,
            sent: HashSet::new(),
            reports,
            inventory,
        });
        info!(host = %host, peer = %peer, session = id, "agent session started");
        self.to_plan.insert(host.to_string());
        Ok(id)
    }

    /// Decides how the machine with `mac` boots.
    fn boot(&mut self, mac: &str, now: Timestamp) -> BootDecision {
        let Some(mac) = crate::boot::normalize_mac(mac) else {
            return BootDecision::Refuse(format!("{mac:?} is not a MAC address"));
        };
        let found = self
            .hosts
            .iter()
            .find(|(_, e)| {
                !e.record.deleted
                    && e.record
                        .host
                        .spec
                        .boot_mac_address
                        .as_deref()
                        .and_then(crate::boot::normalize_mac)
                        .as_deref()
                        == Some(&mac)
            })
            .map(|(n, e)| {
                (
                    n.clone(),
                    e.record
                        .host
                        .status
                        .as_ref()
                        .map(|s| s.provisioning.state)
                        .unwrap_or_default(),
                )
            });
        let host = match found {
            Some((name, state)) => {
                use ProvisioningState as S;
                match state {
                    S::Provisioned | S::ExternallyProvisioned => {
                        return BootDecision::LocalDisk {
                            host: name,
                            state: state.to_string(),
                        };
                    }
                    S::PoweringOffBeforeDelete | S::Deleting => {
                        return BootDecision::Refuse(format!("host {name} is being deleted"));
                    }
                    _ => name,
                }
            }
            None => match self.settings.unknown_hosts {
                UnknownHosts::Refuse => {
                    return BootDecision::Refuse(format!(
                        "no host has bootMACAddress {mac}: declare one, or run slipway serve --unknown-hosts discover"
                    ));
                }
                UnknownHosts::Discover => self.discovered(&mac, now),
            },
        };
        match self.create_token(&host, self.settings.boot_token_ttl, now) {
            Ok((token, _)) => {
                if let Some(e) = self.hosts.get_mut(&host) {
                    e.record.push_event(EventRecord {
                        time: now,
                        warning: false,
                        reason: "BootRamdisk".into(),
                        message: format!("{mac} asked how to boot: sent the Slipway ramdisk"),
                    });
                    self.changed_hosts.insert(host.clone());
                }
                BootDecision::Ramdisk { host, token, mac }
            }
            Err(e) => BootDecision::Refuse(e),
        }
    }

    /// The record of an undeclared machine, created on its first boot.
    fn discovered(&mut self, mac: &str, now: Timestamp) -> String {
        let name = format!("discovered-{}", mac.replace(':', ""));
        if !self.hosts.contains_key(&name) {
            info!(host = %name, mac = %mac, "an undeclared machine booted: registering it as discovered");
            let mut host = BareMetalHost {
                api_version: slipway_reconcile::host::API_VERSION.into(),
                kind: slipway_reconcile::host::KIND.into(),
                spec: HostSpec {
                    boot_mac_address: Some(mac.to_string()),
                    online: true,
                    ..Default::default()
                },
                ..Default::default()
            };
            host.metadata.name = name.clone();
            host.metadata.creation_timestamp = Some(now);
            let mut status = HostStatus::default();
            status.provisioning.state = ProvisioningState::Unmanaged;
            status.operational_status = OperationalStatus::Discovered;
            status.last_updated = Some(now);
            host.status = Some(status);
            let record = HostRecord {
                host,
                source: DISCOVERED.into(),
                ..Default::default()
            };
            self.hosts.insert(
                name.clone(),
                Entry {
                    record,
                    session: None,
                    wake_at: None,
                },
            );
            self.changed_hosts.insert(name.clone());
        }
        name
    }

    fn create_token(
        &mut self,
        host: &str,
        ttl: SignedDuration,
        now: Timestamp,
    ) -> Result<(TokenSecret, Timestamp), String> {
        if self.hosts.get(host).is_none_or(|e| e.record.deleted) {
            return Err(format!(
                "host {host} is not declared; add it to the hosts directory first"
            ));
        }
        let secret = tokens::generate().map_err(|e| format!("cannot generate a token: {e}"))?;
        let expires_at = now.checked_add(ttl).unwrap_or(Timestamp::MAX);
        let hash = secret.hash();
        self.tokens.insert(
            hash.clone(),
            TokenRecord {
                host: host.to_string(),
                created_at: now,
                expires_at,
                used_at: None,
                used_by: None,
            },
        );
        self.changed_tokens.insert(hash);
        // Tokens long expired are of no more use, not even for a clear refusal.
        let cutoff = now
            .checked_sub(SignedDuration::from_hours(24))
            .unwrap_or(Timestamp::MIN);
        let stale: Vec<String> = self
            .tokens
            .iter()
            .filter(|(_, t)| t.expires_at < cutoff)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.tokens.remove(&k);
            self.changed_tokens.insert(k);
        }
        info!(host = %host, expires = %expires_at, token = %secret.fingerprint(), "bootstrap token created");
        Ok((secret, expires_at))
    }

    fn plan_host(&mut self, name: &str, now: Timestamp) {
        let Some(entry) = self.hosts.get_mut(name) else {
            return;
        };
        let _span = info_span!("host", host = %name).entered();
        let status = entry
            .record
            .host
            .status
            .get_or_insert_with(HostStatus::default)
            .clone();
        let session = entry.session.as_ref();
        let view = match (&status.current_command, session) {
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
        let desired = Desired {
            name,
            spec: &entry.record.host.spec,
            annotations: &entry.record.host.metadata.annotations,
            secrets: &self.secret_keys,
            deleted: entry.record.deleted,
            policy: &self.settings.policy,
        };
        let observed = Observed {
            status: &status,
            agent: session.map(|s| &s.link),
            command: view,
            inventory: session.and_then(|s| s.inventory.as_ref()),
        };
        let plan = slipway_reconcile::plan(&desired, &observed, now);

        if plan.status != status {
            entry.record.host.status = Some(plan.status);
            self.changed_hosts.insert(name.to_string());
        }
        entry.wake_at = plan.wake_at;
        if plan.wake_at.is_some_and(|w| w <= now) {
            // Due again at once: the next turn picks it up.
            entry.wake_at = Some(now);
        }
        for action in plan.actions {
            match action {
                Action::Send(cmd) => match &mut entry.session {
                    Some(s) => {
                        let config_drive = match &cmd.kind {
                            CommandKind::WriteImage {
                                config_drive: Some(refs),
                                ..
                            } => {
                                match configdrive::resolve(&entry.record.host, refs, &self.secrets)
                                {
                                    Ok(data) => Some(data),
                                    Err(message) => {
                                        // The plan checked that the Secrets and keys exist; only contents that
                                        // do not parse get here. Not sent: the command fails as if the agent had
                                        // refused it, so the host shows a provisioning error and retries later.
                                        warn!(command = %cmd.id, "not sending {}: {message}", cmd.kind.name());
                                        s.sent.insert(cmd.id.clone());
                                        s.reports.insert(
                                            cmd.id.clone(),
                                            AgentReport::Finished {
                                                id: cmd.id.clone(),
                                                outcome: Outcome::Failure(CommandFailure {
                                                    message,
                                                }),
                                            },
                                        );
                                        self.to_plan.insert(name.to_string());
                                        continue;
                                    }
                                }
                            }
                            _ => None,
                        };
                        info!(command = %cmd.id, "sending {} to the agent", cmd.kind.name());
                        s.sent.insert(cmd.id.clone());
                        self.outbox.push((
                            s.commands.clone(),
                            Outgoing {
                                record: cmd,
                                config_drive,
                            },
                        ));
                    }
                    None => debug!(command = %cmd.id, "no agent session; command not sent"),
                },
                Action::Record(event) => {
                    if event.warning {
                        warn!("{}: {}", event.reason, event.message);
                    } else {
                        info!("{}: {}", event.reason, event.message);
                    }
                    entry.record.push_event(EventRecord {
                        time: now,
                        warning: event.warning,
                        reason: event.reason.to_string(),
                        message: event.message,
                    });
                    self.changed_hosts.insert(name.to_string());
                }
                Action::Forget => {
                    self.removed_hosts.insert(name.to_string());
                }
            }
        }
    }

    fn commit_and_act(&mut self) {
        for name in &self.removed_hosts {
            if self.hosts.remove(name).is_some() {
                info!(host = %name, "host removed");
            }
            self.changed_hosts.insert(name.clone());
            if self.hardware.remove(name).is_some() {
                self.changed_hardware.insert(name.clone());
            }
            // Its tokens go with it.
            let dead: Vec<String> = self
                .tokens
                .iter()
                .filter(|(_, t)| &t.host == name)
                .map(|(k, _)| k.clone())
                .collect();
            for k in dead {
                self.tokens.remove(&k);
                self.changed_tokens.insert(k);
            }
        }
        self.removed_hosts.clear();
        let batch = Batch {
            hosts: self
                .changed_hosts
                .iter()
                .map(|n| (n.clone(), self.hosts.get(n).map(|e| e.record.clone())))
                .collect(),
            tokens: self
                .changed_tokens
                .iter()
                .map(|k| (k.clone(), self.tokens.get(k).cloned()))
                .collect(),
            hardware: self
                .changed_hardware
                .iter()
                .map(|k| (k.clone(), self.hardware.get(k).map(|h| (**h).clone())))
                .collect(),
        };
        if !batch.is_empty() {
            if let Err(e) = self.store.write(batch) {
                // Do not act on what is not stored. The records stay marked changed; the
                // next turn tries again, and commands not sent are re-sent by the plan.
                error!("{}", crate::error_chain(&e));
                self.outbox.clear();
                for reply in self.replies.drain(..) {
                    match reply {
                        Reply::Boot(tx, _) => {
                            let _ = tx.send(BootDecision::Refuse(
                                "the coordinator cannot store state right now".into(),
                            ));
                        }
                        Reply::Enrolled(tx, _) => {
                            let _ = tx.send(Err(Refusal(
                                "the coordinator cannot store state right now; try again".into(),
                            )));
                        }
                        Reply::Token(tx, _) => {
                            let _ =
                                tx.send(Err("the coordinator cannot store state right now".into()));
                        }
                    }
                }
                for name in self.changed_hosts.iter() {
                    if let Some(e) = self.hosts.get_mut(name) {
                        if let Some(s) = e.session.as_mut() {
                            s.sent.clear()
                        }
                        e.wake_at = Some(Timestamp::now() + SignedDuration::from_secs(1));
                    }
                }
                return;
            }
            self.view_dirty = true;
        }
        self.changed_hosts.clear();
        self.changed_tokens.clear();
        self.changed_hardware.clear();
        for (tx, cmd) in self.outbox.drain(..) {
            let _ = tx.send(cmd);
        }
        for reply in self.replies.drain(..) {
            match reply {
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
    }

    fn publish(&mut self) {
        let hosts = self
            .hosts
            .iter()
            .map(|(name, e)| {
                (
                    name.clone(),
                    HostView {
                        host: e.record.host.clone(),
                        source: e.record.source.clone(),
                        deleted: e.record.deleted,
                        events: e.record.events.clone(),
                    },
                )
            })
            .collect();
        let view = View {
            hosts,
            hardware: self.hardware.clone(),
            problems: self.problems.clone(),
        };
        match self.view.write() {
            Ok(mut v) => *v = view,
            Err(poisoned) => *poisoned.into_inner() = view,
        }
        self.view_dirty = false;
    }
}
