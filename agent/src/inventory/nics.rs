//! Network interfaces: `/sys/class/net` (physical interfaces and bonds), addresses from
//! `/proc/net/fib_trie` + `/proc/net/route` (IPv4) and `/proc/net/if_inet6` (IPv6), permanent
//! MACs of bond members from `/proc/net/bonding`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::lldp::Neighbour;
use super::root::Root;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Nic {
    pub name: String,
    /// "physical" or "bond".
    pub kind: String,
    pub mac: Option<String>,
    /// The burned-in MAC, where it is known (it is the current one unless something set
    /// another; bond members have theirs in /proc/net/bonding).
    pub permanent_mac: Option<String>,
    pub driver: Option<String>,
    pub pci_address: Option<String>,
    /// PCI vendor id, "0x8086".
    pub vendor_id: Option<String>,
    pub device_id: Option<String>,
    pub speed_mbps: Option<u32>,
    pub has_carrier: Option<bool>,
    /// The kernel's operational state: up, down, dormant, unknown...
    pub operstate: Option<String>,
    pub mtu: Option<u32>,
    /// IPv4 first, then IPv6 (global before link-local).
    pub ip_addresses: Vec<String>,
    pub numa_node: Option<u32>,
    /// The interface the host booted from (BOOTIF= / slipway.mac=).
    pub pxe: bool,
    /// The bond this interface belongs to.
    pub bond_master: Option<String>,
    /// For a bond: its mode and members.
    pub bond: Option<Bond>,
    /// The switch port at the other end, from an LLDP frame heard during the inventory.
    pub lldp: Option<Neighbour>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bond {
    /// e.g. "802.3ad", "active-backup".
    pub mode: Option<String>,
    pub members: Vec<String>,
}

pub fn collect(root: &Root, boot_mac: Option<&str>) -> Vec<Nic> {
    let addresses = addresses(root);
    let mut permanent: BTreeMap<String, String> = BTreeMap::new();
    for bond in root.list("proc/net/bonding") {
        let text = root
            .raw_text(format!("proc/net/bonding/{bond}"))
            .unwrap_or_default();
        permanent.extend(bond_permanent_macs(&text));
    }
    root.list("sys/class/net")
        .into_iter()
        .filter_map(|name| {
            let dir = PathBuf::from(format!("sys/class/net/{name}"));
            let is_bond = root.exists(dir.join("bonding"));
            if !is_bond && !root.exists(dir.join("device")) {
                // Loopback, bridges, veths, tunnels: not hardware.
                return None;
            }
            let device = root.resolve(dir.join("device"));
            let pci = device.as_deref().and_then(|d| pci_function(root, d));
            let mac = root
                .text(dir.join("address"))
                .map(|m| m.to_ascii_lowercase());
            // The driver's own record first (ETHTOOL_GPERMADDR, live machines only): it
            // survives a bond or an operator changing the address.
            let from_driver = if root.is_live() && !is_bond {
                ethtool_permanent_mac(&name)
            } else {
                None
            };
            let permanent_mac = from_driver
                .or_else(|| permanent.get(&name).cloned())
                .or_else(|| {
                    // 0 = NET_ADDR_PERM: the current address is the permanent one.
                    (root.u64(dir.join("addr_assign_type")) == Some(0) && !is_bond)
                        .then(|| mac.clone())
                        .flatten()
                });
            let pxe = boot_mac.is_some_and(|b| {
                [&mac, &permanent_mac]
                    .iter()
                    .any(|m| m.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(b)))
            });
            Some(Nic {
                kind: if is_bond { "bond" } else { "physical" }.into(),
                driver: root.link_name(dir.join("device/driver")),
                vendor_id: pci.as_ref().and_then(|p| root.text(p.join("vendor"))),
                device_id: pci.as_ref().and_then(|p| root.text(p.join("device"))),
                pci_address: pci
                    .as_deref()
                    .and_then(|p| p.file_name()?.to_str().map(str::to_string)),
                numa_node: device
                    .as_deref()
                    .and_then(|d| super::disks::numa_node(root, d)),
                speed_mbps: root
                    .i64(dir.join("speed"))
                    .and_then(|s| u32::try_from(s).ok())
                    .filter(|s| *s > 0 && *s != u32::MAX),
                has_carrier: root.flag(dir.join("carrier")),
                operstate: root.text(dir.join("operstate")),
                mtu: root
                    .u64(dir.join("mtu"))
                    .and_then(|m| u32::try_from(m).ok()),
                ip_addresses: addresses.get(&name).cloned().unwrap_or_default(),
                bond_master: root.link_name(dir.join("master")),
                bond: is_bond.then(|| Bond {
                    mode: root
                        .text(dir.join("bonding/mode"))
                        .and_then(|m| m.split_whitespace().next().map(str::to_string)),
                    members: root
                        .text(dir.join("bonding/slaves"))
                        .map(|s| s.split_whitespace().map(str::to_string).collect())
                        .unwrap_or_default(),
                }),
                pxe,
                mac,
                permanent_mac,
                name,
                lldp: None,
            })
        })
        .collect()
}

