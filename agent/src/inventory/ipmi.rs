//! The BMC's own LAN settings, asked of the BMC itself through the kernel's IPMI device
//! (`/dev/ipmi0`, made by `ipmi_devintf` once `ipmi_si` has found the BMC's KCS/SMIC/BT
//! interface).
//!
//! [`query`] is the whole conversation, over the narrow [`Transport`] trait: Get Device ID
//! (the IPMI version), then Get LAN Configuration Parameters on LAN channels 1, 2, ... until
//! one answers with an address: MAC (parameter 5), IPv4 address (3), IPv6 static (56) or
//! dynamic (59) address. The response parsers are plain functions over bytes. [`Device`] is
//! the one real transport: two ioctls from `<linux/ipmi.h>` and `poll`.
//!
//! Every request shares one deadline ([`BUDGET`]): a BMC that stops answering costs at most
//! that, and any error (no device, permission, timeout, a completion code) leaves the fields
//! unknown. Only the running machine is asked; with no device node this costs nothing beyond
//! the three `stat`s that look for it.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::debug;

use super::root::Root;

/// How long one inventory may spend talking to the BMC, all requests together.
pub const BUDGET: Duration = Duration::from_millis(1500);

/// Where the kernel's IPMI device interface appears (devtmpfs; udev rules of some
/// distributions; older devfs-style names).
pub const DEVICE_PATHS: [&str; 3] = ["dev/ipmi0", "dev/ipmi/0", "dev/ipmidev/0"];

const NETFN_APP: u8 = 0x06;
const NETFN_TRANSPORT: u8 = 0x0c;
const CMD_GET_DEVICE_ID: u8 = 0x01;
const CMD_GET_LAN_CONFIG: u8 = 0x02;
const PARAM_IPV4: u8 = 3;
const PARAM_MAC: u8 = 5;
const PARAM_IPV6_STATIC: u8 = 56;
const PARAM_IPV6_DYNAMIC: u8 = 59;
/// Channels 1-11 are the implementation's own (LAN on 1 mostly, also 2, 3, 8); 0 is the
/// primary IPMB, 0xE "this channel", 0xF the system interface.
const LAN_CHANNELS: std::ops::RangeInclusive<u8> = 1..=11;

/// What the BMC said about itself; each field `None` when it did not say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LanInfo {
    /// "2.0", "1.5".
    pub ipmi_version: Option<String>,
    /// The LAN channel the addresses are from.
    pub channel: Option<u8>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: Option<String>,
}

