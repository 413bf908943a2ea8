//! The benchmark scenarios, each bounded in time and count: who logs in, which sockets
//! subscribe to which topics, which phases publish at what rate, and when memory and CPU are
//! read. Fanout runs the floor server first at the same size so the hub's CPU per delivery is
//! reported against it, then any peer servers (`--peers`) at the same size and fixed rates.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::client::{self, ConnReport, ConnSpec, Stop, Target};
use crate::floor::FloorChild;
use crate::http::HttpConn;
use crate::procfs::{self, Sample, Window};
use crate::publish::{self, Pacer, PhasePlan, PhaseResult, Publisher, Sink, TopicName};
use crate::report::{
    ChurnResult, ConnectResult, IdleResult, Integrity, Machine, PeerRun, Report, Rss,
};
use crate::stats::{Histogram, Shared};
use crate::{Args, PublishVia, Scenario, FLOOR_PID};

/// How long to wait for every accepted event to arrive after a phase.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

struct Ctx<'a> {
    args: &'a Args,
    server: SocketAddr,
    sources: Vec<IpAddr>,
}

impl Ctx<'_> {
    fn target(&self, server: SocketAddr) -> Arc<Target> {
        Arc::new(Target {
            server,
            ws_url: format!("ws://{server}/ws"),
            origin: self.args.origin.clone(),
            sources: self.sources.clone(),
            handshake_timeout: Duration::from_secs(20),
        })
    }

    fn rss(&self) -> Option<u64> {
        self.args.server_pid.and_then(procfs::rss_kib)
    }

    fn sink(&self) -> Sink {
        match self.args.publish {
            PublishVia::Http => Sink::Http {
                addr: self.server,
                key: self.args.key.clone(),
            },
            PublishVia::Redis => Sink::Redis {
                // unwrap_or_default: main refuses --publish redis without --redis-url.
                url: self.args.redis_url.clone().unwrap_or_default(),
            },
        }
    }
}

pub async fn run(args: &Args, server: SocketAddr, sources: Vec<IpAddr>) -> Result<Report, String> {
    let started = Instant::now();
    let ctx = Ctx {
        args,
        server,
        sources,
    };
    let mut report = Report {
        scenario: format!("{:?}", args.scenario).to_lowercase(),
        label: args.label.clone(),
        url: args.url.clone(),
        publish_via: match args.scenario {
            Scenario::Floor => "floor stdin".into(),
            Scenario::Churn => "-".into(),
            _ => ctx.sink().label().into(),
        },
        server_pid: args.server_pid,
        started_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine: Machine::read(),
        bench_threads: args.threads,
        settings: settings_of(args),
        ..Default::default()
    };
    if args.server_pid.is_none() && args.scenario != Scenario::Floor {
        report
            .warnings
            .push("no --server-pid: server RSS and CPU are not measured".into());
    }
    let need = match args.scenario {
        Scenario::Idle => conns(args, 15_000),
        Scenario::Fanout | Scenario::Floor => conns(args, 5_000),
        Scenario::Dashboards => conns(args, 10_000),
        Scenario::Churn => 2_000,
        Scenario::FloorServer => 0,
    };
    if let Some(soft) = procfs::nofile_soft() {
        if (soft as usize) < need + 200 {
            return Err(format!(
                "open-files limit {soft} is too low for {need} sockets: run `ulimit -n $(ulimit -Hn)` first (scripts/bench.sh does)"
            ));
        }
    }
    match args.scenario {
        Scenario::Idle => idle(&ctx, &mut report).await?,
        Scenario::Fanout => fanout(&ctx, &mut report).await?,
        Scenario::Dashboards => dashboards(&ctx, &mut report).await?,
        Scenario::Churn => churn(&ctx, &mut report).await?,
        Scenario::Floor => {
            let c = conns(args, 5_000);
            let rate = args.rate.unwrap_or(20.0);
            let d = secs(args, 20.0);
            let (phases, connect) = floor_run(&ctx, c, &[rate], d, &mut report.warnings).await?;
            report.floor = phases;
            report.floor_connect = Some(connect);
        }
        Scenario::FloorServer => {}
    }
    for phase in report.phases.iter().chain(report.floor.iter()) {
        warn_saturated(&mut report.warnings, &phase.label, &phase.window);
    }
    if let Some(c) = &report.connect {
        warn_saturated(&mut report.warnings, "connect ramp", &c.window);
    }
    if let Some(c) = &report.churn {
        warn_saturated(&mut report.warnings, "churn", &c.window);
    }
    if let Some(i) = &report.integrity {
        if i.lost > 0 || i.duplicated > 0 {
            report.warnings.push(format!(
                "{} events lost and {} duplicated (must be 0)",
                i.lost, i.duplicated
            ));
        }
    }
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}

