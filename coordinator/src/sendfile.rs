//! The images route's fast path: `GET` and `HEAD /images/FILE`, whole or one byte range,
//! answered with sendfile(2), so the file's pages go from the page cache to the socket
//! without being read into the coordinator and copied out again. Serving a 4 GiB image
//! through hyper and `ServeDir` cost the coordinator 1.2-2.0 CPU-seconds; sendfile about 0.5,
//! which on the bench's 2 cores made the agent's dense write 9% faster (ARCHITECTURE.md).
//!
//! Every connection to the HTTP port starts here. Its first request head is read and, if it
//! asks for an image this module can answer, answered here, and so on for the requests that
//! follow on the connection. Anything else is handed, with the bytes already read, to the axum
//! router. That covers other routes and methods, several ranges, a range past the end,
//! conditional requests other than `If-Range`, a request body, and a file that is not there.
//! The router's `ServeDir` answers the image cases among them as before.
//!
//! Connections are driven by the async runtime; the socket does not block. The sendfile calls
//! run on a blocking thread, because they wait on the disk when the image is not in the page
//! cache; that thread waits at most 20 ms for room in a full socket. A download waiting longer
//! for its client holds no thread, so a stalled or slow client costs a socket and a task, not
//! one of tokio's blocking threads (512 by default).
//!
//! No connection holds on for nothing (issue 16). Each is admitted by the listener's
//! [`Gate`] (a cap in all and per source address; over one, a 503 and the connection is
//! closed), and holds its permit until it closes, through the router too (inside
//! `handoff::Rewind`). A whole request head must arrive within [`Deadlines::head`] of the
//! connection's start or of the previous answer's end, however it is dripped, so an idle
//! keep-alive connection ends then too; the router's side keeps the same deadline (hyper's
//! header read timeout). A client that leaves no room for its answer for
//! [`Deadlines::stall`] is dropped.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::limits::{Gate, Permit, Refused};

mod handoff;

/// Longest request head read here (a longer one goes to the router, which refuses it).
const MAX_HEAD: usize = 16 << 10;
/// Bytes per sendfile call.
const SEND_CHUNK: usize = 64 << 20;

/// How long HTTP connections may take over what they owe.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// For a whole request head, from the connection's start or the previous answer's end:
    /// so also how long an idle keep-alive connection is kept.
    pub head: Duration,
    /// For room in the socket while an answer is sent (the client reads nothing).
    pub stall: Duration,
}

/// The deadlines `slipway serve` uses. Ten seconds for a head: a real client sends its
/// head in one packet, and agents and iPXE open a new connection when an idle one was
/// closed.
pub const DEADLINES: Deadlines = Deadlines {
    head: Duration::from_secs(10),
    stall: Duration::from_secs(60),
};

/// Accepts connections on `tcp` within `gate`'s caps, answers image requests for files
/// under `images`, and serves every other connection with `router`. Runs for as long as
/// the server does.
pub async fn serve(
    tcp: TcpListener,
    images: PathBuf,
    router: axum::Router,
    gate: Gate,
    deadlines: Deadlines,
) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!("the HTTP server could not accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match gate.admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                refuse(&stream, why);
                continue;
            }
        };
        let (images, router) = (images.clone(), router.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, permit, peer, &images, router, deadlines).await {
                tracing::debug!(%peer, "HTTP connection ended: {e}");
            }
        });
    }
}

