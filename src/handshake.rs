//! `GET /ws`: everything a socket must pass before its session actor starts, in the order of
//! SPEC section 3: upgrade headers, per-IP handshake budget, Origin, session cookie, draining,
//! per-user connection cap. Each refusal is logged at WARN with the facts an operator needs
//! and counted by reason; it becomes a close frame with a readable reason (default), or an
//! HTTP error before the upgrade (`handshake.reject_before_upgrade`).

use std::sync::atomic::Ordering;

use actix_session::Session;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::auth::identify;
use crate::close::Close;
use crate::limits::{client_ip, slot_conn, slot_token, CapOutcome};
use crate::metrics::metrics;
use crate::origin::{Day, Decision};
use crate::protocol::ConnId;
use crate::server::Hub;
use crate::session::{self, Admission};

pub async fn websocket(
    req: HttpRequest,
    stream: web::Payload,
    hub: web::Data<Hub>,
    session: Session,
) -> Result<HttpResponse, actix_web::Error> {
    if !is_upgrade(&req) {
        return Ok(HttpResponse::UpgradeRequired()
            .insert_header((header::UPGRADE, "websocket"))
            .content_type("text/plain; charset=utf-8")
            .body(
                "426 Upgrade Required: /ws is a WebSocket endpoint, but this request arrived \
                 without the `Upgrade: websocket` and `Connection: upgrade` headers. If a proxy \
                 sits in front of switchboard, it must forward them: see config/nginx.conf \
                 (proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; \
                 proxy_set_header Connection \"upgrade\").\n",
            ));
    }

    if let Some(refusal) = over_handshake_budget(&hub, &req) {
        return Ok(refusal);
    }

    let hub = hub.into_inner();
    let admission = admit(&hub, &req, &session, false).await;
    if let Admission::Refused(close) = &admission {
        metrics().reject(close.rejection_label());
        if hub.settings.handshake.reject_before_upgrade {
            let (status, error) = close.http_refusal();
            let status = actix_web::http::StatusCode::from_u16(status)
                .unwrap_or(actix_web::http::StatusCode::FORBIDDEN);
            return Ok(
                HttpResponse::build(status).json(json!({"error":error,"detail":close.reason()}))
            );
        }
    }
    session::start(hub, admission, &req, stream)
}

fn is_upgrade(req: &HttpRequest) -> bool {
    let has = |name: header::HeaderName, needle: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains(needle))
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

/// The per-IP handshake budget: `Some(429 response)` when the client is over it.
pub fn over_handshake_budget(hub: &Hub, req: &HttpRequest) -> Option<HttpResponse> {
    let ip = req
        .peer_addr()
        .map(|peer| {
            let xff = req
                .headers()
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok());
            client_ip(peer.ip(), xff, &hub.trusted_proxies)
        })
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    if hub.handshakes.allow(ip) {
        return None;
    }
    metrics().reject("rate_limited");
    log::warn!("handshake refused: client {ip} is over limits.handshakes_per_ip_per_s");
    Some(
        HttpResponse::TooManyRequests()
            .insert_header((header::RETRY_AFTER, "1"))
            .json(json!({"error":"rate_limited","detail":format!("too many handshakes from {ip}; retry shortly")})),
    )
}

/// Run the checks; the first failure decides the close. `same_origin_ok`: a request with no
/// Origin header that the browser marked `Sec-Fetch-Site: same-origin` counts as admitted
/// (browsers omit Origin on same-origin GETs such as EventSource; they always send it for
/// WebSockets, so the WebSocket path passes false).
pub async fn admit(
    hub: &Hub,
    req: &HttpRequest,
    session: &Session,
    same_origin_ok: bool,
) -> Admission {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let same_origin = same_origin_ok
        && origin.is_none()
        && req
            .headers()
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"same-origin");
    let decision = if same_origin {
        Decision::Allowed {
            rule: "same-origin request".into(),
        }
    } else {
        hub.origins.check(origin.as_deref(), Day::today())
    };
    match decision {
        Decision::Allowed { .. } => {}
        Decision::AllowedLegacy { origin, until } => log::warn!(
            "origin {origin} admitted through origins.legacy until {until}: move this client to a current origin"
        ),
        Decision::Denied {
            origin,
            nearest,
            hint,
        } => {
            log::warn!(
                "websocket refused: origin not allowed: {origin}; nearest allowed: {}; {}; allowlist: [{}]{}",
                nearest.as_deref().unwrap_or("none"),
                hint.as_deref().unwrap_or("no close match"),
                hub.origins.allowlist().join(", "),
                if hub.settings.origins.allow_localhost { " + localhost" } else { "" },
            );
            return Admission::Refused(Close::OriginNotAllowed { origin });
        }
    }

    let identity = match identify(hub, req, session).await {
        Ok(identity) => identity,
        Err(cause) => {
            log::warn!(
                "websocket refused: unauthenticated: {} (origin {})",
                cause.as_str(),
                origin.as_deref().unwrap_or("<missing>")
            );
            return Admission::Refused(Close::Unauthenticated(cause));
        }
    };

    if hub.draining.load(Ordering::Acquire) {
        log::warn!("websocket refused for user {}: draining", identity.user);
        return Admission::Refused(Close::Restarting);
    }

    let conn = ConnId::next();
    let user_key = identity.user_key();
    let slot = slot_token(&conn.to_string());
    match hub.caps.acquire(&user_key, &slot).await {
        Ok(CapOutcome::Admitted { evicted }) => {
            for old in evicted {
                let old = slot_conn(&old);
                log::info!("user {user_key}: closing {old} to admit {conn} (evict_oldest)");
                if !hub.registry.close_conn(old, Close::Replaced) {
                    if let Some(redis) = &hub.redis {
                        if let Err(e) = redis.broadcast_evict(old).await {
                            log::warn!("cannot ask other pods to close {old}: {e}");
                        }
                    }
                }
            }
            Admission::Admitted {
                identity,
                conn,
                slot,
            }
        }
        Ok(CapOutcome::Refused { limit }) => {
            log::warn!(
                "websocket refused for user {user_key}: too many connections (limit {limit})"
            );
            Admission::Refused(Close::TooManyConnections { limit })
        }
        Err(e) => {
            // Fail closed but retryable: the client reconnects when the store is back.
            log::warn!(
                "websocket refused for user {user_key}: connection caps unavailable: {}",
                e.0
            );
            Admission::Refused(Close::Restarting)
        }
    }
}
