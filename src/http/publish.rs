//! `POST /api/publish`: a backend service's event into the hub. The publish key is checked
//! before the body is read (an address that keeps presenting wrong keys is held back with
//! 429), the body must arrive within `api.body_timeout_ms` and [`MAX_BODY_BYTES`], every field is
//! validated, and 202 comes only once the broker has taken the event; anything else is a 4xx
//! naming the problem or a 503. A body sent as `application/octet-stream` is a binary event
//! (`?org=..&topic=..` in the query): delivered as a binary frame to `binary:true`
//! subscribers, live only like every binary event (the voice echo answers this way).

use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::broker::BrokerError;
use crate::core::event::{PublishBody, PublishRequest};
use crate::core::ids::{OrgId, Topic};
use crate::core::wire::validate_event_name;
use crate::node::Node;
use crate::transport::handshake::request_ip;

/// The largest publish body (actix-web's default payload limit, which the handler enforces
/// itself now that it reads the body after the key check).
pub(crate) const MAX_BODY_BYTES: usize = 256 * 1024;

/// A publish body that cannot be accepted, naming the field at fault.
#[derive(Debug)]
pub(crate) struct BadField {
    pub(crate) field: String,
    pub(crate) message: String,
}

impl BadField {
    fn response(&self) -> HttpResponse {
        HttpResponse::BadRequest()
            .json(json!({"error":"bad_request","field":self.field,"message":self.message}))
    }
}

fn bad_field(field: &str, message: impl ToString) -> BadField {
    BadField {
        field: field.to_string(),
        message: message.to_string(),
    }
}

/// Compare without leaking, through timing, how much of a key matched. A key of another
/// length never matches (`subtle` answers that at once: the length is not the secret).
fn key_matches(key: &[u8], presented: &[u8]) -> bool {
    key.ct_eq(presented).into()
}

fn authorised(node: &Node, req: &HttpRequest) -> bool {
    let Some(presented) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key)
    else {
        return false;
    };
    node.settings
        .api
        .publish_keys
        .iter()
        .any(|key| key_matches(key.as_bytes(), presented.trim().as_bytes()))
}

/// Validate a publish body into a request, or the 400 naming the field at fault.
pub(crate) fn parse_publish(body: &[u8]) -> Result<PublishRequest, BadField> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| bad_field("body", format!("body is not valid JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(bad_field("body", "body must be a JSON object"));
    };
    let org = match object.get("org") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err(bad_field("org", "org must be a string")),
        None => return Err(bad_field("org", "org is required")),
    };
    let org = OrgId::parse(&org).map_err(|e| bad_field("org", e))?;
    let topic = match object.get("topic") {
        Some(Value::String(s)) => Topic::parse(s).map_err(|e| bad_field("topic", e))?,
        Some(_) => return Err(bad_field("topic", "topic must be a string")),
        None => return Err(bad_field("topic", "topic is required")),
    };
    let event = match object.get("event") {
        None | Some(Value::Null) => return Err(bad_field("event", "event is required")),
        Some(Value::String(s)) => {
            validate_event_name(s).map_err(|e| bad_field("event", e))?;
            s.clone()
        }
        Some(_) => return Err(bad_field("event", "event must be a string")),
    };
    let data = object
        .remove("data")
        .ok_or_else(|| bad_field("data", "data is required (any JSON value)"))?;
    for key in object.keys() {
        if !matches!(key.as_str(), "org" | "topic" | "event") {
            return Err(bad_field(
                key,
                format!("unknown field {key:?}: expected org, topic, event, data"),
            ));
        }
    }
    Ok(PublishRequest {
        org,
        topic,
        body: PublishBody::Json { event, data },
        sender: None,
    })
}

/// Where a binary publish goes: the query of `POST /api/publish?org=..&topic=..`.
#[derive(serde::Deserialize)]
struct BinaryTarget {
    org: String,
    topic: String,
}

/// Whether the body is a binary event rather than the JSON envelope.
fn is_binary(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().starts_with("application/octet-stream"))
}

