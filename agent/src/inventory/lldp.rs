//! LLDP: what the switch at the other end of each cable says about itself.
//!
//! [`parse`] decodes a frame (pure; tested on bytes). [`listen`] is the live part: one raw
//! `AF_PACKET` socket per interface, bound to the LLDP ethertype and the nearest-bridge
//! multicast address, polled together for a bounded time. It needs `CAP_NET_RAW` and
//! interfaces that are up; without either it hears nothing, which is not an error. It never
//! changes the state of an interface.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::debug;

pub const ETH_P_LLDP: u16 = 0x88CC;
/// The nearest-bridge group address LLDP is sent to.
pub const LLDP_MULTICAST: [u8; 6] = [0x01, 0x80, 0xC2, 0x00, 0x00, 0x0E];

/// The neighbour an LLDP frame describes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Neighbour {
    pub chassis_id: Option<String>,
    pub port_id: Option<String>,
    pub port_description: Option<String>,
    pub system_name: Option<String>,
    pub system_description: Option<String>,
    /// Management addresses (IPv4/IPv6) the switch advertises.
    pub management_addresses: Vec<String>,
    /// The port's native (untagged) VLAN.
    pub port_vlan_id: Option<u16>,
    /// VLANs the port carries, as advertised (802.1 VLAN name TLVs).
    pub vlans: Vec<Vlan>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vlan {
    pub id: u16,
    pub name: Option<String>,
}

fn mac(b: &[u8]) -> Option<String> {
    (b.len() == 6).then(|| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    })
}

fn text(b: &[u8]) -> Option<String> {
    std::str::from_utf8(b).ok().and_then(super::root::clean)
}

/// An address-family-prefixed network address (IANA: 1 IPv4, 2 IPv6).
fn network_address(b: &[u8]) -> Option<String> {
    match (b.first()?, b.get(1..)?) {
        (1, a) if a.len() == 4 => Some(Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string()),
        (2, a) if a.len() == 16 => {
            let mut x = [0u8; 16];
            x.copy_from_slice(a);
            Some(Ipv6Addr::from(x).to_string())
        }
        _ => None,
    }
}

/// Chassis and port ids: MAC and network-address subtypes decoded, others as text.
fn id(b: &[u8], mac_subtype: u8) -> Option<String> {
    let (&sub, rest) = b.split_first()?;
    if sub == mac_subtype {
        return mac(rest).or_else(|| text(rest));
    }
    if sub == 5 && mac_subtype == 4 {
        return network_address(rest);
    }
    text(rest)
}

/// Decodes an Ethernet frame carrying LLDP; `None` when it is not one.
pub fn parse(frame: &[u8]) -> Option<Neighbour> {
    let mut pos = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype == 0x8100 {
        pos += 4;
        ethertype = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
    }
    if ethertype != ETH_P_LLDP {
        return None;
    }
    pos += 2;
    let mut n = Neighbour::default();
    let mut seen_chassis = false;
    while pos + 2 <= frame.len() {
        let head = u16::from_be_bytes([frame[pos], frame[pos + 1]]);
        let (kind, len) = (head >> 9, usize::from(head & 0x01FF));
        pos += 2;
        let Some(v) = frame.get(pos..pos + len) else {
            break;
        };
        pos += len;
        match kind {
            0 => break,
            1 => {
                n.chassis_id = id(v, 4);
                seen_chassis = true;
            }
            2 => n.port_id = id(v, 3),
            4 => n.port_description = text(v),
            5 => n.system_name = text(v),
            6 => n.system_description = text(v),
            8 => {
                let alen = usize::from(*v.first()?);
                if let Some(a) = v.get(1..1 + alen).and_then(network_address)
                    && !n.management_addresses.contains(&a)
                {
                    n.management_addresses.push(a);
                }
            }
            127 if v.len() >= 4 && v[..3] == [0x00, 0x80, 0xC2] => match v[3] {
                1 if v.len() >= 6 => {
                    n.port_vlan_id = Some(u16::from_be_bytes([v[4], v[5]])).filter(|x| *x > 0);
                }
                3 if v.len() >= 7 => {
                    let vid = u16::from_be_bytes([v[4], v[5]]);
                    let nlen = usize::from(v[6]);
                    let name = v.get(7..7 + nlen).and_then(text);
                    n.vlans.push(Vlan { id: vid, name });
                }
                _ => {}
            },
            _ => {}
        }
    }
    seen_chassis.then_some(n)
}

/// Listens on each `(interface, ifindex)` for up to `duration`, returning the first neighbour
/// heard on each. Returns early once every interface has been heard.
pub fn listen(interfaces: &[(String, i32)], duration: Duration) -> BTreeMap<String, Neighbour> {
    let mut out = BTreeMap::new();
    if duration.is_zero() || interfaces.is_empty() {
        return out;
    }
    let mut socks: Vec<(String, OwnedFd)> = Vec::new();
    for (name, index) in interfaces {
        match open(*index) {
            Ok(fd) => socks.push((name.clone(), fd)),
            Err(e) => tracing::info!(interface = %name, "cannot listen for LLDP: {e}"),
        }
    }
    let names: Vec<&str> = socks.iter().map(|(n, _)| n.as_str()).collect();
    tracing::info!(
        "listening for LLDP on {} for up to {:.1}s",
        names.join(", "),
        duration.as_secs_f64()
    );
    let deadline = Instant::now() + duration;
    let mut buf = vec![0u8; 9216];
    while !socks.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut fds: Vec<libc::pollfd> = socks
            .iter()
            .map(|(_, fd)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: fds is a valid array of fds.len() pollfd structures.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            debug!("poll for LLDP failed: {e}");
            break;
        }
        let mut done = Vec::new();
        for (i, p) in fds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            // SAFETY: the fd is open (owned by socks) and buf is valid for buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    p.fd,
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if p.revents & (libc::POLLERR | libc::POLLNVAL | libc::POLLHUP) != 0 && n <= 0 {
                tracing::info!(
                    interface = %socks[i].0,
                    "LLDP socket error ({}); no longer listening there",
                    io::Error::last_os_error()
                );
                done.push(i);
                continue;
            }
            let Ok(n) = usize::try_from(n) else { continue };
            if let Some(neighbour) = buf.get(..n).and_then(parse) {
                out.insert(socks[i].0.clone(), neighbour);
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            socks.remove(i);
        }
    }
    out
}

