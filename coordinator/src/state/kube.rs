//! Kubernetes mode's state: everything needed to resume lives in the cluster, nothing in a
//! hidden database.
//!
//! - A host's status (the command in flight included) is its BareMetalHost's status
//!   subresource, written by server-side apply with the field manager
//!   [`FIELD_MANAGER`]; Slipway's record of the host (the agent certificate's fingerprint, the
//!   machine inspected, the inventory digest, the MAC the agent booted from) is
//!   `status.slipway`.
//! - The full inventory is a HardwareData object of the host's name, owned by the host.
//! - Bootstrap tokens (hashes only) are the Secret `<host>-slipway-tokens` in the host's
//!   namespace, replaced with a resourceVersion precondition, so a token is never consumed
//!   twice even by two writers.
//! - Events are Kubernetes Events on the host (best effort: a failed Event never fails a
//!   commit), written by a task of their own after the commit, so no command waits for them;
//!   at most [`EVENTS_QUEUED`] hosts' Events wait, the rest are dropped.
//! - The removal of a host (after its deprovisioning) takes [`FINALIZER`] off its object, so
//!   Kubernetes lets it go, and deletes its HardwareData and tokens.
//!
//! Each host is written on its own; a host whose writes fail is reported failed while the
//! others of the batch are stored. The trait is synchronous (the engine commits on a blocking
//! thread): the calls run on the runtime through its handle.
//!
//! A discovered machine (one that booted undeclared) gets a BareMetalHost of its own,
//! labelled `slipway.io/discovered=true`, created on its first write and deleted with its
//! record; `connect` loads it back as discovered.

use std::collections::{BTreeMap, HashMap};

use futures_util::StreamExt;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Event as KubeEvent, ObjectReference, Secret as KubeSecret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use slipway_reconcile::host::{HostKey, HostStatus};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use super::{
    Batch, Failed, HardwareStore, HostChange, HostRecord, Loaded, StateStore, StoreError,
    StoredHost, TokenRecord,
};
use crate::engine::DISCOVERED;
use crate::hardware::HardwareData;
use crate::sources::kube::{FIELD_MANAGER, FINALIZER, ORIGIN, hardware_resource, host_resource};

/// The label of the Secrets that hold a host's bootstrap tokens.
pub const TOKENS_LABEL: &str = "slipway.io/tokens-of";

/// Slipway's record of a host, kept in `status.slipway`: what it needs beyond metal3's status
/// to resume the host after a restart or on another replica.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubeRecord {
    /// SHA-256 (hex) of the certificate the host's agent enrolled with: the only agent
    /// certificate accepted for this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cert_sha256: Option<String>,
    /// SHA-256 (hex) of the inventory stored in the host's HardwareData.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_sha256: Option<String>,
    /// The machine's identity as its agent reported it (system UUID, serial, MACs), used to
    /// recognise the same machine when it enrols again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "slipway_reconcile::schema::any_object")]
    pub identity: Option<crate::hardware::Identity>,
    /// MAC address the agent booted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_boot_mac: Option<String>,
}

impl KubeRecord {
    fn of(r: &HostRecord) -> KubeRecord {
        KubeRecord {
            agent_cert_sha256: r.agent_cert_sha256.clone(),
            hardware_sha256: r.hardware_sha256.clone(),
            identity: r.identity.clone(),
            agent_boot_mac: r.agent_boot_mac.clone(),
        }
    }
}

/// Removes null and empty-string members, recursively: the CRD's schema types fields
/// (`errorMessage` is a string) and the API server refuses a null, and server-side apply on
/// kube-apiserver 1.20 turns an applied `""` into a null it then refuses. With server-side
/// apply an absent field is one Slipway no longer sets, so it goes from the object, which is
/// what None (or an empty message) means; reading back gives the same defaults.
pub(crate) fn drop_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null() && v.as_str() != Some(""));
            map.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// What was last written for a host.
#[derive(Clone, Debug, Default)]
struct Cached {
    record: HostRecord,
    status: HostStatus,
    /// The status as last applied (None: never).
    written: Option<serde_json::Value>,
    tokens: BTreeMap<String, TokenRecord>,
    tokens_version: Option<String>,
}

pub struct KubeStore {
    client: Client,
    rt: Handle,
    /// Events to record, written apart from the commits (see [`event_writer`]).
    events: tokio::sync::mpsc::Sender<HostEvents>,
    hosts: HashMap<HostKey, Cached>,
    loaded: Option<Loaded>,
}

