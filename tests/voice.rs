//! Browser-test voice sessions through the hub (issue 14): `switchboard voice-echo` answering
//! streamed audio, embedded (through the hub's API) and clustered (straight from Redis); voice
//! frames never conflated, never kept in history, bounded like every browser event, and a
//! voice reader that falls behind closed 1013 while the others keep getting every frame; and
//! the `/voice-test` page in Chromium with its fake microphone hearing its echo and showing
//! the round trip.
//!
//! The Chromium tests need what tests/dashboard.rs needs (`/usr/bin/chromium`, node and
//! `tests/browser/node_modules`); the clustered ones need `redis-server`. A missing tool fails
//! the test and says how to install it.

mod common;
#[allow(dead_code)]
#[path = "cluster/infra.rs"]
mod infra;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use infra::{start_pods, Redis};
use serde_json::json;

const ORG: &str = "demo";
/// What the echo prints once it listens.
const READY: &str = "voice-echo: ready";
/// Frames a round-trip test sends once the echo answers.
const FRAMES: u32 = 100;

/// One browser at a time (as in tests/dashboard.rs): two Chromiums on a 2-core machine make
/// the page's waits flaky for no gain.
static BROWSER: Mutex<()> = Mutex::new(());

/// `voice-echo` against the embedded hub `hub`.
fn embedded_echo(hub: &Hub) -> Worker {
    Worker::start(&["voice-echo", "--url", &hub.base_url()], &[], READY)
}

/// `voice-echo` on the Redis at `url`.
fn clustered_echo(url: &str) -> Worker {
    Worker::start(&["voice-echo"], &[("REDIS_URL", url)], READY)
}

/// A 20 ms frame as the page makes it: sequence, send time, 320 samples.
fn frame(seq: u32) -> Vec<u8> {
    let mut bytes = seq.to_le_bytes().to_vec();
    bytes.extend_from_slice(&(f64::from(seq) * 20.0).to_le_bytes());
    bytes.extend((0..640).map(|i| (i as u32 ^ seq) as u8));
    bytes
}

