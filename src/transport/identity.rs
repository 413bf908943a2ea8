//! Who a socket belongs to: the session cookie read back into an [`Identity`], telling apart
//! every way it can be unusable (no cookie, tampered, expired, logged out). The WebSocket
//! handshake runs before the session middleware and reads the cookie itself, exactly as the
//! middleware would; SSE and logout go through the middleware's [`Session`].

use std::sync::atomic::Ordering;

use actix_session::storage::SessionKey;
use actix_session::Session;
use actix_web::cookie::{Cookie, CookieJar, Key};
use actix_web::HttpRequest;

use crate::core::close::{AuthFailure, Close};
use crate::core::identity::Identity;
use crate::core::ids::{now_s, ConnId, OrgId, UserId};
use crate::node::Node;
use crate::store::admission::{AdmitAnswer, RedisAdmission};
use crate::store::caps::{slot_token, CapOutcome};
use crate::store::sessions::{
    SessionReadError, SessionState, KEY_BOOT, KEY_EXP, KEY_LOGGED_OUT, KEY_ORG, KEY_SID, KEY_USER,
};

/// Who a connection belongs to, and its cap slot when the session check took it too.
pub(crate) struct Claim {
    pub(crate) identity: Identity,
    /// Set when the store checked the session and took the cap slot in one round trip.
    pub(crate) slot: Option<ClaimedSlot>,
}

/// A cap slot taken with the session check, for the connection id it was taken for.
pub(crate) struct ClaimedSlot {
    pub(crate) conn: ConnId,
    pub(crate) slot: String,
    pub(crate) outcome: CapOutcome,
}

/// The session key the WebSocket handshake's `Cookie` headers carry, read exactly as the
/// session middleware would (the cookie is decrypted with `auth.cookie_key`). Read before
/// anything waits, so the request can be let go of while the store answers.
pub(crate) fn websocket_session_key<'h>(
    node: &Node,
    cookie_headers: impl Iterator<Item = &'h [u8]>,
) -> Result<Option<SessionKey>, SessionReadError> {
    session_key(
        cookie_headers,
        node.settings.auth.cookie_name.as_str(),
        &node.cookie_key,
    )
}

/// The WebSocket handshake's session check of the key [`websocket_session_key`] read. Clustered
/// on one Redis, the store also takes the user's cap slot in the same round trip, unless the
/// node is draining (then no slot may be taken: [`admit`](super::handshake::admit) refuses).
pub(crate) async fn websocket_claim(
    node: &Node,
    session_key: Result<Option<SessionKey>, SessionReadError>,
) -> Result<Claim, Close> {
    let key = match session_key {
        Ok(Some(key)) => key,
        // Not ours (tampered, or sealed with another key): an empty state, as the middleware
        // would see it.
        Ok(None) => return claim_state(node, &SessionState::new()).await,
        Err(SessionReadError::NoCookie) => {
            return Err(Close::Unauthenticated(AuthFailure::NoCookie))
        }
        Err(e) => return Err(store_unavailable(&e)),
    };
    if let Some(one_trip) = &node.one_trip_admission {
        if !node.draining.load(Ordering::Acquire) {
            return claim_in_one_trip(one_trip, &key).await;
        }
    }
    match node.sessions.load(&key).await {
        Ok(Some(state)) => claim_state(node, &state).await,
        // Our cookie, but its session is gone from the store: it ran out.
        Ok(None) => Err(Close::Unauthenticated(AuthFailure::Expired)),
        Err(e) => Err(store_unavailable(&e)),
    }
}

fn store_unavailable(e: &dyn std::fmt::Display) -> Close {
    log::warn!("websocket refused: {e}");
    Close::Restarting
}

async fn claim_state(node: &Node, state: &SessionState) -> Result<Claim, Close> {
    let identity = identify_state(node, state)
        .await
        .map_err(Close::Unauthenticated)?;
    Ok(Claim {
        identity,
        slot: None,
    })
}

/// The session check and the cap slot in one script; what it admits is still read by
/// [`read_identity`], like every other session, and its slot given back if that disagrees.
async fn claim_in_one_trip(one_trip: &RedisAdmission, key: &SessionKey) -> Result<Claim, Close> {
    let conn = ConnId::next();
    let slot = slot_token(&conn.to_string());
    let answer = match one_trip.admit(key.as_ref(), &slot).await {
        Ok(answer) => answer,
        Err(e) => return Err(store_unavailable(&e)),
    };
    let now = now_s();
    match answer {
        AdmitAnswer::NoSession => Err(Close::Unauthenticated(AuthFailure::Expired)),
        AdmitAnswer::Revoked(_) => Err(Close::Unauthenticated(AuthFailure::LoggedOut)),
        AdmitAnswer::Unusable(state) => Err(Close::Unauthenticated(
            read_identity(&state, now)
                .err()
                .unwrap_or(AuthFailure::Expired),
        )),
        AdmitAnswer::Checked {
            state,
            cap_key,
            outcome,
        } => {
            let taken = matches!(outcome, CapOutcome::Admitted { .. });
            let identity = match read_identity(&state, now) {
                Ok(identity) => identity,
                Err(failure) => {
                    if taken {
                        one_trip.release(&cap_key, &slot).await;
                    }
                    return Err(Close::Unauthenticated(failure));
                }
            };
            if cap_key != one_trip.cap_key(&identity.user_key()) {
                // The script named the user otherwise than the hub does: count the socket
                // where every other path counts it.
                if taken {
                    one_trip.release(&cap_key, &slot).await;
                }
                return Ok(Claim {
                    identity,
                    slot: None,
                });
            }
            Ok(Claim {
                identity,
                slot: Some(ClaimedSlot {
                    conn,
                    slot,
                    outcome,
                }),
            })
        }
    }
}

