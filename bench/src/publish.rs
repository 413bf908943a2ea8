//! Publishing events and pacing them. A [`Publisher`] is a small pool of workers that take
//! jobs from one bounded queue and hand each event to the hub through `POST /api/publish`
//! (one keep-alive connection per worker), straight to Redis (`PUBLISH sb:{org}:{topic}`), or
//! to the floor server's stdin. Each event's `data` carries its per-topic sequence number,
//! its global index, its phase and its send time in wall-clock ns, stamped by the worker just
//! before it is written. [`run_phase`] paces one phase: a fixed rate, or "as fast as it goes"
//! with a bounded window of events not yet received by every subscriber.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

use crate::http::HttpConn;
use crate::procfs::{Sample, Window};
use crate::stats::{now_ns, Histogram, LatencySummary, Shared};

/// Where events go.
#[derive(Clone)]
pub enum Sink {
    /// `POST /api/publish` with this bearer key.
    Http { addr: SocketAddr, key: String },
    /// `PUBLISH` on this Redis.
    Redis { url: String },
    /// Lines to the floor server's stdin.
    Floor {
        lines: std::sync::mpsc::Sender<String>,
    },
}

impl Sink {
    pub fn label(&self) -> &'static str {
        match self {
            Sink::Http { .. } => "http /api/publish",
            Sink::Redis { .. } => "redis PUBLISH",
            Sink::Floor { .. } => "floor stdin",
        }
    }
}

/// A topic as the hub names it.
pub struct TopicName {
    pub org: Arc<str>,
    pub topic: Arc<str>,
}

/// One event to publish.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub topic: u32,
    pub seq: u64,
    pub g: u64,
    pub ph: u8,
}

pub struct Publisher {
    tx: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    /// Jobs queued or being published.
    pub pending: Arc<AtomicU64>,
    pub errors: Arc<AtomicU64>,
    /// The first few error descriptions.
    pub error_samples: Arc<parking_lot::Mutex<Vec<String>>>,
    /// Publish round trip (request written → 202 read), microseconds.
    pub rtt: Arc<Histogram>,
}

impl Publisher {
    pub async fn start(
        sink: Sink,
        workers: usize,
        topics: Arc<Vec<TopicName>>,
        shared: Arc<Shared>,
    ) -> Result<Self, String> {
        let workers = workers.max(1);
        let (tx, rx) = mpsc::channel::<Job>(workers);
        let rx = Arc::new(Mutex::new(rx));
        let pending = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let error_samples = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let rtt = Arc::new(Histogram::default());
        let redis_client = match &sink {
            Sink::Redis { url } => {
                Some(redis::Client::open(url.as_str()).map_err(|e| format!("redis url: {e}"))?)
            }
            _ => None,
        };
        let mut handles = Vec::new();
        for _ in 0..workers {
            let mut out = match &sink {
                Sink::Http { addr, key } => Out::Http {
                    conn: HttpConn::new(*addr),
                    auth: format!("Bearer {key}"),
                },
                Sink::Redis { .. } => {
                    // unwrap: redis_client is Some exactly for Sink::Redis.
                    let client = redis_client.as_ref().unwrap();
                    let conn = client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(|e| format!("redis connect: {e}"))?;
                    Out::Redis { conn }
                }
                Sink::Floor { lines } => Out::Floor {
                    lines: lines.clone(),
                },
            };
            let rx = rx.clone();
            let topics = topics.clone();
            let shared = shared.clone();
            let pending = pending.clone();
            let errors = errors.clone();
            let error_samples = error_samples.clone();
            let rtt = rtt.clone();
            handles.push(tokio::spawn(async move {
                loop {
                    let job = { rx.lock().await.recv().await };
                    let Some(job) = job else { break };
                    let started = Instant::now();
                    let result = out.publish(&topics[job.topic as usize], job).await;
                    rtt.record_us(started.elapsed().as_micros() as u64);
                    match result {
                        Ok(()) => {
                            shared.published[job.topic as usize].fetch_add(1, Relaxed);
                        }
                        Err(e) => {
                            errors.fetch_add(1, Relaxed);
                            if let Some(f) = shared.failed.get(job.g as usize) {
                                f.store(true, Relaxed);
                            }
                            let mut samples = error_samples.lock();
                            if samples.len() < 5 {
                                samples.push(e);
                            }
                        }
                    }
                    pending.fetch_sub(1, Relaxed);
                }
            }));
        }
        Ok(Self {
            tx: Some(tx),
            workers: handles,
            pending,
            errors,
            error_samples,
            rtt,
        })
    }

