//! The scenarios of this suite that matter most, again on a real Redis Cluster (three masters
//! with one replica each, `redis.cluster_urls`) instead of one Redis: publish and delivery
//! across pods over sharded pub/sub, a backend's own SPUBLISH, `since` replay from history on
//! another pod, logout and caps across pods. The rest of the suite runs on one Redis only, to
//! keep the run short; the failover under traffic is in `faults`.

use std::time::Duration;

use serde_json::json;

use crate::client::connect;
use crate::common::*;
use crate::infra::wait_pod_ready;
use crate::{logout_closes, next_event, subscribed_user, wait_ready, ORG, TOPIC};

/// The channel of `ORG`'s `TOPIC` on a Redis Cluster: the org in braces, its hash tag.
pub const CLUSTER_CHANNEL: &str = "sb:{42}:calls";

/// Start `n` pods on `cluster` (seed nodes in `redis.cluster_urls`), each with `env` on top of
/// the common test environment, and wait until every one is ready.
pub fn start_cluster_pods(cluster: &RedisCluster, n: usize, env: &[(&str, &str)]) -> Vec<Hub> {
    let seeds = cluster.urls_env();
    let mut all: Vec<(&str, &str)> = vec![
        ("SWITCHBOARD__REDIS__CLUSTER_URLS", &seeds),
        ("REDIS_URL", UNSET),
    ];
    all.extend_from_slice(env);
    let pods: Vec<Hub> = (0..n).map(|_| Hub::start(&all)).collect();
    for pod in &pods {
        wait_pod_ready(pod);
    }
    pods
}

/// On a Redis Cluster, an event published through one pod reaches subscribed sockets on every pod and no other org, and is kept in its org's hash-tagged stream; a backend's SPUBLISH to the tagged channel reaches them too.
#[actix_web::test]
async fn publish_reaches_every_pod_over_redis_cluster() {
    let cluster = RedisCluster::start();
    let pods = start_cluster_pods(&cluster, 3, &[]);
    let mut sockets = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        sockets.push(subscribed_user(pod, &format!("u{i}"), ORG).await);
    }
    let mut other_org = subscribed_user(&pods[0], "stranger", "7").await;

    let id = publish_ok(&pods[1], ORG, TOPIC, "call.status", json!({"n": 1})).await;
    for (i, ws) in sockets.iter_mut().enumerate() {
        let ev = next_event(ws, TOPIC, &format!("socket on pod {i}")).await;
        assert_eq!(ev["id"], id.as_str(), "pod {i}: {ev}");
        assert_eq!(ev["data"]["n"], 1, "pod {i}: {ev}");
    }
    let kept: usize = redis::cmd("XLEN")
        .arg(format!("{CLUSTER_CHANNEL}:log"))
        .query(&mut cluster.conn())
        .expect("XLEN");
    assert_eq!(kept, 1, "history lives in the org's tagged stream");

    let payload = json!({"event": "call.status", "data": {"n": 2}}).to_string();
    let receivers: u64 = redis::cmd("SPUBLISH")
        .arg(CLUSTER_CHANNEL)
        .arg(payload)
        .query(&mut cluster.conn())
        .expect("SPUBLISH");
    assert_eq!(receivers, 3, "one sharded subscriber per pod");
    for (i, ws) in sockets.iter_mut().enumerate() {
        let ev = next_event(ws, TOPIC, &format!("socket on pod {i}")).await;
        assert_eq!(ev["data"]["n"], 2, "a backend's SPUBLISH, pod {i}: {ev}");
    }
    other_org.expect_silence(Duration::from_millis(300)).await;
}

/// On a Redis Cluster, the slot of a topic's channel moved to another master while sockets on two pods follow it: the shard that gave it up unsubscribes the pods, they subscribe on the new owner, and every event published after the move reaches every socket, the sockets never closed.
#[actix_web::test]
async fn a_slot_moved_to_another_master_keeps_delivering() {
    let cluster = RedisCluster::start();
    let pods = start_cluster_pods(&cluster, 2, &[]);
    let mut sockets = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        sockets.push(subscribed_user(pod, &format!("u{i}"), ORG).await);
    }
    let before = publish_ok(&pods[0], ORG, TOPIC, "call.status", json!({"n": 0})).await;
    for ws in &mut sockets {
        assert_eq!(
            next_event(ws, TOPIC, "before the move").await["id"],
            before.as_str()
        );
    }

    cluster.move_slot_of(CLUSTER_CHANNEL);
    for pod in &pods {
        wait_ready(pod, Duration::from_secs(10)).await;
    }
    let mut after = Vec::new();
    for n in 1..=5 {
        after.push(publish_ok(&pods[n % 2], ORG, TOPIC, "call.status", json!({"n": n})).await);
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        for id in &after {
            let ev = next_event(ws, TOPIC, &format!("after the move, pod {i}")).await;
            assert_eq!(ev["id"], id.as_str(), "pod {i}: {ev}");
        }
    }
}

/// On a Redis Cluster, a client resuming on another pod with `since` gets what it missed from history, recovered, then live events.
#[actix_web::test]
async fn since_replays_on_another_pod_over_redis_cluster() {
    let cluster = RedisCluster::start();
    let pods = start_cluster_pods(&cluster, 2, &[]);
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(publish_ok(&pods[0], ORG, TOPIC, "call.status", json!({"n": n})).await);
    }
    let (mut ws, _, _) = connect_user(&pods[1], "late", ORG).await;
    let reply = ws
        .request(&json!({"type": "subscribe", "topic": TOPIC, "since": ids[0]}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}");
    for id in &ids[1..] {
        assert_eq!(
            next_event(&mut ws, TOPIC, "replay").await["id"],
            id.as_str()
        );
    }
    let live = publish_ok(&pods[0], ORG, TOPIC, "call.status", json!({"n": 4})).await;
    assert_eq!(
        next_event(&mut ws, TOPIC, "live").await["id"],
        live.as_str()
    );
}

/// On a Redis Cluster, a login made on one pod opens sockets on another; logging out closes them with 4401, and a user's connection cap counts sockets on every pod.
#[actix_web::test]
async fn logout_and_caps_across_pods_over_redis_cluster() {
    let cluster = RedisCluster::start();
    let pods = start_cluster_pods(
        &cluster,
        2,
        &[("SWITCHBOARD__LIMITS__MAX_CONNECTIONS_PER_USER", "2")],
    );
    let cookie = dev_login(&pods[0], "alice", ORG).await;
    let mut held = Vec::new();
    for pod in &pods {
        let mut ws = ws_open(pod, Some(ORIGIN), Some(&cookie)).await;
        assert_eq!(ws.next_json(T).await["type"], "welcome");
        held.push(ws);
    }
    let mut third = connect(pods[1].addr(), Some(ORIGIN), Some(&cookie))
        .await
        .unwrap_or_else(|r| panic!("handshake refused before upgrade: {r:?}"));
    assert_close(
        third.expect_only_close(T).await,
        4429,
        "too many connections (limit 2)",
        "a third socket with two open across pods",
    );

    logout_closes(&pods[0], &cookie, &mut held, 0).await;
}
