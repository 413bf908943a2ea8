//! The integration-test harness: starts the real `switchboard` binary as a child process (so
//! configuration loading, logging and signals are exercised exactly as in production) and
//! speaks to it only over the network: HTTP through `awc`, WebSockets through
//! `tokio-tungstenite`, and a hand-rolled raw WebSocket client for the cases where the client
//! must misbehave (never answering pings).
//!
//! Every wait here is on an event (a log line, a frame, a process exit, a metric reaching a
//! value) bounded by a timeout; a test never sleeps in place of something it could await.
//! Tests use `#[actix_web::test]` because `awc` needs actix's single-threaded runtime;
//! tokio-tungstenite runs inside it too.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// An origin the default (development) configuration admits through `allow_localhost`.
pub const ORIGIN: &str = "http://localhost:3000";
/// The publish key every test hub accepts.
pub const PUBLISH_KEY: &str = "test-publish-key";
/// The JWT secret every test hub verifies `/auth/session` tokens with.
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789";
/// The default cookie name.
pub const COOKIE_NAME: &str = "sb_session";
/// Default bound on every wait for a frame or a response.
pub const T: Duration = Duration::from_secs(5);
/// Pass as an override value to remove a variable from the hub's environment.
pub const UNSET: &str = "\u{0}unset";

/// How long a hub may take to log `listening on`.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a CLI command (or a `serve` expected to fail) may run.
const CLI_TIMEOUT: Duration = Duration::from_secs(15);

/// Variables from the developer's shell that would change what the hub loads.
const CONVENTIONAL_VARS: &[&str] = &[
    "SWITCHBOARD_ENV",
    "REDIS_URL",
    "PORT",
    "BIND",
    "FRONTEND_URL",
    "ALLOWED_ORIGINS",
    "RUST_LOG",
];

fn base_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("SWITCHBOARD__SERVER__PORT", "0"),
        ("SWITCHBOARD__DEMO__SIMULATE_CALLS", "false"),
        ("SWITCHBOARD__API__PUBLISH_KEYS", PUBLISH_KEY),
        ("SWITCHBOARD__AUTH__JWT_SECRET", JWT_SECRET),
        ("RUST_LOG", "info"),
    ]
}

/// A `switchboard` command with a clean environment: inherited switchboard variables removed,
/// the test base environment set, then `overrides` applied (later wins; `UNSET` removes).
fn command(args: &[&str], overrides: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars() {
        if key.starts_with("SWITCHBOARD") || CONVENTIONAL_VARS.contains(&key.as_str()) {
            cmd.env_remove(&key);
        }
    }
    for (key, value) in base_env().into_iter().chain(overrides.iter().copied()) {
        if value == UNSET {
            cmd.env_remove(key);
        } else {
            cmd.env(key, value);
        }
    }
    cmd
}

/// The current test's name (libtest names each test thread after its test).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("test")
        .rsplit("::")
        .next()
        .unwrap_or("test")
        .to_string()
}

/// Lines a child process wrote, shared between reader threads and the test.
#[derive(Default)]
struct LogBuf {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl LogBuf {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.changed.notify_all();
    }
    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// Reads `pipe` line by line on a thread: echoes each line (prefixed) to the test's stderr,
/// keeps it, and calls `on_line` with it.
fn pump<R: Read + Send + 'static>(
    pipe: R,
    prefix: String,
    logs: Arc<LogBuf>,
    mut on_line: impl FnMut(&str) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let reader = BufReader::new(pipe);
        for line in reader.lines() {
            let Ok(line) = line else { break };
            eprintln!("[{prefix}] {line}");
            on_line(&line);
            logs.push(line);
        }
    })
}

/// A running `switchboard serve`, killed on drop.
pub struct Hub {
    name: String,
    child: Child,
    addr: SocketAddr,
    logs: Arc<LogBuf>,
    exit: Option<ExitStatus>,
}

impl Hub {
    /// Start `switchboard serve` with the test base environment plus `env`, and wait for its
    /// `listening on http://ADDR` line. Panics (with everything it printed) if it does not
    /// come within 20 s.
    pub fn start(env: &[(&str, &str)]) -> Hub {
        match Self::try_start(env) {
            Ok(hub) => hub,
            Err(why) => panic!("{why}"),
        }
    }

