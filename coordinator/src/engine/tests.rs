//! The engine driven message by message against the in-memory store: commit before act,
//! per-host store failures, retries, discovery, restart resumption, progress durability,
//! namespaces and the provisioning limit.

use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use slipway_reconcile::host::{
    BareMetalHost, ChecksumType, CommandKind, HostKey, HostSpec, Image, ImageFormat, Progress,
    ProvisioningState,
};
use slipway_reconcile::{CommandFailure, CommandSuccess};
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::sources::{MemorySecrets, SourceEvent};
use crate::state::memory::MemoryStore;
use crate::tokens::TokenSecret;

const MAC_A: &str = "52:54:00:00:00:0a";
const MAC_B: &str = "52:54:00:00:00:0b";

struct Harness {
    engine: Engine,
    store: MemoryStore,
    ca: Arc<Ca>,
    _dir: tempfile::TempDir,
    now: Timestamp,
}

/// An agent as the engine sees it: a command channel and its session id.
struct Agent {
    key: HostKey,
    session: u64,
    commands: mpsc::UnboundedReceiver<Box<Outgoing>>,
}

fn spec(mac: &str, image: bool) -> HostSpec {
    HostSpec {
        online: true,
        boot_mac_address: Some(mac.into()),
        image: image.then(|| Image {
            url: "http://127.0.0.1:1/images/os.img".into(),
            checksum: "ab".repeat(32),
            checksum_type: Some(ChecksumType::Sha256),
            format: Some(ImageFormat::Raw),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn doc(key: &HostKey, spec: HostSpec) -> BareMetalHost {
    let mut h = BareMetalHost {
        api_version: slipway_reconcile::host::API_VERSION.into(),
        kind: slipway_reconcile::host::KIND.into(),
        spec,
        ..Default::default()
    };
    h.metadata.name = key.name.clone();
    h.metadata.namespace = Some(key.namespace.clone());
    h
}

impl Harness {
    fn new(settings: Settings) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::load_or_create(dir.path()).unwrap());
        Harness::on(MemoryStore::new(), ca, dir, settings)
    }

    /// An engine started on what `store` holds (a restart).
    fn on(store: MemoryStore, ca: Arc<Ca>, dir: tempfile::TempDir, settings: Settings) -> Harness {
        let engine = Engine::new(
            Box::new(store.clone()),
            ca.clone(),
            Arc::new(MemorySecrets::default()),
            Settings {
                policy: slipway_reconcile::Policy {
                    retry_base: SignedDuration::from_secs(10),
                    ..Default::default()
                },
                ..settings
            },
            Metrics::new(),
        )
        .unwrap();
        Harness {
            engine,
            store,
            ca,
            _dir: dir,
            now: Timestamp::now(),
        }
    }

    fn restart(self) -> Harness {
        let settings = self.engine.settings.clone();
        Harness::on(self.store, self.ca, self._dir, settings)
    }

    fn send(&mut self, msg: Msg) {
        self.engine.handle(msg);
    }

    /// Plans, commits and acts until nothing is left to do (no commit in flight afterwards).
    fn settle(&mut self) {
        for _ in 0..20 {
            self.engine.turn(self.now);
            match self.engine.seal(self.now) {
                Some(batch) => {
                    let result = crate::state::StateStore::commit(&mut self.store, &batch);
                    self.engine
                        .committed(batch, result, std::time::Duration::ZERO, self.now);
                }
                None if self.engine.to_plan.is_empty() => return,
                None => {}
            }
        }
        panic!("the engine did not settle");
    }

    /// Plans only: nothing is committed yet.
    fn plan_only(&mut self) {
        self.engine.turn(self.now);
    }

    /// Seals and commits one batch.
    fn commit_one(&mut self) {
        let batch = self.engine.seal(self.now).expect("something to commit");
        let result = crate::state::StateStore::commit(&mut self.store, &batch);
        self.engine
            .committed(batch, result, std::time::Duration::ZERO, self.now);
    }

    fn declare(&mut self, key: &HostKey, spec: HostSpec) {
        self.send(Msg::Source(SourceEvent::Declared {
            key: key.clone(),
            host: Box::new(doc(key, spec)),
            origin: format!("hosts/{}.yaml", key.name),
        }));
    }

    fn state(&self, key: &HostKey) -> ProvisioningState {
        self.engine.hosts[key].status.provisioning.state
    }

    fn stored_state(&self, key: &HostKey) -> Option<ProvisioningState> {
        self.store.host(key).map(|h| h.status.provisioning.state)
    }

    fn token(&mut self, key: &HostKey) -> TokenSecret {
        let (tx, mut rx) = oneshot::channel();
        self.send(Msg::CreateToken {
            host: key.clone(),
            ttl: SignedDuration::from_hours(1),
            reply: tx,
        });
        self.settle();
        rx.try_recv().expect("token answered").expect("token").token
    }

    /// Enrols and connects an agent for `key`, the real way: token, CSR, certificate.
    fn enrol(&mut self, key: &HostKey, mac: &str) -> Vec<u8> {
        let token = self.token(key);
        let (tx, mut rx) = oneshot::channel();
        self.send(enrol_msg(token, mac, "127.0.0.1:1", tx));
        assert!(
            rx.try_recv().is_err(),
            "no answer before the enrolment is stored"
        );
        self.settle();
        let enrolled = rx
            .try_recv()
            .expect("enrolment answered")
            .expect("enrolled");
        assert_eq!(&enrolled.host, key);
        enrolled.cert_der
    }

    /// Enrols and connects an agent for `key`.
    fn agent(&mut self, key: &HostKey, mac: &str) -> Agent {
        let cert = self.enrol(key, mac);
        self.connect(key, &cert, vec![])
    }

    fn connect(&mut self, key: &HostKey, cert_der: &[u8], reports: Vec<AgentReport>) -> Agent {
        let (cmd_tx, commands) = mpsc::unbounded_channel();
        let (tx, mut rx) = oneshot::channel();
        self.send(Msg::Connect {
            host: key.clone(),
            cert_sha256: crate::pki::sha256_hex(cert_der),
            peer: "127.0.0.1:1".into(),
            agent: AgentInfo::default(),
            reports,
            inventory: None,
            identity: None,
            alive: live(),
            commands: cmd_tx,
            reply: tx,
        });
        let session = rx.try_recv().expect("connect answered").expect("connected");
        Agent {
            key: key.clone(),
            session,
            commands,
        }
    }

    fn report(&mut self, agent: &Agent, id: &str, outcome: Outcome) {
        self.send(Msg::Report {
            host: agent.key.clone(),
            session: agent.session,
            report: AgentReport::Finished {
                id: id.into(),
                outcome,
            },
        });
    }
}

/// A session just heard from.
fn live() -> Arc<std::sync::atomic::AtomicI64> {
    Arc::new(std::sync::atomic::AtomicI64::new(
        Timestamp::now().as_millisecond(),
    ))
}

fn ok(hardware: bool) -> Outcome {
    Outcome::Success(CommandSuccess {
        message: "done".into(),
        hardware: hardware.then(|| {
            Arc::new(slipway_reconcile::host::HardwareDetails {
                hostname: "h".into(),
                ..Default::default()
            })
        }),
    })
}

fn next(agent: &mut Agent) -> Option<Outgoing> {
    agent.commands.try_recv().ok().map(|b| *b)
}

/// Answers the host's commands from `first` on until it is provisioned.
fn provision(h: &mut Harness, agent: &mut Agent, first: Outgoing) {
    let mut cmd = first;
    for (kind, hw) in [
        ("inspect", true),
        ("erase-metadata", false),
        ("write-image", false),
    ] {
        assert_eq!(cmd.record.kind.name(), kind);
        h.report(agent, &cmd.record.id, ok(hw));
        h.settle();
        if kind != "write-image" {
            cmd = next(agent).unwrap_or_else(|| panic!("the command after {kind} sent"));
        }
    }
    assert_eq!(h.state(&agent.key), ProvisioningState::Provisioned);
}

#[test]
fn a_command_leaves_only_after_its_record_is_durable() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    h.declare(&a, spec(MAC_A, true));
    h.settle();
    assert_eq!(h.stored_state(&a), Some(ProvisioningState::Inspecting));
    let mut agent = h.agent(&a, MAC_A);
    // The plan sends inspect; it is held until the status naming it is stored.
    h.plan_only();
    assert!(next(&mut agent).is_none(), "sent before it was stored");
    assert!(h.engine.hosts[&a].status.current_command.is_some());
    assert!(
        h.store.host(&a).unwrap().status.current_command.is_none(),
        "not stored yet"
    );
    h.commit_one();
    let cmd = next(&mut agent).expect("sent once stored");
    assert_eq!(cmd.record.kind, CommandKind::Inspect);
    assert_eq!(
        h.store.host(&a).unwrap().status.current_command.unwrap().id,
        cmd.record.id
    );
    provision(&mut h, &mut agent, cmd);
    assert_eq!(h.stored_state(&a), Some(ProvisioningState::Provisioned));
}

#[test]
fn a_host_whose_commit_fails_acts_on_nothing_while_others_go_on() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    let b = HostKey::default_ns("b");
    h.declare(&a, spec(MAC_A, false));
    h.declare(&b, spec(MAC_B, false));
    h.settle();
    let mut agent_a = h.agent(&a, MAC_A);
    let mut agent_b = h.agent(&b, MAC_B);
    h.settle();
    let inspect_a = next(&mut agent_a).unwrap();
    let inspect_b = next(&mut agent_b).unwrap();
    // From now on a's changes cannot be stored: its next command is not sent; b goes on.
    h.store.fail_host(&a);
    h.report(&agent_a, &inspect_a.record.id, ok(true));
    h.report(&agent_b, &inspect_b.record.id, ok(true));
    h.settle();
    assert!(next(&mut agent_a).is_none(), "a's cleaning was not stored");
    let cmd_b = next(&mut agent_b).expect("b goes on");
    assert_eq!(cmd_b.record.kind.name(), "erase-metadata");
    assert_eq!(h.stored_state(&a), Some(ProvisioningState::Inspecting));
    assert_eq!(h.stored_state(&b), Some(ProvisioningState::Preparing));
    // An enrolment for a is refused while its state cannot be stored.
    let (tx, mut rx) = oneshot::channel();
    let token = {
        // The token itself cannot be stored either: refused.
        let (ttx, mut trx) = oneshot::channel();
        h.send(Msg::CreateToken {
            host: a.clone(),
            ttl: SignedDuration::from_hours(1),
            reply: ttx,
        });
        h.now += SignedDuration::from_secs(1);
        h.settle();
        let e = trx.try_recv().unwrap().unwrap_err();
        assert!(e.contains("cannot store state"), "{e}");
        crate::tokens::generate().unwrap()
    };
    h.send(Msg::Enroll {
        token,
        csr_der: vec![],
        agent: AgentInfo::default(),
        peer: "p".into(),
        reply: tx,
    });
    assert!(rx.try_recv().unwrap().is_err());
    // The store heals: the same command is stored and sent, once.
    h.store.heal();
    h.now += SignedDuration::from_secs(10);
    h.settle();
    let cmd_a = next(&mut agent_a).expect("a's cleaning once stored");
    assert_eq!(cmd_a.record.kind.name(), "erase-metadata");
    assert!(next(&mut agent_a).is_none(), "sent once");
    assert_eq!(
        h.store.host(&a).unwrap().status.current_command.unwrap().id,
        cmd_a.record.id
    );
}

