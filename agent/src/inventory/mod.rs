//! The machine's hardware, read from the kernel's own interfaces under a root path (`/` on a
//! real machine, a captured tree in tests). No external tools, no udev.
//!
//! One module per part, each a function of a [`Root`]:
//! - [`system`]: DMI ids and the SMBIOS table ([`smbios`]), boot mode, Secure Boot, hostname.
//! - [`cpu`], [`memory`] (incl. SMBIOS type 17 modules and NUMA nodes), [`disks`] (with
//!   udev-style by-path/by-id names computed from sysfs), [`nics`], [`pci`], [`bmc`].
//! - Live-only sources, each bounded and run in a thread beside everything else: [`lldp`] (a
//!   raw-socket listen) and [`ipmi`] (the BMC's LAN settings through `/dev/ipmi0`, asked only
//!   when that device exists).
//!
//! Every field is best effort: a missing, empty, non-UTF-8 or absurd value gives `None` (or an
//! empty list), never a panic or a failed inventory. [`capture`] records exactly the files the
//! collectors read into a directory, which then reads back as the same inventory: that is how
//! the fixtures under `agent/tests/fixtures/` are made.

pub mod bmc;
pub mod cpu;
pub mod disks;
pub mod ipmi;
pub mod lldp;
pub mod memory;
pub mod nics;
pub mod pci;
pub mod root;
pub mod smbios;
pub mod system;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use bmc::Bmc;
pub use cpu::Cpu;
pub use disks::{Disk, Partition};
pub use lldp::Neighbour;
pub use memory::{Dimm, Memory, NumaNode};
pub use nics::{Bond, Nic};
pub use pci::PciDevice;
pub use root::{CaptureError, Root};
pub use system::SystemInfo;

/// The SMBIOS table the kernel exposes.
const DMI_TABLE: &str = "sys/firmware/dmi/tables/DMI";

/// Everything the agent reports about the machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    pub system: SystemInfo,
    /// "UEFI" or "legacy".
    pub boot_mode: String,
    /// `None` on BIOS machines or when the EFI variables are not readable.
    pub secure_boot: Option<bool>,
    pub hostname: Option<String>,
    pub cpu: Cpu,
    pub memory: Memory,
    /// NUMA nodes with their CPUs and memory (one node on most small machines).
    pub numa_nodes: Vec<NumaNode>,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub pci_devices: Vec<PciDevice>,
    pub bmc: Option<Bmc>,
}

/// What to collect beyond the root path itself.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Disks given by the operator (loop devices, plain files). When any are given, they are the
    /// only disks: the machine's own disks are not listed, so they cannot be chosen.
    pub disks: Vec<PathBuf>,
    /// MAC of the interface the host booted from.
    pub boot_mac: Option<String>,
    /// How long to listen for LLDP frames (on the running machine only); zero: not at all.
    pub lldp: Duration,
}

impl Inventory {
    /// Collects the inventory of the machine whose `/sys`, `/proc` and `/dev` are under `root`.
    pub fn collect(root: &Path, opts: &Options) -> Inventory {
        collect_from(&Root::new(root), opts)
    }
}

/// Collects the inventory and copies every file it read into `dir`, so `dir` becomes a fixture
/// that reads back as the same inventory. Returns the inventory and the number of files.
pub fn capture(
    root: &Path,
    opts: &Options,
    dir: &Path,
) -> Result<(Inventory, usize), CaptureError> {
    let r = Root::recording(root);
    // Operator-named disks live outside the root and LLDP is not a file: neither is captured.
    let opts = Options {
        disks: Vec::new(),
        lldp: Duration::ZERO,
        ..opts.clone()
    };
    let inv = collect_from(&r, &opts);
    let files = r.write_capture(dir)?;
    Ok((inv, files))
}

/// Reads a small text file outside any root, trimmed; `None` when missing, unreadable, empty or
/// not UTF-8.
pub fn read(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    root::clean(std::str::from_utf8(&bytes).ok()?)
}