    /// Like `start`, but returns what went wrong instead of panicking.
    pub fn try_start(env: &[(&str, &str)]) -> Result<Hub, String> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}#{n}", test_name());
        let mut child = command(&["serve"], env)
            .spawn()
            .map_err(|e| format!("cannot spawn switchboard: {e}"))?;
        let logs = Arc::new(LogBuf::default());
        let (tx, rx) = mpsc::channel::<SocketAddr>();
        let stderr = child.stderr.take().expect("piped stderr");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut sent = false;
        let found = move |line: &str| {
            if sent {
                return;
            }
            if let Some(addr) = parse_listening(line) {
                sent = true;
                let _ = tx.send(addr);
            }
        };
        pump(stderr, format!("{name} stderr"), logs.clone(), found);
        pump(stdout, format!("{name} stdout"), logs.clone(), |_| {});

        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => Ok(Hub {
                name,
                child,
                addr,
                logs,
                exit: None,
            }),
            Err(e) => {
                let status = match e {
                    mpsc::RecvTimeoutError::Timeout => {
                        let _ = child.kill();
                        format!("no `listening on http://` line within {START_TIMEOUT:?}")
                    }
                    mpsc::RecvTimeoutError::Disconnected => {
                        format!("exited before listening: {:?}", child.wait())
                    }
                };
                let _ = child.wait();
                // Give the reader threads a moment to drain what is left in the pipes.
                std::thread::sleep(Duration::from_millis(50));
                Err(format!(
                    "hub {name} did not start ({status}); env overrides {env:?}; output:\n{}",
                    logs.text()
                ))
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Everything the hub printed so far, one line per line.
    pub fn logs(&self) -> String {
        self.logs.text()
    }

    /// Wait until a printed line satisfies `pred`; returns that line, or None on timeout.
    /// Blocks the calling thread (the hub is another process, so nothing it needs stalls).
    pub fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.logs.lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().find(|l| pred(l)) {
                return Some(line.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self
                .logs
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }
    pub fn sigint(&self) {
        self.signal("INT");
    }
    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Wait for the process to exit; panics with the logs if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.try_wait_exit(timeout) {
            Some(status) => status,
            None => panic!(
                "hub {} still running {timeout:?} after being asked to stop; output:\n{}",
                self.name,
                self.logs()
            ),
        }
    }

    /// Wait for the process to exit, at most `timeout`. The OS offers no exit-with-timeout
    /// wait on a `Child`, so this polls `try_wait` every 10 ms.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit {
            return Some(status);
        }
        self.exit = wait_child(&mut self.child, timeout);
        self.exit
    }
}

/// Wait for `child` to exit, at most `timeout`. The OS offers no exit-with-timeout wait on a
/// `Child`, so this polls `try_wait` every 10 ms.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stop a helper process the way it expects (SIGTERM, so it can stop its own children, such
/// as nginx's workers or playwright's Chromium), and SIGKILL it if it is still there after
/// `grace`.
pub fn terminate(child: &mut Child, grace: Duration) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    if wait_child(child, grace).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `... listening on http://127.0.0.1:PORT ...` → the address.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    let at = line.find("listening on http://")?;
    let rest = &line[at + "listening on http://".len()..];
    let addr: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '/' && *c != ',' && *c != ')')
        .collect();
    addr.parse().ok()
}

/// What a finished CLI command printed.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
    /// stdout and stderr together, for "the output mentions ..." checks.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Run `switchboard ARGS` (not expected to keep running) with the base environment plus
