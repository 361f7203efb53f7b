//! The boot network: bring the interface up, ask DHCP for an address, configure it with
//! netlink. The DHCP messages themselves are in `crate::dhcp` (pure).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};

use crate::dhcp::{self, Lease, MessageType};
use crate::inventory;

/// A physical network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub mac: [u8; 6],
}

impl Iface {
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Interfaces with a device (not lo, bridges or tunnels), from /sys/class/net.
pub fn physical_interfaces() -> Vec<Iface> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut out: Vec<Iface> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let dir = e.path();
            if !dir.join("device").exists() {
                return None;
            }
            let mac = parse_mac(&inventory::read(&dir.join("address"))?)?;
            Some(Iface { name, mac })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The interfaces to try: the one with the boot MAC if given and present, else all.
pub fn candidates(boot_mac: Option<&str>) -> Vec<Iface> {
    let all = physical_interfaces();
    if let Some(mac) = boot_mac.and_then(parse_mac) {
        let chosen: Vec<Iface> = all.iter().filter(|i| i.mac == mac).cloned().collect();
        if !chosen.is_empty() {
            return chosen;
        }
    }
    all
}

fn netlink_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("netlink: {e}"))
}

async fn index_of(handle: &rtnetlink::Handle, name: &str) -> std::io::Result<u32> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await.map_err(netlink_err)? {
        Some(link) => Ok(link.header.index),
        None => Err(std::io::Error::other(format!("no interface named {name}"))),
    }
}

/// `ip link set NAME up`, for every name (and lo).
pub async fn links_up(names: &[String]) -> std::io::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    for name in names.iter().map(String::as_str).chain(["lo"]) {
        let index = index_of(&handle, name).await?;
        handle
            .link()
            .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(netlink_err)?;
    }
    Ok(())
}

/// Adds the lease's address to `name` and a default route through its router.
pub async fn apply(name: &str, lease: &Lease) -> std::io::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    let index = index_of(&handle, name).await?;
    match handle
        .address()
        .add(index, lease.ip.into(), lease.prefix_len)
        .execute()
        .await
    {
        Ok(()) => {}
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
        Err(e) => return Err(netlink_err(e)),
    }
    if let Some(gw) = lease.router {
        let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .build();
        match handle.route().add(route).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            Err(e) => return Err(netlink_err(e)),
        }
    }
    Ok(())
}

/// Whether the interface reports carrier.
pub fn has_carrier(name: &str) -> bool {
    inventory::read(&Path::new("/sys/class/net").join(name).join("carrier")).as_deref() == Some("1")
}

fn dhcp_socket(iface: &str) -> std::io::Result<UdpSocket> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true)?;
    socket::setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(iface))?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::CLIENT_PORT)),
    )?;
    // SAFETY: the fd is a freshly created, bound UDP socket we own.
    Ok(unsafe { UdpSocket::from_raw_fd(fd.into_raw_fd()) })
}

/// Runs DISCOVER/OFFER/REQUEST/ACK on `iface` for at most `timeout`.
pub fn dhcp(iface: &Iface, timeout: Duration) -> std::io::Result<Lease> {
    let sock = dhcp_socket(&iface.name)?;
    let deadline = Instant::now() + timeout;
    let xid: u32 = {
        let mut b = [0u8; 4];
        let _ = getrandom::fill(&mut b);
        u32::from_ne_bytes(b)
    };
    let server = SocketAddrV4::new(Ipv4Addr::BROADCAST, dhcp::SERVER_PORT);
    let mut buf = [0u8; 1500];
    let mut wait = Duration::from_secs(1);
    let mut offered: Option<(Ipv4Addr, Option<Ipv4Addr>)> = None;
    while Instant::now() < deadline {
        let packet = match offered {
            None => dhcp::discover(iface.mac, xid),
            Some((ip, srv)) => dhcp::request(iface.mac, xid, ip, srv),
        };
        sock.send_to(&packet, server)?;
        let until = (Instant::now() + wait).min(deadline);
        while Instant::now() < until {
            sock.set_read_timeout(Some(
                until
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            ))?;
            let n = match sock.recv_from(&mut buf) {
                Ok((n, _)) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e),
            };
            let Some(reply) = dhcp::parse(&buf[..n], iface.mac).filter(|r| r.xid == xid) else {
                continue;
            };
            match (reply.kind, offered) {
                (MessageType::Offer, None) => {
                    offered = Some((reply.your_ip, reply.server_id));
                    break; // send the REQUEST now
                }
                (MessageType::Ack, Some(_)) => return Ok(reply.lease()),
                (MessageType::Nak, Some(_)) => {
                    offered = None;
                    break;
                }
                _ => {}
            }
        }
        wait = (wait * 2).min(Duration::from_secs(4));
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no DHCP answer on {} within {timeout:?}", iface.name),
    ))
}
