//! Where decoded bytes go: the [`Sink`] writes by disk offset, holds the first
//! [`HEAD_BYTES`] back until the digest matched, gathers small pieces in its own aligned
//! buffer, writes aligned download buffers from where they are (batches go to the I/O threads
//! of [`super::inflight`]), and turns zero runs ([`zero_runs`], pure) into `write_zeroes`.

use super::buf::{AlignedBuf, BLOCK, BufPool};
use super::inflight::{self, InFlight, Run};
use super::{HEAD_BYTES, ImageError};
use crate::disk::DiskWriter;

/// Zero runs shorter than this are written as data (an ioctl per 4 KiB would cost more).
pub const MIN_ZERO_RUN: u64 = 64 << 10;
/// The writer's aligned buffer.
const WRITE_BUF: usize = 4 << 20;
/// Aligned input at least this long is written from where it is, not copied first. Smaller
/// pieces (qcow2 clusters) are gathered in the buffer so each write stays large.
const MIN_DIRECT: usize = 1 << 20;

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
    pub(super) url: String,
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
            if !self.buf.is_empty() && self.buf_off + self.buf.len() as u64 != off {
                self.flush_buf()?;
            }
            if self.buf.is_empty() {
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
            let direct = self.buf.is_empty()
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
        if self.buf.is_empty() {
            return Ok(());
        }
        // Taken out for the call (a Vec move, no copy), so `put_blocks` can borrow self.
        let buf = std::mem::replace(&mut self.buf, AlignedBuf::empty());
        let r = self.put_blocks(self.buf_off, buf.as_slice());
        self.buf = buf;
        self.buf.clear();
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
