//! Streaming an image from HTTP(S) onto the chosen disk, verified.
//!
//! One pass: the download (async) feeds a bounded channel; a writer thread hashes each buffer
//! and writes it at its offset. The first MiB is held in memory and written only after the
//! checksum matched, so nothing looks bootable before the whole image is verified. On any
//! failure (download error, truncation, checksum mismatch, disk error) the first and last MiB
//! of the disk are zeroed, so neither a partial image nor an old partition table remains, and
//! the error names the URL, the byte offset and the device.

use std::fmt;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sha2::Digest;
use tokio::sync::mpsc;

use crate::disk::{self, DiskError, DiskWriter};

/// Bytes held back and written last.
pub const HEAD_BYTES: u64 = 1 << 20;
/// Size of the buffers passed from the download to the writer.
const CHUNK: usize = 4 << 20;
/// Buffers in flight between download and writer.
const DEPTH: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    Md5,
    Sha256,
    Sha512,
}

impl Algo {
    /// The algorithm a hex digest's length implies.
    pub fn from_hex_len(len: usize) -> Option<Algo> {
        match len {
            32 => Some(Algo::Md5),
            64 => Some(Algo::Sha256),
            128 => Some(Algo::Sha512),
            _ => None,
        }
    }

    pub fn hex_len(self) -> usize {
        match self {
            Algo::Md5 => 32,
            Algo::Sha256 => 64,
            Algo::Sha512 => 128,
        }
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algo::Md5 => "md5",
            Algo::Sha256 => "sha256",
            Algo::Sha512 => "sha512",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    LiveIso,
}

/// What to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    pub url: String,
    /// Expected digest, lower-case hex.
    pub checksum: String,
    pub algo: Algo,
    pub format: Format,
}

impl ImageSpec {
    /// Builds a spec, checking the digest against the algorithm (`None`: by length).
    pub fn new(
        url: &str,
        checksum: &str,
        algo: Option<Algo>,
        format: Format,
    ) -> Result<ImageSpec, ImageError> {
        let checksum = checksum.trim().to_ascii_lowercase();
        if checksum.is_empty() {
            return Err(ImageError::Invalid(
                "a checksum is required: give the image's digest (e.g. sha256sum IMAGE)".into(),
            ));
        }
        if !checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ImageError::Invalid(format!(
                "checksum {checksum:?} is not a hex digest"
            )));
        }
        let algo = match algo {
            Some(a) if a.hex_len() == checksum.len() => a,
            Some(a) => {
                return Err(ImageError::Invalid(format!(
                    "checksum type is {a} but the digest has {} hex digits, not {}",
                    checksum.len(),
                    a.hex_len()
                )));
            }
            None => Algo::from_hex_len(checksum.len()).ok_or_else(|| {
                ImageError::Invalid(format!("a digest of {} hex digits matches no algorithm (md5 32, sha256 64, sha512 128)", checksum.len()))
            })?,
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ImageError::Invalid(format!(
                "{url:?} is not an http(s) URL"
            )));
        }
        Ok(ImageSpec {
            url: url.to_string(),
            checksum,
            algo,
            format,
        })
    }
}

/// A progress report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub phase: &'static str,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_per_second: u64,
}

/// A finished write.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    pub device: String,
    pub bytes: u64,
    pub digest: String,
    pub algo: Algo,
    pub seconds: f64,
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
    #[error("{url} ended after {got} bytes, but announced {expected}")]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
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
        found: &'static str,
        declared: &'static str,
        hint: &'static str,
    },
    #[error(transparent)]
    Disk(#[from] DiskError),
}

impl ImageError {
    /// Whether trying again later may help (network trouble) rather than needing a fix.
    pub fn kind(&self) -> &'static str {
        match self {
            ImageError::Mismatch { .. } => "checksum",
            ImageError::Request { .. }
            | ImageError::Stream { .. }
            | ImageError::Truncated { .. } => "download",
            ImageError::Status { status, .. } if *status >= 500 => "download",
            ImageError::Disk(_) => "disk",
            _ => "invalid",
        }
    }
}

