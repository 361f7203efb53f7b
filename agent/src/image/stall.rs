//! When a download counts as stalled: the window accounting ([`StallWindow`], pure over the
//! times it is given), the watch a connection's reads run under ([`Watch`]: the window and
//! one timer at its end) and the download's [`Gauge`] the progress reports read.
//!
//! A download is stalled when `timeout` passes without another `min_bytes` arriving: the
//! window starts when a connection's body starts (or when the last `min_bytes` were
//! complete) and ends at `timeout`; fewer than `min_bytes` by then is a stall. So the
//! slowest download that never stalls brings `min_bytes` per `timeout` (64 KiB per 60 s, about
//! 1 KiB/s, by default), and a server dripping a byte every 2 s, which never lets a read
//! time out, stalls as surely as a silent one. Counting bytes per window rather than the time
//! between bytes is the point: the time between bytes is what such a server keeps short.
//!
//! The source keeps one window per connection (its end is the deadline that connection's
//! reads are given) and one for the whole download, which only progress moves: the progress
//! reports read that one, so a stall shown stays shown across resumes until bytes flow again.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When a download counts as stalled (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StallOptions {
    /// The window. Must not be zero (every window would have stalled at once).
    pub timeout: Duration,
    /// Bytes that must arrive within each window.
    pub min_bytes: u64,
}

impl Default for StallOptions {
    fn default() -> StallOptions {
        StallOptions {
            timeout: Duration::from_secs(60),
            min_bytes: DEFAULT_MIN_BYTES,
        }
    }
}

/// Bytes a window must bring by default: a few TCP segments would keep a dead-slow server
/// looking alive; 64 KiB is one socket read of a healthy one.
pub const DEFAULT_MIN_BYTES: u64 = 64 << 10;

/// A stall is shown in the progress reports once no progress was made for this long (or
/// half the timeout, when that is shorter).
pub const SHOWN_AFTER: Duration = Duration::from_secs(5);

impl StallOptions {
    /// How long without progress before the reports say the download is stalled.
    pub fn shown_after(&self) -> Duration {
        (self.timeout / 2).min(SHOWN_AFTER)
    }
}

/// One window of the accounting.
#[derive(Clone, Debug)]
pub struct StallWindow {
    opts: StallOptions,
    /// When the window began: the start, or the moment the last `min_bytes` were complete.
    mark: Instant,
    /// Bytes received since `mark`.
    since_mark: u64,
}

impl StallWindow {
    pub fn new(opts: StallOptions, now: Instant) -> StallWindow {
        StallWindow {
            opts,
            mark: now,
            since_mark: 0,
        }
    }

    /// Counts `n` bytes received at `now`. Returns whether they completed a window's worth
    /// (progress), which starts the next window at `now`.
    pub fn record(&mut self, n: u64, now: Instant) -> bool {
        self.since_mark = self.since_mark.saturating_add(n);
        if self.since_mark >= self.opts.min_bytes {
            self.mark = now;
            self.since_mark = 0;
            return true;
        }
        false
    }

    /// When this window ends: a read not done by then has stalled.
    pub fn deadline(&self) -> Instant {
        // A timeout too long to add is as good as none (a year).
        self.mark
            .checked_add(self.opts.timeout)
            .or_else(|| self.mark.checked_add(Duration::from_secs(365 * 86_400)))
            .unwrap_or(self.mark)
    }

    /// Whether the window ended before `min_bytes` arrived.
    pub fn is_stalled(&self, now: Instant) -> bool {
        now >= self.deadline()
    }

    /// How long the download has gone without progress, if that is long enough to show
    /// ([`StallOptions::shown_after`]) and the bytes of the window are behind the pace the
    /// window asks for (a slow download bringing `min_bytes` just in time is not shown as
    /// stalled all along).
    pub fn shown_stall(&self, now: Instant) -> Option<Duration> {
        let quiet = now.saturating_duration_since(self.mark);
        if quiet < self.opts.shown_after() || self.opts.timeout.is_zero() {
            return None;
        }
        // Pace: min_bytes per timeout, so by `quiet` at least min_bytes * quiet / timeout.
        let due =
            self.opts.min_bytes as u128 * quiet.as_millis() / self.opts.timeout.as_millis().max(1);
        (u128::from(self.since_mark) < due).then_some(quiet)
    }
}

/// The whole download's window and the bytes it received, shared with the thread that
/// reports progress.
#[derive(Debug)]
pub struct Gauge {
    window: Mutex<StallWindow>,
    received: AtomicU64,
}

impl Gauge {
    pub fn new(opts: StallOptions) -> Gauge {
        Gauge {
            window: Mutex::new(StallWindow::new(opts, Instant::now())),
            received: AtomicU64::new(0),
        }
    }

    /// Bytes of the file received so far (handed on or not).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn set_received(&self, bytes: u64) {
        self.received.store(bytes, Ordering::Relaxed);
    }

    /// Counts `n` bytes received at `now`.
    pub fn record(&self, n: u64, now: Instant) {
        if let Ok(mut w) = self.window.lock() {
            w.record(n, now);
        }
    }

    /// Starts the window afresh (when the download proper begins, after the reads before it).
    pub fn restart(&self, now: Instant) {
        if let Ok(mut w) = self.window.lock() {
            let opts = w.opts;
            *w = StallWindow::new(opts, now);
        }
    }

    /// How long the download has been stalled, when the reports should say so.
    pub fn stalled_for(&self, now: Instant) -> Option<Duration> {
        self.window.lock().ok()?.shown_stall(now)
    }
}

