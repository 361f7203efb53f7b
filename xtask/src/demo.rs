//! `cargo xtask demo`: Slipway's main job on its embedded default.
//!
//! Installs what it needs, builds the ramdisk and a small bootable OS image, starts a
//! coordinator in files mode on `examples/hosts`, and boots two QEMU virtual machines (TCG)
//! that PXE-boot the Slipway ramdisk through QEMU's user-mode network. Each is inspected,
//! cleaned, provisioned with the image and rebooted into its disk, which prints a marker and
//! powers off. The host table is printed as it changes, and a summary at the end.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};
use slipway_tests::vm::{self, Bus, Net, Spec, Vm};

use crate::{cmd, ramdisk, testimage};

/// The marker the test OS prints once booted from its disk.
const MARKER: &str = "SLIPWAY-TEST-OS booted";
/// Placeholder in examples/hosts for the image's digest (the image is built here, from
/// Debian's current kernel, so its digest changes with Debian's updates).
const SHA_PLACEHOLDER: &str = "${TEST_OS_SHA256}";
/// Milestones shown in the summary, in order: (serial line, column).
const MILESTONES: &[(&str, &str)] = &[
    ("SLIPWAY-EVENT registered", "REGISTERED"),
    ("SLIPWAY-EVENT inspected", "INSPECTED"),
    ("SLIPWAY-EVENT image-written", "WRITTEN"),
    (MARKER, "OS BOOTED"),
];

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = cmd::output("kill", &["-TERM", &self.0.id().to_string()], &[]);
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let out = ramdisk::build(root)?;
    let image_path = testimage::build(root)?;
    eprintln!("xtask demo: building slipway");
    cmd::run(
        "cargo",
        &[
            "build",
            "--quiet",
            "-p",
            "slipway-coordinator",
            "--bin",
            "slipway",
        ],
        Some(root),
    )?;
    let slipway = root.join("target/debug/slipway");

    let work = root.join("target/demo");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clean {}", work.display()))?;
    }
    let (state, images, hosts) = (work.join("state"), work.join("images"), work.join("hosts"));
    for d in [&images, &hosts] {
        fs::create_dir_all(d)?;
    }
    let image = fs::read(&image_path)?;
    let sum = hex::encode(Sha256::digest(&image));
    fs::write(images.join("test-os.img"), &image)?;
    let mut names = Vec::new();
    let mut macs = Vec::new();
    for e in fs::read_dir(root.join("examples/hosts"))? {
        let path = e?.path();
        let text = fs::read_to_string(&path)?;
        fs::write(
            hosts.join(path.file_name().context("file name")?),
            text.replace(SHA_PLACEHOLDER, &sum),
        )?;
        if text.contains("kind: BareMetalHost") {
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.trim().strip_prefix(key))
                    .map(|v| v.trim().trim_matches('"').to_string())
            };
            names.push(field("name: ").context("a host without metadata.name")?);
            macs.push(field("bootMACAddress: ").context("a host without bootMACAddress")?);
        }
    }
    eprintln!("xtask demo: hosts {} from examples/hosts", names.join(", "));

    let env: [(&str, &OsStr); 2] = [
        ("SLIPWAY_STATE", state.as_os_str()),
        ("RUST_LOG", OsStr::new("info")),
    ];
    let args: Vec<String> = [
        "serve",
        "--hosts",
        &hosts.display().to_string(),
        "--images",
        &images.display().to_string(),
        "--boot-dir",
        &out.dir.display().to_string(),
        "--listen",
        "127.0.0.1:9443",
        "--http-listen",
        "127.0.0.1:8080",
        "--advertise",
        "10.0.2.2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    let _coordinator = Child(cmd::spawn(
        &slipway,
        &args,
        &env,
        &work.join("coordinator.log"),
    )?);
    let sw = |a: &[&str]| cmd::output(&slipway.display().to_string(), a, &env);
    wait(Duration::from_secs(20), "the coordinator", || {
        Ok(sw(&["info"]).is_ok())
    })
    .with_context(|| tail(&work.join("coordinator.log")))?;
    wait(Duration::from_secs(20), "the hosts to register", || {
        let v: Value = serde_json::from_str(&sw(&["get", "hosts", "-o", "json"])?)?;
        Ok(v["items"].as_array().map_or(0, Vec::len) >= names.len())
    })?;

    // Two machines, PXE first (the ramdisk), then their disk.
    let mut vms = Vec::new();
    for (name, mac) in names.iter().zip(&macs) {
        let disk = work.join(format!("{name}.raw"));
        vm::sparse_disk(&disk, 8 << 30);
        vms.push(Vm::start(
            Spec {
                name,
                cpus: 1,
                mem_mib: 1024,
                nic: "virtio-net-pci",
                mac,
                net: Net::User {
                    bootfile: Some("http://10.0.2.2:8080/boot/boot.ipxe".into()),
                },
                disk: Some((&disk, Bus::Virtio, &format!("demo-{name}"))),
                cdrom: None,
                boot_cdrom: false,
                uefi: false,
                bmc: None,
                netns: None,
            },
            &work,
        ));
    }
    eprintln!(
        "xtask demo: {} VMs started (QEMU TCG); consoles in {}",
        vms.len(),
        work.display()
    );

    let mut seen: Vec<Vec<Option<f64>>> = vec![vec![None; MILESTONES.len()]; vms.len()];
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        for (i, vm) in vms.iter().enumerate() {
            let console = vm.serial_text();
            for (j, (needle, _)) in MILESTONES.iter().enumerate() {
                if seen[i][j].is_none() && console.contains(needle) {
                    seen[i][j] = Some(vm.started.elapsed().as_secs_f64());
                }
            }
        }
        let table = sw(&["get", "hosts"])?;
        let shape: String = table
            .lines()
            .map(|l| l.rsplit_once("   ").map_or(l, |(a, _)| a))
            .collect();
        if shape != last {
            println!("{table}");
            last = shape;
        }
        let v: Value = serde_json::from_str(&sw(&["get", "hosts", "-o", "json"])?)?;
        if let Some(bad) = v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h["status"]["errorType"].is_string())
        {
            bail!(
                "host {} failed: {}: {}",
                bad["metadata"]["name"],
                bad["status"]["errorType"],
                bad["status"]["errorMessage"]
            );
        }
        if seen.iter().all(|s| s.iter().all(Option::is_some)) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the VMs did not all boot their installed OS within 10 minutes; consoles and logs in {}",
                work.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for vm in &mut vms {
        vm.wait_exit(Duration::from_secs(60));
    }

    let manifest: Value = serde_json::from_slice(&fs::read(&out.manifest)?)?;
    let mib = |k: &str| manifest[k].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
    println!("\nseconds since each VM started (QEMU TCG, software emulation):");
    print!("{:<10}", "HOST");
    for (_, col) in MILESTONES {
        print!(" {col:>11}");
    }
    println!();
    for (name, s) in names.iter().zip(&seen) {
        print!("{name:<10}");
        for t in s {
            print!(" {:>11}", t.map_or("-".into(), |t| format!("{t:.1}")));
        }
        println!();
    }
    println!(
        "\nramdisk: kernel {:.1} MiB + initramfs {:.1} MiB (agent {:.1} MiB, {} modules); image {:.0} MiB; all done in {:.0}s.\nLogs, consoles and state: {}",
        mib("kernel_bytes"),
        mib("initramfs_bytes"),
        mib("agent_bytes"),
        manifest["modules"],
        image.len() as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64(),
        work.display()
    );
    Ok(())
}

fn wait(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(true) = f() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "last lines of {}:\n{}",
        path.display(),
        lines[lines.len().saturating_sub(30)..].join("\n")
    )
}
