//! A raw WebSocket client that never answers anything (for heartbeat tests): `RawWs` does the
//! upgrade by hand, then reads frames (`RawFrame`), so the hub's pings go unanswered, and
//! sends only the frames a test makes by hand (`client_frame`: fragments, floods).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::process::Hub;
use super::T;

/// A WebSocket spoken by hand: does the upgrade, then only reads frames.
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A frame read by `RawWs`: opcode and payload.
#[derive(Debug)]
pub enum RawFrame {
    Frame {
        opcode: u8,
        payload: Vec<u8>,
    },
    /// The server closed the TCP connection.
    Eof,
}

impl RawWs {
    /// Upgrade `GET /ws` with Origin and Cookie; panics unless the answer is 101.
    pub async fn connect(hub: &Hub, origin: &str, cookie: &str) -> RawWs {
        let stream = TcpStream::connect(hub.addr()).await.expect("connect");
        Self::upgrade(hub, origin, cookie, stream).await
    }

    /// Like `connect`, with the client's receive buffer set to `bytes` (a client that stops
    /// reading then blocks the hub's writes soon).
    pub async fn connect_with_recv_buffer(
        hub: &Hub,
        origin: &str,
        cookie: &str,
        bytes: u32,
    ) -> RawWs {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let stream = socket.connect(hub.addr()).await.expect("connect");
        Self::upgrade(hub, origin, cookie, stream).await
    }

    async fn upgrade(hub: &Hub, origin: &str, cookie: &str, mut stream: TcpStream) -> RawWs {
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Origin: {origin}\r\nCookie: {cookie}\r\n\r\n",
            hub.addr()
        );
        stream
            .write_all(req.as_bytes())
            .await
            .expect("write upgrade");
        let mut raw = RawWs {
            stream,
            buf: Vec::new(),
        };
        let head = loop {
            if let Some(end) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
                raw.buf.drain(..end + 4);
                break head;
            }
            let n = raw.fill(T).await.expect("upgrade answer within 5 s");
            assert!(
                n > 0,
                "server closed before answering the upgrade: {:?}",
                String::from_utf8_lossy(&raw.buf)
            );
        };
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade answer: {head}");
        raw
    }

    /// Write bytes as they are (frames made by `client_frame`).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    async fn fill(&mut self, timeout: Duration) -> Option<usize> {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(timeout, self.stream.read(&mut chunk)).await {
            Err(_) => None,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Some(n)
            }
            Ok(Err(_)) => Some(0),
        }
    }

    /// The next frame (or EOF), or None if nothing complete arrived within `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((opcode, payload, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(RawFrame::Frame { opcode, payload });
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.fill(left).await {
                None => return None,
                Some(0) => return Some(RawFrame::Eof),
                Some(_) => {}
            }
        }
    }
}

/// One masked client frame: `opcode` (0 for a continuation), `fin` false for every fragment
/// of a message but the last.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Parse one unmasked server frame from the front of `buf`: (opcode, payload, bytes used).
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let mut len = (buf[1] & 0x7f) as usize;
    let mut at = 2;
    if len == 126 {
        if buf.len() < 4 {
            return None;
        }
        len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        at = 4;
    } else if len == 127 {
        if buf.len() < 10 {
            return None;
        }
        len = u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize;
        at = 10;
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return None;
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < at + len {
        return None;
    }
    let mut payload = buf[at..at + len].to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Some((opcode, payload, at + len))
}
