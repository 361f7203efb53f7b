//! Enrolment and the session with the coordinator. The only agent module that knows protobuf.
//!
//! 1. Enrol: a TLS connection with no client certificate, the coordinator's CA pinned by
//!    fingerprint; the one-time token and a CSR for a fresh key buy a client certificate. The
//!    key and certificate are kept in the state directory (0600), so a restarted agent process
//!    does not need a new token.
//! 2. Session: mutual TLS; the first event is a hello with the host name, the inventory and the
//!    state of every command received so far. Then commands flow down, progress and results
//!    up, and a heartbeat every few seconds. When the session breaks, the agent reconnects
//!    with backoff; running commands carry on meanwhile.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use slipway_proto::v1 as pb;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::commands::{
    self, Command, Detail, FailureKind, Kind, Outcome, PowerAction, Runner, State, Update,
};
use crate::configdrive::ConfigDrive;
use crate::disk::Hints;
use crate::image::{Algo, Format, ImageSpec, Progress};
use crate::inventory::{self, Inventory};
use crate::tls::{self, Fingerprint};

/// How the agent reaches its coordinator.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `host:port` of the coordinator's agent API.
    pub address: String,
    pub token: Option<String>,
    pub ca: Fingerprint,
    pub state_dir: PathBuf,
    pub boot_mac: Option<String>,
    pub ramdisk: bool,
    pub heartbeat: Duration,
    /// Give up (instead of retrying forever) when the coordinator refuses the enrolment.
    pub exit_on_refusal: bool,
}

/// The agent's credentials.
#[derive(Clone)]
pub struct Identity {
    pub host: String,
    /// The host's namespace (empty from coordinators that predate namespaces).
    pub namespace: String,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl Identity {
    /// `namespace/name`, or the name alone when the coordinator gave no namespace.
    pub fn key(&self) -> String {
        if self.namespace.is_empty() {
            self.host.clone()
        } else {
            format!("{}/{}", self.namespace, self.host)
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("host", &self.host)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Parses `https://host:port`, `host:port` or `[v6]:port` into `host:port`.
pub fn address_of(url: &str) -> anyhow::Result<String> {
    let rest = url.trim().trim_end_matches('/');
    let rest = rest.strip_prefix("https://").unwrap_or(rest);
    if rest.starts_with("http://") {
        bail!("the coordinator URL {url:?} must be https:// (agents only speak TLS)");
    }
    if rest.is_empty() || !rest.contains(':') || rest.contains('/') {
        bail!("the coordinator URL {url:?} must look like https://HOST:PORT");
    }
    Ok(rest.to_string())
}

async fn connect(address: &str, config: rustls::ClientConfig) -> anyhow::Result<Channel> {
    let config = Arc::new(config);
    let target = address.to_string();
    let address = address.to_string();
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = config.clone();
        let address = address.clone();
        async move {
            let tcp = TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(tls::SERVER_NAME).map_err(std::io::Error::other)?;
            let stream = TlsConnector::from(config).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Endpoint::from_static("http://coordinator.slipway.internal")
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            anyhow!(
                "cannot connect to the coordinator at {target}: {}",
                commands::chain(&e)
            )
        })
}

fn agent_info(s: &Settings) -> pb::AgentInfo {
    pb::AgentInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        boot_mac: s.boot_mac.clone().unwrap_or_default(),
        ramdisk: s.ramdisk,
    }
}

/// Refusals that retrying with the same credentials cannot fix.
fn is_refusal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
    )
}

/// How long one enrolment request may wait for the coordinator's answer.
const ENROL_LIMIT: Duration = if cfg!(test) {
    Duration::from_secs(1)
} else {
    Duration::from_secs(20)
};