#[derive(Clone)]
pub struct KubeHardware {
    client: Client,
    rt: Handle,
}

fn kube_error(what: &str, e: kube::Error) -> StoreError {
    StoreError::Kube(format!("{what}: {e}"))
}

pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn tokens_secret_name(host: &str) -> String {
    format!("{host}-slipway-tokens")
}

/// A Kubernetes Event about a host.
pub fn event_object(
    key: &HostKey,
    uid: Option<&str>,
    warning: bool,
    reason: &str,
    message: &str,
    time: Timestamp,
) -> KubeEvent {
    let suffix = format!(
        "{:x}{:04x}",
        time.as_nanosecond() as u64,
        getrandom::u32().unwrap_or(0) & 0xffff
    );
    // k8s-openapi carries its own (older) jiff; convert through nanoseconds.
    let k8s_time = k8s_openapi::jiff::Timestamp::from_nanosecond(time.as_nanosecond())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    KubeEvent {
        metadata: ObjectMeta {
            name: Some(format!("{}.{suffix}", key.name)),
            namespace: Some(key.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(slipway_reconcile::host::API_VERSION.into()),
            kind: Some(slipway_reconcile::host::KIND.into()),
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            uid: uid.map(str::to_string),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.chars().take(1024).collect()),
        type_: Some(if warning { "Warning" } else { "Normal" }.into()),
        first_timestamp: Some(Time(k8s_time)),
        last_timestamp: Some(Time(k8s_time)),
        event_time: Some(MicroTime(k8s_time)),
        count: Some(1),
        reporting_component: Some("slipway".into()),
        reporting_instance: Some(
            std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| "slipway".into()),
        ),
        action: Some(reason.into()),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some("slipway".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A BareMetalHost's record and status as Slipway stored them (its status subresource and
/// `status.slipway`), with the status as JSON; None for an object that does not parse (the
/// source reports it), was never reconciled, or whose status does not parse (logged).
pub(crate) fn stored_of(
    obj: &DynamicObject,
) -> Option<(HostKey, HostRecord, HostStatus, serde_json::Value)> {
    let mut host = crate::sources::kube::parse_host(obj).ok()?;
    // The record is the declaration; the status is kept apart.
    host.status = None;
    let key = HostKey::of(&host.metadata);
    // Never reconciled: the source declares it.
    let mut status_json = obj.data.get("status").cloned().filter(|s| s.is_object())?;
    // A null is what 1.20's server-side apply leaves of a dropped field: absent.
    drop_nulls(&mut status_json);
    let status: HostStatus = match serde_json::from_value(status_json.clone()) {
        Ok(s) => s,
        Err(e) => {
            warn!(host = %key, "the stored status does not parse ({e}); the host starts over");
            return None;
        }
    };
    let extra: KubeRecord = status_json
        .get("slipway")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let origin = if crate::sources::kube::is_discovered(obj) {
        DISCOVERED
    } else {
        ORIGIN
    };
    let record = HostRecord {
        host,
        origin: origin.into(),
        agent_cert_sha256: extra.agent_cert_sha256,
        deleted: obj.metadata.deletion_timestamp.is_some(),
        hardware_sha256: extra.hardware_sha256,
        identity: extra.identity,
        agent_boot_mac: extra.agent_boot_mac,
    };
    Some((key, record, status, status_json))
}

impl KubeStore {
    /// Reads what the cluster holds (host statuses and records, tokens); `load` hands it to
    /// the engine.
    pub async fn connect(client: Client) -> Result<KubeStore, StoreError> {
        let hosts_api: Api<DynamicObject> = Api::all_with(client.clone(), &host_resource());
        let list = hosts_api
            .list(&ListParams::default())
            .await
            .map_err(|e| kube_error("cannot list BareMetalHosts (are the CRDs installed? `slipway crd | kubectl apply -f -`)", e))?;
        let mut hosts = HashMap::new();
        let mut loaded = Loaded::default();
        for obj in list.items {
            let Some((key, record, status, status_json)) = stored_of(&obj) else {
                continue;
            };
            loaded.hosts.push((
                key.clone(),
                StoredHost {
                    record: record.clone(),
                    status: status.clone(),
                    events: Vec::new(),
                },
            ));
            hosts.insert(
                key,
                Cached {
                    record,
                    status,
                    written: Some(status_json),
                    ..Default::default()
                },
            );
        }
        let secrets: Api<KubeSecret> = Api::all(client.clone());
        let tokens = secrets
            .list(&ListParams::default().labels(TOKENS_LABEL))
            .await
            .map_err(|e| kube_error("cannot list the tokens' Secrets", e))?;
        for s in tokens.items {
            let ns = s.namespace().unwrap_or_default();
            let Some(host) = s.labels().get(TOKENS_LABEL).cloned() else {
                continue;
            };
            let key = HostKey::new(ns, host);
            let c = hosts.entry(key).or_default();
            c.tokens_version = s.resource_version();
            for (hash, v) in s.data.iter().flatten() {
                if let Ok(t) = serde_json::from_slice::<TokenRecord>(&v.0) {
                    loaded.tokens.push((hash.clone(), t.clone()));
                    c.tokens.insert(hash.clone(), t);
                }
            }
        }
        let (events, rx) = tokio::sync::mpsc::channel(EVENTS_QUEUED);
        tokio::spawn(event_writer(client.clone(), rx));
        Ok(KubeStore {
            client,
            rt: Handle::current(),
            events,
            hosts,
            loaded: Some(loaded),
        })
    }

    pub fn hardware_store(&self) -> KubeHardware {
        KubeHardware {
            client: self.client.clone(),
            rt: self.rt.clone(),
        }
    }
}

/// One host's Events of one commit: the host, its object's uid, the events.
type HostEvents = (HostKey, Option<String>, Vec<super::EventRecord>);

/// How many hosts' Events may wait for the writer; past that, Events are dropped (and
/// counted in the log): they are best effort, and a flood must not grow memory.
const EVENTS_QUEUED: usize = 16384;

/// Events dropped because the writer was behind, for the log.
static EVENTS_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Records Events, 8 at a time, apart from the commits: a host's next command waits for its
/// status, HardwareData and tokens to be stored, not for the story of how it got there.
async fn event_writer(client: Client, rx: tokio::sync::mpsc::Receiver<HostEvents>) {
    tokio_stream::wrappers::ReceiverStream::new(rx)
        .for_each_concurrent(8, |(key, uid, records)| {
            let events: Api<KubeEvent> = Api::namespaced(client.clone(), &key.namespace);
            async move {
                for e in &records {
                    let ev = event_object(
                        &key,
                        uid.as_deref(),
                        e.warning,
                        &e.reason,
                        &e.message,
                        e.time,
                    );
                    if let Err(err) = events.create(&PostParams::default(), &ev).await {
                        debug!(host = %key, "cannot record an event: {err}");
                    }
                }
            }
        })
        .await;
}

/// One host's writes, in order; the first failure fails the host.
async fn write_host(
    client: Client,
    events: tokio::sync::mpsc::Sender<HostEvents>,
    key: HostKey,
    change: HostChange,
    mut cached: Cached,
) -> (HostKey, Result<Cached, String>) {
    let r = write_host_inner(&client, &events, &key, &change, &mut cached).await;
    (key, r.map(|()| cached))
}

async fn write_host_inner(
    client: &Client,
    event_queue: &tokio::sync::mpsc::Sender<HostEvents>,
    key: &HostKey,
    change: &HostChange,
    cached: &mut Cached,
) -> Result<(), String> {
    let hosts: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &key.namespace, &host_resource());
    let secrets: Api<KubeSecret> = Api::namespaced(client.clone(), &key.namespace);
    let hardware: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &key.namespace, &hardware_resource());
    if change.remove {
        for r in [
            secrets
                .delete(&tokens_secret_name(&key.name), &DeleteParams::default())
                .await
                .map(|_| ()),
            hardware
                .delete(&key.name, &DeleteParams::default())
                .await
                .map(|_| ()),
        ] {
            if let Err(e) = r
                && !is_not_found(&e)
            {
                return Err(format!(
                    "cannot delete the host's tokens or HardwareData: {e}"
                ));
            }
        }
        if cached.record.origin == DISCOVERED {
            // Slipway's own object: it goes with the record.
            match hosts.delete(&key.name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(format!("cannot delete the discovered host's object: {e}")),
            }
        }
        remove_finalizer(&hosts, key).await?;
        *cached = Cached::default();
        // Gone: nothing of the rest (the tokens it drops, its last status) is written back.
        if change.record.is_none() {
            return Ok(());
        }
    }
    if let Some(record) = &change.record {
        cached.record = record.clone();
    }
    if let Some(status) = &change.status {
        cached.status = status.clone();
    }
    let discovered = cached.record.origin == DISCOVERED;
    let in_cluster = cached.record.origin == ORIGIN || discovered;
    if discovered && !cached.record.deleted && cached.written.is_none() {
        create_discovered(&hosts, key, &cached.record).await?;
    }
    if in_cluster && (change.record.is_some() || change.status.is_some()) {
        let mut status = serde_json::to_value(&cached.status).map_err(|e| e.to_string())?;
        status["slipway"] =
            serde_json::to_value(KubeRecord::of(&cached.record)).map_err(|e| e.to_string())?;
        drop_nulls(&mut status);
        if cached.written.as_ref() != Some(&status) {
            let patch = serde_json::json!({
                "apiVersion": slipway_reconcile::host::API_VERSION,
                "kind": slipway_reconcile::host::KIND,
                "metadata": {"name": key.name, "namespace": key.namespace},
                "status": status,
            });
            match hosts
                .patch_status(
                    &key.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => cached.written = Some(status),
                // The object is gone (deleted without waiting for us): nothing to write to.
                Err(e) if is_not_found(&e) && cached.record.deleted => {}
                Err(e) => return Err(format!("cannot write the status: {e}")),
            }
        }
    }
    if in_cluster && !discovered && cached.written.is_some() {
        remove_done_annotations(&hosts, key, &cached.record, &cached.status).await;
    }
    if let Some(hw) = &change.hardware
        && in_cluster
    {
        write_hardware(
            &hardware,
            key,
            cached.record.host.metadata.uid.as_deref(),
            hw,
        )
        .await?;
    }
    if !change.tokens.is_empty() {
        let mut tokens = cached.tokens.clone();
        for (hash, t) in &change.tokens {
            match t {
                Some(t) => tokens.insert(hash.clone(), t.clone()),
                None => tokens.remove(hash),
            };
        }
        // No Secret is created only to hold nothing.
        if !(tokens.is_empty() && cached.tokens_version.is_none()) {
            let version =
                write_tokens(&secrets, key, &tokens, cached.tokens_version.clone()).await?;
            cached.tokens_version = version;
        }
        cached.tokens = tokens;
    }
    if in_cluster && !change.events.is_empty() {
        let uid = cached.record.host.metadata.uid.clone();
        let records = change.events.iter().map(|(_, e)| e.clone()).collect();
        if event_queue.try_send((key.clone(), uid, records)).is_err() {
            let n = EVENTS_DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_multiple_of(1000) {
                warn!(host = %key, "the API server is too slow for the Events: {} host(s)' Events not recorded so far (the statuses are)", n + 1);
            }
        }
    }
    Ok(())
}

/// Takes off the host's object what metal3 removes once done: one-shot requests carried out
/// (`reboot.metal3.io`, `inspect.metal3.io`, recorded in `status.handledAnnotations` with the
/// value acted on) and an adopted `baremetalhost.metal3.io/status` (the status is in the
/// subresource now). Each removal is a JSON patch that first tests the value, so a request
/// made again in the meantime (a new value) stays. Best effort: an annotation left in place
/// is still carried out once per value, as in files mode.
async fn remove_done_annotations(
    hosts: &Api<DynamicObject>,
    key: &HostKey,
    record: &HostRecord,
    status: &HostStatus,
) {
    let present = &record.host.metadata.annotations;
    let mut done: Vec<(&str, &str)> = status
        .handled_annotations
        .iter()
        .filter(|(k, v)| present.get(*k) == Some(*v))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if let Some(v) = present.get(slipway_reconcile::annotations::STATUS) {
        done.push((slipway_reconcile::annotations::STATUS, v));
    }
    for (name, value) in done {
        let path = format!(
            "/metadata/annotations/{}",
            name.replace('~', "~0").replace('/', "~1")
        );
        let ops = serde_json::json!([
            {"op": "test", "path": path, "value": value},
            {"op": "remove", "path": path},
        ]);
        let patch = match serde_json::from_value(ops) {
            Ok(p) => Patch::Json::<()>(p),
            Err(e) => {
                warn!(host = %key, "cannot make the patch removing {name}: {e}");
                continue;
            }
        };
        match hosts
            .patch(&key.name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => debug!(host = %key, "{name} done: removed from the object"),
            // Changed or gone since: the engine sees the new value.
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 404 => {}
            Err(e) => debug!(host = %key, "cannot remove {name} from the object: {e}"),
        }
    }
}

/// The BareMetalHost of a machine that booted undeclared, labelled as discovered.
async fn create_discovered(
    hosts: &Api<DynamicObject>,
    key: &HostKey,
    record: &HostRecord,
) -> Result<(), String> {
    let mut doc = serde_json::to_value(&record.host).map_err(|e| e.to_string())?;
    if let Some(map) = doc.as_object_mut() {
        map.remove("status");
    }
    drop_nulls(&mut doc);
    doc["metadata"] = serde_json::json!({
        "name": key.name,
        "namespace": key.namespace,
        "labels": {crate::sources::kube::DISCOVERED_LABEL: "true"},
    });
    let obj: DynamicObject = serde_json::from_value(doc).map_err(|e| e.to_string())?;
    match hosts.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(format!(
            "cannot create the discovered host's BareMetalHost: {e}"
        )),
    }
}

