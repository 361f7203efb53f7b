//! The `BareMetalHost` type family in the metal3.io/v1alpha1 shape.
//!
//! Field names and string values follow metal3's CRD exactly, so existing manifests parse
//! unchanged and `kubectl get bmh -o yaml` looks familiar. Slipway's own additions to the status
//! live under clearly named fields (`progress`, `agent`, `currentCommand`, `retryAfter`).
//!
//! The spec rejects unknown fields (a typo must not silently drop an intent). Every field and
//! value of metal3's current BareMetalHostSpec parses; those Slipway does not act on yet
//! (`raid`, `firmware`, `customDeploy`, `networkInterfaces`, `taints`, OCI images, `fast`
//! inspection, ...) are kept and refused by [`crate::validate`] with a message naming the
//! field, rather than ignored.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// API group/version of the BareMetalHost kind.
pub const API_VERSION: &str = "metal3.io/v1alpha1";
/// The kind name.
pub const KIND: &str = "BareMetalHost";

/// A host as declared by its owner (spec) and observed by Slipway (status).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct BareMetalHost {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HostSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<HostStatus>,
}

/// The subset of Kubernetes object metadata Slipway uses. Other metadata fields (managedFields,
/// ownerReferences, ...) are accepted and dropped, so `kubectl get -o yaml` output parses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::optional_timestamp")
    )]
    pub creation_timestamp: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// What the owner wants of the host (metal3's BareMetalHostSpec, the desired state of the
/// BareMetalHost). Unknown fields are refused.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostSpec {
    /// How to reach the host's BMC (Baseboard Management Controller). Absent: power is by hand
    /// and the host is driven only through its agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc: Option<BmcDetails>,
    /// MAC address of the NIC the host PXE-boots from (the NIC used for provisioning the host).
    /// The MAC address of the BMC must never be used here. Six hex pairs separated by colons,
    /// e.g. 52:54:00:12:34:56; anything else is a registration error.
    #[serde(
        default,
        rename = "bootMACAddress",
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_mac_address: Option<String>,
    /// Select the method of initializing the hardware during boot: UEFI (the default),
    /// UEFISecureBoot (turns secure boot on after provisioning) or legacy (only for hardware
    /// that does not support UEFI correctly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_mode: Option<BootMode>,
    /// Whether the host should be powered on. Once the host is in a stable state (e.g.
    /// provisioned), its power state is forced to match this value.
    #[serde(default)]
    pub online: bool,
    /// The image to provision. Setting it provisions the host; removing it deprovisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Image>,
    /// Guidance about how to choose the disk the image is written to: every hint that is set
    /// must match the chosen disk, and among several matching disks the smallest wins. Without
    /// hints, the smallest disk of at least 4 GiB is chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_device_hints: Option<RootDeviceHints>,
    /// The Secret holding the user data (key `userData`, or `value` as Cluster API writes it),
    /// which is passed to the config drive and interpreted by the first-boot software such as
    /// cloud-init. The format of user data is specific to the first-boot software.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<SecretRef>,
    /// The Secret holding the network configuration (key `networkData`, or `value`; YAML or
    /// JSON), which is passed to the config drive and interpreted by the first-boot software
    /// such as cloud-init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_data: Option<SecretRef>,
    /// The Secret holding host metadata (key `metaData`, or `value`), which is passed to the
    /// config drive. Metadata is generated for the host by default (uuid, name, hostname, ...);
    /// the Secret's keys are laid on top, so most users do not need to set this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<SecretRef>,
    /// metal3's name of a Secret in the host's namespace with network configuration for the
    /// preprovisioning image (ramdisk). Accepted by the schema, but Slipway does not support it
    /// (its ramdisk configures the boot NIC by DHCP): a non-empty value is refused on the host
    /// with a registration error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprovisioning_network_data_name: Option<String>,
    /// Whether the disks are cleaned before provisioning and after deprovisioning: metadata
    /// (the default) wipes partition tables and signatures, disabled skips cleaning. The
    /// `slipway.io/erase: full` annotation makes cleaning zero every byte instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automated_cleaning_mode: Option<CleaningMode>,
    /// Information about something that is using the host. When it is not empty, the host is
    /// considered "in use". The common use case is a link to a Machine resource when the host
    /// is used by Cluster API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_ref: Option<ObjectReference>,
    /// Something else has provisioned the image running on the host, and Slipway should only
    /// manage its power. Used for hosts that were provisioned before they were enrolled and
    /// when pivoting hosts between clusters.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub externally_provisioned: bool,
    /// How the host is inspected: agent (the default) boots the ramdisk and runs the agent's
    /// inspection, disabled performs no inspection. fast (metal3's out-of-band inspection
    /// through the BMC) is accepted by the schema but refused on the host with a registration
    /// error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inspection_mode: Option<InspectionMode>,
    /// Free text for humans, to help identify the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The name of the hardware profile for this host. Deprecated in metal3; accepted and
    /// ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_profile: Option<String>,
    /// CPU architecture of the host, e.g. x86_64 or aarch64 (amd64, x64 and arm64 are read
    /// too). When set, it must match the architecture of the coordinator's ramdisk, else the
    /// host gets a registration error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// metal3's RAID configuration. metal3 fields Slipway does not implement yet: parsed so the
    /// error can say so. Accepted by the schema, but refused on the host with a registration
    /// error when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::any_value"))]
    pub raid: Option<serde_json::Value>,
    /// metal3's firmware (BIOS) configuration, deprecated there. Slipway does not implement it:
    /// accepted by the schema, but refused on the host with a registration error when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::any_value"))]
    pub firmware: Option<serde_json::Value>,
    /// metal3's custom deploy procedure (a deploy step of a site-specific ramdisk). Slipway does
    /// not implement it: accepted by the schema, but refused on the host with a registration
    /// error when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::any_value"))]
    pub custom_deploy: Option<serde_json::Value>,
    /// Taints to apply to the corresponding Machine. Deprecated in metal3 and never implemented
    /// there; refused when non-empty (accepted by the schema, but refused on the host with a
    /// registration error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::any_value"))]
    pub taints: Option<serde_json::Value>,
    /// metal3's switch-port configuration (`networkInterfaces`); refused when non-empty
    /// (accepted by the schema, but refused on the host with a registration error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::any_value"))]
    pub network_interfaces: Option<serde_json::Value>,
    /// metal3's `disablePowerOff`: the host is never powered off (reboots only): with
    /// `online: false` it is refused by [`crate::validate`] (a registration error), and the
    /// planner skips the power off before delete and a suffixed reboot annotation's hold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disable_power_off: bool,
}

