//! QEMU virtual machines for the VM tests, under TCG (this kind of machine has no usable KVM).
//!
//! Each VM writes its serial console to a file; when a test fails (the VM is dropped while the
//! thread panics) the console is copied to `target/vm-artifacts/` and its path printed. VMs run
//! one at a time ([`exclusive`]): two TCG guests on two cores double every boot time.

#![allow(clippy::disallowed_methods)] // the harness spawns QEMU, dnsmasq and ip

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Serialises VM tests within a test binary.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The ramdisk and test image built by `cargo xtask ramdisk` and `cargo xtask test-image`.
pub struct Artifacts {
    pub dir: PathBuf,
    pub test_os: PathBuf,
}

pub fn artifacts() -> Artifacts {
    let dir = workspace().join("target/ramdisk/out");
    let a = Artifacts {
        test_os: dir.join("test-os.img"),
        dir,
    };
    for f in ["vmlinuz", "initramfs", "slipway.iso", "test-os.img"] {
        assert!(
            a.dir.join(f).exists(),
            "{} is missing: build the ramdisk and the test image first (cargo xtask ramdisk && cargo xtask test-image; `cargo xtask test` does both)",
            a.dir.join(f).display()
        );
    }
    a
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// How a VM's NIC is connected.
pub enum Net {
    /// QEMU's user-mode network; DHCP hands out `bootfile` (iPXE fetches it over HTTP).
    User { bootfile: Option<String> },
    /// A tap device (in a network namespace the test made).
    Tap { ifname: String },
}

/// A disk controller model.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    Virtio,
    Ahci,
}

pub struct Spec<'a> {
    pub name: &'a str,
    pub cpus: u32,
    pub mem_mib: u32,
    /// `virtio-net-pci` or `e1000`.
    pub nic: &'a str,
    pub mac: &'a str,
    pub net: Net,
    pub disk: Option<(&'a Path, Bus, &'a str)>,
    pub cdrom: Option<&'a Path>,
    /// Boot from the CD first (else the network first, then the disk).
    pub boot_cdrom: bool,
    /// Run inside this network namespace.
    pub netns: Option<&'a str>,
    /// UEFI firmware (OVMF, from Debian's `ovmf`) instead of SeaBIOS.
    pub uefi: bool,
    /// An external BMC ([`IpmiSim`]) on this port of 127.0.0.1, behind an ISA KCS interface.
    pub bmc: Option<u16>,
}

/// OVMF's code and variable-store templates (Debian's `ovmf`; 4 MiB flash layout).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

pub struct Vm {
    child: Option<Child>,
    pub serial: PathBuf,
    pub name: String,
    pub started: Instant,
}

