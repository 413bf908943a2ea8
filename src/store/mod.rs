//! What every pod must agree on about users, kept in process when embedded and in Redis when
//! clustered: login sessions as the handshake reads them ([`sessions`]), logged-out sessions
//! ([`revocations`]), and per-user connection caps ([`caps`]), all three at once for the
//! clustered handshake ([`admission`]), over the one Redis command connection of this layer
//! ([`redis`]). Pub/sub and history are the broker's, not here.

pub(crate) mod admission;
pub(crate) mod caps;
pub(crate) mod redis;
pub(crate) mod revocations;
pub(crate) mod sessions;
#[cfg(test)]
pub(crate) mod test_redis;
