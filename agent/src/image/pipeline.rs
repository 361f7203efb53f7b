//! The writing half of the pipeline: a hashing thread, then a writer thread that decodes
//! (raw, gzip/zstd/xz, qcow2) and writes through a [`Sink`].
//!
//! ```text
//! download task ──Chunk──► hash thread ──Msg──► writer thread: decode ─► Sink ─► DiskWriter
//!  (source.rs)    tokio     (digest of the     std sync      (formats)   zero runs,
//!                 mpsc       bytes as sent)    channel                   head held back
//! ```
//!
//! The writer takes what is already queued behind the buffer it waited for (up to
//! [`WRITE_BATCH`]) and writes data that runs on across those buffers as one vectored write,
//! handed with the buffers to one of two I/O threads ([`super::inflight`]) so the next write
//! is queued at the disk while one completes.
//!
//! The writer thread owns the disk for the whole write. It writes the held-back first MiB only
//! after the hash thread's digest matched; on any failure, including the channel closing
//! without an end marker (download error, cancellation: the caller's future was dropped), it
//! zeroes the disk's ends itself before returning, so no caller can forget to.

use std::io::Write;
use std::sync::mpsc as smpsc;
use std::time::{Duration, Instant};

use sha2::Digest;
use tokio::sync::mpsc;

use super::checksum::{Algo, Hasher};
use super::inflight::{self, InFlight, Run};
use super::qcow2::{self, Map};
use super::source::Chunk;
use super::{HEAD_BYTES, ImageError, Progress};
use crate::disk::{self, DiskWriter};

/// Block size for zero detection and the alignment of direct writes.
pub const BLOCK: u64 = 4096;
/// Zero runs shorter than this are written as data (an ioctl per 4 KiB would cost more).
pub const MIN_ZERO_RUN: u64 = 64 << 10;
/// The writer's aligned buffer.
const WRITE_BUF: usize = 4 << 20;
/// Aligned input at least this long is written from where it is, not copied first. Smaller
/// pieces (qcow2 clusters) are gathered in the buffer so each write stays large.
const MIN_DIRECT: usize = 1 << 20;
/// Download buffers already queued when the writer is free are written together, up to this
/// many bytes in one vectored write: when the disk is the slow stage, the queue is full and
/// each write is this large; when it is not, nothing waits to fill a batch. Two such writes
/// are in flight ([`inflight`]); one 4 MiB download buffer per write keeps the agent's memory
/// where it was with one 8 MiB write at a time, and two 4 MiB writes in flight beat one of
/// 8 MiB on the bench's loop device.
pub const WRITE_BATCH: usize = 4 << 20;

/// A piece of a buffer: data to write or zeros to skip, as offsets into the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    Data(usize, usize),
    Zero(usize, usize),
}

/// Whether every byte is zero (folds words so the compiler vectorises it).
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|x| *x == 0)
}

/// Splits `buf`, which goes to disk offset `base`, into data and zero segments. Only whole
/// `block`-aligned blocks (by disk offset) count as zeros, and only in runs of at least
/// `min_run` bytes; everything else is data. Segments are in order and cover `buf` exactly.
pub fn zero_runs(base: u64, buf: &[u8], block: u64, min_run: u64) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let len = buf.len();
    let push = |out: &mut Vec<Segment>, s: Segment| match (out.last_mut(), s) {
        (Some(Segment::Data(_, e)), Segment::Data(s2, e2)) if *e == s2 => *e = e2,
        (Some(Segment::Zero(_, e)), Segment::Zero(s2, e2)) if *e == s2 => *e = e2,
        _ => out.push(s),
    };
    if block == 0 || len == 0 {
        if len > 0 {
            out.push(Segment::Data(0, len));
        }
        return out;
    }
    // First block boundary at or after base.
    let first = ((base.div_ceil(block) * block) - base).min(len as u64) as usize;
    if first > 0 {
        push(&mut out, Segment::Data(0, first));
    }
    let mut at = first;
    let mut zero_start: Option<usize> = None;
    let flush_zero = |out: &mut Vec<Segment>, zs: usize, end: usize| {
        if (end - zs) as u64 >= min_run {
            push(out, Segment::Zero(zs, end));
        } else {
            push(out, Segment::Data(zs, end));
        }
    };
    while at < len {
        let end = (at + block as usize).min(len);
        let whole = end - at == block as usize;
        if whole && is_zero(&buf[at..end]) {
            zero_start.get_or_insert(at);
        } else {
            if let Some(zs) = zero_start.take() {
                flush_zero(&mut out, zs, at);
            }
            push(&mut out, Segment::Data(at, end));
        }
        at = end;
    }
    if let Some(zs) = zero_start {
        flush_zero(&mut out, zs, len);
    }
    out
}