impl HostSpec {
    /// The image to provision, if one is set with a non-empty URL.
    pub fn wanted_image(&self) -> Option<&Image> {
        self.image.as_ref().filter(|i| !i.url.is_empty())
    }

    /// The cleaning mode, with metal3's default (`metadata`).
    pub fn cleaning_mode(&self) -> CleaningMode {
        self.automated_cleaning_mode.unwrap_or_default()
    }
}

/// The information necessary to communicate with the host's BMC.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BmcDetails {
    /// The URL for accessing the controller on the network. The scheme part designates the
    /// driver to use with the host, as in metal3: ipmi://, redfish://,
    /// redfish-virtualmedia://, redfish-uefihttp://, idrac-redfish://, ilo5-redfish://, ...
    /// (an address without a scheme is IPMI); none:// is Slipway's own for a host without a
    /// BMC (power by hand).
    pub address: String,
    /// The name of the Secret in the host's namespace containing the BMC credentials (requires
    /// keys `username` and `password`).
    #[serde(default)]
    pub credentials_name: String,
    /// Disables verification of server certificates when using HTTPS to connect to the BMC.
    /// This is required when the server certificate is self-signed, but is insecure because it
    /// allows a man-in-the-middle to intercept the connection.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disable_certificate_verification: bool,
}

/// The boot mode of the system: UEFI, UEFISecureBoot or legacy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum BootMode {
    #[serde(rename = "UEFI")]
    Uefi,
    #[serde(rename = "UEFISecureBoot")]
    UefiSecureBoot,
    #[serde(rename = "legacy")]
    Legacy,
}

/// The image to write to the root disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Image {
    /// http(s) URL of the image. metal3's oci:// images are accepted by the schema, but
    /// refused on the host with a provisioning error.
    pub url: String,
    /// The expected digest (hex), or a URL of a checksum file (`SHA256SUMS` style). Required:
    /// the agent verifies what it writes.
    #[serde(default)]
    pub checksum: String,
    /// The checksum algorithm: md5, sha256 or sha512, or auto to detect it from the checksum.
    /// Unset reads as auto (the algorithm follows from the digest's length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum_type: Option<ChecksumType>,
    /// The format of the image: raw (also gzip, zstd or xz compressed; the default) or qcow2.
    /// metal3's vdi, vmdk and live-iso are accepted by the schema, but refused on the host with
    /// a provisioning error (convert vdi and vmdk images to qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    /// The Secret with the registry credentials of an `oci://` image (metal3); OCI images are
    /// refused by [`crate::validate`] for now: accepted by the schema, but a non-empty value is
    /// refused on the host with a provisioning error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci_auth_secret_name: Option<String>,
}

/// A checksum algorithm: md5, sha256, sha512, or auto (detected from the checksum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ChecksumType {
    Md5,
    Sha256,
    Sha512,
    Auto,
}

/// The format of an image: raw, qcow2, vdi, vmdk or live-iso (Slipway writes raw and qcow2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ImageFormat {
    #[serde(rename = "raw")]
    Raw,
    #[serde(rename = "qcow2")]
    Qcow2,
    /// VirtualBox disk image: parsed, refused by [`crate::validate`] (convert it to qcow2).
    #[serde(rename = "vdi")]
    Vdi,
    /// VMware disk image: parsed, refused by [`crate::validate`] (convert it to qcow2).
    #[serde(rename = "vmdk")]
    Vmdk,
    #[serde(rename = "live-iso")]
    LiveIso,
}

