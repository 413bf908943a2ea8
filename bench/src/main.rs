//! `switchboard-bench`: the hub's measuring tool (BENCHMARKS.md). Against a running hub on loopback
//! it logs in simulated users, opens authenticated WebSockets from several 127.0.0.x source
//! addresses, subscribes them, publishes events at a target rate (through `/api/publish` or
//! straight to Redis), and reports, as a table and as JSON: connections held, handshakes/s, server
//! RSS per connection fresh and after traffic, deliveries/s, publish→receive latency, server CPU
//! per delivery, lost and duplicated events, and its own CPU (with a warning when the bench itself
//! is saturated). Every scenario is bounded in time and count.
//!
//! # Layout
//! - `main.rs`: arguments, the runtime, the watchdog, output.
//! - `scenarios.rs`: idle, fanout, dashboards, churn, floor.
//! - `client.rs`: one simulated browser (connect, subscribe, receive and check events).
//! - `publish.rs`: publishers (HTTP, Redis, floor) and the pacer of a phase.
//! - `floor.rs`: the minimal fan-out server the hub is compared with, and the peer servers
//!   (uWebSockets.js, Node `ws`: bench/peers), each a child process.
//! - `stats.rs`, `procfs.rs`: lock-free counters and histograms; `/proc` readings.
//! - `http.rs`: a minimal HTTP/1.1 client; `report.rs`: the report and its table.

mod client;
mod floor;
mod http;
mod procfs;
mod publish;
mod report;
mod scenarios;
mod stats;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// 15,000 sockets held 60 s: RSS per socket, heartbeat CPU, then a short burst.
    Idle,
    /// 5,000 subscribers of one topic: 20/s, 60/s, then as fast as it goes (floor first).
    Fanout,
    /// 10,000 sockets over 1,000 topics of 10 orgs at 10,000 events/s in total.
    Dashboards,
    /// 1,000 connects + disconnects per second for 60 s; RSS before and after.
    Churn,
    /// The minimal fan-out server alone, same client.
    Floor,
    /// Internal: run the floor server (the bench starts it itself).
    #[value(hide = true)]
    FloorServer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishVia {
    /// `POST /api/publish` with `--key`.
    Http,
    /// `PUBLISH sb:{org}:{topic}` on `--redis-url` (clustered hub).
    Redis,
}

#[derive(Debug, Parser)]
#[command(
    name = "switchboard-bench",
    about = "Load and measure a switchboard hub on this machine (loopback only)"
)]
pub struct Args {
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Base URL of the hub (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The hub's process id, for RSS and CPU readings from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Sockets (default per scenario: idle 15000, fanout 5000, dashboards 10000, floor 5000).
    #[arg(long)]
    pub connections: Option<usize>,
    /// Events/s (dashboards: total, default 10000; floor: 20; idle: burst rate, 10);
    /// churn: connects/s (1000).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Fanout phases: comma list of events/s, `max` = as fast as it goes.
    #[arg(long, default_value = "20,60,max")]
    pub rates: String,
    /// Seconds per phase (idle: hold; churn: duration). Defaults: idle 60, fanout 20 per
    /// phase, dashboards 30, churn 60, floor 20.
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Worker threads of the bench's runtime.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Worker threads of the floor server.
    #[arg(long, default_value_t = 2)]
    pub floor_threads: usize,
    /// Skip the floor run before fanout.
    #[arg(long)]
    pub no_floor: bool,
    /// Fanout: peer servers run after the floor at every fixed rate, same client and sizes
    /// (comma list of `uws`, `ws`: uWebSockets.js and Node `ws`, bench/peers/peer.mjs).
    #[arg(long, default_value = "")]
    pub peers: String,
    /// Where peer.mjs and its installed npm packages are.
    #[arg(long, default_value = "bench/peers")]
    pub peer_dir: PathBuf,
    /// Source addresses 127.0.0.1 ..= 127.0.0.N, used round-robin.
    #[arg(long, default_value_t = 32)]
    pub source_ips: u8,
    /// Sockets per simulated user (the hub's default cap is 5).
    #[arg(long, default_value_t = 4)]
    pub per_user: usize,
    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    #[arg(long, value_enum, default_value = "http")]
    pub publish: PublishVia,
    /// Redis for `--publish redis` (loopback only).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// redis-server's process id: its CPU is reported apart (clustered runs).
    #[arg(long)]
    pub redis_pid: Option<u32>,
    /// Publish key (api.publish_keys).
    #[arg(
        long,
        env = "SWITCHBOARD_PUBLISH_KEY",
        default_value = "dev-publish-key"
    )]
    pub key: String,
    /// Origin header of every socket.
    #[arg(long, default_value = "http://localhost:3000")]
    pub origin: String,
    /// Publishes in flight at once (one keep-alive connection each).
    #[arg(long, default_value_t = 16)]
    pub publishers: usize,
    /// As fast as it goes: events published but not yet received by every subscriber.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Seconds the hub is left idle before the after-traffic RSS reading.
    #[arg(long, default_value_t = 5.0)]
    pub settle_s: f64,
    /// Churn: how long each socket stays open, ms.
    #[arg(long, default_value_t = 1000)]
    pub hold_ms: u64,
    /// Dashboards: topics and orgs.
    #[arg(long, default_value_t = 1000)]
    pub topics: usize,
    #[arg(long, default_value_t = 10)]
    pub orgs: usize,
    /// Bound on events published in one run.
    #[arg(long, default_value_t = 2_000_000)]
    pub max_events: u64,
    /// The whole run stops (exit 3) after this many seconds, whatever it is doing.
    #[arg(long, default_value_t = 900)]
    pub max_runtime_s: u64,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A label stored in the report (e.g. embedded, redis).
    #[arg(long)]
    pub label: Option<String>,
    /// Idle: suffix of the topic and user names, so several bench processes against pods of
    /// one cluster keep apart (a publish reaches every pod; the caps count per user).
    #[arg(long)]
    pub tag: Option<String>,
}

