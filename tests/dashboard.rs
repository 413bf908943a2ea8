//! The live call dashboard (`GET /`) in a real browser: Debian's Chromium driven by
//! playwright-core through `tests/browser/dashboard.mjs`, against a hub started here.
//!
//! - `dashboard_login_and_live_calls`: the page is refused 4401, shows the dev login, signs in,
//!   turns `open`, shows the demo simulator's calls, and follows a call published through
//!   `POST /api/publish` from queued to ended; Sign out brings the login back (4401 logged out).
//!   Each refusal is also said in plain words with its fix (`#status-help`), announced by the
//!   polite live region `#announce`, and the sign-in field takes the keyboard focus.
//!   Signed in, the client imported as an ES module (`/client.mjs`) with a WebSocket URL that
//!   always fails before `open` falls back to `GET /sse` and receives a published event there.
//! - `dashboard_shows_why_its_origin_is_refused`: from an origin the hub does not admit, the page
//!   says `origin not allowed: <origin>` (the 4403 reason), not a bare 1006, and in plain words
//!   "This page's origin http://127.0.0.1:PORT is not allowed by the hub: open it as
//!   http://localhost:PORT or ask the operator to add it.", announced, without showing the
//!   allowlist, and no Reconnect button (a refusal is final); Tab reaches the page's controls
//!   with a visible focus ring.
//!
//! - `dashboard_over_sse_behind_a_proxy_that_strips_upgrade`: the page opened through an nginx
//!   whose `/ws` location does not pass `Upgrade`/`Connection` on (so every socket fails
//!   before `open`) signs in, says it is connected over the fallback, and shows a call
//!   published through `POST /api/publish`, all over `GET /sse`.
//! - `dashboard_catches_up_after_its_pod_drains_and_restarts` / `..._is_killed_and_restarted`:
//!   clustered (two pods sharing a real redis-server behind nginx from `config/nginx.conf`,
//!   started by the cluster suite's harness), the pod holding the page's socket is SIGTERMed
//!   (drain, as in every deploy) or SIGKILLed (a crash), then started again on its port. The
//!   page says `reconnecting`; calls published while it is away reach it once it reconnects
//!   (`since` = its last event, `recovered: true`), every event id once and in order.
//!
//! Needs `/usr/bin/chromium` (`apt-get install -y chromium`; `.ci/run` installs it) and
//! `tests/browser/node_modules` (`npm ci --prefix tests/browser`; `scripts/test.sh` runs it).
//! Without them these tests fail and say so; they never skip. Screenshots land in
//! `target/tmp/dashboard-<scenario>/`.

mod common;
// The cluster suite's harness (redis-server, pods, nginx from config/nginx.conf), shared
// rather than copied; this crate uses part of it.
#[allow(dead_code)]
#[path = "cluster/infra.rs"]
mod infra;

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::{terminate, Hub, Nginx, PUBLISH_KEY, T};
use infra::{kill, start_pod_on, start_pods, Redis};

const CHROMIUM: &str = "/usr/bin/chromium";
/// Backstop for one run of the browser script (which bounds itself at 60 s).
const NODE_TIMEOUT: Duration = Duration::from_secs(90);

/// One browser at a time: two Chromiums plus two hubs on a 2-core machine make the waits
/// in the page flaky for no gain.
static BROWSER: Mutex<()> = Mutex::new(());

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Fails (never skips) when a tool the browser test needs is not installed, saying how to
/// install it.
fn require_tools() {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push(format!(
            "Debian's Chromium at {CHROMIUM}: apt-get update && apt-get install -y chromium"
        ));
    }
    let node_ok = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !node_ok {
        missing.push("Node.js (`node` on PATH): apt-get install -y nodejs npm".to_string());
    }
    if !browser_dir()
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing.push(
            "playwright-core in tests/browser/node_modules: npm ci --prefix tests/browser \
             (scripts/test.sh does this when the folder is missing)"
                .to_string(),
        );
    }
    assert!(
        missing.is_empty(),
        "the dashboard browser test cannot run; install:\n  - {}",
        missing.join("\n  - ")
    );
}

