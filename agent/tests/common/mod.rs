//! Helpers for the agent's disk tests: loop devices (detached on drop), running the real
//! tools (`sgdisk`, `mkfs.*`, `pvcreate`, `wipefs`, `blkid`, `mdadm --examine`), real ZFS
//! pools made by zfs-fuse (the userspace ZFS daemon, started for the test), and on-disk
//! structures this machine's kernel cannot make (md superblocks need the md driver for
//! `mdadm --create`; an OpenZFS feature-flags label needs the zfs module), written by hand
//! from their formats.

#![allow(clippy::disallowed_methods)] // this helper is the one place these tests spawn processes
#![allow(dead_code)] // each test file uses a part

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use slipway_agent::disk::{self, SelectedDisk};
use slipway_agent::inventory::{self, Inventory};

pub const MIB: u64 = 1 << 20;

/// Runs a tool; panics with its command line, stdout and stderr when it fails (or is missing,
/// naming the Debian package).
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} is needed by this test ({e}); install the test tools with \
                 `cargo xtask test` or .ci/run",
                args[0]
            )
        });
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a tool with `input` on its stdin; panics when it fails.
pub fn run_stdin(args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{} is needed by this test: {e}", args[0]));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a tool and returns (exit code, stdout), whatever the code.
pub fn run_code(args: &[&str]) -> (i32, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} is needed by this test: {e}", args[0]));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A loop device over (part of) a file; detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    /// The whole file.
    pub fn new(file: &Path) -> LoopDevice {
        LoopDevice::window(file, 0, 0)
    }

    /// `len` bytes at `offset` (0: to the end), like a partition the kernel did not scan.
    pub fn window(file: &Path, offset: u64, len: u64) -> LoopDevice {
        assert!(
            is_root(),
            "loop-device tests need root (losetup); run the tests as root, as CI does"
        );
        let (o, l) = (offset.to_string(), len.to_string());
        let mut args = vec!["losetup", "--find", "--show"];
        if offset > 0 {
            args.extend(["--offset", &o]);
        }
        if len > 0 {
            args.extend(["--sizelimit", &l]);
        }
        let f = file.display().to_string();
        args.push(&f);
        let path = PathBuf::from(run(&args).trim());
        LoopDevice { path }
    }

    pub fn name(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// Creates a sparse file of `size` bytes.
pub fn sparse(path: &Path, size: u64) {
    let f = fs::File::create(path).expect("create disk file");
    f.set_len(size).expect("size disk file");
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    f.write_all_at(data, offset).expect("write");
    f.sync_all().expect("sync");
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(path).expect("open for reading");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("read");
    buf
}

/// Deterministic non-zero bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The selection for one device, as the agent's `wipe DEVICE` makes it.
pub fn select(device: &Path) -> SelectedDisk {
    let inv = Inventory::collect(
        Path::new("/"),
        &inventory::Options {
            disks: vec![device.to_path_buf()],
            ..Default::default()
        },
    );
    disk::select_for_cleaning(&inv.disks)
        .pop()
        .expect("the device is selected")
}

// ----- md RAID superblocks (Linux md_p.h), as `mdadm --create` would write them -----

fn md_csum_fold(words: impl Iterator<Item = u32>) -> u32 {
    let sum: u64 = words.map(u64::from).sum();
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

/// A v1.x superblock for a RAID1 member of `size` bytes: `minor` 0 (at the end), 1 (at 0) or
/// 2 (at 4 KiB). Returns (offset, 4 KiB block holding it).
pub fn md_v1(size: u64, minor: u32) -> (u64, Vec<u8>) {
    let sectors = size / 512;
    let (sb_sector, data_offset, data_size) = match minor {
        0 => {
            let sb = (sectors - 16) & !7;
            (sb, 0u64, sb - 8)
        }
        1 => (0, 2048, sectors - 2048),
        _ => (8, 2048, sectors - 2048),
    };
    let max_dev = 2u32;
    let mut b = vec![0u8; 4096];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put32(&mut b, 0, 0xa92b_4efc);
    put32(&mut b, 4, 1); // major_version
    b[16..32].copy_from_slice(&[0x5a; 16]); // set_uuid
    b[32..44].copy_from_slice(b"slipway:md0\0");
    put64(&mut b, 64, 1_700_000_000); // ctime
    put32(&mut b, 72, 1); // level
    put64(&mut b, 80, data_size); // size
    put32(&mut b, 92, 2); // raid_disks
    put64(&mut b, 128, data_offset);
    put64(&mut b, 136, data_size);
    put64(&mut b, 144, sb_sector); // super_offset
    put32(&mut b, 160, 0); // dev_number
    b[168..184].copy_from_slice(&[0xa5; 16]); // device_uuid
    put64(&mut b, 192, 1_700_000_000); // utime
    put64(&mut b, 200, 1); // events
    put64(&mut b, 208, u64::MAX); // resync_offset: clean
    put32(&mut b, 220, max_dev);
    b[256..258].copy_from_slice(&0u16.to_le_bytes()); // dev 0: role 0
    b[258..260].copy_from_slice(&1u16.to_le_bytes()); // dev 1: role 1
    let len = 256 + 2 * max_dev as usize;
    let csum = md_csum_fold(
        b[..len]
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])),
    );
    put32(&mut b, 216, csum);
    (sb_sector * 512, b)
}

