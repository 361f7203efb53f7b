//! Metadata cleaning: zeroing the places where partition tables and signatures live.

use std::path::Path;

use super::{DiskError, DiskWriter, SelectedDisk};
use crate::inventory::{self, Disk};

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
    let parts = partitions(disk.disk());
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
    use crate::disk::{FileDisk, select_for_cleaning};

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
