//! Enrolment and the session with the coordinator. The only agent module that knows protobuf.
//!
//! 1. Enrol ([`enrol`]): a TLS connection with no client certificate, the coordinator's CA
//!    pinned by fingerprint; the one-time token and a CSR for a fresh key buy a client
//!    certificate, kept in the state directory (0600), so a restarted agent process does not
//!    need a new token.
//! 2. Session: mutual TLS; the first event is a hello with the host name, the inventory and the
//!    state of every command received so far. Then commands flow down, progress and results
//!    up, and a heartbeat every few seconds. When the session breaks, the agent reconnects
//!    with backoff; running commands carry on meanwhile.
//!
//! The session drives any [`Execute`]: the real [`crate::commands::Runner`], or the load
//! generator's simulated machines. [`convert`] turns protobuf into the agent's types and back.

pub mod convert;
pub mod enrol;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use slipway_proto::v1 as pb;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::commands::{self, Execute, FailureKind, Outcome, PowerAction, Update};
use crate::tls::{self, Fingerprint};
use convert::{
    command_from_proto, event, inventory_to_proto, result_to_proto, status_to_proto,
    update_to_proto,
};
pub use enrol::{Identity, enroll, forget_identity, identity};

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
    /// Up to this much, at random, is added to each reconnection's backoff (zero for a real
    /// agent; the load generator's thousands of agents must not all come back at once).
    pub reconnect_jitter: Duration,
    /// Print the `enrolled` and `registered` milestones on the console.
    pub milestones: bool,
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

/// The coordinator said no; `.1` is true when retrying cannot help.
#[derive(Debug, thiserror::Error)]
#[error("the coordinator refused: {0}")]
pub struct Refused(pub String, pub bool);

/// How a session ended.
pub enum End {
    /// A power action was requested and reported; the caller performs it.
    Power(PowerAction),
    /// The coordinator no longer accepts this identity.
    Refused(String),
}

/// Runs sessions until a power action, reconnecting after every break.
pub async fn run<E: Execute>(
    s: &Settings,
    id: &Identity,
    executor: &E,
    updates: &mut mpsc::UnboundedReceiver<Update>,
    power: &mut watch::Receiver<Option<PowerAction>>,
) -> End {
    let mut backoff = Duration::from_millis(500);
    loop {
        match session(s, id, executor, updates, power).await {
            Ok(end) => return end,
            Err(e) => {
                // A power command that came with the session's last words (the power-off
                // before delete, after which the coordinator forgets the host) is carried
                // out, not lost to a reconnect the coordinator would refuse.
                if let Some(action) = *power.borrow() {
                    return End::Power(action);
                }
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
        let wait = tokio::time::sleep(backoff + jitter(s.reconnect_jitter));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                changed = power.changed() => match changed {
                    Ok(()) => {
                        if let Some(action) = *power.borrow() {
                            return End::Power(action);
                        }
                    }
                    // The runner is gone: only the wait is left.
                    Err(_) => {
                        (&mut wait).await;
                        break;
                    }
                },
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(8));
    }
}

/// A random wait of at most `max` (none when `max` is zero).
pub fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let r = getrandom::u64().unwrap_or(0);
    Duration::from_nanos(r % (max.as_nanos().min(u128::from(u64::MAX)) as u64 + 1))
}

async fn session<E: Execute>(
    s: &Settings,
    id: &Identity,
    executor: &E,
    updates: &mut mpsc::UnboundedReceiver<Update>,
    power: &mut watch::Receiver<Option<PowerAction>>,
) -> anyhow::Result<End> {
    let config = tls::session_config(&id.ca_der, &id.cert_der, id.private_key())?;
    let channel = connect(&s.address, config).await?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);

    // Whatever happened while disconnected is summed up in the hello.
    while updates.try_recv().is_ok() {}
    // Boxed: a channel allocates its slots 32 at a time, and an unboxed event (the size of
    // a hello) would make that 25 KiB per session, which the load generator pays per machine.
    let (tx, rx) = mpsc::channel::<Box<pb::AgentEvent>>(256);
    let inventory = executor.hello_inventory().await;
    let hello = pb::Hello {
        host: id.host.clone(),
        namespace: id.namespace.clone(),
        agent: Some(agent_info(s)),
        inventory: Some(inventory_to_proto(&inventory)),
        commands: executor
            .statuses()
            .into_iter()
            .map(|(id, st)| status_to_proto(id, st))
            .collect(),
    };
    tx.send(Box::new(event(pb::agent_event::Event::Hello(hello))))
        .await?;
    let response = client
        .session(ReceiverStream::new(rx).map(|e| *e))
        .await
        .map_err(|st| anyhow::Error::new(Refused(st.message().to_string(), is_refusal(&st))))?;
    let commands = response.into_inner();
    info!(host = %id.key(), "session open with the coordinator at {}", s.address);
    if s.milestones {
        crate::console::milestone(
            "registered",
            &format!("host={} coordinator={}", id.key(), s.address),
        );
    }
    executor.session_opened();
    let served = serve(s, executor, updates, power, commands, tx).await;
    executor.session_closed();
    served
}

/// An open session: commands down, updates and heartbeats up, until a power action or a
/// break.
async fn serve<E: Execute>(
    s: &Settings,
    executor: &E,
    updates: &mut mpsc::UnboundedReceiver<Update>,
    power: &mut watch::Receiver<Option<PowerAction>>,
    mut commands: tonic::Streaming<pb::Command>,
    tx: mpsc::Sender<Box<pb::AgentEvent>>,
) -> anyhow::Result<End> {
    let started = std::time::Instant::now();
    let mut heartbeat = tokio::time::interval(s.heartbeat);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            msg = commands.message() => match msg {
                Ok(Some(cmd)) => match command_from_proto(cmd) {
                    Ok(cmd) => executor.submit(cmd),
                    Err((id, message)) => {
                        warn!(command = %id, "refused a command: {message}");
                        let result = result_to_proto(id, Outcome::Failure { kind: FailureKind::InvalidRequest, message });
                        tx.send(Box::new(event(pb::agent_event::Event::Result(result)))).await?;
                    }
                },
                Ok(None) => bail!("the coordinator closed the session"),
                Err(st) => return Err(anyhow::Error::new(Refused(st.message().to_string(), is_refusal(&st)))),
            },
            Some(update) = updates.recv() => {
                tx.send(Box::new(update_to_proto(update))).await?;
            }
            _ = heartbeat.tick() => {
                let hb = pb::Heartbeat { uptime_seconds: started.elapsed().as_secs() };
                tx.send(Box::new(event(pb::agent_event::Event::Heartbeat(hb)))).await?;
            }
            changed = power.changed() => {
                // Copied out, so the watch's lock is not held across the awaits below.
                let action = if changed.is_ok() { *power.borrow() } else { None };
                if let Some(action) = action {
                    // Deliver everything pending (the power command's result) first.
                    while let Ok(update) = updates.try_recv() {
                        tx.send(Box::new(update_to_proto(update))).await?;
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
}
