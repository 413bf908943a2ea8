// Fakes for the client's unit tests: a clock that only moves when told, a WebSocket whose
// life the test drives, and a fetch that answers /sse with a stream the test writes to.

export class FakeClock {
  constructor() { this.t = 1_000_000; this.timers = new Map(); this.next = 1; }
  now() { return this.t; }
  setTimeout(fn, ms) { const id = this.next++; this.timers.set(id, { fn, at: this.t + ms, every: 0 }); return id; }
  setInterval(fn, ms) { const id = this.next++; this.timers.set(id, { fn, at: this.t + ms, every: ms }); return id; }
  clearTimeout(id) { this.timers.delete(id); }
  clearInterval(id) { this.timers.delete(id); }
  /** Delays of the pending one-shot timers, soonest first. */
  pending() { return [...this.timers.values()].filter((t) => !t.every).map((t) => t.at - this.t).sort((a, b) => a - b); }
  /** Move time forward by `ms`, running every timer that falls due, in order. */
  advance(ms) {
    const end = this.t + ms;
    for (;;) {
      let due = null;
      for (const [id, t] of this.timers) if (t.at <= end && (!due || t.at < due[1].at)) due = [id, t];
      if (!due) break;
      const [id, t] = due;
      this.t = t.at;
      if (t.every) t.at += t.every; else this.timers.delete(id);
      t.fn();
    }
    this.t = end;
  }
}

/** A WebSocket class whose instances are recorded in `sockets`, newest last. */
export function fakeWebSocket() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url; this.readyState = 0; this.sent = []; this.closed = null;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      sockets.push(this);
    }
    send(data) { this.sent.push(typeof data === 'string' ? JSON.parse(data) : data); }
    close(code, reason) { this.readyState = 3; this.closed = { code, reason }; }
    // ---- driven by the test ----
    open() { this.readyState = 1; this.onopen && this.onopen({}); }
    receive(msg) { this.onmessage && this.onmessage({ data: typeof msg === 'string' ? msg : JSON.stringify(msg) }); }
    welcome(extra = {}) { this.open(); this.receive({ type: 'welcome', conn_id: 'c1', user: 'u1', org: '42', heartbeat_ms: 10000, ...extra }); }
    serverClose(code, reason = '') { this.readyState = 3; this.onclose && this.onclose({ code, reason }); }
    /** What a browser reports when the handshake never completes (refused, 426, proxy). */
    fail() { this.onerror && this.onerror({}); this.serverClose(1006, ''); }
  }
  return { WebSocket: FakeWebSocket, sockets };
}

/** A fetch for /sse: each request is recorded in `requests` with methods to answer it. */
export function fakeFetch() {
  const requests = [];
  const encoder = new TextEncoder();
  function fetch(url, init = {}) {
    return new Promise((resolve, reject) => {
      let controller;
      const body = new ReadableStream({ start(c) { controller = c; } });
      const req = {
        url, headers: init.headers || {}, aborted: false,
        /** Answer 200 and keep the stream open for `write`. */
        accept() { resolve({ ok: true, status: 200, body, text: async () => '' }); },
        refuse(status, json) { resolve({ ok: false, status, body: null, text: async () => JSON.stringify(json) }); },
        write(text) { controller.enqueue(encoder.encode(text)); },
        end() { controller.close(); },
        fail(e) { reject(e); },
      };
      if (init.signal) init.signal.addEventListener('abort', () => { req.aborted = true; try { controller.error(new Error('aborted')); } catch { /* closed */ } });
      requests.push(req);
    });
  }
  return { fetch, requests };
}

/** Let pending promise callbacks (the fetch/stream chain) run. */
export async function settle() { for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r)); }

export function sseRecord({ id, event, data, retry }) {
  let s = '';
  if (retry != null) s += `retry: ${retry}\n`;
  if (id != null) s += `id: ${id}\n`;
  if (event != null) s += `event: ${event}\n`;
  return s + `data: ${typeof data === 'string' ? data : JSON.stringify(data)}\n\n`;
}
