//! One WebSocket connection's output, after the upgrade: the [`Socket`] (write half and the
//! frames not yet written) and the writer task that drives the session actor's context.
//! Three sources feed the socket, always in order: what the session wrote (welcome, replies,
//! replays, the close frame; and the worker's heartbeat pings), the live events waiting in the
//! session's [`Outbox`], and live events the worker's fan-out ([`crate::delivery::fanout`])
//! writes itself. Events skip the actor:
//! each is already a complete WebSocket frame, shared by every socket that receives it. While
//! a socket is idle (nothing pending, nothing from its session waiting) the fan-out appends
//! the event and writes it in the same pass over the topic's sockets, so a delivery costs no
//! task wake-up at all; otherwise the event waits in the outbox and the writer takes it when
//! what is ahead of it is out. All of a socket's waiting frames go out in one `writev`.
//!
//! The session decides what the socket wants ([`SessionShared::subscriptions`], the same
//! bookkeeping that makes `since` replay exact) and when it is closing; this module only
//! writes. A socket that accepts nothing for the stall timeout is dropped (its cap slot is
//! released as the session stops). Events stay in the outbox while the socket is blocked,
//! so a slow consumer conflates there instead of growing this side; what the session itself
//! writes meanwhile (replies, replays) is bounded too: past [`Bounds::max_backlog`] bytes the
//! session is told to close the socket as a slow consumer (1013).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use futures_util::Stream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::core::close::Close;
use crate::core::event::Event;
use crate::core::metrics::metrics;
use crate::delivery::outbox::Outbox;
use crate::delivery::registry::{Control, SessionLink};
use crate::delivery::subscriptions::Subscriptions;

/// What the session actor and its writer share. Both run in the same task on one thread
/// (the writer polls the actor's context), and never hold a borrow across that poll.
#[derive(Default)]
pub(crate) struct SessionShared {
    /// Set when the session is admitted: the outbox the writer drains.
    pub(crate) link: Option<Arc<SessionLink>>,
    pub(crate) subscriptions: Subscriptions,
    /// The session has written its close frame: no event may follow it.
    pub(crate) closing: bool,
}

pub(crate) type Shared = Rc<RefCell<SessionShared>>;

/// Frames written per `writev` at most (the kernel takes up to 1024; this bounds the stack).
const MAX_IOV: usize = 64;
/// Queue slots a socket keeps between bursts: enough for the usual one or two frames without
/// reallocating, little enough that 15,000 idle sockets do not hold megabytes of them.
const IDLE_QUEUE: usize = 4;
/// Turns of the loop per poll before yielding to other sockets of this worker.
const MAX_TURNS: usize = 16;
/// Several waiting frames of up to this many bytes in all are copied into one buffer and
/// go out in one `send()`: a fan-out pass that brings a socket a few events would otherwise
/// pay writev's iovec import for every socket, which costs more than copying them.
const FLAT_MAX: usize = 16 << 10;

thread_local! {
    /// This thread's buffer for [`FLAT_MAX`] writes (sockets never leave their thread).
    static FLAT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Wakes the writer's task and remembers that the session's context asked for it, so turns
/// woken only by events do not poll the actor at all.
#[derive(Default)]
struct ContextWake {
    wanted: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ContextWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wanted.store(true, Ordering::Release);
        self.task.wake();
    }
}

enum Frame {
    /// Bytes the session's context encoded (one or several frames).
    Session(Bytes),
    /// A live event's shared, pre-encoded frame.
    Event(Arc<Event>),
    /// The same, from the fan-out.
    Local(Rc<WorkerEvent>),
}

/// A worker's handle on a live event, one for all its sockets in a fan-out pass: counted
/// without atomics, where a clone of the event's `Arc` per socket would have both worker
/// threads write its shared count at once.
pub(crate) struct WorkerEvent(Arc<Event>);

impl WorkerEvent {
    pub(crate) fn new(event: &Arc<Event>) -> Rc<Self> {
        Rc::new(Self(event.clone()))
    }
}

impl Frame {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Session(bytes) => bytes,
            Self::Event(event) => &event.ws_frame,
            Self::Local(event) => &event.0.ws_frame,
        }
    }
}

/// One socket's output, shared by its writer task and the worker's fan-out (same thread).
pub(crate) struct Socket {
    write: OwnedWriteHalf,
    out: RefCell<Outgoing>,
    shared: Shared,
    wake: Arc<ContextWake>,
    /// False once the writer has ended: nothing more is written here.
    open: Cell<bool>,
    /// When the client was last heard from (any frame, pongs included), for the heartbeat.
    heard: Cell<Instant>,
}