impl LanInfo {
    fn has_address(&self) -> bool {
        self.ipv4.is_some() || self.ipv6.is_some() || self.mac.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpmiError {
    #[error("no answer from the BMC within {0:?}")]
    Timeout(Duration),
    #[error("completion code {0:#04x}")]
    Completion(u8),
    #[error("empty response")]
    Empty,
    #[error("{op} on the IPMI device")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// One request/response exchange with the BMC over the system interface.
pub trait Transport {
    /// Sends `netfn`/`cmd` with `data` and returns the response's data, completion code
    /// first, or [`IpmiError::Timeout`] once `timeout` has passed without it.
    fn request(
        &mut self,
        netfn: u8,
        cmd: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, IpmiError>;
}

/// The data of a response after its completion code, or the code when it is not 0 (success).
pub fn completion(response: &[u8]) -> Result<&[u8], IpmiError> {
    match response.split_first() {
        None => Err(IpmiError::Empty),
        Some((0, data)) => Ok(data),
        Some((&code, _)) => Err(IpmiError::Completion(code)),
    }
}

/// The IPMI version from Get Device ID's data (byte 5, BCD: low nibble major, high minor).
pub fn parse_device_id(data: &[u8]) -> Option<String> {
    let v = *data.get(4)?;
    let (major, minor) = (v & 0x0f, v >> 4);
    (major > 0 && major <= 9 && minor <= 9).then(|| format!("{major}.{minor}"))
}

/// Parameter 3 (IPv4 address): revision, then the address; `None` when unset (0.0.0.0) or absurd.
pub fn parse_ipv4(data: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = data.get(1..5)?.try_into().ok()?;
    let a = Ipv4Addr::from(b);
    (!a.is_unspecified() && !a.is_broadcast() && !a.is_multicast()).then_some(a)
}

/// Parameter 5 (MAC address): revision, then six bytes; `None` when all zeros or all ones.
pub fn parse_mac(data: &[u8]) -> Option<String> {
    let b = data.get(1..7)?;
    if b.iter().all(|x| *x == 0xff) {
        return None;
    }
    super::nics::format_mac(b)
}

/// Parameters 56 (IPv6 static address) and 59 (IPv6 dynamic address), one set: revision, set
/// selector, source/type (bit 7: enabled, for static ones), 16 address bytes, prefix length,
/// status (0: active). `None` unless active, enabled, and neither unspecified nor link-local.
pub fn parse_ipv6(data: &[u8], is_static: bool) -> Option<Ipv6Addr> {
    let source = *data.get(2)?;
    let bytes: [u8; 16] = data.get(3..19)?.try_into().ok()?;
    let status = *data.get(20)?;
    let a = Ipv6Addr::from(bytes);
    let link_local = a.segments()[0] & 0xffc0 == 0xfe80;
    let enabled = !is_static || source & 0x80 != 0;
    (enabled && status == 0 && !a.is_unspecified() && !a.is_loopback() && !link_local).then_some(a)
}

/// Asks the BMC behind `t` for its version and LAN addresses, within `budget` in all. Never
/// fails: what could not be learnt stays `None` (the reason is logged at debug level).
pub fn query(t: &mut dyn Transport, budget: Duration) -> LanInfo {
    let deadline = Instant::now() + budget;
    let mut ask = |netfn: u8, cmd: u8, data: &[u8]| -> Result<Vec<u8>, IpmiError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(IpmiError::Timeout(budget));
        }
        let response = t.request(netfn, cmd, data, left)?;
        completion(&response).map(<[u8]>::to_vec)
    };
    // Timeouts and I/O errors end the conversation; a completion code only that question.
    let fatal = |e: &IpmiError| matches!(e, IpmiError::Timeout(_) | IpmiError::Io { .. });
    let mut info = LanInfo::default();
    match ask(NETFN_APP, CMD_GET_DEVICE_ID, &[]) {
        Ok(d) => info.ipmi_version = parse_device_id(&d),
        Err(e) => {
            debug!("IPMI Get Device ID: {e}");
            if fatal(&e) {
                return info;
            }
        }
    }
    for channel in LAN_CHANNELS {
        let lan = |param: u8, set: u8| [channel, param, set, 0];
        match ask(NETFN_TRANSPORT, CMD_GET_LAN_CONFIG, &lan(PARAM_MAC, 0)) {
            Ok(d) => info.mac = parse_mac(&d),
            Err(e) => {
                debug!("IPMI channel {channel}: MAC address: {e}");
                if fatal(&e) {
                    return info;
                }
                // Not a LAN channel (or not present): the next one.
                continue;
            }
        }
        for (param, is_static) in [
            (PARAM_IPV4, false),
            (PARAM_IPV6_STATIC, true),
            (PARAM_IPV6_DYNAMIC, false),
        ] {
            if param != PARAM_IPV4 && info.ipv6.is_some() {
                break;
            }
            match ask(NETFN_TRANSPORT, CMD_GET_LAN_CONFIG, &lan(param, 0)) {
                Ok(d) if param == PARAM_IPV4 => info.ipv4 = parse_ipv4(&d),
                Ok(d) => info.ipv6 = parse_ipv6(&d, is_static),
                Err(e) => {
                    debug!("IPMI channel {channel}: LAN parameter {param}: {e}");
                    if fatal(&e) {
                        info.channel = info.has_address().then_some(channel);
                        return info;
                    }
                }
            }
        }
        if info.has_address() {
            info.channel = Some(channel);
            break;
        }
    }
    info
}

/// The first IPMI device node under `root`, checked by `stat` alone.
pub fn device_path(root: &Root) -> Option<PathBuf> {
    DEVICE_PATHS
        .iter()
        .find(|p| root.exists(p))
        .map(|p| root.path(p))
}

/// Opens the device at `path` and runs [`query`]; `None` when it cannot be opened (logged at
/// debug level: a device node without a BMC behind it, or no permission). What was learnt, and
/// how long it took, is one line at info level.
pub fn query_device(path: &Path, budget: Duration) -> Option<LanInfo> {
    let started = Instant::now();
    let mut dev = match Device::open(path) {
        Ok(d) => d,
        Err(e) => {
            debug!("cannot open {}: {e}", path.display());
            return None;
        }
    };
    let info = query(&mut dev, budget);
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let said = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    tracing::info!(
        "BMC through {}: IPMI {}, LAN channel {}, IPv4 {}, IPv6 {}, MAC {} ({} requests, {ms:.1} ms)",
        path.display(),
        said(info.ipmi_version.clone()),
        said(info.channel.map(|c| c.to_string())),
        said(info.ipv4.map(|a| a.to_string())),
        said(info.ipv6.map(|a| a.to_string())),
        said(info.mac.clone()),
        dev.requests,
    );
    Some(info)
}

// <linux/ipmi.h>, for 64-bit Linux (checked in the tests against the header's sizes).

/// `struct ipmi_msg`.
#[repr(C)]
struct IpmiMsg {
    netfn: u8,
    cmd: u8,
    data_len: u16,
    data: *mut u8,
}

/// `struct ipmi_req`.
#[repr(C)]
struct IpmiReq {
    addr: *mut u8,
    addr_len: libc::c_uint,
    msgid: libc::c_long,
    msg: IpmiMsg,
}

/// `struct ipmi_recv`.
#[repr(C)]
struct IpmiRecv {
    recv_type: libc::c_int,
    addr: *mut u8,
    addr_len: libc::c_uint,
    msgid: libc::c_long,
    msg: IpmiMsg,
}

/// `struct ipmi_system_interface_addr`.
#[repr(C)]
struct SystemInterfaceAddr {
    addr_type: libc::c_int,
    channel: libc::c_short,
    lun: libc::c_uchar,
}

const IPMI_SYSTEM_INTERFACE_ADDR_TYPE: libc::c_int = 0x0c;
const IPMI_BMC_CHANNEL: libc::c_short = 0x0f;
const IPMI_RESPONSE_RECV_TYPE: libc::c_int = 1;
/// `sizeof(struct ipmi_addr)`: the largest address the kernel may write back.
const IPMI_ADDR_SIZE: usize = 40;
/// IPMI_MAX_MSG_LENGTH is 272; a little more so nothing is ever truncated.
const RECV_BUF: usize = 300;

/// `_IOC(dir, 'i', nr, size)` as x86, Arm and RISC-V encode it.
const fn ipmi_ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'i' as u32) << 8) | nr
}
/// `_IOR('i', 13, struct ipmi_req)`.
const IPMICTL_SEND_COMMAND: u32 = ipmi_ioc(2, 13, size_of::<IpmiReq>());
/// `_IOWR('i', 11, struct ipmi_recv)`.
const IPMICTL_RECEIVE_MSG_TRUNC: u32 = ipmi_ioc(3, 11, size_of::<IpmiRecv>());

