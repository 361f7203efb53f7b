//! Slipway's host model and pure state machine.
//!
//! - [`host`]: the `BareMetalHost` type family (metal3.io/v1alpha1 shape), shared by the
//!   files and Kubernetes sources.
//! - [`validate`]: semantic checks of a spec, with messages that name the field and the fix.
//! - [`annotations`]: metal3's lifecycle annotations (paused, detached, reboot, inspect).
//! - [`conditions`]: metal3's `status.conditions`, derived from the state.
//! - [`plan`]: `plan(desired, observed, now) -> Plan`, the state machine.
//!
//! Invariant: this crate does no I/O, never reads the clock and knows no async runtime. Time
//! comes in as `now`; effects go out as [`plan::Action`]s.

pub mod annotations;
pub mod conditions;
pub mod host;
pub mod plan;
#[cfg(feature = "schema")]
pub mod schema;
pub mod validate;

pub use plan::{
    Action, AgentLink, CommandFailure, CommandSuccess, CommandView, Desired, Event, Observed, Plan,
    Policy, Slot, plan,
};
