//! Semantic checks of a host's spec, beyond what parsing already refuses.
//!
//! Each problem names the field, says what is wrong and how to fix it. Problems come in two
//! scopes: those that stop registration (the host cannot be managed at all) and those that only
//! stop provisioning (the image and first-boot data).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::host::{
    ChecksumType, ERASE_ANNOTATION, HostSpec, Image, ImageFormat, META_DATA_KEYS,
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
                message: "is not supported by Slipway yet; remove it (the host would otherwise \
                          be provisioned without the settings you asked for)"
                    .into(),
            });
        }
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
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
        out.push(Problem {
            field: "spec.image.url",
            message: format!("{url:?} is not an http:// or https:// URL"),
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

/// The BMC URL schemes Slipway knows, for the registration check.
const BMC_SCHEMES: &[&str] = &[
    "redfish",
    "redfish+http",
    "redfish+https",
    "redfish-virtualmedia",
    "redfish-virtualmedia+http",
    "redfish-virtualmedia+https",
    "ipmi",
    "none",
];

fn check_bmc_address(address: &str) -> Result<(), String> {
    if address.is_empty() {
        return Err(
            "is empty; give the BMC URL, e.g. redfish://10.0.0.5/redfish/v1/Systems/1, \
                    or remove spec.bmc to power the host by hand"
                .into(),
        );
    }
    let scheme = address.split_once("://").map(|(s, _)| s).unwrap_or("ipmi");
    if BMC_SCHEMES.contains(&scheme) {
        Ok(())
    } else {
        Err(format!(
            "scheme {scheme:?} is not one Slipway knows; use one of {}",
            BMC_SCHEMES.join(", ")
        ))
    }
}

/// A normalised BMC endpoint, for duplicate detection.
pub fn bmc_identity(address: &str) -> Option<String> {
    let a = address.trim().to_ascii_lowercase();
    (!a.is_empty() && !a.starts_with("none")).then_some(a)
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
