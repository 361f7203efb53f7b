//! Semantic checks of a host's spec, beyond what parsing already refuses.
//!
//! Each problem names the field, says what is wrong and how to fix it. Problems come in two
//! scopes: those that stop registration (the host cannot be managed at all) and those that only
//! stop provisioning (the image and first-boot data).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::host::{
    ChecksumType, ERASE_ANNOTATION, HostSpec, Image, ImageFormat, InspectionMode, META_DATA_KEYS,
    NETWORK_DATA_KEYS, REBOOT_ANNOTATION, SecretRef, USER_DATA_KEYS,
};

/// The Secrets the host's source knows: name -> the keys each holds. Names of keys only:
/// values never reach the planner.
pub type SecretKeys = BTreeMap<String, BTreeSet<String>>;

/// One thing wrong with a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The field, as a path in the document (`spec.image.checksum`).
    pub field: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Joins problems into one status message.
pub fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Problems that stop the host from being registered.
pub fn registration_problems(spec: &HostSpec) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(mac) = &spec.boot_mac_address
        && parse_mac(mac).is_none()
    {
        out.push(Problem {
            field: "spec.bootMACAddress",
            message: format!(
                "{mac:?} is not a MAC address; write six hex pairs separated by colons, \
                     e.g. 52:54:00:12:34:56"
            ),
        });
    }
    if let Some(bmc) = &spec.bmc
        && let Err(message) = check_bmc_address(&bmc.address)
    {
        out.push(Problem {
            field: "spec.bmc.address",
            message,
        });
    }
    for (field, value) in [
        ("spec.raid", &spec.raid),
        ("spec.firmware", &spec.firmware),
        ("spec.customDeploy", &spec.custom_deploy),
    ] {
        if value.is_some() {
            out.push(Problem {
                field,
                message: "is a metal3 feature Slipway does not support yet; remove it (the host \
                          would otherwise be provisioned without the settings you asked for)"
                    .into(),
            });
        }
    }
    if non_empty(&spec.network_interfaces) {
        out.push(Problem {
            field: "spec.networkInterfaces",
            message: "switch port configuration is a metal3 feature Slipway does not support \
                      yet; remove spec.networkInterfaces (and configure the switch ports \
                      yourself)"
                .into(),
        });
    }
    if non_empty(&spec.taints) {
        out.push(Problem {
            field: "spec.taints",
            message: "is deprecated in metal3 and was never implemented there either, so \
                      Slipway does not support it; remove it"
                .into(),
        });
    }
    if let Some(name) = spec
        .preprovisioning_network_data_name
        .as_deref()
        .filter(|n| !n.is_empty())
    {
        out.push(Problem {
            field: "spec.preprovisioningNetworkDataName",
            message: format!(
                "names Secret {name:?}, but network configuration of the ramdisk is a metal3 \
                 feature Slipway does not support yet (the ramdisk configures the boot NIC by \
                 DHCP); remove it and serve DHCP on the boot network"
            ),
        });
    }
    if spec.inspection_mode == Some(InspectionMode::Fast) {
        out.push(Problem {
            field: "spec.inspectionMode",
            message: "fast (out-of-band) inspection is a metal3 feature Slipway does not \
                      support yet: it needs a BMC driver, which Slipway does not have yet; \
                      write agent (or remove the field) to inspect with the ramdisk, or \
                      disabled to skip inspection"
                .into(),
        });
    }
    if spec.disable_power_off && !spec.online {
        out.push(Problem {
            field: "spec.disablePowerOff",
            message: "is true while spec.online is false: a host that must never be powered \
                      off cannot be offline (metal3 refuses this too); set online: true, or \
                      remove disablePowerOff"
                .into(),
        });
    }
    if let Some(hints) = &spec.root_device_hints {
        if let Some(name) = &hints.device_name
            && !name.starts_with('/')
        {
            out.push(Problem {
                field: "spec.rootDeviceHints.deviceName",
                message: format!(
                    "{name:?} is not an absolute device path; write e.g. /dev/sda or \
                         /dev/disk/by-path/pci-0000:00:1f.2-ata-1"
                ),
            });
        }
        if let Some(hctl) = &hints.hctl {
            let parts: Vec<_> = hctl.split(':').collect();
            if parts.len() != 4 || parts.iter().any(|p| p.parse::<u32>().is_err()) {
                out.push(Problem {
                    field: "spec.rootDeviceHints.hctl",
                    message: format!("{hctl:?} is not Host:Channel:Target:Lun; write e.g. 0:0:0:0"),
                });
            }
        }
    }
    out
}

/// Problems that stop the host from being provisioned with its current spec.
pub fn provisioning_problems(spec: &HostSpec) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(image) = spec.wanted_image() {
        check_image(image, &mut out);
    }
    for (field, value) in [
        ("spec.userData", &spec.user_data),
        ("spec.networkData", &spec.network_data),
        ("spec.metaData", &spec.meta_data),
    ] {
        if let Some(r) = value
            && r.name.is_empty()
        {
            out.push(Problem {
                field,
                message: "names no Secret; give the name of a v1 Secret".into(),
            });
        }
    }
    out
}

/// Problems with the annotations Slipway reads.
pub fn annotation_problems(annotations: &BTreeMap<String, String>) -> Vec<Problem> {
    let mut out = Vec::new();
    match annotations.get(ERASE_ANNOTATION).map(String::as_str) {
        None | Some("full" | "metadata") => {}
        Some(other) => out.push(Problem {
            field: "metadata.annotations[slipway.io/erase]",
            message: format!(
                "{other:?} is not an erase mode; write full (zero every byte when cleaning) or \
                 metadata (the default), or remove the annotation"
            ),
        }),
    }
    if let Some(Err(message)) = crate::annotations::hardware_details(annotations) {
        out.push(Problem {
            field: "metadata.annotations[inspect.metal3.io/hardwaredetails]",
            message: format!("{message}; fix the JSON or remove the annotation"),
        });
    }
    match annotations.get(REBOOT_ANNOTATION).map(String::as_str) {
        None | Some("kexec" | "firmware") => {}
        Some(other) => out.push(Problem {
            field: "metadata.annotations[slipway.io/reboot]",
            message: format!(
                "{other:?} is not a reboot mode; write kexec (boot the new OS without the \
                 firmware) or firmware (the default), or remove the annotation"
            ),
        }),
    }
    out
}