#[test]
fn a_failed_command_is_retried_after_its_backoff() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    h.declare(&a, spec(MAC_A, false));
    h.settle();
    let mut agent = h.agent(&a, MAC_A);
    h.settle();
    let first = next(&mut agent).unwrap();
    h.report(
        &agent,
        &first.record.id,
        Outcome::Failure(CommandFailure {
            message: "no disks".into(),
        }),
    );
    h.settle();
    let st = &h.store.host(&a).unwrap().status;
    assert_eq!(st.error_count, 1);
    assert!(st.error_message.contains("no disks"));
    assert!(next(&mut agent).is_none(), "not before the backoff");
    h.now += SignedDuration::from_secs(11);
    h.settle();
    let second = next(&mut agent).expect("retried");
    assert_eq!(second.record.kind, CommandKind::Inspect);
    assert_ne!(second.record.id, first.record.id);
}

#[test]
fn an_unknown_machine_is_discovered_and_dropped_when_declared() {
    let mut h = Harness::new(Settings::default());
    let (tx, mut rx) = oneshot::channel();
    h.send(Msg::Boot {
        mac: MAC_A.into(),
        reply: tx,
    });
    assert!(
        rx.try_recv().is_err(),
        "answered before the token was stored"
    );
    h.settle();
    let BootDecision::Ramdisk { host, token, .. } = rx.try_recv().unwrap() else {
        panic!("the ramdisk");
    };
    assert_eq!(host.to_string(), "default/discovered-52540000000a");
    let stored = h.store.host(&host).expect("the discovered host is stored");
    assert_eq!(
        stored.status.provisioning.state,
        ProvisioningState::Unmanaged
    );
    assert!(
        h.store.tokens().iter().any(|(k, _)| *k == token.hash()),
        "its token is stored"
    );
    // A declared host takes the MAC: the discovered record goes, from the store too.
    let a = HostKey::new("racks", "a");
    h.declare(&a, spec(MAC_A, false));
    h.settle();
    assert!(h.store.host(&host).is_none(), "discovered record removed");
    assert!(!h.engine.hosts.contains_key(&host));
    assert!(
        !h.store.tokens().iter().any(|(_, t)| t.host == host),
        "its tokens went with it"
    );
    let (tx, mut rx) = oneshot::channel();
    h.send(Msg::Boot {
        mac: MAC_A.into(),
        reply: tx,
    });
    h.settle();
    match rx.try_recv().unwrap() {
        BootDecision::Ramdisk { host, .. } => assert_eq!(host, a),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_restarted_engine_resumes_the_command_in_flight_without_a_new_one() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    h.declare(&a, spec(MAC_A, true));
    h.settle();
    let cert = h.enrol(&a, MAC_A);
    let mut agent = h.connect(&a, &cert, vec![]);
    h.settle();
    for hw in [true, false] {
        let c = next(&mut agent).unwrap();
        h.report(&agent, &c.record.id, ok(hw));
        h.settle();
    }
    let write = next(&mut agent).unwrap();
    assert_eq!(write.record.kind.name(), "write-image");

    // Coordinator restart: the agent comes back saying the write is still running.
    let mut h = h.restart();
    h.send(Msg::Source(SourceEvent::Declared {
        key: a.clone(),
        host: Box::new(doc(&a, spec(MAC_A, true))),
        origin: "hosts/a.yaml".into(),
    }));
    h.send(Msg::Source(SourceEvent::Synced));
    h.settle();
    assert_eq!(h.state(&a), ProvisioningState::Provisioning);
    let mut agent = h.connect(
        &a,
        &cert,
        vec![AgentReport::Running {
            id: write.record.id.clone(),
            progress: None,
        }],
    );
    h.settle();
    assert!(
        next(&mut agent).is_none(),
        "the running write is not sent again"
    );
    h.report(&agent, &write.record.id, ok(false));
    h.settle();
    assert_eq!(h.stored_state(&a), Some(ProvisioningState::Provisioned));
    let reboot = next(&mut agent).expect("reboot");
    assert_eq!(reboot.record.kind, CommandKind::Reboot);

    // An agent that restarted too (it knows nothing): the same id is asked again.
    let mut h = Harness::new(Settings::default());
    h.declare(&a, spec(MAC_A, true));
    h.settle();
    let mut agent = h.agent(&a, MAC_A);
    h.settle();
    let inspect = next(&mut agent).unwrap();
    let mut h = h.restart();
    h.declare(&a, spec(MAC_A, true));
    h.send(Msg::Source(SourceEvent::Synced));
    h.settle();
    let cert_sha = h.engine.hosts[&a].record.agent_cert_sha256.clone().unwrap();
    let (cmd_tx, mut commands) = mpsc::unbounded_channel();
    let (tx, mut rx) = oneshot::channel();
    h.send(Msg::Connect {
        host: a.clone(),
        cert_sha256: cert_sha,
        peer: "p".into(),
        agent: AgentInfo::default(),
        reports: vec![],
        inventory: None,
        identity: None,
        alive: live(),
        commands: cmd_tx,
        reply: tx,
    });
    assert!(rx.try_recv().unwrap().is_ok());
    h.settle();
    let again = commands.try_recv().expect("asked again");
    assert_eq!(
        again.record.id, inspect.record.id,
        "same id: never run twice"
    );
}

#[test]
fn progress_is_shown_at_once_and_stored_every_30_s_or_on_a_phase_change() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    h.declare(&a, spec(MAC_A, true));
    h.settle();
    let mut agent = h.agent(&a, MAC_A);
    h.settle();
    for hw in [true, false] {
        let c = next(&mut agent).unwrap();
        h.report(&agent, &c.record.id, ok(hw));
        h.settle();
    }
    let write = next(&mut agent).unwrap();
    let progress = |done: u64, phase: &str| AgentReport::Running {
        id: write.record.id.clone(),
        progress: Some(Progress {
            command_id: write.record.id.clone(),
            phase: phase.into(),
            bytes_done: done,
            bytes_total: 100,
            bytes_per_second: 1,
        }),
    };
    let send = |h: &mut Harness, r: AgentReport| {
        h.send(Msg::Report {
            host: a.clone(),
            session: agent.session,
            report: r,
        })
    };
    send(&mut h, progress(10, "download"));
    h.settle();
    let stored = |h: &Harness| h.store.host(&a).unwrap().status.progress;
    assert_eq!(
        stored(&h).map(|p| p.bytes_done),
        Some(10),
        "the first progress of a phase is stored"
    );
    let commits = h.store.commits();
    for done in 20..40 {
        h.now += SignedDuration::from_secs(1);
        send(&mut h, progress(done, "download"));
        h.settle();
        let view = h.engine.view();
        let v = view.read().unwrap();
        let shown = v.hosts[&a].status.progress.clone();
        assert_eq!(
            shown.map(|p| p.bytes_done),
            Some(done),
            "the view has it at once"
        );
    }
    // 20 reports over 20 s: none stored.
    assert_eq!(h.store.commits(), commits);
    assert_eq!(stored(&h).map(|p| p.bytes_done), Some(10));
    // 30 s after the last write, the latest progress is stored, by timer alone.
    h.now += SignedDuration::from_secs(11);
    h.settle();
    assert_eq!(stored(&h).map(|p| p.bytes_done), Some(39));
    // A phase change is stored at once.
    h.now += SignedDuration::from_secs(1);
    send(&mut h, progress(40, "verify"));
    h.settle();
    assert_eq!(stored(&h).map(|p| p.phase), Some("verify".into()));
}

