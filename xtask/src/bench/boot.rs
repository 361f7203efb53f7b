//! `cargo xtask bench boot`: ramdisk sizes, and the time from VM start to `registered` and to
//! `inspected` over PXE (QEMU user-mode network), under TCG: software emulation, several times
//! slower than hardware; the figures say so.
//!
//! Sizes are compared with published sizes of other provisioning ramdisks (not measured here:
//! their images are not in any registry this machine reaches).

use std::fs;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use slipway_tests::vm::{self, Net, Spec, Vm};
use slipway_tests::{Coordinator, wait_until};

use super::{Case, Ctx, median};

/// Published compressed sizes, MiB: (name, total, what).
const OTHERS: &[(&str, f64, &str)] = &[
    (
        "Tinkerbell HookOS",
        180.0,
        "compressed initramfs + kernel, as published",
    ),
    (
        "Talos metal agent",
        116.0,
        "97 MB initramfs + 19 MB kernel, as published",
    ),
];

pub fn run(ctx: &Ctx) -> anyhow::Result<Vec<Case>> {
    let art = vm::artifacts();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(art.dir.join("manifest.json")).context("manifest.json")?)?;
    let total = manifest["total_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
    let sizes = json!({
        "kernel_mib": manifest["kernel_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        "initramfs_mib": manifest["initramfs_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        "agent_mib": manifest["agent_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        "total_mib": total,
        "modules": manifest["modules"],
        "others": OTHERS.iter().map(|(n, s, w)| json!({"name": n, "total_mib": s, "what": w, "ratio_vs_slipway": s / total.max(0.001)})).collect::<Vec<_>>(),
    });
    println!("ramdisk: {}", serde_json::to_string_pretty(&sizes)?);
    fs::create_dir_all(ctx.root.join("target/bench"))?;
    fs::write(
        ctx.root.join("target/bench/boot-sizes.json"),
        serde_json::to_string_pretty(&sizes)? + "\n",
    )?;

    let mut registered = Vec::new();
    let mut inspected = Vec::new();
    for run in 0..ctx.runs.max(1) {
        let (r, i) = one_boot(run)?;
        eprintln!("boot {run}: registered {r:.1}s, inspected {i:.1}s");
        registered.push(r);
        inspected.push(i);
    }
    let note = format!(
        "QEMU TCG (software emulation, no KVM), 1 vCPU, 1 GiB, virtio-net, PXE via user-mode network; kernel + initramfs {total:.1} MiB"
    );
    Ok(vec![
        Case {
            name: "pxe_tcg_start_to_registered".into(),
            slipway_s: median(&mut registered),
            reference_s: None,
            command: "qemu-system-x86_64 -accel tcg ... PXE -> iPXE -> ramdisk -> agent session"
                .into(),
            reference: "none measured here (goal: under 20 s under TCG on an idle machine)".into(),
            peak_rss_mib: 0.0,
            goal_ratio: None,
            runs: registered.len(),
            note: note.clone(),
        },
        Case {
            name: "pxe_tcg_start_to_inspected".into(),
            slipway_s: median(&mut inspected),
            reference_s: None,
            command: "as above, until the inspect command's result".into(),
            reference: "none measured here".into(),
            peak_rss_mib: 0.0,
            goal_ratio: None,
            runs: inspected.len(),
            note,
        },
    ])
}

/// One PXE boot of a declared host without an image, until it is inspected.
fn one_boot(run: usize) -> anyhow::Result<(f64, f64)> {
    let _one = vm::exclusive();
    let art = vm::artifacts();
    let dir = tempfile::tempdir()?;
    let boot_dir = art.dir.display().to_string();
    let c = Coordinator::start(
        dir.path(),
        &[
            "--advertise",
            "10.0.2.2",
            "--boot-dir",
            &boot_dir,
            "--unknown-hosts",
            "refuse",
        ],
    );
    let mac = format!("52:54:00:b0:00:{run:02x}");
    let yaml = format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: bench\nspec:\n  online: true\n  bootMACAddress: \"{mac}\"\n  automatedCleaningMode: disabled\n"
    );
    fs::write(c.hosts.join("bench.yaml"), yaml)?;
    wait_until(Duration::from_secs(10), "the host to register", || {
        c.host("bench")
    });
    let bootfile = format!("http://10.0.2.2:{}/boot/boot.ipxe", c.http_port);
    let mut vm = Vm::start(
        Spec {
            name: "bench",
            cpus: 1,
            mem_mib: 1024,
            nic: "virtio-net-pci",
            mac: &mac,
            net: Net::User {
                bootfile: Some(bootfile),
            },
            disk: None,
            cdrom: None,
            boot_cdrom: false,
            uefi: false,
            bmc: None,
            netns: None,
        },
        dir.path(),
    );
    let registered = vm
        .wait_serial("SLIPWAY-EVENT registered", Duration::from_secs(240))
        .as_secs_f64();
    vm.wait_serial("SLIPWAY-EVENT inspected", Duration::from_secs(120));
    // The console is polled every 200 ms, so both lines may be seen in one poll: the time
    // between them comes from the agent's own uptime stamps (`t=`) on the two lines.
    let text = vm.serial_text();
    if run == 0 {
        for l in text.lines().filter(|l| l.starts_with("SLIPWAY-EVENT")) {
            eprintln!("  {l}");
        }
    }
    let stamp = |event: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("SLIPWAY-EVENT {event} ")))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("t=")))
            .and_then(|t| t.parse::<f64>().ok())
            .with_context(|| format!("no t= on the {event} line of the console"))
    };
    let inspected = registered + (stamp("inspected")? - stamp("registered")?).max(0.0);
    Ok((registered, inspected))
}