/// Frames not yet written, oldest first.
#[derive(Default)]
struct Outgoing {
    pending: VecDeque<Frame>,
    /// Bytes of `pending[0]` already written.
    written_of_first: usize,
    /// Bytes written in all, so the writer can tell a slow socket from a stalled one.
    written: u64,
    /// Bytes of the session's own frames in `pending`.
    session_bytes: usize,
    /// The fan-out appended events in its current pass and will write them at its end.
    offered: bool,
}

/// What the fan-out's offer of an event came to.
pub(crate) enum Offer {
    /// Appended; `first` when it is the first this pass, so the socket must be flushed.
    Taken { first: bool },
    /// Written at once (what the socket did not take is left to its writer).
    Sent,
    /// Not for this socket now (held for a replay, already replayed, unsubscribed, closing).
    Declined,
    /// Something is ahead of it: the event must go through the outbox.
    Busy,
}

impl Socket {
    pub(crate) fn new(write: OwnedWriteHalf, shared: Shared) -> Rc<Self> {
        Rc::new(Self {
            write,
            out: RefCell::default(),
            shared,
            wake: Arc::new(ContextWake {
                wanted: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
            open: Cell::new(true),
            heard: Cell::new(Instant::now()),
        })
    }

    /// Queue `bytes` ahead of anything the session writes: the handshake's 101 response,
    /// which then goes out with the session's first frame in one write.
    pub(crate) fn lead_with(&self, bytes: Bytes) {
        if !bytes.is_empty() {
            let out = &mut *self.out.borrow_mut();
            // Room for this and that first frame only: a first push would reserve four slots,
            // kept by every idle socket until the next heartbeat sweep releases them.
            out.pending.reserve_exact(2);
            out.push_session(bytes);
        }
    }

    /// The client sent something: it is alive.
    pub(crate) fn heard(&self) {
        self.heard.set(Instant::now());
    }

    /// When the client was last heard from.
    pub(crate) fn last_heard(&self) -> Instant {
        self.heard.get()
    }

    /// Queue a complete frame the session wrote (a reply, a replayed event), after whatever
    /// it wrote before. The session runs only inside its writer's poll, which writes what is
    /// pending once the session has run: no wake-up is needed. Frames written this way
    /// instead of through the context leave the context's message queue empty, so an idle
    /// socket keeps no capacity there.
    pub(crate) fn session_frame(&self, frame: Bytes) {
        self.out.borrow_mut().push_session(frame);
    }

    /// The heartbeat's protocol Ping (empty payload), from outside the writer's task. Written
    /// at once when nothing is ahead of it, without queueing (an idle socket keeps no queue
    /// for it); otherwise queued behind what is pending and the writer woken. False when the
    /// socket is closing or closed: nothing may follow a close frame.
    pub(crate) fn ping(&self) -> bool {
        const PING: &[u8] = &[0x89, 0x00];
        if !self.open.get() || self.shared.borrow().closing {
            return false;
        }
        let ping = Bytes::from_static(PING);
        let mut out = self.out.borrow_mut();
        if out.pending.is_empty() && !out.offered {
            self.send_first(&mut out, Frame::Session(ping));
        } else {
            out.push_session(ping);
            self.wake.task.wake();
        }
        true
    }

    /// Write `frame` at once; nothing may be pending ahead of it. What the socket does not
    /// take is queued, and the writer woken to finish it.
    fn send_first(&self, out: &mut Outgoing, frame: Frame) {
        let written = match self.stream().try_write(frame.bytes()) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            // The peer is gone: the writer meets the error on its next write and ends.
            Err(_) => {
                self.wake.task.wake();
                return;
            }
        };
        out.written += written as u64;
        if written < frame.bytes().len() {
            out.push(frame);
            out.written_of_first = written;
            self.wake.task.wake();
        }
    }

    /// Give back the frame queue's capacity when nothing is pending: the heartbeat calls this
    /// once an interval, so a socket idle that long holds no queue, while a burst allocates
    /// at most once per interval rather than once per event.
    pub(crate) fn release_idle(&self) {
        if let Ok(mut out) = self.out.try_borrow_mut() {
            if out.pending.is_empty() && !out.offered {
                out.pending = VecDeque::new();
            }
        }
    }

    /// What the session and its writer share (subscriptions, closing).
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    fn stream(&self) -> &TcpStream {
        self.write.as_ref()
    }

    /// Take a live event for writing at the end of the fan-out's pass, if nothing must go
    /// before it: no frame pending, no event in the outbox, and the session not asking to run
    /// (it may be about to answer something the client sent first).
    /// `event` is this worker's handle on the event, one for all its sockets.
    pub(crate) fn offer(&self, event: &Rc<WorkerEvent>) -> Offer {
        self.take(event, false)
    }

    /// The same for the only event of a pass: with nothing ahead of it, it is written at
    /// once. Appending it and writing it at the end of the pass would only cost a second walk
    /// over the pass's sockets, which at thousands of sockets misses the cache for each.
    pub(crate) fn offer_alone(&self, event: &Rc<WorkerEvent>) -> Offer {
        self.take(event, true)
    }

    fn take(&self, event: &Rc<WorkerEvent>, write_now: bool) -> Offer {
        let Ok(mut out) = self.out.try_borrow_mut() else {
            return Offer::Busy;
        };
        if !out.offered
            && (!self.open.get()
                || !out.pending.is_empty()
                || self.wake.wanted.load(Ordering::Acquire))
        {
            return Offer::Busy;
        }
        let Ok(mut shared) = self.shared.try_borrow_mut() else {
            return Offer::Busy;
        };
        if shared.closing {
            return Offer::Declined;
        }
        if !out.offered && shared.link.as_ref().is_some_and(|l| !l.outbox.is_empty()) {
            return Offer::Busy;
        }
        if !shared.subscriptions.admits_live(&event.0) {
            return Offer::Declined;
        }
        if write_now && !out.offered {
            // Nothing is pending (checked above), so this frame goes first.
            self.send_first(&mut out, Frame::Local(event.clone()));
            return Offer::Sent;
        }
        out.push(Frame::Local(event.clone()));
        let first = !std::mem::replace(&mut out.offered, true);
        Offer::Taken { first }
    }

    /// Write what the fan-out appended. What the socket does not take now is left to the
    /// writer task (which waits for the socket and runs the stall timer).
    pub(crate) fn flush_offered(&self) {
        let mut out = self.out.borrow_mut();
        out.offered = false;
        if !matches!(out.write_to(self.stream()), Ok(true)) {
            self.wake.task.wake();
        }
    }
}

impl Outgoing {
    fn push_session(&mut self, bytes: Bytes) {
        self.push(Frame::Session(bytes));
    }

