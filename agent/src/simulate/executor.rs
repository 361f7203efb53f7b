//! A simulated machine: an [`Execute`] that answers the coordinator's real commands with the
//! generated hardware, a short wait for cleaning, and a real download for images, hashed into
//! a [`NullDisk`] and verified. No threads and no disk: everything runs as small tasks on the
//! shared runtime, and a download holds at most [`CHUNKS_HELD`] buffers of [`CHUNK`] bytes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::hardware;
use super::stats::{AgentStats, Stats};
use crate::commands::{
    self, Command, Detail, Execute, Kind, Ledger, Outcome, PowerAction, State, Update,
};
use crate::disk::{self, Hints};
use crate::image::buf::BufPool;
use crate::image::checksum::{Algo, Hasher, MD5_WARNING};
use crate::image::source::{Chunk, FetchOptions, Source};
use crate::image::{self, ImageError, ImageSpec, Progress, Written};
use crate::inventory::Inventory;

/// Bytes per download buffer.
pub const CHUNK: usize = 16 << 10;
/// Buffers a download holds at once: one being filled, one queued, one being hashed.
pub const CHUNKS_HELD: usize = 3;
/// How long simulated cleaning takes: metadata, and every byte.
const ERASE_METADATA: Duration = Duration::from_millis(200);
const ERASE_FULL: Duration = Duration::from_secs(2);
/// Progress is reported at most this often, as the real agent does.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A disk that keeps nothing: it hashes every byte written to it, so a simulated image write
/// is verified exactly as a real one (the digest of the file as downloaded).
pub struct NullDisk {
    hasher: Hasher,
    algo: Algo,
    bytes: u64,
}

impl NullDisk {
    pub fn new(algo: Algo) -> NullDisk {
        NullDisk {
            hasher: Hasher::new(algo),
            algo,
            bytes: 0,
        }
    }

    pub fn write(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The digest of everything written, compared with `expected` (hex): the bytes and the
    /// digest when they match, else the checksum-mismatch error naming both digests.
    pub fn verify(self, url: &str, expected: &str) -> Result<(u64, String), ImageError> {
        let actual = self.hasher.hex();
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(ImageError::Mismatch {
                url: url.to_string(),
                algo: self.algo,
                expected: expected.to_string(),
                actual,
            });
        }
        Ok((self.bytes, actual))
    }
}

/// One simulated machine.
#[derive(Clone)]
pub struct SimMachine {
    inner: Arc<Inner>,
}

struct Inner {
    index: u32,
    mac: String,
    ledger: Ledger,
    http: reqwest::Client,
    stats: Arc<Stats>,
    me: Arc<AgentStats>,
    /// When the last result was handed to the session, and whether it was a success (for
    /// the time to the next command).
    last_result: Mutex<Option<(Instant, bool)>>,
}

impl SimMachine {
    /// Machine `index` with boot MAC `mac`; updates go to `updates`, and the power request
    /// that ends it to the returned watch.
    pub fn new(
        index: u32,
        mac: String,
        http: reqwest::Client,
        stats: Arc<Stats>,
        me: Arc<AgentStats>,
        updates: mpsc::UnboundedSender<Update>,
    ) -> (SimMachine, watch::Receiver<Option<PowerAction>>) {
        let (ledger, power) = Ledger::new(updates);
        let inner = Inner {
            index,
            mac,
            ledger,
            http,
            stats,
            me,
            last_result: Mutex::new(None),
        };
        (
            SimMachine {
                inner: Arc::new(inner),
            },
            power,
        )
    }

    fn inventory(&self) -> Inventory {
        hardware::inventory(self.inner.index, &self.inner.mac)
    }

    async fn execute(&self, cmd: &Command) -> Outcome {
        match &cmd.kind {
            Kind::Inspect => {
                let inv = self.inventory();
                Outcome::Success {
                    message: format!(
                        "{} CPUs, {} MiB RAM, {} disks, {} NICs (simulated)",
                        inv.cpu.count,
                        inv.memory.total_bytes >> 20,
                        inv.disks.len(),
                        inv.nics.len()
                    ),
                    detail: Detail::Inventory(Box::new(inv)),
                }
            }
            Kind::EraseMetadata { full } => {
                tokio::time::sleep(if *full { ERASE_FULL } else { ERASE_METADATA }).await;
                let names: Vec<String> =
                    self.inventory().disks.into_iter().map(|d| d.name).collect();
                Outcome::Success {
                    message: format!(
                        "{} {} (simulated)",
                        if *full {
                            "erased every byte of"
                        } else {
                            "wiped partition tables and signatures of"
                        },
                        names.join(", ")
                    ),
                    detail: Detail::None,
                }
            }
            Kind::WriteImage { spec, hints, .. } => self.write_image(&cmd.id, spec, hints).await,
            Kind::Reboot | Kind::Kexec | Kind::PowerOff => Outcome::Success {
                message: format!("{} now (simulated: the machine goes away)", cmd.kind.name()),
                detail: Detail::None,
            },
        }
    }

