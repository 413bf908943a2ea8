//! Clustered mode end to end: a real `redis-server` (killed and restarted on the same port),
//! several real switchboard pods sharing it, and a real nginx in front configured from
//! `config/nginx.conf`, all on loopback. Each test checks what a user or an operator would
//! notice: events reaching every pod, one Redis subscriber per pod, sockets surviving a Redis
//! outage, readiness catching a wedged subscriber or a cut publish connection, a pod cut off
//! from Redis asking its sockets to resync when history cannot fill what it missed (or
//! resuming a live-only topic live), logout and connection caps across pods, and resume with
//! `since` on another pod. The `faults` module injects faults under traffic (Redis killed or
//! frozen, a pod killed or cut off, a rolling restart, nginx reloaded) and checks that no
//! accepted event is lost.
//!
//! Needs `redis-server` and `nginx` (`apt-get install -y redis-server nginx`); a missing one
//! fails the test with that command. Nothing here touches port 6379 or a running Redis.

#[path = "../common/mod.rs"]
mod common;

mod client;
mod faults;
mod follow;
mod infra;
mod on_redis_cluster;

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use client::{connect, event_id, first_difference, http_at, open_welcomed, wait_readyz, Publisher};
use common::*;
use infra::{kill, start_pods, Redis, WedgeProxy};

const ORG: &str = "42";
const TOPIC: &str = "calls";
const CHANNEL: &str = "sb:42:calls";

/// Poll a pod's `/readyz` until it answers 200, or panic after `timeout`.
async fn wait_ready(hub: &Hub, timeout: Duration) {
    let ((status, body), ok) = wait_readyz(&hub.base_url(), timeout, |s, _| s == 200).await;
    assert!(
        ok,
        "pod {} not ready within {timeout:?}: last /readyz {status} {body}",
        hub.name()
    );
}

/// Poll a pod's `/readyz` until it answers 503 `redis_unavailable`; returns how long it took.
async fn wait_redis_unavailable(hub: &Hub, timeout: Duration, why: &str) -> Duration {
    let started = Instant::now();
    let ((status, body), ok) = wait_readyz(&hub.base_url(), timeout, |s, b| {
        s == 503 && b["reason"] == "redis_unavailable"
    })
    .await;
    assert!(
        ok,
        "{why}: pod {} /readyz still {status} {body} after {timeout:?}, expected 503 \
         {{\"status\":\"not_ready\",\"reason\":\"redis_unavailable\"}}",
        hub.name()
    );
    assert_eq!(body["status"], "not_ready", "{why}: /readyz body {body}");
    started.elapsed()
}

/// The next event frame of `topic` on a common-harness socket (panics on anything else).
async fn next_event(ws: &mut Ws, topic: &str, what: &str) -> Value {
    let v = ws.next_json(T).await;
    assert!(
        event_id(&v, topic).is_some(),
        "{what}: expected an event on {topic}, got {v}"
    );
    v
}

/// Redis, the wedging proxy in front of it, and one pod that reaches Redis through the
/// proxy, ready.
async fn pod_behind_wedge_proxy() -> (Redis, WedgeProxy, Vec<Hub>) {
    let redis = Redis::start();
    let proxy = WedgeProxy::start(redis.port());
    let pods = start_pods(&proxy.url(), 1, &[]);
    wait_ready(&pods[0], Duration::from_secs(10)).await;
    (redis, proxy, pods)
}

/// Log `user` in through `hub`, open a socket there and subscribe it to `TOPIC`.
async fn subscribed_user(hub: &Hub, user: &str, org: &str) -> Ws {
    let (mut ws, _, _) = connect_user(hub, user, org).await;
    ws.subscribe(TOPIC).await;
    ws
}

// ---------------------------------------------------------------------------------------------
// pub/sub across pods
// ---------------------------------------------------------------------------------------------

/// A backend PUBLISHing `{"event","data"}` straight to Redis reaches subscribed sockets on every pod, and no other org.
#[actix_web::test]
async fn direct_redis_publish_reaches_sockets_on_every_pod() {
    let redis = Redis::start();
    let pods = start_pods(&redis.url(), 3, &[]);
    let mut sockets = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        sockets.push(subscribed_user(pod, &format!("u{i}"), ORG).await);
    }
    let mut other_org = subscribed_user(&pods[0], "stranger", "7").await;
    redis.wait_numsub(CHANNEL, 3, T).await;

    let data = json!({"call_id": "c-direct", "status": "ringing", "direction": "inbound",
                      "from": "+15550100", "to": "+15550199", "agent_id": "a1",
                      "started_at": "2026-01-01T00:00:00Z", "ended_at": null, "ended_reason": null});
    let payload = json!({"event": "call.status", "data": data}).to_string();
    let receivers = redis.publish(CHANNEL, &payload);
    assert_eq!(
        receivers, 3,
        "PUBLISH {CHANNEL} reached {receivers} subscriber connections, expected one per pod"
    );

    for (i, ws) in sockets.iter_mut().enumerate() {
        let ev = next_event(ws, TOPIC, &format!("socket on pod {i}")).await;
        assert_eq!(ev["event"], "call.status", "pod {i}: {ev}");
        assert_eq!(ev["data"], data, "pod {i}: data changed on the way: {ev}");
        let id = ev["id"].as_str().unwrap_or_default();
        assert!(
            parse_event_id(id).is_some(),
            "pod {i}: an event published without id gets a `<ms>-<seq>` id from the hub, got {ev}"
        );
    }
    other_org.expect_silence(Duration::from_millis(300)).await;
}