/// The PCI function a device sits on (itself or an ancestor, e.g. virtio-net's PCI device).
pub fn pci_function(root: &Root, device: &Path) -> Option<PathBuf> {
    let mut p = device.to_path_buf();
    while p.starts_with("sys/devices") && p != Path::new("sys/devices") {
        if root.link_name(p.join("subsystem")).as_deref() == Some("pci") {
            return Some(p);
        }
        p.pop();
    }
    None
}

/// "Slave Interface: eth0" ... "Permanent HW addr: aa:bb:..." pairs.
fn bond_permanent_macs(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("Slave Interface:") {
            current = Some(n.trim().to_string());
        } else if let Some(mac) = line.strip_prefix("Permanent HW addr:")
            && let Some(n) = current.take()
        {
            out.push((n, mac.trim().to_ascii_lowercase()));
        }
    }
    out
}

/// Addresses per interface: IPv4 first, then global IPv6, then link-local IPv6.
fn addresses(root: &Root) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let routes = root.raw_text("proc/net/route").unwrap_or_default();
    let trie = root.raw_text("proc/net/fib_trie").unwrap_or_default();
    for (iface, addr) in ipv4_addresses(&trie, &routes) {
        let v = out.entry(iface).or_default();
        if !v.contains(&addr.to_string()) {
            v.push(addr.to_string());
        }
    }
    let inet6 = root.raw_text("proc/net/if_inet6").unwrap_or_default();
    let mut v6 = ipv6_addresses(&inet6);
    v6.sort_by_key(|(_, a)| (a.segments()[0] & 0xffc0) == 0xfe80);
    for (iface, addr) in v6 {
        out.entry(iface).or_default().push(addr.to_string());
    }
    out
}

/// Local IPv4 addresses (`/32 host LOCAL` in the FIB trie), each given the interface of the
/// most specific route that contains it.
pub fn ipv4_addresses(fib_trie: &str, route: &str) -> Vec<(String, Ipv4Addr)> {
    let routes: Vec<(String, u32, u32)> = route
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?.swap_bytes();
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?.swap_bytes();
            Some((f.first()?.to_string(), dest, mask))
        })
        .filter(|(_, _, mask)| *mask != 0)
        .collect();
    let mut out = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let t = line.trim();
        if let Some(a) = t.strip_prefix("|-- ") {
            last = a.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL")
            && let Some(addr) = last
            && !addr.is_loopback()
        {
            let ip = u32::from(addr);
            let best = routes
                .iter()
                .filter(|(_, dest, mask)| ip & mask == *dest)
                .max_by_key(|(_, _, mask)| mask.count_ones());
            if let Some((iface, _, _)) = best
                && !out.iter().any(|(i, a)| i == iface && *a == addr)
            {
                out.push((iface.clone(), addr));
            }
        }
    }
    out
}

/// `/proc/net/if_inet6`: address, ifindex, prefix, scope, flags, name.
pub fn ipv6_addresses(text: &str) -> Vec<(String, Ipv6Addr)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = f.first()?;
            let name = f.get(5)?;
            let n = u128::from_str_radix(hex, 16)
                .ok()
                .filter(|_| hex.len() == 32)?;
            let addr = Ipv6Addr::from(n);
            (!addr.is_loopback()).then(|| (name.to_string(), addr))
        })
        .collect()
}