    /// Queue one event; waits while every worker is busy and the queue is full.
    pub async fn send(&self, job: Job) -> bool {
        let Some(tx) = &self.tx else { return false };
        self.pending.fetch_add(1, Relaxed);
        if tx.send(job).await.is_err() {
            self.pending.fetch_sub(1, Relaxed);
            return false;
        }
        true
    }

    /// Let the workers finish what is queued, then stop them.
    pub async fn finish(mut self) {
        self.tx = None;
        for h in self.workers.drain(..) {
            let _ = h.await;
        }
    }
}

enum Out {
    Http {
        conn: HttpConn,
        auth: String,
    },
    Redis {
        conn: redis::aio::MultiplexedConnection,
    },
    Floor {
        lines: std::sync::mpsc::Sender<String>,
    },
}

fn data_json(job: Job, t: u64) -> String {
    format!(
        r#"{{"seq":{},"g":{},"ph":{},"t":{}}}"#,
        job.seq, job.g, job.ph, t
    )
}

impl Out {
    async fn publish(&mut self, topic: &TopicName, job: Job) -> Result<(), String> {
        match self {
            Out::Http { conn, auth } => {
                let body = format!(
                    r#"{{"org":"{}","topic":"{}","event":"bench","data":{}}}"#,
                    topic.org,
                    topic.topic,
                    data_json(job, now_ns())
                );
                let resp = conn
                    .request(
                        "POST",
                        "/api/publish",
                        &[
                            ("Authorization", auth),
                            ("Content-Type", "application/json"),
                        ],
                        body.as_bytes(),
                    )
                    .await
                    .map_err(|e| format!("publish: {e}"))?;
                if resp.status == 202 {
                    Ok(())
                } else {
                    Err(format!(
                        "publish: HTTP {} {}",
                        resp.status,
                        resp.body_text()
                    ))
                }
            }
            Out::Redis { conn } => {
                let channel = format!("sb:{}:{}", topic.org, topic.topic);
                let message = format!(r#"{{"event":"bench","data":{}}}"#, data_json(job, now_ns()));
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async::<i64>(conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("redis publish: {e}"))
            }
            Out::Floor { lines } => lines
                .send(format!(
                    "{} {} {} {} {}",
                    job.topic,
                    job.seq,
                    job.g,
                    job.ph,
                    now_ns()
                ))
                .map_err(|_| "floor server gone".to_string()),
        }
    }
}

/// One phase of publishing.
#[derive(Debug, Clone)]
pub struct PhasePlan {
    /// Index carried in `data.ph` (selects the latency histogram).
    pub ph: usize,
    pub label: String,
    /// Events per second over all topics; None: as fast as it goes.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Measurement starts this long after the phase does.
    pub warmup: Duration,
    /// "As fast as it goes": most events published but not yet received by every subscriber.
    pub window: usize,
}

/// Sequence numbers and global indexes, carried across phases.
pub struct Pacer {
    pub next_g: u64,
    pub topic_seq: Vec<u64>,
    pub next_topic: usize,
    /// Events the receipt table can hold (the count bound of a run).
    pub max_events: u64,
}

impl Pacer {
    pub fn new(topics: usize, max_events: u64) -> Self {
        Self {
            next_g: 0,
            topic_seq: vec![0; topics],
            next_topic: 0,
            max_events,
        }
    }

    fn next_job(&mut self, ph: usize) -> Job {
        let topic = self.next_topic;
        self.next_topic = (self.next_topic + 1) % self.topic_seq.len();
        let seq = self.topic_seq[topic];
        self.topic_seq[topic] += 1;
        let g = self.next_g;
        self.next_g += 1;
        Job {
            topic: topic as u32,
            seq,
            g,
            ph: ph as u8,
        }
    }