/// Validate a binary publish (the target from the query, the body as it is) into a request.
/// The body becomes one WebSocket frame for every subscriber, so it is held to the frame
/// size clients are held to (`limits.max_frame_bytes`).
fn parse_binary_publish(
    query: &str,
    body: web::BytesMut,
    max_bytes: usize,
) -> Result<PublishRequest, BadField> {
    let target = web::Query::<BinaryTarget>::from_query(query).map_err(|e| {
        bad_field(
            "query",
            format!("a binary publish names ?org=..&topic=.. in the query: {e}"),
        )
    })?;
    let org = OrgId::parse(&target.org).map_err(|e| bad_field("org", e))?;
    let topic = Topic::parse(&target.topic).map_err(|e| bad_field("topic", e))?;
    if body.len() > max_bytes {
        return Err(bad_field(
            "body",
            format!(
                "a binary event is at most {max_bytes} bytes (limits.max_frame_bytes); got {}",
                body.len()
            ),
        ));
    }
    Ok(PublishRequest {
        org,
        topic,
        body: PublishBody::Binary(body.freeze()),
        sender: None,
    })
}

/// Why a publish body could not be read.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("body not received within {0:?}")]
    TimedOut(Duration),
    #[error("cannot read body: {0}")]
    Read(#[source] actix_web::error::PayloadError),
}

impl BodyError {
    fn response(&self) -> HttpResponse {
        let status = match self {
            Self::TooLarge => actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            Self::TimedOut(_) => actix_web::http::StatusCode::REQUEST_TIMEOUT,
            Self::Read(_) => actix_web::http::StatusCode::BAD_REQUEST,
        };
        HttpResponse::build(status)
            .json(json!({"error":"bad_request","field":"body","message":self.to_string()}))
    }
}

/// The whole body, at most [`MAX_BODY_BYTES`], within `timeout`.
async fn read_body(
    mut payload: web::Payload,
    timeout: Duration,
) -> Result<web::BytesMut, BodyError> {
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(BodyError::Read)?;
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(BodyError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(BodyError::TimedOut(timeout)))
}

pub(crate) async fn publish(
    node: web::Data<Node>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let ip = request_ip(&node, req.peer_addr(), req.headers());
    if node.publish_failures.blocked(ip, Instant::now()) {
        return HttpResponse::TooManyRequests()
            .insert_header((header::RETRY_AFTER, "1"))
            .json(json!({"error":"rate_limited","message":format!("too many wrong publish keys from {ip}; retry later")}));
    }
    if !authorised(&node, &req) {
        node.publish_failures.failed(ip, Instant::now());
        log::warn!("publish refused: missing or unknown publish key from {ip}");
        return HttpResponse::Unauthorized()
            .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
            .json(json!({"error":"unauthorized","message":"missing or unknown publish key (Authorization: Bearer <key from api.publish_keys>)"}));
    }
    let timeout = Duration::from_millis(node.settings.api.body_timeout_ms);
    let body = match read_body(payload, timeout).await {
        Ok(body) => body,
        Err(e) => return e.response(),
    };
    let parsed = if is_binary(&req) {
        parse_binary_publish(
            req.query_string(),
            body,
            node.settings.limits.max_frame_bytes,
        )
    } else {
        parse_publish(&body)
    };
    let request = match parsed {
        Ok(r) => r,
        Err(bad) => return bad.response(),
    };
    match node.broker.publish(request).await {
        Ok(id) => HttpResponse::Accepted().json(json!({"id": id.to_string()})),
        Err(e) => {
            log::warn!("publish refused: {e}");
            not_accepted(&e)
        }
    }
}