fn settings_of(args: &Args) -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        s.insert(k.to_string(), v);
    };
    put("connections", format!("{:?}", args.connections));
    put("rate", format!("{:?}", args.rate));
    put("rates", args.rates.clone());
    put("duration_s", format!("{:?}", args.duration_s));
    put("threads", args.threads.to_string());
    put("floor_threads", args.floor_threads.to_string());
    put("peers", args.peers.clone());
    put("source_ips", args.source_ips.to_string());
    put("per_user", args.per_user.to_string());
    put("connect_concurrency", args.connect_concurrency.to_string());
    put("publishers", args.publishers.to_string());
    put("window", args.window.to_string());
    put("settle_s", args.settle_s.to_string());
    put("hold_ms", args.hold_ms.to_string());
    put("topics", args.topics.to_string());
    put("orgs", args.orgs.to_string());
    put("origin", args.origin.clone());
    put("tag", args.tag.clone().unwrap_or_default());
    s
}

fn warn_saturated(warnings: &mut Vec<String>, what: &str, w: &Window) {
    if let Some(other) = w.other_cpu_pct.filter(|o| *o > 15.0) {
        warnings.push(format!(
            "other processes used {other:.0}% of a core during {what}: the machine was not quiet, figures are noisy"
        ));
    }
    if w.bench_cpu_pct_per_thread > 90.0 {
        warnings.push(format!(
            "bench client saturated during {what}: {:.0}% of each of its runtime threads; the figure may be the bench's limit, not the hub's",
            w.bench_cpu_pct_per_thread
        ));
    }
}

fn conns(args: &Args, default: usize) -> usize {
    args.connections.unwrap_or(default).max(1)
}

fn secs(args: &Args, default: f64) -> Duration {
    Duration::from_secs_f64(args.duration_s.unwrap_or(default).max(0.1))
}

/// Who subscribes to what: topics, and per socket its topic and user.
struct Layout {
    topics: Vec<TopicName>,
    /// Per socket: (topic index, user index).
    sockets: Vec<(u32, usize)>,
    /// Per user: (user id, org).
    users: Vec<(String, String)>,
}

impl Layout {
    /// `c` sockets on `topics`, socket i on topic `topic_of(i)`; users are per org, `per_user`
    /// sockets each.
    fn build(
        c: usize,
        topics: Vec<TopicName>,
        topic_of: impl Fn(usize) -> u32,
        per_user: usize,
        tag: &str,
    ) -> Self {
        let per_user = per_user.max(1);
        let mut per_org_count: BTreeMap<String, usize> = BTreeMap::new();
        let mut user_index: BTreeMap<(String, usize), usize> = BTreeMap::new();
        let mut users = Vec::new();
        let mut sockets = Vec::with_capacity(c);
        for i in 0..c {
            let t = topic_of(i);
            let org = topics[t as usize].org.to_string();
            let n = per_org_count.entry(org.clone()).or_default();
            let k = *n / per_user;
            *n += 1;
            let u = *user_index.entry((org.clone(), k)).or_insert_with(|| {
                users.push((format!("bench-{tag}-{org}-{k}"), org.clone()));
                users.len() - 1
            });
            sockets.push((t, u));
        }
        Self {
            topics,
            sockets,
            users,
        }
    }

    fn specs(&self, cookies: &[Arc<str>]) -> Vec<ConnSpec> {
        self.sockets
            .iter()
            .enumerate()
            .map(|(i, &(t, u))| ConnSpec {
                index: i,
                topic: t,
                topic_name: self.topics[t as usize].topic.clone(),
                cookie: cookies.get(u).cloned(),
            })
            .collect()
    }
}

fn topic(org: &str, name: &str) -> TopicName {
    TopicName {
        org: org.into(),
        topic: name.into(),
    }
}

