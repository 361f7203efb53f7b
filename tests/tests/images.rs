//! Images beyond raw through the real processes: a zstd-compressed-cluster qcow2 image
//! verified by a checksum file, served by the coordinator's own HTTP server, written by the
//! agent onto a loop device, and compared with `qemu-img convert -O raw` of the same image;
//! and the standalone `slipway-agent write-image` with an xz-compressed raw image.

#![allow(clippy::disallowed_methods)] // qemu-img, xz and sha256sum make the test images

use std::fs;
use std::process::Command;
use std::time::Duration;

use slipway_tests::{Agent, Coordinator, LoopDevice, bins, pattern, sha256_hex};

const MIB: usize = 1 << 20;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A disk image with data in spread extents and zeros between them.
fn sparse_image(size: usize) -> Vec<u8> {
    let mut img = vec![0u8; size];
    let mut at = 0;
    let mut i = 0;
    while at < size {
        let len = (300_000 + i * 77_777).min(size - at);
        img[at..at + len].copy_from_slice(&pattern(len, i as u64 + 1));
        at += len + 2 * MIB + i * 4096;
        i += 1;
    }
    img
}

#[test]
fn qcow2_with_a_checksum_file_is_provisioned_onto_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let raw = dir.path().join("os.raw");
    let image = sparse_image(24 * MIB);
    fs::write(&raw, &image).unwrap();
    let qcow2 = c.images.join("os.qcow2");
    run(Command::new("qemu-img")
        .args([
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
        ])
        .arg(&raw)
        .arg(&qcow2));
    let file = fs::read(&qcow2).unwrap();
    fs::write(
        c.images.join("SHA256SUMS"),
        format!(
            "{}  other.qcow2\n{}  os.qcow2\n",
            sha256_hex(b"x"),
            sha256_hex(&file)
        ),
    )
    .unwrap();
    let disk = LoopDevice::new(&dir.path().join("disk.raw"), 64 * MIB as u64);
    disk.write_at(0, &pattern(MIB, 7)); // an old OS's boot sector
    let doc = format!(
        "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: worker-q\nspec:\n  online: true\n  image:\n    url: {}\n    checksum: {}\n    format: qcow2\n  rootDeviceHints:\n    deviceName: {}\n",
        c.image_url("os.qcow2"),
        c.image_url("SHA256SUMS"),
        disk.path.display()
    );
    fs::write(c.hosts.join("worker-q.yaml"), doc).unwrap();
    c.wait_state("worker-q", "inspecting", Duration::from_secs(10));
    let token = c.token("worker-q", "10m");
    let _agent = Agent::start(&c, &token, &disk.path, &dir.path().join("agent"), &[]);
    c.wait_state("worker-q", "provisioned", Duration::from_secs(60));

    let reference = dir.path().join("ref.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&qcow2)
        .arg(&reference));
    let want = fs::read(&reference).unwrap();
    assert_eq!(want, image);
    let got = disk.read(want.len());
    let diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(diff, None, "the disk differs from qemu-img convert -O raw");
    let out = c.cli(&["describe", "host", "worker-q"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sha256 verified"), "{text}");
}

#[test]
fn standalone_write_image_takes_an_xz_image_from_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(dir.path(), &[]);
    let image = sparse_image(10 * MIB + 333);
    let raw = c.images.join("os.img");
    fs::write(&raw, &image).unwrap();
    run(Command::new("xz").args(["-0", "-T1"]).arg(&raw));
    let xz = fs::read(c.images.join("os.img.xz")).unwrap();
    slipway_tests::wait_until(Duration::from_secs(10), "the image server", || {
        std::net::TcpStream::connect(("127.0.0.1", c.http_port)).ok()
    });
    let target = dir.path().join("target.disk");
    fs::write(&target, pattern(16 * MIB, 3)).unwrap();
    let out = Command::new(&bins().agent)
        .arg("write-image")
        .arg(c.image_url("os.img.xz"))
        .arg(&target)
        .args(["--checksum", &sha256_hex(&xz), "--format", "raw"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("xz-compressed raw") && stdout.contains("verified"),
        "{stdout}"
    );
    let got = fs::read(&target).unwrap();
    assert!(got[..image.len()] == image[..]);
    // A wrong checksum: non-zero exit, the message names URL, device and offset, and the
    // target's ends are zeroed.
    let out = Command::new(&bins().agent)
        .arg("write-image")
        .arg(c.image_url("os.img.xz"))
        .arg(&target)
        .args(["--checksum", &sha256_hex(b"no")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checksum mismatch") && err.contains(&target.display().to_string()),
        "{err}"
    );
    let got = fs::read(&target).unwrap();
    assert!(got[..MIB].iter().all(|b| *b == 0) && got[got.len() - MIB..].iter().all(|b| *b == 0));
}