#[test]
fn two_namespaces_may_each_have_the_same_host_name() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::new("team-a", "node-1");
    let b = HostKey::new("team-b", "node-1");
    h.declare(&a, spec(MAC_A, false));
    h.declare(&b, spec(MAC_B, false));
    h.settle();
    let mut agent_a = h.agent(&a, MAC_A);
    let mut agent_b = h.agent(&b, MAC_B);
    h.settle();
    assert!(next(&mut agent_a).is_some() && next(&mut agent_b).is_some());
    let cert_a = h.engine.hosts[&a].record.agent_cert_sha256.clone();
    let cert_b = h.engine.hosts[&b].record.agent_cert_sha256.clone();
    assert_ne!(cert_a, cert_b);
    // b's certificate does not connect as a.
    let (cmd_tx, _rx) = mpsc::unbounded_channel();
    let (tx, mut rx) = oneshot::channel();
    h.send(Msg::Connect {
        host: a.clone(),
        cert_sha256: cert_b.unwrap(),
        peer: "p".into(),
        agent: AgentInfo::default(),
        reports: vec![],
        inventory: None,
        identity: None,
        alive: live(),
        commands: cmd_tx,
        reply: tx,
    });
    assert!(rx.try_recv().unwrap().is_err());
    assert!(h.store.host(&a).is_some() && h.store.host(&b).is_some());
}

