//! Plain-HTTP image bodies read from the socket straight into the pipeline's aligned buffers.
//!
//! reqwest (hyper) reads a body into its own buffer and hands out `Bytes`, which the download
//! then copied into the aligned buffer the writer uses: one memcpy per image byte, about 15%
//! of the agent's CPU on a dense raw image. For the common case, an `http://` URL without a
//! proxy or credentials answered with 200 or 206, a `Content-Length` and no transfer or
//! content coding, the streaming GET is sent here by hand and the body read into that buffer.
//! Anything else (https, redirects, chunked or encoded bodies) is asked again through reqwest,
//! so this path only ever makes the common case cheaper.

use std::net::IpAddr;
use std::time::Duration;

use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 << 10;
/// The environment variables that route requests through a proxy (reqwest honours them).
const PROXY_VARS: [&str; 4] = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"];

/// Where a plain GET goes.
#[derive(Clone, Debug)]
pub struct Target {
    host: Host,
    port: u16,
    /// The `Host` header: the URL's host, and its port when the URL names one.
    authority: String,
    /// Path and query.
    path: String,
}

#[derive(Clone, Debug)]
enum Host {
    Ip(IpAddr),
    Name(String),
}

/// The target of `url` when this path may fetch it: `http://`, no credentials in the URL, no
/// proxy in the environment. `None` leaves the URL to reqwest.
pub fn target(url: &str) -> Option<Target> {
    if PROXY_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
    {
        return None;
    }
    target_of(&reqwest::Url::parse(url).ok()?)
}

fn target_of(url: &reqwest::Url) -> Option<Target> {
    if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() {
        return None;
    }
    let host_str = url.host_str()?;
    let bare = host_str.trim_start_matches('[').trim_end_matches(']');
    let host = match bare.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(host_str.to_string()),
    };
    let authority = match url.port() {
        Some(p) => format!("{host_str}:{p}"),
        None => host_str.to_string(),
    };
    let mut path = url.path().to_string();
    if let Some(q) = url.query() {
        path.push('?');
        path.push_str(q);
    }
    Some(Target {
        host,
        port: url.port_or_known_default()?,
        authority,
        path,
    })
}

/// An answer's status line and headers, with its body still on the connection.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    conn: TcpStream,
    /// Body bytes that arrived with the head.
    early: Vec<u8>,
    read_timeout: Duration,
}

impl Response {
    /// The body's length if this path can read the body: it has a `Content-Length` and
    /// neither a transfer coding nor a content coding other than identity.
    pub fn content_length(&self) -> Option<u64> {
        if self.headers.contains_key(TRANSFER_ENCODING) {
            return None;
        }
        if let Some(ce) = self.headers.get(CONTENT_ENCODING)
            && !ce.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return None;
        }
        let mut lens = self.headers.get_all(CONTENT_LENGTH).iter();
        let len = lens.next()?.to_str().ok()?.trim().parse().ok()?;
        // Several differing lengths: a confused (or hostile) server; let hyper judge it.
        if lens.any(|l| l.to_str().ok().and_then(|l| l.trim().parse().ok()) != Some(len)) {
            return None;
        }
        Some(len)
    }

    /// The body, when [`Response::content_length`] says it is readable here.
    pub fn into_body(self) -> Option<Body> {
        let left = self.content_length()?;
        Some(Body {
            conn: self.conn,
            early: self.early,
            early_at: 0,
            left,
            read_timeout: self.read_timeout,
        })
    }
}

/// A body of known length being read off its connection.
pub struct Body {
    conn: TcpStream,
    early: Vec<u8>,
    early_at: usize,
    left: u64,
    read_timeout: Duration,
}