/// Over a cap: a 503 saying why, if the socket takes it at once, and the connection is
/// closed (when `stream` drops).
fn refuse(stream: &TcpStream, why: Refused) {
    let reason = match why {
        Refused::ListenerFull => "the coordinator has too many connections open; try again later\n",
        Refused::SourceFull => "too many connections from your address; try again later\n",
    };
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nretry-after: 5\r\nconnection: close\r\n\r\n{reason}",
        reason.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

/// Reads the connection's requests and serves those for images; hands the connection, with
/// the bytes already read and its permit, to the router at the first other one. The socket
/// is shared with the blocking threads that run the sendfile calls.
async fn connection(
    s: TcpStream,
    permit: Permit,
    peer: SocketAddr,
    images: &Path,
    router: axum::Router,
    deadlines: Deadlines,
) -> io::Result<()> {
    let s = Arc::new(s);
    let mut buf = Vec::new();
    let mut head_by = Instant::now() + deadlines.head;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let asked = match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => ask(&req).map(|a| (len, a)),
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {
                match read(&s, &mut buf, head_by).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => {
                        if e.kind() == io::ErrorKind::TimedOut {
                            permit.gate().timed_out("request_head");
                        }
                        return Err(e);
                    }
                }
            }
            // Malformed or too long: the router says so.
            _ => None,
        };
        let served = match asked {
            Some((len, a)) => {
                let images = images.to_path_buf();
                tokio::task::spawn_blocking(move || open(&images, a))
                    .await
                    .map_err(io::Error::other)?
                    .map(|(a, file, answer)| (len, a, file, answer))
            }
            None => None,
        };
        let Some((len, a, file, answer)) = served else {
            let s = Arc::try_unwrap(s)
                .map_err(|_| io::Error::other("the connection is still in use"))?;
            let io = handoff::Rewind::new(buf, s, permit, deadlines.stall);
            handoff::serve(io, peer, router, deadlines.head).await;
            return Ok(());
        };
        tracing::debug!(%peer, path = %a.path, status = answer.status, bytes = answer.len, "image");
        let sent = async {
            write_all(&s, answer.head.as_bytes(), deadlines.stall).await?;
            if !a.head_only {
                send(
                    &s,
                    Arc::new(file),
                    answer.start,
                    answer.len,
                    deadlines.stall,
                )
                .await?;
            }
            Ok::<_, io::Error>(())
        };
        if let Err(e) = sent.await {
            if e.kind() == io::ErrorKind::TimedOut {
                permit.gate().timed_out("stall");
            }
            return Err(e);
        }
        if !a.keep_alive {
            return Ok(());
        }
        buf.drain(..len);
        head_by = Instant::now() + deadlines.head;
    }
}

fn late_head() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "no whole request head by the deadline",
    )
}

fn stalled() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the client stalled")
}

/// Reads what the client sent next onto `buf`; 0 when it closed the connection. Fails at
/// `by`, however many bytes came before: a deadline, not an idle timer a drip resets.
async fn read(s: &TcpStream, buf: &mut Vec<u8>, by: Instant) -> io::Result<usize> {
    loop {
        tokio::time::timeout_at(by, s.readable())
            .await
            .map_err(|_| late_head())??;
        match s.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
    }
}

async fn write_all(s: &TcpStream, mut data: &[u8], stall: Duration) -> io::Result<()> {
    while !data.is_empty() {
        tokio::time::timeout(stall, s.writable())
            .await
            .map_err(|_| stalled())??;
        match s.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `len` bytes of `file` from `start` onto the socket, which does not block. The sendfile
/// calls run on a blocking thread, because they wait on the disk when the image is not in the
/// page cache (see [`send_some`]); waiting for a slow client is the runtime's, holding no
/// thread.
async fn send(
    s: &Arc<TcpStream>,
    file: Arc<File>,
    start: u64,
    len: u64,
    stall: Duration,
) -> io::Result<()> {
    let mut off = i64::try_from(start).map_err(io::Error::other)?;
    let mut left = len;
    while left > 0 {
        tokio::time::timeout(stall, s.writable())
            .await
            .map_err(|_| stalled())??;
        let count = left.min(SEND_CHUNK as u64) as usize;
        let (sock, f) = (Arc::clone(s), Arc::clone(&file));
        let (sent, at, end) = tokio::task::spawn_blocking(move || send_some(&sock, &f, off, count))
            .await
            .map_err(io::Error::other)?;
        left -= sent as u64;
        off = at;
        match end {
            Sent::All => {}
            Sent::Full => wait_for_room(s),
            Sent::Shrank => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the image file shrank while it was being sent",
                ));
            }
            Sent::Failed(e) => return Err(io::Error::from(e)),
        }
    }
    Ok(())
}