/// A message PUBLISHed straight to Redis is checked as an /api/publish body is: an event name
/// that would forge SSE records, or an id far ahead of the clock (it would hold every later
/// `since`), is dropped; a valid id it gives is kept as it is.
#[actix_web::test]
async fn direct_redis_publish_is_validated_and_keeps_its_id() {
    let redis = Redis::start();
    let pods = start_pods(&redis.url(), 1, &[]);
    let mut ws = subscribed_user(&pods[0], "u0", ORG).await;
    redis.wait_numsub(CHANNEL, 1, T).await;
    let forged = json!({"event": "x\nevent: forged", "data": 1});
    let ahead = json!({"id": "99999999999999-0", "event": "e", "data": 2});
    let given = json!({"id": "1000-7", "event": "e", "data": 3});
    for message in [forged, ahead, given] {
        redis.publish(CHANNEL, &message.to_string());
    }
    let ev = next_event(&mut ws, TOPIC, "the valid message").await;
    assert_eq!(
        (&ev["id"], &ev["data"]),
        (&json!("1000-7"), &json!(3)),
        "the invalid messages must be dropped and the given id kept: {ev}"
    );
    ws.expect_silence(Duration::from_millis(300)).await;
}

/// 20 sockets on 2 pods over 6 topics: Redis sees exactly one subscriber connection per pod, and a channel is dropped when its last local socket leaves.
#[actix_web::test]
async fn one_subscriber_connection_per_pod_whatever_the_sessions() {
    let redis = Redis::start();
    let pods = start_pods(&redis.url(), 2, &[]);
    let mut sockets: Vec<Vec<Ws>> = vec![Vec::new(), Vec::new()];
    for i in 0..20 {
        let pod = i % 2;
        let (mut ws, _, _) = connect_user(&pods[pod], &format!("user{i}"), ORG).await;
        ws.subscribe(TOPIC).await;
        ws.subscribe(&format!("room{}", i % 5)).await;
        sockets[pod].push(ws);
    }
    redis.wait_numsub(CHANNEL, 2, T).await;
    for room in 0..5 {
        redis.wait_numsub(&format!("sb:42:room{room}"), 2, T).await;
    }
    let subscribers = redis.subscriber_connections();
    assert_eq!(
        subscribers.len(),
        2,
        "20 sockets on 2 pods should hold exactly 2 subscriber connections to Redis, CLIENT LIST shows:\n{}",
        subscribers.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    );

    // The last socket of pod 0 leaving a channel unsubscribes pod 0, not pod 1.
    // (Closed together: each close handshake takes the server about a second to finish.)
    futures_util::future::join_all(sockets[0].iter_mut().map(|ws| ws.close())).await;
    redis.wait_numsub(CHANNEL, 1, T).await;
    for room in 0..5 {
        redis.wait_numsub(&format!("sb:42:room{room}"), 1, T).await;
    }
    assert_eq!(
        redis.subscriber_connections().len(),
        2,
        "each pod keeps its one subscriber connection"
    );
    // Pod 1's sockets still get events.
    let id = publish_ok(&pods[0], ORG, TOPIC, "call.status", json!({"n": 1})).await;
    for ws in sockets[1].iter_mut() {
        let ev = next_event(ws, TOPIC, "socket on pod 1").await;
        assert_eq!(ev["id"], id.as_str(), "{ev}");
    }
}

// ---------------------------------------------------------------------------------------------
// Redis outages and readiness
// ---------------------------------------------------------------------------------------------

/// Redis killed: sockets stay open, /readyz and /api/publish 503; Redis back on the same port: ready again and delivery resumes to the same sockets.
#[actix_web::test]
async fn redis_outage_keeps_sockets_open_and_recovers() {
    let mut redis = Redis::start();
    let pods = start_pods(&redis.url(), 2, &[]);
    let mut a = subscribed_user(&pods[0], "ua", ORG).await;
    let mut b = subscribed_user(&pods[1], "ub", ORG).await;
    redis.wait_numsub(CHANNEL, 2, T).await;
    let first = publish_ok(&pods[0], ORG, TOPIC, "call.status", json!({"n": 1})).await;
    assert_eq!(
        next_event(&mut a, TOPIC, "before the outage, pod A").await["id"],
        first.as_str()
    );
    assert_eq!(
        next_event(&mut b, TOPIC, "before the outage, pod B").await["id"],
        first.as_str()
    );

    redis.kill();
    for pod in &pods {
        wait_redis_unavailable(pod, Duration::from_secs(6), "Redis killed").await;
    }
    a.assert_alive().await;
    b.assert_alive().await;
    let (status, body) = publish(&pods[0], ORG, TOPIC, "call.status", json!({"n": 2})).await;
    assert_eq!(
        status, 503,
        "/api/publish while Redis is down must not accept an event it cannot deliver: {body}"
    );

    redis.restart();
    for pod in &pods {
        wait_ready(pod, Duration::from_secs(12)).await;
    }
    a.assert_alive().await;
    b.assert_alive().await;
    let after = publish_ok(&pods[0], ORG, TOPIC, "call.status", json!({"n": 3})).await;
    for (ws, name) in [(&mut a, "A"), (&mut b, "B")] {
        match ws.recv(T).await {
            Some(Frame::Json(v, _)) if event_id(&v, TOPIC) == Some(after.as_str()) => {}
            other => panic!(
                "pod {name}: no delivery to the old socket after Redis came back (ready, \
                 PUBSUB NUMSUB {CHANNEL} = {}); got {other:?}",
                redis.numsub(CHANNEL)
            ),
        }
    }
    for pod in &pods {
        let (v, ok) = wait_metric(pod, "switchboard_redis_reconnects_total", T, |v| v >= 1.0).await;
        assert!(
            ok,
            "pod {}: switchboard_redis_reconnects_total = {v} after the outage",
            pod.name()
        );
    }
}