impl Body {
    /// Reads the next body bytes into `dst` (which must not be empty); `Ok(0)` once the whole
    /// body has arrived. An error says why the body stopped short: the connection closed, a
    /// read failed, or no byte came within the read timeout.
    pub async fn read(&mut self, dst: &mut [u8]) -> Result<usize, String> {
        if self.left == 0 || dst.is_empty() {
            return Ok(0);
        }
        let want = dst
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = if self.early_at < self.early.len() {
            let n = want.min(self.early.len() - self.early_at);
            dst[..n].copy_from_slice(&self.early[self.early_at..self.early_at + n]);
            self.early_at += n;
            n
        } else {
            match tokio::time::timeout(self.read_timeout, self.conn.read(&mut dst[..want])).await {
                Err(_) => {
                    return Err(format!(
                        "reading the body timed out after {:?} without a byte",
                        self.read_timeout
                    ));
                }
                Ok(Err(e)) => return Err(format!("reading the body failed: {e}")),
                Ok(Ok(0)) => {
                    return Err(format!(
                        "the connection closed with {} bytes of the body still to come",
                        self.left
                    ));
                }
                Ok(Ok(n)) => n,
            }
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// Sends `GET` for `t` with `headers` (each `Connection: close`) and reads the answer's head.
/// Errors are network errors, worth a retry.
pub async fn get(
    t: &Target,
    headers: &[(HeaderName, HeaderValue)],
    connect_timeout: Duration,
    read_timeout: Duration,
) -> Result<Response, String> {
    let connect = async {
        match &t.host {
            Host::Ip(ip) => TcpStream::connect((*ip, t.port)).await,
            Host::Name(n) => TcpStream::connect((n.as_str(), t.port)).await,
        }
    };
    let mut conn = match tokio::time::timeout(connect_timeout, connect).await {
        Err(_) => {
            return Err(format!(
                "connecting to {} timed out after {connect_timeout:?}",
                t.authority
            ));
        }
        Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", t.authority)),
        Ok(Ok(c)) => c,
    };
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: slipway-agent/{}\r\nAccept: */*\r\n\
         Accept-Encoding: identity\r\nConnection: close\r\n",
        t.path,
        t.authority,
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes();
    for (name, value) in headers {
        req.extend_from_slice(name.as_str().as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(value.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    match tokio::time::timeout(read_timeout, conn.write_all(&req)).await {
        Err(_) => {
            return Err(format!(
                "sending the request timed out after {read_timeout:?}"
            ));
        }
        Ok(Err(e)) => return Err(format!("sending the request failed: {e}")),
        Ok(Ok(())) => {}
    }
    let mut head = Vec::with_capacity(4096);
    let mut piece = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout(read_timeout, conn.read(&mut piece)).await {
            Err(_) => {
                return Err(format!(
                    "waiting for the answer timed out after {read_timeout:?}"
                ));
            }
            Ok(Err(e)) => return Err(format!("reading the answer failed: {e}")),
            Ok(Ok(0)) => return Err("the connection closed before a complete answer".into()),
            Ok(Ok(n)) => n,
        };
        head.extend_from_slice(&piece[..n]);
        if let Some((status, headers, used)) = parse_head(&head)? {
            let early = head.split_off(used);
            return Ok(Response {
                status,
                headers,
                conn,
                early,
                read_timeout,
            });
        }
        if head.len() > MAX_HEAD {
            return Err(format!("the answer's head is longer than {MAX_HEAD} bytes"));
        }
    }
}

/// Parses a response head: `None` while incomplete; the status, headers and the head's length
/// once complete.
pub fn parse_head(buf: &[u8]) -> Result<Option<(StatusCode, HeaderMap, usize)>, String> {
    let mut storage = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut storage);
    let used = match resp.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(n)) => n,
        Err(e) => return Err(format!("the answer is not valid HTTP/1.1: {e}")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("the answer has no valid status code")?;
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|e| format!("the answer has a bad header name {:?}: {e}", h.name))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|e| format!("the answer's header {} has a bad value: {e}", h.name))?;
        headers.append(name, value);
    }
    Ok(Some((status, headers, used)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(url: &str) -> Option<Target> {
        target_of(&reqwest::Url::parse(url).unwrap())
    }

    #[test]
    fn only_plain_http_without_credentials_is_taken() {
        let a = t("http://images.example:8080/os/a.img?v=2").unwrap();
        assert_eq!(a.authority, "images.example:8080");
        assert_eq!(a.port, 8080);
        assert_eq!(a.path, "/os/a.img?v=2");
        assert!(matches!(a.host, Host::Name(ref n) if n == "images.example"));
        let b = t("http://[::1]/x").unwrap();
        assert_eq!((b.authority.as_str(), b.port), ("[::1]", 80));
        assert!(matches!(b.host, Host::Ip(IpAddr::V6(_))));
        assert!(t("https://h/x").is_none());
        assert!(t("http://user:pw@h/x").is_none());
    }

    #[test]
    fn heads_parse_and_bodies_are_only_taken_with_a_plain_length() {
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
                .unwrap()
                .is_none()
        );
        let (s, h, used) = parse_head(b"HTTP/1.1 206 Partial\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!((s.as_u16(), used), (206, 43));
        assert_eq!(h[CONTENT_LENGTH], "5");
        assert!(parse_head(b"NOT HTTP\r\n\r\n").is_err());
    }

    async fn answer(head: &'static [u8]) -> Response {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/f", l.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).await;
            s.write_all(head).await.unwrap();
        });
        let t = target_of(&reqwest::Url::parse(&url).unwrap()).unwrap();
        get(&t, &[], Duration::from_secs(5), Duration::from_secs(5))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn bodies_are_read_to_their_length_and_a_short_one_is_an_error() {
        let r = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello, and more").await;
        let mut body = r.into_body().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            let n = body.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"hello");

        let r = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhel").await;
        let mut body = r.into_body().unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(body.read(&mut buf).await.unwrap(), 3);
        let e = body.read(&mut buf).await.unwrap_err();
        assert!(e.contains("6 bytes of the body still to come"), "{e}");

        for head in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
        ] {
            let r = answer(head).await;
            assert!(
                r.content_length().is_none(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }
}
