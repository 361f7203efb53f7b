//! HTTP(S) sources: ranged reads (qcow2 tables, format sniffing), small files (checksum
//! files), and the one streaming read of the image that resumes with a Range request after a
//! dropped connection, so every byte reaches the hash exactly once.
//!
//! Retries: network errors, 5xx answers and stalls are retried with exponential backoff, at
//! most `retries` times in a row without progress (an attempt that brought at least the stall
//! window's `min_bytes`); 4xx answers never.
//!
//! Stalls ([`super::stall`]): every connection's body reads share a deadline, the end of its
//! stall window, which only `min_bytes` arriving moves on; a read not done by then ends the
//! attempt, which is resumed by a Range request like a dropped connection. An answer whose
//! head does not arrive within the stall timeout is retried the same way. When the budget is
//! spent on a stall the error is [`ImageError::Stalled`], naming the bytes received.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use tokio::sync::mpsc;

use super::stall::{Broke, Gauge, StallOptions, Watch, secs};
use super::{ImageError, plain};

/// What the download hands to the hashing stage.
#[derive(Debug)]
pub enum Chunk {
    Data(super::buf::AlignedBuf),
    /// The whole file arrived. Without it (the sender dropped), the write is abandoned.
    End,
}

/// How hard to try.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Retries in a row without progress before giving up.
    pub retries: u32,
    /// First backoff; doubles each retry, at most 10 s.
    pub backoff: Duration,
    /// Bytes per buffer handed to the writer.
    pub chunk: usize,
    /// How long a silent plain-HTTP connection is waited for (the reqwest client has its own,
    /// set where it is built: give both the same).
    pub read_timeout: Duration,
    /// When a download counts as stalled: it is resumed, and fails once the stalls use up
    /// `retries`.
    pub stall: StallOptions,
}

impl Default for FetchOptions {
    fn default() -> FetchOptions {
        FetchOptions {
            retries: 5,
            backoff: Duration::from_millis(500),
            chunk: 4 << 20,
            read_timeout: Duration::from_secs(60),
            stall: StallOptions::default(),
        }
    }
}

/// reqwest's error with its causes.
pub fn error_text(e: &reqwest::Error) -> String {
    crate::error_chain(e)
}

/// `bytes START-END/TOTAL` -> (start, total).
pub fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, total))
}

fn backoff(opts: &FetchOptions, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    opts.backoff
        .saturating_mul(1 << exp)
        .min(Duration::from_secs(10))
}

/// One image URL.
pub struct Source {
    client: reqwest::Client,
    pub url: String,
    opts: FetchOptions,
    /// ETag (or Last-Modified) of the first answer: resumes ask for the same version.
    validator: Option<String>,
    /// Length of the file, once an answer said it.
    pub total: Option<u64>,
    /// Where the streaming read may go without reqwest (see `plain.rs`); `None` once an
    /// answer needed reqwest (a redirect, a chunked body).
    plain: Option<plain::Target>,
    /// The stream's stall window, read by the progress reports.
    gauge: Arc<Gauge>,
}

/// An answer whose body is to be read.
enum Answer {
    /// reqwest's body arrives in its own buffers (`pending`: what is left of the last one).
    Reqwest(reqwest::Response, bytes::Bytes),
    /// Read from the socket into the caller's buffer.
    Plain(plain::Body),
}

impl Answer {
    /// Reads the next body bytes into `dst` (not empty); `Ok(0)` at the body's end. An
    /// error says why the body broke off.
    async fn read(&mut self, dst: &mut [u8]) -> Result<usize, String> {
        match self {
            Answer::Plain(body) => body.read(dst).await,
            Answer::Reqwest(resp, pending) => {
                while pending.is_empty() {
                    match resp.chunk().await {
                        Ok(Some(b)) => *pending = b,
                        Ok(None) => return Ok(0),
                        Err(e) => return Err(error_text(&e)),
                    }
                }
                let n = dst.len().min(pending.len());
                dst[..n].copy_from_slice(&pending.split_to(n));
                Ok(n)
            }
        }
    }
}