/// Redis restarted on the same port: a topic nobody here subscribed before the outage, subscribed afterwards on each pod, gets its events.
#[actix_web::test]
async fn topic_first_subscribed_after_redis_restart_gets_events() {
    let mut redis = Redis::start();
    let pods = start_pods(&redis.url(), 2, &[]);
    // Sockets from before the outage: the pods had a reconciler waiting when Redis died.
    let mut old = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        old.push(subscribed_user(pod, &format!("old{i}"), ORG).await);
    }
    redis.wait_numsub(CHANNEL, 2, T).await;

    redis.kill();
    for pod in &pods {
        wait_redis_unavailable(pod, Duration::from_secs(6), "Redis killed").await;
    }
    redis.restart();
    for pod in &pods {
        wait_ready(pod, Duration::from_secs(12)).await;
    }
    redis.wait_numsub(CHANNEL, 2, T).await;

    let fresh = "after-outage";
    let fresh_channel = format!("sb:{ORG}:{fresh}");
    let mut new = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let (mut ws, _, _) = connect_user(pod, &format!("new{i}"), ORG).await;
        ws.subscribe(fresh).await;
        new.push(ws);
    }
    redis.wait_numsub(&fresh_channel, 2, T).await;
    let id = publish_ok(&pods[0], ORG, fresh, "call.status", json!({"n": 1})).await;
    for (i, ws) in new.iter_mut().enumerate() {
        let ev = next_event(ws, fresh, &format!("new socket on pod {i}")).await;
        assert_eq!(ev["id"], id.as_str(), "pod {i}: {ev}");
    }
    for ws in old.iter_mut() {
        ws.assert_alive().await;
    }
}

/// Ready means both Redis connections work: when the command connection publishes go over
/// is cut (the subscriber fine), a refused publish is followed by /readyz 503 at once, not
/// by seconds of "ready" while publishes fail; once the connection is back the pod is ready
/// and publishes are accepted.
#[actix_web::test]
async fn readyz_tells_when_the_publish_connection_is_down() {
    let redis = Redis::start();
    let pods = start_pods(&redis.url(), 1, &[]);
    let pod = &pods[0];
    wait_ready(pod, Duration::from_secs(10)).await;
    publish_ok(pod, ORG, TOPIC, "call.status", json!({"n": 0})).await;
    // A canary (every second) may reconnect the command connection between the cut and the
    // publish; cut again until a publish meets the dead connection.
    let mut refused = false;
    for attempt in 1..=5 {
        let killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query(&mut redis.conn())
            .expect("CLIENT KILL TYPE normal");
        assert!(killed >= 1, "the pod holds no command connection to cut");
        let (status, body) = publish(pod, ORG, TOPIC, "call.status", json!({"n": attempt})).await;
        if status == 202 {
            continue;
        }
        assert_eq!(status, 503, "publish on a cut connection: {body}");
        let resp = http_at("GET", &format!("{}/readyz", pod.base_url()), &[], None)
            .await
            .expect("GET /readyz");
        assert_eq!(
            resp.status, 503,
            "a publish was just refused for want of Redis, yet /readyz says: {resp}"
        );
        assert_eq!(resp.json()["reason"], "redis_unavailable", "{resp}");
        refused = true;
        break;
    }
    assert!(refused, "no publish met the cut connection in 5 attempts");
    wait_ready(pod, Duration::from_secs(10)).await;
    publish_ok(pod, ORG, TOPIC, "call.status", json!({"n": "after"})).await;
}

/// A subscriber connection that is up but delivers nothing (Redis itself fine) turns /readyz 503 through the canary; unwedged, the pod is ready and delivers again.
#[actix_web::test]
async fn wedged_subscriber_turns_readyz_503() {
    let (redis, proxy, pods) = pod_behind_wedge_proxy().await;
    let pod = &pods[0];
    let mut ws = subscribed_user(pod, "u1", ORG).await;
    redis.wait_numsub(CHANNEL, 1, T).await;
    let id = publish_ok(pod, ORG, TOPIC, "call.status", json!({"n": 1})).await;
    assert_eq!(
        next_event(&mut ws, TOPIC, "before wedging").await["id"],
        id.as_str()
    );
    assert!(
        proxy.subscriber_connections_seen() >= 1,
        "test proxy saw no SUBSCRIBE from the pod, so it cannot wedge anything"
    );

    proxy.wedge();
    let took = wait_redis_unavailable(pod, Duration::from_secs(8), "subscriber wedged").await;
    eprintln!("wedged subscriber detected after {took:?}");
    assert_eq!(
        redis::cmd("PING")
            .query::<String>(&mut redis.conn())
            .ok()
            .as_deref(),
        Some("PONG"),
        "Redis itself stays healthy while the subscriber is wedged"
    );
    ws.assert_alive().await;

    proxy.unwedge();
    wait_ready(pod, Duration::from_secs(10)).await;
    // Anything held back while wedged may arrive now; what counts is that new events do.
    let id = publish_ok(pod, ORG, TOPIC, "call.status", json!({"n": 2})).await;
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws.recv(left).await {
            Some(Frame::Json(v, _)) if event_id(&v, TOPIC) == Some(id.as_str()) => break,
            Some(Frame::Json(v, _)) if v["type"] == "event" => {}
            other => panic!("after unwedging, expected event {id}, got {other:?}"),
        }
    }
}

