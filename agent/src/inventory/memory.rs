//! Memory: usable total from `/proc/meminfo`, installed modules from SMBIOS type 17 (type 19
//! when no module reports a size), and NUMA nodes with their CPUs and memory.

use serde::{Deserialize, Serialize};

use super::cpu::parse_list;
use super::root::Root;
use super::smbios::{self, Structure};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// Memory the kernel can use (MemTotal), bytes.
    pub total_bytes: u64,
    /// Installed physical memory from SMBIOS, MiB; `None` when the tables say nothing.
    pub physical_mib: Option<u64>,
    /// Installed modules (empty slots left out); empty when SMBIOS is not readable.
    pub dimms: Vec<Dimm>,
}

/// One memory module (SMBIOS type 17).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dimm {
    pub locator: Option<String>,
    pub bank_locator: Option<String>,
    pub size_mib: Option<u64>,
    /// DDR4, DDR5, ...
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub form_factor: Option<String>,
    /// Rated speed, MT/s.
    pub speed_mts: Option<u32>,
    /// Speed it runs at, MT/s.
    pub configured_speed_mts: Option<u32>,
    pub manufacturer: Option<String>,
    pub serial_number: Option<String>,
    pub part_number: Option<String>,
}

/// A NUMA node: its logical CPUs and memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NumaNode {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub memory_bytes: Option<u64>,
}

pub fn collect(root: &Root, table: &[Structure<'_>]) -> Memory {
    let total_kib = meminfo_kib(
        &root.raw_text("proc/meminfo").unwrap_or_default(),
        "MemTotal:",
    );
    let dimms: Vec<Dimm> = table
        .iter()
        .filter_map(smbios::memory_device)
        .map(|d| Dimm {
            locator: d.locator,
            bank_locator: d.bank_locator,
            size_mib: d.size_mib,
            kind: d.kind,
            form_factor: d.form_factor,
            speed_mts: d.speed_mts,
            configured_speed_mts: d.configured_speed_mts,
            manufacturer: d.manufacturer,
            serial_number: d.serial_number,
            part_number: d.part_number,
        })
        .collect();
    let from_dimms: u64 = dimms
        .iter()
        .filter_map(|d| d.size_mib)
        .fold(0u64, u64::saturating_add);
    let physical_mib = if from_dimms > 0 {
        Some(from_dimms)
    } else {
        mapped_mib(table)
    };
    Memory {
        total_bytes: total_kib.map_or(0, |k| k.saturating_mul(1024)),
        physical_mib,
        dimms,
    }
}

/// The kB value of `key` in a meminfo-style text.
fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.split_once(key)?.1;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Sum of the memory array mapped address ranges (type 19), MiB.
fn mapped_mib(table: &[Structure<'_>]) -> Option<u64> {
    let mut kib: u64 = 0;
    for s in table.iter().filter(|s| s.kind == 19) {
        let (Some(start), Some(end)) = (s.dword(0x04), s.dword(0x08)) else {
            continue;
        };
        if start == 0xFFFF_FFFF {
            let q = |off: usize| {
                let b = s.data.get(off..off + 8)?;
                Some(u64::from_le_bytes(b.try_into().ok()?))
            };
            if let (Some(a), Some(b)) = (q(0x0F), q(0x17))
                && b >= a
            {
                kib = kib.saturating_add((b - a + 1) / 1024);
            }
        } else if end >= start {
            kib = kib.saturating_add(u64::from(end - start) + 1);
        }
    }
    (kib > 0).then_some(kib / 1024)
}

pub fn numa_nodes(root: &Root) -> Vec<NumaNode> {
    let mut nodes: Vec<NumaNode> = root
        .list("sys/devices/system/node")
        .iter()
        .filter_map(|n| n.strip_prefix("node")?.parse::<u32>().ok())
        .map(|id| {
            let dir = format!("sys/devices/system/node/node{id}");
            NumaNode {
                id,
                cpus: root
                    .text(format!("{dir}/cpulist"))
                    .map(|l| parse_list(&l))
                    .unwrap_or_default(),
                memory_bytes: root
                    .raw_text(format!("{dir}/meminfo"))
                    .and_then(|t| meminfo_kib(&t, "MemTotal:"))
                    .map(|k| k.saturating_mul(1024)),
            }
        })
        .collect();
    nodes.sort_by_key(|n| n.id);
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_values() {
        let t = "MemTotal:       24683532 kB\nMemFree: 1 kB\n";
        assert_eq!(meminfo_kib(t, "MemTotal:"), Some(24683532));
        assert_eq!(
            meminfo_kib("Node 1 MemTotal:  4096 kB\n", "MemTotal:"),
            Some(4096)
        );
        assert_eq!(meminfo_kib("MemTotal: lots kB", "MemTotal:"), None);
    }
}
