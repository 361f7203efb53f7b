//! Durable state, behind narrow traits: what the engine needs to resume after a restart.
//!
//! - [`StateStore`]: per-host records (the accepted declaration, the status, recent events,
//!   the full inventory, the host's bootstrap tokens), committed in batches. A batch is a list
//!   of per-host changes, and the result says, host by host, whether its changes are stored:
//!   the engine acts for a host only once its own changes are durable. The redb file of files
//!   mode commits a batch in one transaction (all hosts or none); a Kubernetes backend writes
//!   each host's status on its own and may fail for one host only.
//! - [`HardwareStore`]: the read side of full inventories (`slipway get hardwaredata`), read
//!   from the store when asked, never held in memory for the fleet.
//!
//! Implementations: [`redb::RedbStore`] (files mode, `STATE/slipway.redb`) and
//! [`memory::MemoryStore`] (engine unit tests, the load generator's coordinator).
//!
//! **Invariant:** token secrets are never stored: tokens are keyed by the SHA-256 of the
//! secret. Secret contents (userData, ...) never reach a store.

pub mod kube;
pub mod memory;
pub mod redb;

use std::path::PathBuf;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
pub use slipway_reconcile::host::HostKey;
use slipway_reconcile::host::{BareMetalHost, HostStatus};

use crate::hardware::HardwareData;

/// How many events a host keeps for `describe`.
pub const EVENTS_KEPT: usize = 50;
/// How many events of one kind (reason) a host keeps: a flood of one kind (boot requests, an
/// impostor's enrolments) cannot push the rest of the audit trail out.
pub const EVENTS_PER_KIND: usize = 10;

/// The event to drop after one of kind `newest` was added to `events` (sequence and kind,
/// oldest first), if any: the oldest of that kind once it has more than [`EVENTS_PER_KIND`];
/// else, past [`EVENTS_KEPT`] in all, the oldest event of the most numerous kind.
pub fn event_to_drop<'a>(
    events: impl Iterator<Item = (u64, &'a str)>,
    newest: &str,
) -> Option<u64> {
    let mut kinds: std::collections::HashMap<&str, (usize, u64)> = Default::default();
    let mut total = 0;
    for (seq, kind) in events {
        total += 1;
        kinds.entry(kind).or_insert((0, seq)).0 += 1;
    }
    if let Some((n, oldest)) = kinds.get(newest)
        && *n > EVENTS_PER_KIND
    {
        return Some(*oldest);
    }
    if total <= EVENTS_KEPT {
        return None;
    }
    kinds
        .values()
        .max_by_key(|(n, oldest)| (*n, std::cmp::Reverse(*oldest)))
        .map(|(_, oldest)| *oldest)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<::redb::Error>,
    },
    #[error(
        "the state database {} is in use by another process (is another `slipway serve` using \
         this state directory?)",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "the state database {} is empty (0 bytes): it was truncated, by a full filesystem or \
         an interrupted copy. Restore it from a backup; or, to start over with every host \
         registering again (provisioned disks are not touched until their hosts are \
         inspected), move it away",
        path.display()
    )]
    Empty { path: PathBuf },
    #[error(
        "the state database {} is damaged and cannot be read. Restore it from a backup; or, \
         to start over with every host registering again, move it away",
        path.display()
    )]
    Damaged { path: PathBuf },
    #[error(
        "the state database {} is being reopened after an I/O error (a full filesystem?); \
         writes resume once it opens",
        path.display()
    )]
    Reopening { path: PathBuf },
    #[error("the state database {} refused a {action}", path.display())]
    Db {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: Box<::redb::Error>,
    },
    #[error("record {key:?} in {} is corrupt", path.display())]
    Corrupt {
        key: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A Kubernetes API call failed (Kubernetes mode).
    #[error("{0}")]
    Kube(String),
    /// Injected by [`memory::MemoryStore`] for tests.
    #[error("{0}")]
    Injected(String),
}

/// What Slipway keeps about a host besides its status and events.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    /// The accepted metadata and spec (the status is kept apart, written on its own).
    pub host: BareMetalHost,
    /// Where the declaration came from (a file path, `discovered`, `kube`).
    #[serde(default, alias = "source")]
    pub origin: String,
    /// Hex SHA-256 of the host's newest agent certificate; older ones are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cert_sha256: Option<String>,
    /// The source no longer declares the host; it is on its way out.
    #[serde(default)]
    pub deleted: bool,
    /// Hex SHA-256 of the stored full inventory's hardware, so an agent that reports the
    /// same hardware again (every reconnect does) costs no write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_sha256: Option<String>,
    /// The machine inspected for this host; agents on other hardware are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::hardware::Identity>,
    /// The MAC the host's current agent booted from (said at enrolment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_boot_mac: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    pub time: Timestamp,
    #[serde(default)]
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// A bootstrap token, stored under the hex SHA-256 of its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub host: HostKey,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<Timestamp>,
    /// The peer that used it, for the refusal message of a second use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
    /// Minted for a boot script or ISO (at most one unused per host), not by an operator.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub boot: bool,
}