/// The interfaces worth listening on for LLDP: hardware whose link is not down.
fn lldp_interfaces(root: &Root) -> Vec<(String, i32)> {
    root.list("sys/class/net")
        .into_iter()
        .filter(|n| root.exists(format!("sys/class/net/{n}/device")))
        // `carrier` first: `operstate` lags the link by up to a second (the kernel's linkwatch
        // defers it), so an interface brought up just before the inventory still says "down".
        .filter(|n| {
            root.text(format!("sys/class/net/{n}/carrier")).as_deref() == Some("1")
                || root.text(format!("sys/class/net/{n}/operstate")).as_deref() != Some("down")
        })
        .filter_map(|n| {
            let index = root
                .u64(format!("sys/class/net/{n}/ifindex"))
                .and_then(|i| i32::try_from(i).ok())?;
            Some((n, index))
        })
        .collect()
}

pub fn collect_from(root: &Root, opts: &Options) -> Inventory {
    let listen = root.is_live() && !opts.lldp.is_zero();
    std::thread::scope(|s| {
        let lldp = listen.then(|| {
            let interfaces = lldp_interfaces(root);
            if interfaces.is_empty() {
                let seen: Vec<String> = root
                    .list("sys/class/net")
                    .into_iter()
                    .map(|n| {
                        let state = root.text(format!("sys/class/net/{n}/operstate"));
                        let carrier = root.text(format!("sys/class/net/{n}/carrier"));
                        let hw = root.exists(format!("sys/class/net/{n}/device"));
                        format!(
                            "{n} (operstate {}, carrier {}, {})",
                            state.as_deref().unwrap_or("?"),
                            carrier.as_deref().unwrap_or("?"),
                            if hw { "hardware" } else { "virtual" }
                        )
                    })
                    .collect();
                tracing::info!(
                    "no hardware interface with a link to listen for LLDP on: {}",
                    seen.join(", ")
                );
            }
            let wait = opts.lldp;
            s.spawn(move || lldp::listen(&interfaces, wait))
        });
        // The BMC answers over its own slow interface (KCS: milliseconds per request): ask it
        // while the rest is read. Only on the running machine, and only if the device exists.
        let ipmi_device = ipmi::device_path(root);
        let ipmi = ipmi_device
            .clone()
            .filter(|_| root.is_live())
            .map(|path| s.spawn(move || ipmi::query_device(&path, ipmi::BUDGET)));
        let table_bytes = root.bytes(DMI_TABLE).unwrap_or_default();
        let table = smbios::parse(&table_bytes);
        let mut inv = Inventory {
            system: system::collect(root, &table),
            boot_mode: system::boot_mode(root),
            secure_boot: system::secure_boot(root),
            hostname: system::hostname(root),
            cpu: cpu::collect(root),
            memory: memory::collect(root, &table),
            numa_nodes: memory::numa_nodes(root),
            disks: if opts.disks.is_empty() {
                disks::collect(root)
            } else {
                opts.disks
                    .iter()
                    .map(|p| disks::explicit_disk(root, p))
                    .collect()
            },
            nics: nics::collect(root, opts.boot_mac.as_deref()),
            pci_devices: pci::collect(root),
            bmc: None,
        };
        // A panic in the IPMI client is a bug there; the inventory goes on without it.
        let lan = ipmi.and_then(|h| h.join().ok().flatten());
        inv.bmc = bmc::collect(&table, ipmi_device.is_some(), lan.as_ref());
        if let Some(handle) = lldp {
            // A panic in the listener is a bug there; the inventory goes on without LLDP.
            let heard = handle.join().unwrap_or_default();
            for nic in &mut inv.nics {
                nic.lldp = heard.get(&nic.name).cloned();
            }
        }
        inv
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    #[test]
    fn lldp_listens_on_hardware_with_carrier_even_while_operstate_lags() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        // Just brought up: carrier 1, operstate still "down" (linkwatch runs later).
        put(r, "sys/class/net/eth0/device/vendor", "0x1af4");
        put(r, "sys/class/net/eth0/operstate", "down");
        put(r, "sys/class/net/eth0/carrier", "1");
        put(r, "sys/class/net/eth0/ifindex", "2");
        // No cable.
        put(r, "sys/class/net/eth1/device/vendor", "0x8086");
        put(r, "sys/class/net/eth1/operstate", "down");
        put(r, "sys/class/net/eth1/carrier", "0");
        put(r, "sys/class/net/eth1/ifindex", "3");
        // Virtual (no device): a bridge that is up.
        put(r, "sys/class/net/br0/operstate", "up");
        put(r, "sys/class/net/br0/carrier", "1");
        put(r, "sys/class/net/br0/ifindex", "4");
        assert_eq!(lldp_interfaces(&Root::new(r)), [("eth0".to_string(), 2)]);
    }

    #[test]
    fn reads_a_small_tree() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        put(
            r,
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: Test CPU\ncpu MHz\t\t: 2399.9\nflags\t\t: fpu sse2 lm\n\nprocessor\t: 1\nmodel name\t: Test CPU\n",
        );
        put(
            r,
            "proc/meminfo",
            "MemTotal:        2048000 kB\nMemFree: 1 kB\n",
        );
        put(r, "proc/sys/kernel/hostname", "box\n");
        put(r, "sys/class/dmi/id/sys_vendor", "QEMU\n");
        put(r, "sys/block/vda/size", "41943040\n");
        put(r, "sys/block/vda/queue/rotational", "0\n");
        put(r, "sys/block/vda/serial", "disk-1\n");
        put(r, "sys/block/loop0/size", "100\n");
        put(r, "sys/block/sdb/size", "0\n");
        put(r, "sys/class/net/eth0/address", "52:54:00:12:34:56\n");
        put(r, "sys/class/net/eth0/mtu", "1500\n");
        put(r, "sys/class/net/eth0/speed", "-1\n");
        fs::create_dir_all(r.join("sys/class/net/eth0/device")).unwrap();
        put(r, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
        let inv = Inventory::collect(
            r,
            &Options {
                boot_mac: Some("52:54:00:12:34:56".into()),
                ..Default::default()
            },
        );
        assert_eq!(inv.cpu.count, 2);
        assert_eq!(inv.cpu.model.as_deref(), Some("Test CPU"));
        assert_eq!(inv.cpu.architecture.as_deref(), Some("x86_64"));
        assert_eq!(inv.cpu.frequency_mhz, Some(2400));
        assert_eq!(inv.cpu.flags, ["fpu", "sse2", "lm"]);
        assert_eq!(inv.memory.total_bytes, 2048000 * 1024);
        assert_eq!(inv.hostname.as_deref(), Some("box"));
        assert_eq!(inv.system.manufacturer.as_deref(), Some("QEMU"));
        assert_eq!(inv.boot_mode, "legacy");
        assert_eq!(
            inv.disks.len(),
            1,
            "loop and empty devices are not root disk candidates"
        );
        assert_eq!(inv.disks[0].name, "/dev/vda");
        assert_eq!(inv.disks[0].size_bytes, 20 << 30);
        assert_eq!(inv.disks[0].kind, "SSD");
        assert_eq!(inv.disks[0].transport.as_deref(), Some("virtio"));
        assert_eq!(inv.disks[0].serial_number.as_deref(), Some("disk-1"));
        assert_eq!(inv.nics.len(), 1);
        assert!(inv.nics[0].pxe);
        assert_eq!(inv.nics[0].speed_mbps, None);
    }

    #[test]
    fn empty_root_gives_empty_inventory_not_an_error() {
        let t = tempfile::tempdir().unwrap();
        let inv = Inventory::collect(t.path(), &Options::default());
        assert_eq!(inv.cpu.count, 0);
        assert_eq!(inv.cpu.architecture, None);
        assert!(inv.disks.is_empty() && inv.nics.is_empty() && inv.pci_devices.is_empty());
        assert_eq!(inv.bmc, None);
    }

    #[test]
    fn explicit_plain_file_is_the_only_disk() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("disk.img");
        fs::write(&f, vec![0u8; 4096]).unwrap();
        let inv = Inventory::collect(
            Path::new("/"),
            &Options {
                disks: vec![f.clone()],
                ..Default::default()
            },
        );
        assert_eq!(inv.disks.len(), 1);
        assert_eq!(inv.disks[0].name, f.display().to_string());
        assert_eq!(inv.disks[0].size_bytes, 4096);
        assert_eq!(inv.disks[0].kind, "FILE");
    }
}
