//! System packages the tests and the demo need, installed when missing (as root, with apt-get).

use anyhow::bail;

use crate::cmd;

/// (program that must exist, Debian package that provides it)
pub const TEST_TOOLS: &[(&str, &str)] = &[
    ("losetup", "mount"),
    ("sha256sum", "coreutils"),
    ("ip", "iproute2"),
    ("lsblk", "util-linux"),
    // Cleaning and config-drive tests: real signatures, tables and readers.
    ("wipefs", "util-linux"),
    ("blkid", "util-linux"),
    ("mkswap", "util-linux"),
    ("sgdisk", "gdisk"),
    ("sfdisk", "fdisk"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mkfs.xfs", "xfsprogs"),
    ("mkfs.vfat", "dosfstools"),
    ("fsck.vfat", "dosfstools"),
    ("mdadm", "mdadm"),
    ("pvcreate", "lvm2"),
    ("zfs-fuse", "zfs-fuse"),
    ("zpool", "zfs-fuse"),
    ("mcopy", "mtools"),
    ("cloud-init", "cloud-init"),
    // Image pipeline tests and bench: test images and their references.
    ("blkdiscard", "util-linux"),
    ("qemu-img", "qemu-utils"),
    ("gzip", "gzip"),
    ("zstd", "zstd"),
    ("xz", "xz-utils"),
    ("curl", "curl"),
    // The https image tests' CA and server (openssl makes the certificates, Python's
    // http.server serves over TLS); the image bench's hashing floor.
    ("openssl", "openssl"),
    ("python3", "python3"),
];

/// What the VM tests and the demo need: QEMU (its iPXE NIC ROMs come with ipxe-qemu), dnsmasq,
/// iproute2 for network namespaces.
pub const VM_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("dnsmasq", "dnsmasq-base"),
    ("ip", "iproute2"),
];
/// What only the VM tests need: OpenIPMI's BMC simulator, one VM's IPMI BMC.
pub const VM_TEST_TOOLS: &[(&str, &str)] = &[("ipmi_sim", "openipmi")];
/// QEMU's NIC boot ROMs (iPXE), iPXE for real PXE ROMs (undionly.kpxe, ipxe.efi), and OVMF
/// (UEFI firmware) for the UEFI ISO test.
pub const VM_PACKAGES: &[&str] = &["ipxe-qemu", "ipxe", "ovmf"];

/// Installs the packages of any missing tool.
pub fn ensure(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(prog, _)| !cmd::have(prog) && !in_sbin(prog))
        .map(|(_, pkg)| *pkg)
        .collect();
    install(&missing)
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

/// Installs Debian packages that are not installed (no program to look for).
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|p| {
            !cmd::output("dpkg-query", &["-W", "-f=${Status}", p], &[])
                .is_ok_and(|s| s.contains("install ok installed"))
        })
        .copied()
        .collect();
    install(&missing)
}

/// `apt-get install` of `missing` (nothing when empty); as root only, else an error that
/// gives the command.
fn install(missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing packages; install them with: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    cmd::run("apt-get", &["update", "-q"], None)?;
    let mut args = vec!["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q"];
    args.extend(missing);
    // A machine image may carry qemu-utils from bookworm-backports, which Breaks bookworm's
    // qemu-system-common: bookworm's qemu-utils comes with it.
    if missing.contains(&"qemu-system-x86") && backports_qemu_utils() {
        args.extend(["--allow-downgrades", "qemu-utils/bookworm"]);
    }
    cmd::run("apt-get", &args, None)
}

/// Whether the installed qemu-utils is a backport (`~bpo`).
fn backports_qemu_utils() -> bool {
    cmd::output("dpkg-query", &["-W", "-f=${Version}", "qemu-utils"], &[])
        .is_ok_and(|v| v.contains("bpo"))
}