/// The floor or peer server child, if one is running, so the watchdog can stop it.
pub static FLOOR_PID: AtomicU32 = AtomicU32::new(0);

fn loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `http://host:port` → the socket address, refusing anything but loopback.
pub fn parse_url(url: &str, scheme: &str, default_port: u16) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix("://"))
        .ok_or_else(|| format!("{url}: expected {scheme}://host:port"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let authority = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h, p.parse().map_err(|_| format!("{url}: bad port"))?)
        }
        _ => (authority, default_port),
    };
    if !loopback(host) {
        return Err(format!(
            "{url}: refusing a non-loopback target ({host}); this bench only loads this machine"
        ));
    }
    let host = if host.eq_ignore_ascii_case("localhost") {
        "127.0.0.1"
    } else {
        host
    };
    (host.trim_start_matches('[').trim_end_matches(']'), port)
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .find(|a| a.ip().is_loopback())
        .ok_or_else(|| format!("{url}: no loopback address"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.scenario == Scenario::FloorServer {
        return floor::serve(args.floor_threads);
    }
    let server = match parse_url(&args.url, "http", 80) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("switchboard-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(r) = &args.redis_url {
        if let Err(e) = parse_url(r, "redis", 6379) {
            eprintln!("switchboard-bench: {e}");
            return ExitCode::from(2);
        }
    }
    if args.publish == PublishVia::Redis && args.redis_url.is_none() {
        eprintln!("switchboard-bench: --publish redis needs --redis-url");
        return ExitCode::from(2);
    }
    if let Some(pid) = args.server_pid {
        if !procfs::alive(pid) {
            eprintln!("switchboard-bench: no process {pid}");
            return ExitCode::from(2);
        }
    }
    if let Some(pid) = args.redis_pid {
        procfs::REDIS_PID.store(pid, Ordering::Relaxed);
    }
    let limit = args.max_runtime_s;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(limit));
        eprintln!("switchboard-bench: --max-runtime-s {limit} reached, stopping");
        let floor = FLOOR_PID.load(Ordering::Relaxed);
        if floor != 0 {
            let _ = std::process::Command::new("kill")
                .arg(floor.to_string())
                .status();
        }
        std::process::exit(3);
    });
    let sources: Vec<IpAddr> = (1..=args.source_ips.max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard-bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(scenarios::run(&args, server, sources));
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchboard-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Sockets still closing in the background must not hold the process.
    runtime.shutdown_timeout(Duration::from_secs(2));
    print!("{}", report.table());
    if let Some(path) = &args.json {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match serde_json::to_string_pretty(&report) {
            Ok(text) => {
                if let Err(e) = std::fs::write(path, text) {
                    eprintln!("switchboard-bench: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("json: {}", path.display());
            }
            Err(e) => eprintln!("switchboard-bench: json: {e}"),
        }
    }
    let clean = report
        .integrity
        .as_ref()
        .is_none_or(|i| i.lost == 0 && i.duplicated == 0);
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loopback targets are accepted; anything else is refused.
    #[test]
    fn only_loopback() {
        assert!(parse_url("http://127.0.0.1:8080", "http", 80).is_ok());
        assert!(parse_url("http://localhost:9", "http", 80).is_ok());
        assert!(parse_url("http://127.3.4.5", "http", 80).is_ok());
        assert!(parse_url("redis://127.0.0.1:6390/0", "redis", 6379).is_ok());
        assert!(parse_url("http://10.0.0.1:8080", "http", 80).is_err());
        assert!(parse_url("http://example.com", "http", 80).is_err());
        assert!(parse_url("https://127.0.0.1", "http", 80).is_err());
    }
}
