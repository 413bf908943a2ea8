//! Faults injected into a running cluster under traffic, each checked the way a user would
//! notice a failure: every publish the hub accepted (202, with its event id) must reach every
//! client exactly once and in order, clients resuming with `since` after any reconnect; and
//! `/readyz` must say 503 while a pod cannot serve and 200 once it can again (and then accept
//! publishes). The faults: Redis SIGKILLed and restarted, Redis frozen with SIGSTOP past every
//! timeout, a pod SIGKILLed under 2,000 sockets, a rolling restart of three pods behind nginx
//! (with the reconnect rate on the surviving pods bounded by `shutdown.reconnect_spread_ms`),
//! `nginx -s reload`, and one pod alone cut off from Redis while another accepts publishes.
//!
//! Each test prints one `fault summary:` line (load held, events published, accepted,
//! delivered, lost) for RELIABILITY.md.

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::client::{event_id, first_difference, http_at, open_welcomed, post_json_at, Publisher};
use crate::common::*;
use crate::follow::{follow, FollowLog, Shared};
use crate::infra::{kill, start_pod_on, start_pods, Redis, WedgeProxy};
use crate::on_redis_cluster::{start_cluster_pods, CLUSTER_CHANNEL};
use crate::{wait_ready, wait_redis_unavailable, wait_until, CHANNEL, ORG, TOPIC};

/// Every test here opens its sockets from one address (and nginx forwards them all as
/// 127.0.0.1): the per-IP handshake limit would otherwise refuse most of them.
const OPEN_HANDSHAKES: &[(&str, &str)] = &[
    ("SWITCHBOARD__LIMITS__HANDSHAKES_PER_IP_PER_S", "100000"),
    ("SWITCHBOARD__LIMITS__HANDSHAKE_BURST", "100000"),
];

/// `OPEN_HANDSHAKES` plus `extra`.
fn env_with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = OPEN_HANDSHAKES.to_vec();
    env.extend_from_slice(extra);
    env
}

// ---------------------------------------------------------------------------------------------
// followers and the delivery check
// ---------------------------------------------------------------------------------------------

/// Log `n` users (`{prefix}0`, `{prefix}1`, ...) in through `base` (a pod or nginx), a few
/// at a time; returns their session cookies.
async fn logins(base: &str, prefix: &str, n: usize) -> Vec<String> {
    let url = format!("{base}/auth/dev-login");
    let mut cookies = Vec::with_capacity(n);
    let users: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    for chunk in users.chunks(50) {
        let bodies: Vec<_> = chunk
            .iter()
            .map(|user| json!({"user": user, "org": ORG}))
            .collect();
        let answers =
            futures_util::future::join_all(bodies.iter().map(|body| post_json_at(&url, &[], body)))
                .await;
        for login in answers {
            assert_eq!(login.status, 204, "dev-login through {base}: {login}");
            cookies.push(session_cookie(&login).expect("a session cookie"));
        }
    }
    cookies
}

/// Followers of `TOPIC`, each in its own task.
#[derive(Default)]
struct Fleet {
    shared: Rc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<FollowLog>>,
}

impl Fleet {
    /// Start a follower at `addrs[0]` (moving along `addrs` when a connection fails).
    fn add(&mut self, addrs: Vec<SocketAddr>, cookie: String, deadline: Instant) {
        self.tasks.push(actix_web::rt::spawn(follow(
            addrs,
            cookie,
            TOPIC.to_string(),
            self.shared.clone(),
            deadline,
        )));
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Subscriptions acknowledged so far, first ones and resumed ones together.
    fn subscribed(&self) -> usize {
        self.shared.subscribed.get()
    }

    async fn wait_subscribed(&self, n: usize, timeout: Duration) {
        let shared = self.shared.clone();
        wait_until(&format!("{n} subscriptions acknowledged"), timeout, || {
            shared.subscribed.get() >= n
        })
        .await;
    }

    /// Tell every follower the last published id and collect their logs once they have it.
    async fn finish(self, published: &[String]) -> Vec<FollowLog> {
        *self.shared.last_id.borrow_mut() = published.last().cloned();
        let mut logs = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            logs.push(task.await.expect("follower task"));
        }
        logs
    }
}

/// What a fault cost, for the assertions and for RELIABILITY.md.
#[derive(Debug, Default)]
struct Tally {
    clients: usize,
    /// Publishes attempted, accepted (202) and refused (anything else).
    attempted: usize,
    accepted: usize,
    refused: usize,
    /// Accepted events received, summed over clients, against `accepted * clients`.
    delivered: usize,
    lost: usize,
    /// Events received that no 202 answered (a publish that timed out at the hub but that
    /// Redis carried out later), summed over clients.
    unaccepted: usize,
    drops: usize,
    reconnects: usize,
}