#[test]
fn the_provisioning_limit_delays_hosts_in_arrival_order() {
    let mut h = Harness::new(Settings {
        provisioning_limit: 1,
        ..Settings::default()
    });
    let a = HostKey::default_ns("a");
    let b = HostKey::default_ns("b");
    h.declare(&a, spec(MAC_A, false));
    h.settle();
    let mut agent_a = h.agent(&a, MAC_A);
    h.settle();
    h.declare(&b, spec(MAC_B, false));
    h.settle();
    let mut agent_b = h.agent(&b, MAC_B);
    h.settle();
    let inspect_a = next(&mut agent_a).expect("a has the slot");
    assert!(next(&mut agent_b).is_none(), "b waits");
    let st_b = &h.store.host(&b).unwrap().status;
    assert_eq!(
        st_b.operational_status,
        slipway_reconcile::host::OperationalStatus::Delayed
    );
    let delayed = h.store.host(&b).unwrap().events;
    assert!(
        delayed
            .iter()
            .any(|(_, e)| e.reason == "Delayed" && e.message.contains("--provisioning-limit 1")),
        "{delayed:?}"
    );
    // a moves from inspect to cleaning: it keeps its slot.
    h.report(&agent_a, &inspect_a.record.id, ok(true));
    h.settle();
    let erase_a = next(&mut agent_a).expect("a cleans");
    assert!(next(&mut agent_b).is_none());
    h.report(&agent_a, &erase_a.record.id, ok(false));
    h.settle();
    // a is available (no image): its slot goes to b.
    assert_eq!(h.state(&a), ProvisioningState::Available);
    let inspect_b = next(&mut agent_b).expect("b gets the slot");
    assert_eq!(inspect_b.record.kind, CommandKind::Inspect);
    assert_eq!(
        h.store.host(&b).unwrap().status.operational_status,
        slipway_reconcile::host::OperationalStatus::Ok
    );
}