/// What an answer's status and headers mean for a GET from `start`.
enum Verdict {
    /// The body is the file from `start` (true) or from 0 (false: the range was ignored).
    Body(bool),
    /// Worth another try, for this reason.
    Retry(String),
}

/// Connecting is given this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl Source {
    pub fn new(client: reqwest::Client, url: &str, opts: FetchOptions) -> Source {
        Source {
            client,
            url: url.to_string(),
            validator: None,
            total: None,
            plain: plain::target(url),
            gauge: Arc::new(Gauge::new(opts.stall)),
            opts,
        }
    }

    /// The stream's stall window, for the progress reports.
    pub fn gauge(&self) -> Arc<Gauge> {
        self.gauge.clone()
    }

    /// The error for a read whose retries ran out on a stall at `got`.
    fn stalled(&self, got: u64, resumes: u32) -> ImageError {
        ImageError::Stalled {
            url: self.url.clone(),
            got,
            total: self.total,
            timeout: self.opts.stall.timeout,
            min_bytes: self.opts.stall.min_bytes,
            resumes,
        }
    }

    fn note_validator(&mut self, h: &HeaderMap) {
        if self.validator.is_none() {
            self.validator = h
                .get(ETAG)
                .filter(|v| !v.as_bytes().starts_with(b"W/"))
                .or_else(|| h.get(LAST_MODIFIED))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
    }

    /// The request headers for a GET from `start` (to `end` exclusive if given).
    fn range_headers(&self, start: u64, end: Option<u64>) -> Vec<(HeaderName, HeaderValue)> {
        let mut h = Vec::new();
        if start > 0 || end.is_some() {
            let range = match end {
                Some(e) => format!("bytes={start}-{}", e.saturating_sub(1)),
                None => format!("bytes={start}-"),
            };
            if let Ok(v) = HeaderValue::from_str(&range) {
                h.push((RANGE, v));
            }
            if let Some(v) = self
                .validator
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                h.push((IF_RANGE, v));
            }
        }
        h
    }

    /// Judges an answer to a GET from `start`: its body, a retry, or an error not worth
    /// retrying (4xx, a changed file, a wrong Content-Range).
    fn judge(
        &mut self,
        start: u64,
        status: StatusCode,
        headers: &HeaderMap,
        content_length: Option<u64>,
    ) -> Result<Verdict, ImageError> {
        if status == StatusCode::PARTIAL_CONTENT {
            let cr = headers
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            return match cr {
                Some((s, total)) if s == start => {
                    if let Some(t) = total {
                        self.check_total(t)?;
                    }
                    self.note_validator(headers);
                    Ok(Verdict::Body(true))
                }
                _ => Err(ImageError::Stream {
                    url: self.url.clone(),
                    offset: start,
                    reason: "the server answered a Range request with a Content-Range that does \
                             not start there"
                        .into(),
                }),
            };
        }
        if status.is_success() {
            if let Some(len) = content_length {
                self.check_total(len)?;
            }
            let validator = headers
                .get(ETAG)
                .or_else(|| headers.get(LAST_MODIFIED))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if start > 0
                && self.validator.is_some()
                && validator.is_some()
                && validator != self.validator
            {
                return Err(ImageError::Stream {
                    url: self.url.clone(),
                    offset: start,
                    reason: "the image changed on the server during the download (its \
                             ETag/Last-Modified differ)"
                        .into(),
                });
            }
            self.note_validator(headers);
            return Ok(Verdict::Body(start == 0));
        }
        if status.is_client_error() {
            return Err(ImageError::Status {
                url: self.url.clone(),
                status: status.as_u16(),
            });
        }
        Ok(Verdict::Retry(format!("HTTP {}", status.as_u16())))
    }

    /// Sends a GET (from `start`, to `end` exclusive if given), retrying network errors and
    /// 5xx answers. Returns the answer and whether it starts at `start` (false: the server
    /// ignored the range and sends the whole file). With `direct`, a plain-HTTP URL is asked
    /// without reqwest, so its body can be read straight into the aligned buffers.
    /// `failures` counts the attempts in a row without progress, `resumes` the requests after
    /// the read's first.
    async fn get(
        &mut self,
        start: u64,
        end: Option<u64>,
        failures: &mut u32,
        resumes: &mut u32,
        direct: bool,
    ) -> Result<(Answer, bool), ImageError> {
        loop {
            let headers = self.range_headers(start, end);
            let plain = if direct { self.plain.clone() } else { None };
            let head_limit = self.opts.stall.timeout;
            let no_head = || format!("no answer within the stall timeout ({})", secs(head_limit));
            let mut stalled = false;
            let err = if let Some(target) = plain {
                let asked = plain::get(&target, &headers, CONNECT_TIMEOUT, self.opts.read_timeout);
                let answer = match tokio::time::timeout(head_limit, asked).await {
                    Ok(r) => r,
                    Err(_) => {
                        stalled = true;
                        Err(no_head())
                    }
                };
                match answer {
                    Ok(resp) => {
                        let len = resp.content_length();
                        let ours = (resp.status.is_success() && len.is_some())
                            || resp.status.is_client_error()
                            || resp.status.is_server_error();
                        if !ours {
                            // A redirect, a chunked or encoded body: reqwest's job, from now on.
                            tracing::debug!(
                                "{}: HTTP {} {}; asking through reqwest",
                                self.url,
                                resp.status.as_u16(),
                                if len.is_none() {
                                    "without a plain length"
                                } else {
                                    ""
                                }
                            );
                            self.plain = None;
                            continue;
                        }
                        match self.judge(start, resp.status, &resp.headers, len)? {
                            Verdict::Body(ranged) => match resp.into_body() {
                                Some(body) => return Ok((Answer::Plain(body), ranged)),
                                None => {
                                    self.plain = None;
                                    continue;
                                }
                            },
                            Verdict::Retry(why) => why,
                        }
                    }
                    Err(e) => e,
                }
            } else {
                let mut req = self.client.get(&self.url);
                for (name, value) in headers {
                    req = req.header(name, value);
                }
                match tokio::time::timeout(head_limit, req.send()).await {
                    Ok(Ok(resp)) => {
                        let len = resp.content_length();
                        match self.judge(start, resp.status(), resp.headers(), len)? {
                            Verdict::Body(ranged) => {
                                return Ok((Answer::Reqwest(resp, bytes::Bytes::new()), ranged));
                            }
                            Verdict::Retry(why) => why,
                        }
                    }
                    Ok(Err(e)) => error_text(&e),
                    Err(_) => {
                        stalled = true;
                        no_head()
                    }
                }
            };
            *failures += 1;
            if *failures > self.opts.retries {
                if stalled {
                    return Err(self.stalled(start, *resumes));
                }
                return Err(if start == 0 && self.total.is_none() {
                    ImageError::Request {
                        url: self.url.clone(),
                        reason: format!("{err} (after {} attempts)", *failures),
                    }
                } else {
                    ImageError::Stream {
                        url: self.url.clone(),
                        offset: start,
                        reason: format!("{err} (after {} attempts)", *failures),
                    }
                });
            }
            let wait = backoff(&self.opts, *failures);
            tracing::warn!(
                "{}: {err}; retrying from byte {start} in {wait:?} (attempt {} of {})",
                self.url,
                *failures + 1,
                self.opts.retries + 1
            );
            *resumes += 1;
            tokio::time::sleep(wait).await;
        }
    }

    fn check_total(&mut self, t: u64) -> Result<(), ImageError> {
        match self.total {
            Some(old) if old != t => Err(ImageError::Stream {
                url: self.url.clone(),
                offset: 0,
                reason: format!(
                    "the image changed on the server during the download (its length went from \
                     {old} to {t} bytes)"
                ),
            }),
            _ => {
                self.total = Some(t);
                Ok(())
            }
        }
    }

    /// Reads `[start, start + len)` (less at the end of the file) into memory, resuming after
    /// dropped connections and stalls. Needs a server that honours Range requests unless
    /// `start` is 0.
    pub async fn read_range(&mut self, start: u64, len: u64) -> Result<Vec<u8>, ImageError> {
        let end = start.saturating_add(len);
        let mut out = Vec::with_capacity(len.min(64 << 20) as usize);
        let (mut failures, mut resumes) = (0, 0);
        loop {
            let at = start + out.len() as u64;
            if at >= end || self.total.is_some_and(|t| at >= t) {
                return Ok(out);
            }
            let (mut resp, ranged) = self
                .get(at, Some(end), &mut failures, &mut resumes, false)
                .await?;
            if !ranged && at > 0 {
                return Err(ImageError::Stream {
                    url: self.url.clone(),
                    offset: at,
                    reason: "the server ignores HTTP Range requests, which reading a qcow2 \
                             image's tables (and resuming) needs; serve it from a server that \
                             supports them, or convert the image to raw"
                        .into(),
                });
            }
            let before = out.len();
            let mut broke = None;
            let mut piece = vec![0u8; 256 << 10];
            let mut watch = Watch::new(self.opts.stall, None);
            while (out.len() as u64) < end - start {
                let want = ((end - start) as usize - out.len()).min(piece.len());
                match watch.read(resp.read(&mut piece[..want])).await {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&piece[..n]),
                    Err(e) => {
                        broke = Some(e);
                        break;
                    }
                }
            }
            let done = out.len() as u64 >= end - start
                || self.total.is_some_and(|t| start + out.len() as u64 >= t);
            if done {
                return Ok(out);
            }
            if broke.is_none() && self.total.is_none() {
                return Ok(out); // the file ended and no length was announced
            }
            if progressed((out.len() - before) as u64, &self.opts) {
                failures = 0;
            }
            failures += 1;
            let at = start + out.len() as u64;
            let reason = match broke {
                Some(Broke::Stalled) if failures > self.opts.retries => {
                    return Err(self.stalled(at, resumes));
                }
                Some(Broke::Stalled) => self.stall_text(),
                Some(Broke::Error(e)) => e,
                None => "the connection ended early".into(),
            };
            if failures > self.opts.retries {
                return Err(ImageError::Stream {
                    url: self.url.clone(),
                    offset: at,
                    reason,
                });
            }
            let wait = backoff(&self.opts, failures);
            tracing::warn!("{}: {reason}; resuming at byte {at} in {wait:?}", self.url);
            resumes += 1;
            tokio::time::sleep(wait).await;
        }
    }

    /// Why an attempt was ended by its stall window, for the log.
    fn stall_text(&self) -> String {
        format!(
            "stalled: less than {} arrived in {}",
            crate::disk::human(self.opts.stall.min_bytes),
            secs(self.opts.stall.timeout)
        )
    }

    /// Streams the whole file into `tx` in buffers of `chunk` bytes, then [`Chunk::End`].
    /// Returns the bytes sent, or an error naming the offset reached. A dropped or stalled
    /// connection is resumed from the next byte; a server that answers a resume with the whole
    /// file has the bytes already sent skipped.
    pub async fn stream(
        &mut self,
        tx: mpsc::Sender<Chunk>,
        pool: &super::buf::BufPool,
    ) -> Result<u64, ImageError> {
        let chunk = self.opts.chunk.max(4096);
        let mut sent = 0u64; // bytes handed on (including `buf`)
        let mut buf = pool.get(chunk);
        let (mut failures, mut resumes) = (0u32, 0u32);
        // The time spent on the head and the tables is not the stream's.
        self.gauge.restart(Instant::now());
        loop {
            let (mut resp, ranged) = self
                .get(sent, None, &mut failures, &mut resumes, true)
                .await?;
            let mut skip = if ranged { 0 } else { sent };
            let mut broke = None;
            let start_of_attempt = sent;
            let mut watch = Watch::new(self.opts.stall, Some(self.gauge.clone()));
            loop {
                // Bytes the server resends from the start are read and dropped.
                let room = buf.spare_mut();
                let want = match skip {
                    0 => room.len(),
                    s => room.len().min(usize::try_from(s).unwrap_or(usize::MAX)),
                };
                let n = match watch.read(resp.read(&mut room[..want])).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        broke = Some(e);
                        break;
                    }
                };
                if skip > 0 {
                    skip -= n as u64;
                    continue;
                }
                if let Some(t) = self.total
                    && sent + n as u64 > t
                {
                    return Err(ImageError::Stream {
                        url: self.url.clone(),
                        offset: sent,
                        reason: format!("the server sent more than the {t} bytes it announced"),
                    });
                }
                buf.advance(n);
                sent += n as u64;
                self.gauge.set_received(sent);
                if buf.room() == 0 {
                    let full = std::mem::replace(&mut buf, pool.get(chunk));
                    if tx.send(Chunk::Data(full)).await.is_err() {
                        return Ok(sent); // the writer stopped; its error explains why
                    }
                }
            }
            let complete = match self.total {
                Some(t) => sent >= t,
                None => broke.is_none(),
            };
            if complete {
                if !buf.is_empty() && tx.send(Chunk::Data(buf)).await.is_err() {
                    return Ok(sent);
                }
                let _ = tx.send(Chunk::End).await;
                return Ok(sent);
            }
            if progressed(sent - start_of_attempt, &self.opts) {
                failures = 0;
            }
            failures += 1;
            let reason = match broke {
                Some(Broke::Stalled) if failures > self.opts.retries => {
                    return Err(self.stalled(sent, resumes));
                }
                Some(Broke::Stalled) => self.stall_text(),
                Some(Broke::Error(e)) => e,
                None => format!(
                    "the connection closed after byte {sent} of {}",
                    self.total.unwrap_or(0)
                ),
            };
            if failures > self.opts.retries {
                return Err(ImageError::Stream {
                    url: self.url.clone(),
                    offset: sent,
                    reason: format!("{reason} (after {failures} attempts)"),
                });
            }
            let wait = backoff(&self.opts, failures);
            tracing::warn!(
                "{}: {reason}; resuming at byte {sent} in {wait:?}",
                self.url
            );
            resumes += 1;
            tokio::time::sleep(wait).await;
        }
    }
}

