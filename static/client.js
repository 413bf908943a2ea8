/* switchboard browser client (plain ES2017, no dependencies). Served at GET /client.js (a
 * classic script: sets window.Switchboard; under Node/CommonJS: module.exports) and wrapped
 * as an ES module at GET /client.mjs (`import { Switchboard } from '/client.mjs'`). Types:
 * GET /client.d.ts.
 *
 *   const sb = new Switchboard({ url, onEvent(evt), onStatus(status, detail), onWelcome(info),
 *                                onBinary(arrayBuffer), onFrame(direction, frame) });
 *   sb.connect(); sb.subscribe('calls'); sb.unsubscribe('calls');
 *   sb.publish('voice:abc:in', {...}, 'chunk'); sb.stream('voice:abc:in'); sb.sendBinary(buf);
 *   sb.close();
 *
 * Transports: the WebSocket (`/ws`), and Server-Sent Events (`/sse`, receive only) when the
 * network blocks WebSockets: after WS_FAILURES_BEFORE_SSE sockets in a row fail before they
 * open (a proxy that strips `Upgrade` makes the hub answer 426, which a page sees only as a
 * 1006), the client switches to SSE, says so (`detail.transport === 'sse'`), resumes every
 * topic with `Last-Event-ID`, and tries the WebSocket again (once as soon as SSE is up, in
 * case the failures were a hub restart, then after 1, 2, 4 ... up to 10 minutes), switching
 * back once one is welcomed. `sb.transport` is 'websocket' or 'sse'.
 *
 * Status values passed to onStatus(status, detail):
 *   'connecting'          {url, attempt, transport}
 *   'open'                welcome info {conn_id, user, org, heartbeat_ms} + {transport, fallback?}
 *   'closed'              {code, reason, willRetry}  (willRetry false: stopped, e.g. 4409 or close())
 *   'refused'             {code, reason}  4401 unauthenticated / 4403 origin not allowed: no retry
 *   'reconnect-scheduled' {delay, attempt, code, reason}  (code/reason of the close that caused it)
 *   'resync'              {topic}  history did not reach back to the last seen event: reload state
 *   'error'               {code, message}  an error frame from the server; the socket stays open
 *
 * Reconnects use capped exponential backoff with full jitter (a random delay up to
 * min(cap, base * 2^attempt)); 4429 (too many connections) and 1013 (slow consumer / try
 * later) wait longer; a `{"type":"reconnect","after_ms":N}` from a draining server is obeyed
 * exactly; 4401 and 4403 are never retried (connect() again, e.g. after signing in).
 *
 * Tests and unusual hosts may inject the environment: opts.WebSocket, opts.fetch,
 * opts.sseUrl, opts.random() and opts.clock {now, setTimeout, clearTimeout, setInterval,
 * clearInterval}.
 */
