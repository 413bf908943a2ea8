//! What a clustered test runs besides the switchboard pods: a real `redis-server` on a free
//! port that a test can SIGKILL and restart on the same port, a real nginx in front of the
//! pods configured from `config/nginx.conf` (the file docker-compose uses, with loopback
//! upstreams), and a TCP proxy between pods and Redis that can wedge subscriber connections.
//! The pods themselves are started by the common harness (`Hub::start` with `REDIS_URL`).
//!
//! Nothing here uses port 6379 or a Redis that was already running. A missing `redis-server`
//! or `nginx` fails the test with the command that installs them; it never skips.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{
    blocking_get_status, echo_lines, free_port, open_tempdir, require_tool, Hub, Nginx,
};

/// How long redis-server may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------------------------

/// A `redis-server` child on a free loopback port, keeping nothing on disk.
pub struct Redis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    starts: usize,
}

impl Redis {
    /// Start redis-server on a free port and wait until it answers PING.
    pub fn start() -> Redis {
        let mut redis = Redis {
            port: free_port(),
            dir: open_tempdir("sb-redis-"),
            child: None,
            starts: 0,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let bin = require_tool("redis-server");
        let port = self.port.to_string();
        let mut child = Command::new(bin)
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn redis-server");
        self.starts += 1;
        let name = format!("redis:{port}#{}", self.starts);
        echo_lines(child.stdout.take().expect("piped stdout"), name.clone());
        echo_lines(child.stderr.take().expect("piped stderr"), name);
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.ping() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("redis-server on port {port} exited at start-up: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer PING within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`, what the pods get as `REDIS_URL`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
            return false;
        };
        redis::cmd("PING")
            .query::<String>(&mut con)
            .is_ok_and(|pong| pong == "PONG")
    }

    /// A fresh synchronous connection for the test's own commands.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect to the test redis on {}: {e}", self.port))
    }