/// Why an attempt's body stopped short.
#[derive(Debug)]
pub enum Broke {
    /// The connection broke off, for this reason.
    Error(String),
    /// Its stall window ended without the window's bytes.
    Stalled,
}

/// One connection's stall window and the timer at its end, shared by the body's reads.
pub struct Watch {
    window: StallWindow,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The download's own window, told of every byte (the stream's; not the ranged reads').
    gauge: Option<Arc<Gauge>>,
}

impl Watch {
    /// The window of a connection whose body starts now.
    pub fn new(opts: StallOptions, gauge: Option<Arc<Gauge>>) -> Watch {
        let window = StallWindow::new(opts, Instant::now());
        let timer = Box::pin(tokio::time::sleep_until(window.deadline().into()));
        Watch {
            window,
            timer,
            gauge,
        }
    }

    /// Runs one body read (its bytes, `Ok(0)` at the body's end, or why the body broke off)
    /// until the window ends.
    pub async fn read(
        &mut self,
        read: impl Future<Output = Result<usize, String>>,
    ) -> Result<usize, Broke> {
        // A server that always has a byte ready must not outrun the timer.
        if self.window.is_stalled(Instant::now()) {
            return Err(Broke::Stalled);
        }
        let n = tokio::select! {
            biased;
            r = read => r.map_err(Broke::Error)?,
            () = &mut self.timer => return Err(Broke::Stalled),
        };
        let now = Instant::now();
        if self.window.record(n as u64, now) {
            self.timer.as_mut().reset(self.window.deadline().into());
        }
        if let Some(g) = &self.gauge {
            g.record(n as u64, now);
        }
        Ok(n)
    }
}

/// `2 s`, `1.5 s`.
pub fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(secs: u64, min: u64) -> StallOptions {
        StallOptions {
            timeout: Duration::from_secs(secs),
            min_bytes: min,
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_window_that_brings_too_little_stalls_at_its_end() {
        let t0 = Instant::now();
        let mut w = StallWindow::new(opts(60, 64 << 10), t0);
        assert_eq!(w.deadline(), t0 + 60 * S);
        // A byte every 2 s: 30 bytes by the end of the window, never progress.
        for i in 1..30 {
            assert!(!w.record(1, t0 + 2 * i * S));
            assert!(!w.is_stalled(t0 + 2 * i * S));
        }
        assert!(w.is_stalled(t0 + 60 * S));
        assert_eq!(
            w.deadline(),
            t0 + 60 * S,
            "the drip never moved the deadline"
        );
    }

    #[test]
    fn each_window_worth_of_bytes_starts_the_next_window() {
        let t0 = Instant::now();
        let mut w = StallWindow::new(opts(10, 100), t0);
        assert!(!w.record(60, t0 + S));
        assert!(
            w.record(40, t0 + 9 * S),
            "100 bytes in the window: progress"
        );
        assert_eq!(w.deadline(), t0 + 19 * S);
        assert!(!w.is_stalled(t0 + 18 * S));
        // A surplus does not carry over: the next window needs its own 100 bytes.
        assert!(w.record(250, t0 + 10 * S));
        assert!(!w.record(99, t0 + 11 * S));
        assert!(w.is_stalled(t0 + 20 * S));
    }

    #[test]
    fn a_stall_is_shown_after_a_few_seconds_behind_pace() {
        let t0 = Instant::now();
        let mut w = StallWindow::new(opts(60, 60_000), t0); // 1,000 bytes/s
        assert_eq!(w.shown_stall(t0 + 4 * S), None, "not before 5 s");
        assert_eq!(w.shown_stall(t0 + 5 * S), Some(5 * S));
        // On pace (6,000 bytes by 6 s): a slow download is not shown as stalled.
        w.record(6_000, t0 + 6 * S);
        assert_eq!(w.shown_stall(t0 + 6 * S), None);
        assert_eq!(
            w.shown_stall(t0 + 12 * S),
            Some(12 * S),
            "behind again by 12 s"
        );
        // Progress hides it at once.
        w.record(60_000, t0 + 13 * S);
        assert_eq!(w.shown_stall(t0 + 14 * S), None);
    }

    #[test]
    fn short_timeouts_show_a_stall_after_half_the_timeout() {
        let o = opts(2, 64 << 10);
        assert_eq!(o.shown_after(), S);
        assert_eq!(StallOptions::default().shown_after(), SHOWN_AFTER);
        let t0 = Instant::now();
        let w = StallWindow::new(o, t0);
        assert_eq!(w.shown_stall(t0 + S / 2), None);
        assert_eq!(w.shown_stall(t0 + S), Some(S));
    }

    #[test]
    fn a_zero_timeout_stalls_at_once_and_is_never_shown() {
        let t0 = Instant::now();
        let w = StallWindow::new(opts(0, 1), t0);
        assert!(w.is_stalled(t0));
        assert_eq!(w.shown_stall(t0 + S), None);
    }

    #[test]
    fn an_enormous_timeout_does_not_overflow() {
        let t0 = Instant::now();
        let w = StallWindow::new(opts(u64::MAX, 1), t0);
        assert!(w.deadline() > t0 + 300 * 86_400 * S);
        assert!(!w.is_stalled(t0 + 86_400 * S));
    }

    #[test]
    fn the_gauge_shows_what_its_window_says() {
        let g = Gauge::new(opts(2, 100));
        let t0 = Instant::now();
        g.restart(t0);
        assert_eq!(g.stalled_for(t0), None);
        assert_eq!(g.stalled_for(t0 + 3 * S), Some(3 * S));
        g.record(100, t0 + 3 * S);
        assert_eq!(g.stalled_for(t0 + 3 * S), None);
    }
}