/// Enrols with the token, or loads the identity saved by an earlier run.
pub async fn identity(s: &Settings) -> anyhow::Result<Identity> {
    if let Some(id) = load_identity(&s.state_dir, s.ca)? {
        info!(host = %id.key(), "using the certificate from an earlier enrolment in {}", s.state_dir.display());
        return Ok(id);
    }
    let token = s.token.clone().ok_or_else(|| {
        anyhow!("no bootstrap token: pass --token or slipway.token= (create one with `slipway token create HOST`)")
    })?;
    let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).context("cannot build a CSR")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "slipway-agent");
    let csr = params
        .serialize_request(&key)
        .context("cannot sign the CSR")?;
    let channel = connect(&s.address, tls::enroll_config(s.ca)?)
        .await
        .with_context(|| format!("enrolment with {}", s.address))?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let request = client.enroll(pb::EnrollRequest {
        token,
        csr_der: csr.der().to_vec(),
        agent: Some(agent_info(s)),
    });
    // A coordinator that took the connection but never answers (stopped, overloaded) must not
    // hold the agent forever: give up on this attempt, and the caller enrols again.
    let response = tokio::time::timeout(ENROL_LIMIT, request)
        .await
        .map_err(|_| {
            anyhow!(
                "the coordinator at {} did not answer the enrolment within {ENROL_LIMIT:?}",
                s.address
            )
        })?
        .map_err(|st| anyhow::Error::new(Refused(st.message().to_string(), is_refusal(&st))))?
        .into_inner();
    if Fingerprint::of(&response.ca_certificate_der) != s.ca {
        bail!(
            "the coordinator sent a CA certificate that does not match the pinned fingerprint {}",
            s.ca
        );
    }
    let id = Identity {
        host: response.host,
        namespace: response.namespace,
        cert_der: response.certificate_der,
        ca_der: response.ca_certificate_der,
        key_der: key.serialize_der(),
    };
    save_identity(&s.state_dir, &id)?;
    info!(host = %id.key(), "enrolled; certificate valid until {}", response.not_after);
    crate::console::milestone("enrolled", &format!("host={}", id.key()));
    Ok(id)
}

/// The coordinator said no; `.1` is true when retrying cannot help.
#[derive(Debug, thiserror::Error)]
#[error("the coordinator refused: {0}")]
pub struct Refused(pub String, pub bool);

fn load_identity(dir: &Path, pin: Fingerprint) -> anyhow::Result<Option<Identity>> {
    let read = |n: &str| fs::read(dir.join(n));
    let (Ok(host), Ok(cert_der), Ok(ca_der), Ok(key_der)) = (
        read("host"),
        read("cert.der"),
        read("ca.der"),
        read("key.der"),
    ) else {
        return Ok(None);
    };
    if Fingerprint::of(&ca_der) != pin {
        // Enrolled with another coordinator: start over.
        return Ok(None);
    }
    Ok(Some(Identity {
        host: String::from_utf8_lossy(&host).trim().to_string(),
        // Absent in state directories written before namespaces: the default namespace.
        namespace: fs::read(dir.join("namespace"))
            .map(|n| String::from_utf8_lossy(&n).trim().to_string())
            .unwrap_or_default(),
        cert_der,
        ca_der,
        key_der,
    }))
}