    /// Kill redis-server with SIGKILL (no goodbye to its clients) and wait until it is gone.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("redis-server is running");
        child.kill().expect("SIGKILL redis-server");
        child.wait().expect("reap redis-server");
    }

    /// Start redis-server again on the same port (empty: it keeps nothing on disk).
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Freeze redis-server with SIGSTOP: its connections stay open and nothing answers, as
    /// with a Redis stuck behind a long fork or a stalled disk.
    pub fn pause(&self) {
        kill(self.pid(), "STOP");
    }

    /// Let a paused redis-server run again (SIGCONT); it then works through what it was sent.
    pub fn resume(&self) {
        kill(self.pid(), "CONT");
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    /// Connections that hold subscriptions (`sub=` or `psub=` or `ssub=` above 0 in CLIENT
    /// LIST), as `(addr, CLIENT LIST line)`.
    pub fn subscriber_connections(&self) -> Vec<(String, String)> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut self.conn())
            .expect("CLIENT LIST");
        list.lines()
            .filter(|line| {
                line.split(' ').any(|field| {
                    ["sub=", "psub=", "ssub="].iter().any(|key| {
                        field
                            .strip_prefix(key)
                            .and_then(|n| n.parse::<u64>().ok())
                            .is_some_and(|n| n > 0)
                    })
                })
            })
            .map(|line| {
                let addr = line
                    .split(' ')
                    .find_map(|f| f.strip_prefix("addr="))
                    .unwrap_or("?")
                    .to_string();
                (addr, line.to_string())
            })
            .collect()
    }

    /// How many connections (pods) are subscribed to `channel` (PUBSUB NUMSUB).
    pub fn numsub(&self, channel: &str) -> u64 {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut self.conn())
            .expect("PUBSUB NUMSUB");
        n
    }

    /// Poll PUBSUB NUMSUB until `channel` has exactly `n` subscribers; panics after `timeout`.
    pub async fn wait_numsub(&self, channel: &str, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.numsub(channel);
            if now == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PUBSUB NUMSUB {channel} = {now} after {timeout:?}, expected {n} (one per pod)"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// PUBLISH `payload` on `channel` straight to Redis, as a backend service would; returns
    /// how many subscriber connections received it.
    pub fn publish(&self, channel: &str, payload: &str) -> u64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query(&mut self.conn())
            .expect("PUBLISH")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// pods
// ---------------------------------------------------------------------------------------------

/// How long a fresh pod may take to report ready (connected to Redis, canary back).
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Start `n` switchboard pods sharing the Redis at `redis_url`, each with `env` on top of the
/// common test environment, and wait until every one answers `/readyz` with 200 (a pod
/// listens before its Redis connections are up, and says so on /readyz meanwhile).
pub fn start_pods(redis_url: &str, n: usize, env: &[(&str, &str)]) -> Vec<Hub> {
    let mut all: Vec<(&str, &str)> = vec![("REDIS_URL", redis_url)];
    all.extend_from_slice(env);
    let pods: Vec<Hub> = (0..n).map(|_| Hub::start(&all)).collect();
    for pod in &pods {
        wait_pod_ready(pod);
    }
    pods
}

/// Start one pod like [`start_pods`] does, on `port` (a restarted pod taking its
/// predecessor's place behind nginx), and wait until it is ready.
pub fn start_pod_on(redis_url: &str, port: u16, env: &[(&str, &str)]) -> Hub {
    let port = port.to_string();
    let mut all: Vec<(&str, &str)> = vec![("REDIS_URL", redis_url)];
    all.extend_from_slice(env);
    all.push(("SWITCHBOARD__SERVER__PORT", &port));
    let pod = Hub::start(&all);
    wait_pod_ready(&pod);
    pod
}

/// Wait until a listening pod answers `/readyz` with 200.
pub fn wait_pod_ready(pod: &Hub) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while blocking_get_status(pod.addr(), "/readyz") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "pod {} not ready within {READY_TIMEOUT:?} of listening; output:\n{}",
            pod.name(),
            pod.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Send `signal` (e.g. "KILL") to process `pid`.
pub fn kill(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

// ---------------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------------

/// `config/nginx.conf` turned into a loopback variant: the upstream servers between the
/// `@upstream-servers-begin@`/`-end@` markers replaced by `upstreams` (with the template's
/// server options), `listen 8080;` by `listen 127.0.0.1:PORT;`, and temp paths put under
/// `dir` at the `@local-paths@` marker (the same edits scripts/cluster.sh makes). Logs stay on stderr/stdout, which the test
/// reads.
pub fn render_nginx_conf(
    template: &str,
    upstreams: &[SocketAddr],
    port: u16,
    dir: &Path,
) -> String {
    for marker in [
        "# @upstream-servers-begin@",
        "# @upstream-servers-end@",
        "# @local-paths@",
        "listen 8080;",
    ] {
        assert!(
            template.contains(marker),
            "config/nginx.conf lost the line `{marker}` that scripts/cluster.sh and the cluster tests rely on"
        );
    }
    // The template's own server options (max_fails, fail_timeout), so the tests run them.
    let options = template
        .lines()
        .skip_while(|l| !l.contains("# @upstream-servers-begin@"))
        .find_map(|l| l.trim().strip_prefix("server "))
        .and_then(|server| server.split_once(' '))
        .map_or(";", |(_, options)| options);
    let dir = dir.display();
    let mut out = String::new();
    let mut skipping = false;
    for line in template.lines() {
        if line.contains("# @upstream-servers-begin@") {
            for up in upstreams {
                out.push_str(&format!("        server {up} {options}\n"));
            }
            skipping = true;
            continue;
        }
        if line.contains("# @upstream-servers-end@") {
            skipping = false;
            continue;
        }
        if skipping {
            continue;
        }
        let line = line
            .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"))
            .replace(
                "# @local-paths@",
                &format!(
                    "client_body_temp_path {dir}/tmp/body; proxy_temp_path {dir}/tmp/proxy; \
                     fastcgi_temp_path {dir}/tmp/fastcgi; uwsgi_temp_path {dir}/tmp/uwsgi; \
                     scgi_temp_path {dir}/tmp/scgi;"
                ),
            );
        out.push_str(&line);
        out.push('\n');
    }
    out
}

impl Nginx {
    /// Start nginx on a free port with `config/nginx.conf` pointing at `upstreams`, and wait
    /// until `GET /healthz` through it answers 200.
    pub fn start(upstreams: &[SocketAddr]) -> Nginx {
        let template_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/nginx.conf");
        let template = std::fs::read_to_string(&template_path)
            .unwrap_or_else(|e| panic!("read {}: {e}", template_path.display()));
        Nginx::start_with(|port, dir| render_nginx_conf(&template, upstreams, port, dir))
    }
}

// ---------------------------------------------------------------------------------------------
// the wedging proxy
// ---------------------------------------------------------------------------------------------

/// A TCP proxy between the pods and Redis. While wedged, it stops forwarding Redis's bytes to
/// every connection that has sent a SUBSCRIBE (the pods' subscriber connections): the
/// connection stays up and Redis stays healthy, but no message reaches the pod, which is how
/// a wedged subscriber looks from inside. Unwedging forwards what was held back. While cut, it
/// drops every connection and refuses new ones, as a network partition between one pod and
/// Redis would.
/// Runs on its own thread and runtime, so a test thread blocked in a harness call cannot
/// stall it.
pub struct WedgeProxy {
    port: u16,
    wedged: Arc<tokio::sync::watch::Sender<bool>>,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
    subscribers: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WedgeProxy {
    /// Listen on a free loopback port and forward every connection to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> WedgeProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy port");
        let port = listener.local_addr().expect("proxy addr").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let (wedged, _) = tokio::sync::watch::channel(false);
        let wedged = Arc::new(wedged);
        let (cut, _) = tokio::sync::watch::channel(false);
        let cut = Arc::new(cut);
        let subscribers = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = {
            let wedged = wedged.clone();
            let cut = cut.clone();
            let subscribers = subscribers.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let accept = async {
                        loop {
                            let Ok((client, _)) = listener.accept().await else {
                                continue;
                            };
                            if *cut.borrow() {
                                continue; // dropped: the pod sees its connection closed
                            }
                            tokio::spawn(proxy_connection(
                                client,
                                upstream,
                                wedged.subscribe(),
                                cut.subscribe(),
                                subscribers.clone(),
                            ));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
            })
        };
        WedgeProxy {
            port,
            wedged,
            cut,
            subscribers,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `redis://127.0.0.1:PORT` of the proxy, for the pods.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Hold back everything Redis sends to subscriber connections, from now on.
    pub fn wedge(&self) {
        self.wedged.send_replace(true);
    }

    /// Forward again, held-back bytes first.
    pub fn unwedge(&self) {
        self.wedged.send_replace(false);
    }

    /// Drop every connection and refuse new ones, from now on.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Accept and forward connections again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    /// Connections seen so far that sent a SUBSCRIBE.
    pub fn subscriber_connections_seen(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }
}

impl Drop for WedgeProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Does this client->server chunk carry a (P/S)SUBSCRIBE command name as a RESP bulk string?
fn has_subscribe(window: &[u8]) -> bool {
    let lower = window.to_ascii_lowercase();
    [
        &b"$9\r\nsubscribe\r\n"[..],
        b"$10\r\npsubscribe\r\n",
        b"$10\r\nssubscribe\r\n",
    ]
    .iter()
    .any(|needle| lower.windows(needle.len()).any(|w| w == *needle))
}

async fn proxy_connection(
    client: tokio::net::TcpStream,
    upstream: u16,
    mut wedged: tokio::sync::watch::Receiver<bool>,
    mut cut: tokio::sync::watch::Receiver<bool>,
    subscribers: Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
        return; // Redis is down: the pod sees its connection closed, as with Redis itself.
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let is_subscriber = Arc::new(AtomicBool::new(false));

    let to_server = {
        let is_subscriber = is_subscriber.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            // The tail of the previous chunk, so a command name split across reads is found.
            let mut tail: Vec<u8> = Vec::new();
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if !is_subscriber.load(Ordering::Relaxed) {
                    let mut window = std::mem::take(&mut tail);
                    window.extend_from_slice(&buf[..n]);
                    if has_subscribe(&window) {
                        is_subscriber.store(true, Ordering::Relaxed);
                        subscribers.fetch_add(1, Ordering::Relaxed);
                    }
                    tail = window[window.len().saturating_sub(16)..].to_vec();
                }
                if server_write.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let to_client = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while *wedged.borrow_and_update() && is_subscriber.load(Ordering::Relaxed) {
                if wedged.changed().await.is_err() {
                    return;
                }
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = to_server => {}
        _ = to_client => {}
        _ = cut.wait_for(|cut| *cut) => {}
    }
}
