//! `cargo xtask demo`: Slipway's main job on its embedded default. A coordinator in files mode
//! on `examples/hosts`, and one agent per host against a sparse file-backed disk, take each
//! host from its YAML document to `provisioned`; the host table is printed as it changes, and
//! a summary at the end.
//!
//! (Booting real virtual machines over PXE replaces the agents-as-processes once the ramdisk
//! exists.)

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::cmd;

/// The demo image: 48 MiB, deterministic, so the example hosts can carry its checksum.
pub const IMAGE_NAME: &str = "demo-os.img";
pub const IMAGE_LEN: usize = 48 << 20;
/// sha256 of [`demo_image`]; the example host documents carry it.
pub const IMAGE_SHA256: &str = "2b7444c40af6bb5e72968b8da4e2a06517d7e0e96fd93c78e489b6a90b1c8aa5";

/// Bytes of the demo image: a boot-sector-like marker and a pseudo-random body.
pub fn demo_image() -> Vec<u8> {
    let mut x: u64 = 0x5eed_5eed_5eed_5eed;
    let mut out = Vec::with_capacity(IMAGE_LEN);
    while out.len() < IMAGE_LEN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    let marker = b"SLIPWAY DEMO OS\n";
    out[..marker.len()].copy_from_slice(marker);
    out[510] = 0x55;
    out[511] = 0xaa;
    out
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        // SIGTERM first (the coordinator removes its socket), then make sure.
        let _ = cmd::output("kill", &["-TERM", &self.0.id().to_string()], &[]);
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("xtask demo: building slipway and slipway-agent");
    cmd::run(
        "cargo",
        &[
            "build",
            "--quiet",
            "-p",
            "slipway-coordinator",
            "-p",
            "slipway-agent",
            "--bins",
        ],
        Some(root),
    )?;
    let bin = root.join("target/debug");
    let slipway = bin.join("slipway");
    let agent = bin.join("slipway-agent");

    let work = root.join("target/demo");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clean {}", work.display()))?;
    }
    let (state, images) = (work.join("state"), work.join("images"));
    fs::create_dir_all(&images)?;
    let image = demo_image();
    let sum = hex::encode(Sha256::digest(&image));
    if sum != IMAGE_SHA256 {
        bail!(
            "the demo image's sha256 is {sum}, but examples/hosts says {IMAGE_SHA256}; update both"
        );
    }
    fs::write(images.join(IMAGE_NAME), &image)?;

    let hosts_dir = root.join("examples/hosts");
    let hosts: Vec<String> = host_names(&hosts_dir)?;
    eprintln!(
        "xtask demo: hosts in {}: {}",
        hosts_dir.display(),
        hosts.join(", ")
    );

    let env: [(&str, &OsStr); 2] = [
        ("SLIPWAY_STATE", state.as_os_str()),
        ("RUST_LOG", OsStr::new("info")),
    ];
    let serve_args: Vec<&OsStr> = vec![
        OsStr::new("serve"),
        OsStr::new("--hosts"),
        hosts_dir.as_os_str(),
        OsStr::new("--images"),
        images.as_os_str(),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:9443"),
        OsStr::new("--http-listen"),
        OsStr::new("127.0.0.1:8080"),
    ];
    let coordinator = Child(cmd::spawn(
        &slipway,
        &serve_args,
        &env,
        &work.join("coordinator.log"),
    )?);
    let sw = |args: &[&str]| cmd::output(&slipway.display().to_string(), args, &env);
    wait(Duration::from_secs(20), "the coordinator to start", || {
        Ok(sw(&["info"]).is_ok())
    })
    .with_context(|| log_tail(&work.join("coordinator.log")))?;
    let info: Value = serde_json::from_str(&sw(&["info", "-o", "json"])?)?;
    eprintln!(
        "xtask demo: coordinator up; agents dial {}, CA {}",
        info["agentUrl"].as_str().unwrap_or("?"),
        info["caFingerprint"].as_str().unwrap_or("?")
    );
    wait(
        Duration::from_secs(20),
        "the hosts to be registered",
        || {
            let list: Value = serde_json::from_str(&sw(&["get", "hosts", "-o", "json"])?)?;
            Ok(list["items"].as_array().map_or(0, Vec::len) == hosts.len())
        },
    )?;

    // One agent per host, each managing only its own sparse 8 GiB disk file.
    let mut agents = Vec::new();
    for name in &hosts {
        let disk = work.join(format!("{name}.disk"));
        fs::File::create(&disk)?.set_len(8 << 30)?;
        let token: Value = serde_json::from_str(&sw(&["token", "create", name, "-o", "json"])?)?;
        let token = token["token"].as_str().unwrap_or_default().to_string();
        let fingerprint = info["caFingerprint"].as_str().unwrap_or_default();
        let agent_state: PathBuf = work.join(format!("agent-{name}"));
        let args: Vec<&OsStr> = vec![
            OsStr::new("run"),
            OsStr::new("--coordinator"),
            OsStr::new(info["agentUrl"].as_str().unwrap_or_default()),
            OsStr::new("--ca-fingerprint"),
            OsStr::new(fingerprint),
            OsStr::new("--state-dir"),
            agent_state.as_os_str(),
            OsStr::new("--disk"),
            disk.as_os_str(),
        ];
        let token_env: [(&str, &OsStr); 1] = [("SLIPWAY_TOKEN", OsStr::new(&token))];
        agents.push(Child(cmd::spawn(
            &agent,
            &args,
            &token_env,
            &work.join(format!("agent-{name}.log")),
        )?));
    }

    // Print the table whenever it changes, until every host is provisioned.
    let mut last = String::new();
    wait(
        Duration::from_secs(120),
        "every host to be provisioned",
        || {
            let table = sw(&["get", "hosts"])?;
            let shape: String = table
                .lines()
                .map(|l| l.rsplit_once("   ").map_or(l, |(a, _)| a))
                .collect();
            if shape != last {
                println!("{table}");
                last = shape;
            }
            let list: Value = serde_json::from_str(&sw(&["get", "hosts", "-o", "json"])?)?;
            let items = list["items"].as_array().cloned().unwrap_or_default();
            if let Some(err) = items.iter().find(|h| h["status"]["errorType"].is_string()) {
                bail!(
                    "host {} failed: {}: {}",
                    err["metadata"]["name"],
                    err["status"]["errorType"],
                    err["status"]["errorMessage"]
                );
            }
            Ok(items
                .iter()
                .all(|h| h["status"]["provisioning"]["state"] == "provisioned"))
        },
    )
    .with_context(|| log_tail(&work.join("coordinator.log")))?;

    // Check every disk, then summarise.
    let list: Value = serde_json::from_str(&sw(&["get", "hosts", "-o", "json"])?)?;
    println!(
        "{:<10} {:>10} {:>10} {:>12}   DISK CHECK",
        "HOST", "REGISTER", "INSPECT", "PROVISION"
    );
    for h in list["items"].as_array().cloned().unwrap_or_default() {
        let name = h["metadata"]["name"].as_str().unwrap_or_default();
        let disk = work.join(format!("{name}.disk"));
        let mut head = vec![0u8; image.len()];
        std::io::Read::read_exact(&mut fs::File::open(&disk)?, &mut head)?;
        let ok = head == image;
        let hist = &h["status"]["operationHistory"];
        println!(
            "{name:<10} {:>10} {:>10} {:>12}   {}",
            took(&hist["register"]),
            took(&hist["inspect"]),
            took(&hist["provision"]),
            if ok {
                "image verified on disk"
            } else {
                "MISMATCH"
            }
        );
        if !ok {
            bail!("{} does not hold the image", disk.display());
        }
    }
    println!(
        "\n{} hosts provisioned in {:.1}s (image {} MiB, sha256 {}...). Logs and state: {}",
        hosts.len(),
        started.elapsed().as_secs_f64(),
        image.len() >> 20,
        &sum[..16],
        work.display()
    );
    drop(agents);
    drop(coordinator);
    Ok(())
}

fn took(op: &Value) -> String {
    let (Some(s), Some(e)) = (op["start"].as_str(), op["end"].as_str()) else {
        return "-".into();
    };
    match (s.parse::<jiff::Timestamp>(), e.parse::<jiff::Timestamp>()) {
        (Ok(s), Ok(e)) => format!("{:.2}s", e.duration_since(s).as_secs_f64()),
        _ => "-".into(),
    }
}

fn host_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let text = fs::read_to_string(e?.path())?;
        for line in text.lines() {
            if let Some(n) = line.trim().strip_prefix("name: ")
                && text.contains("kind: BareMetalHost")
            {
                names.push(n.trim().to_string());
                break;
            }
        }
    }
    names.sort();
    Ok(names)
}

fn wait(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if start.elapsed() > timeout => {
                return Err(e.context(format!("waiting for {what}")));
            }
            Err(e) if e.to_string().contains("failed:") => return Err(e),
            Err(_) => {}
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "last lines of {}:\n{}",
        path.display(),
        lines[lines.len().saturating_sub(30)..].join("\n")
    )
}