/// A pod cut off from Redis while another pod accepts more events on a topic than its history
/// keeps cannot replay what its socket missed: once back, it tells the socket to reconnect
/// (after at most `shutdown.reconnect_spread_ms`) and closes it with 1012, so the client
/// resumes with `since` and learns the gap cannot be filled, instead of losing it silently.
#[actix_web::test]
async fn pod_cut_off_past_what_history_keeps_asks_its_sockets_to_resync() {
    let redis = Redis::start();
    let proxy = WedgeProxy::start(redis.port());
    let env = [
        ("SWITCHBOARD__HISTORY__MAX_LEN", "3"),
        ("SWITCHBOARD__SHUTDOWN__RECONNECT_SPREAD_MS", "200"),
    ];
    let a = start_pods(&redis.url(), 1, &env).remove(0);
    let b = start_pods(&proxy.url(), 1, &env).remove(0);
    wait_ready(&b, Duration::from_secs(10)).await;
    let mut ws = subscribed_user(&b, "u1", ORG).await;
    redis.wait_numsub(CHANNEL, 1, T).await;
    let id = publish_ok(&a, ORG, TOPIC, "call.status", json!({"n": 0})).await;
    assert_eq!(
        next_event(&mut ws, TOPIC, "before the cut").await["id"],
        id.as_str()
    );

    proxy.cut();
    wait_redis_unavailable(&b, Duration::from_secs(6), "pod B cut off from Redis").await;
    for n in 1..=5 {
        publish_ok(&a, ORG, TOPIC, "call.status", json!({ "n": n })).await;
    }
    proxy.restore();
    wait_ready(&b, Duration::from_secs(12)).await;

    let told = ws.next_json(T).await;
    assert_eq!(
        told["type"], "reconnect",
        "history keeps 3 of the 5 events missed: the socket must be told to resync, got {told}"
    );
    let after_ms = told["after_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(
        after_ms <= 200,
        "reconnect after {after_ms} ms, spread is 200: {told}"
    );
    let (code, _) = ws.expect_close(T).await;
    assert_eq!(code, 1012, "a socket told to reconnect is closed with 1012");
}

/// A topic only browsers publish to keeps no history: a pod cut off from Redis while such
/// events went by cannot replay them, and has nothing a resync could recover either, so its
/// socket stays open and simply gets the live events again once the pod is back.
#[actix_web::test]
async fn pod_cut_off_resumes_a_live_only_topic_live() {
    let redis = Redis::start();
    let proxy = WedgeProxy::start(redis.port());
    let a = start_pods(&redis.url(), 1, &[]).remove(0);
    let b = start_pods(&proxy.url(), 1, &[]).remove(0);
    wait_ready(&b, Duration::from_secs(10)).await;
    let topic = "voice:abc:in";
    let (mut listener, _, _) = connect_user(&b, "agent", ORG).await;
    listener.subscribe(topic).await;
    let (mut caller, _, _) = connect_user(&a, "caller", ORG).await;
    let say = |n: u32| json!({"type": "publish", "topic": topic, "data": {"n": n}});
    caller.send_json(&say(1)).await;
    assert_eq!(
        next_event(&mut listener, topic, "before the cut").await["data"]["n"],
        1
    );

    proxy.cut();
    wait_redis_unavailable(&b, Duration::from_secs(6), "pod B cut off from Redis").await;
    caller.send_json(&say(2)).await;
    proxy.restore();
    wait_ready(&b, Duration::from_secs(12)).await;
    caller.send_json(&say(3)).await;
    let ev = listener.next_json(T).await;
    assert_eq!(
        (&ev["type"], &ev["data"]["n"]),
        (&json!("event"), &json!(3)),
        "a live-only topic resumes live, without asking the socket to reconnect: {ev}"
    );
    listener.assert_alive().await;
}

/// `subscribed` for a channel new to the pod comes only once Redis has confirmed the pod's
/// SUBSCRIBE, so an event published right after it cannot be missed: with Redis's answers to
/// the subscriber held back, the acknowledgement waits; released, it comes, and the next
/// event arrives.
#[actix_web::test]
async fn subscribed_waits_for_redis_to_confirm_the_subscription() {
    let (_redis, proxy, pods) = pod_behind_wedge_proxy().await;
    let pod = &pods[0];
    let (mut ws, _, _) = connect_user(pod, "u1", ORG).await;

    proxy.wedge();
    ws.send_json(&json!({"type": "subscribe", "topic": "fresh"}))
        .await;
    // Redis has the SUBSCRIBE, but its answer is held back: the pod must not claim the
    // subscription yet.
    ws.expect_silence(Duration::from_millis(500)).await;

    proxy.unwedge();
    let reply = ws.next_json(T).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["topic"], "fresh", "{reply}");
    let id = publish_ok(pod, ORG, "fresh", "call.status", json!({"n": 1})).await;
    assert_eq!(
        next_event(&mut ws, "fresh", "right after subscribed").await["id"],
        id.as_str()
    );
}

