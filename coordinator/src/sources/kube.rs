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
//! - Secrets are watched by their metadata only; a Secret some declared host references is
//!   read (GET) when it appears or changes: its key names go to the engine, its contents
//!   stay in [`KubeSecrets`], read when a command needs them. The cluster's other Secrets
//!   cost a name and a version each.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::core::PartialObjectMeta;
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

    /// The Secrets host `key` references as declared now (none when it is not declared).
    fn refs_of(&self, key: &HostKey) -> Vec<SecretKey> {
        self.sent
            .get(key)
            .map(|h| crate::engine::secret_refs_of(key, &h.spec))
            .unwrap_or_default()
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

/// The Secrets, from a metadata-only watch of every namespace: the resourceVersion of each,
/// and the contents of those a declared host references, read (GET) when they appear or
/// change. Nothing of the other Secrets of the cluster (Helm releases, service account
/// tokens, ...) is read or kept beyond its name and version.
#[derive(Default)]
struct Secrets {
    /// The resourceVersion of every Secret seen.
    versions: HashMap<SecretKey, String>,
    /// How many declared hosts reference each Secret.
    wanted: HashMap<SecretKey, usize>,
    /// The Secrets each declared host references.
    refs: HashMap<HostKey, Vec<SecretKey>>,
    /// The key names sent to the engine, and the version they were read at.
    sent: HashMap<SecretKey, (String, BTreeSet<String>)>,
    /// Reads in flight, with the version asked for.
    reading: HashMap<SecretKey, String>,
    listing: Option<HashSet<SecretKey>>,
    synced: bool,
}

/// The outcome of reading one Secret.
enum Read {
    /// Found (or, `None`, gone).
    Done(SecretKey, Option<Box<KubeSecret>>),
    /// The read failed; it is tried again.
    Failed(SecretKey, String),
    /// Time to try a failed read again.
    Retry(SecretKey),
}

impl Secrets {
    /// A Secret appeared or changed (its metadata). Returns the reads to start.
    fn seen(&mut self, key: SecretKey, version: String) -> Option<SecretKey> {
        if let Some(l) = &mut self.listing {
            l.insert(key.clone());
        }
        self.versions.insert(key.clone(), version);
        self.read_if_needed(&key)
    }

    /// Whether `key` must be read: wanted, and its contents older than its version (and not
    /// being read at that version already). Marks it being read.
    fn read_if_needed(&mut self, key: &SecretKey) -> Option<SecretKey> {
        if !self.wanted.contains_key(key) {
            return None;
        }
        let version = self.versions.get(key)?;
        if self.sent.get(key).is_some_and(|(v, _)| v == version)
            || self.reading.get(key) == Some(version)
        {
            return None;
        }
        self.reading.insert(key.clone(), version.clone());
        Some(key.clone())
    }

    /// A Secret is gone.
    fn gone(&mut self, shared: &KubeSecrets, key: &SecretKey, out: &mut Vec<SourceEvent>) {
        self.versions.remove(key);
        self.forget(shared, key, out);
    }

    /// Drops what is kept of a Secret's contents, telling the engine.
    fn forget(&mut self, shared: &KubeSecrets, key: &SecretKey, out: &mut Vec<SourceEvent>) {
        shared
            .0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if self.sent.remove(key).is_some() {
            out.push(SourceEvent::Secret {
                key: key.clone(),
                keys: None,
            });
        }
    }

    /// The Secrets `host` references now (none once it is no longer declared). Returns the
    /// reads to start.
    fn host_refs(
        &mut self,
        shared: &KubeSecrets,
        host: &HostKey,
        refs: Vec<SecretKey>,
        out: &mut Vec<SourceEvent>,
    ) -> Vec<SecretKey> {
        let old = if refs.is_empty() {
            self.refs.remove(host).unwrap_or_default()
        } else {
            self.refs
                .insert(host.clone(), refs.clone())
                .unwrap_or_default()
        };
        if old == refs {
            return Vec::new();
        }
        for k in &old {
            if let Some(n) = self.wanted.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.wanted.remove(k);
                    self.forget(shared, k, out);
                }
            }
        }
        let mut reads = Vec::new();
        for k in refs {
            *self.wanted.entry(k.clone()).or_default() += 1;
            reads.extend(self.read_if_needed(&k));
        }
        reads
    }

    /// A read is done. Returns a read to start if the Secret changed meanwhile.
    fn read(
        &mut self,
        shared: &KubeSecrets,
        key: SecretKey,
        found: Option<Box<KubeSecret>>,
        out: &mut Vec<SourceEvent>,
    ) -> Option<SecretKey> {
        self.reading.remove(&key);
        if !self.wanted.contains_key(&key) {
            return None;
        }
        let Some(obj) = found else {
            self.gone(shared, &key, out);
            return None;
        };
        let version = obj.resource_version().unwrap_or_default();
        let secret = secret_of(&obj);
        let names = secret.key_names();
        shared
            .0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), secret);
        let changed = self.sent.get(&key).map(|(_, n)| n) != Some(&names);
        self.sent
            .insert(key.clone(), (version.clone(), names.clone()));
        if changed {
            out.push(SourceEvent::Secret {
                key: key.clone(),
                keys: Some(names),
            });
        }
        // Read at an older version than the watch has seen since: read again.
        if self.versions.get(&key).is_some_and(|v| *v != version) {
            return self.read_if_needed(&key);
        }
        None
    }

    /// The listing of a (re)started watch is complete: Secrets not in it are gone.
    fn listed(&mut self, shared: &KubeSecrets, out: &mut Vec<SourceEvent>) {
        if let Some(seen) = self.listing.take() {
            let gone: Vec<SecretKey> = self
                .versions
                .keys()
                .filter(|k| !seen.contains(*k))
                .cloned()
                .collect();
            for key in gone {
                self.gone(shared, &key, out);
            }
        }
    }
}

