//! metal3's lifecycle annotations, read as plain functions: `baremetalhost.metal3.io/paused`,
//! `baremetalhost.metal3.io/detached`, `reboot.metal3.io[/SUFFIX]`, `inspect.metal3.io` and
//! `inspect.metal3.io/hardwaredetails`. Values are parsed as metal3 parses them (a value that is
//! not the JSON metal3 expects falls back to metal3's default, and says so).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::host::HardwareDetails;

/// Freezes the host: no plan, no commands, no state change (any value).
pub const PAUSED: &str = "baremetalhost.metal3.io/paused";
/// Stops managing the host without deprovisioning it (operational status `detached`).
pub const DETACHED: &str = "baremetalhost.metal3.io/detached";
/// A copy of the status, carried across a move between clusters.
pub const STATUS: &str = "baremetalhost.metal3.io/status";
/// `reboot.metal3.io` reboots once; `reboot.metal3.io/SUFFIX` keeps the host off while present.
pub const REBOOT_PREFIX: &str = "reboot.metal3.io";
/// `inspect.metal3.io` asks for a new inspection of an available host; `disabled` skips
/// inspection.
pub const INSPECT: &str = "inspect.metal3.io";
/// Hardware details to use when inspection is disabled.
pub const HARDWARE_DETAILS: &str = "inspect.metal3.io/hardwaredetails";

pub fn paused(a: &BTreeMap<String, String>) -> bool {
    a.contains_key(PAUSED)
}

/// The detached annotation's arguments (`{"deleteAction": "delay"|"delete", "force": bool}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Detach {
    /// Deleting the host waits while it is detached (`deleteAction: delay`).
    pub delay_delete: bool,
    /// Detach in any state, not only steady ones.
    pub force: bool,
}