#[test]
fn hosts_stored_but_no_longer_declared_are_deleted_once_the_source_has_synced() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    let b = HostKey::default_ns("b");
    h.declare(&a, spec(MAC_A, false));
    h.declare(&b, spec(MAC_B, false));
    h.settle();
    let mut h = h.restart();
    h.declare(&a, spec(MAC_A, false));
    h.settle();
    assert!(
        !h.engine.hosts[&b].record.deleted,
        "not before the source synced"
    );
    h.send(Msg::Source(SourceEvent::Synced));
    h.settle();
    assert!(h.store.host(&b).is_none(), "b was deleted");
    assert!(h.store.host(&a).is_some());
    assert!(h.engine.view().read().unwrap().ready);
}

/// Enrols with a fresh operator token and key; the answer.
fn try_enrol(h: &mut Harness, key: &HostKey, mac: &str, peer: &str) -> Result<Enrolled, Refusal> {
    let token = h.token(key);
    enrol_with(h, token, mac, peer)
}

/// An enrolment with `token` and a fresh key.
fn enrol_msg(
    token: TokenSecret,
    mac: &str,
    peer: &str,
    reply: oneshot::Sender<Result<Enrolled, Refusal>>,
) -> Msg {
    let pair = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&pair)
        .unwrap();
    Msg::Enroll {
        token,
        csr_der: csr.der().to_vec(),
        agent: AgentInfo {
            version: "test".into(),
            boot_mac: mac.into(),
            ramdisk: true,
        },
        peer: peer.into(),
        reply,
    }
}

/// Enrols with `token` and a fresh key; the answer.
fn enrol_with(
    h: &mut Harness,
    token: TokenSecret,
    mac: &str,
    peer: &str,
) -> Result<Enrolled, Refusal> {
    let (tx, mut rx) = oneshot::channel();
    h.send(enrol_msg(token, mac, peer, tx));
    h.settle();
    rx.try_recv().expect("answered")
}

