//! `slipway move`: the seed's flow. A coordinator in files mode on a machine outside the
//! cluster provisions the first hosts; `slipway move` (with that coordinator stopped) writes
//! them into the cluster as BareMetalHosts, so the coordinator in the cluster adopts them as
//! they are: provisioned hosts stay provisioned, with no inspection or command again.
//!
//! What is written, for every declared host of the files-mode store (discovered and deleted
//! ones stay behind):
//! - the BareMetalHost, from its document, with metal3's `baremetalhost.metal3.io/status`
//!   annotation holding its status as JSON: a status cannot be created with an object, and
//!   this is the annotation metal3's own `clusterctl move` writes, so hosts moved by either
//!   tool are adopted the same way (the source reads it while the object has no status);
//! - its HardwareData (the full inventory), owned by the new object;
//! - the Secrets its spec references (BMC credentials, userData, networkData, metaData,
//!   preprovisioningNetworkData), from the hosts directory;
//! - once, the CA as the Secret `slipway-ca` of the coordinator's namespace, unless the
//!   cluster has one already (then agents enrolled by the files-mode coordinator must enrol
//!   again, which only matters for hosts still running an agent).
//!
//! Objects that exist already are left as they are and reported; nothing is deleted on
//! either side, so the move can be repeated after fixing whatever stopped it.
//!
//! [`to_files`] goes the other way (`slipway move --to-files`), for taking hosts out of a
//! cluster that is going away: each host is detached first, so the cluster's coordinator
//! lets go of it without deprovisioning, then written to the files side and deleted from the
//! cluster.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::api::{Api, DynamicObject, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use slipway_reconcile::annotations;
use slipway_reconcile::host::HostKey;

use crate::engine::secret_refs_of;
use crate::sources::files::{Differ, FilesSource};
use crate::sources::kube::{hardware_resource, host_resource};
use crate::state::kube::{is_not_found, write_hardware};
use crate::state::redb::RedbStore;
use crate::state::{HardwareStore, StateStore};

/// What a move did, host by host, for the summary.
#[derive(Debug, Default)]
pub struct Moved {
    pub hosts: Vec<(HostKey, String)>,
    pub skipped: Vec<(HostKey, String)>,
    pub secrets: usize,
    pub ca: &'static str,
}

/// Moves the hosts of the files-mode coordinator whose state is `state` (stopped) and whose
/// documents are in `hosts_dir` into the cluster of `client`; the CA goes to `namespace`.
pub async fn to_kube(
    client: Client,
    state: &Path,
    hosts_dir: &Path,
    namespace: &str,
) -> anyhow::Result<Moved> {
    let mut store = RedbStore::open(state).map_err(|e| {
        anyhow::anyhow!(
            "{}; stop the files-mode coordinator before moving its hosts",
            crate::error_chain(&e)
        )
    })?;
    let loaded = store
        .load()
        .map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?;
    if !hosts_dir.is_dir() {
        bail!(
            "the hosts directory {} does not exist: give --hosts the directory the files-mode \
             coordinator read (its Secrets are moved too)",
            hosts_dir.display()
        );
    }
    let mut files = FilesSource::new(hosts_dir);
    files.scan();
    let mut differ = Differ::default();
    differ.diff(&files.snapshot());
    let secrets = differ.secrets().clone();

    let mut moved = Moved {
        ca: push_ca(client.clone(), namespace, &state.join("pki")).await?,
        ..Default::default()
    };
    let mut secret_keys = BTreeSet::new();
    for (key, stored) in &loaded.hosts {
        let record = &stored.record;
        if record.deleted || record.origin == crate::engine::DISCOVERED {
            continue;
        }
        let hosts: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &key.namespace, &host_resource());
        let mut status = serde_json::to_value(&stored.status)?;
        crate::state::kube::drop_nulls(&mut status);
        let mut doc = serde_json::to_value(&record.host)?;
        if let Some(map) = doc.as_object_mut() {
            map.remove("status");
        }
        let meta = &mut doc["metadata"];
        if let Some(m) = meta.as_object_mut() {
            for k in [
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "generation",
                "managedFields",
            ] {
                m.remove(k);
            }
        }
        meta["namespace"] = key.namespace.clone().into();
        meta["annotations"][annotations::STATUS] = serde_json::to_string(&status)?.into();
        let obj: DynamicObject = serde_json::from_value(doc)
            .with_context(|| format!("cannot make the BareMetalHost of {key}"))?;
        let created = match hosts.create(&PostParams::default(), &obj).await {
            Ok(o) => o,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                moved.skipped.push((
                    key.clone(),
                    "a BareMetalHost of this name exists in the cluster: left as it is".into(),
                ));
                continue;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                moved.skipped.push((
                    key.clone(),
                    format!(
                        "no namespace {} in the cluster: create it and move again",
                        key.namespace
                    ),
                ));
                continue;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create the BareMetalHost {key}"));
            }
        };
        if let Some(hw) = store
            .hardware(key)
            .map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?
        {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &key.namespace, &hardware_resource());
            write_hardware(&api, key, created.uid().as_deref(), &hw)
                .await
                .map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        }
        secret_keys.extend(secret_refs_of(key, &record.host.spec));
        moved
            .hosts
            .push((key.clone(), stored.status.provisioning.state.to_string()));
    }
    for sk in secret_keys {
        let Some(secret) = secrets.get(&sk) else {
            continue; // a reference to a missing Secret stays an error in the cluster too
        };
        let api: Api<KubeSecret> = Api::namespaced(client.clone(), &sk.namespace);
        let obj = KubeSecret {
            metadata: ObjectMeta {
                name: Some(sk.name.clone()),
                namespace: Some(sk.namespace.clone()),
                ..Default::default()
            },
            data: Some(
                secret
                    .data
                    .iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                    .collect(),
            ),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => moved.secrets += 1,
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot create the Secret {}/{}", sk.namespace, sk.name)
                });
            }
        }
    }
    Ok(moved)
}

