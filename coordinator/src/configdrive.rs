//! Config-drive contents, resolved from the host's Secrets when a write-image command is sent.
//!
//! **Invariant:** contents exist only here, on their way to the agent: the reconciler and the
//! stored status carry references ([`ConfigDriveRefs`]); [`ConfigDriveData`]'s `Debug` shows
//! sizes; error messages name hosts, fields, Secrets and keys, never values.
//!
//! `meta_data.json` follows metal3 (baremetal-operator's defaults, then the `metaData`
//! Secret's keys on top) and Ironic (`uuid`, `name`), plus what cloud-init's OpenStack reader
//! and Nova's metadata carry (`hostname`, `launch_index`, `public_keys`).

use std::fmt;

use serde_json::{Map, Value};
use sha2::Digest;
use slipway_reconcile::host::{
    BareMetalHost, ConfigDriveRefs, META_DATA_KEYS, NETWORK_DATA_KEYS, SecretRef, USER_DATA_KEYS,
};

use crate::sources::Secret;

/// What the agent writes into the config drive.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ConfigDriveData {
    pub user_data: Option<Vec<u8>>,
    /// JSON.
    pub network_data: Option<Vec<u8>>,
    /// JSON object.
    pub meta_data: Vec<u8>,
}

impl fmt::Debug for ConfigDriveData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = |o: &Option<Vec<u8>>| o.as_ref().map(Vec::len);
        f.debug_struct("ConfigDriveData")
            .field("user_data_bytes", &len(&self.user_data))
            .field("network_data_bytes", &len(&self.network_data))
            .field("meta_data_bytes", &self.meta_data.len())
            .finish()
    }
}

