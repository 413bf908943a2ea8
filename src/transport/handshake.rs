//! `GET /ws`: everything a socket must pass before its session actor starts, in the order of
//! SPEC section 3: upgrade headers, per-IP handshake budget, Origin, session cookie, draining,
//! per-user connection cap. The HTTP layer hands WebSocket upgrades here with the raw
//! connection ([`upgrade`]), so after the 101 nothing of the HTTP dispatcher stays alive. Each refusal is logged at WARN with the facts an operator needs
//! and counted by reason; it becomes a close frame with a readable reason (default), or an
//! HTTP error before the upgrade (`handshake.reject_before_upgrade`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix_codec::{Framed, FramedParts};
use actix_http::body::BodySize;
use actix_http::{h1, ws, Request, RequestHead, Response};
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::net::TcpStream;

use super::attach::{Admission, Admitted};
use super::identity::{websocket_claim, websocket_session_key, Claim, ClaimedSlot};
use super::websocket;
use crate::core::close::Close;
use crate::core::ids::ConnId;
use crate::core::metrics::metrics;
use crate::node::Node;
use crate::policy::client_ip::{client_ip, join_forwarded_for};
use crate::policy::origin::{Day, Decision};
use crate::store::caps::{slot_conn, slot_token, CapOutcome};

/// An answer given over HTTP instead of a WebSocket close.
#[derive(Debug)]
pub(crate) struct HttpRefusal {
    pub(crate) status: StatusCode,
    pub(crate) body: Value,
    /// Tell the client to come back in a second (rate limits).
    pub(crate) retry_after: bool,
}

impl HttpRefusal {
    fn new(status: u16, error: &str, detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            body: json!({"error": error, "detail": detail.into()}),
            retry_after: status == 429,
        }
    }

    /// The refusal of a check that would otherwise close the socket.
    pub(crate) fn of_close(close: &Close) -> Self {
        let (status, error) = close.http_refusal();
        Self::new(status, error, close.reason())
    }

    pub(crate) fn into_response(self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if self.retry_after {
            response.insert_header((header::RETRY_AFTER, "1"));
        }
        response.json(self.body)
    }
}

/// `GET /ws` through the actix-web router: only requests that lack the upgrade headers get
/// here (upgrades are handed to [`upgrade`] by the HTTP layer before routing).
pub(crate) async fn websocket_without_upgrade() -> HttpResponse {
    HttpResponse::UpgradeRequired()
        .insert_header((header::UPGRADE, "websocket"))
        .content_type("text/plain; charset=utf-8")
        .body(
            "426 Upgrade Required: /ws is a WebSocket endpoint, but this request arrived \
             without the `Upgrade: websocket` and `Connection: upgrade` headers. If a proxy \
             sits in front of switchboard, it must forward them: see config/nginx.conf \
             (proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; \
             proxy_set_header Connection \"upgrade\").\n",
        )
}