/// Dev-login every user; returns each one's `name=value` cookie, in order.
async fn login(server: SocketAddr, users: &[(String, String)]) -> Result<Vec<Arc<str>>, String> {
    let parallel = 8.min(users.len().max(1));
    let users = Arc::new(users.to_vec());
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let users = users.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = HttpConn::new(server);
            let mut got = Vec::new();
            loop {
                let i = next.fetch_add(1, Relaxed) as usize;
                let Some((user, org)) = users.get(i) else {
                    break;
                };
                let body = format!(r#"{{"user":"{user}","org":"{org}"}}"#);
                let resp = conn
                    .request(
                        "POST",
                        "/auth/dev-login",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    )
                    .await
                    .map_err(|e| format!("dev-login: {e}"))?;
                if !(200..300).contains(&resp.status) {
                    return Err(format!(
                        "dev-login of {user}: HTTP {} {} (is auth.dev_login on?)",
                        resp.status,
                        resp.body_text()
                    ));
                }
                let cookie = resp
                    .headers
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
                    .map(|(_, v)| v.split(';').next().unwrap_or_default().to_string())
                    .next()
                    .ok_or_else(|| format!("dev-login of {user}: no Set-Cookie"))?;
                got.push((i, Arc::<str>::from(cookie)));
            }
            Ok::<_, String>(got)
        }));
    }
    let mut cookies: Vec<Option<Arc<str>>> = vec![None; users.len()];
    for t in tasks {
        for (i, c) in t.await.map_err(|e| format!("login task: {e}"))?? {
            cookies[i] = Some(c);
        }
    }
    cookies
        .into_iter()
        .map(|c| c.ok_or_else(|| "a login is missing".to_string()))
        .collect()
}

/// Open every socket, `concurrency` handshakes at a time; each stays in its receive loop
/// (returned handle) until `stop` says otherwise.
async fn open(
    specs: Vec<ConnSpec>,
    target: Arc<Target>,
    shared: Arc<Shared>,
    stop: watch::Receiver<Stop>,
    concurrency: usize,
    server_pid: Option<u32>,
    threads: usize,
) -> (Vec<JoinHandle<ConnReport>>, ConnectResult) {
    let attempted = specs.len();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<Duration, String>>();
    let latency = Arc::new(Histogram::default());
    let a = Sample::take(server_pid, 0);
    let mut handles = Vec::with_capacity(attempted);
    for spec in specs {
        // unwrap: the semaphore is never closed.
        let permit = sem.clone().acquire_owned().await.unwrap();
        let target = target.clone();
        let shared = shared.clone();
        let stop = stop.clone();
        let done = done_tx.clone();
        let latency = latency.clone();
        handles.push(tokio::spawn(async move {
            let result = client::connect(&spec, &target).await;
            drop(permit);
            match result {
                Ok((ws, took)) => {
                    latency.record_us(took.as_micros() as u64);
                    shared.subscribers[spec.topic as usize].fetch_add(1, Relaxed);
                    let _ = done.send(Ok(took));
                    client::receive(ws, spec, shared, stop).await
                }
                Err(e) => {
                    let _ = done.send(Err(e.label()));
                    ConnReport::default()
                }
            }
        }));
    }
    drop(done_tx);
    let mut connected = 0;
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_at = Instant::now();
    for _ in 0..attempted {
        match done_rx.recv().await {
            Some(Ok(_)) => connected += 1,
            Some(Err(label)) => *failed.entry(label).or_default() += 1,
            None => break,
        }
        last_at = Instant::now();
    }
    let b = Sample {
        at: last_at,
        ..Sample::take(server_pid, 0)
    };
    let window = Window::between(&a, &b, threads);
    let result = ConnectResult {
        attempted,
        connected,
        failed,
        seconds: window.seconds,
        handshakes_per_s: connected as f64 / window.seconds,
        concurrency,
        handshake_latency: latency.summary(),
        server_us_per_connection: window
            .server_cpu_s
            .filter(|_| connected > 0)
            .map(|c| c * 1e6 / connected as f64),
        window,
    };
    (handles, result)
}

/// Tell every socket to stop and collect what each saw.
async fn close_all(
    stop: &watch::Sender<Stop>,
    how: Stop,
    handles: Vec<JoinHandle<ConnReport>>,
) -> Vec<ConnReport> {
    let _ = stop.send(how);
    let mut out = Vec::with_capacity(handles.len());
    let deadline = Instant::now() + Duration::from_secs(20);
    for h in handles {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, h).await {
            Ok(Ok(r)) => out.push(r),
            Ok(Err(_)) => out.push(ConnReport::default()),
            Err(_) => break,
        }
    }
    out
}

fn integrity(
    shared: &Shared,
    reports: &[ConnReport],
    drained: bool,
    publisher: &Publisher,
) -> Integrity {
    let mut lost = 0;
    let mut duplicated = 0;
    let mut unchecked = 0;
    let mut closed = 0;
    for r in reports.iter().filter(|r| r.connected) {
        duplicated += r.duplicates;
        unchecked += r.unchecked;
        if r.closed_early {
            closed += 1;
            continue;
        }
        let published = shared.published[r.topic as usize].load(Relaxed);
        lost += published.saturating_sub(r.distinct);
    }
    Integrity {
        events_accepted: shared.total_published(),
        expected_deliveries: shared.expected_deliveries(),
        delivered: shared.delivered(),
        lost,
        duplicated,
        unchecked,
        drained,
        sockets_closed_by_server: closed,
        unexpected_closes: shared
            .unexpected_closes
            .lock()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        error_frames: shared.error_frames.load(Relaxed),
        parse_errors: shared.parse_errors.load(Relaxed),
        publish_errors: publisher.error_samples.lock().clone(),
    }
}