/// The 503 for a publish the broker did not confirm. When the broker knew it could not take
/// it, or Redis refused the connection or answered an error, the event was not taken
/// (`unavailable`). When the command may have reached Redis but no answer came (a timeout, a
/// connection broken meanwhile), Redis may still run it, for example once a frozen Redis
/// resumes: that is `outcome_unknown`, so a publisher that retries knows the event may
/// arrive twice (with two ids) rather than believing it was dropped.
fn not_accepted(e: &BrokerError) -> HttpResponse {
    let error = match e {
        BrokerError::Redis(failure) if failure.outcome_unknown() => "outcome_unknown",
        _ => "unavailable",
    };
    HttpResponse::ServiceUnavailable()
        .insert_header((header::RETRY_AFTER, "1"))
        .json(json!({"error": error, "message": e.to_string()}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redis::{CommandError, REDIS_TIMEOUT};

    async fn error_of(e: BrokerError) -> (u16, String) {
        let response = not_accepted(&e);
        let status = response.status().as_u16();
        let body = actix_web::body::to_bytes(response.into_body())
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        (status, body["error"].as_str().unwrap().to_string())
    }

    /// A publish Redis did not answer in time may still run when Redis resumes: the publisher
    /// is told the outcome is unknown, not that the event was refused; both are 503, never 2xx.
    #[actix_web::test]
    async fn a_timed_out_publish_is_an_unknown_outcome() {
        assert_eq!(
            error_of(BrokerError::Redis(CommandError::Timeout(REDIS_TIMEOUT))).await,
            (503, "outcome_unknown".to_string())
        );
        assert_eq!(
            error_of(BrokerError::Unavailable("redis away".into())).await,
            (503, "unavailable".to_string())
        );
    }

    fn field_of(body: &str) -> String {
        parse_publish(body.as_bytes()).unwrap_err().field
    }

    /// Every bad publish names the field at fault.
    #[test]
    fn names_bad_fields() {
        assert_eq!(field_of("nope"), "body");
        assert_eq!(field_of("[]"), "body");
        assert_eq!(field_of(r#"{"topic":"calls","data":{}}"#), "org");
        assert_eq!(
            field_of(r#"{"org":"a:b","topic":"calls","data":{}}"#),
            "org"
        );
        assert_eq!(
            field_of(r#"{"org":"1","topic":"Bad Topic!","data":{}}"#),
            "topic"
        );
        assert_eq!(
            field_of(r#"{"org":"1","topic":"calls","event":"e"}"#),
            "data"
        );
        assert_eq!(field_of(r#"{"org":"1","topic":"calls","data":1}"#), "event");
        assert_eq!(
            field_of(r#"{"org":"1","topic":"calls","event":"a b","data":1}"#),
            "event"
        );
        assert_eq!(
            field_of(r#"{"org":"1","topic":"calls","event":"e","data":1,"x":2}"#),
            "x"
        );
    }

    /// Only the exact key matches: not a prefix, an extension, an empty key or one differing
    /// in a single byte.
    #[test]
    fn key_matches_only_the_exact_key() {
        assert!(key_matches(b"s3cret-key", b"s3cret-key"));
        assert!(!key_matches(b"s3cret-key", b"s3cret-kez"));
        assert!(!key_matches(b"s3cret-key", b"s3cret"));
        assert!(!key_matches(b"s3cret-key", b"s3cret-key!"));
        assert!(!key_matches(b"s3cret-key", b""));
        assert!(!key_matches(b"", b"s3cret-key"));
    }

    /// A binary publish takes its target from the query and its bytes as they are; a missing
    /// target, a bad topic or a body over the frame limit names the field at fault.
    #[test]
    fn binary_publish() {
        let body = |b: &[u8]| web::BytesMut::from(b);
        let r = parse_binary_publish("org=demo&topic=voice:a:out", body(b"\x00\x01"), 8).unwrap();
        assert_eq!((r.org.as_str(), r.topic.as_str()), ("demo", "voice:a:out"));
        assert!(matches!(r.body, PublishBody::Binary(ref b) if &b[..] == b"\x00\x01"));
        let field = |q: &str, b: &[u8]| parse_binary_publish(q, body(b), 8).unwrap_err().field;
        assert_eq!(field("org=demo", b""), "query");
        assert_eq!(field("org=demo&topic=Bad!", b""), "topic");
        assert_eq!(field("org=demo&topic=voice:a:out", &[0; 9]), "body");
    }

    /// A good body parses, with a numeric org accepted and the default event name.
    #[test]
    fn good_body() {
        let r = parse_publish(br#"{"org":42,"topic":"calls","event":"e","data":{"a":1}}"#).unwrap();
        assert_eq!(r.org.as_str(), "42");
        assert!(matches!(r.body, PublishBody::Json { ref event, .. } if event == "e"));
    }
}
