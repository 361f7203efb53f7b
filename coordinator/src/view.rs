//! What clients read (`slipway get hosts`, `describe`, the admin API): a copy of each host's
//! declaration, status and recent events, replaced host by host as the engine changes them
//! (progress included, before it is durable), never rebuilt whole.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use slipway_reconcile::host::{BareMetalHost, HostKey, HostSpec, HostStatus, ObjectMeta};

use crate::sources::Problem;
use crate::state::{EventRecord, HostRecord};

/// A host as the admin API sends it and the CLI reads it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostView {
    /// Metadata, spec and status.
    pub host: BareMetalHost,
    /// Where the declaration came from (a file path, `discovered`).
    pub source: String,
    pub deleted: bool,
    /// Recent events, oldest first (shared with the engine's copy).
    pub events: Vec<Arc<EventRecord>>,
    /// The source's problems with this host's documents (one that no longer parses, a
    /// second declaration): the host keeps its last good declaration meanwhile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

impl HostView {
    pub fn key(&self) -> HostKey {
        HostKey::of(&self.host.metadata)
    }
}

/// A host in the view: the engine's own record, status and events, shared rather than copied
/// (the engine replaces them when they change). Serialises as a [`HostView`].
#[derive(Clone, Debug)]
pub struct SharedHost {
    pub record: Arc<HostRecord>,
    pub status: Arc<HostStatus>,
    pub events: Vec<Arc<EventRecord>>,
}

impl SharedHost {
    pub fn key(&self) -> HostKey {
        HostKey::of(&self.record.host.metadata)
    }
}

impl Serialize for SharedHost {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Host<'a> {
            api_version: &'a str,
            kind: &'a str,
            metadata: &'a ObjectMeta,
            spec: &'a HostSpec,
            status: &'a HostStatus,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct View<'a> {
            host: Host<'a>,
            source: &'a str,
            deleted: bool,
            events: &'a [Arc<EventRecord>],
        }
        let h = &self.record.host;
        View {
            host: Host {
                api_version: &h.api_version,
                kind: &h.kind,
                metadata: &h.metadata,
                spec: &h.spec,
                status: &self.status,
            },
            source: &self.record.origin,
            deleted: self.record.deleted,
            events: &self.events,
        }
        .serialize(s)
    }
}

#[derive(Debug, Default)]
pub struct View {
    pub hosts: BTreeMap<HostKey, Arc<SharedHost>>,
    /// The source's problems (documents that do not parse, ...).
    pub problems: Vec<Problem>,
    /// The engine has loaded its state and the source has listed every host once.
    pub ready: bool,
}

pub type SharedView = Arc<RwLock<View>>;

impl View {
    /// The source's problems that name host `key` (problems carry the bare name, since a
    /// document that does not parse may not say its namespace).
    pub fn problems_of(&self, key: &HostKey) -> Vec<Problem> {
        self.problems
            .iter()
            .filter(|p| p.host.as_deref() == Some(key.name.as_str()))
            .cloned()
            .collect()
    }

    /// Problems naming a host called `name` that the view does not hold (its only document
    /// does not parse): what `describe` says instead of "not found".
    pub fn problems_named(&self, name: &str) -> Vec<Problem> {
        let bare = name.rsplit('/').next().unwrap_or(name);
        self.problems
            .iter()
            .filter(|p| p.host.as_deref() == Some(bare))
            .cloned()
            .collect()
    }
}

/// Finds a host by `NAME`, `NAMESPACE/NAME`, or `NAME` in `namespace`. A bare name that
/// exists in several namespaces is an error naming them.
pub fn find<'a, T>(
    hosts: &'a BTreeMap<HostKey, T>,
    namespace: Option<&str>,
    name: &str,
) -> Result<(&'a HostKey, &'a T), String> {
    if let Some((ns, n)) = name.split_once('/') {
        let key = HostKey::new(ns, n);
        return hosts
            .get_key_value(&key)
            .ok_or_else(|| format!("host {key} not found"));
    }
    if let Some(ns) = namespace {
        let key = HostKey::new(ns, name);
        return hosts
            .get_key_value(&key)
            .ok_or_else(|| format!("host {name} not found in namespace {ns}"));
    }
    let found: Vec<_> = hosts.iter().filter(|(k, _)| k.name == name).collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(format!("host {name} not found")),
        many => Err(format!(
            "host {name} exists in namespaces {}: say which, as NAMESPACE/{name} or with \
             --namespace",
            many.iter()
                .map(|(k, _)| k.namespace.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_host_serialises_as_a_host_view() {
        let mut record = HostRecord {
            origin: "hosts/a.yaml".into(),
            ..Default::default()
        };
        record.host.api_version = "metal3.io/v1alpha1".into();
        record.host.kind = "BareMetalHost".into();
        record.host.metadata.name = "a".into();
        record.host.spec.online = true;
        let status = HostStatus {
            error_count: 2,
            ..Default::default()
        };
        let shared = SharedHost {
            record: Arc::new(record.clone()),
            status: Arc::new(status.clone()),
            events: vec![Arc::new(EventRecord {
                time: jiff::Timestamp::UNIX_EPOCH,
                warning: false,
                reason: "R".into(),
                message: "m".into(),
            })],
        };
        let json = serde_json::to_value(&shared).unwrap();
        let back: HostView = serde_json::from_value(json).unwrap();
        let mut host = record.host;
        host.status = Some(status);
        assert_eq!(back.host, host);
        assert_eq!(back.source, "hosts/a.yaml");
        assert_eq!(back.events[0].message, "m");
    }

    #[test]
    fn bare_names_resolve_when_unique() {
        let mut m = BTreeMap::new();
        m.insert(HostKey::new("a", "node-1"), 1);
        m.insert(HostKey::new("b", "node-1"), 2);
        m.insert(HostKey::new("b", "node-2"), 3);
        assert_eq!(*find(&m, None, "node-2").unwrap().1, 3);
        assert_eq!(*find(&m, None, "a/node-1").unwrap().1, 1);
        assert_eq!(*find(&m, Some("b"), "node-1").unwrap().1, 2);
        let e = find(&m, None, "node-1").unwrap_err();
        assert!(e.contains("namespaces a, b"), "{e}");
        assert!(find(&m, None, "node-3").unwrap_err().contains("not found"));
        assert!(find(&m, Some("a"), "node-2").is_err());
    }
}
