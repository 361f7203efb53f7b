//! metal3's `status.conditions`: Manageable, AvailableForProvisioning, Provisioned, Ready,
//! Progressing and Healthy, derived from the provisioning state and the operational status
//! exactly as baremetal-operator's `computeConditions` derives them, so `kubectl wait
//! --for=condition=Ready bmh/NAME` and tools written against metal3 read the same answers.
//!
//! A condition's `lastTransitionTime` changes only when its `status` does (metav1's rule).

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::host::{ErrorType, HostStatus, OperationalStatus, ProvisioningState};

/// One condition, in the shape of Kubernetes' `metav1.Condition`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's type: Manageable, AvailableForProvisioning, Provisioned, Ready,
    /// Progressing or Healthy.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// A CamelCase reason for the condition's last transition (metal3's reasons:
    /// Registering, Inspecting, Available, Provisioned, Error, Detached, ...).
    pub reason: String,
    /// A human readable message: the error message when the host is in error.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the condition last changed from one status to another.
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub last_transition_time: Timestamp,
    /// The metadata.generation the condition was set for (metal3 leaves it out; kept when an
    /// adopted status carries it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

pub const MANAGEABLE: &str = "Manageable";
pub const AVAILABLE_FOR_PROVISIONING: &str = "AvailableForProvisioning";
pub const PROVISIONED: &str = "Provisioned";
pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const HEALTHY: &str = "Healthy";

/// The conditions' values for `status`: (type, status, reason), in metal3's order.
pub fn compute(status: &HostStatus) -> Vec<(&'static str, &'static str, &'static str)> {
    use ProvisioningState as S;
    let (t, f, u) = ("True", "False", "Unknown");
    let progressing = |reason| {
        vec![
            (MANAGEABLE, t, "Manageable"),
            (AVAILABLE_FOR_PROVISIONING, f, "NotAvailable"),
            (PROVISIONED, f, "NotProvisioned"),
            (READY, f, "NotProvisioned"),
            (PROGRESSING, t, reason),
        ]
    };
    let mut c = match status.provisioning.state {
        S::None | S::Unmanaged => vec![
            (MANAGEABLE, f, "NotManaged"),
            (AVAILABLE_FOR_PROVISIONING, f, "NotAvailable"),
            (PROVISIONED, f, "NotProvisioned"),
            (READY, f, "NotProvisioned"),
            (PROGRESSING, f, "NotProgressing"),
        ],
        S::Registering => vec![
            (
                MANAGEABLE,
                f,
                if status.operational_status == OperationalStatus::Error {
                    "RegistrationFailed"
                } else {
                    "Registering"
                },
            ),
            (AVAILABLE_FOR_PROVISIONING, f, "NotAvailable"),
            (PROVISIONED, f, "NotProvisioned"),
            (READY, f, "NotProvisioned"),
            (PROGRESSING, t, "Registering"),
        ],
        S::Preparing => progressing("Preparing"),
        S::Available => vec![
            (MANAGEABLE, t, "Manageable"),
            (AVAILABLE_FOR_PROVISIONING, t, "Available"),
            (PROVISIONED, f, "NotProvisioned"),
            (READY, f, "NotProvisioned"),
            (PROGRESSING, f, "NotProgressing"),
        ],
        S::Provisioning => progressing("Provisioning"),
        S::Provisioned | S::ExternallyProvisioned => vec![
            (MANAGEABLE, t, "Manageable"),
            (AVAILABLE_FOR_PROVISIONING, f, "NotAvailable"),
            (PROVISIONED, t, "Provisioned"),
            (READY, t, "Provisioned"),
            (PROGRESSING, f, "NotProgressing"),
        ],
        S::Deprovisioning => progressing("Deprovisioning"),
        S::Inspecting => progressing("Inspecting"),
        S::PoweringOffBeforeDelete => progressing("PoweringOffBeforeDelete"),
        S::Deleting => progressing("Deleting"),
    };
    let mut set = |ty: &str, st, reason| {
        if let Some(e) = c.iter_mut().find(|e| e.0 == ty) {
            e.1 = st;
            e.2 = reason;
        }
    };
    match status.operational_status {
        OperationalStatus::Error => set(READY, f, "Error"),
        OperationalStatus::Detached => {
            set(READY, f, "Detached");
            set(PROGRESSING, f, "Detached");
        }
        _ => {}
    }
    if status.error_type == Some(ErrorType::PowerManagement)
        && !matches!(
            status.provisioning.state,
            S::None | S::Unmanaged | S::Registering | S::Deleting
        )
        && status.operational_status != OperationalStatus::Detached
    {
        set(MANAGEABLE, f, "PowerFailure");
    }
    // No BMC driver reports health: metal3 says Unknown when it has no provisioner to ask.
    c.push((HEALTHY, u, "Unknown"));
    c
}

