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
        reply: oneshot::Sender<Result<(TokenSecret, Timestamp), String>>,
    },
}

impl From<SourceEvent> for Msg {
    fn from(e: SourceEvent) -> Msg {
        Msg::Source(e)
    }
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
