//! The loops that drive the [`CallSimulator`]: inside the hub for `demo.simulate_calls`
//! (straight into the broker, org `demo`), and `switchboard simulate`, which publishes through
//! a running hub's `POST /api/publish` exactly as a backend service would.

use std::time::Duration;

use serde_json::json;

use super::simulator::{CallSimulator, SimulatedEvent};
use crate::broker::BrokerHandle;
use crate::core::event::{PublishBody, PublishRequest};
use crate::core::ids::{unix_ms, InvalidId, OrgId, Topic};

/// How often the simulator is advanced.
const TICK: Duration = Duration::from_millis(250);

/// The org whose board the in-hub simulator feeds.
pub(crate) const DEMO_ORG: &str = "demo";

/// Publish simulated calls for org `demo` until the process ends.
pub(crate) async fn run_in_hub(broker: BrokerHandle) {
    // unwrap: a constant, valid org id.
    let org = OrgId::parse(DEMO_ORG).unwrap();
    let mut simulator = CallSimulator::new(12.0, 30, unix_ms());
    let mut ticker = tokio::time::interval(TICK);
    log::info!("demo: simulating calls for org {DEMO_ORG} (demo.simulate_calls = true)");
    loop {
        ticker.tick().await;
        for event in simulator.advance(unix_ms()) {
            let Some(request) = request(&org, event) else {
                continue;
            };
            if let Err(e) = broker.publish(request).await {
                log::debug!("demo: event not published: {e}");
            }
        }
    }
}

fn request(org: &OrgId, event: SimulatedEvent) -> Option<PublishRequest> {
    Some(PublishRequest {
        org: org.clone(),
        topic: Topic::parse(&event.topic).ok()?,
        body: PublishBody::Json {
            event: event.event,
            data: event.data,
        },
        sender: None,
    })
}

/// Options of `switchboard simulate`.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Base URL of the hub, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub key: String,
    pub org: String,
    pub calls_per_minute: f64,
    pub agents: usize,
    /// Stop after this long; None runs until interrupted.
    pub duration: Option<Duration>,
}

/// Why `switchboard simulate` gave up: carrying on would be pointless.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("--org: {0}")]
    BadOrg(#[from] InvalidId),
    /// The hub refused an event for a reason that every event will meet (bad key, bad org).
    #[error("{endpoint} answered {status}: {body}")]
    Refused {
        endpoint: String,
        status: u16,
        body: String,
    },
}

/// Publish simulated calls through a hub's HTTP API. Returns how many events were accepted,
/// or the first refusal that means carrying on is pointless (bad key, bad org).
pub async fn run_remote(options: RemoteOptions) -> Result<u64, SimulateError> {
    OrgId::parse(&options.org)?;
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(5))
        .finish();
    let endpoint = format!("{}/api/publish", options.url.trim_end_matches('/'));
    let mut simulator = CallSimulator::new(options.calls_per_minute, options.agents, unix_ms());
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(TICK);
    let mut accepted = 0u64;
    loop {
        ticker.tick().await;
        if options.duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(accepted);
        }
        for event in simulator.advance(unix_ms()) {
            let body = json!({"org": options.org, "topic": event.topic, "event": event.event, "data": event.data});
            let response = client
                .post(&endpoint)
                .bearer_auth(&options.key)
                .send_json(&body)
                .await;
            match response {
                Ok(r) if r.status().as_u16() == 202 => accepted += 1,
                Ok(mut r) if matches!(r.status().as_u16(), 400 | 401 | 403) => {
                    let text = r.body().await.unwrap_or_default();
                    return Err(SimulateError::Refused {
                        endpoint,
                        status: r.status().as_u16(),
                        body: String::from_utf8_lossy(&text).into_owned(),
                    });
                }
                Ok(r) => eprintln!("simulate: {endpoint} answered {}; carrying on", r.status()),
                Err(e) => eprintln!("simulate: {endpoint}: {e}; carrying on"),
            }
        }
    }
}