/// The files-mode CA into the Secret `slipway-ca`, unless the cluster has one.
async fn push_ca(client: Client, namespace: &str, pki: &Path) -> anyhow::Result<&'static str> {
    let api: Api<KubeSecret> = Api::namespaced(client, namespace);
    match api.get("slipway-ca").await {
        Ok(_) => return Ok("the cluster's CA kept (agents enrolled here enrol again)"),
        Err(e) if is_not_found(&e) => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the Secret {namespace}/slipway-ca"));
        }
    }
    let read = |f: &str| {
        std::fs::read(pki.join(f)).with_context(|| format!("cannot read {}", pki.join(f).display()))
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
    api.create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("cannot create the Secret {namespace}/slipway-ca"))?;
    Ok("the files-mode CA moved")
}

/// What a move out of the cluster did.
#[derive(Debug, Default)]
pub struct MovedOut {
    pub hosts: Vec<(HostKey, String)>,
    pub skipped: Vec<(HostKey, String)>,
    /// Hosts moved whose object is still in the cluster (detached), with why.
    pub left: Vec<(HostKey, String)>,
    pub secrets: usize,
    pub ca: &'static str,
}

/// The reverse of [`to_kube`]: moves the BareMetalHosts of the cluster (of `namespace`, or of
/// every namespace; discovered ones stay) to a files-mode coordinator that is not running,
/// whose store is `state` and whose documents go to `hosts_dir`, so it adopts them as they
/// are. The coordinator in the cluster must be running: each host is first detached
/// (metal3's `baremetalhost.metal3.io/detached`), and moved only once that coordinator says
/// so in its status, so nothing is in flight; then its document and the Secrets it
/// references are written to `hosts_dir`, its record, status and inventory to the files-mode
/// store, the CA to `state/pki` (unless one is there), and last the object is deleted from
/// the cluster, which a detached host leaves without deprovisioning. A host that does not
/// detach within `timeout` is left as it was.
pub async fn to_files(
    client: Client,
    state: &Path,
    hosts_dir: &Path,
    namespace: Option<&str>,
    ca_namespace: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<MovedOut> {
    use crate::state::{Batch, HostChange};
    use kube::api::{DeleteParams, ListParams, Patch, PatchParams};

    std::fs::create_dir_all(state)
        .with_context(|| format!("cannot create the state directory {}", state.display()))?;
    let mut store = RedbStore::open(state).map_err(|e| {
        anyhow::anyhow!(
            "{}; the files-mode coordinator must be stopped while hosts move to it",
            crate::error_chain(&e)
        )
    })?;
    let known: BTreeSet<HostKey> = store
        .load()
        .map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?
        .hosts
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    std::fs::create_dir_all(hosts_dir)
        .with_context(|| format!("cannot create the hosts directory {}", hosts_dir.display()))?;
    let hosts: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &host_resource()),
        None => Api::all_with(client.clone(), &host_resource()),
    };
    let api_of = |key: &HostKey| -> Api<DynamicObject> {
        Api::namespaced_with(client.clone(), &key.namespace, &host_resource())
    };
    let list = hosts
        .list(&ListParams::default())
        .await
        .context("cannot list BareMetalHosts (are the CRDs installed?)")?;
    // The CA first: a wrong --to-namespace stops the move before any host is touched.
    let mut out = MovedOut {
        ca: pull_ca(client.clone(), ca_namespace, &state.join("pki")).await?,
        ..Default::default()
    };
    let mut candidates = Vec::new();
    for obj in list.items {
        let key = HostKey::new(obj.namespace().unwrap_or_default(), obj.name_any());
        let skip = if crate::sources::kube::is_discovered(&obj) {
            continue; // discovered machines are the cluster's business
        } else if obj.metadata.deletion_timestamp.is_some() {
            Some("it is being deleted".to_string())
        } else if let Err(e) = crate::sources::kube::parse_host(&obj) {
            Some(format!("its object does not parse ({e}): fix it first"))
        } else if !obj.data.get("status").is_some_and(|s| s.is_object()) {
            Some(
                "the cluster's coordinator has not reconciled it yet (no status): move its \
                 document by hand"
                    .to_string(),
            )
        } else if known.contains(&key) {
            Some("the files-mode store has a host of this name already: left as it is".into())
        } else if host_file(hosts_dir, &key).exists() {
            Some(format!(
                "{} exists already: left as it is",
                host_file(hosts_dir, &key).display()
            ))
        } else {
            None
        };
        match skip {
            Some(why) => out.skipped.push((key, why)),
            None => candidates.push((key, obj)),
        }
    }

    // Detach them all, then wait for the cluster's coordinator to let go of each.
    let mut added = BTreeSet::new();
    for (key, obj) in &candidates {
        if obj
            .annotations()
            .get(annotations::DETACHED)
            .map(String::as_str)
            == Some("")
        {
            continue;
        }
        let patch = serde_json::json!({"metadata": {"annotations": {annotations::DETACHED: ""}}});
        api_of(key)
            .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("cannot annotate {key} as detached"))?;
        if !obj.annotations().contains_key(annotations::DETACHED) {
            added.insert(key.clone());
        }
    }
    let deadline = std::time::Instant::now() + timeout;
    let mut detached = Vec::new();
    for (key, _) in candidates {
        let obj = loop {
            let obj = api_of(&key)
                .get(&key.name)
                .await
                .with_context(|| format!("cannot read {key}"))?;
            let status = obj.data.pointer("/status/operationalStatus");
            if status.and_then(|s| s.as_str()) == Some("detached") {
                break Some(obj);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        };
        match obj {
            Some(obj) => detached.push((key, obj)),
            None => {
                if added.contains(&key) {
                    let patch = serde_json::json!({"metadata": {"annotations": {annotations::DETACHED: null}}});
                    api_of(&key)
                        .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .with_context(|| {
                            format!("cannot take the detached annotation off {key}")
                        })?;
                }
                out.skipped.push((
                    key,
                    format!(
                        "the cluster's coordinator did not detach it within {} s (is `slipway \
                         serve --kube` running? an operation in flight finishes first): \
                         nothing moved, the detached annotation taken off again",
                        timeout.as_secs()
                    ),
                ));
            }
        }
    }

    // Write each detached host to the files side, then let it go from the cluster.
    let mut secrets_written = BTreeSet::new();
    for (key, obj) in detached {
        let Some((_, mut record, status, _)) = crate::state::kube::stored_of(&obj) else {
            out.skipped.push((
                key,
                "its status does not parse: left in the cluster, detached".into(),
            ));
            continue;
        };
        let meta = &mut record.host.metadata;
        for a in [annotations::DETACHED, annotations::STATUS, LAST_APPLIED] {
            meta.annotations.remove(a);
        }
        meta.uid = None;
        meta.generation = None;
        let created = meta.creation_timestamp.take();
        let doc = serde_yaml_ng::to_string(&record.host)
            .with_context(|| format!("cannot write the document of {key}"))?;
        record.host.metadata.creation_timestamp = created;
        for sk in secret_refs_of(&key, &record.host.spec) {
            if !secrets_written.insert(sk.clone()) {
                continue;
            }
            if write_secret_file(client.clone(), hosts_dir, &sk).await? {
                out.secrets += 1;
            }
        }
        let file = host_file(hosts_dir, &key);
        write_new(&file, doc.as_bytes(), 0o644)?;
        record.origin = file.display().to_string();
        record.deleted = false;
        let hw_api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &key.namespace, &hardware_resource());
        let hardware = match hw_api.get(&key.name).await {
            Ok(o) => serde_json::to_value(&o)
                .ok()
                .and_then(|v| serde_json::from_value(v).ok()),
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(e).with_context(|| format!("cannot read the HardwareData {key}")),
        };
        let state_name = status.provisioning.state.to_string();
        let batch = Batch {
            id: 1,
            hosts: vec![(
                key.clone(),
                HostChange {
                    record: Some(record),
                    status: Some(status),
                    hardware,
                    ..Default::default()
                },
            )],
        };
        if let Err(failed) = store.commit(&batch) {
            let why = failed
                .into_iter()
                .map(|(_, w)| w)
                .collect::<Vec<_>>()
                .join("; ");
            bail!("cannot store {key} in {}: {why}", state.display());
        }
        match api_of(&key)
            .delete(&key.name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                out.left.push((
                    key.clone(),
                    format!("cannot delete it ({e}); delete it by hand"),
                ));
            }
        }
        out.hosts.push((key, state_name));
    }
    // The cluster's coordinator lets each detached host go (its finalizer off) as it sees the
    // deletion.
    for (key, _) in &out.hosts {
        if out.left.iter().any(|(k, _)| k == key) {
            continue;
        }
        loop {
            match api_of(key).get(&key.name).await {
                Err(e) if is_not_found(&e) => break,
                _ if std::time::Instant::now() > deadline + timeout => {
                    out.left.push((
                        key.clone(),
                        "still in the cluster, detached and deleted: its finalizer goes when the \
                         cluster's coordinator runs"
                            .into(),
                    ));
                    break;
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(300)).await,
            }
        }
    }
    Ok(out)
}

