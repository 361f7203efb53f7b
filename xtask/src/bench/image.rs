//! `cargo xtask bench image [--size 4G]`: the agent's image write against `dd`, download +
//! `qemu-img convert`, and `curl | zstd -d | dd`, all onto the same loop device, images served
//! from 127.0.0.1 by the coordinator's own HTTP server (`slipway serve --images DIR`).
//!
//! Before every run (Slipway's and the reference's) the loop device is discarded, so each
//! starts from the same empty backing file. Images stay in the page cache for both sides (a
//! warm-up run precedes the measured ones): the comparison is of the write paths, not of
//! this VM's virtual disk read speed.

use std::ffi::OsStr;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Case, Ctx, Measure, measure, repeat};
use crate::cmd;

const MIB: u64 = 1 << 20;

/// Parses `4G`, `512M`, `1073741824`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("size {s:?}: unknown unit {c:?} (K, M, G, T)"),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("size {s:?} is not a number with an optional K/M/G/T"))?;
    let v = n.saturating_mul(mult);
    if v < 64 * MIB || v % MIB != 0 {
        bail!("size {s:?}: use whole MiB, at least 64M");
    }
    Ok(v)
}

/// Deterministic random-looking bytes (incompressible), fast.
fn fill_random(buf: &mut [u8], seed: &mut u64) {
    for c in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// A dense image: random bytes everywhere.
fn make_dense(path: &Path, size: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(
        4 << 20,
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
    let mut buf = vec![0u8; 4 << 20];
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill_random(&mut buf[..n], &mut seed);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// A sparse image: a quarter of random data in extents spread over the disk (a 1 MiB head,
/// then extents of 1 to 31 MiB at varied gaps), zeros elsewhere, as a sparse file.
fn make_sparse(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)?;
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut buf = vec![0u8; 32 << 20];
    let target = size / 4;
    let mut written = 0u64;
    fill_random(&mut buf[..MIB as usize], &mut seed);
    f.write_all_at(&buf[..MIB as usize], 0)?;
    written += MIB;
    // Spread: one extent per 64 MiB window on average, sized so the total is a quarter.
    let windows = (size / (64 * MIB)).max(1);
    let per = (target - MIB) / windows;
    for w in 0..windows {
        let start = w * 64 * MIB + MIB + (w * 7 % 16) * MIB;
        let len = per.min(size.saturating_sub(start)).min(buf.len() as u64);
        if len == 0 || written >= target {
            break;
        }
        fill_random(&mut buf[..len as usize], &mut seed);
        f.write_all_at(&buf[..len as usize], start)?;
        written += len;
    }
    f.sync_all()?;
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let out = cmd::output("sha256sum", &[&path.display().to_string()], &[])?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// name, Slipway's arguments, the reference (program, arguments), the goal ratio, a note.
type Spec = (
    &'static str,
    Vec<String>,
    (PathBuf, Vec<String>),
    Option<f64>,
    String,
);

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = cmd::output("losetup", &["-d", &self.0], &[]);
    }
}

/// Removes the work directory (GiBs of images) however the bench ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sh(script: &str) -> (PathBuf, Vec<String>) {
    (
        PathBuf::from("/bin/bash"),
        vec!["-c".to_string(), script.to_string()],
    )
}

fn time(program: &Path, args: &[String]) -> anyhow::Result<Measure> {
    let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    measure(program, &a, &[("RUST_LOG", OsStr::new("warn"))])
}

