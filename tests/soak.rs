//! Soak: one hub under cycles of load (steady subscribers, churning sockets that close cleanly
//! or vanish, clients that drop and resume with `since`, slow readers the hub cuts off, HTTP
//! publishes with bursts); after each cycle every socket is gone and the hub's resident memory,
//! open files, threads and registry sizes (`/metrics`) must be back at the baseline taken after
//! a warm-up cycle, within [`Tolerance`]. Every sample goes to a report:
//! `target/tmp/soak-<variant>.json` and `.txt` (`scripts/soak.sh` copies them to
//! `bench-results/`).
//!
//! - `soak_short`: in the default test run, about 50 s, ~1,100 sockets at the peak of each cycle.
//! - `soak_long`: ignored by default; `scripts/soak.sh [MINUTES]` runs it on a release build for
//!   that many minutes (`SOAK_MINUTES`), with more sockets (`SOAK_STEADY`, default 4,000).
//!
//! The baseline is taken after a warm-up cycle, not at start-up: the first sockets fault in
//! code pages, size the allocator's per-thread arenas and fill lazily built tables once, and
//! that is not a leak. The start-up sample is in the report too, and the gap between the two
//! is what BENCHMARKS.md called the churn residue.

mod common;

use std::cell::Cell;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::*;
use serde::Serialize;
use serde_json::json;

const ORG: &str = "7";
/// The topic the slow readers follow, published to in bursts.
const HOT: &str = "hot";

/// How one cycle loads the hub.
#[derive(Debug, Clone, Serialize)]
struct Load {
    /// Sockets opened at the start of a cycle and held to its end (4 per user).
    steady: usize,
    /// Clients that connect, hold 100-800 ms, then close cleanly or just drop, over and over.
    churners: usize,
    /// Clients that drop their socket every 1-3 s and resume with `since`.
    reconnectors: usize,
    /// Clients with a 4 KiB receive buffer reading a frame every 500 ms from the hot topic:
    /// their queues conflate (the default `limits.slow_consumer`), or they are cut off.
    slow: usize,
    topics: usize,
    /// Events per second spread over the topics, plus a burst of `burst` on the hot topic
    /// every second.
    publish_per_s: u32,
    burst: u32,
    cycle_s: u64,
}

/// How far from the baseline a cycle may end.
#[derive(Debug, Clone, Serialize)]
struct Tolerance {
    /// Resident memory over the warm baseline after any cycle, KiB.
    rss_over_baseline_kib: u64,
    /// Resident memory between the first and the last measured cycle, KiB (the leak check).
    rss_growth_kib: u64,
    /// Open files over the baseline (0: exactly back).
    fds_over_baseline: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    label: String,
    at_s: f64,
    rss_kib: u64,
    /// Of the resident memory: anonymous (heap, stacks) and file-backed (the binary's code).
    rss_anon_kib: u64,
    rss_file_kib: u64,
    /// glibc's own account (`malloc_stats`, read through gdb when `SOAK_HEAP_STATS=1`): bytes
    /// its arenas hold from the system, and bytes in live allocations.
    heap_system_kib: Option<u64>,
    heap_in_use_kib: Option<u64>,
    fds: u64,
    threads: u64,
    connections: f64,
    registry_sessions: f64,
    registry_channels: f64,
    handshake_limiter_clients: f64,
    /// Events the slow readers' queues dropped for a newer state of their topic, so far.
    conflated: f64,
    slow_consumer_disconnects: f64,
}

/// What the clients saw in one cycle.
#[derive(Debug, Default, Clone, Serialize)]
struct Traffic {
    connects: u64,
    refused: u64,
    events: u64,
    published: u64,
    publish_refused: u64,
    resumed: u64,
    cut_off: u64,
}