/// Collects a pipe's text on a thread; lines `ACTION <words>` also go to `actions` as
/// `<words>`.
fn collect<R: Read + Send + 'static>(
    pipe: R,
    into: Arc<Mutex<String>>,
    actions: Option<mpsc::Sender<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let (Some(actions), Some(words)) = (&actions, line.strip_prefix("ACTION ")) {
                let _ = actions.send(words.to_string());
            }
            let mut all = into.lock().unwrap();
            all.push_str(&line);
            all.push('\n');
        }
    })
}

/// Run `node tests/browser/dashboard.mjs <hub> <scenario> <out dir>`; panics with its output
/// (and the hub's) unless it exits 0 and reports PASS. Returns the screenshot directory.
fn run_browser(hub: &Hub, scenario: &str) -> PathBuf {
    run_browser_with(hub, scenario, &[])
}

/// [`run_browser`] with extra environment for the script.
fn run_browser_with(hub: &Hub, scenario: &str, env: &[(&str, &str)]) -> PathBuf {
    run_browser_at(hub, &hub.base_url(), scenario, env)
}

/// [`run_browser_with`] opening the page at `base` (a proxy in front of `hub`) instead of
/// the hub itself.
fn run_browser_at(hub: &Hub, base: &str, scenario: &str, env: &[(&str, &str)]) -> PathBuf {
    let logs = || format!("--- hub {} output ---\n{}", hub.name(), hub.logs());
    run_browser_driving(base, scenario, env, &logs, &mut |action| {
        panic!("scenario {scenario:?} asked for {action:?}, which this test does not do")
    })
}