/// The hub's own counters (`switchboard_*`, histograms left out).
async fn hub_metrics(server: SocketAddr) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut conn = HttpConn::new(server);
    let Ok(resp) = conn.request("GET", "/metrics", &[], b"").await else {
        return out;
    };
    for line in resp.body_text().lines() {
        if !line.starts_with("switchboard_") || line.contains("_bucket") {
            continue;
        }
        if let Some((name, value)) = line.rsplit_once(' ') {
            if name.contains("delivery_seconds") {
                continue;
            }
            if let Ok(v) = value.parse::<f64>() {
                out.insert(name.trim_start_matches("switchboard_").to_string(), v);
            }
        }
    }
    out
}

fn per_conn(rss: Option<u64>, baseline: Option<u64>, n: usize) -> Option<f64> {
    match (rss, baseline) {
        (Some(r), Some(b)) if n > 0 => Some((r as f64 - b as f64) / n as f64),
        _ => None,
    }
}

/// Finish a phase's figures once its events have drained.
fn finalize(mut r: PhaseResult, shared: &Shared, ph: usize) -> PhaseResult {
    r.deliveries = shared.phase_delivered(ph);
    r.latency = shared.phase_latency(ph);
    r
}

fn warmup(d: Duration) -> Duration {
    (d / 4).min(Duration::from_secs(2))
}

/// Publishing phases at the given rates (None: as fast as it goes).
fn plans(rates: &[Option<f64>], duration: Duration, window: usize, prefix: &str) -> Vec<PhasePlan> {
    rates
        .iter()
        .enumerate()
        .map(|(i, r)| PhasePlan {
            ph: i,
            label: match r {
                Some(r) => format!("{prefix}{r}/s"),
                None => format!("{prefix}max"),
            },
            rate: *r,
            duration,
            warmup: warmup(duration),
            window,
        })
        .collect()
}

/// What a traffic run returns besides what it writes into the report.
struct Traffic {
    /// Extra wait (idle hold) between connecting and publishing.
    hold: Option<Duration>,
}

/// Log in, connect, (hold,) publish the phases, drain, settle, measure, close.
async fn traffic(
    ctx: &Ctx<'_>,
    layout: Layout,
    phases: Vec<PhasePlan>,
    opts: Traffic,
    report: &mut Report,
) -> Result<(), String> {
    let args = ctx.args;
    let cookies = login(ctx.server, &layout.users).await?;
    let shared = Arc::new(Shared::new(args.max_events as usize, layout.topics.len()));
    let baseline = ctx.rss();
    let (stop_tx, stop_rx) = watch::channel(Stop::Running);
    let (handles, connect) = open(
        layout.specs(&cookies),
        ctx.target(ctx.server),
        shared.clone(),
        stop_rx,
        args.connect_concurrency,
        args.server_pid,
        args.threads,
    )
    .await;
    let connected = connect.connected;
    report.connect = Some(connect);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fresh = ctx.rss();

    if let Some(hold) = opts.hold {
        let a = Sample::take(args.server_pid, 0);
        let pings_before = shared.pings.load(Relaxed);
        tokio::time::sleep(hold).await;
        let b = Sample::take(args.server_pid, 0);
        let window = Window::between(&a, &b, args.threads);
        report.idle = Some(IdleResult {
            hold_s: window.seconds,
            held_at_end: shared.live.load(Relaxed),
            pings_received: shared.pings.load(Relaxed) - pings_before,
            server_us_per_conn_s: window
                .server_cpu_s
                .filter(|_| connected > 0)
                .map(|c| c * 1e6 / connected as f64 / window.seconds),
            window,
        });
    }

    let topics = Arc::new(layout.topics);
    let publisher =
        Publisher::start(ctx.sink(), args.publishers, topics.clone(), shared.clone()).await?;
    let mut pacer = Pacer::new(topics.len(), args.max_events);
    let mut drained = true;
    for plan in &phases {
        let r = publish::run_phase(
            plan,
            &mut pacer,
            &publisher,
            &shared,
            args.server_pid,
            args.threads,
        )
        .await;
        drained &= publish::drain(&publisher, &shared, DRAIN_LIMIT).await;
        report.phases.push(finalize(r, &shared, plan.ph));
    }
    drained &= publish::drain(&publisher, &shared, DRAIN_LIMIT).await;
    let settle = Duration::from_secs_f64(args.settle_s.max(0.0));
    tokio::time::sleep(settle).await;
    let after = ctx.rss();
    report.connections_held = shared.live.load(Relaxed);
    report.rss = Some(Rss {
        baseline_kib: baseline,
        fresh_kib: fresh,
        after_traffic_kib: if phases.is_empty() { None } else { after },
        fresh_per_conn_kib: per_conn(fresh, baseline, connected),
        after_traffic_per_conn_kib: if phases.is_empty() {
            None
        } else {
            per_conn(after, baseline, connected)
        },
        settle_s: settle.as_secs_f64(),
    });
    report.hub_metrics = hub_metrics(ctx.server).await;
    let reports = close_all(&stop_tx, Stop::Graceful, handles).await;
    report.integrity = Some(integrity(&shared, &reports, drained, &publisher));
    report.publish_rtt = Some(publisher.rtt.summary());
    publisher.finish().await;
    Ok(())
}

