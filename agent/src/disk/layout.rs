//! Partition tables read from the disk's own bytes: MBR (with the EBR chain of logical
//! partitions) and GPT (primary header, or the backup when the primary is damaged).
//!
//! Pure: everything reads through [`ReadAt`], so tests run on byte vectors and the ramdisk
//! needs no udev and no kernel partition scan (a loop device without `--partscan` has no
//! partitions in sysfs, and neither has a disk whose table the kernel did not re-read).

use std::fmt;

/// Logical sector sizes tried when the disk does not say (GPT's LBA 1 depends on it).
pub const SECTOR_SIZES: [u64; 2] = [512, 4096];

/// Reads bytes of a disk. Short reads at the end of the disk are errors.
pub trait ReadAt {
    fn size(&self) -> u64;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

impl ReadAt for std::io::Cursor<Vec<u8>> {
    fn size(&self) -> u64 {
        self.get_ref().len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let data = self.get_ref();
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let end = start
            .checked_add(buf.len())
            .filter(|e| *e <= data.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&data[start..end]);
        Ok(())
    }
}

/// Reads `len` bytes at `offset`.
pub fn read_vec(r: &mut dyn ReadAt, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    r.read_at(offset, &mut buf)?;
    Ok(buf)
}

/// One partition, in bytes from the start of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    pub start: u64,
    pub len: u64,
}

impl Partition {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    Mbr,
    Gpt,
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableKind::Mbr => "MBR",
            TableKind::Gpt => "GPT",
        })
    }
}

/// What the disk's partition table says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub kind: TableKind,
    pub sector: u64,
    /// Every partition (GPT entries in use; MBR primaries that are not extended containers,
    /// and the logical partitions of the EBR chain).
    pub partitions: Vec<Partition>,
    /// Where GPT's headers and entry arrays are, in bytes: (header offset, entries offset,
    /// entries length) for the primary and the backup as the headers name them.
    pub gpt_areas: Vec<(u64, u64, u64)>,
    /// The EBRs of an extended partition (byte offsets), which hold partition tables too.
    pub ebrs: Vec<u64>,
}