/// The Secrets of the config drive that are missing, or lack their key. Each problem names the
/// host, the field and the Secret, and says what to add. The host waits (no retry count) until
/// the Secret appears.
pub fn secret_problems(host: &str, spec: &HostSpec, secrets: &SecretKeys) -> Vec<Problem> {
    let mut out = Vec::new();
    let fields: [(&'static str, &Option<SecretRef>, [&str; 2]); 3] = [
        ("spec.userData", &spec.user_data, USER_DATA_KEYS),
        ("spec.networkData", &spec.network_data, NETWORK_DATA_KEYS),
        ("spec.metaData", &spec.meta_data, META_DATA_KEYS),
    ];
    for (field, value, keys) in fields {
        let Some(r) = value.as_ref().filter(|r| !r.name.is_empty()) else {
            continue;
        };
        match secrets.get(&r.name) {
            None => out.push(Problem {
                field,
                message: format!(
                    "host {host} needs Secret {:?}, which does not exist; add a v1 Secret named \
                     {} with key {} (provisioning waits for it)",
                    r.name, r.name, keys[0]
                ),
            }),
            Some(have) if !keys.iter().any(|k| have.contains(*k)) => out.push(Problem {
                field,
                message: format!(
                    "host {host}: Secret {:?} has no key {} or {} (its keys: {}); add one \
                     (provisioning waits for it)",
                    r.name,
                    keys[0],
                    keys[1],
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.iter().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            }),
            Some(_) => {}
        }
    }
    out
}

fn check_image(image: &Image, out: &mut Vec<Problem>) {
    let url = image.url.as_str();
    if url
        .get(..6)
        .is_some_and(|s| s.eq_ignore_ascii_case("oci://"))
    {
        out.push(Problem {
            field: "spec.image.url",
            message: format!(
                "{url:?} is an OCI image, and OCI images are a metal3 feature Slipway does not \
                 support yet; publish the image on an http:// or https:// server and give its URL"
            ),
        });
    } else if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
        out.push(Problem {
            field: "spec.image.url",
            message: format!("{url:?} is not an http:// or https:// URL"),
        });
    }
    if let Some(name) = image
        .oci_auth_secret_name
        .as_deref()
        .filter(|n| !n.is_empty())
    {
        out.push(Problem {
            field: "spec.image.ociAuthSecretName",
            message: format!(
                "names registry credentials Secret {name:?}, but OCI images are a metal3 feature \
                 Slipway does not support yet; remove it and publish the image on an http:// or \
                 https:// server"
            ),
        });
    }
    match image.format {
        // Raw images may also be gzip, zstd or xz compressed: the agent detects that.
        None | Some(ImageFormat::Raw) | Some(ImageFormat::Qcow2) => {}
        Some(ImageFormat::LiveIso) => out.push(Problem {
            field: "spec.image.format",
            message: "live-iso images are not written by this version of Slipway yet (they \
                      need virtual-media boot); use a raw or qcow2 disk image"
                .into(),
        }),
        Some(format @ (ImageFormat::Vdi | ImageFormat::Vmdk)) => out.push(Problem {
            field: "spec.image.format",
            message: format!(
                "{} is a metal3 image format Slipway does not write yet: it writes raw \
                 (optionally gzip, zstd or xz compressed) and qcow2 images; convert the image \
                 with qemu-img convert -O qcow2 IN OUT and set format: qcow2",
                if format == ImageFormat::Vdi {
                    "vdi"
                } else {
                    "vmdk"
                }
            ),
        }),
    }
    let checksum = image.checksum.trim();
    if checksum.is_empty() {
        out.push(Problem {
            field: "spec.image.checksum",
            message: "is empty; give the image's digest (e.g. the output of sha256sum IMAGE) \
                      so the agent can verify what it writes"
                .into(),
        });
        return;
    }
    if checksum.starts_with("http://") || checksum.starts_with("https://") {
        // A checksum file (SHA256SUMS style); the agent picks the image's line.
        if checksum.len() < 10 || checksum.contains(char::is_whitespace) {
            out.push(Problem {
                field: "spec.image.checksum",
                message: format!("{checksum:?} is not a usable checksum-file URL"),
            });
        }
        return;
    }
    if let Err(message) = checksum_kind(checksum, image.checksum_type) {
        out.push(Problem {
            field: "spec.image.checksum",
            message,
        });
    }
}

/// The digest algorithm a checksum selects: the declared type, or (for `auto` and no type) the
/// one its length implies. Errors say what is wrong with the digest.
pub fn checksum_kind(
    checksum: &str,
    declared: Option<ChecksumType>,
) -> Result<ChecksumType, String> {
    if !checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{checksum:?} is not a hex digest"));
    }
    let (want, name) = match declared {
        Some(ChecksumType::Md5) => (32, "md5"),
        Some(ChecksumType::Sha256) => (64, "sha256"),
        Some(ChecksumType::Sha512) => (128, "sha512"),
        None | Some(ChecksumType::Auto) => {
            return match checksum.len() {
                32 => Ok(ChecksumType::Md5),
                64 => Ok(ChecksumType::Sha256),
                128 => Ok(ChecksumType::Sha512),
                n => Err(format!(
                    "a digest of {n} hex digits matches no supported algorithm (md5: 32, \
                     sha256: 64, sha512: 128)"
                )),
            };
        }
    };
    match declared {
        Some(kind) if checksum.len() == want => Ok(kind),
        _ => Err(format!(
            "checksumType is {name} but the digest has {} hex digits instead of {want}; fix the \
             digest or the checksumType",
            checksum.len()
        )),
    }
}