(function (global) {
  'use strict';

  var PING_INTERVAL_MS = 20000;   // app-level ping (browsers cannot see protocol pings)
  var MAX_MISSED_PONGS = 2;       // this many unanswered pings = dead link
  var BACKOFF_BASE_MS = 500;
  var BACKOFF_MAX_MS = 30000;
  var MIN_DELAY_MS = 100;         // full jitter may draw ~0: never spin
  // 4429 (cap reached) and 1013 (slow consumer / overloaded): coming straight back cannot help.
  var SLOW_BASE_MS = 5000;
  var SLOW_MAX_MS = 120000;
  var WS_FAILURES_BEFORE_SSE = 3; // sockets in a row that fail before `open`
  var WS_PROBE_MS = 60000;        // while on SSE, try the WebSocket again after this ...
  var WS_PROBE_MAX_MS = 600000;   // ... doubling up to this
  var STABLE_MS = 10000;          // a connection up this long starts the backoff afresh
  var NO_RETRY = { 4401: 'refused', 4403: 'refused', 4409: 'closed' };
  var SLOW_CODES = { 4429: true, 1013: true };
  // HTTP refusals of GET /sse, as the WebSocket close codes they stand for (SPEC 3).
  var HTTP_CODES = { 401: 4401, 403: 4403, 429: 4429, 503: 1013 };

  function noop() {}
  function safe(fn, name, a, b) {
    try { fn(a, b); } catch (e) { console.error('switchboard ' + name, e); }
  }

  function defaultUrl() {
    var loc = global.location;
    if (!loc) throw new Error('switchboard: no location; pass opts.url');
    return (loc.protocol === 'https:' ? 'wss://' : 'ws://') + loc.host + '/ws';
  }

  // ws://host/ws -> http://host/sse
  function sseUrlFor(wsUrl) {
    var m = /^ws(s?):\/\/([^/?#]+)/.exec(wsUrl);
    return m ? 'http' + m[1] + '://' + m[2] + '/sse' : '/sse';
  }

  // Event ids are `<unix-ms>-<seq>`; returns [ms, seq] or null for anything else.
  function parseId(id) {
    var m = /^(\d+)-(\d+)$/.exec(String(id));
    return m ? [Number(m[1]), Number(m[2])] : null;
  }

  // -1, 0, 1 comparing two event ids numerically (ms, then seq); null when either is unparsable.
  function compareIds(a, b) {
    var x = parseId(a), y = parseId(b);
    if (!x || !y) return null;
    if (x[0] !== y[0]) return x[0] < y[0] ? -1 : 1;
    if (x[1] !== y[1]) return x[1] < y[1] ? -1 : 1;
    return 0;
  }

  // Splits a text/event-stream into records; feed() returns the complete ones so far.
  function SseParser() { this.buf = ''; }
  SseParser.prototype.feed = function (text) {
    this.buf += text.replace(/\r\n?/g, '\n');
    var out = [], at;
    while ((at = this.buf.indexOf('\n\n')) >= 0) {
      var block = this.buf.slice(0, at);
      this.buf = this.buf.slice(at + 2);
      var rec = { event: 'message', data: [], id: null, retry: null };
      block.split('\n').forEach(function (line) {
        if (!line || line.charAt(0) === ':') return;
        var i = line.indexOf(':');
        var field = i < 0 ? line : line.slice(0, i);
        var value = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
        if (field === 'data') rec.data.push(value);
        else if (field === 'event') rec.event = value;
        else if (field === 'id') rec.id = value;
        else if (field === 'retry') rec.retry = Number(value);
      });
      if (rec.data.length || rec.id !== null) { rec.data = rec.data.join('\n'); out.push(rec); }
    }
    return out;
  };

  function Switchboard(opts) {
    opts = opts || {};
    this.url = opts.url || defaultUrl();
    this.sseUrl = opts.sseUrl || sseUrlFor(this.url);
    this.onEvent = opts.onEvent || noop;
    this.onStatus = opts.onStatus || noop;
    this.onWelcome = opts.onWelcome || noop;
    this.onBinary = opts.onBinary || noop;
    this.onFrame = opts.onFrame || noop;
    this.WebSocket = opts.WebSocket || global.WebSocket;
    this.fetch = opts.fetch || (global.fetch ? global.fetch.bind(global) : null);
    this.random = opts.random || Math.random;
    var c = opts.clock || {};
    var pick = function (name, fallback) { return c[name] ? c[name].bind(c) : fallback; };
    this.clock = {
      now: pick('now', function () { return Date.now(); }),
      setTimeout: pick('setTimeout', function (f, ms) { return setTimeout(f, ms); }),
      clearTimeout: pick('clearTimeout', function (t) { clearTimeout(t); }),
      setInterval: pick('setInterval', function (f, ms) { return setInterval(f, ms); }),
      clearInterval: pick('clearInterval', function (t) { clearInterval(t); }),
    };
    this.ws = null;
    this.sse = null;            // {abort} of the running SSE request
    this.transport = 'websocket';
    this.wsFailures = 0;        // sockets in a row that failed before `open`
    this.probeDelay = WS_PROBE_MS;
    this.probeTimer = null;
    this.probedOnce = false;    // the WebSocket was tried once right after SSE came up
    this.info = null;           // last welcome
    this.status = 'closed';
    this.topics = new Map();    // wanted topic -> {binary}
    this.lastIds = new Map();   // topic -> last event id seen
    this.streamTopic = null;
    this.attempt = 0;           // consecutive failed connections, for backoff
    this.stopped = true;
    this.retryTimer = null;
    this.pingTimer = null;
    this.missedPongs = 0;
    this.drainAt = null;        // when a {"type":"reconnect"} frame asked us to come back
    this.openedAt = 0;
  }

  Switchboard.compareIds = compareIds;
  Switchboard.SseParser = SseParser;

  Switchboard.prototype._status = function (status, detail) {
    if (status !== 'resync' && status !== 'error') this.status = status;
    safe(this.onStatus, 'onStatus', status, detail);
  };

  Switchboard.prototype._send = function (msg) {
    var ws = this.ws;
    if (!ws || ws.readyState !== 1 || !this.info || this.transport !== 'websocket') return false;
    ws.send(JSON.stringify(msg));
    safe(this.onFrame, 'onFrame', 'out', msg);
    return true;
  };

  // Open a connection now (also after a refusal, e.g. once the user has logged in). No-op when
  // one is already open or opening.
  Switchboard.prototype.connect = function () {
    this.stopped = false;
    // Already open or opening (a WebSocket probe does not count while on SSE); a pending drain
    // reconnect (if any) stays scheduled.
    if (this.transport === 'sse' ? this.sse : this.ws) return this;
    this.clock.clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.drainAt = null;
    this.info = null;
    if (this.transport === 'sse') return this._openSse();
    this._status('connecting', { url: this.url, attempt: this.attempt, transport: 'websocket' });
    this._openWs(false);
    return this;
  };

  // A WebSocket; `probe`: we are on SSE and only trying whether WebSockets work again.
  Switchboard.prototype._openWs = function (probe) {
    var self = this;
    var ws;
    try {
      ws = new this.WebSocket(this.url);
    } catch (e) { // a malformed URL: retrying cannot help
      if (probe) return;
      this.stopped = true;
      this._status('closed', { code: 0, reason: String(e && e.message || e), willRetry: false });
      return;
    }
    ws.binaryType = 'arraybuffer';
    var opened = false;
    this.ws = ws;
    ws.onopen = function () { opened = true; };
    ws.onmessage = function (msg) {
      if (self.ws !== ws) return;
      if (self.transport === 'sse') { // the probe got through: back to the WebSocket
        self._closeSse();
        self.transport = 'websocket';
        self.clock.clearTimeout(self.probeTimer);
        self.probeTimer = null;
        self.probeDelay = WS_PROBE_MS;
      }
      self._onMessage(msg.data);
    };
    ws.onclose = function (ev) {
      if (self.ws !== ws) return;
      if (self.transport === 'sse') { // a failed probe: stay on SSE, try again later
        self.ws = null;
        self._scheduleProbe();
        return;
      }
      self._onClose(ev.code, ev.reason, opened);
    };
    ws.onerror = function () { /* always followed by close, which carries the detail */ };
  };

  // Close the current connection (if any) and connect again at once.
  Switchboard.prototype.reconnect = function () {
    this._drop(1000, 'reconnecting');
    this._closeSse();
    this.attempt = 0;
    return this.connect();
  };

  // Stop for good: no reconnect until connect() is called again.
  Switchboard.prototype.close = function () {
    var wasOpen = !!(this.ws || this.sse);
    this.stopped = true;
    this.clock.clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.clock.clearTimeout(this.probeTimer);
    this.probeTimer = null;
    this._drop(1000, 'closed by client');
    this._closeSse();
    if (wasOpen || this.status !== 'closed') {
      this._status('closed', { code: 1000, reason: 'closed by client', willRetry: false });
    }
    return this;
  };

  Switchboard.prototype.subscribe = function (topic, options) {
    var had = this.topics.has(topic);
    this.topics.set(topic, { binary: !!(options && options.binary) });
    if (this.transport === 'sse') { if (!had) this._restartSse(); return this; }
    this._sendSubscribe(topic);
    return this;
  };

  Switchboard.prototype.unsubscribe = function (topic) {
    var had = this.topics.delete(topic);
    this.lastIds.delete(topic);
    if (this.transport === 'sse') { if (had) this._restartSse(); return this; }
    this._send({ type: 'unsubscribe', topic: topic });
    return this;
  };

  // Publish to a topic the server lets clients publish to (auth.client_publish). Returns false
  // when the socket is not open or the client is on SSE (receive only); nothing is queued:
  // live data is stale by the time we reconnect.
  Switchboard.prototype.publish = function (topic, data, eventName) {
    var msg = { type: 'publish', topic: topic, data: data === undefined ? null : data };
    if (eventName) msg.event = eventName;
    return this._send(msg);
  };

  // Direct later binary frames (sendBinary) to a topic; re-sent after every reconnect.
  Switchboard.prototype.stream = function (topic) {
    this.streamTopic = topic;
    return this._send({ type: 'stream', topic: topic });
  };

  Switchboard.prototype.sendBinary = function (buf) {
    var ok = !!(this.transport === 'websocket' && this.ws && this.ws.readyState === 1 &&
                this.info && this.streamTopic);
    if (ok) this.ws.send(buf);
    return ok;
  };

  Switchboard.prototype._sendSubscribe = function (topic) {
    var want = this.topics.get(topic);
    var msg = { type: 'subscribe', topic: topic };
    var since = this.lastIds.get(topic);
    if (since) msg.since = since;
    if (want && want.binary) msg.binary = true;
    return this._send(msg);
  };

  Switchboard.prototype._onMessage = function (raw) {
    if (typeof raw !== 'string') {
      return safe(this.onBinary, 'onBinary', raw);
    }
    var msg = null;
    try { msg = JSON.parse(raw); } catch (e) { /* reported below */ }
    if (!msg || typeof msg !== 'object') {
      return this._status('error', { code: 'bad_frame', message: 'unparsable frame from server' });
    }
    safe(this.onFrame, 'onFrame', 'in', msg);
    switch (msg.type) {
      case 'welcome': return this._onWelcome(msg);
      case 'event': return this._onEvent(msg);
      case 'subscribed':
        if (msg.recovered === false) this._status('resync', { topic: msg.topic });
        return;
      case 'pong': this.missedPongs = 0; return;
      case 'error': return this._status('error', { code: msg.code, message: msg.message });
      case 'reconnect':
        return this._onDrain(Number(msg.after_ms) || 0);
      case 'close': // SSE only: why the stream ends
        this._closeSse();
        return this._afterClose(Number(msg.code) || 1006, String(msg.reason || ''));
      default:
        return; // 'unsubscribed' and anything newer: nothing to do
    }
  };

  Switchboard.prototype._onWelcome = function (msg) {
    var self = this;
    this.info = msg;
    this.openedAt = this.clock.now();
    this.missedPongs = 0;
    this.wsFailures = this.transport === 'websocket' ? 0 : this.wsFailures;
    this.clock.clearInterval(this.pingTimer);
    this.pingTimer = null;
    var detail = {};
    Object.keys(msg).forEach(function (k) { detail[k] = msg[k]; });
    detail.transport = this.transport;
    if (this.transport === 'sse') {
      detail.fallback = 'WebSockets are blocked on this network; receiving over server-sent ' +
        'events instead (will try WebSockets again)';
      this._status('open', detail);
      safe(this.onWelcome, 'onWelcome', msg);
      // Sockets also fail before `open` while the hub restarts, and then SSE comes up when
      // the WebSocket would have too: try one at once, then back off the probes.
      if (!this.probedOnce) {
        this.probedOnce = true;
        this.clock.clearTimeout(this.probeTimer);
        this.probeTimer = null;
        if (!this.ws) this._openWs(true);
      }
      return; // topics were in the request; no pings (the server's comments keep it alive)
    }
    this.pingTimer = this.clock.setInterval(function () { self._ping(); }, PING_INTERVAL_MS);
    this._status('open', detail);
    safe(this.onWelcome, 'onWelcome', msg);
    this.topics.forEach(function (_, topic) { self._sendSubscribe(topic); });
    if (this.streamTopic) this._send({ type: 'stream', topic: this.streamTopic });
  };

  Switchboard.prototype._onEvent = function (msg) {
    var topic = msg.topic;
    if (msg.id != null) {
      var last = this.lastIds.get(topic);
      var cmp = last == null ? 1 : compareIds(msg.id, last);
      if (cmp !== null && cmp <= 0) return; // duplicate, or replayed twice
      if (cmp !== null || parseId(msg.id)) this.lastIds.set(topic, String(msg.id));
    }
    safe(this.onEvent, 'onEvent', msg);
  };

  Switchboard.prototype._ping = function () {
    if (this.missedPongs >= MAX_MISSED_PONGS) {
      var reason = 'no pong from server for ' + (MAX_MISSED_PONGS * PING_INTERVAL_MS / 1000) + ' s';
      this._drop(4000, 'dead link');
      this._afterClose(0, reason);
      return;
    }
    if (this._send({ type: 'ping' })) this.missedPongs += 1;
  };

  // The server is draining: reconnect after exactly `delay` ms, whatever the close that follows.
  Switchboard.prototype._onDrain = function (delay) {
    var self = this;
    this.drainAt = this.clock.now() + delay;
    this.attempt = 0;
    this.clock.clearTimeout(this.retryTimer);
    this.retryTimer = this.clock.setTimeout(function () {
      self.retryTimer = null;
      self._drop(1000, 'reconnecting');
      self._closeSse();
      if (!self.stopped) self.connect();
    }, delay);
    this._status('reconnect-scheduled', { delay: delay, attempt: 0, code: 1012, reason: 'server draining' });
  };

  // Detach and close the current socket without triggering our close handling.
  Switchboard.prototype._drop = function (code, reason) {
    this.clock.clearInterval(this.pingTimer);
    this.pingTimer = null;
    var ws = this.ws;
    this.ws = null;
    if (this.transport === 'websocket') this.info = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(code, reason); } catch (e) { /* already closed */ }
    }
  };

  Switchboard.prototype._onClose = function (code, reason, opened) {
    var welcomed = !!this.info;
    var draining = this.drainAt !== null;
    this._drop(1000, '');
    if (draining && !this.stopped) {
      // A reconnect is already scheduled at the server's chosen moment; the 1012 is expected.
      this._status('closed', { code: code, reason: reason || 'server restarting', willRetry: true });
      var left = Math.max(0, this.drainAt - this.clock.now());
      this._status('reconnect-scheduled', { delay: left, attempt: 0, code: code, reason: reason });
      return;
    }
    if (!opened && !welcomed && !NO_RETRY[code] && !SLOW_CODES[code]) {
      this.wsFailures += 1;
      if (!reason) {
        reason = 'connection failed before the server accepted it (network, proxy, or an HTTP refusal)';
      }
      if (this.wsFailures >= WS_FAILURES_BEFORE_SSE && this.fetch && !this.stopped) {
        // WebSockets look blocked (e.g. a proxy that strips Upgrade, answered 426).
        this.transport = 'sse';
        this.probedOnce = false;
        this.probeDelay = WS_PROBE_MS;
        this.attempt = 0;
        this._status('closed', { code: code, reason: reason, willRetry: true });
        this._openSse();
        return;
      }
    } else if (opened) {
      this.wsFailures = 0;
    }
    this._afterClose(code, reason || '');
  };

  Switchboard.prototype._afterClose = function (code, reason) {
    if (this.stopped) return;
    var kind = NO_RETRY[code];
    if (kind) {
      this.stopped = true;
      this.clock.clearTimeout(this.probeTimer);
      this.probeTimer = null;
      if (kind === 'refused') this._status('refused', { code: code, reason: reason });
      else this._status('closed', { code: code, reason: reason, willRetry: false });
      return;
    }
    // A connection that stayed up a while starts the backoff afresh.
    if (this.openedAt && this.clock.now() - this.openedAt > STABLE_MS) this.attempt = 0;
    this.openedAt = 0;
    this._status('closed', { code: code, reason: reason, willRetry: true });
    this._schedule(this._backoff(SLOW_CODES[code]), code, reason);
  };

  // Full jitter: a uniform delay up to min(cap, base * 2^attempt); longer base and cap for
  // 4429/1013, where the server asked us to stay away.
  Switchboard.prototype._backoff = function (slow) {
    var base = slow ? SLOW_BASE_MS : BACKOFF_BASE_MS;
    var cap = slow ? SLOW_MAX_MS : BACKOFF_MAX_MS;
    var ceiling = Math.min(cap, base * Math.pow(2, this.attempt));
    var floor = slow ? SLOW_BASE_MS : MIN_DELAY_MS;
    return Math.round(Math.max(floor, this.random() * ceiling));
  };

  Switchboard.prototype._schedule = function (delay, code, reason) {
    var self = this;
    this.attempt += 1;
    this.clock.clearTimeout(this.retryTimer);
    this.retryTimer = this.clock.setTimeout(function () {
      self.retryTimer = null;
      if (!self.stopped) self.connect();
    }, delay);
    this._status('reconnect-scheduled', { delay: delay, attempt: this.attempt, code: code, reason: reason });
  };

  // ---- SSE fallback (fetch + a stream reader, so refusals show their HTTP status and the
  // ---- resume cursor can be sent on every request, which EventSource cannot do) ----------

  // `topic=id,...` for every topic with a last seen id (SPEC 7: one Last-Event-ID resumes all).
  Switchboard.prototype._cursor = function () {
    var parts = [];
    var self = this;
    this.topics.forEach(function (_, topic) {
      var id = self.lastIds.get(topic);
      if (id) parts.push(topic + '=' + id);
    });
    return parts.join(',');
  };

  Switchboard.prototype._openSse = function () {
    var self = this;
    if (this.topics.size === 0) { // nothing to stream yet: subscribe() will open it
      this._status('connecting', { url: this.sseUrl, attempt: this.attempt, transport: 'sse' });
      return this;
    }
    var query = [];
    this.topics.forEach(function (_, topic) { query.push('topic=' + encodeURIComponent(topic)); });
    var url = this.sseUrl + '?' + query.join('&');
    var headers = { Accept: 'text/event-stream' };
    var cursor = this._cursor();
    if (cursor) headers['Last-Event-ID'] = cursor;
    var ctrl = typeof AbortController !== 'undefined' ? new AbortController() : null;
    var handle = { aborted: false, abort: function () { handle.aborted = true; if (ctrl) ctrl.abort(); } };
    this.sse = handle;
    this._status('connecting', { url: url, attempt: this.attempt, transport: 'sse' });
    // The first WebSocket try comes when SSE is welcomed; after it, keep one probe pending.
    if (this.probedOnce && !this.probeTimer && !this.ws) this._scheduleProbe();
    var live = function () { return self.sse === handle && !handle.aborted; };
    var ended = function (code, reason) {
      if (!live()) return;
      self.sse = null;
      self.info = null;
      self._afterClose(code, reason);
    };
    this.fetch(url, { headers: headers, credentials: 'same-origin', cache: 'no-store',
                      signal: ctrl ? ctrl.signal : undefined })
      .then(function (res) {
        if (!live()) return null;
        if (!res.ok) {
          return res.text().then(function (body) {
            var reason = 'HTTP ' + res.status;
            try { var j = JSON.parse(body); if (j && j.detail) reason = String(j.detail); } catch (e) { /* text */ }
            ended(HTTP_CODES[res.status] || 1006, reason);
          });
        }
        return self._readSse(res, live).then(function () { ended(1006, 'event stream ended'); });
      })
      .catch(function (e) { ended(1006, 'event stream failed: ' + String(e && e.message || e)); });
    return this;
  };

  Switchboard.prototype._readSse = function (res, live) {
    var self = this;
    var parser = new SseParser();
    var reader = res.body.getReader();
    var decoder = new TextDecoder();
    function pump() {
      return reader.read().then(function (step) {
        if (!live()) { try { reader.cancel(); } catch (e) { /* gone */ } return; }
        if (step.done) return;
        parser.feed(decoder.decode(step.value, { stream: true })).forEach(function (rec) {
          if (live()) self._onSseRecord(rec);
        });
        return pump();
      });
    }
    return pump();
  };

  Switchboard.prototype._onSseRecord = function (rec) {
    var msg = null;
    try { msg = JSON.parse(rec.data); } catch (e) { /* below */ }
    if (!msg || typeof msg !== 'object') {
      return this._status('error', { code: 'bad_frame', message: 'unparsable record from server' });
    }
    if (!msg.type) { // an event record whose data is only the payload
      msg = { type: 'event', topic: null, event: rec.event, id: rec.id, data: msg };
    }
    this._onMessage(JSON.stringify(msg));
  };

  Switchboard.prototype._closeSse = function () {
    var sse = this.sse;
    this.sse = null;
    if (this.transport === 'sse') this.info = null;
    if (sse) sse.abort();
  };

  Switchboard.prototype._restartSse = function () {
    if (this.stopped) return;
    this._closeSse();
    this.connect();
  };

  // While on SSE, try a WebSocket now and then; the SSE stream stays up until one is welcomed.
  Switchboard.prototype._scheduleProbe = function () {
    var self = this;
    this.clock.clearTimeout(this.probeTimer);
    var delay = this.probeDelay;
    this.probeDelay = Math.min(WS_PROBE_MAX_MS, this.probeDelay * 2);
    this.probeTimer = this.clock.setTimeout(function () {
      self.probeTimer = null;
      if (self.stopped || self.transport !== 'sse' || self.ws) return;
      self._openWs(true);
    }, delay);
  };

  if (typeof module === 'object' && module && module.exports) module.exports = Switchboard;
  if (global) global.Switchboard = Switchboard;
})(typeof globalThis !== 'undefined' ? globalThis : typeof window !== 'undefined' ? window : this);
