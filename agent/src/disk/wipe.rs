//! Cleaning: metadata wiping (metal3's `automatedCleaningMode: metadata`, like `wipefs -a`
//! plus ironic-python-agent's `erase_devices_metadata`) and full erase for decommissioning.
//!
//! Metadata wiping is planned from the disk's own bytes ([`plan_metadata_wipe`], pure) and
//! then carried out: it zeroes the places where partition tables and signatures live and
//! nothing else, so it takes milliseconds whatever the disk's size:
//! - the first and last [`WIPE_BYTES`] of the disk: MBR, primary GPT, backup GPT at the real
//!   end, and the superblocks and labels of filesystems, md RAID (0.90 and 1.0 at the end, 1.1
//!   and 1.2 at the start), LVM (label and metadata area), ZFS (labels 0/1 at the start, 2/3
//!   at the end), LUKS, swap, bcache;
//! - the same two windows of every partition the partition table names (GPT, primary or
//!   backup; MBR with the EBR chain of logical partitions), so an old filesystem or PV in a
//!   partition cannot reappear when a new table happens to put a partition in the same place;
//! - a backup GPT that is not at the end of the disk (an image's, written to a bigger disk),
//!   and each EBR;
//! - inside md 1.1/1.2 members, the first window of the array's data area (where the
//!   array's own partition table or filesystem starts).
//!
//! Full erase makes every byte read back as zero: discard where the device guarantees that
//! discarded blocks read as zeros, else `BLKZEROOUT`, else writing zeros.

use std::io;
use std::path::Path;
use std::time::Instant;

use super::layout::{self, ReadAt};
use super::{DiskError, DiskWriter, SelectedDisk};

/// Bytes wiped at each end of a disk or partition: covers MBR and primary GPT, the backup
/// GPT, and the superblocks of common filesystems, md (0.90/1.x), LVM and ZFS labels.
pub const WIPE_BYTES: u64 = 1 << 20;

/// md superblock magic (`MD_SB_MAGIC`).
const MD_MAGIC: u32 = 0xa92b_4efc;

/// A byte range `[start, end)` to zero, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Area {
    pub start: u64,
    pub end: u64,
    pub what: String,
}