/// The kernel's IPMI device interface, talking to the BMC over the system interface.
pub struct Device {
    fd: OwnedFd,
    msgid: libc::c_long,
    requests: u32,
}

impl Device {
    pub fn open(path: &Path) -> io::Result<Device> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(Device {
            fd: file.into(),
            msgid: 0,
            requests: 0,
        })
    }

    fn send(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Result<(), IpmiError> {
        let mut payload = data.to_vec();
        let mut addr = SystemInterfaceAddr {
            addr_type: IPMI_SYSTEM_INTERFACE_ADDR_TYPE,
            channel: IPMI_BMC_CHANNEL,
            lun: 0,
        };
        let mut req = IpmiReq {
            addr: (&raw mut addr).cast::<u8>(),
            addr_len: size_of::<SystemInterfaceAddr>() as libc::c_uint,
            msgid: self.msgid,
            msg: IpmiMsg {
                netfn,
                cmd,
                data_len: u16::try_from(payload.len()).unwrap_or(u16::MAX),
                data: payload.as_mut_ptr(),
            },
        };
        // SAFETY: req is a valid ipmi_req whose address and data pointers point at `addr` and
        // `payload`, which live across the call, with their true lengths.
        let rc =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), IPMICTL_SEND_COMMAND as _, &raw mut req) };
        if rc < 0 {
            return Err(IpmiError::Io {
                op: "IPMICTL_SEND_COMMAND",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// One message from the receive queue, if there is one: (type, msgid, data).
    fn receive(&mut self) -> Result<Option<(libc::c_int, libc::c_long, Vec<u8>)>, IpmiError> {
        let mut addr = [0u8; IPMI_ADDR_SIZE];
        let mut buf = [0u8; RECV_BUF];
        let mut recv = IpmiRecv {
            recv_type: 0,
            addr: addr.as_mut_ptr(),
            addr_len: IPMI_ADDR_SIZE as libc::c_uint,
            msgid: 0,
            msg: IpmiMsg {
                netfn: 0,
                cmd: 0,
                data_len: RECV_BUF as u16,
                data: buf.as_mut_ptr(),
            },
        };
        // SAFETY: recv is a valid ipmi_recv whose address and data pointers point at buffers
        // of the lengths given, which live across the call.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                IPMICTL_RECEIVE_MSG_TRUNC as _,
                &raw mut recv,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                // Truncated to the buffer (which is larger than any IPMI message): keep it.
                Some(libc::EMSGSIZE) => Ok(Some((recv.recv_type, recv.msgid, buf.to_vec()))),
                _ => Err(IpmiError::Io {
                    op: "IPMICTL_RECEIVE_MSG_TRUNC",
                    source: e,
                }),
            };
        }
        let len = usize::from(recv.msg.data_len).min(RECV_BUF);
        Ok(Some((recv.recv_type, recv.msgid, buf[..len].to_vec())))
    }

    /// Waits up to `timeout` for the device to have something to read; false on timeout.
    fn wait(&self, timeout: Duration) -> Result<bool, IpmiError> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&raw mut p, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(true);
            }
            return Err(IpmiError::Io {
                op: "poll",
                source: e,
            });
        }
        Ok(rc > 0)
    }
}