#[derive(Default)]
struct Counters {
    connects: Cell<u64>,
    refused: Cell<u64>,
    events: Cell<u64>,
    published: Cell<u64>,
    publish_refused: Cell<u64>,
    resumed: Cell<u64>,
    cut_off: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

impl Counters {
    fn take(&self) -> Traffic {
        Traffic {
            connects: self.connects.take(),
            refused: self.refused.take(),
            events: self.events.take(),
            published: self.published.take(),
            publish_refused: self.publish_refused.take(),
            resumed: self.resumed.take(),
            cut_off: self.cut_off.take(),
        }
    }
}

#[derive(Serialize)]
struct Report {
    variant: String,
    load: Load,
    tolerance: Tolerance,
    cycles: usize,
    wall_s: f64,
    samples: Vec<Sample>,
    traffic: Vec<Traffic>,
    failures: Vec<String>,
}

/// The hub's resident memory (KiB: all, anonymous, file-backed), open files and threads,
/// from /proc.
fn proc_sample(pid: u32) -> [u64; 5] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    [
        field("VmRSS:"),
        field("RssAnon:"),
        field("RssFile:"),
        fds,
        field("Threads:"),
    ]
}

/// glibc's heap totals of the hub (system bytes, in-use bytes, KiB): gdb makes it call
/// `malloc_stats()`, which writes them to its stderr, where the harness collects them. None
/// unless `SOAK_HEAP_STATS=1`, or when gdb cannot attach.
async fn heap_stats(hub: &Hub) -> Option<(u64, u64)> {
    if std::env::var("SOAK_HEAP_STATS").as_deref() != Ok("1") {
        return None;
    }
    const TOTAL: &str = "Total (incl. mmap):";
    let before = hub.logs().matches(TOTAL).count();
    let status = std::process::Command::new("gdb")
        .args(["-p", &hub.pid().to_string(), "-batch", "-nx"])
        .args(["-ex", "call (void) malloc_stats()"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    if !status.success() {
        return None;
    }
    // The harness reads the hub's stderr on its own thread: wait for the block to land.
    let deadline = Instant::now() + Duration::from_secs(3);
    let logs = loop {
        let logs = hub.logs();
        if logs.matches(TOTAL).count() > before && logs.rsplit(TOTAL).next()?.contains("in use") {
            break logs;
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let block = logs.rsplit(TOTAL).next()?;
    let bytes = |name: &str| -> Option<u64> {
        let line = block.lines().find(|l| l.contains(name))?;
        line.rsplit('=').next()?.trim().parse::<u64>().ok()
    };
    Some((bytes("system bytes")? / 1024, bytes("in use bytes")? / 1024))
}

async fn sample(hub: &Hub, label: &str, started: Instant) -> Sample {
    // /proc first: the metrics request below opens a connection of its own.
    let [rss_kib, rss_anon_kib, rss_file_kib, fds, threads] = proc_sample(hub.pid());
    let heap = heap_stats(hub).await;
    let m = metrics(hub).await;
    Sample {
        label: label.to_string(),
        at_s: started.elapsed().as_secs_f64(),
        rss_kib,
        rss_anon_kib,
        rss_file_kib,
        heap_system_kib: heap.map(|h| h.0),
        heap_in_use_kib: heap.map(|h| h.1),
        fds,
        threads,
        connections: metric_value(&m, "switchboard_connections"),
        registry_sessions: metric_value(&m, "switchboard_registry_sessions"),
        registry_channels: metric_value(&m, "switchboard_registry_channels"),
        handshake_limiter_clients: metric_value(&m, "switchboard_handshake_limiter_clients"),
        conflated: metric_value(&m, "switchboard_conflated_total"),
        slow_consumer_disconnects: metric_value(&m, "switchboard_slow_consumer_disconnects_total"),
    }
}

fn topic(n: usize) -> String {
    format!("t{n}")
}

/// Open a socket as `cookie` and subscribe it to `topic` (from `since` when given); None when
/// the hub refused or did not answer in time (counted, never fatal: a soak keeps going).
async fn open(
    hub: &Hub,
    cookie: &str,
    topic: &str,
    since: Option<&str>,
    recv_buffer: Option<u32>,
    counters: &Counters,
) -> Option<Ws> {
    let mut opts = WsOpts::new(Some(ORIGIN), Some(cookie));
    opts.recv_buffer = recv_buffer;
    let Ok(mut ws) = ws_connect_with(hub, opts).await else {
        bump(&counters.refused);
        return None;
    };
    bump(&counters.connects);
    let mut subscribe = json!({"type": "subscribe", "topic": topic});
    if let Some(since) = since {
        subscribe["since"] = json!(since);
        bump(&counters.resumed);
    }
    ws.send_json(&subscribe).await;
    Some(ws)
}

/// Read what arrives for up to `d`, counting events; the last event id seen is kept in
/// `last`. False when the socket ended.
async fn read_for(
    ws: &mut Ws,
    d: Duration,
    last: &mut Option<String>,
    counters: &Counters,
) -> bool {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        match ws.recv(left).await {
            None => return true,
            Some(Frame::Json(v, _)) => {
                if v["type"] == "event" {
                    bump(&counters.events);
                    *last = v["id"].as_str().map(str::to_string);
                }
            }
            Some(Frame::Close(..) | Frame::Ended(_)) => return false,
            Some(_) => {}
        }
    }
}

/// A small deterministic generator (xorshift), so runs load the hub alike.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

async fn churner(
    hub: Rc<Hub>,
    cookie: String,
    seed: u64,
    load: Load,
    stop: Rc<Cell<bool>>,
    c: Rc<Counters>,
) {
    let mut rng = Rng(seed | 1);
    while !stop.get() {
        let t = topic(rng.below(load.topics as u64) as usize);
        let Some(mut ws) = open(&hub, &cookie, &t, None, None, &c).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let hold = Duration::from_millis(100 + rng.below(700));
        read_for(&mut ws, hold, &mut None, &c).await;
        if rng.below(2) == 0 {
            ws.close().await;
        }
        // Otherwise dropped: the TCP connection ends with no close frame.
    }
}

async fn reconnector(
    hub: Rc<Hub>,
    cookie: String,
    seed: u64,
    load: Load,
    stop: Rc<Cell<bool>>,
    c: Rc<Counters>,
) {
    let mut rng = Rng(seed | 1);
    let t = topic(rng.below(load.topics as u64) as usize);
    let mut last: Option<String> = None;
    while !stop.get() {
        let Some(mut ws) = open(&hub, &cookie, &t, last.as_deref(), None, &c).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let hold = Duration::from_millis(1000 + rng.below(2000));
        read_for(&mut ws, hold, &mut last, &c).await;
        drop(ws);
    }
}

async fn slow_reader(hub: Rc<Hub>, cookie: String, stop: Rc<Cell<bool>>, c: Rc<Counters>) {
    while !stop.get() {
        let Some(mut ws) = open(&hub, &cookie, HOT, None, Some(4096), &c).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // One frame every 500 ms, far slower than the hot topic's bursts: the hub's outbound
        // queue (64 frames here) fills and conflates, or cuts the socket off.
        loop {
            if stop.get() {
                ws.close().await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            match ws.recv(Duration::from_millis(1)).await {
                Some(Frame::Close(..) | Frame::Ended(_)) => {
                    bump(&c.cut_off);
                    break;
                }
                Some(Frame::Json(v, _)) if v["type"] == "event" => bump(&c.events),
                _ => {}
            }
        }
    }
}

async fn publisher(hub: Rc<Hub>, load: Load, stop: Rc<Cell<bool>>, c: Rc<Counters>) {
    let client = client();
    let mut rng = Rng(0x5eed);
    let pad = "x".repeat(300);
    // Big enough that the slow readers' socket buffers fill within seconds.
    let hot_pad = "h".repeat(4000);
    let every = Duration::from_secs(1) / load.publish_per_s.max(1);
    let mut ticker = tokio::time::interval(every);
    let mut last_burst = Instant::now();
    let mut n = 0u64;
    while !stop.get() {
        ticker.tick().await;
        n += 1;
        let t = topic(rng.below(load.topics as u64) as usize);
        let burst = last_burst.elapsed() >= Duration::from_secs(1);
        let targets: Vec<(String, u32)> = if burst {
            last_burst = Instant::now();
            vec![(t, 1), (HOT.to_string(), load.burst)]
        } else {
            vec![(t, 1)]
        };
        for (t, count) in targets {
            for _ in 0..count {
                let pad = if t == HOT { &hot_pad } else { &pad };
                let data = json!({"n": n, "pad": pad});
                let (status, _) = publish_with(&client, &hub, ORG, &t, "call.status", data).await;
                if status == 202 {
                    bump(&c.published);
                } else {
                    bump(&c.publish_refused);
                }
            }
        }
    }
}

/// One cycle: open the steady sockets, run every kind of client for `cycle_s`, then close
/// everything and wait until the hub has let every socket go.
async fn cycle(
    hub: &Rc<Hub>,
    load: &Load,
    cookies: &Cookies,
    seed: u64,
    c: &Rc<Counters>,
) -> Result<(), String> {
    let stop = Rc::new(Cell::new(false));
    let mut steady = Vec::with_capacity(load.steady);
    for chunk in (0..load.steady).collect::<Vec<_>>().chunks(64) {
        let opened = futures_util::future::join_all(chunk.iter().map(|&i| {
            let cookie = &cookies.steady[i / 4];
            let t = topic(i % load.topics);
            let c = c.clone();
            async move { open(hub, cookie, &t, None, None, &c).await }
        }))
        .await;
        steady.extend(opened.into_iter().flatten());
    }
    let mut tasks = Vec::new();
    for (i, cookie) in cookies.churners.iter().enumerate() {
        tasks.push(actix_web::rt::spawn(churner(
            hub.clone(),
            cookie.clone(),
            seed * 1000 + i as u64,
            load.clone(),
            stop.clone(),
            c.clone(),
        )));
    }
    for (i, cookie) in cookies.reconnectors.iter().enumerate() {
        tasks.push(actix_web::rt::spawn(reconnector(
            hub.clone(),
            cookie.clone(),
            seed * 2000 + i as u64,
            load.clone(),
            stop.clone(),
            c.clone(),
        )));
    }
    for cookie in &cookies.slow {
        tasks.push(actix_web::rt::spawn(slow_reader(
            hub.clone(),
            cookie.clone(),
            stop.clone(),
            c.clone(),
        )));
    }
    tasks.push(actix_web::rt::spawn(publisher(
        hub.clone(),
        load.clone(),
        stop.clone(),
        c.clone(),
    )));
    // The steady sockets read what their topics get for the whole cycle, then half close
    // cleanly and half just vanish.
    let cycle = Duration::from_secs(load.cycle_s);
    for (i, mut ws) in steady.into_iter().enumerate() {
        let c = c.clone();
        tasks.push(actix_web::rt::spawn(async move {
            read_for(&mut ws, cycle, &mut None, &c).await;
            if i % 2 == 0 {
                ws.close().await;
            }
        }));
    }
    tokio::time::sleep(cycle).await;
    stop.set(true);
    for task in tasks {
        let _ = task.await;
    }
    let gone = |v: f64| v == 0.0;
    let (v, ok) = wait_metric(
        hub,
        "switchboard_connections",
        Duration::from_secs(20),
        gone,
    )
    .await;
    if !ok {
        return Err(format!(
            "switchboard_connections still {v} 20 s after every client left"
        ));
    }
    let (v, ok) = wait_metric(
        hub,
        "switchboard_registry_sessions",
        Duration::from_secs(5),
        gone,
    )
    .await;
    if !ok {
        return Err(format!(
            "switchboard_registry_sessions still {v} after the sockets closed"
        ));
    }
    Ok(())
}

struct Cookies {
    steady: Vec<String>,
    churners: Vec<String>,
    reconnectors: Vec<String>,
    slow: Vec<String>,
}

async fn logins(hub: &Hub, prefix: &str, n: usize) -> Vec<String> {
    let mut cookies = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        let batch = futures_util::future::join_all(
            chunk
                .iter()
                .map(|i| async move { dev_login(hub, &format!("{prefix}{i}"), ORG).await }),
        )
        .await;
        cookies.extend(batch);
    }
    cookies
}

/// After the settle, the trim (every 2 s, server/trim.rs) has had its looks at the quiet hub,
/// and the test's own HTTP connections (publishes, metric polls) have outlived the hub's 5 s
/// keep-alive, so the open files counted are the hub's own.
const SETTLE: Duration = Duration::from_secs(6);

/// Raise this process's soft open-files limit to what `sockets` need (the hub, started from
/// here, inherits it); panics naming the fix when the hard limit is too low.
fn raise_open_files_limit(sockets: usize) {
    let need = sockets as u64 + 500;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(got, 0, "getrlimit(RLIMIT_NOFILE) failed");
    if limit.rlim_cur >= need {
        return;
    }
    assert!(
        limit.rlim_max >= need,
        "the soak needs {need} open files but the hard limit is {}: raise it (ulimit -Hn)",
        limit.rlim_max
    );
    limit.rlim_cur = need;
    // SAFETY: as above.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(set, 0, "setrlimit(RLIMIT_NOFILE, {need}) failed");
}

async fn soak(variant: &str, load: Load, cycles: usize, tolerance: Tolerance) {
    let started = Instant::now();
    raise_open_files_limit(load.steady + load.churners * 2 + load.reconnectors + load.slow);
    let hub = Rc::new(Hub::start(&[
        ("SWITCHBOARD__LIMITS__HANDSHAKES_PER_IP_PER_S", "100000"),
        ("SWITCHBOARD__LIMITS__HANDSHAKE_BURST", "100000"),
        // Small, so the slow readers' queues fill within a cycle.
        ("SWITCHBOARD__LIMITS__OUTBOUND_QUEUE", "64"),
        // Small, so every topic's history is full by the end of the warm-up: history is
        // state the hub keeps by design (up to max_len per topic), not a leak to look for.
        ("SWITCHBOARD__HISTORY__MAX_LEN", "10"),
        ("RUST_LOG", "warn,switchboard::server=info"),
    ]));
    let mut samples = vec![sample(&hub, "start-up", started).await];
    let cookies = Cookies {
        steady: logins(&hub, "steady", load.steady.div_ceil(4)).await,
        churners: logins(&hub, "churn", load.churners).await,
        reconnectors: logins(&hub, "resume", load.reconnectors).await,
        slow: logins(&hub, "slow", load.slow).await,
    };
    let counters = Rc::new(Counters::default());
    let mut traffic = Vec::new();
    let mut failures = Vec::new();
    for n in 0..=cycles {
        let label = if n == 0 {
            "warm-up".to_string()
        } else {
            format!("cycle {n}")
        };
        if let Err(e) = cycle(&hub, &load, &cookies, n as u64 + 1, &counters).await {
            failures.push(format!("{label}: {e}"));
            break;
        }
        tokio::time::sleep(SETTLE).await;
        samples.push(sample(&hub, &format!("after {label}"), started).await);
        traffic.push(counters.take());
    }
    failures.extend(judge(&samples, &traffic, &tolerance));
    let report = Report {
        variant: variant.to_string(),
        load,
        tolerance,
        cycles,
        wall_s: started.elapsed().as_secs_f64(),
        samples,
        traffic,
        failures,
    };
    let text = write_report(&report);
    eprintln!("{text}");
    assert!(report.failures.is_empty(), "soak {variant} failed:\n{text}");
}

/// What must hold: every cycle ends with no sockets, sessions or channels, the baseline's
/// open files and threads, and memory within the tolerance; traffic flowed in every cycle.
fn judge(samples: &[Sample], traffic: &[Traffic], tol: &Tolerance) -> Vec<String> {
    let mut failures = Vec::new();
    let Some(base) = samples.get(1) else {
        return vec!["no baseline: the warm-up cycle did not finish".into()];
    };
    let measured = &samples[2..];
    if measured.is_empty() {
        failures.push("no measured cycle finished".into());
    }
    for s in measured {
        for (what, v) in [
            ("switchboard_connections", s.connections),
            ("switchboard_registry_sessions", s.registry_sessions),
            ("switchboard_registry_channels", s.registry_channels),
        ] {
            if v != 0.0 {
                failures.push(format!("{}: {what} = {v}, want 0", s.label));
            }
        }
        if s.fds > base.fds + tol.fds_over_baseline {
            failures.push(format!(
                "{}: {} open files, baseline {} (+{} allowed)",
                s.label, s.fds, base.fds, tol.fds_over_baseline
            ));
        }
        if s.threads != base.threads {
            failures.push(format!(
                "{}: {} threads, baseline {}",
                s.label, s.threads, base.threads
            ));
        }
        if s.rss_kib > base.rss_kib + tol.rss_over_baseline_kib {
            failures.push(format!(
                "{}: RSS {} KiB, baseline {} KiB (+{} allowed)",
                s.label, s.rss_kib, base.rss_kib, tol.rss_over_baseline_kib
            ));
        }
    }
    if let (Some(first), Some(last)) = (measured.first(), measured.last()) {
        if last.rss_kib > first.rss_kib + tol.rss_growth_kib {
            failures.push(format!(
                "RSS grew from {} KiB after {} to {} KiB after {} (+{} allowed)",
                first.rss_kib, first.label, last.rss_kib, last.label, tol.rss_growth_kib
            ));
        }
    }
    for (i, t) in traffic.iter().enumerate() {
        if t.events == 0 || t.published == 0 || t.connects == 0 {
            failures.push(format!("cycle {i}: no traffic flowed: {t:?}"));
        }
    }
    failures
}

/// Write the report as JSON and as a table beside it; returns the table.
fn write_report(report: &Report) -> String {
    let mut text = format!(
        "soak {}: {} measured cycles of {} s after a warm-up, {:.0} s in all\nload: {:?}\ntolerance: {:?}\n\n",
        report.variant, report.cycles, report.load.cycle_s, report.wall_s, report.load, report.tolerance
    );
    let _ = writeln!(
        text,
        "{:<16} {:>7} {:>9} {:>9} {:>9} {:>10} {:>10} {:>5} {:>7} {:>5} {:>8} {:>8} {:>7} {:>9}",
        "sample",
        "at s",
        "RSS KiB",
        "anon",
        "file",
        "heap sys",
        "heap used",
        "fds",
        "threads",
        "conns",
        "sessions",
        "channels",
        "limiter",
        "conflated"
    );
    for s in &report.samples {
        let _ = writeln!(
            text,
            "{:<16} {:>7.1} {:>9} {:>9} {:>9} {:>10} {:>10} {:>5} {:>7} {:>5} {:>8} {:>8} {:>7} {:>9}",
            s.label,
            s.at_s,
            s.rss_kib,
            s.rss_anon_kib,
            s.rss_file_kib,
            s.heap_system_kib.map_or("-".into(), |v| v.to_string()),
            s.heap_in_use_kib.map_or("-".into(), |v| v.to_string()),
            s.fds,
            s.threads,
            s.connections,
            s.registry_sessions,
            s.registry_channels,
            s.handshake_limiter_clients,
            s.conflated
        );
    }
    let _ = writeln!(text, "\ntraffic per cycle (warm-up first):");
    for t in &report.traffic {
        let _ = writeln!(text, "  {t:?}");
    }
    let verdict = if report.failures.is_empty() {
        "PASS".to_string()
    } else {
        format!("FAIL\n  {}", report.failures.join("\n  "))
    };
    let _ = writeln!(text, "\n{verdict}");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let _ = std::fs::create_dir_all(dir);
    let base = dir.join(format!("soak-{}", report.variant));
    if let Ok(json) = serde_json::to_string_pretty(report) {
        let _ = std::fs::write(base.with_extension("json"), json);
    }
    let _ = std::fs::write(base.with_extension("txt"), &text);
    text
}

/// The soak of the default test run: ~1,100 sockets at each cycle's peak (so closing them is
/// a disconnect wave the trim acts on), about 50 s.
#[actix_web::test]
async fn soak_short() {
    let load = Load {
        steady: 900,
        churners: 120,
        reconnectors: 60,
        slow: 20,
        topics: 50,
        publish_per_s: 100,
        burst: 40,
        cycle_s: 6,
    };
    let tolerance = Tolerance {
        rss_over_baseline_kib: 6 * 1024,
        rss_growth_kib: 3 * 1024,
        fds_over_baseline: 0,
    };
    soak("short", load, 2, tolerance).await;
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The long soak (`scripts/soak.sh [MINUTES]`): cycles of a minute for `SOAK_MINUTES`.
#[actix_web::test]
#[ignore = "minutes long: run by scripts/soak.sh"]
async fn soak_long() {
    let minutes = env_number("SOAK_MINUTES", 10).max(2);
    let steady = env_number("SOAK_STEADY", 4000) as usize;
    let load = Load {
        steady,
        churners: 400,
        reconnectors: 200,
        slow: 50,
        topics: 200,
        publish_per_s: 300,
        burst: 100,
        cycle_s: 50,
    };
    let tolerance = Tolerance {
        rss_over_baseline_kib: 8 * 1024,
        rss_growth_kib: 4 * 1024,
        fds_over_baseline: 0,
    };
    soak("long", load, minutes as usize - 1, tolerance).await;
}