/// A v0.90 superblock for a RAID1 member of `size` bytes, at the end (64 KiB aligned).
pub fn md_v090(size: u64) -> (u64, Vec<u8>) {
    let off = (size & !0xffff) - 0x10000;
    let mut w = [0u32; 1024];
    w[0] = 0xa92b_4efc;
    w[1] = 0; // major
    w[2] = 90; // minor
    w[5] = 0x1234_5678; // set_uuid0
    w[6] = 1_700_000_000; // ctime
    w[7] = 1; // level
    w[8] = ((off / 1024) as u32).saturating_sub(0); // size in KiB
    w[9] = 2; // nr_disks
    w[10] = 2; // raid_disks
    w[13] = 0x9abc_def0; // set_uuid1..3
    w[14] = 0x0fed_cba9;
    w[15] = 0x8765_4321;
    w[32] = 1_700_000_000; // utime
    w[33] = 1; // state: clean
    w[34] = 2; // active
    w[35] = 2; // working
    w[39] = 1; // events_lo
    // disks[0] and disks[1] (words 128.., 32 each): number, major, minor, raid_disk, state
    for (i, base) in [128usize, 160].into_iter().enumerate() {
        w[base] = i as u32;
        w[base + 3] = i as u32;
        w[base + 4] = 6; // active | sync
    }
    // this_disk (word 992) = disks[0]
    w[992] = 0;
    w[996] = 6;
    w[38] = md_csum_fold(w.iter().copied());
    let b = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    (off, b)
}

// ----- ZFS vdev labels (OpenZFS on-disk format: 4 labels of 256 KiB, 2 at each end) -----

/// An XDR nvlist of string and uint64 pairs, as in a vdev label's nvlist area.
fn xdr_nvlist(pairs: &[(&str, Result<&str, u64>)]) -> Vec<u8> {
    let mut out = vec![1, 1, 0, 0]; // encoding XDR, little-endian host
    out.extend(0u32.to_be_bytes()); // nvl_version
    out.extend(1u32.to_be_bytes()); // NV_UNIQUE_NAME
    let pad = |v: &mut Vec<u8>| {
        while !v.len().is_multiple_of(4) {
            v.push(0)
        }
    };
    for (name, value) in pairs {
        let mut p = Vec::new();
        p.extend((name.len() as u32).to_be_bytes());
        p.extend(name.as_bytes());
        pad(&mut p);
        match value {
            Ok(s) => {
                p.extend(9u32.to_be_bytes()); // DATA_TYPE_STRING
                p.extend(1u32.to_be_bytes());
                p.extend((s.len() as u32).to_be_bytes());
                p.extend(s.as_bytes());
                pad(&mut p);
            }
            Err(n) => {
                p.extend(8u32.to_be_bytes()); // DATA_TYPE_UINT64
                p.extend(1u32.to_be_bytes());
                p.extend(n.to_be_bytes());
            }
        }
        let size = (p.len() + 8) as u32;
        out.extend(size.to_be_bytes()); // encoded size
        out.extend(size.to_be_bytes()); // decoded size
        out.extend(p);
    }
    out.extend([0u8; 8]); // end of list
    out
}