/// A socket of `user` in `org` streaming to `voice:<id>:in` and hearing `voice:<id>:out`.
async fn voice_socket(hub: &Hub, user: &str, org: &str, id: &str) -> Ws {
    let (mut ws, _, _) = connect_user(hub, user, org).await;
    let out = format!("voice:{id}:out");
    let reply = ws
        .request(&json!({"type": "subscribe", "topic": out, "binary": true}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    ws.send_json(&json!({"type": "stream", "topic": format!("voice:{id}:in")}))
        .await;
    ws
}

/// Send frames until the echo answers one (it joins a session on its first frame or
/// announcement, so the first few may go unheard), then `FRAMES` more: each must come back
/// byte for byte, in order.
async fn assert_echoed(ws: &mut Ws, announce: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seq = 0u32;
    loop {
        if let Some(id) = announce {
            ws.send_json(&json!({"type": "publish", "topic": "voice:lobby:in",
                "event": "voice.session", "data": {"session": id}}))
                .await;
        }
        ws.send_binary(&frame(seq)).await;
        seq += 1;
        match ws.recv(Duration::from_millis(200)).await {
            Some(Frame::Binary(_)) => break,
            None | Some(Frame::Json(..)) => {}
            Some(other) => panic!("waiting for the first echo: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "no frame came back within 15 s ({seq} sent)"
        );
    }
    // Drain echoes of the warm-up frames still on their way.
    while let Some(Frame::Binary(_)) = ws.recv(Duration::from_millis(300)).await {}
    let first = seq;
    for n in first..first + FRAMES {
        ws.send_binary(&frame(n)).await;
    }
    for n in first..first + FRAMES {
        let back = ws.next_binary(T).await;
        assert!(
            back == frame(n),
            "frame {n} came back as a different frame (seq {:?})",
            back.get(..4)
        );
    }
}

/// Embedded: a page's frames on `voice:<id>:in` come back unchanged and in order on
/// `voice:<id>:out` once it announced its session on the lobby.
#[actix_web::test]
async fn embedded_echo_returns_every_frame_unchanged() {
    let hub = Hub::start(&[]);
    let echo = embedded_echo(&hub);
    let mut ws = voice_socket(&hub, "u1", ORG, "e1").await;
    assert_echoed(&mut ws, Some("e1")).await;
    assert!(
        echo.logs().contains("session e1 announced"),
        "{}",
        echo.logs()
    );
}

/// Embedded: a session nobody announced is not echoed, and another org's announcement does
/// not reach the echo of org demo.
#[actix_web::test]
async fn embedded_echo_answers_only_announced_sessions_of_its_org() {
    let hub = Hub::start(&[]);
    let _echo = embedded_echo(&hub);
    let mut quiet = voice_socket(&hub, "u1", ORG, "q1").await;
    let mut other = voice_socket(&hub, "u2", "other", "o1").await;
    other
        .send_json(&json!({"type": "publish", "topic": "voice:lobby:in",
            "event": "voice.session", "data": {"session": "o1"}}))
        .await;
    for n in 0..25 {
        quiet.send_binary(&frame(n)).await;
        other.send_binary(&frame(n)).await;
    }
    // Its socket is open and served, and nothing came back meanwhile.
    quiet.assert_alive().await;
    other.expect_silence(Duration::from_secs(1)).await;
    quiet.expect_silence(Duration::from_millis(200)).await;
}

/// Clustered: the echo hears every org's sessions straight from Redis, with no announcement.
#[actix_web::test]
async fn clustered_echo_returns_every_frame_unchanged() {
    let redis = Redis::start();
    let pod = start_pods(&redis.url(), 1, &[]).remove(0);
    let _echo = clustered_echo(&redis.url());
    let mut ws = voice_socket(&pod, "u1", "42", "c1").await;
    assert_echoed(&mut ws, None).await;
}

/// Clustered: streamed frames and binary publishes reach their listeners through Redis but
/// leave no history stream behind, while a JSON event on `calls` does (so the check can see
/// one).
#[actix_web::test]
async fn voice_frames_are_never_kept_in_history() {
    let redis = Redis::start();
    let pod = start_pods(&redis.url(), 1, &[]).remove(0);
    let mut listener = voice_socket(&pod, "u2", "42", "h1").await;
    let reply = listener
        .request(&json!({"type": "subscribe", "topic": "voice:h1:in", "binary": true}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let mut talker = voice_socket(&pod, "u1", "42", "h1").await;
    talker.send_binary(&frame(1)).await;
    assert_eq!(listener.next_binary(T).await, frame(1));
    assert_eq!(
        publish_binary(&pod, "42", "voice:h1:out", &frame(2)).await,
        202
    );
    assert_eq!(listener.next_binary(T).await, frame(2));
    publish_ok(&pod, "42", "calls", "call.status", json!({"call_id": "x"})).await;

    let mut conn = redis.conn();
    let exists = |conn: &mut redis::Connection, key: &str| -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query::<i64>(conn)
            .expect("EXISTS")
            == 1
    };
    assert!(
        exists(&mut conn, "sb:42:calls:log"),
        "a JSON event left no history: the check cannot see one"
    );
    for key in ["sb:42:voice:h1:in:log", "sb:42:voice:h1:out:log"] {
        assert!(!exists(&mut conn, key), "{key} exists: voice was kept");
    }
}

/// `POST /api/publish` with a binary body (how the embedded echo answers).
async fn publish_binary(hub: &Hub, org: &str, topic: &str, bytes: &[u8]) -> u16 {
    let url = hub.url(&format!("/api/publish?org={org}&topic={topic}"));
    let response = client()
        .post(url)
        .bearer_auth(PUBLISH_KEY)
        .content_type("application/octet-stream")
        .send_body(bytes.to_vec())
        .await
        .expect("binary publish");
    response.status().as_u16()
}

/// A streamed frame over `limits.client_event_bytes` is refused `bad_request` and relayed to
/// nobody; the socket stays open and a frame within it is relayed.
#[actix_web::test]
async fn a_voice_frame_over_client_event_bytes_is_refused() {
    let hub = Hub::start(&[("SWITCHBOARD__LIMITS__CLIENT_EVENT_BYTES", "1000")]);
    let mut listener = voice_socket(&hub, "u2", "42", "b1").await;
    let reply = listener
        .request(&json!({"type": "subscribe", "topic": "voice:b1:in", "binary": true}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let mut talker = voice_socket(&hub, "u1", "42", "b1").await;
    talker.send_binary(&[7; 1001]).await;
    let error = talker.next_json(T).await;
    assert_eq!(error["code"], "bad_request", "{error}");
    assert!(
        error["message"].as_str().unwrap_or("").contains("1000"),
        "{error}"
    );
    talker.send_binary(&frame(3)).await;
    assert_eq!(
        listener.next_binary(T).await,
        frame(3),
        "the frame within the limit"
    );
}

/// A voice reader that stops reading is closed 1013 once its queue is full (binary frames
/// cannot be conflated away), after receiving an unbroken prefix of the frames: never a
/// thinned-out subset. A reader that keeps up gets every frame, in order, meanwhile.
#[actix_web::test]
async fn a_voice_reader_that_falls_behind_is_closed_1013_and_others_get_every_frame() {
    let hub = Hub::start(&[("SWITCHBOARD__LIMITS__OUTBOUND_QUEUE", "16")]);
    let cookie = dev_login(&hub, "slow", "42").await;
    let mut opts = WsOpts::new(Some(ORIGIN), Some(&cookie));
    opts.recv_buffer = Some(4096);
    let mut slow = ws_connect_with(&hub, opts)
        .await
        .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.body));
    assert_eq!(slow.next_json(T).await["type"], "welcome");
    let topic = "voice:s1:out";
    let reply = slow
        .request(&json!({"type": "subscribe", "topic": topic, "binary": true}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let mut healthy = voice_socket(&hub, "fast", "42", "s1").await;

    // 400 frames of 60 KB: far more than the slow socket's buffers and queue hold.
    let n = 400u32;
    let big = |seq: u32| {
        let mut bytes = seq.to_le_bytes().to_vec();
        bytes.resize(60_000, (seq % 251) as u8);
        bytes
    };
    for seq in 0..n {
        assert_eq!(publish_binary(&hub, "42", topic, &big(seq)).await, 202);
        // The healthy reader reads as it goes, as a page does.
        assert_eq!(
            healthy.next_binary(T).await,
            big(seq),
            "healthy reader, frame {seq}"
        );
    }

    let (code, reason) = slow.expect_close(Duration::from_secs(30)).await;
    assert_close(
        (code, reason),
        1013,
        "slow consumer",
        "voice reader that stopped reading",
    );
    let got: Vec<u32> = slow
        .skipped
        .iter()
        .filter_map(|f| match f {
            Frame::Binary(b) => Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            _ => None,
        })
        .collect();
    let prefix: Vec<u32> = (0..got.len() as u32).collect();
    assert_eq!(
        got, prefix,
        "the slow reader's frames are not an unbroken prefix"
    );
    assert!(
        (got.len() as u32) < n,
        "the slow reader got all {n} frames: it never fell behind"
    );
    let m = metrics(&hub).await;
    assert!(
        metric_value(&m, "switchboard_slow_consumer_disconnects_total") >= 1.0,
        "not counted:\n{m}"
    );
    healthy.assert_alive().await;
}

// ---- the page in Chromium ----------------------------------------------------------------

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Fails (never skips) when Chromium, node or playwright-core is missing, saying how to
/// install it.
fn require_browser() {
    let mut missing = Vec::new();
    if !Path::new("/usr/bin/chromium").exists() {
        missing.push("Debian's Chromium: apt-get install -y chromium");
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("Node.js: apt-get install -y nodejs npm");
    }
    if !browser_dir()
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing.push("playwright-core: npm ci --prefix tests/browser");
    }
    assert!(
        missing.is_empty(),
        "cannot run the voice page test; install: {missing:?}"
    );
}

/// Run `node tests/browser/voice.mjs <base> echo`; panics with its output (and the hub's and
/// the echo's) unless it passes. Returns its output.
fn run_page(hub: &Hub, echo: &Worker) -> String {
    require_browser();
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("voice-echo");
    // The page is opened as localhost: an origin the development policy admits.
    let base = format!("http://localhost:{}", hub.addr().port());
    let mut child = Command::new("node")
        .arg(browser_dir().join("voice.mjs"))
        .args([base.as_str(), "echo"])
        .arg(&out_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let stderr = child.stderr.take().expect("piped stderr");
    let errors = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let mut text = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let Ok(line) = line else { break };
        text.push_str(&line);
        text.push('\n');
    }
    // The script bounds itself at 60 s; its stdout closing means it is done.
    let status = wait_child(&mut child, Duration::from_secs(30));
    if status.is_none() {
        terminate(&mut child, Duration::from_secs(5));
    }
    text.push_str(&errors.join().unwrap_or_default());
    assert!(
        status.is_some_and(|s| s.success()) && text.contains("PASS voice echo"),
        "the voice page did not hear its echo ({status:?}):\n{text}\n--- hub ---\n{}\n--- echo ---\n{}\n(screenshots in {})",
        hub.logs(),
        echo.logs(),
        out_dir.display()
    );
    eprintln!("{text}");
    text
}

/// Embedded, as `cargo run` gives it: the page in Chromium with the fake microphone signs in,
/// starts the test, hears its audio come back through the echo and shows the round trip
/// p50/p95.
#[test]
fn the_voice_page_hears_its_echo_embedded() {
    let hub = Hub::start(&[]);
    let echo = embedded_echo(&hub);
    let text = run_page(&hub, &echo);
    assert!(text.contains("RTT p50"), "{text}");
}

/// Clustered: the same page on a pod, answered by the echo listening on Redis.
#[test]
fn the_voice_page_hears_its_echo_clustered() {
    let redis = Redis::start();
    let pod = start_pods(&redis.url(), 1, &[]).remove(0);
    let echo = clustered_echo(&redis.url());
    run_page(&pod, &echo);
}
