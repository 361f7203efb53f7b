//! `cargo xtask bench scale`: the coordinator with thousands of agents, all on this machine.
//!
//! Every case runs a real `slipway serve` (release build, files mode, its redb store) on
//! 127.0.0.1 and the load generator `slipway-agent simulate` in one other process: each
//! simulated agent fetches its boot script by MAC, enrols through the real `Enroll` path with
//! its own key and certificate, holds a mutual-TLS gRPC session with heartbeats, reports a
//! generated inventory and runs its commands against a null disk that hashes what it
//! downloads (checksums really verified). Hosts directories come from
//! `slipway-agent simulate-hosts`.
//!
//! Cases (sizes from `SLIPWAY_BENCH_SCALE_N`, default `1000,5000,10000`):
//! - `sessions_held`: N hosts declared, N agents connected and idle with heartbeats (every
//!   10 s, the agent's default): coordinator RSS, RSS per host, CPU per heartbeat (coordinator
//!   CPU over 30 s divided by the heartbeats it counted), time to connect all.
//! - `reconcile_latency`: in the same runs, each command result to the host's next command as
//!   the agents see it (the coordinator stores the result's effect before it acts, so this is
//!   event to durable status and back), p50 and p99.
//! - `provision_1000`: 1,000 hosts from declared to provisioned with a 4 MiB image and the
//!   default provisioning limit; wall time, and every write verified. metal3's published scale
//!   test needed about 48 h for 1,000 fake hosts (24 cores); that figure is the reference.
//! - `image_fanout`: 100 agents download a 64 MiB image from the coordinator at once (after
//!   inspection and cleaning, all started by one edit of the hosts files); their aggregate
//!   throughput against one `curl -o /dev/null` of the same image from the same server.
//!
//! Raw figures: `target/bench/scale.json` (`sessions_held`, `provision_1000`,
//! `reconcile_latency`, `image_fanout`, `machine`, and the cases in the common shape).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{Case, Ctx, median};
use crate::cmd;

const MIB: u64 = 1 << 20;

pub(super) use super::Bins;