/// `env`; killed after 15 s, which then shows up as a signal exit and a note in stderr.
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    let mut child = command(args, env).spawn().expect("spawn switchboard");
    let mut out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    // stderr is read by line so that a `serve` which was expected to refuse its configuration
    // but started listening instead is stopped at once rather than after the timeout.
    let listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = listening.clone();
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if parse_listening(&line).is_some() {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            s.push_str(&line);
            s.push('\n');
        }
        s
    });
    let deadline = Instant::now() + CLI_TIMEOUT;
    let mut killed = None;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        let started = listening.load(std::sync::atomic::Ordering::SeqCst);
        if started || Instant::now() >= deadline {
            let _ = child.kill();
            killed = Some(if started {
                "started listening".to_string()
            } else {
                format!("still running after {CLI_TIMEOUT:?}")
            });
            break child.wait().expect("wait for killed child");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = t_out.join().unwrap_or_default();
    let mut stderr = t_err.join().unwrap_or_default();
    if let Some(why) = killed {
        stderr.push_str(&format!(
            "\n[harness: `switchboard {}` {why}; killed]",
            args.join(" ")
        ));
    }
    let output = CliOutput {
        status,
        stdout,
        stderr,
    };
    eprintln!("[{} cli {args:?}] {output}", test_name());
    output
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

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

/// `POST /auth/dev-login` for `user` in `org`; returns the `sb_session=VALUE` pair.
pub async fn dev_login(hub: &Hub, user: &str, org: &str) -> String {
    let resp = post_json(
        hub,
        "/auth/dev-login",
        &[],
        &json!({"user": user, "org": org}),
    )
    .await;
    assert_eq!(resp.status, 204, "dev-login {user}@{org}: {resp}");
    session_cookie(&resp).unwrap_or_else(|| panic!("dev-login set no {COOKIE_NAME} cookie: {resp}"))
}

/// The `name=value` pair of the session cookie a response sets, if any.
pub fn session_cookie(resp: &HttpResp) -> Option<String> {
    resp.headers_all("set-cookie")
        .into_iter()
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
        .find(|pair| {
            pair.starts_with(&format!("{COOKIE_NAME}=")) && pair.len() > COOKIE_NAME.len() + 1
        })
}

/// The full `Set-Cookie` header for the session cookie, attributes included.
pub fn session_set_cookie(resp: &HttpResp) -> Option<String> {
    resp.headers_all("set-cookie")
        .into_iter()
        .find(|c| c.starts_with(&format!("{COOKIE_NAME}=")))
}

/// The same cookie with one character in the middle of its value changed.
pub fn tamper(cookie: &str) -> String {
    let (name, value) = cookie.split_once('=').expect("name=value");
    let mut chars: Vec<char> = value.chars().collect();
    let mid = chars.len() / 2;
    let at = (mid..chars.len())
        .chain(0..mid)
        .find(|&i| chars[i].is_ascii_alphanumeric())
        .expect("an alphanumeric character in the cookie value");
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    format!("{name}={}", chars.into_iter().collect::<String>())
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 JWT over `claims` signed with `secret`.
pub fn jwt(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode JWT")
}

/// `POST /api/publish` with the test key; returns status and JSON body (Null if not JSON).
pub async fn publish(hub: &Hub, org: &str, topic: &str, event: &str, data: Value) -> (u16, Value) {
    publish_with(&client(), hub, org, topic, event, data).await
}

pub async fn publish_with(
    client: &awc::Client,
    hub: &Hub,
    org: &str,
    topic: &str,
    event: &str,
    data: Value,
) -> (u16, Value) {
    let body = json!({"org": org, "topic": topic, "event": event, "data": data});
    let resp = publish_raw_with(client, hub, Some(PUBLISH_KEY), &body.to_string(), &[]).await;
    (resp.status, resp.json_or_null())
}

/// Publish and insist on 202; returns the event id.
pub async fn publish_ok(hub: &Hub, org: &str, topic: &str, event: &str, data: Value) -> String {
    let (status, body) = publish(hub, org, topic, event, data).await;
    assert_eq!(status, 202, "publish to {org}/{topic}: {body}");
    body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("publish answer has no string id: {body}"))
        .to_string()
}

/// `POST /api/publish` with an arbitrary body and key (None: no Authorization header).
pub async fn publish_raw(
    hub: &Hub,
    key: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> HttpResp {
    publish_raw_with(&client(), hub, key, body, headers).await
}

pub async fn publish_raw_with(
    client: &awc::Client,
    hub: &Hub,
    key: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> HttpResp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut all: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        all.push(("authorization", a));
    }
    all.extend_from_slice(headers);
    http_with(
        client,
        hub,
        "POST",
        "/api/publish",
        &all,
        Some(body.as_bytes()),
    )
    .await
}

pub async fn metrics(hub: &Hub) -> String {
    let resp = get(hub, "/metrics").await;
    assert_eq!(resp.status, 200, "/metrics: {resp}");
    resp.text()
}

/// The value of the sample `name_with_labels` (e.g. `switchboard_x_total{reason="y"}`).
pub fn metric(text: &str, name_with_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name_with_labels)?;
        let rest = rest.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Like `metric`, with an absent sample read as 0.
pub fn metric_value(text: &str, name_with_labels: &str) -> f64 {
    metric(text, name_with_labels).unwrap_or(0.0)
}

/// Poll `/metrics` every 50 ms until `pred(value)` holds; returns the last value and whether
/// it held within `timeout`.
pub async fn wait_metric(
    hub: &Hub,
    name_with_labels: &str,
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
) -> (f64, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric_value(&metrics(hub).await, name_with_labels);
        if pred(v) {
            return (v, true);
        }
        if Instant::now() >= deadline {
            return (v, false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

/// A handshake the server answered with something other than 101 (status 0: no HTTP answer).
#[derive(Debug, Clone)]
pub struct HttpRefusal {
    pub status: u16,
    pub body: String,
}

impl HttpRefusal {
    pub fn json_or_null(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "refusal {} body is not JSON {:?}: {e}",
                self.status, self.body
            )
        })
    }
}

/// What a client opening a socket sends.
#[derive(Debug, Clone, Default)]
pub struct WsOpts {
    pub origin: Option<String>,
    pub cookie: Option<String>,
    pub headers: Vec<(String, String)>,
    /// SO_RCVBUF for the client socket: a small one keeps the kernel from absorbing a flood
    /// on behalf of a client that does not read.
    pub recv_buffer: Option<u32>,
}

impl WsOpts {
    pub fn new(origin: Option<&str>, cookie: Option<&str>) -> Self {
        WsOpts {
            origin: origin.map(str::to_string),
            cookie: cookie.map(str::to_string),
            ..Default::default()
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

/// A frame as a test sees it (protocol ping/pong are handled below this level).
#[derive(Debug, Clone)]
pub enum Frame {
    /// A text frame holding JSON, with its raw text.
    Json(Value, String),
    /// A text frame that is not JSON.
    Text(String),
    Binary(Vec<u8>),
    /// A close frame (code 1005 when it carried none).
    Close(u16, String),
    /// The connection ended without a close frame.
    Ended(String),
}

impl Frame {
    /// What a test sees of the next item of a WebSocket stream (`None`: the stream ended);
    /// `None` for protocol ping/pong, which tungstenite answers itself on its next read or
    /// write.
    pub fn read(next: Option<Result<Message, tungstenite::Error>>) -> Option<Frame> {
        Some(match next {
            None => Frame::Ended("stream ended".into()),
            Some(Err(e)) => Frame::Ended(format!("{e}")),
            Some(Ok(Message::Text(t))) => {
                let t = t.to_string();
                match serde_json::from_str::<Value>(&t) {
                    Ok(v) => Frame::Json(v, t),
                    Err(_) => Frame::Text(t),
                }
            }
            Some(Ok(Message::Binary(b))) => Frame::Binary(b.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => return None,
            Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => {
                Frame::Close(u16::from(code), reason.to_string())
            }
            Some(Ok(Message::Close(None))) => Frame::Close(1005, String::new()),
        })
    }
}

/// What the tests' WebSocket clients share: [`Ws`] here, read in place, and the cluster tests'
/// client with a background reader. Each says how it receives and sends; the checks built on
/// those are written once.
#[allow(async_fn_in_trait)]
pub trait TestSocket {
    /// The next frame other than ping/pong, or None if nothing came within `timeout`.
    async fn recv(&mut self, timeout: Duration) -> Option<Frame>;

    /// The next text frame as JSON; panics on timeout, binary, close or non-JSON.
    async fn next_json(&mut self, timeout: Duration) -> Value;

    async fn send_json(&mut self, v: &Value);

    /// The very next frame must be a close; returns its code and reason.
    async fn expect_only_close(&mut self, timeout: Duration) -> (u16, String) {
        match self.recv(timeout).await {
            Some(Frame::Close(code, reason)) => (code, reason),
            Some(Frame::Ended(why)) => {
                (1006, format!("connection ended without close frame: {why}"))
            }
            None => panic!("socket still open after {timeout:?} (expected only a close frame)"),
            Some(other) => panic!("expected only a close frame, got {other:?} first"),
        }
    }

    /// Send `v` and return the next JSON frame.
    async fn request(&mut self, v: &Value) -> Value {
        self.send_json(v).await;
        self.next_json(T).await
    }

    /// Subscribe to `topic` and insist on `{"type":"subscribed","topic":topic}`.
    async fn subscribe(&mut self, topic: &str) {
        let reply = self
            .request(&json!({"type": "subscribe", "topic": topic}))
            .await;
        assert_eq!(reply["type"], "subscribed", "subscribe {topic}: {reply}");
        assert_eq!(reply["topic"], topic, "subscribe {topic}: {reply}");
    }

    /// App-level ping/pong round trip: proves the socket is open and served.
    async fn assert_alive(&mut self) {
        let reply = self.request(&json!({"type": "ping"})).await;
        assert_eq!(reply, json!({"type": "pong"}), "app ping");
    }
}

/// A client WebSocket.
pub struct Ws {
    inner: WebSocketStream<TcpStream>,
    /// Protocol pings received (each answered by tungstenite with a pong).
    pub pings_seen: usize,
    /// Raw text of the last JSON frame `next_json` returned.
    pub last_text: String,
    /// Data frames `expect_close` skipped on its way to the close.
    pub skipped: Vec<Frame>,
    closed: bool,
}

/// Open a socket to `hub` with the given Origin and Cookie headers.
pub async fn ws_connect(
    hub: &Hub,
    origin: Option<&str>,
    cookie: Option<&str>,
) -> Result<Ws, HttpRefusal> {
    ws_connect_with(hub, WsOpts::new(origin, cookie)).await
}

pub async fn ws_connect_with(hub: &Hub, opts: WsOpts) -> Result<Ws, HttpRefusal> {
    let inner = ws_handshake(hub.addr(), &opts).await?;
    Ok(Ws {
        inner,
        pings_seen: 0,
        last_text: String::new(),
        skipped: Vec::new(),
        closed: false,
    })
}

/// The client side of a WebSocket handshake with `/ws` at `addr` (a hub, or nginx in front of
/// several), bounded to 10 s; a refusal carries the HTTP status and body.
pub async fn ws_handshake(
    addr: SocketAddr,
    opts: &WsOpts,
) -> Result<WebSocketStream<TcpStream>, HttpRefusal> {
    match tokio::time::timeout(Duration::from_secs(10), ws_handshake_unbounded(addr, opts)).await {
        Ok(r) => r,
        Err(_) => Err(HttpRefusal {
            status: 0,
            body: "handshake did not finish within 10 s".into(),
        }),
    }
}

async fn ws_handshake_unbounded(
    addr: SocketAddr,
    opts: &WsOpts,
) -> Result<WebSocketStream<TcpStream>, HttpRefusal> {
    let mut req = format!("ws://{addr}/ws")
        .into_client_request()
        .expect("ws request");
    {
        let h = req.headers_mut();
        if let Some(o) = &opts.origin {
            h.insert(
                "origin",
                HeaderValue::from_str(o).expect("origin header value"),
            );
        }
        if let Some(c) = &opts.cookie {
            h.insert(
                "cookie",
                HeaderValue::from_str(c).expect("cookie header value"),
            );
        }
        for (k, v) in &opts.headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
    }
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(size) = opts.recv_buffer {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    let stream = socket.connect(addr).await.map_err(|e| HttpRefusal {
        status: 0,
        body: format!("TCP connect to {addr}: {e}"),
    })?;
    match tokio_tungstenite::client_async(req, stream).await {
        Ok((inner, _resp)) => Ok(inner),
        Err(tungstenite::Error::Http(resp)) => Err(HttpRefusal {
            status: resp.status().as_u16(),
            body: resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        }),
        Err(e) => Err(HttpRefusal {
            status: 0,
            body: format!("handshake failed: {e}"),
        }),
    }
}

/// Open a socket that must succeed; panics with the refusal otherwise.
pub async fn ws_open(hub: &Hub, origin: Option<&str>, cookie: Option<&str>) -> Ws {
    ws_connect(hub, origin, cookie)
        .await
        .unwrap_or_else(|r| panic!("handshake refused: HTTP {} {:?}", r.status, r.body))
}

/// Log `user` into `org` (dev login), open a socket from the allowed origin and read its
/// welcome. Returns the socket, the welcome frame and the cookie.
pub async fn connect_user(hub: &Hub, user: &str, org: &str) -> (Ws, Value, String) {
    let cookie = dev_login(hub, user, org).await;
    let mut ws = ws_open(hub, Some(ORIGIN), Some(&cookie)).await;
    let welcome = ws.next_json(T).await;
    assert_eq!(
        welcome["type"], "welcome",
        "first frame for {user}@{org}: {welcome}"
    );
    (ws, welcome, cookie)
}

impl Ws {
    /// The next frame, which must be binary.
    pub async fn next_binary(&mut self, timeout: Duration) -> Vec<u8> {
        match self.recv(timeout).await {
            Some(Frame::Binary(b)) => b,
            None => panic!("no frame within {timeout:?} (expected a binary frame)"),
            Some(other) => panic!("expected a binary frame, got {other:?}"),
        }
    }

    /// Read until the close frame (data frames on the way are kept in `skipped`); returns
    /// its code and reason. A connection that ends without one reads as 1006.
    pub async fn expect_close(&mut self, timeout: Duration) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                None => panic!(
                    "socket still open after {timeout:?} (expected a close); skipped {} frames, last: {:?}",
                    self.skipped.len(),
                    self.skipped.last()
                ),
                Some(Frame::Close(code, reason)) => return (code, reason),
                Some(Frame::Ended(why)) => return (1006, format!("connection ended without close frame: {why}")),
                Some(other) => self.skipped.push(other),
            }
        }
    }

    /// Keep reading (and so answering pings) for `d`; panics if any frame but ping/pong comes.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Some(frame) = self.recv(d).await {
            panic!("expected nothing for {d:?}, got {frame:?}");
        }
    }

    pub async fn try_send(&mut self, msg: Message) -> Result<(), tungstenite::Error> {
        tokio::time::timeout(T, self.inner.send(msg))
            .await
            .unwrap_or_else(|_| Err(tungstenite::Error::Io(std::io::ErrorKind::TimedOut.into())))
    }

    pub async fn send_text(&mut self, text: &str) {
        self.try_send(Message::text(text.to_string()))
            .await
            .unwrap_or_else(|e| panic!("sending text frame: {e}"));
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.try_send(Message::binary(bytes.to_vec()))
            .await
            .unwrap_or_else(|e| panic!("sending binary frame: {e}"));
    }

    /// Close from the client side and wait (bounded) for the server's answer.
    pub async fn close(&mut self) {
        if self.closed {
            return;
        }
        let _ = self.inner.close(None).await;
        let deadline = tokio::time::Instant::now() + T;
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, self.inner.next()).await {}
        self.closed = true;
    }
}

