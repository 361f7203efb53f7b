//! The embedded store of files mode: one redb file, `STATE/slipway.redb`.
//!
//! It holds what Slipway observed (each host's status, its current agent certificate, recent
//! events), each host's full inventory (`HardwareData`) and the bootstrap tokens (by hash; the token itself is never stored). The spec is
//! stored too, so a restarted coordinator can tell what changed in the hosts directory while
//! it was down.
//!
//! Invariant: only the controller writes, in one transaction per batch of events, and it
//! commits before it acts on what it wrote (sends commands, answers enrolments). redb commits
//! are durable, so a SIGKILL loses at most the batch in flight, never a half-written record.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use slipway_reconcile::host::BareMetalHost;

use crate::hardware::HardwareData;

const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Each host's full inventory (a metal3 HardwareData document), apart from the host record so
/// the frequent writes of a host's status do not rewrite it.
const HARDWARE: TableDefinition<&str, &[u8]> = TableDefinition::new("hardware");

/// How many events a host keeps for `describe`.
pub const EVENTS_KEPT: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("the state database {} refused a {action}", path.display())]
    Db {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("record {key:?} in {} is corrupt", path.display())]
    Corrupt {
        key: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Everything Slipway keeps about one host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    /// The accepted spec and metadata, and the status Slipway wrote.
    pub host: BareMetalHost,
    /// Where the spec came from (file path, or `kube` later).
    #[serde(default)]
    pub source: String,
    /// Hex SHA-256 of the host's newest agent certificate; older ones are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cert_sha256: Option<String>,
    /// The source no longer declares the host; it is on its way out.
    #[serde(default)]
    pub deleted: bool,
    /// Recent events, oldest first.
    #[serde(default)]
    pub events: Vec<EventRecord>,
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

impl HostRecord {
    pub fn push_event(&mut self, event: EventRecord) {
        self.events.push(event);
        if self.events.len() > EVENTS_KEPT {
            let extra = self.events.len() - EVENTS_KEPT;
            self.events.drain(..extra);
        }
    }
}

/// A bootstrap token, stored under the hex SHA-256 of its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub host: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<Timestamp>,
    /// The peer that used it, for the refusal message of a second use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
}

/// Changes to write in one transaction. `None` deletes.
#[derive(Debug, Default)]
pub struct Batch {
    pub hosts: Vec<(String, Option<HostRecord>)>,
    pub tokens: Vec<(String, Option<TokenRecord>)>,
    pub hardware: Vec<(String, Option<HardwareData>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.tokens.is_empty() && self.hardware.is_empty()
    }
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `dir/slipway.redb`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("slipway.redb");
        let db = Database::create(&path).map_err(|e| StoreError::Open {
            path: path.clone(),
            source: Box::new(e.into()),
        })?;
        let store = Store { db, path };
        // Create the tables so readers never meet a missing one.
        store.write(Batch::default())?;
        Ok(store)
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

    pub fn load_hosts(&self) -> Result<Vec<(String, HostRecord)>, StoreError> {
        self.load(HOSTS)
    }

    pub fn load_tokens(&self) -> Result<Vec<(String, TokenRecord)>, StoreError> {
        self.load(TOKENS)
    }

    pub fn load_hardware(&self) -> Result<Vec<(String, HardwareData)>, StoreError> {
        self.load(HARDWARE)
    }

    fn load<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let err = self.db_err("read");
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(table).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| err(e.into()))? {
            let (k, v) = item.map_err(|e| err(e.into()))?;
            let key = k.value().to_string();
            let value =
                serde_json::from_slice(v.value()).map_err(|source| StoreError::Corrupt {
                    key: key.clone(),
                    path: self.path.clone(),
                    source,
                })?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Writes a batch atomically and durably.
    pub fn write(&self, batch: Batch) -> Result<(), StoreError> {
        let err = self.db_err("write");
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        self.put_all(&txn, HOSTS, &batch.hosts)?;
        self.put_all(&txn, TOKENS, &batch.tokens)?;
        self.put_all(&txn, HARDWARE, &batch.hardware)?;
        txn.commit().map_err(|e| err(e.into()))
    }
}

impl Store {
    /// Writes (or with `None`, deletes) records of one table inside `txn`.
    fn put_all<T: Serialize>(
        &self,
        txn: &redb::WriteTransaction,
        table: TableDefinition<&str, &[u8]>,
        records: &[(String, Option<T>)],
    ) -> Result<(), StoreError> {
        let err = self.db_err("write");
        let mut t = txn.open_table(table).map_err(|e| err(e.into()))?;
        for (key, record) in records {
            match record {
                Some(r) => {
                    let bytes = serde_json::to_vec(r).map_err(|source| StoreError::Corrupt {
                        key: key.clone(),
                        path: self.path.clone(),
                        source,
                    })?;
                    t.insert(key.as_str(), bytes.as_slice())
                        .map_err(|e| err(e.into()))?;
                }
                None => {
                    t.remove(key.as_str()).map_err(|e| err(e.into()))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = HostRecord {
            source: "hosts/a.yaml".into(),
            ..Default::default()
        };
        rec.host.metadata.name = "a".into();
        let mut hardware = crate::hardware::Hardware::default();
        hardware.cpu.count = 8;
        hardware.memory.dimms.push(crate::hardware::Dimm {
            locator: "A1".into(),
            size_mebibytes: 32768,
            ..Default::default()
        });
        let hw = HardwareData::new("a", hardware, Timestamp::UNIX_EPOCH, "inspect");
        let tok = TokenRecord {
            host: "a".into(),
            created_at: Timestamp::UNIX_EPOCH,
            expires_at: Timestamp::MAX,
            used_at: None,
            used_by: None,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .write(Batch {
                    hosts: vec![
                        ("a".into(), Some(rec.clone())),
                        ("b".into(), Some(rec.clone())),
                    ],
                    tokens: vec![("h1".into(), Some(tok.clone()))],
                    hardware: vec![
                        ("a".into(), Some(hw.clone())),
                        ("b".into(), Some(hw.clone())),
                    ],
                })
                .unwrap();
            store
                .write(Batch {
                    hosts: vec![("b".into(), None)],
                    hardware: vec![("b".into(), None)],
                    ..Default::default()
                })
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load_hosts().unwrap(), vec![("a".to_string(), rec)]);
        assert_eq!(store.load_tokens().unwrap(), vec![("h1".to_string(), tok)]);
        assert_eq!(store.load_hardware().unwrap(), vec![("a".to_string(), hw)]);
    }

    #[test]
    fn events_are_capped() {
        let mut rec = HostRecord::default();
        for i in 0..(EVENTS_KEPT + 5) {
            rec.push_event(EventRecord {
                time: Timestamp::UNIX_EPOCH,
                warning: false,
                reason: "R".into(),
                message: i.to_string(),
            });
        }
        assert_eq!(rec.events.len(), EVENTS_KEPT);
        assert_eq!(rec.events[0].message, "5");
    }
}
