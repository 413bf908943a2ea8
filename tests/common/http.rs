//! HTTP to a hub: `HttpResp` (a finished exchange), the `awc` client and the request helpers
//! built on it (`http`, `http_with`, `get`, `post_json`, `try_http`), and `raw_http`, one
//! exchange written by hand over TCP for answers awc would misread.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::process::Hub;

/// A finished HTTP exchange.
#[derive(Debug, Clone)]
pub struct HttpResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON; panics showing the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body (status {}), got {:?}: {e}",
                self.status,
                self.text()
            )
        })
    }
    /// The body as JSON, or Null when it is not JSON.
    pub fn json_or_null(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    pub fn headers_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl std::fmt::Display for HttpResp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HTTP {} {:?} body {:?}",
            self.status,
            self.headers,
            self.text()
        )
    }
}

/// An HTTP client for one test (awc; needs actix's runtime, i.e. `#[actix_web::test]`).
pub fn client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish()
}

/// Send `method path` with `headers` and an optional body, using `client`.
pub async fn http_with(
    client: &awc::Client,
    hub: &Hub,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResp {
    let method = awc::http::Method::from_bytes(method.as_bytes()).expect("valid method");
    let mut req = client.request(method.clone(), hub.url(path));
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let sent = match body {
        Some(b) => req.send_body(b.to_vec()).await,
        None => req.send().await,
    };
    let mut resp = sent.unwrap_or_else(|e| panic!("{method} {path} to hub {}: {e}", hub.name()));
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp
        .body()
        .limit(64 * 1024 * 1024)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: reading body: {e}"))
        .to_vec();
    HttpResp {
        status,
        headers,
        body,
    }
}

/// Like `http_with`, but a transport failure (refused connection, timeout) is an `Err`.
pub async fn try_http(
    hub: &Hub,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResp, String> {
    let client = client();
    let method = awc::http::Method::from_bytes(method.as_bytes()).expect("valid method");
    let mut req = client.request(method, hub.url(path));
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let mut resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp.body().await.map_err(|e| e.to_string())?.to_vec();
    Ok(HttpResp {
        status,
        headers,
        body,
    })
}

/// One HTTP/1.1 exchange spoken by hand over TCP: for answers `awc` would misread (a 426
/// carries `Connection: upgrade`, which makes awc treat it as an upgrade and drop the body).
/// `head` is the request line plus headers, without the blank line; reads a
/// Content-Length body.
pub async fn raw_http(hub: &Hub, head: &str) -> HttpResp {
    let exchange = async {
        let mut stream = TcpStream::connect(hub.addr()).await.expect("connect");
        let req = format!(
            "{head}\r\nHost: {}\r\nConnection: close\r\n\r\n",
            hub.addr()
        );
        stream
            .write_all(req.as_bytes())
            .await
            .expect("write request");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let mut lines = head.split("\r\n");
                let status: u16 = lines
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("bad status line in {head:?}"));
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
                    .collect();
                let len: Option<usize> = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok());
                let body_start = end + 4;
                loop {
                    let have = buf.len() - body_start;
                    if len.is_some_and(|l| have >= l) {
                        break;
                    }
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let mut body = buf[body_start..].to_vec();
                if let Some(l) = len {
                    body.truncate(l);
                }
                return HttpResp {
                    status,
                    headers,
                    body,
                };
            }
            let n = stream.read(&mut chunk).await.expect("read response");
            assert!(
                n > 0,
                "connection closed before a full response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("no complete HTTP answer to {head:?} within 10 s"))
}

/// Send one request with a fresh client.
pub async fn http(
    hub: &Hub,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResp {
    http_with(&client(), hub, method, path, headers, body).await
}

pub async fn get(hub: &Hub, path: &str) -> HttpResp {
    http(hub, "GET", path, &[], None).await
}

/// POST `body` as JSON with extra `headers`.
pub async fn post_json(hub: &Hub, path: &str, headers: &[(&str, &str)], body: &Value) -> HttpResp {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    http(hub, "POST", path, &all, Some(body.to_string().as_bytes())).await
}
