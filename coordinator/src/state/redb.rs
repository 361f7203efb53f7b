//! The embedded store of files mode: one redb file, `STATE/slipway.redb`.
//!
//! Tables (format 2), keyed by `namespace/name`:
//! - `hosts.v2`: the accepted declaration and identity facts ([`HostRecord`]), written when
//!   they change (rarely);
//! - `status.v2`: the status, written when it changes significantly;
//! - `events.v2`: one row per event, `namespace/name\0<seq>`, the oldest dropped beyond
//!   [`EVENTS_KEPT`](super::EVENTS_KEPT), so an event costs one small row, not a rewrite of
//!   the host;
//! - `hardware.v2`: each host's full inventory (a metal3 `HardwareData` document), written only
//!   when the hardware changed;
//! - `tokens.v2`: bootstrap tokens by the SHA-256 of their secret.
//!
//! A state directory of format 1 (one record per host by bare name, status and events inside)
//! is migrated on open, in one transaction, with a log line saying so.
//!
//! A batch is one transaction, so either every host of it is stored or none is; redb commits
//! are durable (fsync), so a SIGKILL loses at most the batch in flight, never half a record.
//!
//! It fails loud: an empty (zero-byte) file or one redb cannot read is refused at open with a
//! message naming the file and the way out, never started as an empty store and never a
//! panic. After an I/O error (a full filesystem), redb refuses every later operation until the
//! database is checked; the next commit does that check, so writes resume by themselves once
//! space is back.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Deserialize;
use slipway_reconcile::host::{BareMetalHost, HostStatus};
use tracing::info;

use super::{
    Batch, EVENTS_KEPT, EventRecord, Failed, HardwareStore, HostKey, HostRecord, Loaded,
    StateStore, StoreError, StoredHost, TokenRecord,
};
use crate::hardware::HardwareData;

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

const META: Table = TableDefinition::new("meta");
const HOSTS: Table = TableDefinition::new("hosts.v2");
const STATUS: Table = TableDefinition::new("status.v2");
const EVENTS: Table = TableDefinition::new("events.v2");
const HARDWARE: Table = TableDefinition::new("hardware.v2");
const TOKENS: Table = TableDefinition::new("tokens.v2");

// Format 1.
const V1_HOSTS: Table = TableDefinition::new("hosts");
const V1_TOKENS: Table = TableDefinition::new("tokens");
const V1_HARDWARE: Table = TableDefinition::new("hardware");

const FORMAT_KEY: &str = "format";
/// redb's page cache.
const CACHE_BYTES: usize = 16 << 20;
const FORMAT: &[u8] = b"2";

/// The redb store. Clones share the database (the engine writes, the admin API reads).
#[derive(Clone)]
pub struct RedbStore {
    /// Read-locked for every transaction; write-locked only to reopen the database after an
    /// I/O error (`None` while that fails).
    db: Arc<std::sync::RwLock<Option<Database>>>,
    path: PathBuf,
    /// An I/O error happened: check the database before the next write.
    needs_check: Arc<std::sync::atomic::AtomicBool>,
}

/// A read lock on the open database.
struct DbGuard<'a>(std::sync::RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for DbGuard<'_> {
    type Target = Database;
    fn deref(&self) -> &Database {
        self.0.as_ref().expect("checked when the guard was made")
    }
}

/// Opens (or creates) the file; `Err` when redb panicked on a damaged file.
fn open_db(path: &Path) -> std::thread::Result<Result<Database, redb::DatabaseError>> {
    std::panic::catch_unwind(|| {
        // redb caches pages it read or wrote, 1 GiB by default; the engine reads everything
        // once at start and then only writes, so a small cache keeps RSS for the fleet.
        redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
    })
}

fn event_key(key: &str, seq: u64) -> String {
    format!("{key}\0{seq:020}")
}