/// Whether an attempt that brought `bytes` made progress, which restarts the retry budget:
/// at least a stall window's worth. Fewer would let a server that sends a few bytes per
/// connection (and then stalls, or closes it) keep the download going for ever.
pub fn progressed(bytes: u64, opts: &FetchOptions) -> bool {
    bytes >= opts.stall.min_bytes.max(1)
}

/// DER certificates from PEM text (for `--ca FILE` and a command's `extra_ca_pem`).
pub fn pem_certs(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

/// Fetches a small text file (a checksum file), at most `limit` bytes.
pub async fn fetch_text(
    client: &reqwest::Client,
    url: &str,
    limit: usize,
    opts: &FetchOptions,
) -> Result<String, ImageError> {
    let mut src = Source::new(client.clone(), url, opts.clone());
    let bytes = src.read_range(0, limit as u64 + 1).await?;
    if bytes.len() > limit {
        return Err(ImageError::Invalid(format!(
            "the checksum file {url} is larger than {limit} bytes"
        )));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range(""), None);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let o = FetchOptions::default();
        assert_eq!(backoff(&o, 1), Duration::from_millis(500));
        assert_eq!(backoff(&o, 2), Duration::from_millis(1000));
        assert_eq!(backoff(&o, 30), Duration::from_secs(10));
    }
}