/// How a run of sendfile calls ended.
enum Sent {
    All,
    /// The socket stayed full for [`ROOM_WAIT_MS`]: the client is slow.
    Full,
    /// The file ended early.
    Shrank,
    Failed(nix::errno::Errno),
}

/// How long (ms) a blocking thread waits for room in a full socket before giving the wait to the
/// runtime. A client that keeps up (a local or fast network) is served by a few calls per
/// [`SEND_CHUNK`], as cheaply as a blocking socket; a slow or stalled one releases the thread.
const ROOM_WAIT_MS: u8 = 20;

/// Up to `count` bytes of `file` from `off` onto the non-blocking socket, on a blocking
/// thread: (bytes sent, the new offset, how it ended).
fn send_some(sock: &TcpStream, file: &File, off: i64, count: usize) -> (usize, i64, Sent) {
    let (mut at, mut sent) = (off, 0);
    while sent < count {
        match nix::sys::sendfile::sendfile64(sock.as_fd(), file, Some(&mut at), count - sent) {
            Ok(0) => return (sent, at, Sent::Shrank),
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EAGAIN) => {
                let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, ROOM_WAIT_MS) {
                    Ok(0) => return (sent, at, Sent::Full),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return (sent, at, Sent::Failed(e)),
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return (sent, at, Sent::Failed(e)),
        }
    }
    (sent, at, Sent::All)
}

/// After the socket stayed full: clears the runtime's writable readiness, so the
/// next `writable()` waits for the client, unless the socket has room again by now. The check
/// runs inside `try_io`, which clears only the readiness it saw before the check: a wake-up
/// that arrives meanwhile is kept, never lost (which would stall the download until the stall deadline).
fn wait_for_room(s: &TcpStream) {
    let _ = s.try_io(tokio::io::Interest::WRITABLE, || {
        let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => Ok(()),
            _ => Err(io::ErrorKind::WouldBlock.into()),
        }
    });
}

/// An image request this module can answer, as read from its head.
#[derive(Debug, PartialEq, Eq)]
struct Ask {
    /// The URL path, for the log.
    path: String,
    /// The file, relative to the images directory.
    rel: PathBuf,
    head_only: bool,
    range: Option<Range>,
    if_range: Option<String>,
    keep_alive: bool,
}

/// One byte range, as asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Range {
    /// `first-` or `first-last`.
    From(u64, Option<u64>),
    /// `-n`: the last n bytes.
    Last(u64),
}

