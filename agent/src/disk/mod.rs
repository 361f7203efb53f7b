//! Choosing disks, and the only ways to write to them.
//!
//! Invariant: every destructive operation takes a [`SelectedDisk`], and a `SelectedDisk` can
//! only be made by [`select_root_disk`] (the metal3 root device hints matched against the
//! inventory) or [`select_for_cleaning`]. No code path can write to a disk nobody chose.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::inventory::{self, Disk};

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
pub fn mismatches(hints: &Hints, disk: &Disk) -> Vec<String> {
    let mut why = Vec::new();
    if let Some(name) = &hints.device_name
        && &disk.name != name
        && !disk.alternate_names.iter().any(|a| a == name)
    {
        why.push(format!("deviceName is not {name}"));
    }
    let exact = |why: &mut Vec<String>, label: &str, want: &Option<String>, have: &str| {
        if let Some(w) = want
            && w != have
        {
            why.push(format!("{label} is {have:?}, not {w:?}"));
        }
    };
    exact(&mut why, "hctl", &hints.hctl, &disk.hctl);
    exact(
        &mut why,
        "serialNumber",
        &hints.serial_number,
        &disk.serial_number,
    );
    exact(&mut why, "wwn", &hints.wwn, &disk.wwn);
    exact(
        &mut why,
        "wwnWithExtension",
        &hints.wwn_with_extension,
        &disk.wwn_with_extension,
    );
    exact(
        &mut why,
        "wwnVendorExtension",
        &hints.wwn_vendor_extension,
        &disk.wwn_vendor_extension,
    );
    let contains = |why: &mut Vec<String>, label: &str, want: &Option<String>, have: &str| {
        if let Some(w) = want
            && !have.to_lowercase().contains(&w.to_lowercase())
        {
            why.push(format!("{label} {have:?} does not contain {w:?}"));
        }
    };
    contains(&mut why, "model", &hints.model, &disk.model);
    contains(&mut why, "vendor", &hints.vendor, &disk.vendor);
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

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open {} for writing", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} refused a write of {len} bytes at byte {offset}", path.display())]
    Write {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot flush {} to stable storage", path.display())]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where image bytes go. A trait so tests can inject short writes and failures at chosen
/// offsets.
pub trait DiskWriter: Send {
    fn path(&self) -> &Path;
    /// Capacity in bytes.
    fn size(&self) -> u64;
    fn write_all_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError>;
    fn sync(&mut self) -> Result<(), DiskError>;
}

/// A block device or a plain file.
pub struct FileDisk {
    file: File,
    path: PathBuf,
    size: u64,
}

impl FileDisk {
    /// Opens the selected disk for writing. Never creates or truncates anything.
    pub fn open(disk: &SelectedDisk) -> Result<FileDisk, DiskError> {
        let path = disk.path().to_path_buf();
        let err = |source| DiskError::Open {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(err)?;
        // Seeking to the end gives the size of block devices and files alike.
        let size = file.seek(SeekFrom::End(0)).map_err(err)?;
        Ok(FileDisk { file, path, size })
    }
}

impl DiskWriter for FileDisk {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn write_all_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| DiskError::Write {
                path: self.path.clone(),
                offset,
                len: buf.len(),
                source,
            })
    }

    fn sync(&mut self) -> Result<(), DiskError> {
        self.file.sync_all().map_err(|source| DiskError::Sync {
            path: self.path.clone(),
            source,
        })
    }
}

/// Bytes wiped at each end of a disk or partition: covers MBR and primary GPT, the backup
/// GPT, and the superblocks of common filesystems, md (0.90/1.x), LVM and ZFS labels.
pub const WIPE_BYTES: u64 = 1 << 20;

/// Zeroes `[from, to)` (clipped to the device).
fn zero_range(writer: &mut dyn DiskWriter, from: u64, to: u64) -> Result<(), DiskError> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let to = to.min(writer.size());
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        writer.write_all_at(at, &ZEROS[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Zeroes the first and last MiB of the device and syncs: no partition table (MBR, primary or
/// backup GPT) and no boot sector remain.
pub fn zero_ends(writer: &mut dyn DiskWriter) -> Result<(), DiskError> {
    let size = writer.size();
    zero_range(writer, 0, WIPE_BYTES)?;
    zero_range(writer, size.saturating_sub(WIPE_BYTES), size)?;
    writer.sync()
}

/// Zeroes the first and last MiB of the disk and of each of its partitions, then syncs.
/// Returns the partitions wiped, as (start, length) in bytes.
pub fn wipe_metadata(
    disk: &SelectedDisk,
    writer: &mut dyn DiskWriter,
) -> Result<Vec<(u64, u64)>, DiskError> {
    let parts = partitions(&disk.disk);
    for (start, len) in &parts {
        zero_range(writer, *start, start + WIPE_BYTES.min(*len))?;
        zero_range(
            writer,
            (start + len).saturating_sub(WIPE_BYTES).max(*start),
            start + len,
        )?;
    }
    zero_ends(writer)?;
    Ok(parts)
}

/// (start, length) in bytes of the disk's partitions, from sysfs.
fn partitions(disk: &Disk) -> Vec<(u64, u64)> {
    if disk.kernel_name.is_empty() {
        return Vec::new();
    }
    let dir = Path::new("/sys/block").join(&disk.kernel_name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&disk.kernel_name)
        })
        .filter_map(|e| {
            let start = inventory::read(&e.path().join("start"))?
                .parse::<u64>()
                .ok()?;
            let len = inventory::read(&e.path().join("size"))?
                .parse::<u64>()
                .ok()?;
            Some((start * 512, len * 512))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, gib: u64) -> Disk {
        Disk {
            name: name.into(),
            size_bytes: gib << 30,
            model: "QEMU HARDDISK".into(),
            vendor: "ATA".into(),
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
        sda.alternate_names = vec!["/dev/disk/by-path/pci-0000:00:1f.2-ata-1".into()];
        sda.serial_number = "S1".into();
        sda.hctl = "0:0:0:0".into();
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

    #[test]
    fn wipe_zeroes_both_ends_of_a_file() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("d.img");
        std::fs::write(&path, vec![0xaau8; 3 << 20]).unwrap();
        let inv = crate::inventory::Inventory::collect(
            Path::new("/"),
            &crate::inventory::Options {
                disks: vec![path.clone()],
                ..Default::default()
            },
        );
        let sel = select_for_cleaning(&inv.disks).remove(0);
        let mut w = FileDisk::open(&sel).unwrap();
        wipe_metadata(&sel, &mut w).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..1 << 20].iter().all(|b| *b == 0));
        assert!(data[1 << 20..2 << 20].iter().all(|b| *b == 0xaa));
        assert!(data[2 << 20..].iter().all(|b| *b == 0));
    }
}
