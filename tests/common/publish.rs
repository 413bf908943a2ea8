//! Publishing events through `POST /api/publish`: with the test key and a JSON event
//! (`publish`, `publish_ok` insisting on 202), or with any body and key (`publish_raw`); the
//! `_with` forms reuse a caller's client.

use serde_json::{json, Value};

use super::http::{client, http_with, HttpResp};
use super::process::Hub;
use super::PUBLISH_KEY;

/// `POST /api/publish` with the test key; returns status and JSON body (Null if not JSON).
pub async fn publish(hub: &Hub, org: &str, topic: &str, event: &str, data: Value) -> (u16, Value) {
    publish_with(&client(), hub, org, topic, event, data).await
}

pub async fn publish_with(
    client: &awc::Client,
    hub: &Hub,
    org: &str,
    topic: &str,
    event: &str,
    data: Value,
) -> (u16, Value) {
    let body = json!({"org": org, "topic": topic, "event": event, "data": data});
    let resp = publish_raw_with(client, hub, Some(PUBLISH_KEY), &body.to_string(), &[]).await;
    (resp.status, resp.json_or_null())
}

/// Publish and insist on 202; returns the event id.
pub async fn publish_ok(hub: &Hub, org: &str, topic: &str, event: &str, data: Value) -> String {
    let (status, body) = publish(hub, org, topic, event, data).await;
    assert_eq!(status, 202, "publish to {org}/{topic}: {body}");
    body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("publish answer has no string id: {body}"))
        .to_string()
}

/// `POST /api/publish` with an arbitrary body and key (None: no Authorization header).
pub async fn publish_raw(
    hub: &Hub,
    key: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> HttpResp {
    publish_raw_with(&client(), hub, key, body, headers).await
}

pub async fn publish_raw_with(
    client: &awc::Client,
    hub: &Hub,
    key: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> HttpResp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut all: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        all.push(("authorization", a));
    }
    all.extend_from_slice(headers);
    http_with(
        client,
        hub,
        "POST",
        "/api/publish",
        &all,
        Some(body.as_bytes()),
    )
    .await
}
