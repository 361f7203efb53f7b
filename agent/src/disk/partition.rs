//! Adding one partition at the end of a disk to the partition table an image brought.
//!
//! Pure: [`plan_append`] reads the table through [`ReadAt`] and returns the partition and the
//! sector writes that make it (GPT: backup header and entries moved to the real end of the
//! disk, a new entry, both CRCs and both headers fixed, the protective MBR stretched; MBR: a
//! new primary entry). The caller writes the partition's contents first, then the plan's
//! writes in order, then syncs.

use super::layout::{self, Partition, ReadAt, TableKind, le32};

/// The partition wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPartition {
    /// Preferred length in bytes; less is taken when the disk has less room, down to
    /// `min_len`.
    pub len: u64,
    pub min_len: u64,
    /// GPT partition type GUID, in its on-disk (mixed-endian) byte order.
    pub gpt_type: [u8; 16],
    /// GPT unique partition GUID, on-disk byte order.
    pub gpt_unique: [u8; 16],
    /// GPT partition name (at most 36 UTF-16 units).
    pub name: String,
    /// MBR partition type byte.
    pub mbr_type: u8,
}

/// Microsoft basic data (EBD0A0A2-B9E5-4433-87C0-68B6B72699C7), the type of FAT data
/// partitions, in on-disk byte order.
pub const BASIC_DATA: [u8; 16] = [
    0xa2, 0xa0, 0xd0, 0xeb, 0xe5, 0xb9, 0x33, 0x44, 0x87, 0xc0, 0x68, 0xb6, 0xb7, 0x26, 0x99, 0xc7,
];