impl TestSocket for Ws {
    /// The next frame other than ping/pong, or None if nothing came within `timeout`.
    async fn recv(&mut self, timeout: Duration) -> Option<Frame> {
        if self.closed {
            return Some(Frame::Ended("connection already closed".into()));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Err(_) => return None,
                Ok(n) => n,
            };
            if let Some(Ok(Message::Ping(_))) = next {
                self.pings_seen += 1;
            }
            let Some(frame) = Frame::read(next) else {
                continue;
            };
            if matches!(frame, Frame::Close(..) | Frame::Ended(_)) {
                self.closed = true;
                // Let tungstenite finish the closing handshake; ignore how it ends.
                let _ = tokio::time::timeout(Duration::from_millis(200), self.inner.next()).await;
            }
            return Some(frame);
        }
    }

    /// The next text frame as JSON; panics on timeout, binary, close or non-JSON.
    async fn next_json(&mut self, timeout: Duration) -> Value {
        match self.recv(timeout).await {
            Some(Frame::Json(v, raw)) => {
                self.last_text = raw;
                v
            }
            None => panic!("no frame within {timeout:?} (expected a JSON text frame)"),
            Some(other) => panic!("expected a JSON text frame, got {other:?}"),
        }
    }

    async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------------------------

/// One SSE record's fields.
#[derive(Debug)]
pub struct Record {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Value,
}

