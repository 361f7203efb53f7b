//! qcow2, parsed as plain functions over bytes: the header, the L1 table, the L2 tables, and
//! the map they describe (which bytes of the file land at which guest offset, and which guest
//! ranges read as zeros). No I/O here: `image` fetches the tables and `decode` streams the file.
//!
//! Supported: versions 2 and 3, cluster sizes 512 B to 2 MiB, deflate- and zstd-compressed
//! clusters, extended L2 entries (subclusters), zero clusters, a dirty flag (refcounts are not
//! needed to read the active image). Refused with a reason: backing files, encryption,
//! external data files, the corrupt flag, unknown incompatible features, clusters that share
//! bytes of the file. Snapshots are ignored: the active image is what gets written.
//!
//! Invariant: every function here is total over its input bytes (no panics, no allocation
//! larger than a small multiple of the input): a fuzzer checks it (`agent/fuzz`).

use std::fmt;

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Bytes fetched to read the header and its extensions.
pub const HEADER_FETCH: u64 = 64 << 10;
/// Largest L1 table accepted (entries of 8 bytes): 32 MiB covers 2 PiB at 64 KiB clusters.
pub const MAX_L1_BYTES: u64 = 32 << 20;

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const QCOW_OFLAG_COMPRESSED: u64 = 1 << 62;
const QCOW_OFLAG_ZERO: u64 = 1;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;

