//! The agent-facing gRPC API (`slipway.agent.v1.AgentService`) over TLS.
//!
//! This is the only coordinator module that knows protobuf types: it authenticates the peer,
//! converts messages to the controller's plain types and back, and nothing else.
//!
//! Authentication: TLS client certificates are optional at the handshake (an enrolling agent
//! has none yet) but always verified against the coordinator CA when presented, so a
//! certificate from another CA fails the handshake. `Session` then requires a certificate, reads
//! the host it names, and refuses a hello that speaks for any other host. Every refusal is
//! logged with the peer address and the reason.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use slipway_proto::v1 as pb;
use slipway_reconcile::host::{
    Bios, ChecksumType, CommandKind, HardwareDetails, ImageFormat, Progress, RootDeviceHints,
};
use slipway_reconcile::{CommandFailure, CommandSuccess};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use crate::engine::{AgentInfo, AgentReport, Msg, Outcome, Outgoing, Refusal};
use crate::hardware::{self, Hardware};
use crate::limits::{Gate, Held, Throttle, held_back};
use crate::metrics::Metrics;
use crate::pki;
use crate::tokens::TokenSecret;

pub use crate::engine::SILENCE_LIMIT;
/// How long a TLS handshake may take (a real one takes milliseconds).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// How long a connection without a client certificate may live: it can only enrol, one call
/// (which the agent gives up on after 20 s).
const UNAUTHENTICATED_LIMIT: Duration = Duration::from_secs(60);
/// Refused handshakes logged: a burst of this many, then one per [`HANDSHAKE_LOG_EVERY`].
const HANDSHAKE_LOG_BURST: u32 = 10;
const HANDSHAKE_LOG_EVERY: Duration = Duration::from_secs(5);
/// How long after connecting an agent has to say hello.
const HELLO_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Api {
    tx: mpsc::Sender<Msg>,
    metrics: Arc<Metrics>,
    /// PEM CA certificates sent with every image command (`serve --image-ca`), or empty.
    image_ca_pem: Arc<str>,
}

impl Api {
    pub fn new(tx: mpsc::Sender<Msg>, image_ca_pem: &str, metrics: Arc<Metrics>) -> Api {
        Api {
            tx,
            metrics,
            image_ca_pem: Arc::from(image_ca_pem),
        }
    }

    pub fn into_service(self) -> pb::agent_service_server::AgentServiceServer<Api> {
        pb::agent_service_server::AgentServiceServer::new(self)
            .max_decoding_message_size(16 * 1024 * 1024)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))
    }
}

