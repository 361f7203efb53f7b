//! Raw data writes kept in flight on two I/O threads, each job owning the download buffers
//! its data is in, so the disk always has a second write queued when one completes.
//!
//! A write through O_DIRECT waits for the device. With one write at a time the device idles
//! between completion and the next submission, and that gap grows when the CPU is busy
//! hashing and receiving, as it is during an image write. Two writes in flight close it: on
//! this project's loop device over a file, 4 GiB took 1.14-1.39 s with two 4 MiB writes in
//! flight against 1.45-1.84 s with one 8 MiB write at a time (see ARCHITECTURE.md).
//!
//! Only raw data from download buffers goes this way ([`super::sink::Sink::write_batch`]):
//! each disk offset of a raw image is written once, so writes in flight never overlap each
//! other or the writer thread's own (zeroing, buffered pieces, the held-back head). The
//! writer waits for every job before it syncs, and stops the threads before it wipes a
//! failed write's ends, so no write lands after the wipe.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as smpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::buf::{AlignedBuf, BufPool};
use crate::disk::{DiskError, DiskWriter};

/// Writes in flight at most (each one I/O thread).
pub const DEPTH: usize = 2;

/// Data that follows itself on disk from `off`: pieces `(buffer, start, end)` of the job's
/// buffers, written as one vectored write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub off: u64,
    pub pieces: Vec<(usize, usize, usize)>,
}

impl Run {
    /// The run's data as slices of `bufs`. A piece outside them would be a bug in the plan;
    /// it fails the write (naming `device`) rather than leave a gap on the disk.
    pub fn parts<'a>(&self, bufs: &[&'a [u8]], device: &Path) -> Result<Vec<&'a [u8]>, DiskError> {
        self.pieces
            .iter()
            .map(|&(i, a, b)| {
                bufs.get(i)
                    .and_then(|s| s.get(a..b))
                    .ok_or_else(|| DiskError::Write {
                        path: device.to_path_buf(),
                        offset: self.off,
                        len: 0,
                        source: std::io::Error::other(
                            "internal error: a write refers to bytes outside its buffers",
                        ),
                    })
            })
            .collect()
    }
}

struct Job {
    bufs: Vec<AlignedBuf>,
    runs: Vec<Run>,
}

/// The I/O threads and the way to them.
pub struct InFlight {
    jobs: Option<smpsc::SyncSender<Job>>,
    errors: smpsc::Receiver<DiskError>,
    /// Set on the first error, or when the writer gives up: jobs not started are dropped.
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    device: PathBuf,
}