/// An SSE stream's `welcome` is its only sign of being subscribed, so on a pod new to the
/// channel it too waits for Redis to confirm the pod's SUBSCRIBE: with Redis's answers held
/// back, no `welcome`; released, it comes, and an event published right after it arrives.
#[actix_web::test]
async fn sse_welcome_waits_for_redis_to_confirm_the_subscription() {
    let redis = Redis::start();
    let proxy = WedgeProxy::start(redis.port());
    let pods = start_pods(&proxy.url(), 1, &[]);
    let pod = &pods[0];
    wait_ready(pod, Duration::from_secs(10)).await;
    let cookie = dev_login(pod, "u1", ORG).await;
    let headers = [("origin", ORIGIN), ("cookie", cookie.as_str())];

    proxy.wedge();
    let mut sse = sse_stream(open_sse(pod, "topic=fresh", &headers).await);
    if let Some(record) = sse.record_within(Duration::from_millis(500)).await {
        panic!("welcomed before Redis confirmed the subscription: {record:?}");
    }

    proxy.unwedge();
    sse.expect_welcome().await;
    let id = publish_ok(pod, ORG, "fresh", "call.status", json!({"n": 1})).await;
    let record = sse.next_event().await;
    assert_eq!(record.data["id"], id.as_str(), "{record:?}");
}

// ---------------------------------------------------------------------------------------------
// sessions and caps across pods
// ---------------------------------------------------------------------------------------------

/// Log out through `pod` and check that every socket of the session (`sockets`, on pods
/// `first`, `first + 1`, ...) closes with 4401 `logged out`.
async fn logout_closes(pod: &Hub, cookie: &str, sockets: &mut [Ws], first: usize) {
    let resp = http(pod, "DELETE", "/auth/session", &[("cookie", cookie)], None).await;
    assert_eq!(resp.status, 204, "logout: {resp}");
    for (i, ws) in sockets.iter_mut().enumerate() {
        assert_close(
            ws.expect_close(T).await,
            4401,
            "unauthenticated: logged out",
            &format!("socket on pod {} after logout on {}", i + first, pod.name()),
        );
    }
}

/// Logged in through pod A, sockets on pods B and C; DELETE /auth/session on A closes both with 4401 and the cookie is refused afterwards.
#[actix_web::test]
async fn logout_on_one_pod_closes_sockets_on_every_pod() {
    let redis = Redis::start();
    let pods = start_pods(&redis.url(), 3, &[]);
    let cookie = dev_login(&pods[0], "alice", ORG).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("sb:session:*")
        .query(&mut redis.conn())
        .expect("KEYS");
    assert!(
        !keys.is_empty(),
        "clustered sessions live in Redis under sb:session:*, found none"
    );

    let mut sockets = Vec::new();
    for pod in &pods[1..] {
        let mut ws = ws_open(pod, Some(ORIGIN), Some(&cookie)).await;
        let welcome = ws.next_json(T).await;
        assert_eq!(
            welcome["type"],
            "welcome",
            "session made on pod A, used on {}: {welcome}",
            pod.name()
        );
        assert_eq!(welcome["user"], "alice", "{welcome}");
        sockets.push(ws);
    }

    logout_closes(&pods[0], &cookie, &mut sockets, 1).await;
    let mut again = ws_open(&pods[2], Some(ORIGIN), Some(&cookie)).await;
    assert_close(
        again.expect_only_close(T).await,
        4401,
        "unauthenticated: logged out",
        "the logged-out cookie replayed on another pod",
    );
}

/// A cookie whose session Redis dropped when its TTL ran out is refused as `session expired`
/// (SPEC 3), as embedded mode does, not as `invalid session`.
#[actix_web::test]
async fn an_expired_session_is_reported_as_expired() {
    let redis = Redis::start();
    let pods = start_pods(
        &redis.url(),
        1,
        &[("SWITCHBOARD__AUTH__SESSION_TTL_S", "1")],
    );
    let cookie = dev_login(&pods[0], "alice", ORG).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("sb:session:*")
            .query(&mut redis.conn())
            .expect("KEYS");
        if keys.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the session never left Redis: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ws = ws_open(&pods[0], Some(ORIGIN), Some(&cookie)).await;
    assert_close(
        ws.expect_only_close(T).await,
        4401,
        "unauthenticated: session expired",
        "a cookie whose session expired",
    );
    let opened = open_sse(
        &pods[0],
        "topic=calls",
        &[("origin", ORIGIN), ("cookie", cookie.as_str())],
    )
    .await;
    match opened {
        Opened::Refused(status, body) => assert!(
            status == 401 && body.to_string().contains("session expired"),
            "SSE with the expired cookie: {status} {body}"
        ),
        Opened::Stream(_) => panic!("SSE opened with an expired session"),
    }
}

