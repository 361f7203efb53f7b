//! `cargo xtask bench kube`: Kubernetes mode at fleet size, against a real API server.
//!
//! Our own kube-apiserver 1.20.2 and etcd (`slipway_tests::kube::KubeCluster`, built by
//! `cargo xtask kube-apiserver`) on the same two cores as a release `slipway serve --kube` and
//! the load generator (`slipway-agent simulate`, as in `bench scale`): N BareMetalHosts (with
//! a userData Secret each, from `simulate-hosts`, `SLIPWAY_BENCH_KUBE_N`, default 1,000) are
//! created with `kubectl create`, N simulated machines boot, enrol, are inspected, cleaned
//! and provisioned with a 4 MiB image (every write verified on their null disks), and the run
//! ends when all are provisioned.
//!
//! Figures: wall time from the first create to the last host provisioned, API requests per
//! host and status writes per host (from the API server's own `apiserver_request_total`,
//! before and after; 1.20 does not label requests by client, so the N creates of the hosts
//! and their Secrets, which are the benchmark's, are subtracted, and the rest is the
//! coordinator's plus the API server's own few), the agents' result-to-next-command latency
//! p50/p99 (the reconcile loop as the agents see it: a result stored in the cluster before the
//! next command goes) and the coordinator's peak RSS. The reference is files mode's
//! `provision_1000` (the embedded store) measured in the same run with the same N: the ratio
//! says what the cluster costs. Goals (issue 18): under 10 minutes, at most 25 status writes
//! per host.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::scale::{self, Bins, Coordinator};
use super::{Case, Ctx};

const MIB: u64 = 1 << 20;

fn n_hosts() -> usize {
    std::env::var("SLIPWAY_BENCH_KUBE_N")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1000)
}

/// Request counts by (verb, resource, subresource).
type Requests = BTreeMap<(String, String, String), f64>;

/// What one run measured: wall seconds, the agents' latency summary, the coordinator's peak
/// RSS (MiB), and in Kubernetes mode the API requests made meanwhile.
struct Run {
    wall: f64,
    latency: Value,
    peak_rss_mib: f64,
    requests: Option<Requests>,
}

/// `apiserver_request_total` summed by (verb, resource, subresource).
fn requests(k: &slipway_tests::kube::KubeCluster) -> Requests {
    let text =
        String::from_utf8_lossy(&k.kubectl(&["get", "--raw", "/metrics"]).stdout).into_owned();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let v: f64 = value.trim().parse().unwrap_or(0.0);
        *out.entry((label("verb"), label("resource"), label("subresource")))
            .or_insert(0.0) += v;
    }
    out
}