/// What a run against a child server (the floor or a peer) measured.
struct ChildRun {
    phases: Vec<PhaseResult>,
    connect: ConnectResult,
    rss: Rss,
}

/// The minimal fan-out server at `c` sockets, one phase per rate.
async fn floor_run(
    ctx: &Ctx<'_>,
    c: usize,
    rates: &[f64],
    duration: Duration,
    warnings: &mut Vec<String>,
) -> Result<(Vec<PhaseResult>, ConnectResult), String> {
    let floor = FloorChild::spawn(ctx.args.floor_threads)?;
    let run = child_run(ctx, floor, "floor", c, rates, duration, None, warnings).await?;
    Ok((run.phases, run.connect))
}

/// A peer server (bench/peers/peer.mjs `kind`) at `c` sockets, one phase per rate, with its
/// RSS per socket read like the hub's: fresh, and after traffic and `settle`.
async fn peer_run(
    ctx: &Ctx<'_>,
    kind: &str,
    c: usize,
    rates: &[f64],
    duration: Duration,
    warnings: &mut Vec<String>,
) -> Result<PeerRun, String> {
    let peer = FloorChild::spawn_peer(&ctx.args.peer_dir, kind)?;
    let settle = Duration::from_secs_f64(ctx.args.settle_s.max(0.0));
    let run = child_run(ctx, peer, kind, c, rates, duration, Some(settle), warnings).await?;
    Ok(PeerRun {
        label: kind.to_string(),
        connect: run.connect,
        rss: run.rss,
        phases: run.phases,
    })
}

/// Connect `c` sockets to a child server (floor or peer), publish one phase per rate through
/// its stdin, check every delivery, stop it. With `settle`, its RSS is read before the
/// sockets, 1 s after they are all open and after the phases plus `settle`.
#[allow(clippy::too_many_arguments)]
async fn child_run(
    ctx: &Ctx<'_>,
    child: FloorChild,
    name: &str,
    c: usize,
    rates: &[f64],
    duration: Duration,
    settle: Option<Duration>,
    warnings: &mut Vec<String>,
) -> Result<ChildRun, String> {
    let args = ctx.args;
    FLOOR_PID.store(child.pid(), Relaxed);
    let pid = Some(child.pid());
    let layout = Layout::build(c, vec![topic(name, "fan")], |_| 0, args.per_user, name);
    let shared = Arc::new(Shared::new(args.max_events as usize, 1));
    let baseline = settle.and_then(|_| procfs::rss_kib(child.pid()));
    let (stop_tx, stop_rx) = watch::channel(Stop::Running);
    let (handles, connect) = open(
        layout.specs(&[]),
        ctx.target(child.addr),
        shared.clone(),
        stop_rx,
        args.connect_concurrency,
        pid,
        args.threads,
    )
    .await;
    let mut fresh = None;
    if settle.is_some() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        fresh = procfs::rss_kib(child.pid());
    }
    let topics = Arc::new(layout.topics);
    let publisher = Publisher::start(
        Sink::Floor {
            lines: child.lines.clone(),
        },
        1,
        topics.clone(),
        shared.clone(),
    )
    .await?;
    let mut pacer = Pacer::new(1, args.max_events);
    let rates: Vec<Option<f64>> = rates.iter().map(|r| Some(*r)).collect();
    let mut results = Vec::new();
    let mut drained = true;
    for plan in plans(&rates, duration, args.window, &format!("{name}@")) {
        let r = publish::run_phase(&plan, &mut pacer, &publisher, &shared, pid, args.threads).await;
        drained &= publish::drain(&publisher, &shared, DRAIN_LIMIT).await;
        results.push(finalize(r, &shared, plan.ph));
    }
    let mut after = None;
    if let Some(settle) = settle {
        tokio::time::sleep(settle).await;
        after = procfs::rss_kib(child.pid());
    }
    let reports = close_all(&stop_tx, Stop::Abrupt, handles).await;
    let check = integrity(&shared, &reports, drained, &publisher);
    publisher.finish().await;
    child.stop();
    FLOOR_PID.store(0, Relaxed);
    if check.lost > 0 || check.duplicated > 0 || !drained {
        warnings.push(format!(
            "{name} run: lost {}, duplicated {}, drained {}",
            check.lost, check.duplicated, drained
        ));
    }
    let rss = Rss {
        baseline_kib: baseline,
        fresh_kib: fresh,
        after_traffic_kib: after,
        fresh_per_conn_kib: per_conn(fresh, baseline, connect.connected),
        after_traffic_per_conn_kib: per_conn(after, baseline, connect.connected),
        settle_s: settle.map_or(0.0, |s| s.as_secs_f64()),
    };
    Ok(ChildRun {
        phases: results,
        connect,
        rss,
    })
}

