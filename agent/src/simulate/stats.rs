//! What the simulated agents did: counters, the time from each command result to the host's
//! next command, and when each agent reached its milestones; the periodic status line and
//! the JSON report.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::commands::Kind;

/// Counters and samples shared by every simulated agent.
pub struct Stats {
    start: Instant,
    enrolled: AtomicU64,
    enrol_failures: AtomicU64,
    refusals: AtomicU64,
    sessions_open: AtomicI64,
    sessions_opened: AtomicU64,
    reconnects: AtomicU64,
    commands: [AtomicU64; KINDS.len()],
    images_verified: AtomicU64,
    checksum_failures: AtomicU64,
    connected: AtomicU64,
    inspected: AtomicU64,
    provisioned: AtomicU64,
    finished: AtomicU64,
    /// Seconds from a command result to the host's next command: after a success, after a
    /// failure (which includes the coordinator's retry backoff).
    after_success: Mutex<Vec<f64>>,
    after_failure: Mutex<Vec<f64>>,
    /// Seconds from the start to each agent's milestones.
    times: Mutex<Times>,
}

#[derive(Default)]
struct Times {
    enrolled: Vec<f64>,
    connected: Vec<f64>,
    inspected: Vec<f64>,
    provisioned: Vec<f64>,
}

const KINDS: [&str; 7] = [
    "inspect",
    "erase-metadata",
    "erase-full",
    "write-image",
    "reboot",
    "kexec",
    "power-off",
];

/// One agent's progress (what the summary says of agents that did not finish).
#[derive(Default)]
pub struct AgentStats {
    pub index: u32,
    pub mac: String,
    host: Mutex<Option<String>>,
    enrolled: AtomicBool,
    connected: AtomicBool,
    inspected: AtomicBool,
    written: AtomicBool,
    provisioned: AtomicBool,
    /// The last thing that went wrong, or that it is waiting for.
    last: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AgentStats {
    pub fn new(index: u32, mac: String) -> AgentStats {
        AgentStats {
            index,
            mac,
            ..Default::default()
        }
    }

    pub fn note(&self, what: impl Into<String>) {
        *lock(&self.last) = what.into();
    }

    /// Enrolled (counted once; an agent enrols again when its certificate is refused).
    pub fn enrolled(&self, host: &str, stats: &Stats) {
        *lock(&self.host) = Some(host.to_string());
        if !self.enrolled.swap(true, Relaxed) {
            stats.enrolled.fetch_add(1, Relaxed);
            stats.reached(|t| &mut t.enrolled);
        }
    }

    pub fn session_opened(&self, stats: &Stats) {
        stats.sessions_open.fetch_add(1, Relaxed);
        stats.sessions_opened.fetch_add(1, Relaxed);
        if self.connected.swap(true, Relaxed) {
            stats.reconnects.fetch_add(1, Relaxed);
        } else {
            stats.connected.fetch_add(1, Relaxed);
            stats.reached(|t| &mut t.connected);
        }
    }

    pub fn inspected(&self, stats: &Stats) {
        if !self.inspected.swap(true, Relaxed) {
            stats.inspected.fetch_add(1, Relaxed);
            stats.reached(|t| &mut t.inspected);
        }
    }

    /// A verified image write.
    pub fn written(&self) {
        self.written.store(true, Relaxed);
    }

    /// A power command arrived: after a verified write, the machine is provisioned.
    pub fn power_command(&self, stats: &Stats) {
        if self.written.load(Relaxed) && !self.provisioned.swap(true, Relaxed) {
            stats.provisioned.fetch_add(1, Relaxed);
            stats.reached(|t| &mut t.provisioned);
        }
    }

    pub fn failed(&self, command: &str, message: &str) {
        self.note(format!("{command} failed: {message}"));
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Relaxed)
    }

    pub fn is_provisioned(&self) -> bool {
        self.provisioned.load(Relaxed)
    }

    /// One line about where this agent stands.
    pub fn describe(&self) -> String {
        let host = lock(&self.host).clone();
        let last = lock(&self.last).clone();
        format!(
            "agent {} ({}{}): {}",
            self.index,
            self.mac,
            host.map(|h| format!(", host {h}")).unwrap_or_default(),
            if last.is_empty() {
                "no failure seen"
            } else {
                &last
            }
        )
    }
}

