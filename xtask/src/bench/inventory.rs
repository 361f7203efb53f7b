//! `cargo xtask bench inventory`: the agent's full inventory (without the LLDP listen) beside
//! ironic-python-agent's `list_hardware_info` on the same machine, in the same run.
//!
//! Slipway is timed as a whole process (`slipway-agent inventory -o json`: exec, runtime start,
//! collection, JSON), so its figure includes overhead IPA's does not. IPA is timed inside its
//! Python process (`GenericHardwareManager().list_hardware_info()`, after its imports and
//! configuration): the first call of a fresh process is the reference (what an inspection
//! costs when the ramdisk's IPA starts). Two more cases put the same Slipway figure beside IPA's
//! whole process (Python start and imports included, timed like Slipway's) and beside IPA's
//! second call in a process (faster: IPA caches some tool output).
//!
//! IPA comes from a venv: `$SLIPWAY_IPA_VENV`, default `target/bench/ipa-venv`. With
//! `SLIPWAY_BENCH_INSTALL_IPA=1` the bench creates it (`pip install ironic-python-agent`) and
//! installs the tools IPA shells out to (lshw, dmidecode, ...) with apt-get. Without IPA the
//! reference is left empty and the note says how to get it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::{Case, Ctx, measure, median, repeat};
use crate::{cmd, deps};

/// Programs IPA runs while listing hardware, and their Debian packages.
const IPA_TOOLS: &[(&str, &str)] = &[
    ("lshw", "lshw"),
    ("dmidecode", "dmidecode"),
    ("lspci", "pciutils"),
    ("ipmitool", "ipmitool"),
    ("smartctl", "smartmontools"),
    ("hdparm", "hdparm"),
    ("lsblk", "util-linux"),
];

const IPA_SCRIPT: &str = r#"
import json, logging, sys, time
logging.disable(logging.CRITICAL)
from ironic_python_agent import config
config.populate_config()
from oslo_config import cfg
cfg.CONF([], project='ironic-python-agent')
from ironic_python_agent import hardware
manager = hardware.GenericHardwareManager()
times = []
for _ in range(int(sys.argv[1])):
    start = time.monotonic()
    info = manager.list_hardware_info()
    times.append(time.monotonic() - start)
print(json.dumps({"times": times, "disks": len(info.get("disks") or [])}))
"#;

pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Case>> {
    cmd::run(
        "cargo",
        &["build", "--release", "-p", "slipway-agent"],
        Some(ctx.root),
    )?;
    let agent = ctx.root.join("target/release/slipway-agent");
    let args: Vec<&OsStr> = ["inventory", "--lldp-seconds", "0", "-o", "json", "--time"]
        .iter()
        .map(OsStr::new)
        .collect();
    let env = [("RUST_LOG", OsStr::new("warn"))];
    // Warm the page cache and sysfs dentries once, as both sides get.
    measure(&agent, &args, &env)?;
    // A run takes milliseconds: many more runs than IPA's for a stable median.
    let slipway_runs = (ctx.runs * 20).max(50);
    // Each run gives two figures: the whole process (exec included), and the collection alone
    // as the agent timed it (`--time`), which is what IPA's timed call corresponds to.
    let mut collect_times = Vec::new();
    let slipway = repeat(slipway_runs, || {
        let m = measure(&agent, &args, &env)?;
        let t = m
            .stderr
            .lines()
            .find_map(|l| {
                l.strip_prefix("collected in ")?
                    .strip_suffix(" s")?
                    .parse()
                    .ok()
            })
            .with_context(|| format!("no `collected in N s` line from --time: {:?}", m.stderr))?;
        collect_times.push(t);
        Ok(m)
    })?;
    let collect_s = median(&mut collect_times);

    let venv = std::env::var_os("SLIPWAY_IPA_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| ctx.root.join("target/bench/ipa-venv"));
    let python = venv.join("bin/python");
    if !python.exists() && std::env::var_os("SLIPWAY_BENCH_INSTALL_IPA").is_some() {
        install_ipa(&venv)?;
    }
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let mut note = format!(
        "{slipway_runs} Slipway runs, median; the collection as timed by the agent (--time), \
         after process start, as IPA's call is timed after its imports; the whole process \
         took {:.2} ms; load average {load} at the end",
        slipway.seconds * 1e3
    );
    let ipa = if python.exists() {
        let ipa = ipa_medians(&python, ctx.runs, ctx.root)?;
        note.push_str(&format!(
            "; IPA: {} fresh processes, call timed after imports, median, {} disks seen",
            ctx.runs, ipa.disks
        ));
        Some(ipa)
    } else {
        note.push_str(&format!(
            "; no IPA reference: no venv at {} (SLIPWAY_BENCH_INSTALL_IPA=1 creates it)",
            venv.display()
        ));
        None
    };
    note.push_str(&format!(
        "; goal < 20 ms (whole process): {}",
        if slipway.seconds < 0.020 {
            "met"
        } else {
            "NOT met"
        }
    ));
    let command = format!(
        "{} inventory --lldp-seconds 0 -o json --time",
        agent.display()
    );
    let mut cases = vec![];
    if let Some(i) = &ipa {
        cases.push(Case {
            name: "inventory-vs-ipa-process".into(),
            slipway_s: slipway.seconds,
            reference_s: Some(i.process),
            command: command.clone(),
            reference: "IPA list_hardware_info() as a whole Python process, imports included"
                .into(),
            peak_rss_mib: slipway.peak_rss_mib,
            goal_ratio: None,
            runs: slipway_runs,
            note: format!(
                "the same Slipway runs; both sides timed as whole processes; IPA peak RSS {:.1} MiB",
                i.process_rss_mib
            ),
        });
    }
    cases.insert(
        0,
        Case {
            name: "inventory".into(),
            slipway_s: collect_s,
            reference_s: ipa.as_ref().map(|i| i.first),
            command: command.clone(),
            reference: "IPA list_hardware_info(), first call of a fresh process".into(),
            peak_rss_mib: slipway.peak_rss_mib,
            goal_ratio: Some(100.0),
            runs: slipway_runs,
            note,
        },
    );
    if let Some(i) = ipa {
        cases.push(Case {
            name: "inventory-vs-ipa-cached".into(),
            slipway_s: collect_s,
            reference_s: Some(i.second),
            command,
            reference: "IPA list_hardware_info(), second call (its tool output cached)".into(),
            peak_rss_mib: slipway.peak_rss_mib,
            goal_ratio: None,
            runs: slipway_runs,
            note: "the same Slipway runs, the collection alone; IPA's figure is a call after one \
                   that warmed its caches"
                .into(),
        });
    }
    Ok(cases)
}

struct Ipa {
    /// Median of the first call in each fresh process.
    first: f64,
    /// Median of the second call.
    second: f64,
    /// Median wall time of a whole process making one call, imports included.
    process: f64,
    process_rss_mib: f64,
    disks: u64,
}

/// IPA's `list_hardware_info`, called twice in each of `runs` fresh processes.
fn ipa_medians(python: &Path, runs: usize, root: &Path) -> anyhow::Result<Ipa> {
    let script = root.join("target/bench/ipa_list_hardware_info.py");
    std::fs::create_dir_all(root.join("target/bench"))?;
    std::fs::write(&script, IPA_SCRIPT)
        .with_context(|| format!("cannot write {}", script.display()))?;
    let (mut first, mut second, mut disks) = (Vec::new(), Vec::new(), 0);
    for _ in 0..runs.max(1) {
        let out = cmd::output(
            &python.display().to_string(),
            &[&script.display().to_string(), "2"],
            &[],
        )?;
        let line = out.lines().last().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("unexpected output from the IPA script: {out}"))?;
        let times: Vec<f64> = v["times"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default();
        let [a, b] = times[..] else {
            bail!(
                "the IPA script reported {} times, not 2: {out}",
                times.len()
            );
        };
        first.push(a);
        second.push(b);
        disks = v["disks"].as_u64().unwrap_or(0);
    }
    let whole = repeat(runs, || {
        measure(python, &[script.as_os_str(), OsStr::new("1")], &[])
    })?;
    Ok(Ipa {
        first: median(&mut first),
        second: median(&mut second),
        process: whole.seconds,
        process_rss_mib: whole.peak_rss_mib,
        disks,
    })
}

fn install_ipa(venv: &Path) -> anyhow::Result<()> {
    deps::ensure(IPA_TOOLS)?;
    let v = venv.display().to_string();
    eprintln!("xtask: creating {v} with ironic-python-agent");
    cmd::run("python3", &["-m", "venv", &v], None)?;
    cmd::run(
        &venv.join("bin/pip").display().to_string(),
        &["install", "-q", "ironic-python-agent"],
        None,
    )
}
