//! Where host declarations come from. A source tells the engine what changed, host by host
//! ([`SourceEvent`]): a host declared or changed, a host no longer declared, a Secret's keys
//! changed, the source's own problems; never whole snapshots. Secret contents stay with the
//! source and are read through [`SecretSource`] only when a command needs them.
//!
//! Files mode is [`files`]; Kubernetes mode is [`kube`], sending the same events.
//! **Invariant:** no module outside `sources::files` knows the files source; `serve` only
//! starts it. Only `sources::kube`, `state::kube` and `crd` know Kubernetes.

pub mod files;
pub mod kube;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use slipway_reconcile::host::{BareMetalHost, HostKey};

/// A Secret's identity: its namespace and name (the same shape as a host's).
pub type SecretKey = HostKey;

/// What changed in a source.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceEvent {
    /// A host is declared, or its declaration changed. `origin` says where (a file path).
    /// `host.status`, when set, is a status to adopt if the host is new to Slipway (metal3's
    /// `baremetalhost.metal3.io/status` annotation of a host moved into a cluster); it is
    /// ignored for a host Slipway already has.
    Declared {
        key: HostKey,
        host: Box<BareMetalHost>,
        origin: String,
    },
    /// A host the source declared before is no longer declared.
    Undeclared { key: HostKey },
    /// The host is declared more than once (`why` names each place; `field`
    /// `metadata.name`), or its declaration no longer parses (Kubernetes mode: `why` names the
    /// field; `field` `spec`), or (`None`) no longer is. While it is, the host keeps its last
    /// declaration and is held with a registration error; it counts as declared.
    Conflict {
        key: HostKey,
        field: &'static str,
        why: Option<String>,
    },
    /// A Secret appeared, changed, or (`keys: None`) disappeared; with its key names only.
    Secret {
        key: SecretKey,
        keys: Option<BTreeSet<String>>,
    },
    /// The source's problems now (documents that do not parse, ...), replacing the last list.
    Problems(Vec<Problem>),
    /// The source's first full listing is complete: hosts stored but not declared since the
    /// start are no longer declared.
    Synced,
}

/// A `v1 Secret` (BMC credentials, userData, networkData, metaData). `Debug` shows key
/// names, never values.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret {
    pub name: String,
    pub namespace: Option<String>,
    /// Decoded values of `data` and `stringData` (stringData wins, as in Kubernetes).
    pub data: BTreeMap<String, Vec<u8>>,
}

impl Secret {
    pub fn key(&self) -> SecretKey {
        HostKey::new(
            self.namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or(slipway_reconcile::host::DEFAULT_NAMESPACE),
            self.name.clone(),
        )
    }

    /// The names of the keys that hold something (an empty value counts as missing, as
    /// metal3 counts an empty username).
    pub fn key_names(&self) -> BTreeSet<String> {
        self.data
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Secret contents, read at the moment a command that carries them is sent.
pub trait SecretSource: Send + Sync + 'static {
    fn get(&self, key: &SecretKey) -> Option<Secret>;
}

/// Secrets held in memory (tests, and sources that keep contents themselves).
#[derive(Debug, Default)]
pub struct MemorySecrets(pub std::sync::RwLock<BTreeMap<SecretKey, Secret>>);

impl MemorySecrets {
    pub fn put(&self, secret: Secret) {
        let mut m = self.0.write().unwrap_or_else(|p| p.into_inner());
        m.insert(secret.key(), secret);
    }
}

impl SecretSource for MemorySecrets {
    fn get(&self, key: &SecretKey) -> Option<Secret> {
        let m = self.0.read().unwrap_or_else(|p| p.into_inner());
        m.get(key).cloned()
    }
}

/// Something wrong in a source (a document that does not parse, ...).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// The file (or object) concerned.
    pub path: PathBuf,
    /// 1-based document number, 0 for the whole file.
    pub document: usize,
    /// The host concerned, when its name could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// True when nothing is lost (e.g. an ignored kind); false for errors.
    #[serde(default)]
    pub warning: bool,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
        }
        if let Some(host) = &self.host {
            write!(f, " (host {host})")?;
        }
        write!(f, ": {}", self.message)
    }
}