async fn remove_finalizer(hosts: &Api<DynamicObject>, key: &HostKey) -> Result<(), String> {
    for _ in 0..5 {
        let obj = match hosts.get(&key.name).await {
            Ok(o) => o,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(format!("cannot read the host to remove its finalizer: {e}")),
        };
        if !obj.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(());
        }
        let rest: Vec<&String> = obj
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .collect();
        let patch = serde_json::json!({
            "metadata": {"finalizers": rest, "resourceVersion": obj.resource_version()}
        });
        match hosts
            .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(format!("cannot remove the finalizer {FINALIZER}: {e}")),
        }
    }
    Err(format!(
        "cannot remove the finalizer {FINALIZER}: the host keeps changing"
    ))
}

pub(crate) async fn write_hardware(
    api: &Api<DynamicObject>,
    key: &HostKey,
    uid: Option<&str>,
    hw: &HardwareData,
) -> Result<(), String> {
    let mut doc = serde_json::to_value(hw).map_err(|e| e.to_string())?;
    doc["metadata"]["name"] = key.name.clone().into();
    doc["metadata"]["namespace"] = key.namespace.clone().into();
    if let Some(uid) = uid {
        doc["metadata"]["ownerReferences"] = serde_json::json!([{
            "apiVersion": slipway_reconcile::host::API_VERSION,
            "kind": slipway_reconcile::host::KIND,
            "name": key.name,
            "uid": uid,
        }]);
    }
    api.patch(
        &key.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&doc),
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("cannot write the HardwareData: {e}"))
}

