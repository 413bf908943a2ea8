//! A real Redis Cluster for tests: three masters with one replica each, every node a
//! `redis-server --cluster-enabled yes` child on a free loopback port (its cluster bus on that
//! port + 10000), formed by `redis-cli --cluster create`, keeping nothing but its node file in
//! a temporary directory. A test can SIGKILL the master owning a key and wait for its replica
//! to take over. Every node is killed when the value is dropped. Never port 6379.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{echo_lines, open_tempdir, require_tool};

/// Masters, and replicas per master.
const MASTERS: usize = 3;
const NODES: usize = MASTERS * 2;
/// How long a node may be silent before the others fail it over; low, so a failover takes
/// about two seconds.
const NODE_TIMEOUT_MS: u64 = 1000;
/// How long forming the cluster, or a failover, may take.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// One node of the cluster.
struct Node {
    port: u16,
    child: Option<Child>,
}

/// A running 3+3 Redis Cluster.
pub struct RedisCluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Start six nodes, form the cluster, and wait until every live node says
    /// `cluster_state:ok` with all 16384 slots served.
    pub fn start() -> RedisCluster {
        let bin = require_tool("redis-server");
        let cli = require_tool("redis-cli");
        let dir = open_tempdir("sb-redis-cluster-");
        let nodes = free_cluster_ports(NODES)
            .into_iter()
            .map(|port| {
                let node_dir = dir.path().join(port.to_string());
                std::fs::create_dir_all(&node_dir).expect("node directory");
                let mut child = Command::new(&bin)
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"])
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                    // A replica may take over however long it was cut off from its master.
                    .args(["--cluster-replica-validity-factor", "0"])
                    // Replicas synchronise at once rather than after the default 5 s wait.
                    .args(["--repl-diskless-sync-delay", "0"])
                    .arg("--dir")
                    .arg(&node_dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn redis-server");
                let name = format!("redis-cluster:{port}");
                echo_lines(child.stdout.take().expect("piped stdout"), name.clone());
                echo_lines(child.stderr.take().expect("piped stderr"), name);
                Node {
                    port,
                    child: Some(child),
                }
            })
            .collect();
        let cluster = RedisCluster { nodes, _dir: dir };
        for node in &cluster.nodes {
            wait_until(
                FORM_TIMEOUT,
                &format!("node {} answers PING", node.port),
                || ping(node.port),
            );
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let formed = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            formed.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&formed.stdout),
            String::from_utf8_lossy(&formed.stderr)
        );
        cluster.wait_ok();
        cluster.wait_replicas_synced();
        cluster
    }

    /// Wait until every replica has synchronised with its master (a replica that never did
    /// cannot take over, and a write would not be copied to it).
    fn wait_replicas_synced(&self) {
        for node in &self.nodes {
            wait_until(
                FORM_TIMEOUT,
                &format!("node {} is a master or a synchronised replica", node.port),
                || {
                    node_conn(node.port).is_some_and(|mut conn| {
                        redis::cmd("INFO")
                            .arg("replication")
                            .query::<String>(&mut conn)
                            .is_ok_and(|info| {
                                info.contains("role:master")
                                    || info.contains("master_link_status:up")
                            })
                    })
                },
            );
        }
    }

    /// `redis://127.0.0.1:PORT` of every node, what pods get as `redis.cluster_urls`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The seed list as one environment value (comma-separated).
    pub fn urls_env(&self) -> String {
        self.urls().join(",")
    }

    /// A cluster connection for the test's own commands.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(self.live_urls())
            .expect("cluster urls")
            .get_connection()
            .expect("connect to the test Redis Cluster")
    }

    fn live_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// Wait until every live node says `cluster_state:ok` and serves all slots.
    pub fn wait_ok(&self) {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            wait_until(
                FORM_TIMEOUT,
                &format!("node {} reports cluster_state:ok", node.port),
                || {
                    cluster_info(node.port).is_some_and(|info| {
                        info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                    })
                },
            );
        }
    }

    /// The port of the master that owns `key`'s slot now.
    pub fn master_of(&self, key: &str) -> u16 {
        let port = self.live_urls()[0]
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let mut conn = node_conn(port).expect("a live node");
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .expect("CLUSTER KEYSLOT");
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut conn)
            .expect("CLUSTER SLOTS");
        for range in ranges {
            let redis::Value::Array(parts) = range else {
                continue;
            };
            let int = |v: &redis::Value| redis::from_redis_value::<i64>(v).unwrap_or(-1);
            if int(&parts[0]) <= slot as i64 && slot as i64 <= int(&parts[1]) {
                let redis::Value::Array(master) = &parts[2] else {
                    panic!("CLUSTER SLOTS: no master entry in {parts:?}");
                };
                return int(&master[1]) as u16;
            }
        }
        panic!("no master owns slot {slot} of {key}");
    }

    /// Move `key`'s slot, with its keys, from the master that owns it to another master, as
    /// resharding does (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE on every master); returns
    /// the port of the new owner once every live node agrees.
    pub fn move_slot_of(&self, key: &str) -> u16 {
        let source = self.master_of(key);
        let masters: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .filter(|&port| role(port).as_deref() == Some("master"))
            .collect();
        let target = *masters
            .iter()
            .find(|&&port| port != source)
            .expect("another master");
        let mut src = node_conn(source).expect("source master");
        let mut dst = node_conn(target).expect("target master");
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut src)
            .expect("CLUSTER KEYSLOT");
        let id = |conn: &mut redis::Connection| -> String {
            redis::cmd("CLUSTER")
                .arg("MYID")
                .query(conn)
                .expect("CLUSTER MYID")
        };
        let (src_id, dst_id) = (id(&mut src), id(&mut dst));
        let setslot = |conn: &mut redis::Connection, state: &str, node: &str| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(node)
                .exec(conn)
                .expect("CLUSTER SETSLOT");
        };
        setslot(&mut dst, "IMPORTING", &src_id);
        setslot(&mut src, "MIGRATING", &dst_id);
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut src)
                .expect("CLUSTER GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(target)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .exec(&mut src)
                .expect("MIGRATE");
        }
        for port in masters {
            let mut conn = node_conn(port).expect("a master");
            setslot(&mut conn, "NODE", &dst_id);
        }
        wait_until(
            FORM_TIMEOUT,
            &format!("{key}'s slot moved to {target}"),
            || self.master_of(key) == target,
        );
        target
    }

    /// SIGKILL the master owning `key` (no goodbye to its clients); returns its port.
    pub fn kill_master_of(&mut self, key: &str) -> u16 {
        let port = self.master_of(key);
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("the master is one of ours");
        let mut child = node.child.take().expect("the master is running");
        child.kill().expect("SIGKILL redis-server");
        child.wait().expect("reap redis-server");
        port
    }

    /// Wait until a replica has taken over from the killed master on `dead` port: `key`'s slot
    /// is owned by another node and every live node says the cluster is ok.
    pub fn wait_failover(&self, key: &str, dead: u16) {
        wait_until(
            FORM_TIMEOUT,
            &format!("a replica takes over {key}'s slot from {dead}"),
            || self.master_of(key) != dead,
        );
        self.wait_ok();
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `n` free loopback ports whose cluster bus port (+10000) is free too.
fn free_cluster_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut held = Vec::new();
    while ports.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local addr").port();
        if port == 6379 || port > 55535 {
            continue;
        }
        let Ok(bus) = TcpListener::bind(("127.0.0.1", port + 10000)) else {
            continue;
        };
        ports.push(port);
        // Held until all are chosen, so the same port is not picked twice.
        held.push((listener, bus));
    }
    ports
}

fn node_conn(port: u16) -> Option<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .ok()?
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()
}

fn ping(port: u16) -> bool {
    node_conn(port).is_some_and(|mut conn| {
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .is_ok_and(|pong| pong == "PONG")
    })
}

/// `master` or `slave`, as ROLE answers first.
fn role(port: u16) -> Option<String> {
    let mut conn = node_conn(port)?;
    let answer: Vec<redis::Value> = redis::cmd("ROLE").query(&mut conn).ok()?;
    redis::from_redis_value(answer.first()?).ok()
}

fn cluster_info(port: u16) -> Option<String> {
    let mut conn = node_conn(port)?;
    redis::cmd("CLUSTER").arg("INFO").query(&mut conn).ok()
}

/// Poll `ready` until it holds, or panic saying `what` after `timeout`.
fn wait_until(timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
