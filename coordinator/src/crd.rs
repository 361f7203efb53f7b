//! The Kubernetes CustomResourceDefinitions, generated from the Rust types (kube-derive over
//! the same `HostSpec` and `HostStatus` files mode reads), so the cluster's schema and
//! Slipway's parser cannot drift apart: `baremetalhosts.metal3.io` (metal3's group, version,
//! names, short names and printer columns, plus Slipway's Progress) and
//! `hardwaredata.metal3.io`. `slipway crd` prints them; `deploy/crds/` holds the same files,
//! kept in sync by a test. No CEL rules: the CRDs load on API servers from 1.16 on.

use kube_core::CustomResourceExt;
use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use slipway_reconcile::host::{HostSpec, HostStatus};

/// BareMetalHost is a physical machine Slipway manages: how to reach its BMC and boot it,
/// and the image to write to it (spec), and what Slipway observed of it (status).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    crates(
        kube_core = "::kube_core",
        k8s_openapi = "::k8s_openapi",
        schemars = "::schemars",
        serde = "::serde",
        serde_json = "::serde_json"
    ),
    group = "metal3.io",
    version = "v1alpha1",
    kind = "BareMetalHost",
    plural = "baremetalhosts",
    shortname = "bmh",
    shortname = "bmhost",
    namespaced,
    status = "BareMetalHostStatus",
    printcolumn = r#"{"name":"Status","type":"string","description":"Operational status","jsonPath":".status.operationalStatus","priority":1}"#,
    printcolumn = r#"{"name":"State","type":"string","description":"Provisioning status","jsonPath":".status.provisioning.state"}"#,
    printcolumn = r#"{"name":"Consumer","type":"string","description":"Consumer using this host","jsonPath":".spec.consumerRef.name"}"#,
    printcolumn = r#"{"name":"BMC","type":"string","description":"Address of management controller","jsonPath":".spec.bmc.address","priority":1}"#,
    printcolumn = r#"{"name":"Online","type":"string","description":"Whether the host is online or not","jsonPath":".spec.online"}"#,
    printcolumn = r#"{"name":"Error","type":"string","description":"Type of the most recent error","jsonPath":".status.errorType"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","description":"Phase of the command the agent is running (download, write, erase, ...)","jsonPath":".status.progress.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","description":"Time duration since creation of BaremetalHost","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct BareMetalHostSpec(pub HostSpec);

/// BareMetalHostStatus is what Slipway observed of the host: metal3's status fields, and
/// Slipway's own record under `slipway`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BareMetalHostStatus {
    #[serde(flatten)]
    pub status: HostStatus,
    /// Slipway's record of the host, what it needs to resume it after a restart: the agent's
    /// certificate fingerprint, the inventory's digest, the machine's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slipway: Option<crate::state::kube::KubeRecord>,
}

/// HardwareData is the full hardware inventory of a BareMetalHost, as its agent reported it
/// at inspection, in an object of the same name owned by the host.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    crates(
        kube_core = "::kube_core",
        k8s_openapi = "::k8s_openapi",
        schemars = "::schemars",
        serde = "::serde",
        serde_json = "::serde_json"
    ),
    group = "metal3.io",
    version = "v1alpha1",
    kind = "HardwareData",
    plural = "hardwaredata",
    shortname = "hd",
    namespaced,
    printcolumn = r#"{"name":"Age","type":"date","description":"Time duration since creation of HardwareData","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct HardwareDataSpec {
    /// The hardware discovered on the host during its inspection: metal3's HardwareDetails
    /// fields (systemVendor, firmware, ramMebibytes, nics, storage, cpu, hostname) and
    /// Slipway's additions (DIMMs, NUMA nodes, PCI devices, BMC, LLDP neighbours, partitions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "slipway_reconcile::schema::any_object")]
    pub hardware: Option<serde_json::Value>,
}

type Crd =
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// The CRDs, in the order to apply them.
pub fn all() -> Vec<Crd> {
    vec![host_crd(), hardware_crd()]
}

/// `baremetalhosts.metal3.io`, as the API server accepts it.
pub fn host_crd() -> Crd {
    valid_for_api_servers(BareMetalHost::crd())
}

/// `hardwaredata.metal3.io`.
pub fn hardware_crd() -> Crd {
    valid_for_api_servers(HardwareData::crd())
}