/// A sector-level write of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// What [`plan_append`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub kind: TableKind,
    /// 1-based partition number (`/dev/sda3` is 3).
    pub number: u32,
    pub partition: Partition,
    /// Table writes, to apply in order after the partition's contents are written.
    pub writes: Vec<Write>,
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error(
        "the disk has no partition table (neither GPT nor MBR) after the image; a config drive \
         needs an image with a partition table"
    )]
    NoTable,
    #[error(
        "the disk's protective MBR names a GPT that is not readable; the image's partition table is damaged"
    )]
    BrokenGpt,
    #[error("the {kind} partition table has no free entry for another partition")]
    Full { kind: TableKind },
    #[error(
        "no room for a {needed}-byte partition after the last partition or the image (which end \
         at byte {used_end}); the disk has {size} bytes"
    )]
    NoRoom {
        needed: u64,
        used_end: u64,
        size: u64,
    },
    #[error("an MBR partition cannot start beyond 2 TiB; use an image with a GPT")]
    MbrLimit,
    #[error("cannot read the partition table")]
    Read(#[from] std::io::Error),
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Places `[start, end_excl)` in LBAs: ending at `end_excl`, starting at the first
/// `align`-aligned LBA that keeps it within the preferred length `want`, never before
/// `used_end`; at least `min` long or no room.
fn place(
    used_end: u64,
    end_excl: u64,
    want: u64,
    min: u64,
    align: u64,
    sector: u64,
    size: u64,
) -> Result<(u64, u64), PartitionError> {
    let no_room = || PartitionError::NoRoom {
        needed: min * sector,
        used_end: used_end * sector,
        size,
    };
    let lowest = align_up(used_end, align);
    let start = align_up(end_excl.saturating_sub(want), align).max(lowest);
    if start >= end_excl || end_excl - start < min {
        return Err(no_room());
    }
    Ok((start, end_excl))
}

/// Plans a new partition at the end of the disk. `min_start` (bytes) keeps it clear of data
/// that no partition covers (the image's own bytes).
pub fn plan_append(
    r: &mut dyn ReadAt,
    sector_hint: u64,
    min_start: u64,
    want: &NewPartition,
) -> Result<Appended, PartitionError> {
    let size = r.size();
    let hint = if sector_hint == 0 { 512 } else { sector_hint };
    let mut sizes = vec![hint];
    sizes.extend(layout::SECTOR_SIZES.iter().filter(|s| **s != hint));
    for sector in sizes {
        if let Some((h, entries)) = layout::read_gpt_at(r, sector, 1)? {
            return append_gpt(r, sector, h, entries, min_start, want);
        }
    }
    let s0 = layout::read_vec(r, 0, 512)?;
    let Some(primaries) = layout::mbr_entries(&s0) else {
        return Err(PartitionError::NoTable);
    };
    if primaries.iter().any(|(k, _, _)| *k == 0xee) {
        return Err(PartitionError::BrokenGpt);
    }
    append_mbr(size, s0, &primaries, min_start, want)
}

fn append_gpt(
    r: &mut dyn ReadAt,
    sector: u64,
    h: layout::GptHeader,
    mut entries: Vec<u8>,
    min_start: u64,
    want: &NewPartition,
) -> Result<Appended, PartitionError> {
    let size = r.size();
    let last_lba = size / sector - 1;
    let entry_sectors = h.entries_len().div_ceil(sector);
    let backup_entries_lba = last_lba - entry_sectors;
    let last_usable = backup_entries_lba - 1;
    let es = h.entry_size as usize;
    let mut used_end = h
        .first_usable
        .max(h.entries_lba + entry_sectors)
        .max(min_start.div_ceil(sector));
    for p in layout::gpt_partitions(&h, &entries, sector) {
        used_end = used_end.max(p.end() / sector);
    }
    // The image's backup header marks the end of the image: nothing before it is free.
    if h.alternate_lba < last_lba {
        used_end = used_end.max(h.alternate_lba + 1);
    }
    let slot = entries
        .chunks_exact(es)
        .position(|e| e[..16].iter().all(|b| *b == 0))
        .ok_or(PartitionError::Full {
            kind: TableKind::Gpt,
        })?;
    let (start, end_excl) = place(
        used_end,
        last_usable + 1,
        want.len.div_ceil(sector),
        want.min_len.div_ceil(sector),
        (1 << 20) / sector,
        sector,
        size,
    )?;

    let e = &mut entries[slot * es..(slot + 1) * es];
    e.fill(0);
    e[..16].copy_from_slice(&want.gpt_type);
    e[16..32].copy_from_slice(&want.gpt_unique);
    e[32..40].copy_from_slice(&start.to_le_bytes());
    e[40..48].copy_from_slice(&(end_excl - 1).to_le_bytes());
    for (i, unit) in want.name.encode_utf16().take(36).enumerate() {
        e[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
    }
    let entries_crc = layout::crc32(&entries);

    let header_size = le32(&h.raw, 12) as usize;
    let header = |my: u64, alt: u64, entries_lba: u64| {
        let mut s = vec![0u8; sector as usize];
        s[..header_size].copy_from_slice(&h.raw[..header_size]);
        s[24..32].copy_from_slice(&my.to_le_bytes());
        s[32..40].copy_from_slice(&alt.to_le_bytes());
        s[48..56].copy_from_slice(&last_usable.to_le_bytes());
        s[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        s[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        s[16..20].fill(0);
        let crc = layout::crc32(&s[..header_size]);
        s[16..20].copy_from_slice(&crc.to_le_bytes());
        s
    };
    let mut writes = Vec::new();
    // The image's backup header, if it is not where the new one goes, must not linger as a
    // second opinion.
    let old_alt = h.alternate_lba;
    if old_alt < last_lba {
        writes.push(Write {
            offset: old_alt * sector,
            data: vec![0u8; sector as usize],
        });
    }
    let mut padded = entries.clone();
    padded.resize((entry_sectors * sector) as usize, 0);
    writes.push(Write {
        offset: backup_entries_lba * sector,
        data: padded.clone(),
    });
    writes.push(Write {
        offset: last_lba * sector,
        data: header(last_lba, 1, backup_entries_lba),
    });
    writes.push(Write {
        offset: h.entries_lba * sector,
        data: padded,
    });
    writes.push(Write {
        offset: sector,
        data: header(1, last_lba, h.entries_lba),
    });
    // Stretch the protective MBR's 0xEE entry over the whole disk.
    let mut s0 = layout::read_vec(r, 0, 512)?;
    if let Some(i) = (0..4).find(|i| s0[446 + 16 * i + 4] == 0xee) {
        let e = 446 + 16 * i;
        let count = u32::try_from(last_lba).unwrap_or(u32::MAX);
        s0[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
        writes.push(Write {
            offset: 0,
            data: s0,
        });
    }
    Ok(Appended {
        kind: TableKind::Gpt,
        number: slot as u32 + 1,
        partition: Partition {
            start: start * sector,
            len: (end_excl - start) * sector,
        },
        writes,
    })
}

fn append_mbr(
    size: u64,
    mut s0: Vec<u8>,
    primaries: &[(u8, u64, u64)],
    min_start: u64,
    want: &NewPartition,
) -> Result<Appended, PartitionError> {
    let slot = (0..4)
        .find(|i| {
            let e = &s0[446 + 16 * i..446 + 16 * (i + 1)];
            e[4] == 0 || le32(e, 12) == 0
        })
        .ok_or(PartitionError::Full {
            kind: TableKind::Mbr,
        })?;
    let mut used_end = min_start.div_ceil(512).max(1);
    for (_, first, count) in primaries {
        used_end = used_end.max(first + count);
    }
    let total = size / 512;
    let (start, end_excl) = place(
        used_end,
        total,
        want.len.div_ceil(512),
        want.min_len.div_ceil(512),
        2048,
        512,
        size,
    )?;
    let (Ok(first), Ok(count)) = (u32::try_from(start), u32::try_from(end_excl - start)) else {
        return Err(PartitionError::MbrLimit);
    };
    let e = 446 + 16 * slot;
    s0[e] = 0;
    s0[e + 1..e + 4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS: use LBA
    s0[e + 4] = want.mbr_type;
    s0[e + 5..e + 8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    s0[e + 8..e + 12].copy_from_slice(&first.to_le_bytes());
    s0[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
    Ok(Appended {
        kind: TableKind::Mbr,
        number: slot as u32 + 1,
        partition: Partition {
            start: start * 512,
            len: (end_excl - start) * 512,
        },
        writes: vec![Write {
            offset: 0,
            data: s0,
        }],
    })
}

/// Applies the plan's writes to a byte vector (tests, and a check of the plan).
pub fn apply(disk: &mut [u8], writes: &[Write]) {
    for w in writes {
        let at = w.offset as usize;
        disk[at..at + w.data.len()].copy_from_slice(&w.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::layout::{read_gpt_at, read_layout};
    use std::io::Cursor;

    const MIB: u64 = 1 << 20;

    fn want(len: u64) -> NewPartition {
        NewPartition {
            len,
            min_len: MIB,
            gpt_type: BASIC_DATA,
            gpt_unique: [7; 16],
            name: "config-2".into(),
            mbr_type: 0x0c,
        }
    }

    /// A GPT as an image would bring it: one partition, backup at the end of an `image`-sized
    /// disk, then copied onto a bigger disk.
    fn gpt_image_on_bigger_disk(image: u64, disk: u64, sector: u64) -> Vec<u8> {
        let mut img = vec![0u8; image as usize];
        // Build a one-partition GPT with our own appender on an empty table.
        let last = image / sector - 1;
        let mut h = vec![0u8; sector as usize];
        h[..8].copy_from_slice(layout::GPT_SIGNATURE);
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[32..40].copy_from_slice(&last.to_le_bytes());
        let entries_sectors = 16384 / sector;
        h[40..48].copy_from_slice(&(2 + entries_sectors).to_le_bytes());
        h[48..56].copy_from_slice(&(last - entries_sectors - 1).to_le_bytes());
        h[56..72].copy_from_slice(&[9; 16]);
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        let mut entries = vec![0u8; 16384];
        entries[..16].copy_from_slice(&[1; 16]);
        entries[16..32].copy_from_slice(&[2; 16]);
        let first = MIB / sector;
        entries[32..40].copy_from_slice(&first.to_le_bytes());
        entries[40..48].copy_from_slice(&(first + 2 * MIB / sector - 1).to_le_bytes());
        let crc = layout::crc32(&entries);
        h[88..92].copy_from_slice(&crc.to_le_bytes());
        let crc = layout::crc32(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        let put = |img: &mut Vec<u8>, at: u64, d: &[u8]| {
            img[at as usize..at as usize + d.len()].copy_from_slice(d)
        };
        put(&mut img, sector, &h);
        put(&mut img, 2 * sector, &entries);
        let mut b = h.clone();
        b[24..32].copy_from_slice(&last.to_le_bytes());
        b[32..40].copy_from_slice(&1u64.to_le_bytes());
        b[72..80].copy_from_slice(&(last - entries_sectors).to_le_bytes());
        b[16..20].fill(0);
        let crc = layout::crc32(&b[..92]);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        put(&mut img, last * sector, &b);
        put(&mut img, (last - entries_sectors) * sector, &entries);
        layout::tests::mbr(&mut img, 0, &[(0xee, 1, (last) as u32)]);
        img.resize(disk as usize, 0);
        img
    }

    #[test]
    fn gpt_backup_moves_to_the_real_end_and_the_new_partition_is_last() {
        for sector in [512u64, 4096] {
            let mut disk = gpt_image_on_bigger_disk(8 * MIB, 64 * MIB, sector);
            let plan = plan_append(
                &mut Cursor::new(disk.clone()),
                sector,
                8 * MIB,
                &want(16 * MIB),
            )
            .unwrap();
            assert_eq!(plan.kind, TableKind::Gpt);
            assert_eq!(plan.number, 2);
            // 16 MiB ending at the last usable LBA, aligned start.
            let end = 64 * MIB - sector - 16384;
            assert_eq!(plan.partition.end(), end, "sector {sector}");
            assert_eq!(plan.partition.start % MIB, 0);
            assert!(plan.partition.len <= 16 * MIB && plan.partition.len > 15 * MIB);
            // The old backup header (at 8 MiB - 1 sector) is zeroed.
            assert!(
                plan.writes
                    .iter()
                    .any(|w| w.offset == 8 * MIB - sector && w.data.iter().all(|b| *b == 0))
            );
            apply(&mut disk, &plan.writes);
            let mut c = Cursor::new(disk);
            let last = 64 * MIB / sector - 1;
            let (p, pe) = read_gpt_at(&mut c, sector, 1)
                .unwrap()
                .expect("primary valid");
            let (b, be) = read_gpt_at(&mut c, sector, last)
                .unwrap()
                .expect("backup valid");
            assert_eq!(p.alternate_lba, last);
            assert_eq!(b.alternate_lba, 1);
            assert_eq!(pe, be);
            assert_eq!(p.last_usable, b.last_usable);
            let l = read_layout(&mut c, sector).unwrap().unwrap();
            assert_eq!(l.partitions.len(), 2);
            assert_eq!(l.partitions[1], plan.partition);
            // The name is config-2 in UTF-16LE.
            assert_eq!(&pe[128 + 56..128 + 58], b"c\0");
        }
    }

    #[test]
    fn gpt_partition_shrinks_to_fit_and_refuses_when_nothing_fits() {
        let disk = gpt_image_on_bigger_disk(8 * MIB, 12 * MIB, 512);
        let plan = plan_append(
            &mut Cursor::new(disk.clone()),
            512,
            8 * MIB,
            &want(64 * MIB),
        )
        .unwrap();
        assert_eq!(plan.partition.start, 8 * MIB);
        let err = plan_append(
            &mut Cursor::new(disk),
            512,
            8 * MIB,
            &want(64 * MIB).min(5 * MIB),
        )
        .unwrap_err();
        assert!(matches!(err, PartitionError::NoRoom { .. }), "{err}");
        assert!(err.to_string().contains("no room"), "{err}");
    }

    impl NewPartition {
        fn min(mut self, m: u64) -> Self {
            self.min_len = m;
            self
        }
    }

    #[test]
    fn mbr_gets_a_new_primary_at_the_end() {
        let mut disk = vec![0u8; (32 * MIB) as usize];
        layout::tests::mbr(&mut disk, 0, &[(0x83, 2048, 8192)]);
        let plan =
            plan_append(&mut Cursor::new(disk.clone()), 512, 5 * MIB, &want(8 * MIB)).unwrap();
        assert_eq!(plan.kind, TableKind::Mbr);
        assert_eq!(plan.number, 2);
        assert_eq!(
            plan.partition,
            Partition {
                start: 24 * MIB,
                len: 8 * MIB
            }
        );
        apply(&mut disk, &plan.writes);
        let l = read_layout(&mut Cursor::new(disk.clone()), 512)
            .unwrap()
            .unwrap();
        assert_eq!(l.partitions.len(), 2);
        assert_eq!(disk[446 + 16 + 4], 0x0c);
        // A full table is refused.
        layout::tests::mbr(
            &mut disk,
            0,
            &[
                (0x83, 2048, 10),
                (0x83, 4096, 10),
                (0x83, 6144, 10),
                (0x83, 8192, 10),
            ],
        );
        let err = plan_append(&mut Cursor::new(disk), 512, 0, &want(MIB)).unwrap_err();
        assert!(matches!(err, PartitionError::Full { .. }));
    }

    #[test]
    fn no_table_is_a_clear_error() {
        let err =
            plan_append(&mut Cursor::new(vec![0u8; 4 << 20]), 512, 0, &want(MIB)).unwrap_err();
        assert!(err.to_string().contains("no partition table"), "{err}");
    }
}
