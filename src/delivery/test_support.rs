//! What the delivery layer's unit tests share: a loopback TCP pair whose server end becomes a
//! [`Socket`] and whose client end the test reads, a session stream the test feeds, events,
//! and session links whose mailboxes (flush, control) the test reads.

use std::mem::MaybeUninit;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use futures_util::Stream;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::config::SlowConsumerPolicy;
use crate::core::event::{build_event, Event, PublishBody};
use crate::core::identity::Identity;
use crate::core::ids::{ChannelKey, ConnId, EventId, OrgId, Topic, UserId};
use crate::delivery::outbox::Outbox;
use crate::delivery::registry::{Control, Flush, SessionLink};
use crate::delivery::writer::{Shared, Socket};

/// How long a test waits for bytes it expects before it fails.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel of org 1's `topic`.
pub(crate) fn channel(topic: &str) -> ChannelKey {
    ChannelKey::new(&OrgId::parse("1").unwrap(), &Topic::parse(topic).unwrap())
}

/// JSON event `n` of `channel`, about call `call` when given (its conflation key).
pub(crate) fn event(channel: &ChannelKey, n: u64, call: Option<&str>) -> Arc<Event> {
    let data = match call {
        Some(call) => serde_json::json!({ "n": n, "call_id": call }),
        None => serde_json::json!({ "n": n }),
    };
    let body = PublishBody::Json {
        event: "call.status".into(),
        data,
    };
    build_event(channel.clone(), id(n), &body, None, Instant::now())
}

/// Binary frame `n` of `channel`.
pub(crate) fn binary(channel: &ChannelKey, n: u64) -> Arc<Event> {
    let body = PublishBody::Binary(Bytes::from(format!("audio {n}")));
    build_event(channel.clone(), id(n), &body, None, Instant::now())
}

fn id(n: u64) -> EventId {
    EventId {
        ms: 1_000 + n,
        seq: 0,
    }
}

/// The bytes the client receives for `events`, in order.
pub(crate) fn frames(events: &[&Arc<Event>]) -> Vec<u8> {
    events.iter().flat_map(|e| e.ws_frame.to_vec()).collect()
}

/// Kernel socket buffers of the pair.
#[derive(Clone, Copy)]
pub(crate) enum Buffers {
    /// The system's defaults.
    Default,
    /// 16 KiB each way (about 50 KiB in flight on loopback), so a write of [`FILL`] bytes
    /// blocks until the client reads. Smaller windows drain slowly (delayed ACKs).
    Small,
}

/// More than a [`Buffers::Small`] pair holds in flight.
pub(crate) const FILL: usize = 256 * 1024;

/// A connected loopback pair: the server end as a [`Socket`], the client end as a [`Peer`].
pub(crate) async fn socket_pair(buffers: Buffers) -> (Rc<Socket>, Peer) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client.expect("connect");
    let (server, _) = accepted.expect("accept");
    if let Buffers::Small = buffers {
        socket2::SockRef::from(&server)
            .set_send_buffer_size(16 * 1024)
            .expect("SO_SNDBUF");
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(16 * 1024)
            .expect("SO_RCVBUF");
    }
    // The read half may go: the write half keeps the connection.
    let (_read, write) = server.into_split();
    (
        Socket::new(write, Shared::default()),
        Peer { stream: client },
    )
}

/// The client's end of a pair.
pub(crate) struct Peer {
    pub(crate) stream: TcpStream,
}

impl Peer {
    /// Read exactly `expected.len()` bytes and compare them with `expected`.
    pub(crate) async fn expect(&mut self, expected: &[u8]) {
        let mut got = vec![0; expected.len()];
        tokio::time::timeout(READ_TIMEOUT, self.stream.read_exact(&mut got))
            .await
            .expect("the bytes within the read timeout")
            .expect("read");
        assert!(
            got == expected,
            "got {:?}, expected {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expected)
        );
    }

    /// Read until the server closes its side.
    pub(crate) async fn read_to_end(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(READ_TIMEOUT, self.stream.read_to_end(&mut got))
            .await
            .expect("EOF within the read timeout")
            .expect("read");
        got
    }

    /// Read what has arrived, at least one byte, waiting for it on the wall clock. With
    /// tokio's clock paused, an awaited read would leave the runtime idle, and the clock would
    /// jump to the next timer (a stall timeout) while the kernel is still moving the bytes.
    pub(crate) async fn read_arrived(&mut self, buf: &mut [u8]) -> usize {
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            match self.stream.try_read(buf) {
                Ok(0) => panic!("the server closed the connection"),
                Ok(n) => return n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "nothing arrived within {READ_TIMEOUT:?}"
                    );
                    // Runnable again at once: the runtime polls for I/O without idling.
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// True when no byte has arrived (a peek that would block).
    pub(crate) fn nothing_arrived(&self) -> bool {
        let mut byte = [MaybeUninit::uninit()];
        match socket2::SockRef::from(&self.stream).peek(&mut byte) {
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    }
}

/// A session's output as the writer polls it: what the test sends on the returned sender
/// is what the session wrote; dropping the sender ends the session.
pub(crate) fn session() -> (
    UnboundedSender<Bytes>,
    impl Stream<Item = Result<Bytes, actix_web::Error>>,
) {
    let (tx, mut rx) = unbounded_channel::<Bytes>();
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|b| b.map(Ok)));
    (tx, stream)
}

/// What reached a session's mailboxes.
#[derive(Debug)]
pub(crate) enum Got {
    Flush,
    Control(Control),
}

/// Forwards a session's mailbox messages to the test.
struct Mailbox(UnboundedSender<Got>);

impl Actor for Mailbox {
    type Context = Context<Self>;
}

impl Handler<Flush> for Mailbox {
    type Result = ();

    fn handle(&mut self, _: Flush, _: &mut Self::Context) {
        let _ = self.0.send(Got::Flush);
    }
}

impl Handler<Control> for Mailbox {
    type Result = ();

    fn handle(&mut self, control: Control, _: &mut Self::Context) {
        let _ = self.0.send(Got::Control(control));
    }
}

/// A session link with an outbox of `capacity` under `policy`, and what reaches its mailbox.
/// `flush`: woken by `Flush` messages (an SSE stream); otherwise by its outbox's waker (a
/// WebSocket writer). Needs a running actix System.
pub(crate) fn link(
    capacity: usize,
    policy: SlowConsumerPolicy,
    flush: bool,
) -> (Arc<SessionLink>, UnboundedReceiver<Got>) {
    let (tx, rx) = unbounded_channel();
    let mailbox = Mailbox(tx).start();
    let link = SessionLink {
        conn: ConnId::next(),
        identity: Identity {
            user: UserId::parse("u1").expect("a valid user id"),
            org: OrgId::parse("1").expect("a valid org id"),
            sid: "test-login".to_owned(),
            exp: u64::MAX,
        },
        slot: String::new(),
        outbox: Outbox::new(capacity, policy),
        flush: flush.then(|| mailbox.clone().recipient()),
        control: mailbox.recipient(),
    };
    (Arc::new(link), rx)
}