const EXT_END: u32 = 0;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Qcow2Error {
    #[error("not a qcow2 image (no QFI\\xfb magic)")]
    NotQcow2,
    #[error("the qcow2 {what} is cut short: {need} bytes needed, {have} available")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("qcow2 version {0} is not supported (only 2 and 3)")]
    Version(u32),
    #[error(
        "the qcow2 image has a backing file ({0:?}); only standalone images can be written: \
         flatten it with qemu-img convert -O qcow2 (or -O raw)"
    )]
    BackingFile(String),
    #[error(
        "the qcow2 image is encrypted; Slipway writes only unencrypted images: decrypt it with \
         qemu-img convert"
    )]
    Encrypted,
    #[error(
        "the qcow2 image keeps its data in an external data file ({0:?}); merge it with \
         qemu-img convert -O qcow2"
    )]
    ExternalDataFile(String),
    #[error("the qcow2 image is marked corrupt; repair it with qemu-img check -r all")]
    Corrupt,
    #[error("the qcow2 image uses incompatible features this agent does not know (bits {0:#x})")]
    UnknownFeatures(u64),
    #[error("unsupported qcow2 {0}")]
    Unsupported(String),
    #[error("invalid qcow2 {0}")]
    Invalid(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Deflate => "deflate",
            Compression::Zstd => "zstd",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual size: the bytes of the disk the image describes.
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub compression: Compression,
    pub extended_l2: bool,
    pub dirty: bool,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The qcow2 magic at the start of `head`.
pub fn is_qcow2(head: &[u8]) -> bool {
    head.starts_with(MAGIC)
}

impl Header {
    /// Parses the header from the first bytes of the file (up to [`HEADER_FETCH`]).
    pub fn parse(b: &[u8]) -> Result<Header, Qcow2Error> {
        if b.len() < 4 || !is_qcow2(b) {
            return Err(Qcow2Error::NotQcow2);
        }
        let need = |n: usize, what: &'static str| {
            if b.len() < n {
                Err(Qcow2Error::Truncated {
                    what,
                    need: n as u64,
                    have: b.len() as u64,
                })
            } else {
                Ok(())
            }
        };
        need(72, "header")?;
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Version(version));
        }
        let backing_offset = be64(b, 8);
        let backing_size = be32(b, 16);
        let cluster_bits = be32(b, 20);
        let size = be64(b, 24);
        let crypt_method = be32(b, 32);
        let l1_size = be32(b, 36);
        let l1_offset = be64(b, 40);
        if backing_offset != 0 {
            let name = usize::try_from(backing_offset)
                .ok()
                .and_then(|o| b.get(o..o.checked_add(backing_size.min(1023) as usize)?))
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .unwrap_or_default();
            return Err(Qcow2Error::BackingFile(name));
        }
        if crypt_method != 0 {
            return Err(Qcow2Error::Encrypted);
        }
        if !(9..=21).contains(&cluster_bits) {
            return Err(Qcow2Error::Unsupported(format!(
                "cluster size 2^{cluster_bits} (512 B to 2 MiB are valid)"
            )));
        }
        let mut header = Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_offset,
            compression: Compression::Deflate,
            extended_l2: false,
            dirty: false,
        };
        if version == 3 {
            need(104, "version 3 header")?;
            let incompat = be64(b, 72);
            let header_length = be32(b, 100) as usize;
            if header_length < 104 {
                return Err(Qcow2Error::Invalid(format!(
                    "header length {header_length} (at least 104)"
                )));
            }
            // Extensions first: they give the names for the errors below.
            let (data_file, crypto) = scan_extensions(b, header_length, header.cluster_size());
            if incompat & !INCOMPAT_KNOWN != 0 {
                return Err(Qcow2Error::UnknownFeatures(incompat & !INCOMPAT_KNOWN));
            }
            if incompat & INCOMPAT_CORRUPT != 0 {
                return Err(Qcow2Error::Corrupt);
            }
            if incompat & INCOMPAT_DATA_FILE != 0 {
                return Err(Qcow2Error::ExternalDataFile(data_file.unwrap_or_default()));
            }
            if crypto {
                return Err(Qcow2Error::Encrypted);
            }
            header.dirty = incompat & INCOMPAT_DIRTY != 0;
            let ctype = if header_length > 104 {
                need(105, "compression type")?;
                b[104]
            } else {
                0
            };
            header.compression = match ctype {
                0 => Compression::Deflate,
                1 if incompat & INCOMPAT_COMPRESSION != 0 => Compression::Zstd,
                1 => {
                    return Err(Qcow2Error::Invalid(
                        "compression type zstd without the compression-type feature bit".into(),
                    ));
                }
                n => {
                    return Err(Qcow2Error::Unsupported(format!("compression type {n}")));
                }
            };
            header.extended_l2 = incompat & INCOMPAT_EXTL2 != 0;
            if header.extended_l2 && cluster_bits < 14 {
                return Err(Qcow2Error::Invalid(
                    "extended L2 entries with clusters under 16 KiB".into(),
                ));
            }
        }
        // Sizes: the L1 table must cover the virtual size.
        if size > (1u64 << 62) {
            return Err(Qcow2Error::Invalid(format!("virtual size {size}")));
        }
        let needed = header.l1_entries();
        if u64::from(l1_size) < needed {
            return Err(Qcow2Error::Invalid(format!(
                "L1 table of {l1_size} entries for a virtual size needing {needed}"
            )));
        }
        if needed > 0 && (l1_offset == 0 || l1_offset & (header.cluster_size() - 1) != 0) {
            return Err(Qcow2Error::Invalid(format!(
                "L1 table offset {l1_offset:#x} (must be a non-zero multiple of the cluster size)"
            )));
        }
        if needed * 8 > MAX_L1_BYTES {
            return Err(Qcow2Error::Unsupported(format!(
                "L1 table of {} bytes (more than {MAX_L1_BYTES})",
                needed * 8
            )));
        }
        Ok(header)
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    /// Guest bytes one L2 table covers.
    pub fn l2_span(&self) -> u64 {
        self.l2_entries() * self.cluster_size()
    }

    /// L1 entries the virtual size needs (the rest of the table is never read).
    pub fn l1_entries(&self) -> u64 {
        self.size.div_ceil(self.l2_span())
    }

    /// Where the used part of the L1 table is: (offset, length).
    pub fn l1_range(&self) -> (u64, u64) {
        (self.l1_offset, self.l1_entries() * 8)
    }
}

/// Walks the header extensions for the external data file name and an encryption header.
fn scan_extensions(b: &[u8], start: usize, cluster_size: u64) -> (Option<String>, bool) {
    let end = b.len().min(cluster_size.min(usize::MAX as u64) as usize);
    let mut at = start;
    let mut data_file = None;
    let mut crypto = false;
    while at.checked_add(8).is_some_and(|e| e <= end) {
        let kind = be32(b, at);
        let len = be32(b, at + 4) as usize;
        if kind == EXT_END {
            break;
        }
        let body = at + 8;
        let Some(body_end) = body.checked_add(len).filter(|e| *e <= end) else {
            break;
        };
        match kind {
            EXT_DATA_FILE => {
                data_file = Some(String::from_utf8_lossy(&b[body..body_end]).into_owned())
            }
            EXT_CRYPTO => crypto = true,
            _ => {}
        }
        at = body + len.div_ceil(8) * 8;
    }
    (data_file, crypto)
}

