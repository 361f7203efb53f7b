//! Kubernetes mode's source: BareMetalHosts and Secrets, watched in every namespace with
//! kube-runtime's watcher (relists and backoff are its business), turned into the same
//! per-host [`SourceEvent`]s the files source sends.
//!
//! - A BareMetalHost is read as raw JSON and parsed on its own: one object that does not
//!   parse is a [`Problem`] naming it (and a Warning Event on it), and its host keeps its
//!   last good declaration; the watch goes on for the others.
//! - Only changes of what the engine plans from (metadata Slipway reads, spec) are sent:
//!   Slipway's own status writes come back through the watch and are dropped here, so they
//!   never cause a replan.
//! - A host with a deletion timestamp is no longer declared: the engine deprovisions it and,
//!   once its removal is stored, the store takes off the finalizer ([`FINALIZER`], metal3's
//!   own, which this source puts on every host it sees without one).
//! - Secrets' key names go to the engine; their contents stay in [`KubeSecrets`], read when a
//!   command needs them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use slipway_reconcile::annotations;
use slipway_reconcile::host::{BareMetalHost, HostKey, HostStatus};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Problem, Secret, SecretKey, SecretSource, SourceEvent};

/// The finalizer on every BareMetalHost Slipway manages (metal3's own name, so hosts moved
/// between metal3 and Slipway keep theirs).
pub const FINALIZER: &str = "baremetalhost.metal3.io";
/// The records' origin for hosts declared in the cluster.
pub const ORIGIN: &str = "kubernetes";
/// The field manager of every write Slipway makes.
pub const FIELD_MANAGER: &str = "slipway";

/// metal3's BareMetalHost, as a dynamic resource (parsed by Slipway's own types, object by
/// object).
pub fn host_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("metal3.io", "v1alpha1", "BareMetalHost"),
        "baremetalhosts",
    )
}

/// metal3's HardwareData.
pub fn hardware_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("metal3.io", "v1alpha1", "HardwareData"),
        "hardwaredata",
    )
}

/// Secret contents as last seen by the watch.
#[derive(Debug, Default)]
pub struct KubeSecrets(RwLock<BTreeMap<SecretKey, Secret>>);

impl SecretSource for KubeSecrets {
    fn get(&self, key: &SecretKey) -> Option<Secret> {
        let m = self.0.read().unwrap_or_else(|p| p.into_inner());
        m.get(key).cloned()
    }
}

/// A BareMetalHost object as the engine sees it, or why it cannot be read.
pub fn parse_host(obj: &DynamicObject) -> Result<BareMetalHost, String> {
    let mut value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    if let Some(map) = value.as_object_mut() {
        map.remove("status");
        map.entry("apiVersion")
            .or_insert_with(|| slipway_reconcile::host::API_VERSION.into());
        map.entry("kind")
            .or_insert_with(|| slipway_reconcile::host::KIND.into());
    }
    let mut host: BareMetalHost = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = super::files::plain_error(&e.into_inner().to_string());
        if path == "." || path.is_empty() {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })?;
    host.status = adopted_status(obj)?;
    Ok(host)
}

/// The status to adopt if the host is new to the engine: the object's own status (a host
/// whose object did not parse when the coordinator started, an object restored from a
/// backup), else metal3's `baremetalhost.metal3.io/status` annotation (JSON of the status,
/// as `clusterctl move` and `slipway move` write it) of a host moved into the cluster.
fn adopted_status(obj: &DynamicObject) -> Result<Option<HostStatus>, String> {
    if let Some(status) = obj
        .data
        .get("status")
        .filter(|s| s.as_object().is_some_and(|s| !s.is_empty()))
    {
        let mut status = status.clone();
        crate::state::kube::drop_nulls(&mut status);
        // One that does not parse is no declaration error: the host starts over.
        return Ok(serde_json::from_value(status).ok());
    }
    let Some(text) = obj.annotations().get(annotations::STATUS) else {
        return Ok(None);
    };
    let mut value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "metadata.annotations[{}]: not JSON ({e}); fix or remove the annotation",
            annotations::STATUS
        )
    })?;
    crate::state::kube::drop_nulls(&mut value);
    serde_path_to_error::deserialize(value)
        .map(Some)
        .map_err(|e| {
            let path = e.path().to_string();
            format!(
                "metadata.annotations[{}]: {path}: {}; fix or remove the annotation",
                annotations::STATUS,
                super::files::plain_error(&e.into_inner().to_string())
            )
        })
}

