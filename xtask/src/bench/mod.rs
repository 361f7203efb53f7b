//! `cargo xtask bench NAME`: each figure beside a reference measured in the same run.
//!
//! A benchmark returns [`Case`]s. The runner prints them as a table and writes
//! `target/bench/NAME.json` with, per case, `slipway_s`, `reference_s`, `ratio`
//! (= reference_s / slipway_s, higher is better) and `peak_rss_mib`. Times are medians of
//! repeated runs (the machines are noisy); [`measure`] runs a command as a child process and
//! reports its wall time and peak resident memory.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::cmd;
use serde_json::{Value, json};

mod boot;
mod image;
mod inventory;
mod kube;
mod scale;

/// One measured comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub name: String,
    /// Median seconds of Slipway's run.
    pub slipway_s: f64,
    /// Median seconds of the reference, measured in the same run (None: no reference here).
    pub reference_s: Option<f64>,
    /// The command measured for Slipway.
    pub command: String,
    /// The reference command, e.g. "dd if=IMAGE of=DEV bs=4M oflag=direct conv=fsync".
    pub reference: String,
    /// Peak resident memory of Slipway's run, MiB.
    pub peak_rss_mib: f64,
    /// The ratio an issue asks for, if any.
    pub goal_ratio: Option<f64>,
    pub runs: usize,
    /// Anything a reader needs to interpret the figure (sizes, TCG vs hardware).
    pub note: String,
}

impl Case {
    /// reference_s / slipway_s: above 1 means Slipway is faster.
    pub fn ratio(&self) -> Option<f64> {
        self.reference_s
            .filter(|_| self.slipway_s > 0.0)
            .map(|r| r / self.slipway_s)
    }
}

/// A benchmark: its name (the argument of `cargo xtask bench`) and its function.
/// The release binaries a benchmark runs.
pub struct Bins {
    pub slipway: std::path::PathBuf,
    pub agent: std::path::PathBuf,
}

/// Builds `slipway` and `slipway-agent` in release mode (for benchmark `name`'s log).
pub fn release_bins(root: &Path, name: &str) -> anyhow::Result<Bins> {
    eprintln!("bench {name}: building slipway and slipway-agent (release)");
    cmd::run(
        "cargo",
        &[
            "build",
            "--release",
            "--quiet",
            "-p",
            "slipway-agent",
            "-p",
            "slipway-coordinator",
            "--bins",
        ],
        Some(root),
    )?;
    Ok(Bins {
        slipway: root.join("target/release/slipway"),
        agent: root.join("target/release/slipway-agent"),
    })
}

pub type Bench = (&'static str, fn(&Ctx) -> anyhow::Result<Vec<Case>>);

/// The registry: every benchmark, in one place.
pub const BENCHES: &[Bench] = &[
    ("boot", boot::run),
    ("image", image::bench),
    ("inventory", inventory::run),
    ("kube", kube::bench),
    ("scale", scale::bench),
];

/// What a benchmark gets.
pub struct Ctx<'a> {
    pub root: &'a Path,
    /// Repetitions per measurement (medians are reported).
    pub runs: usize,
    /// `--size`: the data size for benchmarks that have one (e.g. image: 4G by default).
    pub size: Option<String>,
    /// Figures a benchmark reports in its own shape, merged into `NAME.json` beside the cases.
    pub extra: std::cell::RefCell<serde_json::Map<String, Value>>,
}

impl Ctx<'_> {
    /// Adds the keys of `v` (an object) to the benchmark's JSON file.
    pub fn extra(&self, v: Value) {
        if let Value::Object(m) = v {
            self.extra.borrow_mut().extend(m);
        }
    }
}

pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Wall time and peak RSS of one child process.
#[derive(Clone, Debug, PartialEq)]
pub struct Measure {
    pub seconds: f64,
    pub peak_rss_mib: f64,
    /// CPU seconds of the program (user + system), from wait4.
    pub cpu_s: f64,
    /// What the program wrote on stderr.
    pub stderr: String,
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// CPU seconds used so far by process `pid` (user + system), from /proc; 0 if unreadable.
pub fn process_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / hz
}

