//! How an event reaches the sockets entitled to it on this node: the [`registry`] of this
//! node's sessions and which worker threads want each channel; each worker's [`fanout`],
//! which writes an event to that worker's sockets in one pass; the bounded [`outbox`] a
//! socket's events wait in when it is busy (conflation, slow-consumer close); the WebSocket
//! [`writer`] that owns a socket's output, and the worker's [`heartbeat`] over its sockets; one connection's [`subscriptions`], which make
//! `since` resume exact, and its [`replay`] budget, which bounds what resumes cost. Brokers
//! feed the registry; transports attach sessions to it.

pub(crate) mod fanout;
pub(crate) mod heartbeat;
pub(crate) mod outbox;
pub(crate) mod registry;
pub(crate) mod replay;
pub(crate) mod subscriptions;
#[cfg(test)]
pub(crate) mod test_support;
pub(crate) mod writer;
