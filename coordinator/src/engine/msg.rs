//! What reaches the engine ([`Msg`]) and what it answers: the engine's whole interface to the
//! agent API, the HTTP server, the admin socket and the sources.

use jiff::{SignedDuration, Timestamp};
use slipway_reconcile::host::{CommandRecord, HardwareDetails, HostKey, Progress};
use slipway_reconcile::{CommandFailure, CommandSuccess};
use tokio::sync::{mpsc, oneshot};

use crate::configdrive::ConfigDriveData;
use crate::hardware::Hardware;
use crate::sources::SourceEvent;
use crate::tokens::TokenSecret;

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
    pub host: HostKey,
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

/// A command on its way to an agent session. Boxed: a channel allocates its slots 32 at a
/// time, and 32 unboxed commands made 17 KiB per session (a third of a session's memory).
pub type CommandSender = mpsc::UnboundedSender<Box<Outgoing>>;

/// How long an agent may stay silent before its session is dropped (it sends a heartbeat
/// every 10 s); while a session has been heard from within this, it is live and no second
/// agent may take the host.
pub const SILENCE_LIMIT: std::time::Duration = std::time::Duration::from_secs(45);

/// The annotation that accepts a replaced machine: its new system UUID (or serial number).
pub const ACCEPT_HARDWARE_ANNOTATION: &str = "slipway.io/accept-hardware";

/// What a booting machine gets.
#[derive(Clone, Debug, PartialEq)]
pub enum BootDecision {
    /// The Slipway ramdisk, with a fresh one-time token for `host`.
    Ramdisk {
        host: HostKey,
        token: TokenSecret,
        mac: String,
    },
    /// Its own disk (the host is provisioned).
    LocalDisk { host: HostKey, state: String },
    /// Not now (the host's agent is connected): ask again later. The reason is shown.
    Wait(String),
    /// Nothing; the reason is shown on the machine's console.
    Refuse(String),
}

pub enum Msg {
    /// What changed in the source of declarations.
    Source(SourceEvent),
    Enroll {
        token: TokenSecret,
        csr_der: Vec<u8>,
        agent: AgentInfo,
        peer: String,
        reply: oneshot::Sender<Result<Enrolled, Refusal>>,
    },
    Connect {
        host: HostKey,
        cert_sha256: String,
        peer: String,
        agent: AgentInfo,
        reports: Vec<AgentReport>,
        /// The hardware the agent reported in its hello.
        inventory: Option<std::sync::Arc<HardwareDetails>>,
        /// The machine the hello describes.
        identity: Option<crate::hardware::Identity>,
        /// When the session last heard from the agent (Unix milliseconds), kept current by
        /// the API as messages arrive.
        alive: std::sync::Arc<std::sync::atomic::AtomicI64>,
        commands: CommandSender,
        reply: oneshot::Sender<Result<u64, Refusal>>,
    },
    /// A machine asks how to boot (its iPXE script asks by MAC).
    Boot {
        mac: String,
        reply: oneshot::Sender<BootDecision>,
    },
    Report {
        host: HostKey,
        session: u64,
        report: AgentReport,
    },
    AgentLog {
        host: HostKey,
        session: u64,
        warning: bool,
        message: String,
    },
    /// The agent's full inventory, from its hello or an inspect result (`by`).
    Inventory {
        host: HostKey,
        session: u64,
        hardware: Box<Hardware>,
        by: &'static str,
    },
    Disconnect {
        host: HostKey,
        session: u64,
        reason: String,
    },
    CreateToken {
        host: HostKey,
        ttl: SignedDuration,
        reply: oneshot::Sender<Result<Issued, String>>,
    },
    /// The token for a boot of the host's ramdisk by virtual media (`slipway boot iso`): the
    /// host's one outstanding boot token, as a boot script would carry it.
    BootToken {
        host: HostKey,
        ttl: SignedDuration,
        reply: oneshot::Sender<Result<Issued, String>>,
    },
    /// Removes a discovered host (`slipway delete host`); a declared one is refused, naming
    /// the file that declares it. The answer says what was done.
    DeleteHost {
        host: HostKey,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

impl From<SourceEvent> for Msg {
    fn from(e: SourceEvent) -> Msg {
        Msg::Source(e)
    }
}

/// A token created for a host, with what its agent must say at enrolment.
#[derive(Clone, Debug)]
pub struct Issued {
    pub token: TokenSecret,
    pub expires_at: Timestamp,
    /// The host's bootMACAddress, which the agent must give as the MAC it booted from.
    pub boot_mac: Option<String>,
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