    /// The root disk chosen by the hints among the generated disks, the image downloaded
    /// (plain `http://` from the socket into small buffers, as the real agent reads it)
    /// and hashed into a [`NullDisk`], then verified.
    async fn write_image(&self, id: &str, spec: &ImageSpec, hints: &Hints) -> Outcome {
        let inv = self.inventory();
        let target = match disk::select_root_disk(hints, &inv.disks, disk::DEFAULT_MIN_ROOT_BYTES) {
            Ok(t) => t,
            Err(none) => return none.into(),
        };
        let device = target.disk().name.clone();
        let device_size = target.disk().size_bytes;
        let start = Instant::now();
        match self.download(id, spec, &device, device_size).await {
            Ok(w) => {
                self.inner.stats.image_verified();
                Outcome::Success {
                    message: format!(
                        "wrote {} to {} in {:.1}s, {} verified (simulated disk)",
                        disk::human(w.bytes),
                        w.device,
                        start.elapsed().as_secs_f64(),
                        w.algo
                    ) + &commands::warnings_suffix(&w),
                    detail: Detail::Written(w),
                }
            }
            Err(e) => {
                if e.kind() == "checksum" {
                    self.inner.stats.checksum_failure();
                }
                Outcome::image_failure(&e)
            }
        }
    }

    async fn download(
        &self,
        id: &str,
        spec: &ImageSpec,
        device: &str,
        device_size: u64,
    ) -> Result<Written, ImageError> {
        let start = Instant::now();
        let opts = image::WriteOptions {
            fetch: FetchOptions {
                chunk: CHUNK,
                ..Default::default()
            },
            target_zeroed: true,
        };
        let (algo, expected) = image::expected_digest(&self.inner.http, spec, &opts).await?;
        let mut warnings = Vec::new();
        if algo == Algo::Md5 {
            warnings.push(MD5_WARNING.to_string());
        }
        let mut src = Source::new(self.inner.http.clone(), &spec.url, opts.fetch.clone());
        // The format by magic, checked against the declared one, from the first bytes read by
        // a Range request as the real agent does (which also learns the length).
        let head = src.read_range(0, CHUNK as u64).await?;
        let found = image::detect(&head);
        image::cross_check(&spec.url, spec.format, found)?;
        drop(head);
        let format = match found {
            image::Detected::Raw => "raw".to_string(),
            image::Detected::Qcow2 => "qcow2".to_string(),
            image::Detected::Compressed(c) => format!("{}-compressed raw", c.name()),
        };
        let total = src.total.unwrap_or(0);
        if total > device_size {
            return Err(ImageError::TooLarge {
                url: spec.url.clone(),
                size: total,
                device: device.to_string(),
                device_size,
            });
        }
        let pool = BufPool::default();
        let (tx, mut rx) = mpsc::channel(1);
        let mut disk = NullDisk::new(algo);
        let mut ended = false;
        let mut last = Instant::now();
        let mut last_bytes = 0u64;
        let consume = async {
            while let Some(chunk) = rx.recv().await {
                let Chunk::Data(data) = chunk else {
                    ended = true;
                    break;
                };
                disk.write(&data);
                pool.put(data);
                let el = last.elapsed();
                if el >= PROGRESS_EVERY {
                    let done = disk.bytes();
                    let rate = ((done - last_bytes) as f64 / el.as_secs_f64()) as u64;
                    self.inner.ledger.send(Update::Progress {
                        id: id.to_string(),
                        progress: Progress {
                            phase: "write",
                            bytes_done: done,
                            bytes_total: total,
                            bytes_per_second: rate,
                            stalled_seconds: 0,
                        },
                    });
                    last = Instant::now();
                    last_bytes = done;
                }
            }
        };
        let (downloaded, ()) = tokio::join!(src.stream(tx, &pool), consume);
        let bytes = downloaded?;
        let total = src.total.unwrap_or(bytes);
        if !ended || disk.bytes() != total {
            return Err(ImageError::Truncated {
                url: spec.url.clone(),
                got: disk.bytes(),
                expected: total,
            });
        }
        let secs = start.elapsed().as_secs_f64().max(1e-3);
        self.inner.ledger.send(Update::Progress {
            id: id.to_string(),
            progress: Progress {
                phase: "verify",
                bytes_done: bytes,
                bytes_total: total,
                bytes_per_second: (bytes as f64 / secs) as u64,
                stalled_seconds: 0,
            },
        });
        let (bytes, digest) = disk.verify(&spec.url, &expected)?;
        Ok(Written {
            device: device.to_string(),
            bytes,
            digest,
            algo,
            seconds: start.elapsed().as_secs_f64(),
            format,
            image_size: total,
            zeroed: 0,
            warnings,
        })
    }
}