/// metal3's root device hints: every set field must match the chosen disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RootDeviceHints {
    /// A Linux device name like /dev/vda, or a stable link to it like
    /// /dev/disk/by-path/pci-0000:01:00.0-scsi-0:2:0:0 (by-path, by-id and wwn names match
    /// too). The hint must match the actual value exactly; a name that is not an absolute path
    /// is a registration error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    /// A SCSI bus address (Host:Channel:Target:Lun) like 0:0:0:0. The hint must match the
    /// actual value exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hctl: Option<String>,
    /// A vendor-specific device identifier. The hint can be a substring of the actual value
    /// (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The name of the vendor or manufacturer of the device. The hint can be a substring of the
    /// actual value (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// Device serial number. The hint must match the actual value exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    /// The minimum size of the device in Gigabytes (counted as GiB, 2^30 bytes, as Ironic
    /// does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_size_gigabytes: Option<u64>,
    /// Unique storage identifier. The hint must match the actual value exactly (case does not
    /// matter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    /// Unique storage identifier with the vendor extension appended. The hint must match the
    /// actual value exactly (case does not matter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn_with_extension: Option<String>,
    /// Unique vendor storage identifier. The hint must match the actual value exactly (case
    /// does not matter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn_vendor_extension: Option<String>,
    /// True if the device should use spinning media, false otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotational: Option<bool>,
}

/// The annotation that makes automated cleaning a full erase (decommissioning): with
/// `slipway.io/erase: full`, every byte of every disk is zeroed instead of only the metadata.
/// metal3's `automatedCleaningMode` has no value for this; `disabled` still skips cleaning.
pub const ERASE_ANNOTATION: &str = "slipway.io/erase";

/// Secret keys read for each kind of first-boot data, in order (metal3's, then the generic
/// `value` that Cluster API bootstrap secrets use).
pub const USER_DATA_KEYS: [&str; 2] = ["userData", "value"];
pub const NETWORK_DATA_KEYS: [&str; 2] = ["networkData", "value"];
pub const META_DATA_KEYS: [&str; 2] = ["metaData", "value"];

/// The annotation that makes the reboot after provisioning a kexec into the new OS
/// (`slipway.io/reboot: kexec`), skipping the firmware's POST and PXE; `firmware` (the
/// default) reboots through the firmware.
pub const REBOOT_ANNOTATION: &str = "slipway.io/reboot";

/// Whether the host's annotations ask to kexec into the installed OS.
pub fn kexec_reboot(annotations: &BTreeMap<String, String>) -> bool {
    annotations.get(REBOOT_ANNOTATION).map(String::as_str) == Some("kexec")
}

/// Whether the host's annotations ask for a full erase (an unknown value is a registration
/// problem, see [`crate::validate`]).
pub fn full_erase(annotations: &BTreeMap<String, String>) -> bool {
    annotations.get(ERASE_ANNOTATION).map(String::as_str) == Some("full")
}

/// References to the Secrets of a config drive. Only references: a command record (persisted
/// in `status.currentCommand`) never holds the contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ConfigDriveRefs {
    /// The spec's `userData` Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<SecretRef>,
    /// The spec's `networkData` Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_data: Option<SecretRef>,
    /// The spec's `metaData` Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<SecretRef>,
}

impl ConfigDriveRefs {
    /// The spec's references, if it has any.
    pub fn of(spec: &HostSpec) -> Option<ConfigDriveRefs> {
        let refs = ConfigDriveRefs {
            user_data: spec.user_data.clone(),
            network_data: spec.network_data.clone(),
            meta_data: spec.meta_data.clone(),
        };
        (refs != ConfigDriveRefs::default()).then_some(refs)
    }
}

/// A reference to a Secret holding userData, networkData or metaData.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// The name of the Secret; it must not be empty.
    pub name: String,
    /// The namespace of the Secret. Absent or empty: the host's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Whether automated cleaning runs: metadata (the default) or disabled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum CleaningMode {
    /// Wipe partition tables and signatures before and after provisioning (metal3 default).
    #[default]
    Metadata,
    /// Skip cleaning when provisioning and deprovisioning.
    Disabled,
}

/// The mode of host inspection: agent, disabled or fast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum InspectionMode {
    /// Boot the ramdisk and inspect with the agent (the default).
    Agent,
    /// No inspection.
    Disabled,
    /// Out-of-band inspection through the BMC: parsed, refused by [`crate::validate`].
    Fast,
}

/// A Kubernetes object reference (consumerRef).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectReference {
    /// API version of the referent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Kind of the referent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name of the referent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Namespace of the referent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// UID of the referent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Specific resourceVersion to which this reference is made, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// If referring to a piece of an object instead of an entire object, a JSON/Go field
    /// access statement, such as desiredState.manifest.containers[2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_path: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Status