/// Reads Secrets `keys` at once (at most 5 s; one not read by then is read in the
/// background).
async fn read_now(
    client: &Client,
    keys: Vec<SecretKey>,
) -> Vec<(SecretKey, Result<Option<Box<KubeSecret>>, ()>)> {
    futures_util::future::join_all(keys.into_iter().map(|key| async move {
        let api: Api<KubeSecret> = Api::namespaced(client.clone(), &key.namespace);
        let r =
            tokio::time::timeout(std::time::Duration::from_secs(5), api.get_opt(&key.name)).await;
        let r = match r {
            Ok(Ok(found)) => Ok(found.map(Box::new)),
            _ => Err(()),
        };
        (key, r)
    }))
    .await
}

/// Reads Secret `key` for the watch loop.
fn start_read(client: &Client, key: SecretKey, done: &mpsc::UnboundedSender<Read>) {
    let api: Api<KubeSecret> = Api::namespaced(client.clone(), &key.namespace);
    let done = done.clone();
    tokio::spawn(async move {
        let r = match api.get_opt(&key.name).await {
            Ok(found) => Read::Done(key, found.map(Box::new)),
            Err(e) => Read::Failed(key, e.to_string()),
        };
        let _ = done.send(r);
    });
}

/// Starts watching; events go to `tx`. Returns the Secrets' contents.
pub fn spawn(client: Client, tx: mpsc::Sender<SourceEvent>) -> Arc<KubeSecrets> {
    let shared = Arc::new(KubeSecrets::default());
    let secrets_shared = shared.clone();
    tokio::spawn(async move {
        let hosts_api: Api<DynamicObject> = Api::all_with(client.clone(), &host_resource());
        let secrets_api: Api<PartialObjectMeta<KubeSecret>> = Api::all(client.clone());
        let mut host_events = watcher::watcher(hosts_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut secret_events = watcher::watcher(secrets_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let (read_tx, mut read_rx) = mpsc::unbounded_channel::<Read>();
        let mut hosts = Hosts::default();
        let mut secrets = Secrets::default();
        let mut sent_synced = false;
        loop {
            let mut out = Vec::new();
            let mut reads = Vec::new();
            tokio::select! {
                e = host_events.next() => match e {
                    None => return,
                    Some(Err(e)) => warn!("watching BareMetalHosts: {e} (retrying)"),
                    Some(Ok(event)) => match event {
                        Event::Init => hosts.listing = Some(HashSet::new()),
                        Event::InitApply(obj) | Event::Apply(obj) => {
                            let mut declared = Vec::new();
                            hosts.applied(&obj, &mut declared);
                            let key = key_of(&obj);
                            let refs = hosts.refs_of(&key);
                            // The Secrets a host now references are read before it is
                            // declared, so it is never planned without them.
                            let now = secrets.host_refs(&secrets_shared, &key, refs, &mut out);
                            for (k, r) in read_now(&client, now).await {
                                match r {
                                    Ok(found) => reads.extend(secrets.read(&secrets_shared, k, found, &mut out)),
                                    Err(_) => reads.push(k),
                                }
                            }
                            out.extend(declared);
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
                        Event::Delete(obj) => {
                            let key = key_of(&obj);
                            hosts.deleted(&key, &mut out);
                            secrets.host_refs(&secrets_shared, &key, Vec::new(), &mut out);
                        }
                        Event::InitDone => {
                            let before: Vec<HostKey> = hosts.sent.keys().cloned().collect();
                            hosts.listed(&mut out);
                            for key in before.iter().filter(|k| !hosts.sent.contains_key(*k)) {
                                secrets.host_refs(&secrets_shared, key, Vec::new(), &mut out);
                            }
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
                            let key = HostKey::new(obj.namespace().unwrap_or_default(), obj.name_any());
                            reads.extend(secrets.seen(key, obj.resource_version().unwrap_or_default()));
                        }
                        Event::Delete(obj) => {
                            let key = HostKey::new(obj.namespace().unwrap_or_default(), obj.name_any());
                            secrets.gone(&secrets_shared, &key, &mut out)
                        }
                        Event::InitDone => {
                            secrets.listed(&secrets_shared, &mut out);
                            secrets.synced = true;
                        }
                    },
                },
                Some(r) = read_rx.recv() => match r {
                    Read::Done(key, found) => {
                        reads.extend(secrets.read(&secrets_shared, key, found, &mut out));
                    }
                    Read::Failed(key, why) => {
                        warn!("cannot read the Secret {key}: {why} (retrying in 5 s)");
                        secrets.reading.remove(&key);
                        let retry = read_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                            let _ = retry.send(Read::Retry(key));
                        });
                    }
                    Read::Retry(key) => reads.extend(secrets.read_if_needed(&key)),
                },
            }
            for key in reads {
                start_read(&client, key, &read_tx);
            }
            // Synced once both listings are done and the Secrets the hosts reference are
            // read: hosts never flash a missing-Secret error.
            if !sent_synced && hosts.synced && secrets.synced && secrets.reading.is_empty() {
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

    fn kube_secret(ns: &str, name: &str, version: &str, keys: &[&str]) -> Box<KubeSecret> {
        Box::new(KubeSecret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            string_data: Some(keys.iter().map(|k| (k.to_string(), "v".into())).collect()),
            ..Default::default()
        })
    }

    #[test]
    fn only_the_secrets_hosts_reference_are_read_and_kept() {
        let shared = KubeSecrets::default();
        let mut s = Secrets::default();
        let mut out = Vec::new();
        let (creds, other) = (
            HostKey::new("a", "creds"),
            HostKey::new("a", "helm-release"),
        );
        // Secrets nobody references: a version each, never read.
        assert_eq!(s.seen(creds.clone(), "1".into()), None);
        assert_eq!(s.seen(other.clone(), "1".into()), None);
        // A host references one: it is read, once.
        let h = HostKey::new("a", "h");
        let reads = s.host_refs(&shared, &h, vec![creds.clone()], &mut out);
        assert_eq!(reads, vec![creds.clone()]);
        assert_eq!(s.read_if_needed(&creds), None, "already being read");
        let again = s.read(
            &shared,
            creds.clone(),
            Some(kube_secret("a", "creds", "1", &["username", "password"])),
            &mut out,
        );
        assert_eq!(again, None);
        assert!(matches!(&out[..], [SourceEvent::Secret { keys: Some(k), .. }] if k.len() == 2));
        assert!(shared.get(&creds).is_some() && shared.get(&other).is_none());
        // Changed: read again; a read that returns an older version than the watch has seen
        // since reads again.
        out.clear();
        assert_eq!(s.seen(creds.clone(), "2".into()), Some(creds.clone()));
        assert_eq!(s.seen(creds.clone(), "3".into()), Some(creds.clone()));
        let reread = s.read(
            &shared,
            creds.clone(),
            Some(kube_secret("a", "creds", "2", &["username", "password"])),
            &mut out,
        );
        assert_eq!(reread, Some(creds.clone()));
        assert!(out.is_empty(), "same key names: nothing new for the engine");
        // The host no longer references it: its contents go.
        let reads = s.host_refs(&shared, &h, Vec::new(), &mut out);
        assert!(reads.is_empty());
        assert!(shared.get(&creds).is_none());
        assert!(matches!(&out[..], [SourceEvent::Secret { keys: None, .. }]));
        // A referenced Secret that does not exist yet is read when it appears.
        out.clear();
        let late = HostKey::new("a", "late");
        assert!(
            s.host_refs(&shared, &h, vec![late.clone()], &mut out)
                .is_empty()
        );
        assert_eq!(s.seen(late.clone(), "7".into()), Some(late.clone()));
        // Deleted while being read: gone.
        s.read(&shared, late.clone(), None, &mut out);
        assert!(shared.get(&late).is_none());
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