/// Whether a raw metal3 list (`taints`, `networkInterfaces`) holds anything.
fn non_empty(value: &Option<serde_json::Value>) -> bool {
    match value {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::Object(o)) => !o.is_empty(),
        Some(serde_json::Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

/// How a BMC is driven, whatever vendor name its address's scheme carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BmcKind {
    /// `none://`: Slipway's own, no BMC (power by hand, the host is driven by its agent).
    None,
    /// IPMI (`ipmi://`, `libvirt://`, or an address without a scheme).
    Ipmi,
    /// Redfish, booting by PXE (`redfish://`, `idrac-redfish://`, `ilo5-redfish://`).
    Redfish,
    /// Redfish virtual media (`redfish-virtualmedia://`, `idrac-virtualmedia://`,
    /// `ilo5-virtualmedia://`).
    RedfishVirtualMedia,
    /// Redfish UEFI HTTP boot (`redfish-uefihttp://`).
    RedfishUefiHttp,
}

/// metal3's BMC drivers (pkg/hardwareutils/bmc), plus Slipway's `none`: the scheme, its kind,
/// and whether it takes a `+http`/`+https` suffix.
const BMC_SCHEMES: &[(&str, BmcKind, bool)] = &[
    ("none", BmcKind::None, false),
    ("ipmi", BmcKind::Ipmi, false),
    ("libvirt", BmcKind::Ipmi, false),
    ("redfish", BmcKind::Redfish, true),
    ("redfish-virtualmedia", BmcKind::RedfishVirtualMedia, true),
    ("redfish-uefihttp", BmcKind::RedfishUefiHttp, true),
    ("idrac-redfish", BmcKind::Redfish, true),
    ("idrac-virtualmedia", BmcKind::RedfishVirtualMedia, true),
    ("ilo5-redfish", BmcKind::Redfish, true),
    ("ilo5-virtualmedia", BmcKind::RedfishVirtualMedia, true),
];

/// Vendor-proprietary drivers metal3 dropped, and what to use instead.
const DROPPED_BMC_SCHEMES: &[(&str, &str)] = &[
    (
        "idrac",
        "is iDRAC's WS-Management interface, which metal3 no longer supports and Slipway does \
         not: use idrac-redfish:// or idrac-virtualmedia://",
    ),
    (
        "ilo4",
        "is HPE iLO 4's proprietary interface, which metal3 no longer supports and Slipway does \
         not: use redfish:// (iLO 4 firmware 2.30 and later speaks Redfish) or ipmi://",
    ),
    (
        "ilo4-virtualmedia",
        "is HPE iLO 4's proprietary virtual media, which metal3 no longer supports and Slipway \
         does not: use redfish-virtualmedia:// (iLO 4 firmware 2.30 and later speaks Redfish)",
    ),
    (
        "ilo5",
        "is HPE iLO 5's proprietary interface, which metal3 no longer supports and Slipway does \
         not: use ilo5-redfish:// or ilo5-virtualmedia://",
    ),
    (
        "irmc",
        "is Fujitsu iRMC's proprietary interface, which metal3 no longer supports and Slipway \
         does not: use redfish:// or redfish-virtualmedia://",
    ),
    (
        "irmc-virtualmedia",
        "is Fujitsu iRMC's proprietary virtual media, which metal3 no longer supports and \
         Slipway does not: use redfish-virtualmedia://",
    ),
    (
        "ibmc",
        "is Huawei iBMC's proprietary interface, which metal3 no longer supports and Slipway \
         does not: use redfish:// or redfish-virtualmedia://",
    ),
];

/// The kind of BMC an address names, as metal3 reads it: the scheme before `://` (case does not
/// matter), Redfish ones optionally with `+http` or `+https`; an address without `://` is IPMI
/// (`host` or `host:port`). Errors say what is wrong and what to write instead.
pub fn bmc_kind(address: &str) -> Result<BmcKind, String> {
    if address.is_empty() {
        return Err(
            "is empty; give the BMC URL, e.g. redfish://10.0.0.5/redfish/v1/Systems/1, \
                    or remove spec.bmc to power the host by hand"
                .into(),
        );
    }
    let Some((scheme, rest)) = address.split_once("://") else {
        return Ok(BmcKind::Ipmi);
    };
    let scheme = scheme.to_ascii_lowercase();
    let (base, suffix) = match scheme.split_once('+') {
        Some((base, suffix)) => (base, Some(suffix)),
        None => (scheme.as_str(), None),
    };
    if let Some((_, why)) = DROPPED_BMC_SCHEMES.iter().find(|(s, _)| *s == base) {
        return Err(format!("{base}:// {why}"));
    }
    let known = BMC_SCHEMES.iter().find(|(s, _, _)| *s == base);
    let kind = match (known, suffix) {
        (Some((_, kind, _)), None) => *kind,
        (Some((_, kind, true)), Some("http" | "https")) => *kind,
        _ => {
            let accepted: Vec<&str> = BMC_SCHEMES.iter().map(|(s, _, _)| *s).collect();
            return Err(format!(
                "scheme {scheme:?} is not one Slipway knows; use one of {} (the Redfish ones \
                 optionally with +http or +https, e.g. redfish+http://), or an address without \
                 a scheme for IPMI",
                accepted.join(", ")
            ));
        }
    };
    if kind != BmcKind::None && host_port(rest).is_none_or(|(host, _)| host.is_empty()) {
        return Err(format!(
            "{address:?} names no host; write e.g. {scheme}://10.0.0.5{}",
            if matches!(kind, BmcKind::Ipmi) {
                ""
            } else {
                "/redfish/v1/Systems/1"
            }
        ));
    }
    Ok(kind)
}

/// The host and port (if given) of `rest`, the part of an address after `scheme://`: up to the
/// first `/`, `?` or `#`, without user information; `[v6]:port` is understood. `None` when the
/// port is not a number.
fn host_port(rest: &str) -> Option<(String, Option<u16>)> {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) if !port.contains(':') => (host, Some(port)),
            // A bare IPv6 address.
            Some(_) => (authority, None),
            None => (authority, None),
        }
    };
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(p.parse::<u16>().ok()?),
    };
    Some((host.to_ascii_lowercase(), port))
}

