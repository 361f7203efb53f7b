//! Streaming an image from HTTP(S) onto the chosen disk, verified, in one pass.
//!
//! - [`source`]: HTTP(S) reads: ranges, checksum files, the resumable stream.
//! - [`stall`]: when a download counts as stalled (bytes per window), for the source's
//!   deadlines and the progress reports.
//! - [`checksum`]: algorithms, the hasher, checksum-file parsing.
//! - [`qcow2`]: the qcow2 header and tables as pure functions, and the cluster map.
//! - [`stages`]: the hash thread and the writer thread, and how they are wired.
//! - [`decode`]: the decoders (raw, gzip/zstd/xz, qcow2) the writer feeds.
//! - [`sink`]: where decoded bytes go: zero runs, the held-back head, batched direct writes.
//! - [`buf`]: aligned download buffers and their pool. [`inflight`]: the two I/O threads.
//!
//! The order of a write: the checksum (or checksum file), the first 64 KiB by a Range
//! request (format by magic, cross-checked with the declared one; for qcow2 also the L1 and
//! L2 tables), then the file once from its first byte to its last: hashed as downloaded,
//! decoded, written. The first MiB of the disk is written only after the digest matched. On
//! any failure once a disk was chosen (404, wrong format, checksum, truncation, disk error,
//! cancellation, a download that stalled through its retries) the first and last MiB of the
//! disk are zeroed, so it cannot boot a partial image, and the error names the URL, the byte
//! offset of the download and the device.

pub mod buf;
pub mod checksum;
pub mod decode;
pub mod inflight;
mod plain;
pub mod qcow2;
pub mod sink;
pub mod source;
pub mod stages;
pub mod stall;

use std::time::{Duration, Instant};

use sha2::Digest;
use tokio::sync::mpsc;

pub use checksum::{Algo, Expected, MD5_WARNING};
pub use source::FetchOptions;
pub use stages::ProgressFn;
pub use stall::StallOptions;

use crate::disk::{self, DiskError, DiskWriter};
use decode::{Compressor, Decode, Decompress, Qcow2Stream, RawOut};
use sink::Sink;

/// Bytes held back and written last.
pub const HEAD_BYTES: u64 = 1 << 20;
/// Download buffers queued between download and hashing, and again between hashing and
/// writing. With [`FetchOptions`]' 4 MiB buffers, the writer's batches (see
/// [`stages::WRITE_BATCH`]) and two of them in flight this keeps the agent's peak RSS
/// under 56 MiB.
const DEPTH: usize = 2;
/// Largest checksum file read.
const CHECKSUM_FILE_LIMIT: usize = 1 << 20;

/// The declared format of the image (metal3's `image.format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Raw, possibly compressed with gzip, zstd or xz.
    Raw,
    Qcow2,
    LiveIso,
    /// Whatever the magic says (the standalone `write-image` without `--format`).
    Detect,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::LiveIso => "live-iso",
            Format::Detect => "any",
        }
    }
}

/// What the first bytes say the file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Raw,
    Compressed(Compressor),
    Qcow2,
}

/// Recognises a file by its magic.
pub fn detect(head: &[u8]) -> Detected {
    let starts = |m: &[u8]| head.starts_with(m);
    if qcow2::is_qcow2(head) {
        Detected::Qcow2
    } else if starts(&[0x1f, 0x8b]) {
        Detected::Compressed(Compressor::Gzip)
    } else if starts(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Detected::Compressed(Compressor::Zstd)
    } else if starts(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Detected::Compressed(Compressor::Xz)
    } else {
        Detected::Raw
    }
}

/// Checks the detected format against the declared one; the error names both.
pub fn cross_check(url: &str, declared: Format, found: Detected) -> Result<(), ImageError> {
    let wrong = |found: String, hint: &'static str| {
        Err(ImageError::WrongFormat {
            url: url.to_string(),
            found,
            declared: declared.name().to_string(),
            hint,
        })
    };
    match (declared, found) {
        (Format::Detect, _)
        | (Format::Raw, Detected::Raw | Detected::Compressed(_))
        | (Format::Qcow2, Detected::Qcow2) => Ok(()),
        (Format::Raw, Detected::Qcow2) => wrong(
            "a qcow2 image".into(),
            "set the image format to qcow2, or convert it with qemu-img convert -O raw",
        ),
        (Format::Qcow2, Detected::Raw) => wrong(
            "not a qcow2 image (no QFI\\xfb magic: a raw image?)".into(),
            "set the image format to raw, or point the URL at the qcow2 file",
        ),
        (Format::Qcow2, Detected::Compressed(c)) => wrong(
            format!("a {}-compressed file", c.name()),
            "serve the qcow2 file itself (qcow2 compresses its clusters internally), or a \
             compressed raw image with format raw",
        ),
        (Format::LiveIso, _) => Err(live_iso_refused()),
    }
}