/// A process killed when dropped.
pub(super) struct Proc(pub(super) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub(super) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then wait (the load generator writes its report on SIGTERM).
    fn terminate(&mut self, timeout: Duration) {
        // SAFETY: kill with a valid signal number on our own child's pid.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running coordinator.
pub(super) struct Coordinator {
    pub(super) proc: Proc,
    pub(super) http: String,
    pub(super) grpc: String,
    pub(super) state: PathBuf,
    pub(super) hosts: PathBuf,
    pub(super) log: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(super) fn p(path: &Path) -> String {
    path.display().to_string()
}

impl Coordinator {
    pub(super) fn start(
        bins: &Bins,
        work: &Path,
        images: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Coordinator::start_mode(bins, work, images, extra, None)
    }

    /// In Kubernetes mode against the cluster of `kubeconfig`, its own objects in `namespace`.
    pub(super) fn start_kube(
        bins: &Bins,
        work: &Path,
        images: &Path,
        kubeconfig: &Path,
        namespace: &str,
    ) -> anyhow::Result<Self> {
        Coordinator::start_mode(bins, work, images, &[], Some((kubeconfig, namespace)))
    }

    fn start_mode(
        bins: &Bins,
        work: &Path,
        images: &Path,
        extra: &[&str],
        kube: Option<(&Path, &str)>,
    ) -> anyhow::Result<Self> {
        let hosts = work.join("hosts");
        let state = work.join("state");
        std::fs::create_dir_all(&hosts)?;
        let http = format!("127.0.0.1:{}", free_port()?);
        let grpc = format!("127.0.0.1:{}", free_port()?);
        let source: Vec<String> = match kube {
            Some((_, ns)) => vec!["--kube".into(), "--namespace".into(), ns.into()],
            None => vec!["--hosts".into(), p(&hosts)],
        };
        let mut args: Vec<String> = vec!["--state".into(), p(&state), "serve".into()];
        args.extend(source);
        args.extend([
            "--images".into(),
            p(images),
            "--listen".into(),
            grpc.clone(),
            "--http-listen".into(),
            http.clone(),
            // Every simulated machine asks for its boot script from 127.0.0.1.
            "--boot-rate".into(),
            "0".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let log = work.join("coordinator.log");
        let mut env = vec![("RUST_LOG", OsStr::new("warn"))];
        if let Some((kubeconfig, _)) = kube {
            env.push(("KUBECONFIG", kubeconfig.as_os_str()));
        }
        let proc = Proc(cmd::spawn(&bins.slipway, &a, &env, &log)?);
        let c = Coordinator {
            proc,
            http,
            grpc,
            state,
            hosts,
            log,
        };
        c.wait_for(Duration::from_secs(60), "/healthz", || {
            Ok(http_get(&c.http, "/healthz").is_ok())
        })?;
        Ok(c)
    }

    fn metrics(&self) -> anyhow::Result<String> {
        http_get(&self.http, "/metrics")
    }

    /// A metric's value (the first line that starts with `name `), 0 when absent.
    pub(super) fn metric(&self, name: &str) -> anyhow::Result<f64> {
        Ok(metric(&self.metrics()?, name))
    }

    fn ca_fingerprint(&self, bins: &Bins) -> anyhow::Result<String> {
        let out = cmd::output(
            &p(&bins.slipway),
            &["--state", &p(&self.state), "info", "-o", "json"],
            &[],
        )?;
        let v: Value = serde_json::from_str(&out)?;
        Ok(v["caFingerprint"].as_str().unwrap_or_default().to_string())
    }

    pub(super) fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if f().unwrap_or(false) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .filter(|rest| rest.starts_with(' '))
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    cmd::output(
        "curl",
        &["-sf", "--max-time", "20", &format!("http://{addr}{path}")],
        &[],
    )
}

/// VmRSS and VmHWM of a process, MiB.
pub(super) fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Writes `n` hosts (with an image when given) into `dir`.
pub(super) fn hosts(
    bins: &Bins,
    dir: &Path,
    n: usize,
    image: Option<(&str, &str)>,
) -> anyhow::Result<()> {
    let count = n.to_string();
    let out = p(dir);
    let mut args = vec!["simulate-hosts", "--count", &count, "--out", &out];
    if let Some((url, sum)) = image {
        args.extend(["--image-url", url, "--checksum", sum]);
    }
    cmd::output(&p(&bins.agent), &args, &[]).map(drop)
}

/// Starts `n` simulated agents against `c`.
pub(super) fn simulate(
    bins: &Bins,
    c: &Coordinator,
    n: usize,
    until: &str,
    ramp: f64,
    report: &Path,
    log: &Path,
) -> anyhow::Result<Proc> {
    let fp = c.ca_fingerprint(bins)?;
    let args: Vec<String> = vec![
        "simulate".into(),
        "--count".into(),
        n.to_string(),
        "--coordinator".into(),
        format!("https://{}", c.grpc),
        "--http".into(),
        format!("http://{}", c.http),
        "--ca-fingerprint".into(),
        fp,
        "--ramp".into(),
        ramp.to_string(),
        "--until".into(),
        until.into(),
        "--report".into(),
        p(report),
    ];
    let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    Ok(Proc(cmd::spawn(
        &bins.agent,
        &a,
        &[("RUST_LOG", OsStr::new("warn"))],
        log,
    )?))
}

pub(super) fn read_report(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("the load generator wrote no report at {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Random bytes (incompressible), deterministic.
pub(super) fn image(path: &Path, size: u64) -> anyhow::Result<String> {
    use sha2::Digest;
    let mut data = vec![0u8; size as usize];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for c in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    std::fs::write(path, &data).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(hex::encode(sha2::Sha256::digest(&data)))
}

pub(super) fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    json!({
        "cores": cores,
        "memory_gib": (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "cpu": cpu,
        "kernel": kernel,
    })
}

/// Sizes of the sessions runs.
fn sizes() -> Vec<usize> {
    std::env::var("SLIPWAY_BENCH_SCALE_N")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1000, 5000, 10000])
}

/// N agents connected and idle: memory, CPU per heartbeat, and the latency of the results
/// they sent on the way (inspection, cleaning).
fn sessions(bins: &Bins, work: &Path, n: usize) -> anyhow::Result<(Value, Value, Case)> {
    let dir = work.join(format!("sessions-{n}"));
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let c = Coordinator::start(bins, &dir, &images, &[])?;
    hosts(bins, &c.hosts, n, None)?;
    let report = dir.join("simulate.json");
    // Machines come up in waves: 200 a second.
    let mut sim = simulate(
        bins,
        &c,
        n,
        "forever",
        200.0,
        &report,
        &dir.join("simulate.log"),
    )?;
    let timeout = Duration::from_secs(120 + n as u64 / 20);
    let connect = c.wait_for(timeout, &format!("{n} hosts available with agents"), || {
        let m = c.metrics()?;
        Ok(metric(&m, "slipway_agent_sessions") as usize >= n
            && metric(&m, "slipway_hosts{state=\"available\"}") as usize >= n)
    })?;
    eprintln!(
        "bench scale: {n} agents connected, hosts available after {:.1} s",
        connect.as_secs_f64()
    );
    // Let the ramp's work (stores, logs) settle, then measure idle sessions for 30 s.
    std::thread::sleep(Duration::from_secs(10));
    let (cpu0, hb0) = (
        super::process_cpu_s(c.proc.pid()),
        c.metric("slipway_agent_heartbeats_total")?,
    );
    let window = Duration::from_secs(30);
    std::thread::sleep(window);
    let (cpu1, hb1) = (
        super::process_cpu_s(c.proc.pid()),
        c.metric("slipway_agent_heartbeats_total")?,
    );
    let (rss, hwm) = rss_mib(c.proc.pid());
    let (sim_rss, _) = rss_mib(sim.pid());
    let heartbeats = hb1 - hb0;
    let cpu = cpu1 - cpu0;
    let per_hb = if heartbeats > 0.0 {
        cpu / heartbeats
    } else {
        0.0
    };
    sim.terminate(Duration::from_secs(60));
    let r = read_report(&report)?;
    let lat = &r["resultToNextCommand"]["afterSuccess"];
    let (p50, p99) = (
        lat["p50"].as_f64().unwrap_or(0.0),
        lat["p99"].as_f64().unwrap_or(0.0),
    );
    eprintln!(
        "bench scale: {n}: coordinator RSS {rss:.0} MiB (peak {hwm:.0}), {:.1} KiB/host, \
         {:.1} µs CPU per heartbeat ({heartbeats} heartbeats, {cpu:.2} CPU-s in {window:?}); \
         result->next command p50 {:.1} ms p99 {:.1} ms ({} samples); load generator RSS {sim_rss:.0} MiB",
        rss * 1024.0 / n as f64,
        per_hb * 1e6,
        p50 * 1e3,
        p99 * 1e3,
        lat["samples"]
    );
    let held = json!({
        "n": n,
        "rss_mib": rss,
        "peak_rss_mib": hwm,
        "rss_kib_per_host": rss * 1024.0 / n as f64,
        "cpu_s_per_heartbeat": per_hb,
        "heartbeats_measured": heartbeats,
        "connect_all_s": connect.as_secs_f64(),
        "load_generator_rss_mib": sim_rss,
    });
    let latency = json!({
        "n": n,
        "p50_ms": p50 * 1e3,
        "p99_ms": p99 * 1e3,
        "max_ms": lat["max"].as_f64().unwrap_or(0.0) * 1e3,
        "samples": lat["samples"],
    });
    let case = Case {
        name: format!("sessions_held_{n}"),
        slipway_s: connect.as_secs_f64(),
        reference_s: None,
        command: format!("slipway serve + slipway-agent simulate --count {n} --ramp 200"),
        reference: "-".into(),
        peak_rss_mib: hwm,
        goal_ratio: None,
        runs: 1,
        note: format!(
            "time to {n} hosts available with agents connected; coordinator RSS {rss:.0} MiB \
             ({:.1} KiB/host; goal < 1 GiB at 10,000), {:.1} µs CPU per heartbeat; result to \
             next command p50 {:.1} ms, p99 {:.1} ms",
            rss * 1024.0 / n as f64,
            per_hb * 1e6,
            p50 * 1e3,
            p99 * 1e3
        ),
    };
    Ok((held, latency, case))
}

/// 1,000 hosts from declared to provisioned.
fn provision(bins: &Bins, work: &Path) -> anyhow::Result<(Value, Case)> {
    let n = 1000;
    let dir = work.join("provision");
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let sum = image(&images.join("small.img"), 4 * MIB)?;
    let c = Coordinator::start(bins, &dir, &images, &[])?;
    let url = format!("http://{}/images/small.img", c.http);
    let start = Instant::now();
    hosts(bins, &c.hosts, n, Some((&url, &sum)))?;
    let report = dir.join("simulate.json");
    let mut sim = simulate(
        bins,
        &c,
        n,
        "provisioned",
        200.0,
        &report,
        &dir.join("simulate.log"),
    )?;
    let status = sim.0.wait()?;
    let wall = start.elapsed().as_secs_f64();
    let r = read_report(&report)?;
    let verified = r["counts"]["imagesVerified"].as_u64().unwrap_or(0);
    let provisioned = c.metric("slipway_hosts{state=\"provisioned\"}")? as u64;
    let all = status.success() && verified >= n as u64 && provisioned == n as u64;
    eprintln!(
        "bench scale: provision_1000: {wall:.1} s, {verified} writes verified, {provisioned} \
         hosts provisioned{}",
        if all { "" } else { " (NOT ALL)" }
    );
    if !all {
        bail!(
            "provision_1000 did not finish: {verified} verified, {provisioned} provisioned; see {}",
            dir.display()
        );
    }
    let metal3 = 48.0 * 3600.0;
    Ok((
        json!({"n": n, "wall_s": wall, "verified": verified == n as u64,
               "images_verified": verified, "metal3_published_s": metal3}),
        Case {
            name: "provision_1000".into(),
            slipway_s: wall,
            reference_s: Some(metal3),
            command: "1,000 simulated agents, 4 MiB image, default --provisioning-limit".into(),
            reference: "metal3's published scale test, ~48 h for 1,000 fake hosts (24 cores)"
                .into(),
            peak_rss_mib: rss_mib(c.proc.pid()).1,
            goal_ratio: None,
            runs: 1,
            note: format!("goal < 300 s; every write verified on the null disks: {verified}/{n}"),
        },
    ))
}

/// 100 agents download one image at once, against one curl.
fn fanout(bins: &Bins, work: &Path, runs: usize) -> anyhow::Result<(Value, Case)> {
    let agents = 100;
    let size = 64 * MIB;
    let dir = work.join("fanout");
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let sum = image(&images.join("fanout.img"), size)?;
    let c = Coordinator::start(bins, &dir, &images, &[])?;
    let url = format!("http://{}/images/fanout.img", c.http);
    hosts(bins, &c.hosts, agents, None)?;
    let report = dir.join("simulate.json");
    let mut sim = simulate(
        bins,
        &c,
        agents,
        "provisioned",
        200.0,
        &report,
        &dir.join("simulate.log"),
    )?;
    c.wait_for(Duration::from_secs(300), "100 hosts available", || {
        Ok(c.metric("slipway_hosts{state=\"available\"}")? as usize >= agents)
    })?;
    // One curl first (the image is in the page cache for both).
    let mut single = Vec::new();
    for _ in 0..runs.max(3) {
        let t = Instant::now();
        cmd::output("curl", &["-sf", "-o", "/dev/null", &url], &[])?;
        single.push(t.elapsed().as_secs_f64());
    }
    let single_s = median(&mut single);
    let t0 = Instant::now();
    hosts(bins, &c.hosts, agents, Some((&url, &sum)))?;
    let status = sim.0.wait()?;
    let all_s = t0.elapsed().as_secs_f64();
    let r = read_report(&report)?;
    let verified = r["counts"]["imagesVerified"].as_u64().unwrap_or(0);
    if !status.success() || verified < agents as u64 {
        bail!(
            "image_fanout: only {verified} of {agents} writes verified; see {}",
            dir.display()
        );
    }
    let total_mib = (agents as u64 * size / MIB) as f64;
    let aggregate = total_mib / all_s;
    let single_rate = (size / MIB) as f64 / single_s;
    eprintln!(
        "bench scale: image_fanout: {agents} agents x {} MiB in {all_s:.1} s = {aggregate:.0} MiB/s; \
         one curl {single_rate:.0} MiB/s",
        size / MIB
    );
    Ok((
        json!({"agents": agents, "image_mib": size / MIB, "aggregate_mib_s": aggregate,
               "single_curl_mib_s": single_rate, "ratio": aggregate / single_rate,
               "wall_s": all_s}),
        Case {
            name: "image_fanout".into(),
            slipway_s: all_s,
            reference_s: Some(total_mib / single_rate),
            command: format!(
                "{agents} simulated agents write a {} MiB image at once (sha256 verified)",
                size / MIB
            ),
            reference: "one curl -o /dev/null of the same image, same server, at its rate".into(),
            peak_rss_mib: rss_mib(c.proc.pid()).1,
            goal_ratio: None,
            runs: 1,
            note: format!(
                "aggregate {aggregate:.0} MiB/s vs one curl {single_rate:.0} MiB/s; the agents \
                 also hash every byte, on the same 2 cores as the server"
            ),
        },
    ))
}

pub fn bench(ctx: &Ctx) -> anyhow::Result<Vec<Case>> {
    if !cmd::have("curl") {
        bail!("the scale benchmark needs curl (apt-get install -y curl)");
    }
    let root = ctx.root;
    let bins = super::release_bins(root, "scale")?;
    let work = root.join("target/bench/scale-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut cases = Vec::new();
    let mut held = Vec::new();
    let mut latency = Vec::new();
    for n in sizes() {
        let (h, l, case) = sessions(&bins, &work, n)?;
        held.push(h);
        latency.push(l);
        cases.push(case);
    }
    let (prov, case) = provision(&bins, &work)?;
    cases.push(case);
    let (fan, case) = fanout(&bins, &work, ctx.runs)?;
    cases.push(case);
    ctx.extra(json!({
        "sessions_held": held,
        "reconcile_latency": latency,
        "provision_1000": prov,
        "image_fanout": fan,
        "machine": machine(),
    }));
    let _ = std::fs::remove_dir_all(&work);
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_by_exact_name() {
        let text = "# TYPE x gauge\nslipway_agent_sessions 12\nslipway_agent_sessions_total 3\n\
                    slipway_hosts{state=\"available\"} 7\n";
        assert_eq!(metric(text, "slipway_agent_sessions"), 12.0);
        assert_eq!(metric(text, "slipway_hosts{state=\"available\"}"), 7.0);
        assert_eq!(metric(text, "slipway_missing"), 0.0);
    }
}