/// A normalised identity of the BMC endpoint an address names, for finding hosts that share a
/// BMC: two hosts whose identities are equal are driven through the same BMC. The host is
/// lower-cased, the port made explicit (623 for IPMI, 443 for Redfish over https, 80 for
/// `+http`), and for Redfish the system path kept (`/redfish/v1/Systems/1`), so the systems of
/// one multi-system BMC differ. `None` for no BMC (`none://`, empty) and for an address
/// [`bmc_kind`] refuses.
pub fn bmc_identity(address: &str) -> Option<String> {
    let kind = bmc_kind(address).ok()?;
    let (scheme, rest) = address.split_once("://").unwrap_or(("ipmi", address));
    match kind {
        BmcKind::None => None,
        BmcKind::Ipmi => {
            let (host, port) = host_port(rest)?;
            let host = bracket_v6(&host);
            Some(format!("ipmi {host}:{}", port.unwrap_or(623)))
        }
        BmcKind::Redfish | BmcKind::RedfishVirtualMedia | BmcKind::RedfishUefiHttp => {
            let (host, port) = host_port(rest)?;
            let http = scheme.to_ascii_lowercase().ends_with("+http");
            let port = port.unwrap_or(if http { 80 } else { 443 });
            let path = rest
                .find('/')
                .map_or("", |i| &rest[i..])
                .split(['?', '#'])
                .next()
                .unwrap_or("")
                .trim_end_matches('/');
            // metal3 reads no system path, and the service root alone, as the BMC's one system.
            let path = if path.trim_matches('/').eq_ignore_ascii_case("redfish/v1") {
                ""
            } else {
                path
            };
            let host = bracket_v6(&host);
            Some(format!("redfish {host}:{port}{path}"))
        }
    }
}

fn bracket_v6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn check_bmc_address(address: &str) -> Result<(), String> {
    bmc_kind(address).map(|_| ())
}

/// One CPU architecture under its metal3 name (`x86_64`, `aarch64`), from any of its usual
/// names, case-insensitively.
fn architecture_name(arch: &str) -> Option<&'static str> {
    match arch.trim().to_ascii_lowercase().as_str() {
        "x86_64" | "x86-64" | "amd64" | "x64" => Some("x86_64"),
        "aarch64" | "arm64" => Some("aarch64"),
        _ => None,
    }
}

fn article(word: &str) -> &'static str {
    // "an x86_64", "an aarch64": the names are read letter by letter or start with a vowel.
    if word.starts_with(['a', 'e', 'i', 'o', 'u', 'x', 'A', 'E', 'I', 'O', 'U', 'X']) {
        "an"
    } else {
        "a"
    }
}

/// Problems with `spec.architecture` for a coordinator whose ramdisk is built for
/// `ramdisk_arch`: the host would boot a ramdisk it cannot run. `x86_64`/`amd64`/`x64` are one
/// architecture and `aarch64`/`arm64` another, compared case-insensitively; an architecture
/// Slipway does not know is a problem too. Unset or empty: no problem.
pub fn architecture_problems(spec: &HostSpec, ramdisk_arch: &str) -> Vec<Problem> {
    let Some(arch) = spec
        .architecture
        .as_deref()
        .filter(|a| !a.trim().is_empty())
    else {
        return Vec::new();
    };
    let Some(wanted) = architecture_name(arch) else {
        return vec![Problem {
            field: "spec.architecture",
            message: format!(
                "{arch:?} is not an architecture Slipway knows; write x86_64 or aarch64 (amd64, \
                 x64 and arm64 are read too), or remove it"
            ),
        }];
    };
    let served = architecture_name(ramdisk_arch)
        .map(str::to_string)
        .unwrap_or_else(|| ramdisk_arch.trim().to_ascii_lowercase());
    if wanted == served {
        return Vec::new();
    }
    vec![Problem {
        field: "spec.architecture",
        message: format!(
            "host needs {} {wanted} ramdisk; this coordinator serves {} {served} ramdisk: \
             manage the host from a coordinator with {} {wanted} ramdisk, or correct \
             spec.architecture if it is wrong",
            article(wanted),
            article(&served),
            article(wanted),
        ),
    }]
}