impl Default for Stats {
    fn default() -> Stats {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            start: Instant::now(),
            enrolled: AtomicU64::new(0),
            enrol_failures: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            sessions_open: AtomicI64::new(0),
            sessions_opened: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            commands: Default::default(),
            images_verified: AtomicU64::new(0),
            checksum_failures: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            inspected: AtomicU64::new(0),
            provisioned: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            after_success: Mutex::new(Vec::new()),
            after_failure: Mutex::new(Vec::new()),
            times: Mutex::new(Times::default()),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    fn reached(&self, which: impl FnOnce(&mut Times) -> &mut Vec<f64>) {
        let t = self.start.elapsed().as_secs_f64();
        which(&mut lock(&self.times)).push(t);
    }

    pub fn refusal(&self) {
        self.refusals.fetch_add(1, Relaxed);
    }

    pub fn enrol_failure(&self) {
        self.enrol_failures.fetch_add(1, Relaxed);
    }

    pub fn session_closed(&self) {
        self.sessions_open.fetch_sub(1, Relaxed);
    }

    pub fn command(&self, kind: &Kind) {
        if let Some(i) = KINDS.iter().position(|k| *k == kind.name()) {
            self.commands[i].fetch_add(1, Relaxed);
        }
    }

    pub fn image_verified(&self) {
        self.images_verified.fetch_add(1, Relaxed);
    }

    pub fn checksum_failure(&self) {
        self.checksum_failures.fetch_add(1, Relaxed);
    }

    pub fn finished(&self) {
        self.finished.fetch_add(1, Relaxed);
    }

    /// The time from a result (`success` or not) to the next command.
    pub fn result_to_next(&self, d: Duration, success: bool) {
        let samples = if success {
            &self.after_success
        } else {
            &self.after_failure
        };
        lock(samples).push(d.as_secs_f64());
    }

    pub fn connected(&self) -> u64 {
        self.connected.load(Relaxed)
    }

    pub fn provisioned(&self) -> u64 {
        self.provisioned.load(Relaxed)
    }

    fn commands_run(&self) -> u64 {
        self.commands.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// The periodic status line.
    pub fn line(&self, agents: u32, process: &Process) -> String {
        format!(
            "t={:.0}s enrolled={}/{agents} sessions-open={} commands={} images-verified={} \
             checksum-failures={} provisioned={} refusals={} enrol-failures={} reconnects={} \
             rss={:.0}MiB cpu={:.0}%",
            self.start.elapsed().as_secs_f64(),
            self.enrolled.load(Relaxed),
            self.sessions_open.load(Relaxed),
            self.commands_run(),
            self.images_verified.load(Relaxed),
            self.checksum_failures.load(Relaxed),
            self.provisioned.load(Relaxed),
            self.refusals.load(Relaxed),
            self.enrol_failures.load(Relaxed),
            self.reconnects.load(Relaxed),
            process.rss_mib,
            process.cpu_percent,
        )
    }

    /// The report (see [`Report`]).
    pub fn report(&self, run: RunInfo, process: Process) -> Report {
        let times = lock(&self.times);
        Report {
            run,
            seconds: self.start.elapsed().as_secs_f64(),
            counts: Counts {
                enrolled: self.enrolled.load(Relaxed),
                enrol_failures: self.enrol_failures.load(Relaxed),
                refusals: self.refusals.load(Relaxed),
                sessions_open: self.sessions_open.load(Relaxed),
                sessions_opened: self.sessions_opened.load(Relaxed),
                reconnects: self.reconnects.load(Relaxed),
                commands_run: self.commands_run(),
                commands: KINDS
                    .iter()
                    .zip(&self.commands)
                    .map(|(k, c)| (k.to_string(), c.load(Relaxed)))
                    .filter(|(_, n)| *n > 0)
                    .collect(),
                images_verified: self.images_verified.load(Relaxed),
                checksum_failures: self.checksum_failures.load(Relaxed),
                connected: self.connected.load(Relaxed),
                inspected: self.inspected.load(Relaxed),
                provisioned: self.provisioned.load(Relaxed),
                finished: self.finished.load(Relaxed),
            },
            result_to_next_command: {
                let ok = lock(&self.after_success);
                let failed = lock(&self.after_failure);
                let all: Vec<f64> = ok.iter().chain(failed.iter()).copied().collect();
                ResultToNext {
                    all: Distribution::of(&all),
                    after_success: Distribution::of(&ok),
                    after_failure: Distribution::of(&failed),
                }
            },
            start_to: StartTo {
                enrolled: Distribution::of(&times.enrolled),
                connected: Distribution::of(&times.connected),
                inspected: Distribution::of(&times.inspected),
                provisioned: Distribution::of(&times.provisioned),
            },
            process,
            unfinished: Vec::new(),
        }
    }
}

/// The JSON report of `simulate --report`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub run: RunInfo,
    /// Seconds from the start to the report.
    pub seconds: f64,
    pub counts: Counts,
    /// Seconds from sending a command result to receiving the host's next command: the
    /// coordinator stored the result's effect durably and acted on it.
    pub result_to_next_command: ResultToNext,
    /// Seconds from the start until each agent reached a milestone.
    pub start_to: StartTo,
    pub process: Process,
    /// Agents that did not reach the goal (at most 50), with their last failure.
    pub unfinished: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunInfo {
    pub agents: u32,
    pub first_index: u32,
    pub until: String,
    /// Whether every agent reached `until` (always false for `forever`).
    pub reached: bool,
    pub how_it_ended: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    pub enrolled: u64,
    pub enrol_failures: u64,
    /// Boot scripts without a token (the coordinator refused, or sent the machine to its disk).
    pub refusals: u64,
    pub sessions_open: i64,
    pub sessions_opened: u64,
    pub reconnects: u64,
    pub commands_run: u64,
    pub commands: std::collections::BTreeMap<String, u64>,
    pub images_verified: u64,
    pub checksum_failures: u64,
    pub connected: u64,
    pub inspected: u64,
    pub provisioned: u64,
    /// Agents whose machine went away after a power command.
    pub finished: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultToNext {
    /// Every result.
    pub all: Distribution,
    /// After a success: the coordinator's reaction time.
    pub after_success: Distribution,
    /// After a failure: includes the retry backoff the coordinator waits on purpose.
    pub after_failure: Distribution,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StartTo {
    pub enrolled: Distribution,
    pub connected: Distribution,
    pub inspected: Distribution,
    pub provisioned: Distribution,
}

/// A sample's percentiles (nearest rank), in seconds.
#[derive(Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Distribution {
    pub samples: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Distribution {
    pub fn of(values: &[f64]) -> Distribution {
        if values.is_empty() {
            return Distribution::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Distribution {
            samples: v.len(),
            p50: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// This process's memory and CPU, from /proc.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
    /// CPU over the last interval, in percent of one core.
    pub cpu_percent: f64,
}

/// Reads this process's RSS and CPU time; `previous`: the last reading and when it was made,
/// for the CPU percentage since.
pub fn process(previous: Option<(&Process, Instant)>) -> Process {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) in parentheses.
    let ticks: f64 = stat
        .rsplit_once(") ")
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    let hz = 100.0; // USER_HZ on Linux
    let cpu_seconds = ticks / hz;
    let cpu_percent = previous
        .map(|(p, at)| {
            let wall = at.elapsed().as_secs_f64().max(1e-3);
            (cpu_seconds - p.cpu_seconds) / wall * 100.0
        })
        .unwrap_or(0.0);
    Process {
        rss_mib: kib("VmRSS:") / 1024.0,
        peak_rss_mib: kib("VmHWM:") / 1024.0,
        cpu_seconds,
        cpu_percent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let d = Distribution::of(&v);
        assert_eq!(
            d,
            Distribution {
                samples: 100,
                p50: 50.0,
                p90: 90.0,
                p99: 99.0,
                max: 100.0
            }
        );
        assert_eq!(Distribution::of(&[]), Distribution::default());
        let one = Distribution::of(&[0.25]);
        assert_eq!(
            (one.p50, one.p99, one.max, one.samples),
            (0.25, 0.25, 0.25, 1)
        );
    }

    #[test]
    fn an_agent_counts_once_per_milestone_and_reconnects_after_its_first_session() {
        let stats = Stats::new();
        let a = AgentStats::new(3, "52:54:00:00:00:03".into());
        a.session_opened(&stats);
        stats.session_closed();
        a.session_opened(&stats);
        a.inspected(&stats);
        a.inspected(&stats);
        // A power command without a verified write is not a provisioning.
        a.power_command(&stats);
        assert_eq!(stats.provisioned(), 0);
        a.written();
        a.power_command(&stats);
        a.power_command(&stats);
        let r = stats.report(
            RunInfo {
                agents: 1,
                first_index: 3,
                until: "provisioned".into(),
                reached: true,
                how_it_ended: "done".into(),
            },
            Process::default(),
        );
        assert_eq!(r.counts.sessions_opened, 2);
        assert_eq!(r.counts.sessions_open, 1);
        assert_eq!(r.counts.reconnects, 1);
        assert_eq!(r.counts.connected, 1);
        assert_eq!(r.counts.inspected, 1);
        assert_eq!(r.counts.provisioned, 1);
        assert_eq!(r.start_to.provisioned.samples, 1);
        assert!(a.describe().contains("agent 3 (52:54:00:00:00:03)"));
        a.failed("write-image", "checksum mismatch");
        assert!(
            a.describe()
                .ends_with("write-image failed: checksum mismatch")
        );
    }

    #[test]
    fn this_process_has_memory_and_used_cpu() {
        let p = process(None);
        assert!(p.rss_mib > 1.0 && p.peak_rss_mib >= p.rss_mib, "{p:?}");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let later = process(Some((&p, Instant::now() - Duration::from_secs(1))));
        assert!(later.cpu_seconds >= p.cpu_seconds);
    }
}