impl RedbStore {
    /// Opens (or creates) `dir/slipway.redb`, migrating an older format.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        let path = dir.join("slipway.redb");
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.len() == 0
        {
            // redb would make a new, empty database of it: every host would start over.
            return Err(StoreError::Empty { path });
        }
        // A damaged file can make redb panic; that is an error here, not a crash.
        let db = match open_db(&path) {
            Ok(Ok(db)) => db,
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
                return Err(StoreError::InUse { path });
            }
            Ok(Err(e)) => {
                return Err(StoreError::Open {
                    path,
                    source: Box::new(e.into()),
                });
            }
            Err(_) => return Err(StoreError::Damaged { path }),
        };
        let store = RedbStore {
            db: Arc::new(std::sync::RwLock::new(Some(db))),
            path,
            needs_check: Default::default(),
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.prepare())) {
            Ok(r) => r?,
            Err(_) => return Err(StoreError::Damaged { path: store.path }),
        }
        Ok(store)
    }

    /// The open database, for one transaction.
    fn db(&self) -> Result<DbGuard<'_>, StoreError> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(StoreError::Reopening {
                path: self.path.clone(),
            });
        }
        Ok(DbGuard(guard))
    }

    /// After an I/O error redb refuses everything until the database is closed and opened
    /// again (which repairs a half-written transaction): do that now.
    fn reopen_after_io_error(&self) -> Result<(), StoreError> {
        if !self.needs_check.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        // Closed first: redb holds a lock on the file.
        *db = None;
        let opened = match open_db(&self.path) {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                return Err(StoreError::Open {
                    path: self.path.clone(),
                    source: Box::new(e.into()),
                });
            }
            Err(_) => {
                return Err(StoreError::Damaged {
                    path: self.path.clone(),
                });
            }
        };
        *db = Some(opened);
        self.needs_check
            .store(false, std::sync::atomic::Ordering::Release);
        tracing::info!(
            "the state database {} was reopened after an I/O error; writing again",
            self.path.display()
        );
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, action: &'static str) -> impl Fn(redb::Error) -> StoreError + '_ {
        move |source| StoreError::Db {
            action,
            path: self.path.clone(),
            source: Box::new(source),
        }
    }

    fn corrupt(&self, key: &str) -> impl Fn(serde_json::Error) -> StoreError + '_ {
        let key = key.to_string();
        move |source| StoreError::Corrupt {
            key: key.clone(),
            path: self.path.clone(),
            source,
        }
    }

    /// Creates the tables, so readers never meet a missing one, and migrates format 1.
    fn prepare(&self) -> Result<(), StoreError> {
        let err = self.db_err("write");
        let db = self.db()?;
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        let format = {
            let meta = txn.open_table(META).map_err(|e| err(e.into()))?;
            meta.get(FORMAT_KEY)
                .map_err(|e| err(e.into()))?
                .map(|v| v.value().to_vec())
        };
        for t in [HOSTS, STATUS, EVENTS, HARDWARE, TOKENS] {
            txn.open_table(t).map_err(|e| err(e.into()))?;
        }
        if format.as_deref() != Some(FORMAT) {
            let migrated = self.migrate_v1(&txn)?;
            let mut meta = txn.open_table(META).map_err(|e| err(e.into()))?;
            meta.insert(FORMAT_KEY, FORMAT).map_err(|e| err(e.into()))?;
            drop(meta);
            if let Some((hosts, tokens, hardware)) = migrated {
                info!(
                    "migrated the state database {} from format 1 to format 2: {hosts} hosts, \
                     {tokens} tokens, {hardware} inventories; hosts are now named \
                     NAMESPACE/NAME (the default namespace where a document names none)",
                    self.path.display()
                );
            }
        }
        txn.commit().map_err(|e| err(e.into()))
    }

    /// Moves format-1 tables into format 2; `None` when there were none.
    fn migrate_v1(
        &self,
        txn: &redb::WriteTransaction,
    ) -> Result<Option<(usize, usize, usize)>, StoreError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct V1Host {
            host: BareMetalHost,
            #[serde(default)]
            source: String,
            #[serde(default)]
            agent_cert_sha256: Option<String>,
            #[serde(default)]
            deleted: bool,
            #[serde(default)]
            events: Vec<EventRecord>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct V1Token {
            host: String,
            created_at: jiff::Timestamp,
            expires_at: jiff::Timestamp,
            #[serde(default)]
            used_at: Option<jiff::Timestamp>,
            #[serde(default)]
            used_by: Option<String>,
        }
        let err = self.db_err("migration");
        let existing: Vec<String> = txn
            .list_tables()
            .map_err(|e| err(e.into()))?
            .map(|t| redb::TableHandle::name(&t).to_string())
            .collect();
        if !existing.iter().any(|t| t == "hosts") {
            return Ok(None);
        }
        let read_all = |def: Table| -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            let t = txn.open_table(def).map_err(|e| err(e.into()))?;
            let mut out = Vec::new();
            for item in t.iter().map_err(|e| err(e.into()))? {
                let (k, v) = item.map_err(|e| err(e.into()))?;
                out.push((k.value().to_string(), v.value().to_vec()));
            }
            Ok(out)
        };
        let old_hosts = read_all(V1_HOSTS)?;
        let old_tokens = if existing.iter().any(|t| t == "tokens") {
            read_all(V1_TOKENS)?
        } else {
            Vec::new()
        };
        let old_hardware = if existing.iter().any(|t| t == "hardware") {
            read_all(V1_HARDWARE)?
        } else {
            Vec::new()
        };
        // Old keys were bare names; the namespace comes from each document.
        let mut keys = std::collections::HashMap::new();
        {
            let mut hosts = txn.open_table(HOSTS).map_err(|e| err(e.into()))?;
            let mut status = txn.open_table(STATUS).map_err(|e| err(e.into()))?;
            let mut events = txn.open_table(EVENTS).map_err(|e| err(e.into()))?;
            for (name, bytes) in &old_hosts {
                let mut v1: V1Host = serde_json::from_slice(bytes).map_err(self.corrupt(name))?;
                let key = HostKey::of(&v1.host.metadata);
                let st = v1.host.status.take().unwrap_or_default();
                let record = HostRecord {
                    host: v1.host,
                    origin: v1.source,
                    agent_cert_sha256: v1.agent_cert_sha256,
                    deleted: v1.deleted,
                    ..Default::default()
                };
                let k = key.to_string();
                put(&mut hosts, k.as_str(), &record, self)?;
                put(&mut status, k.as_str(), &st, self)?;
                for (seq, e) in v1.events.iter().enumerate() {
                    let ek = event_key(&k, seq as u64);
                    put(&mut events, ek.as_str(), e, self)?;
                }
                keys.insert(name.clone(), key);
            }
            let mut hardware = txn.open_table(HARDWARE).map_err(|e| err(e.into()))?;
            for (name, bytes) in &old_hardware {
                let Some(key) = keys.get(name) else { continue };
                let mut doc: HardwareData =
                    serde_json::from_slice(bytes).map_err(self.corrupt(name))?;
                doc.metadata.namespace = Some(key.namespace.clone());
                let digest = crate::hardware::digest(&doc.spec.hardware);
                let k = key.to_string();
                put(&mut hardware, k.as_str(), &doc, self)?;
                // The record learns the digest of what it has.
                let rec_bytes = hosts
                    .get(k.as_str())
                    .map_err(|e| err(e.into()))?
                    .map(|v| v.value().to_vec());
                if let Some(rec_bytes) = rec_bytes {
                    let mut rec: HostRecord =
                        serde_json::from_slice(&rec_bytes).map_err(self.corrupt(&k))?;
                    rec.hardware_sha256 = Some(digest);
                    rec.identity = Some(crate::hardware::Identity::of(&doc.spec.hardware));
                    put(&mut hosts, k.as_str(), &rec, self)?;
                }
            }
            let mut tokens = txn.open_table(TOKENS).map_err(|e| err(e.into()))?;
            for (hash, bytes) in &old_tokens {
                let t: V1Token = serde_json::from_slice(bytes).map_err(self.corrupt(hash))?;
                let host = keys
                    .get(&t.host)
                    .cloned()
                    .unwrap_or_else(|| HostKey::default_ns(t.host.clone()));
                let record = TokenRecord {
                    host,
                    created_at: t.created_at,
                    expires_at: t.expires_at,
                    used_at: t.used_at,
                    used_by: t.used_by,
                    boot: false,
                };
                put(&mut tokens, hash.as_str(), &record, self)?;
            }
        }
        for old in [V1_HOSTS, V1_TOKENS, V1_HARDWARE] {
            txn.delete_table(old).map_err(|e| err(e.into()))?;
        }
        Ok(Some((
            old_hosts.len(),
            old_tokens.len(),
            old_hardware.len(),
        )))
    }

    fn read_table(&self, def: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let err = self.db_err("read");
        let db = self.db()?;
        let txn = db.begin_read().map_err(|e| err(e.into()))?;
        let t = txn.open_table(def).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| err(e.into()))? {
            let (k, v) = item.map_err(|e| err(e.into()))?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn write_batch(&self, batch: &Batch) -> Result<(), StoreError> {
        self.reopen_after_io_error()?;
        let result = self.try_write_batch(batch);
        if let Err(StoreError::Db { source, .. }) = &result
            && matches!(**source, redb::Error::Io(_) | redb::Error::PreviousIo)
        {
            self.needs_check
                .store(true, std::sync::atomic::Ordering::Release);
        }
        result
    }

    fn try_write_batch(&self, batch: &Batch) -> Result<(), StoreError> {
        let err = self.db_err("write");
        let db = self.db()?;
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut hosts = txn.open_table(HOSTS).map_err(|e| err(e.into()))?;
            let mut status = txn.open_table(STATUS).map_err(|e| err(e.into()))?;
            let mut events = txn.open_table(EVENTS).map_err(|e| err(e.into()))?;
            let mut hardware = txn.open_table(HARDWARE).map_err(|e| err(e.into()))?;
            let mut tokens = txn.open_table(TOKENS).map_err(|e| err(e.into()))?;
            for (key, change) in &batch.hosts {
                let k = key.to_string();
                let lo = format!("{k}\0");
                let hi = format!("{k}\u{1}");
                if change.remove {
                    hosts.remove(k.as_str()).map_err(|e| err(e.into()))?;
                    status.remove(k.as_str()).map_err(|e| err(e.into()))?;
                    hardware.remove(k.as_str()).map_err(|e| err(e.into()))?;
                    events
                        .retain_in(lo.as_str()..hi.as_str(), |_, _| false)
                        .map_err(|e| err(e.into()))?;
                }
                if let Some(r) = &change.record {
                    put(&mut hosts, k.as_str(), r, self)?;
                }
                if let Some(s) = &change.status {
                    put(&mut status, k.as_str(), s, self)?;
                }
                for (seq, e) in &change.events {
                    let ek = event_key(&k, *seq);
                    put(&mut events, ek.as_str(), e, self)?;
                }
                for seq in &change.events_dropped {
                    events
                        .remove(event_key(&k, *seq).as_str())
                        .map_err(|e| err(e.into()))?;
                }
                if change.events_keep_from > 0 {
                    let keep = event_key(&k, change.events_keep_from);
                    events
                        .retain_in(lo.as_str()..keep.as_str(), |_, _| false)
                        .map_err(|e| err(e.into()))?;
                }
                if let Some(h) = &change.hardware {
                    put(&mut hardware, k.as_str(), h, self)?;
                }
                for (hash, token) in &change.tokens {
                    match token {
                        Some(t) => tokens
                            .insert(hash.as_str(), json(t, hash, self)?.as_slice())
                            .map(|_| ()),
                        None => tokens.remove(hash.as_str()).map(|_| ()),
                    }
                    .map_err(|e| err(e.into()))?;
                }
            }
        }
        crate::failpoint::hit_tagged("store-before-commit", || batch.command_kinds());
        txn.commit().map_err(|e| err(e.into()))
    }
}

