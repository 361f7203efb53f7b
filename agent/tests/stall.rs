//! The standalone `slipway-agent write-image` against a server on 127.0.0.1 that serves the
//! first MiB and then drips a byte a second, Range requests too: with a 2 s stall timeout
//! it must give up within seconds (not wait for ever, as one byte a second never lets a
//! read time out), naming the URL and the bytes received, having said "stalled" meanwhile,
//! and leave the target file (an old "system" before) unbootable: first and last MiB zero.

#![allow(clippy::disallowed_methods)] // the test runs the agent binary it tests

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Serves `body` at every path, honouring `Range: bytes=N-`: bytes before `drip_at` at
/// once, then one a second. Returns the URL.
fn dripping_server(body: Vec<u8>, drip_at: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/os.img", listener.local_addr().unwrap());
    let body = std::sync::Arc::new(body);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let body = body.clone();
            thread::spawn(move || {
                let _ = answer(stream, &body, drip_at);
            });
        }
    });
    url
}

fn answer(mut s: TcpStream, body: &[u8], drip_at: usize) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut b = [0u8; 1];
    while !req.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Ok(());
        }
        req.push(b[0]);
    }
    let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
    let range = text.lines().find_map(|l| {
        let r = l.strip_prefix("range: bytes=")?;
        let (a, e) = r.split_once('-')?;
        let e = match e.trim() {
            "" => body.len(),
            e => e.parse::<usize>().ok()?.min(body.len() - 1) + 1,
        };
        Some((a.parse::<usize>().ok()?, e))
    });
    let (start, end) = match range {
        Some((a, e)) => {
            write!(
                s,
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes \
                 {a}-{}/{}\r\nConnection: close\r\n\r\n",
                e - a,
                e - 1,
                body.len()
            )?;
            (a, e)
        }
        None => {
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: \
                 close\r\n\r\n",
                body.len()
            )?;
            (0, body.len())
        }
    };
    let fast = end.min(drip_at.max(start));
    s.write_all(&body[start..fast])?;
    for b in &body[fast..end] {
        s.write_all(std::slice::from_ref(b))?;
        s.flush()?;
        thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[test]
fn write_image_gives_up_on_a_dripping_server_and_leaves_the_target_unbootable() {
    let image = pattern(3 * MIB, 7);
    let drip_at = MIB + 100;
    let url = dripping_server(image.clone(), drip_at);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.img");
    // The old system: not a zero byte anywhere.
    std::fs::write(&target, pattern(8 * MIB, 3)).unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_slipway-agent"))
        .args(["write-image", &url])
        .arg(&target)
        .args(["--checksum", &sha256_hex(&image)])
        .args(["--stall-timeout", "2", "--retries", "1"])
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    // Two windows of 2 s (the stream and one resume), the backoff, the head read: not 30 min.
    assert!(took < Duration::from_secs(20), "took {took:?}: {stderr}");
    let err = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    let got: u64 = err
        .split_once(" stalled: no progress (less than 64.0 KiB) for 2 s after ")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no stall error naming the bytes: {err}"));
    assert!(
        got >= drip_at as u64 && got < drip_at as u64 + 20,
        "{got} bytes: {err}"
    );
    assert!(
        err.contains(&format!("the download of {url} stalled"))
            && err.contains(&format!(
                "after {got} of {} bytes (resumed 1 time)",
                image.len()
            )),
        "{err}"
    );
    assert!(err.contains("were zeroed"), "{err}");
    // Progress lines said so meanwhile, at the bytes received (the writer has seen none: the
    // first 4 MiB buffer never filled).
    let shown: Vec<u64> = stderr
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("stalled: no progress for ")?;
            rest.split_once(" s at ")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        !shown.is_empty() && shown.iter().all(|b| *b >= drip_at as u64),
        "stalled progress lines: {shown:?}: {stderr}"
    );
    let disk = std::fs::read(&target).unwrap();
    assert!(disk[..MIB].iter().all(|b| *b == 0), "first MiB not zeroed");
    assert!(
        disk[disk.len() - MIB..].iter().all(|b| *b == 0),
        "last MiB not zeroed"
    );
}

#[test]
fn a_zero_stall_timeout_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_slipway-agent"))
        .args(["write-image", "http://127.0.0.1:9/x", "/nonexistent"])
        .args(["--checksum", &"0".repeat(64), "--stall-timeout", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--stall-timeout"), "{stderr}");
}