/// What Slipway observed of the host. Written only by [`crate::plan`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    /// The status of the host: OK, discovered, error (see errorType and errorMessage), delayed
    /// (waiting for a provisioning slot) or detached (the detached annotation).
    #[serde(default)]
    pub operational_status: OperationalStatus,
    /// The type of failure encountered when operationalStatus is error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<ErrorType>,
    /// The last error message, naming the field and the fix where the spec is at fault.
    #[serde(default)]
    pub error_message: String,
    /// How many times the host has encountered an error since the last successful operation;
    /// the delay before the next attempt grows with it.
    #[serde(default)]
    pub error_count: u32,
    /// When this status was last observed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::optional_timestamp")
    )]
    pub last_updated: Option<Timestamp>,
    /// The hardware discovered on the host at inspection: metal3's summary. The full inventory
    /// is in the HardwareData object of the same name.
    ///
    /// Shared (`Arc`): the same summary is held by the status, its stored copy and the view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<std::sync::Arc<HardwareDetails>>,
    /// Information tracked by the provisioner: the state, and what was provisioned.
    #[serde(default)]
    pub provisioning: ProvisionStatus,
    /// The power state of the host as last known. It may briefly be out of sync with the
    /// hardware while provisioning processes are running.
    #[serde(default)]
    pub powered_on: bool,
    /// When the host's registration, inspection, provisioning and deprovisioning last started
    /// and ended.
    #[serde(default)]
    pub operation_history: OperationHistory,
    /// metal3's conditions (Manageable, AvailableForProvisioning, Provisioned, Ready,
    /// Progressing, Healthy), derived from the state as baremetal-operator derives them:
    /// `kubectl wait --for=condition=Ready bmh/NAME` waits for a provisioned host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<crate::conditions::Condition>,

    // ----- Slipway additions -----
    /// Progress of the running command (image write), for `slipway get hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The agent session, as last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
    /// The command the host is waiting on. Persisted so a restarted coordinator asks the agent
    /// about the same command instead of starting another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::any_object")
    )]
    pub current_command: Option<CommandRecord>,
    /// After a failure, the earliest time of the next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::optional_timestamp")
    )]
    pub retry_after: Option<Timestamp>,
    /// The last time something tried to act as this host's agent and was refused because it
    /// could be an impostor (a second enrolment while the agent is connected, a machine whose
    /// hardware is not the one inspected). Kept until an agent enrols for the host again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub possible_impostor: Option<ImpostorAlert>,
    /// The host carries `baremetalhost.metal3.io/paused`: nothing is planned or done for it
    /// until the annotation goes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// One-shot annotation requests already carried out (`reboot.metal3.io`,
    /// `inspect.metal3.io`), with the value acted on. metal3 removes such an annotation once
    /// done; a source that cannot (files) keeps it, so a request is carried out once per value
    /// and again only after the annotation was removed or changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub handled_annotations: BTreeMap<String, String>,
}

/// Something refused as a possible impostor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ImpostorAlert {
    /// When it was refused.
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub at: Timestamp,
    /// Its address, as the coordinator saw it.
    pub peer: String,
    /// What was refused, and why.
    pub what: String,
}

impl HostStatus {
    pub fn state(&self) -> ProvisioningState {
        self.provisioning.state
    }
}

/// The state of the host, with metal3's values: OK, discovered, error, delayed, detached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum OperationalStatus {
    #[default]
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "discovered")]
    Discovered,
    #[serde(rename = "error")]
    Error,
    #[serde(rename = "delayed")]
    Delayed,
    #[serde(rename = "detached")]
    Detached,
}

/// metal3's error types, as shown in the ERROR column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ErrorType {
    #[serde(rename = "registration error")]
    Registration,
    #[serde(rename = "inspection error")]
    Inspection,
    #[serde(rename = "preparation error")]
    Preparation,
    #[serde(rename = "provisioning error")]
    Provisioning,
    #[serde(rename = "provisioned registration error")]
    ProvisionedRegistration,
    #[serde(rename = "power management error")]
    PowerManagement,
    #[serde(rename = "detach error")]
    Detach,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Registration => "registration error",
            ErrorType::Inspection => "inspection error",
            ErrorType::Preparation => "preparation error",
            ErrorType::Provisioning => "provisioning error",
            ErrorType::ProvisionedRegistration => "provisioned registration error",
            ErrorType::PowerManagement => "power management error",
            ErrorType::Detach => "detach error",
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// metal3's provisioning states, with metal3's names.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ProvisioningState {
    /// Not yet seen by the state machine.
    #[default]
    #[serde(rename = "")]
    None,
    #[serde(rename = "unmanaged")]
    Unmanaged,
    #[serde(rename = "registering")]
    Registering,
    #[serde(rename = "inspecting")]
    Inspecting,
    #[serde(rename = "preparing")]
    Preparing,
    #[serde(rename = "available")]
    Available,
    #[serde(rename = "provisioning")]
    Provisioning,
    #[serde(rename = "provisioned")]
    Provisioned,
    #[serde(rename = "externally provisioned")]
    ExternallyProvisioned,
    #[serde(rename = "deprovisioning")]
    Deprovisioning,
    #[serde(rename = "powering off before delete")]
    PoweringOffBeforeDelete,
    #[serde(rename = "deleting")]
    Deleting,
}

impl ProvisioningState {
    /// Every state, in the order of a host's life.
    pub const ALL: [ProvisioningState; 12] = [
        ProvisioningState::None,
        ProvisioningState::Unmanaged,
        ProvisioningState::Registering,
        ProvisioningState::Inspecting,
        ProvisioningState::Preparing,
        ProvisioningState::Available,
        ProvisioningState::Provisioning,
        ProvisioningState::Provisioned,
        ProvisioningState::ExternallyProvisioned,
        ProvisioningState::Deprovisioning,
        ProvisioningState::PoweringOffBeforeDelete,
        ProvisioningState::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProvisioningState::None => "",
            ProvisioningState::Unmanaged => "unmanaged",
            ProvisioningState::Registering => "registering",
            ProvisioningState::Inspecting => "inspecting",
            ProvisioningState::Preparing => "preparing",
            ProvisioningState::Available => "available",
            ProvisioningState::Provisioning => "provisioning",
            ProvisioningState::Provisioned => "provisioned",
            ProvisioningState::ExternallyProvisioned => "externally provisioned",
            ProvisioningState::Deprovisioning => "deprovisioning",
            ProvisioningState::PoweringOffBeforeDelete => "powering off before delete",
            ProvisioningState::Deleting => "deleting",
        }
    }
}