/// An open `/sse` response, read record by record.
pub struct SseClient {
    body: Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, awc::error::PayloadError>>>>,
    buf: String,
}

/// What `GET /sse` answered: the open stream, or the refusal's status and JSON body.
pub enum Opened {
    Stream(SseClient),
    Refused(u16, Value),
}

pub async fn open_sse(hub: &Hub, query: &str, headers: &[(&str, &str)]) -> Opened {
    let mut req = client().get(hub.url(&format!("/sse?{query}")));
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let mut resp = req.send().await.expect("GET /sse");
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp.body().await.unwrap_or_default();
        return Opened::Refused(status, serde_json::from_slice(&body).unwrap_or(Value::Null));
    }
    Opened::Stream(SseClient {
        body: Box::pin(resp),
        buf: String::new(),
    })
}

/// The stream `GET /sse` opened; panics on a refusal.
pub fn sse_stream(opened: Opened) -> SseClient {
    match opened {
        Opened::Stream(s) => s,
        Opened::Refused(status, body) => panic!("/sse refused: {status} {body}"),
    }
}

impl SseClient {
    /// The next record that carries data; panics after `T` without one.
    pub async fn next_record(&mut self) -> Record {
        match self.record_within(T).await {
            Some(record) => record,
            None => panic!("no SSE record within {T:?}; have {:?}", self.buf),
        }
    }