fn machine(uuid: &str, macs: &[&str]) -> crate::hardware::Identity {
    crate::hardware::Identity {
        uuid: uuid.into(),
        serial: "SN1".into(),
        macs: macs.iter().map(|m| m.to_string()).collect(),
        all_macs: macs.iter().map(|m| m.to_string()).collect(),
    }
}

fn connect_as(
    h: &mut Harness,
    key: &HostKey,
    cert: &[u8],
    identity: crate::hardware::Identity,
) -> Result<u64, Refusal> {
    let (cmd_tx, _commands) = mpsc::unbounded_channel();
    let (tx, mut rx) = oneshot::channel();
    h.send(Msg::Connect {
        host: key.clone(),
        cert_sha256: crate::pki::sha256_hex(cert),
        peer: "10.0.0.66:4000".into(),
        agent: AgentInfo::default(),
        reports: vec![],
        inventory: None,
        identity: Some(identity),
        alive: live(),
        commands: cmd_tx,
        reply: tx,
    });
    rx.try_recv().expect("answered")
}

#[test]
fn a_second_enrolment_never_displaces_a_live_agent_and_is_raised_as_an_impostor() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    h.declare(&a, spec(MAC_A, false));
    h.settle();
    let agent = h.agent(&a, MAC_A);
    h.settle();
    let refused = try_enrol(&mut h, &a, MAC_A, "10.0.0.66:4000").unwrap_err();
    assert!(
        refused.0.contains("10.0.0.66:4000") && refused.0.contains("is connected"),
        "{}",
        refused.0
    );
    let stored = h.store.host(&a).unwrap();
    let alert = stored
        .status
        .possible_impostor
        .expect("raised in the status");
    assert_eq!(alert.peer, "10.0.0.66:4000");
    assert!(
        stored
            .events
            .iter()
            .any(|(_, e)| e.reason == "PossibleImpostor" && e.warning)
    );
    // The real agent's session is still the one.
    assert_eq!(
        h.engine.hosts[&a].session.as_ref().unwrap().id,
        agent.session
    );
    // Once the session has been silent past the limit (the machine rebooted), a new
    // enrolment gets in, and the alert is cleared from the status.
    h.engine.hosts[&a]
        .session
        .as_ref()
        .unwrap()
        .alive
        .store(0, std::sync::atomic::Ordering::Relaxed);
    assert!(try_enrol(&mut h, &a, MAC_A, "10.0.0.5:4000").is_ok());
    assert!(h.store.host(&a).unwrap().status.possible_impostor.is_none());
}

#[test]
fn the_boot_mac_is_required_and_must_be_the_hosts() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    h.declare(&a, spec(MAC_A, false));
    h.settle();
    // The token of a boot script: anyone who asked /boot/ipxe?mac= has it.
    let boot_token = ramdisk_token(boot(&mut h, MAC_A));
    let e = enrol_with(&mut h, boot_token.clone(), "", "p").unwrap_err();
    assert!(
        e.0.contains("did not say which MAC") && e.0.contains(MAC_A),
        "{}",
        e.0
    );
    let e = enrol_with(&mut h, boot_token.clone(), MAC_B, "p").unwrap_err();
    assert!(e.0.contains(MAC_B) && e.0.contains(MAC_A), "{}", e.0);
    // An operator's token (admin socket) needs no boot MAC, but a wrong one is refused.
    let e = try_enrol(&mut h, &a, MAC_B, "p").unwrap_err();
    assert!(e.0.contains(MAC_B), "{}", e.0);
    let operator = try_enrol(&mut h, &a, "", "p").unwrap().cert_der;
    assert!(connect_as(&mut h, &a, &operator, machine("u1", &[MAC_B])).is_ok());
    h.engine.hosts.get_mut(&a).unwrap().session = None;
    // Enrolled with the boot token and the right MAC, but the machine has no such NIC: the
    // session is refused.
    let cert = enrol_with(&mut h, boot_token, MAC_A, "p").unwrap().cert_der;
    let e = connect_as(&mut h, &a, &cert, machine("u1", &[MAC_B])).unwrap_err();
    assert!(e.0.contains("no such NIC"), "{}", e.0);
    assert!(connect_as(&mut h, &a, &cert, machine("u1", &[MAC_A, MAC_B])).is_ok());
}