impl Transport for Device {
    fn request(
        &mut self,
        netfn: u8,
        cmd: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, IpmiError> {
        let deadline = Instant::now() + timeout;
        self.msgid = self.msgid.wrapping_add(1);
        self.requests += 1;
        self.send(netfn, cmd, data)?;
        loop {
            // Answers to earlier requests that timed out, and events, are read and dropped.
            while let Some((kind, msgid, data)) = self.receive()? {
                if kind == IPMI_RESPONSE_RECV_TYPE && msgid == self.msgid {
                    return Ok(data);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.wait(left)? {
                return Err(IpmiError::Timeout(timeout));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (netfn, cmd, data) of a request.
    type Asked = (u8, u8, Vec<u8>);
    /// A response, or how the exchange fails.
    type Answer = Result<Vec<u8>, fn() -> IpmiError>;

    /// A BMC as bytes: answers by (netfn, cmd, data), records what it was asked.
    struct FakeBmc {
        answers: Vec<(Asked, Answer)>,
        asked: Vec<Asked>,
    }

    impl FakeBmc {
        fn new() -> FakeBmc {
            FakeBmc {
                answers: Vec::new(),
                asked: Vec::new(),
            }
        }
        fn on(mut self, netfn: u8, cmd: u8, data: &[u8], response: &[u8]) -> FakeBmc {
            self.answers
                .push(((netfn, cmd, data.to_vec()), Ok(response.to_vec())));
            self
        }
        fn fail(mut self, netfn: u8, cmd: u8, data: &[u8], e: fn() -> IpmiError) -> FakeBmc {
            self.answers.push(((netfn, cmd, data.to_vec()), Err(e)));
            self
        }
    }

    impl Transport for FakeBmc {
        fn request(
            &mut self,
            netfn: u8,
            cmd: u8,
            data: &[u8],
            _timeout: Duration,
        ) -> Result<Vec<u8>, IpmiError> {
            self.asked.push((netfn, cmd, data.to_vec()));
            let key = (netfn, cmd, data.to_vec());
            match self.answers.iter().find(|(k, _)| *k == key) {
                Some((_, Ok(r))) => Ok(r.clone()),
                Some((_, Err(e))) => Err(e()),
                // What ipmi_sim says of a channel that does not exist.
                None => Ok(vec![0xcb]),
            }
        }
    }

    const DEVICE_ID: [u8; 16] = [
        0, 0x20, 0x01, 0x09, 0x08, 0x02, 0x9f, 0x91, 0x12, 0x00, 0x02, 0x0f, 0, 0, 0, 0,
    ];

    /// A Get LAN Configuration Parameters answer for the MAC (parameter 5): 52:54:00:b3:c0:01.
    const MAC_ANSWER: [u8; 8] = [0, 0x11, 0x52, 0x54, 0, 0xb3, 0xc0, 1];

    fn lan(channel: u8, param: u8) -> Vec<u8> {
        vec![channel, param, 0, 0]
    }

    #[test]
    fn completion_codes() {
        assert_eq!(completion(&[0, 1, 2]).unwrap(), [1, 2]);
        assert!(matches!(
            completion(&[0xc1]),
            Err(IpmiError::Completion(0xc1))
        ));
        assert!(matches!(completion(&[]), Err(IpmiError::Empty)));
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_device_id(&DEVICE_ID[1..]).as_deref(), Some("2.0"));
        assert_eq!(
            parse_device_id(&[0x20, 1, 1, 0, 0x51]).as_deref(),
            Some("1.5")
        );
        assert_eq!(parse_device_id(&[0x20, 1, 1, 0]), None);
        assert_eq!(parse_device_id(&[0x20, 1, 1, 0, 0x00]), None);

        assert_eq!(
            parse_ipv4(&[0x11, 192, 0, 2, 45]),
            Some(Ipv4Addr::new(192, 0, 2, 45))
        );
        assert_eq!(parse_ipv4(&[0x11, 0, 0, 0, 0]), None, "unset");
        assert_eq!(parse_ipv4(&[0x11, 255, 255, 255, 255]), None);
        assert_eq!(parse_ipv4(&[0x11, 192, 0, 2]), None, "short");

        assert_eq!(
            parse_mac(&[0x11, 0x52, 0x54, 0, 0xb3, 0xc0, 0x01]).as_deref(),
            Some("52:54:00:b3:c0:01")
        );
        assert_eq!(parse_mac(&[0x11, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(parse_mac(&[0x11, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(parse_mac(&[0x11, 1, 2, 3]), None);

        let v6 = |source: u8, addr: Ipv6Addr, status: u8| {
            let mut d = vec![0x11, 0, source];
            d.extend(addr.octets());
            d.extend([64, status]);
            d
        };
        let a: Ipv6Addr = "2001:db8::45".parse().unwrap();
        assert_eq!(parse_ipv6(&v6(0x80, a, 0), true), Some(a));
        assert_eq!(parse_ipv6(&v6(0x00, a, 0), true), None, "static, disabled");
        assert_eq!(parse_ipv6(&v6(0x02, a, 0), false), Some(a), "DHCPv6");
        assert_eq!(parse_ipv6(&v6(0x80, a, 1), true), None, "not active");
        let ll: Ipv6Addr = "fe80::5054:ff:feb3:c001".parse().unwrap();
        assert_eq!(parse_ipv6(&v6(0x01, ll, 0), false), None, "link-local");
        assert_eq!(parse_ipv6(&v6(0x80, Ipv6Addr::UNSPECIFIED, 0), true), None);
        assert_eq!(parse_ipv6(&v6(0x80, a, 0)[..20], true), None, "short");
    }

    #[test]
    fn finds_the_first_lan_channel_with_an_address() {
        // Channel 1 is a LAN channel with nothing configured; channel 2 is not a LAN
        // channel; channel 3 has the BMC's address. No IPv6 support.
        let mut bmc = FakeBmc::new()
            .on(0x06, 0x01, &[], &DEVICE_ID)
            .on(0x0c, 0x02, &lan(1, 5), &[0, 0x11, 0, 0, 0, 0, 0, 0])
            .on(0x0c, 0x02, &lan(1, 3), &[0, 0x11, 0, 0, 0, 0])
            .on(0x0c, 0x02, &lan(2, 5), &[0xcc])
            .on(0x0c, 0x02, &lan(3, 5), &MAC_ANSWER)
            .on(0x0c, 0x02, &lan(3, 3), &[0, 0x11, 192, 0, 2, 45])
            .on(0x0c, 0x02, &lan(3, 56), &[0x80])
            .on(0x0c, 0x02, &lan(3, 59), &[0x80]);
        let info = query(&mut bmc, Duration::from_secs(1));
        assert_eq!(
            info,
            LanInfo {
                ipmi_version: Some("2.0".into()),
                channel: Some(3),
                ipv4: Some(Ipv4Addr::new(192, 0, 2, 45)),
                ipv6: None,
                mac: Some("52:54:00:b3:c0:01".into()),
            }
        );
        assert!(
            !bmc.asked.iter().any(|(_, _, d)| d.first() == Some(&4)),
            "stops at the channel that answered: {:?}",
            bmc.asked
        );
    }

    #[test]
    fn ipv6_static_first_then_dynamic() {
        let a: Ipv6Addr = "2001:db8::45".parse().unwrap();
        let mut dynamic = vec![0, 0x11, 0, 0x02];
        dynamic.extend(a.octets());
        dynamic.extend([64, 0]);
        let mut bmc = FakeBmc::new()
            .on(0x06, 0x01, &[], &DEVICE_ID)
            .on(0x0c, 0x02, &lan(1, 5), &MAC_ANSWER)
            .on(0x0c, 0x02, &lan(1, 3), &[0, 0x11, 0, 0, 0, 0])
            .on(0x0c, 0x02, &lan(1, 56), &[0, 0x11, 0, 0, 0, 0, 0])
            .on(0x0c, 0x02, &lan(1, 59), &dynamic);
        let info = query(&mut bmc, Duration::from_secs(1));
        assert_eq!(info.ipv6, Some(a));
        assert_eq!(info.ipv4, None);
        assert_eq!(info.channel, Some(1));
    }

    #[test]
    fn a_silent_bmc_ends_the_conversation() {
        let mut bmc = FakeBmc::new().fail(0x06, 0x01, &[], || {
            IpmiError::Timeout(Duration::from_secs(1))
        });
        assert_eq!(query(&mut bmc, Duration::from_secs(1)), LanInfo::default());
        assert_eq!(bmc.asked.len(), 1, "{:?}", bmc.asked);

        // Answers Get Device ID, then stops answering.
        let mut bmc =
            FakeBmc::new()
                .on(0x06, 0x01, &[], &DEVICE_ID)
                .fail(0x0c, 0x02, &lan(1, 5), || IpmiError::Io {
                    op: "poll",
                    source: io::Error::from_raw_os_error(libc::EIO),
                });
        let info = query(&mut bmc, Duration::from_secs(1));
        assert_eq!(info.ipmi_version.as_deref(), Some("2.0"));
        assert!(!info.has_address());
        assert_eq!(bmc.asked.len(), 2);
    }

    #[test]
    fn no_lan_channel_at_all() {
        // Get Device ID refused too: still asks the channels, each once.
        let mut bmc = FakeBmc::new().on(0x06, 0x01, &[], &[0xc1]);
        assert_eq!(query(&mut bmc, Duration::from_secs(1)), LanInfo::default());
        assert_eq!(bmc.asked.len(), 1 + LAN_CHANNELS.count());
    }

    #[test]
    fn the_budget_bounds_the_whole_conversation() {
        let mut bmc = FakeBmc::new().on(0x06, 0x01, &[], &DEVICE_ID);
        assert_eq!(query(&mut bmc, Duration::ZERO), LanInfo::default());
        assert!(bmc.asked.is_empty());
    }

    #[test]
    fn kernel_structures_match_linux_ipmi_h() {
        // sizeof and the ioctl numbers as <linux/ipmi.h> gives them on x86_64.
        #[cfg(target_pointer_width = "64")]
        {
            assert_eq!(size_of::<IpmiMsg>(), 16);
            assert_eq!(size_of::<IpmiReq>(), 40);
            assert_eq!(size_of::<IpmiRecv>(), 48);
            assert_eq!(IPMICTL_SEND_COMMAND, 0x8028_690d);
            assert_eq!(IPMICTL_RECEIVE_MSG_TRUNC, 0xc030_690b);
        }
        assert_eq!(size_of::<SystemInterfaceAddr>(), 8);
    }

    #[test]
    fn no_device_is_no_answer_not_an_error() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(device_path(&Root::new(t.path())), None);
        assert_eq!(
            query_device(&t.path().join("dev/ipmi0"), Duration::from_secs(1)),
            None
        );
        // Not an IPMI device: the first ioctl fails, nothing is learnt, nothing hangs.
        let f = t.path().join("ipmi0");
        std::fs::write(&f, b"").unwrap();
        assert_eq!(
            query_device(&f, Duration::from_secs(1)),
            Some(LanInfo::default())
        );
    }
}