/// Writes the host's tokens Secret whole, on the resourceVersion last read: a Secret changed
/// by another writer meanwhile makes the write fail (409), never overwrite.
async fn write_tokens(
    api: &Api<KubeSecret>,
    key: &HostKey,
    tokens: &BTreeMap<String, TokenRecord>,
    version: Option<String>,
) -> Result<Option<String>, String> {
    let name = tokens_secret_name(&key.name);
    let mut data = BTreeMap::new();
    for (hash, t) in tokens {
        data.insert(
            hash.clone(),
            ByteString(serde_json::to_vec(t).map_err(|e| e.to_string())?),
        );
    }
    let secret = KubeSecret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(key.namespace.clone()),
            labels: Some([(TOKENS_LABEL.to_string(), key.name.clone())].into()),
            resource_version: version.clone(),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    let r = match version {
        None => api.create(&PostParams::default(), &secret).await,
        Some(_) => api.replace(&name, &PostParams::default(), &secret).await,
    };
    match r {
        Ok(s) => Ok(s.resource_version()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(format!(
            "the tokens Secret {}/{name} was changed by another writer; read again",
            key.namespace
        )),
        Err(e) => Err(format!(
            "cannot write the tokens Secret {}/{name}: {e}",
            key.namespace
        )),
    }
}

impl StateStore for KubeStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        Ok(self.loaded.take().unwrap_or_default())
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), Failed> {
        let client = self.client.clone();
        let jobs: Vec<_> = batch
            .hosts
            .iter()
            .map(|(key, change)| {
                let cached = self.hosts.get(key).cloned().unwrap_or_default();
                write_host(
                    client.clone(),
                    self.events.clone(),
                    key.clone(),
                    change.clone(),
                    cached,
                )
            })
            .collect();
        let results: Vec<(HostKey, Result<Cached, String>)> = self.rt.block_on(
            futures_util::stream::iter(jobs)
                .buffer_unordered(16)
                .collect(),
        );
        let mut failed = Vec::new();
        for (key, r) in results {
            match r {
                Ok(c) => {
                    let removed = batch
                        .hosts
                        .iter()
                        .any(|(k, ch)| *k == key && ch.remove && ch.record.is_none());
                    if removed {
                        self.hosts.remove(&key);
                    } else {
                        self.hosts.insert(key, c);
                    }
                }
                Err(why) => {
                    // A conflict on the tokens: read them again for the retry.
                    if why.contains("another writer") {
                        let secrets: Api<KubeSecret> =
                            Api::namespaced(self.client.clone(), &key.namespace);
                        if let Ok(s) = self
                            .rt
                            .block_on(secrets.get(&tokens_secret_name(&key.name)))
                            && let Some(c) = self.hosts.get_mut(&key)
                        {
                            c.tokens_version = s.resource_version();
                            c.tokens = s
                                .data
                                .iter()
                                .flatten()
                                .filter_map(|(h, v)| {
                                    Some((h.clone(), serde_json::from_slice(&v.0).ok()?))
                                })
                                .collect();
                        }
                    }
                    failed.push((key, why));
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed)
        }
    }
}