impl RedbStore {
    fn load_all(&self) -> Result<Loaded, StoreError> {
        let mut hosts = std::collections::BTreeMap::<String, StoredHost>::new();
        for (k, v) in self.read_table(HOSTS)? {
            let record: HostRecord = serde_json::from_slice(&v).map_err(self.corrupt(&k))?;
            hosts.insert(
                k,
                StoredHost {
                    record,
                    ..Default::default()
                },
            );
        }
        for (k, v) in self.read_table(STATUS)? {
            let status: HostStatus = serde_json::from_slice(&v).map_err(self.corrupt(&k))?;
            if let Some(h) = hosts.get_mut(&k) {
                h.status = status;
            }
        }
        for (k, v) in self.read_table(EVENTS)? {
            let Some((host, seq)) = k.split_once('\0') else {
                continue;
            };
            let Ok(seq) = seq.parse::<u64>() else {
                continue;
            };
            let event: EventRecord = serde_json::from_slice(&v).map_err(self.corrupt(&k))?;
            if let Some(h) = hosts.get_mut(host) {
                h.events.push((seq, event));
            }
        }
        let mut out = Loaded::default();
        for (k, mut h) in hosts {
            let Some(key) = HostKey::parse(&k) else {
                continue;
            };
            // Rows come sorted by key, so by sequence within a host.
            let extra = h.events.len().saturating_sub(EVENTS_KEPT);
            h.events.drain(..extra);
            out.hosts.push((key, h));
        }
        for (k, v) in self.read_table(TOKENS)? {
            let token: TokenRecord = serde_json::from_slice(&v).map_err(self.corrupt(&k))?;
            out.tokens.push((k, token));
        }
        Ok(out)
    }
}