fn live_iso_refused() -> ImageError {
    ImageError::Invalid(
        "live-iso images are not written by this agent version (booting an ISO needs \
         virtual media, a later feature); use a raw or qcow2 disk image"
            .into(),
    )
}

/// What to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    pub url: String,
    pub expected: Expected,
    pub format: Format,
}

impl ImageSpec {
    /// Builds a spec. `checksum` is a hex digest (checked against `algo`; `None`: by
    /// length) or the http(s) URL of a checksum file.
    pub fn new(
        url: &str,
        checksum: &str,
        algo: Option<Algo>,
        format: Format,
    ) -> Result<ImageSpec, ImageError> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ImageError::Invalid(format!(
                "{url:?} is not an http(s) URL"
            )));
        }
        let c = checksum.trim();
        let expected = if c.starts_with("http://") || c.starts_with("https://") {
            Expected::Url {
                url: c.to_string(),
                algo,
            }
        } else {
            let (algo, hex) = checksum::check_digest(c, algo).map_err(ImageError::Invalid)?;
            Expected::Digest { algo, hex }
        };
        Ok(ImageSpec {
            url: url.to_string(),
            expected,
            format,
        })
    }
}

/// How to write, besides what.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub fetch: FetchOptions,
    /// The disk is known to read as zeros (freshly created, or just discarded with a zeroing
    /// guarantee): zero runs are skipped instead of zeroed.
    pub target_zeroed: bool,
}

/// A progress report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// "read-tables", "write", "verify", "sync"; "stalled" while the download is stalled.
    pub phase: &'static str,
    /// Bytes written (for "stalled": received, which is up to a few buffers ahead).
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_per_second: u64,
    /// Seconds the download has gone without progress, when the phase is "stalled"; else 0.
    pub stalled_seconds: u64,
}

/// The phase of a report while the download is stalled.
pub const STALLED: &str = "stalled";

impl std::fmt::Display for Progress {
    /// `write: 5 of 9 bytes (1.0 MiB/s)`, `stalled: no progress for 12 s at 5 of 9 bytes`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.phase == STALLED {
            write!(
                f,
                "stalled: no progress for {} s at {} of {} bytes",
                self.stalled_seconds, self.bytes_done, self.bytes_total
            )
        } else {
            write!(
                f,
                "{}: {} of {} bytes ({}/s)",
                self.phase,
                self.bytes_done,
                self.bytes_total,
                disk::human(self.bytes_per_second)
            )
        }
    }
}

/// A finished write.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    pub device: String,
    /// Bytes downloaded (and hashed).
    pub bytes: u64,
    pub digest: String,
    pub algo: Algo,
    pub seconds: f64,
    /// What the file was, e.g. "qcow2 v3, 64 KiB clusters".
    pub format: String,
    /// Bytes of the disk the image covers.
    pub image_size: u64,
    /// Of those, bytes zeroed (or skipped) rather than written.
    pub zeroed: u64,
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot download {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("the download of {url} failed at byte {offset}: {reason}")]
    Stream {
        url: String,
        offset: u64,
        reason: String,
    },
    #[error("the download of {url} stalled: {}", stall_text(.got, .total, .timeout, .min_bytes, .resumes))]
    Stalled {
        url: String,
        /// Bytes received when the retries ran out.
        got: u64,
        total: Option<u64>,
        timeout: Duration,
        min_bytes: u64,
        /// Requests after the first of the read that stalled.
        resumes: u32,
    },
    #[error("{url} ended after {got} bytes, but announced {expected}")]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
    },
    #[error("cannot decode {url} at byte {offset}: {reason}")]
    Decode {
        url: String,
        offset: u64,
        reason: String,
    },
    #[error("{url}")]
    Qcow2 {
        url: String,
        #[source]
        source: qcow2::Qcow2Error,
    },
    #[error("the image {url} ({size} bytes) does not fit on {device} ({device_size} bytes)")]
    TooLarge {
        url: String,
        size: u64,
        device: String,
        device_size: u64,
    },
    #[error(
        "checksum mismatch for {url}: expected {algo} {expected}, got {actual}; the image is not the one the checksum describes (or the checksum is wrong)"
    )]
    Mismatch {
        url: String,
        algo: Algo,
        expected: String,
        actual: String,
    },
    #[error("{url} is {found}, but the host's image format is {declared}; {hint}")]
    WrongFormat {
        url: String,
        found: String,
        declared: String,
        hint: &'static str,
    },
    #[error("the write was cancelled after {offset} bytes")]
    Aborted { offset: u64 },
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Any of the above, once a disk was chosen: where it happened and what was done about it.
    #[error("writing {url} to {device} failed at byte {offset} of the download; {cleanup}")]
    Failed {
        url: String,
        device: String,
        offset: u64,
        cleanup: String,
        #[source]
        source: Box<ImageError>,
    },
}

