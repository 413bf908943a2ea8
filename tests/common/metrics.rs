//! Reading `/metrics`: fetching the text, picking one sample's value out of it, and polling
//! until a sample reaches a value.

use std::time::{Duration, Instant};

use super::http::get;
use super::process::Hub;

pub async fn metrics(hub: &Hub) -> String {
    let resp = get(hub, "/metrics").await;
    assert_eq!(resp.status, 200, "/metrics: {resp}");
    resp.text()
}

/// The value of the sample `name_with_labels` (e.g. `switchboard_x_total{reason="y"}`).
pub fn metric(text: &str, name_with_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name_with_labels)?;
        let rest = rest.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Like `metric`, with an absent sample read as 0.
pub fn metric_value(text: &str, name_with_labels: &str) -> f64 {
    metric(text, name_with_labels).unwrap_or(0.0)
}

/// Poll `/metrics` every 50 ms until `pred(value)` holds; returns the last value and whether
/// it held within `timeout`.
pub async fn wait_metric(
    hub: &Hub,
    name_with_labels: &str,
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
) -> (f64, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric_value(&metrics(hub).await, name_with_labels);
        if pred(v) {
            return (v, true);
        }
        if Instant::now() >= deadline {
            return (v, false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
