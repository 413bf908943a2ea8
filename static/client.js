/* switchboard browser client (plain ES2017, no dependencies). Served at GET /client.js.
 *
 *   const sb = new Switchboard({ url, onEvent(evt), onStatus(status, detail), onWelcome(info),
 *                                onBinary(arrayBuffer), onFrame(direction, frame) });
 *   sb.connect(); sb.subscribe('calls'); sb.unsubscribe('calls');
 *   sb.publish('voice:abc:in', {...}, 'chunk'); sb.stream('voice:abc:in'); sb.sendBinary(buf);
 *   sb.close();
 *
 * Status values passed to onStatus(status, detail):
 *   'connecting'          {url, attempt}
 *   'open'                welcome info {conn_id, user, org, heartbeat_ms}
 *   'closed'              {code, reason, willRetry}  (willRetry false: stopped, e.g. 4409 or close())
 *   'refused'             {code, reason}  4401 unauthenticated / 4403 origin not allowed: no retry
 *   'reconnect-scheduled' {delay, attempt, code, reason}  (code/reason of the close that caused it)
 *   'resync'              {topic}  history did not reach back to the last seen event: reload state
 *   'error'               {code, message}  an error frame from the server; the socket stays open
 */
(function (global) {
  'use strict';

  var PING_INTERVAL_MS = 20000;   // app-level ping (browsers cannot see protocol pings)
  var MAX_MISSED_PONGS = 2;       // this many unanswered pings = dead link
  var BACKOFF_MIN_MS = 500;
  var BACKOFF_MAX_MS = 30000;
  var CAP_RETRY_MS = 30000;       // after 4429 too many connections
  var NO_RETRY = { 4401: 'refused', 4403: 'refused', 4409: 'closed' };

  function noop() {}
  function safe(fn, name, a, b) {
    try { fn(a, b); } catch (e) { console.error('switchboard ' + name, e); }
  }

  function defaultUrl() {
    var loc = global.location;
    return (loc.protocol === 'https:' ? 'wss://' : 'ws://') + loc.host + '/ws';
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

  function Switchboard(opts) {
    opts = opts || {};
    this.url = opts.url || defaultUrl();
    this.onEvent = opts.onEvent || noop;
    this.onStatus = opts.onStatus || noop;
    this.onWelcome = opts.onWelcome || noop;
    this.onBinary = opts.onBinary || noop;
    this.onFrame = opts.onFrame || noop;
    this.ws = null;
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

  Switchboard.prototype._status = function (status, detail) {
    if (status !== 'resync' && status !== 'error') this.status = status;
    safe(this.onStatus, 'onStatus', status, detail);
  };

  Switchboard.prototype._send = function (msg) {
    var ws = this.ws;
    if (!ws || ws.readyState !== 1 || !this.info) return false;
    ws.send(JSON.stringify(msg));
    safe(this.onFrame, 'onFrame', 'out', msg);
    return true;
  };

  // Open a socket now (also after a refusal, e.g. once the user has logged in). No-op when a
  // socket is already open or opening.
  Switchboard.prototype.connect = function () {
    this.stopped = false;
    if (this.ws) return this; // a pending drain reconnect (if any) stays scheduled
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    var self = this;
    var ws;
    this._status('connecting', { url: this.url, attempt: this.attempt });
    try {
      ws = new WebSocket(this.url);
    } catch (e) { // a malformed URL: retrying cannot help
      this.stopped = true;
      this._status('closed', { code: 0, reason: String(e && e.message || e), willRetry: false });
      return this;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.info = null;
    this.drainAt = null;
    ws.onmessage = function (msg) { if (self.ws === ws) self._onMessage(msg.data); };
    ws.onclose = function (ev) { if (self.ws === ws) self._onClose(ev.code, ev.reason); };
    ws.onerror = function () { /* always followed by close, which carries the detail */ };
    return this;
  };

  // Close the current socket (if any) and connect again at once.
  Switchboard.prototype.reconnect = function () {
    this._drop(1000, 'reconnecting');
    this.attempt = 0;
    return this.connect();
  };

  // Stop for good: no reconnect until connect() is called again.
  Switchboard.prototype.close = function () {
    var wasOpen = !!this.ws;
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this._drop(1000, 'closed by client');
    if (wasOpen || this.status !== 'closed') {
      this._status('closed', { code: 1000, reason: 'closed by client', willRetry: false });
    }
    return this;
  };

  Switchboard.prototype.subscribe = function (topic, options) {
    this.topics.set(topic, { binary: !!(options && options.binary) });
    this._sendSubscribe(topic);
    return this;
  };

  Switchboard.prototype.unsubscribe = function (topic) {
    this.topics.delete(topic);
    this.lastIds.delete(topic);
    this._send({ type: 'unsubscribe', topic: topic });
    return this;
  };

  // Publish to a topic the server lets clients publish to (auth.client_publish). Returns false
  // when the socket is not open (nothing is queued: live data is stale by the time we reconnect).
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
    var ok = !!(this.ws && this.ws.readyState === 1 && this.info && this.streamTopic);
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
      default:
        return; // 'unsubscribed' and anything newer: nothing to do
    }
  };

  Switchboard.prototype._onWelcome = function (msg) {
    var self = this;
    this.info = msg;
    this.openedAt = Date.now();
    this.missedPongs = 0;
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(function () { self._ping(); }, PING_INTERVAL_MS);
    this._status('open', msg);
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
    this.drainAt = Date.now() + delay;
    this.attempt = 0;
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(function () {
      self.retryTimer = null;
      self._drop(1000, 'reconnecting');
      if (!self.stopped) self.connect();
    }, delay);
    this._status('reconnect-scheduled', { delay: delay, attempt: 0, code: 1012, reason: 'server draining' });
  };

  // Detach and close the current socket without triggering our close handling.
  Switchboard.prototype._drop = function (code, reason) {
    clearInterval(this.pingTimer);
    this.pingTimer = null;
    var ws = this.ws;
    this.ws = null;
    this.info = null;
    if (ws) {
      ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(code, reason); } catch (e) { /* already closed */ }
    }
  };

  Switchboard.prototype._onClose = function (code, reason) {
    var opened = !!this.info;
    var draining = this.drainAt !== null;
    this._drop(1000, '');
    if (draining && !this.stopped) {
      // A reconnect is already scheduled at the server's chosen moment; the 1012 is expected.
      this._status('closed', { code: code, reason: reason || 'server restarting', willRetry: true });
      var left = Math.max(0, this.drainAt - Date.now());
      this._status('reconnect-scheduled', { delay: left, attempt: 0, code: code, reason: reason });
      return;
    }
    if (!reason && code === 1006 && !opened) {
      reason = 'connection failed before the server accepted it (network, proxy, or an HTTP refusal)';
    }
    this._afterClose(code, reason || '');
  };

  Switchboard.prototype._afterClose = function (code, reason) {
    if (this.stopped) return;
    var kind = NO_RETRY[code];
    if (kind) {
      this.stopped = true;
      if (kind === 'refused') this._status('refused', { code: code, reason: reason });
      else this._status('closed', { code: code, reason: reason, willRetry: false });
      return;
    }
    // A connection that stayed up a while starts the backoff afresh.
    if (this.openedAt && Date.now() - this.openedAt > 10000) this.attempt = 0;
    this.openedAt = 0;
    this._status('closed', { code: code, reason: reason, willRetry: true });
    this._schedule(code === 4429 ? CAP_RETRY_MS : this._backoff(), code, reason);
  };

  // Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... capped at 30 s, each +-25 %.
  Switchboard.prototype._backoff = function () {
    var base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, this.attempt));
    var delay = base * (0.75 + Math.random() * 0.5);
    return Math.round(Math.max(BACKOFF_MIN_MS, Math.min(BACKOFF_MAX_MS, delay)));
  };

  Switchboard.prototype._schedule = function (delay, code, reason) {
    var self = this;
    this.attempt += 1;
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(function () {
      self.retryTimer = null;
      if (!self.stopped) self.connect();
    }, delay);
    this._status('reconnect-scheduled', { delay: delay, attempt: this.attempt, code: code, reason: reason });
  };

  global.Switchboard = Switchboard;
})(typeof window !== 'undefined' ? window : this);