/// A pod whose subscriber missed the logout broadcast (its Redis answers held back) still
/// closes the session's socket, at its next re-check of logged-out sessions.
#[actix_web::test]
async fn a_pod_that_missed_the_logout_broadcast_still_closes_the_socket() {
    let redis = Redis::start();
    let proxy = WedgeProxy::start(redis.port());
    let env = [("SWITCHBOARD__AUTH__REVOCATION_CHECK_S", "1")];
    let direct = start_pods(&redis.url(), 1, &env);
    let behind = start_pods(&proxy.url(), 1, &env);
    wait_ready(&behind[0], Duration::from_secs(10)).await;
    let cookie = dev_login(&direct[0], "alice", ORG).await;
    let mut ws = ws_open(&behind[0], Some(ORIGIN), Some(&cookie)).await;
    assert_eq!(ws.next_json(T).await["type"], "welcome");

    proxy.wedge();
    let resp = http(
        &direct[0],
        "DELETE",
        "/auth/session",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(resp.status, 204, "logout: {resp}");
    assert_close(
        ws.expect_close(T).await,
        4401,
        "unauthenticated: logged out",
        "socket on the pod that missed the broadcast",
    );
}

/// Cap env: 3 sockets per user, 200 ms heartbeat, 1 s timeout, 2 s leases.
const CAP_ENV: &[(&str, &str)] = &[
    ("SWITCHBOARD__LIMITS__MAX_CONNECTIONS_PER_USER", "3"),
    ("SWITCHBOARD__HEARTBEAT__INTERVAL_MS", "200"),
    ("SWITCHBOARD__HEARTBEAT__TIMEOUT_MS", "1000"),
    ("SWITCHBOARD__LIMITS__CAP_LEASE_S", "2"),
];
const CAP_LEASE: Duration = Duration::from_secs(2);

/// Limit 3 across pods: sockets on three pods, a fourth on any pod gets 4429; a SIGKILLed pod's slot comes back within the lease.
#[actix_web::test]
async fn cap_counts_sockets_across_pods_and_frees_a_killed_pods_slots() {
    let redis = Redis::start();
    let pods = start_pods(&redis.url(), 3, CAP_ENV);
    let cookie = dev_login(&pods[0], "capped", ORG).await;
    let mut held = Vec::new();
    for pod in &pods {
        held.push(open_welcomed(pod.addr(), &cookie).await.0);
    }
    for (i, pod) in pods.iter().enumerate() {
        let mut fourth = connect(pod.addr(), Some(ORIGIN), Some(&cookie))
            .await
            .unwrap_or_else(|r| panic!("handshake refused before upgrade: {r:?}"));
        assert_close(
            fourth.expect_only_close(T).await,
            4429,
            "too many connections (limit 3)",
            &format!("a fourth socket on pod {i} with three open across pods"),
        );
    }

    kill(pods[2].pid(), "KILL");
    let killed_at = Instant::now();
    let margin = Duration::from_secs(3);
    let admitted_after = loop {
        let mut ws = connect(pods[0].addr(), Some(ORIGIN), Some(&cookie))
            .await
            .unwrap_or_else(|r| panic!("handshake refused before upgrade: {r:?}"));
        match ws.recv(T).await {
            Some(Frame::Json(v, _)) if v["type"] == "welcome" => break killed_at.elapsed(),
            Some(Frame::Close(4429, _)) => {}
            other => panic!("while waiting for the killed pod's slot: {other:?}"),
        }
        assert!(
            killed_at.elapsed() < CAP_LEASE + margin,
            "the SIGKILLed pod's slot was not freed within cap_lease_s ({CAP_LEASE:?}) + {margin:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("slot of the killed pod freed after {admitted_after:?}");
    for (i, ws) in held.iter_mut().take(2).enumerate() {
        ws.assert_alive().await;
        assert!(
            ws.recv(Duration::ZERO).await.is_none(),
            "socket {i} got something unexpected"
        );
    }
}

/// Limit 2, a user holds 2 sockets, Redis restarts empty: the pod re-asserts both slots, so a third socket gets 4429; a closed socket's slot is not brought back.
#[actix_web::test]
async fn cap_slots_survive_redis_restarting_empty() {
    let mut redis = Redis::start();
    let mut env: Vec<(&str, &str)> = CAP_ENV
        .iter()
        .copied()
        .filter(|(k, _)| *k != "SWITCHBOARD__LIMITS__MAX_CONNECTIONS_PER_USER")
        .collect();
    env.push(("SWITCHBOARD__LIMITS__MAX_CONNECTIONS_PER_USER", "2"));
    let pods = start_pods(&redis.url(), 1, &env);
    let pod = &pods[0];
    let cookie = dev_login(pod, "holder", ORG).await;
    let mut held = vec![
        open_welcomed(pod.addr(), &cookie).await.0,
        open_welcomed(pod.addr(), &cookie).await.0,
    ];
    let key = format!("sb:caps:{ORG}/holder");
    let slots = |redis: &Redis| -> Vec<(String, f64)> {
        redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query(&mut redis.conn())
            .expect("ZRANGE caps")
    };
    assert_eq!(slots(&redis).len(), 2, "{key} before the outage");

    redis.kill();
    wait_redis_unavailable(pod, Duration::from_secs(6), "Redis killed").await;
    redis.restart();
    wait_ready(pod, Duration::from_secs(12)).await;
    // The lease refresh, every cap_lease_s / 3, is what must put the slots back.
    let deadline = Instant::now() + CAP_LEASE + T;
    while slots(&redis).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "{key} = {:?} {:?} after Redis restarted empty: the pod did not re-assert the slots \
             of its 2 open sockets",
            slots(&redis),
            CAP_LEASE + T
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The login session went with Redis's data too; the open sockets do not depend on it.
    let cookie = dev_login(pod, "holder", ORG).await;
    let mut third = connect(pod.addr(), Some(ORIGIN), Some(&cookie))
        .await
        .unwrap_or_else(|r| panic!("handshake refused before upgrade: {r:?}"));
    assert_close(
        third.expect_only_close(T).await,
        4429,
        "too many connections (limit 2)",
        "a third socket with two open from before Redis restarted empty",
    );

    // Closing one gives its slot back for good: later refreshes re-assert only the open one.
    held.pop().expect("two held").close().await;
    let deadline = Instant::now() + T;
    let lease = loop {
        match slots(&redis).as_slice() {
            [(_, lease)] => break *lease,
            other => assert!(
                Instant::now() < deadline,
                "{key} = {other:?} {T:?} after one of the two sockets closed"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let deadline = Instant::now() + CAP_LEASE + T;
    loop {
        match slots(&redis).as_slice() {
            [(_, later)] if *later > lease => break,
            [_] => assert!(
                Instant::now() < deadline,
                "the open socket's lease was not refreshed within {:?}",
                CAP_LEASE + T
            ),
            other => panic!("{key} = {other:?} after a refresh, expected only the open socket"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut second, _) = open_welcomed(pod.addr(), &cookie).await;
    second.assert_alive().await;
    held[0].assert_alive().await;
}

/// Limit 3 with evict_oldest: a fourth socket on pod B is admitted and the oldest, on pod A, is closed with 4409.
#[actix_web::test]
async fn evict_oldest_closes_the_oldest_socket_on_another_pod() {
    let redis = Redis::start();
    let mut env = CAP_ENV.to_vec();
    env.push(("SWITCHBOARD__LIMITS__CAP_POLICY", "evict_oldest"));
    let pods = start_pods(&redis.url(), 3, &env);
    let cookie = dev_login(&pods[0], "evicted", ORG).await;
    let mut held = Vec::new();
    for pod in &pods {
        held.push(open_welcomed(pod.addr(), &cookie).await.0);
    }
    let (mut newest, _) = open_welcomed(pods[1].addr(), &cookie).await;
    assert_close(
        held[0].expect_close(T).await,
        4409,
        "replaced by a newer connection",
        "the oldest socket (pod A) when a fourth opened on pod B",
    );
    for ws in held.iter_mut().skip(1) {
        ws.assert_alive().await;
    }
    newest.assert_alive().await;
}

// ---------------------------------------------------------------------------------------------
// history and resume
// ---------------------------------------------------------------------------------------------

/// Ten events published on pod A; a client on pod B subscribing with since = the 3rd id gets exactly events 4..10 in order, then live ones.
#[actix_web::test]
async fn since_replays_missed_events_on_another_pod_then_live_ones() {
    let redis = Redis::start();
    let pods = start_pods(&redis.url(), 2, &[]);
    let mut ids = Vec::new();
    for n in 1..=10 {
        ids.push(publish_ok(&pods[0], ORG, TOPIC, "call.status", json!({"n": n})).await);
    }
    for pair in ids.windows(2) {
        assert!(
            parse_event_id(&pair[0]) < parse_event_id(&pair[1]),
            "event ids must increase: {ids:?}"
        );
    }
    let (mut ws, _, _) = connect_user(&pods[1], "late", ORG).await;
    let reply = ws
        .request(&json!({"type": "subscribe", "topic": TOPIC, "since": ids[2]}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "subscribed", "topic": TOPIC, "recovered": true}),
        "resume within history"
    );
    for (n, id) in ids.iter().enumerate().skip(3) {
        let ev = next_event(&mut ws, TOPIC, "replay").await;
        assert_eq!(ev["id"], id.as_str(), "replayed event {}: {ev}", n + 1);
        assert_eq!(ev["data"], json!({"n": n + 1}), "{ev}");
        assert_eq!(ev["event"], "call.status", "{ev}");
    }
    for n in 11..=12 {
        let id = publish_ok(&pods[0], ORG, TOPIC, "call.status", json!({"n": n})).await;
        let ev = next_event(&mut ws, TOPIC, "live after replay").await;
        assert_eq!(
            ev["id"],
            id.as_str(),
            "live event {n} right after the replay: {ev}"
        );
    }
    ws.expect_silence(Duration::from_millis(300)).await;
}

/// history.max_len = 5: resuming from an event that was trimmed says recovered:false; from one still kept, recovered:true with the rest.
#[actix_web::test]
async fn since_older_than_history_reports_recovered_false() {
    let redis = Redis::start();
    let pods = start_pods(&redis.url(), 2, &[("SWITCHBOARD__HISTORY__MAX_LEN", "5")]);
    let mut ids = Vec::new();
    for n in 1..=10 {
        ids.push(publish_ok(&pods[0], ORG, TOPIC, "call.status", json!({"n": n})).await);
    }
    let (mut old, _, cookie) = connect_user(&pods[1], "old", ORG).await;
    let reply = old
        .request(&json!({"type": "subscribe", "topic": TOPIC, "since": ids[1]}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(
        reply["recovered"], false,
        "since = event 2 of 10 with history.max_len = 5 must tell the client to reload: {reply}"
    );

    let mut recent = ws_open(&pods[1], Some(ORIGIN), Some(&cookie)).await;
    assert_eq!(recent.next_json(T).await["type"], "welcome");
    let reply = recent
        .request(&json!({"type": "subscribe", "topic": TOPIC, "since": ids[6]}))
        .await;
    assert_eq!(
        reply["recovered"], true,
        "since = event 7 of 10, within the last 5: {reply}"
    );
    for id in &ids[7..] {
        assert_eq!(
            next_event(&mut recent, TOPIC, "replay").await["id"],
            id.as_str()
        );
    }
}

/// Events flow continuously; a client drops mid-stream and resumes on another pod with since: it ends with every event exactly once, in order.
#[actix_web::test]
async fn reconnect_to_another_pod_mid_stream_loses_and_repeats_nothing() {
    let redis = Redis::start();
    let pods = start_pods(&redis.url(), 2, &[]);
    let cookie = dev_login(&pods[0], "mover", ORG).await;
    let (mut first, _) = open_welcomed(pods[0].addr(), &cookie).await;
    first.subscribe(TOPIC).await;
    redis.wait_numsub(CHANNEL, 1, T).await;

    let mut publisher =
        Publisher::start(&pods[0].base_url(), ORG, TOPIC, Duration::from_millis(10));
    let mut got: Vec<String> = Vec::new();
    while got.len() < 15 {
        let v = first.next_json(T).await;
        got.push(
            event_id(&v, TOPIC)
                .unwrap_or_else(|| panic!("expected an event: {v}"))
                .to_string(),
        );
    }
    drop(first); // the tab vanishes: no close frame
    let seen = publisher.count();
    publisher.wait_count(seen + 15, T).await; // events keep coming while it is away

    let (mut second, _) = open_welcomed(pods[1].addr(), &cookie).await;
    let reply = second
        .request(&json!({"type": "subscribe", "topic": TOPIC, "since": got.last()}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}");
    let resumed_at = publisher.count();
    publisher.wait_count(resumed_at + 15, T).await; // and while it replays
    let published = publisher.stop().await;
    assert!(
        publisher.refused.borrow().is_empty(),
        "refused publishes: {:?}",
        publisher.refused.borrow()
    );
    let last = published.last().expect("published something").clone();
    while got.last() != Some(&last) {
        match second.recv(T).await {
            Some(Frame::Json(v, _)) if event_id(&v, TOPIC).is_some() => {
                got.push(event_id(&v, TOPIC).unwrap_or_default().to_string())
            }
            other => panic!(
                "waiting for the last event {last}: got {other:?}; {}",
                first_difference(&got, &published)
            ),
        }
    }
    assert!(got == published, "{}", first_difference(&got, &published));
}

/// Behind the example nginx, `/metrics` is not served to clients, while the rest of the plain
/// HTTP routes are and the pod itself still answers its scraper.
#[actix_web::test]
async fn nginx_keeps_metrics_internal() {
    let redis = Redis::start();
    let pods = start_pods(&redis.url(), 1, &[]);
    let nginx = Nginx::start(&[pods[0].addr()]);
    for (path, want) in [("/metrics", 403), ("/metrics?x=1", 403), ("/healthz", 200)] {
        let resp = http_at("GET", &nginx.url(path), &[], None)
            .await
            .unwrap_or_else(|e| panic!("GET {path} through nginx: {e}"));
        assert_eq!(resp.status, want, "GET {path} through nginx: {resp}");
    }
    let direct = http_at("GET", &format!("{}/metrics", pods[0].base_url()), &[], None)
        .await
        .expect("GET /metrics from the pod");
    assert_eq!(direct.status, 200, "the pod's own /metrics: {direct}");
}

/// Poll `cond` every 20 ms until it holds; panics naming `what` after `timeout`.
async fn wait_until(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// config/nginx.conf keeps the lines a WebSocket proxy needs, and its /ws read timeout outlasts the default heartbeat timeout so nginx never cuts a live socket.
#[test]
fn nginx_conf_has_the_lines_websockets_need() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let conf = std::fs::read_to_string(root.join("config/nginx.conf")).expect("config/nginx.conf");
    let defaults: toml::Table = std::fs::read_to_string(root.join("config/default.toml"))
        .expect("config/default.toml")
        .parse()
        .expect("default.toml parses");
    let lines: Vec<&str> = conf
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect();
    for wanted in [
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "map $http_upgrade $connection_upgrade {",
        "proxy_set_header Host $host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_buffering off;",
    ] {
        assert!(
            lines.contains(&wanted),
            "config/nginx.conf lacks `{wanted}`"
        );
    }
    let heartbeat_timeout_ms = defaults["heartbeat"]["timeout_ms"]
        .as_integer()
        .expect("heartbeat.timeout_ms") as u64;
    let ws_block = conf
        .split("location /ws")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .expect("a `location /ws` block");
    for directive in ["proxy_read_timeout", "proxy_send_timeout"] {
        let secs: u64 = ws_block
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .find_map(|l| l.strip_prefix(directive))
            .and_then(|v| {
                v.trim()
                    .trim_end_matches(';')
                    .trim_end_matches('s')
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("location /ws has no `{directive} <N>s;`"));
        assert!(
            secs * 1000 > heartbeat_timeout_ms,
            "{directive} {secs}s in location /ws must be above heartbeat.timeout_ms ({heartbeat_timeout_ms} ms)"
        );
    }
}
