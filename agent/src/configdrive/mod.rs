//! Config drives: the host's first-boot data (user data, network data, meta data) as an
//! OpenStack `config-2` partition at the end of the root disk, which cloud-init's ConfigDrive
//! datasource (and Ignition's, and cloudbase-init's) reads unchanged.
//!
//! Layout, as OpenStack (and Ironic, through openstacksdk) writes it, in a VFAT filesystem
//! labelled `config-2`:
//! ```text
//! openstack/2012-08-10/{meta_data.json, user_data, network_data.json}
//! openstack/latest/{meta_data.json, user_data, network_data.json}
//! ```
//! - [`build_fat`] makes the filesystem image (pure: bytes in, bytes out);
//! - [`write_config_drive`] adds the partition to the image's partition table
//!   ([`crate::disk::partition`]) and writes both: contents first, table last, then syncs.
//!
//! **Invariant:** the contents are secrets (passwords, keys, tokens in user data): no `Debug`,
//! log line or error message of this module shows them.

use std::fmt;
use std::io::{self, Cursor, Write as _};

use crate::disk::partition::{self, NewPartition, PartitionError};
use crate::disk::{self, DiskError, DiskWriter, Reader, SelectedDisk};

/// Preferred size of the config-drive partition (user data is at most a few MiB: a
/// Kubernetes Secret holds at most 1 MiB).
pub const PREFERRED_BYTES: u64 = 16 << 20;
/// Smallest config-drive partition (FAT16 needs 4085 clusters).
pub const MIN_BYTES: u64 = 8 << 20;
/// The FAT volume label cloud-init looks for.
pub const LABEL: &str = "config-2";
/// Directories written, oldest first (openstacksdk's default versions).
pub const VERSIONS: [&str; 2] = ["2012-08-10", "latest"];

/// The first-boot data of a host. `Debug` shows sizes only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ConfigDrive {
    /// `user_data`: any bytes (cloud-config, a script, Ignition JSON).
    pub user_data: Option<Vec<u8>>,
    /// `network_data.json`: OpenStack network data, JSON.
    pub network_data: Option<Vec<u8>>,
    /// `meta_data.json`: a JSON object with at least `uuid`.
    pub meta_data: Vec<u8>,
}