/// The host's uuid for `meta_data.json`: its Kubernetes uid, or (files mode, no uid) one
/// derived from its namespace and name, stable across re-provisioning.
pub fn host_uuid(host: &BareMetalHost) -> String {
    if let Some(uid) = host.metadata.uid.as_deref().filter(|u| !u.is_empty()) {
        return uid.to_string();
    }
    let ns = host.metadata.namespace.as_deref().unwrap_or("");
    let mut b: [u8; 16] = sha2::Sha256::digest(format!("slipway:host:{ns}/{}", host.metadata.name))
        [..16]
        .try_into()
        .unwrap_or([0; 16]);
    b[6] = (b[6] & 0x0f) | 0x80; // version 8 (custom, RFC 9562)
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn value(
    host: &str,
    field: &str,
    r: &SecretRef,
    keys: [&str; 2],
    secrets: &impl Fn(&SecretRef) -> Option<Secret>,
) -> Result<Vec<u8>, String> {
    let secret = secrets(r).ok_or_else(|| {
        format!(
            "host {host}: {field} names Secret {:?}, which does not exist",
            r.name
        )
    })?;
    keys.iter()
        .find_map(|k| secret.data.get(*k))
        .cloned()
        .ok_or_else(|| {
            format!(
                "host {host}: Secret {:?} ({field}) has no key {} or {}",
                r.name, keys[0], keys[1]
            )
        })
}

/// YAML (or JSON, which is YAML) to a JSON value; the error names the Secret, not the text.
fn structured(host: &str, field: &str, r: &SecretRef, bytes: &[u8]) -> Result<Value, String> {
    serde_yaml_ng::from_slice::<Value>(bytes).map_err(|e| {
        format!(
            "host {host}: Secret {:?} ({field}) is not YAML or JSON{}",
            r.name,
            e.location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default()
        )
    })
}

/// Resolves the references into contents; `secrets` finds a referenced Secret (in the host's
/// namespace unless the reference names another).
pub fn resolve(
    host: &BareMetalHost,
    refs: &ConfigDriveRefs,
    secrets: impl Fn(&SecretRef) -> Option<Secret>,
) -> Result<ConfigDriveData, String> {
    let secrets = &secrets;
    let name = host.metadata.name.as_str();
    let user_data = match &refs.user_data {
        Some(r) => Some(value(name, "spec.userData", r, USER_DATA_KEYS, secrets)?),
        None => None,
    };
    let network_data = match &refs.network_data {
        Some(r) => {
            let v = value(name, "spec.networkData", r, NETWORK_DATA_KEYS, secrets)?;
            let json = structured(name, "spec.networkData", r, &v)?;
            Some(serde_json::to_vec(&json).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let mut meta = Map::new();
    let put = |m: &mut Map<String, Value>, k: &str, v: &str| {
        m.insert(k.to_string(), Value::from(v));
    };
    // baremetal-operator's defaults.
    put(&mut meta, "uuid", &host_uuid(host));
    put(
        &mut meta,
        "metal3-namespace",
        host.metadata.namespace.as_deref().unwrap_or(""),
    );
    put(&mut meta, "metal3-name", name);
    put(&mut meta, "local-hostname", name);
    put(&mut meta, "local_hostname", name);
    put(&mut meta, "name", name);
    put(&mut meta, "hostname", name);
    meta.insert("launch_index".into(), Value::from(0));
    meta.insert("public_keys".into(), Value::Object(Map::new()));
    if let Some(r) = &refs.meta_data {
        let v = value(name, "spec.metaData", r, META_DATA_KEYS, secrets)?;
        match structured(name, "spec.metaData", r, &v)? {
            Value::Object(given) => meta.extend(given),
            Value::Null => {}
            _ => {
                return Err(format!(
                    "host {name}: Secret {:?} (spec.metaData) must hold a map of keys to values",
                    r.name
                ));
            }
        }
    }
    Ok(ConfigDriveData {
        user_data,
        network_data,
        meta_data: serde_json::to_vec(&Value::Object(meta)).map_err(|e| e.to_string())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn lookup(secrets: &BTreeMap<String, Secret>) -> impl Fn(&SecretRef) -> Option<Secret> + '_ {
        |r| secrets.get(&r.name).cloned()
    }

    fn secret(name: &str, kv: &[(&str, &str)]) -> (String, Secret) {
        (
            name.to_string(),
            Secret {
                name: name.into(),
                namespace: None,
                data: kv
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                    .collect(),
            },
        )
    }

    fn host() -> BareMetalHost {
        let mut h = BareMetalHost::default();
        h.metadata.name = "worker-0".into();
        h.metadata.namespace = Some("metal3".into());
        h
    }

    fn r(name: &str) -> Option<SecretRef> {
        Some(SecretRef {
            name: name.into(),
            namespace: None,
        })
    }

    #[test]
    fn resolves_like_metal3_with_secret_meta_data_on_top() {
        let secrets: BTreeMap<_, _> = [
            secret("ud", &[("value", "#cloud-config\npassword: hunter2\n")]),
            secret("nd", &[("networkData", "links: []\nnetworks: []\n")]),
            secret(
                "md",
                &[(
                    "metaData",
                    "hostname: custom\npublic_keys: {default: ssh-ed25519 AAAA}\n",
                )],
            ),
        ]
        .into();
        let refs = ConfigDriveRefs {
            user_data: r("ud"),
            network_data: r("nd"),
            meta_data: r("md"),
        };
        let d = resolve(&host(), &refs, lookup(&secrets)).unwrap();
        assert_eq!(
            d.user_data.as_deref(),
            Some(&b"#cloud-config\npassword: hunter2\n"[..])
        );
        let nd: Value = serde_json::from_slice(d.network_data.as_ref().unwrap()).unwrap();
        assert_eq!(nd, serde_json::json!({"links": [], "networks": []}));
        let md: Value = serde_json::from_slice(&d.meta_data).unwrap();
        assert_eq!(md["hostname"], "custom");
        assert_eq!(md["name"], "worker-0");
        assert_eq!(md["metal3-namespace"], "metal3");
        assert_eq!(md["public_keys"]["default"], "ssh-ed25519 AAAA");
        assert_eq!(md["uuid"], host_uuid(&host()));
        // Debug shows sizes, never contents.
        let dbg = format!("{d:?}");
        assert!(
            !dbg.contains("hunter2") && dbg.contains("user_data_bytes"),
            "{dbg}"
        );
    }

    #[test]
    fn errors_name_the_secret_never_its_contents() {
        let secrets: BTreeMap<_, _> = [secret("nd", &[("networkData", "{hunter2: [")])].into();
        let refs = ConfigDriveRefs {
            network_data: r("nd"),
            ..Default::default()
        };
        let e = resolve(&host(), &refs, lookup(&secrets)).unwrap_err();
        assert!(e.contains("\"nd\"") && e.contains("worker-0"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let refs = ConfigDriveRefs {
            user_data: r("gone"),
            ..Default::default()
        };
        let e = resolve(&host(), &refs, lookup(&secrets)).unwrap_err();
        assert!(
            e.contains("spec.userData") && e.contains("does not exist"),
            "{e}"
        );
        // A Secret's Debug (the snapshot's, in any log) shows its keys only.
        let dbg = format!("{:?}", secrets["nd"]);
        assert!(
            dbg.contains("networkData") && !dbg.contains("hunter2"),
            "{dbg}"
        );
    }

    #[test]
    fn uuid_is_the_uid_or_stable_per_name() {
        let mut h = host();
        let a = host_uuid(&h);
        assert_eq!(a, host_uuid(&host()));
        assert_eq!(a.len(), 36);
        h.metadata.name = "worker-1".into();
        assert_ne!(a, host_uuid(&h));
        h.metadata.uid = Some("0d6d0c4f-uid".into());
        assert_eq!(host_uuid(&h), "0d6d0c4f-uid");
    }
}