/// The idle topic and user tag: `idle`, or `idle-<tag>` for one of several bench processes
/// against one cluster (each must see only its own events and its own users).
fn idle_names(tag: Option<&str>) -> (String, String) {
    match tag.filter(|t| !t.is_empty()) {
        Some(t) => (format!("idle-{t}"), format!("idle-{t}")),
        None => ("idle".into(), "idle".into()),
    }
}

async fn idle(ctx: &Ctx<'_>, report: &mut Report) -> Result<(), String> {
    let args = ctx.args;
    let c = conns(args, 15_000);
    let (name, user_tag) = idle_names(args.tag.as_deref());
    let layout = Layout::build(c, vec![topic("b0", &name)], |_| 0, args.per_user, &user_tag);
    let rate = args.rate.unwrap_or(10.0);
    let burst = PhasePlan {
        ph: 0,
        label: format!("burst {rate}/s"),
        rate: Some(rate),
        duration: Duration::from_secs(2),
        warmup: Duration::ZERO,
        window: args.window,
    };
    traffic(
        ctx,
        layout,
        vec![burst],
        Traffic {
            hold: Some(secs(args, 60.0)),
        },
        report,
    )
    .await
}

fn parse_rates(list: &str) -> Result<Vec<Option<f64>>, String> {
    list.split(',')
        .map(|r| r.trim())
        .filter(|r| !r.is_empty())
        .map(|r| {
            if r.eq_ignore_ascii_case("max") {
                Ok(None)
            } else {
                r.parse::<f64>()
                    .ok()
                    .filter(|v| *v > 0.0)
                    .map(Some)
                    .ok_or_else(|| format!("--rates: {r:?} is neither a positive number nor max"))
            }
        })
        .collect()
}