fn peer_of<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map_or_else(|| "unknown peer".into(), |a| a.to_string())
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::Command, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for Api {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        if r.token.trim().is_empty() {
            warn!(peer = %peer, "enrolment refused: no bootstrap token given");
            return Err(Status::unauthenticated("a bootstrap token is required"));
        }
        let token = TokenSecret::new(r.token.trim());
        let agent = agent_info(r.agent.as_ref());
        let result = self
            .ask(|reply| Msg::Enroll {
                token,
                csr_der: r.csr_der,
                agent,
                peer,
                reply,
            })
            .await?;
        match result {
            Ok(e) => Ok(Response::new(pb::EnrollResponse {
                host: e.host.name,
                certificate_der: e.cert_der,
                ca_certificate_der: e.ca_der,
                not_after: e.not_after.to_string(),
                namespace: e.host.namespace,
            })),
            Err(Refusal(reason)) => Err(Status::permission_denied(reason)),
        }
    }

    type SessionStream = CommandStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentEvent>>,
    ) -> Result<Response<CommandStream>, Status> {
        let peer = peer_of(&req);
        let Some(certs) = req.peer_certs() else {
            warn!(peer = %peer, "agent session refused: no client certificate (the agent must enrol with a bootstrap token first)");
            return Err(Status::unauthenticated(
                "a client certificate is required: enrol with a bootstrap token first",
            ));
        };
        let Some(leaf) = certs.first() else {
            return Err(Status::unauthenticated("empty client certificate chain"));
        };
        let host = match pki::host_of(leaf) {
            Ok(h) => h,
            Err(reason) => {
                warn!(peer = %peer, "agent session refused: {reason}");
                return Err(Status::permission_denied(reason));
            }
        };
        let cert_sha256 = pki::sha256_hex(leaf);
        let mut inbound = req.into_inner();

        let hello = match tokio::time::timeout(HELLO_LIMIT, inbound.message()).await {
            Ok(Ok(Some(pb::AgentEvent {
                event: Some(pb::agent_event::Event::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => {
                warn!(host = %host, peer = %peer, "agent session refused: the first event was not a hello");
                return Err(Status::invalid_argument(
                    "the first event of a session must be a hello",
                ));
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                warn!(host = %host, peer = %peer, "agent session refused: no hello within {HELLO_LIMIT:?}");
                return Err(Status::deadline_exceeded("no hello"));
            }
        };
        // An agent from before namespaces says none: the default one.
        let said = slipway_reconcile::host::HostKey::new(
            if hello.namespace.is_empty() {
                slipway_reconcile::host::DEFAULT_NAMESPACE
            } else {
                hello.namespace.as_str()
            },
            crate::log::escape(&hello.host).into_owned(),
        );
        if said != host {
            warn!(
                host = %host,
                peer = %peer,
                "agent session refused: the certificate of host {host} was used to speak for host {said}",
            );
            return Err(Status::permission_denied(format!(
                "this certificate belongs to host {host}; it cannot act for host {said}",
            )));
        }
        let agent = agent_info(hello.agent.as_ref());
        let reports = hello.commands.iter().filter_map(command_status).collect();
        let hello_hardware = hello
            .inventory
            .as_ref()
            .map(|inv| Box::new(hardware_of(inv)));
        let inventory = hello_hardware
            .as_ref()
            .map(|h| Arc::new(hardware::details(h)));
        let identity = hello_hardware.as_deref().map(hardware::Identity::of);
        let alive = Arc::new(std::sync::atomic::AtomicI64::new(now_ms()));
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel::<Box<Outgoing>>();
        let session = {
            let host = host.clone();
            let peer = peer.clone();
            self.ask(|reply| Msg::Connect {
                host,
                cert_sha256,
                peer,
                agent,
                reports,
                inventory,
                identity,
                alive: alive.clone(),
                commands: cmd_tx,
                reply,
            })
            .await?
        };
        let session = session.map_err(|Refusal(reason)| Status::permission_denied(reason))?;
        if let Some(hardware) = hello_hardware {
            let _ = self
                .tx
                .send(Msg::Inventory {
                    host: host.clone(),
                    session,
                    hardware,
                    by: "hello",
                })
                .await;
        }

        let tx = self.tx.clone();
        let metrics = self.metrics.clone();
        let mut log_limit = LogLimit::new(std::time::Instant::now());
        tokio::spawn(async move {
            let reason = loop {
                let next = tokio::time::timeout(SILENCE_LIMIT, inbound.message()).await;
                let event = match next {
                    Ok(Ok(Some(pb::AgentEvent { event: Some(e) }))) => {
                        alive.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                        e
                    }
                    Ok(Ok(Some(_))) => continue,
                    Ok(Ok(None)) => break "the agent closed the session".to_string(),
                    Ok(Err(status)) => break format!("stream error: {}", status.message()),
                    Err(_) => break format!("no message from the agent for {SILENCE_LIMIT:?}"),
                };
                let msg = match event {
                    pb::agent_event::Event::Progress(p) => Msg::Report {
                        host: host.clone(),
                        session,
                        report: AgentReport::Running {
                            id: p.command_id.clone(),
                            progress: Some(progress(&p)),
                        },
                    },
                    pb::agent_event::Event::Result(r) => {
                        if let Some(pb::command_result::Outcome::Success(pb::Success {
                            detail: Some(pb::success::Detail::WriteImage(w)),
                            ..
                        })) = &r.outcome
                        {
                            metrics.bytes_written.inc_by(w.bytes_written);
                        }
                        // The full inventory first, so it is stored by the time the report
                        // moves the host on.
                        if let Some(pb::command_result::Outcome::Success(pb::Success {
                            detail: Some(pb::success::Detail::Inventory(inv)),
                            ..
                        })) = &r.outcome
                        {
                            let msg = Msg::Inventory {
                                host: host.clone(),
                                session,
                                hardware: Box::new(hardware_of(inv)),
                                by: "inspect",
                            };
                            if tx.send(msg).await.is_err() {
                                return;
                            }
                        }
                        match command_result(&r) {
                            Some(report) => Msg::Report {
                                host: host.clone(),
                                session,
                                report,
                            },
                            None => continue,
                        }
                    }
                    pb::agent_event::Event::Log(l) => {
                        let Some(message) = log_limit.admit(l.message) else {
                            continue;
                        };
                        Msg::AgentLog {
                            host: host.clone(),
                            session,
                            warning: l.level >= pb::log_line::Level::Warn as i32,
                            message,
                        }
                    }
                    pb::agent_event::Event::Heartbeat(_) => {
                        metrics.heartbeats.inc();
                        continue;
                    }
                    pb::agent_event::Event::Hello(_) => {
                        warn!(host = %host, "ignored a second hello in the same session");
                        continue;
                    }
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            };
            let _ = tx
                .send(Msg::Disconnect {
                    host,
                    session,
                    reason,
                })
                .await;
        });

        let ca = self.image_ca_pem.clone();
        let out = UnboundedReceiverStream::new(cmd_rx).map(move |c| Ok(command_to_proto(&c, &ca)));
        Ok(Response::new(Box::pin(out)))
    }
}

/// Accepts TCP connections within `gate`'s caps and completes TLS handshakes concurrently,
/// logging refused handshakes with their reason (e.g. a client certificate from another CA),
/// throttled. A connection counts against its address's cap (`Permit::authenticated`)
/// until its handshake has verified a client certificate; one without (an enrolment) keeps
/// counting, and is closed after [`UNAUTHENTICATED_LIMIT`].
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    gate: Gate,
) -> impl Stream<Item = Result<TlsStream<Held<TcpStream>>, std::io::Error>> {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = mpsc::channel(64);
    let refusals = Arc::new(std::sync::Mutex::new(Throttle::new(
        HANDSHAKE_LOG_BURST,
        HANDSHAKE_LOG_EVERY,
    )));
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("accepting a connection on the agent port failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Over a cap: closed at once (the gate counts and logs it).
            let Ok(permit) = gate.admit(addr.ip()) else {
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                let gate = permit.gate().clone();
                let handshake = acceptor.accept(Held::new(tcp, permit));
                let why = match tokio::time::timeout(HANDSHAKE_LIMIT, handshake).await {
                    Ok(Ok(mut tls)) => {
                        let (held, session) = tls.get_mut();
                        if session.peer_certificates().is_some_and(|c| !c.is_empty()) {
                            held.permit_mut().authenticated();
                        } else {
                            held.expire_in(UNAUTHENTICATED_LIMIT, "enrolment");
                        }
                        let _ = tx.send(Ok(tls)).await;
                        return;
                    }
                    Ok(Err(e)) => explain_tls(&e),
                    Err(_) => {
                        gate.timed_out("handshake");
                        format!("handshake took longer than {HANDSHAKE_LIMIT:?}")
                    }
                };
                let admitted = refusals
                    .lock()
                    .map(|mut t| t.admit(std::time::Instant::now()))
                    .unwrap_or(None);
                if let Some(held) = admitted {
                    warn!(peer = %addr, "TLS connection refused: {why}{}", held_back(held));
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// tonic reads the peer's address (and, through the TLS stream, its certificates) from the
/// connection it serves.
impl tonic::transport::server::Connected for Held<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}

fn explain_tls(e: &std::io::Error) -> String {
    use rustls::{CertificateError, Error as E};
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return e.to_string();
    };
    match inner {
        E::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            "the client certificate was not issued by this coordinator's CA".into()
        }
        E::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the client certificate has expired; the agent must enrol again".into(),
        E::InvalidCertificate(other) => format!("bad client certificate: {other:?}"),
        other => other.to_string(),
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// The longest agent log line kept; longer ones are cut, with a marker.
pub const LOG_LINE_BYTES: usize = 2048;
/// Agent log lines admitted per session: a burst of this many, refilled at one a second.
pub const LOG_BURST: u32 = 30;

/// Size and rate limits on one session's log lines: an agent (or an impostor holding a
/// certificate) cannot grow the store or flood the log. Dropped lines are counted and said.
pub struct LogLimit {
    tokens: f64,
    last: std::time::Instant,
    dropped: u64,
}

impl LogLimit {
    pub fn new(now: std::time::Instant) -> LogLimit {
        LogLimit {
            tokens: f64::from(LOG_BURST),
            last: now,
            dropped: 0,
        }
    }

    /// The line to pass on, cut to [`LOG_LINE_BYTES`], or `None` when over the rate.
    pub fn admit(&mut self, line: String) -> Option<String> {
        self.admit_at(line, std::time::Instant::now())
    }

    fn admit_at(&mut self, mut line: String, now: std::time::Instant) -> Option<String> {
        let secs = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + secs).min(f64::from(LOG_BURST));
        if self.tokens < 1.0 {
            self.dropped += 1;
            return None;
        }
        self.tokens -= 1.0;
        if line.len() > LOG_LINE_BYTES {
            let mut cut = LOG_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            let extra = line.len() - cut;
            line.truncate(cut);
            line.push_str(&format!(" [... {extra} more bytes cut by the coordinator]"));
        }
        if self.dropped > 0 {
            line = format!(
                "[{} earlier log lines dropped: more than {LOG_BURST} at once] {line}",
                std::mem::take(&mut self.dropped)
            );
        }
        Some(line)
    }
}

// ----- conversions -----

fn agent_info(a: Option<&pb::AgentInfo>) -> AgentInfo {
    a.map(|a| AgentInfo {
        version: a.version.clone(),
        boot_mac: a.boot_mac.clone(),
        ramdisk: a.ramdisk,
    })
    .unwrap_or_default()
}

fn progress(p: &pb::Progress) -> Progress {
    Progress {
        command_id: p.command_id.clone(),
        phase: p.phase.clone(),
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        bytes_per_second: p.bytes_per_second,
    }
}

fn command_status(s: &pb::CommandStatus) -> Option<AgentReport> {
    use pb::command_status::State;
    match State::try_from(s.state).ok()? {
        State::Running => Some(AgentReport::Running {
            id: s.command_id.clone(),
            progress: s.progress.as_ref().map(progress),
        }),
        State::Finished => s.result.as_ref().and_then(command_result),
        State::Unspecified => None,
    }
}

fn command_result(r: &pb::CommandResult) -> Option<AgentReport> {
    let outcome = match r.outcome.as_ref()? {
        pb::command_result::Outcome::Success(s) => Outcome::Success(CommandSuccess {
            message: s.message.clone(),
            hardware: match &s.detail {
                Some(pb::success::Detail::Inventory(inv)) => Some(Arc::new(hardware_details(inv))),
                _ => None,
            },
        }),
        pb::command_result::Outcome::Failure(f) => Outcome::Failure(CommandFailure {
            message: f.message.clone(),
        }),
    };
    Some(AgentReport::Finished {
        id: r.command_id.clone(),
        outcome,
    })
}

/// The metal3 `HardwareDetails` summary of an inventory.
pub fn hardware_details(inv: &pb::Inventory) -> HardwareDetails {
    hardware::details(&hardware_of(inv))
}

/// The full inventory, in the shape of a `HardwareData`'s `spec.hardware`.
pub fn hardware_of(inv: &pb::Inventory) -> Hardware {
    let sys = inv.system.clone().unwrap_or_default();
    let cpu = inv.cpu.clone().unwrap_or_default();
    let mem = inv.memory.clone().unwrap_or_default();
    let ram_mebibytes = if mem.physical_mib > 0 {
        mem.physical_mib
    } else {
        mem.total_bytes / (1024 * 1024)
    };
    Hardware {
        system_vendor: hardware::SystemVendor {
            manufacturer: sys.manufacturer,
            product_name: sys.product_name,
            serial_number: sys.serial_number,
            version: sys.version,
            uuid: sys.uuid,
            sku: sys.sku,
            family: sys.family,
        },
        firmware: hardware::Firmware {
            bios: Bios {
                date: sys.bios_date,
                vendor: sys.bios_vendor,
                version: sys.bios_version,
            },
            boot_mode: inv.boot_mode.clone(),
            secure_boot: inv.secure_boot,
        },
        ram_mebibytes,
        nics: inv
            .nics
            .iter()
            .map(|n| hardware::Nic {
                name: n.name.clone(),
                model: if n.vendor_id.is_empty() {
                    n.driver.clone()
                } else {
                    format!("{} {}", n.vendor_id, n.device_id)
                },
                mac: n.mac.clone(),
                ip: n.ip_addresses.first().cloned().unwrap_or_default(),
                speed_gbps: n.speed_mbps / 1000,
                pxe: n.pxe,
                kind: n.kind.clone(),
                permanent_mac: n.permanent_mac.clone(),
                driver: n.driver.clone(),
                pci_address: n.pci_address.clone(),
                vendor_id: n.vendor_id.clone(),
                device_id: n.device_id.clone(),
                speed_mbps: n.speed_mbps,
                mtu: n.mtu,
                has_carrier: n.has_carrier,
                operstate: n.operstate.clone(),
                ip_addresses: n.ip_addresses.clone(),
                numa_node: n.numa_node,
                bond_master: n.bond_master.clone(),
                bond: n.bond.as_ref().map(|b| hardware::Bond {
                    mode: b.mode.clone(),
                    members: b.members.clone(),
                }),
                lldp: n.lldp.as_ref().map(|l| hardware::Lldp {
                    chassis_id: l.chassis_id.clone(),
                    port_id: l.port_id.clone(),
                    port_description: l.port_description.clone(),
                    system_name: l.system_name.clone(),
                    system_description: l.system_description.clone(),
                    management_addresses: l.management_addresses.clone(),
                    port_vlan_id: l.port_vlan_id,
                    vlans: l
                        .vlans
                        .iter()
                        .map(|v| hardware::LldpVlan {
                            id: v.id,
                            name: v.name.clone(),
                        })
                        .collect(),
                }),
            })
            .collect(),
        storage: inv
            .disks
            .iter()
            .map(|d| hardware::Storage {
                name: d.name.clone(),
                alternate_names: d.alternate_names.clone(),
                rotational: d.rotational,
                kind: d.r#type.clone(),
                size_bytes: d.size_bytes,
                vendor: d.vendor.clone(),
                model: d.model.clone(),
                serial_number: d.serial_number.clone(),
                wwn: d.wwn.clone(),
                wwn_vendor_extension: d.wwn_vendor_extension.clone(),
                wwn_with_extension: d.wwn_with_extension.clone(),
                hctl: d.hctl.clone(),
                by_path: d.by_path.clone(),
                transport: d.transport.clone(),
                logical_block_size: d.logical_block_size,
                physical_block_size: d.physical_block_size,
                removable: d.removable,
                read_only: d.read_only,
                numa_node: d.numa_node,
                partition_table: d.partition_table.clone(),
                partitions: d
                    .partitions
                    .iter()
                    .map(|p| hardware::Partition {
                        name: p.name.clone(),
                        number: p.number,
                        start_bytes: p.start_bytes,
                        size_bytes: p.size_bytes,
                        label: p.label.clone(),
                    })
                    .collect(),
            })
            .collect(),
        cpu: hardware::Cpu {
            arch: cpu.architecture,
            model: cpu.model,
            clock_megahertz: f64::from(cpu.frequency_mhz),
            flags: cpu.flags,
            count: cpu.count,
            vendor: cpu.vendor,
            cores: cpu.cores,
            sockets: cpu.sockets,
            threads_per_core: cpu.threads_per_core,
            max_clock_megahertz: cpu.max_frequency_mhz,
        },
        hostname: inv.hostname.clone(),
        memory: hardware::Memory {
            total_bytes: mem.total_bytes,
            physical_mebibytes: mem.physical_mib,
            dimms: mem
                .dimms
                .iter()
                .map(|d| hardware::Dimm {
                    locator: d.locator.clone(),
                    bank_locator: d.bank_locator.clone(),
                    size_mebibytes: d.size_mib,
                    kind: d.r#type.clone(),
                    form_factor: d.form_factor.clone(),
                    speed_mts: d.speed_mts,
                    configured_speed_mts: d.configured_speed_mts,
                    manufacturer: d.manufacturer.clone(),
                    serial_number: d.serial_number.clone(),
                    part_number: d.part_number.clone(),
                })
                .collect(),
        },
        numa_nodes: inv
            .numa_nodes
            .iter()
            .map(|n| hardware::NumaNode {
                id: n.id,
                cpus: n.cpus.clone(),
                memory_bytes: n.memory_bytes,
            })
            .collect(),
        pci_devices: inv
            .pci_devices
            .iter()
            .map(|p| hardware::PciDevice {
                address: p.address.clone(),
                class_name: hardware::class_name(&p.class).into(),
                class: p.class.clone(),
                vendor_name: hardware::vendor_name(&p.vendor_id).into(),
                vendor_id: p.vendor_id.clone(),
                device_id: p.device_id.clone(),
                subsystem_vendor_id: p.subsystem_vendor_id.clone(),
                subsystem_device_id: p.subsystem_device_id.clone(),
                revision: p.revision.clone(),
                driver: p.driver.clone(),
                numa_node: p.numa_node,
                gpu: p.gpu,
            })
            .collect(),
        bmc: inv.bmc.as_ref().map(|b| hardware::Bmc {
            ipv4_address: b.ipv4_address.clone(),
            ipv6_address: b.ipv6_address.clone(),
            mac: b.mac.clone(),
            interface: b.interface.clone(),
        }),
    }
}

/// The command as sent; image commands carry `image_ca_pem` for the agent to trust.
pub fn command_to_proto(out: &Outgoing, image_ca_pem: &str) -> pb::Command {
    use pb::command::Kind;
    let c = &out.record;
    let kind = match &c.kind {
        CommandKind::Inspect => Kind::Inspect(pb::Inspect {}),
        CommandKind::WriteImage {
            image,
            root_device_hints,
            config_drive: _,
        } => Kind::WriteImage(pb::WriteImage {
            url: image.url.clone(),
            checksum: image.checksum.clone(),
            checksum_type: match image.checksum_type {
                None | Some(ChecksumType::Auto) => pb::ChecksumType::Auto,
                Some(ChecksumType::Md5) => pb::ChecksumType::Md5,
                Some(ChecksumType::Sha256) => pb::ChecksumType::Sha256,
                Some(ChecksumType::Sha512) => pb::ChecksumType::Sha512,
            } as i32,
            format: match image.format {
                None | Some(ImageFormat::Raw) => pb::ImageFormat::Raw,
                Some(ImageFormat::Qcow2) => pb::ImageFormat::Qcow2,
                Some(ImageFormat::LiveIso) => pb::ImageFormat::LiveIso,
                // Refused by validate::provisioning_problems, so never sent; were one sent, the
                // agent's qcow2 reader refuses a header that is not qcow2's instead of writing
                // the file as a raw disk.
                Some(ImageFormat::Vdi | ImageFormat::Vmdk) => pb::ImageFormat::Qcow2,
            } as i32,
            root_device_hints: root_device_hints.as_ref().map(hints_to_proto),
            extra_ca_pem: image_ca_pem.to_string(),
            config_drive: out.config_drive.as_ref().map(|d| pb::ConfigDrive {
                user_data: d.user_data.clone(),
                network_data: d.network_data.clone(),
                meta_data: d.meta_data.clone(),
            }),
        }),
        CommandKind::EraseMetadata { full } => Kind::EraseMetadata(pb::EraseMetadata {
            mode: if *full {
                pb::erase_metadata::Mode::Full
            } else {
                pb::erase_metadata::Mode::Metadata
            } as i32,
        }),
        CommandKind::Reboot => Kind::Reboot(pb::Reboot {}),
        CommandKind::Kexec => Kind::Kexec(pb::Kexec {}),
        CommandKind::PowerOff => Kind::PowerOff(pb::PowerOff {}),
    };
    pb::Command {
        id: c.id.clone(),
        kind: Some(kind),
    }
}

fn hints_to_proto(h: &RootDeviceHints) -> pb::RootDeviceHints {
    pb::RootDeviceHints {
        device_name: h.device_name.clone(),
        hctl: h.hctl.clone(),
        model: h.model.clone(),
        vendor: h.vendor.clone(),
        serial_number: h.serial_number.clone(),
        min_size_gigabytes: h.min_size_gigabytes,
        wwn: h.wwn.clone(),
        wwn_with_extension: h.wwn_with_extension.clone(),
        wwn_vendor_extension: h.wwn_vendor_extension.clone(),
        rotational: h.rotational,
    }
}

#[cfg(test)]
mod log_limit_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn long_lines_are_cut_and_floods_dropped_and_counted() {
        let t0 = Instant::now();
        let mut l = LogLimit::new(t0);
        let long = "x".repeat(4 << 20);
        let cut = l.admit_at(long, t0).unwrap();
        assert!(cut.len() < LOG_LINE_BYTES + 100, "{}", cut.len());
        assert!(
            cut.ends_with("cut by the coordinator]"),
            "{}",
            &cut[cut.len() - 60..]
        );
        let mut passed = 1;
        for _ in 0..100 {
            passed += usize::from(l.admit_at("y".into(), t0).is_some());
        }
        assert_eq!(passed, LOG_BURST as usize);
        // Ten seconds later, ten more, the first saying how many were dropped.
        let later = t0 + Duration::from_secs(10);
        let first = l.admit_at("z".into(), later).unwrap();
        assert!(
            first.starts_with("[71 earlier log lines dropped"),
            "{first}"
        );
    }
}