/// Run the browser script on the page at `base`. When the script prints `ACTION <words>`
/// (it needs something done outside the browser, such as a pod stopped, before it goes on),
/// `on_action` does it with those words and the script is told `DONE` on its stdin. On
/// failure the panic shows the script's output and `logs()` (the hubs' output).
fn run_browser_driving(
    base: &str,
    scenario: &str,
    env: &[(&str, &str)],
    logs: &dyn Fn() -> String,
    on_action: &mut dyn FnMut(&str),
) -> PathBuf {
    let _one_browser = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dashboard-{scenario}"));
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).expect("create the screenshot directory");

    let mut child = Command::new("node")
        .arg(browser_dir().join("dashboard.mjs"))
        .arg(base)
        .arg(scenario)
        .arg(&out_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("SB_PUBLISH_KEY", PUBLISH_KEY)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let output = Arc::new(Mutex::new(String::new()));
    let (actions, asked) = mpsc::channel::<String>();
    let readers = [
        collect(
            child.stdout.take().expect("piped stdout"),
            output.clone(),
            Some(actions),
        ),
        collect(
            child.stderr.take().expect("piped stderr"),
            output.clone(),
            None,
        ),
    ];

    let deadline = Instant::now() + NODE_TIMEOUT;
    let status = loop {
        if let Ok(action) = asked.recv_timeout(Duration::from_millis(50)) {
            on_action(&action);
            // A script that died meanwhile no longer reads: its exit status says why.
            let _ = writeln!(stdin, "DONE").and_then(|()| stdin.flush());
            continue;
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            terminate(&mut child, Duration::from_secs(5));
            break None;
        }
    };
    // Let the reader threads take what is left in the pipes (bounded: a stray grandchild
    // could hold them open).
    let drained = Instant::now() + Duration::from_secs(2);
    while Instant::now() < drained && !readers.iter().all(|r| r.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = output.lock().unwrap().clone();
    let passed =
        status.is_some_and(|s| s.success()) && text.contains(&format!("PASS dashboard {scenario}"));
    if !passed {
        let how = match status {
            Some(s) => format!("exited with {s}"),
            None => format!("was still running after {NODE_TIMEOUT:?} and was stopped"),
        };
        panic!(
            "browser scenario {scenario:?} failed: node tests/browser/dashboard.mjs {how}\n\
             --- browser test output ---\n{text}\n{}\n(screenshots in {})",
            logs(),
            out_dir.display()
        );
    }
    eprintln!("{text}");
    out_dir
}

/// The demo hub a developer gets from `cargo run`, seen in Chromium: refused 4401, dev login,
/// `open`, the simulator's calls, and a published call moving queued → ringing → in-progress
/// → ended in its row.
#[test]
fn dashboard_login_and_live_calls() {
    require_tools();
    let hub = Hub::start(&[("SWITCHBOARD__DEMO__SIMULATE_CALLS", "true")]);
    let out = run_browser(&hub, "login");
    for shot in ["dashboard-refused.png", "dashboard-login.png"] {
        assert!(
            out.join(shot).is_file(),
            "no screenshot {} after a passing run",
            out.join(shot).display()
        );
    }
}

/// A page whose own origin the hub does not admit tells its user why: `#status-detail` shows
/// `origin not allowed: http://127.0.0.1:PORT`, `#status-help` says it in plain words with the
/// fix (open it as http://localhost:PORT or ask the operator), the live region announces it,
/// the allowlist entry appears nowhere on the page, and the hub logs the refusal with that origin.
#[test]
fn dashboard_shows_why_its_origin_is_refused() {
    require_tools();
    const ALLOWED: &str = "https://board.allowed.example";
    let hub = Hub::start(&[
        ("SWITCHBOARD__ORIGINS__ALLOW_LOCALHOST", "false"),
        ("SWITCHBOARD__ORIGINS__ALLOWED", ALLOWED),
    ]);
    // The script checks the page never shows this entry.
    run_browser_with(&hub, "origin", &[("SB_ALLOWED_ORIGIN", ALLOWED)]);
    let origin = hub.base_url();
    let want = format!("origin not allowed: {origin}");
    assert!(
        hub.wait_for_log(T, |l| l.contains("WARN") && l.contains(&want))
            .is_some(),
        "the hub did not log a WARN with {want:?}; output:\n{}",
        hub.logs()
    );
}

/// An nginx in front of `hub` whose `/ws` location behaves like a proxy that strips the
/// WebSocket upgrade: `Upgrade` and `Connection` are not passed on (and nginx speaks HTTP/1.0
/// to the hub there), so the hub sees a plain GET and answers 426. Everything else is proxied
/// as it is, `/sse` unbuffered so events are not held back.
fn nginx_stripping_upgrade(hub: &Hub) -> Nginx {
    const CONF: &str = r#"worker_processes 1;
error_log /dev/stderr warn;
events { worker_connections 64; }
http {
    client_body_temp_path @DIR@/tmp/body; proxy_temp_path @DIR@/tmp/proxy;
    fastcgi_temp_path @DIR@/tmp/fastcgi; uwsgi_temp_path @DIR@/tmp/uwsgi;
    scgi_temp_path @DIR@/tmp/scgi;
    access_log /dev/stdout;
    server {
        listen 127.0.0.1:@PORT@;
        proxy_set_header Host $http_host;
        location /ws {
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade "";
            proxy_set_header Connection "";
            proxy_pass http://@HUB@;
        }
        location /sse {
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_pass http://@HUB@;
        }
        location / { proxy_pass http://@HUB@; }
    }
}
"#;
    let upstream = hub.addr().to_string();
    Nginx::start_with(|port, dir| {
        CONF.replace("@DIR@", &dir.display().to_string())
            .replace("@PORT@", &port.to_string())
            .replace("@HUB@", &upstream)
    })
}

/// Behind a proxy that strips the WebSocket upgrade, the board still works: its sockets fail
/// before `open`, it falls back to `GET /sse`, the dev login signs in through the proxy, the
/// status says `open (fallback)` with the plain-words reason, and a call published through
/// `POST /api/publish` shows on the board within seconds.
#[test]
fn dashboard_over_sse_behind_a_proxy_that_strips_upgrade() {
    require_tools();
    let hub = Hub::start(&[]);
    let nginx = nginx_stripping_upgrade(&hub);
    run_browser_at(&hub, &nginx.url(""), "sse", &[]);
}

/// How the pod under the page goes away in a restart scenario.
#[derive(Clone, Copy)]
enum PodStop {
    /// SIGTERM: the pod drains (`reconnect{after_ms}`, then 1012) and exits 0, as every
    /// rolling deploy does it.
    Drain,
    /// SIGKILL: the pod is gone without a word (a crash, the OOM killer, a lost node, or a
    /// deploy whose drain outlived its grace period); the page sees its socket drop (1006).
    Kill,
}

/// Two pods sharing a real redis-server behind nginx from `config/nginx.conf` (the cluster
/// harness), the board opened through nginx. The script asks for `stop <pod>` (the pod
/// holding the page's socket, which it finds from each pod's `/metrics`) and later
/// `start <pod>` (a new pod on the same port, ready); `stop` answers only once the pod has
/// exited.
fn board_through_a_pod_restart(stop: PodStop, scenario: &str) {
    require_tools();
    let redis = Redis::start();
    let pods = start_pods(&redis.url(), 2, &[]);
    let addrs: Vec<SocketAddr> = pods.iter().map(Hub::addr).collect();
    let nginx = Nginx::start(&addrs);
    let pod_urls: Vec<String> = pods.iter().map(Hub::base_url).collect();
    let pods = RefCell::new(pods);
    let logs = || {
        pods.borrow()
            .iter()
            .map(|pod| format!("--- pod {} output ---\n{}", pod.name(), pod.logs()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut on_action = |action: &str| {
        let (verb, index) = action.split_once(' ').unwrap_or((action, ""));
        let index: usize = index
            .parse()
            .unwrap_or_else(|_| panic!("the script asked for {action:?}: no pod index"));
        let mut pods = pods.borrow_mut();
        match verb {
            "stop" => {
                let pod = &mut pods[index];
                match stop {
                    PodStop::Drain => pod.sigterm(),
                    PodStop::Kill => kill(pod.pid(), "KILL"),
                }
                let exit = pod.wait_exit(Duration::from_secs(15));
                if let PodStop::Drain = stop {
                    assert!(
                        exit.success(),
                        "drained pod {} exited with {exit}",
                        pod.name()
                    );
                }
            }
            "start" => pods[index] = start_pod_on(&redis.url(), addrs[index].port(), &[]),
            _ => panic!("the script asked for {action:?}, which this test does not do"),
        }
    };
    run_browser_driving(
        &nginx.url(""),
        scenario,
        &[("SB_PODS", &pod_urls.join(","))],
        &logs,
        &mut on_action,
    );
}

/// A deploy under the board (clustered, two pods behind nginx): the pod holding the page's
/// socket drains (SIGTERM) and exits; the page says "reconnecting"; calls published meanwhile
/// and after the pod is back all appear once it reconnects (resumed with `since`), every
/// event id once and in order, and live updates go on.
#[test]
fn dashboard_catches_up_after_its_pod_drains_and_restarts() {
    board_through_a_pod_restart(PodStop::Drain, "restart-drain");
}

/// As in a deploy, but the pod under the page is SIGKILLed (a crash): the page's socket
/// drops, it says "reconnecting", and once back it shows every call published meanwhile,
/// every event id once and in order.
#[test]
fn dashboard_catches_up_after_its_pod_is_killed_and_restarted() {
    board_through_a_pod_restart(PodStop::Kill, "restart-kill");
}
