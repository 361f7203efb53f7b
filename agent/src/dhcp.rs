//! DHCPv4 messages (RFC 2131/2132), as pure functions over bytes. The socket side is in
//! `sys::net`. The ramdisk needs an address before it can reach the coordinator, and Debian's
//! kernels do not do IP autoconfiguration, so the agent asks for one itself.

use std::net::Ipv4Addr;

const COOKIE: [u8; 4] = [99, 130, 83, 99];
pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<MessageType> {
        Some(match v {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            _ => return None,
        })
    }
}

/// A server's answer, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub kind: MessageType,
    pub xid: u32,
    /// The address offered to us.
    pub your_ip: Ipv4Addr,
    pub server_id: Option<Ipv4Addr>,
    pub prefix_len: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub lease_seconds: Option<u32>,
    pub hostname: Option<String>,
}

/// A lease the agent configures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Option<Ipv4Addr>,
    pub lease_seconds: Option<u32>,
}

impl Reply {
    pub fn lease(&self) -> Lease {
        Lease {
            ip: self.your_ip,
            prefix_len: self.prefix_len,
            router: self.router,
            dns: self.dns.clone(),
            server: self.server_id,
            lease_seconds: self.lease_seconds,
        }
    }
}

/// Options we ask for: subnet mask, router, DNS, hostname, broadcast, lease time, server id.
const PARAMS: [u8; 7] = [1, 3, 6, 12, 28, 51, 54];

fn header(mac: [u8; 6], xid: u32) -> Vec<u8> {
    let mut p = vec![0u8; 236];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10] = 0x80; // broadcast flag: answer by broadcast, we have no address yet
    p[28..34].copy_from_slice(&mac);
    p.extend_from_slice(&COOKIE);
    p
}

fn option(p: &mut Vec<u8>, code: u8, data: &[u8]) {
    p.push(code);
    p.push(data.len() as u8);
    p.extend_from_slice(data);
}

fn common_options(p: &mut Vec<u8>, mac: [u8; 6]) {
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&mac);
    option(p, 61, &client_id);
    option(p, 55, &PARAMS);
    option(p, 60, b"slipway");
}

pub fn discover(mac: [u8; 6], xid: u32) -> Vec<u8> {
    let mut p = header(mac, xid);
    option(&mut p, 53, &[MessageType::Discover as u8]);
    common_options(&mut p, mac);
    p.push(255);
    p
}

/// Accepts an offer: asks for `ip` from `server`.
pub fn request(mac: [u8; 6], xid: u32, ip: Ipv4Addr, server: Option<Ipv4Addr>) -> Vec<u8> {
    let mut p = header(mac, xid);
    option(&mut p, 53, &[MessageType::Request as u8]);
    option(&mut p, 50, &ip.octets());
    if let Some(s) = server {
        option(&mut p, 54, &s.octets());
    }
    common_options(&mut p, mac);
    p.push(255);
    p
}