/// CPU seconds the whole machine spent busy so far (every core), from /proc/stat.
pub fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    let busy: f64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Runs `program args` to completion and measures it (wait4's ru_maxrss for memory).
#[allow(clippy::disallowed_methods)] // measuring needs the child's pid; the error carries the command line
pub fn measure(program: &Path, args: &[&OsStr], env: &[(&str, &OsStr)]) -> anyhow::Result<Measure> {
    let line = crate::cmd::line(&program.display().to_string(), args);
    // stderr to a file, not a pipe: a chatty child must not block on a full pipe while we wait.
    let mut err_file = tempfile::tempfile().context("cannot create a temporary file")?;
    let mut c = std::process::Command::new(program);
    c.args(args)
        .stdout(std::process::Stdio::null())
        .stderr(err_file.try_clone()?);
    for (k, v) in env {
        c.env(k, v);
    }
    let start = Instant::now();
    let child = c.spawn().with_context(|| format!("cannot start {line}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, status and usage are valid for writes.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = start.elapsed().as_secs_f64();
    if rc < 0 {
        bail!("waiting for {line}: {}", std::io::Error::last_os_error());
    }
    let mut err = String::new();
    {
        use std::io::{Read, Seek};
        let _ = err_file.rewind();
        let _ = err_file.read_to_string(&mut err);
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("`{line}` failed (status {status}): {}", err.trim());
    }
    Ok(Measure {
        seconds,
        peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
        cpu_s: tv(usage.ru_utime) + tv(usage.ru_stime),
        stderr: err,
    })
}

/// Runs `f` `runs` times; median seconds and the largest peak RSS.
pub fn repeat(
    runs: usize,
    mut f: impl FnMut() -> anyhow::Result<Measure>,
) -> anyhow::Result<Measure> {
    let all = (0..runs.max(1))
        .map(|_| f())
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(summarize(&all))
}

/// Like [`repeat`] for a pair, alternating them (a, b, a, b, ...) so that the machine's
/// slow and fast moments (a noisy VM's disk) fall on both alike.
pub fn repeat_paired(
    runs: usize,
    mut a: impl FnMut() -> anyhow::Result<Measure>,
    mut b: impl FnMut() -> anyhow::Result<Measure>,
) -> anyhow::Result<(Measure, Measure)> {
    let (mut ma, mut mb) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        ma.push(a()?);
        mb.push(b()?);
    }
    Ok((summarize(&ma), summarize(&mb)))
}

/// Median seconds and CPU, highest peak RSS.
fn summarize(all: &[Measure]) -> Measure {
    let mut secs: Vec<f64> = all.iter().map(|m| m.seconds).collect();
    let mut cpu: Vec<f64> = all.iter().map(|m| m.cpu_s).collect();
    Measure {
        seconds: median(&mut secs),
        peak_rss_mib: all.iter().map(|m| m.peak_rss_mib).fold(0.0, f64::max),
        cpu_s: median(&mut cpu),
        stderr: String::new(),
    }
}

/// The table printed for a benchmark.
pub fn table(cases: &[Case]) -> String {
    let mut out = format!(
        "{:<32} {:>10} {:>12} {:>8} {:>6} {:>9}  {}\n",
        "CASE", "SLIPWAY", "REFERENCE", "RATIO", "GOAL", "RSS MiB", "REFERENCE IS"
    );
    // Milliseconds where seconds would show 0.001s.
    let secs = |v: f64| {
        if v < 0.1 {
            format!("{:.2}ms", v * 1e3)
        } else {
            format!("{v:.3}s")
        }
    };
    for c in cases {
        out.push_str(&format!(
            "{:<32} {:>10} {:>12} {:>8} {:>6} {:>9.1}  {}\n",
            c.name,
            secs(c.slipway_s),
            c.reference_s.map_or("-".to_string(), secs),
            c.ratio().map_or("-".to_string(), |r| format!("{r:.2}x")),
            c.goal_ratio.map_or("-".into(), |g| format!("{g}x")),
            c.peak_rss_mib,
            c.reference
        ));
        if !c.note.is_empty() {
            out.push_str(&format!("    {}\n", c.note));
        }
    }
    out
}

/// One object per case, keyed by the case name. Times are medians in seconds; `ratio` is
/// reference_s / slipway_s (higher is better).
pub fn to_json(cases: &[Case]) -> Value {
    let mut map = serde_json::Map::new();
    for c in cases {
        map.insert(
            c.name.clone(),
            json!({
                "slipway_s": c.slipway_s,
                "reference_s": c.reference_s,
                "ratio": c.ratio(),
                "peak_rss_mib": c.peak_rss_mib,
                "goal_ratio": c.goal_ratio,
                "runs": c.runs,
                "commands": { "slipway": c.command, "reference": c.reference },
                "note": c.note,
            }),
        );
    }
    Value::Object(map)
}

/// `cargo xtask bench NAME`.
pub fn run(root: &Path, name: &str, runs: usize, size: Option<String>) -> anyhow::Result<()> {
    let Some((_, f)) = BENCHES.iter().find(|(n, _)| *n == name) else {
        let known: Vec<&str> = BENCHES.iter().map(|(n, _)| *n).collect();
        bail!(
            "no benchmark {name:?}; known: {}",
            if known.is_empty() {
                "(none yet)".into()
            } else {
                known.join(", ")
            }
        );
    };
    let ctx = Ctx {
        root,
        runs,
        size,
        extra: Default::default(),
    };
    let cases = f(&ctx)?;
    print!("{}", table(&cases));
    let mut out = to_json(&cases);
    if let Value::Object(m) = &mut out {
        let extra = ctx.extra.into_inner();
        if !extra.is_empty() {
            let cases = std::mem::take(m);
            m.extend(extra);
            m.insert("cases".into(), Value::Object(cases));
        }
    }
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
        let c = Case {
            name: "x".into(),
            slipway_s: 2.0,
            reference_s: Some(3.0),
            command: "slipway".into(),
            reference: "dd".into(),
            peak_rss_mib: 10.0,
            goal_ratio: Some(0.9),
            runs: 3,
            note: String::new(),
        };
        assert_eq!(c.ratio(), Some(1.5));
        let j = to_json(&[c]);
        assert_eq!(j["x"]["ratio"], 1.5);
        assert_eq!(j["x"]["slipway_s"], 2.0);
        assert_eq!(j["x"]["reference_s"], 3.0);
        assert_eq!(j["x"]["peak_rss_mib"], 10.0);
        assert_eq!(j["x"]["commands"]["reference"], "dd");
    }

    #[test]
    fn measures_a_child() {
        let m = measure(
            Path::new("/bin/sh"),
            &[OsStr::new("-c"), OsStr::new("sleep 0.1")],
            &[],
        )
        .unwrap();
        assert!(m.seconds >= 0.1, "{m:?}");
        assert!(m.peak_rss_mib > 0.0);
        let err = measure(
            Path::new("/bin/sh"),
            &[OsStr::new("-c"), OsStr::new("echo nope >&2; exit 3")],
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