impl InFlight {
    /// Starts [`DEPTH`] threads writing through `writers` (handles on the same disk); written
    /// buffers go back to `pool`. `None` when a thread cannot be started: the caller then
    /// writes itself, one write at a time.
    pub fn start(writers: Vec<Box<dyn DiskWriter>>, pool: &BufPool) -> Option<InFlight> {
        // A rendezvous channel: a job is handed over only to an idle thread, so at most
        // DEPTH jobs are in flight and the writer waits, holding one more, when all are busy.
        let device = writers.first()?.path().to_path_buf();
        let (tx, rx) = smpsc::sync_channel::<Job>(0);
        let rx = Arc::new(Mutex::new(rx));
        let (etx, erx) = smpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (i, w) in writers.into_iter().enumerate() {
            let (rx, etx, halt, pool) = (rx.clone(), etx.clone(), stop.clone(), pool.clone());
            let t = std::thread::Builder::new()
                .name(format!("disk-io-{i}"))
                .spawn(move || io_thread(w, &rx, &etx, &halt, &pool));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::warn!("cannot start a disk I/O thread ({e}); writing one at a time");
                    stop.store(true, Ordering::SeqCst);
                    drop(tx);
                    for t in threads {
                        let _ = t.join();
                    }
                    return None;
                }
            }
        }
        Some(InFlight {
            jobs: Some(tx),
            errors: erx,
            stop,
            threads,
            device,
        })
    }

    /// Hands `runs` of `bufs` to an I/O thread, waiting while all are busy. Fails with the
    /// first error any earlier job met.
    pub fn submit(&mut self, bufs: Vec<AlignedBuf>, runs: Vec<Run>) -> Result<(), DiskError> {
        if let Ok(e) = self.errors.try_recv() {
            return Err(e);
        }
        let sent = match &self.jobs {
            Some(tx) => tx.send(Job { bufs, runs }).is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // Every thread has ended, which they do only after an error (or a panic).
        self.jobs = None;
        Err(self.first_error())
    }

    /// Waits for every job handed over, ends the threads, and says whether all succeeded.
    pub fn finish(&mut self) -> Result<(), DiskError> {
        self.jobs = None;
        let panicked = self.join();
        match self.errors.try_recv() {
            Ok(e) => Err(e),
            Err(_) if panicked => Err(self.first_error()),
            Err(_) => Ok(()),
        }
    }

    /// Drops the jobs not yet started and ends the threads (a write in progress completes).
    pub fn abandon(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.jobs = None;
        self.join();
    }

    /// Joins the threads; true when one panicked.
    fn join(&mut self) -> bool {
        let mut panicked = false;
        for t in self.threads.drain(..) {
            panicked |= t.join().is_err();
        }
        panicked
    }

    fn first_error(&self) -> DiskError {
        self.errors.try_recv().unwrap_or_else(|_| DiskError::Write {
            path: self.device.clone(),
            offset: 0,
            len: 0,
            source: std::io::Error::other("a disk I/O thread ended unexpectedly"),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.abandon();
    }
}

fn io_thread(
    mut w: Box<dyn DiskWriter>,
    jobs: &Mutex<smpsc::Receiver<Job>>,
    errors: &smpsc::Sender<DiskError>,
    stop: &AtomicBool,
    pool: &BufPool,
) {
    loop {
        // The lock is held while waiting: the other thread waits for the lock instead.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        if !stop.load(Ordering::SeqCst) {
            let slices: Vec<&[u8]> = job.bufs.iter().map(|b| b.as_slice()).collect();
            for run in &job.runs {
                let r = run
                    .parts(&slices, w.path())
                    .and_then(|parts| w.write_all_vectored_at(run.off, &parts));
                if let Err(e) = r {
                    stop.store(true, Ordering::SeqCst);
                    let _ = errors.send(e);
                    break;
                }
            }
        }
        for b in job.bufs {
            pool.put(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    /// A memory disk whose writes take `delay` (those touching `slow_at`, `slow_delay`),
    /// counting how many run at once; a write touching `fail_at` fails after `delay`.
    #[derive(Clone)]
    struct Slow {
        data: Arc<Mutex<Vec<u8>>>,
        path: PathBuf,
        active: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        delay: Duration,
        slow_at: Option<(u64, Duration)>,
        fail_at: Option<u64>,
    }

    impl Slow {
        fn new(size: usize, delay: Duration) -> Slow {
            Slow {
                data: Arc::new(Mutex::new(vec![0xee; size])),
                path: PathBuf::from("/dev/slow"),
                active: Arc::default(),
                most: Arc::default(),
                delay,
                slow_at: None,
                fail_at: None,
            }
        }

        fn writers(&self) -> Vec<Box<dyn DiskWriter>> {
            (0..DEPTH)
                .map(|_| Box::new(self.clone()) as Box<dyn DiskWriter>)
                .collect()
        }
    }

    impl DiskWriter for Slow {
        fn path(&self) -> &Path {
            &self.path
        }
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<usize, DiskError> {
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let end = offset + buf.len() as u64;
            let hits = |at: u64| at >= offset && at < end;
            let delay = match self.slow_at {
                Some((at, d)) if hits(at) => d,
                _ => self.delay,
            };
            std::thread::sleep(delay);
            self.active.fetch_sub(1, Ordering::SeqCst);
            if self.fail_at.is_some_and(hits) {
                return Err(DiskError::Write {
                    path: self.path.clone(),
                    offset,
                    len: buf.len(),
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                });
            }
            let o = offset as usize;
            self.data.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
            Ok(buf.len())
        }
        fn sync(&mut self) -> Result<(), DiskError> {
            Ok(())
        }
    }

    /// One job: a buffer of `len` bytes of `fill`, written at `off`.
    fn job(off: u64, len: usize, fill: u8) -> (Vec<AlignedBuf>, Vec<Run>) {
        let mut b = AlignedBuf::new(len, 4096);
        b.push(&vec![fill; len]);
        let run = Run {
            off,
            pieces: vec![(0, 0, len)],
        };
        (vec![b], vec![run])
    }

    #[test]
    fn two_writes_run_at_once_never_three_and_all_land() {
        let disk = Slow::new(64 << 10, Duration::from_millis(40));
        let pool = BufPool::default();
        let mut f = InFlight::start(disk.writers(), &pool).unwrap();
        let t = Instant::now();
        for i in 0..8u8 {
            let (b, r) = job(u64::from(i) * 8192, 8192, i + 1);
            f.submit(b, r).unwrap();
        }
        f.finish().unwrap();
        // Eight writes of 40 ms two at a time: about 160 ms; one at a time would be 320.
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(disk.most.load(Ordering::SeqCst), 2);
        let d = disk.data.lock().unwrap();
        for i in 0..8usize {
            assert!(
                d[i * 8192..(i + 1) * 8192]
                    .iter()
                    .all(|x| *x == i as u8 + 1)
            );
        }
        assert!(d[8 * 8192..].iter().all(|x| *x == 0xee));
        // Every buffer went back to the pool.
        assert_eq!(pool.kept(), 8);
    }

    #[test]
    fn a_failed_write_is_reported_by_the_next_call_and_later_jobs_are_dropped() {
        let mut disk = Slow::new(64 << 10, Duration::from_millis(5));
        disk.fail_at = Some(8192 + 100);
        let mut f = InFlight::start(disk.writers(), &BufPool::default()).unwrap();
        let (b, r) = job(8192, 8192, 1);
        f.submit(b, r).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // The next hand-over says what failed, where, on which device.
        let (b, r) = job(32768, 8192, 2);
        let e = f.submit(b, r).unwrap_err().to_string();
        assert!(e.contains("/dev/slow") && e.contains("at byte 8192"), "{e}");
        f.abandon();
        let d = disk.data.lock().unwrap();
        assert!(
            d[32768..40960].iter().all(|x| *x == 0xee),
            "a job after the failure was written"
        );
    }

    #[test]
    fn a_run_outside_its_buffers_is_an_error_not_a_shorter_write() {
        let (a, b) = ([1u8; 8], [2u8; 8]);
        let bufs: [&[u8]; 2] = [&a, &b];
        let run = Run {
            off: 4096,
            pieces: vec![(0, 0, 8), (1, 4, 8)],
        };
        let dev = Path::new("/dev/x");
        assert_eq!(run.parts(&bufs, dev).unwrap(), vec![&a[..], &b[4..]]);
        for bad in [(2, 0, 1), (1, 4, 9)] {
            let run = Run {
                off: 4096,
                pieces: vec![(0, 0, 8), bad],
            };
            let e = run.parts(&bufs, dev).unwrap_err().to_string();
            assert!(e.contains("/dev/x") && e.contains("at byte 4096"), "{e}");
        }
    }

    #[test]
    fn finish_reports_a_failure_of_the_last_job() {
        let mut disk = Slow::new(64 << 10, Duration::from_millis(5));
        disk.fail_at = Some(0);
        let mut f = InFlight::start(disk.writers(), &BufPool::default()).unwrap();
        let (b, r) = job(0, 4096, 1);
        f.submit(b, r).unwrap();
        let e = f.finish().unwrap_err().to_string();
        assert!(e.contains("at byte 0"), "{e}");
    }

    #[test]
    fn abandon_returns_only_after_the_write_in_progress_landed() {
        // The writer wipes a failed disk's ends right after `abandon`: a write still in
        // progress then must not land after the wipe. Here the second job is slow, and must
        // be on the disk by the time `abandon` returns (so a wipe after it is the last word).
        let mut disk = Slow::new(64 << 10, Duration::from_millis(1));
        disk.slow_at = Some((60 << 10, Duration::from_millis(300)));
        let mut f = InFlight::start(disk.writers(), &BufPool::default()).unwrap();
        let (b, r) = job(0, 4096, 1);
        f.submit(b, r).unwrap();
        let (b, r) = job(60 << 10, 4096, 2);
        f.submit(b, r).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        f.abandon();
        let d = disk.data.lock().unwrap();
        assert!(
            d[60 << 10..].iter().all(|x| *x == 2),
            "abandon returned before the write landed"
        );
    }
}