/// What the API server's validation refuses in schemars' output, taken out, and what
/// `kubectl explain` needs, put in:
/// - a `null` among an optional enum's values ("unknown object type nil");
/// - `default`s of `null` or of objects holding nulls ("must be of type string"). No defaults
///   at all: the API server stores what the owner wrote, and Slipway's parser applies its own
///   defaults, the same in files mode;
/// - `nullable` in the spec: the API server's OpenAPI v2 drops the type of a nullable field,
///   and `kubectl explain` then shows none of its fields. metal3's CRD has none either. The
///   status keeps them: Slipway never writes a null (absent is None), but kube-apiserver 1.20's
///   server-side apply leaves a null where an applied object field was dropped (the command
///   in flight, once done), and would then refuse its own result;
/// - the `type` of optional objects, which schemars leaves out;
/// - the spec's place among the required fields (metal3 requires none).
///
/// The spec does not preserve unknown fields: the API server would then publish it without
/// its fields, and `kubectl explain` would show none. Every field of metal3's API is in the
/// schema; a field that is not (a typo) is refused by kubectl's validation (server-side from
/// 1.25, from the published schema before), naming it.
fn valid_for_api_servers(crd: Crd) -> Crd {
    fn walk(v: &mut serde_json::Value, property_names: bool, keep_nullable: bool) {
        match v {
            serde_json::Value::Object(map) => {
                if !property_names {
                    map.remove("default");
                    // An optional struct comes out of schemars without its type; `kubectl
                    // explain` then shows no fields.
                    if !map.contains_key("type") {
                        if map.contains_key("properties") {
                            map.insert("type".into(), "object".into());
                        } else if map.contains_key("items") {
                            map.insert("type".into(), "array".into());
                        }
                    }
                    if !keep_nullable {
                        map.remove("nullable");
                    }
                    if let Some(serde_json::Value::Array(values)) = map.get_mut("enum") {
                        values.retain(|v| !v.is_null());
                    }
                }
                for (key, child) in map.iter_mut() {
                    walk(child, !property_names && key == "properties", keep_nullable);
                }
            }
            serde_json::Value::Array(items) => {
                items.iter_mut().for_each(|i| walk(i, false, keep_nullable))
            }
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    if let Some(versions) = value["spec"]["versions"].as_array_mut() {
        for v in versions {
            let schema = &mut v["schema"]["openAPIV3Schema"];
            // metal3 does not require a spec (its demo's discovered host has none).
            if let Some(required) = schema.get_mut("required").and_then(|r| r.as_array_mut()) {
                required.retain(|r| r != "spec");
                if required.is_empty() {
                    schema.as_object_mut().map(|m| m.remove("required"));
                }
            }
            // The status keeps its nullables (see above), taken out of the walk.
            let status = schema
                .get_mut("properties")
                .and_then(|p| p.as_object_mut())
                .and_then(|p| p.remove("status"));
            walk(schema, false, false);
            if let Some(mut status) = status {
                walk(&mut status, false, true);
                schema["properties"]["status"] = status;
            }
        }
    }
    serde_json::from_value(value).unwrap_or(crd)
}

/// One CRD as YAML.
pub fn yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Result<String, serde_yaml_ng::Error> {
    serde_yaml_ng::to_string(crd)
}

/// Every CRD as one multi-document YAML stream (`slipway crd`).
pub fn all_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&yaml(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed CRDs are what the types generate (`UPDATE_EXPECT=1 cargo test -p
    /// slipway-coordinator crd` rewrites them).
    #[test]
    fn deploy_crds_match_the_types() {
        expect_test::expect_file!["../../deploy/crds/baremetalhosts.metal3.io.yaml"]
            .assert_eq(&yaml(&host_crd()).unwrap());
        expect_test::expect_file!["../../deploy/crds/hardwaredata.metal3.io.yaml"]
            .assert_eq(&yaml(&hardware_crd()).unwrap());
    }

    /// No `null` among an enum's values (the API server refuses it), and optional enums say
    /// they are nullable in the status only.
    #[test]
    fn no_nulls_defaults_or_nullables_and_optional_objects_typed() {
        let crd = serde_json::to_value(host_crd()).unwrap();
        let text = serde_json::to_string(&crd).unwrap();
        assert!(
            !text.contains(",null]") && !text.contains("[null"),
            "a null in an enum"
        );
        assert!(!text.contains("\"default\""), "a default in the schema");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let hints = &schema["properties"]["spec"]["properties"]["rootDeviceHints"];
        assert_eq!(hints["type"], "object", "{hints}");
        let spec = serde_json::to_string(&schema["properties"]["spec"]).unwrap();
        assert!(
            !spec.contains("\"nullable\""),
            "nullable hides types from kubectl explain"
        );
        let status = &schema["properties"]["status"]["properties"];
        assert_eq!(status["currentCommand"]["nullable"], true);
        assert_eq!(status["progress"]["nullable"], true);
        let boot_mode = &schema["properties"]["spec"]["properties"]["bootMode"];
        assert!(
            boot_mode["enum"]
                .as_array()
                .is_some_and(|e| e.contains(&"UEFI".into()))
        );
    }

    /// Paths of schema properties without a description.
    fn undescribed(path: &str, schema: &serde_json::Value, out: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let p = format!("{path}.{name}");
                if sub.get("description").is_none() {
                    out.push(p.clone());
                }
                undescribed(&p, sub, out);
            }
        }
        if let Some(items) = schema.get("items") {
            undescribed(&format!("{path}[]"), items, out);
        }
        if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
            undescribed(&format!("{path}{{}}"), extra, out);
        }
    }

    /// `kubectl explain bmh.spec.X` helps for every field: each has a description.
    #[test]
    fn every_field_of_the_host_schema_is_described() {
        let crd = serde_json::to_value(host_crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = Vec::new();
        for part in ["spec", "status"] {
            let s = &schema["properties"][part];
            if s.get("description").is_none() {
                missing.push(part.to_string());
            }
            undescribed(part, s, &mut missing);
        }
        assert!(
            missing.is_empty(),
            "fields without a description:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn the_host_crd_has_metal3s_names_and_columns_and_no_cel() {
        let crd = serde_json::to_value(host_crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "baremetalhosts.metal3.io");
        assert_eq!(
            crd["spec"]["names"]["shortNames"],
            serde_json::json!(["bmh", "bmhost"])
        );
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["subresources"]["status"], serde_json::json!({}));
        let columns: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            columns,
            [
                "Status", "State", "Consumer", "BMC", "Online", "Error", "Progress", "Age"
            ]
        );
        let text = serde_json::to_string(&crd).unwrap();
        assert!(
            !text.contains("x-kubernetes-validations"),
            "CEL needs 1.25+"
        );
    }
}
