//! The writing half of the pipeline: a hashing thread, then a writer thread that decodes
//! (raw, gzip/zstd/xz, qcow2: [`super::decode`]) and writes through a
//! [`Sink`](super::sink::Sink).
//!
//! ```text
//! download task ──Chunk──► hash thread ──Msg──► writer thread: decode ─► Sink ─► DiskWriter
//!  (source.rs)    tokio     (digest of the     std sync      (decode.rs) (sink.rs)
//!                 mpsc       bytes as sent)    channel                   zero runs,
//!                                                                        head held back
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

use std::sync::Arc;
use std::sync::mpsc as smpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::buf::{AlignedBuf, BufPool};
use super::checksum::{Algo, Hasher};
use super::decode::Decode;
use super::source::Chunk;
use super::stall::Gauge;
use super::{ImageError, Progress, STALLED};
use crate::disk;

/// Download buffers already queued when the writer is free are written together, up to this
/// many bytes in one vectored write: when the disk is the slow stage, the queue is full and
/// each write is this large; when it is not, nothing waits to fill a batch. Two such writes
/// are in flight ([`inflight`]); one 4 MiB download buffer per write keeps the agent's memory
/// where it was with one 8 MiB write at a time, and two 4 MiB writes in flight beat one of
/// 8 MiB on the bench's loop device.
pub const WRITE_BATCH: usize = 4 << 20;

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
    /// The download's stall window: a "write" report made while it is stalled says
    /// "stalled" instead, with the time without progress.
    pub gauge: Arc<Gauge>,
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
        let stalled = match phase {
            "write" => job.gauge.stalled_for(Instant::now()),
            _ => None,
        };
        (job.progress)(match stalled {
            // Where the download stands, not the writer: up to a few buffers ahead.
            Some(quiet) => Progress {
                phase: STALLED,
                bytes_done: job.gauge.received().max(done),
                bytes_total: total,
                bytes_per_second: 0,
                stalled_seconds: quiet.as_secs(),
            },
            None => Progress {
                phase,
                bytes_done: done,
                bytes_total: total,
                bytes_per_second: rate,
                stalled_seconds: 0,
            },
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
