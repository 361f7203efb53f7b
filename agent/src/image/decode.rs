//! The decoders: downloaded bytes in, disk writes out through the [`Sink`]. Raw images at
//! their own offsets ([`RawOut`]), gzip/zstd/xz streamed through their decoders
//! ([`Decompress`]), and qcow2 streamed in file order ([`Qcow2Stream`]).

use std::io::Write;

use sha2::Digest;

use super::ImageError;
use super::buf::{AlignedBuf, BufPool};
use super::qcow2::{self, Map};
use super::sink::Sink;

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
