//! HTTP(S) sources: ranged reads (qcow2 tables, format sniffing), small files (checksum
//! files), and the one streaming read of the image that resumes with a Range request after a
//! dropped connection, so every byte reaches the hash exactly once.
//!
//! Retries: network errors and 5xx answers are retried with exponential backoff, at most
//! `retries` times in a row without progress; 4xx answers never.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use tokio::sync::mpsc;

use super::ImageError;

/// What the download hands to the hashing stage.
#[derive(Debug)]
pub enum Chunk {
    Data(super::pipeline::AlignedBuf),
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
}

impl Default for FetchOptions {
    fn default() -> FetchOptions {
        FetchOptions {
            retries: 5,
            backoff: Duration::from_millis(500),
            chunk: 2 << 20,
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
}

impl Source {
    pub fn new(client: reqwest::Client, url: &str, opts: FetchOptions) -> Source {
        Source {
            client,
            url: url.to_string(),
            opts,
            validator: None,
            total: None,
        }
    }

    fn note_validator(&mut self, resp: &reqwest::Response) {
        if self.validator.is_none() {
            let h = resp.headers();
            self.validator = h
                .get(ETAG)
                .filter(|v| !v.as_bytes().starts_with(b"W/"))
                .or_else(|| h.get(LAST_MODIFIED))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
    }

    /// Sends a GET (from `start`, to `end` exclusive if given), retrying network errors and
    /// 5xx answers. Returns the answer and whether it starts at `start` (false: the server
    /// ignored the range and sends the whole file).
    async fn get(
        &mut self,
        start: u64,
        end: Option<u64>,
        failures: &mut u32,
    ) -> Result<(reqwest::Response, bool), ImageError> {
        loop {
            let mut req = self.client.get(&self.url);
            if start > 0 || end.is_some() {
                let range = match end {
                    Some(e) => format!("bytes={start}-{}", e.saturating_sub(1)),
                    None => format!("bytes={start}-"),
                };
                req = req.header(RANGE, range);
                if let Some(v) = &self.validator {
                    req = req.header(IF_RANGE, v.as_str());
                }
            }
            let err = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status == StatusCode::PARTIAL_CONTENT {
                        let cr = resp
                            .headers()
                            .get(CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(parse_content_range);
                        match cr {
                            Some((s, total)) if s == start => {
                                if let Some(t) = total {
                                    self.check_total(t)?;
                                }
                                self.note_validator(&resp);
                                return Ok((resp, true));
                            }
                            _ => {
                                return Err(ImageError::Stream {
                                    url: self.url.clone(),
                                    offset: start,
                                    reason: "the server answered a Range request with a \
                                             Content-Range that does not start there"
                                        .into(),
                                });
                            }
                        }
                    }
                    if status.is_success() {
                        if let Some(len) = resp.content_length() {
                            self.check_total(len)?;
                        }
                        let validator = resp
                            .headers()
                            .get(ETAG)
                            .or_else(|| resp.headers().get(LAST_MODIFIED))
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
                                reason: "the image changed on the server during the download \
                                         (its ETag/Last-Modified differ)"
                                    .into(),
                            });
                        }
                        self.note_validator(&resp);
                        return Ok((resp, start == 0));
                    }
                    if status.is_client_error() {
                        return Err(ImageError::Status {
                            url: self.url.clone(),
                            status: status.as_u16(),
                        });
                    }
                    format!("HTTP {}", status.as_u16())
                }
                Err(e) => error_text(&e),
            };
            *failures += 1;
            if *failures > self.opts.retries {
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
    /// dropped connections. Needs a server that honours Range requests unless `start` is 0.
    pub async fn read_range(&mut self, start: u64, len: u64) -> Result<Vec<u8>, ImageError> {
        let end = start.saturating_add(len);
        let mut out = Vec::with_capacity(len.min(64 << 20) as usize);
        let mut failures = 0;
        loop {
            let at = start + out.len() as u64;
            if at >= end || self.total.is_some_and(|t| at >= t) {
                return Ok(out);
            }
            let (resp, ranged) = self.get(at, Some(end), &mut failures).await?;
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
            let mut body = resp.bytes_stream();
            let before = out.len();
            let mut broke = None;
            while let Some(item) = body.next().await {
                match item {
                    Ok(b) => {
                        let want = (end - start) as usize - out.len();
                        out.extend_from_slice(&b[..b.len().min(want)]);
                        if out.len() as u64 >= end - start {
                            break;
                        }
                    }
                    Err(e) => {
                        broke = Some(error_text(&e));
                        break;
                    }
                }
            }
            if out.len() > before {
                failures = 0;
            }
            let done = out.len() as u64 >= end - start
                || self.total.is_some_and(|t| start + out.len() as u64 >= t);
            if done {
                return Ok(out);
            }
            if broke.is_none() && self.total.is_none() {
                return Ok(out); // the file ended and no length was announced
            }
            failures += 1;
            if failures > self.opts.retries {
                return Err(ImageError::Stream {
                    url: self.url.clone(),
                    offset: start + out.len() as u64,
                    reason: broke.unwrap_or_else(|| "the connection ended early".into()),
                });
            }
            tokio::time::sleep(backoff(&self.opts, failures)).await;
        }
    }

    /// Streams the whole file into `tx` in buffers of `chunk` bytes, then [`Chunk::End`].
    /// Returns the bytes sent, or an error naming the offset reached. A dropped connection is
    /// resumed from the next byte; a server that answers a resume with the whole file has the
    /// bytes already sent skipped.
    pub async fn stream(
        &mut self,
        tx: mpsc::Sender<Chunk>,
        pool: &super::pipeline::BufPool,
    ) -> Result<u64, ImageError> {
        let chunk = self.opts.chunk.max(4096);
        let mut sent = 0u64; // bytes handed on (including `buf`)
        let mut buf = pool.get(chunk);
        let mut failures = 0u32;
        loop {
            let (resp, ranged) = self.get(sent, None, &mut failures).await?;
            let mut skip = if ranged { 0 } else { sent };
            let mut body = resp.bytes_stream();
            let mut broke = None;
            let start_of_attempt = sent;
            while let Some(item) = body.next().await {
                let bytes = match item {
                    Ok(b) => b,
                    Err(e) => {
                        broke = Some(error_text(&e));
                        break;
                    }
                };
                let mut data = &bytes[..];
                if skip > 0 {
                    let n = (skip.min(data.len() as u64)) as usize;
                    data = &data[n..];
                    skip -= n as u64;
                }
                if let Some(t) = self.total
                    && sent + data.len() as u64 > t
                {
                    return Err(ImageError::Stream {
                        url: self.url.clone(),
                        offset: sent,
                        reason: format!("the server sent more than the {t} bytes it announced"),
                    });
                }
                while !data.is_empty() {
                    let n = buf.room().min(data.len());
                    buf.push(&data[..n]);
                    data = &data[n..];
                    sent += n as u64;
                    if buf.room() == 0 {
                        let full = std::mem::replace(&mut buf, pool.get(chunk));
                        if tx.send(Chunk::Data(full)).await.is_err() {
                            return Ok(sent); // the writer stopped; its error explains why
                        }
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
            if sent > start_of_attempt {
                failures = 0;
            }
            failures += 1;
            let reason = broke.unwrap_or_else(|| {
                format!(
                    "the connection closed after byte {sent} of {}",
                    self.total.unwrap_or(0)
                )
            });
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
            tokio::time::sleep(wait).await;
        }
    }
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
