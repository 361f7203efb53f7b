//! The ramdisk as built by `cargo xtask ramdisk`: a static agent as /init, the modules for
//! common virtual and physical hardware closed over their dependencies, within the size
//! budget. (`cargo xtask test` builds it first.)

use std::fs;

use slipway_tests::{elf_interpreter, vm};

#[test]
fn the_agent_is_static() {
    let agent = vm::workspace().join("target/x86_64-unknown-linux-musl/release/slipway-agent");
    let bytes = fs::read(&agent)
        .unwrap_or_else(|e| panic!("{}: {e}; run cargo xtask ramdisk", agent.display()));
    assert_eq!(
        elf_interpreter(&bytes),
        Ok(None),
        "{} must not need a dynamic loader",
        agent.display()
    );
    eprintln!(
        "static agent: {:.1} MiB",
        bytes.len() as f64 / (1 << 20) as f64
    );
    // The glibc test binary itself is the counter-example: the check can fail.
    let me = fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(elf_interpreter(&me).unwrap().is_some());
}

#[test]
fn the_initramfs_holds_the_agent_and_the_modules_within_budget() {
    let art = vm::artifacts();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(art.dir.join("manifest.json")).unwrap()).unwrap();
    let total =
        manifest["kernel_bytes"].as_u64().unwrap() + manifest["initramfs_bytes"].as_u64().unwrap();
    assert_eq!(manifest["total_bytes"].as_u64().unwrap(), total);
    assert!(
        total <= 20 << 20,
        "kernel + initramfs is {total} bytes, over 20 MiB"
    );
    eprintln!(
        "kernel {:.1} MiB + initramfs {:.1} MiB = {:.1} MiB, {} modules",
        manifest["kernel_bytes"].as_u64().unwrap() as f64 / 1048576.0,
        manifest["initramfs_bytes"].as_u64().unwrap() as f64 / 1048576.0,
        total as f64 / 1048576.0,
        manifest["modules"]
    );

    let compressed = fs::read(art.dir.join("initramfs")).unwrap();
    assert_eq!(
        &compressed[..4],
        &[0x28, 0xb5, 0x2f, 0xfd],
        "zstd-compressed"
    );
    let cpio = zstd::decode_all(&compressed[..]).unwrap();
    assert_eq!(&cpio[..6], b"070701", "newc cpio");
    let names = cpio_names(&cpio);
    let agent =
        fs::read(vm::workspace().join("target/x86_64-unknown-linux-musl/release/slipway-agent"))
            .unwrap();
    let init = cpio_file(&cpio, "init").expect("/init");
    assert!(init == agent, "/init is the static agent");
    assert!(names.iter().any(|n| n == "dev/console"));
    let kver = manifest["kernel_version"].as_str().unwrap();
    let has = |m: &str| {
        names.iter().any(|n| {
            n.starts_with(&format!("lib/modules/{kver}/")) && n.ends_with(&format!("/{m}.ko"))
        })
    };
    for m in [
        "virtio_net",
        "virtio_blk",
        "virtio_scsi",
        "e1000",
        "e1000e",
        "ahci",
        "nvme",
        "sd_mod",
        "sr_mod",
        "isofs",
        "ixgbe",
        "i40e",
        "ice",
        "bnxt_en",
        "mlx5_core",
        "megaraid_sas",
        "mpt3sas",
    ] {
        assert!(has(m), "module {m} is in the ramdisk");
    }
    for f in ["modules.dep", "modules.alias", "modules.softdep"] {
        assert!(names.contains(&format!("lib/modules/{kver}/{f}")), "{f}");
    }
    // Closed over dependencies: every module modules.dep names is present.
    let dep =
        String::from_utf8(cpio_file(&cpio, &format!("lib/modules/{kver}/modules.dep")).unwrap())
            .unwrap();
    for line in dep.lines() {
        for path in line.split([':', ' ']).filter(|p| p.ends_with(".ko")) {
            assert!(
                names.contains(&format!("lib/modules/{kver}/{path}")),
                "{path} (a dependency) is missing"
            );
        }
    }
}

/// Names of the members of a newc archive.
fn cpio_names(cpio: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((name, _, next)) = member(cpio, at) {
        if name == "TRAILER!!!" {
            break;
        }
        out.push(name);
        at = next;
    }
    out
}

fn cpio_file(cpio: &[u8], want: &str) -> Option<Vec<u8>> {
    let mut at = 0;
    while let Some((name, data, next)) = member(cpio, at) {
        if name == want {
            return Some(data.to_vec());
        }
        at = next;
    }
    None
}

fn member(cpio: &[u8], at: usize) -> Option<(String, &[u8], usize)> {
    let hex = |o: usize| {
        usize::from_str_radix(std::str::from_utf8(cpio.get(at + o..at + o + 8)?).ok()?, 16).ok()
    };
    if cpio.get(at..at + 6)? != b"070701" {
        return None;
    }
    let size = hex(54)?;
    let namesize = hex(94)?;
    let name = String::from_utf8_lossy(cpio.get(at + 110..at + 110 + namesize - 1)?).into_owned();
    let data_at = (at + 110 + namesize).div_ceil(4) * 4;
    let data = cpio.get(data_at..data_at + size)?;
    Some((name, data, (data_at + size).div_ceil(4) * 4))
}