impl Vm {
    pub fn start(spec: Spec<'_>, dir: &Path) -> Vm {
        let serial = dir.join(format!("{}-serial.log", spec.name));
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-cpu".into(),
            "max".into(),
            "-smp".into(),
            spec.cpus.to_string(),
            "-m".into(),
            spec.mem_mib.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-serial".into(),
            format!("file:{}", serial.display()),
            "-name".into(),
            spec.name.into(),
        ];
        let netdev = match &spec.net {
            Net::User { bootfile: Some(b) } => format!("user,id=n0,bootfile={b}"),
            Net::User { bootfile: None } => "user,id=n0".into(),
            Net::Tap { ifname } => format!("tap,id=n0,ifname={ifname},script=no,downscript=no"),
        };
        let net_boot = if spec.boot_cdrom { 2 } else { 0 };
        args.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!(
                "{},netdev=n0,mac={},bootindex={net_boot}",
                spec.nic, spec.mac
            ),
        ]);
        if let Some((path, bus, serial_no)) = spec.disk {
            args.extend([
                "-drive".into(),
                format!("file={},format=raw,if=none,id=d0", path.display()),
            ]);
            match bus {
                Bus::Virtio => args.extend([
                    "-device".into(),
                    format!("virtio-blk-pci,drive=d0,serial={serial_no},bootindex=1"),
                ]),
                Bus::Ahci => args.extend([
                    "-device".into(),
                    "ahci,id=ahci0".into(),
                    "-device".into(),
                    format!("ide-hd,drive=d0,bus=ahci0.0,serial={serial_no},bootindex=1"),
                ]),
            }
        }
        if spec.uefi {
            // Each VM writes its own copy of the variable store.
            let vars = dir.join(format!("{}-OVMF_VARS.fd", spec.name));
            fs::copy(OVMF_VARS, &vars)
                .unwrap_or_else(|e| panic!("cannot copy {OVMF_VARS} (package ovmf): {e}"));
            args.extend([
                "-drive".into(),
                format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
            ]);
        }
        if let Some(iso) = spec.cdrom {
            args.extend([
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=cd0,media=cdrom,readonly=on",
                    iso.display()
                ),
                "-device".into(),
                format!(
                    "ide-cd,drive=cd0,bootindex={}",
                    if spec.boot_cdrom { 0 } else { 3 }
                ),
            ]);
        }
        if let Some(port) = spec.bmc {
            // QEMU's own ipmi-bmc-sim answers no LAN commands: the BMC is ipmi_sim, outside.
            args.extend([
                "-chardev".into(),
                format!("socket,id=ipmi0,host=127.0.0.1,port={port},reconnect=10"),
                "-device".into(),
                "ipmi-bmc-extern,id=bmc0,chardev=ipmi0".into(),
                "-device".into(),
                "isa-ipmi-kcs,bmc=bmc0".into(),
            ]);
        }
        let mut cmd = match spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        let log = fs::File::create(dir.join(format!("{}-qemu.log", spec.name))).expect("qemu log");
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64 ({e}); apt-get install -y qemu-system-x86 ipxe-qemu"));
        Vm {
            child: Some(child),
            serial,
            name: spec.name.into(),
            started: Instant::now(),
        }
    }

    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Waits for `needle` on the serial console; returns the time since the VM started.
    pub fn wait_serial(&mut self, needle: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.serial_text().contains(needle) {
                return self.started.elapsed();
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "VM {} exited ({status}) before printing {needle:?}",
                    self.name
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "VM {} did not print {needle:?} within {timeout:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for QEMU to exit (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().expect("VM running");
        loop {
            if let Some(status) = child.try_wait().expect("wait qemu") {
                self.child = None;
                return status;
            }
            if start.elapsed() > timeout {
                panic!("VM {} did not power off within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let dir = workspace().join("target/vm-artifacts");
            let _ = fs::create_dir_all(&dir);
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let to = dir.join(format!("{}-{stamp}-serial.log", self.name));
            if fs::copy(&self.serial, &to).is_ok() {
                eprintln!(
                    "serial console of VM {} saved to {}",
                    self.name,
                    to.display()
                );
            }
            let text = self.serial_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of {}'s console ---\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// A network namespace with a bridge (IPv4 + an IPv6 ULA for router advertisements) and a tap
/// for one VM. Removed, with everything running in it, on drop.
pub struct Netns {
    pub name: String,
    pub bridge_ip: String,
    pub tap: String,
    children: Vec<Child>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (apt-get install -y iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// `subnet` is the /24 prefix, e.g. "10.77.0"; the bridge gets .1.
    pub fn new(tag: &str, subnet: &str) -> Netns {
        let name = format!("slw-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            bridge_ip: format!("{subnet}.1"),
            tap: "tap0".into(),
            children: Vec::new(),
        };
        let x = |a: &[&str]| {
            let mut v = vec!["netns", "exec", &name, "ip"];
            v.extend_from_slice(a);
            ip(&v);
        };
        x(&["link", "set", "lo", "up"]);
        x(&["link", "add", "br0", "type", "bridge"]);
        x(&["addr", "add", &format!("{subnet}.1/24"), "dev", "br0"]);
        x(&["addr", "add", "fd00:5117::1/64", "dev", "br0", "nodad"]);
        x(&["tuntap", "add", "dev", "tap0", "mode", "tap"]);
        x(&["link", "set", "tap0", "master", "br0"]);
        x(&["link", "set", "tap0", "up"]);
        x(&["link", "set", "br0", "up"]);
        ns
    }

    /// Starts `program args` inside the namespace; killed on drop.
    pub fn spawn(&mut self, program: &str, args: &[&str], log: &Path) -> u32 {
        let file = fs::File::create(log).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} in {}: {e}", self.name));
        let pid = child.id();
        self.children.push(child);
        pid
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An external IPMI BMC for a VM: OpenIPMI's `ipmi_sim` (Debian `openipmi`) with one LAN
/// channel (1) whose IPv4 address and MAC are the given ones, and the system interface QEMU's
/// `ipmi-bmc-extern` connects to, on `port` of 127.0.0.1. Killed on drop.
pub struct IpmiSim {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl IpmiSim {
    pub fn start(dir: &Path, ipv4: &str, mac: &str) -> IpmiSim {
        use std::os::unix::fs::PermissionsExt;
        let port = crate::free_port();
        let lan_port = crate::free_port();
        let state = dir.join("ipmi-state");
        fs::create_dir_all(&state).expect("ipmi_sim state dir");
        // ipmi_sim asks this program for the LAN parameters it does not keep itself:
        // `PROG get NAME...` prints `NAME: VALUE` lines (lanserv/extcmd.c).
        let program = dir.join("ipmi-lancontrol");
        fs::write(
            &program,
            format!(
                r#"#!/bin/sh
[ "$1" = get ] || exit 0
shift
for n in "$@"; do
  case "$n" in
    ip_addr) echo "ip_addr: {ipv4}" ;;
    ip_addr_src) echo "ip_addr_src: static" ;;
    mac_addr) echo "mac_addr: {mac}" ;;
    subnet_mask) echo "subnet_mask: 255.255.255.0" ;;
    *_ip_addr) echo "$n: 0.0.0.0" ;;
    *_mac_addr) echo "$n: 00:00:00:00:00:00" ;;
  esac
done
"#
            ),
        )
        .expect("write the LAN control program");
        fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).expect("chmod");
        let conf = dir.join("ipmi-lan.conf");
        fs::write(
            &conf,
            format!(
                r#"name "slipway-test-bmc"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {lan_port}
    priv_limit admin
    allowed_auths_admin md5
    guid a123456789abcdefa123456789abcdef
    lan_config_program "{}"
  endlan
  serial 15 127.0.0.1 {port} codec VM
  startnow false
  user 2 true "admin" "password" admin 10 md5
"#,
                program.display()
            ),
        )
        .expect("write lan.conf");
        // ipmi_sim starts with no management controller: make the BMC (Get Device ID values).
        let emu = dir.join("ipmi-bmc.emu");
        fs::write(
            &emu,
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n",
        )
        .expect("write the emu file");
        let log = dir.join("ipmi_sim.log");
        let file = fs::File::create(&log).expect("ipmi_sim log");
        let child = Command::new("ipmi_sim")
            .arg("-c")
            .arg(&conf)
            .arg("-f")
            .arg(&emu)
            .arg("-s")
            .arg(&state)
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start ipmi_sim ({e}); apt-get install -y openipmi"));
        let mut sim = IpmiSim { child, port, log };
        // QEMU must find it listening, or the guest's ipmi_si finds no BMC.
        let start = Instant::now();
        while !tcp_listening(port) {
            if let Ok(Some(status)) = sim.child.try_wait() {
                panic!(
                    "ipmi_sim exited ({status}): {}",
                    fs::read_to_string(&sim.log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "ipmi_sim does not listen on 127.0.0.1:{port}: {}",
                fs::read_to_string(&sim.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sim
    }
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether something listens on TCP `port` of 127.0.0.1 (/proc/net/tcp, state 0A), without
/// connecting to it.
fn tcp_listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
}

/// A sparse raw disk file.
pub fn sparse_disk(path: &Path, size: u64) {
    fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("create disk file");
}

/// `GET url` over plain HTTP/1.0 (enough for the coordinator's own server).
pub fn http_get(url: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (hostport, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(hostport).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read");
    let at = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP header end");
    let head = String::from_utf8_lossy(&buf[..at]).into_owned();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "GET {url}: {head}"
    );
    buf[at + 4..].to_vec()
}

/// Waits until the file at `path` contains `needle` (e.g. a daemon's "started" line); panics
/// with the file's content after `timeout`.
pub fn wait_file_contains(path: &Path, needle: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        if start.elapsed() > timeout {
            panic!("{} never said {needle:?}:\n{text}", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