fn save_identity(dir: &Path, id: &Identity) -> anyhow::Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    for (name, data) in [
        ("key.der", &id.key_der[..]),
        ("cert.der", &id.cert_der[..]),
        ("ca.der", &id.ca_der[..]),
        ("host", id.host.as_bytes()),
        ("namespace", id.namespace.as_bytes()),
    ] {
        let path = dir.join(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(data)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Forgets the saved identity (the coordinator no longer accepts it).
pub fn forget_identity(dir: &Path) {
    for name in ["key.der", "cert.der", "ca.der", "host", "namespace"] {
        let _ = fs::remove_file(dir.join(name));
    }
}

/// How a session ended.
pub enum End {
    /// A power action was requested and reported; the caller performs it.
    Power(PowerAction),
    /// The coordinator no longer accepts this identity.
    Refused(String),
}

/// Runs sessions until a power action, reconnecting after every break.
pub async fn run(
    s: &Settings,
    id: &Identity,
    runner: &Runner,
    updates: &mut mpsc::UnboundedReceiver<Update>,
    power: &mut watch::Receiver<Option<PowerAction>>,
) -> End {
    let mut backoff = Duration::from_millis(500);
    loop {
        match session(s, id, runner, updates, power).await {
            Ok(end) => return end,
            Err(e) => {
                if let Some(r) = e.downcast_ref::<Refused>()
                    && r.1
                {
                    return End::Refused(r.0.clone());
                }
                warn!(
                    "session with the coordinator at {} ended: {e:#}; reconnecting in {backoff:?}",
                    s.address
                );
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(8));
    }
}

async fn session(
    s: &Settings,
    id: &Identity,
    runner: &Runner,
    updates: &mut mpsc::UnboundedReceiver<Update>,
    power: &mut watch::Receiver<Option<PowerAction>>,
) -> anyhow::Result<End> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_der.clone()));
    let config = tls::session_config(&id.ca_der, &id.cert_der, key)?;
    let channel = connect(&s.address, config).await?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);

    // Whatever happened while disconnected is summed up in the hello.
    while updates.try_recv().is_ok() {}
    let (tx, rx) = mpsc::channel::<pb::AgentEvent>(256);
    let root = runner.context().root.clone();
    // No LLDP listen for the hello: it would delay every (re)connection; `inspect` listens.
    let opts = inventory::Options {
        lldp: std::time::Duration::ZERO,
        ..runner.context().inventory.clone()
    };
    let inventory = tokio::task::spawn_blocking(move || Inventory::collect(&root, &opts))
        .await
        .unwrap_or_default();
    let hello = pb::Hello {
        host: id.host.clone(),
        namespace: id.namespace.clone(),
        agent: Some(agent_info(s)),
        inventory: Some(inventory_to_proto(&inventory)),
        commands: runner
            .statuses()
            .into_iter()
            .map(|(id, st)| status_to_proto(id, st))
            .collect(),
    };
    tx.send(event(pb::agent_event::Event::Hello(hello))).await?;
    let response = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|st| anyhow::Error::new(Refused(st.message().to_string(), is_refusal(&st))))?;
    let mut commands = response.into_inner();
    info!(host = %id.key(), "session open with the coordinator at {}", s.address);
    crate::console::milestone(
        "registered",
        &format!("host={} coordinator={}", id.key(), s.address),
    );

    let started = std::time::Instant::now();
    let mut heartbeat = tokio::time::interval(s.heartbeat);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            msg = commands.message() => match msg {
                Ok(Some(cmd)) => match command_from_proto(cmd) {
                    Ok(cmd) => runner.submit(cmd),
                    Err((id, message)) => {
                        warn!(command = %id, "refused a command: {message}");
                        let result = result_to_proto(id, Outcome::Failure { kind: FailureKind::InvalidRequest, message });
                        tx.send(event(pb::agent_event::Event::Result(result))).await?;
                    }
                },
                Ok(None) => bail!("the coordinator closed the session"),
                Err(st) => return Err(anyhow::Error::new(Refused(st.message().to_string(), is_refusal(&st)))),
            },
            Some(update) = updates.recv() => {
                tx.send(update_to_proto(update)).await?;
            }
            _ = heartbeat.tick() => {
                let hb = pb::Heartbeat { uptime_seconds: started.elapsed().as_secs() };
                tx.send(event(pb::agent_event::Event::Heartbeat(hb))).await?;
            }
            changed = power.changed() => {
                if changed.is_ok()
                    && let Some(action) = *power.borrow() {
                        // Deliver everything pending (the power command's result) first.
                        while let Ok(update) = updates.try_recv() {
                            tx.send(update_to_proto(update)).await?;
                        }
                        drop(tx);
                        // Give the coordinator a moment to read the result before we go.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        return Ok(End::Power(action));
                    }
            }
        }
    }
}

fn event(e: pb::agent_event::Event) -> pb::AgentEvent {
    pb::AgentEvent { event: Some(e) }
}

// ----- conversions -----