pub fn bench(ctx: &Ctx) -> anyhow::Result<Vec<Case>> {
    if !crate::deps::is_root() {
        bail!("the image benchmark needs root for its loop device; run it as root");
    }
    crate::deps::ensure(crate::deps::TEST_TOOLS)?;
    let size = parse_size(ctx.size.as_deref().unwrap_or("4G"))?;
    let root = ctx.root;
    let super::Bins { slipway, agent } = super::release_bins(root, "image")?;

    let work = root.join("target/bench/image-work");
    let _ = std::fs::remove_dir_all(&work);
    let images = work.join("images");
    std::fs::create_dir_all(&images)?;
    std::fs::create_dir_all(work.join("hosts"))?;
    let _cleanup = Cleanup(work.clone());
    let gib = size as f64 / (1u64 << 30) as f64;

    eprintln!(
        "bench image: making {gib:.2} GiB images in {}",
        work.display()
    );
    let dense = images.join("dense.raw");
    let sparse = images.join("sparse.raw");
    let qcow2 = images.join("sparse.qcow2");
    let zst = images.join("sparse.raw.zst");
    make_dense(&dense, size)?;
    make_sparse(&sparse, size)?;
    cmd::output(
        "qemu-img",
        &["convert", "-O", "qcow2", &p(&sparse), &p(&qcow2)],
        &[],
    )?;
    cmd::output(
        "zstd",
        &["-q", "-f", "-3", "-T2", &p(&sparse), "-o", &p(&zst)],
        &[],
    )?;
    let sums: Vec<String> = [&dense, &sparse, &qcow2, &zst]
        .iter()
        .map(|f| sha256_file(f))
        .collect::<anyhow::Result<_>>()?;

    // The coordinator's HTTP server on a free port.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let grpc = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let http = format!("127.0.0.1:{port}");
    let state = work.join("state");
    let serve_args: Vec<String> = vec![
        "--state".into(),
        p(&state),
        "serve".into(),
        "--hosts".into(),
        p(&work.join("hosts")),
        "--images".into(),
        p(&images),
        "--listen".into(),
        format!("127.0.0.1:{grpc}"),
        "--http-listen".into(),
        http.clone(),
    ];
    let a: Vec<&OsStr> = serve_args.iter().map(OsStr::new).collect();
    let coordinator = Child(cmd::spawn(
        &slipway,
        &a,
        &[("RUST_LOG", OsStr::new("warn"))],
        &work.join("coordinator.log"),
    )?);
    let coordinator_pid = coordinator.0.id();
    let start = Instant::now();
    while cmd::output("curl", &["-sf", &format!("http://{http}/healthz")], &[]).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "the coordinator did not serve http://{http}/healthz within 30 s; see {}",
                work.join("coordinator.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let url = |f: &Path| {
        format!(
            "http://{http}/images/{}",
            f.file_name().unwrap_or_default().to_string_lossy()
        )
    };

    // The loop device over a sparse file, a little larger than the images. It passes writes
    // to its backing file with direct I/O, as a disk takes them: a buffered loop device
    // copies every byte into the page cache in a kernel worker, which on this 2-core machine
    // competes with the pipeline for CPU (a dd from a local file hardly notices; see
    // ARCHITECTURE.md). SLIPWAY_BENCH_LOOP=buffered measures that setup instead.
    let buffered = std::env::var("SLIPWAY_BENCH_LOOP").is_ok_and(|v| v == "buffered");
    let backing = work.join("disk.img");
    std::fs::File::create(&backing)?.set_len(size + 64 * MIB)?;
    let dio = if buffered {
        "--direct-io=off"
    } else {
        "--direct-io=on"
    };
    let dev = Loop(
        cmd::output("losetup", &["--find", "--show", dio, &p(&backing)], &[])?
            .trim()
            .to_string(),
    );
    let loop_kind = if buffered {
        "buffered loop device"
    } else {
        "loop device with direct I/O to its backing file"
    };
    let discard = || cmd::output("blkdiscard", &["-f", &dev.0], &[]).map(|_| ());

    let agent_cmd = |image: &Path, sum: &str, format: &str| -> Vec<String> {
        vec![
            "write-image".into(),
            url(image),
            dev.0.clone(),
            "--checksum".into(),
            sum.into(),
            "--format".into(),
            format.into(),
        ]
    };
    let dd = |image: &Path| {
        sh(&format!(
            "dd if={} of={} bs=4M oflag=direct conv=fsync status=none",
            p(image),
            dev.0
        ))
    };
    let download_convert = sh(&format!(
        "curl -sf {} -o {tmp} && qemu-img convert -n -t none -f qcow2 -O raw {tmp} {dev} && sync {dev}; rc=$?; rm -f {tmp}; exit $rc",
        url(&qcow2),
        tmp = p(&work.join("download.qcow2")),
        dev = dev.0
    ));
    let curl_zstd = sh(&format!(
        "set -o pipefail; curl -sf {} | zstd -d -q | dd of={} bs=4M iflag=fullblock oflag=direct conv=fsync status=none",
        url(&zst),
        dev.0
    ));

    let specs: Vec<Spec> = vec![
        (
            "raw_dense_sha256_vs_dd",
            agent_cmd(&dense, &sums[0], "raw"),
            dd(&dense),
            Some(0.9),
            format!("{gib:.2} GiB of random data"),
        ),
        (
            "raw_sparse_sha256_vs_dd",
            agent_cmd(&sparse, &sums[1], "raw"),
            dd(&sparse),
            Some(1.2),
            format!("{gib:.2} GiB, a quarter random data in spread extents, zeros elsewhere"),
        ),
        (
            "qcow2_vs_download_qemu_img",
            agent_cmd(&qcow2, &sums[2], "qcow2"),
            download_convert,
            Some(1.5),
            format!(
                "the sparse image as qcow2 ({} MiB file); the reference verifies nothing",
                std::fs::metadata(&qcow2)?.len() / MIB
            ),
        ),
        (
            "zstd_vs_curl_zstd_dd",
            agent_cmd(&zst, &sums[3], "raw"),
            curl_zstd,
            None,
            format!(
                "the sparse image, zstd -3 ({} MiB file); the reference verifies nothing",
                std::fs::metadata(&zst)?.len() / MIB
            ),
        ),
    ];

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cases = Vec::new();
    for (name, args, (ref_prog, ref_args), goal, note) in specs {
        eprintln!("bench image: {name}");
        // Warm-up: page cache, connection setup, and a check that both commands work.
        discard()?;
        time(&agent, &args)?;
        discard()?;
        time(&ref_prog, &ref_args)?;
        // Where the CPU went in Slipway's runs: the agent, the coordinator serving the image,
        // and the whole machine (the loop device's kernel workers included).
        let (mut coord_cpu, mut busy) = (Vec::new(), Vec::new());
        let (s, r) = super::repeat_paired(
            ctx.runs,
            || {
                discard()?;
                let (c0, b0) = (
                    super::process_cpu_s(coordinator_pid),
                    super::machine_busy_s(),
                );
                let m = time(&agent, &args)?;
                coord_cpu.push(super::process_cpu_s(coordinator_pid) - c0);
                busy.push(super::machine_busy_s() - b0);
                Ok(m)
            },
            || {
                discard()?;
                time(&ref_prog, &ref_args)
            },
        )?;
        let (coord_cpu, busy) = (super::median(&mut coord_cpu), super::median(&mut busy));
        cases.push(Case {
            name: name.to_string(),
            slipway_s: s.seconds,
            reference_s: Some(r.seconds),
            command: format!("slipway-agent {}", args.join(" ")),
            reference: ref_args.last().cloned().unwrap_or_default(),
            peak_rss_mib: s.peak_rss_mib,
            goal_ratio: goal,
            runs: ctx.runs,
            note: format!(
                "{note}; {loop_kind}; {:.0} MiB/s of image vs {:.0} MiB/s; reference peak RSS {:.1} MiB; \
                 CPU seconds per Slipway run: agent {:.2}, coordinator {:.2}, whole machine \
                 {busy:.2} ({:.2} of {cores} cores busy on average); reference run: {:.2} \
                 CPU-s in its own process",
                size as f64 / MIB as f64 / s.seconds,
                size as f64 / MIB as f64 / r.seconds,
                r.peak_rss_mib,
                s.cpu_s,
                coord_cpu,
                busy / s.seconds,
                r.cpu_s
            ),
        });
    }

    // How close the dense write comes to hashing alone: sha256 of the local file (page
    // cache) on one core, against the dense case's own runs above. `openssl dgst` uses the
    // CPU's SHA extensions, as the agent does: the floor for any verified write of the
    // file. coreutils' `sha256sum` is what a script would use.
    let hashers = [
        (
            "raw_dense_sha256_vs_openssl_dgst",
            format!("openssl dgst -sha256 {} >/dev/null", p(&dense)),
            "reading it from the page cache as it goes",
        ),
        (
            "raw_dense_sha256_vs_sha256sum",
            format!("sha256sum {} >/dev/null", p(&dense)),
            "coreutils, without the CPU's SHA extensions",
        ),
    ];
    for (name, script, what) in hashers {
        eprintln!("bench image: {name}");
        let hash = sh(&script);
        time(&hash.0, &hash.1)?;
        let r = repeat(ctx.runs, || time(&hash.0, &hash.1))?;
        if let Some(dense_case) = cases.first() {
            let c = Case {
                name: name.into(),
                reference_s: Some(r.seconds),
                reference: script.clone(),
                goal_ratio: None,
                note: format!(
                    "Slipway's figure is raw_dense_sha256_vs_dd's (the same runs); the reference \
                     only hashes the local {gib:.2} GiB file on one core, {what} ({:.0} MiB/s)",
                    size as f64 / MIB as f64 / r.seconds
                ),
                ..dense_case.clone()
            };
            cases.push(c);
        }
    }
    // The raw cases hash every byte of the image, zeros included: the ratio no sha256-verified
    // write could exceed in this run is the reference's time over the time to hash the image
    // in memory on one core, at the rate `openssl speed` measures now (SHA extensions).
    eprintln!("bench image: sha256 rate (openssl speed)");
    let mut rates = Vec::new();
    for _ in 0..3 {
        rates.push(sha256_rate()?);
    }
    let rate = super::median(&mut rates);
    let floor = size as f64 / rate;
    for c in cases.iter_mut().filter(|c| {
        ["raw_dense_sha256_vs_dd", "raw_sparse_sha256_vs_dd"].contains(&c.name.as_str())
    }) {
        if let Some(r) = c.reference_s {
            c.note.push_str(&ceiling_note(r, floor, rate));
        }
    }
    Ok(cases)
}