async fn fanout(ctx: &Ctx<'_>, report: &mut Report) -> Result<(), String> {
    let args = ctx.args;
    let c = conns(args, 5_000);
    let d = secs(args, 20.0);
    let rates = parse_rates(&args.rates)?;
    if rates.is_empty() || rates.len() > crate::stats::MAX_PHASES {
        return Err(format!("--rates: 1 to {} phases", crate::stats::MAX_PHASES));
    }
    let fixed: Vec<f64> = rates.iter().flatten().copied().collect();
    // The floor is one write per delivery: meaningful where the hub cannot coalesce either,
    // i.e. at the lowest rate (at 60/s and up it cannot keep up on two shared cores at all).
    if let (false, Some(lowest)) = (args.no_floor, fixed.iter().copied().reduce(f64::min)) {
        let (floor, connect) = floor_run(ctx, c, &[lowest], d, &mut report.warnings).await?;
        report.floor = floor;
        report.floor_connect = Some(connect);
        // Let the floor's sockets finish closing before the hub is measured.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for kind in args
        .peers
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
    {
        if !fixed.is_empty() {
            let run = peer_run(ctx, kind, c, &fixed, d, &mut report.warnings).await?;
            report.peers.push(run);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let layout = Layout::build(c, vec![topic("b0", "fan")], |_| 0, args.per_user, "fan");
    traffic(
        ctx,
        layout,
        plans(&rates, d, args.window, ""),
        Traffic { hold: None },
        report,
    )
    .await?;
    // Every phase against the per-write floor (below 1: the hub coalesced frames).
    let floor = report
        .floor
        .first()
        .and_then(|f| f.window.server_us_per_delivery);
    for p in report.phases.iter_mut() {
        let f = floor;
        p.floor_us_per_delivery = f;
        p.ratio_to_floor = match (p.window.server_us_per_delivery, f) {
            (Some(h), Some(f)) if f > 0.0 => Some(h / f),
            _ => None,
        };
    }
    Ok(())
}

async fn dashboards(ctx: &Ctx<'_>, report: &mut Report) -> Result<(), String> {
    let args = ctx.args;
    let c = conns(args, 10_000);
    let orgs = args.orgs.max(1);
    let per_org = (args.topics / orgs).max(1);
    let t = per_org * orgs;
    let topics: Vec<TopicName> = (0..t)
        .map(|i| {
            topic(
                &format!("b{}", i / per_org),
                &format!("dash{}", i % per_org),
            )
        })
        .collect();
    let layout = Layout::build(c, topics, |i| (i % t) as u32, args.per_user, "dash");
    let rate = args.rate.unwrap_or(10_000.0);
    traffic(
        ctx,
        layout,
        plans(&[Some(rate)], secs(args, 30.0), args.window, ""),
        Traffic { hold: None },
        report,
    )
    .await
}

/// One churn socket: connect, hold (reading, so pings are answered), close gracefully.
#[allow(clippy::too_many_arguments)]
async fn churn_one(
    spec: ConnSpec,
    target: Arc<Target>,
    hold: Duration,
    _permit: tokio::sync::OwnedSemaphorePermit,
    connected: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
    failed: Arc<parking_lot::Mutex<BTreeMap<String, u64>>>,
    hs_latency: Arc<Histogram>,
    close_latency: Arc<Histogram>,
) {
    match client::connect(&spec, &target).await {
        Ok((mut ws, took)) => {
            connected.fetch_add(1, Relaxed);
            hs_latency.record_us(took.as_micros() as u64);
            let _ =
                tokio::time::timeout(hold, async { while let Some(Ok(_)) = ws.next().await {} })
                    .await;
            let t = Instant::now();
            let ok = tokio::time::timeout(Duration::from_secs(5), async {
                if ws.close(None).await.is_err() {
                    return false;
                }
                while let Some(Ok(_)) = ws.next().await {}
                true
            })
            .await;
            if ok == Ok(true) {
                closed.fetch_add(1, Relaxed);
                close_latency.record_us(t.elapsed().as_micros() as u64);
            } else {
                *failed.lock().entry("close timeout".into()).or_default() += 1;
            }
        }
        Err(e) => *failed.lock().entry(e.label()).or_default() += 1,
    }
}

async fn churn(ctx: &Ctx<'_>, report: &mut Report) -> Result<(), String> {
    let args = ctx.args;
    let rate = args.rate.unwrap_or(1000.0).max(1.0);
    let duration = secs(args, 60.0);
    let hold = Duration::from_millis(args.hold_ms);
    let total = (rate * duration.as_secs_f64()).round() as u64;
    // Each user's sockets are spaced users/rate seconds apart, so at most ~2 overlap.
    let users_n = ((rate * (hold.as_secs_f64() + 1.0) / 2.0).ceil() as usize).max(1);
    let users: Vec<(String, String)> = (0..users_n)
        .map(|u| (format!("bench-churn-{u}"), "b0".to_string()))
        .collect();
    let cookies = login(ctx.server, &users).await?;
    let target = ctx.target(ctx.server);
    let shared = Arc::new(Shared::new(1, 1));
    let before = ctx.rss();
    let peak = Arc::new(AtomicU64::new(before.unwrap_or(0)));
    let (sampling_tx, mut sampling_rx) = watch::channel(true);
    let sampler = {
        let peak = peak.clone();
        let pid = args.server_pid;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = sampling_rx.changed() => break,
                }
                if let Some(r) = pid.and_then(procfs::rss_kib) {
                    peak.fetch_max(r, Relaxed);
                }
            }
        })
    };
    // Never more sockets in flight than the open-files budget allows.
    let inflight = ((rate * (hold.as_secs_f64() + 2.0)) as usize).clamp(100, 15_000);
    let sem = Arc::new(Semaphore::new(inflight));
    let connected = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(parking_lot::Mutex::new(BTreeMap::<String, u64>::new()));
    let hs_latency = Arc::new(Histogram::default());
    let close_latency = Arc::new(Histogram::default());
    let settle = Duration::from_secs_f64(args.settle_s.max(0.0));
    // Two halves with a settled RSS reading after each: memory that keeps growing in the
    // second half is a leak; memory kept once but not grown is the allocator's retention.
    let mut rss_half = None;
    let mut halves: Vec<Window> = Vec::new();
    let mut spawn_s = 0.0;
    for (h, range) in [0..total / 2, total / 2..total].into_iter().enumerate() {
        let a = Sample::take(args.server_pid, 0);
        let half_start = Instant::now();
        let first = range.start;
        let mut handles = Vec::with_capacity(range.clone().count());
        for i in range {
            let at = half_start + Duration::from_secs_f64((i - first) as f64 / rate);
            tokio::time::sleep_until(at.into()).await;
            // unwrap: the semaphore is never closed.
            let permit = sem.clone().acquire_owned().await.unwrap();
            let spec = ConnSpec {
                index: i as usize,
                topic: 0,
                topic_name: "churn".into(),
                cookie: Some(cookies[i as usize % users_n].clone()),
            };
            handles.push(tokio::spawn(churn_one(
                spec,
                target.clone(),
                hold,
                permit,
                connected.clone(),
                closed.clone(),
                failed.clone(),
                hs_latency.clone(),
                close_latency.clone(),
            )));
        }
        spawn_s += half_start.elapsed().as_secs_f64();
        let deadline = Instant::now() + hold + Duration::from_secs(30);
        for handle in handles {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, handle).await.is_err() {
                report
                    .warnings
                    .push("churn: sockets still open at the deadline".into());
                break;
            }
        }
        let b = Sample::take(args.server_pid, 0);
        halves.push(Window::between(&a, &b, args.threads));
        if h == 0 {
            tokio::time::sleep(settle).await;
            rss_half = ctx.rss();
        }
    }
    // Both halves together, without the settle pause between them.
    let seconds: f64 = halves.iter().map(|w| w.seconds).sum();
    let server_cpu_s: Option<f64> = halves.iter().map(|w| w.server_cpu_s).sum();
    let bench_cpu_s: f64 = halves.iter().map(|w| w.bench_cpu_s).sum();
    let window = Window {
        seconds,
        server_cpu_s,
        server_cpu_pct: server_cpu_s.map(|c| c / seconds.max(1e-9) * 100.0),
        bench_cpu_s,
        bench_cpu_pct_per_thread: bench_cpu_s / seconds.max(1e-9) / args.threads.max(1) as f64
            * 100.0,
        other_cpu_pct: halves
            .iter()
            .map(|w| w.other_cpu_pct.map(|o| o * w.seconds))
            .sum::<Option<f64>>()
            .map(|o| o / seconds.max(1e-9)),
        redis_cpu_pct: halves
            .iter()
            .map(|w| w.redis_cpu_pct.map(|r| r * w.seconds))
            .sum::<Option<f64>>()
            .map(|r| r / seconds.max(1e-9)),
        server_threads: halves
            .last()
            .map(|w| w.server_threads.clone())
            .unwrap_or_default(),
        ..Window::default()
    };
    let spawned_s = spawn_s;
    tokio::time::sleep(settle).await;
    let _ = sampling_tx.send(false);
    let _ = sampler.await;
    let after = ctx.rss();
    let connected = connected.load(Relaxed);
    report.churn = Some(ChurnResult {
        target_per_s: rate,
        hold_ms: args.hold_ms,
        attempted: total,
        connected,
        failed: failed.lock().clone(),
        closed: closed.load(Relaxed),
        connects_per_s: connected as f64 / spawned_s.max(1e-9),
        handshake_latency: hs_latency.summary(),
        close_latency: close_latency.summary(),
        rss_before_kib: before,
        rss_peak_kib: before.map(|_| peak.load(Relaxed)),
        rss_after_kib: after,
        rss_after_half_kib: rss_half,
        rss_delta_kib: match (before, after) {
            (Some(b), Some(a)) => Some(a as i64 - b as i64),
            _ => None,
        },
        server_us_per_cycle: window
            .server_cpu_s
            .filter(|_| connected > 0)
            .map(|c| c * 1e6 / connected as f64),
        window,
    });
    report.connections_held = shared.live.load(Relaxed);
    report.hub_metrics = hub_metrics(ctx.server).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tagged idle runs get their own topic and users; untagged ones keep the old names.
    #[test]
    fn idle_names_keep_tagged_runs_apart() {
        assert_eq!(idle_names(None), ("idle".into(), "idle".into()));
        assert_eq!(idle_names(Some("")), ("idle".into(), "idle".into()));
        let (t1, u1) = idle_names(Some("c1"));
        let (t2, u2) = idle_names(Some("c2"));
        assert_eq!(t1, "idle-c1");
        assert_ne!(t1, t2);
        assert_ne!(u1, u2);
        let a = Layout::build(8, vec![topic("b0", &t1)], |_| 0, 4, &u1);
        let b = Layout::build(8, vec![topic("b0", &t2)], |_| 0, 4, &u2);
        assert!(a.users.iter().all(|u| !b.users.contains(u)));
    }
}
