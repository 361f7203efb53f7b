//! Root device hints (metal3 semantics) and the disk selection.

use std::fmt::{self, Write as _};
use std::path::Path;

use crate::inventory::Disk;

/// Smallest disk chosen when no hints are given (IPA's rule: the smallest disk of at least
/// 4 GiB).
pub const DEFAULT_MIN_ROOT_BYTES: u64 = 4 << 30;

/// metal3's root device hints. Every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hints {
    pub device_name: Option<String>,
    pub hctl: Option<String>,
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub serial_number: Option<String>,
    pub min_size_gigabytes: Option<u64>,
    pub wwn: Option<String>,
    pub wwn_with_extension: Option<String>,
    pub wwn_vendor_extension: Option<String>,
    pub rotational: Option<bool>,
}

impl Hints {
    pub fn is_empty(&self) -> bool {
        *self == Hints::default()
    }
}

impl fmt::Display for Hints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut s = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        };
        s("deviceName", &self.device_name);
        s("hctl", &self.hctl);
        s("model", &self.model);
        s("vendor", &self.vendor);
        s("serialNumber", &self.serial_number);
        s("wwn", &self.wwn);
        s("wwnWithExtension", &self.wwn_with_extension);
        s("wwnVendorExtension", &self.wwn_vendor_extension);
        if let Some(g) = self.min_size_gigabytes {
            parts.push(format!("minSizeGigabytes={g}"));
        }
        if let Some(r) = self.rotational {
            parts.push(format!("rotational={r}"));
        }
        if parts.is_empty() {
            f.write_str("(no hints)")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Why a disk does not match the hints; empty when it matches.
///
/// metal3 semantics: `deviceName` matches the kernel name or any stable name (by-path, by-id,
/// wwn); `model` and `vendor` are case-insensitive substrings; the WWN fields, `serialNumber`
/// and `hctl` are exact (WWNs case-insensitively); `minSizeGigabytes` is in GiB; an unknown
/// value never matches a hint.
pub fn mismatches(hints: &Hints, disk: &Disk) -> Vec<String> {
    let mut why = Vec::new();
    if let Some(name) = &hints.device_name
        && &disk.name != name
        && disk.by_path.as_ref() != Some(name)
        && !disk.alternate_names.iter().any(|a| a == name)
    {
        why.push(format!("deviceName is not {name}"));
    }
    let shown = |have: Option<&str>| match have {
        Some(h) => format!("{h:?}"),
        None => "unknown".to_string(),
    };
    let exact = |why: &mut Vec<String>,
                 label: &str,
                 want: &Option<String>,
                 have: Option<&str>,
                 fold_case: bool| {
        if let Some(w) = want {
            let same = have.is_some_and(|h| {
                if fold_case {
                    h.eq_ignore_ascii_case(w)
                } else {
                    h == w
                }
            });
            if !same {
                why.push(format!("{label} is {}, not {w:?}", shown(have)));
            }
        }
    };
    exact(&mut why, "hctl", &hints.hctl, disk.hctl.as_deref(), false);
    exact(
        &mut why,
        "serialNumber",
        &hints.serial_number,
        disk.serial_number.as_deref(),
        false,
    );
    exact(&mut why, "wwn", &hints.wwn, disk.wwn.as_deref(), true);
    exact(
        &mut why,
        "wwnWithExtension",
        &hints.wwn_with_extension,
        disk.wwn_with_extension.as_deref(),
        true,
    );
    exact(
        &mut why,
        "wwnVendorExtension",
        &hints.wwn_vendor_extension,
        disk.wwn_vendor_extension.as_deref(),
        true,
    );
    let contains =
        |why: &mut Vec<String>, label: &str, want: &Option<String>, have: Option<&str>| {
            if let Some(w) = want
                && !have.is_some_and(|h| h.to_lowercase().contains(&w.to_lowercase()))
            {
                why.push(format!("{label} {} does not contain {w:?}", shown(have)));
            }
        };
    contains(&mut why, "model", &hints.model, disk.model.as_deref());
    contains(&mut why, "vendor", &hints.vendor, disk.vendor.as_deref());
    if let Some(min) = hints.min_size_gigabytes
        && disk.size_bytes < min.saturating_mul(1 << 30)
    {
        why.push(format!("size {} < {min} GiB", human(disk.size_bytes)));
    }
    if let Some(r) = hints.rotational
        && disk.rotational != r
    {
        why.push(format!("rotational is {}", disk.rotational));
    }
    if disk.read_only {
        why.push("read-only".into());
    }
    why
}

/// A disk chosen by the selection. The proof that a destructive operation may touch it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct SelectedDisk {
    disk: Disk,
}

impl SelectedDisk {
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    pub fn path(&self) -> &Path {
        Path::new(&self.disk.name)
    }
}

/// No disk matched; says why each candidate was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoMatch(pub String);

/// Chooses the root disk: the disks matching every hint; with no hints, the smallest disk of at
/// least `min_bytes_without_hints`. Among several matches the smallest wins (IPA's rule).
pub fn select_root_disk(
    hints: &Hints,
    disks: &[Disk],
    min_bytes_without_hints: u64,
) -> Result<SelectedDisk, NoMatch> {
    let mut rejected = String::new();
    let mut candidates: Vec<&Disk> = Vec::new();
    for d in disks {
        let mut why = mismatches(hints, d);
        if hints.is_empty() && d.size_bytes < min_bytes_without_hints {
            why.push(format!(
                "size {} < {} (the minimum without hints)",
                human(d.size_bytes),
                human(min_bytes_without_hints)
            ));
        }
        if why.is_empty() {
            candidates.push(d);
        } else {
            let _ = write!(rejected, "; {} ({})", d.name, why.join(", "));
        }
    }
    candidates.sort_by_key(|d| (d.size_bytes, d.name.clone()));
    match candidates.first() {
        Some(d) => Ok(SelectedDisk { disk: (*d).clone() }),
        None if disks.is_empty() => Err(NoMatch("no disks found on this machine".into())),
        None => Err(NoMatch(format!(
            "no disk matches the root device hints {hints}{rejected}"
        ))),
    }
}

