//! A throwaway `redis-server` for unit tests that run the Lua scripts: a child process on a
//! free loopback port, keeping nothing on disk, killed when dropped. Never the Redis on 6379.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh redis-server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports tried before giving up (another test may take a free port between the check and
/// redis-server's bind).
const ATTEMPTS: usize = 5;

/// A `redis-server` child on a free loopback port.
pub(crate) struct TestRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TestRedis {
    /// Start a redis-server and wait until it answers PING.
    pub(crate) fn start() -> Self {
        for _ in 0..ATTEMPTS {
            if let Some(redis) = Self::try_start() {
                return redis;
            }
        }
        panic!("redis-server did not start on a free port in {ATTEMPTS} attempts");
    }

    fn try_start() -> Option<Self> {
        let port = free_port();
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (is it installed?)");
        let mut redis = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !redis.answers_ping() {
            // Exited at start-up: most likely the port was taken meanwhile; try another.
            if let Ok(Some(_)) = redis.child.try_wait() {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer PING within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(redis)
    }

    /// `redis://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A fresh synchronous connection for the test's own commands.
    pub(crate) fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect to the test redis on {}: {e}", self.port))
    }

    /// The cap slots this Redis holds for `user_key` (`org/user`), oldest first.
    pub(crate) fn cap_slots(&self, user_key: &str) -> Vec<String> {
        redis::cmd("ZRANGE")
            .arg(super::redis::KeyScheme::Plain.caps(user_key))
            .arg(0)
            .arg(-1)
            .query(&mut self.conn())
            .expect("ZRANGE caps")
    }

    fn answers_ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
            return false;
        };
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .is_ok_and(|pong| pong == "PONG")
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on right now, never 6379.
fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local addr").port();
        if port != 6379 {
            return port;
        }
    }
}