/// The session key the cookie `name` carries, decrypted with `key`; `None` when the cookie
/// is there but does not decrypt (tampered, or sealed with another key or name).
fn session_key<'h>(
    cookie_headers: impl Iterator<Item = &'h [u8]>,
    name: &str,
    key: &Key,
) -> Result<Option<SessionKey>, SessionReadError> {
    // Parsed as actix-web parses cookies: percent-decoded, as the middleware set them. A
    // cookie of ours that does not even decode (tampered) is there, and invalid.
    let raw = cookie_headers
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|header| header.split(';'))
        .map(str::trim)
        .find(|pair| {
            pair.split_once('=')
                .is_some_and(|(n, v)| n == name && !v.is_empty())
        })
        .ok_or(SessionReadError::NoCookie)?;
    let Ok(cookie) = Cookie::parse_encoded(raw.to_string()) else {
        return Ok(None);
    };
    Ok(unseal(cookie, name, key))
}

/// The session key sealed in `cookie` (named `name`): `None` when it does not decrypt with
/// `key` (tampered, or written under another key or name).
fn unseal(cookie: Cookie<'static>, name: &str, key: &Key) -> Option<SessionKey> {
    let mut jar = CookieJar::new();
    jar.add_original(cookie);
    jar.private(key)
        .get(name)
        .and_then(|c| SessionKey::try_from(c.value().to_string()).ok())
}

/// The session id and expiry a session's state names, whether or not it is still usable:
/// logout revokes by it whatever state the session is in.
pub(crate) fn session_id(state: &SessionState) -> Option<(String, u64)> {
    let sid = serde_json::from_str::<String>(state.get(KEY_SID)?).ok()?;
    let exp = serde_json::from_str(state.get(KEY_EXP)?).ok()?;
    Some((sid, exp))
}

/// The identity in a session's state, telling apart every way it can be unusable.
pub(crate) async fn identify_state(
    node: &Node,
    state: &SessionState,
) -> Result<Identity, AuthFailure> {
    let identity = read_identity(state, now_s())?;
    // A session of an earlier boot of this (embedded) node: its logout may be forgotten.
    if !node.revocations.same_boot(
        state
            .get(KEY_BOOT)
            .and_then(|v| serde_json::from_str::<String>(v).ok())
            .as_deref(),
    ) {
        return Err(AuthFailure::Expired);
    }
    if node.revocations.is_revoked(&identity.sid).await {
        return Err(AuthFailure::LoggedOut);
    }
    Ok(identity)
}

/// The identity a session's state holds at `now` (Unix seconds), or why there is none.
fn read_identity(state: &SessionState, now: u64) -> Result<Identity, AuthFailure> {
    let get = |key: &str| state.get(key).map(String::as_str);
    if get(KEY_LOGGED_OUT) == Some("true") {
        return Err(AuthFailure::LoggedOut);
    }
    let text = |key: &str| get(key).and_then(|v| serde_json::from_str::<String>(v).ok());
    let read = || -> Option<Identity> {
        Some(Identity {
            user: UserId::parse(&text(KEY_USER)?).ok()?,
            org: OrgId::parse(&text(KEY_ORG)?).ok()?,
            sid: text(KEY_SID)?,
            exp: serde_json::from_str(get(KEY_EXP)?).ok()?,
        })
    };
    let identity = read().ok_or(AuthFailure::Invalid)?;
    if identity.exp <= now {
        return Err(AuthFailure::Expired);
    }
    Ok(identity)
}

/// The identity of a request that went through the session middleware.
pub(crate) async fn identify(
    node: &Node,
    req: &HttpRequest,
    session: &Session,
) -> Result<Identity, AuthFailure> {
    let Some(cookie) = req.cookie(&node.settings.auth.cookie_name) else {
        return Err(AuthFailure::NoCookie);
    };
    // A cookie that fails decryption, or whose session the store no longer holds, reaches
    // us as an empty session: only the first is invalid, the second expired.
    let state = session.entries().clone();
    let name = node.settings.auth.cookie_name.as_str();
    if state.is_empty() && unseal(cookie.into_owned(), name, &node.cookie_key).is_some() {
        return Err(AuthFailure::Expired);
    }
    identify_state(node, &state).await
}

/// The identity of a request that went through the session middleware (SSE), for the
/// handshake's [`admit`](super::handshake::admit).
pub(crate) async fn request_identity(
    node: &Node,
    req: &HttpRequest,
    session: &Session,
) -> Result<Claim, Close> {
    let identity = identify(node, req, session)
        .await
        .map_err(Close::Unauthenticated)?;
    Ok(Claim {
        identity,
        slot: None,
    })
}

#[cfg(test)]
mod fuzz;
