//! `/metrics` in the Prometheus text format (prometheus-client): hosts per state,
//! transitions, errors by type, reconcile durations, agent sessions, commands in flight,
//! bytes written, store commit latency, event-to-durable latency, connections open, refused
//! and timed out per listener.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub error_type: String,
}

/// `listener`: `http` or `agent`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

/// `reason`: which cap was full (`listener_full`, `source_full`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub listener: String,
    pub reason: String,
}

/// `phase`: what the connection had not done in time (`request_head`, `stall`,
/// `handshake`, `enrolment`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub listener: String,
    pub phase: String,
}

/// Every metric, shared by the engine, the API and the HTTP server.
pub struct Metrics {
    registry: Registry,
    pub hosts: Family<StateLabel, Gauge>,
    pub transitions: Family<TransitionLabels, Counter>,
    pub errors: Family<ErrorLabel, Counter>,
    pub reconcile_seconds: Histogram,
    pub sessions: Gauge,
    pub commands_in_flight: Gauge,
    pub hosts_delayed: Gauge,
    pub slots_in_use: Gauge,
    pub bytes_written: Counter<u64, AtomicU64>,
    pub commit_seconds: Histogram,
    pub commit_hosts: Histogram,
    pub event_to_durable_seconds: Histogram,
    pub heartbeats: Counter,
    /// Boot scripts and ISOs refused by the per-address rate limit.
    pub boot_rate_limited: Counter,
    /// Enrolments and sessions refused as possible impostors.
    pub possible_impostors: Counter,
    pub connections_open: Family<ListenerLabel, Gauge>,
    pub connections_refused: Family<ConnectionLabels, Counter>,
    pub connections_timed_out: Family<TimeoutLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut m = Metrics {
            registry: Registry::with_prefix("slipway"),
            hosts: Family::default(),
            transitions: Family::default(),
            errors: Family::default(),
            // 10 µs .. ~10 s
            reconcile_seconds: Histogram::new(exponential_buckets(1e-5, 2.0, 20)),
            sessions: Gauge::default(),
            commands_in_flight: Gauge::default(),
            hosts_delayed: Gauge::default(),
            slots_in_use: Gauge::default(),
            bytes_written: Counter::default(),
            // 100 µs .. ~100 s
            commit_seconds: Histogram::new(exponential_buckets(1e-4, 2.0, 20)),
            commit_hosts: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            event_to_durable_seconds: Histogram::new(exponential_buckets(1e-4, 2.0, 20)),
            heartbeats: Counter::default(),
            boot_rate_limited: Counter::default(),
            possible_impostors: Counter::default(),
            connections_open: Family::default(),
            connections_refused: Family::default(),
            connections_timed_out: Family::default(),
        };
        m.registry
            .register("hosts", "Hosts per provisioning state", m.hosts.clone());
        m.registry.register(
            "transitions",
            "Provisioning state transitions",
            m.transitions.clone(),
        );
        m.registry
            .register("errors", "Host errors by type", m.errors.clone());
        m.registry.register(
            "reconcile_duration_seconds",
            "Time to plan one host",
            m.reconcile_seconds.clone(),
        );
        m.registry
            .register("agent_sessions", "Agent sessions open", m.sessions.clone());
        m.registry.register(
            "commands_in_flight",
            "Hosts with a command sent to their agent and not finished",
            m.commands_in_flight.clone(),
        );
        m.registry.register(
            "hosts_delayed",
            "Hosts waiting for a provisioning slot (--provisioning-limit)",
            m.hosts_delayed.clone(),
        );
        m.registry.register(
            "provisioning_slots_in_use",
            "Hosts inspecting, cleaning or writing an image (of --provisioning-limit)",
            m.slots_in_use.clone(),
        );
        m.registry.register(
            "image_bytes_written",
            "Bytes of images written by agents (verified writes)",
            m.bytes_written.clone(),
        );
        m.registry.register(
            "store_commit_duration_seconds",
            "Time to commit one batch of host changes durably",
            m.commit_seconds.clone(),
        );
        m.registry.register(
            "store_commit_hosts",
            "Hosts per committed batch",
            m.commit_hosts.clone(),
        );
        m.registry.register(
            "event_to_durable_seconds",
            "From an event reaching the engine to the host's resulting status being durable",
            m.event_to_durable_seconds.clone(),
        );
        m.registry.register(
            "agent_heartbeats",
            "Heartbeats received from agents",
            m.heartbeats.clone(),
        );
        m.registry.register(
            "boot_rate_limited",
            "Boot script and ISO requests refused by the per-address rate limit",
            m.boot_rate_limited.clone(),
        );
        m.registry.register(
            "possible_impostors",
            "Enrolments and agent sessions refused as possible impostors",
            m.possible_impostors.clone(),
        );
        m.registry.register(
            "connections_open",
            "Connections open per listener (http, agent), counted against its caps",
            m.connections_open.clone(),
        );
        m.registry.register(
            "connections_refused",
            "Connections closed at once because a cap was full (listener_full: \
             --http-max-connections or --agent-max-connections; source_full: the per-source cap)",
            m.connections_refused.clone(),
        );
        m.registry.register(
            "connections_timed_out",
            "Connections ended at a deadline, by what they had not done in time",
            m.connections_timed_out.clone(),
        );
        Arc::new(m)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The `Content-Type` of [`Metrics::render`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_prometheus_text_format() {
        let m = Metrics::new();
        m.hosts
            .get_or_create(&StateLabel {
                state: "provisioned".into(),
            })
            .set(3);
        m.commit_seconds.observe(0.004);
        m.bytes_written.inc_by(1 << 20);
        let text = m.render();
        assert!(
            text.contains("slipway_hosts{state=\"provisioned\"} 3"),
            "{text}"
        );
        assert!(text.contains("# TYPE slipway_store_commit_duration_seconds histogram"));
        assert!(
            text.contains("slipway_image_bytes_written_total 1048576"),
            "{text}"
        );
    }
}