fn json<T: serde::Serialize>(v: &T, key: &str, s: &RedbStore) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(s.corrupt(key))
}

/// Writes `value` as JSON under `key`.
fn put<T: serde::Serialize>(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    value: &T,
    s: &RedbStore,
) -> Result<(), StoreError> {
    let bytes = json(value, key, s)?;
    table
        .insert(key, bytes.as_slice())
        .map(|_| ())
        .map_err(|e| (s.db_err("write"))(e.into()))
}

impl StateStore for RedbStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load_all())) {
            Ok(r) => r,
            Err(_) => Err(StoreError::Damaged {
                path: self.path.clone(),
            }),
        }
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), Failed> {
        let written =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.write_batch(batch)))
                .unwrap_or_else(|_| {
                    Err(StoreError::Damaged {
                        path: self.path.clone(),
                    })
                });
        written.map_err(|e| {
            let reason = crate::error_chain(&e);
            batch
                .hosts
                .iter()
                .map(|(k, _)| (k.clone(), reason.clone()))
                .collect()
        })
    }
}

impl HardwareStore for RedbStore {
    fn hardware(&self, key: &HostKey) -> Result<Option<HardwareData>, StoreError> {
        let err = self.db_err("read");
        let db = self.db()?;
        let txn = db.begin_read().map_err(|e| err(e.into()))?;
        let t = txn.open_table(HARDWARE).map_err(|e| err(e.into()))?;
        let k = key.to_string();
        let Some(v) = t.get(k.as_str()).map_err(|e| err(e.into()))? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(self.corrupt(&k))
    }