impl Area {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Plans a metadata wipe from the disk's bytes. `sector` is the disk's logical block size
/// (0 or unknown: 512 and 4096 are tried). Areas are clipped to the disk, sorted, and
/// overlapping ones merged (keeping the first reason).
pub fn plan_metadata_wipe(r: &mut dyn ReadAt, sector: u64) -> io::Result<Vec<Area>> {
    let size = r.size();
    let mut areas = Vec::new();
    let ends = |areas: &mut Vec<Area>, start: u64, len: u64, what: &str| {
        let w = WIPE_BYTES.min(len);
        areas.push(Area {
            start,
            end: start + w,
            what: format!("start of {what}"),
        });
        areas.push(Area {
            start: start + len - w,
            end: start + len,
            what: format!("end of {what}"),
        });
    };
    ends(&mut areas, 0, size, "the disk");
    md_data_areas(r, 0, size, "the disk", &mut areas)?;
    if let Some(l) = layout::read_layout(r, if sector == 0 { 512 } else { sector })? {
        for (header, entries, len) in &l.gpt_areas {
            areas.push(Area {
                start: *header,
                end: header + l.sector,
                what: format!("{} header", l.kind),
            });
            areas.push(Area {
                start: *entries,
                end: entries + len,
                what: format!("{} entries", l.kind),
            });
        }
        for ebr in &l.ebrs {
            areas.push(Area {
                start: *ebr,
                end: ebr + 512,
                what: "EBR".into(),
            });
        }
        for (i, p) in l.partitions.iter().enumerate() {
            if p.start >= size || p.len == 0 {
                continue;
            }
            let len = p.len.min(size - p.start);
            let what = format!("partition {} ({} table)", i + 1, l.kind);
            ends(&mut areas, p.start, len, &what);
            md_data_areas(r, p.start, len, &what, &mut areas)?;
        }
    }
    Ok(merge(areas, size))
}

/// md 1.1 (at 0) and 1.2 (at 4 KiB) superblocks name where the array's data starts; its first
/// window holds the array's own partition table or filesystem.
fn md_data_areas(
    r: &mut dyn ReadAt,
    base: u64,
    len: u64,
    what: &str,
    areas: &mut Vec<Area>,
) -> io::Result<()> {
    for at in [0u64, 4096] {
        if at + 256 > len {
            continue;
        }
        let sb = layout::read_vec(r, base + at, 256)?;
        if layout::le32(&sb, 0) != MD_MAGIC || layout::le32(&sb, 4) != 1 {
            continue;
        }
        let data_offset = layout::le64(&sb, 128).saturating_mul(512);
        let data_size = layout::le64(&sb, 136).saturating_mul(512);
        if data_offset == 0 || data_offset >= len {
            continue;
        }
        let data_len = data_size.min(len - data_offset);
        let w = WIPE_BYTES.min(data_len);
        areas.push(Area {
            start: base + data_offset,
            end: base + data_offset + w,
            what: format!("md array data in {what}"),
        });
    }
    Ok(())
}

fn merge(mut areas: Vec<Area>, size: u64) -> Vec<Area> {
    for a in &mut areas {
        a.start = a.start.min(size);
        a.end = a.end.min(size);
    }
    areas.retain(|a| !a.is_empty());
    areas.sort_by_key(|a| (a.start, a.end));
    let mut out: Vec<Area> = Vec::new();
    for a in areas {
        match out.last_mut() {
            Some(last) if a.start <= last.end => last.end = last.end.max(a.end),
            _ => out.push(a),
        }
    }
    out
}

/// Zeroes `[from, to)` (clipped to the device) by writing zeros.
pub fn zero_range(writer: &mut dyn DiskWriter, from: u64, to: u64) -> Result<(), DiskError> {
    let to = to.min(writer.size());
    if from >= to {
        return Ok(());
    }
    super::writer::write_zero_bytes(writer, from, to - from)
}

/// Zeroes the first and last MiB of the device and syncs: no partition table (MBR, primary or
/// backup GPT) and no boot sector remain. The image writer's cleanup after a failed write.
pub fn zero_ends(writer: &mut dyn DiskWriter) -> Result<(), DiskError> {
    let size = writer.size();
    zero_range(writer, 0, WIPE_BYTES)?;
    zero_range(writer, size.saturating_sub(WIPE_BYTES), size)?;
    writer.sync()
}

/// What a wipe did.
#[derive(Clone, Debug, PartialEq)]
pub struct Wiped {
    pub device: String,
    pub areas: Vec<Area>,
    pub seconds: f64,
}

impl Wiped {
    pub fn bytes(&self) -> u64 {
        self.areas.iter().map(Area::len).sum()
    }
}

/// Wipes partition tables and signatures of the selected disk (see the module docs), syncs,
/// and asks the kernel to forget the old partitions.
pub fn wipe_metadata(disk: &SelectedDisk, writer: &mut dyn DiskWriter) -> Result<Wiped, DiskError> {
    let start = Instant::now();
    let device = writer.path().display().to_string();
    let sector = u64::from(disk.disk().logical_block_size);
    let areas = plan_metadata_wipe(&mut super::Reader(writer), sector).map_err(|source| {
        DiskError::Read {
            path: writer.path().to_path_buf(),
            offset: 0,
            source,
        }
    })?;
    for a in &areas {
        zero_range(writer, a.start, a.end)?;
    }
    writer.sync()?;
    reread_partitions(disk.path());
    Ok(Wiped {
        device,
        areas,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// How a full erase zeroed the disk.
#[derive(Clone, Debug, PartialEq)]
pub struct Erased {
    pub device: String,
    pub bytes: u64,
    /// `discard` (the device guarantees zeros after discard), `zeroout` (BLKZEROOUT),
    /// `punch-hole` (a plain file) or `write` (zeros written).
    pub method: &'static str,
    pub seconds: f64,
}

/// Bytes zeroed between two progress reports of a full erase.
pub const ERASE_STEP: u64 = 1 << 30;

/// Makes every byte of the selected disk read back as zero, then syncs. Calls `progress` with
/// the bytes done and the total after every [`ERASE_STEP`] (a full erase by writing zeros
/// takes hours on a large disk; the operator sees it move).
pub fn erase_full(
    disk: &SelectedDisk,
    writer: &mut dyn DiskWriter,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Erased, DiskError> {
    erase_in_steps(disk, writer, ERASE_STEP, progress)
}

fn erase_in_steps(
    disk: &SelectedDisk,
    writer: &mut dyn DiskWriter,
    step: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Erased, DiskError> {
    let start = Instant::now();
    let size = writer.size();
    // The first step decides the method: the device zeroes fast or it does not.
    let mut method = None;
    let mut at = 0;
    while at < size {
        let n = (size - at).min(step.max(1));
        match method {
            Some("write") => zero_range(writer, at, at + n)?,
            None => match writer.zero_fast(at, n)? {
                Some(m) => method = Some(m),
                None => {
                    zero_range(writer, at, at + n)?;
                    method = Some("write");
                }
            },
            Some(_) => {
                if writer.zero_fast(at, n)?.is_none() {
                    // It zeroed fast before: a refusal now is a device error, not a method.
                    return Err(DiskError::Zero {
                        path: writer.path().to_path_buf(),
                        offset: at,
                        len: n,
                        source: std::io::Error::other("the device stopped zeroing ranges"),
                    });
                }
            }
        }
        at += n;
        progress(at, size);
    }
    writer.sync()?;
    reread_partitions(disk.path());
    Ok(Erased {
        device: writer.path().display().to_string(),
        bytes: size,
        method: method.unwrap_or("write"),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Tells the kernel to re-read a block device's partition table (BLKRRPART), so partitions
/// that were wiped disappear. Best effort: plain files, loop devices without partition
/// scanning and busy disks refuse, and that is fine.
pub fn reread_partitions(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    if !is_block {
        return;
    }
    let Ok(f) = std::fs::File::open(path) else {
        return;
    };
    nix::ioctl_none!(blkrrpart, 0x12, 95);
    // SAFETY: BLKRRPART takes no argument; the fd is open for the duration of the call.
    if let Err(e) = unsafe { blkrrpart(std::os::fd::AsRawFd::as_raw_fd(&f)) } {
        tracing::debug!(
            "{}: the kernel did not re-read the partition table: {e}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::layout::tests::mbr;
    use crate::disk::{FileDisk, select_for_cleaning};
    use std::io::Cursor;

    const MIB: u64 = 1 << 20;

    fn plan(disk: Vec<u8>) -> Vec<(u64, u64)> {
        plan_metadata_wipe(&mut Cursor::new(disk), 512)
            .unwrap()
            .iter()
            .map(|a| (a.start, a.end))
            .collect()
    }

    #[test]
    fn bare_disk_wipes_its_two_ends_only() {
        assert_eq!(plan(vec![0u8; 64 << 20]), [(0, MIB), (63 * MIB, 64 * MIB)]);
        // Smaller than two windows: all of it, once.
        assert_eq!(plan(vec![0u8; 1536 << 10]), [(0, 1536 << 10)]);
    }

    #[test]
    fn partitions_and_logical_partitions_get_their_ends_wiped() {
        let mut disk = vec![0u8; 64 << 20];
        mbr(&mut disk, 0, &[(0x83, 8192, 16384), (0x05, 32768, 65536)]);
        mbr(&mut disk, 32768 * 512, &[(0x83, 2048, 8192)]);
        assert_eq!(
            plan(disk),
            [
                (0, MIB),
                (4 * MIB, 5 * MIB),         // p1 start
                (11 * MIB, 12 * MIB),       // p1 end
                (16 * MIB, 16 * MIB + 512), // EBR
                (17 * MIB, 18 * MIB),       // p5 start
                (20 * MIB, 21 * MIB),       // p5 end
                (63 * MIB, 64 * MIB)
            ]
        );
    }

    #[test]
    fn md_1_2_member_also_wipes_the_start_of_the_array_data() {
        let mut disk = vec![0u8; 64 << 20];
        let sb = 4096;
        disk[sb..sb + 4].copy_from_slice(&MD_MAGIC.to_le_bytes());
        disk[sb + 4..sb + 8].copy_from_slice(&1u32.to_le_bytes());
        disk[sb + 128..sb + 136].copy_from_slice(&(16384u64).to_le_bytes()); // 8 MiB
        disk[sb + 136..sb + 144].copy_from_slice(&(65536u64).to_le_bytes());
        assert_eq!(
            plan(disk),
            [(0, MIB), (8 * MIB, 9 * MIB), (63 * MIB, 64 * MIB)]
        );
    }

    /// A disk in memory that cannot zero fast (the trait's default), like a device without
    /// BLKZEROOUT.
    struct MemDisk(Vec<u8>, std::path::PathBuf);

    impl DiskWriter for MemDisk {
        fn path(&self) -> &Path {
            &self.1
        }
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<usize, DiskError> {
            self.0[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(buf.len())
        }
        fn sync(&mut self) -> Result<(), DiskError> {
            Ok(())
        }
    }

    #[test]
    fn full_erase_writes_zeros_when_the_device_cannot_zero_fast() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("d.img");
        std::fs::write(&path, [1u8; 4096]).unwrap();
        let inv = crate::inventory::Inventory::collect(
            Path::new("/"),
            &crate::inventory::Options {
                disks: vec![path.clone()],
                ..Default::default()
            },
        );
        let sel = select_for_cleaning(&inv.disks).remove(0);
        let mut mem = MemDisk(vec![0xee; 3 << 20], path);
        let mut seen = Vec::new();
        let e = erase_in_steps(&sel, &mut mem, 1 << 20, &mut |d, t| seen.push((d, t))).unwrap();
        assert_eq!(e.method, "write");
        assert_eq!(e.bytes, 3 << 20);
        assert!(mem.0.iter().all(|b| *b == 0));
        let m = 1u64 << 20;
        assert_eq!(seen, vec![(m, 3 * m), (2 * m, 3 * m), (3 * m, 3 * m)]);
        // And a reader that cannot read fails the metadata wipe with the device named.
        let err = wipe_metadata(&sel, &mut mem).unwrap_err().to_string();
        assert!(err.contains("d.img"), "{err}");
    }

    #[test]
    fn wipe_zeroes_both_ends_of_a_file_and_nothing_else() {
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
        let wiped = wipe_metadata(&sel, &mut w).unwrap();
        assert_eq!(wiped.bytes(), 2 << 20);
        let data = std::fs::read(&path).unwrap();
        assert!(data[..1 << 20].iter().all(|b| *b == 0));
        assert!(data[1 << 20..2 << 20].iter().all(|b| *b == 0xaa));
        assert!(data[2 << 20..].iter().all(|b| *b == 0));
    }
}