/// sha256 bytes per second in memory on one core, 1 MiB blocks: `openssl speed` for 1 s.
fn sha256_rate() -> anyhow::Result<f64> {
    let args = [
        "speed", "-evp", "sha256", "-bytes", "1048576", "-seconds", "1",
    ];
    let out = cmd::output("openssl", &args, &[])?;
    parse_openssl_speed(&out)
        .with_context(|| format!("no sha256 rate in the output of openssl speed: {out:?}"))
}

/// The rate on `openssl speed`'s result line (`sha256  1814560.77k`: thousands of bytes/s).
fn parse_openssl_speed(out: &str) -> Option<f64> {
    let line = out.lines().rev().find(|l| l.starts_with("sha256"))?;
    let field = line.split_whitespace().last()?;
    let k: f64 = field.strip_suffix('k')?.parse().ok()?;
    (k > 0.0).then_some(k * 1000.0)
}

/// What hashing alone allows a verified write against a reference of `reference_s` seconds.
fn ceiling_note(reference_s: f64, floor_s: f64, rate: f64) -> String {
    format!(
        "; hashing the image in memory takes {floor_s:.2} s on one core (sha256 at {:.0} MB/s, \
         openssl speed, this run), so no sha256-verified write can exceed {:.2}x here",
        rate / 1e6,
        reference_s / floor_s
    )
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("134217728").unwrap(), 128 << 20);
        assert!(parse_size("1K").is_err());
        assert!(parse_size("4X").is_err());
        assert!(parse_size("G").is_err());
    }

    #[test]
    fn ceiling_is_the_reference_over_hashing_alone() {
        let n = ceiling_note(2.87, 2.39, 1.8e9);
        assert!(
            n.contains("takes 2.39 s") && n.contains("exceed 1.20x"),
            "{n}"
        );
    }

    #[test]
    fn openssl_speed_output_parses() {
        let out = "version: 3.0.22\nThe 'numbers' are in 1000s of bytes per second processed.\ntype        1048576 bytes\nsha256         1814036.48k";
        assert_eq!(parse_openssl_speed(out), Some(1_814_036_480.0));
        assert_eq!(parse_openssl_speed("type 16 bytes\n"), None);
        assert_eq!(parse_openssl_speed("sha256 0.00k\n"), None);
    }

    #[test]
    fn sparse_image_is_a_quarter_data() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("s.raw");
        make_sparse(&f, 256 * MIB).unwrap();
        let data = std::fs::read(&f).unwrap();
        let nonzero = data
            .chunks(4096)
            .filter(|c| c.iter().any(|b| *b != 0))
            .count() as u64;
        let quarter = 256 * MIB / 4096 / 4;
        assert!(
            nonzero > quarter * 9 / 10 && nonzero <= quarter + 1,
            "{nonzero} of {quarter}"
        );
    }
}