impl Tally {
    fn print(&self, fault: &str, load: &str) {
        eprintln!(
            "fault summary: {fault}: load {load}; publishes {} (accepted {}, refused {}); \
             delivered {} of {} ({} clients); lost {}; delivered without a 202 {}; \
             connections dropped {}, reconnections {}",
            self.attempted,
            self.accepted,
            self.refused,
            self.delivered,
            self.accepted * self.clients,
            self.clients,
            self.lost,
            self.unaccepted,
            self.drops,
            self.reconnects,
        );
    }
}

/// Check that every follower received every accepted event exactly once and in order (events
/// nobody accepted may be interleaved; they are counted); returns the tally.
fn check_delivery(logs: &[FollowLog], publisher: &Publisher, published: &[String]) -> Tally {
    let accepted: HashSet<&str> = published.iter().map(String::as_str).collect();
    let mut tally = Tally {
        clients: logs.len(),
        accepted: published.len(),
        refused: publisher.refused.borrow().len(),
        attempted: published.len() + publisher.refused.borrow().len(),
        ..Tally::default()
    };
    let mut failures = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        tally.drops += log.drops.len();
        tally.reconnects += log.welcomed_at.len().saturating_sub(1);
        let mut seen = HashSet::new();
        let repeated: Vec<&String> = log.ids.iter().filter(|id| !seen.insert(*id)).collect();
        let got: Vec<String> = log
            .ids
            .iter()
            .filter(|id| accepted.contains(id.as_str()))
            .cloned()
            .collect();
        tally.unaccepted += log
            .ids
            .iter()
            .filter(|id| !accepted.contains(id.as_str()))
            .count();
        tally.delivered += seen
            .iter()
            .filter(|id| accepted.contains(id.as_str()))
            .count();
        tally.lost += published.len()
            - seen
                .iter()
                .filter(|id| accepted.contains(id.as_str()))
                .count();
        if !repeated.is_empty() || got != published || !log.unexpected.is_empty() {
            failures.push(format!(
                "follower {i}: repeated {repeated:?}; {}; unexpected {:?}; drops {:?}; bounces {}",
                first_difference(&got, published),
                log.unexpected,
                log.drops,
                log.bounces.len()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} clients did not get every accepted event exactly once in order ({tally:?}):\n{}",
        failures.len(),
        logs.len(),
        failures.join("\n")
    );
    tally
}

/// Every refused publish was answered 503 (the hub saying it could not take the event), not
/// a 5xx of another kind or a dropped connection.
fn assert_refusals_are_503(publisher: &Publisher, fault: &str) {
    let other: Vec<(u16, String)> = publisher
        .refused
        .borrow()
        .iter()
        .filter(|(status, _)| *status != 503)
        .cloned()
        .collect();
    assert!(
        other.is_empty(),
        "{fault}: publishes must be answered 202 or 503, got {other:?}"
    );
}

/// `n` followers spread over `pods`, one user each, subscribed; Redis has one subscriber per pod.
async fn followers_on(redis: &Redis, pods: &[Hub], n: usize, deadline: Instant) -> Fleet {
    let mut fleet = Fleet::default();
    for (i, cookie) in logins(&pods[0].base_url(), "f", n)
        .await
        .into_iter()
        .enumerate()
    {
        fleet.add(vec![pods[i % pods.len()].addr()], cookie, deadline);
    }
    fleet.wait_subscribed(n, T).await;
    redis.wait_numsub(CHANNEL, pods.len() as u64, T).await;
    fleet
}

/// The unexpired cap slots of users `{prefix}0..{prefix}{n-1}` (ZCOUNT from now on).
fn live_cap_slots(redis: &Redis, prefix: &str, n: usize) -> Vec<usize> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("ZCOUNT")
            .arg(format!("sb:caps:{ORG}/{prefix}{i}"))
            .arg(now_ms)
            .arg("+inf");
    }
    pipe.query(&mut redis.conn()).expect("ZCOUNT caps")
}

/// Once every pod says ready again: 30 more publishes, all accepted (a refusal after readiness
/// is a pod saying ready while it cannot serve); then stop publishing and return the ids of
/// every accepted publish.
async fn publish_once_ready_again(pods: &[Hub], publisher: &mut Publisher) -> Vec<String> {
    for pod in pods {
        wait_ready(pod, Duration::from_secs(12)).await;
    }
    let refused_when_ready = publisher.refused.borrow().len();
    let resumed = publisher.count();
    publisher.wait_count(resumed + 30, T).await;
    let published = publisher.stop().await;
    assert_eq!(
        publisher.refused.borrow().len(),
        refused_when_ready,
        "a publish refused after every pod said ready again: {:?}",
        &publisher.refused.borrow()[refused_when_ready..]
    );
    published
}

