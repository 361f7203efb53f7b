//! Stalled downloads against the test server: a server dripping a byte at a time (never
//! letting a read time out) stalls, is resumed by Range requests and, once the retries are
//! spent, fails naming the URL and the bytes received, with the disk left unbootable; a stall
//! followed by a good resume completes with the right checksum; the progress reports say
//! "stalled" meanwhile.

use std::time::Instant;

use super::*;

/// Stall options for these tests: a `secs` window, `retries` resumes, quick backoff.
fn stall_opts(secs: u64, retries: u32) -> WriteOptions {
    let base = fast_opts();
    WriteOptions {
        fetch: FetchOptions {
            retries,
            stall: StallOptions {
                timeout: Duration::from_secs(secs),
                ..Default::default()
            },
            ..base.fetch
        },
        ..base
    }
}

/// Drips from `at` on, a byte every 300 ms: well inside the 2 s read timeout, so only the
/// stall window can end such a read.
fn dripping(at: u64, drips: Option<usize>) -> Faults {
    Faults {
        drip_at: Some(at),
        drip_every: Duration::from_millis(300),
        drips,
        ..Default::default()
    }
}

#[test]
fn a_dripping_server_stalls_is_resumed_and_fails_naming_url_and_bytes() {
    let img = pattern(4 * MIB, 40);
    let at = 2 * MIB as u64 + 7;
    let srv = serve(vec![("os.img", img.clone())], dripping(at, None));
    let url = srv.url("os.img");
    let disk = MemDisk::new(16 * MIB, 9, MemFaults::default());
    let started = Instant::now();
    let (r, seen) = rt().block_on(write_seen(
        &url,
        &sha256_hex(&img),
        Box::new(disk.clone()),
        &stall_opts(2, 2),
    ));
    let took = started.elapsed();
    let e = r.unwrap_err();
    let msg = crate::commands::chain(&e);
    // Three windows of 2 s (the first request and two resumes), plus backoff.
    assert!(took < Duration::from_secs(12), "took {took:?}: {msg}");
    let ImageError::Stalled {
        got,
        total,
        resumes,
        ..
    } = e.cause()
    else {
        panic!("not a stall: {msg}");
    };
    assert!(*got >= at && *got < at + 40, "{msg}");
    assert_eq!((*total, *resumes), (Some(img.len() as u64), 2), "{msg}");
    assert!(
        msg.contains(&format!(
            "the download of {url} stalled: no progress (less than 64.0 KiB) for 2 s after \
             {got} of {} bytes (resumed 2 times)",
            img.len()
        )),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("failed at byte {got} of the download")),
        "{msg}"
    );
    assert!(
        msg.contains("/dev/memdisk") && msg.contains("were zeroed"),
        "{msg}"
    );
    assert_eq!(e.kind(), "download");
    disk.assert_unbootable();
    // Each stall was resumed at the next byte with a Range request.
    let resumed: Vec<u64> = srv
        .plain_requests()
        .iter()
        .filter_map(|r| {
            r.as_deref()?
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse()
                .ok()
        })
        .filter(|from| *from >= at)
        .collect();
    assert_eq!(resumed.len(), 2, "{:?}", srv.ranges());
    assert!(resumed[0] > at && resumed[1] > resumed[0], "{resumed:?}");
    // The reports said so while it lasted (shown after half the 2 s window), with the time.
    let stalled: Vec<&Progress> = seen.iter().filter(|p| p.phase == STALLED).collect();
    assert!(
        stalled.iter().any(|p| p.stalled_seconds >= 2),
        "no stalled report of 2 s or more: {seen:?}"
    );
    // At the bytes received, not the 2 MiB of full buffers the writer has seen.
    assert!(
        stalled.iter().all(|p| p.bytes_done >= at
            && p.bytes_per_second == 0
            && p.bytes_total == img.len() as u64),
        "{stalled:?}"
    );
}

#[test]
fn a_server_dripping_from_the_first_byte_stalls_in_the_head_read() {
    let img = pattern(3 * MIB, 41);
    let (msg, e, _) = expect_failure(
        &img,
        &sha256_hex(&img),
        Format::Raw,
        dripping(0, None),
        MemFaults::default(),
        stall_opts(2, 1),
    );
    let ImageError::Stalled { got, resumes, .. } = e.cause() else {
        panic!("not a stall: {msg}");
    };
    assert!(*got > 0 && *got < 30, "{msg}");
    assert_eq!(*resumes, 1);
    assert!(
        msg.contains(&format!(
            "after {got} of {} bytes (resumed 1 time)",
            img.len()
        )),
        "{msg}"
    );
}

