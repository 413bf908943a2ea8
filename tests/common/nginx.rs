//! Helper processes besides the hub: tools looked up on PATH (`require_tool`), free loopback
//! ports, temporary directories nginx workers can enter, and a real nginx (`Nginx`) run in the
//! foreground from a configuration the test writes. The cluster tests render theirs from
//! `config/nginx.conf`; a test may also write a small one of its own.
//!
//! A missing tool fails the test with the command that installs it; it never skips.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::terminate;

/// How long nginx may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The path of `tool`, looked up on PATH and in /usr/sbin (where Debian puts nginx, and which
/// is not on every user's PATH). Panics with the install command when it is not installed
/// (Debian's package is named after the tool for every tool the tests use).
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("`{tool}` is not installed; this test needs it: apt-get install -y {tool}")
        })
}

/// A TCP port nobody listens on right now (never 6379, the conventional Redis port).
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local addr").port();
        if port != 6379 {
            return port;
        }
    }
}

/// A temporary directory that other users can enter (nginx workers run as `nobody` when
/// the tests run as root, and must reach their temp directories inside it).
pub fn open_tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temporary directory");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the temporary directory");
    }
    dir
}

/// Echo every line of `pipe` to the test's output with `prefix` (shown when a test fails).
pub fn echo_lines<R: Read + Send + 'static>(pipe: R, prefix: String) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{prefix}] {line}");
        }
    });
}

/// The status code of a plain `GET path` over HTTP/1.0 (blocking; for start-up checks).
pub fn blocking_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::Write;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut head = String::new();
    BufReader::new(stream).read_line(&mut head).ok()?;
    head.split(' ').nth(1)?.parse().ok()
}

/// A real nginx, run in the foreground as a child of the test.
pub struct Nginx {
    port: u16,
    child: Option<Child>,
    /// The command line options naming its configuration, prefix and pid file, which
    /// `nginx -s reload` needs too.
    options: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Start nginx on a free loopback port with the configuration `conf(port, dir)` returns
    /// (`dir`: a fresh directory for its temp paths, which must have a `tmp/` below it), and
    /// wait until `GET /healthz` through it answers 200. The configuration must listen on
    /// 127.0.0.1:`port` and leave `pid` and `daemon` to the command line.
    pub fn start_with(conf: impl FnOnce(u16, &Path) -> String) -> Nginx {
        let bin = require_tool("nginx");
        let dir = open_tempdir("sb-nginx-");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("mkdir nginx tmp");
        let port = free_port();
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf(port, dir.path())).expect("write nginx.conf");
        let options = vec![
            "-c".to_string(),
            conf_path.display().to_string(),
            "-p".to_string(),
            format!("{}/", dir.path().display()),
            "-e".to_string(),
            dir.path().join("startup-error.log").display().to_string(),
            "-g".to_string(),
            format!("daemon off; pid {}/nginx.pid;", dir.path().display()),
        ];
        let mut child = Command::new(bin)
            .args(&options)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nginx");
        echo_lines(
            child.stdout.take().expect("piped stdout"),
            format!("nginx:{port} access"),
        );
        echo_lines(
            child.stderr.take().expect("piped stderr"),
            format!("nginx:{port} error"),
        );
        let mut nginx = Nginx {
            port,
            child: Some(child),
            options,
            _dir: dir,
        };
        nginx.wait_serving();
        nginx
    }

    /// Wait until nginx proxies `GET /healthz` to a pod and answers 200.
    fn wait_serving(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if blocking_get_status(self.addr(), "/healthz") == Some(200) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("nginx on port {} exited at start-up: {status}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "nginx on port {} did not proxy /healthz within {START_TIMEOUT:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// `nginx -s reload`, as an operator runs it: the master re-reads its configuration,
    /// starts new workers and tells the old ones to finish gracefully.
    pub fn reload(&self) {
        let out = Command::new(require_tool("nginx"))
            .args(&self.options)
            .args(["-s", "reload"])
            .output()
            .expect("run nginx -s reload");
        assert!(
            out.status.success(),
            "nginx -s reload failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The pids of the master's worker processes right now (from /proc).
    pub fn workers(&self) -> Vec<u32> {
        let master = self.child.as_ref().expect("nginx is running").id();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                // /proc/PID/stat: `pid (comm) state ppid ...`; comm may hold spaces.
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|stat| {
                        let after = stat.rsplit_once(')')?.1;
                        after.split_whitespace().nth(1)?.parse::<u32>().ok()
                    })
                    == Some(master)
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM: the master stops its workers too (SIGKILL would orphan them, still
        // listening on the port).
        terminate(&mut child, Duration::from_secs(5));
    }
}
