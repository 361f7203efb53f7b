//! System packages the tests and the demo need, installed when missing (as root, with apt-get).

use anyhow::bail;

use crate::cmd;

/// (program that must exist, Debian package that provides it)
pub const TEST_TOOLS: &[(&str, &str)] = &[
    ("losetup", "mount"),
    ("blkdiscard", "util-linux"),
    ("sha256sum", "coreutils"),
    ("qemu-img", "qemu-utils"),
    ("gzip", "gzip"),
    ("zstd", "zstd"),
    ("xz", "xz-utils"),
    ("curl", "curl"),
];

/// Installs the packages of any missing tool.
pub fn ensure(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(prog, _)| !cmd::have(prog) && !in_sbin(prog))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing tools; install them with: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    cmd::run("apt-get", &["update", "-q"], None)?;
    let mut args = vec!["install", "-y", "-q"];
    args.extend(missing);
    cmd::run("apt-get", &args, None)
}

fn in_sbin(prog: &str) -> bool {
    ["/usr/sbin", "/sbin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(prog).is_file())
}

pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}