/// The four labels of a ZFS vdev of `size` bytes, pool `pool`: (offset, 256 KiB label).
pub fn zfs_labels(size: u64, pool: &str) -> Vec<(u64, Vec<u8>)> {
    const LABEL: u64 = 256 << 10;
    let mut label = vec![0u8; LABEL as usize];
    let nv = xdr_nvlist(&[
        ("version", Err(5000)),
        ("name", Ok(pool)),
        ("state", Err(0)),
        ("txg", Err(4)),
        ("pool_guid", Err(0x1122_3344_5566_7788)),
        ("guid", Err(0x99aa_bbcc_ddee_ff00)),
    ]);
    label[16 << 10..(16 << 10) + nv.len()].copy_from_slice(&nv);
    // Uberblock ring at 128 KiB: 1 KiB slots; a few valid uberblocks.
    for i in 0..4u64 {
        let at = (128 << 10) + (i as usize) * 1024;
        label[at..at + 8].copy_from_slice(&0x00ba_b10cu64.to_le_bytes()); // ub_magic
        label[at + 8..at + 16].copy_from_slice(&5000u64.to_le_bytes()); // ub_version
        label[at + 16..at + 24].copy_from_slice(&(i + 1).to_le_bytes()); // ub_txg
        label[at + 32..at + 40].copy_from_slice(&1_700_000_000u64.to_le_bytes());
    }
    let aligned = size / LABEL * LABEL;
    [0, LABEL, aligned - 2 * LABEL, aligned - LABEL]
        .into_iter()
        .map(|off| (off, label.clone()))
        .collect()
}

// ----- real ZFS pools, made by zfs-fuse (Debian's userspace ZFS daemon, pool version 23) -----

/// The zfs-fuse daemon for one test: an exclusive lock (tests in other processes that need it
/// wait), the daemon started unless one already answers, and stopped again on drop if this
/// guard started it. Pools made under it should be exported (or destroyed) before it drops.
pub struct ZfsDaemon {
    child: Option<std::process::Child>,
    _lock: fs::File,
}

impl ZfsDaemon {
    pub fn start() -> ZfsDaemon {
        use std::os::fd::AsRawFd;
        let lock_path = std::env::temp_dir().join("slipway-tests-zfs-fuse.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", lock_path.display()));
        // SAFETY: flock on a file descriptor this function owns.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let answers = || {
            Command::new("zpool")
                .arg("list")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if answers() {
            return ZfsDaemon {
                child: None,
                _lock: lock,
            };
        }
        let child = Command::new("zfs-fuse")
            .args(["--no-daemon", "--no-kstat-mount"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("zfs-fuse is needed by this test (Debian package zfs-fuse): {e}")
            });
        let guard = ZfsDaemon {
            child: Some(child),
            _lock: lock,
        };
        let t = std::time::Instant::now();
        while !answers() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(30),
                "zfs-fuse did not answer `zpool list` within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        guard
    }
}

impl Drop for ZfsDaemon {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // SIGTERM: zfs-fuse closes its pools and socket (SIGKILL would leave the socket).
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_secs(30) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A pool made by `zpool create` on one device, no mountpoint, no cache file; exported with
/// [`ZfsPool::export`], destroyed on drop if it is still imported.
pub struct ZfsPool {
    pub name: String,
    imported: bool,
}

impl ZfsPool {
    pub fn create(_daemon: &ZfsDaemon, name: &str, device: &str) -> ZfsPool {
        run(&[
            "zpool",
            "create",
            "-f",
            "-m",
            "none",
            "-o",
            "cachefile=none",
            name,
            device,
        ]);
        ZfsPool {
            name: name.to_string(),
            imported: true,
        }
    }

    /// `zpool export`: the pool's labels stay on the device, as on a disk moved between hosts.
    pub fn export(&mut self) {
        run(&["zpool", "export", &self.name]);
        self.imported = false;
    }
}

impl Drop for ZfsPool {
    fn drop(&mut self) {
        if self.imported {
            let _ = Command::new("zpool")
                .args(["destroy", "-f", &self.name])
                .status();
        }
    }
}

/// `zpool import -d DIR` over a directory holding only a link to `device`: the pools zfs-fuse
/// would import from it (the names of the `pool:` lines).
pub fn zpool_importable(device: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = device.file_name().expect("device name");
    std::os::unix::fs::symlink(device, dir.path().join(name)).expect("symlink");
    let d = dir.path().display().to_string();
    let (_, out) = run_code(&["zpool", "import", "-d", &d]);
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("pool: "))
        .map(str::to_string)
        .collect()
}