/// Problems with the BMC credentials of a host, as metal3 checks them: a host with a BMC (other
/// than `none://`) needs `spec.bmc.credentialsName` naming a Secret in its namespace with the
/// keys `username` and `password`. `secrets` holds the Secrets of the host's namespace and, for
/// each, only the keys whose values are not empty. No BMC, `none://`, or an address
/// [`bmc_kind`] refuses (a registration problem of its own): no problems.
pub fn bmc_credentials_problems(host: &str, spec: &HostSpec, secrets: &SecretKeys) -> Vec<Problem> {
    let Some(bmc) = &spec.bmc else {
        return Vec::new();
    };
    match bmc_kind(&bmc.address) {
        Ok(BmcKind::None) | Err(_) => return Vec::new(),
        Ok(_) => {}
    }
    let name = bmc.credentials_name.as_str();
    if name.is_empty() {
        return vec![Problem {
            field: "spec.bmc.credentialsName",
            message: format!(
                "is empty, but host {host}'s BMC needs credentials; name a v1 Secret in the \
                 host's namespace with keys username and password"
            ),
        }];
    }
    let Some(keys) = secrets.get(name) else {
        return vec![Problem {
            field: "spec.bmc.credentialsName",
            message: format!(
                "host {host} needs BMC credentials Secret {name:?}, which does not exist in the \
                 host's namespace; add a v1 Secret with keys username and password"
            ),
        }];
    };
    let missing: Vec<&str> = ["username", "password"]
        .into_iter()
        .filter(|k| !keys.contains(*k))
        .collect();
    match missing[..] {
        [] => Vec::new(),
        [one] => vec![Problem {
            field: "spec.bmc.credentialsName",
            message: format!(
                "host {host}: BMC credentials Secret {name:?} has no {one} (or it is empty); \
                 add the key {one} to the Secret"
            ),
        }],
        _ => vec![Problem {
            field: "spec.bmc.credentialsName",
            message: format!(
                "host {host}: BMC credentials Secret {name:?} has no username and no password \
                 (or they are empty); add the keys username and password to the Secret"
            ),
        }],
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (also `-` separated) into bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{BmcDetails, RootDeviceHints, SecretRef};

    fn image(url: &str, checksum: &str, kind: Option<ChecksumType>) -> Image {
        Image {
            url: url.into(),
            checksum: checksum.into(),
            checksum_type: kind,
            format: None,
            oci_auth_secret_name: None,
        }
    }

    #[test]
    fn good_spec_has_no_problems() {
        let spec = HostSpec {
            boot_mac_address: Some("52:54:00:12:34:56".into()),
            image: Some(image("http://10.0.0.1/a.img", &"ab".repeat(32), None)),
            ..Default::default()
        };
        assert_eq!(registration_problems(&spec), vec![]);
        assert_eq!(provisioning_problems(&spec), vec![]);
    }

    #[test]
    fn bad_mac_names_field_and_example() {
        let spec = HostSpec {
            boot_mac_address: Some("52:54:00".into()),
            ..Default::default()
        };
        let problems = registration_problems(&spec);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "spec.bootMACAddress");
        assert!(problems[0].message.contains("52:54:00:12:34:56"));
    }

    #[test]
    fn checksum_length_must_fit_type() {
        assert_eq!(
            checksum_kind(&"a".repeat(64), None),
            Ok(ChecksumType::Sha256)
        );
        assert_eq!(
            checksum_kind(&"a".repeat(128), Some(ChecksumType::Auto)),
            Ok(ChecksumType::Sha512)
        );
        assert_eq!(
            checksum_kind(&"a".repeat(32), Some(ChecksumType::Md5)),
            Ok(ChecksumType::Md5)
        );
        let err = checksum_kind(&"a".repeat(64), Some(ChecksumType::Sha512)).unwrap_err();
        assert!(err.contains("64 hex digits instead of 128"), "{err}");
        assert!(
            checksum_kind("xyz", None)
                .unwrap_err()
                .contains("not a hex digest")
        );
        assert!(
            checksum_kind("abc", None)
                .unwrap_err()
                .contains("3 hex digits")
        );
    }

    #[test]
    fn image_problems() {
        let mut spec = HostSpec {
            image: Some(image("ftp://x/y", "", None)),
            ..Default::default()
        };
        let fields: Vec<_> = provisioning_problems(&spec)
            .iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(fields, ["spec.image.url", "spec.image.checksum"]);
        spec.image = Some(Image {
            format: Some(ImageFormat::Qcow2),
            ..image("http://a/b.qcow2", &"0".repeat(64), None)
        });
        assert_eq!(provisioning_problems(&spec), vec![]);
        spec.image = Some(image("http://a/b.img", "https://a/SHA256SUMS", None));
        assert_eq!(provisioning_problems(&spec), vec![]);
        spec.image = Some(Image {
            format: Some(ImageFormat::LiveIso),
            ..image("http://a/b.iso", &"0".repeat(64), None)
        });
        let problems = provisioning_problems(&spec);
        assert_eq!(problems[0].field, "spec.image.format");
        assert!(problems[0].message.contains("live-iso"));
    }

    #[test]
    fn unsupported_features_are_refused_not_ignored() {
        let spec = HostSpec {
            raid: Some(serde_json::json!({"hardwareRAIDVolumes": []})),
            user_data: Some(SecretRef {
                name: "ud".into(),
                namespace: None,
            }),
            bmc: Some(BmcDetails {
                address: "amt://x".into(),
                ..Default::default()
            }),
            root_device_hints: Some(RootDeviceHints {
                device_name: Some("sda".into()),
                hctl: Some("0:0".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let reg: Vec<_> = registration_problems(&spec)
            .iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(
            reg,
            [
                "spec.bmc.address",
                "spec.raid",
                "spec.rootDeviceHints.deviceName",
                "spec.rootDeviceHints.hctl"
            ]
        );
        // Config drives are supported: a named Secret is no problem of the spec itself.
        assert_eq!(provisioning_problems(&spec), vec![]);
    }

    #[test]
    fn missing_secrets_and_keys_name_host_field_and_secret() {
        let spec = HostSpec {
            user_data: Some(SecretRef {
                name: "ud".into(),
                namespace: None,
            }),
            network_data: Some(SecretRef {
                name: "nd".into(),
                namespace: None,
            }),
            meta_data: Some(SecretRef {
                name: "md".into(),
                namespace: None,
            }),
            ..Default::default()
        };
        let mut secrets = SecretKeys::new();
        secrets.insert("nd".into(), ["other".to_string()].into());
        secrets.insert("md".into(), ["value".to_string()].into());
        let problems = secret_problems("worker-0", &spec, &secrets);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].field, "spec.userData");
        assert!(
            problems[0].message.contains("worker-0")
                && problems[0].message.contains("\"ud\"")
                && problems[0].message.contains("does not exist")
                && problems[0].message.contains("userData"),
            "{}",
            problems[0]
        );
        assert_eq!(problems[1].field, "spec.networkData");
        assert!(
            problems[1].message.contains("no key networkData or value")
                && problems[1].message.contains("its keys: other"),
            "{}",
            problems[1]
        );
        secrets.insert("ud".into(), ["userData".to_string()].into());
        secrets.insert("nd".into(), ["networkData".to_string()].into());
        assert_eq!(secret_problems("worker-0", &spec, &secrets), vec![]);
    }

    #[test]
    fn erase_annotation_values() {
        let mut a = BTreeMap::new();
        assert!(annotation_problems(&a).is_empty());
        a.insert(ERASE_ANNOTATION.to_string(), "full".to_string());
        assert!(annotation_problems(&a).is_empty());
        assert!(crate::host::full_erase(&a));
        a.insert(ERASE_ANNOTATION.to_string(), "ful".to_string());
        let p = annotation_problems(&a);
        assert_eq!(p[0].field, "metadata.annotations[slipway.io/erase]");
        assert!(!crate::host::full_erase(&a));
    }

    #[test]
    fn reboot_annotation_values() {
        let mut a = BTreeMap::new();
        a.insert(REBOOT_ANNOTATION.to_string(), "kexec".to_string());
        assert!(annotation_problems(&a).is_empty());
        assert!(crate::host::kexec_reboot(&a));
        a.insert(REBOOT_ANNOTATION.to_string(), "firmware".to_string());
        assert!(annotation_problems(&a).is_empty());
        assert!(!crate::host::kexec_reboot(&a));
        a.insert(REBOOT_ANNOTATION.to_string(), "kexce".to_string());
        let p = annotation_problems(&a);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].field, "metadata.annotations[slipway.io/reboot]");
        assert!(p[0].message.contains("kexce"), "{}", p[0].message);
    }

    fn one_problem(problems: Vec<Problem>, field: &str, words: &[&str]) {
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, field);
        for w in words {
            assert!(
                problems[0].message.contains(w),
                "{w:?} not in {}",
                problems[0]
            );
        }
    }

    #[test]
    fn network_interfaces_taints_and_preprovisioning_network_data_are_refused_by_name() {
        let mut spec = HostSpec {
            network_interfaces: Some(serde_json::json!([])),
            taints: Some(serde_json::json!([])),
            preprovisioning_network_data_name: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(registration_problems(&spec), vec![], "empty is as absent");
        spec.network_interfaces = Some(serde_json::json!([{"name": "eno1"}]));
        one_problem(
            registration_problems(&spec),
            "spec.networkInterfaces",
            &[
                "switch port",
                "metal3 feature Slipway does not support yet",
                "remove",
            ],
        );
        spec.network_interfaces = None;
        spec.taints = Some(serde_json::json!([{"key": "k", "effect": "NoSchedule"}]));
        one_problem(
            registration_problems(&spec),
            "spec.taints",
            &["deprecated in metal3", "never implemented", "remove it"],
        );
        spec.taints = None;
        spec.preprovisioning_network_data_name = Some("pre-nd".into());
        one_problem(
            registration_problems(&spec),
            "spec.preprovisioningNetworkDataName",
            &["\"pre-nd\"", "does not support yet", "DHCP", "remove it"],
        );
    }

    #[test]
    fn fast_inspection_needs_a_bmc_driver() {
        let mut spec = HostSpec {
            inspection_mode: Some(InspectionMode::Fast),
            ..Default::default()
        };
        one_problem(
            registration_problems(&spec),
            "spec.inspectionMode",
            &["out-of-band", "BMC driver", "agent", "disabled"],
        );
        for mode in [InspectionMode::Agent, InspectionMode::Disabled] {
            spec.inspection_mode = Some(mode);
            assert_eq!(registration_problems(&spec), vec![]);
        }
    }

    #[test]
    fn disable_power_off_cannot_be_offline() {
        let mut spec = HostSpec {
            disable_power_off: true,
            online: false,
            ..Default::default()
        };
        one_problem(
            registration_problems(&spec),
            "spec.disablePowerOff",
            &[
                "spec.online is false",
                "metal3 refuses this too",
                "online: true",
            ],
        );
        spec.online = true;
        assert_eq!(registration_problems(&spec), vec![]);
        spec.disable_power_off = false;
        spec.online = false;
        assert_eq!(registration_problems(&spec), vec![]);
    }

    #[test]
    fn oci_images_are_refused_for_provisioning() {
        let digest = "ab".repeat(32);
        let mut spec = HostSpec {
            image: Some(image("oci://registry.example/os:1", &digest, None)),
            ..Default::default()
        };
        one_problem(
            provisioning_problems(&spec),
            "spec.image.url",
            &[
                "OCI images",
                "metal3 feature Slipway does not support yet",
                "https://",
            ],
        );
        spec.image = Some(image("OCI://registry.example/os:1", &digest, None));
        one_problem(provisioning_problems(&spec), "spec.image.url", &["OCI"]);
        spec.image = Some(Image {
            oci_auth_secret_name: Some("pull".into()),
            ..image("http://10.0.0.1/a.img", &digest, None)
        });
        one_problem(
            provisioning_problems(&spec),
            "spec.image.ociAuthSecretName",
            &[
                "\"pull\"",
                "OCI images",
                "does not support yet",
                "remove it",
            ],
        );
        assert_eq!(registration_problems(&spec), vec![], "provisioning only");
    }

    #[test]
    fn vdi_and_vmdk_images_must_be_converted() {
        for (format, name) in [(ImageFormat::Vdi, "vdi"), (ImageFormat::Vmdk, "vmdk")] {
            let spec = HostSpec {
                image: Some(Image {
                    format: Some(format),
                    ..image("http://10.0.0.1/a.img", &"ab".repeat(32), None)
                }),
                ..Default::default()
            };
            one_problem(
                provisioning_problems(&spec),
                "spec.image.format",
                &[name, "raw", "qcow2", "qemu-img convert -O qcow2 IN OUT"],
            );
        }
    }

    fn bmc(address: &str, credentials: &str) -> HostSpec {
        HostSpec {
            bmc: Some(BmcDetails {
                address: address.into(),
                credentials_name: credentials.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn bmc_schemes_are_read_as_metal3_reads_them() {
        for (address, kind) in [
            ("none://", BmcKind::None),
            ("10.0.0.1", BmcKind::Ipmi),
            ("10.0.0.1:6230", BmcKind::Ipmi),
            ("ipmi://10.0.0.1:623", BmcKind::Ipmi),
            ("libvirt://192.168.122.1:6233", BmcKind::Ipmi),
            ("redfish://10.0.0.1/redfish/v1/Systems/1", BmcKind::Redfish),
            (
                "Redfish+HTTP://10.0.0.1:8000/redfish/v1/Systems/1",
                BmcKind::Redfish,
            ),
            ("redfish+https://10.0.0.1", BmcKind::Redfish),
            (
                "idrac-redfish://10.0.0.1/redfish/v1/Systems/System.Embedded.1",
                BmcKind::Redfish,
            ),
            (
                "ilo5-redfish://10.0.0.1/redfish/v1/Systems/1",
                BmcKind::Redfish,
            ),
            (
                "redfish-virtualmedia://10.0.0.1/redfish/v1/Systems/1",
                BmcKind::RedfishVirtualMedia,
            ),
            (
                "redfish-virtualmedia+http://10.0.0.1",
                BmcKind::RedfishVirtualMedia,
            ),
            (
                "idrac-virtualmedia://10.0.0.1",
                BmcKind::RedfishVirtualMedia,
            ),
            (
                "ilo5-virtualmedia+https://10.0.0.1",
                BmcKind::RedfishVirtualMedia,
            ),
            (
                "redfish-uefihttp://10.0.0.1/redfish/v1/Systems/1",
                BmcKind::RedfishUefiHttp,
            ),
            (
                "redfish-uefihttp+http://[fd00::1]:8000/redfish/v1/Systems/1",
                BmcKind::RedfishUefiHttp,
            ),
        ] {
            assert_eq!(bmc_kind(address), Ok(kind), "{address}");
            assert_eq!(
                registration_problems(&bmc(address, "c")),
                vec![],
                "{address}"
            );
        }
    }

    #[test]
    fn dropped_vendor_drivers_are_refused_by_name_with_their_replacement() {
        for (address, replacement) in [
            ("idrac://10.0.0.1", "idrac-redfish://"),
            ("idrac+https://10.0.0.1", "idrac-virtualmedia://"),
            ("ilo4://10.0.0.1", "redfish://"),
            ("ilo4-virtualmedia://10.0.0.1", "redfish-virtualmedia://"),
            ("ilo5://10.0.0.1", "ilo5-redfish://"),
            ("irmc://10.0.0.1", "redfish://"),
            ("irmc-virtualmedia://10.0.0.1", "redfish-virtualmedia://"),
            ("ibmc://10.0.0.1", "redfish://"),
        ] {
            let err = bmc_kind(address).unwrap_err();
            let scheme = address.split(['+', ':']).next().unwrap();
            assert!(err.starts_with(&format!("{scheme}:// is ")), "{err}");
            assert!(err.contains("metal3 no longer supports"), "{err}");
            assert!(err.contains(replacement), "{err}");
            one_problem(
                registration_problems(&bmc(address, "c")),
                "spec.bmc.address",
                &[replacement],
            );
        }
        let idrac = bmc_kind("idrac://x").unwrap_err();
        assert_eq!(
            idrac,
            "idrac:// is iDRAC's WS-Management interface, which metal3 no longer supports and \
             Slipway does not: use idrac-redfish:// or idrac-virtualmedia://"
        );
    }

    #[test]
    fn unknown_bmc_schemes_list_the_accepted_ones() {
        for address in [
            "amt://x",
            "ipmi+https://x",
            "redfish+ftp://x",
            "none+http://x",
        ] {
            let err = bmc_kind(address).unwrap_err();
            assert!(err.contains("is not one Slipway knows"), "{err}");
            assert!(
                err.contains(
                    "none, ipmi, libvirt, redfish, redfish-virtualmedia, redfish-uefihttp, \
                     idrac-redfish, idrac-virtualmedia, ilo5-redfish, ilo5-virtualmedia"
                ),
                "{err}"
            );
        }
        assert!(bmc_kind("").unwrap_err().contains("is empty"));
        assert!(
            bmc_kind("redfish://")
                .unwrap_err()
                .contains("names no host")
        );
        assert!(bmc_kind("ipmi:///x").unwrap_err().contains("names no host"));
    }

    #[test]
    fn bmc_identity_finds_shared_bmcs() {
        let id = |a: &str| bmc_identity(a);
        assert_eq!(
            id("redfish://10.0.0.1/redfish/v1/Systems/1"),
            id("redfish+https://10.0.0.1:443/redfish/v1/Systems/1")
        );
        assert_eq!(
            id("redfish://10.0.0.1/redfish/v1/Systems/1"),
            Some("redfish 10.0.0.1:443/redfish/v1/Systems/1".into())
        );
        assert_ne!(
            id("redfish://10.0.0.1/redfish/v1/Systems/1"),
            id("redfish://10.0.0.1/redfish/v1/Systems/2")
        );
        // The driver's name does not matter, the endpoint does.
        assert_eq!(
            id("idrac-virtualmedia://BMC.example/redfish/v1/Systems/1/"),
            id("redfish://bmc.example/redfish/v1/Systems/1")
        );
        assert_eq!(
            id("redfish+http://10.0.0.1"),
            id("redfish+http://10.0.0.1:80/")
        );
        assert_ne!(id("redfish+http://10.0.0.1"), id("redfish://10.0.0.1"));
        assert_eq!(
            id("redfish://10.0.0.1"),
            id("redfish://10.0.0.1/redfish/v1/")
        );
        assert_eq!(id("ipmi://10.0.0.1"), id("10.0.0.1:623"));
        assert_eq!(id("10.0.0.1"), Some("ipmi 10.0.0.1:623".into()));
        assert_eq!(id("libvirt://10.0.0.1:6230"), id("10.0.0.1:6230"));
        assert_ne!(id("ipmi://10.0.0.1:6230"), id("ipmi://10.0.0.1:6231"));
        assert_eq!(
            id("redfish://[FD00::1]:8000/redfish/v1/Systems/1"),
            Some("redfish [fd00::1]:8000/redfish/v1/Systems/1".into())
        );
        for none in ["", "none://", "none://anything", "amt://x", "idrac://x"] {
            assert_eq!(id(none), None, "{none:?}");
        }
    }

    #[test]
    fn architecture_must_match_the_ramdisk() {
        let arch = |a: &str| HostSpec {
            architecture: Some(a.into()),
            ..Default::default()
        };
        for (host, ramdisk) in [
            ("x86_64", "x86_64"),
            ("amd64", "x86_64"),
            ("X64", "AMD64"),
            ("aarch64", "arm64"),
            ("ARM64", "aarch64"),
        ] {
            assert_eq!(
                architecture_problems(&arch(host), ramdisk),
                vec![],
                "{host} {ramdisk}"
            );
        }
        assert_eq!(
            architecture_problems(&HostSpec::default(), "x86_64"),
            vec![]
        );
        assert_eq!(architecture_problems(&arch(""), "x86_64"), vec![]);
        one_problem(
            architecture_problems(&arch("arm64"), "x86_64"),
            "spec.architecture",
            &["host needs an aarch64 ramdisk; this coordinator serves an x86_64 ramdisk:"],
        );
        one_problem(
            architecture_problems(&arch("amd64"), "aarch64"),
            "spec.architecture",
            &["host needs an x86_64 ramdisk; this coordinator serves an aarch64 ramdisk:"],
        );
        one_problem(
            architecture_problems(&arch("sparc"), "x86_64"),
            "spec.architecture",
            &[
                "\"sparc\" is not an architecture Slipway knows",
                "x86_64 or aarch64",
            ],
        );
    }

    #[test]
    fn bmc_credentials_are_checked_as_metal3_checks_them() {
        let mut secrets = SecretKeys::new();
        // No BMC, or none://: nothing to check.
        assert_eq!(
            bmc_credentials_problems("h", &HostSpec::default(), &secrets),
            vec![]
        );
        assert_eq!(
            bmc_credentials_problems("h", &bmc("none://", ""), &secrets),
            vec![]
        );
        // A refused address is its own registration problem.
        assert_eq!(
            bmc_credentials_problems("h", &bmc("idrac://x", ""), &secrets),
            vec![]
        );
        let address = "redfish://10.0.0.1/redfish/v1/Systems/1";
        one_problem(
            bmc_credentials_problems("h", &bmc(address, ""), &secrets),
            "spec.bmc.credentialsName",
            &["is empty", "username and password"],
        );
        let spec = bmc(address, "h-bmc");
        one_problem(
            bmc_credentials_problems("worker-0", &spec, &secrets),
            "spec.bmc.credentialsName",
            &[
                "host worker-0 needs BMC credentials Secret \"h-bmc\", which does not exist in the \
               host's namespace; add a v1 Secret with keys username and password",
            ],
        );
        secrets.insert("h-bmc".into(), BTreeSet::new());
        one_problem(
            bmc_credentials_problems("worker-0", &spec, &secrets),
            "spec.bmc.credentialsName",
            &["has no username and no password (or they are empty)"],
        );
        secrets.insert("h-bmc".into(), ["password".to_string()].into());
        one_problem(
            bmc_credentials_problems("worker-0", &spec, &secrets),
            "spec.bmc.credentialsName",
            &["\"h-bmc\" has no username (or it is empty)"],
        );
        secrets.insert("h-bmc".into(), ["username".to_string()].into());
        one_problem(
            bmc_credentials_problems("worker-0", &spec, &secrets),
            "spec.bmc.credentialsName",
            &["has no password (or it is empty)"],
        );
        secrets.insert(
            "h-bmc".into(),
            ["username".to_string(), "password".to_string()].into(),
        );
        assert_eq!(
            bmc_credentials_problems("worker-0", &spec, &secrets),
            vec![]
        );
        // IPMI without a scheme needs credentials too.
        assert_eq!(
            bmc_credentials_problems("worker-0", &bmc("10.0.0.1", ""), &secrets).len(),
            1
        );
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:01"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 1])
        );
        assert_eq!(
            parse_mac("52-54-00-ab-cd-01"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 1])
        );
        assert_eq!(parse_mac("52:54:00:ab:cd:01:02"), None);
        assert_eq!(parse_mac("5:54:00:ab:cd:01"), None);
        assert_eq!(parse_mac(""), None);
    }
}