    fn push(&mut self, frame: Frame) {
        if let Frame::Session(bytes) = &frame {
            self.session_bytes += bytes.len();
        }
        self.pending.push_back(frame);
    }

    /// Forget every frame not yet begun (a frame half written must be finished, or the
    /// stream would be corrupt).
    fn drop_unstarted(&mut self) {
        let keep = usize::from(self.written_of_first > 0);
        for frame in self.pending.drain(keep.min(self.pending.len())..) {
            if let Frame::Session(bytes) = frame {
                self.session_bytes -= bytes.len();
            }
        }
    }

    /// Write as much as the socket takes without waiting. `Ok(true)`: all of it;
    /// `Ok(false)`: the socket is full.
    fn write_to(&mut self, stream: &TcpStream) -> io::Result<bool> {
        while !self.pending.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut count = 0;
            for (i, frame) in self.pending.iter().take(MAX_IOV).enumerate() {
                let bytes = frame.bytes();
                let bytes = if i == 0 {
                    &bytes[self.written_of_first..]
                } else {
                    bytes
                };
                slices[count] = IoSlice::new(bytes);
                count += 1;
            }
            // One frame (the usual case at low rates) goes through plain send(): cheaper in
            // the kernel than writev's iovec import and file-position locking; so do a few
            // small ones, copied into one buffer.
            let slices = &slices[..count];
            let written = if count == 1 {
                stream.try_write(&slices[0])
            } else if let Some(flat) = flatten(slices) {
                FLAT.with_borrow(|buffer| stream.try_write(&buffer[..flat]))
            } else {
                stream.try_write_vectored(slices)
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn advance(&mut self, mut written: usize) {
        self.written += written as u64;
        while let Some(first) = self.pending.front() {
            let left = first.bytes().len() - self.written_of_first;
            if written < left {
                self.written_of_first += written;
                return;
            }
            written -= left;
            self.written_of_first = 0;
            if let Some(Frame::Session(bytes)) = self.pending.pop_front() {
                self.session_bytes -= bytes.len();
            }
        }
        // An idle socket keeps (almost) no queue memory after a burst.
        if self.pending.capacity() > IDLE_QUEUE {
            self.pending.shrink_to(IDLE_QUEUE);
        }
    }
}

/// Copy `slices` into this thread's [`FLAT`] buffer if they total at most [`FLAT_MAX`]
/// bytes; answers how many bytes it holds then.
fn flatten(slices: &[IoSlice<'_>]) -> Option<usize> {
    let total: usize = slices.iter().map(|slice| slice.len()).sum();
    if total > FLAT_MAX {
        return None;
    }
    FLAT.with_borrow_mut(|buffer| {
        buffer.clear();
        for slice in slices {
            buffer.extend_from_slice(slice);
        }
    });
    Some(total)
}

/// How long and how much a socket may hold its writer up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// A socket that takes nothing for this long is dropped.
    pub(crate) stall_after: Duration,
    /// Bytes of the session's own frames that may wait for a blocked socket; past them the
    /// session is told to close it as a slow consumer.
    pub(crate) max_backlog: usize,
}

/// Run the session's context `session` against the socket until the session ends (its
/// stream finishes and everything it wrote is out), the peer goes away, or the socket stalls.
/// Not an `async fn`: its future would keep room for `session` inline for the socket's whole
/// life (the context is ~800 bytes) beside the boxed copy the writer polls; this one is just
/// the writer.
pub(crate) fn drive<S>(session: S, socket: Rc<Socket>, bounds: Bounds) -> impl Future<Output = ()>
where
    S: Stream<Item = Result<Bytes, actix_web::Error>>,
{
    Writer {
        session: Box::pin(session),
        context_waker: Waker::from(socket.wake.clone()),
        session_done: false,
        outbox: None,
        socket,
        batch: Vec::new(),
        stall: None,
        stall_after: bounds.stall_after,
        max_backlog: bounds.max_backlog,
        overflowed: false,
    }
}

struct Writer<S> {
    session: Pin<Box<S>>,
    /// The waker the context is polled with (built once: it is an `Arc` of the socket's
    /// `ContextWake`).
    context_waker: Waker,
    session_done: bool,
    outbox: Option<Arc<SessionLink>>,
    socket: Rc<Socket>,
    /// Scratch for draining the outbox.
    batch: Vec<Arc<Event>>,
    /// Armed while the socket is blocked, with the byte count it was armed (or last reset)
    /// at: any byte the socket takes restarts it.
    stall: Option<(u64, Pin<Box<Sleep>>)>,
    stall_after: Duration,
    max_backlog: usize,
    /// The session was told to close for its backlog.
    overflowed: bool,
}

impl<S> Drop for Writer<S> {
    fn drop(&mut self) {
        self.socket.open.set(false);
        self.socket.out.borrow_mut().pending.clear();
    }
}

/// Why the writer stops.
enum End {
    /// Finished, or the peer is gone: nothing more to do.
    Done,
    /// The socket accepted nothing for the stall timeout.
    Stalled,
}

enum Flushed {
    AllOut,
    Blocked,
    End(End),
}

impl<S> Writer<S>
where
    S: Stream<Item = Result<Bytes, actix_web::Error>>,
{
    /// Let the session run if it asked to; collect what it wrote.
    fn poll_session(&mut self, cx: &mut Context<'_>) {
        let wake = &self.socket.wake;
        wake.task.register(cx.waker());
        if self.session_done || !wake.wanted.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut context_cx = Context::from_waker(&self.context_waker);
        loop {
            match self.session.as_mut().poll_next(&mut context_cx) {
                Poll::Ready(Some(Ok(bytes))) => self.socket.out.borrow_mut().push_session(bytes),
                Poll::Ready(Some(Err(_)) | None) => {
                    self.session_done = true;
                    return;
                }
                Poll::Pending => return,
            }
        }
    }

    /// Move the events the socket wants from the outbox to `pending`.
    fn take_events(&mut self, cx: &mut Context<'_>) {
        if self.session_done {
            return;
        }
        let shared = &mut *self.socket.shared.borrow_mut();
        if shared.closing {
            return;
        }
        if self.outbox.is_none() {
            self.outbox = shared.link.clone();
        }
        let Some(link) = &self.outbox else {
            return;
        };
        let outbox: &Outbox = &link.outbox;
        outbox.register(cx.waker());
        outbox.drain_into(&mut self.batch);
        if self.batch.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut sent = 0u64;
        let out = &mut *self.socket.out.borrow_mut();
        for event in self.batch.drain(..) {
            if let Some(event) = shared.subscriptions.admit_live(event) {
                metrics()
                    .delivery_seconds
                    .observe(now.duration_since(event.received_at).as_secs_f64());
                out.push(Frame::Event(event));
                sent += 1;
            }
        }
        metrics().messages_delivered.inc_by(sent);
        if self.batch.capacity() > IDLE_QUEUE {
            self.batch.shrink_to(IDLE_QUEUE);
        }
    }

    /// Write as much of what is pending as the socket takes. `Ok(true)`: all of it.
    fn write_pending(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        let stream = self.socket.stream();
        loop {
            match self.socket.out.borrow_mut().write_to(stream) {
                Ok(true) => return Ok(true),
                Err(_) => return Err(End::Done),
                Ok(false) => {}
            }
            match stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Err(End::Done),
                Poll::Pending => return Ok(false),
            }
        }
    }

    fn turn(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        for _ in 0..MAX_TURNS {
            self.poll_session(cx);
            // Events are taken only once everything before them is out: while the socket is
            // blocked they wait (and conflate) in the outbox, not here.
            match self.flush(cx) {
                Flushed::AllOut => {}
                Flushed::Blocked => {
                    self.check_backlog();
                    return Poll::Pending;
                }
                Flushed::End(end) => return Poll::Ready(end),
            }
            self.take_events(cx);
            match self.flush(cx) {
                Flushed::AllOut => {}
                Flushed::Blocked => {
                    self.check_backlog();
                    return Poll::Pending;
                }
                Flushed::End(end) => return Poll::Ready(end),
            }
            if self.session_done {
                return Poll::Ready(End::Done);
            }
            // The session may have woken itself while it ran (a timer, its own message).
            if !self.socket.wake.wanted.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// A blocked socket with more of the session's frames waiting than the bound: drop what
    /// has not begun and have the session close the socket as a slow consumer (its close
    /// frame follows what is left). Without this, replies and replays would pile up here
    /// until the stall timeout.
    fn check_backlog(&mut self) {
        if self.overflowed || self.socket.out.borrow().session_bytes <= self.max_backlog {
            return;
        }
        self.overflowed = true;
        self.socket.out.borrow_mut().drop_unstarted();
        metrics().slow_consumer_disconnects.inc();
        log::info!(
            "closing a socket with more than {} bytes of replies waiting for it",
            self.max_backlog
        );
        // Not admitted (no link), the session writes nothing but its close frame anyway.
        if let Some(link) = &self.socket.shared.borrow().link {
            link.control.do_send(Control::Close(Close::SlowConsumer));
        }
    }

    /// Write what is pending; while the socket is blocked, the stall timer runs, restarted
    /// whenever the socket has taken something since: a slow reader is not a stalled one.
    fn flush(&mut self, cx: &mut Context<'_>) -> Flushed {
        match self.write_pending(cx) {
            Err(end) => Flushed::End(end),
            Ok(true) => {
                self.stall = None;
                Flushed::AllOut
            }
            Ok(false) => {
                let written = self.socket.out.borrow().written;
                let stall_after = self.stall_after;
                let (armed_at, stall) = self
                    .stall
                    .get_or_insert_with(|| (written, Box::pin(tokio::time::sleep(stall_after))));
                if *armed_at != written {
                    *armed_at = written;
                    stall
                        .as_mut()
                        .reset(tokio::time::Instant::now() + stall_after);
                }
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => Flushed::End(End::Stalled),
                    Poll::Pending => Flushed::Blocked,
                }
            }
        }
    }
}

impl<S> Future for Writer<S>
where
    S: Stream<Item = Result<Bytes, actix_web::Error>>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match this.turn(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(End::Done) => {
                let _ = socket2::SockRef::from(this.socket.stream())
                    .shutdown(std::net::Shutdown::Write);
                Poll::Ready(())
            }
            Poll::Ready(End::Stalled) => {
                // Counted already if it was closed for its backlog and stalled on the close.
                if !this.overflowed {
                    metrics().slow_consumer_disconnects.inc();
                }
                log::info!(
                    "dropping a socket that accepted nothing for {:?}",
                    this.stall_after
                );
                Poll::Ready(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::core::event::{build_event, PublishBody};
    use crate::core::ids::{ChannelKey, EventId};
    use crate::delivery::test_support::{
        channel, event, frames, link, session, socket_pair, Buffers, Got, Peer, FILL,
    };
    use tokio::sync::mpsc::UnboundedSender;
    use tokio::task::{spawn_local, JoinHandle};

    /// Small frames are copied into one buffer in order; too many bytes are left to writev.
    #[test]
    fn flatten_copies_small_frames_in_order() {
        let (a, b) = (vec![1u8; 3], vec![2u8; 5]);
        let slices = [IoSlice::new(&a), IoSlice::new(&b)];
        assert_eq!(flatten(&slices), Some(8));
        FLAT.with_borrow(|buffer| assert_eq!(&buffer[..], &[1, 1, 1, 2, 2, 2, 2, 2]));
        let big = vec![3u8; FLAT_MAX];
        assert_eq!(flatten(&[IoSlice::new(&big), IoSlice::new(&a)]), None);
        assert_eq!(flatten(&[IoSlice::new(&big)]), Some(FLAT_MAX));
    }

    /// A stall timeout no test that is not about stalls reaches.
    const NEVER: Duration = Duration::from_secs(3600);
    /// The stall timeout of the tests about stalls (on tokio's paused clock).
    const STALL: Duration = Duration::from_secs(10);

    fn writer<S>(frames: S, socket: &Rc<Socket>, stall_after: Duration) -> JoinHandle<()>
    where
        S: Stream<Item = Result<Bytes, actix_web::Error>> + 'static,
    {
        let bounds = Bounds {
            stall_after,
            max_backlog: usize::MAX,
        };
        spawn_local(drive(frames, socket.clone(), bounds))
    }

    /// Start the socket's writer and see the session's first frame through it: from here on
    /// the writer is idle and the socket open. Returns the session's input and the writer.
    async fn welcomed(
        socket: &Rc<Socket>,
        peer: &mut Peer,
    ) -> (UnboundedSender<Bytes>, JoinHandle<()>) {
        let (session, frames_of_session) = session();
        let writer = writer(frames_of_session, socket, NEVER);
        session.send(Bytes::from_static(b"welcome")).unwrap();
        peer.expect(b"welcome").await;
        (session, writer)
    }

    fn subscribe_live(socket: &Socket, channel: &ChannelKey) {
        let subscriptions = &mut socket.shared().borrow_mut().subscriptions;
        subscriptions.insert_live(channel.clone());
    }

    /// Offered events are written when the fan-out's pass ends, not before, in the order
    /// offered.
    #[actix_web::test]
    async fn offered_events_go_out_in_order_when_the_pass_ends() {
        let (socket, mut peer) = socket_pair(Buffers::Default).await;
        let calls = channel("calls");
        subscribe_live(&socket, &calls);
        let (_session, _writer) = welcomed(&socket, &mut peer).await;

        let (a, b) = (event(&calls, 1, None), event(&calls, 2, None));
        assert!(matches!(
            socket.offer(&WorkerEvent::new(&a)),
            Offer::Taken { first: true }
        ));
        assert!(matches!(
            socket.offer(&WorkerEvent::new(&b)),
            Offer::Taken { first: false }
        ));
        assert!(peer.nothing_arrived(), "written before the pass ended");
        socket.flush_offered();
        peer.expect(&frames(&[&a, &b])).await;
    }

    /// The only event of a pass goes out as it is offered, with no flush at the pass's end.
    #[actix_web::test]
    async fn an_event_offered_alone_goes_out_at_once() {
        let (socket, mut peer) = socket_pair(Buffers::Default).await;
        let calls = channel("calls");
        subscribe_live(&socket, &calls);
        let (_session, _writer) = welcomed(&socket, &mut peer).await;

        let a = event(&calls, 1, None);
        assert!(matches!(
            socket.offer_alone(&WorkerEvent::new(&a)),
            Offer::Sent
        ));
        peer.expect(&a.ws_frame).await;
        // And the socket is free for the next pass.
        let b = event(&calls, 2, None);
        assert!(matches!(
            socket.offer_alone(&WorkerEvent::new(&b)),
            Offer::Sent
        ));
        peer.expect(&b.ws_frame).await;
    }

    /// An event offered alone that the socket takes only in part is finished by the writer,
    /// and what follows waits for it: the peer gets both whole and in order.
    #[actix_web::test]
    async fn an_event_offered_alone_to_a_full_socket_is_finished_by_the_writer() {
        let (socket, mut peer) = socket_pair(Buffers::Small).await;
        let (big_channel, calls) = (channel("big"), channel("calls"));
        subscribe_live(&socket, &big_channel);
        subscribe_live(&socket, &calls);
        let (_session, _writer) = welcomed(&socket, &mut peer).await;

        let body = PublishBody::Binary(Bytes::from(vec![7u8; FILL]));
        let big = build_event(
            big_channel.clone(),
            EventId { ms: 1, seq: 0 },
            &body,
            None,
            Instant::now(),
        );
        assert!(matches!(
            socket.offer_alone(&WorkerEvent::new(&big)),
            Offer::Sent
        ));
        let after = event(&calls, 2, None);
        assert!(
            matches!(socket.offer_alone(&WorkerEvent::new(&after)), Offer::Busy),
            "an event overtook the rest of one the socket had not taken"
        );
        peer.expect(&big.ws_frame).await;
        assert!(matches!(
            socket.offer_alone(&WorkerEvent::new(&after)),
            Offer::Sent
        ));
        peer.expect(&after.ws_frame).await;
    }

    /// While the session has something to write (a reply to the client), an event must wait
    /// for it: the offer is busy until the session's frame is out.
    #[actix_web::test]
    async fn an_event_waits_for_what_the_session_is_about_to_write() {
        let (socket, mut peer) = socket_pair(Buffers::Default).await;
        let calls = channel("calls");
        subscribe_live(&socket, &calls);
        let (session, _writer) = welcomed(&socket, &mut peer).await;

        let a = event(&calls, 1, None);
        session.send(Bytes::from_static(b"reply")).unwrap();
        assert!(matches!(socket.offer(&WorkerEvent::new(&a)), Offer::Busy));
        peer.expect(b"reply").await;
        assert!(matches!(
            socket.offer(&WorkerEvent::new(&a)),
            Offer::Taken { first: true }
        ));
        socket.flush_offered();
        peer.expect(&a.ws_frame).await;
    }

    /// An event never overtakes one waiting in the outbox: the offer is busy until the writer
    /// has drained the outbox, whose events go out in order.
    #[actix_web::test]
    async fn an_event_waits_for_the_outbox() {
        let (socket, mut peer) = socket_pair(Buffers::Default).await;
        let calls = channel("calls");
        let (link, _mailbox) = link(16, SlowConsumerPolicy::Conflate, false);
        {
            let mut shared = socket.shared().borrow_mut();
            shared.link = Some(link.clone());
            shared.subscriptions.insert_live(calls.clone());
        }
        let (_session, _writer) = welcomed(&socket, &mut peer).await;

        let (a, b) = (event(&calls, 1, None), event(&calls, 2, None));
        link.outbox.push(&a);
        assert!(matches!(socket.offer(&WorkerEvent::new(&b)), Offer::Busy));
        link.outbox.push(&b);
        link.wake();
        peer.expect(&frames(&[&a, &b])).await;
        let c = event(&calls, 3, None);
        assert!(matches!(
            socket.offer(&WorkerEvent::new(&c)),
            Offer::Taken { first: true }
        ));
    }

    /// While the socket is blocked (the client reads slowly), events are busy; once the client
    /// has read everything, the next event is taken again.
    #[actix_web::test]
    async fn an_event_waits_while_the_socket_is_blocked() {
        let (socket, mut peer) = socket_pair(Buffers::Small).await;
        let calls = channel("calls");
        subscribe_live(&socket, &calls);
        let (session, frames_of_session) = session();
        let _writer = writer(frames_of_session, &socket, NEVER);
        let big = Bytes::from(vec![7u8; FILL]);
        session.send(big.clone()).unwrap();
        // One byte read: the writer has run, and is blocked on the rest.
        peer.expect(&big[..1]).await;

        let a = event(&calls, 1, None);
        assert!(matches!(socket.offer(&WorkerEvent::new(&a)), Offer::Busy));
        peer.expect(&big[1..]).await;
        assert!(matches!(
            socket.offer(&WorkerEvent::new(&a)),
            Offer::Taken { first: true }
        ));
        socket.flush_offered();
        peer.expect(&a.ws_frame).await;
    }

    /// Events the socket does not want now are declined: a channel not subscribed, one held
    /// for a replay, and anything once the session is closing.
    #[actix_web::test]
    async fn unwanted_events_are_declined() {
        let (socket, mut peer) = socket_pair(Buffers::Default).await;
        let (calls, queues) = (channel("calls"), channel("queues"));
        let (_session, _writer) = welcomed(&socket, &mut peer).await;

        assert!(matches!(
            socket.offer(&WorkerEvent::new(&event(&queues, 1, None))),
            Offer::Declined
        ));
        socket
            .shared()
            .borrow_mut()
            .subscriptions
            .insert_replaying(calls.clone());
        assert!(matches!(
            socket.offer(&WorkerEvent::new(&event(&calls, 2, None))),
            Offer::Declined
        ));
        {
            let mut shared = socket.shared().borrow_mut();
            shared.subscriptions.insert_live(calls.clone());
            shared.closing = true;
        }
        assert!(matches!(
            socket.offer(&WorkerEvent::new(&event(&calls, 3, None))),
            Offer::Declined
        ));
        assert!(peer.nothing_arrived());
    }

    /// A session that ends has its last frames written, then the socket's write side closed.
    #[actix_web::test]
    async fn a_session_that_ends_closes_the_socket_after_its_last_frame() {
        let (socket, mut peer) = socket_pair(Buffers::Default).await;
        let (session, frames_of_session) = session();
        let writer = writer(frames_of_session, &socket, NEVER);
        session.send(Bytes::from_static(b"last words")).unwrap();
        drop(session);
        writer.await.expect("the writer ends");
        assert_eq!(peer.read_to_end().await, b"last words");
    }

    /// A client that reads nothing is given up on after the stall timeout, not before.
    #[actix_web::test]
    async fn a_peer_that_reads_nothing_is_dropped_after_the_stall_timeout() {
        tokio::time::pause();
        let start = tokio::time::Instant::now();
        let (socket, mut peer) = socket_pair(Buffers::Small).await;
        let (session, frames_of_session) = session();
        let mut writer = writer(frames_of_session, &socket, STALL);
        let big = Bytes::from(vec![7u8; FILL]);
        session.send(big.clone()).unwrap();
        peer.expect(&big[..1]).await;

        let early = tokio::time::timeout(STALL / 2, &mut writer).await;
        assert!(early.is_err(), "dropped before the stall timeout");
        tokio::time::timeout(STALL, &mut writer)
            .await
            .expect("dropped at the stall timeout")
            .expect("the writer ends");
        assert!(start.elapsed() >= STALL);
        drop(session);
    }

    /// The session's frames waiting for a blocked socket are bounded: past the bound the
    /// session is told to close the socket as a slow consumer, and what had not begun is
    /// dropped, so its close frame comes right after the frame being written.
    #[actix_web::test]
    async fn a_backlog_past_the_bound_closes_the_socket_as_a_slow_consumer() {
        let (socket, mut peer) = socket_pair(Buffers::Small).await;
        let (link, mut mailbox) = link(16, SlowConsumerPolicy::Conflate, false);
        socket.shared().borrow_mut().link = Some(link);
        let (session, frames_of_session) = session();
        let bounds = Bounds {
            stall_after: NEVER,
            max_backlog: FILL,
        };
        let writer = spawn_local(drive(frames_of_session, socket.clone(), bounds));
        let big = Bytes::from(vec![7u8; FILL]);
        session.send(big.clone()).unwrap();
        // One byte read: the writer has run, and is blocked on the rest.
        peer.expect(&big[..1]).await;
        assert!(
            mailbox.try_recv().is_err(),
            "closed at the bound, not past it"
        );

        session
            .send(Bytes::from_static(b"a reply past the bound"))
            .unwrap();
        let told = tokio::time::timeout(Duration::from_secs(5), mailbox.recv()).await;
        assert!(
            matches!(
                told,
                Ok(Some(Got::Control(Control::Close(Close::SlowConsumer))))
            ),
            "the session was told {told:?}"
        );
        session.send(Bytes::from_static(b"close frame")).unwrap();
        drop(session);
        let mut rest = big[1..].to_vec();
        rest.extend_from_slice(b"close frame");
        assert!(
            peer.read_to_end().await == rest,
            "the reply was not dropped"
        );
        writer.await.expect("the writer ends");
    }

    /// A client that keeps reading, only slowly (a bit every quarter of the stall timeout),
    /// accepts something in every interval, so it is not dropped as stalled.
    #[actix_web::test]
    async fn a_slow_peer_that_keeps_reading_is_not_dropped() {
        tokio::time::pause();
        let (socket, mut peer) = socket_pair(Buffers::Small).await;
        let (session, frames_of_session) = session();
        let writer = writer(frames_of_session, &socket, STALL);
        session.send(Bytes::from(vec![7u8; FILL])).unwrap();
        // Whatever has arrived (the receive buffer's worth): reading less leaves the window
        // closed, and the kernel would not tell the writer that anything was taken.
        let mut buf = vec![0; 64 * 1024];
        let mut got = 0;
        while got < FILL {
            tokio::time::sleep(STALL / 4).await;
            assert!(
                !writer.is_finished(),
                "dropped after the client had read {got} bytes"
            );
            got += peer.read_arrived(&mut buf).await;
        }
        assert!(!writer.is_finished());
        drop(session);
    }
}