impl fmt::Display for ProvisioningState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The provisioner's state of the host, and what it provisioned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ProvisionStatus {
    /// What the provisioner is doing with the host, with metal3's state names (registering,
    /// inspecting, available, provisioning, provisioned, deprovisioning, ...).
    #[serde(default)]
    pub state: ProvisioningState,
    /// The image being (or last) provisioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Image>,
    /// The root device hints used to provision the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_device_hints: Option<RootDeviceHints>,
    /// The boot mode used to provision the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_mode: Option<BootMode>,
}

/// Information about operations performed on the host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct OperationHistory {
    /// The last registration (BMC and agent checks).
    #[serde(default)]
    pub register: OperationMetric,
    /// The last hardware inspection.
    #[serde(default)]
    pub inspect: OperationMetric,
    /// The last provisioning (image write).
    #[serde(default)]
    pub provision: OperationMetric,
    /// The last deprovisioning (cleaning after the image was removed).
    #[serde(default)]
    pub deprovision: OperationMetric,
}

/// When an operation (inspection, provisioning, ...) started and ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OperationMetric {
    /// When the operation started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::optional_timestamp")
    )]
    pub start: Option<Timestamp>,
    /// When the operation ended; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::optional_timestamp")
    )]
    pub end: Option<Timestamp>,
}

impl OperationMetric {
    pub fn begin(&mut self, now: Timestamp) {
        self.start = Some(now);
        self.end = None;
    }
}

/// Progress of the current command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// The id of the command that reports the progress.
    pub command_id: String,
    /// What the command is doing, e.g. write, verify, sync; stalled while an image download
    /// makes no progress.
    pub phase: String,
    /// Bytes done so far.
    pub bytes_done: u64,
    /// Bytes to do in all. 0 when unknown.
    pub bytes_total: u64,
    /// Bytes per second over the last interval.
    #[serde(default)]
    pub bytes_per_second: u64,
}

impl Progress {
    /// Whole percent done, when the total is known.
    pub fn percent(&self) -> Option<u64> {
        (self.bytes_total > 0)
            .then(|| (u128::from(self.bytes_done) * 100 / u128::from(self.bytes_total)) as u64)
    }
}

/// The host's agent session, as last seen by the coordinator.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Whether the agent is connected to the coordinator now.
    pub connected: bool,
    /// When the current (or last) session started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::optional_timestamp")
    )]
    pub since: Option<Timestamp>,
    /// When the session was lost, while disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::optional_timestamp")
    )]
    pub disconnected_at: Option<Timestamp>,
    /// The agent's network address, as the coordinator saw it.
    #[serde(default)]
    pub address: String,
    /// The agent's version.
    #[serde(default)]
    pub version: String,
}

/// A command sent to the host's agent and not yet answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct CommandRecord {
    /// The command's id, unique for the host.
    pub id: String,
    /// What the command asks the agent to do.
    pub kind: CommandKind,
    /// When the command was issued.
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub issued_at: Timestamp,
}

/// What a command asks the agent to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum CommandKind {
    /// Inventory the hardware.
    Inspect,
    /// Write an image to the root disk, then the config drive.
    #[serde(rename_all = "camelCase")]
    WriteImage {
        /// The image to write.
        image: Image,
        /// The hints that choose the root disk.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root_device_hints: Option<RootDeviceHints>,
        /// The Secrets of the config drive: references only, resolved by the executor when it
        /// sends the command.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config_drive: Option<ConfigDriveRefs>,
    },
    /// Wipe partition tables and signatures of the host's disks (metadata cleaning), or with
    /// `full`, zero every byte (the `slipway.io/erase: full` annotation).
    EraseMetadata {
        /// Zero every byte instead of only the metadata.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        full: bool,
    },
    /// Reboot through the firmware.
    Reboot,
    /// Boot the installed OS by kexec (the `slipway.io/reboot: kexec` annotation); the agent
    /// falls back to a firmware reboot where it cannot.
    Kexec,
    /// Power the host off.
    PowerOff,
}