fn delta(before: &Requests, after: &Requests) -> Requests {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// One run: N hosts applied to provisioned, in Kubernetes mode (`kube`) or files mode.
fn provision(
    bins: &Bins,
    work: &Path,
    n: usize,
    kube: Option<&slipway_tests::kube::KubeCluster>,
) -> anyhow::Result<Run> {
    let dir = work.join(if kube.is_some() { "kube" } else { "files" });
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let sum = scale::image(&images.join("small.img"), 4 * MIB)?;
    let c = match kube {
        Some(k) => Coordinator::start_kube(bins, &dir, &images, k.kubeconfig(), k.namespace())?,
        None => Coordinator::start(bins, &dir, &images, &[])?,
    };
    let url = format!("http://{}/images/small.img", c.http);
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs)?;
    let before = kube.map(requests);
    let start = Instant::now();
    match kube {
        Some(k) => {
            scale::hosts(bins, &docs, n, Some((&url, &sum)))?;
            let out = k.kubectl(&["create", "-f", &scale::p(&docs)]);
            if !out.status.success() {
                bail!(
                    "kubectl create of the hosts failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        None => scale::hosts(bins, &c.hosts, n, Some((&url, &sum)))?,
    }
    let report = dir.join("simulate.json");
    let mut sim = scale::simulate(
        bins,
        &c,
        n,
        "provisioned",
        200.0,
        &report,
        &dir.join("simulate.log"),
    )?;
    let status = sim.0.wait()?;
    // The load generator is done when its agents saw their last command; the host is
    // provisioned once that result is stored.
    c.wait_for(Duration::from_secs(120), "every host provisioned", || {
        Ok(c.metric("slipway_hosts{state=\"provisioned\"}")? as usize >= n)
    })?;
    let wall = start.elapsed().as_secs_f64();
    let after = kube.map(requests);
    let r = scale::read_report(&report)?;
    let verified = r["counts"]["imagesVerified"].as_u64().unwrap_or(0);
    if !status.success() || verified < n as u64 {
        bail!(
            "{n} hosts did not all provision: {verified} writes verified; see {}",
            dir.display()
        );
    }
    let lat = r["resultToNextCommand"]["afterSuccess"].clone();
    let hwm = scale::rss_mib(c.proc.pid()).1;
    Ok(Run {
        wall,
        latency: lat,
        peak_rss_mib: hwm,
        requests: before.zip(after).map(|(b, a)| delta(&b, &a)),
    })
}

pub fn bench(ctx: &Ctx) -> anyhow::Result<Vec<Case>> {
    let root = ctx.root;
    let n = n_hosts();
    crate::kube::build(root)?;
    let bins = super::release_bins(root, "kube")?;
    let work = root.join("target/bench/kube-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    eprintln!("bench kube: files mode, {n} hosts (the reference)");
    let files_wall = provision(&bins, &work, n, None)?.wall;
    eprintln!("bench kube: files mode {files_wall:.1} s; starting etcd and kube-apiserver");
    let k = slipway_tests::kube::KubeCluster::start();
    let crds = root.join("deploy/crds");
    let out = k.kubectl(&["apply", "-f", &scale::p(&crds)]);
    if !out.status.success() {
        bail!(
            "cannot apply {}: {}",
            crds.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    k.kubectl(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout",
        "60s",
        "crd/baremetalhosts.metal3.io",
    ]);
    eprintln!("bench kube: Kubernetes mode, {n} hosts");
    let run = provision(&bins, &work, n, Some(&k))?;
    let (wall, lat, hwm) = (run.wall, run.latency, run.peak_rss_mib);
    let reqs = run.requests.context("no request counts")?;
    let total: f64 = reqs.values().sum();
    // The benchmark's own creates, N hosts and N Secrets, are not the coordinator's (1.20
    // does not label requests by client: the coordinator's token Secrets stay counted).
    let coordinator_requests = (total - 2.0 * n as f64).max(0.0);
    let status_writes: f64 = reqs
        .iter()
        .filter(|((verb, resource, sub), _)| {
            // Server-side apply counts as APPLY (a merge patch as PATCH).
            (verb == "APPLY" || verb == "PATCH") && resource == "baremetalhosts" && sub == "status"
        })
        .map(|(_, v)| v)
        .sum();
    let per_host = coordinator_requests / n as f64;
    let status_per_host = status_writes / n as f64;
    let (p50, p99) = (
        lat["p50"].as_f64().unwrap_or(0.0) * 1e3,
        lat["p99"].as_f64().unwrap_or(0.0) * 1e3,
    );
    eprintln!(
        "bench kube: {n} hosts applied to provisioned in {wall:.1} s (files mode {files_wall:.1} s); \
         {per_host:.1} API requests/host, {status_per_host:.1} status writes/host; result->next \
         command p50 {p50:.1} ms p99 {p99:.1} ms; coordinator peak RSS {hwm:.0} MiB"
    );
    let by_kind: Vec<Value> = reqs
        .iter()
        .map(|((verb, resource, sub), v)| {
            json!({"verb": verb, "resource": resource, "subresource": sub, "count": v})
        })
        .collect();
    ctx.extra(json!({
        "kube": {
            "n": n,
            "wall_s": wall,
            "files_mode_wall_s": files_wall,
            "api_requests_per_host": per_host,
            "status_writes_per_host": status_per_host,
            "reconcile_p50_ms": p50,
            "reconcile_p99_ms": p99,
            "coordinator_peak_rss_mib": hwm,
            "requests": by_kind,
        },
        "machine": scale::machine(),
    }));
    let _ = std::fs::remove_dir_all(&work);
    Ok(vec![Case {
        name: format!("kube_provision_{n}"),
        slipway_s: wall,
        reference_s: Some(files_wall),
        command: format!(
            "slipway serve --kube + kube-apiserver 1.20.2 + etcd, {n} BareMetalHosts, \
             slipway-agent simulate"
        ),
        reference: format!("files mode (embedded store), the same {n} hosts, this run"),
        peak_rss_mib: hwm,
        goal_ratio: None,
        runs: 1,
        note: format!(
            "goal < 600 s and <= 25 status writes/host: {per_host:.1} API requests/host, \
             {status_per_host:.1} status writes/host, result->next command p50 {p50:.1} ms, \
             p99 {p99:.1} ms"
        ),
    }])
}