/// A raw socket receiving LLDP frames on one interface.
fn open(ifindex: i32) -> io::Result<OwnedFd> {
    let proto = i32::from(ETH_P_LLDP.to_be());
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            proto,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields set below make it a bind address.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_LLDP.to_be();
    sll.sll_ifindex = ifindex;
    // SAFETY: sll is a valid sockaddr_ll and the length matches it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero packet_mreq is valid; the fields set below describe the group.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = ifindex;
    mreq.mr_type = libc::PACKET_MR_MULTICAST as u16;
    mreq.mr_alen = 6;
    mreq.mr_address[..6].copy_from_slice(&LLDP_MULTICAST);
    // SAFETY: mreq is a valid packet_mreq and the length matches it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&raw const mreq).cast::<libc::c_void>(),
            std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        // Without the membership, frames still arrive on most NICs (the group is link-local
        // and often accepted); keep listening.
        debug!(
            ifindex,
            "PACKET_ADD_MEMBERSHIP failed: {}",
            io::Error::last_os_error()
        );
    }
    Ok(fd)
}

/// Builds LLDP frames, for tests (here and in the live test that sends one over a veth pair).
pub mod frame {
    use super::{ETH_P_LLDP, LLDP_MULTICAST};

    pub fn tlv(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = u16::try_from(value.len()).unwrap_or(0x1FF).min(0x1FF);
        let mut v = ((kind << 9) | len).to_be_bytes().to_vec();
        v.extend_from_slice(&value[..usize::from(len)]);
        v
    }

    /// A frame like a typical top-of-rack switch sends.
    pub fn switch(src: [u8; 6], port: &str, system: &str, vlans: &[(u16, &str)]) -> Vec<u8> {
        let mut f = LLDP_MULTICAST.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETH_P_LLDP.to_be_bytes());
        let mut chassis = vec![4];
        chassis.extend_from_slice(&src);
        f.extend(tlv(1, &chassis));
        let mut p = vec![5];
        p.extend_from_slice(port.as_bytes());
        f.extend(tlv(2, &p));
        f.extend(tlv(3, &120u16.to_be_bytes()));
        f.extend(tlv(4, format!("to server {port}").as_bytes()));
        f.extend(tlv(5, system.as_bytes()));
        // Management address 192.0.2.10, ifIndex numbering, no OID.
        f.extend(tlv(8, &[5, 1, 192, 0, 2, 10, 2, 0, 0, 0, 1, 0]));
        if let Some((pvid, _)) = vlans.first() {
            let mut v = vec![0x00, 0x80, 0xC2, 1];
            v.extend_from_slice(&pvid.to_be_bytes());
            f.extend(tlv(127, &v));
        }
        for (id, name) in vlans {
            let mut v = vec![0x00, 0x80, 0xC2, 3];
            v.extend_from_slice(&id.to_be_bytes());
            v.push(u8::try_from(name.len()).unwrap_or(0));
            v.extend_from_slice(name.as_bytes());
            f.extend(tlv(127, &v));
        }
        f.extend(tlv(0, &[]));
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_switch_frame() {
        let f = frame::switch(
            [0x00, 0x1c, 0x73, 0xaa, 0xbb, 0xcc],
            "Ethernet12",
            "tor-a.rack3",
            &[(100, "prov"), (200, "tenant")],
        );
        let n = parse(&f).unwrap();
        assert_eq!(n.chassis_id.as_deref(), Some("00:1c:73:aa:bb:cc"));
        assert_eq!(n.port_id.as_deref(), Some("Ethernet12"));
        assert_eq!(n.system_name.as_deref(), Some("tor-a.rack3"));
        assert_eq!(n.port_description.as_deref(), Some("to server Ethernet12"));
        assert_eq!(n.management_addresses, ["192.0.2.10"]);
        assert_eq!(n.port_vlan_id, Some(100));
        assert_eq!(
            n.vlans,
            [
                Vlan {
                    id: 100,
                    name: Some("prov".into())
                },
                Vlan {
                    id: 200,
                    name: Some("tenant".into())
                }
            ]
        );
    }

    #[test]
    fn truncated_and_foreign_frames_never_panic() {
        let f = frame::switch([2, 0, 0, 0, 0, 1], "p1", "sw", &[(10, "x")]);
        for n in 0..f.len() {
            let _ = parse(&f[..n]);
        }
        let mut ipv4 = f.clone();
        ipv4[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(parse(&ipv4), None);
        assert_eq!(parse(&[]), None);
    }
}