impl ImageError {
    /// What kind of failure: "checksum", "download", "disk" or "invalid".
    pub fn kind(&self) -> &'static str {
        match self {
            ImageError::Mismatch { .. } => "checksum",
            ImageError::Request { .. }
            | ImageError::Stream { .. }
            | ImageError::Stalled { .. }
            | ImageError::Truncated { .. }
            | ImageError::Aborted { .. } => "download",
            ImageError::Status { status, .. } if *status >= 500 => "download",
            ImageError::Disk(_) => "disk",
            ImageError::Failed { source, .. } => source.kind(),
            _ => "invalid",
        }
    }

    /// The byte of the download a download error names.
    fn download_offset(&self) -> Option<u64> {
        match self {
            ImageError::Stream { offset, .. } => Some(*offset),
            ImageError::Stalled { got, .. } => Some(*got),
            _ => None,
        }
    }

    /// The error under the [`ImageError::Failed`] wrapper.
    pub fn cause(&self) -> &ImageError {
        match self {
            ImageError::Failed { source, .. } => source,
            e => e,
        }
    }
}

/// `no progress (less than 64.0 KiB) for 60 s after 1234 of 5678 bytes (resumed 3 times)`.
/// (Takes the references the error's `Display` has.)
fn stall_text(
    got: &u64,
    total: &Option<u64>,
    timeout: &Duration,
    min: &u64,
    resumes: &u32,
) -> String {
    let of = total.map(|t| format!(" of {t}")).unwrap_or_default();
    format!(
        "no progress (less than {}) for {} after {got}{of} bytes (resumed {resumes} time{})",
        disk::human(*min),
        stall::secs(*timeout),
        if *resumes == 1 { "" } else { "s" }
    )
}