/// Whether the host is detached, and how. As in metal3, any value detaches; a value that is
/// not the expected JSON means the defaults.
pub fn detached(a: &BTreeMap<String, String>) -> Option<Detach> {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Args {
        #[serde(default)]
        delete_action: String,
        #[serde(default)]
        force: bool,
    }
    let value = a.get(DETACHED)?;
    let args: Args = serde_json::from_str(value).unwrap_or_default();
    Some(Detach {
        delay_delete: args.delete_action == "delay",
        force: args.force,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebootMode {
    Soft,
    Hard,
}

/// One `reboot.metal3.io[/SUFFIX]` annotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebootRequest {
    /// The annotation's key.
    pub key: String,
    /// Its value, as written (a request is carried out once per value).
    pub value: String,
    pub mode: RebootMode,
    /// Reboot even a host that is not provisioned (metal3 reboots only provisioned hosts
    /// otherwise).
    pub force: bool,
    /// `reboot.metal3.io/SUFFIX`: the host stays off until every such annotation is removed
    /// (remediation); the plain one reboots once.
    pub hold: bool,
    /// The value was not the JSON metal3 reads; a soft reboot is assumed, as metal3 does.
    pub unreadable: bool,
}

/// Every reboot annotation, in key order.
pub fn reboot_requests(a: &BTreeMap<String, String>) -> Vec<RebootRequest> {
    #[derive(Deserialize)]
    struct Args {
        #[serde(default)]
        mode: String,
        #[serde(default)]
        force: bool,
    }
    a.iter()
        .filter(|(k, _)| {
            k.as_str() == REBOOT_PREFIX
                || k.strip_prefix(REBOOT_PREFIX)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .map(|(k, v)| {
            let parsed = if v.trim().is_empty() {
                Ok(None)
            } else {
                serde_json::from_str::<Args>(v).map(Some)
            };
            let (mode, force, unreadable) = match parsed {
                Ok(Some(args)) => (
                    if args.mode == "hard" {
                        RebootMode::Hard
                    } else {
                        RebootMode::Soft
                    },
                    args.force,
                    !matches!(args.mode.as_str(), "" | "hard" | "soft"),
                ),
                Ok(None) => (RebootMode::Soft, false, false),
                Err(_) => (RebootMode::Soft, false, true),
            };
            RebootRequest {
                key: k.clone(),
                value: v.clone(),
                mode,
                force,
                hold: k.as_str() != REBOOT_PREFIX,
                unreadable,
            }
        })
        .collect()
}

/// What `inspect.metal3.io` asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inspect {
    /// No annotation.
    Default,
    /// `disabled`: skip inspection (metal3's deprecated form of `inspectionMode: disabled`).
    Disabled,
    /// Any other value: inspect again (an available host), once per value.
    Again(String),
}

pub fn inspect(a: &BTreeMap<String, String>) -> Inspect {
    match a.get(INSPECT).map(String::as_str) {
        None => Inspect::Default,
        Some("disabled") => Inspect::Disabled,
        Some(v) => Inspect::Again(v.to_string()),
    }
}

/// The hardware details given by annotation, if any: an error says what does not parse.
pub fn hardware_details(a: &BTreeMap<String, String>) -> Option<Result<HardwareDetails, String>> {
    let value = a.get(HARDWARE_DETAILS)?;
    Some(
        serde_json::from_str::<HardwareDetails>(value)
            .map_err(|e| format!("is not the JSON of metal3's status.hardware ({e})")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn paused_and_detached_take_any_value() {
        assert!(paused(&ann(&[(PAUSED, "")])));
        assert!(paused(&ann(&[(PAUSED, "metal3.io/capm3")])));
        assert!(!paused(&ann(&[("other", "")])));
        assert_eq!(detached(&ann(&[])), None);
        assert_eq!(detached(&ann(&[(DETACHED, "")])), Some(Detach::default()));
        assert_eq!(
            detached(&ann(&[(
                DETACHED,
                r#"{"deleteAction":"delay","force":true}"#
            )])),
            Some(Detach {
                delay_delete: true,
                force: true
            })
        );
        assert_eq!(
            detached(&ann(&[(DETACHED, "yes please")])),
            Some(Detach::default())
        );
    }

    #[test]
    fn reboot_annotations_as_metal3_reads_them() {
        let r = reboot_requests(&ann(&[
            (REBOOT_PREFIX, ""),
            ("reboot.metal3.io/remediation", r#"{"mode":"hard"}"#),
            ("reboot.metal3.io/x", r#"{"mode":"soft","force":true}"#),
            ("reboot.metal3.iox", "not one"),
            ("reboot.metal3.io/bad", "{nope"),
        ]));
        let keys: Vec<_> = r.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "reboot.metal3.io",
                "reboot.metal3.io/bad",
                "reboot.metal3.io/remediation",
                "reboot.metal3.io/x"
            ]
        );
        assert_eq!(
            (r[0].mode, r[0].hold, r[0].force),
            (RebootMode::Soft, false, false)
        );
        assert!(r[1].unreadable && r[1].mode == RebootMode::Soft && r[1].hold);
        assert_eq!((r[2].mode, r[2].hold), (RebootMode::Hard, true));
        assert!(r[3].force && !r[3].unreadable);
    }

    #[test]
    fn inspect_annotation() {
        assert_eq!(inspect(&ann(&[])), Inspect::Default);
        assert_eq!(inspect(&ann(&[(INSPECT, "disabled")])), Inspect::Disabled);
        assert_eq!(
            inspect(&ann(&[(INSPECT, "")])),
            Inspect::Again(String::new())
        );
        let hw = hardware_details(&ann(&[(HARDWARE_DETAILS, r#"{"ramMebibytes":4096}"#)]));
        assert_eq!(hw.unwrap().unwrap().ram_mebibytes, 4096);
        let bad = hardware_details(&ann(&[(HARDWARE_DETAILS, "{")]));
        assert!(bad.unwrap().unwrap_err().contains("status.hardware"));
    }
}
