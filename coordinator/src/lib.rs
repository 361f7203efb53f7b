//! The Slipway coordinator: `slipway serve` and the `slipway` command-line client.
//!
//! Code map (see ARCHITECTURE.md for the invariants):
//! - [`cli`]: argument parsing and dispatch; thin.
//! - [`serve`]: wires the pieces together and runs them.
//! - [`controller`]: the executor around `slipway_reconcile::plan`; the only writer of state.
//! - [`api`]: the agent-facing gRPC service over TLS; the only module that knows protobuf.
//! - [`pki`]: the CA, server and agent certificates. [`tokens`]: bootstrap tokens.
//! - [`store`]: the embedded redb store. [`sources`]: where host declarations come from.
//! - [`boot`]: iPXE scripts, kernel arguments, per-host ISOs, dnsmasq configuration; pure.
//! - [`http`]: boot files, scripts and images over HTTP, with [`sendfile`] in front answering
//!   image downloads. [`admin`]: the CLI's API on a Unix socket.
//! - [`hardware`]: the full inventory as a metal3 `HardwareData` document, and its summary.
//! - [`output`]: tables and descriptions, pure.

pub mod admin;
pub mod api;
pub mod boot;
pub mod cli;
pub mod configdrive;
pub mod controller;
pub mod hardware;
pub mod http;
pub mod output;
pub mod pki;
pub mod sendfile;
pub mod serve;
pub mod sources;
pub mod store;
pub mod tokens;

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
