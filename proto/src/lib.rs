//! The agent <-> coordinator protocol, `slipway.agent.v1`.
//!
//! The contract itself, with every message documented, is `slipway/agent/v1/agent.proto` in
//! this crate. Only `coordinator::api` and `agent::session` use these types; everything deeper
//! works on its own plain Rust types.

/// `slipway.agent.v1`: enrolment and the agent session.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("slipway.agent.v1");
}

/// The fully qualified gRPC service name, for logs and health checks.
pub const SERVICE_NAME: &str = "slipway.agent.v1.AgentService";