fn key_of(obj: &impl ResourceExt) -> HostKey {
    HostKey::new(
        obj.namespace()
            .unwrap_or_else(|| slipway_reconcile::host::DEFAULT_NAMESPACE.into()),
        obj.name_any(),
    )
}

fn secret_of(obj: &KubeSecret) -> Secret {
    let mut data = BTreeMap::new();
    for (k, v) in obj.data.iter().flatten() {
        data.insert(k.clone(), v.0.clone());
    }
    for (k, v) in obj.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone().into_bytes());
    }
    Secret {
        name: obj.name_any(),
        namespace: obj.namespace(),
        data,
    }
}

/// The label of the BareMetalHosts Slipway writes for machines that booted undeclared
/// (`--unknown-hosts discover`): state unmanaged, operational status discovered. They are
/// Slipway's own records, shown in the cluster: not declarations. Deleting one forgets the
/// machine; declaring a BareMetalHost with its MAC claims it (the discovered one goes).
pub const DISCOVERED_LABEL: &str = "slipway.io/discovered";

/// Whether the object is one of Slipway's discovered hosts.
pub fn is_discovered(obj: &impl ResourceExt) -> bool {
    obj.labels()
        .get(DISCOVERED_LABEL)
        .is_some_and(|v| v == "true")
}

/// The per-host state of the watch: what was last sent for each host, and the objects that do
/// not parse.
#[derive(Default)]
struct Hosts {
    sent: HashMap<HostKey, BareMetalHost>,
    deleting: HashSet<HostKey>,
    /// Discovered hosts' objects seen (never declared).
    discovered: HashSet<HostKey>,
    problems: BTreeMap<HostKey, Problem>,
    /// Keys listed since the watch (re)started, until its listing is done.
    listing: Option<HashSet<HostKey>>,
    synced: bool,
}

impl Hosts {
    /// The events for one object seen (added, changed, or listed).
    fn applied(&mut self, obj: &DynamicObject, out: &mut Vec<SourceEvent>) {
        let key = key_of(obj);
        if let Some(l) = &mut self.listing {
            l.insert(key.clone());
        }
        if is_discovered(obj) {
            self.discovered.insert(key);
            return;
        }
        let problems_before = self.problems.len();
        let problem_changed;
        match parse_host(obj) {
            Err(message) => {
                let p = Problem {
                    path: PathBuf::from(format!("BareMetalHost {key}")),
                    document: 0,
                    host: Some(key.to_string()),
                    warning: false,
                    message: format!(
                        "{message}; the host keeps its last good spec until the object is fixed"
                    ),
                };
                problem_changed = self.problems.get(&key) != Some(&p);
                self.problems.insert(key.clone(), p);
                // A host declared before: held, with the error in its status, on its last
                // good spec.
                if problem_changed && self.sent.contains_key(&key) {
                    out.push(SourceEvent::Conflict {
                        key: key.clone(),
                        field: "spec",
                        why: Some(format!(
                            "the object no longer parses ({message}): Slipway holds the host on \
                             its last good spec until the object is fixed"
                        )),
                    });
                }
            }
            Ok(mut host) => {
                problem_changed = self.problems.remove(&key).is_some();
                if problem_changed {
                    out.push(SourceEvent::Conflict {
                        key: key.clone(),
                        field: "spec",
                        why: None,
                    });
                }
                if obj.metadata.deletion_timestamp.is_some() {
                    if self.deleting.insert(key.clone()) {
                        self.sent.remove(&key);
                        out.push(SourceEvent::Undeclared { key: key.clone() });
                    }
                } else {
                    self.deleting.remove(&key);
                    // The status to adopt is not part of the declaration: a status written
                    // is no change.
                    let adopted = host.status.take();
                    if self.sent.get(&key) != Some(&host) {
                        self.sent.insert(key.clone(), host.clone());
                        host.status = adopted;
                        out.push(SourceEvent::Declared {
                            key: key.clone(),
                            host: Box::new(host),
                            origin: ORIGIN.into(),
                        });
                    }
                }
            }
        }
        if problem_changed || problems_before != self.problems.len() {
            out.push(self.problems_event());
        }
    }

    fn deleted(&mut self, key: &HostKey, out: &mut Vec<SourceEvent>) {
        let was_problem = self.problems.remove(key).is_some();
        self.deleting.remove(key);
        // A discovered host's object deleted: the operator forgets the machine.
        if self.sent.remove(key).is_some() || self.discovered.remove(key) {
            out.push(SourceEvent::Undeclared { key: key.clone() });
        }
        if was_problem {
            out.push(self.problems_event());
        }
    }