/// A WebSocket upgrade request, handed over with its raw connection. The checks run here,
/// then the 101 goes out and the connection belongs to the session: no HTTP dispatcher (and
/// none of its per-connection buffers) stays behind it for the socket's life.
pub(crate) async fn upgrade(
    node: Arc<Node>,
    req: Request,
    mut framed: Framed<TcpStream, h1::Codec>,
) -> Result<(), actix_http::Error> {
    if req.path() != "/ws" {
        let refusal = HttpRefusal::new(404, "not_found", "WebSocket upgrades go to /ws");
        return respond(&mut framed, refusal).await;
    }
    let accept = match accept_value(req.head()) {
        Ok(accept) => accept,
        Err(e) => {
            let refusal = HttpRefusal::new(400, "bad_request", format!("bad handshake: {e}"));
            return respond(&mut framed, refusal).await;
        }
    };
    if let Some(refusal) = over_handshake_budget(&node, req.peer_addr(), req.head().headers()) {
        return respond(&mut framed, refusal).await;
    }
    let headers = req.head().headers();
    let session_key = websocket_session_key(
        &node,
        headers.get_all(header::COOKIE).map(HeaderValue::as_bytes),
    );
    // Boxed: the checks' future (the Redis calls' state) is some 5 KiB, and unboxed it sizes
    // every HTTP connection's task, which is moved whole when it is spawned, when the
    // dispatcher enters its upgrade state and when it ends.
    let admitting = Box::pin(admit(
        &node,
        headers,
        websocket_claim(&node, session_key),
        false,
    ));
    // Everything the checks need is read: the request goes back to actix-http's per-thread
    // pool now, not when the store answers. Held across that wait, every handshake in flight
    // would keep a request head (a header map of several KiB) that the pool then keeps for
    // good (BENCHMARKS.md, issue 15 round 5).
    drop(req);
    let admission = admitting.await;
    if let Admission::Refused(close) = &admission {
        metrics().reject(close.rejection_label());
        if node.settings.handshake.reject_before_upgrade {
            return respond(&mut framed, HttpRefusal::of_close(close)).await;
        }
    }
    let switching = Response::build(StatusCode::SWITCHING_PROTOCOLS)
        .upgrade("websocket")
        .insert_header((header::SEC_WEBSOCKET_ACCEPT, accept))
        .finish()
        .drop_body();
    // The 101 is encoded but not written here: it goes out with the session's first frame
    // (its welcome, or its close) in one write, one wake-up of the client fewer. A client that
    // left meanwhile is found by that write, and the session gives back its cap slot.
    if Pin::new(&mut framed)
        .write(h1::Message::Item((switching, BodySize::None)))
        .is_err()
    {
        if let Admission::Admitted(Admitted { identity, slot, .. }) = admission {
            // Boxed for the reason the checks are.
            Box::pin(node.caps.release(&identity.user_key(), &slot)).await;
        }
        return Ok(());
    }
    // Keep only the connection, the encoded 101 and whatever the client sent behind its
    // handshake; the HTTP codec's buffers (8 KiB each) are freed here rather than living as
    // long as the socket.
    let FramedParts {
        io,
        read_buf,
        write_buf,
        ..
    } = framed.into_parts();
    let early = Bytes::copy_from_slice(&read_buf);
    let switching = Bytes::copy_from_slice(&write_buf);
    drop((read_buf, write_buf));
    // The session gets a task of its own: this future lives inside the HTTP dispatcher's
    // task, which is sized for a whole actix-web request and would otherwise be held (a few
    // KiB) for as long as the socket is open.
    actix::spawn(websocket::run(node, admission, io, switching, early));
    Ok(())
}

/// The `Sec-WebSocket-Accept` answer to a valid upgrade request, computed now so that the
/// 101 can be built after the request is gone.
fn accept_value(head: &RequestHead) -> Result<HeaderValue, ws::HandshakeError> {
    ws::verify_handshake(head)?;
    head.headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|key| HeaderValue::from_bytes(&ws::hash_key(key.as_bytes())).ok())
        .ok_or(ws::HandshakeError::BadWebsocketKey)
}

/// Answer an upgrade request over HTTP and end the connection.
async fn respond(
    framed: &mut Framed<TcpStream, h1::Codec>,
    refusal: HttpRefusal,
) -> Result<(), actix_http::Error> {
    let mut response = Response::with_body(refusal.status, ());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if refusal.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    // The App's answers get these from its middleware; this one never passes through it.
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(NOTHING_RUNS_CSP),
    );
    response
        .head_mut()
        .set_connection_type(actix_http::ConnectionType::Close);
    // A client that left before reading its refusal needs nothing more.
    let _ = send(
        framed,
        response,
        Some(Bytes::from(refusal.body.to_string())),
    )
    .await;
    Ok(())
}

async fn send(
    framed: &mut Framed<TcpStream, h1::Codec>,
    head: Response<()>,
    body: Option<Bytes>,
) -> std::io::Result<()> {
    let size = body
        .as_ref()
        .map_or(BodySize::None, |b| BodySize::Sized(b.len() as u64));
    let mut framed = Pin::new(framed);
    framed.as_mut().write(h1::Message::Item((head, size)))?;
    if let Some(body) = body {
        framed.as_mut().write(h1::Message::Chunk(Some(body)))?;
        framed.as_mut().write(h1::Message::Chunk(None))?;
    }
    std::future::poll_fn(|cx| framed.as_mut().flush(cx)).await?;
    Ok(())
}

/// The Content-Security-Policy of every HTTP answer but the dashboard page: nothing in it
/// runs or loads, and no other site may frame it.
pub(crate) const NOTHING_RUNS_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// The client address of a request: the peer, or what trusted proxies say it forwarded for
/// (every `X-Forwarded-For` header, in order).
pub(crate) fn request_ip(
    node: &Node,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
) -> std::net::IpAddr {
    peer.map(|peer| {
        let xff = join_forwarded_for(
            headers
                .get_all("x-forwarded-for")
                .map(|value| value.as_bytes()),
        );
        client_ip(peer.ip(), xff.as_deref(), &node.trusted_proxies)
    })
    .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]))
}

