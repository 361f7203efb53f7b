//! `cargo xtask test-image`: a small bootable disk image to provision in the VM tests and the
//! demo. It boots (syslinux, BIOS) the ramdisk's Debian kernel with a tiny busybox initramfs
//! that prints `SLIPWAY-TEST-OS booted` and, when the disk carries a config drive, its
//! user-data, then powers off.
//!
//! Built without loop devices or mounts: sfdisk, mkfs.fat --offset, syslinux --offset,
//! the syslinux MBR, mcopy.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::cmd;
use crate::ramdisk::{CpioEntry, Outputs, cpio_newc};

pub const TOOLS: &[(&str, &str)] = &[
    ("sfdisk", "fdisk"),
    ("mkfs.fat", "dosfstools"),
    ("syslinux", "syslinux"),
    ("mcopy", "mtools"),
    ("busybox", "busybox-static"),
];
/// The syslinux MBR and modules come from syslinux-common.
pub const PACKAGES: &[&str] = &["syslinux-common"];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs dev /dev
echo "SLIPWAY-TEST-OS booted: $(/bin/busybox cat /proc/cmdline)"
/bin/busybox poweroff -f
"#;

const SYSLINUX_CFG: &str = "SERIAL 0 115200\nDEFAULT os\nPROMPT 0\nTIMEOUT 1\nLABEL os\n  LINUX /vmlinuz\n  INITRD /initrd\n  APPEND console=tty0 console=ttyS0,115200 panic=5\n";

pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let out = Outputs::new(root);
    if !out.kernel.exists() {
        anyhow::bail!(
            "{} is missing: run cargo xtask ramdisk first",
            out.kernel.display()
        );
    }
    let work = root.join("target/ramdisk/test-os");
    fs::create_dir_all(&work)?;
    let busybox = fs::read("/bin/busybox")
        .context("cannot read /bin/busybox (apt-get install -y busybox-static)")?;
    let initrd = cpio_newc(&[
        CpioEntry::dir("bin"),
        CpioEntry::file("bin/busybox", busybox, 0o755),
        CpioEntry::dir("dev"),
        CpioEntry::char_dev("dev/console", 5, 1, 0o600),
        CpioEntry::file("init", INIT.as_bytes().to_vec(), 0o755),
    ]);
    let initrd_path = work.join("initrd");
    fs::write(&initrd_path, zstd::encode_all(&initrd[..], 19)?)?;
    let cfg = work.join("syslinux.cfg");
    fs::write(&cfg, SYSLINUX_CFG)?;
    let kernel = work.join("vmlinuz");
    fs::copy(&out.kernel, &kernel)?;

    let img = out.dir.join("test-os.img");
    let size_mib = 48u64;
    let _ = fs::remove_file(&img);
    fs::File::create(&img)?.set_len(size_mib << 20)?;
    let imgs = img.display().to_string();
    let table = work.join("table.sfdisk");
    fs::write(&table, "label: dos\nstart=2048, type=6, bootable\n")?;
    cmd::run(
        "sh",
        &[
            "-c",
            &format!("sfdisk --quiet {imgs} < {}", table.display()),
        ],
        None,
    )?;
    let fat_kib = ((size_mib << 20) - (1 << 20)) / 1024;
    cmd::run(
        "mkfs.fat",
        &[
            "-F",
            "16",
            "-n",
            "TESTOS",
            "-i",
            "51195701",
            "--offset",
            "2048",
            &imgs,
            &fat_kib.to_string(),
        ],
        None,
    )?;
    cmd::run(
        "syslinux",
        &["--offset", &(2048 * 512).to_string(), "--install", &imgs],
        None,
    )?;
    let mbr = ["/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/SYSLINUX/mbr.bin"]
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no syslinux mbr.bin (apt-get install -y syslinux-common)")?;
    cmd::run(
        "dd",
        &[
            &format!("if={mbr}"),
            &format!("of={imgs}"),
            "bs=440",
            "count=1",
            "conv=notrunc",
            "status=none",
        ],
        None,
    )?;
    let target = format!("{imgs}@@1M");
    for f in [&kernel, &initrd_path, &cfg] {
        cmd::run(
            "mcopy",
            &["-i", &target, &f.display().to_string(), "::/"],
            None,
        )?;
    }
    println!("test OS image: {} ({size_mib} MiB)", img.display());
    Ok(img)
}
