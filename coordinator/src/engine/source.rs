//! What the source says changed, applied host by host.

use jiff::Timestamp;
use slipway_reconcile::host::{BareMetalHost, HostKey, HostStatus};
use tracing::{info, warn};

use super::Engine;
use super::host::{Entry, secret_refs};
use super::msg::DISCOVERED;
use crate::sources::SourceEvent;
use crate::state::HostRecord;

impl Engine {
    pub(super) fn apply_source(&mut self, event: SourceEvent, now: Timestamp) {
        match event {
            SourceEvent::Declared { key, host, origin } => self.declared(key, *host, origin, now),
            SourceEvent::Undeclared { key } => self.undeclared(&key),
            SourceEvent::Conflict { key, field, why } => {
                if !self.synced && why.is_some() {
                    self.declared.insert(key.clone());
                }
                let why = why.map(|w| (field, w));
                if let Some(entry) = self.hosts.get_mut(&key)
                    && entry.source_conflict != why
                {
                    entry.source_conflict = why;
                    self.to_plan.insert(key.clone());
                    self.view_dirty.insert(key);
                }
            }
            SourceEvent::Secret { key, keys } => {
                match keys {
                    Some(k) => {
                        self.secret_keys.insert(key.clone(), k);
                    }
                    None => {
                        self.secret_keys.remove(&key);
                    }
                }
                // The hosts that use it plan again: one that waited for it can go on.
                if let Some(users) = self.secret_users.get(&key) {
                    self.to_plan.extend(users.iter().cloned());
                }
            }
            SourceEvent::Problems(problems) => {
                for p in problems.iter().filter(|p| !self.problems.contains(p)) {
                    if p.warning {
                        info!("hosts source: {}", crate::log::escape(&p.to_string()));
                    } else {
                        warn!("hosts source: {}", crate::log::escape(&p.to_string()));
                    }
                }
                self.problems = problems;
                self.problems_dirty = true;
            }
            SourceEvent::Synced => {
                if self.synced {
                    return;
                }
                self.synced = true;
                let stale: Vec<HostKey> = self
                    .hosts
                    .iter()
                    .filter(|(k, e)| {
                        !e.forgotten
                            && !e.record.deleted
                            && e.record.origin != DISCOVERED
                            && !self.declared.contains(*k)
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in stale {
                    self.undeclared(&key);
                }
                info!(
                    hosts = self.declared.len(),
                    "the hosts source has been read in full"
                );
                self.declared.clear();
            }
        }
    }

    fn declared(&mut self, key: HostKey, mut host: BareMetalHost, origin: String, now: Timestamp) {
        if !self.synced {
            self.declared.insert(key.clone());
        }
        let adopted = host.status.take();
        let existing = self.hosts.get(&key).is_some_and(|e| !e.forgotten);
        if existing {
            let Some(entry) = self.hosts.get_mut(&key) else {
                return;
            };
            // A source without creation times (files) keeps the one Slipway gave the host.
            if host.metadata.creation_timestamp.is_none() {
                host.metadata.creation_timestamp = entry.record.host.metadata.creation_timestamp;
            }
            let changed = entry.record.host.spec != host.spec
                || entry.record.host.metadata != host.metadata
                || entry.record.origin != origin
                || entry.record.deleted;
            if !changed {
                return;
            }
            if entry.record.deleted {
                info!(host = %key, "host declared again in {origin}");
            } else if entry.record.host.spec != host.spec {
                info!(host = %key, "spec changed in {origin}");
            } else if entry.record.host.metadata != host.metadata {
                info!(host = %key, "labels or annotations changed in {origin}");
            } else {
                info!(host = %key, "now declared in {origin}");
            }
            let old_mac = entry.boot_mac();
            let old_bmc = entry.bmc_identity();
            let old_refs = secret_refs(&key, &entry.record.host.spec);
            let r = std::sync::Arc::make_mut(&mut entry.record);
            r.host.spec = host.spec;
            r.host.metadata = host.metadata;
            r.origin = origin;
            r.deleted = false;
            entry.pending.record = true;
            let new_mac = entry.boot_mac();
            let new_bmc = entry.bmc_identity();
            let new_refs = secret_refs(&key, &entry.record.host.spec);
            if old_mac != new_mac {
                if let Some(m) = &old_mac {
                    self.unindex_mac(m, &key);
                }
                if let Some(m) = &new_mac {
                    self.index_mac(m, &key);
                }
            }
            if old_bmc != new_bmc {
                if let Some(b) = &old_bmc {
                    self.unindex_bmc(b, &key);
                }
                if let Some(b) = &new_bmc {
                    self.index_bmc(b, &key);
                }
            }
            // Conflicts over either identity may have begun or ended, on either side; a
            // deletion undone counts too.
            for (m, b) in [(&old_mac, &old_bmc), (&new_mac, &new_bmc)] {
                self.replan_peers(m.as_deref(), b.as_deref());
            }
            for (_, sk) in old_refs {
                if let Some(users) = self.secret_users.get_mut(&sk) {
                    users.remove(&key);
                }
            }
            for (_, sk) in new_refs {
                self.secret_users.entry(sk).or_default().insert(key.clone());
            }
        } else {
            host.metadata.creation_timestamp.get_or_insert(now);
            let record = HostRecord {
                host,
                origin,
                ..Default::default()
            };
            let status = match adopted {
                Some(status) => {
                    info!(
                        host = %key,
                        state = %status.provisioning.state,
                        "new host declared in {} with a status to adopt (moved from another                          coordinator): it goes on from there", record.origin
                    );
                    status
                }
                None => {
                    info!(host = %key, "new host declared in {}", record.origin);
                    HostStatus::default()
                }
            };
            let mut entry = Entry::new(record, status, now);
            // Declared again before its removal was stored: the store drops the old one first.
            entry.pending.remove = self.hosts.contains_key(&key);
            entry.pending.record = true;
            entry.pending.status = true;
            self.add_entry(&key, entry);
        }
        self.unsaved.insert(key.clone());
        self.to_plan.insert(key.clone());
        self.view_dirty.insert(key.clone());
        self.claim_discovered(&key);
    }

    /// A declared host whose MAC a discovered machine had: the discovered record goes.
    fn claim_discovered(&mut self, key: &HostKey) {
        let Some(mac) = self.hosts.get(key).and_then(|e| e.boot_mac()) else {
            return;
        };
        let others: Vec<HostKey> = self
            .macs
            .get(&mac)
            .map(|s| s.iter().filter(|k| *k != key).cloned().collect())
            .unwrap_or_default();
        for other in others {
            let Some(e) = self.hosts.get_mut(&other) else {
                continue;
            };
            if e.record.origin == DISCOVERED && !e.record.deleted && !e.forgotten {
                info!(host = %other, "a declared host now has this discovered host's MAC: dropping the discovered record");
                std::sync::Arc::make_mut(&mut e.record).deleted = true;
                e.pending.record = true;
                self.unsaved.insert(other.clone());
                self.to_plan.insert(other.clone());
                self.view_dirty.insert(other);
            }
        }
    }

    fn undeclared(&mut self, key: &HostKey) {
        let Some(entry) = self.hosts.get_mut(key) else {
            return;
        };
        if entry.forgotten || entry.record.deleted {
            return;
        }
        if entry.record.origin == DISCOVERED {
            // A source that shows discovered hosts (Kubernetes mode's labelled objects) lost
            // one: the operator deleted it.
            self.drop_discovered(key, "its object was deleted");
            return;
        }
        info!(host = %key, "host no longer declared: deleting it");
        std::sync::Arc::make_mut(&mut entry.record).deleted = true;
        entry.pending.record = true;
        let (mac, bmc) = (entry.boot_mac(), entry.bmc_identity());
        self.replan_peers(mac.as_deref(), bmc.as_deref());
        self.unsaved.insert(key.clone());
        self.to_plan.insert(key.clone());
        self.view_dirty.insert(key.clone());
    }
}
