//! Cleaning against real signatures: partition tables by `sgdisk`/`sfdisk`, filesystems by
//! `mkfs.ext4`/`mkfs.xfs`/`mkfs.vfat`/`mkswap`, LVM by `pvcreate`, ZFS pools by `zpool create`
//! (zfs-fuse, the userspace ZFS daemon: pool version 23), on loop devices; md RAID (0.90, 1.0,
//! 1.1, 1.2) and an OpenZFS feature-flags label (version 5000) written by hand from their
//! on-disk formats (this machine has neither the md nor the zfs kernel module, so
//! `mdadm --create` and OpenZFS's `zpool create` cannot run; `mdadm --examine` and `blkid`
//! confirm the hand-made ones). After the wipe, `wipefs --no-act` and `blkid -p` find
//! nothing, on the disk and at every partition's offset, `zpool import` finds no pool, and
//! every byte outside the reported areas is unchanged.
//!
//! Needs root (loop devices), /dev/fuse (zfs-fuse) and the tools of `.ci/run`.

mod common;

use std::fs;
use std::path::Path;
use std::time::Instant;

use common::*;
use slipway_agent::disk::{self, FileDisk};

/// `blkid -p` at a byte range of `dev`: the TYPE found, or None.
fn probe(dev: &str, offset: u64, len: u64) -> Option<String> {
    let (o, l) = (offset.to_string(), len.to_string());
    let (code, out) = run_code(&[
        "blkid", "-p", "-o", "value", "-s", "TYPE", "-O", &o, "-S", &l, dev,
    ]);
    match code {
        0 => Some(out.trim().to_string()),
        2 => None, // nothing found
        _ => panic!("blkid -p -O {o} -S {l} {dev} failed with {code}: {out}"),
    }
}

/// Asserts every byte that differs between `before` and `after` lies in one of `areas`.
fn assert_changes_within(before: &Path, after: &Path, areas: &[disk::Area]) {
    let (a, b) = (fs::read(before).unwrap(), fs::read(after).unwrap());
    assert_eq!(a.len(), b.len());
    let mut changed = 0u64;
    for (chunk, (x, y)) in a.chunks(1 << 16).zip(b.chunks(1 << 16)).enumerate() {
        if x == y {
            continue;
        }
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            if p != q {
                let at = (chunk << 16) as u64 + i as u64;
                changed += 1;
                assert!(
                    areas.iter().any(|r| r.start <= at && at < r.end),
                    "byte {at} changed but lies in no reported area: {areas:#?}"
                );
            }
        }
    }
    assert!(changed > 0, "the wipe changed nothing");
}

struct Part {
    start_mib: u64,
    mib: u64,
    expect: &'static str,
}