/// The permanent (burned-in) MAC the driver reports through the SIOCETHTOOL ioctl
/// (`ethtool -P`); `None` where the driver has none (all zeros), or the call fails.
pub fn ethtool_permanent_mac(ifname: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GPERMADDR: u32 = 0x20;
    /// `struct ethtool_perm_addr` with room for a 32-byte address.
    #[repr(C)]
    struct PermAddr {
        cmd: u32,
        size: u32,
        data: [u8; 32],
    }
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut req = PermAddr {
        cmd: ETHTOOL_GPERMADDR,
        size: 32,
        data: [0; 32],
    };
    // SAFETY: an all-zero ifreq is valid; the name and the data pointer are set below.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut req).cast::<libc::c_char>();
    // SAFETY: plain socket(2); the result is checked and closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifr is a valid ifreq whose data points at `req`, which lives across the call
    // and has room for the `size` bytes the kernel may write.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            SIOCETHTOOL as _,
            &raw mut ifr,
        )
    };
    if rc < 0 {
        return None;
    }
    let len = (req.size as usize).min(req.data.len());
    format_mac(&req.data[..len])
}

/// `aa:bb:...` for a 6-byte (or longer) hardware address; `None` for an empty or all-zero one.
pub(super) fn format_mac(bytes: &[u8]) -> Option<String> {
    if bytes.len() < 6 || bytes.iter().all(|b| *b == 0) {
        return None;
    }
    Some(
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_macs_from_the_driver() {
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0xab, 0, 1]).as_deref(),
            Some("52:54:00:ab:00:01")
        );
        // Drivers without a burned-in address report zeros: unknown, not a MAC.
        assert_eq!(format_mac(&[0; 6]), None);
        assert_eq!(format_mac(&[1, 2]), None);
        assert_eq!(ethtool_permanent_mac(""), None);
        assert_eq!(ethtool_permanent_mac("a-name-far-too-long-for-linux"), None);
        assert_eq!(ethtool_permanent_mac("no-such-nic0"), None);
    }

    #[test]
    fn ipv4_from_the_fib_trie() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     \
                    +-- 192.0.2.0/24 2 0 2\n        |-- 192.0.2.2\n           /32 host LOCAL\n        \
                    |-- 192.0.2.255\n           /32 link BROADCAST\n     |-- 127.0.0.1\n        /32 host LOCAL\n\
                    Local:\n        |-- 192.0.2.2\n           /32 host LOCAL\n        |-- 10.9.9.9\n           /32 host LOCAL\n";
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            ipv4_addresses(trie, route),
            [("eth0".to_string(), Ipv4Addr::new(192, 0, 2, 2))],
            "one address, once; no loopback; no address without a route"
        );
        assert!(ipv4_addresses("|-- 999.1.1.1\n/32 host LOCAL\n", "garbage").is_empty());
    }

    #[test]
    fn ipv6_from_if_inet6() {
        let t = "fd000000000000000000000000000002 04 40 00 82     eth0\n\
                 00000000000000000000000000000001 01 80 10 80       lo\n\
                 zz 04 40 20 80 eth0\n";
        assert_eq!(
            ipv6_addresses(t),
            [("eth0".to_string(), "fd00::2".parse().unwrap())]
        );
    }

    #[test]
    fn bond_members_permanent_macs() {
        let t = "Bonding Mode: IEEE 802.3ad Dynamic link aggregation\n\nSlave Interface: eno1\nMII Status: up\n\
                 Permanent HW addr: 3C:FD:FE:00:00:01\n\nSlave Interface: eno2\nPermanent HW addr: 3c:fd:fe:00:00:02\n";
        assert_eq!(
            bond_permanent_macs(t),
            [
                ("eno1".to_string(), "3c:fd:fe:00:00:01".to_string()),
                ("eno2".to_string(), "3c:fd:fe:00:00:02".to_string())
            ]
        );
    }
}