impl CommandKind {
    /// The short name used in command ids and messages.
    pub fn name(&self) -> &'static str {
        match self {
            CommandKind::Inspect => "inspect",
            CommandKind::WriteImage { .. } => "write-image",
            CommandKind::EraseMetadata { full: false } => "erase-metadata",
            CommandKind::EraseMetadata { full: true } => "erase-full",
            CommandKind::Reboot => "reboot",
            CommandKind::Kexec => "kexec",
            CommandKind::PowerOff => "power-off",
        }
    }

    /// Whether `self` and `other` ask for the same kind of work (arguments aside).
    pub fn same_kind(&self, other: &CommandKind) -> bool {
        self.name() == other.name()
    }

    /// Whether running it takes one of the fleet's slots (`slipway serve --provisioning-limit`,
    /// metal3's `PROVISIONING_LIMIT`): inspection, cleaning and image writes do; power
    /// commands do not.
    pub fn takes_slot(&self) -> bool {
        matches!(
            self,
            CommandKind::Inspect
                | CommandKind::WriteImage { .. }
                | CommandKind::EraseMetadata { .. }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Hardware (metal3 HardwareDetails)

/// The inventory summary metal3 keeps in `status.hardware`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct HardwareDetails {
    /// System vendor information.
    #[serde(default)]
    pub system_vendor: HardwareSystemVendor,
    /// System firmware information.
    #[serde(default)]
    pub firmware: Firmware,
    /// The host's amount of memory in Mebibytes.
    #[serde(default)]
    pub ram_mebibytes: u64,
    /// List of network interfaces for the host.
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// List of storage (disk, SSD, etc.) available to the host.
    #[serde(default)]
    pub storage: Vec<Storage>,
    /// Details of the CPU(s) in the system.
    #[serde(default)]
    pub cpu: Cpu,
    /// Name of the host at the inspection time.
    #[serde(default)]
    pub hostname: String,
}

/// Details about the whole hardware system.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct HardwareSystemVendor {
    /// The system's manufacturer.
    #[serde(default)]
    pub manufacturer: String,
    /// The system's product name.
    #[serde(default)]
    pub product_name: String,
    /// The system's serial number.
    #[serde(default)]
    pub serial_number: String,
}

/// The firmware on the host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Firmware {
    /// The BIOS for this firmware.
    #[serde(default)]
    pub bios: Bios,
}

/// The BIOS version on the host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Bios {
    /// The release/build date for this BIOS.
    #[serde(default)]
    pub date: String,
    /// The vendor name for this BIOS.
    #[serde(default)]
    pub vendor: String,
    /// The version of the BIOS.
    #[serde(default)]
    pub version: String,
}

/// One network interface on the host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Nic {
    /// The name of the network interface, e.g. en0.
    pub name: String,
    /// The vendor and product IDs of the NIC, e.g. "0x8086 0x1572" (the driver's name when
    /// they are unknown).
    #[serde(default)]
    pub model: String,
    /// The device MAC address.
    pub mac: String,
    /// The (first) IP address of the interface at inspection, IPv4 or IPv6, if it had one.
    #[serde(default)]
    pub ip: String,
    /// The speed of the device in Gigabits per second.
    #[serde(default)]
    pub speed_gbps: u32,
    /// Whether the NIC is PXE bootable.
    #[serde(default)]
    pub pxe: bool,
}

/// One storage device (disk, SSD, etc.) on the host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// The Linux device name of the disk, e.g. /dev/sda (which may change across reboots).
    pub name: String,
    /// The disk's other Linux device names, stable across reboots: its by-path link first,
    /// then by-id and wwn links. Any of them works as rootDeviceHints.deviceName.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternate_names: Vec<String>,
    /// Whether the disk is rotational storage (prefer type).
    #[serde(default)]
    pub rotational: bool,
    /// Device type, one of: HDD, SSD, NVME (FILE for a plain file the agent was given as its
    /// disk).
    #[serde(default, rename = "type")]
    pub kind: String,
    /// The size of the disk in Bytes.
    pub size_bytes: u64,
    /// The name of the vendor of the device.
    #[serde(default)]
    pub vendor: String,
    /// Hardware model.
    #[serde(default)]
    pub model: String,
    /// The serial number of the device.
    #[serde(default)]
    pub serial_number: String,
    /// The WWN of the device.
    #[serde(default)]
    pub wwn: String,
    /// The WWN vendor extension of the device.
    #[serde(default)]
    pub wwn_vendor_extension: String,
    /// The WWN with the extension.
    #[serde(default)]
    pub wwn_with_extension: String,
    /// The SCSI location of the device (Host:Channel:Target:Lun).
    #[serde(default)]
    pub hctl: String,
}

/// The processors of the host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Cpu {
    /// The CPU architecture, e.g. x86_64 or aarch64.
    #[serde(default)]
    pub arch: String,
    /// The CPU model name.
    #[serde(default)]
    pub model: String,
    /// The clock speed in MHz.
    #[serde(default)]
    pub clock_megahertz: f64,
    /// The CPU feature flags, e.g. sse4_2, avx2.
    #[serde(default, skip_serializing_if = "SharedList::is_empty")]
    pub flags: SharedList,
    /// The number of logical CPUs (hardware threads) online.
    #[serde(default)]
    pub count: u32,
}

/// A list of strings held once for every host that has the same one: a machine's CPU flags
/// are the same hundred-odd strings on every machine of its model, and 10,000 private copies
/// were 50 MiB of a coordinator's memory. Serialises as a plain list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedList(std::sync::Arc<[String]>);

/// How many distinct lists are shared at most; beyond it (hostile agents inventing lists),
/// lists are kept privately, so the table cannot grow without bound.
const SHARED_LISTS: usize = 1024;

