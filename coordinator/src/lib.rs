//! The Slipway coordinator: `slipway serve` and the `slipway` command-line client.
//!
//! Code map (see ARCHITECTURE.md for the invariants):
//! - [`cli`]: argument parsing and dispatch; thin.
//! - [`serve`]: wires the pieces together and runs them.
//! - [`engine`]: runs `slipway_reconcile::plan` for every host and carries out the plans,
//!   whatever the source and the store; the only writer of state.
//! - [`state`]: durable state behind narrow traits (redb for files mode, memory for tests).
//! - [`sources`]: where host declarations come from (files mode: [`sources::files`]).
//! - [`view`]: what clients read, updated host by host. [`metrics`]: `/metrics`.
//! - [`api`]: the agent-facing gRPC service over TLS; the only module that knows protobuf.
//! - [`pki`]: the CA, server and agent certificates. [`tokens`]: bootstrap tokens.
//! - [`boot`]: iPXE scripts, kernel arguments, per-host ISOs, dnsmasq configuration; pure.
//! - [`http`]: boot files, scripts and images over HTTP, with [`sendfile`] in front answering
//!   image downloads. [`admin`]: the CLI's API on a Unix socket.
//! - [`hardware`]: the full inventory as a metal3 `HardwareData` document, and its summary.
//! - [`output`]: tables and descriptions, pure.
//! - [`crd`]: the Kubernetes CRDs, generated from the host types (`slipway crd`).
//! - [`limits`]: caps on each listener's connections, in all and per source address.

pub mod admin;
pub mod api;
pub mod boot;
pub mod cli;
pub mod configdrive;
pub mod crd;
pub mod engine;
pub mod failpoint;
pub mod hardware;
pub mod http;
pub mod iso;
pub mod leader;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod output;
pub mod pki;
pub mod ratelimit;
pub mod sendfile;
pub mod serve;
pub mod sources;
pub mod state;
pub mod tokens;
pub mod transfer;
pub mod view;

/// An error and all its causes on one line: "a: b: c".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}