    /// The next record that carries data, or None when `wait` passes without one.
    pub async fn record_within(&mut self, wait: Duration) -> Option<Record> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let mut record = Record {
                    id: None,
                    event: None,
                    data: Value::Null,
                };
                for line in raw.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        record.id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        record.event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        record.data = serde_json::from_str(v).unwrap_or(Value::String(v.into()));
                    }
                }
                if !record.data.is_null() {
                    return Some(record);
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .ok()?
                .expect("the SSE stream ended")
                .expect("read the SSE stream");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Wait for the `welcome` record: the stream is subscribed once it is sent, so an event
    /// published after this returns is this stream's to receive.
    pub async fn expect_welcome(&mut self) {
        let record = self.next_record().await;
        assert_eq!(record.event.as_deref(), Some("welcome"), "{record:?}");
    }

    /// The next `call.status` record (skipping the `welcome` record the stream opens with).
    pub async fn next_event(&mut self) -> Record {
        loop {
            let record = self.next_record().await;
            if record.event.as_deref() == Some("call.status") {
                return record;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A raw WebSocket client that never answers anything (for heartbeat tests)
// ---------------------------------------------------------------------------------------------

/// A WebSocket spoken by hand: does the upgrade, then only reads frames.
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A frame read by `RawWs`: opcode and payload.
#[derive(Debug)]
pub enum RawFrame {
    Frame {
        opcode: u8,
        payload: Vec<u8>,
    },
    /// The server closed the TCP connection.
    Eof,
}

impl RawWs {
    /// Upgrade `GET /ws` with Origin and Cookie; panics unless the answer is 101.
    pub async fn connect(hub: &Hub, origin: &str, cookie: &str) -> RawWs {
        let mut stream = TcpStream::connect(hub.addr()).await.expect("connect");
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Origin: {origin}\r\nCookie: {cookie}\r\n\r\n",
            hub.addr()
        );
        stream
            .write_all(req.as_bytes())
            .await
            .expect("write upgrade");
        let mut raw = RawWs {
            stream,
            buf: Vec::new(),
        };
        let head = loop {
            if let Some(end) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
                raw.buf.drain(..end + 4);
                break head;
            }
            let n = raw.fill(T).await.expect("upgrade answer within 5 s");
            assert!(
                n > 0,
                "server closed before answering the upgrade: {:?}",
                String::from_utf8_lossy(&raw.buf)
            );
        };
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade answer: {head}");
        raw
    }

    async fn fill(&mut self, timeout: Duration) -> Option<usize> {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(timeout, self.stream.read(&mut chunk)).await {
            Err(_) => None,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Some(n)
            }
            Ok(Err(_)) => Some(0),
        }
    }

    /// The next frame (or EOF), or None if nothing complete arrived within `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((opcode, payload, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(RawFrame::Frame { opcode, payload });
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.fill(left).await {
                None => return None,
                Some(0) => return Some(RawFrame::Eof),
                Some(_) => {}
            }
        }
    }
}

/// Parse one unmasked server frame from the front of `buf`: (opcode, payload, bytes used).
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let mut len = (buf[1] & 0x7f) as usize;
    let mut at = 2;
    if len == 126 {
        if buf.len() < 4 {
            return None;
        }
        len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        at = 4;
    } else if len == 127 {
        if buf.len() < 10 {
            return None;
        }
        len = u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize;
        at = 10;
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return None;
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < at + len {
        return None;
    }
    let mut payload = buf[at..at + len].to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Some((opcode, payload, at + len))
}

/// Assert a close `(code, reason)` equals the expected one, with context.
#[track_caller]
pub fn assert_close(got: (u16, String), code: u16, reason: &str, what: &str) {
    assert_eq!(
        (got.0, got.1.as_str()),
        (code, reason),
        "{what}: expected close {code} {reason:?}, got {} {:?}",
        got.0,
        got.1
    );
}

/// A `"<ms>-<seq>"` event id as a comparable pair.
pub fn parse_event_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}
