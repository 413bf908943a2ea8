//! The run's report: one serialisable struct (written as JSON) and its readable table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::procfs::Window;
use crate::publish::PhaseResult;
use crate::stats::LatencySummary;

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_kib: u64,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                .unwrap_or_default(),
            mem_total_kib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0),
        }
    }
}

/// Opening the sockets.
#[derive(Debug, Default, Serialize)]
pub struct ConnectResult {
    pub attempted: usize,
    pub connected: usize,
    /// Failures by cause (`http 429`, `close 4429 ...`, `timeout`, ...).
    pub failed: BTreeMap<String, u64>,
    pub seconds: f64,
    /// Sockets admitted (to `welcome`) per second over the ramp, `concurrency` at a time.
    pub handshakes_per_s: f64,
    pub concurrency: usize,
    /// TCP connect → `welcome`.
    pub handshake_latency: LatencySummary,
    pub window: Window,
    /// Server CPU per admitted socket (handshake, checks, welcome, subscribe).
    pub server_us_per_connection: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Rss {
    pub baseline_kib: Option<u64>,
    pub fresh_kib: Option<u64>,
    pub after_traffic_kib: Option<u64>,
    pub fresh_per_conn_kib: Option<f64>,
    pub after_traffic_per_conn_kib: Option<f64>,
    /// How long the hub was left idle before the after-traffic reading.
    pub settle_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct IdleResult {
    pub hold_s: f64,
    pub held_at_end: i64,
    pub pings_received: u64,
    /// Server CPU while idle (heartbeats), over the hold.
    pub window: Window,
    /// Server CPU per held socket per second, µs.
    pub server_us_per_conn_s: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct ChurnResult {
    pub target_per_s: f64,
    pub hold_ms: u64,
    pub attempted: u64,
    pub connected: u64,
    pub failed: BTreeMap<String, u64>,
    /// Graceful closes completed (close frame answered, TCP ended).
    pub closed: u64,
    pub connects_per_s: f64,
    pub handshake_latency: LatencySummary,
    pub close_latency: LatencySummary,
    pub rss_before_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
    /// After the first half and a settle pause.
    pub rss_after_half_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub rss_delta_kib: Option<i64>,
    pub window: Window,
    /// Server CPU per connect + disconnect.
    pub server_us_per_cycle: Option<f64>,
}

/// Did every subscriber get every accepted event exactly once?
#[derive(Debug, Default, Serialize)]
pub struct Integrity {
    pub events_accepted: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Events beyond the per-socket bitmap (not checked for duplicates).
    pub unchecked: u64,
    /// All accepted events arrived before the drain limit.
    pub drained: bool,
    pub sockets_closed_by_server: u64,
    pub unexpected_closes: BTreeMap<String, u64>,
    pub error_frames: u64,
    pub parse_errors: u64,
    pub publish_errors: Vec<String>,
}

/// A peer server (uWebSockets.js, Node `ws`) at the hub's size and fixed rates, same client.
#[derive(Debug, Default, Serialize)]
pub struct PeerRun {
    /// `uws` or `ws`.
    pub label: String,
    pub connect: ConnectResult,
    pub rss: Rss,
    pub phases: Vec<PhaseResult>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    /// Free text from `--label` (bench.sh passes `embedded` or `redis`).
    pub label: Option<String>,
    pub url: String,
    pub publish_via: String,
    pub server_pid: Option<u32>,
    pub started_unix_s: u64,
    pub machine: Machine,
    pub bench_threads: usize,
    pub settings: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub floor: Vec<PhaseResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_connect: Option<ConnectResult>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerRun>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectResult>,
    pub connections_held: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss: Option<Rss>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleResult>,
    pub phases: Vec<PhaseResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<ChurnResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integrity: Option<Integrity>,
    /// Publish round trip (request written → answer read), all phases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_rtt: Option<LatencySummary>,
    /// Selected `/metrics` values at the end.
    pub hub_metrics: BTreeMap<String, f64>,
    pub warnings: Vec<String>,
    pub wall_s: f64,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// What most likely bounds a window's figure.
pub fn limit_of(w: &Window, fixed_rate: bool, nproc: usize) -> &'static str {
    let bench_cores = w.bench_cpu_s / w.seconds.max(1e-9);
    let server_cores = w.server_cpu_pct.unwrap_or(0.0) / 100.0;
    let other_cores = w.other_cpu_pct.unwrap_or(0.0) / 100.0;
    let redis_cores = w.redis_cpu_pct.unwrap_or(0.0) / 100.0;
    let cores = nproc.max(1) as f64;
    if w.bench_cpu_pct_per_thread > 90.0 {
        "bench client"
    } else if server_cores >= 0.9 * cores {
        "server CPU"
    } else if w.server_threads.first().is_some_and(|t| t.pct >= 85.0) {
        "one server thread"
    } else if redis_cores >= 0.9 {
        "redis CPU"
    } else if server_cores + bench_cores + other_cores + redis_cores >= 0.9 * cores {
        if other_cores > 0.15 {
            "cores busy (noise)"
        } else {
            "both cores busy"
        }
    } else if fixed_rate {
        "publish rate"
    } else {
        "window/latency"
    }
}

fn phase_rows(out: &mut String, title: &str, phases: &[PhaseResult], nproc: usize) {
    if phases.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n{title}");
    let _ = writeln!(
        out,
        "  {:<12} {:>8} {:>9} {:>11} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7} {:>6} {:>6}  limit",
        "phase",
        "ev/s",
        "deliv",
        "deliv/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "µs/deliv",
        "srv %",
        "bench%",
        "other%",
        "floor×",
    );
    for p in phases {
        let w = &p.window;
        let _ = writeln!(
            out,
            "  {:<12} {:>8.1} {:>9} {:>11.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>7} {:>7.0} {:>6} {:>6}  {}",
            p.label,
            p.events_per_s,
            p.deliveries,
            w.deliveries_per_s,
            p.latency.p50_ms,
            p.latency.p90_ms,
            p.latency.p99_ms,
            p.latency.max_ms,
            opt(w.server_us_per_delivery, 2),
            opt(w.server_cpu_pct, 0),
            w.bench_cpu_pct_per_thread,
            opt(w.other_cpu_pct, 0),
            opt(p.ratio_to_floor, 2),
            match p.target_events_per_s {
                Some(t) if p.events_per_s < 0.97 * t && limit_of(w, true, nproc) == "publish rate" =>
                    "publishers (in-flight bound)",
                _ => limit_of(w, p.target_events_per_s.is_some(), nproc),
            },
        );
        let mut extra: Vec<String> = w
            .server_threads
            .iter()
            .map(|t| format!("{} {:.0}%", t.name, t.pct))
            .collect();
        if let Some(r) = w.redis_cpu_pct {
            extra.push(format!("redis-server {r:.0}%"));
        }
        if !extra.is_empty() {
            let _ = writeln!(
                out,
                "  {:<12} threads (% of a core): {}",
                "",
                extra.join(", ")
            );
        }
    }
}

fn connect_row(out: &mut String, title: &str, c: &ConnectResult) {
    let _ = writeln!(
        out,
        "{title:<26} {}/{} in {:.1} s = {:.0}/s (concurrency {}), connect→welcome p50 {:.1} ms p99 {:.1} ms, server {} µs/conn, bench {:.0}%/thread",
        c.connected,
        c.attempted,
        c.seconds,
        c.handshakes_per_s,
        c.concurrency,
        c.handshake_latency.p50_ms,
        c.handshake_latency.p99_ms,
        opt(c.server_us_per_connection, 1),
        c.window.bench_cpu_pct_per_thread,
    );
    if !c.failed.is_empty() {
        let _ = writeln!(out, "{:<26} {:?}", "  connect failures", c.failed);
    }
}

fn rss_row(out: &mut String, title: &str, r: &Rss) {
    let _ = writeln!(
        out,
        "{title:<26} fresh {} KiB/conn, after traffic {} KiB/conn (baseline {} MiB, fresh {} MiB, after {} MiB, after {:.0} s idle)",
        opt(r.fresh_per_conn_kib, 2),
        opt(r.after_traffic_per_conn_kib, 2),
        opt(r.baseline_kib.map(|k| k as f64 / 1024.0), 1),
        opt(r.fresh_kib.map(|k| k as f64 / 1024.0), 1),
        opt(r.after_traffic_kib.map(|k| k as f64 / 1024.0), 1),
        r.settle_s,
    );
}

impl Report {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "switchboard-bench {}{}  target {} (pid {}), publish via {}, {} bench threads, {} cores ({})",
            self.scenario,
            self.label.as_ref().map(|l| format!(" [{l}]")).unwrap_or_default(),
            self.url,
            self.server_pid.map_or("-".into(), |p| p.to_string()),
            self.publish_via,
            self.bench_threads,
            self.machine.nproc,
            self.machine.cpu_model,
        );
        if let Some(c) = &self.floor_connect {
            connect_row(&mut out, "floor connections", c);
        }
        phase_rows(
            &mut out,
            "floor (minimal fan-out server, same client):",
            &self.floor,
            self.machine.nproc,
        );
        if !self.floor.is_empty() {
            out.push('\n');
        }
        for p in &self.peers {
            connect_row(
                &mut out,
                &format!("peer {} connections", p.label),
                &p.connect,
            );
            rss_row(&mut out, &format!("peer {} RSS", p.label), &p.rss);
            phase_rows(
                &mut out,
                &format!("peer {} (same client):", p.label),
                &p.phases,
                self.machine.nproc,
            );
            out.push('\n');
        }
        if let Some(c) = &self.connect {
            connect_row(&mut out, "connections", c);
            let _ = writeln!(out, "{:<26} {}", "connections held", self.connections_held);
        }
        if let Some(r) = &self.rss {
            rss_row(&mut out, "server RSS", r);
        }
        if let Some(i) = &self.idle {
            let _ = writeln!(
                out,
                "{:<26} {:.0} s: {} held, {} pings, server CPU {}% of a core = {} µs per socket-second",
                "idle hold",
                i.hold_s,
                i.held_at_end,
                i.pings_received,
                opt(i.window.server_cpu_pct, 2),
                opt(i.server_us_per_conn_s, 3),
            );
        }
        phase_rows(&mut out, "hub:", &self.phases, self.machine.nproc);
        if let Some(c) = &self.churn {
            let _ = writeln!(
                out,
                "{:<26} target {:.0}/s, hold {} ms: {} connected / {} attempted, {} closed, {:.0} connects/s",
                "churn", c.target_per_s, c.hold_ms, c.connected, c.attempted, c.closed, c.connects_per_s
            );
            let _ = writeln!(
                out,
                "{:<26} connect→welcome p50 {:.1} ms p99 {:.1} ms max {:.1} ms; close p50 {:.1} ms p99 {:.1} ms",
                "",
                c.handshake_latency.p50_ms,
                c.handshake_latency.p99_ms,
                c.handshake_latency.max_ms,
                c.close_latency.p50_ms,
                c.close_latency.p99_ms
            );
            let _ = writeln!(
                out,
                "{:<26} server {} µs per connect+disconnect, {}% of a core; bench {:.0}%/thread",
                "",
                opt(c.server_us_per_cycle, 1),
                opt(c.window.server_cpu_pct, 0),
                c.window.bench_cpu_pct_per_thread
            );
            let _ = writeln!(
                out,
                "{:<26} before {} KiB, peak {} KiB, after half {} KiB, after {} KiB: delta {} KiB",
                "server RSS",
                c.rss_before_kib.map_or("-".into(), |v| v.to_string()),
                c.rss_peak_kib.map_or("-".into(), |v| v.to_string()),
                c.rss_after_half_kib.map_or("-".into(), |v| v.to_string()),
                c.rss_after_kib.map_or("-".into(), |v| v.to_string()),
                c.rss_delta_kib.map_or("-".into(), |v| v.to_string()),
            );
            if !c.failed.is_empty() {
                let _ = writeln!(out, "{:<26} {:?}", "  failures", c.failed);
            }
        }
        if let Some(i) = &self.integrity {
            let _ = writeln!(
                out,
                "\n{:<26} accepted {} events, expected {} deliveries, got {}: lost {}, duplicated {}{}",
                "integrity",
                i.events_accepted,
                i.expected_deliveries,
                i.delivered,
                i.lost,
                i.duplicated,
                if i.drained { "" } else { " (NOT drained)" }
            );
            if i.sockets_closed_by_server > 0 || i.error_frames > 0 || i.parse_errors > 0 {
                let _ = writeln!(
                    out,
                    "{:<26} closed by server {} {:?}, error frames {}, unparsed events {}",
                    "",
                    i.sockets_closed_by_server,
                    i.unexpected_closes,
                    i.error_frames,
                    i.parse_errors
                );
            }
            for e in &i.publish_errors {
                let _ = writeln!(out, "{:<26} publish error: {e}", "");
            }
        }
        if let Some(r) = &self.publish_rtt {
            let _ = writeln!(
                out,
                "{:<26} p50 {:.2} ms p99 {:.2} ms max {:.2} ms ({} publishes)",
                "publish round trip", r.p50_ms, r.p99_ms, r.max_ms, r.count
            );
        }
        if !self.hub_metrics.is_empty() {
            let list: Vec<String> = self
                .hub_metrics
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(out, "{:<26} {}", "hub /metrics", list.join(" "));
        }
        for w in &self.warnings {
            let _ = writeln!(out, "WARNING: {w}");
        }
        let _ = writeln!(out, "wall {:.1} s", self.wall_s);
        out
    }
}