/// No follower's socket closed or dropped: the fault was invisible to the clients.
fn assert_no_socket_lost(logs: &[FollowLog], fault: &str) {
    for (i, log) in logs.iter().enumerate() {
        assert!(
            log.drops.is_empty() && log.restarts.is_empty() && log.welcomed_at.len() == 1,
            "{fault}: follower {i}'s socket did not stay open: {log:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Redis faults
// ---------------------------------------------------------------------------------------------

/// How often the background publisher publishes in the Redis fault tests.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);

/// Redis SIGKILLed and restarted (empty) while a publisher publishes every 10 ms to 40 sockets on two pods: both pods say 503 on /readyz and answer every publish 503 while it is down, none 202; both are ready again after, accept publishes, and every accepted event reaches every socket once, in order, the sockets never closed.
#[actix_web::test]
async fn redis_killed_under_steady_publishing_loses_no_accepted_event() {
    let mut redis = Redis::start();
    let pods = start_pods(&redis.url(), 2, OPEN_HANDSHAKES);
    let deadline = Instant::now() + Duration::from_secs(40);
    let fleet = followers_on(&redis, &pods, 40, deadline).await;
    let mut publisher = Publisher::start(&pods[0].base_url(), ORG, TOPIC, PUBLISH_EVERY);
    publisher.wait_count(30, T).await;

    redis.kill();
    for pod in &pods {
        wait_redis_unavailable(pod, Duration::from_secs(6), "Redis killed").await;
    }
    let accepted_when_down = publisher.count();
    let refused_when_down = publisher.refused.borrow().len();
    let refused = publisher.refused.clone();
    wait_until("30 publishes answered while Redis is down", T, || {
        refused.borrow().len() >= refused_when_down + 30
    })
    .await;
    assert_eq!(
        publisher.count(),
        accepted_when_down,
        "a publish was accepted (202) while Redis was down"
    );

    redis.restart();
    let published = publish_once_ready_again(&pods, &mut publisher).await;
    assert_refusals_are_503(&publisher, "Redis down");

    let logs = fleet.finish(&published).await;
    assert_no_socket_lost(&logs, "Redis killed");
    let tally = check_delivery(&logs, &publisher, &published);
    assert_eq!(
        tally.unaccepted, 0,
        "an event answered 503 was delivered anyway: {tally:?}"
    );
    tally.print(
        "Redis SIGKILL + restart",
        "40 sockets on 2 pods, one publish per 10 ms",
    );
}

/// On a Redis Cluster, the master owning the topic's slot SIGKILLed while a publisher publishes every 10 ms to 20 sockets on two pods: its replica takes over; meanwhile publishes are answered 202 or 503, never anything else; both pods are ready again after, accept publishes, and every accepted event reaches every socket once, in order, the sockets never closed.
#[actix_web::test]
async fn redis_cluster_master_killed_under_traffic_fails_over_and_loses_no_accepted_event() {
    let mut cluster = RedisCluster::start();
    let pods = start_cluster_pods(&cluster, 2, OPEN_HANDSHAKES);
    let deadline = Instant::now() + Duration::from_secs(50);
    let mut fleet = Fleet::default();
    for (i, cookie) in logins(&pods[0].base_url(), "f", 20)
        .await
        .into_iter()
        .enumerate()
    {
        fleet.add(vec![pods[i % pods.len()].addr()], cookie, deadline);
    }
    fleet.wait_subscribed(20, T).await;
    let mut publisher = Publisher::start(&pods[0].base_url(), ORG, TOPIC, PUBLISH_EVERY);
    publisher.wait_count(30, T).await;

    let dead = cluster.kill_master_of(CLUSTER_CHANNEL);
    cluster.wait_failover(CLUSTER_CHANNEL, dead);
    let published = publish_once_ready_again(&pods, &mut publisher).await;
    assert_refusals_are_503(&publisher, "Redis Cluster failover");

    let logs = fleet.finish(&published).await;
    assert_no_socket_lost(&logs, "Redis Cluster master killed");
    let tally = check_delivery(&logs, &publisher, &published);
    tally.print(
        "Redis Cluster master SIGKILL + failover",
        "20 sockets on 2 pods, one publish per 10 ms",
    );
}

/// Pod B alone loses Redis (a partition between it and Redis) while pod A keeps accepting publishes: B says 503 on /readyz and keeps its sockets open; once B is back and ready, its sockets must still get every event A accepted meanwhile, since nothing tells their clients to resume.
#[actix_web::test]
async fn pod_cut_off_from_redis_still_delivers_what_other_pods_accepted_meanwhile() {
    pod_cut_off_from_redis(20).await;
}

/// The same, with the cut before the topic carried any event: pod B has no last event of the
/// channel to catch up from, and must still deliver what was published while it was away.
#[actix_web::test]
async fn pod_cut_off_before_a_topic_carried_any_event_still_delivers_what_it_missed() {
    pod_cut_off_from_redis(0).await;
}

/// Pod B cut off from Redis after `before` accepted publishes (through pod A), 30 more while
/// it is away, 30 after it is ready again: every socket on both pods gets every one.
async fn pod_cut_off_from_redis(before: usize) {
    let redis = Redis::start();
    let proxy = WedgeProxy::start(redis.port());
    let mut pods = start_pods(&redis.url(), 1, OPEN_HANDSHAKES);
    pods.extend(start_pods(&proxy.url(), 1, OPEN_HANDSHAKES));
    let deadline = Instant::now() + Duration::from_secs(40);
    let fleet = followers_on(&redis, &pods, 20, deadline).await;
    let mut publisher = None;
    if before > 0 {
        let started = Publisher::start(&pods[0].base_url(), ORG, TOPIC, PUBLISH_EVERY);
        started.wait_count(before, T).await;
        publisher = Some(started);
    }

    proxy.cut();
    wait_redis_unavailable(&pods[1], Duration::from_secs(6), "pod B cut off from Redis").await;
    let mut publisher = publisher
        .unwrap_or_else(|| Publisher::start(&pods[0].base_url(), ORG, TOPIC, PUBLISH_EVERY));
    let cut_at = publisher.count();
    publisher.wait_count(cut_at + 30, T).await;
    proxy.restore();
    wait_ready(&pods[1], Duration::from_secs(12)).await;
    let resumed = publisher.count();
    publisher.wait_count(resumed + 30, T).await;
    let published = publisher.stop().await;
    assert!(
        publisher.refused.borrow().is_empty(),
        "pod A refused publishes: {:?}",
        publisher.refused.borrow()
    );

    let logs = fleet.finish(&published).await;
    assert_no_socket_lost(&logs, "pod B cut off from Redis");
    check_delivery(&logs, &publisher, &published).print(
        "one pod cut off from Redis",
        "20 sockets on 2 pods, one publish per 10 ms through the other pod",
    );
}

/// How long the frozen Redis stays frozen: past the Redis command timeout (2 s), the canary's
/// lateness bound (3 s) and the cap lease the test sets (2 s).
const FREEZE: Duration = Duration::from_secs(5);

/// Redis frozen with SIGSTOP for 5 s (past the 2 s command timeout, the 3 s canary bound and a 2 s cap lease) under steady publishing to 40 sockets on two pods: /readyz 503 on both, publishes answered 503 (none 202 while frozen); after SIGCONT both ready again and every accepted event reaches every socket once, in order, the sockets never closed.
#[actix_web::test]
async fn redis_frozen_past_every_timeout_loses_no_accepted_event() {
    let redis = Redis::start();
    // Leases are refreshed with the heartbeat, which must be the shorter.
    let env = env_with(&[
        ("SWITCHBOARD__LIMITS__CAP_LEASE_S", "2"),
        ("SWITCHBOARD__HEARTBEAT__INTERVAL_MS", "500"),
        ("SWITCHBOARD__HEARTBEAT__TIMEOUT_MS", "2000"),
    ]);
    let pods = start_pods(&redis.url(), 2, &env);
    let deadline = Instant::now() + Duration::from_secs(40);
    let fleet = followers_on(&redis, &pods, 40, deadline).await;
    let mut publisher = Publisher::start(&pods[0].base_url(), ORG, TOPIC, PUBLISH_EVERY);
    publisher.wait_count(30, T).await;

    redis.pause();
    let frozen_at = Instant::now();
    let accepted_when_frozen = publisher.count();
    for pod in &pods {
        let took = wait_redis_unavailable(pod, Duration::from_secs(6), "Redis frozen").await;
        eprintln!("pod {} not ready {took:?} into the freeze", pod.name());
    }
    // The freeze itself lasts FREEZE; meanwhile publishes keep being answered.
    tokio::time::sleep_until(frozen_at + FREEZE).await;
    let refused_frozen = publisher.refused.borrow().len();
    assert!(
        refused_frozen > 0,
        "no publish was refused during a {FREEZE:?} freeze"
    );
    let accepted_frozen = publisher.count() - accepted_when_frozen;
    redis.resume();
    // A publish answered just before SIGSTOP may have its 202 arrive a moment after.
    assert!(
        accepted_frozen <= 1,
        "{accepted_frozen} publishes were accepted (202) while Redis was frozen"
    );

    let published = publish_once_ready_again(&pods, &mut publisher).await;
    // The freeze outlasted the cap lease: every open socket's slot must be leased again.
    let deadline_caps = Instant::now() + Duration::from_secs(2) + T;
    loop {
        let held = live_cap_slots(&redis, "f", fleet.len());
        if held.iter().all(|n| *n == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline_caps,
            "live cap slots per user after the freeze (one socket each): {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_refusals_are_503(&publisher, "Redis frozen");

    let logs = fleet.finish(&published).await;
    assert_no_socket_lost(&logs, "Redis frozen");
    let tally = check_delivery(&logs, &publisher, &published);
    // A publish whose answer did not come was refused 503 `outcome_unknown`, since Redis may
    // carry it out once it runs again: such an event reaches the clients. Only those may.
    let timed_out = publisher
        .refused
        .borrow()
        .iter()
        .filter(|(_, body)| body.contains("outcome_unknown"))
        .count();
    assert!(
        tally.unaccepted <= timed_out * tally.clients,
        "events delivered without a 202 beyond the {timed_out} publishes that timed out: {tally:?}"
    );
    eprintln!(
        "Redis frozen: {timed_out} publishes timed out (answered 503), {} of them delivered after SIGCONT",
        tally.unaccepted / tally.clients
    );
    tally.print(
        "Redis SIGSTOP 5 s + SIGCONT",
        "40 sockets on 2 pods, one publish per 10 ms",
    );
}

// ---------------------------------------------------------------------------------------------
// a pod killed under load
// ---------------------------------------------------------------------------------------------

/// Users, sockets per user (the cap), and the cap lease of the pod-kill test.
const KILL_USERS: usize = 400;
const KILL_PER_USER: usize = 5;
const KILL_LEASE: Duration = Duration::from_secs(3);

/// 2,000 sockets (400 users at their cap of 5) on pod A, publishing through pod B; pod A SIGKILLed: every client comes back on pod B with since once A's cap slots lapse (within cap_lease_s, refused 4429 until then), every accepted event reaches every client once, in order, and each user then holds exactly 5 live slots.
#[actix_web::test]
async fn pod_killed_under_2000_sockets_frees_caps_and_clients_resume_on_the_other_pod() {
    let redis = Redis::start();
    let lease_s = KILL_LEASE.as_secs().to_string();
    let per_user = KILL_PER_USER.to_string();
    // Leases are refreshed with the heartbeat, which must be the shorter.
    let env = env_with(&[
        ("SWITCHBOARD__LIMITS__CAP_LEASE_S", &lease_s),
        ("SWITCHBOARD__LIMITS__MAX_CONNECTIONS_PER_USER", &per_user),
        ("SWITCHBOARD__HEARTBEAT__INTERVAL_MS", "1000"),
        ("SWITCHBOARD__HEARTBEAT__TIMEOUT_MS", "5000"),
    ]);
    let pods = start_pods(&redis.url(), 2, &env);
    let (victim, survivor) = (&pods[0], &pods[1]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let cookies = logins(&survivor.base_url(), "k", KILL_USERS).await;
    let mut fleet = Fleet::default();
    for cookie in &cookies {
        for _ in 0..KILL_PER_USER {
            fleet.add(
                vec![victim.addr(), survivor.addr()],
                cookie.clone(),
                deadline,
            );
        }
    }
    let sockets = fleet.len();
    fleet
        .wait_subscribed(sockets, Duration::from_secs(40))
        .await;
    assert_eq!(
        metric_value(&metrics(victim).await, "switchboard_connections") as usize,
        sockets,
        "every socket on pod A before the kill"
    );
    redis.wait_numsub(CHANNEL, 1, T).await;

    let mut publisher =
        Publisher::start(&survivor.base_url(), ORG, TOPIC, Duration::from_millis(100));
    publisher.wait_count(10, T).await;
    kill(victim.pid(), "KILL");
    let killed_at = Instant::now();
    // Generous: 2,000 clients backing off and handshaking again on a shared CI machine.
    let margin = Duration::from_secs(15);
    fleet
        .wait_subscribed(2 * sockets, KILL_LEASE + margin)
        .await;
    let all_back = killed_at.elapsed();
    // The surviving pod, serving every client, says so.
    wait_ready(survivor, Duration::ZERO).await;
    // The caps count exactly the live sockets: five per user, all on pod B.
    let live = live_cap_slots(&redis, "k", KILL_USERS);
    let wrong: Vec<(usize, usize)> = live
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, n)| *n != KILL_PER_USER)
        .collect();
    assert!(
        wrong.is_empty(),
        "(user, live cap slots) after every client resumed, expected {KILL_PER_USER}: {wrong:?}"
    );
    let resumed = publisher.count();
    // Each event is 2,000 frames for this one test thread to read: publishing slows down.
    publisher
        .wait_count(resumed + 10, Duration::from_secs(20))
        .await;
    let published = publisher.stop().await;
    assert!(
        publisher.refused.borrow().is_empty(),
        "publishes through the surviving pod refused: {:?}",
        publisher.refused.borrow()
    );

    let logs = fleet.finish(&published).await;
    let capped = logs
        .iter()
        .filter(|l| l.bounces.iter().any(|b| b.contains("4429")))
        .count();
    assert!(
        capped > 0,
        "no client was refused 4429 right after the kill: the dead pod's slots were not counted"
    );
    // The dead pod's slots lapse within the lease (refreshed with every heartbeat); a
    // refused client retries within a second.
    let first_back = logs
        .iter()
        .filter_map(|l| l.welcomed_at.get(1))
        .min()
        .expect("clients came back")
        .duration_since(killed_at);
    assert!(
        first_back <= KILL_LEASE + Duration::from_millis(1500),
        "the first client of a capped user came back {first_back:?} after the kill, later than \
         cap_lease_s ({KILL_LEASE:?}) and a retry"
    );
    for (i, log) in logs.iter().enumerate() {
        assert_eq!(log.drops.len(), 1, "follower {i}: {log:?}");
        for resume in &log.resumes {
            assert_eq!(resume["recovered"], true, "follower {i}: {resume}");
        }
    }
    let tally = check_delivery(&logs, &publisher, &published);
    assert_eq!(tally.unaccepted, 0, "{tally:?}");

    eprintln!(
        "first client back on pod B {first_back:?} and all {sockets} {all_back:?} after the \
         kill (cap lease {KILL_LEASE:?}); {capped} refused 4429 meanwhile"
    );
    tally.print(
        "pod SIGKILL",
        &format!(
            "{sockets} sockets ({KILL_USERS} users at cap {KILL_PER_USER}), one publish per 100 ms"
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// rolling restart behind nginx
// ---------------------------------------------------------------------------------------------

/// The reconnect spread of the rolling restart, and how many followers ride through it.
const SPREAD_MS: u64 = 3000;
const ROLLING_FOLLOWERS: usize = 150;

/// `switchboard_connections` of each pod, sampled every 100 ms by address (a restarted pod
/// keeps its predecessor's), so the test can count the sockets each pod gains per second.
struct ConnectionSampler {
    samples: Rc<RefCell<Vec<(Instant, SocketAddr, f64)>>>,
    stop: Rc<std::cell::Cell<bool>>,
}

impl ConnectionSampler {
    fn start(addrs: Vec<SocketAddr>) -> ConnectionSampler {
        let samples = Rc::new(RefCell::new(Vec::new()));
        let stop = Rc::new(std::cell::Cell::new(false));
        let (into, stopped) = (samples.clone(), stop.clone());
        actix_web::rt::spawn(async move {
            while !stopped.get() {
                for addr in &addrs {
                    // A pod between its exit and its successor's start has no answer.
                    if let Ok(resp) =
                        http_at("GET", &format!("http://{addr}/metrics"), &[], None).await
                    {
                        if let Some(v) = metric(&resp.text(), "switchboard_connections") {
                            into.borrow_mut().push((Instant::now(), *addr, v));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        ConnectionSampler { samples, stop }
    }

    /// The most sockets `pods` gained together within one second of `[from, to]`: the gains
    /// between consecutive samples of each pod, summed over the sample intervals that lie
    /// wholly inside some one-second window (so a late sample, covering a longer interval,
    /// can only lower the count, never pass a slow trickle off as a burst).
    fn max_gain_per_second(&self, pods: &[SocketAddr], from: Instant, to: Instant) -> f64 {
        let samples = self.samples.borrow();
        // (interval start, interval end, sockets gained in it)
        let mut gains: Vec<(Instant, Instant, f64)> = Vec::new();
        for pod in pods {
            let mut last: Option<(Instant, f64)> = None;
            for (at, _, v) in samples.iter().filter(|(at, a, _)| a == pod && *at <= to) {
                if let Some((prev_at, prev)) = last {
                    if *at >= from && *v > prev {
                        gains.push((prev_at, *at, v - prev));
                    }
                }
                last = Some((*at, *v));
            }
        }
        gains
            .iter()
            .map(|(start, _, _)| {
                let end = *start + Duration::from_secs(1);
                gains
                    .iter()
                    .filter(|(since, until, _)| since >= start && *until <= end)
                    .map(|(_, _, g)| g)
                    .sum::<f64>()
            })
            .fold(0.0, f64::max)
    }
}

impl Drop for ConnectionSampler {
    fn drop(&mut self) {
        self.stop.set(true);
    }
}

/// Wait for `pod` to exit without blocking the test's runtime (the followers and the sampler
/// run on it while the pod drains).
async fn exited(pod: &mut Hub, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = pod.try_wait_exit(Duration::ZERO) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "pod {} still running {timeout:?} after SIGTERM; output:\n{}",
            pod.name(),
            pod.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The most handshakes per second the surviving pods may see when `moved` clients come back
/// after a drain with `after_ms` uniform over `spread_ms`: the expected share of one second,
/// four standard deviations, and 3 for rounding. A reconnect storm (every client at once) is
/// above it for the loads used here.
fn reconnect_bound(moved: usize, spread_ms: u64) -> f64 {
    let p = (1000.0 / spread_ms as f64).min(1.0);
    let n = moved as f64;
    n * p + 4.0 * (n * p * (1.0 - p)).sqrt() + 3.0
}

/// Three pods behind nginx, 150 followers through it, publishing through nginx every 20 ms; each pod in turn SIGTERMed and started again on its port: its clients get reconnect (after_ms within the spread) then 1012, come back through nginx to the others with since (recovered), the surviving pods gain at most the spread's share of them per second (no reconnect storm), and every client ends with every accepted event once, in order.
#[actix_web::test]
async fn rolling_restart_of_three_pods_through_nginx_paces_reconnects_and_loses_nothing() {
    let redis = Redis::start();
    let spread = SPREAD_MS.to_string();
    let env = env_with(&[
        ("SWITCHBOARD__SHUTDOWN__RECONNECT_SPREAD_MS", &spread),
        ("SWITCHBOARD__SHUTDOWN__DRAIN_TIMEOUT_S", "6"),
        ("SWITCHBOARD__SERVER__TRUSTED_PROXIES", "127.0.0.1"),
    ]);
    let mut pods = start_pods(&redis.url(), 3, &env);
    let addrs: Vec<SocketAddr> = pods.iter().map(Hub::addr).collect();
    let nginx = Nginx::start(&addrs);
    let resp = http_at("GET", &nginx.url("/readyz"), &[], None)
        .await
        .expect("GET /readyz via nginx");
    assert_eq!(resp.status, 200, "/readyz through nginx: {resp}");

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut fleet = Fleet::default();
    for cookie in logins(&nginx.url(""), "r", ROLLING_FOLLOWERS).await {
        fleet.add(vec![nginx.addr()], cookie, deadline);
    }
    fleet.wait_subscribed(ROLLING_FOLLOWERS, T).await;
    let held = |text: &str| metric_value(text, "switchboard_connections") as usize;
    let mut holding = 0;
    for pod in &pods {
        holding += usize::from(held(&metrics(pod).await) > 0);
    }
    redis.wait_numsub(CHANNEL, holding as u64, T).await;

    let sampler = ConnectionSampler::start(addrs.clone());
    let mut publisher = Publisher::start(&nginx.url(""), ORG, TOPIC, Duration::from_millis(20));
    publisher.wait_count(20, T).await;
    let mut moved_total = 0;
    let mut rates = Vec::new();
    for victim in 0..3 {
        let moved = held(&metrics(&pods[victim]).await);
        let before = fleet.subscribed();
        let from = Instant::now();
        pods[victim].sigterm();
        let exit = exited(&mut pods[victim], Duration::from_secs(8)).await;
        assert!(exit.success(), "SIGTERMed pod {victim} exit status {exit}");
        fleet
            .wait_subscribed(before + moved, Duration::from_secs(10))
            .await;
        let to = Instant::now();
        let survivors: Vec<SocketAddr> =
            (0..3).filter(|i| *i != victim).map(|i| addrs[i]).collect();
        let rate = sampler.max_gain_per_second(&survivors, from, to);
        let bound = reconnect_bound(moved, SPREAD_MS);
        eprintln!(
            "restart of pod {victim}: {moved} clients moved in {:?}; surviving pods gained at \
             most {rate} sockets in one second (bound {bound:.1})",
            to - from
        );
        assert!(
            rate <= bound,
            "reconnect storm: pod {victim}'s {moved} clients reached the surviving pods at up \
             to {rate} per second, above {bound:.1} for a {SPREAD_MS} ms spread"
        );
        rates.push((moved, rate));
        moved_total += moved;
        pods[victim] = start_pod_on(&redis.url(), addrs[victim].port(), &env);
    }
    let resumed = publisher.count();
    publisher.wait_count(resumed + 20, T).await;
    let published = publisher.stop().await;
    drop(sampler);

    let logs = fleet.finish(&published).await;
    let restarts: usize = logs.iter().map(|l| l.restarts.len()).sum();
    assert_eq!(
        restarts, moved_total,
        "server-initiated closes vs sockets the restarted pods held"
    );
    for (i, log) in logs.iter().enumerate() {
        for (after, code, reason) in &log.restarts {
            assert_eq!(
                (*code, reason.as_str()),
                (1012, "server restarting"),
                "follower {i}: {log:?}"
            );
            let after = after
                .unwrap_or_else(|| panic!("follower {i}: 1012 without a reconnect message first"));
            assert!(
                after <= SPREAD_MS,
                "follower {i}: after_ms {after} > spread {SPREAD_MS}"
            );
        }
        for resume in &log.resumes {
            assert_eq!(resume["recovered"], true, "follower {i}: resume {resume}");
        }
        assert!(log.drops.is_empty(), "follower {i}: {log:?}");
    }
    let tally = check_delivery(&logs, &publisher, &published);
    eprintln!("rolling restart: (clients moved, most gained by survivors in one second) per pod: {rates:?}");
    tally.print(
        "rolling restart of 3 pods behind nginx",
        &format!("{ROLLING_FOLLOWERS} sockets through nginx, one publish per 20 ms through nginx"),
    );
}

// ---------------------------------------------------------------------------------------------
// nginx reloaded
// ---------------------------------------------------------------------------------------------

/// Two pods behind nginx, 40 followers and a publisher (every 20 ms) through it; `nginx -s reload`: new workers take over, /readyz through nginx stays 200, new sockets are welcomed, and every follower (surviving on the old workers or reconnecting with since) gets every accepted event once, in order.
#[actix_web::test]
async fn nginx_reload_under_traffic_loses_nothing() {
    let redis = Redis::start();
    let env = env_with(&[("SWITCHBOARD__SERVER__TRUSTED_PROXIES", "127.0.0.1")]);
    let pods = start_pods(&redis.url(), 2, &env);
    let addrs: Vec<SocketAddr> = pods.iter().map(Hub::addr).collect();
    let nginx = Nginx::start(&addrs);

    let deadline = Instant::now() + Duration::from_secs(40);
    let mut fleet = Fleet::default();
    let cookies = logins(&nginx.url(""), "n", 41).await;
    for cookie in &cookies[..40] {
        fleet.add(vec![nginx.addr()], cookie.clone(), deadline);
    }
    fleet.wait_subscribed(40, T).await;
    let mut holding = 0;
    for pod in &pods {
        holding += usize::from(metric_value(&metrics(pod).await, "switchboard_connections") > 0.0);
    }
    redis.wait_numsub(CHANNEL, holding as u64, T).await;

    let mut publisher = Publisher::start(&nginx.url(""), ORG, TOPIC, Duration::from_millis(20));
    publisher.wait_count(20, T).await;
    let old_workers = nginx.workers();
    assert!(!old_workers.is_empty(), "nginx has no workers");
    nginx.reload();
    let deadline_new = Instant::now() + T;
    loop {
        if nginx.workers().iter().any(|w| !old_workers.contains(w)) {
            break;
        }
        assert!(
            Instant::now() < deadline_new,
            "no new nginx worker within {T:?} of the reload (workers {:?})",
            nginx.workers()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = http_at("GET", &nginx.url("/readyz"), &[], None)
        .await
        .expect("GET /readyz via nginx after the reload");
    assert_eq!(
        resp.status, 200,
        "/readyz through nginx after the reload: {resp}"
    );
    let (mut late, _) = open_welcomed(nginx.addr(), &cookies[40]).await;
    late.subscribe(TOPIC).await;

    let resumed = publisher.count();
    publisher.wait_count(resumed + 20, T).await;
    let published = publisher.stop().await;
    let logs = fleet.finish(&published).await;
    let tally = check_delivery(&logs, &publisher, &published);
    // The socket opened after the reload gets every event from its first one on.
    let mut late_ids: Vec<String> = Vec::new();
    while late_ids.last() != published.last() {
        let v = late.next_json(T).await;
        let id = event_id(&v, TOPIC)
            .unwrap_or_else(|| panic!("late socket: expected an event, got {v}"));
        late_ids.push(id.to_string());
    }
    let from = published.len() - late_ids.len();
    assert!(
        late_ids == published[from..],
        "socket opened after the reload: {}",
        first_difference(&late_ids, &published[from..])
    );
    tally.print(
        "nginx -s reload",
        "40 sockets through nginx to 2 pods, one publish per 20 ms through nginx",
    );
}