#[test]
fn an_agent_on_other_hardware_than_inspected_is_refused_until_accepted() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    h.declare(&a, spec(MAC_A, false));
    h.settle();
    let cert = try_enrol(&mut h, &a, MAC_A, "p").unwrap().cert_der;
    let session = connect_as(&mut h, &a, &cert, machine("uuid-1", &[MAC_A])).unwrap();
    // Inspection records the machine.
    let mut hw = crate::hardware::Hardware::default();
    hw.system_vendor.uuid = "UUID-1".into();
    hw.system_vendor.serial_number = "SN1".into();
    hw.nics.push(crate::hardware::Nic {
        mac: MAC_A.into(),
        pci_address: "0000:00:03.0".into(),
        ..Default::default()
    });
    h.send(Msg::Inventory {
        host: a.clone(),
        session,
        hardware: Box::new(hw),
        by: "inspect",
    });
    h.settle();
    assert_eq!(
        h.store.host(&a).unwrap().record.identity.unwrap().uuid,
        "uuid-1"
    );
    // Another machine with the same certificate (copied) and the host's MAC: refused, naming
    // what differs and how to accept a replacement.
    let e = connect_as(&mut h, &a, &cert, machine("uuid-2", &[MAC_A])).unwrap_err();
    assert!(
        e.0.contains("system UUID uuid-2 (inspected: uuid-1)")
            && e.0.contains("slipway.io/accept-hardware: \"uuid-2\""),
        "{}",
        e.0
    );
    assert!(h.engine.hosts[&a].status.possible_impostor.is_some());
    // The operator accepts the replaced machine.
    let mut s = spec(MAC_A, false);
    s.online = true;
    let mut d = doc(&a, s);
    d.metadata
        .annotations
        .insert(ACCEPT_HARDWARE_ANNOTATION.into(), "uuid-2".into());
    h.send(Msg::Source(SourceEvent::Declared {
        key: a.clone(),
        host: Box::new(d),
        origin: "hosts/a.yaml".into(),
    }));
    h.settle();
    assert!(connect_as(&mut h, &a, &cert, machine("uuid-2", &[MAC_A])).is_ok());
    h.settle();
    assert_eq!(
        h.store.host(&a).unwrap().record.identity.unwrap().uuid,
        "uuid-2"
    );
}

fn boot(h: &mut Harness, mac: &str) -> BootDecision {
    let (tx, mut rx) = oneshot::channel();
    h.send(Msg::Boot {
        mac: mac.into(),
        reply: tx,
    });
    h.settle();
    rx.try_recv().expect("answered")
}

fn ramdisk_token(d: BootDecision) -> TokenSecret {
    match d {
        BootDecision::Ramdisk { token, .. } => token,
        other => panic!("not the ramdisk: {other:?}"),
    }
}