fn command_from_proto(c: pb::Command) -> Result<Command, (String, String)> {
    use pb::command::Kind as K;
    let id = c.id.clone();
    let kind = match c.kind {
        Some(K::Inspect(_)) => Kind::Inspect,
        Some(K::Reboot(_)) => Kind::Reboot,
        Some(K::Kexec(_)) => Kind::Kexec,
        Some(K::PowerOff(_)) => Kind::PowerOff,
        Some(K::EraseMetadata(e)) => Kind::EraseMetadata {
            full: e.mode() == pb::erase_metadata::Mode::Full,
        },
        Some(K::WriteImage(w)) => {
            let algo = match pb::ChecksumType::try_from(w.checksum_type)
                .unwrap_or(pb::ChecksumType::Auto)
            {
                pb::ChecksumType::Md5 => Some(Algo::Md5),
                pb::ChecksumType::Sha256 => Some(Algo::Sha256),
                pb::ChecksumType::Sha512 => Some(Algo::Sha512),
                _ => None,
            };
            let format = match pb::ImageFormat::try_from(w.format).unwrap_or(pb::ImageFormat::Raw) {
                pb::ImageFormat::Qcow2 => Format::Qcow2,
                pb::ImageFormat::LiveIso => Format::LiveIso,
                _ => Format::Raw,
            };
            let spec = ImageSpec::new(&w.url, &w.checksum, algo, format)
                .map_err(|e| (id.clone(), e.to_string()))?;
            let h = w.root_device_hints.unwrap_or_default();
            let hints = Hints {
                device_name: h.device_name,
                hctl: h.hctl,
                model: h.model,
                vendor: h.vendor,
                serial_number: h.serial_number,
                min_size_gigabytes: h.min_size_gigabytes,
                wwn: h.wwn,
                wwn_with_extension: h.wwn_with_extension,
                wwn_vendor_extension: h.wwn_vendor_extension,
                rotational: h.rotational,
            };
            let config_drive = w.config_drive.map(|c| ConfigDrive {
                user_data: c.user_data,
                network_data: c.network_data,
                meta_data: c.meta_data,
            });
            let extra_ca = match w.extra_ca_pem.trim() {
                "" => Vec::new(),
                pem => crate::image::source::pem_certs(pem).map_err(|e| {
                    (
                        id.clone(),
                        format!("the command's extra CA certificates (extra_ca_pem): {e}"),
                    )
                })?,
            };
            Kind::WriteImage {
                spec,
                hints,
                config_drive,
                extra_ca,
            }
        }
        None => {
            return Err((
                id,
                "a command without a kind (is the coordinator newer than this agent?)".into(),
            ));
        }
    };
    Ok(Command { id, kind })
}

fn progress_to_proto(id: &str, p: &Progress) -> pb::Progress {
    pb::Progress {
        command_id: id.to_string(),
        phase: p.phase.to_string(),
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        bytes_per_second: p.bytes_per_second,
    }
}

fn result_to_proto(id: String, o: Outcome) -> pb::CommandResult {
    use pb::command_result::Outcome as O;
    let outcome = match o {
        Outcome::Success { message, detail } => O::Success(pb::Success {
            message,
            detail: match detail {
                Detail::None | Detail::KexecLoaded => None,
                Detail::Inventory(inv) => {
                    Some(pb::success::Detail::Inventory(inventory_to_proto(&inv)))
                }
                Detail::Written(w) => Some(pb::success::Detail::WriteImage(pb::WriteImageResult {
                    device: w.device,
                    bytes_written: w.bytes,
                    digest: w.digest,
                    checksum_type: w.algo.to_string(),
                })),
            },
        }),
        Outcome::Failure { message, kind } => O::Failure(pb::Failure {
            message,
            kind: match kind {
                FailureKind::InvalidRequest => pb::failure::Kind::InvalidRequest,
                FailureKind::ChecksumMismatch => pb::failure::Kind::ChecksumMismatch,
                FailureKind::Download => pb::failure::Kind::Download,
                FailureKind::Disk => pb::failure::Kind::Disk,
                FailureKind::Busy => pb::failure::Kind::Busy,
                FailureKind::Internal => pb::failure::Kind::Internal,
            } as i32,
        }),
    };
    pb::CommandResult {
        command_id: id,
        outcome: Some(outcome),
    }
}

fn status_to_proto(id: String, st: State) -> pb::CommandStatus {
    use pb::command_status::State as S;
    match st {
        State::Running(p) => pb::CommandStatus {
            progress: p.as_ref().map(|p| progress_to_proto(&id, p)),
            command_id: id,
            state: S::Running as i32,
            result: None,
        },
        State::Finished(o) => pb::CommandStatus {
            command_id: id.clone(),
            state: S::Finished as i32,
            result: Some(result_to_proto(id, o)),
            progress: None,
        },
    }
}