/// kubectl's record of the last applied configuration, which does not belong in a file.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Where a moved host's document goes: `NAMESPACE-NAME.yaml`.
fn host_file(dir: &Path, key: &HostKey) -> std::path::PathBuf {
    dir.join(format!("{}-{}.yaml", key.namespace, key.name))
}

/// Writes a file that must not exist yet (mode `mode`).
fn write_new(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The Secret `sk` of the cluster as a document `secret-NAMESPACE-NAME.yaml` of the hosts
/// directory (readable by its owner only), unless the cluster has no such Secret (the
/// reference stays an error on the files side too) or the file exists. Whether it wrote one.
async fn write_secret_file(
    client: Client,
    dir: &Path,
    sk: &crate::sources::SecretKey,
) -> anyhow::Result<bool> {
    let api: Api<KubeSecret> = Api::namespaced(client, &sk.namespace);
    let secret = match api.get(&sk.name).await {
        Ok(s) => s,
        Err(e) if is_not_found(&e) => return Ok(false),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the Secret {}/{}", sk.namespace, sk.name));
        }
    };
    let path = dir.join(format!("secret-{}-{}.yaml", sk.namespace, sk.name));
    if path.exists() {
        return Ok(false);
    }
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": sk.name, "namespace": sk.namespace},
        "type": secret.type_.clone().unwrap_or_else(|| "Opaque".into()),
        "data": secret.data.clone().unwrap_or_default(),
    });
    let text = serde_yaml_ng::to_string(&doc)
        .with_context(|| format!("cannot write the Secret {}/{}", sk.namespace, sk.name))?;
    write_new(&path, text.as_bytes(), 0o600)?;
    Ok(true)
}

/// The cluster's CA into the files-mode `pki` directory, unless it has a CA already; an
/// error if the cluster has none in `namespace` (a wrong namespace: its coordinator always
/// makes one).
async fn pull_ca(client: Client, namespace: &str, pki: &Path) -> anyhow::Result<&'static str> {
    if pki.join("ca.crt").exists() {
        return Ok("the files-mode CA kept (agents enrolled in the cluster enrol again)");
    }
    let api: Api<KubeSecret> = Api::namespaced(client, namespace);
    match api.get("slipway-ca").await {
        Ok(s) => {
            crate::state::kube::write_ca(&s, namespace, pki)?;
            Ok("the cluster's CA moved")
        }
        Err(e) if is_not_found(&e) => bail!(
            "there is no Secret {namespace}/slipway-ca, the CA of the cluster's coordinator: give \
             --to-namespace the namespace that coordinator runs in (its --namespace); nothing \
             was moved"
        ),
        Err(e) => Err(e).with_context(|| format!("cannot read the Secret {namespace}/slipway-ca")),
    }
}
