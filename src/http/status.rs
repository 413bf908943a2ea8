//! Health, readiness, metrics, and the static dashboard (`/`, `/client.js`), compiled into
//! the binary so `cargo run` needs no files beside it.

use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::core::metrics::metrics;
use crate::node::Node;

const INDEX_HTML: &str = include_str!("../../static/index.html");
const CLIENT_JS: &str = include_str!("../../static/client.js");

pub(crate) async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(INDEX_HTML)
}

pub(crate) async fn client_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/javascript; charset=utf-8")
        .body(CLIENT_JS)
}

pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status":"ok"}))
}

pub(crate) async fn readyz(node: web::Data<Node>) -> HttpResponse {
    if node.draining.load(Ordering::Acquire) {
        return HttpResponse::ServiceUnavailable()
            .json(json!({"status":"not_ready","reason":"draining"}));
    }
    if !node.broker.health.is_ready() {
        return HttpResponse::ServiceUnavailable().json(
            json!({"status":"not_ready","reason":"redis_unavailable","detail":node.broker.health.reason()}),
        );
    }
    HttpResponse::Ok().json(json!({"status":"ready"}))
}

pub(crate) async fn metrics_text() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics().render())
}