/// Parses a server message for us (`mac`); `None` for anything else or anything malformed.
pub fn parse(packet: &[u8], mac: [u8; 6]) -> Option<Reply> {
    if packet.len() < 240 || packet[0] != 2 || packet[28..34] != mac || packet[236..240] != COOKIE {
        return None;
    }
    let xid = u32::from_be_bytes(packet[4..8].try_into().ok()?);
    let your_ip = Ipv4Addr::from(<[u8; 4]>::try_from(&packet[16..20]).ok()?);
    let mut r = Reply {
        kind: MessageType::Offer,
        xid,
        your_ip,
        server_id: None,
        prefix_len: 24,
        router: None,
        dns: Vec::new(),
        lease_seconds: None,
        hostname: None,
    };
    let mut kind = None;
    let mut i = 240;
    while i < packet.len() {
        let code = packet[i];
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let len = *packet.get(i + 1)? as usize;
        let data = packet.get(i + 2..i + 2 + len)?;
        let ip = |d: &[u8]| -> Option<Ipv4Addr> {
            Some(Ipv4Addr::from(<[u8; 4]>::try_from(d.get(..4)?).ok()?))
        };
        match code {
            53 => kind = data.first().copied().and_then(MessageType::from_u8),
            54 => r.server_id = ip(data),
            1 => {
                if let Some(mask) = ip(data) {
                    let bits = u32::from(mask);
                    // A valid mask is contiguous ones.
                    if bits.leading_ones() + bits.trailing_zeros() == 32 {
                        r.prefix_len = bits.leading_ones() as u8;
                    }
                }
            }
            3 => r.router = ip(data),
            6 => r.dns = data.chunks_exact(4).filter_map(ip).collect(),
            12 => r.hostname = std::str::from_utf8(data).ok().map(str::to_string),
            51 => {
                r.lease_seconds = data
                    .get(..4)
                    .and_then(|d| d.try_into().ok())
                    .map(u32::from_be_bytes)
            }
            _ => {}
        }
        i += 2 + len;
    }
    r.kind = kind?;
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn reply(kind: MessageType, xid: u32) -> Vec<u8> {
        let mut p = vec![0u8; 236];
        p[0] = 2;
        p[1] = 1;
        p[2] = 6;
        p[4..8].copy_from_slice(&xid.to_be_bytes());
        p[16..20].copy_from_slice(&[10, 0, 2, 15]);
        p[28..34].copy_from_slice(&MAC);
        p.extend_from_slice(&COOKIE);
        p.extend_from_slice(&[53, 1, kind as u8]);
        p.extend_from_slice(&[54, 4, 10, 0, 2, 2]);
        p.extend_from_slice(&[1, 4, 255, 255, 255, 0]);
        p.extend_from_slice(&[3, 4, 10, 0, 2, 2]);
        p.extend_from_slice(&[6, 8, 10, 0, 2, 3, 8, 8, 8, 8]);
        p.extend_from_slice(&[51, 4, 0, 0, 0x0e, 0x10]);
        p.push(0); // padding
        p.push(255);
        p
    }

    #[test]
    fn discover_is_a_broadcast_bootrequest_for_our_mac() {
        let p = discover(MAC, 0xdeadbeef);
        assert_eq!(&p[..3], &[1, 1, 6]);
        assert_eq!(&p[4..8], &0xdeadbeefu32.to_be_bytes());
        assert_eq!(p[10], 0x80);
        assert_eq!(&p[28..34], &MAC);
        assert_eq!(&p[236..240], &COOKIE);
        assert_eq!(&p[240..243], &[53, 1, 1]);
        assert_eq!(*p.last().unwrap(), 255);
        let r = request(
            MAC,
            1,
            Ipv4Addr::new(10, 0, 2, 15),
            Some(Ipv4Addr::new(10, 0, 2, 2)),
        );
        assert!(r.windows(6).any(|w| w == [50, 4, 10, 0, 2, 15]));
        assert!(r.windows(6).any(|w| w == [54, 4, 10, 0, 2, 2]));
    }

    #[test]
    fn parses_an_offer() {
        let r = parse(&reply(MessageType::Offer, 7), MAC).unwrap();
        assert_eq!(r.kind, MessageType::Offer);
        assert_eq!(r.xid, 7);
        assert_eq!(r.your_ip, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(r.server_id, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(r.prefix_len, 24);
        assert_eq!(r.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(
            r.dns,
            [Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(8, 8, 8, 8)]
        );
        assert_eq!(r.lease_seconds, Some(3600));
    }

    #[test]
    fn ignores_other_macs_and_garbage() {
        let mut p = reply(MessageType::Ack, 7);
        assert!(parse(&p, [0; 6]).is_none());
        p.truncate(250); // options cut in the middle
        assert!(parse(&p, MAC).is_none() || parse(&p, MAC).is_some());
        assert!(parse(&[], MAC).is_none());
        assert!(parse(&[2; 300], MAC).is_none());
        // Every truncation of a valid packet parses or is refused, never panics.
        let full = reply(MessageType::Ack, 9);
        for n in 0..full.len() {
            let _ = parse(&full[..n], MAC);
        }
    }
}