/// The per-IP handshake budget: `Some(429)` when the client is over it.
pub(crate) fn over_handshake_budget(
    node: &Node,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
) -> Option<HttpRefusal> {
    let ip = request_ip(node, peer, headers);
    if node.handshakes.allow(ip) {
        return None;
    }
    metrics().reject("rate_limited");
    log::warn!("handshake refused: client {ip} is over limits.handshakes_per_ip_per_s");
    Some(HttpRefusal::new(
        429,
        "rate_limited",
        format!("too many handshakes from {ip}; retry shortly"),
    ))
}

/// Run the checks; the first failure decides the close. `same_origin_ok`: a request with no
/// Origin header that the browser marked `Sec-Fetch-Site: same-origin` counts as admitted
/// (browsers omit Origin on same-origin GETs such as EventSource; they always send it for
/// WebSockets, so the WebSocket path passes false). The headers are read before the returned
/// future first waits, and it does not hold them: a caller may drop the request meanwhile.
pub(crate) fn admit<'n, C>(
    node: &'n Node,
    headers: &HeaderMap,
    claim: C,
    same_origin_ok: bool,
) -> impl Future<Output = Admission> + 'n
where
    C: Future<Output = Result<Claim, Close>> + 'n,
{
    let origin = headers
        .get(header::ORIGIN)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let same_origin = same_origin_ok
        && origin.is_none()
        && headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"same-origin");
    admit_checked(node, origin, same_origin, claim)
}

async fn admit_checked(
    node: &Node,
    origin: Option<String>,
    same_origin: bool,
    claim: impl Future<Output = Result<Claim, Close>>,
) -> Admission {
    let decision = if same_origin {
        Decision::Allowed {
            rule: "same-origin request".into(),
        }
    } else {
        node.origins.check(origin.as_deref(), Day::today())
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
                node.origins.allowlist().join(", "),
                if node.settings.origins.allow_localhost { " + localhost" } else { "" },
            );
            return Admission::Refused(Close::OriginNotAllowed { origin });
        }
    }

    let Claim { identity, slot } = match claim.await {
        Ok(claim) => claim,
        Err(close) => {
            log::warn!(
                "websocket refused: {} (origin {})",
                close.reason(),
                origin.as_deref().unwrap_or("<missing>")
            );
            return Admission::Refused(close);
        }
    };

    let user_key = identity.user_key();
    if node.draining.load(Ordering::Acquire) {
        log::warn!(
            "websocket refused for user {} (origin {}): draining",
            identity.user,
            origin.as_deref().unwrap_or("<missing>")
        );
        // Began draining while the store took a slot with the session check: give it back.
        // Slots it evicted for this one come back with their pods' next lease refresh.
        if let Some(ClaimedSlot {
            slot,
            outcome: CapOutcome::Admitted { .. },
            ..
        }) = slot
        {
            node.caps.release(&user_key, &slot).await;
        }
        return Admission::Refused(Close::Restarting);
    }

    let (conn, slot, outcome) = match slot {
        Some(claimed) => (claimed.conn, claimed.slot, Ok(claimed.outcome)),
        None => {
            let conn = ConnId::next();
            let slot = slot_token(&conn.to_string());
            let outcome = node.caps.acquire(&user_key, &slot).await;
            (conn, slot, outcome)
        }
    };
    match outcome {
        Ok(CapOutcome::Admitted { evicted }) => {
            for old in evicted {
                let old = slot_conn(&old);
                log::info!("user {user_key}: closing {old} to admit {conn} (evict_oldest)");
                if !node.registry.close_conn(old, Close::Replaced) {
                    if let Some(control) = &node.control {
                        if let Err(e) = control.broadcast_evict(old).await {
                            log::warn!("cannot ask other pods to close {old}: {e}");
                        }
                    }
                }
            }
            Admission::Admitted(Admitted {
                identity,
                conn,
                slot,
            })
        }
        Ok(CapOutcome::Refused { limit }) => {
            log::warn!(
                "websocket refused for user {user_key} (origin {}): too many connections (limit {limit})",
                origin.as_deref().unwrap_or("<missing>")
            );
            Admission::Refused(Close::TooManyConnections { limit })
        }
        Err(e) => {
            // Fail closed but retryable: the client reconnects when the store is back.
            log::warn!(
                "websocket refused for user {user_key} (origin {}): {e}",
                origin.as_deref().unwrap_or("<missing>"),
            );
            Admission::Refused(Close::Restarting)
        }
    }
}