enum Hasher {
    Md5(md5::Md5),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(algo: Algo) -> Hasher {
        match algo {
            Algo::Md5 => Hasher::Md5(md5::Md5::new()),
            Algo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn hex(self) -> String {
        match self {
            Hasher::Md5(h) => hex::encode(h.finalize()),
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

/// Recognises formats the raw writer must not write as they are.
fn sniff(head: &[u8]) -> Option<(&'static str, &'static str)> {
    let starts = |m: &[u8]| head.starts_with(m);
    if starts(b"QFI\xfb") {
        Some((
            "a qcow2 image",
            "set format: qcow2 (not supported by this agent yet), or convert it with qemu-img convert -O raw",
        ))
    } else if starts(&[0x1f, 0x8b])
        || starts(&[0x28, 0xb5, 0x2f, 0xfd])
        || starts(&[0xfd, b'7', b'z', b'X', b'Z', 0])
    {
        Some((
            "a compressed file (gzip, zstd or xz)",
            "decompressed images are needed by this agent version: serve the uncompressed raw image",
        ))
    } else {
        None
    }
}

type ProgressFn = Box<dyn Fn(Progress) + Send>;

/// What the writer thread hands back: the writer (to finish or wipe it), and how far it got.
struct SinkResult {
    writer: Box<dyn DiskWriter>,
    outcome: Result<Sunk, ImageError>,
}

struct Sunk {
    head: Vec<u8>,
    bytes: u64,
    digest: String,
}

fn sink(
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut writer: Box<dyn DiskWriter>,
    spec: ImageSpec,
    total: u64,
    progress: ProgressFn,
) -> SinkResult {
    let mut hasher = Hasher::new(spec.algo);
    let mut head: Vec<u8> = Vec::with_capacity(HEAD_BYTES as usize);
    let mut offset = 0u64;
    let start = Instant::now();
    let mut last_report = Instant::now();
    let mut last_bytes = 0u64;
    let size = writer.size();
    let outcome = (|| {
        while let Some(buf) = rx.blocking_recv() {
            if offset == 0
                && head.is_empty()
                && let Some((found, hint)) = sniff(&buf)
                && spec.format == Format::Raw
            {
                return Err(ImageError::WrongFormat {
                    url: spec.url.clone(),
                    found,
                    declared: "raw",
                    hint,
                });
            }
            let end = offset + buf.len() as u64;
            if end > size {
                return Err(ImageError::TooLarge {
                    url: spec.url.clone(),
                    size: end.max(total),
                    device: writer.path().display().to_string(),
                    device_size: size,
                });
            }
            hasher.update(&buf);
            let mut data = &buf[..];
            if offset < HEAD_BYTES {
                let take = ((HEAD_BYTES - offset) as usize).min(data.len());
                head.extend_from_slice(&data[..take]);
                data = &data[take..];
            }
            if !data.is_empty() {
                writer.write_all_at(end - data.len() as u64, data)?;
            }
            offset = end;
            if last_report.elapsed() >= Duration::from_secs(1) {
                let secs = last_report.elapsed().as_secs_f64();
                progress(Progress {
                    phase: "write",
                    bytes_done: offset,
                    bytes_total: total,
                    bytes_per_second: ((offset - last_bytes) as f64 / secs) as u64,
                });
                last_report = Instant::now();
                last_bytes = offset;
            }
        }
        let secs = start.elapsed().as_secs_f64().max(1e-3);
        progress(Progress {
            phase: "verify",
            bytes_done: offset,
            bytes_total: total,
            bytes_per_second: (offset as f64 / secs) as u64,
        });
        Ok(Sunk {
            head: std::mem::take(&mut head),
            bytes: offset,
            digest: std::mem::replace(&mut hasher, Hasher::new(spec.algo)).hex(),
        })
    })();
    // Drain so the producer is never stuck on a full channel after an error.
    rx.close();
    SinkResult { writer, outcome }
}

/// Streams `spec` onto `writer` (the disk chosen by the selection).
pub async fn write_image(
    client: &reqwest::Client,
    spec: &ImageSpec,
    writer: Box<dyn DiskWriter>,
    progress: ProgressFn,
) -> Result<Written, ImageError> {
    if spec.format != Format::Raw {
        return Err(ImageError::Invalid(format!(
            "{} images are not written by this agent version yet; convert the image to raw",
            if spec.format == Format::Qcow2 {
                "qcow2"
            } else {
                "live-iso"
            }
        )));
    }
    let start = Instant::now();
    let device = writer.path().display().to_string();
    let device_size = writer.size();
    let url = spec.url.clone();

    let response = match client.get(&url).send().await {
        Ok(r) => r,
        Err(e) => {
            return Err(ImageError::Request {
                url,
                reason: error_text(&e),
            });
        }
    };
    if !response.status().is_success() {
        return Err(ImageError::Status {
            url,
            status: response.status().as_u16(),
        });
    }
    let total = response.content_length().unwrap_or(0);
    if total > device_size {
        return Err(ImageError::TooLarge {
            url,
            size: total,
            device,
            device_size,
        });
    }

    let (tx, rx) = mpsc::channel::<Vec<u8>>(DEPTH);
    let sink_spec = spec.clone();
    let sink_task =
        tokio::task::spawn_blocking(move || sink(rx, writer, sink_spec, total, progress));

    // Download, in CHUNK-sized buffers.
    let mut stream = response.bytes_stream();
    let mut buf = Vec::with_capacity(CHUNK);
    let mut received = 0u64;
    let mut download_error = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(bytes) => {
                received += bytes.len() as u64;
                buf.extend_from_slice(&bytes);
                if buf.len() >= CHUNK
                    && tx
                        .send(std::mem::replace(&mut buf, Vec::with_capacity(CHUNK)))
                        .await
                        .is_err()
                {
                    break; // the writer stopped; its error explains why
                }
            }
            Err(e) => {
                download_error = Some(ImageError::Stream {
                    url: url.clone(),
                    offset: received,
                    reason: error_text(&e),
                });
                break;
            }
        }
    }
    if download_error.is_none() && !buf.is_empty() {
        let _ = tx.send(buf).await;
    }
    drop(tx);

    let SinkResult {
        mut writer,
        outcome,
    } = sink_task
        .await
        .map_err(|e| ImageError::Invalid(format!("the writer thread failed: {e}")))?;
    let result = match (download_error, outcome) {
        (_, Err(e)) => Err(e),
        (Some(e), Ok(_)) => Err(e),
        (None, Ok(sunk)) => finish(&mut *writer, spec, sunk, total, &device, start),
    };
    if result.is_err() {
        // Never leave half an image, or an old partition table over a new image, behind.
        if let Err(e) = disk::zero_ends(&mut *writer) {
            tracing::error!("could not wipe {device} after the failed write: {e}");
        }
    }
    result
}

fn finish(
    writer: &mut dyn DiskWriter,
    spec: &ImageSpec,
    sunk: Sunk,
    total: u64,
    device: &str,
    start: Instant,
) -> Result<Written, ImageError> {
    if total > 0 && sunk.bytes != total {
        return Err(ImageError::Truncated {
            url: spec.url.clone(),
            got: sunk.bytes,
            expected: total,
        });
    }
    if sunk.digest != spec.checksum {
        return Err(ImageError::Mismatch {
            url: spec.url.clone(),
            algo: spec.algo,
            expected: spec.checksum.clone(),
            actual: sunk.digest,
        });
    }
    // Everything but the head is written; flush it before the head makes the disk bootable.
    writer.sync()?;
    writer.write_all_at(0, &sunk.head)?;
    writer.sync()?;
    Ok(Written {
        device: device.to_string(),
        bytes: sunk.bytes,
        digest: sunk.digest,
        algo: spec.algo,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// reqwest's error with its causes.
fn error_text(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// An HTTP client for images: public roots plus the given CAs, redirects followed, bounded
/// connect and read timeouts.
pub fn client(extra_ca_der: &[Vec<u8>]) -> Result<reqwest::Client, String> {
    let tls = crate::tls::download_config(extra_ca_der).map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .redirect(reqwest::redirect::Policy::limited(10))
        .user_agent(concat!("slipway-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_checks_digest_length_and_url() {
        let ok = ImageSpec::new("http://h/i", &"AB".repeat(32), None, Format::Raw).unwrap();
        assert_eq!(ok.algo, Algo::Sha256);
        assert_eq!(ok.checksum, "ab".repeat(32));
        assert!(
            ImageSpec::new("http://h/i", "", None, Format::Raw)
                .unwrap_err()
                .to_string()
                .contains("checksum is required")
        );
        assert!(
            ImageSpec::new(
                "http://h/i",
                &"a".repeat(64),
                Some(Algo::Sha512),
                Format::Raw
            )
            .unwrap_err()
            .to_string()
            .contains("not 128")
        );
        assert!(ImageSpec::new("ftp://h/i", &"a".repeat(64), None, Format::Raw).is_err());
    }

    #[test]
    fn sniffs_formats_that_must_not_be_written_raw() {
        assert!(sniff(b"QFI\xfb\0\0\0\x03").is_some());
        assert!(sniff(&[0x1f, 0x8b, 8, 0]).is_some());
        assert!(sniff(&[0; 16]).is_none());
    }
}