    fn problems_event(&self) -> SourceEvent {
        SourceEvent::Problems(self.problems.values().cloned().collect())
    }

    /// The listing of a (re)started watch is complete: hosts not in it are gone.
    fn listed(&mut self, out: &mut Vec<SourceEvent>) {
        if let Some(seen) = self.listing.take() {
            let gone: Vec<HostKey> = self
                .sent
                .keys()
                .chain(self.problems.keys())
                .chain(self.deleting.iter())
                .chain(self.discovered.iter())
                .filter(|k| !seen.contains(*k))
                .cloned()
                .collect();
            for key in gone {
                self.deleted(&key, out);
            }
        }
    }
}

/// The Secrets' key names as last sent.
#[derive(Default)]
struct Secrets {
    keys: HashMap<SecretKey, BTreeSet<String>>,
    listing: Option<HashSet<SecretKey>>,
    synced: bool,
}

impl Secrets {
    fn applied(&mut self, shared: &KubeSecrets, obj: &KubeSecret, out: &mut Vec<SourceEvent>) {
        let secret = secret_of(obj);
        let key = secret.key();
        if let Some(l) = &mut self.listing {
            l.insert(key.clone());
        }
        let names = secret.key_names();
        {
            let mut m = shared.0.write().unwrap_or_else(|p| p.into_inner());
            m.insert(key.clone(), secret);
        }
        if self.keys.get(&key) != Some(&names) {
            self.keys.insert(key.clone(), names.clone());
            out.push(SourceEvent::Secret {
                key,
                keys: Some(names),
            });
        }
    }

    fn deleted(&mut self, shared: &KubeSecrets, key: &SecretKey, out: &mut Vec<SourceEvent>) {
        shared
            .0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if self.keys.remove(key).is_some() {
            out.push(SourceEvent::Secret {
                key: key.clone(),
                keys: None,
            });
        }
    }

    fn listed(&mut self, shared: &KubeSecrets, out: &mut Vec<SourceEvent>) {
        if let Some(seen) = self.listing.take() {
            let gone: Vec<SecretKey> = self
                .keys
                .keys()
                .filter(|k| !seen.contains(*k))
                .cloned()
                .collect();
            for key in gone {
                self.deleted(shared, &key, out);
            }
        }
    }
}

/// Starts watching; events go to `tx`. Returns the Secrets' contents.
pub fn spawn(client: Client, tx: mpsc::Sender<SourceEvent>) -> Arc<KubeSecrets> {
    let shared = Arc::new(KubeSecrets::default());
    let secrets_shared = shared.clone();
    tokio::spawn(async move {
        let hosts_api: Api<DynamicObject> = Api::all_with(client.clone(), &host_resource());
        let secrets_api: Api<KubeSecret> = Api::all(client.clone());
        let mut host_events = watcher::watcher(hosts_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut secret_events = watcher::watcher(secrets_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut hosts = Hosts::default();
        let mut secrets = Secrets::default();
        let mut sent_synced = false;
        loop {
            let mut out = Vec::new();
            tokio::select! {
                e = host_events.next() => match e {
                    None => return,
                    Some(Err(e)) => warn!("watching BareMetalHosts: {e} (retrying)"),
                    Some(Ok(event)) => match event {
                        Event::Init => hosts.listing = Some(HashSet::new()),
                        Event::InitApply(obj) | Event::Apply(obj) => {
                            hosts.applied(&obj, &mut out);
                            if hosts.problems.contains_key(&key_of(&obj)) {
                                let message = hosts.problems[&key_of(&obj)].message.clone();
                                let declared = hosts.sent.contains_key(&key_of(&obj));
                                tokio::spawn(warn_event(
                                    client.clone(),
                                    obj.clone(),
                                    message,
                                    declared,
                                ));
                            } else if obj.metadata.deletion_timestamp.is_none()
                                && !is_discovered(&obj)
                                && !obj.finalizers().iter().any(|f| f == FINALIZER)
                            {
                                tokio::spawn(add_finalizer(client.clone(), obj));
                            }
                        }
                        Event::Delete(obj) => hosts.deleted(&key_of(&obj), &mut out),
                        Event::InitDone => {
                            hosts.listed(&mut out);
                            hosts.synced = true;
                        }
                    },
                },
                e = secret_events.next() => match e {
                    None => return,
                    Some(Err(e)) => warn!("watching Secrets: {e} (retrying)"),
                    Some(Ok(event)) => match event {
                        Event::Init => secrets.listing = Some(HashSet::new()),
                        Event::InitApply(obj) | Event::Apply(obj) => {
                            secrets.applied(&secrets_shared, &obj, &mut out)
                        }
                        Event::Delete(obj) => {
                            let key = secret_of(&obj).key();
                            secrets.deleted(&secrets_shared, &key, &mut out)
                        }
                        Event::InitDone => {
                            secrets.listed(&secrets_shared, &mut out);
                            secrets.synced = true;
                        }
                    },
                },
            }
            // Synced once both listings are done: hosts never flash a missing-Secret error.
            if !sent_synced && hosts.synced && secrets.synced {
                sent_synced = true;
                out.push(SourceEvent::Synced);
            }
            for event in out {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
    });
    shared
}

/// Puts [`FINALIZER`] on a host, so deleting it waits for its deprovisioning. The object's
/// resourceVersion is the precondition: a host changed meanwhile is seen again by the watch.
async fn add_finalizer(client: Client, obj: DynamicObject) {
    let key = key_of(&obj);
    let api: Api<DynamicObject> = Api::namespaced_with(client, &key.namespace, &host_resource());
    let mut finalizers = obj.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}
    });
    match api
        .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => debug!(host = %key, "finalizer added"),
        // Changed meanwhile (often by Slipway's own status write): the watch brings the new
        // version, and the finalizer is added to that.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            debug!(host = %key, "finalizer not added to an old version; retried on the next")
        }
        Err(e) => warn!(host = %key, "cannot add the finalizer {FINALIZER}: {e}"),
    }
}