/// The L2 tables the L1 table points to: (L1 index, file offset).
pub fn parse_l1(h: &Header, l1: &[u8]) -> Result<Vec<(u64, u64)>, Qcow2Error> {
    let (_, len) = h.l1_range();
    if (l1.len() as u64) < len {
        return Err(Qcow2Error::Truncated {
            what: "L1 table",
            need: len,
            have: l1.len() as u64,
        });
    }
    let mut out = Vec::new();
    for (i, e) in l1[..len as usize].chunks_exact(8).enumerate() {
        let off = be64(e, 0) & L1E_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off & (h.cluster_size() - 1) != 0 {
            return Err(Qcow2Error::Invalid(format!(
                "L1 entry {i}: L2 table offset {off:#x} is not cluster aligned"
            )));
        }
        out.push((i as u64, off));
    }
    Ok(out)
}

/// One piece of the map, by its place in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes at file offset `host` are the guest's bytes at `guest`.
    Data { host: u64, guest: u64, len: u64 },
    /// A compressed cluster: at most `len` bytes at `host` decompress to one cluster, of which
    /// the first `out_len` bytes are the guest's at `guest` (less than a cluster at the end of
    /// the virtual size).
    Compressed {
        host: u64,
        len: u64,
        guest: u64,
        out_len: u64,
    },
}

impl Extent {
    pub fn host(&self) -> u64 {
        match *self {
            Extent::Data { host, .. } | Extent::Compressed { host, .. } => host,
        }
    }

    pub fn host_len(&self) -> u64 {
        match *self {
            Extent::Data { len, .. } | Extent::Compressed { len, .. } => len,
        }
    }

    pub fn host_end(&self) -> u64 {
        self.host().saturating_add(self.host_len())
    }

    /// (guest offset, guest length).
    pub fn guest(&self) -> (u64, u64) {
        match *self {
            Extent::Data { guest, len, .. } => (guest, len),
            Extent::Compressed { guest, out_len, .. } => (guest, out_len),
        }
    }
}

/// Collects extents from L2 tables; [`MapBuilder::finish`] checks them against the file.
#[derive(Debug)]
pub struct MapBuilder {
    header: Header,
    extents: Vec<Extent>,
}

impl MapBuilder {
    pub fn new(header: &Header) -> MapBuilder {
        MapBuilder {
            header: header.clone(),
            extents: Vec::new(),
        }
    }

    fn push_data(&mut self, host: u64, guest: u64, len: u64) {
        if let Some(Extent::Data {
            host: h,
            guest: g,
            len: l,
        }) = self.extents.last_mut()
            && *h + *l == host
            && *g + *l == guest
        {
            *l += len;
            return;
        }
        self.extents.push(Extent::Data { host, guest, len });
    }

    /// Adds the L2 table of L1 entry `l1_index`.
    pub fn add_l2(&mut self, l1_index: u64, table: &[u8]) -> Result<(), Qcow2Error> {
        let h = &self.header;
        let cs = h.cluster_size();
        let eb = h.l2_entry_bytes() as usize;
        if (table.len() as u64) < cs {
            return Err(Qcow2Error::Truncated {
                what: "L2 table",
                need: cs,
                have: table.len() as u64,
            });
        }
        let size = h.size;
        let cluster_bits = h.cluster_bits;
        let extended = h.extended_l2;
        let v2 = h.version == 2;
        let base = l1_index
            .checked_mul(h.l2_span())
            .ok_or_else(|| Qcow2Error::Invalid(format!("L1 index {l1_index}")))?;
        for (i, e) in table[..cs as usize].chunks_exact(eb).enumerate() {
            let guest = base + i as u64 * cs;
            if guest >= size {
                break;
            }
            let glen = cs.min(size - guest);
            let entry = be64(e, 0);
            if entry & QCOW_OFLAG_COMPRESSED != 0 {
                let x = 62 - (cluster_bits - 8);
                let host = entry & ((1u64 << x) - 1);
                let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
                let len = (sectors * 512).saturating_sub(host & 511);
                if host == 0 || len == 0 {
                    return Err(Qcow2Error::Invalid(format!(
                        "compressed cluster at guest offset {guest} has no data"
                    )));
                }
                self.extents.push(Extent::Compressed {
                    host,
                    len,
                    guest,
                    out_len: glen,
                });
                continue;
            }
            let host = entry & L2E_OFFSET_MASK;
            if host != 0 && host & (cs - 1) != 0 {
                return Err(Qcow2Error::Invalid(format!(
                    "cluster at guest offset {guest}: data offset {host:#x} is not cluster aligned"
                )));
            }
            if !extended {
                if (!v2 && entry & QCOW_OFLAG_ZERO != 0) || host == 0 {
                    continue; // reads as zeros
                }
                self.push_data(host, guest, glen);
                continue;
            }
            let bitmap = be64(e, 8);
            let alloc = bitmap as u32;
            let zero = (bitmap >> 32) as u32;
            if alloc & zero != 0 {
                return Err(Qcow2Error::Invalid(format!(
                    "cluster at guest offset {guest}: subclusters both allocated and zero"
                )));
            }
            if alloc != 0 && host == 0 {
                return Err(Qcow2Error::Invalid(format!(
                    "cluster at guest offset {guest}: allocated subclusters without data offset"
                )));
            }
            let sc = cs / 32;
            for s in 0..32u64 {
                if alloc & (1 << s) == 0 {
                    continue;
                }
                let g = guest + s * sc;
                if g >= size {
                    break;
                }
                self.push_data(host + s * sc, g, sc.min(size - g));
            }
        }
        Ok(())
    }

