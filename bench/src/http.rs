//! A minimal HTTP/1.1 client over one keep-alive TCP connection: enough for `POST
//! /auth/dev-login`, `POST /api/publish` and `GET /metrics` against the hub on loopback, and
//! cheap enough that publishing tens of thousands of events a second does not load the bench.
//! No TLS, no redirects, no pipelining.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct HttpConn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    host: String,
    buf: Vec<u8>,
    req: Vec<u8>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl HttpConn {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            stream: None,
            host: addr.to_string(),
            buf: Vec::with_capacity(4096),
            req: Vec::with_capacity(1024),
        }
    }

    /// Send one request and read its response; reconnects once if the kept-alive
    /// connection turned out to be closed.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let reused = self.stream.is_some();
        match self.try_request(method, path, headers, body).await {
            Err(_) if reused => {
                self.stream = None;
                self.try_request(method, path, headers, body).await
            }
            other => other,
        }
    }

    async fn try_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
        }
        self.req.clear();
        self.req.extend_from_slice(method.as_bytes());
        self.req.push(b' ');
        self.req.extend_from_slice(path.as_bytes());
        self.req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        self.req.extend_from_slice(self.host.as_bytes());
        self.req.extend_from_slice(b"\r\n");
        for (k, v) in headers {
            self.req.extend_from_slice(k.as_bytes());
            self.req.extend_from_slice(b": ");
            self.req.extend_from_slice(v.as_bytes());
            self.req.extend_from_slice(b"\r\n");
        }
        self.req
            .extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        self.req.extend_from_slice(body);
        let result = self.exchange().await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange(&mut self) -> io::Result<Response> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(bad("not connected"));
        };
        stream.write_all(&self.req).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the response",
                ));
            }
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| bad("response head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let length: Option<usize> = get("content-length").and_then(|v| v.parse().ok());
        let chunked = get("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let close = get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let body = if let Some(length) = length {
            while self.buf.len() < head_end + length {
                if stream.read_buf(&mut self.buf).await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
                }
            }
            self.buf[head_end..head_end + length].to_vec()
        } else if chunked {
            loop {
                if let Some(body) = dechunk(&self.buf[head_end..]) {
                    break body;
                }
                if stream.read_buf(&mut self.buf).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "short chunked body",
                    ));
                }
            }
        } else if status == 204 || status == 304 || (100..200).contains(&status) {
            Vec::new()
        } else {
            // Body delimited by the end of the connection.
            while stream.read_buf(&mut self.buf).await? > 0 {}
            self.stream = None;
            self.buf[head_end..].to_vec()
        };
        if close {
            self.stream = None;
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// The body of a complete chunked encoding, or None while more bytes are needed.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(raw, b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return find(raw, b"\r\n").map(|_| body);
        }
        if raw.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunked body is reassembled only once its last chunk has arrived.
    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(dechunk(b"3\r\nabc\r\n2\r\nd").is_none());
    }
}
