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
