//! The hub as a child process: `Hub` starts `switchboard serve` with a clean test environment,
//! waits for its `listening on` line, keeps (and echoes) everything it prints, signals it and
//! waits for it to exit; `run_cli` runs a `switchboard` command that is expected to finish and
//! returns what it printed; `Worker` runs another long-lived command beside the hubs
//! (`voice-echo`); `wait_child` and `terminate` stop any helper process (nginx,
//! redis-server, playwright) within a bound.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{JWT_SECRET, PUBLISH_KEY, UNSET};

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

/// A long-running `switchboard` command beside the hubs (e.g. `voice-echo`), with the same
/// clean environment and kept output as a [`Hub`]; killed on drop.
pub struct Worker {
    name: String,
    child: Child,
    logs: Arc<LogBuf>,
}

impl Worker {
    /// Start `switchboard ARGS` with the test base environment plus `env`, and wait (20 s at
    /// most, else panic with its output) for a line containing `ready`.
    pub fn start(args: &[&str], env: &[(&str, &str)], ready: &str) -> Worker {
        let name = format!("{}:{}", test_name(), args.first().unwrap_or(&"switchboard"));
        let mut child = command(args, env).spawn().expect("spawn switchboard");
        let logs = Arc::new(LogBuf::default());
        pump(
            child.stderr.take().expect("piped stderr"),
            format!("{name} stderr"),
            logs.clone(),
            |_| {},
        );
        pump(
            child.stdout.take().expect("piped stdout"),
            format!("{name} stdout"),
            logs.clone(),
            |_| {},
        );
        let worker = Worker { name, child, logs };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut lines = worker.logs.lines.lock().unwrap();
        while !lines.iter().any(|l| l.contains(ready)) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "{} printed no line with {ready:?} within {START_TIMEOUT:?}; output:\n{}",
                worker.name,
                lines.join("\n")
            );
            lines = worker
                .logs
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
        drop(lines);
        worker
    }

    /// Everything it printed so far.
    pub fn logs(&self) -> String {
        self.logs.text()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