/// A buffer whose start is aligned for O_DIRECT, without unsafe code: a Vec with room to
/// spare, used from its first aligned byte. Download buffers are of this kind too, so the
/// sink can write whole aligned blocks straight from them without copying.
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
    cap: usize,
}

impl AlignedBuf {
    /// No storage (a placeholder while the real buffer is borrowed out).
    fn empty() -> AlignedBuf {
        AlignedBuf {
            storage: Vec::new(),
            start: 0,
            len: 0,
            cap: 0,
        }
    }

    pub fn new(cap: usize, align: usize) -> AlignedBuf {
        let storage = vec![0u8; cap + align];
        let start = storage.as_ptr().align_offset(align).min(align);
        AlignedBuf {
            storage,
            start,
            len: 0,
            cap,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn room(&self) -> usize {
        self.cap - self.len
    }

    /// The unused room after the content, for reading into; [`AlignedBuf::advance`] then
    /// counts what was put there.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        let at = self.start + self.len;
        &mut self.storage[at..self.start + self.cap]
    }

    /// Counts `n` more bytes, put in [`AlignedBuf::spare_mut`], as content.
    pub fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.cap);
    }

    /// Appends `data`, which must fit in [`AlignedBuf::room`].
    pub fn push(&mut self, data: &[u8]) {
        let at = self.start + self.len;
        self.storage[at..at + data.len()].copy_from_slice(data);
        self.len += data.len();
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// How much of `data`, bound for disk offset `off`, can be written straight from its own
/// memory with O_DIRECT: whole blocks, when both the offset and the memory are aligned.
pub fn direct_len(off: u64, data: &[u8]) -> usize {
    if !off.is_multiple_of(BLOCK) || !(data.as_ptr() as usize).is_multiple_of(BLOCK as usize) {
        return 0;
    }
    data.len() - data.len() % BLOCK as usize
}

/// Where decoded bytes go, by disk offset. Holds the first [`HEAD_BYTES`] back; writes data
/// through an aligned buffer; turns zero runs into `write_zeroes` (or nothing, on a target
/// known to read as zeros).
pub struct Sink {
    pub writer: Box<dyn DiskWriter>,
    pub device: String,
    url: String,
    head: Vec<u8>,
    /// Bytes of `head` the image covers.
    head_used: usize,
    buf: AlignedBuf,
    buf_off: u64,
    pending_zero: Option<(u64, u64)>,
    target_zeroed: bool,
    size: u64,
    /// Highest disk offset written or zeroed, for the message.
    pub high_water: u64,
    pub zeroed_bytes: u64,
    /// Writes in flight on I/O threads, started with the first batch.
    inflight: Option<InFlight>,
    inflight_tried: bool,
}

impl Sink {
    pub fn new(writer: Box<dyn DiskWriter>, url: &str, target_zeroed: bool) -> Sink {
        let size = writer.size();
        let device = writer.path().display().to_string();
        Sink {
            writer,
            device,
            url: url.to_string(),
            head: vec![0u8; HEAD_BYTES as usize],
            head_used: 0,
            buf: AlignedBuf::new(WRITE_BUF, BLOCK as usize),
            buf_off: 0,
            pending_zero: None,
            target_zeroed,
            size,
            high_water: 0,
            zeroed_bytes: 0,
            inflight: None,
            inflight_tried: false,
        }
    }

    fn too_large(&self, end: u64) -> ImageError {
        ImageError::TooLarge {
            url: self.url.clone(),
            size: end,
            device: self.device.clone(),
            device_size: self.size,
        }
    }

    /// Checks `[off, off + len)` fits the disk and records it as written.
    fn claim(&mut self, off: u64, len: usize) -> Result<(), ImageError> {
        let end = off
            .checked_add(len as u64)
            .ok_or_else(|| self.too_large(u64::MAX))?;
        if end > self.size {
            return Err(self.too_large(end));
        }
        self.high_water = self.high_water.max(end);
        Ok(())
    }

    /// Writes `data` at disk offset `off`.
    pub fn write(&mut self, off: u64, mut data: &[u8]) -> Result<(), ImageError> {
        self.claim(off, data.len())?;
        let mut off = off;
        if off < HEAD_BYTES {
            let take = ((HEAD_BYTES - off) as usize).min(data.len());
            let o = off as usize;
            self.head[o..o + take].copy_from_slice(&data[..take]);
            self.head_used = self.head_used.max(o + take);
            data = &data[take..];
            off += take as u64;
        }
        while !data.is_empty() {
            if self.buf.len > 0 && self.buf_off + self.buf.len as u64 != off {
                self.flush_buf()?;
            }
            if self.buf.len == 0 {
                // Aligned input (download buffers are): write it from where it is.
                let direct = direct_len(off, data);
                if direct >= MIN_DIRECT {
                    self.put_blocks(off, &data[..direct])?;
                    data = &data[direct..];
                    off += direct as u64;
                    continue;
                }
                self.buf_off = off;
            }
            let n = self.buf.room().min(data.len());
            self.buf.push(&data[..n]);
            data = &data[n..];
            off += n as u64;
            if self.buf.room() == 0 {
                self.flush_buf()?;
            }
        }
        Ok(())
    }

    /// Writes `parts`, which follow each other on the disk, from offset `off`. Aligned parts
    /// past the head have their data written from where it is, and data that runs on from
    /// one part into the next goes to the disk as one vectored write; anything else takes
    /// the path of [`Sink::write`].
    pub fn write_parts(&mut self, off: u64, parts: &[&[u8]]) -> Result<(), ImageError> {
        for run in self.plan_parts(off, parts)? {
            let data = run.parts(parts, self.writer.path())?;
            self.writer.write_all_vectored_at(run.off, &data)?;
        }
        Ok(())
    }

    /// [`Sink::write_parts`] of download buffers it owns: the vectored writes go to the I/O
    /// threads ([`inflight`]) with the buffers, which return to `pool` once written. Without
    /// a second handle on the disk (test fakes that have none) they are written here.
    pub fn write_batch(
        &mut self,
        off: u64,
        bufs: Vec<AlignedBuf>,
        pool: &BufPool,
    ) -> Result<(), ImageError> {
        let slices: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
        let runs = self.plan_parts(off, &slices)?;
        if !runs.is_empty() && !self.inflight_tried {
            self.inflight_tried = true;
            let writers: Option<Vec<_>> = (0..inflight::DEPTH)
                .map(|_| self.writer.try_clone())
                .collect();
            self.inflight = writers.and_then(|w| InFlight::start(w, pool));
        }
        match &mut self.inflight {
            Some(f) if !runs.is_empty() => {
                drop(slices);
                f.submit(bufs, runs)?;
            }
            _ => {
                for run in &runs {
                    let data = run.parts(&slices, self.writer.path())?;
                    self.writer.write_all_vectored_at(run.off, &data)?;
                }
                drop(slices);
                for b in bufs {
                    pool.put(b);
                }
            }
        }
        Ok(())
    }

    /// Splits `parts` (following each other from `off`) into runs of data to write from
    /// where it is, and does everything else on the way: zero runs are queued for zeroing,
    /// parts that cannot be written in place go through [`Sink::write`].
    fn plan_parts(&mut self, mut off: u64, parts: &[&[u8]]) -> Result<Vec<Run>, ImageError> {
        let mut runs: Vec<Run> = Vec::new();
        let mut open: Option<Run> = None;
        let mut run_end = 0u64;
        for (i, &part) in parts.iter().enumerate() {
            let direct = self.buf.len == 0
                && off >= HEAD_BYTES
                && part.len() >= MIN_DIRECT
                && direct_len(off, part) == part.len();
            if !direct {
                self.close_run(&mut open, &mut runs)?;
                self.write(off, part)?;
                off += part.len() as u64;
                continue;
            }
            self.claim(off, part.len())?;
            for seg in zero_runs(off, part, BLOCK, MIN_ZERO_RUN) {
                match seg {
                    Segment::Data(a, b) => {
                        let at = off + a as u64;
                        if open.is_some() && run_end != at {
                            self.close_run(&mut open, &mut runs)?;
                        }
                        open.get_or_insert_with(|| Run {
                            off: at,
                            pieces: Vec::new(),
                        })
                        .pieces
                        .push((i, a, b));
                        run_end = off + b as u64;
                    }
                    Segment::Zero(a, b) => {
                        self.close_run(&mut open, &mut runs)?;
                        self.add_zero(off + a as u64, (b - a) as u64)?;
                    }
                }
            }
            off += part.len() as u64;
        }
        self.close_run(&mut open, &mut runs)?;
        Ok(runs)
    }

    /// Ends the run being gathered; the zeroing queued before it is done first.
    fn close_run(&mut self, open: &mut Option<Run>, runs: &mut Vec<Run>) -> Result<(), ImageError> {
        if let Some(r) = open.take() {
            self.flush_zero()?;
            runs.push(r);
        }
        Ok(())
    }

    /// Stops the I/O threads, dropping writes not yet started (before a failed write's ends
    /// are wiped, so none lands after the wipe).
    pub fn abandon_in_flight(&mut self) {
        if let Some(mut f) = self.inflight.take() {
            f.abandon();
        }
    }

    /// Makes `[off, off + len)` read as zeros.
    pub fn zero(&mut self, off: u64, len: u64) -> Result<(), ImageError> {
        let end = off.saturating_add(len);
        if end > self.size {
            return Err(self.too_large(end));
        }
        self.high_water = self.high_water.max(end);
        let mut off = off;
        if off < HEAD_BYTES {
            let take = (HEAD_BYTES - off).min(len);
            // The head buffer starts zeroed and nothing else writes this range.
            self.head_used = self.head_used.max((off + take) as usize);
            off += take;
        }
        if off < end {
            self.add_zero(off, end - off)?;
        }
        Ok(())
    }

    fn add_zero(&mut self, off: u64, len: u64) -> Result<(), ImageError> {
        match &mut self.pending_zero {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => {
                self.flush_zero()?;
                self.pending_zero = Some((off, len));
            }
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<(), ImageError> {
        if let Some((off, len)) = self.pending_zero.take() {
            self.zeroed_bytes += len;
            if !self.target_zeroed {
                self.writer.write_zeroes(off, len)?;
            }
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> Result<(), ImageError> {
        if self.buf.len == 0 {
            return Ok(());
        }
        // Taken out for the call (a Vec move, no copy), so `put_blocks` can borrow self.
        let buf = std::mem::replace(&mut self.buf, AlignedBuf::empty());
        let r = self.put_blocks(self.buf_off, buf.as_slice());
        self.buf = buf;
        self.buf.len = 0;
        r
    }

    /// Writes `data` at `base`: its zero runs as zeroing, the rest as data.
    fn put_blocks(&mut self, base: u64, data: &[u8]) -> Result<(), ImageError> {
        for s in zero_runs(base, data, BLOCK, MIN_ZERO_RUN) {
            match s {
                Segment::Data(a, b) => {
                    self.flush_zero()?;
                    self.writer.write_all_at(base + a as u64, &data[a..b])?;
                }
                Segment::Zero(a, b) => self.add_zero(base + a as u64, (b - a) as u64)?,
            }
        }
        Ok(())
    }

    /// Writes out everything but the head, and flushes it to stable storage.
    pub fn flush_body(&mut self) -> Result<(), ImageError> {
        self.flush_buf()?;
        self.flush_zero()?;
        if let Some(mut f) = self.inflight.take() {
            f.finish()?;
        }
        self.writer.sync()?;
        Ok(())
    }

    /// After the checksum matched: the head, a sync, and the partition table re-read.
    pub fn commit_head(&mut self) -> Result<(), ImageError> {
        self.writer.write_all_at(0, &self.head[..self.head_used])?;
        self.writer.sync()?;
        self.writer.reread_partitions()?;
        Ok(())
    }
}

/// Turns downloaded bytes into disk writes.
pub trait Decode: Send {
    fn feed(&mut self, data: &[u8]) -> Result<(), ImageError>;
    /// Consecutive downloaded buffers at once (see [`WRITE_BATCH`]), each returned to `pool`
    /// once its bytes are no longer needed.
    fn feed_batch(&mut self, bufs: Vec<AlignedBuf>, pool: &BufPool) -> Result<(), ImageError> {
        feed_each(self, bufs, pool)
    }
    /// The download ended: flush, and check the image was complete.
    fn finish(&mut self) -> Result<(), ImageError>;
    fn sink(&mut self) -> &mut Sink;
}

/// [`Decode::feed`] of each buffer in turn, then the buffers back to `pool`.
fn feed_each<D: Decode + ?Sized>(
    dec: &mut D,
    bufs: Vec<AlignedBuf>,
    pool: &BufPool,
) -> Result<(), ImageError> {
    for b in &bufs {
        dec.feed(b)?;
    }
    for b in bufs {
        pool.put(b);
    }
    Ok(())
}

/// Raw bytes at their own offsets. Also the inner end of the decompressors, where it refuses
/// a qcow2 image hiding inside a compressed file.
pub struct RawOut {
    pub sink: Sink,
    pub off: u64,
    err: Option<ImageError>,
    inner_of: Option<&'static str>,
}

impl RawOut {
    pub fn new(sink: Sink, inner_of: Option<&'static str>) -> RawOut {
        RawOut {
            sink,
            off: 0,
            err: None,
            inner_of,
        }
    }

    fn put(&mut self, data: &[u8]) -> Result<(), ImageError> {
        if self.off == 0
            && let Some(outer) = self.inner_of
            && qcow2::is_qcow2(data)
        {
            return Err(ImageError::WrongFormat {
                url: self.sink.url.clone(),
                found: format!("a {outer}-compressed qcow2 image"),
                declared: "raw".into(),
                hint: "decompress it and serve the qcow2 file itself (format: qcow2)",
            });
        }
        self.sink.write(self.off, data)?;
        self.off += data.len() as u64;
        Ok(())
    }
}

impl Write for RawOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.put(buf) {
            Ok(()) => Ok(buf.len()),
            Err(e) => {
                self.err = Some(e);
                Err(std::io::Error::other("the disk write failed"))
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Decode for RawOut {
    fn feed(&mut self, data: &[u8]) -> Result<(), ImageError> {
        self.put(data)
    }

    fn feed_batch(&mut self, bufs: Vec<AlignedBuf>, pool: &BufPool) -> Result<(), ImageError> {
        if self.inner_of.is_some() || self.off == 0 {
            // Behind a decompressor, or the first bytes (checked for a qcow2 header).
            return feed_each(self, bufs, pool);
        }
        let len = bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        self.sink.write_batch(self.off, bufs, pool)?;
        self.off += len;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ImageError> {
        Ok(())
    }

    fn sink(&mut self) -> &mut Sink {
        &mut self.sink
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compressor {
    Gzip,
    Zstd,
    Xz,
}

impl Compressor {
    pub fn name(self) -> &'static str {
        match self {
            Compressor::Gzip => "gzip",
            Compressor::Zstd => "zstd",
            Compressor::Xz => "xz",
        }
    }
}

enum Inner {
    Gzip(flate2::write::MultiGzDecoder<RawOut>),
    Zstd(zstd::stream::write::Decoder<'static, RawOut>),
    Xz(liblzma::write::XzDecoder<RawOut>),
}

/// A compressed raw image: decompressed as it streams.
pub struct Decompress {
    inner: Inner,
    kind: Compressor,
    url: String,
    consumed: u64,
}

impl Decompress {
    pub fn new(kind: Compressor, out: RawOut, url: &str) -> Result<Decompress, ImageError> {
        let inner = match kind {
            Compressor::Gzip => Inner::Gzip(flate2::write::MultiGzDecoder::new(out)),
            Compressor::Zstd => {
                let mut d = zstd::stream::write::Decoder::new(out).map_err(|e| {
                    ImageError::Invalid(format!("cannot start the zstd decoder: {e}"))
                })?;
                // Frames from `zstd --long` (up to 2 GiB windows) need this; normal frames
                // use 8 MiB at most.
                let _ = d.window_log_max(27);
                Inner::Zstd(d)
            }
            Compressor::Xz => {
                let stream = liblzma::stream::Stream::new_stream_decoder(
                    u64::MAX,
                    liblzma::stream::CONCATENATED,
                )
                .map_err(|e| ImageError::Invalid(format!("cannot start the xz decoder: {e}")))?;
                Inner::Xz(liblzma::write::XzDecoder::new_stream(out, stream))
            }
        };
        Ok(Decompress {
            inner,
            kind,
            url: url.to_string(),
            consumed: 0,
        })
    }

    fn out(&mut self) -> &mut RawOut {
        match &mut self.inner {
            Inner::Gzip(d) => d.get_mut(),
            Inner::Zstd(d) => d.get_mut(),
            Inner::Xz(d) => d.get_mut(),
        }
    }

    fn fail(&mut self, e: std::io::Error) -> ImageError {
        if let Some(inner) = self.out().err.take() {
            return inner;
        }
        let written = self.out().off;
        ImageError::Decode {
            url: self.url.clone(),
            offset: self.consumed,
            reason: format!(
                "{} data is corrupt after {written} decompressed bytes: {e}",
                self.kind.name()
            ),
        }
    }
}

impl Decode for Decompress {
    fn feed(&mut self, data: &[u8]) -> Result<(), ImageError> {
        let r = match &mut self.inner {
            Inner::Gzip(d) => d.write_all(data),
            Inner::Zstd(d) => d.write_all(data),
            Inner::Xz(d) => d.write_all(data),
        };
        r.map_err(|e| self.fail(e))?;
        self.consumed += data.len() as u64;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ImageError> {
        let r = match &mut self.inner {
            Inner::Gzip(d) => d.try_finish(),
            Inner::Zstd(d) => d.flush(),
            Inner::Xz(d) => d.try_finish(),
        };
        r.map_err(|e| self.fail(e))
    }

    fn sink(&mut self) -> &mut Sink {
        &mut self.out().sink
    }
}

/// Checks that the streamed bytes of the header and tables are the ones read before
/// streaming (so the map that placed the data describes the file the hash covers).
struct TableCheck {
    /// (offset, len, sha256 of what was read), sorted by offset.
    ranges: Vec<(u64, u64, [u8; 32])>,
    hashers: Vec<Option<sha2::Sha256>>,
    done: Vec<bool>,
    first_open: usize,
}

impl TableCheck {
    fn new(mut ranges: Vec<(u64, u64, [u8; 32])>) -> TableCheck {
        ranges.sort_by_key(|r| r.0);
        let n = ranges.len();
        TableCheck {
            hashers: (0..n).map(|_| None).collect(),
            done: ranges.iter().map(|r| r.1 == 0).collect(),
            ranges,
            first_open: 0,
        }
    }

    /// `data` is the stream's bytes from `start`; the stream is contiguous from 0.
    fn feed(&mut self, start: u64, data: &[u8], url: &str) -> Result<(), ImageError> {
        let end = start + data.len() as u64;
        let mut i = self.first_open;
        while i < self.ranges.len() && self.ranges[i].0 < end {
            let (off, len, want) = self.ranges[i];
            let r_end = off + len;
            let s = off.max(start);
            let t = r_end.min(end);
            if !self.done[i] && s < t {
                let h = self.hashers[i].get_or_insert_with(sha2::Sha256::new);
                h.update(&data[(s - start) as usize..(t - start) as usize]);
                if t == r_end {
                    let got: [u8; 32] = self.hashers[i]
                        .take()
                        .map(|h| h.finalize().into())
                        .unwrap_or_default();
                    if got != want {
                        return Err(ImageError::Decode {
                            url: url.to_string(),
                            offset: off,
                            reason: "the qcow2 tables in the stream differ from the ones read \
                                     before it (did the image change on the server?)"
                                .into(),
                        });
                    }
                    self.done[i] = true;
                }
            }
            i += 1;
        }
        while self.first_open < self.ranges.len() && self.done[self.first_open] {
            self.first_open += 1;
        }
        Ok(())
    }

    fn all_checked(&self) -> bool {
        self.done.iter().all(|d| *d)
    }
}

/// A qcow2 image streamed once in file order: data clusters are written to their guest
/// offsets as they pass, compressed clusters are collected and decompressed, guest ranges
/// with no data are zeroed first.
pub struct Qcow2Stream {
    sink: Sink,
    map: Map,
    url: String,
    file_len: u64,
    idx: usize,
    pos: u64,
    window: Vec<u8>,
    window_start: u64,
    scratch: Vec<u8>,
    checks: TableCheck,
    zeroed: bool,
}

impl Qcow2Stream {
    pub fn new(
        sink: Sink,
        map: Map,
        url: &str,
        file_len: u64,
        tables: Vec<(u64, u64, [u8; 32])>,
    ) -> Qcow2Stream {
        let cs = map.cluster_size as usize;
        Qcow2Stream {
            sink,
            map,
            url: url.to_string(),
            file_len,
            idx: 0,
            pos: 0,
            window: Vec::new(),
            window_start: 0,
            scratch: vec![0u8; cs],
            checks: TableCheck::new(tables),
            zeroed: false,
        }
    }

    fn lost(&self, at: u64) -> ImageError {
        ImageError::Decode {
            url: self.url.clone(),
            offset: at,
            reason: "internal error: the qcow2 streamer passed bytes it still needed".into(),
        }
    }
}

impl Decode for Qcow2Stream {
    fn feed(&mut self, data: &[u8]) -> Result<(), ImageError> {
        if !self.zeroed {
            // Guest ranges without data read as zeros; the old disk content must not show.
            for (off, len) in self.map.zero_ranges() {
                self.sink.zero(off, len)?;
            }
            self.zeroed = true;
        }
        let cstart = self.pos;
        let cend = cstart + data.len() as u64;
        self.pos = cend;
        self.checks.feed(cstart, data, &self.url)?;
        while let Some(e) = self.map.extents.get(self.idx).copied() {
            match e {
                qcow2::Extent::Data { host, guest, len } => {
                    let s = host.max(cstart);
                    let t = (host + len).min(cend);
                    if s < t {
                        let piece = &data[(s - cstart) as usize..(t - cstart) as usize];
                        self.sink.write(guest + (s - host), piece)?;
                    } else if host < cstart && host + len > cstart {
                        return Err(self.lost(host));
                    }
                    if host + len <= cend {
                        self.idx += 1;
                    } else {
                        break;
                    }
                }
                qcow2::Extent::Compressed {
                    host,
                    len,
                    guest,
                    out_len,
                } => {
                    let end = host + len;
                    if !self.window.is_empty() {
                        let wend = self.window_start + self.window.len() as u64;
                        if wend <= host {
                            self.window.clear();
                        } else if self.window_start < host {
                            self.window.drain(..(host - self.window_start) as usize);
                            self.window_start = host;
                        }
                    }
                    if self.window.is_empty() {
                        if host < cstart {
                            return Err(self.lost(host));
                        }
                        self.window_start = host;
                    }
                    let have = self.window_start + self.window.len() as u64;
                    let from = have.max(cstart);
                    if from > have {
                        return Err(self.lost(have));
                    }
                    let to = end.min(cend);
                    if from < to {
                        self.window.extend_from_slice(
                            &data[(from - cstart) as usize..(to - cstart) as usize],
                        );
                    }
                    if to < end {
                        break;
                    }
                    let Some(input) = self.window.get(..len as usize) else {
                        return Err(self.lost(host));
                    };
                    qcow2::decompress_cluster(self.map.compression, input, &mut self.scratch)
                        .map_err(|reason| ImageError::Decode {
                            url: self.url.clone(),
                            offset: host,
                            reason: format!(
                                "compressed cluster for guest offset {guest}: {reason}"
                            ),
                        })?;
                    let out = &self.scratch[..out_len as usize];
                    self.sink.write(guest, out)?;
                    self.idx += 1;
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ImageError> {
        if self.pos != self.file_len || self.idx != self.map.extents.len() {
            return Err(ImageError::Truncated {
                url: self.url.clone(),
                got: self.pos,
                expected: self.file_len,
            });
        }
        if !self.checks.all_checked() {
            return Err(ImageError::Decode {
                url: self.url.clone(),
                offset: self.pos,
                reason: "the qcow2 tables were not all found in the streamed file".into(),
            });
        }
        Ok(())
    }

    fn sink(&mut self) -> &mut Sink {
        &mut self.sink
    }
}

/// Download buffers, handed back by the writer for the next chunk: the same few buffers go
/// round, so a multi-GiB image costs no fresh pages (page faults were a tenth of the CPU).
/// They are aligned, so the sink writes raw data straight from them.
#[derive(Clone, Default)]
pub struct BufPool(std::sync::Arc<std::sync::Mutex<Vec<AlignedBuf>>>);

impl BufPool {
    /// An empty aligned buffer of exactly `cap` bytes.
    pub fn get(&self, cap: usize) -> AlignedBuf {
        let reused = self.0.lock().ok().and_then(|mut p| p.pop());
        match reused {
            Some(mut v) if v.capacity() == cap => {
                v.clear();
                v
            }
            _ => AlignedBuf::new(cap, BLOCK as usize),
        }
    }

    /// How many buffers wait for reuse.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.0.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Returns a buffer (at most 16 are kept).
    pub fn put(&self, v: AlignedBuf) {
        if let Ok(mut p) = self.0.lock()
            && p.len() < 16
        {
            p.push(v);
        }
    }
}

/// What the hash thread hands the writer.
pub enum Msg {
    Data(AlignedBuf),
    End { digest: String },
}

/// Hashes every byte as downloaded and passes the buffers on. Forwards the end marker with
/// the digest; stops (dropping its sender, which the writer takes as an abort) when the
/// download stops without one or the writer has gone.
pub fn hash_stage(mut rx: mpsc::Receiver<Chunk>, tx: smpsc::SyncSender<Msg>, algo: Algo) {
    let mut h = Hasher::new(algo);
    while let Some(c) = rx.blocking_recv() {
        match c {
            Chunk::Data(d) => {
                h.update(&d);
                if tx.send(Msg::Data(d)).is_err() {
                    return;
                }
            }
            Chunk::End => {
                let _ = tx.send(Msg::End { digest: h.hex() });
                return;
            }
        }
    }
}

/// The end of a write, as the writer thread saw it.
pub struct Finished {
    pub bytes: u64,
    pub digest: String,
    pub written: u64,
    pub zeroed: u64,
}

pub type ProgressFn = Box<dyn Fn(Progress) + Send + Sync>;

/// What the writer thread is told up front.
pub struct WriterJob {
    pub url: String,
    pub expected: String,
    pub algo: Algo,
    pub total: Option<u64>,
    pub progress: ProgressFn,
    pub pool: BufPool,
}

/// The writer thread: decode and write every buffer, then, if the digest matched, the head.
/// On any failure the disk's ends are zeroed before returning. Returns the error with the
/// download offset reached.
pub fn writer_stage(
    rx: smpsc::Receiver<Msg>,
    mut dec: Box<dyn Decode>,
    job: WriterJob,
) -> Result<Finished, (ImageError, u64)> {
    let mut consumed = 0u64;
    let start = Instant::now();
    let mut last = Instant::now();
    let mut last_bytes = 0u64;
    let total = job.total.unwrap_or(0);
    let report = |phase: &'static str, done: u64, rate: u64| {
        (job.progress)(Progress {
            phase,
            bytes_done: done,
            bytes_total: total,
            bytes_per_second: rate,
        })
    };
    let mut batch: Vec<AlignedBuf> = Vec::new();
    let mut next: Option<Msg> = None;
    let result = (|| -> Result<Finished, ImageError> {
        loop {
            let got = match next.take() {
                Some(m) => Ok(m),
                None => rx.recv_timeout(Duration::from_secs(1)),
            };
            let msg = match got {
                Ok(m) => m,
                Err(smpsc::RecvTimeoutError::Timeout) => {
                    report("write", consumed, 0);
                    last = Instant::now();
                    last_bytes = consumed;
                    continue;
                }
                Err(smpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ImageError::Aborted { offset: consumed });
                }
            };
            match msg {
                Msg::Data(d) => {
                    let mut bytes = d.len();
                    batch.push(d);
                    while bytes < WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(Msg::Data(d)) => {
                                bytes += d.len();
                                batch.push(d);
                            }
                            Ok(end) => {
                                next = Some(end);
                                break;
                            }
                            // Empty, or closed: the next receive says which.
                            Err(_) => break,
                        }
                    }
                    dec.feed_batch(std::mem::take(&mut batch), &job.pool)?;
                    consumed += bytes as u64;
                    let el = last.elapsed();
                    if el >= Duration::from_secs(1) {
                        let rate = ((consumed - last_bytes) as f64 / el.as_secs_f64()) as u64;
                        report("write", consumed, rate);
                        last = Instant::now();
                        last_bytes = consumed;
                    }
                }
                Msg::End { digest } => {
                    if let Some(t) = job.total
                        && consumed != t
                    {
                        return Err(ImageError::Truncated {
                            url: job.url.clone(),
                            got: consumed,
                            expected: t,
                        });
                    }
                    dec.finish()?;
                    let secs = start.elapsed().as_secs_f64().max(1e-3);
                    report("verify", consumed, (consumed as f64 / secs) as u64);
                    dec.sink().flush_body()?;
                    if digest != job.expected {
                        return Err(ImageError::Mismatch {
                            url: job.url.clone(),
                            algo: job.algo,
                            expected: job.expected.clone(),
                            actual: digest,
                        });
                    }
                    report("sync", consumed, 0);
                    dec.sink().commit_head()?;
                    let sink = dec.sink();
                    return Ok(Finished {
                        bytes: consumed,
                        digest,
                        written: sink.high_water,
                        zeroed: sink.zeroed_bytes,
                    });
                }
            }
        }
    })();
    // Close the channel first so the hash thread and the download stop promptly.
    drop(rx);
    match result {
        Ok(f) => Ok(f),
        Err(e) => {
            let sink = dec.sink();
            sink.abandon_in_flight();
            // Never leave half an image, or an old partition table over a new image, behind.
            if let Err(we) = disk::zero_ends(&mut *sink.writer) {
                tracing::error!(
                    "could not wipe {} after the failed write: {we}",
                    sink.device
                );
            }
            Err((e, consumed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_split_on_block_boundaries() {
        let mut b = vec![1u8; 4096 * 40];
        // Blocks 4..24 zero (80 KiB >= 64 KiB): a run. Blocks 30..32 zero (8 KiB): data.
        b[4 * 4096..24 * 4096].fill(0);
        b[30 * 4096..32 * 4096].fill(0);
        let s = zero_runs(0, &b, 4096, 64 << 10);
        assert_eq!(
            s,
            vec![
                Segment::Data(0, 4 * 4096),
                Segment::Zero(4 * 4096, 24 * 4096),
                Segment::Data(24 * 4096, 40 * 4096)
            ]
        );
    }

    #[test]
    fn zero_runs_respect_disk_alignment_and_tails() {
        // The buffer starts 100 bytes before a block boundary; all zeros.
        let b = vec![0u8; 100 + 4096 * 20 + 7];
        let s = zero_runs(4096 - 100, &b, 4096, 64 << 10);
        assert_eq!(
            s,
            vec![
                Segment::Data(0, 100),
                Segment::Zero(100, 100 + 4096 * 20),
                Segment::Data(100 + 4096 * 20, b.len())
            ]
        );
        assert_eq!(zero_runs(0, &[], 4096, 1), vec![]);
        assert_eq!(zero_runs(5, &[0; 10], 4096, 1), vec![Segment::Data(0, 10)]);
        // Segments always cover the buffer exactly, in order.
        for base in [0u64, 1, 511, 4095, 4096, 12345] {
            let mut b = vec![0u8; 70000];
            b[33333] = 1;
            let s = zero_runs(base, &b, 4096, 8192);
            let mut at = 0;
            for seg in s {
                let (Segment::Data(x, y) | Segment::Zero(x, y)) = seg;
                assert_eq!(x, at);
                assert!(y > x);
                if let Segment::Zero(x, y) = seg {
                    assert!(b[x..y].iter().all(|v| *v == 0));
                    assert_eq!((base + x as u64) % 4096, 0);
                }
                at = y;
            }
            assert_eq!(at, b.len());
        }
    }

    #[test]
    fn is_zero_finds_any_nonzero_byte() {
        let mut b = vec![0u8; 1000];
        assert!(is_zero(&b));
        for i in [0, 63, 64, 999] {
            b[i] = 1;
            assert!(!is_zero(&b), "{i}");
            b[i] = 0;
        }
    }
}