/// Brings `status.conditions` up to date at `now`: each condition keeps its transition time
/// while its status stays; the message of a False Ready (or Manageable) in error is the
/// host's error message.
pub fn update(status: &mut HostStatus, now: Timestamp) {
    let computed = compute(status);
    let mut next = Vec::with_capacity(computed.len());
    for (ty, st, reason) in computed {
        let message =
            if st == "False" && matches!(reason, "Error" | "RegistrationFailed" | "PowerFailure") {
                status.error_message.clone()
            } else {
                String::new()
            };
        let old = status.conditions.iter().find(|c| c.type_ == ty);
        let last_transition_time = match old {
            Some(o) if o.status == st => o.last_transition_time,
            _ => now,
        };
        next.push(Condition {
            type_: ty.into(),
            status: st.into(),
            reason: reason.into(),
            message,
            last_transition_time,
            observed_generation: None,
        });
    }
    // Conditions of other types (another controller's, an adopted status's) are kept.
    for c in &status.conditions {
        if !next.iter().any(|n| n.type_ == c.type_) {
            next.push(c.clone());
        }
    }
    if next != status.conditions {
        status.conditions = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn get<'a>(s: &'a HostStatus, ty: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == ty).unwrap()
    }

    #[test]
    fn conditions_follow_metal3_through_a_hosts_life() {
        let mut s = HostStatus::default();
        update(&mut s, at(0));
        assert_eq!(get(&s, MANAGEABLE).reason, "NotManaged");
        assert_eq!(get(&s, HEALTHY).status, "Unknown");
        s.provisioning.state = ProvisioningState::Registering;
        update(&mut s, at(1));
        assert_eq!(get(&s, PROGRESSING).status, "True");
        assert_eq!(get(&s, PROGRESSING).reason, "Registering");
        s.provisioning.state = ProvisioningState::Available;
        update(&mut s, at(2));
        assert_eq!(get(&s, AVAILABLE_FOR_PROVISIONING).status, "True");
        assert_eq!(get(&s, PROGRESSING).status, "False");
        assert_eq!(get(&s, READY).status, "False");
        s.provisioning.state = ProvisioningState::Provisioned;
        update(&mut s, at(3));
        let ready = get(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Provisioned")
        );
        assert_eq!(ready.last_transition_time, at(3));
        // Provisioned and in error: not Ready, with the message.
        s.operational_status = OperationalStatus::Error;
        s.error_message = "the BMC said no".into();
        update(&mut s, at(4));
        let ready = get(&s, READY);
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, "Error");
        assert_eq!(ready.message, "the BMC said no");
        assert_eq!(get(&s, PROVISIONED).status, "True");
        // Detached: neither Ready nor Progressing.
        s.operational_status = OperationalStatus::Detached;
        update(&mut s, at(5));
        assert_eq!(get(&s, READY).reason, "Detached");
        assert_eq!(get(&s, PROGRESSING).reason, "Detached");
    }

    #[test]
    fn transition_time_changes_only_with_the_status() {
        let mut s = HostStatus::default();
        s.provisioning.state = ProvisioningState::Inspecting;
        update(&mut s, at(0));
        let before = s.conditions.clone();
        update(&mut s, at(10));
        assert_eq!(s.conditions, before, "nothing changed, nothing rewritten");
        // Inspecting -> Preparing: Progressing stays True (new reason, same time).
        s.provisioning.state = ProvisioningState::Preparing;
        update(&mut s, at(20));
        let p = get(&s, PROGRESSING);
        assert_eq!(p.reason, "Preparing");
        assert_eq!(p.last_transition_time, at(0));
        s.provisioning.state = ProvisioningState::Available;
        update(&mut s, at(30));
        assert_eq!(get(&s, PROGRESSING).last_transition_time, at(30));
    }

    #[test]
    fn other_controllers_conditions_are_kept() {
        let mut s = HostStatus::default();
        s.conditions.push(Condition {
            type_: "Custom".into(),
            status: "True".into(),
            reason: "Mine".into(),
            message: String::new(),
            last_transition_time: at(0),
            observed_generation: Some(3),
        });
        update(&mut s, at(1));
        assert!(s.conditions.iter().any(|c| c.type_ == "Custom"));
        assert_eq!(s.conditions.len(), 7);
    }
}