/// The disks metadata cleaning wipes: every disk the agent manages that is writable.
pub fn select_for_cleaning(disks: &[Disk]) -> Vec<SelectedDisk> {
    disks
        .iter()
        .filter(|d| !d.read_only && d.size_bytes > 0)
        .map(|d| SelectedDisk { disk: d.clone() })
        .collect()
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, gib: u64) -> Disk {
        Disk {
            name: name.into(),
            size_bytes: gib << 30,
            model: Some("QEMU HARDDISK".into()),
            vendor: Some("ATA".into()),
            ..Default::default()
        }
    }

    #[test]
    fn no_hints_picks_the_smallest_big_enough_disk() {
        let disks = [
            disk("/dev/sda", 100),
            disk("/dev/sdb", 20),
            disk("/dev/sdc", 1),
        ];
        let chosen = select_root_disk(&Hints::default(), &disks, DEFAULT_MIN_ROOT_BYTES).unwrap();
        assert_eq!(chosen.disk().name, "/dev/sdb");
    }

    #[test]
    fn hints_match_like_metal3() {
        let mut sda = disk("/dev/sda", 100);
        sda.by_path = Some("/dev/disk/by-path/pci-0000:00:1f.2-ata-1.0".into());
        sda.alternate_names = vec!["/dev/disk/by-path/pci-0000:00:1f.2-ata-1".into()];
        sda.serial_number = Some("S1".into());
        sda.hctl = Some("0:0:0:0".into());
        sda.wwn = Some("0x5000c500a1b2c3d4".into());
        sda.wwn_with_extension = Some("0x5000c500a1b2c3d4".into());
        let disks = [sda, disk("/dev/sdb", 20)];
        let pick = |h: Hints| select_root_disk(&h, &disks, 0).map(|d| d.disk().name.clone());
        assert_eq!(
            pick(Hints {
                device_name: Some("/dev/disk/by-path/pci-0000:00:1f.2-ata-1".into()),
                ..Default::default()
            })
            .unwrap(),
            "/dev/sda"
        );
        assert_eq!(
            pick(Hints {
                model: Some("harddisk".into()),
                min_size_gigabytes: Some(50),
                ..Default::default()
            })
            .unwrap(),
            "/dev/sda"
        );
        assert_eq!(
            pick(Hints {
                vendor: Some("AT".into()),
                ..Default::default()
            })
            .unwrap(),
            "/dev/sdb"
        );
        assert_eq!(
            pick(Hints {
                serial_number: Some("S1".into()),
                hctl: Some("0:0:0:0".into()),
                ..Default::default()
            })
            .unwrap(),
            "/dev/sda"
        );
        assert_eq!(
            pick(Hints {
                rotational: Some(false),
                ..Default::default()
            })
            .unwrap(),
            "/dev/sdb"
        );
        for name in [
            "/dev/disk/by-path/pci-0000:00:1f.2-ata-1.0",
            "/dev/disk/by-path/pci-0000:00:1f.2-ata-1",
        ] {
            assert_eq!(
                pick(Hints {
                    device_name: Some(name.into()),
                    ..Default::default()
                })
                .unwrap(),
                "/dev/sda",
                "{name}"
            );
        }
        assert_eq!(
            pick(Hints {
                wwn: Some("0x5000C500A1B2C3D4".into()),
                wwn_with_extension: Some("0x5000c500a1b2c3d4".into()),
                ..Default::default()
            })
            .unwrap(),
            "/dev/sda",
            "WWNs compare without case"
        );
    }

    #[test]
    fn unknown_values_never_match_a_hint() {
        let disks = [disk("/dev/sda", 100)];
        let err = select_root_disk(
            &Hints {
                serial_number: Some("S1".into()),
                wwn_vendor_extension: Some("0x1".into()),
                ..Default::default()
            },
            &disks,
            0,
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            "no disk matches the root device hints serialNumber=S1, wwnVendorExtension=0x1; \
             /dev/sda (serialNumber is unknown, not \"S1\", wwnVendorExtension is unknown, not \"0x1\")"
        );
    }

    #[test]
    fn no_match_explains_every_candidate() {
        let disks = [disk("/dev/sda", 100), disk("/dev/sdb", 20)];
        let err = select_root_disk(
            &Hints {
                device_name: Some("/dev/sdc".into()),
                min_size_gigabytes: Some(50),
                ..Default::default()
            },
            &disks,
            0,
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            "no disk matches the root device hints deviceName=/dev/sdc, minSizeGigabytes=50; \
             /dev/sda (deviceName is not /dev/sdc); /dev/sdb (deviceName is not /dev/sdc, size 20.0 GiB < 50 GiB)"
        );
        assert_eq!(
            select_root_disk(&Hints::default(), &[], 0).unwrap_err().0,
            "no disks found on this machine"
        );
    }

    #[test]
    fn read_only_disks_are_never_chosen() {
        let mut ro = disk("/dev/sda", 100);
        ro.read_only = true;
        assert!(select_root_disk(&Hints::default(), &[ro.clone()], 0).is_err());
        assert!(select_for_cleaning(&[ro]).is_empty());
    }
}