impl HardwareStore for KubeHardware {
    fn hardware(&self, key: &HostKey) -> Result<Option<HardwareData>, StoreError> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &key.namespace, &hardware_resource());
        match self.rt.block_on(api.get(&key.name)) {
            Ok(o) => Ok(serde_json::to_value(&o)
                .ok()
                .and_then(|v| serde_json::from_value(v).ok())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(kube_error("cannot read HardwareData", e)),
        }
    }

    fn all_hardware(&self) -> Result<Vec<HardwareData>, StoreError> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &hardware_resource());
        let list = self
            .rt
            .block_on(api.list(&ListParams::default()))
            .map_err(|e| kube_error("cannot list HardwareData", e))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|o| serde_json::from_value(serde_json::to_value(&o).ok()?).ok())
            .collect())
    }
}

/// Writes the CA of the Secret `s` (`namespace/slipway-ca`) into `dir` (`ca.crt`, and
/// `ca.key` readable by its owner only).
pub fn write_ca(s: &KubeSecret, namespace: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let data = s.data.clone().unwrap_or_default();
    let (Some(crt), Some(key)) = (data.get("ca.crt"), data.get("ca.key")) else {
        anyhow::bail!(
            "the Secret {namespace}/slipway-ca lacks ca.crt or ca.key: delete it to make a new CA (every agent certificate is then reissued)"
        );
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::pki::write_private(&dir.join("ca.key"), &key.0)
        .map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?;
    std::fs::write(dir.join("ca.crt"), &crt.0)
        .with_context(|| format!("cannot write {}", dir.join("ca.crt").display()))?;
    Ok(())
}

/// The coordinator's CA, kept in the Secret `slipway-ca` of `namespace`: written into `dir`
/// (where [`crate::pki::Ca::load_or_create`] reads it) when the Secret exists; else the CA
/// made there is stored in a new Secret. Two replicas starting at once agree: the one whose
/// create loses takes the winner's.
pub async fn sync_ca(client: Client, namespace: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let api: Api<KubeSecret> = Api::namespaced(client, namespace);
    let write = |s: &KubeSecret| write_ca(s, namespace, dir);
    match api.get("slipway-ca").await {
        Ok(s) => return write(&s),
        Err(e) if is_not_found(&e) => {}
        Err(e) => anyhow::bail!("cannot read the Secret {namespace}/slipway-ca: {e}"),
    }
    crate::pki::Ca::load_or_create(dir).map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?;
    let read = |f: &str| {
        std::fs::read(dir.join(f)).with_context(|| format!("cannot read {}", dir.join(f).display()))
    };
    let secret = KubeSecret {
        metadata: ObjectMeta {
            name: Some("slipway-ca".into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        data: Some(
            [
                ("ca.crt".to_string(), ByteString(read("ca.crt")?)),
                ("ca.key".to_string(), ByteString(read("ca.key")?)),
            ]
            .into(),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let s = api
                .get("slipway-ca")
                .await
                .with_context(|| format!("cannot read the Secret {namespace}/slipway-ca"))?;
            write(&s)
        }
        Err(e) => anyhow::bail!("cannot store the CA in the Secret {namespace}/slipway-ca: {e}"),
    }
}