/// What a request head asks, if it is a request this module answers.
fn ask(req: &httparse::Request) -> Option<Ask> {
    let head_only = match req.method? {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    let target = req.path?;
    let path = target.split(['?', '#']).next()?;
    let rel = relative(path.strip_prefix("/images/")?)?;
    let mut range = None;
    let mut if_range = None;
    let mut connection = None;
    for h in req.headers.iter() {
        let v = std::str::from_utf8(h.value).ok()?.trim();
        match h.name.to_ascii_lowercase().as_str() {
            "range" => range = Some(parse_range(v)?),
            "if-range" => if_range = Some(v.to_string()),
            "connection" => connection = Some(v.to_ascii_lowercase()),
            "content-length" if v != "0" => return None,
            "transfer-encoding"
            | "expect"
            | "if-match"
            | "if-none-match"
            | "if-modified-since"
            | "if-unmodified-since" => return None,
            _ => {}
        }
    }
    let keep_alive = match (req.version?, connection.as_deref()) {
        (_, Some(c)) if c.split(',').any(|t| t.trim() == "close") => false,
        (1, _) => true,
        (_, Some(c)) => c.split(',').any(|t| t.trim() == "keep-alive"),
        _ => false,
    };
    Some(Ask {
        path: path.to_string(),
        rel,
        head_only,
        range,
        if_range,
        keep_alive,
    })
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n`; anything else (several ranges, other units) is
/// left to the router.
fn parse_range(v: &str) -> Option<Range> {
    let spec = v.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    if a.trim().is_empty() {
        return Some(Range::Last(num(b)?));
    }
    let first = num(a)?;
    if b.trim().is_empty() {
        return Some(Range::From(first, None));
    }
    let last = num(b)?;
    (last >= first).then_some(Range::From(first, Some(last)))
}

/// Whether `images/rel`, symlinks resolved, is still inside the images directory (a link
/// inside it must not serve the CA key or the store). `None` when it does not exist.
pub(crate) fn escapes(images: &Path, rel: &Path) -> Option<PathBuf> {
    let target = std::fs::canonicalize(images.join(rel)).ok()?;
    let root = std::fs::canonicalize(images).ok()?;
    (!target.starts_with(&root)).then_some(target)
}

/// The percent-decoded path under the images directory, if it stays there: plain names only
/// (no `..`, `.`, empty segments, NUL or backslash).
pub(crate) fn relative(encoded: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .ok()?;
    if decoded.is_empty() || decoded.contains(['\0', '\\']) {
        return None;
    }
    let mut rel = PathBuf::new();
    for seg in decoded.split('/') {
        let mut c = Path::new(seg).components();
        match (c.next(), c.next()) {
            (Some(Component::Normal(n)), None) if !seg.is_empty() => rel.push(n),
            _ => return None,
        }
    }
    Some(rel)
}

/// The answer's status line, headers and the bytes of the file it sends.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    start: u64,
    len: u64,
    head: String,
}

/// Opens the file an image request names and works out the answer, if this module gives it.
fn open(images: &Path, a: Ask) -> Option<(Ask, File, Answer)> {
    if escapes(images, &a.rel).is_some() {
        return None; // the router refuses it, saying why
    }
    let path = images.join(&a.rel);
    let file = File::open(&path).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let modified = meta.modified().ok()?;
    let content_type = mime_guess::from_path(&path).first_or_octet_stream();
    let answer = answer(
        &a,
        meta.len(),
        modified,
        content_type.as_ref(),
        SystemTime::now(),
    )?;
    Some((a, file, answer))
}

/// The answer to `a` for a file of `size` bytes last modified at `modified`; `None` where the
/// router answers instead (an unsatisfiable range). The ETag and Last-Modified are those
/// `ServeDir` gives, so a download may resume against either.
fn answer(
    a: &Ask,
    size: u64,
    modified: SystemTime,
    content_type: &str,
    now: SystemTime,
) -> Option<Answer> {
    let since = modified.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    let etag = format!(
        "\"{:x}.{:08x}-{:x}\"",
        since.as_secs(),
        since.subsec_nanos(),
        size
    );
    let last_modified = httpdate::fmt_http_date(modified);
    // A resume against a file that changed gets the whole new file (RFC 9110 13.1.5).
    let same = match &a.if_range {
        None => true,
        Some(v) if v.starts_with('"') => *v == etag,
        Some(v) => *v == last_modified,
    };
    let range = if same { a.range } else { None };
    let (status, start, len) = match range {
        None => (200, 0, size),
        Some(Range::From(first, last)) => {
            if first >= size {
                return None;
            }
            let last = last.unwrap_or(u64::MAX).min(size - 1);
            (206, first, last - first + 1)
        }
        Some(Range::Last(n)) => {
            if n == 0 || size == 0 {
                return None;
            }
            let n = n.min(size);
            (206, size - n, n)
        }
    };
    let mut head = format!(
        "HTTP/1.1 {}\r\ncontent-type: {content_type}\r\naccept-ranges: bytes\r\nlast-modified: {last_modified}\r\netag: {etag}\r\ncontent-length: {len}\r\n",
        if status == 206 {
            "206 Partial Content"
        } else {
            "200 OK"
        },
    );
    if status == 206 {
        head.push_str(&format!(
            "content-range: bytes {start}-{}/{size}\r\n",
            start + len - 1
        ));
    }
    head.push_str(&format!("date: {}\r\n", httpdate::fmt_http_date(now)));
    if !a.keep_alive {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    Some(Answer {
        status,
        start,
        len,
        head,
    })
}

#[cfg(test)]
mod tests;
