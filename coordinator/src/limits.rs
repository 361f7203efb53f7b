//! Caps on the connections each listener holds, so that no client, and no flood from one
//! address, can use up the coordinator's descriptors or its listeners (issue 16).
//!
//! Each listener has a [`Gate`]: a cap on its connections in all and one per source address.
//! On the HTTP port the per-source cap counts every connection; on the agent port it counts
//! only connections that have not authenticated (a TLS handshake in progress, or an
//! enrolment, which has no client certificate yet), because thousands of agents may share an
//! address (the load generator holds 10,000 from 127.0.0.1) while an established mutual-TLS
//! session names its host. Over a cap, the caller closes the connection at once; the refusal
//! is counted (`slipway_connections_refused_total`) and logged at most once per
//! [`REFUSAL_LOG_EVERY`], with the number held back.
//!
//! The caps are fitted to the open-files limit at start ([`fit`]), since a cap above it
//! would let the connections take the descriptors the store and the other listener need.
//! The counting ([`Counts`]), the fit and the log throttle ([`Throttle`]) are pure; the
//! [`Gate`] puts them behind a mutex with the metrics.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::metrics::{ConnectionLabels, ListenerLabel, Metrics, TimeoutLabels};

mod held;
pub use held::Held;

/// Default `--http-max-connections`: a fleet PXE-booting at once opens a few per machine.
pub const HTTP_MAX_CONNECTIONS: usize = 8192;
/// Default `--http-max-connections-per-source`: a machine needs one or two; the load
/// generator, all its machines on one address, was refused none with it at its default ramp
/// (1,000 machines at 200 a second; 100 image downloads at once in the fan-out benchmark).
pub const HTTP_MAX_PER_SOURCE: usize = 512;
/// Default `--agent-max-connections`: twice the scale benchmark's 10,000 agents.
pub const AGENT_MAX_CONNECTIONS: usize = 20_000;
/// Default `--agent-max-unauthenticated-per-source`: handshakes and enrolments take
/// milliseconds, so the load generator's machines, starting 200 a second from one address,
/// stay far below it; started all at once, some are refused and enrol on their retry.
pub const AGENT_MAX_UNAUTHENTICATED_PER_SOURCE: usize = 256;
/// Descriptors kept for everything but connections (the store, the hosts directory, the
/// admin socket, the runtime) when the caps are fitted to the open-files limit.
pub const RESERVED_FILES: u64 = 128;
/// At most one log line per listener this often about refused connections.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Which listener: the `listener` label of the metrics, and the log's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Port {
    Http,
    Agent,
}

impl Port {
    pub fn label(self) -> &'static str {
        match self {
            Port::Http => "http",
            Port::Agent => "agent",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Port::Http => "the HTTP port",
            Port::Agent => "the agent port",
        }
    }

    fn flags(self) -> (&'static str, &'static str) {
        match self {
            Port::Http => (
                "--http-max-connections",
                "--http-max-connections-per-source",
            ),
            Port::Agent => (
                "--agent-max-connections",
                "--agent-max-unauthenticated-per-source",
            ),
        }
    }
}

/// One listener's caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Connections open at once.
    pub total: usize,
    /// Connections open at once from one source (the HTTP port), or not yet authenticated
    /// from one source (the agent port).
    pub per_source: usize,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The listener holds its cap of connections.
    ListenerFull,
    /// The connection's source holds its cap.
    SourceFull,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::ListenerFull => "listener_full",
            Refused::SourceFull => "source_full",
        }
    }
}

/// The source a per-source cap counts: an IPv4 address (also as `::ffff:a.b.c.d` on a
/// dual-stack socket), or an IPv6 address's /64, since one machine is given a whole /64
/// and may use any address in it.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The connections one listener holds, in all and per source (keyed by [`source_key`]).
/// Pure: the [`Gate`] calls it under its lock.
#[derive(Debug, Default)]
pub struct Counts {
    open: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl Counts {
    /// Takes a place for a connection from `source`, in all and under the source's cap, or
    /// says which cap is full.
    pub fn admit(&mut self, source: IpAddr, caps: Caps) -> Result<(), Refused> {
        if self.open >= caps.total {
            return Err(Refused::ListenerFull);
        }
        if self.of(source) >= caps.per_source {
            return Err(Refused::SourceFull);
        }
        *self.by_source.entry(source).or_default() += 1;
        self.open += 1;
        Ok(())
    }

    /// Gives back a place under `source`'s cap (the connection closed, or authenticated).
    pub fn leave_source(&mut self, source: IpAddr) {
        if let Some(n) = self.by_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }

    /// Gives back a place in all (the connection closed).
    pub fn leave(&mut self) {
        self.open = self.open.saturating_sub(1);
    }

    pub fn open(&self) -> usize {
        self.open
    }

    /// Connections counted for `source`.
    pub fn of(&self, source: IpAddr) -> usize {
        self.by_source.get(&source).copied().unwrap_or(0)
    }

    /// Sources with a connection counted (none are kept at zero).
    pub fn sources(&self) -> usize {
        self.by_source.len()
    }
}

/// The caps that fit in `open_files` descriptors, and what was lowered (for the log).
/// HTTP connections get at most a quarter of the descriptors, at two each (the socket, and
/// the image file it may be sent); agent connections the rest, less [`RESERVED_FILES`].
/// A per-source cap is at most half its listener's, so one address never fills a listener.
pub fn fit(http: Caps, agent: Caps, open_files: u64) -> (Caps, Caps, Vec<String>) {
    let budget = usize::try_from(open_files.saturating_sub(RESERVED_FILES)).unwrap_or(usize::MAX);
    let mut lowered = Vec::new();
    let mut cap = |port: Port, c: Caps, most: usize, why: &str| {
        let (total_flag, source_flag) = port.flags();
        let total = c.total.min(most.max(1));
        if total < c.total {
            lowered.push(format!("{total_flag} {} to {total} ({why})", c.total));
        }
        let per_source = c.per_source.min((total / 2).max(1));
        if per_source < c.per_source {
            lowered.push(format!(
                "{source_flag} {} to {per_source} (half of {total_flag})",
                c.per_source
            ));
        }
        Caps { total, per_source }
    };
    let http = cap(
        Port::Http,
        http,
        budget / 8,
        &format!("a quarter of the open-files limit {open_files}, two per connection"),
    );
    let agent = cap(
        Port::Agent,
        agent,
        budget.saturating_sub(2 * http.total),
        &format!(
            "what the open-files limit {open_files} leaves after HTTP and {RESERVED_FILES} reserved"
        ),
    );
    (http, agent, lowered)
}

/// At most `burst` lines at once, then one per `every`, for events that can come in floods;
/// counts the ones held back, so the next line can say how many.
#[derive(Debug)]
pub struct Throttle {
    burst: u32,
    every: Duration,
    tokens: u32,
    /// Start of the period that earns the next token.
    since: Instant,
    held: u64,
}

impl Throttle {
    pub fn new(burst: u32, every: Duration) -> Throttle {
        Throttle {
            burst,
            every: every.max(Duration::from_millis(1)),
            tokens: burst,
            since: Instant::now(),
            held: 0,
        }
    }