impl Execute for SimMachine {
    async fn hello_inventory(&self) -> Inventory {
        self.inventory()
    }

    fn statuses(&self) -> Vec<(String, State)> {
        self.inner.ledger.statuses()
    }

    fn submit(&self, cmd: Command) {
        let inner = &self.inner;
        if !inner.ledger.admit(&cmd) {
            return;
        }
        // A new command: the coordinator acted on the last result.
        let since = inner
            .last_result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((t, success)) = since {
            inner.stats.result_to_next(t.elapsed(), success);
        }
        let power = matches!(cmd.kind, Kind::Reboot | Kind::Kexec | Kind::PowerOff);
        if power {
            inner.me.power_command(&inner.stats);
        }
        inner.stats.command(&cmd.kind);
        let machine = self.clone();
        tokio::spawn(async move {
            let inner = &machine.inner;
            inner.ledger.started(&cmd);
            let outcome = machine.execute(&cmd).await;
            match (&cmd.kind, &outcome) {
                (Kind::Inspect, Outcome::Success { .. }) => inner.me.inspected(&inner.stats),
                (Kind::WriteImage { .. }, Outcome::Success { .. }) => inner.me.written(),
                (_, Outcome::Failure { message, .. }) => inner.me.failed(cmd.kind.name(), message),
                _ => {}
            }
            if !power {
                let success = matches!(outcome, Outcome::Success { .. });
                *inner.last_result.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), success));
            }
            inner.ledger.finish(&cmd, outcome, true);
        });
    }

    fn session_opened(&self) {
        self.inner.me.session_opened(&self.inner.stats);
    }

    fn session_closed(&self) {
        self.inner.stats.session_closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(data: &[u8]) -> String {
        let mut h = Hasher::new(Algo::Sha256);
        h.update(data);
        h.hex()
    }

    #[test]
    fn the_null_disk_verifies_what_it_was_given() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut d = NullDisk::new(Algo::Sha256);
        for piece in data.chunks(CHUNK) {
            d.write(piece);
        }
        assert_eq!(d.bytes(), 100_000);
        let want = sha256(&data);
        let (bytes, digest) = d.verify("http://x/i.raw", &want.to_uppercase()).unwrap();
        assert_eq!((bytes, digest), (100_000, want));
    }

    #[test]
    fn a_mismatch_names_both_digests() {
        let mut d = NullDisk::new(Algo::Sha256);
        d.write(b"not the image");
        let wrong = "0".repeat(64);
        let e = d.verify("http://x/i.raw", &wrong).unwrap_err();
        assert_eq!(e.kind(), "checksum");
        let text = e.to_string();
        assert!(text.contains(&wrong), "{text}");
        assert!(text.contains(&sha256(b"not the image")), "{text}");
        assert!(text.contains("http://x/i.raw"), "{text}");
    }

    #[test]
    fn each_algorithm_hashes_as_its_own() {
        for (algo, len) in [(Algo::Md5, 32), (Algo::Sha256, 64), (Algo::Sha512, 128)] {
            let mut d = NullDisk::new(algo);
            d.write(b"abc");
            let mut h = Hasher::new(algo);
            h.update(b"abc");
            let want = h.hex();
            assert_eq!(want.len(), len);
            assert_eq!(d.verify("u", &want).unwrap().1, want);
        }
    }
}