    /// Checks the extents against the file length and sorts them by file offset.
    pub fn finish(mut self, file_len: u64) -> Result<Map, Qcow2Error> {
        self.extents.sort_by_key(|e| (e.host(), e.guest().0));
        let mut out: Vec<Extent> = Vec::with_capacity(self.extents.len());
        let cs = self.header.cluster_size();
        for e in self.extents {
            let (guest, _) = e.guest();
            let e = match e {
                Extent::Data { host, len, .. } => {
                    if host.saturating_add(len) > file_len {
                        return Err(Qcow2Error::Invalid(format!(
                            "data for guest offset {guest} lies beyond the end of the file \
                             ({file_len} bytes)"
                        )));
                    }
                    e
                }
                Extent::Compressed {
                    host,
                    len,
                    guest,
                    out_len,
                } => {
                    if host >= file_len {
                        return Err(Qcow2Error::Invalid(format!(
                            "compressed data for guest offset {guest} lies beyond the end of \
                             the file ({file_len} bytes)"
                        )));
                    }
                    // The sector count is an upper bound; the file may end sooner.
                    Extent::Compressed {
                        host,
                        len: len.min(file_len - host).min(2 * cs + 512),
                        guest,
                        out_len,
                    }
                }
            };
            if let Some(prev) = out.last_mut()
                && e.host() < prev.host_end()
            {
                match (prev, &e) {
                    // Compressed clusters share sectors; the streamer keeps the bytes.
                    (Extent::Compressed { .. }, Extent::Compressed { .. }) => {}
                    // The rounded-up length of a compressed cluster ends where data starts.
                    (Extent::Compressed { host, len, .. }, Extent::Data { .. }) => {
                        *len = e.host() - *host;
                    }
                    _ => {
                        return Err(Qcow2Error::Unsupported(format!(
                            "clusters sharing bytes of the file (at file offset {:#x}, guest \
                             offset {guest}); rewrite the image with qemu-img convert -O qcow2",
                            e.host()
                        )));
                    }
                }
            }
            out.push(e);
        }
        Ok(Map {
            size: self.header.size,
            cluster_size: cs,
            compression: self.header.compression,
            extents: out,
        })
    }
}

/// Where every byte of the active image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Map {
    /// Virtual size.
    pub size: u64,
    pub cluster_size: u64,
    pub compression: Compression,
    /// Sorted by file offset; data extents never overlap anything.
    pub extents: Vec<Extent>,
}

impl Map {
    /// Guest ranges no extent covers (they read as zeros), sorted and merged: (offset, len).
    pub fn zero_ranges(&self) -> Vec<(u64, u64)> {
        let mut covered: Vec<(u64, u64)> = self.extents.iter().map(Extent::guest).collect();
        covered.sort_unstable();
        let mut out = Vec::new();
        let mut at = 0u64;
        for (g, l) in covered {
            if g > at {
                out.push((at, g - at));
            }
            at = at.max(g.saturating_add(l));
        }
        if at < self.size {
            out.push((at, self.size - at));
        }
        out
    }