/// The expected digest: given, or read from the checksum file.
pub async fn expected_digest(
    client: &reqwest::Client,
    spec: &ImageSpec,
    opts: &WriteOptions,
) -> Result<(Algo, String), ImageError> {
    match &spec.expected {
        Expected::Digest { algo, hex } => Ok((*algo, hex.clone())),
        Expected::Url { url, algo } => {
            let text = source::fetch_text(client, url, CHECKSUM_FILE_LIMIT, &opts.fetch).await?;
            let name = checksum::file_name_of(&spec.url);
            checksum::pick_from_checksum_file(&text, &name, *algo)
                .map_err(|reason| ImageError::Invalid(format!("checksum file {url}: {reason}")))
        }
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

/// Reads the qcow2 tables by Range requests and builds the stream decoder.
async fn qcow2_decoder(
    src: &mut source::Source,
    head: &[u8],
    sink: Sink,
    progress: &ProgressFn,
) -> Result<(Qcow2Stream, String, u64), (ImageError, Sink)> {
    let url = src.url.clone();
    let q = |e| ImageError::Qcow2 {
        url: url.clone(),
        source: e,
    };
    let header = match qcow2::Header::parse(head) {
        Ok(h) => h,
        Err(e) => return Err((q(e), sink)),
    };
    let device_size = sink.writer.size();
    if header.size > device_size {
        return Err((
            ImageError::TooLarge {
                url: url.clone(),
                size: header.size,
                device: sink.device.clone(),
                device_size,
            },
            sink,
        ));
    }
    let Some(total) = src.total else {
        return Err((
            ImageError::Invalid(format!(
                "{url} did not say its length, which streaming a qcow2 image needs"
            )),
            sink,
        ));
    };
    progress(Progress {
        phase: "read-tables",
        bytes_done: 0,
        bytes_total: total,
        ..Default::default()
    });
    let mut tables = vec![(0u64, head.len() as u64, sha256(head))];
    let (l1_off, l1_len) = header.l1_range();
    let l1 = match src.read_range(l1_off, l1_len).await {
        Ok(b) => b,
        Err(e) => return Err((e, sink)),
    };
    let l2_refs = match qcow2::parse_l1(&header, &l1) {
        Ok(r) => r,
        Err(e) => return Err((q(e), sink)),
    };
    if l1_len > 0 {
        tables.push((l1_off, l1_len, sha256(&l1)));
    }
    let mut builder = qcow2::MapBuilder::new(&header);
    // L2 tables in file order, neighbours fetched together (gaps up to 1 MiB, groups up to
    // 16 MiB), so a large image with small clusters does not take a request per table.
    let cs = header.cluster_size();
    let mut by_off = l2_refs.clone();
    by_off.sort_by_key(|r| r.1);
    let mut i = 0;
    while i < by_off.len() {
        let start = by_off[i].1;
        let mut j = i + 1;
        while j < by_off.len()
            && by_off[j].1 >= by_off[j - 1].1
            && by_off[j].1 - (by_off[j - 1].1 + cs) <= (1 << 20)
            && by_off[j].1 + cs - start <= (16 << 20)
        {
            j += 1;
        }
        let end = by_off[j - 1].1 + cs;
        if end > total {
            return Err((
                q(qcow2::Qcow2Error::Invalid(format!(
                    "L2 table at {:#x} lies beyond the end of the file ({total} bytes)",
                    by_off[j - 1].1
                ))),
                sink,
            ));
        }
        let group = match src.read_range(start, end - start).await {
            Ok(b) => b,
            Err(e) => return Err((e, sink)),
        };
        for &(l1_index, off) in &by_off[i..j] {
            let a = (off - start) as usize;
            let Some(table) = group.get(a..a + cs as usize) else {
                return Err((
                    ImageError::Truncated {
                        url: url.clone(),
                        got: start + group.len() as u64,
                        expected: off + cs,
                    },
                    sink,
                ));
            };
            if let Err(e) = builder.add_l2(l1_index, table) {
                return Err((q(e), sink));
            }
            tables.push((off, cs, sha256(table)));
        }
        i = j;
    }
    let map = match builder.finish(total) {
        Ok(m) => m,
        Err(e) => return Err((q(e), sink)),
    };
    let desc = format!(
        "qcow2 v{}, {} clusters{}{}",
        header.version,
        disk::human(cs),
        if header.extended_l2 {
            ", extended L2"
        } else {
            ""
        },
        if map
            .extents
            .iter()
            .any(|e| matches!(e, qcow2::Extent::Compressed { .. }))
        {
            format!(", {}-compressed clusters", header.compression)
        } else {
            String::new()
        }
    );
    let size = map.size;
    Ok((Qcow2Stream::new(sink, map, &url, total, tables), desc, size))
}

/// Streams `spec` onto `writer` (the disk chosen by the selection).
pub async fn write_image(
    client: &reqwest::Client,
    spec: &ImageSpec,
    writer: Box<dyn DiskWriter>,
    opts: &WriteOptions,
    progress: ProgressFn,
) -> Result<Written, ImageError> {
    let device = writer.path().display().to_string();
    let mut slot = Some(writer);
    let mut offset = 0u64;
    let result = run(client, spec, &mut slot, opts, progress, &mut offset).await;
    match result {
        Ok(w) => Ok(w),
        Err(e) => {
            // A read before the stream (the head, the tables) names its own offset.
            if offset == 0 {
                offset = e.download_offset().unwrap_or(0);
            }
            // Errors before the writer thread started: nothing written yet, but the disk was
            // chosen for this image, and an old system on it must not boot either.
            let cleanup = match slot.as_mut() {
                Some(w) => match disk::zero_ends(&mut **w) {
                    Ok(()) => None,
                    Err(we) => Some(we.to_string()),
                },
                None => None, // the writer thread wiped it
            };
            let cleanup = match cleanup {
                None => format!(
                    "the first and last MiB of {device} were zeroed, so it cannot boot a \
                     partial image"
                ),
                Some(we) => format!("WIPING {device} ALSO FAILED ({we}): do not boot it"),
            };
            Err(ImageError::Failed {
                url: spec.url.clone(),
                device,
                offset,
                cleanup,
                source: Box::new(e),
            })
        }
    }
}

async fn run(
    client: &reqwest::Client,
    spec: &ImageSpec,
    slot: &mut Option<Box<dyn DiskWriter>>,
    opts: &WriteOptions,
    progress: ProgressFn,
    offset: &mut u64,
) -> Result<Written, ImageError> {
    let start = Instant::now();
    if spec.format == Format::LiveIso {
        return Err(live_iso_refused());
    }
    let url = spec.url.clone();
    let (algo, expected) = expected_digest(client, spec, opts).await?;
    let mut warnings = Vec::new();
    if algo == Algo::Md5 {
        tracing::warn!("{url}: {MD5_WARNING}");
        warnings.push(MD5_WARNING.to_string());
    }

    let mut src = source::Source::new(client.clone(), &url, opts.fetch.clone());
    let head = src.read_range(0, qcow2::HEADER_FETCH).await?;
    let found = detect(&head);
    cross_check(&url, spec.format, found)?;
    let Some(writer) = slot.take() else {
        return Err(ImageError::Invalid("internal error: no disk writer".into()));
    };
    let device = writer.path().display().to_string();
    let device_size = writer.size();
    let sink = Sink::new(writer, &url, opts.target_zeroed);
    let (dec, desc, image_size): (Box<dyn Decode>, String, u64) = match found {
        Detected::Raw => {
            let total = src.total.unwrap_or(0);
            if total > device_size {
                *slot = Some(sink.writer);
                return Err(ImageError::TooLarge {
                    url,
                    size: total,
                    device,
                    device_size,
                });
            }
            (Box::new(RawOut::new(sink, None)), "raw".into(), total)
        }
        Detected::Compressed(c) => {
            match Decompress::new(c, RawOut::new(sink, Some(c.name())), &url) {
                Ok(d) => (Box::new(d), format!("{}-compressed raw", c.name()), 0),
                Err(e) => return Err(e), // the writer is inside the decoder; nothing was written
            }
        }
        Detected::Qcow2 => match qcow2_decoder(&mut src, &head, sink, &progress).await {
            Ok((d, desc, size)) => (Box::new(d), desc, size),
            Err((e, sink)) => {
                *slot = Some(sink.writer);
                return Err(e);
            }
        },
    };
    drop(head);

    let total = src.total;
    let (tx, rx) = mpsc::channel(DEPTH);
    let (stx, srx) = std::sync::mpsc::sync_channel(DEPTH);
    let pool = buf::BufPool::default();
    let hasher = tokio::task::spawn_blocking(move || stages::hash_stage(rx, stx, algo));
    let job = stages::WriterJob {
        url: url.clone(),
        expected: expected.clone(),
        algo,
        total,
        progress,
        pool: pool.clone(),
        gauge: src.gauge(),
    };
    let writer_task = tokio::task::spawn_blocking(move || stages::writer_stage(srx, dec, job));
    let downloaded = src.stream(tx, &pool).await;
    let _ = hasher.await;
    let outcome = writer_task
        .await
        .map_err(|e| ImageError::Invalid(format!("the writer thread failed: {e}")))?;
    match (downloaded, outcome) {
        (_, Ok(f)) => {
            let compressed = matches!(found, Detected::Compressed(_));
            Ok(Written {
                device,
                bytes: f.bytes,
                digest: f.digest,
                algo,
                seconds: start.elapsed().as_secs_f64(),
                format: desc,
                image_size: if compressed { f.written } else { image_size },
                zeroed: f.zeroed,
                warnings,
            })
        }
        (Err(e), Err((ImageError::Aborted { .. }, off))) => {
            *offset = e.download_offset().unwrap_or(off);
            Err(e)
        }
        (_, Err((e, off))) => {
            *offset = off;
            Err(e)
        }
    }
}

/// An HTTP client for images: public roots plus the given CAs, redirects followed, bounded
/// connect and read timeouts.
pub fn client(extra_ca_der: &[Vec<u8>]) -> Result<reqwest::Client, String> {
    client_with(extra_ca_der, Duration::from_secs(60))
}

/// [`client`] with a chosen read timeout (how long a stalled connection is waited for before
/// it counts as dropped and is resumed).
pub fn client_with(
    extra_ca_der: &[Vec<u8>],
    read_timeout: Duration,
) -> Result<reqwest::Client, String> {
    let tls = crate::tls::download_config(extra_ca_der).map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(read_timeout)
        .redirect(reqwest::redirect::Policy::limited(10))
        .user_agent(concat!("slipway-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