#[test]
fn metadata_wipe_on_gpt_removes_every_signature_in_every_partition_and_nothing_else() {
    let zfs_daemon = ZfsDaemon::start();
    let pool_name = format!("tank{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    let size = 1024 * MIB;
    sparse(&file, size);
    let parts = [
        Part {
            start_mib: 1,
            mib: 64,
            expect: "ext4",
        },
        Part {
            start_mib: 65,
            mib: 320,
            expect: "xfs",
        },
        Part {
            start_mib: 385,
            mib: 32,
            expect: "vfat",
        },
        Part {
            start_mib: 417,
            mib: 64,
            expect: "LVM2_member",
        },
        Part {
            start_mib: 481,
            mib: 64,
            expect: "linux_raid_member",
        }, // md 1.2
        Part {
            start_mib: 545,
            mib: 64,
            expect: "linux_raid_member",
        }, // md 0.90
        Part {
            start_mib: 609,
            mib: 64,
            expect: "linux_raid_member",
        }, // md 1.0
        Part {
            start_mib: 673,
            mib: 64,
            expect: "linux_raid_member",
        }, // md 1.1
        Part {
            start_mib: 737,
            mib: 80,
            expect: "zfs_member",
        },
        Part {
            start_mib: 817,
            mib: 64,
            expect: "swap",
        },
    ];
    let f = file.display().to_string();
    let mut sgdisk = vec!["sgdisk".to_string(), "-o".into()];
    for (i, p) in parts.iter().enumerate() {
        sgdisk.push(format!(
            "-n{}:{}:{}",
            i + 1,
            p.start_mib * 2048,
            (p.start_mib + p.mib) * 2048 - 1
        ));
    }
    sgdisk.push(f.clone());
    run(&sgdisk.iter().map(String::as_str).collect::<Vec<_>>());

    for (i, p) in parts.iter().enumerate() {
        let (start, len) = (p.start_mib * MIB, p.mib * MIB);
        match i {
            0 | 1 | 2 | 3 | 9 => {
                let part = LoopDevice::window(&file, start, len);
                let n = part.name();
                match i {
                    0 => run(&["mkfs.ext4", "-q", "-F", &n]),
                    1 => run(&["mkfs.xfs", "-q", "-f", &n]),
                    2 => run(&["mkfs.vfat", "-n", "OLDFAT", &n]),
                    3 => run(&["pvcreate", "-ff", "-y", "--zero", "y", &n]),
                    _ => run(&["mkswap", &n]),
                };
            }
            4 => {
                let (off, sb) = md_v1(len, 2);
                write_at(&file, start + off, &sb);
                // The array's own filesystem, at the data offset (1 MiB).
                let inner = LoopDevice::window(&file, start + MIB, len - MIB);
                run(&["mkfs.ext4", "-q", "-F", &inner.name()]);
            }
            5 => {
                let (off, sb) = md_v090(len);
                write_at(&file, start + off, &sb);
            }
            6 | 7 => {
                let (off, sb) = md_v1(len, if i == 6 { 0 } else { 1 });
                write_at(&file, start + off, &sb);
            }
            8 => {
                let part = LoopDevice::window(&file, start, len);
                let mut pool = ZfsPool::create(&zfs_daemon, &pool_name, &part.name());
                pool.export();
                assert_eq!(
                    zpool_importable(&part.path),
                    std::slice::from_ref(&pool_name)
                );
            }
            _ => unreachable!(),
        }
        // A sentinel in the middle of each partition: data the wipe must not touch.
        write_at(&file, start + len / 2, &pattern(65536, i as u64 + 1));
    }
    // mdadm itself accepts the hand-written superblocks.
    for (i, version) in [(4, "1.2"), (5, "0.90"), (6, "1.0"), (7, "1.1")] {
        let p = &parts[i];
        let part = LoopDevice::window(&file, p.start_mib * MIB, p.mib * MIB);
        let out = run(&["mdadm", "--examine", &part.name()]);
        assert!(out.contains(&format!("Version : {version}")), "{out}");
    }

    let before = dir.path().join("before.img");
    run(&["cp", "--sparse=always", &f, &before.display().to_string()]);
    let dev = LoopDevice::new(&file);
    let d = dev.name();
    assert!(run(&["wipefs", "--no-act", &d]).contains("gpt"));
    for p in &parts {
        assert_eq!(
            probe(&d, p.start_mib * MIB, p.mib * MIB).as_deref(),
            Some(p.expect),
            "the test did not build a {} signature at {} MiB",
            p.expect,
            p.start_mib
        );
    }
    assert_eq!(probe(&d, 482 * MIB, 63 * MIB).as_deref(), Some("ext4"));
    let zfs = run(&[
        "blkid",
        "-p",
        "-O",
        &(737 * MIB).to_string(),
        "-S",
        &(80 * MIB).to_string(),
        &d,
    ]);
    assert!(zfs.contains(&format!("LABEL=\"{pool_name}\"")), "{zfs}");

    let target = select(&dev.path);
    let mut writer = FileDisk::open(&target).unwrap();
    let t = Instant::now();
    let wiped = disk::wipe_metadata(&target, &mut writer).unwrap();
    eprintln!(
        "metadata wipe of {} (10 partitions): {} in {} areas, {:.1} ms",
        d,
        disk::human(wiped.bytes()),
        wiped.areas.len(),
        t.elapsed().as_secs_f64() * 1e3
    );

    assert_eq!(
        run(&["wipefs", "--no-act", &d]).trim(),
        "",
        "wipefs still finds signatures"
    );
    assert_eq!(
        run_code(&["blkid", "-p", &d]).0,
        2,
        "blkid still finds something"
    );
    for p in &parts {
        assert_eq!(
            probe(&d, p.start_mib * MIB, p.mib * MIB),
            None,
            "{} survived",
            p.expect
        );
        let part = LoopDevice::window(&file, p.start_mib * MIB, p.mib * MIB);
        assert_eq!(run(&["wipefs", "--no-act", &part.name()]).trim(), "");
        if p.expect == "zfs_member" {
            assert_eq!(
                zpool_importable(&part.path),
                Vec::<String>::new(),
                "zpool import still finds the pool"
            );
        }
    }
    assert_eq!(
        probe(&d, 482 * MIB, 63 * MIB),
        None,
        "the md array's filesystem survived"
    );
    let (code, _) = run_code(&["sgdisk", "-p", &f]);
    let table = run_code(&["sfdisk", "-d", &f]);
    assert!(
        code != 0 || table.0 != 0,
        "a partition table is still readable"
    );

    drop(writer);
    assert_changes_within(&before, &file, &wiped.areas);
    for (i, p) in parts.iter().enumerate() {
        let at = p.start_mib * MIB + p.mib * MIB / 2;
        assert!(
            read_at(&file, at, 65536) == pattern(65536, i as u64 + 1),
            "data in the middle of partition {} was touched",
            i + 1
        );
    }
    // Metadata, not a full erase in disguise.
    assert!(
        wiped.bytes() <= 32 * MIB,
        "{} zeroed",
        disk::human(wiped.bytes())
    );
}

#[test]
fn metadata_wipe_on_mbr_reaches_logical_partitions_and_whole_disk_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    sparse(&file, 256 * MIB);
    let f = file.display().to_string();
    // p1 ext4, extended p2 with logical p5 (xfs is too big here: ext4) and p6 (LVM PV).
    let script = "label: dos\nstart=2048, size=131072, type=83\nstart=133120, size=389120, type=5\nstart=135168, size=131072, type=83\nstart=268288, size=131072, type=8e\n";
    run_stdin(&["sfdisk", "-q", &f], script);
    let layout: Vec<(u64, u64, &str)> = vec![
        (2048 * 512, 131072 * 512, "ext4"),
        (135168 * 512, 131072 * 512, "ext4"),
        (268288 * 512, 131072 * 512, "LVM2_member"),
    ];
    for (start, len, what) in &layout {
        let part = LoopDevice::window(&file, *start, *len);
        match *what {
            "ext4" => run(&["mkfs.ext4", "-q", "-F", &part.name()]),
            _ => run(&["pvcreate", "-ff", "-y", &part.name()]),
        };
    }
    let dev = LoopDevice::new(&file);
    let d = dev.name();
    assert!(run(&["wipefs", "--no-act", &d]).contains("dos"));
    for (start, len, what) in &layout {
        assert_eq!(probe(&d, *start, *len).as_deref(), Some(*what));
    }
    let target = select(&dev.path);
    let wiped = disk::wipe_metadata(&target, &mut FileDisk::open(&target).unwrap()).unwrap();
    // Both EBRs (at the start of the extended partition and before the second logical
    // partition) are zeroed.
    for ebr in [133120 * 512, 266240 * 512] {
        assert!(
            wiped
                .areas
                .iter()
                .any(|a| a.start <= ebr && ebr + 512 <= a.end),
            "EBR at {ebr} not wiped: {:?}",
            wiped.areas
        );
    }
    assert_eq!(run(&["wipefs", "--no-act", &d]).trim(), "");
    for (start, len, what) in &layout {
        assert_eq!(probe(&d, *start, *len), None, "{what} at {start} survived");
    }
}