    /// Guest bytes that come from the file.
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.guest().1).sum()
    }
}

/// Decompresses one cluster: `input` may run past the end of the compressed data (qcow2
/// records only an upper bound), `out` must be filled exactly.
pub fn decompress_cluster(
    compression: Compression,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), String> {
    match compression {
        Compression::Deflate => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
                Ok(_) => Err(format!(
                    "deflate data gave {} bytes instead of {}",
                    d.total_out(),
                    out.len()
                )),
                Err(e) => Err(format!("deflate: {e}")),
            }
        }
        Compression::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            while outb.pos() < outb.capacity() {
                let before = (inb.pos(), outb.pos());
                d.run(&mut inb, &mut outb)
                    .map_err(|e| format!("zstd: {e}"))?;
                if (inb.pos(), outb.pos()) == before {
                    break;
                }
            }
            let got = outb.pos();
            if got == out.len() {
                Ok(())
            } else {
                Err(format!(
                    "zstd data gave {got} bytes instead of {}",
                    out.len()
                ))
            }
        }
    }
}

/// Byte ranges of the file that hold metadata read before streaming: header, L1, L2 tables.
/// The streamer checks the streamed bytes of these ranges against what was read first.
pub fn table_ranges(h: &Header, l2: &[(u64, u64)], file_len: u64) -> Vec<(u64, u64)> {
    let mut r = vec![(0, HEADER_FETCH.min(file_len))];
    let (o, l) = h.l1_range();
    if l > 0 {
        r.push((o, l));
    }
    r.extend(l2.iter().map(|(_, off)| (*off, h.cluster_size())));
    r
}

