//! The floor: the least a fan-out server can do. A child process (`switchboard-bench
//! floor-server`) accepts WebSocket clients with tokio-tungstenite, greets each with the
//! frames the bench's client waits for, then for every line on its stdin (`topic seq g ph t`)
//! builds one event frame and writes those same bytes to every socket, one `write()` each,
//! with the sockets split over its worker threads. Nothing else: no per-socket task, no
//! reading, no heartbeat, no queue. Its CPU per delivery, measured with the same client as
//! the hub, is what the hub's figure is compared with.

use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::client::ws_config;

/// A complete unmasked text frame (server to client) carrying `payload`.
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x81);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= u16::MAX as usize => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

enum ShardMsg {
    Socket(TcpStream),
    Frame(Bytes),
}

/// Run the floor server until stdin closes (the `floor-server` subcommand).
pub fn serve(threads: usize) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("floor: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // A deep accept queue: thousands of clients connect at once.
        let listener = match tokio::net::TcpSocket::new_v4().and_then(|s| {
            s.bind(([127, 0, 0, 1], 0).into())?;
            s.listen(4096)
        }) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("floor: bind: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("floor: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        println!("listening {addr}");
        let _ = std::io::stdout().flush();

        let shards: Vec<mpsc::UnboundedSender<ShardMsg>> = (0..threads.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(shard(rx));
                tx
            })
            .collect();
        let shards = Arc::new(shards);

        // stdin: one event per line; EOF ends the process.
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
        let line_shards = shards.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() != 5 {
                    continue;
                }
                let payload = format!(
                    r#"{{"type":"event","topic":"fan","id":"0-{seq}","event":"bench","data":{{"seq":{seq},"g":{g},"ph":{ph},"t":{t}}}}}"#,
                    seq = f[1],
                    g = f[2],
                    ph = f[3],
                    t = f[4]
                );
                let frame = Bytes::from(text_frame(payload.as_bytes()));
                for s in line_shards.iter() {
                    let _ = s.send(ShardMsg::Frame(frame.clone()));
                }
            }
            let _ = done_tx.send(());
        });

        let mut next = 0usize;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let shard = shards[next % shards.len()].clone();
                    next += 1;
                    tokio::spawn(async move {
                        let _ = stream.set_nodelay(true);
                        let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await else {
                            return;
                        };
                        let stream = ws.into_inner();
                        let mut hello = text_frame(br#"{"type":"welcome","conn_id":"floor","user":"floor","org":"floor","heartbeat_ms":0}"#);
                        hello.extend_from_slice(&text_frame(br#"{"type":"subscribed","topic":"fan"}"#));
                        if write_all(&stream, &hello).await {
                            let _ = shard.send(ShardMsg::Socket(stream));
                        }
                    });
                }
                _ = done_rx.recv() => break,
            }
        }
        std::process::ExitCode::SUCCESS
    })
}

/// One worker's sockets: each frame is written to each of them.
async fn shard(mut rx: mpsc::UnboundedReceiver<ShardMsg>) {
    let mut sockets: Vec<TcpStream> = Vec::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            ShardMsg::Socket(s) => sockets.push(s),
            ShardMsg::Frame(frame) => {
                let mut dead = Vec::new();
                for (i, s) in sockets.iter().enumerate() {
                    if !write_all(s, &frame).await {
                        dead.push(i);
                    }
                }
                for i in dead.into_iter().rev() {
                    sockets.swap_remove(i);
                }
            }
        }
    }
}

/// Write all of `bytes`: one `write()` when the socket has room (always, at these rates).
async fn write_all(s: &TcpStream, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match s.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if s.writable().await.is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// A running floor server child and the pipe that feeds it events.
pub struct FloorChild {
    child: Child,
    pub addr: std::net::SocketAddr,
    pub lines: std::sync::mpsc::Sender<String>,
}

impl FloorChild {
    /// The floor server: this binary's `floor-server` subcommand.
    pub fn spawn(threads: usize) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args(["floor-server", "--floor-threads", &threads.to_string()]);
        Self::start(cmd, "floor server")
    }

    /// A peer server (`node <dir>/peer.mjs <kind>`, bench/peers): it reads the same lines and
    /// prints the same first line as the floor, so the same client and pacer drive it.
    pub fn spawn_peer(dir: &std::path::Path, kind: &str) -> Result<Self, String> {
        let script = dir.join("peer.mjs");
        if !dir.join("node_modules").is_dir() {
            return Err(format!(
                "{}: no node_modules; run `npm ci --prefix {}` (scripts/bench.sh does)",
                dir.display(),
                dir.display()
            ));
        }
        let mut cmd = Command::new("node");
        cmd.arg(script).arg(kind);
        Self::start(cmd, "peer server")
    }

    fn start(mut cmd: Command, what: &str) -> Result<Self, String> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn {what}: {e}"))?;
        let stdout = child.stdout.take().ok_or(format!("{what} stdout"))?;
        let mut first = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .map_err(|e| format!("{what} stdout: {e}"))?;
        let addr = first
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("{what} said {first:?}"))?;
        let mut stdin = child.stdin.take().ok_or(format!("{what} stdin"))?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for mut line in rx {
                line.push('\n');
                if stdin.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            addr,
            lines: tx,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stop the child (its sockets close with it).
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FloorChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frame headers use the short, 16-bit and 64-bit length forms at their boundaries.
    #[test]
    fn frame_lengths() {
        assert_eq!(&text_frame(b"hi")[..2], &[0x81, 2]);
        assert_eq!(&text_frame(&[b'a'; 126])[..4], &[0x81, 126, 0, 126]);
        assert_eq!(text_frame(&[b'a'; 70000])[1], 127);
    }
}