#[test]
fn whole_disk_lvm_md_and_zfs_signatures_are_wiped() {
    let zfs_daemon = ZfsDaemon::start();
    let pool_name = format!("rpool{}", std::process::id());
    for kind in ["lvm", "md-0.90", "md-1.0", "zfs-5000", "zpool"] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        let size = 100 * MIB + 12345 * 512; // not aligned to anything
        sparse(&file, size);
        match kind {
            "zpool" => {
                let dev = LoopDevice::new(&file);
                let mut pool = ZfsPool::create(&zfs_daemon, &pool_name, &dev.name());
                pool.export();
                assert_eq!(
                    zpool_importable(&dev.path),
                    std::slice::from_ref(&pool_name)
                );
            }
            "lvm" => {
                let dev = LoopDevice::new(&file);
                run(&["pvcreate", "-ff", "-y", &dev.name()]);
            }
            "md-0.90" => {
                let (off, sb) = md_v090(size);
                write_at(&file, off, &sb);
            }
            "md-1.0" => {
                let (off, sb) = md_v1(size, 0);
                write_at(&file, off, &sb);
            }
            _ => {
                for (off, label) in zfs_labels(size, "rpool") {
                    write_at(&file, off, &label);
                }
            }
        }
        let dev = LoopDevice::new(&file);
        let d = dev.name();
        assert_ne!(
            run(&["wipefs", "--no-act", &d]).trim(),
            "",
            "{kind}: nothing built"
        );
        let target = select(&dev.path);
        disk::wipe_metadata(&target, &mut FileDisk::open(&target).unwrap()).unwrap();
        assert_eq!(
            run(&["wipefs", "--no-act", &d]).trim(),
            "",
            "{kind} survived"
        );
        assert_eq!(run_code(&["blkid", "-p", &d]).0, 2, "{kind} survived");
        assert_eq!(
            zpool_importable(&dev.path),
            Vec::<String>::new(),
            "{kind}: zpool import finds a pool"
        );
    }
}

#[test]
fn full_erase_zeroes_every_byte_of_a_loop_device_and_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    fs::write(&file, pattern(48 * MIB as usize, 5)).unwrap();
    let dev = LoopDevice::new(&file);
    let target = select(&dev.path);
    let erased = disk::erase_full(
        &target,
        &mut FileDisk::open(&target).unwrap(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(erased.bytes, 48 * MIB);
    assert!(
        ["discard", "zeroout"].contains(&erased.method),
        "{}",
        erased.method
    );
    let data = fs::read(&dev.path).unwrap();
    assert!(
        data.iter().all(|b| *b == 0),
        "a byte survived the full erase"
    );
    drop(dev);

    let plain = dir.path().join("plain.img");
    fs::write(&plain, pattern(8 * MIB as usize, 6)).unwrap();
    let target = select(&plain);
    let erased = disk::erase_full(
        &target,
        &mut FileDisk::open(&target).unwrap(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(erased.method, "punch-hole");
    let data = fs::read(&plain).unwrap();
    assert_eq!(data.len(), 8 * MIB as usize);
    assert!(data.iter().all(|b| *b == 0));
}