    fn exhausted(&self) -> bool {
        self.next_g >= self.max_events
    }
}

/// What one phase measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseResult {
    pub label: String,
    /// Target events/s (None: as fast as it goes).
    pub target_events_per_s: Option<f64>,
    pub events_sent: u64,
    pub events_per_s: f64,
    pub publish_errors: u64,
    /// Deliveries of this phase's events (all of them, not only in the window).
    pub deliveries: u64,
    pub latency: LatencySummary,
    /// Figures over the measurement window (after the warm-up).
    pub window: Window,
    /// "As fast as it goes": events given up on after 5 s without reaching every subscriber.
    pub stalls: u64,
    /// The run's event-count bound ended the phase early.
    pub hit_event_bound: bool,
    /// Ratio of this phase's server µs per delivery to the floor's at the same rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_floor: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_us_per_delivery: Option<f64>,
}

/// Publish one phase and measure it (deliveries, server and bench CPU over the window).
pub async fn run_phase(
    plan: &PhasePlan,
    pacer: &mut Pacer,
    publisher: &Publisher,
    shared: &Shared,
    server_pid: Option<u32>,
    bench_threads: usize,
) -> PhaseResult {
    let start = Instant::now();
    let end = start + plan.duration;
    let warm = start + plan.warmup.min(plan.duration / 2);
    let errors_before = publisher.errors.load(Relaxed);
    let mut a: Option<Sample> = None;
    let mut sent = 0u64;
    let mut stalls = 0u64;
    let mut hit_bound = false;
    let take = || Sample::take(server_pid, shared.delivered());
    match plan.rate {
        Some(rate) => loop {
            let now = Instant::now();
            if a.is_none() && now >= warm {
                a = Some(take());
            }
            if now >= end {
                break;
            }
            let due = ((now - start).as_secs_f64() * rate).floor() as u64 + 1;
            while sent < due {
                if pacer.exhausted() {
                    hit_bound = true;
                    break;
                }
                if !publisher.send(pacer.next_job(plan.ph)).await {
                    break;
                }
                sent += 1;
            }
            if hit_bound {
                break;
            }
            let next_at = start + Duration::from_secs_f64(sent as f64 / rate);
            let mut wake = next_at.min(end);
            if a.is_none() {
                wake = wake.min(warm);
            }
            tokio::time::sleep_until(wake.into()).await;
        },
        None => {
            let mut inflight: VecDeque<(u64, u32, Instant)> = VecDeque::new();
            loop {
                let now = Instant::now();
                if a.is_none() && now >= warm {
                    a = Some(take());
                }
                if now >= end {
                    break;
                }
                while let Some(&(g, topic, at)) = inflight.front() {
                    let received = shared.receipts[g as usize].load(Relaxed);
                    let wanted = shared.subscribers[topic as usize].load(Relaxed);
                    if received >= wanted || shared.failed[g as usize].load(Relaxed) {
                        inflight.pop_front();
                    } else if now.duration_since(at) > Duration::from_secs(5) {
                        stalls += 1;
                        inflight.pop_front();
                    } else {
                        break;
                    }
                }
                if inflight.len() < plan.window.max(1) {
                    if pacer.exhausted() {
                        hit_bound = true;
                        break;
                    }
                    let job = pacer.next_job(plan.ph);
                    if !publisher.send(job).await {
                        break;
                    }
                    inflight.push_back((job.g, job.topic, Instant::now()));
                    sent += 1;
                    continue;
                }
                tokio::select! {
                    _ = shared.event_complete.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                }
            }
        }
    }
    let b = take();
    let a = a.unwrap_or_else(|| b.clone());
    let elapsed = start.elapsed().as_secs_f64();
    PhaseResult {
        label: plan.label.clone(),
        target_events_per_s: plan.rate,
        events_sent: sent,
        events_per_s: sent as f64 / elapsed.max(1e-9),
        publish_errors: publisher.errors.load(Relaxed) - errors_before,
        deliveries: shared.phase_delivered(plan.ph),
        latency: shared.phase_latency(plan.ph),
        window: Window::between(&a, &b, bench_threads),
        stalls,
        hit_event_bound: hit_bound,
        ratio_to_floor: None,
        floor_us_per_delivery: None,
    }
}

/// Wait until every accepted event has reached every subscriber (or `limit` passes).
/// Returns whether it got there.
pub async fn drain(publisher: &Publisher, shared: &Shared, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        let done = publisher.pending.load(Relaxed) == 0
            && shared.delivered() >= shared.expected_deliveries();
        if done {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
