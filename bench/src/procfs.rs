//! What the bench reads from `/proc`: a process's resident memory (`VmRSS`), its CPU time
//! (`utime + stime` from `stat`, all threads), and the open-files limit. Linux only.

use std::fs;
use std::time::Instant;

use serde::Serialize;

/// Clock ticks per second of `utime`/`stime` (USER_HZ, 100 on every Linux x86-64 build).
const TICKS_PER_S: f64 = 100.0;

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU seconds (user + system, all threads) that `pid` has used.
pub fn cpu_s(pid: u32) -> Option<f64> {
    stat_cpu(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds of each thread of `pid`: (tid, name, seconds).
pub fn thread_cpu(pid: u32) -> Vec<(u32, String, f64)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            let name = stat[stat.find('(')? + 1..stat.rfind(')')?].to_string();
            Some((tid, name, stat_cpu(&stat)?))
        })
        .collect()
}

/// CPU seconds this process has used.
pub fn self_cpu_s() -> f64 {
    fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu(&s))
        .unwrap_or(0.0)
}

fn stat_cpu(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_S)
}

/// CPU seconds the whole machine has spent busy (all cores; `/proc/stat`, idle and iowait
/// excluded).
pub fn machine_busy_s() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4).unwrap_or(&0);
    Some(busy as f64 / TICKS_PER_S)
}

/// The soft limit on open files of this process.
pub fn nofile_soft() -> Option<u64> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

pub fn alive(pid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}")).is_ok()
}

/// One reading of the clocks and counters a measurement window needs.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub server_cpu_s: Option<f64>,
    pub bench_cpu_s: f64,
    pub machine_busy_s: Option<f64>,
    /// redis-server's CPU (clustered runs).
    pub redis_cpu_s: Option<f64>,
    pub delivered: u64,
    /// The server's threads: (tid, name, CPU seconds).
    pub server_threads: std::sync::Arc<Vec<(u32, String, f64)>>,
}

/// The redis-server whose CPU is read with every sample (clustered runs), 0: none.
pub static REDIS_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Sample {
    pub fn take(server: Option<u32>, delivered: u64) -> Self {
        Self {
            at: Instant::now(),
            server_cpu_s: server.and_then(cpu_s),
            bench_cpu_s: self_cpu_s(),
            machine_busy_s: machine_busy_s(),
            redis_cpu_s: match REDIS_PID.load(std::sync::atomic::Ordering::Relaxed) {
                0 => None,
                pid => cpu_s(pid),
            },
            delivered,
            server_threads: std::sync::Arc::new(server.map(thread_cpu).unwrap_or_default()),
        }
    }
}

/// One server thread's share of a window.
#[derive(Debug, Clone, Serialize)]
pub struct ThreadCpu {
    pub name: String,
    pub tid: u32,
    /// % of one core.
    pub pct: f64,
}

/// The difference between two samples, as the figures the report prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    pub seconds: f64,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    /// Server CPU over the window (user + system).
    pub server_cpu_s: Option<f64>,
    /// Server CPU as a share of one core (100 = one core busy).
    pub server_cpu_pct: Option<f64>,
    pub server_us_per_delivery: Option<f64>,
    pub server_cpu_s_per_million: Option<f64>,
    pub bench_cpu_s: f64,
    /// Bench CPU as a share of its runtime threads (100 = every thread busy).
    pub bench_cpu_pct_per_thread: f64,
    /// CPU of everything else on the machine (other processes, unattributed kernel work), %
    /// of one core: noise when it is more than a few percent.
    pub other_cpu_pct: Option<f64>,
    /// redis-server's CPU, % of one core (clustered runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_cpu_pct: Option<f64>,
    /// The busiest server threads over the window (a thread near 100% is a serial bottleneck).
    pub server_threads: Vec<ThreadCpu>,
}

impl Window {
    pub fn between(a: &Sample, b: &Sample, bench_threads: usize) -> Self {
        let seconds = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let deliveries = b.delivered.saturating_sub(a.delivered);
        let server_cpu_s = match (a.server_cpu_s, b.server_cpu_s) {
            (Some(x), Some(y)) => Some((y - x).max(0.0)),
            _ => None,
        };
        let per_delivery = server_cpu_s
            .filter(|_| deliveries > 0)
            .map(|c| c * 1e6 / deliveries as f64);
        let bench_cpu_s = (b.bench_cpu_s - a.bench_cpu_s).max(0.0);
        let redis_cpu_s = match (a.redis_cpu_s, b.redis_cpu_s) {
            (Some(x), Some(y)) => Some((y - x).max(0.0)),
            _ => None,
        };
        let other_cpu_pct = match (a.machine_busy_s, b.machine_busy_s) {
            (Some(x), Some(y)) => {
                let other = (y - x)
                    - bench_cpu_s
                    - server_cpu_s.unwrap_or(0.0)
                    - redis_cpu_s.unwrap_or(0.0);
                Some((other / seconds * 100.0).max(0.0))
            }
            _ => None,
        };
        Self {
            seconds,
            deliveries,
            deliveries_per_s: deliveries as f64 / seconds,
            server_cpu_s,
            server_cpu_pct: server_cpu_s.map(|c| c / seconds * 100.0),
            server_us_per_delivery: per_delivery,
            server_cpu_s_per_million: per_delivery,
            bench_cpu_s,
            bench_cpu_pct_per_thread: bench_cpu_s / seconds / bench_threads.max(1) as f64 * 100.0,
            other_cpu_pct,
            redis_cpu_pct: redis_cpu_s.map(|c| c / seconds * 100.0),
            server_threads: {
                let mut t: Vec<ThreadCpu> = b
                    .server_threads
                    .iter()
                    .map(|(tid, name, cpu)| {
                        let before = a
                            .server_threads
                            .iter()
                            .find(|(t0, _, _)| t0 == tid)
                            .map_or(0.0, |x| x.2);
                        ThreadCpu {
                            name: name.clone(),
                            tid: *tid,
                            pct: (cpu - before).max(0.0) / seconds * 100.0,
                        }
                    })
                    .filter(|t| t.pct >= 1.0)
                    .collect();
                t.sort_by(|x, y| y.pct.total_cmp(&x.pct));
                t.truncate(6);
                t
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// utime and stime are read after the command name, even one with spaces.
    #[test]
    fn parses_stat() {
        let s = "123 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(stat_cpu(s), Some(3.0));
    }
}