/// A Warning Event on an object that does not parse (best effort).
/// An object that does not parse: a Warning Event on it, and the error in its status unless
/// the engine writes it (`declared`: the host was declared in this run, and is held with the
/// error as a registration problem).
async fn warn_event(client: Client, obj: DynamicObject, message: String, declared: bool) {
    let key = key_of(&obj);
    let event = crate::state::kube::event_object(
        &key,
        obj.uid().as_deref(),
        true,
        "InvalidSpec",
        &message,
        jiff::Timestamp::now(),
    );
    let api: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(client.clone(), &key.namespace);
    if let Err(e) = api.create(&Default::default(), &event).await {
        debug!(host = %key, "cannot record an event: {e}");
    }
    // A host Slipway never had (no status yet) shows the error in its status too, as
    // metal3 shows a registration error. One with a status that the engine does not hold
    // (its object broke while no coordinator ran) gets the error fields merged into that
    // status, which is kept: once the object is fixed, the engine adopts it and goes on.
    let has_status = obj
        .data
        .get("status")
        .and_then(|s| s.as_object())
        .is_some_and(|s| !s.is_empty());
    let status = if has_status && !declared {
        // The whole status, applied by Slipway's field manager, so the engine's next apply
        // (without the error) takes the error off again.
        let mut status = obj.data["status"].clone();
        crate::state::kube::drop_nulls(&mut status);
        status["operationalStatus"] = "error".into();
        status["errorType"] = "registration error".into();
        status["errorMessage"] = message.into();
        status
    } else if !has_status {
        serde_json::json!({
            "operationalStatus": "error",
            "errorType": "registration error",
            "errorMessage": message,
            "errorCount": 1,
            "provisioning": {"state": "registering"},
        })
    } else {
        return;
    };
    let hosts: Api<DynamicObject> = Api::namespaced_with(client, &key.namespace, &host_resource());
    let patch = serde_json::json!({
        "apiVersion": slipway_reconcile::host::API_VERSION,
        "kind": slipway_reconcile::host::KIND,
        "metadata": {"name": key.name, "namespace": key.namespace},
        "status": status,
    });
    if let Err(e) = hosts
        .patch_status(
            &key.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        warn!(host = %key, "cannot write the error to the status: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    fn host(name: &str, spec: serde_json::Value) -> DynamicObject {
        obj(serde_json::json!({
            "apiVersion": "metal3.io/v1alpha1", "kind": "BareMetalHost",
            "metadata": {"name": name, "namespace": "team-a", "resourceVersion": "1"},
            "spec": spec,
        }))
    }

    #[test]
    fn own_status_writes_are_not_changes_and_bad_objects_are_problems() {
        let mut hosts = Hosts::default();
        let mut out = Vec::new();
        let a = host("a", serde_json::json!({"online": true}));
        hosts.applied(&a, &mut out);
        assert!(matches!(&out[..], [SourceEvent::Declared { key, .. }] if key.name == "a"));
        // The same spec with a status and a new resourceVersion: nothing to send.
        let mut with_status = a.clone();
        with_status.data["status"] = serde_json::json!({"operationalStatus": "OK"});
        with_status.metadata.resource_version = Some("2".into());
        out.clear();
        hosts.applied(&with_status, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // A spec Slipway cannot read: a problem naming the object and the field.
        out.clear();
        hosts.applied(&host("a", serde_json::json!({"online": "yes"})), &mut out);
        match &out[..] {
            [
                SourceEvent::Conflict {
                    why: Some(why),
                    field: "spec",
                    ..
                },
                SourceEvent::Problems(p),
            ] => {
                assert!(p[0].to_string().contains("team-a/a"), "{}", p[0]);
                assert!(p[0].message.contains("spec.online"), "{}", p[0].message);
                // The host, declared before, is held with the error in its status.
                assert!(why.contains("spec.online"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // The same again: nothing new.
        out.clear();
        hosts.applied(&host("a", serde_json::json!({"online": "yes"})), &mut out);
        assert!(out.is_empty(), "{out:?}");
        // Fixed: the problem and the hold go, the new spec is declared.
        out.clear();
        hosts.applied(&host("a", serde_json::json!({"online": false})), &mut out);
        assert!(
            matches!(&out[..], [SourceEvent::Conflict { why: None, .. }, SourceEvent::Declared { .. }, SourceEvent::Problems(p)] if p.is_empty()),
            "{out:?}"
        );
        // An object never declared (bad from the start) is a problem only.
        out.clear();
        hosts.applied(&host("b", serde_json::json!({"online": "yes"})), &mut out);
        assert!(matches!(&out[..], [SourceEvent::Problems(_)]), "{out:?}");
        // Deletion timestamp: undeclared once.
        let mut deleting = host("a", serde_json::json!({"online": false}));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        out.clear();
        hosts.applied(&deleting, &mut out);
        hosts.applied(&deleting, &mut out);
        assert!(
            matches!(&out[..], [SourceEvent::Undeclared { .. }]),
            "{out:?}"
        );
    }

    #[test]
    fn the_status_annotation_is_adopted_only_without_a_status_and_named_when_bad() {
        let mut a = host("a", serde_json::json!({}));
        a.metadata.annotations = Some(
            [(
                annotations::STATUS.to_string(),
                r#"{"provisioning":{"state":"provisioned"},"operationalStatus":"OK","errorMessage":null}"#
                    .to_string(),
            )]
            .into(),
        );
        let status = parse_host(&a).unwrap().status.expect("adopted");
        assert_eq!(status.provisioning.state.to_string(), "provisioned");
        // Once the object has a status of its own, the annotation is history: the object's
        // own status is the one to adopt (for a host new to the engine).
        let mut with_status = a.clone();
        with_status.data["status"] = serde_json::json!({"operationalStatus": "OK"});
        let own = parse_host(&with_status).unwrap().status.expect("its own");
        assert_eq!(own.provisioning.state.to_string(), "");
        // A broken annotation is an error naming it, not a host that starts over.
        let mut bad = a.clone();
        bad.metadata.annotations =
            Some([(annotations::STATUS.to_string(), "{not json".to_string())].into());
        let e = parse_host(&bad).unwrap_err();
        assert!(e.contains(annotations::STATUS), "{e}");
        let mut wrong = a;
        wrong.metadata.annotations = Some(
            [(
                annotations::STATUS.to_string(),
                r#"{"provisioning":{"state":"flying"}}"#.to_string(),
            )]
            .into(),
        );
        let e = parse_host(&wrong).unwrap_err();
        assert!(e.contains("provisioning.state"), "{e}");
    }

    #[test]
    fn a_relist_undeclares_the_hosts_it_misses() {
        let mut hosts = Hosts::default();
        let mut out = Vec::new();
        hosts.applied(&host("a", serde_json::json!({})), &mut out);
        hosts.applied(&host("b", serde_json::json!({})), &mut out);
        out.clear();
        hosts.listing = Some(HashSet::new());
        hosts.applied(&host("b", serde_json::json!({})), &mut out);
        hosts.listed(&mut out);
        assert!(
            matches!(&out[..], [SourceEvent::Undeclared { key }] if key.name == "a"),
            "{out:?}"
        );
    }
}