    fn all_hardware(&self) -> Result<Vec<HardwareData>, StoreError> {
        self.read_table(HARDWARE)?
            .into_iter()
            .map(|(k, v)| serde_json::from_slice(&v).map_err(self.corrupt(&k)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::HostChange;
    use jiff::Timestamp;

    fn record(name: &str, ns: Option<&str>) -> HostRecord {
        let mut r = HostRecord {
            origin: "hosts/a.yaml".into(),
            ..Default::default()
        };
        r.host.metadata.name = name.into();
        r.host.metadata.namespace = ns.map(str::to_string);
        r
    }

    fn event(n: u64) -> EventRecord {
        EventRecord {
            time: Timestamp::UNIX_EPOCH,
            warning: false,
            reason: "R".into(),
            message: n.to_string(),
        }
    }

    #[test]
    fn hosts_survive_reopen_events_roll_and_removal_takes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostKey::default_ns("a");
        let b = HostKey::new("team-b", "a");
        let hw = HardwareData::new(
            &a,
            crate::hardware::Hardware::default(),
            Timestamp::UNIX_EPOCH,
            "inspect",
        );
        let tok = TokenRecord {
            host: b.clone(),
            created_at: Timestamp::UNIX_EPOCH,
            expires_at: Timestamp::MAX,
            used_at: None,
            used_by: None,
            boot: false,
        };
        let status = HostStatus {
            error_count: 3,
            ..Default::default()
        };
        {
            let mut store = RedbStore::open(dir.path()).unwrap();
            let events: Vec<_> = (0..60).map(|n| (n, event(n))).collect();
            store
                .commit(&Batch {
                    id: 1,
                    hosts: vec![
                        (
                            a.clone(),
                            HostChange {
                                record: Some(record("a", None)),
                                status: Some(status.clone()),
                                events: events.clone(),
                                events_keep_from: 10,
                                hardware: Some(hw.clone()),
                                ..Default::default()
                            },
                        ),
                        (
                            b.clone(),
                            HostChange {
                                record: Some(record("a", Some("team-b"))),
                                events: events[..3].to_vec(),
                                tokens: vec![("h1".into(), Some(tok.clone()))],
                                ..Default::default()
                            },
                        ),
                    ],
                })
                .unwrap();
        }
        let mut store = RedbStore::open(dir.path()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.hosts.len(), 2, "two namespaces may each have host a");
        let (ka, ha) = &loaded.hosts[0];
        assert_eq!(ka, &a);
        assert_eq!(ha.status, status);
        assert_eq!(ha.events.len(), EVENTS_KEPT);
        assert_eq!(ha.events[0].0, 10, "events before keep_from were dropped");
        assert_eq!(loaded.tokens, vec![("h1".to_string(), tok)]);
        assert_eq!(store.hardware(&a).unwrap(), Some(hw));
        assert_eq!(store.hardware(&b).unwrap(), None);
        store
            .commit(&Batch {
                id: 2,
                hosts: vec![(
                    a.clone(),
                    HostChange {
                        remove: true,
                        ..Default::default()
                    },
                )],
            })
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.hosts.len(), 1);
        assert_eq!(loaded.hosts[0].0, b);
        assert_eq!(loaded.hosts[0].1.events.len(), 3);
        assert_eq!(store.hardware(&a).unwrap(), None);
        assert!(store.read_table(EVENTS).unwrap().len() == 3);
    }

    /// A state directory written by the format-1 code (one record per bare name) is migrated.
    #[test]
    fn format_1_state_is_migrated_with_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slipway.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut hosts = txn.open_table(V1_HOSTS).unwrap();
                hosts
                    .insert(
                        "node-1",
                        serde_json::json!({
                            "host": {"apiVersion": "metal3.io/v1alpha1", "kind": "BareMetalHost",
                                     "metadata": {"name": "node-1", "namespace": "team-a"},
                                     "spec": {"online": true},
                                     "status": {"provisioning": {"state": "provisioned"},
                                                "operationalStatus": "OK", "errorCount": 0,
                                                "poweredOn": true}},
                            "source": "hosts/n.yaml",
                            "agentCertSha256": "ab",
                            "events": [{"time": "2026-01-01T00:00:00Z", "reason": "Enrolled",
                                        "message": "m"}]
                        })
                        .to_string()
                        .as_bytes(),
                    )
                    .unwrap();
                hosts
                    .insert(
                        "node-2",
                        serde_json::json!({"host": {"apiVersion": "", "kind": "",
                            "metadata": {"name": "node-2"}}})
                        .to_string()
                        .as_bytes(),
                    )
                    .unwrap();
                let mut tokens = txn.open_table(V1_TOKENS).unwrap();
                tokens
                    .insert(
                        "hash",
                        serde_json::json!({"host": "node-1",
                            "createdAt": "2026-01-01T00:00:00Z",
                            "expiresAt": "2026-01-01T01:00:00Z"})
                        .to_string()
                        .as_bytes(),
                    )
                    .unwrap();
                let mut hw = txn.open_table(V1_HARDWARE).unwrap();
                let doc = HardwareData::new(
                    &HostKey::default_ns("node-1"),
                    crate::hardware::Hardware::default(),
                    Timestamp::UNIX_EPOCH,
                    "hello",
                );
                hw.insert("node-1", serde_json::to_vec(&doc).unwrap().as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let mut store = RedbStore::open(dir.path()).unwrap();
        let loaded = store.load().unwrap();
        let keys: Vec<_> = loaded.hosts.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(keys, ["default/node-2", "team-a/node-1"]);
        let n1 = &loaded.hosts[1].1;
        assert_eq!(n1.status.state().to_string(), "provisioned");
        assert_eq!(n1.record.agent_cert_sha256.as_deref(), Some("ab"));
        assert_eq!(n1.record.origin, "hosts/n.yaml");
        assert!(n1.record.hardware_sha256.is_some());
        assert_eq!(n1.events.len(), 1);
        assert_eq!(loaded.tokens[0].1.host, HostKey::new("team-a", "node-1"));
        let team_a = HostKey::new("team-a", "node-1");
        assert_eq!(store.hardware(&team_a).unwrap().unwrap().key(), team_a);
        drop(store);
        // Opening again finds format 2 and changes nothing.
        let mut again = RedbStore::open(dir.path()).unwrap();
        assert_eq!(again.load().unwrap().hosts.len(), 2);
    }

    /// A zero-byte or damaged file is refused with a message naming it: never an empty
    /// store, never a panic.
    #[test]
    fn empty_and_damaged_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slipway.redb");
        std::fs::write(&path, b"").unwrap();
        let e = RedbStore::open(dir.path()).err().expect("refused");
        let text = crate::error_chain(&e);
        assert!(
            text.contains("slipway.redb")
                && text.contains("empty (0 bytes)")
                && text.contains("backup"),
            "{text}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left as it was");

        // A store with hosts, then garbage over every page after the header.
        std::fs::remove_file(&path).unwrap();
        {
            let mut store = RedbStore::open(dir.path()).unwrap();
            let hosts = (0..200)
                .map(|i| {
                    (
                        HostKey::default_ns(format!("h{i}")),
                        HostChange {
                            record: Some(record(&format!("h{i}"), None)),
                            status: Some(HostStatus::default()),
                            ..Default::default()
                        },
                    )
                })
                .collect();
            store.commit(&Batch { id: 1, hosts }).unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let mut x = 7u64;
        for b in bytes.iter_mut().skip(4096) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(&path, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| match RedbStore::open(dir.path()) {
            Err(e) => Err(crate::error_chain(&e)),
            Ok(mut s) => s
                .load()
                .map(|l| l.hosts.len())
                .map_err(|e| crate::error_chain(&e)),
        });
        let text = outcome
            .expect("no panic")
            .expect_err("a damaged store is not read as good");
        assert!(text.contains("slipway.redb"), "{text}");
    }
}