    /// `Some(n)`: log this one, saying that `n` were held back since the last line;
    /// `None`: hold it back.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.tokens < self.burst {
            let periods =
                now.saturating_duration_since(self.since).as_nanos() / self.every.as_nanos();
            let earned = periods.min(u128::from(self.burst - self.tokens)) as u32;
            self.tokens += earned;
            self.since += self.every * earned;
        }
        if self.tokens == 0 {
            self.held += 1;
            return None;
        }
        if self.tokens == self.burst {
            self.since = now;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.held))
    }
}

/// " (and N more since the last such line)", or nothing.
pub fn held_back(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" (and {n} more since the last such line)")
    }
}

/// One listener's caps, shared by its accept loop and its connections' permits.
#[derive(Clone)]
pub struct Gate(Arc<Shared>);

struct Shared {
    port: Port,
    caps: Caps,
    open: prometheus_client::metrics::gauge::Gauge,
    counts: Mutex<Counts>,
    log: Mutex<Throttle>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The counts stay consistent whatever a panicking holder did: nothing panics under them.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gate {
    pub fn new(port: Port, caps: Caps, metrics: Arc<Metrics>) -> Gate {
        let open = metrics
            .connections_open
            .get_or_create(&ListenerLabel {
                listener: port.label().into(),
            })
            .clone();
        Gate(Arc::new(Shared {
            port,
            caps,
            open,
            counts: Mutex::new(Counts::default()),
            log: Mutex::new(Throttle::new(1, REFUSAL_LOG_EVERY)),
            metrics,
        }))
    }

    pub fn caps(&self) -> Caps {
        self.0.caps
    }

    /// A permit for a connection from `peer`, or why not: then the caller closes the
    /// connection at once. Refusals are counted, and logged throttled.
    pub fn admit(&self, peer: IpAddr) -> Result<Permit, Refused> {
        let g = &self.0;
        let source = source_key(peer);
        let admitted = lock(&g.counts).admit(source, g.caps);
        match admitted {
            Ok(()) => {
                g.open.inc();
                Ok(Permit {
                    gate: self.clone(),
                    source: Some(source),
                })
            }
            Err(why) => {
                g.metrics
                    .connections_refused
                    .get_or_create(&ConnectionLabels {
                        listener: g.port.label().into(),
                        reason: why.label().into(),
                    })
                    .inc();
                let held = lock(&g.log).admit(Instant::now());
                if let Some(held) = held {
                    let (total_flag, source_flag) = g.port.flags();
                    let what = match why {
                        Refused::ListenerFull => {
                            format!("{} connections are open ({total_flag})", g.caps.total)
                        }
                        Refused::SourceFull if g.port == Port::Agent => format!(
                            "{} unauthenticated connections from that address are open ({source_flag})",
                            g.caps.per_source
                        ),
                        Refused::SourceFull => format!(
                            "{} connections from that address are open ({source_flag})",
                            g.caps.per_source
                        ),
                    };
                    tracing::warn!(
                        peer = %peer,
                        "refused a connection on {}: {what}{}; refusals are counted in slipway_connections_refused_total",
                        g.port.name(),
                        held_back(held),
                    );
                }
                Err(why)
            }
        }
    }

    /// Counts a connection ended at a deadline (`phase`: what it had not done in time).
    pub fn timed_out(&self, phase: &'static str) {
        self.0
            .metrics
            .connections_timed_out
            .get_or_create(&TimeoutLabels {
                listener: self.0.port.label().into(),
                phase: phase.into(),
            })
            .inc();
    }
}

/// A connection's place under its listener's caps, given back when it drops.
pub struct Permit {
    gate: Gate,
    /// The source whose cap it holds a place under, until [`Permit::authenticated`].
    source: Option<IpAddr>,
}

impl Permit {
    /// Gives back the place under the source's cap, keeping the one in all: an agent whose
    /// client certificate was verified no longer counts against its address.
    pub fn authenticated(&mut self) {
        if let Some(source) = self.source.take() {
            lock(&self.gate.0.counts).leave_source(source);
        }
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut counts = lock(&self.gate.0.counts);
            if let Some(source) = self.source.take() {
                counts.leave_source(source);
            }
            counts.leave();
        }
        self.gate.0.open.dec();
    }
}

#[cfg(test)]
mod tests;