// ----- little-endian helpers -----

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// CRC-32 (IEEE 802.3, as GPT uses).
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for b in data {
        crc = table[((crc ^ u32::from(*b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

// ----- GPT -----

pub const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";

/// A GPT header that passed its checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptHeader {
    /// The header sector as read (at least 92 bytes are meaningful).
    pub raw: Vec<u8>,
    pub my_lba: u64,
    pub alternate_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
}

impl GptHeader {
    pub fn entries_len(&self) -> u64 {
        u64::from(self.entry_count) * u64::from(self.entry_size)
    }
}

/// Parses and checks (signature, size, CRC) a GPT header sector.
pub fn parse_gpt_header(sector: &[u8]) -> Option<GptHeader> {
    if sector.len() < 92 || &sector[..8] != GPT_SIGNATURE {
        return None;
    }
    let size = le32(sector, 12) as usize;
    if !(92..=sector.len()).contains(&size) {
        return None;
    }
    let mut copy = sector[..size].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != le32(sector, 16) {
        return None;
    }
    let entry_size = le32(sector, 84);
    let entry_count = le32(sector, 80);
    if entry_size < 128 || !entry_size.is_multiple_of(8) || entry_count > 16384 {
        return None;
    }
    Some(GptHeader {
        raw: sector.to_vec(),
        my_lba: le64(sector, 24),
        alternate_lba: le64(sector, 32),
        first_usable: le64(sector, 40),
        last_usable: le64(sector, 48),
        entries_lba: le64(sector, 72),
        entry_count,
        entry_size,
    })
}

/// Reads the header at `lba` and its entry array, both checked.
pub fn read_gpt_at(
    r: &mut dyn ReadAt,
    sector: u64,
    lba: u64,
) -> std::io::Result<Option<(GptHeader, Vec<u8>)>> {
    let Some(off) = lba.checked_mul(sector) else {
        return Ok(None);
    };
    if off.saturating_add(sector) > r.size() {
        return Ok(None);
    }
    let Some(h) = parse_gpt_header(&read_vec(r, off, sector as usize)?) else {
        return Ok(None);
    };
    if h.my_lba != lba {
        return Ok(None);
    }
    let eoff = h.entries_lba.saturating_mul(sector);
    let elen = h.entries_len();
    if eoff.saturating_add(elen) > r.size() {
        return Ok(None);
    }
    let entries = read_vec(r, eoff, elen as usize)?;
    if crc32(&entries) != le32(&h.raw, 88) {
        return Ok(None);
    }
    Ok(Some((h, entries)))
}

/// Partitions of a GPT entry array (entries with a zero type GUID are unused).
pub fn gpt_partitions(h: &GptHeader, entries: &[u8], sector: u64) -> Vec<Partition> {
    entries
        .chunks_exact(h.entry_size as usize)
        .filter(|e| e[..16].iter().any(|b| *b != 0))
        .filter_map(|e| {
            let first = le64(e, 32);
            let last = le64(e, 40);
            (last >= first).then(|| Partition {
                start: first * sector,
                len: (last - first + 1) * sector,
            })
        })
        .collect()
}

// ----- MBR -----

/// Partition types that are containers of logical partitions.
fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

/// The four primary entries of an MBR sector: (type, first LBA, sectors), unused ones left out.
pub fn mbr_entries(sector0: &[u8]) -> Option<Vec<(u8, u64, u64)>> {
    if sector0.len() < 512 || sector0[510] != 0x55 || sector0[511] != 0xaa {
        return None;
    }
    let mut out = Vec::new();
    for i in 0..4 {
        let e = &sector0[446 + 16 * i..446 + 16 * (i + 1)];
        let kind = e[4];
        let first = u64::from(le32(e, 8));
        let count = u64::from(le32(e, 12));
        if kind != 0 && count != 0 {
            out.push((kind, first, count));
        }
    }
    // A FAT/NTFS boot sector also ends in 55 aa; its "entries" are code. Insist on sane status
    // bytes, as the kernel's msdos parser does.
    if (0..4).any(|i| sector0[446 + 16 * i] & 0x7f != 0) {
        return None;
    }
    Some(out)
}

/// Reads the partition table: GPT (primary, else backup at the end), else MBR.
pub fn read_layout(r: &mut dyn ReadAt, sector_hint: u64) -> std::io::Result<Option<Layout>> {
    let size = r.size();
    if size < 512 {
        return Ok(None);
    }
    let mut sizes = vec![sector_hint];
    sizes.extend(SECTOR_SIZES.iter().filter(|s| **s != sector_hint));
    for &sector in sizes.iter().filter(|s| **s >= 512) {
        let last_lba = size / sector - 1;
        let primary = read_gpt_at(r, sector, 1)?;
        let backup_lba = primary.as_ref().map_or(last_lba, |(h, _)| h.alternate_lba);
        let backup = read_gpt_at(r, sector, backup_lba)?;
        let backup = match backup {
            Some(b) => Some(b),
            None if backup_lba != last_lba => read_gpt_at(r, sector, last_lba)?,
            None => None,
        };
        let Some((h, entries)) = primary.clone().or_else(|| backup.clone()) else {
            continue;
        };
        let mut gpt_areas = Vec::new();
        for (h, _) in primary.iter().chain(backup.iter()) {
            gpt_areas.push((h.my_lba * sector, h.entries_lba * sector, h.entries_len()));
        }
        if primary.is_some() && backup.is_none() {
            // Name where the backup should be, so wiping covers a damaged one too.
            let alt = h.alternate_lba.saturating_mul(sector);
            if alt < size {
                gpt_areas.push((alt, alt.saturating_sub(h.entries_len()), h.entries_len()));
            }
        }
        return Ok(Some(Layout {
            kind: TableKind::Gpt,
            sector,
            partitions: gpt_partitions(&h, &entries, sector),
            gpt_areas,
            ebrs: Vec::new(),
        }));
    }
    let s0 = read_vec(r, 0, 512)?;
    let Some(primaries) = mbr_entries(&s0) else {
        return Ok(None);
    };
    if primaries.iter().any(|(k, _, _)| *k == 0xee) {
        // A protective MBR whose GPT is gone: nothing more to read.
        return Ok(Some(Layout {
            kind: TableKind::Mbr,
            sector: 512,
            partitions: Vec::new(),
            gpt_areas: Vec::new(),
            ebrs: Vec::new(),
        }));
    }
    let mut partitions = Vec::new();
    let mut ebrs = Vec::new();
    for (kind, first, count) in primaries {
        if is_extended(kind) {
            read_ebr_chain(r, first, count, &mut partitions, &mut ebrs)?;
        } else {
            partitions.push(Partition {
                start: first * 512,
                len: count * 512,
            });
        }
    }
    Ok(Some(Layout {
        kind: TableKind::Mbr,
        sector: 512,
        partitions,
        gpt_areas: Vec::new(),
        ebrs,
    }))
}

/// Follows the EBR chain of an extended partition (bounded, so a loop cannot hang us).
fn read_ebr_chain(
    r: &mut dyn ReadAt,
    ext_first: u64,
    ext_count: u64,
    partitions: &mut Vec<Partition>,
    ebrs: &mut Vec<u64>,
) -> std::io::Result<()> {
    let mut lba = ext_first;
    for _ in 0..128 {
        let off = lba * 512;
        if off + 512 > r.size() || ebrs.contains(&off) {
            break;
        }
        ebrs.push(off);
        let s = read_vec(r, off, 512)?;
        let Some(entries) = mbr_entries(&s) else {
            break;
        };
        let mut next = None;
        for (kind, first, count) in entries {
            if is_extended(kind) {
                next = Some(ext_first + first);
            } else {
                partitions.push(Partition {
                    start: (lba + first) * 512,
                    len: count * 512,
                });
            }
        }
        match next {
            Some(n) if n > lba && n < ext_first + ext_count => lba = n,
            _ => break,
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    /// An MBR with the given primaries (type, first LBA, sectors).
    pub(crate) fn mbr(disk: &mut [u8], at: usize, entries: &[(u8, u32, u32)]) {
        for (i, (kind, first, count)) in entries.iter().enumerate() {
            let e = at + 446 + 16 * i;
            disk[e + 4] = *kind;
            disk[e + 8..e + 12].copy_from_slice(&first.to_le_bytes());
            disk[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
        }
        disk[at + 510] = 0x55;
        disk[at + 511] = 0xaa;
    }

    #[test]
    fn mbr_with_logical_partitions() {
        let mut disk = vec![0u8; 64 << 20];
        // p1 at 1 MiB (8 MiB), extended at 16 MiB (32 MiB) holding two logicals.
        mbr(&mut disk, 0, &[(0x83, 2048, 16384), (0x05, 32768, 65536)]);
        mbr(
            &mut disk,
            32768 * 512,
            &[(0x83, 2048, 8192), (0x05, 16384, 16384)],
        );
        mbr(&mut disk, (32768 + 16384) * 512, &[(0x82, 2048, 4096)]);
        let l = read_layout(&mut Cursor::new(disk), 512).unwrap().unwrap();
        assert_eq!(l.kind, TableKind::Mbr);
        assert_eq!(
            l.partitions,
            vec![
                Partition {
                    start: 1 << 20,
                    len: 8 << 20
                },
                Partition {
                    start: (32768 + 2048) * 512,
                    len: 8192 * 512
                },
                Partition {
                    start: (32768 + 16384 + 2048) * 512,
                    len: 4096 * 512
                },
            ]
        );
        assert_eq!(l.ebrs, vec![32768 * 512, (32768 + 16384) * 512]);
    }

    #[test]
    fn garbage_is_no_table_and_loops_end() {
        let mut disk = vec![0xffu8; 1 << 20];
        assert_eq!(
            read_layout(&mut Cursor::new(disk.clone()), 512).unwrap(),
            None
        );
        disk.fill(0);
        // An EBR that points at itself.
        mbr(&mut disk, 0, &[(0x05, 8, 100)]);
        mbr(&mut disk, 8 * 512, &[(0x83, 1, 10), (0x05, 0, 100)]);
        let l = read_layout(&mut Cursor::new(disk), 512).unwrap().unwrap();
        assert_eq!(l.partitions.len(), 1);
    }
}