#[test]
fn an_answer_whose_head_never_comes_is_a_stall() {
    let img = pattern(MIB, 42);
    // The client's own read timeouts (2 s) are longer: only the stall timeout ends this.
    let opts = stall_opts(1, 1);
    let started = Instant::now();
    let (msg, e, _) = expect_failure(
        &img,
        &sha256_hex(&img),
        Format::Raw,
        Faults {
            silent: true,
            ..Default::default()
        },
        MemFaults::default(),
        opts,
    );
    assert!(started.elapsed() < Duration::from_secs(8), "{msg}");
    assert!(
        matches!(e.cause(), ImageError::Stalled { got: 0, .. }),
        "{msg}"
    );
    assert!(msg.contains("after 0 bytes (resumed 1 time)"), "{msg}");
}

#[test]
fn a_stall_then_a_good_resume_completes_with_the_right_checksum() {
    let img = disk_image(6 * MIB + 321, false, 43);
    let at = 3 * MIB as u64 + 5;
    // Only the first answer to reach `at` drips; the Range request after the stall is served.
    let srv = serve(vec![("os.img", img.clone())], dripping(at, Some(1)));
    let disk = MemDisk::new(8 * MIB, 9, MemFaults::default());
    // A 3 s window: the stall is shown after 1.5 s, before the idle writer's 2nd report.
    let (r, seen) = rt().block_on(write_seen(
        &srv.url("os.img"),
        &sha256_hex(&img),
        Box::new(disk.clone()),
        &stall_opts(3, 2),
    ));
    let w = r.unwrap_or_else(|e| panic!("{}", crate::commands::chain(&e)));
    assert_eq!(w.bytes, img.len() as u64);
    assert_eq!(w.digest, sha256_hex(&img), "every byte hashed once");
    assert!(disk.bytes()[..img.len()] == img[..]);
    let ranges = srv.ranges();
    assert!(
        ranges.iter().any(|r| r
            .as_deref()
            .and_then(|r| r
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse::<u64>()
                .ok())
            .is_some_and(|from| from > at)),
        "resumed after the drip with a Range request: {ranges:?}"
    );
    assert!(
        seen.iter().any(|p| p.phase == STALLED),
        "the stall was reported: {seen:?}"
    );
    let last = seen.last().map(|p| p.phase);
    assert_eq!(last, Some("sync"), "{seen:?}");
}

#[test]
fn stall_errors_read_as_the_operator_needs_them() {
    let e = ImageError::Stalled {
        url: "http://images/os.img".into(),
        got: 1234,
        total: Some(5678),
        timeout: Duration::from_secs(60),
        min_bytes: 64 << 10,
        resumes: 3,
    };
    assert_eq!(
        e.to_string(),
        "the download of http://images/os.img stalled: no progress (less than 64.0 KiB) for \
         60 s after 1234 of 5678 bytes (resumed 3 times)"
    );
    assert_eq!(e.kind(), "download");
    let e = ImageError::Stalled {
        url: "http://images/os.img".into(),
        got: 1234,
        total: None,
        timeout: Duration::from_millis(1500),
        min_bytes: 64 << 10,
        resumes: 1,
    };
    assert!(
        e.to_string()
            .ends_with("for 1.5 s after 1234 bytes (resumed 1 time)"),
        "{e}"
    );
}

#[test]
fn progress_lines_say_when_a_download_is_stalled() {
    let p = Progress {
        phase: "write",
        bytes_done: 5,
        bytes_total: 9,
        bytes_per_second: 2048,
        stalled_seconds: 0,
    };
    assert_eq!(p.to_string(), "write: 5 of 9 bytes (2.0 KiB/s)");
    let p = Progress {
        phase: STALLED,
        bytes_per_second: 0,
        stalled_seconds: 12,
        ..p
    };
    assert_eq!(
        p.to_string(),
        "stalled: no progress for 12 s at 5 of 9 bytes"
    );
}

#[test]
fn only_a_window_worth_of_bytes_restarts_the_retry_budget() {
    let o = FetchOptions::default();
    assert!(!source::progressed(0, &o));
    assert!(!source::progressed(30, &o), "a drip is not progress");
    assert!(source::progressed(64 << 10, &o));
}
