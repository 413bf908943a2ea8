//! The Redis connection for commands (the broker's subscriber has its own): one shared,
//! self-reconnecting connection per process, plus one per worker thread for the handshake's
//! idempotent commands, every command bounded by [`REDIS_TIMEOUT`]. The stores of this layer
//! and the Redis broker send their commands through it.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::redact_url;

/// Bound on any one Redis round trip; a slower answer counts as Redis unavailable.
pub(crate) const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect backoff: doubles from the first value up to the cap, so an outage never spins.
pub(crate) const BACKOFF_FIRST: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Why a Redis command has no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("no answer from Redis within {0:?}")]
    Timeout(Duration),
}

impl CommandError {
    /// Whether Redis may have run the command though no answer came: it was (or may have
    /// been) sent, and then the answer timed out or the connection broke. Only a refused
    /// connection or an error answer say for sure that it did not run.
    pub(crate) fn outcome_unknown(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Redis(e) => {
                !e.is_connection_refusal()
                    && (e.is_timeout() || e.is_connection_dropped() || e.is_io_error())
            }
        }
    }

    /// Whether the connection failed (dropped, refused, I/O, no answer in time), as opposed to
    /// Redis answering with an error: the first says nothing will get through until it is
    /// back, the second concerns one command.
    pub(crate) fn is_connection_failure(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Redis(e) => {
                e.is_connection_dropped()
                    || e.is_io_error()
                    || e.is_connection_refusal()
                    || e.is_timeout()
            }
        }
    }
}

/// Everything needed to talk to Redis for commands (not the subscriber).
///
/// The handshake's commands (session, revocation, cap slot) and the cap release go over a
/// connection of the calling thread's own, opened on its first use: a redis-rs connection is
/// driven by a task on the thread that opened it, so the shared one (opened on the main
/// thread) would cost every command two cross-thread wake-ups. Until a thread's own
/// connection is up it uses the shared one, as do publishing, history and the lease refresh.
#[derive(Clone)]
pub(crate) struct RedisCommands {
    conn: ConnectionManager,
    opener: Arc<Opener>,
}

/// What a thread needs to open its own connection; one per hub, shared by its clones.
struct Opener {
    client: redis::Client,
    config: ConnectionManagerConfig,
}

/// A thread's own connection for one hub's [`Opener`] (a process may hold several hubs, as
/// tests do); `None` while it is being opened. Gone once that hub is.
type ThreadConnection = (std::sync::Weak<Opener>, Option<ConnectionManager>);

thread_local! {
    static THREAD_CONNECTIONS: std::cell::RefCell<Vec<ThreadConnection>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl RedisCommands {
    /// Connect, retrying with backoff until Redis answers (pods may start before Redis).
    pub(crate) async fn connect(url: &str) -> Result<Self, CommandError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_CAP.as_millis() as u64);
        let mut delay = BACKOFF_FIRST;
        loop {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                Ok(conn) => {
                    return Ok(Self {
                        conn,
                        opener: Arc::new(Opener { client, config }),
                    })
                }
                Err(e) => {
                    log::warn!(
                        "waiting for Redis at {}: {e}; retrying in {delay:?}",
                        redact_url(url)
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_CAP);
                }
            }
        }
    }

    /// The connection shared by the whole process.
    pub(crate) fn manager(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// This thread's own connection, or the shared one while it is being opened (or on a
    /// thread whose runtime is not single-threaded, where a task may finish on another thread).
    fn thread_connection(&self) -> ConnectionManager {
        THREAD_CONNECTIONS.with(|connections| {
            let mut connections = connections.borrow_mut();
            connections.retain(|(opener, _)| opener.strong_count() > 0);
            let ours =
                |opener: &std::sync::Weak<Opener>| opener.as_ptr() == Arc::as_ptr(&self.opener);
            match connections.iter().find(|(opener, _)| ours(opener)) {
                Some((_, Some(own))) => return own.clone(),
                Some((_, None)) => return self.manager(),
                None => {}
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return self.manager();
            };
            if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
                return self.manager();
            }
            let opener = Arc::downgrade(&self.opener);
            connections.push((opener.clone(), None));
            let (client, config) = (self.opener.client.clone(), self.opener.config.clone());
            runtime.spawn(async move {
                let opened = ConnectionManager::new_with_config(client, config).await;
                THREAD_CONNECTIONS.with(|connections| {
                    let mut connections = connections.borrow_mut();
                    connections.retain(|(other, _)| !other.ptr_eq(&opener));
                    match opened {
                        Ok(own) => connections.push((opener, Some(own))),
                        // Stay on the shared connection; the next command tries again.
                        Err(e) => log::debug!("cannot open this thread's Redis connection: {e}"),
                    }
                });
            });
            self.manager()
        })
    }

    /// Run an idempotent command of the handshake's (or a socket's close) on this thread's
    /// connection. Such a connection may sit idle for a while, so after Redis restarts its
    /// first command finds the old socket dead; the connection manager reconnects and the
    /// command is sent once more, as actix-session's store does.
    pub(crate) async fn run_idempotent<T, F, Fut>(&self, command: F) -> Result<T, CommandError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(REDIS_TIMEOUT, command(self.thread_connection())).await {
            Ok(Err(e)) if e.is_connection_dropped() => {
                timed(command(self.thread_connection())).await
            }
            first => answered(first),
        }
    }
}

/// Run one command, bounded by [`REDIS_TIMEOUT`].
pub(crate) async fn timed<T>(
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, CommandError> {
    answered(tokio::time::timeout(REDIS_TIMEOUT, fut).await)
}

fn answered<T>(
    answer: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
) -> Result<T, CommandError> {
    match answer {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CommandError::Redis(e)),
        Err(_) => Err(CommandError::Timeout(REDIS_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis refusing one command (an error reply) says nothing about the connection; a
    /// dropped connection or no answer in time says it is down.
    #[test]
    fn only_connection_failures_count_as_the_connection_down() {
        let reply = redis::RedisError::from((redis::ErrorKind::ResponseError, "OOM"));
        assert!(!CommandError::Redis(reply).is_connection_failure());
        let dropped = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(CommandError::Redis(dropped.into()).is_connection_failure());
        assert!(CommandError::Timeout(REDIS_TIMEOUT).is_connection_failure());
    }

    /// A command that may have reached Redis (no answer in time, connection broken after)
    /// may still run; one on a refused connection, or answered with an error, did not.
    #[test]
    fn a_command_without_an_answer_has_an_unknown_outcome() {
        let io = |kind| CommandError::Redis(std::io::Error::from(kind).into());
        assert!(CommandError::Timeout(REDIS_TIMEOUT).outcome_unknown());
        assert!(io(std::io::ErrorKind::BrokenPipe).outcome_unknown());
        assert!(io(std::io::ErrorKind::ConnectionReset).outcome_unknown());
        assert!(!io(std::io::ErrorKind::ConnectionRefused).outcome_unknown());
        let reply = redis::RedisError::from((redis::ErrorKind::ResponseError, "OOM"));
        assert!(!CommandError::Redis(reply).outcome_unknown());
    }
}