/// The whole parse over a file held in memory: what the fuzzer and the corpus test drive.
pub fn map_from_file(file: &[u8]) -> Result<Map, Qcow2Error> {
    let head = &file[..file.len().min(HEADER_FETCH as usize)];
    let h = Header::parse(head)?;
    let slice = |off: u64, len: u64, what: &'static str| {
        usize::try_from(off)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(o, l)| file.get(o..o.checked_add(l)?))
            .ok_or(Qcow2Error::Truncated {
                what,
                need: off.saturating_add(len),
                have: file.len() as u64,
            })
    };
    let (o, l) = h.l1_range();
    let l1 = slice(o, l, "L1 table")?;
    let l2s = parse_l1(&h, l1)?;
    let mut b = MapBuilder::new(&h);
    for (i, off) in l2s {
        b.add_l2(i, slice(off, h.cluster_size(), "L2 table")?)?;
    }
    b.finish(file.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header with the given fields, followed by the end-of-extensions marker.
    pub(crate) fn header_bytes(cluster_bits: u32, size: u64, l1_size: u32, l1_off: u64) -> Vec<u8> {
        let mut b = vec![0u8; 112];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&size.to_be_bytes());
        b[36..40].copy_from_slice(&l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&l1_off.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    fn put(file: &mut Vec<u8>, at: usize, data: &[u8]) {
        if file.len() < at + data.len() {
            file.resize(at + data.len(), 0);
        }
        file[at..at + data.len()].copy_from_slice(data);
    }

    #[test]
    fn hand_made_image_maps_data_zero_and_unallocated_clusters() {
        // 512-byte clusters: 64 entries per L2 table, 32 KiB per table. Size 40 KiB: 2 L1 entries.
        let cs = 512usize;
        let mut f = header_bytes(9, 40 << 10, 2, 512);
        put(&mut f, 512, &(1024u64 | 1 << 63).to_be_bytes()); // L1[0] -> L2 at 1024
        put(&mut f, 520, &0u64.to_be_bytes()); // L1[1] unallocated
        // L2: cluster 0 data at 1536, cluster 1 zero flag, cluster 2 data at 2048, 3 unallocated.
        put(&mut f, 1024, &1536u64.to_be_bytes());
        put(&mut f, 1032, &(4096u64 | 1).to_be_bytes());
        put(&mut f, 1040, &2048u64.to_be_bytes());
        put(&mut f, 1536, &[7u8; 512]);
        put(&mut f, 2048, &[8u8; 512]);
        f.resize(2560, 0);
        let map = map_from_file(&f).unwrap();
        assert_eq!(map.cluster_size, cs as u64);
        assert_eq!(
            map.extents,
            vec![
                Extent::Data {
                    host: 1536,
                    guest: 0,
                    len: 512
                },
                Extent::Data {
                    host: 2048,
                    guest: 1024,
                    len: 512
                }
            ]
        );
        assert_eq!(
            map.zero_ranges(),
            vec![(512, 512), (1536, (40 << 10) - 1536)]
        );
        assert_eq!(map.data_bytes(), 1024);
    }

    #[test]
    fn contiguous_clusters_merge() {
        let mut f = header_bytes(9, 2048, 1, 512);
        put(&mut f, 512, &1024u64.to_be_bytes());
        for i in 0..4u64 {
            put(
                &mut f,
                1024 + 8 * i as usize,
                &(1536 + 512 * i).to_be_bytes(),
            );
        }
        f.resize(1536 + 2048, 0);
        let map = map_from_file(&f).unwrap();
        assert_eq!(
            map.extents,
            vec![Extent::Data {
                host: 1536,
                guest: 0,
                len: 2048
            }]
        );
        assert!(map.zero_ranges().is_empty());
    }

    #[test]
    fn refusals_name_the_reason() {
        let mut backing = header_bytes(16, 1 << 20, 1, 65536);
        backing[8..16].copy_from_slice(&200u64.to_be_bytes());
        backing[16..20].copy_from_slice(&8u32.to_be_bytes());
        put(&mut backing, 200, b"base.img");
        assert_eq!(
            Header::parse(&backing),
            Err(Qcow2Error::BackingFile("base.img".into()))
        );
        let mut enc = header_bytes(16, 1 << 20, 1, 65536);
        enc[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(Header::parse(&enc), Err(Qcow2Error::Encrypted));
        let mut ext = header_bytes(16, 1 << 20, 1, 65536);
        ext[79] = INCOMPAT_DATA_FILE as u8;
        put(&mut ext, 104, &EXT_DATA_FILE.to_be_bytes());
        put(&mut ext, 108, &6u32.to_be_bytes());
        put(&mut ext, 112, b"data.r\0\0");
        put(&mut ext, 120, &[0u8; 8]);
        assert_eq!(
            Header::parse(&ext),
            Err(Qcow2Error::ExternalDataFile("data.r".into()))
        );
        let mut unknown = header_bytes(16, 1 << 20, 1, 65536);
        unknown[72] = 0x80;
        assert!(matches!(
            Header::parse(&unknown),
            Err(Qcow2Error::UnknownFeatures(_))
        ));
        let mut v4 = header_bytes(16, 1 << 20, 1, 65536);
        v4[7] = 4;
        assert_eq!(Header::parse(&v4), Err(Qcow2Error::Version(4)));
        assert_eq!(Header::parse(b"QFI"), Err(Qcow2Error::NotQcow2));
        assert!(matches!(
            Header::parse(&header_bytes(16, 1 << 20, 0, 65536)),
            Err(Qcow2Error::Invalid(_))
        ));
        assert!(matches!(
            Header::parse(&header_bytes(22, 1 << 20, 1, 1 << 22)),
            Err(Qcow2Error::Unsupported(_))
        ));
    }

    #[test]
    fn overlapping_data_clusters_are_refused() {
        let mut f = header_bytes(9, 1024, 1, 512);
        put(&mut f, 512, &1024u64.to_be_bytes());
        put(&mut f, 1024, &1536u64.to_be_bytes());
        put(&mut f, 1032, &1536u64.to_be_bytes());
        f.resize(2048, 0);
        assert!(matches!(
            map_from_file(&f),
            Err(Qcow2Error::Unsupported(m)) if m.contains("sharing")
        ));
    }

    #[test]
    fn compressed_descriptors_decode() {
        // 64 KiB clusters: x = 62 - 8 = 54; 3 extra sectors; offset 0x10100 (not sector aligned).
        let mut f = header_bytes(16, 65536, 1, 65536);
        let entry = QCOW_OFLAG_COMPRESSED | (3u64 << 54) | 0x30100;
        put(&mut f, 65536, &(131072u64).to_be_bytes());
        put(&mut f, 131072, &entry.to_be_bytes());
        f.resize(0x30100 + 4096, 0);
        let map = map_from_file(&f).unwrap();
        assert_eq!(
            map.extents,
            vec![Extent::Compressed {
                host: 0x30100,
                len: 4 * 512 - 0x100,
                guest: 0,
                out_len: 65536
            }]
        );
    }

    #[test]
    fn clusters_decompress_with_trailing_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut c = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut c, &data).unwrap();
        let mut z = c.finish().unwrap();
        z.extend_from_slice(&[0xff; 300]);
        let mut out = vec![0u8; 4096];
        decompress_cluster(Compression::Deflate, &z, &mut out).unwrap();
        assert_eq!(out, data);
        let mut z = zstd::bulk::compress(&data, 3).unwrap();
        z.extend_from_slice(&[0xff; 300]);
        let mut out = vec![0u8; 4096];
        decompress_cluster(Compression::Zstd, &z, &mut out).unwrap();
        assert_eq!(out, data);
        let mut short = vec![0u8; 8192];
        assert!(decompress_cluster(Compression::Zstd, &z, &mut short).is_err());
        assert!(decompress_cluster(Compression::Deflate, &[1, 2, 3], &mut out).is_err());
    }

    /// The guest image a map describes, built from the file in memory.
    fn reconstruct(map: &Map, file: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; map.size as usize];
        let mut scratch = vec![0u8; map.cluster_size as usize];
        for e in &map.extents {
            match *e {
                Extent::Data { host, guest, len } => {
                    let (h, g, l) = (host as usize, guest as usize, len as usize);
                    out[g..g + l].copy_from_slice(&file[h..h + l]);
                }
                Extent::Compressed {
                    host,
                    len,
                    guest,
                    out_len,
                } => {
                    let input = &file[host as usize..(host + len) as usize];
                    decompress_cluster(map.compression, input, &mut scratch).unwrap();
                    let g = guest as usize;
                    out[g..g + out_len as usize].copy_from_slice(&scratch[..out_len as usize]);
                }
            }
        }
        out
    }

    fn corpus() -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/qcow2_map");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect()
    }

    /// The fuzz corpus (made by qemu-img from one 256 KiB raw image, see
    /// agent/fuzz/README.md) parses to maps that rebuild that image exactly.
    #[test]
    fn corpus_maps_rebuild_the_source_image() {
        use sha2::Digest;
        const SOURCE_SHA256: &str =
            "76f1d214924c41d6e5171d2e605a0af259c9973d1b170b85a3d5fca508cfdab4";
        let files = corpus();
        assert!(files.len() >= 7, "corpus missing");
        for (name, data) in &files {
            let r = map_from_file(data);
            if name.starts_with("backing") {
                assert!(
                    matches!(r, Err(Qcow2Error::BackingFile(ref n)) if n == "empty.qcow2"),
                    "{name}: {r:?}"
                );
                continue;
            }
            let map = r.unwrap_or_else(|e| panic!("{name}: {e}"));
            let guest = reconstruct(&map, data);
            if name.starts_with("empty") {
                assert!(guest.iter().all(|b| *b == 0) && guest.len() == 1 << 20);
            } else {
                assert_eq!(
                    hex::encode(sha2::Sha256::digest(&guest)),
                    SOURCE_SHA256,
                    "{name}"
                );
            }
        }
    }

    /// A bounded, deterministic fuzz run in every test run: mutated corpus files never make
    /// the parser panic, and whatever map it accepts tiles the virtual size.
    #[test]
    fn mutated_corpus_never_panics() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (_, mut data) in corpus() {
            for _ in 0..1500 {
                let flips = 1 + next() % 4;
                let mut saved = Vec::new();
                for _ in 0..flips {
                    // Mostly the header and tables (the first 64 KiB), sometimes anywhere.
                    let span = if next() % 4 == 0 {
                        data.len()
                    } else {
                        data.len().min(65536)
                    };
                    let at = (next() % span as u64) as usize;
                    saved.push((at, data[at]));
                    data[at] = match next() % 3 {
                        0 => data[at] ^ (1 << (next() % 8)),
                        1 => 0xff,
                        _ => next() as u8,
                    };
                }
                if let Ok(map) = map_from_file(&data) {
                    let zero: u64 = map.zero_ranges().iter().map(|z| z.1).sum();
                    assert_eq!(zero + map.data_bytes(), map.size);
                }
                for (at, v) in saved.into_iter().rev() {
                    data[at] = v;
                }
            }
        }
    }
}
