//! An in-memory [`StateStore`] and [`HardwareStore`]: for the engine's unit tests (which can
//! make commits fail, host by host, and "restart" an engine on what was stored) and for runs
//! where durability does not matter.
//!
//! Clones share the same contents, so a test keeps a handle while the engine owns another.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    Batch, EVENTS_KEPT, EventRecord, Failed, HardwareStore, HostKey, Loaded, StateStore,
    StoreError, StoredHost, TokenRecord,
};
use crate::hardware::HardwareData;

#[derive(Debug, Default)]
struct Inner {
    hosts: BTreeMap<HostKey, StoredHost>,
    hardware: BTreeMap<HostKey, HardwareData>,
    tokens: BTreeMap<String, TokenRecord>,
    /// Commits of these hosts fail.
    fail_hosts: HashSet<HostKey>,
    /// The next this many commits fail for every host.
    fail_all: usize,
    /// Batches committed (including failed ones), for tests.
    commits: usize,
}

#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits of `host` fail until [`MemoryStore::heal`].
    pub fn fail_host(&self, host: &HostKey) {
        self.lock().fail_hosts.insert(host.clone());
    }

    /// The next `n` commits fail for every host (a full disk).
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_all = n;
    }

    pub fn heal(&self) {
        let mut i = self.lock();
        i.fail_hosts.clear();
        i.fail_all = 0;
    }

    /// The host as stored, if it is.
    pub fn host(&self, key: &HostKey) -> Option<StoredHost> {
        self.lock().hosts.get(key).cloned()
    }

    pub fn tokens(&self) -> Vec<(String, TokenRecord)> {
        self.lock()
            .tokens
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn commits(&self) -> usize {
        self.lock().commits
    }
}

impl StateStore for MemoryStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        let i = self.lock();
        Ok(Loaded {
            hosts: i
                .hosts
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            tokens: i
                .tokens
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), Failed> {
        let mut i = self.lock();
        i.commits += 1;
        if i.fail_all > 0 {
            i.fail_all -= 1;
            return Err(batch
                .hosts
                .iter()
                .map(|(k, _)| (k.clone(), "injected: the store is full".to_string()))
                .collect());
        }
        let mut failed = Vec::new();
        for (key, change) in &batch.hosts {
            if i.fail_hosts.contains(key) {
                failed.push((key.clone(), format!("injected: cannot store host {key}")));
                continue;
            }
            if change.remove {
                i.hosts.remove(key);
                i.hardware.remove(key);
            }
            for (hash, token) in &change.tokens {
                match token {
                    Some(t) => i.tokens.insert(hash.clone(), t.clone()),
                    None => i.tokens.remove(hash),
                };
            }
            if let Some(h) = &change.hardware {
                i.hardware.insert(key.clone(), h.clone());
            }
            let writes =
                change.record.is_some() || change.status.is_some() || !change.events.is_empty();
            if !writes {
                continue;
            }
            let stored = i.hosts.entry(key.clone()).or_default();
            if let Some(r) = &change.record {
                stored.record = r.clone();
            }
            if let Some(s) = &change.status {
                stored.status = s.clone();
            }
            stored.events.extend(change.events.iter().cloned());
            stored.events.retain(|(seq, _)| {
                *seq >= change.events_keep_from && !change.events_dropped.contains(seq)
            });
            let extra = stored.events.len().saturating_sub(EVENTS_KEPT);
            stored.events.drain(..extra);
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed)
        }
    }
}

impl HardwareStore for MemoryStore {
    fn hardware(&self, key: &HostKey) -> Result<Option<HardwareData>, StoreError> {
        Ok(self.lock().hardware.get(key).cloned())
    }

    fn all_hardware(&self) -> Result<Vec<HardwareData>, StoreError> {
        Ok(self.lock().hardware.values().cloned().collect())
    }
}

/// For tests: an event record.
pub fn event(reason: &str, message: &str) -> EventRecord {
    EventRecord {
        time: jiff::Timestamp::UNIX_EPOCH,
        warning: false,
        reason: reason.into(),
        message: message.into(),
    }
}
