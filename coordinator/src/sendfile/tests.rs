use std::io::{Read, Write};
use std::net::TcpStream as StdStream;

use super::*;
use crate::limits::Caps;

fn parse(raw: &str) -> Option<Ask> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut req = httparse::Request::new(&mut headers);
    assert!(req.parse(raw.as_bytes()).unwrap().is_complete());
    ask(&req)
}

#[test]
fn asks_for_images_are_read_and_everything_else_is_left_to_the_router() {
    let a = parse(
        "GET /images/os.img HTTP/1.1\r\nHost: x\r\nRange: bytes=10-\r\nIf-Range: \"e\"\r\n\r\n",
    )
    .unwrap();
    assert_eq!(a.rel, PathBuf::from("os.img"));
    assert_eq!(a.range, Some(Range::From(10, None)));
    assert_eq!(a.if_range.as_deref(), Some("\"e\""));
    assert!(a.keep_alive && !a.head_only);
    let a = parse("HEAD /images/a%20b/c.qcow2?x=1 HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(a.rel, PathBuf::from("a b/c.qcow2"));
    assert!(a.head_only && !a.keep_alive);
    assert!(
        !parse("GET /images/x HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .keep_alive
    );
    assert!(
        parse("GET /images/x HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .keep_alive
    );
    for other in [
        "POST /images/x HTTP/1.1\r\n\r\n",
        "GET /boot/boot.ipxe HTTP/1.1\r\n\r\n",
        "GET /images/ HTTP/1.1\r\n\r\n",
        "GET /images/../state/ca.key HTTP/1.1\r\n\r\n",
        "GET /images/%2e%2e/state/ca.key HTTP/1.1\r\n\r\n",
        "GET /images/a/../../x HTTP/1.1\r\n\r\n",
        "GET /images/a//b HTTP/1.1\r\n\r\n",
        "GET /images/./x HTTP/1.1\r\n\r\n",
        "GET /images/a%00b HTTP/1.1\r\n\r\n",
        "GET /images/a%5c..%5cb HTTP/1.1\r\n\r\n",
        "GET /images/x HTTP/1.1\r\nRange: bytes=0-1,5-6\r\n\r\n",
        "GET /images/x HTTP/1.1\r\nRange: items=0-1\r\n\r\n",
        "GET /images/x HTTP/1.1\r\nRange: bytes=5-1\r\n\r\n",
        "GET /images/x HTTP/1.1\r\nIf-None-Match: \"e\"\r\n\r\n",
        "GET /images/x HTTP/1.1\r\nIf-Modified-Since: Mon, 23 Nov 2026 10:00:00 GMT\r\n\r\n",
        "GET /images/x HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
        "GET /images/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        assert_eq!(parse(other), None, "{other:?}");
    }
}

#[test]
fn answers_whole_files_ranges_and_resumes_against_a_changed_file() {
    let mtime = SystemTime::UNIX_EPOCH + Duration::new(0x6b05b456, 0x0ef07e8d);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut a = parse("GET /images/os.img HTTP/1.1\r\n\r\n").unwrap();
    let whole = answer(&a, 1000, mtime, "application/octet-stream", now).unwrap();
    assert_eq!((whole.status, whole.start, whole.len), (200, 0, 1000));
    expect_test::expect![[r#"
        HTTP/1.1 200 OK
        content-type: application/octet-stream
        accept-ranges: bytes
        last-modified: Tue, 24 Nov 2026 15:59:18 GMT
        etag: "6b05b456.0ef07e8d-3e8"
        content-length: 1000
        date: Fri, 15 Jan 2027 08:00:00 GMT

    "#]]
    .assert_eq(&whole.head.replace("\r\n", "\n"));
    let at = |r, if_range: Option<&str>, a: &mut Ask| {
        a.range = Some(r);
        a.if_range = if_range.map(str::to_string);
        answer(a, 1000, mtime, "x", now).map(|x| (x.status, x.start, x.len))
    };
    assert_eq!(
        at(Range::From(10, None), None, &mut a),
        Some((206, 10, 990))
    );
    assert_eq!(
        at(Range::From(10, Some(19)), None, &mut a),
        Some((206, 10, 10))
    );
    assert_eq!(
        at(Range::From(10, Some(5000)), None, &mut a),
        Some((206, 10, 990))
    );
    assert_eq!(at(Range::Last(100), None, &mut a), Some((206, 900, 100)));
    assert_eq!(at(Range::Last(5000), None, &mut a), Some((206, 0, 1000)));
    // Past the end, or nothing: the router's 416.
    assert_eq!(at(Range::From(1000, None), None, &mut a), None);
    assert_eq!(at(Range::Last(0), None, &mut a), None);
    // If-Range: the same ETag or date resumes; another one gets the whole file.
    let etag = "\"6b05b456.0ef07e8d-3e8\"";
    assert_eq!(
        at(Range::From(10, None), Some(etag), &mut a),
        Some((206, 10, 990))
    );
    let date = "Tue, 24 Nov 2026 15:59:18 GMT";
    assert_eq!(
        at(Range::From(10, None), Some(date), &mut a),
        Some((206, 10, 990))
    );
    assert_eq!(
        at(Range::From(10, None), Some("\"old\""), &mut a),
        Some((200, 0, 1000))
    );
    assert_eq!(
        at(
            Range::From(10, None),
            Some("Mon, 23 Nov 2026 10:00:00 GMT"),
            &mut a
        ),
        Some((200, 0, 1000))
    );
    a.if_range = None;
    a.range = Some(Range::From(10, Some(19)));
    let r = answer(&a, 1000, mtime, "x", now).unwrap();
    assert!(
        r.head.contains("content-range: bytes 10-19/1000\r\n"),
        "{}",
        r.head
    );
}

// ----- the real server: this module in front of the coordinator's router -----

struct Server {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    metrics: Arc<crate::metrics::Metrics>,
    _rt: tokio::runtime::Runtime,
}

const NO_CAPS: Caps = Caps {
    total: 1 << 20,
    per_source: 1 << 20,
};

fn server() -> Server {
    server_with(512, NO_CAPS, DEADLINES)
}

/// The server, on a runtime with at most `blocking` blocking threads, with these caps and
/// deadlines.
fn server_with(blocking: usize, caps: Caps, deadlines: Deadlines) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(blocking)
        .enable_all()
        .build()
        .unwrap();
    let metrics = crate::metrics::Metrics::new();
    let gate = Gate::new(crate::limits::Port::Http, caps, metrics.clone());
    let addr = rt.block_on(async {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let urls = crate::boot::Urls {
            http: format!("http://{addr}"),
            agent: "https://127.0.0.1:1".into(),
            ca_fingerprint: "00".into(),
        };
        let router = crate::http::router(
            images.clone(),
            dir.path().join("boot"),
            urls,
            "console=ttyS0".into(),
            crate::http::Shared {
                tx,
                isos: crate::iso::Isos::new(dir.path().join("iso"), dir.path().join("t.iso"))
                    .unwrap(),
                boot_limit: Arc::new(crate::ratelimit::PerAddress::new(0.0, 1)),
                metrics: crate::metrics::Metrics::new(),
                view: Default::default(),
            },
        );
        tokio::spawn(serve(tcp, images, router, gate, deadlines));
        addr
    });
    Server {
        addr,
        dir,
        metrics,
        _rt: rt,
    }
}

/// Sends `requests` on one connection and reads until the server closes it.
fn exchange(addr: SocketAddr, requests: &str) -> Vec<u8> {
    let mut s = StdStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(requests.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn serves_images_with_sendfile_and_hands_the_rest_to_the_router() {
    let srv = server();
    let img: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(srv.dir.path().join("images/sub/os.img"), &img).unwrap();

    // Whole file, then a range on the same connection, then a route of the router's.
    let out = exchange(
        srv.addr,
        "GET /images/sub/os.img HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /images/sub/os.img HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-1999\r\n\r\n\
         GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with(b"HTTP/1.1 200 OK\r\n"));
    let body = find(&out, b"\r\n\r\n").unwrap() + 4;
    assert!(out[body..body + img.len()] == img[..], "whole body differs");
    let rest = &out[body + img.len()..];
    assert!(
        rest.starts_with(b"HTTP/1.1 206 Partial Content\r\n"),
        "{}",
        String::from_utf8_lossy(&rest[..200])
    );
    assert!(find(rest, b"content-range: bytes 1000-1999/3000000\r\n").is_some());
    let b = find(rest, b"\r\n\r\n").unwrap() + 4;
    assert!(rest[b..b + 1000] == img[1000..2000]);
    let last = String::from_utf8_lossy(&rest[b + 1000..]).to_string();
    assert!(
        last.starts_with("HTTP/1.1 200 OK\r\n") && last.ends_with("ok\n"),
        "{last}"
    );

    // A resume against a file that changed since gets the whole file (`ServeDir` alone
    // would answer the range).
    let out = exchange(
        srv.addr,
        "GET /images/sub/os.img HTTP/1.1\r\nRange: bytes=100-\r\nIf-Range: \"stale\"\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(out[find(&out, b"\r\n\r\n").unwrap() + 4..] == img[..]);

    // HEAD: the headers of the whole file, no body.
    let out = String::from_utf8(exchange(
        srv.addr,
        "HEAD /images/sub/os.img HTTP/1.1\r\nConnection: close\r\n\r\n",
    ))
    .unwrap();
    assert!(
        out.contains("content-length: 3000000\r\n") && out.ends_with("\r\n\r\n"),
        "{out}"
    );

    // What this module does not answer, the router does: a missing file, another method,
    // several ranges, a range past the end.
    for (req, want) in [
        (
            "GET /images/nothing.img HTTP/1.1\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 404",
        ),
        (
            "DELETE /images/sub/os.img HTTP/1.1\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 405",
        ),
        (
            "GET /images/sub/os.img HTTP/1.1\r\nRange: bytes=5000000-\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 416",
        ),
        (
            "GET /images/../images/sub/os.img HTTP/1.1\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 4",
        ),
    ] {
        let out = String::from_utf8_lossy(&exchange(srv.addr, req)).to_string();
        assert!(out.starts_with(want), "{req:?}: {out}");
    }
}

#[test]
fn a_stalled_image_download_holds_no_thread_so_other_downloads_go_on() {
    // One blocking thread in all. A download whose client reads nothing must not keep it:
    // another download, and requests that are not downloads, are still answered. (When a
    // download held its thread for as long as it ran, the second one waited for the first.)
    let srv = server_with(1, NO_CAPS, DEADLINES);
    let big = vec![7u8; 64 << 20];
    std::fs::write(srv.dir.path().join("images/big.img"), &big).unwrap();
    let small: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
    std::fs::write(srv.dir.path().join("images/small.img"), &small).unwrap();
    let mut stalled = StdStream::connect(srv.addr).unwrap();
    stalled
        .write_all(b"GET /images/big.img HTTP/1.1\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..2 {
        let out = exchange(
            srv.addr,
            "GET /images/small.img HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        let body = find(&out, b"\r\n\r\n").unwrap() + 4;
        assert!(out.starts_with(b"HTTP/1.1 200 OK"));
        assert!(out[body..] == small[..], "the second download is whole");
    }
    let out = exchange(
        srv.addr,
        "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(String::from_utf8_lossy(&out).ends_with("ok\n"));
    // The stalled download was under way, and it still gets every byte once read.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stalled.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200 OK"));
    let mut rest = vec![0u8; big.len()];
    stalled.read_exact(&mut rest).unwrap();
    assert!(rest == big);
}

// ----- limits: deadlines and caps -----

const SHORT: Deadlines = Deadlines {
    head: Duration::from_millis(600),
    stall: Duration::from_millis(600),
};

/// Sends `head` a byte every 50 ms (much faster than the deadline, so an idle timer would
/// never fire) after `first` at once; returns what the server answered and how long after
/// `first` was sent the connection ended.
fn drip(addr: SocketAddr, first: &str, head: &str) -> (String, Duration) {
    let mut s = StdStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    s.write_all(first.as_bytes()).unwrap();
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    for b in head.bytes().cycle() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a dripping client is never cut off"
        );
        if s.write_all(&[b]).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

fn metric(srv: &Server, line: &str) -> bool {
    srv.metrics.render().lines().any(|l| l == line)
}

#[test]
fn a_dripped_request_head_is_cut_at_the_deadline_on_both_paths() {
    let srv = server_with(512, NO_CAPS, SHORT);
    std::fs::write(srv.dir.path().join("images/os.img"), b"image").unwrap();
    let drip_head =
        "GET /healthz HTTP/1.1\r\nX-Drip: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    // The first head, on the fast path.
    let (out, took) = drip(srv.addr, "", drip_head);
    assert!(out.is_empty(), "{out}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The second, after an image answered by the fast path: the deadline runs from its end.
    let (out, took) = drip(srv.addr, "GET /images/os.img HTTP/1.1\r\n\r\n", drip_head);
    assert!(
        out.starts_with("HTTP/1.1 200 OK") && out.ends_with("image"),
        "{out}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    // The second, after the router answered the first (hyper's header read timeout).
    let (out, took) = drip(srv.addr, "GET /healthz HTTP/1.1\r\n\r\n", drip_head);
    assert!(
        out.starts_with("HTTP/1.1 200 OK") && out.ends_with("ok\n"),
        "{out}"
    );
    assert!(out.matches("HTTP/1.1").count() == 1, "{out}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        metric(
            &srv,
            "slipway_connections_timed_out_total{listener=\"http\",phase=\"request_head\"} 3"
        ),
        "{}",
        srv.metrics.render()
    );
}

#[test]
fn idle_keep_alive_connections_are_closed_on_both_paths() {
    let srv = server_with(512, NO_CAPS, SHORT);
    std::fs::write(srv.dir.path().join("images/os.img"), b"image").unwrap();
    for req in [
        "GET /images/os.img HTTP/1.1\r\n\r\n",
        "GET /healthz HTTP/1.1\r\n\r\n",
        "",
    ] {
        let start = std::time::Instant::now();
        let out = String::from_utf8_lossy(&exchange(srv.addr, req)).into_owned();
        assert!(
            req.is_empty() || out.starts_with("HTTP/1.1 200 OK"),
            "{out}"
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(3),
            "{req:?}: {took:?}"
        );
    }
}

#[test]
fn a_client_that_reads_nothing_is_dropped_by_the_router_path_too() {
    let srv = server_with(512, NO_CAPS, SHORT);
    let boot = srv.dir.path().join("boot");
    std::fs::create_dir_all(&boot).unwrap();
    std::fs::write(boot.join("initramfs"), vec![1u8; 64 << 20]).unwrap();
    let mut s = StdStream::connect(srv.addr).unwrap();
    s.write_all(b"GET /boot/initramfs HTTP/1.1\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got += n;
    }
    assert!(
        got < 64 << 20,
        "the whole file was sent to a client that stalled"
    );
    assert!(
        metric(
            &srv,
            "slipway_connections_timed_out_total{listener=\"http\",phase=\"stall\"} 1"
        ),
        "{}",
        srv.metrics.render()
    );
}

/// A connection from `ip` (a loopback address).
fn connect_from(ip: &str, to: SocketAddr) -> StdStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s.connect(to).await.unwrap().into_std().unwrap()
    })
}

/// Whether the server answers `/healthz` on `s` (kept alive).
fn healthz(s: &mut StdStream) -> String {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n");
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn connections_over_a_cap_get_a_503_and_router_connections_keep_their_places() {
    let caps = Caps {
        total: 4,
        per_source: 2,
    };
    let srv = server_with(512, caps, DEADLINES);
    // Two from 127.0.0.2, handed to the router and kept alive: they hold their places.
    let mut held: Vec<_> = (0..2)
        .map(|_| connect_from("127.0.0.2", srv.addr))
        .collect();
    for s in &mut held {
        assert!(healthz(s).ends_with("ok\n"));
    }
    let mut third = connect_from("127.0.0.2", srv.addr);
    let out = healthz(&mut third);
    assert!(
        out.starts_with("HTTP/1.1 503") && out.contains("too many connections from your address"),
        "{out}"
    );
    // Another address still gets in, up to the listener's cap.
    let mut others: Vec<_> = (0..2)
        .map(|_| connect_from("127.0.0.3", srv.addr))
        .collect();
    for s in &mut others {
        assert!(healthz(s).ends_with("ok\n"));
    }
    let out = healthz(&mut connect_from("127.0.0.4", srv.addr));
    assert!(out.contains("too many connections open"), "{out}");
    for line in [
        "slipway_connections_refused_total{listener=\"http\",reason=\"source_full\"} 1",
        "slipway_connections_refused_total{listener=\"http\",reason=\"listener_full\"} 1",
        "slipway_connections_open{listener=\"http\"} 4",
    ] {
        assert!(metric(&srv, line), "{line}\n{}", srv.metrics.render());
    }
    // A closed connection gives its place back.
    drop(held.pop());
    let again = (0..50).find_map(|_| {
        std::thread::sleep(Duration::from_millis(20));
        let out = healthz(&mut connect_from("127.0.0.2", srv.addr));
        out.ends_with("ok\n").then_some(out)
    });
    assert!(again.is_some(), "the place came back");
}