fn update_to_proto(u: Update) -> pb::AgentEvent {
    use pb::agent_event::Event as E;
    event(match u {
        Update::Progress { id, progress } => E::Progress(progress_to_proto(&id, &progress)),
        Update::Finished { id, outcome } => E::Result(result_to_proto(id, outcome)),
        Update::Log {
            id,
            warning,
            message,
        } => E::Log(pb::LogLine {
            level: if warning {
                pb::log_line::Level::Warn
            } else {
                pb::log_line::Level::Info
            } as i32,
            message,
            command_id: id,
        }),
    })
}

fn s(v: &Option<String>) -> String {
    v.clone().unwrap_or_default()
}

pub fn inventory_to_proto(inv: &Inventory) -> pb::Inventory {
    let sys = &inv.system;
    pb::Inventory {
        system: Some(pb::SystemInfo {
            manufacturer: s(&sys.manufacturer),
            product_name: s(&sys.product_name),
            serial_number: s(&sys.serial_number),
            uuid: s(&sys.uuid),
            bios_vendor: s(&sys.bios_vendor),
            bios_version: s(&sys.bios_version),
            bios_date: s(&sys.bios_date),
            version: s(&sys.version),
            sku: s(&sys.sku),
            family: s(&sys.family),
        }),
        cpu: Some(pb::Cpu {
            model: s(&inv.cpu.model),
            architecture: s(&inv.cpu.architecture),
            count: inv.cpu.count,
            frequency_mhz: inv.cpu.frequency_mhz.unwrap_or(0),
            flags: inv.cpu.flags.clone(),
            vendor: s(&inv.cpu.vendor),
            cores: inv.cpu.cores,
            sockets: inv.cpu.sockets,
            threads_per_core: inv.cpu.threads_per_core,
            max_frequency_mhz: inv.cpu.max_frequency_mhz,
        }),
        memory: Some(pb::Memory {
            total_bytes: inv.memory.total_bytes,
            physical_mib: inv.memory.physical_mib.unwrap_or(0),
            dimms: inv
                .memory
                .dimms
                .iter()
                .map(|d| pb::Dimm {
                    locator: s(&d.locator),
                    bank_locator: s(&d.bank_locator),
                    size_mib: d.size_mib.unwrap_or(0),
                    r#type: s(&d.kind),
                    form_factor: s(&d.form_factor),
                    speed_mts: d.speed_mts.unwrap_or(0),
                    configured_speed_mts: d.configured_speed_mts.unwrap_or(0),
                    manufacturer: s(&d.manufacturer),
                    serial_number: s(&d.serial_number),
                    part_number: s(&d.part_number),
                })
                .collect(),
        }),
        disks: inv
            .disks
            .iter()
            .map(|d| pb::Disk {
                name: d.name.clone(),
                alternate_names: d.alternate_names.clone(),
                size_bytes: d.size_bytes,
                rotational: d.rotational,
                model: s(&d.model),
                vendor: s(&d.vendor),
                serial_number: s(&d.serial_number),
                wwn: s(&d.wwn),
                wwn_with_extension: s(&d.wwn_with_extension),
                wwn_vendor_extension: s(&d.wwn_vendor_extension),
                hctl: s(&d.hctl),
                r#type: d.kind.clone(),
                logical_block_size: d.logical_block_size,
                physical_block_size: d.physical_block_size,
                by_path: s(&d.by_path),
                transport: s(&d.transport),
                removable: d.removable,
                read_only: d.read_only,
                numa_node: d.numa_node,
                partition_table: s(&d.partition_table),
                partitions: d
                    .partitions
                    .iter()
                    .map(|p| pb::Partition {
                        name: p.name.clone(),
                        number: p.number.unwrap_or(0),
                        start_bytes: p.start_bytes,
                        size_bytes: p.size_bytes,
                        label: s(&p.label),
                    })
                    .collect(),
            })
            .collect(),
        nics: inv
            .nics
            .iter()
            .map(|n| pb::Nic {
                name: n.name.clone(),
                mac: s(&n.mac),
                mtu: n.mtu.unwrap_or(0),
                driver: s(&n.driver),
                speed_mbps: n.speed_mbps.unwrap_or(0),
                has_carrier: n.has_carrier.unwrap_or(false),
                ip_addresses: n.ip_addresses.clone(),
                pxe: n.pxe,
                kind: n.kind.clone(),
                permanent_mac: s(&n.permanent_mac),
                pci_address: s(&n.pci_address),
                vendor_id: s(&n.vendor_id),
                device_id: s(&n.device_id),
                operstate: s(&n.operstate),
                numa_node: n.numa_node,
                bond_master: s(&n.bond_master),
                bond: n.bond.as_ref().map(|b| pb::Bond {
                    mode: s(&b.mode),
                    members: b.members.clone(),
                }),
                lldp: n.lldp.as_ref().map(|l| pb::LldpNeighbour {
                    chassis_id: s(&l.chassis_id),
                    port_id: s(&l.port_id),
                    port_description: s(&l.port_description),
                    system_name: s(&l.system_name),
                    system_description: s(&l.system_description),
                    management_addresses: l.management_addresses.clone(),
                    port_vlan_id: l.port_vlan_id.map(u32::from),
                    vlans: l
                        .vlans
                        .iter()
                        .map(|v| pb::LldpVlan {
                            id: u32::from(v.id),
                            name: s(&v.name),
                        })
                        .collect(),
                }),
            })
            .collect(),
        boot_mode: inv.boot_mode.clone(),
        hostname: s(&inv.hostname),
        secure_boot: inv.secure_boot,
        numa_nodes: inv
            .numa_nodes
            .iter()
            .map(|n| pb::NumaNode {
                id: n.id,
                cpus: n.cpus.clone(),
                memory_bytes: n.memory_bytes.unwrap_or(0),
            })
            .collect(),
        pci_devices: inv
            .pci_devices
            .iter()
            .map(|p| pb::PciDevice {
                address: p.address.clone(),
                class: s(&p.class),
                vendor_id: s(&p.vendor_id),
                device_id: s(&p.device_id),
                subsystem_vendor_id: s(&p.subsystem_vendor_id),
                subsystem_device_id: s(&p.subsystem_device_id),
                revision: s(&p.revision),
                driver: s(&p.driver),
                numa_node: p.numa_node,
                gpu: p.gpu,
            })
            .collect(),
        bmc: inv.bmc.as_ref().map(|b| pb::Bmc {
            ipv4_address: s(&b.ipv4_address),
            ipv6_address: s(&b.ipv6_address),
            mac: s(&b.mac),
            interface: s(&b.interface),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_addresses() {
        assert_eq!(
            address_of("https://10.0.0.1:9443").unwrap(),
            "10.0.0.1:9443"
        );
        assert_eq!(
            address_of("https://[fd00::1]:9443/").unwrap(),
            "[fd00::1]:9443"
        );
        assert_eq!(address_of("host:1").unwrap(), "host:1");
        assert!(
            address_of("http://10.0.0.1:9443")
                .unwrap_err()
                .to_string()
                .contains("https")
        );
        assert!(address_of("https://10.0.0.1").is_err());
    }

    #[test]
    fn write_image_command_with_a_bad_checksum_is_refused_with_its_id() {
        let c = pb::Command {
            id: "write-image-1".into(),
            kind: Some(pb::command::Kind::WriteImage(pb::WriteImage {
                url: "http://x/y".into(),
                checksum: "abc".into(),
                ..Default::default()
            })),
        };
        let (id, msg) = command_from_proto(c).unwrap_err();
        assert_eq!(id, "write-image-1");
        assert!(msg.contains("3 hex digits"), "{msg}");
    }

    #[test]
    fn image_cas_arrive_as_der_and_bad_ones_are_refused_with_the_id() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let command = |pem: String| pb::Command {
            id: "w".into(),
            kind: Some(pb::command::Kind::WriteImage(pb::WriteImage {
                url: "https://x/y".into(),
                checksum: "a".repeat(64),
                extra_ca_pem: pem,
                ..Default::default()
            })),
        };
        let Kind::WriteImage { extra_ca, .. } =
            command_from_proto(command(cert.pem())).unwrap().kind
        else {
            panic!("not a write-image");
        };
        assert_eq!(extra_ca, vec![cert.der().to_vec()]);
        let (id, msg) = command_from_proto(command("not a certificate".into())).unwrap_err();
        assert_eq!(id, "w");
        assert!(
            msg.contains("extra_ca_pem") && msg.contains("no PEM certificate"),
            "{msg}"
        );
    }

    #[test]
    fn config_drive_and_erase_mode_arrive() {
        let c = pb::Command {
            id: "w".into(),
            kind: Some(pb::command::Kind::WriteImage(pb::WriteImage {
                url: "http://x/y".into(),
                checksum: "a".repeat(64),
                config_drive: Some(pb::ConfigDrive {
                    user_data: Some(b"#cloud-config".to_vec()),
                    network_data: None,
                    meta_data: b"{}".to_vec(),
                }),
                ..Default::default()
            })),
        };
        let Kind::WriteImage { config_drive, .. } = command_from_proto(c).unwrap().kind else {
            panic!("not a write-image");
        };
        let d = config_drive.unwrap();
        assert_eq!(d.user_data.as_deref(), Some(&b"#cloud-config"[..]));
        assert_eq!(d.network_data, None);
        let erase = |mode: pb::erase_metadata::Mode| {
            command_from_proto(pb::Command {
                id: "e".into(),
                kind: Some(pb::command::Kind::EraseMetadata(pb::EraseMetadata {
                    mode: mode as i32,
                })),
            })
            .unwrap()
            .kind
        };
        assert_eq!(
            erase(pb::erase_metadata::Mode::Unspecified),
            Kind::EraseMetadata { full: false }
        );
        assert_eq!(
            erase(pb::erase_metadata::Mode::Full),
            Kind::EraseMetadata { full: true }
        );
    }
}

/// Against a coordinator that completes TLS but never answers `Enroll`.
#[cfg(test)]
mod silent_coordinator {
    use std::pin::Pin;

    use tokio_stream::Stream;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    struct Silent;

    #[tonic::async_trait]
    impl pb::agent_service_server::AgentService for Silent {
        async fn enroll(
            &self,
            _: Request<pb::EnrollRequest>,
        ) -> Result<Response<pb::EnrollResponse>, Status> {
            std::future::pending().await
        }

        type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::Command, Status>> + Send>>;

        async fn session(
            &self,
            _: Request<Streaming<pb::AgentEvent>>,
        ) -> Result<Response<Self::SessionStream>, Status> {
            Err(Status::unimplemented("not here"))
        }
    }

    /// A CA and a server certificate for [`tls::SERVER_NAME`]: (CA DER, chain PEM, key PEM).
    fn server_identity() -> (Vec<u8>, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![tls::SERVER_NAME.to_string()])
            .unwrap()
            .signed_by(&key, &rcgen::Issuer::new(ca, &ca_key))
            .unwrap();
        (
            ca_cert.der().to_vec(),
            format!("{}{}", leaf.pem(), ca_cert.pem()),
            key.serialize_pem(),
        )
    }

    #[tokio::test]
    async fn an_enrolment_never_answered_is_given_up_so_the_agent_can_enrol_again() {
        let (ca_der, chain, key) = server_identity();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tonic::transport::Server::builder()
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(chain, key)),
            )
            .unwrap()
            .add_service(pb::agent_service_server::AgentServiceServer::new(Silent))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            address: address.clone(),
            token: Some("t".into()),
            ca: Fingerprint::of(&ca_der),
            state_dir: dir.path().to_path_buf(),
            boot_mac: None,
            ramdisk: false,
            heartbeat: Duration::from_secs(5),
            exit_on_refusal: true,
        };
        let start = std::time::Instant::now();
        let e = tokio::time::timeout(ENROL_LIMIT * 3, identity(&settings))
            .await
            .expect("the enrolment gives up by itself")
            .unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("did not answer"), "{text}");
        assert!(
            text.contains(&address),
            "the error names the coordinator: {text}"
        );
        // Not a refusal: the caller retries instead of exiting.
        assert!(e.downcast_ref::<Refused>().is_none());
        assert!(start.elapsed() >= ENROL_LIMIT);
        server.abort();
    }
}