#[test]
fn a_boot_script_carries_one_token_per_boot_and_none_while_the_agent_is_live() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    h.declare(&a, spec(MAC_A, false));
    h.settle();
    let first = ramdisk_token(boot(&mut h, MAC_A));
    let again = ramdisk_token(boot(&mut h, MAC_A));
    assert_eq!(first, again, "a repeated fetch gets the same token");
    let boot_tokens = |h: &Harness| {
        h.store
            .tokens()
            .iter()
            .filter(|(_, t)| t.host == a && t.boot && t.used_at.is_none())
            .count()
    };
    assert_eq!(boot_tokens(&h), 1);
    // Used by the agent, whose session is live: nothing for anyone else.
    let cert = enrol_with(&mut h, first.clone(), MAC_A, "p")
        .unwrap()
        .cert_der;
    let agent = h.connect(&a, &cert, vec![]);
    match boot(&mut h, MAC_A) {
        BootDecision::Wait(why) => assert!(why.contains("connected"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(boot_tokens(&h), 0);
    // The machine rebooted (its session went silent): a new token for the new boot.
    h.engine.hosts[&a]
        .session
        .as_ref()
        .unwrap()
        .alive
        .store(0, std::sync::atomic::Ordering::Relaxed);
    let next = ramdisk_token(boot(&mut h, MAC_A));
    assert_ne!(next, first);
    drop(agent);
    // A restarted coordinator does not know the secret: it mints a new one and revokes the
    // unused old one, so there is still only one.
    let mut h = h.restart();
    h.declare(&a, spec(MAC_A, false));
    h.send(Msg::Source(SourceEvent::Synced));
    h.settle();
    let after = ramdisk_token(boot(&mut h, MAC_A));
    assert_ne!(after, next);
    assert_eq!(boot_tokens(&h), 1);
}

fn mac(n: u32) -> String {
    format!("52:54:00:99:{:02x}:{:02x}", n >> 8, n & 0xff)
}

fn discovered_key(n: u32) -> HostKey {
    HostKey::default_ns(format!("discovered-{}", mac(n).replace(':', "")))
}

fn kept(h: &Harness, key: &HostKey) -> bool {
    h.engine
        .hosts
        .get(key)
        .is_some_and(|e| !e.forgotten && !e.record.deleted)
}

#[test]
fn discovered_hosts_are_capped_expire_unseen_and_can_be_deleted() {
    let mut h = Harness::new(Settings {
        discovered_limit: 3,
        ..Settings::default()
    });
    for n in 0..3 {
        ramdisk_token(boot(&mut h, &mac(n)));
    }
    assert!((0..3).all(|n| kept(&h, &discovered_key(n))));
    // At the limit, with every discovered host just seen: refused, saying what to do.
    match boot(&mut h, &mac(3)) {
        BootDecision::Refuse(why) => {
            assert!(
                why.contains("--discovered-limit") && why.contains("slipway delete host"),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(!kept(&h, &discovered_key(3)));
    // One that never enrolled and was last seen ten minutes ago makes room.
    h.engine.hosts.get_mut(&discovered_key(0)).unwrap().seen_at =
        Timestamp::now() - SignedDuration::from_mins(10);
    ramdisk_token(boot(&mut h, &mac(3)));
    h.settle();
    assert!(!kept(&h, &discovered_key(0)) && kept(&h, &discovered_key(3)));
    assert!(
        h.store.host(&discovered_key(0)).is_none(),
        "removed from the store"
    );
    // Unseen for longer than the boot token's validity: swept.
    h.engine.hosts.get_mut(&discovered_key(1)).unwrap().seen_at =
        Timestamp::now() - SignedDuration::from_hours(2);
    h.engine.sweep_discovered(Timestamp::now());
    h.settle();
    assert!(!kept(&h, &discovered_key(1)) && kept(&h, &discovered_key(2)));
    // The operator deletes one; a declared host is refused, naming its file.
    let (tx, mut rx) = oneshot::channel();
    h.send(Msg::DeleteHost {
        host: discovered_key(2),
        reply: tx,
    });
    assert!(rx.try_recv().unwrap().is_ok());
    h.settle();
    assert!(!kept(&h, &discovered_key(2)));
    assert!(h.store.host(&discovered_key(2)).is_none());
    let a = HostKey::default_ns("a");
    h.declare(&a, spec(MAC_A, false));
    h.settle();
    let (tx, mut rx) = oneshot::channel();
    h.send(Msg::DeleteHost { host: a, reply: tx });
    let e = rx.try_recv().unwrap().unwrap_err();
    assert!(e.contains("hosts/a.yaml"), "{e}");
}

#[test]
fn an_impostor_flood_cannot_erase_the_hosts_other_events() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    h.declare(&a, spec(MAC_A, false));
    h.settle();
    let _agent = h.agent(&a, MAC_A);
    h.settle();
    let before: Vec<String> = h
        .store
        .host(&a)
        .unwrap()
        .events
        .iter()
        .map(|(_, e)| e.reason.clone())
        .collect();
    assert!(!before.is_empty());
    for i in 0..200 {
        assert!(try_enrol(&mut h, &a, MAC_A, &format!("10.0.0.66:{i}")).is_err());
    }
    h.settle();
    let events = h.store.host(&a).unwrap().events;
    let impostors = events
        .iter()
        .filter(|(_, e)| e.reason == "PossibleImpostor")
        .count();
    assert_eq!(impostors, crate::state::EVENTS_PER_KIND);
    for reason in &before {
        assert!(
            events.iter().any(|(_, e)| &e.reason == reason),
            "{reason} was pushed out"
        );
    }
    // The newest attempt is the one kept, in the engine and in the store.
    assert!(events.last().unwrap().1.message.contains("10.0.0.66:199"));
    assert_eq!(h.engine.hosts[&a].events.len(), events.len());
}

#[test]
fn an_iso_token_is_the_hosts_one_boot_token_and_none_while_its_agent_is_live() {
    let mut h = Harness::new(Settings::default());
    let a = HostKey::default_ns("a");
    h.declare(&a, spec(MAC_A, false));
    h.settle();
    let iso = |h: &mut Harness| {
        let (tx, mut rx) = oneshot::channel();
        h.send(Msg::BootToken {
            host: a.clone(),
            ttl: SignedDuration::from_mins(10),
            reply: tx,
        });
        h.settle();
        rx.try_recv().expect("answered")
    };
    let first = iso(&mut h).unwrap();
    assert_eq!(first.boot_mac.as_deref(), Some(MAC_A));
    // The boot script of the same boot carries the same token.
    assert_eq!(ramdisk_token(boot(&mut h, MAC_A)), first.token);
    assert_eq!(iso(&mut h).unwrap().token, first.token);
    let cert = enrol_with(&mut h, first.token, MAC_A, "p")
        .unwrap()
        .cert_der;
    let _agent = h.connect(&a, &cert, vec![]);
    let e = iso(&mut h).unwrap_err();
    assert!(e.contains("connected"), "{e}");
    let (tx, mut rx) = oneshot::channel();
    h.send(Msg::BootToken {
        host: HostKey::default_ns("nobody"),
        ttl: SignedDuration::from_mins(10),
        reply: tx,
    });
    assert!(rx.try_recv().unwrap().is_err());
}