/// One host's changes in a batch. Applied in this order: `remove` (everything kept about the
/// host, its events, inventory and the tokens listed), then the writes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostChange {
    pub remove: bool,
    pub record: Option<HostRecord>,
    pub status: Option<HostStatus>,
    /// New events, with their per-host sequence numbers.
    pub events: Vec<(u64, EventRecord)>,
    /// Events older than this sequence number are dropped (the host keeps [`EVENTS_KEPT`]).
    pub events_keep_from: u64,
    /// Events dropped above `events_keep_from`, by sequence (see [`event_to_drop`]).
    pub events_dropped: Vec<u64>,
    pub hardware: Option<HardwareData>,
    /// Tokens written (`Some`) or deleted (`None`), by hash.
    pub tokens: Vec<(String, Option<TokenRecord>)>,
}

impl HostChange {
    pub fn is_empty(&self) -> bool {
        !self.remove
            && self.record.is_none()
            && self.status.is_none()
            && self.events.is_empty()
            && self.events_dropped.is_empty()
            && self.hardware.is_none()
            && self.tokens.is_empty()
    }

    /// Folds a later change of the same host into this one (a failed commit's change comes
    /// back in front of what happened since).
    pub fn then(&mut self, later: HostChange) {
        if later.remove {
            *self = later;
            return;
        }
        if later.record.is_some() {
            self.record = later.record;
        }
        if later.status.is_some() {
            self.status = later.status;
        }
        self.events.extend(later.events);
        self.events_keep_from = self.events_keep_from.max(later.events_keep_from);
        self.events_dropped.extend(later.events_dropped);
        let (keep_from, dropped) = (self.events_keep_from, &self.events_dropped);
        self.events
            .retain(|(seq, _)| *seq >= keep_from && !dropped.contains(seq));
        if later.hardware.is_some() {
            self.hardware = later.hardware;
        }
        self.tokens.extend(later.tokens);
    }
}

/// Changes to store together.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub id: u64,
    pub hosts: Vec<(HostKey, HostChange)>,
}

impl Batch {
    /// The kinds of the commands the batch's statuses hold (crash-test tags).
    pub fn command_kinds(&self) -> Vec<&'static str> {
        self.hosts
            .iter()
            .filter_map(|(_, c)| c.status.as_ref()?.current_command.as_ref())
            .map(|c| c.kind.name())
            .collect()
    }
}

/// The hosts of a batch whose changes were not stored, with why.
pub type Failed = Vec<(HostKey, String)>;

/// A host as stored.
#[derive(Clone, Debug, Default)]
pub struct StoredHost {
    pub record: HostRecord,
    pub status: HostStatus,
    /// Recent events, oldest first, with their sequence numbers.
    pub events: Vec<(u64, EventRecord)>,
}

/// Everything the engine resumes from.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub hosts: Vec<(HostKey, StoredHost)>,
    pub tokens: Vec<(String, TokenRecord)>,
}

/// Durable host state, committed in batches.
pub trait StateStore: Send + 'static {
    /// Everything needed to resume: hosts (record, status, events) and tokens.
    fn load(&mut self) -> Result<Loaded, StoreError>;

    /// Stores a batch; the hosts whose change was not stored are returned with the reason.
    /// redb stores the batch in one transaction (a failure fails every host); Kubernetes
    /// writes each host's objects in order (status, HardwareData, tokens; Events are queued
    /// after, best effort), so a failed host may have some of them written: writing the same change again is safe, and
    /// the engine sends nothing for the host until it is stored.
    fn commit(&mut self, batch: &Batch) -> Result<(), Failed>;
}

/// Full inventories, read on demand.
pub trait HardwareStore: Send + Sync + 'static {
    fn hardware(&self, key: &HostKey) -> Result<Option<HardwareData>, StoreError>;
    fn all_hardware(&self) -> Result<Vec<HardwareData>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adds events of `kinds` one by one, applying [`event_to_drop`] as the engine does.
    fn keep(kinds: &[&str]) -> Vec<(u64, String)> {
        let mut kept: Vec<(u64, String)> = Vec::new();
        for (seq, kind) in kinds.iter().enumerate() {
            kept.push((seq as u64, kind.to_string()));
            if let Some(d) = event_to_drop(kept.iter().map(|(s, k)| (*s, k.as_str())), kind) {
                kept.retain(|(s, _)| *s != d);
            }
        }
        kept
    }

    #[test]
    fn a_flood_of_one_kind_keeps_the_other_kinds() {
        let mut kinds = vec!["Registered", "InspectionStarted", "InspectionDone"];
        kinds.extend(std::iter::repeat_n("BootRamdisk", 500));
        kinds.push("ProvisioningStarted");
        let kept = keep(&kinds);
        let of = |k: &str| kept.iter().filter(|(_, r)| r == k).count();
        assert_eq!(of("BootRamdisk"), EVENTS_PER_KIND);
        assert_eq!(of("Registered"), 1);
        assert_eq!(of("InspectionDone"), 1);
        assert_eq!(of("ProvisioningStarted"), 1);
        // The newest of the flood are the ones kept.
        assert_eq!(kept.iter().rev().nth(1).unwrap().0, 502);
    }

    #[test]
    fn past_the_total_the_most_numerous_kind_loses_its_oldest() {
        // Seven kinds of eight events each: 56 > 50.
        let names = ["a", "b", "c", "d", "e", "f", "g"];
        let kinds: Vec<&str> = (0..56).map(|i| names[i % 7]).collect();
        let kept = keep(&kinds);
        assert_eq!(kept.len(), EVENTS_KEPT);
        for n in names {
            let c = kept.iter().filter(|(_, r)| r == n).count();
            assert!((7..=8).contains(&c), "{n}: {c}");
        }
        // Few events: nothing dropped.
        assert_eq!(keep(&["a", "b", "a"]).len(), 3);
    }
}