impl fmt::Debug for ConfigDrive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = |o: &Option<Vec<u8>>| o.as_ref().map(Vec::len);
        f.debug_struct("ConfigDrive")
            .field("user_data_bytes", &len(&self.user_data))
            .field("network_data_bytes", &len(&self.network_data))
            .field("meta_data_bytes", &self.meta_data.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigDriveError {
    #[error("the config drive's {0}")]
    Invalid(String),
    #[error("cannot build the config drive's FAT filesystem")]
    Fat(#[source] io::Error),
    #[error("cannot add the config-drive partition to {device}")]
    Partition {
        device: String,
        #[source]
        source: PartitionError,
    },
    #[error(transparent)]
    Disk(#[from] DiskError),
}

impl ConfigDrive {
    /// Checks what cloud-init needs: meta data is a JSON object with a `uuid`; network data,
    /// when given, is JSON. Messages name the file, never its contents.
    pub fn check(&self) -> Result<(), ConfigDriveError> {
        let meta: serde_json::Value = serde_json::from_slice(&self.meta_data).map_err(|e| {
            ConfigDriveError::Invalid(format!(
                "meta_data.json is not JSON (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        match meta.get("uuid") {
            Some(serde_json::Value::String(u)) if !u.is_empty() => {}
            _ => {
                return Err(ConfigDriveError::Invalid(
                    "meta_data.json has no \"uuid\" string (cloud-init needs it as the instance id)"
                        .into(),
                ));
            }
        }
        if let Some(n) = &self.network_data
            && let Err(e) = serde_json::from_slice::<serde_json::Value>(n)
        {
            return Err(ConfigDriveError::Invalid(format!(
                "network_data.json is not JSON (line {}, column {})",
                e.line(),
                e.column()
            )));
        }
        Ok(())
    }

    /// Total bytes of content.
    pub fn content_len(&self) -> u64 {
        let l = |o: &Option<Vec<u8>>| o.as_ref().map_or(0, |v| v.len() as u64);
        l(&self.user_data) + l(&self.network_data) + self.meta_data.len() as u64
    }

    /// The files of the drive, as (path, contents).
    pub fn files(&self) -> Vec<(String, &[u8])> {
        let mut out = Vec::new();
        for v in VERSIONS {
            out.push((format!("openstack/{v}/meta_data.json"), &self.meta_data[..]));
            if let Some(u) = &self.user_data {
                out.push((format!("openstack/{v}/user_data"), &u[..]));
            }
            if let Some(n) = &self.network_data {
                out.push((format!("openstack/{v}/network_data.json"), &n[..]));
            }
        }
        out
    }
}

/// Fills what cloud-init and metal3's consumers expect in `meta_data.json` and is not given:
/// `uuid`, `name`, `hostname`, `local-hostname`/`local_hostname`, `launch_index`,
/// `public_keys` (an object of key name to OpenSSH public key; empty when none).
pub fn complete_meta_data(
    mut meta: serde_json::Map<String, serde_json::Value>,
    uuid: &str,
    hostname: &str,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    let mut put = |k: &str, v: Value| {
        meta.entry(k.to_string()).or_insert(v);
    };
    put("uuid", Value::from(uuid));
    if !hostname.is_empty() {
        put("name", Value::from(hostname));
        put("hostname", Value::from(hostname));
        put("local-hostname", Value::from(hostname));
        put("local_hostname", Value::from(hostname));
    }
    put("launch_index", Value::from(0));
    put("public_keys", Value::Object(Default::default()));
    meta
}

/// Builds a VFAT filesystem of exactly `size` bytes labelled `config-2` holding the drive's
/// files.
pub fn build_fat(drive: &ConfigDrive, size: u64) -> Result<Vec<u8>, ConfigDriveError> {
    let fat = |e: io::Error| ConfigDriveError::Fat(e);
    let size = usize::try_from(size)
        .map_err(|_| ConfigDriveError::Invalid(format!("size {size} is too large")))?;
    let mut buf = Cursor::new(vec![0u8; size]);
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    fatfs::format_volume(
        &mut buf,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .fat_type(fatfs::FatType::Fat16),
    )
    .map_err(fat)?;
    {
        let fs = fatfs::FileSystem::new(&mut buf, fatfs::FsOptions::new()).map_err(fat)?;
        {
            let root = fs.root_dir();
            for (path, data) in drive.files() {
                let (dir, name) = path.rsplit_once('/').unwrap_or(("", &path));
                let mut d = root.clone();
                for part in dir.split('/').filter(|p| !p.is_empty()) {
                    d = match d.open_dir(part) {
                        Ok(x) => x,
                        Err(_) => d.create_dir(part).map_err(fat)?,
                    };
                }
                let mut f = d.create_file(name).map_err(fat)?;
                f.truncate().map_err(fat)?;
                f.write_all(data).map_err(fat)?;
                f.flush().map_err(fat)?;
            }
        }
        fs.unmount().map_err(fat)?;
    }
    let mut img = buf.into_inner();
    fix_dot_entries(&mut img).map_err(|e| ConfigDriveError::Fat(io::Error::other(e)))?;
    Ok(img)
}

/// fatfs 0.3 writes long-name entries before the `.` and `..` entries of a new directory,
/// which `fsck.fat` rejects ("Expected a valid '.' entry in this slot") and which the FAT
/// specification does not allow. Rewrites each directory's first slots as `.`, `..` and two
/// deleted entries. FAT16 only (what [`build_fat`] makes).
fn fix_dot_entries(img: &mut [u8]) -> Result<(), String> {
    let le16 = |b: &[u8], at: usize| usize::from(u16::from_le_bytes([b[at], b[at + 1]]));
    if img.len() < 512 {
        return Err("the FAT image is too small".into());
    }
    let sector = le16(img, 11);
    let per_cluster = usize::from(img[13]);
    let reserved = le16(img, 14);
    let fats = usize::from(img[16]);
    let root_entries = le16(img, 17);
    let fat_sectors = le16(img, 22);
    let root = (reserved + fats * fat_sectors) * sector;
    let data = root + root_entries * 32;
    let cluster_bytes = per_cluster * sector;
    let is_dot = |e: &[u8], dots: &[u8]| {
        e[..dots.len()] == *dots && e[dots.len()..11].iter().all(|b| *b == b' ')
    };
    // (offset, entries) of directories to visit: the root first.
    let mut todo = vec![(root, root_entries)];
    let mut seen = 0;
    while let Some((dir, count)) = todo.pop() {
        seen += 1;
        if seen > 64 {
            return Err("too many directories in the FAT image".into());
        }
        let end = (dir + count * 32).min(img.len());
        let slots: Vec<usize> = (dir..end).step_by(32).collect();
        if slots.len() >= 4 && dir != root {
            let s: Vec<&[u8]> = slots[..4].iter().map(|o| &img[*o..*o + 32]).collect();
            if s[0][11] == 0x0f && is_dot(s[1], b".") && s[2][11] == 0x0f && is_dot(s[3], b"..") {
                let (dot, dotdot) = (s[1].to_vec(), s[3].to_vec());
                img[slots[0]..slots[0] + 32].copy_from_slice(&dot);
                img[slots[1]..slots[1] + 32].copy_from_slice(&dotdot);
                for o in &slots[2..4] {
                    img[*o..*o + 32].fill(0);
                    img[*o] = 0xe5; // deleted
                }
            }
        }
        for o in slots {
            let e = &img[o..o + 32];
            if e[0] == 0 {
                break;
            }
            if e[0] == 0xe5 || e[11] == 0x0f || e[11] & 0x10 == 0 {
                continue;
            }
            if is_dot(e, b".") || is_dot(e, b"..") {
                continue;
            }
            let cluster = le16(e, 26);
            if cluster >= 2 {
                let at = data + (cluster - 2) * cluster_bytes;
                if at + cluster_bytes <= img.len() {
                    todo.push((at, cluster_bytes / 32));
                }
            }
        }
    }
    Ok(())
}

/// Where a config drive went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub device: String,
    /// 1-based partition number.
    pub number: u32,
    pub start: u64,
    pub len: u64,
    pub table: disk::layout::TableKind,
}

impl fmt::Display for Placed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config-2 partition {} of {} ({} at byte {}, {} table)",
            self.number,
            self.device,
            disk::human(self.len),
            self.start,
            self.table
        )
    }
}

/// A GPT unique partition GUID (version 4, random).
fn random_guid() -> [u8; 16] {
    let mut g = [0u8; 16];
    if getrandom::fill(&mut g).is_err() {
        // No entropy source: a fixed, valid GUID is still a valid table.
        g = *b"slipway-config-2";
    }
    g[7] = (g[7] & 0x0f) | 0x40; // on-disk byte order: version in the high nibble of byte 7
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

/// Adds a `config-2` partition at the end of the selected disk, after the image that ends at
/// byte `image_end` (and after every partition of the image's table), writes the drive into
/// it, then the partition table, then syncs.
pub fn write_config_drive(
    disk: &SelectedDisk,
    writer: &mut dyn DiskWriter,
    drive: &ConfigDrive,
    image_end: u64,
) -> Result<Placed, ConfigDriveError> {
    drive.check()?;
    let device = writer.path().display().to_string();
    let sector = u64::from(disk.disk().logical_block_size);
    // Room for the files twice over (FAT, directories, slack); at least 8 MiB, so FAT16 has
    // enough clusters.
    let min_len = (drive.content_len() * 2 + (1 << 20))
        .next_multiple_of(1 << 20)
        .max(MIN_BYTES);
    let want = NewPartition {
        len: PREFERRED_BYTES.max(min_len),
        min_len,
        gpt_type: partition::BASIC_DATA,
        gpt_unique: random_guid(),
        name: LABEL.into(),
        mbr_type: 0x0c,
    };
    let plan = partition::plan_append(&mut Reader(writer), sector, image_end, &want).map_err(
        |source| ConfigDriveError::Partition {
            device: device.clone(),
            source,
        },
    )?;
    let fat = build_fat(drive, plan.partition.len)?;
    writer.write_all_at(plan.partition.start, &fat)?;
    // Contents on stable storage before the table points at them.
    writer.sync()?;
    for w in &plan.writes {
        writer.write_all_at(w.offset, &w.data)?;
    }
    writer.sync()?;
    disk::reread_partitions(disk.path());
    Ok(Placed {
        device,
        number: plan.number,
        start: plan.partition.start,
        len: plan.partition.len,
        table: plan.kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive() -> ConfigDrive {
        ConfigDrive {
            user_data: Some(b"#cloud-config\npassword: hunter2\n".to_vec()),
            network_data: Some(br#"{"links":[],"networks":[],"services":[]}"#.to_vec()),
            meta_data: br#"{"uuid":"u-1","name":"h"}"#.to_vec(),
        }
    }

    #[test]
    fn debug_never_shows_contents() {
        let text = format!("{:?}", drive());
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("user_data_bytes: Some(32)"), "{text}");
    }

    #[test]
    fn check_names_the_file_not_the_contents() {
        let mut d = drive();
        d.meta_data = b"{\"name\": \"hunter2\"}".to_vec();
        let e = d.check().unwrap_err().to_string();
        assert!(e.contains("uuid") && !e.contains("hunter2"), "{e}");
        d.meta_data = b"hunter2 is not json".to_vec();
        let e = d.check().unwrap_err().to_string();
        assert!(
            e.contains("meta_data.json is not JSON") && !e.contains("hunter2"),
            "{e}"
        );
        let mut d = drive();
        d.network_data = Some(b"hunter2".to_vec());
        let e = d.check().unwrap_err().to_string();
        assert!(
            e.contains("network_data.json") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn meta_data_defaults_do_not_override_given_values() {
        let given =
            serde_json::json!({"hostname": "custom", "public_keys": {"k": "ssh-ed25519 AAAA"}});
        let m = complete_meta_data(given.as_object().unwrap().clone(), "u-1", "worker-0");
        assert_eq!(m["uuid"], "u-1");
        assert_eq!(m["hostname"], "custom");
        assert_eq!(m["name"], "worker-0");
        assert_eq!(m["local-hostname"], "worker-0");
        assert_eq!(m["public_keys"]["k"], "ssh-ed25519 AAAA");
        let m = complete_meta_data(Default::default(), "u-2", "");
        assert_eq!(m["public_keys"], serde_json::json!({}));
        assert!(m.get("name").is_none());
    }

    #[test]
    fn fat_image_holds_every_file_under_both_versions() {
        let d = drive();
        let img = build_fat(&d, MIN_BYTES).unwrap();
        assert_eq!(img.len(), MIN_BYTES as usize);
        // Read it back with the same library (mtools and cloud-init read it in the
        // integration tests).
        let fs = fatfs::FileSystem::new(Cursor::new(img), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "config-2");
        for (path, data) in d.files() {
            let mut f = fs.root_dir().open_file(&path).unwrap();
            let mut got = Vec::new();
            io::Read::read_to_end(&mut f, &mut got).unwrap();
            assert_eq!(got, data, "{path}");
        }
        assert_eq!(d.files().len(), 6);
    }

    #[test]
    fn directories_start_with_plain_dot_entries() {
        let img = build_fat(&drive(), MIN_BYTES).unwrap();
        let fs = fatfs::FileSystem::new(Cursor::new(img.clone()), fatfs::FsOptions::new()).unwrap();
        let names: Vec<String> = fs
            .root_dir()
            .open_dir("openstack")
            .unwrap()
            .iter()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [".", "..", "2012-08-10", "latest"]);
        // No long-name entry before "." anywhere: find each "." entry and look behind it.
        let dot = *b".          \x10";
        let mut found = 0;
        for at in (0..img.len() - 32).step_by(32) {
            if img[at..at + 12] == dot {
                found += 1;
                assert!(
                    at % 512 == 0,
                    "'.' is not the first entry of its cluster at {at}"
                );
            }
        }
        assert_eq!(found, 3, "openstack, 2012-08-10, latest");
    }
}