impl SharedList {
    pub fn new(items: Vec<String>) -> SharedList {
        use std::collections::HashSet;
        use std::sync::{Arc, Mutex, OnceLock};
        static TABLE: OnceLock<Mutex<HashSet<Arc<[String]>>>> = OnceLock::new();
        let list: Arc<[String]> = items.into();
        let mut table = TABLE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(known) = table.get(&list) {
            return SharedList(known.clone());
        }
        if table.len() < SHARED_LISTS {
            table.insert(list.clone());
        }
        SharedList(list)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Deref for SharedList {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl From<Vec<String>> for SharedList {
    fn from(v: Vec<String>) -> SharedList {
        SharedList::new(v)
    }
}

impl Serialize for SharedList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SharedList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SharedList, D::Error> {
        Vec::<String>::deserialize(d).map(SharedList::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metal3_example_manifest_parses() {
        // The shape of metal3's own docs example, with the fields Slipway supports.
        let yaml = r#"
apiVersion: metal3.io/v1alpha1
kind: BareMetalHost
metadata:
  name: worker-0
  namespace: metal3
  labels: {rack: r1}
spec:
  online: true
  bootMACAddress: "00:11:22:33:44:55"
  bootMode: UEFI
  bmc:
    address: redfish://192.168.111.1:8000/redfish/v1/Systems/1
    credentialsName: worker-0-bmc-secret
  image:
    url: http://172.22.0.1/images/rhcos.qcow2
    checksum: http://172.22.0.1/images/rhcos.qcow2.sha256sum
    checksumType: sha256
    format: qcow2
  rootDeviceHints:
    deviceName: /dev/sda
    minSizeGigabytes: 20
    rotational: false
  userData: {name: worker-user-data, namespace: metal3}
  automatedCleaningMode: disabled
  consumerRef: {apiVersion: infrastructure.cluster.x-k8s.io/v1beta1, kind: Metal3Machine, name: m0}
"#;
        let host: BareMetalHost = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(host.metadata.name, "worker-0");
        assert_eq!(
            host.spec.boot_mac_address.as_deref(),
            Some("00:11:22:33:44:55")
        );
        assert_eq!(host.spec.boot_mode, Some(BootMode::Uefi));
        let image = host.spec.wanted_image().unwrap();
        assert_eq!(image.format, Some(ImageFormat::Qcow2));
        assert_eq!(image.checksum_type, Some(ChecksumType::Sha256));
        assert_eq!(host.spec.cleaning_mode(), CleaningMode::Disabled);
        let hints = host.spec.root_device_hints.as_ref().unwrap();
        assert_eq!(hints.min_size_gigabytes, Some(20));
        assert_eq!(hints.rotational, Some(false));
    }

    #[test]
    fn every_field_of_metal3s_spec_parses() {
        // Every field of metal3's current BareMetalHostSpec (apis/metal3.io/v1alpha1), with
        // every root device hint and every image field: none is an unknown-field error.
        let yaml = r#"
apiVersion: metal3.io/v1alpha1
kind: BareMetalHost
metadata: {name: all-fields, namespace: metal3}
spec:
  taints:
  - {key: example, value: x, effect: NoSchedule}
  bmc:
    address: idrac-virtualmedia://10.0.0.5/redfish/v1/Systems/System.Embedded.1
    credentialsName: all-fields-bmc
    disableCertificateVerification: true
  raid:
    hardwareRAIDVolumes:
    - {sizeGibibytes: 100, level: "1", name: root, rotational: false, numberOfPhysicalDisks: 2, controller: RAID.Integrated.1-1, physicalDisks: [Disk.Bay.0, Disk.Bay.1]}
    softwareRAIDVolumes: []
  firmware: {virtualizationEnabled: true, simultaneousMultithreadingEnabled: false, sriovEnabled: true}
  hardwareProfile: unknown
  rootDeviceHints:
    deviceName: /dev/sda
    hctl: "0:0:0:0"
    model: PERC
    vendor: DELL
    serialNumber: S123
    minSizeGigabytes: 100
    wwn: "0x5000c500a0b1c2d3"
    wwnWithExtension: "0x5000c500a0b1c2d3"
    wwnVendorExtension: "0x1"
    rotational: false
  bootMode: UEFISecureBoot
  bootMACAddress: "52:54:00:12:34:56"
  online: true
  consumerRef: {apiVersion: infrastructure.cluster.x-k8s.io/v1beta1, kind: Metal3Machine, name: m0, namespace: metal3, uid: u1, resourceVersion: "7", fieldPath: spec}
  image:
    url: oci://registry.example/os:latest
    checksum: 0123456789abcdef0123456789abcdef
    checksumType: md5
    format: vmdk
    ociAuthSecretName: registry-pull
  userData: {name: ud, namespace: metal3}
  preprovisioningNetworkDataName: pre-nd
  networkData: {name: nd, namespace: metal3}
  metaData: {name: md, namespace: metal3}
  description: every field
  externallyProvisioned: false
  automatedCleaningMode: metadata
  customDeploy: {method: install_coreos}
  architecture: x86_64
  disablePowerOff: true
  inspectionMode: fast
  networkInterfaces:
  - name: eno1
    macAddress: "52:54:00:12:34:56"
    hostNetworkAttachment: {name: provisioning}
    switchPort: {switchID: sw1, portID: Eth1/1}
"#;
        let host: BareMetalHost = serde_yaml_ng::from_str(yaml).unwrap();
        let spec = &host.spec;
        assert!(spec.disable_power_off);
        assert_eq!(spec.inspection_mode, Some(InspectionMode::Fast));
        let image = spec.image.as_ref().unwrap();
        assert_eq!(image.format, Some(ImageFormat::Vmdk));
        assert_eq!(image.oci_auth_secret_name.as_deref(), Some("registry-pull"));
        assert!(spec.network_interfaces.is_some() && spec.taints.is_some());
        assert_eq!(
            spec.bmc.as_ref().unwrap().credentials_name,
            "all-fields-bmc"
        );
        let vdi: ImageFormat = serde_json::from_str("\"vdi\"").unwrap();
        assert_eq!(vdi, ImageFormat::Vdi);
        // What Slipway writes back parses again.
        let json = serde_json::to_value(spec).unwrap();
        assert_eq!(serde_json::from_value::<HostSpec>(json).unwrap(), *spec);
    }

    #[test]
    fn unknown_spec_field_is_refused() {
        let yaml = "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata: {name: a}\nspec: {onlin: true}\n";
        let err = serde_yaml_ng::from_str::<BareMetalHost>(yaml)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `onlin`"), "{err}");
    }

    #[test]
    fn status_round_trips_with_metal3_strings() {
        let mut status = HostStatus::default();
        status.provisioning.state = ProvisioningState::PoweringOffBeforeDelete;
        status.error_type = Some(ErrorType::Provisioning);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["provisioning"]["state"], "powering off before delete");
        assert_eq!(json["errorType"], "provisioning error");
        assert_eq!(json["operationalStatus"], "OK");
        let back: HostStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }

    #[test]
    fn command_records_of_older_coordinators_still_parse() {
        let old: CommandKind = serde_json::from_str(r#"{"type":"eraseMetadata"}"#).unwrap();
        assert_eq!(old, CommandKind::EraseMetadata { full: false });
        let full = serde_json::to_value(CommandKind::EraseMetadata { full: true }).unwrap();
        assert_eq!(
            full,
            serde_json::json!({"type": "eraseMetadata", "full": true})
        );
        let w: CommandKind =
            serde_json::from_str(r#"{"type":"writeImage","image":{"url":"http://a/b"}}"#).unwrap();
        assert!(matches!(
            w,
            CommandKind::WriteImage {
                config_drive: None,
                ..
            }
        ));
    }

    #[test]
    fn state_names_match_serde() {
        for state in ProvisioningState::ALL {
            let json = serde_json::to_value(state).unwrap();
            assert_eq!(json, state.as_str());
        }
    }
}

/// The namespace of hosts whose document names none (files mode), as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A host's identity: its namespace and name. Two namespaces may each have a `node-1`.
///
/// Written `namespace/name` (Kubernetes names cannot contain `/`, so the form is unambiguous);
/// a bare `name` reads as the default namespace, which is how records, tokens and certificates
/// made before namespaces are understood.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostKey {
    pub namespace: String,
    pub name: String,
}

impl HostKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> HostKey {
        HostKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// A host in the default namespace.
    pub fn default_ns(name: impl Into<String>) -> HostKey {
        HostKey::new(DEFAULT_NAMESPACE, name)
    }

    /// The key of a host document: its `metadata.namespace`, else the default namespace.
    pub fn of(meta: &ObjectMeta) -> HostKey {
        HostKey::new(
            meta.namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or(DEFAULT_NAMESPACE),
            meta.name.clone(),
        )
    }

    /// Parses `namespace/name`, or a bare `name` (the default namespace).
    pub fn parse(s: &str) -> Option<HostKey> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Some(HostKey::new(ns, name))
            }
            Some(_) => None,
            None if !s.is_empty() => Some(HostKey::default_ns(s)),
            None => None,
        }
    }
}

impl fmt::Display for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Serialize for HostKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HostKey, D::Error> {
        let s = String::deserialize(d)?;
        HostKey::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("{s:?} is not a host key (NAMESPACE/NAME)"))
        })
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn equal_lists_are_held_once_and_read_back_as_lists() {
        let a = SharedList::new(vec!["sse".into(), "avx".into()]);
        let b: SharedList = serde_json::from_str(r#"["sse","avx"]"#).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a.0, &b.0), "shared");
        assert_eq!(serde_json::to_string(&b).unwrap(), r#"["sse","avx"]"#);
        assert_eq!(b.len(), 2);
        assert!(SharedList::default().is_empty());
    }

    #[test]
    fn keys_read_and_print_with_the_default_namespace_for_bare_names() {
        let k = HostKey::parse("team-a/node-1").unwrap();
        assert_eq!(k, HostKey::new("team-a", "node-1"));
        assert_eq!(k.to_string(), "team-a/node-1");
        assert_eq!(
            HostKey::parse("node-1").unwrap(),
            HostKey::default_ns("node-1")
        );
        for bad in ["", "/x", "x/", "a/b/c"] {
            assert_eq!(HostKey::parse(bad), None, "{bad:?}");
        }
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, "\"team-a/node-1\"");
        assert_eq!(serde_json::from_str::<HostKey>(&json).unwrap(), k);
        assert_eq!(
            serde_json::from_str::<HostKey>("\"old\"").unwrap(),
            HostKey::default_ns("old")
        );
        let mut meta = ObjectMeta {
            name: "n".into(),
            ..Default::default()
        };
        assert_eq!(HostKey::of(&meta), HostKey::default_ns("n"));
        meta.namespace = Some("b".into());
        assert_eq!(HostKey::of(&meta), HostKey::new("b", "n"));
    }
}
